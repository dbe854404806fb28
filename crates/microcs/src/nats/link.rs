//! A client's NATS side, the same for both flavours: the broker connection (made on first use)
//! and the choice, per request, between a local instance and NATS.
//!
//! The clients ask [`Link`] what to do and do the local part themselves; this module knows
//! nothing of their types. With [`Transport::Auto`], a request goes to a local instance when one
//! is connected, or when it is time to look for one again (every [`PROBE_EVERY`] while on
//! NATS), and to NATS when there is none; a local try that finds no service has not run, so
//! sending it over NATS then is safe.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::call::Caller;
use super::{ClientConfig, NatsOptions, Transport, rt};
use crate::error::{Error, Result};
use crate::fork;
use crate::name::Name;

/// How often a client on NATS looks again for a local instance (local first: one that starts
/// later is used from then on).
pub(crate) const PROBE_EVERY: Duration = Duration::from_secs(1);

/// A client's NATS state; shared by the clones of an async client.
#[derive(Debug)]
pub(crate) struct Link {
    options: NatsOptions,
    transport: Transport,
    /// Connected on first use over NATS.
    caller: tokio::sync::OnceCell<Caller>,
    /// When a local instance was last looked for while on NATS.
    probed: Mutex<Option<Instant>>,
    /// The process that made it ([`fork::current`]): its broker connection is that process's.
    owner: u32,
}

impl Link {
    /// `None` when this client is local only.
    pub(crate) fn new(config: ClientConfig) -> Result<Option<Link>> {
        Ok(config.resolve()?.map(|(options, transport)| Link {
            options,
            transport,
            caller: tokio::sync::OnceCell::new(),
            probed: Mutex::new(None),
            owner: fork::current(),
        }))
    }

    /// Whether this process made the link (false in a child after `fork()`).
    pub(crate) fn is_current(&self) -> bool {
        fork::is_current(self.owner)
    }

    /// The same settings, not yet connected, for this process (after `fork()`).
    pub(crate) fn for_this_process(&self) -> Link {
        Link {
            options: self.options.clone(),
            transport: self.transport,
            caller: tokio::sync::OnceCell::new(),
            probed: Mutex::new(None),
            owner: fork::current(),
        }
    }

    /// The broker's URL, password removed.
    pub(crate) fn display_url(&self) -> String {
        self.options.display_url()
    }

    /// Whether requests go over NATS now (`has_local`: the client has a local connection).
    pub(crate) fn on_nats(&self, has_local: bool) -> bool {
        self.transport == Transport::Nats || (!has_local && self.caller.initialized())
    }

    /// Whether connecting tries a local instance first.
    pub(crate) fn local_first(&self) -> bool {
        self.transport == Transport::Auto
    }

    /// Whether this request should try the local instance first.
    pub(crate) fn try_local(&self, has_local: bool) -> bool {
        self.transport == Transport::Auto && (has_local || self.probe_due())
    }

    fn probe_due(&self) -> bool {
        self.probed.lock().unwrap_or_else(|p| p.into_inner()).is_none_or(|t| t.elapsed() >= PROBE_EVERY)
    }

    /// A local try found no service: NATS until the next probe.
    pub(crate) fn no_local(&self) {
        *self.probed.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    }

    /// The error when neither a local instance nor the broker can be reached.
    pub(crate) fn unreachable(local: Error, nats: Error) -> Error {
        Error::new(nats.kind(), format!("{local}, and NATS is not reachable: {nats}")).with_source(nats)
    }

    /// Connects to the broker if not yet connected.
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))] // used by the tokio client
    pub(crate) async fn caller(&self, name: &Name) -> Result<&Caller> {
        self.caller.get_or_try_init(|| Caller::connect(&self.options, name.clone())).await
    }

    /// [`caller`](Self::caller) from a thread with no runtime (on the internal one).
    pub(crate) fn caller_blocking(&self, name: &Name) -> Result<Caller> {
        if let Some(c) = self.caller.get() {
            return Ok(c.clone());
        }
        let (opts, n) = (self.options.clone(), name.clone());
        let caller = rt::run(async move { Caller::connect(&opts, n).await })??;
        // Two threads may race to connect; the first connection is kept.
        let _ = self.caller.set(caller.clone());
        Ok(self.caller.get().cloned().unwrap_or(caller))
    }

    /// One request over NATS.
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))] // used by the tokio client
    pub(crate) async fn call(
        &self,
        name: &Name,
        method: &str,
        payload: &[u8],
        timeout: Duration,
    ) -> Result<Vec<u8>> {
        self.caller(name).await?.call(method, payload, timeout).await
    }

    /// One request over NATS from a thread with no runtime.
    pub(crate) fn call_blocking(
        &self,
        name: &Name,
        method: &str,
        payload: &[u8],
        timeout: Duration,
    ) -> Result<Vec<u8>> {
        let caller = self.caller_blocking(name)?;
        let (method, payload) = (method.to_owned(), payload.to_vec());
        rt::run(async move { caller.call(&method, &payload, timeout).await })?
    }
}
