//! The registry: where names live on disk, who owns them, and which services are running.
//!
//! There is no daemon. A server owns `<dir>/<name>.sock` by holding an exclusive `flock` on
//! `<dir>/<name>.lock` for its whole life (the pattern Wayland compositors and MUNGE use). The
//! kernel drops the lock when the process dies, however it dies, so a lock that can be taken
//! means the socket beside it is stale and may be replaced — while a live server, even one too
//! busy to accept, is never displaced. The lock file's first line holds the owner's metadata as
//! JSON (pid, start time, methods, ...), which [`list`] reads without connecting.
//!
//! # Instances
//!
//! A name may instead be served by several *instances* (servers built with `.shared()`), up to
//! [`MAX_INSTANCES`]. Each instance owns a slot `<dir>/<name>@<k>.sock` by holding an exclusive
//! `flock` on `<dir>/<name>@<k>.lock`, exactly as an exclusive server owns its name, so a
//! crashed instance's slot is reclaimed the same way. All instances also hold a *shared* `flock`
//! on `<dir>/<name>.lock`: shared locks coexist, and conflict with the exclusive lock an
//! exclusive server takes there, so a name is served either by one exclusive server or by
//! instances, never both (each side gets a `NameTaken` error that says which). `@` cannot
//! appear in a name, so slot files never collide with another name's files. Each slot file
//! carries, besides the metadata line, the instance's open connections at a fixed offset
//! ([`LOAD_OFFSET`]), rewritten on every accept and close: the load signal clients read to pick
//! the least-loaded instance (one `pread` per instance, no connection).
//!
//! The runtime directory is `$MICROCS_RUNTIME_DIR`, else `$XDG_RUNTIME_DIR/microcs`, else
//! `/tmp/microcs-<uid>`. It is created with mode 0700 and refused, with its path, owner and
//! mode in the message, when it is a symlink, owned by another user, or open to group or others.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rustix::fs::FlockOperation;
use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorKind, Result};
use crate::name::Name;

/// Longest socket path the kernel accepts (`sun_path` minus its terminating NUL).
const MAX_SOCKET_PATH: usize = 107;

/// The runtime directory this process uses, from the environment (not created or checked).
///
/// # Examples
///
/// ```
/// // SAFETY-free in a doctest: nothing else runs in this process.
/// unsafe { std::env::set_var("MICROCS_RUNTIME_DIR", "/tmp/my-services") };
/// assert_eq!(microcs::registry::runtime_dir(), std::path::PathBuf::from("/tmp/my-services"));
/// ```
pub fn runtime_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("MICROCS_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    if let Some(xdg) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return Path::new(&xdg).join("microcs");
    }
    PathBuf::from(format!("/tmp/microcs-{}", euid()))
}

pub(crate) fn euid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// Creates `dir` (mode 0700) if missing, then checks it is safe to use.
pub(crate) fn ensure_dir(dir: &Path) -> Result<()> {
    match fs::DirBuilder::new().recursive(true).mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) => {
            return Err(Error::io(format_args!("cannot create runtime directory {}", dir.display()), e));
        }
    }
    check_dir(dir, true)
}

