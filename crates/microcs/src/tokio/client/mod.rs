//! The async client: one connection per client, shared by its clones, many requests in flight.
//!
//! # How a connection works
//!
//! A caller encodes its request straight into the connection's [`Outbox`] (one copy of the
//! payload, under a short lock), registers a one-shot channel under the request's id in the
//! same critical section, and waits on the channel. A writer task drains the outbox in batches
//! (a lone request, with nothing else in flight, is sent by its caller right away);
//! a reader task decodes replies and hands each to the channel registered under its id. Ids are
//! never reused by a client, so a reply that arrives after its caller gave up finds no channel
//! and is dropped — it can never be mistaken for the answer to another call. The reading is a
//! future of its own (`conn::Reader`): while a request is the only one pending, its caller
//! polls that future itself as it waits, so the reply wakes the caller and is read by it (no
//! hand-off through the reader task); it goes back to the reader task when the caller stops
//! waiting or another request or stream joins.
//!
//! When the connection dies, the writer task (the only one that knows how many bytes went out)
//! settles every pending request: a request none of whose bytes were written is reported as
//! "not run", and the caller sends it once more on a new connection; any other gets an error
//! that says whether it may have run.
//!
//! # Instances
//!
//! A name served by several [instances](crate::tokio::ServerBuilder::shared) gets one
//! connection per live instance (up to [`MAX_POOL`]): the first request connects to the
//! least-loaded instance, and from then on, about once a second, a background task connects to
//! instances it has no connection to yet (new ones too) and drops dead ones. Each request goes
//! over the connection with the fewest requests in flight, which this client knows without
//! asking anyone.

mod conn;
mod open;
mod stream;

pub use stream::ItemStream;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ::tokio::sync::oneshot;
use ::tokio::time::{Instant, timeout_at};

use super::io::SPLICE_MIN;
use crate::error::{Error, ErrorKind, Result};
use crate::fork;
use crate::micro::{InfoResponse, PingResponse, StatsResponse};
use crate::name::Name;
use crate::proto;
use crate::proto::client_conn::{self, Attempt, DEFAULT_TIMEOUT, Ids, Loss, Written};
use crate::registry;
use conn::{CancelOnDrop, Conn, LoneSlot, Pending, Waiter};

/// An async connection to a named service. Cheap to clone; clones share one connection.
///
/// Any number of tasks may call at once: their requests travel over the one connection with
/// distinct ids, are written in batches, and their replies come back in whatever order the server
/// finishes them. Each call has a deadline ([`timeout`](ClientBuilder::timeout), default 30 s),
/// which the server sees; when a call times out or its future is dropped, the server is told to
/// cancel the work.
///
/// After the server restarts, the next request reconnects by itself. A request is sent again
/// only when it provably never reached the server (the connection was already dead before any
/// of its bytes were written, or the server answered that it did not run it); otherwise the
/// error says [`may_have_run`](Error::may_have_run).
///
/// # After `fork()`
///
/// Create the client in the process that uses it. Its connection's tasks run on the runtime of
/// the process that connected, whose threads a forked child does not have; so in a child every
/// call fails at once with [`ErrorKind::Closed`], saying to create the client after forking,
/// and dropping it there leaves the parent's connection untouched (nothing is closed, shut down
/// or written). A client the child creates on a runtime of its own works as usual.
///
/// # Examples
///
/// ```no_run
/// # async fn demo() -> microcs::Result<()> {
/// let client = microcs::tokio::Client::connect("LIFE_GEN").await?;
/// let reply: Vec<u8> = client.request(b"Give me some data back!!").await?;
/// // Many requests in flight at once, over one connection.
/// let (a, b) = tokio::join!(client.call("step", b"..#"), client.call("step", b"#.."));
/// # let _ = (reply, a, b);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Client {
    shared: Arc<Shared>,
    /// Per handle, so `set_timeout` on one clone leaves the others alone.
    timeout: Duration,
}

