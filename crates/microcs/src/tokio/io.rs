//! Frame I/O on a tokio Unix stream, shared by the async client and server.
//!
//! Reading uses the blocking flavour's [`ReadBuf`] (one buffering policy: memory follows the
//! bytes received, never a declared size) through a non-blocking `try_read`. Writing goes through
//! an [`Outbox`]: producers (callers on the client, handler tasks on the server) encode whole
//! frames into one shared buffer under a short lock, and one writer task per connection drains
//! it with as few `send` calls as the kernel allows. While a write is in progress, new frames
//! pile up in the other buffer, so a busy connection batches by itself and an idle one sends at
//! once. A producer may also send what is queued itself while the writer task is idle
//! ([`OutState::send_now`]), which saves the writer's wake-up for a lone frame.

use std::io::{self, IoSlice};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use ::tokio::io::Interest;
use ::tokio::io::unix::{AsyncFd, AsyncFdReadyGuard};
use ::tokio::sync::Notify;

use super::shm_wait::{ShmWait, ShmWoke, shm_wait};
use crate::io::{Filled, ReadBuf, Source};
use crate::proto::{self, Header};
use crate::transport::shm::{Role, ShmLink};
use crate::transport::{Link, Shut, Transport};

/// A connected Unix stream, registered with tokio for *read* readiness only.
///
/// tokio's own `UnixStream` registers for reading and writing. A Unix socket tells its writer
/// "writable" every time the peer takes data out, so with write interest each reply the client
/// reads woke the server's `epoll_wait` for nothing, and each request the server read woke the
/// client's: a wake-up and a system call per request on each side, two context switches when
/// both share a CPU. Here writes go straight to the socket, and only a write that would block
/// registers for write readiness (a second descriptor of the same socket), for as long as it
/// waits.
pub(crate) struct Stream {
    fd: AsyncFd<Link>,
    /// Once the connection moved to shared memory: the eventfds this side sleeps on,
    /// registered with tokio (the socket's registration above then only reports the peer's end).
    shm: OnceLock<ShmWait>,
}

impl Stream {
    /// Registers a connected, non-blocking transport for read readiness.
    pub(crate) fn new(link: Link) -> io::Result<Stream> {
        let std = link;
        // SAFETY: the stream is owned by the `AsyncFd` and never replaced (no `get_mut`), so its
        // descriptor stays open and the same for the registration's whole life.
        let fd =
            unsafe { AsyncFd::register_with_interest(std, Interest::READABLE) }.map_err(io::Error::from)?;
        Ok(Stream { fd, shm: OnceLock::new() })
    }

    /// The transport under the registration.
    pub(crate) fn link(&self) -> &Link {
        self.fd.get_ref()
    }

    /// Moves the connection to shared memory (after the handshake, before any other frame):
    /// registers its eventfds with tokio, then switches the link.
    pub(crate) fn upgrade(&self, shm: ShmLink) -> io::Result<()> {
        let wait = ShmWait::new(self.link().socket(), &shm)?;
        let _ = self.shm.set(wait);
        self.link().upgrade(shm);
        Ok(())
    }
}

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.get_ref().as_fd()
    }
}

/// Waits for write readiness on behalf of one write that found the socket full; registered on
/// the first wait, deregistered when dropped (the write is done).
struct WriteWaiter<'a> {
    stream: &'a Stream,
    stall: Option<Duration>,
    fd: Option<AsyncFd<OwnedFd>>,
}

impl<'a> WriteWaiter<'a> {
    fn new(stream: &'a Stream, stall: Option<Duration>) -> WriteWaiter<'a> {
        WriteWaiter { stream, stall, fd: None }
    }

    /// Runs `send` (a non-blocking send) once the socket may take bytes: at once the first
    /// time, then after each wait for write readiness. `None`: it would still block (tokio's
    /// readiness is cleared; call again to wait).
    async fn send(&mut self, send: impl FnOnce() -> io::Result<usize>) -> io::Result<Option<usize>> {
        if let (Some(wait), Some(shm)) = (self.stream.shm.get(), self.stream.link().shm()) {
            return match send() {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let waited = shm_wait(&self.stream.fd, wait, shm, Role::Write);
                    match self.stall {
                        Some(t) => ::tokio::time::timeout(t, waited)
                            .await
                            .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??,
                        None => waited.await?,
                    };
                    Ok(None)
                }
                r => r.map(Some),
            };
        }
        let Some(fd) = &self.fd else {
            return match send() {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // A registration of its own, on a second descriptor of the socket: the
                    // reading one stays deaf to write readiness. An event that came between the
                    // failed send and this registration is reported by the registration itself.
                    let dup = rustix::io::fcntl_dupfd_cloexec(self.stream, 0)?;
                    // SAFETY: `dup` is owned by the `AsyncFd` and never replaced, so the descriptor
                    // stays open and the same until the registration is dropped.
                    let fd = unsafe { AsyncFd::register_with_interest(dup, Interest::WRITABLE) };
                    self.fd = Some(fd.map_err(io::Error::from)?);
                    Ok(None)
                }
                r => r.map(Some),
            };
        };
        let mut guard = match self.stall {
            Some(t) => ::tokio::time::timeout(t, fd.writable())
                .await
                .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??,
            None => fd.writable().await?,
        };
        match guard.try_io(|_| send()) {
            Ok(r) => r.map(Some),
            Err(_would_block) => Ok(None),
        }
    }
}

