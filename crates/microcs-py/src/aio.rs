//! `microcs.AsyncClient`: the Rust tokio client (multiplexed: one connection, many requests in
//! flight), driven from asyncio.
//!
//! # How a call reaches asyncio
//!
//! Each call creates an `asyncio.Future` on the running loop and spawns a task on one shared
//! tokio runtime (one worker thread for the whole process; no thread per call). The task never
//! touches Python: when the reply comes it pushes the outcome onto the client's completion
//! queue and, if the queue was empty, writes one byte to a socket pair whose other end the loop
//! watches (`loop.add_reader`). The loop then drains the whole queue in one callback, setting
//! each future's result — so a burst of a thousand replies costs one wake-up of the loop, and
//! the tokio thread never waits for the GIL.
//!
//! Cancelling the asyncio future (a cancelled task, `asyncio.wait_for`, `asyncio.timeout`)
//! aborts the tokio task, which drops the request: the server is sent a `Cancel`.
//!
//! With a NATS URL (`nats=` or `MICROCS_NATS_URL`) the library's tokio client picks a local
//! instance when one is running and the broker otherwise; its NATS connection lives on the same
//! runtime. Cancellation does not cross the broker: a cancelled NATS call stops waiting.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use microcs::ErrorKind;
use microcs::nats::Transport;
use pyo3::exceptions::{PyRuntimeError, PyStopAsyncIteration};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyTuple};
use tokio::runtime::Runtime;
use tokio::task::AbortHandle;

use crate::duration;
use crate::errors::to_py;
use crate::payload::{extract_payload, stream_args};

