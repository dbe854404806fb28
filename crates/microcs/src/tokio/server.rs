//! The async server: one task per connection, one task per request.
//!
//! # How a connection is served
//!
//! The connection task checks the peer (before reading a byte), shakes hands, then reads frames.
//! Each request gets a permit from the connection's semaphore (`max_in_flight` of them) and runs
//! in a task of its own, so a slow request never holds up a fast one behind it. When all
//! permits are taken, the connection task stops reading until one is returned: the rest of the
//! client's requests wait in its socket, and memory stays bounded. Replies go through the
//! connection's [`Outbox`] to its writer task, which batches them; past a high-water mark of
//! unsent replies (a client that does not read), the connection is not read either.
//!
//! A request's task runs the handler until it returns, its deadline passes (the handler is
//! dropped and the caller told "timed out"), or the caller cancels and the handler has not
//! finished within the grace period (dropped, no reply). A `Cancel` frame, and the peer hanging
//! up, make [`Request::cancelled`] resolve at once, so a handler can stop early and clean up.

use std::collections::HashMap;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use ::tokio::net::{UnixListener, UnixStream};
use ::tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use ::tokio::task::{AbortHandle, JoinHandle};
use ::tokio::time::{Instant, sleep, sleep_until};

use super::io::{HIGH_WATER, OutState, Outbox, Stream, read_more, shutdown};
use crate::dispatch::{self, Answer, Begin, End, Incoming, ReplyLimit};
#[cfg(doc)]
use crate::error::ErrorKind;
use crate::error::{Error, RemoteError, Result};
use crate::io::{Filled, ReadBuf};
use crate::micro::StatsResponse;
use crate::name::Name;
use crate::proto::server_conn::{
    Action, Out, ServerConn, broken, frame_timed_out, refuse_connection, shutting_down,
};
use crate::proto::{DecodeError, Decoded, Header, status};
use crate::registry::{self, Claim};
use crate::request::{CancelState, IntoPayload, Peer, Request, panic_message, to_remote};
use crate::service::{Bound, Config, Identity, Service, add_method, claim_and_bind, meta};
use crate::transport::unix::{peer_credentials, set_send_buffer};
use crate::transport::{Link, Shut, Transport, send_frame_now};

/// What a handler's future resolves to, after type erasure.
type HandlerFuture = Pin<Box<dyn Future<Output = std::result::Result<Vec<u8>, RemoteError>> + Send>>;
/// A handler, after type erasure.
pub(crate) type AsyncHandler = dyn Fn(Request) -> HandlerFuture + Send + Sync;

fn erase<F, Fut, R, E>(f: F) -> Arc<AsyncHandler>
where
    F: Fn(Request) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = std::result::Result<R, E>> + Send + 'static,
    R: IntoPayload,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    Arc::new(move |req| {
        let fut = f(req);
        Box::pin(async move { fut.await.map(IntoPayload::into_payload).map_err(|e| to_remote(e.into())) })
    })
}

/// Options for a [`Server`]; from [`Server::builder`].
#[must_use = "a builder does nothing until .bind()"]
pub struct ServerBuilder {
    name: String,
    dir: Option<PathBuf>,
    config: Config,
    identity: Identity,
    methods: Vec<(String, Arc<AsyncHandler>)>,
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
        self.config.max_in_flight = n.clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize));
        self
    }

    /// How long [`ServerHandle::shutdown`] lets running handlers finish (default 10 s); also
    /// how long a handler whose caller cancelled may take to wind down before it is dropped.
    pub fn grace_period(mut self, grace: Duration) -> Self {
        self.config.grace = grace;
        self
    }

    /// Adds a named method with an async handler. Clients call it with
    /// [`Client::call`](super::Client::call).
    ///
    /// The handler is an `async fn`, an `async` closure, or a closure returning a future. Each
    /// call's future must own what it uses (`Send + 'static`): a handler with state clones it
    /// into the future, as in `move |req| { let db = db.clone(); async move { ... } }` (an
    /// `async move` closure that captures state does not implement `Fn`).
    ///
    /// An invalid or duplicate method name is reported by [`bind`](ServerBuilder::bind).
    pub fn method<F, Fut, R, E>(mut self, name: &str, handler: F) -> Self
    where
        F: Fn(Request) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<R, E>> + Send + 'static,
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
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: if the future is dropped, a name it had already claimed is released.
    pub async fn bind(self) -> Result<Server> {
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
            let identity = self.identity.clone();
            let (name, dir) = (self.name, self.dir);
            // Claiming touches files and may wait a moment for a racing claimant: off the runtime.
            let bound =
                ::tokio::task::spawn_blocking(move || claim_and_bind(name, dir, &identity)).await.map_err(
                    |e| Error::io("cannot claim the name", std::io::Error::other(e.to_string())),
                )??;
            let Bound { name, dir, claim, listener, started_ms } = bound;
            let listener = UnixListener::from_std(listener).map_err(|e| {
                Error::io(
                    format_args!("cannot register {} with the runtime", claim.socket_path().display()),
                    e,
                )
            })?;
            (name, dir, Some(claim), Some(listener), started_ms)
        };
        // After the local claim, so that a taken name is reported first; a failure here
        // releases the claim.
        #[cfg(feature = "nats")]
        let nats = {
            let methods: Vec<String> = self.methods.iter().map(|(m, _)| m.clone()).collect();
            crate::nats::bind_async(name.as_str(), &self.nats, &self.identity.version, &methods).await?
        };
        let (stop, _) = watch::channel(false);
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
            stop: Arc::new(stop),
            #[cfg(feature = "nats")]
            nats,
        })
    }
}

