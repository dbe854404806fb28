//! End-to-end benchmark: client and server in separate processes, pinned to CPUs, each microcs
//! figure next to the socket floor measured in the same run (a plain std `UnixStream` echo with
//! a u32 length prefix, buffered reads and one vectored write per frame, one thread per
//! connection: see `floor/mod.rs`).
//!
//! ```text
//! cargo bench -p microcs --features tokio --bench e2e -- [--quick] [--placement split|same|both]
//!     [--runs N] [--json FILE] [--microcs PATH]
//! cargo bench -p microcs --features tokio --bench e2e -- --syscalls [--json FILE]  # needs strace
//! cargo bench -p microcs --features tokio --bench e2e -- --syscalls-perf [--json FILE]  # perf, root
//! cargo bench -p microcs --features tokio --bench e2e -- --allocs [--json FILE]
//! cargo bench -p microcs --features tokio --bench e2e -- --instructions [--json FILE]  # valgrind
//! ```
//!
//! The server processes are `microcs-bench-server` (`benchserver/main.rs`, built with this
//! bench), a program that holds only the servers, so that a server's memory is measured without
//! this binary's client and report code; the client processes are this binary (`--client`,
//! `--idle-client`).
//!
//! `split` pins the server to CPU 0 and the client to CPU 1; `same` pins both to CPU 1. Every
//! scenario runs `--runs` times, alternating systems within a run so that drift hits them alike;
//! each ratio is the median over the runs of (system / floor) in that run. `--quick` (used by CI
//! so the bench cannot rot) runs everything briefly and asserts nothing about speed.
//!
//! Systems are named `client-server`: `floor`, `blocking` (blocking client, blocking server),
//! `tokio` (tokio client, tokio server), `blocking-tokio`, `tokio-blocking`. Without the `tokio`
//! feature only `floor` and `blocking` run. Tokio sides use a current-thread runtime (in a pinned
//! process a multi-thread runtime would get one worker anyway).
//!
//! `--syscalls` runs each client and server process under `strace -c -f`, once with no request
//! and once with N, and prints the difference per request; `--syscalls-perf` counts the same with
//! `perf stat` on the system-call tracepoints, both placements, the shared-memory pairs included
//! (strace stops a process at every call, so a peer's spin never catches a reply: see
//! `traced/mod.rs`); `--instructions` does the same under
//! `valgrind --tool=callgrind` (user-space instructions, deterministic on a busy machine). `--allocs` counts heap allocations
//! per request with a counting global allocator (client and server in this process, each side's
//! own thread counted).

use std::alloc::{GlobalAlloc, Layout, System as SysAlloc};
use std::cell::Cell;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use microcs::{Client, RemoteError, Request, Server};
use serde_json::{Value, json};

// Its server half runs in `microcs-bench-server` (benchserver/main.rs).
#[allow(dead_code)]
#[path = "floor/mod.rs"]
mod floor;
use floor::FloorConn;
#[path = "common/mod.rs"]
mod common;
use common::*;
#[path = "traced/mod.rs"]
mod traced;
use traced::{Tracer, traced_report};

/// Requests in flight on one connection in the pipelined scenario.
#[cfg(feature = "tokio")]
const DEPTH: usize = 64;
/// Idle connections opened to measure their memory.
const IDLE_CONNS: usize = 100;

// ---------------------------------------------------------------- allocation counting

/// The system allocator, counting allocations per thread (for `--allocs`). Counting costs a
/// thread-local increment, the same for every system measured.
struct Counting;

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

fn count_alloc() {
    let _ = ALLOCS.try_with(|n| n.set(n.get() + 1));
}

/// Allocations made by the calling thread so far.
fn thread_allocs() -> u64 {
    ALLOCS.try_with(Cell::get).unwrap_or(0)
}

