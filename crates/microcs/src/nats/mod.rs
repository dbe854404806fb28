//! Feature `nats`: the same services and calls across machines, over a NATS broker.
//!
//! A server given a NATS URL (`Server::builder(name).nats(url)`, blocking or async)
//! also registers as a [NATS micro service]: service name = our name,
//! the default handler on subject `NAME`, each method on `NAME.<method>`, all in queue group
//! `q` (so several instances share the load), answering `$SRV.PING`, `$SRV.INFO` and
//! `$SRV.STATS` on all three subject levels with the same JSON as the local `$ping`, `$info` and
//! `$stats`. Standard NATS tooling (`nats micro ls`, nats.go, nats-py) sees and calls it; a
//! handler's error goes back with the headers `Nats-Service-Error` and
//! `Nats-Service-Error-Code`.
//!
//! A client given a NATS URL (`Client::builder(name).nats(url)`, or the environment variable
//! [`MICROCS_NATS_URL`](ENV_URL) for every client) calls a local instance when one is running and
//! goes over NATS otherwise; [`Transport`] forces one or the other. Errors keep their
//! [`ErrorKind`]: nobody serving the name is [`NoService`] at once, a payload
//! over the broker's `max_payload` is [`FrameTooLarge`] before anything is sent, no answer in
//! time is [`TimedOut`], a handler's error is [`Remote`] with its code and message.
//!
//! ```no_run
//! use microcs::{Client, Request, Server};
//!
//! // On one machine:
//! let handle = Server::builder("LIFE_GEN")
//!     .nats("nats://broker.example:4222")
//!     .bind()?
//!     .spawn(|req: Request| Ok::<_, microcs::RemoteError>(req.into_payload()))?;
//!
//! // On any machine (or set MICROCS_NATS_URL and keep `Client::connect("LIFE_GEN")`):
//! let mut client = Client::builder("LIFE_GEN").nats("nats://broker.example:4222").connect()?;
//! assert_eq!(client.request(b"ping")?, b"ping");
//! # drop(handle);
//! # Ok::<(), microcs::Error>(())
//! ```
//!
//! # Credentials and TLS
//!
//! User and password, a token or a `.creds` file come from [`NatsOptions`], from the URL
//! (`nats://user:password@host:4222` or `nats://token@host:4222`, percent-encoded where needed,
//! e.g. in [`MICROCS_NATS_URL`](ENV_URL)), or from the environment
//! ([`MICROCS_NATS_USER`](ENV_USER) + [`MICROCS_NATS_PASSWORD`](ENV_PASSWORD),
//! [`MICROCS_NATS_TOKEN`](ENV_TOKEN), [`MICROCS_NATS_CREDS`](ENV_CREDS)), in that order of
//! precedence — never from a command line where `ps` would show them (the `microcs` CLI refuses
//! a URL with credentials in it). `tls://` URLs use TLS (rustls); a private CA is given with
//! [`NatsOptions::root_certificate`] or [`MICROCS_NATS_CA`](ENV_CA).
//!
//! # Differences from a local call
//!
//! - A request that came over NATS has no kernel-checked caller: [`Request::peer`] reports
//!   [`NATS_PEER`] (pid 0, uid and gid `u32::MAX`, which no real process has). Authorise NATS
//!   callers with the broker's accounts and permissions.
//! - Our client sends its remaining time in the header [`HEADER_TIMEOUT`], so the handler sees a
//!   deadline; callers that do not (other NATS clients) give handlers no deadline.
//! - Cancellation does not cross the broker: a caller that gives up simply stops waiting.
//! - Over NATS a service is one of many instances; the client does not keep a connection to one.
//!
//! [NATS micro service]: https://github.com/nats-io/nats-architecture-and-design/blob/main/adr/ADR-32.md
//! [`NoService`]: crate::ErrorKind::NoService
//! [`FrameTooLarge`]: crate::ErrorKind::FrameTooLarge
//! [`TimedOut`]: crate::ErrorKind::TimedOut
//! [`Remote`]: crate::ErrorKind::Remote
//! [`Request::peer`]: crate::Request::peer

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::error::{Error, ErrorKind, Result};
use crate::request::Peer;

