//! The admin listener: `/healthz` (alive), `/readyz` (this process serves: its listeners are
//! bound and a config is loaded), `/readyz/upstream/NAME` (that upstream has a usable backend),
//! `/status` (JSON: config, reloads, upstreams, backends, routes), `/metrics` (Prometheus), and
//! the write buffers: `/buffers` (each log's depth and dead letters), `POST /buffers/replay/ID`
//! (a dead letter back into its log) and the receipts under `/_writegate/receipts/`.
//!
//! Readiness is the process's, not its backends': a load balancer probing `/readyz` of every
//! replica would otherwise pull them all when one pool dies, although each still serves every
//! other route (and answers that pool's requests with a fast 503).
//!
//! It is a separate listener, loopback by default, so that health probes never compete with client
//! traffic for routes and never reach a backend.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use std::sync::OnceLock;
use std::time::{Instant, SystemTime};

use crate::admission::Limiter;
use crate::buffer::{parse_receipt, RECEIPTS_PREFIX};
use crate::byte_form::hex;
use crate::cluster::Cluster;
use crate::config::OnPeerDown;
use crate::config::{HashAlgorithm, UpstreamConfig};
use crate::discovery::{Discovered, CLUSTER_PEERS};
use crate::proxy::buffered::receipt_response;
use crate::proxy::ResponseBody;
use crate::reload::{ReloadState, ReloadStatus};
use crate::snapshot::Snapshot;
use crate::upstream::clock_ms;

/// The status page: one self-contained file (no CDN, no external font or script) that renders
/// `/status` every two seconds.
const STATUS_PAGE: &str = include_str!("status_page.html");

#[derive(Clone)]
pub struct AdminService {
    snapshots: Arc<ArcSwap<Snapshot>>,
    reloads: Arc<ReloadState>,
}

impl AdminService {
    pub fn new(snapshots: Arc<ArcSwap<Snapshot>>, reloads: Arc<ReloadState>) -> AdminService {
        AdminService { snapshots, reloads }
    }

    fn respond(&self, request: &Request<Incoming>) -> Response<ResponseBody> {
        match request.uri().path() {
            "/healthz" => text(StatusCode::OK, "ok\n".to_string()),
            "/status" => json(status(&self.snapshots.load(), &self.reloads.status())),
            "/metrics" => match crate::metrics::handle() {
                Some(handle) => {
                    let snapshot = self.snapshots.load();
                    for buffer in snapshot.buffers() {
                        buffer.record_gauges();
                    }
                    let mut scrape = current_series_only(&handle.render(), &snapshot);
                    scrape.push_str(&crate::metrics::process_metrics());
                    let mut response = text(StatusCode::OK, scrape);
                    response.headers_mut().insert(
                        CONTENT_TYPE,
                        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                    );
                    response
                }
                None => text(
                    StatusCode::NOT_FOUND,
                    "metrics are not enabled in this process\n".to_string(),
                ),
            },
            "/" => {
                let mut page = text(StatusCode::OK, STATUS_PAGE.to_string());
                page.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("text/html; charset=utf-8"),
                );
                page
            }
            // The admin listener runs only once the proxy's listeners are bound and its config
            // loaded, and stops with them.
            "/readyz" => text(StatusCode::OK, "ready\n".to_string()),
            path => match path.strip_prefix("/readyz/upstream/") {
                Some(name) => upstream_readiness(&self.snapshots.load(), name),
                None => text(
                    StatusCode::NOT_FOUND,
                    "not found: try /healthz, /readyz, /readyz/upstream/NAME, /status, /metrics \
                     or /buffers\n"
                        .to_string(),
                ),
            },
        }
    }
}

/// Every buffer's log: depth, bytes, oldest age, the routes that write to it, and its first 100
/// dead letters.
async fn buffers_state(snapshot: &Snapshot) -> serde_json::Value {
    let mut buffers = Vec::new();
    for buffer in snapshot.buffers() {
        let mut state = buffer.state(DEAD_LETTERS_SHOWN).await;
        let routes: Vec<&str> = snapshot
            .router
            .routes()
            .iter()
            .filter(|r| {
                let open = r.buffer.as_ref().and_then(|b| b.buffer.as_ref().ok());
                open.is_some_and(|b| Arc::ptr_eq(b, &buffer))
            })
            .map(|r| &*r.name)
            .collect();
        state["routes"] = serde_json::json!(routes);
        buffers.push(state);
    }
    serde_json::json!({ "buffers": buffers })
}

