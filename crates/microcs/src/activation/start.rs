//! Starting a service from its definition: one start however many callers race, detached,
//! logged, and the registry as the readiness signal (docs/ACTIVATION.md, "The start").
//!
//! Under an exclusive `flock` on `<runtime dir>/<NAME>.start` (so fifty racing callers start it
//! once: the others wait for the lock, then find the name served), the command is started
//! `instances` times with stdin from `/dev/null` and stdout and stderr appended to
//! `<runtime dir>/<NAME>.log` (a header line per start; moved to `NAME.log.1` once past 1 MiB;
//! never opened through a symlink), in a session of its own, with `MICROCS_RUNTIME_DIR` set to
//! the caller's runtime directory and `MICROCS_IDLE_TIMEOUT` to the idle timeout. The caller
//! waits until the name is served (an exclusive server or one instance listed as ready), at most
//! the start timeout. A command that exits first, or does not register in time (it then gets
//! `SIGTERM`, and `SIGKILL` after [`STOP_GRACE`]), is an [`ErrorKind::StartFailed`] error with
//! the command line, its exit status and the last lines its log got during this start.
//!
//! The start lock file records the start (one JSON line): `starting` with the started pids and
//! until when, then `ready` or `failed` with the error. So callers that waited behind a start
//! that failed get its error rather than running the command once each; and a caller that takes
//! the lock after the starter died (killed mid-start) or stopped waiting (its interrupt check,
//! Ctrl-C in Python) waits for the processes that start left running instead of starting a
//! second copy.
//!
//! A session of its own: the command is run through util-linux `setsid(1)` when it is
//! installed (`/usr/bin/setsid`, `/bin/setsid`), which makes it a session leader without a
//! controlling terminal and execs it in the same process; without it, in a process group of
//! its own (std's safe `process_group(0)`; a direct `setsid(2)` needs `pre_exec`, which is
//! `unsafe`). Either way terminal signals do not reach it. A thread of the caller reaps each
//! started process when it exits (no zombies).

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use rustix::fs::FlockOperation;
use serde::{Deserialize, Serialize};

use super::{Definition, ENV_IDLE_TIMEOUT};
use crate::error::{Error, ErrorKind, Result};
use crate::name::Name;
use crate::registry;

/// Lines of the service's log quoted in a start failure.
const LOG_LINES: usize = 10;
/// A log larger than this when a start begins is moved to `NAME.log.1` (replacing the older).
const MAX_LOG: u64 = 1 << 20;
/// How long a command that did not register in time gets to exit after `SIGTERM`.
pub const STOP_GRACE: Duration = Duration::from_secs(2);
/// Between two looks at the registry or the lock.
const POLL: Duration = Duration::from_millis(5);
/// The prefix of the header line each start writes to the log.
const HEADER: &str = "--- microcs: ";

/// A client's interrupt check, asked every `every` while it waits for a start: `true` ends the
/// wait (not the start, which goes on for the next caller).
pub(crate) struct Interrupt<'a> {
    pub every: Duration,
    pub stop: &'a (dyn Fn() -> bool + Send + Sync),
}

/// Sleeps [`POLL`] and asks the interrupt check when its period has passed.
struct Pause<'a> {
    interrupt: Option<&'a Interrupt<'a>>,
    next: Instant,
    /// The check said to stop.
    interrupted: bool,
}

impl Pause<'_> {
    fn sleep(&mut self, name: &Name) -> Result<()> {
        std::thread::sleep(POLL);
        let Some(i) = self.interrupt else { return Ok(()) };
        if Instant::now() < self.next {
            return Ok(());
        }
        self.next = Instant::now() + i.every;
        if !(i.stop)() {
            return Ok(());
        }
        self.interrupted = true;
        Err(Error::io(
            format_args!(
                "stopped waiting for service '{name}' to start (interrupted); the start goes on, and \
                 the next call waits for it"
            ),
            std::io::Error::from(std::io::ErrorKind::Interrupted),
        ))
    }
}

/// What the start lock file says about the last start.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Record {
    /// `starting`, `ready` or `failed`.
    state: String,
    /// The processes a start in progress started.
    #[serde(default)]
    pids: Vec<u32>,
    /// When the state was written, ms since the epoch.
    at_ms: u64,
    /// Until when a start in progress may take (ms since the epoch).
    #[serde(default)]
    until_ms: u64,
    /// For `failed`: its error message.
    #[serde(default)]
    message: String,
}

