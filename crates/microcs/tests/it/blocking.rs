//! The blocking client and server across processes (issue "Core").

use std::io::Write;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::process::{Command, Stdio};
use std::time::Duration;

use microcs::{ErrorKind, RemoteError, Request};

use crate::common::*;

fn text(v: Vec<u8>) -> String {
    String::from_utf8(v).unwrap()
}

#[test]
fn request_reply_across_processes() {
    let _w = watchdog(Duration::from_secs(30));
    let dir = TempDir::new("rr");
    let name = unique("RR");
    let server = PeerProcess::serve(dir.path(), &name);
    let mut c = dir.client(&name).connect().unwrap();
    assert_eq!(c.server_pid(), Some(server.pid));
    assert_eq!(c.request(b"Give me some data back!!").unwrap(), b"Give me some data back!!");
    assert_eq!(c.send_message("hello").unwrap(), "hello");
    assert_eq!(c.request(b"").unwrap(), b"", "empty payloads are fine");
    assert_eq!(text(c.call("pid", b"").unwrap()), server.pid.to_string());
    // Methods and the default handler interleave on one connection.
    for i in 0..100u32 {
        assert_eq!(c.request(&i.to_be_bytes()).unwrap(), i.to_be_bytes());
    }
    assert!(server.stop().success());
}

#[test]
fn handler_sees_kernel_peer_credentials_and_deadline() {
    let _w = watchdog(Duration::from_secs(30));
    let dir = TempDir::new("cred");
    let name = unique("CRED");
    let _server = PeerProcess::serve(dir.path(), &name);
    let mut c = dir.client(&name).timeout(Duration::from_secs(7)).connect().unwrap();
    let peer = text(c.call("peer", b"").unwrap());
    let uid = rustix::process::geteuid().as_raw();
    let gid = rustix::process::getegid().as_raw();
    assert_eq!(peer, format!("{} {uid} {gid}", std::process::id()));
    let ms: u64 = text(c.call("deadline_ms", b"").unwrap()).parse().unwrap();
    assert!(ms > 5_000 && ms <= 7_000, "deadline seen by the server: {ms} ms");
}

#[test]
fn no_service_fails_at_once_and_names_the_directory() {
    let _w = watchdog(Duration::from_secs(10));
    let dir = TempDir::new("nosvc");
    // A long timeout: the error must come from the missing socket, not from waiting.
    let e = dir.client("NOBODY_HOME").timeout(Duration::from_secs(3600)).connect().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NoService);
    assert!(
        e.to_string().contains("NOBODY_HOME") && e.to_string().contains(&dir.path().display().to_string()),
        "{e}"
    );
    // A missing runtime directory is also simply "no service".
    let e = microcs::Client::builder("X").runtime_dir("/tmp/definitely-not-here-mcs").connect().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NoService);
}

#[test]
fn second_server_gets_name_taken_with_owner_pid_and_first_keeps_serving() {
    let _w = watchdog(Duration::from_secs(30));
    let dir = TempDir::new("taken");
    let name = unique("TAKEN");
    let first = PeerProcess::serve(dir.path(), &name);
    let second = PeerProcess::start(dir.path(), "race", &name, &[]);
    assert_eq!(second.first_line, format!("TAKEN {}", first.pid));
    // In-process too: the error kind, pid and message.
    let e = dir.server(&name).bind().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NameTaken);
    assert_eq!(e.owner_pid(), Some(first.pid));
    assert!(e.to_string().contains(&first.pid.to_string()), "{e}");
    let mut c = dir.client(&name).connect().unwrap();
    assert_eq!(text(c.call("pid", b"").unwrap()), first.pid.to_string());
}

