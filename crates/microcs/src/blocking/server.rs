//! The blocking server: one thread per connection, handlers run inline on it.
//!
//! # How a connection is served
//!
//! The thread that reads a request runs its handler itself and writes the reply: no hand-off to
//! another thread, so a request costs what a hand-written socket loop costs. While a handler runs
//! nobody reads that connection, which is fine as long as handlers are quick. For the ones that
//! are not, a per-server *sentinel* thread looks every [`TICK`] at connections whose handler has
//! been running for a tick: if their socket has more bytes waiting (another request, a `Cancel`,
//! or the peer hanging up), it starts a follower thread that takes over reading. So a slow or
//! hung handler never holds up the other requests of its connection, a `Cancel` reaches
//! [`Request::is_cancelled`] within a few milliseconds, and up to `max_in_flight` requests of one
//! connection run at once. The sentinel sleeps when the server has been idle for a while.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::net::SocketFlags;

use crate::dispatch::{self, Answer, Begin, End, Incoming, ReplyLimit};
#[cfg(doc)]
use crate::error::ErrorKind;
use crate::error::{Error, RemoteError, Result};
use crate::io::{Filled, ReadBuf, is_timeout};
use crate::micro::StatsResponse;
use crate::name::Name;
use crate::proto::server_conn::{Action, Out, ServerConn, broken, frame_timed_out, refuse_connection};
use crate::proto::{self, DecodeError, Decoded, FRAME_OVERHEAD, status};
use crate::registry::{self, Claim};
use crate::request::{CancelState, IntoPayload, Peer, Request, panic_message, to_remote};
use crate::service::{Bound, Config, Identity, Service, add_method, claim_and_bind, meta};
use crate::transport::unix::{peer_credentials, set_recv_timeout, set_send_buffer, set_send_timeout};
use crate::transport::{Link, SendError, Shut, Transport, send_bytes, send_frame};

/// How often the sentinel looks at busy connections.
const TICK: Duration = Duration::from_millis(2);
/// Idle ticks before the sentinel parks until the next request.
const IDLE_TICKS: u32 = 250;
/// Replies are batched while more requests are already buffered, up to this many bytes.
const BATCH_BYTES: usize = 64 * 1024;

pub(crate) type SyncHandler = dyn Fn(Request) -> std::result::Result<Vec<u8>, RemoteError> + Send + Sync;

fn erase<F, R, E>(f: F) -> Arc<SyncHandler>
where
    F: Fn(Request) -> std::result::Result<R, E> + Send + Sync + 'static,
    R: IntoPayload,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    Arc::new(move |req| f(req).map(IntoPayload::into_payload).map_err(|e| to_remote(e.into())))
}

/// Options for a [`Server`]; from [`Server::builder`].
#[must_use = "a builder does nothing until .bind()"]
pub struct ServerBuilder {
    name: String,
    dir: Option<PathBuf>,
    config: Config,
    identity: Identity,
    methods: Vec<(String, Arc<SyncHandler>)>,
    error: Option<Error>,
    /// Where to serve besides (or instead of) the local socket (see `crate::nats`).
    #[cfg(feature = "nats")]
    nats: crate::nats::ServerConfig,
}

