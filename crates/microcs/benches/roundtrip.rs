//! Round trips: microcs's blocking client and server against the socket floor (a plain std
//! `UnixStream` ping-pong with a u32 length prefix, one thread per connection), same process,
//! same run. See docs/BENCHMARKS.md for how to read the numbers on a 2-vCPU VM.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use microcs::{Client, RemoteError, Request, Server};

fn floor_server(path: &std::path::Path) {
    let l = UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let mut s = s.unwrap();
            std::thread::spawn(move || {
                // One read of the prefix, one of the body, one write back: the least a
                // length-prefixed echo can do.
                let mut buf = vec![0u8; 4];
                while s.read_exact(&mut buf[..4]).is_ok() {
                    let len = u32::from_be_bytes(buf[..4].try_into().unwrap()) as usize;
                    buf.resize(4 + len, 0);
                    s.read_exact(&mut buf[4..]).unwrap();
                    s.write_all(&buf).unwrap();
                }
            });
        }
    });
}

fn floor_call(s: &mut UnixStream, payload: &[u8], out: &mut Vec<u8>) {
    let mut msg = Vec::with_capacity(4 + payload.len());
    msg.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    msg.extend_from_slice(payload);
    s.write_all(&msg).unwrap();
    let mut len = [0u8; 4];
    s.read_exact(&mut len).unwrap();
    out.resize(u32::from_be_bytes(len) as usize, 0);
    s.read_exact(out).unwrap();
}

fn bench(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("microcs-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let floor_path = dir.join("floor.sock");
    floor_server(&floor_path);
    let _handle = Server::builder("BENCH")
        .runtime_dir(&dir)
        .max_frame(2 << 20)
        .bind()
        .unwrap()
        .spawn(|r: Request| Ok::<_, RemoteError>(r.into_payload()))
        .unwrap();
    let mut client = Client::builder("BENCH").runtime_dir(&dir).max_frame(2 << 20).connect().unwrap();
    let mut raw = UnixStream::connect(&floor_path).unwrap();

    let mut g = c.benchmark_group("echo");
    for size in [32usize, 64 * 1024, 1024 * 1024] {
        let payload = vec![0xa5u8; size];
        g.throughput(Throughput::Bytes(size as u64));
        let mut out = Vec::new();
        g.bench_with_input(BenchmarkId::new("floor", size), &payload, |b, p| {
            b.iter(|| floor_call(&mut raw, p, &mut out))
        });
        g.bench_with_input(BenchmarkId::new("blocking", size), &payload, |b, p| {
            b.iter(|| client.request(p).unwrap())
        });
    }
    g.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = bench
}
criterion_main!(benches);