#[test]
fn fifty_processes_race_for_one_name_and_exactly_one_wins() {
    let _w = watchdog(Duration::from_secs(60));
    let dir = TempDir::new("race");
    let name = unique("RACE");
    let children: Vec<_> = (0..50)
        .map(|_| {
            Command::new(PEER)
                .args(["race", &name])
                .env("MICROCS_RUNTIME_DIR", dir.path())
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut winners = Vec::new();
    let mut losers = Vec::new();
    let mut keep = Vec::new();
    for mut child in children {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut line)
            .unwrap();
        let line = line.trim().to_owned();
        if let Some(pid) = line.strip_prefix("WON ") {
            winners.push(pid.to_owned());
        } else if let Some(pid) = line.strip_prefix("TAKEN ") {
            losers.push(pid.to_owned());
        } else {
            panic!("unexpected racer output {line:?}");
        }
        keep.push(child);
    }
    assert_eq!(winners.len(), 1, "winners: {winners:?}");
    assert_eq!(losers.len(), 49);
    assert!(losers.iter().all(|p| *p == winners[0]), "losers must name the winner: {losers:?}");
    let mut c = dir.client(&name).connect().unwrap();
    assert_eq!(text(c.call("pid", b"").unwrap()), winners[0]);
    for mut child in keep {
        drop(child.stdin.take());
        wait_timeout(&mut child, Duration::from_secs(20)).unwrap();
    }
}

#[test]
fn crashed_server_name_is_reclaimed_and_never_listed() {
    let _w = watchdog(Duration::from_secs(30));
    let dir = TempDir::new("stale");
    let name = unique("STALE");
    let server = PeerProcess::serve(dir.path(), &name);
    let listed = microcs::list_in(dir.path()).unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].pid, server.pid);
    server.kill9();
    let sock = dir.path().join(format!("{name}.sock"));
    assert!(
        std::fs::symlink_metadata(&sock).unwrap().file_type().is_socket(),
        "socket left behind by kill -9"
    );
    let e = dir.client(&name).connect().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NoService, "{e}");
    assert!(microcs::list_in(dir.path()).unwrap().is_empty(), "a dead server is never listed");
    assert!(!sock.exists(), "list() reclaims the stale socket");
    // And a new server binds at once.
    let again = PeerProcess::serve(dir.path(), &name);
    let mut c = dir.client(&name).connect().unwrap();
    assert_eq!(text(c.call("pid", b"").unwrap()), again.pid.to_string());
}

#[test]
fn restart_after_kill9_binds_over_stale_files_without_list() {
    let _w = watchdog(Duration::from_secs(30));
    let dir = TempDir::new("stale2");
    let name = unique("STALE2");
    PeerProcess::serve(dir.path(), &name).kill9();
    assert!(dir.path().join(format!("{name}.lock")).exists());
    let again = PeerProcess::serve(dir.path(), &name);
    assert_eq!(text(dir.client(&name).connect().unwrap().call("pid", b"").unwrap()), again.pid.to_string());
}

#[test]
fn list_reports_live_services_with_their_methods() {
    let _w = watchdog(Duration::from_secs(30));
    let dir = TempDir::new("list");
    let a = unique("LA");
    let b = unique("LB");
    let pa = PeerProcess::serve(dir.path(), &a);
    let h = dir
        .server(&b)
        .method("step", |_r: Request| Ok::<_, RemoteError>("x"))
        .bind()
        .unwrap()
        .spawn(|r: Request| Ok::<_, RemoteError>(r.into_payload()));
    let h = h.unwrap();
    let all = microcs::list_in(dir.path()).unwrap();
    let names: Vec<_> = all.iter().map(|s| s.name.as_str().to_owned()).collect();
    let mut expect = vec![a.clone(), b.clone()];
    expect.sort();
    assert_eq!(names, expect);
    let sa = all.iter().find(|s| s.name.as_str() == a).unwrap();
    assert_eq!(sa.pid, pa.pid);
    assert_eq!(sa.uid, rustix::process::geteuid().as_raw());
    assert_eq!(sa.protocol_version, microcs::proto::VERSION);
    assert_eq!(sa.version, "1.2.3");
    assert!(sa.methods.contains(&"wait_cancel".to_owned()));
    let sb = all.iter().find(|s| s.name.as_str() == b).unwrap();
    assert_eq!(sb.methods, ["step"]);
    assert_eq!(sb.pid, std::process::id());
    assert!(sb.started.elapsed().unwrap() < Duration::from_secs(3600));
    h.shutdown();
    let after: Vec<_> = microcs::list_in(dir.path()).unwrap().into_iter().map(|s| s.name).collect();
    assert_eq!(after.len(), 1, "a shut-down server is gone from the list: {after:?}");
}

