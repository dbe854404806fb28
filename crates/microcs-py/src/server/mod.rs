//! `microcs.Server` and `microcs.Request`: Python handlers served by the Rust servers.
//!
//! A server whose handlers are all plain functions (or generators) is the Rust blocking server:
//! its threads accept, read and write without the GIL; a thread takes the GIL only to run the
//! Python handler for one request. A server with any `async def` handler (or async generator)
//! is taken over by the Rust tokio server at `start()` (`tokio::Server::from_blocking`: the name
//! was claimed, synchronously, when the `Server` was made): its coroutines run as tasks on an
//! event loop the server owns ([`tasks`]), so a thousand of them waiting cost no thread each,
//! and its plain handlers run on tokio's blocking pool. The thread that waits in `start_listening()`
//! holds no GIL either, and wakes every `SIGNAL_POLL` to let Python run its signal handlers,
//! so Ctrl-C stops the server cleanly (the name is freed) and then raises `KeyboardInterrupt`.
//!
//! With `nats=url` the library also serves the same handlers as a NATS micro service; requests
//! from the broker run on the library's blocking pool and take the GIL the same way.

use std::cell::{Cell, RefCell};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use microcs::nats::Transport;
use microcs::{ErrorKind, RemoteError, Request};
use pyo3::exceptions::{PyRuntimeError, PyStopIteration, PyTypeError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBytes, PyDict, PyString, PyTuple, PyType};

mod tasks;

use crate::errors::{IntoPyResult, remote_error_class, to_py};
use crate::payload::{new_bytes, reply_bytes, type_name};
use crate::{duration, json_to_py};

/// How often a thread waiting in `start_listening()` lets Python handle signals (Ctrl-C).
const SIGNAL_POLL: Duration = Duration::from_millis(50);

/// Status code for a handler that raised (the Rust library's `HANDLER_FAILED`).
const HANDLER_FAILED: u16 = microcs::proto::status::HANDLER_FAILED;

thread_local! {
    /// Set while this thread runs a Python handler: `stop()` called from a handler must not wait
    /// for the server to drain, since it would wait for itself.
    static IN_HANDLER: Cell<bool> = const { Cell::new(false) };
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One call, as a handler that takes a second parameter receives it.
///
/// Its payload was already passed as the first argument; this object tells who called, which
/// method, and how long the caller still waits.
#[pyclass(module = "microcs", name = "Request", frozen)]
pub struct PyRequest {
    /// Shared with the server side of an async handler or a stream, which watches whether the
    /// request was cancelled.
    inner: Arc<Request>,
}

#[pymethods]
impl PyRequest {
    /// The method the caller named, or None for the default handler.
    #[getter]
    fn method(&self) -> Option<&str> {
        self.inner.method()
    }

    /// The request payload, as bytes.
    #[getter]
    fn payload<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, self.inner.payload())
    }

    /// Process id of the caller (from the kernel, cannot be forged); 0 for a call that came
    /// over NATS, where no kernel vouches for the caller.
    #[getter]
    fn pid(&self) -> u32 {
        self.inner.peer().pid
    }

    /// User id of the caller; 4294967295 (`(uid_t)-1`, no real user) over NATS.
    #[getter]
    fn uid(&self) -> u32 {
        self.inner.peer().uid
    }

    /// Group id of the caller; 4294967295 over NATS.
    #[getter]
    fn gid(&self) -> u32 {
        self.inner.peer().gid
    }

    /// How the call came: `"local"` (the Unix socket) or `"nats"`.
    #[getter]
    fn via(&self) -> &'static str {
        if over_nats(&self.inner) { "nats" } else { "local" }
    }

    /// The request id the caller chose.
    #[getter]
    fn id(&self) -> u64 {
        self.inner.id()
    }

    /// Seconds left before the caller's deadline (0.0 once passed), or None if it set none.
    #[getter]
    fn remaining(&self) -> Option<f64> {
        self.inner.remaining().map(|d| d.as_secs_f64())
    }

    /// The caller's deadline on the `time.monotonic()` clock, or None if it set none.
    #[getter]
    fn deadline(&self, py: Python<'_>) -> PyResult<Option<f64>> {
        let Some(left) = self.inner.remaining() else { return Ok(None) };
        let now: f64 = py.import("time")?.call_method0("monotonic")?.extract()?;
        Ok(Some(now + left.as_secs_f64()))
    }

    /// True once nobody wants the answer: the caller cancelled, disconnected, or its deadline
    /// passed. A long handler should check it now and then and give up early.
    fn is_cancelled(&self) -> bool {
        self.inner.is_cancelled()
    }

    fn __repr__(&self) -> String {
        let p = self.inner.peer();
        let from = if over_nats(&self.inner) {
            "via nats".to_owned()
        } else {
            format!("pid={} uid={}", p.pid, p.uid)
        };
        format!(
            "<microcs.Request id={} method={:?} payload={} bytes {from}>",
            self.inner.id(),
            self.inner.method().unwrap_or(""),
            self.inner.payload().len(),
        )
    }
}

/// Whether a request came over NATS (the library gives those its `NATS_PEER`, which no local
/// process can have: pid 0 is the kernel's).
fn over_nats(req: &Request) -> bool {
    req.peer() == microcs::nats::NATS_PEER
}

/// How a handler answers, decided once when it is registered (with `inspect`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Style {
    /// A plain function: its return value is the reply.
    Unary,
    /// `async def`: the coroutine runs on the server's event loop; its result is the reply.
    Coroutine,
    /// A generator function: each `yield` is an item of a stream.
    Generator,
    /// An async generator function: each `yield` is an item; it runs on the server's loop.
    AsyncGenerator,
}

