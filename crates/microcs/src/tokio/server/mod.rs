//! The async server: one task per connection, one task per request.
//!
//! # How a connection is served
//!
//! The connection task checks the peer (before reading a byte), shakes hands, then reads frames.
//! A handler that answers at once (its future is ready when first polled) runs to its end on
//! the connection task; any other request goes on in a task of its own, holding a permit of
//! the connection's semaphore (`max_in_flight` of them), so a slow request never holds up a
//! fast one behind it. When all permits are taken, the connection task stops reading until one
//! is returned: the rest of the client's requests wait in its socket, and memory stays bounded. Replies go through the
//! connection's [`Outbox`] to its writer task, which batches them; past a high-water mark of
//! unsent replies (a client that does not read), the connection is not read either.
//!
//! A request's task runs the handler until it returns, its deadline passes (the handler is
//! dropped and the caller told "timed out"), or the caller cancels and the handler has not
//! finished within the grace period (dropped, no reply). A `Cancel` frame, and the peer hanging
//! up, make [`Request::cancelled`] resolve at once, so a handler can stop early and clean up.

mod conn;
mod run;

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ::tokio::net::UnixListener;
use ::tokio::sync::{Notify, Semaphore, watch};
use ::tokio::task::JoinHandle;
use ::tokio::time::{Instant, sleep_until};

#[cfg(doc)]
use crate::error::ErrorKind;
use crate::error::{Error, RemoteError, Result};
pub use crate::handler::async_handlers::Items;
use crate::handler::{AsyncHandler, HandlerFuture};
use crate::micro::StatsResponse;
use crate::name::Name;
use crate::registry::{self, Claim};
use crate::request::{IntoPayload, Request, to_remote};
use crate::service::{Bound, Config, Identity, Service, add_method, claim_and_bind, meta};
use conn::{Shared, accept_loop};

fn erase<F, Fut, R, E>(f: F) -> Arc<AsyncHandler>
where
    F: Fn(Request) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = std::result::Result<R, E>> + Send + 'static,
    R: IntoPayload,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    Arc::new(AsyncHandler::Unary(Box::new(move |req| {
        let fut = f(req);
        Box::pin(async move { fut.await.map(IntoPayload::into_payload).map_err(|e| to_remote(e.into())) })
    })))
}

fn erase_stream<F, Fut, E>(f: F) -> Arc<AsyncHandler>
where
    F: Fn(Request, Items) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = std::result::Result<(), E>> + Send + 'static,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    Arc::new(AsyncHandler::Stream(Box::new(move |req, items| {
        let fut = f(req, items);
        Box::pin(async move { fut.await.map(|()| Vec::new()).map_err(|e| to_remote(e.into())) })
            as HandlerFuture
    })))
}

/// A blocking handler for an async server: each call runs on tokio's blocking pool
/// (`spawn_blocking`), so a handler that computes for long or calls blocking code never holds up
/// the runtime. Use it with [`ServerBuilder::method`] or [`Server::spawn`]. The handler runs to
/// its end even when its caller cancels or its deadline passes (the caller is answered at once
/// all the same); [`Request::is_cancelled`] tells it to stop early. A panic is answered with 500,
/// as in any handler.
///
/// # Examples
///
/// ```no_run
/// # async fn demo() -> microcs::Result<()> {
/// use microcs::{RemoteError, Request};
///
/// microcs::tokio::Server::builder("HASHER")
///     .method("slow", microcs::tokio::blocking(|req: Request| {
///         std::thread::sleep(std::time::Duration::from_millis(50)); // blocking is fine here
///         Ok::<_, RemoteError>(req.into_payload())
///     }))
///     .bind()
///     .await?
///     .serve(|req: Request| async move { Ok::<_, RemoteError>(req.into_payload()) })
///     .await
/// # }
/// ```
pub fn blocking<F, R, E>(handler: F) -> impl Fn(Request) -> HandlerFuture + Send + Sync + 'static
where
    F: Fn(Request) -> std::result::Result<R, E> + Send + Sync + 'static,
    R: IntoPayload,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    crate::handler::pooled_unary(crate::blocking::unary_fn(handler))
}

