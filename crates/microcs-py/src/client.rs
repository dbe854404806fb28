//! `microcs.Client`: the Rust blocking client, called without the GIL.
//!
//! Every wait (connecting, sending, waiting for the reply) happens with the GIL released, so
//! other Python threads run meanwhile. One request at a time goes over a `Client`'s connection;
//! threads sharing one `Client` take turns (for many requests in flight, use `AsyncClient`).
//! A call waiting for its answer lets Python handle signals every [`SIGNAL_CHECK`]: Ctrl-C
//! raises `KeyboardInterrupt` within that time (the request is cancelled on the server, and the
//! client stays usable). Calls over NATS are not interrupted: they end at the latest at their
//! timeout.
//!
//! With a NATS URL (`nats=` or `MICROCS_NATS_URL`) the library picks a local instance when one
//! is running and the broker otherwise; calls over NATS also wait without the GIL.

use std::cell::Cell;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use microcs::ErrorKind;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyTuple};

use crate::errors::IntoPyResult;
use crate::payload::{LARGE, extract_payload, new_bytes, stream_args};
use crate::{duration, json_to_py};

/// How often a call waiting for its answer lets Python run its signal handlers.
const SIGNAL_CHECK: Duration = Duration::from_millis(100);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

thread_local! {
    /// The `Client` (its address) whose call this thread is in. Python signal handlers run
    /// inside a call (from its interrupt check); one that used the same client would lock it
    /// again on the same thread and hang, so that is refused (`close()` is deferred instead).
    static IN_CALL: Cell<usize> = const { Cell::new(0) };
}

/// Marks this thread as in a call of one client until dropped (restoring what was marked
/// before, for a handler that calls another client).
struct InCall(usize);

impl InCall {
    fn enter(client: usize) -> InCall {
        InCall(IN_CALL.replace(client))
    }
}

impl Drop for InCall {
    fn drop(&mut self) {
        IN_CALL.set(self.0);
    }
}

/// Lets Python run its signal handlers (on the main thread only: elsewhere CPython does not run
/// them, and taking the GIL every period would be for nothing). What a handler raises is kept
/// in `slot`, and the call is told to stop.
fn check_signals(slot: &Mutex<Option<PyErr>>) -> bool {
    if rustix::thread::gettid() != rustix::process::getpid() {
        return false;
    }
    Python::attach(|py| match py.check_signals() {
        Ok(()) => false,
        Err(raised) => {
            *lock(slot) = Some(raised);
            true
        }
    })
}

/// Where a [`Client`]'s connection is.
// One per client, in place: the size of an empty slot does not matter.
#[allow(clippy::large_enum_variant)]
enum Slot {
    Ready(microcs::Client),
    /// Taken along by an open [`ItemStream`], which gives it back when it ends.
    Lent,
    Closed,
}

/// Why a client that is not [`Slot::Ready`] cannot make a call.
fn unusable(name: &str, slot: &Slot) -> microcs::Error {
    if matches!(slot, Slot::Lent) {
        return microcs::Error::new(
            ErrorKind::InvalidConfig,
            format!(
                "the client of service '{name}' is reading a stream; finish or close() the stream first, \
                 or use another Client"
            ),
        );
    }
    microcs::Error::new(
        ErrorKind::Closed,
        format!("the client of service '{name}' is closed; create a new Client to call it again"),
    )
}

/// A connection to a named service.
#[pyclass(module = "microcs", frozen)]
pub struct Client {
    name: String,
    /// Locked only without the GIL (and never held while waiting for it), so a thread waiting
    /// for its turn never holds up the others.
    inner: Mutex<Slot>,
    /// What a signal handler raised while a call waited (`KeyboardInterrupt` for Ctrl-C): the
    /// call ended for it, and it is raised in place of the call's error.
    interrupted: Arc<Mutex<Option<PyErr>>>,
    /// `close()` was called by a signal handler during a call of this client: closed when the
    /// call returns.
    close_after_call: AtomicBool,
}

