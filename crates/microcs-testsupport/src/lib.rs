//! Test fixtures shared by the tests and benchmarks of the microcs crates; not published.
//!
//! Today that is one thing: a real `nats-server` broker on a free loopback port ([`Broker`]),
//! or the one `./scripts/test nats` started and exported ([`Nats::get`]). The library's NATS
//! tests, the CLI's NATS tests and the NATS benchmark all use it, so starting, waiting for and
//! stopping a broker is written once.
//!
//! Without a `nats-server` binary, [`Broker::start`] and [`Nats::get`] return `None` after
//! saying so on stderr (the caller's test then returns early, i.e. skips); with
//! `MICROCS_REQUIRE_NATS=1` (set by the NATS stage of `./scripts/test`) they panic instead, so
//! that a CI run can never pass by skipping.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The environment variable through which `./scripts/test nats` hands its broker's URL to the
/// tests.
pub const ENV_TEST_URL: &str = "MICROCS_TEST_NATS_URL";

/// True when the tests must not skip for lack of a broker (`MICROCS_REQUIRE_NATS=1`).
pub fn required() -> bool {
    std::env::var("MICROCS_REQUIRE_NATS").is_ok_and(|v| v == "1")
}

/// The `nats-server` binary: in `PATH`, else where Debian's package or a manual install puts it.
pub fn nats_server_bin() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/bin", "/usr/bin"].map(PathBuf::from))
        .map(|d| d.join("nats-server"))
        .find(|p| p.is_file())
}

/// A `nats-server` child process on 127.0.0.1, on a port it picked; killed on drop.
#[derive(Debug)]
pub struct Broker {
    child: Option<Child>,
    port: u16,
    args: Vec<String>,
    bin: PathBuf,
}

impl Broker {
    /// Starts a broker with extra `nats-server` arguments (`--user`, `--tls`, `-c FILE`, ...).
    /// `None`, after saying on stderr which tests (`who`) did not run, when there is no
    /// `nats-server` binary and nobody required one.
    pub fn start(who: &str, extra: &[&str]) -> Option<Broker> {
        let Some(bin) = nats_server_bin() else {
            assert!(!required(), "MICROCS_REQUIRE_NATS=1 but no nats-server binary was found in PATH");
            eprintln!(
                "SKIPPED: no nats-server binary, so {who} did not run (apt-get install nats-server, or \
                 run ./scripts/test nats)"
            );
            return None;
        };
        let mut b = Broker { child: None, port: 0, args: extra.iter().map(|s| s.to_string()).collect(), bin };
        b.spawn("-1");
        Some(b)
    }

    /// Runs the binary on `port` (`-1`: one it picks) and waits until it listens.
    fn spawn(&mut self, port: &str) {
        let mut child = Command::new(&self.bin)
            .args(["-a", "127.0.0.1", "-p", port])
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start nats-server");
        let mut err = BufReader::new(child.stderr.take().expect("piped stderr"));
        let mut log = String::new();
        let port = loop {
            let mut line = String::new();
            if err.read_line(&mut line).unwrap_or(0) == 0 {
                let _ = child.kill();
                let _ = child.wait();
                panic!("nats-server exited before listening:\n{log}");
            }
            log.push_str(&line);
            if let Some(rest) = line.split("Listening for client connections on ").nth(1) {
                match rest.trim().rsplit(':').next().and_then(|p| p.parse::<u16>().ok()) {
                    Some(p) => break p,
                    None => panic!("nats-server printed a listening line without a port: {line}"),
                }
            }
        };
        // Keep reading its log, so that it never blocks on a full pipe.
        std::thread::spawn(move || for _ in err.lines() {});
        self.port = port;
        self.child = Some(child);
    }

    /// `nats://127.0.0.1:PORT`, or `tls://...` when it was started with `--tls`.
    pub fn url(&self) -> String {
        let scheme = if self.args.iter().any(|a| a == "--tls") { "tls" } else { "nats" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// Stops the broker (a no-op when it is not running).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills the broker and starts a new one with the same arguments on the same port (clients
    /// see a broker restart).
    pub fn restart(&mut self) {
        self.kill();
        let port = self.port.to_string();
        let deadline = Instant::now() + Duration::from_secs(10);
        // The port may linger a moment after the old process died.
        while std::net::TcpListener::bind(("127.0.0.1", self.port)).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.spawn(&port);
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The broker of the NATS stage if it exported one ([`ENV_TEST_URL`]), else a broker of our own,
/// kept alive as long as this value.
#[derive(Debug)]
pub struct Nats {
    url: String,
    _own: Option<Broker>,
}

impl Nats {
    /// The shared broker, or a new one; `None` when neither exists (see [`Broker::start`]).
    pub fn get(who: &str) -> Option<Nats> {
        match std::env::var(ENV_TEST_URL) {
            Ok(u) if !u.is_empty() => Some(Nats { url: u, _own: None }),
            _ => {
                assert!(!required(), "MICROCS_REQUIRE_NATS=1 but {ENV_TEST_URL} is not set");
                Broker::start(who, &[]).map(|b| Nats { url: b.url(), _own: Some(b) })
            }
        }
    }

    /// Its URL.
    pub fn url(&self) -> String {
        self.url.clone()
    }
}
