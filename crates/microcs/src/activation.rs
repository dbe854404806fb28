//! Start on demand: a client that calls a name nobody serves starts the service itself, when a
//! *service definition* for the name exists — D-Bus activation files without the daemon.
//!
//! A definition is a TOML file `<NAME>.toml` in `$MICROCS_SERVICES_DIR` when that is set (for
//! tests and sandboxes; then nowhere else), else in `$XDG_CONFIG_HOME/microcs/services/`
//! (`~/.config/microcs/services/`):
//!
//! ```toml
//! # ~/.config/microcs/services/LIFE_GEN.toml
//! command = ["microcs", "serve", "LIFE_GEN", "--life"]   # no shell; argv[0] looked up in PATH
//! working_dir = "/home/me"            # optional; default: the caller's
//! env = { RUST_LOG = "info" }          # optional; added to the caller's environment
//! instances = 1                        # optional; how many times to start the command
//! idle_timeout = 300.0                 # optional, seconds: the server exits after that long idle
//! start_timeout = 10.0                 # optional, seconds (default 10): wait for registration
//! ```
//!
//! TOML because people write these files by hand (comments, no quoting of keys, no trailing
//! comma traps), the format is strict (a string is never a number), and Cargo made it familiar
//! to this project's users. Unknown keys are refused, so a typo is an error, not a silent default.
//!
//! A definition names a command to run, so it is trusted like the runtime directory: it must be
//! a regular file owned by this user that nobody else can write to, in a directory nobody else
//! can write to; anything else is refused with a message that says what to fix.
//!
//! Starting: under an exclusive `flock` on `<runtime dir>/<NAME>.start` (so fifty racing
//! callers start it once: the others wait for the lock, then find the name served), the
//! command is started `instances` times with stdin from `/dev/null` and stdout and stderr
//! appended to `<runtime dir>/<NAME>.log`, in a process group of its own (so a Ctrl-C meant for
//! the caller does not reach it), with `MICROCS_RUNTIME_DIR` set to the caller's runtime
//! directory and `MICROCS_IDLE_TIMEOUT` to the idle timeout (servers honour it; see
//! `ServerBuilder::idle_timeout`). The registry is the readiness signal: the caller waits until
//! the name is served (an exclusive server or one instance listed as ready), at most the start
//! timeout, then calls. A command that exits first, or does not register in time (it is then
//! killed), is an [`ErrorKind::StartFailed`] error with the command line, its exit status and
//! the last lines of its log.
//!
//! A session of its own: the command is run through util-linux `setsid(1)` when it is
//! installed (`/usr/bin/setsid`, `/bin/setsid`), which makes it a session leader without a
//! controlling terminal and execs it in the same process; without it, in a process group of
//! its own (std's safe `process_group(0)`; a direct `setsid(2)` needs `pre_exec`, which is
//! `unsafe`, and this crate allows `unsafe` only for shared memory). Either way terminal
//! signals do not reach it. A thread of the caller reaps each started process when it exits
//! (no zombies).
//!
//! The start lock file also records a start that failed (one JSON line: when, and the error):
//! callers that waited behind it get that error rather than running the command once each, so
//! fifty callers of a broken definition run it once. A command that does not register in time
//! gets `SIGTERM`, then `SIGKILL` after [`STOP_GRACE`].

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rustix::fs::FlockOperation;
use serde::Deserialize;

use crate::error::{Error, ErrorKind, Result};
use crate::name::Name;
use crate::registry;

/// Where definitions are looked for instead of the user's configuration directory.
pub const ENV_SERVICES_DIR: &str = "MICROCS_SERVICES_DIR";
/// Set (to anything but empty or `0`) to turn activation off for every client of the process.
pub const ENV_NO_ACTIVATION: &str = "MICROCS_NO_ACTIVATION";
/// The idle timeout (seconds) a started server is given by its definition.
pub const ENV_IDLE_TIMEOUT: &str = "MICROCS_IDLE_TIMEOUT";

/// Lines of the service's log quoted in a start failure.
const LOG_LINES: usize = 10;
/// How long a command that did not register in time gets to exit after `SIGTERM`.
pub const STOP_GRACE: Duration = Duration::from_secs(2);

/// What the start lock file says about the last start that failed.
#[derive(serde::Serialize, Deserialize)]
struct Failure {
    /// When it failed, ms since the epoch.
    at_ms: u64,
    /// Its error message.
    message: String,
}

fn read_failure(mut file: &File) -> Option<Failure> {
    let mut text = String::new();
    file.seek(SeekFrom::Start(0)).ok()?;
    file.take(64 * 1024).read_to_string(&mut text).ok()?;
    serde_json::from_str(text.lines().next()?).ok()
}

fn write_failure(file: &File, message: &str) {
    use std::io::Write;
    let f = Failure { at_ms: registry::now_ms(), message: message.to_owned() };
    let mut line = serde_json::to_vec(&f).expect("a failure serialises");
    line.push(b'\n');
    let mut w = file;
    let _ = w
        .seek(SeekFrom::Start(0))
        .and_then(|_| w.write_all(&line))
        .and_then(|()| file.set_len(line.len() as u64));
}

