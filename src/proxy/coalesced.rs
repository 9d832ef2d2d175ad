//! The request path of a write on a coalescing route.
//!
//! The body is buffered (up to the route's `max_body`): it is compared for `dedupe` and may be sent
//! on behalf of other clients. The write then goes through its key's queue in the route's
//! [`Coalescer`]; the upstream exchange runs as a [`Job`] that owns everything it needs (the
//! snapshot the request started with included), so it completes even when its clients have left.
//! Its response is buffered too, so that every merged client can get a copy.

use std::future::{poll_fn, Future};
use std::sync::Arc;
use std::task::Poll;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::Response;

use super::body::ResponseBody;
use super::dispatch::{dispatch, Dispatched};
use super::error::{Fault, ProxyError};
use super::Exchange;
use crate::coalesce::{Coalescer, Disposition, Fingerprint, Job, Origin, SharedResponse};
use crate::config::CoalesceMode;
use crate::route::Route;
use crate::snapshot::Snapshot;
use crate::upstream::{SendError, Upstream};
use crate::wire::{read_whole, OutgoingRequest, RequestBody, RequestBodyError};

/// Largest backend response a coalescing route buffers to share; larger ones answer 502.
pub const MAX_SHARED_RESPONSE: usize = 16 << 20;

pub static X_WRITEGATE_COALESCE: HeaderName = HeaderName::from_static("x-writegate-coalesce");

/// Queues the write `request` on its key and answers with what its key's queue decided.
/// Not an `async fn` (nor is `exchange`): those keep a second copy of their arguments.
#[allow(clippy::manual_async_fn)]
pub(super) fn write<'a, 's: 'a>(
    snapshot: &'a Arc<Snapshot>,
    route: &'s Route,
    coalescer: &'a Arc<Coalescer>,
    key: Bytes,
    mut request: OutgoingRequest,
    exchange: &'a mut Exchange<'s>,
) -> impl Future<Output = Result<Response<ResponseBody>, ProxyError>> + Send + use<'a, 's> {
    async move {
        let streamed = std::mem::replace(&mut request.body, RequestBody::Full(None));
        let body = buffer_body(streamed, route.max_body).await?;
        let head = &request.head;
        let fingerprint = (route.coalesce.mode == CoalesceMode::Dedupe).then(|| {
            Box::new(Fingerprint {
                method: head.method.clone(),
                uri: head.uri.clone(),
                content_type: head
                    .headers
                    .get("content-type")
                    .and_then(|value| HeaderValue::from_bytes(value).ok()),
                body: body.clone(),
            })
        });
        // The request keeps its box; only its body changes, to the buffered bytes.
        request.body = RequestBody::Full(Some(body));
        let job = upstream_job(Arc::clone(snapshot), route.index, key.clone(), request);
        let (shared, disposition) = coalescer
            .write(key, fingerprint, job, &route.coalesce)
            .await
            .map_err(|refusal| ProxyError::refused(refusal, &route.name))?;
        exchange.backend = shared.backend.clone();
        exchange.outcome = Some(disposition.as_str());
        exchange.origin = shared.origin;
        Ok(into_response(shared, disposition))
    }
}

/// Reads a body capped at `limit` (see [`RequestBody::limit_to`]) into memory.
pub(super) async fn buffer_body(body: RequestBody, limit: u64) -> Result<Bytes, ProxyError> {
    match read_whole(body, usize::MAX).await {
        Ok(body) => Ok(body),
        Err(Some(RequestBodyError::Client(reason))) => {
            Err(ProxyError::ClientBody(reason.to_string()))
        }
        Err(Some(RequestBodyError::TimedOut(idle))) => Err(ProxyError::ClientBodyTimeout {
            idle,
            reached_backend: false,
        }),
        Err(Some(RequestBodyError::TooLarge { .. }) | None) => {
            Err(ProxyError::BodyTooLarge { limit })
        }
    }
}

