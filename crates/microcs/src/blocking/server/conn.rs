//! A blocking server's connections: accepting, the threads that read them (each request's run:
//! `run.rs`), the sentinel that starts a follower reader when a handler runs long (see the
//! parent module).

use std::collections::HashMap;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::net::SocketFlags;

use crate::dispatch::Answer;
#[cfg(doc)]
use crate::error::ErrorKind;
use crate::error::Result;
use crate::io::{Filled, LARGE_PAYLOAD, ReadBuf, SPARE_MAX, is_timeout, log_write_failed};
use crate::proto::server_conn::{self, Action, Out, ServerConn, broken, frame_timed_out, refuse_connection};
use crate::proto::{self, DecodeError, Decoded, FRAME_OVERHEAD, status};
use crate::registry::Claim;
use crate::request::Peer;
use crate::service::{
    Config, Counted, IdleWatch, Service, WATCH_PERIOD, Watch, idle_expired, record_connections, watch_name,
};
use crate::transport::shm::{AnswerParts, answer_hello};
use crate::transport::unix::{set_recv_timeout, set_send_buffer, set_send_timeout};
use crate::transport::{Link, SendError, Shut, Transport, send_bytes, send_frame};

use super::Trigger;
use super::run::{Job, run};
use crate::handler::SyncHandler;

/// How often the sentinel looks at busy connections.
pub(super) const TICK: Duration = Duration::from_millis(2);
/// Idle ticks before the sentinel parks until the next request.
pub(super) const IDLE_TICKS: u32 = 250;
/// Replies are batched while more requests are already buffered, up to this many bytes.
pub(super) const BATCH_BYTES: usize = 64 * 1024;

pub(super) struct Shared {
    /// Shared with the NATS side, when there is one.
    pub(super) service: Arc<Service<Arc<SyncHandler>>>,
    pub(super) config: Config,
    pub(super) trigger: Arc<Trigger>,
    /// The name's lock and socket; dropped (files removed) when shutdown starts.
    pub(super) claim: Mutex<Option<Claim>>,
    /// Open connections, for shutdown and the sentinel.
    pub(super) conns: Mutex<HashMap<u64, Arc<Conn>>>,
    /// Signalled when a connection's last thread leaves.
    pub(super) drained: Condvar,
    pub(super) next_conn: AtomicU64,
    /// Connections accepted but not through their handshake yet.
    pub(super) handshaking: AtomicUsize,
    /// Zero point of the nanosecond timestamps kept in atomics.
    pub(super) epoch: Instant,
    pub(super) sentinel: Mutex<Option<thread::Thread>>,
    pub(super) sentinel_parked: AtomicBool,
    pub(super) sentinel_stop: AtomicBool,
    /// One large payload's vector, given back after its reply went out, for the next large
    /// request (of any connection) to be read into: pages already resident instead of fresh
    /// ones, each a page fault. One per server, so idle connections keep nothing.
    pub(super) spare: Mutex<Vec<u8>>,
}

impl Shared {
    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    fn stopping(&self) -> bool {
        self.trigger.is_fired()
    }
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One accepted connection, shared by the threads serving it.
pub(super) struct Conn {
    id: u64,
    pub(super) stream: Link,
    pub(super) peer: Peer,
    accepted: Instant,
    /// The protocol's rules for this connection: the client's limit, the requests in flight.
    pub(super) core: ServerConn,
    /// The reader role: whoever holds this lock reads the socket.
    read: Mutex<ReadState>,
    /// Replies not yet written (batched while more requests are buffered); also the write lock.
    out: Mutex<Vec<u8>>,
    /// When `out` became non-empty (ns since the server's epoch), 0 if empty.
    out_since: AtomicU64,
    /// A thread holds the reader role and is reading (not running a handler).
    reader_active: AtomicBool,
    /// Since when nobody reads this connection (ns since epoch).
    unattended_since: AtomicU64,
    /// Whole frames are buffered that nobody is processing yet.
    pending_buffered: AtomicBool,
    /// Handlers running now.
    pub(super) running: AtomicUsize,
    /// Threads serving this connection; the last to leave unregisters it.
    threads: AtomicUsize,
    handshaken: AtomicBool,
    /// Counted in the service's connections by transport from the handshake on.
    counted: std::sync::OnceLock<Counted>,
    pub(super) closed: AtomicBool,
    /// We shut the read side ourselves (server shutdown): the EOF that follows is not the peer
    /// hanging up, so running handlers are not cancelled and their replies still go out.
    read_shut: AtomicBool,
}

pub(super) struct ReadState {
    rbuf: ReadBuf,
    /// `SO_RCVTIMEO` is set to the frame timeout (a frame is partly in).
    partial_timeout: bool,
    /// When the frame now partly in started arriving: the frame timeout bounds the whole frame,
    /// not each read, so a peer trickling a byte now and then is still cut off.
    partial_since: Option<Instant>,
}

impl Conn {
    pub(super) fn stop_reading(&self) {
        self.read_shut.store(true, Ordering::SeqCst);
        self.stream.shut(Shut::Read);
    }

