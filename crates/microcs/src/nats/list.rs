//! Discovery: which NATS micro services answer on a broker (for `microcs ls --nats`).

use std::pin::Pin;
use std::time::Duration;

use futures_core::Stream;
use serde::de::DeserializeOwned;
use tokio::time::Instant;

use super::{NatsOptions, conn, rt};
use crate::error::{Error, ErrorKind, Result};
use crate::micro::{INFO_TYPE, InfoResponse, STATS_TYPE, StatsResponse};

/// After the first answer, how long to wait for more before concluding everyone has answered.
const QUIET: Duration = Duration::from_millis(150);

/// Lists the NATS micro services on the broker of `options` (microcs services and any other),
/// one entry per running instance, sorted by name then instance id: their `$SRV.INFO` answers,
/// gathered for at most `wait`. Blocking; runs on the internal NATS runtime.
///
/// `name`: only instances of this service (`$SRV.INFO.NAME`), else all (`$SRV.INFO`).
/// Answers that are not valid `io.nats.micro.v1.info_response` JSON are skipped.
///
/// # Errors
///
/// The broker cannot be reached (an error naming the URL), its credentials are refused
/// ([`ErrorKind::PermissionDenied`]), or no URL was given nor set in
/// [`MICROCS_NATS_URL`](super::ENV_URL) ([`ErrorKind::InvalidConfig`]).
///
/// # Examples
///
/// ```no_run
/// use std::time::Duration;
/// let opts = microcs::nats::NatsOptions::new("nats://127.0.0.1:4222");
/// for s in microcs::nats::list(&opts, None, Duration::from_secs(1))? {
///     println!("{} {} {} ({} endpoints)", s.name, s.version, s.id, s.endpoints.len());
/// }
/// # Ok::<(), microcs::Error>(())
/// ```
pub fn list(options: &NatsOptions, name: Option<&str>, wait: Duration) -> Result<Vec<InfoResponse>> {
    let options = options.clone();
    let name = name.map(str::to_owned);
    rt::run(async move { list_async(&options, name.as_deref(), wait).await })?
}

/// [`list`] for async code (on any tokio runtime).
///
/// # Errors
///
/// As [`list`].
pub async fn list_async(
    options: &NatsOptions,
    name: Option<&str>,
    wait: Duration,
) -> Result<Vec<InfoResponse>> {
    gather(options, "INFO", name, wait).await
}

/// The `$SRV.STATS` answers of the NATS micro services on the broker of `options`, one per
/// running instance, sorted by name then instance id, gathered for at most `wait`: [`list`]
/// with each instance's counters and start time instead of its description (`microcs ls
/// --nats` asks both at once). Blocking; runs on the internal NATS runtime.
///
/// # Errors
///
/// As [`list`].
pub fn list_stats(options: &NatsOptions, name: Option<&str>, wait: Duration) -> Result<Vec<StatsResponse>> {
    let options = options.clone();
    let name = name.map(str::to_owned);
    rt::run(async move { list_stats_async(&options, name.as_deref(), wait).await })?
}

/// [`list_stats`] for async code (on any tokio runtime).
///
/// # Errors
///
/// As [`list`].
pub async fn list_stats_async(
    options: &NatsOptions,
    name: Option<&str>,
    wait: Duration,
) -> Result<Vec<StatsResponse>> {
    gather(options, "STATS", name, wait).await
}

/// A `$SRV` answer that discovery collects.
trait Answer: DeserializeOwned {
    /// The `type` the schema requires.
    const TYPE: &'static str;
    /// `(type, name, id)`.
    fn key(&self) -> (&str, &str, &str);
}

impl Answer for InfoResponse {
    const TYPE: &'static str = INFO_TYPE;
    fn key(&self) -> (&str, &str, &str) {
        (&self.kind, &self.name, &self.id)
    }
}

impl Answer for StatsResponse {
    const TYPE: &'static str = STATS_TYPE;
    fn key(&self) -> (&str, &str, &str) {
        (&self.kind, &self.name, &self.id)
    }
}

/// Sends one `$SRV.<verb>[.NAME]` request and collects the distinct valid answers.
async fn gather<T: Answer>(
    options: &NatsOptions,
    verb: &str,
    name: Option<&str>,
    wait: Duration,
) -> Result<Vec<T>> {
    let options = options.clone().with_env();
    if options.url().is_none() {
        return Err(Error::new(
            ErrorKind::InvalidConfig,
            format!("no NATS URL to list services from: pass one or set {}", super::ENV_URL),
        ));
    }
    let client = conn::connect(&options, "microcs ls").await?;
    let subject = match name {
        Some(n) => format!("$SRV.{verb}.{n}"),
        None => format!("$SRV.{verb}"),
    };
    let io = |e: &dyn std::fmt::Display| {
        Error::new(
            ErrorKind::Io,
            format!("listing services on the NATS server at {} failed: {e}", options.display_url()),
        )
    };
    let inbox = client.new_inbox();
    let mut sub = client.subscribe(inbox.clone()).await.map_err(|e| io(&e))?;
    client.publish_with_reply(subject, inbox, bytes::Bytes::new()).await.map_err(|e| io(&e))?;
    client.flush().await.map_err(|e| io(&e))?;
    let end = Instant::now() + wait;
    let mut until = end;
    let mut out: Vec<T> = Vec::new();
    loop {
        let next = std::future::poll_fn(|cx| Pin::new(&mut sub).poll_next(cx));
        let msg = match tokio::time::timeout_at(until, next).await {
            Ok(Some(m)) => m,
            Ok(None) | Err(_) => break,
        };
        if msg.status.is_some() {
            continue; // "no responders" and other status messages carry no service
        }
        match serde_json::from_slice::<T>(&msg.payload) {
            Ok(answer) if answer.key().0 == T::TYPE => {
                let (_, name, id) = answer.key();
                if !out.iter().any(|o| o.key().2 == id && o.key().1 == name) {
                    out.push(answer);
                }
            }
            Ok(_) | Err(_) => tracing::debug!("skipped an answer to $SRV.{verb} that is not a {}", T::TYPE),
        }
        until = end.min(Instant::now() + QUIET);
    }
    let _ = sub.unsubscribe().await;
    out.sort_by(|a, b| (a.key().1, a.key().2).cmp(&(b.key().1, b.key().2)));
    Ok(out)
}
