//! The clients' read-only questions: where to connect for a name, whether to move to another
//! instance, whether the name is served, and who holds it. Nothing is reclaimed here.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use rustix::fs::FlockOperation;

use super::files::{lock_path, open_lock, read_meta, socket_path};
use super::slots::{Instance, instances, slot_socket_path};
use crate::error::{Error, Result};
use crate::name::Name;

/// Where a client should connect for `name` in `dir`, best first: the exclusive socket when
/// there is one (nothing else is looked at, so an exclusive name costs one `lstat` more per
/// connect than before instances existed); else the ready instances, least-loaded first, ties in
/// random order (so that callers connecting at the same moment spread instead of all picking
/// the first slot). Empty when neither exists.
///
/// With `only`, just that instance slot, when its socket exists (for tools that ask each
/// instance in turn).
pub(crate) fn targets(dir: &Path, name: &Name, only: Option<u32>) -> Result<Vec<Target>> {
    if let Some(slot) = only {
        let path = slot_socket_path(dir, name, slot)?;
        let there = fs::symlink_metadata(&path).is_ok();
        return Ok(there.then_some(Target { path, slot: Some(slot) }).into_iter().collect());
    }
    let sock = socket_path(dir, name)?;
    if fs::symlink_metadata(&sock).is_ok() {
        return Ok(vec![Target { path: sock, slot: None }]);
    }
    let mut found: Vec<(u64, u64, Instance)> = instances(dir, name)
        .into_iter()
        .filter(|i| i.ready)
        .map(|i| (i.connections, random_u64(), i))
        .collect();
    found.sort_by_key(|(load, tie, _)| (*load, *tie));
    Ok(found.into_iter().map(|(_, _, i)| Target { path: i.socket, slot: Some(i.slot) }).collect())
}

/// Whether `name` is served in `dir` now: its exclusive owner's metadata says it serves, or one
/// of its instances' does. Read-only (nothing is reclaimed); what activation waits for.
pub(crate) fn served(dir: &Path, name: &Name) -> bool {
    let exclusive = open_lock(&lock_path(dir, name), false).ok().is_some_and(|file| {
        matches!(
            rustix::fs::flock(&file, FlockOperation::NonBlockingLockShared),
            Err(rustix::io::Errno::WOULDBLOCK)
        ) && read_meta(&file).is_some_and(|m| m.ready)
    });
    exclusive || instances(dir, name).iter().any(|i| i.ready)
}

/// `<dir>/<name>.start`, the lock a client starting the service holds (see `activation`),
/// opened (created 0600).
pub(crate) fn start_lock(dir: &Path, name: &Name) -> Result<File> {
    let path = dir.join(format!("{name}.start"));
    open_lock(&path, true).map_err(|e| Error::io(format_args!("cannot open {}", path.display()), e))
}

/// One place to connect to (see [`targets`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Target {
    pub path: PathBuf,
    /// The instance slot; `None` for an exclusive server.
    pub slot: Option<u32>,
}

/// When a client connected to instance `slot` should move, and where: when another ready
/// instance has at least two connections fewer than this one (which counts this client's), so
/// moving evens the load instead of swapping it.
pub(crate) fn better_instance(dir: &Path, name: &Name, slot: u32) -> Option<Target> {
    let all = instances(dir, name);
    let mine = all.iter().find(|i| i.slot == slot)?.connections;
    let best =
        all.iter().filter(|i| i.ready && i.slot != slot).min_by_key(|i| (i.connections, random_u64()))?;
    (best.connections + 2 <= mine).then(|| Target { path: best.socket.clone(), slot: Some(best.slot) })
}

/// A random number, from the process's hash keys and the clock (no dependency, not for secrets).
pub(crate) fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos());
    h.finish()
}

/// The pid of the live server holding `name` in `dir`, if one does; `None` when nobody holds
/// its lock or it cannot be read. Read-only: unlike [`list`](super::list), nothing is
/// reclaimed. For the clients, to tell a server that holds its name but does not answer from a
/// socket that is not a microcs service at all.
pub(crate) fn holder(dir: &Path, name: &Name) -> Option<u32> {
    let file = open_lock(&lock_path(dir, name), false).ok()?;
    // A shared lock is enough to test: it conflicts only with an owner's exclusive one, and is
    // released when `file` closes.
    match rustix::fs::flock(&file, FlockOperation::NonBlockingLockShared) {
        Err(rustix::io::Errno::WOULDBLOCK) => read_meta(&file).map(|m| m.pid),
        _ => None,
    }
}
