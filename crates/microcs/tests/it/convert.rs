//! A name claimed by the blocking server and served by the async one
//! (`tokio::Server::from_blocking`), and blocking handlers on the async server
//! (`tokio::blocking`, `tokio::blocking_stream`): what the Python binding's servers with
//! `async def` handlers are built on.

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_core::Stream;
use microcs::{ErrorKind, RemoteError, Request};

use crate::common::*;

async fn collect(s: &mut microcs::tokio::ItemStream) -> (Vec<String>, Option<microcs::Error>) {
    let (mut items, mut err) = (Vec::new(), None);
    while let Some(item) = poll_fn(|cx| Pin::new(&mut *s).poll_next(cx)).await {
        match item {
            Ok(b) => items.push(String::from_utf8(b).unwrap()),
            Err(e) => err = Some(e),
        }
    }
    (items, err)
}

/// Counts handlers running at once, and the most seen.
#[derive(Default)]
struct Gauge {
    now: AtomicUsize,
    most: AtomicUsize,
}

impl Gauge {
    fn enter(&self) {
        let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.most.fetch_max(n, Ordering::SeqCst);
    }
    fn leave(&self) {
        self.now.fetch_sub(1, Ordering::SeqCst);
    }
}

#[test]
fn a_name_claimed_by_the_blocking_server_is_served_by_the_async_one() {
    let _w = watchdog(Duration::from_secs(120));
    let dir = TempDir::new("convert");
    let name = unique("CONVERT");
    // Claimed synchronously, with blocking methods already added.
    let claimed = dir
        .server(&name)
        .method("upper", |req: Request| Ok::<_, RemoteError>(req.text()?.to_uppercase()))
        .stream_method("count", |req: Request| {
            let n: u32 = req.text()?.parse().map_err(|_| RemoteError::new(400, "want a number"))?;
            Ok::<_, RemoteError>((0..n).map(|i| Ok::<_, RemoteError>(i.to_string())))
        })
        .method("boom", |_req: Request| -> Result<Vec<u8>, RemoteError> { panic!("boom in a pool thread") })
        .bind()
        .unwrap();
    let taken = dir.server(&name).bind().unwrap_err();
    assert_eq!(taken.kind(), ErrorKind::NameTaken, "{taken}");

    let gauge = Arc::new(Gauge::default());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let g = gauge.clone();
    let handle = rt.block_on(async {
        microcs::tokio::Server::from_blocking(claimed)
            .unwrap()
            .max_in_flight(400)
            .method("nap", move |req: Request| {
                let g = g.clone();
                async move {
                    g.enter();
                    let ms: u64 = req.text()?.parse().unwrap_or(10);
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    g.leave();
                    Ok::<_, RemoteError>("slept")
                }
            })
            .method(
                "doze",
                microcs::tokio::blocking(|req: Request| {
                    let ms: u64 = req.text()?.parse().unwrap_or(10);
                    std::thread::sleep(Duration::from_millis(ms));
                    Ok::<_, RemoteError>("dozed")
                }),
            )
            .stream_method(
                "lines",
                microcs::tokio::blocking_stream(|req: Request| {
                    let text = req.text()?.to_owned();
                    let lines: Vec<String> = text.lines().map(str::to_owned).collect();
                    Ok::<_, RemoteError>(lines.into_iter().map(Ok::<_, RemoteError>))
                }),
            )
            .spawn_stream(|req: Request, items: microcs::tokio::Items| async move {
                for w in req.text()?.split_whitespace() {
                    items.send(w.to_owned()).await?;
                }
                Ok::<_, RemoteError>(())
            })
            .unwrap()
    });
    // The server runs on a current-thread runtime driven by this thread; the callers use
    // their own runtime on another thread.
    let d = dir.path().to_owned();
    let n = name.clone();
    let callers = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        rt.block_on(async move {
            let c = microcs::tokio::Client::builder(&n)
                .runtime_dir(&d)
                .timeout(Duration::from_secs(30))
                .connect()
                .await
                .unwrap();
            // The blocking server's methods, converted: unary, stream, and a panic (500).
            assert_eq!(c.call("upper", b"hi").await.unwrap(), b"HI");
            let (items, err) = collect(&mut c.stream("count", b"100").await.unwrap()).await;
            assert!(err.is_none(), "{err:?}");
            assert_eq!(items, (0..100).map(|i| i.to_string()).collect::<Vec<_>>());
            let e = c.call("boom", b"").await.unwrap_err();
            assert_eq!(e.remote().map(|r| r.code()), Some(500), "{e}");
            assert!(e.to_string().contains("boom in a pool thread"), "{e}");
            // The default handler streams (spawn_stream); a blocking_stream method.
            let (items, err) = collect(&mut c.stream("", b"a b c").await.unwrap()).await;
            assert_eq!((items, err.is_none()), (vec!["a".into(), "b".into(), "c".into()], true));
            let (items, _) = collect(&mut c.stream("lines", b"x\ny").await.unwrap()).await;
            assert_eq!(items, ["x", "y"]);
            // A blocking handler does not hold up the runtime: a quick call made while it sleeps
            // (on the blocking pool) is answered first.
            let slow = {
                let c = c.clone();
                tokio::spawn(async move { c.call("doze", b"700").await })
            };
            tokio::time::sleep(Duration::from_millis(100)).await;
            let quick = Instant::now();
            assert_eq!(c.call("nap", b"1").await.unwrap(), b"slept");
            assert!(!slow.is_finished(), "the quick call waited for the blocking one");
            assert!(quick.elapsed() < Duration::from_millis(600), "{:?}", quick.elapsed());
            assert_eq!(slow.await.unwrap().unwrap(), b"dozed");
            // 300 naps of 300 ms on one connection: the raised limit (400, not the default
            // 128) lets them all run at once.
            let started = Instant::now();
            let naps: Vec<_> = (0..300)
                .map(|_| {
                    let c = c.clone();
                    tokio::spawn(async move { c.call("nap", b"300").await })
                })
                .collect();
            for nap in naps {
                assert_eq!(nap.await.unwrap().unwrap(), b"slept");
            }
            started.elapsed()
        })
    });
    let took = rt.block_on(async {
        loop {
            if callers.is_finished() {
                break callers.join().unwrap();
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    let most = gauge.most.load(Ordering::SeqCst);
    assert!(most > 128, "at most {most} naps ran at once (in {took:?})");
    rt.block_on(handle.shutdown());
    // The name is free again.
    drop(dir.server(&name).bind().unwrap());
}

/// Counts the items made by a blocking stream and sees its iterator dropped.
struct Ticks {
    made: Arc<AtomicUsize>,
    dropped: Arc<AtomicUsize>,
}

impl Iterator for Ticks {
    type Item = Result<Vec<u8>, RemoteError>;
    fn next(&mut self) -> Option<Self::Item> {
        self.made.fetch_add(1, Ordering::SeqCst);
        Some(Ok(b"tick".to_vec()))
    }
}

impl Drop for Ticks {
    fn drop(&mut self) {
        self.dropped.fetch_add(1, Ordering::SeqCst);
    }
}

fn threads_of_this_process() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

#[test]
fn a_blocking_stream_holds_no_thread_while_its_caller_has_no_room_and_stops_at_its_deadline() {
    let _w = watchdog(Duration::from_secs(120));
    let dir = TempDir::new("poolstream");
    let name = unique("POOLSTREAM");
    let (made, dropped) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (m, d) = (made.clone(), dropped.clone());
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let handle = rt.block_on(async {
        microcs::tokio::Server::builder(&name)
            .runtime_dir(dir.path())
            .stream_method(
                "ticks",
                microcs::tokio::blocking_stream(move |_req: Request| {
                    Ok::<_, RemoteError>(Ticks { made: m.clone(), dropped: d.clone() })
                }),
            )
            .bind()
            .await
            .unwrap()
            .spawn(|req: Request| async move { Ok::<_, RemoteError>(req.into_payload()) })
            .unwrap()
    });
    let before = threads_of_this_process();
    // 300 streams, each read for one item, then left unread: the server waits for room on the
    // runtime, not on a pool thread (which would be 300 threads).
    let mut streams = Vec::new();
    for _ in 0..300 {
        let c =
            dir.client(&name).stream_window(1, 1 << 20).timeout(Duration::from_secs(10)).connect().unwrap();
        let mut s = c.into_stream("ticks", b"", None).map_err(|(e, _)| e).unwrap();
        assert_eq!(s.next().unwrap().unwrap(), b"tick");
        streams.push(s);
    }
    std::thread::sleep(Duration::from_millis(300));
    let during = threads_of_this_process();
    assert!(during < before + 64, "{before} threads before, {during} with 300 streams waiting for room");
    // Every stream still goes on when read again (no pool starvation).
    for s in streams.iter_mut().take(10) {
        assert_eq!(s.next().unwrap().unwrap(), b"tick");
    }
    drop(streams);
    eventually(Duration::from_secs(10), || (dropped.load(Ordering::SeqCst) == 300).then_some(()))
        .unwrap_or_else(|| panic!("{} of 300 iterators dropped", dropped.load(Ordering::SeqCst)));
    // A whole-stream limit: the stream ends with TimedOut, and its iterator is dropped.
    let mut c = dir.client(&name).timeout(Duration::from_secs(10)).connect().unwrap();
    let got: Vec<_> = c.stream_until("ticks", b"", Duration::from_millis(200)).unwrap().collect();
    let last = got.last().unwrap().as_ref().unwrap_err();
    assert_eq!(last.kind(), ErrorKind::TimedOut, "{last}");
    eventually(Duration::from_secs(5), || (dropped.load(Ordering::SeqCst) == 301).then_some(()))
        .expect("the timed-out stream's iterator was dropped");
    assert!(made.load(Ordering::SeqCst) >= 300);
    rt.block_on(handle.shutdown());
}
