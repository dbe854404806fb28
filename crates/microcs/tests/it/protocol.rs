//! The server against hand-written frames: cancellation, unknown kinds, bad input, limits,
//! timeouts — and the client against sockets that do not speak microcs.

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::sync::mpsc;
use std::time::Duration;

use microcs::proto::{self, FLAG_NOT_RUN, FLAG_SYSTEM, Header, HelloAck, Kind, status};
use microcs::{ErrorKind, RemoteError, Request, ServerHandle};

use crate::common::*;

/// An in-process server whose `wait` method reports on `tx` how it ended.
fn waiting_server(
    dir: &TempDir,
    name: &str,
    b: impl FnOnce(microcs::ServerBuilder) -> microcs::ServerBuilder,
) -> (ServerHandle, mpsc::Receiver<String>) {
    let (tx, rx) = mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let h = b(dir.server(name))
        .method("wait", move |req: Request| {
            let t0 = std::time::Instant::now();
            while !req.is_cancelled() && t0.elapsed() < Duration::from_secs(20) {
                std::thread::sleep(Duration::from_millis(1));
            }
            let how = if req.is_cancelled() { "cancelled" } else { "gave up" };
            tx.lock().unwrap().send(how.to_owned()).unwrap();
            Ok::<_, RemoteError>(how)
        })
        .bind()
        .unwrap()
        .spawn(|r: Request| Ok::<_, RemoteError>(r.into_payload()))
        .unwrap();
    (h, rx)
}

#[test]
fn cancel_frame_reaches_a_running_blocking_handler() {
    let _w = watchdog(Duration::from_secs(30));
    let dir = TempDir::new("cancel");
    let name = unique("CANCEL");
    let (_h, rx) = waiting_server(&dir, &name, |b| b);
    let mut r = Raw::hello(&dir, &name);
    r.request(5, "wait", b""); // no deadline: only the Cancel can stop it
    std::thread::sleep(Duration::from_millis(50));
    r.send(&Header::new(Kind::Cancel, 5), b"", b"");
    assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), "cancelled");
    // No reply for the cancelled request; the connection carries on.
    r.request(6, "", b"next");
    assert_eq!(r.expect_reply(6), b"next");
}

#[test]
fn a_client_that_hangs_up_cancels_its_running_handler() {
    let _w = watchdog(Duration::from_secs(30));
    let dir = TempDir::new("hangup");
    let name = unique("HANGUP");
    let (h, rx) = waiting_server(&dir, &name, |b| b);
    let mut r = Raw::hello(&dir, &name);
    r.request(1, "wait", b"");
    std::thread::sleep(Duration::from_millis(50));
    drop(r);
    assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), "cancelled");
    assert_eq!(eventually(Duration::from_secs(10), || (h.connections() == 0).then_some(())), Some(()));
}

#[test]
fn unknown_kinds_flags_and_bad_ids_get_per_request_errors_and_the_connection_stays() {
    let _w = watchdog(Duration::from_secs(30));
    let dir = TempDir::new("unknown");
    let name = unique("UNKNOWN");
    let (_h, _rx) = waiting_server(&dir, &name, |b| b);
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
    assert!(r.expect_error(12, status::NO_METHOD).1.contains("no_such"));
    r.request(13, "$nope", b"");
    r.expect_error(13, status::NO_METHOD);
    r.send(&Header::new(Kind::Ping, 77), b"", b"are you there");
    let (h, _, p) = r.read().unwrap();
    assert_eq!((h.kind(), h.id, &p[..]), (Some(Kind::Pong), 77, &b"are you there"[..]));
    r.send(&Header::new(Kind::Cancel, 999), b"", b""); // unknown id: ignored
    r.request(14, "", b"still fine");
    assert_eq!(r.expect_reply(14), b"still fine");
}

