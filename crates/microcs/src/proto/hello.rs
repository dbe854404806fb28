//! Bodies of the handshake frames.

/// Body of the client's `Hello` frame.
///
/// Layout: `u32` largest reply payload the client accepts. Longer bodies are accepted and the
/// extra bytes ignored, so later versions can add fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    /// Largest reply payload, in bytes, the client will accept.
    pub max_payload: u32,
}

impl Hello {
    /// Encoded length of this version's body.
    pub const LEN: usize = 4;

    /// The body bytes.
    pub fn to_bytes(&self) -> [u8; Self::LEN] {
        self.max_payload.to_be_bytes()
    }

    /// Parses a body; `None` if it is too short.
    pub fn parse(b: &[u8]) -> Option<Hello> {
        Some(Hello { max_payload: u32::from_be_bytes(b.get(..4)?.try_into().ok()?) })
    }
}

/// Body of the server's `HelloAck` frame.
///
/// Layout: `u32` largest request payload the server accepts, `u32` requests it runs at once per
/// connection, `u32` server pid, `u16` length of the service name, the name (UTF-8), then `u32`
/// feature bits ([`FEATURE_STREAMS`](super::FEATURE_STREAMS)); an older server sends no feature
/// field (read as 0). Bytes after that are accepted and ignored, so later versions can add
/// fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloAck {
    /// Largest request payload, in bytes, the server will accept.
    pub max_payload: u32,
    /// Requests the server runs at once on one connection; more wait unread (backpressure).
    pub max_in_flight: u32,
    /// The server's process id.
    pub pid: u32,
    /// The service name the server owns.
    pub name: String,
    /// Optional protocol features the server supports (0 from servers that predate them).
    pub features: u32,
}

impl HelloAck {
    /// Length of the fixed part of the body (before the name's bytes).
    pub const FIXED_LEN: usize = 14;

    /// The body bytes.
    ///
    /// # Panics
    ///
    /// If the name is longer than 65535 bytes (service names are at most 64).
    pub fn to_bytes(&self) -> Vec<u8> {
        let name_len = u16::try_from(self.name.len()).expect("service name longer than 65535 bytes");
        let mut b = Vec::with_capacity(Self::FIXED_LEN + self.name.len() + 4);
        b.extend_from_slice(&self.max_payload.to_be_bytes());
        b.extend_from_slice(&self.max_in_flight.to_be_bytes());
        b.extend_from_slice(&self.pid.to_be_bytes());
        b.extend_from_slice(&name_len.to_be_bytes());
        b.extend_from_slice(self.name.as_bytes());
        b.extend_from_slice(&self.features.to_be_bytes());
        b
    }

    /// Parses a body; `None` if it is too short or the name is not UTF-8.
    pub fn parse(b: &[u8]) -> Option<HelloAck> {
        let word = |i: usize| Some(u32::from_be_bytes(b.get(i..i + 4)?.try_into().ok()?));
        let name_len = u16::from_be_bytes(b.get(12..14)?.try_into().ok()?) as usize;
        let name = b.get(Self::FIXED_LEN..Self::FIXED_LEN + name_len)?;
        Some(HelloAck {
            max_payload: word(0)?,
            max_in_flight: word(4)?,
            pid: word(8)?,
            name: std::str::from_utf8(name).ok()?.to_owned(),
            // Absent (or cut short) from older servers: no optional features.
            features: word(Self::FIXED_LEN + name_len).unwrap_or(0),
        })
    }
}

/// Body of a `Credit` frame: more room the caller grants a stream.
///
/// Layout: `u32` items, `u32` bytes. Longer bodies are accepted and the extra bytes ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credit {
    /// More items the server may send.
    pub items: u32,
    /// More payload bytes the server may send.
    pub bytes: u32,
}

impl Credit {
    /// Encoded length of this version's body.
    pub const LEN: usize = 8;

    /// The body bytes.
    pub fn to_bytes(&self) -> [u8; Self::LEN] {
        let mut b = [0; Self::LEN];
        b[..4].copy_from_slice(&self.items.to_be_bytes());
        b[4..].copy_from_slice(&self.bytes.to_be_bytes());
        b
    }

    /// Parses a body; `None` if it is too short.
    pub fn parse(b: &[u8]) -> Option<Credit> {
        let word = |i: usize| Some(u32::from_be_bytes(b.get(i..i + 4)?.try_into().ok()?));
        Some(Credit { items: word(0)?, bytes: word(4)? })
    }
}
