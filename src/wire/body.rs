//! Message bodies as every layer above the wire sees them: the request body on its way to a
//! backend ([`RequestBody`], capped at the route's `max_body` while it streams), the client's body
//! it reads from ([`ClientBody`]: our HTTP/1 connection's [`H1Body`], or hyper's HTTP/2 stream),
//! and the header lines of a backend response not yet in a map ([`PendingHeaders`]).

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue};
use http::Version;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::fields::RawHeaders;
use super::headers;

/// Reads all of `body` into one `Bytes`; `Err(None)` once it passes `limit` bytes. A body that
/// arrives in one piece (small writes do) is neither copied nor reallocated. Trailers are dropped.
pub async fn read_whole<B>(mut body: B, limit: usize) -> Result<Bytes, Option<B::Error>>
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

/// Sees each byte of a streamed request body once, as it is read from the client, and its end
/// (idempotency keys hash the body this way instead of keeping it).
pub trait BodyObserver: Send + Sync + std::fmt::Debug {
    fn data(&mut self, data: &[u8]);
    /// The body was read to its end; called at most once.
    fn end(&mut self);
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
        /// Boxed and usually absent: the plain path carries one pointer.
        observer: Option<Box<dyn BodyObserver>>,
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
            observer: None,
        }
    }

    /// Shows every byte still to be read from the client to `observer`. A body held in memory
    /// (or one already read) is the caller's to look at.
    pub fn observe(&mut self, new: Box<dyn BodyObserver>) {
        if let RequestBody::Streaming { observer, .. } = self {
            *observer = Some(new);
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
                observer,
            } => {
                let frame = match front.take() {
                    // Put back after a send that wrote nothing: the observer has seen it.
                    Some(piece) => Frame::data(piece),
                    None => match ready!(Pin::new(&mut *inner).poll_frame(cx)) {
                        None => {
                            if let Some(mut observer) = observer.take() {
                                observer.end();
                            }
                            return Poll::Ready(None);
                        }
                        Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                        Some(Ok(frame)) => {
                            if let Some(seen) = observer {
                                if let Some(data) = frame.data_ref() {
                                    seen.data(data);
                                }
                                if inner.is_end_stream() {
                                    if let Some(mut observer) = observer.take() {
                                        observer.end();
                                    }
                                }
                            }
                            frame
                        }
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

/// A backend response's end-to-end header lines, not yet in the response's `HeaderMap`. The
/// HTTP/1 server writes them as they came; the proxy builds the map for everyone else.
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

/// The request body, read from the client connection as it is polled.
#[derive(Debug)]
pub struct H1Body {
    wire: Option<Arc<dyn BodySource>>,
}

impl H1Body {
    /// A body read through `source`; `None` for a request without one.
    pub fn new(source: Option<Arc<dyn BodySource>>) -> H1Body {
        H1Body { wire: source }
    }
}

/// A client connection's side of reading a request body, with its transport type erased.
pub trait BodySource: Send + Sync + std::fmt::Debug {
    fn poll_piece(&self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, BodyError>>>;
    fn remaining(&self) -> Option<u64>;
    fn set_idle_timeout(&self, idle: Duration);
}

/// Why a request body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("the client closed the connection before the body ended")]
    Closed,
    #[error("malformed chunked body: {0}")]
    Framing(#[from] super::codec::FramingError),
    #[error("the client sent no body bytes for {0:?}")]
    TimedOut(Duration),
}

impl Body for H1Body {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match &self.wire {
            None => Poll::Ready(None),
            Some(wire) => wire.poll_piece(cx).map(|p| p.map(|p| p.map(Frame::data))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.remaining() == Some(0)
    }

    fn size_hint(&self) -> SizeHint {
        match self.remaining() {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::new(),
        }
    }
}

impl H1Body {
    fn remaining(&self) -> Option<u64> {
        self.wire.as_ref().map_or(Some(0), |w| w.remaining())
    }

    /// Sets the longest silence between two reads of this body (the route's `client_body`).
    pub fn set_idle_timeout(&self, idle: Duration) {
        if let Some(wire) = &self.wire {
            wire.set_idle_timeout(idle);
        }
    }
}
