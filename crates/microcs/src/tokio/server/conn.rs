//! An async server's connections: accepting, the connection task that shakes hands and reads
//! frames, and the reply path through the connection's outbox (each request's run: `run.rs`).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use ::tokio::net::{UnixListener, UnixStream};
use ::tokio::sync::{Notify, Semaphore, watch};
use ::tokio::task::AbortHandle;
use ::tokio::time::{Instant, MissedTickBehavior, interval_at, sleep, sleep_until};

use super::super::io::{HIGH_WATER, OutState, Outbox, Stream, read_more, shutdown};
use super::run::admit;
use crate::dispatch::Answer;
use crate::error::Error;
use crate::handler::AsyncHandler;
use crate::io::{Filled, ReadBuf, log_write_failed};
use crate::proto::server_conn::{self, Action, Out, ServerConn, broken, frame_timed_out, shutting_down};
use crate::proto::{DecodeError, Decoded};
use crate::registry::Claim;
use crate::request::Peer;
use crate::service::{
    Config, IdleWatch, Service, WATCH_PERIOD, Watch, idle_expired, record_connections, watch_name,
};
use crate::transport::shm::{AnswerParts, answer_hello};
use crate::transport::unix::set_send_buffer;
use crate::transport::{Link, Shut, Transport, send_frame_now};

/// What the server's tasks share.
pub(super) struct Shared {
    /// Shared with the NATS side, when there is one.
    pub(super) service: Arc<Service<Arc<AsyncHandler>>>,
    pub(super) config: Config,
    /// Shutdown started: stop accepting, refuse new requests, let running ones finish.
    pub(super) stop: Arc<watch::Sender<bool>>,
    /// The grace period is over: drop every handler still running, close every connection.
    pub(super) kill: watch::Sender<bool>,
    /// The name's lock and socket; dropped (files removed) when the accept loop ends.
    pub(super) claim: Mutex<Option<Claim>>,
    /// Why the server stopped by itself (it lost its name), for `serve` and `wait`.
    pub(super) lost: Mutex<Option<Error>>,
    /// Open connections: for the connection cap, the handshake cap and shutdown.
    pub(super) conns: Mutex<HashMap<u64, ConnEntry>>,
    /// Notified whenever a connection ends.
    pub(super) drained: Notify,
    pub(super) next_conn: AtomicU64,
}

impl Shared {
    pub(super) fn conns(&self) -> MutexGuard<'_, HashMap<u64, ConnEntry>> {
        lock(&self.conns)
    }

    pub(super) fn stopping(&self) -> bool {
        *self.stop.borrow()
    }

    /// Stops the server because it lost its name: `lost` is what `serve` and `wait` return.
    fn lose(&self, lost: Error) {
        *lock(&self.lost) = Some(lost);
        self.stop.send_replace(true);
    }

    /// What `serve` and `wait` return once the server stopped.
    pub(super) fn outcome(&self) -> crate::error::Result<()> {
        lock(&self.lost).clone().map_or(Ok(()), Err)
    }
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The server's record of one connection.
pub(super) struct ConnEntry {
    pub(super) accepted: Instant,
    pub(super) handshaken: bool,
    /// Aborted to make room; no longer counts as a pending handshake.
    pub(super) dropped: bool,
    /// Ends the connection task, to make room when too many connections sit in the handshake.
    pub(super) abort: AbortHandle,
}

/// Closes and unregisters a connection when its task ends, however it ends (including by
/// abort, which would otherwise leave the writer task waiting).
pub(super) struct ConnGuard {
    pub(super) shared: Arc<Shared>,
    pub(super) conn: Arc<Conn>,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.conn.outbox.close();
        shutdown(&self.conn.stream);
        let mut conns = self.shared.conns();
        conns.remove(&self.conn.id);
        record_connections(&self.shared.claim, conns.len());
        drop(conns);
        self.shared.drained.notify_waiters();
    }
}