impl Style {
    fn of(func: &Bound<'_, PyAny>) -> PyResult<Style> {
        let inspect = func.py().import("inspect")?;
        // A callable object counts by its `__call__` (a bound method, which inspect unwraps).
        let call = func.getattr("__call__").ok();
        for f in std::iter::once(func).chain(call.as_ref()) {
            for (test, style) in [
                ("isasyncgenfunction", Style::AsyncGenerator),
                ("iscoroutinefunction", Style::Coroutine),
                ("isgeneratorfunction", Style::Generator),
            ] {
                if inspect.call_method1(test, (f,))?.is_truthy()? {
                    return Ok(style);
                }
            }
        }
        Ok(Style::Unary)
    }

    fn streams(self) -> bool {
        matches!(self, Style::Generator | Style::AsyncGenerator)
    }

    fn is_async(self) -> bool {
        matches!(self, Style::Coroutine | Style::AsyncGenerator)
    }
}

/// A Python callable registered as the default handler or a named method.
struct Handler {
    func: Py<PyAny>,
    /// Call it as `func(payload, request)` rather than `func(payload)`.
    with_request: bool,
    /// Pass the payload as `str` (decoded UTF-8) rather than `bytes`.
    text: bool,
    style: Style,
    /// For log messages: "service 'X'" or "method 'step' of service 'X'".
    label: String,
    /// The server's event loop's jobs, for async handlers (set when serving starts).
    jobs: Option<Arc<tasks::Jobs>>,
    /// Keep a Python thread state on the threads that run this handler (the blocking server's,
    /// which live as long as their connection); not on tokio's blocking pool, whose idle threads
    /// linger for seconds and would hold up the interpreter's exit (`_stop_all`).
    keep_state: bool,
}

impl Handler {
    fn new(func: &Bound<'_, PyAny>, text: bool, label: String) -> PyResult<Handler> {
        if !func.is_callable() {
            return Err(PyTypeError::new_err(format!(
                "the handler for {label} must be callable, not {}",
                type_name(func)
            )));
        }
        Ok(Handler {
            func: func.clone().unbind(),
            with_request: wants_request(func)?,
            text,
            style: Style::of(func)?,
            label,
            jobs: None,
            keep_state: true,
        })
    }

    /// Runs `f` with the GIL, as a handler of `req`: the only way the server takes the GIL.
    fn attached<T>(&self, req: &Request, f: impl FnOnce(Python<'_>) -> T) -> T {
        self.attached_as(over_nats(req), f)
    }

    /// [`attached`](Self::attached), told whether the request came over NATS.
    fn attached_as<T>(&self, nats: bool, f: impl FnOnce(Python<'_>) -> T) -> T {
        // Requests over NATS run on the library's blocking pool, whose threads idle for a
        // while before they exit: a kept thread state there would hold up the interpreter's
        // exit (`_stop_all` waits for kept states). NATS round trips are long enough that
        // creating the state per call does not show.
        if self.keep_state && !nats {
            keep_thread_state();
        }
        RUNNING_HANDLERS.fetch_add(1, Ordering::SeqCst);
        let result = Python::attach(|py| {
            let was = IN_HANDLER.replace(true);
            let result = f(py);
            IN_HANDLER.set(was);
            result
        });
        RUNNING_HANDLERS.fetch_sub(1, Ordering::SeqCst);
        result
    }

    /// Runs a plain handler for one request.
    fn call(&self, req: Request) -> Result<Vec<u8>, RemoteError> {
        let nats = over_nats(&req);
        let req = Arc::new(req);
        self.attached_as(nats, |py| match self.invoke(py, &req)? {
            // The request's vector, for a large reply to be copied into (when nothing else
            // holds the request: a `Request` object the handler kept does).
            Ok(obj) => self.reply(py, &obj, Arc::try_unwrap(req).ok().map(Request::into_payload)),
            Err(err) => Err(self.remote_from(py, err)),
        })
    }

    /// Starts a streaming handler for one request: its items, pulled one by one.
    fn open(self: &Arc<Self>, req: Request) -> Result<PyItems, RemoteError> {
        let req = Arc::new(req);
        self.attached(&req, |py| match self.invoke(py, &req)? {
            Ok(generator) => {
                Ok(PyItems { handler: self.clone(), generator: Some(generator.unbind()), req: req.clone() })
            }
            Err(err) => Err(self.remote_from(py, err)),
        })
    }

    /// Calls the Python function: what it returned (a reply, a coroutine or a generator), or
    /// raised. `Err`: the payload is not the text a `text=True` server takes (400).
    fn invoke<'py>(
        &self,
        py: Python<'py>,
        req: &Arc<Request>,
    ) -> Result<PyResult<Bound<'py, PyAny>>, RemoteError> {
        let payload = if self.text {
            PyString::new(py, req.text()?).into_any()
        } else {
            new_bytes(py, req.payload()).map_err(|e| self.remote_from(py, e))?.into_any()
        };
        let func = self.func.bind(py);
        Ok(if self.with_request {
            Bound::new(py, PyRequest { inner: req.clone() }).and_then(|r| func.call1((payload, r)))
        } else {
            func.call1((payload,))
        })
    }

    /// What the handler returned (or yielded), as reply bytes.
    fn reply(
        &self,
        py: Python<'_>,
        obj: &Bound<'_, PyAny>,
        reuse: Option<Vec<u8>>,
    ) -> Result<Vec<u8>, RemoteError> {
        reply_bytes(obj, reuse).map_err(|m| {
            let what =
                if self.style.streams() { "yielded an unusable item" } else { "returned an unusable reply" };
            log_failure(py, &format!("the handler for {} {what}: {m}", self.label), None);
            RemoteError::new(HANDLER_FAILED, m)
        })
    }

