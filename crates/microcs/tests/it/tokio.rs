//! The async API (issue "Async API (tokio)"): the same cases on all four client × server pairs
//! across processes, then what only the async flavour promises — one multiplexed connection,
//! deadlines that stop handlers, cancellation by dropping a future, and bounded memory under a
//! flood.
//!
//! Servers run in the `microcs-peer` process (`serve` = blocking, `serve-tokio` = async);
//! clients run here. Paths spell `::tokio` because this module is itself named `tokio`.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use ::tokio::runtime::Runtime;
use microcs::proto::{self, FLAG_NOT_RUN, FLAG_SYSTEM, Header, Kind, status};
use microcs::{ErrorKind, RemoteError, Request};

use crate::common::*;

fn rt() -> Arc<Runtime> {
    Arc::new(
        ::tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime"),
    )
}

fn text(v: Vec<u8>) -> String {
    String::from_utf8(v).unwrap()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flavour {
    Blocking,
    Tokio,
}

/// Starts the peer's server of this flavour and asserts it came up.
fn serve(dir: &TempDir, name: &str, flavour: Flavour, env: &[(&str, &str)]) -> PeerProcess {
    let mode = match flavour {
        Flavour::Blocking => "serve",
        Flavour::Tokio => "serve-tokio",
    };
    let p = PeerProcess::start(dir.path(), mode, name, env);
    assert_eq!(p.first_line, format!("READY {}", p.pid), "{mode} peer did not start");
    p
}

/// Either client, driven synchronously, so that each case is written once for all pairs.
enum AnyClient {
    Blocking(Box<microcs::Client>),
    Tokio(microcs::tokio::Client, Arc<Runtime>),
}

impl AnyClient {
    fn connect(flavour: Flavour, dir: &TempDir, name: &str, timeout: Duration) -> microcs::Result<AnyClient> {
        AnyClient::connect_with(flavour, dir, name, timeout, microcs::proto::DEFAULT_MAX_PAYLOAD, false)
    }

    fn connect_with(
        flavour: Flavour,
        dir: &TempDir,
        name: &str,
        timeout: Duration,
        max_frame: u32,
        shm: bool,
    ) -> microcs::Result<AnyClient> {
        Ok(match flavour {
            Flavour::Blocking => AnyClient::Blocking(Box::new(
                dir.client(name).timeout(timeout).max_frame(max_frame).shared_memory(shm).connect()?,
            )),
            Flavour::Tokio => {
                let rt = rt();
                let b = microcs::tokio::Client::builder(name)
                    .runtime_dir(dir.path())
                    .timeout(timeout)
                    .max_frame(max_frame)
                    .shared_memory(shm);
                let c = rt.block_on(b.connect())?;
                AnyClient::Tokio(c, rt)
            }
        })
    }

    fn request(&mut self, payload: &[u8]) -> microcs::Result<Vec<u8>> {
        match self {
            AnyClient::Blocking(c) => c.request(payload),
            AnyClient::Tokio(c, rt) => rt.block_on(c.request(payload)),
        }
    }

    fn call(&mut self, method: &str, payload: &[u8]) -> microcs::Result<Vec<u8>> {
        match self {
            AnyClient::Blocking(c) => c.call(method, payload),
            AnyClient::Tokio(c, rt) => rt.block_on(c.call(method, payload)),
        }
    }

    fn send_message(&mut self, m: &str) -> microcs::Result<String> {
        match self {
            AnyClient::Blocking(c) => c.send_message(m),
            AnyClient::Tokio(c, rt) => rt.block_on(c.send_message(m)),
        }
    }

    fn ping(&mut self) -> microcs::Result<microcs::micro::PingResponse> {
        match self {
            AnyClient::Blocking(c) => c.ping(),
            AnyClient::Tokio(c, rt) => rt.block_on(c.ping()),
        }
    }

    fn info(&mut self) -> microcs::Result<microcs::micro::InfoResponse> {
        match self {
            AnyClient::Blocking(c) => c.info(),
            AnyClient::Tokio(c, rt) => rt.block_on(c.info()),
        }
    }

    fn stats(&mut self) -> microcs::Result<microcs::micro::StatsResponse> {
        match self {
            AnyClient::Blocking(c) => c.stats(),
            AnyClient::Tokio(c, rt) => rt.block_on(c.stats()),
        }
    }

    fn set_timeout(&mut self, t: Duration) {
        match self {
            AnyClient::Blocking(c) => c.set_timeout(t),
            AnyClient::Tokio(c, _) => c.set_timeout(t),
        }
    }

    fn server_pid(&self) -> Option<u32> {
        match self {
            AnyClient::Blocking(c) => c.server_pid(),
            AnyClient::Tokio(c, _) => c.server_pid(),
        }
    }

    fn max_request_payload(&self) -> Option<u32> {
        match self {
            AnyClient::Blocking(c) => c.max_request_payload(),
            AnyClient::Tokio(c, _) => c.max_request_payload(),
        }
    }
}

/// One conformance case, run for one (client, server) pair.
struct Pair {
    client: Flavour,
    server: Flavour,
    dir: TempDir,
    name: String,
    /// Both sides configured for shared memory (PROTOCOL.md § 18).
    shm: bool,
}

impl Pair {
    fn new(client: Flavour, server: Flavour, tag: &str) -> Pair {
        Pair { client, server, dir: TempDir::new(tag), name: unique(&tag.to_uppercase()), shm: false }
    }

    /// The same pair with shared memory on at both ends: the blocking pair uses it, pairs with
    /// a tokio side fall back to the socket.
    fn shm(client: Flavour, server: Flavour, tag: &str) -> Pair {
        Pair { shm: true, ..Pair::new(client, server, &format!("{tag}_shm")) }
    }

    fn serve(&self) -> PeerProcess {
        serve(&self.dir, &self.name, self.server, if self.shm { &[("PEER_SHM", "1")] } else { &[] })
    }

    fn connect(&self, timeout: Duration) -> AnyClient {
        self.connect_with(timeout, microcs::proto::DEFAULT_MAX_PAYLOAD)
    }

    fn connect_with(&self, timeout: Duration, max_frame: u32) -> AnyClient {
        let c = AnyClient::connect_with(self.client, &self.dir, &self.name, timeout, max_frame, self.shm)
            .unwrap();
        let transport = match &c {
            AnyClient::Blocking(b) => b.transport(),
            AnyClient::Tokio(t, _) => t.transport(),
        };
        assert_eq!(transport, Some(if self.shm { "shm" } else { "unix" }), "transport of {:?}", self.name);
        c
    }

    fn marker(&self, tag: &str) -> std::path::PathBuf {
        self.dir.path().join(format!("{tag}.marker"))
    }
}

/// Waits for a marker file written by the peer and returns its first word.
fn marker_word(path: &std::path::Path) -> Option<String> {
    eventually(Duration::from_secs(15), || {
        let s = std::fs::read_to_string(path).ok()?;
        s.split_whitespace().next().map(str::to_owned)
    })
}

/// Runs each case for every pair: `case::blocking_client_tokio_server` and so on.
macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        $(
            mod $case {
                use super::Flavour::{Blocking, Tokio};
                #[test]
                fn blocking_client_blocking_server() {
                    super::cases::$case(super::Pair::new(Blocking, Blocking, stringify!($case)));
                }
                #[test]
                fn blocking_client_tokio_server() {
                    super::cases::$case(super::Pair::new(Blocking, Tokio, stringify!($case)));
                }
                #[test]
                fn tokio_client_blocking_server() {
                    super::cases::$case(super::Pair::new(Tokio, Blocking, stringify!($case)));
                }
                #[test]
                fn tokio_client_tokio_server() {
                    super::cases::$case(super::Pair::new(Tokio, Tokio, stringify!($case)));
                }
                #[test]
                fn shm_blocking_client_blocking_server() {
                    super::cases::$case(super::Pair::shm(Blocking, Blocking, stringify!($case)));
                }
                #[test]
                fn shm_blocking_client_tokio_server() {
                    super::cases::$case(super::Pair::shm(Blocking, Tokio, stringify!($case)));
                }
                #[test]
                fn shm_tokio_client_blocking_server() {
                    super::cases::$case(super::Pair::shm(Tokio, Blocking, stringify!($case)));
                }
                #[test]
                fn shm_tokio_client_tokio_server() {
                    super::cases::$case(super::Pair::shm(Tokio, Tokio, stringify!($case)));
                }
            }
        )*
    };
}

conformance!(
    echo_and_methods,
    credentials_and_deadline,
    errors_and_panics,
    builtin_methods,
    payload_limits,
    timeout_cancels_and_the_connection_survives,
    restart_reconnects,
    killed_mid_request_may_have_run,
    concurrent_callers_get_their_own_replies,
    answers_respect_a_small_client_limit,
);

/// Runs each raw-frame case against both servers.
macro_rules! server_conformance {
    ($($case:ident),* $(,)?) => {
        $(
            mod $case {
                use super::Flavour::{Blocking, Tokio};
                #[test]
                fn blocking_server() {
                    super::raw_cases::$case(Blocking, stringify!($case));
                }
                #[test]
                fn tokio_server() {
                    super::raw_cases::$case(Tokio, stringify!($case));
                }
            }
        )*
    };
}

server_conformance!(
    raw_control_frames_and_bad_requests,
    raw_cancel_reaches_the_handler_and_suppresses_the_reply,
    raw_slow_request_does_not_hold_up_a_fast_one,
    raw_malformed_streams_get_an_error_and_a_close,
    raw_hang_up_cancels_running_handlers,
);

mod cases {
    use super::*;

