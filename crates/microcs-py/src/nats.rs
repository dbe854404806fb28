//! The NATS arguments of `Server`, `Client`, `AsyncClient` and `list_services`.
//!
//! The library does the work (feature `nats` of microcs); this module turns the Python
//! arguments into its settings, with errors phrased for Python callers, and gathers what
//! `list_services(nats=...)` reports about the instances found on a broker. Credentials are
//! never arguments: the library reads them from `MICROCS_NATS_USER`/`PASSWORD`, `TOKEN`,
//! `CREDS` and `CA`, for servers and clients alike.

use std::collections::BTreeMap;
use std::time::{Duration, UNIX_EPOCH};

use microcs::micro::{DEFAULT_ENDPOINT, InfoResponse, StatsResponse};
use microcs::nats::{ENV_URL, NatsOptions, Transport};
use microcs::{Error, ErrorKind};

/// An `InvalidConfig` error (also a `ValueError` in Python): the arguments do not make sense.
fn invalid(message: String) -> Error {
    Error::new(ErrorKind::InvalidConfig, message)
}

/// The `transport=` argument: `None`, `"auto"`, `"local"` or `"nats"`.
pub(crate) fn transport(value: Option<&str>) -> microcs::Result<Option<Transport>> {
    value
        .map(|v| {
            Transport::parse(v).map_err(|_| {
                invalid(format!("transport must be 'auto', 'local' or 'nats' (or None), not {v:?}"))
            })
        })
        .transpose()
}

/// The `nats=` argument: a URL, never empty.
pub(crate) fn url(value: Option<&str>) -> microcs::Result<Option<&str>> {
    match value {
        Some(u) if u.trim().is_empty() => Err(invalid(
            "nats must be a NATS URL such as 'nats://127.0.0.1:4222' (or None), not an empty string".into(),
        )),
        Some(u) => Ok(Some(u.trim())),
        None => Ok(None),
    }
}

/// A server's NATS settings, checked: `transport="nats"` needs a URL (servers never take it
/// from the environment, so that a service goes on a broker only when its code says so).
pub(crate) fn server(
    nats: Option<&str>,
    transport: Option<&str>,
) -> microcs::Result<(Option<String>, Option<Transport>)> {
    let (url, transport) = (url(nats)?, self::transport(transport)?);
    if transport == Some(Transport::Nats) && url.is_none() {
        return Err(invalid(
            "transport='nats' needs a NATS URL: pass nats='nats://host:4222' (a server never takes it \
             from MICROCS_NATS_URL)"
                .into(),
        ));
    }
    Ok((url.map(str::to_owned), transport))
}

/// A client's NATS settings, checked: `transport="nats"` needs a URL, here or in
/// `MICROCS_NATS_URL` (which the library reads for every client that is given none).
pub(crate) fn client(
    nats: Option<&str>,
    transport: Option<&str>,
) -> microcs::Result<(Option<String>, Option<Transport>)> {
    let (url, transport) = (url(nats)?, self::transport(transport)?);
    let from_env = std::env::var(ENV_URL).is_ok_and(|v| !v.trim().is_empty());
    if transport == Some(Transport::Nats) && url.is_none() && !from_env {
        return Err(invalid(format!(
            "transport='nats' needs a NATS URL: pass nats='nats://host:4222' or set {ENV_URL}"
        )));
    }
    Ok((url.map(str::to_owned), transport))
}

/// One service instance, found locally, on NATS, or both (the same instance id).
#[derive(Debug)]
pub(crate) struct Found {
    pub name: String,
    pub found: Vec<&'static str>,
    pub pid: Option<u32>,
    pub uid: Option<u32>,
    pub host: Option<String>,
    pub started: Option<f64>,
    pub protocol_version: Option<u8>,
    pub version: String,
    pub id: String,
    pub methods: Vec<String>,
    pub socket: Option<String>,
    pub instance: Option<u32>,
    pub connections: Option<u64>,
}