    /// The code and message the caller gets for an exception: a `microcs.RemoteError` keeps its
    /// code and message (so a handler can choose them, and a failed nested call passes on its
    /// service's answer); anything else is 500 with "ExceptionType: message".
    fn remote_from(&self, py: Python<'_>, err: PyErr) -> RemoteError {
        let value = err.value(py);
        if let Ok(cls) = remote_error_class(py) {
            if value.is_instance(&cls).unwrap_or(false) {
                let code = value.getattr("code").and_then(|c| c.extract::<u16>()).unwrap_or(HANDLER_FAILED);
                let message = value
                    .getattr("message")
                    .and_then(|m| m.extract::<String>())
                    .unwrap_or_else(|_| value.to_string());
                return RemoteError::new(code, message);
            }
        }
        let ty = value.get_type();
        let mut name = ty.qualname().map(|n| n.to_string()).unwrap_or_else(|_| "Exception".into());
        if let Ok(module) = ty.module() {
            let module = module.to_string();
            if module != "builtins" && module != "__main__" {
                name = format!("{module}.{name}");
            }
        }
        let text = value.str().map(|s| s.to_string()).unwrap_or_default();
        let message = if text.is_empty() { name } else { format!("{name}: {text}") };
        log_failure(py, &format!("the handler for {} raised {message}", self.label), Some(err));
        RemoteError::new(HANDLER_FAILED, message)
    }
}

fn cancelled() -> RemoteError {
    RemoteError::new(microcs::proto::status::CANCELLED, "the caller cancelled the request")
}

/// The items of a generator handler, pulled by the server's stream loop (or tokio's blocking
/// pool) one `next()` at a time, each with the GIL; dropping it (the caller cancelled or left)
/// closes the generator, which raises `GeneratorExit` at its `yield`.
struct PyItems {
    handler: Arc<Handler>,
    /// `None` once finished.
    generator: Option<Py<PyAny>>,
    req: Arc<Request>,
}

impl Iterator for PyItems {
    type Item = Result<Vec<u8>, RemoteError>;

    fn next(&mut self) -> Option<Result<Vec<u8>, RemoteError>> {
        let generator = self.generator.as_ref()?;
        let h = &self.handler;
        let next = h.attached(&self.req, |py| match generator.bind(py).call_method0("__next__") {
            Ok(item) => Some(h.reply(py, &item, None)),
            Err(e) if e.is_instance_of::<PyStopIteration>(py) => None,
            Err(e) => Some(Err(h.remote_from(py, e))),
        });
        if !matches!(next, Some(Ok(_))) {
            // Finished, failed or cancelled: nothing to close any more.
            self.generator = None;
        }
        next
    }
}

impl Drop for PyItems {
    fn drop(&mut self) {
        let Some(generator) = self.generator.take() else { return };
        let h = &self.handler;
        h.attached(&self.req, |py| {
            if let Err(e) = generator.bind(py).call_method0("close") {
                log_failure(py, &format!("closing the stream of {} raised", h.label), Some(e));
            }
        });
    }
}

/// Python thread states kept alive by server threads (see [`keep_thread_state`]).
static KEPT: AtomicUsize = AtomicUsize::new(0);
/// Plain handlers (and generator steps) running now, on any server thread or pool thread: the
/// interpreter's exit waits for them (`_stop_all`), since a thread that comes back to Python
/// while it finalises is ended by the interpreter, which aborts a Rust thread. A pool thread keeps
/// no thread state, so [`KEPT`] does not count it. (A panic in a handler unwinds through
/// `Python::attach` and leaves this count one high: the exit then waits its full two seconds.)
static RUNNING_HANDLERS: AtomicUsize = AtomicUsize::new(0);
/// The process whose threads [`KEPT`] and [`RUNNING_HANDLERS`] count: the one that imported the
/// module. A `fork()`ed child inherits the counts but not the threads, so it does not wait for
/// them at exit (nor, a known limit, for handlers of servers it started itself).
static COUNTED_IN: AtomicU32 = AtomicU32::new(0);

/// Called when the module is imported.
pub(crate) fn note_process() {
    COUNTED_IN.store(std::process::id(), Ordering::SeqCst);
}
/// Set once the interpreter is about to finalise: from then on, kept thread states are left to
/// the process's exit rather than deleted.
static FINALIZING: AtomicBool = AtomicBool::new(false);

/// This thread's Python thread state, kept between handler calls.
struct KeptThreadState {
    gstate: ffi::PyGILState_STATE,
    tstate: *mut ffi::PyThreadState,
}

impl Drop for KeptThreadState {
    fn drop(&mut self) {
        if FINALIZING.load(Ordering::SeqCst) {
            return;
        }
        // SAFETY: `tstate` is this thread's state, detached by `PyEval_SaveThread` in
        // `keep_thread_state`; restoring it and releasing the matching `PyGILState_Ensure` deletes
        // it. The interpreter is not finalising (checked above; `_stop_all` waits for these).
        unsafe {
            ffi::PyEval_RestoreThread(self.tstate);
            ffi::PyGILState_Release(self.gstate);
        }
        KEPT.fetch_sub(1, Ordering::SeqCst);
    }
}

thread_local! {
    static KEPT_STATE: RefCell<Option<KeptThreadState>> = const { RefCell::new(None) };
}

/// Gives this (Rust server) thread a Python thread state that outlives each handler call.
///
/// Without it every `Python::attach` on a thread that Python does not know creates a thread
/// state and deletes it afterwards, which on CPython 3.11+ maps and unmaps a frame stack:
/// several microseconds per request. With it, attaching is just taking the GIL. The state is
/// deleted when the thread exits.
fn keep_thread_state() {
    if FINALIZING.load(Ordering::SeqCst) {
        return;
    }
    let _ = KEPT_STATE.try_with(|kept| {
        let mut kept = kept.borrow_mut();
        if kept.is_none() {
            // SAFETY: called on a server thread that is not attached to the interpreter (the
            // handler has not been entered yet). `PyGILState_Ensure` creates this thread's state
            // and attaches; `PyEval_SaveThread` detaches again, keeping the state, which later
            // `PyGILState_Ensure` calls (inside `Python::attach`) reuse.
            let (gstate, tstate) = unsafe { (ffi::PyGILState_Ensure(), ffi::PyEval_SaveThread()) };
            KEPT.fetch_add(1, Ordering::SeqCst);
            *kept = Some(KeptThreadState { gstate, tstate });
        }
    });
}

