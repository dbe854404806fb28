//! NATS (feature `nats`): against a real `nats-server`, started by these tests on a free
//! loopback port (or the one `scripts/test` started, `MICROCS_TEST_NATS_URL`).
//!
//! When no `nats-server` binary exists the tests skip, saying so on stderr, so that
//! `cargo test --all-features` passes on a machine without one; with `MICROCS_REQUIRE_NATS=1`
//! (set by the `nats` stage of `scripts/test`) a missing server, URL or Python fails instead.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use microcs::nats::{NatsOptions, Transport};
use microcs::{Client, ErrorKind, RemoteError, Request, Server};
use microcs_testsupport::{Broker, Nats, required};

use crate::common::{PeerProcess, TempDir, eventually, unique, watchdog};
use crate::ownership::{answering_pid, listed};

/// A broker of our own, with extra `nats-server` arguments (skips the test when there is none).
macro_rules! own_broker {
    ($($arg:expr),* $(,)?) => {
        match Broker::start("the NATS tests of the library", &[$($arg),*]) {
            Some(b) => b,
            None => return,
        }
    };
}

/// The shared broker or one of our own (skips the test when there is none).
macro_rules! broker_url {
    () => {
        match Nats::get("the NATS tests of the library") {
            Some(u) => u,
            None => return,
        }
    };
}

fn echo(req: Request) -> Result<Vec<u8>, RemoteError> {
    Ok(req.into_payload())
}

/// A client that only uses NATS.
fn nats_client(url: &str, name: &str) -> microcs::ClientBuilder {
    Client::builder(name).nats(url).transport(Transport::Nats).timeout(Duration::from_secs(10))
}

/// A tokio runtime for raw async-nats calls (a client we did not write).
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

#[test]
fn request_reply_methods_and_builtins() {
    let _w = watchdog(Duration::from_secs(60));
    let b = broker_url!();
    let url = b.url();
    let dir = TempDir::new("nrr");
    let name = unique("NRR");
    let handle = dir
        .server(&name)
        .nats(&url)
        .version("1.2.3")
        .description("echo for tests")
        .metadata("team", "tests")
        .method("upper", |r: Request| Ok::<_, RemoteError>(r.text()?.to_uppercase()))
        .method("who", |r: Request| Ok::<_, RemoteError>(format!("{}/{}", r.peer().pid, r.peer().uid)))
        .method("deadline", |r: Request| Ok::<_, RemoteError>(format!("{}", r.remaining().is_some())))
        .bind()
        .unwrap()
        .spawn(echo)
        .unwrap();
    let mut c = nats_client(&url, &name).connect().unwrap();
    assert_eq!(c.via(), Transport::Nats);
    assert_eq!(c.request(b"Give me some data back!!").unwrap(), b"Give me some data back!!");
    assert_eq!(c.send_message("hello").unwrap(), "hello");
    assert_eq!(c.call("upper", b"abc").unwrap(), b"ABC");
    assert_eq!(c.request(b"").unwrap(), b"");
    let big = vec![7u8; 200_000];
    assert_eq!(c.request(&big).unwrap(), big);
    // No kernel vouches for a NATS caller.
    assert_eq!(c.call("who", b"").unwrap(), format!("0/{}", u32::MAX).as_bytes());
    // Our client sends its timeout; the handler sees a deadline.
    assert_eq!(c.call("deadline", b"").unwrap(), b"true");

    // Built-ins over NATS: the same instance, the same counters as the local ones.
    let ping = c.ping().unwrap();
    let info = c.info().unwrap();
    let stats = c.stats().unwrap();
    let mut local = dir.client(&name).connect().unwrap();
    let mut local_info = local.info().unwrap();
    // Only a local connection has a transport of its own to report (PROTOCOL.md § 13).
    let transport = local_info.metadata.remove(microcs::micro::META_TRANSPORT);
    assert_eq!(transport.as_deref(), Some("unix"));
    assert!(!info.metadata.contains_key(microcs::micro::META_TRANSPORT), "{:?}", info.metadata);
    assert_eq!(info, local_info, "NATS $SRV.INFO and local $info differ");
    assert_eq!(ping.id, info.id);
    assert_eq!(ping.version, "1.2.3");
    assert_eq!(info.description, "echo for tests");
    assert_eq!(info.metadata.get("team").map(String::as_str), Some("tests"));
    assert_eq!(info.metadata.get("pid"), Some(&std::process::id().to_string()));
    assert!(info.metadata.contains_key("host"));
    let subjects: Vec<_> = info.endpoints.iter().map(|e| (e.name.as_str(), e.subject.clone())).collect();
    assert!(subjects.contains(&("default", name.clone())), "{subjects:?}");
    assert!(subjects.contains(&("upper", format!("{name}.upper"))), "{subjects:?}");
    assert!(info.endpoints.iter().all(|e| e.queue_group == "q"));
    let count = |s: &microcs::micro::StatsResponse, ep: &str| {
        s.endpoints.iter().find(|e| e.name == ep).map(|e| e.num_requests).unwrap()
    };
    assert_eq!(count(&stats, "default"), 4);
    assert_eq!(count(&stats, "upper"), 1);
    assert_eq!(local.request(b"x").unwrap(), b"x");
    assert_eq!(count(&handle.stats(), "default"), 5, "local and NATS share counters");
    handle.shutdown();
}

