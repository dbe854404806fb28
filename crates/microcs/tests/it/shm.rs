//! The shared-memory transport (PROTOCOL.md § 18) across real processes: negotiation and
//! fallback, peers dying, hostile rings, fork, many requests in flight.

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use microcs::ErrorKind;
use microcs::proto::{self, FEATURE_SHM, Header, Hello, HelloAck, Kind};

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

#[test]
fn deadline_and_cancel_over_shared_memory_reach_the_handler() {
    let _w = watchdog(Duration::from_secs(30));
    let dir = TempDir::new("shm-cancel");
    let name = unique("SHM_CANCEL");
    let _server = PeerProcess::serve_with(dir.path(), &name, SHM);
    let mut c = dir.client(&name).shared_memory(true).timeout(Duration::from_secs(5)).connect().unwrap();
    assert_eq!(c.transport(), Some("shm"));
    let ms: u64 = String::from_utf8(c.call("deadline_ms", b"").unwrap()).unwrap().parse().unwrap();
    assert!(ms > 0 && ms <= 5000, "the handler sees the deadline: {ms}");
    // Long enough for the handler to have started even on a loaded machine (a request whose
    // deadline passed before its handler began is refused unrun, and would leave no marker).
    c.set_timeout(Duration::from_millis(1500));
    let marker = dir.path().join("cancel.marker");
    let e = c.call("wait_cancel", marker.to_str().unwrap().as_bytes()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::TimedOut, "{e}");
    let got = eventually(Duration::from_secs(10), || std::fs::read_to_string(&marker).ok());
    assert!(got.is_some_and(|s| s.starts_with("cancelled")), "the Cancel reached the handler");
    c.set_timeout(Duration::from_secs(5));
    assert_eq!(c.request(b"after").unwrap(), b"after", "the connection survives; the late reply is dropped");
}

#[test]
fn a_client_forked_after_connecting_never_uses_its_parents_rings() {
    let _w = watchdog(Duration::from_secs(60));
    let dir = TempDir::new("shm-fork");
    let name = unique("SHM_FORK");
    let _server = PeerProcess::serve_with(dir.path(), &name, SHM);
    let out = std::process::Command::new(PEER)
        .args(["fork-call", &name, "300"])
        .env("MICROCS_RUNTIME_DIR", dir.path())
        .env("MICROCS_SHM", "1")
        .env_remove("MICROCS_NATS_URL")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("parent ok") && text.contains("child ok"), "{text}");
}

/// A fake server at `NAME.sock`: answers the `Hello` with a shared-memory offer of 4 KiB rings
/// (`sealed` or not), then lets `act` do what it wants with the region and eventfds. (Also the
/// fake server of `shm_lone_large.rs`.)
pub(crate) fn hostile_server(
    dir: &TempDir,
    name: &str,
    sealed: bool,
    act: impl FnOnce(&mut [u8], &[std::os::fd::OwnedFd], UnixStream) + Send + 'static,
) -> std::thread::JoinHandle<std::os::unix::net::UnixListener> {
    use rustix::fs::{MemfdFlags, SealFlags};
    let listener = std::os::unix::net::UnixListener::bind(dir.path().join(format!("{name}.sock"))).unwrap();
    let name = name.to_owned();
    std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        let mut raw = Raw::from_stream(s);
        let (h, _, _) = raw.read().expect("a hello");
        assert_eq!(h.kind(), Some(Kind::Hello));
        const CAP: usize = 4096;
        let len = 4096 + 2 * CAP;
        let memfd =
            rustix::fs::memfd_create("microcs-shm", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING).unwrap();
        rustix::fs::ftruncate(&memfd, len as u64).unwrap();
        if sealed {
            rustix::fs::fcntl_add_seals(&memfd, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)
                .unwrap();
        }
        // The fake server is the hostile side: it writes what it likes.
        let ptr = map_shared(&memfd, len);
        // SAFETY: (test) the mapping above, `len` bytes, alive until the munmap below.
        let region = unsafe { std::slice::from_raw_parts_mut(ptr.cast::<u8>(), len) };
        region[0..4].copy_from_slice(&0x6873_636du32.to_ne_bytes());
        region[4..8].copy_from_slice(&1u32.to_ne_bytes());
        region[8..12].copy_from_slice(&(CAP as u32).to_ne_bytes());
        let efds: Vec<_> = (0..4)
            .map(|_| rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC).unwrap())
            .collect();
        let ack = HelloAck {
            max_payload: 16 << 20,
            max_in_flight: 128,
            pid: std::process::id(),
            name,
            features: FEATURE_SHM,
            ring_capacity: CAP as u32,
        };
        let mut bytes = Vec::new();
        proto::encode(&mut bytes, &Header::new(Kind::HelloAck, 0), b"", &ack.to_bytes());
        let fds: Vec<_> = std::iter::once(&memfd).chain(&efds).map(|f| f.as_fd()).collect();
        let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(5))];
        let mut anc = rustix::net::SendAncillaryBuffer::new(&mut space);
        assert!(anc.push(rustix::net::SendAncillaryMessage::ScmRights(&fds)));
        rustix::net::sendmsg(
            &raw.s,
            &[std::io::IoSlice::new(&bytes)],
            &mut anc,
            rustix::net::SendFlags::empty(),
        )
        .unwrap();
        act(region, &efds, raw.s);
        // SAFETY: (test) the mapping made above, no longer used.
        let _ = unsafe { rustix::mm::munmap(ptr, len) };
        listener
    })
}