#[test]
fn handler_errors_and_panics_become_remote_errors_and_the_server_goes_on() {
    let _w = watchdog(Duration::from_secs(30));
    let dir = TempDir::new("errs");
    let name = unique("ERRS");
    let _server = PeerProcess::serve(dir.path(), &name);
    let mut c = dir.client(&name).connect().unwrap();
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
    // The same connection and a new one both still work.
    assert_eq!(c.request(b"still here").unwrap(), b"still here");
    assert_eq!(dir.client(&name).connect().unwrap().request(b"x").unwrap(), b"x");
    let e = c.call("no_such_method", b"").unwrap_err();
    assert_eq!((e.kind(), e.remote().unwrap().code()), (ErrorKind::Remote, 404));
    assert!(!e.may_have_run(), "an unknown method never ran");
    assert!(e.to_string().contains("no_such_method"), "{e}");
    let e = c.call("bad name", b"").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidName);
}

#[test]
fn timeout_then_the_same_connection_keeps_working_and_the_server_sees_the_cancel() {
    let _w = watchdog(Duration::from_secs(60));
    let dir = TempDir::new("tmo");
    let name = unique("TMO");
    let _server = PeerProcess::serve(dir.path(), &name);
    let mut c = dir.client(&name).timeout(Duration::from_millis(300)).connect().unwrap();
    let marker = dir.path().join("cancelled.txt");
    let e = c.call("wait_cancel", marker.to_str().unwrap().as_bytes()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::TimedOut, "{e}");
    assert!(e.may_have_run());
    // The handler is still running (it waits for the cancel); later calls on the same
    // connection are served by a follower thread meanwhile.
    c.set_timeout(Duration::from_secs(10));
    assert_eq!(c.request(b"after timeout").unwrap(), b"after timeout");
    let seen = eventually(Duration::from_secs(10), || {
        std::fs::read_to_string(&marker).ok().filter(|s| s.starts_with("cancelled"))
    });
    assert!(seen.is_some(), "the server-side handler never saw the cancellation");
    // A hung handler does not block other requests on the same connection either.
    c.set_timeout(Duration::from_millis(200));
    assert_eq!(c.call("sleep_ms", b"3000").unwrap_err().kind(), ErrorKind::TimedOut);
    c.set_timeout(Duration::from_secs(10));
    assert_eq!(c.request(b"next").unwrap(), b"next");
}

#[test]
fn server_restart_is_transparent_to_an_idle_client() {
    let _w = watchdog(Duration::from_secs(60));
    let dir = TempDir::new("restart");
    let name = unique("RESTART");
    let first = PeerProcess::serve(dir.path(), &name);
    let mut c = dir.client(&name).connect().unwrap();
    assert_eq!(text(c.call("pid", b"").unwrap()), first.pid.to_string());
    assert!(first.stop().success());
    let second = PeerProcess::serve(dir.path(), &name);
    assert_eq!(text(c.call("pid", b"").unwrap()), second.pid.to_string(), "reconnected by itself");
    second.kill9();
    let third = PeerProcess::serve(dir.path(), &name);
    assert_eq!(text(c.call("pid", b"").unwrap()), third.pid.to_string(), "and after kill -9");
    drop(third);
    let e = c.request(b"x").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NoService, "{e}");
}

