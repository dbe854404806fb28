//! Opening a connection to the broker, and what its failures mean.

use std::time::Duration;

use async_nats::{ConnectErrorKind, ConnectOptions, Event};

use super::{DEFAULT_CONNECT_TIMEOUT, NatsOptions};
use crate::error::{Error, ErrorKind, Result};

/// Connects to the broker of `opts` (its URL must be set). `label` names the connection in the
/// broker's monitoring (`microcs client NAME`, `microcs server NAME`).
pub(crate) async fn connect(opts: &NatsOptions, label: &str) -> Result<async_nats::Client> {
    let written = opts.url.as_deref().unwrap_or_default().trim();
    // Credentials written in the URL are ours to apply (the client library does not read them),
    // after any given as options.
    let from_url =
        super::url_credentials(written).map_err(|why| Error::new(ErrorKind::InvalidConfig, why))?;
    let url = super::strip_credentials(written);
    let shown = opts.display_url();
    let mut co = ConnectOptions::new()
        .name(label)
        .connection_timeout(opts.connect_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT))
        // Requests carry their own timeout; this one is only a fallback.
        .request_timeout(Some(crate::proto::client_conn::DEFAULT_TIMEOUT))
        // After losing the broker, try again at once, then back off up to 2 s (the library's
        // default goes to 4 s): a restarted broker is found again quickly.
        .reconnect_delay_callback(|attempts| {
            if attempts <= 1 {
                Duration::ZERO
            } else {
                Duration::from_millis(10u64 << (attempts - 1).min(8)).min(Duration::from_secs(2))
            }
        })
        .event_callback({
            let shown = shown.clone();
            let label = label.to_owned();
            move |event| {
                let (shown, label) = (shown.clone(), label.clone());
                async move {
                    match event {
                        Event::Connected => tracing::debug!(url = %shown, %label, "connected to NATS"),
                        Event::Disconnected => {
                            tracing::warn!(url = %shown, %label, "lost the NATS connection; reconnecting")
                        }
                        Event::SlowConsumer(sid) => {
                            tracing::warn!(url = %shown, %label, sid, "NATS slow consumer: messages dropped")
                        }
                        other => tracing::debug!(url = %shown, %label, event = %other, "NATS event"),
                    }
                }
            }
        });
    if let (Some(u), Some(p)) = (&opts.user, &opts.password) {
        co = co.user_and_password(u.clone(), p.clone());
    }
    if let Some(t) = &opts.token {
        co = co.token(t.clone());
    }
    if opts.user.is_none() && opts.token.is_none() && opts.creds.is_none() {
        match from_url {
            Some(super::UrlAuth::UserPassword(u, p)) => co = co.user_and_password(u, p),
            Some(super::UrlAuth::Token(t)) => co = co.token(t),
            None => {}
        }
    }
    if let Some(path) = &opts.creds {
        co = co.credentials_file(path).await.map_err(|e| {
            Error::new(
                ErrorKind::PermissionDenied,
                format!("cannot use the NATS credentials file {}: {e}", path.display()),
            )
            .with_source(e)
        })?;
    }
    if let Some(ca) = &opts.root_ca {
        if !ca.is_file() {
            return Err(Error::new(
                ErrorKind::Io,
                format!("the CA certificate file {} for NATS does not exist", ca.display()),
            ));
        }
        co = co.add_root_certificates(ca.clone());
    }
    if let Some((cert, key)) = &opts.client_cert {
        co = co.add_client_certificate(cert.clone(), key.clone());
    }
    if opts.require_tls {
        co = co.require_tls(true);
    }
    co.connect(url.as_str()).await.map_err(|e| {
        let (kind, why) = match e.kind() {
            ConnectErrorKind::ServerParse => (ErrorKind::InvalidConfig, "the URL is not valid"),
            ConnectErrorKind::Dns => (ErrorKind::Io, "its host name does not resolve"),
            ConnectErrorKind::Authentication | ConnectErrorKind::AuthorizationViolation => (
                ErrorKind::PermissionDenied,
                "it refused our credentials (given as options, in the URL, or in MICROCS_NATS_USER/PASSWORD/TOKEN/CREDS)",
            ),
            ConnectErrorKind::TimedOut => (ErrorKind::TimedOut, "it did not answer in time"),
            ConnectErrorKind::Tls => (ErrorKind::Io, "the TLS handshake failed"),
            _ => (ErrorKind::Io, "is nats-server running there and reachable?"),
        };
        Error::new(kind, format!("cannot connect to the NATS server at {shown}: {why} ({e})")).with_source(e)
    })
}
