//! Test fixtures: temporary runtime directories, the `microcs-peer` process, watchdogs.

#![allow(dead_code)] // each test module uses a different subset

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;

use microcs::proto::{self, Decoded, Header, Hello, HelloAck, Kind};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The test peer binary (crates/microcs/testpeer).
pub const PEER: &str = env!("CARGO_BIN_EXE_microcs-peer");

/// A service name unique to this test process and call.
pub fn unique(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("{tag}_{}_{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

/// A private (0700) runtime directory, removed on drop.
pub struct TempDir {
    pub path: PathBuf,
}

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let path = PathBuf::from(format!(
            "/tmp/mcs-it-{}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed),
            &tag[..tag.len().min(12)]
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700)).unwrap();
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn client(&self, name: &str) -> microcs::ClientBuilder {
        microcs::Client::builder(name).runtime_dir(&self.path)
    }

    pub fn server(&self, name: &str) -> microcs::ServerBuilder {
        microcs::Server::builder(name).runtime_dir(&self.path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::set_permissions(&self.path, std::fs::Permissions::from_mode(0o700));
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Aborts the whole test process if a test runs longer than `limit`: a hang becomes a loud
/// failure instead of a stuck CI job. Disarmed on drop.
pub struct Watchdog {
    disarm: Option<mpsc::Sender<()>>,
}

pub fn watchdog(limit: Duration) -> Watchdog {
    let (tx, rx) = mpsc::channel::<()>();
    let name = std::thread::current().name().unwrap_or("?").to_owned();
    std::thread::spawn(move || {
        if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
            eprintln!("watchdog: test {name} still running after {limit:?}; aborting");
            std::process::abort();
        }
    });
    Watchdog { disarm: Some(tx) }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        if let Some(tx) = self.disarm.take() {
            let _ = tx.send(());
        }
    }
}

/// A `microcs-peer` child process. Killed on drop.
pub struct PeerProcess {
    pub child: Child,
    pub pid: u32,
    pub first_line: String,
    stdout: Option<BufReader<ChildStdout>>,
}

impl PeerProcess {
    /// Starts `microcs-peer <mode> <name>` in `dir` and waits for its first output line.
    pub fn start(dir: &Path, mode: &str, name: &str, env: &[(&str, &str)]) -> PeerProcess {
        PeerProcess::start_wrapped(&[], dir, mode, name, env)
    }

    /// Like [`start`](PeerProcess::start), run through a wrapper command such as
    /// `prlimit --nofile=64:64 --`.
    pub fn start_wrapped(
        wrapper: &[&str],
        dir: &Path,
        mode: &str,
        name: &str,
        env: &[(&str, &str)],
    ) -> PeerProcess {
        let mut cmd = match wrapper.split_first() {
            Some((prog, args)) => {
                let mut c = Command::new(prog);
                c.args(args).arg(PEER);
                c
            }
            None => Command::new(PEER),
        };
        cmd.args([mode, name])
            .env("MICROCS_RUNTIME_DIR", dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn microcs-peer");
        let pid = child.id();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut first_line = String::new();
        stdout.read_line(&mut first_line).unwrap();
        PeerProcess { child, pid, first_line: first_line.trim().to_owned(), stdout: Some(stdout) }
    }

    /// Starts a server and asserts it came up.
    pub fn serve(dir: &Path, name: &str) -> PeerProcess {
        PeerProcess::serve_with(dir, name, &[])
    }

    pub fn serve_with(dir: &Path, name: &str, env: &[(&str, &str)]) -> PeerProcess {
        PeerProcess::serve_mode(dir, "serve", name, env)
    }

    /// Starts a server with `mode` `serve` (blocking) or `serve-tokio` and asserts it came up.
    pub fn serve_mode(dir: &Path, mode: &str, name: &str, env: &[(&str, &str)]) -> PeerProcess {
        let p = PeerProcess::start(dir, mode, name, env);
        assert_eq!(p.first_line, format!("READY {}", p.pid), "peer did not start");
        p
    }

    /// Closes stdin: the peer shuts down gracefully. Returns its exit status.
    pub fn stop(mut self) -> std::process::ExitStatus {
        drop(self.child.stdin.take());
        wait_timeout(&mut self.child, Duration::from_secs(20)).expect("peer did not exit after stdin closed")
    }

    /// The next line the peer prints (after its first), `None` at the end of its output.
    pub fn next_line(&mut self) -> Option<String> {
        let mut line = String::new();
        match self.stdout.as_mut()?.read_line(&mut line) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(line.trim().to_owned()),
        }
    }

    /// Waits for the peer to exit by itself (up to `limit`).
    pub fn exited(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        wait_timeout(&mut self.child, limit)
    }

    /// Stops the process with SIGSTOP until the guard is dropped (SIGCONT), whatever the test
    /// does meanwhile, panics included.
    pub fn sigstop(&self) -> Frozen {
        Frozen::new(self.pid)
    }

    /// SIGKILL, and reap.
    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for PeerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A process stopped with SIGSTOP; continued (SIGCONT) when dropped.
pub struct Frozen {
    pid: rustix::process::Pid,
}

impl Frozen {
    pub fn new(pid: u32) -> Frozen {
        let pid = rustix::process::Pid::from_raw(pid as i32).expect("a pid");
        rustix::process::kill_process(pid, rustix::process::Signal::STOP).expect("SIGSTOP");
        Frozen { pid }
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = rustix::process::kill_process(self.pid, rustix::process::Signal::CONT);
    }
}

/// Waits for a child up to `limit`.
pub fn wait_timeout(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let t0 = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        if t0.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Polls `f` until it returns `Some`, up to `limit`.
pub fn eventually<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let t0 = Instant::now();
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if t0.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Open file descriptors of a process.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// CPU time (user + system) a process has used, from /proc/<pid>/stat, in clock ticks.
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// Resident memory of a process in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// A frame as read back: header, method, payload.
pub type Got = (Header, Vec<u8>, Vec<u8>);

/// A hand-written protocol client, to hold every server flavour to the same wire behaviour.
pub struct Raw {
    pub s: UnixStream,
    buf: Vec<u8>,
}

impl Raw {
    pub fn connect(dir: &TempDir, name: &str) -> Raw {
        Raw::from_stream(UnixStream::connect(dir.path().join(format!("{name}.sock"))).unwrap())
    }

    /// Wraps an accepted or connected stream (reads time out after 10 s).
    pub fn from_stream(s: UnixStream) -> Raw {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Raw { s, buf: Vec::new() }
    }

    /// Connects and shakes hands (checking the answer is a `HelloAck`).
    pub fn hello(dir: &TempDir, name: &str) -> Raw {
        let mut r = Raw::connect(dir, name);
        r.send(&Header::new(Kind::Hello, 0), b"", &Hello { max_payload: 1 << 20, features: 0 }.to_bytes());
        let (h, _, body) = r.read().expect("hello ack");
        assert_eq!(h.kind(), Some(Kind::HelloAck));
        assert!(HelloAck::parse(&body).is_some(), "a well-formed HelloAck");
        r
    }

    pub fn send(&mut self, h: &Header, method: &[u8], payload: &[u8]) {
        let mut b = Vec::new();
        proto::encode(&mut b, h, method, payload);
        self.s.write_all(&b).unwrap();
    }

    pub fn request(&mut self, id: u64, method: &str, payload: &[u8]) {
        self.send(&Header::request(id, 0), method.as_bytes(), payload);
    }

    /// Next frame, or `None` at EOF (or a reset). Panics if nothing comes within 10 s.
    pub fn read(&mut self) -> Option<Got> {
        loop {
            if let Decoded::Frame(f) = proto::decode(&self.buf, u32::MAX - 100).unwrap() {
                let got = (f.header, f.method.to_vec(), f.payload.to_vec());
                let n = f.len;
                self.buf.drain(..n);
                return Some(got);
            }
            let mut chunk = [0u8; 65536];
            match self.s.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
                Err(e) => panic!("no frame within the read timeout: {e}"),
            }
        }
    }

    pub fn expect_reply(&mut self, id: u64) -> Vec<u8> {
        let (h, _, p) = self.read().expect("a reply");
        assert_eq!((h.kind(), h.id), (Some(Kind::Reply), id), "{}", String::from_utf8_lossy(&p));
        p
    }

    pub fn expect_error(&mut self, id: u64, code: u16) -> (u16, String) {
        let (h, _, p) = self.read().expect("an error frame");
        assert_eq!(
            (h.kind(), h.id, h.status),
            (Some(Kind::Error), id, code),
            "{}",
            String::from_utf8_lossy(&p)
        );
        (h.flags, String::from_utf8(p).unwrap())
    }

    pub fn expect_eof(&mut self) {
        assert!(self.read().is_none(), "expected the server to close the connection");
    }
}

/// Bytes the peer sent that wait unread in this socket's receive queue (`FIONREAD`). On a Unix
/// stream socket they are held against the *sender's* send buffer.
pub fn unread_bytes(s: &impl std::os::fd::AsFd) -> usize {
    rustix::io::ioctl_fionread(s).unwrap() as usize
}

/// [`unread_bytes`] once it has stopped growing for 300 ms: all the peer could send.
pub fn settled_unread(s: &impl std::os::fd::AsFd) -> usize {
    let mut last = unread_bytes(s);
    let mut since = Instant::now();
    while since.elapsed() < Duration::from_millis(300) {
        std::thread::sleep(Duration::from_millis(20));
        let now = unread_bytes(s);
        if now != last {
            (last, since) = (now, Instant::now());
        }
    }
    last
}

/// `net.core.wmem_default` and `net.core.wmem_max`: the kernel's default send buffer, and the
/// most `SO_SNDBUF` may ask for (the kernel then counts twice that).
pub fn wmem() -> (usize, usize) {
    let read = |k: &str| {
        let path = format!("/proc/sys/net/core/{k}");
        std::fs::read_to_string(&path).unwrap().trim().parse::<usize>().unwrap()
    };
    (read("wmem_default"), read("wmem_max"))
}

/// Checks how much of a `frame`-byte frame its sender got into the socket without the receiver
/// reading (`queued`), against the sender's `send_buffer` setting (0: the kernel's default).
/// The kernel admits one more buffer-load (up to 64 KiB plus a page) while under its limit, and
/// counts bookkeeping against it, hence the margins. A client that gave up may have added a
/// `Cancel` frame after the whole request.
pub fn assert_send_buffer_held(queued: usize, frame: usize, send_buffer: usize) {
    let (default, max) = wmem();
    let slack = 128 * 1024;
    if send_buffer == 0 {
        assert!(
            queued > 0 && queued < default + slack,
            "{queued} bytes went out with the kernel's {default}-byte buffer"
        );
        return;
    }
    let capacity = 2 * send_buffer.min(max);
    let expected = frame.min(capacity.saturating_sub(slack));
    assert!(
        queued >= expected && queued <= frame + proto::FRAME_OVERHEAD,
        "{queued} of {frame} bytes went out with a {capacity}-byte buffer; expected at least {expected}"
    );
}

/// A stand-in server at `NAME.sock` that answers the handshake and then reads nothing; the
/// handle gives its end of the connection.
pub fn deaf_server(dir: &TempDir, name: &str) -> std::thread::JoinHandle<UnixStream> {
    let listener = std::os::unix::net::UnixListener::bind(dir.path().join(format!("{name}.sock"))).unwrap();
    let name = name.to_owned();
    std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        let mut raw = Raw { s, buf: Vec::new() };
        let (h, _, _) = raw.read().expect("a hello");
        assert_eq!(h.kind(), Some(Kind::Hello));
        let ack = HelloAck {
            max_payload: 16 << 20,
            max_in_flight: 128,
            pid: std::process::id(),
            name,
            ..Default::default()
        };
        raw.send(&Header::new(Kind::HelloAck, 0), b"", &ack.to_bytes());
        raw.s
    })
}

/// A tokio client of `name` that asked for shared memory and got it.
#[cfg(feature = "tokio")]
pub async fn tokio_shm_client(dir: &TempDir, name: &str, timeout: Duration) -> microcs::tokio::Client {
    let c = microcs::tokio::Client::builder(name)
        .runtime_dir(dir.path())
        .shared_memory(true)
        .timeout(timeout)
        .connect()
        .await
        .unwrap();
    assert_eq!(c.transport(), Some("shm"), "{name}: on shared memory");
    c
}

/// Maps `len` bytes of the memfd `fd` shared and read-write, as a test playing a shared-memory
/// peer does (PROTOCOL.md § 18.2); the caller unmaps it with `rustix::mm::munmap`.
pub fn map_shared(fd: &std::os::fd::OwnedFd, len: usize) -> *mut std::ffi::c_void {
    // SAFETY: (test) a new shared mapping at an address the kernel chooses, overlapping nothing
    // Rust knows about; the callers touch it only through raw pointers or a slice they make for
    // its length, while it is mapped.
    unsafe {
        rustix::mm::mmap(
            std::ptr::null_mut(),
            len,
            rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
            rustix::mm::MapFlags::SHARED,
            fd,
            0,
        )
    }
    .unwrap()
}
