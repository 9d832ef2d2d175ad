//! The proxy service: one request's path through writegate.
//!
//! route → key → coalescing (`coalesced`, on routes that coalesce) → admission, balancer and
//! retries (`dispatch`) → upstream → response. The service loads the snapshot once per request
//! and uses it to the end. Every request gets exactly one response: a backend's, or one built from
//! a [`ProxyError`]. Nothing here retries a request whose bytes may have reached a backend unless
//! the route says it is idempotent.

mod access;
mod body;
pub mod buffered;
mod clustered;
mod coalesced;
mod dispatch;
pub mod error;
mod idempotent;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::HeaderValue;
use http::{Method, Request, Response, Uri, Version};
use hyper::body::Incoming;

pub use body::{complete_headers, ResponseBody, UpstreamLease};
pub use coalesced::{MAX_SHARED_RESPONSE, X_WRITEGATE_COALESCE};
use error::{Fault, ProxyError};

use crate::cluster::Hop;
use crate::coalesce::Origin;
use crate::http1::server::Handler;
use crate::http1::Http1Error;
use crate::key::{KeyRule, OnMissingKey};
use crate::route::{Route, RouteMatch};
use crate::snapshot::Snapshot;
use crate::upstream::{clock_ms, ms_at, SendError, Upstream};
use crate::wire::headers::{self, Forwarding};
use crate::wire::{
    ClientBody, ClientHeaders, OutgoingRequest, ProxyRequest, RequestBody, RequestBodyError,
    RequestHead,
};

/// What the proxy knows about one client connection; shared by its requests.
#[derive(Debug)]
pub struct ClientConn {
    pub peer: SocketAddr,
    /// The peer's IP, preformatted once per connection for `X-Forwarded-For`.
    peer_ip: HeaderValue,
    /// `http` or `https`, for `X-Forwarded-Proto`.
    scheme: HeaderValue,
    pub activity: ConnActivity,
}

impl ClientConn {
    pub fn new(peer: SocketAddr, tls: bool) -> ClientConn {
        let peer_ip = HeaderValue::from_str(&peer.ip().to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        ClientConn {
            peer,
            peer_ip,
            scheme: HeaderValue::from_static(if tls { "https" } else { "http" }),
            activity: ConnActivity::new(),
        }
    }
}

/// Requests in progress on a connection and when the last one ended, for the idle timeout.
#[derive(Debug)]
pub struct ConnActivity {
    active: AtomicU32,
    idle_since_ms: AtomicU64,
}

impl ConnActivity {
    fn new() -> ConnActivity {
        ConnActivity {
            active: AtomicU32::new(0),
            idle_since_ms: AtomicU64::new(clock_ms()),
        }
    }

    fn begin(&self) -> ActiveRequest<'_> {
        self.active.fetch_add(1, Ordering::Relaxed);
        ActiveRequest {
            activity: self,
            ended: None,
        }
    }

    /// How long the connection has had no request in progress; `None` while one is.
    pub fn idle_for(&self) -> Option<Duration> {
        if self.active.load(Ordering::Relaxed) > 0 {
            return None;
        }
        let since = self.idle_since_ms.load(Ordering::Relaxed);
        Some(Duration::from_millis(clock_ms().saturating_sub(since)))
    }
}

/// A request in progress on a connection, until dropped.
struct ActiveRequest<'a> {
    activity: &'a ConnActivity,
    /// When the request was answered, if the caller has read the clock for it anyway.
    ended: Option<Instant>,
}

impl Drop for ActiveRequest<'_> {
    fn drop(&mut self) {
        // A cancelled request (its client left) has no end time yet.
        let now = self.ended.map_or_else(clock_ms, ms_at);
        self.activity.idle_since_ms.store(now, Ordering::Relaxed);
        self.activity.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The hyper service for one client connection.
#[derive(Clone)]
pub struct ProxyService {
    snapshots: Arc<ArcSwap<Snapshot>>,
    conn: Arc<ClientConn>,
}

/// What one request resolved to, for its error response and access log line.
#[derive(Default)]
struct Exchange<'s> {
    route: Option<&'s Route>,
    upstream: Option<&'s Upstream>,
    backend: Option<Arc<str>>,
    /// The number behind the `X-Request-Id` the proxy generated, when it did.
    request_number: Option<u64>,
    /// Sends after the first, to other backends.
    retries: u32,
    /// A coalesced write's disposition.
    outcome: Option<&'static str>,
    /// Who made the response a coalesced write got (a backend, unless its job failed).
    origin: Origin,
}

/// Requests refused at admission or key-queue limits, summarized in the log.
static OVERLOAD: access::OverloadSummary = access::OverloadSummary::new();