    pub fn echo_and_methods(p: Pair) {
        let _w = watchdog(Duration::from_secs(60));
        let server = p.serve();
        let mut c = p.connect(Duration::from_secs(10));
        assert_eq!(c.server_pid(), Some(server.pid));
        assert_eq!(c.request(b"Give me some data back!!").unwrap(), b"Give me some data back!!");
        assert_eq!(c.send_message("hello").unwrap(), "hello");
        assert_eq!(c.request(b"").unwrap(), b"", "empty payloads are fine");
        assert_eq!(text(c.call("pid", b"").unwrap()), server.pid.to_string());
        for i in 0..100u32 {
            assert_eq!(c.request(&i.to_be_bytes()).unwrap(), i.to_be_bytes());
        }
        let bytes: Vec<u8> = (0..=255).collect();
        assert_eq!(c.request(&bytes).unwrap(), bytes, "any bytes, not just text");
        assert!(server.stop().success());
    }

    pub fn credentials_and_deadline(p: Pair) {
        let _w = watchdog(Duration::from_secs(60));
        let _server = p.serve();
        let mut c = p.connect(Duration::from_secs(7));
        let uid = rustix::process::geteuid().as_raw();
        let gid = rustix::process::getegid().as_raw();
        assert_eq!(text(c.call("peer", b"").unwrap()), format!("{} {uid} {gid}", std::process::id()));
        let ms: u64 = text(c.call("deadline_ms", b"").unwrap()).parse().unwrap();
        assert!(ms > 5_000 && ms <= 7_000, "deadline seen by the server: {ms} ms");
    }

