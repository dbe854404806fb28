//! `microcs ls`: the running services, with their counters: local ones from the runtime
//! directory, and with a NATS URL the NATS micro services on that NATS server, merged by instance.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use microcs::micro::{DEFAULT_ENDPOINT, InfoResponse, StatsResponse};
use microcs::nats::{ENV_URL, NatsOptions, Transport};
use serde::Serialize;

use crate::cli::{LsArgs, NatsArgs};
use crate::error::{CliError, CliResult};
use crate::net::Net;
use crate::output::{Ctx, count, print, print_json, table, uptime};

/// Where a service was found: in the runtime directory.
pub const LOCAL: &str = "local";
/// Where a service was found: on the NATS server.
pub const NATS: &str = "nats";

/// One service instance in `microcs ls --json`.
#[derive(Debug, Serialize)]
pub struct Row {
    /// Service name.
    pub name: String,
    /// Where it was found: `["local"]`, `["nats"]`, or `["local", "nats"]` for a local service
    /// that also serves on NATS (the same instance, by its id).
    #[serde(rename = "where")]
    pub found: Vec<&'static str>,
    /// Server process id (null for a NATS service that does not report one).
    pub pid: Option<u32>,
    /// User id the server runs as (null for a NATS service that does not report one).
    pub uid: Option<u32>,
    /// Host the server runs on, as it reports it (null when it does not answer or say).
    pub host: Option<String>,
    /// Start time, RFC 3339 UTC (null for a NATS service whose `$SRV.STATS` did not answer).
    pub started: Option<String>,
    /// Seconds since it started (null when `started` is).
    pub uptime_s: Option<u64>,
    /// Service version.
    pub version: String,
    /// Instance id.
    pub id: String,
    /// Wire protocol version (null for a NATS service that is not a microcs service).
    pub protocol_version: Option<u8>,
    /// Named methods besides the default handler (for other NATS services: their endpoints).
    pub methods: Vec<String>,
    /// Socket path (null for a service found on NATS only).
    pub socket: Option<String>,
    /// Requests handled, all endpoints together (null when its stats did not answer).
    pub requests: Option<u64>,
    /// Requests that failed, all endpoints together (null when its stats did not answer).
    pub errors: Option<u64>,
    /// Open local connections on the socket, this listing's own included (null when its stats
    /// did not answer or do not say).
    pub connections_unix: Option<u64>,
    /// Open local connections on shared memory (null as `connections_unix`).
    pub connections_shm: Option<u64>,
    /// Its `$SRV.INFO` answer as received, for an instance found on NATS (null otherwise).
    pub info: Option<InfoResponse>,
    /// Its slot, for a local instance of a name served by several (null otherwise).
    pub instance: Option<u32>,
    /// How many local instances serve the name (null for an exclusive server).
    pub instances: Option<usize>,
    /// Open connections, as a local instance records them (null otherwise).
    pub connections: Option<u64>,
}

/// `microcs ls --json`.
#[derive(Debug, Serialize)]
struct LsJson<'a> {
    runtime_dir: String,
    /// The NATS server listed (password masked); null when NATS was not listed.
    nats_url: Option<String>,
    /// Why NATS could not be listed, when its URL came from MICROCS_NATS_URL only (given with
    /// --nats, the failure is the command's error instead).
    nats_error: Option<String>,
    services: &'a [Row],
}

