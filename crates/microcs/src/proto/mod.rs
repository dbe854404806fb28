//! The wire protocol, sans I/O: frame layout, limits, status codes, encode and decode.
//!
//! Nothing in this module touches a socket or a runtime. Besides the codec it holds the
//! connection state machines of both sides (crate-internal `server_conn` and `client_conn`),
//! which the blocking and tokio flavours drive with decoded frames: every protocol rule is
//! decided there, once. The exact byte layout and the rules are specified in
//! `docs/PROTOCOL.md`; the golden examples there are checked by this module's tests, codec and
//! state machines alike.
//!
//! A frame is a big-endian `u32` length of what follows, a fixed 20-byte [`Header`], an optional
//! method name and the payload:
//!
//! ```text
//! 0       4       5      6       8               16      18          20          24
//! +-------+-------+------+-------+---------------+-------+-----------+-----------+--------+---------+
//! |  len  |version| kind | flags |  request id   |status |method len |deadline ms| method | payload |
//! +-------+-------+------+-------+---------------+-------+-----------+-----------+--------+---------+
//! ```
//!
//! # Examples
//!
//! ```
//! use microcs::proto::{self, Decoded, Header, Kind};
//!
//! let mut buf = Vec::new();
//! proto::encode(&mut buf, &Header::request(7, 250), b"step", b"hello");
//! let frame = match proto::decode(&buf, proto::DEFAULT_MAX_PAYLOAD).unwrap() {
//!     Decoded::Frame(f) => f,
//!     Decoded::Incomplete { .. } => unreachable!(),
//! };
//! assert_eq!(frame.header.kind(), Some(Kind::Request));
//! assert_eq!(frame.header.id, 7);
//! assert_eq!(frame.method, b"step");
//! assert_eq!(frame.payload, b"hello");
//! assert_eq!(frame.len, buf.len());
//! // A partial frame is not an error: it asks for more bytes.
//! assert!(matches!(proto::decode(&buf[..10], proto::DEFAULT_MAX_PAYLOAD), Ok(Decoded::Incomplete { .. })));
//! ```

pub(crate) mod client_conn;
mod hello;
pub(crate) mod server_conn;
pub mod status;

pub use hello::{Credit, Hello, HelloAck};

use std::fmt;

/// Protocol version spoken by this crate; carried in every frame header.
pub const VERSION: u8 = 1;
/// Bytes in the length prefix.
pub const PREFIX_LEN: usize = 4;
/// Bytes in the fixed header that follows the length prefix.
pub const HEADER_LEN: usize = 20;
/// Bytes before the method name: length prefix plus header.
pub const FRAME_OVERHEAD: usize = PREFIX_LEN + HEADER_LEN;
/// Longest method name, in bytes.
pub const MAX_METHOD_LEN: usize = 64;
/// Default largest payload one frame may carry (16 MiB).
pub const DEFAULT_MAX_PAYLOAD: u32 = 16 * 1024 * 1024;
/// Payload limit each side applies before the handshake has told it the peer's: enough for
/// any handshake answer or refusal. A client also never decodes with a smaller limit than
/// this, whatever it announced, so short errors always get through (the server holds its
/// answers to the announced limit itself).
pub const HANDSHAKE_PAYLOAD: u32 = 64 * 1024;

/// Error frame flag: the server guarantees the request's handler did not run, so it is safe to
/// send it again (for example, the server was shutting down).
pub const FLAG_NOT_RUN: u16 = 0x0001;
/// Error frame flag: the error comes from microcs itself, not from the application's handler.
pub const FLAG_SYSTEM: u16 = 0x0002;
/// Request frame flag: the caller takes a stream of answers (`Item` frames, then an empty `Reply`
/// or an `Error`); sent only to servers whose `HelloAck` announces [`FEATURE_STREAMS`].
pub const FLAG_STREAM: u16 = 0x0004;
/// Every flag bit this version defines. `FLAG_NOT_RUN` and `FLAG_SYSTEM` mean something only on
/// `Error` frames, `FLAG_STREAM` only on `Request` frames: a server refuses a `Request` with any
/// other flag set, and receivers ignore the flags of other frames.
pub const KNOWN_FLAGS: u16 = FLAG_NOT_RUN | FLAG_SYSTEM | FLAG_STREAM;

