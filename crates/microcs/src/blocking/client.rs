//! The blocking client.

use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{Error, ErrorKind, Result};
use crate::fork;
use crate::io::{Filled, ReadBuf, is_timeout};
use crate::micro::{InfoResponse, PingResponse, StatsResponse};
use crate::name::Name;
pub use crate::proto::client_conn::DEFAULT_TIMEOUT;
use crate::proto::client_conn::{self, Attempt, Ids, Incoming, Loss, Outcome, Written};
use crate::proto::{self, Decoded, Frame, Header, HelloAck, Kind};
use crate::registry;
use crate::transport::unix::{DEFAULT_SEND_BUFFER, WithFds};
use crate::transport::{Link, send_frame};

#[path = "open.rs"]
mod open;
#[path = "stream.rs"]
mod stream;
pub use stream::ItemStream;

/// A blocking connection to a named service.
///
/// One request at a time (`&mut self`); for many requests in flight over one connection, use the
/// async client.
///
/// When the name is served by several [instances](crate::ServerBuilder::shared), the client
/// connects to the least-loaded live one (fewest open connections), skips instances that are
/// gone, and about once a second (checked when a request starts, never in between) moves to
/// another instance when that one has at least two connections fewer — so instances started
/// later get a share of the work without callers reconnecting by hand. A `Client` is `Send`, so it can move to another thread. It owns no thread and no
/// runtime: every call is plain syscalls on the caller's thread.
///
/// After the server restarts, the next request reconnects by itself. A request is sent again only
/// when it provably never reached the server (the connection was already dead when it was
/// written, or the server answered that it did not run it); otherwise the error says
/// [`may_have_run`](Error::may_have_run).
///
/// # After `fork()`
///
/// A connection belongs to the process that opened it. A client used in a forked child never
/// reads, writes or shuts down the connection it inherited (the parent still uses it): the
/// child's first request closes the child's copy of the socket and connects anew, from the
/// child (over NATS too: the child gets a broker connection of its own). So a client created
/// before a `multiprocessing`-style fork keeps working in every process, each getting only its
/// own replies. Telling costs one atomic load per request (a wipe-on-fork page, no system call).
///
/// # Examples
///
/// ```no_run
/// let mut client = microcs::Client::connect("LIFE_GEN")?;
/// let reply: Vec<u8> = client.request(b"Give me some data back!!")?;
/// let text: String = client.send_message("hello")?;
/// let stepped = client.call("step", b"..#\n.#.\n#..")?;
/// # Ok::<(), microcs::Error>(())
/// ```
#[derive(Debug)]
pub struct Client {
    name: Name,
    path: PathBuf,
    dir: PathBuf,
    /// The application named the directory (so it may belong to another user).
    explicit_dir: bool,
    /// When this client last started the service (activation), so that the call that waited
    /// for it gets its whole timeout from then on.
    activated: Option<Instant>,
    timeout: Duration,
    max_payload: u32,
    send_buffer: usize,
    /// Ask servers for shared memory (PROTOCOL.md § 18).
    shm: bool,
    interrupt: Option<InterruptCheck>,
    /// The room each stream grants its server ([`ClientBuilder::stream_window`]).
    window: proto::Credit,
    /// The one instance to use ([`ClientBuilder::instance`]).
    instance: Option<u32>,
    /// Start the service from its definition when nobody serves it ([`ClientBuilder::activate`]).
    activate: bool,
    conn: Option<Connection>,
    /// Request ids are never reused on a connection, so a late reply to a request that timed out
    /// can never be taken for the answer to a later one.
    next_id: Ids,
    /// NATS settings and connection, when NATS is configured (see `crate::nats`).
    #[cfg(feature = "nats")]
    nats: Option<std::sync::Arc<crate::nats::Link>>,
}

