//! The builder options both server flavours, and both client flavours, share: macros expanded
//! inside each flavour's builder, so that one definition (code and documentation) serves both.

/// The builder options every server flavour shares, expanded inside each flavour's
/// `impl ServerBuilder` (both have the fields `config`, `identity`, `dir` and `error`), so that one
/// definition — code and documentation — serves both APIs.
macro_rules! common_server_options {
    () => {
        /// Largest request payload to accept, in bytes (default 16 MiB). Announced to clients, which
        /// refuse larger payloads before sending them.
        pub fn max_frame(mut self, bytes: u32) -> Self {
            self.config.max_payload = bytes;
            self
        }

        /// Connections served at once (default 1024). Past it, a new connection is told the service
        /// is busy and closed.
        pub fn max_connections(mut self, n: usize) -> Self {
            self.config.max_connections = n.max(1);
            self
        }

        /// Connections allowed to be still in their handshake at once (default 64). When a new
        /// connection would exceed it, the oldest silent one is dropped, so a flood of connections
        /// that never say hello (slowloris) cannot lock real clients out.
        pub fn max_pending_handshakes(mut self, n: usize) -> Self {
            self.config.max_handshaking = n.max(1);
            self
        }

        /// How long a new connection may take to say hello (default 5 s).
        pub fn handshake_timeout(mut self, timeout: Duration) -> Self {
            self.config.handshake_timeout = timeout;
            self
        }

        /// How long a frame, once started, may take to arrive in full (default 10 s).
        pub fn frame_timeout(mut self, timeout: Duration) -> Self {
            self.config.frame_timeout = timeout;
            self
        }

        /// How long a reply may wait for a client that does not read (default 30 s); then the
        /// connection is dropped.
        pub fn write_timeout(mut self, timeout: Duration) -> Self {
            self.config.write_timeout = timeout;
            self
        }

        /// Also accepts peers running as user `uid` (by default only the server's own user may
        /// connect; the kernel reports the peer's uid, so it cannot be faked).
        pub fn allow_uid(mut self, uid: u32) -> Self {
            self.config.allowed_uids.push(uid);
            self
        }

        /// Accepts peers of any user. The runtime directory is still private, so this matters only
        /// for a socket placed in a shared directory.
        pub fn allow_any_user(mut self) -> Self {
            self.config.allow_any_user = true;
            self
        }

        /// Kernel send buffer to ask for on each connection, in bytes (default 1 MiB; 0 keeps the
        /// system's default, `net.core.wmem_default`).
        ///
        /// A reply larger than the buffer crosses the socket in buffer-sized rounds, each costing
        /// both sides a sleep and a wake-up; with room for the whole reply it goes out in one
        /// system call. The kernel caps the value at `net.core.wmem_max` and counts it double.
        /// Memory is only taken while replies wait for a client to read them, so idle
        /// connections cost nothing more; the most a connection can pin is this buffer (twice
        /// over, as the kernel counts) until the [write timeout](Self::write_timeout) drops a
        /// client that does not read.
        pub fn send_buffer(mut self, bytes: usize) -> Self {
            self.config.send_buffer = bytes;
            self
        }

        /// Offers shared memory to clients that ask for it (default: off; PROTOCOL.md § 18).
        ///
        /// A connection that uses it moves its frames through two rings in a sealed memfd
        /// instead of the socket (same frames, same rules); its threads spin for a few
        /// microseconds while waiting for the next frame, then sleep, so an idle connection
        /// costs no CPU. Clients that do not ask, and older ones, use the socket as before.
        /// Each such connection maps `4 KiB + 2 x` the [ring capacity](Self::ring_capacity).
        pub fn shared_memory(mut self, on: bool) -> Self {
            self.config.shared_memory = on;
            self
        }

        /// Bytes of each of a shared-memory connection's two rings (default 256 KiB): a power
        /// of two from 4 KiB to 64 MiB (what every client accepts, PROTOCOL.md § 18.1). The
        /// server decides and announces it in the handshake; it matters only with
        /// [`shared_memory`](Self::shared_memory) on.
        ///
        /// A frame larger than a ring still goes through it, in ring-sized pieces, as through a
        /// full socket buffer. Larger rings let large frames cross with fewer waits; smaller ones
        /// bound what a connection keeps resident (a ring page, once a frame touched it, stays
        /// resident for the connection's life): each connection maps `4 KiB + 2 x` this.
        /// Another value is reported by `bind` as
        /// [`ErrorKind::InvalidConfig`](crate::ErrorKind::InvalidConfig).
        pub fn ring_capacity(mut self, bytes: u32) -> Self {
            if !crate::transport::shm::ring::valid_capacity(bytes) && self.error.is_none() {
                self.error = Some(crate::transport::shm::ring::capacity_error(bytes));
            }
            self.config.ring_capacity = bytes;
            self
        }

        /// The service version reported by `$info` (SemVer; default `0.1.0`).
        pub fn version(mut self, version: &str) -> Self {
            self.identity.version = version.to_owned();
            self
        }

        /// The description reported by `$info`.
        pub fn description(mut self, text: &str) -> Self {
            self.identity.description = text.to_owned();
            self
        }

        /// Adds a metadata entry reported by `$ping`, `$info` and `$stats`.
        pub fn metadata(mut self, key: &str, value: &str) -> Self {
            self.identity.metadata.insert(key.to_owned(), value.to_owned());
            self
        }

        /// Uses this runtime directory instead of the default one.
        pub fn runtime_dir(mut self, dir: impl Into<PathBuf>) -> Self {
            self.dir = Some(dir.into());
            self
        }

        /// Joins the name as one of several *instances* instead of owning it alone: each
        /// instance owns a slot of the name (up to
        /// [`MAX_INSTANCES`](crate::registry::MAX_INSTANCES)), clients connect to the
        /// least-loaded live one, and a crashed instance's slot is reclaimed like a crashed
        /// server's name. Use it for worker processes behind one name (a CPU-bound handler,
        /// Python handlers bound to one core each).
        ///
        /// By default a server owns its name exclusively, and a second server gets
        /// [`ErrorKind::NameTaken`](crate::ErrorKind::NameTaken). Exclusive servers and
        /// instances never mix: an instance cannot join a name an exclusive server owns, nor
        /// an exclusive server take a name instances serve (both get `NameTaken`, saying
        /// which). `$info` and `$stats` answer for the instance a connection reached.
        ///
        /// # Examples
        ///
        /// ```
        /// # let dir = std::env::temp_dir().join(format!("microcs-doc-shared-{}", std::process::id()));
        /// use microcs::{Client, Request, Server};
        /// let workers: Vec<_> = (0..2)
        ///     .map(|_| {
        ///         Server::builder("WORKERS_DOC")
        ///             # .runtime_dir(&dir)
        ///             .shared()
        ///             .bind()?
        ///             .spawn(|req: Request| Ok::<_, microcs::RemoteError>(req.into_payload()))
        ///     })
        ///     .collect::<microcs::Result<_>>()?;
        /// let mut client = Client::builder("WORKERS_DOC")
        ///     # .runtime_dir(&dir)
        ///     .connect()?;
        /// assert_eq!(client.request(b"hi")?, b"hi");
        /// assert_eq!(microcs::registry::list_in(&dir)?.len(), 2);
        /// for w in workers {
        ///     w.shutdown();
        /// }
        /// # Ok::<(), microcs::Error>(())
        /// ```
        pub fn shared(mut self) -> Self {
            self.config.shared = true;
            self
        }

        /// Stops serving (as a shutdown does: running requests finish, the name is freed)
        /// after `timeout` without requests; `serve` / `wait` then return `Ok`. Checked every
        /// second. By default a server started by [activation](crate::activation) gets its
        /// definition's idle timeout (from `MICROCS_IDLE_TIMEOUT`), so that the next call
        /// starts it again; any other server runs until it is stopped. `None` turns it off.
        /// Without this option, a malformed `MICROCS_IDLE_TIMEOUT` (not seconds or a number
        /// with `ms`, `s`, `m`, `h`) is an [`ErrorKind::InvalidConfig`](crate::ErrorKind::InvalidConfig)
        /// error at bind; this option overrides the variable.
        pub fn idle_timeout(mut self, timeout: Option<Duration>) -> Self {
            self.config.idle_timeout = timeout;
            self.config.idle_env_error = None;
            self
        }

        /// Serves on the listening socket a service manager passed to this process —
        /// systemd socket activation (`LISTEN_PID`, `LISTEN_FDS`, `LISTEN_FDNAMES`; see
        /// `sd_listen_fds(3)` and docs/ACTIVATION.md) — instead of binding one (default: off).
        ///
        /// The socket must be the name's socket in the runtime directory: the `.socket` unit
        /// says `ListenStream=%t/microcs/NAME.sock` (with `DirectoryMode=0700` and
        /// `SocketMode=0600`), and the service runs with that runtime directory. The server
        /// still claims the name (its lock), so a name keeps one live owner; a passed socket
        /// bound elsewhere, or not a listening Unix stream socket, is an
        /// [`ErrorKind::InvalidConfig`](crate::ErrorKind::InvalidConfig) error at bind that says
        /// what was passed and what the unit must say. When nothing was passed to this process
        /// (started by hand, or `LISTEN_PID` is another process's), the server binds its socket
        /// as usual, so one command line works both ways. The socket is left in place when the
        /// server stops (it is the manager's), so the next connection starts the service again:
        /// with an [idle timeout](Self::idle_timeout) the service runs only while used.
        ///
        /// The passed descriptors are taken once per process, the first time a server asks:
        /// the three variables are removed from the environment then (so programs this one
        /// starts do not see them; do it before starting threads that call C code reading the
        /// environment) and every passed socket is kept for the servers of this process, each
        /// taking the one bound to its own path. Do not hand them to another socket-activation
        /// library as well. Not with [`shared`](Self::shared) (an error).
        pub fn socket_activation(mut self, on: bool) -> Self {
            self.config.socket_activation = on;
            self
        }
    };
}
pub(crate) use common_server_options;

