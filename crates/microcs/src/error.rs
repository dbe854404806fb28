//! Errors: one [`Error`] type with a [`kind`](Error::kind), the remote side's code and message
//! when the server answered with an error, and the underlying cause in
//! [`source`](std::error::Error::source).

use std::fmt;
use std::io;
use std::sync::Arc;

use crate::proto::status;

/// A specialised `Result` for microcs operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What kind of failure an [`Error`] is. Each kind maps to one Python exception class and one CLI
/// exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The service (or method) name is not valid.
    InvalidName,
    /// A setting does not make sense: an unknown transport (`MICROCS_TRANSPORT`), transport
    /// `nats` without a NATS URL, an empty or malformed NATS URL (its credentials included), a
    /// version that is not SemVer for a service served on NATS. The message names the setting.
    InvalidConfig,
    /// No service of that name is running.
    NoService,
    /// Another live server already owns the name.
    NameTaken,
    /// The request did not complete before its deadline.
    TimedOut,
    /// The server answered with an error (the handler failed, or the method does not exist); see
    /// [`Error::remote`].
    Remote,
    /// A payload over the limit of whoever would receive it.
    FrameTooLarge,
    /// The peer broke the protocol or does not speak it.
    Protocol,
    /// Not allowed: another user's service, an unsafe runtime directory, a non-socket file in
    /// the way.
    PermissionDenied,
    /// The connection or server is closed.
    Closed,
    /// Any other I/O failure; the `io::Error` is the source.
    Io,
    /// Nobody served the name, and starting it from its service definition failed: the
    /// command could not run, exited before it registered, or did not register in time (see
    /// `activation`). The message has the command, its exit status and the end of its log.
    StartFailed,
}

impl ErrorKind {
    /// A short lower-case name for the kind, as used in messages and JSON output.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidName => "invalid name",
            ErrorKind::InvalidConfig => "invalid configuration",
            ErrorKind::NoService => "no service",
            ErrorKind::NameTaken => "name taken",
            ErrorKind::TimedOut => "timed out",
            ErrorKind::Remote => "remote error",
            ErrorKind::FrameTooLarge => "frame too large",
            ErrorKind::Protocol => "protocol error",
            ErrorKind::PermissionDenied => "permission denied",
            ErrorKind::Closed => "closed",
            ErrorKind::Io => "i/o error",
            ErrorKind::StartFailed => "start failed",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error a server sent back: a status code and a message.
///
/// Handlers return it to choose the code the caller sees; any other error a handler returns is
/// sent with code [`status::HANDLER_FAILED`] (500) and its message. Codes follow HTTP's
/// meanings, as in NATS micro services.
///
/// # Examples
///
/// ```
/// use microcs::RemoteError;
///
/// fn handler(req: microcs::Request) -> Result<Vec<u8>, RemoteError> {
///     if req.payload().is_empty() {
///         return Err(RemoteError::new(400, "send a board to step"));
///     }
///     Ok(req.payload().to_vec())
/// }
/// # let _ = handler;
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteError {
    code: u16,
    message: String,
}

impl RemoteError {
    /// An error with this status code and message.
    pub fn new(code: u16, message: impl Into<String>) -> RemoteError {
        RemoteError { code, message: message.into() }
    }

    /// The status code (see [`crate::proto::status`]).
    pub fn code(&self) -> u16 {
        self.code
    }

    /// The message, as the server wrote it.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for RemoteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.code)
    }
}

impl std::error::Error for RemoteError {}

/// The error type of every fallible microcs operation.
///
/// Match on [`kind`](Error::kind); the message (its `Display`) says what happened and what to do.
///
/// # Examples
///
/// ```
/// use microcs::{Client, ErrorKind};
///
/// # let dir = std::env::temp_dir().join(format!("microcs-doc-{}", std::process::id()));
/// match Client::builder("NOBODY_HOME").runtime_dir(&dir).connect() {
///     Err(e) if e.kind() == ErrorKind::NoService => eprintln!("{e}"),
///     other => panic!("unexpected: {other:?}"),
/// }
/// ```
#[derive(Clone)]
pub struct Error {
    inner: Box<Inner>,
}