/// Dead letters listed per log by `/buffers`.
const DEAD_LETTERS_SHOWN: usize = 100;

/// `POST /buffers/replay/ID`: puts a dead letter back in its log, for delivery at its end.
async fn replay(snapshots: Arc<ArcSwap<Snapshot>>, id: &str) -> Response<ResponseBody> {
    let Some(id) = parse_receipt(id) else {
        return text(StatusCode::NOT_FOUND, "not a receipt id\n".to_string());
    };
    for buffer in snapshots.load_full().buffers() {
        match buffer.replay(id).await {
            Ok(true) => {
                let location = format!("{RECEIPTS_PREFIX}{}", hex(&id));
                return json(
                    serde_json::json!({ "receipt": hex(&id), "state": "queued", "location": location }),
                );
            }
            Ok(false) => {}
            Err(error) => {
                return text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("the buffer's log failed: {error}\n"),
                )
            }
        }
    }
    text(
        StatusCode::NOT_FOUND,
        "no dead letter has this receipt\n".to_string(),
    )
}

/// The scrape without the samples of backends, upstreams and routes the running config no longer
/// has. The exporter keeps every series it has seen (it has no way to delete one), and a removed
/// backend's last `writegate_backend_healthy` would otherwise stay in every scrape, for ever.
fn current_series_only(scrape: &str, snapshot: &Snapshot) -> String {
    use std::collections::HashSet;
    let backends: HashSet<&str> = snapshot
        .upstreams
        .iter()
        .flat_map(|u| u.members.iter().map(|m| m.backend.label()))
        .collect();
    let upstreams: HashSet<&str> = snapshot.upstreams.iter().map(|u| &*u.name).collect();
    let routes: HashSet<&str> = snapshot
        .router
        .routes()
        .iter()
        .map(|r| &*r.name)
        .chain(["-"])
        .collect();
    let current = |line: &str| {
        let known = |label: &str, set: &HashSet<&str>| {
            label_value(line, label).is_none_or(|value| set.contains(value))
        };
        line.starts_with('#')
            || (known("backend", &backends)
                && known("upstream", &upstreams)
                && known("route", &routes))
    };
    let mut out = String::with_capacity(scrape.len());
    for line in scrape.lines().filter(|line| current(line)) {
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// The value of `label` in a sample line (`name{a="x",b="y"} 1`), when it has one. Values here
/// are config names and addresses: no escaped quotes to care for.
fn label_value<'l>(line: &'l str, label: &str) -> Option<&'l str> {
    let labels = &line[line.find('{')? + 1..line.find('}')?];
    labels.split("\",").find_map(|pair| {
        let value = pair.strip_prefix(label)?.strip_prefix("=\"")?;
        Some(value.strip_suffix('"').unwrap_or(value))
    })
}

/// `/readyz/upstream/NAME`: 200 while the upstream has a usable backend, 503 while it has none.
fn upstream_readiness(snapshot: &Snapshot, name: &str) -> Response<ResponseBody> {
    match snapshot.upstreams.iter().find(|u| &*u.name == name) {
        None => text(
            StatusCode::NOT_FOUND,
            format!("no upstream named {name:?}\n"),
        ),
        Some(u) if u.has_usable_backend() => text(StatusCode::OK, "ready\n".to_string()),
        Some(_) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: no usable backend in upstream {name:?}\n"),
        ),
    }
}

/// Seconds since the epoch, as JSON numbers are.
fn time(t: Option<SystemTime>) -> Option<f64> {
    t.and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map(|d| d.as_secs_f64())
}

