//! Fault injection against the blocking server: hostile or broken peers, resource exhaustion,
//! crashes and restarts (issue "Reliability and security"). Each test states the promise it
//! checks; docs/RELIABILITY.md lists them.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use microcs::ErrorKind;
use microcs::proto::{self, Header, Hello, Kind};

use crate::common::*;

/// Runs a fault test against both server flavours: the blocking server (`microcs-peer serve`)
/// and, with feature `tokio`, the async one (`microcs-peer serve-tokio`).
macro_rules! both_servers {
    ($body:ident, $blocking:ident, $tokio:ident) => {
        #[test]
        fn $blocking() {
            $body("serve");
        }

        #[cfg(feature = "tokio")]
        #[test]
        fn $tokio() {
            $body("serve-tokio");
        }
    };
}

fn sock(dir: &TempDir, name: &str) -> std::path::PathBuf {
    dir.path().join(format!("{name}.sock"))
}

/// Promise 1: silent connections (slowloris) cannot lock real clients out.
fn slowloris_connections_do_not_lock_out_a_real_client(mode: &str) {
    let _w = watchdog(Duration::from_secs(60));
    let dir = TempDir::new("loris");
    let name = unique("LORIS");
    let server = PeerProcess::serve_mode(dir.path(), mode, &name, &[("PEER_MAX_PENDING", "8")]);
    let silent: Vec<UnixStream> = (0..100).map(|_| UnixStream::connect(sock(&dir, &name)).unwrap()).collect();
    // A real client, arriving last, is served: the oldest silent connections made room.
    let mut c = dir.client(&name).timeout(Duration::from_secs(10)).connect().unwrap();
    assert_eq!(c.request(b"real").unwrap(), b"real");
    // The evicted silent connections were closed by the server.
    let closed = silent
        .iter()
        .filter(|s| {
            s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
            matches!((&**s).read(&mut [0u8; 1]), Ok(0) | Err(_))
        })
        .count();
    assert!(closed >= 50, "only {closed} of 100 silent connections were dropped");
    drop(silent);
    assert!(server.stop().success());
}

/// Promise 1: out of file descriptors, accept backs off instead of spinning, and the service
/// recovers once descriptors are free again.
fn fd_exhaustion_backs_off_and_recovers(mode: &str) {
    let _w = watchdog(Duration::from_secs(60));
    if Command::new("prlimit").arg("--version").output().is_err() {
        eprintln!("skipped: prlimit not installed");
        return;
    }
    let dir = TempDir::new("nofile");
    let name = unique("NOFILE");
    let server =
        PeerProcess::start_wrapped(&["prlimit", "--nofile=48:48", "--"], dir.path(), mode, &name, &[]);
    assert!(server.first_line.starts_with("READY"), "{}", server.first_line);
    let pid = server.child.id();
    let mut hogs = Vec::new();
    for _ in 0..80 {
        match UnixStream::connect(sock(&dir, &name)) {
            Ok(s) => hogs.push(s),
            Err(_) => break, // backlog full
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    let fds = fd_count(pid);
    assert!(fds >= 44, "the server should be out of descriptors, has {fds} of 48 open");
    let t0 = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(1));
    let used = cpu_ticks(pid) - t0;
    // A spinning accept loop burns a whole CPU (~100 ticks per second); backing off uses a few.
    assert!(used < 50, "server used {used} ticks in one second while out of descriptors");
    drop(hogs);
    let mut c =
        eventually(Duration::from_secs(20), || dir.client(&name).connect().ok()).expect("service recovered");
    assert_eq!(c.request(b"back").unwrap(), b"back");
}

/// Promise 1: a client that sends and never reads its replies is disconnected after the write
/// timeout; the server's memory does not grow with what it could not send.
fn a_client_that_never_reads_is_disconnected(mode: &str) {
    let _w = watchdog(Duration::from_secs(60));
    let dir = TempDir::new("noread");
    let name = unique("NOREAD");
    let server = PeerProcess::serve_mode(dir.path(), mode, &name, &[("PEER_WRITE_TIMEOUT_MS", "300")]);
    let rss0 = rss_kib(server.pid);
    let mut s = UnixStream::connect(sock(&dir, &name)).unwrap();
    let mut b = Vec::new();
    proto::encode(
        &mut b,
        &Header::new(Kind::Hello, 0),
        b"",
        &Hello { max_payload: 1 << 24, features: 0 }.to_bytes(),
    );
    s.write_all(&b).unwrap();
    let payload = vec![7u8; 256 * 1024];
    s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut sent = 0;
    let mut frame = Vec::new();
    let outcome = loop {
        frame.clear();
        proto::encode(&mut frame, &Header::request(sent + 1, 0), b"", &payload);
        match s.write_all(&frame) {
            Ok(()) => sent += 1,
            Err(e) => break e,
        }
        if sent > 2000 {
            panic!("the server kept accepting requests from a client that reads nothing");
        }
    };
    assert!(
        matches!(outcome.kind(), std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset),
        "expected the server to drop us, got {outcome}"
    );
    let rss1 = rss_kib(server.pid);
    assert!(rss1 < rss0 + 64 * 1024, "server RSS grew from {rss0} to {rss1} KiB");
    assert_eq!(dir.client(&name).connect().unwrap().request(b"others fine").unwrap(), b"others fine");
}

/// Promises 1 and 2: a client process killed after sending leaves no descriptor behind and its
/// handler is cancelled.
fn a_killed_client_leaks_nothing_and_its_handler_is_cancelled(mode: &str) {
    let _w = watchdog(Duration::from_secs(60));
    let dir = TempDir::new("killcl");
    let name = unique("KILLCL");
    let server = PeerProcess::serve_mode(dir.path(), mode, &name, &[]);
    let mut probe = dir.client(&name).connect().unwrap();
    probe.request(b"warm").unwrap();
    let fds0 = fd_count(server.pid);
    let marker = dir.path().join("cancel-marker");
    for _ in 0..5 {
        let mut child = Command::new(PEER)
            .args(["call-method", &name, "wait_cancel", marker.to_str().unwrap()])
            .env("MICROCS_RUNTIME_DIR", dir.path())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(150));
        child.kill().unwrap();
        child.wait().unwrap();
    }
    let lines = eventually(Duration::from_secs(20), || {
        let n = std::fs::read_to_string(&marker).map(|s| s.lines().count()).unwrap_or(0);
        (n == 5).then_some(n)
    });
    assert_eq!(lines, Some(5), "every killed client's handler saw the cancellation");
    let settled = eventually(Duration::from_secs(20), || (fd_count(server.pid) <= fds0).then_some(()));
    assert!(settled.is_some(), "descriptors: {} before, {} after", fds0, fd_count(server.pid));
    assert_eq!(probe.request(b"alive").unwrap(), b"alive");
}

