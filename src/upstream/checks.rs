//! Active health checks: a task per backend that asks `GET {path}` every `interval`.
//!
//! A check passes when the backend answers within `timeout` with a status in `expected_status`.
//! `unhealthy_threshold` failures in a row take the backend out of rotation; `healthy_threshold`
//! passes in a row bring it back. Each check uses a fresh connection, so a check also proves that
//! the backend accepts connections. Backends from the config start healthy: a new one serves at
//! once and is taken out only by evidence. Backends that DNS discovery adds to a running proxy
//! start out of rotation (on probation) and come in after `healthy_threshold` passes.

use std::sync::Arc;

use http::header::{HeaderValue, HOST, USER_AGENT};
use http::{HeaderMap, Method, StatusCode, Uri, Version};
use tokio::sync::watch;

use super::{Backend, Upstream};
use crate::config::{HealthCheckConfig, UpstreamConfig};
use crate::wire::{ClientHeaders, ProxyRequest, RequestBody};

/// The running checks of one snapshot; dropping it stops them (a reload starts the next set).
pub struct HealthChecks {
    _stop: watch::Sender<bool>,
}

impl HealthChecks {
    /// Starts the checks of every upstream that has them (`configs` and `upstreams` side by side,
    /// as a snapshot holds them); they end when the returned value is dropped.
    pub fn start(configs: &[UpstreamConfig], upstreams: &[Upstream]) -> HealthChecks {
        let (stop, stopped) = watch::channel(false);
        spawn(configs, upstreams, &stopped);
        HealthChecks { _stop: stop }
    }
}

fn spawn(configs: &[UpstreamConfig], upstreams: &[Upstream], stop: &watch::Receiver<bool>) {
    for (config, upstream) in configs.iter().zip(upstreams.iter()) {
        let Some(check) = &config.health_check else {
            continue;
        };
        for member in upstream.members.iter() {
            let healthy = metrics::gauge!(
                crate::metrics::BACKEND_HEALTHY,
                "upstream" => upstream.name.to_string(),
                "backend" => member.backend.label().to_string()
            );
            // The backend's live state, carried across reloads: a reload must not make a backend
            // that fails its checks look healthy.
            let down = member.backend.health.actively_down();
            healthy.set(if down { 0.0 } else { 1.0 });
            tokio::spawn(check_loop(
                Arc::clone(&member.backend),
                check.clone(),
                upstream.name.clone(),
                healthy,
                stop.clone(),
            ));
        }
    }
}

async fn check_loop(
    backend: Arc<Backend>,
    config: HealthCheckConfig,
    upstream: Box<str>,
    healthy_gauge: metrics::Gauge,
    mut stop: watch::Receiver<bool>,
) {
    let (mut passes, mut failures) = (0u32, 0u32);
    // A backend that is out of rotation (on probation, or failing) is checked at once: it may be
    // ready by now, and a reload must not hold it out for another interval.
    let mut wait = if backend.health.actively_down() {
        std::time::Duration::ZERO
    } else {
        config.interval
    };
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        wait = config.interval;
        let result = check(&backend, &config).await;
        let down = backend.health.actively_down();
        match result {
            Ok(()) => {
                (passes, failures) = (passes + 1, 0);
                if down && passes >= config.healthy_threshold {
                    backend.health.set_actively_down(false);
                    healthy_gauge.set(1.0);
                    tracing::info!(
                        upstream = &*upstream,
                        backend = backend.label(),
                        "backend is healthy again"
                    );
                }
            }
            Err(reason) => {
                (passes, failures) = (0, failures + 1);
                backend.health.check_failed(reason.clone());
                if !down && failures >= config.unhealthy_threshold {
                    backend.health.set_actively_down(true);
                    healthy_gauge.set(0.0);
                    tracing::warn!(
                        upstream = &*upstream,
                        backend = backend.label(),
                        reason = %reason,
                        "backend failed its health checks; out of rotation"
                    );
                }
            }
        }
    }
}

/// `GET path` for `backend`, naming itself.
fn check_request(backend: &Backend, config: &HealthCheckConfig) -> Result<ProxyRequest, String> {
    let uri = Uri::try_from(config.path.as_str()).map_err(|e| format!("request: {e}"))?;
    let host = HeaderValue::from_str(backend.label()).map_err(|e| format!("request: {e}"))?;
    let mut headers = HeaderMap::with_capacity(2);
    headers.insert(HOST, host);
    headers.insert(
        USER_AGENT,
        HeaderValue::from_static("writegate-health-check"),
    );
    Ok(ProxyRequest::new(
        Method::GET,
        uri,
        Version::HTTP_11,
        ClientHeaders::Map(headers),
        RequestBody::Full(None),
    ))
}

/// One check: connect, `GET path`, compare the status.
async fn check(backend: &Backend, config: &HealthCheckConfig) -> Result<(), String> {
    let exchange = async {
        // The same connect as real traffic: TCP, and TLS for https backends.
        let mut conn = backend
            .connect(config.timeout)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let request = check_request(backend, config)?;
        // The connection is dropped after the head: a check needs only the status.
        let timeouts = crate::http1::ExchangeTimeouts {
            response: config.timeout,
            idle: config.timeout,
        };
        let head = conn
            .send(Box::new(request), timeouts, std::time::Instant::now())
            .await
            .map_err(|e| format!("exchange: {}", e.error))?;
        Ok::<StatusCode, String>(head.status)
    };
    let status = tokio::time::timeout(config.timeout, exchange)
        .await
        .map_err(|_| format!("no answer within {:?}", config.timeout))??;
    let (low, high) = config.expected_status;
    if (low..=high).contains(&status.as_u16()) {
        Ok(())
    } else {
        Err(format!("status {status}"))
    }
}
