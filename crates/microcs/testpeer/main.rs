//! A small program the integration tests run as a separate process: a server with test
//! methods, a racer for name-claim races, and a one-shot client.
//!
//! ```text
//! microcs-peer serve NAME      serve until stdin closes; prints "READY <pid>" once bound, and
//!                              "LOST <kind> <owner pid>" (exit 3) if the server loses its name
//! microcs-peer race NAME       try to claim NAME: prints "WON <pid>" (then serves until stdin
//!                              closes) or "TAKEN <owner pid>"
//! microcs-peer call NAME MSG   one request; prints the reply (PEER_NO_ACTIVATE: activate(false);
//!                              PEER_INTERRUPT_MS: an interrupt check that stops after that long)
//! microcs-peer restart-call NAME   a call, the server killed, a call on the same client
//!                              (timeout $PEER_TIMEOUT_MS); prints both server pids
//! microcs-peer restart-call-tokio NAME   the same with the async client
//! microcs-peer call-dir NAME DIR MSG   the same, with the runtime directory given explicitly
//! microcs-peer call-method NAME METHOD PAYLOAD   one call of a method; prints the reply
//! microcs-peer serve-tokio NAME   as `serve`, with the async server (feature `tokio`) and
//!                                 async versions of the same methods
//! microcs-peer fork-call NAME N    connect, fork, N requests from each process (see fork.rs)
//! microcs-peer fork-tokio NAME N   the same with the async client
//! ```
//! Server options from the environment: PEER_GRACE_MS, PEER_WRITE_TIMEOUT_MS, PEER_MAX_PENDING,
//! PEER_MAX_IN_FLIGHT, PEER_SEND_BUFFER, PEER_SHM (1: offer shared memory), PEER_SHM_RING (bytes
//! of each ring), PEER_SOCKET_ACTIVATION (serve on a socket passed with LISTEN_FDS), PEER_LOG (file
//! for the `record` method), PEER_NATS (also serve on this NATS server; feature `nats`).
//! The runtime directory comes from `MICROCS_RUNTIME_DIR`.

use std::io::{Read, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use microcs::{ErrorKind, RemoteError, Request, Server};

mod fork;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(cmd), Some(name)) = (args.first(), args.get(1)) else {
        eprintln!("usage: microcs-peer serve|race|call NAME [MSG]");
        return ExitCode::from(2);
    };
    match cmd.as_str() {
        "serve" => serve(name, false),
        #[cfg(feature = "tokio")]
        "serve-tokio" => async_peer::serve(name),
        "race" => serve(name, true),
        "fork-call" => fork::blocking(name, args.get(2).and_then(|n| n.parse().ok()).unwrap_or(100)),
        #[cfg(feature = "tokio")]
        "fork-tokio" => fork::tokio(name, args.get(2).and_then(|n| n.parse().ok()).unwrap_or(100)),
        "call-method" => {
            let (method, payload) =
                (args.get(2).cloned().unwrap_or_default(), args.get(3).cloned().unwrap_or_default());
            match microcs::Client::connect(name).and_then(|mut c| c.call(&method, payload.as_bytes())) {
                Ok(reply) => {
                    println!("{}", String::from_utf8_lossy(&reply));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{:?}: {e}", e.kind());
                    ExitCode::from(1)
                }
            }
        }
        #[cfg(feature = "tokio")]
        "call-tokio" => {
            let msg = args.get(2).cloned().unwrap_or_default();
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            let builder = microcs::tokio::Client::builder(name)
                .activate(std::env::var_os("PEER_NO_ACTIVATE").is_none());
            print_reply(rt.block_on(async { builder.connect().await?.send_message(&msg).await }))
        }
        "restart-call" => restart_call(name),
        #[cfg(feature = "tokio")]
        "restart-call-tokio" => {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            print_reply(rt.block_on(async {
                let c = microcs::tokio::Client::builder(name).timeout(peer_timeout()).connect().await?;
                let first = String::from_utf8_lossy(&c.call("pid", b"").await?).into_owned();
                kill_and_wait_gone(name, &first)?;
                let second = String::from_utf8_lossy(&c.call("pid", b"").await?).into_owned();
                Ok(format!("{first} {second}"))
            }))
        }
        "call" | "call-dir" => {
            let mut builder =
                microcs::Client::builder(name).activate(std::env::var_os("PEER_NO_ACTIVATE").is_none());
            let mut msg = args.get(2).map(String::as_str).unwrap_or("");
            if cmd == "call-dir" {
                builder = builder.runtime_dir(msg);
                msg = args.get(3).map(String::as_str).unwrap_or("");
            }
            // PEER_INTERRUPT_MS: the interrupt check says stop once that long has passed.
            if let Some(ms) = std::env::var("PEER_INTERRUPT_MS").ok().and_then(|v| v.parse().ok()) {
                let t0 = Instant::now();
                builder = builder.interrupt_check(Duration::from_millis(10), move || {
                    t0.elapsed() >= Duration::from_millis(ms)
                });
            }
            print_reply(builder.connect().and_then(|mut c| c.send_message(msg)))
        }
        _ => ExitCode::from(2),
    }
}