fn py_none(py: Python<'_>) -> Bound<'_, PyAny> {
    py.None().into_bound(py)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The process's tokio runtime for async clients: one worker thread (the work per request is
/// encoding and decoding frames; the waiting is asyncio's).
///
/// One per process: threads do not survive `fork()`, so a child gets a runtime of its own. The
/// parent's is never dropped (its thread is not there to stop, and its state is the parent's).
pub(crate) fn runtime() -> PyResult<&'static Runtime> {
    static RT: Mutex<Option<(u32, &'static Runtime)>> = Mutex::new(None);
    let mut slot = lock(&RT);
    let pid = std::process::id();
    if let Some((owner, rt)) = *slot
        && owner == pid
    {
        return Ok(rt);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("microcs-async")
        .enable_all()
        .build()
        .map_err(|e| PyRuntimeError::new_err(format!("cannot start the async runtime: {e}")))?;
    let rt: &'static Runtime = Box::leak(Box::new(rt));
    *slot = Some((pid, rt));
    Ok(rt)
}

/// What a finished call hands to the loop.
enum Outcome {
    Bytes(Vec<u8>),
    Text(String),
    /// A JSON document, returned as the object `json.loads` makes of it.
    Json(String),
    /// `connect()` and `__aenter__`: the client itself.
    Client,
    /// A stream ended: `StopAsyncIteration`.
    End,
    Failed(microcs::Error),
}

/// A finished call: the asyncio future to complete and how.
struct Done {
    future: Py<PyAny>,
    outcome: Outcome,
    /// The client, kept alive (and so its loop registration) while any of its calls runs.
    owner: Py<AsyncClient>,
}

/// The path from tokio tasks to the event loop (see the module docs).
type Bridge = crate::bridge::Bridge<Done>;

/// The loop callback registered with `add_reader`: completes the finished calls' futures.
#[pyclass(module = "microcs", frozen)]
struct Drain {
    bridge: Arc<Bridge>,
}

#[pymethods]
impl Drain {
    fn __call__(&self, py: Python<'_>) -> PyResult<()> {
        for done in self.bridge.take() {
            let fut = done.future.bind(py);
            // A cancelled future takes no result (and its task was aborted).
            if fut.call_method0("done")?.is_truthy()? {
                continue;
            }
            let value: PyResult<Bound<'_, PyAny>> = match done.outcome {
                Outcome::Bytes(b) => Ok(PyBytes::new(py, &b).into_any()),
                Outcome::Text(s) => Ok(s.into_pyobject(py)?.into_any()),
                Outcome::Json(s) => py.import("json").and_then(|j| j.call_method1("loads", (s,))),
                Outcome::Client => Ok(done.owner.bind(py).clone().into_any()),
                Outcome::End => Err(PyStopAsyncIteration::new_err(())),
                Outcome::Failed(e) => Err(to_py(py, e)),
            };
            // Each future is settled on its own: one failing callback must not strand the rest.
            let settled = match value {
                Ok(v) => fut.call_method1("set_result", (v,)),
                Err(e) => fut.call_method1("set_exception", (e.into_value(py),)),
            };
            if let Err(e) = settled {
                e.write_unraisable(py, Some(fut));
            }
        }
        Ok(())
    }
}

/// Added to each call's future: aborts the tokio task when the future is cancelled.
#[pyclass(module = "microcs", frozen)]
struct AbortOnCancel {
    abort: AbortHandle,
}

#[pymethods]
impl AbortOnCancel {
    fn __call__(&self, fut: &Bound<'_, PyAny>) -> PyResult<()> {
        if fut.call_method0("cancelled")?.is_truthy()? {
            self.abort.abort();
        }
        Ok(())
    }
}

/// What the tokio tasks of one `AsyncClient` share.
struct Shared {
    name: String,
    timeout: Duration,
    runtime_dir: Option<PathBuf>,
    max_frame: Option<u32>,
    /// The NATS URL given (else the library reads `MICROCS_NATS_URL`).
    nats: Option<String>,
    transport: Option<Transport>,
    /// `stream_window=(items, bytes)`, when given.
    window: Option<(u32, u32)>,
    /// `activate=`, when given (else the library's default).
    activate: Option<bool>,
    /// `shared_memory=`, when given (else the library reads `MICROCS_SHM`).
    shared_memory: Option<bool>,
    /// The connection, once made, with the process that made it; clones share it.
    client: Mutex<Option<(u32, microcs::tokio::Client)>>,
    /// Serialises connecting, so that a crowd of first calls opens one connection.
    connecting: tokio::sync::Mutex<()>,
    closed: AtomicBool,
}

impl Shared {
    fn closed_error(&self) -> microcs::Error {
        microcs::Error::new(
            ErrorKind::Closed,
            format!(
                "the client of service '{}' is closed; create a new AsyncClient to call it again",
                self.name
            ),
        )
    }

    async fn client(&self) -> microcs::Result<microcs::tokio::Client> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(self.closed_error());
        }
        if let Some(c) = self.current() {
            return Ok(c);
        }
        let _one_at_a_time = self.connecting.lock().await;
        if let Some(c) = self.current() {
            return Ok(c);
        }
        let mut b = microcs::tokio::Client::builder(&self.name).timeout(self.timeout);
        if let Some(d) = &self.runtime_dir {
            b = b.runtime_dir(d);
        }
        if let Some(n) = self.max_frame {
            b = b.max_frame(n);
        }
        if let Some(u) = &self.nats {
            b = b.nats(u);
        }
        if let Some(t) = self.transport {
            b = b.transport(t);
        }
        if let Some((items, bytes)) = self.window {
            b = b.stream_window(items, bytes);
        }
        if let Some(on) = self.activate {
            b = b.activate(on);
        }
        if let Some(on) = self.shared_memory {
            b = b.shared_memory(on);
        }
        let c = b.connect().await?;
        if self.closed.load(Ordering::SeqCst) {
            return Err(self.closed_error());
        }
        *lock(&self.client) = Some((std::process::id(), c.clone()));
        Ok(c)
    }

    /// The connection made by this process, if any. One made before a `fork()` is let go (the
    /// library leaves the parent's connection untouched), so this process connects anew.
    fn current(&self) -> Option<microcs::tokio::Client> {
        let mut slot = lock(&self.client);
        match slot.as_ref() {
            Some((owner, c)) if *owner == std::process::id() => Some(c.clone()),
            Some(_) => {
                drop(slot.take());
                None
            }
            None => None,
        }
    }
}

