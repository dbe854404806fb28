//! Integration tests: clients and servers in separate processes, over real Unix sockets, each
//! test in its own temporary runtime directory with its own service names.
//!
//! One test binary (as ripgrep does), one module per area.

mod common;

#[cfg(feature = "tokio")]
mod activation;
mod blocking;
#[cfg(feature = "tokio")]
mod convert;
mod faults;
mod fork;
#[cfg(feature = "tokio")]
mod instances;
#[cfg(feature = "nats")]
mod nats;
mod ownership;
#[cfg(feature = "tokio")]
mod per_request;
mod protocol;
mod shm;
#[cfg(feature = "tokio")]
mod shm_lone_large;
mod shm_ring;
mod socket_activation;
#[cfg(feature = "tokio")]
mod stream;
#[cfg(feature = "tokio")]
mod tokio;