impl std::fmt::Debug for ServerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerBuilder")
            .field("name", &self.name)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl ServerBuilder {
    crate::service::common_server_options!();
    #[cfg(feature = "nats")]
    crate::nats::nats_server_options!();

    /// Requests of one connection run at once (default 128). Past it the connection is not read
    /// until one finishes: backpressure, with bounded memory.
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.config.max_in_flight = n.max(1);
        self
    }

    /// How long [`ServerHandle::shutdown`] lets running handlers finish (default 10 s).
    pub fn grace_period(mut self, grace: Duration) -> Self {
        self.config.grace = grace;
        self
    }

    /// Adds a named method. Clients call it with [`Client::call`](crate::Client::call).
    ///
    /// An invalid or duplicate method name is reported by [`bind`](ServerBuilder::bind).
    pub fn method<F, R, E>(mut self, name: &str, handler: F) -> Self
    where
        F: Fn(Request) -> std::result::Result<R, E> + Send + Sync + 'static,
        R: IntoPayload,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        add_method(&mut self.methods, &mut self.error, name, erase(handler));
        self
    }

    /// Claims the name and binds its socket.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::InvalidName`] (name or a method name), [`ErrorKind::NameTaken`] with the
    /// owner's pid when a live server has the name, [`ErrorKind::PermissionDenied`] for an unsafe
    /// runtime directory or a non-socket file at the socket path, [`ErrorKind::Io`].
    pub fn bind(self) -> Result<Server> {
        if let Some(e) = self.error {
            return Err(e);
        }
        #[cfg(feature = "nats")]
        let nats_only = self.nats.nats_only();
        #[cfg(not(feature = "nats"))]
        let nats_only = false;
        let (name, dir, claim, listener, started_ms) = if nats_only {
            let dir = self.dir.unwrap_or_else(registry::runtime_dir);
            (Name::new(self.name)?, dir, None, None, registry::now_ms())
        } else {
            let Bound { name, dir, claim, listener, started_ms } =
                claim_and_bind(self.name, self.dir, &self.identity)?;
            (name, dir, Some(claim), Some(listener), started_ms)
        };
        // After the local claim, so that a taken name is reported first; a failure here
        // releases the claim.
        #[cfg(feature = "nats")]
        let nats = {
            let methods: Vec<String> = self.methods.iter().map(|(m, _)| m.clone()).collect();
            crate::nats::bind_blocking(name.as_str(), &self.nats, &self.identity.version, &methods)?
        };
        Ok(Server {
            name,
            dir,
            claim,
            listener,
            started_ms,
            config: self.config,
            identity: self.identity,
            methods: self.methods,
            error: None,
            trigger: Trigger::new()?,
            #[cfg(feature = "nats")]
            nats,
        })
    }
}

/// A server that owns its name and socket, ready to serve.
///
/// # Examples
///
/// ```
/// # let dir = std::env::temp_dir().join(format!("microcs-doc-srv-{}", std::process::id()));
/// use microcs::{Client, Request, Server};
///
/// let handle = Server::builder("ECHO_DOC")
///     # .runtime_dir(&dir)
///     .method("upper", |req: Request| Ok::<_, microcs::RemoteError>(req.text()?.to_uppercase()))
///     .bind()?
///     .spawn(|req: Request| Ok::<_, microcs::RemoteError>(req.into_payload()))?;
///
/// let mut client = Client::builder("ECHO_DOC")
///     # .runtime_dir(&dir)
///     .connect()?;
/// assert_eq!(client.request(b"hi")?, b"hi");
/// assert_eq!(client.call("upper", b"hi")?, b"HI");
/// handle.shutdown();
/// # Ok::<(), microcs::Error>(())
/// ```
pub struct Server {
    name: Name,
    dir: PathBuf,
    /// The name's lock and socket; `None` when serving on NATS only.
    claim: Option<Claim>,
    listener: Option<std::os::unix::net::UnixListener>,
    started_ms: u64,
    config: Config,
    identity: Identity,
    methods: Vec<(String, Arc<SyncHandler>)>,
    error: Option<Error>,
    trigger: Arc<Trigger>,
    /// The broker connection, when serving on NATS too.
    #[cfg(feature = "nats")]
    nats: Option<crate::nats::Pending>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").field("name", &self.name).field("dir", &self.dir).finish_non_exhaustive()
    }
}

impl Server {
    /// Claims `name` with default options.
    ///
    /// # Errors
    ///
    /// As [`ServerBuilder::bind`].
    pub fn bind(name: &str) -> Result<Server> {
        Server::builder(name).bind()
    }