/// Ring B's control block and data in the fake server's region (PROTOCOL.md § 18.2).
const B_TAIL: usize = 2048;
const B_DATA: usize = 4096 + 4096;

#[test]
fn garbage_in_the_answer_ring_is_a_protocol_error_not_a_hang() {
    let _w = watchdog(Duration::from_secs(30));
    let flavours: &[bool] = if cfg!(feature = "tokio") { &[false, true] } else { &[false] };
    for (case, tokio) in ["garbage bytes", "index out of range"]
        .into_iter()
        .flat_map(|c| flavours.iter().map(move |t| (c, *t)))
    {
        let dir = TempDir::new("shm-hostile");
        let name = unique("SHM_HOSTILE");
        let fake = hostile_server(&dir, &name, true, move |region, efds, socket| {
            std::thread::sleep(Duration::from_millis(200)); // the client's request is in ring A
            let tail: u64 = if case == "garbage bytes" {
                region[B_DATA..B_DATA + 64].fill(0xff); // a length prefix of 4 GiB
                64
            } else {
                1 << 40
            };
            region[B_TAIL..B_TAIL + 8].copy_from_slice(&tail.to_ne_bytes());
            let _ = rustix::io::write(&efds[2], &1u64.to_ne_bytes()); // B.data
            std::thread::sleep(Duration::from_millis(500));
            drop(socket);
        });
        let t0 = Instant::now();
        let e = if tokio {
            tokio_request_fails(&dir, &name)
        } else {
            let mut c =
                dir.client(&name).shared_memory(true).timeout(Duration::from_secs(10)).connect().unwrap();
            assert_eq!(c.transport(), Some("shm"), "{case}");
            c.request(b"hello").unwrap_err()
        };
        let case = format!("{case} ({} client)", if tokio { "tokio" } else { "blocking" });
        assert!(t0.elapsed() < Duration::from_secs(5), "{case}: not the deadline ({:?}): {e}", t0.elapsed());
        if case.starts_with("index out of range") {
            // A corrupt index is the peer breaking the protocol, not an I/O failure.
            assert_eq!(e.kind(), ErrorKind::Protocol, "{case}: {e}");
            assert!(e.to_string().contains("shared-memory protocol"), "{case}: {e}");
        } else {
            assert!(matches!(e.kind(), ErrorKind::Protocol | ErrorKind::FrameTooLarge), "{case}: {e}");
        }
        fake.join().unwrap();
    }
}

/// A tokio client's request to `name` over shared memory, which must fail.
#[cfg(feature = "tokio")]
fn tokio_request_fails(dir: &TempDir, name: &str) -> microcs::Error {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let c = tokio_shm_client(dir, name, Duration::from_secs(10)).await;
        c.request(b"hello").await.unwrap_err()
    })
}

#[cfg(not(feature = "tokio"))]
fn tokio_request_fails(_dir: &TempDir, _name: &str) -> microcs::Error {
    unreachable!("only with the tokio feature")
}

