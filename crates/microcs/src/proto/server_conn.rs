//! The rules of one server connection, without I/O: what each frame a client sends means, which
//! requests are admitted, and what goes back.
//!
//! A flavour (blocking or tokio) decodes frames and hands each to [`ServerConn`]; it gets back
//! an [`Action`]: run a request, send a frame, or nothing. When a handler is done, the
//! flavour asks [`ServerConn::answer`] for the frame to send. The state is the client's reply
//! limit (from its `Hello`) and the table of requests in flight (so that a `Cancel`, or the
//! peer hanging up, reaches their handlers, and an id is never in flight twice). It is `Sync`:
//! the blocking server's threads and the tokio server's tasks share one per connection.
//!
//! Rules decided here (docs/PROTOCOL.md, "Connection rules"):
//! - the first frame must be a `Hello`; anything else is refused with 400 and the connection
//!   closed; the `HelloAck` announces our limits;
//! - a `Request` with flags, with id 0, with an id already in flight, or arriving while the
//!   server shuts down is refused without running (`FLAG_SYSTEM | FLAG_NOT_RUN`; 503 for
//!   shutdown, so the client may send it again elsewhere, 400 otherwise);
//! - `Cancel` marks the request cancelled (its handler sees it; no answer is sent for it);
//!   `Ping` is answered by `Pong` with the same id and payload; `Pong` is ignored; any other
//!   kind, known or not, gets a 400 refusal for its id and the connection stays;
//! - nothing goes out over the client's limit: an error message is cut short (on a character
//!   boundary), any other answer becomes 413 `FLAG_SYSTEM`;
//! - a frame that cannot be decoded is answered with a connection error (id 0) and the
//!   connection closes.

use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::{
    Credit, DecodeError, FEATURE_SHM, FEATURE_STREAMS, FLAG_NOT_RUN, FLAG_STREAM, FLAG_SYSTEM, Frame,
    HANDSHAKE_PAYLOAD, Header, Hello, HelloAck, Kind, deadline_at, status,
};
use crate::dispatch::Answer;
use crate::io::IdHasher;
use crate::request::CancelState;

/// A frame to send: header and payload (no method: a server never names one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Out {
    pub header: Header,
    pub payload: Vec<u8>,
}

impl Out {
    /// An error for request `id` (0: the connection).
    pub(crate) fn error(id: u64, code: u16, flags: u16, message: impl Into<String>) -> Out {
        Out { header: Header::error(id, code, flags), payload: message.into().into_bytes() }
    }

    /// A refusal: the library's error, and the request did not run.
    fn refusal(id: u64, code: u16, message: impl Into<String>) -> Out {
        Out::error(id, code, FLAG_SYSTEM | FLAG_NOT_RUN, message)
    }
}

/// A `Hello` accepted: what the client offered, and the `HelloAck` to build from it.
#[derive(Debug)]
pub(crate) struct Handshake {
    ack: HelloAck,
    offered: u32,
}

impl Handshake {
    /// The client asked for shared memory (PROTOCOL.md § 18.1).
    pub(crate) fn wants_shm(&self) -> bool {
        self.offered & FEATURE_SHM != 0
    }

    /// The `HelloAck`: with the shared-memory offer when the server created rings of
    /// `ring_capacity` bytes for a client that asked, else a plain one.
    pub(crate) fn answer(mut self, ring_capacity: Option<u32>) -> Out {
        if let Some(cap) = ring_capacity.filter(|_| self.wants_shm()) {
            self.ack.features |= FEATURE_SHM;
            self.ack.ring_capacity = cap;
        }
        Out { header: Header::new(Kind::HelloAck, 0), payload: self.ack.to_bytes() }
    }
}

/// What a frame asks the flavour to do.
pub(crate) enum Action {
    /// A request that passed the checks that need no capacity; admit it with
    /// [`ServerConn::admit`] once the flavour can run it.
    Request,
    /// Send this frame (a `Pong`, or a refusal).
    Send(Out),
    /// Nothing to send.
    None,
}

/// A request registered in flight.
pub(crate) struct Admitted {
    pub id: u64,
    /// The caller takes a stream of items (`FLAG_STREAM`).
    pub stream: bool,
    /// When the caller stops waiting, counted from the request's arrival.
    pub deadline: Option<Instant>,
    /// Set when the caller cancels or hangs up.
    pub cancel: Arc<CancelState>,
}

/// The connection-level state and rules; see the module docs.
pub(crate) struct ServerConn {
    /// Our request payload limit (announced in `HelloAck`).
    max_request: u32,
    /// Our per-connection in-flight cap (announced in `HelloAck`).
    max_in_flight: u32,
    /// The client's reply payload limit, from its `Hello` ([`HANDSHAKE_PAYLOAD`] until then).
    max_reply: AtomicU32,
    /// Requests in flight, by id.
    inflight: Mutex<HashMap<u64, Arc<CancelState>, BuildHasherDefault<IdHasher>>>,
}

