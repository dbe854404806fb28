//! The answers of the built-in methods `$ping`, `$info` and `$stats` (the NATS micro services
//! schema), for a local connection or for NATS.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use super::{Builtin, Endpoint, Service};
use crate::micro::{self, EndpointInfo, EndpointStats, InfoResponse, PingResponse, StatsResponse};
use crate::proto;

impl<H> Service<H> {
    /// The metadata of the built-ins' answers; `transport`: what carries the connection that
    /// asked (`None` for NATS).
    fn metadata(&self, transport: Option<&str>) -> BTreeMap<String, String> {
        let mut m = self.identity.metadata.clone();
        if let Some(t) = transport {
            m.insert("transport".into(), t.into());
        }
        m.insert("pid".into(), std::process::id().to_string());
        m.insert("uid".into(), crate::registry::euid().to_string());
        m.insert("host".into(), hostname());
        m.insert("protocol".into(), proto::VERSION.to_string());
        m.insert("library".into(), concat!("microcs ", env!("CARGO_PKG_VERSION")).into());
        m
    }

    fn endpoints(&self) -> impl Iterator<Item = &Endpoint<H>> {
        std::iter::once(&self.default).chain(&self.methods)
    }

    pub(crate) fn ping(&self, transport: Option<&str>) -> PingResponse {
        PingResponse {
            kind: micro::PING_TYPE.into(),
            name: self.name.to_string(),
            id: self.id.clone(),
            version: self.identity.version.clone(),
            metadata: self.metadata(transport),
        }
    }

    pub(crate) fn info(&self, transport: Option<&str>) -> InfoResponse {
        InfoResponse {
            kind: micro::INFO_TYPE.into(),
            name: self.name.to_string(),
            id: self.id.clone(),
            version: self.identity.version.clone(),
            metadata: self.metadata(transport),
            description: self.identity.description.clone(),
            endpoints: self
                .endpoints()
                .map(|e| EndpointInfo {
                    name: e.name.clone(),
                    subject: e.subject.clone(),
                    queue_group: micro::QUEUE_GROUP.into(),
                    metadata: None,
                })
                .collect(),
        }
    }

    pub(crate) fn stats(&self, transport: Option<&str>) -> StatsResponse {
        let mut metadata = self.metadata(transport);
        for (key, shm) in [("connections_unix", false), ("connections_shm", true)] {
            metadata.insert(key.into(), self.tally.counter(shm).load(Ordering::Relaxed).to_string());
        }
        StatsResponse {
            kind: micro::STATS_TYPE.into(),
            name: self.name.to_string(),
            id: self.id.clone(),
            version: self.identity.version.clone(),
            metadata,
            started: micro::rfc3339(self.started),
            endpoints: self
                .endpoints()
                .map(|e| {
                    let c = &e.counters;
                    let n = c.requests.load(Ordering::Relaxed);
                    let t = c.processing_ns.load(Ordering::Relaxed);
                    EndpointStats {
                        name: e.name.clone(),
                        subject: e.subject.clone(),
                        queue_group: micro::QUEUE_GROUP.into(),
                        num_requests: n,
                        num_errors: c.errors.load(Ordering::Relaxed),
                        last_error: c.last_error.lock().unwrap_or_else(|p| p.into_inner()).clone(),
                        processing_time: t,
                        average_processing_time: t.checked_div(n).unwrap_or(0),
                        data: None,
                    }
                })
                .collect(),
        }
    }

    /// The JSON answer of a built-in method, asked over a connection on `transport` (`None`:
    /// over NATS).
    pub(crate) fn builtin(&self, which: Builtin, transport: Option<&str>) -> Vec<u8> {
        let json = match which {
            Builtin::Ping => serde_json::to_vec(&self.ping(transport)),
            Builtin::Info => serde_json::to_vec(&self.info(transport)),
            Builtin::Stats => serde_json::to_vec(&self.stats(transport)),
        };
        json.expect("built-in responses serialise")
    }
}

fn hostname() -> String {
    rustix::system::uname().nodename().to_string_lossy().into_owned()
}