/// What the clones of a client share.
struct Shared {
    name: Name,
    path: PathBuf,
    dir: PathBuf,
    /// The application named the directory (so it may belong to another user).
    explicit_dir: bool,
    /// When a call of this client last started the service (activation): the calls that
    /// waited for it get their whole timeout from then on.
    activated: Mutex<Option<Instant>>,
    /// Largest reply payload this client accepts (announced in `Hello`).
    max_payload: u32,
    /// Kernel send buffer asked for on each connection (0: the system's default).
    send_buffer: usize,
    /// The room each stream grants its server ([`ClientBuilder::stream_window`]).
    window: proto::Credit,
    /// The one instance to use ([`ClientBuilder::instance`]).
    instance: Option<u32>,
    /// Start the service from its definition when nobody serves it ([`ClientBuilder::activate`]).
    activate: bool,
    /// Ask servers for shared memory (PROTOCOL.md § 18).
    shm: bool,
    /// The connections new requests use (one, or one per instance); a connection leaves when
    /// it dies or is retired.
    pool: Mutex<Pool>,
    /// Serialises reconnecting, so a crowd of callers after a restart opens one connection.
    connecting: ::tokio::sync::Mutex<()>,
    /// Request ids, never reused (across reconnects too), so a late reply can never be taken
    /// for the answer to a later request.
    next_id: Ids,
    /// NATS settings and connection, when NATS is configured (see `crate::nats`).
    #[cfg(feature = "nats")]
    nats: Option<crate::nats::Link>,
    /// The process that made the client ([`fork::current`]); no other may use it.
    owner: u32,
}

impl Drop for Shared {
    fn drop(&mut self) {
        let conn = std::mem::take(&mut self.pool.get_mut().unwrap_or_else(|p| p.into_inner()).conns);
        if !fork::is_current(self.owner) {
            // Dropped in a child after fork(): the connection (and NATS link) are the parent's,
            // and so are the runtime their tasks run on. Closing would shut the parent's stream
            // down; they are left as they are (a one-time leak per fork).
            std::mem::forget(conn);
            #[cfg(feature = "nats")]
            std::mem::forget(self.nats.take());
            return;
        }
        // The last clone is gone: nobody can wait on these connections any more.
        for c in conn {
            c.close(Loss::Dropped);
        }
    }
}

/// Options for a [`Client`]; from [`Client::builder`].
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until .connect()"]
pub struct ClientBuilder {
    name: String,
    dir: Option<PathBuf>,
    timeout: Duration,
    max_payload: u32,
    send_buffer: usize,
    window: proto::Credit,
    instance: Option<u32>,
    activate: bool,
    shared_memory: Option<bool>,
    #[cfg(feature = "nats")]
    nats: crate::nats::ClientConfig,
}

impl ClientBuilder {
    crate::service::common_client_options!();
    #[cfg(feature = "nats")]
    crate::nats::nats_client_options!();

    /// Connects and shakes hands.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::InvalidName`], [`ErrorKind::NoService`] (at once, never by timing out;
    /// when the name has a service definition the service is started first, see
    /// [`activate`](ClientBuilder::activate): [`ErrorKind::StartFailed`] when that fails,
    /// [`ErrorKind::InvalidConfig`] / [`ErrorKind::PermissionDenied`] for a malformed or unsafe
    /// definition),
    /// [`ErrorKind::PermissionDenied`] (unsafe runtime directory, or the service refuses this
    /// user), [`ErrorKind::TimedOut`], [`ErrorKind::Protocol`] (not a microcs service).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: dropping the future closes the half-open connection; nothing was sent.
    pub async fn connect(self) -> Result<Client> {
        let name = Name::new(self.name)?;
        let explicit_dir = self.dir.is_some();
        let dir = self.dir.unwrap_or_else(registry::runtime_dir);
        let path = registry::socket_path(&dir, &name)?;
        let client = Client {
            shared: Arc::new(Shared {
                name,
                path,
                dir,
                explicit_dir,
                activated: Mutex::new(None),
                max_payload: self.max_payload,
                send_buffer: self.send_buffer,
                window: self.window,
                instance: self.instance,
                activate: self.activate,
                shm: crate::transport::shm::client_wants(self.shared_memory),
                pool: Mutex::new(Pool::default()),
                connecting: ::tokio::sync::Mutex::new(()),
                next_id: Ids::new(),
                #[cfg(feature = "nats")]
                nats: crate::nats::Link::new(self.nats)?,
                owner: fork::current(),
            }),
            timeout: self.timeout,
        };
        #[cfg(feature = "nats")]
        if let Some(link) = &client.shared.nats {
            // A local instance if there is one (unless NATS is forced), else the broker.
            let name = &client.shared.name;
            if link.local_first() {
                match client.connection(Instant::now() + client.timeout).await {
                    Ok(_) => {}
                    Err(e) if e.kind() == ErrorKind::NoService => {
                        link.no_local();
                        link.caller(name).await.map_err(|n| crate::nats::Link::unreachable(e, n))?;
                    }
                    Err(e) => return Err(e),
                }
            } else {
                link.caller(name).await?;
            }
            return Ok(client);
        }
        client.connection(Instant::now() + client.timeout).await?;
        Ok(client)
    }
}

