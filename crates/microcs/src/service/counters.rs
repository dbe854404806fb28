//! What `$stats` counts: requests, errors and time per endpoint, and open connections by
//! transport.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::error::RemoteError;

/// Counters of one endpoint; updated with atomics so handlers on many threads never contend
/// on a lock except when recording an error message.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(super) requests: AtomicU64,
    pub(super) errors: AtomicU64,
    pub(super) processing_ns: AtomicU64,
    pub(super) last_error: Mutex<String>,
}

impl Counters {
    pub(crate) fn record(&self, elapsed: Duration, error: Option<&RemoteError>) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.processing_ns.fetch_add(elapsed.as_nanos() as u64, Ordering::Relaxed);
        if let Some(e) = error {
            self.errors.fetch_add(1, Ordering::Relaxed);
            *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = e.message().to_owned();
        }
    }
}

/// Open local connections (past the handshake) by what carries their frames.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    unix: AtomicUsize,
    shm: AtomicUsize,
}

impl Tally {
    /// Counts one connection on `transport` (`"shm"` or `"unix"`) until the guard is dropped.
    pub(crate) fn open(self: &Arc<Tally>, transport: &'static str) -> Counted {
        let shm = transport == "shm";
        self.counter(shm).fetch_add(1, Ordering::Relaxed);
        Counted { tally: self.clone(), shm }
    }

    pub(super) fn counter(&self, shm: bool) -> &AtomicUsize {
        if shm { &self.shm } else { &self.unix }
    }
}

/// One connection counted in a [`Tally`]; uncounted when dropped.
#[derive(Debug)]
pub(crate) struct Counted {
    tally: Arc<Tally>,
    shm: bool,
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.tally.counter(self.shm).fetch_sub(1, Ordering::Relaxed);
    }
}
