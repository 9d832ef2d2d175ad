//! Request keys: the value that identifies what a write is about (a user, an order, a row).
//!
//! A route with `key = "..."` extracts the key once per request, before balancing, from one source:
//! a header, a query parameter, a cookie, the path, or one path segment. Values are taken raw, as the
//! client sent them (no percent-decoding), byte for byte, so non-UTF-8 keys work and nginx's
//! `$http_*`, `$arg_*` and `$cookie_*` variables give the same bytes. An empty value counts as missing.

use std::fmt;

use http::header::HeaderName;

use crate::wire::RequestHead;

/// Where a route finds its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// The first value of this header.
    Header(HeaderName),
    /// The first `NAME=value` pair of the query string.
    Query(Box<str>),
    /// The first cookie with this name, across all `Cookie` headers.
    Cookie(Box<str>),
    /// The whole path, without the query.
    Path,
    /// The Nth segment of the path, from 1: in `/kv/user42`, segment 2 is `user42`.
    PathSegment(usize),
}

impl KeySource {
    /// Parses the config syntax: `header:NAME`, `query:NAME`, `cookie:NAME`, `path`, `path_segment:N`.
    pub fn parse(text: &str) -> Result<KeySource, String> {
        let usage = "use header:NAME, query:NAME, cookie:NAME, path or path_segment:N";
        let (kind, arg) = text.split_once(':').unwrap_or((text, ""));
        let named = |what: &str| {
            if arg.is_empty() {
                Err(format!(
                    "key {text:?} needs a {what} name after ':' ({usage})"
                ))
            } else {
                Ok(arg)
            }
        };
        match kind {
            "header" => HeaderName::from_bytes(named("header")?.as_bytes())
                .map(KeySource::Header)
                .map_err(|_| format!("key {text:?}: {arg:?} is not a valid header name")),
            "query" => Ok(KeySource::Query(named("query parameter")?.into())),
            "cookie" => Ok(KeySource::Cookie(named("cookie")?.into())),
            "path" if arg.is_empty() => Ok(KeySource::Path),
            "path_segment" => match arg.parse::<usize>() {
                Ok(n) if n >= 1 => Ok(KeySource::PathSegment(n)),
                _ => Err(format!(
                    "key {text:?}: the segment number must be a whole number from 1"
                )),
            },
            _ => Err(format!("bad key {text:?}: {usage}")),
        }
    }

    /// The raw key bytes, or `None` when the source is absent or empty.
    pub fn extract<'a>(&self, head: &'a RequestHead) -> Option<&'a [u8]> {
        let (uri, headers) = (&head.uri, &head.headers);
        let value: &[u8] = match self {
            KeySource::Header(name) => headers.get(name.as_str())?,
            KeySource::Query(name) => query_param(uri.query()?, name)?,
            KeySource::Cookie(name) => headers
                .get_all("cookie")
                .find_map(|header| cookie(header, name.as_bytes()))?,
            KeySource::Path => uri.path().as_bytes(),
            KeySource::PathSegment(n) => uri.path().split('/').nth(*n)?.as_bytes(),
        };
        (!value.is_empty()).then_some(value)
    }
}

impl fmt::Display for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeySource::Header(name) => write!(f, "header {name}"),
            KeySource::Query(name) => write!(f, "query parameter {name}"),
            KeySource::Cookie(name) => write!(f, "cookie {name}"),
            KeySource::Path => write!(f, "the path"),
            KeySource::PathSegment(n) => write!(f, "path segment {n}"),
        }
    }
}

fn query_param<'a>(query: &'a str, name: &str) -> Option<&'a [u8]> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then_some(v.as_bytes())
    })
}

fn cookie<'a>(header: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    header.split(|&b| b == b';').find_map(|pair| {
        let pair = pair.trim_ascii();
        let eq = pair.iter().position(|&b| b == b'=')?;
        (&pair[..eq] == name).then(|| &pair[eq + 1..])
    })
}

/// What a route does with a request that has no key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnMissingKey {
    /// Answer 400, naming the expected source.
    Reject,
    /// Balance it by least connections instead.
    LeastConn,
}

