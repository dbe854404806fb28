//! Rust [`microcs::Error`] → the Python exception of its kind.
//!
//! The exception classes live in Python (`microcs/_errors.py`), where they can also derive from
//! the matching built-in exception (`TimedOut` is a `TimeoutError`, ...) and are plain, typed
//! Python classes; this module looks them up once and fills in their attributes.

use microcs::ErrorKind;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyType;

/// The Python classes, in the order of [`class_index`].
static CLASSES: PyOnceLock<Vec<Py<PyType>>> = PyOnceLock::new();

const CLASS_NAMES: [&str; 12] = [
    "Error",
    "InvalidName",
    "NoService",
    "NameTaken",
    "TimedOut",
    "RemoteError",
    "FrameTooLarge",
    "ProtocolError",
    "PermissionDenied",
    "Closed",
    "InvalidConfig",
    "StartFailed",
];

fn class_index(kind: ErrorKind) -> usize {
    match kind {
        ErrorKind::InvalidName => 1,
        ErrorKind::NoService => 2,
        ErrorKind::NameTaken => 3,
        ErrorKind::TimedOut => 4,
        ErrorKind::Remote => 5,
        ErrorKind::FrameTooLarge => 6,
        ErrorKind::Protocol => 7,
        ErrorKind::PermissionDenied => 8,
        ErrorKind::Closed => 9,
        ErrorKind::InvalidConfig => 10,
        ErrorKind::StartFailed => 11,
        // `Io` and kinds added later: the base class, with the Rust message.
        _ => 0,
    }
}

fn classes(py: Python<'_>) -> PyResult<&Vec<Py<PyType>>> {
    CLASSES.get_or_try_init(py, || {
        let module = py.import("microcs._errors")?;
        CLASS_NAMES.iter().map(|n| Ok(module.getattr(*n)?.cast_into::<PyType>()?.unbind())).collect()
    })
}

/// The `microcs.RemoteError` class.
pub(crate) fn remote_error_class(py: Python<'_>) -> PyResult<Bound<'_, PyType>> {
    Ok(classes(py)?[5].bind(py).clone())
}

/// The exception for a Rust error: its kind's class, the Rust message as `str(e)`, and the
/// attributes `may_have_run`, `code` and `message` (remote errors), `owner_pid` (name taken).
pub(crate) fn to_py(py: Python<'_>, err: microcs::Error) -> PyErr {
    match build(py, &err) {
        Ok(e) => e,
        // Only when the Python side of the package is broken (its classes cannot be imported):
        // raise that problem, which says what is missing.
        Err(e) => e,
    }
}

/// Whether the server refused the request with 400 (the library's verdict, such as a streaming
/// method called with `call()`): Python raises that as the `RemoteError` it is, with its code,
/// where Rust reports `ErrorKind::Protocol`.
fn refused_400(err: &microcs::Error) -> bool {
    err.kind() == ErrorKind::Protocol
        && err.remote().is_some_and(|r| r.code() == microcs::proto::status::BAD_REQUEST)
}

fn build(py: Python<'_>, err: &microcs::Error) -> PyResult<PyErr> {
    let kind = if refused_400(err) { ErrorKind::Remote } else { err.kind() };
    let cls = classes(py)?[class_index(kind)].bind(py);
    let value = cls.call1((err.to_string(),))?;
    value.setattr("may_have_run", err.may_have_run())?;
    if kind == ErrorKind::Remote {
        if let Some(remote) = err.remote() {
            value.setattr("code", remote.code())?;
            value.setattr("message", remote.message())?;
        }
    }
    if err.kind() == ErrorKind::NameTaken {
        value.setattr("owner_pid", err.owner_pid())?;
    }
    Ok(PyErr::from_value(value))
}

/// Wraps `Result<T, microcs::Error>` for `?` in functions that hold the GIL.
pub(crate) trait IntoPyResult<T> {
    fn py_err(self, py: Python<'_>) -> PyResult<T>;
}

impl<T> IntoPyResult<T> for Result<T, microcs::Error> {
    fn py_err(self, py: Python<'_>) -> PyResult<T> {
        self.map_err(|e| to_py(py, e))
    }
}
