//! The idempotency step of the pipeline, for routes with `[routes.idempotency]`.
//!
//! A request with a key claims its entry in the route's store before anything is sent. The one
//! that wins goes on through the rest of the pipeline (balancing, coalescing and admission
//! apply); its body is hashed as it streams, and the backend's response is read (up to
//! `max_response_body`), recorded durably, and only then answered. The others are answered from
//! the entry: the recorded response (`Idempotent-Replayed: true`), 409 while the first is in
//! flight, 422 for a different request under the same key, 502 when the first one's outcome is
//! unknown. What the first request's end says decides what is kept: a backend's response is
//! recorded; the proxy's own answer with nothing sent releases the key; a request that may have
//! reached a backend without an answer is marked indeterminate and never sent again.

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE, TRANSFER_ENCODING};
use http::{HeaderMap, Response};
use http_body::Body;

use super::body::{complete_headers, ResponseBody};
use super::coalesced::buffer_body;
use super::error::ProxyError;
use super::{Exchange, ProxyService};
use crate::coalesce::Origin;
use crate::config::{Concurrent, OnIndeterminate, OnStoreError};
use crate::http1::Http1Error;
use crate::idempotency::{
    body_digest, head_digest, new_token, problem_json, store, BodyHasher, Claim, Claimed, Counted,
    Digest, Ending, IdempotencyError, Outcome, Policy, Record, Store, Token, IDEMPOTENT_REPLAYED,
};
use crate::route::Route;
use crate::snapshot::Snapshot;
use crate::wire::{ClientHeaders, OutgoingRequest, RequestBody};

/// Longest pause between two looks at an entry in flight, with `concurrent = "wait"`.
const WAIT_STEP_MAX: Duration = Duration::from_millis(100);

/// Answers a request on a route with an idempotency policy that covers its method.
pub(super) async fn guard<'a, 's: 'a>(
    service: &'a ProxyService,
    snapshot: &'s Arc<Snapshot>,
    route: &'s Route,
    policy: &'s Policy,
    mut request: OutgoingRequest,
    exchange: &'a mut Exchange<'s>,
) -> Result<Response<ResponseBody>, ProxyError> {
    let settings = &policy.config;
    let id = match policy.key(&request.head) {
        Err(error) => {
            policy.count(Counted::Invalid);
            return Err(error.into());
        }
        Ok(None) if settings.required => {
            policy.count(Counted::Missing);
            return Err(IdempotencyError::Missing(settings.header.clone()).into());
        }
        Ok(None) => {
            policy.count(Counted::Unprotected);
            return service.pass(snapshot, route, request, exchange).await;
        }
        Ok(Some(key)) => policy.entry_id(&route.name, &key, &request.head),
    };
    if !settings.forward_header {
        remove_header(&mut request.head.headers, settings.header.as_str());
    }
    let head = head_digest(&request.head);
    let claim = Claim {
        token: new_token().map_err(|e| IdempotencyError::Store(e.to_string()))?,
        head,
        ttl: settings.ttl,
        lease: settings.lease,
        take_over: settings.on_indeterminate == OnIndeterminate::Forward,
    };
    match claim_or_wait(route, policy, &id, &claim).await {
        Ok(Claimed::Won) => {
            let held = HeldClaim {
                store: Arc::clone(&policy.store),
                id,
                token: claim.token,
                ttl: settings.ttl,
                timeout: settings.store_timeout,
                armed: true,
            };
            send_claimed(service, snapshot, route, policy, request, exchange, held).await
        }
        Ok(Claimed::Done(record)) => {
            let response = replay(policy, &record, head, request, route.max_body).await?;
            exchange.outcome = Some("replayed");
            Ok(response)
        }
        Ok(taken) => Err(refusal(policy, taken, head).into()),
        Err(error) => {
            policy.count(Counted::StoreError);
            tracing::warn!(route = &*route.name, store = policy.store.label(), error = %error, "idempotency store failed");
            if settings.on_store_error == OnStoreError::Reject {
                return Err(IdempotencyError::Store(error.to_string()).into());
            }
            service.pass(snapshot, route, request, exchange).await
        }
    }
}

/// Why a request whose key another request holds (or held, with no known outcome) is refused.
fn refusal(policy: &Policy, taken: Claimed, head: Digest) -> IdempotencyError {
    let (first, error, counted) = match taken {
        Claimed::InFlight { head: first, .. } => (
            first,
            IdempotencyError::InFlight {
                retry_after: Duration::from_secs(1),
            },
            Counted::Conflict,
        ),
        Claimed::Indeterminate { head: first } => {
            (first, IdempotencyError::Unknown, Counted::Unknown)
        }
        // The caller answers these itself; refusing is the safe reading all the same.
        Claimed::Won | Claimed::Done(_) => (head, IdempotencyError::Mismatch, Counted::Mismatch),
    };
    if first != head {
        policy.count(Counted::Mismatch);
        return IdempotencyError::Mismatch;
    }
    policy.count(counted);
    error
}

