//! `microcs demo`: the whole story in one command, explained as it goes.
//!
//! It starts `microcs serve LIFE_GEN --life` as a child process in a private temporary runtime
//! directory (so it can never collide with real services), calls it, lists it, pings it,
//! benchmarks it briefly, stops it with SIGTERM, and removes the directory.

use std::io::{BufRead, BufReader, IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use microcs::Client;
use rustix::process::{Pid, Signal};
use serde::Serialize;

use super::bench::{self, Report, measure::Plan};
use super::ls::{self, Row};
use super::ping::{self, Summary};
use crate::cli::DemoArgs;
use crate::error::{CliError, CliResult};
use crate::life::{Board, GLIDER};
use crate::net::Net;
use crate::output::{Ctx, print_json};
use crate::signals;

const NAME: &str = "LIFE_GEN";
/// Generations shown side by side.
const GENERATIONS: usize = 4;

/// `microcs demo --json`.
#[derive(Serialize)]
struct DemoJson {
    runtime_dir: String,
    name: &'static str,
    pid: u32,
    /// Generation 0 (the glider) and the ones the service computed.
    generations: Vec<String>,
    /// The glider after the `steps` method ran 8 generations.
    after_8_steps: String,
    /// The 4 generations the streaming method `run` sent, one item each.
    streamed: Vec<String>,
    services: Vec<Row>,
    ping: Summary,
    bench: Report,
    /// How the service process exited after SIGTERM.
    exit_code: Option<i32>,
    /// True when the name was free again after it stopped.
    name_freed: bool,
}

/// The child service and its runtime directory, cleaned up however the demo ends.
struct Service {
    child: Option<Child>,
    dir: PathBuf,
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Narration on stdout (not with `--json`).
struct Say {
    quiet: bool,
}

impl Say {
    fn line(&self, text: &str) -> CliResult {
        if self.quiet {
            return Ok(());
        }
        crate::output::print(&format!("{text}\n"))
    }

    fn step(&self, n: u32, title: &str) -> CliResult {
        self.line(&format!("\n{n}. {title}"))
    }

    fn cmd(&self, command: &str) -> CliResult {
        self.line(&format!("   $ {command}"))
    }

    fn block(&self, text: &str) -> CliResult {
        for l in text.lines() {
            self.line(&format!("   {l}"))?;
        }
        Ok(())
    }
}

/// Runs `microcs demo`.
pub fn run(ctx: &Ctx, args: DemoArgs) -> CliResult {
    let say = Say { quiet: ctx.json };
    let dir = private_dir()?;
    let cleanup = Arc::new(Mutex::new((None::<u32>, dir.clone())));
    {
        let cleanup = cleanup.clone();
        // Ctrl-C mid-demo: stop the child and remove the directory before leaving.
        signals::on_terminate(move |_, _| {
            let (pid, dir) = &*cleanup.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(pid) = pid.and_then(|p| Pid::from_raw(p as i32)) {
                let _ = rustix::process::kill_process(pid, Signal::KILL);
            }
            let _ = std::fs::remove_dir_all(dir);
            std::process::exit(130);
        })?;
    }
    let mut service = Service { child: None, dir: dir.clone() };
    let dctx = Ctx { json: ctx.json, dir: dir.clone() };

    say.line("microcs demo: one process asks another for something by name. (A few seconds.)")?;

    // 1. Start the service in a child process.
    say.step(1, "Start a service: Conway's Game of Life, under the name LIFE_GEN")?;
    say.cmd("microcs serve LIFE_GEN --life")?;
    let (child, stderr_text) = spawn_service(&dir)?;
    let pid = child.id();
    cleanup.lock().unwrap_or_else(|p| p.into_inner()).0 = Some(pid);
    service.child = Some(child);
    wait_ready(&mut service, &stderr_text)?;
    say.line(&format!("   A child process (pid {pid}) now owns the name LIFE_GEN. It registered it in"))?;
    say.line(&format!("   {} — a private runtime directory made for this demo,", dir.display()))?;
    say.line("   so nothing here touches your own services. No ports, no config files, no broker.")?;

    // 2. Call it.
    say.step(2, "Call it by name: send a board, get the next generation back")?;
    say.cmd("microcs call LIFE_GEN - < glider.txt      # once per generation")?;
    // Local only, whatever MICROCS_NATS_URL or MICROCS_TRANSPORT say: the demo never leaves its
    // private directory.
    let mut client = dctx.client(NAME, Duration::from_secs(5), &Net::local()).connect()?;
    let mut generations = vec![GLIDER.to_owned()];
    for _ in 0..GENERATIONS {
        let next = client.send_message(generations.last().expect("generation 0"))?;
        generations.push(next);
    }
    say.block(&side_by_side(&generations))?;
    say.line("   Each board went to the other process over a Unix socket; it answered with the next")?;
    say.line("   generation. After 4 generations the glider has moved one cell down and to the right.")?;
    say.cmd("printf '8\\n%s' \"$(cat glider.txt)\" | microcs call LIFE_GEN --method steps -")?;
    let after8 =
        String::from_utf8_lossy(&client.call("steps", format!("8\n{GLIDER}").as_bytes())?).into_owned();
    say.block(&after8)?;
    say.line("   A method (here `steps`) is a named entry point: 8 generations in one request.")?;
    say.cmd("printf '4\\n%s' \"$(cat glider.txt)\" | microcs call LIFE_GEN --method run --stream -")?;
    let mut streamed = Vec::new();
    for board in client.stream("run", format!("{GENERATIONS}\n{GLIDER}").as_bytes())? {
        streamed.push(String::from_utf8_lossy(&board?).into_owned());
    }
    let shown: Vec<String> = std::iter::once(GLIDER.to_owned()).chain(streamed.iter().cloned()).collect();
    say.block(&side_by_side(&shown))?;
    say.line("   `run` answers with a stream: one request, each generation sent as soon as it is")?;
    say.line("   computed (the caller's window keeps a slow reader from being flooded).")?;

    // 3. List.
    say.step(3, "See what is running")?;
    say.cmd("microcs ls")?;
    let rows = ls::collect(&dctx, Duration::from_secs(2))?;
    say.block(&ls::render(&rows, false))?;
    say.line("   Every service answers the built-in $stats, so `ls` can show its counters.")?;

    // 4. Ping.
    say.step(4, "Ping it: round trips through the built-in $ping method")?;
    say.cmd("microcs ping LIFE_GEN -c 3 -i 0.1s")?;
    let never = AtomicBool::new(false);
    let summary = ping::ping_loop(&mut client, 3, Duration::from_millis(100), &never, |r| {
        say.line(&format!("   {}", ping::reply_line(NAME, r)))
    })?;
    say.block(&ping::summary_text(&summary))?;
    if summary.received == 0 {
        return Err(CliError::request("the demo service did not answer its pings"));
    }

    // 5. Bench.
    let secs = args.bench_duration.as_secs_f64();
    say.step(5, &format!("Benchmark it for {secs:.1} s: 2 clients sending the glider back to back"))?;
    say.cmd(&format!(
        "microcs bench LIFE_GEN --clients 2 --duration {secs}s --payload \"$(cat glider.txt)\""
    ))?;
    let plan = Plan {
        name: NAME.into(),
        dir: dir.clone(),
        net: Net::local(),
        method: None,
        payload: GLIDER.as_bytes().to_vec(),
        clients: 2,
        duration: args.bench_duration.max(Duration::from_millis(100)),
        warmup: 50,
        timeout: Duration::from_secs(5),
        cpus: Vec::new(),
        shm: None,
    };
    let m = bench::execute(&plan, !ctx.json && std::io::stderr().is_terminal())?;
    let report = Report::new(&plan, &m);
    say.block(&report.text())?;
    say.line("   Latency is the time from sending a request to holding its reply (p99: 99% were faster).")?;
    if m.errors > 0 {
        return Err(CliError::request(format!(
            "{} demo requests failed: {}",
            m.errors,
            m.first_error.as_deref().unwrap_or("unknown error")
        )));
    }

    // 6. Stop.
    say.step(6, "Stop it")?;
    say.cmd(&format!("kill {pid}      # SIGTERM, or Ctrl-C in its terminal"))?;
    drop(client);
    let status = stop(&mut service, pid)?;
    cleanup.lock().unwrap_or_else(|p| p.into_inner()).0 = None;
    let freed = microcs::list_in(&dir)?.is_empty()
        && Client::builder(NAME)
            .runtime_dir(&dir)
            .transport(microcs::nats::Transport::Local)
            .connect()
            .is_err_and(|e| e.kind() == microcs::ErrorKind::NoService);
    say.line(&format!(
        "   The service finished its requests, released the name and exited ({}).",
        describe_exit(status)
    ))?;
    say.cmd("microcs ls")?;
    say.line(if freed {
        "   (nothing running: LIFE_GEN is free again)"
    } else {
        "   LIFE_GEN is still listed!"
    })?;
    if !freed {
        return Err(CliError::local("the demo service did not free its name after SIGTERM"));
    }

    say.line(
        "\nTry it yourself (in two terminals):\n  \
         microcs serve LIFE_GEN --life           # a Game of Life service\n  \
         printf '.....\\n..#..\\n..#..\\n..#..\\n.....\\n' | microcs call LIFE_GEN -   # a blinker\n  \
         microcs serve UPPER -- tr a-z A-Z       # any program is a service\n  \
         microcs call UPPER hello                # -> HELLO\n  \
         microcs ls;  microcs ping UPPER;  microcs bench UPPER --duration 2s\n  \
         microcs --help                          # everything else (docs/CLI.md in the repository)",
    )?;
    if ctx.json {
        print_json(&DemoJson {
            runtime_dir: dir.display().to_string(),
            name: NAME,
            pid,
            generations,
            after_8_steps: after8,
            streamed,
            services: rows,
            ping: summary,
            bench: report,
            exit_code: status.code(),
            name_freed: freed,
        })?;
    }
    drop(service);
    Ok(())
}

/// A new private directory under the system's temporary directory.
fn private_dir() -> CliResult<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().subsec_nanos();
    let mut base = std::env::temp_dir();
    if base.as_os_str().len() > 60 {
        // A socket path must fit in 107 bytes; a long $TMPDIR would not leave room.
        base = PathBuf::from("/tmp");
    }
    let dir = base.join(format!("microcs-demo-{}-{nanos:x}", std::process::id()));
    std::fs::DirBuilder::new().mode(0o700).create(&dir).map_err(|e| {
        CliError::local(format!("cannot create a temporary directory {}: {e}", dir.display()))
    })?;
    Ok(dir)
}

/// Starts `microcs serve LIFE_GEN --life --json` (this very binary) with the private runtime dir.
fn spawn_service(dir: &Path) -> CliResult<(Child, Arc<Mutex<String>>)> {
    let exe = std::env::current_exe().map_err(|e| {
        CliError::local(format!("cannot find the microcs executable to start the service: {e}"))
    })?;
    let mut child = Command::new(exe)
        .args(["serve", NAME, "--life", "--json", "--grace", "3s"])
        .env("MICROCS_RUNTIME_DIR", dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| CliError::local(format!("cannot start the demo service: {e}")))?;
    // Keep the child's diagnostics, to show them if it fails to start.
    let text = Arc::new(Mutex::new(String::new()));
    if let Some(mut err) = child.stderr.take() {
        let text = text.clone();
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            text.lock().unwrap_or_else(|p| p.into_inner()).push_str(&s);
        });
    }
    Ok((child, text))
}

