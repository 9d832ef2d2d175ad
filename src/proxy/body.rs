//! Request and response bodies as they pass through the proxy: streamed, and collected only where
//! a coalescing route must share them ([`read_whole`]).
//!
//! [`RequestBody`] enforces the route's `max_body` while streaming, so an oversized chunked upload is
//! cut off at the limit. [`ResponseBody`] carries the backend connection and in-flight guard of an
//! upstream response: when the body has been read to its end the connection goes back to the pool,
//! and when it is dropped early the connection is closed and the in-flight count still falls.

use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderValue, VIA};
use http::Response;
use http_body::{Body, Frame, SizeHint};

use super::access::AccessLine;
use super::error::ProxyError;
use crate::admission::AdmissionPermit;
use crate::http1::server::ResponseSource;
use crate::http1::{Http1Error, ResponseHead};
use crate::upstream::{InflightGuard, UpstreamConn};
use crate::wire::codec::Decoder;
use crate::wire::{headers, PendingHeaders};

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
    /// Bytes already read from `rest` (by a step that looked at the body first), then the rest.
    Prefixed {
        front: Option<Bytes>,
        rest: Box<ResponseBody>,
    },
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
            ResponseKind::Prefixed { rest, .. } => rest.take_pending_headers(),
        }
    }

    /// When the backend's response head came, for a response that is a backend's.
    pub fn responded_at(&self) -> Option<Instant> {
        match &self.kind {
            ResponseKind::Upstream { lease, .. } => lease.as_ref().map(|lease| lease.responded),
            ResponseKind::Full { .. } => None,
            ResponseKind::Prefixed { rest, .. } => rest.responded_at(),
        }
    }

    /// `front`, already read from `rest`, followed by what `rest` has left.
    pub fn prefixed(front: Bytes, rest: ResponseBody) -> ResponseBody {
        ResponseBody {
            access: None,
            kind: ResponseKind::Prefixed {
                front: (!front.is_empty()).then_some(front),
                rest: Box::new(rest),
            },
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
            ResponseKind::Prefixed { rest, .. } => rest.failure_message(error),
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
            ResponseKind::Prefixed { front, rest } => front.is_none() && rest.is_end_stream(),
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
            ResponseKind::Prefixed { front, rest } => {
                let ahead = front.as_ref().map_or(0, |f| f.len() as u64);
                match rest.size_hint().exact() {
                    Some(n) => SizeHint::with_exact(n + ahead),
                    None => SizeHint::new(),
                }
            }
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
            ResponseKind::Prefixed { front, rest } => match front.take() {
                Some(data) => Poll::Ready(Some(Ok(Frame::data(data)))),
                None => rest.poll_piece(cx),
            },
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

impl ResponseSource for ResponseBody {
    fn take_pending_headers(&mut self) -> Option<PendingHeaders> {
        ResponseBody::take_pending_headers(self)
    }

    fn failure_message(&self, error: &Http1Error) -> String {
        ResponseBody::failure_message(self, error)
    }
}

/// The one-line 502 body, in the proxy's one error format.
fn failure_text(error: &Http1Error, upstream: Option<&str>) -> String {
    let shared = ProxyError::BrokenResponse(error.to_string()).to_shared(None, upstream);
    String::from_utf8_lossy(&shared.body).into_owned()
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
                ResponseKind::Prefixed { front, rest } => front.is_none() && rest.is_end_stream(),
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
