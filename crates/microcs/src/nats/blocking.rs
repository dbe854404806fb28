//! NATS for the blocking [`Client`] and [`Server`]: builder options, the client's choice between
//! a local instance and NATS, and the server's NATS side on the internal runtime.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::call::Caller;
use super::serve::{Invoke, Limits, Pending, Side};
use super::{ClientConfig, NatsOptions, Transport, rt};
use crate::blocking::{Client, ClientBuilder, ServerBuilder};
use crate::error::{Error, ErrorKind, RemoteError, Result};
use crate::proto::status;
use crate::request::{Request, panic_message};
use crate::service::{Config, Service};

/// How often a client on NATS looks again for a local instance (local first: one that starts
/// later is used from then on).
const PROBE_EVERY: Duration = Duration::from_secs(1);

type SyncHandler = dyn Fn(Request) -> std::result::Result<Vec<u8>, RemoteError> + Send + Sync;

impl ClientBuilder {
    super::nats_client_options!();
}

impl Client {
    /// Where the last request went ([`Transport::Local`] or [`Transport::Nats`]); before any
    /// request, where the next one would go.
    pub fn via(&self) -> Transport {
        match &self.nats {
            Some(link) if link.on_nats(self) => Transport::Nats,
            _ => Transport::Local,
        }
    }

    /// The NATS broker this client falls back to or uses (password removed), if any.
    pub fn nats_url(&self) -> Option<String> {
        self.nats.as_ref().map(|l| l.options.display_url())
    }
}

/// A blocking client's NATS state.
#[derive(Debug)]
pub(crate) struct ClientLink {
    options: NatsOptions,
    transport: Transport,
    /// Connected on first use over NATS.
    caller: Option<Caller>,
    /// When a local instance was last looked for while on NATS.
    probed: Option<Instant>,
}

impl ClientLink {
    /// `None` when this client is local only.
    pub(crate) fn new(config: ClientConfig) -> Result<Option<Box<ClientLink>>> {
        Ok(config.resolve()?.map(|(options, transport)| {
            Box::new(ClientLink { options, transport, caller: None, probed: None })
        }))
    }

    fn on_nats(&self, client: &Client) -> bool {
        self.transport == Transport::Nats || (!client.has_local() && self.caller.is_some())
    }

    /// Finishes [`ClientBuilder::connect`]: a local instance if there is one (unless NATS is
    /// forced), else the broker.
    pub(crate) fn connect(mut self: Box<Self>, mut client: Client, deadline: Instant) -> Result<Client> {
        if self.transport == Transport::Auto {
            match client.connect_local(deadline) {
                Ok(()) => {
                    client.nats = Some(self);
                    return Ok(client);
                }
                Err(e) if e.kind() == ErrorKind::NoService => {
                    self.probed = Some(Instant::now());
                    self.ensure_caller(&client).map_err(|n| {
                        Error::new(n.kind(), format!("{e}, and NATS is not reachable: {n}")).with_source(n)
                    })?;
                }
                Err(e) => return Err(e),
            }
        } else {
            self.ensure_caller(&client)?;
        }
        client.nats = Some(self);
        Ok(client)
    }

    fn ensure_caller(&mut self, client: &Client) -> Result<&Caller> {
        if self.caller.is_none() {
            let (opts, name) = (self.options.clone(), client.name().clone());
            self.caller = Some(rt::run(async move { Caller::connect(&opts, name).await })??);
        }
        Ok(self.caller.as_ref().expect("just connected"))
    }

    /// One request of a client that has NATS configured.
    pub(crate) fn exchange(client: &mut Client, method: &str, payload: &[u8]) -> Result<Vec<u8>> {
        let mut link = client.nats.take().expect("a NATS client");
        let result = link.route(client, method, payload);
        client.nats = Some(link);
        result
    }

    fn route(&mut self, client: &mut Client, method: &str, payload: &[u8]) -> Result<Vec<u8>> {
        if self.transport == Transport::Auto {
            let due = self.probed.is_none_or(|t| t.elapsed() >= PROBE_EVERY);
            if client.has_local() || due {
                match client.exchange_local(method, payload) {
                    // No local instance (any more): the request did not run; NATS it is.
                    Err(e) if e.kind() == ErrorKind::NoService => {
                        self.probed = Some(Instant::now());
                    }
                    r => return r,
                }
            }
        }
        let timeout = client.timeout();
        let caller = self.ensure_caller(client)?.clone();
        let (method, payload) = (method.to_owned(), payload.to_vec());
        rt::run(async move { caller.call(&method, &payload, timeout).await })?
    }
}

impl ServerBuilder {
    super::nats_server_options!();
}

/// Connects a blocking server to its broker at bind time; `None` when it serves locally only.
pub(crate) fn bind_nats(
    name: &str,
    config: &super::ServerConfig,
    version: &str,
    methods: &[String],
) -> Result<Option<Pending>> {
    let Some(opts) = config.resolve()? else { return Ok(None) };
    let (name, version, methods) = (name.to_owned(), version.to_owned(), methods.to_vec());
    rt::run(async move { Pending::connect(&opts, &name, &version, &methods).await }).and_then(|r| r.map(Some))
}

/// Starts serving a blocking server's endpoints on NATS; returns once every subject is
/// subscribed.
pub(crate) fn start_nats(
    pending: Pending,
    service: Arc<Service<Arc<SyncHandler>>>,
    config: &Config,
) -> Result<Side> {
    let limits = Limits { max_payload: config.max_payload, max_in_flight: config.max_in_flight };
    rt::run(async move {
        let mut side = pending.start(service, limits)?;
        side.subscribed().await?;
        Ok(side)
    })?
}

/// Stops a blocking server's NATS side in the background; wait with [`wait_stopped`].
pub(crate) fn stop_nats(side: Side, grace: Duration) -> Option<tokio::task::JoinHandle<()>> {
    rt::spawn(side.stop(grace)).ok()
}

/// Waits for [`stop_nats`] to finish.
pub(crate) fn wait_stopped(task: tokio::task::JoinHandle<()>) {
    let _ = rt::run(task);
}

impl Invoke for Arc<SyncHandler> {
    fn invoke(
        &self,
        req: Request,
    ) -> impl Future<Output = std::result::Result<Vec<u8>, RemoteError>> + Send + 'static {
        let handler = self.clone();
        async move {
            // On the blocking pool: a blocking handler must not stall the runtime's thread.
            match tokio::task::spawn_blocking(move || catch_unwind(AssertUnwindSafe(|| handler(req)))).await {
                Ok(Ok(result)) => result,
                Ok(Err(panic)) => {
                    let msg = panic_message(&*panic);
                    tracing::error!("{msg}");
                    Err(RemoteError::new(status::HANDLER_FAILED, msg))
                }
                Err(e) => {
                    Err(RemoteError::new(status::HANDLER_FAILED, format!("handler could not run: {e}")))
                }
            }
        }
    }
}
