//! The part of a server that does not depend on how it does I/O: the endpoint table, per-endpoint
//! statistics and the built-in `$` methods. Shared by the blocking and async servers.
//!
//! # Layout
//!
//! This module: the endpoint table ([`Service`]) and how a request is routed; `builtins` the
//! answers of `$ping`, `$info` and `$stats`; `counters` per-endpoint counters and open
//! connections by transport; `idle` the idle timeout; `config` a server's limits and policies;
//! `claim` claiming the name and binding its socket, and watching it; `options` the builder
//! options both flavours share (macros).

mod builtins;
mod claim;
mod config;
mod counters;
mod idle;
mod options;

pub(crate) use claim::{Bound, WATCH_PERIOD, Watch, claim_and_bind, meta, record_connections, watch_name};
pub(crate) use config::Config;
pub(crate) use counters::{Counted, Counters, Tally};
pub(crate) use idle::{Activity, IdleWatch, idle_expired};
pub(crate) use options::{common_client_options, common_server_options};

use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::SystemTime;

use crate::error::{Error, ErrorKind, RemoteError};
use crate::micro;
use crate::name::Name;
use crate::proto::{self, status};

/// Service identity and description, set on the server builder.
#[derive(Debug, Clone)]
pub(crate) struct Identity {
    pub version: String,
    pub description: String,
    pub metadata: BTreeMap<String, String>,
}

impl Default for Identity {
    fn default() -> Identity {
        Identity { version: "0.1.0".into(), description: String::new(), metadata: BTreeMap::new() }
    }
}

/// A handler and its statistics.
pub(crate) struct Endpoint<H> {
    pub name: String,
    pub subject: String,
    pub handler: H,
    pub counters: Counters,
}

/// One endpoint of a [`Service`]: 0 is the default handler, `i + 1` the method `methods[i]`
/// (a `Service` never changes once built, so an id stays valid for its life). An id rather than
/// a reference, so that a request's run can move into a task with the service it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct EndpointId(pub usize);

impl EndpointId {
    /// The default handler (the empty method name).
    pub(crate) const DEFAULT: EndpointId = EndpointId(0);
}

/// Which built-in method a request named.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Builtin {
    Ping,
    Info,
    Stats,
}

/// Where a request goes.
pub(crate) enum Route {
    Endpoint(EndpointId),
    Builtin(Builtin),
    /// The method does not exist (or is not UTF-8); the error to send, not run.
    Refuse(RemoteError),
}

/// Endpoints of one service, generic over the handler type (sync or async).
pub(crate) struct Service<H> {
    pub name: Name,
    pub id: String,
    pub identity: Identity,
    pub started: SystemTime,
    pub default: Endpoint<H>,
    /// Named methods, sorted by name for binary search.
    pub methods: Vec<Endpoint<H>>,
    /// Handlers started and ended, for the idle timeout.
    pub activity: Activity,
    /// Open local connections by transport, for `$stats` (and so `microcs ls` / `stats`).
    pub tally: Arc<Tally>,
}

impl<H> Service<H> {
    pub(crate) fn new(
        name: Name,
        identity: Identity,
        default: H,
        mut methods: Vec<(String, H)>,
    ) -> Service<H> {
        methods.sort_by(|a, b| a.0.cmp(&b.0));
        let methods = methods
            .into_iter()
            .map(|(m, h)| Endpoint {
                subject: format!("{name}.{m}"),
                name: m,
                handler: h,
                counters: Counters::default(),
            })
            .collect();
        Service {
            default: Endpoint {
                name: micro::DEFAULT_ENDPOINT.into(),
                subject: name.to_string(),
                handler: default,
                counters: Counters::default(),
            },
            id: new_instance_id(),
            name,
            identity,
            started: SystemTime::now(),
            methods,
            activity: Activity::default(),
            tally: Arc::default(),
        }
    }

    /// The endpoint `id` names (ids come from this service: [`route`](Self::route), or an
    /// index into `methods` plus one, as NATS numbers its subscriptions).
    pub(crate) fn endpoint(&self, id: EndpointId) -> &Endpoint<H> {
        match id.0 {
            0 => &self.default,
            i => &self.methods[i - 1],
        }
    }

    pub(crate) fn method_names(&self) -> Vec<String> {
        self.methods.iter().map(|e| e.name.clone()).collect()
    }

    /// Finds where a request with this raw method name goes.
    pub(crate) fn route(&self, method: &[u8]) -> Route {
        if method.is_empty() {
            return Route::Endpoint(EndpointId::DEFAULT);
        }
        match method {
            b"$ping" => return Route::Builtin(Builtin::Ping),
            b"$info" => return Route::Builtin(Builtin::Info),
            b"$stats" => return Route::Builtin(Builtin::Stats),
            _ => {}
        }
        let Ok(m) = std::str::from_utf8(method) else {
            return Route::Refuse(RemoteError::new(status::BAD_REQUEST, "method name is not UTF-8"));
        };
        match self.methods.binary_search_by(|e| e.name.as_str().cmp(m)) {
            Ok(i) => Route::Endpoint(EndpointId(i + 1)),
            Err(_) => Route::Refuse(RemoteError::new(
                status::NO_METHOD,
                format!("service '{}' has no method '{m}' (it has: {})", self.name, self.method_list()),
            )),
        }
    }

    fn method_list(&self) -> String {
        if self.methods.is_empty() {
            return "only the default handler".into();
        }
        self.methods.iter().map(|e| e.name.as_str()).collect::<Vec<_>>().join(", ")
    }
}

/// A 22-character base-62 id, unique per server instance (the shape of a NATS nuid).
fn new_instance_id() -> String {
    const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut out = String::with_capacity(22);
    let mut round = 0u64;
    while out.len() < 22 {
        // RandomState is keyed from the OS's random source once per process.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(round);
        h.write_u32(std::process::id());
        h.write_u128(SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_nanos());
        let mut v = h.finish();
        for _ in 0..10 {
            if out.len() == 22 {
                break;
            }
            out.push(ALPHABET[(v % 62) as usize] as char);
            v /= 62;
        }
        round += 1;
    }
    out
}

/// Adds a named method to a server's list, or records why it cannot be added (the first
/// problem is reported when the server is bound or started, so builders stay chainable).
pub(crate) fn add_method<H>(methods: &mut Vec<(String, H)>, error: &mut Option<Error>, name: &str, h: H) {
    let problem = match proto::check_method(name) {
        Err(m) => Some(m),
        Ok(()) if name.starts_with('$') => {
            Some(format!("method name {name:?}: names starting with '$' are reserved for built-in methods"))
        }
        Ok(()) if methods.iter().any(|(m, _)| m == name) => {
            Some(format!("method {name:?} is registered twice"))
        }
        Ok(()) => None,
    };
    match problem {
        Some(m) if error.is_none() => *error = Some(Error::new(ErrorKind::InvalidName, m)),
        Some(_) => {}
        None => methods.push((name.to_owned(), h)),
    }
}
