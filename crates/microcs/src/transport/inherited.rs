//! Listening sockets inherited from a service manager: systemd socket activation
//! (`sd_listen_fds(3)`), without libsystemd.
//!
//! systemd (or anything speaking its protocol) binds the socket, starts the service with the
//! listening descriptors at 3, 4, ... and says so in the environment: `LISTEN_PID` (the process
//! they are for), `LISTEN_FDS` (how many) and `LISTEN_FDNAMES` (colon-separated names, from
//! `FileDescriptorName=`; informative here). A server built with `.socket_activation(true)`
//! takes the one bound to its name's socket path (see `docs/ACTIVATION.md`).
//!
//! The descriptors are taken **once per process**, the first time a server asks: the
//! variables are read and removed (children must not take them for theirs), every passed
//! descriptor that is a socket is adopted as an [`OwnedFd`] with `FD_CLOEXEC` set, and kept in
//! a process-wide pool. Each server then takes the socket bound to its own path out of the pool,
//! so one process can serve several names from one `.socket` unit (several `ListenStream=`).
//! This module holds the crate's only `unsafe` outside shared memory and CPython: adopting a
//! descriptor number the kernel handed the process at `exec` is the same kind of thing as
//! mapping memory it handed over — a resource whose ownership the type system cannot see.

use std::ffi::OsString;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use rustix::net::{AddressFamily, SocketAddrUnix, SocketType};

use crate::error::{Error, ErrorKind, Result};

/// The process the descriptors are for.
pub(crate) const ENV_PID: &str = "LISTEN_PID";
/// How many descriptors, from [`FIRST_FD`].
pub(crate) const ENV_FDS: &str = "LISTEN_FDS";
/// Their names, colon-separated.
pub(crate) const ENV_FDNAMES: &str = "LISTEN_FDNAMES";
/// All three, for whoever starts programs (which must not see them).
pub(crate) const ENV_VARS: [&str; 3] = [ENV_PID, ENV_FDS, ENV_FDNAMES];
/// `SD_LISTEN_FDS_START`.
const FIRST_FD: RawFd = 3;
/// More than any real unit passes; a larger count is refused (it is not a list of ours).
const MAX_FDS: usize = 4096;

/// One descriptor the service manager passed.
#[derive(Debug)]
struct Passed {
    /// Its number, for messages.
    fd: RawFd,
    /// Its `LISTEN_FDNAMES` entry, if any.
    label: Option<String>,
    /// The adopted socket; `None` when it was not one (then `what` says what it was).
    socket: Option<OwnedFd>,
    /// What it is, for messages: "not a socket (/tmp/x)", "not open", ...
    what: String,
}

/// The descriptors passed to this process, and why there are none when there are none.
#[derive(Debug)]
struct Pool {
    passed: Vec<Passed>,
    /// Why nothing was adopted (no variables, another process's, malformed), for the log.
    none_because: Option<String>,
}

/// Taken once per process (the first time a server asks), so no descriptor is ever adopted
/// twice; servers take their socket out under the mutex.
static POOL: OnceLock<Mutex<Pool>> = OnceLock::new();

fn pool() -> std::sync::MutexGuard<'static, Pool> {
    POOL.get_or_init(|| Mutex::new(collect())).lock().unwrap_or_else(|p| p.into_inner())
}

/// Reads and removes the variables, and adopts the passed sockets (see the module docs).
fn collect() -> Pool {
    let var = |k: &str| std::env::var_os(k);
    let (pid, fds, names) = (var(ENV_PID), var(ENV_FDS), var(ENV_FDNAMES));
    if pid.is_none() && fds.is_none() {
        return Pool::none(format!(
            "{ENV_FDS} is not set: this process was not started by socket activation"
        ));
    }
    unset_all();
    let me = std::process::id();
    let text =
        |v: &Option<OsString>| v.as_ref().map(|v| v.to_string_lossy().into_owned()).unwrap_or_default();
    match text(&pid).trim().parse::<u32>() {
        Ok(p) if p == me => {}
        _ => {
            return Pool::none(format!(
                "{ENV_PID}={:?} is not this process (pid {me}): the sockets were meant for another \
                 process (a parent that left the variables set); ignored them",
                text(&pid)
            ));
        }
    }
    let n = match text(&fds).trim().parse::<usize>() {
        Ok(n) if n <= MAX_FDS => n,
        _ => {
            return Pool::none(format!(
                "{ENV_FDS}={:?} is not a count of descriptors; ignored it",
                text(&fds)
            ));
        }
    };
    let labels: Vec<String> = text(&names).split(':').map(str::to_owned).collect();
    let passed = (0..n)
        .map(|i| {
            let fd = FIRST_FD + i as RawFd;
            let label = labels.get(i).filter(|l| !l.is_empty()).cloned();
            adopt(fd, label)
        })
        .collect();
    Pool { passed, none_because: (n == 0).then(|| format!("{ENV_FDS}=0: no sockets were passed")) }
}

