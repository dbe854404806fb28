//! The async (tokio) client and server — feature `tokio`.
//!
//! The same names as the blocking API, with `async fn` wherever it waits: [`Server::bind`],
//! [`Server::builder`], [`ServerBuilder::method`], [`Server::spawn`], [`Server::serve`],
//! [`ServerHandle::shutdown`], [`Client::connect`], [`Client::request`], [`Client::call`],
//! [`Client::send_message`], [`Client::ping`]. Handlers are async functions or closures
//! returning a future: `Fn(Request) -> impl Future<Output = Result<R, E>>`, with the same `R`
//! ([`IntoPayload`](crate::IntoPayload)) and `E` (any error) as blocking handlers.
//!
//! Both flavours speak one protocol: a tokio client calls a blocking server and the other way
//! round, and the conformance tests run every pair.
//!
//! ```
//! # let dir = std::env::temp_dir().join(format!("microcs-doc-tokio-{}", std::process::id()));
//! use microcs::{RemoteError, Request};
//! use microcs::tokio::{Client, Server};
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let handle = Server::builder("LIFE_GEN_ASYNC")
//!     # .runtime_dir(&dir)
//!     .bind()
//!     .await?
//!     .spawn(|req: Request| async move { Ok::<_, RemoteError>(req.into_payload()) })?;
//!
//! let client = Client::builder("LIFE_GEN_ASYNC")
//!     # .runtime_dir(&dir)
//!     .connect()
//!     .await?;
//! // Clones share one connection; these requests are in flight together.
//! let other = client.clone();
//! let (a, b) = tokio::join!(client.request(b"one"), other.request(b"two"));
//! assert_eq!((a?, b?), (b"one".to_vec(), b"two".to_vec()));
//! handle.shutdown().await;
//! # Ok::<(), microcs::Error>(())
//! # }).unwrap();
//! ```
//!
//! # Blocking or async?
//!
//! Pick the **blocking** API ([`crate::Client`], [`crate::Server`]) when the program has no
//! runtime and makes one call at a time per thread — command-line tools, scripts' helpers, a
//! worker thread that asks a service now and then. It has the lowest latency per call (a
//! request is a `sendmsg` and a `read` on the caller's thread), owns no threads in the client,
//! and its handlers may block freely.
//!
//! Pick the **async** API when the program already runs on tokio, or when many calls are in
//! flight at once: one [`Client`] (and its clones) carries thousands of concurrent requests over
//! one connection, and the [`Server`] serves many connections with a task each instead of a
//! thread each. Deadlines stop work: a handler still running at its caller's deadline is
//! dropped, and dropping a call's future cancels it on the server.
//!
//! # Caveats
//!
//! - A handler runs on the runtime's worker threads: it must not block. Move blocking or
//!   CPU-heavy work to [`spawn_blocking`](::tokio::task::spawn_blocking).
//! - A handler still running at the deadline is dropped at its next `.await`; one whose caller
//!   cancelled can watch [`Request::cancelled`](crate::Request::cancelled) to stop early, and is
//!   dropped if it has not finished a grace period later
//!   ([`ServerBuilder::grace_period`], default 10 s). Its answer is discarded either way.
//! - Requests of one client share its connection: a very large payload delays the requests
//!   queued behind it. Clients that must not wait for each other should each
//!   [`connect`](Client::connect) (a connection each).
//! - The server needs tokio's `time` driver (`enable_time`/`enable_all` on the runtime) and
//!   works on current-thread and multi-thread runtimes alike.

mod client;
mod io;
mod server;
mod shm_wait;

pub use client::{Client, ClientBuilder, ItemStream};
pub use server::{Items, Server, ServerBuilder, ServerHandle, ShutdownTrigger, blocking, blocking_stream};
