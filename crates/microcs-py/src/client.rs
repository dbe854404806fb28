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

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use microcs::ErrorKind;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyTuple};

use crate::errors::IntoPyResult;
use crate::payload::extract_payload;
use crate::{duration, json_to_py};

/// How often a call waiting for its answer lets Python run its signal handlers.
const SIGNAL_CHECK: Duration = Duration::from_millis(100);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A connection to a named service.
#[pyclass(module = "microcs", frozen)]
pub struct Client {
    name: String,
    /// `None` once closed. Locked only without the GIL, so a thread waiting for its turn never
    /// holds up the others.
    inner: Mutex<Option<microcs::Client>>,
    /// What a signal handler raised while a call waited (`KeyboardInterrupt` for Ctrl-C): the
    /// call ended for it, and it is raised in place of the call's error.
    interrupted: Arc<Mutex<Option<PyErr>>>,
}

impl Client {
    /// Runs `f` on the connection without the GIL.
    fn with<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut microcs::Client) -> microcs::Result<T> + Send,
    ) -> PyResult<T> {
        let name = &self.name;
        let r = py.detach(|| match lock(&self.inner).as_mut() {
            Some(c) => f(c),
            None => Err(microcs::Error::new(
                ErrorKind::Closed,
                format!("the client of service '{name}' is closed; create a new Client to call it again"),
            )),
        });
        if r.is_err() {
            if let Some(raised) = lock(&self.interrupted).take() {
                return Err(raised);
            }
        }
        r.py_err(py)
    }
}

#[pymethods]
impl Client {
    /// Connects to the service `name`; `timeout` (seconds) bounds connecting and each request.
    ///
    /// With `nats` (or `MICROCS_NATS_URL`), a local instance is used when one is running and
    /// the NATS broker otherwise; `transport` forces `"local"` or `"nats"`.
    #[new]
    #[pyo3(signature = (
        name, timeout = 30.0, *, runtime_dir = None, max_frame = None, nats = None, transport = None
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
    ) -> PyResult<Client> {
        let interrupted = Arc::new(Mutex::new(None));
        let slot = interrupted.clone();
        // Runs on the waiting thread, which has released the GIL. Signal handlers only run on
        // the main thread; elsewhere `check_signals` returns at once.
        let check = move || {
            Python::attach(|py| match py.check_signals() {
                Ok(()) => false,
                Err(raised) => {
                    *lock(&slot) = Some(raised);
                    true
                }
            })
        };
        let mut b = microcs::Client::builder(name)
            .timeout(duration(timeout, "timeout")?)
            .interrupt_check(SIGNAL_CHECK, check);
        if let Some(d) = runtime_dir {
            b = b.runtime_dir(d);
        }
        if let Some(n) = max_frame {
            b = b.max_frame(n);
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
        Ok(Client { name: name.to_owned(), inner: Mutex::new(Some(client)), interrupted })
    }

    /// Sends `payload` to the service's default handler; returns the reply.
    fn request<'py>(&self, py: Python<'py>, payload: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyBytes>> {
        let payload = extract_payload(payload)?;
        let reply = self.with(py, |c| c.request(&payload))?;
        Ok(PyBytes::new(py, &reply))
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
        Ok(PyBytes::new(py, &reply))
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
        py.detach(|| lock(&self.inner).is_none())
    }

    /// Closes the connection. Further calls raise `microcs.Closed`. Idempotent.
    fn close(&self, py: Python<'_>) {
        let client = py.detach(|| lock(&self.inner).take());
        drop(client);
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