impl ProxyService {
    pub fn new(snapshots: Arc<ArcSwap<Snapshot>>, conn: Arc<ClientConn>) -> ProxyService {
        ProxyService { snapshots, conn }
    }

    /// Answers one request. A backend's header lines may still be pending in the response's body
    /// (written as they came by the HTTP/1 server); see [`body::complete_headers`].
    ///
    /// Not an `async fn` (nor is `forward`): those keep a second copy of their arguments for the
    /// whole request, and every byte of this future is allocated and moved per request.
    pub fn handle(
        self,
        request: OutgoingRequest,
    ) -> impl Future<Output = Response<ResponseBody>> + Send {
        let started = Instant::now();
        let snapshot = self.snapshots.load_full();
        let method = request.head.method.clone();
        // Boxed, and only with the access log on: the plain path carries one pointer.
        let access = snapshot
            .config
            .log
            .access_log
            .then(|| Box::new(self.access_line(&request, started)));
        async move {
            let mut active = self.conn.activity.begin();
            let mut exchange = Exchange::default();
            let mut failure = None;
            let mut response = match self.forward(&snapshot, request, &mut exchange).await {
                Ok(response) => response,
                Err(error) => {
                    failure = Some(error.label());
                    if let (ProxyError::ClientBodyTimeout { .. }, Some(route)) =
                        (&error, exchange.route)
                    {
                        metrics::counter!(crate::metrics::CLIENT_BODY_TIMEOUTS, "route" => route.name.to_string())
                            .increment(1);
                    }
                    if error.fault() == Fault::Proxy {
                        OVERLOAD.note(error.label(), clock_ms());
                    } else if error.fault() != Fault::Client {
                        tracing::warn!(
                            route = exchange.route.map(|r| &*r.name),
                            upstream = exchange.upstream.map(|u| &*u.name),
                            backend = exchange.backend.as_deref(),
                            error = %error,
                            "request failed"
                        );
                    }
                    error.to_response(
                        exchange.route.map(|r| &*r.name),
                        exchange.upstream.map(|u| &*u.name),
                    )
                }
            };
            // A backend's response was complete when its head came: no need to read the clock.
            let ended = response.body().responded_at().unwrap_or_else(Instant::now);
            active.ended = Some(ended);
            drop(active);
            let took = ended - started;
            let route_metrics = exchange.route.map_or(&snapshot.unrouted, |r| &r.metrics);
            route_metrics.record(&method, response.status(), took);
            if let Some(mut line) = access {
                line.head_at = ended;
                line.status = response.status().as_u16();
                line.route = exchange.route.map(|r| r.name.clone());
                line.backend = exchange.backend.take();
                line.retries = exchange.retries;
                line.outcome = failure.or(exchange.outcome).unwrap_or("-");
                if let (access::RequestId::None, Some(n)) =
                    (&line.request_id, exchange.request_number)
                {
                    line.request_id = access::RequestId::Generated(n);
                }
                response.body_mut().log_when_done(line);
            }
            response
        }
    }

