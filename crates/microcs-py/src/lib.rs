//! Python bindings for microcs: the extension module `microcs._microcs`.
//!
//! The Python package `microcs` (in `python/microcs`) re-exports what is defined here and adds
//! the exception classes. The Rust library does all the work; this crate converts arguments,
//! releases the GIL around every wait, and takes it only to run a Python handler.
//!
//! # Layout
//!
//! - `server`: `Server`, `Request` — a Python handler behind the Rust blocking server.
//! - `client`: `Client` — the Rust blocking client.
//! - `aio`: `AsyncClient` — the Rust tokio client, driven from asyncio.
//! - `errors`: Rust errors → the Python exception of their kind.
//! - `payload`: what may be sent and returned (bytes, never pickles).

use std::time::{Duration, UNIX_EPOCH};

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

mod aio;
mod client;
mod errors;
mod payload;
mod server;

use errors::IntoPyResult;

/// Seconds from Python as a `Duration`; a clear `ValueError` for negative, NaN or huge values.
pub(crate) fn duration(secs: f64, what: &str) -> PyResult<Duration> {
    Duration::try_from_secs_f64(secs)
        .map_err(|_| PyValueError::new_err(format!("{what} must be a number of seconds >= 0, not {secs}")))
}

/// A serialisable Rust value as the Python object `json.loads` would make of it.
pub(crate) fn json_to_py<'py>(py: Python<'py>, value: &impl serde::Serialize) -> PyResult<Bound<'py, PyAny>> {
    let text = serde_json::to_string(value).map_err(|e| PyValueError::new_err(e.to_string()))?;
    py.import("json")?.call_method1("loads", (text,))
}

/// A running service, as `list_services()` reports it.
#[pyclass(module = "microcs", frozen, get_all)]
pub struct ServiceInfo {
    /// The service name.
    name: String,
    /// The server's process id.
    pid: u32,
    /// The user id the server runs as.
    uid: u32,
    /// When the server started, in seconds since the Unix epoch (as `time.time()`).
    started: f64,
    /// The wire protocol version the server speaks.
    protocol_version: u8,
    /// The service's own version.
    version: String,
    /// The instance id, as in `$info`.
    id: String,
    /// Named methods besides the default handler.
    methods: Vec<String>,
    /// The Unix socket the service listens on.
    socket: String,
}

#[pymethods]
impl ServiceInfo {
    fn __repr__(&self) -> String {
        format!("<microcs.ServiceInfo name={:?} pid={} methods={:?}>", self.name, self.pid, self.methods)
    }
}

/// The services running for this user (in `runtime_dir`, or the default runtime directory),
/// sorted by name.
#[pyfunction]
#[pyo3(signature = (runtime_dir = None))]
fn list_services(py: Python<'_>, runtime_dir: Option<std::path::PathBuf>) -> PyResult<Vec<ServiceInfo>> {
    let found = py
        .detach(|| match runtime_dir {
            Some(d) => microcs::list_in(&d),
            None => microcs::list(),
        })
        .py_err(py)?;
    Ok(found
        .into_iter()
        .map(|s| ServiceInfo {
            name: s.name.to_string(),
            pid: s.pid,
            uid: s.uid,
            started: s.started.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64(),
            protocol_version: s.protocol_version,
            version: s.version,
            id: s.id,
            methods: s.methods,
            socket: s.socket.display().to_string(),
        })
        .collect())
}

/// The runtime directory this process uses when none is given (`$MICROCS_RUNTIME_DIR`, else
/// `$XDG_RUNTIME_DIR/microcs`, else `/tmp/microcs-<uid>`).
#[pyfunction]
fn runtime_dir() -> String {
    microcs::registry::runtime_dir().display().to_string()
}

#[pymodule]
fn _microcs(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<server::Server>()?;
    m.add_class::<server::PyRequest>()?;
    m.add_class::<server::MethodDecorator>()?;
    m.add_class::<client::Client>()?;
    m.add_class::<aio::AsyncClient>()?;
    m.add_class::<ServiceInfo>()?;
    m.add_function(wrap_pyfunction!(list_services, m)?)?;
    m.add_function(wrap_pyfunction!(runtime_dir, m)?)?;
    m.add_function(wrap_pyfunction!(server::_stop_all, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("DEFAULT_TIMEOUT", microcs::blocking::DEFAULT_TIMEOUT.as_secs_f64())?;
    Ok(())
}