    pub(super) fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.stream.shut(Shut::Both);
    }

    pub(super) fn cancel_all(&self) {
        self.core.cancel_all();
    }

    /// Queues or writes one frame (fitted to the client's limit). `batch`: more requests are
    /// buffered, so the reply may wait for the next flush instead of costing a syscall of its
    /// own.
    pub(super) fn send(&self, shared: &Shared, out: Out, batch: bool) {
        if self.closed.load(Ordering::Relaxed) {
            return;
        }
        let Out { header, payload } = self.core.fit(out);
        let mut out = lock(&self.out);
        let size = FRAME_OVERHEAD + payload.len();
        let result = if batch && out.len() + size <= BATCH_BYTES {
            if out.is_empty() {
                self.out_since.store(shared.now_ns().max(1), Ordering::Relaxed);
            }
            proto::encode(&mut out, &header, b"", &payload);
            Ok(())
        } else {
            self.flush_locked(&mut out).and_then(|()| send_frame(&self.stream, &header, b"", &payload))
        };
        drop(out);
        match result {
            Err(e) => self.write_failed(e.error),
            Ok(()) if payload.capacity() >= LARGE_PAYLOAD => {
                let mut spare = lock(&shared.spare);
                if payload.capacity() > spare.capacity() && payload.capacity() <= SPARE_MAX {
                    *spare = payload;
                }
            }
            Ok(()) => {}
        }
    }

    /// A request is done: sends its answer, if one is wanted.
    pub(super) fn finish(&self, shared: &Shared, id: u64, answer: Option<Answer>, batch: bool) {
        if let Some(out) = self.core.answer(id, answer) {
            self.send(shared, out, batch);
        }
    }

    fn flush(&self) {
        let mut out = lock(&self.out);
        if let Err(e) = self.flush_locked(&mut out) {
            drop(out);
            self.write_failed(e.error);
        }
    }

    fn flush_locked(&self, out: &mut Vec<u8>) -> Result<(), SendError> {
        if out.is_empty() {
            return Ok(());
        }
        let r = send_bytes(&self.stream, out);
        out.clear();
        if out.capacity() > 4 * BATCH_BYTES {
            *out = Vec::new();
        }
        self.out_since.store(0, Ordering::Relaxed);
        r
    }

    fn write_failed(&self, e: std::io::Error) {
        log_write_failed(self.id, self.peer.pid, &e);
        self.cancel_all();
        self.close();
    }
}

pub(super) fn accept_loop(shared: &Arc<Shared>, mut listener: UnixListener) {
    let mut backoff = Duration::from_millis(5);
    let mut next_watch = Instant::now() + WATCH_PERIOD;
    let mut idle = IdleWatch::new(shared.config.idle_timeout);
    loop {
        let mut fds =
            [PollFd::new(&listener, PollFlags::IN), PollFd::new(&shared.trigger.wake_r, PollFlags::IN)];
        let wait = next_watch.saturating_duration_since(Instant::now());
        let wait = Timespec { tv_sec: wait.as_secs() as i64, tv_nsec: i64::from(wait.subsec_nanos()) };
        match rustix::event::poll(&mut fds, Some(&wait)) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => {
                tracing::error!(error = %e, "poll failed in accept loop");
                thread::sleep(backoff);
            }
        }
        if shared.stopping() {
            return;
        }
        if Instant::now() >= next_watch {
            next_watch = Instant::now() + WATCH_PERIOD;
            if idle_expired(&mut idle, &shared.service) {
                // The name is free at once, so the next call starts a new server, however long
                // the owner takes to call `shutdown` (as the async server does).
                drop(lock(&shared.claim).take());
                shared.trigger.fire();
                return;
            }
            let watched = lock(&shared.claim).as_mut().map_or(Watch::Keep, watch_name);
            match watched {
                Watch::Keep => {}
                Watch::Serve(new) => {
                    // Whoever connected to the old socket before it was unlinked is served too.
                    let old = std::mem::replace(&mut listener, new);
                    accept_all(shared, &old, &mut backoff);
                }
                Watch::Stop(lost) => {
                    shared.trigger.fire_lost(lost);
                    return;
                }
            }
        }
        accept_all(shared, &listener, &mut backoff);
    }
}

