//! The life of one request in the async server: admitted, its handler run (to its end at
//! once when it answers without waiting, else in a task of its own), its answer sent.

use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use ::tokio::sync::OwnedSemaphorePermit;
use ::tokio::time::{Instant, sleep, sleep_until};

use super::conn::{Conn, Shared};
use crate::dispatch::{self, Begin, End, Incoming, ReplyLimit, Run};
use crate::error::RemoteError;
use crate::handler::{AsyncHandler, HandlerFuture, Items};
use crate::proto::Header;
use crate::request::{CancelState, Request, Room, panic_message};
use crate::service::Service;

/// A request's run, holding the server's endpoint table so that it can move into a task.
type AsyncRun = Run<Arc<Service<Arc<AsyncHandler>>>, Arc<AsyncHandler>>;

/// Registers a request in flight and runs it: to its end here when the handler answers at once,
/// else in a task of its own.
///
/// `arrived`: when it was read (see `dispatch::Incoming::arrived`). `held`: a permit of the
/// connection's, if the caller had to wait for one; else one is taken only for a run that goes
/// on in a task (the caller saw one free, and only the connection's task takes them), so that a
/// request answered here touches no semaphore. Returns the clock read that ended the request if
/// it ended here (the arrival of the next one read without a wait), `None` if it goes on in a
/// task (the handler ran for an unknown time: the clock must be read again).
pub(super) fn admit(
    shared: &Arc<Shared>,
    conn: &Arc<Conn>,
    h: &Header,
    method: &[u8],
    payload: Vec<u8>,
    held: Option<OwnedSemaphorePermit>,
    arrived: std::time::Instant,
) -> Option<std::time::Instant> {
    // In the in-flight table only if the run goes on after this call (see
    // `ServerConn::admit_unregistered`): nothing reads the connection meanwhile.
    let admitted = match conn.core.admit_unregistered(h, arrived) {
        Ok(a) => a,
        Err(refusal) => {
            conn.send(refusal);
            return Some(arrived);
        }
    };
    let id = h.id;
    let call = Incoming {
        id,
        peer: conn.peer,
        payload,
        deadline: admitted.deadline,
        cancel: admitted.cancel,
        stream: admitted.stream,
        transport: Some(conn.stream.link().transport_name()),
        arrived,
    };
    // Routed from the frame's bytes: the method name is never copied.
    let (run, req) = match dispatch::begin(shared.service.clone(), method, call) {
        Begin::Run(run, req) => (run, req),
        Begin::Answer(a) => {
            conn.finish_unregistered(id, Some(a));
            return Some(arrived);
        }
    };
    let take_permit = move || held.or_else(|| conn.permits.clone().try_acquire_owned().ok());
    let handler = match &**run.handler() {
        AsyncHandler::Unary(handler) if !run.stream() => handler,
        // Streams (and a unary handler asked as one) as a future of their own, polled once
        // here like a unary handler's (see below).
        _ => {
            conn.core.register(id, run.cancel());
            let mut fut = Box::pin(run_stream(shared.clone(), conn.clone(), run, req, take_permit()));
            if fut.as_mut().poll(&mut Context::from_waker(Waker::noop())).is_pending() {
                ::tokio::spawn(fut);
            }
            return None;
        }
    };
    // Most handlers answer without waiting for anything: their future is polled once here, on
    // the connection's task, and a task is started only for one still pending. That saves, per
    // request, a task (its allocation, a trip through the scheduler) and the boxed state machine
    // that would carry the request into it. The task polls the future again at once, so
    // whatever it waits for is registered with the task's waker; the no-op waker of this first
    // poll is never needed.
    let mut fut = match catch_unwind(AssertUnwindSafe(|| handler(req))) {
        Ok(fut) => CatchUnwind(fut),
        Err(panic) => return Some(finish_here(conn, id, run, End::Panicked(panic_message(&*panic)))),
    };
    match Pin::new(&mut fut).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(r) => Some(finish_here(conn, id, run, handler_end(r))),
        Poll::Pending => {
            conn.core.register(id, run.cancel());
            let permit = take_permit();
            let (shared, conn) = (shared.clone(), conn.clone());
            ::tokio::spawn(async move {
                let end = until_end(&shared, &run, fut).await;
                finish_run(&conn, id, run, end);
                drop(permit);
            });
            None
        }
    }
}

/// How a handler's future ended.
fn handler_end(r: std::thread::Result<std::result::Result<Vec<u8>, RemoteError>>) -> End {
    match r {
        Ok(r) => End::Done(r),
        Err(panic) => End::Panicked(panic_message(&*panic)),
    }
}

