//! A server's limits and policies (both flavours), and who may connect.

use std::time::Duration;

use crate::name::Name;
use crate::proto;
use crate::proto::server_conn::{self, Out};
use crate::registry;
use crate::request::Peer;
use crate::transport::unix::peer_credentials;

/// Limits and policies of a server, shared by the blocking and async implementations.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    /// Largest request payload accepted (announced in `HelloAck`).
    pub max_payload: u32,
    /// Connections served at once; past it a new connection gets a "busy" error and is closed.
    pub max_connections: usize,
    /// Requests run at once per connection; past it the connection is not read (backpressure).
    pub max_in_flight: usize,
    /// Connections still in their handshake; past it the oldest is dropped, so a flood of
    /// silent connections cannot lock out real clients.
    pub max_handshaking: usize,
    /// How long shutdown waits for running handlers.
    pub grace: Duration,
    /// How long a new connection may take to send its `Hello`.
    pub handshake_timeout: Duration,
    /// How long a started frame may take to arrive in full.
    pub frame_timeout: Duration,
    /// How long a reply may wait for the client to read; then the connection is dropped.
    pub write_timeout: Duration,
    /// Other user ids allowed to connect (the server's own uid always is).
    pub allowed_uids: Vec<u32>,
    /// Any user may connect.
    pub allow_any_user: bool,
    /// Kernel send buffer asked for on each accepted connection (0: the system's default).
    pub send_buffer: usize,
    /// Join the name as one of several instances instead of owning it exclusively.
    pub shared: bool,
    /// Stop after this long without requests.
    pub idle_timeout: Option<Duration>,
    /// `MICROCS_IDLE_TIMEOUT` was set but is not a duration (and the builder set none): the
    /// error `bind` reports, so that a typo does not leave a service running forever.
    pub idle_env_error: Option<String>,
    /// Serve on the listening socket a service manager passed (systemd socket activation),
    /// when it passed one for the name.
    pub socket_activation: bool,
    /// Offer shared memory to clients that ask (PROTOCOL.md § 18).
    pub shared_memory: bool,
    /// Bytes of each shared-memory ring (a power of two, 4 KiB-64 MiB).
    pub ring_capacity: u32,
}

impl Default for Config {
    fn default() -> Config {
        let idle = idle_timeout_from_env();
        Config {
            max_payload: proto::DEFAULT_MAX_PAYLOAD,
            max_connections: 1024,
            max_in_flight: 128,
            max_handshaking: 64,
            grace: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(5),
            frame_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(30),
            allowed_uids: Vec::new(),
            allow_any_user: false,
            send_buffer: crate::transport::unix::DEFAULT_SEND_BUFFER,
            shared: false,
            idle_timeout: idle.as_ref().ok().copied().flatten(),
            idle_env_error: idle.err(),
            socket_activation: false,
            shared_memory: crate::transport::shm::DEFAULT_SHM,
            ring_capacity: crate::transport::shm::DEFAULT_RING_CAPACITY,
        }
    }
}

/// `MICROCS_IDLE_TIMEOUT` (seconds, or a number with `ms`, `s`, `m`, `h`), which activation
/// gives a server it starts; `Err` with the message when it is set but malformed.
fn idle_timeout_from_env() -> std::result::Result<Option<Duration>, String> {
    use crate::activation::ENV_IDLE_TIMEOUT;
    match std::env::var(ENV_IDLE_TIMEOUT) {
        Ok(v) if !v.trim().is_empty() => crate::activation::parse_duration(&v).map(Some).map_err(|m| {
            format!(
                "{ENV_IDLE_TIMEOUT}={v:?}: {m}; fix or unset the variable (a service started from its \
                 definition gets it from the definition's idle_timeout)"
            )
        }),
        Ok(_) => Ok(None),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => Err(format!("{ENV_IDLE_TIMEOUT} is not UTF-8")),
    }
}

impl Config {
    /// Whether a peer with this uid may connect.
    pub(crate) fn allows(&self, uid: u32) -> bool {
        self.allow_any_user || uid == crate::registry::euid() || self.allowed_uids.contains(&uid)
    }

    /// The peer of a connection just accepted, as the kernel reports it, if it may use the
    /// service. `Err`: drop the connection, after sending the refusal when there is one.
    pub(crate) fn check_peer(
        &self,
        service: &Name,
        link: impl std::os::fd::AsFd,
    ) -> std::result::Result<Peer, Option<Out>> {
        let peer = peer_credentials(link).map_err(|e| {
            tracing::warn!(error = %e, "cannot read peer credentials; dropping connection");
            None
        })?;
        if !self.allows(peer.uid) {
            tracing::warn!(service = %service, uid = peer.uid, pid = peer.pid, "refused a peer of another user");
            return Err(Some(server_conn::other_user(service.as_str(), peer.uid, registry::euid())));
        }
        Ok(peer)
    }
}
