//! Payloads between Python objects and bytes: what callers may send, what handlers may return.
//!
//! Payloads are bytes on the wire and stay bytes here: nothing is pickled or unpickled, so a
//! peer can never make this process run code by what it sends.

use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::types::{PyByteArray, PyBytes, PyMemoryView, PyString};

/// Bytes to send, readable without the GIL (the `bytes` object itself when one was given, so a
/// large payload is not copied before it is written to the socket).
pub(crate) fn extract_payload(obj: &Bound<'_, PyAny>) -> PyResult<PyBackedBytes> {
    if let Ok(b) = obj.extract::<PyBackedBytes>() {
        return Ok(b);
    }
    if obj.is_instance_of::<PyMemoryView>() {
        // The stable ABI of Python 3.9 has no buffer protocol; a copy it is.
        return Ok(obj.call_method0("tobytes")?.extract::<PyBackedBytes>()?);
    }
    let what = if obj.is_instance_of::<PyString>() {
        "str; encode it (payload.encode()) or use send_message() for text".to_owned()
    } else {
        format!("{}; pass bytes, bytearray or memoryview", type_name(obj))
    };
    Err(PyTypeError::new_err(format!("payload must be bytes, not {what}")))
}

/// Payloads at least this large are copied without the GIL (other Python threads run
/// meanwhile), and their vectors are reused: see [`reply_bytes`] and [`new_bytes`].
pub(crate) const LARGE: usize = 64 * 1024;

/// `bytes` holding `data`; a large one is filled without the GIL.
pub(crate) fn new_bytes<'py>(py: Python<'py>, data: &[u8]) -> PyResult<Bound<'py, PyBytes>> {
    if data.len() < LARGE {
        return Ok(PyBytes::new(py, data));
    }
    // The new object is ours alone until returned, and `buf` is plain memory: nothing here needs
    // the GIL while the bytes are copied.
    PyBytes::new_with(py, data.len(), |buf| {
        py.detach(|| buf.copy_from_slice(data));
        Ok(())
    })
}

/// Copies `data` into `into` (a vector whose memory is reused when it is big enough: the
/// request's own, for a reply), without the GIL when it is large.
fn copy_into(py: Python<'_>, data: &[u8], into: Option<Vec<u8>>) -> Vec<u8> {
    match into {
        Some(mut v) if data.len() >= LARGE && v.capacity() >= data.len() => {
            v.clear();
            py.detach(|| v.extend_from_slice(data));
            v
        }
        _ if data.len() >= LARGE => py.detach(|| data.to_vec()),
        _ => data.to_vec(),
    }
}

/// What a handler returned, as reply bytes: `bytes`, `str` (sent as UTF-8), `bytearray` or
/// `memoryview`. `reuse`: a vector the reply may be copied into instead of a fresh one (a
/// large reply's fresh allocation costs a page fault per page; the request's vector, still
/// resident, does not). `Err` carries a message for the caller.
pub(crate) fn reply_bytes(obj: &Bound<'_, PyAny>, reuse: Option<Vec<u8>>) -> Result<Vec<u8>, String> {
    let py = obj.py();
    if let Ok(b) = obj.cast::<PyBytes>() {
        return Ok(copy_into(py, b.as_bytes(), reuse));
    }
    if let Ok(s) = obj.cast::<PyString>() {
        return s
            .to_cow()
            .map(|c| c.into_owned().into_bytes())
            .map_err(|e| format!("UnicodeEncodeError: the handler's reply is not valid text: {e}"));
    }
    if let Ok(b) = obj.cast::<PyByteArray>() {
        return Ok(b.to_vec());
    }
    if obj.is_instance_of::<PyMemoryView>() {
        if let Ok(b) = obj.call_method0("tobytes") {
            if let Ok(b) = b.cast::<PyBytes>() {
                return Ok(copy_into(py, b.as_bytes(), reuse));
            }
        }
    }
    Err(format!("TypeError: the handler returned {}; it must return bytes or str", type_name(obj)))
}

/// The `payload` and `limit` (seconds for the whole stream) arguments of `stream()`.
pub(crate) fn stream_args(
    payload: Option<&Bound<'_, PyAny>>,
    limit: Option<f64>,
) -> PyResult<(Option<PyBackedBytes>, Option<std::time::Duration>)> {
    let payload = payload.map(extract_payload).transpose()?;
    Ok((payload, limit.map(|l| crate::duration(l, "limit")).transpose()?))
}

pub(crate) fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "an object".to_owned())
}