#[test]
fn server_killed_mid_request_is_an_error_that_says_it_may_have_run() {
    let _w = watchdog(Duration::from_secs(30));
    let dir = TempDir::new("midkill");
    let name = unique("MIDKILL");
    let server = PeerProcess::serve(dir.path(), &name);
    let pid = server.pid;
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        server.kill9();
    });
    let mut c = dir.client(&name).connect().unwrap();
    let e = c.call("sleep_ms", b"20000").unwrap_err();
    killer.join().unwrap();
    assert_eq!(e.kind(), ErrorKind::Closed, "{e}");
    assert!(e.may_have_run());
    assert!(e.to_string().contains("may have run"), "{e}");
    let _ = pid;
}

#[test]
fn payload_limits_are_checked_before_sending_and_replies_against_the_clients_limit() {
    let _w = watchdog(Duration::from_secs(30));
    let dir = TempDir::new("limits");
    let name = unique("LIMITS");
    let h = dir
        .server(&name)
        .max_frame(1024)
        .method("big", |r: Request| Ok::<_, RemoteError>(vec![0u8; r.text()?.parse::<usize>().unwrap()]))
        .bind()
        .unwrap()
        .spawn(|r: Request| Ok::<_, RemoteError>(r.payload().len().to_string()))
        .unwrap();
    let mut c = dir.client(&name).max_frame(100).connect().unwrap();
    assert_eq!(c.max_request_payload(), Some(1024));
    assert_eq!(c.request(&[7u8; 1024]).unwrap(), b"1024");
    let e = c.request(&[7u8; 1025]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::FrameTooLarge);
    assert!(e.to_string().contains("nothing was sent"), "{e}");
    assert_eq!(h.stats().endpoints[0].num_requests, 1, "the oversized request never reached the server");
    assert_eq!(c.call("big", b"100").unwrap().len(), 100);
    let e = c.call("big", b"101").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::FrameTooLarge, "{e}");
    assert!(e.may_have_run(), "the handler ran; only its reply was refused");
    assert_eq!(c.request(b"ok").unwrap(), b"2");
    h.shutdown();
}

#[test]
fn big_payloads_round_trip() {
    let _w = watchdog(Duration::from_secs(60));
    let dir = TempDir::new("big");
    let name = unique("BIG");
    let _server = PeerProcess::serve(dir.path(), &name);
    let mut c = dir.client(&name).connect().unwrap();
    let payload: Vec<u8> = (0..8 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(c.request(&payload).unwrap(), payload);
    let limit = microcs::proto::DEFAULT_MAX_PAYLOAD as usize;
    assert_eq!(c.call("big", limit.to_string().as_bytes()).unwrap().len(), limit);
}

#[test]
fn unsafe_runtime_directories_are_refused_with_path_owner_and_mode() {
    let _w = watchdog(Duration::from_secs(20));
    let dir = TempDir::new("perm");
    // What a client process using the default (environment) directory says.
    let client_in_env = || {
        let out =
            Command::new(PEER).args(["call", "P"]).env("MICROCS_RUNTIME_DIR", dir.path()).output().unwrap();
        assert_eq!(out.status.code(), Some(1));
        String::from_utf8(out.stderr).unwrap()
    };
    let dir_s = dir.path().display().to_string();
    for mode in [0o755, 0o777, 0o750] {
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(mode)).unwrap();
        let e = dir.server("P").bind().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::PermissionDenied);
        let m = e.to_string();
        assert!(m.contains(&dir_s) && m.contains(&format!("{mode:04o}")) && m.contains("uid"), "{m}");
        let m = client_in_env();
        assert!(m.starts_with("PermissionDenied") && m.contains(&format!("{mode:04o}")), "{m}");
    }
    // A directory named explicitly by the application may be readable by others (to reach
    // another user's service) but never writable by them.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    assert_eq!(dir.client("P").connect().unwrap_err().kind(), ErrorKind::NoService);
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    assert_eq!(dir.client("P").connect().unwrap_err().kind(), ErrorKind::PermissionDenied);
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    // Owned by someone else.
    if rustix::process::geteuid().as_raw() == 0 {
        std::os::unix::fs::chown(dir.path(), Some(65534), Some(65534)).unwrap();
        let m = dir.server("P").bind().unwrap_err().to_string();
        assert!(m.contains("another user") && m.contains("65534"), "{m}");
        assert!(client_in_env().contains("another user"));
        std::os::unix::fs::chown(dir.path(), Some(0), Some(0)).unwrap();
    }
    // A symlink to a perfectly private directory is still refused.
    let link = std::path::PathBuf::from(format!("{dir_s}-link"));
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(dir.path(), &link).unwrap();
    let m = microcs::Server::builder("P").runtime_dir(&link).bind().unwrap_err().to_string();
    std::fs::remove_file(&link).unwrap();
    assert!(m.contains("symlink"), "{m}");
}