/// `HelloAck` feature bit: this server takes stream requests (docs/PROTOCOL.md § 17).
pub const FEATURE_STREAMS: u32 = 0x1;
/// `Hello`/`HelloAck` feature bit: frames move over shared memory after the handshake (asked by
/// the client, chosen by the server per connection; docs/PROTOCOL.md § 18).
pub const FEATURE_SHM: u32 = 0x2;
/// Items a stream's caller lets the server send ahead by default (the window's count).
pub const DEFAULT_WINDOW_ITEMS: u32 = 64;
/// Bytes a stream's caller lets the server send ahead by default (the window's size).
pub const DEFAULT_WINDOW_BYTES: u32 = 1024 * 1024;

/// What a frame is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    /// Client → server, first frame on a connection: version and the client's limits.
    Hello = 1,
    /// Server → client, answer to `Hello`: the server's limits and identity.
    HelloAck = 2,
    /// Client → server: call the method (or the default handler) with the payload.
    Request = 3,
    /// Server → client: the handler's answer to the request with the same id.
    Reply = 4,
    /// Server → client: the request with this id (or, with id 0, the connection) failed; status,
    /// flags and a UTF-8 message. A server answers an `Error` it receives with one of its own.
    Error = 5,
    /// Client → server: the caller gave up on the request with this id.
    Cancel = 6,
    /// Client → server: are you there? Answered at once by `Pong` with the same id and payload.
    /// (This version's server never sends one, and the blocking client does not answer one.)
    Ping = 7,
    /// Answer to `Ping`.
    Pong = 8,
    /// Server → client: one item of the stream answering the request with this id.
    Item = 9,
    /// Client → server: room for more items of the stream with this id (`u32` items, `u32`
    /// bytes).
    Credit = 10,
}

impl Kind {
    /// The kind for a raw header byte, if this version defines it.
    pub fn from_u8(raw: u8) -> Option<Kind> {
        Some(match raw {
            1 => Kind::Hello,
            2 => Kind::HelloAck,
            3 => Kind::Request,
            4 => Kind::Reply,
            5 => Kind::Error,
            6 => Kind::Cancel,
            7 => Kind::Ping,
            8 => Kind::Pong,
            9 => Kind::Item,
            10 => Kind::Credit,
            _ => return None,
        })
    }
}

/// The fixed 20-byte frame header.
///
/// `kind` is kept raw so that a frame of a kind this version does not know still decodes (framing
/// stays intact) and can be answered with an error instead of killing the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Protocol version; [`VERSION`] for frames this crate writes.
    pub version: u8,
    /// Raw frame kind; see [`Header::kind`].
    pub kind: u8,
    /// Flag bits ([`FLAG_NOT_RUN`], [`FLAG_SYSTEM`]); others must be zero.
    pub flags: u16,
    /// Request id chosen by the client, echoed in the reply; 0 for connection-level frames.
    pub id: u64,
    /// Status code of an `Error` frame (see [`status`]); 0 otherwise.
    pub status: u16,
    /// Time the caller still waits for a `Request`, in milliseconds; 0 means no deadline.
    pub deadline_ms: u32,
}

impl Header {
    /// A header of the given kind and id, everything else zero.
    pub const fn new(kind: Kind, id: u64) -> Header {
        Header { version: VERSION, kind: kind as u8, flags: 0, id, status: 0, deadline_ms: 0 }
    }

    /// A `Request` header with the caller's remaining time in milliseconds (0 = none).
    pub const fn request(id: u64, deadline_ms: u32) -> Header {
        Header { deadline_ms, ..Header::new(Kind::Request, id) }
    }

    /// An `Error` header with a status code and flags.
    pub const fn error(id: u64, status: u16, flags: u16) -> Header {
        Header { status, flags, ..Header::new(Kind::Error, id) }
    }

    /// The frame kind, or `None` when this version does not define it.
    pub fn kind(&self) -> Option<Kind> {
        Kind::from_u8(self.kind)
    }

    /// Reads the fixed header (the 20 bytes after the length prefix) as they are, with the
    /// method length it declares; nothing is checked here ([`decode`] checks).
    pub fn from_wire(h: &[u8; HEADER_LEN]) -> (Header, u16) {
        let header = Header {
            version: h[0],
            kind: h[1],
            flags: u16::from_be_bytes([h[2], h[3]]),
            id: u64::from_be_bytes([h[4], h[5], h[6], h[7], h[8], h[9], h[10], h[11]]),
            status: u16::from_be_bytes([h[12], h[13]]),
            deadline_ms: u32::from_be_bytes([h[16], h[17], h[18], h[19]]),
        };
        (header, u16::from_be_bytes([h[14], h[15]]))
    }

