//! The JSON answers of the built-in methods `$ping`, `$info` and `$stats`.
//!
//! They follow the NATS micro services schemas (`io.nats.micro.v1.ping_response`,
//! `info_response`, `stats_response`), so the same tools and code read a local service and a
//! NATS one alike.
//!
//! # Examples
//!
//! ```no_run
//! let mut client = microcs::Client::connect("LIFE_GEN")?;
//! let stats = client.stats()?;
//! for ep in &stats.endpoints {
//!     println!("{}: {} requests, {} errors", ep.name, ep.num_requests, ep.num_errors);
//! }
//! # Ok::<(), microcs::Error>(())
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `type` of a `$ping` answer.
pub const PING_TYPE: &str = "io.nats.micro.v1.ping_response";
/// `type` of an `$info` answer.
pub const INFO_TYPE: &str = "io.nats.micro.v1.info_response";
/// `type` of a `$stats` answer.
pub const STATS_TYPE: &str = "io.nats.micro.v1.stats_response";
/// Queue group every endpoint uses (as NATS micro's default).
pub const QUEUE_GROUP: &str = "q";
/// Name of the endpoint that serves requests without a method.
pub const DEFAULT_ENDPOINT: &str = "default";
/// Metadata key of the built-ins' answers over a local connection: what carries the connection
/// that asked, `"unix"` (the socket) or `"shm"` (shared memory, docs/PROTOCOL.md § 18).
pub const META_TRANSPORT: &str = "transport";
/// `$stats` metadata key: open local connections on the socket (a decimal count).
pub const META_CONNECTIONS_UNIX: &str = "connections_unix";
/// `$stats` metadata key: open local connections on shared memory (a decimal count).
pub const META_CONNECTIONS_SHM: &str = "connections_shm";

/// Answer to `$ping`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PingResponse {
    /// Always [`PING_TYPE`].
    #[serde(rename = "type")]
    pub kind: String,
    /// Service name.
    pub name: String,
    /// Instance id, unique per running server.
    pub id: String,
    /// Service version (SemVer).
    pub version: String,
    /// Free-form string metadata; microcs puts `pid`, `uid`, `host`, `protocol`, `library` and
    /// (over a local connection) [`transport`](META_TRANSPORT) here.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

/// One endpoint in an `$info` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointInfo {
    /// Endpoint name: [`DEFAULT_ENDPOINT`] or the method name.
    pub name: String,
    /// Subject: the service name, or `NAME.method`.
    pub subject: String,
    /// Queue group ([`QUEUE_GROUP`]).
    #[serde(default)]
    pub queue_group: String,
    /// Endpoint metadata.
    #[serde(default)]
    pub metadata: Option<BTreeMap<String, String>>,
}

/// Answer to `$info`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InfoResponse {
    /// Always [`INFO_TYPE`].
    #[serde(rename = "type")]
    pub kind: String,
    /// Service name.
    pub name: String,
    /// Instance id.
    pub id: String,
    /// Service version (SemVer).
    pub version: String,
    /// Service metadata.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// Human description.
    #[serde(default)]
    pub description: String,
    /// The endpoints: the default handler and each method.
    #[serde(default)]
    pub endpoints: Vec<EndpointInfo>,
}

/// Counters of one endpoint in a `$stats` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointStats {
    /// Endpoint name.
    pub name: String,
    /// Subject.
    pub subject: String,
    /// Queue group.
    #[serde(default)]
    pub queue_group: String,
    /// Requests handled.
    pub num_requests: u64,
    /// Requests whose handler failed.
    pub num_errors: u64,
    /// Message of the latest failure (empty if none).
    #[serde(default)]
    pub last_error: String,
    /// Total time spent in the handler, nanoseconds.
    pub processing_time: u64,
    /// Average time per request, nanoseconds.
    pub average_processing_time: u64,
    /// Endpoint-specific data (unused by microcs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
}

/// Answer to `$stats`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsResponse {
    /// Always [`STATS_TYPE`].
    #[serde(rename = "type")]
    pub kind: String,
    /// Service name.
    pub name: String,
    /// Instance id.
    pub id: String,
    /// Service version (SemVer).
    pub version: String,
    /// Service metadata.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// Start time, RFC 3339 in UTC.
    pub started: String,
    /// Per-endpoint counters.
    #[serde(default)]
    pub endpoints: Vec<EndpointStats>,
}