#[test]
fn duplicate_id_in_flight_is_refused() {
    let _w = watchdog(Duration::from_secs(30));
    let dir = TempDir::new("dup");
    let name = unique("DUP");
    let (_h, rx) = waiting_server(&dir, &name, |b| b);
    let mut r = Raw::hello(&dir, &name);
    r.request(3, "wait", b"");
    r.request(3, "", b"dup");
    let (_, msg) = r.expect_error(3, status::BAD_REQUEST);
    assert!(msg.contains("already in flight"), "{msg}");
    r.send(&Header::new(Kind::Cancel, 3), b"", b"");
    assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), "cancelled");
}

#[test]
fn a_thousand_requests_in_one_write_and_one_frame_byte_by_byte() {
    let _w = watchdog(Duration::from_secs(60));
    let dir = TempDir::new("coalesce");
    let name = unique("COALESCE");
    let (_h, _rx) = waiting_server(&dir, &name, |b| b);
    let mut r = Raw::hello(&dir, &name);
    let mut all = Vec::new();
    for id in 1..=1000u64 {
        proto::encode(&mut all, &Header::request(id, 0), b"", &id.to_le_bytes());
    }
    r.s.write_all(&all).unwrap();
    let mut seen = std::collections::HashSet::new();
    for _ in 0..1000 {
        let (h, _, p) = r.read().unwrap();
        assert_eq!(h.kind(), Some(Kind::Reply));
        assert_eq!(p, h.id.to_le_bytes(), "reply {} carries another request's payload", h.id);
        assert!(seen.insert(h.id));
    }
    let mut one = Vec::new();
    proto::encode(&mut one, &Header::request(5000, 0), b"", b"slowly");
    for b in one {
        r.s.write_all(&[b]).unwrap();
        std::thread::sleep(Duration::from_micros(300));
    }
    assert_eq!(r.expect_reply(5000), b"slowly");
}

#[test]
fn malformed_streams_get_an_error_frame_and_a_close_and_others_are_unaffected() {
    let _w = watchdog(Duration::from_secs(30));
    let dir = TempDir::new("malformed");
    let name = unique("MALFORMED");
    let (_h, _rx) = waiting_server(&dir, &name, |b| b);
    let mut good = dir.client(&name).connect().unwrap();
    let tls_client_hello = [0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03];
    let http = b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n".to_vec();
    for (what, bytes, code) in [
        ("giant length", vec![0xff, 0xff, 0xff, 0xff], status::TOO_LARGE),
        ("http", http, status::TOO_LARGE),
        ("tls", tls_client_hello.to_vec(), status::TOO_LARGE),
        ("short length", vec![0, 0, 0, 3, 1, 2, 3], status::BAD_REQUEST),
    ] {
        // Before and after the handshake alike.
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
            r.expect_eof();
        }
    }
    // A wrong version, after the handshake.
    let mut r = Raw::hello(&dir, &name);
    r.send(&Header { version: 9, ..Header::request(1, 0) }, b"", b"");
    let (_, msg) = r.expect_error(0, status::VERSION_UNSUPPORTED);
    assert!(msg.contains("version 9"), "{msg}");
    r.expect_eof();
    // A request before the hello.
    let mut r = Raw::connect(&dir, &name);
    r.request(1, "", b"too early");
    assert!(r.expect_error(0, status::BAD_REQUEST).1.contains("Hello"));
    r.expect_eof();
    // Truncated frame, then EOF.
    let mut r = Raw::hello(&dir, &name);
    let mut b = Vec::new();
    proto::encode(&mut b, &Header::request(1, 0), b"", &[1u8; 100]);
    r.s.write_all(&b[..50]).unwrap();
    r.s.shutdown(std::net::Shutdown::Write).unwrap();
    r.expect_eof();
    // 1 MiB of random bytes.
    let mut r = Raw::hello(&dir, &name);
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let junk: Vec<u8> = (0..1 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let _ = r.s.write_all(&junk);
    let _ = r.read(); // an error frame or a reset, then the end
    // Meanwhile the well-behaved client was never disturbed.
    assert_eq!(good.request(b"unaffected").unwrap(), b"unaffected");
}

