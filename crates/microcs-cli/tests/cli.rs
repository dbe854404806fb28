//! End-to-end tests of the `microcs` binary: real `microcs serve` processes, real sockets.
//!
//! Every test gets its own private runtime directory (MICROCS_RUNTIME_DIR) and its own service
//! names, and every process it starts is bounded by a watchdog, so nothing can hang or collide.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

const EXE: &str = env!("CARGO_BIN_EXE_microcs");
/// No single command of these tests comes near this; past it, it is killed and the test fails.
const WATCHDOG: Duration = Duration::from_secs(60);

/// A private runtime directory, removed at the end.
struct Env {
    dir: PathBuf,
}

impl Env {
    fn new(tag: &str) -> Env {
        use std::os::unix::fs::DirBuilderExt;
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "mcs-cli-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::DirBuilder::new().mode(0o700).create(&dir).unwrap();
        Env { dir }
    }

    /// A service name unique to this test process.
    fn name(&self, tag: &str) -> String {
        format!("{tag}_{}", std::process::id())
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(EXE);
        c.args(args).env("MICROCS_RUNTIME_DIR", &self.dir).env_remove("XDG_RUNTIME_DIR");
        // Local only, whatever the shell running the tests says (tests/nats.rs covers NATS).
        c.env_remove("MICROCS_NATS_URL").env_remove("MICROCS_TRANSPORT");
        c
    }

    /// Runs `microcs ARGS` to completion (with `stdin` as input), under the watchdog.
    fn run_with(&self, args: &[&str], stdin: &[u8]) -> Out {
        let mut child = self
            .cmd(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start microcs");
        let mut input = child.stdin.take().unwrap();
        let data = stdin.to_vec();
        let writer = std::thread::spawn(move || {
            let _ = input.write_all(&data);
        });
        let out = wait_output(child, args);
        writer.join().unwrap();
        out
    }

    fn run(&self, args: &[&str]) -> Out {
        self.run_with(args, b"")
    }

    /// Starts `microcs --json serve ARGS` and waits for its `ready` event.
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
        let first = match rx.recv_timeout(WATCHDOG) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                let mut err = String::new();
                let _ = child.stderr.take().unwrap().read_to_string(&mut err);
                panic!("`microcs serve {args:?}` did not become ready: {err}");
            }
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
}

