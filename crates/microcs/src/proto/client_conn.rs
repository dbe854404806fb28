//! The rules of one client connection, without I/O: the handshake, request ids, what each
//! frame from the server means to the caller waiting for it, and what a caller is told when
//! something goes wrong — including whether its request may have run, and whether it is safe
//! to send it again.
//!
//! Both clients (blocking: one request at a time on the caller's thread; tokio: many in flight,
//! a reader task handing frames out by id) move the bytes and wait; everything they decide
//! about a frame or a failure is decided here, once. Rules (docs/PROTOCOL.md, "Connection
//! rules"):
//! - ids start at 1 and are never reused on a client, across reconnects too, so a late reply to
//!   a request given up on is dropped by its id and never taken for another's answer;
//! - a payload over the server's announced limit is refused before anything is sent;
//! - a reply is decoded with the client's own limit, but never below [`HANDSHAKE_PAYLOAD`], so
//!   the handshake answer and short errors always get through;
//! - a request is sent again (once, on a new connection) only when it provably did not run:
//!   the server answered 503 with `FLAG_NOT_RUN` (shutting down), or not a byte of it was
//!   written before the connection died. Any other failure after sending says "may have run";
//! - an `Error` frame with id 0 is about the connection: it ends, and it fails every request
//!   waiting on it.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::{
    Credit, DecodeError, FEATURE_STREAMS, FLAG_NOT_RUN, FLAG_STREAM, Frame, HANDSHAKE_PAYLOAD, Header, Hello,
    HelloAck, Kind, status,
};
use crate::error::{Error, ErrorKind, Result};
use crate::io::is_disconnect;
use crate::name::Name;

/// Default time a request may take, from sending to reply (both flavours).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// The client's `Hello` frame, announcing the largest reply it accepts and the features it can
/// use (`FEATURE_SHM`: it asks for shared memory, PROTOCOL.md § 18).
pub(crate) fn hello(max_payload: u32, features: u32) -> Vec<u8> {
    let mut b = Vec::new();
    super::encode(&mut b, &Header::new(Kind::Hello, 0), b"", &Hello { max_payload, features }.to_bytes());
    b
}

/// The payload limit to decode the server's frames with.
pub(crate) fn decode_limit(max_payload: u32) -> u32 {
    max_payload.max(HANDSHAKE_PAYLOAD)
}

/// Reads the server's answer to `Hello`.
///
/// # Errors
///
/// The server's refusal (another user, too busy: the request did not run), or
/// [`ErrorKind::Protocol`] when the peer is not a microcs service.
pub(crate) fn handshake_answer(name: &Name, path: &Path, frame: &Frame<'_>) -> Result<HelloAck> {
    let h = &frame.header;
    match h.kind() {
        Some(Kind::HelloAck) => HelloAck::parse(frame.payload)
            .ok_or_else(|| not_microcs(path, "its handshake answer is malformed")),
        Some(Kind::Error) => {
            let message = String::from_utf8_lossy(frame.payload).into_owned();
            Err(Error::from_remote(name.as_str(), h.status, h.flags, message).set_may_have_run(false))
        }
        _ => Err(not_microcs(path, "it answered the handshake with an unexpected frame")),
    }
}

/// Request ids: from 1, never reused.
#[derive(Debug)]
pub(crate) struct Ids(AtomicU64);

impl Ids {
    pub(crate) fn new() -> Ids {
        Ids(AtomicU64::new(1))
    }

    /// The next id (never 0, which is reserved for the connection).
    pub(crate) fn next(&self) -> u64 {
        self.0.fetch_add(1, Ordering::Relaxed).max(1)
    }
}

/// The header of a request for a caller that still waits `remaining`.
pub(crate) fn request_header(id: u64, remaining: Duration) -> Header {
    Header::request(id, super::deadline_ms(remaining))
}