// SAFETY: every method forwards to the system allocator unchanged; the counter is a
// const-initialised thread-local `Cell` without a destructor, which never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count_alloc();
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { SysAlloc.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count_alloc();
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { SysAlloc.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count_alloc();
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { SysAlloc.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { SysAlloc.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

// ---------------------------------------------------------------- systems

/// A server process kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ServerKind {
    Floor,
    Blocking,
    #[cfg(feature = "tokio")]
    Tokio,
}

impl ServerKind {
    fn all() -> &'static [ServerKind] {
        &[
            ServerKind::Floor,
            ServerKind::Blocking,
            #[cfg(feature = "tokio")]
            ServerKind::Tokio,
        ]
    }
    fn label(self) -> &'static str {
        match self {
            ServerKind::Floor => "floor",
            ServerKind::Blocking => "blocking",
            #[cfg(feature = "tokio")]
            ServerKind::Tokio => "tokio",
        }
    }
    fn parse(s: &str) -> ServerKind {
        *ServerKind::all().iter().find(|k| k.label() == s).unwrap_or_else(|| panic!("unknown kind {s}"))
    }
}

/// A client kind; a system is a client kind talking to a server kind.
type ClientKind = ServerKind;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct System {
    client: ClientKind,
    server: ServerKind,
    /// Client and server leave the socket send buffer at the system's default
    /// (`send_buffer(0)`), instead of microcs's default of 1 MiB. Label suffix `+kbuf`.
    kernel_buffers: bool,
    /// The client asks for shared memory (the microcs servers offer it); label suffix `+shm`.
    shm: bool,
    /// The floor's client and server wait in `epoll_wait` (the epoll floor, `floor/mod.rs`);
    /// label suffix `+epoll`.
    epoll: bool,
}

impl System {
    const fn new(client: ClientKind, server: ServerKind) -> System {
        System { client, server, kernel_buffers: false, shm: false, epoll: false }
    }

    /// The epoll floor: what waiting in an event loop costs by itself.
    const FLOOR_EPOLL: System = System { epoll: true, ..System::FLOOR };

    /// The same pair over shared memory (PROTOCOL.md § 18).
    fn shm(self) -> System {
        System { shm: true, ..self }
    }

    /// The same pair with the system's default send buffers.
    fn kbuf(self) -> System {
        System { kernel_buffers: true, ..self }
    }

    const FLOOR: System = System::new(ServerKind::Floor, ServerKind::Floor);
    const BLOCKING: System = System::new(ServerKind::Blocking, ServerKind::Blocking);
    #[cfg(feature = "tokio")]
    const TOKIO: System = System::new(ServerKind::Tokio, ServerKind::Tokio);

    fn label(self) -> String {
        let pair = if self.client == self.server {
            self.client.label().to_owned()
        } else {
            format!("{}-{}", self.client.label(), self.server.label())
        };
        let pair = if self.kernel_buffers { pair + "+kbuf" } else { pair };
        let pair = if self.epoll { pair + "+epoll" } else { pair };
        if self.shm { pair + "+shm" } else { pair }
    }

    fn parse(s: &str) -> System {
        let (s, shm) = s.strip_suffix("+shm").map_or((s, false), |s| (s, true));
        if s == "floor+epoll" {
            return System::FLOOR_EPOLL;
        }
        let (s, kbuf) = s.strip_suffix("+kbuf").map_or((s, false), |s| (s, true));
        let (c, srv) = s.split_once('-').unwrap_or((s, s));
        System { kernel_buffers: kbuf, shm, ..System::new(ServerKind::parse(c), ServerKind::parse(srv)) }
    }

    /// The microcs pairs of `systems` (not the floor) over shared memory.
    fn over_shm(systems: &[System]) -> Vec<System> {
        systems.iter().filter(|s| s.client != ServerKind::Floor).map(|s| s.shm()).collect()
    }

    /// The floor and both flavours end to end.
    fn main() -> Vec<System> {
        vec![
            System::FLOOR,
            System::BLOCKING,
            #[cfg(feature = "tokio")]
            System::TOKIO,
        ]
    }

    /// Also the mixed pairs (latency only).
    fn with_mixed() -> Vec<System> {
        #[allow(unused_mut)]
        let mut v = System::main();
        #[cfg(feature = "tokio")]
        v.extend([
            System::new(ServerKind::Blocking, ServerKind::Tokio),
            System::new(ServerKind::Tokio, ServerKind::Blocking),
        ]);
        v
    }
}

// ---------------------------------------------------------------- options and placement

struct Opts {
    quick: bool,
    runs: usize,
    placements: Vec<Placement>,
    json: Option<PathBuf>,
    microcs: Option<PathBuf>,
    /// `--only a,b`: run only these scenarios (latency, throughput, inflight, stream, bulk,
    /// memory, idle, cpu, oneshot); all when empty.
    only: Vec<String>,
}

impl Opts {
    fn wants(&self, scenario: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|s| s == scenario)
    }
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

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("--idle-client") => {
            // Connect, one request, then sit idle until stdin closes.
            let mut c = Caller::connect(System::parse(&args[1]), Path::new(&args[2]));
            c.repeat(b"hello", 1, None);
            if System::parse(&args[1]).shm {
                assert_eq!(c.transport(), Some("shm"));
            }
            match &c {
                // An async program waits inside its runtime: the connection's tasks stay
                // driven (and parked) while it waits.
                #[cfg(feature = "tokio")]
                Caller::Tokio(rt, _) => {
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    std::thread::spawn(move || {
                        ready_then_wait_for_stdin();
                        let _ = tx.send(());
                    });
                    let _ = rt.block_on(rx);
                }
                _ => ready_then_wait_for_stdin(),
            }
            return;
        }
        Some("--client") => {
            return client_proc(
                System::parse(&args[1]),
                Path::new(&args[2]),
                args[3].parse().unwrap(),
                args[4].parse().unwrap(),
                args.get(5).map_or(1, |d| d.parse().unwrap()),
            );
        }
        _ => {}
    }
    let mut opts = Opts {
        quick: false,
        runs: 5,
        placements: vec![Placement::Split, Placement::Same],
        json: None,
        microcs: None,
        only: Vec::new(),
    };
    let (mut syscalls, mut allocs, mut instructions) = (None, false, false);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => opts.quick = true,
            "--syscalls" => syscalls = Some(Tracer::Strace),
            "--syscalls-perf" => syscalls = Some(Tracer::Perf),
            "--allocs" => allocs = true,
            "--instructions" => instructions = true,
            "--runs" => opts.runs = it.next().and_then(|v| v.parse().ok()).expect("--runs N"),
            "--json" => opts.json = it.next().map(PathBuf::from),
            "--microcs" => opts.microcs = it.next().map(PathBuf::from),
            "--only" => opts.only = it.next().expect("--only LIST").split(',').map(String::from).collect(),
            "--placement" => {
                opts.placements = match it.next().map(String::as_str) {
                    Some("split") => vec![Placement::Split],
                    Some("same") => vec![Placement::Same],
                    _ => vec![Placement::Split, Placement::Same],
                }
            }
            _ => {} // `--bench`, passed by `cargo bench`, and criterion-style filters
        }
    }
    if opts.quick {
        opts.runs = 1;
    }
    let _ = Placement::Same.cpus();
    let report = if allocs {
        json!({ "allocs": alloc_report(&opts) })
    } else if let Some(tracer) = syscalls {
        let key = if tracer == Tracer::Perf { "syscalls_perf" } else { "syscalls" };
        json!({ key: traced_report(&opts, tracer) })
    } else if instructions {
        json!({ "instructions": traced_report(&opts, Tracer::Callgrind) })
    } else {
        let placements: Vec<Value> = opts.placements.iter().map(|&p| run_placement(&opts, p)).collect();
        json!({ "placements": placements })
    };
    if let Some(path) = &opts.json {
        std::fs::write(path, serde_json::to_string_pretty(&report).unwrap()).unwrap();
        eprintln!("wrote {}", path.display());
    }
}

