//! The server side over NATS: a NATS micro service in front of a server's endpoint table.
//!
//! One task reads every subscription of the service: a queue subscription (group `q`) per
//! endpoint, and plain subscriptions to the nine `$SRV.{PING,INFO,STATS}[.NAME[.ID]]` subjects.
//! Built-in requests are answered inline (they only serialise counters); each endpoint request
//! runs in a task of its own after taking a permit (`max_in_flight` of them), so a slow handler
//! holds up nothing but itself and memory stays bounded. The local socket and NATS share one
//! [`Service`]: the same instance id, the same counters, the same `$info`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;
use std::time::{Duration, Instant};

use async_nats::{HeaderMap, Message, Subject, Subscriber};
use bytes::Bytes;
use futures_core::Stream;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;

use super::{HEADER_ERROR, HEADER_ERROR_CODE, HEADER_FLAGS, HEADER_TIMEOUT, NATS_PEER, NatsOptions, conn};
use crate::dispatch::{self, Answer, Begin, End, Incoming, ReplyLimit};
use crate::error::{Error, ErrorKind, RemoteError, Result};
use crate::handler::Streams;
use crate::micro::QUEUE_GROUP;
use crate::proto::{FLAG_NOT_RUN, FLAG_SYSTEM, status};
use crate::request::{CancelState, Request};
use crate::service::{Builtin, Endpoint, EndpointId, Service};

/// How a server flavour runs one of its handlers for a NATS request.
pub(crate) trait Invoke: Streams + Send + Sync + 'static {
    /// Runs the handler on `req`; a panic becomes an error with code 500.
    fn invoke(
        &self,
        req: Request,
    ) -> impl Future<Output = std::result::Result<Vec<u8>, RemoteError>> + Send + 'static;
}

/// Why a streaming method is not served over NATS: streams are local only in this version
/// (docs/PROTOCOL.md § 17.3).
pub(crate) fn streams_are_local(method: &str) -> RemoteError {
    RemoteError::new(
        status::BAD_REQUEST,
        format!(
            "method '{method}' answers with a stream, and streams are local only: call it on the service's machine"
        ),
    )
}

/// Limits the NATS side takes from the server's configuration.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Largest request payload accepted (the server's `max_frame`).
    pub max_payload: u32,
    /// Requests run at once over NATS.
    pub max_in_flight: usize,
}

/// A connection to the broker, made when the server is bound (so that a wrong URL or
/// credentials fail `bind`), with the service's subjects already subscribed: once `bind` has
/// returned, requests reach this instance (they wait in the subscriptions until it serves).
pub(crate) struct Pending {
    client: async_nats::Client,
    url: String,
    name: String,
    /// Subscriptions made at bind time: endpoint subjects, `$SRV.X` and `$SRV.X.NAME`.
    subs: Vec<(Key, Subscriber)>,
}

/// What a subscription made at bind time is for.
enum Key {
    Subject(String),
    Builtin(Builtin),
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending").field("url", &self.url).field("name", &self.name).finish_non_exhaustive()
    }
}

const VERBS: [(&str, Builtin); 3] =
    [("PING", Builtin::Ping), ("INFO", Builtin::Info), ("STATS", Builtin::Stats)];

fn sub_error(url: &str, subject: &str, e: async_nats::SubscribeError) -> Error {
    Error::new(ErrorKind::Io, format!("cannot subscribe to '{subject}' on the NATS server at {url}: {e}"))
        .with_source(e)
}

impl Pending {
    /// Checks that the service can be a NATS micro service, connects to the broker and
    /// subscribes the subjects known now (the default handler, `methods`, and `$SRV.X` and
    /// `$SRV.X.NAME`).
    pub(crate) async fn connect(
        opts: &NatsOptions,
        name: &str,
        version: &str,
        methods: &[String],
    ) -> Result<Pending> {
        super::check_micro_names(name, methods)?;
        super::check_semver(version)?;
        let url = opts.display_url();
        let client = conn::connect(opts, &format!("microcs server {name}")).await?;
        let mut subs = Vec::new();
        let subjects = std::iter::once(name.to_owned()).chain(methods.iter().map(|m| format!("{name}.{m}")));
        for subject in subjects {
            let sub = client
                .queue_subscribe(subject.clone(), QUEUE_GROUP.to_owned())
                .await
                .map_err(|e| sub_error(&url, &subject, e))?;
            subs.push((Key::Subject(subject), sub));
        }
        for (verb, b) in VERBS {
            for subject in [format!("$SRV.{verb}"), format!("$SRV.{verb}.{name}")] {
                let sub =
                    client.subscribe(subject.clone()).await.map_err(|e| sub_error(&url, &subject, e))?;
                subs.push((Key::Builtin(b), sub));
            }
        }
        // Subscriptions are in effect once the broker has read them: after this flush, a request
        // sent by anyone finds the service.
        client.flush().await.map_err(|e| {
            Error::new(
                ErrorKind::Io,
                format!("the NATS server at {url} did not confirm our subscriptions: {e}"),
            )
            .with_source(e)
        })?;
        Ok(Pending { client, url, name: name.to_owned(), subs })
    }

