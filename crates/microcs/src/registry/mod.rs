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

// Layout: `dir` the runtime directory and its checks; `files` a name's files (paths, the lock
// file's metadata line, opening and comparing them); `claim` taking a name or a slot and
// keeping it (`Claim`); `slots` instance slots, their load records and the live instances;
// `listing` listing what runs; `lookup` the clients' read-only questions (where to connect, who
// holds a name, whether it is served).

mod claim;
mod dir;
mod files;
mod listing;
mod lookup;
mod slots;

pub(crate) use claim::Claim;
pub use dir::runtime_dir;
pub(crate) use dir::{check_dir_exists, check_foreign_dir_exists, ensure_dir, euid};
pub(crate) use files::{Meta, socket_path};
pub use listing::{ServiceInfo, list, list_in};
pub(crate) use lookup::{Target, better_instance, holder, random_u64, served, start_lock, targets};
pub use slots::{LOAD_OFFSET, MAX_INSTANCES};

use std::time::{SystemTime, UNIX_EPOCH};

pub(crate) fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// A fresh path for one unit test's runtime directory (removed if a previous run left it).
#[cfg(test)]
fn tempdir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("microcs-unit-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}
