//! The blocking server: one thread per connection, handlers run inline on it.
//!
//! # How a connection is served
//!
//! The thread that reads a request runs its handler itself and writes the reply: no hand-off to
//! another thread, so a request costs what a hand-written socket loop costs. While a handler runs
//! nobody reads that connection, which is fine as long as handlers are quick. For the ones that
//! are not, a per-server *sentinel* thread looks every [`TICK`](conn::TICK) at connections whose handler has
//! been running for a tick: if their socket has more bytes waiting (another request, a `Cancel`,
//! or the peer hanging up), it starts a follower thread that takes over reading. So a slow or
//! hung handler never holds up the other requests of its connection, a `Cancel` reaches
//! [`Request::is_cancelled`] within a few milliseconds, and up to `max_in_flight` requests of one
//! connection run at once. The sentinel sleeps when the server has been idle for a while.

mod conn;
mod run;

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

#[cfg(doc)]
use crate::error::ErrorKind;
use crate::error::{Error, Result};
use crate::handler::{SyncHandler, SyncStream, SyncUnary};
use crate::micro::StatsResponse;
use crate::name::Name;
use crate::registry::{self, Claim};
use crate::request::{IntoPayload, Request, to_remote};
use crate::service::{Bound, Config, Identity, Service, add_method, claim_and_bind, meta};
use conn::{Shared, accept_loop, lock, sentinel};

fn erase<F, R, E>(f: F) -> Arc<SyncHandler>
where
    F: Fn(Request) -> std::result::Result<R, E> + Send + Sync + 'static,
    R: IntoPayload,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    Arc::new(SyncHandler::Unary(unary_fn(f)))
}

fn erase_stream<F, I, T, E, E2>(f: F) -> Arc<SyncHandler>
where
    F: Fn(Request) -> std::result::Result<I, E> + Send + Sync + 'static,
    I: IntoIterator<Item = std::result::Result<T, E2>>,
    I::IntoIter: Send + 'static,
    T: IntoPayload,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
    E2: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    Arc::new(SyncHandler::Stream(stream_fn(f)))
}

/// A user's blocking handler with its reply and error types erased (also for
/// `tokio::blocking`).
pub(crate) fn unary_fn<F, R, E>(f: F) -> Arc<SyncUnary>
where
    F: Fn(Request) -> std::result::Result<R, E> + Send + Sync + 'static,
    R: IntoPayload,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    Arc::new(move |req| f(req).map(IntoPayload::into_payload).map_err(|e| to_remote(e.into())))
}

/// A user's blocking streaming handler with its item and error types erased (also for
/// `tokio::blocking_stream`).
pub(crate) fn stream_fn<F, I, T, E, E2>(f: F) -> Arc<SyncStream>
where
    F: Fn(Request) -> std::result::Result<I, E> + Send + Sync + 'static,
    I: IntoIterator<Item = std::result::Result<T, E2>>,
    I::IntoIter: Send + 'static,
    T: IntoPayload,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
    E2: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    Arc::new(move |req| {
        let items = f(req).map_err(|e| to_remote(e.into()))?.into_iter();
        Ok(Box::new(items.map(|r| r.map(IntoPayload::into_payload).map_err(|e| to_remote(e.into()))))
            as crate::handler::SyncItems)
    })
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

    /// Adds a named method that answers with a stream: the handler returns the items (any
    /// iterator of results), which go to the caller as it takes them. Clients read it with
    /// [`Client::stream`](crate::Client::stream) (docs/PROTOCOL.md § 17).
    ///
    /// The iterator runs on the connection's thread; between items it waits while the caller's
    /// window is full, and it is dropped (not run further) once the caller cancels or leaves, or
    /// the stream's deadline, if the caller set one, passes. An `Err` item ends the stream with
    /// that error. An invalid or duplicate method name is reported by
    /// [`bind`](ServerBuilder::bind).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use microcs::{RemoteError, Request};
    ///
    /// let server = microcs::Server::builder("COUNTER").bind()?.stream_method("count", |req: Request| {
    ///     let n: u32 = req.text()?.parse().map_err(|_| RemoteError::new(400, "want a number"))?;
    ///     Ok::<_, RemoteError>((0..n).map(|i| Ok::<_, RemoteError>(i.to_string())))
    /// });
    /// # let _ = server; Ok::<(), microcs::Error>(())
    /// ```
    pub fn stream_method<F, I, T, E, E2>(mut self, name: &str, handler: F) -> Self
    where
        F: Fn(Request) -> std::result::Result<I, E> + Send + Sync + 'static,
        I: IntoIterator<Item = std::result::Result<T, E2>>,
        I::IntoIter: Send + 'static,
        T: IntoPayload,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
        E2: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        add_method(&mut self.methods, &mut self.error, name, erase_stream(handler));
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
                claim_and_bind(self.name, self.dir, &self.identity, &self.config)?;
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

