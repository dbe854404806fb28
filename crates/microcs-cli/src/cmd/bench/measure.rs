//! The measurement loop of `microcs bench`, without any output: connect the clients, warm up,
//! run closed-loop requests for the planned duration, merge the latency histograms.
//!
//! Each client runs on a thread of its own, started by [`client_thread`]; anything that must
//! happen on that thread before measuring (e.g. placing it on a CPU) belongs there.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use microcs::nats::Transport;
use microcs::{Client, ErrorKind};

use crate::net::Net;

/// What to measure.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Service name.
    pub name: String,
    /// Runtime directory to find it in.
    pub dir: PathBuf,
    /// How to reach it (local, NATS).
    pub net: Net,
    /// Method to call; `None` for the default handler.
    pub method: Option<String>,
    /// Payload of every request.
    pub payload: Vec<u8>,
    /// Concurrent clients (each its own connection, one request in flight).
    pub clients: u32,
    /// Measured time.
    pub duration: Duration,
    /// Unmeasured requests per client first.
    pub warmup: u64,
    /// Per-request timeout.
    pub timeout: Duration,
    /// CPUs to pin the clients to, round robin (client i on `cpus[i % len]`); empty: unpinned.
    pub cpus: Vec<usize>,
    /// Ask for shared memory (`--shm`); `None`: the library's default (`$MICROCS_SHM`).
    pub shm: Option<bool>,
}

/// Phases of a run, as [`Progress::phase`] reports them.
pub mod phase {
    /// Connecting and warming up.
    pub const WARMUP: u8 = 0;
    /// Measuring.
    pub const MEASURING: u8 = 1;
    /// Finished.
    pub const DONE: u8 = 2;
}

/// Live counters, readable from another thread while the run goes on (for a progress bar).
#[derive(Debug)]
pub struct Progress {
    /// Measured requests completed so far (successful or not).
    pub requests: AtomicU64,
    /// Measured requests that failed so far.
    pub errors: AtomicU64,
    /// One of [`phase`]'s values.
    pub phase: AtomicU8,
    /// When measuring started.
    pub started: OnceLock<Instant>,
}

impl Default for Progress {
    fn default() -> Self {
        Progress {
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            phase: AtomicU8::new(phase::WARMUP),
            started: OnceLock::new(),
        }
    }
}

/// What a run measured.
#[derive(Debug)]
pub struct Measurement {
    /// Requests that succeeded.
    pub requests: u64,
    /// Requests that failed.
    pub errors: u64,
    /// The first failure, if any.
    pub first_error: Option<String>,
    /// Measured wall time.
    pub elapsed: Duration,
    /// Latencies of the successful requests.
    pub latency: Histogram,
    /// Bytes of payload sent by successful requests.
    pub bytes_sent: u64,
    /// Bytes of replies received.
    pub bytes_received: u64,
    /// Where the requests went: `"local"`, `"nats"`, or `"local+nats"` when clients differed.
    pub via: &'static str,
    /// What carried the local clients' frames: `"unix"`, `"shm"`, or `"unix+shm"` when they
    /// differed; `None` when no client was connected locally at the end.
    pub transport: Option<&'static str>,
}

/// Runs `plan`, updating `progress` as it goes.
///
/// # Errors
///
/// When a client cannot connect, or a warm-up request fails (a service that cannot answer the
/// planned request is not worth measuring): the first such error.
pub fn run(plan: &Plan, progress: &Progress) -> Result<Measurement, microcs::Error> {
    let mut clients = Vec::with_capacity(plan.clients as usize);
    for _ in 0..plan.clients {
        let mut builder = Client::builder(&plan.name).runtime_dir(&plan.dir).timeout(plan.timeout);
        if let Some(on) = plan.shm {
            builder = builder.shared_memory(on);
        }
        clients.push(plan.net.apply(builder).connect()?);
    }
    let gate = Gate::default();
    let results: Vec<Result<ClientResult, microcs::Error>> = thread::scope(|s| {
        let handles: Vec<_> = clients
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                let gate = &gate;
                thread::Builder::new()
                    .name(format!("microcs-bench-{i}"))
                    .spawn_scoped(s, move || client_thread(i, c, plan, progress, gate))
            })
            .collect();
        if handles.iter().all(Result::is_ok) {
            // Measure only when every client warmed up well; otherwise the run ends with the
            // warm-up's error at once.
            let go = gate.wait_for(handles.len());
            if go {
                let _ = progress.started.set(Instant::now());
                progress.phase.store(phase::MEASURING, Ordering::SeqCst);
            }
            gate.open(go);
        } else {
            gate.open(false); // release the clients that did start
        }
        handles
            .into_iter()
            .map(|h| match h {
                Ok(h) => h.join().unwrap_or_else(|_| Err(local("a benchmark client thread panicked"))),
                Err(e) => Err(local(&format!("cannot start a benchmark client thread: {e}"))),
            })
            .collect()
    });
    progress.phase.store(phase::DONE, Ordering::SeqCst);
    let elapsed = progress.started.get().map_or(Duration::ZERO, Instant::elapsed);
    let mut m = Measurement {
        requests: 0,
        errors: 0,
        first_error: None,
        elapsed,
        latency: Histogram::new(),
        bytes_sent: 0,
        bytes_received: 0,
        via: "local",
        transport: None,
    };
    let (mut local, mut nats) = (false, false);
    for r in results {
        let r = r?;
        m.transport = match (m.transport, r.transport) {
            (None, t) | (t, None) => t,
            (Some(a), Some(b)) if a == b => Some(a),
            _ => Some("unix+shm"),
        };
        local |= r.via == Transport::Local;
        nats |= r.via == Transport::Nats;
        m.requests += r.ok;
        m.errors += r.errors;
        m.bytes_sent += r.ok * plan.payload.len() as u64;
        m.bytes_received += r.bytes_received;
        m.latency.merge(&r.latency);
        if m.first_error.is_none() {
            m.first_error = r.first_error;
        }
    }
    m.via = match (local, nats) {
        (true, true) => "local+nats",
        (false, true) => "nats",
        _ => "local",
    };
    Ok(m)
}

