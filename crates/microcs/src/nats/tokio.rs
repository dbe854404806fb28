//! NATS for the async [`Client`] and [`Server`](crate::tokio::Server): builder options, the
//! client's choice between a local instance and NATS, and the async handlers' [`Invoke`].
//! Everything runs on the application's own runtime.

use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use super::call::Caller;
use super::serve::{Invoke, Limits, Pending, Side};
use super::{ClientConfig, NatsOptions, ServerConfig, Transport};
use crate::error::{ErrorKind, RemoteError, Result};
use crate::proto::status;
use crate::request::{Request, panic_message};
use crate::service::{Config, Service};
use crate::tokio::{Client, ClientBuilder, ServerBuilder};

/// How often a client on NATS looks again for a local instance.
const PROBE_EVERY: Duration = Duration::from_secs(1);

type AsyncHandler = dyn Fn(Request) -> Pin<Box<dyn Future<Output = std::result::Result<Vec<u8>, RemoteError>> + Send>>
    + Send
    + Sync;

impl ClientBuilder {
    super::nats_client_options!();
}

impl Client {
    /// Where the last request went ([`Transport::Local`] or [`Transport::Nats`]); before any
    /// request, where the next one would go.
    pub fn via(&self) -> Transport {
        match self.nats_link() {
            Some(link) if link.on_nats(self) => Transport::Nats,
            _ => Transport::Local,
        }
    }

    /// The NATS broker this client falls back to or uses (password removed), if any.
    pub fn nats_url(&self) -> Option<String> {
        self.nats_link().map(|l| l.options.display_url())
    }
}

/// An async client's NATS state, shared by its clones.
#[derive(Debug)]
pub(crate) struct AsyncLink {
    options: NatsOptions,
    transport: Transport,
    /// Connected on first use over NATS.
    caller: tokio::sync::OnceCell<Caller>,
    /// When a local instance was last looked for while on NATS.
    probed: Mutex<Option<Instant>>,
}

impl AsyncLink {
    /// `None` when this client is local only.
    pub(crate) fn new(config: ClientConfig) -> Result<Option<AsyncLink>> {
        Ok(config.resolve()?.map(|(options, transport)| AsyncLink {
            options,
            transport,
            caller: tokio::sync::OnceCell::new(),
            probed: Mutex::new(None),
        }))
    }

    fn on_nats(&self, client: &Client) -> bool {
        self.transport == Transport::Nats || (!client.has_local() && self.caller.initialized())
    }

    fn mark_probed(&self) {
        *self.probed.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    }

    async fn caller(&self, client: &Client) -> Result<&Caller> {
        self.caller.get_or_try_init(|| Caller::connect(&self.options, client.name().clone())).await
    }

    /// Finishes `ClientBuilder::connect`: a local instance if there is one (unless NATS is
    /// forced), else the broker.
    pub(crate) async fn connect(&self, client: &Client, deadline: tokio::time::Instant) -> Result<()> {
        if self.transport == Transport::Auto {
            match client.connect_local(deadline).await {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == ErrorKind::NoService => {
                    self.mark_probed();
                    self.caller(client).await.map_err(|n| {
                        crate::Error::new(n.kind(), format!("{e}, and NATS is not reachable: {n}"))
                            .with_source(n)
                    })?;
                }
                Err(e) => return Err(e),
            }
        } else {
            self.caller(client).await?;
        }
        Ok(())
    }

    /// One request of a client that has NATS configured.
    pub(crate) async fn exchange(&self, client: &Client, method: &str, payload: &[u8]) -> Result<Vec<u8>> {
        if self.transport == Transport::Auto {
            let due = self
                .probed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_none_or(|t| t.elapsed() >= PROBE_EVERY);
            if client.has_local() || due {
                match client.exchange_local(method, payload).await {
                    // No local instance (any more): the request did not run; NATS it is.
                    Err(e) if e.kind() == ErrorKind::NoService => self.mark_probed(),
                    r => return r,
                }
            }
        }
        self.caller(client).await?.call(method, payload, client.timeout()).await
    }
}

impl ServerBuilder {
    super::nats_server_options!();
}

/// Connects an async server to its broker at bind time; `None` when it serves locally only.
pub(crate) async fn bind_nats(
    name: &str,
    config: &ServerConfig,
    version: &str,
    methods: &[String],
) -> Result<Option<Pending>> {
    match config.resolve()? {
        Some(opts) => Pending::connect(&opts, name, version, methods).await.map(Some),
        None => Ok(None),
    }
}

/// Starts serving an async server's endpoints on NATS, in tasks of the current runtime.
pub(crate) fn start_nats(
    pending: Pending,
    service: Arc<Service<Arc<AsyncHandler>>>,
    config: &Config,
) -> Result<Side> {
    let limits = Limits { max_payload: config.max_payload, max_in_flight: config.max_in_flight };
    pending.start(service, limits)
}

impl Invoke for Arc<AsyncHandler> {
    fn invoke(
        &self,
        req: Request,
    ) -> impl Future<Output = std::result::Result<Vec<u8>, RemoteError>> + Send + 'static {
        CatchUnwind { inner: (**self)(req) }
    }
}

/// Turns a panic while polling the handler into an error reply (code 500), as the local
/// servers do; dropping it drops the handler (the deadline does that).
struct CatchUnwind<F: ?Sized> {
    inner: Pin<Box<F>>,
}

impl<F> Future for CatchUnwind<F>
where
    F: Future<Output = std::result::Result<Vec<u8>, RemoteError>> + ?Sized,
{
    type Output = std::result::Result<Vec<u8>, RemoteError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = self.inner.as_mut();
        match catch_unwind(AssertUnwindSafe(move || inner.poll(cx))) {
            Ok(p) => p,
            Err(panic) => {
                let msg = panic_message(&*panic);
                tracing::error!("{msg}");
                Poll::Ready(Err(RemoteError::new(status::HANDLER_FAILED, msg)))
            }
        }
    }
}
