//! Validation: the file schema walked section by section into a [`Config`], every problem recorded
//! with its position. The small value checks every section shares are in `values.rs`.

use super::*;

/// Walks the file schema, converting values and recording every problem.
pub(super) struct Validator<'s, 'a> {
    pub(super) sink: &'s mut ErrorSink<'a>,
    /// The config file's directory: relative paths in the config are relative to it.
    pub(super) base: PathBuf,
}

impl Validator<'_, '_> {
    pub(super) fn config(&mut self, path: &Path, file: FileConfig) -> Config {
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
        let (cluster, cluster_tls) = match file.cluster {
            Some(section) => self.cluster(section),
            None => (None, None),
        };
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
            cluster,
            cluster_tls,
        }
    }

    pub(super) fn path(&self, text: &str) -> PathBuf {
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
        for name in sections.iter().map(|u| &u.name) {
            if name.get_ref().starts_with('[') {
                let message = "an upstream name cannot start with `[` (kept for [cluster])";
                self.sink.at(name.span(), message);
            }
        }
        let mut tls_configs = Vec::new();
        let upstreams = sections
            .into_iter()
            .map(|u| {
                let tls_ca_span = u.tls_ca.as_ref().map(Spanned::span);
                let tls_ca = u.tls_ca.as_ref().map(|c| self.path(c.get_ref()));
                let name_span = u.name.span();
                let consistent_hash = self.hash_config(&u);
                let default_backend_limit = u
                    .max_inflight_per_backend
                    .and_then(|m| self.count("max_inflight_per_backend", m, 1, 1_000_000));
                let admission = u.admission.map(|a| self.admission(a));
                let outlier = self.outlier(u.outlier_detection);
                let health_check = u.health_check.map(|h| self.health_check(h));
                let name = u.name.into_inner();
                let has_discovery = u.discovery.is_some();
                let discovery = u.discovery.and_then(|d| self.discovery(d));
                let backends_span = u.backends.as_ref().map_or(name_span.clone(), Spanned::span);
                let entries = u.backends.map(Spanned::into_inner);
                if entries.as_ref().is_none_or(Vec::is_empty) && !has_discovery {
                    self.sink.at(
                        backends_span.clone(),
                        format!(
                            "upstream {name:?} has no backends: list `backends` or set `discovery`"
                        ),
                    );
                }
                let entries = entries.unwrap_or_default();
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
                let uses_tls = backends.iter().any(|b| b.tls_name.is_some())
                    || discovery.as_ref().is_some_and(|d| d.https);
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
                    discovery,
                    max_inflight_per_backend: default_backend_limit,
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
            let idempotency = r.idempotency.map(|section| {
                let queued = admission
                    .as_ref()
                    .map_or(Duration::ZERO, |a| a.queue_timeout);
                let coalesced = if coalesce.mode == CoalesceMode::Off {
                    Duration::ZERO
                } else {
                    coalesce.max_wait
                };
                let longest = queued + coalesced + connect_timeout + response_timeout;
                self.idempotency(section, idempotency::RouteTimes { longest })
            });
            let route_name = r.name.get_ref().clone();
            let buffer = r.buffer.map(|section| self.buffer(&route_name, section));
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
                    idempotency,
                    buffer,
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
    pub(super) fn count(
        &mut self,
        what: &str,
        n: Spanned<i64>,
        min: i64,
        max: i64,
    ) -> Option<usize> {
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
}
