//! The part of a server that does not depend on how it does I/O: the endpoint table, per-endpoint
//! statistics and the built-in `$` methods. Shared by the blocking and async servers.

use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use std::os::unix::net::UnixListener;
use std::path::PathBuf;

use crate::error::{Error, ErrorKind, RemoteError, Result};
use crate::micro::{self, EndpointInfo, EndpointStats, InfoResponse, PingResponse, StatsResponse};
use crate::name::Name;
use crate::proto::server_conn::{self, Out};
use crate::proto::{self, status};
use crate::registry::{self, Claim, Meta};
use crate::request::Peer;
use crate::transport::unix::peer_credentials;

/// Service identity and description, set on the server builder.
#[derive(Debug, Clone)]
pub(crate) struct Identity {
    pub version: String,
    pub description: String,
    pub metadata: BTreeMap<String, String>,
}

impl Default for Identity {
    fn default() -> Identity {
        Identity { version: "0.1.0".into(), description: String::new(), metadata: BTreeMap::new() }
    }
}

/// Counters of one endpoint; updated with atomics so handlers on many threads never contend
/// on a lock except when recording an error message.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    requests: AtomicU64,
    errors: AtomicU64,
    processing_ns: AtomicU64,
    last_error: Mutex<String>,
}

impl Counters {
    pub(crate) fn record(&self, elapsed: Duration, error: Option<&RemoteError>) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.processing_ns.fetch_add(elapsed.as_nanos() as u64, Ordering::Relaxed);
        if let Some(e) = error {
            self.errors.fetch_add(1, Ordering::Relaxed);
            *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = e.message().to_owned();
        }
    }
}

/// A handler and its statistics.
pub(crate) struct Endpoint<H> {
    pub name: String,
    pub subject: String,
    pub handler: H,
    pub counters: Counters,
}

/// Which built-in method a request named.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Builtin {
    Ping,
    Info,
    Stats,
}

/// Where a request goes.
pub(crate) enum Route<'a, H> {
    Endpoint(&'a Endpoint<H>),
    Builtin(Builtin),
    /// The method does not exist (or is not UTF-8); the error to send, not run.
    Refuse(RemoteError),
}

/// Endpoints of one service, generic over the handler type (sync or async).
pub(crate) struct Service<H> {
    pub name: Name,
    pub id: String,
    pub identity: Identity,
    pub started: SystemTime,
    pub default: Endpoint<H>,
    /// Named methods, sorted by name for binary search.
    pub methods: Vec<Endpoint<H>>,
    /// Handlers started and ended, for the idle timeout.
    pub activity: Activity,
    /// Open local connections by transport, for `$stats` (and so `microcs ls` / `stats`).
    pub tally: Arc<Tally>,
}

/// Handlers started and ended (two relaxed atomic increments per request): the server is idle
/// while both are equal and unchanged.
#[derive(Debug, Default)]
pub(crate) struct Activity {
    pub started: AtomicU64,
    pub ended: AtomicU64,
}

/// The idle timeout of a server: checked by its accept loop every [`WATCH_PERIOD`].
#[derive(Debug)]
pub(crate) struct IdleWatch {
    timeout: Duration,
    seen: u64,
    since: std::time::Instant,
}

impl IdleWatch {
    pub(crate) fn new(timeout: Option<Duration>) -> Option<IdleWatch> {
        timeout.map(|timeout| IdleWatch { timeout, seen: u64::MAX, since: std::time::Instant::now() })
    }

    /// True once no handler has started or run for the whole timeout.
    pub(crate) fn expired(&mut self, activity: &Activity) -> bool {
        let started = activity.started.load(Ordering::Relaxed);
        let ended = activity.ended.load(Ordering::Relaxed);
        let now = std::time::Instant::now();
        if started != self.seen || started != ended {
            (self.seen, self.since) = (started, now);
            return false;
        }
        now.duration_since(self.since) >= self.timeout
    }
}

/// Checks the idle timeout, if any; logs and returns true when it has passed.
pub(crate) fn idle_expired<H>(idle: &mut Option<IdleWatch>, service: &Service<H>) -> bool {
    let Some(w) = idle.as_mut() else { return false };
    let expired = w.expired(&service.activity);
    if expired {
        tracing::info!(service = %service.name, idle = ?w.timeout, "no requests for the idle timeout; stopping");
    }
    expired
}

/// Open local connections (past the handshake) by what carries their frames.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    unix: AtomicUsize,
    shm: AtomicUsize,
}

