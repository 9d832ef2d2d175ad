//! The buffering step of the pipeline, for routes with `[routes.buffer]`, and the delivery of
//! buffered writes through the same pipeline.
//!
//! A write the route buffers (every write with `when = "always"`, those sent with `Prefer:
//! respond-async` with `"prefer"`, those admission control would shed with `"overflow"`) is read
//! whole, appended to the log and answered `202 Accepted` with its receipt once the log's commit
//! returned: the write is on disk. Delivery later builds the same request again (method, target,
//! end-to-end headers, body, the original client's forwarding headers) and sends it through
//! [`ProxyService::pass`], so balancing, coalescing and admission apply.

use crate::byte_form::unix_ms;
use std::future::poll_fn;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::{Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE, HOST, LOCATION, RETRY_AFTER};
use http::{HeaderMap, Method, Response, StatusCode, Uri, Version};
use http_body::Body;
use ring::rand::{SecureRandom, SystemRandom};

use super::coalesced::buffer_body;
use super::error::ProxyError;
use super::{request_key, ClientConn, Exchange, ProxyService, ResponseBody};
use crate::buffer::deliver::{Deliver, Delivery};
use crate::buffer::log::LogError;
use crate::buffer::{find_receipt, parse_receipt, BufferPolicy, BufferedWrite, RECEIPTS_PREFIX};
use crate::byte_form::hex;
use crate::config::{BufferConfig, BufferWhen};
use crate::route::Route;
use crate::snapshot::Snapshot;
use crate::wire::{ClientHeaders, OutgoingRequest, ProxyRequest, RequestBody, RequestHead};

static PREFERENCE_APPLIED: HeaderName = HeaderName::from_static("preference-applied");

/// Most of a delivery's response body read (the rest is dropped; a receipt keeps less).
const DELIVERY_BODY_LIMIT: usize = 1 << 20;

/// How a route with a buffer takes this request, if it buffers it at all.
pub(super) enum Take {
    /// Into the log, now; `asked` when the client sent `Prefer: respond-async`.
    Now { asked: bool },
    /// Synchronously while admission admits it, into the log if it would be shed.
    Overflow,
}

pub(super) fn take(policy: &BufferPolicy, head: &RequestHead) -> Option<Take> {
    if !matches!(
        head.method,
        Method::POST | Method::PUT | Method::PATCH | Method::DELETE
    ) {
        return None;
    }
    let asked = head.headers.get_all("prefer").any(prefers_async);
    match policy.config.when {
        BufferWhen::Always => Some(Take::Now { asked }),
        BufferWhen::Prefer => asked.then_some(Take::Now { asked }),
        BufferWhen::Overflow => Some(Take::Overflow),
    }
}

/// Whether a `Prefer` value holds the `respond-async` preference (RFC 7240).
fn prefers_async(value: &[u8]) -> bool {
    value.split(|&b| b == b',').any(|pref| {
        let token = pref.split(|&b| b == b';').next().unwrap_or_default();
        token.trim_ascii().eq_ignore_ascii_case(b"respond-async")
    })
}

/// Takes the write into the log and answers 202 with its receipt.
pub(super) async fn accept(
    service: &ProxyService,
    route: &Route,
    policy: &BufferPolicy,
    mut request: OutgoingRequest,
    asked: bool,
) -> Result<Response<ResponseBody>, ProxyError> {
    let body = std::mem::replace(&mut request.body, RequestBody::Full(None));
    let body = buffer_body(body, route.max_body).await?;
    store(service, route, policy, &request.head, body, asked).await
}

/// Sends the write synchronously; if admission control (or a key queue, or the lack of a healthy
/// backend) would refuse it before any byte was sent, takes it into the log instead.
pub(super) async fn overflow<'a, 's: 'a>(
    service: &'a ProxyService,
    snapshot: &'s Arc<Snapshot>,
    route: &'s Route,
    policy: &'s BufferPolicy,
    mut request: OutgoingRequest,
    exchange: &'a mut Exchange<'s>,
) -> Result<Response<ResponseBody>, ProxyError> {
    let body = std::mem::replace(&mut request.body, RequestBody::Full(None));
    let body = buffer_body(body, route.max_body).await?;
    let head = request.head.clone();
    request.body = RequestBody::Full(Some(body.clone()));
    match service.pass(snapshot, route, request, exchange).await {
        Err(
            ProxyError::Shed { .. }
            | ProxyError::NoBackend
            | ProxyError::KeyQueueFull { .. }
            | ProxyError::KeyWaitTimeout { .. },
        ) => {
            exchange.outcome = Some("buffered");
            store(service, route, policy, &head, body, false).await
        }
        other => other,
    }
}

