//! A request on its way through the proxy: the client's head, what the proxy adds toward the
//! backend, and the body.
//!
//! An HTTP/1 client's header lines stay spans of the head it sent ([`RawHeaders`]): routing, keys
//! and rewriting read only a few of them, and the backend gets them as they came, followed by the
//! proxy's forwarding headers ([`Forwarding`]), written in one pass. Building a `HeaderMap` per
//! request and serializing it again cost more than the rest of a small request's path. HTTP/2
//! requests arrive as hyper's map and keep it.

use std::sync::Arc;

use http::{HeaderMap, Method, Uri, Version};

use super::body::RequestBody;
use super::fields::{LineIter, RawHeaders};
use super::headers::Forwarding;
use super::InterimSink;

/// A request on its way to a backend. Boxed: it passes through several futures (dispatch, retry,
/// send), and each would otherwise hold room for it.
pub type OutgoingRequest = Box<ProxyRequest>;

#[derive(Debug)]
pub struct ProxyRequest {
    pub head: RequestHead,
    pub body: RequestBody,
}

/// Everything of a request but its body; cloned where a request may be sent more than once.
#[derive(Debug, Clone)]
pub struct RequestHead {
    pub method: Method,
    pub uri: Uri,
    /// The client's version; the backend always gets HTTP/1.1.
    pub version: Version,
    /// The client's end-to-end headers.
    pub headers: ClientHeaders,
    /// What the proxy adds toward the backend; set once the request is routed.
    pub forwarding: Option<Forwarding>,
    /// Where a backend's interim responses go: the HTTP/1.1 client's connection, if any.
    pub interim: Option<Arc<dyn InterimSink>>,
}

/// A client's end-to-end headers (hop-by-hop ones already left out).
#[derive(Debug, Clone)]
pub enum ClientHeaders {
    /// From an HTTP/1 client: the lines as received.
    Lines(RawHeaders),
    /// From an HTTP/2 client (hyper's map), or made by the proxy itself (health checks).
    Map(HeaderMap),
}

impl ClientHeaders {
    /// Every header as (name, value), names in the client's case; same-named ones in order.
    pub fn iter(&self) -> HeaderIter<'_> {
        match self {
            ClientHeaders::Lines(lines) => HeaderIter::Lines(lines.iter()),
            ClientHeaders::Map(map) => HeaderIter::Map(map.iter()),
        }
    }

    /// The values of the headers named `name` (lowercase), in order. A scan: requests carry few
    /// headers, and this is asked for one or two of them.
    pub fn get_all<'h, 'n>(
        &'h self,
        name: &'n str,
    ) -> impl Iterator<Item = &'h [u8]> + use<'h, 'n> {
        self.iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, value)| value)
    }

    /// The first value of the header named `name` (lowercase).
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, value)| value)
    }
}

/// The headers of a [`ClientHeaders`], as (name, value).
pub enum HeaderIter<'h> {
    Lines(LineIter<'h>),
    Map(http::header::Iter<'h, http::HeaderValue>),
}

impl<'h> Iterator for HeaderIter<'h> {
    type Item = (&'h [u8], &'h [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            HeaderIter::Lines(lines) => lines.next(),
            HeaderIter::Map(map) => map
                .next()
                .map(|(name, value)| (name.as_str().as_bytes(), value.as_bytes())),
        }
    }
}

impl ProxyRequest {
    /// A request as received, before routing decides its forwarding headers.
    pub fn new(
        method: Method,
        uri: Uri,
        version: Version,
        headers: ClientHeaders,
        body: RequestBody,
    ) -> ProxyRequest {
        ProxyRequest {
            head: RequestHead {
                method,
                uri,
                version,
                headers,
                forwarding: None,
                interim: None,
            },
            body,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn lookups_ignore_case_and_keep_order() {
        let mut map = HeaderMap::new();
        map.append("cookie", HeaderValue::from_static("a=1"));
        map.append("x-key", HeaderValue::from_static("k"));
        map.append("cookie", HeaderValue::from_static("b=2"));
        let headers = ClientHeaders::Map(map);
        assert_eq!(headers.get("x-key"), Some(&b"k"[..]));
        assert_eq!(headers.get("x-other"), None);
        let cookies: Vec<&[u8]> = headers.get_all("cookie").collect();
        assert_eq!(cookies, [&b"a=1"[..], b"b=2"]);
    }
}
