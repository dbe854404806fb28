//! The Unix stream socket transport: the connection every client and server starts with, and
//! the socket options and kernel facts (peer credentials) that only a socket has.

use std::io::{self, IoSlice, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use rustix::net::sockopt::{self, Timeout};
use rustix::net::{AddressFamily, SendAncillaryBuffer, SendFlags, SocketAddrUnix, SocketFlags, SocketType};

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
