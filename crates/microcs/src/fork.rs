//! Which process this is, for clients that must not use a parent's connection after `fork()`;
//! one atomic load per check.
//!
//! A connection belongs to the process that opened it. After `fork()` the child holds copies of
//! the parent's descriptors, and using them would interleave the two processes' frames on one
//! stream: a reply read by the wrong process, both waiting for answers that never come. So each
//! client records [`current`] when it connects and compares it before touching the connection;
//! in another process it leaves the inherited descriptor alone (it may only close its own copy)
//! and reconnects, or says why it cannot.
//!
//! `getpid()` is a system call (glibc no longer caches it), which the blocking round trip would
//! pay on every request. Instead the pid is cached in one anonymous page advised
//! `MADV_WIPEONFORK` (Linux ≥ 4.14): the kernel gives a forked child that page zero-filled, so a
//! zero cache means "a new process: ask the kernel once". Without the advice (an older kernel),
//! every check asks the kernel.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

use rustix::mm::{Advice, MapFlags, ProtFlags};

/// The cached pid, in the wipe-on-fork page; `None` when that page could not be set up.
static CACHE: OnceLock<Option<&'static AtomicU32>> = OnceLock::new();

/// The id of the calling process, fork-aware (see the module docs).
pub(crate) fn current() -> u32 {
    let Some(cache) = CACHE.get_or_init(wipe_on_fork_page) else {
        return std::process::id();
    };
    match cache.load(Ordering::Relaxed) {
        0 => {
            // First use in this process (or the first since a fork zeroed the page). Threads that
            // race here all store the same value.
            let pid = std::process::id();
            cache.store(pid, Ordering::Relaxed);
            pid
        }
        pid => pid,
    }
}

/// True when `owner` (a value of [`current`] recorded earlier) is this process.
pub(crate) fn is_current(owner: u32) -> bool {
    owner == current()
}

/// Maps the page and advises it wipe-on-fork; `None` if either fails.
fn wipe_on_fork_page() -> Option<&'static AtomicU32> {
    const LEN: usize = 4096; // the kernel rounds both calls up to whole pages
    // SAFETY: a new private anonymous mapping at an address the kernel chooses: it overlaps no
    // memory Rust knows about, and the call has no other effect.
    let page = unsafe {
        rustix::mm::mmap_anonymous(
            std::ptr::null_mut(),
            LEN,
            ProtFlags::READ | ProtFlags::WRITE,
            MapFlags::PRIVATE,
        )
    }
    .ok()?;
    // SAFETY: `page..page + LEN` is exactly the mapping made above, which nothing else uses;
    // the advice changes only what a forked child sees of it.
    if unsafe { rustix::mm::madvise(page, LEN, Advice::LinuxWipeOnFork) }.is_err() {
        // SAFETY: the same mapping, never handed out, so nothing refers to it.
        let _ = unsafe { rustix::mm::munmap(page, LEN) };
        return None;
    }
    // SAFETY: the mapping is page aligned (so aligned for an AtomicU32), zero-filled (a valid
    // AtomicU32 holding 0), readable and writable, and never unmapped: it lives as long as the
    // process (and, zeroed, in each forked child), so a `'static` shared reference is sound.
    // It is only ever accessed through this atomic.
    Some(unsafe { &*page.cast::<AtomicU32>() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn current_is_this_process_and_cached() {
        assert_eq!(current(), std::process::id());
        assert_eq!(current(), std::process::id());
        assert!(is_current(current()));
        assert!(!is_current(current() + 1));
        // The page is available on every kernel CI runs (Linux >= 4.14), so the fast path is
        // what gets measured.
        assert!(CACHE.get().is_some_and(|c| c.is_some()), "MADV_WIPEONFORK page not set up");
    }
}