/// A service definition, read from its file.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Definition {
    /// The service name (the file's stem).
    pub name: Name,
    /// The file it was read from.
    pub path: PathBuf,
    /// The command line (no shell).
    pub command: Vec<String>,
    /// Where to run it (`None`: the caller's working directory).
    pub working_dir: Option<PathBuf>,
    /// Added to the caller's environment.
    pub env: BTreeMap<String, String>,
    /// How many times to start the command (each should join the name as an instance when
    /// more than one).
    pub instances: u32,
    /// How long the server may stay idle before it exits (`None`: forever).
    pub idle_timeout: Option<Duration>,
    /// How long to wait for the service to register.
    pub start_timeout: Duration,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DefinitionFile {
    command: Vec<String>,
    working_dir: Option<PathBuf>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    instances: Option<u32>,
    idle_timeout: Option<f64>,
    start_timeout: Option<f64>,
}

/// The directory definitions are read from: `$MICROCS_SERVICES_DIR`, else
/// `$XDG_CONFIG_HOME/microcs/services`, else `~/.config/microcs/services` (`None` without a
/// home directory).
pub fn services_dir() -> Option<PathBuf> {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(d) = env(ENV_SERVICES_DIR) {
        return Some(d);
    }
    let config = env("XDG_CONFIG_HOME").or_else(|| env("HOME").map(|h| h.join(".config")))?;
    Some(config.join("microcs").join("services"))
}

/// Whether activation is on for clients that do not say (`MICROCS_NO_ACTIVATION`).
pub(crate) fn enabled_by_env() -> bool {
    std::env::var_os(ENV_NO_ACTIVATION).is_none_or(|v| v.is_empty() || v == "0")
}

fn bad(path: &Path, why: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::InvalidConfig, format!("service definition {}: {why}", path.display()))
}

fn refuse(path: &Path, why: &str, md: &fs::Metadata) -> Error {
    Error::new(
        ErrorKind::PermissionDenied,
        format!(
            "refusing the service definition {} ({why}; owner uid {}, mode {:04o}): it names a command \
             to run, so it must be owned by uid {} and writable by nobody else (chmod go-w)",
            path.display(),
            md.uid(),
            md.mode() & 0o7777,
            registry::euid()
        ),
    )
}

/// The definition of `name` in [`services_dir`], if there is one.
///
/// # Errors
///
/// [`ErrorKind::PermissionDenied`] for a file or directory another user owns or can write to
/// (or a symlinked file); [`ErrorKind::InvalidConfig`] for a malformed file (the TOML error, or
/// the field that is wrong); [`ErrorKind::Io`] when it cannot be read.
pub fn find(name: &Name) -> Result<Option<Definition>> {
    match services_dir() {
        Some(dir) => find_in(&dir, name),
        None => Ok(None),
    }
}

/// Like [`find`], in the given directory.
///
/// # Errors
///
/// As [`find`].
pub fn find_in(dir: &Path, name: &Name) -> Result<Option<Definition>> {
    let path = dir.join(format!("{name}.toml"));
    let md = match fs::symlink_metadata(&path) {
        Ok(md) => md,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(format_args!("cannot inspect {}", path.display()), e)),
    };
    if !md.file_type().is_file() {
        return Err(refuse(&path, "not a regular file", &md));
    }
    let me = registry::euid();
    if md.uid() != me {
        return Err(refuse(&path, "owned by another user", &md));
    }
    if md.mode() & 0o022 != 0 {
        return Err(refuse(&path, "group or others can write to it", &md));
    }
    let dmd =
        fs::metadata(dir).map_err(|e| Error::io(format_args!("cannot inspect {}", dir.display()), e))?;
    if (dmd.uid() != me && dmd.uid() != 0) || dmd.mode() & 0o022 != 0 {
        return Err(refuse(dir, "a directory of service definitions others can write to", &dmd));
    }
    let mut text = String::new();
    File::open(&path)
        .and_then(|f| f.take(1 << 20).read_to_string(&mut text))
        .map_err(|e| Error::io(format_args!("cannot read {}", path.display()), e))?;
    let file: DefinitionFile = toml::from_str(&text).map_err(|e| bad(&path, e.to_string().trim_end()))?;
    if file.command.first().is_none_or(String::is_empty) {
        return Err(bad(&path, "`command` must name a program: command = [\"prog\", \"arg\", ...]"));
    }
    let instances = file.instances.unwrap_or(1);
    if !(1..=registry::MAX_INSTANCES).contains(&instances) {
        return Err(bad(&path, format_args!("`instances` must be 1 to {}", registry::MAX_INSTANCES)));
    }
    let seconds = |v: Option<f64>, key: &str| -> Result<Option<Duration>> {
        match v {
            None => Ok(None),
            Some(s) if s.is_finite() && s > 0.0 && s < 1e9 => Ok(Some(Duration::from_secs_f64(s))),
            Some(_) => Err(bad(&path, format_args!("`{key}` must be a positive number of seconds"))),
        }
    };
    Ok(Some(Definition {
        name: name.clone(),
        command: file.command,
        working_dir: file.working_dir,
        env: file.env,
        instances,
        idle_timeout: seconds(file.idle_timeout, "idle_timeout")?,
        start_timeout: seconds(file.start_timeout, "start_timeout")?.unwrap_or(Duration::from_secs(10)),
        path,
    }))
}

