//! Claiming the name and binding its socket (or adopting a passed one), the lock file's
//! metadata line, the load record, and the watch that takes the name back.

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use super::{Config, Identity};
use crate::error::{Error, ErrorKind, Result};
use crate::name::Name;
use crate::proto;
use crate::registry::{self, Claim, Meta};

/// The lock file's metadata line for this server.
pub(crate) fn meta(started_ms: u64, identity: &Identity, id: &str, methods: &[String]) -> Meta {
    Meta {
        pid: std::process::id(),
        uid: registry::euid(),
        started_ms,
        protocol: proto::VERSION,
        version: identity.version.clone(),
        id: id.to_owned(),
        methods: methods.to_vec(),
        // The instance id exists once the server serves; before that the entry only names the
        // owner (for `NameTaken`), and `list()` does not show it.
        ready: !id.is_empty(),
        // Set by the claim (`Claim::write_meta`), which knows.
        inherited: false,
    }
}

/// A claimed name with its socket bound: what every server flavour starts from.
pub(crate) struct Bound {
    pub name: Name,
    pub dir: PathBuf,
    pub claim: Claim,
    /// Non-blocking, so that the async server can adopt it as is.
    pub listener: UnixListener,
    pub started_ms: u64,
}

/// Validates the name, claims it in the runtime directory (default: [`registry::runtime_dir`])
/// and binds its socket.
///
/// # Errors
///
/// [`ErrorKind::InvalidName`], [`ErrorKind::NameTaken`], [`ErrorKind::PermissionDenied`],
/// [`ErrorKind::Io`].
pub(crate) fn claim_and_bind(
    name: String,
    dir: Option<PathBuf>,
    identity: &Identity,
    config: &Config,
) -> Result<Bound> {
    let name = Name::new(name)?;
    if let Some(e) = &config.idle_env_error {
        return Err(Error::new(ErrorKind::InvalidConfig, e.clone()));
    }
    let dir = dir.unwrap_or_else(registry::runtime_dir);
    let shared = config.shared;
    if shared && config.socket_activation {
        return Err(Error::new(
            ErrorKind::InvalidConfig,
            format!(
                "'{name}': socket activation serves a name from one socket, so it cannot be combined \
                 with shared instances (each instance binds a socket of its own); drop one of the two"
            ),
        ));
    }
    registry::socket_path(&dir, &name)?;
    registry::ensure_dir(&dir)?;
    let mut claim = if shared { Claim::take_instance(&dir, &name)? } else { Claim::take(&dir, &name)? };
    let started_ms = registry::now_ms();
    // The name is claimed first (the flock), so the ownership rules hold for a socket-activated
    // server too: a second one gets `NameTaken` and never touches the socket.
    let inherited = if config.socket_activation {
        crate::transport::inherited::take_listener(claim.socket_path())?
    } else {
        None
    };
    let listener = match inherited {
        Some(listener) => {
            claim.adopt()?;
            listener
        }
        None => claim.bind()?,
    };
    // Owner's pid for competitors' `NameTaken`; not ready (not listed) until the server serves.
    claim.write_meta(&meta(started_ms, identity, "", &[]))?;
    tracing::debug!(service = %name, path = %claim.socket_path().display(), slot = ?claim.slot(), "bound");
    Ok(Bound { name, dir, claim, listener, started_ms })
}

/// Records an instance's open connections in its slot file (the load signal clients balance
/// on; see `registry`), from the connection table's size. Both flavours call it with the table
/// still locked, so that the records of two changes cannot land out of order. Nothing for an
/// exclusive server.
pub(crate) fn record_connections(claim: &Mutex<Option<Claim>>, n: usize) {
    if let Some(c) = claim.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
        c.set_connections(n);
    }
}

/// How often a server's accept loop checks that its name's files are still its own (see
/// [`watch_name`]); so a server notices within about 1 s that they were removed or replaced,
/// and is reachable again (or stopped) within 2 s.
pub(crate) const WATCH_PERIOD: Duration = Duration::from_secs(1);

/// What an accept loop does after [`watch_name`].
pub(crate) enum Watch {
    /// Serve on as before.
    Keep,
    /// The socket was bound again: accept on this listener from now on (the old one's path is
    /// gone; connections already accepted are not affected).
    Serve(UnixListener),
    /// The name is lost (another server owns it now, or the way to take it back is blocked):
    /// stop serving, and report this error from `serve` / `wait`.
    Stop(Error),
}

/// Checks that the runtime files of `claim` are still its own and, when they were removed or
/// replaced (a tmp cleaner, someone tidying up the runtime directory), takes the name back
/// while it is free — or gives it up, with an error that says why, when another server owns it
/// now. Both server flavours call it from their accept loops every [`WATCH_PERIOD`]; when all
/// is well it costs three `stat` calls, and nothing per request.
pub(crate) fn watch_name(claim: &mut Claim) -> Watch {
    if claim.intact() {
        return Watch::Keep;
    }
    let (name, dir) = (claim.name().clone(), claim.dir().to_owned());
    match claim.restore() {
        Ok(listener) => {
            tracing::warn!(service = %name, path = %claim.socket_path().display(), "the runtime files of this service were removed or replaced; took the name back");
            listener.map_or(Watch::Keep, Watch::Serve)
        }
        // Out of descriptors, disk full, ...: may pass; try again at the next check.
        Err(e) if e.kind() == ErrorKind::Io => {
            tracing::warn!(service = %name, error = %e, "the runtime files of this service were removed or replaced, and taking the name back failed; trying again in {WATCH_PERIOD:?}");
            Watch::Keep
        }
        Err(e) => {
            let e = Error::name_lost(name.as_str(), &dir, e);
            tracing::error!(service = %name, owner_pid = ?e.owner_pid(), "{e}");
            Watch::Stop(e)
        }
    }
}