/// An async server that owns its name and socket, ready to serve.
///
/// # Examples
///
/// ```
/// # let dir = std::env::temp_dir().join(format!("microcs-doc-tsrv-{}", std::process::id()));
/// use microcs::Request;
/// use microcs::tokio::{Client, Server};
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let handle = Server::builder("ECHO_ASYNC_DOC")
///     # .runtime_dir(&dir)
///     .method("upper", |req: Request| async move {
///         Ok::<_, microcs::RemoteError>(req.text()?.to_uppercase())
///     })
///     .bind()
///     .await?
///     .spawn(|req: Request| async move { Ok::<_, microcs::RemoteError>(req.into_payload()) })?;
///
/// let client = Client::builder("ECHO_ASYNC_DOC")
///     # .runtime_dir(&dir)
///     .connect()
///     .await?;
/// assert_eq!(client.request(b"hi").await?, b"hi");
/// assert_eq!(client.call("upper", b"hi").await?, b"HI");
/// handle.shutdown().await;
/// # Ok::<(), microcs::Error>(())
/// # }).unwrap();
/// ```
pub struct Server {
    name: Name,
    dir: PathBuf,
    /// The name's lock and socket; `None` when serving on NATS only.
    claim: Option<Claim>,
    listener: Option<UnixListener>,
    started_ms: u64,
    config: Config,
    identity: Identity,
    methods: Vec<(String, Arc<AsyncHandler>)>,
    error: Option<Error>,
    stop: Arc<watch::Sender<bool>>,
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
    ///
    /// # Cancel safety
    ///
    /// As [`ServerBuilder::bind`].
    pub async fn bind(name: &str) -> Result<Server> {
        Server::builder(name).bind().await
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
    pub fn method<F, Fut, R, E>(mut self, name: &str, handler: F) -> Self
    where
        F: Fn(Request) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<R, E>> + Send + 'static,
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

    /// The socket the server listens on.
    pub fn socket_path(&self) -> &Path {
        self.claim.as_ref().map_or(Path::new(""), Claim::socket_path)
    }

    /// A handle that stops [`serve`](Server::serve) (or the spawned server) from any thread or
    /// task.
    pub fn shutdown_trigger(&self) -> ShutdownTrigger {
        ShutdownTrigger { stop: self.stop.clone() }
    }

    /// Serves in background tasks and returns at once. `handler` answers requests that name no
    /// method.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::InvalidName`] for a bad method name added with [`Server::method`];
    /// [`ErrorKind::Io`] if the service's metadata cannot be written.
    ///
    /// # Panics
    ///
    /// When called outside a tokio runtime.
    pub fn spawn<F, Fut, R, E>(self, handler: F) -> Result<ServerHandle>
    where
        F: Fn(Request) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<R, E>> + Send + 'static,
        R: IntoPayload,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        self.start(erase(handler))
    }