impl Client {
    /// Runs `f` on the connection without the GIL.
    fn with<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut microcs::Client) -> microcs::Result<T> + Send,
    ) -> PyResult<T> {
        let name = &self.name;
        self.with_slot(py, |slot| match slot {
            Slot::Ready(c) => f(c),
            other => Err(unusable(name, other)),
        })
    }

    /// Runs `f` on the connection's slot without the GIL; what a signal handler raised
    /// meanwhile replaces `f`'s error.
    fn with_slot<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut Slot) -> microcs::Result<T> + Send,
    ) -> PyResult<T> {
        let name = &self.name;
        let me = self.id();
        if IN_CALL.get() == me {
            return Err(pyo3::exceptions::PyRuntimeError::new_err(format!(
                "the client of service '{name}' is in a call on this thread (a signal handler may not use it; \
                 close() is allowed)"
            )));
        }
        let (r, raised) = py.detach(|| {
            let mut inner = lock(&self.inner);
            let r = {
                let _in_call = InCall::enter(me);
                f(&mut inner)
            };
            // Taken while the client is still ours: what a handler raised during this call
            // belongs to this call, not to another thread's next one.
            let raised = lock(&self.interrupted).take();
            if self.close_after_call.swap(false, Ordering::SeqCst) {
                *inner = Slot::Closed;
            }
            (r, raised)
        });
        self.settle(py, r, raised)
    }

    /// What a call returns: what a signal handler raised during it replaces its error.
    fn settle<T>(&self, py: Python<'_>, r: microcs::Result<T>, raised: Option<PyErr>) -> PyResult<T> {
        match (r, raised) {
            (Err(_), Some(raised)) => Err(raised),
            (r, _) => r.py_err(py),
        }
    }

    /// Takes back the connection an [`ItemStream`] had (dropped if the client was closed
    /// meanwhile). Called without the GIL.
    fn give_back(&self, client: Option<microcs::Client>) {
        let mut inner = lock(&self.inner);
        if matches!(*inner, Slot::Lent) {
            *inner = client.map_or(Slot::Closed, Slot::Ready);
        }
    }

    /// A reply as `bytes`. A large reply's vector goes back to the connection, which reads the
    /// next large reply into it: memory already resident, where a fresh megabyte would cost
    /// 256 page faults. (`try_lock`: never waits, so it may run with the GIL; a client busy
    /// in another thread's call just lets the vector go.)
    fn reply_to_bytes<'py>(&self, py: Python<'py>, reply: Vec<u8>) -> PyResult<Bound<'py, PyBytes>> {
        let bytes = new_bytes(py, &reply)?;
        if reply.len() >= LARGE {
            if let Ok(mut slot) = self.inner.try_lock() {
                if let Slot::Ready(c) = &mut *slot {
                    c.recycle(reply);
                }
            }
        }
        Ok(bytes)
    }

    /// This client's identity for [`IN_CALL`].
    fn id(&self) -> usize {
        self as *const Client as usize
    }
}