impl From<microcs::ServiceInfo> for Found {
    fn from(s: microcs::ServiceInfo) -> Found {
        Found {
            name: s.name.to_string(),
            found: vec!["local"],
            pid: Some(s.pid),
            uid: Some(s.uid),
            host: None,
            started: Some(s.started.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64()),
            protocol_version: Some(s.protocol_version),
            version: s.version,
            id: s.id,
            methods: s.methods,
            socket: Some(s.socket.display().to_string()),
            instance: s.instance,
            connections: s.connections,
        }
    }
}

/// The NATS micro services on the broker at `url` (microcs services and any other), one per
/// instance: their `$SRV.INFO` and `$SRV.STATS` answers, asked at the same time and gathered for
/// at most `wait`. Blocking; called without the GIL.
pub(crate) fn list(url: &str, wait: Duration) -> microcs::Result<Vec<Found>> {
    let options = NatsOptions::new(url);
    let (infos, stats) = std::thread::scope(|s| {
        let stats = s.spawn(|| microcs::nats::list_stats(&options, None, wait));
        let infos = microcs::nats::list(&options, None, wait);
        (infos, stats.join().unwrap_or_else(|_| Ok(Vec::new())))
    });
    let (infos, stats) = match (infos, stats) {
        (Ok(i), Ok(s)) => (i, s),
        // A broker that cannot be reached fails both; an instance missing from one list only
        // lacks what that list tells (its start time, or its endpoints).
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
    Ok(by_instance.into_values().filter_map(|(info, stats)| found_on_nats(info, stats)).collect())
}

/// What one instance answered on NATS (`None` only when it answered nothing).
fn found_on_nats(info: Option<InfoResponse>, stats: Option<StatsResponse>) -> Option<Found> {
    let (name, id, version, metadata, endpoints) = match (&info, &stats) {
        (Some(i), _) => {
            (&i.name, &i.id, &i.version, &i.metadata, i.endpoints.iter().map(|e| &e.name).collect::<Vec<_>>())
        }
        (None, Some(s)) => {
            (&s.name, &s.id, &s.version, &s.metadata, s.endpoints.iter().map(|e| &e.name).collect::<Vec<_>>())
        }
        (None, None) => return None,
    };
    // What microcs servers put in their metadata; other NATS services may not say.
    let meta = |k: &str| metadata.get(k).cloned();
    Some(Found {
        name: name.clone(),
        found: vec!["nats"],
        pid: meta("pid").and_then(|p| p.parse().ok()),
        uid: meta("uid").and_then(|u| u.parse().ok()),
        host: meta("host"),
        started: stats.as_ref().and_then(|s| parse_rfc3339(&s.started)),
        protocol_version: meta("protocol").and_then(|p| p.parse().ok()),
        version: version.clone(),
        id: id.clone(),
        methods: endpoints.into_iter().filter(|e| *e != DEFAULT_ENDPOINT).cloned().collect(),
        socket: None,
        instance: None,
        connections: None,
    })
}

/// Local instances and NATS instances as one list, sorted by name (local instances first, by
/// slot, then by id): an instance found both ways (a local server also serving on NATS: the same id) is one
/// entry, found in both places.
pub(crate) fn merge(mut local: Vec<Found>, nats: Vec<Found>) -> Vec<Found> {
    for n in nats {
        match local.iter_mut().find(|l| l.name == n.name && l.id == n.id) {
            Some(l) => {
                l.found.push("nats");
                l.host = l.host.take().or(n.host);
            }
            None => local.push(n),
        }
    }
    local.sort_by(|a, b| {
        (&a.name, a.found[0] != "local", a.instance, &a.id).cmp(&(
            &b.name,
            b.found[0] != "local",
            b.instance,
            &b.id,
        ))
    });
    local
}

/// Seconds since the Unix epoch of an RFC 3339 time, as NATS micro services report their start;
/// `None` when it is not one.
pub(crate) fn parse_rfc3339(s: &str) -> Option<f64> {
    let t = microcs::micro::parse_rfc3339(s)?;
    Some(t.duration_since(std::time::UNIX_EPOCH).ok()?.as_secs_f64())
}