    /// Options for a server named `name`.
    pub fn builder(name: &str) -> ServerBuilder {
        ServerBuilder {
            name: name.to_owned(),
            dir: None,
            config: Config::default(),
            identity: Identity::default(),
            methods: Vec::new(),
            error: None,
            #[cfg(feature = "nats")]
            nats: Default::default(),
        }
    }

    /// Adds a named method (see [`ServerBuilder::method`]); an invalid name is reported by
    /// [`spawn`](Server::spawn) or [`serve`](Server::serve).
    pub fn method<F, R, E>(mut self, name: &str, handler: F) -> Self
    where
        F: Fn(Request) -> std::result::Result<R, E> + Send + Sync + 'static,
        R: IntoPayload,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        add_method(&mut self.methods, &mut self.error, name, erase(handler));
        self
    }

    /// The service name.
    pub fn name(&self) -> &Name {
        &self.name
    }

    /// The socket the server listens on (empty when it serves on NATS only).
    pub fn socket_path(&self) -> &Path {
        self.claim.as_ref().map_or(Path::new(""), Claim::socket_path)
    }

    /// A handle that stops [`serve`](Server::serve) (or the spawned server) from any thread.
    pub fn shutdown_trigger(&self) -> ShutdownTrigger {
        ShutdownTrigger { trigger: self.trigger.clone() }
    }

    /// Serves in background threads and returns at once. `handler` answers requests that name
    /// no method.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::InvalidName`] for a bad method name added with [`Server::method`];
    /// [`ErrorKind::Io`] if the threads cannot be started.
    pub fn spawn<F, R, E>(self, handler: F) -> Result<ServerHandle>
    where
        F: Fn(Request) -> std::result::Result<R, E> + Send + Sync + 'static,
        R: IntoPayload,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        self.start(erase(handler))
    }

    /// Serves on this thread until a [`ShutdownTrigger`] fires, then shuts down as
    /// [`ServerHandle::shutdown`] does.
    ///
    /// # Errors
    ///
    /// As [`spawn`](Server::spawn).
    pub fn serve<F, R, E>(self, handler: F) -> Result<()>
    where
        F: Fn(Request) -> std::result::Result<R, E> + Send + Sync + 'static,
        R: IntoPayload,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let trigger = self.trigger.clone();
        let handle = self.start(erase(handler))?;
        trigger.wait();
        handle.shutdown();
        Ok(())
    }

    fn start(self, default: Arc<SyncHandler>) -> Result<ServerHandle> {
        if let Some(e) = self.error {
            return Err(e);
        }
        let service = Arc::new(Service::new(self.name.clone(), self.identity, default, self.methods));
        if let Some(claim) = &self.claim {
            claim.write_meta(&meta(
                self.started_ms,
                &service.identity,
                &service.id,
                &service.method_names(),
            ))?;
        }
        #[cfg(feature = "nats")]
        let nats = match self.nats {
            Some(pending) => Some(crate::nats::start_blocking(pending, service.clone(), &self.config)?),
            None => None,
        };
        let shared = Arc::new(Shared {
            service,
            config: self.config,
            trigger: self.trigger,
            claim: Mutex::new(self.claim),
            conns: Mutex::new(HashMap::new()),
            drained: Condvar::new(),
            next_conn: AtomicU64::new(1),
            handshaking: AtomicUsize::new(0),
            epoch: Instant::now(),
            sentinel: Mutex::new(None),
            sentinel_parked: AtomicBool::new(false),
            sentinel_stop: AtomicBool::new(false),
        });
        let spawn_err = |e| Error::io("cannot start server thread", e);
        let s = shared.clone();
        let sentinel = thread::Builder::new()
            .name("microcs-sentinel".into())
            .spawn(move || sentinel(s))
            .map_err(spawn_err)?;
        *lock(&shared.sentinel) = Some(sentinel.thread().clone());
        let accept = match self.listener {
            Some(listener) => {
                let s = shared.clone();
                let accept = thread::Builder::new()
                    .name("microcs-accept".into())
                    .spawn(move || accept_loop(&s, &listener))
                    .map_err(spawn_err)?;
                Some(accept)
            }
            None => None,
        };
        tracing::info!(service = %self.name, "serving");
        Ok(ServerHandle {
            shared,
            accept,
            sentinel: Some(sentinel),
            #[cfg(feature = "nats")]
            nats,
        })
    }
}

