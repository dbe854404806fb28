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

/// Bytes received but not yet decoded. The valid bytes are `buf[start..end]`.
#[derive(Debug, Default)]
pub(crate) struct ReadBuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
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
        proto::decode(&self.buf[self.start..self.end], max_payload)
    }

    /// Drops `n` decoded bytes from the front.
    pub(crate) fn consume(&mut self, n: usize) {
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
        self.start == self.end
    }

    /// True if at least one whole frame (or a fatal decode error) is buffered.
    pub(crate) fn has_frame(&self, max_payload: u32) -> bool {
        !matches!(self.decode(max_payload), Ok(Decoded::Incomplete { .. }))
    }

    /// Reads once from `stream`, making room for the bytes the current frame still `needs` (its
    /// total size) — but growing by at most the bytes already held, so memory follows what the
    /// peer actually sent, never what it merely declared.
    pub(crate) fn fill(&mut self, mut stream: &UnixStream, needed: usize) -> io::Result<Filled> {
        self.fill_with(needed, |buf| stream.read(buf))
    }

    /// [`fill`](ReadBuf::fill) with any reader: `read` gets the free space and returns how many
    /// bytes it put there (0 at end of stream). The async server and client pass a non-blocking
    /// `try_read`, so both flavours share one buffering policy.
    pub(crate) fn fill_with(
        &mut self,
        needed: usize,
        mut read: impl FnMut(&mut [u8]) -> io::Result<usize>,
    ) -> io::Result<Filled> {
        let held = self.end - self.start;
        if self.start > 0 && (self.start + needed > self.buf.len() || self.start >= self.buf.len() / 2) {
            self.buf.copy_within(self.start..self.end, 0);
            self.start = 0;
            self.end = held;
        }
        if self.end == self.buf.len() || self.end + needed.saturating_sub(held) > self.buf.len() {
            let want = needed.max(held + 1);
            let grown = (self.buf.len() * 2).max(INITIAL_CAPACITY);
            let cap = want.min(grown).max(self.end + 1);
            if cap > self.buf.len() {
                self.buf.resize(cap, 0);
            }
        }
        loop {
            match read(&mut self.buf[self.end..]) {
                Ok(0) => return Ok(Filled::Eof),
                Ok(n) => {
                    self.end += n;
                    return Ok(Filled::Data);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
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
            let before = rb.end;
            assert!(matches!(rb.fill(&b, needed).unwrap(), Filled::Data));
            got += rb.end - before;
        }
        assert!(rb.buf.len() <= 64 * 1024, "buffer grew to {} bytes", rb.buf.len());
    }
}
