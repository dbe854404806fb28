//! A bounded soak: many clients, many requests, payloads from 0 B to 1 MiB, against a server in
//! another process. Checks that nothing is lost or misrouted and that the server's memory and
//! descriptors return to their baseline. Not part of the test suite (it runs for about a minute);
//! its figures are in docs/RELIABILITY.md.
//!
//! ```text
//! cargo run --release --example soak -- [--shm] [CLIENTS] [REQUESTS_PER_CLIENT]   # default 64 10000
//! ```
//!
//! With `--shm` the clients ask for shared memory (the server always offers it), and each
//! client checks that it got it.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use microcs::{Client, RemoteError, Request, Server};

const NAME: &str = "SOAK";

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--server") {
        let h = Server::builder(NAME)
            .max_frame(2 << 20)
            .shared_memory(true)
            .bind()
            .unwrap()
            .spawn(|r: Request| Ok::<_, RemoteError>(r.into_payload()))
            .unwrap();
        println!("READY");
        std::io::stdout().flush().unwrap();
        let _ = std::io::stdin().read_line(&mut String::new());
        h.shutdown();
        return;
    }
    let shm = args.get(1).map(String::as_str) == Some("--shm");
    let args = &args[usize::from(shm)..];
    let clients: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(64);
    let per_client: u64 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let dir = std::env::temp_dir().join(format!("microcs-soak-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let mut server = Command::new(std::env::current_exe().unwrap())
        .arg("--server")
        // glibc keeps freed heap memory in per-thread arenas; a fixed mmap threshold makes
        // large buffers go back to the kernel when freed, so RSS shows what is really held.
        .env("MALLOC_MMAP_THRESHOLD_", "131072")
        .env("MICROCS_RUNTIME_DIR", &dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = server.id();
    BufReader::new(server.stdout.take().unwrap()).read_line(&mut String::new()).unwrap();
    let (rss0, fds0) = (rss_kib(pid), fd_count(pid));
    println!("server pid {pid}: baseline {rss0} KiB RSS, {fds0} descriptors");
    let bytes = AtomicU64::new(0);
    let done = AtomicU64::new(0);
    let peak_rss = AtomicU64::new(rss0);
    let t0 = Instant::now();
    let failures: u64 = std::thread::scope(|s| {
        let workers: Vec<_> = (0..clients)
            .map(|c| {
                let (dir, bytes, done) = (&dir, &bytes, &done);
                s.spawn(move || {
                    let mut client = Client::builder(NAME)
                        .runtime_dir(dir)
                        .max_frame(2 << 20)
                        .shared_memory(shm)
                        .connect()
                        .unwrap();
                    let transport = client.transport();
                    assert_eq!(transport, Some(if shm { "shm" } else { "unix" }), "client {c}");
                    let mut rng =
                        0x2545_f491_4f6c_dd1du64 ^ (c as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                    let mut bad = 0;
                    for i in 0..per_client {
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        // Log-uniform sizes from 0 B to 1 MiB: mostly small, some large.
                        let size = ((rng >> 40) % (1u64 << (rng % 21))) as usize;
                        let mut payload = vec![0u8; size.max(16)];
                        payload[..8].copy_from_slice(&(c as u64).to_le_bytes());
                        payload[8..16].copy_from_slice(&i.to_le_bytes());
                        match client.request(&payload) {
                            Ok(reply) if reply == payload => {
                                bytes.fetch_add(2 * payload.len() as u64, Ordering::Relaxed);
                            }
                            Ok(_) => {
                                eprintln!("client {c} request {i}: MISROUTED reply");
                                bad += 1;
                            }
                            Err(e) => {
                                eprintln!("client {c} request {i}: {e}");
                                bad += 1;
                            }
                        }
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                    bad
                })
            })
            .collect();
        let sampler = s.spawn(|| {
            while done.load(Ordering::Relaxed) < clients as u64 {
                peak_rss.fetch_max(rss_kib(pid), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let bad = workers.into_iter().map(|w| w.join().unwrap()).sum();
        sampler.join().unwrap();
        bad
    });
    let elapsed = t0.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let (rss1, fds1) = (rss_kib(pid), fd_count(pid));
    let total = clients as u64 * per_client;
    println!(
        "{total} requests from {clients} clients{} in {:.1} s ({:.0} req/s, {:.2} GiB moved): {failures} lost or misrouted",
        if shm { " over shared memory" } else { "" },
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64(),
        bytes.load(Ordering::Relaxed) as f64 / (1u64 << 30) as f64
    );
    println!(
        "server: RSS {rss0} KiB before, peak {} KiB, {rss1} KiB after; descriptors {fds0} before, {fds1} after",
        peak_rss.load(Ordering::Relaxed)
    );
    drop(server.stdin.take());
    server.wait().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    if failures > 0 || fds1 > fds0 {
        std::process::exit(1);
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}