/// Logs on the `microcs` logger (with the traceback when there is one): the caller gets the
/// error, but the server's owner should see it too.
fn log_failure(py: Python<'_>, message: &str, err: Option<PyErr>) {
    static LOGGER: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    let logger = LOGGER.get_or_try_init(py, || {
        py.import("logging")?.call_method1("getLogger", ("microcs",)).map(Bound::unbind)
    });
    let Ok(logger) = logger else { return };
    let kwargs = PyDict::new(py);
    if let Some(err) = err {
        let _ = kwargs.set_item("exc_info", err.into_value(py));
    }
    let _ = logger.bind(py).call_method("error", ("%s", message), Some(&kwargs));
}

/// Whether `func` takes a second positional argument (the [`PyRequest`]): two positional
/// parameters without defaults, or `*args`. A second parameter with a default is left alone, so
/// the `lambda b, i=i: ...` idiom keeps working. Decided once, when the handler is registered.
fn wants_request(func: &Bound<'_, PyAny>) -> PyResult<bool> {
    let py = func.py();
    let inspect = py.import("inspect")?;
    let Ok(sig) = inspect.call_method1("signature", (func,)) else {
        // Some built-in callables have no signature: call them with the payload only.
        return Ok(false);
    };
    let empty = inspect.getattr("Parameter")?.getattr("empty")?;
    let mut required = 0;
    for p in sig.getattr("parameters")?.call_method0("values")?.try_iter()? {
        let p = p?;
        // inspect.Parameter.kind: POSITIONAL_ONLY 0, POSITIONAL_OR_KEYWORD 1, VAR_POSITIONAL 2.
        match p.getattr("kind")?.extract::<i32>()? {
            0 | 1 if p.getattr("default")?.is(&empty) => required += 1,
            2 => return Ok(true),
            _ => {}
        }
    }
    Ok(required >= 2)
}

enum State {
    /// Owns the name, not serving yet; methods may still be added.
    Bound {
        server: Box<microcs::Server>,
        default: Option<Handler>,
        methods: Vec<(String, Handler)>,
    },
    Running(Running),
    /// Someone is shutting it down.
    Stopping,
    Stopped,
}

/// A serving server: the Rust blocking server (plain handlers only) or the tokio one (any async
/// handler), which runs on the process's async runtime.
enum Running {
    Threads(microcs::ServerHandle),
    Tasks(microcs::tokio::ServerHandle),
}

impl Running {
    /// Refuses new requests and frees the name, without waiting for the drain.
    fn trigger(&self) {
        match self {
            Running::Threads(h) => h.shutdown_trigger().shutdown(),
            Running::Tasks(h) => h.shutdown_trigger().shutdown(),
        }
    }

    /// Stops serving: running handlers finish (within the grace period), the name is freed.
    /// Not on a thread of the async runtime (nor one of its blocking pool).
    fn shutdown(self) {
        match self {
            Running::Threads(h) => h.shutdown(),
            Running::Tasks(h) => match crate::aio::runtime() {
                Ok(rt) => rt.block_on(h.shutdown()),
                Err(_) => drop(h),
            },
        }
    }

    /// Whether the server stopped by itself, and why (see `ServerHandle::wait`): `Ok` after
    /// its idle timeout, `Err` when it lost its name.
    fn ended(&self) -> Option<microcs::Result<()>> {
        match self {
            Running::Threads(h) => h.wait_timeout(Duration::ZERO),
            Running::Tasks(h) => {
                let rt = crate::aio::runtime().ok()?;
                rt.block_on(async { tokio::time::timeout(Duration::ZERO, h.wait()).await.ok() })
            }
        }
    }

    fn stats(&self) -> microcs::micro::StatsResponse {
        match self {
            Running::Threads(h) => h.stats(),
            Running::Tasks(h) => h.stats(),
        }
    }
}

/// The server's state, shared with the thread that may shut it down and with the `atexit` hook.
struct Shared {
    state: Mutex<State>,
    /// Signalled when the state becomes `Stopped` (the name is free by then).
    stopped: Condvar,
    /// The event loop of the async handlers, when there are any (from start to stop).
    event_loop: Mutex<Option<HandlerLoop>>,
    /// The process that made the server: a `fork()`ed child has its memory but not its threads,
    /// runtime or event loop, and must leave the parent's server alone.
    owner: u32,
}

impl Shared {
    fn mark_stopped(&self) {
        // The handlers have finished (or were given up on): their loop goes first.
        if let Some(l) = lock(&self.event_loop).take() {
            l.stop();
        }
        *lock(&self.state) = State::Stopped;
        self.stopped.notify_all();
    }

    /// Why the running server stopped by itself, if it did (see `ServerHandle::wait`).
    fn ended(&self) -> Option<microcs::Result<()>> {
        match &*lock(&self.state) {
            State::Running(running) => running.ended(),
            _ => None,
        }
    }

    /// Waits until stopped, at most `limit`; true if stopped.
    fn wait_stopped(&self, limit: Duration) -> bool {
        let st = lock(&self.state);
        let (st, _) = self
            .stopped
            .wait_timeout_while(st, limit, |s| !matches!(s, State::Stopped))
            .unwrap_or_else(|p| p.into_inner());
        matches!(*st, State::Stopped)
    }