    /// Starts serving `service` (in a task of the current tokio runtime). The subjects that
    /// could not be known at bind time (`$SRV.X.NAME.ID`, methods added after bind) are
    /// subscribed in the background; [`Side::subscribed`] waits for them.
    pub(crate) fn start<H: Invoke>(self, service: Arc<Service<H>>, limits: Limits) -> Result<Side> {
        let Pending { client, url, name, subs: mut early } = self;
        super::check_micro_names(&name, &service.method_names())?;
        let mut subs = Vec::new();
        let mut late = Vec::new();
        for (i, ep) in endpoints(&service).enumerate() {
            let found = early.iter().position(|(k, _)| matches!(k, Key::Subject(s) if *s == ep.subject));
            match found {
                Some(pos) => subs.push((Tag::Endpoint(i), early.swap_remove(pos).1)),
                None => late.push((Tag::Endpoint(i), ep.subject.clone(), true)),
            }
        }
        for (k, sub) in early {
            if let Key::Builtin(b) = k {
                subs.push((Tag::Builtin(b), sub));
            }
        }
        for (verb, b) in VERBS {
            late.push((Tag::Builtin(b), format!("$SRV.{verb}.{name}.{}", service.id), false));
        }
        let (stop_tx, stop_rx) = watch::channel(false);
        let (late_tx, late_rx) = tokio::sync::mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let permits = limits.max_in_flight.clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize));
        let shared = Arc::new(Shared {
            service,
            client: client.clone(),
            limits,
            permits: Arc::new(Semaphore::new(permits)),
            next_id: AtomicU64::new(1),
            cancels: std::sync::Mutex::new(Vec::new()),
        });
        let u = url.clone();
        tokio::spawn(async move {
            let mut result = Ok(());
            for (tag, subject, queue) in late {
                let sub = if queue {
                    client.queue_subscribe(subject.clone(), QUEUE_GROUP.to_owned()).await
                } else {
                    client.subscribe(subject.clone()).await
                };
                match sub {
                    Ok(sub) => {
                        let _ = late_tx.send((tag, sub));
                    }
                    Err(e) => {
                        result = Err(sub_error(&u, &subject, e));
                        break;
                    }
                }
            }
            if result.is_ok() {
                result = client.flush().await.map_err(|e| {
                    Error::new(
                        ErrorKind::Io,
                        format!("the NATS server at {u} did not confirm our subscriptions: {e}"),
                    )
                    .with_source(e)
                });
            }
            if let Err(e) = &result {
                tracing::warn!(error = %e, "serving on NATS without some subjects");
            }
            let _ = ready_tx.send(result);
        });
        tracing::info!(service = %name, url = %url, "serving on NATS");
        let task = tokio::spawn(read_loop(shared.clone(), subs, late_rx, stop_rx));
        Ok(Side { shared, stop: stop_tx, task: Some(task), permits, url, ready: Some(ready_rx) })
    }
}

/// A service being served on NATS.
pub(crate) struct Side {
    shared: Arc<dyn Stoppable>,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
    permits: usize,
    url: String,
    /// Resolves when the subjects subscribed at start are in effect.
    ready: Option<tokio::sync::oneshot::Receiver<Result<()>>>,
}

impl std::fmt::Debug for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Side").field("url", &self.url).finish_non_exhaustive()
    }
}

impl Drop for Side {
    fn drop(&mut self) {
        // Dropped without `stop` (a server that failed to start): stop reading at least.
        let _ = self.stop.send(true);
    }
}

impl Side {
    /// Waits until every subject is subscribed and confirmed by the broker (those known at bind
    /// time already are).
    pub(crate) async fn subscribed(&mut self) -> Result<()> {
        match self.ready.take() {
            Some(rx) => rx.await.unwrap_or(Ok(())),
            None => Ok(()),
        }
    }