/// The running services in `ctx`'s runtime directory, each asked for its `$stats` (locally
/// only, whatever the environment says about NATS).
///
/// # Errors
///
/// When the runtime directory is unsafe or unreadable.
pub fn collect(ctx: &Ctx, timeout: Duration) -> CliResult<Vec<Row>> {
    let now = SystemTime::now();
    let mut rows = Vec::new();
    let services = microcs::list_in(&ctx.dir)?;
    let mut per_name = BTreeMap::<&str, usize>::new();
    for svc in services.iter().filter(|s| s.instance.is_some()) {
        *per_name.entry(svc.name.as_str()).or_default() += 1;
    }
    for svc in &services {
        // A service that is busy, or exits between list and connect, is still listed, with `-`.
        // Each instance is asked itself.
        let client = ctx.client(svc.name.as_str(), timeout, &Net::local());
        let client = match svc.instance {
            Some(slot) => client.instance(slot),
            None => client,
        };
        let stats = client.connect().and_then(|mut c| c.stats()).ok();
        let (requests, errors) = totals(stats.as_ref());
        let conns = stats.as_ref().and_then(StatsResponse::connections);
        rows.push(Row {
            name: svc.name.to_string(),
            found: vec![LOCAL],
            pid: Some(svc.pid),
            uid: Some(svc.uid),
            host: stats.as_ref().and_then(|s| s.metadata.get("host").cloned()),
            started: Some(microcs::micro::rfc3339(svc.started)),
            uptime_s: Some(now.duration_since(svc.started).unwrap_or_default().as_secs()),
            version: svc.version.clone(),
            id: svc.id.clone(),
            protocol_version: Some(svc.protocol_version),
            methods: svc.methods.clone(),
            socket: Some(svc.socket.display().to_string()),
            requests,
            errors,
            connections_unix: conns.map(|c| c.0),
            connections_shm: conns.map(|c| c.1),
            info: None,
            instance: svc.instance,
            instances: svc.instance.and(per_name.get(svc.name.as_str()).copied()),
            connections: svc.connections,
        });
    }
    Ok(rows)
}

/// The NATS micro services on the NATS server of `options`, one row per instance: their
/// `$SRV.INFO` and `$SRV.STATS` answers (asked at the same time), gathered for at most `wait`.
///
/// # Errors
///
/// The library's, when the NATS server cannot be reached or refuses the credentials.
pub fn collect_nats(options: &NatsOptions, wait: Duration) -> microcs::Result<Vec<Row>> {
    let (infos, stats) = std::thread::scope(|s| {
        let stats = s.spawn(|| microcs::nats::list_stats(options, None, wait));
        let infos = microcs::nats::list(options, None, wait);
        let stats = stats.join().unwrap_or_else(|_| Ok(Vec::new()));
        (infos, stats)
    });
    let (infos, stats) = match (infos, stats) {
        (Ok(i), Ok(s)) => (i, s),
        // The same connection problem fails both; an instance missing from one list only
        // loses that list's columns.
        (Err(e), _) => return Err(e),
        (Ok(i), Err(_)) => (i, Vec::new()),
    };
    let mut by_instance: BTreeMap<(String, String), (Option<InfoResponse>, Option<StatsResponse>)> =
        BTreeMap::new();
    for i in infos {
        let key = (i.name.clone(), i.id.clone());
        by_instance.entry(key).or_default().0 = Some(i);
    }
    for s in stats {
        let key = (s.name.clone(), s.id.clone());
        by_instance.entry(key).or_default().1 = Some(s);
    }
    let now = SystemTime::now();
    Ok(by_instance.into_values().map(|(info, stats)| nats_row(info, stats, now)).collect())
}

/// A row from what one NATS instance answered (at least one of the two is `Some`).
fn nats_row(info: Option<InfoResponse>, stats: Option<StatsResponse>, now: SystemTime) -> Row {
    let (name, id, version, metadata) = match (&info, &stats) {
        (Some(i), _) => (&i.name, &i.id, &i.version, &i.metadata),
        (None, Some(s)) => (&s.name, &s.id, &s.version, &s.metadata),
        (None, None) => unreachable!("a row comes from at least one answer"),
    };
    let meta = |k: &str| metadata.get(k).cloned();
    let endpoints: Vec<String> = match (&info, &stats) {
        (Some(i), _) => i.endpoints.iter().map(|e| e.name.clone()).collect(),
        (None, Some(s)) => s.endpoints.iter().map(|e| e.name.clone()).collect(),
        (None, None) => Vec::new(),
    };
    let started = stats.as_ref().map(|s| s.started.clone());
    let uptime_s = started
        .as_deref()
        .and_then(microcs::micro::parse_rfc3339)
        .map(|t| now.duration_since(t).unwrap_or_default().as_secs());
    let (requests, errors) = totals(stats.as_ref());
    Row {
        name: name.clone(),
        found: vec![NATS],
        pid: meta("pid").and_then(|p| p.parse().ok()),
        uid: meta("uid").and_then(|u| u.parse().ok()),
        host: meta("host"),
        started,
        uptime_s,
        version: version.clone(),
        id: id.clone(),
        protocol_version: meta("protocol").and_then(|p| p.parse().ok()),
        methods: endpoints.into_iter().filter(|e| e != DEFAULT_ENDPOINT).collect(),
        socket: None,
        requests,
        errors,
        // A NATS instance's local connections are not this listing's business (its stats say
        // them only for its own host).
        connections_unix: None,
        connections_shm: None,
        info,
        instance: None,
        instances: None,
        connections: None,
    }
}