/// A bound blocking server, taken apart for the async server to serve (its shutdown trigger is
/// left behind: triggers made before the conversion do not reach the async server).
#[cfg(feature = "tokio")]
pub(crate) struct Parts {
    pub(crate) name: Name,
    pub(crate) dir: PathBuf,
    pub(crate) claim: Option<Claim>,
    pub(crate) listener: Option<std::os::unix::net::UnixListener>,
    pub(crate) started_ms: u64,
    pub(crate) config: Config,
    pub(crate) identity: Identity,
    pub(crate) methods: Vec<(String, Arc<SyncHandler>)>,
    pub(crate) error: Option<Error>,
    #[cfg(feature = "nats")]
    pub(crate) nats: Option<crate::nats::Pending>,
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

    /// Adds a named method that answers with a stream (see [`ServerBuilder::stream_method`]).
    pub fn stream_method<F, I, T, E, E2>(mut self, name: &str, handler: F) -> Self
    where
        F: Fn(Request) -> std::result::Result<I, E> + Send + Sync + 'static,
        I: IntoIterator<Item = std::result::Result<T, E2>>,
        I::IntoIter: Send + 'static,
        T: IntoPayload,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
        E2: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        add_method(&mut self.methods, &mut self.error, name, erase_stream(handler));
        self
    }

    /// What the async server takes over (see `tokio::Server::from_blocking`).
    #[cfg(feature = "tokio")]
    pub(crate) fn into_parts(self) -> Parts {
        Parts {
            name: self.name,
            dir: self.dir,
            claim: self.claim,
            listener: self.listener,
            started_ms: self.started_ms,
            config: self.config,
            identity: self.identity,
            methods: self.methods,
            error: self.error,
            #[cfg(feature = "nats")]
            nats: self.nats,
        }
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

    /// As [`spawn`](Server::spawn), with a default handler that answers with a stream (see
    /// [`ServerBuilder::stream_method`]): callers read it with
    /// [`Client::stream`](crate::Client::stream) and an empty method name.
    ///
    /// # Errors
    ///
    /// As [`spawn`](Server::spawn).
    pub fn spawn_stream<F, I, T, E, E2>(self, handler: F) -> Result<ServerHandle>
    where
        F: Fn(Request) -> std::result::Result<I, E> + Send + Sync + 'static,
        I: IntoIterator<Item = std::result::Result<T, E2>>,
        I::IntoIter: Send + 'static,
        T: IntoPayload,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
        E2: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        self.start(erase_stream(handler))
    }

    /// Serves on this thread until a [`ShutdownTrigger`] fires (or the server loses its name,
    /// see [`ServerHandle::wait`]), then shuts down as [`ServerHandle::shutdown`] does.
    ///
    /// # Errors
    ///
    /// As [`spawn`](Server::spawn), and as [`ServerHandle::wait`] after serving.
    pub fn serve<F, R, E>(self, handler: F) -> Result<()>
    where
        F: Fn(Request) -> std::result::Result<R, E> + Send + Sync + 'static,
        R: IntoPayload,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let trigger = self.trigger.clone();
        let handle = self.start(erase(handler))?;
        let served = trigger.wait();
        handle.shutdown();
        served
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
            spare: Mutex::new(Vec::new()),
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
                    .spawn(move || accept_loop(&s, listener))
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
    fired: Mutex<Fired>,
    cv: Condvar,
    wake_r: OwnedFd,
    wake_w: OwnedFd,
}