/// Waits for the child's `ready` line.
fn wait_ready(service: &mut Service, stderr_text: &Mutex<String>) -> CliResult {
    let child = service.child.as_mut().expect("started");
    let stdout = child.stdout.take().expect("piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let give_up = Instant::now() + Duration::from_secs(15);
    loop {
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(line) if line.contains("\"ready\"") => return Ok(()),
            Ok(_) => {}
            Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() < give_up => {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(start_failed(status, stderr_text));
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                return Err(CliError::local("the demo service did not start within 15 s"));
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = child
                    .wait()
                    .map_err(|e| CliError::local(format!("cannot wait for the demo service: {e}")))?;
                return Err(start_failed(status, stderr_text));
            }
        }
    }
}

fn start_failed(status: ExitStatus, stderr_text: &Mutex<String>) -> CliError {
    std::thread::sleep(Duration::from_millis(50)); // let the stderr reader finish
    let text = stderr_text.lock().unwrap_or_else(|p| p.into_inner()).trim().to_owned();
    CliError::local(format!(
        "the demo service exited before it was ready ({}): {text}",
        describe_exit(status)
    ))
}

/// SIGTERM, then waits for the exit (SIGKILL after 15 s).
fn stop(service: &mut Service, pid: u32) -> CliResult<ExitStatus> {
    let mut child = service.child.take().expect("started");
    if let Some(p) = Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process(p, Signal::TERM);
    }
    let give_up = Instant::now() + Duration::from_secs(15);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Ok(status),
            Ok(None) if Instant::now() < give_up => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                let _ = child.kill();
                return Err(CliError::local(
                    "the demo service did not stop within 15 s of SIGTERM; killed it",
                ));
            }
            Err(e) => return Err(CliError::local(format!("cannot wait for the demo service: {e}"))),
        }
    }
}

fn describe_exit(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => "unknown status".into(),
    }
}

/// Boards next to each other, each under a `gen N` heading.
fn side_by_side(boards: &[String]) -> String {
    let parsed: Vec<Vec<&str>> = boards.iter().map(|b| b.lines().collect()).collect();
    let width = parsed.iter().flat_map(|b| b.iter().map(|l| l.len())).max().unwrap_or(0).max(5);
    let height = parsed.iter().map(Vec::len).max().unwrap_or(0);
    let mut out = String::new();
    for i in 0..boards.len() {
        out.push_str(&format!("{:<w$}   ", format!("gen {i}"), w = width));
    }
    out = out.trim_end().to_owned();
    out.push('\n');
    for row in 0..height {
        let mut line = String::new();
        for b in &parsed {
            line.push_str(&format!("{:<w$}   ", b.get(row).copied().unwrap_or(""), w = width));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    // Boards come from the service; check they are boards before calling the demo a success.
    debug_assert!(boards.iter().all(|b| Board::parse(b).is_ok()));
    out
}
