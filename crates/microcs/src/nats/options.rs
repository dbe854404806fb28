//! How to reach a NATS broker: [`NatsOptions`] (URL, credentials, TLS) and the parsing,
//! masking and stripping of credentials written in a URL.

use super::{ENV_CA, ENV_CREDS, ENV_PASSWORD, ENV_TOKEN, ENV_URL, ENV_USER};
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// How to reach a NATS broker: URL, credentials, TLS.
///
/// Anything not set here is taken from the environment when the connection is made (see the
/// [module docs](crate::nats)); settings here win. Secrets are never shown by `Debug`.
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
    pub(super) url: Option<String>,
    pub(super) user: Option<String>,
    pub(super) password: Option<String>,
    pub(super) token: Option<String>,
    pub(super) creds: Option<PathBuf>,
    pub(super) root_ca: Option<PathBuf>,
    pub(super) client_cert: Option<(PathBuf, PathBuf)>,
    pub(super) require_tls: bool,
    pub(super) connect_timeout: Option<Duration>,
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

#[cfg(test)]
mod tests {
    use super::*;

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
