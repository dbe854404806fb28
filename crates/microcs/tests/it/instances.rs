//! A name served by several instances (`ServerBuilder::shared`): slots, balancing, crashes,
//! and the rule that exclusive servers and instances never mix. Instances are separate
//! `microcs-peer` processes (blocking and async servers), except where a test needs a builder
//! option the peer has no switch for.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use microcs::{ErrorKind, RemoteError, Request};

use crate::common::{PEER, PeerProcess, TempDir, eventually, unique, watchdog};

const SHARED: &[(&str, &str)] = &[("PEER_SHARED", "1")];

fn instance(dir: &TempDir, mode: &str, name: &str) -> PeerProcess {
    PeerProcess::serve_mode(dir.path(), mode, name, SHARED)
}

/// (slot, pid) of each listed instance of `name`.
fn slots(dir: &TempDir, name: &str) -> Vec<(u32, u32)> {
    microcs::list_in(dir.path())
        .unwrap()
        .into_iter()
        .filter(|s| s.name.as_str() == name)
        .map(|s| (s.instance.expect("listed as an instance"), s.pid))
        .collect()
}

fn pid_of(c: &mut microcs::Client) -> microcs::Result<u32> {
    Ok(String::from_utf8(c.call("pid", b"")?).unwrap().parse().unwrap())
}

#[test]
fn instances_share_a_name_are_listed_by_slot_and_free_it_when_gone() {
    let _w = watchdog(Duration::from_secs(60));
    let dir = TempDir::new("inst");
    let name = unique("INST");
    let a = instance(&dir, "serve", &name);
    let b = instance(&dir, "serve-tokio", &name);
    let c = instance(&dir, "serve", &name);
    assert_eq!(slots(&dir, &name), [(0, a.pid), (1, b.pid), (2, c.pid)]);

    // Eight clients connecting one after the other spread over the three (least connections
    // first): no instance gets more than three of them.
    let mut clients: Vec<_> = (0..8).map(|_| dir.client(&name).connect().unwrap()).collect();
    let mut per_pid = BTreeMap::<u32, usize>::new();
    for cl in &mut clients {
        *per_pid.entry(pid_of(cl).unwrap()).or_default() += 1;
    }
    assert_eq!(per_pid.keys().copied().collect::<BTreeSet<_>>(), [a.pid, b.pid, c.pid].into(), "{per_pid:?}");
    assert!(per_pid.values().all(|&n| n <= 3), "{per_pid:?}");
    // The load each instance recorded is what `list` shows.
    let conns: u64 = microcs::list_in(dir.path())
        .unwrap()
        .iter()
        .filter(|s| s.name.as_str() == name)
        .map(|s| s.connections.unwrap())
        .sum();
    assert_eq!(conns, 8);

    // $info answers for the instance reached.
    let info = clients[0].info().unwrap();
    assert_eq!(info.metadata["pid"], pid_of(&mut clients[0]).unwrap().to_string());
    drop(clients);

    assert!(b.stop().success());
    assert_eq!(slots(&dir, &name), [(0, a.pid), (2, c.pid)]);
    // A new instance takes the lowest free slot.
    let d = instance(&dir, "serve", &name);
    assert_eq!(slots(&dir, &name), [(0, a.pid), (1, d.pid), (2, c.pid)]);
    for p in [a, c, d] {
        assert!(p.stop().success());
    }
    assert!(slots(&dir, &name).is_empty());
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(left.is_empty(), "the last instance leaves no file behind: {left:?}");
    let e = dir.client(&name).connect().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NoService, "{e}");
}

