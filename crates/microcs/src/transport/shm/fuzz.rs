//! The reading side of a shared-memory connection driven by a hostile peer's script, for the
//! `ring` cargo-fuzz target and its corpus replay in `cargo test` (`fuzz/checks.rs`).
//!
//! A real server-side [`ShmLink`] (region, seals, eventfds) reads ring A through the same calls
//! the servers make (`try_recv` into the shared [`ReadBuf`], then the codec), while the script
//! plays the client: it writes bytes into ring A as a writer would, sets its index to anything,
//! and scribbles over any byte of the region, between reads. Whatever it does, reading must end
//! in frames, a decode error, or a corrupt-ring error — never a panic, an access outside the
//! mapping, a read of more than was published, or memory beyond what the peer sent.

use std::io;
use std::sync::atomic::Ordering;

use super::ShmLink;
use super::ring::HEADER_LEN;
use crate::io::{Filled, ReadBuf, Source};
use crate::proto::{self, Decoded};

/// Ring capacity of the fuzzed region (the smallest allowed: wraps come often).
pub const CAPACITY: u32 = 4096;
/// Offset of ring A's control block (its `tail` is the first word).
const CTL_A: usize = 1024;
/// Largest payload the fuzzed reader accepts (small, so that limits are hit too).
pub const MAX_PAYLOAD: u32 = 64 * 1024;

/// What a scripted run read.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RingRun {
    /// Bytes the reader took out of the ring.
    pub bytes_read: u64,
    /// Bytes the script's honest writes put in (hostile index changes not counted).
    pub bytes_written: u64,
    /// The script moved the index itself (then `bytes_read` is not bounded by the writes).
    pub index_forged: bool,
    /// Whole frames decoded.
    pub frames: usize,
    /// The most memory the read buffer held at once, in bytes.
    pub buffer_high_water: usize,
    /// How reading ended: `None` (the script ended, everything decoded or waiting for bytes),
    /// or the error, as text.
    pub error: Option<String>,
    /// The error was the transport's (a corrupt ring: `InvalidData`), not the codec's.
    pub corrupt: bool,
}

/// Runs `script` against a fresh region; see the module docs. The script is a sequence of
/// operations, each a tag byte and its operands (missing operand bytes read as 0):
///
/// - `0 n bytes…`: the peer writes `n` (0–255) bytes at its tail, then publishes the new tail;
/// - `1 u64`: the peer sets its tail to any value (little-endian);
/// - `2 u16 byte`: the peer writes one byte anywhere in the region (offset modulo its size);
/// - `3 n`: the reader reads once with a buffer room of `n + 1` bytes and decodes what it can;
/// - anything else: the reader reads until the ring is empty.
///
/// # Errors
///
/// When the region cannot be created (no memfd on this system).
#[doc(hidden)]
pub fn run_script(script: &[u8]) -> io::Result<RingRun> {
    let (link, _memfd) = ShmLink::offer(CAPACITY)?;
    let map = &link.map;
    let len = map.len();
    let mut run = RingRun::default();
    let mut tail = 0u64;
    let mut rbuf = ReadBuf::default();
    let mut c = Cursor { script, at: 0 };
    while c.at < script.len() {
        let op = c.take(1)[0];
        let step = match op {
            0 => {
                let n = usize::from(c.take(1)[0]);
                let room = u64::from(CAPACITY).saturating_sub(tail.wrapping_sub(link.rx.position()));
                for _ in 0..n.min(room as usize) {
                    let b = c.take(1)[0];
                    map.copy_in(HEADER_LEN + (tail as usize & (CAPACITY as usize - 1)), &[b]);
                    tail = tail.wrapping_add(1);
                    run.bytes_written += 1;
                }
                map.u64_at(CTL_A).store(tail, Ordering::Release);
                None
            }
            1 => {
                tail = u64::from_le_bytes(c.take(8));
                run.index_forged = true;
                map.u64_at(CTL_A).store(tail, Ordering::Release);
                None
            }
            2 => {
                let [lo, hi, ..] = c.take(2);
                let off = usize::from(u16::from_le_bytes([lo, hi])) % len;
                let b = c.take(1)[0];
                if (CTL_A..CTL_A + 8).contains(&off) {
                    run.index_forged = true;
                }
                map.copy_in(off, &[b]);
                None
            }
            3 => Some(Some(usize::from(c.take(1)[0]) + 1)),
            _ => Some(None),
        };
        if let Some(room) = step {
            if let Err(e) = read(&link, &mut rbuf, room, &mut run) {
                run.corrupt = e.kind() == io::ErrorKind::InvalidData;
                run.error = Some(e.to_string());
                return Ok(run);
            }
            if run.error.is_some() {
                return Ok(run);
            }
        }
    }
    if let Err(e) = read(&link, &mut rbuf, None, &mut run) {
        run.corrupt = e.kind() == io::ErrorKind::InvalidData;
        run.error = Some(e.to_string());
    }
    Ok(run)
}

/// Reads (once with at most `room` bytes, or until the ring is empty) and decodes frames as a
/// server does; a decode error ends the run (recorded in `run`).
fn read(link: &ShmLink, rbuf: &mut ReadBuf, room: Option<usize>, run: &mut RingRun) -> io::Result<()> {
    loop {
        let needed = loop {
            match rbuf.decode(MAX_PAYLOAD) {
                Ok(Decoded::Frame(f)) => {
                    let len = f.len;
                    run.frames += 1;
                    rbuf.consume(len);
                }
                Ok(Decoded::Incomplete { needed }) => break needed,
                Err(e) => {
                    run.error = Some(e.to_string());
                    return Ok(());
                }
            }
        };
        let mut src = Limited { link, room, read: 0 };
        let filled = rbuf.fill_from(needed.min(proto::FRAME_OVERHEAD + MAX_PAYLOAD as usize + 64), &mut src);
        run.bytes_read += src.read as u64;
        run.buffer_high_water = run.buffer_high_water.max(rbuf.held());
        match filled {
            Ok(Filled::Data) if room.is_none() => {}
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

/// The ring as a [`Source`], each read given at most `room` bytes.
struct Limited<'a> {
    link: &'a ShmLink,
    room: Option<usize>,
    read: usize,
}

impl Source for Limited<'_> {
    fn read_into(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.room.map_or(buf.len(), |r| r.min(buf.len()));
        let got = self.link.try_recv(&mut buf[..n])?;
        self.read += got;
        Ok(got)
    }

    fn read_spare(&mut self, v: &mut Vec<u8>) -> io::Result<usize> {
        let before = v.len();
        if let Some(r) = self.room {
            v.reserve(r);
        }
        let got = self.link.try_recv_spare(v)?;
        debug_assert_eq!(v.len(), before + got);
        self.read += got;
        Ok(got)
    }
}

/// Reads the script's operands; bytes past its end read as 0.
struct Cursor<'a> {
    script: &'a [u8],
    at: usize,
}

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> [u8; 8] {
        let mut out = [0u8; 8];
        for b in out.iter_mut().take(n) {
            *b = self.script.get(self.at).copied().unwrap_or(0);
            self.at += 1;
        }
        out
    }
}
