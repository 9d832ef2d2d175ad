//! Writes with a per-key sequence for the buffering tests: a backend that dedupes on
//! `Idempotency-Key` and records what it applied per key, and a client that sends `key:n`.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

use super::{backend_on, ReservedPort, STEP};

/// A writegate config: one route `kv` to `backend` keyed by the second path segment, with a
/// `[routes.buffer]` of `buffer` lines. Outlier ejection is off so that the backend's return is
/// seen at the next attempt.
pub fn buffered_config(backend: SocketAddr, buffer: &str) -> String {
    format!(
        r#"
[log]
access_log = false

[[listeners]]
name = "main"
listen = "127.0.0.1:0"

[[upstreams]]
name = "kv"
backends = [{{ address = "{backend}" }}]

[upstreams.outlier_detection]
consecutive_failures = 0

[[routes]]
name = "kv"
upstream = "kv"
key = "path_segment:2"
retries = 0

[routes.buffer]
{buffer}
"#
    )
}

/// Longest the buffered writes may take to drain to a backend that is back.
pub const DRAIN: Duration = Duration::from_secs(90);

/// What a backend that dedupes on `Idempotency-Key` applied: per key, the bodies in order.
#[derive(Default)]
pub struct Applied {
    pub seen: HashSet<String>,
    pub per_key: HashMap<String, Vec<u64>>,
    pub deliveries: usize,
}

impl Applied {
    pub fn contains(&self, key: &str, n: u64) -> bool {
        self.per_key.get(key).is_some_and(|list| list.contains(&n))
    }

    /// Fails unless every key's writes were applied in the order they were sent.
    pub fn assert_in_order(&self) {
        for (key, list) in &self.per_key {
            assert!(
                list.windows(2).all(|w| w[0] < w[1]),
                "key {key} applied out of order: {list:?}"
            );
        }
    }

    /// Fails unless the writes of `accepted` (the ones answered 202) were applied, per key, in
    /// the order they were sent. Writes that were refused may be missing or (when the refusal
    /// was a timeout after the store had kept them) applied late, and are not checked.
    pub fn assert_accepted_in_order(&self, accepted: &[(String, u64)]) {
        let taken: HashSet<(&str, u64)> = accepted.iter().map(|(k, n)| (k.as_str(), *n)).collect();
        for (key, list) in &self.per_key {
            let kept: Vec<u64> = list
                .iter()
                .copied()
                .filter(|n| taken.contains(&(key.as_str(), *n)))
                .collect();
            let late: Vec<u64> = list
                .iter()
                .copied()
                .filter(|n| !taken.contains(&(key.as_str(), *n)))
                .collect();
            assert!(
                kept.windows(2).all(|w| w[0] < w[1]),
                "key {key}: accepted writes applied out of order: {kept:?} (refused but applied: {late:?})"
            );
        }
    }
}

/// A deduping backend on `port`: writes carry `key:n` bodies, and a repeated `Idempotency-Key`
/// is answered again without being applied.
pub fn deduping_backend(port: ReservedPort, delay: Duration) -> Arc<Mutex<Applied>> {
    let applied = Arc::new(Mutex::new(Applied::default()));
    let state = Arc::clone(&applied);
    backend_on(port, move |request| {
        let state = Arc::clone(&state);
        async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let id = request.headers["idempotency-key"]
                .to_str()
                .unwrap()
                .to_string();
            let body = String::from_utf8(request.body.to_vec()).unwrap();
            let write = body.split(';').next().unwrap();
            let (key, n) = write.split_once(':').unwrap();
            let mut state = state.lock().unwrap();
            state.deliveries += 1;
            if state.seen.insert(id) {
                let list = state.per_key.entry(key.to_string()).or_default();
                list.push(n.parse().unwrap());
            }
            let mut response = Response::new(Full::new(Bytes::from_static(b"applied")));
            *response.status_mut() = StatusCode::CREATED;
            response
        }
    });
    applied
}

/// Sends the write `key:n` on `client` (reconnecting when needed); the status and `Location`,
/// or `None` when the proxy went away before answering.
pub async fn try_write(
    client: &mut Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>>,
    addr: SocketAddr,
    key: &str,
    n: u64,
) -> Option<(StatusCode, Option<String>)> {
    try_padded_write(client, addr, key, n, "").await
}

/// [`try_write`] with `;padding` after the write in its body.
pub async fn try_padded_write(
    client: &mut Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>>,
    addr: SocketAddr,
    key: &str,
    n: u64,
    padding: &str,
) -> Option<(StatusCode, Option<String>)> {
    if client.as_mut().is_none_or(|c| c.is_closed()) {
        let stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .ok()?;
        tokio::spawn(conn);
        *client = Some(sender);
    }
    let sender = client.as_mut()?;
    sender.ready().await.ok()?;
    let request = Request::builder()
        .method(Method::PUT)
        .uri(format!("/kv/{key}"))
        .header("host", addr.to_string())
        .body(Full::new(Bytes::from(format!("{key}:{n};{padding}"))))
        .unwrap();
    let response = tokio::time::timeout(STEP, sender.send_request(request))
        .await
        .ok()?
        .ok()?;
    let status = response.status();
    let location = response
        .headers()
        .get("location")
        .map(|l| l.to_str().unwrap().to_string());
    response.into_body().collect().await.ok()?;
    Some((status, location))
}

/// Waits (at most [`DRAIN`]) until `done` holds for what the backend applied.
pub async fn drained(applied: &Mutex<Applied>, what: &str, done: impl Fn(&Applied) -> bool) {
    let waited = tokio::time::timeout(DRAIN, async {
        while !done(&applied.lock().unwrap()) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "timed out after {DRAIN:?}: {what}");
}
