//! A client that cannot get an answer is told what the registry knows: a stopped owner of a
//! name is not taken for "not a microcs service".

use std::path::PathBuf;
use std::time::Duration;

use crate::common::{PeerProcess, TempDir, unique, watchdog};

/// The pid of whoever answers a new connection to `name`, if anyone does.
fn answering_pid(dir: &TempDir, name: &str) -> Option<u32> {
    let mut c = dir.client(name).timeout(Duration::from_secs(2)).connect().ok()?;
    String::from_utf8(c.call("pid", b"").ok()?).ok()?.parse().ok()
}

fn sock(dir: &TempDir, name: &str) -> PathBuf {
    dir.path().join(format!("{name}.sock"))
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