#[test]
fn a_ring_never_consumed_holds_the_callers_deadline() {
    let _w = watchdog(Duration::from_secs(30));
    let dir = TempDir::new("shm-stall");
    let name = unique("SHM_STALL");
    let fake = hostile_server(&dir, &name, true, |_region, _efds, socket| {
        std::thread::sleep(Duration::from_secs(3));
        drop(socket);
    });
    let mut c = dir.client(&name).shared_memory(true).timeout(Duration::from_millis(400)).connect().unwrap();
    assert_eq!(c.transport(), Some("shm"));
    let t0 = Instant::now();
    // Ten times the ring: the writer waits for room that never comes.
    let e = c.request(&vec![1u8; 40 * 1024]).unwrap_err();
    let took = t0.elapsed();
    assert_eq!(e.kind(), ErrorKind::TimedOut, "{e}");
    assert!(took >= Duration::from_millis(350) && took < Duration::from_secs(2), "{took:?}");
    fake.join().unwrap();
}

#[test]
fn an_unsealed_region_is_refused_and_the_client_reconnects_on_the_socket() {
    let _w = watchdog(Duration::from_secs(30));
    let dir = TempDir::new("shm-unsealed");
    let name = unique("SHM_UNSEALED");
    let fake = hostile_server(&dir, &name, false, move |region, _efds, socket| {
        // The client closes this connection without using the region...
        let mut one = [0u8; 1];
        assert_eq!(
            rustix::io::read(&socket, &mut one).unwrap_or(0),
            0,
            "nothing sent over an unsealed region"
        );
        assert!(region[4096..].iter().all(|&b| b == 0), "the client wrote nothing into it");
    });
    let second = std::thread::spawn(move || {
        // ...and connects again without asking; it gets a plain server here.
        let listener = fake.join().unwrap();
        let (s, _) = listener.accept().unwrap();
        let mut raw = Raw::from_stream(s);
        let (_, _, body) = raw.read().expect("a hello");
        assert_eq!(Hello::parse(&body).map(|h| h.features), Some(0), "the second hello does not ask");
        let ack = HelloAck {
            max_payload: 1 << 20,
            max_in_flight: 8,
            pid: 1,
            name: "X".into(),
            ..Default::default()
        };
        raw.send(&Header::new(Kind::HelloAck, 0), b"", &ack.to_bytes());
        let (h, _, p) = raw.read().expect("a request");
        raw.send(&Header::new(Kind::Reply, h.id), b"", &p);
    });
    let mut c = dir.client(&name).shared_memory(true).timeout(Duration::from_secs(10)).connect().unwrap();
    assert_eq!(c.transport(), Some("unix"));
    assert_eq!(c.request(b"on the socket").unwrap(), b"on the socket");
    second.join().unwrap();
}

#[cfg(feature = "tokio")]
#[test]
fn streams_run_over_shared_memory_for_every_pair() {
    use crate::stream::{Flavour, collect_over, count, serve_mode};
    let _w = watchdog(Duration::from_secs(120));
    for server in [Flavour::Blocking, Flavour::Tokio] {
        let dir = TempDir::new("shm-stream");
        let name = unique("SHM_STREAM");
        let peer = PeerProcess::serve_mode(dir.path(), serve_mode(server), &name, SHM);
        for client in [Flavour::Blocking, Flavour::Tokio] {
            let ctx = format!("{client:?} client, {server:?} server");
            // Many windows' worth (Credit frames go through ring A, items through ring B).
            let (items, err, transport) = collect_over(client, true, &dir, &name, "count", b"5000");
            assert_eq!(transport, Some("shm"), "{ctx}");
            assert!(err.is_none(), "{ctx}: {err:?}");
            assert_eq!(items, count(5000), "{ctx}");
            let (items, err, _) = collect_over(client, true, &dir, &name, "count", b"3 fail");
            assert_eq!(items, count(3), "{ctx}");
            assert_eq!(err.and_then(|e| e.remote().map(|r| r.code())), Some(422), "{ctx}");
        }
        // Dropping a stream mid-way cancels it over the rings; the connection goes on.
        let mut c = dir.client(&name).shared_memory(true).connect().unwrap();
        let mut s = c.stream("tick", b"").unwrap();
        for i in 0..3 {
            assert_eq!(s.next().unwrap().unwrap(), i.to_string().into_bytes());
        }
        drop(s);
        assert_eq!(c.request(b"after the stream").unwrap(), b"after the stream");
        assert_eq!(c.transport(), Some("shm"));
        assert!(peer.stop().success(), "{server:?}");
    }
}

