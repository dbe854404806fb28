//! Instance slots: their files, their load records, and the live instances of a name.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use rustix::fs::FlockOperation;

use super::files::{checked_socket_path, open_lock, read_meta};
use crate::error::Result;
use crate::name::Name;

/// Most instances one name can have (slots `0..MAX_INSTANCES`).
pub const MAX_INSTANCES: u32 = 256;

/// Where an instance's slot file keeps its load record (the number of open connections, as
/// 20 ASCII digits and a newline): past the metadata line, which is read up to 64 KiB.
pub const LOAD_OFFSET: u64 = 64 * 1024;
const LOAD_LEN: usize = 21;

pub(super) fn slot_lock_path(dir: &Path, name: &Name, slot: u32) -> PathBuf {
    dir.join(format!("{name}@{slot}.lock"))
}

/// `<dir>/<name>@<slot>.sock`, checked to fit a Unix socket address.
pub(super) fn slot_socket_path(dir: &Path, name: &Name, slot: u32) -> Result<PathBuf> {
    checked_socket_path(dir.join(format!("{name}@{slot}.sock")))
}

/// The slot number of a file named `<name>@<k>.lock`, if `file_name` is one.
pub(super) fn parse_slot(file_name: &str) -> Option<(&str, u32)> {
    let (name, k) = file_name.strip_suffix(".lock")?.rsplit_once('@')?;
    let k: u32 = k.parse().ok().filter(|&k| k < MAX_INSTANCES)?;
    // `k.to_string() == k`: "007" is not slot 7 (no two files for one slot).
    (k.to_string().len() == file_name.len() - name.len() - 6).then_some((name, k))
}

/// The load record of a slot file (0 when not written yet or unreadable).
pub(super) fn read_load(file: &File) -> u64 {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_files_are_told_from_names() {
        assert_eq!(parse_slot("LIFE@0.lock"), Some(("LIFE", 0)));
        assert_eq!(parse_slot("a.b@255.lock"), Some(("a.b", 255)));
        for not_a_slot in ["LIFE.lock", "LIFE@007.lock", "LIFE@256.lock", "LIFE@x.lock", "LIFE@1.sock", "@1"]
        {
            assert_eq!(parse_slot(not_a_slot), None, "{not_a_slot}");
        }
    }
}