impl ServerConn {
    pub(crate) fn new(max_request: u32, max_in_flight: usize) -> ServerConn {
        ServerConn {
            max_request,
            max_in_flight: u32::try_from(max_in_flight).unwrap_or(u32::MAX),
            max_reply: AtomicU32::new(HANDSHAKE_PAYLOAD),
            inflight: Mutex::new(HashMap::default()),
        }
    }

    /// The payload limit to decode the client's frames with.
    pub(crate) fn max_request(&self) -> u32 {
        self.max_request
    }

    /// The largest payload the client accepts.
    pub(crate) fn max_reply(&self) -> u32 {
        self.max_reply.load(Ordering::Relaxed)
    }

    fn inflight(&self) -> MutexGuard<'_, HashMap<u64, Arc<CancelState>, BuildHasherDefault<IdHasher>>> {
        self.inflight.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The first frame of the connection. `Ok`: the handshake to answer (see [`Handshake`]),
    /// and from now on answers respect the client's limit. `Err`: the refusal to send before
    /// closing.
    pub(crate) fn on_hello(&self, frame: &Frame<'_>, pid: u32, name: &str) -> Result<Handshake, Out> {
        let hello = (frame.header.kind() == Some(Kind::Hello)).then(|| Hello::parse(frame.payload)).flatten();
        let Some(hello) = hello else {
            return Err(Out::refusal(0, status::BAD_REQUEST, "expected a Hello frame first"));
        };
        let ack = HelloAck {
            max_payload: self.max_request,
            max_in_flight: self.max_in_flight,
            pid,
            name: name.to_owned(),
            features: FEATURE_STREAMS,
            ring_capacity: 0,
        };
        self.max_reply.store(hello.max_payload, Ordering::Relaxed);
        Ok(Handshake { ack, offered: hello.features })
    }

    /// What a frame after the handshake asks for. `stopping`: the server is shutting down.
    pub(crate) fn on_frame(&self, frame: &Frame<'_>, stopping: bool, service: &str) -> Action {
        let h = &frame.header;
        match h.kind() {
            Some(Kind::Request) => {
                if h.flags & !FLAG_STREAM != 0 {
                    let msg = format!("request has unknown flags {:#06x}", h.flags);
                    return Action::Send(Out::refusal(h.id, status::BAD_REQUEST, msg));
                }
                if h.id == 0 {
                    return Action::Send(Out::refusal(h.id, status::BAD_REQUEST, "request id 0 is reserved"));
                }
                if stopping {
                    return Action::Send(shutting_down(h.id, service));
                }
                Action::Request
            }
            Some(Kind::Cancel) => {
                if let Some(c) = self.inflight().get(&h.id) {
                    c.cancel();
                }
                Action::None
            }
            // Room for a stream; for an id that is not one (any more), or too short: ignored.
            Some(Kind::Credit) => {
                if let (Some(credit), Some(c)) = (Credit::parse(frame.payload), self.inflight().get(&h.id)) {
                    c.grant(credit.items, credit.bytes);
                }
                Action::None
            }
            Some(Kind::Ping) => {
                Action::Send(Out { header: Header::new(Kind::Pong, h.id), payload: frame.payload.to_vec() })
            }
            Some(Kind::Pong) => Action::None,
            Some(k) => {
                let msg = format!("a client may not send {k:?} frames here");
                Action::Send(Out::refusal(h.id, status::BAD_REQUEST, msg))
            }
            None => Action::Send(Out::refusal(
                h.id,
                status::BAD_REQUEST,
                format!("unknown frame kind {}", h.kind),
            )),
        }
    }

    /// Registers a request (of a frame [`on_frame`](Self::on_frame) said is one) in flight, its
    /// deadline counted from `arrived`. `Err`: its id is already in flight; send the refusal.
    pub(crate) fn admit(&self, h: &Header, arrived: Instant) -> Result<Admitted, Out> {
        let a = self.admit_unregistered(h, arrived)?;
        self.register(a.id, &a.cancel);
        Ok(a)
    }

    /// [`admit`](Self::admit) without registering it yet: for a flavour that runs the handler
    /// before it reads another frame of the connection (the tokio server's first poll), and
    /// until then nothing can look for the request — no `Cancel` or `Credit` frame, no
    /// duplicate id, no end of the connection. It calls [`register`](Self::register) if the
    /// run goes on after that; one that ended there is never in the table (an insert and a
    /// removal fewer per request). [`answer`](Self::answer) takes either.
    pub(crate) fn admit_unregistered(&self, h: &Header, arrived: Instant) -> Result<Admitted, Out> {
        if self.inflight().contains_key(&h.id) {
            let msg = format!("request id {} is already in flight", h.id);
            return Err(Out::refusal(h.id, status::BAD_REQUEST, msg));
        }
        let cancel = Arc::new(CancelState::default());
        let stream = h.flags & FLAG_STREAM != 0;
        Ok(Admitted { id: h.id, stream, deadline: deadline_at(arrived, h.deadline_ms), cancel })
    }