/// Runs a handler's future to its end: its answer, or the library stopping it (deadline, the
/// caller's cancel and the grace after it, the server killed).
async fn until_end(shared: &Shared, run: &AsyncRun, fut: CatchUnwind) -> End {
    let deadline = run.deadline().map(Instant::from_std);
    let cancel = run.cancel();
    let grace = shared.config.grace;
    // The handler first, and the other branches' futures are made when first polled: most
    // handlers answer at once, and then no timer, notifier or watch is touched.
    ::tokio::select! {
        biased;
        r = fut => handler_end(r),
        () = async { sleep_until(deadline.unwrap_or_else(Instant::now)).await }, if deadline.is_some() => {
            End::Deadline
        }
        () = async { cancel.wait().await; sleep(grace).await } => End::Abandoned(grace),
        _ = async { shared.kill.subscribe().wait_for(|k| *k).await.is_ok() } => End::Killed,
    }
}

/// Records how a request that went on in a task ended and sends its answer, if one is wanted.
fn finish_run(conn: &Conn, id: u64, run: AsyncRun, end: End) {
    let limit = ReplyLimit { max: conn.core.max_reply() as usize, what: "the client's limit" };
    conn.finish(id, run.finish(end, limit));
}

/// [`finish_run`] for a request that ended in `admit`, never registered in flight; returns the
/// clock read it made.
fn finish_here(conn: &Conn, id: u64, run: AsyncRun, end: End) -> std::time::Instant {
    let limit = ReplyLimit { max: conn.core.max_reply() as usize, what: "the client's limit" };
    let now = std::time::Instant::now();
    conn.finish_unregistered(id, run.finish_at(end, limit, now));
    now
}

/// The task of a streaming request (or of a unary handler asked as a stream): runs its
/// handler, sends its items and its end.
async fn run_stream(
    shared: Arc<Shared>,
    conn: Arc<Conn>,
    run: AsyncRun,
    req: Request,
    _permit: Option<OwnedSemaphorePermit>,
) {
    let id = req.id();
    let cancel = run.cancel().clone();
    let deadline = run.deadline().map(Instant::from_std);
    // Where a stream's sink leaves the answer that ends it early (only streams have one).
    let mut overflow = None;
    let started = match &**run.handler() {
        AsyncHandler::Unary(handler) => catch_unwind(AssertUnwindSafe(|| handler(req))),
        AsyncHandler::Stream(handler) => {
            let c = conn.clone();
            let sink = Arc::new(move |item: Vec<u8>| {
                c.core.item(id, item).map(|out| {
                    c.send(out);
                })
            });
            let over = overflow.insert(Arc::new(Mutex::new(None))).clone();
            let items = Items { cancel: cancel.clone(), sink, overflow: over };
            catch_unwind(AssertUnwindSafe(|| handler(req, items)))
        }
    };
    // Asked as a stream, a unary handler's one answer is the stream's one item.
    let one_item = !matches!(**run.handler(), AsyncHandler::Stream(_));
    let end = match started {
        Err(panic) => End::Panicked(panic_message(&*panic)),
        Ok(fut) => until_end(&shared, &run, CatchUnwind(fut)).await,
    };
    let overflowed = overflow.and_then(|o| o.lock().unwrap_or_else(|p| p.into_inner()).take());
    let end = match (end, overflowed) {
        (_, Some(answer)) => End::Refused(answer),
        (End::Done(Ok(reply)), None) if one_item => send_one_item(&conn, id, &cancel, deadline, reply).await,
        (end, None) => end,
    };
    finish_run(&conn, id, run, end);
}

/// A unary handler's reply as the one item of a stream, once the caller has room for it.
async fn send_one_item(
    conn: &Conn,
    id: u64,
    cancel: &CancelState,
    deadline: Option<Instant>,
    reply: Vec<u8>,
) -> End {
    let room = std::future::poll_fn(|cx| cancel.poll_room(cx));
    let room = match deadline {
        Some(d) => ::tokio::time::timeout_at(d, room).await.unwrap_or(Room::TimedOut),
        None => room.await,
    };
    match room {
        Room::Ready => {}
        Room::Cancelled => return End::Done(Ok(Vec::new())),
        Room::TimedOut => return End::Deadline,
    }
    let len = reply.len();
    match conn.core.item(id, reply) {
        Ok(out) => {
            conn.send(out);
            cancel.take_room(len);
            End::Done(Ok(Vec::new()))
        }
        Err(answer) => End::Refused(answer),
    }
}

/// Turns a panic inside the handler's future into a value, as `catch_unwind` does for a call.
pub(super) struct CatchUnwind(HandlerFuture);

impl Future for CatchUnwind {
    type Output = std::thread::Result<std::result::Result<Vec<u8>, RemoteError>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let fut = &mut self.0;
        match catch_unwind(AssertUnwindSafe(|| fut.as_mut().poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(r)) => Poll::Ready(Ok(r)),
            Err(panic) => Poll::Ready(Err(panic)),
        }
    }
}
