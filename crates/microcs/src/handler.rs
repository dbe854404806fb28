//! Handlers after type erasure, as the servers (and their NATS side) hold them: each is unary
//! (one answer) or streaming (items, then an end; docs/PROTOCOL.md § 17).

use std::sync::Arc;

use crate::error::RemoteError;
use crate::request::Request;

/// A blocking unary handler.
pub(crate) type SyncUnary = dyn Fn(Request) -> Result<Vec<u8>, RemoteError> + Send + Sync;
/// The items of a blocking stream, in order; an `Err` ends the stream with that error.
pub(crate) type SyncItems = Box<dyn Iterator<Item = Result<Vec<u8>, RemoteError>> + Send>;
/// A blocking streaming handler: the request in, its items out (or an error before any).
pub(crate) type SyncStream = dyn Fn(Request) -> Result<SyncItems, RemoteError> + Send + Sync;

/// A blocking server's handler.
pub(crate) enum SyncHandler {
    Unary(Arc<SyncUnary>),
    Stream(Arc<SyncStream>),
}

/// Whether a handler answers with a stream; a plain request to one is refused
/// ([`crate::dispatch::begin`]).
pub(crate) trait Streams {
    fn streams(&self) -> bool;
}

impl Streams for Arc<SyncHandler> {
    fn streams(&self) -> bool {
        matches!(**self, SyncHandler::Stream(_))
    }
}

#[cfg(feature = "tokio")]
pub(crate) use async_handlers::*;

#[cfg(feature = "tokio")]
pub(crate) mod async_handlers {
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::{Arc, Mutex};

    use super::{Streams, SyncHandler, SyncStream, SyncUnary};
    use crate::dispatch::Answer;
    use crate::error::RemoteError;
    use crate::proto::status;
    use crate::request::{CancelState, IntoPayload, Request, Room};

    /// What an async handler's future resolves to.
    pub(crate) type HandlerFuture = Pin<Box<dyn Future<Output = Result<Vec<u8>, RemoteError>> + Send>>;
    /// An async unary handler.
    pub(crate) type AsyncUnary = dyn Fn(Request) -> HandlerFuture + Send + Sync;
    /// An async streaming handler: pushes its items into [`Items`]; its future's `Ok` (always
    /// empty) ends the stream.
    pub(crate) type AsyncStream = dyn Fn(Request, Items) -> HandlerFuture + Send + Sync;

    /// An async server's handler.
    pub(crate) enum AsyncHandler {
        Unary(Box<AsyncUnary>),
        Stream(Box<AsyncStream>),
    }

    impl Streams for Arc<AsyncHandler> {
        fn streams(&self) -> bool {
            matches!(**self, AsyncHandler::Stream(_))
        }
    }

    /// A blocking handler as an async one (as `tokio::blocking` and `tokio::blocking_stream`
    /// make them, for `tokio::Server::from_blocking`): each call runs on tokio's blocking pool.
    pub(crate) fn on_blocking_pool(h: &SyncHandler) -> AsyncHandler {
        match h {
            SyncHandler::Unary(f) => AsyncHandler::Unary(Box::new(pooled_unary(f.clone()))),
            SyncHandler::Stream(f) => AsyncHandler::Stream(Box::new(pooled_stream(f.clone()))),
        }
    }