/// Promise 1: a flood on one connection does not starve another.
fn a_flood_on_one_connection_does_not_starve_another(mode: &str) {
    let _w = watchdog(Duration::from_secs(60));
    let dir = TempDir::new("flood");
    let name = unique("FLOOD");
    let _server = PeerProcess::serve_mode(dir.path(), mode, &name, &[]);
    let stop = Arc::new(AtomicBool::new(false));
    let (d, n, st) = (dir.path().to_owned(), name.clone(), stop.clone());
    let flooder = std::thread::spawn(move || {
        let mut c = microcs::Client::builder(&n).runtime_dir(d).connect().unwrap();
        let mut count = 0u64;
        let payload = vec![1u8; 4096];
        while !st.load(Ordering::Relaxed) {
            c.request(&payload).unwrap();
            count += 1;
        }
        count
    });
    let mut c = dir.client(&name).connect().unwrap();
    for i in 0..500u32 {
        assert_eq!(c.request(&i.to_be_bytes()).unwrap(), i.to_be_bytes());
    }
    stop.store(true, Ordering::Relaxed);
    assert!(flooder.join().unwrap() > 0);
}

/// Promises 2, 3 and 5: restart the server over and over (gracefully and with kill -9) while
/// clients send numbered calls. Every call ends in its own reply or a typed error; no reply is
/// another call's; no call runs twice; a call reported as not run did not run.
#[test]
fn chaos_restarts_lose_nothing_misroute_nothing_and_run_nothing_twice() {
    let _w = watchdog(Duration::from_secs(120));
    let dir = TempDir::new("chaos");
    let name = unique("CHAOS");
    let log = dir.path().join("executions.log");
    let log_s = log.to_str().unwrap().to_owned();
    let env = [("PEER_LOG", log_s.as_str()), ("PEER_GRACE_MS", "2000")];
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    let first = PeerProcess::serve_with(dir.path(), &name, &env);
    for t in 0..4 {
        let (d, n, st) = (dir.path().to_owned(), name.clone(), stop.clone());
        clients.push(std::thread::spawn(move || {
            let mut results = Vec::new();
            let mut client = None;
            let mut i = 0u32;
            while !st.load(Ordering::Relaxed) {
                let tag = format!("t{t}-{i}");
                i += 1;
                if client.is_none() {
                    match microcs::Client::builder(&n)
                        .runtime_dir(&d)
                        .timeout(Duration::from_secs(5))
                        .connect()
                    {
                        Ok(c) => client = Some(c),
                        Err(e) => {
                            assert!(
                                matches!(e.kind(), ErrorKind::NoService | ErrorKind::Closed | ErrorKind::Io),
                                "{e:?}"
                            );
                            std::thread::sleep(Duration::from_millis(2));
                            continue;
                        }
                    }
                }
                let c = client.as_mut().unwrap();
                match c.call("record", tag.as_bytes()) {
                    Ok(reply) => {
                        assert_eq!(reply, tag.as_bytes(), "misrouted reply");
                        results.push((tag, true, true));
                    }
                    Err(e) => {
                        assert!(
                            matches!(
                                e.kind(),
                                ErrorKind::NoService
                                    | ErrorKind::Closed
                                    | ErrorKind::Io
                                    | ErrorKind::TimedOut
                            ),
                            "untyped failure: {e:?}"
                        );
                        results.push((tag, false, e.may_have_run()));
                    }
                }
            }
            results
        }));
    }
    let t0 = Instant::now();
    let mut server = Some(first);
    let mut round = 0;
    while t0.elapsed() < Duration::from_secs(4) {
        std::thread::sleep(Duration::from_millis(120));
        let s = server.take().unwrap();
        if round % 2 == 0 {
            s.kill9();
        } else {
            assert!(s.stop().success());
        }
        round += 1;
        server = Some(PeerProcess::serve_with(dir.path(), &name, &env));
    }
    stop.store(true, Ordering::Relaxed);
    let results: Vec<_> = clients.into_iter().flat_map(|c| c.join().unwrap()).collect();
    drop(server);
    let mut runs: HashMap<String, usize> = HashMap::new();
    for line in std::fs::read_to_string(&log).unwrap().lines() {
        *runs.entry(line.to_owned()).or_default() += 1;
    }
    let ok = results.iter().filter(|r| r.1).count();
    assert!(ok > 100, "only {ok} calls succeeded across {round} restarts");
    assert!(results.len() > ok, "the chaos never interrupted a call ({round} restarts)");
    for (tag, succeeded, may_have_run) in &results {
        let n = runs.get(tag).copied().unwrap_or(0);
        assert!(n <= 1, "{tag} ran {n} times");
        if *succeeded {
            assert_eq!(n, 1, "{tag} succeeded but never ran");
        } else if !may_have_run {
            assert_eq!(n, 0, "{tag} was reported as not run, but it ran");
        }
    }
    eprintln!("chaos: {} calls, {ok} ok, {round} restarts", results.len());
}

