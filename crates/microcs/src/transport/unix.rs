//! The Unix stream socket transport: the connection every client and server starts with, and
//! the socket options and kernel facts (peer credentials) that only a socket has.

use std::io::{self, IoSlice, IoSliceMut, Read};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use rustix::net::sockopt::{self, Timeout};
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketFlags, SocketType,
};

use super::{Shut, Transport};
use crate::request::Peer;

/// Kernel send buffer each connection asks for by default (see [`set_send_buffer`]).
pub(crate) const DEFAULT_SEND_BUFFER: usize = 1024 * 1024;

impl Transport for UnixStream {
    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        Read::read(&mut &*self, buf)
    }

    fn recv_spare(&self, v: &mut Vec<u8>) -> io::Result<usize> {
        Ok(rustix::io::read(self, rustix::buffer::spare_capacity(v))?)
    }

    fn send(&self, parts: &[IoSlice<'_>], wait: bool) -> io::Result<usize> {
        let flags = if wait { SendFlags::NOSIGNAL } else { SendFlags::NOSIGNAL | SendFlags::DONTWAIT };
        if let [one] = parts {
            return Ok(rustix::net::send(self, one, flags)?);
        }
        Ok(rustix::net::sendmsg(self, parts, &mut SendAncillaryBuffer::default(), flags)?)
    }

    fn shut(&self, how: Shut) {
        let how = match how {
            Shut::Read => rustix::net::Shutdown::Read,
            Shut::Both => rustix::net::Shutdown::Both,
        };
        let _ = rustix::net::shutdown(self, how);
    }
}

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
pub(crate) fn set_send_buffer(socket: impl AsFd, bytes: usize) {
    if bytes == 0 {
        return;
    }
    if let Err(e) = sockopt::set_socket_send_buffer_size(socket, bytes) {
        tracing::debug!(error = %e, bytes, "cannot set the socket's send buffer; keeping the default");
    }
}

/// Sets (or clears, `None`) the socket's receive timeout (`SO_RCVTIMEO`): how the blocking
/// flavour bounds a wait.
pub(crate) fn set_recv_timeout(socket: impl AsFd, timeout: Option<Duration>) -> io::Result<()> {
    Ok(sockopt::set_socket_timeout(socket, Timeout::Recv, timeout)?)
}

/// Sets the socket's send timeout (`SO_SNDTIMEO`).
pub(crate) fn set_send_timeout(socket: impl AsFd, timeout: Option<Duration>) -> io::Result<()> {
    Ok(sockopt::set_socket_timeout(socket, Timeout::Send, timeout)?)
}

/// The connected peer, as the kernel recorded it when it connected (`SO_PEERCRED`): it cannot
/// be forged.
pub(crate) fn peer_credentials(socket: impl AsFd) -> io::Result<Peer> {
    let c = sockopt::socket_peercred(socket)?;
    Ok(Peer { pid: c.pid.as_raw_nonzero().get() as u32, uid: c.uid.as_raw(), gid: c.gid.as_raw() })
}

/// `connect()` bounded by a timeout: a Unix socket whose listen backlog is full makes a blocking
/// `connect` wait, and std offers no timeout for Unix sockets. The socket keeps the timeout as
/// its send and receive timeouts (the caller sets them anew).
pub(crate) fn connect_with_timeout(path: &Path, timeout: Duration) -> io::Result<UnixStream> {
    let fd: OwnedFd =
        rustix::net::socket_with(AddressFamily::UNIX, SocketType::STREAM, SocketFlags::CLOEXEC, None)?;
    set_send_timeout(&fd, Some(timeout))?;
    set_recv_timeout(&fd, Some(timeout))?;
    let addr = SocketAddrUnix::new(path)?;
    loop {
        match rustix::net::connect(&fd, &addr) {
            Ok(()) => return Ok(UnixStream::from(fd)),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Sends `bytes` with `fds` attached (`SCM_RIGHTS`, on the first byte). Blocking; the rest of
/// `bytes`, if the socket took only part, goes without descriptors.
pub(crate) fn send_with_fds(socket: &UnixStream, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(super::shm::FDS))];
    let mut anc = SendAncillaryBuffer::new(&mut space);
    if !anc.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::other("too many descriptors for one message"));
    }
    let n = rustix::net::sendmsg(socket, &[IoSlice::new(bytes)], &mut anc, SendFlags::NOSIGNAL)?;
    super::send_bytes(socket, &bytes[n..]).map_err(|e| e.error)
}

/// Reads into `buf` like `recv`, keeping any descriptors that came with the bytes (close-on-exec)
/// in `fds`.
pub(crate) fn recv_with_fds(
    socket: &UnixStream,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> io::Result<usize> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(super::shm::FDS))];
    let mut anc = RecvAncillaryBuffer::new(&mut space);
    let r = rustix::net::recvmsg(socket, &mut [IoSliceMut::new(buf)], &mut anc, RecvFlags::CMSG_CLOEXEC)?;
    for msg in anc.drain() {
        if let RecvAncillaryMessage::ScmRights(got) = msg {
            fds.extend(got);
        }
    }
    Ok(r.bytes)
}

/// A [`Source`](crate::io::Source) reading the socket and keeping the descriptors that come
/// with the bytes (the handshake answer's) in `fds`.
pub(crate) struct WithFds<'a> {
    pub socket: &'a UnixStream,
    pub fds: &'a mut Vec<OwnedFd>,
}

impl crate::io::Source for WithFds<'_> {
    fn read_into(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        recv_with_fds(self.socket, buf, self.fds)
    }
}