/// Wakes the accept loop and whoever waits in [`Server::serve`].
struct Trigger {
    fired: Mutex<bool>,
    cv: Condvar,
    wake_r: OwnedFd,
    wake_w: OwnedFd,
}

impl Trigger {
    fn new() -> Result<Arc<Trigger>> {
        let (wake_r, wake_w) =
            rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC | rustix::pipe::PipeFlags::NONBLOCK)
                .map_err(|e| Error::io("cannot create wake-up pipe", e.into()))?;
        Ok(Arc::new(Trigger { fired: Mutex::new(false), cv: Condvar::new(), wake_r, wake_w }))
    }

    fn fire(&self) {
        let mut fired = lock(&self.fired);
        if !*fired {
            *fired = true;
            let _ = rustix::io::write(&self.wake_w, &[1]);
            self.cv.notify_all();
        }
    }

    fn is_fired(&self) -> bool {
        *lock(&self.fired)
    }

    fn wait(&self) {
        let mut fired = lock(&self.fired);
        while !*fired {
            fired = self.cv.wait(fired).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// Stops a server from any thread (for example a signal-handling thread); cheap to clone.
#[derive(Clone)]
pub struct ShutdownTrigger {
    trigger: Arc<Trigger>,
}

impl ShutdownTrigger {
    /// Asks the server to shut down; [`Server::serve`] then drains and returns.
    pub fn shutdown(&self) {
        self.trigger.fire();
    }
}

impl std::fmt::Debug for ShutdownTrigger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShutdownTrigger").field("fired", &self.trigger.is_fired()).finish()
    }
}

/// A running server. Dropping it shuts the server down, as [`shutdown`](ServerHandle::shutdown).
pub struct ServerHandle {
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
    /// Also the "not stopped yet" mark: taken last by `stop`.
    sentinel: Option<JoinHandle<()>>,
    #[cfg(feature = "nats")]
    nats: Option<crate::nats::Side>,
}

impl std::fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerHandle").field("name", &self.shared.service.name).finish_non_exhaustive()
    }
}

impl ServerHandle {
    /// Stops accepting, removes the socket and lock (the name is free again at once), lets
    /// running handlers finish within the grace period, then closes every connection.
    ///
    /// Requests that arrive after this started are answered "shutting down" without running,
    /// which tells the client it may safely send them again.
    pub fn shutdown(mut self) {
        self.stop();
    }

    /// The service name.
    pub fn name(&self) -> &Name {
        &self.shared.service.name
    }

    /// A trigger that shuts this server down from another thread.
    pub fn shutdown_trigger(&self) -> ShutdownTrigger {
        ShutdownTrigger { trigger: self.shared.trigger.clone() }
    }

    /// Blocks until a [`ShutdownTrigger`] fires (the server keeps serving meanwhile).
    pub fn wait(&self) {
        self.shared.trigger.wait();
    }

    /// The same counters `$stats` reports, read locally.
    pub fn stats(&self) -> StatsResponse {
        self.shared.service.stats()
    }

    /// Connections open right now.
    pub fn connections(&self) -> usize {
        lock(&self.shared.conns).len()
    }

