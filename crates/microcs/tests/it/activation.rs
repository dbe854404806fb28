//! Start on demand from the library's clients (blocking and async, in `microcs-peer`
//! processes, which get the directory of definitions through the environment): the first call
//! starts the service from its definition, later ones find it running; instances; the opt-out.
//! The CLI's tests cover the race of fifty callers, start failures, idle exit and refused
//! definitions.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::common::{PEER, TempDir, eventually, unique, watchdog};

struct Defs(PathBuf);

impl Defs {
    fn new(dir: &TempDir) -> Defs {
        let d = dir.path().with_extension("defs");
        let _ = std::fs::remove_dir_all(&d);
        std::fs::DirBuilder::new().mode(0o700).create(&d).unwrap();
        Defs(d)
    }

    fn write(&self, name: &str, body: &str) {
        let path = self.0.join(format!("{name}.toml"));
        std::fs::write(&path, body).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
}

impl Drop for Defs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `microcs-peer MODE NAME hello`, a client of `dir` with the definitions of `defs`.
fn caller(dir: &Path, defs: &Defs, mode: &str, name: &str) -> Command {
    let mut cmd = Command::new(PEER);
    cmd.args([mode, name, "hello"]).env("MICROCS_RUNTIME_DIR", dir).env("MICROCS_SERVICES_DIR", &defs.0);
    cmd.env_remove("MICROCS_NO_ACTIVATION");
    cmd
}

/// [`caller`], run to its end: (exit code, stdout, stderr).
fn call(dir: &Path, defs: &Defs, mode: &str, name: &str, env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = caller(dir, defs, mode, name);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).trim().to_owned();
    (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
}

fn served_by(dir: &TempDir, name: &str) -> Vec<u32> {
    microcs::list_in(dir.path())
        .unwrap()
        .into_iter()
        .filter(|s| s.name.as_str() == name)
        .map(|s| s.pid)
        .collect()
}

fn kill_all(pids: &[u32]) {
    for &p in pids {
        let _ = rustix::process::kill_process(
            rustix::process::Pid::from_raw(p as i32).unwrap(),
            rustix::process::Signal::KILL,
        );
    }
}

#[test]
fn the_first_call_starts_a_defined_service_from_either_client_and_later_calls_find_it() {
    let _w = watchdog(Duration::from_secs(60));
    let dir = TempDir::new("act");
    let defs = Defs::new(&dir);
    let name = unique("ACT");
    defs.write(
        &name,
        &format!("command = [\"{PEER}\", \"serve\", \"{name}\"]\nenv = {{ PEER_FOREVER = \"1\" }}\n"),
    );

    // Off: no start, NoService at once.
    let (code, _, err) = call(dir.path(), &defs, "call", &name, &[("PEER_NO_ACTIVATE", "1")]);
    assert_eq!(code, 1, "{err}");
    assert!(err.starts_with("NoService"), "{err}");
    let (code, _, err) = call(dir.path(), &defs, "call-tokio", &name, &[("PEER_NO_ACTIVATE", "1")]);
    assert!(code == 1 && err.starts_with("NoService"), "{err}");
    assert!(served_by(&dir, &name).is_empty());

    let (code, out, err) = call(dir.path(), &defs, "call", &name, &[]);
    assert_eq!((code, out.as_str()), (0, "hello"), "{err}");
    let pids = served_by(&dir, &name);
    assert_eq!(pids.len(), 1);
    // Detached: a session of its own (util-linux setsid is on every Debian), not the caller's.
    if std::path::Path::new("/usr/bin/setsid").is_file() {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", pids[0])).unwrap();
        let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
        // After the comm field: state, ppid, pgrp, session.
        assert_eq!(fields[3], pids[0].to_string(), "session of the started service: {stat}");
        assert_eq!(fields[2], pids[0].to_string(), "its process group: {stat}");
    }
    // The async client finds it running: no second start.
    let (code, out, err) = call(dir.path(), &defs, "call-tokio", &name, &[]);
    assert_eq!((code, out.as_str()), (0, "hello"), "{err}");
    assert_eq!(served_by(&dir, &name), pids);
    kill_all(&pids);
    assert!(
        eventually(Duration::from_secs(10), || served_by(&dir, &name).is_empty().then_some(())).is_some()
    );
    // Killed, it is started again by the next call (the async client this time).
    let (code, out, err) = call(dir.path(), &defs, "call-tokio", &name, &[]);
    assert_eq!((code, out.as_str()), (0, "hello"), "{err}");
    let again = served_by(&dir, &name);
    assert!(again.len() == 1 && again != pids);
    kill_all(&again);
}

#[test]
fn a_definition_with_instances_starts_them_all() {
    let _w = watchdog(Duration::from_secs(60));
    let dir = TempDir::new("actn");
    let defs = Defs::new(&dir);
    let name = unique("ACTN");
    defs.write(
        &name,
        &format!(
            "command = [\"{PEER}\", \"serve\", \"{name}\"]\ninstances = 3\nenv = {{ PEER_FOREVER = \"1\", PEER_SHARED = \"1\" }}\n"
        ),
    );
    let (code, out, err) = call(dir.path(), &defs, "call", &name, &[]);
    assert_eq!((code, out.as_str()), (0, "hello"), "{err}");
    let all = eventually(Duration::from_secs(10), || {
        let pids = served_by(&dir, &name);
        (pids.len() == 3).then_some(pids)
    });
    let pids = all.expect("three instances");
    kill_all(&pids);
}

#[test]
fn an_idle_timeout_stops_a_server_cleanly_only_after_no_requests_for_that_long() {
    let _w = watchdog(Duration::from_secs(60));
    let dir = TempDir::new("idle");
    let name = unique("IDLE");
    let echo = |r: microcs::Request| Ok::<_, microcs::RemoteError>(r.into_payload());
    let h = dir
        .server(&name)
        .idle_timeout(Some(Duration::from_millis(1500)))
        .bind()
        .unwrap()
        .spawn(echo)
        .unwrap();
    let mut c = dir.client(&name).connect().unwrap();
    // Requests every 400 ms for 3 s: never idle for 1.5 s.
    for _ in 0..8 {
        assert_eq!(c.request(b"x").unwrap(), b"x");
        std::thread::sleep(Duration::from_millis(400));
    }
    assert!(h.wait_timeout(Duration::ZERO).is_none(), "still serving");
    let stopped = h.wait_timeout(Duration::from_secs(10));
    assert!(matches!(stopped, Some(Ok(()))), "{stopped:?}");
    h.shutdown();
    assert!(served_by(&dir, &name).is_empty(), "the name is free");

    // The async server too.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let h = microcs::tokio::Server::builder(&name)
            .runtime_dir(dir.path())
            .idle_timeout(Some(Duration::from_millis(1000)))
            .bind()
            .await
            .unwrap()
            .spawn(|r: microcs::Request| async move { Ok::<_, microcs::RemoteError>(r.into_payload()) })
            .unwrap();
        let t0 = std::time::Instant::now();
        let done = tokio::time::timeout(Duration::from_secs(10), h.wait()).await;
        assert!(matches!(done, Ok(Ok(()))), "{done:?}");
        assert!(t0.elapsed() >= Duration::from_millis(900), "not before the timeout: {:?}", t0.elapsed());
        h.shutdown().await;
    });
    assert!(served_by(&dir, &name).is_empty());
}

