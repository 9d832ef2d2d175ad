//! Configuration: reading a TOML file into a validated [`Config`].
//!
//! Two layers, as in most careful servers: [`file`] is the serde schema (shape only, unknown fields
//! refused), and this module turns it into a `Config` whose values are already typed (durations,
//! socket addresses, byte counts, non-zero weights). Validation never stops at the first problem: it
//! reports every one with file, line and column ([`ConfigErrors`]). Nothing here panics on input,
//! because a bad hot reload must leave the running proxy untouched.

mod buffer;
mod cluster;
mod discovery;
mod error;
pub mod file;
mod idempotency;
mod schema;
mod validate;
mod values;

use validate::Validator;
pub mod units;

use std::collections::HashSet;
use std::net::{SocketAddr, ToSocketAddrs};
use std::num::NonZeroU32;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::Method;
use toml::Spanned;

use crate::key::{KeyRule, KeySource, OnMissingKey};
pub use buffer::{
    BufferConfig, BufferStore, BufferSync, BufferWhen, RabbitSettings, DEFAULT_BUFFER_MIN_FREE,
};
pub use cluster::{ClusterConfig, OnPeerDown, Secret, MIN_SECRET_LEN};
pub use discovery::{
    DiscoveryConfig, DnsName, DEFAULT_DISCOVERY_TIMEOUT, DEFAULT_EMPTY_AFTER, DEFAULT_MAX_REFRESH,
    DEFAULT_MIN_REFRESH,
};
use error::ErrorSink;
pub use error::{ConfigError, ConfigErrors};
use file::{
    BalanceKind, CoalesceModeKind, FileConfig, HashAlgorithmKind, OnMissingKeyKind, TimeoutsSection,
};
pub use idempotency::{
    Concurrent, IdempotencyConfig, IdempotencyStore, OnIndeterminate, OnStoreError,
};

