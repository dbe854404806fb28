//! Call a local service by name.
//!
//! One process serves a name with a handler; another calls that name and gets the handler's
//! answer. No ports, no broker, no set-up: names live in a private runtime directory, owned
//! through a lock file for as long as the server lives, and requests travel over a Unix socket
//! in length-prefixed frames with request ids, deadlines and typed errors.
//!
//! ```
//! # let dir = std::env::temp_dir().join(format!("microcs-doc-lib-{}", std::process::id()));
//! # unsafe { std::env::set_var("MICROCS_RUNTIME_DIR", &dir) };
//! let server = microcs::Server::bind("LIFE_GEN")?;                 // claims the name
//! let handle = server.spawn(|req: microcs::Request| {              // serves in the background
//!     Ok::<_, microcs::RemoteError>(req.payload().to_vec())
//! })?;
//! let mut client = microcs::Client::connect("LIFE_GEN")?;          // by name, no ports
//! let reply = client.request(b"Give me some data back!!")?;       // bytes in, bytes out
//! assert_eq!(reply, b"Give me some data back!!");
//! let text = client.send_message("hello")?;                       // str in, String out
//! assert_eq!(text, "hello");
//! handle.shutdown();                                               // drains, removes the socket
//! # Ok::<(), microcs::Error>(())
//! ```
//!
//! # Layout
//!
//! Protocol rules live once, below the two I/O flavours (see `docs/ARCHITECTURE.md`):
//!
//! - [`proto`]: the wire protocol, sans I/O — frame layout, limits, status codes, deadlines — and
//!   the connection state machines of both sides (`proto::server_conn`, `proto::client_conn`):
//!   which frame is allowed when, request ids, admission, `Cancel`, answer limits, what a failure
//!   means to the caller and whether a request may be sent again.
//! - `dispatch`: the life of one request in any server (local or NATS): route, refuse a late
//!   one, build the [`Request`], turn the handler's end into the one answer, count it.
//! - `io` and `transport`: plumbing both flavours share — the read buffer and the transport
//!   seam that moves frames (`transport::unix` today).
//! - [`Name`]: validated service names.
//! - [`registry`]: runtime directory, name ownership, instance slots, [`list`] of running
//!   services.
//! - [`activation`]: service definitions, and starting a service when it is first called.
//! - [`Error`], [`ErrorKind`], [`RemoteError`]: what can go wrong.
//! - [`Request`], [`Peer`], [`IntoPayload`]: what a handler sees and returns.
//! - [`micro`]: the JSON of the built-in `$ping`, `$info` and `$stats` methods.
//! - [`blocking`]: the std-only [`Client`] and [`Server`] (re-exported at the root); they only
//!   move bytes, wait and run handlers.
//! - `tokio` (feature `tokio`): the same API with `async fn`, a multiplexed client and a
//!   task-per-connection server; its docs say when to pick which.
//! - `nats` (feature `nats`): the same services and calls over a NATS broker, as NATS micro
//!   services; it plugs into `dispatch` (servers) and the clients' transport choice.
//!
//! # Security
//!
//! The runtime directory is created 0700 and refused when it is not private; sockets are 0600;
//! a server accepts only peers of its own user unless told otherwise (checked with the kernel's
//! `SO_PEERCRED`, before a byte is read); every frame is bounded (16 MiB by default) and checked
//! before memory is reserved for it; names cannot contain paths.

#![warn(missing_docs)]

pub mod activation;
pub mod blocking;
mod dispatch;
pub mod error;
mod fork;
mod handler;
mod io;
pub mod micro;
mod name;
#[cfg(feature = "nats")]
pub mod nats;
pub mod proto;
pub mod registry;
mod request;
mod service;
#[cfg(feature = "tokio")]
pub mod tokio;
mod transport;

/// Hooks for the cargo-fuzz targets in `fuzz/` (not part of the API; may change any time).
#[doc(hidden)]
pub mod __fuzz {
    pub use crate::transport::shm::fuzz::{CAPACITY, MAX_PAYLOAD, RingRun, run_script};
}

pub use blocking::{Client, ClientBuilder, ItemStream, Server, ServerBuilder, ServerHandle, ShutdownTrigger};
pub use error::{Error, ErrorKind, RemoteError, Result};
pub use name::Name;
pub use registry::{ServiceInfo, list, list_in};
pub use request::{Cancelled, IntoPayload, Peer, Request};