    /// Writes the length prefix and header for a frame with this method and payload length.
    ///
    /// # Panics
    ///
    /// If `method` is longer than [`MAX_METHOD_LEN`] or the frame would not fit a `u32` length;
    /// callers check both against their limits first.
    pub fn to_bytes(&self, method_len: usize, payload_len: usize) -> [u8; FRAME_OVERHEAD] {
        assert!(method_len <= MAX_METHOD_LEN, "method name longer than {MAX_METHOD_LEN} bytes");
        let len =
            u32::try_from(HEADER_LEN + method_len + payload_len).expect("frame longer than u32::MAX bytes");
        let mut b = [0u8; FRAME_OVERHEAD];
        b[0..4].copy_from_slice(&len.to_be_bytes());
        b[4] = self.version;
        b[5] = self.kind;
        b[6..8].copy_from_slice(&self.flags.to_be_bytes());
        b[8..16].copy_from_slice(&self.id.to_be_bytes());
        b[16..18].copy_from_slice(&self.status.to_be_bytes());
        b[18..20].copy_from_slice(&(method_len as u16).to_be_bytes());
        b[20..24].copy_from_slice(&self.deadline_ms.to_be_bytes());
        b
    }
}

/// One decoded frame, borrowing its method and payload from the input buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    /// The fixed header.
    pub header: Header,
    /// Method name bytes (empty: the default handler). Not yet checked to be valid UTF-8.
    pub method: &'a [u8],
    /// Payload bytes.
    pub payload: &'a [u8],
    /// Bytes of input this frame used, length prefix included.
    pub len: usize,
}

/// What [`decode`] found at the start of the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// A whole frame.
    Frame(Frame<'a>),
    /// Not a whole frame yet: at least `needed` bytes in all are required (not an error).
    Incomplete {
        /// Total bytes the buffer must hold before decoding can make progress.
        needed: usize,
    },
}

/// Why bytes could not be decoded as a frame. After any of these the byte stream cannot be
/// trusted, so the connection answers with an `Error` frame and closes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// The declared size is over the connection's limit; found before allocating anything.
    TooLarge {
        /// Payload bytes the frame declares (or its whole length, when the header is not in yet).
        declared: u64,
        /// The connection's payload limit.
        limit: u32,
    },
    /// The length prefix is shorter than the fixed header.
    TooShort {
        /// The declared length.
        len: u32,
    },
    /// A protocol version this crate does not speak.
    UnsupportedVersion {
        /// The version byte received.
        version: u8,
    },
    /// The method length is over [`MAX_METHOD_LEN`] or past the end of the frame.
    BadMethodLength {
        /// The declared method length.
        method_len: u16,
    },
}

impl DecodeError {
    /// The status code to put in the `Error` frame sent before closing.
    pub fn status(&self) -> u16 {
        match self {
            DecodeError::TooLarge { .. } => status::TOO_LARGE,
            DecodeError::UnsupportedVersion { .. } => status::VERSION_UNSUPPORTED,
            DecodeError::TooShort { .. } | DecodeError::BadMethodLength { .. } => status::BAD_REQUEST,
        }
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::TooLarge { declared, limit } => {
                write!(f, "frame of {declared} bytes is over the limit of {limit} bytes")
            }
            DecodeError::TooShort { len } => {
                write!(f, "frame length {len} is shorter than the {HEADER_LEN}-byte header")
            }
            DecodeError::UnsupportedVersion { version } => {
                write!(f, "protocol version {version} is not supported (this side speaks {VERSION})")
            }
            DecodeError::BadMethodLength { method_len } => {
                write!(f, "method name length {method_len} is over {MAX_METHOD_LEN} or past the frame's end")
            }
        }
    }
}

impl std::error::Error for DecodeError {}