    fn stop(&mut self) {
        if self.sentinel.is_none() {
            return;
        }
        let shared = &self.shared;
        shared.trigger.fire();
        // NATS first: it unsubscribes at once (new requests go to other instances), then
        // drains in the background while the local connections drain here.
        #[cfg(feature = "nats")]
        let nats = self.nats.take().and_then(|side| crate::nats::stop_blocking(side, shared.config.grace));
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
        drop(lock(&shared.claim).take());
        let deadline = Instant::now() + shared.config.grace;
        let mut conns = lock(&shared.conns);
        for c in conns.values() {
            c.stop_reading();
        }
        while !conns.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                tracing::warn!(service = %shared.service.name, connections = conns.len(), "grace period over; closing connections with handlers still running");
                for c in conns.values() {
                    c.cancel_all();
                    c.close();
                }
                break;
            }
            conns = shared.drained.wait_timeout(conns, left).unwrap_or_else(|p| p.into_inner()).0;
        }
        drop(conns);
        shared.sentinel_stop.store(true, Ordering::SeqCst);
        if let Some(t) = lock(&shared.sentinel).as_ref() {
            t.unpark();
        }
        #[cfg(feature = "nats")]
        if let Some(task) = nats {
            crate::nats::wait_stopped(task);
        }
        if let Some(s) = self.sentinel.take() {
            let _ = s.join();
        }
        tracing::info!(service = %shared.service.name, "stopped");
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Shared {
    /// Shared with the NATS side, when there is one.
    service: Arc<Service<Arc<SyncHandler>>>,
    config: Config,
    trigger: Arc<Trigger>,
    /// The name's lock and socket; dropped (files removed) when shutdown starts.
    claim: Mutex<Option<Claim>>,
    /// Open connections, for shutdown and the sentinel.
    conns: Mutex<HashMap<u64, Arc<Conn>>>,
    /// Signalled when a connection's last thread leaves.
    drained: Condvar,
    next_conn: AtomicU64,
    /// Connections accepted but not through their handshake yet.
    handshaking: AtomicUsize,
    /// Zero point of the nanosecond timestamps kept in atomics.
    epoch: Instant,
    sentinel: Mutex<Option<thread::Thread>>,
    sentinel_parked: AtomicBool,
    sentinel_stop: AtomicBool,
}

impl Shared {
    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    fn stopping(&self) -> bool {
        self.trigger.is_fired()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One accepted connection, shared by the threads serving it.
struct Conn {
    id: u64,
    stream: Link,
    peer: Peer,
    accepted: Instant,
    /// The protocol's rules for this connection: the client's limit, the requests in flight.
    core: ServerConn,
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
    running: AtomicUsize,
    /// Threads serving this connection; the last to leave unregisters it.
    threads: AtomicUsize,
    handshaken: AtomicBool,
    closed: AtomicBool,
    /// We shut the read side ourselves (server shutdown): the EOF that follows is not the peer
    /// hanging up, so running handlers are not cancelled and their replies still go out.
    read_shut: AtomicBool,
}

struct ReadState {
    rbuf: ReadBuf,
    /// `SO_RCVTIMEO` is set to the frame timeout (a frame is partly in).
    partial_timeout: bool,
    /// When the frame now partly in started arriving: the frame timeout bounds the whole frame,
    /// not each read, so a peer trickling a byte now and then is still cut off.
    partial_since: Option<Instant>,
}

impl Conn {
    fn stop_reading(&self) {
        self.read_shut.store(true, Ordering::SeqCst);
        self.stream.shut(Shut::Read);
    }

    fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.stream.shut(Shut::Both);
    }

    fn cancel_all(&self) {
        self.core.cancel_all();
    }

    /// Queues or writes one frame (fitted to the client's limit). `batch`: more requests are
    /// buffered, so the reply may wait for the next flush instead of costing a syscall of its
    /// own.
    fn send(&self, shared: &Shared, out: Out, batch: bool) {
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
        if let Err(e) = result {
            drop(out);
            self.write_failed(e.error);
        }
    }

    /// A request is done: sends its answer, if one is wanted.
    fn finish(&self, shared: &Shared, id: u64, answer: Option<Answer>, batch: bool) {
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
        if is_timeout(&e) {
            tracing::warn!(
                conn = self.id,
                pid = self.peer.pid,
                "client does not read its replies; dropping the connection"
            );
        } else {
            tracing::debug!(conn = self.id, error = %e, "write failed; dropping the connection");
        }
        self.cancel_all();
        self.close();
    }
}

fn accept_loop(shared: &Arc<Shared>, listener: &std::os::unix::net::UnixListener) {
    let mut backoff = Duration::from_millis(5);
    loop {
        let mut fds =
            [PollFd::new(listener, PollFlags::IN), PollFd::new(&shared.trigger.wake_r, PollFlags::IN)];
        match rustix::event::poll(&mut fds, None) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => {
                tracing::error!(error = %e, "poll failed in accept loop");
                thread::sleep(backoff);
            }
        }
        if shared.stopping() {
            return;
        }
        loop {
            match rustix::net::accept_with(listener, SocketFlags::CLOEXEC) {
                Ok(fd) => {
                    backoff = Duration::from_millis(5);
                    on_accept(shared, UnixStream::from(fd));
                }
                Err(rustix::io::Errno::WOULDBLOCK) => break,
                Err(rustix::io::Errno::INTR | rustix::io::Errno::CONNABORTED) => {}
                Err(e) => {
                    // Out of descriptors or memory: back off instead of spinning on a listener
                    // that stays readable; connections wait in the backlog meanwhile.
                    tracing::warn!(error = %e, service = %shared.service.name, "accept failed; backing off {:?}", backoff);
                    thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_millis(200));
                    break;
                }
            }
        }
    }
}