    /// Stops taking requests (unsubscribes, so the broker sends new ones to other instances),
    /// answers those already received, waits up to `grace` for running handlers, then flushes
    /// the replies and closes the connection.
    pub(crate) async fn stop(mut self, grace: Duration) {
        let _ = self.stop.send(true);
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
        let sem = self.shared.semaphore();
        let all = u32::try_from(self.permits).unwrap_or(u32::MAX);
        if tokio::time::timeout(grace, sem.acquire_many(all)).await.is_err() {
            tracing::warn!(url = %self.url, "grace period over; NATS requests still running are abandoned");
            self.shared.cancel_all();
        }
        self.shared.close().await;
    }
}

/// What [`Side`] needs from the handler-typed state, without the handler type.
trait Stoppable: Send + Sync {
    fn semaphore(&self) -> Arc<Semaphore>;
    fn cancel_all(&self);
    fn close(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;
}

struct Shared<H> {
    service: Arc<Service<H>>,
    client: async_nats::Client,
    limits: Limits,
    permits: Arc<Semaphore>,
    next_id: AtomicU64,
    /// Cancel flags of running requests, so that shutdown past its grace period can tell
    /// blocking handlers (which cannot be dropped) to stop. Pruned as requests finish.
    cancels: std::sync::Mutex<Vec<std::sync::Weak<CancelState>>>,
}

impl<H: Invoke> Stoppable for Shared<H> {
    fn semaphore(&self) -> Arc<Semaphore> {
        self.permits.clone()
    }

    fn cancel_all(&self) {
        for c in self.cancels.lock().unwrap_or_else(|p| p.into_inner()).iter().filter_map(|w| w.upgrade()) {
            c.cancel();
        }
    }

    fn close(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            let _ = tokio::time::timeout(Duration::from_secs(5), self.client.flush()).await;
        })
    }
}

#[derive(Debug, Clone, Copy)]
enum Tag {
    /// Index in [`endpoints`] order: the default handler, then the methods.
    Endpoint(usize),
    Builtin(Builtin),
}

fn endpoints<H>(service: &Service<H>) -> impl Iterator<Item = &Endpoint<H>> {
    std::iter::once(&service.default).chain(&service.methods)
}

async fn read_loop<H: Invoke>(
    shared: Arc<Shared<H>>,
    mut subs: Vec<(Tag, Subscriber)>,
    mut late: tokio::sync::mpsc::UnboundedReceiver<(Tag, Subscriber)>,
    mut stop: watch::Receiver<bool>,
) {
    let mut start = 0usize;
    loop {
        let next = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => None,
            Some(sub) = late.recv() => {
                subs.push(sub);
                continue;
            }
            m = next_message(&mut subs, &mut start) => m,
        };
        let Some((tag, msg)) = next else { break };
        dispatch(&shared, tag, msg).await;
    }
    while let Ok(sub) = late.try_recv() {
        subs.push(sub);
    }
    // Unsubscribe (the broker then sends new requests to other instances), then answer what was
    // already delivered to us: each subscription ends after its buffered messages.
    for (_, s) in &mut subs {
        let _ = s.unsubscribe().await;
    }
    while let Some((tag, msg)) = next_message(&mut subs, &mut start).await {
        dispatch(&shared, tag, msg).await;
    }
}

/// The next message of any subscription, taking them in turn so none starves the others;
/// `None` once every subscription has ended.
async fn next_message(subs: &mut Vec<(Tag, Subscriber)>, start: &mut usize) -> Option<(Tag, Message)> {
    std::future::poll_fn(|cx| {
        let n = subs.len();
        let mut ended = Vec::new();
        for k in 0..n {
            let i = (*start + k) % n;
            match Pin::new(&mut subs[i].1).poll_next(cx) {
                Poll::Ready(Some(m)) => {
                    *start = (i + 1) % n;
                    return Poll::Ready(Some((subs[i].0, m)));
                }
                Poll::Ready(None) => ended.push(i),
                Poll::Pending => {}
            }
        }
        if ended.len() == n {
            return Poll::Ready(None);
        }
        for i in ended.into_iter().rev() {
            subs.swap_remove(i);
        }
        *start = 0;
        Poll::Pending
    })
    .await
}