impl Client {
    /// Connects to the service `name` with default options.
    ///
    /// # Errors
    ///
    /// As [`ClientBuilder::connect`].
    ///
    /// # Cancel safety
    ///
    /// Cancel safe, as [`ClientBuilder::connect`].
    pub async fn connect(name: &str) -> Result<Client> {
        Client::builder(name).connect().await
    }

    /// Options for connecting to `name`.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> microcs::Result<()> {
    /// use std::time::Duration;
    /// let client = microcs::tokio::Client::builder("LIFE_GEN")
    ///     .timeout(Duration::from_secs(2))
    ///     .connect()
    ///     .await?;
    /// # let _ = client; Ok(()) }
    /// ```
    pub fn builder(name: &str) -> ClientBuilder {
        ClientBuilder {
            name: name.to_owned(),
            dir: None,
            timeout: DEFAULT_TIMEOUT,
            max_payload: proto::DEFAULT_MAX_PAYLOAD,
            send_buffer: crate::transport::unix::DEFAULT_SEND_BUFFER,
            window: proto::Credit { items: proto::DEFAULT_WINDOW_ITEMS, bytes: proto::DEFAULT_WINDOW_BYTES },
            instance: None,
            activate: crate::activation::enabled_by_env(),
            shared_memory: None,
            #[cfg(feature = "nats")]
            nats: Default::default(),
        }
    }

    /// Sends `payload` to the service's default handler and returns its reply.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Remote`] when the handler failed (see [`Error::remote`]),
    /// [`ErrorKind::TimedOut`], [`ErrorKind::FrameTooLarge`] (checked before sending),
    /// [`ErrorKind::Closed`] when the connection broke, [`ErrorKind::NoService`] when the
    /// service is gone.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future is safe and leaves the connection usable by every other call: if the
    /// request was already queued, the server is sent a `Cancel` for it (its handler sees
    /// [`Request::cancelled`](crate::Request::cancelled) resolve) and its reply, should it still
    /// come, is dropped. The request may have run.
    pub async fn request(&self, payload: &[u8]) -> Result<Vec<u8>> {
        self.exchange("", payload).await
    }

    /// Calls the named method with `payload`.
    ///
    /// # Errors
    ///
    /// As [`request`](Client::request); [`ErrorKind::InvalidName`] for a malformed method name,
    /// [`ErrorKind::Remote`] with code 404 for a method the service does not have.
    ///
    /// # Cancel safety
    ///
    /// As [`request`](Client::request).
    pub async fn call(&self, method: &str, payload: &[u8]) -> Result<Vec<u8>> {
        proto::check_method(method).map_err(|m| Error::new(ErrorKind::InvalidName, m))?;
        self.exchange(method, payload).await
    }

    /// Sends text to the default handler and returns the reply as text.
    ///
    /// # Errors
    ///
    /// As [`request`](Client::request); [`ErrorKind::Protocol`] if the reply is not UTF-8.
    ///
    /// # Cancel safety
    ///
    /// As [`request`](Client::request).
    pub async fn send_message(&self, message: &str) -> Result<String> {
        let reply = self.request(message.as_bytes()).await?;
        String::from_utf8(reply).map_err(|e| {
            Error::new(
                ErrorKind::Protocol,
                format!(
                    "service '{}' replied with bytes that are not UTF-8 text; use request() for bytes",
                    self.shared.name
                ),
            )
            .with_source(e)
        })
    }

