//! What a handler sees and returns: [`Request`], [`Peer`], [`IntoPayload`].

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use crate::error::RemoteError;
use crate::proto::status;

/// The calling process, as the kernel reported it when the connection was accepted
/// (`SO_PEERCRED`): it cannot be forged by the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Peer {
    /// Process id of the peer when it connected.
    pub pid: u32,
    /// Effective user id of the peer.
    pub uid: u32,
    /// Effective group id of the peer.
    pub gid: u32,
}

/// Shared state between the connection (which sees `Cancel` and `Credit` frames and
/// disconnects) and the handler (which polls it or awaits it): the cancel flag and, for a
/// stream, the room its caller granted (docs/PROTOCOL.md § 17).
#[derive(Default)]
pub(crate) struct CancelState {
    flag: AtomicBool,
    wakers: Mutex<Vec<Waker>>,
    /// Items and bytes the caller still lets the server send (streams only).
    room: Mutex<(u64, u64)>,
    /// Signalled on more room and on cancel, for a blocking stream waiting for room.
    room_cv: Condvar,
}

/// What a stream waiting to send its next item found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Room {
    /// There is room: send it, then [`take_room`](CancelState::take_room).
    Ready,
    /// The caller cancelled or left: stop.
    Cancelled,
    /// The deadline passed first.
    TimedOut,
}

impl CancelState {
    pub(crate) fn cancel(&self) {
        self.flag.store(true, Ordering::SeqCst);
        self.wake_all();
    }

    fn wake_all(&self) {
        {
            // Under the room lock, so a blocking waiter that just checked cannot miss it.
            let _room = self.room.lock().unwrap_or_else(|p| p.into_inner());
            self.room_cv.notify_all();
        }
        let wakers = std::mem::take(&mut *self.wakers.lock().unwrap_or_else(|p| p.into_inner()));
        for w in wakers {
            w.wake();
        }
    }

    /// The caller granted more room (a `Credit` frame).
    pub(crate) fn grant(&self, items: u32, bytes: u32) {
        {
            let mut room = self.room.lock().unwrap_or_else(|p| p.into_inner());
            room.0 = room.0.saturating_add(u64::from(items));
            room.1 = room.1.saturating_add(u64::from(bytes));
            self.room_cv.notify_all();
        }
        let wakers = std::mem::take(&mut *self.wakers.lock().unwrap_or_else(|p| p.into_inner()));
        for w in wakers {
            w.wake();
        }
    }

    fn has_room(room: &(u64, u64)) -> bool {
        room.0 > 0 && room.1 > 0
    }

    /// Waits (blocking) until there is room for one more item, the caller cancels, or
    /// `deadline` passes.
    pub(crate) fn wait_room(&self, deadline: Option<Instant>) -> Room {
        let mut room = self.room.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if self.is_set() {
                return Room::Cancelled;
            }
            if Self::has_room(&room) {
                return Room::Ready;
            }
            room = match deadline {
                None => self.room_cv.wait(room).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Room::TimedOut;
                    }
                    self.room_cv.wait_timeout(room, left).unwrap_or_else(|p| p.into_inner()).0
                }
            };
        }
    }

    /// As [`wait_room`](Self::wait_room) for a task (the deadline is the caller's to race).
    #[cfg(feature = "tokio")]
    pub(crate) fn poll_room(&self, cx: &mut Context<'_>) -> Poll<Room> {
        let check = || {
            if self.is_set() {
                Some(Room::Cancelled)
            } else if Self::has_room(&self.room.lock().unwrap_or_else(|p| p.into_inner())) {
                Some(Room::Ready)
            } else {
                None
            }
        };
        if let Some(r) = check() {
            return Poll::Ready(r);
        }
        let mut wakers = self.wakers.lock().unwrap_or_else(|p| p.into_inner());
        if !wakers.iter().any(|w| w.will_wake(cx.waker())) {
            wakers.push(cx.waker().clone());
        }
        drop(wakers);
        // Granted or cancelled between the check and the registration: do not sleep on it.
        match check() {
            Some(r) => Poll::Ready(r),
            None => Poll::Pending,
        }
    }

    /// One item of `len` bytes was sent: uses its room (the bytes may overshoot, by one item).
    pub(crate) fn take_room(&self, len: usize) {
        let mut room = self.room.lock().unwrap_or_else(|p| p.into_inner());
        room.0 = room.0.saturating_sub(1);
        room.1 = room.1.saturating_sub(len as u64);
    }

    pub(crate) fn is_set(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    /// Resolves once [`cancel`](CancelState::cancel) has been called (the server's side of
    /// [`Request::cancelled`], for when the handler owns the request).
    #[cfg(feature = "tokio")]
    pub(crate) fn wait(&self) -> Cancelled<'_> {
        Cancelled { state: self }
    }
}

/// One call, as the handler receives it.
///
/// # Examples
///
/// ```
/// fn handler(req: microcs::Request) -> Result<String, microcs::RemoteError> {
///     let who = req.peer();
///     Ok(format!("{} bytes from pid {} for method {:?}", req.payload().len(), who.pid, req.method()))
/// }
/// # let _ = handler;
/// ```
pub struct Request {
    pub(crate) id: u64,
    pub(crate) method: Option<String>,
    pub(crate) payload: Vec<u8>,
    pub(crate) peer: Peer,
    pub(crate) deadline: Option<Instant>,
    pub(crate) cancel: Arc<CancelState>,
}