/// A client's outcome: the reply on stdout (exit 0), or `Kind: message` on stderr (exit 1).
fn print_reply(r: microcs::Result<String>) -> ExitCode {
    match r {
        Ok(reply) => {
            println!("{reply}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{:?}: {e}", e.kind());
            ExitCode::from(1)
        }
    }
}

/// `restart-call NAME`: with a client of timeout $PEER_TIMEOUT_MS, asks the server's pid, kills
/// the server, waits until the name is free, and asks again on the same client (which starts
/// the service anew when it has a definition); prints both pids.
fn restart_call(name: &str) -> ExitCode {
    let run = || -> microcs::Result<String> {
        let mut c = microcs::Client::builder(name).timeout(peer_timeout()).connect()?;
        let first = String::from_utf8_lossy(&c.call("pid", b"")?).into_owned();
        kill_and_wait_gone(name, &first)?;
        let second = String::from_utf8_lossy(&c.call("pid", b"")?).into_owned();
        Ok(format!("{first} {second}"))
    };
    print_reply(run())
}

/// The client timeout of `restart-call`: $PEER_TIMEOUT_MS, else 30 s.
fn peer_timeout() -> Duration {
    Duration::from_millis(
        std::env::var("PEER_TIMEOUT_MS").ok().and_then(|v| v.parse().ok()).unwrap_or(30_000),
    )
}

/// Kills the server `pid` of `name` and waits until the name is free.
fn kill_and_wait_gone(name: &str, pid: &str) -> microcs::Result<()> {
    let pid = pid.parse::<i32>().ok().and_then(rustix::process::Pid::from_raw).expect("a pid");
    let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
    while microcs::list()?.iter().any(|s| s.name.as_str() == name) {
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

fn serve(name: &str, race: bool) -> ExitCode {
    if let Some(ms) = std::env::var("PEER_DELAY_MS").ok().and_then(|v| v.parse().ok()) {
        std::thread::sleep(Duration::from_millis(ms)); // a slow start
    }
    let server = match build(name) {
        Ok(s) => s,
        Err(e) if race && e.kind() == ErrorKind::NameTaken => {
            println!("TAKEN {}", e.owner_pid().map_or("?".into(), |p| p.to_string()));
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("{:?}: {e}", e.kind());
            return ExitCode::from(1);
        }
    };
    let handle = server.spawn(|req: Request| Ok::<_, RemoteError>(req.into_payload())).expect("spawn");
    println!("{} {}", if race { "WON" } else { "READY" }, std::process::id());
    std::io::stdout().flush().unwrap();
    // Serve until the test closes our stdin (or kills us), or the server stops by itself;
    // with PEER_FOREVER (started by activation, stdin is /dev/null), until killed.
    let trigger = handle.shutdown_trigger();
    if std::env::var_os("PEER_FOREVER").is_none() {
        std::thread::spawn(move || {
            let _ = std::io::stdin().read_to_end(&mut Vec::new());
            trigger.shutdown();
        });
    }
    let served = handle.wait();
    handle.shutdown();
    stopped(served)
}

/// The exit of a server: 0 when the test stopped it; 3, after a line `LOST <kind> <owner pid>`
/// on stdout and the message on stderr, when it stopped by itself because it lost its name.
fn stopped(served: microcs::Result<()>) -> ExitCode {
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            println!("LOST {:?} {}", e.kind(), e.owner_pid().map_or("?".into(), |p| p.to_string()));
            eprintln!("{e}");
            ExitCode::from(3)
        }
    }
}