    /// The service's `$ping` answer.
    ///
    /// # Errors
    ///
    /// As [`request`](Client::request); [`ErrorKind::Protocol`] if the answer is not the
    /// expected JSON.
    ///
    /// # Cancel safety
    ///
    /// As [`request`](Client::request).
    pub async fn ping(&self) -> Result<PingResponse> {
        self.builtin("$ping").await
    }

    /// The service's `$info` answer: name, version, endpoints.
    ///
    /// # Errors
    ///
    /// As [`ping`](Client::ping).
    ///
    /// # Cancel safety
    ///
    /// As [`request`](Client::request).
    pub async fn info(&self) -> Result<InfoResponse> {
        self.builtin("$info").await
    }

    /// The service's `$stats` answer: per-endpoint request and error counts and timings.
    ///
    /// # Errors
    ///
    /// As [`ping`](Client::ping).
    ///
    /// # Cancel safety
    ///
    /// As [`request`](Client::request).
    pub async fn stats(&self) -> Result<StatsResponse> {
        self.builtin("$stats").await
    }

    async fn builtin<T: serde::de::DeserializeOwned>(&self, method: &str) -> Result<T> {
        let reply = self.exchange(method, b"").await?;
        serde_json::from_slice(&reply).map_err(|e| {
            Error::new(
                ErrorKind::Protocol,
                format!("service '{}' sent an invalid {method} answer: {e}", self.shared.name),
            )
            .with_source(e)
        })
    }

    /// The service name.
    pub fn name(&self) -> &Name {
        &self.shared.name
    }

    /// The socket this client is connected to: the name's own socket, or (a name served by
    /// several instances) the socket of the instance the next request would use, as
    /// [`server_pid`](Client::server_pid) reports it. While no connection is usable, the socket
    /// it last connected to; before any (a client that went to NATS), the name's socket.
    ///
    /// An owned path, unlike the blocking client's `&Path`: the clones of a client share its
    /// connections, and the one in use may change under any of them.
    pub fn socket_path(&self) -> PathBuf {
        if let Some(c) = self.shared.current() {
            return c.path.clone();
        }
        self.shared.pool().last_path.clone().unwrap_or_else(|| self.shared.path.clone())
    }

    /// The per-request timeout of this handle.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Changes the per-request timeout of this handle (clones made earlier keep theirs).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// The server's process id, from the handshake (`None` while disconnected).
    pub fn server_pid(&self) -> Option<u32> {
        self.shared.current().map(|c| c.server.pid)
    }