/// Requests and errors over all endpoints.
fn totals(stats: Option<&StatsResponse>) -> (Option<u64>, Option<u64>) {
    match stats {
        Some(s) => (
            Some(s.endpoints.iter().map(|e| e.num_requests).sum()),
            Some(s.endpoints.iter().map(|e| e.num_errors).sum()),
        ),
        None => (None, None),
    }
}

/// Local rows and NATS rows as one list: an instance found both ways (a local service also
/// served on NATS: the same id) is one row, found in both places.
pub fn merge(mut local: Vec<Row>, nats: Vec<Row>) -> Vec<Row> {
    for n in nats {
        match local.iter_mut().find(|l| l.name == n.name && l.id == n.id) {
            Some(l) => {
                l.found.push(NATS);
                l.info = n.info;
                l.host = l.host.take().or(n.host);
                if l.requests.is_none() {
                    (l.requests, l.errors) = (n.requests, n.errors);
                }
            }
            None => local.push(n),
        }
    }
    // By name; local instances first (by slot), then by id.
    local.sort_by(|a, b| {
        (&a.name, a.found[0] != LOCAL, a.instance, &a.id).cmp(&(
            &b.name,
            b.found[0] != LOCAL,
            b.instance,
            &b.id,
        ))
    });
    local
}

/// The human table of `microcs ls`; with `wide`, also where each service was found and its host
/// (when NATS was listed). When some name is served by several instances, the columns INSTANCE
/// (slot, and how many there are: `#1 of 3`) and CONNS (open connections) are shown too.
pub fn render(rows: &[Row], wide: bool) -> String {
    let opt = |v: Option<u64>| v.map_or_else(|| "-".to_owned(), count);
    let pooled = rows.iter().any(|r| r.instance.is_some());
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let mut cells = vec![r.name.clone()];
            if pooled {
                cells.push(match (r.instance, r.instances) {
                    (Some(k), Some(n)) => format!("#{k} of {n}"),
                    _ => "-".into(),
                });
                cells.push(opt(r.connections));
            }
            if wide {
                cells.push(r.found.join("+"));
                cells.push(r.host.clone().unwrap_or_else(|| "-".into()));
            }
            cells.extend([
                r.pid.map_or_else(|| "-".into(), |p| p.to_string()),
                r.uptime_s.map_or_else(|| "-".into(), |s| uptime(Duration::from_secs(s))),
                opt(r.requests),
                opt(r.errors),
                connections(r.connections_unix, r.connections_shm),
                if r.methods.is_empty() { "-".to_owned() } else { r.methods.join(",") },
            ]);
            cells
        })
        .collect();
    let mut header = vec!["NAME"];
    if pooled {
        header.extend(["INSTANCE", "CONNS"]);
    }
    if wide {
        header.extend(["WHERE", "HOST"]);
    }
    header.extend(["PID", "UPTIME", "REQUESTS", "ERRORS", "SHM", "METHODS"]);
    table(&header, &body)
}

/// The SHM cell: how many of the service's open local connections move their frames over
/// shared memory, of how many (`1/3`); `-` when it does not say.
pub fn connections(unix: Option<u64>, shm: Option<u64>) -> String {
    match (unix, shm) {
        (Some(u), Some(s)) => format!("{}/{}", count(s), count(u + s)),
        _ => "-".into(),
    }
}