/// The header of a stream request: no deadline unless the caller bounds the whole stream
/// (docs/PROTOCOL.md § 17.3).
pub(crate) fn stream_header(id: u64, whole: Option<Duration>) -> Header {
    Header { flags: FLAG_STREAM, ..Header::request(id, whole.map_or(0, super::deadline_ms)) }
}

/// Refuses a stream to a server that did not announce streams, before anything is sent.
pub(crate) fn check_streams(name: &Name, server: &HelloAck) -> Result<()> {
    if server.features & FEATURE_STREAMS != 0 {
        return Ok(());
    }
    Err(Error::new(
        ErrorKind::Protocol,
        format!("service '{name}' does not support streams (its microcs predates them); nothing was sent"),
    ))
}

/// A stream whose next item (or end) did not come within the caller's timeout; it was
/// cancelled.
pub(crate) fn stream_timed_out(name: &Name, timeout: Duration) -> Error {
    Error::new(
        ErrorKind::TimedOut,
        format!("service '{name}' sent no item of the stream within {timeout:?}; the stream was cancelled"),
    )
    .set_may_have_run(true)
}

/// The caller's side of a stream's flow control: the room it grants, and what the application
/// has taken since the last grant. Room is granted back once half the items or half the bytes
/// of the window were taken, so a server that keeps up never waits for it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Window {
    full: Credit,
    items: u32,
    bytes: u64,
}

impl Window {
    pub(crate) fn new(full: Credit) -> Window {
        Window { full, items: 0, bytes: 0 }
    }

    /// The room granted with the request.
    pub(crate) fn opening(&self) -> Credit {
        self.full
    }

    /// The application took an item of `len` bytes: the `Credit` to send now, if it is time.
    pub(crate) fn took(&mut self, len: usize) -> Option<Credit> {
        self.items += 1;
        self.bytes = self.bytes.saturating_add(len as u64);
        let half_items = self.items >= self.full.items.div_ceil(2);
        let half_bytes = self.bytes >= u64::from(self.full.bytes.div_ceil(2));
        if !(half_items || half_bytes) {
            return None;
        }
        let credit = Credit { items: self.items, bytes: u32::try_from(self.bytes).unwrap_or(u32::MAX) };
        (self.items, self.bytes) = (0, 0);
        Some(credit)
    }
}

/// Refuses a payload over the server's limit before anything is sent.
pub(crate) fn check_payload(name: &Name, len: usize, server: &HelloAck) -> Result<()> {
    if len <= server.max_payload as usize {
        return Ok(());
    }
    Err(Error::new(
        ErrorKind::FrameTooLarge,
        format!(
            "payload of {len} bytes is over service '{name}''s limit of {} bytes; nothing was sent",
            server.max_payload
        ),
    ))
}

/// A frame from the server, as the callers see it.
#[derive(Debug)]
#[cfg_attr(not(feature = "tokio"), allow(dead_code))] // used by the tokio flavour
pub(crate) enum Incoming {
    /// The reply to request `id`; its payload is the frame's. For a stream, its end.
    Reply(u64),
    /// One item of the stream answering request `id`; its payload is the frame's.
    Item(u64),
    /// Request `id` failed.
    Error { id: u64, status: u16, flags: u16, message: String },
    /// The connection failed (an `Error` with id 0): it ends; every waiting request is lost.
    Closing(Loss),
    /// A `Ping`: answer with a `Pong` of the same id and payload (if the client can).
    Ping(u64),
    /// Pongs, and kinds a server has no business sending: dropped.
    Ignore,
}

/// What a frame from the server means (after the handshake).
#[inline]
pub(crate) fn classify(frame: &Frame<'_>) -> Incoming {
    let h = &frame.header;
    let message = || String::from_utf8_lossy(frame.payload).into_owned();
    match h.kind() {
        Some(Kind::Reply) if h.id != 0 => Incoming::Reply(h.id),
        Some(Kind::Item) if h.id != 0 => Incoming::Item(h.id),
        Some(Kind::Error) if h.id != 0 => {
            Incoming::Error { id: h.id, status: h.status, flags: h.flags, message: message() }
        }
        Some(Kind::Error) => {
            Incoming::Closing(Loss::Remote { status: h.status, flags: h.flags, message: message() })
        }
        Some(Kind::Ping) => Incoming::Ping(h.id),
        _ => Incoming::Ignore,
    }
}

