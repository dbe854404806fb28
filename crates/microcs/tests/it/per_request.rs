//! The bookkeeping of each request, which the servers and clients keep with as few clock reads
//! and locks as they can (BENCHMARKS.md, e2e notes, change 21), and which must stay exact:
//!
//! - A blocking client's call ends at its timeout even when sending the request took part of it.
//! - A request read behind another gets its deadline (and its `$stats` time) from when it was
//!   taken up, not from a clock read made before a reply was written out.
//! - The tokio server's `max_in_flight` still bounds the handlers running at once when instant
//!   and pending answers mix (streams too), and nothing hangs.
//! - A tokio client reconnects after its server dies, is restarted, or one of its instances dies.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use microcs::proto::{self, Header, Hello, HelloAck, Kind};
use microcs::{ErrorKind, RemoteError, Request};

use crate::common::*;

// ---------------------------------------------------------------------------------------------
// Blocking client: the timeout bounds the whole call, send included.

/// The server is stopped (SIGSTOP) while the client sends a request far larger than the socket
/// (or ring) holds, and continued 700 ms later: the send takes 700 ms of the 1 s timeout. The
/// request then reaches a handler that answers after 5 s: the call must end `TimedOut` at about
/// 1 s, not 1 s after the send ended. Then the same client is answered.
fn a_call_whose_send_waited_still_times_out_at_its_timeout(shm: bool, interrupt: bool) {
    let _w = watchdog(Duration::from_secs(60));
    let dir = TempDir::new("pr-sendwait");
    let name = unique("PR_SENDWAIT");
    let env: &[(&str, &str)] = if shm { &[("PEER_SHM", "1")] } else { &[] };
    let server = PeerProcess::serve_with(dir.path(), &name, env);
    let mut b = dir.client(&name).timeout(Duration::from_millis(1000)).shared_memory(shm);
    if interrupt {
        b = b.interrupt_check(Duration::from_millis(20), || false);
    }
    let mut c = b.connect().unwrap();
    assert_eq!(c.transport(), Some(if shm { "shm" } else { "unix" }));
    assert_eq!(c.request(b"warm").unwrap(), b"warm");
    let mut payload = b"5000:".to_vec();
    payload.resize(4 << 20, b'x');
    let frozen = server.sigstop();
    let thaw = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(700));
        drop(frozen);
    });
    let t0 = Instant::now();
    let e = c.call("echo_after", &payload).unwrap_err();
    let took = t0.elapsed();
    thaw.join().unwrap();
    assert_eq!(e.kind(), ErrorKind::TimedOut, "{e}");
    assert!(took >= Duration::from_millis(900), "ended after {took:?}, before its timeout");
    assert!(took < Duration::from_millis(1350), "a 1 s call ended after {took:?}");
    // The next call on the same client works (a follower thread serves it meanwhile).
    c.set_timeout(Duration::from_secs(10));
    assert_eq!(c.request(b"next").unwrap(), b"next");
    drop(server);
}

#[test]
fn a_blocking_call_whose_send_waited_still_times_out_at_its_timeout() {
    a_call_whose_send_waited_still_times_out_at_its_timeout(false, false);
}

#[test]
fn a_blocking_call_whose_send_waited_still_times_out_at_its_timeout_with_an_interrupt_check() {
    a_call_whose_send_waited_still_times_out_at_its_timeout(false, true);
}

#[test]
fn a_blocking_call_whose_send_waited_still_times_out_at_its_timeout_over_shared_memory() {
    a_call_whose_send_waited_still_times_out_at_its_timeout(true, false);
}

