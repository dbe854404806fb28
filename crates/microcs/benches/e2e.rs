//! End-to-end benchmark: client and server in separate processes, pinned to CPUs, each microcs
//! figure next to the socket floor measured in the same run (a plain std `UnixStream` ping-pong
//! with a u32 length prefix, one thread per connection).
//!
//! ```text
//! cargo bench -p microcs --bench e2e -- [--quick] [--placement split|same|both] [--runs N] [--json FILE]
//! ```
//!
//! `split` pins the server to CPU 0 and the client to CPU 1; `same` pins both to CPU 1. Every
//! scenario runs `--runs` times, alternating systems, and the medians are reported. `--quick`
//! (used by CI so the bench cannot rot) runs everything briefly and asserts nothing.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use microcs::{Client, RemoteError, Request, Server};

/// The systems compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum System {
    Floor,
    Blocking,
}

impl System {
    fn all() -> &'static [System] {
        &[System::Floor, System::Blocking]
    }
    fn label(self) -> &'static str {
        match self {
            System::Floor => "floor",
            System::Blocking => "blocking",
        }
    }
}

struct Opts {
    quick: bool,
    runs: usize,
    placements: Vec<Placement>,
    json: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug)]
enum Placement {
    Split,
    Same,
}

impl Placement {
    fn cpus(self) -> (usize, usize) {
        // Counted once, before this process pins itself (which would make it see one CPU).
        static CPUS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
        let n = *CPUS.get_or_init(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
        match self {
            Placement::Split if n > 1 => (0, 1),
            _ => (n.min(2) - 1, n.min(2) - 1),
        }
    }
    fn label(self) -> &'static str {
        match self {
            Placement::Split => "split",
            Placement::Same => "same",
        }
    }
}

fn pin(cpu: usize) {
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    if let Err(e) = rustix::thread::sched_setaffinity(None, &set) {
        eprintln!("warning: cannot pin to CPU {cpu}: {e}");
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--serve") {
        serve(&args[1], Path::new(&args[2]), args[3].parse().unwrap());
        return;
    }
    let mut opts =
        Opts { quick: false, runs: 5, placements: vec![Placement::Split, Placement::Same], json: None };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => opts.quick = true,
            "--runs" => opts.runs = it.next().and_then(|v| v.parse().ok()).expect("--runs N"),
            "--json" => opts.json = it.next().map(PathBuf::from),
            "--placement" => {
                opts.placements = match it.next().map(String::as_str) {
                    Some("split") => vec![Placement::Split],
                    Some("same") => vec![Placement::Same],
                    _ => vec![Placement::Split, Placement::Same],
                }
            }
            "--bench" => {} // passed by `cargo bench`
            _ => {}
        }
    }
    if opts.quick {
        opts.runs = 1;
    }
    let _ = Placement::Same.cpus();
    let mut report = Vec::new();
    for &p in &opts.placements {
        report.push(run_placement(&opts, p));
    }
    let json = format!("[{}]", report.join(","));
    if let Some(path) = &opts.json {
        std::fs::write(path, &json).unwrap();
        eprintln!("wrote {}", path.display());
    }
}

/// One server process of a given kind.
struct ServerProc {
    child: Child,
}