/// Where the clients wait, warmed up, for the start: the main thread opens it once all arrived.
#[derive(Default)]
struct Gate {
    /// Clients arrived, the decision (`Some(true)`: measure, `Some(false)`: abort), and whether
    /// a client's warm-up failed.
    state: Mutex<(usize, Option<bool>, bool)>,
    cv: Condvar,
}

impl Gate {
    fn lock(&self) -> std::sync::MutexGuard<'_, (usize, Option<bool>, bool)> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Arrives (`warm`: the warm-up went well), then waits for the decision.
    fn arrive_and_wait(&self, warm: bool) -> bool {
        let mut s = self.lock();
        s.0 += 1;
        s.2 |= !warm;
        self.cv.notify_all();
        loop {
            if let Some(go) = s.1 {
                return go;
            }
            s = self.cv.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Waits until `n` clients arrived; true when all warmed up well.
    fn wait_for(&self, n: usize) -> bool {
        let mut s = self.lock();
        while s.0 < n {
            s = self.cv.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        !s.2
    }

    fn open(&self, go: bool) {
        self.lock().1 = Some(go);
        self.cv.notify_all();
    }
}

fn local(msg: &str) -> microcs::Error {
    microcs::Error::new(ErrorKind::Io, msg.to_owned())
}

/// Pins the calling thread to `cpu`.
fn pin(cpu: usize) -> Result<(), microcs::Error> {
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    rustix::thread::sched_setaffinity(None, &set).map_err(|e| {
        local(&format!("cannot pin a client to CPU {cpu} ({e}); list the CPUs this machine has with lscpu"))
    })
}

struct ClientResult {
    ok: u64,
    errors: u64,
    bytes_received: u64,
    first_error: Option<String>,
    latency: Histogram,
    /// Where the client's last request went.
    via: Transport,
    /// What carried the frames at the end (`None`: not connected locally).
    transport: Option<&'static str>,
}

/// One client: warm up, wait for the start, then requests back to back until the time is up.
fn client_thread(
    index: usize,
    mut client: Client,
    plan: &Plan,
    progress: &Progress,
    gate: &Gate,
) -> Result<ClientResult, microcs::Error> {
    // Placed before the first request, so the warm-up already runs where the measurement will.
    let pinned = if plan.cpus.is_empty() { Ok(()) } else { pin(plan.cpus[index % plan.cpus.len()]) };
    if let Err(e) = pinned {
        // Arrive anyway, so the others are not held up; the run then stops with this error.
        gate.arrive_and_wait(false);
        return Err(e);
    }
    let send = |client: &mut Client| match &plan.method {
        Some(m) => client.call(m, &plan.payload),
        None => client.request(&plan.payload),
    };
    let mut warm = Ok(());
    for _ in 0..plan.warmup {
        if let Err(e) = send(&mut client) {
            warm = Err(e);
            break;
        }
    }
    // Arrive even after a failure, so the start is not held up; report it afterwards.
    let go = gate.arrive_and_wait(warm.is_ok());
    warm?;
    if !go {
        return Err(local("the benchmark was aborted before it started"));
    }
    let mut r = ClientResult {
        ok: 0,
        errors: 0,
        bytes_received: 0,
        first_error: None,
        latency: Histogram::new(),
        via: client.via(),
        transport: None,
    };
    let end = Instant::now() + plan.duration;
    loop {
        let t0 = Instant::now();
        if t0 >= end {
            break;
        }
        let outcome = send(&mut client);
        let took = t0.elapsed();
        progress.requests.fetch_add(1, Ordering::Relaxed);
        match outcome {
            Ok(reply) => {
                r.ok += 1;
                r.bytes_received += reply.len() as u64;
                r.latency.record(took.as_nanos().min(u128::from(u64::MAX)) as u64);
            }
            Err(e) => {
                r.errors += 1;
                progress.errors.fetch_add(1, Ordering::Relaxed);
                let gone = e.kind() == ErrorKind::NoService;
                if r.first_error.is_none() {
                    r.first_error = Some(e.to_string());
                }
                if gone {
                    break; // the service is gone: asking again only spins
                }
            }
        }
    }
    r.via = client.via();
    r.transport = client.transport();
    Ok(r)
}

/// Sub-buckets per power of two: values are kept within 1/128 (< 0.8 %) of their true size.
const SUB_BITS: u32 = 7;
const SUB: u64 = 1 << SUB_BITS;
const BUCKETS: usize = ((64 - SUB_BITS as usize) + 1) * SUB as usize;

/// A log-linear histogram of nanosecond latencies (as HdrHistogram, with 7 bits of precision):
/// constant memory however long the run, exact min, max and mean.
#[derive(Debug, Clone)]
pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
    sum: u128,
    min: u64,
    max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram::new()
    }
}

impl Histogram {
    /// An empty histogram.
    pub fn new() -> Histogram {
        Histogram { counts: vec![0; BUCKETS], total: 0, sum: 0, min: u64::MAX, max: 0 }
    }