#[test]
fn silent_and_trickling_connections_time_out() {
    let _w = watchdog(Duration::from_secs(30));
    let dir = TempDir::new("slow");
    let name = unique("SLOW");
    let (_h, _rx) = waiting_server(&dir, &name, |b| {
        b.handshake_timeout(Duration::from_millis(200)).frame_timeout(Duration::from_millis(200))
    });
    // Never says hello: closed.
    let mut r = Raw::connect(&dir, &name);
    r.expect_eof();
    // Starts a frame and never finishes it: told, then closed.
    let mut r = Raw::hello(&dir, &name);
    let mut b = Vec::new();
    proto::encode(&mut b, &Header::request(1, 0), b"", &[0u8; 64]);
    r.s.write_all(&b[..30]).unwrap();
    let (_, msg) = r.expect_error(0, status::TIMED_OUT);
    assert!(msg.contains("not completed"), "{msg}");
    r.expect_eof();
    // An idle but complete connection is not a partial frame: it stays.
    let mut r = Raw::hello(&dir, &name);
    std::thread::sleep(Duration::from_millis(500));
    r.request(2, "", b"idle is fine");
    assert_eq!(r.expect_reply(2), b"idle is fine");
}

#[test]
fn client_pointed_at_a_socket_that_is_not_microcs() {
    let _w = watchdog(Duration::from_secs(30));
    let dir = TempDir::new("foreign");
    // Speaks another protocol.
    let l = UnixListener::bind(dir.path().join("SSH.sock")).unwrap();
    let t = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.write_all(b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n").unwrap();
        let _ = s.read(&mut [0u8; 64]);
    });
    let e = dir.client("SSH").timeout(Duration::from_secs(5)).connect().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Protocol, "{e}");
    assert!(e.to_string().contains("microcs service"), "{e}");
    t.join().unwrap();
    // Accepts and says nothing.
    let l = UnixListener::bind(dir.path().join("MUTE.sock")).unwrap();
    let t = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        std::thread::sleep(Duration::from_millis(800));
        drop(s);
    });
    let e = dir.client("MUTE").timeout(Duration::from_millis(300)).connect().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::TimedOut, "{e}");
    assert!(e.to_string().contains("microcs service"), "{e}");
    t.join().unwrap();
}

#[test]
fn a_server_that_answers_with_garbage_mid_session_is_a_protocol_error() {
    let _w = watchdog(Duration::from_secs(30));
    let dir = TempDir::new("liar");
    let l = UnixListener::bind(dir.path().join("LIAR.sock")).unwrap();
    let t = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut buf = [0u8; 256];
        let _ = s.read(&mut buf);
        let mut b = Vec::new();
        let ack = HelloAck {
            max_payload: 1024,
            max_in_flight: 1,
            pid: 1,
            name: "LIAR".into(),
            ..Default::default()
        };
        proto::encode(&mut b, &Header::new(Kind::HelloAck, 0), b"", &ack.to_bytes());
        s.write_all(&b).unwrap();
        let _ = s.read(&mut buf);
        s.write_all(&[0xff; 16]).unwrap();
        std::thread::sleep(Duration::from_millis(200));
    });
    let mut c = dir.client("LIAR").connect().unwrap();
    let e = c.request(b"hi").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Protocol, "{e}");
    assert!(e.may_have_run());
    t.join().unwrap();
}

