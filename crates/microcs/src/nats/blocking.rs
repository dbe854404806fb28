//! NATS for the blocking server: its NATS side on the internal runtime, and how a blocking
//! handler runs for a NATS request (on the blocking pool).

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::Duration;

use super::rt;
use super::serve::{Invoke, Limits, Pending, Side};
use crate::error::{RemoteError, Result};
use crate::proto::status;
use crate::request::{Request, panic_message};
use crate::service::{Config, Service};

use crate::handler::SyncHandler;

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
            let run = move || match &*handler {
                SyncHandler::Unary(h) => h(req),
                SyncHandler::Stream(_) => {
                    Err(super::serve::streams_are_local(req.method().unwrap_or_default()))
                }
            };
            // On the blocking pool: a blocking handler must not stall the runtime's thread.
            match tokio::task::spawn_blocking(move || catch_unwind(AssertUnwindSafe(run))).await {
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
