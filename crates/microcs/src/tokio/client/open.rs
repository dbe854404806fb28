//! Opening a client's connections: the live one or a new one (at most one opening at a time),
//! the instances' pool and its refresh, and the handshake of a new connection.

use std::io;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use ::tokio::sync::Notify;
use ::tokio::time::{Instant, timeout_at};

use super::super::io::{Outbox, Stream, write_all};
use super::conn::{Book, Conn, connect, deadline_task, read_frame, start_reader, writer_task};
use super::{Client, MAX_POOL};
use crate::error::{Error, ErrorKind, Result};
use crate::io::ReadBuf;
use crate::proto;
use crate::proto::client_conn::{self, Loss};
use crate::registry;
use crate::transport::shm::ShmLink;

/// How often a client of instances looks for instances it is not connected to.
pub(super) const REFRESH: Duration = Duration::from_secs(1);

impl Client {
    /// The live connection, opening one if needed.
    pub(super) async fn connection(&self, deadline: Instant) -> Result<Arc<Conn>> {
        if let Some(c) = self.shared.current() {
            return Ok(c);
        }
        let timed_out = || {
            Error::new(
                ErrorKind::TimedOut,
                format!(
                    "service '{}' did not accept the connection within {:?}",
                    self.shared.name, self.timeout
                ),
            )
        };
        let _one_at_a_time =
            timeout_at(deadline, self.shared.connecting.lock()).await.map_err(|_| timed_out())?;
        if let Some(c) = self.shared.current() {
            return Ok(c);
        }
        let conn = self.open(deadline).await?;
        let old = {
            let mut pool = self.shared.pool();
            // An instance: look for the others at the next request.
            pool.refresh = conn.slot.filter(|_| self.shared.instance.is_none()).map(|_| Instant::now());
            pool.last_path = Some(conn.path.clone());
            std::mem::replace(&mut pool.conns, vec![conn.clone()])
        };
        for old in old {
            old.retire();
        }
        Ok(conn)
    }

    /// A background task connects to the instances this client has no connection to yet (see
    /// `Shared::current_at`, which says when).
    pub(super) fn spawn_refresh(&self) {
        let client = self.clone();
        ::tokio::spawn(async move { client.refresh().await });
    }

    async fn refresh(&self) {
        let s = &self.shared;
        let Ok(_one_at_a_time) = s.connecting.try_lock() else { return };
        let Ok(targets) = registry::targets(&s.dir, &s.name, s.instance) else { return };
        let have: Vec<Option<u32>> = {
            let mut pool = s.pool();
            pool.conns.retain(|c| c.is_usable());
            pool.conns.iter().map(|c| c.slot).collect()
        };
        let deadline = Instant::now() + self.timeout;
        let new = targets.into_iter().filter(|t| t.slot.is_some() && !have.contains(&t.slot));
        for target in new.take(MAX_POOL.saturating_sub(have.len())) {
            match self.open_at(&target, deadline).await {
                Ok(conn) => {
                    tracing::debug!(service = %s.name, slot = ?target.slot, "connected to another instance");
                    s.pool().conns.push(conn);
                }
                Err(e) => tracing::debug!(service = %s.name, error = %e, "an instance did not answer"),
            }
        }
    }

    /// Opens a connection to the service (its exclusive server, or the least-loaded instance
    /// that answers); when nobody serves it, starts it from its definition first (see
    /// [`activation`](crate::activation)), off the runtime's threads.
    async fn open(&self, deadline: Instant) -> Result<Arc<Conn>> {
        let s = &self.shared;
        match self.open_served(deadline).await {
            Err(e)
                if e.kind() == ErrorKind::NoService
                    && s.activate
                    && s.instance.is_none()
                    && registry::check_dir_exists(&s.dir).is_ok() =>
            {
                let (dir, name) = (s.dir.clone(), s.name.clone());
                ::tokio::task::spawn_blocking(move || crate::activation::activate(&dir, &name, e, None))
                    .await
                    .map_err(|e| {
                        Error::io("cannot start the service", std::io::Error::other(e.to_string()))
                    })??;
                *s.activated.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
                // Starting took its own time (the definition's start timeout): the call gets
                // its full timeout from here.
                self.open_served(Instant::now() + self.timeout).await
            }
            Err(e)
                if e.kind() == ErrorKind::NoService
                    && !s.activate
                    && registry::check_dir_exists(&s.dir).is_ok() =>
            {
                Err(crate::activation::not_started(&s.name, e))
            }
            r => r,
        }
    }