#[test]
fn exclusive_servers_and_instances_never_mix() {
    let _w = watchdog(Duration::from_secs(60));
    let dir = TempDir::new("mix");
    let name = unique("MIX");
    // Exclusive first: an instance is refused, naming the owner.
    let owner = PeerProcess::serve(dir.path(), &name);
    let joiner = PeerProcess::start(dir.path(), "serve", &name, SHARED);
    assert!(joiner.first_line.is_empty(), "{}", joiner.first_line);
    let e = dir.server(&name).shared().bind().unwrap_err();
    assert_eq!((e.kind(), e.owner_pid()), (ErrorKind::NameTaken, Some(owner.pid)));
    assert!(e.to_string().contains("exclusive"), "{e}");
    assert!(owner.stop().success());

    // Instances first: an exclusive server is refused, naming them and how to join.
    let a = instance(&dir, "serve", &name);
    let b = instance(&dir, "serve-tokio", &name);
    let e = dir.server(&name).bind().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NameTaken, "{e}");
    let text = e.to_string();
    assert!(text.contains("2 shared instances") && text.contains(&a.pid.to_string()), "{text}");
    assert!(text.contains(&b.pid.to_string()) && text.contains("shared"), "{text}");
    let race = PeerProcess::start(dir.path(), "race", &name, &[]);
    assert!(race.first_line.starts_with("TAKEN "), "{}", race.first_line);
    // The instances are untouched.
    assert_eq!(slots(&dir, &name), [(0, a.pid), (1, b.pid)]);
    assert!(a.stop().success() && b.stop().success());
    // Once they are gone the name is free for an exclusive server again.
    let h =
        dir.server(&name).bind().unwrap().spawn(|r: Request| Ok::<_, RemoteError>(r.into_payload())).unwrap();
    assert_eq!(dir.client(&name).connect().unwrap().request(b"x").unwrap(), b"x");
    h.shutdown();
}

#[test]
fn fifty_instances_racing_for_slots_each_get_their_own() {
    let _w = watchdog(Duration::from_secs(120));
    let dir = TempDir::new("race50");
    let name = unique("RACE50");
    let peers: Vec<_> = (0..50)
        .map(|_| {
            let mut cmd = Command::new(PEER);
            cmd.args(["race", &name])
                .env("MICROCS_RUNTIME_DIR", dir.path())
                .env("PEER_SHARED", "1")
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped());
            cmd.spawn().unwrap()
        })
        .collect();
    let mut peers: Vec<_> = peers
        .into_iter()
        .map(|mut child| {
            use std::io::BufRead;
            let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
            let mut line = String::new();
            out.read_line(&mut line).unwrap();
            (child, line.trim().to_owned())
        })
        .collect();
    for (child, line) in &peers {
        assert_eq!(*line, format!("WON {}", child.id()), "every instance gets a slot");
    }
    let listed = slots(&dir, &name);
    assert_eq!(listed.iter().map(|s| s.0).collect::<Vec<_>>(), (0..50).collect::<Vec<_>>());
    let pids: BTreeSet<u32> = listed.iter().map(|s| s.1).collect();
    assert_eq!(pids, peers.iter().map(|(c, _)| c.id()).collect());
    // Each is reachable: 50 clients connecting one by one reach 50 different instances.
    let mut reached = BTreeSet::new();
    let mut clients = Vec::new();
    for _ in 0..50 {
        let mut c = dir.client(&name).connect().unwrap();
        reached.insert(pid_of(&mut c).unwrap());
        clients.push(c);
    }
    assert_eq!(reached, pids, "least connections first: one client each");
    drop(clients);
    for (child, _) in &mut peers {
        drop(child.stdin.take());
    }
    for (child, _) in &mut peers {
        assert!(crate::common::wait_timeout(child, Duration::from_secs(20)).unwrap().success());
    }
    assert!(slots(&dir, &name).is_empty());
}

#[test]
fn a_crashed_instance_is_skipped_at_once_and_its_slot_reclaimed() {
    let _w = watchdog(Duration::from_secs(60));
    let dir = TempDir::new("crash");
    let name = unique("CRASH");
    let a = instance(&dir, "serve", &name);
    let b = instance(&dir, "serve", &name);
    let (a_pid, b_pid) = (a.pid, b.pid);
    a.kill9();
    // Its files are still there, but nobody holds its lock: never picked.
    assert!(dir.path().join(format!("{name}@0.sock")).exists());
    for _ in 0..20 {
        let mut c = dir.client(&name).connect().unwrap();
        assert_eq!(pid_of(&mut c).unwrap(), b_pid);
    }
    // A new instance takes the crashed one's slot.
    let c = instance(&dir, "serve-tokio", &name);
    assert_eq!(slots(&dir, &name), [(0, c.pid), (1, b_pid)]);
    assert_ne!(c.pid, a_pid);
    drop((b, c));
}

