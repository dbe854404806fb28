//! The blocking client.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{Error, ErrorKind, Result};
use crate::io::{Filled, ReadBuf, is_disconnect, is_timeout};
use crate::micro::{InfoResponse, PingResponse, StatsResponse};
use crate::name::Name;
use crate::proto::{self, Decoded, FLAG_NOT_RUN, Header, Hello, HelloAck, Kind, status};
use crate::registry;
use crate::transport::unix::{DEFAULT_SEND_BUFFER, connect_with_timeout, set_recv_timeout, set_send_buffer};
use crate::transport::{Link, send_frame};

/// Default time a request may take, from sending to reply.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// A blocking connection to a named service.
///
/// One request at a time (`&mut self`); for many requests in flight over one connection, use the
/// async client. A `Client` is `Send`, so it can move to another thread. It owns no thread and no
/// runtime: every call is plain syscalls on the caller's thread.
///
/// After the server restarts, the next request reconnects by itself. A request is sent again only
/// when it provably never reached the server (the connection was already dead when it was
/// written, or the server answered that it did not run it); otherwise the error says
/// [`may_have_run`](Error::may_have_run).
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
    timeout: Duration,
    max_payload: u32,
    send_buffer: usize,
    interrupt: Option<InterruptCheck>,
    conn: Option<Connection>,
    /// Request ids are never reused on a connection, so a late reply to a request that timed out
    /// can never be taken for the answer to a later one.
    next_id: u64,
    /// NATS settings and connection, when NATS is configured (see `crate::nats`).
    #[cfg(feature = "nats")]
    pub(crate) nats: Option<Box<crate::nats::ClientLink>>,
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
    interrupt: Option<InterruptCheck>,
    #[cfg(feature = "nats")]
    pub(crate) nats: crate::nats::ClientConfig,
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
    /// [`ErrorKind::InvalidName`], [`ErrorKind::NoService`] (at once, never by timing out),
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
            timeout: self.timeout,
            max_payload: self.max_payload,
            send_buffer: self.send_buffer,
            interrupt: self.interrupt,
            conn: None,
            next_id: 1,
            #[cfg(feature = "nats")]
            nats: None,
        };
        let deadline = Instant::now() + client.timeout;
        #[cfg(feature = "nats")]
        if let Some(link) = crate::nats::ClientLink::new(self.nats)? {
            return link.connect(client, deadline);
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
            interrupt: None,
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

    /// The socket this client connects to.
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

    fn exchange(&mut self, method: &str, payload: &[u8]) -> Result<Vec<u8>> {
        #[cfg(feature = "nats")]
        if self.nats.is_some() {
            return crate::nats::ClientLink::exchange(self, method, payload);
        }
        self.exchange_local(method, payload)
    }

    /// NATS hook: whether a local connection is open.
    #[cfg(feature = "nats")]
    pub(crate) fn has_local(&self) -> bool {
        self.conn.is_some()
    }

    /// NATS hook: connects to the local instance.
    #[cfg(feature = "nats")]
    pub(crate) fn connect_local(&mut self, deadline: Instant) -> Result<()> {
        self.conn = Some(self.open(deadline)?);
        Ok(())
    }

    /// One request to the local instance (reconnecting when needed).
    pub(crate) fn exchange_local(&mut self, method: &str, payload: &[u8]) -> Result<Vec<u8>> {
        let deadline = Instant::now() + self.timeout;
        // At most one resend, and only of a request that provably did not run.
        let mut resent = false;
        loop {
            if self.conn.is_none() {
                self.conn = Some(self.open(deadline)?);
            }
            match self.attempt(method, payload, deadline) {
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

    fn attempt(&mut self, method: &str, payload: &[u8], deadline: Instant) -> Result<Vec<u8>, Attempt> {
        let name = &self.name;
        let conn = self.conn.as_mut().expect("connected");
        if payload.len() > conn.server.max_payload as usize {
            return Err(Attempt::Failed(Error::new(
                ErrorKind::FrameTooLarge,
                format!(
                    "payload of {} bytes is over service '{name}''s limit of {} bytes; nothing was sent",
                    payload.len(),
                    conn.server.max_payload
                ),
            )));
        }
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        let remaining = deadline.saturating_duration_since(Instant::now());
        let header = Header::request(id, proto::deadline_ms(remaining));
        if let Err(e) = send_frame(&conn.stream, &header, method.as_bytes(), payload) {
            self.conn = None;
            if e.sent == 0 && is_disconnect(&e.error) {
                // The connection was dead before any byte of this request went out.
                return Err(Attempt::NotRun(Error::io(
                    format_args!("service '{name}' closed the connection"),
                    e.error,
                )));
            }
            // A partly written frame can never be decoded by the server, so it cannot have run.
            let err = if is_timeout(&e.error) {
                Error::new(
                    ErrorKind::TimedOut,
                    format!("service '{name}' did not take the request within {:?}", self.timeout),
                )
            } else {
                Error::io(format_args!("sending to service '{name}' failed"), e.error)
            };
            return Err(Attempt::Failed(err));
        }
        loop {
            let frame = match conn.read_frame(deadline, self.interrupt.as_ref()) {
                Ok(f) => f,
                Err(e @ (ReadError::TimedOut | ReadError::Interrupted)) => {
                    // Tell the server to stop working on it; best effort, the reply (if it still
                    // comes) will be dropped by id.
                    let _ = send_frame(&conn.stream, &Header::new(Kind::Cancel, id), b"", b"");
                    let err = match e {
                        ReadError::TimedOut => Error::new(
                            ErrorKind::TimedOut,
                            format!(
                                "service '{name}' did not answer within {:?}; the request may have run",
                                self.timeout
                            ),
                        ),
                        _ => e.into_error(name, true),
                    };
                    return Err(Attempt::Failed(err.set_may_have_run(true)));
                }
                Err(e) => {
                    self.conn = None;
                    return Err(Attempt::Failed(e.into_error(name, true)));
                }
            };
            let (h, reply_payload) = frame;
            match h.kind() {
                Some(Kind::Reply) if h.id == id => return Ok(reply_payload),
                Some(Kind::Error) if h.id == id => {
                    let message = String::from_utf8_lossy(&reply_payload).into_owned();
                    let err = Error::from_remote(name.as_str(), h.status, h.flags, message);
                    if h.flags & FLAG_NOT_RUN != 0 && h.status == status::BUSY {
                        return Err(Attempt::NotRun(err));
                    }
                    return Err(Attempt::Failed(err));
                }
                Some(Kind::Error) if h.id == 0 => {
                    self.conn = None;
                    let message = String::from_utf8_lossy(&reply_payload).into_owned();
                    let err = Error::from_remote(name.as_str(), h.status, h.flags, message);
                    let may = h.flags & FLAG_NOT_RUN == 0;
                    return Err(Attempt::Failed(err.set_may_have_run(may)));
                }
                // Late answers to requests that timed out earlier, pongs: not ours, dropped.
                _ => continue,
            }
        }
    }

    /// Opens a connection and shakes hands.
    fn open(&self, deadline: Instant) -> Result<Connection> {
        let name = &self.name;
        let no_service = |detail: &str| {
            Error::new(
                ErrorKind::NoService,
                format!("no service named '{name}' is running (looked in {}{detail})", self.dir.display()),
            )
        };
        let exists = if self.explicit_dir {
            registry::check_foreign_dir_exists(&self.dir)?
        } else {
            registry::check_dir_exists(&self.dir)?
        };
        if !exists {
            return Err(no_service(""));
        }
        let remaining = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        let fd = connect_with_timeout(&self.path, remaining).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => no_service(""),
            io::ErrorKind::ConnectionRefused => no_service("; found only a stale socket"),
            _ if is_timeout(&e) => Error::new(
                ErrorKind::TimedOut,
                format!("service '{name}' did not accept the connection within {:?}", self.timeout),
            ),
            _ => Error::io(format_args!("cannot connect to {}", self.path.display()), e),
        })?;
        set_send_buffer(&fd, self.send_buffer);
        let stream = fd;
        let mut conn = Connection {
            stream,
            rbuf: ReadBuf::default(),
            server: placeholder_ack(),
            max_payload: self.max_payload.max(64 * 1024),
            rcv_timeout: Some(remaining),
        };
        let hello = Hello { max_payload: self.max_payload };
        let sent = send_frame(&conn.stream, &Header::new(Kind::Hello, 0), b"", &hello.to_bytes());
        // A server that refuses us (busy, another user) writes why and closes without reading:
        // our hello may then fail with EPIPE, but its answer is still there to read.
        let got = conn.read_frame(deadline, self.interrupt.as_ref());
        if let (Err(e), Err(_)) = (sent, &got) {
            return Err(Error::io(format_args!("handshake with service '{name}' failed"), e.error));
        }
        let (h, body) = got.map_err(|e| match e {
            ReadError::TimedOut => Error::new(
                ErrorKind::TimedOut,
                format!(
                    "service '{name}' did not answer the handshake in time; is {} a microcs service?",
                    self.path.display()
                ),
            ),
            e => e.into_error(name, false),
        })?;
        match h.kind() {
            Some(Kind::HelloAck) => {
                conn.server = HelloAck::parse(&body)
                    .ok_or_else(|| not_microcs(&self.path, "its handshake answer is malformed"))?;
            }
            Some(Kind::Error) => {
                let message = String::from_utf8_lossy(&body).into_owned();
                return Err(
                    Error::from_remote(name.as_str(), h.status, h.flags, message).set_may_have_run(false)
                );
            }
            _ => return Err(not_microcs(&self.path, "it answered the handshake with an unexpected frame")),
        }
        tracing::debug!(service = %name, pid = conn.server.pid, "connected");
        Ok(conn)
    }
}

enum Attempt {
    /// Provably not run: safe to send again on a new connection.
    NotRun(Error),
    Failed(Error),
}

enum ReadError {
    TimedOut,
    /// The [interrupt check](ClientBuilder::interrupt_check) said to stop.
    Interrupted,
    Eof,
    Io(io::Error),
    Decode(proto::DecodeError),
}

impl ReadError {
    fn into_error(self, name: &Name, sent: bool) -> Error {
        let may = if sent { "; the request may have run" } else { "" };
        match self {
            ReadError::TimedOut => Error::new(ErrorKind::TimedOut, format!("service '{name}' timed out")),
            ReadError::Interrupted => Error::io(
                format_args!("the wait for service '{name}' was interrupted{may}"),
                io::ErrorKind::Interrupted.into(),
            )
            .set_may_have_run(sent),
            ReadError::Eof => Error::new(ErrorKind::Closed, format!("service '{name}' closed the connection{may}"))
                .set_may_have_run(sent),
            ReadError::Io(e) if is_disconnect(&e) => {
                Error::new(ErrorKind::Closed, format!("connection to service '{name}' broke: {e}{may}"))
                    .with_source(e)
                    .set_may_have_run(sent)
            }
            ReadError::Io(e) => Error::io(format_args!("reading from service '{name}' failed"), e).set_may_have_run(sent),
            ReadError::Decode(e) => Error::new(
                ErrorKind::Protocol,
                format!("service '{name}' sent bytes that are not a valid microcs frame ({e}); is it a microcs service?"),
            )
            .with_source(e)
            .set_may_have_run(sent),
        }
    }
}

impl Connection {
    /// Reads one whole frame, waiting until `deadline` at most (and asking `interrupt`, if any,
    /// whether to stop, every time its period passes without a frame).
    fn read_frame(
        &mut self,
        deadline: Instant,
        interrupt: Option<&InterruptCheck>,
    ) -> Result<(Header, Vec<u8>), ReadError> {
        loop {
            let needed = match self.rbuf.decode(self.max_payload).map_err(ReadError::Decode)? {
                Decoded::Frame(f) => {
                    let (header, len) = (f.header, f.len);
                    let small = (!self.rbuf.is_large()).then(|| f.payload.to_vec());
                    let payload = small.or_else(|| self.rbuf.take_payload()).unwrap_or_default();
                    self.rbuf.consume(len);
                    return Ok((header, payload));
                }
                Decoded::Incomplete { needed } => needed,
            };
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(ReadError::TimedOut);
            }
            let wait = interrupt.map_or(remaining, |i| remaining.min(i.every));
            // SO_RCVTIMEO bounds each read. Reset it only when it is off from the wait by more
            // than a millisecond: requests with the same timeout then cost no extra syscall,
            // while a short value left by an earlier, nearer deadline never turns a later wait
            // into a loop of early wake-ups.
            if self.rcv_timeout.is_none_or(|t| t.abs_diff(wait) > Duration::from_millis(1)) {
                set_recv_timeout(&self.stream, Some(wait.max(Duration::from_micros(100))))
                    .map_err(ReadError::Io)?;
                self.rcv_timeout = Some(wait);
            }
            match self.rbuf.fill_or_interrupted(&self.stream, needed) {
                Ok(Filled::Data) => {}
                Ok(Filled::Eof) => return Err(ReadError::Eof),
                // A timed-out read, or one a signal handler interrupted (which would otherwise
                // start the whole receive timeout again, so a signal every few ms could keep the
                // call waiting past its deadline): the deadline, then the interrupt check.
                Err(e) if is_timeout(&e) || e.kind() == io::ErrorKind::Interrupted => {
                    if Instant::now() >= deadline {
                        return Err(ReadError::TimedOut);
                    }
                    if interrupt.is_some_and(|i| (i.stop)()) {
                        return Err(ReadError::Interrupted);
                    }
                }
                Err(e) => return Err(ReadError::Io(e)),
            }
        }
    }
}

fn placeholder_ack() -> HelloAck {
    HelloAck { max_payload: 0, max_in_flight: 0, pid: 0, name: String::new() }
}

fn not_microcs(path: &Path, why: &str) -> Error {
    Error::new(ErrorKind::Protocol, format!("{} is not a microcs service: {why}", path.display()))
}
