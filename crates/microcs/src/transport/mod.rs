//! What moves frames between two processes: the seam every flavour's client and server use.
//!
//! The blocking and tokio clients and servers never call a socket function to move bytes; they
//! call a [`Transport`] (reads into the shared [`ReadBuf`](crate::io::ReadBuf), vectored sends,
//! shutdown). The protocol on top — framing, ids, deadlines, cancellation, limits, statistics —
//! lives in [`crate::proto`] and [`crate::dispatch`] and does not change with the transport.
//!
//! Today's transport is the connected Unix stream socket ([`unix`]). [`Link`] names the type the
//! flavours hold; a second transport (shared memory, negotiated over the socket) is added by
//! implementing [`Transport`] in a module of its own and making `Link` an enum of the two.

use std::io::{self, IoSlice};
use std::os::fd::AsFd;

use crate::proto::Header;

pub(crate) mod shm;
pub(crate) mod unix;

/// The connection type both flavours hold.
pub(crate) type Link = std::os::unix::net::UnixStream;

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