/// Runs `microcs ls`.
pub fn run(ctx: &Ctx, args: LsArgs) -> CliResult {
    // The same checks as the calling commands: no secret in --nats, no contradiction.
    let net = Net::from_args(&NatsArgs { nats: args.nats.clone(), transport: args.transport })?;
    let transport = net.effective_transport()?;
    let url = if transport == Transport::Local { None } else { net.effective_url() };
    // A NATS listing the user asked for must work; one that only comes from MICROCS_NATS_URL
    // must not stop `ls` from showing the local services (a broker may be down, or far away).
    let asked = args.nats.is_some() || transport == Transport::Nats;
    let shown_url = url.as_deref().map(microcs::nats::redact_url);

    let nats_job = url.map(|u| {
        let wait = args.timeout;
        std::thread::spawn(move || collect_nats(&NatsOptions::new(&u), wait))
    });
    let local = if transport == Transport::Nats { Vec::new() } else { collect(ctx, args.timeout)? };
    let (nats, nats_error) = match nats_job.map(|j| j.join()) {
        None => (Vec::new(), None),
        Some(Ok(Ok(rows))) => (rows, None),
        Some(Ok(Err(e))) if asked => return Err(e.into()),
        Some(Ok(Err(e))) => {
            note!("microcs: warning: not listing NATS services ({ENV_URL}): {e}");
            (Vec::new(), Some(e.to_string()))
        }
        Some(Err(_)) => return Err(CliError::local("listing NATS services failed unexpectedly")),
    };
    let nats_listed = shown_url.is_some() && nats_error.is_none();
    let rows = merge(local, nats);
    if ctx.json {
        return print_json(&LsJson {
            runtime_dir: ctx.dir.display().to_string(),
            nats_url: shown_url,
            nats_error,
            services: &rows,
        });
    }
    if rows.is_empty() {
        let place = match (transport, &shown_url) {
            (Transport::Nats, Some(u)) => format!("on NATS at {u}"),
            (_, Some(u)) if nats_listed => format!("in {} or on NATS at {u}", ctx.dir.display()),
            _ => format!("in {}", ctx.dir.display()),
        };
        note!("no services running {place} (start one with `microcs serve NAME --echo`)");
        return Ok(());
    }
    print(&render(&rows, nats_listed))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(name: &str, id: &str, found: &'static str) -> Row {
        Row {
            name: name.into(),
            found: vec![found],
            pid: None,
            uid: None,
            host: (found == NATS).then(|| "h".into()),
            started: None,
            uptime_s: None,
            version: "1.0.0".into(),
            id: id.into(),
            protocol_version: None,
            methods: Vec::new(),
            socket: None,
            requests: (found == NATS).then_some(7),
            errors: (found == NATS).then_some(1),
            connections_unix: None,
            connections_shm: None,
            info: None,
            instance: None,
            instances: None,
            connections: None,
        }
    }

    #[test]
    fn one_row_per_instance() {
        let rows = merge(
            vec![row("B", "1", LOCAL), row("A", "2", LOCAL)],
            vec![row("B", "1", NATS), row("B", "3", NATS), row("A", "0", NATS)],
        );
        let seen: Vec<(&str, &str, String)> =
            rows.iter().map(|r| (r.name.as_str(), r.id.as_str(), r.found.join("+"))).collect();
        assert_eq!(
            seen,
            [
                ("A", "2", "local".to_owned()),
                ("A", "0", "nats".to_owned()),
                ("B", "1", "local+nats".to_owned()),
                ("B", "3", "nats".to_owned()),
            ]
        );
        // The local row had no counters: the NATS answer fills them.
        assert_eq!(
            (rows[2].requests, rows[2].errors, rows[2].host.as_deref()),
            (Some(7), Some(1), Some("h"))
        );
        let text = render(&rows, true);
        assert!(text.starts_with("NAME  WHERE       HOST  PID"), "{text}");
        assert!(render(&rows, false).starts_with("NAME  PID"));
    }
}