/// Fields of /proc/PID/stat after the command name: state, ppid, pgrp, session, ...
fn stat(pid: u32) -> Vec<String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    s.rsplit(')').next().unwrap().split_whitespace().map(str::to_owned).collect()
}

#[test]
fn a_started_service_is_detached_in_a_session_of_its_own() {
    let _w = watchdog(Duration::from_secs(60));
    let dir = TempDir::new("actsid");
    let defs = Defs::new(&dir);
    let name = unique("ACTSID");
    defs.write(
        &name,
        &format!("command = [\"{PEER}\", \"serve\", \"{name}\"]\nenv = {{ PEER_FOREVER = \"1\" }}\n"),
    );
    let (code, out, err) = call(dir.path(), &defs, "call", &name, &[]);
    assert_eq!((code, out.as_str()), (0, "hello"), "{err}");
    let pids = served_by(&dir, &name);
    let pid = pids[0];
    let st = stat(pid);
    assert_eq!(st[2], pid.to_string(), "a process group of its own: {st:?}");
    if ["/usr/bin/setsid", "/bin/setsid"].iter().any(|p| Path::new(p).exists()) {
        assert_eq!(st[3], pid.to_string(), "a session of its own (setsid): {st:?}");
        assert_eq!(st[4], "0", "no controlling terminal: {st:?}");
    }
    assert_eq!(std::fs::read_link(format!("/proc/{pid}/fd/0")).unwrap(), Path::new("/dev/null"));
    kill_all(&pids);
}

