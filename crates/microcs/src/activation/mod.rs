//! Start on demand: a client that calls a name nobody serves starts the service itself, when a
//! *service definition* for the name exists — D-Bus activation files without the daemon. The
//! whole story (format, start protocol, security checks, systemd socket activation) is in
//! `docs/ACTIVATION.md`.
//!
//! A definition is a TOML file `<NAME>.toml` in a services directory ([`services_dirs`]):
//! `$MICROCS_SERVICES_DIR` when that is set (for tests and sandboxes; then nowhere else), else
//! `$XDG_CONFIG_HOME/microcs/services/` (`~/.config/microcs/services/`), then
//! `microcs/services/` in each of `$XDG_CONFIG_DIRS` (default `/etc/xdg`), the first found wins:
//!
//! ```toml
//! # ~/.config/microcs/services/LIFE_GEN.toml
//! command = ["microcs", "serve", "LIFE_GEN", "--life"]   # no shell; argv[0] looked up in PATH
//! working_dir = "/home/me"            # optional; default: the caller's
//! env = { RUST_LOG = "info" }          # optional; added to the caller's environment
//! instances = 1                        # optional; how many times to start the command
//! idle_timeout = "5m"                  # optional: the server exits after that long idle
//! start_timeout = 10                   # optional (default 10 s): wait for registration
//! ```
//!
//! Durations are a number of seconds (`10`, `0.5`) or a string with a unit: `"500ms"`, `"30s"`,
//! `"5m"`, `"1h"`.
//!
//! TOML because people write these files by hand (comments, no quoting of keys, no trailing
//! comma traps), the format is strict (a string is never a number), and Cargo made it familiar
//! to this project's users. Unknown keys are refused, so a typo is an error, not a silent default.
//!
//! A definition names a command to run, so it is trusted like the runtime directory: it must be
//! a regular file owned by this user (or root) that nobody else can write to, in a directory
//! nobody else can write to; anything else is refused with a message naming the command that
//! fixes it (`chmod go-w PATH`, `chown UID PATH`).
//!
//! Starting ([`start`]) is in `start.rs`: one start however many callers race, detached, logged,
//! the registry as the readiness signal, a typed [`ErrorKind::StartFailed`] when it fails.
//!
//! ```
//! # let dir = std::env::temp_dir().join(format!("microcs-doc-act-{}", std::process::id()));
//! # let _ = std::fs::remove_dir_all(&dir);
//! # std::fs::create_dir_all(&dir).unwrap();
//! # use std::os::unix::fs::PermissionsExt;
//! # std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
//! std::fs::write(dir.join("ECHO.toml"), "command = [\"microcs\", \"serve\", \"ECHO\", \"--echo\"]\nidle_timeout = \"5m\"\n").unwrap();
//! # std::fs::set_permissions(dir.join("ECHO.toml"), std::fs::Permissions::from_mode(0o600)).unwrap();
//! let def = microcs::activation::find_in(&dir, &microcs::Name::new("ECHO")?)?.expect("defined");
//! assert_eq!(def.command[0], "microcs");
//! assert_eq!(def.idle_timeout, Some(std::time::Duration::from_secs(300)));
//! # std::fs::remove_dir_all(&dir).unwrap();
//! # Ok::<(), microcs::Error>(())
//! ```

mod start;

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::error::{Error, ErrorKind, Result};
use crate::name::Name;
use crate::registry;

pub(crate) use start::Interrupt;
pub use start::{STOP_GRACE, log_path, start};

/// Where definitions are looked for instead of the user's configuration directories.
pub const ENV_SERVICES_DIR: &str = "MICROCS_SERVICES_DIR";
/// Set (to anything but empty or `0`) to turn activation off for every client of the process.
pub const ENV_NO_ACTIVATION: &str = "MICROCS_NO_ACTIVATION";
/// The idle timeout a started server is given by its definition (seconds, or a number with
/// `ms`, `s`, `m` or `h`).
pub const ENV_IDLE_TIMEOUT: &str = "MICROCS_IDLE_TIMEOUT";
/// How long a start may take until the service is registered, when its definition does not say.
pub const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest definition file read.
const MAX_DEFINITION: u64 = 64 * 1024;

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
    idle_timeout: Option<DurationValue>,
    start_timeout: Option<DurationValue>,
}

/// A duration as written: seconds, or a string with a unit.
#[derive(Deserialize)]
#[serde(untagged)]
enum DurationValue {
    Seconds(f64),
    Text(String),
}

/// Parses a duration as definitions and `MICROCS_IDLE_TIMEOUT` write it: a number of seconds
/// (`30`, `0.5`), or a number with a unit `ms`, `s`, `m` or `h` (`500ms`, `5m`). Positive and
/// finite.
pub(crate) fn parse_duration(text: &str) -> std::result::Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let scale = match unit.trim() {
        "" | "s" => 1.0,
        "ms" => 0.001,
        "m" => 60.0,
        "h" => 3600.0,
        u => return Err(format!("unknown unit {u:?} in {text:?} (use ms, s, m or h)")),
    };
    let n: f64 = number.trim().parse().map_err(|_| {
        format!("{text:?} is not a duration (a number of seconds, or a number with ms, s, m or h)")
    })?;
    seconds(n * scale).map_err(|_| format!("{text:?} is not a positive duration"))
}