/// The event loop this client delivers to, and its registration.
struct LoopBinding {
    event_loop: Py<PyAny>,
    bridge: Arc<Bridge>,
    /// The process that registered it: a forked child's loop is not this one.
    owner: u32,
}

/// An asyncio client of a named service: many requests in flight over one connection.
#[pyclass(module = "microcs", frozen)]
pub struct AsyncClient {
    shared: Arc<Shared>,
    binding: Mutex<Option<LoopBinding>>,
}

impl AsyncClient {
    /// The running loop's bridge, registering it on first use. A client serves one loop at a
    /// time.
    fn bridge<'py>(slf: &Bound<'py, Self>) -> PyResult<(Bound<'py, PyAny>, Arc<Bridge>)> {
        let py = slf.py();
        let running = py.import("asyncio")?.call_method0("get_running_loop")?;
        let this = slf.get();
        let mut binding = lock(&this.binding);
        if binding.as_ref().is_some_and(|b| b.owner != std::process::id()) {
            // Made before a fork(): its wake-up socket pair is shared with the parent, whose loop
            // watches it. Left alone (not unregistered, not closed); this process makes its own.
            std::mem::forget(binding.take());
        }
        if let Some(b) = binding.as_ref() {
            let bound = b.event_loop.bind(py);
            if bound.is(&running) {
                return Ok((running, b.bridge.clone()));
            }
            // A closed loop has no calls left to complete: move to the running one (as when a
            // program calls asyncio.run() twice with one client).
            if !bound.call_method0("is_closed")?.is_truthy()? {
                return Err(PyRuntimeError::new_err(format!(
                    "this AsyncClient of service '{}' belongs to another event loop that is still open; \
                     create one client per loop",
                    this.shared.name
                )));
            }
        }
        let bridge = Arc::new(Bridge::new().map_err(|e| {
            PyRuntimeError::new_err(format!("cannot create the async client's wake-up socket: {e}"))
        })?);
        let drain = Drain { bridge: bridge.clone() };
        running.call_method1("add_reader", (bridge.fd(), drain))?;
        *binding = Some(LoopBinding {
            event_loop: running.clone().unbind(),
            bridge: bridge.clone(),
            owner: std::process::id(),
        });
        Ok((running, bridge))
    }

    /// Starts `work` on the runtime; returns the asyncio future it will complete.
    fn spawn<'py, F>(slf: &Bound<'py, Self>, work: F) -> PyResult<Bound<'py, PyAny>>
    where
        F: Future<Output = Outcome> + Send + 'static,
    {
        let (event_loop, bridge) = Self::bridge(slf)?;
        let fut = event_loop.call_method0("create_future")?;
        let future = fut.clone().unbind();
        let owner = slf.clone().unbind();
        let task = runtime()?.spawn(async move {
            let outcome = work.await;
            // Never closed: a client's bridge lives as long as its loop binding.
            let _ = bridge.push(Done { future, outcome, owner });
        });
        fut.call_method1("add_done_callback", (AbortOnCancel { abort: task.abort_handle() },))?;
        Ok(fut)
    }

    fn exchange<'py>(
        slf: &Bound<'py, Self>,
        method: Option<String>,
        payload: impl AsRef<[u8]> + Send + Sync + 'static,
        text: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let shared = slf.get().shared.clone();
        Self::spawn(slf, async move {
            let result = async {
                let c = shared.client().await?;
                match &method {
                    Some(m) => c.call(m, payload.as_ref()).await,
                    None => c.request(payload.as_ref()).await,
                }
            }
            .await;
            match result {
                Ok(reply) if text => match String::from_utf8(reply) {
                    Ok(s) => Outcome::Text(s),
                    Err(e) => Outcome::Failed(
                        microcs::Error::new(
                            ErrorKind::Protocol,
                            format!(
                                "service '{}' replied with bytes that are not UTF-8 text; use request() for bytes",
                                shared.name
                            ),
                        )
                        .with_source(e),
                    ),
                },
                Ok(reply) => Outcome::Bytes(reply),
                Err(e) => Outcome::Failed(e),
            }
        })
    }

    fn builtin<'py>(slf: &Bound<'py, Self>, which: &'static str) -> PyResult<Bound<'py, PyAny>> {
        let shared = slf.get().shared.clone();
        Self::spawn(slf, async move {
            let json = async {
                let c = shared.client().await?;
                let text = match which {
                    "ping" => serde_json::to_string(&c.ping().await?),
                    "info" => serde_json::to_string(&c.info().await?),
                    _ => serde_json::to_string(&c.stats().await?),
                };
                text.map_err(|e| microcs::Error::new(ErrorKind::Protocol, e.to_string()))
            }
            .await;
            match json {
                Ok(s) => Outcome::Json(s),
                Err(e) => Outcome::Failed(e),
            }
        })
    }
}

