//! The life of one request in a blocking server: its handler run on the connection thread
//! that read it, a stream's items sent as the caller makes room, the answer.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::conn::{Conn, Shared, lock, start_follower};
use crate::dispatch::{self, Begin, End, Incoming, ReplyLimit};
use crate::handler::SyncHandler;
use crate::request::{CancelState, Room, panic_message};

/// A request taken off the wire, not yet run.
pub(super) struct Job {
    pub(super) id: u64,
    pub(super) method: Vec<u8>,
    pub(super) payload: Vec<u8>,
    pub(super) deadline: Option<Instant>,
    pub(super) cancel: Arc<CancelState>,
    pub(super) stream: bool,
    /// When it was taken off the wire (see `dispatch::Incoming::arrived`).
    pub(super) arrived: Instant,
}

/// Runs `job`'s handler on this connection thread and sends its answer. `batch`: more requests
/// are buffered, so the answer may wait for the next flush (see `Conn::send`).
pub(super) fn run(shared: &Arc<Shared>, conn: &Arc<Conn>, job: Job, batch: bool) {
    let id = job.id;
    let call = Incoming {
        id,
        peer: conn.peer,
        payload: job.payload,
        deadline: job.deadline,
        cancel: job.cancel,
        stream: job.stream,
        transport: Some(conn.stream.transport_name()),
        arrived: job.arrived,
    };
    let (run, req) = match dispatch::begin(&*shared.service, &job.method, call) {
        Begin::Run(run, req) => (run, req),
        Begin::Answer(a) => return conn.finish(shared, id, Some(a), batch),
    };
    conn.running.fetch_add(1, Ordering::SeqCst);
    if shared.sentinel_parked.load(Ordering::SeqCst) {
        if let Some(t) = lock(&shared.sentinel).as_ref() {
            t.unpark();
        }
    }
    let end = match &**run.handler() {
        SyncHandler::Unary(handler) => {
            let end = match catch_unwind(AssertUnwindSafe(|| handler(req))) {
                Ok(r) => End::Done(r),
                Err(panic) => End::Panicked(panic_message(&*panic)),
            };
            match end {
                // Asked as a stream: its one answer is the stream's one item.
                End::Done(Ok(reply)) if run.stream() => {
                    stream_items(shared, conn, id, run.deadline(), run.cancel(), std::iter::once(Ok(reply)))
                }
                end => end,
            }
        }
        SyncHandler::Stream(handler) => match catch_unwind(AssertUnwindSafe(|| handler(req))) {
            Ok(Ok(items)) => stream_items(shared, conn, id, run.deadline(), run.cancel(), items),
            Ok(Err(e)) => End::Done(Err(e)),
            Err(panic) => End::Panicked(panic_message(&*panic)),
        },
    };
    conn.running.fetch_sub(1, Ordering::SeqCst);
    let limit = ReplyLimit { max: conn.core.max_reply() as usize, what: "the client's limit" };
    let answer = run.finish(end, limit);
    conn.finish(shared, id, answer, batch);
}

/// Sends a stream's items as the caller makes room for them (docs/PROTOCOL.md § 17), on this
/// connection thread; how the stream ended, for [`dispatch::Run::finish`] (whose empty reply is
/// the end frame). The iterator is dropped, not run further, once the caller cancels or leaves
/// or the stream's deadline passes.
fn stream_items(
    shared: &Arc<Shared>,
    conn: &Arc<Conn>,
    id: u64,
    deadline: Option<Instant>,
    cancel: &CancelState,
    items: impl Iterator<Item = std::result::Result<Vec<u8>, crate::error::RemoteError>>,
) -> End {
    let mut items = items;
    loop {
        let next = match catch_unwind(AssertUnwindSafe(|| items.next())) {
            Ok(Some(Ok(item))) => item,
            Ok(Some(Err(e))) => return End::Done(Err(e)),
            Ok(None) => return End::Done(Ok(Vec::new())),
            Err(panic) => return End::Panicked(panic_message(&*panic)),
        };
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return End::Deadline;
        }
        // The caller's `Credit` frames arrive on this connection, which nobody reads while this
        // thread runs the stream: make sure someone does before waiting for them.
        let mut room = cancel.wait_room(Some(Instant::now()));
        if room == Room::TimedOut {
            start_follower(shared, conn.clone());
            room = cancel.wait_room(deadline);
        }
        match room {
            Room::Ready => {}
            // Nobody reads it: `finish` sends nothing for a cancelled request.
            Room::Cancelled => return End::Done(Ok(Vec::new())),
            Room::TimedOut => return End::Deadline,
        }
        let len = next.len();
        match conn.core.item(id, next) {
            Ok(out) => {
                conn.send(shared, out, false);
                cancel.take_room(len);
            }
            Err(answer) => return End::Refused(answer),
        }
        if conn.closed.load(Ordering::SeqCst) {
            return End::Done(Ok(Vec::new()));
        }
    }
}
