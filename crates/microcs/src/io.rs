//! I/O plumbing both flavours share, whatever the transport: the read buffer (memory follows
//! the bytes received, never a declared size), the [`Source`] it reads from, the request-id map,
//! and the classification of I/O errors.
//!
//! Nothing here knows a protocol rule (that is [`crate::proto`]) or a runtime: the blocking
//! flavour reads with blocking calls, the tokio flavour through a non-blocking [`Source`].

use std::io;

use crate::proto::{self, DecodeError, Decoded, Header};

/// First allocation for a connection's read buffer.
const INITIAL_CAPACITY: usize = 8 * 1024;
/// An empty buffer larger than this is given back after use, so an idle connection that once
/// carried a big frame does not keep its memory.
const KEEP_CAPACITY: usize = 256 * 1024;

/// Payloads at least this large are read straight into a vector of their own, which then
/// becomes the request's (or reply's) payload without being copied.
pub(crate) const LARGE_PAYLOAD: usize = 64 * 1024;

/// Largest vector kept for reuse by a large payload ([`ReadBuf::recycle`], and the blocking
/// server's one spare vector).
pub(crate) const SPARE_MAX: usize = 16 * 1024 * 1024;

/// Bytes received but not yet decoded. The valid bytes are `buf[start..end]`; a frame with a
/// large payload is read into [`Large`] instead.
#[derive(Debug, Default)]
pub(crate) struct ReadBuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    large: Option<Large>,
    /// A vector given back for the next large payload to be read into (see
    /// [`recycle`](Self::recycle)); empty when there is none.
    spare: Vec<u8>,
}

/// A frame whose payload is read directly into its own vector.
///
/// The vector is reserved at the declared size (already checked against the limit), but the
/// reservation is only address space: pages become resident as the peer's bytes arrive, so
/// memory still follows what was received, not what was declared.
#[derive(Debug)]
struct Large {
    header: Header,
    method: Vec<u8>,
    payload: Vec<u8>,
    /// Payload bytes the frame declares.
    want: usize,
    /// Whole frame length, length prefix included.
    total: usize,
}

/// Where [`ReadBuf`] gets bytes from.
pub(crate) trait Source {
    /// Reads into `buf`; 0 means end of stream.
    fn read_into(&mut self, buf: &mut [u8]) -> io::Result<usize>;

    /// Reads into `v`'s spare capacity, extending its length; 0 means end of stream. The default
    /// zero-fills first; sources that can read into uninitialised memory override it.
    fn read_spare(&mut self, v: &mut Vec<u8>) -> io::Result<usize> {
        let len = v.len();
        let room = (v.capacity() - len).max(1);
        v.resize(len + room, 0);
        let r = self.read_into(&mut v[len..]);
        v.truncate(len + *r.as_ref().unwrap_or(&0));
        r
    }
}

impl<T: crate::transport::Transport> Source for &T {
    fn read_into(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.recv(buf)
    }

    fn read_spare(&mut self, v: &mut Vec<u8>) -> io::Result<usize> {
        self.recv_spare(v)
    }
}

/// Outcome of one `fill`.
pub(crate) enum Filled {
    /// Read some bytes.
    Data,
    /// The peer closed its side.
    Eof,
}

