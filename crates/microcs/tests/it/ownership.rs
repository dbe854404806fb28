//! One live owner per name, even when the runtime files are removed or replaced under a running
//! server (a tmp cleaner, a user tidying up): the server takes its name back while it is free,
//! and stops with `NameTaken` when another server owns it now. Each case runs against the
//! blocking and the async server, in separate processes. And a client that cannot get an answer
//! is told what the registry knows: a stopped owner is not taken for "not a microcs service".

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::PathBuf;
use std::time::Duration;

use crate::common::{PeerProcess, TempDir, eventually, unique, watchdog};

/// Generous: the servers check their files every second.
const BOUND: Duration = Duration::from_secs(15);

/// The pids `list_in` shows for `name` (so a name listed twice shows two).
pub(crate) fn listed(dir: &TempDir, name: &str) -> Vec<u32> {
    microcs::list_in(dir.path())
        .unwrap_or_default()
        .into_iter()
        .filter(|s| s.name.as_str() == name)
        .map(|s| s.pid)
        .collect()
}

/// The pid of whoever answers a new connection to `name`, if anyone does.
pub(crate) fn answering_pid(dir: &TempDir, name: &str) -> Option<u32> {
    let mut c = dir.client(name).timeout(Duration::from_secs(2)).connect().ok()?;
    String::from_utf8(c.call("pid", b"").ok()?).ok()?.parse().ok()
}

/// Waits until `pid` serves `name` on a new connection and is listed for it, exactly once.
#[track_caller]
fn served_and_listed_once(dir: &TempDir, name: &str, pid: u32, what: &str) {
    let back = eventually(BOUND, || {
        (answering_pid(dir, name) == Some(pid) && listed(dir, name) == [pid]).then_some(())
    });
    assert!(
        back.is_some(),
        "{what}: pid {pid} does not serve '{name}' again (answering: {:?}, listed: {:?})",
        answering_pid(dir, name),
        listed(dir, name)
    );
}

fn sock(dir: &TempDir, name: &str) -> PathBuf {
    dir.path().join(format!("{name}.sock"))
}

fn lock_file(dir: &TempDir, name: &str) -> PathBuf {
    dir.path().join(format!("{name}.lock"))
}