    /// Stops serving and frees the name. Called without the GIL (running handlers need it to
    /// finish). With `wait` false the drain happens on a helper thread.
    fn shutdown(self: &Arc<Self>, wait: bool) {
        if self.owner != std::process::id() {
            // A forked child: the threads, tasks and loop of this server are the parent's (not
            // here to stop or join), and its socket and lock files are the parent's too (dropping
            // the claim would remove them). Let go of it all, untouched.
            let mut st = lock(&self.state);
            std::mem::forget(std::mem::replace(&mut *st, State::Stopped));
            std::mem::forget(lock(&self.event_loop).take());
            self.stopped.notify_all();
            return;
        }
        let taken = {
            let mut st = lock(&self.state);
            match &*st {
                State::Stopped => return,
                State::Stopping => None,
                _ => Some(std::mem::replace(&mut *st, State::Stopping)),
            }
        };
        match taken {
            // Someone else is draining it: wait for them (or not).
            None => {
                if wait {
                    while !self.wait_stopped(Duration::from_secs(3600)) {}
                }
            }
            Some(State::Running(handle)) if !wait => {
                // Refuse new requests and free the name now; drain on a helper thread.
                handle.trigger();
                let me = self.clone();
                let drain = move || {
                    handle.shutdown();
                    me.mark_stopped();
                };
                if std::thread::Builder::new().name("microcs-stop".into()).spawn(drain).is_err() {
                    // The closure, and the handle in it, were dropped by the failed spawn, which
                    // shut the server down on this thread.
                    self.mark_stopped();
                }
            }
            // Dropping the Rust server (bound) or shutting it down (running) frees the name.
            Some(state) => {
                if let State::Running(handle) = state {
                    handle.shutdown();
                } else {
                    drop(state);
                }
                self.mark_stopped();
            }
        }
    }
}

/// The asyncio event loop a server runs its async handlers (coroutines and async generators)
/// on: a thread of its own, started with the server and stopped after it drained.
struct HandlerLoop {
    event_loop: Py<PyAny>,
    /// What the server's tokio tasks ask the loop to run ([`tasks`]).
    jobs: Arc<tasks::Jobs>,
    thread: std::thread::JoinHandle<()>,
}

impl HandlerLoop {
    fn start(py: Python<'_>, service: &str) -> PyResult<HandlerLoop> {
        let asyncio = py.import("asyncio")?;
        let event_loop = asyncio.call_method0("new_event_loop")?.unbind();
        let theirs = event_loop.clone_ref(py);
        let jobs = Arc::new(tasks::Jobs::new().map_err(|e| {
            PyRuntimeError::new_err(format!("cannot create the event loop's wake-up socket: {e}"))
        })?);
        let our_jobs = jobs.clone();
        let label = format!("service '{service}'");
        let run = move || {
            // Code on this loop runs as handlers do: `stop()` from it must not wait for itself.
            IN_HANDLER.set(true);
            Python::attach(|py| {
                let l = theirs.bind(py);
                let reader = tasks::RunJobs { jobs: our_jobs.clone(), event_loop: theirs.clone_ref(py) };
                let ran = l
                    .call_method1("add_reader", (our_jobs.fd(), reader))
                    .and_then(|_| py.import("microcs._handlers"))
                    .and_then(|m| m.call_method1("run_loop", (l,)));
                if let Err(e) = ran {
                    log_failure(py, &format!("the event loop of {label} failed"), Some(e));
                }
                // Nobody runs jobs any more: what is still queued is dropped, which tells each
                // waiting request so (instead of leaving it waiting), and later pushes fail.
                drop(our_jobs.close());
            });
        };
        let thread = std::thread::Builder::new()
            .name("microcs-asyncio".into())
            .spawn(run)
            .map_err(|e| PyRuntimeError::new_err(format!("cannot start the event loop's thread: {e}")))?;
        Ok(HandlerLoop { event_loop, jobs, thread })
    }

    /// Stops the loop (its tasks still running are cancelled) and waits for its thread, unless
    /// called on it. Called without the GIL.
    fn stop(self) {
        Python::attach(|py| {
            let l = self.event_loop.bind(py);
            if let Ok(stop) = l.getattr("stop") {
                let _ = l.call_method1("call_soon_threadsafe", (stop,));
            }
        });
        if self.thread.thread().id() != std::thread::current().id() {
            let _ = self.thread.join();
        }
    }
}

/// Servers started in this process, so that the interpreter's exit stops them first (their
/// threads must not call into a finalising interpreter).
static RUNNING: Mutex<Vec<Weak<Shared>>> = Mutex::new(Vec::new());

/// Stops every server of this process; registered with `atexit` by `microcs/__init__.py`.
#[pyfunction]
pub(crate) fn _stop_all(py: Python<'_>) {
    let all: Vec<Arc<Shared>> = lock(&RUNNING).drain(..).filter_map(|w| w.upgrade()).collect();
    py.detach(|| {
        for s in all {
            s.shutdown(true);
        }
        // Let the servers' threads delete their Python thread states while that is still
        // allowed; a thread still running after this leaves its state to the process's exit.
        let give_up = Instant::now() + Duration::from_secs(2);
        let ours = COUNTED_IN.load(Ordering::SeqCst) == std::process::id();
        let busy =
            || ours && (KEPT.load(Ordering::SeqCst) > 0 || RUNNING_HANDLERS.load(Ordering::SeqCst) > 0);
        while busy() && Instant::now() < give_up {
            std::thread::sleep(Duration::from_millis(1));
        }
        FINALIZING.store(true, Ordering::SeqCst);
    });
}

/// Requests of one connection that run at once on a server with async handlers, unless
/// `max_in_flight` says otherwise: a waiting coroutine costs a task, not a thread, so the limit
/// is higher than the blocking server's 128 (one thread each).
const ASYNC_MAX_IN_FLIGHT: usize = 1024;