#[derive(Clone)]
struct Inner {
    kind: ErrorKind,
    message: String,
    remote: Option<RemoteError>,
    owner_pid: Option<u32>,
    may_have_run: bool,
    /// Shared, so that an error can be cloned (a server's reason to stop is reported to every
    /// caller of `wait`).
    source: Option<Arc<dyn std::error::Error + Send + Sync + 'static>>,
}

/// "process N", or "another process" when the pid is not known.
fn owner(pid: Option<u32>) -> String {
    match pid {
        Some(pid) => format!("process {pid}"),
        None => "another process".to_owned(),
    }
}

impl Error {
    /// An error of `kind` with a message.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Error {
        Error {
            inner: Box::new(Inner {
                kind,
                message: message.into(),
                remote: None,
                owner_pid: None,
                may_have_run: false,
                source: None,
            }),
        }
    }

    /// Attaches the underlying cause.
    pub fn with_source(mut self, source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Error {
        self.inner.source = Some(Arc::from(source.into()));
        self
    }

    pub(crate) fn io(context: impl fmt::Display, err: io::Error) -> Error {
        let kind = match err.kind() {
            io::ErrorKind::PermissionDenied => ErrorKind::PermissionDenied,
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => ErrorKind::TimedOut,
            _ => ErrorKind::Io,
        };
        Error::new(kind, format!("{context}: {err}")).with_source(err)
    }

    pub(crate) fn name_taken(name: &str, pid: Option<u32>, dir: &std::path::Path) -> Error {
        let mut e = Error::new(
            ErrorKind::NameTaken,
            format!(
                "the name '{name}' is taken by {} (in {}); stop that server or pick another name",
                owner(pid),
                dir.display()
            ),
        );
        e.inner.owner_pid = pid;
        e
    }

    /// An exclusive server wants `name`, which shared instances serve (their pids).
    pub(crate) fn served_by_instances(name: &str, pids: &[u32], dir: &std::path::Path) -> Error {
        let list = pids.iter().map(u32::to_string).collect::<Vec<_>>().join(", ");
        let mut e = Error::new(
            ErrorKind::NameTaken,
            format!(
                "the name '{name}' is served by {} shared instance{} (pid {list}, in {}); to add a \
                 server to them, make it a shared instance too (ServerBuilder::shared, `microcs \
                 serve --shared`, Python shared=True), or pick another name",
                pids.len(),
                if pids.len() == 1 { "" } else { "s" },
                dir.display()
            ),
        );
        e.inner.owner_pid = pids.first().copied();
        e
    }

    /// A shared instance wants `name`, which an exclusive server owns.
    pub(crate) fn owned_exclusively(name: &str, pid: Option<u32>, dir: &std::path::Path) -> Error {
        let mut e = Error::new(
            ErrorKind::NameTaken,
            format!(
                "the name '{name}' is owned by {} as an exclusive server (in {}), so no instance can \
                 join it; stop that server and serve the name as shared instances only, or pick \
                 another name",
                owner(pid),
                dir.display()
            ),
        );
        e.inner.owner_pid = pid;
        e
    }

    /// A running server gives up `name` in `dir`: its runtime files were removed or replaced,
    /// and `cause` is why it could not take them back. Of the same kind as `cause`.
    pub(crate) fn name_lost(name: &str, dir: &std::path::Path, cause: Error) -> Error {
        let message = if cause.kind() == ErrorKind::NameTaken {
            format!(
                "service '{name}' stops: its runtime files in {} were removed or replaced, and the name \
                 now belongs to {}",
                dir.display(),
                owner(cause.owner_pid())
            )
        } else {
            format!(
                "service '{name}' stops: its runtime files in {} were removed or replaced, and it cannot \
                 take its name back: {cause}",
                dir.display()
            )
        };
        let mut e = Error::new(cause.kind(), message);
        e.inner.owner_pid = cause.owner_pid();
        e.with_source(cause)
    }

    /// An error the server sent (an `Error` frame): the kind follows from the status code when
    /// the library itself produced it, and is [`ErrorKind::Remote`] for the handler's errors.
    pub(crate) fn from_remote(service: &str, code: u16, flags: u16, message: String) -> Error {
        use crate::proto::{FLAG_NOT_RUN, FLAG_SYSTEM};
        let kind = if flags & FLAG_SYSTEM == 0 {
            ErrorKind::Remote
        } else {
            match code {
                status::TOO_LARGE => ErrorKind::FrameTooLarge,
                status::PERMISSION_DENIED => ErrorKind::PermissionDenied,
                status::TIMED_OUT => ErrorKind::TimedOut,
                status::BAD_REQUEST | status::VERSION_UNSUPPORTED => ErrorKind::Protocol,
                _ => ErrorKind::Remote,
            }
        };
        let text = if kind == ErrorKind::Remote {
            format!("service '{service}' answered with error {code}: {message}")
        } else if kind == ErrorKind::TimedOut {
            // Worded like the client's own timeout: which side noticed first is a race.
            let run = if flags & FLAG_NOT_RUN == 0 { "may have run" } else { "did not run" };
            format!("service '{service}' did not answer in time ({message}); the request {run}")
        } else {
            format!("service '{service}' refused the request: {message}")
        };
        let mut e = Error::new(kind, text);
        e.inner.remote = Some(RemoteError::new(code, message));
        // Per request, only FLAG_NOT_RUN says the handler did not start: a library verdict
        // without it (reply too large, stopped at the deadline) came after the handler ran.
        e.inner.may_have_run = flags & FLAG_NOT_RUN == 0;
        e
    }

    pub(crate) fn set_may_have_run(mut self, yes: bool) -> Error {
        self.inner.may_have_run = yes;
        self
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        self.inner.kind
    }

    /// The code and message the server sent, when the server answered with an error.
    pub fn remote(&self) -> Option<&RemoteError> {
        self.inner.remote.as_ref()
    }

    /// For [`ErrorKind::NameTaken`]: the pid of the live server that owns the name, when known.
    pub fn owner_pid(&self) -> Option<u32> {
        self.inner.owner_pid
    }

    /// True when the request may have reached the server and run before the failure (for
    /// example, the connection broke while waiting for the reply). microcs never re-sends such a
    /// request by itself; whether to retry is the caller's decision.
    pub fn may_have_run(&self) -> bool {
        self.inner.may_have_run
    }

    /// The message without the kind.
    pub fn message(&self) -> &str {
        &self.inner.message
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.inner.message)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Error");
        d.field("kind", &self.inner.kind).field("message", &self.inner.message);
        if let Some(r) = &self.inner.remote {
            d.field("remote", r);
        }
        if let Some(p) = self.inner.owner_pid {
            d.field("owner_pid", &p);
        }
        if self.inner.may_have_run {
            d.field("may_have_run", &true);
        }
        if let Some(s) = &self.inner.source {
            d.field("source", s);
        }
        d.finish()
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.inner.source {
            Some(s) => Some(&**s),
            None => self.inner.remote.as_ref().map(|r| r as &(dyn std::error::Error + 'static)),
        }
    }
}

impl From<Error> for io::Error {
    fn from(e: Error) -> io::Error {
        let kind = match e.kind() {
            ErrorKind::InvalidName | ErrorKind::InvalidConfig => io::ErrorKind::InvalidInput,
            ErrorKind::NoService | ErrorKind::StartFailed => io::ErrorKind::NotFound,
            ErrorKind::NameTaken => io::ErrorKind::AddrInUse,
            ErrorKind::TimedOut => io::ErrorKind::TimedOut,
            ErrorKind::PermissionDenied => io::ErrorKind::PermissionDenied,
            ErrorKind::Closed => io::ErrorKind::ConnectionAborted,
            ErrorKind::FrameTooLarge | ErrorKind::Protocol => io::ErrorKind::InvalidData,
            ErrorKind::Remote | ErrorKind::Io => io::ErrorKind::Other,
        };
        io::Error::new(kind, e)
    }
}