pub(super) async fn accept_loop(shared: Arc<Shared>, mut listener: UnixListener) {
    let mut stop = shared.stop.subscribe();
    let mut backoff = Duration::from_millis(5);
    let mut checks = interval_at(Instant::now() + WATCH_PERIOD, WATCH_PERIOD);
    checks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut idle = IdleWatch::new(shared.config.idle_timeout);
    loop {
        let (failed, check) = ::tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            _ = checks.tick() => (false, true),
            r = listener.accept() => match r {
                Ok((stream, _)) => {
                    backoff = Duration::from_millis(5);
                    on_accept(&shared, stream);
                    (false, false)
                }
                Err(e) if matches!(e.kind(), std::io::ErrorKind::ConnectionAborted | std::io::ErrorKind::Interrupted) => (false, false),
                Err(e) => {
                    tracing::warn!(error = %e, service = %shared.service.name, "accept failed; backing off {:?}", backoff);
                    (true, false)
                }
            }
        };
        if check && idle_expired(&mut idle, &shared.service) {
            shared.stop.send_replace(true);
            break;
        }
        if check {
            match watch_files(&shared).await {
                Watch::Keep => {}
                // The old listener's backlog is dropped with it: connections made, in the second
                // before this check, to a socket path that was unlinked.
                Watch::Serve(new) => match UnixListener::from_std(new) {
                    Ok(new) => listener = new,
                    Err(e) => {
                        shared.lose(Error::io("cannot register the new socket with the runtime", e));
                        break;
                    }
                },
                Watch::Stop(lost) => {
                    shared.lose(lost);
                    break;
                }
            }
        }
        if failed {
            // Out of descriptors or memory: back off instead of spinning on a listener that
            // stays readable; connections wait in the backlog meanwhile.
            ::tokio::select! {
                _ = stop.wait_for(|s| *s) => break,
                () = sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_millis(200));
        }
    }
    drop(listener);
    drop(lock(&shared.claim).take());
}

/// [`watch_name`] for the accept loop: the check inline (it only `stat`s), taking the name back
/// (files, maybe a short wait for a racing claimant) off the runtime.
async fn watch_files(shared: &Arc<Shared>) -> Watch {
    if lock(&shared.claim).as_ref().is_none_or(Claim::intact) {
        return Watch::Keep;
    }
    let s = shared.clone();
    let watched =
        ::tokio::task::spawn_blocking(move || lock(&s.claim).as_mut().map_or(Watch::Keep, watch_name));
    watched.await.unwrap_or_else(|e| {
        Watch::Stop(Error::io("cannot take the name back", std::io::Error::other(e.to_string())))
    })
}

pub(super) fn on_accept(shared: &Arc<Shared>, stream: UnixStream) {
    let name = &shared.service.name;
    // Still non-blocking, as tokio documents for `into_std`; registered again below.
    let stream: Link = match stream.into_std() {
        Ok(s) => s.into(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot take over a new connection; dropping it");
            return;
        }
    };
    let refuse = |out: Out| {
        send_frame_now(&stream, &out.header, &out.payload);
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
    let mut conns = shared.conns();
    if conns.len() >= shared.config.max_connections {
        drop(conns);
        tracing::warn!(service = %name, "connection limit reached; refusing a connection");
        refuse(server_conn::at_connection_limit(name.as_str(), shared.config.max_connections));
        return;
    }
    let handshaking = conns.values_mut().filter(|c| !c.handshaken && !c.dropped);
    let (count, oldest) = handshaking.fold((0, None::<&mut ConnEntry>), |(n, old), c| {
        let older = old.filter(|o| o.accepted <= c.accepted).unwrap_or(c);
        (n + 1, Some(older))
    });
    if count >= shared.config.max_handshaking {
        // Make room by dropping the oldest connection that has not said hello yet.
        if let Some(oldest) = oldest {
            tracing::debug!("too many connections in handshake; dropping the oldest");
            oldest.dropped = true;
            oldest.abort.abort();
        }
    }
    set_send_buffer(&stream, shared.config.send_buffer);
    let stream = match Stream::new(stream) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch a new connection; dropping it");
            return;
        }
    };
    let id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
    let conn = Arc::new(Conn {
        id,
        stream,
        peer,
        core: ServerConn::new(shared.config.max_payload, shared.config.max_in_flight),
        outbox: Outbox::new(()),
        batching: AtomicBool::new(false),
        permits: Arc::new(Semaphore::new(shared.config.max_in_flight)),
    });
    let guard = ConnGuard { shared: shared.clone(), conn: conn.clone() };
    // Registered before the task can end (it needs this lock to unregister).
    let task = ::tokio::spawn(conn_task(shared.clone(), conn, guard));
    let entry =
        ConnEntry { accepted: Instant::now(), handshaken: false, dropped: false, abort: task.abort_handle() };
    conns.insert(id, entry);
    record_connections(&shared.claim, conns.len());
}