    /// Serves until a [`ShutdownTrigger`] fires, then shuts down as [`ServerHandle::shutdown`]
    /// does.
    ///
    /// # Errors
    ///
    /// As [`spawn`](Server::spawn).
    ///
    /// # Cancel safety
    ///
    /// Dropping the future stops the server: it stops accepting at once, and the running
    /// requests are drained in the background as [`ServerHandle::shutdown`] would.
    pub async fn serve<F, Fut, R, E>(self, handler: F) -> Result<()>
    where
        F: Fn(Request) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<R, E>> + Send + 'static,
        R: IntoPayload,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        self.serve_with_shutdown(handler, std::future::pending()).await
    }

    /// Serves until `signal` resolves (or a [`ShutdownTrigger`] fires), then shuts down as
    /// [`ServerHandle::shutdown`] does — the mini-redis pattern.
    ///
    /// # Errors
    ///
    /// As [`spawn`](Server::spawn).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> microcs::Result<()> {
    /// use microcs::{RemoteError, Request};
    /// microcs::tokio::Server::bind("LIFE_GEN")
    ///     .await?
    ///     .serve_with_shutdown(
    ///         |req: Request| async move { Ok::<_, RemoteError>(req.into_payload()) },
    ///         async { tokio::time::sleep(std::time::Duration::from_secs(60)).await },
    ///     )
    ///     .await
    /// # }
    /// ```
    ///
    /// # Cancel safety
    ///
    /// As [`serve`](Server::serve).
    pub async fn serve_with_shutdown<F, Fut, R, E, S>(self, handler: F, signal: S) -> Result<()>
    where
        F: Fn(Request) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<R, E>> + Send + 'static,
        R: IntoPayload,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
        S: Future<Output = ()>,
    {
        let handle = self.start(erase(handler))?;
        let mut stop = handle.shared.stop.subscribe();
        ::tokio::select! {
            () = signal => {}
            _ = stop.wait_for(|s| *s) => {}
        }
        handle.shutdown().await;
        Ok(())
    }

    fn start(self, default: Arc<AsyncHandler>) -> Result<ServerHandle> {
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
            Some(pending) => Some(crate::nats::start_async(pending, service.clone(), &self.config)?),
            None => None,
        };
        let (kill, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            service,
            config: self.config,
            stop: self.stop,
            kill,
            claim: Mutex::new(self.claim),
            conns: Mutex::new(HashMap::new()),
            drained: Notify::new(),
            next_conn: AtomicU64::new(1),
        });
        let accept = self.listener.map(|l| ::tokio::spawn(accept_loop(shared.clone(), l)));
        tracing::info!(service = %self.name, "serving");
        Ok(ServerHandle {
            shared,
            accept,
            #[cfg(feature = "nats")]
            nats,
        })
    }
}

/// Stops a server from any thread or task (for example a signal handler); cheap to clone.
#[derive(Clone)]
pub struct ShutdownTrigger {
    stop: Arc<watch::Sender<bool>>,
}

impl ShutdownTrigger {
    /// Asks the server to shut down; [`Server::serve`] then drains and returns.
    pub fn shutdown(&self) {
        self.stop.send_replace(true);
    }
}

impl std::fmt::Debug for ShutdownTrigger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShutdownTrigger").field("fired", &*self.stop.borrow()).finish()
    }
}

/// A running server. Dropping it starts the shutdown in the background; await
/// [`shutdown`](ServerHandle::shutdown) to wait for it.
pub struct ServerHandle {
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
    /// The NATS side; dropping it stops it too.
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
    /// running handlers finish within the grace period, then closes every connection; handlers
    /// still running then are dropped.
    ///
    /// Requests that arrive after this started are answered "shutting down" without running,
    /// which tells the client it may safely send them again.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future leaves the shutdown to finish in the background.
    pub async fn shutdown(mut self) {
        let shared = self.shared.clone();
        shared.stop.send_replace(true);
        // NATS first: it unsubscribes at once (new requests go to other instances), then drains
        // alongside the local connections.
        #[cfg(feature = "nats")]
        let nats = self.nats.take().map(|side| ::tokio::spawn(side.stop(shared.config.grace)));
        if let Some(accept) = self.accept.take() {
            let _ = accept.await;
        }
        let grace_over = Instant::now() + shared.config.grace;
        loop {
            let drained = shared.drained.notified();
            ::tokio::pin!(drained);
            drained.as_mut().enable();
            let open = shared.conns().len();
            if open == 0 {
                break;
            }
            ::tokio::select! {
                () = drained => {}
                () = sleep_until(grace_over), if !*shared.kill.borrow() => {
                    tracing::warn!(service = %shared.service.name, connections = open, "grace period over; dropping handlers still running");
                    shared.kill.send_replace(true);
                }
            }
        }
        #[cfg(feature = "nats")]
        if let Some(task) = nats {
            let _ = task.await;
        }
        tracing::info!(service = %shared.service.name, "stopped");
    }

