//! Frame I/O on a blocking Unix stream: a growable read buffer that never reserves more than it
//! has received (plus a bounded step), and vectored, SIGPIPE-free writes.

use std::io::{self, IoSlice, Read};
use std::os::unix::net::UnixStream;

use rustix::net::{SendAncillaryBuffer, SendFlags};

use crate::proto::{self, DecodeError, Decoded, Header};

/// First allocation for a connection's read buffer.
const INITIAL_CAPACITY: usize = 8 * 1024;
/// An empty buffer larger than this is given back after use, so an idle connection that once
/// carried a big frame does not keep its memory.
const KEEP_CAPACITY: usize = 256 * 1024;

/// Payloads at least this large are read straight into a vector of their own, which then
/// becomes the request's (or reply's) payload without being copied.
pub(crate) const LARGE_PAYLOAD: usize = 64 * 1024;

/// Kernel send buffer each connection asks for by default (see [`set_send_buffer`]).
pub(crate) const DEFAULT_SEND_BUFFER: usize = 1024 * 1024;

/// Asks the kernel for a send buffer of `bytes` on this socket (`SO_SNDBUF`); 0 leaves the
/// system's default. Failure is not an error: the connection works with any buffer.
///
/// Why: a Unix stream socket holds at most its *sender's* buffer in flight (the kernel default
/// is `net.core.wmem_default`, usually 208 KiB). A larger frame crosses in buffer-sized rounds,
/// each a sleep and a wake-up on both sides — and on a non-blocking socket also a readiness
/// wait and a system call or two more per round. With room for the whole frame it goes in one
/// `sendmsg`. The kernel caps the value at `net.core.wmem_max` and counts it double (for its
/// bookkeeping); memory is only used while bytes are queued, so an idle connection costs
/// nothing more.
pub(crate) fn set_send_buffer(socket: impl std::os::fd::AsFd, bytes: usize) {
    if bytes == 0 {
        return;
    }
    if let Err(e) = rustix::net::sockopt::set_socket_send_buffer_size(socket, bytes) {
        tracing::debug!(error = %e, bytes, "cannot set the socket's send buffer; keeping the default");
    }
}

/// Bytes received but not yet decoded. The valid bytes are `buf[start..end]`; a frame with a
/// large payload is read into [`Large`] instead.
#[derive(Debug, Default)]
pub(crate) struct ReadBuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    large: Option<Large>,
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

impl Source for &UnixStream {
    fn read_into(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        Read::read(self, buf)
    }

    fn read_spare(&mut self, v: &mut Vec<u8>) -> io::Result<usize> {
        Ok(rustix::io::read(&**self, rustix::buffer::spare_capacity(v))?)
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
        let header = Header {
            version: h[4],
            kind: h[5],
            flags: u16::from_be_bytes([h[6], h[7]]),
            id: u64::from_be_bytes(h[8..16].try_into().expect("8 bytes")),
            status: u16::from_be_bytes([h[16], h[17]]),
            deadline_ms: u32::from_be_bytes([h[20], h[21], h[22], h[23]]),
        };
        let mut payload = Vec::with_capacity(payload_len);
        payload.extend_from_slice(&held[body..]);
        let method = held[proto::FRAME_OVERHEAD..body].to_vec();
        self.large =
            Some(Large { header, method, payload, want: payload_len, total: proto::PREFIX_LEN + len });
        self.start = 0;
        self.end = 0;
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
    pub(crate) fn fill(&mut self, stream: &UnixStream, needed: usize) -> io::Result<Filled> {
        self.fill_inner(needed, &mut { stream }, true)
    }

    /// [`fill`](ReadBuf::fill), except that a read interrupted by a signal handler returns
    /// [`io::ErrorKind::Interrupted`] instead of being retried: the caller can then check its
    /// deadline and whether to stop (a socket with a receive timeout is not restarted after a
    /// signal, and retrying would start the full timeout again each time).
    pub(crate) fn fill_or_interrupted(&mut self, stream: &UnixStream, needed: usize) -> io::Result<Filled> {
        self.fill_inner(needed, &mut { stream }, false)
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

/// Error from [`send_frame`], with how many bytes went out before it.
#[derive(Debug)]
pub(crate) struct SendError {
    pub error: io::Error,
    pub sent: usize,
}

/// Writes one frame (length prefix, header, method, payload) with as few syscalls as the kernel
/// allows: one `sendmsg` with three iovecs in the common case. Never raises SIGPIPE.
pub(crate) fn send_frame(
    stream: &UnixStream,
    header: &Header,
    method: &[u8],
    payload: &[u8],
) -> Result<(), SendError> {
    let head = header.to_bytes(method.len(), payload.len());
    let mut parts = [IoSlice::new(&head), IoSlice::new(method), IoSlice::new(payload)];
    send_all(stream, &mut parts)
}

/// Writes all of `bytes`. Never raises SIGPIPE.
pub(crate) fn send_bytes(stream: &UnixStream, bytes: &[u8]) -> Result<(), SendError> {
    send_all(stream, &mut [IoSlice::new(bytes)])
}

fn send_all(stream: &UnixStream, mut parts: &mut [IoSlice<'_>]) -> Result<(), SendError> {
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let mut sent = 0;
    IoSlice::advance_slices(&mut parts, 0);
    while sent < total {
        match rustix::net::sendmsg(stream, parts, &mut SendAncillaryBuffer::default(), SendFlags::NOSIGNAL) {
            Ok(0) => return Err(SendError { error: io::ErrorKind::WriteZero.into(), sent }),
            Ok(n) => {
                sent += n;
                IoSlice::advance_slices(&mut parts, n);
            }
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(SendError { error: e.into(), sent }),
        }
    }
    Ok(())
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
        let mut frames = Vec::new();
        while frames.len() < 2 {
            match rb.decode(proto::DEFAULT_MAX_PAYLOAD).unwrap() {
                Decoded::Frame(f) => {
                    let (id, len) = (f.header.id, f.len);
                    let small = (!rb.is_large()).then(|| f.payload.to_vec());
                    let payload = small.or_else(|| rb.take_payload()).unwrap();
                    rb.consume(len);
                    frames.push((id, payload));
                }
                Decoded::Incomplete { needed } => {
                    rb.fill(&b, needed).unwrap();
                }
            }
        }
        writer.join().unwrap();
        assert_eq!(frames[0], (1, big));
        assert_eq!(frames[1], (2, b"small".to_vec()));
    }
}