    #[allow(clippy::manual_async_fn)] // see `handle`
    fn forward<'a, 's: 'a>(
        &'a self,
        snapshot: &'s Arc<Snapshot>,
        mut request: OutgoingRequest,
        exchange: &'a mut Exchange<'s>,
    ) -> impl Future<Output = Result<Response<ResponseBody>, ProxyError>> + Send + use<'a, 's> {
        async move {
            let head = &request.head;
            if head.uri.path().starts_with(crate::buffer::RECEIPTS_PREFIX)
                && head.method == Method::GET
            {
                return Ok(buffered::receipt_response(snapshot, head.uri.path()).await);
            }
            let route =
                match snapshot
                    .router
                    .find(request_host(head), head.uri.path(), &head.method)
                {
                    RouteMatch::Found(route) => route,
                    RouteMatch::MethodNotAllowed => return Err(ProxyError::MethodNotAllowed),
                    RouteMatch::NotFound => return Err(ProxyError::NoRoute),
                };
            exchange.route = Some(route);
            let upstream = &snapshot.upstreams[route.upstream];
            exchange.upstream = Some(upstream);
            if request
                .body
                .exact_len()
                .is_some_and(|len| len > route.max_body)
            {
                return Err(ProxyError::BodyTooLarge {
                    limit: route.max_body,
                });
            }
            request.body.limit_to(route.max_body);
            request.body.set_idle_timeout(route.client_body_timeout);
            if let Some(policy) = &route.buffer {
                match buffered::take(policy, &request.head) {
                    Some(buffered::Take::Now { asked }) => {
                        exchange.outcome = Some("buffered");
                        let accept = buffered::accept(self, route, policy, request, asked);
                        return Box::pin(accept).await;
                    }
                    Some(buffered::Take::Overflow) => {
                        let sent =
                            buffered::overflow(self, snapshot, route, policy, request, exchange);
                        return Box::pin(sent).await;
                    }
                    None => {}
                }
            }
            if let Some(policy) = &route.idempotency {
                if policy.covers(&request.head.method) {
                    // Boxed like the other rarer paths: the common future stays small.
                    return Box::pin(idempotent::guard(
                        self, snapshot, route, policy, request, exchange,
                    ))
                    .await;
                }
            }
            self.pass(snapshot, route, request, exchange).await
        }
    }

    /// The pipeline after routing: key, coalescing or dispatch, response.
    #[allow(clippy::manual_async_fn)] // see `handle`
    fn pass<'a, 's: 'a>(
        &'a self,
        snapshot: &'s Arc<Snapshot>,
        route: &'s Route,
        mut request: OutgoingRequest,
        exchange: &'a mut Exchange<'s>,
    ) -> impl Future<Output = Result<Response<ResponseBody>, ProxyError>> + Send + use<'a, 's> {
        async move {
            let upstream = &snapshot.upstreams[route.upstream];
            let mut hop = None;
            if let Some(cluster) = &snapshot.cluster {
                match Box::pin(clustered::place(self, cluster, route, request, exchange)).await? {
                    clustered::Placed::Answered(response) => return Ok(*response),
                    clustered::Placed::Here {
                        request: back,
                        hop: peer,
                    } => {
                        request = back;
                        hop = peer;
                    }
                }
            }
            let key = match &route.key {
                Some(rule) => request_key(rule, &request.head)?,
                None => None,
            };
            let mut read_lock = None;
            if let (Some(coalescer), Some(key)) = (&route.coalescer, key) {
                let settings = &route.coalesce;
                let method = &request.head.method;
                if settings.methods.contains(method) {
                    let key = Bytes::copy_from_slice(key);
                    exchange.request_number =
                        Some(self.rewrite_request(&mut request.head, hop.as_ref())?);
                    // The rarer paths are boxed so that the common one's future stays small.
                    return Box::pin(coalesced::write(
                        snapshot, route, coalescer, key, request, exchange,
                    ))
                    .await;
                }
                if settings.order_reads && (method == Method::GET || method == Method::HEAD) {
                    let permit =
                        Box::pin(coalescer.read(Bytes::copy_from_slice(key), settings)).await;
                    read_lock = Some(permit.map_err(|r| ProxyError::refused(r, &route.name))?);
                }
            }
            let key = key.and_then(|k| upstream.balancer.hash_key(k));
            exchange.request_number = Some(self.rewrite_request(&mut request.head, hop.as_ref())?);
            if dispatch::replayable(route, &request.head.method)
                && !http_body::Body::is_end_stream(&request.body)
            {
                // A retry after the bytes reached a backend must send the body again: keep a copy.
                let body = std::mem::replace(&mut request.body, RequestBody::Full(None));
                let copy = Box::pin(coalesced::buffer_body(body, route.max_body)).await?;
                request.body = RequestBody::Full(Some(copy));
            }
            let sent = dispatch::dispatch(route, upstream, key, request).await;
            // A read holds its key until its response head is in: later writes go after it.
            drop(read_lock);
            let sent = sent.map_err(|failed| {
                exchange.backend = failed.backend;
                exchange.retries = failed.retries;
                failed.error
            })?;
            exchange.backend = Some(sent.backend);
            exchange.retries = sent.retries;
            Ok(body::upstream_response(
                sent.head,
                sent.lease,
                route.exchange_timeouts.idle,
            ))
        }
    }

    /// The start of a request's access line: what is known before it is routed.
    fn access_line(&self, request: &ProxyRequest, started: Instant) -> access::AccessLine {
        let head = &request.head;
        let client_id = head
            .headers
            .get("x-request-id")
            .and_then(|id| std::str::from_utf8(id).ok());
        access::AccessLine {
            started,
            head_at: started,
            client: self.conn.peer.ip(),
            method: head.method.clone(),
            uri: head.uri.clone(),
            status: 0,
            route: None,
            backend: None,
            request_id: client_id.map_or(access::RequestId::None, |id| {
                access::RequestId::Client(id.into())
            }),
            retries: 0,
            outcome: "-",
            bytes_in: request.body.exact_len(),
            bytes_out: 0,
            complete: false,
        }
    }

    /// Decides what the backend receives besides the client's head: see [`Forwarding`].
    /// Returns the number of the `X-Request-Id` generated when the client sent none.
    /// A request a peer forwarded (`hop`) is forwarded for the client the peer served.
    fn rewrite_request(
        &self,
        head: &mut RequestHead,
        hop: Option<&Hop>,
    ) -> Result<u64, ProxyError> {
        let uri = &head.uri;
        let mut authority = None;
        if uri.scheme().is_some() || uri.authority().is_some() {
            // HTTP/2 and absolute-form requests carry the host in the URI.
            if let Some(host) = uri.authority() {
                authority = Some(HeaderValue::from_str(host.as_str()).map_err(|_| {
                    ProxyError::BadRequest("the request authority is not a valid Host")
                })?);
            }
            let path = uri
                .path_and_query()
                .cloned()
                .ok_or(ProxyError::BadRequest("the request has no path"))?;
            head.uri = Uri::from(path);
        }
        if authority.is_none()
            && head.version == Version::HTTP_11
            && head.headers.get("host").is_none()
        {
            return Err(ProxyError::BadRequest(
                "an HTTP/1.1 request needs a Host header",
            ));
        }
        let request_number = Forwarding::next_request_number();
        let (client_ip, scheme) = match hop {
            Some(hop) => (hop.client_ip.clone(), hop.scheme.clone()),
            None => (self.conn.peer_ip.clone(), self.conn.scheme.clone()),
        };
        head.forwarding = Some(Forwarding {
            authority,
            client_ip,
            scheme,
            via: headers::via_token(head.version),
            request_number,
        });
        Ok(request_number)
    }
}

