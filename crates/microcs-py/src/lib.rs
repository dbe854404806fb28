//! Python bindings for microcs: the extension module `microcs._microcs`.
//!
//! Built with the library's features `tokio` (under `AsyncClient`) and `nats` (servers and
//! clients on a NATS broker, `nats=url`).
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
//! - `nats`: the `nats=` and `transport=` arguments, and the NATS side of `list_services`.

use std::time::Duration;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

mod aio;
mod bridge;
mod client;
mod errors;
mod nats;
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

/// A running service instance, as `list_services()` reports it.
///
/// Found locally (in the runtime directory), on NATS (`list_services(nats=url)`), or both: a
/// local server that also serves on NATS is one entry, found in both places. What a NATS
/// service does not report is `None`: microcs servers report their pid, uid, protocol version
/// and host; other NATS micro services may not.
#[pyclass(module = "microcs", frozen)]
pub struct ServiceInfo {
    /// The service name.
    #[pyo3(get)]
    name: String,
    /// Where it was found: `["local"]`, `["nats"]`, or `["local", "nats"]`.
    #[pyo3(get, name = "where")]
    found: Vec<&'static str>,
    /// The server's process id (None for a NATS service that does not report it).
    #[pyo3(get)]
    pid: Option<u32>,
    /// The user id the server runs as (None for a NATS service that does not report it).
    #[pyo3(get)]
    uid: Option<u32>,
    /// The host the server runs on, as it reports it over NATS (None for a local-only service).
    #[pyo3(get)]
    host: Option<String>,
    /// When the server started, in seconds since the Unix epoch (as `time.time()`); None for a
    /// NATS service whose `$SRV.STATS` did not answer.
    #[pyo3(get)]
    started: Option<f64>,
    /// The wire protocol version the server speaks (None for a NATS service that is not a
    /// microcs service).
    #[pyo3(get)]
    protocol_version: Option<u8>,
    /// The service's own version.
    #[pyo3(get)]
    version: String,
    /// The instance id, as in `$info`.
    #[pyo3(get)]
    id: String,
    /// Named methods besides the default handler (for other NATS services: their endpoints).
    #[pyo3(get)]
    methods: Vec<String>,
    /// The Unix socket the service listens on (None for a service found on NATS only).
    #[pyo3(get)]
    socket: Option<String>,
    /// The slot of a local instance of a name served by several (`shared=True`); None for an
    /// exclusive server.
    #[pyo3(get)]
    instance: Option<u32>,
    /// A local instance's open connections, as it records them (None otherwise).
    #[pyo3(get)]
    connections: Option<u64>,
}

impl From<nats::Found> for ServiceInfo {
    fn from(f: nats::Found) -> ServiceInfo {
        ServiceInfo {
            name: f.name,
            found: f.found,
            pid: f.pid,
            uid: f.uid,
            host: f.host,
            started: f.started,
            protocol_version: f.protocol_version,
            version: f.version,
            id: f.id,
            methods: f.methods,
            socket: f.socket,
            instance: f.instance,
            connections: f.connections,
        }
    }
}

#[pymethods]
impl ServiceInfo {
    fn __repr__(&self) -> String {
        let pid = self.pid.map_or_else(|| "None".to_owned(), |p| p.to_string());
        format!(
            "<microcs.ServiceInfo name={:?} where={} pid={pid} methods={:?}>",
            self.name,
            self.found.join("+"),
            self.methods
        )
    }
}

/// The services running for this user (in `runtime_dir`, or the default runtime directory)
/// and, with `nats`, the NATS micro services on that broker, sorted by name; `timeout` bounds
/// the wait for NATS answers.
#[pyfunction]
#[pyo3(signature = (runtime_dir = None, *, nats = None, timeout = 1.0))]
fn list_services(
    py: Python<'_>,
    runtime_dir: Option<std::path::PathBuf>,
    nats: Option<&str>,
    timeout: f64,
) -> PyResult<Vec<ServiceInfo>> {
    let wait = duration(timeout, "timeout")?;
    let url = nats::url(nats).py_err(py)?;
    let found = py
        .detach(|| -> microcs::Result<Vec<nats::Found>> {
            // The broker is asked meanwhile: its answers take up to `wait` to gather.
            std::thread::scope(|s| {
                let on_nats = url.map(|u| s.spawn(move || nats::list(u, wait)));
                let local = match &runtime_dir {
                    Some(d) => microcs::list_in(d),
                    None => microcs::list(),
                };
                let on_nats = match on_nats.map(|j| j.join()) {
                    None => Vec::new(),
                    Some(Ok(r)) => r?,
                    Some(Err(_)) => {
                        return Err(microcs::Error::new(
                            microcs::ErrorKind::Io,
                            "listing the NATS services failed unexpectedly (a panic); see the log",
                        ));
                    }
                };
                Ok(nats::merge(local?.into_iter().map(nats::Found::from).collect(), on_nats))
            })
        })
        .py_err(py)?;
    Ok(found.into_iter().map(ServiceInfo::from).collect())
}

/// The runtime directory this process uses when none is given (`$MICROCS_RUNTIME_DIR`, else
/// `$XDG_RUNTIME_DIR/microcs`, else `/tmp/microcs-<uid>`).
#[pyfunction]
fn runtime_dir() -> String {
    microcs::registry::runtime_dir().display().to_string()
}

#[pymodule]
fn _microcs(m: &Bound<'_, PyModule>) -> PyResult<()> {
    server::note_process();
    m.add_class::<server::Server>()?;
    m.add_class::<server::PyRequest>()?;
    m.add_class::<server::MethodDecorator>()?;
    m.add_class::<client::Client>()?;
    m.add_class::<client::ItemStream>()?;
    m.add_class::<aio::AsyncClient>()?;
    m.add_class::<aio::AsyncItemStream>()?;
    m.add_class::<ServiceInfo>()?;
    m.add_function(wrap_pyfunction!(list_services, m)?)?;
    m.add_function(wrap_pyfunction!(runtime_dir, m)?)?;
    m.add_function(wrap_pyfunction!(server::_stop_all, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("DEFAULT_TIMEOUT", microcs::blocking::DEFAULT_TIMEOUT.as_secs_f64())?;
    Ok(())
}
