//! The request path of a write on a coalescing route.
//!
//! The body is buffered (up to the route's `max_body`): it is compared for `dedupe` and may be sent
//! on behalf of other clients. The write then goes through its key's queue in the route's
//! [`Coalescer`]; the upstream exchange runs as a [`Job`] that owns everything it needs (the
//! snapshot the request started with included), so it completes even when its clients have left.
//! Its response is buffered too, so that every merged client can get a copy.

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::Response;

use super::body::{read_whole, RequestBody, RequestBodyError, ResponseBody};
use super::dispatch::dispatch;
use super::request::{OutgoingRequest, ProxyRequest, RequestHead};
use super::Exchange;
use crate::coalesce::{Coalescer, Disposition, Fingerprint, Job, SharedResponse};
use crate::config::CoalesceMode;
use crate::error::ProxyError;
use crate::route::Route;
use crate::snapshot::Snapshot;
use crate::upstream::{SendError, Upstream};

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
    request: OutgoingRequest,
    exchange: &'a mut Exchange<'s>,
) -> impl Future<Output = Result<Response<ResponseBody>, ProxyError>> + Send + use<'a, 's> {
    async move {
        let ProxyRequest { head, body } = *request;
        let body = buffer_body(body, route.max_body).await?;
        let fingerprint = (route.coalesce.mode == CoalesceMode::Dedupe).then(|| Fingerprint {
            method: head.method.clone(),
            uri: head.uri.clone(),
            content_type: head
                .headers
                .get("content-type")
                .and_then(|value| HeaderValue::from_bytes(value).ok()),
            body: body.clone(),
        });
        let job = upstream_job(Arc::clone(snapshot), route.index, key.clone(), head, body);
        let (shared, disposition) = coalescer
            .write(key, fingerprint, job, &route.coalesce)
            .await
            .map_err(|refusal| ProxyError::refused(refusal, &route.name))?;
        exchange.backend = shared.backend.clone();
        Ok(into_response(shared, disposition))
    }
}

/// Reads a body capped at `limit` (see [`RequestBody::limit_to`]) into memory.
pub(super) async fn buffer_body(body: RequestBody, limit: u64) -> Result<Bytes, ProxyError> {
    match read_whole(body, usize::MAX).await {
        Ok(body) => Ok(body),
        Err(Some(RequestBodyError::Client(_))) => Err(ProxyError::ClientBody),
        Err(Some(RequestBodyError::TooLarge { .. }) | None) => {
            Err(ProxyError::BodyTooLarge { limit })
        }
    }
}

fn into_response(shared: SharedResponse, disposition: Disposition) -> Response<ResponseBody> {
    let mut response = shared.into_response();
    response
        .headers_mut()
        .insert(X_WRITEGATE_COALESCE.clone(), disposition.header_value());
    response
}

/// The upstream exchange of one write, owning what it needs.
fn upstream_job(
    snapshot: Arc<Snapshot>,
    route_index: usize,
    key: Bytes,
    head: RequestHead,
    body: Bytes,
) -> Job {
    Box::pin(async move {
        let route = &snapshot.router.routes()[route_index];
        let upstream = &snapshot.upstreams[route.upstream];
        match exchange(route, upstream, &key, head, body).await {
            Ok(shared) => shared,
            Err((error, backend)) => {
                tracing::warn!(
                    route = &*route.name,
                    upstream = &*upstream.name,
                    backend = backend.as_deref(),
                    error = %error,
                    "coalesced write failed"
                );
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
    head: RequestHead,
    body: Bytes,
) -> impl Future<Output = Result<SharedResponse, (ProxyError, Option<Arc<str>>)>> + Send + 'a {
    let request: OutgoingRequest = Box::new(ProxyRequest {
        head,
        body: RequestBody::Full(Some(body)),
    });
    async move {
        let sent = dispatch(route, upstream, upstream.balancer.hash_key(key), request)
            .await
            .map_err(|failed| (failed.error, failed.backend))?;
        let backend = sent.backend;
        let fail = |e: ProxyError| (e, Some(Arc::clone(&backend)));
        let mut response = super::body::upstream_response(sent.head, sent.lease);
        let backend_lines = response.body_mut().take_pending_headers();
        let (head, body) = response.into_parts();
        // The key's next write waits for this one: a backend that stalls mid-body must not hold it.
        let collected = tokio::time::timeout(
            route.response_timeout,
            read_whole(body, MAX_SHARED_RESPONSE),
        )
        .await
        .map_err(|_| fail(ProxyError::Upstream(SendError::ResponseTimeout)))?
        .map_err(|_| fail(ProxyError::ResponseNotShareable))?;
        Ok(SharedResponse {
            status: head.status,
            headers: head.headers,
            backend_lines,
            body: collected,
            backend: Some(backend),
        })
    }
}
