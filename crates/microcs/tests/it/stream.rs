//! Streams (docs/PROTOCOL.md § 17): every client × server pair across real processes, flow
//! control, cancellation by drop, a server killed mid-stream, per-item timeouts, old servers.

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_core::Stream;
use microcs::{Error, ErrorKind, RemoteError, Request};

use crate::common::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Flavour {
    Blocking,
    Tokio,
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// What a whole stream gave: its items as text, and the error that ended it, if any.
pub(crate) type Got = (Vec<String>, Option<Error>);

pub(crate) fn text(b: Vec<u8>) -> String {
    String::from_utf8(b).unwrap()
}

/// Reads a whole stream of `method` with the given client flavour.
fn collect(client: Flavour, dir: &TempDir, name: &str, method: &str, payload: &[u8]) -> Got {
    let (items, err, _) = collect_over(client, false, dir, name, method, payload);
    (items, err)
}

/// [`collect`], asking for shared memory when `shm`; also says which transport carried it.
pub(crate) fn collect_over(
    client: Flavour,
    shm: bool,
    dir: &TempDir,
    name: &str,
    method: &str,
    payload: &[u8],
) -> (Vec<String>, Option<Error>, Option<&'static str>) {
    match client {
        Flavour::Blocking => {
            let mut c =
                dir.client(name).shared_memory(shm).timeout(Duration::from_secs(10)).connect().unwrap();
            let mut items = Vec::new();
            let mut err = None;
            match c.stream(method, payload) {
                Ok(stream) => {
                    for item in stream {
                        match item {
                            Ok(b) => items.push(text(b)),
                            Err(e) => {
                                err = Some(e);
                                break;
                            }
                        }
                    }
                }
                Err(e) => err = Some(e),
            }
            (items, err, c.transport())
        }
        Flavour::Tokio => runtime().block_on(async {
            let c = microcs::tokio::Client::builder(name)
                .runtime_dir(dir.path())
                .shared_memory(shm)
                .timeout(Duration::from_secs(10))
                .connect()
                .await
                .unwrap();
            let mut items = Vec::new();
            let mut s = match c.stream(method, payload).await {
                Ok(s) => s,
                Err(e) => return (items, Some(e), c.transport()),
            };
            let mut err = None;
            while let Some(item) = poll_fn(|cx| Pin::new(&mut s).poll_next(cx)).await {
                match item {
                    Ok(b) => items.push(text(b)),
                    Err(e) => err = Some(e),
                }
            }
            (items, err, c.transport())
        }),
    }
}

pub(crate) fn count(n: u64) -> Vec<String> {
    (0..n).map(|i| i.to_string()).collect()
}

pub(crate) fn serve_mode(server: Flavour) -> &'static str {
    match server {
        Flavour::Blocking => "serve",
        Flavour::Tokio => "serve-tokio",
    }
}

#[test]
fn every_client_and_server_pair_streams_items_in_order_then_ends() {
    let _w = watchdog(Duration::from_secs(120));
    for server in [Flavour::Blocking, Flavour::Tokio] {
        let dir = TempDir::new("stream");
        let name = unique("STREAM");
        let peer = PeerProcess::serve_mode(dir.path(), serve_mode(server), &name, &[]);
        for client in [Flavour::Blocking, Flavour::Tokio] {
            let ctx = format!("{client:?} client, {server:?} server");
            // More items than one window (64): the client must grant room as it reads.
            let (items, err) = collect(client, &dir, &name, "count", b"1000");
            assert!(err.is_none(), "{ctx}: {err:?}");
            assert_eq!(items, count(1000), "{ctx}");
            // An empty stream, and one that ends with the handler's error after its items.
            let (items, err) = collect(client, &dir, &name, "count", b"0");
            assert!(items.is_empty() && err.is_none(), "{ctx}: {items:?} {err:?}");
            let (items, err) = collect(client, &dir, &name, "count", b"3 fail");
            assert_eq!(items, count(3), "{ctx}");
            let err = err.expect("the stream's error");
            assert_eq!(err.kind(), ErrorKind::Remote, "{ctx}: {err}");
            assert_eq!(err.remote().unwrap().code(), 422, "{ctx}: {err}");
            // A unary method (the default echo) streams as one item; a built-in as its JSON.
            assert_eq!(collect(client, &dir, &name, "", b"hi").0, ["hi"], "{ctx}");
            let (ping, err) = collect(client, &dir, &name, "$ping", b"");
            assert!(
                err.is_none() && ping.len() == 1 && ping[0].contains("\"name\""),
                "{ctx}: {ping:?} {err:?}"
            );
            // A bad argument fails before any item.
            let (items, err) = collect(client, &dir, &name, "count", b"many");
            assert!(items.is_empty() && err.unwrap().remote().unwrap().code() == 400, "{ctx}");
        }
        // A streaming method called as a plain request is refused, without running.
        let mut c = dir.client(&name).connect().unwrap();
        let e = c.call("count", b"3").unwrap_err();
        assert_eq!(e.remote().map(|r| r.code()), Some(400), "{e}");
        assert!(e.to_string().contains("call it with stream()") && !e.may_have_run(), "{e}");
        peer.stop();
    }
}

