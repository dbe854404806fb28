//! What the `e2e` bench and its server processes (`benchserver/main.rs`) agree on: the services'
//! names, the largest frame, the stream item, the pinning, and the `READY` handshake.
//! `#[path]`-included by both.

use std::io::{Read, Write};

/// Largest payload used, with room for the frame header.
pub const MAX_FRAME: u32 = 2 << 20;
pub const BLOCKING_NAME: &str = "E2E_BLOCKING";
#[cfg(feature = "tokio")]
pub const TOKIO_NAME: &str = "E2E_TOKIO";
/// The same servers with the system's default send buffer (`send_buffer(0)`), in the same
/// processes.
pub const BLOCKING_KBUF_NAME: &str = "E2E_BLOCKING_KBUF";
#[cfg(feature = "tokio")]
pub const TOKIO_KBUF_NAME: &str = "E2E_TOKIO_KBUF";

/// One 32-byte item of the benchmark's streams.
pub const ITEM: [u8; 32] = [7; 32];

/// Pins the calling thread (and the threads it starts afterwards) to `cpu`.
pub fn pin(cpu: usize) {
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    if let Err(e) = rustix::thread::sched_setaffinity(None, &set) {
        eprintln!("warning: cannot pin to CPU {cpu}: {e}");
    }
}

/// Tells the bench this process is ready (`READY` on stdout), then waits until the bench
/// closes its stdin.
pub fn ready_then_wait_for_stdin() {
    println!("READY");
    let _ = std::io::stdout().flush();
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
}