fn read_record(mut file: &File) -> Option<Record> {
    let mut text = String::new();
    file.seek(SeekFrom::Start(0)).ok()?;
    file.take(64 * 1024).read_to_string(&mut text).ok()?;
    serde_json::from_str(text.lines().next()?).ok()
}

fn write_record(file: &File, rec: &Record) {
    let mut line = serde_json::to_vec(rec).expect("a record serialises");
    line.push(b'\n');
    let mut w = file;
    let _ = w
        .seek(SeekFrom::Start(0))
        .and_then(|_| w.write_all(&line))
        .and_then(|()| file.set_len(line.len() as u64));
}

fn alive(pid: u32) -> bool {
    i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .is_some_and(|p| !matches!(rustix::process::test_kill_process(p), Err(rustix::io::Errno::SRCH)))
}

/// The log file a started service writes to.
pub fn log_path(dir: &Path, name: &Name) -> PathBuf {
    dir.join(format!("{name}.log"))
}

/// Starts the service of `def` in the runtime directory `dir`, unless it is served already,
/// and waits until it is (at most its start timeout). Exactly one of many callers racing here
/// starts it.
///
/// # Errors
///
/// [`ErrorKind::StartFailed`] when the command cannot be started, exits before it registers,
/// or does not register within the start timeout (it is killed then); the message has the
/// command line, its exit status and the last lines of its log. [`ErrorKind::PermissionDenied`]
/// / [`ErrorKind::Io`] for the runtime directory or the log file.
pub fn start(dir: &Path, def: &Definition) -> Result<()> {
    start_with(dir, def, None)
}

/// [`start`], with a client's interrupt check ending the wait.
pub(crate) fn start_with(dir: &Path, def: &Definition, interrupt: Option<&Interrupt<'_>>) -> Result<()> {
    let name = &def.name;
    registry::ensure_dir(dir)?;
    let began = registry::now_ms();
    let mut pause = Pause { interrupt, next: Instant::now(), interrupted: false };
    // Whoever holds the lock keeps it for at most the start timeout and the stop grace period.
    let give_up = Instant::now() + def.start_timeout + STOP_GRACE + Duration::from_secs(1);
    let lock = loop {
        let lock = registry::start_lock(dir, name)?;
        match rustix::fs::flock(&lock, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => break lock,
            Err(rustix::io::Errno::WOULDBLOCK) => {}
            Err(e) => return Err(Error::io("cannot lock the start lock", e.into())),
        }
        // Another caller is starting it.
        if registry::served(dir, name) {
            return Ok(());
        }
        if Instant::now() >= give_up {
            return Err(failed(
                def,
                "another caller's start of it did not finish within the start timeout",
                dir,
                None,
            ));
        }
        pause.sleep(name)?;
    };
    if registry::served(dir, name) {
        return Ok(());
    }
    let orphaned = match read_record(&lock) {
        // A start made while we waited failed: its error, not one more run of the command.
        Some(r) if r.state == "failed" && r.at_ms >= began => {
            return Err(Error::new(ErrorKind::StartFailed, r.message));
        }
        // Its starter died or stopped waiting, and what it started still runs: wait for that
        // rather than start a second copy.
        Some(r) if r.state == "starting" && r.pids.iter().any(|&p| alive(p)) => Some(r),
        _ => None,
    };
    let served = match orphaned {
        Some(r) => wait_for_orphans(dir, &lock, def, r, &mut pause)?,
        None => false,
    };
    if served {
        return Ok(());
    }
    let started = start_locked(dir, def, &lock, &mut pause);
    match &started {
        // An interrupted wait leaves the start going on, recorded as `starting`.
        Err(_) if pause.interrupted => {}
        Err(e) => write_record(
            &lock,
            &Record {
                state: "failed".into(),
                at_ms: registry::now_ms(),
                message: e.message().into(),
                ..Default::default()
            },
        ),
        Ok(()) => {}
    }
    started
}

/// Waits (holding the lock) for the processes of a start whose starter is gone; `true` once
/// the name is served. When they exit without registering, or outlive the start's deadline
/// (then they are stopped), `false`: this caller starts the service itself.
fn wait_for_orphans(
    dir: &Path,
    lock: &File,
    def: &Definition,
    r: Record,
    pause: &mut Pause<'_>,
) -> Result<bool> {
    tracing::debug!(service = %def.name, pids = ?r.pids, "waiting for the start of a caller that is gone");
    while registry::now_ms() < r.until_ms && r.pids.iter().any(|&p| alive(p)) {
        if registry::served(dir, &def.name) {
            write_record(lock, &Record { state: "ready".into(), at_ms: registry::now_ms(), ..r });
            return Ok(true);
        }
        pause.sleep(&def.name)?;
    }
    stop_pids(&r.pids);
    Ok(false)
}