#[derive(Debug)]
struct Connection {
    stream: Link,
    rbuf: ReadBuf,
    server: HelloAck,
    /// Largest payload the decoder accepts: the reply limit announced in `Hello`, but never
    /// below 64 KiB, so the handshake answer and short errors always get through (the server
    /// holds replies to the announced limit itself).
    max_payload: u32,
    /// The receive timeout currently set on the socket, to avoid a syscall per request.
    rcv_timeout: Option<Duration>,
    /// The process that opened it ([`fork::current`]): no other may use it.
    owner: u32,
    /// The instance slot it reached (`None`: the name's exclusive server).
    slot: Option<u32>,
    /// When to look again whether another instance is less loaded (instances only).
    recheck: Instant,
}

/// How often, about, a client of an instance looks at the other instances' load; each
/// client's period is jittered by ±50 % so that clients do not move all at once.
const RECHECK: Duration = Duration::from_secs(1);

fn next_recheck(now: Instant) -> Instant {
    now + RECHECK / 2 + Duration::from_millis(registry::random_u64() % RECHECK.as_millis() as u64)
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
    shared_memory: Option<bool>,
    interrupt: Option<InterruptCheck>,
    window: proto::Credit,
    instance: Option<u32>,
    activate: bool,
    #[cfg(feature = "nats")]
    nats: crate::nats::ClientConfig,
}

/// What [`ClientBuilder::interrupt_check`] set.
#[derive(Clone)]
struct InterruptCheck {
    every: Duration,
    stop: Arc<dyn Fn() -> bool + Send + Sync>,
}

impl std::fmt::Debug for InterruptCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InterruptCheck").field("every", &self.every).finish_non_exhaustive()
    }
}

impl ClientBuilder {
    crate::service::common_client_options!();
    #[cfg(feature = "nats")]
    crate::nats::nats_client_options!();

    /// Lets something other than the deadline end a wait: while a call waits for the service's
    /// answer, `stop` runs on the calling thread every `every`; when it returns `true`, the call
    /// ends at once with an [`ErrorKind::Io`] error whose source is
    /// [`std::io::ErrorKind::Interrupted`]. A request already sent is cancelled on the server (a
    /// `Cancel` goes out) and [may have run](Error::may_have_run); the connection stays usable
    /// (a late reply is dropped by its id). An answer that comes within `every` costs nothing
    /// extra. Local connections only: a call over NATS waits for its deadline.
    ///
    /// This is how the Python bindings let Ctrl-C stop a call.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use std::sync::Arc;
    /// use std::sync::atomic::{AtomicBool, Ordering};
    /// use std::time::Duration;
    ///
    /// let quit = Arc::new(AtomicBool::new(false)); // set by a signal handler, a UI, ...
    /// let q = quit.clone();
    /// let mut client = microcs::Client::builder("LIFE_GEN")
    ///     .interrupt_check(Duration::from_millis(100), move || q.load(Ordering::Relaxed))
    ///     .connect()?;
    /// match client.request(b"...") {
    ///     Err(e) if quit.load(Ordering::Relaxed) => eprintln!("stopped: {e}"),
    ///     r => println!("{:?}", r?),
    /// }
    /// # Ok::<(), microcs::Error>(())
    /// ```
    pub fn interrupt_check(
        mut self,
        every: Duration,
        stop: impl Fn() -> bool + Send + Sync + 'static,
    ) -> Self {
        self.interrupt =
            Some(InterruptCheck { every: every.max(Duration::from_millis(1)), stop: Arc::new(stop) });
        self
    }

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
    pub fn connect(self) -> Result<Client> {
        let name = Name::new(self.name)?;
        let explicit_dir = self.dir.is_some();
        let dir = self.dir.unwrap_or_else(registry::runtime_dir);
        let path = registry::socket_path(&dir, &name)?;
        let mut client = Client {
            name,
            path,
            dir,
            explicit_dir,
            activated: None,
            timeout: self.timeout,
            max_payload: self.max_payload,
            send_buffer: self.send_buffer,
            shm: crate::transport::shm::client_wants(self.shared_memory),
            interrupt: self.interrupt,
            window: self.window,
            instance: self.instance,
            activate: self.activate,
            conn: None,
            next_id: Ids::new(),
            #[cfg(feature = "nats")]
            nats: None,
        };
        let deadline = Instant::now() + client.timeout;
        #[cfg(feature = "nats")]
        if let Some(link) = crate::nats::Link::new(self.nats)? {
            // A local instance if there is one (unless NATS is forced), else the broker.
            if link.local_first() {
                match client.open(deadline) {
                    Ok(conn) => client.conn = Some(conn),
                    Err(e) if e.kind() == ErrorKind::NoService => {
                        link.no_local();
                        link.caller_blocking(&client.name)
                            .map_err(|n| crate::nats::Link::unreachable(e, n))?;
                    }
                    Err(e) => return Err(e),
                }
            } else {
                link.caller_blocking(&client.name)?;
            }
            client.nats = Some(std::sync::Arc::new(link));
            return Ok(client);
        }
        client.conn = Some(client.open(deadline)?);
        Ok(client)
    }
}