/// For a client that found nobody serving `name` (`no_service`): when a definition exists,
/// starts the service and returns once it is served; else returns `no_service` at once.
pub(crate) fn activate(dir: &Path, name: &Name, no_service: Error) -> Result<()> {
    match find(name)? {
        Some(def) => start(dir, &def),
        None => Err(no_service),
    }
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
/// / [`ErrorKind::Io`] for the runtime directory.
pub fn start(dir: &Path, def: &Definition) -> Result<()> {
    let name = &def.name;
    registry::ensure_dir(dir)?;
    let began = registry::now_ms();
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
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    if registry::served(dir, name) {
        return Ok(());
    }
    // A start made while we waited failed: its error, not one more run of the command.
    if let Some(f) = read_failure(&lock).filter(|f| f.at_ms >= began) {
        return Err(Error::new(ErrorKind::StartFailed, f.message));
    }
    let started = start_locked(dir, def);
    if let Err(e) = &started {
        write_failure(&lock, e.message());
    }
    started
}

/// Runs the command, holding the start lock, and waits until the service registers.
fn start_locked(dir: &Path, def: &Definition) -> Result<()> {
    let name = &def.name;
    let deadline = Instant::now() + def.start_timeout;
    let log_file = log_path(dir, name);
    let log = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&log_file)
        .map_err(|e| Error::io(format_args!("cannot open {}", log_file.display()), e))?;
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
        match def.idle_timeout {
            Some(t) => cmd.env(ENV_IDLE_TIMEOUT, t.as_secs_f64().to_string()),
            None => cmd.env_remove(ENV_IDLE_TIMEOUT),
        };
        if let Some(wd) = &def.working_dir {
            cmd.current_dir(wd);
        }
        match cmd.spawn() {
            Ok(c) => children.push(c),
            Err(e) => {
                kill_all(&mut children);
                return Err(failed(def, format_args!("cannot start it: {e}"), dir));
            }
        }
    }
    tracing::debug!(service = %name, command = ?def.command, "started by activation");
    loop {
        if registry::served(dir, name) {
            for c in children {
                reap(c);
            }
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
            return Err(failed(def, format_args!("it exited with {status} before it registered"), dir));
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
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Where util-linux's `setsid(1)` may be (Debian installs it in every system: util-linux is
/// essential).
const SETSID: [&str; 2] = ["/usr/bin/setsid", "/bin/setsid"];

/// The command of `def`, to be started detached: in a session of its own, with no controlling
/// terminal, through util-linux `setsid(1)` when it is installed — the child is not a
/// process-group leader (it starts in ours), so `setsid` calls `setsid(2)` and execs the command
/// in the same process: the pid we wait for is the service's, and its process group (the
/// session's) is its pid. Without `setsid(1)`, a process group of its own (std's safe
/// `process_group(0)`), which keeps the terminal's Ctrl-C and hang-up away too. Calling
/// `setsid(2)` in the child ourselves would need `pre_exec`, which is `unsafe`.
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

/// Stops the started processes: `SIGTERM` to each one's process group (and to the process,
/// in case it has not made its group yet), `SIGKILL` to what is left after [`STOP_GRACE`].
fn kill_all(children: &mut Vec<Child>) {
    use rustix::process::{Pid, Signal, kill_process, kill_process_group};
    let send = |children: &mut Vec<Child>, sig: Signal| {
        for c in children.iter_mut() {
            if let Some(p) = i32::try_from(c.id()).ok().and_then(Pid::from_raw) {
                let _ = kill_process_group(p, sig);
                let _ = kill_process(p, sig);
            }
        }
    };
    send(children, Signal::TERM);
    let until = Instant::now() + STOP_GRACE;
    while Instant::now() < until {
        children.retain_mut(|c| !matches!(c.try_wait(), Ok(Some(_))));
        if children.is_empty() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    send(children, Signal::KILL);
    for c in children.iter_mut() {
        let _ = c.wait();
    }
    children.clear();
}

/// The start-failure error: what failed, the command, and the tail of the log.
fn failed(def: &Definition, what: impl std::fmt::Display, dir: &Path) -> Error {
    let log = log_path(dir, &def.name);
    let tail = tail_lines(&log, LOG_LINES);
    let shown = if tail.is_empty() {
        format!("its log {} is empty", log.display())
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

/// The last `n` lines of a file (at most its last 64 KiB), trimmed.
fn tail_lines(path: &Path, n: usize) -> String {
    let Ok(mut f) = File::open(path) else { return String::new() };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n").trim().to_owned()
}
