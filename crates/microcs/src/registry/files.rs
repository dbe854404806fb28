//! A name's files: their paths, the lock file's metadata line, and opening and comparing them
//! safely (never through a symlink, never another user's file).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::dir::euid;
use crate::error::{Error, ErrorKind, Result};
use crate::name::Name;

/// Longest socket path the kernel accepts (`sun_path` minus its terminating NUL).
const MAX_SOCKET_PATH: usize = 107;

/// `<dir>/<name>.sock`, checked to fit a Unix socket address.
pub(crate) fn socket_path(dir: &Path, name: &Name) -> Result<PathBuf> {
    checked_socket_path(dir.join(format!("{name}.sock")))
}

pub(super) fn checked_socket_path(path: PathBuf) -> Result<PathBuf> {
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

pub(super) fn lock_path(dir: &Path, name: &Name) -> PathBuf {
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
    /// The socket was bound by a service manager (socket activation) and outlives the server:
    /// reclaiming a crashed owner's entry leaves it in place, so the manager can start the
    /// service again on the next connection.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub inherited: bool,
}

pub(super) fn open_lock(path: &Path, create: bool) -> io::Result<File> {
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

pub(super) fn same_file(file: &File, path: &Path) -> bool {
    match (file.metadata(), fs::symlink_metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

pub(super) fn read_meta(mut file: &File) -> Option<Meta> {
    let mut text = String::new();
    file.seek(SeekFrom::Start(0)).ok()?;
    file.take(64 * 1024).read_to_string(&mut text).ok()?;
    serde_json::from_str(text.lines().next()?).ok()
}

/// Removes `path` only if it is a socket (never through a symlink, never a regular file).
pub(super) fn remove_if_socket(path: &Path) -> bool {
    match fs::symlink_metadata(path) {
        Ok(md) if md.file_type().is_socket() => fs::remove_file(path).is_ok(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_socket_paths_are_invalid_names() {
        let d = PathBuf::from(format!("/tmp/{}", "d".repeat(60)));
        let e = socket_path(&d, &Name::new("n".repeat(60)).unwrap()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidName);
    }
}
