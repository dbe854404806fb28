//! [`Client::stream`]: a request answered by a stream of items (docs/PROTOCOL.md § 17).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use ::tokio::sync::mpsc;
use ::tokio::time::{Instant, Sleep, sleep};
use futures_core::Stream;

use super::conn::{Event, Pending, Waiter};
use super::{Client, Conn};
use crate::error::{Error, ErrorKind, Result};
use crate::fork;
use crate::name::Name;
use crate::proto::client_conn::{self, Attempt, Loss, Outcome, Window, Written};
use crate::proto::{self, Header, Kind};

/// A deadline so far away it never comes (a stream with no bound on its whole length).
const NEVER: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

impl Client {
    /// Calls `method` (empty: the default handler) with `payload` and returns its answer as a
    /// [`Stream`] of items, each as it arrives; it ends when the server ends the stream (after
    /// yielding the error that ended it, if one did).
    ///
    /// Streams share the client's one connection with its other calls. The server sends ahead
    /// of the application by at most one [window](crate::tokio::ClientBuilder::stream_window);
    /// the client's timeout bounds each wait for the next item, not the whole stream (see
    /// [`stream_until`](Client::stream_until)). Dropping the stream before its end cancels it on
    /// the server. A unary method answers with one item.
    ///
    /// # Errors
    ///
    /// As [`call`](Client::call), and [`ErrorKind::Protocol`] when the service does not support
    /// streams (its microcs predates them, or it was reached over NATS: streams are local only).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> microcs::Result<()> {
    /// use std::future::poll_fn;
    /// use std::pin::Pin;
    /// use futures_core::Stream;
    ///
    /// let client = microcs::tokio::Client::connect("LIFE_GEN").await?;
    /// let mut boards = client.stream("run", b"500").await?;
    /// while let Some(board) = poll_fn(|cx| Pin::new(&mut boards).poll_next(cx)).await {
    ///     println!("{}", String::from_utf8_lossy(&board?));
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn stream(&self, method: &str, payload: &[u8]) -> Result<ItemStream> {
        self.open_stream(method, payload, None).await
    }

    /// As [`stream`](Client::stream), with the whole stream bounded by `limit`: the server stops
    /// it when that time has passed (the stream then ends with `TimedOut`).
    ///
    /// # Errors
    ///
    /// As [`stream`](Client::stream).
    pub async fn stream_until(&self, method: &str, payload: &[u8], limit: Duration) -> Result<ItemStream> {
        self.open_stream(method, payload, Some(limit)).await
    }

    async fn open_stream(&self, method: &str, payload: &[u8], whole: Option<Duration>) -> Result<ItemStream> {
        let s = &self.shared;
        let now = fork::current();
        if now != s.owner {
            return Err(client_conn::forked(&s.name, s.owner, now));
        }
        if !method.is_empty() {
            proto::check_method(method).map_err(|m| Error::new(ErrorKind::InvalidName, m))?;
        }
        #[cfg(feature = "nats")]
        if let Some(link) = &s.nats {
            if !link.try_local(self.has_local()) {
                return Err(Error::new(
                    ErrorKind::Protocol,
                    format!("service '{}' is reached over NATS, and streams are local only", s.name),
                ));
            }
        }
        let deadline = Instant::now() + self.timeout;
        let mut resent = false;
        loop {
            let conn = match s.current() {
                Some(c) => c,
                None => self.connection(deadline).await?,
            };
            match open_on(&conn, &s.name, s.next_id.next(), s.window, method, payload, whole, self.timeout) {
                Ok(stream) => return Ok(stream),
                Err(Attempt::NotRun(e)) if !resent => {
                    tracing::debug!(service = %s.name, error = %e, "stream request did not run; sending it on a new connection");
                    s.retire(&conn);
                    resent = true;
                }
                Err(Attempt::NotRun(e) | Attempt::Failed(e)) => return Err(e),
            }
        }
    }
}