/// Promise 4: hostile names are refused before any file system call.
#[test]
fn hostile_names_are_invalid_before_touching_the_file_system() {
    let _w = watchdog(Duration::from_secs(10));
    let base = std::path::PathBuf::from(format!("/tmp/mcs-never-created-{}", std::process::id()));
    let long_dir = base.join("d".repeat(60));
    for bad in ["../x", "a/b", "", "a\0b", "a\nb", "-rf", "LIFE_GЕN", "..", ".", "a..b", "x y", "é"] {
        let e = microcs::Server::builder(bad).runtime_dir(&base).bind().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidName, "{bad:?}: {e}");
        let e = microcs::Client::builder(bad).runtime_dir(&base).connect().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidName, "{bad:?}: {e}");
    }
    // Valid, but the socket path would not fit a Unix socket address.
    let e = microcs::Server::builder(&"n".repeat(60)).runtime_dir(&long_dir).bind().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidName, "{e}");
    assert!(e.to_string().contains("107"), "{e}");
    assert!(!base.exists(), "a refused name must not create anything");
}

/// Promise 4: a directory at the socket path is refused and kept.
#[test]
fn a_directory_at_the_socket_path_is_refused_and_kept() {
    let _w = watchdog(Duration::from_secs(10));
    let dir = TempDir::new("dirsock");
    std::fs::create_dir(sock(&dir, "D")).unwrap();
    let e = dir.server("D").bind().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied);
    assert!(e.to_string().contains("directory"), "{e}");
    assert!(sock(&dir, "D").is_dir());
}

