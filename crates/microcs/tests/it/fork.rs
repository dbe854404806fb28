//! A client used after `fork()`: each process gets only its own replies (blocking: the child
//! reconnects; tokio: the child is told to make its own client), and the parent's connection is
//! never touched by the child. Peers fork for real (`microcs-peer fork-call` / `fork-tokio`),
//! against servers of both flavours.

use std::process::{Command, Output};
use std::time::Duration;

use crate::common::{PEER, PeerProcess, TempDir, unique, watchdog};

/// Runs `microcs-peer <mode> NAME 200` in `dir` and returns what it printed.
fn forked_peer(dir: &TempDir, mode: &str, name: &str) -> Output {
    Command::new(PEER)
        .args([mode, name, "200"])
        .env("MICROCS_RUNTIME_DIR", dir.path())
        .env_remove("MICROCS_NATS_URL")
        .env_remove("MICROCS_TRANSPORT")
        .output()
        .expect("run microcs-peer")
}

fn assert_both_ok(out: &Output) {
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("parent ok") && text.contains("child ok"), "{text}");
}

#[test]
fn a_blocking_client_forked_after_connecting_reconnects_in_the_child() {
    let _w = watchdog(Duration::from_secs(60));
    for server in ["serve", "serve-tokio"] {
        if server == "serve-tokio" && !cfg!(feature = "tokio") {
            continue;
        }
        let dir = TempDir::new("fork");
        let name = unique("FORK");
        let peer = PeerProcess::serve_mode(dir.path(), server, &name, &[]);
        // 200 requests from each process on the client connected before the fork: every reply is
        // the process's own (before the fix: the child read a reply meant for the parent, then
        // both waited out their timeout).
        assert_both_ok(&forked_peer(&dir, "fork-call", &name));
        // The server saw two connections (the parent's, kept; the child's own).
        let stats = dir.client(&name).connect().unwrap().stats().unwrap();
        let served: u64 = stats.endpoints.iter().map(|e| e.num_requests).sum();
        assert!(served >= 401, "{server}: {served} requests served");
        peer.stop();
    }
}

#[cfg(feature = "tokio")]
#[test]
fn a_tokio_client_used_after_fork_fails_at_once_and_leaves_the_parent_alone() {
    let _w = watchdog(Duration::from_secs(60));
    for server in ["serve", "serve-tokio"] {
        let dir = TempDir::new("forkt");
        let name = unique("FORKT");
        let peer = PeerProcess::serve_mode(dir.path(), server, &name, &[]);
        let out = forked_peer(&dir, "fork-tokio", &name);
        assert_both_ok(&out);
        let text = String::from_utf8_lossy(&out.stdout);
        // The refusal says what happened and what to do.
        assert!(text.contains("child refused:") && text.contains("create the client after fork()"), "{text}");
        peer.stop();
    }
}