    /// The service name.
    pub fn name(&self) -> &Name {
        &self.shared.service.name
    }

    /// A trigger that shuts this server down from another thread or task.
    pub fn shutdown_trigger(&self) -> ShutdownTrigger {
        ShutdownTrigger { stop: self.shared.stop.clone() }
    }

    /// Waits until a [`ShutdownTrigger`] fires (the server keeps serving meanwhile).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: it only waits.
    pub async fn wait(&self) {
        let _ = self.shared.stop.subscribe().wait_for(|s| *s).await;
    }

    /// The same counters `$stats` reports, read locally.
    pub fn stats(&self) -> StatsResponse {
        self.shared.service.stats()
    }

    /// Connections open right now.
    pub fn connections(&self) -> usize {
        self.shared.conns().len()
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        if self.accept.is_some() {
            // The accept task releases the name as it ends; connections drain on their own.
            self.shared.stop.send_replace(true);
        }
    }
}

/// What the server's tasks share.
struct Shared {
    /// Shared with the NATS side, when there is one.
    service: Arc<Service<Arc<AsyncHandler>>>,
    config: Config,
    /// Shutdown started: stop accepting, refuse new requests, let running ones finish.
    stop: Arc<watch::Sender<bool>>,
    /// The grace period is over: drop every handler still running, close every connection.
    kill: watch::Sender<bool>,
    /// The name's lock and socket; dropped (files removed) when the accept loop ends.
    claim: Mutex<Option<Claim>>,
    /// Open connections: for the connection cap, the handshake cap and shutdown.
    conns: Mutex<HashMap<u64, ConnEntry>>,
    /// Notified whenever a connection ends.
    drained: Notify,
    next_conn: AtomicU64,
}

impl Shared {
    fn conns(&self) -> MutexGuard<'_, HashMap<u64, ConnEntry>> {
        lock(&self.conns)
    }

    fn stopping(&self) -> bool {
        *self.stop.borrow()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The server's record of one connection.
struct ConnEntry {
    accepted: Instant,
    handshaken: bool,
    /// Aborted to make room; no longer counts as a pending handshake.
    dropped: bool,
    /// Ends the connection task, to make room when too many connections sit in the handshake.
    abort: AbortHandle,
}

/// Closes and unregisters a connection when its task ends, however it ends (including by
/// abort, which would otherwise leave the writer task waiting).
struct ConnGuard {
    shared: Arc<Shared>,
    conn: Arc<Conn>,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.conn.outbox.close();
        shutdown(&self.conn.stream);
        self.shared.conns().remove(&self.conn.id);
        self.shared.drained.notify_waiters();
    }
}