/// The arguments of the `count` stream: "N" or "N fail".
fn count_args(req: &Request) -> Result<(u64, bool), RemoteError> {
    let text = req.text()?;
    let mut words = text.split_whitespace();
    let n = words.next().and_then(|w| w.parse().ok()).ok_or_else(|| RemoteError::new(400, "want a count"))?;
    Ok((n, words.next() == Some("fail")))
}

fn build(name: &str) -> microcs::Result<Server> {
    let env_ms = |k: &str, default: u64| {
        Duration::from_millis(std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(default))
    };
    let pending = std::env::var("PEER_MAX_PENDING").ok().and_then(|v| v.parse().ok()).unwrap_or(64);
    let mut builder = Server::builder(name).socket_activation(socket_activation());
    if shared() {
        builder = builder.shared();
    }
    if let Some(bytes) = send_buffer() {
        builder = builder.send_buffer(bytes);
    }
    #[cfg(feature = "nats")]
    if let Some(url) = nats_url() {
        builder = builder.nats(&url);
    }
    builder
        .shared_memory(shm())
        .ring_capacity(shm_ring())
        .grace_period(env_ms("PEER_GRACE_MS", 10_000))
        .write_timeout(env_ms("PEER_WRITE_TIMEOUT_MS", 30_000))
        .max_pending_handshakes(pending)
        .max_in_flight(max_in_flight())
        // Appends the payload as a line to the file named by $PEER_LOG, then echoes it: lets a
        // test count how many times each call really ran.
        .method("record", |req: Request| {
            let path = std::env::var("PEER_LOG").map_err(|_| RemoteError::new(500, "PEER_LOG not set"))?;
            let mut line = req.payload().to_vec();
            line.push(b'\n');
            std::fs::OpenOptions::new().create(true).append(true).open(path)?.write_all(&line)?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(req.into_payload())
        })
        .version("1.2.3")
        .description("test peer")
        .method("pid", |_req: Request| Ok::<_, RemoteError>(std::process::id().to_string()))
        // The value of an environment variable of the server, or "unset".
        .method("env", |req: Request| {
            Ok::<_, RemoteError>(std::env::var(req.text()?).unwrap_or_else(|_| "unset".into()))
        })
        .method("peer", |req: Request| {
            let p = req.peer();
            Ok::<_, RemoteError>(format!("{} {} {}", p.pid, p.uid, p.gid))
        })
        .method("deadline_ms", |req: Request| {
            Ok::<_, RemoteError>(req.remaining().map_or("none".into(), |d| d.as_millis().to_string()))
        })
        .method("fail", |_req: Request| Err::<Vec<u8>, _>(RemoteError::new(418, "i am a teapot")))
        .method("io_fail", |_req: Request| {
            Err::<Vec<u8>, _>(std::io::Error::new(std::io::ErrorKind::NotFound, "no such board"))
        })
        .method("panic", |_req: Request| -> Result<Vec<u8>, RemoteError> { panic!("boom in handler") })
        .method("big", |req: Request| {
            let n: usize = req.text()?.parse().map_err(|_| RemoteError::new(400, "want a size"))?;
            Ok::<_, RemoteError>(vec![b'x'; n])
        })
        .method("sleep_ms", |req: Request| {
            let ms: u64 = req.text()?.parse().map_err(|_| RemoteError::new(400, "want ms"))?;
            let _running = Running::start();
            std::thread::sleep(Duration::from_millis(ms));
            Ok::<_, RemoteError>(format!("slept {ms}"))
        })
        .method("max_running", |_req: Request| Ok::<_, RemoteError>(Running::max().to_string()))
        // Streams: "N" → the items "0" .. "N-1"; "N fail" → then an error 422; "tick" → an item
        // every 5 ms, forever.
        .stream_method("count", |req: Request| {
            let (n, fail) = count_args(&req)?;
            let items = (0..n).map(|i| Ok::<_, RemoteError>(i.to_string()));
            Ok::<_, RemoteError>(
                items.chain(fail.then(|| Err(RemoteError::new(422, "failed after the items")))),
            )
        })
        .stream_method("tick", |_req: Request| {
            Ok::<_, RemoteError>((0u64..).map(|i| {
                std::thread::sleep(Duration::from_millis(5));
                Ok::<_, RemoteError>(i.to_string())
            }))
        })
        // "MS PATH": sleeps, then writes "finished" to PATH ("dropped" if the server drops it).
        .method("sleep_marked", |req: Request| {
            let (ms, mut marker) = Marker::parse(&req)?;
            std::thread::sleep(ms);
            marker.finish("finished");
            Ok::<_, RemoteError>("finished")
        })
        // "MS:DATA": replies the whole payload after MS milliseconds.
        .method("echo_after", |req: Request| {
            std::thread::sleep(echo_delay(&req)?);
            Ok::<_, RemoteError>(req.into_payload())
        })
        // Runs until cancelled (or 30 s), then appends "cancelled <ms>" to the file named by the
        // payload, so the test can see the server noticed.
        .method("wait_cancel", |req: Request| {
            let path = String::from_utf8(req.payload().to_vec())?;
            let t0 = Instant::now();
            while !req.is_cancelled() && t0.elapsed() < Duration::from_secs(30) {
                std::thread::sleep(Duration::from_millis(1));
            }
            let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&path)?;
            writeln!(f, "cancelled {}", t0.elapsed().as_millis())?;
            // Answer late, so the caller has certainly given up by then.
            std::thread::sleep(Duration::from_millis(500));
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>("done")
        })
        .bind()
}