impl ReadBuf {
    /// Decodes the frame at the front, if a whole one is buffered.
    pub(crate) fn decode(&self, max_payload: u32) -> Result<Decoded<'_>, DecodeError> {
        match &self.large {
            Some(l) if l.payload.len() == l.want => Ok(Decoded::Frame(proto::Frame {
                header: l.header,
                method: &l.method,
                payload: &l.payload,
                len: l.total,
            })),
            Some(l) => Ok(Decoded::Incomplete { needed: l.total }),
            None => proto::decode(&self.buf[self.start..self.end], max_payload),
        }
    }

    /// True while the frame at the front is a large one (see [`take_payload`](Self::take_payload)).
    pub(crate) fn is_large(&self) -> bool {
        self.large.is_some()
    }

    /// Moves the payload of the decoded large frame out, without copying; `None` for frames in
    /// the ordinary buffer (borrow those from [`decode`](Self::decode)). Call before `consume`.
    pub(crate) fn take_payload(&mut self) -> Option<Vec<u8>> {
        match &mut self.large {
            Some(l) if l.payload.len() == l.want => Some(std::mem::take(&mut l.payload)),
            _ => None,
        }
    }

    /// Switches to reading the frame at the front into its own payload vector when its header
    /// (checked by `decode`) declares a large payload and its method name is in.
    fn start_large(&mut self) {
        let held = &self.buf[self.start..self.end];
        let Some(h) = held.get(..proto::FRAME_OVERHEAD) else { return };
        let len = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize;
        let method_len = u16::from_be_bytes([h[18], h[19]]) as usize;
        let Some(payload_len) = len.checked_sub(proto::HEADER_LEN + method_len) else { return };
        let body = proto::FRAME_OVERHEAD + method_len;
        if payload_len < LARGE_PAYLOAD || held.len() < body || held.len() >= proto::PREFIX_LEN + len {
            return;
        }
        let (header, _) = Header::from_wire(h[proto::PREFIX_LEN..].try_into().expect("HEADER_LEN bytes"));
        // Memory already ours and touched, if it is big enough: a fresh allocation of this size
        // comes from the system (`mmap`, or a heap top the allocator trims again), and every page
        // of it then costs a page fault, ~2 µs each on a VM: 0.5 ms per MiB.
        // Not one more than twice the size: the vector becomes the handler's (or caller's), which
        // may keep it, and should not keep much more memory than its payload needs.
        let spare = std::mem::take(&mut self.spare);
        let mut payload = if (payload_len..=payload_len.saturating_mul(2)).contains(&spare.capacity()) {
            spare
        } else {
            Vec::with_capacity(payload_len)
        };
        payload.extend_from_slice(&held[body..]);
        let method = held[proto::FRAME_OVERHEAD..body].to_vec();
        self.large =
            Some(Large { header, method, payload, want: payload_len, total: proto::PREFIX_LEN + len });
        self.start = 0;
        self.end = 0;
    }

    /// True when the frame at the front declares a large payload that a [`recycle`](Self::recycle)d
    /// vector could take: its header is in, its payload not started yet.
    pub(crate) fn wants_spare(&self) -> bool {
        if self.large.is_some() || self.spare.capacity() > 0 {
            return false;
        }
        let held = &self.buf[self.start..self.end];
        let Some(h) = held.get(..proto::FRAME_OVERHEAD) else { return false };
        let len = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize;
        let method_len = u16::from_be_bytes([h[18], h[19]]) as usize;
        let payload = len.checked_sub(proto::HEADER_LEN + method_len);
        payload.is_some_and(|p| p >= LARGE_PAYLOAD) && held.len() < proto::PREFIX_LEN + len
    }

    /// Keeps `v`'s memory for the next large payload (one vector at a time, at most
    /// [`SPARE_MAX`] bytes; smaller ones than [`LARGE_PAYLOAD`] are not worth it). A caller
    /// that is done with a large payload gives it back, and the next one is read into pages
    /// already resident instead of freshly allocated ones.
    pub(crate) fn recycle(&mut self, mut v: Vec<u8>) {
        if (LARGE_PAYLOAD..=SPARE_MAX).contains(&v.capacity()) && v.capacity() > self.spare.capacity() {
            v.clear();
            self.spare = v;
        }
    }

    /// Drops the decoded frame (`n` bytes) from the front.
    pub(crate) fn consume(&mut self, n: usize) {
        if let Some(l) = self.large.take() {
            debug_assert_eq!(n, l.total);
            return;
        }
        self.start += n;
        debug_assert!(self.start <= self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
            if self.buf.len() > KEEP_CAPACITY {
                self.buf = Vec::new();
            }
        }
    }

    /// Bytes of memory the buffer holds now (its buffer, and the large frame's payload so far).
    pub(crate) fn held(&self) -> usize {
        self.buf.len() + self.large.as_ref().map_or(0, |l| l.payload.len())
    }

    /// True if no bytes are buffered.
    pub(crate) fn is_empty(&self) -> bool {
        self.start == self.end && self.large.is_none()
    }

    /// True if at least one whole frame (or a fatal decode error) is buffered.
    pub(crate) fn has_frame(&self, max_payload: u32) -> bool {
        !matches!(self.decode(max_payload), Ok(Decoded::Incomplete { .. }))
    }

    /// Reads once from `stream`, making room for the bytes the current frame still `needs` (its
    /// total size) — but growing by at most the bytes already held, so memory follows what the
    /// peer actually sent, never what it merely declared. Call it after [`decode`](Self::decode)
    /// said the frame is incomplete.
    pub(crate) fn fill<T: crate::transport::Transport>(
        &mut self,
        link: &T,
        needed: usize,
    ) -> io::Result<Filled> {
        self.fill_inner(needed, &mut { link }, true)
    }

    /// [`fill`](ReadBuf::fill), except that a read interrupted by a signal handler returns
    /// [`io::ErrorKind::Interrupted`] instead of being retried: the caller can then check its
    /// deadline and whether to stop (a socket with a receive timeout is not restarted after a
    /// signal, and retrying would start the full timeout again each time).
    pub(crate) fn fill_or_interrupted<T: crate::transport::Transport>(
        &mut self,
        link: &T,
        needed: usize,
    ) -> io::Result<Filled> {
        self.fill_inner(needed, &mut { link }, false)
    }

    /// [`fill`](ReadBuf::fill) from any [`Source`] (the async flavour passes a non-blocking
    /// reader, so both flavours share one buffering policy).
    pub(crate) fn fill_from(&mut self, needed: usize, src: &mut impl Source) -> io::Result<Filled> {
        self.fill_inner(needed, src, true)
    }

    fn fill_inner(
        &mut self,
        needed: usize,
        src: &mut impl Source,
        retry_interrupted: bool,
    ) -> io::Result<Filled> {
        if self.large.is_none() {
            self.start_large();
        }
        if let Some(l) = &mut self.large {
            if l.payload.capacity() == l.payload.len() {
                l.payload.reserve_exact(l.want - l.payload.len());
            }
            let n = loop {
                match src.read_spare(&mut l.payload) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted && retry_interrupted => continue,
                    r => break r?,
                }
            };
            if n == 0 {
                return Ok(Filled::Eof);
            }
            if l.payload.len() > l.want {
                // Read past this frame (the vector had spare room): the rest starts the next one.
                let extra = l.payload.split_off(l.want);
                if self.buf.len() < extra.len() {
                    self.buf.resize(extra.len().max(INITIAL_CAPACITY), 0);
                }
                self.buf[..extra.len()].copy_from_slice(&extra);
                self.end = extra.len();
            }
            return Ok(Filled::Data);
        }
        let held = self.end - self.start;
        if self.start > 0 && (self.start + needed > self.buf.len() || self.start >= self.buf.len() / 2) {
            self.buf.copy_within(self.start..self.end, 0);
            self.start = 0;
            self.end = held;
        }
        if self.end == self.buf.len() || self.end + needed.saturating_sub(held) > self.buf.len() {
            let want = needed.max(held + 1);
            let grown = (self.buf.len() * 2).max(INITIAL_CAPACITY);
            // At least INITIAL_CAPACITY whatever the frame needs: room for the frames queued
            // behind it (one read takes a pipelined batch), and a read that comes back short
            // shows the socket is drained (the async reader then skips the read that would
            // only say EAGAIN). Sized to the frame alone, every read filled the buffer exactly.
            let cap = want.max(INITIAL_CAPACITY).min(grown).max(self.end + 1);
            if cap > self.buf.len() {
                self.buf.resize(cap, 0);
            }
        }
        loop {
            match src.read_into(&mut self.buf[self.end..]) {
                Ok(0) => return Ok(Filled::Eof),
                Ok(n) => {
                    self.end += n;
                    return Ok(Filled::Data);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted && retry_interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

/// A map keyed by request id, with a cheap hasher (see [`IdHasher`]).
#[cfg_attr(not(feature = "tokio"), allow(dead_code))] // used by the tokio flavour
pub(crate) type IdMap<V> = std::collections::HashMap<u64, V, std::hash::BuildHasherDefault<IdHasher>>;

/// Hashes a request id with one multiplication instead of SipHash, which cost about 200
/// instructions per request on each side (an insert and a remove). SipHash's resistance to
/// chosen keys is not needed: a client's ids only ever share a map with its own requests, at most
/// the in-flight cap of them, so colliding ids can slow down nobody but their sender.
#[derive(Default, Clone, Copy)]
pub(crate) struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(self.0.rotate_left(8) ^ u64::from(b));
        }
    }

    fn write_u64(&mut self, id: u64) {
        // Fibonacci hashing; the fold spreads the well-mixed high bits into the low ones,
        // which pick the bucket.
        let h = id.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        self.0 = h ^ (h >> 29);
    }
}