#[test]
fn srv_subjects_at_three_levels_with_micro_json() {
    let _w = watchdog(Duration::from_secs(60));
    let b = broker_url!();
    let url = b.url();
    let name = unique("NSRV");
    let handle = Server::builder(&name)
        .nats(&url)
        .transport(Transport::Nats)
        .version("0.3.0")
        .bind()
        .unwrap()
        .spawn(echo)
        .unwrap();
    let id = handle.stats().id;
    let rt = runtime();
    rt.block_on(async {
        let nc = async_nats::connect(&url).await.unwrap();
        for (verb, kind) in [
            ("PING", "io.nats.micro.v1.ping_response"),
            ("INFO", "io.nats.micro.v1.info_response"),
            ("STATS", "io.nats.micro.v1.stats_response"),
        ] {
            for subject in [format!("$SRV.{verb}.{name}"), format!("$SRV.{verb}.{name}.{id}")] {
                let m = nc.request(subject.clone(), "".into()).await.unwrap();
                let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
                assert_eq!(v["type"], kind, "{subject}: {v}");
                assert_eq!(v["name"], name.as_str());
                assert_eq!(v["id"], id.as_str());
                assert_eq!(v["version"], "0.3.0");
            }
            // `$SRV.X` reaches every service on the broker: gather and find ours.
            let inbox = nc.new_inbox();
            let mut sub = nc.subscribe(inbox.clone()).await.unwrap();
            nc.publish_with_reply(format!("$SRV.{verb}"), inbox, "".into()).await.unwrap();
            let mut found = false;
            while let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(2), next(&mut sub)).await {
                let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
                assert_eq!(v["type"], kind);
                if v["id"] == id.as_str() {
                    found = true;
                    break;
                }
            }
            assert!(found, "no answer from {id} on $SRV.{verb}");
        }
    });
    handle.shutdown();
}

async fn next(sub: &mut async_nats::Subscriber) -> Option<async_nats::Message> {
    std::future::poll_fn(|cx| futures_core::Stream::poll_next(std::pin::Pin::new(&mut *sub), cx)).await
}

#[test]
fn handler_errors_travel_as_nats_micro_headers() {
    let _w = watchdog(Duration::from_secs(60));
    let b = broker_url!();
    let url = b.url();
    let name = unique("NERR");
    let handle = Server::builder(&name)
        .nats(&url)
        .transport(Transport::Nats)
        .method("boom", |_r: Request| -> Result<Vec<u8>, RemoteError> { panic!("kaboom") })
        .method("io", |_r: Request| -> Result<Vec<u8>, std::io::Error> {
            Err(std::io::Error::other("disk on fire\nsecond line"))
        })
        .bind()
        .unwrap()
        .spawn(|r: Request| -> Result<Vec<u8>, RemoteError> {
            Err(RemoteError::new(422, format!("cannot step a board of {} bytes", r.payload().len())))
        })
        .unwrap();
    let mut c = nats_client(&url, &name).connect().unwrap();
    let e = c.request(b"abc").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Remote, "{e}");
    let r = e.remote().unwrap();
    assert_eq!((r.code(), r.message()), (422, "cannot step a board of 3 bytes"));
    let e = c.call("boom", b"").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Remote);
    assert_eq!(e.remote().unwrap().code(), 500);
    assert!(e.remote().unwrap().message().contains("kaboom"), "{e}");
    let e = c.call("io", b"").unwrap_err();
    assert_eq!(e.remote().unwrap().code(), 500);
    assert!(e.remote().unwrap().message().contains("disk on fire second line"), "{e}");
    // The server goes on after a panic.
    let e = c.request(b"x").unwrap_err();
    assert_eq!(e.remote().unwrap().code(), 422);

    // A client we did not write sees the standard headers.
    runtime().block_on(async {
        let nc = async_nats::connect(&url).await.unwrap();
        let m = nc.request(name.clone(), "abcd".into()).await.unwrap();
        let h = m.headers.expect("error headers");
        assert_eq!(h.get("Nats-Service-Error-Code").unwrap().as_str(), "422");
        assert_eq!(h.get("Nats-Service-Error").unwrap().as_str(), "cannot step a board of 4 bytes");
        assert!(m.payload.is_empty());
    });
    let stats = handle.stats();
    let default = stats.endpoints.iter().find(|e| e.name == "default").unwrap();
    assert_eq!((default.num_requests, default.num_errors), (3, 3));
    assert_eq!(default.last_error, "cannot step a board of 4 bytes");
    handle.shutdown();
}

#[test]
fn a_blocking_client_on_nats_forked_after_connecting_reconnects_in_the_child() {
    let _w = watchdog(Duration::from_secs(60));
    let b = broker_url!();
    let url = b.url();
    let dir = TempDir::new("nfork");
    let name = unique("NFORK");
    let handle =
        Server::builder(&name).nats(&url).transport(Transport::Nats).bind().unwrap().spawn(echo).unwrap();
    // The peer's client is on NATS only (its runtime directory has no local instance): after the
    // fork the child gets a NATS runtime and broker connection of its own.
    let out = Command::new(crate::common::PEER)
        .args(["fork-call", &name, "100"])
        .env("MICROCS_RUNTIME_DIR", dir.path())
        .env("MICROCS_NATS_URL", &url)
        .env("MICROCS_TRANSPORT", "nats")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("parent ok") && text.contains("child ok"), "{text}");
    assert!(handle.stats().endpoints[0].num_requests >= 201);
    handle.shutdown();
}

