//! NATS round trips, same run, same broker: a bare async-nats request to a bare async-nats
//! responder (the floor) against microcs's clients and servers over NATS.
//!
//! ```text
//! cargo bench -p microcs --features nats,tokio --bench nats              # full
//! cargo bench -p microcs --features nats,tokio --bench nats -- --test    # each case once
//! ```
//!
//! Needs `nats-server` in `PATH` (or `/usr/sbin`), started here on a free loopback port, or
//! `MICROCS_TEST_NATS_URL`. Each responder runs on a runtime of its own thread, as a separate
//! service would; requests are sequential (one in flight), so a case measures latency. See
//! docs/BENCHMARKS.md, section NATS.

use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use microcs::nats::Transport;
use microcs::{Client, RemoteError, Request, Server};
use microcs_testsupport::Nats;

const SIZES: [usize; 2] = [32, 4096];

/// A current-thread runtime on a thread of its own, kept alive until the process ends.
fn service_runtime() -> tokio::runtime::Handle {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let handle = rt.handle().clone();
    std::thread::spawn(move || rt.block_on(std::future::pending::<()>()));
    handle
}

/// The floor: a bare async-nats echo responder on `subject`.
fn bare_responder(url: &str, subject: &str) {
    let (url, subject) = (url.to_owned(), subject.to_owned());
    let h = service_runtime();
    let (tx, rx) = std::sync::mpsc::channel();
    h.spawn(async move {
        let nc = async_nats::connect(url).await.unwrap();
        let mut sub = nc.queue_subscribe(subject, "q".into()).await.unwrap();
        nc.flush().await.unwrap();
        tx.send(()).unwrap();
        while let Some(m) = next(&mut sub).await {
            if let Some(r) = m.reply {
                nc.publish(r, m.payload).await.unwrap();
            }
        }
    });
    rx.recv().unwrap();
}

async fn next(sub: &mut async_nats::Subscriber) -> Option<async_nats::Message> {
    std::future::poll_fn(|cx| futures_core::Stream::poll_next(std::pin::Pin::new(&mut *sub), cx)).await
}

/// `n` sequential bare async-nats requests on a current-thread runtime (the client side of
/// the floor), timed inside the runtime.
fn bare_requests(
    rt: &tokio::runtime::Runtime,
    nc: &async_nats::Client,
    subject: &str,
    payload: &[u8],
    n: u64,
) -> Duration {
    let payload = bytes::Bytes::copy_from_slice(payload);
    rt.block_on(async {
        let t = Instant::now();
        for _ in 0..n {
            let r = nc.request(subject.to_owned(), payload.clone()).await.unwrap();
            assert_eq!(r.payload.len(), payload.len());
        }
        t.elapsed()
    })
}

fn bench(c: &mut Criterion) {
    let Some(b) = Nats::get("the NATS benchmark") else {
        panic!(
            "the NATS benchmark needs nats-server: apt-get install nats-server, or set MICROCS_TEST_NATS_URL"
        )
    };
    let url = b.url();
    let pid = std::process::id();
    let bare_subject = format!("BARE_{pid}");
    bare_responder(&url, &bare_subject);
    let blocking_name = format!("BENCH_BLOCKING_{pid}");
    let _blocking = Server::builder(&blocking_name)
        .nats(&url)
        .transport(Transport::Nats)
        .bind()
        .unwrap()
        .spawn(|r: Request| Ok::<_, RemoteError>(r.into_payload()))
        .unwrap();
    #[cfg(feature = "tokio")]
    let tokio_name = format!("BENCH_TOKIO_{pid}");
    #[cfg(feature = "tokio")]
    let _tokio = {
        let h = service_runtime();
        let (name, url) = (tokio_name.clone(), url.clone());
        std::thread::spawn(move || {
            h.block_on(async move {
                microcs::tokio::Server::builder(&name)
                    .nats(&url)
                    .transport(Transport::Nats)
                    .bind()
                    .await
                    .unwrap()
                    .spawn(|r: Request| async move { Ok::<_, RemoteError>(r.into_payload()) })
                    .unwrap()
            })
        })
        .join()
        .unwrap()
    };

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let nc = rt.block_on(async_nats::connect(&url)).unwrap();
    let mut blocking_client =
        Client::builder(&blocking_name).nats(&url).transport(Transport::Nats).connect().unwrap();
    #[cfg(feature = "tokio")]
    let tokio_client = rt
        .block_on(
            microcs::tokio::Client::builder(&tokio_name).nats(&url).transport(Transport::Nats).connect(),
        )
        .unwrap();

    let mut g = c.benchmark_group("nats_roundtrip");
    g.measurement_time(Duration::from_secs(4)).warm_up_time(Duration::from_secs(1)).sample_size(30);
    for size in SIZES {
        let payload = vec![0x5au8; size];
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::new("bare_async_nats", size), &payload, |bn, p| {
            bn.iter_custom(|n| bare_requests(&rt, &nc, &bare_subject, p, n))
        });
        g.bench_with_input(
            BenchmarkId::new("bare_client_microcs_blocking_server", size),
            &payload,
            |bn, p| bn.iter_custom(|n| bare_requests(&rt, &nc, &blocking_name, p, n)),
        );
        g.bench_with_input(
            BenchmarkId::new("microcs_blocking_client_and_server", size),
            &payload,
            |bn, p| bn.iter(|| blocking_client.request(p).unwrap()),
        );
        #[cfg(feature = "tokio")]
        {
            g.bench_with_input(
                BenchmarkId::new("bare_client_microcs_tokio_server", size),
                &payload,
                |bn, p| bn.iter_custom(|n| bare_requests(&rt, &nc, &tokio_name, p, n)),
            );
            g.bench_with_input(
                BenchmarkId::new("microcs_tokio_client_and_server", size),
                &payload,
                |bn, p| {
                    bn.iter_custom(|n| {
                        rt.block_on(async {
                            let t = Instant::now();
                            for _ in 0..n {
                                tokio_client.request(p).await.unwrap();
                            }
                            t.elapsed()
                        })
                    })
                },
            );
        }
    }
    g.finish();

    // Paired rounds: the cases alternate in short bursts, so a change in the machine's load
    // hits both sides of each ratio alike (criterion runs cases one after the other, which on
    // a shared 2-vCPU machine can skew a ratio by tens of percent).
    let payload = [0x5au8; 32];
    let rounds = 41;
    let per = 200;
    let mut ratios: Vec<(&str, Vec<f64>)> = vec![("microcs_blocking_client_and_server", Vec::new())];
    #[cfg(feature = "tokio")]
    ratios.push(("microcs_tokio_client_and_server", Vec::new()));
    for _ in 0..rounds {
        let bare = bare_requests(&rt, &nc, &bare_subject, &payload, per).as_secs_f64();
        let t = Instant::now();
        for _ in 0..per {
            blocking_client.request(&payload).unwrap();
        }
        ratios[0].1.push(t.elapsed().as_secs_f64() / bare);
        #[cfg(feature = "tokio")]
        {
            let ours = rt.block_on(async {
                let t = Instant::now();
                for _ in 0..per {
                    tokio_client.request(&payload).await.unwrap();
                }
                t.elapsed()
            });
            ratios[1].1.push(ours.as_secs_f64() / bare);
        }
    }
    for (name, mut r) in ratios {
        r.sort_by(f64::total_cmp);
        println!(
            "paired 32 B, {rounds} rounds of {per}: {name} / bare_async_nats = {:.2} (quartiles {:.2}..{:.2})",
            r[r.len() / 2],
            r[r.len() / 4],
            r[r.len() * 3 / 4]
        );
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