    /// What carries this client's frames to the local service: `"shm"` (shared memory),
    /// `"unix"` (the socket), or `None` while not connected (with several instances: the
    /// connection the next request would use).
    pub fn transport(&self) -> Option<&'static str> {
        self.shared.current().map(|c| c.stream.link().transport_name())
    }

    /// Largest request payload the server accepts (`None` while disconnected).
    pub fn max_request_payload(&self) -> Option<u32> {
        self.shared.current().map(|c| c.server.max_payload)
    }

    /// Requests the server runs at once on one connection; more wait, unread, in the socket
    /// (`None` while disconnected).
    pub fn server_max_in_flight(&self) -> Option<u32> {
        self.shared.current().map(|c| c.server.max_in_flight)
    }

    async fn exchange(&self, method: &str, payload: &[u8]) -> Result<Vec<u8>> {
        let now = fork::current();
        if now != self.shared.owner {
            return Err(client_conn::forked(&self.shared.name, self.shared.owner, now));
        }
        #[cfg(feature = "nats")]
        if let Some(link) = &self.shared.nats {
            if link.try_local(self.has_local()) {
                match self.exchange_local(method, payload).await {
                    // No local instance (any more): the request did not run; NATS it is.
                    Err(e) if e.kind() == ErrorKind::NoService => link.no_local(),
                    r => return r,
                }
            }
            return link.call(&self.shared.name, method, payload, self.timeout).await;
        }
        self.exchange_local(method, payload).await
    }

    /// Whether a local connection is open.
    #[cfg(feature = "nats")]
    fn has_local(&self) -> bool {
        !self.shared.pool().conns.is_empty()
    }

    /// Where the last request went ([`Transport::Local`](crate::nats::Transport::Local) or
    /// [`Transport::Nats`](crate::nats::Transport::Nats)); before any request, where the next
    /// one would go.
    #[cfg(feature = "nats")]
    pub fn via(&self) -> crate::nats::Transport {
        match &self.shared.nats {
            Some(link) if link.on_nats(self.has_local()) => crate::nats::Transport::Nats,
            _ => crate::nats::Transport::Local,
        }
    }

    /// The NATS broker this client falls back to or uses (password removed), if any.
    #[cfg(feature = "nats")]
    pub fn nats_url(&self) -> Option<String> {
        self.shared.nats.as_ref().map(|l| l.display_url())
    }

    /// One request to the local instance (reconnecting when needed).
    async fn exchange_local(&self, method: &str, payload: &[u8]) -> Result<Vec<u8>> {
        let now = Instant::now();
        let mut deadline = now + self.timeout;
        let (mut found, refresh) = self.shared.current_at(now);
        if refresh {
            self.spawn_refresh();
        }
        // At most one resend, and only of a request that provably did not run.
        let mut resent = false;
        loop {
            // `fresh`: nothing waited since `deadline` was set, so the time left is the whole
            // timeout (saves a clock read per request).
            let (conn, fresh) = match found.take() {
                Some(c) => (c, !resent),
                None => {
                    let conn = self.connection(deadline).await?;
                    // A start of the service that this call waited for: its whole timeout from then.
                    let started = *self.shared.activated.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(t) = started.filter(|&t| t > now) {
                        deadline = deadline.max(t + self.timeout);
                    }
                    (conn, false)
                }
            };
            match self.attempt(&conn, method, payload, deadline, fresh).await {
                Err(Attempt::NotRun(e)) if !resent => {
                    tracing::debug!(service = %self.shared.name, error = %e, "request did not run; sending it on a new connection");
                    self.shared.retire(&conn);
                    resent = true;
                    found = self.shared.current();
                }
                Err(Attempt::NotRun(e) | Attempt::Failed(e)) => return Err(e),
                Ok(reply) => return Ok(reply),
            }
        }
    }

    async fn attempt(
        &self,
        conn: &Arc<Conn>,
        method: &str,
        payload: &[u8],
        deadline: Instant,
        mut fresh: bool,
    ) -> Result<Vec<u8>, Attempt> {
        let name = &self.shared.name;
        client_conn::check_payload(name, payload.len(), &conn.server).map_err(Attempt::Failed)?;
        // Backpressure: while the server does not keep up, callers wait here rather than pile
        // their requests up in memory.
        if !conn.outbox.has_space() && {
            fresh = false;
            timeout_at(deadline, conn.outbox.wait_space()).await.is_err()
        } {
            return Err(Attempt::Failed(client_conn::not_taken(name, self.timeout)));
        }
        let id = self.shared.next_id.next();
        let remaining = if fresh { self.timeout } else { deadline.saturating_duration_since(Instant::now()) };
        let header = client_conn::request_header(id, remaining);
        let (earlier, sent, rx, released) = {
            let mut st = conn.book();
            // A lone request goes out from here, without a round through the writer task;
            // with others in flight it joins the writer's next batch (one `send` for many).
            let lone = st.extra.pending.is_empty() && !st.extra.burst;
            let pushed = if lone && payload.len() >= SPLICE_MIN {
                // Large: what the socket takes at once is sent from the caller's slice, not
                // copied into the outbox.
                st.push_send(&conn.stream, &header, method.as_bytes(), payload)
            } else {
                st.push(&header, method.as_bytes(), payload).map(|r| (r, false))
            };
            let Some(((start, end), sent)) = pushed else {
                let dead = st.extra.dead.clone().unwrap_or(Loss::Closed(None));
                return Err(Attempt::NotRun(dead.error(name, Written::None)));
            };
            // Its caller reads its own reply (see `conn::Reader`) if the connection's slot for
            // that is free.
            let reads_itself = lone && st.extra.lone.is_none();
            let (tx, rx) = if reads_itself {
                st.extra.lone = Some(LoneSlot { id, outcome: None, waker: None });
                (Waiter::Lone, None)
            } else {
                let (tx, rx) = oneshot::channel();
                (Waiter::Once(tx), Some(rx))
            };
            st.extra.pending.insert(id, Pending { tx, deadline, start, end });
            let earlier = st.extra.next_deadline.is_none_or(|t| deadline < t);
            if earlier {
                st.extra.next_deadline = Some(deadline);
            }
            let sent = sent || (lone && payload.len() < SPLICE_MIN && st.send_now(&conn.stream));
            // This caller will not drive the read loop: if another caller does (one with a
            // request pending, or one whose request was settled but whose future is still
            // alive, unpolled), the loop goes back to the reader task (see `conn::Reader`).
            let released = !reads_itself && conn.reader.release();
            (earlier, sent, rx, released)
        };
        if released {
            conn.reader.wake();
        }
        if !sent {
            conn.outbox.wake();
        }
        if earlier {
            conn.deadlines.notify_one();
        }
        // The connection's deadline task answers `TimedOut` at the deadline; if this future is
        // dropped first, `guard` takes the request back and tells the server to cancel it.
        let mut guard = CancelOnDrop { conn, id, armed: true };
        let outcome = match rx {
            Some(rx) => rx.await.ok(),
            None => conn.wait_lone(id).await,
        };
        guard.armed = false;
        let outcome = match outcome {
            Some(outcome) => outcome,
            // The connection's tasks are gone without a word: the runtime is shutting down.
            None => return Err(Attempt::Failed(Loss::Closed(None).error(name, Written::All))),
        };
        client_conn::settle(name, self.timeout, outcome)
    }
}