/// Decodes the frame at the start of `buf`, allowing payloads of up to `max_payload` bytes.
///
/// Never panics and never allocates: sizes are checked against `max_payload` as soon as the
/// length prefix (and then the header) is in, so the caller can refuse a giant frame before it
/// reserves memory for it.
///
/// # Errors
///
/// A [`DecodeError`] when the bytes cannot be a valid frame of this version.
pub fn decode(buf: &[u8], max_payload: u32) -> Result<Decoded<'_>, DecodeError> {
    let Some(prefix) = buf.get(..PREFIX_LEN) else {
        return Ok(Decoded::Incomplete { needed: FRAME_OVERHEAD });
    };
    let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]);
    if (len as usize) < HEADER_LEN {
        return Err(DecodeError::TooShort { len });
    }
    if u64::from(len) > (HEADER_LEN + MAX_METHOD_LEN) as u64 + u64::from(max_payload) {
        return Err(DecodeError::TooLarge { declared: u64::from(len), limit: max_payload });
    }
    let Some(h) = buf.get(PREFIX_LEN..FRAME_OVERHEAD) else {
        return Ok(Decoded::Incomplete { needed: FRAME_OVERHEAD });
    };
    let (header, method_len) = Header::from_wire(h.try_into().expect("HEADER_LEN bytes"));
    if header.version != VERSION {
        return Err(DecodeError::UnsupportedVersion { version: header.version });
    }
    let body_len = len as usize - HEADER_LEN;
    if method_len as usize > MAX_METHOD_LEN || method_len as usize > body_len {
        return Err(DecodeError::BadMethodLength { method_len });
    }
    let payload_len = body_len - method_len as usize;
    if payload_len as u64 > u64::from(max_payload) {
        return Err(DecodeError::TooLarge { declared: payload_len as u64, limit: max_payload });
    }
    let total = PREFIX_LEN + len as usize;
    let Some(body) = buf.get(FRAME_OVERHEAD..total) else {
        return Ok(Decoded::Incomplete { needed: total });
    };
    let (method, payload) = body.split_at(method_len as usize);
    Ok(Decoded::Frame(Frame { header, method, payload, len: total }))
}

/// Appends one whole frame to `out`.
///
/// # Panics
///
/// As [`Header::to_bytes`]: callers check the method and payload against their limits first.
pub fn encode(out: &mut Vec<u8>, header: &Header, method: &[u8], payload: &[u8]) {
    out.reserve(FRAME_OVERHEAD + method.len() + payload.len());
    out.extend_from_slice(&header.to_bytes(method.len(), payload.len()));
    out.extend_from_slice(method);
    out.extend_from_slice(payload);
}

/// The `deadline_ms` field for a caller that still waits `remaining`: milliseconds, rounded up,
/// at least 1 (0 on the wire means "no deadline", which a caller with a timeout never sends).
///
/// Rounding up makes the receiver's deadline ([`deadline_at`], counted from when the frame
/// arrived) never earlier than the caller's own.
///
/// ```
/// use std::time::Duration;
/// assert_eq!(microcs::proto::deadline_ms(Duration::from_micros(1500)), 2);
/// assert_eq!(microcs::proto::deadline_ms(Duration::ZERO), 1);
/// ```
pub fn deadline_ms(remaining: std::time::Duration) -> u32 {
    let ms = remaining.as_micros().div_ceil(1000);
    u32::try_from(ms).unwrap_or(u32::MAX).max(1)
}

/// When a request whose header carries `deadline_ms` stops being waited for, counted from
/// `arrived` (any clock: `std` or tokio `Instant`); `None` for 0, no deadline.
pub fn deadline_at<I: std::ops::Add<std::time::Duration, Output = I>>(
    arrived: I,
    deadline_ms: u32,
) -> Option<I> {
    (deadline_ms != 0).then(|| arrived + std::time::Duration::from_millis(u64::from(deadline_ms)))
}

/// Checks a method name: 1 to [`MAX_METHOD_LEN`] bytes of `[A-Za-z0-9_.-]`, optionally after one
/// leading `$` (reserved for built-in methods such as `$ping`).
///
/// # Errors
///
/// A message saying what is allowed.
pub fn check_method(method: &str) -> Result<(), String> {
    let body = method.strip_prefix('$').unwrap_or(method);
    if body.is_empty() || method.len() > MAX_METHOD_LEN {
        return Err(format!(
            "method name {method:?} must be 1 to {MAX_METHOD_LEN} bytes of letters, digits, '_', '-' or '.'"
        ));
    }
    if let Some(bad) = body.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))) {
        return Err(format!(
            "method name {method:?} contains {bad:?}; only letters, digits, '_', '-' and '.' are allowed"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod core_tests;
#[cfg(test)]
mod tests;