/// Queued bytes past which producers wait (client) or the connection stops reading (server):
/// enough to batch well, small enough that a peer that does not read cannot make us hoard.
pub(crate) const HIGH_WATER: usize = 1024 * 1024;
/// A drained batch buffer larger than this is given back instead of kept for the next batch.
const KEEP_CAPACITY: usize = 2 * HIGH_WATER;
/// Owned payloads at least this large are queued as they are and written from where they lie
/// (a vectored write), instead of being copied into the batch buffer.
pub(crate) const SPLICE_MIN: usize = 64 * 1024;

/// Frames waiting for the writer task, plus state `T` that must change atomically with them
/// (the client keeps its table of pending requests here).
pub(crate) struct Outbox<T> {
    state: Mutex<OutState<T>>,
    /// Wakes the writer task (one waiter; `notify_one` keeps a permit if it is busy).
    writer: Notify,
    /// Wakes producers waiting for the queue to drain below [`HIGH_WATER`].
    space: Notify,
}

/// The part of an [`Outbox`] behind its lock.
pub(crate) struct OutState<T> {
    buf: Vec<u8>,
    /// Large payloads queued without a copy: each goes into the stream at its offset in `buf`
    /// (after the header already there).
    spliced: Vec<(usize, Vec<u8>)>,
    /// Bytes in `spliced`.
    spliced_len: usize,
    /// Bytes queued since the connection opened: the stream offset at which `buf` ends. Lets
    /// the client tell, after a failure, which frames were written in full, in part, or not at
    /// all (see [`WriterEnd::written`]).
    enqueued: u64,
    /// The connection is finished: nothing more is queued and the writer drops what is left.
    closed: bool,
    /// The writer sends what is queued, then stops; nothing more is queued.
    finishing: bool,
    /// The writer task has taken a batch and is writing it: nobody else may write now.
    busy: bool,
    /// Bytes producers sent themselves (see [`OutState::send_now`]), counted in
    /// [`WriterEnd::written`].
    sent_direct: u64,
    /// The owner's state, changed under the same lock as the queue.
    pub extra: T,
}

impl<T> OutState<T> {
    /// Queues one frame. Returns its `(start, end)` offsets in the connection's byte stream, or
    /// `None` if the outbox no longer takes frames.
    pub(crate) fn push(&mut self, header: &Header, method: &[u8], payload: &[u8]) -> Option<(u64, u64)> {
        if self.closed || self.finishing {
            return None;
        }
        let start = self.enqueued;
        let before = self.buf.len();
        proto::encode(&mut self.buf, header, method, payload);
        self.enqueued += (self.buf.len() - before) as u64;
        Some((start, self.enqueued))
    }

    /// Queues one frame whose payload the caller gives away: a large one is written from its
    /// own vector, not copied.
    pub(crate) fn push_owned(
        &mut self,
        header: &Header,
        method: &[u8],
        payload: Vec<u8>,
    ) -> Option<(u64, u64)> {
        if payload.len() < SPLICE_MIN {
            return self.push(header, method, &payload);
        }
        if self.closed || self.finishing {
            return None;
        }
        let start = self.enqueued;
        self.buf.extend_from_slice(&header.to_bytes(method.len(), payload.len()));
        self.buf.extend_from_slice(method);
        self.enqueued += (proto::FRAME_OVERHEAD + method.len() + payload.len()) as u64;
        self.spliced_len += payload.len();
        self.spliced.push((self.buf.len(), payload));
        Some((start, self.enqueued))
    }