#[pymethods]
impl AsyncClient {
    /// A client of the service `name`; connects on first use (or `await client.connect()`).
    ///
    /// With `nats` (or `MICROCS_NATS_URL`), a local instance is used when one is running and
    /// the NATS broker otherwise; `transport` forces `"local"` or `"nats"`. `activate=False`:
    /// never start the service from its definition.
    #[new]
    #[pyo3(signature = (
        name, timeout = 30.0, *, runtime_dir = None, max_frame = None, nats = None, transport = None,
        stream_window = None, activate = None, shared_memory = None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        name: &str,
        timeout: f64,
        runtime_dir: Option<PathBuf>,
        max_frame: Option<u32>,
        nats: Option<&str>,
        transport: Option<&str>,
        stream_window: Option<(u32, u32)>,
        activate: Option<bool>,
        shared_memory: Option<bool>,
    ) -> PyResult<AsyncClient> {
        // Checked now rather than on first use, so a typo fails where it is written.
        microcs::Name::new(name).map_err(|e| to_py(py, e))?;
        let (nats, transport) = crate::nats::client(nats, transport).map_err(|e| to_py(py, e))?;
        Ok(AsyncClient {
            shared: Arc::new(Shared {
                name: name.to_owned(),
                timeout: duration(timeout, "timeout")?,
                runtime_dir,
                max_frame,
                nats,
                transport,
                window: stream_window,
                activate,
                shared_memory,
                client: Mutex::new(None),
                connecting: tokio::sync::Mutex::new(()),
                closed: AtomicBool::new(false),
            }),
            binding: Mutex::new(None),
        })
    }

    /// Connects now (rather than on the first call); resolves to the client itself.
    fn connect<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        let shared = slf.get().shared.clone();
        Self::spawn(slf, async move {
            match shared.client().await {
                Ok(_) => Outcome::Client,
                Err(e) => Outcome::Failed(e),
            }
        })
    }

    /// Sends `payload` to the default handler; resolves to the reply.
    fn request<'py>(slf: &Bound<'py, Self>, payload: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        let payload = extract_payload(payload)?;
        Self::exchange(slf, None, payload, false)
    }

    /// Calls the method `method` with `payload`; resolves to the reply.
    #[pyo3(signature = (method, payload = None))]
    fn call<'py>(
        slf: &Bound<'py, Self>,
        method: &str,
        payload: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        match payload {
            Some(p) => Self::exchange(slf, Some(method.to_owned()), extract_payload(p)?, false),
            None => Self::exchange(slf, Some(method.to_owned()), Vec::new(), false),
        }
    }

    /// Calls `method` (`""`: the default handler) with `payload`; returns an async iterator of
    /// the items it answers with (the stream is opened by the first `__anext__`). The client's
    /// timeout bounds each wait for an item; `limit` (seconds) bounds the whole stream.
    /// Cancelling a wait (the consuming task) cancels the stream on the server, and so do
    /// `aclose()` and dropping the iterator before the end.
    #[pyo3(signature = (method, payload = None, *, limit = None))]
    fn stream(
        slf: &Bound<'_, Self>,
        method: &str,
        payload: Option<&Bound<'_, PyAny>>,
        limit: Option<f64>,
    ) -> PyResult<AsyncItemStream> {
        let (payload, limit) = stream_args(payload, limit)?;
        let payload = payload.map(|p| p.to_vec()).unwrap_or_default();
        Ok(AsyncItemStream {
            client: slf.clone().unbind(),
            state: Arc::new(Mutex::new(StreamState::Unopened { method: method.to_owned(), payload, limit })),
        })
    }

    /// Sends text to the default handler; resolves to the reply as text.
    fn send_message<'py>(slf: &Bound<'py, Self>, message: String) -> PyResult<Bound<'py, PyAny>> {
        Self::exchange(slf, None, message.into_bytes(), true)
    }

    /// The service's `$ping` answer, as a dict.
    fn ping<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        Self::builtin(slf, "ping")
    }

    /// The service's `$info` answer, as a dict.
    fn info<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        Self::builtin(slf, "info")
    }

    /// The service's `$stats` answer, as a dict.
    fn stats<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        Self::builtin(slf, "stats")
    }

    /// The service name.
    #[getter]
    fn name(&self) -> &str {
        &self.shared.name
    }

    /// Seconds each request may take.
    #[getter]
    fn timeout(&self) -> f64 {
        self.shared.timeout.as_secs_f64()
    }

    /// True once close() was called.
    #[getter]
    fn closed(&self) -> bool {
        self.shared.closed.load(Ordering::SeqCst)
    }

    /// What carries the frames to the local service: `"shm"` (shared memory), `"unix"` (the
    /// socket), or None while not connected locally.
    #[getter]
    fn local_transport(&self) -> Option<&'static str> {
        self.shared.current()?.transport()
    }

    /// Where the last request went, `"local"` or `"nats"` (where the next one would go before
    /// any request); None until connected.
    #[getter]
    fn via(&self) -> Option<&'static str> {
        lock(&self.shared.client).as_ref().map(|(_, c)| c.via().as_str())
    }

    /// Closes the client: later calls raise `Closed`; calls already in flight still complete.
    fn close(&self) {
        self.shared.closed.store(true, Ordering::SeqCst);
        drop(lock(&self.shared.client).take());
    }

    fn __aenter__<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        Self::connect(slf)
    }

    #[pyo3(signature = (*_exc))]
    fn __aexit__<'py>(slf: &Bound<'py, Self>, _exc: &Bound<'py, PyTuple>) -> PyResult<Bound<'py, PyAny>> {
        slf.get().close();
        let (event_loop, _) = Self::bridge(slf)?;
        let fut = event_loop.call_method0("create_future")?;
        fut.call_method1("set_result", (py_none(slf.py()),))?;
        Ok(fut)
    }

    fn __repr__(&self) -> String {
        let state = if self.closed() { " closed" } else { "" };
        format!("<microcs.AsyncClient name={:?}{state}>", self.shared.name)
    }
}

