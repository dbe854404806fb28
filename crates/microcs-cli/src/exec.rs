//! Running one command per request for `microcs serve NAME -- CMD`: the payload goes to the
//! command's stdin, its stdout is the reply, a failure is a remote error carrying its stderr.
//!
//! Each command runs in a process group of its own, so that killing it (deadline passed, caller
//! cancelled, reply too large, second Ctrl-C) also kills whatever it started, e.g. the pipeline of
//! an `sh -c` method. A bounded number run at once ([`Slots`]).

use std::collections::HashSet;
use std::io::{self, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use microcs::proto::status;
use microcs::{RemoteError, Request};
use rustix::process::{Pid, Signal};

/// How often a waiting request looks at its cancel flag (it has no wake-up of its own).
const TICK: Duration = Duration::from_millis(10);
/// Stderr kept for the error message: its last this-many bytes.
const STDERR_KEEP: usize = 4096;
/// After a kill, how long to wait for the pipes to close before abandoning their reader threads
/// (a process that left the group could keep them open).
const AFTER_KILL: Duration = Duration::from_secs(2);

/// What to run for a request.
#[derive(Debug, Clone)]
pub enum Program {
    /// A program and its arguments, run directly (no shell).
    Exec(Vec<String>),
    /// A command line run with `sh -c`.
    Shell(String),
}

impl Program {
    fn command(&self) -> Command {
        match self {
            Program::Exec(argv) => {
                let mut c = Command::new(&argv[0]);
                c.args(&argv[1..]);
                c
            }
            Program::Shell(line) => {
                let mut c = Command::new("sh");
                c.arg("-c").arg(line);
                c
            }
        }
    }

    /// How the program is shown in messages.
    pub fn display(&self) -> String {
        match self {
            Program::Exec(argv) => argv.join(" "),
            Program::Shell(line) => format!("sh -c {line:?}"),
        }
    }
}

/// A counting semaphore: at most `n` commands at once.
#[derive(Debug)]
pub struct Slots {
    free: Mutex<u32>,
    cv: Condvar,
}

/// A taken slot; dropping it frees the slot.
#[derive(Debug)]
pub struct Slot<'a>(&'a Slots);

impl Slots {
    /// `n` slots.
    pub fn new(n: u32) -> Slots {
        Slots { free: Mutex::new(n), cv: Condvar::new() }
    }

    /// Waits for a free slot while the request is still wanted.
    fn acquire(&self, req: &Request) -> Option<Slot<'_>> {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        while *free == 0 {
            if req.is_cancelled() {
                return None;
            }
            free = self.cv.wait_timeout(free, TICK).unwrap_or_else(|p| p.into_inner()).0;
        }
        *free -= 1;
        Some(Slot(self))
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        *self.0.free.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        self.0.cv.notify_one();
    }
}

/// Runs programs for requests; shared by every handler of one `serve`.
#[derive(Debug)]
pub struct Runner {
    service: String,
    max_output: u64,
    slots: Slots,
    /// Process groups of the commands running now, so a forced exit can kill them all.
    running: Mutex<HashSet<i32>>,
}

enum Event {
    Stdout(io::Result<Vec<u8>>),
    StdoutTooLarge,
    Stderr(Vec<u8>),
    Exited(io::Result<ExitStatus>),
}

/// Why the command was killed.
#[derive(Clone, Copy)]
enum Kill {
    Late,
    Cancelled,
    TooLarge,
}

impl Runner {
    /// A runner for the service `service`: at most `jobs` commands at once, replies of at most
    /// `max_output` bytes.
    pub fn new(service: &str, jobs: u32, max_output: u64) -> Runner {
        Runner {
            service: service.to_owned(),
            max_output,
            slots: Slots::new(jobs),
            running: Mutex::new(HashSet::new()),
        }
    }