impl Tally {
    /// Counts one connection on `transport` (`"shm"` or `"unix"`) until the guard is dropped.
    pub(crate) fn open(self: &Arc<Tally>, transport: &'static str) -> Counted {
        let shm = transport == "shm";
        self.counter(shm).fetch_add(1, Ordering::Relaxed);
        Counted { tally: self.clone(), shm }
    }

    fn counter(&self, shm: bool) -> &AtomicUsize {
        if shm { &self.shm } else { &self.unix }
    }
}

/// One connection counted in a [`Tally`]; uncounted when dropped.
#[derive(Debug)]
pub(crate) struct Counted {
    tally: Arc<Tally>,
    shm: bool,
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.tally.counter(self.shm).fetch_sub(1, Ordering::Relaxed);
    }
}

impl<H> Service<H> {
    pub(crate) fn new(
        name: Name,
        identity: Identity,
        default: H,
        mut methods: Vec<(String, H)>,
    ) -> Service<H> {
        methods.sort_by(|a, b| a.0.cmp(&b.0));
        let methods = methods
            .into_iter()
            .map(|(m, h)| Endpoint {
                subject: format!("{name}.{m}"),
                name: m,
                handler: h,
                counters: Counters::default(),
            })
            .collect();
        Service {
            default: Endpoint {
                name: micro::DEFAULT_ENDPOINT.into(),
                subject: name.to_string(),
                handler: default,
                counters: Counters::default(),
            },
            id: new_instance_id(),
            name,
            identity,
            started: SystemTime::now(),
            methods,
            activity: Activity::default(),
            tally: Arc::default(),
        }
    }

    pub(crate) fn method_names(&self) -> Vec<String> {
        self.methods.iter().map(|e| e.name.clone()).collect()
    }

    /// Finds where a request with this raw method name goes.
    pub(crate) fn route(&self, method: &[u8]) -> Route<'_, H> {
        if method.is_empty() {
            return Route::Endpoint(&self.default);
        }
        match method {
            b"$ping" => return Route::Builtin(Builtin::Ping),
            b"$info" => return Route::Builtin(Builtin::Info),
            b"$stats" => return Route::Builtin(Builtin::Stats),
            _ => {}
        }
        let Ok(m) = std::str::from_utf8(method) else {
            return Route::Refuse(RemoteError::new(status::BAD_REQUEST, "method name is not UTF-8"));
        };
        match self.methods.binary_search_by(|e| e.name.as_str().cmp(m)) {
            Ok(i) => Route::Endpoint(&self.methods[i]),
            Err(_) => Route::Refuse(RemoteError::new(
                status::NO_METHOD,
                format!("service '{}' has no method '{m}' (it has: {})", self.name, self.method_list()),
            )),
        }
    }

    fn method_list(&self) -> String {
        if self.methods.is_empty() {
            return "only the default handler".into();
        }
        self.methods.iter().map(|e| e.name.as_str()).collect::<Vec<_>>().join(", ")
    }

    /// The metadata of the built-ins' answers; `transport`: what carries the connection that
    /// asked (`None` for NATS).
    fn metadata(&self, transport: Option<&str>) -> BTreeMap<String, String> {
        let mut m = self.identity.metadata.clone();
        if let Some(t) = transport {
            m.insert("transport".into(), t.into());
        }
        m.insert("pid".into(), std::process::id().to_string());
        m.insert("uid".into(), crate::registry::euid().to_string());
        m.insert("host".into(), hostname());
        m.insert("protocol".into(), proto::VERSION.to_string());
        m.insert("library".into(), concat!("microcs ", env!("CARGO_PKG_VERSION")).into());
        m
    }

    fn endpoints(&self) -> impl Iterator<Item = &Endpoint<H>> {
        std::iter::once(&self.default).chain(&self.methods)
    }

    pub(crate) fn ping(&self, transport: Option<&str>) -> PingResponse {
        PingResponse {
            kind: micro::PING_TYPE.into(),
            name: self.name.to_string(),
            id: self.id.clone(),
            version: self.identity.version.clone(),
            metadata: self.metadata(transport),
        }
    }

    pub(crate) fn info(&self, transport: Option<&str>) -> InfoResponse {
        InfoResponse {
            kind: micro::INFO_TYPE.into(),
            name: self.name.to_string(),
            id: self.id.clone(),
            version: self.identity.version.clone(),
            metadata: self.metadata(transport),
            description: self.identity.description.clone(),
            endpoints: self
                .endpoints()
                .map(|e| EndpointInfo {
                    name: e.name.clone(),
                    subject: e.subject.clone(),
                    queue_group: micro::QUEUE_GROUP.into(),
                    metadata: None,
                })
                .collect(),
        }
    }

    pub(crate) fn stats(&self, transport: Option<&str>) -> StatsResponse {
        let mut metadata = self.metadata(transport);
        for (key, shm) in [("connections_unix", false), ("connections_shm", true)] {
            metadata.insert(key.into(), self.tally.counter(shm).load(Ordering::Relaxed).to_string());
        }
        StatsResponse {
            kind: micro::STATS_TYPE.into(),
            name: self.name.to_string(),
            id: self.id.clone(),
            version: self.identity.version.clone(),
            metadata,
            started: micro::rfc3339(self.started),
            endpoints: self
                .endpoints()
                .map(|e| {
                    let c = &e.counters;
                    let n = c.requests.load(Ordering::Relaxed);
                    let t = c.processing_ns.load(Ordering::Relaxed);
                    EndpointStats {
                        name: e.name.clone(),
                        subject: e.subject.clone(),
                        queue_group: micro::QUEUE_GROUP.into(),
                        num_requests: n,
                        num_errors: c.errors.load(Ordering::Relaxed),
                        last_error: c.last_error.lock().unwrap_or_else(|p| p.into_inner()).clone(),
                        processing_time: t,
                        average_processing_time: t.checked_div(n).unwrap_or(0),
                        data: None,
                    }
                })
                .collect(),
        }
    }

    /// The JSON answer of a built-in method, asked over a connection on `transport` (`None`:
    /// over NATS).
    pub(crate) fn builtin(&self, which: Builtin, transport: Option<&str>) -> Vec<u8> {
        let json = match which {
            Builtin::Ping => serde_json::to_vec(&self.ping(transport)),
            Builtin::Info => serde_json::to_vec(&self.info(transport)),
            Builtin::Stats => serde_json::to_vec(&self.stats(transport)),
        };
        json.expect("built-in responses serialise")
    }
}