impl Pool {
    fn none(why: String) -> Pool {
        Pool { passed: Vec::new(), none_because: Some(why) }
    }
}

/// Removes the three variables, so that programs this process starts do not take the
/// descriptors for theirs (their pid differs from `LISTEN_PID`, but a careless reader may not
/// check it, and the variables are meaningless to them).
fn unset_all() {
    for k in ENV_VARS {
        // SAFETY: `remove_var` is unsafe because another thread may read the environment at
        // the same moment. Rust code reads it through `std::env`, which takes the same
        // process-wide lock as this call, so no Rust reader can race it; what remains is C
        // code calling getenv(3) on another thread at this very moment, the caveat every
        // `sd_listen_fds(unset_environment=1)` caller accepts. It happens once per process
        // (inside the `OnceLock` initialiser), when the application asks for socket
        // activation — in practice while it sets up its servers; the builder's documentation
        // says to do that before starting threads that call into C code reading the
        // environment.
        unsafe { std::env::remove_var(k) };
    }
}

/// Adopts descriptor `fd` when it is an open socket (checked through `/proc/self/fd`, before
/// any ownership is taken), with `FD_CLOEXEC` set so no child inherits it.
fn adopt(fd: RawFd, label: Option<String>) -> Passed {
    let target = match std::fs::read_link(format!("/proc/self/fd/{fd}")) {
        Ok(target) => target,
        Err(e) => {
            let what = if e.kind() == std::io::ErrorKind::NotFound {
                "not open".to_owned()
            } else {
                format!("cannot be checked ({e}; is /proc mounted?)")
            };
            return Passed { fd, label, socket: None, what };
        }
    };
    if !target.as_os_str().as_encoded_bytes().starts_with(b"socket:") {
        let what = format!("not a socket ({})", target.display());
        return Passed { fd, label, socket: None, what };
    }
    // SAFETY: `fd` is open and a socket (just checked in /proc/self/fd), and it is ours to own:
    // it lies in the range `LISTEN_FDS` gives (3 to 3 + n - 1, n bounded), and `LISTEN_PID` is
    // this process's pid, so the variables were set for this very process by whoever exec'd
    // it (systemd, or a test harness speaking its protocol), which hands these descriptors over
    // for the service to own — they are not the leftovers of a parent, whose pid would differ.
    // No other `OwnedFd` owns it: this runs once per process (inside the `OnceLock`
    // initialiser of `POOL`, which also removed the variables, so nothing that reads them later
    // adopts the descriptors again), and nothing else in this crate turns a raw number into a
    // descriptor. What cannot be checked, and is trusted as `sd_listen_fds(3)` trusts it: that
    // the count in `LISTEN_FDS` is true (the exec'ing side put that many descriptors there), and
    // that the application did not also hand them to another socket-activation library (the
    // builder's documentation says not to).
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let what = describe(&socket);
    if let Err(e) = rustix::io::fcntl_setfd(&socket, rustix::io::FdFlags::CLOEXEC) {
        tracing::debug!(fd, error = %e, "cannot set FD_CLOEXEC on an inherited socket");
    }
    Passed { fd, label, socket: Some(socket), what }
}

/// What a socket is, for messages: its family, type, whether it listens, its address.
fn describe(socket: &OwnedFd) -> String {
    let family = match rustix::net::sockopt::socket_domain(socket) {
        Ok(AddressFamily::UNIX) => "AF_UNIX".to_owned(),
        Ok(AddressFamily::INET) => "AF_INET".to_owned(),
        Ok(AddressFamily::INET6) => "AF_INET6".to_owned(),
        Ok(f) => format!("address family {}", f.as_raw()),
        Err(e) => format!("unknown family ({e})"),
    };
    let kind = match rustix::net::sockopt::socket_type(socket) {
        Ok(SocketType::STREAM) => "SOCK_STREAM".to_owned(),
        Ok(SocketType::DGRAM) => "SOCK_DGRAM".to_owned(),
        Ok(SocketType::SEQPACKET) => "SOCK_SEQPACKET".to_owned(),
        Ok(t) => format!("type {}", t.as_raw()),
        Err(e) => format!("unknown type ({e})"),
    };
    let listening = rustix::net::sockopt::socket_acceptconn(socket).unwrap_or(false);
    let at = unix_path(socket).map_or_else(|| "no path".to_owned(), |p| p.display().to_string());
    format!("{family} {kind}{}, {at}", if listening { " listening" } else { " not listening" })
}

/// The filesystem path a Unix socket is bound to (none for other families, unnamed or abstract
/// sockets).
fn unix_path(socket: &OwnedFd) -> Option<PathBuf> {
    let addr = rustix::net::getsockname(socket).ok()?;
    let unix = SocketAddrUnix::try_from(addr).ok()?;
    let bytes = unix.path_bytes()?;
    use std::os::unix::ffi::OsStrExt;
    Some(PathBuf::from(std::ffi::OsStr::from_bytes(bytes)))
}