impl StatsResponse {
    /// Open local connections of the service by transport, `(unix, shm)`, from its metadata
    /// (`None` from a service that does not report them: older, or not microcs).
    pub fn connections(&self) -> Option<(u64, u64)> {
        let get = |k: &str| self.metadata.get(k)?.parse().ok();
        Some((get(META_CONNECTIONS_UNIX)?, get(META_CONNECTIONS_SHM)?))
    }
}

/// Formats a time as RFC 3339 in UTC with nanoseconds, as NATS does (`2026-11-26T14:10:06.123456789Z`).
pub fn rfc3339(t: std::time::SystemTime) -> String {
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_nanos()
    )
}

/// Parses an RFC 3339 time (`2026-11-26T14:10:06.123456789Z`, or with an offset such as
/// `+02:00`), as NATS micro services report their start; `None` when it is not one. The inverse
/// of [`rfc3339`].
///
/// # Examples
///
/// ```
/// use std::time::{Duration, UNIX_EPOCH};
/// let t = microcs::micro::parse_rfc3339("2026-11-26T14:10:06.5+01:00").unwrap();
/// assert_eq!(t, UNIX_EPOCH + Duration::new(1_795_698_606, 500_000_000));
/// ```
pub fn parse_rfc3339(s: &str) -> Option<std::time::SystemTime> {
    let b = s.trim().as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = b.get(r)?;
        if part.is_empty() || !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(part).ok()?.parse().ok()
    };
    let sep = |i: usize, c: &[u8]| b.get(i).is_some_and(|x| c.contains(x));
    if !(sep(4, b"-") && sep(7, b"-") && sep(10, b"Tt ") && sep(13, b":") && sep(16, b":")) {
        return None;
    }
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut i = 19;
    let mut nanos: u32 = 0;
    if sep(i, b".") {
        let start = i + 1;
        let mut end = start;
        while b.get(end).is_some_and(u8::is_ascii_digit) {
            end += 1;
        }
        if end == start {
            return None;
        }
        let digits = &s.trim()[start..end.min(start + 9)];
        nanos = format!("{digits:0<9}").parse().ok()?;
        i = end;
    }
    let offset = match b.get(i..)? {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), ..] if b.len() == i + 6 && sep(i + 3, b":") => {
            let o = num(i + 1..i + 3)? * 3600 + num(i + 4..i + 6)? * 60;
            if *sign == b'+' { o } else { -o }
        }
        _ => return None,
    };
    // Days since 1970-01-01 of a civil date (Howard Hinnant's algorithm).
    let (yy, mm) = if mo <= 2 { (y - 1, mo + 9) } else { (y, mo - 3) };
    let era = yy.div_euclid(400);
    let yoe = yy - era * 400;
    let doy = (153 * mm + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + mi * 60 + sec - offset;
    let secs = u64::try_from(secs).ok()?;
    Some(std::time::UNIX_EPOCH + std::time::Duration::new(secs, nanos))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn rfc3339_known_values() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(rfc3339(UNIX_EPOCH + Duration::new(951_782_400, 5)), "2000-02-29T00:00:00.000000005Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(1_795_702_206)),
            "2026-11-26T14:10:06.000000000Z"
        );
    }

    #[test]
    fn rfc3339_round_trips_and_takes_offsets() {
        let t = UNIX_EPOCH + Duration::new(1_790_000_000, 123_456_789);
        assert_eq!(parse_rfc3339(&rfc3339(t)), Some(t));
        let epoch = parse_rfc3339("1970-01-01T00:00:00Z").unwrap();
        assert_eq!(epoch, UNIX_EPOCH);
        let leap = parse_rfc3339("2024-02-29T12:00:00.5+02:00").unwrap();
        assert_eq!(leap.duration_since(UNIX_EPOCH).unwrap(), Duration::new(1_709_200_800, 500_000_000));
        for bad in ["", "2024-02-29", "2024-13-01T00:00:00Z", "2024-02-29T12:00:00", "2024-02-29T12:00:00.Z"]
        {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }
}
