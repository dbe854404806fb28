//! `microcs ls`: the running services, with their counters.

use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::cli::LsArgs;
use crate::error::CliResult;
use crate::output::{Ctx, count, print, print_json, table, uptime};

/// One service in `microcs ls --json`.
#[derive(Debug, Serialize)]
pub struct Row {
    /// Service name.
    pub name: String,
    /// Server process id.
    pub pid: u32,
    /// User id the server runs as.
    pub uid: u32,
    /// Start time, RFC 3339 UTC.
    pub started: String,
    /// Seconds since it started.
    pub uptime_s: u64,
    /// Service version.
    pub version: String,
    /// Instance id.
    pub id: String,
    /// Wire protocol version.
    pub protocol_version: u8,
    /// Named methods besides the default handler.
    pub methods: Vec<String>,
    /// Socket path.
    pub socket: String,
    /// Requests handled, all endpoints together (null when `$stats` did not answer).
    pub requests: Option<u64>,
    /// Requests that failed, all endpoints together (null when `$stats` did not answer).
    pub errors: Option<u64>,
}

/// `microcs ls --json`.
#[derive(Debug, Serialize)]
struct LsJson<'a> {
    runtime_dir: String,
    services: &'a [Row],
}

/// The running services in `ctx`'s runtime directory, each asked for its `$stats`.
///
/// # Errors
///
/// When the runtime directory is unsafe or unreadable.
pub fn collect(ctx: &Ctx, timeout: Duration) -> CliResult<Vec<Row>> {
    let now = SystemTime::now();
    let mut rows = Vec::new();
    for svc in microcs::list_in(&ctx.dir)? {
        // A service that is busy, or exits between list and connect, is still listed, with `-`.
        let stats = ctx.client(svc.name.as_str(), timeout).connect().and_then(|mut c| c.stats()).ok();
        let (requests, errors) = match &stats {
            Some(s) => (
                Some(s.endpoints.iter().map(|e| e.num_requests).sum()),
                Some(s.endpoints.iter().map(|e| e.num_errors).sum()),
            ),
            None => (None, None),
        };
        rows.push(Row {
            name: svc.name.to_string(),
            pid: svc.pid,
            uid: svc.uid,
            started: microcs::micro::rfc3339(svc.started),
            uptime_s: now.duration_since(svc.started).unwrap_or_default().as_secs(),
            version: svc.version.clone(),
            id: svc.id.clone(),
            protocol_version: svc.protocol_version,
            methods: svc.methods.clone(),
            socket: svc.socket.display().to_string(),
            requests,
            errors,
        });
    }
    Ok(rows)
}

/// The human table of `microcs ls`.
pub fn render(rows: &[Row]) -> String {
    let opt = |v: Option<u64>| v.map_or_else(|| "-".to_owned(), count);
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.name.clone(),
                r.pid.to_string(),
                uptime(Duration::from_secs(r.uptime_s)),
                opt(r.requests),
                opt(r.errors),
                if r.methods.is_empty() { "-".to_owned() } else { r.methods.join(",") },
            ]
        })
        .collect();
    table(&["NAME", "PID", "UPTIME", "REQUESTS", "ERRORS", "METHODS"], &body)
}

/// Runs `microcs ls`.
pub fn run(ctx: &Ctx, args: LsArgs) -> CliResult {
    let rows = collect(ctx, args.timeout)?;
    if ctx.json {
        return print_json(&LsJson { runtime_dir: ctx.dir.display().to_string(), services: &rows });
    }
    if rows.is_empty() {
        note!("no services running in {} (start one with `microcs serve NAME --echo`)", ctx.dir.display());
        return Ok(());
    }
    print(&render(&rows))
}
