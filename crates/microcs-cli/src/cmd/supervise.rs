//! `microcs serve NAME --instances N ...`: N worker processes, each `microcs serve NAME --shared
//! ...`, started, watched and restarted by this one.
//!
//! A worker that exits with status 0 stopped on purpose (its idle timeout, or `microcs stop`,
//! which sends SIGTERM to each instance) and is not restarted; when all have, the supervisor
//! exits 0 too. Any other exit, or a signal, is a failure: restarted, with backoff.
//!
//! The supervisor serves nothing itself and holds no lock: each worker owns its own instance
//! slot, so a worker that dies, however it dies, loses only its slot (reclaimed by the next
//! one). Workers run in process groups of their own, so a Ctrl-C at the terminal reaches the
//! supervisor only, which then stops them in order (SIGTERM: each drains its requests); and
//! each worker watches its parent, so that a supervisor killed with SIGKILL does not leave
//! orphans serving on.

use std::ffi::OsString;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal};
use serde::Serialize;

use crate::cli::ServeArgs;
use crate::error::{CliError, CliResult};
use crate::output::{Ctx, print_json};
use crate::signals;

/// The environment variable a worker finds its supervisor's pid in; while its parent is
/// another process (the supervisor died), the worker stops.
pub const ENV_SUPERVISOR: &str = "MICROCS_SUPERVISOR_PID";

/// First delay before restarting a worker that exited; doubled at each quick exit, up to
/// [`MAX_BACKOFF`], and reset once a worker has run for [`STABLE`].
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
const STABLE: Duration = Duration::from_secs(10);
/// How often the supervisor looks at its workers.
const TICK: Duration = Duration::from_millis(50);

/// One worker slot of the supervisor (not the registry's instance slot: a restarted worker
/// may get another one).
struct Worker {
    child: Option<Child>,
    started: Instant,
    backoff: Duration,
    /// When to start it again, after it exited.
    restart_at: Option<Instant>,
    /// Who it was and how it ended, for the restart event.
    last_exit: Option<(u32, String)>,
    /// It exited with status 0 (idle, or stopped on purpose): not restarted.
    finished: bool,
}

/// `{"event":"ready",...}` with `--json`, once every worker serves.
#[derive(Serialize)]
struct Ready<'a> {
    event: &'static str,
    name: &'a str,
    pid: u32,
    instances: u32,
    workers: Vec<u32>,
    runtime_dir: String,
}

/// `{"event":"restarted",...}` with `--json`, each time a worker is started again.
#[derive(Serialize)]
struct Restarted<'a> {
    event: &'static str,
    name: &'a str,
    old_pid: u32,
    status: String,
    pid: u32,
}

/// `{"event":"stopped",...}` with `--json`, after all workers are gone.
#[derive(Serialize)]
struct Stopped<'a> {
    event: &'static str,
    name: &'a str,
}

/// The worker's command line: this program with our arguments, `--instances N` replaced by
/// `--shared` (only before a bare `--`: what follows is CMD's own).
fn worker_args() -> Vec<OsString> {
    let mut out = Vec::new();
    let mut args = std::env::args_os().skip(1);
    while let Some(a) = args.next() {
        if a == "--" {
            out.push(a);
            out.extend(args.by_ref());
            break;
        }
        if a == "--instances" {
            args.next();
            out.push("--shared".into());
        } else if a.to_str().is_some_and(|s| s.starts_with("--instances=")) {
            out.push("--shared".into());
        } else {
            out.push(a);
        }
    }
    out
}

fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(s)) => format!("signal {s}"),
        _ => status.to_string(),
    }
}

fn signal(pid: u32, sig: Signal) {
    if let Some(p) = i32::try_from(pid).ok().and_then(Pid::from_raw) {
        let _ = rustix::process::kill_process(p, sig);
    }
}

