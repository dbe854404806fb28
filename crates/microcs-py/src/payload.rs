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

/// What a handler returned, as reply bytes: `bytes`, `str` (sent as UTF-8), `bytearray` or
/// `memoryview`. `Err` carries a message for the caller.
pub(crate) fn reply_bytes(obj: &Bound<'_, PyAny>) -> Result<Vec<u8>, String> {
    if let Ok(b) = obj.cast::<PyBytes>() {
        return Ok(b.as_bytes().to_vec());
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
                return Ok(b.as_bytes().to_vec());
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