mod blocking;
mod call;
mod conn;
mod link;
mod list;
mod rt;
mod serve;
#[cfg(feature = "tokio")]
mod tokio;

pub use list::{list, list_async, list_stats, list_stats_async};

pub(crate) use blocking::{
    bind_nats as bind_blocking, start_nats as start_blocking, stop_nats as stop_blocking, wait_stopped,
};
pub(crate) use link::Link;
pub(crate) use serve::{Pending, Side};
#[cfg(feature = "tokio")]
pub(crate) use tokio::{bind_nats as bind_async, start_nats as start_async};

/// Environment variable with the NATS URL every client uses when its builder names none.
pub const ENV_URL: &str = "MICROCS_NATS_URL";
/// Environment variable with the NATS user name (with [`ENV_PASSWORD`]).
pub const ENV_USER: &str = "MICROCS_NATS_USER";
/// Environment variable with the NATS password (with [`ENV_USER`]).
pub const ENV_PASSWORD: &str = "MICROCS_NATS_PASSWORD";
/// Environment variable with a NATS authentication token.
pub const ENV_TOKEN: &str = "MICROCS_NATS_TOKEN";
/// Environment variable with the path of a NATS `.creds` file (JWT and NKey seed).
pub const ENV_CREDS: &str = "MICROCS_NATS_CREDS";
/// Environment variable with the path of a PEM file of CA certificates to trust for `tls://`.
pub const ENV_CA: &str = "MICROCS_NATS_CA";
/// Environment variable that forces every client's [`Transport`]: `auto`, `local` or `nats`.
pub const ENV_TRANSPORT: &str = "MICROCS_TRANSPORT";

/// Request header in which our client sends its remaining time, in milliseconds.
pub const HEADER_TIMEOUT: &str = "Microcs-Timeout";
/// Error header of the NATS micro protocol: the error's message.
pub const HEADER_ERROR: &str = "Nats-Service-Error";
/// Error header of the NATS micro protocol: the error's code.
pub const HEADER_ERROR_CODE: &str = "Nats-Service-Error-Code";
/// Error header with microcs's protocol flags ([`proto::FLAG_SYSTEM`](crate::proto::FLAG_SYSTEM),
/// [`proto::FLAG_NOT_RUN`](crate::proto::FLAG_NOT_RUN)), so that our client tells a library refusal
/// (payload too large, deadline already passed) from a handler's error, as it does locally.
pub const HEADER_FLAGS: &str = "Microcs-Flags";

/// What [`Request::peer`](crate::Request::peer) reports for a request that came over NATS: no
/// kernel vouches for a NATS caller, so pid 0 and uid/gid `u32::MAX` (`(uid_t)-1`), which no real
/// process has; a check such as `peer().uid == my_uid` therefore refuses NATS callers.
pub const NATS_PEER: Peer = Peer { pid: 0, uid: u32::MAX, gid: u32::MAX };

/// Default time to wait for the broker when connecting.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Which way a client reaches a service, or where a server serves.
///
/// | | client | server |
/// |---|---|---|
/// | `Auto` (default) | a local instance if one is running, else NATS (when a URL is set) | its local socket, plus NATS when a URL is set |
/// | `Local` | only a local instance; NATS settings are ignored | only its local socket |
/// | `Nats` | only NATS | only NATS: no local name is claimed, so several instances may run on one machine |
///
/// Clients also read [`MICROCS_TRANSPORT`](ENV_TRANSPORT) when their builder sets nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Transport {
    /// Local first, NATS otherwise (client); local and NATS (server).
    #[default]
    Auto,
    /// The local socket only.
    Local,
    /// NATS only.
    Nats,
}