/// A 22-character base-62 id, unique per server instance (the shape of a NATS nuid).
fn new_instance_id() -> String {
    const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut out = String::with_capacity(22);
    let mut round = 0u64;
    while out.len() < 22 {
        // RandomState is keyed from the OS's random source once per process.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(round);
        h.write_u32(std::process::id());
        h.write_u128(SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_nanos());
        let mut v = h.finish();
        for _ in 0..10 {
            if out.len() == 22 {
                break;
            }
            out.push(ALPHABET[(v % 62) as usize] as char);
            v /= 62;
        }
        round += 1;
    }
    out
}

fn hostname() -> String {
    rustix::system::uname().nodename().to_string_lossy().into_owned()
}

/// Limits and policies of a server, shared by the blocking and async implementations.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    /// Largest request payload accepted (announced in `HelloAck`).
    pub max_payload: u32,
    /// Connections served at once; past it a new connection gets a "busy" error and is closed.
    pub max_connections: usize,
    /// Requests run at once per connection; past it the connection is not read (backpressure).
    pub max_in_flight: usize,
    /// Connections still in their handshake; past it the oldest is dropped, so a flood of
    /// silent connections cannot lock out real clients.
    pub max_handshaking: usize,
    /// How long shutdown waits for running handlers.
    pub grace: Duration,
    /// How long a new connection may take to send its `Hello`.
    pub handshake_timeout: Duration,
    /// How long a started frame may take to arrive in full.
    pub frame_timeout: Duration,
    /// How long a reply may wait for the client to read; then the connection is dropped.
    pub write_timeout: Duration,
    /// Other user ids allowed to connect (the server's own uid always is).
    pub allowed_uids: Vec<u32>,
    /// Any user may connect.
    pub allow_any_user: bool,
    /// Kernel send buffer asked for on each accepted connection (0: the system's default).
    pub send_buffer: usize,
    /// Join the name as one of several instances instead of owning it exclusively.
    pub shared: bool,
    /// Stop after this long without requests.
    pub idle_timeout: Option<Duration>,
    /// `MICROCS_IDLE_TIMEOUT` was set but is not a duration (and the builder set none): the
    /// error `bind` reports, so that a typo does not leave a service running forever.
    pub idle_env_error: Option<String>,
    /// Serve on the listening socket a service manager passed (systemd socket activation),
    /// when it passed one for the name.
    pub socket_activation: bool,
    /// Offer shared memory to clients that ask (PROTOCOL.md § 18).
    pub shared_memory: bool,
    /// Bytes of each shared-memory ring (a power of two, 4 KiB-64 MiB).
    pub ring_capacity: u32,
}