#[test]
fn info_and_stats_say_which_transport_each_connection_uses() {
    use microcs::micro::META_TRANSPORT;
    let _w = watchdog(Duration::from_secs(30));
    for mode in ["serve", "serve-tokio"] {
        let dir = TempDir::new("shm-visible");
        let name = unique("SHM_VISIBLE");
        let _server = PeerProcess::serve_mode(dir.path(), mode, &name, SHM);
        let mut on_shm = dir.client(&name).shared_memory(true).connect().unwrap();
        let mut on_socket = dir.client(&name).shared_memory(false).connect().unwrap();
        let info = on_shm.info().unwrap();
        assert_eq!(info.metadata.get(META_TRANSPORT).map(String::as_str), Some("shm"), "{info:?}");
        let ping = on_socket.ping().unwrap();
        assert_eq!(ping.metadata.get(META_TRANSPORT).map(String::as_str), Some("unix"), "{ping:?}");
        // Both connections counted, by transport (a connection is counted once its handshake is
        // done, and uncounted when it ends).
        let stats = on_socket.stats().unwrap();
        assert_eq!(stats.connections(), Some((1, 1)), "{:?}", stats.metadata);
        drop(on_shm);
        let after = eventually(Duration::from_secs(5), || {
            let c = on_socket.stats().ok()?.connections()?;
            (c == (1, 0)).then_some(c)
        });
        assert_eq!(after, Some((1, 0)), "{mode}: the closed shm connection is no longer counted");
    }
}

#[cfg(feature = "tokio")]
#[test]
fn a_thousand_requests_in_flight_over_one_shm_connection() {
    let _w = watchdog(Duration::from_secs(120));
    for mode in ["serve", "serve-tokio"] {
        let dir = TempDir::new("shm-flight");
        let name = unique("SHM_FLIGHT");
        let _server = PeerProcess::serve_mode(dir.path(), mode, &name, SHM);
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async {
            let c = microcs::tokio::Client::builder(&name)
                .runtime_dir(dir.path())
                .shared_memory(true)
                .timeout(Duration::from_secs(60))
                .connect()
                .await
                .unwrap();
            assert_eq!(c.transport(), Some("shm"), "{mode}");
            let tasks: Vec<_> = (0..1000u32)
                .map(|i| {
                    let c = c.clone();
                    // Varied sizes, some larger than the ring: frames interleave and wrap.
                    let payload: Vec<u8> =
                        (0..(i as usize * 397) % 300_000).map(|j| (i as usize + j) as u8).collect();
                    tokio::spawn(async move { (c.request(&payload).await, payload) })
                })
                .collect();
            for t in tasks {
                let (reply, payload) = t.await.unwrap();
                assert!(reply.unwrap() == payload, "{mode}: a reply for another request");
            }
            assert_eq!(c.transport(), Some("shm"));
        });
    }
}