fn seconds(s: f64) -> std::result::Result<Duration, String> {
    if s.is_finite() && s > 0.0 && s < 1e9 {
        Ok(Duration::from_secs_f64(s))
    } else {
        Err(format!("{s} is not a positive number of seconds"))
    }
}

impl DurationValue {
    fn get(&self) -> std::result::Result<Duration, String> {
        match self {
            DurationValue::Seconds(s) => seconds(*s),
            DurationValue::Text(t) => parse_duration(t),
        }
    }
}

/// The user's own directory of definitions, the first of [`services_dirs`]:
/// `$MICROCS_SERVICES_DIR`, else `$XDG_CONFIG_HOME/microcs/services`, else
/// `~/.config/microcs/services` (`None` without a home directory).
pub fn services_dir() -> Option<PathBuf> {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(d) = env(ENV_SERVICES_DIR) {
        return Some(d);
    }
    let abs = |p: PathBuf| p.is_absolute().then_some(p);
    let config = env("XDG_CONFIG_HOME")
        .and_then(abs)
        .or_else(|| env("HOME").and_then(abs).map(|h| h.join(".config")))?;
    Some(config.join("microcs").join("services"))
}

/// Where definitions are looked for, in order (the first file found wins): `$MICROCS_SERVICES_DIR`
/// alone when it is set (so tests and sandboxes see none of the user's); else the user's
/// directory ([`services_dir`]), then `microcs/services` in each directory of
/// `$XDG_CONFIG_DIRS` (default `/etc/xdg`), which the administrator may provide for everyone.
pub fn services_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = services_dir().into_iter().collect();
    if std::env::var_os(ENV_SERVICES_DIR).is_some_and(|v| !v.is_empty()) {
        return dirs;
    }
    let system =
        std::env::var_os("XDG_CONFIG_DIRS").filter(|v| !v.is_empty()).unwrap_or_else(|| "/etc/xdg".into());
    dirs.extend(
        std::env::split_paths(&system).filter(|p| p.is_absolute()).map(|p| p.join("microcs/services")),
    );
    dirs
}

/// Whether activation is on for clients that do not say (`MICROCS_NO_ACTIVATION`).
pub(crate) fn enabled_by_env() -> bool {
    std::env::var_os(ENV_NO_ACTIVATION).is_none_or(|v| v.is_empty() || v == "0")
}

fn bad(path: &Path, why: impl std::fmt::Display) -> Error {
    Error::new(
        ErrorKind::InvalidConfig,
        format!("service definition {}: {why}; fix the file (format: docs/ACTIVATION.md)", path.display()),
    )
}

/// Refuses a definition (or its directory) someone else could change: they would choose what
/// runs as this user. The message names the command that fixes it.
fn check_trusted(path: &Path, md: &fs::Metadata, what: &str) -> Result<()> {
    let me = registry::euid();
    let shown = path.display();
    let mode = md.mode() & 0o7777;
    if md.uid() != me && md.uid() != 0 {
        return Err(Error::new(
            ErrorKind::PermissionDenied,
            format!(
                "refusing the {what} {shown}: it belongs to uid {}, not to you (uid {me}) or root, so that \
                 user chooses what runs as you; if it is meant to be yours, fix it with: chown {me} {shown}",
                md.uid()
            ),
        ));
    }
    if md.mode() & 0o022 != 0 {
        return Err(Error::new(
            ErrorKind::PermissionDenied,
            format!(
                "refusing the {what} {shown}: group or others can write to it (mode {mode:04o}), so they could \
                 choose what runs as you; fix it with: chmod go-w {shown}"
            ),
        ));
    }
    Ok(())
}

/// The definition of `name` in the [services directories](services_dirs), if there is one.
///
/// # Errors
///
/// [`ErrorKind::PermissionDenied`] for a file or directory another user owns or can write to
/// (or a symlinked file); [`ErrorKind::InvalidConfig`] for a malformed file (the TOML error with
/// its line, or the field that is wrong); [`ErrorKind::Io`] when it cannot be read.
pub fn find(name: &Name) -> Result<Option<Definition>> {
    for dir in services_dirs() {
        if let Some(def) = find_in(&dir, name)? {
            return Ok(Some(def));
        }
    }
    Ok(None)
}

/// The file [`find`] would read for `name`, if there is one (one `lstat` per directory).
pub(crate) fn definition_path(name: &Name) -> Option<PathBuf> {
    services_dirs()
        .into_iter()
        .map(|d| d.join(format!("{name}.toml")))
        .find(|p| fs::symlink_metadata(p).is_ok())
}