#[test]
fn a_non_socket_at_the_socket_path_is_refused_and_kept() {
    let _w = watchdog(Duration::from_secs(10));
    let dir = TempDir::new("nonsock");
    let path = dir.path().join("NS.sock");
    std::fs::File::create(&path).unwrap().write_all(b"precious").unwrap();
    let e = dir.server("NS").bind().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied);
    assert!(e.to_string().contains("regular file"), "{e}");
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
    std::fs::remove_file(&path).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", &path).unwrap();
    let e = dir.server("NS").bind().unwrap_err();
    assert!(e.to_string().contains("symlink"), "{e}");
    assert!(std::fs::symlink_metadata(&path).unwrap().file_type().is_symlink());
}

#[test]
fn builtin_methods_answer_nats_micro_json() {
    let _w = watchdog(Duration::from_secs(30));
    let dir = TempDir::new("micro");
    let name = unique("MICRO");
    let server = PeerProcess::serve(dir.path(), &name);
    let mut c = dir.client(&name).connect().unwrap();
    let ping = c.ping().unwrap();
    assert_eq!(ping.kind, "io.nats.micro.v1.ping_response");
    assert_eq!(ping.name, name);
    assert_eq!(ping.version, "1.2.3");
    assert_eq!(ping.id.len(), 22);
    assert_eq!(ping.metadata["pid"], server.pid.to_string());
    let info = c.info().unwrap();
    assert_eq!(info.kind, "io.nats.micro.v1.info_response");
    assert_eq!(info.description, "test peer");
    assert_eq!(info.endpoints[0].name, "default");
    assert_eq!(info.endpoints[0].subject, name);
    assert!(info.endpoints.iter().any(|e| e.name == "fail" && e.subject == format!("{name}.fail")));
    c.request(b"a").unwrap();
    c.request(b"b").unwrap();
    let _ = c.call("fail", b"");
    let stats = c.stats().unwrap();
    assert_eq!(stats.kind, "io.nats.micro.v1.stats_response");
    assert_eq!(stats.id, ping.id);
    assert!(stats.started.ends_with('Z') && stats.started.contains('T'), "{}", stats.started);
    let def = stats.endpoints.iter().find(|e| e.name == "default").unwrap();
    assert_eq!((def.num_requests, def.num_errors), (2, 0));
    let fail = stats.endpoints.iter().find(|e| e.name == "fail").unwrap();
    assert_eq!((fail.num_requests, fail.num_errors), (1, 1));
    assert_eq!(fail.last_error, "i am a teapot");
    // Raw JSON has the field names of the NATS schema.
    let raw: serde_json::Value = serde_json::from_slice(&c.call("$stats", b"").unwrap()).unwrap();
    for k in ["type", "name", "id", "version", "metadata", "started", "endpoints"] {
        assert!(raw.get(k).is_some(), "missing {k}");
    }
    for k in ["num_requests", "num_errors", "last_error", "processing_time", "average_processing_time"] {
        assert!(raw["endpoints"][0].get(k).is_some(), "missing endpoint field {k}");
    }
}