/// Runs the command, holding the start lock, and waits until the service registers.
fn start_locked(dir: &Path, def: &Definition, lock: &File, pause: &mut Pause<'_>) -> Result<()> {
    let name = &def.name;
    let deadline = Instant::now() + def.start_timeout;
    let (log, from) = open_log(dir, def)?;
    let mut children = Vec::new();
    for k in 0..def.instances {
        let out = log.try_clone().map_err(|e| Error::io("cannot share the log file", e))?;
        let err = log.try_clone().map_err(|e| Error::io("cannot share the log file", e))?;
        let mut cmd = detached(def);
        cmd.envs(&def.env)
            .env("MICROCS_RUNTIME_DIR", dir)
            .env("MICROCS_INSTANCE", k.to_string())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        for var in crate::transport::inherited::ENV_VARS {
            cmd.env_remove(var);
        }
        match def.idle_timeout {
            Some(t) => cmd.env(ENV_IDLE_TIMEOUT, format!("{}ms", t.as_millis().max(1))),
            None => cmd.env_remove(ENV_IDLE_TIMEOUT),
        };
        if let Some(wd) = &def.working_dir {
            cmd.current_dir(wd);
        }
        match cmd.spawn() {
            Ok(c) => children.push(c),
            Err(e) => {
                kill_all(&mut children);
                return Err(failed(def, format_args!("cannot start it: {e}"), dir, Some(from)));
            }
        }
    }
    let until_ms = registry::now_ms() + def.start_timeout.as_millis() as u64;
    let pids: Vec<u32> = children.iter().map(Child::id).collect();
    let record = |state: &str| Record {
        state: state.into(),
        pids: pids.clone(),
        at_ms: registry::now_ms(),
        until_ms,
        message: String::new(),
    };
    write_record(lock, &record("starting"));
    tracing::debug!(service = %name, command = ?def.command, ?pids, "started by activation");
    loop {
        if registry::served(dir, name) {
            write_record(lock, &record("ready"));
            children.into_iter().for_each(reap);
            return Ok(());
        }
        let mut exited = None;
        children.retain_mut(|c| match c.try_wait() {
            Ok(Some(status)) => {
                exited = Some(status);
                false
            }
            _ => true,
        });
        if let (Some(status), true) = (exited, children.is_empty()) {
            return Err(failed(
                def,
                format_args!("it exited with {status} before it registered"),
                dir,
                Some(from),
            ));
        }
        if Instant::now() >= deadline {
            kill_all(&mut children);
            return Err(failed(
                def,
                format_args!(
                    "it did not register within the start timeout of {:?} (stopped: SIGTERM, then SIGKILL after {:?})",
                    def.start_timeout, STOP_GRACE
                ),
                dir,
                Some(from),
            ));
        }
        if let Err(e) = pause.sleep(name) {
            // The start goes on without us: its processes are reaped when they exit.
            children.into_iter().for_each(reap);
            return Err(e);
        }
    }
}

/// Opens the log for appending (rotated first when past [`MAX_LOG`]), never through a symlink,
/// and writes this start's header; returns it and the offset this start's output begins at.
fn open_log(dir: &Path, def: &Definition) -> Result<(File, u64)> {
    let path = log_path(dir, &def.name);
    if fs::symlink_metadata(&path).is_ok_and(|m| m.is_file() && m.len() > MAX_LOG) {
        let _ = fs::rename(&path, path.with_extension("log.1"));
    }
    let refuse = |why: &str| {
        Error::new(
            ErrorKind::PermissionDenied,
            format!("refusing the log file {}: {why}; remove it: rm {}", path.display(), path.display()),
        )
    };
    let mut log = match OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(&path)
    {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error()) => {
            return Err(refuse("it is a symlink"));
        }
        Err(e) => return Err(Error::io(format_args!("cannot open {}", path.display()), e)),
    };
    let md = log.metadata().map_err(|e| Error::io(format_args!("cannot inspect {}", path.display()), e))?;
    if !md.is_file() || md.uid() != registry::euid() {
        return Err(refuse("it is not a regular file of yours"));
    }
    let from = md.len();
    let _ = writeln!(
        log,
        "{HEADER}{} starting {} ({} instance{}) for pid {}: {}",
        crate::micro::rfc3339(SystemTime::now()),
        def.name,
        def.instances,
        if def.instances == 1 { "" } else { "s" },
        std::process::id(),
        def.command.join(" ")
    );
    Ok((log, from))
}