/// One accepted connection, shared by its reader (the connection task), its writer task and the
/// tasks of its requests.
pub(super) struct Conn {
    pub(super) id: u64,
    pub(super) stream: Stream,
    pub(super) peer: Peer,
    /// The protocol's rules for this connection: the client's limit, the requests in flight.
    pub(super) core: ServerConn,
    /// Replies and errors for the writer task.
    pub(super) outbox: Outbox<()>,
    /// The connection task is answering the frames of one read: answers queued meanwhile
    /// wait for its [`flush`](Conn::flush) instead of waking the writer task.
    pub(super) batching: AtomicBool,
    /// One permit per request in flight: the backpressure cap.
    pub(super) permits: Arc<Semaphore>,
}

impl Conn {
    pub(super) fn cancel_all(&self) {
        self.core.cancel_all();
    }

    /// Queues a frame, fitted to the client's limit; a large payload is written from its own
    /// vector, without a copy. `false`: the connection no longer takes frames.
    pub(super) fn send(&self, out: Out) -> bool {
        let Out { header, payload } = self.core.fit(out);
        self.queue(|st| st.push_owned(&header, b"", payload))
    }

    /// A request is done: sends its answer, if one is wanted.
    pub(super) fn finish(&self, id: u64, answer: Option<Answer>) {
        if let Some(out) = self.core.answer(id, answer) {
            self.send(out);
        }
    }

    /// [`finish`](Self::finish) for a request that ended without being registered in flight
    /// (`ServerConn::admit_unregistered`).
    pub(super) fn finish_unregistered(&self, id: u64, answer: Option<Answer>) {
        if let Some(out) = self.core.answer_unregistered(id, answer) {
            self.send(out);
        }
    }

    /// Queues a frame with `push`; wakes the writer task unless the connection task will flush.
    pub(super) fn queue(&self, push: impl FnOnce(&mut OutState<()>) -> Option<(u64, u64)>) -> bool {
        let queued = push(&mut self.outbox.lock()).is_some();
        if queued && !self.batching.load(Ordering::SeqCst) {
            self.outbox.wake();
        }
        queued
    }

    /// Ends a batch (see `batching`): sends what is queued from here if the writer task is
    /// idle and the socket takes it, else wakes the writer task. Saves the writer's wake-up and
    /// task poll on every read's answers.
    pub(super) fn flush(&self) {
        self.batching.store(false, Ordering::SeqCst);
        if !self.outbox.lock().send_now(&self.stream) {
            self.outbox.wake();
        }
    }

    pub(super) fn reject_stream(&self, e: &DecodeError) {
        tracing::debug!(conn = self.id, pid = self.peer.pid, error = %e, "bad frame; closing connection");
        self.send(broken(e));
    }
}

pub(super) async fn conn_task(shared: Arc<Shared>, conn: Arc<Conn>, _guard: ConnGuard) {
    let c = conn.clone();
    let write_timeout = shared.config.write_timeout;
    let mut writer = ::tokio::spawn(async move {
        let end = c.outbox.run_writer(&c.stream, Some(write_timeout)).await;
        if let Some(e) = end.error {
            log_write_failed(c.id, c.peer.pid, &e);
            c.cancel_all();
            shutdown(&c.stream);
        }
    });
    let mut kill = shared.kill.subscribe();
    let mut rbuf = ReadBuf::default();
    if handshake(&shared, &conn, &mut rbuf).await {
        // Counted by transport (for `$stats`) until its handlers are done.
        let _counted = shared.service.tally.open(conn.stream.link().transport_name());
        if let Some(e) = shared.conns().get_mut(&conn.id) {
            e.handshaken = true;
        }
        let hung_up = serve_conn(&shared, &conn, &mut rbuf).await;
        if hung_up {
            // Nobody will read the replies: tell the handlers, so they can stop early.
            conn.cancel_all();
        }
        // Wait for this connection's handlers: all permits back.
        let all = u32::try_from(shared.config.max_in_flight).unwrap_or(u32::MAX);
        ::tokio::select! {
            _ = conn.permits.acquire_many(all) => {}
            _ = kill.wait_for(|k| *k) => {}
        }
    }
    conn.outbox.finish();
    let killed = ::tokio::select! {
        _ = &mut writer => false,
        _ = kill.wait_for(|k| *k) => true,
    };
    if killed {
        conn.outbox.close();
        shutdown(&conn.stream);
        let _ = writer.await;
    }
    shutdown(&conn.stream);
}

