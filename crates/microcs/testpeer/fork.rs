//! `fork-call` and `fork-tokio`: a client connected, then the process forked, then both processes
//! use it — what a `multiprocessing` pool with a module-level client does.

use std::process::ExitCode;
use std::time::Duration;

unsafe extern "C" {
    /// libc's fork(2) (std has none; the runtime of this peer is libc's anyway).
    fn fork() -> i32;
}

/// Forks; 0 in the child, the child's pid in the parent.
fn fork_now() -> i32 {
    // SAFETY: fork has no preconditions of its own. The child then runs ordinary Rust code:
    // sound because these commands fork before starting any thread of their own, and glibc's
    // fork resets malloc's locks, so a runtime thread the library started (NATS) cannot leave
    // the allocator locked in the child.
    let pid = unsafe { fork() };
    assert!(pid >= 0, "fork failed: {}", std::io::Error::last_os_error());
    pid
}

/// Waits for the child; its exit status (or 128 + signal).
fn wait(child: i32) -> i32 {
    let pid = rustix::process::Pid::from_raw(child).expect("a child pid");
    match rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::empty()) {
        Ok(Some((_, status))) => {
            status.exit_status().or_else(|| status.terminating_signal().map(|s| 128 + s)).unwrap_or(255)
        }
        other => panic!("waitpid: {other:?}"),
    }
}

/// `n` requests of `"<who>-<i>"`, each answered with its own payload.
fn own_replies(
    mut call: impl FnMut(&[u8]) -> microcs::Result<Vec<u8>>,
    who: &str,
    n: usize,
) -> Result<(), String> {
    for i in 0..n {
        let m = format!("{who}-{i}");
        match call(m.as_bytes()) {
            Ok(r) if r == m.as_bytes() => {}
            Ok(r) => {
                return Err(format!("{who}: request {i} got the reply {:?}", String::from_utf8_lossy(&r)));
            }
            Err(e) => return Err(format!("{who}: request {i}: {:?}: {e}", e.kind())),
        }
    }
    Ok(())
}

/// Both processes report on stdout; exit 0 when both got only their own replies.
fn report(who: &str, outcome: Result<(), String>) -> bool {
    match outcome {
        Ok(()) => {
            println!("{who} ok");
            true
        }
        Err(e) => {
            println!("{who} FAILED: {e}");
            false
        }
    }
}

/// `fork-call NAME N`: a blocking client (local, or NATS as the environment says) connects and
/// makes a request; the process forks; parent and child each make N requests with it.
pub fn blocking(name: &str, n: usize) -> ExitCode {
    let mut client = match microcs::Client::builder(name).timeout(Duration::from_secs(5)).connect() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{:?}: {e}", e.kind());
            return ExitCode::from(1);
        }
    };
    if let Err(e) = client.request(b"warm") {
        eprintln!("{:?}: {e}", e.kind());
        return ExitCode::from(1);
    }
    let child = fork_now();
    let who = if child == 0 { "child" } else { "parent" };
    let ok = report(who, own_replies(|m| client.request(m), who, n));
    if child == 0 {
        std::process::exit(if ok { 0 } else { 1 });
    }
    let status = wait(child);
    if ok && status == 0 { ExitCode::SUCCESS } else { ExitCode::from(1) }
}

/// `fork-tokio NAME N`: the async client, connected on a current-thread runtime; after the fork
/// the child's use of it fails at once with `Closed` (its tasks ran on the parent's runtime),
/// a client the child makes works, and the parent's client is unharmed (N requests).
#[cfg(feature = "tokio")]
pub fn tokio(name: &str, n: usize) -> ExitCode {
    let runtime = || tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let rt = runtime();
    let connect = || microcs::tokio::Client::builder(name).timeout(Duration::from_secs(5)).connect();
    let client = match rt.block_on(async {
        let c = connect().await?;
        c.request(b"warm").await.map(|_| c)
    }) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{:?}: {e}", e.kind());
            return ExitCode::from(1);
        }
    };
    let child = fork_now();
    if child == 0 {
        // The parent's runtime is not ours to drive or drop (its I/O driver's epoll instance is
        // shared with the parent); the child makes its own and never drops the old one.
        std::mem::forget(rt);
        let rt = runtime();
        let outcome = rt.block_on(async {
            match client.request(b"child").await {
                Err(e)
                    if e.kind() == microcs::ErrorKind::Closed && e.to_string().contains("after fork()") =>
                {
                    println!("child refused: {e}");
                }
                other => return Err(format!("child: the parent's client gave {other:?}")),
            }
            drop(client); // leaves the parent's connection alone
            let fresh = connect().await.map_err(|e| format!("child: connect: {e}"))?;
            own_replies_async(&fresh, "child", n).await
        });
        std::process::exit(if report("child", outcome) { 0 } else { 1 });
    }
    let ok = report("parent", rt.block_on(own_replies_async(&client, "parent", n)));
    let status = wait(child);
    if ok && status == 0 { ExitCode::SUCCESS } else { ExitCode::from(1) }
}

#[cfg(feature = "tokio")]
async fn own_replies_async(client: &microcs::tokio::Client, who: &str, n: usize) -> Result<(), String> {
    for i in 0..n {
        let m = format!("{who}-{i}");
        match client.request(m.as_bytes()).await {
            Ok(r) if r == m.as_bytes() => {}
            Ok(r) => {
                return Err(format!("{who}: request {i} got the reply {:?}", String::from_utf8_lossy(&r)));
            }
            Err(e) => return Err(format!("{who}: request {i}: {:?}: {e}", e.kind())),
        }
    }
    Ok(())
}