#[test]
fn callers_behind_a_failed_start_get_its_error_and_the_command_runs_once() {
    let _w = watchdog(Duration::from_secs(120));
    let dir = TempDir::new("actonce");
    let defs = Defs::new(&dir);
    let name = unique("ACTONCE");
    let runs = defs.0.join("runs");
    // Fails after a moment, so that the other callers are waiting for the lock by then.
    defs.write(
        &name,
        &format!(
            "command = [\"/bin/sh\", \"-c\", \"echo run >> {}; sleep 0.5; echo no board >&2; exit 3\"]\n",
            runs.display()
        ),
    );
    let callers: Vec<_> = (0..30)
        .map(|_| {
            caller(dir.path(), &defs, "call", &name)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for (i, c) in callers.into_iter().enumerate() {
        let out = c.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "caller {i}: {err}");
        assert!(err.starts_with("StartFailed") && err.contains("exit status: 3"), "caller {i}: {err}");
    }
    let n = std::fs::read_to_string(&runs).unwrap().lines().count();
    assert_eq!(n, 1, "thirty callers of a broken definition ran it once");
}

#[test]
fn a_command_that_does_not_register_gets_sigterm_first() {
    let _w = watchdog(Duration::from_secs(60));
    let dir = TempDir::new("actterm");
    let defs = Defs::new(&dir);
    let name = unique("ACTTERM");
    defs.write(
        &name,
        "command = [\"/bin/sh\", \"-c\", \"trap 'echo got SIGTERM; exit 0' TERM; while :; do sleep 0.05; done\"]\nstart_timeout = 0.5\n",
    );
    let (code, _, err) = call(dir.path(), &defs, "call", &name, &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("did not register within the start timeout"), "{err}");
    let log = std::fs::read_to_string(dir.path().join(format!("{name}.log"))).unwrap();
    assert!(log.contains("got SIGTERM"), "stopped with SIGTERM, given time to exit: {log}");
}

#[test]
fn a_call_that_waited_for_a_slow_start_still_gets_its_whole_timeout() {
    let _w = watchdog(Duration::from_secs(60));
    let dir = TempDir::new("actslow");
    let defs = Defs::new(&dir);
    let name = unique("ACTSLOW");
    // The service takes 1.5 s to start; the client's timeout is 1 s.
    defs.write(
        &name,
        &format!(
            "command = [\"{PEER}\", \"serve\", \"{name}\"]\nenv = {{ PEER_FOREVER = \"1\", PEER_DELAY_MS = \"1500\" }}\n"
        ),
    );
    for mode in ["restart-call", "restart-call-tokio"] {
        // The second call of the same client reconnects, and starts the service again.
        let (code, out, err) = call(dir.path(), &defs, mode, &name, &[("PEER_TIMEOUT_MS", "1000")]);
        assert_eq!(code, 0, "{mode}: {err}");
        let pids: Vec<&str> = out.split_whitespace().collect();
        assert!(pids.len() == 2 && pids[0] != pids[1], "{mode}: {out}");
        kill_all(&served_by(&dir, &name));
        assert!(
            eventually(Duration::from_secs(10), || served_by(&dir, &name).is_empty().then_some(())).is_some()
        );
    }
}

fn lines(path: &Path) -> usize {
    std::fs::read_to_string(path).map(|s| s.lines().count()).unwrap_or(0)
}

/// A definition whose command records each run in `runs`, then serves (after PEER_DELAY_MS).
fn define_counted(defs: &Defs, name: &str, runs: &Path, delay_ms: u32) {
    defs.write(
        name,
        &format!(
            "command = [\"/bin/sh\", \"-c\", \"echo run >> {}; exec {PEER} serve {name}\"]\nstart_timeout = \"20s\"\n\
             env = {{ PEER_FOREVER = \"1\", PEER_DELAY_MS = \"{delay_ms}\" }}\n",
            runs.display()
        ),
    );
}

#[test]
fn a_caller_killed_mid_start_does_not_cause_a_second_copy() {
    let _w = watchdog(Duration::from_secs(60));
    let dir = TempDir::new("actkill");
    let defs = Defs::new(&dir);
    let name = unique("ACTKILL");
    let runs = defs.0.join("runs");
    define_counted(&defs, &name, &runs, 1500);
    let mut first = caller(dir.path(), &defs, "call", &name)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    eventually(Duration::from_secs(10), || (lines(&runs) == 1).then_some(()))
        .expect("the first caller started it");
    first.kill().unwrap();
    first.wait().unwrap();
    // The starter is gone (its start lock with it) while the service is still starting: the
    // next caller waits for that start instead of running the command again.
    let (code, out, err) = call(dir.path(), &defs, "call", &name, &[]);
    assert_eq!((code, out.as_str()), (0, "hello"), "{err}");
    assert_eq!(lines(&runs), 1, "a second copy was started");
    let pids = served_by(&dir, &name);
    assert_eq!(pids.len(), 1);
    kill_all(&pids);
}

#[test]
fn an_interrupted_wait_for_a_start_ends_the_call_and_the_start_goes_on() {
    let _w = watchdog(Duration::from_secs(60));
    let dir = TempDir::new("actintr");
    let defs = Defs::new(&dir);
    let name = unique("ACTINTR");
    let runs = defs.0.join("runs");
    define_counted(&defs, &name, &runs, 2000);
    let (code, _, err) = call(dir.path(), &defs, "call", &name, &[("PEER_INTERRUPT_MS", "300")]);
    assert_eq!(code, 1, "{err}");
    assert!(err.starts_with("Io") && err.contains("stopped waiting") && err.contains("interrupted"), "{err}");
    // The start went on: the next caller waits for it, and nothing is started twice.
    let (code, out, err) = call(dir.path(), &defs, "call", &name, &[]);
    assert_eq!((code, out.as_str()), (0, "hello"), "{err}");
    assert_eq!(lines(&runs), 1, "the interrupted start was run again");
    kill_all(&served_by(&dir, &name));
}

#[test]
fn with_activation_off_no_service_says_there_is_a_definition() {
    let _w = watchdog(Duration::from_secs(60));
    let dir = TempDir::new("actoffmsg");
    let defs = Defs::new(&dir);
    let name = unique("ACTOFFMSG");
    let runs = defs.0.join("runs");
    define_counted(&defs, &name, &runs, 0);
    for mode in ["call", "call-tokio"] {
        let (code, _, err) = call(dir.path(), &defs, mode, &name, &[("PEER_NO_ACTIVATE", "1")]);
        assert_eq!(code, 1, "{mode}: {err}");
        assert!(err.starts_with("NoService"), "{mode}: {err}");
        assert!(err.contains(&format!("microcs start {name}")) && err.contains(".toml"), "{mode}: {err}");
    }
    assert_eq!(lines(&runs), 0, "nothing was started");
    // Without a definition, the plain message.
    let other = unique("ACTNODEF");
    let (_, _, err) = call(dir.path(), &defs, "call", &other, &[("PEER_NO_ACTIVATE", "1")]);
    assert!(err.starts_with("NoService") && !err.contains("microcs start"), "{err}");
}

#[test]
fn definitions_are_also_found_in_xdg_config_dirs_with_lower_precedence() {
    let _w = watchdog(Duration::from_secs(60));
    let dir = TempDir::new("actxdg");
    let base = dir.path().with_extension("xdg");
    let _ = std::fs::remove_dir_all(&base);
    let mk = |p: &Path| std::fs::DirBuilder::new().recursive(true).mode(0o700).create(p).unwrap();
    let (user, sys1, sys2) = (base.join("home"), base.join("sys1"), base.join("sys2"));
    for d in [&user, &sys1, &sys2] {
        mk(&d.join("microcs/services"));
    }
    let name = unique("ACTXDG");
    let def = |d: &Path, tag: &str| {
        let path = d.join("microcs/services").join(format!("{name}.toml"));
        let body = format!(
            "command = [\"{PEER}\", \"serve\", \"{name}\"]\nenv = {{ PEER_FOREVER = \"1\", PEER_TAG = \"{tag}\" }}\n"
        );
        std::fs::write(&path, body).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    };
    let run = |env_tag: &str| {
        let out = Command::new(PEER)
            .args(["call-method", &name, "env", "PEER_TAG"])
            .env("MICROCS_RUNTIME_DIR", dir.path())
            .env_remove("MICROCS_SERVICES_DIR")
            .env_remove("MICROCS_NO_ACTIVATION")
            .env("XDG_CONFIG_HOME", &user)
            .env("XDG_CONFIG_DIRS", format!("{}:{}", sys1.display(), sys2.display()))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert_eq!(text, env_tag, "{}", String::from_utf8_lossy(&out.stderr));
        let pids = served_by(&dir, &name);
        kill_all(&pids);
        eventually(Duration::from_secs(10), || served_by(&dir, &name).is_empty().then_some(())).unwrap();
    };
    def(&sys2, "sys2");
    run("sys2");
    def(&sys1, "sys1");
    run("sys1");
    def(&user, "user");
    run("user");
    let _ = std::fs::remove_dir_all(&base);
}

#[test]
fn the_log_is_appended_per_start_rotated_and_never_followed_through_a_symlink() {
    let _w = watchdog(Duration::from_secs(60));
    let dir = TempDir::new("actlog");
    let defs = Defs::new(&dir);
    let name = unique("ACTLOG");
    let runs = defs.0.join("runs");
    defs.write(
        &name,
        &format!(
            "command = [\"/bin/sh\", \"-c\", \"echo run >> {r}; echo attempt $(wc -l < {r}) >&2; exit 3\"]\n",
            r = runs.display()
        ),
    );
    let log = dir.path().join(format!("{name}.log"));
    let (_, _, first) = call(dir.path(), &defs, "call", &name, &[]);
    assert!(first.starts_with("StartFailed") && first.contains("attempt 1"), "{first}");
    let (_, _, second) = call(dir.path(), &defs, "call", &name, &[]);
    // Only this start's lines are quoted; the log has both starts, each with its header.
    assert!(second.contains("attempt 2") && !second.contains("attempt 1"), "{second}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(text.matches("--- microcs: ").count(), 2, "{text}");
    assert!(text.contains("attempt 1") && text.contains("attempt 2"), "{text}");
    // Past 1 MiB it moves to NAME.log.1 before the next start.
    std::fs::write(&log, vec![b'x'; (1 << 20) + 1]).unwrap();
    let (_, _, third) = call(dir.path(), &defs, "call", &name, &[]);
    assert!(third.contains("attempt 3"), "{third}");
    assert_eq!(std::fs::metadata(log.with_extension("log.1")).unwrap().len(), (1 << 20) + 1);
    assert!(std::fs::metadata(&log).unwrap().len() < 4096);
    // A symlink in its place is refused, and what it points to is not touched.
    let target = dir.path().join("precious");
    std::fs::write(&target, b"keep").unwrap();
    std::fs::remove_file(&log).unwrap();
    std::os::unix::fs::symlink(&target, &log).unwrap();
    let (code, _, err) = call(dir.path(), &defs, "call", &name, &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.starts_with("PermissionDenied") && err.contains("symlink") && err.contains("rm "), "{err}");
    assert_eq!(std::fs::read(&target).unwrap(), b"keep");
    assert_eq!(lines(&runs), 3, "not started with the log refused");
}

#[test]
fn a_malformed_idle_timeout_variable_is_an_error_and_units_are_accepted() {
    let _w = watchdog(Duration::from_secs(60));
    let dir = TempDir::new("idleenv");
    let name = unique("IDLEENV");
    let out = Command::new(PEER)
        .args(["serve", &name])
        .env("MICROCS_RUNTIME_DIR", dir.path())
        .env("MICROCS_IDLE_TIMEOUT", "soon")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.starts_with("InvalidConfig") && err.contains("MICROCS_IDLE_TIMEOUT") && err.contains("soon"),
        "{err}"
    );
    assert!(served_by(&dir, &name).is_empty());
    // "500ms" is a duration: the server idles out by itself.
    let mut p = crate::common::PeerProcess::serve_with(
        dir.path(),
        &name,
        &[("MICROCS_IDLE_TIMEOUT", "500ms"), ("PEER_FOREVER", "1")],
    );
    let status = p.exited(Duration::from_secs(20)).expect("idled out");
    assert!(status.success(), "{status}");
}