fn wait_output(mut child: Child, args: &[&str]) -> Out {
    let start = Instant::now();
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

    fn signal(&self, sig: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_raw(self.pid() as i32).unwrap();
        rustix::process::kill_process(pid, sig).unwrap();
    }

    /// Waits for the process to exit (under the watchdog); returns its status and stderr.
    fn wait(mut self) -> (ExitStatus, Vec<String>, String) {
        let mut child = self.child.take().unwrap();
        let start = Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if start.elapsed() > WATCHDOG {
                let _ = child.kill();
                panic!("microcs serve did not exit");
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let mut err = String::new();
        let _ = child.stderr.take().unwrap().read_to_string(&mut err);
        // Everything it printed, up to the end of its stdout (the reader thread may lag the exit).
        let mut lines = Vec::new();
        while let Ok(line) = self.lines.recv_timeout(WATCHDOG) {
            lines.push(line);
        }
        (status, lines, err)
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

fn sock_exists(dir: &Path, name: &str) -> bool {
    dir.join(format!("{name}.sock")).exists()
}

#[test]
fn serve_echo_then_call_ls_ping_info_stats_bench() {
    let env = Env::new("tour");
    let name = env.name("ECHO");
    let srv = env.serve(&[&name, "--echo"]);
    assert_eq!(srv.ready["name"], name.as_str());
    assert_eq!(srv.ready["pid"], srv.pid());

    // call: raw bytes out, nothing added.
    let out = env.run(&["call", &name, "Give me some data back!!"]).ok();
    assert_eq!(out.stdout, b"Give me some data back!!");
    let binary = [0u8, 159, 146, 150, b'\n', 255];
    let out = env.run_with(&["call", &name, "-"], &binary).ok();
    assert_eq!(out.stdout, binary);
    let j = env.run_with(&["call", &name, "-", "--json"], &binary).ok().json();
    assert_eq!(j["reply"], Value::Null, "not UTF-8, so no text");
    assert_eq!(j["reply_base64"], "AJ+Slgr/");
    assert_eq!(j["bytes"], 6);
    let j = env.run(&["--json", "call", &name, "héllo"]).ok().json();
    assert_eq!(j["reply"], "héllo");
    assert_eq!(j["name"], name.as_str());
    assert_eq!(j["method"], Value::Null);

    // ls: human table and JSON, with the counts from $stats.
    let out = env.run(&["ls"]).ok();
    let text = out.text();
    assert!(text.starts_with("NAME"), "{text}");
    assert!(text.contains(&name) && text.contains(&srv.pid().to_string()), "{text}");
    let j = env.run(&["ls", "--json"]).ok().json();
    let svcs = j["services"].as_array().unwrap();
    assert_eq!(svcs.len(), 1, "{j}");
    assert_eq!(svcs[0]["name"], name.as_str());
    assert_eq!(svcs[0]["pid"], srv.pid());
    assert_eq!(svcs[0]["requests"], 4, "four calls so far: {j}");
    assert_eq!(svcs[0]["errors"], 0);
    assert!(svcs[0]["uptime_s"].is_u64() && svcs[0]["started"].is_string());

    // ping: per-reply lines and the summary.
    let out = env.run(&["ping", &name, "-c", "3", "-i", "10ms"]).ok();
    let text = out.text();
    assert_eq!(text.matches("reply from").count(), 3, "{text}");
    assert!(text.contains("3 pings sent, 3 replies, 0% loss"), "{text}");
    assert!(text.contains("rtt min/avg/max/mdev = "), "{text}");
    let j = env.run(&["ping", &name, "-c", "2", "-i", "0", "--json"]).ok().json();
    assert_eq!((j["sent"].as_u64(), j["received"].as_u64()), (Some(2), Some(2)), "{j}");
    assert_eq!(j["loss_pct"], 0.0);
    let (min, avg, max) =
        (j["min_ms"].as_f64().unwrap(), j["avg_ms"].as_f64().unwrap(), j["max_ms"].as_f64().unwrap());
    assert!(0.0 < min && min <= avg && avg <= max, "{j}");
    assert_eq!(j["replies"].as_array().unwrap().len(), 2);

    // info and stats.
    let out = env.run(&["info", &name]).ok();
    assert!(out.text().contains("echoes every request"), "{}", out.text());
    let j = env.run(&["info", &name, "--json"]).ok().json();
    assert_eq!(j["type"], "io.nats.micro.v1.info_response");
    assert_eq!(j["name"], name.as_str());
    assert_eq!(j["endpoints"][0]["name"], "default");
    let j = env.run(&["stats", &name, "--json"]).ok().json();
    assert_eq!(j["type"], "io.nats.micro.v1.stats_response");
    assert_eq!(j["endpoints"][0]["num_requests"], 4, "{j}");
    let out = env.run(&["stats", &name]).ok();
    assert!(out.text().contains("ENDPOINT") && out.text().contains("default"), "{}", out.text());

    // bench: percentiles and throughput, human and JSON.
    let j = env
        .run(&["bench", &name, "--duration", "1", "--clients", "2", "--size", "100", "--json"])
        .ok()
        .json();
    let requests = j["requests"].as_u64().unwrap();
    assert!(requests > 0, "{j}");
    assert_eq!(j["errors"], 0);
    assert_eq!(j["clients"], 2);
    assert_eq!(j["payload_bytes"], 100);
    assert!(j["duration_s"].as_f64().unwrap() >= 1.0, "{j}");
    assert!(j["throughput_rps"].as_f64().unwrap() > 0.0);
    let lat = &j["latency_us"];
    let ps: Vec<f64> =
        ["min", "p50", "p90", "p99", "p999", "max"].iter().map(|k| lat[k].as_f64().unwrap()).collect();
    assert!(ps[0] > 0.0 && ps.windows(2).all(|w| w[0] <= w[1]), "percentiles in order: {lat}");
    let out = env.run(&["bench", &name, "-d", "300ms", "-m", "$ping"]).ok();
    let text = out.text();
    for word in ["p50", "p90", "p99", "p99.9", "req/s"] {
        assert!(text.contains(word), "{word} in {text}");
    }
    // Not a terminal: no progress bar escape codes.
    assert!(!out.stderr.contains('\r'), "{:?}", out.stderr);

    // The counts of bench show in ls afterwards.
    let j = env.run(&["ls", "--json"]).ok().json();
    assert!(j["services"][0]["requests"].as_u64().unwrap() >= 4 + requests, "{j}");
}

#[test]
fn shm_on_serve_call_ping_bench_and_the_transport_in_ls_and_stats() {
    let env = Env::new("shm");
    let name = env.name("SHM");
    let _srv = env.serve(&[&name, "--echo", "--shm"]);
    let out = env.run(&["call", &name, "over the rings", "--shm"]).ok();
    assert_eq!(out.stdout, b"over the rings");
    let out = env.run(&["ping", &name, "--shm", "-c", "2", "-i", "0"]).ok();
    assert!(out.text().contains("over shared memory"), "{}", out.text());
    let j = env.run(&["bench", &name, "--shm", "-d", "200ms", "-c", "2", "--json"]).ok().json();
    assert_eq!(j["transport"], "shm", "{j}");
    assert!(j["requests"].as_u64().unwrap() > 0 && j["errors"] == 0, "{j}");
    let j = env.run(&["bench", &name, "-d", "100ms", "--json"]).ok().json();
    assert_eq!(j["transport"], "unix", "without --shm: the socket: {j}");
    // A connection on shared memory is counted by ls and stats while it is open.
    let child =
        env.cmd(&["ping", &name, "--shm", "-c", "0", "-i", "50ms", "-q"]).stdout(Stdio::null()).spawn();
    let _child = KillOnDrop(child.unwrap());
    let listed = eventually(Duration::from_secs(10), || {
        let j = env.run(&["ls", "--json"]).ok().json();
        j["services"][0]["connections_shm"] == 1 && j["services"][0]["connections_unix"] == 1
    });
    assert!(listed, "ls counts the shm connection and its own");
    let text = env.run(&["ls"]).ok().text();
    assert!(text.contains("SHM") && text.contains("1/2"), "{text}");
    // Other commands ask for shared memory with MICROCS_SHM=1.
    let out = env.cmd(&["stats", &name]).env("MICROCS_SHM", "1").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("connections: 0 unix, 2 shm (this one: shm)"), "{text}");
}

#[test]
fn shm_ring_sets_the_ring_size_and_a_bad_size_is_refused_before_serving() {
    let env = Env::new("shmring");
    let name = env.name("SHMRING");
    let _srv = env.serve(&[&name, "--echo", "--shm", "--shm-ring", "4K"]);
    // 64 KiB through 4 KiB rings, both ways.
    let big = "r".repeat(64 * 1024);
    let out = env.run(&["call", &name, &big, "--shm"]).ok();
    assert_eq!(out.stdout, big.as_bytes());
    let j = env.run(&["bench", &name, "--shm", "-d", "100ms", "-s", "10K", "--json"]).ok().json();
    assert_eq!(j["transport"], "shm", "{j}");
    assert!(j["requests"].as_u64().unwrap() > 0 && j["errors"] == 0, "{j}");
    for bad in ["5000", "2K", "128M", "8192M"] {
        let out = env.run(&["serve", &env.name("BADRING"), "--echo", "--shm", "--shm-ring", bad]);
        assert_eq!(out.code(), 2, "{bad}: {out:?}");
        assert!(
            out.stderr.contains("--shm-ring") && out.stderr.contains("power of two"),
            "{bad}: {}",
            out.stderr
        );
    }
    // Also with --instances: refused before any worker starts.
    let out =
        env.run(&["serve", &env.name("BADRING"), "--echo", "--shm", "--shm-ring", "3K", "--instances", "2"]);
    assert_eq!(out.code(), 2, "{out:?}");
    // Without --shm it means nothing: clap says so.
    let out = env.run(&["serve", &env.name("NOSHM"), "--echo", "--shm-ring", "4K"]);
    assert_eq!(out.code(), 2, "{out:?}");
    assert!(out.stderr.contains("--shm"), "{}", out.stderr);
}

/// Kills the child when dropped.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn bench_pins_its_clients_with_cpus() {
    let env = Env::new("cpus");
    let name = env.name("CPUS");
    let _srv = env.serve(&[&name, "--echo"]);
    let j = env.run(&["bench", &name, "-d", "200ms", "-c", "2", "--cpus", "0", "--json"]).ok().json();
    assert_eq!(j["cpus"], serde_json::json!([0]), "{j}");
    assert!(j["requests"].as_u64().unwrap() > 0, "{j}");
    let j = env.run(&["bench", &name, "-d", "100ms", "--json"]).ok().json();
    assert!(j["cpus"].is_null(), "{j}");
    // A CPU this machine does not have: a local error (2) that says so, nothing measured.
    let out = env.run(&["bench", &name, "-d", "100ms", "--cpus", "1023"]);
    assert_eq!(out.code(), 2, "{out:?}");
    assert!(out.stderr.contains("cannot pin a client to CPU 1023"), "{}", out.stderr);
    let out = env.run(&["bench", &name, "--cpus", "3-1"]);
    assert_eq!(out.code(), 2, "{out:?}");
}

#[test]
fn serve_command_replies_with_stdout_and_failures_carry_stderr() {
    let env = Env::new("cmd");
    let name = env.name("UPPER");
    let _srv = env.serve(&[
        &name,
        "--method",
        "fail=echo something went wrong >&2; echo partial; exit 3",
        "--method",
        "env=printf '%s %s' \"$MICROCS_SERVICE\" \"$MICROCS_METHOD\"",
        "--method",
        "bg=sleep 60 & echo started",
        "--",
        "tr",
        "a-z",
        "A-Z",
    ]);
    let out = env.run(&["call", &name, "hello"]).ok();
    assert_eq!(out.text(), "HELLO");
    let out = env.run_with(&["call", &name, "-"], b"from stdin\n").ok();
    assert_eq!(out.text(), "FROM STDIN\n");
    let out = env.run(&["call", &name, "-m", "env"]).ok();
    assert_eq!(out.text(), format!("{name} env"));
    // A background process does not hold the reply back (it is killed when the command exits).
    let out = env.run(&["call", &name, "-m", "bg", "--timeout", "20s"]).ok();
    assert_eq!(out.text(), "started\n");

    // A failing command: exit 1, its stderr reaches the caller, stdout stays empty.
    let out = env.run(&["call", &name, "--method", "fail", "x"]);
    assert_eq!(out.code(), 1, "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    assert!(out.stderr.contains("something went wrong"), "{}", out.stderr);
    assert!(out.stderr.contains("exit status 3"), "{}", out.stderr);
    assert_eq!(out.stderr.trim().lines().count(), 1, "one line: {}", out.stderr);
    let j = env.run(&["--json", "call", &name, "--method", "fail"]).json();
    assert_eq!(j["error"]["kind"], "remote error");
    assert_eq!(j["error"]["code"], 500);
    assert_eq!(j["error"]["exit_code"], 1);
    assert!(j["error"]["message"].as_str().unwrap().contains("something went wrong"));

    // Unknown method: the service says which it has.
    let out = env.run(&["call", &name, "--method", "nope"]);
    assert_eq!(out.code(), 1);
    assert!(out.stderr.contains("404") && out.stderr.contains("fail"), "{}", out.stderr);

    // The failure is counted by the service.
    let j = env.run(&["stats", &name, "--json"]).ok().json();
    let fail = j["endpoints"].as_array().unwrap().iter().find(|e| e["name"] == "fail").unwrap().clone();
    assert_eq!(fail["num_errors"], 2, "{j}");
    assert!(fail["last_error"].as_str().unwrap().contains("something went wrong"));
}

#[test]
fn a_command_past_its_deadline_is_killed() {
    let env = Env::new("late");
    let name = env.name("SLOW");
    let marker = env.dir.join("finished");
    let script = format!("sleep 1; touch {}", marker.display());
    let _srv = env.serve(&[&name, "--method", &format!("slow={script}")]);
    let t0 = Instant::now();
    let out = env.run(&["call", &name, "-m", "slow", "--timeout", "300ms"]);
    assert_eq!(out.code(), 1, "{out:?}");
    assert!(out.stderr.contains("did not answer"), "{}", out.stderr);
    // The service notices the deadline and kills the command (and its process group): the
    // stats say so, and the command never gets to finish.
    let start = Instant::now();
    let last_error = loop {
        let j = env.run(&["stats", &name, "--json"]).ok().json();
        let e = j["endpoints"][1]["last_error"].as_str().unwrap().to_owned();
        if !e.is_empty() || start.elapsed() > Duration::from_secs(20) {
            break e;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(last_error.contains("deadline") && last_error.contains("killed"), "{last_error}");
    // Had it not been killed, it would have touched the marker 1 s after the call.
    std::thread::sleep(Duration::from_millis(1600).saturating_sub(t0.elapsed()));
    assert!(!marker.exists(), "the killed command must not have finished");
}

#[test]
fn requests_run_concurrently_but_bounded_by_jobs() {
    let env = Env::new("jobs");
    // Concurrent: `a` waits for a file that only `b` creates, so both finish only if they run
    // at the same time.
    let flag = env.dir.join("b-ran");
    let name = env.name("PAIR");
    let _srv = env.serve(&[
        &name,
        "--jobs",
        "2",
        "--method",
        &format!("a=while [ ! -e {0} ]; do sleep 0.01; done; echo a", flag.display()),
        "--method",
        &format!("b=touch {}; echo b", flag.display()),
    ]);
    let waiting = env.cmd(&["call", &name, "-m", "a", "-t", "30s"]).stdout(Stdio::piped()).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(env.run(&["call", &name, "-m", "b"]).ok().text(), "b\n");
    let out = wait_output(waiting, &["call a"]);
    assert_eq!(out.ok().text(), "a\n");

    // Bounded: with --jobs 1, two 300 ms commands take at least 600 ms together.
    let name = env.name("ONE");
    let _srv1 = env.serve(&[&name, "--jobs", "1", "--", "sh", "-c", "sleep 0.3; echo done"]);
    let start = Instant::now();
    let first = env.cmd(&["call", &name]).stdout(Stdio::piped()).spawn().unwrap();
    let second = env.run(&["call", &name]).ok();
    assert_eq!(second.text(), "done\n");
    assert_eq!(wait_output(first, &["first"]).ok().text(), "done\n");
    assert!(start.elapsed() >= Duration::from_millis(600), "one at a time: {:?}", start.elapsed());
}

#[test]
fn life_service_steps_boards_and_rejects_bad_ones() {
    let env = Env::new("life");
    let name = env.name("LIFE");
    let _srv = env.serve(&[&name, "--life"]);
    let out = env.run_with(&["call", &name, "-"], b".....\n..#..\n..#..\n..#..\n.....\n").ok();
    assert_eq!(out.text(), ".....\n.....\n.###.\n.....\n.....\n");
    let blinker = ".....\n..#..\n..#..\n..#..\n.....\n";
    let out = env.run_with(&["call", &name, "-m", "steps", "-"], format!("2\n{blinker}").as_bytes()).ok();
    assert_eq!(out.text(), blinker, "a blinker has period 2");
    let out = env.run_with(&["call", &name, "-"], b"..\n.x\n");
    assert_eq!(out.code(), 1);
    assert!(out.stderr.contains("400") && out.stderr.contains("row 2, column 2"), "{}", out.stderr);
}

/// `--life --jobs 1` computes one request at a time (a serial service, as one behind a lock):
/// while a stream of generations holds the one slot, another request waits and times out; once
/// the stream is gone, requests are answered again. Without `--jobs` the same request is
/// answered at once.
#[test]
fn life_with_jobs_1_serves_one_request_at_a_time() {
    let env = Env::new("lifejobs");
    let glider = ".#......\n..#.....\n###.....\n........\n........\n........\n";
    for serial in [false, true] {
        let name = env.name(if serial { "LSERIAL" } else { "LPARALLEL" });
        let mut args = vec![name.as_str(), "--life"];
        if serial {
            args.extend(["--jobs", "1"]);
        }
        let _srv = env.serve(&args);
        // 100000 generations streamed to a caller that stops reading after the first bytes:
        // the stream stays open (no credit), holding its slot, until the caller is killed.
        let mut holder = env
            .cmd(&["call", &name, "-m", "run", "--stream", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut input = holder.stdin.take().unwrap();
        input.write_all(format!("100000\n{glider}").as_bytes()).unwrap();
        drop(input);
        let mut first = [0u8; 1];
        holder.stdout.as_mut().unwrap().read_exact(&mut first).unwrap();

        let out = env.run_with(&["call", &name, "-t", "500ms", "-"], glider.as_bytes());
        if serial {
            assert_eq!(out.code(), 1, "waits for the slot: {}", out.stderr);
        } else {
            assert_eq!(out.ok().text().lines().count(), 6);
        }
        holder.kill().unwrap();
        holder.wait().unwrap();
        // The stream is cancelled when its caller goes, and frees its slot.
        let t0 = Instant::now();
        loop {
            let out = env.run_with(&["call", &name, "-t", "2s", "-"], glider.as_bytes());
            if out.code() == 0 {
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(20), "the slot was never freed: {}", out.stderr);
        }
    }
}

#[test]
fn exit_codes_0_1_2() {
    let env = Env::new("codes");
    let name = env.name("CODES");
    // 2: usage errors (clap's, and ours).
    for args in [
        &["no-such-command"][..],
        &["call"],
        &["ping", "X", "-c", "lots"],
        &["call", "X", "--timeout", "soon"],
        &["serve", "X"],
        &["completions", "powershell"],
    ] {
        let out = env.run(args);
        assert_eq!(out.code(), 2, "{args:?}: {out:?}");
        assert!(!out.stderr.is_empty(), "{args:?}");
    }
    // 2: a name that is not valid, a program that does not exist.
    let out = env.run(&["call", "a b", "x"]);
    assert_eq!(out.code(), 2, "{out:?}");
    assert!(out.stderr.contains("invalid service name"), "{}", out.stderr);
    let out = env.run(&["serve", &name, "--", "/no/such/program-xyz"]);
    assert_eq!(out.code(), 2, "{out:?}");
    assert!(out.stderr.contains("cannot find the program"), "{}", out.stderr);
    // 0: help and version.
    assert!(env.run(&["--help"]).ok().text().contains("Usage"));
    assert!(env.run(&["serve", "--help"]).ok().text().contains("--method"));
    assert!(env.run(&["--version"]).ok().text().starts_with("microcs "));

    // 1: no such service, for every command that talks to one.
    for args in [
        &["call", &name, "x"][..],
        &["ping", &name, "-c", "1"],
        &["info", &name],
        &["stats", &name],
        &["bench", &name, "-d", "100ms"],
    ] {
        let out = env.run(args);
        assert_eq!(out.code(), 1, "{args:?}: {out:?}");
        assert_eq!(out.stderr.trim().lines().count(), 1, "one line: {}", out.stderr);
        assert!(
            out.stderr.contains("no service named") && out.stderr.contains("microcs serve"),
            "{}",
            out.stderr
        );
    }
    let j = env.run(&["--json", "call", &name]).json();
    assert_eq!(j["error"]["kind"], "no service");
    assert_eq!(j["error"]["exit_code"], 1);

    // With a service: 0, then 1 for a remote error and a timeout, 2 for taking its name.
    let srv = env.serve(&[&name, "--echo", "--method", "slow=sleep 2", "--method", "fail=exit 1"]);
    env.run(&["call", &name, "hi"]).ok();
    assert_eq!(env.run(&["call", &name, "-m", "fail"]).code(), 1);
    let out = env.run(&["call", &name, "-m", "slow", "-t", "100ms"]);
    assert_eq!(out.code(), 1);
    assert!(out.stderr.contains("--timeout"), "{}", out.stderr);
    let j = env.run(&["--json", "call", &name, "-m", "slow", "-t", "100ms"]).json();
    assert_eq!(j["error"]["kind"], "timed out");
    let out = env.run(&["serve", &name, "--echo"]);
    assert_eq!(out.code(), 2, "{out:?}");
    assert!(out.stderr.contains("taken") && out.stderr.contains(&srv.pid().to_string()), "{}", out.stderr);
    // bench with a failing method: the report is printed, and the status says it failed.
    let out = env.run(&["bench", &name, "-m", "fail", "-d", "100ms", "--warmup", "0"]);
    assert_eq!(out.code(), 1, "{out:?}");
    assert!(out.stderr.contains("requests failed"), "{}", out.stderr);
}

#[test]
fn sigterm_and_sigint_stop_gracefully_and_free_the_name() {
    use rustix::process::Signal;
    let env = Env::new("term");
    let name = env.name("TERM");
    for (sig, label) in [(Signal::TERM, "SIGTERM"), (Signal::INT, "SIGINT")] {
        let srv = env.serve(&[&name, "--echo"]);
        env.run(&["call", &name, "x"]).ok();
        assert!(sock_exists(&env.dir, &name));
        srv.signal(sig);
        let (status, lines, err) = srv.wait();
        assert_eq!(status.code(), Some(0), "{label}: {err}");
        let stopped: Value = serde_json::from_str(lines.last().expect("stopped event")).unwrap();
        assert_eq!(stopped["event"], "stopped");
        assert_eq!(stopped["signal"], label);
        assert!(err.contains("the name is free"), "{err}");
        assert!(!sock_exists(&env.dir, &name), "socket removed");
        let j = env.run(&["ls", "--json"]).ok().json();
        assert_eq!(j["services"].as_array().unwrap().len(), 0, "{j}");
        assert_eq!(env.run(&["call", &name, "x"]).code(), 1, "nobody serves it now");
    }
    // ...and it can be served again at once.
    let _again = env.serve(&[&name, "--echo"]);
    env.run(&["call", &name, "x"]).ok();
}

#[test]
fn closed_stdout_exits_quietly() {
    let env = Env::new("pipe");
    let name = env.name("PIPE");
    let _srv = env.serve(&[&name, "--echo"]);
    // Endless pings, as `microcs ping NAME -c 0 -i 0 | head -1` would read them.
    let mut child = env
        .cmd(&["ping", &name, "-c", "0", "-i", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    stdout.read_line(&mut first).unwrap();
    assert!(first.starts_with("PING"), "{first}");
    drop(stdout);
    let out = wait_output(child, &["ping forever"]);
    assert_eq!(out.code(), 0, "{out:?}");
    assert_eq!(out.stderr, "", "quiet");
}

#[test]
fn help_says_what_the_tool_is_and_the_exit_status_rule() {
    let env = Env::new("help");
    for flag in ["--help", "-h"] {
        let text = env.run(&[flag]).ok().text();
        // The description comes first; the exit-status rule is in both the short and long help.
        assert!(text.starts_with("Call local services by name"), "{flag}: {text}");
        let status = text.find("Exit status: 0 success, 1 the request failed").expect("the exit-status note");
        assert!(text[status..].contains("2 usage or local error"), "{text}");
        assert!(!text.contains("The subcommands"), "{text}");
    }
}

#[test]
fn completions_for_each_shell() {
    let env = Env::new("compl");
    for shell in ["bash", "zsh", "fish"] {
        let text = env.run(&["completions", shell]).ok().text();
        assert!(text.contains("microcs") && text.contains("serve") && text.contains("bench"), "{shell}");
    }
}

#[test]
fn demo_runs_the_whole_story_and_cleans_up() {
    let env = Env::new("demo");
    let out = env.run(&["demo", "--bench-duration", "300ms"]).ok();
    let text = out.text();
    for word in
        ["LIFE_GEN", "microcs serve", "microcs ls", "rtt min/avg/max/mdev", "p99", "is free again", "Try it"]
    {
        assert!(text.contains(word), "{word:?} in:\n{text}");
    }
    let j = env.run(&["--json", "demo"]).ok().json();
    assert_eq!(j["name"], "LIFE_GEN");
    assert_eq!(j["name_freed"], true);
    assert_eq!(j["exit_code"], 0);
    let gens = j["generations"].as_array().unwrap();
    assert_eq!(gens.len(), 5);
    assert_eq!(gens[4], "........\n..#.....\n...#....\n.###....\n........\n........\n", "glider moved");
    assert_eq!(j["services"][0]["name"], "LIFE_GEN");
    assert_eq!(j["ping"]["received"], 3);
    assert!(j["bench"]["requests"].as_u64().unwrap() > 0);
    // The demo used its own runtime directory, not ours, and removed it.
    let dir = PathBuf::from(j["runtime_dir"].as_str().unwrap());
    assert_ne!(dir, env.dir);
    assert!(!dir.exists(), "{} removed", dir.display());
    assert_eq!(std::fs::read_dir(&env.dir).unwrap().count(), 0);
}

#[test]
fn sigterm_under_load_drains_in_flight_calls_and_exits_0() {
    use rustix::process::Signal;
    let env = Env::new("termload");
    let name = env.name("TERMLOAD");
    let marks = env.dir.join("started");
    std::fs::create_dir(&marks).unwrap();
    let slow_cmd = format!("slow=touch {}/$$; sleep 0.4; cat", marks.display());
    let srv = env.serve(&[&name, "--echo", "--method", &slow_cmd]);
    // Slow calls in flight in other processes, and a flood of quick ones from this one.
    let slow: Vec<Child> = (0..4)
        .map(|i| {
            env.cmd(&["call", &name, "-m", "slow", &format!("slow {i}")])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let (dir, n) = (env.dir.clone(), name.clone());
    let flood = std::thread::spawn(move || {
        let mut c = microcs::Client::builder(&n).runtime_dir(&dir).connect().unwrap();
        let (mut ok, mut refused) = (0u32, 0u32);
        for i in 0..100_000u32 {
            match c.request(&i.to_be_bytes()) {
                Ok(r) => {
                    assert_eq!(r, i.to_be_bytes(), "misrouted reply");
                    ok += 1;
                }
                // Once the server stops, calls fail with a typed error, never a wrong answer.
                Err(e) => {
                    assert!(
                        matches!(e.kind(), microcs::ErrorKind::NoService | microcs::ErrorKind::Closed),
                        "{e:?}"
                    );
                    refused += 1;
                    break;
                }
            }
        }
        (ok, refused)
    });
    // SIGTERM once all four slow commands are running (each marks its start).
    let t0 = Instant::now();
    while std::fs::read_dir(&marks).unwrap().count() < 4 {
        assert!(t0.elapsed() < WATCHDOG, "the slow calls never started");
        std::thread::sleep(Duration::from_millis(5));
    }
    srv.signal(Signal::TERM);
    let (status, _lines, err) = srv.wait();
    assert_eq!(status.code(), Some(0), "{err}");
    for (i, child) in slow.into_iter().enumerate() {
        let out = wait_output(child, &["call"]);
        assert_eq!(out.code(), 0, "slow call {i} was in flight at SIGTERM and must finish: {}", out.stderr);
        assert_eq!(out.text(), format!("slow {i}"));
    }
    let (ok, refused) = flood.join().unwrap();
    assert!(ok > 0 && refused == 1, "flood: {ok} ok, {refused} refused");
}

/// The pids `microcs ls --json` shows for `name` (a name listed twice would show two).
fn listed(env: &Env, name: &str) -> Vec<u64> {
    let j = env.run(&["ls", "--json"]).ok().json();
    let services = j["services"].as_array().unwrap().iter();
    services.filter(|s| s["name"] == name).filter_map(|s| s["pid"].as_u64()).collect()
}

/// Polls `f` (every 20 ms) until it is true, for at most `limit`.
fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

#[test]
fn serve_takes_its_name_back_after_the_runtime_dir_is_removed() {
    let env = Env::new("restore");
    let name = env.name("RESTORE");
    let srv = env.serve(&[&name, "--echo"]);
    std::fs::remove_dir_all(&env.dir).unwrap();
    let pid = u64::from(srv.pid());
    let back = eventually(Duration::from_secs(15), || {
        env.cmd(&["call", &name, "x"]).output().is_ok_and(|o| o.status.success())
            && listed(&env, &name) == [pid]
    });
    assert!(back, "served and listed once again: {:?}", listed(&env, &name));
    assert_eq!(env.run(&["call", &name, "back"]).ok().stdout, b"back");
}

#[test]
fn serve_stops_with_status_2_when_its_name_was_taken_while_its_files_were_gone() {
    use rustix::process::Signal;
    let env = Env::new("lost");
    let name = env.name("LOST");
    let first = env.serve(&[&name, "--echo"]);
    // Stopped, the first server cannot look before the second one owns the name.
    first.signal(Signal::STOP);
    std::fs::remove_dir_all(&env.dir).unwrap();
    let second = env.serve(&[&name, "--echo"]);
    first.signal(Signal::CONT);
    let (status, _lines, err) = first.wait();
    assert_eq!(status.code(), Some(2), "{err}");
    let why = format!("now belongs to process {}", second.pid());
    assert!(err.contains(&format!("microcs: error: service '{name}' stops")) && err.contains(&why), "{err}");
    assert!(!err.contains("the name is free"), "{err}");
    assert_eq!(listed(&env, &name), [u64::from(second.pid())]);
    assert_eq!(env.run(&["call", &name, "x"]).ok().stdout, b"x", "the second server serves");
}

#[test]
fn call_to_a_stopped_server_says_it_holds_the_name_but_is_not_answering() {
    use rustix::process::Signal;
    let env = Env::new("frozen");
    let name = env.name("FROZEN");
    let srv = env.serve(&[&name, "--echo"]);
    /// Continues the server whatever happens to the test.
    struct Cont<'a>(&'a Serving);
    impl Drop for Cont<'_> {
        fn drop(&mut self) {
            self.0.signal(Signal::CONT);
        }
    }
    srv.signal(Signal::STOP);
    let cont = Cont(&srv);
    let out = env.run(&["call", &name, "x", "--timeout", "1s"]);
    assert_eq!(out.code(), 1, "{out:?}");
    let want = format!("service '{name}' (pid {}) holds the name but is not answering", srv.pid());
    assert!(out.stderr.contains(&want) && out.stderr.contains("stopped or overloaded?"), "{}", out.stderr);
    assert!(!out.stderr.contains("microcs service"), "{}", out.stderr);
    drop(cont);
    assert_eq!(env.run(&["call", &name, "x"]).ok().stdout, b"x");
}

#[test]
fn call_stream_prints_each_item_and_json_lines_and_life_runs_as_a_stream() {
    let env = Env::new("stream");
    let name = env.name("LIFES");
    let _srv = env.serve(&[&name, "--life"]);
    let glider = ".#......\n..#.....\n###.....\n........\n........\n";
    let input = format!("4\n{glider}");
    // Each generation as an item, in order; the last is what `steps` computes.
    let streamed = env.run_with(&["call", &name, "-m", "run", "--stream", "-"], input.as_bytes()).ok().text();
    let last = env.run_with(&["call", &name, "-m", "steps", "-"], input.as_bytes()).ok().text();
    let one =
        env.run_with(&["call", &name, "-m", "steps", "-"], format!("1\n{glider}").as_bytes()).ok().text();
    assert!(streamed.starts_with(&one), "{streamed}");
    assert!(streamed.ends_with(&last), "{streamed}");
    assert_eq!(streamed.len(), 4 * last.len(), "{streamed}");
    // --json: one object per item, then the end.
    let out = env.run_with(&["--json", "call", &name, "-m", "run", "--stream", "-"], input.as_bytes()).ok();
    let lines: Vec<Value> = out.text().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 5, "{}", out.text());
    for (i, item) in lines[..4].iter().enumerate() {
        assert_eq!(item["index"], i as u64);
        assert!(item["item"].as_str().unwrap().contains('#'));
    }
    assert_eq!(lines[4]["end"], true);
    assert_eq!(lines[4]["items"], 4);
    // A bad board fails before any item, with exit status 1.
    let bad = env.run_with(&["call", &name, "-m", "run", "--stream", "-"], b"x\n#");
    assert_eq!(bad.code(), 1, "{bad:?}");
    assert!(bad.stderr.contains("number of generations"), "{bad:?}");
}

#[test]
fn serve_lines_streams_each_output_line_and_kills_the_command_when_the_caller_leaves() {
    let env = Env::new("lines");
    let name = env.name("LINES");
    let pidfile = env.dir.join("cmd.pid");
    let script = format!(
        "p=$(cat); if [ \"$p\" = forever ]; then echo $$ > {}; while :; do echo tick; sleep 0.01; done; fi; \
         for i in 1 2 3; do echo line $i; sleep 0.05; done; [ \"$p\" != fail ] || {{ echo broke >&2; exit 3; }}",
        pidfile.display()
    );
    let _srv = env.serve(&[&name, "--lines", "--", "sh", "-c", &script]);
    assert_eq!(env.run(&["call", &name, "--stream", "go"]).ok().text(), "line 1\nline 2\nline 3\n");
    // A command that fails after its lines: the lines, then its error (exit status 1).
    let failed = env.run(&["call", &name, "--stream", "fail"]);
    assert_eq!((failed.code(), failed.text().as_str()), (1, "line 1\nline 2\nline 3\n"), "{failed:?}");
    assert!(failed.stderr.contains("exit status 3: broke"), "{failed:?}");
    // A plain call of a streaming default handler is refused.
    let plain = env.run(&["call", &name, "go"]);
    assert_eq!(plain.code(), 1, "{plain:?}");
    assert!(plain.stderr.contains("stream"), "{plain:?}");
    // The caller stops reading (`| head -1`): the call ends quietly and the server kills the
    // command's process group.
    let mut child = env
        .cmd(&["call", &name, "--stream", "forever"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    stdout.read_line(&mut first).unwrap();
    assert_eq!(first, "tick\n");
    drop(stdout);
    let out = wait_output(child, &["call --stream forever"]);
    assert_eq!(out.code(), 0, "{out:?}");
    let pid: i32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
    let t0 = Instant::now();
    while std::path::Path::new(&format!("/proc/{pid}")).exists() {
        assert!(t0.elapsed() < Duration::from_secs(10), "the command of a cancelled stream still runs");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `microcs ls --json`'s services named `name`: (instance slot, pid).
fn instances(env: &Env, name: &str) -> Vec<(u64, u64)> {
    let j = env.run(&["ls", "--json"]).ok().json();
    let services = j["services"].as_array().unwrap().iter();
    services
        .filter(|s| s["name"] == name)
        .map(|s| (s["instance"].as_u64().expect("an instance"), s["pid"].as_u64().unwrap()))
        .collect()
}

#[test]
fn serve_instances_supervises_workers_restarts_a_killed_one_and_frees_the_name_on_sigterm() {
    use rustix::process::Signal;
    let env = Env::new("inst");
    let name = env.name("INST");
    let srv = env.serve(&[&name, "--echo", "--instances", "3"]);
    let workers: Vec<u64> =
        srv.ready["workers"].as_array().unwrap().iter().map(|p| p.as_u64().unwrap()).collect();
    assert_eq!(workers.len(), 3, "{}", srv.ready);
    let listed = instances(&env, &name);
    assert_eq!(listed.iter().map(|l| l.0).collect::<Vec<_>>(), [0, 1, 2]);
    assert_eq!(
        listed.iter().map(|l| l.1).collect::<std::collections::BTreeSet<_>>(),
        workers.iter().copied().collect()
    );
    let table = env.run(&["ls"]).ok().text();
    assert!(table.starts_with("NAME") && table.contains("INSTANCE") && table.contains("#2 of 3"), "{table}");
    // Each instance answers for itself.
    let info = env.run(&["--json", "info", &name, "--instance", "1"]).ok().json();
    let on_1 = listed.iter().find(|l| l.0 == 1).unwrap().1;
    assert_eq!(info["metadata"]["pid"], on_1.to_string(), "{info}");

    // A worker killed with SIGKILL is restarted (and says so); calls keep being answered.
    let victim = workers[1];
    rustix::process::kill_process(rustix::process::Pid::from_raw(victim as i32).unwrap(), Signal::KILL)
        .unwrap();
    let restarted: Value = serde_json::from_str(&srv.lines.recv_timeout(WATCHDOG).unwrap()).unwrap();
    assert_eq!(
        (restarted["event"].as_str(), restarted["old_pid"].as_u64()),
        (Some("restarted"), Some(victim))
    );
    assert_eq!(restarted["status"], "signal 9");
    let new_pid = restarted["pid"].as_u64().unwrap();
    assert!(eventually(Duration::from_secs(20), || instances(&env, &name).iter().any(|l| l.1 == new_pid)));
    assert_eq!(instances(&env, &name).len(), 3);
    for i in 0..10 {
        assert_eq!(env.run(&["call", &name, &format!("m{i}")]).ok().text(), format!("m{i}"));
    }

    // SIGTERM drains all of them; nothing is left behind.
    srv.signal(Signal::TERM);
    let (status, lines, err) = srv.wait();
    assert_eq!(status.code(), Some(0), "{err}");
    let stopped: Value = serde_json::from_str(lines.last().expect("stopped event")).unwrap();
    assert_eq!(stopped["event"], "stopped");
    assert!(err.contains("restarting it in") && err.contains("the name is free"), "{err}");
    assert!(instances(&env, &name).is_empty());
    let left: Vec<_> = std::fs::read_dir(&env.dir).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(left.is_empty(), "{left:?}");
    for w in workers.iter().chain([&new_pid]) {
        assert!(!Path::new(&format!("/proc/{w}")).exists(), "worker {w} is gone");
    }
}

#[test]
fn serve_instances_refuses_a_name_served_exclusively_and_shared_cannot_join_it() {
    let env = Env::new("instx");
    let name = env.name("INSTX");
    let _owner = env.serve(&[&name, "--echo"]);
    let out = env.run(&["serve", &name, "--echo", "--instances", "2"]);
    assert_eq!(out.code(), 2, "{}", out.stderr);
    assert!(
        out.stderr.contains("exclusive server") && out.stderr.contains("could not start"),
        "{}",
        out.stderr
    );
    let out = env.run(&["serve", &name, "--echo", "--shared"]);
    assert_eq!(out.code(), 2, "{}", out.stderr);
    assert!(out.stderr.contains("exclusive server"), "{}", out.stderr);
    // And the other way round.
    let other = env.name("INSTY");
    let _a = env.serve(&[&other, "--echo", "--shared"]);
    let out = env.run(&["serve", &other, "--echo"]);
    assert_eq!(out.code(), 2, "{}", out.stderr);
    assert!(out.stderr.contains("1 shared instance") && out.stderr.contains("--shared"), "{}", out.stderr);
}

/// A private directory of service definitions for the activation tests.
struct Defs {
    dir: PathBuf,
}

impl Defs {
    fn new(env: &Env) -> Defs {
        use std::os::unix::fs::DirBuilderExt;
        let dir = env.dir.with_extension("defs");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::DirBuilder::new().mode(0o700).create(&dir).unwrap();
        Defs { dir }
    }

    fn write(&self, name: &str, toml: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = self.dir.join(format!("{name}.toml"));
        std::fs::write(&path, toml).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        path
    }

    /// A definition that serves NAME with `--echo` (and whatever `extra` adds), appending a line
    /// to `count` each time it starts.
    fn echo(&self, name: &str, count: &Path, extra: &str) -> PathBuf {
        self.write(
            name,
            &format!(
                "command = [\"sh\", \"-c\", \"echo started >> {}; exec {EXE} serve {name} --echo\"]\n{extra}",
                count.display()
            ),
        )
    }

    fn cmd(&self, env: &Env, args: &[&str]) -> Command {
        let mut c = env.cmd(args);
        c.env("MICROCS_SERVICES_DIR", &self.dir).env_remove("MICROCS_NO_ACTIVATION");
        c
    }

    fn run(&self, env: &Env, args: &[&str]) -> Out {
        let child = self.cmd(env, args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        wait_output(child, args)
    }
}

impl Drop for Defs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn starts(count: &Path) -> usize {
    std::fs::read_to_string(count).map(|s| s.lines().count()).unwrap_or(0)
}

#[test]
fn a_call_starts_a_defined_service_exactly_once_under_50_racing_callers() {
    let env = Env::new("act");
    let defs = Defs::new(&env);
    let name = env.name("ACT");
    let count = defs.dir.join("count");
    defs.echo(&name, &count, "start_timeout = 20.0\n");
    let callers: Vec<_> = (0..50)
        .map(|i| {
            let args = ["call", name.as_str(), &format!("hi {i}")].map(str::to_owned);
            defs.cmd(&env, &args.each_ref().map(String::as_str))
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for (i, c) in callers.into_iter().enumerate() {
        let out = wait_output(c, &["call"]);
        assert_eq!(out.code(), 0, "caller {i}: {}", out.stderr);
        assert_eq!(out.text(), format!("hi {i}"));
    }
    assert_eq!(starts(&count), 1, "started once");
    let log = std::fs::read_to_string(env.dir.join(format!("{name}.log"))).unwrap();
    assert!(log.contains("serving"), "its stderr goes to the log: {log}");
    // status / stop, for people.
    let st = defs.run(&env, &["--json", "status", &name]).ok().json();
    assert_eq!(st["running"], true, "{st}");
    assert!(st["definition"].as_str().unwrap().ends_with(&format!("{name}.toml")));
    defs.run(&env, &["stop", &name]).ok();
    assert!(listed(&env, &name).is_empty());
    let st = defs.run(&env, &["--json", "status", &name]).ok().json();
    assert_eq!(st["running"], false, "{st}");
    // start: without a call; twice is fine.
    defs.run(&env, &["start", &name]).ok();
    assert_eq!(listed(&env, &name).len(), 1);
    let again = defs.run(&env, &["start", &name]).ok();
    assert!(again.stderr.contains("already running"), "{}", again.stderr);
    assert_eq!(starts(&count), 2);
    defs.run(&env, &["stop", &name]).ok();
}

#[test]
fn a_service_that_fails_to_start_is_a_typed_error_with_its_command_status_and_log() {
    let env = Env::new("actfail");
    let defs = Defs::new(&env);
    let name = env.name("ACTFAIL");
    defs.write(&name, "command = [\"sh\", \"-c\", \"echo cannot open the board file >&2; exit 3\"]\n");
    let out = defs.run(&env, &["call", &name, "x"]);
    assert_eq!(out.code(), 1, "{}", out.stderr);
    for part in ["could not be started", "exit status: 3", "cannot open the board file", "sh -c"] {
        assert!(out.stderr.contains(part), "{part:?} in {}", out.stderr);
    }
    // A command that never registers: killed at the start timeout, the error says so.
    let slow = env.name("ACTSLOW");
    defs.write(&slow, "command = [\"sleep\", \"30\"]\nstart_timeout = 0.5\n");
    let t0 = Instant::now();
    let out = defs.run(&env, &["call", &slow, "x"]);
    assert_eq!(out.code(), 1, "{}", out.stderr);
    assert!(out.stderr.contains("did not register within the start timeout"), "{}", out.stderr);
    assert!(t0.elapsed() < Duration::from_secs(15), "bounded by the start timeout: {:?}", t0.elapsed());
}

#[test]
fn no_definition_or_activation_off_is_an_instant_no_service() {
    let env = Env::new("actoff");
    let defs = Defs::new(&env);
    let name = env.name("ACTOFF");
    let out = defs.run(&env, &["call", &name, "x"]);
    assert_eq!(out.code(), 1);
    assert!(out.stderr.contains("no service named"), "{}", out.stderr);
    let count = defs.dir.join("count");
    defs.echo(&name, &count, "");
    let out = defs.cmd(&env, &["call", &name, "x"]).env("MICROCS_NO_ACTIVATION", "1").output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no service named"), "{err}");
    assert!(err.contains(&format!("microcs start {name}")), "says how to start it: {err}");
    assert_eq!(starts(&count), 0, "not started");
}

#[test]
fn malformed_foreign_or_writable_definitions_are_refused_with_what_to_fix() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new("actbad");
    let defs = Defs::new(&env);
    let name = env.name("ACTBAD");
    let path = defs.write(&name, "command = \"not a list\"\n");
    let out = defs.run(&env, &["call", &name, "x"]);
    assert_eq!(out.code(), 2, "{}", out.stderr);
    assert!(
        out.stderr.contains(&path.display().to_string()) && out.stderr.contains("command"),
        "{}",
        out.stderr
    );
    defs.write(&name, "command = [\"true\"]\nstart_timout = 3\n");
    let out = defs.run(&env, &["call", &name, "x"]);
    assert!(out.code() == 2 && out.stderr.contains("start_timout"), "a typo is an error: {}", out.stderr);
    defs.write(&name, "command = [\"true\"]\n");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o622)).unwrap();
    let out = defs.run(&env, &["call", &name, "x"]);
    assert_eq!(out.code(), 2, "{}", out.stderr);
    assert!(
        out.stderr.contains("refusing the service definition")
            && out.stderr.contains("0622")
            && out.stderr.contains(&format!("chmod go-w {}", path.display())),
        "names the command that fixes it: {}",
        out.stderr
    );
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    if rustix::process::geteuid().as_raw() == 0 {
        std::os::unix::fs::chown(&path, Some(65534), None).unwrap();
        let out = defs.run(&env, &["call", &name, "x"]);
        assert_eq!(out.code(), 2, "{}", out.stderr);
        assert!(
            out.stderr.contains("belongs to uid 65534")
                && out.stderr.contains(&format!("chown 0 {}", path.display())),
            "{}",
            out.stderr
        );
    }
}

#[test]
fn an_idle_service_exits_and_the_next_call_starts_it_again() {
    let env = Env::new("actidle");
    let defs = Defs::new(&env);
    let name = env.name("ACTIDLE");
    let count = defs.dir.join("count");
    defs.echo(&name, &count, "idle_timeout = \"1s\"\n");
    assert_eq!(defs.run(&env, &["call", &name, "one"]).ok().text(), "one");
    assert_eq!(listed(&env, &name).len(), 1);
    assert!(eventually(Duration::from_secs(15), || listed(&env, &name).is_empty()), "idle exit");
    // The name is free (unlisted) before the server has drained and written its last line.
    let log_path = env.dir.join(format!("{name}.log"));
    let read_log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let clean = eventually(Duration::from_secs(10), || read_log().contains("the name is free"));
    assert!(clean, "a clean exit: {}", read_log());
    assert_eq!(defs.run(&env, &["call", &name, "two"]).ok().text(), "two");
    assert_eq!(starts(&count), 2, "started again");
    defs.run(&env, &["stop", &name]).ok();
}

#[test]
fn microcs_stop_ends_a_supervised_service_and_its_supervisor() {
    let env = Env::new("inststop");
    let name = env.name("INSTSTOP");
    let srv = env.serve(&[&name, "--echo", "--instances", "2"]);
    assert_eq!(instances(&env, &name).len(), 2);
    env.run(&["stop", &name]).ok();
    // The workers stopped cleanly (exit 0): not restarted, and the supervisor ends too.
    let (status, lines, err) = srv.wait();
    assert_eq!(status.code(), Some(0), "{err}");
    assert!(!lines.iter().any(|l| l.contains("restarted")), "{lines:?}");
    assert!(err.contains("stopped cleanly; not restarting"), "{err}");
    assert!(instances(&env, &name).is_empty());
}

#[test]
fn serve_socket_activation_serves_on_the_socket_systemd_would_pass() {
    use std::os::unix::fs::MetadataExt;
    let env = Env::new("sockact");
    let name = env.name("SOCKACT");
    let path = env.dir.join(format!("{name}.sock"));
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let ino = std::fs::metadata(&path).unwrap().ino();
    // As systemd starts it: the socket as fd 3, LISTEN_PID the server's own pid. Each request
    // runs `sh -c ...`, which shows whether the variables reached it.
    let script = r#"exec 3<&0 0</dev/null; LISTEN_PID=$$ LISTEN_FDS=1 exec "$0" serve "$1" --socket-activation --idle-timeout 1s -- sh -c 'echo ${LISTEN_FDS:-unset}'"#;
    let server = Command::new("sh")
        .args(["-c", script, EXE, &name])
        .env("MICROCS_RUNTIME_DIR", &env.dir)
        .stdin(Stdio::from(std::os::fd::OwnedFd::from(listener.try_clone().unwrap())))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = env.run(&["call", &name, "x"]).ok();
    assert_eq!(out.text().trim(), "unset", "the command saw LISTEN_FDS");
    assert_eq!(
        std::fs::metadata(&path).unwrap().ino(),
        ino,
        "it bound a socket of its own instead of the passed one"
    );
    // Idle, it exits 0, and the socket stays for systemd's next start.
    let exited = wait_output(server, &["serve", "--socket-activation"]);
    assert!(exited.status.success(), "{}", exited.stderr);
    assert_eq!(std::fs::metadata(&path).unwrap().ino(), ino, "the socket was removed on exit");
    // Not with instances (each binds a socket of its own): a usage error.
    let out = env.run(&["serve", &name, "--socket-activation", "--instances", "2", "--echo"]);
    assert_eq!(out.code(), 2, "{}", out.stderr);
}
