//! HTTP messages as the proxy passes them on, below any protocol driver and any proxy logic:
//! what every layer above may know, knowing none of them (as pingora-http is to Pingora).
//!
//! - [`codec`]: message framing (Content-Length, chunked, until close) and the body decoder.
//! - [`fields`]: a head's header lines: hop-by-hop ones read and dropped, the rest passed on.
//! - [`headers`]: header rewriting toward a backend (`X-Forwarded-*`, `Via`, `X-Request-Id`).
//! - [`request`]: a request on its way to a backend, head and body.
//! - [`body`]: request bodies, the client bodies they read from, and pending response lines.

pub mod body;
pub mod codec;
pub mod fields;
pub mod headers;
pub mod request;

pub use body::{
    read_whole, BodyError, BodyObserver, BodySource, ClientBody, H1Body, PendingHeaders,
    RequestBody, RequestBodyError,
};
pub use request::{ClientHeaders, HeaderIter, OutgoingRequest, ProxyRequest, RequestHead};

/// Where a backend's interim (1xx) responses go: the client connection of the request, which
/// writes them ahead of the final response. Only HTTP/1.1 clients get one (RFC 9110 §15.2).
pub trait InterimSink: Send + Sync + std::fmt::Debug {
    /// Queues one interim response, encoded whole; dropped if the client already has too many.
    fn push(&self, response: &[u8]);
}
