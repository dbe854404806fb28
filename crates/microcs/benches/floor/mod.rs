//! The socket floor both benches measure microcs against: the best length-prefixed echo over a
//! plain std `UnixStream` this project could write, client and server. Shared by `e2e.rs` and
//! `roundtrip.rs` (`#[path]`-included, so cargo does not take it for a bench of its own).
//!
//! What makes it the floor a careful hand-written peer would reach, and nothing a real protocol
//! could not also do:
//! - **Buffered reads.** Each connection reads into a buffer of its own (64 KiB to start) as much
//!   as the socket holds, so a small frame costs one `read(2)` (prefix and body together), and
//!   back-to-back frames share reads.
//! - **Large bodies read straight into place.** A frame that does not fit grows the buffer to
//!   its size (once: the memory is kept), the bytes already held move to the front, and the rest
//!   is read into its final place with reads of exactly the missing length: no copy in user
//!   space, nothing read past the frame.
//! - **One vectored write per frame** (`writev` of the 4-byte prefix and the payload where it
//!   lies): the server echoes straight from its read buffer, the client sends from the caller's
//!   slice.
//! - **No allocation per request**, and no page first touched per request: buffers are reused.
//! - **The same socket send buffer as microcs's default** (`SO_SNDBUF` 1 MiB, which the kernel
//!   doubles), so a 1 MiB frame crosses in one write on both; otherwise the floor would measure
//!   the kernel's default buffer size, not code.
//!
//! The **epoll floor** ([`FloorConn::connect_epoll`], [`serve_epoll`]) is the same echo waiting
//! the way an event loop waits: a non-blocking socket, `epoll_wait(2)` until it is readable,
//! then one `read(2)` (a short read means it is drained, so the next wait goes straight to
//! `epoll_wait`, as tokio's readiness does). It is not a target; it shows what waiting in an
//! event loop instead of in `read(2)` costs by itself on this machine, which an async client
//! or server cannot avoid.

use std::io::{self, IoSlice, Read, Write};
use std::ops::Range;
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use rustix::event::{PollFd, PollFlags, epoll};

/// The read buffer's first size.
const INITIAL: usize = 64 * 1024;
/// The send buffer asked for: microcs's `send_buffer` default.
const SEND_BUFFER: usize = 1 << 20;

/// One end of a floor connection: the socket and its read buffer (valid bytes `buf[start..end]`).
pub struct FloorConn {
    s: UnixStream,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// The epoll floor: the socket is non-blocking and reads wait in `epoll_wait` on this.
    epoll: Option<OwnedFd>,
    /// The epoll floor: the last read may have left bytes (it filled what it was given).
    maybe_more: bool,
}

impl FloorConn {
    pub fn new(s: UnixStream) -> FloorConn {
        rustix::net::sockopt::set_socket_send_buffer_size(&s, SEND_BUFFER).expect("SO_SNDBUF");
        FloorConn { s, buf: vec![0; INITIAL], start: 0, end: 0, epoll: None, maybe_more: false }
    }

    /// The epoll floor's end of a connection (see the module's documentation).
    pub fn new_epoll(s: UnixStream) -> FloorConn {
        s.set_nonblocking(true).unwrap();
        let ep = epoll::create(epoll::CreateFlags::CLOEXEC).unwrap();
        epoll::add(&ep, &s, epoll::EventData::new_u64(0), epoll::EventFlags::IN).unwrap();
        FloorConn { epoll: Some(ep), ..FloorConn::new(s) }
    }

    pub fn connect(path: &Path) -> FloorConn {
        FloorConn::new(UnixStream::connect(path).unwrap())
    }

    #[allow(dead_code)] // roundtrip.rs measures the floor only
    pub fn connect_epoll(path: &Path) -> FloorConn {
        FloorConn::new_epoll(UnixStream::connect(path).unwrap())
    }

    /// Reads until the next whole frame is buffered; its payload's range in `buf`, or `None` at
    /// end of stream.
    fn next_frame(&mut self) -> io::Result<Option<Range<usize>>> {
        while self.end - self.start < 4 {
            if !self.fill(4)? {
                return Ok(None);
            }
        }
        let p = &self.buf[self.start..self.start + 4];
        let total = 4 + u32::from_be_bytes([p[0], p[1], p[2], p[3]]) as usize;
        while self.end - self.start < total {
            if !self.fill(total)? {
                return Ok(None);
            }
        }
        let body = self.start + 4..self.start + total;
        self.start += total;
        Ok(Some(body))
    }

    /// One `read(2)` towards a frame of `total` bytes at `start`; false at end of stream.
    fn fill(&mut self, total: usize) -> io::Result<bool> {
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        }
        if self.start + total > self.buf.len() {
            // Move what is held to the front (a few bytes: part of one frame), grow once.
            self.buf.copy_within(self.start..self.end, 0);
            (self.start, self.end) = (0, self.end - self.start);
            if total > self.buf.len() {
                self.buf.resize(total, 0);
            }
        }
        // A small frame: whatever the socket has (it may start the next frame). A large one:
        // exactly the bytes it still lacks, straight into place.
        let stop = if total <= INITIAL { self.buf.len() } else { self.start + total };
        let n = loop {
            if let Some(ep) = self.epoll.as_ref().filter(|_| !self.maybe_more) {
                let mut events = Vec::with_capacity(1);
                match epoll::wait(ep, rustix::buffer::spare_capacity(&mut events), None) {
                    Err(rustix::io::Errno::INTR) => continue,
                    r => r?,
                };
            }
            match self.s.read(&mut self.buf[self.end..stop]) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.maybe_more = false,
                r => break r?,
            }
        };
        self.maybe_more = n == stop - self.end;
        self.end += n;
        Ok(n > 0)
    }

    /// Writes one frame (prefix and `payload`) with one vectored write, more only if the socket
    /// takes part of it (a non-blocking socket that is full waits in `poll(2)` for room).
    fn send(s: &mut UnixStream, payload: &[u8]) -> io::Result<()> {
        let prefix = (payload.len() as u32).to_be_bytes();
        let mut parts = [IoSlice::new(&prefix), IoSlice::new(payload)];
        let mut parts = &mut parts[..];
        while !parts.is_empty() {
            let n = match s.write_vectored(parts) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let _ = rustix::event::poll(&mut [PollFd::new(&*s, PollFlags::OUT)], None);
                    continue;
                }
                r => r?,
            };
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            IoSlice::advance_slices(&mut parts, n);
        }
        Ok(())
    }

    /// Client: one round trip; the reply's length (its bytes stay in the buffer).
    pub fn call(&mut self, payload: &[u8]) -> usize {
        FloorConn::send(&mut self.s, payload).unwrap();
        self.next_frame().unwrap().expect("the floor server closed").len()
    }

    /// Server: echoes every frame until the client leaves.
    fn serve(mut self) {
        while let Ok(Some(body)) = self.next_frame() {
            if FloorConn::send(&mut self.s, &self.buf[body]).is_err() {
                break;
            }
        }
    }
}

/// Serves the floor echo at `path` on background threads, one per connection.
pub fn serve(path: &Path) {
    serve_with(path, FloorConn::new);
}

/// Serves the epoll floor at `path`: a thread per connection, each waiting in its own epoll.
#[allow(dead_code)] // roundtrip.rs measures the floor only
pub fn serve_epoll(path: &Path) {
    serve_with(path, FloorConn::new_epoll);
}

fn serve_with(path: &Path, conn: fn(UnixStream) -> FloorConn) {
    let l = UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let c = conn(s.unwrap());
            std::thread::spawn(move || c.serve());
        }
    });
}