#[test]
fn streams_are_local_only_and_say_so() {
    let _w = watchdog(Duration::from_secs(60));
    let b = broker_url!();
    let url = b.url();
    let name = unique("NSTREAM");
    let handle = Server::builder(&name)
        .nats(&url)
        .transport(Transport::Nats)
        .bind()
        .unwrap()
        .stream_method("count", |_req: Request| {
            Ok::<_, RemoteError>((0..3).map(|i| Ok::<_, RemoteError>(format!("{i}"))))
        })
        .spawn(echo)
        .unwrap();
    // A client on NATS cannot open a stream: refused before anything is sent.
    let mut c = nats_client(&url, &name).connect().unwrap();
    let e = c.stream("count", b"").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Protocol, "{e}");
    assert!(e.to_string().contains("streams are local only"), "{e}");
    // A plain call of the streaming method over NATS gets the server's reason.
    let e = c.call("count", b"").unwrap_err();
    assert_eq!(e.remote().map(|r| r.code()), Some(400), "{e}");
    assert!(e.to_string().contains("streams are local only") && !e.may_have_run(), "{e}");
    assert_eq!(c.request(b"unary still works").unwrap(), b"unary still works");
    handle.shutdown();
}

#[test]
fn nobody_serving_is_no_service_at_once() {
    let _w = watchdog(Duration::from_secs(60));
    let b = broker_url!();
    let url = b.url();
    let dir = TempDir::new("nnos");
    let name = unique("NNOS");
    // Auto: no local instance, NATS connected, nobody answers. A 60 s timeout: a timeout
    // would be TimedOut, not NoService.
    let mut c = dir.client(&name).nats(&url).timeout(Duration::from_secs(60)).connect().unwrap();
    let e = c.request(b"x").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NoService, "{e}");
    assert!(e.to_string().contains(&name) && e.to_string().contains(&url), "{e}");
    // A method the service does not have: nobody subscribes to its subject either.
    let handle =
        Server::builder(&name).nats(&url).transport(Transport::Nats).bind().unwrap().spawn(echo).unwrap();
    assert_eq!(c.request(b"x").unwrap(), b"x");
    let e = c.call("nope", b"x").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NoService, "{e}");
    assert!(e.to_string().contains("nope"), "{e}");
    handle.shutdown();
    // Gone again once the server stopped (it unsubscribed).
    let e = c.request(b"x").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NoService, "{e}");
}

#[test]
fn oversize_payloads_are_refused_before_sending() {
    let _w = watchdog(Duration::from_secs(60));
    // A broker of our own with a small max_payload.
    let conf = TempDir::new("nbig");
    let conf_file = conf.path().join("nats.conf");
    std::fs::write(&conf_file, "max_payload: 65536\n").unwrap();
    let b = own_broker!("-c", conf_file.to_str().unwrap());
    let url = b.url();
    let name = unique("NBIG");
    let handle = Server::builder(&name)
        .nats(&url)
        .transport(Transport::Nats)
        .max_frame(1000)
        .bind()
        .unwrap()
        .spawn(echo)
        .unwrap();
    let mut c = nats_client(&url, &name).timeout(Duration::from_secs(60)).connect().unwrap();
    // Over the broker's max_payload: refused by our client, nothing sent.
    let e = c.request(&vec![0u8; 70_000]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::FrameTooLarge, "{e}");
    assert!(e.to_string().contains("65536"), "{e}");
    assert!(!e.may_have_run());
    // Under the broker's limit but over the server's max_frame: refused by the server.
    let e = c.request(&vec![0u8; 5000]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::FrameTooLarge, "{e}");
    assert!(e.to_string().contains("1000"), "{e}");
    let stats = handle.stats();
    assert_eq!(stats.endpoints[0].num_requests, 0, "the handler never ran");
    assert_eq!(c.request(&[1u8; 1000]).unwrap(), vec![1u8; 1000]);
    handle.shutdown();

    // A reply over the broker's limit comes back as FrameTooLarge too, not as a timeout.
    let name = unique("NBIGR");
    let handle = Server::builder(&name)
        .nats(&url)
        .transport(Transport::Nats)
        .bind()
        .unwrap()
        .spawn(|_r: Request| Ok::<_, RemoteError>(vec![0u8; 100_000]))
        .unwrap();
    let mut c = nats_client(&url, &name).timeout(Duration::from_secs(60)).connect().unwrap();
    let e = c.request(b"x").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::FrameTooLarge, "{e}");
    assert!(e.to_string().contains("reply of 100000 bytes"), "{e}");
    handle.shutdown();
}