/// Sends the request whose claim won, and keeps what its end says (see the module's doc).
async fn send_claimed<'a, 's: 'a>(
    service: &'a ProxyService,
    snapshot: &'s Arc<Snapshot>,
    route: &'s Route,
    policy: &'s Policy,
    mut request: OutgoingRequest,
    exchange: &'a mut Exchange<'s>,
    mut held: HeldClaim,
) -> Result<Response<ResponseBody>, ProxyError> {
    let head = head_digest(&request.head);
    let body = watch_body(&mut request.body);
    let sent = service.pass(snapshot, route, request, exchange).await;
    let reached_backend = match (&sent, exchange.origin) {
        (Ok(_), Origin::Backend) => None,
        (Ok(_), Origin::Proxy { reached_backend }) => Some(reached_backend),
        (Err(error), _) => Some(error.may_have_reached_backend()),
    };
    let Some(reached) = reached_backend else {
        return record(route, policy, &mut held, head, &body, sent?).await;
    };
    let (ending, counted) = if reached {
        let ttl = policy.config.ttl;
        (Ending::Indeterminate { ttl }, Counted::Indeterminate)
    } else {
        (Ending::Release, Counted::Released)
    };
    if held.finish(ending).await.is_err() {
        policy.count(Counted::StoreError);
    }
    policy.count(counted);
    sent
}

/// Claims the entry; with `concurrent = "wait"`, looks again while another request holds it, up
/// to the route's response timeout.
async fn claim_or_wait(
    route: &Route,
    policy: &Policy,
    id: &Digest,
    claim: &Claim,
) -> Result<Claimed, crate::idempotency::StoreError> {
    let settings = &policy.config;
    let deadline = Instant::now() + route.exchange_timeouts.response;
    let mut pause = Duration::from_millis(5);
    loop {
        let found = store::claim(&*policy.store, id, claim, settings.store_timeout).await?;
        let now = Instant::now();
        match found {
            Claimed::InFlight { head, .. }
                if head == claim.head
                    && settings.concurrent == Concurrent::Wait
                    && now < deadline =>
            {
                tokio::time::sleep(pause.min(deadline - now)).await;
                pause = (pause * 2).min(WAIT_STEP_MAX);
            }
            found => return Ok(found),
        }
    }
}

/// Hashes the request body as it goes to the backend; the digest is there once it was all read.
fn watch_body(body: &mut RequestBody) -> Arc<OnceLock<Digest>> {
    match body {
        RequestBody::Full(data) => {
            let digest = body_digest(data.as_deref().unwrap_or_default());
            Arc::new(OnceLock::from(digest))
        }
        _ if body.is_end_stream() => Arc::new(OnceLock::from(body_digest(&[]))),
        _ => {
            let (hasher, done) = BodyHasher::new();
            body.observe(Box::new(hasher));
            done
        }
    }
}

/// A claim this request holds until it says how it ended. Dropped unsaid (the client left while
/// the request was under way), the entry becomes indeterminate: the request may have been sent.
struct HeldClaim {
    store: Arc<dyn Store>,
    id: Digest,
    token: Token,
    ttl: Duration,
    timeout: Duration,
    armed: bool,
}

impl HeldClaim {
    async fn finish(&mut self, ending: Ending) -> Result<(), crate::idempotency::StoreError> {
        self.armed = false;
        let result = store::finish(&*self.store, &self.id, &self.token, ending, self.timeout).await;
        if let Err(error) = &result {
            tracing::warn!(store = self.store.label(), error = %error, "idempotency store failed to record an outcome; retries of that key will read it as indeterminate once its lease runs out");
        }
        result
    }
}

impl Drop for HeldClaim {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (store, id, token) = (Arc::clone(&self.store), self.id, self.token);
        let (ending, timeout) = (Ending::Indeterminate { ttl: self.ttl }, self.timeout);
        runtime.spawn(async move {
            let _ = store::finish(&*store, &id, &token, ending, timeout).await;
        });
    }
}

