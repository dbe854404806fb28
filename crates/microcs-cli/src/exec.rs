//! Running one command per request for `microcs serve NAME -- CMD`: the payload goes to the
//! command's stdin, its stdout is the reply, a failure is a remote error carrying its stderr.
//!
//! Each command runs in a process group of its own, so that killing it (deadline passed, caller
//! cancelled, reply too large, second Ctrl-C) also kills whatever it started, e.g. the pipeline of
//! an `sh -c` method. A bounded number run at once ([`Slots`]); so do the in-process handlers of
//! `serve --life` when `--jobs` is given ([`Runner::run_in_slot`]).

use std::collections::HashSet;
use std::io::{self, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use microcs::proto::status;
use microcs::{RemoteError, Request};
use rustix::process::{Pid, Signal};

/// How often a waiting request looks at its cancel flag (it has no wake-up of its own).
const TICK: Duration = Duration::from_millis(10);
/// What a request that gave up waiting for a slot was doing.
const WAITING: &str = "while waiting for a free slot (see serve --jobs)";
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

/// A slot taken for a stream, which outlives the handler's call; dropping it frees the slot.
#[derive(Debug)]
pub struct SlotGuard(Arc<Runner>);

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.0.slots.give_back();
    }
}

/// A stream's items with the slot they hold (see [`Runner::stream_slot`]): freed when the
/// stream is dropped, at its end or when the caller leaves.
pub struct InSlot<I> {
    pub items: I,
    pub _slot: SlotGuard,
}

impl<I: Iterator> Iterator for InSlot<I> {
    type Item = I::Item;

    fn next(&mut self) -> Option<I::Item> {
        self.items.next()
    }
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

impl Slots {
    /// As [`acquire`](Slots::acquire), for a slot given back with [`give_back`](Slots::give_back).
    fn take(&self, req: &Request) -> bool {
        self.acquire(req).map(std::mem::forget).is_some()
    }

    fn give_back(&self) {
        *self.free.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        self.cv.notify_one();
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.give_back();
    }
}

/// The lines of a `--lines` command, as a stream's items; see [`Runner::run_lines`]. Dropping it
/// (the caller cancelled, the connection closed) kills the command's process group.
pub struct Lines {
    runner: Arc<Runner>,
    _slot: SlotGuard,
    pgid: i32,
    req: Request,
    rx: mpsc::Receiver<Event>,
    stderr: Option<Vec<u8>>,
    exit: Option<io::Result<ExitStatus>>,
    /// Stdout reached its end.
    out_done: bool,
    done: bool,
}

impl Lines {
    /// Kills the command and ends the stream with `error` (`None`: nobody reads it any more).
    fn stop(&mut self, error: Option<RemoteError>) -> Option<Result<Vec<u8>, RemoteError>> {
        kill_group(self.pgid);
        self.done = true;
        error.map(Err)
    }
}

impl Iterator for Lines {
    type Item = Result<Vec<u8>, RemoteError>;

    fn next(&mut self) -> Option<Self::Item> {
        while !self.done {
            if self.req.is_cancelled() {
                let late = self.req.remaining().is_some_and(|r| r.is_zero());
                let e = late.then(|| {
                    RemoteError::new(
                        status::TIMED_OUT,
                        "the stream's deadline passed; the command was killed",
                    )
                });
                return self.stop(e);
            }
            if self.out_done && self.stderr.is_some() {
                if let Some(exit) = self.exit.take() {
                    self.done = true;
                    return match exit {
                        Ok(s) if s.success() => None,
                        Ok(s) => Some(Err(failed(s, self.stderr.as_deref().unwrap_or_default()))),
                        Err(e) => Some(Err(RemoteError::new(
                            status::HANDLER_FAILED,
                            format!("cannot wait for the command: {e}"),
                        ))),
                    };
                }
            }
            match self.rx.recv_timeout(TICK) {
                Ok(Event::Line(line)) => return Some(Ok(line)),
                Ok(Event::Stdout(Ok(_))) => self.out_done = true,
                Ok(Event::Stdout(Err(e))) => {
                    let msg = format!("cannot read the command's output: {e}");
                    return self.stop(Some(RemoteError::new(status::HANDLER_FAILED, msg)));
                }
                Ok(Event::StdoutTooLarge) => {
                    let msg = format!(
                        "the command wrote a line of more than {} bytes, over the item limit of service '{}'; \
                         it was killed",
                        self.runner.max_output, self.runner.service
                    );
                    return self.stop(Some(RemoteError::new(status::TOO_LARGE, msg)));
                }
                Ok(Event::Stderr(e)) => self.stderr = Some(e),
                Ok(Event::Exited(s)) => {
                    if !self.out_done || self.stderr.is_none() {
                        // Something the command started still holds its output open: nothing a
                        // request starts may outlive it.
                        kill_group(self.pgid);
                    }
                    self.exit = Some(s);
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    self.out_done = true;
                    self.stderr.get_or_insert_with(Vec::new);
                    if self.exit.is_none() {
                        return self.stop(Some(RemoteError::new(
                            status::HANDLER_FAILED,
                            "the command's exit status was lost",
                        )));
                    }
                }
            }
        }
        None
    }
}

impl Drop for Lines {
    fn drop(&mut self) {
        if self.exit.is_none() && !self.done {
            kill_group(self.pgid);
        }
        self.runner.running.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.pgid);
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
    /// One line of a `--lines` command (without its newline).
    Line(Vec<u8>),
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