/// Whether two socket paths name the same place: equal, or the same file name in directories
/// that resolve to the same one (`/run/user/1000/microcs` vs. a symlinked or `..`-spelled one).
fn same_path(a: &Path, b: &Path) -> bool {
    if a == b {
        return true;
    }
    let dir = |p: &Path| p.parent().and_then(|d| std::fs::canonicalize(d).ok());
    a.file_name() == b.file_name() && dir(a).is_some() && dir(a) == dir(b)
}

/// The listening socket the service manager passed for `path` (the name's socket path),
/// non-blocking; `Ok(None)` when it passed none to this process (not started by socket
/// activation, or the variables were another process's: then the server binds its own).
///
/// # Errors
///
/// [`ErrorKind::InvalidConfig`] when sockets were passed but none is bound to `path` (the unit's
/// `ListenStream=` names another path), or the one at `path` is not a listening `AF_UNIX`
/// `SOCK_STREAM` socket, or a passed descriptor is not a socket at all; the message says what
/// each passed descriptor is and what the unit must say. [`ErrorKind::Io`] when it cannot be
/// made non-blocking.
pub(crate) fn take_listener(path: &Path) -> Result<Option<UnixListener>> {
    let mut pool = pool();
    if pool.passed.is_empty() {
        if let Some(why) = &pool.none_because {
            tracing::info!(socket = %path.display(), "socket activation asked for, none to adopt ({why}); binding the socket");
        }
        return Ok(None);
    }
    let found = pool
        .passed
        .iter()
        .position(|p| p.socket.as_ref().and_then(unix_path).is_some_and(|bound| same_path(&bound, path)));
    let Some(i) = found else {
        return Err(Error::new(ErrorKind::InvalidConfig, no_match(&pool.passed, path)));
    };
    let socket = pool.passed[i].socket.as_ref().expect("matched a socket");
    let domain = rustix::net::sockopt::socket_domain(socket).ok();
    let kind = rustix::net::sockopt::socket_type(socket).ok();
    let listening = rustix::net::sockopt::socket_acceptconn(socket).unwrap_or(false);
    if domain != Some(AddressFamily::UNIX) || kind != Some(SocketType::STREAM) || !listening {
        return Err(Error::new(
            ErrorKind::InvalidConfig,
            format!(
                "socket activation: the descriptor {} passed for {} is {}, not a listening Unix stream \
                 socket; the .socket unit must say ListenStream={} (with Accept=no, the default)",
                pool.passed[i].fd,
                path.display(),
                pool.passed[i].what,
                path.display()
            ),
        ));
    }
    let passed = pool.passed.remove(i);
    let socket = passed.socket.expect("matched a socket");
    let listener = UnixListener::from(socket);
    listener.set_nonblocking(true).map_err(|e| {
        Error::io(format_args!("cannot configure the inherited socket {}", path.display()), e)
    })?;
    tracing::info!(socket = %path.display(), fd = passed.fd, label = ?passed.label, "serving on the socket passed by socket activation");
    Ok(Some(listener))
}

/// The error when no passed socket is bound to `path`: what each one is, and what to fix.
fn no_match(passed: &[Passed], path: &Path) -> String {
    let each: Vec<String> = passed
        .iter()
        .map(|p| {
            let label = p.label.as_deref().map(|l| format!(" ({l:?})")).unwrap_or_default();
            format!("fd {}{label}: {}", p.fd, p.what)
        })
        .collect();
    format!(
        "socket activation: none of the {} descriptor(s) passed to this process is bound to {} — {}; \
         the .socket unit must say ListenStream={} (the name's socket in the runtime directory), and \
         the service must run with the same runtime directory (MICROCS_RUNTIME_DIR or \
         XDG_RUNTIME_DIR)",
        passed.len(),
        path.display(),
        each.join("; "),
        path.display()
    )
}

/// Whether a socket this process adopted is still in the pool (for tests of the pool).
#[cfg(test)]
fn pooled() -> usize {
    pool().passed.iter().filter(|p| p.socket.is_some()).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_compare_through_their_directory() {
        let dir = std::env::temp_dir();
        assert!(same_path(&dir.join("A.sock"), &dir.join("A.sock")));
        assert!(same_path(&dir.join("A.sock"), &dir.join(".").join("A.sock")));
        assert!(!same_path(&dir.join("A.sock"), &dir.join("B.sock")));
        assert!(!same_path(Path::new("/nonexistent-x/A.sock"), Path::new("/nonexistent-y/A.sock")));
    }

    #[test]
    fn without_variables_nothing_is_adopted() {
        // The test binary is not socket-activated: nothing in the pool, and no error.
        if std::env::var_os(ENV_FDS).is_none() {
            assert!(take_listener(Path::new("/nonexistent/X.sock")).unwrap().is_none());
            assert_eq!(pooled(), 0);
        }
    }
}
