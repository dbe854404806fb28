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
    /// Free-form string metadata; microcs puts `pid`, `uid`, `host` and `protocol` here.
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
}
