//! How long a wait spins before it parks (PROTOCOL.md § 18.5): an adaptive budget per kind of
//! wait, which never stays at zero for good.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// Longest spin before parking.
pub(crate) const MAX_SPIN: Duration = Duration::from_micros(50);
/// The spin a connection starts with, and the one a probe tries.
const FIRST_SPIN: Duration = Duration::from_micros(20);
/// A budget halved below this becomes 0 (no spin).
const MIN_SPIN_NS: u32 = 1_000;
/// At 0, one wait in this many spins [`FIRST_SPIN`] anyway (a probe).
pub(crate) const PROBE_EVERY: u32 = 16;

/// The spin budget of one kind of wait (for data, or for room) on one connection.
///
/// Doubled (up to [`MAX_SPIN`]) when a wait ended within the spin or shortly after parking,
/// halved when it did not, 0 below 1 µs. At 0, one wait in [`PROBE_EVERY`] spins anyway:
/// whether a parked wait "ended shortly after parking" includes the wake-up itself, which on a
/// VM can take as long as the longest spin, so without probes a run of slow answers (a large
/// reply being made) could switch spinning off for good, and every later hand-off of a ring's
/// worth of a large frame would pay a park and a wake-up.
#[derive(Debug)]
pub(crate) struct SpinBudget {
    ns: AtomicU32,
    /// Waits that found the budget at 0, for the probes.
    idle: AtomicU32,
}

impl Default for SpinBudget {
    fn default() -> Self {
        SpinBudget { ns: AtomicU32::new(FIRST_SPIN.as_nanos() as u32), idle: AtomicU32::new(0) }
    }
}

impl SpinBudget {
    /// How long this wait spins (`None`: it parks at once).
    pub(crate) fn next(&self) -> Option<Duration> {
        match self.ns.load(Ordering::Relaxed) {
            0 => {
                let n = self.idle.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
                (n % PROBE_EVERY == 0).then_some(FIRST_SPIN)
            }
            ns => Some(Duration::from_nanos(u64::from(ns))),
        }
    }

    /// Spin longer next time (`true`: the wait ended within the longest spin), or shorter.
    pub(crate) fn adapt(&self, longer: bool) {
        let now = self.ns.load(Ordering::Relaxed);
        let next = match (longer, now) {
            // A probe (or a quick wake-up) caught it: spinning pays again.
            (true, 0) => FIRST_SPIN.as_nanos() as u32,
            (true, _) => now.saturating_mul(2).min(MAX_SPIN.as_nanos() as u32),
            (false, _) if now / 2 < MIN_SPIN_NS => 0,
            (false, _) => now / 2,
        };
        if next != now {
            self.ns.store(next, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn misses_halve_the_budget_to_zero_and_hits_double_it_to_the_cap() {
        let b = SpinBudget::default();
        assert_eq!(b.next(), Some(FIRST_SPIN));
        let mut spins = Vec::new();
        for _ in 0..6 {
            b.adapt(false);
            spins.push(b.ns.load(Ordering::Relaxed));
        }
        assert_eq!(spins, [10_000, 5_000, 2_500, 1_250, 0, 0]);
        b.adapt(true);
        assert_eq!(b.ns.load(Ordering::Relaxed), 20_000);
        b.adapt(true);
        b.adapt(true);
        assert_eq!(b.next(), Some(MAX_SPIN));
    }

    #[test]
    fn at_zero_one_wait_in_sixteen_probes_and_a_caught_probe_brings_spinning_back() {
        let b = SpinBudget::default();
        while b.ns.load(Ordering::Relaxed) > 0 {
            b.adapt(false);
        }
        let budgets: Vec<_> = (0..3 * PROBE_EVERY).map(|_| b.next()).collect();
        let probes: Vec<_> =
            budgets.iter().enumerate().filter(|(_, s)| s.is_some()).map(|(i, _)| i).collect();
        assert_eq!(probes, [15, 31, 47]);
        assert!(budgets.iter().flatten().all(|&s| s == FIRST_SPIN));
        // A probe that missed leaves it at 0; one that caught it starts spinning again.
        b.adapt(false);
        assert_eq!(b.next(), None);
        b.adapt(true);
        assert_eq!(b.next(), Some(FIRST_SPIN));
    }
}