/// Logs why a server dropped a connection whose write failed: a client that does not read its
/// replies (the write timeout) is worth a warning, anything else (it left) is not.
pub(crate) fn log_write_failed(conn: u64, pid: u32, e: &io::Error) {
    if is_timeout(e) {
        tracing::warn!(conn, pid, "client does not read its replies; dropping the connection");
    } else {
        tracing::debug!(conn, error = %e, "write failed; dropping the connection");
    }
}

/// True for the errors that mean the peer is gone.
pub(crate) fn is_disconnect(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::NotConnected
    )
}

/// True for the errors a socket timeout (`SO_RCVTIMEO`/`SO_SNDTIMEO`) produces.
pub(crate) fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    #[test]
    fn memory_follows_received_bytes_not_declared_size() {
        let (a, b) = UnixStream::pair().unwrap();
        // Declare a 16 MiB payload, send only the header and 10 bytes.
        let head = Header::request(1, 0).to_bytes(0, 16 * 1024 * 1024 - 100);
        (&a).write_all(&head).unwrap();
        (&a).write_all(&[7u8; 10]).unwrap();
        let mut rb = ReadBuf::default();
        let mut got = 0;
        while got < head.len() + 10 {
            let needed = match rb.decode(proto::DEFAULT_MAX_PAYLOAD).unwrap() {
                Decoded::Incomplete { needed } => needed,
                Decoded::Frame(_) => unreachable!(),
            };
            let before = rb.end + rb.large.as_ref().map_or(0, |l| proto::FRAME_OVERHEAD + l.payload.len());
            assert!(matches!(rb.fill(&b, needed).unwrap(), Filled::Data));
            got += rb.end + rb.large.as_ref().map_or(0, |l| proto::FRAME_OVERHEAD + l.payload.len()) - before;
        }
        assert!(rb.buf.len() <= 64 * 1024, "buffer grew to {} bytes", rb.buf.len());
        // The next fill switches to the large payload's own vector (the first read may have
        // taken the header and the bytes after it at once), which holds exactly what arrived;
        // its reservation is address space only.
        rb.start_large();
        assert_eq!(rb.large.as_ref().unwrap().payload.len(), 10);
    }

    #[test]
    fn large_frames_arrive_whole_and_the_next_frame_is_kept() {
        let (a, b) = UnixStream::pair().unwrap();
        let big: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
        let mut wire = Vec::new();
        proto::encode(&mut wire, &Header::request(1, 0), b"m", &big);
        proto::encode(&mut wire, &Header::request(2, 0), b"", b"small");
        let writer = std::thread::spawn(move || (&a).write_all(&wire).unwrap());
        let mut rb = ReadBuf::default();
        let frames = [next_frame(&mut rb, &b), next_frame(&mut rb, &b)];
        writer.join().unwrap();
        assert_eq!(frames[0], (1, big));
        assert_eq!(frames[1], (2, b"small".to_vec()));
    }

    /// Reads the next frame: its id and payload.
    fn next_frame(rb: &mut ReadBuf, from: &UnixStream) -> (u64, Vec<u8>) {
        loop {
            match rb.decode(proto::DEFAULT_MAX_PAYLOAD).unwrap() {
                Decoded::Frame(f) => {
                    let (id, len) = (f.header.id, f.len);
                    let small = (!rb.is_large()).then(|| f.payload.to_vec());
                    let payload = small.or_else(|| rb.take_payload()).unwrap();
                    rb.consume(len);
                    return (id, payload);
                }
                Decoded::Incomplete { needed } => {
                    assert!(matches!(rb.fill(from, needed).unwrap(), Filled::Data));
                }
            }
        }
    }

    #[test]
    fn a_recycled_vector_takes_the_next_large_payload() {
        let (a, b) = UnixStream::pair().unwrap();
        let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let mut wire = Vec::new();
        for id in 1..=4 {
            proto::encode(&mut wire, &Header::request(id, 0), b"m", &big);
        }
        let writer = std::thread::spawn(move || (&a).write_all(&wire).unwrap());
        let mut rb = ReadBuf::default();
        let (id, first) = next_frame(&mut rb, &b);
        assert_eq!((id, &first), (1, &big));
        let at = first.as_ptr();
        rb.recycle(first);
        assert!(!rb.wants_spare(), "it has one");
        let (id, second) = next_frame(&mut rb, &b);
        assert_eq!((id, &second), (2, &big));
        assert_eq!(second.as_ptr(), at, "read into the recycled vector");
        // Too small to be worth keeping: the next payload gets a vector of its own.
        rb.recycle(vec![0; 100]);
        assert_eq!(rb.spare.capacity(), 0);
        let (id, third) = next_frame(&mut rb, &b);
        assert_eq!((id, &third), (3, &big));
        // More than twice the payload: not used (the handler or caller owning the payload would
        // hold all of it), dropped.
        let huge = Vec::with_capacity(1 << 20);
        let at = huge.as_ptr();
        rb.recycle(huge);
        let (id, fourth) = next_frame(&mut rb, &b);
        assert_eq!((id, &fourth), (4, &big));
        assert_ne!(fourth.as_ptr(), at);
        assert!(fourth.capacity() < 2 * big.len());
        assert_eq!(rb.spare.capacity(), 0);
        writer.join().unwrap();
    }

    #[test]
    fn a_large_frame_whose_payload_has_not_started_wants_a_spare() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut rb = ReadBuf::default();
        assert!(!rb.wants_spare(), "nothing buffered");
        let head = Header::request(1, 0).to_bytes(0, 100_000);
        (&a).write_all(&head).unwrap();
        rb.fill(&b, head.len() + 100_000).unwrap();
        assert!(rb.wants_spare());
        rb.recycle(Vec::with_capacity(200_000));
        assert!(!rb.wants_spare(), "given one");
        // A small frame never does.
        let mut rb = ReadBuf::default();
        let small = Header::request(2, 0).to_bytes(0, 10);
        (&a).write_all(&small).unwrap();
        rb.fill(&b, small.len() + 10).unwrap();
        assert!(!rb.wants_spare());
    }
}