/// Why a connection ended, as the requests it carried are told.
#[derive(Debug, Clone)]
#[cfg_attr(not(feature = "tokio"), allow(dead_code))] // used by the tokio flavour
pub(crate) enum Loss {
    /// The server closed the connection, or it broke (reset, broken pipe).
    Closed(Option<Arc<io::Error>>),
    /// Reading or writing failed otherwise.
    Io(Arc<io::Error>),
    /// The server sent bytes that are not microcs frames.
    Protocol(DecodeError),
    /// The server broke the shared-memory transport's rules (a ring index out of range, bytes
    /// on the socket after the handshake; PROTOCOL.md § 18.4): as untrustworthy as garbage
    /// frames, so a protocol error too.
    Corrupt(Arc<io::Error>),
    /// The server sent a connection-level `Error` frame (id 0) and closed.
    Remote { status: u16, flags: u16, message: String },
    /// The client was dropped.
    Dropped,
}

/// How much of a request's frame was handed to the kernel before its connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Written {
    None,
    Part,
    All,
}

#[cfg_attr(not(feature = "tokio"), allow(dead_code))] // used by the tokio flavour
impl Written {
    /// How much of the frame at stream offsets `start..end` the first `written` bytes cover.
    pub(crate) fn of(start: u64, end: u64, written: u64) -> Written {
        if end <= written {
            Written::All
        } else if start >= written {
            Written::None
        } else {
            Written::Part
        }
    }
}

impl Loss {
    /// The loss an I/O error means.
    pub(crate) fn from_io(e: io::Error) -> Loss {
        if is_disconnect(&e) {
            Loss::Closed(Some(Arc::new(e)))
        } else if e.kind() == io::ErrorKind::InvalidData {
            // Only the shared-memory transport reports it (sockets never do): what the peer
            // wrote into the region is not what the protocol allows.
            Loss::Corrupt(Arc::new(e))
        } else {
            Loss::Io(Arc::new(e))
        }
    }

    /// The loss an I/O error someone else keeps means.
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))] // used by the tokio flavour
    pub(crate) fn from_io_ref(e: &io::Error) -> Loss {
        Loss::from_io(io::Error::new(e.kind(), e.to_string()))
    }

    /// The error a caller whose request was `written` this far gets. A frame written only in
    /// part can never be decoded by the server, so only a whole one may have run.
    pub(crate) fn error(&self, name: &Name, written: Written) -> Error {
        let may = written == Written::All;
        let tail = if may { "; the request may have run" } else { "" };
        let e = match self {
            Loss::Closed(None) => {
                Error::new(ErrorKind::Closed, format!("service '{name}' closed the connection{tail}"))
            }
            Loss::Closed(Some(e)) => {
                Error::new(ErrorKind::Closed, format!("connection to service '{name}' broke: {e}{tail}"))
                    .with_source(e.clone())
            }
            Loss::Io(e) => Error::new(ErrorKind::Io, format!("connection to service '{name}' failed: {e}{tail}"))
                .with_source(e.clone()),
            Loss::Corrupt(e) => Error::new(
                ErrorKind::Protocol,
                format!("service '{name}' broke the shared-memory protocol ({e}){tail}"),
            )
            .with_source(e.clone()),
            Loss::Protocol(e) => Error::new(
                ErrorKind::Protocol,
                format!(
                    "service '{name}' sent bytes that are not a valid microcs frame ({e}); is it a microcs service?"
                ),
            )
            .with_source(e.clone()),
            Loss::Remote { status, flags, message } => {
                let e = Error::from_remote(name.as_str(), *status, *flags, message.clone());
                return e.set_may_have_run(may && flags & FLAG_NOT_RUN == 0);
            }
            Loss::Dropped => Error::new(ErrorKind::Closed, format!("the client of service '{name}' was dropped")),
        };
        e.set_may_have_run(may)
    }

    /// The error when the connection ends during the handshake (no request was sent).
    pub(crate) fn handshake_error(&self, name: &Name, path: &Path) -> Error {
        match self {
            Loss::Closed(None) => Error::new(
                ErrorKind::Closed,
                format!("service '{name}' closed the connection during the handshake"),
            ),
            // Reset or broken pipe: the server went away (typically it is shutting down and
            // closed connections still in its backlog). Nothing was sent.
            Loss::Closed(Some(e)) => Error::new(
                ErrorKind::Closed,
                format!("service '{name}' closed the connection during the handshake ({e})"),
            )
            .with_source(e.clone()),
            Loss::Io(e) => Error::new(ErrorKind::Io, format!("handshake with service '{name}' failed: {e}"))
                .with_source(e.clone()),
            Loss::Corrupt(e) => Error::new(
                ErrorKind::Protocol,
                format!("service '{name}' broke the protocol during the handshake ({e})"),
            )
            .with_source(e.clone()),
            Loss::Protocol(e) => {
                not_microcs(path, &format!("it sent bytes that are not a microcs frame ({e})"))
                    .with_source(e.clone())
            }
            other => other.error(name, Written::None),
        }
    }
}

