//! Async handlers (`async def`, async generators) of a `microcs.Server`: served by the library's
//! tokio server, run as tasks on the event loop the server owns.
//!
//! No thread waits for a coroutine. A request's tokio task asks the loop to run one step — the
//! coroutine, or an async generator's next `__anext__` — by pushing a [`Job`] onto the loop's
//! [`Bridge`] (no GIL on the tokio side), and awaits a oneshot channel. On the loop thread, which
//! holds the GIL anyway, [`RunJobs`] starts each step as an `asyncio.Task`; the task's done
//! callback ([`Finish`]) turns its result into reply bytes (or the error to answer) and sends
//! it. A thousand requests sleeping in `asyncio.sleep` are a thousand tasks on one loop, not a
//! thousand threads.
//!
//! Cancellation reaches the coroutine: when the caller cancels, the request's task pushes
//! [`Job::Cancel`] and keeps waiting for the outcome (the coroutine may clean up, within the
//! server's grace period); when the request is dropped (its deadline passed, the grace period
//! ran out, the server shut down), a guard pushes the same job. Either way the loop calls
//! `task.cancel()`, and the coroutine gets `asyncio.CancelledError` at its `await`. A stream
//! that ends early closes its async generator (`aclose()`, so `GeneratorExit` at its `yield`)
//! once no step of it runs.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use microcs::tokio::Items;
use microcs::{RemoteError, Request};
use pyo3::exceptions::PyStopAsyncIteration;
use pyo3::prelude::*;
use tokio::sync::oneshot;

use super::{Handler, Style, cancelled, lock, log_failure};
use crate::bridge::Bridge;

/// One step's outcome: a reply or an item, the end of a stream (`None`), or the error to answer.
type Step = Result<Option<Vec<u8>>, RemoteError>;

/// The event loop's queue of jobs.
pub(super) type Jobs = Bridge<Job>;

/// What the event loop is asked to do.
pub(super) enum Job {
    /// Run the coroutine, or the async generator's next step, and send the outcome.
    Step(Arc<Call>, oneshot::Sender<Step>),
    /// The caller cancelled, or the request was dropped: cancel the running step.
    Cancel(Arc<Call>),
    /// The stream is over early: close the async generator once no step of it runs.
    Close(Arc<Call>),
}

/// One request of an async handler, shared by its tokio task and the event loop.
pub(super) struct Call {
    handler: Arc<Handler>,
    req: Arc<Request>,
    /// The `asyncio.Task` of the running step, while it runs (touched on the loop only).
    task: Mutex<Option<Py<PyAny>>>,
    /// An async generator handler's generator, from its first step until it finished or was
    /// closed.
    agen: Mutex<Option<Py<PyAny>>>,
    /// The stream ended early: close the generator when the running step finishes.
    closing: AtomicBool,
}

impl Call {
    fn new(handler: Arc<Handler>, req: Request) -> Arc<Call> {
        Arc::new(Call {
            handler,
            req: Arc::new(req),
            task: Mutex::new(None),
            agen: Mutex::new(None),
            closing: AtomicBool::new(false),
        })
    }
}

fn loop_stopped() -> RemoteError {
    RemoteError::new(microcs::proto::status::BUSY, "the server's event loop has stopped")
}

/// Pushes [`Job::Cancel`] when dropped armed: the request was dropped while its step ran.
struct CancelOnDrop<'a> {
    call: &'a Arc<Call>,
    jobs: &'a Jobs,
    armed: bool,
}

impl Drop for CancelOnDrop<'_> {
    fn drop(&mut self) {
        if self.armed {
            let _ = self.jobs.push(Job::Cancel(self.call.clone()));
        }
    }
}

/// Runs one step of `call` on the loop and waits for its outcome.
async fn step(call: &Arc<Call>) -> Step {
    let Some(jobs) = call.handler.jobs.clone() else { return Err(loop_stopped()) };
    let (tx, mut rx) = oneshot::channel();
    if jobs.push(Job::Step(call.clone(), tx)).is_err() {
        return Err(loop_stopped());
    }
    let mut guard = CancelOnDrop { call, jobs: &jobs, armed: true };
    let outcome = tokio::select! {
        r = &mut rx => r,
        () = call.req.cancelled() => {
            // Tell the coroutine, then let it finish (the server gives it the grace period).
            let _ = jobs.push(Job::Cancel(call.clone()));
            (&mut rx).await
        }
    };
    guard.armed = false;
    outcome.unwrap_or_else(|_| Err(loop_stopped()))
}

impl Handler {
    /// An `async def` handler's answer to one request.
    pub(super) async fn run_coroutine(self: Arc<Self>, req: Request) -> Result<Vec<u8>, RemoteError> {
        step(&Call::new(self, req)).await.map(Option::unwrap_or_default)
    }

    /// An async generator handler's stream for one request.
    pub(super) async fn run_async_generator(
        self: Arc<Self>,
        req: Request,
        items: Items,
    ) -> Result<(), RemoteError> {
        let call = Call::new(self, req);
        let _close = CloseOnDrop(&call);
        while let Some(item) = step(&call).await? {
            items.send(item).await?;
        }
        Ok(())
    }
}

/// Closes the async generator of a stream that is over (a no-op once it finished).
struct CloseOnDrop<'a>(&'a Arc<Call>);

impl Drop for CloseOnDrop<'_> {
    fn drop(&mut self) {
        if let Some(jobs) = &self.0.handler.jobs {
            let _ = jobs.push(Job::Close(self.0.clone()));
        }
    }
}

