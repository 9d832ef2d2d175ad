//! Request and response bodies as they pass through the proxy: streamed, and collected only where
//! a coalescing route must share them ([`read_whole`]).
//!
//! [`RequestBody`] enforces the route's `max_body` while streaming, so an oversized chunked upload is
//! cut off at the limit. [`ResponseBody`] carries the backend connection and in-flight guard of an
//! upstream response: when the body has been read to its end the connection goes back to the pool,
//! and when it is dropped early the connection is closed and the in-flight count still falls.

use std::future::poll_fn;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue, VIA};
use http::{Response, Version};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::access::AccessLine;
use super::headers;
use crate::admission::AdmissionPermit;
use crate::http1::codec::Decoder;
use crate::http1::fields::RawHeaders;
use crate::http1::server::{BodyError, H1Body};
use crate::http1::{Http1Error, ResponseHead};
use crate::upstream::{InflightGuard, UpstreamConn};

/// Reads all of `body` into one `Bytes`; `Err(None)` once it passes `limit` bytes. A body that
/// arrives in one piece (small writes do) is neither copied nor reallocated. Trailers are dropped.
pub(super) async fn read_whole<B>(mut body: B, limit: usize) -> Result<Bytes, Option<B::Error>>
where
    B: Body<Data = Bytes> + Unpin,
{
    let mut whole = Bytes::new();
    let mut joined = BytesMut::new();
    while let Some(frame) = poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
        let Ok(data) = frame.map_err(Some)?.into_data() else {
            continue;
        };
        if whole.len() + joined.len() + data.len() > limit {
            return Err(None);
        }
        if whole.is_empty() && joined.is_empty() {
            whole = data;
        } else if !data.is_empty() {
            joined.extend_from_slice(&std::mem::take(&mut whole));
            joined.extend_from_slice(&data);
        }
    }
    Ok(if joined.is_empty() {
        whole
    } else {
        joined.freeze()
    })
}