fn dir_removed_restored(mode: &str) {
    let _w = watchdog(Duration::from_secs(90));
    let dir = TempDir::new("own-dir");
    let name = unique("OWN_DIR");
    let a = PeerProcess::serve_mode(dir.path(), mode, &name, &[]);
    let mut before = dir.client(&name).connect().unwrap();
    assert_eq!(before.request(b"before").unwrap(), b"before");

    std::fs::remove_dir_all(dir.path()).unwrap();
    served_and_listed_once(&dir, &name, a.pid, "runtime directory removed");
    let md = std::fs::symlink_metadata(dir.path()).unwrap();
    assert!(md.is_dir() && md.mode() & 0o777 == 0o700, "re-created private: {:o}", md.mode());
    assert_eq!(std::fs::metadata(sock(&dir, &name)).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(before.request(b"after").unwrap(), b"after", "a connection made before still works");

    // The name is the first server's again: a second one is refused and names it.
    let b = PeerProcess::start(dir.path(), "race", &name, &[]);
    assert_eq!(b.first_line, format!("TAKEN {}", a.pid));
    assert!(a.stop().success());
    assert!(listed(&dir, &name).is_empty(), "a graceful stop frees the restored name");
}

#[test]
fn a_removed_runtime_dir_is_restored_and_a_later_server_gets_name_taken_blocking_server() {
    dir_removed_restored("serve");
}

#[cfg(feature = "tokio")]
#[test]
fn a_removed_runtime_dir_is_restored_and_a_later_server_gets_name_taken_tokio_server() {
    dir_removed_restored("serve-tokio");
}

fn files_removed_or_replaced_restored(mode: &str) {
    let _w = watchdog(Duration::from_secs(90));
    let dir = TempDir::new("own-files");
    let name = unique("OWN_FILES");
    let a = PeerProcess::serve_mode(dir.path(), mode, &name, &[]);

    std::fs::remove_file(sock(&dir, &name)).unwrap();
    served_and_listed_once(&dir, &name, a.pid, "socket removed");

    // Another socket put in its place, atomically (as a rename does): the owner holds the lock,
    // so that socket is stale by the registry's rules and is replaced.
    let other = dir.path().join("other.sock");
    let impostor = std::os::unix::net::UnixListener::bind(&other).unwrap();
    std::fs::rename(&other, sock(&dir, &name)).unwrap();
    served_and_listed_once(&dir, &name, a.pid, "socket replaced by another socket");
    drop(impostor);

    std::fs::remove_file(lock_file(&dir, &name)).unwrap();
    served_and_listed_once(&dir, &name, a.pid, "lock file removed");
    let b = PeerProcess::start(dir.path(), "race", &name, &[]);
    assert_eq!(b.first_line, format!("TAKEN {}", a.pid), "the re-created lock is held");
    assert!(a.stop().success());
}

#[test]
fn a_removed_or_replaced_socket_or_lock_file_is_restored_blocking_server() {
    files_removed_or_replaced_restored("serve");
}

#[cfg(feature = "tokio")]
#[test]
fn a_removed_or_replaced_socket_or_lock_file_is_restored_tokio_server() {
    files_removed_or_replaced_restored("serve-tokio");
}

fn taken_meanwhile_stops(mode: &str) {
    let _w = watchdog(Duration::from_secs(90));
    let dir = TempDir::new("own-taken");
    let name = unique("OWN_TAKEN");
    let mut a = PeerProcess::serve_mode(dir.path(), mode, &name, &[]);
    // The first server cannot look while the files go and a second server starts: the other
    // order of events, made certain.
    let frozen = a.sigstop();
    std::fs::remove_dir_all(dir.path()).unwrap();
    let b = PeerProcess::serve_mode(dir.path(), mode, &name, &[]);
    assert_eq!(listed(&dir, &name), vec![b.pid]);
    drop(frozen);

    let status = a.exited(BOUND).expect("the first server stops by itself");
    assert_eq!(a.next_line().as_deref(), Some(format!("LOST NameTaken {}", b.pid).as_str()));
    assert_eq!(status.code(), Some(3), "serve/wait returned the error");
    // ...and it left the new owner's files alone.
    assert!(sock(&dir, &name).exists() && lock_file(&dir, &name).exists());
    assert_eq!(answering_pid(&dir, &name), Some(b.pid));
    assert_eq!(listed(&dir, &name), vec![b.pid], "listed once, by the new owner");
    assert!(b.stop().success());
}

#[test]
fn a_server_whose_name_was_taken_while_its_files_were_gone_stops_with_name_taken_blocking_server() {
    taken_meanwhile_stops("serve");
}

#[cfg(feature = "tokio")]
#[test]
fn a_server_whose_name_was_taken_while_its_files_were_gone_stops_with_name_taken_tokio_server() {
    taken_meanwhile_stops("serve-tokio");
}

fn non_socket_stops(mode: &str) {
    let _w = watchdog(Duration::from_secs(90));
    let dir = TempDir::new("own-file");
    let name = unique("OWN_FILE");
    let mut a = PeerProcess::serve_mode(dir.path(), mode, &name, &[]);
    let planted = dir.path().join("planted");
    std::fs::write(&planted, b"not a socket").unwrap();
    std::fs::rename(&planted, sock(&dir, &name)).unwrap();

    let status = a.exited(BOUND).expect("the server stops by itself");
    assert_eq!(a.next_line().as_deref(), Some("LOST PermissionDenied ?"));
    assert_eq!(status.code(), Some(3));
    assert_eq!(std::fs::read(sock(&dir, &name)).unwrap(), b"not a socket", "the file is kept");
    assert!(!lock_file(&dir, &name).exists(), "the name is free");
    assert!(listed(&dir, &name).is_empty());
}

#[test]
fn a_non_socket_in_the_sockets_place_stops_the_server_and_is_kept_blocking_server() {
    non_socket_stops("serve");
}

#[cfg(feature = "tokio")]
#[test]
fn a_non_socket_in_the_sockets_place_stops_the_server_and_is_kept_tokio_server() {
    non_socket_stops("serve-tokio");
}

/// What connecting to `name` with a 1 s timeout fails with, from the blocking or async client.
fn connect_error(dir: &TempDir, name: &str, tokio_client: bool) -> microcs::Error {
    let timeout = Duration::from_secs(1);
    let result = if tokio_client {
        #[cfg(feature = "tokio")]
        {
            let rt = ::tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let connect =
                microcs::tokio::Client::builder(name).runtime_dir(dir.path()).timeout(timeout).connect();
            rt.block_on(connect).map(drop)
        }
        #[cfg(not(feature = "tokio"))]
        unreachable!("the tokio client needs the feature")
    } else {
        dir.client(name).timeout(timeout).connect().map(drop)
    };
    result.expect_err("nobody answers")
}

fn stopped_owner_is_named(tokio_client: bool) {
    let _w = watchdog(Duration::from_secs(60));
    let dir = TempDir::new("own-stopped");
    let name = unique("OWN_STOPPED");
    let a = PeerProcess::serve(dir.path(), &name);
    let frozen = a.sigstop();
    let e = connect_error(&dir, &name, tokio_client);
    assert_eq!(e.kind(), microcs::ErrorKind::TimedOut, "{e}");
    let want = format!("service '{name}' (pid {}) holds the name but is not answering", a.pid);
    assert!(e.to_string().contains(&want), "{e}");
    assert!(e.to_string().ends_with("stopped or overloaded?"), "{e}");
    assert!(!e.to_string().contains("microcs service"), "{e}");
    drop(frozen);
    assert_eq!(answering_pid(&dir, &name), Some(a.pid), "continued, it answers again");

    // A socket that accepts but never answers, with nobody holding the name: that one may well
    // not be a microcs service.
    let silent = unique("OWN_SILENT");
    let _listener = std::os::unix::net::UnixListener::bind(sock(&dir, &silent)).unwrap();
    let e = connect_error(&dir, &silent, tokio_client);
    assert_eq!(e.kind(), microcs::ErrorKind::TimedOut, "{e}");
    assert!(e.to_string().contains("a microcs service?"), "{e}");
    assert!(!e.to_string().contains("holds the name"), "{e}");
}

#[test]
fn a_stopped_server_is_reported_as_holding_the_name_but_not_answering_blocking_client() {
    stopped_owner_is_named(false);
}

#[cfg(feature = "tokio")]
#[test]
fn a_stopped_server_is_reported_as_holding_the_name_but_not_answering_tokio_client() {
    stopped_owner_is_named(true);
}