async fn store(
    service: &ProxyService,
    route: &Route,
    policy: &BufferPolicy,
    head: &RequestHead,
    body: Bytes,
    asked: bool,
) -> Result<Response<ResponseBody>, ProxyError> {
    let buffer = policy.buffer.as_ref().map_err(|reason| {
        refused(route, "error");
        ProxyError::BufferUnavailable(reason.clone())
    })?;
    let key = match &route.key {
        Some(rule) => request_key(rule, head)?.map(Bytes::copy_from_slice),
        None => None,
    };
    let mut receipt = [0; 16];
    SystemRandom::new()
        .fill(&mut receipt)
        .map_err(|_| ProxyError::BufferUnavailable("no random source".into()))?;
    let write = BufferedWrite {
        receipt,
        route: route.name.to_string(),
        key,
        method: head.method.clone(),
        target: head
            .uri
            .path_and_query()
            .map_or_else(|| "/".to_string(), |p| p.to_string()),
        headers: end_to_end(head),
        client_ip: service.conn.peer.ip().to_string(),
        tls: service.conn.scheme == "https",
        body,
        accepted_ms: unix_ms(),
    };
    buffer.accept(write).await.map_err(|error| match error {
        LogError::Full(_) => {
            refused(route, "full");
            ProxyError::BufferFull
        }
        LogError::DiskFull => {
            refused(route, "disk");
            ProxyError::BufferUnavailable(error.to_string())
        }
        LogError::Failed(reason) => {
            refused(route, "error");
            ProxyError::BufferUnavailable(reason)
        }
        LogError::Unconfirmed(reason) => {
            refused(route, "unconfirmed");
            ProxyError::BufferUnavailable(reason)
        }
    })?;
    metrics::counter!(crate::metrics::BUFFER_ACCEPTED, "route" => route.name.to_string())
        .increment(1);
    Ok(accepted(&receipt, asked))
}

fn refused(route: &Route, reason: &'static str) {
    metrics::counter!(crate::metrics::BUFFER_REFUSED, "route" => route.name.to_string(), "reason" => reason)
        .increment(1);
}

/// The client's headers as a map, with the host of an HTTP/2 or absolute-form request as `Host`.
fn end_to_end(head: &RequestHead) -> HeaderMap {
    let mut headers = match &head.headers {
        ClientHeaders::Lines(lines) => lines.to_map(1),
        ClientHeaders::Map(map) => map.clone(),
    };
    if let (None, Some(authority)) = (headers.get(HOST), head.uri.authority()) {
        if let Ok(host) = HeaderValue::from_str(authority.as_str()) {
            headers.insert(HOST, host);
        }
    }
    headers
}

fn accepted(receipt: &[u8; 16], asked: bool) -> Response<ResponseBody> {
    let id = hex(receipt);
    let location = format!("{RECEIPTS_PREFIX}{id}");
    let body =
        format!("{{\"receipt\":\"{id}\",\"state\":\"queued\",\"location\":\"{location}\"}}\n");
    let mut response = Response::new(ResponseBody::full(Bytes::from(body)));
    *response.status_mut() = StatusCode::ACCEPTED;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Ok(value) = HeaderValue::from_str(&location) {
        headers.insert(LOCATION, value);
    }
    if asked {
        headers.insert(
            PREFERENCE_APPLIED.clone(),
            HeaderValue::from_static("respond-async"),
        );
    }
    response
}