fn on_accept(shared: &Arc<Shared>, stream: UnixStream) {
    let name = &shared.service.name;
    let refuse = |code: u16, message: String| {
        let out = refuse_connection(code, message);
        let _ = send_frame(&stream, &out.header, b"", &out.payload);
    };
    let peer = match peer_credentials(&stream) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read peer credentials; dropping connection");
            return;
        }
    };
    if !shared.config.allows(peer.uid) {
        tracing::warn!(service = %name, uid = peer.uid, pid = peer.pid, "refused a peer of another user");
        refuse(
            status::PERMISSION_DENIED,
            format!(
                "user {} may not use service '{name}' (it serves uid {} only)",
                peer.uid,
                registry::euid()
            ),
        );
        return;
    }
    let mut conns = lock(&shared.conns);
    if conns.len() >= shared.config.max_connections {
        drop(conns);
        tracing::warn!(service = %name, "connection limit reached; refusing a connection");
        refuse(
            status::BUSY,
            format!(
                "service '{name}' is at its limit of {} connections; try again later",
                shared.config.max_connections
            ),
        );
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
        stream,
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
        closed: AtomicBool::new(false),
        read_shut: AtomicBool::new(false),
    });
    conns.insert(conn.id, conn.clone());
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
fn conn_thread(shared: &Arc<Shared>, conn: &Arc<Conn>, first: bool) {
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

fn leave(shared: &Shared, conn: &Conn) {
    let mut conns = lock(&shared.conns);
    if conn.threads.fetch_sub(1, Ordering::SeqCst) == 1 {
        conn.cancel_all();
        conns.remove(&conn.id);
        shared.drained.notify_all();
    }
}

fn handshake(shared: &Shared, conn: &Conn) -> bool {
    let mut rs = lock(&conn.read);
    let max = conn.core.max_request();
    loop {
        let needed = match rs.rbuf.decode(max) {
            Ok(Decoded::Frame(f)) => {
                let len = f.len;
                let answer = conn.core.on_hello(&f, std::process::id(), shared.service.name.as_str());
                rs.rbuf.consume(len);
                let ok = answer.is_ok();
                conn.send(shared, answer.unwrap_or_else(|refusal| refusal), false);
                return ok
                    && set_recv_timeout(&conn.stream, None).is_ok()
                    && !conn.closed.load(Ordering::SeqCst);
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

fn reject_stream(shared: &Shared, conn: &Conn, e: &DecodeError) {
    tracing::debug!(conn = conn.id, pid = conn.peer.pid, error = %e, "bad frame; closing connection");
    conn.send(shared, broken(e), false);
    conn.close();
}

/// A request taken off the wire, not yet run.
struct Job {
    id: u64,
    method: Vec<u8>,
    payload: Vec<u8>,
    deadline: Option<Instant>,
    cancel: Arc<CancelState>,
}

fn serve_conn(shared: &Arc<Shared>, conn: &Arc<Conn>) {
    loop {
        let Ok(mut rs) = conn.read.try_lock() else { return };
        if conn.closed.load(Ordering::SeqCst) || (conn.read_shut.load(Ordering::SeqCst) && rs.rbuf.is_empty())
        {
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
        conn.unattended_since.store(shared.now_ns(), Ordering::SeqCst);
        conn.reader_active.store(false, Ordering::SeqCst);
        drop(rs);
        run(shared, conn, job, more);
    }
}

/// Reads until the next request; answers control frames on the way. `None`: the connection is
/// finished.
fn next_request(shared: &Shared, conn: &Conn, rs: &mut ReadState) -> Option<Job> {
    let max = shared.config.max_payload;
    loop {
        let needed = match rs.rbuf.decode(max) {
            Ok(Decoded::Frame(f)) => {
                let (h, len) = (f.header, f.len);
                let large = rs.rbuf.is_large();
                let stopping = shared.stopping();
                let mut job = match conn.core.on_frame(&f, stopping, shared.service.name.as_str()) {
                    Action::Request => match conn.core.admit(&h, Instant::now()) {
                        Ok(a) => Some(Job {
                            id: a.id,
                            method: f.method.to_vec(),
                            payload: if large { Vec::new() } else { f.payload.to_vec() },
                            deadline: a.deadline,
                            cancel: a.cancel,
                        }),
                        Err(refusal) => {
                            conn.send(shared, refusal, true);
                            None
                        }
                    },
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
        let partial = !rs.rbuf.is_empty();
        if partial != rs.partial_timeout {
            let t = partial.then_some(shared.config.frame_timeout);
            if set_recv_timeout(&conn.stream, t).is_err() {
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

fn run(shared: &Shared, conn: &Conn, job: Job, batch: bool) {
    let id = job.id;
    let call =
        Incoming { id, peer: conn.peer, payload: job.payload, deadline: job.deadline, cancel: job.cancel };
    let (run, req) = match dispatch::begin(&shared.service, &job.method, call) {
        Begin::Run(run, req) => (run, req),
        Begin::Answer(a) => return conn.finish(shared, id, Some(a), batch),
    };
    conn.running.fetch_add(1, Ordering::SeqCst);
    if shared.sentinel_parked.load(Ordering::SeqCst) {
        if let Some(t) = lock(&shared.sentinel).as_ref() {
            t.unpark();
        }
    }
    let handler = run.handler();
    let end = match catch_unwind(AssertUnwindSafe(|| handler(req))) {
        Ok(r) => End::Done(r),
        Err(panic) => End::Panicked(panic_message(&*panic)),
    };
    conn.running.fetch_sub(1, Ordering::SeqCst);
    let limit = ReplyLimit { max: conn.core.max_reply() as usize, what: "the client's limit" };
    let answer = run.finish(end, limit);
    conn.finish(shared, id, answer, batch);
}

/// Watches connections whose handler runs long (see the module docs).
fn sentinel(shared: Arc<Shared>) {
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
                if readable || c.pending_buffered.load(Ordering::SeqCst) {
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
            idle = 0;
        } else {
            thread::sleep(TICK);
        }
    }
}

fn start_follower(shared: &Arc<Shared>, conn: Arc<Conn>) {
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