/// Accepts every connection waiting in the backlog of `listener`.
fn accept_all(shared: &Arc<Shared>, listener: &UnixListener, backoff: &mut Duration) {
    loop {
        match rustix::net::accept_with(listener, SocketFlags::CLOEXEC) {
            Ok(fd) => {
                *backoff = Duration::from_millis(5);
                on_accept(shared, UnixStream::from(fd));
            }
            Err(rustix::io::Errno::WOULDBLOCK) => break,
            Err(rustix::io::Errno::INTR | rustix::io::Errno::CONNABORTED) => {}
            Err(e) => {
                // Out of descriptors or memory: back off instead of spinning on a listener
                // that stays readable; connections wait in the backlog meanwhile.
                tracing::warn!(error = %e, service = %shared.service.name, "accept failed; backing off {:?}", backoff);
                thread::sleep(*backoff);
                *backoff = (*backoff * 2).min(Duration::from_millis(200));
                break;
            }
        }
    }
}

pub(super) fn on_accept(shared: &Arc<Shared>, stream: UnixStream) {
    let name = &shared.service.name;
    let refuse = |out: Out| {
        let _ = send_frame(&stream, &out.header, b"", &out.payload);
    };
    let peer = match shared.config.check_peer(name, &stream) {
        Ok(p) => p,
        Err(refusal) => {
            if let Some(out) = refusal {
                refuse(out);
            }
            return;
        }
    };
    let mut conns = lock(&shared.conns);
    if conns.len() >= shared.config.max_connections {
        drop(conns);
        tracing::warn!(service = %name, "connection limit reached; refusing a connection");
        refuse(server_conn::at_connection_limit(name.as_str(), shared.config.max_connections));
        return;
    }
    if shared.handshaking.load(Ordering::SeqCst) >= shared.config.max_handshaking {
        // Make room by dropping the oldest connection that has not said hello yet.
        if let Some(oldest) = conns
            .values()
            .filter(|c| !c.handshaken.load(Ordering::SeqCst) && !c.closed.load(Ordering::SeqCst))
            .min_by_key(|c| c.accepted)
        {
            tracing::debug!(conn = oldest.id, "too many connections in handshake; dropping the oldest");
            oldest.close();
        }
    }
    let setup = set_send_timeout(&stream, Some(shared.config.write_timeout))
        .and_then(|()| set_recv_timeout(&stream, Some(shared.config.handshake_timeout)));
    if let Err(e) = setup {
        tracing::warn!(error = %e, "cannot set socket timeouts; dropping connection");
        return;
    }
    set_send_buffer(&stream, shared.config.send_buffer);
    let conn = Arc::new(Conn {
        id: shared.next_conn.fetch_add(1, Ordering::Relaxed),
        stream: stream.into(),
        peer,
        accepted: Instant::now(),
        core: ServerConn::new(shared.config.max_payload, shared.config.max_in_flight),
        read: Mutex::new(ReadState { rbuf: ReadBuf::default(), partial_timeout: false, partial_since: None }),
        out: Mutex::new(Vec::new()),
        out_since: AtomicU64::new(0),
        reader_active: AtomicBool::new(true),
        unattended_since: AtomicU64::new(0),
        pending_buffered: AtomicBool::new(false),
        running: AtomicUsize::new(0),
        threads: AtomicUsize::new(1),
        handshaken: AtomicBool::new(false),
        counted: std::sync::OnceLock::new(),
        closed: AtomicBool::new(false),
        read_shut: AtomicBool::new(false),
    });
    conns.insert(conn.id, conn.clone());
    record_connections(&shared.claim, conns.len());
    shared.handshaking.fetch_add(1, Ordering::SeqCst);
    drop(conns);
    let s = shared.clone();
    let c = conn.clone();
    if let Err(e) =
        thread::Builder::new().name("microcs-conn".into()).spawn(move || conn_thread(&s, &c, true))
    {
        tracing::warn!(error = %e, "cannot start a connection thread; refusing the connection");
        shared.handshaking.fetch_sub(1, Ordering::SeqCst);
        conn.send(
            shared,
            refuse_connection(status::BUSY, "service is out of threads; try again later"),
            false,
        );
        conn.close();
        leave(shared, &conn);
    }
}

