//! The client side over NATS: one request, its subject, headers and the errors it can end in.

use std::time::Duration;

use async_nats::connection::State;
use async_nats::{HeaderMap, RequestErrorKind};
use bytes::Bytes;

use super::{HEADER_ERROR, HEADER_ERROR_CODE, HEADER_FLAGS, HEADER_TIMEOUT, NatsOptions, conn};
use crate::error::{Error, ErrorKind, Result};
use crate::name::Name;
use crate::proto::status;

/// A connection to the broker for calling one service name.
#[derive(Clone)]
pub(crate) struct Caller {
    pub client: async_nats::Client,
    pub name: Name,
    /// The broker URL, for messages (password removed).
    pub url: String,
}

impl std::fmt::Debug for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Caller").field("name", &self.name).field("url", &self.url).finish_non_exhaustive()
    }
}

impl Caller {
    pub(crate) async fn connect(opts: &NatsOptions, name: Name) -> Result<Caller> {
        let client = conn::connect(opts, &format!("microcs client {name}")).await?;
        Ok(Caller { client, name, url: opts.display_url() })
    }

    /// The subject a method goes to: the name for the default handler, `NAME.method` for a
    /// method, `$SRV.X.NAME` for the built-in ones (any one instance answers).
    fn subject(&self, method: &str) -> String {
        let name = &self.name;
        match method {
            "" => name.to_string(),
            "$ping" => format!("$SRV.PING.{name}"),
            "$info" => format!("$SRV.INFO.{name}"),
            "$stats" => format!("$SRV.STATS.{name}"),
            m => format!("{name}.{m}"),
        }
    }

    /// Sends one request and waits for its reply, at most `timeout`.
    pub(crate) async fn call(&self, method: &str, payload: &[u8], timeout: Duration) -> Result<Vec<u8>> {
        let name = &self.name;
        let subject = self.subject(method);
        let mut headers = HeaderMap::new();
        headers.insert(HEADER_TIMEOUT, timeout_ms(timeout).to_string().as_str());
        // The broker refuses a message over its max_payload (headers included); say so now
        // instead of letting the request time out.
        let max = self.client.max_payload();
        let size = payload.len() + headers_wire_len(&headers);
        if size > max {
            return Err(Error::new(
                ErrorKind::FrameTooLarge,
                format!(
                    "payload of {} bytes is over the NATS server's max_payload of {max} bytes ({}); nothing was sent",
                    payload.len(),
                    self.url
                ),
            ));
        }
        let request = async_nats::Request::new()
            .payload(Bytes::copy_from_slice(payload))
            .headers(headers)
            .timeout(Some(timeout));
        let reply = match self.client.send_request(subject.clone(), request).await {
            Ok(m) => m,
            Err(e) => return Err(self.request_error(e, method, timeout)),
        };
        if let Some(h) = &reply.headers {
            if let Some(code) = h.get(HEADER_ERROR_CODE) {
                let code = code.as_str().trim().parse::<u16>().unwrap_or(status::HANDLER_FAILED);
                let message = h.get(HEADER_ERROR).map(|v| v.as_str().to_owned()).unwrap_or_default();
                let flags =
                    h.get(HEADER_FLAGS).and_then(|v| v.as_str().trim().parse::<u16>().ok()).unwrap_or(0);
                return Err(Error::from_remote(name.as_str(), code, flags, message));
            }
        }
        Ok(reply.payload.to_vec())
    }

    fn request_error(&self, e: async_nats::RequestError, method: &str, timeout: Duration) -> Error {
        let name = &self.name;
        let url = &self.url;
        let what = if method.is_empty() { String::new() } else { format!(" (method '{method}')") };
        match e.kind() {
            RequestErrorKind::NoResponders => Error::new(
                ErrorKind::NoService,
                format!("no service named '{name}' is answering on NATS at {url}{what}"),
            ),
            RequestErrorKind::TimedOut => {
                let down = self.client.connection_state() != State::Connected;
                let why =
                    if down { "; the connection to the NATS server is down (reconnecting)" } else { "" };
                Error::new(
                    ErrorKind::TimedOut,
                    format!(
                        "service '{name}' did not answer within {timeout:?} over NATS at {url}{what}{why}; \
                         the request may have run"
                    ),
                )
                .set_may_have_run(true)
            }
            RequestErrorKind::MaxPayloadExceeded => Error::new(
                ErrorKind::FrameTooLarge,
                format!("the request is over the NATS server's max_payload ({url}); nothing was sent: {e}"),
            ),
            RequestErrorKind::InvalidSubject => Error::new(
                ErrorKind::InvalidName,
                format!("'{}' is not a valid NATS subject: {e}", self.subject(method)),
            ),
            _ => Error::new(
                ErrorKind::Closed,
                format!("the request to service '{name}' over NATS at {url} failed: {e}"),
            )
            .set_may_have_run(true),
        }
        .with_source(e)
    }
}

/// Bytes the headers take on the wire (`NATS/1.0\r\n`, `Key: value\r\n` each, `\r\n`).
fn headers_wire_len(h: &HeaderMap) -> usize {
    let mut n = "NATS/1.0\r\n\r\n".len();
    for (k, vs) in h.iter() {
        for v in vs {
            n += AsRef::<str>::as_ref(k).len() + 2 + v.as_str().len() + 2;
        }
    }
    n
}

/// A timeout as whole milliseconds, rounded up, at least 1 (as the local frame's deadline).
fn timeout_ms(t: Duration) -> u64 {
    u64::try_from(t.as_micros().div_ceil(1000)).unwrap_or(u64::MAX).max(1)
}
