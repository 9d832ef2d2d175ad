//! The proxy's error type and its single mapping to a status, a response body and a log label.
//!
//! Every error knows whose fault it is ([`Fault`]) so that logs and, later, metrics can tell a bad
//! client from a failing backend. Response bodies name the route and upstream so that a client can
//! report something useful, and never anything internal (no backend addresses, no error chains).

use std::fmt::Write as _;

use bytes::Bytes;
use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderMap, HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use http::{Response, StatusCode};

use super::coalesced::shared_response;
use super::ResponseBody;
use crate::admission::{Shed, ShedReason};
use crate::coalesce::{Origin, Refusal, SharedResponse};
use crate::http1::Http1Error;
use crate::idempotency::{problem_json, IdempotencyError};
use crate::key::KeySource;
use crate::upstream::SendError;

/// Who caused a failed request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Client,
    Upstream,
    Proxy,
}

/// A request that did not get a backend's response.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no route matches this host and path")]
    NoRoute,
    #[error("the route does not accept this method")]
    MethodNotAllowed,
    #[error("{0}")]
    BadRequest(&'static str),
    #[error("request body is larger than this route's limit of {limit} bytes")]
    BodyTooLarge { limit: u64 },
    /// With the reason the body could not be read (malformed framing, the client gone).
    #[error("reading the request body from the client failed: {0}")]
    ClientBody(String),
    /// The client went silent mid-body; `reached_backend` when part of the request had been
    /// sent (that backend connection is closed, so the backend sees a cut-off request).
    #[error("the client sent no body bytes for {idle:?}")]
    ClientBodyTimeout {
        idle: Duration,
        reached_backend: bool,
    },
    #[error("the request has no key in {0}")]
    MissingKey(KeySource),
    #[error("the request key from {key_source} is longer than {limit} bytes")]
    KeyTooLong { key_source: KeySource, limit: usize },
    #[error("no backend is available")]
    NoBackend,
    #[error("too many requests wait on this key")]
    KeyQueueFull { retry_after: Duration },
    #[error("the request waited too long in its key's queue")]
    KeyWaitTimeout { retry_after: Duration },
    #[error("the backend's response is too large to share with merged writes")]
    ResponseNotShareable,
    /// A backend's response body broke off before any of it reached the client; the reason.
    #[error("the backend's response broke off: {0}")]
    BrokenResponse(String),
    #[error("shed by the {scope} admission limit")]
    Shed { shed: Shed, scope: &'static str },
    #[error("{0}")]
    Upstream(#[from] SendError),
    #[error("{0}")]
    Idempotency(#[from] IdempotencyError),
    #[error("the write buffer is full")]
    BufferFull,
    /// A `writegate-hop` header that no peer signed: the reason.
    #[error("a forged or stale peer hop marker: {0}")]
    ForgedHop(&'static str),
    /// The replica that owns the key cannot be reached and `on_peer_down = "reject"`.
    #[error("the peer {peer} that orders this key is unreachable")]
    PeerDown { peer: Arc<str> },
    /// The buffer's log cannot take the write (a full disk, say); the reason.
    #[error("the write buffer failed: {0}")]
    BufferUnavailable(String),
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::BadRequest(_)
            | ProxyError::ClientBody(_)
            | ProxyError::MissingKey(_)
            | ProxyError::KeyTooLong { .. } => StatusCode::BAD_REQUEST,
            ProxyError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::ClientBodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            ProxyError::Upstream(SendError::Exchange {
                error: Http1Error::Stalled(_),
                ..
            }) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::NoBackend | ProxyError::KeyWaitTimeout { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyError::KeyQueueFull { .. } => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::ResponseNotShareable | ProxyError::BrokenResponse(_) => {
                StatusCode::BAD_GATEWAY
            }
            ProxyError::Shed { shed, .. } => shed.status,
            ProxyError::Upstream(SendError::ConnectTimeout | SendError::ResponseTimeout) => {
                StatusCode::GATEWAY_TIMEOUT
            }
            ProxyError::Upstream(_) => StatusCode::BAD_GATEWAY,
            ProxyError::Idempotency(e) => e.status(),
            ProxyError::BufferFull
            | ProxyError::BufferUnavailable(_)
            | ProxyError::PeerDown { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::ForgedHop(_) => StatusCode::FORBIDDEN,
        }
    }

    /// Whether bytes of the request may have reached a backend (so that it may have applied the
    /// write) although no response of it came back.
    pub fn may_have_reached_backend(&self) -> bool {
        match self {
            ProxyError::Upstream(error) => !error.nothing_sent(),
            ProxyError::ResponseNotShareable | ProxyError::BrokenResponse(_) => true,
            _ => false,
        }
    }

    pub fn fault(&self) -> Fault {
        match self {
            ProxyError::NoRoute
            | ProxyError::MethodNotAllowed
            | ProxyError::BadRequest(_)
            | ProxyError::BodyTooLarge { .. }
            | ProxyError::ClientBody(_)
            | ProxyError::ClientBodyTimeout { .. }
            | ProxyError::MissingKey(_)
            | ProxyError::KeyTooLong { .. }
            | ProxyError::ForgedHop(_) => Fault::Client,
            ProxyError::Idempotency(IdempotencyError::Store(_)) => Fault::Proxy,
            ProxyError::Idempotency(IdempotencyError::Unknown) => Fault::Upstream,
            ProxyError::Idempotency(_) => Fault::Client,
            ProxyError::NoBackend
            | ProxyError::Upstream(_)
            | ProxyError::ResponseNotShareable
            | ProxyError::BrokenResponse(_)
            | ProxyError::PeerDown { .. } => Fault::Upstream,
            ProxyError::KeyQueueFull { .. }
            | ProxyError::KeyWaitTimeout { .. }
            | ProxyError::Shed { .. }
            | ProxyError::BufferFull
            | ProxyError::BufferUnavailable(_) => Fault::Proxy,
        }
    }

    /// A short, stable name for logs.
    pub fn label(&self) -> &'static str {
        match self {
            ProxyError::NoRoute => "no_route",
            ProxyError::MethodNotAllowed => "method_not_allowed",
            ProxyError::BadRequest(_) => "bad_request",
            ProxyError::BodyTooLarge { .. } => "body_too_large",
            ProxyError::ClientBody(_) => "client_body",
            ProxyError::ClientBodyTimeout { .. } => "client_body_timeout",
            ProxyError::MissingKey(_) => "missing_key",
            ProxyError::KeyTooLong { .. } => "key_too_long",
            ProxyError::NoBackend => "no_backend",
            ProxyError::KeyQueueFull { .. } => "key_queue_full",
            ProxyError::KeyWaitTimeout { .. } => "key_wait_timeout",
            ProxyError::ResponseNotShareable => "response_not_shareable",
            ProxyError::BrokenResponse(_) => "broken_response",
            ProxyError::Shed { .. } => "shed",
            ProxyError::Upstream(SendError::Connect(_)) => "connect_failed",
            ProxyError::Upstream(SendError::ConnectTimeout) => "connect_timeout",
            ProxyError::Upstream(SendError::ResponseTimeout) => "response_timeout",
            ProxyError::Upstream(SendError::Exchange { .. }) => "upstream_failed",
            ProxyError::Idempotency(e) => e.label(),
            ProxyError::BufferFull => "buffer_full",
            ProxyError::BufferUnavailable(_) => "buffer_unavailable",
            ProxyError::ForgedHop(_) => "forged_hop",
            ProxyError::PeerDown { .. } => "peer_down",
        }
    }

    /// What the client reads: one line, no internals.
    fn write_client_message(&self, out: &mut String) {
        let text = match self {
            ProxyError::MissingKey(source) => {
                let _ = write!(out, "this route needs a request key in {source}");
                return;
            }
            ProxyError::KeyTooLong { key_source, limit } => {
                let _ = write!(
                    out,
                    "the request key in {key_source} is longer than {limit} bytes"
                );
                return;
            }
            ProxyError::Shed { shed, scope } => {
                let _ = match shed.reason {
                    ShedReason::QueueFull => write!(
                        out,
                        "the {scope} is at its limit of {} requests in flight and its queue of {} is full",
                        shed.limit, shed.max_queue
                    ),
                    ShedReason::QueueTimeout => write!(
                        out,
                        "the {scope} is at its limit of {} requests in flight and this request waited too long in its queue",
                        shed.limit
                    ),
                };
                return;
            }
            ProxyError::ClientBodyTimeout {
                idle,
                reached_backend,
            } => {
                let _ = write!(
                    out,
                    "the client sent no request body bytes for {} s",
                    idle.as_secs_f64()
                );
                if *reached_backend {
                    out.push_str(
                        "; the backend got part of the request and its connection was closed",
                    );
                }
                return;
            }
            ProxyError::Upstream(SendError::Exchange {
                error: Http1Error::Stalled(idle),
                ..
            }) => {
                let _ = write!(
                    out,
                    "the backend stopped reading the request for {} s",
                    idle.as_secs_f64()
                );
                return;
            }
            ProxyError::BodyTooLarge { limit } => {
                let _ = write!(
                    out,
                    "request body is larger than this route allows ({limit} bytes)"
                );
                return;
            }
            ProxyError::NoRoute => "no route matches this host and path",
            ProxyError::MethodNotAllowed => "this route does not accept the request method",
            ProxyError::BadRequest(reason) => reason,
            ProxyError::ClientBody(reason) => {
                let _ = write!(out, "the request body could not be read: {reason}");
                return;
            }
            ProxyError::NoBackend => "no backend is available",
            ProxyError::KeyQueueFull { .. } => "too many requests are waiting on this key",
            ProxyError::KeyWaitTimeout { .. } => {
                "the request waited too long behind earlier writes to its key"
            }
            ProxyError::ResponseNotShareable => {
                "the backend's response is too large to share with merged writes"
            }
            ProxyError::BrokenResponse(reason) => {
                let _ = write!(out, "the backend's response broke off: {reason}");
                return;
            }
            ProxyError::Upstream(SendError::Connect(_)) => "could not connect to a backend",
            ProxyError::Upstream(SendError::ConnectTimeout) => "timed out connecting to a backend",
            ProxyError::Upstream(SendError::ResponseTimeout) => {
                "the backend did not answer within the response timeout"
            }
            ProxyError::Upstream(SendError::Exchange { .. }) => {
                "the backend closed or reset the connection"
            }
            ProxyError::Idempotency(e) => {
                out.push_str(&e.detail());
                return;
            }
            ProxyError::BufferFull => "the write buffer is full; the write was not taken",
            ProxyError::BufferUnavailable(_) => {
                "the write buffer cannot take writes now; the write was not taken"
            }
            ProxyError::ForgedHop(reason) => {
                let _ = write!(out, "the writegate-hop header is not a peer's: {reason}");
                return;
            }
            ProxyError::PeerDown { peer } => {
                let _ = write!(
                    out,
                    "the writegate replica that orders writes to this key ({peer}) is unreachable; the write was not taken"
                );
                return;
            }
        };
        out.push_str(text);
    }

    /// The response a client gets for this error. `route` and `upstream` are named when known.
    pub fn to_response(
        &self,
        route: Option<&str>,
        upstream: Option<&str>,
    ) -> Response<ResponseBody> {
        shared_response(self.to_shared(route, upstream))
    }

    /// The same response, buffered, for every client of a merged write.
    pub fn to_shared(&self, route: Option<&str>, upstream: Option<&str>) -> SharedResponse {
        let status = self.status();
        let origin = Origin::Proxy {
            reached_backend: self.may_have_reached_backend(),
        };
        if let ProxyError::Idempotency(error) = self {
            return problem(error, route, origin);
        }
        let mut body = String::with_capacity(128);
        let _ = write!(
            body,
            "{} {}: ",
            status.as_u16(),
            status.canonical_reason().unwrap_or("")
        );
        self.write_client_message(&mut body);
        match (route, upstream) {
            (Some(r), Some(u)) => {
                let _ = write!(body, " (route \"{r}\", upstream \"{u}\")");
            }
            (Some(r), None) => {
                let _ = write!(body, " (route \"{r}\")");
            }
            (None, Some(u)) => {
                let _ = write!(body, " (upstream \"{u}\")");
            }
            (None, None) => {}
        }
        body.push('\n');
        let mut headers = HeaderMap::new();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        if let Some(after) = self.retry_after() {
            // Whole seconds, rounded up: a client must not come back before there is room.
            let seconds = after.as_secs() + u64::from(after.subsec_nanos() > 0);
            headers.insert(RETRY_AFTER, HeaderValue::from(seconds.max(1)));
        }
        SharedResponse {
            status,
            headers,
            backend_lines: None,
            body: Bytes::from(body),
            backend: None,
            origin,
        }
    }

    /// When a client may try again, for the errors that say "not now".
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ProxyError::NoBackend => Some(Duration::from_secs(1)),
            ProxyError::KeyQueueFull { retry_after }
            | ProxyError::KeyWaitTimeout { retry_after } => Some(*retry_after),
            ProxyError::Shed { shed, .. } => Some(shed.retry_after),
            ProxyError::Idempotency(e) => e.retry_after(),
            ProxyError::BufferFull
            | ProxyError::BufferUnavailable(_)
            | ProxyError::PeerDown { .. } => Some(Duration::from_secs(1)),
            _ => None,
        }
    }

    /// The error for a request its key's queue refused; counts the refusal.
    pub fn refused(refusal: Refusal, route: &str) -> ProxyError {
        let (error, reason) = match refusal {
            Refusal::QueueFull { retry_after } => {
                (ProxyError::KeyQueueFull { retry_after }, "queue_full")
            }
            Refusal::WaitTimeout { retry_after } => {
                (ProxyError::KeyWaitTimeout { retry_after }, "wait_timeout")
            }
        };
        metrics::counter!(crate::metrics::COALESCE_REJECTED, "route" => route.to_string(), "reason" => reason)
            .increment(1);
        error
    }
}

/// An idempotency answer as an RFC 9457 problem document.
fn problem(error: &IdempotencyError, route: Option<&str>, origin: Origin) -> SharedResponse {
    let status = error.status();
    let (kind, title) = error.problem();
    let mut headers = HeaderMap::new();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    if let Some(after) = error.retry_after() {
        headers.insert(RETRY_AFTER, HeaderValue::from(after.as_secs().max(1)));
    }
    SharedResponse {
        status,
        headers,
        backend_lines: None,
        body: problem_json(kind, title, status, &error.detail(), route),
        backend: None,
        origin,
    }
}