impl Request {
    /// The request's payload.
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }

    /// Takes the payload out of the request, without copying.
    pub fn into_payload(self) -> Vec<u8> {
        self.payload
    }

    /// The payload as UTF-8 text.
    ///
    /// # Errors
    ///
    /// A [`RemoteError`] with code 400, ready to return from the handler with `?`, when the
    /// payload is not valid UTF-8.
    pub fn text(&self) -> Result<&str, RemoteError> {
        std::str::from_utf8(&self.payload)
            .map_err(|e| RemoteError::new(status::BAD_REQUEST, format!("payload is not UTF-8: {e}")))
    }

    /// The method the caller named, or `None` for the service's default handler.
    pub fn method(&self) -> Option<&str> {
        self.method.as_deref()
    }

    /// Who is calling (from the kernel, read once when the connection was accepted).
    pub fn peer(&self) -> Peer {
        self.peer
    }

    /// The caller's deadline: after it, nobody waits for the reply.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Time left before the caller's deadline (zero once it has passed); `None` if it set none.
    pub fn remaining(&self) -> Option<Duration> {
        self.deadline.map(|d| d.saturating_duration_since(Instant::now()))
    }

    /// The request id the caller chose (unique among its requests in flight on one connection).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// True once nobody wants the answer any more: the caller cancelled (or timed out and said
    /// so), disconnected, or the deadline passed. A long-running blocking handler should check it
    /// now and then and stop early; what it returns afterwards is discarded.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_set() || self.deadline.is_some_and(|d| Instant::now() >= d)
    }

    /// Resolves when the caller cancels the request or disconnects (for async handlers).
    ///
    /// It does not itself watch the deadline; the async server stops the handler at the
    /// deadline by dropping it.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: dropping the future and calling again loses nothing.
    pub fn cancelled(&self) -> Cancelled<'_> {
        Cancelled { state: &self.cancel }
    }

    /// A request built by hand, for unit-testing handlers without a server.
    ///
    /// # Examples
    ///
    /// ```
    /// let req = microcs::Request::for_test(Some("step"), b"..#".to_vec());
    /// assert_eq!(req.method(), Some("step"));
    /// assert!(!req.is_cancelled());
    /// ```
    pub fn for_test(method: Option<&str>, payload: Vec<u8>) -> Request {
        Request {
            id: 1,
            method: method.map(str::to_owned),
            payload,
            peer: Peer { pid: std::process::id(), uid: crate::registry::euid(), gid: 0 },
            deadline: None,
            cancel: Arc::default(),
        }
    }
}

impl fmt::Debug for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Request")
            .field("id", &self.id)
            .field("method", &self.method)
            .field("payload_len", &self.payload.len())
            .field("peer", &self.peer)
            .field("deadline", &self.deadline)
            .field("cancelled", &self.cancel.is_set())
            .finish()
    }
}

/// Future returned by [`Request::cancelled`].
#[must_use = "futures do nothing unless awaited"]
pub struct Cancelled<'a> {
    state: &'a CancelState,
}

impl Future for Cancelled<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.state.is_set() {
            return Poll::Ready(());
        }
        let mut wakers = self.state.wakers.lock().unwrap_or_else(|p| p.into_inner());
        if self.state.is_set() {
            return Poll::Ready(());
        }
        if !wakers.iter().any(|w| w.will_wake(cx.waker())) {
            wakers.push(cx.waker().clone());
        }
        Poll::Pending
    }
}

/// What a handler may return as its reply: bytes or text.
pub trait IntoPayload {
    /// The reply bytes.
    fn into_payload(self) -> Vec<u8>;
}

impl IntoPayload for Vec<u8> {
    fn into_payload(self) -> Vec<u8> {
        self
    }
}
impl IntoPayload for String {
    fn into_payload(self) -> Vec<u8> {
        self.into_bytes()
    }
}
impl IntoPayload for &str {
    fn into_payload(self) -> Vec<u8> {
        self.as_bytes().to_vec()
    }
}
impl IntoPayload for &[u8] {
    fn into_payload(self) -> Vec<u8> {
        self.to_vec()
    }
}
impl<const N: usize> IntoPayload for [u8; N] {
    fn into_payload(self) -> Vec<u8> {
        self.to_vec()
    }
}
impl<const N: usize> IntoPayload for &[u8; N] {
    fn into_payload(self) -> Vec<u8> {
        self.to_vec()
    }
}
impl IntoPayload for Box<[u8]> {
    fn into_payload(self) -> Vec<u8> {
        self.into_vec()
    }
}
impl IntoPayload for () {
    fn into_payload(self) -> Vec<u8> {
        Vec::new()
    }
}

/// Turns whatever error a handler returned into the code and message sent to the caller: a
/// [`RemoteError`] keeps its code, a [`crate::Error`] that came from another service keeps that
/// service's code, anything else is code 500 with its message (and its sources').
pub(crate) fn to_remote(err: Box<dyn std::error::Error + Send + Sync>) -> RemoteError {
    let err = match err.downcast::<RemoteError>() {
        Ok(r) => return *r,
        Err(e) => e,
    };
    if let Some(r) = err.downcast_ref::<crate::Error>().and_then(crate::Error::remote) {
        return r.clone();
    }
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    RemoteError::new(status::HANDLER_FAILED, message)
}

/// The text of a caught panic.
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    let what = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-string panic payload".to_owned());
    format!("handler panicked: {what}")
}