/// Client-side check of a runtime directory the application named explicitly (to reach another
/// user's service): any owner is accepted — naming the directory is trusting its owner — but it
/// must be a real directory that nobody else can write to, so no one could have planted an
/// impostor socket in it.
pub(crate) fn check_foreign_dir_exists(dir: &Path) -> Result<bool> {
    match fs::symlink_metadata(dir) {
        Ok(_) => check_dir(dir, false).map(|()| true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(Error::io(format_args!("cannot inspect runtime directory {}", dir.display()), e)),
    }
}

/// Checks that `dir` is a real directory, owned by this user, closed to everyone else.
/// `Ok(false)` when it does not exist.
pub(crate) fn check_dir_exists(dir: &Path) -> Result<bool> {
    match fs::symlink_metadata(dir) {
        Ok(_) => check_dir(dir, true).map(|()| true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(Error::io(format_args!("cannot inspect runtime directory {}", dir.display()), e)),
    }
}

fn check_dir(dir: &Path, own: bool) -> Result<()> {
    let md = fs::symlink_metadata(dir)
        .map_err(|e| Error::io(format_args!("cannot inspect runtime directory {}", dir.display()), e))?;
    let refuse = |why: String| {
        Err(Error::new(
            ErrorKind::PermissionDenied,
            format!(
                "refusing to use runtime directory {} ({why}, owner uid {}, mode {:04o}); it must be a \
                 directory owned by uid {} with mode 0700 — fix it, or set MICROCS_RUNTIME_DIR to a \
                 private directory",
                dir.display(),
                md.uid(),
                md.mode() & 0o7777,
                euid()
            ),
        ))
    };
    if md.file_type().is_symlink() {
        return refuse("it is a symlink".into());
    }
    if !md.is_dir() {
        return refuse("it is not a directory".into());
    }
    if own && md.uid() != euid() {
        return refuse("it belongs to another user".into());
    }
    if own && md.mode() & 0o077 != 0 {
        return refuse("group or others have access".into());
    }
    if md.mode() & 0o022 != 0 {
        return refuse("group or others can write to it".into());
    }
    Ok(())
}

/// `<dir>/<name>.sock`, checked to fit a Unix socket address.
pub(crate) fn socket_path(dir: &Path, name: &Name) -> Result<PathBuf> {
    checked_socket_path(dir.join(format!("{name}.sock")))
}

fn checked_socket_path(path: PathBuf) -> Result<PathBuf> {
    let len = path.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        return Err(Error::new(
            ErrorKind::InvalidName,
            format!(
                "socket path {} is {len} bytes, over the {MAX_SOCKET_PATH}-byte limit of Unix socket \
                 addresses; use a shorter name or a shorter MICROCS_RUNTIME_DIR",
                path.display()
            ),
        ));
    }
    Ok(path)
}

fn lock_path(dir: &Path, name: &Name) -> PathBuf {
    dir.join(format!("{name}.lock"))
}

/// Most instances one name can have (slots `0..MAX_INSTANCES`).
pub const MAX_INSTANCES: u32 = 256;

/// Where an instance's slot file keeps its load record (the number of open connections, as
/// 20 ASCII digits and a newline): past the metadata line, which is read up to 64 KiB.
pub const LOAD_OFFSET: u64 = 64 * 1024;
const LOAD_LEN: usize = 21;

fn slot_lock_path(dir: &Path, name: &Name, slot: u32) -> PathBuf {
    dir.join(format!("{name}@{slot}.lock"))
}

/// `<dir>/<name>@<slot>.sock`, checked to fit a Unix socket address.
fn slot_socket_path(dir: &Path, name: &Name, slot: u32) -> Result<PathBuf> {
    checked_socket_path(dir.join(format!("{name}@{slot}.sock")))
}

/// The slot number of a file named `<name>@<k>.lock`, if `file_name` is one.
fn parse_slot(file_name: &str) -> Option<(&str, u32)> {
    let (name, k) = file_name.strip_suffix(".lock")?.rsplit_once('@')?;
    let k: u32 = k.parse().ok().filter(|&k| k < MAX_INSTANCES)?;
    // `k.to_string() == k`: "007" is not slot 7 (no two files for one slot).
    (k.to_string().len() == file_name.len() - name.len() - 6).then_some((name, k))
}

/// What a server writes on the first line of its lock file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Meta {
    pub pid: u32,
    pub uid: u32,
    /// Start time, milliseconds since the Unix epoch.
    pub started_ms: u64,
    pub protocol: u8,
    /// The service's own version (SemVer).
    pub version: String,
    /// Instance id, as in `$info`.
    pub id: String,
    /// Named methods besides the default handler.
    pub methods: Vec<String>,
    /// The server accepts requests (written when it starts serving; until then the entry only
    /// names the owner).
    #[serde(default)]
    pub ready: bool,
    /// The socket was bound by a service manager (socket activation) and outlives the server:
    /// reclaiming a crashed owner's entry leaves it in place, so the manager can start the
    /// service again on the next connection.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub inherited: bool,
}

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
/// [`ErrorKind::PermissionDenied`] if the runtime directory is unsafe; [`ErrorKind::Io`] if it
/// cannot be read. A missing directory is an empty list.
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

/// The load record of a slot file (0 when not written yet or unreadable).
fn read_load(file: &File) -> u64 {
    let mut buf = [0u8; LOAD_LEN];
    match rustix::io::pread(file, &mut buf, LOAD_OFFSET) {
        Ok(n) if n == LOAD_LEN => {
            std::str::from_utf8(&buf[..LOAD_LEN - 1]).ok().and_then(|t| t.parse().ok()).unwrap_or(0)
        }
        _ => 0,
    }
}