/// The HTTP/1 server's view of the proxy.
impl Handler for ProxyService {
    type Body = ResponseBody;

    fn handle(
        self,
        request: OutgoingRequest,
    ) -> impl Future<Output = Response<ResponseBody>> + Send {
        ProxyService::handle(self, request)
    }
}

impl hyper::service::Service<Request<Incoming>> for ProxyService {
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let this = self.clone();
        let (mut parts, body) = request.into_parts();
        headers::strip_hop_by_hop(&mut parts.headers);
        let request = Box::new(ProxyRequest::new(
            parts.method,
            parts.uri,
            parts.version,
            ClientHeaders::Map(parts.headers),
            RequestBody::streaming(ClientBody::H2(body), u64::MAX),
        ));
        Box::pin(async move {
            let mut response = this.handle(request).await;
            body::complete_headers(&mut response);
            Ok(response)
        })
    }
}

/// The request's host without port: from the URI (HTTP/2, absolute-form) or the Host header.
fn request_host(head: &RequestHead) -> Option<&str> {
    let raw = match head.uri.host() {
        Some(host) => host,
        None => std::str::from_utf8(head.headers.get("host")?).ok()?,
    };
    Some(strip_port(raw))
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.split_inclusive(']').next().unwrap_or(host);
    }
    host.rsplit_once(':').map_or(host, |(name, _)| name)
}

/// The request's key under `rule`; `None` only when the route balances keyless requests anyway.
fn request_key<'r>(rule: &KeyRule, head: &'r RequestHead) -> Result<Option<&'r [u8]>, ProxyError> {
    match rule.source.extract(head) {
        Some(key) if key.len() > rule.max_length => Err(ProxyError::KeyTooLong {
            key_source: rule.source.clone(),
            limit: rule.max_length,
        }),
        Some(key) => Ok(Some(key)),
        None if rule.on_missing == OnMissingKey::LeastConn => Ok(None),
        None => Err(ProxyError::MissingKey(rule.source.clone())),
    }
}

/// A failed exchange may really be the client's fault: its body was too large or broke off.
pub(crate) fn classify_send_error(error: SendError, max_body: u64) -> ProxyError {
    match &error {
        SendError::Exchange {
            error: Http1Error::RequestBody(RequestBodyError::TooLarge { .. }),
            ..
        } => ProxyError::BodyTooLarge { limit: max_body },
        SendError::Exchange {
            error: Http1Error::RequestBody(RequestBodyError::Client(reason)),
            ..
        } => ProxyError::ClientBody(reason.to_string()),
        SendError::Exchange {
            error: Http1Error::RequestBody(RequestBodyError::TimedOut(idle)),
            sent,
        } => ProxyError::ClientBodyTimeout {
            idle: *idle,
            reached_backend: *sent,
        },
        _ => ProxyError::Upstream(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_stripped_from_hosts() {
        assert_eq!(strip_port("example.com:8080"), "example.com");
        assert_eq!(strip_port("example.com"), "example.com");
        assert_eq!(strip_port("[::1]:8080"), "[::1]");
        assert_eq!(strip_port("[::1]"), "[::1]");
    }
}
