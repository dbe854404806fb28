//! Owning a name: taking its lock (exclusive, or shared plus a slot for an instance), binding
//! or adopting its socket, watching its files and taking them back ([`Claim`]).

use std::fs::{self, File};
use std::io::{self, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::fs::FlockOperation;

use super::dir::ensure_dir;
use super::files::{Meta, lock_path, open_lock, read_meta, remove_if_socket, same_file, socket_path};
use super::slots::{LOAD_OFFSET, MAX_INSTANCES, instances, slot_lock_path, slot_socket_path};
use crate::error::{Error, ErrorKind, Result};
use crate::name::Name;

fn pid_alive(pid: u32) -> bool {
    let Some(pid) = i32::try_from(pid).ok().and_then(rustix::process::Pid::from_raw) else {
        return false;
    };
    !matches!(rustix::process::test_kill_process(pid), Err(rustix::io::Errno::SRCH))
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
/// what the last instance to leave does, and what [`list`](super::list) does for a crashed
/// owner.
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{euid, holder, now_ms, tempdir};

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
}