impl Client {
    /// Connects to the service `name` with default options.
    ///
    /// # Errors
    ///
    /// As [`ClientBuilder::connect`].
    pub fn connect(name: &str) -> Result<Client> {
        Client::builder(name).connect()
    }

    /// Options for connecting to `name`.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// let client = microcs::Client::builder("LIFE_GEN").timeout(Duration::from_secs(2)).connect()?;
    /// # Ok::<(), microcs::Error>(())
    /// ```
    pub fn builder(name: &str) -> ClientBuilder {
        ClientBuilder {
            name: name.to_owned(),
            dir: None,
            timeout: DEFAULT_TIMEOUT,
            max_payload: proto::DEFAULT_MAX_PAYLOAD,
            send_buffer: DEFAULT_SEND_BUFFER,
            shared_memory: None,
            interrupt: None,
            window: proto::Credit { items: proto::DEFAULT_WINDOW_ITEMS, bytes: proto::DEFAULT_WINDOW_BYTES },
            instance: None,
            activate: crate::activation::enabled_by_env(),
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
    pub fn request(&mut self, payload: &[u8]) -> Result<Vec<u8>> {
        self.exchange("", payload)
    }

    /// Calls the named method with `payload`.
    ///
    /// # Errors
    ///
    /// As [`request`](Client::request); [`ErrorKind::InvalidName`] for a malformed method name,
    /// [`ErrorKind::Remote`] with code 404 for a method the service does not have.
    pub fn call(&mut self, method: &str, payload: &[u8]) -> Result<Vec<u8>> {
        proto::check_method(method).map_err(|m| Error::new(ErrorKind::InvalidName, m))?;
        self.exchange(method, payload)
    }

    /// Sends text to the default handler and returns the reply as text — the original course
    /// project's verb.
    ///
    /// # Errors
    ///
    /// As [`request`](Client::request); [`ErrorKind::Protocol`] if the reply is not UTF-8.
    pub fn send_message(&mut self, message: &str) -> Result<String> {
        let reply = self.request(message.as_bytes())?;
        String::from_utf8(reply).map_err(|e| {
            Error::new(
                ErrorKind::Protocol,
                format!(
                    "service '{}' replied with bytes that are not UTF-8 text; use request() for bytes",
                    self.name
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
    pub fn ping(&mut self) -> Result<PingResponse> {
        self.builtin("$ping")
    }

    /// The service's `$info` answer: name, version, endpoints.
    ///
    /// # Errors
    ///
    /// As [`ping`](Client::ping).
    pub fn info(&mut self) -> Result<InfoResponse> {
        self.builtin("$info")
    }

    /// The service's `$stats` answer: per-endpoint request and error counts and timings.
    ///
    /// # Errors
    ///
    /// As [`ping`](Client::ping).
    pub fn stats(&mut self) -> Result<StatsResponse> {
        self.builtin("$stats")
    }

    fn builtin<T: serde::de::DeserializeOwned>(&mut self, method: &str) -> Result<T> {
        let reply = self.exchange(method, b"")?;
        serde_json::from_slice(&reply).map_err(|e| {
            Error::new(
                ErrorKind::Protocol,
                format!("service '{}' sent an invalid {method} answer: {e}", self.name),
            )
            .with_source(e)
        })
    }

    /// The service name.
    pub fn name(&self) -> &Name {
        &self.name
    }

    /// The socket this client is connected to (or was, last): the name's own socket, or (a
    /// name served by several instances) the socket of the instance it reached.
    pub fn socket_path(&self) -> &Path {
        &self.path
    }

    /// The per-request timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Changes the per-request timeout.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// The server's process id, from the handshake (`None` while disconnected).
    pub fn server_pid(&self) -> Option<u32> {
        self.conn.as_ref().map(|c| c.server.pid)
    }

    /// Largest request payload the server accepts (`None` while disconnected).
    pub fn max_request_payload(&self) -> Option<u32> {
        self.conn.as_ref().map(|c| c.server.max_payload)
    }

    /// Gives a reply's vector back, for the next large reply (64 KiB or more) to be read into
    /// instead of a fresh allocation. For a caller that copies each reply out and drops it (a
    /// language binding does): a fresh allocation of a megabyte comes from the system, and each
    /// of its pages then costs a page fault on first touch — more than the copy itself.
    ///
    /// The client keeps one such vector (the largest given back, up to 16 MiB) while it is
    /// connected; vectors under 64 KiB are just dropped. A reply gets it only if it is at most
    /// twice the reply's size, so a small reply never holds a big vector.
    ///
    /// ```no_run
    /// # fn main() -> microcs::Result<()> {
    /// let mut client = microcs::Client::connect("BIG_ECHO")?;
    /// for _ in 0..100 {
    ///     let reply = client.request(&[0u8; 1 << 20])?;
    ///     // ... use the reply ...
    ///     client.recycle(reply);
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub fn recycle(&mut self, reply: Vec<u8>) {
        if let Some(conn) = self.conn.as_mut() {
            conn.rbuf.recycle(reply);
        }
    }

    fn exchange(&mut self, method: &str, payload: &[u8]) -> Result<Vec<u8>> {
        self.leave_inherited();
        #[cfg(feature = "nats")]
        if let Some(link) = self.nats.clone() {
            if link.try_local(self.conn.is_some()) {
                match self.exchange_local(method, payload) {
                    // No local instance (any more): the request did not run; NATS it is.
                    Err(e) if e.kind() == ErrorKind::NoService => link.no_local(),
                    r => return r,
                }
            }
            return link.call_blocking(&self.name, method, payload, self.timeout);
        }
        self.exchange_local(method, payload)
    }

    /// Where the last request went ([`Transport::Local`](crate::nats::Transport::Local) or
    /// [`Transport::Nats`](crate::nats::Transport::Nats)); before any request, where the next
    /// one would go.
    #[cfg(feature = "nats")]
    pub fn via(&self) -> crate::nats::Transport {
        match &self.nats {
            Some(link) if link.on_nats(self.conn.is_some()) => crate::nats::Transport::Nats,
            _ => crate::nats::Transport::Local,
        }
    }

    /// The NATS broker this client falls back to or uses (password removed), if any.
    #[cfg(feature = "nats")]
    pub fn nats_url(&self) -> Option<String> {
        self.nats.as_ref().map(|l| l.display_url())
    }

    /// In a process other than the one that connected (after `fork()`): lets go of what the
    /// parent opened without touching it — no read, no write, no shutdown; only this process's
    /// copy of the socket is closed — so that the next request connects anew from here.
    fn leave_inherited(&mut self) {
        if self.conn.as_ref().is_some_and(|c| !fork::is_current(c.owner)) {
            tracing::debug!(service = %self.name, "used after fork(): reconnecting from this process");
            self.conn = None;
        }
        #[cfg(feature = "nats")]
        if let Some(link) = self.nats.as_ref().filter(|l| !l.is_current()) {
            let fresh = std::sync::Arc::new(link.for_this_process());
            // The parent's broker connection lives on a runtime whose thread did not survive the
            // fork: dropping it here could wake or lock what belongs to that runtime. It is left
            // as it is (a one-time leak per fork).
            std::mem::forget(self.nats.replace(fresh));
        }
    }

    /// One request to the local instance (reconnecting when needed).
    fn exchange_local(&mut self, method: &str, payload: &[u8]) -> Result<Vec<u8>> {
        let start = Instant::now();
        let mut deadline = start + self.timeout;
        // At most one resend, and only of a request that provably did not run.
        let mut resent = false;
        self.rebalance(start, deadline);
        loop {
            // The time left, for the request's header: the whole timeout unless connecting (or a
            // first try) took some of it — one clock read fewer on the common path.
            let remaining = if self.conn.is_none() || resent {
                if self.conn.is_none() {
                    self.conn = Some(self.open(deadline)?);
                    // It had to start the service: the request gets its whole timeout from then.
                    if let Some(t) = self.activated.take() {
                        deadline = deadline.max(t + self.timeout);
                    }
                }
                deadline.saturating_duration_since(Instant::now())
            } else {
                self.timeout
            };
            match self.attempt(method, payload, deadline, remaining) {
                Err(Attempt::NotRun(e)) if !resent => {
                    tracing::debug!(service = %self.name, error = %e, "request did not reach the server; reconnecting");
                    self.conn = None;
                    resent = true;
                }
                Err(Attempt::NotRun(e) | Attempt::Failed(e)) => return Err(e),
                Ok(reply) => return Ok(reply),
            }
        }
    }

    fn attempt(
        &mut self,
        method: &str,
        payload: &[u8],
        deadline: Instant,
        remaining: Duration,
    ) -> Result<Vec<u8>, Attempt> {
        let name = &self.name;
        let conn = self.conn.as_mut().expect("connected");
        client_conn::check_payload(name, payload.len(), &conn.server).map_err(Attempt::Failed)?;
        let id = self.next_id.next();
        let header = client_conn::request_header(id, remaining);
        let mark = conn.stream.shm().map(|s| s.mark());
        if let Err(e) = send_frame(&conn.stream, &header, method.as_bytes(), payload) {
            self.conn = None;
            if is_timeout(&e.error) {
                // Part of it may be in the socket, but a frame cut short never runs.
                return Err(Attempt::Failed(client_conn::not_taken(name, self.timeout)));
            }
            let written = if e.sent == 0 { Written::None } else { Written::Part };
            let outcome = Outcome::Lost { loss: Loss::from_io(e.error), written };
            return client_conn::settle(name, self.timeout, outcome);
        }
        let outcome = loop {
            let (frame, payload) = match conn.read_frame(deadline, self.interrupt.as_ref()) {
                Ok(f) => f,
                Err(Wait::TimedOut) => break Outcome::TimedOut,
                Err(Wait::Interrupted) => break Outcome::Interrupted,
                Err(Wait::Lost(loss)) => {
                    // On shared memory a dead server's ring still takes the request; it ran
                    // only if the server read a byte of it. (A server that sent garbage is
                    // not asked again.)
                    let unread = matches!(loss, Loss::Closed(_))
                        && mark.zip(conn.stream.shm()).is_some_and(|(m, s)| s.untouched_since(m));
                    let written = if unread { Written::None } else { Written::All };
                    break Outcome::Lost { loss, written };
                }
            };
            match frame {
                Incoming::Reply(i) if i == id => break Outcome::Reply(payload),
                Incoming::Error { id: i, status, flags, message } if i == id => {
                    break Outcome::Error { status, flags, message };
                }
                Incoming::Closing(loss) => break Outcome::Lost { loss, written: Written::All },
                // Late answers to requests given up on earlier, pings: not ours, dropped.
                _ => continue,
            }
        };
        match outcome {
            // Tell the server to stop working on it; best effort, the reply (if it still comes)
            // is dropped by its id.
            Outcome::TimedOut | Outcome::Interrupted => {
                let _ = send_frame(&conn.stream, &Header::new(Kind::Cancel, id), b"", b"");
            }
            Outcome::Lost { .. } => self.conn = None,
            _ => {}
        }
        client_conn::settle(name, self.timeout, outcome)
    }

    /// The pid of the server holding the name, for the message of a server that does not answer.
    fn holder(&self) -> Option<u32> {
        registry::holder(&self.dir, &self.name)
    }

    /// What carries this client's frames to the local service: `"shm"` (shared memory),
    /// `"unix"` (the socket), or `None` while not connected.
    pub fn transport(&self) -> Option<&'static str> {
        self.conn.as_ref().map(|c| c.stream.transport_name())
    }
}

/// Why a wait for a frame ended without one.
enum Wait {
    TimedOut,
    /// The [interrupt check](ClientBuilder::interrupt_check) said to stop.
    Interrupted,
    Lost(Loss),
}

impl Connection {
    /// Reads one whole frame and what it means, with its payload (moved out of the read buffer
    /// when large), waiting until `deadline` at most.
    fn read_frame(
        &mut self,
        deadline: Instant,
        interrupt: Option<&InterruptCheck>,
    ) -> Result<(Incoming, Vec<u8>), Wait> {
        self.read_raw(deadline, interrupt, None, |_| ()).map(|((), incoming, payload)| (incoming, payload))
    }

    /// Reads one whole frame; `look` sees it before it is consumed. Waits until `deadline` at
    /// most (and asks `interrupt`, if any, whether to stop, every time its period passes
    /// without a frame). `fds`: keep descriptors passed with the bytes (the handshake's).
    ///
    /// The time left is read from the clock before each wait, the first included: sending the
    /// request may have waited (a full socket or ring) for any part of the timeout.
    fn read_raw<T>(
        &mut self,
        deadline: Instant,
        interrupt: Option<&InterruptCheck>,
        mut fds: Option<&mut Vec<OwnedFd>>,
        look: impl FnOnce(&Frame<'_>) -> T,
    ) -> Result<(T, Incoming, Vec<u8>), Wait> {
        loop {
            let decoded = self.rbuf.decode(self.max_payload).map_err(|e| Wait::Lost(Loss::Protocol(e)))?;
            let needed = match decoded {
                Decoded::Frame(f) => {
                    let (looked, incoming, len) = (look(&f), client_conn::classify(&f), f.len);
                    let small = (!self.rbuf.is_large()).then(|| f.payload.to_vec());
                    let payload = small.or_else(|| self.rbuf.take_payload()).unwrap_or_default();
                    self.rbuf.consume(len);
                    return Ok((looked, incoming, payload));
                }
                Decoded::Incomplete { needed } => needed,
            };
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(Wait::TimedOut);
            }
            let wait = interrupt.map_or(remaining, |i| remaining.min(i.every));
            // SO_RCVTIMEO bounds each read. Reset it only when it is off from the wait by more
            // than a millisecond: requests with the same timeout then cost no extra syscall,
            // while a short value left by an earlier, nearer deadline never turns a later wait
            // into a loop of early wake-ups.
            if self.rcv_timeout.is_none_or(|t| t.abs_diff(wait) > Duration::from_millis(1)) {
                self.stream
                    .set_recv_timeout(Some(wait.max(Duration::from_micros(100))))
                    .map_err(|e| Wait::Lost(Loss::from_io(e)))?;
                self.rcv_timeout = Some(wait);
            }
            let filled = match fds.as_deref_mut() {
                Some(fds) => self.rbuf.fill_from(needed, &mut WithFds { socket: self.stream.socket(), fds }),
                None => self.rbuf.fill_or_interrupted(&self.stream, needed),
            };
            match filled {
                Ok(Filled::Data) => {}
                Ok(Filled::Eof) => return Err(Wait::Lost(Loss::Closed(None))),
                // A timed-out read, or one a signal handler interrupted (which would otherwise
                // start the whole receive timeout again, so a signal every few ms could keep the
                // call waiting past its deadline): the deadline, then the interrupt check.
                Err(e) if is_timeout(&e) || e.kind() == io::ErrorKind::Interrupted => {
                    if Instant::now() >= deadline {
                        return Err(Wait::TimedOut);
                    }
                    if interrupt.is_some_and(|i| (i.stop)()) {
                        return Err(Wait::Interrupted);
                    }
                }
                Err(e) => return Err(Wait::Lost(Loss::from_io(e))),
            }
        }
    }
}