/// Where util-linux's `setsid(1)` may be (Debian installs it in every system: util-linux is
/// essential).
const SETSID: [&str; 2] = ["/usr/bin/setsid", "/bin/setsid"];

/// The command of `def`, to be started detached: in a session of its own, with no controlling
/// terminal, through util-linux `setsid(1)` when it is installed — the child is not a
/// process-group leader (it starts in ours), so `setsid` calls `setsid(2)` and execs the command
/// in the same process: the pid we wait for is the service's, and its process group (the
/// session's) is its pid. Without `setsid(1)`, a process group of its own (std's safe
/// `process_group(0)`), which keeps the terminal's Ctrl-C and hang-up away too.
fn detached(def: &Definition) -> Command {
    match SETSID.iter().find(|p| Path::new(p).is_file()) {
        Some(setsid) => {
            let mut cmd = Command::new(setsid);
            cmd.args(&def.command);
            cmd
        }
        None => {
            let mut cmd = Command::new(&def.command[0]);
            cmd.args(&def.command[1..]).process_group(0);
            cmd
        }
    }
}

/// Waits for a started process in a thread of its own, so that it leaves no zombie.
fn reap(mut child: Child) {
    let spawned = std::thread::Builder::new().name("microcs-reaper".into()).spawn(move || {
        let _ = child.wait();
    });
    if spawned.is_err() {
        tracing::debug!("cannot start a reaper thread; the service becomes a zombie when it exits");
    }
}

/// `sig` to each process's group (and to the process, in case it has not made its group yet).
fn signal(pids: &[u32], sig: rustix::process::Signal) {
    for p in pids.iter().filter_map(|&p| i32::try_from(p).ok().and_then(rustix::process::Pid::from_raw)) {
        let _ = rustix::process::kill_process_group(p, sig);
        let _ = rustix::process::kill_process(p, sig);
    }
}

/// Stops the started processes: `SIGTERM`, `SIGKILL` to what is left after [`STOP_GRACE`].
fn kill_all(children: &mut Vec<Child>) {
    signal(&children.iter().map(Child::id).collect::<Vec<_>>(), rustix::process::Signal::TERM);
    let until = Instant::now() + STOP_GRACE;
    while Instant::now() < until {
        children.retain_mut(|c| !matches!(c.try_wait(), Ok(Some(_))));
        if children.is_empty() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    signal(&children.iter().map(Child::id).collect::<Vec<_>>(), rustix::process::Signal::KILL);
    for c in children.iter_mut() {
        let _ = c.wait();
    }
    children.clear();
}

/// Stops processes another caller started (not our children: watched with `kill(pid, 0)`).
fn stop_pids(pids: &[u32]) {
    signal(pids, rustix::process::Signal::TERM);
    let until = Instant::now() + STOP_GRACE;
    while pids.iter().any(|&p| alive(p)) && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(10));
    }
    if pids.iter().any(|&p| alive(p)) {
        signal(pids, rustix::process::Signal::KILL);
    }
}

/// The start-failure error: what failed, the command, and the tail of what this start logged
/// (from byte `from` of the log).
fn failed(def: &Definition, what: impl std::fmt::Display, dir: &Path, from: Option<u64>) -> Error {
    let log = log_path(dir, &def.name);
    let tail = from.map(|from| tail_lines(&log, from, LOG_LINES)).unwrap_or_default();
    let shown = if tail.is_empty() {
        format!("its log {} has nothing from this start", log.display())
    } else {
        format!("the end of its log {}:\n{tail}", log.display())
    };
    Error::new(
        ErrorKind::StartFailed,
        format!(
            "service '{}' could not be started from {}: {what}; command: {}; {shown}",
            def.name,
            def.path.display(),
            def.command.join(" "),
        ),
    )
}

/// The last `n` lines of a file after byte `from` (at most its last 64 KiB), headers left out.
fn tail_lines(path: &Path, from: u64, n: usize) -> String {
    let Ok(mut f) = File::open(path) else { return String::new() };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(from.max(len.saturating_sub(64 * 1024))));
    let mut buf = Vec::new();
    let _ = f.take(64 * 1024).read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with(HEADER) && !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join("\n").trim().to_owned()
}