/// Queues the stream request and its first credit on `conn`, registered as one pending stream.
#[allow(clippy::too_many_arguments)]
fn open_on(
    conn: &Arc<Conn>,
    name: &Name,
    id: u64,
    full: proto::Credit,
    method: &str,
    payload: &[u8],
    whole: Option<Duration>,
    timeout: Duration,
) -> std::result::Result<ItemStream, Attempt> {
    client_conn::check_streams(name, &conn.server).map_err(Attempt::Failed)?;
    client_conn::check_payload(name, payload.len(), &conn.server).map_err(Attempt::Failed)?;
    let window = Window::new(full);
    let (tx, rx) = mpsc::unbounded_channel();
    let deadline = Instant::now() + whole.unwrap_or(NEVER);
    let released = {
        let mut st = conn.book();
        let header = client_conn::stream_header(id, whole);
        let Some((start, _)) = st.push(&header, method.as_bytes(), payload) else {
            let dead = st.extra.dead.clone().unwrap_or(Loss::Closed(None));
            return Err(Attempt::NotRun(dead.error(name, Written::None)));
        };
        let credit = window.opening().to_bytes();
        let end = st.push(&Header::new(Kind::Credit, id), b"", &credit).map_or(start, |(_, e)| e);
        st.extra.pending.insert(id, Pending { tx: Waiter::Stream(tx), deadline, start, end });
        if st.extra.next_deadline.is_none_or(|t| deadline < t) {
            st.extra.next_deadline = Some(deadline);
        }
        // A lone caller that drives the read loop gives it back: the stream's items are the
        // reader task's to hand out (see `conn::Reader`).
        conn.reader.release()
    };
    if released {
        conn.reader.wake();
    }
    conn.outbox.wake();
    conn.deadlines.notify_one();
    Ok(ItemStream {
        conn: conn.clone(),
        name: name.clone(),
        id,
        rx,
        window,
        timeout,
        idle: Box::pin(sleep(timeout)),
        done: false,
        owner: fork::current(),
    })
}

/// The items of a stream, from [`Client::stream`]: a [`Stream`] of `Result<Vec<u8>>`.
///
/// Each item comes as the server sends it; after the end (or the error that ended it) the
/// stream yields `None`. Dropping it earlier sends the server a `Cancel`, which stops the
/// stream's handler there.
#[must_use = "a stream is cancelled when dropped"]
pub struct ItemStream {
    conn: Arc<Conn>,
    name: Name,
    id: u64,
    rx: mpsc::UnboundedReceiver<Event>,
    window: Window,
    timeout: Duration,
    /// The wait for the next item (the client's timeout, from the last item).
    idle: Pin<Box<Sleep>>,
    done: bool,
    owner: u32,
}

impl std::fmt::Debug for ItemStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ItemStream")
            .field("service", &self.name)
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl ItemStream {
    fn end(&mut self, outcome: Outcome) -> Option<Result<Vec<u8>>> {
        self.done = true;
        match outcome {
            Outcome::Reply(last) => (!last.is_empty()).then_some(Ok(last)),
            Outcome::Error { status, flags, message } => {
                Some(Err(Error::from_remote(self.name.as_str(), status, flags, message)))
            }
            Outcome::TimedOut => Some(Err(Error::new(
                ErrorKind::TimedOut,
                format!("the stream of service '{}' did not end in time; it may have run", self.name),
            )
            .set_may_have_run(true))),
            Outcome::Interrupted => None,
            Outcome::Lost { loss, written } => Some(Err(loss.error(&self.name, written))),
        }
    }
}

impl Stream for ItemStream {
    type Item = Result<Vec<u8>>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Vec<u8>>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        match this.rx.poll_recv(cx) {
            Poll::Ready(Some(Event::Item(item))) => {
                if let Some(credit) = this.window.took(item.len()) {
                    this.conn.credit(this.id, credit);
                }
                this.idle.as_mut().reset(Instant::now() + this.timeout);
                Poll::Ready(Some(Ok(item)))
            }
            Poll::Ready(Some(Event::End(outcome))) => Poll::Ready(this.end(outcome)),
            // The connection's tasks are gone without settling it (its runtime shut down).
            Poll::Ready(None) => {
                Poll::Ready(this.end(Outcome::Lost { loss: Loss::Dropped, written: Written::All }))
            }
            Poll::Pending => match this.idle.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    this.done = true;
                    this.conn.abandon(this.id);
                    Poll::Ready(Some(Err(client_conn::stream_timed_out(&this.name, this.timeout))))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl Drop for ItemStream {
    fn drop(&mut self) {
        // In a child after fork() the connection is the parent's: leave it alone.
        if !self.done && fork::is_current(self.owner) {
            self.conn.abandon(self.id);
        }
    }
}
