//! systemd socket activation without systemd: the test binds the name's socket, as a `.socket`
//! unit would, and starts `microcs-peer` through a tiny `sh` wrapper that moves the socket to
//! descriptor 3 and sets `LISTEN_PID` to its own pid (which `exec` keeps) and `LISTEN_FDS=1`,
//! as systemd does. The server must serve on that socket (same inode, nothing bound anew), keep
//! it when it stops, refuse what is not a listening Unix stream socket at the name's path, and
//! ignore variables meant for another process.

use std::io::{BufRead, BufReader, Read};
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::common::{PEER, TempDir, eventually, unique, watchdog};

/// The wrapper: the socket comes in as stdin, goes to fd 3; stdin becomes /dev/null; then the
/// variables, and `exec` keeps the pid, so `$$` is the server's. `$LP` overrides LISTEN_PID.
const WRAPPER: &str =
    r#"exec 3<&0 0</dev/null; LISTEN_PID=${LP:-$$} LISTEN_FDS=1 LISTEN_FDNAMES=microcs exec "$0" "$1" "$2""#;

/// A server started as systemd would start it: `fd3` as descriptor 3.
struct Activated {
    child: Child,
    first_line: String,
}

impl Activated {
    fn start(
        dir: &TempDir,
        mode: &str,
        name: &str,
        fd3: impl Into<OwnedFd>,
        env: &[(&str, &str)],
    ) -> Activated {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", WRAPPER, PEER, mode, name])
            .env("MICROCS_RUNTIME_DIR", dir.path())
            .env("PEER_SOCKET_ACTIVATION", "1")
            .env("PEER_FOREVER", "1")
            .env_remove("MICROCS_IDLE_TIMEOUT")
            .stdin(Stdio::from(fd3.into()))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn the wrapper");
        let mut first_line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut first_line).unwrap();
        Activated { child, first_line: first_line.trim().to_owned() }
    }

    fn ready(&self) -> bool {
        self.first_line == format!("READY {}", self.child.id())
    }

    /// Waits for it to exit (it failed to start): its stderr.
    fn failure(mut self) -> String {
        let status = crate::common::wait_timeout(&mut self.child, Duration::from_secs(20)).expect("exits");
        assert!(!status.success(), "it should have failed");
        let mut err = String::new();
        self.child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
        err
    }
}

impl Drop for Activated {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn inode(path: &Path) -> u64 {
    std::fs::symlink_metadata(path).expect("the socket file").ino()
}

/// The socket a `.socket` unit would bind: the name's path in the runtime directory.
fn bind(dir: &TempDir, name: &str) -> (UnixListener, std::path::PathBuf) {
    let path = dir.path().join(format!("{name}.sock"));
    (UnixListener::bind(&path).unwrap(), path)
}

fn call(dir: &TempDir, name: &str, method: &str, payload: &str) -> String {
    let mut c = dir.client(name).timeout(Duration::from_secs(10)).activate(false).connect().unwrap();
    String::from_utf8(c.call(method, payload.as_bytes()).unwrap()).unwrap()
}

fn serves_on_the_passed_socket(mode: &str) {
    let _w = watchdog(Duration::from_secs(60));
    let dir = TempDir::new("sockact");
    let name = unique("SA");
    let (listener, path) = bind(&dir, &name);
    let ino = inode(&path);
    let server = Activated::start(&dir, mode, &name, listener.try_clone().unwrap(), &[]);
    assert!(server.ready(), "{}", server.first_line);
    assert_eq!(call(&dir, &name, "pid", ""), server.child.id().to_string());
    let mut c = dir.client(&name).activate(false).connect().unwrap();
    assert_eq!(c.request(b"hello").unwrap(), b"hello");
    // Served on the socket the test bound: the file is the same one.
    assert_eq!(inode(&path), ino, "the server bound a socket of its own");
    // Registered as usual: listed, with its pid.
    let listed = microcs::list_in(dir.path()).unwrap();
    assert!(listed.iter().any(|s| s.name.as_str() == name && s.pid == server.child.id()), "{listed:?}");
}

#[test]
fn a_blocking_server_serves_on_the_socket_it_is_given() {
    serves_on_the_passed_socket("serve");
}

#[cfg(feature = "tokio")]
#[test]
fn an_async_server_serves_on_the_socket_it_is_given() {
    serves_on_the_passed_socket("serve-tokio");
}

#[test]
fn the_variables_are_removed_and_the_socket_is_not_inherited() {
    let _w = watchdog(Duration::from_secs(60));
    let dir = TempDir::new("sockenv");
    let name = unique("SAENV");
    let (listener, _path) = bind(&dir, &name);
    let server = Activated::start(&dir, "serve", &name, listener, &[]);
    assert!(server.ready(), "{}", server.first_line);
    for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        assert_eq!(call(&dir, &name, "env", var), "unset", "{var} is still set for children to see");
    }
    // Descriptor 3 is close-on-exec now (O_CLOEXEC is 02000000 in fdinfo's octal flags).
    let info = std::fs::read_to_string(format!("/proc/{}/fdinfo/3", server.child.id())).unwrap();
    let flags = info.lines().find_map(|l| l.strip_prefix("flags:")).unwrap().trim();
    let flags = u32::from_str_radix(flags, 8).unwrap();
    assert_ne!(flags & 0o2000000, 0, "fd 3 would be inherited by children: {info}");
}

