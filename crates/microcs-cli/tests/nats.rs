//! The `microcs` binary over NATS: `serve --nats`, `call`/`ping`/`info`/`stats`/`bench`/`ls
//! --nats`, against a real `nats-server`.
//!
//! The broker is the one `scripts/test nats` started (`MICROCS_TEST_NATS_URL`), else one these
//! tests start on a free loopback port. Without a `nats-server` binary the broker tests skip,
//! saying so on stderr; with `MICROCS_REQUIRE_NATS=1` (set by that stage) they fail instead.
//!
//! Caller and server always get different runtime directories, so a call that works went over
//! NATS: the server's local socket (when it has one) is not where the caller looks.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use microcs_testsupport::{Broker, Nats};
use serde_json::Value;

const EXE: &str = env!("CARGO_BIN_EXE_microcs");
/// No single command of these tests comes near this; past it, it is killed and the test fails.
const WATCHDOG: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// The broker.

const WHO: &str = "the NATS tests of the CLI";

macro_rules! nats_or_skip {
    () => {
        match Nats::get(WHO) {
            Some(n) => n,
            None => return,
        }
    };
}

// ---------------------------------------------------------------------------------------------
// Running `microcs`.

/// A private runtime directory (removed at the end) and a clean environment: no NATS settings
/// but those a test gives.
struct Env {
    dir: PathBuf,
    vars: Vec<(String, String)>,
}

impl Env {
    fn new(tag: &str) -> Env {
        use std::os::unix::fs::DirBuilderExt;
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "mcs-cli-nats-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::DirBuilder::new().mode(0o700).create(&dir).unwrap();
        Env { dir, vars: Vec::new() }
    }

    /// The same directory, with an environment variable set for every command.
    fn with(mut self, key: &str, value: &str) -> Env {
        self.vars.push((key.into(), value.into()));
        self
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(EXE);
        c.args(args).env("MICROCS_RUNTIME_DIR", &self.dir).env_remove("XDG_RUNTIME_DIR");
        for k in [
            "MICROCS_NATS_URL",
            "MICROCS_TRANSPORT",
            "MICROCS_NATS_USER",
            "MICROCS_NATS_PASSWORD",
            "MICROCS_NATS_TOKEN",
            "MICROCS_NATS_CREDS",
            "MICROCS_NATS_CA",
        ] {
            c.env_remove(k);
        }
        c.envs(self.vars.iter().map(|(k, v)| (k, v)));
        c
    }