impl Default for Config {
    fn default() -> Config {
        let idle = idle_timeout_from_env();
        Config {
            max_payload: proto::DEFAULT_MAX_PAYLOAD,
            max_connections: 1024,
            max_in_flight: 128,
            max_handshaking: 64,
            grace: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(5),
            frame_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(30),
            allowed_uids: Vec::new(),
            allow_any_user: false,
            send_buffer: crate::transport::unix::DEFAULT_SEND_BUFFER,
            shared: false,
            idle_timeout: idle.as_ref().ok().copied().flatten(),
            idle_env_error: idle.err(),
            socket_activation: false,
            shared_memory: crate::transport::shm::DEFAULT_SHM,
            ring_capacity: crate::transport::shm::DEFAULT_RING_CAPACITY,
        }
    }
}

/// `MICROCS_IDLE_TIMEOUT` (seconds, or a number with `ms`, `s`, `m`, `h`), which activation
/// gives a server it starts; `Err` with the message when it is set but malformed.
fn idle_timeout_from_env() -> std::result::Result<Option<Duration>, String> {
    use crate::activation::ENV_IDLE_TIMEOUT;
    match std::env::var(ENV_IDLE_TIMEOUT) {
        Ok(v) if !v.trim().is_empty() => crate::activation::parse_duration(&v).map(Some).map_err(|m| {
            format!(
                "{ENV_IDLE_TIMEOUT}={v:?}: {m}; fix or unset the variable (a service started from its \
                 definition gets it from the definition's idle_timeout)"
            )
        }),
        Ok(_) => Ok(None),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => Err(format!("{ENV_IDLE_TIMEOUT} is not UTF-8")),
    }
}

impl Config {
    /// Whether a peer with this uid may connect.
    pub(crate) fn allows(&self, uid: u32) -> bool {
        self.allow_any_user || uid == crate::registry::euid() || self.allowed_uids.contains(&uid)
    }

    /// The peer of a connection just accepted, as the kernel reports it, if it may use the
    /// service. `Err`: drop the connection, after sending the refusal when there is one.
    pub(crate) fn check_peer(
        &self,
        service: &Name,
        link: impl std::os::fd::AsFd,
    ) -> std::result::Result<Peer, Option<Out>> {
        let peer = peer_credentials(link).map_err(|e| {
            tracing::warn!(error = %e, "cannot read peer credentials; dropping connection");
            None
        })?;
        if !self.allows(peer.uid) {
            tracing::warn!(service = %service, uid = peer.uid, pid = peer.pid, "refused a peer of another user");
            return Err(Some(server_conn::other_user(service.as_str(), peer.uid, registry::euid())));
        }
        Ok(peer)
    }
}

/// Adds a named method to a server's list, or records why it cannot be added (the first
/// problem is reported when the server is bound or started, so builders stay chainable).
pub(crate) fn add_method<H>(methods: &mut Vec<(String, H)>, error: &mut Option<Error>, name: &str, h: H) {
    let problem = match proto::check_method(name) {
        Err(m) => Some(m),
        Ok(()) if name.starts_with('$') => {
            Some(format!("method name {name:?}: names starting with '$' are reserved for built-in methods"))
        }
        Ok(()) if methods.iter().any(|(m, _)| m == name) => {
            Some(format!("method {name:?} is registered twice"))
        }
        Ok(()) => None,
    };
    match problem {
        Some(m) if error.is_none() => *error = Some(Error::new(ErrorKind::InvalidName, m)),
        Some(_) => {}
        None => methods.push((name.to_owned(), h)),
    }
}

/// The lock file's metadata line for this server.
pub(crate) fn meta(started_ms: u64, identity: &Identity, id: &str, methods: &[String]) -> Meta {
    Meta {
        pid: std::process::id(),
        uid: registry::euid(),
        started_ms,
        protocol: proto::VERSION,
        version: identity.version.clone(),
        id: id.to_owned(),
        methods: methods.to_vec(),
        // The instance id exists once the server serves; before that the entry only names the
        // owner (for `NameTaken`), and `list()` does not show it.
        ready: !id.is_empty(),
        // Set by the claim (`Claim::write_meta`), which knows.
        inherited: false,
    }
}

/// A claimed name with its socket bound: what every server flavour starts from.
pub(crate) struct Bound {
    pub name: Name,
    pub dir: PathBuf,
    pub claim: Claim,
    /// Non-blocking, so that the async server can adopt it as is.
    pub listener: UnixListener,
    pub started_ms: u64,
}