/// The loop's reader callback (`add_reader` on the jobs' wake-up socket): runs every job queued.
#[pyclass(module = "microcs", frozen)]
pub(super) struct RunJobs {
    pub(super) jobs: Arc<Jobs>,
    pub(super) event_loop: Py<PyAny>,
}

#[pymethods]
impl RunJobs {
    fn __call__(&self, py: Python<'_>) {
        let event_loop = self.event_loop.bind(py);
        for job in self.jobs.take() {
            match job {
                Job::Step(call, tx) => start(py, event_loop, call, tx),
                Job::Cancel(call) => {
                    if let Some(task) = lock(&call.task).as_ref() {
                        let _ = task.bind(py).call_method0("cancel");
                    }
                }
                Job::Close(call) => {
                    call.closing.store(true, Ordering::SeqCst);
                    if lock(&call.task).is_none() {
                        close(py, event_loop, &call);
                    }
                }
            }
        }
    }
}

/// Starts one step of `call` as a task on the loop; its outcome goes to `tx`.
fn start(py: Python<'_>, event_loop: &Bound<'_, PyAny>, call: Arc<Call>, tx: oneshot::Sender<Step>) {
    let h = &call.handler;
    let awaitable = if h.style == Style::AsyncGenerator {
        let agen = lock(&call.agen).as_ref().map(|g| g.clone_ref(py));
        let agen = match agen {
            Some(g) => Ok(g.into_bound(py)),
            None => match h.invoke(py, &call.req) {
                Ok(Ok(g)) => {
                    *lock(&call.agen) = Some(g.clone().unbind());
                    Ok(g)
                }
                Ok(Err(e)) => Err(e),
                Err(refused) => return drop(tx.send(Err(refused))),
            },
        };
        agen.and_then(|g| py.import("microcs._handlers")?.call_method1("anext_item", (g,)))
    } else {
        match h.invoke(py, &call.req) {
            Ok(coroutine) => {
                coroutine.and_then(|c| py.import("microcs._handlers")?.call_method1("run_step", (c,)))
            }
            Err(refused) => return drop(tx.send(Err(refused))),
        }
    };
    let task = awaitable.and_then(|aw| event_loop.call_method1("create_task", (aw,)));
    match task {
        Ok(task) => {
            *lock(&call.task) = Some(task.clone().unbind());
            let finish = Finish { call: call.clone(), tx: Mutex::new(Some(tx)) };
            if let Err(e) = task.call_method1("add_done_callback", (finish,)) {
                log_failure(py, &format!("cannot watch a task of {}", h.label), Some(e));
            }
        }
        // The handler raised before its first `await` (or is not a coroutine function after all).
        Err(e) => {
            let _ = tx.send(Err(h.remote_from(py, e)));
        }
    }
}

/// Whether `value` is a `microcs._handlers.Raised` (a base exception the step raised).
fn is_raised(py: Python<'_>, value: &Bound<'_, PyAny>) -> bool {
    py.import("microcs._handlers")
        .and_then(|m| m.getattr("Raised"))
        .and_then(|cls| value.is_instance(&cls))
        .unwrap_or(false)
}

/// Closes `call`'s async generator on the loop (`aclose()`, not waited for).
fn close(py: Python<'_>, event_loop: &Bound<'_, PyAny>, call: &Call) {
    let Some(agen) = lock(&call.agen).take() else { return };
    let closed = py
        .import("microcs._handlers")
        .and_then(|m| m.call_method1("aclose", (agen,)))
        .and_then(|aw| event_loop.call_method1("create_task", (aw,)));
    if let Err(e) = closed {
        log_failure(py, &format!("closing the stream of {} raised", call.handler.label), Some(e));
    }
}

/// The done callback of a step's task: sends its outcome to the request's tokio task.
#[pyclass(module = "microcs", frozen)]
struct Finish {
    call: Arc<Call>,
    tx: Mutex<Option<oneshot::Sender<Step>>>,
}

#[pymethods]
impl Finish {
    fn __call__(&self, py: Python<'_>, task: &Bound<'_, PyAny>) {
        let call = &self.call;
        *lock(&call.task) = None;
        let h = &call.handler;
        let step = if task.call_method0("cancelled").and_then(|c| c.is_truthy()).unwrap_or(false) {
            Err(cancelled())
        } else {
            match task.call_method0("result") {
                // SystemExit, KeyboardInterrupt, ...: carried as a value (see `_handlers.run_step`),
                // answered as any exception is.
                Ok(value) if is_raised(py, &value) => {
                    lock(&call.agen).take();
                    let exc = value.getattr("exc").unwrap_or(value);
                    Err(h.remote_from(py, PyErr::from_value(exc)))
                }
                Ok(value) => h.reply(py, &value, None).map(Some),
                Err(e) if e.is_instance_of::<PyStopAsyncIteration>(py) => {
                    lock(&call.agen).take();
                    Ok(None)
                }
                Err(e) => {
                    lock(&call.agen).take();
                    Err(h.remote_from(py, e))
                }
            }
        };
        if call.closing.load(Ordering::SeqCst) {
            if let Ok(event_loop) = task.call_method0("get_loop") {
                close(py, &event_loop, call);
            }
        }
        if let Some(tx) = lock(&self.tx).take() {
            // The request may be gone (dropped at its deadline): nobody wants the outcome then.
            let _ = tx.send(step);
        }
    }
}