    async fn open_served(&self, deadline: Instant) -> Result<Arc<Conn>> {
        let s = &self.shared;
        let name = &s.name;
        let exists = if s.explicit_dir {
            registry::check_foreign_dir_exists(&s.dir)?
        } else {
            registry::check_dir_exists(&s.dir)?
        };
        if !exists {
            return Err(client_conn::no_service(name, &s.dir, ""));
        }
        let mut last = None;
        for target in registry::targets(&s.dir, name, s.instance)? {
            match self.open_at(&target, deadline).await {
                Ok(conn) => return Ok(conn),
                // An instance that is gone (killed since we looked, or dying during the
                // handshake, before any request was sent): the next one.
                Err(e) if client_conn::instance_gone(&e) && target.slot.is_some() => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| client_conn::no_service(name, &s.dir, "")))
    }

    /// Opens a connection to one socket of the service, shakes hands (asking for shared memory
    /// if configured) and starts its reader and writer tasks.
    async fn open_at(&self, target: &registry::Target, deadline: Instant) -> Result<Arc<Conn>> {
        let mut ask = self.shared.shm;
        loop {
            match self.open_at_with(target, deadline, ask).await? {
                Some(conn) => return Ok(conn),
                // The offer could not be used; nothing was sent: again, on the socket.
                None => ask = false,
            }
        }
    }

    /// [`open_at`](Self::open_at), asking for shared memory if `ask`; `None`: the server offered
    /// it and the offer was refused (PROTOCOL.md § 18.1 step 3).
    async fn open_at_with(
        &self,
        target: &registry::Target,
        deadline: Instant,
        ask: bool,
    ) -> Result<Option<Arc<Conn>>> {
        let s = &self.shared;
        let name = &s.name;
        let path = &target.path;
        // For the message of a server that does not answer; only after a timeout (a `stat`, an
        // `open` and a `flock` that never block).
        let holder = || registry::holder(&s.dir, name);
        let stream = match timeout_at(deadline, connect(path)).await {
            Err(_) => return Err(client_conn::connect_timed_out(name, self.timeout, holder())),
            Ok(Ok(stream)) => {
                crate::transport::unix::set_send_buffer(&stream, s.send_buffer);
                stream.into_std().and_then(|s| Stream::new(s.into())).map_err(|e| {
                    Error::io(format_args!("cannot watch the connection to {}", path.display()), e)
                })?
            }
            Ok(Err(e)) => {
                return Err(client_conn::connect_failed(name, &s.dir, path, self.timeout, holder, e));
            }
        };
        let mut rbuf = ReadBuf::default();
        let decode_limit = client_conn::decode_limit(s.max_payload);
        // The shared-memory offer's descriptors come with the HelloAck's bytes.
        let mut fds = Vec::new();
        let handshake = async {
            let features = if ask { proto::FEATURE_SHM } else { 0 };
            let sent = write_all(&stream, &client_conn::hello(s.max_payload, features), None, &mut 0).await;
            // A server that refuses us (busy, another user) writes why and closes without
            // reading: our hello may then fail with EPIPE, but its answer is still there to read.
            let got = read_frame(&stream, &mut rbuf, decode_limit, ask.then_some(&mut fds), |f| {
                client_conn::handshake_answer(name, path, f)
            })
            .await;
            match (sent, got) {
                (_, Ok(answer)) => answer,
                (Err(e), Err(_)) => Err(Loss::from_io(e).handshake_error(name, path)),
                (Ok(()), Err(loss)) => Err(loss.handshake_error(name, path)),
            }
        };
        let server = timeout_at(deadline, handshake)
            .await
            .map_err(|_| client_conn::handshake_timed_out(name, path, self.timeout, holder()))??;
        if server.features & proto::FEATURE_SHM != 0 {
            let accepted = if ask && rbuf.is_empty() {
                ShmLink::accept(std::mem::take(&mut fds), server.ring_capacity)
                    .and_then(|l| stream.upgrade(l))
            } else {
                Err(io::Error::new(io::ErrorKind::InvalidData, "an offer this client did not ask for"))
            };
            if let Err(e) = accepted {
                tracing::warn!(service = %name, error = %e, "cannot use the shared memory offered; using the socket");
                return Ok(None);
            }
        }
        let transport = stream.link().transport_name();
        tracing::debug!(service = %name, pid = server.pid, transport, "connected");
        let conn = Arc::new(Conn {
            stream,
            server,
            outbox: Outbox::new(Book::default()),
            deadlines: Notify::new(),
            slot: target.slot,
            reader: Default::default(),
            path: target.path.clone(),
            usable: AtomicBool::new(true),
        });
        ::tokio::spawn(writer_task(conn.clone()));
        start_reader(&conn, rbuf, decode_limit);
        ::tokio::spawn(deadline_task(conn.clone()));
        Ok(Some(conn))
    }
}