fn private_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("microcs-e2e-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    dir
}

// ---------------------------------------------------------------- server processes

/// One server process of a given kind; stopped (stdin closed, waited for) on drop.
struct ServerProc {
    child: Child,
}

impl ServerProc {
    fn start(kind: ServerKind, dir: &Path, cpu: usize) -> ServerProc {
        ServerProc::start_with(&[], kind, dir, cpu)
    }

    /// Starts the server behind a command prefix (e.g. `strace -c -f -o FILE`).
    fn start_with(prefix: &[String], kind: ServerKind, dir: &Path, cpu: usize) -> ServerProc {
        let exe = Path::new(env!("CARGO_BIN_EXE_microcs-bench-server"));
        let mut cmd = match prefix.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(exe);
                c
            }
            None => Command::new(exe),
        };
        cmd.arg(kind.label()).arg(dir).arg(cpu.to_string()).env("MICROCS_RUNTIME_DIR", dir);
        ServerProc { child: spawn_ready(&mut cmd, &format!("server {kind:?}")) }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// Starts a process of this benchmark (server or client) with piped stdin and stdout and waits
/// for the `READY` line it prints once it serves or is connected.
fn spawn_ready(cmd: &mut Command, what: &str) -> Child {
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert!(line.starts_with("READY"), "{what} did not start: {line:?}");
    child
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------- clients

/// One connection of one client kind, to the server of a system.
enum Caller {
    Floor(FloorConn),
    Blocking(Box<Client>),
    #[cfg(feature = "tokio")]
    Tokio(tokio::runtime::Runtime, microcs::tokio::Client),
}

fn service_name(system: System) -> &'static str {
    match (system.server, system.kernel_buffers) {
        (ServerKind::Floor, _) => unreachable!("the floor has no name"),
        (ServerKind::Blocking, false) => BLOCKING_NAME,
        (ServerKind::Blocking, true) => BLOCKING_KBUF_NAME,
        #[cfg(feature = "tokio")]
        (ServerKind::Tokio, false) => TOKIO_NAME,
        #[cfg(feature = "tokio")]
        (ServerKind::Tokio, true) => TOKIO_KBUF_NAME,
    }
}

impl Caller {
    fn connect(system: System, dir: &Path) -> Caller {
        let send_buffer = if system.kernel_buffers { 0 } else { 1 << 20 };
        match (system.client, system.server) {
            (ServerKind::Floor, _) if system.epoll => {
                Caller::Floor(FloorConn::connect_epoll(&dir.join("floor-epoll.sock")))
            }
            (ServerKind::Floor, _) => Caller::Floor(FloorConn::connect(&dir.join("floor.sock"))),
            (ServerKind::Blocking, _) => Caller::Blocking(Box::new(
                Client::builder(service_name(system))
                    .runtime_dir(dir)
                    .max_frame(MAX_FRAME)
                    .send_buffer(send_buffer)
                    .shared_memory(system.shm)
                    .connect()
                    .unwrap(),
            )),
            #[cfg(feature = "tokio")]
            (ServerKind::Tokio, _) => {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                let c = rt
                    .block_on(
                        microcs::tokio::Client::builder(service_name(system))
                            .runtime_dir(dir)
                            .max_frame(MAX_FRAME)
                            .send_buffer(send_buffer)
                            .shared_memory(system.shm)
                            .connect(),
                    )
                    .unwrap();
                Caller::Tokio(rt, c)
            }
        }
    }

    /// What carries this caller's frames (`None` for the floor).
    fn transport(&self) -> Option<&'static str> {
        match self {
            Caller::Floor(..) => None,
            Caller::Blocking(c) => c.transport(),
            #[cfg(feature = "tokio")]
            Caller::Tokio(_, c) => c.transport(),
        }
    }

    /// `n` calls; with `lat`, each one's latency in µs is pushed to it. Async callers run the
    /// whole loop in one `block_on`, as an async program's loop would.
    fn repeat(&mut self, payload: &[u8], n: usize, mut lat: Option<&mut Vec<f64>>) {
        let mut record = |t0: Instant| {
            if let Some(l) = lat.as_deref_mut() {
                l.push(t0.elapsed().as_nanos() as f64 / 1000.0);
            }
        };
        match self {
            Caller::Floor(c) => {
                for _ in 0..n {
                    let t0 = Instant::now();
                    assert_eq!(c.call(payload), payload.len());
                    record(t0);
                }
            }
            Caller::Blocking(c) => {
                for _ in 0..n {
                    let t0 = Instant::now();
                    assert_eq!(c.request(payload).unwrap().len(), payload.len());
                    record(t0);
                }
            }
            #[cfg(feature = "tokio")]
            Caller::Tokio(rt, c) => rt.block_on(async {
                for _ in 0..n {
                    let t0 = Instant::now();
                    assert_eq!(c.request(payload).await.unwrap().len(), payload.len());
                    record(t0);
                }
            }),
        }
    }

    /// Calls until `stop`; returns how many.
    fn until(&mut self, payload: &[u8], stop: &AtomicBool) -> u64 {
        let mut n = 0;
        match self {
            Caller::Floor(c) => {
                while !stop.load(Ordering::Relaxed) {
                    c.call(payload);
                    n += 1;
                }
            }
            Caller::Blocking(c) => {
                while !stop.load(Ordering::Relaxed) {
                    c.request(payload).unwrap();
                    n += 1;
                }
            }
            #[cfg(feature = "tokio")]
            Caller::Tokio(rt, c) => rt.block_on(async {
                while !stop.load(Ordering::Relaxed) {
                    c.request(payload).await.unwrap();
                    n += 1;
                }
            }),
        }
        n
    }
}

