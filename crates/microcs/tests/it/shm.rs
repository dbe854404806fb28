//! The shared-memory transport (PROTOCOL.md § 17) across real processes: negotiation and
//! fallback, peers dying, hostile rings, fork, many requests in flight.

use std::time::{Duration, Instant};

use microcs::ErrorKind;

use crate::common::*;

const SHM: &[(&str, &str)] = &[("PEER_SHM", "1")];

#[test]
fn a_blocking_pair_moves_to_shared_memory_and_answers_as_on_the_socket() {
    let _w = watchdog(Duration::from_secs(30));
    let dir = TempDir::new("shm-rr");
    let name = unique("SHM_RR");
    let server = PeerProcess::serve_with(dir.path(), &name, SHM);
    let mut c = dir.client(&name).shared_memory(true).connect().unwrap();
    assert_eq!(c.transport(), Some("shm"));
    assert_eq!(c.server_pid(), Some(server.pid));
    assert_eq!(c.request(b"Give me some data back!!").unwrap(), b"Give me some data back!!");
    assert_eq!(c.request(b"").unwrap(), b"");
    for i in 0..2000u32 {
        assert_eq!(c.request(&i.to_be_bytes()).unwrap(), i.to_be_bytes());
    }
    // Larger than a ring (256 KiB) both ways: streamed through it as through a full socket.
    for n in [255 * 1024, 256 * 1024, 3 << 20] {
        let big: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
        assert_eq!(c.request(&big).unwrap(), big, "{n} bytes");
    }
    let e = c.call("fail", b"").unwrap_err();
    assert_eq!(e.remote().map(|r| r.code()), Some(418));
    assert_eq!(c.call("deadline_ms", b"").map(|v| !v.is_empty()).ok(), Some(true));
    assert!(server.stop().success());
}

#[test]
fn without_an_offer_or_without_asking_the_socket_is_used() {
    let _w = watchdog(Duration::from_secs(30));
    let dir = TempDir::new("shm-fb");
    let name = unique("SHM_FB");
    let _plain = PeerProcess::serve(dir.path(), &name);
    let mut c = dir.client(&name).shared_memory(true).connect().unwrap();
    assert_eq!(c.transport(), Some("unix"), "a server that does not offer: the socket");
    assert_eq!(c.request(b"x").unwrap(), b"x");
    let name2 = unique("SHM_FB2");
    let _offering = PeerProcess::serve_with(dir.path(), &name2, SHM);
    let mut c = dir.client(&name2).shared_memory(false).connect().unwrap();
    assert_eq!(c.transport(), Some("unix"), "a client that does not ask: the socket");
    assert_eq!(c.request(b"y").unwrap(), b"y");
}

#[test]
fn a_server_killed_mid_request_is_noticed_within_milliseconds() {
    let _w = watchdog(Duration::from_secs(30));
    let dir = TempDir::new("shm-kill");
    let name = unique("SHM_KILL");
    let server = PeerProcess::serve_with(dir.path(), &name, SHM);
    let mut c = dir.client(&name).shared_memory(true).timeout(Duration::from_secs(20)).connect().unwrap();
    assert_eq!(c.transport(), Some("shm"));
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        server.kill9();
    });
    let t0 = Instant::now();
    let e = c.call("sleep_ms", b"5000").unwrap_err();
    let took = t0.elapsed();
    killer.join().unwrap();
    assert!(took < Duration::from_secs(3), "noticed after {took:?}, not at the deadline");
    assert!(e.may_have_run(), "it was running: {e}");
    assert_eq!(e.kind(), ErrorKind::Closed, "{e}");
}

#[test]
fn a_server_restarted_between_requests_is_reconnected_without_may_have_run() {
    let _w = watchdog(Duration::from_secs(30));
    let dir = TempDir::new("shm-restart");
    let name = unique("SHM_RESTART");
    let server = PeerProcess::serve_with(dir.path(), &name, SHM);
    let mut c = dir.client(&name).shared_memory(true).connect().unwrap();
    assert_eq!(c.request(b"one").unwrap(), b"one");
    server.kill9();
    let again = PeerProcess::serve_with(dir.path(), &name, SHM);
    // The dead server's ring still took the request, but nobody read a byte of it: it did not
    // run, so it is sent again on a new connection.
    assert_eq!(c.request(b"two").unwrap(), b"two");
    assert_eq!(c.server_pid(), Some(again.pid));
    assert_eq!(c.transport(), Some("shm"));
}

/// Descriptors and shared-memory mappings of a process.
fn shm_resources(pid: u32) -> (usize, usize) {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    (fd_count(pid), maps.lines().filter(|l| l.contains("microcs-shm")).count())
}

#[test]
fn a_client_killed_mid_request_leaks_nothing_in_the_server() {
    let _w = watchdog(Duration::from_secs(60));
    let dir = TempDir::new("shm-ckill");
    let name = unique("SHM_CKILL");
    let server = PeerProcess::serve_with(dir.path(), &name, SHM);
    // A warm-up connection, so that lazily opened descriptors are in the baseline.
    dir.client(&name).shared_memory(true).connect().unwrap().request(b"warm").unwrap();
    let idle = eventually(Duration::from_secs(5), || {
        let r = shm_resources(server.pid);
        (r.1 == 0).then_some(r)
    })
    .expect("the warm-up connection's mapping is released");
    for round in 0..3 {
        let mut client = std::process::Command::new(PEER)
            .args(["call-method", &name, "sleep_ms", "1500"])
            .env("MICROCS_RUNTIME_DIR", dir.path())
            .env("MICROCS_SHM", "1")
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        eventually(Duration::from_secs(10), || (shm_resources(server.pid).1 > 0).then_some(()))
            .expect("the client's connection maps a region in the server");
        std::thread::sleep(Duration::from_millis(100));
        client.kill().unwrap();
        client.wait().unwrap();
        let back = eventually(Duration::from_secs(15), || {
            let r = shm_resources(server.pid);
            (r == idle).then_some(r)
        });
        assert_eq!(back, Some(idle), "round {round}: descriptors and mappings back to the baseline");
    }
    // And the server still serves.
    let mut c = dir.client(&name).shared_memory(true).connect().unwrap();
    assert_eq!(c.request(b"still").unwrap(), b"still");
}