/// Validates the name, claims it in the runtime directory (default: [`registry::runtime_dir`])
/// and binds its socket.
///
/// # Errors
///
/// [`ErrorKind::InvalidName`], [`ErrorKind::NameTaken`], [`ErrorKind::PermissionDenied`],
/// [`ErrorKind::Io`].
pub(crate) fn claim_and_bind(
    name: String,
    dir: Option<PathBuf>,
    identity: &Identity,
    config: &Config,
) -> Result<Bound> {
    let name = Name::new(name)?;
    if let Some(e) = &config.idle_env_error {
        return Err(Error::new(ErrorKind::InvalidConfig, e.clone()));
    }
    let dir = dir.unwrap_or_else(registry::runtime_dir);
    let shared = config.shared;
    if shared && config.socket_activation {
        return Err(Error::new(
            ErrorKind::InvalidConfig,
            format!(
                "'{name}': socket activation serves a name from one socket, so it cannot be combined \
                 with shared instances (each instance binds a socket of its own); drop one of the two"
            ),
        ));
    }
    registry::socket_path(&dir, &name)?;
    registry::ensure_dir(&dir)?;
    let mut claim = if shared { Claim::take_instance(&dir, &name)? } else { Claim::take(&dir, &name)? };
    let started_ms = registry::now_ms();
    // The name is claimed first (the flock), so the ownership rules hold for a socket-activated
    // server too: a second one gets `NameTaken` and never touches the socket.
    let inherited = if config.socket_activation {
        crate::transport::inherited::take_listener(claim.socket_path())?
    } else {
        None
    };
    let listener = match inherited {
        Some(listener) => {
            claim.adopt()?;
            listener
        }
        None => claim.bind()?,
    };
    // Owner's pid for competitors' `NameTaken`; not ready (not listed) until the server serves.
    claim.write_meta(&meta(started_ms, identity, "", &[]))?;
    tracing::debug!(service = %name, path = %claim.socket_path().display(), slot = ?claim.slot(), "bound");
    Ok(Bound { name, dir, claim, listener, started_ms })
}

/// Records an instance's open connections in its slot file (the load signal clients balance
/// on; see `registry`), from the connection table's size. Both flavours call it with the table
/// still locked, so that the records of two changes cannot land out of order. Nothing for an
/// exclusive server.
pub(crate) fn record_connections(claim: &Mutex<Option<Claim>>, n: usize) {
    if let Some(c) = claim.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
        c.set_connections(n);
    }
}

/// How often a server's accept loop checks that its name's files are still its own (see
/// [`watch_name`]); so a server notices within about 1 s that they were removed or replaced,
/// and is reachable again (or stopped) within 2 s.
pub(crate) const WATCH_PERIOD: Duration = Duration::from_secs(1);

/// What an accept loop does after [`watch_name`].
pub(crate) enum Watch {
    /// Serve on as before.
    Keep,
    /// The socket was bound again: accept on this listener from now on (the old one's path is
    /// gone; connections already accepted are not affected).
    Serve(UnixListener),
    /// The name is lost (another server owns it now, or the way to take it back is blocked):
    /// stop serving, and report this error from `serve` / `wait`.
    Stop(Error),
}

/// Checks that the runtime files of `claim` are still its own and, when they were removed or
/// replaced (a tmp cleaner, someone tidying up the runtime directory), takes the name back
/// while it is free — or gives it up, with an error that says why, when another server owns it
/// now. Both server flavours call it from their accept loops every [`WATCH_PERIOD`]; when all
/// is well it costs three `stat` calls, and nothing per request.
pub(crate) fn watch_name(claim: &mut Claim) -> Watch {
    if claim.intact() {
        return Watch::Keep;
    }
    let (name, dir) = (claim.name().clone(), claim.dir().to_owned());
    match claim.restore() {
        Ok(listener) => {
            tracing::warn!(service = %name, path = %claim.socket_path().display(), "the runtime files of this service were removed or replaced; took the name back");
            listener.map_or(Watch::Keep, Watch::Serve)
        }
        // Out of descriptors, disk full, ...: may pass; try again at the next check.
        Err(e) if e.kind() == ErrorKind::Io => {
            tracing::warn!(service = %name, error = %e, "the runtime files of this service were removed or replaced, and taking the name back failed; trying again in {WATCH_PERIOD:?}");
            Watch::Keep
        }
        Err(e) => {
            let e = Error::name_lost(name.as_str(), &dir, e);
            tracing::error!(service = %name, owner_pid = ?e.owner_pid(), "{e}");
            Watch::Stop(e)
        }
    }
}