/// Most connections a client keeps to the instances of one name.
pub const MAX_POOL: usize = 32;

/// The connections of a client.
#[derive(Default)]
struct Pool {
    conns: Vec<Arc<Conn>>,
    /// When to look for more instances (`None`: the name has an exclusive server, or no
    /// connection is open).
    refresh: Option<Instant>,
    /// The socket of the connection opened last, for [`Client::socket_path`] once every
    /// connection is gone.
    last_path: Option<PathBuf>,
}

impl Shared {
    fn pool(&self) -> MutexGuard<'_, Pool> {
        self.pool.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The connection the next request should use, if there is a usable one: the only one, or
    /// (instances) the one with the fewest requests in flight.
    fn current(&self) -> Option<Arc<Conn>> {
        Self::pick(&self.pool())
    }

    /// [`current`](Self::current), and whether it is time (`now`) to look for instances this
    /// client is not connected to (then the next look is a [`REFRESH`](open::REFRESH) later):
    /// one lock of the pool per request for both.
    fn current_at(&self, now: Instant) -> (Option<Arc<Conn>>, bool) {
        let mut pool = self.pool();
        let refresh = match pool.refresh {
            Some(t) if now >= t => {
                pool.refresh = Some(now + open::REFRESH);
                true
            }
            _ => false,
        };
        (Self::pick(&pool), refresh)
    }

    fn pick(pool: &Pool) -> Option<Arc<Conn>> {
        match pool.conns.as_slice() {
            [] => None,
            [one] => Some(one).filter(|c| c.is_usable()).cloned(),
            many => many.iter().filter(|c| c.is_usable()).min_by_key(|c| c.in_flight()).cloned(),
        }
    }

    /// Stops sending new requests over `conn` (it failed one of them); the next request uses
    /// another connection or opens a new one.
    fn retire(&self, conn: &Arc<Conn>) {
        self.pool().conns.retain(|c| !Arc::ptr_eq(c, conn));
        conn.retire();
    }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("name", &self.shared.name)
            .field("path", &self.socket_path())
            .field("timeout", &self.timeout)
            .field("server_pid", &self.server_pid())
            .finish()
    }
}