/// Why a request body stopped short.
#[derive(Debug, thiserror::Error)]
pub enum RequestBodyError {
    #[error("request body exceeds {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("the client sent no body bytes for {0:?}")]
    TimedOut(Duration),
    #[error("reading the request body failed: {0}")]
    Client(#[source] BoxError),
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A client's request body: from our HTTP/1.1 connection, or from hyper's HTTP/2 server.
#[derive(Debug)]
pub enum ClientBody {
    H1(H1Body),
    H2(Incoming),
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = RequestBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, RequestBodyError>>> {
        match self.get_mut() {
            ClientBody::H1(body) => Pin::new(body).poll_frame(cx).map_err(|e| match e {
                BodyError::TimedOut(idle) => RequestBodyError::TimedOut(idle),
                e => RequestBodyError::Client(e.into()),
            }),
            ClientBody::H2(body) => Pin::new(body)
                .poll_frame(cx)
                .map_err(|e| RequestBodyError::Client(e.into())),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ClientBody::H1(body) => body.is_end_stream(),
            ClientBody::H2(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ClientBody::H1(body) => body.size_hint(),
            ClientBody::H2(body) => body.size_hint(),
        }
    }
}

/// The body sent to a backend.
#[derive(Debug)]
pub enum RequestBody {
    /// The client's body, streamed, with the bytes still allowed before `max_body` is hit. `front`
    /// is a piece taken out and put back (a send that wrote nothing hands it back).
    Streaming {
        inner: ClientBody,
        front: Option<Bytes>,
        remaining: u64,
        limit: u64,
    },
    /// A body held in memory (sent once).
    Full(Option<Bytes>),
}

impl RequestBody {
    pub fn streaming(inner: ClientBody, limit: u64) -> RequestBody {
        RequestBody::Streaming {
            inner,
            front: None,
            remaining: limit,
            limit,
        }
    }

    /// Caps a streamed body at `limit` bytes (the route's `max_body`, known once it is chosen).
    pub fn limit_to(&mut self, max: u64) {
        if let RequestBody::Streaming {
            remaining, limit, ..
        } = self
        {
            *remaining = max;
            *limit = max;
        }
    }

    /// Sets the longest silence between two reads of an HTTP/1 client's body (HTTP/2 streams
    /// are hyper's to time).
    pub fn set_idle_timeout(&mut self, idle: Duration) {
        if let RequestBody::Streaming {
            inner: ClientBody::H1(body),
            ..
        } = self
        {
            body.set_idle_timeout(idle);
        }
    }

    /// The body's length when known before it is read.
    pub fn exact_len(&self) -> Option<u64> {
        if self.is_end_stream() {
            return Some(0);
        }
        self.size_hint().exact()
    }

    /// Puts back a piece taken by `poll_frame`, to be read again first.
    pub fn unread(&mut self, piece: Option<Bytes>) {
        let Some(piece) = piece else { return };
        match self {
            RequestBody::Streaming {
                front, remaining, ..
            } => {
                *remaining += piece.len() as u64;
                *front = Some(piece);
            }
            RequestBody::Full(data) => *data = Some(piece),
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = RequestBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, RequestBodyError>>> {
        match self.get_mut() {
            RequestBody::Streaming {
                inner,
                front,
                remaining,
                limit,
            } => {
                let frame = match front.take() {
                    Some(piece) => Frame::data(piece),
                    None => match ready!(Pin::new(inner).poll_frame(cx)) {
                        None => return Poll::Ready(None),
                        Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                        Some(Ok(frame)) => frame,
                    },
                };
                if let Some(data) = frame.data_ref() {
                    let len = data.len() as u64;
                    if len > *remaining {
                        return Poll::Ready(Some(Err(RequestBodyError::TooLarge {
                            limit: *limit,
                        })));
                    }
                    *remaining -= len;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            RequestBody::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Streaming { inner, front, .. } => front.is_none() && inner.is_end_stream(),
            RequestBody::Full(data) => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Streaming { inner, front, .. } => {
                let extra = front.as_ref().map_or(0, |f| f.len() as u64);
                let hint = inner.size_hint();
                match hint.exact() {
                    Some(n) => SizeHint::with_exact(n + extra),
                    None => SizeHint::new(),
                }
            }
            RequestBody::Full(data) => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}

/// The body of the response a client receives.
#[derive(Debug)]
pub struct ResponseBody {
    kind: ResponseKind,
    /// The request's access line, written when this body is done (see [`access`]).
    access: Option<Box<AccessLine>>,
}

#[derive(Debug)]
// `Full` is for the proxy's own responses; boxing the common variant would cost an allocation per
// response.
#[allow(clippy::large_enum_variant)]
enum ResponseKind {
    Full {
        data: Option<Bytes>,
        /// A buffered backend response's header lines (coalesced writes), as for `Upstream`.
        pending: Option<PendingHeaders>,
    },
    Upstream {
        decoder: Decoder,
        /// Longest silence of the backend while it sends the body (`backend_idle`).
        idle: Duration,
        /// The 502's text, kept when the body failed (its lease, which names the upstream, is
        /// gone by then).
        failure: Option<String>,
        keep_alive: bool,
        /// Present until the body ends; holds the connection the body is read from.
        lease: Option<UpstreamLease>,
        /// The backend's header lines, until they are written or moved into the map.
        pending: Option<PendingHeaders>,
    },
}

/// A backend response's end-to-end header lines, not yet in the response's `HeaderMap`. The
/// HTTP/1 server writes them as they came; [`complete_headers`] builds the map for everyone else.
#[derive(Debug, Clone)]
pub struct PendingHeaders {
    pub lines: RawHeaders,
    /// The backend's HTTP version, named in the `Via` value the proxy adds.
    pub version: Version,
    /// A line the proxy adds after the backend's (a coalesced write's `x-writegate-coalesce`):
    /// carried here, it costs the HTTP/1 path no map.
    pub added: Option<(&'static HeaderName, &'static str)>,
}

impl PendingHeaders {
    pub fn via(&self) -> HeaderValue {
        headers::via_value(self.version)
    }
}

/// The backend connection and in-flight count held by a response that is still streaming.
#[derive(Debug)]
pub struct UpstreamLease {
    pub conn: UpstreamConn,
    pub inflight: InflightGuard,
    pub admission: [Option<AdmissionPermit>; 2],
    /// When the response head came.
    pub responded: Instant,
}

impl UpstreamLease {
    /// The response was read to its end: the connection can carry the next request.
    fn complete(self, keep_alive: bool) {
        if keep_alive && self.conn.is_clean() {
            self.inflight.backend().reuse(self.conn, self.responded);
        }
    }
}

/// The client's response for a backend's response head, its body streaming from the backend
/// connection held by `lease`. Its header lines stay pending (the codec has dropped the hop-by-hop
/// ones): a consumer other than the HTTP/1 server calls [`complete_headers`] first.
pub fn upstream_response(
    head: ResponseHead,
    lease: UpstreamLease,
    idle: Duration,
) -> Response<ResponseBody> {
    let mut response = Response::new(ResponseBody {
        access: None,
        kind: ResponseKind::Upstream {
            decoder: Decoder::new(head.framing),
            idle,
            failure: None,
            keep_alive: head.keep_alive,
            lease: Some(lease),
            pending: Some(PendingHeaders {
                lines: head.headers,
                version: head.version,
                added: None,
            }),
        },
    });
    *response.status_mut() = head.status;
    response
}

/// Moves a backend response's pending header lines (and the line the proxy added) into its
/// `HeaderMap`, `Via` appended.
pub fn complete_headers(response: &mut Response<ResponseBody>) {
    let Some(pending) = response.body_mut().take_pending_headers() else {
        return;
    };
    let mut headers = pending.lines.to_map(response.headers().len() + 2);
    for (name, value) in response.headers() {
        headers.append(name.clone(), value.clone());
    }
    headers::append_to_list(&mut headers, &VIA, &pending.via());
    if let Some((name, value)) = pending.added {
        headers.insert(name.clone(), HeaderValue::from_static(value));
    }
    *response.headers_mut() = headers;
}

impl ResponseBody {
    /// The backend's header lines not yet in the response's map, if any; see [`PendingHeaders`].
    pub fn take_pending_headers(&mut self) -> Option<PendingHeaders> {
        match &mut self.kind {
            ResponseKind::Upstream { pending, .. } => pending.take(),
            ResponseKind::Full { pending, .. } => pending.take(),
        }
    }

    /// When the backend's response head came, for a response that is a backend's.
    pub fn responded_at(&self) -> Option<Instant> {
        match &self.kind {
            ResponseKind::Upstream { lease, .. } => lease.as_ref().map(|lease| lease.responded),
            ResponseKind::Full { .. } => None,
        }
    }

    /// The one-line body of the 502 that replaces this response when its body fails before any
    /// of it reached the client.
    pub fn failure_message(&self, error: &Http1Error) -> String {
        match &self.kind {
            ResponseKind::Upstream {
                failure: Some(text),
                ..
            } => text.clone(),
            _ => failure_text(error, None),
        }
    }

    pub fn full(data: Bytes) -> ResponseBody {
        ResponseBody::buffered(data, None)
    }

    /// A buffered body with the backend header lines that go with it, still to be written or
    /// moved into the response's map (see [`complete_headers`]).
    pub fn buffered(data: Bytes, pending: Option<PendingHeaders>) -> ResponseBody {
        ResponseBody {
            access: None,
            kind: ResponseKind::Full {
                data: Some(data),
                pending,
            },
        }
    }

    pub fn empty() -> ResponseBody {
        ResponseBody {
            access: None,
            kind: ResponseKind::Full {
                data: None,
                pending: None,
            },
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = Http1Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Http1Error>>> {
        let this = self.get_mut();
        let piece = this.poll_piece(cx);
        if let (Some(line), Poll::Ready(Some(Ok(frame)))) = (&mut this.access, &piece) {
            line.bytes_out += frame.data_ref().map_or(0, |d| d.len() as u64);
        }
        piece
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            ResponseKind::Full { data, .. } => data.is_none(),
            ResponseKind::Upstream { decoder, .. } => decoder.is_done(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            ResponseKind::Full { data, .. } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            ResponseKind::Upstream { decoder, .. } => match decoder.remaining() {
                Some(n) => SizeHint::with_exact(n),
                None => SizeHint::new(),
            },
        }
    }
}

impl ResponseBody {
    /// Writes `line` to the access log once this body is done or dropped.
    pub(super) fn log_when_done(&mut self, line: Box<AccessLine>) {
        self.access = Some(line);
    }

    fn poll_piece(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Http1Error>>> {
        match &mut self.kind {
            ResponseKind::Full { data, .. } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            ResponseKind::Upstream {
                decoder,
                idle,
                keep_alive,
                lease,
                failure,
                ..
            } => {
                let Some(held) = lease else {
                    return Poll::Ready(None);
                };
                let piece = ready!(held.conn.poll_body(decoder, cx, *idle));
                match &piece {
                    None => finish(lease, *keep_alive),
                    Some(Ok(_)) if decoder.is_done() => finish(lease, *keep_alive),
                    // An error mid-body: drop the lease, closing the connection.
                    Some(Err(error)) => {
                        held.inflight.body_failed(error);
                        *failure = Some(failure_text(error, Some(held.inflight.upstream_name())));
                        drop(lease.take());
                    }
                    Some(Ok(_)) => {}
                }
                Poll::Ready(piece.map(|p| p.map(Frame::data)))
            }
        }
    }
}

fn failure_text(error: &Http1Error, upstream: Option<&str>) -> String {
    let mut text = format!("502 Bad Gateway: the backend's response broke off: {error}");
    if let Some(name) = upstream {
        text.push_str(" (upstream \"");
        text.push_str(name);
        text.push_str("\")");
    }
    text.push('\n');
    text
}

fn finish(lease: &mut Option<UpstreamLease>, keep_alive: bool) {
    if let Some(lease) = lease.take() {
        lease.complete(keep_alive);
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        if let Some(mut line) = self.access.take() {
            // The proxy's own bodies cannot break off; a backend's is whole once decoded.
            line.complete = match &self.kind {
                ResponseKind::Full { .. } => true,
                ResponseKind::Upstream {
                    decoder, failure, ..
                } => decoder.is_done() && failure.is_none(),
            };
        }
        // A body that is empty or fully read may be dropped without a final poll (hyper does not
        // poll a body that reports its end): its connection is still reusable.
        if let ResponseKind::Upstream {
            decoder,
            keep_alive,
            lease,
            ..
        } = &mut self.kind
        {
            if decoder.is_done() {
                finish(lease, *keep_alive);
            }
        }
    }
}
