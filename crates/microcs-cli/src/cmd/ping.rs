//! `microcs ping NAME`: round trips to a service's built-in `$ping`, like ping(8).

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use microcs::nats::Transport;
use serde::Serialize;

use crate::cli::PingArgs;
use crate::error::{CliError, CliResult};
use crate::net::Net;
use crate::output::{Ctx, print_json, shm};
use crate::signals;

/// One ping in `microcs ping --json`.
#[derive(Debug, Clone, Serialize)]
pub struct Reply {
    /// Sequence number, from 1.
    pub seq: u64,
    /// Round-trip time in milliseconds; null when the ping failed.
    pub time_ms: Option<f64>,
    /// Why the ping failed; null when it succeeded.
    pub error: Option<String>,
}

/// The summary of a run of pings (`microcs ping --json`).
#[derive(Debug, Serialize)]
pub struct Summary {
    /// Service name.
    pub name: String,
    /// Server pid, from the handshake (null over NATS, where any instance may answer).
    pub pid: Option<u32>,
    /// Where the pings went: `"local"` or `"nats"` (the last one's way).
    pub via: &'static str,
    /// Pings sent.
    pub sent: u64,
    /// Replies received.
    pub received: u64,
    /// Percentage of pings without a reply.
    pub loss_pct: f64,
    /// Wall time of the whole run, milliseconds.
    pub time_ms: f64,
    /// Fastest round trip, milliseconds (null with no replies).
    pub min_ms: Option<f64>,
    /// Mean round trip, milliseconds.
    pub avg_ms: Option<f64>,
    /// Slowest round trip, milliseconds.
    pub max_ms: Option<f64>,
    /// Mean deviation of the round trips (standard deviation, as ping(8) computes it), milliseconds.
    pub mdev_ms: Option<f64>,
    /// Every ping, in order.
    pub replies: Vec<Reply>,
}

/// Pings `client` `count` times (0 = until `stop` is set), `interval` apart, calling `each` after
/// every ping.
pub fn ping_loop(
    client: &mut microcs::Client,
    count: u64,
    interval: Duration,
    stop: &AtomicBool,
    mut each: impl FnMut(&Reply) -> CliResult,
) -> CliResult<Summary> {
    let t0 = Instant::now();
    let mut replies = Vec::new();
    let mut seq = 0;
    while count == 0 || seq < count {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        seq += 1;
        let sent_at = Instant::now();
        let reply = match client.ping() {
            Ok(_) => Reply { seq, time_ms: Some(ms(sent_at.elapsed())), error: None },
            Err(e) => Reply { seq, time_ms: None, error: Some(e.to_string()) },
        };
        each(&reply)?;
        replies.push(reply);
        if count != 0 && seq == count {
            break;
        }
        // Send every `interval`, counted from the previous send, like ping(8); wake for Ctrl-C.
        let next = sent_at + interval;
        while !stop.load(Ordering::SeqCst) {
            let left = next.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            std::thread::sleep(left.min(Duration::from_millis(50)));
        }
    }
    let times: Vec<f64> = replies.iter().filter_map(|r| r.time_ms).collect();
    let n = times.len() as f64;
    let (min, avg, max, mdev) = if times.is_empty() {
        (None, None, None, None)
    } else {
        let avg = times.iter().sum::<f64>() / n;
        let var = (times.iter().map(|t| t * t).sum::<f64>() / n - avg * avg).max(0.0);
        (
            Some(times.iter().copied().fold(f64::INFINITY, f64::min)),
            Some(avg),
            Some(times.iter().copied().fold(0.0, f64::max)),
            Some(var.sqrt()),
        )
    };
    let sent = replies.len() as u64;
    let received = times.len() as u64;
    Ok(Summary {
        name: client.name().to_string(),
        pid: client.server_pid(),
        via: client.via().as_str(),
        sent,
        received,
        loss_pct: if sent == 0 { 0.0 } else { 100.0 * (sent - received) as f64 / sent as f64 },
        time_ms: ms(t0.elapsed()),
        min_ms: min,
        avg_ms: avg,
        max_ms: max,
        mdev_ms: mdev,
        replies,
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The per-reply line.
pub fn reply_line(name: &str, r: &Reply) -> String {
    match (&r.time_ms, &r.error) {
        (Some(t), _) => format!("reply from {name}: seq={} time={t:.3} ms", r.seq),
        (None, Some(e)) => format!("seq={}: {e}", r.seq),
        (None, None) => format!("seq={}: no reply", r.seq),
    }
}

/// The two summary lines, as ping(8) prints them.
pub fn summary_text(s: &Summary) -> String {
    let mut out = format!(
        "--- {} ping statistics ---\n{} pings sent, {} replies, {:.0}% loss, time {:.0} ms\n",
        s.name, s.sent, s.received, s.loss_pct, s.time_ms
    );
    if let (Some(min), Some(avg), Some(max), Some(mdev)) = (s.min_ms, s.avg_ms, s.max_ms, s.mdev_ms) {
        out.push_str(&format!("rtt min/avg/max/mdev = {min:.3}/{avg:.3}/{max:.3}/{mdev:.3} ms\n"));
    }
    out
}

/// Runs `microcs ping`.
pub fn run(ctx: &Ctx, args: PingArgs) -> CliResult {
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        // First Ctrl-C: stop and print the summary (as ping does); second: leave at once.
        signals::on_terminate(move |_, n| {
            if n > 1 {
                std::process::exit(130);
            }
            stop.store(true, Ordering::SeqCst);
        })?;
    }
    let net = Net::from_args(&args.net)?;
    let mut client = shm(ctx.client(&args.name, args.timeout, &net), args.shm).connect()?;
    let human = !ctx.json;
    if human && !args.quiet {
        let mut out = std::io::stdout().lock();
        match (client.via(), client.nats_url()) {
            (Transport::Nats, Some(url)) => writeln!(out, "PING {} via NATS at {url}", args.name)?,
            _ => {
                let pid = client.server_pid().map_or_else(String::new, |p| format!(" (pid {p})"));
                let over = if client.transport() == Some("shm") { " over shared memory" } else { "" };
                writeln!(out, "PING {}{pid} at {}{over}", args.name, client.socket_path().display())?;
            }
        }
    }
    let name = args.name.clone();
    let summary = ping_loop(&mut client, args.count, args.interval, &stop, |r| {
        if human && !args.quiet {
            let mut out = std::io::stdout().lock();
            writeln!(out, "{}", reply_line(&name, r))?;
            out.flush()?;
        }
        Ok(())
    })?;
    if ctx.json {
        print_json(&summary)?;
    } else {
        let mut out = std::io::stdout().lock();
        if !args.quiet {
            writeln!(out)?;
        }
        write!(out, "{}", summary_text(&summary))?;
        out.flush()?;
    }
    if summary.received == 0 && summary.sent > 0 {
        let last = summary.replies.last().and_then(|r| r.error.clone()).unwrap_or_default();
        return Err(CliError::request(format!("no reply from '{}': {last}", args.name)));
    }
    Ok(())
}
