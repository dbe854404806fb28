//! `microcs bench NAME`: latency percentiles and throughput under load.
//!
//! [`measure`] runs the load and knows nothing of terminals; this module plans the run, draws the
//! progress bar and prints the report.

pub mod measure;

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::Serialize;

use self::measure::{Measurement, Plan, Progress, phase};
use crate::cli::BenchArgs;
use crate::error::{CliError, CliResult};
use crate::net::Net;
use crate::output::{Ctx, byte_rate, count, latency, print, print_json};

/// Latencies in `microcs bench --json`, microseconds.
#[derive(Debug, Serialize)]
pub struct LatencyJson {
    /// Fastest request.
    pub min: f64,
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Slowest request.
    pub max: f64,
}

/// `microcs bench --json`.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Service name.
    pub name: String,
    /// Method called; null for the default handler.
    pub method: Option<String>,
    /// Concurrent clients.
    pub clients: u32,
    /// Payload size of each request, bytes.
    pub payload_bytes: usize,
    /// Measured time, seconds.
    pub duration_s: f64,
    /// Requests that succeeded.
    pub requests: u64,
    /// Requests that failed.
    pub errors: u64,
    /// The first failure's message, or null.
    pub first_error: Option<String>,
    /// Successful requests per second.
    pub throughput_rps: f64,
    /// Payload bytes sent per second.
    pub sent_bytes_per_s: f64,
    /// Reply bytes received per second.
    pub received_bytes_per_s: f64,
    /// Latency of successful requests, microseconds.
    pub latency_us: LatencyJson,
    /// CPUs the clients were pinned to (`--cpus`); null when unpinned.
    pub cpus: Option<Vec<usize>>,
    /// Where the requests went: `"local"`, `"nats"` (or `"local+nats"` when a local instance
    /// started or stopped during the run).
    pub via: &'static str,
    /// What carried the local clients' frames: `"unix"` (the socket), `"shm"` (shared memory),
    /// `"unix+shm"` when clients differed; null when none was connected locally.
    pub transport: Option<&'static str>,
}

impl Report {
    /// Summarises a measurement.
    pub fn new(plan: &Plan, m: &Measurement) -> Report {
        let secs = m.elapsed.as_secs_f64().max(1e-9);
        let us = |ns: u64| (ns as f64 / 1e3 * 1000.0).round() / 1000.0;
        let h = &m.latency;
        Report {
            name: plan.name.clone(),
            method: plan.method.clone(),
            clients: plan.clients,
            payload_bytes: plan.payload.len(),
            duration_s: m.elapsed.as_secs_f64(),
            requests: m.requests,
            errors: m.errors,
            first_error: m.first_error.clone(),
            throughput_rps: m.requests as f64 / secs,
            sent_bytes_per_s: m.bytes_sent as f64 / secs,
            received_bytes_per_s: m.bytes_received as f64 / secs,
            latency_us: LatencyJson {
                min: us(h.min()),
                mean: us(h.mean()),
                p50: us(h.quantile(0.50)),
                p90: us(h.quantile(0.90)),
                p99: us(h.quantile(0.99)),
                p999: us(h.quantile(0.999)),
                max: us(h.max()),
            },
            cpus: (!plan.cpus.is_empty()).then(|| plan.cpus.clone()),
            via: m.via,
            transport: m.transport,
        }
    }

    /// The human report.
    pub fn text(&self) -> String {
        let l = |us: f64| latency(Duration::from_nanos((us * 1e3) as u64));
        let lat = &self.latency_us;
        let mut s = format!(
            "{} {}{}{}: {} client{}, {}-byte payload, {:.2} s\n",
            self.name,
            self.method.as_deref().map_or_else(|| "(default handler)".to_owned(), |m| format!("method {m}")),
            match self.via {
                "local" => "",
                "nats" => " via NATS",
                _ => " via local and NATS",
            },
            match self.transport {
                Some("shm") => " over shared memory",
                Some("unix+shm") => " over shared memory and the socket",
                _ => "",
            },
            self.clients,
            if self.clients == 1 { "" } else { "s" },
            self.payload_bytes,
            self.duration_s,
        );
        s.push_str(&format!("  requests    {} ({} errors)\n", count(self.requests), count(self.errors)));
        s.push_str(&format!(
            "  throughput  {} req/s   {} out, {} in\n",
            count(self.throughput_rps.round() as u64),
            byte_rate(self.sent_bytes_per_s),
            byte_rate(self.received_bytes_per_s)
        ));
        s.push_str(&format!(
            "  latency     p50 {}   p90 {}   p99 {}   p99.9 {}\n",
            l(lat.p50),
            l(lat.p90),
            l(lat.p99),
            l(lat.p999)
        ));
        s.push_str(&format!(
            "              min {}   mean {}   max {}\n",
            l(lat.min),
            l(lat.mean),
            l(lat.max)
        ));
        s
    }
}