/// A blocking streaming handler for an async server (see [`blocking`]): it returns an iterator
/// of items, each made on tokio's blocking pool and sent once the caller has room for it (as
/// [`Items::send`] does). A pool thread is held only while the handler or `next()` runs, never
/// while the stream waits for the caller, so many slow consumers hold no threads. Use it with
/// [`ServerBuilder::stream_method`] or [`Server::spawn_stream`]. The iterator is dropped (on the
/// pool), and so stops, once the caller cancels or leaves, or the stream's deadline passes.
///
/// # Examples
///
/// ```no_run
/// # async fn demo() -> microcs::Result<()> {
/// use microcs::{RemoteError, Request};
///
/// microcs::tokio::Server::builder("LINES")
///     .stream_method("read", microcs::tokio::blocking_stream(|req: Request| {
///         let text = std::fs::read_to_string(req.text()?).map_err(|e| RemoteError::new(404, e.to_string()))?;
///         Ok::<_, RemoteError>(text.lines().map(|l| Ok::<_, RemoteError>(l.to_owned())).collect::<Vec<_>>())
///     }))
///     .bind()
///     .await?
///     .serve(|req: Request| async move { Ok::<_, RemoteError>(req.into_payload()) })
///     .await
/// # }
/// ```
pub fn blocking_stream<F, I, T, E, E2>(
    handler: F,
) -> impl Fn(Request, Items) -> Pin<Box<dyn Future<Output = std::result::Result<(), RemoteError>> + Send>>
+ Send
+ Sync
+ 'static
where
    F: Fn(Request) -> std::result::Result<I, E> + Send + Sync + 'static,
    I: IntoIterator<Item = std::result::Result<T, E2>>,
    I::IntoIter: Send + 'static,
    T: IntoPayload,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
    E2: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = crate::handler::pooled_stream(crate::blocking::stream_fn(handler));
    move |req, items| {
        let work = stream(req, items);
        Box::pin(async move { work.await.map(drop) })
    }
}