/// What the caller of one request gets.
#[derive(Debug)]
pub(crate) enum Outcome {
    Reply(Vec<u8>),
    Error {
        status: u16,
        flags: u16,
        message: String,
    },
    /// The caller's deadline passed first (the server is sent a `Cancel`).
    TimedOut,
    /// The caller's interrupt check said to stop (the server is sent a `Cancel`).
    Interrupted,
    /// The connection ended first.
    Lost {
        loss: Loss,
        written: Written,
    },
}

/// A failed try, and whether it may be sent again.
#[derive(Debug)]
pub(crate) enum Attempt {
    /// Provably not run: safe to send once more, on a new connection.
    NotRun(Error),
    /// Anything else.
    Failed(Error),
}

/// Turns what a caller got into its result. `timeout`: the caller's, for messages.
///
/// Inline for the reply (the path every successful call takes); the failures are out of line.
#[inline]
pub(crate) fn settle(
    name: &Name,
    timeout: Duration,
    outcome: Outcome,
) -> std::result::Result<Vec<u8>, Attempt> {
    match outcome {
        Outcome::Reply(reply) => Ok(reply),
        failure => settle_failure(name, timeout, failure),
    }
}

#[cold]
fn settle_failure(name: &Name, timeout: Duration, outcome: Outcome) -> std::result::Result<Vec<u8>, Attempt> {
    match outcome {
        Outcome::Reply(reply) => Ok(reply),
        Outcome::Error { status: code, flags, message } => {
            let err = Error::from_remote(name.as_str(), code, flags, message);
            if flags & FLAG_NOT_RUN != 0 && code == status::BUSY {
                Err(Attempt::NotRun(err))
            } else {
                Err(Attempt::Failed(err))
            }
        }
        Outcome::TimedOut => Err(Attempt::Failed(
            Error::new(
                ErrorKind::TimedOut,
                format!("service '{name}' did not answer within {timeout:?}; the request may have run"),
            )
            .set_may_have_run(true),
        )),
        Outcome::Interrupted => Err(Attempt::Failed(
            Error::io(
                format_args!("the wait for service '{name}' was interrupted; the request may have run"),
                io::ErrorKind::Interrupted.into(),
            )
            .set_may_have_run(true),
        )),
        Outcome::Lost { loss, written } => {
            let err = loss.error(name, written);
            // Not a byte of it reached the socket, whatever ended the connection.
            if written == Written::None { Err(Attempt::NotRun(err)) } else { Err(Attempt::Failed(err)) }
        }
    }
}