/// A route's key settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRule {
    pub source: KeySource,
    pub on_missing: OnMissingKey,
    /// Longer keys are refused with 400.
    pub max_length: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::wire::fields::request_lines;
    use crate::wire::ClientHeaders;
    use http::{HeaderMap, HeaderValue, Method, Uri, Version};

    /// The same request as an HTTP/2 client's map and as an HTTP/1 client's lines.
    fn parts(uri: &str, headers: &[(&str, &[u8])]) -> [RequestHead; 2] {
        let mut map = HeaderMap::new();
        let mut text = format!("GET {uri} HTTP/1.1\r\n").into_bytes();
        for (name, value) in headers {
            let name = http::HeaderName::from_bytes(name.as_bytes()).unwrap();
            map.append(name.clone(), HeaderValue::from_bytes(value).unwrap());
            text.extend_from_slice(name.as_str().to_ascii_uppercase().as_bytes());
            text.extend_from_slice(b": ");
            text.extend_from_slice(value);
            text.extend_from_slice(b"\r\n");
        }
        text.extend_from_slice(b"\r\n");
        let head = |headers| RequestHead {
            method: Method::GET,
            uri: Uri::try_from(uri).unwrap(),
            version: Version::HTTP_11,
            headers,
            forwarding: None,
            interim: None,
        };
        [
            head(ClientHeaders::Map(map)),
            head(ClientHeaders::Lines(request_lines(text.into()))),
        ]
    }

    /// The key from both forms of the request, which must agree.
    fn key<'a>(source: &str, request: &'a [RequestHead; 2]) -> Option<&'a [u8]> {
        let source = KeySource::parse(source).unwrap();
        let [from_map, from_lines] = request.each_ref().map(|head| source.extract(head));
        assert_eq!(from_map, from_lines, "{source}");
        from_map
    }

    #[test]
    fn every_source() {
        let p = parts(
            "/kv/user42/items?id=7&k=a%20b&empty=",
            &[
                ("x-write-key", b"w1"),
                ("cookie", b"a=1; session=s9"),
                ("cookie", b"other=2"),
            ],
        );
        assert_eq!(key("header:x-write-key", &p), Some(&b"w1"[..]));
        assert_eq!(key("header:X-Write-Key", &p), Some(&b"w1"[..]));
        assert_eq!(key("query:id", &p), Some(&b"7"[..]));
        assert_eq!(key("query:k", &p), Some(&b"a%20b"[..]), "raw, not decoded");
        assert_eq!(key("cookie:session", &p), Some(&b"s9"[..]));
        assert_eq!(key("cookie:other", &p), Some(&b"2"[..]));
        assert_eq!(key("path", &p), Some(&b"/kv/user42/items"[..]));
        assert_eq!(key("path_segment:1", &p), Some(&b"kv"[..]));
        assert_eq!(key("path_segment:2", &p), Some(&b"user42"[..]));
    }

    #[test]
    fn missing_and_empty_values_are_none() {
        let p = parts("/kv//x?empty=&flag", &[("x-empty", b"")]);
        assert_eq!(key("header:x-absent", &p), None);
        assert_eq!(key("header:x-empty", &p), None);
        assert_eq!(key("query:empty", &p), None);
        assert_eq!(key("query:flag", &p), None);
        assert_eq!(key("query:absent", &p), None);
        assert_eq!(key("cookie:c", &p), None);
        assert_eq!(key("path_segment:2", &p), None, "empty segment");
        assert_eq!(key("path_segment:9", &p), None);
    }

    #[test]
    fn non_utf8_header_keys_are_kept_as_bytes() {
        let p = parts("/", &[("x-key", &[0xff, 0xfe, b'k'])]);
        assert_eq!(key("header:x-key", &p), Some(&[0xff, 0xfe, b'k'][..]));
    }

    #[test]
    fn parse_errors_explain_the_syntax() {
        assert!(KeySource::parse("header:")
            .unwrap_err()
            .contains("needs a header name"));
        assert!(KeySource::parse("header:bad name")
            .unwrap_err()
            .contains("not a valid header name"));
        assert!(KeySource::parse("path_segment:0")
            .unwrap_err()
            .contains("from 1"));
        assert!(KeySource::parse("body")
            .unwrap_err()
            .contains("use header:NAME"));
        assert_eq!(KeySource::parse("path").unwrap().to_string(), "the path");
    }
}