/// The builder options every server flavour shares, expanded inside each flavour's
/// `impl ServerBuilder` (both have the fields `config`, `identity`, `dir` and `error`), so that one
/// definition — code and documentation — serves both APIs.
macro_rules! common_server_options {
    () => {
        /// Largest request payload to accept, in bytes (default 16 MiB). Announced to clients, which
        /// refuse larger payloads before sending them.
        pub fn max_frame(mut self, bytes: u32) -> Self {
            self.config.max_payload = bytes;
            self
        }

        /// Connections served at once (default 1024). Past it, a new connection is told the service
        /// is busy and closed.
        pub fn max_connections(mut self, n: usize) -> Self {
            self.config.max_connections = n.max(1);
            self
        }

        /// Connections allowed to be still in their handshake at once (default 64). When a new
        /// connection would exceed it, the oldest silent one is dropped, so a flood of connections
        /// that never say hello (slowloris) cannot lock real clients out.
        pub fn max_pending_handshakes(mut self, n: usize) -> Self {
            self.config.max_handshaking = n.max(1);
            self
        }

        /// How long a new connection may take to say hello (default 5 s).
        pub fn handshake_timeout(mut self, timeout: Duration) -> Self {
            self.config.handshake_timeout = timeout;
            self
        }

        /// How long a frame, once started, may take to arrive in full (default 10 s).
        pub fn frame_timeout(mut self, timeout: Duration) -> Self {
            self.config.frame_timeout = timeout;
            self
        }

        /// How long a reply may wait for a client that does not read (default 30 s); then the
        /// connection is dropped.
        pub fn write_timeout(mut self, timeout: Duration) -> Self {
            self.config.write_timeout = timeout;
            self
        }

        /// Also accepts peers running as user `uid` (by default only the server's own user may
        /// connect; the kernel reports the peer's uid, so it cannot be faked).
        pub fn allow_uid(mut self, uid: u32) -> Self {
            self.config.allowed_uids.push(uid);
            self
        }

        /// Accepts peers of any user. The runtime directory is still private, so this matters only
        /// for a socket placed in a shared directory.
        pub fn allow_any_user(mut self) -> Self {
            self.config.allow_any_user = true;
            self
        }

        /// Kernel send buffer to ask for on each connection, in bytes (default 1 MiB; 0 keeps the
        /// system's default, `net.core.wmem_default`).
        ///
        /// A reply larger than the buffer crosses the socket in buffer-sized rounds, each costing
        /// both sides a sleep and a wake-up; with room for the whole reply it goes out in one
        /// system call. The kernel caps the value at `net.core.wmem_max` and counts it double.
        /// Memory is only taken while replies wait for a client to read them, so idle
        /// connections cost nothing more; the most a connection can pin is this buffer (twice
        /// over, as the kernel counts) until the [write timeout](Self::write_timeout) drops a
        /// client that does not read.
        pub fn send_buffer(mut self, bytes: usize) -> Self {
            self.config.send_buffer = bytes;
            self
        }

        /// Offers shared memory to clients that ask for it (default: off; PROTOCOL.md § 18).
        ///
        /// A connection that uses it moves its frames through two rings in a sealed memfd
        /// instead of the socket (same frames, same rules); its threads spin for a few
        /// microseconds while waiting for the next frame, then sleep, so an idle connection
        /// costs no CPU. Clients that do not ask, and older ones, use the socket as before.
        /// Each such connection maps `4 KiB + 2 x` the [ring capacity](Self::ring_capacity).
        pub fn shared_memory(mut self, on: bool) -> Self {
            self.config.shared_memory = on;
            self
        }

        /// Bytes of each of a shared-memory connection's two rings (default 256 KiB): a power
        /// of two from 4 KiB to 64 MiB (what every client accepts, PROTOCOL.md § 18.1). The
        /// server decides and announces it in the handshake; it matters only with
        /// [`shared_memory`](Self::shared_memory) on.
        ///
        /// A frame larger than a ring still goes through it, in ring-sized pieces, as through a
        /// full socket buffer. Larger rings let large frames cross with fewer waits; smaller ones
        /// bound what a connection keeps resident (a ring page, once a frame touched it, stays
        /// resident for the connection's life): each connection maps `4 KiB + 2 x` this.
        /// Another value is reported by `bind` as
        /// [`ErrorKind::InvalidConfig`](crate::ErrorKind::InvalidConfig).
        pub fn ring_capacity(mut self, bytes: u32) -> Self {
            if !crate::transport::shm::ring::valid_capacity(bytes) && self.error.is_none() {
                self.error = Some(crate::transport::shm::ring::capacity_error(bytes));
            }
            self.config.ring_capacity = bytes;
            self
        }

        /// The service version reported by `$info` (SemVer; default `0.1.0`).
        pub fn version(mut self, version: &str) -> Self {
            self.identity.version = version.to_owned();
            self
        }

        /// The description reported by `$info`.
        pub fn description(mut self, text: &str) -> Self {
            self.identity.description = text.to_owned();
            self
        }

        /// Adds a metadata entry reported by `$ping`, `$info` and `$stats`.
        pub fn metadata(mut self, key: &str, value: &str) -> Self {
            self.identity.metadata.insert(key.to_owned(), value.to_owned());
            self
        }

        /// Uses this runtime directory instead of the default one.
        pub fn runtime_dir(mut self, dir: impl Into<PathBuf>) -> Self {
            self.dir = Some(dir.into());
            self
        }

        /// Joins the name as one of several *instances* instead of owning it alone: each
        /// instance owns a slot of the name (up to
        /// [`MAX_INSTANCES`](crate::registry::MAX_INSTANCES)), clients connect to the
        /// least-loaded live one, and a crashed instance's slot is reclaimed like a crashed
        /// server's name. Use it for worker processes behind one name (a CPU-bound handler,
        /// Python handlers bound to one core each).
        ///
        /// By default a server owns its name exclusively, and a second server gets
        /// [`ErrorKind::NameTaken`](crate::ErrorKind::NameTaken). Exclusive servers and
        /// instances never mix: an instance cannot join a name an exclusive server owns, nor
        /// an exclusive server take a name instances serve (both get `NameTaken`, saying
        /// which). `$info` and `$stats` answer for the instance a connection reached.
        ///
        /// # Examples
        ///
        /// ```
        /// # let dir = std::env::temp_dir().join(format!("microcs-doc-shared-{}", std::process::id()));
        /// use microcs::{Client, Request, Server};
        /// let workers: Vec<_> = (0..2)
        ///     .map(|_| {
        ///         Server::builder("WORKERS_DOC")
        ///             # .runtime_dir(&dir)
        ///             .shared()
        ///             .bind()?
        ///             .spawn(|req: Request| Ok::<_, microcs::RemoteError>(req.into_payload()))
        ///     })
        ///     .collect::<microcs::Result<_>>()?;
        /// let mut client = Client::builder("WORKERS_DOC")
        ///     # .runtime_dir(&dir)
        ///     .connect()?;
        /// assert_eq!(client.request(b"hi")?, b"hi");
        /// assert_eq!(microcs::registry::list_in(&dir)?.len(), 2);
        /// for w in workers {
        ///     w.shutdown();
        /// }
        /// # Ok::<(), microcs::Error>(())
        /// ```
        pub fn shared(mut self) -> Self {
            self.config.shared = true;
            self
        }

        /// Stops serving (as a shutdown does: running requests finish, the name is freed)
        /// after `timeout` without requests; `serve` / `wait` then return `Ok`. Checked every
        /// second. By default a server started by [activation](crate::activation) gets its
        /// definition's idle timeout (from `MICROCS_IDLE_TIMEOUT`), so that the next call
        /// starts it again; any other server runs until it is stopped. `None` turns it off.
        /// Without this option, a malformed `MICROCS_IDLE_TIMEOUT` (not seconds or a number
        /// with `ms`, `s`, `m`, `h`) is an [`ErrorKind::InvalidConfig`](crate::ErrorKind::InvalidConfig)
        /// error at bind; this option overrides the variable.
        pub fn idle_timeout(mut self, timeout: Option<Duration>) -> Self {
            self.config.idle_timeout = timeout;
            self.config.idle_env_error = None;
            self
        }

        /// Serves on the listening socket a service manager passed to this process —
        /// systemd socket activation (`LISTEN_PID`, `LISTEN_FDS`, `LISTEN_FDNAMES`; see
        /// `sd_listen_fds(3)` and docs/ACTIVATION.md) — instead of binding one (default: off).
        ///
        /// The socket must be the name's socket in the runtime directory: the `.socket` unit
        /// says `ListenStream=%t/microcs/NAME.sock` (with `DirectoryMode=0700` and
        /// `SocketMode=0600`), and the service runs with that runtime directory. The server
        /// still claims the name (its lock), so a name keeps one live owner; a passed socket
        /// bound elsewhere, or not a listening Unix stream socket, is an
        /// [`ErrorKind::InvalidConfig`](crate::ErrorKind::InvalidConfig) error at bind that says
        /// what was passed and what the unit must say. When nothing was passed to this process
        /// (started by hand, or `LISTEN_PID` is another process's), the server binds its socket
        /// as usual, so one command line works both ways. The socket is left in place when the
        /// server stops (it is the manager's), so the next connection starts the service again:
        /// with an [idle timeout](Self::idle_timeout) the service runs only while used.
        ///
        /// The passed descriptors are taken once per process, the first time a server asks:
        /// the three variables are removed from the environment then (so programs this one
        /// starts do not see them; do it before starting threads that call C code reading the
        /// environment) and every passed socket is kept for the servers of this process, each
        /// taking the one bound to its own path. Do not hand them to another socket-activation
        /// library as well. Not with [`shared`](Self::shared) (an error).
        pub fn socket_activation(mut self, on: bool) -> Self {
            self.config.socket_activation = on;
            self
        }
    };
}
pub(crate) use common_server_options;