impl ServerProc {
    fn start(system: System, dir: &Path, cpu: usize) -> ServerProc {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--serve", system.label()])
            .arg(dir)
            .arg(cpu.to_string())
            .env("MICROCS_RUNTIME_DIR", dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        assert!(line.starts_with("READY"), "server {system:?} did not start: {line:?}");
        ServerProc { child }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

fn serve(kind: &str, dir: &Path, cpu: usize) {
    pin(cpu);
    match kind {
        "floor" => {
            let l = UnixListener::bind(dir.join("floor.sock")).unwrap();
            std::thread::spawn(move || {
                for s in l.incoming() {
                    let mut s = s.unwrap();
                    std::thread::spawn(move || {
                        let mut buf = vec![0u8; 4];
                        while s.read_exact(&mut buf[..4]).is_ok() {
                            let len = u32::from_be_bytes(buf[..4].try_into().unwrap()) as usize;
                            buf.resize(4 + len, 0);
                            if s.read_exact(&mut buf[4..]).is_err() || s.write_all(&buf).is_err() {
                                break;
                            }
                        }
                    });
                }
            });
            println!("READY");
            let _ = std::io::stdout().flush();
            let _ = std::io::stdin().read_to_end(&mut Vec::new());
        }
        "blocking" => {
            let h = Server::builder("blocking")
                .max_frame(2 << 20)
                .bind()
                .unwrap()
                .spawn(|r: Request| Ok::<_, RemoteError>(r.into_payload()))
                .unwrap();
            println!("READY");
            let _ = std::io::stdout().flush();
            let _ = std::io::stdin().read_to_end(&mut Vec::new());
            h.shutdown();
        }
        other => panic!("unknown server kind {other}"),
    }
}

/// A synchronous echo client of one system.
enum Caller {
    Floor(UnixStream, Vec<u8>),
    Blocking(Box<Client>),
}

impl Caller {
    fn connect(system: System, dir: &Path) -> Caller {
        match system {
            System::Floor => Caller::Floor(UnixStream::connect(dir.join("floor.sock")).unwrap(), Vec::new()),
            System::Blocking => Caller::Blocking(Box::new(
                Client::builder("blocking").runtime_dir(dir).max_frame(2 << 20).connect().unwrap(),
            )),
        }
    }

    fn call(&mut self, payload: &[u8]) -> usize {
        match self {
            Caller::Floor(s, buf) => {
                buf.clear();
                buf.extend_from_slice(&(payload.len() as u32).to_be_bytes());
                buf.extend_from_slice(payload);
                s.write_all(buf).unwrap();
                s.read_exact(&mut buf[..4]).unwrap();
                let len = u32::from_be_bytes(buf[..4].try_into().unwrap()) as usize;
                buf.resize(len, 0);
                s.read_exact(buf).unwrap();
                len
            }
            Caller::Blocking(c) => c.request(payload).unwrap().len(),
        }
    }
}

#[derive(Default, Clone)]
struct Latency {
    p50: f64,
    p99: f64,
    p999: f64,
}

fn latency_run(system: System, dir: &Path, size: usize, n: usize) -> Latency {
    let mut c = Caller::connect(system, dir);
    let payload = vec![0xa5u8; size];
    for _ in 0..(n / 10).max(50) {
        c.call(&payload);
    }
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t0 = Instant::now();
        assert_eq!(c.call(&payload), size);
        samples.push(t0.elapsed().as_nanos() as f64 / 1000.0);
    }
    samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let q = |p: f64| samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)];
    Latency { p50: q(0.50), p99: q(0.99), p999: q(0.999) }
}

