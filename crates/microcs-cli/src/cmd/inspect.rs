//! `microcs info NAME` and `microcs stats NAME`: what a service says about itself.

use std::fmt::Write as _;
use std::time::Duration;

use microcs::nats::Transport;

use crate::cli::TargetArgs;
use crate::error::CliResult;
use crate::net::Net;
use crate::output::{Ctx, count, latency, print, print_json, table};

/// Runs `microcs info`: the service's `$info` answer (JSON as the service sent it with `--json`).
pub fn info(ctx: &Ctx, args: TargetArgs) -> CliResult {
    let net = Net::from_args(&args.net)?;
    let mut client = instance_client(ctx, &args, &net)?;
    let info = client.info()?;
    let on_nats = client.via() == Transport::Nats;
    if ctx.json {
        return print_json(&info);
    }
    let mut s = String::new();
    let _ = writeln!(s, "{}  version {}", info.name, info.version);
    if !info.description.is_empty() {
        let _ = writeln!(s, "  {}", info.description);
    }
    let mut fields: Vec<(String, String)> = vec![("id".into(), info.id.clone())];
    if let Some(pid) = client.server_pid() {
        fields.push(("pid".into(), pid.to_string()));
    }
    if on_nats {
        // Over NATS any one instance answered; there is no socket and no handshake.
        fields.push(("via".into(), format!("NATS at {}", client.nats_url().unwrap_or_default())));
    } else {
        fields.push(("socket".into(), client.socket_path().display().to_string()));
    }
    if let Some(max) = client.max_request_payload() {
        fields.push(("accepts".into(), format!("requests up to {} bytes", count(u64::from(max)))));
    }
    // The service's own pid is already shown when it came from the handshake.
    let shown_pid = client.server_pid().is_some();
    fields.extend(
        info.metadata
            .iter()
            .filter(|(k, _)| !(shown_pid && k.as_str() == "pid"))
            .map(|(k, v)| (k.clone(), v.clone())),
    );
    let w = fields.iter().map(|(k, _)| k.len() + 1).max().unwrap_or(0);
    for (k, v) in &fields {
        let _ = writeln!(s, "  {:<w$} {v}", format!("{k}:"));
    }
    let _ = writeln!(s, "\nendpoints:");
    let rows: Vec<Vec<String>> = info
        .endpoints
        .iter()
        .map(|e| {
            let nats = if on_nats { " --nats URL" } else { "" };
            let how = if e.name == microcs::micro::DEFAULT_ENDPOINT {
                format!("microcs call {}{nats}", info.name)
            } else {
                format!("microcs call {} --method {}{nats}", info.name, e.name)
            };
            vec![e.name.clone(), e.subject.clone(), how]
        })
        .collect();
    s.push_str(&indent(&table(&["NAME", "SUBJECT", "CALL WITH"], &rows)));
    print(&s)
}

/// Runs `microcs stats`: request and error counts and handler times per endpoint.
pub fn stats(ctx: &Ctx, args: TargetArgs) -> CliResult {
    let net = Net::from_args(&args.net)?;
    let mut client = instance_client(ctx, &args, &net)?;
    let stats = client.stats()?;
    if ctx.json {
        return print_json(&stats);
    }
    let mut s = format!("{}  started {}", stats.name, stats.started);
    if client.via() == Transport::Nats {
        // Over NATS one instance answers: say which.
        s.push_str(&format!(
            "  (instance {} via NATS at {})",
            stats.id,
            client.nats_url().unwrap_or_default()
        ));
    }
    s.push('\n');
    if let Some((unix, shm)) = stats.connections() {
        let this = stats.metadata.get(microcs::micro::META_TRANSPORT);
        let this = this.map_or_else(String::new, |t| format!(" (this one: {t})"));
        s.push_str(&format!("  connections: {} unix, {} shm{this}\n", count(unix), count(shm)));
    }
    let rows: Vec<Vec<String>> = stats
        .endpoints
        .iter()
        .map(|e| {
            vec![
                e.name.clone(),
                count(e.num_requests),
                count(e.num_errors),
                if e.num_requests == 0 {
                    "-".into()
                } else {
                    latency(Duration::from_nanos(e.average_processing_time))
                },
                latency(Duration::from_nanos(e.processing_time)),
                if e.last_error.is_empty() { "-".into() } else { one_line(&e.last_error, 60) },
            ]
        })
        .collect();
    s.push_str(&indent(&table(
        &["ENDPOINT", "REQUESTS", "ERRORS", "AVG TIME", "TOTAL TIME", "LAST ERROR"],
        &rows,
    )));
    print(&s)
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect()
}

/// A message on one line, shortened to `max` characters.
fn one_line(text: &str, max: usize) -> String {
    let flat: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() <= max {
        flat
    } else {
        let cut: String = flat.chars().take(max.saturating_sub(1)).collect();
        format!("{cut}…")
    }
}

/// The client for `info` / `stats`: to the instance asked for, if any.
fn instance_client(ctx: &Ctx, args: &TargetArgs, net: &Net) -> CliResult<microcs::Client> {
    let builder = ctx.client(&args.name, args.timeout, net);
    let builder = match args.instance {
        Some(slot) => builder.instance(slot),
        None => builder,
    };
    Ok(builder.connect()?)
}
