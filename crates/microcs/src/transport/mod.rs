//! What moves frames between two processes: the seam every flavour's client and server use.
//!
//! The blocking and tokio clients and servers never call a socket function to move bytes; they
//! call a [`Transport`] (reads into the shared [`ReadBuf`](crate::io::ReadBuf), vectored sends,
//! shutdown). The protocol on top — framing, ids, deadlines, cancellation, limits, statistics —
//! lives in [`crate::proto`] and [`crate::dispatch`] and does not change with the transport.
//!
//! Every connection starts on the connected Unix stream socket ([`unix`]); after the handshake
//! it may move to shared memory ([`shm`], PROTOCOL.md § 18). [`Link`] is the type the flavours
//! hold: the socket, and the shared-memory side once negotiated.

use std::io::{self, IoSlice};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::proto::Header;

pub(crate) mod inherited;
pub(crate) mod shm;
pub(crate) mod unix;

/// One connection, as both flavours hold it: the socket, and the shared-memory rings once the
/// handshake moved the connection to them (set once, before any frame but the handshake's).
///
/// Its descriptor ([`AsFd`]) is always the socket's: peer credentials, and the hang-up that
/// tells one side the other is gone.
#[derive(Debug)]
pub(crate) struct Link {
    socket: UnixStream,
    shm: OnceLock<shm::ShmLink>,
    /// The receive timeout in nanoseconds ([`NO_TIMEOUT`] = none), for the shared-memory wait;
    /// the socket's own is `SO_RCVTIMEO`.
    recv_timeout: AtomicU64,
    /// The send timeout (`SO_SNDTIMEO` as it was when the link was made; nothing sets it later),
    /// for the shared-memory wait for room: read once here, not on every wait.
    send_timeout: AtomicU64,
}

const NO_TIMEOUT: u64 = u64::MAX;

impl From<UnixStream> for Link {
    fn from(socket: UnixStream) -> Link {
        use rustix::net::sockopt::{Timeout, socket_timeout};
        let read = |which| AtomicU64::new(timeout_ns(socket_timeout(&socket, which).ok().flatten()));
        let (recv_timeout, send_timeout) = (read(Timeout::Recv), read(Timeout::Send));
        Link { socket, shm: OnceLock::new(), recv_timeout, send_timeout }
    }
}

fn timeout_ns(t: Option<Duration>) -> u64 {
    t.map_or(NO_TIMEOUT, |t| u64::try_from(t.as_nanos()).unwrap_or(NO_TIMEOUT - 1))
}

impl Link {
    /// The socket (the handshake moves over it, and its options are set on it).
    pub(crate) fn socket(&self) -> &UnixStream {
        &self.socket
    }

    /// Moves the connection to shared memory; from now on frames go through the rings.
    pub(crate) fn upgrade(&self, shm: shm::ShmLink) {
        let _ = self.shm.set(shm);
    }

    /// The shared-memory side, if the connection uses it.
    pub(crate) fn shm(&self) -> Option<&shm::ShmLink> {
        self.shm.get()
    }

    /// What carries this connection's frames: `"shm"` or `"unix"`.
    pub(crate) fn transport_name(&self) -> &'static str {
        if self.shm.get().is_some() { "shm" } else { "unix" }
    }

    /// Sets (or clears, `None`) how long a blocking read waits (`SO_RCVTIMEO` on the socket,
    /// and the same bound for the shared-memory wait).
    pub(crate) fn set_recv_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.recv_timeout.store(timeout_ns(timeout), Ordering::Relaxed);
        unix::set_recv_timeout(&self.socket, timeout)
    }

    fn recv_timeout(&self) -> Option<Duration> {
        duration_of(&self.recv_timeout)
    }

    fn send_timeout(&self) -> Option<Duration> {
        duration_of(&self.send_timeout)
    }
}

fn duration_of(ns: &AtomicU64) -> Option<Duration> {
    match ns.load(Ordering::Relaxed) {
        NO_TIMEOUT => None,
        ns => Some(Duration::from_nanos(ns)),
    }
}

impl AsFd for Link {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }
}

impl AsRawFd for Link {
    fn as_raw_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }
}

