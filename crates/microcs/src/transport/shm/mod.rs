//! The shared-memory transport (PROTOCOL.md § 18): two SPSC byte rings in a sealed memfd, an
//! eventfd for each waiting role, and the connection's socket, which stays open to tell each
//! side that the other is gone.
//!
//! The rings carry exactly the bytes the socket would, so everything above [`Transport`]
//! (read buffer, codec, protocol core, dispatch) is unchanged. This module decides only how to
//! move and wait: spin a short, adaptive time while the peer is likely to answer soon, then
//! announce "parked" in the region and sleep in `poll` on the eventfd and the socket; a writer
//! signals an eventfd only when the other side announced it sleeps.
//!
//! [`Transport`]: super::Transport

use std::io::{self, IoSlice};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rustix::event::{EventfdFlags, PollFd, PollFlags, Timespec};

pub mod fuzz;
pub(crate) mod map;
pub(crate) mod ring;
mod spin;

use crate::proto::server_conn::{Handshake, Out};
use map::Mapping;
use ring::{Dir, Reader, Writer};

/// Whether servers offer, and clients ask for, shared memory by default.
pub(crate) const DEFAULT_SHM: bool = false;

/// A client's choice: the builder's, else `MICROCS_SHM` (`1`/`0`), else [`DEFAULT_SHM`].
pub(crate) fn client_wants(option: Option<bool>) -> bool {
    option.unwrap_or_else(|| match std::env::var("MICROCS_SHM").as_deref() {
        Ok("1") => true,
        Ok("0") => false,
        _ => DEFAULT_SHM,
    })
}

/// Bytes of each ring unless configured otherwise.
pub(crate) const DEFAULT_RING_CAPACITY: u32 = 256 * 1024;
/// Descriptors sent with the `HelloAck`: the memfd, then `A.data`, `A.space`, `B.data`,
/// `B.space`.
pub(crate) const FDS: usize = 5;

/// Frames of answers a server sends at a time while requests remain to be read, when the
/// peer runs on another CPU ([`ShmLink::answer_in_parts`]). Measured with 64 requests in flight
/// (BENCHMARKS.md, e2e notes, change 22): 4 and 8 cost more in per-part work than they gain,
/// 32 and 48 leave the sides taking turns again.
const ANSWER_EVERY: u32 = 16;

/// A server connection's count of the answers to one read's requests, for sending them in parts
/// (PROTOCOL.md § 18.5, "Answers in parts"): both flavours' read loops keep one.
#[derive(Default)]
pub(crate) struct AnswerParts {
    /// Whether this read's answers go in parts: asked once per read, when a part is full.
    in_parts: Option<bool>,
    unflushed: u32,
}

impl AnswerParts {
    /// One more answer of this read, with requests still to read after it: `true` when it
    /// completes a part that should be sent now.
    pub(crate) fn part_full(&mut self, shm: &ShmLink) -> bool {
        self.unflushed += 1;
        let full =
            self.unflushed >= ANSWER_EVERY && *self.in_parts.get_or_insert_with(|| shm.answer_in_parts());
        if full {
            self.unflushed = 0;
        }
        full
    }

    /// The read's requests are all taken: the next read counts afresh.
    pub(crate) fn end_read(&mut self) {
        *self = AnswerParts::default();
    }
}

pub(crate) use spin::MAX_SPIN;
use spin::SpinBudget;

/// One connection's shared-memory side (the socket is the caller's: [`super::Link`]).
#[derive(Debug)]
pub(crate) struct ShmLink {
    map: Mapping,
    tx: Writer,
    rx: Reader,
    /// Wakes the peer's reader of the ring we write.
    tx_data: OwnedFd,
    /// We sleep on it when the ring we write is full.
    tx_space: OwnedFd,
    /// We sleep on it when the ring we read is empty.
    rx_data: OwnedFd,
    /// Wakes the peer's writer of the ring we read.
    rx_space: OwnedFd,
    /// The spin budgets of the waits for data and for room (§ 18.5): apart, because they
    /// differ (a reply waits for a handler, room for the peer's copy out of the ring).
    spin: [SpinBudget; 2],
    /// The machine has more than one CPU online: spinning can ever pay.
    multi_cpu: bool,
    read_shut: AtomicBool,
}

/// Which wait: the reader's for data, or the writer's for room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    Read,
    Write,
}

/// How a wait ended.
enum Woke {
    Ready,
    TimedOut,
    /// The socket is readable or hung up: the peer is gone (or broke the protocol).
    PeerGone,
}