/// Promise 4: the fallback runtime directory pre-created by someone else is refused.
#[test]
fn a_fallback_directory_planted_by_another_user_is_refused() {
    let _w = watchdog(Duration::from_secs(20));
    if rustix::process::geteuid().as_raw() != 0 || Command::new("setpriv").arg("--version").output().is_err()
    {
        eprintln!("skipped: needs root and setpriv to act as another user");
        return;
    }
    // Act as uid 65533, whose fallback directory is /tmp/microcs-65533; plant it as root first.
    let planted = std::path::Path::new("/tmp/microcs-65533");
    let _ = std::fs::remove_dir_all(planted);
    std::fs::create_dir(planted).unwrap();
    let run = |mode: &str| {
        Command::new("setpriv")
            .args(["--reuid=65533", "--regid=65533", "--clear-groups", PEER, mode, "PLANTED"])
            .env_remove("MICROCS_RUNTIME_DIR")
            .env_remove("XDG_RUNTIME_DIR")
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    };
    for mode in ["serve", "call"] {
        let out = run(mode);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{mode}: {err}");
        assert!(err.starts_with("PermissionDenied") && err.contains("/tmp/microcs-65533"), "{mode}: {err}");
        assert!(err.contains("another user"), "{mode}: {err}");
    }
    std::fs::remove_dir_all(planted).unwrap();
}

/// A fake server for the client-side mirror cases: accepts one connection, answers the hello,
/// then runs `script` on the stream.
fn fake_server(
    dir: &TempDir,
    name: &str,
    script: impl FnOnce(&mut UnixStream) + Send + 'static,
) -> std::thread::JoinHandle<()> {
    let l = std::os::unix::net::UnixListener::bind(sock(dir, name)).unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut buf = [0u8; 64];
        let _ = s.read(&mut buf);
        let ack = proto::HelloAck {
            max_payload: 1 << 20,
            max_in_flight: 8,
            pid: 1,
            name: "FAKE".into(),
            ..Default::default()
        };
        let mut b = Vec::new();
        proto::encode(&mut b, &Header::new(Kind::HelloAck, 0), b"", &ack.to_bytes());
        s.write_all(&b).unwrap();
        script(&mut s);
    })
}

fn read_request_id(s: &mut UnixStream) -> u64 {
    let mut head = [0u8; proto::FRAME_OVERHEAD];
    s.read_exact(&mut head).unwrap();
    let len = u32::from_be_bytes(head[..4].try_into().unwrap()) as usize;
    let mut rest = vec![0u8; len + 4 - proto::FRAME_OVERHEAD];
    s.read_exact(&mut rest).unwrap();
    u64::from_be_bytes(head[8..16].try_into().unwrap())
}

/// Promise 2 (client side): a reply with another id is never taken for ours.
#[test]
fn client_ignores_replies_for_other_ids() {
    let _w = watchdog(Duration::from_secs(20));
    let dir = TempDir::new("fakeid");
    let t = fake_server(&dir, "FAKE", |s| {
        let id = read_request_id(s);
        let mut b = Vec::new();
        proto::encode(&mut b, &Header::new(Kind::Reply, id + 1), b"", b"not yours");
        proto::encode(&mut b, &Header::new(Kind::Reply, id), b"", b"yours");
        s.write_all(&b).unwrap();
        let _ = s.read(&mut [0u8; 1]);
    });
    let mut c = dir.client("FAKE").connect().unwrap();
    assert_eq!(c.request(b"q").unwrap(), b"yours");
    drop(c);
    t.join().unwrap();
}