/// Like [`find`], in the given directory only.
///
/// # Errors
///
/// As [`find`].
pub fn find_in(dir: &Path, name: &Name) -> Result<Option<Definition>> {
    let path = dir.join(format!("{name}.toml"));
    let md = match fs::symlink_metadata(&path) {
        Ok(md) => md,
        Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory) => {
            return Ok(None);
        }
        Err(e) => return Err(Error::io(format_args!("cannot inspect {}", path.display()), e)),
    };
    if !md.file_type().is_file() {
        let what = if md.file_type().is_symlink() { "a symlink" } else { "not a regular file" };
        return Err(Error::new(
            ErrorKind::PermissionDenied,
            format!(
                "refusing the service definition {}: it is {what}; put the file itself there (a \
                 definition names a command to run, so it is not followed through links)",
                path.display()
            ),
        ));
    }
    check_trusted(&path, &md, "service definition")?;
    let dmd =
        fs::metadata(dir).map_err(|e| Error::io(format_args!("cannot inspect {}", dir.display()), e))?;
    check_trusted(dir, &dmd, "directory of service definitions")?;
    if md.len() > MAX_DEFINITION {
        return Err(bad(&path, format_args!("it is {} bytes, over the limit of {MAX_DEFINITION}", md.len())));
    }
    let mut text = String::new();
    File::open(&path)
        .and_then(|f| f.take(MAX_DEFINITION).read_to_string(&mut text))
        .map_err(|e| Error::io(format_args!("cannot read {}", path.display()), e))?;
    let file: DefinitionFile = toml::from_str(&text).map_err(|e| bad(&path, e.to_string().trim_end()))?;
    parse(name, path, file).map(Some)
}

fn parse(name: &Name, path: PathBuf, file: DefinitionFile) -> Result<Definition> {
    if file.command.first().is_none_or(String::is_empty) {
        return Err(bad(&path, "`command` must name a program: command = [\"prog\", \"arg\", ...]"));
    }
    let instances = file.instances.unwrap_or(1);
    if !(1..=registry::MAX_INSTANCES).contains(&instances) {
        return Err(bad(&path, format_args!("`instances` must be 1 to {}", registry::MAX_INSTANCES)));
    }
    let duration = |v: Option<DurationValue>, key: &str| -> Result<Option<Duration>> {
        v.map(|v| v.get().map_err(|m| bad(&path, format_args!("`{key}`: {m}")))).transpose()
    };
    Ok(Definition {
        name: name.clone(),
        command: file.command,
        working_dir: file.working_dir,
        env: file.env,
        instances,
        idle_timeout: duration(file.idle_timeout, "idle_timeout")?,
        start_timeout: duration(file.start_timeout, "start_timeout")?.unwrap_or(DEFAULT_START_TIMEOUT),
        path,
    })
}

/// For a client that found nobody serving `name` (`no_service`): when a definition exists,
/// starts the service and returns once it is served; else returns `no_service` at once.
/// `interrupt`: the client's interrupt check, which may end the wait (not the start).
pub(crate) fn activate(
    dir: &Path,
    name: &Name,
    no_service: Error,
    interrupt: Option<&Interrupt<'_>>,
) -> Result<()> {
    match find(name)? {
        Some(def) => start::start_with(dir, &def, interrupt),
        None => Err(no_service),
    }
}

/// For a client that does not start services (activation off) and found nobody serving
/// `name`: `no_service`, saying so when the name has a definition, with the command that
/// starts it.
pub(crate) fn not_started(name: &Name, no_service: Error) -> Error {
    match definition_path(name) {
        Some(path) => Error::new(
            ErrorKind::NoService,
            format!(
                "{}; it has a service definition ({}), but this client does not start services \
                 (activate(false), or {ENV_NO_ACTIVATION} is set): start it with `microcs start {name}`",
                no_service.message(),
                path.display()
            ),
        ),
        None => no_service,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("0.5").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration(" 5m ").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert!(parse_duration("5 parsecs").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("-1").is_err());
        assert!(parse_duration("0").is_err());
        assert!(parse_duration("soon").is_err());
    }

    fn parsed(text: &str) -> Result<Definition> {
        let file: DefinitionFile = toml::from_str(text).map_err(|e| bad(Path::new("/x/X.toml"), e))?;
        parse(&Name::new("X").unwrap(), PathBuf::from("/x/X.toml"), file)
    }

    #[test]
    fn fields_defaults_and_mistakes() {
        let d = parsed("command = [\"/bin/true\"]\nidle_timeout = \"5m\"\nstart_timeout = 1.5").unwrap();
        assert_eq!(d.idle_timeout, Some(Duration::from_secs(300)));
        assert_eq!(d.start_timeout, Duration::from_millis(1500));
        let d = parsed("command = [\"x\"]").unwrap();
        assert_eq!((d.instances, d.idle_timeout, d.start_timeout), (1, None, DEFAULT_START_TIMEOUT));
        let e = parsed("command = [\"x\"]\nidle_timeout = \"5 parsecs\"").unwrap_err();
        assert!(e.message().contains("`idle_timeout`: unknown unit"), "{e}");
        assert!(parsed("command = [\"x\"]\nstart_timeout = 0").unwrap_err().message().contains("positive"));
        assert!(parsed("command = []").unwrap_err().message().contains("must name a program"));
        assert!(parsed("command = [\"x\"]\ncomand = 1").unwrap_err().message().contains("unknown field"));
    }
}
