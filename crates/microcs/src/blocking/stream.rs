//! [`Client::stream`]: a request answered by a stream of items (docs/PROTOCOL.md § 17).

use std::io::IoSlice;
use std::time::{Duration, Instant};

use super::{Client, Wait};
use crate::error::{Error, ErrorKind, Result};
use crate::proto::client_conn::{self, Incoming, Loss, Window, Written};
use crate::proto::{self, Header, Kind};
use crate::transport::{send_all, send_frame};

impl Client {
    /// Calls `method` (empty: the default handler) with `payload` and returns its answer as a
    /// stream of items: an iterator that yields each item as it arrives, then ends when the
    /// server ends the stream (or yields the error that ended it, then `None`).
    ///
    /// The server sends ahead of the application by at most one
    /// [window](crate::ClientBuilder::stream_window); the client's
    /// [timeout](crate::ClientBuilder::timeout) bounds each wait for the next item, not the
    /// whole stream (use [`stream_until`](Client::stream_until) for that). Dropping the
    /// iterator before the end cancels the stream on the server. Any method can be called this
    /// way: a unary one answers with one item. The client is borrowed until the iterator is
    /// dropped (one call at a time, as for [`call`](Client::call)).
    ///
    /// # Errors
    ///
    /// As [`call`](Client::call), and [`ErrorKind::Protocol`] when the service does not support
    /// streams (its microcs predates them, or it was reached over NATS: streams are local only).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// let mut client = microcs::Client::connect("LIFE_GEN")?;
    /// for board in client.stream("run", b"500")? {
    ///     println!("{}", String::from_utf8_lossy(&board?));
    /// }
    /// # Ok::<(), microcs::Error>(())
    /// ```
    pub fn stream(&mut self, method: &str, payload: &[u8]) -> Result<ItemStream<'_>> {
        self.borrowed_stream(method, payload, None)
    }

    /// As [`stream`](Client::stream), with the whole stream bounded by `limit`: the server
    /// stops it when that time has passed (the stream then ends with `TimedOut`).
    ///
    /// # Errors
    ///
    /// As [`stream`](Client::stream).
    pub fn stream_until(&mut self, method: &str, payload: &[u8], limit: Duration) -> Result<ItemStream<'_>> {
        self.borrowed_stream(method, payload, Some(limit))
    }

    /// As [`stream_until`](Client::stream_until) (with `limit`) or [`stream`](Client::stream)
    /// (without), taking the client along: for a stream that must outlive a borrow (the Python
    /// bindings keep one in an object). [`ItemStream::into_client`] gives the client back; so
    /// does the error when the stream could not be opened.
    ///
    /// # Errors
    ///
    /// As [`stream`](Client::stream), with the client.
    pub fn into_stream(
        self,
        method: &str,
        payload: &[u8],
        limit: Option<Duration>,
    ) -> std::result::Result<ItemStream<'static>, (Error, Box<Client>)> {
        let mut client = Box::new(self);
        match client.open_stream(method, payload, limit) {
            Ok((id, window)) => Ok(ItemStream { client: Lend::Owned(client), id, window, done: false }),
            Err(e) => Err((e, client)),
        }
    }

    fn borrowed_stream(
        &mut self,
        method: &str,
        payload: &[u8],
        whole: Option<Duration>,
    ) -> Result<ItemStream<'_>> {
        let (id, window) = self.open_stream(method, payload, whole)?;
        Ok(ItemStream { client: Lend::Borrowed(self), id, window, done: false })
    }

    /// Sends the stream request and its first credit: the stream's id and window.
    fn open_stream(
        &mut self,
        method: &str,
        payload: &[u8],
        whole: Option<Duration>,
    ) -> Result<(u64, Window)> {
        if !method.is_empty() {
            proto::check_method(method).map_err(|m| Error::new(ErrorKind::InvalidName, m))?;
        }
        self.leave_inherited();
        #[cfg(feature = "nats")]
        if let Some(link) = &self.nats {
            if !link.try_local(self.conn.is_some()) {
                return Err(Error::new(
                    ErrorKind::Protocol,
                    format!("service '{}' is reached over NATS, and streams are local only", self.name),
                ));
            }
        }
        let deadline = Instant::now() + self.timeout;
        // At most one resend, and only of a request that provably did not reach the server.
        let mut resent = false;
        loop {
            if self.conn.is_none() {
                self.conn = Some(self.open(deadline)?);
            }
            let conn = self.conn.as_ref().expect("connected");
            client_conn::check_streams(&self.name, &conn.server)?;
            client_conn::check_payload(&self.name, payload.len(), &conn.server)?;
            let id = self.next_id.next();
            let head = client_conn::stream_header(id, whole).to_bytes(method.len(), payload.len());
            let window = Window::new(self.window);
            let credit = window.opening().to_bytes();
            let credit_head = Header::new(Kind::Credit, id).to_bytes(0, credit.len());
            let mut parts = [
                IoSlice::new(&head),
                IoSlice::new(method.as_bytes()),
                IoSlice::new(payload),
                IoSlice::new(&credit_head),
                IoSlice::new(&credit),
            ];
            match send_all(&conn.stream, &mut parts) {
                Ok(()) => return Ok((id, window)),
                Err(e) => {
                    self.conn = None;
                    let loss = Loss::from_io(e.error);
                    let retry = e.sent == 0 && matches!(loss, Loss::Closed(_)) && !resent;
                    if !retry {
                        let written = if e.sent == 0 { Written::None } else { Written::Part };
                        return Err(loss.error(&self.name, written));
                    }
                    resent = true;
                }
            }
        }
    }
}