#[test]
fn three_instances_share_the_load() {
    let _w = watchdog(Duration::from_secs(120));
    let b = broker_url!();
    let url = b.url();
    let name = unique("NLB");
    let counts: Vec<Arc<AtomicUsize>> = (0..3).map(|_| Arc::new(AtomicUsize::new(0))).collect();
    let handles: Vec<_> = counts
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let n = n.clone();
            Server::builder(&name)
                .nats(&url)
                .transport(Transport::Nats)
                .bind()
                .unwrap()
                .spawn(move |_r: Request| {
                    n.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, RemoteError>(i.to_string())
                })
                .unwrap()
        })
        .collect();
    let ids: std::collections::HashSet<_> = handles.iter().map(|h| h.stats().id).collect();
    assert_eq!(ids.len(), 3, "each instance has its own id");
    let mut c = nats_client(&url, &name).connect().unwrap();
    let mut by_reply: HashMap<String, usize> = HashMap::new();
    for _ in 0..300 {
        *by_reply.entry(c.send_message("x").unwrap()).or_default() += 1;
    }
    let seen: Vec<usize> = counts.iter().map(|n| n.load(Ordering::SeqCst)).collect();
    assert_eq!(seen.iter().sum::<usize>(), 300, "{seen:?}");
    assert!(seen.iter().all(|&n| n > 0), "every instance should get some of the requests: {seen:?}");
    assert_eq!(by_reply.len(), 3, "{by_reply:?}");
    // $SRV.PING reaches all three.
    let listed = microcs::nats::list(&NatsOptions::new(&url), Some(&name), Duration::from_secs(3)).unwrap();
    let listed: std::collections::HashSet<_> = listed.into_iter().map(|i| i.id).collect();
    assert_eq!(listed, ids);
    for h in handles {
        h.shutdown();
    }
}

#[test]
fn local_instance_first_nats_otherwise() {
    let _w = watchdog(Duration::from_secs(90));
    let b = broker_url!();
    let url = b.url();
    let dir = TempDir::new("nlf");
    let name = unique("NLF");
    let remote = Server::builder(&name)
        .nats(&url)
        .transport(Transport::Nats)
        .bind()
        .unwrap()
        .spawn(|_r: Request| Ok::<_, RemoteError>("nats"))
        .unwrap();
    let start_local =
        || dir.server(&name).bind().unwrap().spawn(|_r: Request| Ok::<_, RemoteError>("local")).unwrap();
    let local = start_local();
    let mut c = dir.client(&name).nats(&url).timeout(Duration::from_secs(10)).connect().unwrap();
    assert_eq!(c.send_message("?").unwrap(), "local");
    assert_eq!(c.via(), Transport::Local);
    // The local instance goes away: the next request goes over NATS, nothing fails.
    local.shutdown();
    assert_eq!(c.send_message("?").unwrap(), "nats");
    assert_eq!(c.via(), Transport::Nats);
    // It comes back: the client finds it again (it looks once a second).
    let local = start_local();
    let back =
        eventually(Duration::from_secs(10), || (c.send_message("?").unwrap() == "local").then_some(()));
    assert!(back.is_some(), "the client never went back to the local instance");
    // Forced transports.
    let mut n = dir.client(&name).nats(&url).transport(Transport::Nats).connect().unwrap();
    assert_eq!(n.send_message("?").unwrap(), "nats");
    let mut l = dir.client(&name).nats(&url).transport(Transport::Local).connect().unwrap();
    assert_eq!(l.send_message("?").unwrap(), "local");
    local.shutdown();
    let e = l.send_message("?").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NoService, "{e}");
    // A client that finds no local instance at connect time goes to NATS at once.
    let mut c2 = dir.client(&name).nats(&url).connect().unwrap();
    assert_eq!(c2.send_message("?").unwrap(), "nats");
    remote.shutdown();
}

#[test]
fn a_server_serves_local_and_nats_with_one_handler() {
    let _w = watchdog(Duration::from_secs(60));
    let b = broker_url!();
    let url = b.url();
    let dir = TempDir::new("nboth");
    let name = unique("NBOTH");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let handle = dir
        .server(&name)
        .nats(&url)
        .bind()
        .unwrap()
        .spawn(move |r: Request| {
            s.lock().unwrap().push(r.peer().pid);
            Ok::<_, RemoteError>(r.into_payload())
        })
        .unwrap();
    assert!(handle.name().as_str() == name);
    let mut local = dir.client(&name).transport(Transport::Local).connect().unwrap();
    let mut remote = nats_client(&url, &name).connect().unwrap();
    assert_eq!(local.request(b"a").unwrap(), b"a");
    assert_eq!(remote.request(b"b").unwrap(), b"b");
    assert_eq!(*seen.lock().unwrap(), vec![std::process::id(), 0]);
    // Shutdown frees the local name and leaves NATS.
    handle.shutdown();
    assert_eq!(remote.request(b"c").unwrap_err().kind(), ErrorKind::NoService);
    assert_eq!(local.request(b"c").unwrap_err().kind(), ErrorKind::NoService);
}

#[test]
fn broker_restart_client_and_server_recover() {
    let _w = watchdog(Duration::from_secs(90));
    let mut b = own_broker!();
    let url = b.url();
    let name = unique("NRST");
    let handle =
        Server::builder(&name).nats(&url).transport(Transport::Nats).bind().unwrap().spawn(echo).unwrap();
    let mut c = nats_client(&url, &name).timeout(Duration::from_secs(2)).connect().unwrap();
    assert_eq!(c.request(b"before").unwrap(), b"before");
    b.restart();
    // Both sides reconnect by themselves (and the server subscribes again); requests made
    // meanwhile fail with a clear kind, never hang.
    let mut failures = Vec::new();
    let ok = eventually(Duration::from_secs(30), || match c.request(b"after") {
        Ok(r) => Some(r),
        Err(e) => {
            failures.push(e.kind());
            None
        }
    });
    assert_eq!(ok.as_deref(), Some(&b"after"[..]), "no recovery; errors: {failures:?}");
    assert!(
        failures.iter().all(|k| matches!(k, ErrorKind::TimedOut | ErrorKind::NoService | ErrorKind::Closed)),
        "{failures:?}"
    );
    for i in 0..20 {
        assert_eq!(c.request(format!("{i}").as_bytes()).unwrap(), format!("{i}").as_bytes());
    }
    handle.shutdown();
}