/// `PEER_SHARED`: join the name as one of its instances.
fn shared() -> bool {
    std::env::var_os("PEER_SHARED").is_some()
}

/// PEER_SOCKET_ACTIVATION: serve on the socket passed with LISTEN_FDS, when there is one.
fn socket_activation() -> bool {
    std::env::var_os("PEER_SOCKET_ACTIVATION").is_some()
}

/// `send_buffer` for the server, if PEER_SEND_BUFFER says (else the library's default).
fn send_buffer() -> Option<usize> {
    std::env::var("PEER_SEND_BUFFER").ok().and_then(|v| v.parse().ok())
}

/// `PEER_NATS`: also serve on this NATS server (feature `nats`).
#[cfg(feature = "nats")]
fn nats_url() -> Option<String> {
    std::env::var("PEER_NATS").ok().filter(|u| !u.is_empty())
}

/// `PEER_SHM=1`: offer shared memory to clients that ask.
fn shm() -> bool {
    std::env::var("PEER_SHM").is_ok_and(|v| v == "1")
}

/// `PEER_SHM_RING`: bytes of each shared-memory ring (else the library's 256 KiB).
fn shm_ring() -> u32 {
    std::env::var("PEER_SHM_RING").ok().and_then(|v| v.parse().ok()).unwrap_or(256 * 1024)
}

fn max_in_flight() -> usize {
    std::env::var("PEER_MAX_IN_FLIGHT").ok().and_then(|v| v.parse().ok()).unwrap_or(128)
}

/// Counts `sleep_ms` handlers running at once, and the most ever seen (`max_running`).
struct Running;