impl Transport for Link {
    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self.shm.get() {
            Some(shm) => shm.recv(&self.socket, self.recv_timeout(), buf),
            None => self.socket.recv(buf),
        }
    }

    fn recv_spare(&self, v: &mut Vec<u8>) -> io::Result<usize> {
        match self.shm.get() {
            Some(shm) => shm.recv_spare(&self.socket, self.recv_timeout(), v),
            None => self.socket.recv_spare(v),
        }
    }

    fn send(&self, parts: &[IoSlice<'_>], wait: bool) -> io::Result<usize> {
        match self.shm.get() {
            Some(shm) => shm.send(&self.socket, self.send_timeout(), parts, wait),
            None => self.socket.send(parts, wait),
        }
    }

    fn shut(&self, how: Shut) {
        if let Some(shm) = self.shm.get() {
            shm.shut_read();
        }
        self.socket.shut(how);
    }
}

/// Which direction(s) [`Transport::shut`] ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shut {
    /// Stop reading: the peer's further writes fail (so it knows they did not arrive) while
    /// what it already sent stays readable.
    Read,
    /// Both directions: wakes whoever waits on the connection and tells the peer we are gone,
    /// even while other references keep it open.
    Both,
}

/// A connected, ordered, reliable byte stream between two processes.
///
/// The descriptor ([`AsFd`]) is what a caller waits on for readability (tokio registers it)
/// and what tells one side that the other died.
pub(crate) trait Transport: AsFd + Send + Sync {
    /// Reads what is available into `buf` (waiting first if the transport is in blocking
    /// mode); 0 means the peer closed its side.
    fn recv(&self, buf: &mut [u8]) -> io::Result<usize>;

    /// Reads into `v`'s spare capacity, extending its length; 0 means end of stream.
    fn recv_spare(&self, v: &mut Vec<u8>) -> io::Result<usize>;

    /// Sends as much of `parts` as the transport takes now, in order. `wait`: may block until
    /// some room is free (blocking flavour); otherwise returns `WouldBlock` at once (tokio).
    /// Never raises `SIGPIPE`.
    fn send(&self, parts: &[IoSlice<'_>], wait: bool) -> io::Result<usize>;

    /// Ends one or both directions; errors (already closed) are ignored.
    fn shut(&self, how: Shut);
}

/// Error from [`send_frame`], with how many bytes went out before it.
#[derive(Debug)]
pub(crate) struct SendError {
    pub error: io::Error,
    pub sent: usize,
}

/// Writes one whole frame (length prefix, header, method, payload) with as few calls as the
/// transport allows: one vectored send of three parts in the common case. Blocking.
pub(crate) fn send_frame<T: Transport>(
    link: &T,
    header: &Header,
    method: &[u8],
    payload: &[u8],
) -> Result<(), SendError> {
    let head = header.to_bytes(method.len(), payload.len());
    let mut parts = [IoSlice::new(&head), IoSlice::new(method), IoSlice::new(payload)];
    send_all(link, &mut parts)
}

/// Writes all of `bytes`. Blocking.
pub(crate) fn send_bytes<T: Transport>(link: &T, bytes: &[u8]) -> Result<(), SendError> {
    send_all(link, &mut [IoSlice::new(bytes)])
}

/// Writes all of `parts`, in order, with as few calls as the transport allows. Blocking.
pub(crate) fn send_all<T: Transport>(link: &T, mut parts: &mut [IoSlice<'_>]) -> Result<(), SendError> {
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let mut sent = 0;
    IoSlice::advance_slices(&mut parts, 0);
    while sent < total {
        match link.send(parts, true) {
            Ok(0) => return Err(SendError { error: io::ErrorKind::WriteZero.into(), sent }),
            Ok(n) => {
                sent += n;
                IoSlice::advance_slices(&mut parts, n);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(SendError { error: e, sent }),
        }
    }
    Ok(())
}

/// Sends one frame now if the transport takes it whole without waiting (for the refusals
/// sent right after accepting a connection, when nothing else has been written yet).
#[cfg_attr(not(feature = "tokio"), allow(dead_code))] // used by the tokio flavour
pub(crate) fn send_frame_now<T: Transport>(link: &T, header: &Header, payload: &[u8]) {
    let head = header.to_bytes(0, payload.len());
    let _ = link.send(&[IoSlice::new(&head), IoSlice::new(payload)], false);
}