impl Transport {
    /// Parses `auto`, `local` or `nats` (any case).
    ///
    /// # Errors
    ///
    /// [`ErrorKind::InvalidName`] naming the accepted values.
    pub fn parse(s: &str) -> Result<Transport> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" | "" => Ok(Transport::Auto),
            "local" => Ok(Transport::Local),
            "nats" => Ok(Transport::Nats),
            other => Err(Error::new(
                ErrorKind::InvalidName,
                format!("unknown transport {other:?}; use 'auto', 'local' or 'nats'"),
            )),
        }
    }

    /// `"auto"`, `"local"` or `"nats"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Auto => "auto",
            Transport::Local => "local",
            Transport::Nats => "nats",
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How to reach a NATS broker: URL, credentials, TLS.
///
/// Anything not set here is taken from the environment when the connection is made (see the
/// [module docs](self)); settings here win. Secrets are never shown by `Debug`.
///
/// # Examples
///
/// ```no_run
/// use microcs::nats::NatsOptions;
///
/// let opts = NatsOptions::new("tls://broker.example:4222")
///     .credentials_file("/etc/microcs/service.creds")
///     .root_certificate("/etc/microcs/ca.pem");
/// let mut client = microcs::Client::builder("LIFE_GEN").nats_options(opts).connect()?;
/// # Ok::<(), microcs::Error>(())
/// ```
#[derive(Clone, Default)]
pub struct NatsOptions {
    url: Option<String>,
    user: Option<String>,
    password: Option<String>,
    token: Option<String>,
    creds: Option<PathBuf>,
    root_ca: Option<PathBuf>,
    client_cert: Option<(PathBuf, PathBuf)>,
    require_tls: bool,
    connect_timeout: Option<Duration>,
}

impl NatsOptions {
    /// Options for the broker at `url` (`nats://host:4222`, `tls://host:4222`, or a
    /// comma-separated list of URLs of one cluster).
    pub fn new(url: &str) -> NatsOptions {
        NatsOptions { url: Some(url.to_owned()), ..NatsOptions::default() }
    }

    /// Options from the environment only (`MICROCS_NATS_*`); the URL is `None` when
    /// [`MICROCS_NATS_URL`](ENV_URL) is unset or empty.
    pub fn from_env() -> NatsOptions {
        NatsOptions::default().with_env()
    }

    /// The broker URL, if set.
    pub fn url(&self) -> Option<&str> {
        self.url.as_deref()
    }

    /// Sets the broker URL.
    pub fn set_url(mut self, url: &str) -> Self {
        self.url = Some(url.to_owned());
        self
    }

    /// Authenticates with a user name and password.
    pub fn user_password(mut self, user: &str, password: &str) -> Self {
        self.user = Some(user.to_owned());
        self.password = Some(password.to_owned());
        self
    }

    /// Authenticates with a token.
    pub fn token(mut self, token: &str) -> Self {
        self.token = Some(token.to_owned());
        self
    }

    /// Authenticates with a `.creds` file (a user JWT and its NKey seed), read when connecting.
    pub fn credentials_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.creds = Some(path.into());
        self
    }

    /// Trusts the CA certificates in this PEM file (besides the system's) for TLS.
    pub fn root_certificate(mut self, path: impl Into<PathBuf>) -> Self {
        self.root_ca = Some(path.into());
        self
    }

    /// Presents this client certificate and key (PEM files) when the broker asks for one.
    pub fn client_certificate(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.client_cert = Some((cert.into(), key.into()));
        self
    }

    /// Refuses to talk to the broker without TLS, even for a `nats://` URL.
    pub fn require_tls(mut self, yes: bool) -> Self {
        self.require_tls = yes;
        self
    }

    /// How long connecting to the broker may take (default 5 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = Some(timeout);
        self
    }

    /// Fills what is unset from the environment.
    pub(crate) fn with_env(mut self) -> NatsOptions {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        if self.url.is_none() {
            self.url = var(ENV_URL).map(|u| u.trim().to_owned());
        }
        let has_auth = self.user.is_some()
            || self.token.is_some()
            || self.creds.is_some()
            || self.url.as_deref().is_some_and(url_has_credentials);
        if !has_auth {
            if let (Some(u), Some(p)) = (var(ENV_USER), var(ENV_PASSWORD)) {
                self.user = Some(u);
                self.password = Some(p);
            } else if let Some(t) = var(ENV_TOKEN) {
                self.token = Some(t);
            } else if let Some(c) = var(ENV_CREDS) {
                self.creds = Some(c.into());
            }
        }
        if self.root_ca.is_none() {
            self.root_ca = var(ENV_CA).map(PathBuf::from);
        }
        self
    }

    /// The URL for messages: without a password that may be written in it.
    pub(crate) fn display_url(&self) -> String {
        self.url.as_deref().map(redact_url).unwrap_or_else(|| "(no NATS URL)".to_owned())
    }
}