/// One soak caller: `n` requests with payloads that name the caller and the request, each
/// retried after a typed loss (the server is killed and restarted meanwhile); returns the
/// retries. Any wrong reply fails the test: nothing may be misrouted.
fn soak_caller(dir: &std::path::Path, name: &str, who: u32, n: u32) -> u32 {
    let mut retries = 0;
    // Connecting may meet the server being killed too: a typed error, tried again.
    let mut c = loop {
        match microcs::Client::builder(name)
            .runtime_dir(dir)
            .shared_memory(true)
            .timeout(Duration::from_secs(10))
            .connect()
        {
            Ok(c) => break c,
            Err(e) => {
                assert!(matches!(e.kind(), ErrorKind::Closed | ErrorKind::NoService), "caller {who}: {e}");
                retries += 1;
                assert!(retries < 500, "caller {who} never connected: {e}");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    };
    for i in 0..n {
        let payload = format!("{who}:{i}:{}", "x".repeat((i % 64) as usize * 50));
        loop {
            match c.request(payload.as_bytes()) {
                Ok(reply) => {
                    assert_eq!(reply, payload.as_bytes(), "caller {who} request {i} got another's reply");
                    break;
                }
                Err(e) => {
                    assert!(
                        matches!(e.kind(), ErrorKind::Closed | ErrorKind::NoService | ErrorKind::TimedOut),
                        "caller {who} request {i}: {e}"
                    );
                    retries += 1;
                    assert!(retries < 500, "caller {who} never got through: {e}");
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
    }
    assert_eq!(c.transport(), Some("shm"), "caller {who} is back on shared memory after the restarts");
    retries
}

#[test]
fn soak_over_shared_memory_with_kills_and_restarts_loses_and_misroutes_nothing() {
    let _w = watchdog(Duration::from_secs(240));
    let dir = TempDir::new("shm-soak");
    let name = unique("SHM_SOAK");
    let mut server = Some(PeerProcess::serve_with(dir.path(), &name, SHM));
    const CALLERS: u32 = 8;
    const EACH: u32 = 3000;
    let done = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let callers: Vec<_> = (0..CALLERS)
        .map(|who| {
            let (dir, name, done) = (dir.path().to_owned(), name.clone(), done.clone());
            std::thread::spawn(move || {
                let r = soak_caller(&dir, &name, who, EACH);
                done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                r
            })
        })
        .collect();
    // Two kill -9 and restarts of the server while the callers run, then a graceful end.
    for round in 0..2 {
        std::thread::sleep(Duration::from_millis(400));
        if done.load(std::sync::atomic::Ordering::SeqCst) == CALLERS {
            break;
        }
        server.take().unwrap().kill9();
        std::thread::sleep(Duration::from_millis(50 * (round + 1)));
        server = Some(PeerProcess::serve_with(dir.path(), &name, SHM));
    }
    let retries: u32 = callers.into_iter().map(|t| t.join().expect("a caller failed")).sum();
    // Every request was answered, by its own reply (checked by each caller); the losses were
    // typed and retried.
    eprintln!("soak over shm: {} requests, {retries} retried after a kill", CALLERS * EACH);
    assert!(server.take().unwrap().stop().success());
}

#[test]
fn a_client_cannot_shrink_or_grow_the_region_it_was_given() {
    let _w = watchdog(Duration::from_secs(30));
    let dir = TempDir::new("shm-seal");
    let name = unique("SHM_SEAL");
    let _server = PeerProcess::serve_with(dir.path(), &name, SHM);
    // A hostile client: asks for shared memory by hand and keeps the descriptors it is sent.
    let s = UnixStream::connect(dir.path().join(format!("{name}.sock"))).unwrap();
    let mut hello = Vec::new();
    let body = Hello { max_payload: 1 << 20, features: FEATURE_SHM }.to_bytes();
    proto::encode(&mut hello, &Header::new(Kind::Hello, 0), b"", &body);
    std::io::Write::write_all(&mut &s, &hello).unwrap();
    let mut buf = [0u8; 256];
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(5))];
    let mut anc = rustix::net::RecvAncillaryBuffer::new(&mut space);
    let got = rustix::net::recvmsg(
        &s,
        &mut [std::io::IoSliceMut::new(&mut buf)],
        &mut anc,
        rustix::net::RecvFlags::CMSG_CLOEXEC,
    )
    .unwrap();
    assert!(got.bytes > 0, "a HelloAck");
    let fds: Vec<std::os::fd::OwnedFd> = anc
        .drain()
        .filter_map(|m| match m {
            rustix::net::RecvAncillaryMessage::ScmRights(f) => Some(f.collect::<Vec<_>>()),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(fds.len(), 5, "the memfd and four eventfds");
    let memfd = &fds[0];
    let len = rustix::fs::fstat(memfd).unwrap().st_size as u64;
    // The seals hold against the peer too: no SIGBUS for the server.
    assert!(rustix::fs::ftruncate(memfd, 4096).is_err(), "shrinking refused");
    assert!(rustix::fs::ftruncate(memfd, len * 2).is_err(), "growing refused");
    assert_eq!(rustix::fs::fstat(memfd).unwrap().st_size as u64, len);
    let seals = rustix::fs::fcntl_get_seals(memfd).unwrap();
    assert!(seals.contains(rustix::fs::SealFlags::SEAL), "and the seals cannot be removed: {seals:?}");
    // The server goes on serving everyone else.
    let mut c = dir.client(&name).shared_memory(true).connect().unwrap();
    assert_eq!(c.request(b"still here").unwrap(), b"still here");
    assert_eq!(c.transport(), Some("shm"));
    drop(s);
}