/// Body of a `--client` process (for the traced reports): connect, `n` requests, exit;
/// `depth` > 1 (tokio callers): that many tasks share the `n` requests over one connection.
fn client_proc(system: System, dir: &Path, n: usize, size: usize, depth: usize) {
    let mut c = Caller::connect(system, dir);
    if system.shm {
        assert_eq!(c.transport(), Some("shm"), "{} fell back to the socket", system.label());
    }
    let payload = vec![0xa5u8; size];
    match &c {
        #[cfg(feature = "tokio")]
        Caller::Tokio(rt, client) if depth > 1 => rt.block_on(async {
            let payload = std::sync::Arc::new(payload);
            let mut tasks = tokio::task::JoinSet::new();
            for t in 0..depth {
                let (c, payload) = (client.clone(), payload.clone());
                let share = n / depth + usize::from(t < n % depth);
                tasks.spawn(async move {
                    for _ in 0..share {
                        assert_eq!(c.request(&payload).await.unwrap().len(), payload.len());
                    }
                });
            }
            while let Some(r) = tasks.join_next().await {
                r.unwrap();
            }
        }),
        _ => {
            assert_eq!(depth, 1, "only tokio callers keep requests in flight");
            c.repeat(&payload, n, None);
        }
    }
}

// ---------------------------------------------------------------- scenarios

#[derive(Default, Clone, Copy)]
struct Latency {
    p50: f64,
    p99: f64,
    p999: f64,
}

fn quantile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn latency_run(system: System, dir: &Path, size: usize, n: usize) -> Latency {
    let mut c = Caller::connect(system, dir);
    if system.shm {
        assert_eq!(c.transport(), Some("shm"), "{} is not on shared memory", system.label());
    }
    let payload = vec![0xa5u8; size];
    c.repeat(&payload, (n / 10).max(50), None);
    let mut samples = Vec::with_capacity(n);
    c.repeat(&payload, n, Some(&mut samples));
    samples.sort_by(f64::total_cmp);
    Latency { p50: quantile(&samples, 0.50), p99: quantile(&samples, 0.99), p999: quantile(&samples, 0.999) }
}

/// Requests per second with `clients` threads, each with its own connection, for `d`.
fn throughput_run(system: System, dir: &Path, clients: usize, size: usize, d: Duration) -> f64 {
    let stop = AtomicBool::new(false);
    let total = AtomicU64::new(0);
    let payload = vec![1u8; size];
    let callers: Vec<Caller> = (0..clients).map(|_| Caller::connect(system, dir)).collect();
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for mut c in callers {
            let (stop, total, payload) = (&stop, &total, &payload);
            s.spawn(move || {
                let n = c.until(payload, stop);
                total.fetch_add(n, Ordering::Relaxed);
            });
        }
        std::thread::sleep(d);
        stop.store(true, Ordering::Relaxed);
    });
    total.load(Ordering::Relaxed) as f64 / t0.elapsed().as_secs_f64()
}

/// Requests per second over one tokio client connection with `depth` requests in flight.
#[cfg(feature = "tokio")]
fn inflight_run(system: System, dir: &Path, depth: usize, size: usize, d: Duration) -> f64 {
    let Caller::Tokio(rt, client) = Caller::connect(system, dir) else { unreachable!() };
    rt.block_on(async {
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let payload = std::sync::Arc::new(vec![1u8; size]);
        let mut tasks = tokio::task::JoinSet::new();
        let t0 = Instant::now();
        for _ in 0..depth {
            let (c, stop, payload) = (client.clone(), stop.clone(), payload.clone());
            tasks.spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    c.request(&payload).await.unwrap();
                    n += 1;
                }
                n
            });
        }
        tokio::time::sleep(d).await;
        stop.store(true, Ordering::Relaxed);
        let mut total = 0;
        while let Some(n) = tasks.join_next().await {
            total += n.unwrap();
        }
        total as f64 / t0.elapsed().as_secs_f64()
    })
}

/// Items per second of one stream of `n` 32-byte items (the `items` method), read as they come.
fn stream_run(system: System, dir: &Path, n: u64) -> f64 {
    let count = n.to_string();
    match Caller::connect(system, dir) {
        Caller::Blocking(mut c) => {
            let t0 = Instant::now();
            let mut got = 0u64;
            for item in c.stream("items", count.as_bytes()).unwrap() {
                assert_eq!(item.unwrap().len(), ITEM.len());
                got += 1;
            }
            assert_eq!(got, n);
            n as f64 / t0.elapsed().as_secs_f64()
        }
        #[cfg(feature = "tokio")]
        Caller::Tokio(rt, c) => rt.block_on(async {
            use futures_core::Stream;
            let t0 = Instant::now();
            let mut s = c.stream("items", count.as_bytes()).await.unwrap();
            let mut got = 0u64;
            while let Some(item) = std::future::poll_fn(|cx| std::pin::Pin::new(&mut s).poll_next(cx)).await {
                assert_eq!(item.unwrap().len(), ITEM.len());
                got += 1;
            }
            assert_eq!(got, n);
            n as f64 / t0.elapsed().as_secs_f64()
        }),
        Caller::Floor(..) => unreachable!("the floor has no streams"),
    }
}