    /// Kills every command running now (with its process group).
    pub fn kill_all(&self) {
        for &pg in self.running.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            kill_group(pg);
        }
    }

    /// Runs `program` for `req` and returns its stdout, or the error the caller should see.
    ///
    /// # Errors
    ///
    /// Code 500 when the command cannot start, exits non-zero (the message carries its stderr)
    /// or dies of a signal; 408 when the caller's deadline passed (the command is killed); 499
    /// when the caller cancelled; 413 when it writes more than the reply limit.
    pub fn run(&self, program: &Program, req: Request) -> Result<Vec<u8>, RemoteError> {
        let Some(_slot) = self.slots.acquire(&req) else {
            return Err(gave_up(&req, "while waiting for a free slot (see serve --jobs)"));
        };
        let mut cmd = program.command();
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .env("MICROCS_SERVICE", &self.service)
            .env("MICROCS_METHOD", req.method().unwrap_or(""))
            .env("MICROCS_REQUEST_ID", req.id().to_string())
            .env("MICROCS_PEER_PID", req.peer().pid.to_string())
            .env("MICROCS_PEER_UID", req.peer().uid.to_string());
        match req.remaining() {
            Some(left) => cmd.env("MICROCS_TIMEOUT_MS", left.as_millis().to_string()),
            None => cmd.env_remove("MICROCS_TIMEOUT_MS"),
        };
        let child = cmd.spawn().map_err(|e| {
            RemoteError::new(status::HANDLER_FAILED, format!("cannot run {}: {e}", program.display()))
        })?;
        let pgid = child.id() as i32;
        self.running.lock().unwrap_or_else(|p| p.into_inner()).insert(pgid);
        let result = self.supervise(child, pgid, &req);
        self.running.lock().unwrap_or_else(|p| p.into_inner()).remove(&pgid);
        result
    }

    fn supervise(&self, mut child: Child, pgid: i32, req: &Request) -> Result<Vec<u8>, RemoteError> {
        let (tx, rx) = mpsc::channel();
        // Writing stdin, reading stdout, reading stderr and waiting for the exit each on a thread
        // of their own: a command that writes before it has read all its input never deadlocks
        // against us, and the loop below wakes on whichever comes first while still looking at
        // the cancel flag every tick.
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            thread::Builder::new().name(name.into()).spawn(f).map(drop).map_err(|e| {
                kill_group(pgid);
                RemoteError::new(
                    status::HANDLER_FAILED,
                    format!("cannot start a thread for the command: {e}"),
                )
            })
        };
        if let Some(mut stdin) = child.stdin.take() {
            let payload = req.payload().to_vec();
            // A command that exits without reading its input is not an error: ignore EPIPE.
            spawn("microcs-stdin", Box::new(move || drop(stdin.write_all(&payload))))?;
        }
        if let Some(out) = child.stdout.take() {
            let (tx, limit) = (tx.clone(), self.max_output);
            spawn("microcs-stdout", Box::new(move || read_stdout(out, limit, &tx)))?;
        }
        if let Some(err) = child.stderr.take() {
            let tx = tx.clone();
            spawn("microcs-stderr", Box::new(move || read_stderr(err, &tx)))?;
        }
        spawn("microcs-wait", Box::new(move || drop(tx.send(Event::Exited(child.wait())))))?;

        let (mut stdout, mut stderr, mut exit) = (None, None, None);
        let mut killed: Option<Kill> = None;
        // Once the group has been killed, how long to wait for the pipes to close.
        let mut abandon_at: Option<Instant> = None;
        let kill = |why: Option<Kill>, killed: &mut Option<Kill>, abandon_at: &mut Option<Instant>| {
            kill_group(pgid);
            if killed.is_none() {
                *killed = why;
            }
            abandon_at.get_or_insert(Instant::now() + AFTER_KILL);
        };
        while stdout.is_none() || stderr.is_none() || exit.is_none() {
            if killed.is_none() && req.is_cancelled() {
                // is_cancelled is also true once the deadline passed; tell the two apart.
                let late = req.remaining().is_some_and(|r| r.is_zero());
                kill(Some(if late { Kill::Late } else { Kill::Cancelled }), &mut killed, &mut abandon_at);
            }
            if abandon_at.is_some_and(|t| Instant::now() >= t) {
                break;
            }
            let mut wait = TICK;
            if let Some(left) = req.remaining() {
                wait = wait.min(left.max(Duration::from_millis(1)));
            }
            match rx.recv_timeout(wait) {
                Ok(Event::Stdout(r)) => stdout = Some(r),
                Ok(Event::StdoutTooLarge) => {
                    stdout = Some(Ok(Vec::new()));
                    kill(Some(Kill::TooLarge), &mut killed, &mut abandon_at);
                }
                Ok(Event::Stderr(e)) => stderr = Some(e),
                Ok(Event::Exited(s)) => {
                    exit = Some(s);
                    if stdout.is_none() || stderr.is_none() {
                        // The command exited but something it started still holds its output
                        // open: nothing a request starts may outlive it, so end the group; the
                        // pipes then close and what was written is the reply.
                        kill(None, &mut killed, &mut abandon_at);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        let stderr = stderr.unwrap_or_default();
        let service = &self.service;
        match killed {
            Some(Kill::Late) => {
                return Err(RemoteError::new(
                    status::TIMED_OUT,
                    "the command did not finish before the caller's deadline; it was killed",
                ));
            }
            Some(Kill::Cancelled) => {
                return Err(RemoteError::new(
                    status::CANCELLED,
                    "the caller cancelled; the command was killed",
                ));
            }
            Some(Kill::TooLarge) => {
                return Err(RemoteError::new(
                    status::TOO_LARGE,
                    format!(
                        "the command wrote more than {} bytes on stdout, over the reply limit of service \
                         '{service}'; it was killed",
                        self.max_output
                    ),
                ));
            }
            None => {}
        }
        let status = match exit {
            Some(Ok(s)) => s,
            Some(Err(e)) => {
                return Err(RemoteError::new(
                    status::HANDLER_FAILED,
                    format!("cannot wait for the command: {e}"),
                ));
            }
            None => {
                return Err(RemoteError::new(status::HANDLER_FAILED, "the command's exit status was lost"));
            }
        };
        if !status.success() {
            let what = match (status.code(), status.signal()) {
                (Some(code), _) => format!("exit status {code}"),
                (None, Some(sig)) => format!("killed by signal {sig}"),
                _ => "failed".to_owned(),
            };
            let text = String::from_utf8_lossy(&stderr);
            let text = text.trim();
            let message = if text.is_empty() {
                format!("{what} (nothing on stderr)")
            } else {
                format!("{what}: {text}")
            };
            return Err(RemoteError::new(status::HANDLER_FAILED, message));
        }
        match stdout {
            Some(Ok(out)) => Ok(out),
            Some(Err(e)) => Err(RemoteError::new(
                status::HANDLER_FAILED,
                format!("cannot read the command's output: {e}"),
            )),
            None => Err(RemoteError::new(status::HANDLER_FAILED, "the command's output was lost")),
        }
    }
}

/// Reads the command's stdout up to `limit` bytes; past it, stops and says so (the command is
/// then killed).
fn read_stdout(out: impl Read, limit: u64, tx: &mpsc::Sender<Event>) {
    let mut buf = Vec::new();
    let event = match out.take(limit.saturating_add(1)).read_to_end(&mut buf) {
        Ok(_) if buf.len() as u64 > limit => Event::StdoutTooLarge,
        Ok(_) => Event::Stdout(Ok(buf)),
        Err(e) => Event::Stdout(Err(e)),
    };
    let _ = tx.send(event);
}

/// Reads the command's stderr to the end, keeping its last [`STDERR_KEEP`] bytes (the end of an
/// error output is where the reason usually is).
fn read_stderr(mut err: impl Read, tx: &mpsc::Sender<Event>) {
    let mut kept = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        match err.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                kept.extend_from_slice(&chunk[..n]);
                if kept.len() > 2 * STDERR_KEEP {
                    kept.drain(..kept.len() - STDERR_KEEP);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    if kept.len() > STDERR_KEEP {
        kept.drain(..kept.len() - STDERR_KEEP);
        kept.splice(0..0, *b"...");
    }
    let _ = tx.send(Event::Stderr(kept));
}

/// SIGKILL to a command's process group. The group outlives its leader while any member lives and
/// its id is not reused meanwhile; once all are gone the kill finds nothing (ESRCH), unless the
/// kernel handed out that very id again within the few milliseconds since, which pid allocation
/// (sequential, wrapping at pid_max) makes practically impossible.
fn kill_group(pgid: i32) {
    if let Some(pid) = Pid::from_raw(pgid) {
        let _ = rustix::process::kill_process_group(pid, Signal::KILL);
    }
}

/// The error for a request nobody waits for any more.
fn gave_up(req: &Request, when: &str) -> RemoteError {
    if req.remaining().is_some_and(|r| r.is_zero()) {
        RemoteError::new(status::TIMED_OUT, format!("the caller's deadline passed {when}"))
    } else {
        RemoteError::new(status::CANCELLED, format!("the caller cancelled {when}"))
    }
}