    /// Queues one frame as [`push`](OutState::push) does, but if nothing is queued and the
    /// writer task is idle, first offers it to the socket straight from `payload` (one
    /// non-blocking `sendmsg`), so only what the socket does not take is copied into the
    /// queue. Returns the frame's offsets and whether it went out whole (then the writer task
    /// need not be woken); `None` if the outbox no longer takes frames.
    ///
    /// For large payloads, that a caller only lends: the part the socket takes at once (its
    /// send buffer, some 200 KiB) is not copied.
    pub(crate) fn push_send(
        &mut self,
        stream: &Stream,
        header: &Header,
        method: &[u8],
        payload: &[u8],
    ) -> Option<((u64, u64), bool)> {
        if self.busy || !self.buf.is_empty() || !self.spliced.is_empty() {
            return self.push(header, method, payload).map(|r| (r, false));
        }
        if self.closed || self.finishing {
            return None;
        }
        let head = header.to_bytes(method.len(), payload.len());
        let parts = [IoSlice::new(&head), IoSlice::new(method), IoSlice::new(payload)];
        let total = head.len() + method.len() + payload.len();
        // An error is left for the writer task to meet again and report, as in `send_now`.
        // Over shared memory the ring takes a ring's worth at once, and more as the peer
        // copies out: while it keeps up, the caller writes on (a bounded spin, never a wait).
        let sent = match stream.link().shm() {
            Some(shm) => shm.send_while_room(&parts),
            None => stream.link().send(&parts, false).unwrap_or(0),
        }
        .min(total);
        let start = self.enqueued;
        self.enqueued += total as u64;
        self.sent_direct += sent as u64;
        let mut skip = sent;
        for part in [&head[..], method, payload] {
            if skip >= part.len() {
                skip -= part.len();
            } else {
                self.buf.extend_from_slice(&part[skip..]);
                skip = 0;
            }
        }
        Some(((start, self.enqueued), sent == total))
    }

    /// Bytes queued and not yet taken by the writer.
    fn queued(&self) -> usize {
        self.buf.len() + self.spliced_len
    }

    /// Sends what is queued right here, with one non-blocking `send`, if the writer task is
    /// idle; returns `true` if nothing is left for the writer task (so it need not be woken).
    ///
    /// Why: handing a lone frame to the writer task costs a wake-up and a task poll, on the
    /// critical path of every sequential request. The lock is held over the `send` so that no
    /// frame can overtake this one; the `send` never blocks. Whatever is not taken (a full
    /// socket, a partial write, an error) stays queued for the writer task, which waits for
    /// room and reports errors as before.
    pub(crate) fn send_now(&mut self, stream: &Stream) -> bool {
        if self.busy || self.closed || !self.spliced.is_empty() {
            return self.buf.is_empty() && self.spliced.is_empty();
        }
        if self.buf.is_empty() {
            return true;
        }
        match stream.link().send(&[IoSlice::new(&self.buf)], false) {
            Ok(n) if n == self.buf.len() => {
                self.sent_direct += n as u64;
                self.buf.clear();
                true
            }
            Ok(n) => {
                self.sent_direct += n as u64;
                self.buf.drain(..n);
                false
            }
            Err(_) => false,
        }
    }

    /// True once the outbox takes no more frames.
    pub(crate) fn is_closed(&self) -> bool {
        self.closed || self.finishing
    }

    /// Takes no more frames and drops the queued ones; the writer stops.
    pub(crate) fn close(&mut self) {
        self.closed = true;
        self.buf = Vec::new();
        self.spliced = Vec::new();
        self.spliced_len = 0;
    }
}

/// How a writer task ended.
pub(crate) struct WriterEnd {
    /// Bytes handed to the kernel in all; frames that end at or before this offset may have
    /// reached the peer, frames that start at or after it certainly did not.
    pub written: u64,
    /// The write error that ended it, if any.
    pub error: Option<io::Error>,
}

impl<T> Outbox<T> {
    pub(crate) fn new(extra: T) -> Outbox<T> {
        Outbox {
            state: Mutex::new(OutState {
                buf: Vec::new(),
                spliced: Vec::new(),
                spliced_len: 0,
                enqueued: 0,
                closed: false,
                finishing: false,
                busy: false,
                sent_direct: 0,
                extra,
            }),
            writer: Notify::new(),
            space: Notify::new(),
        }
    }