/// MB/s of payload (one way) echoing `n` 1 MiB payloads back to back.
/// Also counts the page faults per echo of this process (the client) and of the server process
/// `server` (`/proc`'s minor faults): a fresh allocation of a megabyte costs 256 of them.
fn bulk_run(system: System, dir: &Path, n: usize, server: u32) -> (f64, f64, f64) {
    let mut c = Caller::connect(system, dir);
    let payload = vec![3u8; 1 << 20];
    c.repeat(&payload, 2, None);
    let (c0, s0) = (minor_faults("self"), minor_faults(&server.to_string()));
    let t0 = Instant::now();
    c.repeat(&payload, n, None);
    let mbps = n as f64 * (1 << 20) as f64 / t0.elapsed().as_secs_f64() / 1e6;
    let (c1, s1) = (minor_faults("self"), minor_faults(&server.to_string()));
    (mbps, (c1 - c0) as f64 / n as f64, (s1 - s0) as f64 / n as f64)
}

/// Minor page faults of process `pid` (or `self`) so far: `/proc/PID/stat`'s 10th field.
fn minor_faults(pid: &str) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // After the command name (in parentheses, which may hold spaces): state, ppid, pgrp,
    // session, tty, tpgid, flags, minflt.
    stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(7)?.parse().ok()).unwrap_or(0)
}

/// Start-to-exit times (ms) of `n` runs of `cmd`.
fn spawn_times(cmd: &mut Command, n: usize) -> Vec<f64> {
    (0..n)
        .map(|_| {
            let t0 = Instant::now();
            let out = cmd.output().unwrap();
            let ms = t0.elapsed().as_secs_f64() * 1e3;
            assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
            ms
        })
        .collect()
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// CPU time (user + system) a process used so far, in clock ticks (`/proc/<pid>/stat`).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command name (which may hold spaces, inside parentheses).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest.split_whitespace().map(|v| v.parse().unwrap_or(0)).collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name and state.
    f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0)
}

/// `ticks` of CPU time over `window`, as a percentage of one CPU.
fn percent_of_cpu(ticks: u64, window: Duration) -> f64 {
    let hz = rustix::param::clock_ticks_per_second() as f64;
    ticks as f64 / hz / window.as_secs_f64() * 100.0
}

/// This thread's CPU time so far.
fn thread_cpu() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

/// Sequential 32 B requests for `d`: CPU µs per request of the client (this thread) and of the
/// server process.
fn cpu_per_request(system: System, dir: &Path, server_pid: u32, d: Duration) -> (f64, f64) {
    let mut c = Caller::connect(system, dir);
    let payload = [5u8; 32];
    c.repeat(&payload, 200, None);
    let stop = AtomicBool::new(false);
    let (c0, s0) = (thread_cpu(), cpu_ticks(server_pid));
    let n = std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(d);
            stop.store(true, Ordering::Relaxed);
        });
        c.until(&payload, &stop)
    });
    let (c1, s1) = (thread_cpu(), cpu_ticks(server_pid));
    let hz = rustix::param::clock_ticks_per_second() as f64;
    let client = (c1 - c0).as_secs_f64() * 1e6 / n as f64;
    let server = (s1 - s0) as f64 / hz * 1e6 / n as f64;
    (client, server)
}

/// A `/proc/PID/status` field in KiB: `VmRSS` (resident, shared file pages included) or
/// `RssAnon` (the process's own memory).
fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// The release `microcs` binary: `--microcs`, `$MICROCS_BIN`, or next to this bench's directory
/// (`target/release/deps/e2e-…` → `target/release/microcs`).
fn microcs_bin(opts: &Opts) -> Option<PathBuf> {
    let guess = std::env::current_exe().ok()?.parent()?.parent()?.join("microcs");
    let path =
        opts.microcs.clone().or_else(|| std::env::var_os("MICROCS_BIN").map(PathBuf::from)).unwrap_or(guess);
    path.is_file().then_some(path)
}

/// Per-run values of one figure for each system, and how to summarise them.
struct Series {
    systems: Vec<System>,
    /// `runs[r][i]`: run r, system i.
    runs: Vec<Vec<f64>>,
}

impl Series {
    fn measure(systems: Vec<System>, runs: usize, mut f: impl FnMut(System) -> f64) -> Series {
        let runs = (0..runs).map(|_| systems.iter().map(|&s| f(s)).collect()).collect();
        Series { systems, runs }
    }
    fn median(&self, i: usize) -> f64 {
        median(&self.runs.iter().map(|r| r[i]).collect::<Vec<_>>())
    }
    /// Median, min and max over the runs of system i's value divided by the floor's value of
    /// the same run (`floor` gives it from the run).
    fn ratio(&self, i: usize, floor: impl Fn(usize) -> f64) -> (f64, f64, f64) {
        let r: Vec<f64> = self.runs.iter().enumerate().map(|(k, run)| run[i] / floor(k)).collect();
        (median(&r), r.iter().copied().fold(f64::INFINITY, f64::min), r.iter().copied().fold(0.0, f64::max))
    }
}