#[test]
fn shutdown_lets_inflight_requests_finish_and_frees_the_name() {
    let _w = watchdog(Duration::from_secs(30));
    let dir = TempDir::new("drain");
    let name = unique("DRAIN");
    let handle = dir
        .server(&name)
        .bind()
        .unwrap()
        .spawn(|r: Request| {
            std::thread::sleep(Duration::from_millis(400));
            Ok::<_, RemoteError>(r.into_payload())
        })
        .unwrap();
    let n2 = name.clone();
    let d2 = dir.path().to_owned();
    let inflight = std::thread::spawn(move || {
        microcs::Client::builder(&n2).runtime_dir(d2).connect().unwrap().request(b"finish me")
    });
    std::thread::sleep(Duration::from_millis(100));
    handle.shutdown();
    let r = inflight.join().unwrap();
    assert_eq!(r.as_deref().map_err(|e| e.to_string()), Ok(&b"finish me"[..]));
    assert!(!dir.path().join(format!("{name}.sock")).exists());
    assert!(!dir.path().join(format!("{name}.lock")).exists());
    assert_eq!(dir.client(&name).connect().unwrap_err().kind(), ErrorKind::NoService);
    dir.server(&name).bind().unwrap();
}

#[test]
fn connection_cap_answers_busy() {
    let _w = watchdog(Duration::from_secs(30));
    let dir = TempDir::new("cap");
    let name = unique("CAP");
    let h = dir
        .server(&name)
        .max_connections(2)
        .bind()
        .unwrap()
        .spawn(|r: Request| Ok::<_, RemoteError>(r.into_payload()))
        .unwrap();
    let mut a = dir.client(&name).connect().unwrap();
    let _b = dir.client(&name).connect().unwrap();
    let e = dir.client(&name).connect().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Remote, "{e}");
    assert_eq!(e.remote().unwrap().code(), 503);
    assert!(e.to_string().contains("limit of 2 connections"), "{e}");
    assert_eq!(a.request(b"fine").unwrap(), b"fine");
    drop(h);
}

#[test]
fn another_user_is_rejected_before_a_byte_is_read() {
    let _w = watchdog(Duration::from_secs(30));
    if rustix::process::geteuid().as_raw() != 0 || Command::new("setpriv").arg("--version").output().is_err()
    {
        eprintln!("skipped: needs root and setpriv to act as another user");
        return;
    }
    let dir = TempDir::new("uid");
    let name = unique("UID");
    let _server = PeerProcess::serve(dir.path(), &name);
    // Let the other user reach the socket file, so only the server's own check stands.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let sock = dir.path().join(format!("{name}.sock"));
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", PEER, "call-dir", &name])
        .arg(dir.path())
        .output()
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.starts_with("PermissionDenied") && stderr.contains("user 65534"), "{stderr}");
    // The owner is still served.
    assert_eq!(dir.client(&name).connect().unwrap().request(b"me").unwrap(), b"me");
}

#[test]
fn an_allowed_other_user_is_served() {
    let _w = watchdog(Duration::from_secs(30));
    if rustix::process::geteuid().as_raw() != 0 || Command::new("setpriv").arg("--version").output().is_err()
    {
        eprintln!("skipped: needs root and setpriv to act as another user");
        return;
    }
    let dir = TempDir::new("allow");
    let name = unique("ALLOW");
    let h = dir
        .server(&name)
        .allow_uid(65534)
        .bind()
        .unwrap()
        .spawn(|r: Request| Ok::<_, RemoteError>(format!("hello uid {}", r.peer().uid)))
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let sock = dir.path().join(format!("{name}.sock"));
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", PEER, "call-dir", &name])
        .arg(dir.path())
        .arg("hi")
        .output()
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "hello uid 65534");
    h.shutdown();
}

#[test]
fn io_errors_carry_their_cause() {
    let _w = watchdog(Duration::from_secs(10));
    let e = microcs::Server::builder("X").runtime_dir("/dev/null/sub").bind().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io, "{e}");
    assert!(e.to_string().contains("/dev/null/sub"), "{e}");
    let src = std::error::Error::source(&e).expect("the io::Error is the source");
    assert!(src.downcast_ref::<std::io::Error>().is_some());
}