#[test]
fn the_frame_timeout_bounds_a_whole_trickled_frame_not_each_read() {
    let _w = watchdog(Duration::from_secs(30));
    let dir = TempDir::new("trickle");
    let name = unique("TRICKLE");
    let (_h, _rx) = waiting_server(&dir, &name, |b| b.frame_timeout(Duration::from_millis(300)));
    let mut r = Raw::hello(&dir, &name);
    let mut frame = Vec::new();
    proto::encode(&mut frame, &Header::request(1, 0), b"", &[5u8; 40]);
    let mut w = r.s.try_clone().unwrap();
    // One byte every 100 ms: each read is quick, the frame as a whole is not (6.4 s).
    let trickler = std::thread::spawn(move || {
        for b in frame {
            if w.write_all(&[b]).is_err() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        true
    });
    let (_, msg) = r.expect_error(0, status::TIMED_OUT);
    assert!(msg.contains("not completed"), "{msg}");
    r.expect_eof();
    assert!(!trickler.join().unwrap(), "the server let the whole trickled frame through");
}

#[test]
fn nothing_goes_out_over_the_clients_limit() {
    let _w = watchdog(Duration::from_secs(30));
    let dir = TempDir::new("smalllim");
    let name = unique("SMALLLIM");
    let h = dir
        .server(&name)
        .method("fail", |_r: Request| {
            Err::<Vec<u8>, _>(RemoteError::new(418, "a message longer than the limit"))
        })
        .bind()
        .unwrap()
        .spawn(|r: Request| Ok::<_, RemoteError>(r.into_payload()))
        .unwrap();
    let mut c = dir.client(&name).max_frame(16).connect().unwrap();
    // Built-in JSON is far over 16 bytes: a clean "too large", not a broken connection.
    let e = c.info().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::FrameTooLarge, "{e}");
    // An error message is cut to the limit.
    let e = c.call("fail", b"").unwrap_err();
    assert_eq!(e.remote().unwrap().code(), 418);
    assert_eq!(e.remote().unwrap().message(), "a message longer");
    assert_eq!(c.request(b"fits").unwrap(), b"fits");
    h.shutdown();
}

/// The one deadline rule of every server (docs/PROTOCOL.md § 8): a handler that runs past the
/// request's deadline gets its request answered Error 408 FLAG_SYSTEM without FLAG_NOT_RUN, and
/// its own late answer is never sent. A raw client that sends no Cancel sees it.
#[test]
fn a_deadline_passed_while_the_handler_ran_is_answered_408_by_the_blocking_server() {
    let _w = watchdog(Duration::from_secs(30));
    let dir = TempDir::new("late");
    let name = unique("LATE");
    let h = dir
        .server(&name)
        .bind()
        .unwrap()
        .spawn(|r: Request| {
            std::thread::sleep(Duration::from_millis(300));
            Ok::<_, RemoteError>(r.into_payload())
        })
        .unwrap();
    let mut r = Raw::hello(&dir, &name);
    r.send(&Header::request(7, 50), b"", b"too slow");
    let (flags, msg) = r.expect_error(7, status::TIMED_OUT);
    assert_eq!(flags, proto::FLAG_SYSTEM, "the handler started: may have run ({msg})");
    assert!(msg.contains("while the handler ran"), "{msg}");
    // Nothing else follows for id 7, and the connection still works.
    r.request(8, "$ping", b"");
    assert!(!r.expect_reply(8).is_empty());
    h.shutdown();
}

#[test]
fn requests_still_in_the_socket_at_shutdown_are_answered_503_not_run_by_the_blocking_server() {
    // PROTOCOL.md § 11: frames the client sent before the server shut the read side are still
    // read, and each request among them is refused as not run. With one request in flight
    // allowed, the second one waits unread in the kernel while the first runs.
    let _w = watchdog(Duration::from_secs(30));
    let dir = TempDir::new("drain");
    let name = unique("DRAIN");
    let (started_tx, started_rx) = mpsc::channel();
    let started_tx = std::sync::Mutex::new(started_tx);
    let h = dir
        .server(&name)
        .max_in_flight(1)
        .bind()
        .unwrap()
        .spawn(move |r: Request| {
            started_tx.lock().unwrap().send(()).unwrap();
            std::thread::sleep(Duration::from_millis(300));
            Ok::<_, RemoteError>(r.into_payload())
        })
        .unwrap();
    let mut r = Raw::hello(&dir, &name);
    r.request(1, "", b"first");
    started_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    r.request(2, "", b"second");
    std::thread::sleep(Duration::from_millis(50));
    let stopper = std::thread::spawn(move || h.shutdown());
    assert_eq!(r.expect_reply(1), b"first");
    let (flags, msg) = r.expect_error(2, status::BUSY);
    assert_eq!(flags, FLAG_SYSTEM | FLAG_NOT_RUN, "{msg}");
    assert!(msg.contains("shutting down"), "{msg}");
    r.expect_eof();
    stopper.join().unwrap();
}