#[pymethods]
impl Client {
    /// Connects to the service `name`; `timeout` (seconds) bounds connecting and each request.
    ///
    /// With `nats` (or `MICROCS_NATS_URL`), a local instance is used when one is running and
    /// the NATS broker otherwise; `transport` forces `"local"` or `"nats"`. `activate=False`:
    /// never start the service from its definition; `instance`: connect to that instance slot
    /// only.
    #[new]
    #[pyo3(signature = (
        name, timeout = 30.0, *, runtime_dir = None, max_frame = None, nats = None, transport = None,
        stream_window = None, activate = None, instance = None, shared_memory = None
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
        instance: Option<u32>,
        shared_memory: Option<bool>,
    ) -> PyResult<Client> {
        let interrupted = Arc::new(Mutex::new(None));
        let slot = interrupted.clone();
        // Runs on the waiting thread, which has released the GIL. Signal handlers only run on
        // the main thread; elsewhere `check_signals` returns at once.
        let check = move || check_signals(&slot);
        let mut b = microcs::Client::builder(name)
            .timeout(duration(timeout, "timeout")?)
            .interrupt_check(SIGNAL_CHECK, check);
        if let Some(d) = runtime_dir {
            b = b.runtime_dir(d);
        }
        if let Some(n) = max_frame {
            b = b.max_frame(n);
        }
        if let Some((items, bytes)) = stream_window {
            b = b.stream_window(items, bytes);
        }
        if let Some(on) = activate {
            b = b.activate(on);
        }
        if let Some(slot) = instance {
            b = b.instance(slot);
        }
        // Without `shared_memory=`, the library reads MICROCS_SHM.
        if let Some(on) = shared_memory {
            b = b.shared_memory(on);
        }
        // Without `nats=`, the library reads MICROCS_NATS_URL (and MICROCS_TRANSPORT) itself.
        let (url, transport) = crate::nats::client(nats, transport).py_err(py)?;
        if let Some(u) = url {
            b = b.nats(&u);
        }
        if let Some(t) = transport {
            b = b.transport(t);
        }
        let client = py.detach(|| b.connect());
        if let (Err(_), Some(raised)) = (&client, lock(&interrupted).take()) {
            return Err(raised);
        }
        let client = client.py_err(py)?;
        Ok(Client {
            name: name.to_owned(),
            inner: Mutex::new(Slot::Ready(client)),
            interrupted,
            close_after_call: AtomicBool::new(false),
        })
    }

    /// Sends `payload` to the service's default handler; returns the reply.
    fn request<'py>(&self, py: Python<'py>, payload: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyBytes>> {
        let payload = extract_payload(payload)?;
        let reply = self.with(py, |c| c.request(&payload))?;
        self.reply_to_bytes(py, reply)
    }

    /// Calls the method `method` with `payload`; returns the reply.
    #[pyo3(signature = (method, payload = None))]
    fn call<'py>(
        &self,
        py: Python<'py>,
        method: &str,
        payload: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let payload = match payload {
            Some(p) => Some(extract_payload(p)?),
            None => None,
        };
        let reply = self.with(py, |c| c.call(method, payload.as_deref().unwrap_or_default()))?;
        self.reply_to_bytes(py, reply)
    }

    /// Calls `method` (`""`: the default handler) with `payload`; returns an iterator of the
    /// items it answers with. The client's timeout bounds each wait for an item; `limit`
    /// (seconds) bounds the whole stream. The client makes no other call until the stream ends
    /// or is closed (breaking out of a `for` loop over it closes it, which cancels it on the
    /// server).
    #[pyo3(signature = (method, payload = None, *, limit = None))]
    fn stream(
        slf: &Bound<'_, Self>,
        method: &str,
        payload: Option<&Bound<'_, PyAny>>,
        limit: Option<f64>,
    ) -> PyResult<ItemStream> {
        let py = slf.py();
        let (payload, limit) = stream_args(payload, limit)?;
        let this = slf.get();
        let name = &this.name;
        let stream = this.with_slot(py, |slot| match std::mem::replace(slot, Slot::Lent) {
            Slot::Ready(c) => {
                c.into_stream(method, payload.as_deref().unwrap_or_default(), limit).map_err(|(e, c)| {
                    *slot = Slot::Ready(*c);
                    e
                })
            }
            other => {
                let e = unusable(name, &other);
                *slot = other;
                Err(e)
            }
        })?;
        Ok(ItemStream {
            client: slf.clone().unbind(),
            stream: Mutex::new(Some(stream)),
            close_after_next: AtomicBool::new(false),
        })
    }

    /// Sends text to the default handler and returns the reply as text (the original course
    /// project's verb).
    fn send_message(&self, py: Python<'_>, message: &str) -> PyResult<String> {
        self.with(py, |c| c.send_message(message))
    }

    /// The service's `$ping` answer, as a dict.
    fn ping<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let r = self.with(py, |c| c.ping())?;
        json_to_py(py, &r)
    }

    /// The service's `$info` answer (name, version, endpoints), as a dict.
    fn info<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let r = self.with(py, |c| c.info())?;
        json_to_py(py, &r)
    }

    /// The service's `$stats` answer (per-endpoint counts and timings), as a dict.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let r = self.with(py, |c| c.stats())?;
        json_to_py(py, &r)
    }

    /// The service name.
    #[getter]
    fn name(&self) -> &str {
        &self.name
    }

    /// Seconds each request may take.
    #[getter]
    fn get_timeout(&self, py: Python<'_>) -> PyResult<f64> {
        self.with(py, |c| Ok(c.timeout().as_secs_f64()))
    }

    #[setter]
    fn set_timeout(&self, py: Python<'_>, timeout: f64) -> PyResult<()> {
        let t: Duration = duration(timeout, "timeout")?;
        self.with(py, |c| {
            c.set_timeout(t);
            Ok(())
        })
    }

    /// The server's process id (None while disconnected, and over NATS).
    #[getter]
    fn server_pid(&self, py: Python<'_>) -> PyResult<Option<u32>> {
        self.with(py, |c| Ok(c.server_pid()))
    }

    /// What carries the frames to the local service: `"shm"` (shared memory), `"unix"` (the
    /// socket), or None while not connected locally.
    #[getter]
    fn local_transport(&self, py: Python<'_>) -> PyResult<Option<&'static str>> {
        self.with(py, |c| Ok(c.transport()))
    }

    /// Where the last request went, `"local"` or `"nats"`; before any request, where the next
    /// one would go.
    #[getter]
    fn via(&self, py: Python<'_>) -> PyResult<&'static str> {
        self.with(py, |c| Ok(c.via().as_str()))
    }

    /// The NATS broker this client uses or falls back to (a password in it masked), or None.
    #[getter]
    fn nats_url(&self, py: Python<'_>) -> PyResult<Option<String>> {
        self.with(py, |c| Ok(c.nats_url()))
    }

    /// True once close() was called.
    #[getter]
    fn closed(&self, py: Python<'_>) -> bool {
        if IN_CALL.get() == self.id() {
            // Asked by a signal handler during a call: closed once it called close() (which
            // takes effect when the call returns).
            return self.close_after_call.load(Ordering::SeqCst);
        }
        py.detach(|| matches!(*lock(&self.inner), Slot::Closed))
    }

    /// Closes the connection. Further calls raise `microcs.Closed`. Idempotent. Called by a
    /// signal handler during a call of this client, it closes the client when that call returns.
    fn close(&self, py: Python<'_>) {
        if IN_CALL.get() == self.id() {
            self.close_after_call.store(true, Ordering::SeqCst);
            return;
        }
        let slot = py.detach(|| std::mem::replace(&mut *lock(&self.inner), Slot::Closed));
        drop(slot);
    }

    fn __enter__(slf: &Bound<'_, Self>) -> Py<Self> {
        slf.clone().unbind()
    }

    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, py: Python<'_>, _exc: &Bound<'_, PyTuple>) {
        self.close(py);
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        let state = if self.closed(py) { " closed" } else { "" };
        format!("<microcs.Client name={:?}{state}>", self.name)
    }
}