#[test]
fn clients_move_between_threads_and_handles_are_shareable() {
    fn send<T: Send>() {}
    fn send_sync<T: Send + Sync>() {}
    send::<microcs::Client>();
    send_sync::<microcs::ServerHandle>();
    send_sync::<microcs::ShutdownTrigger>();
    send_sync::<microcs::Error>();
    let _w = watchdog(Duration::from_secs(30));
    let dir = TempDir::new("send");
    let name = unique("SEND");
    let server = PeerProcess::serve(dir.path(), &name);
    let mut c = dir.client(&name).connect().unwrap();
    c.request(b"here").unwrap();
    let pid =
        std::thread::spawn(move || String::from_utf8(c.call("pid", b"").unwrap()).unwrap()).join().unwrap();
    assert_eq!(pid, server.pid.to_string());
}

#[test]
fn serve_blocks_until_its_trigger_fires() {
    let _w = watchdog(Duration::from_secs(30));
    let dir = TempDir::new("servefg");
    let name = unique("SERVEFG");
    let server = dir.server(&name).bind().unwrap();
    let trigger = server.shutdown_trigger();
    let t = std::thread::spawn(move || server.serve(|r: Request| Ok::<_, RemoteError>(r.into_payload())));
    let mut c = dir.client(&name).connect().unwrap();
    assert_eq!(c.request(b"fg").unwrap(), b"fg");
    trigger.shutdown();
    t.join().unwrap().unwrap();
    assert_eq!(dir.client(&name).connect().unwrap_err().kind(), ErrorKind::NoService);
}

#[test]
fn a_handler_error_with_code_413_is_the_handlers_not_a_frame_limit() {
    let _w = watchdog(Duration::from_secs(20));
    let dir = TempDir::new("h413");
    let name = unique("H413");
    let h = dir
        .server(&name)
        .bind()
        .unwrap()
        .spawn(|_r: Request| Err::<Vec<u8>, _>(RemoteError::new(413, "board too big to step")))
        .unwrap();
    let mut c = dir.client(&name).connect().unwrap();
    let e = c.request(b"x").unwrap_err();
    assert_eq!((e.kind(), e.remote().unwrap().code()), (ErrorKind::Remote, 413), "{e}");
    assert!(e.may_have_run());
    h.shutdown();
}

#[test]
fn a_name_is_listed_only_once_its_server_serves() {
    let _w = watchdog(Duration::from_secs(20));
    let dir = TempDir::new("ready");
    let name = unique("READY");
    let server = dir.server(&name).bind().unwrap();
    assert!(microcs::list_in(dir.path()).unwrap().is_empty(), "bound but not serving: not listed yet");
    // The name is taken all the same, and competitors learn by whom.
    let e = dir.server(&name).bind().unwrap_err();
    assert_eq!(e.owner_pid(), Some(std::process::id()));
    let h = server.spawn(|r: Request| Ok::<_, RemoteError>(r.into_payload())).unwrap();
    let listed = microcs::list_in(dir.path()).unwrap();
    assert_eq!(listed.len(), 1);
    // Whatever is listed answers at once.
    assert_eq!(dir.client(&name).connect().unwrap().request(b"now").unwrap(), b"now");
    h.shutdown();
}

/// `send_buffer` (default 1 MiB, kernel-capped) sizes the client's socket buffer: a large
/// request leaves in one go while the server has read none of it; with `send_buffer(0)` only
/// the kernel's default buffer-load does.
#[test]
fn the_send_buffer_lets_a_large_request_leave_at_once() {
    let _w = watchdog(Duration::from_secs(30));
    let dir = TempDir::new("sndbuf-c");
    let payload = vec![7u8; 1_500_000];
    let frame = payload.len() + microcs::proto::FRAME_OVERHEAD;
    for (setting, send_buffer) in [(None, 1 << 20), (Some(0), 0)] {
        let name = unique("SNDBUFC");
        let server = deaf_server(&dir, &name);
        let mut b = dir.client(&name).timeout(Duration::from_millis(500));
        if let Some(bytes) = setting {
            b = b.send_buffer(bytes);
        }
        let mut client = b.connect().unwrap();
        let server_end = server.join().unwrap();
        // The server never reads: the request waits in the socket until the call times out.
        let e = client.request(&payload).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::TimedOut, "{e}");
        assert_send_buffer_held(unread_bytes(&server_end), frame, send_buffer);
    }
}

