//! The blocking (std-only) client and server.
//!
//! No runtime, no background threads in the client: a request is a `sendmsg` and a `read` on
//! the caller's thread, which makes this the lowest-latency way to call a local service. The
//! server runs one thread per connection and calls handlers inline on it.
//!
//! # Caveats
//!
//! - A [`Client`] carries one request at a time (`&mut self`). For many requests in flight over
//!   one connection, or thousands of concurrent callers, use the async API (`microcs::tokio`,
//!   feature `tokio`; its module docs say when to pick which).
//! - Each connection costs the server a thread; connections are capped (default 1024).
//! - A handler that blocks for long holds its thread; it should watch
//!   [`Request::is_cancelled`](crate::Request::is_cancelled) and return early when it turns true.

mod client;
mod server;

pub use client::{Client, ClientBuilder, DEFAULT_TIMEOUT, ItemStream};
pub use server::{Server, ServerBuilder, ServerHandle, ShutdownTrigger};
#[cfg(feature = "tokio")]
pub(crate) use server::{stream_fn, unary_fn};