async fn accept_loop(shared: Arc<Shared>, listener: UnixListener) {
    let mut stop = shared.stop.subscribe();
    let mut backoff = Duration::from_millis(5);
    loop {
        let failed = ::tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            r = listener.accept() => match r {
                Ok((stream, _)) => {
                    backoff = Duration::from_millis(5);
                    on_accept(&shared, stream);
                    false
                }
                Err(e) if matches!(e.kind(), std::io::ErrorKind::ConnectionAborted | std::io::ErrorKind::Interrupted) => false,
                Err(e) => {
                    tracing::warn!(error = %e, service = %shared.service.name, "accept failed; backing off {:?}", backoff);
                    true
                }
            }
        };
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

fn on_accept(shared: &Arc<Shared>, stream: UnixStream) {
    let name = &shared.service.name;
    // Still non-blocking, as tokio documents for `into_std`; registered again below.
    let stream: Link = match stream.into_std() {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot take over a new connection; dropping it");
            return;
        }
    };
    let refuse = |code: u16, message: String| {
        let out = refuse_connection(code, message);
        send_frame_now(&stream, &out.header, &out.payload);
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
    let mut conns = shared.conns();
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
}

/// One accepted connection, shared by its reader (the connection task), its writer task and the
/// tasks of its requests.
struct Conn {
    id: u64,
    stream: Stream,
    peer: Peer,
    /// The protocol's rules for this connection: the client's limit, the requests in flight.
    core: ServerConn,
    /// Replies and errors for the writer task.
    outbox: Outbox<()>,
    /// The connection task is answering the frames of one read: answers queued meanwhile
    /// wait for its [`flush`](Conn::flush) instead of waking the writer task.
    batching: AtomicBool,
    /// One permit per request in flight: the backpressure cap.
    permits: Arc<Semaphore>,
}

impl Conn {
    fn cancel_all(&self) {
        self.core.cancel_all();
    }

    /// Queues a frame, fitted to the client's limit; a large payload is written from its own
    /// vector, without a copy. `false`: the connection no longer takes frames.
    fn send(&self, out: Out) -> bool {
        let Out { header, payload } = self.core.fit(out);
        self.queue(|st| st.push_owned(&header, b"", payload))
    }

    /// A request is done: sends its answer, if one is wanted.
    fn finish(&self, id: u64, answer: Option<Answer>) {
        if let Some(out) = self.core.answer(id, answer) {
            self.send(out);
        }
    }

    /// Queues a frame with `push`; wakes the writer task unless the connection task will flush.
    fn queue(&self, push: impl FnOnce(&mut OutState<()>) -> Option<(u64, u64)>) -> bool {
        let queued = push(&mut self.outbox.lock()).is_some();
        if queued && !self.batching.load(Ordering::SeqCst) {
            self.outbox.wake();
        }
        queued
    }

    /// Ends a batch (see `batching`): sends what is queued from here if the writer task is
    /// idle and the socket takes it, else wakes the writer task. Saves the writer's wake-up and
    /// task poll on every read's answers.
    fn flush(&self) {
        self.batching.store(false, Ordering::SeqCst);
        if !self.outbox.lock().send_now(&self.stream) {
            self.outbox.wake();
        }
    }

    fn reject_stream(&self, e: &DecodeError) {
        tracing::debug!(conn = self.id, pid = self.peer.pid, error = %e, "bad frame; closing connection");
        self.send(broken(e));
    }
}

async fn conn_task(shared: Arc<Shared>, conn: Arc<Conn>, _guard: ConnGuard) {
    let c = conn.clone();
    let write_timeout = shared.config.write_timeout;
    let mut writer = ::tokio::spawn(async move {
        let end = c.outbox.run_writer(&c.stream, Some(write_timeout)).await;
        if let Some(e) = end.error {
            if e.kind() == std::io::ErrorKind::TimedOut {
                tracing::warn!(
                    conn = c.id,
                    pid = c.peer.pid,
                    "client does not read its replies; dropping the connection"
                );
            } else {
                tracing::debug!(conn = c.id, error = %e, "write failed; dropping the connection");
            }
            c.cancel_all();
            shutdown(&c.stream);
        }
    });
    let mut kill = shared.kill.subscribe();
    let mut rbuf = ReadBuf::default();
    if handshake(&shared, &conn, &mut rbuf).await {
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
async fn handshake(shared: &Shared, conn: &Conn, rbuf: &mut ReadBuf) -> bool {
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
                    Ok(ack) => conn.send(ack),
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
async fn serve_conn(shared: &Arc<Shared>, conn: &Arc<Conn>, rbuf: &mut ReadBuf) -> bool {
    let max = shared.config.max_payload;
    let mut stop = shared.stop.subscribe();
    let mut kill = shared.kill.subscribe();
    // Made once, not on every turn of the loop: a fresh `wait_for` registers a waiter with the
    // watch's notifier and removes it again each time, which cost a tenth of the instructions
    // of a request. Each is polled no more once it has fired.
    let stop_signal = stop.wait_for(|s| *s);
    let kill_signal = kill.wait_for(|k| *k);
    ::tokio::pin!(stop_signal, kill_signal);
    let mut stop_seen = false;
    // Shutdown began: our read side is shut, the rest of what the client sent is answered
    // "shutting down", and the EOF that follows is not the peer hanging up.
    let mut draining = false;
    // When the frame at the front of `rbuf` started to arrive (it must be whole by
    // `frame_timeout` after that); reset whenever we stop reading on purpose.
    let mut frame_started: Option<Instant> = None;
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
                        let permit = match conn.permits.clone().try_acquire_owned() {
                            Ok(p) => Some(p),
                            // At the cap: read nothing more until a handler finishes
                            // (and let the answers queued so far go out meanwhile).
                            Err(_) => {
                                conn.flush();
                                ::tokio::select! {
                                    p = conn.permits.clone().acquire_owned() => p.ok(),
                                    _ = &mut stop_signal, if !draining && !stop_seen => {
                                        stop_seen = true;
                                        None
                                    }
                                    _ = &mut kill_signal => return false,
                                }
                            }
                        };
                        match permit {
                            Some(p) => {
                                let method = f.method.to_vec();
                                // A large payload was read into a vector of its own: moved,
                                // not copied.
                                let small = (!rbuf.is_large()).then(|| f.payload.to_vec());
                                let payload = small.or_else(|| rbuf.take_payload()).unwrap_or_default();
                                admit(shared, conn, &h, method, payload, p);
                            }
                            None => {
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
                continue;
            }
        };
        if !draining && shared.stopping() {
            draining = true;
            stop_reading(conn);
        }
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
            _ = &mut stop_signal, if !draining && !stop_seen => stop_seen = true,
            _ = &mut kill_signal => return false,
        }
    }
}

/// Shuts our read side: the client's further writes fail at once (so it knows they did not
/// run), and what it already sent can still be read and answered.
fn stop_reading(conn: &Conn) {
    conn.stream.link().shut(Shut::Read);
}

/// Registers a request in flight and starts its task.
fn admit(
    shared: &Arc<Shared>,
    conn: &Arc<Conn>,
    h: &Header,
    method: Vec<u8>,
    payload: Vec<u8>,
    permit: OwnedSemaphorePermit,
) {
    let admitted = match conn.core.admit(h, std::time::Instant::now()) {
        Ok(a) => a,
        Err(refusal) => {
            conn.send(refusal);
            return;
        }
    };
    let job = Job { id: h.id, method, payload, deadline: admitted.deadline, cancel: admitted.cancel };
    // Most handlers answer without waiting for anything: poll the request once here, on the
    // connection's task, and start a task only for one still pending. That saves a task per
    // request (its allocation, the move of this future into it, a trip through the scheduler).
    // The task polls the future again at once, so whatever it waits for is registered with the
    // task's waker; the no-op waker of this first poll is never needed.
    let mut fut = Box::pin(run(shared.clone(), conn.clone(), job, permit));
    if fut.as_mut().poll(&mut Context::from_waker(Waker::noop())).is_pending() {
        ::tokio::spawn(fut);
    }
}

/// A request taken off the wire, not yet run.
struct Job {
    id: u64,
    method: Vec<u8>,
    payload: Vec<u8>,
    deadline: Option<std::time::Instant>,
    cancel: Arc<CancelState>,
}

/// The task of one request: runs its handler and sends the answer.
async fn run(shared: Arc<Shared>, conn: Arc<Conn>, job: Job, _permit: OwnedSemaphorePermit) {
    let id = job.id;
    let call =
        Incoming { id, peer: conn.peer, payload: job.payload, deadline: job.deadline, cancel: job.cancel };
    let (run, req) = match dispatch::begin(&shared.service, &job.method, call) {
        Begin::Run(run, req) => (run, req),
        Begin::Answer(a) => return conn.finish(id, Some(a)),
    };
    let deadline = run.deadline().map(Instant::from_std);
    let cancel = run.cancel().clone();
    let mut kill = shared.kill.subscribe();
    let grace = shared.config.grace;
    let handler = run.handler();
    let end = match catch_unwind(AssertUnwindSafe(|| handler(req))) {
        Err(panic) => End::Panicked(panic_message(&*panic)),
        Ok(fut) => ::tokio::select! {
            biased;
            r = CatchUnwind(fut) => match r {
                Ok(r) => End::Done(r),
                Err(panic) => End::Panicked(panic_message(&*panic)),
            },
            () = sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => End::Deadline,
            () = async { cancel.wait().await; sleep(grace).await } => End::Abandoned(grace),
            _ = kill.wait_for(|k| *k) => End::Killed,
        },
    };
    let limit = ReplyLimit { max: conn.core.max_reply() as usize, what: "the client's limit" };
    let answer = run.finish(end, limit);
    conn.finish(id, answer);
}

/// Turns a panic inside the handler's future into a value, as `catch_unwind` does for a call.
struct CatchUnwind(HandlerFuture);

impl Future for CatchUnwind {
    type Output = std::thread::Result<std::result::Result<Vec<u8>, RemoteError>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let fut = &mut self.0;
        match catch_unwind(AssertUnwindSafe(|| fut.as_mut().poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(r)) => Poll::Ready(Ok(r)),
            Err(panic) => Poll::Ready(Err(panic)),
        }
    }
}