/// Reads the client's `Hello` and answers it. `false`: the connection is to be closed.
pub(super) async fn handshake(shared: &Shared, conn: &Conn, rbuf: &mut ReadBuf) -> bool {
    let max = conn.core.max_request();
    let give_up = Instant::now() + shared.config.handshake_timeout;
    let mut stop = shared.stop.subscribe();
    loop {
        let needed = match rbuf.decode(max) {
            Ok(Decoded::Frame(f)) => {
                let len = f.len;
                let answer = conn.core.on_hello(&f, std::process::id(), shared.service.name.as_str());
                rbuf.consume(len);
                return match answer {
                    Ok(handshake) => {
                        let c = &shared.config;
                        let socket = conn.stream.link().socket();
                        match answer_hello(
                            handshake,
                            c.shared_memory,
                            c.ring_capacity,
                            !rbuf.is_empty(),
                            socket,
                            conn.id,
                        ) {
                            Ok(Ok(link)) => match conn.stream.upgrade(link) {
                                Ok(()) => true,
                                Err(e) => {
                                    tracing::warn!(conn = conn.id, error = %e, "cannot watch the shared memory; dropping connection");
                                    false
                                }
                            },
                            Ok(Err(e)) => {
                                tracing::debug!(conn = conn.id, error = %e, "cannot send the handshake answer");
                                false
                            }
                            Err(ack) => conn.send(ack),
                        }
                    }
                    Err(refusal) => {
                        conn.send(refusal);
                        false
                    }
                };
            }
            Ok(Decoded::Incomplete { needed }) => needed,
            Err(e) => {
                conn.reject_stream(&e);
                return false;
            }
        };
        ::tokio::select! {
            r = read_more(&conn.stream, rbuf, needed) => match r {
                Ok(Filled::Data) => {}
                Ok(Filled::Eof) | Err(_) => return false,
            },
            () = sleep_until(give_up) => {
                tracing::debug!(conn = conn.id, "no hello in time; dropping connection");
                return false;
            }
            _ = stop.wait_for(|s| *s) => return false,
        }
    }
}