#[test]
fn the_socket_stays_when_the_server_stops_and_the_next_start_answers_waiting_callers() {
    let _w = watchdog(Duration::from_secs(90));
    let dir = TempDir::new("sockidle");
    let name = unique("SAIDLE");
    let (listener, path) = bind(&dir, &name);
    let ino = inode(&path);
    let mut first = Activated::start(
        &dir,
        "serve",
        &name,
        listener.try_clone().unwrap(),
        &[("MICROCS_IDLE_TIMEOUT", "1")],
    );
    assert!(first.ready(), "{}", first.first_line);
    assert_eq!(call(&dir, &name, "pid", ""), first.child.id().to_string());
    let status = crate::common::wait_timeout(&mut first.child, Duration::from_secs(30)).expect("idles out");
    assert!(status.success(), "{status}");
    // Gone from the registry, but the socket is the manager's: still there, the same file.
    assert!(microcs::list_in(dir.path()).unwrap().iter().all(|s| s.name.as_str() != name));
    assert_eq!(inode(&path), ino, "the socket was removed or replaced when the server stopped");
    // A caller now waits in the socket's backlog (as it would while systemd starts the
    // service), and the next start answers it.
    let (d, n) = (dir.path().to_owned(), name.clone());
    let waiting = std::thread::spawn(move || {
        let mut c = microcs::Client::builder(&n)
            .runtime_dir(&d)
            .timeout(Duration::from_secs(20))
            .activate(false)
            .connect()?;
        c.call("pid", b"")
    });
    std::thread::sleep(Duration::from_millis(300));
    let second = Activated::start(&dir, "serve", &name, listener, &[]);
    assert!(second.ready(), "{}", second.first_line);
    let pid = waiting.join().unwrap().expect("the waiting caller is answered");
    assert_eq!(String::from_utf8(pid).unwrap(), second.child.id().to_string());
}

#[test]
fn a_crashed_servers_entry_is_reclaimed_but_the_socket_stays() {
    let _w = watchdog(Duration::from_secs(60));
    let dir = TempDir::new("sockcrash");
    let name = unique("SACRASH");
    let (listener, path) = bind(&dir, &name);
    let ino = inode(&path);
    let mut server = Activated::start(&dir, "serve", &name, listener.try_clone().unwrap(), &[]);
    assert!(server.ready(), "{}", server.first_line);
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    // Listing reclaims the dead owner's lock file, not the manager's socket.
    eventually(Duration::from_secs(10), || {
        microcs::list_in(dir.path()).unwrap().iter().all(|s| s.name.as_str() != name).then_some(())
    })
    .expect("the dead server is not listed");
    assert!(!dir.path().join(format!("{name}.lock")).exists(), "the stale lock file was reclaimed");
    assert_eq!(inode(&path), ino, "reclaiming removed the socket systemd would keep");
    let again = Activated::start(&dir, "serve", &name, listener, &[]);
    assert!(again.ready(), "{}", again.first_line);
    assert_eq!(call(&dir, &name, "pid", ""), again.child.id().to_string());
}