#[test]
fn a_new_instance_gets_work_from_callers_already_connected() {
    let _w = watchdog(Duration::from_secs(60));
    let dir = TempDir::new("grow");
    let name = unique("GROW");
    let a = instance(&dir, "serve", &name);
    let mut clients: Vec<_> = (0..4).map(|_| dir.client(&name).connect().unwrap()).collect();
    for c in &mut clients {
        assert_eq!(pid_of(c).unwrap(), a.pid);
    }
    let b = instance(&dir, "serve", &name);
    // The blocking clients look again about once a second: two of the four move.
    let moved = eventually(Duration::from_secs(15), || {
        let on_b = clients.iter_mut().map(|c| pid_of(c).unwrap()).filter(|&p| p == b.pid).count();
        std::thread::sleep(Duration::from_millis(50));
        (on_b == 2).then_some(())
    });
    assert!(moved.is_some(), "half of the callers move to the new instance");

    // The async client keeps a connection to each instance and spreads its requests.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let client = microcs::tokio::Client::builder(&name).runtime_dir(dir.path()).connect().await.unwrap();
        let both = eventually_async(Duration::from_secs(10), || async {
            let _ = calls_at_once(&client, 64, "echo_after", b"5:x").await;
            let pids = calls_at_once(&client, 32, "pid", b"").await;
            let set: BTreeSet<_> = pids.into_iter().map(|p| String::from_utf8(p.unwrap()).unwrap()).collect();
            (set.len() == 2).then_some(())
        })
        .await;
        assert!(both.is_some(), "the async client reaches both instances");
    });
    drop((a, b));
}

/// `n` calls of `method` at once, each from its own task.
async fn calls_at_once(
    client: &microcs::tokio::Client,
    n: usize,
    method: &'static str,
    payload: &'static [u8],
) -> Vec<microcs::Result<Vec<u8>>> {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let c = client.clone();
            tokio::spawn(async move { c.call(method, payload).await })
        })
        .collect();
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