/// Requests in flight below which a consistent-hash backend always takes its own keys.
pub const DEFAULT_HASH_BALANCE_MIN_INFLIGHT: usize = 8;
/// Default time allowed for a TCP connect to a backend.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Default time from sending a request to receiving the backend's response head.
pub const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest silence of a backend while it reads a request body or sends a response body
/// (nginx's `proxy_read_timeout` and `proxy_send_timeout`).
pub const DEFAULT_BACKEND_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest silence of a client between two reads of its request body (nginx's
/// `client_body_timeout`).
pub const DEFAULT_CLIENT_BODY_TIMEOUT: Duration = Duration::from_secs(60);
/// Default largest request body a route accepts.
pub const DEFAULT_MAX_BODY: u64 = 8 << 20;
/// Default time for a client to send request headers; for HTTP/1.1 it also bounds keep-alive idling.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Default time a client connection may stay open with no request in flight.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default time in-flight requests get to finish after SIGTERM/SIGINT.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
/// Durations beyond this are treated as typos ("absurd").
pub const MAX_DURATION: Duration = Duration::from_secs(3600);
/// Largest accepted `max_body`.
pub const MAX_BODY_LIMIT: u64 = 64 << 30;
/// Largest accepted backend weight.
pub const MAX_WEIGHT: i64 = 10_000;
/// Default longest request key; longer keys are refused with 400.
pub const DEFAULT_MAX_KEY_LENGTH: usize = 1024;
/// Largest accepted `max_key_length`.
pub const MAX_KEY_LENGTH_LIMIT: u64 = 64 << 10;
/// Most backends a consistent-hash upstream may list (its tables index members with 16 bits).
pub const MAX_HASH_BACKENDS: usize = u16::MAX as usize;
/// Default most clients that may wait on one key of a coalescing route.
pub const DEFAULT_MAX_PENDING_PER_KEY: usize = 1024;
/// Largest accepted `max_pending_per_key`.
pub const MAX_PENDING_PER_KEY_LIMIT: i64 = 1_000_000;
/// Default longest time a request waits in its key's queue.
pub const DEFAULT_MAX_WAIT: Duration = Duration::from_secs(5);
/// Methods a coalescing route coalesces unless `methods` says otherwise.
pub const DEFAULT_COALESCE_METHODS: [Method; 4] =
    [Method::PUT, Method::POST, Method::PATCH, Method::DELETE];
/// Default consecutive failures that eject a backend (0 turns passive detection off).
pub const DEFAULT_CONSECUTIVE_FAILURES: u32 = 5;
/// Default first ejection; it doubles on each repeat.
pub const DEFAULT_BASE_EJECTION_TIME: Duration = Duration::from_secs(10);
/// Default longest ejection.
pub const DEFAULT_MAX_EJECTION_TIME: Duration = Duration::from_secs(300);
/// Default most of an upstream that may be ejected at once, in percent.
pub const DEFAULT_MAX_EJECTION_PERCENT: u32 = 50;
/// Default time between active health checks of one backend.
pub const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(5);
/// Default time an active health check may take.
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(2);
/// Default successes in a row that mark a backend healthy again.
pub const DEFAULT_HEALTHY_THRESHOLD: u32 = 2;
/// Default failures in a row that mark a backend unhealthy.
pub const DEFAULT_UNHEALTHY_THRESHOLD: u32 = 3;
/// Default queue behind an admission limit.
pub const DEFAULT_MAX_QUEUE: usize = 1024;
/// Default longest wait in an admission queue.
pub const DEFAULT_QUEUE_TIMEOUT: Duration = Duration::from_secs(1);
/// Default retries of a request that never reached a backend.
pub const DEFAULT_RETRIES: u32 = 1;
/// Default retry budget: retries at most this fraction of requests.
pub const DEFAULT_RETRY_BUDGET: f64 = 0.2;
/// Largest accepted worker thread count.
pub const MAX_WORKERS: i64 = 1024;

/// A validated configuration. Built only by [`Config::load`] or [`Config::parse`].
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this config came from (used in messages and for reloads).
    pub path: PathBuf,
    pub runtime: RuntimeConfig,
    pub log: LogConfig,
    pub admin: Option<AdminConfig>,
    pub listeners: Vec<ListenerConfig>,
    pub upstreams: Vec<UpstreamConfig>,
    pub routes: Vec<RouteConfig>,
    /// Loaded TLS config of each listener (same order as `listeners`), read when the config loads.
    pub listener_tls: Vec<Option<Arc<rustls::ServerConfig>>>,
    /// TLS config for each upstream's `https://` backends (same order as `upstreams`).
    pub upstream_tls: Vec<Option<Arc<rustls::ClientConfig>>>,
    /// `[cluster]`: the replicas that share per-key order.
    pub cluster: Option<ClusterConfig>,
    /// TLS config for `https://` peers.
    pub cluster_tls: Option<Arc<rustls::ClientConfig>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeConfig {
    /// Worker threads; `None` means one per CPU core.
    pub workers: Option<usize>,
    pub shutdown_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    pub access_log: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerConfig {
    pub name: String,
    pub listen: SocketAddr,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub tls: Option<ListenerTls>,
}

/// A listener's certificate files (paths resolved against the config file's directory).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashAlgorithm {
    Rendezvous,
    Ketama,
}

/// Passive outlier detection of an upstream's backends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutlierConfig {
    /// Failures in a row that eject a backend; 0 disables ejection.
    pub consecutive_failures: u32,
    pub base_ejection_time: Duration,
    pub max_ejection_time: Duration,
    pub max_ejection_percent: u32,
}

impl Default for OutlierConfig {
    fn default() -> OutlierConfig {
        OutlierConfig {
            consecutive_failures: DEFAULT_CONSECUTIVE_FAILURES,
            base_ejection_time: DEFAULT_BASE_EJECTION_TIME,
            max_ejection_time: DEFAULT_MAX_EJECTION_TIME,
            max_ejection_percent: DEFAULT_MAX_EJECTION_PERCENT,
        }
    }
}

/// Active health checks of an upstream's backends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheckConfig {
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
    /// Inclusive range of statuses that count as healthy.
    pub expected_status: (u16, u16),
}

/// An admission limit (per route, or per upstream).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdmissionConfig {
    /// Requests in flight to backends at once (the ceiling when adaptive).
    pub max_inflight: usize,
    pub max_queue: usize,
    pub queue_timeout: Duration,
    pub shed_status: http::StatusCode,
    pub adaptive: bool,
    /// The floor of an adaptive limit.
    pub min_inflight: usize,
}