/// The items of a stream, from [`Client::stream`]: each `next()` waits for the next one.
///
/// After the end of the stream (or its error) it yields `None`. Dropping it earlier sends the
/// server a `Cancel`: the server stops the stream's handler, and items already on their way are
/// discarded.
#[derive(Debug)]
#[must_use = "a stream is cancelled when dropped"]
pub struct ItemStream<'a> {
    client: Lend<'a>,
    id: u64,
    window: Window,
    done: bool,
}

/// The client a stream reads with: borrowed ([`Client::stream`]) or taken along
/// ([`Client::into_stream`]; `Returned` once [`ItemStream::into_client`] gave it back).
#[derive(Debug)]
enum Lend<'a> {
    Borrowed(&'a mut Client),
    Owned(Box<Client>),
    Returned,
}

impl Lend<'_> {
    fn get(&mut self) -> Option<&mut Client> {
        match self {
            Lend::Borrowed(c) => Some(c),
            Lend::Owned(c) => Some(c),
            Lend::Returned => None,
        }
    }
}

impl ItemStream<'_> {
    /// Ends the stream here (the server is told to stop unless it has ended) and gives back the
    /// client of [`Client::into_stream`]; `None` for a stream whose client is only borrowed.
    pub fn into_client(mut self) -> Option<Client> {
        if !self.done {
            self.cancel();
        }
        match std::mem::replace(&mut self.client, Lend::Returned) {
            Lend::Owned(c) => Some(*c),
            Lend::Borrowed(_) | Lend::Returned => None,
        }
    }

    /// Ends the stream here: the server is told to stop (best effort).
    fn cancel(&mut self) {
        self.done = true;
        if let Some(conn) = self.client.get().and_then(|c| c.conn.as_ref()) {
            let _ = send_frame(&conn.stream, &Header::new(Kind::Cancel, self.id), b"", b"");
        }
    }

    /// The stream failed with the connection: it is dropped, and the client reconnects next time.
    fn lost(done: &mut bool, client: &mut Client, loss: Loss) -> Error {
        *done = true;
        client.conn = None;
        loss.error(&client.name, Written::All)
    }
}

impl Iterator for ItemStream<'_> {
    type Item = Result<Vec<u8>>;

    fn next(&mut self) -> Option<Result<Vec<u8>>> {
        if self.done {
            return None;
        }
        let Some(client) = self.client.get() else {
            self.done = true;
            return None;
        };
        let timeout = client.timeout;
        let deadline = Instant::now() + timeout;
        loop {
            let Some(conn) = client.conn.as_mut() else {
                self.done = true;
                return None;
            };
            let (frame, payload) = match conn.read_frame(deadline, client.interrupt.as_ref()) {
                Ok(f) => f,
                Err(Wait::TimedOut) => {
                    let e = client_conn::stream_timed_out(&client.name, timeout);
                    self.cancel();
                    return Some(Err(e));
                }
                Err(Wait::Interrupted) => {
                    let e = Error::io(
                        format_args!(
                            "the wait for service '{}' was interrupted; the stream may have run",
                            client.name
                        ),
                        std::io::ErrorKind::Interrupted.into(),
                    );
                    self.cancel();
                    return Some(Err(e.set_may_have_run(true)));
                }
                Err(Wait::Lost(loss)) => return Some(Err(Self::lost(&mut self.done, client, loss))),
            };
            match frame {
                Incoming::Item(i) if i == self.id => {
                    if let Some(credit) = self.window.took(payload.len()) {
                        let body = credit.to_bytes();
                        // A failure shows on the next read as the connection's loss.
                        let _ = send_frame(&conn.stream, &Header::new(Kind::Credit, self.id), b"", &body);
                    }
                    return Some(Ok(payload));
                }
                Incoming::Reply(i) if i == self.id => {
                    self.done = true;
                    // The end is an empty `Reply`; a peer that puts its last item there is
                    // taken at its word.
                    return (!payload.is_empty()).then_some(Ok(payload));
                }
                Incoming::Error { id, status, flags, message } if id == self.id => {
                    self.done = true;
                    return Some(Err(Error::from_remote(client.name.as_str(), status, flags, message)));
                }
                Incoming::Closing(loss) => return Some(Err(Self::lost(&mut self.done, client, loss))),
                // Answers to requests given up on earlier, pings: not ours.
                _ => continue,
            }
        }
    }
}

impl Drop for ItemStream<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.cancel();
        }
    }
}