/// Serves plain (and generator) handlers on the Rust blocking server.
fn serve_threads(
    mut server: microcs::Server,
    default: Option<Handler>,
    methods: Vec<(String, Handler)>,
    no_default: impl Fn() -> RemoteError + Send + Sync + 'static,
) -> microcs::Result<microcs::ServerHandle> {
    for (name, h) in methods {
        let h = Arc::new(h);
        server = if h.style.streams() {
            server.stream_method(&name, move |req: Request| h.open(req))
        } else {
            server.method(&name, move |req: Request| h.call(req))
        };
    }
    match default.map(Arc::new) {
        Some(h) if h.style.streams() => server.spawn_stream(move |req: Request| h.open(req)),
        Some(h) => server.spawn(move |req: Request| h.call(req)),
        None => server.spawn(move |_req: Request| Err::<Vec<u8>, _>(no_default())),
    }
}

/// Serves on the Rust tokio server, which takes the claimed name over: async handlers as tasks
/// on the server's event loop ([`tasks`]), plain ones on tokio's blocking pool. Called inside
/// the async runtime.
fn serve_tasks(
    server: microcs::Server,
    default: Option<Handler>,
    methods: Vec<(String, Handler)>,
    max_in_flight: Option<usize>,
    no_default: impl Fn() -> RemoteError + Send + Sync + 'static,
) -> microcs::Result<microcs::tokio::ServerHandle> {
    use microcs::tokio::{Items, blocking, blocking_stream};
    let mut server = microcs::tokio::Server::from_blocking(server)?;
    if let Some(n) = max_in_flight {
        server = server.max_in_flight(n);
    }
    for (name, h) in methods {
        let h = Arc::new(h);
        server = match h.style {
            Style::Unary => server.method(&name, blocking(move |req: Request| h.call(req))),
            Style::Generator => server.stream_method(&name, blocking_stream(move |req: Request| h.open(req))),
            Style::Coroutine => server.method(&name, move |req: Request| h.clone().run_coroutine(req)),
            Style::AsyncGenerator => server.stream_method(&name, move |req: Request, items: Items| {
                h.clone().run_async_generator(req, items)
            }),
        };
    }
    let Some(h) = default.map(Arc::new) else {
        return server.spawn(move |_req: Request| std::future::ready(Err::<Vec<u8>, _>(no_default())));
    };
    match h.style {
        Style::Unary => server.spawn(blocking(move |req: Request| h.call(req))),
        Style::Generator => server.spawn_stream(blocking_stream(move |req: Request| h.open(req))),
        Style::Coroutine => server.spawn(move |req: Request| h.clone().run_coroutine(req)),
        Style::AsyncGenerator => {
            server.spawn_stream(move |req: Request, items: Items| h.clone().run_async_generator(req, items))
        }
    }
}

/// Serves a name with a Python handler.
#[pyclass(module = "microcs", frozen)]
pub struct Server {
    name: String,
    text: bool,
    /// Serves on NATS too (or only): method names must also be NATS endpoint names.
    on_nats: bool,
    /// `max_in_flight` was given (else a server with async handlers admits
    /// [`ASYNC_MAX_IN_FLIGHT`]).
    in_flight_given: bool,
    shared: Arc<Shared>,
}

impl Server {
    fn closed(&self, py: Python<'_>) -> PyErr {
        to_py(
            py,
            microcs::Error::new(
                ErrorKind::Closed,
                format!("server '{}' was stopped; create a new Server to serve the name again", self.name),
            ),
        )
    }

    fn add_method(&self, py: Python<'_>, name: &str, func: &Bound<'_, PyAny>) -> PyResult<()> {
        self.check_method_name(py, name)?;
        let label = format!("method '{name}' of service '{}'", self.name);
        let handler = Handler::new(func, self.text, label)?;
        let mut st = lock(&self.shared.state);
        match &mut *st {
            State::Bound { methods, .. } => {
                if methods.iter().any(|(m, _)| m == name) {
                    return Err(invalid_name(py, format!("method {name:?} is registered twice")));
                }
                methods.push((name.to_owned(), handler));
                Ok(())
            }
            State::Running(_) => Err(PyRuntimeError::new_err(format!(
                "server '{}' is already serving; add methods before start()",
                self.name
            ))),
            State::Stopping | State::Stopped => Err(self.closed(py)),
        }
    }

    fn start_inner(&self, py: Python<'_>) -> PyResult<()> {
        let mut st = lock(&self.shared.state);
        match &*st {
            State::Running(_) => return Ok(()),
            State::Stopping | State::Stopped => return Err(self.closed(py)),
            State::Bound { .. } => {}
        }
        let State::Bound { server, mut default, mut methods } = std::mem::replace(&mut *st, State::Stopping)
        else {
            unreachable!("checked above")
        };
        let service = self.name.clone();
        let names: Vec<String> = methods.iter().map(|(m, _)| m.clone()).collect();
        let no_default = move || {
            RemoteError::new(
                microcs::proto::status::NO_METHOD,
                format!("service '{service}' has no default handler; call one of its methods: {names:?}"),
            )
        };
        let any_async = default.iter().chain(methods.iter().map(|(_, h)| h)).any(|h| h.style.is_async());
        let spawned = if any_async {
            let started = crate::aio::runtime().and_then(|rt| Ok((rt, HandlerLoop::start(py, &self.name)?)));
            let (rt, event_loop) = match started {
                Ok(s) => s,
                Err(e) => {
                    *st = State::Bound { server, default, methods };
                    return Err(e);
                }
            };
            for h in default.iter_mut().chain(methods.iter_mut().map(|(_, h)| h)) {
                h.jobs = Some(event_loop.jobs.clone());
                h.keep_state = false;
            }
            *lock(&self.shared.event_loop) = Some(event_loop);
            let _in_runtime = rt.enter();
            let in_flight = (!self.in_flight_given).then_some(ASYNC_MAX_IN_FLIGHT);
            serve_tasks(*server, default, methods, in_flight, no_default).map(Running::Tasks)
        } else {
            serve_threads(*server, default, methods, no_default).map(Running::Threads)
        };
        match spawned {
            Ok(running) => {
                *st = State::Running(running);
                drop(st);
                let mut running = lock(&RUNNING);
                running.retain(|w| w.strong_count() > 0);
                running.push(Arc::downgrade(&self.shared));
                Ok(())
            }
            Err(e) => {
                // The Rust server was consumed: the name is released; this object is done.
                drop(st);
                py.detach(|| self.shared.mark_stopped());
                Err(to_py(py, e))
            }
        }
    }