/// Body of every connection thread: the first one shakes hands, followers start reading.
pub(super) fn conn_thread(shared: &Arc<Shared>, conn: &Arc<Conn>, first: bool) {
    if first {
        let ok = handshake(shared, conn);
        shared.handshaking.fetch_sub(1, Ordering::SeqCst);
        if ok {
            conn.handshaken.store(true, Ordering::SeqCst);
            serve_conn(shared, conn);
        } else {
            conn.close();
        }
    } else {
        serve_conn(shared, conn);
    }
    leave(shared, conn);
}

pub(super) fn leave(shared: &Shared, conn: &Conn) {
    let mut conns = lock(&shared.conns);
    if conn.threads.fetch_sub(1, Ordering::SeqCst) == 1 {
        conn.cancel_all();
        conns.remove(&conn.id);
        record_connections(&shared.claim, conns.len());
        shared.drained.notify_all();
    }
}

pub(super) fn handshake(shared: &Shared, conn: &Conn) -> bool {
    let mut rs = lock(&conn.read);
    let max = conn.core.max_request();
    loop {
        let needed = match rs.rbuf.decode(max) {
            Ok(Decoded::Frame(f)) => {
                let len = f.len;
                let answer = conn.core.on_hello(&f, std::process::id(), shared.service.name.as_str());
                rs.rbuf.consume(len);
                let handshake = match answer {
                    Ok(h) => h,
                    Err(refusal) => {
                        conn.send(shared, refusal, false);
                        return false;
                    }
                };
                let c = &shared.config;
                let buffered = !rs.rbuf.is_empty();
                match answer_hello(
                    handshake,
                    c.shared_memory,
                    c.ring_capacity,
                    buffered,
                    conn.stream.socket(),
                    conn.id,
                ) {
                    Ok(Ok(link)) => conn.stream.upgrade(link),
                    Ok(Err(e)) => {
                        tracing::debug!(conn = conn.id, error = %e, "cannot send the handshake answer");
                        return false;
                    }
                    Err(ack) => conn.send(shared, ack, false),
                }
                let _ = conn.counted.set(shared.service.tally.open(conn.stream.transport_name()));
                return conn.stream.set_recv_timeout(None).is_ok() && !conn.closed.load(Ordering::SeqCst);
            }
            Ok(Decoded::Incomplete { needed }) => needed,
            Err(e) => {
                reject_stream(shared, conn, &e);
                return false;
            }
        };
        match rs.rbuf.fill(&conn.stream, needed) {
            // The handshake timeout bounds the whole hello, not each read of it.
            Ok(Filled::Data) if conn.accepted.elapsed() <= shared.config.handshake_timeout => {}
            Ok(Filled::Data) => {
                tracing::debug!(
                    conn = conn.id,
                    "hello trickled past the handshake timeout; dropping connection"
                );
                return false;
            }
            Ok(Filled::Eof) => return false,
            Err(e) => {
                tracing::debug!(conn = conn.id, error = %e, "no hello in time; dropping connection");
                return false;
            }
        }
    }
}

pub(super) fn reject_stream(shared: &Shared, conn: &Conn, e: &DecodeError) {
    tracing::debug!(conn = conn.id, pid = conn.peer.pid, error = %e, "bad frame; closing connection");
    conn.send(shared, broken(e), false);
    conn.close();
}