impl ShmLink {
    /// The server's side of a new region with rings of `capacity` bytes, and the memfd to send
    /// (with [`fds_to_send`](Self::fds_to_send)).
    pub(crate) fn offer(capacity: u32) -> io::Result<(ShmLink, OwnedFd)> {
        debug_assert!(ring::valid_capacity(capacity));
        let (memfd, map) = Mapping::create(ring::region_len(capacity))?;
        ring::init_header(&map, capacity);
        let efd = || rustix::event::eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK);
        let (a_data, a_space, b_data, b_space) = (efd()?, efd()?, efd()?, efd()?);
        let link = ShmLink::new(map, capacity, Dir::B, [a_data, a_space, b_data, b_space]);
        Ok((link, memfd))
    }

    /// The descriptors to pass with the `HelloAck`, in the order of PROTOCOL.md § 18.1.
    pub(crate) fn fds_to_send<'a>(&'a self, memfd: &'a OwnedFd) -> [BorrowedFd<'a>; FDS] {
        // Server: we read A and write B.
        [
            memfd.as_fd(),
            self.rx_data.as_fd(),
            self.rx_space.as_fd(),
            self.tx_data.as_fd(),
            self.tx_space.as_fd(),
        ]
    }

    /// The client's side, from the descriptors that came with the `HelloAck` announcing rings
    /// of `capacity` bytes; every check of PROTOCOL.md § 18.1 step 3.
    pub(crate) fn accept(fds: Vec<OwnedFd>, capacity: u32) -> io::Result<ShmLink> {
        let Ok([memfd, a_data, a_space, b_data, b_space]) = <[OwnedFd; FDS]>::try_from(fds) else {
            return Err(ring::corrupt("the handshake did not carry exactly five descriptors".into()));
        };
        if !ring::valid_capacity(capacity) {
            return Err(ring::corrupt(format!(
                "ring capacity {capacity} is not a power of two in 4 KiB-64 MiB"
            )));
        }
        let map = Mapping::attach(&memfd, ring::region_len(capacity))?;
        ring::check_header(&map, capacity)?;
        for fd in [&a_data, &a_space, &b_data, &b_space] {
            rustix::io::ioctl_fionbio(fd, true)?;
        }
        Ok(ShmLink::new(map, capacity, Dir::A, [a_data, a_space, b_data, b_space]))
    }

    /// `writes`: the ring this side writes (A for the client, B for the server).
    fn new(
        map: Mapping,
        capacity: u32,
        writes: Dir,
        [a_data, a_space, b_data, b_space]: [OwnedFd; 4],
    ) -> ShmLink {
        let reads = if writes == Dir::A { Dir::B } else { Dir::A };
        let (tx_data, tx_space, rx_data, rx_space) = match writes {
            Dir::A => (a_data, a_space, b_data, b_space),
            Dir::B => (b_data, b_space, a_data, a_space),
        };
        ShmLink {
            map,
            tx: Writer::new(writes, capacity),
            rx: Reader::new(reads, capacity),
            tx_data,
            tx_space,
            rx_data,
            rx_space,
            spin: Default::default(),
            multi_cpu: online_cpus() > 1,
            read_shut: AtomicBool::new(false),
        }
    }

    /// Reads what is available, waiting (up to `timeout`, `None` = forever) if nothing is.
    pub(crate) fn recv(
        &self,
        socket: &UnixStream,
        timeout: Option<Duration>,
        buf: &mut [u8],
    ) -> io::Result<usize> {
        self.recv_with(socket, timeout, buf.is_empty(), |m, rx| rx.read(m, buf))
    }

    /// Reads into `v`'s spare capacity (at least one byte's room), extending its length.
    pub(crate) fn recv_spare(
        &self,
        socket: &UnixStream,
        timeout: Option<Duration>,
        v: &mut Vec<u8>,
    ) -> io::Result<usize> {
        let room = (v.capacity() - v.len()).max(1);
        self.recv_with(socket, timeout, false, |m, rx| rx.read_spare(m, v, room))
    }

    fn recv_with(
        &self,
        socket: &UnixStream,
        timeout: Option<Duration>,
        empty: bool,
        mut read: impl FnMut(&Mapping, &Reader) -> io::Result<ring::Read>,
    ) -> io::Result<usize> {
        loop {
            match self.try_with(empty, &mut read) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                r => return r,
            }
            match self.wait(socket, Role::Read, timeout)? {
                Woke::Ready => {}
                Woke::TimedOut => return Err(io::ErrorKind::WouldBlock.into()),
                Woke::PeerGone => {
                    if self.rx.available(&self.map)? == 0 {
                        return socket_end(socket);
                    }
                }
            }
        }
    }

    /// Reads what is available without waiting: `WouldBlock` when the ring is empty, 0 (end of
    /// stream) once our read side is shut. For a caller that waits by itself (tokio).
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))] // used by the tokio flavour
    pub(crate) fn try_recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.try_with(buf.is_empty(), |m, rx| rx.read(m, buf))
    }

    /// [`try_recv`](Self::try_recv) into `v`'s spare capacity, extending its length.
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))] // used by the tokio flavour
    pub(crate) fn try_recv_spare(&self, v: &mut Vec<u8>) -> io::Result<usize> {
        let room = (v.capacity() - v.len()).max(1);
        self.try_with(false, |m, rx| rx.read_spare(m, v, room))
    }

    fn try_with(
        &self,
        empty: bool,
        mut read: impl FnMut(&Mapping, &Reader) -> io::Result<ring::Read>,
    ) -> io::Result<usize> {
        let r = read(&self.map, &self.rx)?;
        if r.wake {
            signal(&self.rx_space);
        }
        if r.n > 0 || empty || self.read_shut.load(Ordering::Relaxed) {
            Ok(r.n)
        } else {
            Err(io::ErrorKind::WouldBlock.into())
        }
    }

    /// Writes as much of `parts` as fits, waiting for room (up to `timeout`, `None` = forever:
    /// the socket's send timeout, which [`Link`](super::Link) keeps) when `wait` and none is
    /// free.
    pub(crate) fn send(
        &self,
        socket: &UnixStream,
        timeout: Option<Duration>,
        parts: &[IoSlice<'_>],
        wait: bool,
    ) -> io::Result<usize> {
        if parts.iter().all(|p| p.is_empty()) {
            return Ok(0);
        }
        loop {
            if self.tx.reader_closed(&self.map) {
                return Err(io::ErrorKind::BrokenPipe.into());
            }
            let w = self.tx.write(&self.map, parts)?;
            if w.wake {
                signal(&self.tx_data);
            }
            if w.n > 0 {
                return Ok(w.n);
            }
            if !wait {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            match self.wait(socket, Role::Write, timeout)? {
                Woke::Ready => {}
                Woke::TimedOut => return Err(io::ErrorKind::WouldBlock.into()),
                Woke::PeerGone => return Err(io::ErrorKind::BrokenPipe.into()),
            }
        }
    }

    /// Writes as much of `parts` as the ring takes, and more as the reader makes room, spinning
    /// for that room (never parking) for one write-room spin budget in all — the waits of one
    /// call together, so a reader that frees room slowly cannot hold the caller's thread for
    /// longer than the copies and that one budget; returns the bytes written. For a sender that must not wait but would rather not copy:
    /// the tokio client's lone large request, written from its caller's slice under the
    /// connection's lock (PROTOCOL.md § 18.5), which queues only what this did not write. An
    /// error (a broken ring, the peer gone) ends it early; the writer task meets it again.
    #[cfg(feature = "tokio")]
    pub(crate) fn send_while_room(&self, parts: &[IoSlice<'_>]) -> usize {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let mut left: Vec<IoSlice<'_>> = parts.to_vec();
        let mut bufs = &mut left[..];
        let (mut sent, mut budget, mut waited) = (0, None, Duration::ZERO);
        while !self.tx.reader_closed(&self.map) {
            let Ok(w) = self.tx.write(&self.map, bufs) else { break };
            if w.wake {
                signal(&self.tx_data);
            }
            sent += w.n;
            if sent >= total {
                break;
            }
            IoSlice::advance_slices(&mut bufs, w.n);
            let budget = match budget {
                Some(b) => b,
                None => match self.spin_budget(Role::Write) {
                    Some(b) => *budget.insert(b),
                    None => break,
                },
            };
            // Room comes as the reader copies out (it publishes every 32 KiB); the waits of
            // this call share one budget, so it goes on only while the reader keeps up.
            let (start, mut i) = (Instant::now(), 0u32);
            loop {
                match self.tx.room(&self.map) {
                    Ok(n) if n > 0 => break,
                    Ok(_) => {}
                    Err(_) => return sent,
                }
                i = i.wrapping_add(1);
                if i % 16 == 0 && waited + start.elapsed() >= budget {
                    self.adapt(Role::Write, false);
                    return sent;
                }
                std::hint::spin_loop();
            }
            waited += start.elapsed();
        }
        sent
    }

    /// Stops reading: the peer's further writes fail, what it wrote is still read.
    pub(crate) fn shut_read(&self) {
        self.rx.close(&self.map);
        self.read_shut.store(true, Ordering::Relaxed);
        signal(&self.rx_space);
    }

    /// Bytes in the ring we read (for a server deciding whether a reader is needed).
    pub(crate) fn has_input(&self) -> bool {
        self.rx.available(&self.map).map_or(true, |n| n > 0)
    }

    /// Position of the next byte we write, to ask later whether the peer read past it.
    pub(crate) fn mark(&self) -> u64 {
        self.tx.position()
    }

    /// Bytes we wrote that the peer has not consumed (`None` when its index is not believable):
    /// the last ones written, which it never saw. (The tokio client's; the blocking one marks
    /// each request with [`mark`](Self::mark).)
    #[cfg(feature = "tokio")]
    pub(crate) fn unread_by_peer(&self) -> Option<u64> {
        self.tx.consumed(&self.map).ok().map(|head| self.tx.position().wrapping_sub(head))
    }

    /// The peer has not consumed a byte written after `mark`: it never saw them.
    pub(crate) fn untouched_since(&self, mark: u64) -> bool {
        self.tx.consumed(&self.map).is_ok_and(|head| head == mark)
    }

    /// Whether the wait of `role` is over: data to read (or the read side shut), or room to
    /// write (or the reader gone).
    pub(crate) fn ready(&self, role: Role) -> io::Result<bool> {
        Ok(match role {
            Role::Read => self.rx.available(&self.map)? > 0 || self.read_shut.load(Ordering::Relaxed),
            Role::Write => self.tx.room(&self.map)? > 0 || self.tx.reader_closed(&self.map),
        })
    }

    /// Announces (`true`, followed by a `SeqCst` fence) or withdraws that `role` sleeps. After
    /// announcing, the caller checks [`ready`](Self::ready) once more before sleeping: that
    /// re-check after the fence is what makes the wake-up impossible to lose (§ 18.3).
    pub(crate) fn set_parked(&self, role: Role, parked: bool) {
        match role {
            Role::Read => self.rx.set_parked(&self.map, parked),
            Role::Write => self.tx.set_parked(&self.map, parked),
        }
    }

    /// The eventfd the peer rings to end a parked wait of `role`.
    pub(crate) fn wait_fd(&self, role: Role) -> BorrowedFd<'_> {
        match role {
            Role::Read => self.rx_data.as_fd(),
            Role::Write => self.tx_space.as_fd(),
        }
    }

    /// How long the wait of `role` spins before parking, `None` when spinning cannot pay now
    /// (one CPU, the peer on ours, or spins that kept missing: see [`SpinBudget`]).
    pub(crate) fn spin_budget(&self, role: Role) -> Option<Duration> {
        if self.spin_pays() { self.spin[role as usize].next() } else { None }
    }

    /// Spins (if it may pay), then parks on the eventfd of `role` and the socket until ready,
    /// the timeout, or the peer's end.
    fn wait(&self, socket: &UnixStream, role: Role, timeout: Option<Duration>) -> io::Result<Woke> {
        let start = Instant::now();
        if let Some(budget) = self.spin_budget(role) {
            let mut i = 0u32;
            loop {
                if self.ready(role)? {
                    self.adapt(role, true);
                    return Ok(Woke::Ready);
                }
                i = i.wrapping_add(1);
                if i % 16 == 0 && start.elapsed() >= budget {
                    break;
                }
                std::hint::spin_loop();
            }
        }
        self.set_parked(role, true);
        if self.ready(role)? {
            self.set_parked(role, false);
            return Ok(Woke::Ready);
        }
        let efd = self.wait_fd(role);
        let left = timeout.map(|t| t.saturating_sub(start.elapsed()));
        let ts = left.map(|d| Timespec { tv_sec: d.as_secs() as i64, tv_nsec: i64::from(d.subsec_nanos()) });
        let mut fds =
            [PollFd::new(&efd, PollFlags::IN), PollFd::new(socket, PollFlags::IN | PollFlags::RDHUP)];
        let polled = rustix::event::poll(&mut fds, ts.as_ref());
        self.set_parked(role, false);
        let (efd_ready, socket_ready) = (!fds[0].revents().is_empty(), !fds[1].revents().is_empty());
        if efd_ready {
            drain(efd);
        }
        match polled {
            Err(rustix::io::Errno::INTR) => return Err(io::ErrorKind::Interrupted.into()),
            Err(e) => return Err(e.into()),
            Ok(_) => {}
        }
        // Would a longer spin have caught it? Then spin longer next time, else shorter.
        self.adapt(role, start.elapsed() < MAX_SPIN);
        if self.ready(role)? {
            return Ok(Woke::Ready);
        }
        Ok(if socket_ready {
            Woke::PeerGone
        } else if efd_ready {
            Woke::Ready
        } else {
            Woke::TimedOut
        })
    }

    /// Whether a server should send the answers to the requests of one read in parts of
    /// [`ANSWER_EVERY`] frames, not all at once after the last (PROTOCOL.md § 18.5): when the
    /// peer runs on another CPU, it works on the first answers while we make the rest, instead
    /// of the two sides taking turns. On the peer's CPU that would only interrupt us.
    pub(crate) fn answer_in_parts(&self) -> bool {
        self.spin_pays()
    }

    /// Spinning only helps when the peer can run meanwhile: another CPU, and not the one we
    /// are on (§ 18.5). Publishes our CPU for the peer's same check.
    fn spin_pays(&self) -> bool {
        if !self.multi_cpu {
            return false;
        }
        let me = rustix::thread::sched_getcpu() as u32 + 1;
        self.rx.publish_cpu(&self.map, me);
        self.tx.peer_cpu(&self.map) != me
    }

    /// The wait of `role` should spin longer next time (`true`: it ended within the longest
    /// spin), or shorter.
    pub(crate) fn adapt(&self, role: Role, longer: bool) {
        self.spin[role as usize].adapt(longer);
    }
}

/// The server's answer to an accepted `Hello` (PROTOCOL.md § 18.1 step 2), for both flavours.
///
/// When the client asked, `offers` (the server's option) and the region can be made, the
/// `HelloAck` with the offer goes out here, over `socket` with the descriptors, and the link to
/// use from now on is returned (`Ok(Ok)`; `Ok(Err)`: sending failed, close the connection).
/// Otherwise (`Err`) the plain `HelloAck` to send as usual. `buffered`: the client already sent
/// bytes after its `Hello`; they were meant for the socket, so it stays on the socket.
pub(crate) fn answer_hello(
    handshake: Handshake,
    offers: bool,
    capacity: u32,
    buffered: bool,
    socket: &UnixStream,
    conn: u64,
) -> Result<io::Result<ShmLink>, Out> {
    if !(handshake.wants_shm() && offers) || buffered {
        return Err(handshake.answer(None));
    }
    let (link, memfd) = match ShmLink::offer(capacity) {
        Ok(made) => made,
        Err(e) => {
            tracing::warn!(conn, error = %e, "cannot create shared memory; using the socket");
            return Err(handshake.answer(None));
        }
    };
    let ack = handshake.answer(Some(capacity));
    let mut bytes = Vec::new();
    crate::proto::encode(&mut bytes, &ack.header, b"", &ack.payload);
    Ok(super::unix::send_with_fds(socket, &bytes, &link.fds_to_send(&memfd)).map(|()| link))
}

/// CPUs the machine has online (not the ones this process may use: a process pinned to one CPU
/// with `taskset` still gains from spinning while its peer runs on another). Read once.
fn online_cpus() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(|| {
        let counted = std::fs::read_to_string("/sys/devices/system/cpu/online").ok().and_then(|list| {
            // "0-3,5,7-8"
            list.trim().split(',').try_fold(0usize, |n, range| {
                let (a, b) = range.split_once('-').unwrap_or((range, range));
                Some(n + b.parse::<usize>().ok()?.checked_sub(a.parse::<usize>().ok()?)? + 1)
            })
        });
        counted
            .filter(|&n| n > 0)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    })
}

/// Rings the eventfd; a full counter (a peer never draining it) is already rung.
fn signal(efd: &OwnedFd) {
    let _ = rustix::io::write(efd, &1u64.to_ne_bytes());
}

/// Resets an eventfd's counter (non-blocking; nothing to read is fine).
pub(crate) fn drain(efd: impl AsFd) {
    let _ = rustix::io::read(efd, &mut [0u8; 8]);
}

/// The socket woke us after the handshake: its end (the peer closed or died), or bytes that
/// have no business being there.
pub(crate) fn socket_end(socket: &UnixStream) -> io::Result<usize> {
    match rustix::io::read(socket, &mut [0u8; 1]) {
        Ok(0) => Ok(0),
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "bytes on the socket of a shared-memory connection after the handshake",
        )),
        Err(rustix::io::Errno::AGAIN) => Err(io::ErrorKind::WouldBlock.into()),
        Err(e) => Err(e.into()),
    }
}