    fn check_method_name(&self, py: Python<'_>, name: &str) -> PyResult<()> {
        microcs::proto::check_method(name).map_err(|m| invalid_name(py, m))?;
        if name.starts_with('$') {
            return Err(invalid_name(
                py,
                format!("method name {name:?}: names starting with '$' are reserved for built-in methods"),
            ));
        }
        // The library checks this too, but only when serving starts; methods are added after
        // the constructor bound the name, and a mistake is best reported where it is written.
        let nats_ok = name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if self.on_nats && !nats_ok {
            return Err(invalid_name(
                py,
                format!(
                    "method '{name}' of service '{}' cannot be served on NATS: a NATS micro endpoint name \
                     may contain only letters, digits, '-' and '_' (no dots)",
                    self.name
                ),
            ));
        }
        Ok(())
    }
}

/// The library's advice names its Rust builder method; a Python caller passes an argument.
fn python_advice(e: microcs::Error) -> microcs::Error {
    if e.kind() == ErrorKind::InvalidConfig && e.message().contains("fix .version()") {
        return microcs::Error::new(e.kind(), e.message().replace("fix .version()", "pass such a version="));
    }
    e
}

fn invalid_name(py: Python<'_>, message: String) -> PyErr {
    to_py(py, microcs::Error::new(ErrorKind::InvalidName, message))
}

