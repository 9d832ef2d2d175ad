//! Sending a request upstream: admission, choice of backend, retries, outcome recording.
//!
//! Both the streaming path and the coalescer's jobs go through [`dispatch`], so every request
//! obeys the same rules. A request is retried on another backend (the key's next one, with
//! consistent hashing) only when no byte of it reached the first backend (nothing of it was
//! written, or the connection was never made), or, on a route with `retry_idempotent = true`, when
//! it is a GET, HEAD, PUT or DELETE whose body can be replayed (empty or buffered). Retries count
//! against `retries` and the route's retry budget, so they cannot multiply an outage.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::Method;

use super::body::UpstreamLease;
use super::classify_send_error;
use super::error::ProxyError;
use crate::admission::AdmissionPermit;
use crate::balance::KeyHash;
use crate::http1::{Http1Error, ResponseHead};
use crate::route::Route;
use crate::upstream::{clock_ms, ms_at, Outcome, SendError, Upstream};
use crate::wire::{OutgoingRequest, ProxyRequest, RequestBody, RequestHead};

/// A response head from a backend, with what must be held until its body is read.
pub(super) struct Dispatched {
    pub head: ResponseHead,
    pub lease: UpstreamLease,
    pub backend: Arc<str>,
    /// Sends before this one, to other backends.
    pub retries: u32,
}

/// A request that got no backend response; `backend` is the last one tried, if any.
pub(super) struct NotDispatched {
    pub error: ProxyError,
    pub backend: Option<Arc<str>>,
    pub retries: u32,
}

impl From<ProxyError> for NotDispatched {
    fn from(error: ProxyError) -> NotDispatched {
        NotDispatched {
            error,
            backend: None,
            retries: 0,
        }
    }
}

/// Sends `request` on `route` to a backend of `upstream` (chosen by `key` when the upstream hashes).
/// Not an `async fn`, which would keep a second copy of the request for the whole exchange.
#[allow(clippy::manual_async_fn)] // see the doc comment
pub(super) fn dispatch<'a>(
    route: &'a Route,
    upstream: &'a Upstream,
    key: Option<KeyHash>,
    mut request: OutgoingRequest,
) -> impl Future<Output = Result<Dispatched, NotDispatched>> + Send + 'a {
    async move {
        let admission = admit(route, upstream).await?;
        route.retry_budget.deposit();
        let replay = Replay::capture(route, &request);
        let mut tried = Vec::new();
        let mut last_failure: Option<NotDispatched> = None;
        loop {
            // One clock read serves the pick, the pool and the response timeout.
            let sent_at = Instant::now();
            let Some((index, member, inflight)) = upstream.pick(key, &tried, ms_at(sent_at)) else {
                // With nowhere left to retry, the client hears of the failure that really happened.
                return Err(last_failure.unwrap_or(NotDispatched {
                    error: ProxyError::NoBackend,
                    backend: None,
                    retries: 0,
                }));
            };
            let backend = member.backend.shared_label();
            match member
                .backend
                .send(
                    request,
                    route.connect_timeout,
                    route.exchange_timeouts,
                    sent_at,
                )
                .await
            {
                Ok((head, conn)) => {
                    let responded = Instant::now();
                    member.metrics.responded(head.status, responded - sent_at);
                    let failed = head.status.is_server_error();
                    member.backend.count_exchange(failed);
                    let outcome = if failed {
                        Outcome::Failure
                    } else {
                        Outcome::Success
                    };
                    upstream.record(index, outcome, ms_at(responded));
                    for permit in admission.iter().flatten() {
                        permit.responded();
                    }
                    let lease = UpstreamLease {
                        conn,
                        inflight,
                        admission,
                        responded,
                    };
                    return Ok(Dispatched {
                        head,
                        lease,
                        backend,
                        retries: tried.len() as u32,
                    });
                }
                Err(failure) => {
                    member.metrics.failed();
                    member.backend.count_exchange(true);
                    if let SendError::Exchange {
                        error: Http1Error::Stalled(_),
                        ..
                    } = &failure.error
                    {
                        member.metrics.stalls.increment(1);
                    }
                    let error = classify_send_error(failure.error, route.max_body);
                    if !matches!(error, ProxyError::Upstream(_)) {
                        // The client's body was too large or broke off: not the backend's fault.
                        return Err(NotDispatched {
                            error,
                            backend: Some(backend),
                            retries: tried.len() as u32,
                        });
                    }
                    upstream.record(index, Outcome::Failure, clock_ms());
                    let again = failure
                        .unsent
                        .or_else(|| replay.as_deref().map(Replay::request));
                    let allowed = tried.len() < route.retries as usize;
                    match again {
                        Some(next) if allowed && route.retry_budget.withdraw() => {
                            tracing::debug!(
                                route = &*route.name,
                                backend = &*backend,
                                error = %error,
                                "retrying on another backend"
                            );
                            tried.push(index);
                            request = next;
                            // Sends so far, less the first (the retry is not sent yet).
                            last_failure = Some(NotDispatched {
                                error,
                                backend: Some(backend),
                                retries: tried.len() as u32 - 1,
                            });
                        }
                        _ => {
                            return Err(NotDispatched {
                                error,
                                backend: Some(backend),
                                retries: tried.len() as u32,
                            })
                        }
                    }
                }
            }
        }
    }
}

/// Takes the route's and the upstream's admission permits, in that order.
async fn admit(
    route: &Route,
    upstream: &Upstream,
) -> Result<[Option<AdmissionPermit>; 2], ProxyError> {
    let route_permit = match &route.admission {
        Some(limiter) => Some(limiter.acquire().await.map_err(|shed| ProxyError::Shed {
            shed,
            scope: "route",
        })?),
        None => None,
    };
    let upstream_permit = match &upstream.admission {
        Some(limiter) => Some(limiter.acquire().await.map_err(|shed| ProxyError::Shed {
            shed,
            scope: "upstream",
        })?),
        None => None,
    };
    Ok([route_permit, upstream_permit])
}

/// A copy of an idempotent request, kept to send again after its bytes may have reached a backend.
struct Replay {
    head: RequestHead,
    body: Option<Bytes>,
}

/// Whether a request of `method` on `route` may be sent again after its bytes reached a backend
/// (its body is then buffered, so that it can be).
pub(super) fn replayable(route: &Route, method: &Method) -> bool {
    route.retry_idempotent
        && route.retries > 0
        && matches!(
            *method,
            Method::GET | Method::HEAD | Method::PUT | Method::DELETE
        )
}

impl Replay {
    /// Boxed: only idempotent routes keep a copy, and the common future should not hold room for it.
    fn capture(route: &Route, request: &ProxyRequest) -> Option<Box<Replay>> {
        if !replayable(route, &request.head.method) {
            return None;
        }
        let body = match &request.body {
            RequestBody::Full(data) => data.clone(),
            RequestBody::Streaming { inner, .. } if http_body::Body::is_end_stream(inner) => None,
            // A streamed body cannot be sent twice.
            RequestBody::Streaming { .. } => return None,
        };
        Some(Box::new(Replay {
            head: request.head.clone(),
            body,
        }))
    }

    fn request(&self) -> OutgoingRequest {
        Box::new(ProxyRequest {
            head: self.head.clone(),
            body: RequestBody::Full(self.body.clone()),
        })
    }
}
