//! How a tokio task waits on a shared-memory connection (PROTOCOL.md § 18.3, § 18.5): its
//! eventfds and a second registration of its socket with tokio, the spin between yields, the
//! park, and the peer's end. `io.rs`'s stream, reads and writer use it.

use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::task::Poll;

use ::tokio::io::Interest;
use ::tokio::io::unix::AsyncFd;

use crate::transport::Link;
use crate::transport::shm::{MAX_SPIN, Role, ShmLink, socket_end};

/// The eventfds a shared-memory connection parks on, each registered for read readiness
/// (copies of the link's descriptors, so that the registrations own what they watch).
pub(super) struct ShmWait {
    /// Rung by the peer when it wrote into the ring we read (and we said we sleep).
    data: AsyncFd<OwnedFd>,
    /// Rung by the peer when it made room in the ring we write (and we said we sleep).
    space: AsyncFd<OwnedFd>,
    /// A second registration of the socket (a copy of its descriptor), through which a wait
    /// for room learns of the peer's end. tokio keeps one waker per registration and
    /// direction: had the writer polled the socket's own registration, it would have taken the
    /// place of the reader's waker, and the peer's end would have woken only the writer —
    /// leaving a caller waiting for its answer until its deadline.
    hangup: AsyncFd<OwnedFd>,
}

impl ShmWait {
    /// Registers copies of `shm`'s eventfds, and of `socket`, with tokio.
    pub(super) fn new(socket: &UnixStream, shm: &ShmLink) -> io::Result<ShmWait> {
        let register = |role: Role| -> io::Result<AsyncFd<OwnedFd>> {
            let fd = rustix::io::fcntl_dupfd_cloexec(shm.wait_fd(role), 0)?;
            // SAFETY: `fd` is owned by the `AsyncFd` and never replaced, so the descriptor stays
            // open and the same for the registration's whole life.
            unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }.map_err(io::Error::from)
        };
        let socket = rustix::io::fcntl_dupfd_cloexec(socket, 0)?;
        // SAFETY: as above: `socket` is owned by the `AsyncFd` and never replaced.
        let hangup = unsafe { AsyncFd::register_with_interest(socket, Interest::READABLE) }
            .map_err(io::Error::from)?;
        Ok(ShmWait { data: register(Role::Read)?, space: register(Role::Write)?, hangup })
    }
}

/// How a shared-memory wait ended.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum ShmWoke {
    /// Look at the ring again (ready, or a spurious wake-up).
    Again,
    /// The peer closed or died and the ring we read is empty.
    PeerGone,
}

/// Waits, without blocking the runtime, until the ring of `role` is ready (data to read,
/// room to write), or the peer is gone (PROTOCOL.md § 18.3, § 18.5).
///
/// First a short spin when it may pay (another CPU, the peer not on ours): checks of the ring
/// between which the task yields to the runtime, so other tasks run meanwhile; the budget adapts
/// as in the blocking flavour. Then it announces "parked", checks once more (the re-check after
/// the fence that keeps the wake-up from being lost), and sleeps on the eventfd's and the
/// socket's readiness. Cancel safe: dropping it withdraws the announcement.
pub(super) async fn shm_wait(
    socket_reg: &AsyncFd<Link>,
    wait: &ShmWait,
    shm: &ShmLink,
    role: Role,
) -> io::Result<ShmWoke> {
    let start = std::time::Instant::now();
    if let Some(budget) = shm.spin_budget(role) {
        loop {
            for _ in 0..SPIN_CHECKS {
                if shm.ready(role)? {
                    shm.adapt(role, true);
                    return Ok(ShmWoke::Again);
                }
                std::hint::spin_loop();
            }
            if start.elapsed() >= budget {
                break;
            }
            ::tokio::task::yield_now().await;
        }
    }
    let parked = Parked { shm, role };
    shm.set_parked(role, true);
    if shm.ready(role)? {
        return Ok(ShmWoke::Again);
    }
    let efd = match role {
        Role::Read => &wait.data,
        Role::Write => &wait.space,
    };
    let woke = std::future::poll_fn(|cx| {
        if let Poll::Ready(guard) = efd.poll_read_ready(cx) {
            let mut guard = guard?;
            // Drain the counter until it says "empty": only that clears tokio's readiness,
            // so the next park really sleeps (a later ring is a new event).
            while let Ok(r) = guard.try_io(|fd| Ok(rustix::io::read(fd, &mut [0u8; 8])?)) {
                if let Err(e) = r {
                    return Poll::Ready(Err(e));
                }
            }
            return Poll::Ready(Ok(ShmWoke::Again));
        }
        // The read role watches the socket's own registration, the write role its copy (see
        // `ShmWait::hangup`): each keeps its own waker.
        let socket = socket_reg.get_ref().socket();
        match role {
            Role::Read => poll_peer_end(socket_reg, cx, shm, role, socket),
            Role::Write => poll_peer_end(&wait.hangup, cx, shm, role, socket),
        }
    })
    .await;
    drop(parked);
    shm.adapt(role, start.elapsed() < MAX_SPIN);
    woke
}

/// Polls a registration of a shared-memory connection's socket for the peer's end. The socket
/// carries nothing after the handshake: readable means the peer's end (or a protocol
/// violation). Bytes still in the ring are read first.
fn poll_peer_end<T: std::os::fd::AsRawFd>(
    reg: &AsyncFd<T>,
    cx: &mut std::task::Context<'_>,
    shm: &ShmLink,
    role: Role,
    socket: &std::os::unix::net::UnixStream,
) -> Poll<io::Result<ShmWoke>> {
    loop {
        let Poll::Ready(guard) = reg.poll_read_ready(cx) else { return Poll::Pending };
        let mut guard = guard?;
        if shm.ready(role)? {
            return Poll::Ready(Ok(ShmWoke::Again));
        }
        match guard.try_io(|_| socket_end(socket)) {
            Ok(Ok(_)) if role == Role::Read => return Poll::Ready(Ok(ShmWoke::PeerGone)),
            Ok(Ok(_)) => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            Ok(Err(e)) => return Poll::Ready(Err(e)),
            // Readiness cleared: poll again, which registers for the next event.
            Err(_would_block) => {}
        }
    }
}

/// Checks of the ring between two yields of a spinning task.
const SPIN_CHECKS: u32 = 64;

/// Withdraws a parking announcement however the wait ends (also when its future is dropped).
struct Parked<'a> {
    shm: &'a ShmLink,
    role: Role,
}

impl Drop for Parked<'_> {
    fn drop(&mut self) {
        self.shm.set_parked(self.role, false);
    }
}
