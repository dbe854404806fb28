//! Opening a blocking client's connection: to the name's exclusive server or the least-loaded
//! instance that answers (starting the service from its definition first when nobody serves
//! it), the handshake, and moving to a less-loaded instance later (a child module of `client`).

use std::io;
use std::time::{Duration, Instant};

use super::{Client, Connection, Wait, next_recheck};
use crate::error::{ErrorKind, Result};
use crate::fork;
use crate::io::ReadBuf;
use crate::proto::client_conn::{self, Loss};
use crate::proto::{FEATURE_SHM, HelloAck};
use crate::registry;
use crate::transport::send_bytes;
use crate::transport::shm::ShmLink;
use crate::transport::unix::{connect_with_timeout, set_send_buffer};

impl Client {
    /// Connected to an instance, and its time to look at the others has come: moves to a
    /// less-loaded one, if there is one and it answers (else stays).
    pub(super) fn rebalance(&mut self, now: Instant, deadline: Instant) {
        let Some(conn) = self.conn.as_mut() else { return };
        let Some(slot) = conn.slot.filter(|_| now >= conn.recheck && self.instance.is_none()) else { return };
        conn.recheck = next_recheck(now);
        let Some(target) = registry::better_instance(&self.dir, &self.name, slot) else { return };
        match self.open_at(&target, deadline) {
            Ok(new) => {
                tracing::debug!(service = %self.name, from = slot, to = ?target.slot, "moved to a less-loaded instance");
                self.path = target.path;
                self.conn = Some(new);
            }
            Err(e) => {
                tracing::debug!(service = %self.name, error = %e, "a less-loaded instance did not answer")
            }
        }
    }

    /// Opens a connection to the service (its exclusive server, or the least-loaded instance
    /// that answers) and shakes hands; when nobody serves it, starts it from its definition
    /// first (see [`activation`](crate::activation)).
    pub(super) fn open(&mut self, deadline: Instant) -> Result<Connection> {
        match self.open_served(deadline) {
            Err(e) if e.kind() == ErrorKind::NoService && self.may_activate() => {
                let check = self.interrupt.as_ref();
                let interrupt =
                    check.map(|i| crate::activation::Interrupt { every: i.every, stop: &*i.stop });
                crate::activation::activate(&self.dir, &self.name, e, interrupt.as_ref())?;
                self.activated = Some(Instant::now());
                // Starting took its own time (the definition's start timeout): the call gets
                // its full timeout from here.
                self.open_served(Instant::now() + self.timeout)
            }
            Err(e)
                if e.kind() == ErrorKind::NoService
                    && !self.activate
                    && registry::check_dir_exists(&self.dir).is_ok() =>
            {
                Err(crate::activation::not_started(&self.name, e))
            }
            r => r,
        }
    }

    /// Activation is on, and the runtime directory is this user's (or does not exist yet).
    fn may_activate(&self) -> bool {
        self.activate && registry::check_dir_exists(&self.dir).is_ok() && self.instance.is_none()
    }

    fn open_served(&mut self, deadline: Instant) -> Result<Connection> {
        let name = &self.name;
        let exists = if self.explicit_dir {
            registry::check_foreign_dir_exists(&self.dir)?
        } else {
            registry::check_dir_exists(&self.dir)?
        };
        if !exists {
            return Err(client_conn::no_service(name, &self.dir, ""));
        }
        let mut last = None;
        for target in registry::targets(&self.dir, name, self.instance)? {
            match self.open_at(&target, deadline) {
                Ok(conn) => {
                    self.path = target.path;
                    return Ok(conn);
                }
                // An instance that is gone (killed since we looked, or dying during the
                // handshake, before any request was sent): the next one.
                Err(e) if client_conn::instance_gone(&e) && target.slot.is_some() => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| client_conn::no_service(name, &self.dir, "")))
    }

    /// Opens a connection to one socket of the service and shakes hands.
    fn open_at(&self, target: &registry::Target, deadline: Instant) -> Result<Connection> {
        self.open_at_with(target, deadline, self.shm)
    }

    /// [`open_at`](Self::open_at), asking for shared memory if `shm`.
    fn open_at_with(&self, target: &registry::Target, deadline: Instant, shm: bool) -> Result<Connection> {
        let name = &self.name;
        let path = &target.path;
        let remaining = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        let stream = connect_with_timeout(path, remaining).map_err(|e| {
            client_conn::connect_failed(name, &self.dir, path, self.timeout, || self.holder(), e)
        })?;
        set_send_buffer(&stream, self.send_buffer);
        let mut conn = Connection {
            stream: stream.into(),
            rbuf: ReadBuf::default(),
            server: placeholder_ack(),
            max_payload: client_conn::decode_limit(self.max_payload),
            rcv_timeout: Some(remaining),
            owner: fork::current(),
            slot: target.slot,
            recheck: next_recheck(Instant::now()),
        };
        let features = if shm { FEATURE_SHM } else { 0 };
        let sent = send_bytes(&conn.stream, &client_conn::hello(self.max_payload, features));
        // A server that refuses us (busy, another user) writes why and closes without reading:
        // our hello may then fail with EPIPE, but its answer is still there to read. The
        // shared-memory offer's descriptors come with the HelloAck's bytes.
        let mut fds = Vec::new();
        let got = conn.read_raw(deadline, self.interrupt.as_ref(), shm.then_some(&mut fds), |f| {
            client_conn::handshake_answer(name, path, f)
        });
        conn.server = match (sent, got) {
            (_, Ok((answer, _, _))) => answer?,
            (Err(e), Err(_)) => {
                return Err(Loss::from_io(e.error).handshake_error(name, path));
            }
            (Ok(()), Err(Wait::Lost(loss))) => return Err(loss.handshake_error(name, path)),
            (Ok(()), Err(Wait::TimedOut | Wait::Interrupted)) => {
                return Err(client_conn::handshake_timed_out(name, path, self.timeout, self.holder()));
            }
        };
        if conn.server.features & FEATURE_SHM != 0 {
            let accepted = if shm && conn.rbuf.is_empty() {
                ShmLink::accept(fds, conn.server.ring_capacity)
            } else {
                Err(io::Error::new(io::ErrorKind::InvalidData, "an offer this client did not ask for"))
            };
            match accepted {
                Ok(link) => conn.stream.upgrade(link),
                Err(e) => {
                    // Nothing was sent yet: connect again, on the socket (PROTOCOL.md § 18.1).
                    tracing::warn!(service = %name, error = %e, "cannot use the shared memory offered; using the socket");
                    drop(conn);
                    return self.open_at_with(target, deadline, false);
                }
            }
        }
        tracing::debug!(service = %name, pid = conn.server.pid, transport = conn.stream.transport_name(), "connected");
        Ok(conn)
    }
}

fn placeholder_ack() -> HelloAck {
    HelloAck::default()
}