/// Reads and dispatches frames until the connection is finished. Returns true if the peer hung
/// up (or broke the protocol), false if the server ended it (shutdown or kill).
pub(super) async fn serve_conn(shared: &Arc<Shared>, conn: &Arc<Conn>, rbuf: &mut ReadBuf) -> bool {
    let max = shared.config.max_payload;
    let mut stop = shared.stop.subscribe();
    let mut kill = shared.kill.subscribe();
    // Made once, not on every turn of the loop: a fresh `wait_for` registers a waiter with the
    // watch's notifier and removes it again each time, which cost a tenth of the instructions
    // of a request. Each is polled no more once it has fired.
    let stop_signal = stop.wait_for(|s| *s);
    let kill_signal = kill.wait_for(|k| *k);
    ::tokio::pin!(stop_signal, kill_signal);
    // Even a registered `wait_for` takes the notifier's lock on every poll, and the read below
    // runs once per request: there it is polled through `Signal`, which looks at the watch's
    // version (one atomic load) and polls only once something was sent.
    let (stop_probe, kill_probe) = (shared.stop.subscribe(), shared.kill.subscribe());
    let (mut stop_armed, mut kill_armed) = (false, false);
    let mut stop_seen = false;
    // Shutdown began: our read side is shut, the rest of what the client sent is answered
    // "shutting down", and the EOF that follows is not the peer hanging up.
    let mut draining = false;
    // When the frame at the front of `rbuf` started to arrive (it must be whole by
    // `frame_timeout` after that); reset whenever we stop reading on purpose.
    let mut frame_started: Option<Instant> = None;
    // The last clock read, while nothing has waited since (see `dispatch::Incoming::arrived`):
    // the frames of one read share one, and a request after one answered at once takes the
    // clock read that ended it.
    let mut clock: Option<std::time::Instant> = None;
    // Over shared memory with the peer on another CPU, the answers to one read's requests go
    // out in parts (`ShmLink::answer_in_parts`).
    let mut parts = AnswerParts::default();
    loop {
        let needed = match rbuf.decode(max) {
            Err(e) => {
                conn.reject_stream(&e);
                conn.flush();
                return true;
            }
            Ok(Decoded::Incomplete { needed }) => {
                // Every answer to this read's frames is queued (or its handler waits): one
                // send for all of them.
                conn.flush();
                needed
            }
            Ok(Decoded::Frame(f)) => {
                let (h, len) = (f.header, f.len);
                frame_started = None;
                // Relaxed: whoever reads it does so after pushing under the outbox lock, which
                // `flush` takes after clearing it.
                conn.batching.store(true, Ordering::Relaxed);
                match conn.core.on_frame(&f, shared.stopping(), shared.service.name.as_str()) {
                    Action::Request => {
                        // A permit per request in flight, taken by `admit` only for a run that
                        // goes on in a task: one must be free.
                        let held = if conn.permits.available_permits() > 0 {
                            Ok(None)
                        } else {
                            // At the cap: read nothing more until a handler finishes (and let
                            // the answers queued so far go out meanwhile).
                            conn.flush();
                            clock = None;
                            ::tokio::select! {
                                p = conn.permits.clone().acquire_owned() => p.map(Some).map_err(|_| ()),
                                _ = &mut stop_signal, if !draining && !stop_seen => {
                                    stop_seen = true;
                                    Err(())
                                }
                                _ = &mut kill_signal => return false,
                            }
                        };
                        match held {
                            Ok(held) => {
                                let arrived = *clock.get_or_insert_with(std::time::Instant::now);
                                clock = if rbuf.is_large() {
                                    // A large payload was read into a vector of its own: moved,
                                    // not copied (and then the method name is, to let go of
                                    // `rbuf`).
                                    let method = f.method.to_vec();
                                    let payload = rbuf.take_payload().unwrap_or_default();
                                    admit(shared, conn, &h, &method, payload, held, arrived)
                                } else {
                                    admit(shared, conn, &h, f.method, f.payload.to_vec(), held, arrived)
                                };
                            }
                            Err(()) => {
                                conn.send(shutting_down(h.id, shared.service.name.as_str()));
                            }
                        }
                    }
                    Action::Send(out) => {
                        conn.send(out);
                    }
                    Action::None => {}
                }
                rbuf.consume(len);
                if conn.stream.link().shm().is_some_and(|shm| parts.part_full(shm)) {
                    conn.flush();
                    // The copy into the ring took time that is not the next request's.
                    clock = None;
                }
                continue;
            }
        };
        parts.end_read();
        if !draining && shared.stopping() {
            draining = true;
            stop_reading(conn);
        }
        // What comes next arrives after a wait.
        clock = None;
        if conn.outbox.queued() >= HIGH_WATER {
            // The client is not reading its replies: stop reading its requests until it does
            // (the writer drops it after the write timeout).
            frame_started = None;
            ::tokio::select! {
                () = conn.outbox.wait_space() => {}
                _ = &mut kill_signal => return false,
            }
            continue;
        }
        let frame_deadline = (!rbuf.is_empty())
            .then(|| *frame_started.get_or_insert_with(Instant::now) + shared.config.frame_timeout);
        ::tokio::select! {
            // The read first: it is what wakes this task, request after request.
            biased;
            r = read_more(&conn.stream, rbuf, needed) => match r {
                Ok(Filled::Data) => {}
                Ok(Filled::Eof) => return !draining,
                Err(e) => {
                    tracing::debug!(conn = conn.id, error = %e, "read failed; closing connection");
                    return true;
                }
            },
            () = sleep_until(frame_deadline.unwrap_or_else(Instant::now)), if frame_deadline.is_some() => {
                tracing::debug!(conn = conn.id, "frame not completed within the frame timeout; closing");
                conn.send(frame_timed_out(shared.config.frame_timeout));
                return true;
            }
            () = Signal::new(stop_signal.as_mut(), &stop_probe, &mut stop_armed), if !draining && !stop_seen => {
                stop_seen = true;
            }
            () = Signal::new(kill_signal.as_mut(), &kill_probe, &mut kill_armed) => return false,
        }
    }
}

/// A signal future (a `wait_for` on a `watch<bool>`), polled only when the watch was sent to
/// since it was last polled.
///
/// Once polled, the signal stays registered with the watch's notifier under this task's waker
/// (a task's waker does not change), so skipping the polls in between loses no wake-up: a send
/// wakes the task, `probe` (a receiver that never marks anything seen) then reports a change,
/// and the signal is polled again.
struct Signal<'a, F> {
    signal: Pin<&'a mut F>,
    probe: &'a watch::Receiver<bool>,
    armed: &'a mut bool,
}

impl<'a, F> Signal<'a, F> {
    fn new(signal: Pin<&'a mut F>, probe: &'a watch::Receiver<bool>, armed: &'a mut bool) -> Self {
        Signal { signal, probe, armed }
    }
}

impl<F: Future> Future for Signal<'_, F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        // `Err`: the sender is gone, which the signal itself reports as its end.
        if *this.armed && !this.probe.has_changed().unwrap_or(true) {
            return Poll::Pending;
        }
        *this.armed = true;
        this.signal.as_mut().poll(cx).map(|_| ())
    }
}

/// Shuts our read side: the client's further writes fail at once (so it knows they did not
/// run), and what it already sent can still be read and answered.
pub(super) fn stop_reading(conn: &Conn) {
    conn.stream.link().shut(Shut::Read);
}