pub(super) fn serve_conn(shared: &Arc<Shared>, conn: &Arc<Conn>) {
    // Over shared memory with the peer on another CPU, the answers to one read's requests go
    // out in parts (`ShmLink::answer_in_parts`).
    let mut parts = AnswerParts::default();
    loop {
        let Ok(mut rs) = conn.read.try_lock() else { return };
        // After our own shutdown of the read side, frames the client sent before it are still in
        // the socket: they are read (each request answered 503 not run) until the end of stream.
        if conn.closed.load(Ordering::SeqCst) {
            return;
        }
        conn.reader_active.store(true, Ordering::SeqCst);
        let Some(job) = next_request(shared, conn, &mut rs) else {
            conn.reader_active.store(false, Ordering::SeqCst);
            drop(rs);
            conn.flush();
            if !conn.read_shut.load(Ordering::SeqCst) {
                // The peer hung up (or broke the protocol): nobody waits for running handlers.
                conn.closed.store(true, Ordering::SeqCst);
                conn.cancel_all();
            }
            return;
        };
        let more = rs.rbuf.has_frame(shared.config.max_payload);
        conn.pending_buffered.store(more, Ordering::SeqCst);
        // `batch`: this answer may wait for the next one's.
        let batch = match conn.stream.shm() {
            Some(shm) if more => !parts.part_full(shm),
            _ => {
                parts.end_read();
                more
            }
        };
        let since = job.arrived.saturating_duration_since(shared.epoch).as_nanos() as u64;
        conn.unattended_since.store(since, Ordering::SeqCst);
        conn.reader_active.store(false, Ordering::SeqCst);
        drop(rs);
        run(shared, conn, job, batch);
    }
}

/// Reads until the next request; answers control frames on the way. `None`: the connection is
/// finished.
///
/// A request's arrival (`dispatch::Incoming::arrived`) is one clock read, for its deadline and
/// its run's start. Not the end of the request run before it, even when this one was already
/// buffered: sending that one's answer may have blocked (a write of a large reply, or the lock
/// of the answers while another thread wrote), and that wait is not this request's.
pub(super) fn next_request(shared: &Shared, conn: &Conn, rs: &mut ReadState) -> Option<Job> {
    let max = shared.config.max_payload;
    loop {
        let needed = match rs.rbuf.decode(max) {
            Ok(Decoded::Frame(f)) => {
                let (h, len) = (f.header, f.len);
                let large = rs.rbuf.is_large();
                let stopping = shared.stopping();
                let mut job = match conn.core.on_frame(&f, stopping, shared.service.name.as_str()) {
                    Action::Request => {
                        let arrived = Instant::now();
                        match conn.core.admit(&h, arrived) {
                            Ok(a) => Some(Job {
                                id: a.id,
                                method: f.method.to_vec(),
                                payload: if large { Vec::new() } else { f.payload.to_vec() },
                                deadline: a.deadline,
                                cancel: a.cancel,
                                stream: a.stream,
                                arrived,
                            }),
                            Err(refusal) => {
                                conn.send(shared, refusal, true);
                                None
                            }
                        }
                    }
                    Action::Send(out) => {
                        conn.send(shared, out, true);
                        None
                    }
                    Action::None => None,
                };
                if let Some(j) = job.as_mut().filter(|_| large) {
                    j.payload = rs.rbuf.take_payload().expect("a decoded large frame has its payload");
                }
                rs.rbuf.consume(len);
                if job.is_some() {
                    return job;
                }
                continue;
            }
            Ok(Decoded::Incomplete { needed }) => needed,
            Err(e) => {
                reject_stream(shared, conn, &e);
                return None;
            }
        };
        // Nothing whole is buffered: send batched replies before waiting for the client.
        if conn.out_since.load(Ordering::Relaxed) != 0 {
            conn.flush();
        }
        if rs.rbuf.wants_spare() {
            let spare = std::mem::take(&mut *lock(&shared.spare));
            rs.rbuf.recycle(spare);
        }
        let partial = !rs.rbuf.is_empty();
        if partial != rs.partial_timeout {
            let t = partial.then_some(shared.config.frame_timeout);
            if conn.stream.set_recv_timeout(t).is_err() {
                return None;
            }
            rs.partial_timeout = partial;
        }
        rs.partial_since = if partial { rs.partial_since.or_else(|| Some(Instant::now())) } else { None };
        let timed_out = match rs.rbuf.fill(&conn.stream, needed) {
            Ok(Filled::Data) => rs.partial_since.is_some_and(|t| t.elapsed() > shared.config.frame_timeout),
            Ok(Filled::Eof) => return None,
            Err(e) if is_timeout(&e) => true,
            Err(_) => return None,
        };
        if timed_out {
            tracing::debug!(conn = conn.id, "frame not completed within the frame timeout; closing");
            conn.send(shared, frame_timed_out(shared.config.frame_timeout), false);
            return None;
        }
    }
}