async fn dispatch<H: Invoke>(shared: &Arc<Shared<H>>, tag: Tag, msg: Message) {
    match tag {
        Tag::Builtin(b) => {
            if let Some(reply) = msg.reply {
                let body = shared.service.builtin(b, None);
                let _ = shared.client.publish(reply, body.into()).await;
            }
        }
        Tag::Endpoint(i) => {
            // Backpressure: with every permit taken, stop reading until a handler finishes.
            let Ok(permit) = shared.permits.clone().acquire_owned().await else { return };
            let s = shared.clone();
            tokio::spawn(async move {
                s.serve_one(i, msg).await;
                drop(permit);
            });
        }
    }
}

impl<H: Invoke> Shared<H> {
    fn endpoint(&self, i: usize) -> &Endpoint<H> {
        self.service.endpoint(EndpointId(i))
    }

    async fn serve_one(&self, i: usize, msg: Message) {
        let ep = self.endpoint(i);
        let reply = msg.reply;
        let received = Instant::now();
        let deadline = msg
            .headers
            .as_ref()
            .and_then(|h| h.get(HEADER_TIMEOUT))
            .and_then(|v| v.as_str().trim().parse::<u64>().ok())
            .filter(|ms| *ms > 0)
            .map(|ms| received + Duration::from_millis(ms));
        if msg.payload.len() > self.limits.max_payload as usize {
            let m = format!(
                "payload of {} bytes is over service '{}''s limit of {} bytes",
                msg.payload.len(),
                self.service.name,
                self.limits.max_payload
            );
            return self.error(reply, status::TOO_LARGE, FLAG_SYSTEM | FLAG_NOT_RUN, &m).await;
        }
        let cancel = Arc::new(CancelState::default());
        {
            let mut cancels = self.cancels.lock().unwrap_or_else(|p| p.into_inner());
            cancels.retain(|w| w.strong_count() > 0);
            cancels.push(Arc::downgrade(&cancel));
        }
        let call = Incoming {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            peer: NATS_PEER,
            payload: msg.payload.to_vec(),
            deadline,
            cancel,
            stream: false,
            transport: None,
            arrived: std::time::Instant::now(),
        };
        if ep.handler.streams() {
            let e = streams_are_local(&ep.name);
            return self.error(reply, e.code(), FLAG_SYSTEM | FLAG_NOT_RUN, e.message()).await;
        }
        let (run, req) = match dispatch::begin_at(&*self.service, EndpointId(i), call) {
            Begin::Run(run, req) => (run, req),
            Begin::Answer(a) => return self.answer(reply, a).await,
        };
        let handler = run.handler().invoke(req);
        let end = match run.deadline() {
            Some(d) => match tokio::time::timeout_at(d.into(), handler).await {
                Ok(r) => End::Done(r),
                Err(_) => End::Deadline,
            },
            None => End::Done(handler.await),
        };
        let limit = ReplyLimit { max: self.client.max_payload(), what: "the NATS server's max_payload" };
        if let Some(a) = run.finish(end, limit) {
            self.answer(reply, a).await;
        }
    }

    /// Sends an answer to the caller's reply subject, if it gave one.
    async fn answer(&self, reply: Option<Subject>, answer: Answer) {
        match answer {
            Answer::Reply(body) => {
                let Some(reply) = reply else { return };
                if let Err(e) = self.client.publish(reply, body.into()).await {
                    tracing::warn!(service = %self.service.name, error = %e, "cannot send a reply over NATS");
                }
            }
            Answer::Error { code, flags, message } => self.error(reply, code, flags, &message).await,
        }
    }

    /// Answers with the NATS micro error headers (and our flags when set).
    async fn error(&self, reply: Option<Subject>, code: u16, flags: u16, message: &str) {
        let Some(reply) = reply else { return };
        let mut h = HeaderMap::new();
        // A header value is one line: fold line breaks, and keep it a reasonable size.
        let mut one_line: String =
            message.chars().map(|c| if c == '\r' || c == '\n' { ' ' } else { c }).collect();
        if one_line.len() > 4096 {
            let mut cut = 4096;
            while !one_line.is_char_boundary(cut) {
                cut -= 1;
            }
            one_line.truncate(cut);
        }
        h.insert(HEADER_ERROR, one_line.as_str());
        h.insert(HEADER_ERROR_CODE, code.to_string().as_str());
        if flags != 0 {
            h.insert(HEADER_FLAGS, flags.to_string().as_str());
        }
        if let Err(e) = self.client.publish_with_headers(reply, h, Bytes::new()).await {
            tracing::warn!(service = %self.service.name, error = %e, "cannot send an error reply over NATS");
        }
    }
}