impl fmt::Debug for NatsOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let set = |o: &Option<String>| o.as_ref().map(|_| "<set>");
        f.debug_struct("NatsOptions")
            .field("url", &self.url.as_deref().map(redact_url))
            .field("user", &self.user)
            .field("password", &set(&self.password))
            .field("token", &set(&self.token))
            .field("creds", &self.creds)
            .field("root_ca", &self.root_ca)
            .field("client_cert", &self.client_cert)
            .field("require_tls", &self.require_tls)
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

/// Credentials written in a URL (the first of a list that has any).
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum UrlAuth {
    UserPassword(String, String),
    Token(String),
}

/// One URL of a list split into its scheme (with `://`, or empty), the userinfo before its last
/// `@` (if any), and the rest from the host on. NATS URLs have no paths, so everything up to the
/// last `@` is taken as userinfo: a password or token with `/`, `?` or `#` in it works unencoded,
/// and is masked in messages either way.
fn split_userinfo(u: &str) -> (&str, Option<&str>, &str) {
    let u = u.trim();
    let (scheme, rest) = match u.find("://") {
        Some(i) => u.split_at(i + 3),
        None => ("", u),
    };
    match rest.rfind('@') {
        Some(at) => (scheme, Some(&rest[..at]), &rest[at + 1..]),
        None => (scheme, None, rest),
    }
}

/// The credentials in `url` (`scheme://user:password@host` or `scheme://token@host`,
/// percent-decoded), if any.
///
/// # Errors
///
/// A message (without the secret) when the userinfo is not valid percent-encoding of UTF-8.
pub(crate) fn url_credentials(url: &str) -> std::result::Result<Option<UrlAuth>, String> {
    let Some(auth) = url.split(',').find_map(|u| split_userinfo(u).1.filter(|a| !a.is_empty())) else {
        return Ok(None);
    };
    let bad = || {
        "the credentials in the NATS URL are not valid percent-encoding (write % as %25 and , as %2C)"
            .to_owned()
    };
    Ok(Some(match auth.split_once(':') {
        Some((user, password)) => UrlAuth::UserPassword(
            percent_decode(user).ok_or_else(bad)?,
            percent_decode(password).ok_or_else(bad)?,
        ),
        None => UrlAuth::Token(percent_decode(auth).ok_or_else(bad)?),
    }))
}

/// Whether any URL of the comma-separated list `url` has a user, password or token written in
/// it (`nats://user:password@host`, `nats://token@host`).
///
/// ```
/// assert!(microcs::nats::url_has_credentials("nats://h1:4222,nats://me:secret@h2:4222"));
/// assert!(!microcs::nats::url_has_credentials("tls://broker.example:4222"));
/// ```
pub fn url_has_credentials(url: &str) -> bool {
    url.split(',').any(|u| split_userinfo(u).1.is_some())
}