/// The builder options both client flavours share, expanded inside each flavour's
/// `impl ClientBuilder` (both have the fields `timeout`, `max_payload`, `send_buffer`,
/// `window`, `instance` and `dir`): one definition, code and documentation, for both APIs.
macro_rules! common_client_options {
    () => {
        /// Time each request may take, from the call to the reply (default 30 s). The server
        /// sees the deadline. Also bounds connecting.
        pub fn timeout(mut self, timeout: Duration) -> Self {
            self.timeout = timeout;
            self
        }

        /// Largest reply payload to accept (default 16 MiB); the server refuses larger replies
        /// with [`ErrorKind::FrameTooLarge`](crate::ErrorKind::FrameTooLarge) instead of
        /// sending them.
        pub fn max_frame(mut self, bytes: u32) -> Self {
            self.max_payload = bytes;
            self
        }

        /// Kernel send buffer to ask for on each connection, in bytes (default 1 MiB; 0 keeps
        /// the system's default, `net.core.wmem_default`).
        ///
        /// A request larger than the buffer crosses the socket in buffer-sized rounds, each
        /// costing both sides a sleep and a wake-up; with room for the whole request it goes out
        /// in one system call. The kernel caps the value at `net.core.wmem_max` and counts it
        /// double; memory is only taken while a request waits for the server to read it.
        pub fn send_buffer(mut self, bytes: usize) -> Self {
            self.send_buffer = bytes;
            self
        }

        /// How far ahead of the application a stream's server may send (docs/PROTOCOL.md
        /// § 17): at most `items` items and about `bytes` bytes (one item may overshoot) wait
        /// unread on this side; the default is 64 items and 1 MiB. More room is granted as the
        /// application takes items, so a consumer that stops reading stops the server after one
        /// window. Zero counts as one.
        pub fn stream_window(mut self, items: u32, bytes: u32) -> Self {
            self.window = crate::proto::Credit { items: items.max(1), bytes: bytes.max(1) };
            self
        }

        /// Connects to this instance of the name only (its slot, as
        /// [`ServiceInfo::instance`](crate::registry::ServiceInfo::instance) lists it), never
        /// to another: for tools that ask each instance in turn (`microcs ls`, `stats
        /// --instance`). [`ErrorKind::NoService`](crate::ErrorKind::NoService) when that slot
        /// has no socket.
        pub fn instance(mut self, slot: u32) -> Self {
            self.instance = Some(slot);
            self
        }

        /// Whether a call to a name nobody serves starts the service from its definition
        /// (see [`activation`](crate::activation); default on, unless `MICROCS_NO_ACTIVATION`
        /// is set). Off, such a call fails with
        /// [`ErrorKind::NoService`](crate::ErrorKind::NoService) at once, as it does when no
        /// definition exists. Only in a runtime directory of this user: never in another
        /// user's (named with [`runtime_dir`](Self::runtime_dir)).
        pub fn activate(mut self, on: bool) -> Self {
            self.activate = on;
            self
        }

        /// Asks the server for shared memory (PROTOCOL.md § 18): when it offers it, frames move
        /// through two rings in a memfd instead of the socket, at memory speed while requests
        /// flow, and the wait for an answer sleeps after a few microseconds of spinning (no CPU
        /// while idle). A server that does not offer it is used over the socket, silently.
        ///
        /// Default: the environment variable `MICROCS_SHM` (`1` on, `0` off), else off.
        /// Both flavours of client use it.
        pub fn shared_memory(mut self, on: bool) -> Self {
            self.shared_memory = Some(on);
            self
        }

        /// Looks for the service in this runtime directory instead of the default one.
        ///
        /// The default directory must belong to this user; a directory named here may belong to
        /// another user (to call a service that [allows](crate::ServerBuilder::allow_uid) this
        /// one), but nobody other than its owner may be able to write to it.
        pub fn runtime_dir(mut self, dir: impl Into<PathBuf>) -> Self {
            self.dir = Some(dir.into());
            self
        }
    };
}
pub(crate) use common_client_options;
