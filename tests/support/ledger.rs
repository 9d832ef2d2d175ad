//! A backend that records, per key, the order of the writes it receives and how many of one key
//! were ever in flight at once: the witness of the coalescing and cluster tests.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Response, StatusCode};
use http_body_util::Full;

use super::{backend, Gate, Received, TestBackend};

/// What a recording backend saw, per key (the second path segment).
#[derive(Default)]
pub struct Ledger {
    /// Request bodies per key, in arrival order.
    pub order: HashMap<String, Vec<String>>,
    pub inflight: HashMap<String, usize>,
    /// Most writes of one key ever in flight at once.
    pub max_concurrent_per_key: usize,
}

/// A backend that records per-key order and concurrency, holds each request until `gate` (when
/// given) releases it, and answers `ok:<body>` with the status asked for in `x-status`.
pub async fn ledger_backend(
    gate: Option<Gate>,
    delay: Duration,
) -> (TestBackend, Arc<Mutex<Ledger>>) {
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let state = Arc::clone(&ledger);
    let entered = gate.clone();
    let b = backend(move |r: Received| {
        let (state, gate) = (Arc::clone(&state), entered.clone());
        async move {
            let key = r.uri.path().split('/').nth(2).unwrap_or("").to_string();
            let body = String::from_utf8_lossy(&r.body).into_owned();
            {
                let mut l = state.lock().unwrap();
                let label = if r.method == Method::GET {
                    "GET".to_string()
                } else {
                    body.clone()
                };
                l.order.entry(key.clone()).or_default().push(label);
                if r.method != Method::GET {
                    let n = l.inflight.entry(key.clone()).or_default();
                    *n += 1;
                    let n = *n;
                    l.max_concurrent_per_key = l.max_concurrent_per_key.max(n);
                }
            }
            if let Some(gate) = gate {
                gate.hold().await;
            }
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            if r.method != Method::GET {
                *state.lock().unwrap().inflight.get_mut(&key).unwrap() -= 1;
            }
            let status = r
                .headers
                .get("x-status")
                .and_then(|v| v.to_str().ok()?.parse::<u16>().ok())
                .unwrap_or(200);
            let mut response = Response::new(Full::new(Bytes::from(format!("ok:{body}"))));
            *response.status_mut() = StatusCode::from_u16(status).unwrap();
            response
        }
    })
    .await;
    (b, ledger)
}

pub fn order(ledger: &Arc<Mutex<Ledger>>, key: &str) -> Vec<String> {
    ledger
        .lock()
        .unwrap()
        .order
        .get(key)
        .cloned()
        .unwrap_or_default()
}