/// `url` (each of a list) without the credentials written in it.
pub(crate) fn strip_credentials(url: &str) -> String {
    url.split(',')
        .map(|u| {
            let (scheme, _, host) = split_userinfo(u);
            format!("{scheme}{host}")
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// `%XX` escapes decoded; `None` for a malformed escape or bytes that are not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b.get(i + 1..i + 3).filter(|h| h.iter().all(u8::is_ascii_hexdigit))?;
            out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// A URL for display: `nats://user:secret@host` → `nats://user:***@host`, `nats://token@host`
/// → `nats://***@host`, for each URL of a comma-separated list. Every message and `Debug` output
/// of this crate shows URLs this way.
///
/// ```
/// use microcs::nats::redact_url;
/// assert_eq!(redact_url("nats://me:secret@h:4222"), "nats://me:***@h:4222");
/// assert_eq!(redact_url("nats://tok@h1,tls://h2"), "nats://***@h1,tls://h2");
/// ```
pub fn redact_url(url: &str) -> String {
    // A `,` written unencoded in a password splits the list in the wrong place
    // (`nats://u:p,w@h`): with an `@` in it and entries both with and without a scheme, the
    // list is masked as one URL, so no part of the secret shows.
    let entries: Vec<&str> = url.split(',').collect();
    let schemes = entries.iter().filter(|u| u.contains("://")).count();
    if url.contains('@') && schemes > 0 && schemes < entries.len() {
        let (scheme, _, host) = split_userinfo(url);
        return format!("{scheme}***@{host}");
    }
    url.split(',')
        .map(|u| match split_userinfo(u) {
            (scheme, Some(auth), host) => {
                let masked = auth.split_once(':').map_or("***".to_owned(), |(user, _)| format!("{user}:***"));
                format!("{scheme}{masked}@{host}")
            }
            (_, None, _) => u.trim().to_owned(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The NATS options of both client builders (field `nats`, a [`ClientConfig`]), expanded inside
/// each flavour's `impl ClientBuilder`.
macro_rules! nats_client_options {
    () => {
        /// Also reaches the service over the NATS broker at `url` when no local instance is
        /// running (see [`Transport`](crate::nats::Transport)). Without this, the URL comes from
        /// [`MICROCS_NATS_URL`](crate::nats::ENV_URL) when set.
        pub fn nats(mut self, url: &str) -> Self {
            self.nats.options = std::mem::take(&mut self.nats.options).set_url(url);
            self
        }

        /// NATS URL, credentials and TLS settings (see [`NatsOptions`](crate::nats::NatsOptions)).
        pub fn nats_options(mut self, options: crate::nats::NatsOptions) -> Self {
            self.nats.options = options;
            self
        }

        /// Local first (default), local only, or NATS only; see
        /// [`Transport`](crate::nats::Transport). Without this,
        /// [`MICROCS_TRANSPORT`](crate::nats::ENV_TRANSPORT) decides when set.
        pub fn transport(mut self, transport: crate::nats::Transport) -> Self {
            self.nats.transport = Some(transport);
            self
        }
    };
}
pub(crate) use nats_client_options;

/// The NATS options of both server builders (field `nats`), expanded inside each flavour's
/// `impl ServerBuilder`.
macro_rules! nats_server_options {
    () => {
        /// Also serves as a NATS micro service on the broker at `url` (see the
        /// [`nats` module](crate::nats)). The name must be a valid NATS micro service name
        /// (letters, digits, `-`, `_`: no dots) and the version SemVer; the broker is connected
        /// by `bind`, so a wrong URL or credentials fail there.
        pub fn nats(mut self, url: &str) -> Self {
            let opts = self.nats.options.take().unwrap_or_default().set_url(url);
            self.nats.options = Some(opts);
            self
        }

        /// NATS URL, credentials and TLS settings for serving on NATS (see
        /// [`NatsOptions`](crate::nats::NatsOptions)).
        pub fn nats_options(mut self, options: crate::nats::NatsOptions) -> Self {
            self.nats.options = Some(options);
            self
        }

        /// Serve on the local socket and NATS (default, NATS only when a URL is set), the local
        /// socket only, or NATS only (no local name is claimed, so several instances can run on
        /// one machine); see [`Transport`](crate::nats::Transport).
        pub fn transport(mut self, transport: crate::nats::Transport) -> Self {
            self.nats.transport = transport;
            self
        }
    };
}
pub(crate) use nats_server_options;

/// NATS settings of a client builder (blocking or async).
#[derive(Debug, Clone, Default)]
pub(crate) struct ClientConfig {
    pub options: NatsOptions,
    pub transport: Option<Transport>,
}

impl ClientConfig {
    /// The options to use, with the environment applied; `None` when this client is local only
    /// (no URL anywhere, or transport `Local`).
    pub(crate) fn resolve(self) -> Result<Option<(NatsOptions, Transport)>> {
        let transport = match self.transport {
            Some(t) => t,
            None => match std::env::var(ENV_TRANSPORT) {
                Ok(v) => Transport::parse(&v).map_err(|e| {
                    Error::new(ErrorKind::InvalidName, format!("{ENV_TRANSPORT}: {}", e.message()))
                })?,
                Err(_) => Transport::Auto,
            },
        };
        if transport == Transport::Local {
            return Ok(None);
        }
        let options = self.options.with_env();
        if options.url.is_none() {
            if transport == Transport::Nats {
                return Err(Error::new(
                    ErrorKind::InvalidName,
                    format!("transport 'nats' needs a NATS URL: use .nats(url) or set {ENV_URL}"),
                ));
            }
            return Ok(None);
        }
        Ok(Some((options, transport)))
    }
}

/// NATS settings of a server builder (blocking or async).
#[derive(Debug, Clone, Default)]
pub(crate) struct ServerConfig {
    pub options: Option<NatsOptions>,
    pub transport: Transport,
}

impl ServerConfig {
    /// The options to serve with (environment applied for credentials), `None` when this server
    /// serves locally only. Servers never take the URL from the environment: a service goes on a
    /// broker only when its code says so.
    pub(crate) fn resolve(&self) -> Result<Option<NatsOptions>> {
        match (&self.options, self.transport) {
            (_, Transport::Local) => Ok(None),
            (None, Transport::Nats) => Err(Error::new(
                ErrorKind::InvalidName,
                "transport 'nats' needs a NATS URL: use .nats(url) on the server builder",
            )),
            (None, _) => Ok(None),
            (Some(o), _) => {
                let url = o.url.clone();
                let mut o = o.clone().with_env();
                o.url = url; // the environment's URL is for clients only
                if o.url.as_deref().is_none_or(|u| u.trim().is_empty()) {
                    return Err(Error::new(ErrorKind::InvalidName, "the NATS URL is empty"));
                }
                Ok(Some(o))
            }
        }
    }

    /// True when the server claims no local name.
    pub(crate) fn nats_only(&self) -> bool {
        self.transport == Transport::Nats
    }
}

/// Checks that a service name can be a NATS micro service name (`^[A-Za-z0-9_-]+$`: no dots),
/// and that methods can be endpoint names.
pub(crate) fn check_micro_names(name: &str, methods: &[String]) -> Result<()> {
    let ok =
        |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !ok(name) {
        return Err(Error::new(
            ErrorKind::InvalidName,
            format!(
                "the name '{name}' cannot be served on NATS: a NATS micro service name may contain only \
                 letters, digits, '-' and '_' (no dots); pick such a name to serve it on NATS"
            ),
        ));
    }
    if let Some(m) = methods.iter().find(|m| !ok(m)) {
        return Err(Error::new(
            ErrorKind::InvalidName,
            format!(
                "method '{m}' of service '{name}' cannot be served on NATS: a NATS micro endpoint name may \
                 contain only letters, digits, '-' and '_' (no dots)"
            ),
        ));
    }
    Ok(())
}

/// Checks that a version is SemVer 2.0 (NATS micro requires it).
pub(crate) fn check_semver(version: &str) -> Result<()> {
    if is_semver(version) {
        return Ok(());
    }
    Err(Error::new(
        ErrorKind::InvalidName,
        format!(
            "version {version:?} is not SemVer (MAJOR.MINOR.PATCH, e.g. 1.2.0), which NATS micro services \
             require; fix .version() to serve on NATS"
        ),
    ))
}

fn is_semver(v: &str) -> bool {
    let (v, build) = match v.split_once('+') {
        Some((v, b)) => (v, Some(b)),
        None => (v, None),
    };
    let (core, pre) = match v.split_once('-') {
        Some((c, p)) => (c, Some(p)),
        None => (v, None),
    };
    let numeric =
        |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'));
    let ident = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    let parts: Vec<&str> = core.split('.').collect();
    if parts.len() != 3 || !parts.iter().all(|p| numeric(p)) {
        return false;
    }
    if let Some(pre) = pre {
        let valid =
            pre.split('.').all(|id| ident(id) && (!id.bytes().all(|b| b.is_ascii_digit()) || numeric(id)));
        if !valid {
            return false;
        }
    }
    build.is_none_or(|b| b.split('.').all(ident))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn semver() {
        for ok in [
            "0.1.0",
            "1.2.3",
            "10.20.30",
            "1.0.0-alpha",
            "1.0.0-alpha.1",
            "1.0.0-0.3.7",
            "1.0.0+20130313144700",
            "1.0.0-beta+exp.sha.5114f85",
        ] {
            assert!(is_semver(ok), "{ok}");
        }
        for bad in [
            "",
            "1",
            "1.2",
            "1.2.3.4",
            "01.2.3",
            "1.02.3",
            "1.2.3-",
            "1.2.3-01",
            "1.2.3+",
            "v1.2.3",
            "1.2.x",
            "1.2.3-a..b",
        ] {
            assert!(!is_semver(bad), "{bad}");
        }
    }

    #[test]
    fn micro_names() {
        assert!(check_micro_names("LIFE_GEN", &["step".into(), "a-b_c".into()]).is_ok());
        let e = check_micro_names("org.example", &[]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidName);
        assert!(e.to_string().contains("no dots"), "{e}");
        let e = check_micro_names("X", &["v1.step".into()]).unwrap_err();
        assert!(e.to_string().contains("method 'v1.step'"), "{e}");
    }

    #[test]
    fn transport_parse() {
        assert_eq!(Transport::parse("NATS").unwrap(), Transport::Nats);
        assert_eq!(Transport::parse(" local ").unwrap(), Transport::Local);
        assert_eq!(Transport::parse("auto").unwrap(), Transport::Auto);
        assert_eq!(Transport::parse("tcp").unwrap_err().kind(), ErrorKind::InvalidName);
    }

    #[test]
    fn urls_are_redacted() {
        assert_eq!(redact_url("nats://u:secret@h:4222"), "nats://u:***@h:4222");
        assert_eq!(redact_url("nats://tok@h:4222,nats://h2"), "nats://***@h:4222,nats://h2");
        assert_eq!(redact_url("tls://h:4222"), "tls://h:4222");
        assert_eq!(redact_url("nats://h/path@x"), "nats://***@x", "conservative: all before the last @");
        assert_eq!(redact_url("u:secret@h"), "u:***@h");
    }

    #[test]
    fn credentials_in_urls() {
        let creds = |u: &str| url_credentials(u).unwrap();
        assert_eq!(creds("nats://h:4222"), None);
        assert_eq!(
            creds("nats://svc:p%40ss%3Aw0rd@h:4222"),
            Some(UrlAuth::UserPassword("svc".into(), "p@ss:w0rd".into()))
        );
        assert_eq!(creds("nats://h1:4222, tls://tok%2F1@h2:4222"), Some(UrlAuth::Token("tok/1".into())));
        assert_eq!(
            creds("nats://u:Pa/ss?w#rd@h"),
            Some(UrlAuth::UserPassword("u".into(), "Pa/ss?w#rd".into()))
        );
        assert_eq!(creds("nats://u:p@ss@[::1]:4222"), Some(UrlAuth::UserPassword("u".into(), "p@ss".into())));
        assert_eq!(creds("nats://@h"), None, "empty userinfo is no credential");
        for bad in ["nats://u:50%off@h", "nats://u:%+f@h", "nats://u:%zz@h"] {
            let e = url_credentials(bad).unwrap_err();
            assert!(!e.contains("off") && e.contains("percent-encoding"), "{e}");
        }
        assert_eq!(strip_credentials("nats://u:p@h:4222,tls://t@h2"), "nats://h:4222,tls://h2");
        assert_eq!(strip_credentials("h:4222"), "h:4222");
        assert_eq!(strip_credentials("nats://u:Pa/ss@h:4222"), "nats://h:4222");
        assert!(url_has_credentials("nats://dG9r/ZW4+c2VjcmV0@127.0.0.1:4999"));
        assert!(!url_has_credentials("nats://h1, nats://h2"));
    }

    #[test]
    fn no_part_of_a_secret_is_shown() {
        for (url, secret) in [
            ("nats://dG9r/ZW4+c2VjcmV0@127.0.0.1:4999", "ZW4"),
            ("nats://u:Pa/ssw0rd@h:4222", "ssw0rd"),
            ("nats://u:p,w@h", "p"),
            ("nats://u:s3cr,et@h:4222,nats://h2", "s3cr"),
        ] {
            let shown = redact_url(url);
            assert!(!shown.contains(secret) && shown.contains("***"), "{url} -> {shown}");
        }
    }
}