    /// Locks the queue and the owner's state. Never held across an `.await`.
    pub(crate) fn lock(&self) -> MutexGuard<'_, OutState<T>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Tells the writer there is something to do; call after pushing, with the lock released.
    pub(crate) fn wake(&self) {
        self.writer.notify_one();
    }

    /// Queues one frame and wakes the writer; `false` if the outbox no longer takes frames.
    pub(crate) fn push(&self, header: &Header, method: &[u8], payload: &[u8]) -> bool {
        let queued = self.lock().push(header, method, payload).is_some();
        if queued {
            self.wake();
        }
        queued
    }

    /// Bytes queued and not yet taken by the writer.
    pub(crate) fn queued(&self) -> usize {
        self.lock().queued()
    }

    /// Whether [`wait_space`](Outbox::wait_space) would return at once.
    pub(crate) fn has_space(&self) -> bool {
        let st = self.lock();
        st.queued() < HIGH_WATER || st.is_closed()
    }

    /// Waits until fewer than [`HIGH_WATER`] bytes are queued (or the outbox is closed).
    ///
    /// Cancel safe: it only waits.
    pub(crate) async fn wait_space(&self) {
        loop {
            let notified = self.space.notified();
            ::tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let st = self.lock();
                if st.queued() < HIGH_WATER || st.is_closed() {
                    return;
                }
            }
            notified.await;
        }
    }

    /// Takes no more frames and drops the queued ones; wakes the writer and waiting producers.
    pub(crate) fn close(&self) {
        self.lock().close();
        self.wake();
        self.space.notify_waiters();
    }

    /// Takes no more frames; the writer sends what is queued, then stops.
    pub(crate) fn finish(&self) {
        self.lock().finishing = true;
        self.wake();
        self.space.notify_waiters();
    }

    /// The writer task's body: sends queued frames until the outbox is closed or finished, or
    /// a write fails. `stall` bounds how long one write may wait for the peer to make room.
    pub(crate) async fn run_writer(&self, stream: &Stream, stall: Option<Duration>) -> WriterEnd {
        let mut batch = Vec::new();
        let mut spliced = Vec::new();
        let mut written = 0u64;
        loop {
            let got_batch = {
                let mut st = self.lock();
                st.busy = false;
                if st.closed || (st.buf.is_empty() && st.finishing) {
                    return WriterEnd { written: written + st.sent_direct, error: None };
                }
                std::mem::swap(&mut st.buf, &mut batch);
                std::mem::swap(&mut st.spliced, &mut spliced);
                st.spliced_len = 0;
                st.busy = !batch.is_empty();
                st.busy
            };
            if !got_batch {
                self.writer.notified().await;
                continue;
            }
            self.space.notify_waiters();
            let sent = if spliced.is_empty() {
                write_all(stream, &batch, stall, &mut written).await
            } else {
                // The batch buffer around the spliced payloads, in stream order.
                let mut parts = Vec::with_capacity(2 * spliced.len() + 1);
                let mut at = 0;
                for (offset, payload) in &spliced {
                    parts.push(IoSlice::new(&batch[at..*offset]));
                    parts.push(IoSlice::new(payload));
                    at = *offset;
                }
                parts.push(IoSlice::new(&batch[at..]));
                write_all_vectored(stream, &mut parts, stall, &mut written).await
            };
            spliced.clear();
            if let Err(e) = sent {
                self.close();
                let direct = self.lock().sent_direct;
                return WriterEnd { written: written + direct, error: Some(e) };
            }
            batch.clear();
            if batch.capacity() > KEEP_CAPACITY {
                batch = Vec::new();
            }
        }
    }
}