    /// A blocking unary handler whose every call runs on the blocking pool ([`pooled`]).
    pub(crate) fn pooled_unary(
        f: Arc<SyncUnary>,
    ) -> impl Fn(Request) -> HandlerFuture + Send + Sync + 'static {
        move |req| {
            let f = f.clone();
            Box::pin(pooled(move || f(req)))
        }
    }

    /// A blocking streaming handler served through [`pump`].
    pub(crate) fn pooled_stream(
        f: Arc<SyncStream>,
    ) -> impl Fn(Request, Items) -> HandlerFuture + Send + Sync + 'static {
        move |req, items| {
            let f = f.clone();
            Box::pin(pump(move || f(req), items))
        }
    }

    /// Runs `work` on tokio's blocking pool (`spawn_blocking`) and waits for it, so that it never
    /// holds up the runtime's workers. A panic in it is resumed in the waiting task (the
    /// request's, which answers it with 500 as for any handler). Work still running when the
    /// waiting task is dropped (deadline, cancel) runs to its end, as on the blocking server.
    async fn pooled<T, W>(work: W) -> Result<T, RemoteError>
    where
        T: Send + 'static,
        W: FnOnce() -> Result<T, RemoteError> + Send + 'static,
    {
        match ::tokio::task::spawn_blocking(work).await {
            Ok(r) => r,
            Err(e) => match e.try_into_panic() {
                Ok(panic) => std::panic::resume_unwind(panic),
                Err(_) => Err(RemoteError::new(status::BUSY, "the server's runtime is shutting down")),
            },
        }
    }

    /// Serves a blocking stream: `open` (the handler) and each `next()` of the iterator it
    /// returns run on the blocking pool, one at a time — a pool thread is held only while an
    /// item is being made, never while the caller has no room (that wait is the task's, on the
    /// runtime), so a thousand slow consumers hold no thread. When the stream ends early
    /// (cancel, deadline, shutdown: the task is dropped), the iterator is dropped on the pool
    /// too, where dropping it may block (a Python generator's `close()` takes the GIL).
    async fn pump<I, O>(open: O, items: Items) -> Result<Vec<u8>, RemoteError>
    where
        I: Iterator<Item = Result<Vec<u8>, RemoteError>> + Send + 'static,
        O: FnOnce() -> Result<I, RemoteError> + Send + 'static,
    {
        let mut held = DropOnPool(Some(pooled(open).await?));
        while let Some(mut all) = held.0.take() {
            let (all, next) = pooled(move || {
                let next = all.next();
                Ok((all, next))
            })
            .await?;
            held.0 = Some(all);
            match next {
                Some(item) => items.send(item?).await?,
                None => break,
            }
        }
        Ok(Vec::new())
    }

    /// Drops what it holds on tokio's blocking pool (see [`pump`]).
    struct DropOnPool<T: Send + 'static>(Option<T>);

    impl<T: Send + 'static> Drop for DropOnPool<T> {
        fn drop(&mut self) {
            if let Some(it) = self.0.take() {
                match ::tokio::runtime::Handle::try_current() {
                    Ok(rt) => drop(rt.spawn_blocking(move || drop(it))),
                    Err(_) => drop(it),
                }
            }
        }
    }

    /// Where a stream's item goes: the connection's writer. `Err`: the stream must end with
    /// this answer instead (an item over the client's limit).
    pub(crate) type Sink = Arc<dyn Fn(Vec<u8>) -> Result<(), Answer> + Send + Sync>;

    /// The items of a stream an async handler answers with: [`send`](Items::send) each one.
    ///
    /// Sending waits while the caller's window is full (docs/PROTOCOL.md § 17), so a slow
    /// consumer slows the handler down instead of filling memory; it fails once the caller has
    /// cancelled or left (return the error with `?`: nobody reads the stream any more).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> microcs::Result<()> {
    /// use microcs::{RemoteError, Request};
    /// use microcs::tokio::Items;
    ///
    /// let server = microcs::tokio::Server::builder("COUNTER")
    ///     .bind()
    ///     .await?
    ///     .stream_method("count", |req: Request, items: Items| async move {
    ///         let n: u32 = req.text()?.parse().map_err(|_| RemoteError::new(400, "want a number"))?;
    ///         for i in 0..n {
    ///             items.send(i.to_string()).await?;
    ///         }
    ///         Ok::<_, RemoteError>(())
    ///     });
    /// # let _ = server; Ok(()) }
    /// ```
    pub struct Items {
        pub(crate) cancel: Arc<CancelState>,
        pub(crate) sink: Sink,
        /// The answer that must end the stream, when the library ended it (an item too large).
        pub(crate) overflow: Arc<Mutex<Option<Answer>>>,
    }

    impl std::fmt::Debug for Items {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("Items").field("cancelled", &self.cancel.is_set()).finish_non_exhaustive()
        }
    }

    impl Items {
        /// Sends one item, once the caller has room for it.
        ///
        /// # Errors
        ///
        /// A [`RemoteError`] to return from the handler when the stream cannot go on: the
        /// caller cancelled or left (code 499; no answer is sent for a cancelled stream), or the
        /// item is over the caller's limit (the stream then ends with `Error` 413).
        pub async fn send(&self, item: impl IntoPayload) -> Result<(), RemoteError> {
            let item = item.into_payload();
            match std::future::poll_fn(|cx| self.cancel.poll_room(cx)).await {
                Room::Ready => {}
                Room::Cancelled | Room::TimedOut => {
                    return Err(RemoteError::new(status::CANCELLED, "the caller cancelled the stream"));
                }
            }
            let len = item.len();
            match (self.sink)(item) {
                Ok(()) => {
                    self.cancel.take_room(len);
                    Ok(())
                }
                Err(answer) => {
                    let e = match &answer {
                        Answer::Error { code, message, .. } => RemoteError::new(*code, message.clone()),
                        Answer::Reply(_) => RemoteError::new(status::TOO_LARGE, "stream item too large"),
                    };
                    *self.overflow.lock().unwrap_or_else(|p| p.into_inner()) = Some(answer);
                    Err(e)
                }
            }
        }

        /// True once the caller has cancelled the stream or left.
        pub fn is_cancelled(&self) -> bool {
            self.cancel.is_set()
        }
    }
}