    fn index(v: u64) -> usize {
        if v < SUB {
            return v as usize;
        }
        let e = 63 - v.leading_zeros(); // >= SUB_BITS
        let shift = e - SUB_BITS;
        let mantissa = v >> shift; // in [SUB, 2*SUB)
        ((shift as u64 + 1) * SUB + (mantissa - SUB)) as usize
    }

    /// The middle of bucket `i`'s range.
    fn value(i: usize) -> u64 {
        let i = i as u64;
        if i < SUB {
            return i;
        }
        let shift = i / SUB - 1;
        let low = (i % SUB + SUB) << shift;
        low + ((1u64 << shift) >> 1)
    }

    /// Adds one value.
    pub fn record(&mut self, v: u64) {
        self.counts[Self::index(v)] += 1;
        self.total += 1;
        self.sum += u128::from(v);
        self.min = self.min.min(v);
        self.max = self.max.max(v);
    }

    /// Adds every value of `other`.
    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.total += other.total;
        self.sum += other.sum;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }

    /// Smallest value (0 when empty).
    pub fn min(&self) -> u64 {
        if self.total == 0 { 0 } else { self.min }
    }

    /// Largest value.
    pub fn max(&self) -> u64 {
        self.max
    }

    /// Mean value.
    pub fn mean(&self) -> u64 {
        if self.total == 0 { 0 } else { (self.sum / u128::from(self.total)) as u64 }
    }

    /// The value at or below which a fraction `q` (0.0 to 1.0) of the values fall.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.total as f64).ceil() as u64).max(1);
        if rank >= self.total {
            return self.max; // the slowest is known exactly
        }
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Self::value(i).clamp(self.min, self.max);
            }
        }
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_round_trip_within_precision() {
        for v in [0u64, 1, 127, 128, 129, 255, 256, 1000, 12_345, 1 << 40, u64::MAX / 3, u64::MAX] {
            let i = Histogram::index(v);
            assert!(i < BUCKETS, "{v}");
            let back = Histogram::value(i);
            let err = back.abs_diff(v) as f64 / (v.max(1)) as f64;
            assert!(err <= 1.0 / 128.0, "{v} -> {back}");
        }
        // Indices grow with values.
        let mut last = 0;
        for v in (0..200_000u64).step_by(7) {
            let i = Histogram::index(v);
            assert!(i >= last);
            last = i;
        }
    }

    #[test]
    fn quantiles_of_a_known_distribution() {
        let mut h = Histogram::new();
        for v in 1..=10_000u64 {
            h.record(v * 1000);
        }
        assert_eq!(h.total, 10_000);
        assert_eq!(h.min(), 1000);
        assert_eq!(h.max(), 10_000_000);
        assert_eq!(h.mean(), 5_000_500);
        for (q, want) in [(0.5, 5_000_000.0), (0.9, 9_000_000.0), (0.99, 9_900_000.0), (0.999, 9_990_000.0)] {
            let got = h.quantile(q) as f64;
            assert!((got - want).abs() / want < 0.01, "q{q}: {got} vs {want}");
        }
        assert_eq!(h.quantile(1.0), 10_000_000);
        let mut g = Histogram::new();
        g.record(5);
        g.merge(&h);
        assert_eq!(g.min(), 5);
        assert_eq!(g.total, 10_001);
        assert_eq!(Histogram::new().quantile(0.5), 0);
    }
}