#[test]
fn a_hundred_thousand_small_items_in_one_stream() {
    let _w = watchdog(Duration::from_secs(120));
    for server in [Flavour::Blocking, Flavour::Tokio] {
        let dir = TempDir::new("stream100k");
        let name = unique("S100K");
        let peer = PeerProcess::serve_mode(dir.path(), serve_mode(server), &name, &[]);
        for client in [Flavour::Blocking, Flavour::Tokio] {
            let (items, err) = collect(client, &dir, &name, "count", b"100000");
            assert!(err.is_none(), "{client:?}/{server:?}: {err:?}");
            assert_eq!(items.len(), 100_000);
            assert!(items.iter().enumerate().all(|(i, s)| *s == i.to_string()), "in order");
        }
        peer.stop();
    }
}

/// Counts the items a server made and sees its iterator dropped.
struct Produced {
    made: Arc<AtomicUsize>,
    dropped: Arc<AtomicUsize>,
}

impl Iterator for Produced {
    type Item = Result<Vec<u8>, RemoteError>;
    fn next(&mut self) -> Option<Self::Item> {
        let i = self.made.fetch_add(1, Ordering::SeqCst);
        Some(Ok(vec![b'x'; 100 + i % 7]))
    }
}

impl Drop for Produced {
    fn drop(&mut self) {
        self.dropped.store(1, Ordering::SeqCst);
    }
}

#[test]
fn a_consumer_that_stops_reading_holds_the_server_to_one_window_and_dropping_cancels() {
    let _w = watchdog(Duration::from_secs(60));
    let dir = TempDir::new("window");
    let name = unique("WINDOW");
    let (made, dropped) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (m, d) = (made.clone(), dropped.clone());
    let h = dir
        .server(&name)
        .stream_method("endless", move |_req: Request| {
            Ok::<_, RemoteError>(Produced { made: m.clone(), dropped: d.clone() })
        })
        .bind()
        .unwrap()
        .spawn(|r: Request| Ok::<_, RemoteError>(r.into_payload()))
        .unwrap();
    let mut c = dir.client(&name).stream_window(16, 1 << 20).connect().unwrap();
    let mut s = c.stream("endless", b"").unwrap();
    for _ in 0..5 {
        assert!(s.next().unwrap().unwrap().len() >= 100);
    }
    // The application stops reading: the server may run ahead by the window (16 items, the
    // first 5 taken and, once half of it is, granted back), never more.
    std::thread::sleep(Duration::from_millis(300));
    let ahead = made.load(Ordering::SeqCst);
    assert!((16..=5 + 16 + 2).contains(&ahead), "{ahead} items made for 5 read");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(made.load(Ordering::SeqCst), ahead, "the server waits for room");
    // Dropping the stream cancels it on the server: its iterator is dropped within moments.
    drop(s);
    eventually(Duration::from_secs(5), || (dropped.load(Ordering::SeqCst) == 1).then_some(()))
        .expect("the server dropped the stream's iterator");
    // The connection goes on serving.
    assert_eq!(c.request(b"after").unwrap(), b"after");
    h.shutdown();
}