#[test]
fn a_second_activated_server_gets_name_taken_and_leaves_the_first_alone() {
    let _w = watchdog(Duration::from_secs(60));
    let dir = TempDir::new("socktaken");
    let name = unique("SATAKEN");
    let (listener, path) = bind(&dir, &name);
    let ino = inode(&path);
    let first = Activated::start(&dir, "serve", &name, listener.try_clone().unwrap(), &[]);
    assert!(first.ready(), "{}", first.first_line);
    let second = Activated::start(&dir, "serve", &name, listener, &[]);
    let err = second.failure();
    assert!(err.starts_with("NameTaken"), "{err}");
    assert!(err.contains(&first.child.id().to_string()), "names the owner: {err}");
    assert_eq!(call(&dir, &name, "pid", ""), first.child.id().to_string());
    assert_eq!(inode(&path), ino);
}

#[test]
fn variables_of_another_process_are_ignored() {
    let _w = watchdog(Duration::from_secs(60));
    let dir = TempDir::new("sockpid");
    let name = unique("SAPID");
    let (listener, path) = bind(&dir, &name);
    let ino = inode(&path);
    // LISTEN_PID names another process (pid 1): the socket is not for this one, so the
    // server binds its own, as it would when started by hand.
    let server = Activated::start(&dir, "serve", &name, listener, &[("LP", "1")]);
    assert!(server.ready(), "{}", server.first_line);
    assert_ne!(inode(&path), ino, "the socket meant for another process was adopted");
    assert_eq!(call(&dir, &name, "pid", ""), server.child.id().to_string());
    assert_eq!(call(&dir, &name, "env", "LISTEN_PID"), "unset");
}

#[test]
fn what_is_not_a_listening_unix_stream_socket_at_the_names_path_is_refused() {
    let _w = watchdog(Duration::from_secs(60));
    let dir = TempDir::new("sockbad");
    // A regular file.
    let name = unique("SAFILE");
    let file = std::fs::File::create(dir.path().join("not-a-socket")).unwrap();
    let err = Activated::start(&dir, "serve", &name, file, &[]).failure();
    assert!(err.starts_with("InvalidConfig"), "{err}");
    assert!(err.contains("fd 3") && err.contains("not a socket"), "{err}");
    assert!(
        err.contains(&format!("ListenStream={}", dir.path().join(format!("{name}.sock")).display())),
        "{err}"
    );
    // A listening socket bound elsewhere.
    let name = unique("SAELSE");
    let elsewhere = UnixListener::bind(dir.path().join("elsewhere.sock")).unwrap();
    let err = Activated::start(&dir, "serve", &name, elsewhere, &[]).failure();
    assert!(err.starts_with("InvalidConfig"), "{err}");
    assert!(err.contains("elsewhere.sock") && err.contains("ListenStream="), "{err}");
    // A datagram socket at the right path.
    let name = unique("SADGRAM");
    let dgram = UnixDatagram::bind(dir.path().join(format!("{name}.sock"))).unwrap();
    let err = Activated::start(&dir, "serve", &name, dgram, &[]).failure();
    assert!(err.starts_with("InvalidConfig"), "{err}");
    assert!(err.contains("SOCK_DGRAM") && err.contains("not a listening Unix stream socket"), "{err}");
    // Nothing was left holding any of the names.
    assert!(microcs::list_in(dir.path()).unwrap().is_empty());
}
