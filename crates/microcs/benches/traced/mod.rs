//! Counting what each process of a system does per request, by running the client and the
//! server process under a tool (`--syscalls`: `strace -c -f`; `--syscalls-perf`: `perf stat` on
//! the system-call tracepoints; `--instructions`: `valgrind --tool=callgrind`), once with no
//! request and once with N, and dividing the difference by N.
//!
//! `perf stat` only counts (the kernel increments a counter at each tracepoint; the traced
//! process is never stopped), so a traced process runs at nearly its own speed and the
//! shared-memory transport's spins still catch their replies: it is the count that holds for the
//! rings. Under strace every system call stops the process, so a peer's spin always runs out.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use serde_json::{Value, json};

#[cfg(feature = "tokio")]
use super::ServerKind;
use super::{Opts, Placement, ServerProc, System, private_dir};

/// The system calls `perf stat` counts by name (tracepoints `syscalls:sys_enter_NAME`): those
/// the transports and runtimes make while requests flow; `raw_syscalls:sys_enter` counts all of
/// them (reported as `total`, and what the named ones leave as `other`).
const PERF_SYSCALLS: &[&str] = &[
    "read",
    "write",
    "readv",
    "writev",
    "recvfrom",
    "recvmsg",
    "sendto",
    "sendmsg",
    "poll",
    "ppoll",
    "epoll_wait",
    "epoll_pwait",
    "epoll_pwait2",
    "futex",
    "sched_yield",
    "clock_nanosleep",
    "nanosleep",
];

/// `syscall -> calls` from an `strace -c` summary.
fn parse_strace(path: &Path) -> BTreeMap<String, u64> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut m = std::collections::BTreeMap::new();
    for line in text.lines() {
        let t: Vec<&str> = line.split_whitespace().collect();
        // "% time  seconds  usecs/call  calls  [errors]  syscall"
        if t.len() < 5 || t[0].parse::<f64>().is_err() || t[t.len() - 1] == "total" {
            continue;
        }
        if let Ok(calls) = t[3].parse::<u64>() {
            *m.entry(t[t.len() - 1].to_owned()).or_insert(0) += calls;
        }
    }
    m
}

/// `syscall -> calls` from `perf stat -x ,` output (`count,unit,event,...` per line); the
/// all-calls tracepoint becomes `total`, the calls not named become `other`.
fn parse_perf(path: &Path) -> BTreeMap<String, u64> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut m = BTreeMap::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split(',').collect();
        let (Some(count), Some(event)) = (f.first().and_then(|c| c.parse::<u64>().ok()), f.get(2)) else {
            continue;
        };
        let name = match event.strip_prefix("syscalls:sys_enter_") {
            Some(name) => name,
            None if *event == "raw_syscalls:sys_enter" => "total",
            None => continue,
        };
        *m.entry(name.to_owned()).or_insert(0) += count;
    }
    let named: u64 = m.iter().filter(|(k, _)| *k != "total").map(|(_, v)| v).sum();
    let other = m.get("total").copied().unwrap_or(0).saturating_sub(named);
    m.insert("other".to_owned(), other);
    m
}

/// What `--syscalls`, `--syscalls-perf` and `--instructions` run the client and server
/// processes under.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Tracer {
    /// `strace -c -f`: system calls by name.
    Strace,
    /// `perf stat` on the system-call tracepoints: counted without stopping the process.
    Perf,
    /// `valgrind --tool=callgrind`: instructions executed in user space (all threads).
    Callgrind,
}

impl Tracer {
    fn prefix(self, out: &Path) -> Vec<String> {
        let out = out.display();
        match self {
            Tracer::Strace => vec!["strace".into(), "-c".into(), "-f".into(), "-o".into(), out.to_string()],
            Tracer::Perf => {
                let events: Vec<String> = std::iter::once("raw_syscalls:sys_enter".to_owned())
                    .chain(PERF_SYSCALLS.iter().map(|n| format!("syscalls:sys_enter_{n}")))
                    .collect();
                let args = ["perf", "stat", "-x", ",", "-e", &events.join(","), "-o", &out.to_string(), "--"];
                args.map(String::from).to_vec()
            }
            Tracer::Callgrind => {
                vec![
                    "valgrind".into(),
                    "-q".into(),
                    "--tool=callgrind".into(),
                    format!("--callgrind-out-file={out}"),
                ]
            }
        }
    }