#[test]
fn a_tokio_server_stream_waits_for_room_and_stops_when_the_stream_is_dropped() {
    let _w = watchdog(Duration::from_secs(60));
    let dir = TempDir::new("twindow");
    let name = unique("TWINDOW");
    let made = Arc::new(AtomicUsize::new(0));
    let stopped = Arc::new(AtomicUsize::new(0));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let (m, st) = (made.clone(), stopped.clone());
    let h = rt.block_on(async {
        microcs::tokio::Server::builder(&name)
            .runtime_dir(dir.path())
            .bind()
            .await
            .unwrap()
            .stream_method("endless", move |_req: Request, items: microcs::tokio::Items| {
                let (m, st) = (m.clone(), st.clone());
                async move {
                    loop {
                        m.fetch_add(1, Ordering::SeqCst);
                        if let Err(e) = items.send(vec![b'y'; 64]).await {
                            st.store(1, Ordering::SeqCst);
                            return Err(e);
                        }
                    }
                }
            })
            .spawn(|r: Request| async move { Ok::<_, RemoteError>(r.into_payload()) })
            .unwrap()
    });
    let mut c = dir.client(&name).stream_window(8, 1 << 20).connect().unwrap();
    let mut s = c.stream("endless", b"").unwrap();
    for _ in 0..3 {
        s.next().unwrap().unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    let ahead = made.load(Ordering::SeqCst);
    assert!((8..=3 + 8 + 2).contains(&ahead), "{ahead} items made for 3 read");
    drop(s);
    eventually(Duration::from_secs(5), || (stopped.load(Ordering::SeqCst) == 1).then_some(()))
        .expect("the handler's send failed once the stream was dropped");
    assert_eq!(c.request(b"after").unwrap(), b"after");
    rt.block_on(h.shutdown());
}

#[test]
fn a_server_killed_mid_stream_ends_the_stream_with_a_typed_error() {
    let _w = watchdog(Duration::from_secs(60));
    for server in [Flavour::Blocking, Flavour::Tokio] {
        let dir = TempDir::new("killstream");
        let name = unique("KILLS");
        let peer = PeerProcess::serve_mode(dir.path(), serve_mode(server), &name, &[]);
        let mut c = dir.client(&name).timeout(Duration::from_secs(20)).connect().unwrap();
        let mut s = c.stream("tick", b"").unwrap();
        for i in 0..3 {
            assert_eq!(text(s.next().unwrap().unwrap()), i.to_string());
        }
        let t0 = Instant::now();
        peer.kill9();
        // Items already on their way may still come; then the loss, typed, long before the
        // 20 s timeout.
        let e = loop {
            match s.next() {
                Some(Ok(_)) => continue,
                Some(Err(e)) => break e,
                None => panic!("{server:?}: the stream ended without an error"),
            }
        };
        assert_eq!(e.kind(), ErrorKind::Closed, "{server:?}: {e}");
        assert!(e.may_have_run(), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(5));
        assert!(s.next().is_none(), "nothing after the error");
    }
}

#[test]
fn each_wait_for_an_item_is_bounded_by_the_timeout_and_a_whole_stream_by_its_limit() {
    let _w = watchdog(Duration::from_secs(60));
    let dir = TempDir::new("stall");
    let name = unique("STALL");
    let h = dir
        .server(&name)
        .stream_method("stall", |_req: Request| {
            let items = (0..2).map(|i| {
                if i == 1 {
                    std::thread::sleep(Duration::from_secs(2));
                }
                Ok::<_, RemoteError>(format!("item {i}"))
            });
            Ok::<_, RemoteError>(items)
        })
        .stream_method("slow", |_req: Request| {
            Ok::<_, RemoteError>((0..).map(|i| {
                std::thread::sleep(Duration::from_millis(50));
                Ok::<_, RemoteError>(format!("{i}"))
            }))
        })
        .bind()
        .unwrap()
        .spawn(|r: Request| Ok::<_, RemoteError>(r.into_payload()))
        .unwrap();
    let mut c = dir.client(&name).timeout(Duration::from_millis(300)).connect().unwrap();
    let mut s = c.stream("stall", b"").unwrap();
    assert_eq!(text(s.next().unwrap().unwrap()), "item 0");
    let e = s.next().unwrap().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::TimedOut, "{e}");
    assert!(e.to_string().contains("no item of the stream within"), "{e}");
    drop(s);
    // A live stream is never cut by the per-item timeout (items every 50 ms, for 1 s)…
    let mut s = c.stream("slow", b"").unwrap();
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(1) {
        s.next().unwrap().unwrap();
    }
    drop(s);
    // …but a whole-stream limit ends it on the server: `TimedOut` (408) after about that long.
    let mut s = c.stream_until("slow", b"", Duration::from_millis(400)).unwrap();
    let t0 = Instant::now();
    let e = loop {
        match s.next() {
            Some(Ok(_)) => continue,
            Some(Err(e)) => break e,
            None => panic!("ended without the deadline's error"),
        }
    };
    assert_eq!(e.remote().map(|r| r.code()), Some(408), "{e}");
    assert!(t0.elapsed() >= Duration::from_millis(350), "{:?}", t0.elapsed());
    h.shutdown();
}

