//! Configuration: reading a TOML file into a validated [`Config`].
//!
//! Two layers, as in most careful servers: [`file`] is the serde schema (shape only, unknown fields
//! refused), and this module turns it into a `Config` whose values are already typed (durations,
//! socket addresses, byte counts, non-zero weights). Validation never stops at the first problem: it
//! reports every one with file, line and column ([`ConfigErrors`]). Nothing here panics on input,
//! because a bad hot reload must leave the running proxy untouched.

mod error;
pub mod file;
mod schema;
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
use error::ErrorSink;
pub use error::{ConfigError, ConfigErrors};
use file::{
    BalanceKind, CoalesceModeKind, FileConfig, HashAlgorithmKind, OnMissingKeyKind, TimeoutsSection,
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
    pub backends: Vec<BackendConfig>,
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

/// Walks the file schema, converting values and recording every problem.
struct Validator<'s, 'a> {
    sink: &'s mut ErrorSink<'a>,
    /// The config file's directory: relative paths in the config are relative to it.
    base: PathBuf,
}

impl Validator<'_, '_> {
    fn config(&mut self, path: &Path, file: FileConfig) -> Config {
        let runtime = file.runtime.map_or(
            RuntimeConfig {
                workers: None,
                shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
            },
            |r| RuntimeConfig {
                workers: r.workers.and_then(|w| self.workers(w)),
                shutdown_timeout: self.duration(r.shutdown_timeout, DEFAULT_SHUTDOWN_TIMEOUT),
            },
        );
        let log = LogConfig {
            access_log: file.log.and_then(|l| l.access_log).unwrap_or(true),
        };
        let admin = file.admin.and_then(|a| {
            self.socket_addr(&a.listen)
                .map(|listen| AdminConfig { listen })
        });
        let (listeners, listener_tls) = self.listeners(file.listeners);
        let (upstreams, upstream_tls) = self.upstreams(file.upstreams);
        let routes = self.routes(file.routes, &upstreams);
        Config {
            path: path.to_path_buf(),
            runtime,
            log,
            admin,
            listeners,
            upstreams,
            routes,
            listener_tls,
            upstream_tls,
        }
    }

    fn path(&self, text: &str) -> PathBuf {
        self.base.join(text)
    }

    /// Reads a listener's certificate files now, so that a bad file is an error at its position.
    fn listener_tls(
        &mut self,
        tls: Spanned<file::TlsSection>,
    ) -> Option<(ListenerTls, Arc<rustls::ServerConfig>)> {
        let span = tls.span();
        let tls = tls.into_inner();
        let files = ListenerTls {
            cert: self.path(tls.cert.get_ref()),
            key: self.path(tls.key.get_ref()),
            client_ca: tls.client_ca.as_ref().map(|c| self.path(c.get_ref())),
        };
        match crate::tls::server_config(&files.cert, &files.key, files.client_ca.as_deref()) {
            Ok(loaded) => Some((files, loaded)),
            Err(e) => {
                self.sink.at(span, e);
                None
            }
        }
    }

    fn listeners(
        &mut self,
        sections: Vec<file::ListenerSection>,
    ) -> (Vec<ListenerConfig>, Vec<Option<Arc<rustls::ServerConfig>>>) {
        if sections.is_empty() {
            self.sink
                .at(0..0, "no [[listeners]]: at least one is needed");
        }
        self.unique_names("listener", sections.iter().map(|l| &l.name));
        let mut seen_addrs = HashSet::new();
        let mut out = Vec::new();
        let mut loaded_tls = Vec::new();
        for l in sections {
            let listen = self.socket_addr(&l.listen);
            if let Some(addr) = listen {
                if addr.port() != 0 && !seen_addrs.insert(addr) {
                    self.sink.at(
                        l.listen.span(),
                        format!("address {addr} is used by another listener"),
                    );
                }
            }
            let header_read_timeout =
                self.duration(l.header_read_timeout, DEFAULT_HEADER_READ_TIMEOUT);
            let idle_timeout = self.duration(l.idle_timeout, DEFAULT_IDLE_TIMEOUT);
            let tls = l.tls.and_then(|t| self.listener_tls(t));
            if let Some(listen) = listen {
                let (tls, loaded) = tls.map_or((None, None), |(f, l)| (Some(f), Some(l)));
                out.push(ListenerConfig {
                    name: l.name.into_inner(),
                    listen,
                    header_read_timeout,
                    idle_timeout,
                    tls,
                });
                loaded_tls.push(loaded);
            }
        }
        (out, loaded_tls)
    }

    fn upstreams(
        &mut self,
        sections: Vec<file::UpstreamSection>,
    ) -> (Vec<UpstreamConfig>, Vec<Option<Arc<rustls::ClientConfig>>>) {
        self.unique_names("upstream", sections.iter().map(|u| &u.name));
        let mut tls_configs = Vec::new();
        let upstreams = sections
            .into_iter()
            .map(|u| {
                let tls_ca_span = u.tls_ca.as_ref().map(Spanned::span);
                let tls_ca = u.tls_ca.as_ref().map(|c| self.path(c.get_ref()));
                let consistent_hash = self.hash_config(&u);
                let default_backend_limit = u
                    .max_inflight_per_backend
                    .and_then(|m| self.count("max_inflight_per_backend", m, 1, 1_000_000));
                let admission = u.admission.map(|a| self.admission(a));
                let outlier = self.outlier(u.outlier_detection);
                let health_check = u.health_check.map(|h| self.health_check(h));
                let name = u.name.into_inner();
                let backends_span = u.backends.span();
                let entries = u.backends.into_inner();
                if entries.is_empty() {
                    self.sink.at(
                        backends_span.clone(),
                        format!("upstream {name:?} has no backends"),
                    );
                }
                let mut seen = HashSet::new();
                let mut backends = Vec::new();
                for entry in entries {
                    let weight = self.weight(entry.weight);
                    let address_span = entry.address.span();
                    let Some(address) = self.backend_addr(&entry.address) else {
                        continue;
                    };
                    let (address, tls_name) = address;
                    if !seen.insert(address) {
                        self.sink.at(
                            address_span,
                            format!("backend {address} is listed twice in upstream {name:?}"),
                        );
                        continue;
                    }
                    if let Some(weight) = weight {
                        backends.push(BackendConfig {
                            label: entry.address.into_inner(),
                            address,
                            weight,
                            down: entry.down.unwrap_or(false),
                            max_inflight: entry
                                .max_inflight
                                .and_then(|m| self.count("max_inflight", m, 1, 1_000_000))
                                .or(default_backend_limit),
                            tls_name,
                        });
                    }
                }
                if consistent_hash.is_some() && backends.len() > MAX_HASH_BACKENDS {
                    self.sink.at(
                        backends_span.clone(),
                        format!("upstream {name:?} lists more than {MAX_HASH_BACKENDS} backends"),
                    );
                }
                let uses_tls = backends.iter().any(|b| b.tls_name.is_some());
                let tls = if uses_tls {
                    match crate::tls::client_config(tls_ca.as_deref()) {
                        Ok(config) => Some(config),
                        Err(e) => {
                            self.sink
                                .at(tls_ca_span.clone().unwrap_or(backends_span.clone()), e);
                            None
                        }
                    }
                } else {
                    None
                };
                tls_configs.push(tls);
                UpstreamConfig {
                    name,
                    consistent_hash,
                    backends,
                    admission,
                    outlier,
                    health_check,
                    tls_ca,
                }
            })
            .collect();
        (upstreams, tls_configs)
    }

    /// Two routes with the same host and path_prefix whose methods overlap: the second would
    /// never match (nginx refuses a duplicate location the same way).
    fn no_shadowed_routes(&mut self, sections: &[file::RouteSection]) {
        let shape = |r: &file::RouteSection| {
            let host = r.host.as_ref().map(|h| h.get_ref().to_ascii_lowercase());
            let prefix = r
                .path_prefix
                .as_ref()
                .map_or_else(|| "/".to_string(), |p| p.get_ref().clone());
            let methods: Option<Vec<String>> = r
                .methods
                .as_ref()
                .map(|m| m.iter().map(|m| m.get_ref().to_ascii_uppercase()).collect());
            (host, prefix, methods)
        };
        for (i, later) in sections.iter().enumerate() {
            let (host, prefix, methods) = shape(later);
            let shadowed_by = sections[..i].iter().find(|earlier| {
                let (h, p, m) = shape(earlier);
                let overlap = match (&m, &methods) {
                    (Some(a), Some(b)) => a.iter().any(|x| b.contains(x)),
                    _ => true,
                };
                // Same names are reported as duplicates already.
                h == host
                    && p == prefix
                    && overlap
                    && earlier.name.get_ref() != later.name.get_ref()
            });
            if let Some(earlier) = shadowed_by {
                self.sink.at(
                    later.name.span(),
                    format!(
                        "route {:?} has the same host, path_prefix and methods as route {:?}: one of them would never match",
                        later.name.get_ref(),
                        earlier.name.get_ref()
                    ),
                );
            }
        }
    }

    fn routes(
        &mut self,
        sections: Vec<file::RouteSection>,
        upstreams: &[UpstreamConfig],
    ) -> Vec<RouteConfig> {
        self.unique_names("route", sections.iter().map(|r| &r.name));
        self.no_shadowed_routes(&sections);
        let mut out = Vec::new();
        for r in sections {
            let upstream = upstreams
                .iter()
                .position(|u| u.name == *r.upstream.get_ref());
            if upstream.is_none() {
                let known: Vec<&str> = upstreams.iter().map(|u| u.name.as_str()).collect();
                self.sink.at(
                    r.upstream.span(),
                    format!(
                        "route {:?} names unknown upstream {:?} (known: {})",
                        r.name.get_ref(),
                        r.upstream.get_ref(),
                        if known.is_empty() {
                            "none".to_string()
                        } else {
                            known.join(", ")
                        }
                    ),
                );
            }
            let path_prefix = match r.path_prefix {
                Some(p) if !p.get_ref().starts_with('/') => {
                    self.sink.at(p.span(), "path_prefix must start with '/'");
                    None
                }
                Some(p) => Some(p.into_inner()),
                None => Some("/".to_string()),
            };
            let host = r.host.and_then(|h| self.host(h));
            let methods = r.methods.map(|methods| {
                methods
                    .into_iter()
                    .filter_map(|m| self.method(m))
                    .collect::<Vec<_>>()
            });
            let timeouts = r.timeouts.unwrap_or(TimeoutsSection {
                connect: None,
                response: None,
                backend_idle: None,
                client_body: None,
            });
            let connect_timeout = self.duration(timeouts.connect, DEFAULT_CONNECT_TIMEOUT);
            let response_timeout = self.duration(timeouts.response, DEFAULT_RESPONSE_TIMEOUT);
            let backend_idle_timeout =
                self.duration(timeouts.backend_idle, DEFAULT_BACKEND_IDLE_TIMEOUT);
            let client_body_timeout =
                self.duration(timeouts.client_body, DEFAULT_CLIENT_BODY_TIMEOUT);
            let max_body = self.max_body(r.max_body);
            let admission = r.admission.map(|a| self.admission(a));
            let retries = r
                .retries
                .map_or(Some(DEFAULT_RETRIES as usize), |n| {
                    self.count("retries", n, 0, 10)
                })
                .unwrap_or(0) as u32;
            let retry_budget = r.retry_budget.map_or(DEFAULT_RETRY_BUDGET, |b| {
                let value = *b.get_ref();
                if (0.0..=1.0).contains(&value) {
                    value
                } else {
                    self.sink.at(
                        b.span(),
                        format!("retry_budget {value} is out of range: use 0.0 to 1.0"),
                    );
                    DEFAULT_RETRY_BUDGET
                }
            });
            let wrote_key = r.key.is_some();
            let key = self.key_rule(r.key, r.on_missing_key, r.max_key_length);
            let coalesce = r.coalesce.map_or_else(CoalesceConfig::default, |c| {
                let span = c.span();
                self.coalesce(c.into_inner(), span, wrote_key, r.name.get_ref())
            });
            if let Some(u) = upstream {
                if upstreams[u].consistent_hash.is_some() && !wrote_key {
                    self.sink.at(
                        r.upstream.span(),
                        format!(
                            "route {:?} sends to consistent_hash upstream {:?}, so it needs a key (key = \"header:NAME\", ...)",
                            r.name.get_ref(),
                            r.upstream.get_ref()
                        ),
                    );
                }
            }
            if let (Some(upstream), Some(path_prefix)) = (upstream, path_prefix) {
                out.push(RouteConfig {
                    admission,
                    retries,
                    retry_idempotent: r.retry_idempotent.unwrap_or(false),
                    retry_budget,
                    coalesce,
                    key,
                    name: r.name.into_inner(),
                    path_prefix,
                    host,
                    methods,
                    upstream,
                    connect_timeout,
                    response_timeout,
                    backend_idle_timeout,
                    client_body_timeout,
                    max_body,
                });
            }
        }
        out
    }

    /// A whole number in `min..=max`, or an error at its position.
    fn count(&mut self, what: &str, n: Spanned<i64>, min: i64, max: i64) -> Option<usize> {
        let value = *n.get_ref();
        if (min..=max).contains(&value) {
            usize::try_from(value).ok()
        } else {
            self.sink.at(
                n.span(),
                format!("{what} {value} is out of range: use {min} to {max}"),
            );
            None
        }
    }

    fn admission(&mut self, a: Spanned<file::AdmissionSection>) -> AdmissionConfig {
        let a = a.into_inner();
        let max_inflight = self
            .count("max_inflight", a.max_inflight, 1, 1_000_000)
            .unwrap_or(1);
        let min_inflight = a
            .min_inflight
            .and_then(|m| {
                let span = m.span();
                let value = self.count("min_inflight", m, 1, 1_000_000)?;
                if value > max_inflight {
                    self.sink.at(
                        span,
                        format!("min_inflight {value} is above max_inflight {max_inflight}"),
                    );
                    return None;
                }
                Some(value)
            })
            .unwrap_or(1);
        let shed_status = match a.shed_status {
            None => http::StatusCode::SERVICE_UNAVAILABLE,
            Some(s) => match *s.get_ref() {
                429 => http::StatusCode::TOO_MANY_REQUESTS,
                503 => http::StatusCode::SERVICE_UNAVAILABLE,
                other => {
                    self.sink.at(
                        s.span(),
                        format!("shed_status {other} is not allowed: use 503 or 429"),
                    );
                    http::StatusCode::SERVICE_UNAVAILABLE
                }
            },
        };
        AdmissionConfig {
            max_inflight,
            max_queue: a
                .max_queue
                .and_then(|q| self.count("max_queue", q, 0, 1_000_000))
                .unwrap_or(DEFAULT_MAX_QUEUE),
            queue_timeout: self.duration(a.queue_timeout, DEFAULT_QUEUE_TIMEOUT),
            shed_status,
            adaptive: a.adaptive.unwrap_or(false),
            min_inflight,
        }
    }

    fn outlier(&mut self, o: Option<file::OutlierSection>) -> OutlierConfig {
        let Some(o) = o else {
            return OutlierConfig::default();
        };
        let base_ejection_time = self.duration(o.base_ejection_time, DEFAULT_BASE_EJECTION_TIME);
        let max_span = o.max_ejection_time.as_ref().map(Spanned::span);
        let max_ejection_time = self.duration(o.max_ejection_time, DEFAULT_MAX_EJECTION_TIME);
        if max_ejection_time < base_ejection_time {
            self.sink.at(
                max_span.unwrap_or(0..0),
                "max_ejection_time is shorter than base_ejection_time",
            );
        }
        OutlierConfig {
            consecutive_failures: o
                .consecutive_failures
                .map_or(Some(DEFAULT_CONSECUTIVE_FAILURES as usize), |n| {
                    self.count("consecutive_failures", n, 0, 1000)
                })
                .unwrap_or(0) as u32,
            base_ejection_time,
            max_ejection_time,
            max_ejection_percent: o
                .max_ejection_percent
                .map_or(Some(DEFAULT_MAX_EJECTION_PERCENT as usize), |n| {
                    self.count("max_ejection_percent", n, 0, 100)
                })
                .unwrap_or(0) as u32,
        }
    }

    fn health_check(&mut self, h: file::HealthCheckSection) -> HealthCheckConfig {
        if !h.path.get_ref().starts_with('/') {
            self.sink
                .at(h.path.span(), "health_check.path must start with '/'");
        }
        let expected_status = match h.expected_status {
            None => (200, 399),
            Some(text) => {
                let parsed = text.get_ref().split_once('-').map_or_else(
                    || text.get_ref().parse::<u16>().ok().map(|s| (s, s)),
                    |(a, b)| Some((a.trim().parse::<u16>().ok()?, b.trim().parse::<u16>().ok()?)),
                );
                match parsed {
                    Some((a, b)) if (100..=599).contains(&a) && (a..=599).contains(&b) => (a, b),
                    _ => {
                        self.sink.at(
                            text.span(),
                            format!(
                                "expected_status {:?}: use a status or a range such as \"200-399\"",
                                text.get_ref()
                            ),
                        );
                        (200, 399)
                    }
                }
            }
        };
        let threshold = |this: &mut Self, what: &str, n: Option<Spanned<i64>>, default: u32| {
            n.map_or(Some(default as usize), |n| this.count(what, n, 1, 100))
                .unwrap_or(default as usize) as u32
        };
        HealthCheckConfig {
            path: h.path.into_inner(),
            interval: self.duration(h.interval, DEFAULT_HEALTH_INTERVAL),
            timeout: self.duration(h.timeout, DEFAULT_HEALTH_TIMEOUT),
            healthy_threshold: threshold(
                self,
                "healthy_threshold",
                h.healthy_threshold,
                DEFAULT_HEALTHY_THRESHOLD,
            ),
            unhealthy_threshold: threshold(
                self,
                "unhealthy_threshold",
                h.unhealthy_threshold,
                DEFAULT_UNHEALTHY_THRESHOLD,
            ),
            expected_status,
        }
    }

    fn hash_config(&mut self, u: &file::UpstreamSection) -> Option<HashConfig> {
        let hashed = u
            .balance
            .as_ref()
            .is_some_and(|b| *b.get_ref() == BalanceKind::ConsistentHash);
        if !hashed {
            for (present, span, option) in [
                (
                    u.hash_algorithm.is_some(),
                    u.hash_algorithm.as_ref().map(Spanned::span),
                    "hash_algorithm",
                ),
                (
                    u.hash_balance_factor.is_some(),
                    u.hash_balance_factor.as_ref().map(Spanned::span),
                    "hash_balance_factor",
                ),
                (
                    u.hash_balance_min_inflight.is_some(),
                    u.hash_balance_min_inflight.as_ref().map(Spanned::span),
                    "hash_balance_min_inflight",
                ),
            ] {
                if present {
                    self.sink.at(
                        span.unwrap_or(0..0),
                        format!("{option} applies only to balance = \"consistent_hash\""),
                    );
                }
            }
            return None;
        }
        let algorithm = match u.hash_algorithm.as_ref().map(|a| *a.get_ref()) {
            None | Some(HashAlgorithmKind::Rendezvous) => HashAlgorithm::Rendezvous,
            Some(HashAlgorithmKind::Ketama) => HashAlgorithm::Ketama,
        };
        let balance_factor = u.hash_balance_factor.as_ref().and_then(|f| {
            let value = *f.get_ref();
            if value.is_finite() && (1.0..=100.0).contains(&value) {
                Some(value)
            } else {
                self.sink.at(
                    f.span(),
                    format!(
                        "hash_balance_factor {value} is out of range: use 1.0 to 100 (e.g. 1.25)"
                    ),
                );
                None
            }
        });
        let balance_min_inflight = u
            .hash_balance_min_inflight
            .clone()
            .map_or(Some(DEFAULT_HASH_BALANCE_MIN_INFLIGHT), |n| {
                self.count("hash_balance_min_inflight", n, 0, 1_000_000)
            })
            .unwrap_or(DEFAULT_HASH_BALANCE_MIN_INFLIGHT);
        Some(HashConfig {
            algorithm,
            balance_factor,
            balance_min_inflight,
        })
    }

    fn key_rule(
        &mut self,
        key: Option<Spanned<String>>,
        on_missing: Option<Spanned<OnMissingKeyKind>>,
        max_length: Option<Spanned<String>>,
    ) -> Option<KeyRule> {
        let Some(key) = key else {
            if let Some(o) = on_missing {
                self.sink
                    .at(o.span(), "on_missing_key needs a key on the route");
            }
            if let Some(m) = max_length {
                self.sink
                    .at(m.span(), "max_key_length needs a key on the route");
            }
            return None;
        };
        let source = KeySource::parse(key.get_ref())
            .map_err(|e| self.sink.at(key.span(), e))
            .ok()?;
        let on_missing = match on_missing.map(Spanned::into_inner) {
            None | Some(OnMissingKeyKind::Reject) => OnMissingKey::Reject,
            Some(OnMissingKeyKind::LeastConn) => OnMissingKey::LeastConn,
        };
        let max_length = match max_length {
            None => DEFAULT_MAX_KEY_LENGTH,
            Some(text) => match units::parse_size(text.get_ref()) {
                Ok(n) if (1..=MAX_KEY_LENGTH_LIMIT).contains(&n) => n as usize,
                Ok(_) => {
                    self.sink
                        .at(text.span(), "max_key_length must be from 1 byte to 64KiB");
                    DEFAULT_MAX_KEY_LENGTH
                }
                Err(e) => {
                    self.sink.at(text.span(), e);
                    DEFAULT_MAX_KEY_LENGTH
                }
            },
        };
        Some(KeyRule {
            source,
            on_missing,
            max_length,
        })
    }

    fn coalesce(
        &mut self,
        c: file::CoalesceSection,
        span: Range<usize>,
        has_key: bool,
        route: &str,
    ) -> CoalesceConfig {
        let mut out = CoalesceConfig::default();
        if let Some(mode) = c.mode {
            out.mode = match mode.into_inner() {
                CoalesceModeKind::Off => CoalesceMode::Off,
                CoalesceModeKind::Serialize => CoalesceMode::Serialize,
                CoalesceModeKind::Dedupe => CoalesceMode::Dedupe,
                CoalesceModeKind::Latest => CoalesceMode::Latest,
            };
        }
        if out.mode != CoalesceMode::Off && !has_key {
            self.sink.at(
                span.clone(),
                format!("route {route:?} coalesces writes per key, so it needs a key (key = \"header:NAME\", ...)"),
            );
        }
        if let Some(methods) = c.methods {
            out.methods = Vec::new();
            for m in methods {
                let span = m.span();
                if let Some(method) = self.method(m) {
                    if method == Method::GET || method == Method::HEAD {
                        self.sink.at(
                            span,
                            "coalesce.methods lists writes; reads are ordered with order_reads = true",
                        );
                    } else {
                        out.methods.push(method);
                    }
                }
            }
        }
        if let Some(order) = c.order_reads {
            out.order_reads = *order.get_ref();
            if out.order_reads && out.mode == CoalesceMode::Off {
                self.sink.at(
                    order.span(),
                    "order_reads needs a coalescing mode (serialize, dedupe or latest)",
                );
            }
        }
        if let Some(n) = c.max_pending_per_key {
            match *n.get_ref() {
                v @ 1..=MAX_PENDING_PER_KEY_LIMIT => out.max_pending_per_key = v as usize,
                v => self.sink.at(
                    n.span(),
                    format!("max_pending_per_key {v} is out of range: use 1 to {MAX_PENDING_PER_KEY_LIMIT}"),
                ),
            }
        }
        out.max_wait = self.duration(c.max_wait, DEFAULT_MAX_WAIT);
        out
    }

    fn unique_names<'n>(&mut self, kind: &str, names: impl Iterator<Item = &'n Spanned<String>>) {
        let mut seen = HashSet::new();
        for name in names {
            if name.get_ref().is_empty() {
                self.sink.at(name.span(), format!("{kind} name is empty"));
            } else if !seen.insert(name.get_ref().as_str()) {
                self.sink.at(
                    name.span(),
                    format!("duplicate {kind} name {:?}", name.get_ref()),
                );
            }
        }
    }

    fn socket_addr(&mut self, text: &Spanned<String>) -> Option<SocketAddr> {
        match text.get_ref().parse::<SocketAddr>() {
            Ok(addr) => Some(addr),
            Err(_) => {
                self.sink.at(
                    text.span(),
                    format!(
                        "bad address {:?}: expected IP:PORT such as \"127.0.0.1:8080\" or \"[::1]:8080\"",
                        text.get_ref()
                    ),
                );
                None
            }
        }
    }

    /// A backend is `host:port`, `http://host:port` or `https://host[:port]`; a name is resolved
    /// once, when the config is loaded. Returns the address and, for https, the TLS name.
    fn backend_addr(&mut self, text: &Spanned<String>) -> Option<(SocketAddr, Option<String>)> {
        let raw = text.get_ref();
        let (rest, tls, default_port) = if let Some(rest) = raw.strip_prefix("https://") {
            (rest, true, Some(443))
        } else if let Some(rest) = raw.strip_prefix("http://") {
            (rest, false, Some(80))
        } else {
            (raw.as_str(), false, None)
        };
        let has_port = rest
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.chars().all(|c| c.is_ascii_digit()))
            && !rest.ends_with(']');
        let with_port = match (has_port, default_port) {
            (false, Some(port)) => format!("{rest}:{port}"),
            _ => rest.to_string(),
        };
        let addr = self.socket_or_name(&with_port, text.span())?;
        let tls_name = tls.then(|| {
            let host = with_port
                .rsplit_once(':')
                .map_or(with_port.as_str(), |(h, _)| h);
            host.trim_start_matches('[')
                .trim_end_matches(']')
                .to_string()
        });
        Some((addr, tls_name))
    }

    fn socket_or_name(&mut self, value: &str, span: Range<usize>) -> Option<SocketAddr> {
        if let Ok(addr) = value.parse::<SocketAddr>() {
            return self.nonzero_port(addr, span);
        }
        let Some((host, port)) = value.rsplit_once(':') else {
            self.sink.at(
                span.clone(),
                format!(
                    "bad backend address {value:?}: expected HOST:PORT such as \"127.0.0.1:9001\""
                ),
            );
            return None;
        };
        if host.is_empty() || port.parse::<u16>().is_err() {
            self.sink.at(
                span.clone(),
                format!(
                    "bad backend address {value:?}: expected HOST:PORT with a port from 1 to 65535"
                ),
            );
            return None;
        }
        match value.to_socket_addrs().map(|mut addrs| addrs.next()) {
            Ok(Some(addr)) => self.nonzero_port(addr, span.clone()),
            Ok(None) | Err(_) => {
                self.sink.at(
                    span.clone(),
                    format!("cannot resolve backend address {value:?}"),
                );
                None
            }
        }
    }

    fn nonzero_port(&mut self, addr: SocketAddr, span: Range<usize>) -> Option<SocketAddr> {
        if addr.port() == 0 {
            self.sink
                .at(span, format!("backend address {addr} has port 0"));
            return None;
        }
        Some(addr)
    }

    fn weight(&mut self, weight: Option<Spanned<i64>>) -> Option<NonZeroU32> {
        let Some(weight) = weight else {
            return NonZeroU32::new(1);
        };
        let value = *weight.get_ref();
        if !(1..=MAX_WEIGHT).contains(&value) {
            self.sink.at(
                weight.span(),
                format!("weight {value} is out of range: use 1 to {MAX_WEIGHT}"),
            );
            return None;
        }
        u32::try_from(value).ok().and_then(NonZeroU32::new)
    }

    fn workers(&mut self, workers: Spanned<i64>) -> Option<usize> {
        let value = *workers.get_ref();
        if value == 0 {
            return None;
        }
        if !(1..=MAX_WORKERS).contains(&value) {
            self.sink.at(
                workers.span(),
                format!("workers {value} is out of range: use 0 (one per core) to {MAX_WORKERS}"),
            );
            return None;
        }
        usize::try_from(value).ok()
    }

    fn duration(&mut self, text: Option<Spanned<String>>, default: Duration) -> Duration {
        let Some(text) = text else {
            return default;
        };
        match units::parse_duration(text.get_ref()) {
            Ok(d) if d.is_zero() => {
                self.sink
                    .at(text.span(), "duration must be greater than zero");
                default
            }
            Ok(d) if d > MAX_DURATION => {
                self.sink.at(
                    text.span(),
                    format!("duration {:?} is too long: at most 1h", text.get_ref()),
                );
                default
            }
            Ok(d) => d,
            Err(message) => {
                self.sink.at(text.span(), message);
                default
            }
        }
    }

    fn max_body(&mut self, text: Option<Spanned<String>>) -> u64 {
        let Some(text) = text else {
            return DEFAULT_MAX_BODY;
        };
        match units::parse_size(text.get_ref()) {
            Ok(size) if size > MAX_BODY_LIMIT => {
                self.sink.at(
                    text.span(),
                    format!("max_body {:?} is too large: at most 64GiB", text.get_ref()),
                );
                DEFAULT_MAX_BODY
            }
            Ok(size) => size,
            Err(message) => {
                self.sink.at(text.span(), message);
                DEFAULT_MAX_BODY
            }
        }
    }

    fn host(&mut self, host: Spanned<String>) -> Option<String> {
        let value = host.get_ref();
        let valid = !value.is_empty()
            && value
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
        if !valid {
            self.sink.at(
                host.span(),
                format!("bad host {value:?}: expected a DNS name such as \"api.example.com\", without port"),
            );
            return None;
        }
        Some(value.to_ascii_lowercase())
    }

    fn method(&mut self, method: Spanned<String>) -> Option<Method> {
        let value = method.get_ref();
        let upper = value.to_ascii_uppercase();
        match Method::from_bytes(upper.as_bytes()) {
            Ok(m) if !value.is_empty() => Some(m),
            _ => {
                self.sink.at(method.span(), format!("bad method {value:?}"));
                None
            }
        }
    }
}
