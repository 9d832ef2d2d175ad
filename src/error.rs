//! The proxy's error type and its single mapping to a status, a response body and a log label.
//!
//! Every error knows whose fault it is ([`Fault`]) so that logs and, later, metrics can tell a bad
//! client from a failing backend. Response bodies name the route and upstream so that a client can
//! report something useful, and never anything internal (no backend addresses, no error chains).

use std::fmt::Write as _;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use http::{Response, StatusCode};

use crate::key::KeySource;
use crate::proxy::ResponseBody;
use crate::upstream::SendError;

/// Who caused a failed request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Client,
    Upstream,
    Proxy,
}

/// A request that did not get a backend's response.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no route matches this host and path")]
    NoRoute,
    #[error("the route does not accept this method")]
    MethodNotAllowed,
    #[error("{0}")]
    BadRequest(&'static str),
    #[error("request body is larger than this route's limit of {limit} bytes")]
    BodyTooLarge { limit: u64 },
    #[error("reading the request body from the client failed")]
    ClientBody,
    #[error("the request has no key in {0}")]
    MissingKey(KeySource),
    #[error("the request key from {key_source} is longer than {limit} bytes")]
    KeyTooLong { key_source: KeySource, limit: usize },
    #[error("no backend is available")]
    NoBackend,
    #[error("{0}")]
    Upstream(#[from] SendError),
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::BadRequest(_)
            | ProxyError::ClientBody
            | ProxyError::MissingKey(_)
            | ProxyError::KeyTooLong { .. } => StatusCode::BAD_REQUEST,
            ProxyError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::NoBackend => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Upstream(SendError::ConnectTimeout | SendError::ResponseTimeout) => {
                StatusCode::GATEWAY_TIMEOUT
            }
            ProxyError::Upstream(_) => StatusCode::BAD_GATEWAY,
        }
    }

    pub fn fault(&self) -> Fault {
        match self {
            ProxyError::NoRoute
            | ProxyError::MethodNotAllowed
            | ProxyError::BadRequest(_)
            | ProxyError::BodyTooLarge { .. }
            | ProxyError::ClientBody
            | ProxyError::MissingKey(_)
            | ProxyError::KeyTooLong { .. } => Fault::Client,
            ProxyError::NoBackend | ProxyError::Upstream(_) => Fault::Upstream,
        }
    }

    /// A short, stable name for logs.
    pub fn label(&self) -> &'static str {
        match self {
            ProxyError::NoRoute => "no_route",
            ProxyError::MethodNotAllowed => "method_not_allowed",
            ProxyError::BadRequest(_) => "bad_request",
            ProxyError::BodyTooLarge { .. } => "body_too_large",
            ProxyError::ClientBody => "client_body",
            ProxyError::MissingKey(_) => "missing_key",
            ProxyError::KeyTooLong { .. } => "key_too_long",
            ProxyError::NoBackend => "no_backend",
            ProxyError::Upstream(SendError::Connect(_)) => "connect_failed",
            ProxyError::Upstream(SendError::ConnectTimeout) => "connect_timeout",
            ProxyError::Upstream(SendError::ResponseTimeout) => "response_timeout",
            ProxyError::Upstream(SendError::Exchange { .. }) => "upstream_failed",
        }
    }

    /// What the client reads: one line, no internals.
    fn write_client_message(&self, out: &mut String) {
        let text = match self {
            ProxyError::MissingKey(source) => {
                let _ = write!(out, "this route needs a request key in {source}");
                return;
            }
            ProxyError::KeyTooLong { key_source, limit } => {
                let _ = write!(
                    out,
                    "the request key in {key_source} is longer than {limit} bytes"
                );
                return;
            }
            ProxyError::BodyTooLarge { limit } => {
                let _ = write!(
                    out,
                    "request body is larger than this route allows ({limit} bytes)"
                );
                return;
            }
            ProxyError::NoRoute => "no route matches this host and path",
            ProxyError::MethodNotAllowed => "this route does not accept the request method",
            ProxyError::BadRequest(reason) => reason,
            ProxyError::ClientBody => "the request body could not be read",
            ProxyError::NoBackend => "no backend is available",
            ProxyError::Upstream(SendError::Connect(_)) => "could not connect to a backend",
            ProxyError::Upstream(SendError::ConnectTimeout) => "timed out connecting to a backend",
            ProxyError::Upstream(SendError::ResponseTimeout) => {
                "the backend did not answer within the response timeout"
            }
            ProxyError::Upstream(SendError::Exchange { .. }) => {
                "the backend closed or reset the connection"
            }
        };
        out.push_str(text);
    }

    /// The response a client gets for this error. `route` and `upstream` are named when known.
    pub fn to_response(
        &self,
        route: Option<&str>,
        upstream: Option<&str>,
    ) -> Response<ResponseBody> {
        let status = self.status();
        let mut body = String::with_capacity(128);
        let _ = write!(
            body,
            "{} {}: ",
            status.as_u16(),
            status.canonical_reason().unwrap_or("")
        );
        self.write_client_message(&mut body);
        match (route, upstream) {
            (Some(r), Some(u)) => {
                let _ = write!(body, " (route \"{r}\", upstream \"{u}\")");
            }
            (Some(r), None) => {
                let _ = write!(body, " (route \"{r}\")");
            }
            _ => {}
        }
        body.push('\n');
        let mut response = Response::new(ResponseBody::full(Bytes::from(body)));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        if status == StatusCode::SERVICE_UNAVAILABLE {
            headers.insert(RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}
