//! Listing the services that run in a runtime directory (and reclaiming crashed ones' files).

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustix::fs::FlockOperation;

use super::dir::{check_dir_exists, runtime_dir};
use super::files::{lock_path, open_lock, read_meta, remove_if_socket, same_file, socket_path};
use super::slots::{parse_slot, read_load, slot_lock_path, slot_socket_path};
use crate::error::{Error, Result};
use crate::name::Name;

/// A running service, as found by [`list`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServiceInfo {
    /// The service name.
    pub name: Name,
    /// The server's process id.
    pub pid: u32,
    /// The user the server runs as.
    pub uid: u32,
    /// When the server started.
    pub started: SystemTime,
    /// Wire protocol version the server speaks.
    pub protocol_version: u8,
    /// The service's version (SemVer), as in `$info`.
    pub version: String,
    /// Instance id, as in `$info`.
    pub id: String,
    /// Named methods besides the default handler.
    pub methods: Vec<String>,
    /// The Unix socket the service listens on.
    pub socket: PathBuf,
    /// The slot, when the server is one of several instances of the name (`None`: the name's
    /// exclusive owner).
    pub instance: Option<u32>,
    /// Open connections, as the instance last recorded them (instances only).
    pub connections: Option<u64>,
}

/// Lists the services running in this process's [`runtime_dir`], sorted by name (and the
/// instances of one name by slot).
///
/// A name served by several instances gives one entry per instance. A service is listed only
/// while its owner holds the lock, so a crashed server is never listed; its leftover files are
/// removed on the way.
///
/// # Errors
///
/// [`ErrorKind::PermissionDenied`](crate::ErrorKind::PermissionDenied) if the runtime directory
/// is unsafe; [`ErrorKind::Io`](crate::ErrorKind::Io) if it cannot be read. A missing directory
/// is an empty list.
///
/// # Examples
///
/// ```no_run
/// for svc in microcs::list()? {
///     println!("{} (pid {}): methods {:?}", svc.name, svc.pid, svc.methods);
/// }
/// # Ok::<(), microcs::Error>(())
/// ```
pub fn list() -> Result<Vec<ServiceInfo>> {
    list_in(&runtime_dir())
}

/// Like [`list`], in the given runtime directory.
///
/// # Errors
///
/// As [`list`].
pub fn list_in(dir: &Path) -> Result<Vec<ServiceInfo>> {
    if !check_dir_exists(dir)? {
        return Ok(Vec::new());
    }
    let entries = fs::read_dir(dir)
        .map_err(|e| Error::io(format_args!("cannot read runtime directory {}", dir.display()), e))?;
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(file_name) = file_name.to_str() else { continue };
        let found = if let Some((stem, slot)) = parse_slot(file_name) {
            let Ok(name) = Name::new(stem) else { continue };
            probe_slot(dir, &name, slot)
        } else {
            let Some(stem) = file_name.strip_suffix(".lock") else { continue };
            let Ok(name) = Name::new(stem) else { continue };
            probe(dir, &name)
        };
        match found {
            Ok(Some(info)) => out.push(info),
            Ok(None) => {}
            Err(e) => tracing::debug!(file = file_name, error = %e, "skipping unreadable registry entry"),
        }
    }
    out.sort_by(|a, b| (&a.name, a.instance).cmp(&(&b.name, b.instance)));
    Ok(out)
}

/// Looks at one name: its info if a live server owns it; `None` (after reclaiming leftovers) if not.
fn probe(dir: &Path, name: &Name) -> Result<Option<ServiceInfo>> {
    probe_entry(dir, name, None)
}

/// Looks at one instance slot, as [`probe`] at a name.
fn probe_slot(dir: &Path, name: &Name, slot: u32) -> Result<Option<ServiceInfo>> {
    probe_entry(dir, name, Some(slot))
}

fn probe_entry(dir: &Path, name: &Name, slot: Option<u32>) -> Result<Option<ServiceInfo>> {
    let (lock_path, sock_path) = match slot {
        None => (lock_path(dir, name), socket_path(dir, name)?),
        Some(k) => (slot_lock_path(dir, name, k), slot_socket_path(dir, name, k)?),
    };
    let file = match open_lock(&lock_path, false) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(format_args!("cannot open {}", lock_path.display()), e)),
    };
    match rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => {
            // Nobody holds it: the owner is gone. Reclaim, unless a new server re-created the
            // file between our open and our lock (then the path no longer names our inode). A
            // socket a service manager bound stays: it starts the service on the next call.
            if same_file(&file, &lock_path) {
                if !read_meta(&file).is_some_and(|m| m.inherited) {
                    remove_if_socket(&sock_path);
                }
                let _ = fs::remove_file(&lock_path);
                tracing::debug!(name = %name, slot, "reclaimed stale registry entry");
            }
            Ok(None)
        }
        // Locked, but (a name's lock) maybe by instances, which write no metadata there, or by
        // an owner still starting up (not serving yet): listed only with its metadata, ready.
        Err(rustix::io::Errno::WOULDBLOCK) => {
            let info = listed(&file, name, sock_path, slot);
            Ok(info.map(|i| ServiceInfo { connections: slot.map(|_| read_load(&file)), ..i }))
        }
        Err(e) => Err(Error::io(format_args!("cannot lock {}", lock_path.display()), e.into())),
    }
}

/// The entry of a held lock file, when its owner is serving.
fn listed(file: &File, name: &Name, socket: PathBuf, instance: Option<u32>) -> Option<ServiceInfo> {
    let meta = read_meta(file).filter(|m| m.ready)?;
    let uid = file.metadata().map(|m| m.uid()).unwrap_or(meta.uid);
    Some(ServiceInfo {
        name: name.clone(),
        pid: meta.pid,
        uid,
        started: UNIX_EPOCH + Duration::from_millis(meta.started_ms),
        protocol_version: meta.protocol,
        version: meta.version,
        id: meta.id,
        methods: meta.methods,
        socket,
        instance,
        connections: None,
    })
}
