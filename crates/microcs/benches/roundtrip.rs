//! Round trips in one process: microcs's blocking and tokio clients and servers against the
//! socket floor (`floor/mod.rs`: a plain std `UnixStream` echo with a u32 length prefix,
//! buffered reads and one vectored write per frame, one thread per connection), same run, 32 B, 64 KiB and 1 MiB payloads.
//!
//! ```text
//! cargo bench -p microcs --features tokio --bench roundtrip              # full
//! cargo bench -p microcs --features tokio --bench roundtrip -- --test    # each case once (CI)
//! taskset -c 1 cargo bench ...                                          # everything on one CPU
//! ```
//!
//! Client and server are threads of this process, so the scheduler places them as it likes; the
//! end-to-end harness (`benches/e2e.rs`) pins separate processes and is the one to quote. See
//! docs/BENCHMARKS.md for how to read the numbers on a 2-vCPU VM.

#[cfg(feature = "tokio")]
use std::path::Path;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use microcs::{Client, RemoteError, Request, Server};

#[path = "floor/mod.rs"]
mod floor;

/// Largest payload benched, with room for the frame header.
const MAX_FRAME: u32 = 2 << 20;

/// A tokio echo server on a current-thread runtime of its own thread (as a service process
/// would run it), stopped when the returned sender is dropped.
#[cfg(feature = "tokio")]
fn tokio_server(dir: &Path) -> tokio::sync::oneshot::Sender<()> {
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let dir = dir.to_path_buf();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let h = microcs::tokio::Server::builder("BENCH_TOKIO")
                .runtime_dir(&dir)
                .max_frame(MAX_FRAME)
                .bind()
                .await
                .unwrap()
                .spawn(|r: Request| async move { Ok::<_, RemoteError>(r.into_payload()) })
                .unwrap();
            ready_tx.send(()).unwrap();
            let _ = stop_rx.await;
            h.shutdown().await;
        });
    });
    ready_rx.recv().unwrap();
    stop_tx
}

fn bench(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("microcs-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let floor_path = dir.join("floor.sock");
    floor::serve(&floor_path);
    let handle = Server::builder("BENCH")
        .runtime_dir(&dir)
        .max_frame(MAX_FRAME)
        .bind()
        .unwrap()
        .spawn(|r: Request| Ok::<_, RemoteError>(r.into_payload()))
        .unwrap();
    let mut client = Client::builder("BENCH").runtime_dir(&dir).max_frame(MAX_FRAME).connect().unwrap();
    let mut raw = floor::FloorConn::connect(&floor_path);

    #[cfg(feature = "tokio")]
    let stop_tokio = tokio_server(&dir);
    #[cfg(feature = "tokio")]
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    #[cfg(feature = "tokio")]
    let tclient = rt
        .block_on(
            microcs::tokio::Client::builder("BENCH_TOKIO").runtime_dir(&dir).max_frame(MAX_FRAME).connect(),
        )
        .unwrap();

    let mut g = c.benchmark_group("echo");
    for size in [32usize, 64 * 1024, 1024 * 1024] {
        let payload = vec![0xa5u8; size];
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::new("floor", size), &payload, |b, p| b.iter(|| raw.call(p)));
        g.bench_with_input(BenchmarkId::new("blocking", size), &payload, |b, p| {
            b.iter(|| client.request(p).unwrap())
        });
        // The whole measured loop runs inside one `block_on`, as an async caller's loop would.
        #[cfg(feature = "tokio")]
        g.bench_with_input(BenchmarkId::new("tokio", size), &payload, |b, p| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let t0 = std::time::Instant::now();
                    for _ in 0..iters {
                        std::hint::black_box(tclient.request(p).await.unwrap());
                    }
                    t0.elapsed()
                })
            })
        });
    }
    g.finish();
    drop(client);
    handle.shutdown();
    #[cfg(feature = "tokio")]
    {
        drop(tclient);
        drop(stop_tokio);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = bench
}
criterion_main!(benches);