    /// Puts an admitted request in the in-flight table (see
    /// [`admit_unregistered`](Self::admit_unregistered)).
    pub(crate) fn register(&self, id: u64, cancel: &Arc<CancelState>) {
        self.inflight().insert(id, cancel.clone());
    }

    /// One item of the stream `id`, fitted to the client's limit: `Err` is the error that ends
    /// the stream instead (an item over the limit: 413 `FLAG_SYSTEM`).
    pub(crate) fn item(&self, id: u64, payload: Vec<u8>) -> Result<Out, Answer> {
        let max = self.max_reply() as usize;
        if payload.len() > max {
            let msg =
                format!("stream item of {} bytes is over the client's limit of {max} bytes", payload.len());
            return Err(Answer::Error { code: status::TOO_LARGE, flags: FLAG_SYSTEM, message: msg });
        }
        Ok(Out { header: Header::new(Kind::Item, id), payload })
    }

    /// A request is done: forgets it and gives the frame to send for `answer` (`None`: no
    /// answer is wanted), fitted to the client's limit. A stream's end is an `answer` too (an
    /// empty `Reply`, or the `Error` that ended it).
    pub(crate) fn answer(&self, id: u64, answer: Option<Answer>) -> Option<Out> {
        self.inflight().remove(&id);
        self.answer_unregistered(id, answer)
    }

    /// [`answer`](Self::answer) for a request that was never registered (see
    /// [`admit_unregistered`](Self::admit_unregistered)): the table is not touched.
    pub(crate) fn answer_unregistered(&self, id: u64, answer: Option<Answer>) -> Option<Out> {
        let out = match answer? {
            Answer::Reply(payload) => Out { header: Header::new(Kind::Reply, id), payload },
            Answer::Error { code, flags, message } => Out::error(id, code, flags, message),
        };
        Some(self.fit(out))
    }

    /// The frame as it may go out: nothing over the client's limit (but the `HelloAck`, which
    /// every client takes). An error's message is cut short (still valid UTF-8); any other
    /// answer becomes a 413 `FLAG_SYSTEM` error.
    pub(crate) fn fit(&self, mut out: Out) -> Out {
        let max = self.max_reply() as usize;
        // The handshake answer always fits: a client decodes with at least HANDSHAKE_PAYLOAD.
        if out.payload.len() <= max || out.header.kind() == Some(Kind::HelloAck) {
            return out;
        }
        if out.header.kind() == Some(Kind::Error) {
            let mut cut = max;
            while cut > 0 && out.payload.get(cut).is_some_and(|b| b & 0xc0 == 0x80) {
                cut -= 1;
            }
            out.payload.truncate(cut);
            return out;
        }
        let msg = format!("answer of {} bytes is over the client's limit of {max} bytes", out.payload.len());
        Out::error(out.header.id, status::TOO_LARGE, FLAG_SYSTEM, msg)
    }

    /// Tells every request in flight that nobody will read its answer (the peer hung up, a
    /// write failed, the grace period is over).
    pub(crate) fn cancel_all(&self) {
        for c in self.inflight().values() {
            c.cancel();
        }
    }
}

/// The refusal of a request that arrives while the server shuts down: safe to send again.
pub(crate) fn shutting_down(id: u64, service: &str) -> Out {
    Out::refusal(id, status::BUSY, format!("service '{service}' is shutting down"))
}

/// The connection error sent before closing on bytes that are not a frame.
pub(crate) fn broken(e: &DecodeError) -> Out {
    Out::error(0, e.status(), FLAG_SYSTEM, e.to_string())
}

/// The connection error sent before closing on a frame that did not arrive in time.
pub(crate) fn frame_timed_out(limit: Duration) -> Out {
    Out::error(0, status::TIMED_OUT, FLAG_SYSTEM, format!("frame not completed within {limit:?}"))
}

/// The refusal of a peer of another user than the server's (and not allowed in).
pub(crate) fn other_user(service: &str, uid: u32, own_uid: u32) -> Out {
    let msg = format!("user {uid} may not use service '{service}' (it serves uid {own_uid} only)");
    refuse_connection(status::PERMISSION_DENIED, msg)
}

/// The refusal of a connection past the server's connection limit: try again later.
pub(crate) fn at_connection_limit(service: &str, max: usize) -> Out {
    let msg = format!("service '{service}' is at its limit of {max} connections; try again later");
    refuse_connection(status::BUSY, msg)
}

/// A refusal of the whole connection, sent right after accepting it (another user, too many
/// connections, out of threads).
pub(crate) fn refuse_connection(code: u16, message: impl Into<String>) -> Out {
    Out::refusal(0, code, message)
}