    fn parse(self, path: &Path) -> BTreeMap<String, u64> {
        match self {
            Tracer::Strace => parse_strace(path),
            Tracer::Perf => parse_perf(path),
            Tracer::Callgrind => {
                let text =
                    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                let ir = text
                    .lines()
                    .find_map(|l| l.strip_prefix("totals:").or_else(|| l.strip_prefix("summary:")))
                    .and_then(|v| v.split_whitespace().next()?.parse().ok())
                    .unwrap_or(0);
                [("instructions".to_owned(), ir)].into()
            }
        }
    }
}

/// Runs each system's client and server processes under `tracer`, once with no request and
/// once with N, and reports the difference per request (so start-up and the handshake drop
/// out). Split placement; `perf` also the others asked for, and the shared-memory pairs.
pub(super) fn traced_report(opts: &Opts, tracer: Tracer) -> Value {
    let (tool, install) = match tracer {
        Tracer::Strace => ("strace", "--syscalls needs strace (apt-get install strace)"),
        Tracer::Perf => ("perf", "--syscalls-perf needs perf (apt-get install linux-perf), as root"),
        Tracer::Callgrind => ("valgrind", "--instructions needs valgrind (apt-get install valgrind)"),
    };
    if Command::new(tool).arg("--version").output().is_err() {
        eprintln!("{install}");
        std::process::exit(2);
    }
    let n: usize = match (opts.quick, tracer) {
        (true, _) => 100,
        (false, Tracer::Strace | Tracer::Perf) => 20_000,
        (false, Tracer::Callgrind) => 5_000,
    };
    let sizes: &[usize] = match tracer {
        Tracer::Strace | Tracer::Perf => &[32, 1 << 20],
        Tracer::Callgrind => &[32],
    };
    #[allow(unused_mut)]
    let mut systems = System::main();
    #[cfg(feature = "tokio")]
    systems.push(System::new(ServerKind::Tokio, ServerKind::Blocking));
    // The shared-memory pairs only under perf: a process stopped at every system call (strace)
    // runs so much slower that its peer's spin always runs out and every wait parks (poll,
    // eventfd read and write: the idle path, not the busy one), and under callgrind the spin
    // loop's instructions would count as work.
    let placements = if tracer == Tracer::Perf {
        systems.extend(System::over_shm(&systems));
        opts.placements.clone()
    } else {
        vec![Placement::Split]
    };
    let dir = private_dir("traced");
    let mut out = Vec::new();
    for &placement in &placements {
        for &size in sizes {
            let n = if size > 1024 { (n / 100).max(1) } else { n };
            for &system in &systems {
                let counts = [0, n].map(|reqs| traced_run(tracer, placement, system, &dir, reqs, size));
                let per = |side: fn(&(_, _)) -> &BTreeMap<String, u64>| {
                    let (base, full) = (side(&counts[0]), side(&counts[1]));
                    let mut m = serde_json::Map::new();
                    for (k, &v) in full {
                        let d = v.saturating_sub(*base.get(k).unwrap_or(&0)) as f64 / n as f64;
                        if d >= 0.0005 || k == "total" {
                            m.insert(k.clone(), json!((d * 1000.0).round() / 1000.0));
                        }
                    }
                    Value::Object(m)
                };
                let (client, server) = (per(|c| &c.0), per(|c| &c.1));
                let label = system.label();
                println!(
                    "{label} {size} B, {}, per request: client {client} server {server}",
                    placement.label()
                );
                out.push(
                    json!({"system": label, "size": size, "requests": n, "placement": placement.label(),
                                "client": client, "server": server}),
                );
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Value::Array(out)
}

/// One traced run of `system` with `reqs` requests of `size` bytes: the counts of the client
/// process and of the server process.
fn traced_run(
    tracer: Tracer,
    placement: Placement,
    system: System,
    dir: &Path,
    reqs: usize,
    size: usize,
) -> (BTreeMap<String, u64>, BTreeMap<String, u64>) {
    let (server_cpu, client_cpu) = placement.cpus();
    let (sf, cf) = (dir.join("server.trace"), dir.join("client.trace"));
    let server = ServerProc::start_with(&tracer.prefix(&sf), system.server, dir, server_cpu);
    let st = Command::new("taskset")
        .args(["-c", &client_cpu.to_string()])
        .args(tracer.prefix(&cf))
        .arg(std::env::current_exe().unwrap())
        .args(["--client", &system.label()])
        .arg(dir)
        .args([reqs.to_string(), size.to_string()])
        .env("MICROCS_RUNTIME_DIR", dir)
        .status()
        .unwrap();
    assert!(st.success());
    drop(server);
    (tracer.parse(&cf), tracer.parse(&sf))
}