impl Drop for AsyncClient {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::SeqCst);
        // No call is in flight (each call keeps its client alive until its future is settled):
        // stop watching the wake-up socket. The loop may be closed already.
        if let Some(b) = self.binding.get_mut().unwrap_or_else(|p| p.into_inner()).take() {
            if b.owner != std::process::id() {
                std::mem::forget(b); // the parent's (see `bridge`)
                return;
            }
            Python::attach(|py| {
                // Dropped while an exception propagates (`async with` whose `__aenter__` failed
                // drops the client mid-raise): calling Python would clear that exception, and the
                // interpreter would then find none ("returned NULL without setting an
                // exception"). Keep it aside and put it back.
                let pending = PyErr::take(py);
                let fd = b.bridge.fd();
                let _ = b.event_loop.bind(py).call_method1("remove_reader", (fd,));
                if let Some(e) = pending {
                    e.restore(py);
                }
            });
        }
    }
}

/// Where an [`AsyncItemStream`] is.
enum StreamState {
    /// Opened by the first `__anext__`.
    Unopened {
        method: String,
        payload: Vec<u8>,
        limit: Option<Duration>,
    },
    Open(microcs::tokio::ItemStream),
    /// A `__anext__` has it.
    Busy,
    Ended,
}

impl StreamState {
    /// Ends it here; a running stream is dropped on the runtime (its `Drop` tells the server).
    fn end(state: &Mutex<StreamState>) {
        let was = std::mem::replace(&mut *lock(state), StreamState::Ended);
        if let (StreamState::Open(stream), Ok(rt)) = (was, runtime()) {
            let _on_runtime = rt.enter();
            drop(stream);
        }
    }
}