static RUNNING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
static MAX_RUNNING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl Running {
    fn start() -> Running {
        use std::sync::atomic::Ordering::SeqCst;
        let now = RUNNING.fetch_add(1, SeqCst) + 1;
        MAX_RUNNING.fetch_max(now, SeqCst);
        Running
    }

    fn max() -> usize {
        MAX_RUNNING.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        RUNNING.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Appends one line to a file when the handler ends: the line it chose, or "dropped <ms>" when
/// the handler was dropped before it finished (the async server stops handlers at the deadline).
struct Marker {
    path: String,
    t0: Instant,
    done: bool,
}

impl Marker {
    fn new(path: String) -> Marker {
        Marker { path, t0: Instant::now(), done: false }
    }

    /// From a "MS PATH" payload.
    fn parse(req: &Request) -> Result<(Duration, Marker), RemoteError> {
        let (ms, path) =
            req.text()?.split_once(' ').ok_or_else(|| RemoteError::new(400, "want 'MS PATH'"))?;
        let ms: u64 = ms.parse().map_err(|_| RemoteError::new(400, "want 'MS PATH'"))?;
        Ok((Duration::from_millis(ms), Marker::new(path.to_owned())))
    }

    fn finish(&mut self, what: &str) {
        self.done = true;
        self.write(what);
    }

    fn write(&self, what: &str) {
        let line = format!("{what} {}\n", self.t0.elapsed().as_millis());
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(&self.path) {
            let _ = f.write_all(line.as_bytes());
        }
    }
}

impl Drop for Marker {
    fn drop(&mut self) {
        if !self.done {
            self.write("dropped");
        }
    }
}

/// The delay of an `echo_after` payload ("MS:DATA").
fn echo_delay(req: &Request) -> Result<Duration, RemoteError> {
    let want = || RemoteError::new(400, "want 'MS:DATA'");
    let colon = req.payload().iter().position(|&b| b == b':').ok_or_else(want)?;
    let ms = std::str::from_utf8(&req.payload()[..colon]).map_err(|_| want())?.parse().map_err(|_| want())?;
    Ok(Duration::from_millis(ms))
}

/// `serve-tokio`: the async server with async versions of the same methods.
#[cfg(feature = "tokio")]
mod async_peer {
    use super::*;
    use tokio::time::sleep;

    type BoxError = Box<dyn std::error::Error + Send + Sync>;

    pub fn serve(name: &str) -> ExitCode {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async {
            let server = match build(name).await {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("{:?}: {e}", e.kind());
                    return ExitCode::from(1);
                }
            };
            let handle = server
                .spawn(|req: Request| async move { Ok::<_, RemoteError>(req.into_payload()) })
                .expect("spawn");
            println!("READY {}", std::process::id());
            std::io::stdout().flush().unwrap();
            // Serve until the test closes our stdin (or kills us), or the server stops by itself;
            // with PEER_FOREVER (stdin is not the test's), until killed.
            let trigger = handle.shutdown_trigger();
            if std::env::var_os("PEER_FOREVER").is_none() {
                std::thread::spawn(move || {
                    let _ = std::io::stdin().read_to_end(&mut Vec::new());
                    trigger.shutdown();
                });
            }
            let served = handle.wait().await;
            handle.shutdown().await;
            stopped(served)
        })
    }

    async fn build(name: &str) -> microcs::Result<microcs::tokio::Server> {
        let env_ms = |k: &str, default: u64| {
            Duration::from_millis(std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(default))
        };
        let pending = std::env::var("PEER_MAX_PENDING").ok().and_then(|v| v.parse().ok()).unwrap_or(64);
        let mut builder = microcs::tokio::Server::builder(name).socket_activation(socket_activation());
        if shared() {
            builder = builder.shared();
        }
        if let Some(bytes) = send_buffer() {
            builder = builder.send_buffer(bytes);
        }
        #[cfg(feature = "nats")]
        if let Some(url) = nats_url() {
            builder = builder.nats(&url);
        }
        builder
            .shared_memory(super::shm())
            .ring_capacity(super::shm_ring())
            .grace_period(env_ms("PEER_GRACE_MS", 10_000))
            .write_timeout(env_ms("PEER_WRITE_TIMEOUT_MS", 30_000))
            .max_pending_handshakes(pending)
            .max_in_flight(max_in_flight())
            .method("record", |req: Request| async move {
                let path =
                    std::env::var("PEER_LOG").map_err(|_| RemoteError::new(500, "PEER_LOG not set"))?;
                let mut line = req.payload().to_vec();
                line.push(b'\n');
                std::fs::OpenOptions::new().create(true).append(true).open(path)?.write_all(&line)?;
                Ok::<_, BoxError>(req.into_payload())
            })
            .version("1.2.3")
            .description("test peer")
            .method("pid", |_req: Request| async { Ok::<_, RemoteError>(std::process::id().to_string()) })
            .method("peer", |req: Request| async move {
                let p = req.peer();
                Ok::<_, RemoteError>(format!("{} {} {}", p.pid, p.uid, p.gid))
            })
            .method("deadline_ms", |req: Request| async move {
                Ok::<_, RemoteError>(req.remaining().map_or("none".into(), |d| d.as_millis().to_string()))
            })
            .method("fail", |_req: Request| async {
                Err::<Vec<u8>, _>(RemoteError::new(418, "i am a teapot"))
            })
            .method("io_fail", |_req: Request| async {
                Err::<Vec<u8>, _>(std::io::Error::new(std::io::ErrorKind::NotFound, "no such board"))
            })
            .method("panic", |_req: Request| async {
                if std::process::id() != 0 {
                    panic!("boom in handler");
                }
                Ok::<Vec<u8>, RemoteError>(Vec::new())
            })
            .method("big", |req: Request| async move {
                let n: usize = req.text()?.parse().map_err(|_| RemoteError::new(400, "want a size"))?;
                Ok::<_, RemoteError>(vec![b'x'; n])
            })
            .method("sleep_ms", |req: Request| async move {
                let ms: u64 = req.text()?.parse().map_err(|_| RemoteError::new(400, "want ms"))?;
                let _running = Running::start();
                sleep(Duration::from_millis(ms)).await;
                Ok::<_, RemoteError>(format!("slept {ms}"))
            })
            .method("max_running", |_req: Request| async { Ok::<_, RemoteError>(Running::max().to_string()) })
            .stream_method("count", |req: Request, items: microcs::tokio::Items| async move {
                let (n, fail) = count_args(&req)?;
                for i in 0..n {
                    items.send(i.to_string()).await?;
                }
                if fail {
                    return Err(RemoteError::new(422, "failed after the items"));
                }
                Ok(())
            })
            .stream_method("tick", |_req: Request, items: microcs::tokio::Items| async move {
                for i in 0u64.. {
                    sleep(Duration::from_millis(5)).await;
                    items.send(i.to_string()).await?;
                }
                Ok::<_, RemoteError>(())
            })
            .method("sleep_marked", |req: Request| async move {
                let (ms, mut marker) = Marker::parse(&req)?;
                sleep(ms).await;
                marker.finish("finished");
                Ok::<_, RemoteError>("finished")
            })
            .method("echo_after", |req: Request| async move {
                sleep(echo_delay(&req)?).await;
                Ok::<_, RemoteError>(req.into_payload())
            })
            // Waits for the cancellation (or 30 s), then appends "cancelled <ms>" to the file named
            // by the payload ("dropped <ms>" if the server drops it first, at the deadline).
            .method("wait_cancel", |req: Request| async move {
                let mut marker = Marker::new(String::from_utf8(req.payload().to_vec())?);
                tokio::select! {
                    () = req.cancelled() => {}
                    () = sleep(Duration::from_secs(30)) => {}
                }
                marker.finish("cancelled");
                // Answer late, so the caller has certainly given up by then.
                sleep(Duration::from_millis(500)).await;
                Ok::<_, BoxError>("done")
            })
            .bind()
            .await
    }
}