/// The builder options both client flavours share, expanded inside each flavour's
/// `impl ClientBuilder` (both have the fields `timeout`, `max_payload`, `send_buffer`,
/// `window`, `instance` and `dir`): one definition, code and documentation, for both APIs.
macro_rules! common_client_options {
    () => {
        /// Time each request may take, from the call to the reply (default 30 s). The server
        /// sees the deadline. Also bounds connecting.
        pub fn timeout(mut self, timeout: Duration) -> Self {
            self.timeout = timeout;
            self
        }

        /// Largest reply payload to accept (default 16 MiB); the server refuses larger replies
        /// with [`ErrorKind::FrameTooLarge`](crate::ErrorKind::FrameTooLarge) instead of
        /// sending them.
        pub fn max_frame(mut self, bytes: u32) -> Self {
            self.max_payload = bytes;
            self
        }

        /// Kernel send buffer to ask for on each connection, in bytes (default 1 MiB; 0 keeps
        /// the system's default, `net.core.wmem_default`).
        ///
        /// A request larger than the buffer crosses the socket in buffer-sized rounds, each
        /// costing both sides a sleep and a wake-up; with room for the whole request it goes out
        /// in one system call. The kernel caps the value at `net.core.wmem_max` and counts it
        /// double; memory is only taken while a request waits for the server to read it.
        pub fn send_buffer(mut self, bytes: usize) -> Self {
            self.send_buffer = bytes;
            self
        }

        /// How far ahead of the application a stream's server may send (docs/PROTOCOL.md
        /// § 17): at most `items` items and about `bytes` bytes (one item may overshoot) wait
        /// unread on this side; the default is 64 items and 1 MiB. More room is granted as the
        /// application takes items, so a consumer that stops reading stops the server after one
        /// window. Zero counts as one.
        pub fn stream_window(mut self, items: u32, bytes: u32) -> Self {
            self.window = crate::proto::Credit { items: items.max(1), bytes: bytes.max(1) };
            self
        }

        /// Connects to this instance of the name only (its slot, as
        /// [`ServiceInfo::instance`](crate::registry::ServiceInfo::instance) lists it), never
        /// to another: for tools that ask each instance in turn (`microcs ls`, `stats
        /// --instance`). [`ErrorKind::NoService`](crate::ErrorKind::NoService) when that slot
        /// has no socket.
        pub fn instance(mut self, slot: u32) -> Self {
            self.instance = Some(slot);
            self
        }

        /// Whether a call to a name nobody serves starts the service from its definition
        /// (see [`activation`](crate::activation); default on, unless `MICROCS_NO_ACTIVATION`
        /// is set). Off, such a call fails with
        /// [`ErrorKind::NoService`](crate::ErrorKind::NoService) at once, as it does when no
        /// definition exists. Only in a runtime directory of this user: never in another
        /// user's (named with [`runtime_dir`](Self::runtime_dir)).
        pub fn activate(mut self, on: bool) -> Self {
            self.activate = on;
            self
        }

        /// Asks the server for shared memory (PROTOCOL.md § 18): when it offers it, frames move
        /// through two rings in a memfd instead of the socket, at memory speed while requests
        /// flow, and the wait for an answer sleeps after a few microseconds of spinning (no CPU
        /// while idle). A server that does not offer it is used over the socket, silently.
        ///
        /// Default: the environment variable `MICROCS_SHM` (`1` on, `0` off), else off.
        /// Both flavours of client use it.
        pub fn shared_memory(mut self, on: bool) -> Self {
            self.shared_memory = Some(on);
            self
        }

        /// Looks for the service in this runtime directory instead of the default one.
        ///
        /// The default directory must belong to this user; a directory named here may belong to
        /// another user (to call a service that [allows](crate::ServerBuilder::allow_uid) this
        /// one), but nobody other than its owner may be able to write to it.
        pub fn runtime_dir(mut self, dir: impl Into<PathBuf>) -> Self {
            self.dir = Some(dir.into());
            self
        }
    };
}
pub(crate) use common_client_options;