fn into_response(mut shared: SharedResponse, disposition: Disposition) -> Response<ResponseBody> {
    // With the backend's lines still raw, the line joins them rather than starting a map.
    match &mut shared.backend_lines {
        Some(pending) => pending.added = Some((&X_WRITEGATE_COALESCE, disposition.as_str())),
        None => {
            let value = HeaderValue::from_static(disposition.as_str());
            shared.headers.insert(X_WRITEGATE_COALESCE.clone(), value);
        }
    }
    shared_response(shared)
}

/// One client's copy of a shared response, its backend header lines still to be written as they
/// came.
pub(super) fn shared_response(shared: SharedResponse) -> Response<ResponseBody> {
    let mut response = Response::new(ResponseBody::buffered(shared.body, shared.backend_lines));
    *response.status_mut() = shared.status;
    *response.headers_mut() = shared.headers;
    response
}

/// The upstream exchange of one write, owning what it needs.
fn upstream_job(
    snapshot: Arc<Snapshot>,
    route_index: usize,
    key: Bytes,
    request: OutgoingRequest,
) -> Job {
    Box::pin(async move {
        let route = &snapshot.router.routes()[route_index];
        let upstream = &snapshot.upstreams[route.upstream];
        match exchange(route, upstream, &key, request).await {
            Ok(shared) => shared,
            Err((error, backend)) => {
                // Refusals at a limit are summarized, not logged one by one (see `access`).
                if error.fault() == Fault::Proxy {
                    super::OVERLOAD.note(error.label(), crate::upstream::clock_ms());
                } else {
                    tracing::warn!(
                        route = &*route.name,
                        upstream = &*upstream.name,
                        backend = backend.as_deref(),
                        error = %error,
                        "coalesced write failed"
                    );
                }
                let mut shared = error.to_shared(Some(&route.name), Some(&upstream.name));
                shared.backend = backend;
                shared
            }
        }
    })
}

/// Sends a buffered write and buffers its response. Errors carry the backend, when one was chosen.
#[allow(clippy::manual_async_fn)]
fn exchange<'a>(
    route: &'a Route,
    upstream: &'a Upstream,
    key: &'a [u8],
    request: OutgoingRequest,
) -> impl Future<Output = Result<SharedResponse, (ProxyError, Option<Arc<str>>)>> + Send + 'a {
    async move {
        let sent = dispatch(route, upstream, upstream.balancer.hash_key(key), request)
            .await
            .map_err(|failed| (failed.error, failed.backend))?;
        collect(sent, route).await
    }
}

/// Buffers a dispatched write's response. A plain function returning a future, which reads the body
/// in place: an `async` block in [`exchange`] kept the response, the parts it is taken apart into
/// and the read of its body each in a slot of its own, and every write's job was 2.9 KB.
fn collect(
    sent: Dispatched,
    route: &Route,
) -> impl Future<Output = Result<SharedResponse, (ProxyError, Option<Arc<str>>)>> + Send {
    let backend = sent.backend;
    let timeout = route.exchange_timeouts.response;
    let mut response =
        super::body::upstream_response(sent.head, sent.lease, route.exchange_timeouts.idle);
    let backend_lines = response.body_mut().take_pending_headers();
    let (head, mut body) = response.into_parts();
    let (status, headers) = (head.status, head.headers);
    async move {
        let fail = |e: ProxyError| (e, Some(Arc::clone(&backend)));
        // The key's next write waits for this one: a backend that stalls mid-body must not hold
        // it. A timer is armed only when the body did not come with the head (most do).
        let mut read = std::pin::pin!(read_whole(&mut body, MAX_SHARED_RESPONSE));
        let collected = match poll_fn(|cx| Poll::Ready(read.as_mut().poll(cx))).await {
            Poll::Ready(collected) => collected,
            Poll::Pending => tokio::time::timeout(timeout, read)
                .await
                .map_err(|_| fail(ProxyError::Upstream(SendError::ResponseTimeout)))?,
        }
        .map_err(|_| fail(ProxyError::ResponseNotShareable))?;
        Ok(SharedResponse {
            status,
            headers,
            backend_lines,
            body: collected,
            backend: Some(backend),
            origin: Origin::Backend,
        })
    }
}