/// A live instance of a name, as a client sees it.
#[derive(Debug, Clone)]
pub(crate) struct Instance {
    pub slot: u32,
    pub socket: PathBuf,
    /// Open connections (its load record).
    pub connections: u64,
    /// The instance serves (its metadata says so); a live slot that is not ready is still
    /// starting up.
    pub ready: bool,
    pub pid: Option<u32>,
}

/// The live instances of `name` in `dir`, in slot order. Read-only (nothing is reclaimed): a
/// readdir, and per slot file an `open`, a non-blocking shared `flock` (which conflicts only
/// with the owner's exclusive one) and two `pread`s.
pub(crate) fn instances(dir: &Path, name: &Name) -> Vec<Instance> {
    let Ok(entries) = fs::read_dir(dir) else { return Vec::new() };
    let prefix = format!("{name}@");
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(f) = file_name.to_str().filter(|f| f.starts_with(&prefix)) else { continue };
        let Some((stem, slot)) = parse_slot(f).filter(|(stem, _)| *stem == name.as_str()) else {
            continue;
        };
        let _ = stem;
        let Ok(socket) = slot_socket_path(dir, name, slot) else { continue };
        let file = match open_lock(&slot_lock_path(dir, name, slot), false) {
            Ok(file) => file,
            // Another user's instances (a runtime directory the application named, of a service
            // that allows this user): their lock files are private, so there is no load to read
            // and no lock to test; the socket is the evidence, and connecting tells the rest.
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                if fs::symlink_metadata(&socket).is_ok_and(|m| m.file_type().is_socket()) {
                    out.push(Instance { slot, socket, connections: 0, ready: true, pid: None });
                }
                continue;
            }
            Err(_) => continue,
        };
        if !matches!(
            rustix::fs::flock(&file, FlockOperation::NonBlockingLockShared),
            Err(rustix::io::Errno::WOULDBLOCK)
        ) {
            continue; // nobody holds it: a crashed instance's leftover (our lock goes with `file`)
        }
        let meta = read_meta(&file);
        out.push(Instance {
            slot,
            socket,
            connections: read_load(&file),
            ready: meta.as_ref().is_some_and(|m| m.ready),
            pid: meta.map(|m| m.pid),
        });
    }
    out.sort_by_key(|i| i.slot);
    out
}

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

fn open_lock(path: &Path, create: bool) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(create)
        .create(create)
        .mode(0o600)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)?;
    let md = file.metadata()?;
    if !md.is_file() {
        return Err(io::Error::new(io::ErrorKind::PermissionDenied, "not a regular file"));
    }
    if md.uid() != euid() {
        return Err(io::Error::new(io::ErrorKind::PermissionDenied, "owned by another user"));
    }
    Ok(file)
}