/// The `/status` document: the running config and what reloads did.
fn status(snapshot: &Snapshot, reloads: &ReloadStatus) -> serde_json::Value {
    serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": uptime_seconds(),
        "config_file": snapshot.config.path.display().to_string(),
        // The process serves; each upstream says whether it has a usable backend.
        "ready": true,
        "upstreams": upstreams_status(snapshot),
        "cluster": snapshot.cluster.as_ref().map(|c| cluster_status(snapshot, c)),
        "routes": routes_status(snapshot),
        "reload": {
            "ok": reloads.error.is_none(),
            "error": reloads.error,
            "last_attempt": time(reloads.last_attempt),
            "last_success": time(reloads.last_success),
            "last_changes": reloads.last_changes,
            "succeeded": reloads.succeeded,
            "failed": reloads.failed,
        },
    })
}

fn upstreams_status(snapshot: &Snapshot) -> Vec<serde_json::Value> {
    let now = clock_ms();
    snapshot
        .config
        .upstreams
        .iter()
        .zip(snapshot.upstreams.iter())
        .map(|(config, upstream)| {
            let backends: Vec<serde_json::Value> = snapshot
                .backend_configs(config)
                .iter()
                .map(|b| {
                    let member = upstream.members.iter().find(|m| m.backend.label() == b.label);
                    match member {
                        None => serde_json::json!({ "address": b.label, "weight": b.weight.get(), "down": true }),
                        Some(m) => serde_json::json!({
                            "address": b.label,
                            "weight": m.weight,
                            "inflight": m.backend.inflight(),
                            "max_inflight": m.max_inflight,
                            "usable": m.usable(now),
                            "ejected": m.backend.health.is_ejected(now),
                            "failing_health_checks": m.backend.health.actively_down(),
                            "last_health_check_failure": m.backend.health.last_check_failure(),
                            "last_state_change": m.backend.health.last_change(),
                            "requests": m.backend.exchange_counts().0,
                            "errors": m.backend.exchange_counts().1,
                            "idle_connections": m.backend.idle_connections(),
                        }),
                    }
                })
                .collect();
            serde_json::json!({
                "name": config.name,
                "balance": balance_name(config),
                "ready": upstream.has_usable_backend(),
                "inflight": upstream.inflight.load(std::sync::atomic::Ordering::Relaxed),
                "admission": upstream.admission.as_deref().map(limiter_status),
                "discovery": snapshot.discovered.get(config.name.as_str()).map(discovery_status),
                "backends": backends,
            })
        })
        .collect()
}

fn cluster_status(snapshot: &Snapshot, cluster: &Cluster) -> serde_json::Value {
    let now = clock_ms();
    let peers: Vec<serde_json::Value> = cluster
        .peers
        .members
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let (requests, errors) = m.backend.exchange_counts();
            serde_json::json!({
                "address": m.backend.label(),
                "self": cluster.self_index() == Some(i),
                "usable": m.usable(now),
                "ejected": m.backend.health.is_ejected(now),
                "inflight": m.backend.inflight(),
                "forwarded": requests,
                "errors": errors,
            })
        })
        .collect();
    let on_peer_down = match cluster.on_peer_down {
        OnPeerDown::Local => "local",
        OnPeerDown::Reject => "reject",
    };
    serde_json::json!({
        "on_peer_down": on_peer_down,
        "discovery": snapshot.discovered.get(CLUSTER_PEERS).map(discovery_status),
        "peers": peers,
    })
}

fn discovery_status(discovered: &Discovered) -> serde_json::Value {
    let status = discovered.status.get();
    serde_json::json!({
        "name": discovered.config.describe(),
        "backends": discovered.found.len(),
        "last_lookup": time(status.last_lookup),
        "last_result": status.last_result,
        "ttl_seconds": status.ttl.map(|t| t.as_secs_f64()),
        "error": status.error,
        "empty_in_a_row": status.empty_in_a_row,
        "failed_in_a_row": status.failed_in_a_row,
        "changes": status.changes,
    })
}

fn balance_name(config: &UpstreamConfig) -> String {
    match &config.consistent_hash {
        None => "least_conn".to_string(),
        Some(h) => {
            let algorithm = match h.algorithm {
                HashAlgorithm::Rendezvous => "rendezvous",
                HashAlgorithm::Ketama => "ketama",
            };
            match h.balance_factor {
                Some(f) => format!("consistent_hash ({algorithm}, bounded loads {f})"),
                None => format!("consistent_hash ({algorithm})"),
            }
        }
    }
}