/// Settings of a `balance = "consistent_hash"` upstream.
#[derive(Debug, Clone, PartialEq)]
pub struct HashConfig {
    pub algorithm: HashAlgorithm,
    /// `hash_balance_factor`: bounded loads when set.
    pub balance_factor: Option<f64>,
    /// `hash_balance_min_inflight`: below this many requests in flight a backend always takes
    /// its own keys, whatever the bound says.
    pub balance_min_inflight: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamConfig {
    pub name: String,
    /// `None` is least connections.
    pub consistent_hash: Option<HashConfig>,
    /// The static `backends`.
    pub backends: Vec<BackendConfig>,
    /// Backends from DNS, added to the static ones.
    pub discovery: Option<DiscoveryConfig>,
    /// `max_inflight_per_backend`, for discovered backends.
    pub max_inflight_per_backend: Option<usize>,
    pub admission: Option<AdmissionConfig>,
    pub outlier: OutlierConfig,
    pub health_check: Option<HealthCheckConfig>,
    /// CA file for `https://` backends; `None` uses the system's roots.
    pub tls_ca: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendConfig {
    /// The address as written, used as the backend's name in logs and metrics.
    pub label: String,
    pub address: SocketAddr,
    pub weight: NonZeroU32,
    /// Taken out of rotation by the operator (maintenance); it gets no requests.
    pub down: bool,
    /// Most requests in flight to this backend; `None` is unlimited.
    pub max_inflight: Option<usize>,
    /// For `https://` backends: the name sent in SNI and checked against the certificate.
    pub tls_name: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CoalesceMode {
    Off,
    Serialize,
    Dedupe,
    Latest,
}

/// A route's `[routes.coalesce]` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoalesceConfig {
    pub mode: CoalesceMode,
    /// The write methods that are coalesced; other methods pass through (reads may be ordered).
    pub methods: Vec<Method>,
    /// GET and HEAD take a shared lock on their key.
    pub order_reads: bool,
    pub max_pending_per_key: usize,
    pub max_wait: Duration,
}

impl Default for CoalesceConfig {
    fn default() -> CoalesceConfig {
        CoalesceConfig {
            mode: CoalesceMode::Off,
            methods: DEFAULT_COALESCE_METHODS.to_vec(),
            order_reads: false,
            max_pending_per_key: DEFAULT_MAX_PENDING_PER_KEY,
            max_wait: DEFAULT_MAX_WAIT,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct RouteConfig {
    pub admission: Option<AdmissionConfig>,
    /// Retries of a request that never reached a backend, on another backend.
    pub retries: u32,
    /// Also retry GET, HEAD, PUT and DELETE whose bytes may have reached a backend.
    pub retry_idempotent: bool,
    /// Retries stay under this fraction of requests.
    pub retry_budget: f64,
    pub coalesce: CoalesceConfig,
    /// Idempotency keys, when the route honours them.
    pub idempotency: Option<IdempotencyConfig>,
    /// Durable write buffering, when the route buffers.
    pub buffer: Option<BufferConfig>,
    /// The request key, when the route defines one.
    pub key: Option<KeyRule>,
    pub name: String,
    pub path_prefix: String,
    /// Lower-case host without port; `None` matches any host.
    pub host: Option<String>,
    /// `None` matches any method.
    pub methods: Option<Vec<Method>>,
    /// Index into [`Config::upstreams`].
    pub upstream: usize,
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    pub backend_idle_timeout: Duration,
    pub client_body_timeout: Duration,
    pub max_body: u64,
}

impl Config {
    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                file: path.to_path_buf(),
                line: 0,
                column: 0,
                message: format!("cannot read config file: {e}"),
            }])
        })?;
        Config::parse(path, &text)
    }

    /// Validates `text`; `path` is only used in messages and kept as [`Config::path`].
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigErrors> {
        let mut sink = ErrorSink::new(path, text);
        let Some(file) = schema::read(text, &mut sink) else {
            return Err(sink
                .finish()
                .err()
                .unwrap_or_else(|| ConfigErrors(Vec::new())));
        };
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let config = Validator {
            sink: &mut sink,
            base,
        }
        .config(path, file);
        sink.finish()?;
        Ok(config)
    }

    /// What the config means, on one screen, as printed by `writegate check`: the summary line,
    /// then listeners, routes (→ upstream, key, coalescing, admission) and upstreams with backends.
    pub fn describe(&self) -> String {
        use std::fmt::Write as _;
        let mut out = self.summary();
        out.push_str("\nlisteners:");
        for l in &self.listeners {
            let tls = if l.tls.is_some() { " (tls)" } else { "" };
            let _ = write!(out, "\n  {:<12} {}{tls}", l.name, l.listen);
        }
        out.push_str("\nroutes:");
        for r in &self.routes {
            let mut notes = Vec::new();
            if let Some(key) = &r.key {
                notes.push(format!("key {}", key.source));
            }
            if r.coalesce.mode != CoalesceMode::Off {
                let reads = if r.coalesce.order_reads {
                    ", ordered reads"
                } else {
                    ""
                };
                notes.push(format!("coalesce {:?}{reads}", r.coalesce.mode).to_lowercase());
            }
            if let Some(i) = &r.idempotency {
                let store = match &i.store {
                    IdempotencyStore::Memory { .. } => "memory".to_string(),
                    IdempotencyStore::File { path } => format!("file {}", path.display()),
                    IdempotencyStore::Redis { .. } => "redis".to_string(),
                };
                notes.push(format!("idempotency {} ({store})", i.header));
            }
            if let Some(b) = &r.buffer {
                let when = format!("{:?}", b.when).to_lowercase();
                let store = match &b.store {
                    BufferStore::Log { dir } => format!("in {}", dir.display()),
                    BufferStore::RabbitMq(r) => format!("on rabbitmq {}", r.name),
                };
                notes.push(format!("buffer {when} {store}"));
            }
            if let Some(a) = &r.admission {
                let adaptive = if a.adaptive { " adaptive" } else { "" };
                notes.push(format!("admission {}{adaptive}", a.max_inflight));
            }
            let methods = r.methods.as_ref().map_or_else(
                || "*".to_string(),
                |m| m.iter().map(Method::as_str).collect::<Vec<_>>().join(","),
            );
            let _ = write!(
                out,
                "\n  {:<12} host {} path {} methods {methods} -> {}",
                r.name,
                r.host.as_deref().unwrap_or("*"),
                r.path_prefix,
                self.upstreams[r.upstream].name
            );
            if !notes.is_empty() {
                let _ = write!(out, "  [{}]", notes.join("; "));
            }
        }
        out.push_str("\nupstreams:");
        for u in &self.upstreams {
            let balance = match &u.consistent_hash {
                None => "least_conn".to_string(),
                Some(h) => format!("consistent_hash ({:?})", h.algorithm).to_lowercase(),
            };
            let _ = write!(out, "\n  {:<12} {balance}", u.name);
            if let Some(d) = &u.discovery {
                let resolvers = if d.resolvers.is_empty() {
                    "the system resolver".to_string()
                } else {
                    d.resolvers
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                let _ = write!(
                    out,
                    "\n    discovery {} via {resolvers}, refresh {:?}..{:?}, empty after {}",
                    d.describe(),
                    d.min_refresh,
                    d.max_refresh,
                    d.empty_after
                );
            }
            for b in &u.backends {
                let mut line = format!("\n    {:<28} weight {}", b.label, b.weight);
                if let Some(max) = b.max_inflight {
                    let _ = write!(line, ", max_inflight {max}");
                }
                if b.down {
                    line.push_str(", down");
                }
                out.push_str(&line);
            }
        }
        if let Some(c) = &self.cluster {
            let peers: Vec<&str> = c.peers.iter().map(|p| p.label.as_str()).collect();
            let me = c
                .self_addr
                .map_or("found by listener".to_string(), |a| a.to_string());
            let _ = write!(
                out,
                "\ncluster: peers [{}], self {me}, on_peer_down {}",
                peers.join(", "),
                format!("{:?}", c.on_peer_down).to_lowercase()
            );
            if let Some(d) = &c.discovery {
                let _ = write!(out, ", discovery {}", d.describe());
            }
        }
        out
    }

    /// One line describing the config: the first line of [`Config::describe`].
    pub fn summary(&self) -> String {
        let backends: usize = self.upstreams.iter().map(|u| u.backends.len()).sum();
        format!(
            "{}: ok: {} listener(s), {} route(s), {} upstream(s), {} backend(s)",
            self.path.display(),
            self.listeners.len(),
            self.routes.len(),
            self.upstreams.len(),
            backends
        )
    }
}