/// A per-connection in-flight limit as the semaphore and the handshake can carry it.
fn in_flight_limit(n: usize) -> usize {
    n.clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize))
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
        self.config.max_in_flight = in_flight_limit(n);
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

    /// Adds a named method that answers with a stream: the handler pushes each item into the
    /// [`Items`] it is given (sending waits while the caller's window is full) and returns once
    /// the stream is complete; `Err` ends the stream with that error. Clients read it with
    /// [`Client::stream`](crate::tokio::Client::stream) (docs/PROTOCOL.md § 17). The handler
    /// is dropped when the caller cancels or leaves (within the grace period, as for any
    /// request), when the stream's deadline passes if the caller set one, and at shutdown's
    /// end. An invalid or duplicate method name is reported by [`bind`](ServerBuilder::bind).
    pub fn stream_method<F, Fut, E>(mut self, name: &str, handler: F) -> Self
    where
        F: Fn(Request, Items) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<(), E>> + Send + 'static,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
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
            let (name, dir, config) = (self.name, self.dir, self.config.clone());
            // Claiming touches files and may wait a moment for a racing claimant: off the runtime.
            let bound = ::tokio::task::spawn_blocking(move || claim_and_bind(name, dir, &identity, &config))
                .await
                .map_err(|e| Error::io("cannot claim the name", std::io::Error::other(e.to_string())))??;
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

    /// Takes over a name claimed by a blocking [`crate::Server`], to serve it with async
    /// handlers: the socket, the name's ownership, the options and the methods added so far
    /// (their handlers run on tokio's blocking pool, see [`blocking`]). For a program (or a
    /// binding to another language) that must claim the name synchronously — so that
    /// [`ErrorKind::NameTaken`] is reported at once — and learns only later whether it serves
    /// async handlers. [`ShutdownTrigger`](crate::ShutdownTrigger)s taken from the blocking
    /// server before do not reach this one; take a new one with
    /// [`shutdown_trigger`](Server::shutdown_trigger).
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Io`] if the socket cannot be registered with the runtime (the name is
    /// released then).
    ///
    /// # Panics
    ///
    /// When called outside a tokio runtime.
    ///
    /// # Examples
    ///
    /// ```
    /// # let dir = std::env::temp_dir().join(format!("microcs-doc-frombl-{}", std::process::id()));
    /// use microcs::Request;
    ///
    /// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
    /// let claimed = microcs::Server::builder("CONVERTED_DOC")
    ///     # .runtime_dir(&dir)
    ///     .bind()?; // NameTaken here, synchronously
    /// let handle = microcs::tokio::Server::from_blocking(claimed)?
    ///     .spawn(|req: Request| async move { Ok::<_, microcs::RemoteError>(req.into_payload()) })?;
    /// # let client = microcs::tokio::Client::builder("CONVERTED_DOC").runtime_dir(&dir).connect().await?;
    /// # assert_eq!(client.request(b"hi").await?, b"hi");
    /// handle.shutdown().await;
    /// # Ok::<(), microcs::Error>(())
    /// # }).unwrap();
    /// ```
    pub fn from_blocking(server: crate::Server) -> Result<Server> {
        let parts = server.into_parts();
        let listener = match parts.listener {
            Some(l) => {
                let registered = l.set_nonblocking(true).and_then(|()| UnixListener::from_std(l));
                Some(registered.map_err(|e| Error::io("cannot register the socket with the runtime", e))?)
            }
            None => None,
        };
        let methods = parts
            .methods
            .into_iter()
            .map(|(m, h)| (m, Arc::new(crate::handler::on_blocking_pool(&h))))
            .collect();
        let (stop, _) = watch::channel(false);
        Ok(Server {
            name: parts.name,
            dir: parts.dir,
            claim: parts.claim,
            listener,
            started_ms: parts.started_ms,
            config: parts.config,
            identity: parts.identity,
            methods,
            error: parts.error,
            stop: Arc::new(stop),
            #[cfg(feature = "nats")]
            nats: parts.nats,
        })
    }

    /// Changes how many requests of one connection run at once (see
    /// [`ServerBuilder::max_in_flight`]), before serving: for a server taken over with
    /// [`from_blocking`](Server::from_blocking), whose handlers turned out to be async (tasks
    /// are cheap: an async server can admit more than a blocking one, which runs a thread per
    /// request).
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.config.max_in_flight = in_flight_limit(n);
        self
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

    /// Adds a named method that answers with a stream (see [`ServerBuilder::stream_method`]).
    pub fn stream_method<F, Fut, E>(mut self, name: &str, handler: F) -> Self
    where
        F: Fn(Request, Items) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<(), E>> + Send + 'static,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        add_method(&mut self.methods, &mut self.error, name, erase_stream(handler));
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

    /// As [`spawn`](Server::spawn), with a default handler that answers with a stream (see
    /// [`ServerBuilder::stream_method`]): callers read it with
    /// [`Client::stream`](crate::tokio::Client::stream) and an empty method name.
    ///
    /// # Errors
    ///
    /// As [`spawn`](Server::spawn).
    ///
    /// # Panics
    ///
    /// When called outside a tokio runtime.
    pub fn spawn_stream<F, Fut, E>(self, handler: F) -> Result<ServerHandle>
    where
        F: Fn(Request, Items) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<(), E>> + Send + 'static,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        self.start(erase_stream(handler))
    }

    /// Serves until a [`ShutdownTrigger`] fires (or the server loses its name, see
    /// [`ServerHandle::wait`]), then shuts down as [`ServerHandle::shutdown`] does.
    ///
    /// # Errors
    ///
    /// As [`spawn`](Server::spawn), and as [`ServerHandle::wait`] after serving.
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

    /// Serves until `signal` resolves (or a [`ShutdownTrigger`] fires, or the server loses its
    /// name, see [`ServerHandle::wait`]), then shuts down as [`ServerHandle::shutdown`] does —
    /// the mini-redis pattern.
    ///
    /// # Errors
    ///
    /// As [`spawn`](Server::spawn), and as [`ServerHandle::wait`] after serving.
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
        let shared = handle.shared.clone();
        handle.shutdown().await;
        shared.outcome()
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
            lost: Mutex::new(None),
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

    /// Waits until a [`ShutdownTrigger`] fires, or the server stops by itself because it lost
    /// its name (the server keeps serving meanwhile). Await
    /// [`shutdown`](ServerHandle::shutdown) after it, to let running requests finish.
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
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: it only waits.
    pub async fn wait(&self) -> Result<()> {
        let _ = self.shared.stop.subscribe().wait_for(|s| *s).await;
        self.shared.outcome()
    }

    /// The same counters `$stats` reports, read locally.
    pub fn stats(&self) -> StatsResponse {
        self.shared.service.stats(None)
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