#[pymethods]
impl Server {
    /// Claims `name` (raises NameTaken if a live server has it) and prepares to serve it.
    ///
    /// With `shared=True` it joins `name` as one of several instances instead (callers are
    /// spread over the live ones; NameTaken only if an exclusive server owns the name).
    ///
    /// With `socket_activation=True` it serves on the listening socket systemd passed
    /// (`LISTEN_FDS`; the unit's `ListenStream=` must be the name's socket, see
    /// docs/ACTIVATION.md), or binds its own when none was passed.
    ///
    /// With `nats`, it also serves as a NATS micro service on that broker (connected here, so a
    /// wrong URL or refused credentials fail now); `transport="nats"` serves on NATS only and
    /// claims no local name, `"local"` ignores `nats`.
    #[new]
    #[pyo3(signature = (
        handler, name, *, text = false, methods = None, runtime_dir = None, max_frame = None,
        max_connections = None, max_in_flight = None, grace_period = None, version = None,
        description = None, metadata = None, nats = None, transport = None, shared = false,
        shared_memory = false, shm_ring = None, idle_timeout = None, socket_activation = false
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        handler: Option<&Bound<'_, PyAny>>,
        name: &str,
        text: bool,
        methods: Option<&Bound<'_, PyAny>>,
        runtime_dir: Option<PathBuf>,
        max_frame: Option<u32>,
        max_connections: Option<usize>,
        max_in_flight: Option<usize>,
        grace_period: Option<f64>,
        version: Option<&str>,
        description: Option<&str>,
        metadata: Option<std::collections::BTreeMap<String, String>>,
        nats: Option<&str>,
        transport: Option<&str>,
        shared: bool,
        shared_memory: bool,
        shm_ring: Option<u32>,
        idle_timeout: Option<f64>,
        socket_activation: bool,
    ) -> PyResult<Server> {
        let (nats_url, transport) = crate::nats::server(nats, transport).py_err(py)?;
        let default = match handler {
            Some(h) if !h.is_none() => Some(Handler::new(h, text, format!("service '{name}'"))?),
            _ => None,
        };
        let mut b =
            microcs::Server::builder(name).shared_memory(shared_memory).socket_activation(socket_activation);
        if let Some(d) = runtime_dir {
            b = b.runtime_dir(d);
        }
        if let Some(n) = max_frame {
            b = b.max_frame(n);
        }
        if let Some(n) = max_connections {
            b = b.max_connections(n);
        }
        if let Some(n) = max_in_flight {
            b = b.max_in_flight(n);
        }
        if let Some(g) = grace_period {
            b = b.grace_period(duration(g, "grace_period")?);
        }
        if let Some(v) = version {
            b = b.version(v);
        }
        if let Some(d) = description {
            b = b.description(d);
        }
        for (k, v) in metadata.iter().flatten() {
            b = b.metadata(k, v);
        }
        if let Some(u) = &nats_url {
            b = b.nats(u);
        }
        if let Some(t) = transport {
            b = b.transport(t);
        }
        if shared {
            b = b.shared();
        }
        if let Some(bytes) = shm_ring {
            b = b.ring_capacity(bytes);
        }
        if let Some(t) = idle_timeout {
            b = b.idle_timeout(Some(duration(t, "idle_timeout")?).filter(|t| !t.is_zero()));
        }
        // Binding may wait briefly for a server that is just exiting, and connects to the NATS
        // broker when one is given.
        let server = py.detach(|| b.bind()).map_err(python_advice).py_err(py)?;
        if socket_activation {
            // The library removed the variables from the C environment; os.environ is
            // Python's own copy, which subprocess hands to children: remove them there too.
            let environ = py.import("os")?.getattr("environ")?;
            for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
                environ.call_method1("pop", (var, py.None()))?;
            }
        }
        let this = Server {
            name: name.to_owned(),
            text,
            on_nats: nats_url.is_some() && transport != Some(Transport::Local),
            in_flight_given: max_in_flight.is_some(),
            shared: Arc::new(Shared {
                state: Mutex::new(State::Bound { server: Box::new(server), default, methods: Vec::new() }),
                stopped: Condvar::new(),
                event_loop: Mutex::new(None),
                owner: std::process::id(),
            }),
        };
        if let Some(methods) = methods.filter(|m| !m.is_none()) {
            let items = methods.call_method0("items").map_err(|_| {
                PyTypeError::new_err(format!(
                    "methods must be a mapping of method name to handler, not {}",
                    type_name(methods)
                ))
            })?;
            for item in items.try_iter()? {
                let (m, f): (String, Bound<'_, PyAny>) = item?.extract()?;
                this.add_method(py, &m, &f)?;
            }
        }
        Ok(this)
    }

    /// `Server[bytes]` / `Server[str]` in annotations.
    #[classmethod]
    fn __class_getitem__<'py>(
        cls: &Bound<'py, PyType>,
        item: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py = cls.py();
        py.import("types")?.getattr("GenericAlias")?.call1((cls, item))
    }

    /// The service name.
    #[getter]
    fn name(&self) -> &str {
        &self.name
    }

    /// Whether handlers receive `str` (True) or `bytes` (False).
    #[getter]
    fn text(&self) -> bool {
        self.text
    }

    /// True while serving (after start(), before stop()).
    #[getter]
    fn running(&self) -> bool {
        matches!(*lock(&self.shared.state), State::Running(_))
    }

    /// Registers `handler` for the method `name`; without `handler`, returns a decorator.
    #[pyo3(signature = (name, handler = None))]
    fn method<'py>(
        slf: &Bound<'py, Self>,
        name: &str,
        handler: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        match handler {
            Some(h) => {
                slf.get().add_method(py, name, h)?;
                Ok(h.clone())
            }
            None => {
                slf.get().check_method_name(py, name)?;
                Ok(Bound::new(py, MethodDecorator { server: slf.clone().unbind(), name: name.to_owned() })?
                    .into_any())
            }
        }
    }

    /// Starts serving in background threads and returns at once. Does nothing if serving.
    fn start(&self, py: Python<'_>) -> PyResult<()> {
        self.start_inner(py)
    }

    /// Serves until stop() is called (from a handler or another thread), `timeout` seconds
    /// pass, or Ctrl-C: then stops, frees the name, and (for Ctrl-C) raises KeyboardInterrupt.
    /// Raises NameTaken if the server lost its name (its runtime files were removed and another
    /// server owns it now).
    #[pyo3(signature = (timeout = None))]
    fn serve(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<()> {
        let until = match timeout {
            Some(t) => Some(Instant::now() + duration(t, "timeout")?),
            None => None,
        };
        self.start_inner(py)?;
        loop {
            let slice = match until {
                Some(u) => SIGNAL_POLL.min(u.saturating_duration_since(Instant::now())),
                None => SIGNAL_POLL,
            };
            if py.detach(|| self.shared.wait_stopped(slice)) {
                return Ok(());
            }
            // The server stopped by itself: its idle timeout passed (return), or it lost its name
            // (its runtime files were removed and another server owns it now: raise why). Drain
            // and free what is ours first. (Before, only a lost name ended this loop: a server
            // that idled out stopped accepting but `serve()` never returned, holding its name.)
            if let Some(ended) = self.shared.ended() {
                self.stop(py);
                return ended.map_err(|lost| to_py(py, lost));
            }
            if let Err(interrupted) = py.check_signals() {
                self.stop(py);
                return Err(interrupted);
            }
            if until.is_some_and(|u| Instant::now() >= u) {
                self.stop(py);
                return Ok(());
            }
        }
    }

    /// The original course project's name for serve().
    #[pyo3(signature = (timeout = None))]
    fn start_listening(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<()> {
        self.serve(py, timeout)
    }

    /// Stops accepting, lets running handlers finish (within the grace period), and frees the
    /// name. Called from inside a handler, it returns at once and the server drains meanwhile.
    fn stop(&self, py: Python<'_>) {
        let wait = !IN_HANDLER.get();
        let shared = &self.shared;
        py.detach(|| shared.shutdown(wait));
    }

    /// The counters of `$stats` (requests, errors, timings per endpoint), as a dict.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let stats = match &*lock(&self.shared.state) {
            State::Running(h) => h.stats(),
            _ => return Err(PyRuntimeError::new_err(format!("server '{}' is not serving", self.name))),
        };
        json_to_py(py, &stats)
    }

    fn __enter__(slf: &Bound<'_, Self>) -> PyResult<Py<Self>> {
        slf.get().start_inner(slf.py())?;
        Ok(slf.clone().unbind())
    }

    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, py: Python<'_>, _exc: &Bound<'_, PyTuple>) {
        self.stop(py);
    }

    fn __repr__(&self) -> String {
        let state = match &*lock(&self.shared.state) {
            State::Bound { .. } => "bound",
            State::Running(_) => "serving",
            State::Stopping => "stopping",
            State::Stopped => "stopped",
        };
        format!(
            "<microcs.Server name={:?} text={} {state}>",
            self.name,
            if self.text { "True" } else { "False" }
        )
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // May run with the GIL held (garbage collection): never wait here for handlers that
        // need it. The name is released at once; the drain goes on in the background.
        self.shared.shutdown(false);
    }
}

/// What `server.method("name")` returns: registers the function it decorates.
#[pyclass(module = "microcs", frozen)]
pub struct MethodDecorator {
    server: Py<Server>,
    name: String,
}

#[pymethods]
impl MethodDecorator {
    fn __call__<'py>(&self, func: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        let py = func.py();
        self.server.get().add_method(py, &self.name, func)?;
        Ok(func.clone())
    }
}
