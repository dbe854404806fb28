//! The idle timeout: handlers started and ended, and the check an accept loop makes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::Service;

/// Handlers started and ended (two relaxed atomic increments per request): the server is idle
/// while both are equal and unchanged.
#[derive(Debug, Default)]
pub(crate) struct Activity {
    pub started: AtomicU64,
    pub ended: AtomicU64,
}

/// The idle timeout of a server: checked by its accept loop every
/// [`WATCH_PERIOD`](super::WATCH_PERIOD).
#[derive(Debug)]
pub(crate) struct IdleWatch {
    timeout: Duration,
    seen: u64,
    since: std::time::Instant,
}

impl IdleWatch {
    pub(crate) fn new(timeout: Option<Duration>) -> Option<IdleWatch> {
        timeout.map(|timeout| IdleWatch { timeout, seen: u64::MAX, since: std::time::Instant::now() })
    }

    /// True once no handler has started or run for the whole timeout.
    pub(crate) fn expired(&mut self, activity: &Activity) -> bool {
        let started = activity.started.load(Ordering::Relaxed);
        let ended = activity.ended.load(Ordering::Relaxed);
        let now = std::time::Instant::now();
        if started != self.seen || started != ended {
            (self.seen, self.since) = (started, now);
            return false;
        }
        now.duration_since(self.since) >= self.timeout
    }
}

/// Checks the idle timeout, if any; logs and returns true when it has passed.
pub(crate) fn idle_expired<H>(idle: &mut Option<IdleWatch>, service: &Service<H>) -> bool {
    let Some(w) = idle.as_mut() else { return false };
    let expired = w.expired(&service.activity);
    if expired {
        tracing::info!(service = %service.name, idle = ?w.timeout, "no requests for the idle timeout; stopping");
    }
    expired
}
