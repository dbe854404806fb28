//! The life of one request inside a server, the same whatever carried it (a local connection
//! or NATS) and however its handler runs (inline on a connection thread, in a task, on the
//! blocking pool).
//!
//! [`begin`] routes the request, answers the built-in `$` methods, refuses an unknown method or
//! a request whose deadline has already passed (the handler never starts: "not run"), and
//! builds the [`Request`] the handler gets. The flavour runs the handler its own way and hands
//! back how that ended ([`End`]); [`Run::finish`] records the endpoint's counters and decides
//! the one answer to send — or that none is wanted. Rules decided here, once:
//!
//! - a panic is code 500 with the panic's text; a reply over the receiver's limit is 413
//!   `FLAG_SYSTEM` (the handler ran; only its reply was refused);
//! - a handler stopped by the library (deadline, cancel grace, shutdown) is reported with
//!   `FLAG_SYSTEM`, since the handler did not choose that error;
//! - when the deadline passed while the handler ran, the answer is `Error` 408 `FLAG_SYSTEM`
//!   (it may have run), whether the handler was stopped at the deadline or finished late: every
//!   request gets exactly one answer unless its caller cancelled it or left;
//! - when the caller cancelled (or hung up, or the server closed the connection past its grace
//!   period), no answer is sent: nobody reads it.

use std::ops::Deref;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::RemoteError;
use crate::handler::Streams;
use crate::proto::{FLAG_NOT_RUN, FLAG_SYSTEM, status};
use crate::request::{CancelState, Peer, Request};
use crate::service::{Endpoint, EndpointId, Route, Service};

/// A request a transport has admitted: what [`begin`] needs.
pub(crate) struct Incoming {
    /// The caller's request id.
    pub id: u64,
    /// The caller, as the transport knows it.
    pub peer: Peer,
    pub payload: Vec<u8>,
    /// When the caller stops waiting.
    pub deadline: Option<Instant>,
    /// Set by the transport when the caller cancels or leaves.
    pub cancel: Arc<CancelState>,
    /// The caller takes a stream (docs/PROTOCOL.md § 17).
    pub stream: bool,
    /// What carries the caller's connection (`"unix"`, `"shm"`; `None` over NATS), for the
    /// built-ins' metadata.
    pub transport: Option<&'static str>,
    /// When the transport took the request: the handler's start, for the deadline check and
    /// the run's time. Reading the clock costs tens of nanoseconds on a VM, a tenth of a
    /// pipelined request's CPU, so a transport reads it as seldom as is exact: the tokio server
    /// once per wait, shared by the frames read together (the next frame after a handler that
    /// answered at once takes the clock read of that handler's finish: queueing its answer
    /// never waits), the blocking server once per request (writing an answer may block).
    pub arrived: Instant,
}

/// What to send back for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Answer {
    /// The handler's (or a built-in's) reply.
    Reply(Vec<u8>),
    /// An error, with its status code, protocol flags and message.
    Error { code: u16, flags: u16, message: String },
}

impl Answer {
    fn error(code: u16, flags: u16, message: impl Into<String>) -> Answer {
        Answer::Error { code, flags, message: message.into() }
    }
}

/// How a handler's run ended, as its flavour saw it.
#[cfg_attr(not(feature = "tokio"), allow(dead_code))] // used by the tokio flavour
pub(crate) enum End {
    /// It returned.
    Done(Result<Vec<u8>, RemoteError>),
    /// It panicked; the panic's text.
    Panicked(String),
    /// Still running at the deadline: the flavour stopped it.
    Deadline,
    /// Its caller cancelled and it had not finished this long after: the flavour stopped it.
    Abandoned(Duration),
    /// Still running when the server's shutdown grace period ended: stopped.
    Killed,
    /// A stream the library ended with this answer (an item over the caller's limit).
    Refused(Answer),
}

/// The largest reply the receiver takes, and how to name that limit in a message.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ReplyLimit<'a> {
    pub max: usize,
    /// Completes "over ... of N bytes", e.g. "the client's limit".
    pub what: &'a str,
}

/// Where [`begin`] sent a request.
pub(crate) enum Begin<S: Deref<Target = Service<H>>, H> {
    /// Answered without running a handler (a built-in, or a refusal).
    Answer(Answer),
    /// Run the endpoint's handler with this request, then call [`Run::finish`].
    Run(Run<S, H>, Request),
}

/// A request whose handler runs now.
///
/// `S` is how the run holds its service: a reference where the handler runs inside the
/// caller's scope (a blocking server's thread, NATS), an `Arc` where the run may move into a
/// task of its own (the tokio server, when the handler does not answer at once).
pub(crate) struct Run<S: Deref<Target = Service<H>>, H> {
    service: S,
    endpoint: EndpointId,
    deadline: Option<Instant>,
    cancel: Arc<CancelState>,
    started: Instant,
    stream: bool,
}

/// Routes a request by its method name (empty: the default handler) and starts it.
pub(crate) fn begin<S, H>(service: S, method: &[u8], call: Incoming) -> Begin<S, H>
where
    S: Deref<Target = Service<H>>,
    H: Streams,
{
    match service.route(method) {
        Route::Endpoint(ep) => begin_at(service, ep, call),
        Route::Builtin(b) => Begin::Answer(Answer::Reply(service.builtin(b, call.transport))),
        Route::Refuse(e) => Begin::Answer(Answer::error(e.code(), FLAG_SYSTEM | FLAG_NOT_RUN, e.message())),
    }
}

