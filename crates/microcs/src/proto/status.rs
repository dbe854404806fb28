//! Status codes carried by `Error` frames.
//!
//! They follow HTTP's meanings, as NATS micro services do for `Nats-Service-Error-Code`, so one
//! number means the same thing locally and on NATS. A handler may send any code it likes with
//! [`RemoteError::new`](crate::RemoteError::new); the library's own errors carry
//! [`FLAG_SYSTEM`](super::FLAG_SYSTEM) so the two never get confused.

/// The frame was malformed or broke a protocol rule (unknown kind or flags, duplicate id, ...).
pub const BAD_REQUEST: u16 = 400;
/// The peer is not allowed to use this service (another user).
pub const PERMISSION_DENIED: u16 = 403;
/// The service has no method of that name.
pub const NO_METHOD: u16 = 404;
/// The request's deadline passed on the server.
pub const TIMED_OUT: u16 = 408;
/// A frame or payload over the receiver's limit.
pub const TOO_LARGE: u16 = 413;
/// The caller cancelled the request.
pub const CANCELLED: u16 = 499;
/// The handler failed (returned an error without a code of its own, or panicked).
pub const HANDLER_FAILED: u16 = 500;
/// The server is at a limit (connections, requests in flight) or shutting down.
pub const BUSY: u16 = 503;
/// The frame's protocol version is not spoken here.
pub const VERSION_UNSUPPORTED: u16 = 505;

/// A short lower-case phrase for a status code, for messages.
pub fn reason(code: u16) -> &'static str {
    match code {
        BAD_REQUEST => "bad request",
        PERMISSION_DENIED => "permission denied",
        NO_METHOD => "no such method",
        TIMED_OUT => "timed out",
        TOO_LARGE => "too large",
        CANCELLED => "cancelled",
        HANDLER_FAILED => "handler failed",
        BUSY => "busy",
        VERSION_UNSUPPORTED => "version not supported",
        _ => "error",
    }
}