    /// Runs `microcs ARGS` to completion, under the watchdog.
    fn run(&self, args: &[&str]) -> Out {
        let child = self
            .cmd(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start microcs");
        let start = Instant::now();
        let mut child = child;
        loop {
            match child.try_wait().unwrap() {
                Some(_) => break,
                None if start.elapsed() > WATCHDOG => {
                    let _ = child.kill();
                    panic!("`microcs {args:?}` ran past the watchdog");
                }
                None => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        let Output { status, stdout, stderr } = child.wait_with_output().unwrap();
        Out { status, stdout, stderr: String::from_utf8_lossy(&stderr).into_owned() }
    }

    /// Starts `microcs --json serve ARGS` and waits for its `ready` event (or its failure).
    fn serve(&self, args: &[&str]) -> Serving {
        let mut full = vec!["--json", "serve"];
        full.extend_from_slice(args);
        let mut child = self
            .cmd(&full)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start microcs serve");
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let Ok(first) = rx.recv_timeout(WATCHDOG) else {
            let _ = child.kill();
            let mut err = String::new();
            let _ = child.stderr.take().unwrap().read_to_string(&mut err);
            panic!("`microcs serve {args:?}` did not become ready: {err}");
        };
        let ready: Value = serde_json::from_str(&first).unwrap();
        assert_eq!(ready["event"], "ready", "{first}");
        Serving { child: Some(child), lines: rx, ready }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A finished `microcs` run.
#[derive(Debug)]
struct Out {
    status: ExitStatus,
    stdout: Vec<u8>,
    stderr: String,
}

impl Out {
    fn code(&self) -> i32 {
        self.status.code().expect("exited normally")
    }
    fn text(&self) -> String {
        String::from_utf8(self.stdout.clone()).expect("utf-8 stdout")
    }
    fn json(&self) -> Value {
        serde_json::from_slice(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {:?} / {}", self.text(), self.stderr))
    }
    #[track_caller]
    fn ok(self) -> Out {
        assert_eq!(
            self.code(),
            0,
            "stdout: {:?}\nstderr: {}",
            String::from_utf8_lossy(&self.stdout),
            self.stderr
        );
        self
    }
    /// Fails with `code`, one line on stderr.
    #[track_caller]
    fn fails(self, code: i32) -> Out {
        assert_eq!(self.code(), code, "{self:?}");
        assert_eq!(self.stderr.trim().lines().count(), 1, "one line: {}", self.stderr);
        self
    }
}

/// A running `microcs serve`; killed if the test ends without stopping it.
struct Serving {
    child: Option<Child>,
    lines: mpsc::Receiver<String>,
    ready: Value,
}

impl Serving {
    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// SIGTERM, then waits for the exit (under the watchdog); its status and JSON events.
    fn terminate(mut self) -> (ExitStatus, Vec<String>) {
        let pid = rustix::process::Pid::from_raw(self.pid() as i32).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
        let mut child = self.child.take().unwrap();
        let start = Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            assert!(start.elapsed() < WATCHDOG, "microcs serve did not exit");
            std::thread::sleep(Duration::from_millis(5));
        };
        let mut lines = Vec::new();
        while let Ok(line) = self.lines.recv_timeout(WATCHDOG) {
            lines.push(line);
        }
        (status, lines)
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A service name no other test (or test run on a shared broker) uses; valid on NATS (no dots).
fn unique(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("{tag}_{}_{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst))
}

fn sock_exists(dir: &Path, name: &str) -> bool {
    dir.join(format!("{name}.sock")).exists()
}

/// The `ls --json` entries of `name`.
fn listed<'a>(ls: &'a Value, name: &str) -> Vec<&'a Value> {
    ls["services"].as_array().expect("services").iter().filter(|s| s["name"] == name).collect()
}

// ---------------------------------------------------------------------------------------------
// Tests.

#[test]
fn serve_on_nats_only_and_call_ls_ping_info_stats_bench_from_elsewhere() {
    let nats = nats_or_skip!();
    let url = nats.url();
    let url = url.as_str();
    let (server_env, caller) = (Env::new("srv"), Env::new("caller"));
    let name = unique("CLI_NATS");
    let srv = server_env.serve(&[
        &name,
        "--nats",
        url,
        "--transport",
        "nats",
        "--method",
        "fail=echo boom on stderr >&2; exit 3",
        "--method",
        "peer=printf '%s/%s' \"$MICROCS_PEER_PID\" \"$MICROCS_PEER_UID\"",
        "--",
        "tr",
        "a-z",
        "A-Z",
    ]);
    assert_eq!(srv.ready["where"], serde_json::json!(["nats"]), "{}", srv.ready);
    assert_eq!(srv.ready["socket"], Value::Null);
    assert_eq!(srv.ready["nats_url"], url);
    // NATS only: no local name claimed, anywhere.
    assert!(!sock_exists(&server_env.dir, &name));
    assert_eq!(server_env.run(&["ls", "--json"]).ok().json()["services"], serde_json::json!([]));

    // Without NATS the caller cannot reach it: nothing local answers to the name.
    let out = caller.run(&["call", &name, "hello"]).fails(1);
    assert!(out.stderr.contains("no service named"), "{}", out.stderr);

    // With --nats, or with MICROCS_NATS_URL, it answers.
    assert_eq!(caller.run(&["call", &name, "hello", "--nats", url]).ok().text(), "HELLO");
    let j = caller.run(&["--json", "call", &name, "over nats", "--nats", url]).ok().json();
    assert_eq!(j["reply"], "OVER NATS");
    assert_eq!(j["via"], "nats", "{j}");
    assert_eq!(j["nats_url"], url);
    let caller_env = Env::new("caller-env").with("MICROCS_NATS_URL", url);
    assert_eq!(caller_env.run(&["call", &name, "from env"]).ok().text(), "FROM ENV");
    // A NATS caller has no kernel-checked identity: pid 0, uid (uid_t)-1.
    assert_eq!(
        caller.run(&["call", &name, "-m", "peer", "--nats", url]).ok().text(),
        format!("0/{}", u32::MAX)
    );

    // A failing command over NATS: exit 1 with the remote error, as locally.
    let out = caller.run(&["call", &name, "--method", "fail", "--nats", url]).fails(1);
    assert!(out.stdout.is_empty(), "{out:?}");
    assert!(out.stderr.contains("boom on stderr") && out.stderr.contains("exit status 3"), "{}", out.stderr);
    let j = caller.run(&["--json", "call", &name, "-m", "fail", "--nats", url]).json();
    assert_eq!(j["error"]["kind"], "remote error", "{j}");
    assert_eq!(j["error"]["code"], 500);
    assert_eq!(j["error"]["exit_code"], 1);
    // A method it does not have: on NATS nobody listens on its subject, so "no service" for
    // that method (exit 1 too).
    let out = caller.run(&["call", &name, "--method", "nope", "--nats", url]).fails(1);
    assert!(out.stderr.contains("method 'nope'"), "{}", out.stderr);

    // ls --nats: listed once, found on NATS, with its info and its counters.
    let ls = caller.run(&["ls", "--nats", url, "--json"]).ok().json();
    assert_eq!(ls["nats_url"], url);
    assert_eq!(ls["nats_error"], Value::Null);
    let rows = listed(&ls, &name);
    assert_eq!(rows.len(), 1, "{ls}");
    let row = rows[0];
    assert_eq!(row["where"], serde_json::json!(["nats"]));
    assert_eq!(row["pid"], srv.pid());
    assert_eq!(row["socket"], Value::Null);
    assert_eq!(row["methods"], serde_json::json!(["fail", "peer"]));
    assert_eq!(row["info"]["type"], "io.nats.micro.v1.info_response");
    assert_eq!(row["info"]["id"], row["id"]);
    assert!(row["info"]["description"].as_str().unwrap().contains("tr a-z A-Z"), "{row}");
    let subjects: Vec<&str> =
        row["info"]["endpoints"].as_array().unwrap().iter().map(|e| e["subject"].as_str().unwrap()).collect();
    assert_eq!(subjects, [name.clone(), format!("{name}.fail"), format!("{name}.peer")]);
    // Six requests reached it so far, two of them failed.
    assert_eq!((row["requests"].as_u64(), row["errors"].as_u64()), (Some(6), Some(2)), "{row}");
    assert!(row["started"].is_string() && row["uptime_s"].is_u64(), "{row}");
    let text = caller.run(&["ls", "--nats", url]).ok().text();
    let line = text.lines().find(|l| l.starts_with(&name)).unwrap_or_else(|| panic!("{name} in:\n{text}"));
    assert!(text.starts_with("NAME") && text.contains("WHERE"), "{text}");
    assert!(line.contains(" nats ") && line.contains(&srv.pid().to_string()), "{line}");
    // --transport nats lists NATS only; with MICROCS_NATS_URL no flag is needed.
    assert_eq!(listed(&caller_env.run(&["ls", "--json"]).ok().json(), &name).len(), 1);
    assert_eq!(
        listed(&caller.run(&["ls", "--json", "--nats", url, "--transport", "nats"]).ok().json(), &name).len(),
        1
    );
    // Without a URL, local services only.
    assert_eq!(listed(&caller.run(&["ls", "--json"]).ok().json(), &name).len(), 0);

    // ping, info, stats, bench over NATS.
    let j = caller.run(&["ping", &name, "-c", "2", "-i", "0", "--nats", url, "--json"]).ok().json();
    assert_eq!((j["sent"].as_u64(), j["received"].as_u64()), (Some(2), Some(2)), "{j}");
    assert_eq!(j["via"], "nats");
    let text = caller.run(&["ping", &name, "-c", "1", "--nats", url]).ok().text();
    assert!(text.starts_with(&format!("PING {name} via NATS at {url}")), "{text}");
    let j = caller.run(&["info", &name, "--nats", url, "--json"]).ok().json();
    assert_eq!(j["name"], name.as_str());
    assert_eq!(j["metadata"]["pid"], srv.pid().to_string());
    let text = caller.run(&["info", &name, "--nats", url]).ok().text();
    assert!(text.contains(&format!("NATS at {url}")) && text.contains("--nats URL"), "{text}");
    let j = caller.run(&["stats", &name, "--nats", url, "--json"]).ok().json();
    assert_eq!(j["type"], "io.nats.micro.v1.stats_response");
    assert_eq!(j["endpoints"][0]["num_requests"], 3, "hello, over nats, from env: {j}");
    let j = caller
        .run(&["bench", &name, "-m", "$ping", "-d", "200ms", "--warmup", "5", "--nats", url, "--json"])
        .ok()
        .json();
    assert_eq!(j["via"], "nats", "{j}");
    assert!(j["requests"].as_u64().unwrap() > 0 && j["errors"] == 0, "{j}");

    // Stopped: gone from NATS at once.
    let (status, events) = srv.terminate();
    assert_eq!(status.code(), Some(0));
    assert!(events.last().unwrap().contains("\"stopped\""), "{events:?}");
    let out = caller.run(&["call", &name, "x", "--nats", url]).fails(1);
    assert!(out.stderr.contains("no service named") && out.stderr.contains("NATS"), "{}", out.stderr);
}

#[test]
fn no_responders_is_no_service_at_once() {
    let nats = nats_or_skip!();
    let url = nats.url();
    let url = url.as_str();
    let env = Env::new("nobody");
    let name = unique("CLI_NOBODY");
    let t0 = Instant::now();
    let out = env.run(&["call", &name, "x", "--nats", url, "--timeout", "30s"]).fails(1);
    // Not a timeout: the broker says nobody listens (the 30 s timeout never ran out).
    assert!(t0.elapsed() < Duration::from_secs(30));
    assert!(out.stderr.contains(&format!("no service named '{name}'")), "{}", out.stderr);
    assert!(out.stderr.contains("on NATS") && out.stderr.contains("microcs ls --nats"), "{}", out.stderr);
    let j = env.run(&["--json", "call", &name, "--nats", url, "--transport", "nats"]).json();
    assert_eq!(j["error"]["kind"], "no service", "{j}");
    assert_eq!(j["error"]["exit_code"], 1);
    for args in [
        &["ping", &name, "-c", "1", "--nats", url][..],
        &["info", &name, "--nats", url],
        &["stats", &name, "--nats", url],
    ] {
        let out = env.run(args);
        assert_eq!(out.code(), 1, "{args:?}: {out:?}");
        assert!(out.stderr.contains("no service named"), "{}", out.stderr);
    }
}

#[test]
fn served_locally_and_on_nats_is_one_instance() {
    let nats = nats_or_skip!();
    let url = nats.url();
    let url = url.as_str();
    let (here, elsewhere) = (Env::new("here"), Env::new("elsewhere"));
    let name = unique("CLI_BOTH");
    let srv = here.serve(&[&name, "--echo", "--nats", url]);
    assert_eq!(srv.ready["where"], serde_json::json!(["local", "nats"]));
    assert!(sock_exists(&here.dir, &name));
    // The same directory: the local socket (local first even with a URL); elsewhere: NATS.
    let j = here.run(&["--json", "call", &name, "a", "--nats", url]).ok().json();
    assert_eq!(j["via"], "local", "{j}");
    let j = elsewhere.run(&["--json", "call", &name, "b", "--nats", url]).ok().json();
    assert_eq!(j["via"], "nats", "{j}");
    // --transport local never goes to NATS.
    elsewhere.run(&["call", &name, "c", "--transport", "local"]).fails(1);

    let ls = here.run(&["ls", "--json", "--nats", url]).ok().json();
    let rows = listed(&ls, &name);
    assert_eq!(rows.len(), 1, "one instance, one row: {ls}");
    assert_eq!(rows[0]["where"], serde_json::json!(["local", "nats"]));
    assert!(rows[0]["socket"].is_string() && rows[0]["info"]["name"] == name.as_str(), "{}", rows[0]);
    assert_eq!(rows[0]["requests"], 2);
    let text = here.run(&["ls", "--nats", url]).ok().text();
    assert!(text.lines().any(|l| l.starts_with(&name) && l.contains("local+nats")), "{text}");
    // Without NATS, the table is the local one, as before.
    let text = here.run(&["ls"]).ok().text();
    assert!(text.starts_with("NAME") && !text.contains("WHERE"), "{text}");
}

/// `serve --instances N --nats URL`: each worker is a local instance and a NATS micro service of
/// its own; `ls --nats` shows one row per worker, local and NATS merged where they are the same
/// instance.
#[test]
fn instances_on_nats_too_are_one_row_each() {
    let nats = nats_or_skip!();
    let url = nats.url();
    let url = url.as_str();
    let (here, elsewhere) = (Env::new("insthere"), Env::new("instelse"));
    let name = unique("CLI_INST");
    let srv = here.serve(&[&name, "--echo", "--instances", "2", "--nats", url]);
    assert_eq!(srv.ready["instances"], 2, "{}", srv.ready);
    let workers: Vec<u64> =
        srv.ready["workers"].as_array().unwrap().iter().map(|w| w.as_u64().unwrap()).collect();
    // Callers elsewhere go over NATS; the queue group spreads them over both workers.
    for i in 0..20 {
        let j = elsewhere.run(&["--json", "call", &name, &format!("m{i}"), "--nats", url]).ok().json();
        assert_eq!(j["via"], "nats", "{j}");
    }
    let ls = here.run(&["ls", "--json", "--nats", url]).ok().json();
    let rows = listed(&ls, &name);
    assert_eq!(rows.len(), 2, "one row per worker: {ls}");
    let mut pids: Vec<u64> = rows.iter().map(|r| r["pid"].as_u64().unwrap()).collect();
    pids.sort_unstable();
    let mut expected = workers.clone();
    expected.sort_unstable();
    assert_eq!(pids, expected, "{ls}");
    for r in &rows {
        assert_eq!(r["where"], serde_json::json!(["local", "nats"]), "{r}");
        assert!(r["requests"].as_u64().unwrap() > 0, "both workers got some of the calls: {ls}");
    }
    let total: u64 = rows.iter().map(|r| r["requests"].as_u64().unwrap()).sum();
    assert_eq!(total, 20, "{ls}");
    let (status, _) = srv.terminate();
    assert!(status.success());
}

#[test]
fn credentials_come_from_the_environment_only() {
    // A broker of our own (even in the NATS stage: the shared one has no users), that wants a
    // user and password.
    let Some(broker) = Broker::start(WHO, &["--user", "cli", "--pass", "hunter2"]) else { return };
    let url = broker.url();
    let secret_url = url.replace("nats://", "nats://cli:hunter2@");
    let env = Env::new("auth");
    let name = unique("CLI_AUTH");
    // Refused on the command line (and the secret is not repeated).
    for args in [
        &["serve", &name, "--echo", "--nats", &secret_url][..],
        &["call", &name, "--nats", &secret_url],
        &["ls", "--nats", &secret_url],
    ] {
        let out = env.run(args).fails(2);
        assert!(out.stderr.contains("MICROCS_NATS_PASSWORD") && out.stderr.contains("ps"), "{}", out.stderr);
        assert!(!out.stderr.contains("hunter2"), "{}", out.stderr);
    }
    // Without credentials the broker refuses: a clear error naming the variables.
    let out = env.run(&["serve", &name, "--echo", "--nats", &url]).fails(2);
    assert!(out.stderr.contains("refused our credentials"), "{}", out.stderr);
    // From the environment they work, for serving, calling and listing.
    let authed =
        Env::new("auth-ok").with("MICROCS_NATS_USER", "cli").with("MICROCS_NATS_PASSWORD", "hunter2");
    let _srv = authed.serve(&[&name, "--echo", "--nats", &url, "--transport", "nats"]);
    let caller =
        Env::new("auth-caller").with("MICROCS_NATS_USER", "cli").with("MICROCS_NATS_PASSWORD", "hunter2");
    assert_eq!(caller.run(&["call", &name, "secret-free", "--nats", &url]).ok().text(), "secret-free");
    assert_eq!(listed(&caller.run(&["ls", "--nats", &url, "--json"]).ok().json(), &name).len(), 1);
    // A URL in MICROCS_NATS_URL is not checked (the environment is not visible in ps): the
    // credentials written in it are used, and the password is never shown.
    let via_env = Env::new("auth-env").with("MICROCS_NATS_URL", &secret_url);
    let out = via_env.run(&["ls", "--json"]).ok();
    let j = out.json();
    assert_eq!(j["nats_url"], url.replace("nats://", "nats://cli:***@"), "masked: {j}");
    assert_eq!(listed(&j, &name).len(), 1, "{j}");
    assert!(!out.stderr.contains("hunter2") && !out.text().contains("hunter2"), "{out:?}");
    assert_eq!(via_env.run(&["call", &name, "via-url"]).ok().text(), "via-url");
    // A wrong password in it: refused, and neither password is shown.
    let wrong = Env::new("auth-env-bad").with("MICROCS_NATS_URL", &secret_url.replace("hunter2", "wrong-pw"));
    let out = wrong.run(&["ls", "--json"]).ok();
    let j = out.json();
    assert!(j["nats_error"].as_str().unwrap().contains("refused our credentials"), "{j}");
    assert!(out.stderr.contains("warning: not listing NATS services"), "{}", out.stderr);
    assert!(!format!("{out:?}").contains("wrong-pw"), "{out:?}");
}

#[test]
fn nats_flags_are_checked_before_anything_runs() {
    // None of these needs a broker: each is refused as a usage error (exit 2), one line.
    let env = Env::new("flags");
    let url = "nats://127.0.0.1:4222";
    let cases: &[(&[&str], &str)] = &[
        (&["serve", "X", "--echo", "--transport", "nats"], "needs --nats URL"),
        (&["serve", "X", "--echo", "--transport", "local", "--nats", url], "contradict"),
        (&["call", "X", "--transport", "local", "--nats", url], "contradict"),
        (&["call", "X", "--transport", "nats"], "needs a NATS URL"),
        (&["ls", "--transport", "nats"], "needs a NATS URL"),
        (&["call", "X", "--nats", " "], "empty"),
        (&["call", "X", "--transport", "tcp"], "invalid value"),
        // Checked before the NATS server is contacted (nobody listens on port 1).
        (&["serve", "org.example", "--echo", "--nats", "nats://127.0.0.1:1"], "no dots"),
        (&["serve", "X", "-m", "v1.step=true", "--nats", "nats://127.0.0.1:1"], "no dots"),
    ];
    for (args, says) in cases {
        let out = env.run(args);
        assert_eq!(out.code(), 2, "{args:?}: {out:?}");
        assert!(out.stderr.contains(says), "{args:?}: {}", out.stderr);
    }
    let out = env.with("MICROCS_TRANSPORT", "carrier-pigeon").run(&["call", "X"]).fails(2);
    assert!(out.stderr.contains("MICROCS_TRANSPORT"), "{}", out.stderr);
    // --help says where credentials go.
    let env = Env::new("help");
    for cmd in ["serve", "call", "ls", "ping", "info", "stats", "bench"] {
        let text = env.run(&[cmd, "--help"]).ok().text();
        assert!(text.contains("--nats <URL>"), "{cmd}: {text}");
        assert!(
            text.contains("MICROCS_NATS_PASSWORD") && text.contains("MICROCS_NATS_CREDS"),
            "{cmd}: {text}"
        );
    }
}