/// Starts a request already routed to `endpoint` (NATS routes by subscription).
pub(crate) fn begin_at<S, H>(service: S, id: EndpointId, call: Incoming) -> Begin<S, H>
where
    S: Deref<Target = Service<H>>,
    H: Streams,
{
    let endpoint = service.endpoint(id);
    if endpoint.handler.streams() && !call.stream {
        let msg = format!("method '{}' answers with a stream; call it with stream()", endpoint.name);
        return Begin::Answer(Answer::error(status::BAD_REQUEST, FLAG_SYSTEM | FLAG_NOT_RUN, msg));
    }
    let now = call.arrived;
    if call.deadline.is_some_and(|d| now >= d) {
        let msg = "the deadline passed before the handler started";
        return Begin::Answer(Answer::error(status::TIMED_OUT, FLAG_SYSTEM | FLAG_NOT_RUN, msg));
    }
    let req = Request {
        id: call.id,
        method: (id != EndpointId::DEFAULT).then(|| endpoint.name.clone()),
        payload: call.payload,
        peer: call.peer,
        deadline: call.deadline,
        cancel: call.cancel.clone(),
    };
    service.activity.started.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let run = Run {
        service,
        endpoint: id,
        deadline: call.deadline,
        cancel: call.cancel,
        started: now,
        stream: call.stream,
    };
    Begin::Run(run, req)
}

/// However a run ends (finished, or dropped with its task), it counts as ended for the idle
/// timeout.
impl<S: Deref<Target = Service<H>>, H> Drop for Run<S, H> {
    fn drop(&mut self) {
        self.service.activity.ended.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

#[cfg_attr(not(feature = "tokio"), allow(dead_code))] // used by the tokio flavour
impl<S: Deref<Target = Service<H>>, H> Run<S, H> {
    fn endpoint(&self) -> &Endpoint<H> {
        self.service.endpoint(self.endpoint)
    }

    /// The handler to run.
    pub(crate) fn handler(&self) -> &H {
        &self.endpoint().handler
    }

    /// When the caller stops waiting (the flavour may stop the handler then).
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Set when the caller cancels or leaves.
    pub(crate) fn cancel(&self) -> &Arc<CancelState> {
        &self.cancel
    }

    /// The caller takes a stream: items go out as the handler makes them, and
    /// [`finish`](Self::finish)'s reply (empty) is the end.
    pub(crate) fn stream(&self) -> bool {
        self.stream
    }

    /// Records the run in the endpoint's counters and decides what to send: `None` when
    /// nobody wants an answer (see the module docs for the rules).
    pub(crate) fn finish(self, end: End, limit: ReplyLimit<'_>) -> Option<Answer> {
        self.finish_at(end, limit, Instant::now())
    }

    /// [`finish`](Self::finish) at `now`, a clock read the caller makes just before (and may
    /// reuse as the arrival of a request read after this one without waiting).
    pub(crate) fn finish_at(self, end: End, limit: ReplyLimit<'_>, now: Instant) -> Option<Answer> {
        // One clock read for the run's time and the deadline.
        let elapsed = now.saturating_duration_since(self.started);
        let name = &self.service.name;

        let killed = matches!(end, End::Killed);
        // Finished (or failed) on its own, but after the caller's deadline.
        let late = !matches!(end, End::Deadline) && self.deadline.is_some_and(|d| now >= d);
        // `system`: the library ended the request or refused its reply, not the handler.
        let (result, system) = match end {
            End::Done(Ok(reply)) if reply.len() > limit.max => (
                Err(RemoteError::new(
                    status::TOO_LARGE,
                    format!("reply of {} bytes is over {} of {} bytes", reply.len(), limit.what, limit.max),
                )),
                true,
            ),
            End::Done(r) => (r, false),
            End::Panicked(msg) => {
                tracing::error!(service = %name, endpoint = %self.endpoint().name, "{msg}");
                (Err(RemoteError::new(status::HANDLER_FAILED, msg)), false)
            }
            End::Deadline => {
                tracing::debug!(service = %name, endpoint = %self.endpoint().name, "deadline passed; handler stopped");
                let msg = "the deadline passed while the handler ran; it was stopped";
                (Err(RemoteError::new(status::TIMED_OUT, msg)), true)
            }
            End::Abandoned(grace) => {
                let msg = format!(
                    "the caller cancelled and the handler did not stop within {grace:?}; it was stopped"
                );
                (Err(RemoteError::new(status::CANCELLED, msg)), true)
            }
            End::Killed => {
                let msg = format!("service '{name}' shut down while the handler ran; it was stopped");
                (Err(RemoteError::new(status::BUSY, msg)), true)
            }
            End::Refused(answer) => {
                let message = match &answer {
                    Answer::Error { message, .. } => message.clone(),
                    Answer::Reply(_) => String::new(),
                };
                self.endpoint().counters.record(elapsed, Some(&RemoteError::new(status::TOO_LARGE, message)));
                return (!self.cancel.is_set()).then_some(answer);
            }
        };
        self.endpoint().counters.record(elapsed, result.as_ref().err());
        // Nobody reads an answer to a cancelled request, nor to one whose connection is closing.
        if self.cancel.is_set() || killed {
            return None;
        }
        if late {
            let msg = "the deadline passed while the handler ran; its answer was discarded";
            return Some(Answer::error(status::TIMED_OUT, FLAG_SYSTEM, msg));
        }
        Some(match result {
            Ok(reply) => Answer::Reply(reply),
            Err(e) => Answer::Error {
                code: e.code(),
                flags: if system { FLAG_SYSTEM } else { 0 },
                message: e.message().to_owned(),
            },
        })
    }
}