/// `GET /_writegate/receipts/ID`: the receipt, from whichever buffer holds it.
pub async fn receipt_response(snapshot: &Snapshot, path: &str) -> Response<ResponseBody> {
    let id = path.strip_prefix(RECEIPTS_PREFIX).and_then(parse_receipt);
    let found = match id {
        Some(id) => Some(find_receipt(&snapshot.buffers(), &id).await),
        None => None,
    };
    let (status, body) = match found {
        None => (
            StatusCode::NOT_FOUND,
            "{\"error\":\"not a receipt id\"}\n".into(),
        ),
        Some(Ok(Some(json))) => (StatusCode::OK, json),
        Some(Ok(None)) => (
            StatusCode::NOT_FOUND,
            "{\"error\":\"no such receipt (unknown, or expired after receipt_ttl)\"}\n".into(),
        ),
        Some(Err(reason)) => {
            tracing::warn!(error = %reason, "reading a receipt failed");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "{\"error\":\"the buffer's store could not be read\"}\n".into(),
            )
        }
    };
    let mut response = Response::new(ResponseBody::full(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// Starts the delivery of every buffer of the current snapshot that has none yet (at start, and
/// after a reload that opened a new one).
pub fn ensure_delivery(snapshots: &Arc<ArcSwap<Snapshot>>) {
    let deliverer: Arc<dyn Deliver> = Arc::new(Deliverer {
        snapshots: Arc::downgrade(snapshots),
    });
    for buffer in snapshots.load().buffers() {
        if let Err(error) = buffer.start_delivery(Arc::clone(&deliverer)) {
            tracing::error!(store = buffer.queue.label(), %error, "cannot start delivering a buffer");
        }
    }
}

/// Stops every buffer's delivery and waits (at most `limit`) for deliveries under way.
pub async fn stop_delivery(snapshot: &Snapshot, limit: Duration) {
    let buffers = snapshot.buffers();
    for buffer in &buffers {
        if let Some(dispatcher) = buffer.dispatcher() {
            dispatcher.stop();
        }
    }
    for buffer in &buffers {
        if let Some(dispatcher) = buffer.dispatcher() {
            dispatcher.wait_idle(limit).await;
        }
    }
}

/// Sends buffered writes through the current snapshot's pipeline. Holds the snapshots weakly:
/// the snapshot holds the buffer, which holds this.
struct Deliverer {
    snapshots: Weak<ArcSwap<Snapshot>>,
}

impl Deliver for Deliverer {
    fn deliver(
        &self,
        write: BufferedWrite,
    ) -> Pin<Box<dyn std::future::Future<Output = Delivery> + Send>> {
        let snapshots = self.snapshots.upgrade();
        Box::pin(async move {
            let Some(snapshots) = snapshots else {
                return Delivery::Failed("the proxy is stopping".into());
            };
            deliver(snapshots, write).await
        })
    }

    fn settings(&self, route: &str) -> Option<BufferConfig> {
        let snapshots = self.snapshots.upgrade()?;
        let snapshot = snapshots.load();
        let found = snapshot.router.routes().iter().find(|r| &*r.name == route);
        found
            .and_then(|r| r.buffer.as_ref())
            .map(|b| b.config.clone())
    }
}

async fn deliver(snapshots: Arc<ArcSwap<Snapshot>>, write: BufferedWrite) -> Delivery {
    let snapshot = snapshots.load_full();
    let Some(route) = snapshot
        .router
        .routes()
        .iter()
        .find(|r| *r.name == write.route)
    else {
        return Delivery::Failed(format!("route {:?} is gone", write.route));
    };
    let ip: IpAddr = write
        .client_ip
        .parse()
        .unwrap_or(IpAddr::from([0, 0, 0, 0]));
    let conn = Arc::new(ClientConn::new(SocketAddr::new(ip, 0), write.tls));
    let service = ProxyService::new(Arc::clone(&snapshots), conn);
    let Ok(uri) = write.target.parse::<Uri>() else {
        return Delivery::Failed(format!("the target {:?} does not parse", write.target));
    };
    let mut headers = write.headers;
    if let Ok(key) = HeaderValue::from_str(&hex(&write.receipt)) {
        headers.insert(HeaderName::from_static("idempotency-key"), key);
    }
    let request = Box::new(ProxyRequest::new(
        write.method,
        uri,
        Version::HTTP_11,
        ClientHeaders::Map(headers),
        RequestBody::Full(Some(write.body)),
    ));
    let mut exchange = Exchange::default();
    match service.pass(&snapshot, route, request, &mut exchange).await {
        Ok(response) => answered(response).await,
        // The route refused it as the client's fault (its body is now over max_body, say): final.
        Err(error) if error.fault() == super::error::Fault::Client => Delivery::Answered {
            status: error.status(),
            body: Bytes::from(error.to_string()),
            retry_after: None,
        },
        Err(error) => Delivery::Failed(error.to_string()),
    }
}

/// A delivery's response, its body read (up to a limit) so that its connection can be reused.
async fn answered(mut response: Response<ResponseBody>) -> Delivery {
    super::body::complete_headers(&mut response);
    let status = response.status();
    let retry_after = response
        .headers()
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let mut body = response.into_body();
    let mut kept = BytesMut::new();
    loop {
        match poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
            None => break,
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    let room = DELIVERY_BODY_LIMIT.saturating_sub(kept.len());
                    kept.extend_from_slice(&data[..data.len().min(room)]);
                }
            }
            Some(Err(error)) => {
                return Delivery::Failed(format!("the response broke off: {error}"));
            }
        }
    }
    Delivery::Answered {
        status,
        body: kept.freeze(),
        retry_after,
    }
}