/// Promise 1 (client side): a giant length prefix from the server is refused before
/// allocating, and a trickled reply cannot hold the caller past its deadline.
#[test]
fn client_refuses_giant_frames_and_keeps_its_deadline_against_a_trickling_server() {
    let _w = watchdog(Duration::from_secs(20));
    let dir = TempDir::new("fakebig");
    let t = fake_server(&dir, "BIG", |s| {
        read_request_id(s);
        s.write_all(&[0xff, 0xff, 0xff, 0xf0]).unwrap();
        let _ = s.read(&mut [0u8; 1]);
    });
    let mut c = dir.client("BIG").max_frame(1 << 20).connect().unwrap();
    let e = c.request(b"q").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Protocol, "{e}");
    assert!(e.to_string().contains("over the limit"), "{e}");
    drop(c);
    t.join().unwrap();

    let t = fake_server(&dir, "TRICKLE", |s| {
        let id = read_request_id(s);
        let mut b = Vec::new();
        proto::encode(&mut b, &Header::new(Kind::Reply, id), b"", &[0u8; 4096]);
        for byte in b {
            if s.write_all(&[byte]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    let mut c = dir.client("TRICKLE").timeout(Duration::from_millis(400)).connect().unwrap();
    let t0 = Instant::now();
    let e = c.request(b"q").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::TimedOut, "{e}");
    assert!(t0.elapsed() >= Duration::from_millis(400));
    drop(c);
    t.join().unwrap();
}

/// Promise 1: declared-but-unsent payloads cost address space, not memory: fifty connections
/// each declaring a 16 MiB frame and sending a few bytes leave the server's RSS nearly flat,
/// and the frame timeout closes them.
fn declared_giant_frames_cost_only_what_was_received(mode: &str) {
    let _w = watchdog(Duration::from_secs(60));
    let dir = TempDir::new("declared");
    let name = unique("DECLARED");
    let server = PeerProcess::serve_mode(dir.path(), mode, &name, &[]);
    let rss0 = rss_kib(server.pid);
    let mut conns = Vec::new();
    for _ in 0..50 {
        let mut s = UnixStream::connect(sock(&dir, &name)).unwrap();
        let mut b = Vec::new();
        proto::encode(
            &mut b,
            &Header::new(Kind::Hello, 0),
            b"",
            &Hello { max_payload: 1 << 24, features: 0 }.to_bytes(),
        );
        b.extend_from_slice(&Header::request(1, 0).to_bytes(0, proto::DEFAULT_MAX_PAYLOAD as usize));
        b.extend_from_slice(&[9u8; 100]);
        s.write_all(&b).unwrap();
        conns.push(s);
    }
    std::thread::sleep(Duration::from_millis(500));
    let rss1 = rss_kib(server.pid);
    assert!(rss1 < rss0 + 32 * 1024, "RSS went from {rss0} to {rss1} KiB for 50 x 16 MiB declared");
    let mut c = dir.client(&name).connect().unwrap();
    assert_eq!(c.request(b"fine").unwrap(), b"fine");
}

/// `send_buffer` (default 1 MiB, kernel-capped) bounds what a client that does not read can make
/// the server hold in the kernel, and with room enough a large reply is handed over whole;
/// `send_buffer(0)` keeps the kernel's default. Either way the reply arrives intact.
fn the_send_buffer_bounds_what_a_slow_reader_is_sent(mode: &str) {
    let _w = watchdog(Duration::from_secs(60));
    let dir = TempDir::new("sndbuf-s");
    // Under the 1 MiB reply limit `Raw::hello` announces.
    let size = 1_000_000;
    for (env, send_buffer) in [(None, 1 << 20), (Some("0"), 0)] {
        let name = unique("SNDBUFS");
        let env: Vec<(&str, &str)> = env.map(|v| ("PEER_SEND_BUFFER", v)).into_iter().collect();
        let server = PeerProcess::serve_mode(dir.path(), mode, &name, &env);
        let mut raw = Raw::hello(&dir, &name);
        raw.request(1, "big", size.to_string().as_bytes());
        assert_send_buffer_held(settled_unread(&raw.s), size + proto::FRAME_OVERHEAD, send_buffer);
        let reply = raw.expect_reply(1);
        assert!(reply.len() == size && reply.iter().all(|&b| b == b'x'), "the whole reply, intact");
        assert!(server.stop().success());
    }
}

both_servers!(
    the_send_buffer_bounds_what_a_slow_reader_is_sent,
    send_buffer_blocking_server,
    send_buffer_tokio_server
);

both_servers!(
    slowloris_connections_do_not_lock_out_a_real_client,
    slowloris_blocking_server,
    slowloris_tokio_server
);

both_servers!(
    fd_exhaustion_backs_off_and_recovers,
    fd_exhaustion_blocking_server,
    fd_exhaustion_tokio_server
);

both_servers!(
    a_client_that_never_reads_is_disconnected,
    never_reads_blocking_server,
    never_reads_tokio_server
);

both_servers!(
    a_killed_client_leaks_nothing_and_its_handler_is_cancelled,
    killed_client_blocking_server,
    killed_client_tokio_server
);

both_servers!(a_flood_on_one_connection_does_not_starve_another, flood_blocking_server, flood_tokio_server);

both_servers!(
    declared_giant_frames_cost_only_what_was_received,
    declared_giant_blocking_server,
    declared_giant_tokio_server
);