#[test]
fn names_and_versions_nats_cannot_take_are_refused() {
    let _w = watchdog(Duration::from_secs(60));
    let b = broker_url!();
    let url = b.url();
    let dotted = format!("{}.svc", unique("NDOT"));
    let e = Server::builder(&dotted).nats(&url).transport(Transport::Nats).bind().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidName, "{e}");
    assert!(e.to_string().contains("no dots"), "{e}");
    let name = unique("NVER");
    let e = Server::builder(&name).nats(&url).transport(Transport::Nats).version("1.0").bind().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidConfig, "{e}");
    assert!(e.to_string().contains("SemVer"), "{e}");
    let e = Server::builder(&name)
        .nats(&url)
        .transport(Transport::Nats)
        .bind()
        .unwrap()
        .method("v1.step", echo)
        .spawn(echo)
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidName, "{e}");
    assert!(e.to_string().contains("v1.step"), "{e}");
    // A dotted name is still fine locally; the same builder without NATS binds.
    let dir = TempDir::new("ndot");
    dir.server(&dotted).bind().unwrap().spawn(echo).unwrap().shutdown();
    // The server's broker URL never comes from the environment: Nats transport without one fails.
    let e = Server::builder(&name).transport(Transport::Nats).bind().unwrap_err();
    assert!(e.to_string().contains("needs a NATS URL"), "{e}");
    assert_eq!(e.kind(), ErrorKind::InvalidConfig, "{e}");
}

/// A client process started with `env`: its `call` outcome as the peer prints it
/// (`Kind: message` on stderr when it fails).
fn peer_call(dir: &TempDir, name: &str, env: &[(&str, &str)]) -> String {
    let mut cmd = Command::new(crate::common::PEER);
    cmd.args(["call", name, "x"]).env("MICROCS_RUNTIME_DIR", dir.path());
    for var in ["MICROCS_TRANSPORT", "MICROCS_NATS_URL"] {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().copied());
    let out = cmd.output().unwrap();
    assert!(!out.status.success(), "the call should fail: {out:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn configuration_mistakes_are_invalid_config_and_bad_names_stay_invalid_name() {
    let _w = watchdog(Duration::from_secs(60));
    let dir = TempDir::new("ncfg");
    let name = unique("NCFG");
    // Settings: an unknown transport, NATS without a URL, an empty URL, bad credentials in one.
    let err = peer_call(&dir, &name, &[("MICROCS_TRANSPORT", "tcp")]);
    assert!(err.starts_with("InvalidConfig: MICROCS_TRANSPORT: unknown transport"), "{err}");
    let err = peer_call(&dir, &name, &[("MICROCS_TRANSPORT", "nats")]);
    assert!(err.starts_with("InvalidConfig: ") && err.contains("needs a NATS URL"), "{err}");
    let e = Server::builder(&name).nats("  ").bind().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidConfig, "{e}");
    assert!(e.to_string().contains("the NATS URL is empty"), "{e}");
    let e = Transport::parse("tcp").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidConfig, "{e}");
    assert_eq!(e.kind().as_str(), "invalid configuration");
    // Names are still names, with NATS configured or not.
    let e = dir.client("bad/name").nats("nats://127.0.0.1:1").connect().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidName, "{e}");
    let err = peer_call(&dir, "bad/name", &[("MICROCS_TRANSPORT", "local")]);
    assert!(err.starts_with("InvalidName: "), "{err}");
}

#[test]
fn unreachable_broker_is_a_clear_error_naming_the_url() {
    let _w = watchdog(Duration::from_secs(60));
    // A port nothing listens on: bind one, note it, close it.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("nats://127.0.0.1:{port}");
    let dir = TempDir::new("nunr");
    let name = unique("NUNR");
    let e = dir.client(&name).nats(&url).transport(Transport::Nats).connect().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io, "{e}");
    assert!(e.to_string().contains(&url), "{e}");
    // Auto: no local instance and no broker: both are said.
    let e = dir.client(&name).nats(&url).connect().unwrap_err();
    assert!(e.to_string().contains("no service named") && e.to_string().contains(&url), "{e}");
    let e = Server::builder(&name).nats(&url).transport(Transport::Nats).bind().unwrap_err();
    assert!(e.to_string().contains(&url), "{e}");
    let e = microcs::nats::list(&NatsOptions::new(&url), None, Duration::from_millis(100)).unwrap_err();
    assert!(e.to_string().contains(&url), "{e}");
    // A password in the URL is not repeated in messages.
    let e = dir
        .client(&name)
        .nats(&format!("nats://me:hunter2@127.0.0.1:{port}"))
        .transport(Transport::Nats)
        .connect()
        .unwrap_err();
    assert!(!e.to_string().contains("hunter2"), "{e}");
}

