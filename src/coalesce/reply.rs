//! What a coalesced write answers: the shared response, how the write was carried out, why it
//! was refused, and the fingerprint that decides whether two writes are the same.

use super::*;

/// A response buffered so that every merged client can get a copy.
#[derive(Debug, Clone)]
pub struct SharedResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    /// The backend's header lines, written to each client as they came (no map is built for
    /// them on the HTTP/1 path); `None` for responses the proxy made.
    pub backend_lines: Option<PendingHeaders>,
    pub body: Bytes,
    /// The backend that answered, for access logs.
    pub backend: Option<Arc<str>>,
    pub origin: Origin,
}

/// Who made a shared response: what a client's retry may assume about the write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Origin {
    #[default]
    Backend,
    /// The proxy answered; `reached_backend` when bytes of the write may have reached one.
    Proxy { reached_backend: bool },
}

/// How a client's write was carried out; sent in `x-writegate-coalesce`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    Sent,
    Deduplicated,
    Superseded,
}

impl Disposition {
    pub fn as_str(self) -> &'static str {
        match self {
            Disposition::Sent => "sent",
            Disposition::Deduplicated => "deduplicated",
            Disposition::Superseded => "superseded",
        }
    }
}

/// Why a request was refused by its key's queue. Nothing was sent upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `max_pending_per_key` clients already wait on this key.
    QueueFull { retry_after: Duration },
    /// The request waited `max_wait` without reaching the front.
    WaitTimeout { retry_after: Duration },
}

/// What identifies "the same write" for `dedupe`.
#[derive(Debug, Clone)]
pub struct Fingerprint {
    pub method: Method,
    pub uri: Uri,
    pub content_type: Option<HeaderValue>,
    pub body: Bytes,
}

impl PartialEq for Fingerprint {
    fn eq(&self, other: &Fingerprint) -> bool {
        self.method == other.method
            && self.uri == other.uri
            && self.content_type == other.content_type
            && self.body == other.body
    }
}

/// Performs one write upstream; built by the proxy with everything the exchange needs. Like any
/// future it does nothing until polled, so building one sends nothing.
pub type Job = Pin<Box<dyn Future<Output = SharedResponse> + Send>>;

pub(super) type Reply = (SharedResponse, Disposition);

pub(super) fn internal_error() -> SharedResponse {
    SharedResponse {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        headers: HeaderMap::new(),
        backend_lines: None,
        body: Bytes::from_static(b"500 Internal Server Error: the write's outcome was lost\n"),
        backend: None,
        origin: Origin::Proxy {
            reached_backend: true,
        },
    }
}