/// A `__anext__` that was cancelled (its task aborted) leaves its stream ended, not busy.
struct EndIfBusy(Arc<Mutex<StreamState>>);

impl Drop for EndIfBusy {
    fn drop(&mut self) {
        let mut state = lock(&self.0);
        if matches!(*state, StreamState::Busy) {
            *state = StreamState::Ended;
        }
    }
}

/// The items of a stream, from `AsyncClient.stream()`: an async iterator of `bytes`.
#[pyclass(module = "microcs", frozen)]
pub struct AsyncItemStream {
    client: Py<AsyncClient>,
    state: Arc<Mutex<StreamState>>,
}

#[pymethods]
impl AsyncItemStream {
    fn __aiter__(slf: &Bound<'_, Self>) -> Py<Self> {
        slf.clone().unbind()
    }

    fn __anext__<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        let taken = std::mem::replace(&mut *lock(&self.state), StreamState::Busy);
        let mut stream = match taken {
            StreamState::Ended => {
                *lock(&self.state) = StreamState::Ended;
                return Ok(None);
            }
            StreamState::Busy => {
                return Err(PyRuntimeError::new_err(
                    "another __anext__ of this stream is waiting; read a stream from one task at a time",
                ));
            }
            other => other,
        };
        let client = self.client.bind(py);
        let shared = client.get().shared.clone();
        let guard = EndIfBusy(self.state.clone());
        AsyncClient::spawn(client, async move {
            let next = async {
                if let StreamState::Unopened { method, payload, limit } = &stream {
                    let c = shared.client().await?;
                    let opened = match limit {
                        Some(l) => c.stream_until(method, payload, *l).await?,
                        None => c.stream(method, payload).await?,
                    };
                    stream = StreamState::Open(opened);
                }
                let StreamState::Open(open) = &mut stream else { unreachable!("opened above") };
                std::future::poll_fn(|cx| futures_core::Stream::poll_next(std::pin::Pin::new(&mut *open), cx))
                    .await
                    .transpose()
            }
            .await;
            let outcome = match next {
                Ok(Some(item)) => {
                    *lock(&guard.0) = stream;
                    return Outcome::Bytes(item);
                }
                Ok(None) => Outcome::End,
                Err(e) => Outcome::Failed(e),
            };
            *lock(&guard.0) = StreamState::Ended;
            outcome
        })
        .map(Some)
    }

    /// Ends the stream here (the server is told to stop if it has not ended); resolves at once.
    fn aclose<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        StreamState::end(&self.state);
        let (event_loop, _) = AsyncClient::bridge(self.client.bind(py))?;
        let fut = event_loop.call_method0("create_future")?;
        fut.call_method1("set_result", (py_none(py),))?;
        Ok(fut)
    }

    fn __repr__(&self) -> String {
        let state = match &*lock(&self.state) {
            StreamState::Unopened { .. } => "not started",
            StreamState::Open(_) | StreamState::Busy => "open",
            StreamState::Ended => "ended",
        };
        format!("<microcs.AsyncItemStream of {:?} {state}>", self.client.get().shared.name)
    }
}

impl Drop for AsyncItemStream {
    fn drop(&mut self) {
        StreamState::end(&self.state);
    }
}
