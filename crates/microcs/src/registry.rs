//! The registry: where names live on disk, who owns them, and which services are running.
//!
//! There is no daemon. A server owns `<dir>/<name>.sock` by holding an exclusive `flock` on
//! `<dir>/<name>.lock` for its whole life (the pattern Wayland compositors and MUNGE use). The
//! kernel drops the lock when the process dies, however it dies, so a lock that can be taken
//! means the socket beside it is stale and may be replaced — while a live server, even one too
//! busy to accept, is never displaced. The lock file's first line holds the owner's metadata as
//! JSON (pid, start time, methods, ...), which [`list`] reads without connecting.
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
    let path = dir.join(format!("{name}.sock"));
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
}

/// Lists the services running in this process's [`runtime_dir`], sorted by name.
///
/// A service is listed only while its owner holds the name's lock, so a crashed server is never
/// listed; its leftover files are removed on the way.
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
        let Some(stem) = file_name.to_str().and_then(|f| f.strip_suffix(".lock")) else { continue };
        let Ok(name) = Name::new(stem) else { continue };
        match probe(dir, &name) {
            Ok(Some(info)) => out.push(info),
            Ok(None) => {}
            Err(e) => tracing::debug!(name = %name, error = %e, "skipping unreadable registry entry"),
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Looks at one name: its info if a live server owns it; `None` (after reclaiming leftovers) if not.
fn probe(dir: &Path, name: &Name) -> Result<Option<ServiceInfo>> {
    let lock_path = lock_path(dir, name);
    let file = match open_lock(&lock_path, false) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(format_args!("cannot open {}", lock_path.display()), e)),
    };
    match rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => {
            // Nobody holds it: the owner is gone. Reclaim, unless a new server re-created the
            // file between our open and our lock (then the path no longer names our inode).
            if same_file(&file, &lock_path) {
                remove_if_socket(&socket_path(dir, name)?);
                let _ = fs::remove_file(&lock_path);
                tracing::debug!(name = %name, "reclaimed stale registry entry");
            }
            Ok(None)
        }
        Err(rustix::io::Errno::WOULDBLOCK) => {
            let Some(meta) = read_meta(&file).filter(|m| m.ready) else {
                // Locked, but the owner is still starting up (not serving yet).
                return Ok(None);
            };
            let uid = file.metadata().map(|m| m.uid()).unwrap_or(meta.uid);
            Ok(Some(ServiceInfo {
                name: name.clone(),
                pid: meta.pid,
                uid,
                started: UNIX_EPOCH + Duration::from_millis(meta.started_ms),
                protocol_version: meta.protocol,
                version: meta.version,
                id: meta.id,
                methods: meta.methods,
                socket: socket_path(dir, name)?,
            }))
        }
        Err(e) => Err(Error::io(format_args!("cannot lock {}", lock_path.display()), e.into())),
    }
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
                if pid.is_some() || Instant::now() >= give_up {
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
}

impl Claim {
    /// Takes the name in `dir` (which must exist and be safe); see [`take_lock`].
    pub(crate) fn take(dir: &Path, name: &Name) -> Result<Claim> {
        let lock_path = lock_path(dir, name);
        let sock_path = socket_path(dir, name)?;
        let lock = take_lock(dir, name, &lock_path)?;
        Ok(Claim { name: name.clone(), dir: dir.to_owned(), lock, lock_path, sock_path, sock_ino: None })
    }

    /// Binds the name's socket (removing a stale one first; see
    /// [`prepare_socket_path`](Claim::prepare_socket_path)), private and non-blocking, so that
    /// the async server can adopt it as is.
    pub(crate) fn bind(&mut self) -> Result<UnixListener> {
        let path = self.prepare_socket_path()?.to_owned();
        let listener = UnixListener::bind(&path)
            .map_err(|e| Error::io(format_args!("cannot bind {}", path.display()), e))?;
        self.socket_bound()?;
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::io(format_args!("cannot configure {}", path.display()), e))?;
        Ok(listener)
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
        socket_ours && same_file(&self.lock, &self.lock_path)
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
    pub(crate) fn restore(&mut self) -> Result<Option<UnixListener>> {
        if !same_file(&self.lock, &self.lock_path) {
            let meta = read_meta(&self.lock);
            ensure_dir(&self.dir)?;
            self.lock = take_lock(&self.dir, &self.name, &self.lock_path)?;
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
        let mut line = serde_json::to_vec(meta).expect("metadata serialises");
        line.push(b'\n');
        let mut f = &self.lock;
        f.seek(SeekFrom::Start(0))
            .and_then(|_| f.write_all(&line))
            .and_then(|()| self.lock.set_len(line.len() as u64))
            .map_err(|e| Error::io(format_args!("cannot write {}", self.lock_path.display()), e))
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
    pub(crate) fn remove_socket(&mut self) {
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
    fn long_socket_paths_are_invalid_names() {
        let d = PathBuf::from(format!("/tmp/{}", "d".repeat(60)));
        let e = socket_path(&d, &Name::new("n".repeat(60)).unwrap()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidName);
    }
}
