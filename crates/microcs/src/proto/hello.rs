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
/// connection, `u32` server pid, then the service name (UTF-8, to the end of the body).
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
}

impl HelloAck {
    /// Length of the fixed part of the body.
    pub const FIXED_LEN: usize = 12;

    /// The body bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(Self::FIXED_LEN + self.name.len());
        b.extend_from_slice(&self.max_payload.to_be_bytes());
        b.extend_from_slice(&self.max_in_flight.to_be_bytes());
        b.extend_from_slice(&self.pid.to_be_bytes());
        b.extend_from_slice(self.name.as_bytes());
        b
    }

    /// Parses a body; `None` if it is too short or the name is not UTF-8.
    pub fn parse(b: &[u8]) -> Option<HelloAck> {
        let word = |i: usize| Some(u32::from_be_bytes(b.get(i..i + 4)?.try_into().ok()?));
        Some(HelloAck {
            max_payload: word(0)?,
            max_in_flight: word(4)?,
            pid: word(8)?,
            name: std::str::from_utf8(&b[Self::FIXED_LEN..]).ok()?.to_owned(),
        })
    }
}