    pub fn errors_and_panics(p: Pair) {
        let _w = watchdog(Duration::from_secs(60));
        let _server = p.serve();
        let mut c = p.connect(Duration::from_secs(10));
        let e = c.call("fail", b"").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Remote);
        assert_eq!(e.remote().unwrap().code(), 418);
        assert_eq!(e.remote().unwrap().message(), "i am a teapot");
        assert!(e.may_have_run());
        let e = c.call("io_fail", b"").unwrap_err();
        assert_eq!((e.kind(), e.remote().unwrap().code()), (ErrorKind::Remote, 500));
        assert_eq!(e.remote().unwrap().message(), "no such board");
        let e = c.call("panic", b"").unwrap_err();
        assert_eq!((e.kind(), e.remote().unwrap().code()), (ErrorKind::Remote, 500));
        assert!(e.remote().unwrap().message().contains("boom in handler"), "{e}");
        assert_eq!(c.request(b"still here").unwrap(), b"still here");
        let e = c.call("no_such_method", b"").unwrap_err();
        assert_eq!((e.kind(), e.remote().unwrap().code()), (ErrorKind::Remote, 404));
        assert!(!e.may_have_run(), "an unknown method never ran");
        assert!(e.to_string().contains("no_such_method"), "{e}");
        assert_eq!(c.call("bad name", b"").unwrap_err().kind(), ErrorKind::InvalidName);
        assert_eq!(c.call("$reserved_nope", b"").unwrap_err().remote().map(|r| r.code()), Some(404));
        // A second connection is served as well.
        let mut other = p.connect(Duration::from_secs(10));
        assert_eq!(other.request(b"x").unwrap(), b"x");
    }

    pub fn builtin_methods(p: Pair) {
        let _w = watchdog(Duration::from_secs(60));
        let server = p.serve();
        let mut c = p.connect(Duration::from_secs(10));
        let ping = c.ping().unwrap();
        assert_eq!(ping.kind, "io.nats.micro.v1.ping_response");
        assert_eq!((ping.name.as_str(), ping.version.as_str()), (p.name.as_str(), "1.2.3"));
        assert_eq!(ping.id.len(), 22);
        assert_eq!(ping.metadata["pid"], server.pid.to_string());
        let info = c.info().unwrap();
        assert_eq!(info.description, "test peer");
        assert_eq!(
            (info.endpoints[0].name.as_str(), info.endpoints[0].subject.as_str()),
            ("default", &*p.name)
        );
        for m in ["wait_cancel", "sleep_ms", "fail", "echo_after"] {
            assert!(info.endpoints.iter().any(|e| e.name == m), "no endpoint {m}");
        }
        c.request(b"a").unwrap();
        c.request(b"b").unwrap();
        let _ = c.call("fail", b"");
        let stats = c.stats().unwrap();
        assert_eq!(stats.id, ping.id);
        let def = stats.endpoints.iter().find(|e| e.name == "default").unwrap();
        assert_eq!((def.num_requests, def.num_errors), (2, 0));
        let fail = stats.endpoints.iter().find(|e| e.name == "fail").unwrap();
        assert_eq!((fail.num_requests, fail.num_errors, fail.last_error.as_str()), (1, 1, "i am a teapot"));
        let raw: serde_json::Value = serde_json::from_slice(&c.call("$stats", b"").unwrap()).unwrap();
        for k in ["type", "name", "id", "version", "metadata", "started", "endpoints"] {
            assert!(raw.get(k).is_some(), "missing {k}");
        }
    }

    pub fn payload_limits(p: Pair) {
        let _w = watchdog(Duration::from_secs(60));
        let _server = p.serve();
        let mut c = p.connect_with(Duration::from_secs(30), 1000);
        assert_eq!(c.max_request_payload(), Some(proto::DEFAULT_MAX_PAYLOAD));
        assert_eq!(c.call("big", b"1000").unwrap().len(), 1000);
        let e = c.call("big", b"1001").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::FrameTooLarge, "{e}");
        let too_big = vec![7u8; proto::DEFAULT_MAX_PAYLOAD as usize + 1];
        let e = c.request(&too_big).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::FrameTooLarge, "{e}");
        assert!(e.to_string().contains("nothing was sent"), "{e}");
        drop(too_big);
        // Big payloads both ways, on a client that accepts them.
        let mut c = p.connect(Duration::from_secs(30));
        let payload: Vec<u8> = (0..4 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
        assert_eq!(c.request(&payload).unwrap(), payload);
        assert_eq!(c.call("big", b"3000000").unwrap().len(), 3_000_000);
        assert_eq!(c.request(b"small after big").unwrap(), b"small after big");
    }

    pub fn timeout_cancels_and_the_connection_survives(p: Pair) {
        let _w = watchdog(Duration::from_secs(60));
        let _server = p.serve();
        let mut c = p.connect(Duration::from_millis(300));
        let marker = p.marker("cancel");
        let e = c.call("wait_cancel", marker.to_str().unwrap().as_bytes()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::TimedOut, "{e}");
        assert!(e.may_have_run());
        c.set_timeout(Duration::from_secs(10));
        assert_eq!(c.request(b"after timeout").unwrap(), b"after timeout");
        // The handler stopped: it saw the cancellation (or, on the async server, was dropped at
        // the deadline, whichever came first).
        let word = marker_word(&marker);
        assert!(matches!(word.as_deref(), Some("cancelled" | "dropped")), "server-side handler: {word:?}");
        // A hung handler does not hold up later requests on the same connection.
        c.set_timeout(Duration::from_millis(200));
        assert_eq!(c.call("sleep_ms", b"3000").unwrap_err().kind(), ErrorKind::TimedOut);
        c.set_timeout(Duration::from_secs(10));
        assert_eq!(c.request(b"next").unwrap(), b"next");
    }

    pub fn restart_reconnects(p: Pair) {
        let _w = watchdog(Duration::from_secs(60));
        let first = p.serve();
        let mut c = p.connect(Duration::from_secs(10));
        assert_eq!(text(c.call("pid", b"").unwrap()), first.pid.to_string());
        assert!(first.stop().success());
        let second = p.serve();
        assert_eq!(text(c.call("pid", b"").unwrap()), second.pid.to_string(), "reconnected by itself");
        second.kill9();
        let third = p.serve();
        assert_eq!(text(c.call("pid", b"").unwrap()), third.pid.to_string(), "and after kill -9");
        drop(third);
        let e = c.request(b"x").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NoService, "{e}");
    }

    pub fn killed_mid_request_may_have_run(p: Pair) {
        let _w = watchdog(Duration::from_secs(60));
        let server = p.serve();
        let mut c = p.connect(Duration::from_secs(30));
        let killer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            server.kill9();
        });
        let e = c.call("sleep_ms", b"20000").unwrap_err();
        killer.join().unwrap();
        assert_eq!(e.kind(), ErrorKind::Closed, "{e}");
        assert!(e.may_have_run());
        assert!(e.to_string().contains("may have run"), "{e}");
    }

    pub fn answers_respect_a_small_client_limit(p: Pair) {
        let _w = watchdog(Duration::from_secs(60));
        let _server = p.serve();
        let mut c = p.connect_with(Duration::from_secs(10), 8);
        // Built-in JSON is far over 8 bytes: a clean "too large", not a broken connection.
        let e = c.info().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::FrameTooLarge, "{e}");
        // An error message is cut to the limit.
        let e = c.call("fail", b"").unwrap_err();
        assert_eq!((e.remote().unwrap().code(), e.remote().unwrap().message()), (418, "i am a t"));
        assert_eq!(c.request(b"fits").unwrap(), b"fits");
        assert_eq!(c.call("big", b"9").unwrap_err().kind(), ErrorKind::FrameTooLarge);
        assert_eq!(c.request(b"still ok").unwrap(), b"still ok");
    }

    /// Several callers at once, each with its own connection (blocking) or sharing one (async),
    /// replies arriving out of order: everyone gets their own.
    pub fn concurrent_callers_get_their_own_replies(p: Pair) {
        let _w = watchdog(Duration::from_secs(60));
        let _server = p.serve();
        let threads: Vec<_> = (0..4u32)
            .map(|t| {
                let mut c = p.connect(Duration::from_secs(30));
                std::thread::spawn(move || {
                    for i in 0..25u32 {
                        let payload = format!("{}:{t}-{i}", (t * 7 + i) % 5);
                        assert_eq!(text(c.call("echo_after", payload.as_bytes()).unwrap()), payload);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }
}

mod raw_cases {
    use super::*;

    fn up(flavour: Flavour, tag: &str) -> (TempDir, String, PeerProcess) {
        let dir = TempDir::new(tag);
        let name = unique("RAW");
        let p = serve(&dir, &name, flavour, &[]);
        (dir, name, p)
    }

    pub fn raw_control_frames_and_bad_requests(flavour: Flavour, tag: &str) {
        let _w = watchdog(Duration::from_secs(60));
        let (dir, name, _p) = up(flavour, tag);
        let mut r = Raw::hello(&dir, &name);
        r.send(&Header { kind: 42, ..Header::new(Kind::Request, 9) }, b"", b"?");
        let (flags, msg) = r.expect_error(9, status::BAD_REQUEST);
        assert_eq!(flags, FLAG_SYSTEM | FLAG_NOT_RUN);
        assert!(msg.contains("unknown frame kind 42"), "{msg}");
        r.send(&Header { flags: 0x8000, ..Header::request(10, 0) }, b"", b"");
        assert!(r.expect_error(10, status::BAD_REQUEST).1.contains("flags"));
        r.request(0, "", b"");
        assert!(r.expect_error(0, status::BAD_REQUEST).1.contains("id 0"));
        r.send(&Header::new(Kind::Reply, 11), b"", b"");
        r.expect_error(11, status::BAD_REQUEST);
        r.request(12, "no_such", b"");
        let (flags, msg) = r.expect_error(12, status::NO_METHOD);
        assert_eq!(flags, FLAG_SYSTEM | FLAG_NOT_RUN);
        assert!(msg.contains("no_such"), "{msg}");
        r.send(&Header::new(Kind::Ping, 77), b"", b"are you there");
        let (h, _, p) = r.read().unwrap();
        assert_eq!((h.kind(), h.id, &p[..]), (Some(Kind::Pong), 77, &b"are you there"[..]));
        r.send(&Header::new(Kind::Cancel, 999), b"", b""); // unknown id: ignored
        r.request(13, "", b"still fine");
        assert_eq!(r.expect_reply(13), b"still fine");
        // A duplicate id while the first is in flight.
        r.request(14, "sleep_ms", b"300");
        r.request(14, "", b"dup");
        let (flags, msg) = r.expect_error(14, status::BAD_REQUEST);
        assert_eq!(flags, FLAG_SYSTEM | FLAG_NOT_RUN);
        assert!(msg.contains("already in flight"), "{msg}");
        assert_eq!(r.expect_reply(14), b"slept 300");
        // Once answered, the id may be used again.
        r.request(14, "", b"again");
        assert_eq!(r.expect_reply(14), b"again");
    }

    pub fn raw_cancel_reaches_the_handler_and_suppresses_the_reply(flavour: Flavour, tag: &str) {
        let _w = watchdog(Duration::from_secs(60));
        let (dir, name, _p) = up(flavour, tag);
        let marker = dir.path().join("raw.marker");
        let mut r = Raw::hello(&dir, &name);
        r.request(5, "wait_cancel", marker.to_str().unwrap().as_bytes()); // no deadline
        std::thread::sleep(Duration::from_millis(100));
        r.send(&Header::new(Kind::Cancel, 5), b"", b"");
        assert_eq!(marker_word(&marker).as_deref(), Some("cancelled"));
        r.request(6, "", b"next");
        assert_eq!(r.expect_reply(6), b"next");
        // The handler answers 500 ms after the cancel; that answer must not be sent.
        std::thread::sleep(Duration::from_millis(800));
        r.send(&Header::new(Kind::Ping, 7), b"", b"");
        let (h, _, _) = r.read().unwrap();
        assert_eq!((h.kind(), h.id), (Some(Kind::Pong), 7), "a cancelled request was answered");
    }

    pub fn raw_slow_request_does_not_hold_up_a_fast_one(flavour: Flavour, tag: &str) {
        let _w = watchdog(Duration::from_secs(60));
        let (dir, name, _p) = up(flavour, tag);
        let mut r = Raw::hello(&dir, &name);
        r.request(1, "sleep_ms", b"1500");
        r.request(2, "", b"fast");
        assert_eq!(r.expect_reply(2), b"fast", "the fast request waited for the slow one");
        assert_eq!(r.expect_reply(1), b"slept 1500");
    }

    pub fn raw_malformed_streams_get_an_error_and_a_close(flavour: Flavour, tag: &str) {
        let _w = watchdog(Duration::from_secs(60));
        let (dir, name, _p) = up(flavour, tag);
        for (what, bytes, code) in [
            ("giant length", vec![0xff, 0xff, 0xff, 0xff], status::TOO_LARGE),
            ("http", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), status::TOO_LARGE),
            ("short length", vec![0, 0, 0, 3, 1, 2, 3], status::BAD_REQUEST),
        ] {
            for after_hello in [false, true] {
                let mut r = if after_hello { Raw::hello(&dir, &name) } else { Raw::connect(&dir, &name) };
                r.s.write_all(&bytes).unwrap();
                let (h, _, p) = r.read().unwrap_or_else(|| panic!("{what}: no error frame"));
                assert_eq!(
                    (h.kind(), h.id, h.status),
                    (Some(Kind::Error), 0, code),
                    "{what}: {}",
                    String::from_utf8_lossy(&p)
                );
                assert!(r.read().is_none(), "{what}: the connection stays open");
            }
        }
        let mut r = Raw::hello(&dir, &name);
        r.send(&Header { version: 9, ..Header::request(1, 0) }, b"", b"");
        assert!(r.expect_error(0, status::VERSION_UNSUPPORTED).1.contains("version 9"));
        assert!(r.read().is_none());
        let mut r = Raw::connect(&dir, &name);
        r.request(1, "", b"too early");
        assert!(r.expect_error(0, status::BAD_REQUEST).1.contains("Hello"));
        assert!(r.read().is_none());
        // And the server still serves.
        let mut r = Raw::hello(&dir, &name);
        r.request(1, "", b"fine");
        assert_eq!(r.expect_reply(1), b"fine");
    }

    pub fn raw_hang_up_cancels_running_handlers(flavour: Flavour, tag: &str) {
        let _w = watchdog(Duration::from_secs(60));
        let (dir, name, _p) = up(flavour, tag);
        let marker = dir.path().join("hangup.marker");
        let mut r = Raw::hello(&dir, &name);
        r.request(1, "wait_cancel", marker.to_str().unwrap().as_bytes());
        std::thread::sleep(Duration::from_millis(100));
        drop(r);
        assert_eq!(marker_word(&marker).as_deref(), Some("cancelled"));
    }
}

// ---------------------------------------------------------------------------------------------
// What only the async flavour promises.

/// The open sockets of a process (listener + connections).
fn socket_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|l| l.to_string_lossy().starts_with("socket:"))
        .count()
}

/// A field of /proc/<pid>/status, in KiB.
fn status_kib(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = s.lines().find(|l| l.starts_with(field)).unwrap_or_else(|| panic!("no {field}"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn assert_clone_send_sync<T: Clone + Send + Sync + 'static>() {}

#[test]
fn the_client_is_clone_send_sync_and_its_futures_are_send() {
    assert_clone_send_sync::<microcs::tokio::Client>();
    fn is_send<T: Send>(_: &T) {}
    let rt = rt();
    let dir = TempDir::new("send");
    let e =
        rt.block_on(microcs::tokio::Client::builder("NOBODY").runtime_dir(dir.path()).connect()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NoService);
    // Futures of every call can be spawned on a multi-thread runtime.
    let _ = |c: microcs::tokio::Client| {
        is_send(&c.request(b""));
        is_send(&c.call("m", b""));
        is_send(&c.send_message(""));
        is_send(&c.ping());
    };
}

/// 1,000 concurrent requests from 50 tasks over one connection, all answered correctly.
fn thousand_requests_over_one_connection(server: Flavour) {
    let _w = watchdog(Duration::from_secs(120));
    let dir = TempDir::new("thousand");
    let name = unique("THOUSAND");
    let peer = serve(&dir, &name, server, &[]);
    // Sockets the server holds before any client (its listener, and whatever its runtime uses
    // internally, e.g. tokio's signal driver when that feature is on in the build).
    let before = socket_count(peer.pid);
    let rt = rt();
    rt.block_on(async {
        let client =
            microcs::tokio::Client::builder(&name).runtime_dir(dir.path()).timeout(Duration::from_secs(60));
        let client = client.connect().await.unwrap();
        let tasks: Vec<_> = (0..50u32)
            .map(|t| {
                let c = client.clone();
                ::tokio::spawn(async move {
                    // 20 requests in flight at once per task; replies come back out of order
                    // because each waits a different time on the server.
                    let calls = (0..20u32).map(|i| {
                        let c = &c;
                        async move {
                            let payload = format!("{}:task {t} request {i}", (t + 3 * i) % 7);
                            let reply = c.call("echo_after", payload.as_bytes()).await.unwrap();
                            assert_eq!(text(reply), payload, "a reply reached the wrong caller");
                        }
                    });
                    futures_join_all(calls).await;
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        // One connection carried it all.
        assert_eq!(socket_count(peer.pid), before + 1, "requests were spread over several connections");
        drop(client);
    });
}

/// Runs futures concurrently on the current task (a small `join_all`).
async fn futures_join_all<F: std::future::Future<Output = ()>>(futs: impl Iterator<Item = F>) {
    let mut futs: Vec<_> = futs.map(Box::pin).collect();
    std::future::poll_fn(|cx| {
        futs.retain_mut(|f| f.as_mut().poll(cx).is_pending());
        if futs.is_empty() { std::task::Poll::Ready(()) } else { std::task::Poll::Pending }
    })
    .await;
}

#[test]
fn thousand_concurrent_requests_from_fifty_tasks_over_one_connection_tokio_server() {
    thousand_requests_over_one_connection(Flavour::Tokio);
}

#[test]
fn thousand_concurrent_requests_from_fifty_tasks_over_one_connection_blocking_server() {
    thousand_requests_over_one_connection(Flavour::Blocking);
}

/// Callers that time out while their (slow) replies are still coming, mixed with callers that
/// get answers: every answer reaches its own caller, and late replies reach nobody.
fn late_replies_are_dropped(server: Flavour) {
    let _w = watchdog(Duration::from_secs(120));
    let dir = TempDir::new("late");
    let name = unique("LATE");
    let _peer = serve(&dir, &name, server, &[]);
    let rt = rt();
    rt.block_on(async {
        let client = microcs::tokio::Client::builder(&name)
            .runtime_dir(dir.path())
            .timeout(Duration::from_millis(500))
            .connect()
            .await
            .unwrap();
        let slow: Vec<_> = (0..20)
            .map(|i| {
                let c = client.clone();
                ::tokio::spawn(async move { c.call("echo_after", format!("1000:slow {i}").as_bytes()).await })
            })
            .collect();
        for s in slow {
            let e = s.await.unwrap().unwrap_err();
            assert_eq!(e.kind(), ErrorKind::TimedOut, "{e}");
            assert!(e.may_have_run());
        }
        // The slow replies (from the blocking server, whose handlers cannot be stopped) arrive
        // during the next second, while these calls are in flight.
        let mut fast = client.clone();
        fast.set_timeout(Duration::from_secs(30));
        let t0 = std::time::Instant::now();
        let mut n = 0u32;
        while t0.elapsed() < Duration::from_millis(1500) {
            let calls = (0..10).map(|j| {
                let fast = &fast;
                async move {
                    let payload = format!("{}:fast {n} {j}", j % 3);
                    assert_eq!(text(fast.call("echo_after", payload.as_bytes()).await.unwrap()), payload);
                }
            });
            futures_join_all(calls).await;
            n += 1;
        }
    });
}

#[test]
fn replies_after_the_caller_gave_up_are_dropped_tokio_server() {
    late_replies_are_dropped(Flavour::Tokio);
}

#[test]
fn replies_after_the_caller_gave_up_are_dropped_blocking_server() {
    late_replies_are_dropped(Flavour::Blocking);
}

#[test]
fn a_handler_still_running_at_the_deadline_is_stopped_on_the_tokio_server() {
    let _w = watchdog(Duration::from_secs(60));
    let dir = TempDir::new("deadline");
    let name = unique("DEADLINE");
    let _peer = serve(&dir, &name, Flavour::Tokio, &[]);
    for client in [Flavour::Tokio, Flavour::Blocking] {
        let marker = dir.path().join(format!("{client:?}.marker"));
        let mut c = AnyClient::connect(client, &dir, &name, Duration::from_millis(300)).unwrap();
        let payload = format!("20000 {}", marker.display());
        let e = c.call("sleep_marked", payload.as_bytes()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::TimedOut, "{e}");
        // Dropped at the deadline, not left to sleep for 20 s.
        assert_eq!(marker_word(&marker).as_deref(), Some("dropped"), "{client:?} client");
    }
    let mut c = AnyClient::connect(Flavour::Tokio, &dir, &name, Duration::from_secs(10)).unwrap();
    // Recorded as the handler is dropped; poll, since the marker is written a moment before.
    let ep = eventually(Duration::from_secs(10), || {
        let stats = c.stats().unwrap();
        stats.endpoints.into_iter().find(|e| e.name == "sleep_marked" && e.num_requests == 2)
    })
    .expect("two sleep_marked requests in $stats");
    assert_eq!(ep.num_errors, 2);
    assert!(ep.last_error.contains("deadline"), "{}", ep.last_error);
    // A handler that finishes in time is not disturbed.
    let marker = dir.path().join("in-time.marker");
    assert_eq!(
        text(c.call("sleep_marked", format!("10 {}", marker.display()).as_bytes()).unwrap()),
        "finished"
    );
    assert_eq!(marker_word(&marker).as_deref(), Some("finished"));
}

/// Dropping the future of a call (here: an outer timeout far shorter than the client's own)
/// sends a Cancel; the handler sees it — on either server.
fn dropping_the_future_cancels(server: Flavour) {
    let _w = watchdog(Duration::from_secs(60));
    let dir = TempDir::new("dropfut");
    let name = unique("DROPFUT");
    let _peer = serve(&dir, &name, server, &[]);
    let marker = dir.path().join("drop.marker");
    let rt = rt();
    rt.block_on(async {
        let client = microcs::tokio::Client::builder(&name)
            .runtime_dir(dir.path())
            .timeout(Duration::from_secs(30))
            .connect()
            .await
            .unwrap();
        let call = client.call("wait_cancel", marker.to_str().unwrap().as_bytes());
        assert!(::tokio::time::timeout(Duration::from_millis(200), call).await.is_err());
        // Only the Cancel frame can have stopped it: its deadline is 30 s away.
        let word = ::tokio::task::spawn_blocking(move || marker_word(&marker)).await.unwrap();
        assert_eq!(word.as_deref(), Some("cancelled"));
        assert_eq!(client.request(b"still usable").await.unwrap(), b"still usable");
    });
}

#[test]
fn dropping_a_call_future_cancels_the_work_on_the_tokio_server() {
    dropping_the_future_cancels(Flavour::Tokio);
}

#[test]
fn dropping_a_call_future_cancels_the_work_on_the_blocking_server() {
    dropping_the_future_cancels(Flavour::Blocking);
}

/// A server shutting down answers what it is running, while a request sent after its shutdown
/// began fails on the client as "not run" and is sent again (here: to nobody) — over one
/// multiplexed connection, the failure of the new request must not take the old one down.
fn shutdown_drains_in_flight_while_new_requests_are_not_run(server: Flavour) {
    let _w = watchdog(Duration::from_secs(60));
    let dir = TempDir::new("tshutdrain");
    let name = unique("TSHUTDRAIN");
    let peer = serve(&dir, &name, server, &[]);
    let rt = rt();
    rt.block_on(async {
        let client = microcs::tokio::Client::builder(&name)
            .runtime_dir(dir.path())
            .timeout(Duration::from_secs(20))
            .connect()
            .await
            .unwrap();
        let c = client.clone();
        let slow = ::tokio::spawn(async move { c.call("sleep_ms", b"1000").await });
        ::tokio::time::sleep(Duration::from_millis(200)).await;
        let stopper = std::thread::spawn(move || peer.stop());
        // Wait until the name is released: shutdown has begun.
        let sock = dir.path().join(format!("{name}.sock"));
        while sock.exists() {
            ::tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let e = client.request(b"too late").await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NoService, "{e}");
        assert!(!e.may_have_run(), "{e}");
        assert_eq!(slow.await.unwrap().unwrap(), b"slept 1000", "the running request was not drained");
        assert!(stopper.join().unwrap().success());
    });
}

#[test]
fn shutdown_drains_in_flight_while_new_requests_are_not_run_tokio_server() {
    shutdown_drains_in_flight_while_new_requests_are_not_run(Flavour::Tokio);
}

#[test]
fn shutdown_drains_in_flight_while_new_requests_are_not_run_blocking_server() {
    shutdown_drains_in_flight_while_new_requests_are_not_run(Flavour::Blocking);
}

/// Servers of both flavours restarted over and over (kill -9 and graceful) under many concurrent
/// callers sharing one async client: every call gets its own reply or a typed error, nothing
/// runs twice, and nothing reported as "not run" ran.
#[test]
fn chaos_restarts_of_both_servers_under_a_shared_client_run_nothing_twice() {
    let _w = watchdog(Duration::from_secs(120));
    let dir = TempDir::new("tchaos");
    let name = unique("TCHAOS");
    let log = dir.path().join("executions.log");
    let log_s = log.to_str().unwrap().to_owned();
    let env = [("PEER_LOG", log_s.as_str()), ("PEER_GRACE_MS", "2000")];
    let mut server = Some(serve(&dir, &name, Flavour::Tokio, &env));
    let rt = rt();
    let client =
        rt.block_on(tokio_dir_client(&dir, &name).timeout(Duration::from_secs(5)).connect()).unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let callers: Vec<_> = (0..16)
        .map(|t| {
            let (c, stop) = (client.clone(), stop.clone());
            rt.spawn(async move {
                let mut results = Vec::new();
                let mut i = 0u32;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let tag = format!("t{t}-{i}");
                    i += 1;
                    match c.call("record", tag.as_bytes()).await {
                        Ok(reply) => {
                            assert_eq!(reply, tag.as_bytes(), "misrouted reply");
                            results.push((tag, true, true));
                        }
                        Err(e) => {
                            assert!(
                                matches!(
                                    e.kind(),
                                    ErrorKind::NoService
                                        | ErrorKind::Closed
                                        | ErrorKind::Io
                                        | ErrorKind::TimedOut
                                ),
                                "untyped failure: {e:?}"
                            );
                            if e.kind() == ErrorKind::NoService {
                                ::tokio::time::sleep(Duration::from_millis(2)).await;
                            }
                            results.push((tag, false, e.may_have_run()));
                        }
                    }
                }
                results
            })
        })
        .collect();
    let t0 = std::time::Instant::now();
    let mut round = 0;
    while t0.elapsed() < Duration::from_secs(4) {
        std::thread::sleep(Duration::from_millis(150));
        let s = server.take().unwrap();
        if round % 2 == 0 {
            s.kill9();
        } else {
            assert!(s.stop().success());
        }
        round += 1;
        let flavour = if round % 3 == 0 { Flavour::Blocking } else { Flavour::Tokio };
        server = Some(serve(&dir, &name, flavour, &env));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let results: Vec<_> = rt.block_on(async {
        let mut all = Vec::new();
        for c in callers {
            all.extend(c.await.unwrap());
        }
        all
    });
    drop(server);
    let mut runs: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for line in std::fs::read_to_string(&log).unwrap().lines() {
        *runs.entry(line.to_owned()).or_default() += 1;
    }
    let ok = results.iter().filter(|r| r.1).count();
    assert!(ok > 100, "only {ok} calls succeeded across {round} restarts");
    assert!(results.len() > ok, "the chaos never interrupted a call ({round} restarts)");
    for (tag, succeeded, may_have_run) in &results {
        let n = runs.get(tag).copied().unwrap_or(0);
        assert!(n <= 1, "{tag} ran {n} times");
        if *succeeded {
            assert_eq!(n, 1, "{tag} succeeded but never ran");
        } else if !may_have_run {
            assert_eq!(n, 0, "{tag} was reported as not run, but it ran");
        }
    }
}

#[test]
fn the_in_flight_cap_bounds_running_handlers_and_memory_under_a_flood() {
    let _w = watchdog(Duration::from_secs(180));
    let dir = TempDir::new("flood");
    let name = unique("FLOOD");
    const CAP: usize = 32;
    let peer = serve(&dir, &name, Flavour::Tokio, &[("PEER_MAX_IN_FLIGHT", &CAP.to_string())]);
    let rt = rt();
    // 1,000 requests of 64 KiB sent at once, each held 100 ms by its handler: a server that read
    // them all would hold about 62 MiB at once; one that stops reading at the cap holds 2 MiB.
    const N: usize = 1000;
    const SIZE: usize = 64 * 1024;
    rt.block_on(async {
        let client = microcs::tokio::Client::builder(&name)
            .runtime_dir(dir.path())
            .timeout(Duration::from_secs(120))
            .connect()
            .await
            .unwrap();
        assert_eq!(client.server_max_in_flight(), Some(CAP as u32));
        let mut payload = b"100:".to_vec();
        payload.resize(SIZE, b'x');
        let payload = Arc::new(payload);
        // Warm up, so that the baseline includes the allocator's steady state.
        let warm = (0..CAP).map(|_| async {
            assert_eq!(client.call("echo_after", &payload[..]).await.unwrap().len(), SIZE);
        });
        futures_join_all(warm).await;
        let before = status_kib(peer.pid, "VmRSS:");
        let tasks: Vec<_> = (0..N)
            .map(|_| {
                let c = client.clone();
                let p = payload.clone();
                ::tokio::spawn(async move {
                    assert_eq!(c.call("echo_after", &p[..]).await.unwrap().len(), SIZE);
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let peak = status_kib(peer.pid, "VmHWM:");
        let growth_mib = peak.saturating_sub(before) / 1024;
        let flood_mib = N * SIZE / (1024 * 1024);
        eprintln!("server RSS before {before} KiB, peak {peak} KiB during a {flood_mib} MiB flood");
        assert!(growth_mib < 16, "server memory grew by {growth_mib} MiB during a {flood_mib} MiB flood");
        // And never more handlers at once than the cap.
        let calls = (0..400).map(|_| async {
            assert_eq!(client.call("sleep_ms", b"5").await.unwrap(), b"slept 5");
        });
        futures_join_all(calls).await;
        let most: usize = text(client.call("max_running", b"").await.unwrap()).parse().unwrap();
        assert!((2..=CAP).contains(&most), "{most} handlers ran at once (cap {CAP})");
    });
}

// ---------------------------------------------------------------------------------------------
// The async server in-process: shutdown, limits and security checks.

fn tokio_dir_server(dir: &TempDir, name: &str) -> microcs::tokio::ServerBuilder {
    microcs::tokio::Server::builder(name).runtime_dir(dir.path())
}

fn tokio_dir_client(dir: &TempDir, name: &str) -> microcs::tokio::ClientBuilder {
    microcs::tokio::Client::builder(name).runtime_dir(dir.path())
}

#[test]
fn shutdown_lets_inflight_requests_finish_refuses_new_ones_and_frees_the_name() {
    let _w = watchdog(Duration::from_secs(60));
    let dir = TempDir::new("tdrain");
    let name = unique("TDRAIN");
    rt().block_on(async {
        let handle = tokio_dir_server(&dir, &name)
            .bind()
            .await
            .unwrap()
            .spawn(|r: Request| async move {
                ::tokio::time::sleep(Duration::from_millis(400)).await;
                Ok::<_, RemoteError>(r.into_payload())
            })
            .unwrap();
        let client = tokio_dir_client(&dir, &name).connect().await.unwrap();
        let c2 = client.clone();
        let inflight = ::tokio::spawn(async move { c2.request(b"finish me").await });
        ::tokio::time::sleep(Duration::from_millis(100)).await;
        handle.shutdown().await;
        assert_eq!(inflight.await.unwrap().unwrap(), b"finish me");
        assert!(!dir.path().join(format!("{name}.sock")).exists());
        assert!(!dir.path().join(format!("{name}.lock")).exists());
        let e = client.request(b"x").await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NoService, "{e}");
        // The name is free: a new server binds, and the same client reaches it.
        let _h2 = tokio_dir_server(&dir, &name)
            .bind()
            .await
            .unwrap()
            .spawn(|_r: Request| async { Ok::<_, RemoteError>("second") })
            .unwrap();
        assert_eq!(client.request(b"x").await.unwrap(), b"second");
    });
}

#[test]
fn serve_with_shutdown_stops_when_the_signal_resolves() {
    let _w = watchdog(Duration::from_secs(60));
    let dir = TempDir::new("tsignal");
    let name = unique("TSIGNAL");
    rt().block_on(async {
        let server = tokio_dir_server(&dir, &name).bind().await.unwrap();
        let trigger = server.shutdown_trigger();
        let (tx, rx) = ::tokio::sync::oneshot::channel::<()>();
        let serving = ::tokio::spawn(server.serve_with_shutdown(
            |r: Request| async move { Ok::<_, RemoteError>(r.into_payload()) },
            async {
                let _ = rx.await;
            },
        ));
        let client = tokio_dir_client(&dir, &name).connect().await.unwrap();
        assert_eq!(client.request(b"up").await.unwrap(), b"up");
        tx.send(()).unwrap();
        serving.await.unwrap().unwrap();
        assert_eq!(client.request(b"x").await.unwrap_err().kind(), ErrorKind::NoService);
        // `serve` returns when its trigger fires.
        let server = tokio_dir_server(&dir, &name).bind().await.unwrap();
        let trigger2 = server.shutdown_trigger();
        let serving =
            ::tokio::spawn(server.serve(|r: Request| async move { Ok::<_, RemoteError>(r.into_payload()) }));
        assert_eq!(client.request(b"again").await.unwrap(), b"again");
        trigger2.shutdown();
        serving.await.unwrap().unwrap();
        drop(trigger);
    });
}

#[test]
fn the_tokio_server_caps_connections_and_silent_handshakes() {
    let _w = watchdog(Duration::from_secs(60));
    let dir = TempDir::new("tcap");
    let name = unique("TCAP");
    rt().block_on(async {
        let h = tokio_dir_server(&dir, &name)
            .max_connections(2)
            .bind()
            .await
            .unwrap()
            .spawn(|r: Request| async move { Ok::<_, RemoteError>(r.into_payload()) })
            .unwrap();
        let a = tokio_dir_client(&dir, &name).connect().await.unwrap();
        let _b = tokio_dir_client(&dir, &name).connect().await.unwrap();
        let e = tokio_dir_client(&dir, &name).connect().await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Remote, "{e}");
        assert_eq!(e.remote().unwrap().code(), 503);
        assert!(e.to_string().contains("limit of 2 connections"), "{e}");
        assert_eq!(a.request(b"fine").await.unwrap(), b"fine");
        assert_eq!(h.connections(), 2);
        h.shutdown().await;
    });
    // Connections that never say hello are dropped, oldest first, to make room.
    let name = unique("TSILENT");
    rt().block_on(async {
        let h = tokio_dir_server(&dir, &name)
            .max_pending_handshakes(4)
            .bind()
            .await
            .unwrap()
            .spawn(|r: Request| async move { Ok::<_, RemoteError>(r.into_payload()) })
            .unwrap();
        let silent: Vec<_> = (0..10).map(|_| Raw::connect(&dir, &name)).collect();
        let c = tokio_dir_client(&dir, &name).connect().await.unwrap();
        assert_eq!(c.request(b"let in").await.unwrap(), b"let in");
        let mut silent = silent;
        let first = &mut silent[0];
        assert!(first.read().is_none(), "the oldest silent connection was kept");
        h.shutdown().await;
    });
}

#[test]
fn the_tokio_server_times_out_silent_and_trickling_connections() {
    let _w = watchdog(Duration::from_secs(60));
    let dir = TempDir::new("tslow");
    let name = unique("TSLOW");
    let rt = rt();
    let _h = rt.block_on(async {
        tokio_dir_server(&dir, &name)
            .handshake_timeout(Duration::from_millis(200))
            .frame_timeout(Duration::from_millis(200))
            .bind()
            .await
            .unwrap()
            .spawn(|r: Request| async move { Ok::<_, RemoteError>(r.into_payload()) })
            .unwrap()
    });
    let mut r = Raw::connect(&dir, &name);
    assert!(r.read().is_none(), "a connection that never says hello is closed");
    let mut r = Raw::hello(&dir, &name);
    let mut b = Vec::new();
    proto::encode(&mut b, &Header::request(1, 0), b"", &[0u8; 64]);
    r.s.write_all(&b[..30]).unwrap();
    let (_, msg) = r.expect_error(0, status::TIMED_OUT);
    assert!(msg.contains("not completed"), "{msg}");
    assert!(r.read().is_none());
    let mut r = Raw::hello(&dir, &name);
    std::thread::sleep(Duration::from_millis(500));
    r.request(2, "", b"idle is fine");
    assert_eq!(r.expect_reply(2), b"idle is fine");
}

#[test]
fn handler_panics_in_sync_part_and_after_await_become_errors() {
    let _w = watchdog(Duration::from_secs(60));
    let dir = TempDir::new("tpanic");
    let name = unique("TPANIC");
    rt().block_on(async {
        let h = tokio_dir_server(&dir, &name)
            .method("before", |_r: Request| -> std::future::Ready<Result<Vec<u8>, RemoteError>> {
                panic!("before the future")
            })
            .method("after", |_r: Request| async {
                ::tokio::task::yield_now().await;
                if std::process::id() != 0 {
                    panic!("after an await");
                }
                Ok::<_, RemoteError>("unreachable")
            })
            .method("invalid", |r: Request| async move { r.text().map(str::to_owned) })
            .bind()
            .await
            .unwrap()
            .spawn(|r: Request| async move { Ok::<_, RemoteError>(r.into_payload()) })
            .unwrap();
        let c = tokio_dir_client(&dir, &name).connect().await.unwrap();
        for (m, text) in [("before", "before the future"), ("after", "after an await")] {
            let e = c.call(m, b"").await.unwrap_err();
            assert_eq!(e.remote().map(|r| r.code()), Some(500), "{e}");
            assert!(e.to_string().contains(text), "{e}");
        }
        let e = c.call("invalid", &[0xff, 0xfe]).await.unwrap_err();
        assert_eq!(e.remote().map(|r| r.code()), Some(400), "{e}");
        assert_eq!(c.request(b"alive").await.unwrap(), b"alive");
        let stats = h.stats();
        let after = stats.endpoints.iter().find(|e| e.name == "after").unwrap();
        assert_eq!((after.num_requests, after.num_errors), (1, 1));
        h.shutdown().await;
    });
}

async fn echo_fn(req: Request) -> Result<Vec<u8>, RemoteError> {
    Ok(req.into_payload())
}

#[test]
fn handlers_are_async_fns_async_closures_or_closures_returning_futures() {
    let _w = watchdog(Duration::from_secs(30));
    let dir = TempDir::new("tkinds");
    let name = unique("TKINDS");
    rt().block_on(async {
        let prefix = Arc::new(String::from("hello "));
        let h = tokio_dir_server(&dir, &name)
            .method("fn", echo_fn)
            .method("async_closure", async |req: Request| Ok::<_, RemoteError>(req.text()?.to_uppercase()))
            // State goes into each call's future by cloning it first.
            .method("captures", move |req: Request| {
                let prefix = prefix.clone();
                async move { Ok::<_, RemoteError>(format!("{prefix}{}", req.text()?)) }
            })
            .method("remaining", |req: Request| async move {
                let left = req.remaining().ok_or_else(|| RemoteError::new(400, "no deadline"))?;
                Ok::<_, RemoteError>(format!("{}", left.as_millis() > 0))
            })
            .bind()
            .await
            .unwrap()
            .spawn(echo_fn)
            .unwrap();
        let c = tokio_dir_client(&dir, &name).connect().await.unwrap();
        assert_eq!(c.call("fn", b"a").await.unwrap(), b"a");
        assert_eq!(c.call("async_closure", b"b").await.unwrap(), b"B");
        assert_eq!(c.call("captures", b"b").await.unwrap(), b"hello b");
        assert_eq!(c.call("remaining", b"").await.unwrap(), b"true");
        assert_eq!(c.request(b"c").await.unwrap(), b"c");
        h.shutdown().await;
    });
}

#[test]
fn a_client_outlives_the_runtime_it_connected_on() {
    let _w = watchdog(Duration::from_secs(30));
    let dir = TempDir::new("truntime");
    let name = unique("TRUNTIME");
    let _peer = serve(&dir, &name, Flavour::Tokio, &[]);
    let first = ::tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let client = first.block_on(tokio_dir_client(&dir, &name).connect()).unwrap();
    assert_eq!(first.block_on(client.request(b"one")).unwrap(), b"one");
    // The connection's tasks die with their runtime; the client notices and reconnects on the
    // runtime it is used on next, instead of waiting for its timeout.
    drop(first);
    let second = rt();
    let mut c = client.clone();
    c.set_timeout(Duration::from_secs(20));
    assert_eq!(second.block_on(c.request(b"two")).unwrap(), b"two");
}

#[test]
fn invalid_method_names_are_reported_by_bind() {
    let dir = TempDir::new("tbadm");
    rt().block_on(async {
        let ok = |_r: Request| async { Ok::<_, RemoteError>("") };
        for bad in ["", "a b", "$ping", "x/y"] {
            let e = tokio_dir_server(&dir, "BADM").method(bad, ok).bind().await.unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidName, "{bad:?}: {e}");
        }
        let e = tokio_dir_server(&dir, "BADM").method("m", ok).method("m", ok).bind().await.unwrap_err();
        assert!(e.to_string().contains("twice"), "{e}");
        let e = tokio_dir_server(&dir, "bad name").bind().await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidName);
        // And the name is taken while a blocking server holds it: one registry for both.
        let _blocking = dir.server("SHARED").bind().unwrap();
        let e = tokio_dir_server(&dir, "SHARED").bind().await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NameTaken);
        assert_eq!(e.owner_pid(), Some(std::process::id()));
    });
}

#[test]
fn another_user_is_rejected_by_the_tokio_server_before_a_byte_is_read() {
    let _w = watchdog(Duration::from_secs(30));
    if rustix::process::geteuid().as_raw() != 0
        || std::process::Command::new("setpriv").arg("--version").output().is_err()
    {
        eprintln!("skipped: needs root and setpriv to act as another user");
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("tuid");
    let name = unique("TUID");
    let _server = serve(&dir, &name, Flavour::Tokio, &[]);
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let sock = dir.path().join(format!("{name}.sock"));
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", PEER, "call-dir", &name])
        .arg(dir.path())
        .output()
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.starts_with("PermissionDenied") && stderr.contains("user 65534"), "{stderr}");
    let mut c = AnyClient::connect(Flavour::Tokio, &dir, &name, Duration::from_secs(10)).unwrap();
    assert_eq!(c.request(b"me").unwrap(), b"me");
}

/// As the blocking client's test: `send_buffer` sizes the async client's socket buffer too.
#[test]
fn the_send_buffer_lets_a_large_request_leave_at_once_tokio_client() {
    let _w = watchdog(Duration::from_secs(30));
    let rt = rt();
    let dir = TempDir::new("sndbuf-t");
    let payload = vec![7u8; 1_500_000];
    let frame = payload.len() + proto::FRAME_OVERHEAD;
    for (setting, send_buffer) in [(None, 1 << 20), (Some(0), 0)] {
        let name = unique("SNDBUFT");
        let server = deaf_server(&dir, &name);
        let mut b = microcs::tokio::Client::builder(&name)
            .runtime_dir(dir.path())
            .timeout(Duration::from_millis(500));
        if let Some(bytes) = setting {
            b = b.send_buffer(bytes);
        }
        let client = rt.block_on(b.connect()).unwrap();
        let server_end = server.join().unwrap();
        let e = rt.block_on(client.request(&payload)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::TimedOut, "{e}");
        assert_send_buffer_held(unread_bytes(&server_end), frame, send_buffer);
    }
}

/// A caller dropped while its large request is half written: the rest still goes out whole,
/// then its `Cancel`, so the connection stays usable; a connection that dies mid-frame fails the
/// call at once.
#[test]
fn a_request_dropped_or_cut_off_mid_frame_leaves_the_stream_whole() {
    let _w = watchdog(Duration::from_secs(30));
    let rt = rt();
    let dir = TempDir::new("midframe");
    let big: Vec<u8> = (0..1_500_000u32).map(|i| (i % 251) as u8).collect();
    let connect = |name: &str| {
        let b = microcs::tokio::Client::builder(name).runtime_dir(dir.path()).send_buffer(0);
        rt.block_on(b.connect()).unwrap()
    };

    let name = unique("MIDFRAME");
    let server = deaf_server(&dir, &name);
    let client = connect(&name);
    let mut raw = Raw::from_stream(server.join().unwrap());
    // Larger than the kernel's default send buffer: part goes out, then the caller waits for
    // room that never comes, and is dropped.
    let r =
        rt.block_on(async { ::tokio::time::timeout(Duration::from_millis(200), client.request(&big)).await });
    assert!(r.is_err(), "the request cannot have been answered");
    assert!(unread_bytes(&raw.s) < big.len(), "the request was cut off in the middle");
    let (h, _, p) = raw.read().expect("the request");
    assert_eq!(h.kind(), Some(Kind::Request));
    assert!(p == big, "the whole request, intact");
    let (c, _, _) = raw.read().expect("its cancel");
    assert_eq!((c.kind(), c.id), (Some(Kind::Cancel), h.id));
    let next = rt.spawn({
        let client = client.clone();
        async move { client.request(b"after").await }
    });
    let (h2, _, p2) = raw.read().expect("the next request");
    assert_eq!(p2, b"after");
    raw.send(&Header::new(Kind::Reply, h2.id), b"", b"fine");
    assert_eq!(rt.block_on(next).unwrap().unwrap(), b"fine");

    // The server goes away mid-frame: the caller hears of it at once, not at its deadline.
    let name = unique("MIDCUT");
    let server = deaf_server(&dir, &name);
    let client = connect(&name);
    let server_end = server.join().unwrap();
    let cut = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        drop(server_end);
    });
    let t0 = std::time::Instant::now();
    let e = rt.block_on(client.request(&big)).unwrap_err();
    cut.join().unwrap();
    assert!(t0.elapsed() < Duration::from_secs(5), "failed after {:?}", t0.elapsed());
    assert_ne!(e.kind(), ErrorKind::TimedOut, "{e}");
    assert!(!e.may_have_run(), "a request cut off mid-frame cannot have run: {e}");
}

/// A large request's future polled once and then held (say, by a `select!` busy elsewhere) does
/// not hold up the other requests of the connection: what the socket did not take at once is
/// the writer task's to finish, not the idle caller's.
#[test]
fn a_large_request_future_left_unpolled_does_not_stall_the_connection() {
    use std::future::Future as _;
    let _w = watchdog(Duration::from_secs(40));
    let rt = rt();
    let dir = TempDir::new("unpolled");
    let big = vec![5u8; 4_000_000];
    let name = unique("UNPOLLED");
    let server = deaf_server(&dir, &name);
    let b = microcs::tokio::Client::builder(&name).runtime_dir(dir.path()).send_buffer(0);
    let client = rt.block_on(b.connect()).unwrap();
    let stream = server.join().unwrap();
    let mut big_call = Box::pin(client.request(&big));
    // One poll while the server reads nothing: part of the frame goes out, the rest waits.
    rt.block_on(std::future::poll_fn(|cx| {
        assert!(big_call.as_mut().poll(cx).is_pending());
        std::task::Poll::Ready(())
    }));
    let reader = std::thread::spawn(move || {
        let mut raw = Raw::from_stream(stream);
        let mut seen = Vec::new();
        while let Some((h, _, p)) = raw.read() {
            if h.kind() == Some(Kind::Request) {
                seen.push(p.len());
                raw.send(&Header::new(Kind::Reply, h.id), b"", b"ok");
                if p == b"small" {
                    return seen;
                }
            }
        }
        seen
    });
    let c = client.clone();
    let small = rt
        .block_on(async move { ::tokio::time::timeout(Duration::from_secs(10), c.request(b"small")).await });
    assert_eq!(small.expect("the small request was held up").unwrap(), b"ok");
    assert_eq!(reader.join().unwrap(), vec![big.len(), 5], "the big request whole, then the small one");
    drop(big_call);
}

/// A lone request's caller reads the connection itself while it waits (`conn::Reader`). When
/// its future is dropped mid-wait, or left unpolled while another request is sent, the reader
/// task must take the connection back: frames that arrive later (a reply to the other request,
/// a `Ping`) are still read and answered.
#[test]
fn the_read_loop_goes_back_to_the_reader_task_when_a_lone_caller_stops() {
    let _w = watchdog(Duration::from_secs(40));
    let rt = rt();
    let dir = TempDir::new("lonecaller");
    let name = unique("LONE");
    let server = deaf_server(&dir, &name);
    let b = microcs::tokio::Client::builder(&name).runtime_dir(dir.path()).timeout(Duration::from_secs(20));
    let client = rt.block_on(b.connect()).unwrap();
    let mut raw = Raw::from_stream(server.join().unwrap());
    let poll_once = |f: &mut std::pin::Pin<
        Box<dyn std::future::Future<Output = microcs::Result<Vec<u8>>> + Send + '_>,
    >| {
        rt.block_on(std::future::poll_fn(|cx| {
            assert!(f.as_mut().poll(cx).is_pending());
            std::task::Poll::Ready(())
        }))
    };
    // 1. A lone call polled once (it now drives the read loop), then dropped: its Cancel goes
    //    out, and a Ping the server sends afterwards is answered by the reader task.
    let mut lone: std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send>> =
        Box::pin(client.request(b"one"));
    poll_once(&mut lone);
    let (h, _, p) = raw.read().unwrap();
    assert_eq!((h.kind(), &p[..]), (Some(Kind::Request), &b"one"[..]));
    drop(lone);
    let (c, _, _) = raw.read().unwrap();
    assert_eq!((c.kind(), c.id), (Some(Kind::Cancel), h.id));
    raw.send(&Header::new(Kind::Ping, 77), b"", b"still there?");
    let pong = std::thread::scope(|s| {
        let t = s.spawn(|| raw.read());
        // The client's runtime must run for its tasks to answer: drive it until the Pong came.
        rt.block_on(async {
            while !t.is_finished() {
                ::tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        t.join().unwrap()
    });
    let (h2, _, p2) = pong.expect("the Ping was never answered: nobody reads the connection");
    assert_eq!((h2.kind(), h2.id, &p2[..]), (Some(Kind::Pong), 77, &b"still there?"[..]));
    // 2. A lone call polled once and then left alone (alive, unpolled) while a second request
    //    is sent: the second one's reply is read and handed out without the first being polled.
    let mut first: std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send>> =
        Box::pin(client.request(b"first"));
    poll_once(&mut first);
    let (h1, _, _) = raw.read().unwrap();
    let answer = std::thread::scope(|s| {
        s.spawn(|| {
            let (h2, _, p2) = raw.read().unwrap();
            assert_eq!(&p2[..], b"second");
            raw.send(&Header::new(Kind::Reply, h2.id), b"", b"second back");
        });
        rt.block_on(async {
            ::tokio::time::timeout(Duration::from_secs(10), client.request(b"second")).await
        })
    });
    assert_eq!(
        answer.expect("the second reply was held up by the unpolled first call").unwrap(),
        b"second back"
    );
    // The first one still gets its own answer when it is polled again.
    raw.send(&Header::new(Kind::Reply, h1.id), b"", b"first back");
    assert_eq!(rt.block_on(first).unwrap(), b"first back");
}

/// The same deadline rule on the tokio server (docs/PROTOCOL.md § 8).
#[test]
fn a_deadline_passed_while_the_handler_ran_is_answered_408_by_the_tokio_server() {
    let _w = watchdog(Duration::from_secs(30));
    let dir = TempDir::new("tlate");
    let name = unique("TLATE");
    let rt = rt();
    let _h = rt.block_on(async {
        tokio_dir_server(&dir, &name)
            .bind()
            .await
            .unwrap()
            .spawn(|r: Request| async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                Ok::<_, RemoteError>(r.into_payload())
            })
            .unwrap()
    });
    let mut r = Raw::hello(&dir, &name);
    r.send(&Header::request(7, 50), b"", b"too slow");
    let (flags, msg) = r.expect_error(7, status::TIMED_OUT);
    assert_eq!(flags, proto::FLAG_SYSTEM, "the handler started: may have run ({msg})");
    assert!(msg.contains("while the handler ran"), "{msg}");
    r.request(8, "$ping", b"");
    assert!(!r.expect_reply(8).is_empty());
}

/// A lone call polled once (it drives the read loop) and then left alive but unpolled (a
/// `select!` busy elsewhere) until its deadline passes: the deadline task answers it
/// `TimedOut` into the connection's lone slot, which stays taken while the future lives. The
/// next request, sent while nothing else is pending, must still get its reply: it finds the
/// slot taken, so it waits through a oneshot for the reader task — which must be the one
/// reading the connection then.
#[test]
fn a_request_after_an_unpolled_lone_call_timed_out_gets_its_reply() {
    let _w = watchdog(Duration::from_secs(40));
    let rt = rt();
    let dir = TempDir::new("lonestale");
    let name = unique("LONESTALE");
    let server = deaf_server(&dir, &name);
    let b =
        microcs::tokio::Client::builder(&name).runtime_dir(dir.path()).timeout(Duration::from_millis(300));
    let client = rt.block_on(b.connect()).unwrap();
    let mut raw = Raw::from_stream(server.join().unwrap());
    let mut first: std::pin::Pin<Box<dyn std::future::Future<Output = microcs::Result<Vec<u8>>> + Send>> =
        Box::pin(client.request(b"first"));
    rt.block_on(std::future::poll_fn(|cx| {
        assert!(first.as_mut().poll(cx).is_pending());
        std::task::Poll::Ready(())
    }));
    let (h1, _, p1) = raw.read().unwrap();
    assert_eq!((h1.kind(), &p1[..]), (Some(Kind::Request), &b"first"[..]));
    // Past the first call's deadline: the deadline task answers it and sends a Cancel.
    rt.block_on(async { ::tokio::time::sleep(Duration::from_millis(600)).await });
    let (c, _, _) = raw.read().unwrap();
    assert_eq!((c.kind(), c.id), (Some(Kind::Cancel), h1.id));
    let mut second = client.clone();
    second.set_timeout(Duration::from_secs(20));
    let answer = std::thread::scope(|s| {
        s.spawn(|| {
            let (h2, _, p2) = raw.read().unwrap();
            assert_eq!(&p2[..], b"second");
            raw.send(&Header::new(Kind::Reply, h2.id), b"", b"second back");
        });
        rt.block_on(async { ::tokio::time::timeout(Duration::from_secs(5), second.request(b"second")).await })
    });
    assert_eq!(
        answer
            .expect("the second reply was never read: the unpolled first call holds the read loop")
            .unwrap(),
        b"second back"
    );
    let e = rt.block_on(first).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::TimedOut, "{e}");
}

/// The tokio server's run of a request, whichever way it ends — answered on the first poll in
/// `admit`, panicking when the handler is called, on its future's first poll or on a later one,
/// stopped at the deadline while pending, or a unary handler asked as a stream — gives back its
/// in-flight permit (with a cap of 1, a kept one would stall the connection) and counts as
/// ended for the idle timeout (a run counted as started but never ended keeps the server up).
#[test]
fn every_way_a_tokio_run_ends_frees_its_permit_and_counts_for_the_idle_timeout() {
    use std::future::poll_fn;
    use std::pin::Pin;
    let _w = watchdog(Duration::from_secs(60));
    let dir = TempDir::new("trunend");
    let name = unique("TRUNEND");
    rt().block_on(async {
        let h = tokio_dir_server(&dir, &name)
            .max_in_flight(1)
            .idle_timeout(Some(Duration::from_millis(1500)))
            .method("call_panic", |_r: Request| -> std::future::Ready<Result<Vec<u8>, RemoteError>> {
                panic!("when called")
            })
            .method("first_poll_panic", |_r: Request| async {
                if std::process::id() != 0 {
                    panic!("on its first poll");
                }
                Ok::<_, RemoteError>("unreachable")
            })
            .method("later_panic", |_r: Request| async {
                ::tokio::time::sleep(Duration::from_millis(5)).await;
                if std::process::id() != 0 {
                    panic!("on a later poll");
                }
                Ok::<_, RemoteError>("unreachable")
            })
            .method("slow", |_r: Request| async {
                ::tokio::time::sleep(Duration::from_secs(30)).await;
                Ok::<_, RemoteError>("too late")
            })
            .method("later", |r: Request| async move {
                ::tokio::time::sleep(Duration::from_millis(5)).await;
                Ok::<_, RemoteError>(r.into_payload())
            })
            .method("now", |r: Request| async move { Ok::<_, RemoteError>(r.into_payload()) })
            .bind()
            .await
            .unwrap()
            .spawn(|r: Request| async move { Ok::<_, RemoteError>(r.into_payload()) })
            .unwrap();
        let mut c = tokio_dir_client(&dir, &name).connect().await.unwrap();
        c.set_timeout(Duration::from_secs(5));
        for round in 0..3 {
            for (m, text) in [
                ("call_panic", "when called"),
                ("first_poll_panic", "its first poll"),
                ("later_panic", "a later poll"),
            ] {
                let e = c.call(m, b"").await.unwrap_err();
                assert_eq!(e.remote().map(|r| r.code()), Some(500), "round {round} {m}: {e}");
                assert!(e.to_string().contains(text), "{e}");
            }
            let mut quick = c.clone();
            quick.set_timeout(Duration::from_millis(200));
            let e = quick.call("slow", b"").await.unwrap_err();
            assert_eq!(e.kind(), ErrorKind::TimedOut, "{e}");
            for m in ["later", "now"] {
                let mut s = c.stream(m, b"one item").await.unwrap();
                let mut items = Vec::new();
                while let Some(item) =
                    poll_fn(|cx| futures_core::Stream::poll_next(Pin::new(&mut s), cx)).await
                {
                    items.push(item.unwrap());
                }
                assert_eq!(items, vec![b"one item".to_vec()], "round {round} {m:?} as a stream");
                assert_eq!(c.call(m, b"plain").await.unwrap(), b"plain");
            }
        }
        let t0 = std::time::Instant::now();
        let done = ::tokio::time::timeout(Duration::from_secs(10), h.wait()).await;
        assert!(matches!(done, Ok(Ok(()))), "the idle timeout never fired: {done:?}");
        assert!(t0.elapsed() >= Duration::from_millis(1000), "{:?}", t0.elapsed());
        let stats = h.stats();
        let slow = stats.endpoints.iter().find(|e| e.name == "slow").unwrap();
        assert_eq!((slow.num_requests, slow.num_errors), (3, 3));
        h.shutdown().await;
    });
}

/// Runs each case (a function of the server's flavour and whether the client asks for shared
/// memory) against a tokio server over the socket and over shared memory, and a blocking server.
macro_rules! tokio_client_cases {
    ($($case:ident),* $(,)?) => {
        $(
            mod $case {
                use super::Flavour::{Blocking, Tokio};
                #[test]
                fn tokio_server() {
                    super::$case(Tokio, false);
                }
                #[test]
                fn tokio_server_shm() {
                    super::$case(Tokio, true);
                }
                #[test]
                fn blocking_server() {
                    super::$case(Blocking, false);
                }
            }
        )*
    };
}

tokio_client_cases!(
    lone_and_shared_callers_flip_without_crossed_or_lost_answers,
    a_call_after_a_kept_select_call_timed_out_is_answered,
);

/// A tokio client of `name` in `dir`, over shared memory or the socket.
async fn tokio_client(dir: &TempDir, name: &str, timeout: Duration, shm: bool) -> microcs::tokio::Client {
    microcs::tokio::Client::builder(name)
        .runtime_dir(dir.path())
        .timeout(timeout)
        .shared_memory(shm)
        .connect()
        .await
        .unwrap()
}

/// Tasks sharing one tokio client alternate between being the connection's lone caller (who
/// reads its own reply into the lone slot) and one of several (answered through a oneshot),
/// and some of them give up early (an outer `timeout` drops the call while its reply is on the
/// way): every call that is answered gets its own payload back, none waits past its reply.
fn lone_and_shared_callers_flip_without_crossed_or_lost_answers(server: Flavour, shm: bool) {
    let _w = watchdog(Duration::from_secs(120));
    let tag = if shm { "flipshm" } else { "flip" };
    let dir = TempDir::new(tag);
    let name = unique(&tag.to_uppercase());
    let _peer = serve(&dir, &name, server, if shm { &[("PEER_SHM", "1")] } else { &[] });
    let rt = rt();
    rt.block_on(async {
        let client = tokio_client(&dir, &name, Duration::from_secs(30), shm).await;
        let tasks: Vec<_> = (0..3u64)
            .map(|t| {
                let c = client.clone();
                ::tokio::spawn(async move {
                    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (t + 1);
                    let mut next = move || {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x
                    };
                    let (mut answered, mut dropped) = (0u32, 0u32);
                    for i in 0..200u64 {
                        let r = next();
                        let delay = r % 3;
                        let payload = format!("{delay}:task {t} call {i}");
                        if r % 5 == 0 {
                            // Given up on while its reply may be in flight.
                            let wait = Duration::from_micros(200 + (r >> 8) % 2500);
                            match ::tokio::time::timeout(wait, c.call("echo_after", payload.as_bytes())).await
                            {
                                Ok(reply) => assert_eq!(text(reply.unwrap()), payload),
                                Err(_) => dropped += 1,
                            }
                        } else {
                            let reply = ::tokio::time::timeout(
                                Duration::from_secs(10),
                                c.call("echo_after", payload.as_bytes()),
                            )
                            .await
                            .unwrap_or_else(|_| panic!("task {t} call {i}: no answer within 10 s"));
                            assert_eq!(text(reply.unwrap()), payload, "task {t} call {i}");
                            answered += 1;
                        }
                        if r % 7 == 0 {
                            ::tokio::task::yield_now().await;
                        }
                    }
                    (answered, dropped)
                })
            })
            .collect();
        for t in tasks {
            let (answered, _dropped) = t.await.unwrap();
            assert!(answered > 100);
        }
        assert_eq!(client.request(b"after").await.unwrap(), b"after");
    });
}

/// The connection ends (the server hangs up after reading the request) while its lone caller
/// waits reading the connection itself: on a `block_on` current-thread runtime and on a
/// multi-thread one, the caller is woken with the loss, not left waiting for its deadline.
#[test]
fn a_lone_caller_learns_at_once_that_the_connection_ended() {
    let _w = watchdog(Duration::from_secs(40));
    let current = Arc::new(::tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap());
    for (i, rt) in [current, rt()].into_iter().enumerate() {
        let dir = TempDir::new("loneend");
        let name = unique("LONEEND");
        let server = deaf_server(&dir, &name);
        let b =
            microcs::tokio::Client::builder(&name).runtime_dir(dir.path()).timeout(Duration::from_secs(20));
        let client = rt.block_on(b.connect()).unwrap();
        let mut raw = Raw::from_stream(server.join().unwrap());
        let hang_up = std::thread::spawn(move || {
            let (h, _, _) = raw.read().unwrap();
            assert_eq!(h.kind(), Some(Kind::Request));
            std::thread::sleep(Duration::from_millis(100));
            drop(raw);
        });
        let t0 = std::time::Instant::now();
        let r =
            rt.block_on(async { ::tokio::time::timeout(Duration::from_secs(5), client.request(b"x")).await });
        let e = r
            .unwrap_or_else(|_| panic!("runtime {i}: the caller was not told the connection ended"))
            .unwrap_err();
        assert!(e.may_have_run(), "runtime {i}: {e}");
        assert!(t0.elapsed() < Duration::from_secs(3), "runtime {i}: {:?}", t0.elapsed());
        hang_up.join().unwrap();
    }
}

/// The same as `a_request_after_an_unpolled_lone_call_timed_out_gets_its_reply`, written as an
/// application would meet it: a slow call raced in a `select!` against a tick, kept (not
/// dropped) for later, times out at the client's deadline while the task does other work; the
/// task's next call must be answered — over the socket and over shared memory, from either
/// server.
fn a_call_after_a_kept_select_call_timed_out_is_answered(server: Flavour, shm: bool) {
    let _w = watchdog(Duration::from_secs(60));
    let tag = if shm { "keptshm" } else { "kept" };
    let dir = TempDir::new(tag);
    let name = unique(&tag.to_uppercase());
    let _peer = serve(&dir, &name, server, if shm { &[("PEER_SHM", "1")] } else { &[] });
    let rt = rt();
    rt.block_on(async {
        let client = tokio_client(&dir, &name, Duration::from_millis(300), shm).await;
        assert_eq!(client.transport(), Some(if shm { "shm" } else { "unix" }));
        let slow = client.call("echo_after", b"2000:slow");
        ::tokio::pin!(slow);
        ::tokio::select! {
            r = &mut slow => panic!("answered early: {r:?}"),
            () = ::tokio::time::sleep(Duration::from_millis(50)) => {}
        }
        // Other work, past the slow call's deadline.
        ::tokio::time::sleep(Duration::from_millis(500)).await;
        let mut patient = client.clone();
        patient.set_timeout(Duration::from_secs(20));
        let next =
            ::tokio::time::timeout(Duration::from_secs(5), patient.call("echo_after", b"0:next")).await;
        assert_eq!(next.expect("the next call was never answered").unwrap(), b"0:next");
        let e = slow.await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::TimedOut, "{e}");
    });
}