fn run_placement(opts: &Opts, placement: Placement) -> Value {
    let (server_cpu, client_cpu) = placement.cpus();
    pin(client_cpu);
    let dir = private_dir(placement.label());
    let servers: Vec<(ServerKind, ServerProc)> =
        ServerKind::all().iter().map(|&k| (k, ServerProc::start(k, &dir, server_cpu))).collect();
    let (n_lat, n_big, dur, n_spawn) = if opts.quick {
        (200, 3, Duration::from_millis(100), 3)
    } else {
        (20_000, 1000, Duration::from_secs(2), 100)
    };
    let runs = opts.runs;
    println!(
        "\n## placement: {} (server CPU {server_cpu}, client CPU {client_cpu}), {runs} run(s), medians\n",
        placement.label()
    );
    let mut json = Vec::new();
    let ratio_json = |(r, lo, hi): (f64, f64, f64)| json!({"ratio": r, "ratio_min": lo, "ratio_max": hi});

    // Latency, 32 B, every pair. Each run measures p50, p99 and p99.9 together.
    if opts.wants("latency") {
        let mut systems = System::with_mixed();
        systems.extend(System::over_shm(&systems));
        systems.insert(1, System::FLOOR_EPOLL);
        let lat: Vec<Vec<Latency>> =
            (0..runs).map(|_| systems.iter().map(|&s| latency_run(s, &dir, 32, n_lat)).collect()).collect();
        println!("| 32 B round trip | p50 µs | p99 µs | p99.9 µs | p50 / floor | p99 / floor |");
        println!("|---|---|---|---|---|---|");
        let pick = |f: fn(&Latency) -> f64| Series {
            systems: systems.clone(),
            runs: lat.iter().map(|run| run.iter().map(f).collect()).collect(),
        };
        let (p50, p99, p999) = (pick(|l| l.p50), pick(|l| l.p99), pick(|l| l.p999));
        for (i, s) in systems.iter().enumerate() {
            let r50 = p50.ratio(i, |k| p50.runs[k][0]);
            let r99 = p99.ratio(i, |k| p99.runs[k][0]);
            println!(
                "| {} | {:.1} | {:.1} | {:.1} | {:.2}× | {:.2}× |",
                s.label(),
                p50.median(i),
                p99.median(i),
                p999.median(i),
                r50.0,
                r99.0
            );
            let mut row = json!({
                "scenario": "latency_32", "system": s.label(),
                "p50_us": p50.median(i), "p99_us": p99.median(i), "p999_us": p999.median(i),
                "p99_ratio": r99.0, "p999_ratio": p999.ratio(i, |k| p999.runs[k][0]).0,
                "p50_runs": p50.runs.iter().map(|r| r[i]).collect::<Vec<_>>(),
            });
            merge(&mut row, ratio_json(r50));
            json.push(row);
        }
    }

    // Throughput: 1 client and 4 concurrent clients, 32 B.
    for clients in [1usize, 4].into_iter().filter(|_| opts.wants("throughput")) {
        let mut systems = System::main();
        systems.extend(System::over_shm(&systems));
        systems.insert(1, System::FLOOR_EPOLL);
        let t = Series::measure(systems, runs, |s| throughput_run(s, &dir, clients, 32, dur));
        println!("\n| {clients} client(s), 32 B | requests/s | / floor |");
        println!("|---|---|---|");
        for (i, s) in t.systems.iter().enumerate() {
            let r = t.ratio(i, |k| t.runs[k][0]);
            println!("| {} | {:.0} | {:.2}× |", s.label(), t.median(i), r.0);
            let mut row =
                json!({"scenario": format!("throughput_{clients}"), "system": s.label(), "rps": t.median(i)});
            merge(&mut row, ratio_json(r));
            json.push(row);
        }
    }

    // One connection, many requests in flight (the tokio client multiplexes), against the
    // floor's one-client sequential rate, measured again in each run.
    #[cfg(feature = "tokio")]
    if opts.wants("inflight") {
        let t = Series::measure(
            vec![
                System::FLOOR,
                System::TOKIO,
                System::new(ServerKind::Tokio, ServerKind::Blocking),
                System::TOKIO.shm(),
                System::new(ServerKind::Tokio, ServerKind::Blocking).shm(),
            ],
            runs,
            |s| match s.client {
                ServerKind::Floor => throughput_run(s, &dir, 1, 32, dur),
                _ => inflight_run(s, &dir, DEPTH, 32, dur),
            },
        );
        println!("\n| one connection, {DEPTH} in flight, 32 B | requests/s | / floor's 1-client rate |");
        println!("|---|---|---|");
        println!("| floor, 1 client sequential | {:.0} | 1.00× |", t.median(0));
        for (i, s) in t.systems.iter().enumerate().skip(1) {
            let r = t.ratio(i, |k| t.runs[k][0]);
            println!("| {} | {:.0} | {:.2}× |", s.label(), t.median(i), r.0);
            let mut row =
                json!({"scenario": "inflight", "system": s.label(), "depth": DEPTH, "rps": t.median(i)});
            merge(&mut row, ratio_json(r));
            json.push(row);
        }
    }

    // Streams: items per second of one stream of small items, against the same system's unary
    // rate (one client, sequential calls) in the same run.
    if opts.wants("stream") {
        let n = if opts.quick { 2_000 } else { 100_000 };
        let systems: Vec<System> = System::main().into_iter().skip(1).collect();
        // Each system twice in a row: first its unary rate, then its stream.
        let mut turn = 0usize;
        let t = Series::measure(systems.iter().flat_map(|&s| [s, s]).collect(), runs, |s| {
            turn += 1;
            if turn % 2 == 0 { stream_run(s, &dir, n) } else { throughput_run(s, &dir, 1, 32, dur) }
        });
        println!("\n| one stream of {n} items of 32 B | items/s | / the same system's unary calls/s |");
        println!("|---|---|---|");
        for (k, s) in systems.iter().enumerate() {
            let (unary, stream) = (2 * k, 2 * k + 1);
            let r = t.ratio(stream, |run| t.runs[run][unary]);
            println!(
                "| {} | {:.0} | {:.2}× ({:.0} calls/s) |",
                s.label(),
                t.median(stream),
                r.0,
                t.median(unary)
            );
            let mut row = json!({"scenario": "stream", "system": s.label(), "items_per_s": t.median(stream), "unary_rps": t.median(unary)});
            merge(&mut row, ratio_json(r));
            json.push(row);
        }
    }

    // 1 MiB echo.
    if opts.wants("bulk") {
        // Also with the system's default send buffers: what the 1 MiB `send_buffer` default adds.
        let mut systems = System::with_mixed();
        systems.extend(System::main().into_iter().skip(1).map(System::kbuf));
        systems.extend(System::over_shm(&System::main()));
        let pid = |k: ServerKind| servers.iter().find(|(kind, _)| *kind == k).map_or(0, |(_, p)| p.pid());
        let mut faults: Vec<(String, f64, f64)> = Vec::new();
        let t = Series::measure(systems, runs, |s| {
            let (mbps, client, server) = bulk_run(s, &dir, n_big, pid(s.server));
            faults.push((s.label(), client, server));
            mbps
        });
        let faults_of = |label: &str, side: fn(&(String, f64, f64)) -> f64| {
            median(&faults.iter().filter(|f| f.0 == label).map(side).collect::<Vec<_>>())
        };
        println!(
            "\n| 1 MiB echo | MB/s (payload, one way) | / floor | page faults per echo, client / server |"
        );
        println!("|---|---|---|---|");
        for (i, s) in t.systems.iter().enumerate() {
            let r = t.ratio(i, |k| t.runs[k][0]);
            let (fc, fs) = (faults_of(&s.label(), |f| f.1), faults_of(&s.label(), |f| f.2));
            println!("| {} | {:.0} | {:.2}× | {fc:.1} / {fs:.1} |", s.label(), t.median(i), r.0);
            let mut row = json!({"scenario": "echo_1mib", "system": s.label(), "mbps": t.median(i),
                "faults_client": fc, "faults_server": fs});
            merge(&mut row, ratio_json(r));
            json.push(row);
        }
    }

    // Memory of each microcs server, in a fresh process (the runs above left the allocator of
    // the others with freed memory that new connections would reuse): idle, then with idle
    // connections, each of which has made one request (so its buffers exist).
    if opts.wants("memory") {
        println!(
            "\n| server memory | idle RSS KiB (own: anonymous) | per idle connection KiB |\n|---|---|---|"
        );
    }
    let kinds = ServerKind::all().iter().filter(|&&k| k != ServerKind::Floor && opts.wants("memory"));
    for (&kind, shm) in kinds.flat_map(|k| [(k, false), (k, true)]) {
        let mem_dir = private_dir(&format!("mem-{}", placement.label()));
        let proc_ = ServerProc::start(kind, &mem_dir, server_cpu);
        std::thread::sleep(Duration::from_millis(200));
        let (idle, anon) = (status_kib(proc_.pid(), "VmRSS"), status_kib(proc_.pid(), "RssAnon"));
        let mut conns: Vec<Client> = (0..IDLE_CONNS)
            .map(|_| {
                Client::builder(service_name(System::new(ServerKind::Blocking, kind)))
                    .runtime_dir(&mem_dir)
                    .shared_memory(shm)
                    .connect()
                    .unwrap()
            })
            .collect();
        for c in &mut conns {
            c.request(b"x").unwrap();
        }
        std::thread::sleep(Duration::from_millis(200));
        let with = status_kib(proc_.pid(), "VmRSS");
        // The server's CPU while the connections sit idle (shared memory must park, not spin).
        let window = if opts.quick { Duration::from_millis(500) } else { Duration::from_secs(5) };
        let t0 = cpu_ticks(proc_.pid());
        std::thread::sleep(window);
        let idle_cpu = percent_of_cpu(cpu_ticks(proc_.pid()) - t0, window);
        drop(conns);
        drop(proc_);
        let _ = std::fs::remove_dir_all(&mem_dir);
        let per = with.saturating_sub(idle) as f64 / IDLE_CONNS as f64;
        let label = if shm { format!("{}+shm", kind.label()) } else { kind.label().to_owned() };
        println!(
            "| {label} | {idle} (own {anon}) | {per:.1} (server CPU with {IDLE_CONNS} idle: {idle_cpu:.2} % of one CPU) |"
        );
        json.push(json!({
            "scenario": "memory", "system": label, "idle_kib": idle, "idle_anon_kib": anon, "per_conn_kib": per,
            "idle_conns": IDLE_CONNS, "idle_cpu_percent": idle_cpu,
        }));
    }

    // An idle connected pair: the CPU each process uses while nothing is asked (shared memory
    // must sleep in poll, not spin). The client is a process of its own that made one request.
    if opts.wants("idle") {
        let window = if opts.quick { Duration::from_secs(1) } else { Duration::from_secs(10) };
        println!(
            "\n| idle connected pair, {} s | client CPU % | server CPU % |\n|---|---|---|",
            window.as_secs()
        );
        let mut systems = System::main();
        systems.retain(|s| *s != System::FLOOR);
        systems.extend(System::over_shm(&systems));
        for system in systems {
            let server = &servers.iter().find(|(k, _)| *k == system.server).unwrap().1;
            let mut cmd = Command::new("taskset");
            cmd.args(["-c", &client_cpu.to_string()])
                .arg(std::env::current_exe().unwrap())
                .args(["--idle-client", &system.label()])
                .arg(&dir)
                .env("MICROCS_RUNTIME_DIR", &dir);
            let mut child = spawn_ready(&mut cmd, &format!("idle client {}", system.label()));
            std::thread::sleep(Duration::from_millis(200));
            let (c0, s0) = (cpu_ticks(child.id()), cpu_ticks(server.pid()));
            std::thread::sleep(window);
            let (c1, s1) = (cpu_ticks(child.id()), cpu_ticks(server.pid()));
            drop(child.stdin.take());
            let _ = child.wait();
            let (client_cpu_pct, server_cpu_pct) =
                (percent_of_cpu(c1 - c0, window), percent_of_cpu(s1 - s0, window));
            println!("| {} | {client_cpu_pct:.2} | {server_cpu_pct:.2} |", system.label());
            json.push(json!({
                "scenario": "idle", "system": system.label(), "seconds": window.as_secs_f64(),
                "client_cpu_percent": client_cpu_pct, "server_cpu_percent": server_cpu_pct,
            }));
        }
    }

    // CPU time per request under sequential load, client and server together.
    if opts.wants("cpu") {
        println!(
            "\n| sequential 32 B requests | client CPU µs / request | server CPU µs / request | total |\n|---|---|---|---|"
        );
        let mut systems = System::main();
        systems.extend(System::over_shm(&systems));
        for system in systems {
            let (mut client_us, mut server_us) = (Vec::new(), Vec::new());
            for _ in 0..runs {
                let server = &servers.iter().find(|(k, _)| *k == system.server).unwrap().1;
                let (c, s) = cpu_per_request(system, &dir, server.pid(), dur);
                client_us.push(c);
                server_us.push(s);
            }
            let (c, s) = (median(&client_us), median(&server_us));
            println!("| {} | {c:.2} | {s:.2} | {:.2} |", system.label(), c + s);
            json.push(json!({
                "scenario": "cpu_per_request", "system": system.label(),
                "client_us": c, "server_us": s, "total_us": c + s,
            }));
        }
    }

    // `microcs call` one-shot: process start to exit, against the blocking server; a process
    // that does nothing (`true`) is the baseline of the same run.
    match microcs_bin(opts).filter(|_| opts.wants("oneshot")) {
        Some(bin) => {
            let mut call = Command::new(&bin);
            call.args(["call", BLOCKING_NAME, "hello"]).env("MICROCS_RUNTIME_DIR", &dir);
            let mut noop = Command::new("true");
            let (mut a, mut b) = (Vec::new(), Vec::new());
            for _ in 0..runs {
                a.push(median(&spawn_times(&mut call, n_spawn)));
                b.push(median(&spawn_times(&mut noop, n_spawn)));
            }
            let (call_ms, true_ms) = (median(&a), median(&b));
            println!(
                "\n| one-shot process | median ms |\n|---|---|\n| `true` | {true_ms:.2} |\n| `microcs call` | {call_ms:.2} |"
            );
            json.push(json!({"scenario": "oneshot", "system": "microcs call", "median_ms": call_ms, "true_ms": true_ms}));
        }
        None if opts.wants("oneshot") => {
            eprintln!("`microcs call` not measured: no release binary (cargo build --release -p microcs-cli)")
        }
        None => {}
    }

    drop(servers);
    let _ = std::fs::remove_dir_all(&dir);
    json!({
        "placement": placement.label(), "server_cpu": server_cpu, "client_cpu": client_cpu,
        "runs": runs, "latency_samples": n_lat, "seconds_per_throughput_run": dur.as_secs_f64(),
        "results": json,
    })
}