#[test]
fn credentials_user_password_and_token() {
    let _w = watchdog(Duration::from_secs(60));
    let b = own_broker!("--user", "svc", "--pass", "s3cret-pw");
    let url = b.url();
    let name = unique("NAUTH");
    let good = NatsOptions::new(&url).user_password("svc", "s3cret-pw");
    let handle = Server::builder(&name)
        .nats_options(good.clone())
        .transport(Transport::Nats)
        .bind()
        .unwrap()
        .spawn(echo)
        .unwrap();
    let mut c = Client::builder(&name).nats_options(good).transport(Transport::Nats).connect().unwrap();
    assert_eq!(c.request(b"in").unwrap(), b"in");
    // The same credentials written in the URL (as MICROCS_NATS_URL may carry them).
    let in_url = url.replacen("nats://", "nats://svc:s3cret-pw@", 1);
    let mut c = Client::builder(&name).nats(&in_url).transport(Transport::Nats).connect().unwrap();
    assert_eq!(c.request(b"via url").unwrap(), b"via url");
    let wrong_in_url = url.replacen("nats://", "nats://svc:wrong@", 1);
    let e = Client::builder(&name).nats(&wrong_in_url).transport(Transport::Nats).connect().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
    assert!(!e.to_string().contains("wrong"), "{e}");
    let bad = NatsOptions::new(&url).user_password("svc", "wrong");
    let e = Client::builder(&name).nats_options(bad).transport(Transport::Nats).connect().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
    assert!(!e.to_string().contains("wrong"), "{e}");
    handle.shutdown();

    let t = own_broker!("--auth", "tok-123");
    let opts = NatsOptions::new(&t.url()).token("tok-123");
    let handle = Server::builder(&name)
        .nats_options(opts.clone())
        .transport(Transport::Nats)
        .bind()
        .unwrap()
        .spawn(echo)
        .unwrap();
    let mut c = Client::builder(&name).nats_options(opts).transport(Transport::Nats).connect().unwrap();
    assert_eq!(c.request(b"tok").unwrap(), b"tok");
    // A token in the URL, and percent-encoding: the token "tok-123" written as "tok%2D123".
    let in_url = t.url().replacen("nats://", "nats://tok%2D123@", 1);
    let mut c = Client::builder(&name).nats(&in_url).transport(Transport::Nats).connect().unwrap();
    assert_eq!(c.request(b"tok via url").unwrap(), b"tok via url");
    handle.shutdown();
}

/// Makes a CA and a server certificate for 127.0.0.1 with `openssl`; `None` without it.
fn make_certs(dir: &Path) -> Option<()> {
    let run = |args: &[&str]| {
        Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    std::fs::write(dir.join("ext.cnf"), "subjectAltName=IP:127.0.0.1,DNS:localhost\n").ok()?;
    let ok = run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=microcs test CA",
    ]) && run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]) && run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
    ok.then_some(())
}

#[test]
fn tls_urls_work() {
    let _w = watchdog(Duration::from_secs(90));
    let certs = TempDir::new("ntls");
    if make_certs(certs.path()).is_none() {
        assert!(!required(), "MICROCS_REQUIRE_NATS=1 but openssl could not make test certificates");
        eprintln!("SKIPPED: no openssl to make test certificates");
        return;
    }
    let p = |f: &str| certs.path().join(f).to_str().unwrap().to_owned();
    let b = own_broker!("--tls", "--tlscert", &p("server.pem"), "--tlskey", &p("server.key"));
    let url = b.url();
    assert!(url.starts_with("tls://"));
    let name = unique("NTLS");
    let opts = NatsOptions::new(&url).root_certificate(p("ca.pem"));
    let handle = Server::builder(&name)
        .nats_options(opts.clone())
        .transport(Transport::Nats)
        .bind()
        .unwrap()
        .spawn(echo)
        .unwrap();
    let mut c = Client::builder(&name).nats_options(opts).transport(Transport::Nats).connect().unwrap();
    assert_eq!(c.request(b"over tls").unwrap(), b"over tls");
    // Without trusting the CA, TLS fails, with a message naming the URL.
    let e = Client::builder(&name).nats(&url).transport(Transport::Nats).connect().unwrap_err();
    assert!(e.to_string().contains(&url), "{e}");
    handle.shutdown();
}

#[test]
fn list_finds_services_with_their_info() {
    let _w = watchdog(Duration::from_secs(60));
    let b = broker_url!();
    let url = b.url();
    let (a, z) = (unique("NLSA"), unique("NLSZ"));
    let ha = Server::builder(&a)
        .nats(&url)
        .transport(Transport::Nats)
        .version("1.0.0")
        .bind()
        .unwrap()
        .spawn(echo)
        .unwrap();
    let hz = Server::builder(&z)
        .nats(&url)
        .transport(Transport::Nats)
        .method("m", echo)
        .bind()
        .unwrap()
        .spawn(echo)
        .unwrap();
    let all = microcs::nats::list(&NatsOptions::new(&url), None, Duration::from_secs(3)).unwrap();
    let ours: Vec<_> = all.iter().filter(|i| i.name == a || i.name == z).collect();
    assert_eq!(ours.len(), 2, "{all:?}");
    assert_eq!(ours[0].name, a, "sorted by name");
    assert_eq!(ours[0].version, "1.0.0");
    assert_eq!(ours[1].endpoints.len(), 2);
    assert_eq!(ours[1].metadata.get("pid"), Some(&std::process::id().to_string()));
    let one = microcs::nats::list(&NatsOptions::new(&url), Some(&z), Duration::from_secs(3)).unwrap();
    assert_eq!(one.len(), 1);
    assert_eq!(one[0].name, z);
    ha.shutdown();
    hz.shutdown();
}