#[test]
fn a_server_that_does_not_announce_streams_is_refused_before_anything_is_sent() {
    let _w = watchdog(Duration::from_secs(30));
    let dir = TempDir::new("oldsrv");
    let name = unique("OLDSRV");
    let server = deaf_server(&dir, &name); // answers the handshake with features 0, then reads nothing
    let mut c = dir.client(&name).connect().unwrap();
    let e = c.stream("count", b"3").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Protocol, "{e}");
    assert!(e.to_string().contains("does not support streams"), "{e}");
    let theirs = server.join().unwrap();
    assert_eq!(unread_bytes(&theirs), 0, "nothing was sent");
}

#[test]
fn a_stream_that_owns_its_client_gives_it_back() {
    let _w = watchdog(Duration::from_secs(60));
    let dir = TempDir::new("ownedstream");
    let name = unique("OWNED");
    let peer = PeerProcess::serve_mode(dir.path(), "serve", &name, &[]);
    let c = dir.client(&name).timeout(Duration::from_secs(10)).connect().unwrap();
    // A stream that takes the client along, read part-way, then ended: the client comes back,
    // on the same connection, and the server was told to stop (the next request is answered).
    let mut s = c.into_stream("count", b"1000000", None).map_err(|(e, _)| e).unwrap();
    let first: Vec<String> = s.by_ref().take(3).map(|i| text(i.unwrap())).collect();
    assert_eq!(first, count(3));
    let mut c = s.into_client().expect("an owned stream gives its client back");
    assert_eq!(c.request(b"after").unwrap(), b"after");
    let pid = c.server_pid();
    // A whole stream read to its end, then the client back.
    let mut s = c.into_stream("count", b"5", None).map_err(|(e, _)| e).unwrap();
    assert_eq!(s.by_ref().map(|i| text(i.unwrap())).collect::<Vec<_>>(), count(5));
    let c = s.into_client().unwrap();
    assert_eq!(c.server_pid(), pid, "the same connection");
    // A stream the server refuses ends with its error as the first item; the client comes back.
    let mut s = c.into_stream("no-such-method", b"", None).map_err(|(e, _)| e).unwrap();
    let e = s.next().unwrap().unwrap_err();
    assert_eq!(e.remote().map(|r| r.code()), Some(404), "{e}");
    assert!(s.next().is_none(), "the stream ended with its error");
    let mut c = s.into_client().unwrap();
    assert_eq!(c.request(b"still").unwrap(), b"still");
    // A borrowed stream has no client to give back.
    assert!(c.stream("count", b"2").unwrap().into_client().is_none());
    assert_eq!(c.request(b"again").unwrap(), b"again");
    // A stream that cannot be opened (nobody serves the name any more) returns the client with
    // the error.
    peer.stop();
    let (e, c) = match c.into_stream("count", b"3", None) {
        Err(failed) => failed,
        Ok(_) => panic!("a stream opened on a stopped server"),
    };
    assert!(matches!(e.kind(), ErrorKind::NoService | ErrorKind::Closed), "{e}");
    assert_eq!(c.server_pid(), None, "{e}");
}