fn merge(into: &mut Value, from: Value) {
    if let (Value::Object(a), Value::Object(b)) = (into, from) {
        a.extend(b);
    }
}

// ---------------------------------------------------------------- allocations

/// Allocations per request on each side, client and server in this process: the handler reads
/// its own thread's counter (blocking: the connection thread; tokio: the server runtime's one
/// thread), the client its own.
fn alloc_report(opts: &Opts) -> Value {
    static SERVER_ALLOCS: AtomicU64 = AtomicU64::new(0);
    fn counted(r: Request) -> Result<Vec<u8>, RemoteError> {
        SERVER_ALLOCS.store(thread_allocs(), Ordering::SeqCst);
        Ok(r.into_payload())
    }
    let n: usize = if opts.quick { 100 } else { 10_000 };
    let dir = private_dir("allocs");
    let h = Server::builder(BLOCKING_NAME)
        .runtime_dir(&dir)
        .max_frame(MAX_FRAME)
        .bind()
        .unwrap()
        .spawn(counted)
        .unwrap();
    #[cfg(feature = "tokio")]
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    #[cfg(feature = "tokio")]
    let tokio_server = {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let dir = dir.clone();
        let t = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let h = microcs::tokio::Server::builder(TOKIO_NAME)
                    .runtime_dir(&dir)
                    .max_frame(MAX_FRAME)
                    .bind()
                    .await
                    .unwrap()
                    .spawn(|r: Request| async move { counted(r) })
                    .unwrap();
                ready_tx.send(()).unwrap();
                let _ = stop_rx.await;
                h.shutdown().await;
            });
        });
        ready_rx.recv().unwrap();
        t
    };
    let mut out = Vec::new();
    let mut systems = System::main();
    systems.retain(|s| *s != System::FLOOR);
    #[cfg(feature = "tokio")]
    systems.extend([
        System::new(ServerKind::Blocking, ServerKind::Tokio),
        System::new(ServerKind::Tokio, ServerKind::Blocking),
    ]);
    println!("| system | payload | client allocations / request | server allocations / request |");
    println!("|---|---|---|---|");
    for size in [32usize, 64 * 1024, 1 << 20] {
        let n = if size > 1024 { n / 10 } else { n };
        for &system in &systems {
            let payload = vec![7u8; size];
            // In a thread of its own, so that the count is this client's alone.
            let (client, server) = std::thread::scope(|s| {
                s.spawn(|| {
                    let mut c = Caller::connect(system, &dir);
                    c.repeat(&payload, 100, None);
                    let (c0, s0) = (thread_allocs(), SERVER_ALLOCS.load(Ordering::SeqCst));
                    c.repeat(&payload, n, None);
                    let (c1, s1) = (thread_allocs(), SERVER_ALLOCS.load(Ordering::SeqCst));
                    ((c1 - c0) as f64 / n as f64, (s1 - s0) as f64 / n as f64)
                })
                .join()
                .unwrap()
            });
            println!("| {} | {size} | {client:.2} | {server:.2} |", system.label());
            out.push(json!({"system": system.label(), "size": size, "client": client, "server": server}));
        }
    }
    h.shutdown();
    #[cfg(feature = "tokio")]
    {
        let _ = stop_tx.send(());
        tokio_server.join().unwrap();
    }
    let _ = std::fs::remove_dir_all(&dir);
    Value::Array(out)
}