/// A Python with nats-py: `MICROCS_TEST_PYTHON`, else the project venv, else `python3`; `None`
/// (after saying why) when none can import `nats`.
fn python_with_nats() -> Option<PathBuf> {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python");
    let candidates = std::env::var_os("MICROCS_TEST_PYTHON")
        .map(PathBuf::from)
        .into_iter()
        .chain([venv, PathBuf::from("python3")]);
    for py in candidates {
        let ok = Command::new(&py)
            .args(["-c", "import nats, nats.micro"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Some(py);
        }
    }
    assert!(!required(), "MICROCS_REQUIRE_NATS=1 but no Python with nats-py was found (pip install nats-py)");
    eprintln!("SKIPPED: no Python with nats-py (./scripts/test nats installs it into .venv)");
    None
}

fn interop_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/nats_interop").join(name)
}

#[test]
fn interop_nats_py_calls_our_service_and_reads_srv_json() {
    let _w = watchdog(Duration::from_secs(120));
    let b = broker_url!();
    let Some(py) = python_with_nats() else { return };
    let url = b.url();
    let name = unique("NPYC");
    let handle = Server::builder(&name)
        .nats(&url)
        .transport(Transport::Nats)
        .version("1.4.2")
        .description("called from nats-py")
        .method("upper", |r: Request| Ok::<_, RemoteError>(r.text()?.to_uppercase()))
        .method("fail", |_r: Request| Err::<Vec<u8>, _>(RemoteError::new(422, "no good")))
        .bind()
        .unwrap()
        .spawn(echo)
        .unwrap();
    let out = Command::new(&py).arg(interop_script("call_microcs.py")).args([&url, &name]).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "nats-py interop failed:\n{text}");
    assert!(text.contains("interop ok"), "{text}");
    // It really called: our counters saw it.
    let stats = handle.stats();
    let n = |ep: &str| stats.endpoints.iter().find(|e| e.name == ep).unwrap().num_requests;
    assert!(n("default") >= 1 && n("upper") >= 1 && n("fail") >= 1, "{stats:?}");
    handle.shutdown();
}

#[test]
fn interop_our_client_calls_a_nats_py_micro_service() {
    let _w = watchdog(Duration::from_secs(120));
    let b = broker_url!();
    let Some(py) = python_with_nats() else { return };
    let url = b.url();
    let name = unique("NPYS");
    let mut child = Command::new(&py)
        .arg(interop_script("micro_service.py"))
        .args([&url, &name])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready", "the nats-py service did not start");
    let result = std::panic::catch_unwind(|| {
        let mut c = nats_client(&url, &name).connect().unwrap();
        assert_eq!(c.request(b"hello from rust").unwrap(), b"hello from rust");
        assert_eq!(c.send_message("text").unwrap(), "text");
        assert_eq!(c.call("upper", b"abc").unwrap(), b"ABC");
        let e = c.call("fail", b"").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Remote, "{e}");
        assert_eq!((e.remote().unwrap().code(), e.remote().unwrap().message()), (418, "i am a teapot"));
        // Its $SRV answers parse as ours do.
        let ping = c.ping().unwrap();
        assert_eq!((ping.name.as_str(), ping.version.as_str()), (name.as_str(), "2.1.0"));
        let info = c.info().unwrap();
        assert_eq!(info.description, "nats-py micro service");
        let mut eps: Vec<_> = info.endpoints.iter().map(|e| e.name.clone()).collect();
        eps.sort();
        assert_eq!(eps, ["default", "fail", "upper"]);
        let stats = c.stats().unwrap();
        let fail = stats.endpoints.iter().find(|e| e.name == "fail").unwrap();
        assert_eq!((fail.num_requests, fail.num_errors), (1, 1));
        let listed =
            microcs::nats::list(&NatsOptions::new(&url), Some(&name), Duration::from_secs(3)).unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].id, ping.id);
    });
    drop(child.stdin.take());
    let _ = child.wait();
    if let Err(p) = result {
        std::panic::resume_unwind(p);
    }
}

