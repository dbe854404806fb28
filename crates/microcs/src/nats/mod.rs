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
use std::time::Duration;

use crate::error::{Error, ErrorKind, Result};
use crate::request::Peer;

mod blocking;
mod call;
mod conn;
mod link;
mod list;
mod options;
mod rt;
mod serve;
#[cfg(feature = "tokio")]
mod tokio;

pub use list::{list, list_async, list_stats, list_stats_async};
pub use options::{NatsOptions, redact_url, url_has_credentials};
pub(crate) use options::{UrlAuth, strip_credentials, url_credentials};

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
    /// [`ErrorKind::InvalidConfig`] naming the accepted values.
    pub fn parse(s: &str) -> Result<Transport> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" | "" => Ok(Transport::Auto),
            "local" => Ok(Transport::Local),
            "nats" => Ok(Transport::Nats),
            other => Err(Error::new(
                ErrorKind::InvalidConfig,
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
                    Error::new(ErrorKind::InvalidConfig, format!("{ENV_TRANSPORT}: {}", e.message()))
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
                    ErrorKind::InvalidConfig,
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
                ErrorKind::InvalidConfig,
                "transport 'nats' needs a NATS URL: use .nats(url) on the server builder",
            )),
            (None, _) => Ok(None),
            (Some(o), _) => {
                let url = o.url.clone();
                let mut o = o.clone().with_env();
                o.url = url; // the environment's URL is for clients only
                if o.url.as_deref().is_none_or(|u| u.trim().is_empty()) {
                    return Err(Error::new(ErrorKind::InvalidConfig, "the NATS URL is empty"));
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
        ErrorKind::InvalidConfig,
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
        assert_eq!(Transport::parse("tcp").unwrap_err().kind(), ErrorKind::InvalidConfig);
    }
}