/// Whether the server was asked to stop, and why it stopped by itself, if it did.
#[derive(Default)]
struct Fired {
    fired: bool,
    /// The server lost its name (see `service::watch_name`); what `serve` and `wait` return.
    lost: Option<Error>,
}

impl Trigger {
    fn new() -> Result<Arc<Trigger>> {
        let (wake_r, wake_w) =
            rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC | rustix::pipe::PipeFlags::NONBLOCK)
                .map_err(|e| Error::io("cannot create wake-up pipe", e.into()))?;
        Ok(Arc::new(Trigger { fired: Mutex::new(Fired::default()), cv: Condvar::new(), wake_r, wake_w }))
    }

    fn fire(&self) {
        self.fire_with(None);
    }

    /// Stops the server because it lost its name: `lost` is what `serve` and `wait` return.
    fn fire_lost(&self, lost: Error) {
        self.fire_with(Some(lost));
    }

    fn fire_with(&self, lost: Option<Error>) {
        let mut fired = lock(&self.fired);
        if !fired.fired {
            *fired = Fired { fired: true, lost };
            let _ = rustix::io::write(&self.wake_w, &[1]);
            self.cv.notify_all();
        }
    }

    fn is_fired(&self) -> bool {
        lock(&self.fired).fired
    }

    fn wait(&self) -> Result<()> {
        loop {
            if let Some(done) = self.wait_timeout(Duration::from_secs(3600)) {
                return done;
            }
        }
    }

    /// [`wait`](Trigger::wait) for at most `limit`; `None` if not fired by then.
    fn wait_timeout(&self, limit: Duration) -> Option<Result<()>> {
        let fired = lock(&self.fired);
        let (fired, _) =
            self.cv.wait_timeout_while(fired, limit, |f| !f.fired).unwrap_or_else(|p| p.into_inner());
        fired.fired.then(|| fired.lost.clone().map_or(Ok(()), Err))
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

    /// Blocks until a [`ShutdownTrigger`] fires, or the server stops by itself because it lost
    /// its name (the server keeps serving meanwhile). Call [`shutdown`](ServerHandle::shutdown)
    /// after it, to let running requests finish.
    ///
    /// A server checks every second that its socket and lock file are still its own. When
    /// they were removed or replaced (the runtime directory was deleted, say), it takes the
    /// name back while it is free; it stops only when another server owns the name now, or
    /// something other than a socket blocks the socket path.
    ///
    /// # Errors
    ///
    /// When the server lost its name: [`ErrorKind::NameTaken`] with the new owner's pid
    /// ([`Error::owner_pid`]), or [`ErrorKind::PermissionDenied`] when the runtime directory
    /// became unsafe or a non-socket file took the socket's place.
    pub fn wait(&self) -> Result<()> {
        self.shared.trigger.wait()
    }

    /// Like [`wait`](ServerHandle::wait), for at most `limit`: `None` if the server still serves
    /// then (`Duration::ZERO` only looks).
    ///
    /// # Errors
    ///
    /// As [`wait`](ServerHandle::wait).
    pub fn wait_timeout(&self, limit: Duration) -> Option<Result<()>> {
        self.shared.trigger.wait_timeout(limit)
    }

    /// The same counters `$stats` reports, read locally.
    pub fn stats(&self) -> StatsResponse {
        self.shared.service.stats(None)
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