/// The async API over NATS: a tokio server (async handlers) and the tokio client, crossed with
/// the blocking ones.
#[cfg(feature = "tokio")]
#[test]
fn tokio_server_and_client_over_nats() {
    let _w = watchdog(Duration::from_secs(90));
    let b = broker_url!();
    let url = b.url();
    let dir = TempDir::new("ntok");
    let name = unique("NTOK");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let handle = rt.block_on(async {
        microcs::tokio::Server::builder(&name)
            .runtime_dir(dir.path())
            .nats(&url)
            .version("3.0.0")
            .method("upper", |r: Request| async move { Ok::<_, RemoteError>(r.text()?.to_uppercase()) })
            .method("slow", |_r: Request| async move {
                tokio::time::sleep(Duration::from_secs(30)).await;
                Ok::<_, RemoteError>("late")
            })
            .method("boom", |_r: Request| async move {
                if true {
                    panic!("async kaboom");
                }
                Ok::<_, RemoteError>("")
            })
            .bind()
            .await
            .unwrap()
            .spawn(|r: Request| async move {
                if r.payload() == b"fail" {
                    return Err(RemoteError::new(409, "conflict"));
                }
                Ok::<_, RemoteError>(r.into_payload())
            })
            .unwrap()
    });
    rt.block_on(async {
        let c = microcs::tokio::Client::builder(&name)
            .nats(&url)
            .transport(Transport::Nats)
            .timeout(Duration::from_secs(10))
            .connect()
            .await
            .unwrap();
        assert_eq!(c.via(), Transport::Nats);
        assert_eq!(c.request(b"async").await.unwrap(), b"async");
        assert_eq!(c.call("upper", b"abc").await.unwrap(), b"ABC");
        let e = c.request(b"fail").await.unwrap_err();
        assert_eq!((e.kind(), e.remote().unwrap().code()), (ErrorKind::Remote, 409));
        let e = c.call("boom", b"").await.unwrap_err();
        assert!(e.remote().unwrap().message().contains("async kaboom"), "{e}");
        // The deadline the client sends stops the handler: TimedOut, not a 30 s wait.
        let mut short = c.clone();
        short.set_timeout(Duration::from_millis(300));
        let e = short.call("slow", b"").await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::TimedOut, "{e}");
        // Many requests in flight on one client.
        let calls = (0..50).map(|i| {
            let c = c.clone();
            async move { c.request(format!("{i}").as_bytes()).await.map(|r| (i, r)) }
        });
        let mut set = tokio::task::JoinSet::new();
        for f in calls {
            set.spawn(f);
        }
        while let Some(r) = set.join_next().await {
            let (i, reply) = r.unwrap().unwrap();
            assert_eq!(reply, format!("{i}").as_bytes());
        }
        let info = c.info().await.unwrap();
        assert_eq!(info.version, "3.0.0");
        // Local first for the async client too.
        let local = microcs::tokio::Client::builder(&name)
            .runtime_dir(dir.path())
            .nats(&url)
            .connect()
            .await
            .unwrap();
        assert_eq!(local.request(b"l").await.unwrap(), b"l");
        assert_eq!(local.via(), Transport::Local);
    });
    // The blocking client calls the async server over NATS.
    let mut bc = nats_client(&url, &name).connect().unwrap();
    assert_eq!(bc.call("upper", b"xyz").unwrap(), b"XYZ");
    let stats = handle.stats();
    assert!(stats.endpoints.iter().find(|e| e.name == "default").unwrap().num_requests >= 52);
    rt.block_on(handle.shutdown());
    assert_eq!(bc.request(b"x").unwrap_err().kind(), ErrorKind::NoService);

    // NATS only, and the async client against a blocking server.
    let bname = unique("NTOKB");
    let bh =
        Server::builder(&bname).nats(&url).transport(Transport::Nats).bind().unwrap().spawn(echo).unwrap();
    rt.block_on(async {
        let c = microcs::tokio::Client::builder(&bname).nats(&url).connect().await.unwrap();
        assert_eq!(c.request(b"to blocking").await.unwrap(), b"to blocking");
        assert_eq!(c.via(), Transport::Nats);
        let h = microcs::tokio::Server::builder(&name)
            .nats(&url)
            .transport(Transport::Nats)
            .bind()
            .await
            .unwrap()
            .spawn(|_r: Request| async move { Ok::<_, RemoteError>("nats only") })
            .unwrap();
        assert!(h.name().as_str() == name);
        let c = microcs::tokio::Client::builder(&name).nats(&url).connect().await.unwrap();
        assert_eq!(c.request(b"").await.unwrap(), b"nats only");
        h.shutdown().await;
    });
    bh.shutdown();
}

/// A server that also serves on NATS watches its local name like any other (see
/// `ownership.rs`): it takes the name back while it is free, and stops — NATS side included —
/// when another server owns it now.
fn local_name_lost_with_nats_too(mode: &str) {
    let _w = watchdog(Duration::from_secs(90));
    let broker = broker_url!();
    let url = broker.url();
    let dir = TempDir::new("nlost");
    let name = unique("NLOST");
    let env = [("PEER_NATS", url.as_str())];
    let local_pid = || answering_pid(&dir, &name);
    let listed = || listed(&dir, &name);
    let mut a = PeerProcess::serve_mode(dir.path(), mode, &name, &env);
    std::fs::remove_dir_all(dir.path()).unwrap();
    let back = eventually(Duration::from_secs(15), || {
        (local_pid() == Some(a.pid) && listed() == [a.pid]).then_some(())
    });
    assert!(back.is_some(), "restored: {:?} {:?}", local_pid(), listed());

    let frozen = a.sigstop();
    std::fs::remove_dir_all(dir.path()).unwrap();
    let b = PeerProcess::serve_mode(dir.path(), mode, &name, &env);
    drop(frozen);
    let status = a.exited(Duration::from_secs(15)).expect("the first server stops by itself");
    assert_eq!(a.next_line().as_deref(), Some(format!("LOST NameTaken {}", b.pid).as_str()));
    assert_eq!(status.code(), Some(3));
    assert_eq!(listed(), [b.pid]);
    let mut c = nats_client(&url, &name).connect().unwrap();
    for _ in 0..5 {
        assert_eq!(
            c.call("pid", b"").unwrap(),
            b.pid.to_string().as_bytes(),
            "only the owner serves on NATS"
        );
    }
}

#[test]
fn a_server_on_nats_too_restores_or_gives_up_its_local_name_blocking_server() {
    local_name_lost_with_nats_too("serve");
}

#[test]
fn a_server_on_nats_too_restores_or_gives_up_its_local_name_tokio_server() {
    local_name_lost_with_nats_too("serve-tokio");
}

/// Instances of a shared name on NATS (after the macros above, which it uses).
mod instances;