async fn eventually_async<T, Fut: std::future::Future<Output = Option<T>>>(
    limit: Duration,
    mut f: impl FnMut() -> Fut,
) -> Option<T> {
    let t0 = Instant::now();
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if t0.elapsed() > limit {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn killing_one_of_three_instances_under_load_fails_only_its_calls_in_flight() {
    let _w = watchdog(Duration::from_secs(90));
    let dir = TempDir::new("kill3");
    let name = unique("KILL3");
    let peers: Vec<_> = ["serve", "serve-tokio", "serve"].iter().map(|m| instance(&dir, m, &name)).collect();
    let victim_pid = peers[1].pid;
    let stop = Arc::new(AtomicBool::new(false));
    let killed_at = Arc::new(AtomicU64::new(0)); // calls started after this count
    let t0 = Instant::now();
    // Connected one after the other, so that each instance has two of the six (least
    // connections first).
    let clients: Vec<_> =
        (0..6).map(|_| dir.client(&name).timeout(Duration::from_secs(10)).connect().unwrap()).collect();
    let callers: Vec<_> = clients
        .into_iter()
        .map(|mut client| {
            let (stop, killed_at) = (stop.clone(), killed_at.clone());
            std::thread::spawn(move || {
                let (mut ok, mut failed_in_flight, mut failed_later) = (0u32, 0u32, Vec::new());
                while !stop.load(Ordering::Relaxed) {
                    let started = t0.elapsed().as_micros() as u64;
                    match client.call("echo_after", b"3:x") {
                        Ok(r) => {
                            assert_eq!(r, b"3:x");
                            ok += 1;
                        }
                        Err(e) => {
                            let k = killed_at.load(Ordering::SeqCst);
                            if k != 0 && started > k + 200_000 {
                                failed_later.push(e.to_string());
                            } else {
                                // In flight on the killed instance: the usual error, saying
                                // it may have run.
                                assert!(e.may_have_run(), "{e}");
                                assert_eq!(e.kind(), ErrorKind::Closed, "{e}");
                                failed_in_flight += 1;
                            }
                        }
                    }
                }
                (ok, failed_in_flight, failed_later)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    killed_at.store(t0.elapsed().as_micros() as u64, Ordering::SeqCst);
    let mut peers = peers;
    peers.remove(1).kill9();
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::Relaxed);
    let mut failed = 0;
    for c in callers {
        let (ok, in_flight, later) = c.join().unwrap();
        assert!(ok > 10, "each caller made progress: {ok}");
        assert!(later.is_empty(), "calls after the kill all succeed: {later:?}");
        assert!(in_flight <= 1, "at most the one call in flight fails: {in_flight}");
        failed += in_flight;
    }
    assert!(failed >= 1, "the callers on the killed instance saw it go");
    let live: Vec<u32> = slots(&dir, &name).iter().map(|s| s.1).collect();
    assert!(!live.contains(&victim_pid), "{live:?}");
    drop(peers);
}

/// Another user's process can neither join a name as an instance in this user's runtime
/// directory, nor call its instances unless they allow that user.
#[test]
fn instances_of_different_users_never_mix() {
    let _w = watchdog(Duration::from_secs(60));
    if rustix::process::geteuid().as_raw() != 0 || Command::new("setpriv").arg("--version").output().is_err()
    {
        eprintln!("skipped: needs root and setpriv to act as another user");
        return;
    }
    let dir = TempDir::new("users");
    let name = unique("USERS");
    let mine = instance(&dir, "serve", &name);
    let allowing = dir
        .server(&name)
        .shared()
        .allow_uid(65534)
        .bind()
        .unwrap()
        .spawn(|r: Request| Ok::<_, RemoteError>(format!("hello uid {}", r.peer().uid)))
        .unwrap();
    // Let the other user read the directory and reach the sockets, so only the library's own
    // checks stand.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    for slot in 0..2 {
        let sock = dir.path().join(format!("{name}@{slot}.sock"));
        std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    let as_nobody = |args: &[&str], env: &[(&str, &str)]| {
        let mut cmd = Command::new("setpriv");
        cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", PEER]).args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    };
    let d = dir.path().to_str().unwrap();
    let join = as_nobody(&["serve", &name], &[("PEER_SHARED", "1"), ("MICROCS_RUNTIME_DIR", d)]);
    let calls: Vec<_> = (0..8).map(|_| as_nobody(&["call-dir", &name, d, "hi"], &[])).collect();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();

    let stderr = String::from_utf8_lossy(&join.stderr);
    assert_eq!(join.status.code(), Some(1), "{stderr}");
    assert!(stderr.starts_with("PermissionDenied") && stderr.contains("another user"), "{stderr}");
    // Each call reaches one of the two instances (no load to read: their lock files are
    // private): the allowing one answers, the other refuses this user.
    let mut seen = BTreeSet::new();
    for out in &calls {
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        if out.status.success() {
            assert_eq!(stdout.trim(), "hello uid 65534");
            seen.insert("served");
        } else {
            assert!(stderr.starts_with("PermissionDenied") && stderr.contains("user 65534"), "{stderr}");
            seen.insert("refused");
        }
    }
    assert!(seen.contains("served"), "{seen:?}");
    assert_eq!(slots(&dir, &name).len(), 2, "nobody joined");
    drop(mine);
    allowing.shutdown();
}

/// A request that provably did not run (its connection's instance died while the client was
/// idle) is sent again, once, to another instance: the caller sees no error, and it ran once.
#[test]
fn an_idle_client_of_a_killed_instance_is_answered_by_another_without_an_error() {
    let _w = watchdog(Duration::from_secs(60));
    let dir = TempDir::new("resend");
    let name = unique("RESEND");
    let log = dir.path().join("ran.log");
    let env = [("PEER_SHARED", "1"), ("PEER_LOG", log.to_str().unwrap())];
    let a = PeerProcess::serve_mode(dir.path(), "serve", &name, &env);
    let b = PeerProcess::serve_mode(dir.path(), "serve-tokio", &name, &env);
    let mut clients: Vec<_> = (0..4).map(|_| dir.client(&name).connect().unwrap()).collect();
    let on: Vec<u32> = clients.iter_mut().map(|c| pid_of(c).unwrap()).collect();
    assert!(on.contains(&a.pid) && on.contains(&b.pid), "{on:?}");
    a.kill9();
    for (i, c) in clients.iter_mut().enumerate() {
        let what = format!("call {i}");
        assert_eq!(
            c.call("record", what.as_bytes()).unwrap(),
            what.as_bytes(),
            "client {i} (was on {})",
            on[i]
        );
        assert_eq!(pid_of(c).unwrap(), b.pid);
    }
    let ran = std::fs::read_to_string(&log).unwrap();
    let mut lines: Vec<&str> = ran.lines().collect();
    lines.sort_unstable();
    assert_eq!(lines, ["call 0", "call 1", "call 2", "call 3"], "each ran exactly once");
    drop(b);
}

/// Both clients report the socket of the instance they are connected to (`<name>@<slot>.sock`),
/// not the name's own socket, which does not exist while instances serve it; and follow when
/// they move to another instance.
#[test]
fn clients_report_the_socket_of_the_instance_they_reached() {
    let _w = watchdog(Duration::from_secs(60));
    let dir = TempDir::new("sockpath");
    let name = unique("SOCKPATH");
    let a = instance(&dir, "serve", &name);
    let b = instance(&dir, "serve-tokio", &name);
    let listed = slots(&dir, &name);
    let socket_of = |pid: u32| {
        let slot = listed.iter().find(|s| s.1 == pid).expect("listed").0;
        dir.path().join(format!("{name}@{slot}.sock"))
    };
    let mut blocking = dir.client(&name).connect().unwrap();
    let first = pid_of(&mut blocking).unwrap();
    assert_eq!(blocking.socket_path(), socket_of(first));
    assert!(blocking.socket_path().exists());

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let client = microcs::tokio::Client::builder(&name).runtime_dir(dir.path()).connect().await.unwrap();
        // The other instance (the blocking client holds one connection to the first).
        let pid = client.server_pid().unwrap();
        assert_ne!(pid, first);
        assert_eq!(client.socket_path(), socket_of(pid));
        // That instance killed: the client goes on with the other, and says so.
        let (victim, survivor) = if pid == a.pid { (a, b) } else { (b, a) };
        victim.kill9();
        let moved = eventually_async(Duration::from_secs(15), || async {
            let Ok(answered) = client.call("pid", b"").await else { return None };
            let on = String::from_utf8(answered).unwrap();
            (on == survivor.pid.to_string()
                && client.server_pid() == Some(survivor.pid)
                && client.socket_path() == socket_of(survivor.pid))
            .then_some(())
        })
        .await;
        assert!(moved.is_some(), "now on {:?} at {}", client.server_pid(), client.socket_path().display());
        drop(survivor);
    });

    // An exclusive server: both report the name's own socket.
    let solo = unique("SOLO");
    let h =
        dir.server(&solo).bind().unwrap().spawn(|r: Request| Ok::<_, RemoteError>(r.into_payload())).unwrap();
    let own = dir.path().join(format!("{solo}.sock"));
    assert_eq!(dir.client(&solo).connect().unwrap().socket_path(), own);
    let path = rt.block_on(async {
        let c = microcs::tokio::Client::builder(&solo).runtime_dir(dir.path()).connect().await.unwrap();
        c.socket_path()
    });
    assert_eq!(path, own);
    h.shutdown();
}