/// Writes all of `bytes`, counting progress in `written`. Never raises SIGPIPE.
pub(crate) async fn write_all(
    stream: &Stream,
    mut bytes: &[u8],
    stall: Option<Duration>,
    written: &mut u64,
) -> io::Result<()> {
    let mut waiter = WriteWaiter::new(stream, stall);
    while !bytes.is_empty() {
        match waiter.send(|| stream.link().send(&[IoSlice::new(bytes)], false)).await {
            Ok(Some(0)) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(Some(n)) => {
                bytes = &bytes[n..];
                *written += n as u64;
            }
            Ok(None) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// [`write_all`] for several slices, with one `sendmsg` for as many of them as the socket takes.
async fn write_all_vectored(
    stream: &Stream,
    mut parts: &mut [IoSlice<'_>],
    stall: Option<Duration>,
    written: &mut u64,
) -> io::Result<()> {
    let mut left: usize = parts.iter().map(|p| p.len()).sum();
    let mut waiter = WriteWaiter::new(stream, stall);
    while left > 0 {
        let sent = waiter.send(|| stream.link().send(parts, false)).await;
        match sent {
            Ok(Some(0)) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(Some(n)) => {
                IoSlice::advance_slices(&mut parts, n);
                left -= n;
                *written += n as u64;
            }
            Ok(None) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads once more into `rbuf` (see [`ReadBuf::fill`]), waiting for the socket to be readable.
///
/// Cancel safe: bytes are only ever taken from the socket and stored in `rbuf` in one step.
pub(crate) async fn read_more(stream: &Stream, rbuf: &mut ReadBuf, needed: usize) -> io::Result<Filled> {
    if let (Some(wait), Some(shm)) = (stream.shm.get(), stream.link().shm()) {
        loop {
            match rbuf.fill_from(needed, &mut ShmRead(shm)) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                r => return r,
            }
            if shm_wait(&stream.fd, wait, shm, Role::Read).await? == ShmWoke::PeerGone {
                return Ok(Filled::Eof);
            }
        }
    }
    loop {
        let mut guard = stream.fd.readable().await?;
        match rbuf.fill_from(needed, &mut TryRead(&mut guard)) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            r => return r,
        }
    }
}

/// [`read_more`] on the socket, keeping the descriptors that come with the bytes in `fds` (the
/// handshake answer's, before any shared memory is in use).
pub(crate) async fn read_more_with_fds(
    stream: &Stream,
    rbuf: &mut ReadBuf,
    needed: usize,
    fds: &mut Vec<OwnedFd>,
) -> io::Result<Filled> {
    loop {
        let mut guard = stream.fd.readable().await?;
        let r = guard.try_io(|link| {
            let mut src = crate::transport::unix::WithFds { socket: link.get_ref().socket(), fds: &mut *fds };
            rbuf.fill_from(needed, &mut src)
        });
        match r {
            Ok(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Ok(r) => return r,
            Err(_would_block) => continue,
        }
    }
}

/// A non-blocking read under a readiness guard: `WouldBlock` clears tokio's readiness, so the
/// next `readable().await` really waits.
///
/// A short read clears it too. On a stream socket, a read that returns less than it was given
/// room for has emptied the receive queue, so the `read` that would follow could only say
/// `EAGAIN`: one system call per wake-up saved, on both sides of every request. This is safe
/// against bytes arriving in between: tokio clears only the readiness event it saw before the
/// read, and a later arrival is a new event.
struct TryRead<'g, 'a>(&'g mut AsyncFdReadyGuard<'a, Link>);

impl TryRead<'_, '_> {
    /// `read` runs inside `try_io` and returns (bytes read, room it had).
    fn read_with(&mut self, read: impl FnOnce(&Link) -> io::Result<(usize, usize)>) -> io::Result<usize> {
        let mut got = 0;
        let r = self.0.try_io(|fd| {
            let (n, room) = read(fd.get_ref())?;
            got = n;
            if n > 0 && n < room { Err(io::ErrorKind::WouldBlock.into()) } else { Ok(n) }
        });
        match r {
            Ok(r) => r,
            Err(_would_block) if got > 0 => Ok(got),
            Err(_would_block) => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

impl Source for TryRead<'_, '_> {
    fn read_into(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let room = buf.len();
        self.read_with(|s| Ok((s.recv(buf)?, room)))
    }

    /// Straight into the vector's spare capacity, without zero-filling it first: a large
    /// payload's pages become resident only as its bytes arrive.
    fn read_spare(&mut self, v: &mut Vec<u8>) -> io::Result<usize> {
        let room = v.capacity() - v.len();
        self.read_with(|s| Ok((s.recv_spare(v)?, room)))
    }
}

/// Reads the ring of a shared-memory connection without waiting (`WouldBlock` when empty).
struct ShmRead<'a>(&'a ShmLink);

impl Source for ShmRead<'_> {
    fn read_into(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.try_recv(buf)
    }

    fn read_spare(&mut self, v: &mut Vec<u8>) -> io::Result<usize> {
        self.0.try_recv_spare(v)
    }
}

/// Shuts both directions of the connection down: wakes a task blocked reading or writing it,
/// and tells the peer we are gone even while other references keep the descriptor open.
pub(crate) fn shutdown(stream: &Stream) {
    stream.link().shut(Shut::Both);
}