/// Requests per second with `clients` threads, each with its own connection, for `d`.
fn throughput_run(system: System, dir: &Path, clients: usize, size: usize, d: Duration) -> f64 {
    let stop = AtomicBool::new(false);
    let total = AtomicU64::new(0);
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..clients {
            s.spawn(|| {
                let mut c = Caller::connect(system, dir);
                let payload = vec![1u8; size];
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    c.call(&payload);
                    n += 1;
                }
                total.fetch_add(n, Ordering::Relaxed);
            });
        }
        std::thread::sleep(d);
        stop.store(true, Ordering::Relaxed);
    });
    total.load(Ordering::Relaxed) as f64 / t0.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn run_placement(opts: &Opts, placement: Placement) -> String {
    let (server_cpu, client_cpu) = placement.cpus();
    pin(client_cpu);
    let dir = std::env::temp_dir().join(format!("microcs-e2e-{}-{}", std::process::id(), placement.label()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let servers: Vec<ServerProc> =
        System::all().iter().map(|&s| ServerProc::start(s, &dir, server_cpu)).collect();
    let (n_lat, n_big, dur) =
        if opts.quick { (200, 5, Duration::from_millis(100)) } else { (20_000, 300, Duration::from_secs(2)) };
    println!(
        "\n## placement: {} (server CPU {server_cpu}, client CPU {client_cpu}), {} run(s), medians\n",
        placement.label(),
        opts.runs
    );
    let mut json = Vec::new();

    // Latency, 32 B.
    let mut lat: Vec<Vec<Latency>> = vec![Vec::new(); System::all().len()];
    for _ in 0..opts.runs {
        for (i, &s) in System::all().iter().enumerate() {
            lat[i].push(latency_run(s, &dir, 32, n_lat));
        }
    }
    let med = |v: &Vec<Latency>, f: fn(&Latency) -> f64| median(v.iter().map(f).collect());
    let floor_p50 = med(&lat[0], |l| l.p50);
    println!("| 32 B round trip | p50 µs | p99 µs | p99.9 µs | p50 / floor |");
    println!("|---|---|---|---|---|");
    for (i, &s) in System::all().iter().enumerate() {
        let (p50, p99, p999) = (med(&lat[i], |l| l.p50), med(&lat[i], |l| l.p99), med(&lat[i], |l| l.p999));
        println!("| {} | {p50:.1} | {p99:.1} | {p999:.1} | {:.2}× |", s.label(), p50 / floor_p50);
        json.push(format!(
            r#"{{"scenario":"latency_32","system":"{}","p50_us":{p50:.2},"p99_us":{p99:.2},"p999_us":{p999:.2},"ratio":{:.3}}}"#,
            s.label(),
            p50 / floor_p50
        ));
    }

    // Throughput: 1 client and 4 concurrent clients, 32 B.
    for clients in [1usize, 4] {
        let mut rates: Vec<Vec<f64>> = vec![Vec::new(); System::all().len()];
        for _ in 0..opts.runs {
            for (i, &s) in System::all().iter().enumerate() {
                rates[i].push(throughput_run(s, &dir, clients, 32, dur));
            }
        }
        let floor = median(rates[0].clone());
        println!("\n| {clients} client(s), 32 B | requests/s | / floor |");
        println!("|---|---|---|");
        for (i, &s) in System::all().iter().enumerate() {
            let r = median(rates[i].clone());
            println!("| {} | {r:.0} | {:.2}× |", s.label(), r / floor);
            json.push(format!(
                r#"{{"scenario":"throughput_{clients}","system":"{}","rps":{r:.0},"ratio":{:.3}}}"#,
                s.label(),
                r / floor
            ));
        }
    }

    // 1 MiB echo.
    let mut mbs: Vec<Vec<f64>> = vec![Vec::new(); System::all().len()];
    for _ in 0..opts.runs {
        for (i, &s) in System::all().iter().enumerate() {
            let mut c = Caller::connect(s, &dir);
            let payload = vec![3u8; 1 << 20];
            c.call(&payload);
            let t0 = Instant::now();
            for _ in 0..n_big {
                c.call(&payload);
            }
            mbs[i].push(n_big as f64 * (1 << 20) as f64 / t0.elapsed().as_secs_f64() / 1e6);
        }
    }
    let floor = median(mbs[0].clone());
    println!("\n| 1 MiB echo | MB/s (payload, one way) | / floor |");
    println!("|---|---|---|");
    for (i, &s) in System::all().iter().enumerate() {
        let r = median(mbs[i].clone());
        println!("| {} | {r:.0} | {:.2}× |", s.label(), r / floor);
        json.push(format!(
            r#"{{"scenario":"echo_1mib","system":"{}","mbps":{r:.1},"ratio":{:.3}}}"#,
            s.label(),
            r / floor
        ));
    }

    // Memory of the blocking server: idle, then with 100 idle connections.
    let blocking = &servers[1];
    let idle = rss_kib(blocking.pid());
    let conns: Vec<Client> =
        (0..100).map(|_| Client::builder("blocking").runtime_dir(&dir).connect().unwrap()).collect();
    std::thread::sleep(Duration::from_millis(200));
    let with = rss_kib(blocking.pid());
    drop(conns);
    let per = (with.saturating_sub(idle)) as f64 / 100.0;
    println!(
        "\n| blocking server memory | KiB |\n|---|---|\n| idle RSS | {idle} |\n| per idle connection | {per:.1} |"
    );
    json.push(format!(
        r#"{{"scenario":"memory","system":"blocking","idle_kib":{idle},"per_conn_kib":{per:.1}}}"#
    ));

    drop(servers);
    let _ = std::fs::remove_dir_all(&dir);
    format!(r#"{{"placement":"{}","results":[{}]}}"#, placement.label(), json.join(","))
}