fn limiter_status(limiter: &Limiter) -> serde_json::Value {
    let config = limiter.config();
    serde_json::json!({
        "limit": limiter.limit(),
        "inflight": limiter.inflight(),
        "queued": limiter.queued(),
        "shed": limiter.shed_total(),
        "max_inflight": config.max_inflight,
        "max_queue": config.max_queue,
        "adaptive": config.adaptive,
    })
}

fn routes_status(snapshot: &Snapshot) -> Vec<serde_json::Value> {
    snapshot
        .config
        .routes
        .iter()
        .filter_map(|config| {
            let route = snapshot.router.routes().iter().find(|r| *r.name == config.name)?;
            Some(serde_json::json!({
                "name": config.name,
                "host": config.host,
                "path_prefix": config.path_prefix,
                "methods": config.methods.as_ref().map(|m| m.iter().map(|m| m.as_str().to_string()).collect::<Vec<_>>()),
                "upstream": snapshot.config.upstreams[config.upstream].name,
                "key": config.key.as_ref().map(|k| k.source.to_string()),
                "coalesce": {
                    "mode": format!("{:?}", config.coalesce.mode).to_lowercase(),
                    "order_reads": config.coalesce.order_reads,
                    "active_keys": route.coalescer.as_ref().map(|c| c.active_keys()),
                    "writes": route.coalescer.as_ref().map(|c| {
                        let [sent, merged, superseded] = c.outcome_counts();
                        serde_json::json!({ "sent": sent, "merged": merged, "superseded": superseded })
                    }),
                },
                "admission": route.admission.as_deref().map(limiter_status),
                "buffer": route.buffer.as_ref().map(|b| serde_json::json!({
                    "when": format!("{:?}", b.config.when).to_lowercase(),
                    "store": b.config.store.id(),
                    "open": b.buffer.is_ok(),
                    "error": b.buffer.as_ref().err(),
                    "depth": b.buffer.as_ref().ok().map(|b| b.queue.depth()),
                })),
                "retries": config.retries,
                "retry_idempotent": config.retry_idempotent,
                "requests": route.metrics.counts().0,
                "server_errors": route.metrics.counts().1,
                "latency": {
                    "bounds_seconds": crate::metrics::DURATION_BUCKETS,
                    "counts": route.metrics.latency_counts(),
                },
            }))
        })
        .collect()
}

/// Seconds since the process started (from `/proc`; where it cannot tell, since this module
/// was first used).
fn uptime_seconds() -> f64 {
    static FIRST_USE: OnceLock<Instant> = OnceLock::new();
    let first_use = *FIRST_USE.get_or_init(Instant::now);
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    match crate::metrics::process_start_time() {
        Some(start) if start <= now => now - start,
        _ => first_use.elapsed().as_secs_f64(),
    }
}

fn json(value: serde_json::Value) -> Response<ResponseBody> {
    let mut body = serde_json::to_string_pretty(&value).unwrap_or_else(|_| "{}".to_string());
    body.push('\n');
    let mut response = text(StatusCode::OK, body);
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn text(status: StatusCode, body: String) -> Response<ResponseBody> {
    let mut response = Response::new(ResponseBody::full(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

impl hyper::service::Service<Request<Incoming>> for AdminService {
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let path = request.uri().path();
        if request.method() == Method::POST {
            if let Some(id) = path.strip_prefix("/buffers/replay/") {
                let (snapshots, id) = (Arc::clone(&self.snapshots), id.to_string());
                return Box::pin(async move { Ok(replay(snapshots, &id).await) });
            }
        }
        if path == "/buffers" || path.starts_with(RECEIPTS_PREFIX) {
            let (snapshots, path) = (Arc::clone(&self.snapshots), path.to_string());
            return Box::pin(async move {
                let snapshot = snapshots.load_full();
                Ok(match path.as_str() {
                    "/buffers" => json(buffers_state(&snapshot).await),
                    _ => receipt_response(&snapshot, &path).await,
                })
            });
        }
        let response = self.respond(&request);
        Box::pin(async move { Ok(response) })
    }
}