/// Watches connections whose handler runs long (see the module docs).
pub(super) fn sentinel(shared: Arc<Shared>) {
    let tick_ns = TICK.as_nanos() as u64;
    let mut idle = 0u32;
    let mut followers = Vec::new();
    let mut stale_out = Vec::new();
    while !shared.sentinel_stop.load(Ordering::SeqCst) {
        let now = shared.now_ns();
        let mut busy = false;
        {
            let conns = lock(&shared.conns);
            for c in conns.values() {
                let running = c.running.load(Ordering::SeqCst);
                let out_since = c.out_since.load(Ordering::Relaxed);
                busy |= running > 0 || out_since != 0;
                if out_since != 0 && now.saturating_sub(out_since) >= tick_ns {
                    stale_out.push(c.clone());
                }
                if running > 0
                    && !c.reader_active.load(Ordering::SeqCst)
                    && !c.closed.load(Ordering::SeqCst)
                    && now.saturating_sub(c.unattended_since.load(Ordering::SeqCst)) >= tick_ns
                    && running < shared.config.max_in_flight
                {
                    followers.push(c.clone());
                }
            }
        }
        for c in stale_out.drain(..) {
            if let Ok(mut out) = c.out.try_lock() {
                if let Err(e) = c.flush_locked(&mut out) {
                    drop(out);
                    c.write_failed(e.error);
                }
            }
        }
        if !followers.is_empty() {
            let mut fds: Vec<PollFd<'_>> =
                followers.iter().map(|c| PollFd::new(&c.stream, PollFlags::IN | PollFlags::RDHUP)).collect();
            let zero = Timespec { tv_sec: 0, tv_nsec: 0 };
            let _ = rustix::event::poll(&mut fds, Some(&zero));
            let ready: Vec<bool> = fds.iter().map(|f| !f.revents().is_empty()).collect();
            drop(fds);
            for (c, readable) in followers.drain(..).zip(ready) {
                let ring = c.stream.shm().is_some_and(|s| s.has_input());
                if readable || ring || c.pending_buffered.load(Ordering::SeqCst) {
                    start_follower(&shared, c);
                }
            }
        }
        if busy {
            idle = 0;
        } else {
            idle += 1;
        }
        if idle >= IDLE_TICKS {
            shared.sentinel_parked.store(true, Ordering::SeqCst);
            let any_running = lock(&shared.conns).values().any(|c| c.running.load(Ordering::SeqCst) > 0);
            if !any_running && !shared.sentinel_stop.load(Ordering::SeqCst) {
                thread::park_timeout(Duration::from_secs(1));
            }
            shared.sentinel_parked.store(false, Ordering::SeqCst);
            // Still idle after the park: park again at once (the next look sees any handler
            // that started meanwhile, which also unparks us). Counting the idle ticks again
            // from zero here made an idle server wake every 2 ms for half a second after every
            // park: about 160 wake-ups a second, 0.3-0.9 % of a CPU, with nothing to do.
        } else {
            thread::sleep(TICK);
        }
    }
}

pub(super) fn start_follower(shared: &Arc<Shared>, conn: Arc<Conn>) {
    {
        let _conns = lock(&shared.conns);
        if conn.reader_active.load(Ordering::SeqCst) || conn.threads.load(Ordering::SeqCst) == 0 {
            return;
        }
        conn.threads.fetch_add(1, Ordering::SeqCst);
    }
    // Mark it attended now, so the next tick does not start a second follower.
    conn.unattended_since.store(shared.now_ns(), Ordering::SeqCst);
    let s = shared.clone();
    let c = conn.clone();
    if let Err(e) =
        thread::Builder::new().name("microcs-conn".into()).spawn(move || conn_thread(&s, &c, false))
    {
        tracing::warn!(error = %e, "cannot start a follower thread");
        leave(shared, &conn);
    }
}