/// A request that could not even be handed over within the caller's time (it did not run).
pub(crate) fn not_taken(name: &Name, timeout: Duration) -> Error {
    Error::new(
        ErrorKind::TimedOut,
        format!("service '{name}' did not take the request within {timeout:?}; it did not run"),
    )
}

/// No handshake answer within the caller's time. `holder`: the pid of the live server that
/// holds the name's lock, if one does (`registry::holder`) — then the socket is certainly a
/// microcs service's, and that server is stopped (`kill -STOP`) or too busy to answer.
pub(crate) fn handshake_timed_out(name: &Name, path: &Path, timeout: Duration, holder: Option<u32>) -> Error {
    match holder {
        Some(pid) => not_answering(name, pid, format_args!("no answer to the handshake within {timeout:?}")),
        None => Error::new(
            ErrorKind::TimedOut,
            format!(
                "service '{name}' did not answer the handshake in time; is {} a microcs service?",
                path.display()
            ),
        ),
    }
}

/// The connection was not accepted within the caller's time; `holder` as for
/// [`handshake_timed_out`].
pub(crate) fn connect_timed_out(name: &Name, timeout: Duration, holder: Option<u32>) -> Error {
    match holder {
        Some(pid) => {
            not_answering(name, pid, format_args!("it did not accept the connection within {timeout:?}"))
        }
        None => Error::new(
            ErrorKind::TimedOut,
            format!("service '{name}' did not accept the connection within {timeout:?}"),
        ),
    }
}

/// A server that owns the name (it holds the lock) but does not answer.
fn not_answering(name: &Name, pid: u32, what: std::fmt::Arguments<'_>) -> Error {
    Error::new(
        ErrorKind::TimedOut,
        format!(
            "service '{name}' (pid {pid}) holds the name but is not answering ({what}): stopped or overloaded?"
        ),
    )
}

/// A client used in process `now` although process `owner` made it (after `fork()`), where it
/// cannot start over by itself: the tokio client, whose connection tasks ran on the parent's
/// runtime. Nothing was sent.
#[cfg_attr(not(feature = "tokio"), allow(dead_code))] // used by the tokio flavour
pub(crate) fn forked(name: &Name, owner: u32, now: u32) -> Error {
    Error::new(
        ErrorKind::Closed,
        format!(
            "this client of service '{name}' was created in process {owner}, which has since forked: process \
             {now} cannot use it (the connection belongs to the parent, and its tasks ran on the parent's \
             runtime); create the client after fork(), in the process that uses it"
        ),
    )
}

/// Nobody serves the name.
pub(crate) fn no_service(name: &Name, dir: &Path, detail: &str) -> Error {
    Error::new(
        ErrorKind::NoService,
        format!("no service named '{name}' is running (looked in {}{detail})", dir.display()),
    )
}

/// Whether a failure to open a connection to one instance of a name means that instance is
/// gone (its socket refuses, or it closed the connection during the handshake): nothing was
/// sent, so the client may try another instance.
pub(crate) fn instance_gone(e: &Error) -> bool {
    matches!(e.kind(), ErrorKind::NoService | ErrorKind::Closed)
}

/// What a failed `connect()` to the service's socket means; `holder` is asked (as for
/// [`handshake_timed_out`]) only when it timed out.
pub(crate) fn connect_failed(
    name: &Name,
    dir: &Path,
    path: &Path,
    timeout: Duration,
    holder: impl FnOnce() -> Option<u32>,
    e: io::Error,
) -> Error {
    match e.kind() {
        io::ErrorKind::NotFound => no_service(name, dir, ""),
        io::ErrorKind::ConnectionRefused => no_service(name, dir, "; found only a stale socket"),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => connect_timed_out(name, timeout, holder()),
        _ => Error::io(format_args!("cannot connect to {}", path.display()), e),
    }
}

fn not_microcs(path: &Path, why: &str) -> Error {
    Error::new(ErrorKind::Protocol, format!("{} is not a microcs service: {why}", path.display()))
}