/// A server that never answers: the call ends at its timeout, and the next one works.
#[test]
fn a_blocking_call_to_a_server_that_never_answers_ends_at_its_timeout() {
    let _w = watchdog(Duration::from_secs(60));
    let dir = TempDir::new("pr-never");
    for (shm, interrupt) in [(false, false), (false, true), (true, false), (true, true)] {
        let name = unique("PR_NEVER");
        let env: &[(&str, &str)] = if shm { &[("PEER_SHM", "1")] } else { &[] };
        let _server = PeerProcess::serve_with(dir.path(), &name, env);
        let mut b = dir.client(&name).timeout(Duration::from_millis(400)).shared_memory(shm);
        if interrupt {
            b = b.interrupt_check(Duration::from_millis(25), || false);
        }
        let mut c = b.connect().unwrap();
        for round in 0..3 {
            let t0 = Instant::now();
            let e = c.call("sleep_ms", b"3000").unwrap_err();
            let took = t0.elapsed();
            assert_eq!(e.kind(), ErrorKind::TimedOut, "{e}");
            assert!(
                took >= Duration::from_millis(390) && took < Duration::from_millis(700),
                "shm {shm} interrupt {interrupt} round {round}: a 400 ms call ended after {took:?}"
            );
            assert_eq!(c.request(b"after").unwrap(), b"after");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Servers: a request's arrival.

/// Connects and shakes hands taking replies of up to 16 MiB.
fn raw_hello_big(dir: &TempDir, name: &str) -> Raw {
    let mut r = Raw::connect(dir, name);
    r.send(&Header::new(Kind::Hello, 0), b"", &Hello { max_payload: 16 << 20, features: 0 }.to_bytes());
    let (h, _, body) = r.read().expect("hello ack");
    assert_eq!(h.kind(), Some(Kind::HelloAck));
    assert!(HelloAck::parse(&body).is_some());
    r
}

/// Frames written in one `write`, so that the server reads them together.
fn send_together(r: &mut Raw, frames: &[(Header, &str, &[u8])]) {
    let mut b = Vec::new();
    for (h, m, p) in frames {
        proto::encode(&mut b, h, m.as_bytes(), p);
    }
    r.s.write_all(&b).unwrap();
}

/// Three requests in one write: a 2 MiB reply (more than the socket holds), then two
/// requests with deadlines of 1 s and 5 s. The client reads nothing for 1.5 s, so the first
/// reply's write waits that long. The two requests behind it were taken up after that: they
/// must run with their whole deadline (not one counted from before the write), the first
/// answered (not 408), and their run time in `$stats` must not include the wait.
#[test]
fn a_request_behind_a_large_reply_gets_its_whole_deadline() {
    // Blocking server (in-process), then the tokio server. The reply is built fast (no
    // follower thread starts while its handler runs) and is far more than the kernel's default
    // socket buffers hold.
    const BIG: usize = 2 << 20;
    for tokio in [false, true] {
        let who = if tokio { "tokio" } else { "blocking" };
        let _w = watchdog(Duration::from_secs(60));
        let dir = TempDir::new("pr-behind");
        let name = unique("PR_BEHIND");
        let rt =
            ::tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let left = |r: &Request| r.remaining().map_or(0, |d| d.as_millis()).to_string();
        let stats: Box<dyn Fn() -> microcs::micro::StatsResponse> = if tokio {
            let h = rt.block_on(async {
                microcs::tokio::Server::builder(&name)
                    .runtime_dir(dir.path())
                    .send_buffer(0)
                    .method("big", |_r: Request| async { Ok::<_, RemoteError>(vec![b'x'; BIG]) })
                    .method("left", move |r: Request| async move { Ok::<_, RemoteError>(left(&r)) })
                    .bind()
                    .await
                    .unwrap()
                    .spawn(|r: Request| async move { Ok::<_, RemoteError>(r.into_payload()) })
                    .unwrap()
            });
            Box::new(move || h.stats())
        } else {
            let h = dir
                .server(&name)
                .send_buffer(0)
                .method("big", |_r: Request| Ok::<_, RemoteError>(vec![b'x'; BIG]))
                .method("left", move |r: Request| Ok::<_, RemoteError>(left(&r)))
                .bind()
                .unwrap()
                .spawn(|r: Request| Ok::<_, RemoteError>(r.into_payload()))
                .unwrap();
            Box::new(move || h.stats())
        };
        let mut r = raw_hello_big(&dir, &name);
        send_together(
            &mut r,
            &[
                (Header::request(1, 0), "big", b""),
                (Header::request(2, 1000), "left", b""),
                (Header::request(3, 5000), "left", b""),
            ],
        );
        std::thread::sleep(Duration::from_millis(1500));
        // Answers in any order (the protocol multiplexes).
        let mut got = std::collections::HashMap::new();
        for _ in 0..3 {
            let (h, _, p) = r.read().expect("an answer");
            got.insert(h.id, (h.kind(), h.status, p));
        }
        let (kind, _, p) = &got[&1];
        assert_eq!((*kind, p.len()), (Some(Kind::Reply), BIG), "{who} server");
        let (kind, code, p) = &got[&2];
        let p = String::from_utf8_lossy(p).into_owned();
        assert_eq!(
            (*kind, *code),
            (Some(Kind::Reply), 0),
            "{who} server: a request with a 1 s deadline that ran at once was answered {p:?}"
        );
        let left: u64 = p.parse().unwrap();
        assert!(left >= 500, "{who} server: a 1 s request had {left} ms left as its handler started");
        let (kind, _, p) = &got[&3];
        assert_eq!(*kind, Some(Kind::Reply));
        let left: u64 = String::from_utf8_lossy(p).parse().unwrap();
        assert!(left >= 4500, "{who} server: a 5 s request had {left} ms left as its handler started");
        let s = stats();
        let e = s.endpoints.iter().find(|e| e.name == "left").unwrap();
        assert_eq!(e.num_requests, 2);
        assert!(
            e.processing_time < 300_000_000,
            "{who} server: two instant runs took {} ms in $stats",
            e.processing_time / 1_000_000
        );
        drop(stats);
    }
}

/// Requests read together with slow ones (an async handler that waits; one that works 400 ms
/// on its first poll and answers; one that works 400 ms and then waits) are timed from when
/// they were taken up: `$stats` does not count the slow ones' time in theirs, and their
/// deadlines are whole.
#[test]
fn stats_of_requests_read_with_a_slow_one_count_only_their_own_run() {
    for tokio in [false, true] {
        let who = if tokio { "tokio" } else { "blocking" };
        let _w = watchdog(Duration::from_secs(60));
        let dir = TempDir::new("pr-stats");
        let name = unique("PR_STATS");
        let rt =
            ::tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let left = |r: &Request| r.remaining().map_or(0, |d| d.as_millis()).to_string();
        let stats: Box<dyn Fn() -> microcs::micro::StatsResponse> = if tokio {
            let h = rt.block_on(async {
                microcs::tokio::Server::builder(&name)
                    .runtime_dir(dir.path())
                    .method("slow", |_r: Request| async {
                        ::tokio::time::sleep(Duration::from_millis(400)).await;
                        Ok::<_, RemoteError>("slow")
                    })
                    .method("spin", |_r: Request| async {
                        // Answers on its first poll, after 400 ms of work.
                        std::thread::sleep(Duration::from_millis(400));
                        Ok::<_, RemoteError>("spin")
                    })
                    .method("spin_wait", |_r: Request| async {
                        // 400 ms of work on its first poll, then a wait: goes on in a task.
                        std::thread::sleep(Duration::from_millis(400));
                        ::tokio::task::yield_now().await;
                        Ok::<_, RemoteError>("spin_wait")
                    })
                    .method("left", move |r: Request| async move { Ok::<_, RemoteError>(left(&r)) })
                    .bind()
                    .await
                    .unwrap()
                    .spawn(|r: Request| async move { Ok::<_, RemoteError>(r.into_payload()) })
                    .unwrap()
            });
            Box::new(move || h.stats())
        } else {
            let h = dir
                .server(&name)
                .method("spin_wait", |_r: Request| {
                    std::thread::sleep(Duration::from_millis(400));
                    Ok::<_, RemoteError>("spin_wait")
                })
                .method("slow", |_r: Request| {
                    std::thread::sleep(Duration::from_millis(400));
                    Ok::<_, RemoteError>("slow")
                })
                .method("spin", |_r: Request| {
                    std::thread::sleep(Duration::from_millis(400));
                    Ok::<_, RemoteError>("spin")
                })
                .method("left", move |r: Request| Ok::<_, RemoteError>(left(&r)))
                .bind()
                .unwrap()
                .spawn(|r: Request| Ok::<_, RemoteError>(r.into_payload()))
                .unwrap();
            Box::new(move || h.stats())
        };
        let mut r = Raw::hello(&dir, &name);
        send_together(
            &mut r,
            &[
                (Header::request(1, 0), "slow", b""),
                (Header::request(2, 3000), "left", b""),
                (Header::request(3, 0), "spin", b""),
                (Header::request(4, 3000), "left", b""),
                (Header::request(5, 0), "slow", b""),
                (Header::request(6, 3000), "left", b""),
                (Header::request(7, 0), "spin_wait", b""),
                (Header::request(8, 3000), "left", b""),
            ],
        );
        let mut got = std::collections::HashMap::new();
        for _ in 0..8 {
            let (h, _, p) = r.read().expect("an answer");
            assert_eq!(h.kind(), Some(Kind::Reply), "{}", String::from_utf8_lossy(&p));
            got.insert(h.id, String::from_utf8(p).unwrap());
        }
        for id in [2, 4, 6, 8] {
            let left: u64 = got[&id].parse().unwrap();
            assert!(left >= 2500, "{who} server: request {id} (3 s) started with {left} ms left");
        }
        let s = stats();
        let e = s.endpoints.iter().find(|e| e.name == "left").unwrap();
        assert_eq!(e.num_requests, 4);
        assert!(
            e.processing_time < 150_000_000,
            "{who} server: four instant runs took {} ms in $stats",
            e.processing_time / 1_000_000
        );
        for m in ["slow", "spin", "spin_wait"] {
            let e = s.endpoints.iter().find(|e| e.name == m).unwrap();
            let per = e.average_processing_time / 1_000_000;
            assert!((390..700).contains(&per), "{who} server: {m} averaged {per} ms");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tokio server: the in-flight cap with mixed instant and pending answers.

/// Counts the handlers running at once, and the most seen.
#[derive(Default)]
struct Gauge {
    now: AtomicUsize,
    most: AtomicUsize,
}

impl Gauge {
    fn enter(self: &Arc<Self>) -> GaugeGuard {
        let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.most.fetch_max(n, Ordering::SeqCst);
        GaugeGuard(self.clone())
    }
}

struct GaugeGuard(Arc<Gauge>);

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.now.fetch_sub(1, Ordering::SeqCst);
    }
}

/// max_in_flight(2): slow handlers, handlers that wait once and answer soon, instant ones and
/// streams (some ending on their first poll, some waiting between items), all pipelined in one
/// write on one connection, several times over. Never more than 2 run at once (an instant one
/// counts while it runs), every request is answered, and the connection ends cleanly.
#[test]
fn the_tokio_in_flight_cap_holds_when_instant_and_pending_answers_mix() {
    let _w = watchdog(Duration::from_secs(90));
    let dir = TempDir::new("pr-cap");
    let name = unique("PR_CAP");
    let rt = ::tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let gauge = Arc::new(Gauge::default());
    let g = |g: &Arc<Gauge>| g.clone();
    let (g1, g2, g3, g4, g5) = (g(&gauge), g(&gauge), g(&gauge), g(&gauge), g(&gauge));
    let h = rt.block_on(async {
        microcs::tokio::Server::builder(&name)
            .runtime_dir(dir.path())
            .max_in_flight(2)
            .method("slow", move |r: Request| {
                let g = g1.clone();
                async move {
                    let _in = g.enter();
                    ::tokio::time::sleep(Duration::from_millis(60)).await;
                    Ok::<_, RemoteError>(r.into_payload())
                }
            })
            .method("once", move |r: Request| {
                let g = g2.clone();
                async move {
                    let _in = g.enter();
                    ::tokio::task::yield_now().await;
                    Ok::<_, RemoteError>(r.into_payload())
                }
            })
            .method("now", move |r: Request| {
                let _in = g3.enter();
                std::future::ready(Ok::<_, RemoteError>(r.into_payload()))
            })
            .stream_method("count_now", move |r: Request, items: microcs::tokio::Items| {
                let g = g4.clone();
                async move {
                    let _in = g.enter();
                    let n: u32 = r.text()?.parse().map_err(|_| RemoteError::new(400, "n"))?;
                    for i in 0..n {
                        items.send(i.to_string()).await?;
                    }
                    Ok::<_, RemoteError>(())
                }
            })
            .stream_method("count_slow", move |r: Request, items: microcs::tokio::Items| {
                let g = g5.clone();
                async move {
                    let _in = g.enter();
                    let n: u32 = r.text()?.parse().map_err(|_| RemoteError::new(400, "n"))?;
                    for i in 0..n {
                        ::tokio::time::sleep(Duration::from_millis(20)).await;
                        items.send(i.to_string()).await?;
                    }
                    Ok::<_, RemoteError>(())
                }
            })
            .bind()
            .await
            .unwrap()
            .spawn(|r: Request| async move { Ok::<_, RemoteError>(r.into_payload()) })
            .unwrap()
    });
    let mut r = Raw::hello(&dir, &name);
    let mut id = 0u64;
    let mut want_replies = std::collections::HashMap::new();
    let mut streams = std::collections::HashMap::new();
    for _round in 0..5 {
        let mut frames: Vec<(Header, &str, Vec<u8>)> = Vec::new();
        for k in 0..30 {
            id += 1;
            let (method, stream) = match k % 10 {
                0..=2 => ("slow", false),
                3 => ("once", false),
                4..=6 => ("now", false),
                7 => ("count_now", true),
                8 => ("count_slow", true),
                _ => ("", false),
            };
            let payload = if stream { b"3".to_vec() } else { id.to_string().into_bytes() };
            let header = if stream {
                Header { flags: proto::FLAG_STREAM, ..Header::request(id, 0) }
            } else {
                Header::request(id, 0)
            };
            if stream {
                streams.insert(id, Vec::<String>::new());
            } else {
                want_replies.insert(id, payload.clone());
            }
            frames.push((header, method, payload));
            if stream {
                // A stream starts with no credit: 64 items, 1 MiB.
                let mut credit = 64u32.to_be_bytes().to_vec();
                credit.extend_from_slice(&(1u32 << 20).to_be_bytes());
                frames.push((Header::new(Kind::Credit, id), "", credit));
            }
        }
        let refs: Vec<(Header, &str, &[u8])> = frames.iter().map(|(h, m, p)| (*h, *m, &p[..])).collect();
        send_together(&mut r, &refs);
    }
    // Every unary request answered with its payload; every stream sends 0, 1, 2 then ends.
    let t0 = Instant::now();
    while !want_replies.is_empty() || !streams.is_empty() {
        let (h, _, p) = r.read().expect("an answer");
        match h.kind() {
            Some(Kind::Item) => {
                streams.get_mut(&h.id).expect("an open stream").push(String::from_utf8(p).unwrap())
            }
            Some(Kind::Reply) if streams.contains_key(&h.id) => {
                assert_eq!(streams.remove(&h.id).unwrap(), ["0", "1", "2"], "stream {}", h.id);
            }
            Some(Kind::Reply) => assert_eq!(want_replies.remove(&h.id), Some(p), "reply {}", h.id),
            // Credit requests or the like are not expected; errors are failures.
            k => panic!("{k:?} for {}: {}", h.id, String::from_utf8_lossy(&p)),
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "answers stopped coming");
    }
    let most = gauge.most.load(Ordering::SeqCst);
    assert!(most <= 2, "{most} handlers ran at once with max_in_flight(2)");
    assert!(most == 2, "the cap was never reached ({most}): the test tests nothing");
    drop(r);
    rt.block_on(async { h.shutdown().await });
}

/// max_in_flight(1): a slow request holds the one permit; instant ones behind it wait, then all
/// are answered; then instant ones alone go through without a permit to wait for; then a slow
/// one again holds the cap (an instant request did not keep a permit).
#[test]
fn with_max_in_flight_one_instant_answers_neither_hang_nor_keep_the_permit() {
    let _w = watchdog(Duration::from_secs(60));
    let dir = TempDir::new("pr-cap1");
    let name = unique("PR_CAP1");
    let rt = ::tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let gauge = Arc::new(Gauge::default());
    let g1 = gauge.clone();
    let h = rt.block_on(async {
        microcs::tokio::Server::builder(&name)
            .runtime_dir(dir.path())
            .max_in_flight(1)
            .method("slow", move |r: Request| {
                let g = g1.clone();
                async move {
                    let _in = g.enter();
                    ::tokio::time::sleep(Duration::from_millis(200)).await;
                    Ok::<_, RemoteError>(r.into_payload())
                }
            })
            .bind()
            .await
            .unwrap()
            .spawn(|r: Request| async move { Ok::<_, RemoteError>(r.into_payload()) })
            .unwrap()
    });
    let mut r = Raw::hello(&dir, &name);
    for round in 0..3 {
        let base = round * 100;
        let t0 = Instant::now();
        send_together(
            &mut r,
            &[
                (Header::request(base + 1, 0), "slow", b"a"),
                (Header::request(base + 2, 0), "", b"b"),
                (Header::request(base + 3, 0), "slow", b"c"),
                (Header::request(base + 4, 0), "", b"d"),
            ],
        );
        let mut order = Vec::new();
        for _ in 0..4 {
            let (h, _, _) = r.read().expect("an answer");
            assert_eq!(h.kind(), Some(Kind::Reply));
            order.push(h.id - base);
        }
        // One at a time: each instant request waits for the slow one before it.
        assert_eq!(order, [1, 2, 3, 4], "round {round}");
        let took = t0.elapsed();
        assert!(took >= Duration::from_millis(390), "two 200 ms requests one at a time took {took:?}");
        for i in 0..50 {
            r.request(base + 10 + i, "", b"x");
            r.expect_reply(base + 10 + i);
        }
    }
    assert_eq!(gauge.most.load(Ordering::SeqCst), 1);
    drop(r);
    rt.block_on(async { h.shutdown().await });
}

// ---------------------------------------------------------------------------------------------
// Tokio client: reconnecting.

fn tokio_rt() -> ::tokio::runtime::Runtime {
    ::tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// A server killed, then one restarted: the next call reconnects (after a failed one when the
/// server is gone, at once when another serves), again and again; over shared memory too.
#[test]
fn a_tokio_client_reconnects_after_its_server_dies_or_restarts() {
    let _w = watchdog(Duration::from_secs(90));
    for (mode, shm) in [("serve", false), ("serve-tokio", false), ("serve-tokio", true)] {
        let dir = TempDir::new("pr-tre");
        let name = unique("PR_TRE");
        let env: &[(&str, &str)] = if shm { &[("PEER_SHM", "1")] } else { &[] };
        tokio_rt().block_on(async {
            let mut server = PeerProcess::serve_mode(dir.path(), mode, &name, env);
            let c = microcs::tokio::Client::builder(&name)
                .runtime_dir(dir.path())
                .shared_memory(shm)
                .timeout(Duration::from_secs(5))
                .connect()
                .await
                .unwrap();
            for round in 0..4 {
                let pid = String::from_utf8(c.call("pid", b"").await.unwrap()).unwrap();
                assert_eq!(pid, server.pid.to_string(), "{mode} shm {shm} round {round}");
                assert_eq!(c.server_pid(), Some(server.pid));
                if round % 2 == 0 {
                    // Killed while idle: the client sees its connection end (no usable
                    // connection left); a new server starts before the next call.
                    server.child.kill().unwrap();
                    server.child.wait().unwrap();
                    let t0 = Instant::now();
                    while c.server_pid().is_some() && t0.elapsed() < Duration::from_secs(10) {
                        ::tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    assert_eq!(c.server_pid(), None, "{mode} shm {shm}: a dead connection still in use");
                    server = PeerProcess::serve_mode(dir.path(), mode, &name, env);
                } else {
                    // Killed; the call in the gap fails (nobody serves), the one after it works.
                    server.child.kill().unwrap();
                    server.child.wait().unwrap();
                    let gone = eventually(Duration::from_secs(10), || {
                        (!dir.path().join(format!("{name}.sock")).exists()
                            || std::os::unix::net::UnixStream::connect(
                                dir.path().join(format!("{name}.sock")),
                            )
                            .is_err())
                        .then_some(())
                    });
                    assert!(gone.is_some());
                    let e = c.call("pid", b"").await.unwrap_err();
                    assert!(
                        matches!(e.kind(), ErrorKind::NoService | ErrorKind::Closed | ErrorKind::Io),
                        "{e}"
                    );
                    server = PeerProcess::serve_mode(dir.path(), mode, &name, env);
                }
                assert_eq!(
                    String::from_utf8(c.call("pid", b"").await.unwrap()).unwrap(),
                    server.pid.to_string()
                );
                assert_eq!(c.server_pid(), Some(server.pid));
                // Calls at once on the new server.
                let calls = (0..20).map(|i| {
                    let c = c.clone();
                    async move { c.request(format!("{i}").as_bytes()).await.unwrap() }
                });
                let mut tasks = Vec::new();
                for f in calls {
                    tasks.push(::tokio::spawn(f));
                }
                for (i, t) in tasks.into_iter().enumerate() {
                    assert_eq!(t.await.unwrap(), format!("{i}").into_bytes());
                }
            }
        });
    }
}

/// Three instances; the client is spread over them; instances killed one by one while calls go
/// on (no error but for calls in flight on a killed one), then all gone and new ones started:
/// the client goes on with the new ones.
#[test]
fn a_tokio_client_of_instances_goes_on_as_they_die_and_are_replaced() {
    let _w = watchdog(Duration::from_secs(120));
    let dir = TempDir::new("pr-tinst");
    let name = unique("PR_TINST");
    let start = || PeerProcess::serve_mode(dir.path(), "serve-tokio", &name, &[("PEER_SHARED", "1")]);
    tokio_rt().block_on(async {
        let mut servers: Vec<PeerProcess> = (0..3).map(|_| start()).collect();
        let c = microcs::tokio::Client::builder(&name)
            .runtime_dir(dir.path())
            .timeout(Duration::from_secs(5))
            .connect()
            .await
            .unwrap();
        // Let the refresh connect to every instance.
        let pids: Vec<String> = servers.iter().map(|s| s.pid.to_string()).collect();
        let mut seen = std::collections::HashSet::new();
        let t0 = Instant::now();
        while seen.len() < 3 && t0.elapsed() < Duration::from_secs(20) {
            let calls: Vec<_> = (0..8)
                .map(|_| {
                    let c = c.clone();
                    ::tokio::spawn(async move { c.call("sleep_ms", b"20").await.map(|_| ()) })
                })
                .collect();
            for t in calls {
                t.await.unwrap().unwrap();
            }
            seen.insert(String::from_utf8(c.call("pid", b"").await.unwrap()).unwrap());
            ::tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(seen.iter().all(|p| pids.contains(p)), "{seen:?} {pids:?}");
        for k in 0..3 {
            let victim = servers.remove(0);
            victim.kill9();
            // Idle calls after a kill: answered (a resend on the dead connection is not run).
            for i in 0..20 {
                match c.call("pid", b"").await {
                    Ok(pid) => {
                        let pid = String::from_utf8(pid).unwrap();
                        assert!(servers.iter().any(|s| s.pid.to_string() == pid), "kill {k}: {pid}");
                    }
                    Err(e) if servers.is_empty() => {
                        assert!(
                            matches!(e.kind(), ErrorKind::NoService | ErrorKind::Closed | ErrorKind::Io),
                            "{e}"
                        );
                        break;
                    }
                    Err(e) => panic!("kill {k} call {i}: {e}"),
                }
            }
        }
        // All gone: new instances; the client finds them.
        let fresh: Vec<PeerProcess> = (0..2).map(|_| start()).collect();
        for i in 0..40 {
            let pid = String::from_utf8(c.call("pid", b"").await.unwrap_or_else(|e| panic!("call {i}: {e}")))
                .unwrap();
            assert!(fresh.iter().any(|s| s.pid.to_string() == pid), "{pid}");
        }
        drop(fresh);
    });
}