fn same_file(file: &File, path: &Path) -> bool {
    match (file.metadata(), fs::symlink_metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

fn read_meta(mut file: &File) -> Option<Meta> {
    let mut text = String::new();
    file.seek(SeekFrom::Start(0)).ok()?;
    file.take(64 * 1024).read_to_string(&mut text).ok()?;
    serde_json::from_str(text.lines().next()?).ok()
}

/// Removes `path` only if it is a socket (never through a symlink, never a regular file).
fn remove_if_socket(path: &Path) -> bool {
    match fs::symlink_metadata(path) {
        Ok(md) if md.file_type().is_socket() => fs::remove_file(path).is_ok(),
        _ => false,
    }
}

fn pid_alive(pid: u32) -> bool {
    let Some(pid) = i32::try_from(pid).ok().and_then(rustix::process::Pid::from_raw) else {
        return false;
    };
    !matches!(rustix::process::test_kill_process(pid), Err(rustix::io::Errno::SRCH))
}

/// The pid of the live server holding `name` in `dir`, if one does; `None` when nobody holds
/// its lock or it cannot be read. Read-only: unlike [`list`], nothing is reclaimed. For the
/// clients, to tell a server that holds its name but does not answer from a socket that is not
/// a microcs service at all.
pub(crate) fn holder(dir: &Path, name: &Name) -> Option<u32> {
    let file = open_lock(&lock_path(dir, name), false).ok()?;
    // A shared lock is enough to test: it conflicts only with an owner's exclusive one, and is
    // released when `file` closes.
    match rustix::fs::flock(&file, FlockOperation::NonBlockingLockShared) {
        Err(rustix::io::Errno::WOULDBLOCK) => read_meta(&file).map(|m| m.pid),
        _ => None,
    }
}

/// Takes the lock of `name` in `dir` (which must exist and be safe).
///
/// Waits briefly when the lock is held by a process that is gone or has not written its
/// metadata yet (someone reclaiming a stale entry, or a server starting up), so that a
/// momentary holder is not reported as the name's owner.
fn take_lock(dir: &Path, name: &Name, lock_path: &Path) -> Result<File> {
    let give_up = Instant::now() + Duration::from_millis(500);
    loop {
        let file = open_lock(lock_path, true)
            .map_err(|e| Error::io(format_args!("cannot open lock file {}", lock_path.display()), e))?;
        match rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {
                if !same_file(&file, lock_path) {
                    continue; // the file we locked was unlinked by its previous owner; retry
                }
                return Ok(file);
            }
            Err(rustix::io::Errno::WOULDBLOCK) => {
                let pid = read_meta(&file).map(|m| m.pid).filter(|&p| pid_alive(p));
                if pid.is_some() {
                    return Err(Error::name_taken(name.as_str(), pid, dir));
                }
                // Held without metadata: instances (shared locks) or an owner starting up.
                let pids: Vec<u32> = instances(dir, name).iter().filter_map(|i| i.pid).collect();
                if !pids.is_empty() {
                    return Err(Error::served_by_instances(name.as_str(), &pids, dir));
                }
                if Instant::now() >= give_up {
                    return Err(Error::name_taken(name.as_str(), pid, dir));
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => {
                return Err(Error::io(format_args!("cannot lock {}", lock_path.display()), e.into()));
            }
        }
    }
}

/// Takes `<name>.lock` shared, for an instance: it keeps exclusive servers out while letting
/// other instances in. Waits briefly while the lock is held exclusively by a process that has
/// written no metadata (someone reclaiming a stale entry, or listing), as [`take_lock`] does.
fn take_mode_shared(dir: &Path, name: &Name, mode_path: &Path) -> Result<File> {
    let give_up = Instant::now() + Duration::from_millis(500);
    loop {
        let file = open_lock(mode_path, true)
            .map_err(|e| Error::io(format_args!("cannot open lock file {}", mode_path.display()), e))?;
        match rustix::fs::flock(&file, FlockOperation::NonBlockingLockShared) {
            Ok(()) if !same_file(&file, mode_path) => continue, // unlinked meanwhile; retry
            Ok(()) => {
                // No exclusive server can be alive now: an exclusive socket left by a crashed
                // one would shadow the instances from clients; it goes.
                if let Ok(sock) = socket_path(dir, name) {
                    remove_if_socket(&sock);
                }
                return Ok(file);
            }
            Err(rustix::io::Errno::WOULDBLOCK) => {
                let pid = read_meta(&file).map(|m| m.pid).filter(|&p| pid_alive(p));
                if pid.is_some() || Instant::now() >= give_up {
                    return Err(Error::owned_exclusively(name.as_str(), pid, dir));
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => {
                return Err(Error::io(format_args!("cannot lock {}", mode_path.display()), e.into()));
            }
        }
    }
}

/// Takes the lowest free instance slot of `name`: its lock file, locked exclusively.
fn take_slot(dir: &Path, name: &Name) -> Result<(u32, File, PathBuf)> {
    for slot in 0..MAX_INSTANCES {
        let path = slot_lock_path(dir, name, slot);
        loop {
            let file = open_lock(&path, true)
                .map_err(|e| Error::io(format_args!("cannot open lock file {}", path.display()), e))?;
            match rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive) {
                Ok(()) if same_file(&file, &path) => return Ok((slot, file, path)),
                Ok(()) => continue, // unlinked by its previous owner meanwhile; retry this slot
                Err(rustix::io::Errno::WOULDBLOCK) => break,
                Err(e) => return Err(Error::io(format_args!("cannot lock {}", path.display()), e.into())),
            }
        }
    }
    Err(Error::new(
        ErrorKind::NameTaken,
        format!(
            "the name '{name}' has all its {MAX_INSTANCES} instance slots taken (in {}); stop some \
             instances",
            dir.display()
        ),
    ))
}

/// What an instance holds besides its slot.
#[derive(Debug)]
struct Membership {
    /// `<name>.lock`, locked shared.
    mode: File,
    mode_path: PathBuf,
    slot: u32,
    /// The last load recorded, written again after the metadata (which truncates the file).
    connections: std::sync::atomic::AtomicU64,
}

/// Removes `<name>.lock` (and a stale `<name>.sock`) when nobody holds the lock any more:
/// what the last instance to leave does, and what [`list`] does for a crashed owner.
fn reclaim_name_if_free(dir: &Path, name: &Name) {
    let path = lock_path(dir, name);
    let Ok(file) = open_lock(&path, false) else { return };
    if rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive).is_ok() && same_file(&file, &path) {
        if let Ok(sock) = socket_path(dir, name) {
            remove_if_socket(&sock);
        }
        let _ = fs::remove_file(&path);
    }
}

/// Ownership of a name: the held lock. Dropping it removes the socket and the lock file.
#[derive(Debug)]
pub(crate) struct Claim {
    /// The name and its runtime directory, to take the name again when its files are removed.
    name: Name,
    dir: PathBuf,
    lock: File,
    lock_path: PathBuf,
    sock_path: PathBuf,
    /// Inode of the socket we bound, so that Drop removes our socket and nothing else, and
    /// [`Claim::intact`] sees when the path names another file.
    sock_ino: Option<(u64, u64)>,
    /// The socket was passed by a service manager (socket activation; see [`Claim::adopt`]):
    /// it is not ours to remove.
    inherited: bool,
    /// For an instance: the name's lock, held shared, and the slot (then `lock`, `lock_path`
    /// and `sock_path` are the slot's files).
    member: Option<Membership>,
}

impl Claim {
    /// Takes the name in `dir` (which must exist and be safe); see [`take_lock`].
    pub(crate) fn take(dir: &Path, name: &Name) -> Result<Claim> {
        let lock_path = lock_path(dir, name);
        let sock_path = socket_path(dir, name)?;
        let lock = take_lock(dir, name, &lock_path)?;
        Ok(Claim {
            name: name.clone(),
            dir: dir.to_owned(),
            lock,
            lock_path,
            sock_path,
            sock_ino: None,
            inherited: false,
            member: None,
        })
    }

    /// Joins the name in `dir` (which must exist and be safe) as one of its instances: takes
    /// the name's lock shared and the lowest free slot.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::NameTaken`] when an exclusive server owns the name or all slots are taken;
    /// [`ErrorKind::InvalidName`] when the slot's socket path would be too long.
    pub(crate) fn take_instance(dir: &Path, name: &Name) -> Result<Claim> {
        slot_socket_path(dir, name, MAX_INSTANCES - 1)?;
        let mode_path = lock_path(dir, name);
        let mode = take_mode_shared(dir, name, &mode_path)?;
        let (slot, lock, lock_path) = take_slot(dir, name)?;
        Ok(Claim {
            name: name.clone(),
            dir: dir.to_owned(),
            lock,
            lock_path,
            sock_path: slot_socket_path(dir, name, slot)?,
            sock_ino: None,
            inherited: false,
            member: Some(Membership { mode, mode_path, slot, connections: Default::default() }),
        })
    }

    /// The instance slot, when this claim is one of several instances.
    pub(crate) fn slot(&self) -> Option<u32> {
        self.member.as_ref().map(|m| m.slot)
    }

    /// Records how many connections this instance has open (its load record; see
    /// [`LOAD_OFFSET`]): one `pwrite`. Nothing for an exclusive claim.
    pub(crate) fn set_connections(&self, n: usize) {
        if let Some(m) = &self.member {
            m.connections.store(n as u64, std::sync::atomic::Ordering::Relaxed);
            self.write_load(n as u64);
        }
    }

    fn write_load(&self, n: u64) {
        let record = format!("{n:020}\n");
        if let Err(e) = rustix::io::pwrite(&self.lock, record.as_bytes(), LOAD_OFFSET) {
            tracing::debug!(error = %e, path = %self.lock_path.display(), "cannot record the load");
        }
    }

    /// Binds the name's socket (removing a stale one first; see
    /// [`prepare_socket_path`](Claim::prepare_socket_path)), private and non-blocking, so that
    /// the async server can adopt it as is.
    pub(crate) fn bind(&mut self) -> Result<UnixListener> {
        let path = self.prepare_socket_path()?.to_owned();
        let listener = UnixListener::bind(&path)
            .map_err(|e| Error::io(format_args!("cannot bind {}", path.display()), e))?;
        self.socket_bound()?;
        self.inherited = false;
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::io(format_args!("cannot configure {}", path.display()), e))?;
        Ok(listener)
    }

    /// Serves on a socket a service manager bound at the name's socket path and passed to this
    /// process (socket activation; `transport::inherited` checked that it is bound to that
    /// path): records the file at the path as ours to watch ([`intact`](Claim::intact)), but
    /// never removes it — it outlives this server, and the manager starts the service again
    /// when the next client connects.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::PermissionDenied`] when what is at the path is not a socket;
    /// [`ErrorKind::Io`] when it cannot be inspected.
    pub(crate) fn adopt(&mut self) -> Result<()> {
        let md = fs::symlink_metadata(&self.sock_path)
            .map_err(|e| Error::io(format_args!("cannot inspect {}", self.sock_path.display()), e))?;
        if !md.file_type().is_socket() {
            return Err(Error::new(
                ErrorKind::PermissionDenied,
                format!(
                    "refusing the inherited socket: {} is not a socket file any more",
                    self.sock_path.display()
                ),
            ));
        }
        self.sock_ino = Some((md.dev(), md.ino()));
        self.inherited = true;
        Ok(())
    }

    /// Whether the lock file and the socket at their paths are still the ones this claim holds
    /// (two `lstat`s and an `fstat`). Not so after the runtime directory or one of the files
    /// was removed or replaced: the server is then unreachable, unlisted, and no longer
    /// protects its name.
    pub(crate) fn intact(&self) -> bool {
        let socket_ours = match (self.sock_ino, fs::symlink_metadata(&self.sock_path)) {
            (None, _) => true, // not bound (yet, or any more): nothing to watch
            (Some((dev, ino)), Ok(md)) => md.file_type().is_socket() && md.dev() == dev && md.ino() == ino,
            (Some(_), Err(_)) => false,
        };
        socket_ours
            && same_file(&self.lock, &self.lock_path)
            && self.member.as_ref().is_none_or(|m| same_file(&m.mode, &m.mode_path))
    }

    /// Takes the name again after its files were removed or replaced (see
    /// [`intact`](Claim::intact)), by the rules of a first claim: the runtime directory is
    /// created (0700) and checked, the lock file created and locked, with the same metadata,
    /// and the socket bound again unless it is still ours. Returns the new listener when the
    /// socket was bound again.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::NameTaken`] when another live server took the name meanwhile (this claim
    /// then touches none of its files, now or when dropped); [`ErrorKind::PermissionDenied`]
    /// for an unsafe runtime directory or something other than a socket at the socket path;
    /// [`ErrorKind::Io`].
    /// An instance takes the name's lock (shared) back first, then a slot: its old one when
    /// free, else the lowest free one (its socket path then changes).
    pub(crate) fn restore(&mut self) -> Result<Option<UnixListener>> {
        if let Some(m) = self.member.as_mut().filter(|m| !same_file(&m.mode, &m.mode_path)) {
            ensure_dir(&self.dir)?;
            m.mode = take_mode_shared(&self.dir, &self.name, &m.mode_path)?;
        }
        if !same_file(&self.lock, &self.lock_path) {
            let meta = read_meta(&self.lock);
            ensure_dir(&self.dir)?;
            if self.member.is_some() {
                let (slot, lock, lock_path) = take_slot(&self.dir, &self.name)?;
                let sock_path = slot_socket_path(&self.dir, &self.name, slot)?;
                if sock_path != self.sock_path {
                    self.remove_socket();
                    self.sock_path = sock_path;
                }
                if let Some(m) = self.member.as_mut() {
                    m.slot = slot;
                }
                (self.lock, self.lock_path) = (lock, lock_path);
            } else {
                self.lock = take_lock(&self.dir, &self.name, &self.lock_path)?;
            }
            if let Some(meta) = meta {
                self.write_meta(&meta)?;
            }
        }
        if self.intact() {
            return Ok(None); // only the lock file was gone
        }
        self.sock_ino = None;
        self.bind().map(Some)
    }

    /// The service name.
    pub(crate) fn name(&self) -> &Name {
        &self.name
    }

    /// The runtime directory the name lives in.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes the owner's metadata as the lock file's first line.
    pub(crate) fn write_meta(&self, meta: &Meta) -> Result<()> {
        let meta = Meta { inherited: self.inherited, ..meta.clone() };
        let mut line = serde_json::to_vec(&meta).expect("metadata serialises");
        line.push(b'\n');
        let mut f = &self.lock;
        f.seek(SeekFrom::Start(0))
            .and_then(|_| f.write_all(&line))
            .and_then(|()| self.lock.set_len(line.len() as u64))
            .map_err(|e| Error::io(format_args!("cannot write {}", self.lock_path.display()), e))?;
        if let Some(m) = &self.member {
            self.write_load(m.connections.load(std::sync::atomic::Ordering::Relaxed));
        }
        Ok(())
    }

    /// Clears the way for binding: removes a stale socket, refuses anything else at the path.
    fn prepare_socket_path(&self) -> Result<&Path> {
        match fs::symlink_metadata(&self.sock_path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(&self.sock_path),
            Ok(md) if md.file_type().is_socket() => {
                fs::remove_file(&self.sock_path).map_err(|e| {
                    Error::io(format_args!("cannot remove stale socket {}", self.sock_path.display()), e)
                })?;
                tracing::debug!(path = %self.sock_path.display(), "removed stale socket");
                Ok(&self.sock_path)
            }
            Ok(md) => {
                let what = if md.file_type().is_symlink() {
                    "a symlink"
                } else if md.is_dir() {
                    "a directory"
                } else {
                    "a regular file"
                };
                Err(Error::new(
                    ErrorKind::PermissionDenied,
                    format!(
                        "refusing to replace {}: it is {what}, not a socket; remove it by hand if it \
                         is not needed",
                        self.sock_path.display()
                    ),
                ))
            }
            Err(e) => Err(Error::io(format_args!("cannot inspect {}", self.sock_path.display()), e)),
        }
    }

    /// Records that the socket at the path is ours, and makes it private.
    fn socket_bound(&mut self) -> Result<()> {
        fs::set_permissions(&self.sock_path, fs::Permissions::from_mode(0o600))
            .map_err(|e| Error::io(format_args!("cannot chmod {}", self.sock_path.display()), e))?;
        let md = fs::symlink_metadata(&self.sock_path)
            .map_err(|e| Error::io(format_args!("cannot inspect {}", self.sock_path.display()), e))?;
        self.sock_ino = Some((md.dev(), md.ino()));
        Ok(())
    }

    pub(crate) fn socket_path(&self) -> &Path {
        &self.sock_path
    }

    /// Removes the socket (so new clients see the service gone at once) while keeping the lock.
    /// Not a socket a service manager passed: that one stays for the manager's next start.
    pub(crate) fn remove_socket(&mut self) {
        if self.inherited {
            self.sock_ino = None;
            return;
        }
        if let Some((dev, ino)) = self.sock_ino.take() {
            match fs::symlink_metadata(&self.sock_path) {
                Ok(md) if md.file_type().is_socket() && md.dev() == dev && md.ino() == ino => {
                    let _ = fs::remove_file(&self.sock_path);
                }
                _ => {}
            }
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.remove_socket();
        // Unlink the lock file while still holding the lock; a server that opened the old file in
        // the meantime notices the unlinked inode and retries (see `take`).
        if same_file(&self.lock, &self.lock_path) {
            let _ = fs::remove_file(&self.lock_path);
        }
        if let Some(m) = self.member.take() {
            // Let go of the name's shared lock, then remove its file if no other instance (and
            // no exclusive server) holds it now.
            drop(m.mode);
            reclaim_name_if_free(&self.dir, &self.name);
        }
    }
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("microcs-unit-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn creates_private_dir_and_refuses_open_ones() {
        let d = tempdir("dir");
        ensure_dir(&d).unwrap();
        assert_eq!(fs::metadata(&d).unwrap().mode() & 0o777, 0o700);
        for mode in [0o755, 0o777, 0o710] {
            fs::set_permissions(&d, fs::Permissions::from_mode(mode)).unwrap();
            let e = ensure_dir(&d).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::PermissionDenied);
            assert!(e.to_string().contains(&format!("{mode:04o}")), "{e}");
            assert!(e.to_string().contains(&d.display().to_string()), "{e}");
        }
        fs::set_permissions(&d, fs::Permissions::from_mode(0o700)).unwrap();
        let link = d.with_extension("link");
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(&d, &link).unwrap();
        let e = ensure_dir(&link).unwrap_err();
        assert!(e.to_string().contains("symlink"), "{e}");
        fs::remove_file(&link).unwrap();
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn claim_is_exclusive_and_released_on_drop() {
        let d = tempdir("claim");
        ensure_dir(&d).unwrap();
        let name = Name::new("X").unwrap();
        let c = Claim::take(&d, &name).unwrap();
        c.write_meta(&meta_of(std::process::id())).unwrap();
        // flock locks belong to the open file description, so a second open in this process
        // conflicts just as another process would.
        let e = Claim::take(&d, &name).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NameTaken);
        assert_eq!(e.owner_pid(), Some(std::process::id()));
        drop(c);
        assert!(!lock_path(&d, &name).exists());
        drop(Claim::take(&d, &name).unwrap());
        fs::remove_dir_all(&d).unwrap();
    }

    fn meta_of(pid: u32) -> Meta {
        Meta {
            pid,
            uid: euid(),
            started_ms: now_ms(),
            protocol: 1,
            version: "1.0.0".into(),
            id: "i".into(),
            methods: vec![],
            ready: true,
            inherited: false,
        }
    }

    #[test]
    fn a_claim_whose_files_are_gone_takes_them_back_or_leaves_a_new_owners_alone() {
        let d = tempdir("restore");
        ensure_dir(&d).unwrap();
        let name = Name::new("R").unwrap();
        let mut c = Claim::take(&d, &name).unwrap();
        let _l = c.bind().unwrap();
        c.write_meta(&meta_of(std::process::id())).unwrap();
        assert!(c.intact());

        // Free: taken back, with the same metadata, and a new socket.
        fs::remove_dir_all(&d).unwrap();
        assert!(!c.intact());
        assert!(c.restore().unwrap().is_some(), "a new listener");
        assert!(c.intact());
        assert_eq!(holder(&d, &name), Some(std::process::id()));
        assert_eq!(fs::metadata(&d).unwrap().mode() & 0o777, 0o700);

        // Only the lock file gone: the socket is still ours, no new listener.
        fs::remove_file(lock_path(&d, &name)).unwrap();
        assert!(!c.intact());
        assert!(c.restore().unwrap().is_none());
        assert!(c.intact());

        // Taken by another meanwhile: NameTaken naming it, and its files survive our drop.
        fs::remove_dir_all(&d).unwrap();
        ensure_dir(&d).unwrap();
        let mut other = Claim::take(&d, &name).unwrap();
        let _l2 = other.bind().unwrap();
        other.write_meta(&meta_of(1)).unwrap(); // pid 1 is alive
        let e = c.restore().unwrap_err();
        assert_eq!((e.kind(), e.owner_pid()), (ErrorKind::NameTaken, Some(1)), "{e}");
        drop(c);
        assert!(other.intact(), "the new owner's files are untouched");
        assert_eq!(holder(&d, &name), Some(1));
        drop(other);
        assert_eq!(holder(&d, &name), None);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn slot_files_are_told_from_names() {
        assert_eq!(parse_slot("LIFE@0.lock"), Some(("LIFE", 0)));
        assert_eq!(parse_slot("a.b@255.lock"), Some(("a.b", 255)));
        for not_a_slot in ["LIFE.lock", "LIFE@007.lock", "LIFE@256.lock", "LIFE@x.lock", "LIFE@1.sock", "@1"]
        {
            assert_eq!(parse_slot(not_a_slot), None, "{not_a_slot}");
        }
    }

    #[test]
    fn an_instance_slot_is_exclusive_and_keeps_exclusive_servers_out() {
        let d = tempdir("slot");
        ensure_dir(&d).unwrap();
        let name = Name::new("S").unwrap();
        let a = Claim::take_instance(&d, &name).unwrap();
        let b = Claim::take_instance(&d, &name).unwrap();
        assert_eq!((a.slot(), b.slot()), (Some(0), Some(1)));
        a.write_meta(&meta_of(std::process::id())).unwrap();
        b.set_connections(7);
        let found = instances(&d, &name);
        assert_eq!(found.iter().map(|i| (i.slot, i.connections)).collect::<Vec<_>>(), [(0, 0), (1, 7)]);
        assert_eq!(Claim::take(&d, &name).unwrap_err().kind(), ErrorKind::NameTaken);
        drop(a);
        let c = Claim::take_instance(&d, &name).unwrap();
        assert_eq!(c.slot(), Some(0), "the lowest free slot");
        drop((b, c));
        assert!(fs::read_dir(&d).unwrap().next().is_none(), "no file left");
        drop(Claim::take(&d, &name).unwrap());
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn long_socket_paths_are_invalid_names() {
        let d = PathBuf::from(format!("/tmp/{}", "d".repeat(60)));
        let e = socket_path(&d, &Name::new("n".repeat(60)).unwrap()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidName);
    }
}