/// Builds the plan from the command line.
fn plan(ctx: &Ctx, args: &BenchArgs) -> CliResult<Plan> {
    if args.duration.is_zero() {
        return Err(CliError::local("--duration must be more than 0 (e.g. 5s)"));
    }
    let payload = match &args.payload {
        Some(text) => text.as_bytes().to_vec(),
        None => {
            let size = usize::try_from(args.size).map_err(|_| CliError::local("--size is too large"))?;
            // Printable bytes, so text-only services (and anyone watching) can take it.
            b"0123456789abcdefghijklmnopqrstuvwxyz".iter().copied().cycle().take(size).collect()
        }
    };
    Ok(Plan {
        name: args.name.clone(),
        dir: ctx.dir.clone(),
        net: Net::from_args(&args.net)?,
        method: args.method.clone(),
        payload,
        clients: args.clients,
        duration: args.duration,
        warmup: args.warmup,
        timeout: args.timeout,
        cpus: args.cpus.as_ref().map(|c| c.0.clone()).unwrap_or_default(),
        shm: args.shm.then_some(true),
    })
}

/// Runs `plan`, drawing a progress bar on stderr when `progress_bar` is set.
///
/// # Errors
///
/// As [`measure::run`].
pub fn execute(plan: &Plan, progress_bar: bool) -> CliResult<Measurement> {
    let progress = Progress::default();
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        if progress_bar {
            s.spawn(|| draw_progress(plan, &progress, &done));
        }
        let m = measure::run(plan, &progress);
        done.store(true, Ordering::SeqCst);
        m.map_err(CliError::from)
    })
}

/// Redraws one line on stderr every 100 ms until `done`; clears it at the end.
fn draw_progress(plan: &Plan, progress: &Progress, done: &AtomicBool) {
    const WIDTH: usize = 30;
    let mut err = std::io::stderr();
    while !done.load(Ordering::SeqCst) {
        let line = match (progress.phase.load(Ordering::SeqCst), progress.started.get()) {
            (phase::MEASURING, Some(t0)) => {
                let elapsed = t0.elapsed().min(plan.duration);
                let frac = elapsed.as_secs_f64() / plan.duration.as_secs_f64();
                let filled = ((frac * WIDTH as f64) as usize).min(WIDTH);
                let n = progress.requests.load(Ordering::Relaxed);
                let rate = n as f64 / elapsed.as_secs_f64().max(1e-3);
                let errors = progress.errors.load(Ordering::Relaxed);
                format!(
                    "[{}{}] {:.1}/{:.1} s  {} requests  {} req/s{}",
                    "#".repeat(filled),
                    ".".repeat(WIDTH - filled),
                    elapsed.as_secs_f64(),
                    plan.duration.as_secs_f64(),
                    count(n),
                    count(rate.round() as u64),
                    if errors > 0 { format!("  {} errors", count(errors)) } else { String::new() }
                )
            }
            _ => format!("connecting {} client(s) and warming up...", plan.clients),
        };
        let _ = write!(err, "\r\x1b[2K{line}");
        let _ = err.flush();
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = write!(err, "\r\x1b[2K");
    let _ = err.flush();
}

/// Runs `microcs bench`.
pub fn run(ctx: &Ctx, args: BenchArgs) -> CliResult {
    let plan = plan(ctx, &args)?;
    let bar = !args.no_progress && std::io::stderr().is_terminal();
    let m = execute(&plan, bar)?;
    let report = Report::new(&plan, &m);
    if ctx.json {
        print_json(&report)?;
    } else {
        print(&report.text())?;
    }
    if m.errors > 0 {
        return Err(CliError::request(format!(
            "{} of {} requests failed; the first: {}",
            count(m.errors),
            count(m.errors + m.requests),
            m.first_error.as_deref().unwrap_or("unknown error")
        )));
    }
    Ok(())
}