/// `interrupt_check`: a waiting call asks every period and ends at once when told to stop (the
/// server hears the cancel; the connection stays usable); a call answered in time never asks.
#[test]
fn an_interrupt_check_ends_a_waiting_call_and_the_connection_stays_usable() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let _w = watchdog(Duration::from_secs(30));
    let dir = TempDir::new("interrupt");
    let name = unique("INTERRUPT");
    let _server = PeerProcess::serve(dir.path(), &name);
    let (stop, asked) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicUsize::new(0)));
    let (s, a) = (stop.clone(), asked.clone());
    let mut client = dir
        .client(&name)
        .interrupt_check(Duration::from_millis(20), move || {
            a.fetch_add(1, Ordering::SeqCst);
            s.load(Ordering::SeqCst)
        })
        .connect()
        .unwrap();
    assert_eq!(client.request(b"quick").unwrap(), b"quick");
    assert_eq!(asked.load(Ordering::SeqCst), 0, "a prompt answer never asks");

    let setter = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            stop.store(true, Ordering::SeqCst);
        })
    };
    let t0 = std::time::Instant::now();
    let e = client.call("sleep_ms", b"5000").unwrap_err();
    let took = t0.elapsed();
    setter.join().unwrap();
    assert_eq!(e.kind(), ErrorKind::Io, "{e}");
    let source = std::error::Error::source(&e).and_then(|s| s.downcast_ref::<std::io::Error>());
    assert_eq!(source.map(|s| s.kind()), Some(std::io::ErrorKind::Interrupted), "{e}");
    assert!(e.may_have_run(), "{e}");
    assert!(took >= Duration::from_millis(300) && took < Duration::from_secs(2), "ended after {took:?}");
    assert!(asked.load(Ordering::SeqCst) >= 5, "asked every 20 ms: {}", asked.load(Ordering::SeqCst));

    stop.store(false, Ordering::SeqCst);
    assert_eq!(client.request(b"again").unwrap(), b"again", "the same connection goes on");
}

/// Large payloads reuse memory on both sides: the client reads a large reply into a recycled
/// vector, the server reads a large request into the vector of the last large reply it sent.
/// Sizes that grow and shrink, replies of other sizes than their requests, and small frames in
/// between must all arrive exact.
#[test]
fn large_payloads_through_recycled_vectors_arrive_exact() {
    let _w = watchdog(Duration::from_secs(60));
    let dir = TempDir::new("recycle");
    let name = unique("RECYCLE");
    let server = PeerProcess::serve(dir.path(), &name);
    let mut c = dir.client(&name).max_frame(8 << 20).connect().unwrap();
    for (k, size) in
        [1usize << 20, 2 << 20, 100_000, 70_000, 1 << 20, 65_536, 3_000_000].into_iter().enumerate()
    {
        let payload: Vec<u8> = (0..size).map(|i| (i * 7 + k) as u8).collect();
        let reply = c.request(&payload).unwrap();
        assert_eq!(reply, payload, "echo of {size} bytes");
        c.recycle(reply);
        let big = c.call("big", (size / 2).to_string().as_bytes()).unwrap();
        assert_eq!(big.len(), size / 2);
        assert!(big.iter().all(|&b| b == b'x'), "a reply read into a recycled vector has no stale bytes");
        c.recycle(big);
        assert_eq!(c.request(b"small").unwrap(), b"small");
    }
    assert!(server.stop().success());
}