    /// Runs an in-process handler (`serve --life --jobs N`) for `req` in one of the slots,
    /// waiting for one while the request is still wanted.
    ///
    /// # Errors
    ///
    /// 408 or 499 when the caller's deadline passed or it cancelled while waiting; else what
    /// `handler` returns.
    pub fn run_in_slot<T>(
        &self,
        req: Request,
        handler: impl FnOnce(Request) -> Result<T, RemoteError>,
    ) -> Result<T, RemoteError> {
        let Some(_slot) = self.slots.acquire(&req) else {
            return Err(gave_up(&req, WAITING));
        };
        handler(req)
    }

    /// A slot for a stream, held until the guard is dropped (with the stream's items).
    ///
    /// # Errors
    ///
    /// As [`run_in_slot`](Runner::run_in_slot), while waiting.
    pub fn stream_slot(self: &Arc<Self>, req: &Request) -> Result<SlotGuard, RemoteError> {
        if !self.slots.take(req) {
            return Err(gave_up(req, WAITING));
        }
        Ok(SlotGuard(self.clone()))
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
            return Err(gave_up(&req, WAITING));
        };
        let (child, pgid) = self.start(program, &req)?;
        let result = self.supervise(child, pgid, &req);
        self.running.lock().unwrap_or_else(|p| p.into_inner()).remove(&pgid);
        result
    }

    /// Starts `program` for `req` in a process group of its own (registered in `running`).
    fn start(&self, program: &Program, req: &Request) -> Result<(Child, i32), RemoteError> {
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
        Ok((child, pgid))
    }

    /// Runs `program` for `req` and streams its stdout, one item per line (the line without its
    /// newline), as the command writes them (`serve --lines`). The stream ends when the command
    /// exits: normally if it exited 0, else with the error [`run`](Runner::run) would give. A
    /// line longer than the reply limit ends it with 413 (the command is killed); so does the
    /// caller cancelling, leaving, or the stream's deadline passing (408).
    ///
    /// # Errors
    ///
    /// Before any item: no free slot in time, or the command cannot start.
    pub fn run_lines(self: &Arc<Self>, program: &Program, req: Request) -> Result<Lines, RemoteError> {
        let slot = self.stream_slot(&req)?;
        let (mut child, pgid) = self.start(program, &req)?;
        let (tx, rx) = mpsc::channel();
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
            spawn("microcs-stdin", Box::new(move || drop(stdin.write_all(&payload))))?;
        }
        if let Some(out) = child.stdout.take() {
            let (tx, limit) = (tx.clone(), self.max_output);
            spawn("microcs-stdout", Box::new(move || read_lines(out, limit, &tx)))?;
        }
        if let Some(err) = child.stderr.take() {
            let tx = tx.clone();
            spawn("microcs-stderr", Box::new(move || read_stderr(err, &tx)))?;
        }
        spawn("microcs-wait", Box::new(move || drop(tx.send(Event::Exited(child.wait())))))?;
        Ok(Lines {
            runner: self.clone(),
            _slot: slot,
            pgid,
            req,
            rx,
            stderr: None,
            exit: None,
            out_done: false,
            done: false,
        })
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
                Ok(Event::Line(_)) => {} // only `run_lines` reads lines
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
            return Err(failed(status, &stderr));
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

/// The error for a command that exited non-zero or died of a signal, with the end of its stderr.
fn failed(exit: ExitStatus, stderr: &[u8]) -> RemoteError {
    let what = match (exit.code(), exit.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => "failed".to_owned(),
    };
    let text = String::from_utf8_lossy(stderr);
    let text = text.trim();
    let message =
        if text.is_empty() { format!("{what} (nothing on stderr)") } else { format!("{what}: {text}") };
    RemoteError::new(status::HANDLER_FAILED, message)
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

/// Reads the command's stdout line by line and sends each line as it comes; a line longer than
/// `limit` stops it (the command is then killed). `Stdout(Ok(empty))` marks the end.
fn read_lines(out: impl Read, limit: u64, tx: &mpsc::Sender<Event>) {
    let mut out = io::BufReader::new(out);
    loop {
        let mut line = Vec::new();
        match io::BufRead::read_until(&mut (&mut out).take(limit.saturating_add(2)), b'\n', &mut line) {
            Ok(0) => break,
            Ok(_) => {
                if line.last() == Some(&b'\n') {
                    line.pop();
                } else if line.len() as u64 > limit {
                    let _ = tx.send(Event::StdoutTooLarge);
                    return;
                }
                if line.len() as u64 > limit {
                    let _ = tx.send(Event::StdoutTooLarge);
                    return;
                }
                if tx.send(Event::Line(line)).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                let _ = tx.send(Event::Stdout(Err(e)));
                return;
            }
        }
    }
    let _ = tx.send(Event::Stdout(Ok(Vec::new())));
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
