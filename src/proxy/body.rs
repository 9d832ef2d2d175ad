//! Request and response bodies as they pass through the proxy: streamed, never collected.
//!
//! [`RequestBody`] enforces the route's `max_body` while streaming, so an oversized chunked upload is
//! cut off at the limit. [`ResponseBody`] carries the backend connection and in-flight guard of an
//! upstream response: when the body has been read to its end the connection goes back to the pool,
//! and when it is dropped early the connection is closed and the in-flight count still falls.

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::admission::AdmissionPermit;
use crate::upstream::{InflightGuard, UpstreamConn};

/// Why a request body stopped short.
#[derive(Debug, thiserror::Error)]
pub enum RequestBodyError {
    #[error("request body exceeds {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("reading the request body failed: {0}")]
    Client(#[source] hyper::Error),
}

/// The body sent to a backend.
#[derive(Debug)]
pub enum RequestBody {
    /// The client's body, streamed, with the bytes still allowed before `max_body` is hit.
    Streaming {
        inner: Incoming,
        remaining: u64,
        limit: u64,
    },
    /// A body held in memory (sent once).
    Full(Option<Bytes>),
}

impl RequestBody {
    pub fn streaming(inner: Incoming, limit: u64) -> RequestBody {
        RequestBody::Streaming {
            inner,
            remaining: limit,
            limit,
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
                remaining,
                limit,
            } => {
                let frame = ready!(Pin::new(inner).poll_frame(cx));
                let frame = match frame {
                    None => return Poll::Ready(None),
                    Some(Err(e)) => return Poll::Ready(Some(Err(RequestBodyError::Client(e)))),
                    Some(Ok(frame)) => frame,
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
            RequestBody::Streaming { inner, .. } => inner.is_end_stream(),
            RequestBody::Full(data) => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Streaming { inner, .. } => inner.size_hint(),
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
}

#[derive(Debug)]
enum ResponseKind {
    Full(Option<Bytes>),
    Upstream {
        inner: Incoming,
        /// Present until the body ends; holds what must be released with it.
        lease: Option<UpstreamLease>,
    },
}

/// The backend connection and in-flight count held by a response that is still streaming.
#[derive(Debug)]
pub struct UpstreamLease {
    pub conn: UpstreamConn,
    pub inflight: InflightGuard,
    pub admission: [Option<AdmissionPermit>; 2],
}

impl UpstreamLease {
    /// The response was read to its end: the connection can carry the next request.
    fn complete(self) {
        self.inflight.backend().reuse(self.conn);
    }
}

impl ResponseBody {
    pub fn full(data: Bytes) -> ResponseBody {
        ResponseBody {
            kind: ResponseKind::Full(Some(data)),
        }
    }

    pub fn empty() -> ResponseBody {
        ResponseBody {
            kind: ResponseKind::Full(None),
        }
    }

    pub fn upstream(inner: Incoming, lease: UpstreamLease) -> ResponseBody {
        ResponseBody {
            kind: ResponseKind::Upstream {
                inner,
                lease: Some(lease),
            },
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match &mut self.get_mut().kind {
            ResponseKind::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            ResponseKind::Upstream { inner, lease } => {
                let frame = ready!(Pin::new(&mut *inner).poll_frame(cx));
                match &frame {
                    None => finish(lease),
                    Some(Ok(_)) if inner.is_end_stream() => finish(lease),
                    // An error mid-body: drop the lease, closing the connection.
                    Some(Err(_)) => drop(lease.take()),
                    Some(Ok(_)) => {}
                }
                Poll::Ready(frame)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            ResponseKind::Full(data) => data.is_none(),
            ResponseKind::Upstream { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            ResponseKind::Full(data) => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            ResponseKind::Upstream { inner, .. } => inner.size_hint(),
        }
    }
}

fn finish(lease: &mut Option<UpstreamLease>) {
    if let Some(lease) = lease.take() {
        lease.complete();
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // A body that is empty or fully read may be dropped without a final poll (hyper does not
        // poll a body that reports its end): its connection is still reusable.
        if let ResponseKind::Upstream { inner, lease } = &mut self.kind {
            if inner.is_end_stream() {
                finish(lease);
            }
        }
    }
}
