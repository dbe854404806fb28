//! NATS for the async server: its NATS side, on the application's own runtime, and the async
//! handlers' [`Invoke`].

use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use super::ServerConfig;
use super::serve::{Invoke, Limits, Pending, Side};
use crate::error::{RemoteError, Result};
use crate::proto::status;
use crate::request::{Request, panic_message};
use crate::service::{Config, Service};

use crate::handler::AsyncHandler;

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
        let inner: crate::handler::HandlerFuture = match &**self {
            AsyncHandler::Unary(h) => h(req),
            AsyncHandler::Stream(_) => {
                let e = super::serve::streams_are_local(req.method().unwrap_or_default());
                Box::pin(async move { Err(e) })
            }
        };
        CatchUnwind { inner }
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