/// Runs `microcs serve NAME --instances N ...`.
pub fn run(ctx: &Ctx, args: &ServeArgs, n: u32) -> CliResult {
    let name = args.name.as_str();
    microcs::Name::new(name)?;
    let exe = std::env::current_exe()
        .map_err(|e| CliError::local(format!("cannot find this program to start workers: {e}")))?;
    let argv = worker_args();
    let pids = Arc::new(Mutex::new(Vec::<u32>::new()));
    let caught = Arc::new(AtomicU32::new(0));
    {
        let (pids, caught, name) = (pids.clone(), caught.clone(), name.to_owned());
        signals::on_terminate(move |sig, k| {
            caught.store(k, Ordering::SeqCst);
            if k == 1 {
                note!(
                    "microcs: {} received: stopping the instances of '{name}' (running requests may \
                     finish; Ctrl-C again to kill them)",
                    sig.name()
                );
            } else {
                for &p in pids.lock().unwrap_or_else(|p| p.into_inner()).iter() {
                    signal(p, Signal::KILL);
                }
                note!("microcs: killed the instances of '{name}'; exiting");
                std::process::exit(130);
            }
        })?;
    }
    let spawn = || -> CliResult<Child> {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new(&exe);
        cmd.args(&argv)
            .env("MICROCS_RUNTIME_DIR", &ctx.dir)
            .env(ENV_SUPERVISOR, std::process::id().to_string())
            .stdin(Stdio::null())
            // Their JSON events would be mixed with ours; their notes go to stderr as usual.
            .stdout(if ctx.json { Stdio::null() } else { Stdio::inherit() })
            .process_group(0);
        let child = cmd.spawn().map_err(|e| CliError::local(format!("cannot start a worker: {e}")))?;
        pids.lock().unwrap_or_else(|p| p.into_inner()).push(child.id());
        Ok(child)
    };
    let mut workers = Vec::with_capacity(n as usize);
    for _ in 0..n {
        workers.push(Worker {
            child: Some(spawn()?),
            started: Instant::now(),
            backoff: FIRST_BACKOFF,
            restart_at: None,
            last_exit: None,
            finished: false,
        });
    }
    let mut ready = false;
    while caught.load(Ordering::SeqCst) == 0 && !workers.iter().all(|w| w.finished) {
        std::thread::sleep(TICK);
        for (i, w) in workers.iter_mut().enumerate() {
            if let Some(child) = w.child.as_mut() {
                let Ok(Some(status)) = child.try_wait() else { continue };
                let old = child.id();
                w.child = None;
                pids.lock().unwrap_or_else(|p| p.into_inner()).retain(|&p| p != old);
                if caught.load(Ordering::SeqCst) != 0 {
                    continue;
                }
                if !ready && status.code() == Some(i32::from(crate::error::EXIT_LOCAL)) {
                    // It could not even start (the name is owned exclusively, a bad option...):
                    // the others cannot either; its message is above.
                    stop_all(&mut workers, args.grace);
                    return Err(CliError::local(format!(
                        "a worker of '{name}' could not start ({}); see its message above",
                        describe(status)
                    )));
                }
                if status.success() {
                    // It stopped cleanly (its idle timeout, or `microcs stop` sent it SIGTERM):
                    // not a failure, not restarted. The supervisor ends with the last one.
                    note!(
                        "microcs: instance worker {i} of '{name}' (pid {old}) stopped cleanly; not restarting it"
                    );
                    w.finished = true;
                    continue;
                }
                if w.started.elapsed() >= STABLE {
                    w.backoff = FIRST_BACKOFF;
                }
                note!(
                    "microcs: instance worker {i} of '{name}' (pid {old}) ended with {}; restarting it in {:?}",
                    describe(status),
                    w.backoff
                );
                w.restart_at = Some(Instant::now() + w.backoff);
                w.backoff = (w.backoff * 2).min(MAX_BACKOFF);
                w.last_exit = Some((old, describe(status)));
            } else if w.restart_at.is_some_and(|t| Instant::now() >= t) {
                w.restart_at = None;
                let child = spawn()?;
                let (old, status) = w.last_exit.take().unwrap_or_default();
                note!("microcs: restarted instance worker {i} of '{name}' as pid {}", child.id());
                if ctx.json {
                    let _ = print_json(&Restarted {
                        event: "restarted",
                        name,
                        old_pid: old,
                        status,
                        pid: child.id(),
                    });
                }
                w.child = Some(child);
                w.started = Instant::now();
            }
        }
        if !ready {
            let ours = pids.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let serving = microcs::list_in(&ctx.dir)
                .unwrap_or_default()
                .into_iter()
                .filter(|s| s.name.as_str() == name && ours.contains(&s.pid))
                .count();
            if serving == n as usize {
                ready = true;
                note!(
                    "microcs: '{name}' is served by {n} instance{} (pids {}); Ctrl-C to stop them all.",
                    if n == 1 { "" } else { "s" },
                    ours.iter().map(u32::to_string).collect::<Vec<_>>().join(", ")
                );
                if ctx.json {
                    print_json(&Ready {
                        event: "ready",
                        name,
                        pid: std::process::id(),
                        instances: n,
                        workers: ours,
                        runtime_dir: ctx.dir.display().to_string(),
                    })?;
                }
            }
        }
    }
    stop_all(&mut workers, args.grace);
    note!("microcs: stopped the instances of '{name}'; the name is free");
    if ctx.json {
        let _ = print_json(&Stopped { event: "stopped", name });
    }
    Ok(())
}

/// SIGTERM to every worker (each drains its requests and frees its slot), then waits for them
/// all, up to the grace period and 5 s more; what is left then is killed.
fn stop_all(workers: &mut [Worker], grace: Duration) {
    for c in workers.iter().filter_map(|w| w.child.as_ref()) {
        signal(c.id(), Signal::TERM);
    }
    let give_up = Instant::now() + grace + Duration::from_secs(5);
    for w in workers.iter_mut() {
        let Some(child) = w.child.as_mut() else { continue };
        loop {
            match child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() >= give_up => {
                    note!("microcs: instance worker pid {} did not stop in time; killing it", child.id());
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(TICK),
            }
        }
        w.child = None;
    }
}