/// Reads the backend's response (up to `max_response_body`), records it, then answers with it.
async fn record(
    route: &Route,
    policy: &Policy,
    held: &mut HeldClaim,
    head: Digest,
    body_digest: &OnceLock<Digest>,
    mut response: Response<ResponseBody>,
) -> Result<Response<ResponseBody>, ProxyError> {
    complete_headers(&mut response);
    let (parts, mut body) = response.into_parts();
    let limit = usize::try_from(policy.config.max_response_body).unwrap_or(usize::MAX);
    let read = tokio::time::timeout(
        route.exchange_timeouts.response,
        read_up_to(&mut body, limit),
    )
    .await;
    let status = parts.status;
    let (outcome, answer) = match read {
        Ok(Ok(Read::Whole(data))) => {
            let headers = stored_headers(&parts.headers);
            let outcome = Outcome::Response {
                status,
                headers,
                body: data.clone(),
            };
            (outcome, Ok(ResponseBody::full(data)))
        }
        Ok(Ok(Read::Front(front))) => (
            Outcome::NotKept { status },
            Ok(ResponseBody::prefixed(front, body)),
        ),
        Ok(Err(error)) => (
            Outcome::NotKept { status },
            Err(ProxyError::BrokenResponse(error.to_string())),
        ),
        Err(_) => (
            Outcome::NotKept { status },
            Err(ProxyError::Upstream(
                crate::upstream::SendError::ResponseTimeout,
            )),
        ),
    };
    let record = Arc::new(Record {
        head,
        body: body_digest.get().copied(),
        outcome,
    });
    let ttl = policy.config.ttl;
    match held.finish(Ending::Record { record, ttl }).await {
        Ok(()) => policy.count(Counted::Recorded),
        // The write was applied: the client hears the backend's answer. Its retries cannot
        // replay it, but the claim stays, so they are never sent again either.
        Err(_) => policy.count(Counted::StoreError),
    }
    Ok(Response::from_parts(parts, answer?))
}

enum Read {
    Whole(Bytes),
    /// The body is longer than the limit: what was read of it.
    Front(Bytes),
}

/// Reads `body` to its end, or until it has passed `limit` bytes.
async fn read_up_to(body: &mut ResponseBody, limit: usize) -> Result<Read, Http1Error> {
    let mut joined = BytesMut::new();
    let mut first: Option<Bytes> = None;
    while let Some(frame) = poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        match first.take() {
            // A body that comes in one piece (most do) is not copied.
            None if joined.is_empty() => first = Some(data),
            earlier => {
                joined.extend_from_slice(&earlier.unwrap_or_default());
                joined.extend_from_slice(&data);
            }
        }
        let read = first.as_ref().map_or(joined.len(), Bytes::len);
        if read > limit {
            return Ok(Read::Front(first.unwrap_or_else(|| joined.freeze())));
        }
    }
    Ok(Read::Whole(first.unwrap_or_else(|| joined.freeze())))
}

/// The headers a replay repeats: all but the framing ones (a replay is framed anew).
fn stored_headers(headers: &HeaderMap) -> HeaderMap {
    let mut kept = headers.clone();
    kept.remove(CONTENT_LENGTH);
    kept.remove(TRANSFER_ENCODING);
    kept
}

/// The recorded answer for a retry, after checking that it is the same request.
async fn replay(
    policy: &Policy,
    record: &Record,
    head: Digest,
    request: OutgoingRequest,
    max_body: u64,
) -> Result<Response<ResponseBody>, ProxyError> {
    let same_body = record.head == head
        && match &record.body {
            // Read the retry's body to compare it; it is not kept.
            Some(first) => body_digest(&buffer_body(request.body, max_body).await?) == *first,
            None => true,
        };
    if !same_body {
        policy.count(Counted::Mismatch);
        return Err(IdempotencyError::Mismatch.into());
    }
    policy.count(Counted::Replayed);
    let mut response = match &record.outcome {
        Outcome::Response {
            status,
            headers,
            body,
        } => {
            let mut response = Response::new(ResponseBody::full(body.clone()));
            *response.status_mut() = *status;
            *response.headers_mut() = headers.clone();
            response
        }
        Outcome::NotKept { status } => {
            let detail = format!(
                "the first request with this key completed with status {}; its response body \
                 was larger than max_response_body (or broke off) and was not kept. The request \
                 is not sent again.",
                status.as_u16()
            );
            let body = problem_json(
                "idempotency-response-not-kept",
                "Response not kept",
                *status,
                &detail,
                None,
            );
            let mut response = Response::new(ResponseBody::full(body));
            *response.status_mut() = *status;
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("application/problem+json"),
            );
            response
        }
    };
    response.headers_mut().insert(
        IDEMPOTENT_REPLAYED.clone(),
        HeaderValue::from_static("true"),
    );
    Ok(response)
}

/// Leaves out every `name` header (lowercase) of a client's request.
fn remove_header(headers: &mut ClientHeaders, name: &str) {
    match headers {
        ClientHeaders::Lines(lines) => lines.remove(name),
        ClientHeaders::Map(map) => {
            map.remove(name);
        }
    }
}