/// The items of a stream, from `Client.stream()`: an iterator of `bytes`.
///
/// It holds its client's connection until the stream ends, fails, or is closed (`close()`,
/// `with`, or dropping it: a `for` loop left early drops it), which cancels the stream on the
/// server if it is still running.
#[pyclass(module = "microcs", frozen)]
pub struct ItemStream {
    client: Py<Client>,
    /// `None` once ended (the connection is back in the client). Locked only without the GIL.
    stream: Mutex<Option<microcs::ItemStream<'static>>>,
    /// `close()` was called by a signal handler during a `next()` of this stream.
    close_after_next: AtomicBool,
}

impl ItemStream {
    /// Ends the stream (cancelling it if it runs) and gives the connection back. Without the GIL.
    fn end(&self, taken: Option<microcs::ItemStream<'static>>) {
        if let Some(s) = taken {
            self.client.get().give_back(s.into_client());
        }
    }

    /// This stream's identity for [`IN_CALL`].
    fn id(&self) -> usize {
        self as *const ItemStream as usize
    }
}

#[pymethods]
impl ItemStream {
    fn __iter__(slf: &Bound<'_, Self>) -> Py<Self> {
        slf.clone().unbind()
    }

    fn __next__<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyBytes>>> {
        let client = self.client.get();
        let me = self.id();
        if IN_CALL.get() == me {
            return Err(pyo3::exceptions::PyRuntimeError::new_err(
                "the stream is waiting on this thread (a signal handler may not read it; close() is allowed)",
            ));
        }
        let (next, raised) = py.detach(|| {
            let mut slot = lock(&self.stream);
            let next = {
                let _in_call = InCall::enter(me);
                slot.as_mut().and_then(Iterator::next)
            };
            let raised = lock(&client.interrupted).take();
            if !matches!(next, Some(Ok(_))) || self.close_after_next.swap(false, Ordering::SeqCst) {
                self.end(slot.take());
            }
            (next, raised)
        });
        match next {
            None => Ok(None),
            Some(r) => client.settle(py, r, raised).map(|item| Some(PyBytes::new(py, &item))),
        }
    }

    /// Ends the stream here: the server is told to stop (if it has not ended), and the client
    /// can make calls again. Idempotent. Called by a signal handler while the stream waits, it
    /// takes effect when that wait returns.
    fn close(&self, py: Python<'_>) {
        if IN_CALL.get() == self.id() {
            self.close_after_next.store(true, Ordering::SeqCst);
            return;
        }
        py.detach(|| self.end(lock(&self.stream).take()));
    }

    fn __enter__(slf: &Bound<'_, Self>) -> Py<Self> {
        slf.clone().unbind()
    }

    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, py: Python<'_>, _exc: &Bound<'_, PyTuple>) {
        self.close(py);
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        let open = py.detach(|| lock(&self.stream).is_some());
        let state = if open { "open" } else { "ended" };
        format!("<microcs.ItemStream of {:?} {state}>", self.client.get().name)
    }
}

impl Drop for ItemStream {
    fn drop(&mut self) {
        // Runs with the GIL (deallocation); the connection's lock is never held by a thread
        // waiting for the GIL, and the end is one short write.
        let taken = self.stream.get_mut().unwrap_or_else(|p| p.into_inner()).take();
        self.end(taken);
    }
}
