//! Bodies of the handshake frames.

use super::FEATURE_SHM;

/// Body of the client's `Hello` frame.
///
/// Layout: `u32` largest reply payload the client accepts, then (optional, only written when
/// non-zero) `u32` features the client can use. Longer bodies are accepted and the extra bytes
/// ignored, so later versions can add fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Hello {
    /// Largest reply payload, in bytes, the client will accept.
    pub max_payload: u32,
    /// What the client can use (`FEATURE_*` bits); 0 when the field is absent.
    pub features: u32,
}

impl Hello {
    /// Encoded length of the mandatory part of the body.
    pub const LEN: usize = 4;

    /// The body bytes (the features only when non-zero).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = self.max_payload.to_be_bytes().to_vec();
        if self.features != 0 {
            b.extend_from_slice(&self.features.to_be_bytes());
        }
        b
    }

    /// Parses a body; `None` if it is too short.
    pub fn parse(b: &[u8]) -> Option<Hello> {
        Some(Hello { max_payload: be32(b, 0)?, features: be32(b, 4).unwrap_or(0) })
    }
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at.checked_add(4)?)?.try_into().ok()?))
}

/// Body of the server's `HelloAck` frame.
///
/// Layout: `u32` largest request payload the server accepts, `u32` requests it runs at once per
/// connection, `u32` server pid, `u16` length of the service name, the name (UTF-8), then `u32`
/// feature bits ([`FEATURE_STREAMS`](super::FEATURE_STREAMS) announced, [`FEATURE_SHM`] chosen for this connection; an
/// older server sends no feature field, read as 0), and when they include [`FEATURE_SHM`], `u32`
/// ring capacity. Bytes after those are accepted and ignored, so later versions can add fields.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HelloAck {
    /// Largest request payload, in bytes, the server will accept.
    pub max_payload: u32,
    /// Requests the server runs at once on one connection; more wait unread (backpressure).
    pub max_in_flight: u32,
    /// The server's process id.
    pub pid: u32,
    /// The service name the server owns.
    pub name: String,
    /// Feature bits: [`FEATURE_STREAMS`](super::FEATURE_STREAMS) (the server takes streams) and [`FEATURE_SHM`] (this
    /// connection moves to shared memory; only when the client offered it). 0 when absent.
    pub features: u32,
    /// Bytes of each shared-memory ring; meaningful (and on the wire) only with [`FEATURE_SHM`].
    pub ring_capacity: u32,
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
        let mut b = Vec::with_capacity(Self::FIXED_LEN + self.name.len() + 8);
        b.extend_from_slice(&self.max_payload.to_be_bytes());
        b.extend_from_slice(&self.max_in_flight.to_be_bytes());
        b.extend_from_slice(&self.pid.to_be_bytes());
        b.extend_from_slice(&name_len.to_be_bytes());
        b.extend_from_slice(self.name.as_bytes());
        b.extend_from_slice(&self.features.to_be_bytes());
        if self.features & FEATURE_SHM != 0 {
            b.extend_from_slice(&self.ring_capacity.to_be_bytes());
        }
        b
    }

    /// Parses a body; `None` if it is too short, the name is not UTF-8, or [`FEATURE_SHM`] is
    /// set without a ring capacity.
    pub fn parse(b: &[u8]) -> Option<HelloAck> {
        let name_len = u16::from_be_bytes(b.get(12..14)?.try_into().ok()?) as usize;
        let end = Self::FIXED_LEN + name_len;
        let name = b.get(Self::FIXED_LEN..end)?;
        let features = be32(b, end).unwrap_or(0);
        let ring_capacity = if features & FEATURE_SHM != 0 { be32(b, end + 4)? } else { 0 };
        Some(HelloAck {
            max_payload: be32(b, 0)?,
            max_in_flight: be32(b, 4)?,
            pid: be32(b, 8)?,
            name: std::str::from_utf8(name).ok()?.to_owned(),
            features,
            ring_capacity,
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
