//! Header rewriting between client and backend.
//!
//! Hop-by-hop headers (RFC 9110 §7.6.1: the fixed list plus every header the `Connection` header
//! names) belong to one connection and are removed in both directions: the HTTP/1 codec leaves
//! them out of what it parses, and [`strip_hop_by_hop`] cleans maps from elsewhere (HTTP/2).
//! Toward the backend the proxy adds `X-Forwarded-For` (appended to the client's, folded into one
//! line), `X-Forwarded-Proto` and `X-Forwarded-Host` (replacing the client's), `Via` (appended)
//! and an `X-Request-Id` when the client sent none: see [`Forwarding`]. `Host` is the one the route
//! was chosen by: the request target's authority when it has one (absolute form, HTTP/2; RFC 9112
//! §3.2.2), else the client's `Host`, else empty (an HTTP/1.0 client may send none, and HTTP/1.1
//! toward the backend requires the line).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use bytes::{BufMut, BytesMut};
use http::header::{self, Entry, HeaderMap, HeaderName, HeaderValue};
use http::Version;

use super::codec;
use super::fields::{is_hop_by_hop, name_is};
use super::request::ClientHeaders;

/// Removes hop-by-hop headers, including the ones `Connection` lists.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    let mut doomed: Vec<HeaderName> = headers
        .keys()
        .filter(|n| is_hop_by_hop(n))
        .cloned()
        .collect();
    let named = headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .filter_map(|token| HeaderName::from_bytes(codec::trim(token)).ok());
    doomed.extend(named);
    for name in doomed {
        headers.remove(name);
    }
}

/// `Via` token for a message received with `version`.
pub fn via_token(version: Version) -> &'static str {
    match version {
        Version::HTTP_09 => "0.9 writegate",
        Version::HTTP_10 => "1.0 writegate",
        Version::HTTP_2 => "2 writegate",
        Version::HTTP_3 => "3 writegate",
        _ => "1.1 writegate",
    }
}

/// `Via` value for a message received with `version`.
pub fn via_value(version: Version) -> HeaderValue {
    HeaderValue::from_static(via_token(version))
}

/// Adds `value` to a list header, keeping what earlier hops wrote (folded into one line).
pub fn append_to_list(headers: &mut HeaderMap, name: &HeaderName, value: &HeaderValue) {
    let mut existing = match headers.entry(name) {
        Entry::Vacant(vacant) => {
            vacant.insert(value.clone());
            return;
        }
        Entry::Occupied(existing) => existing,
    };
    let mut joined = BytesMut::with_capacity(64);
    for v in existing.iter() {
        joined.put_slice(v.as_bytes());
        joined.put_slice(b", ");
    }
    joined.put_slice(value.as_bytes());
    if let Ok(v) = HeaderValue::from_maybe_shared(joined.freeze()) {
        existing.insert(v);
    }
}

/// The headers the proxy adds toward the backend, fixed when the request is routed so that a
/// retry sends the same ones.
#[derive(Debug, Clone)]
pub struct Forwarding {
    /// The host named by the URI (HTTP/2, absolute form): replaces the client's `Host`.
    pub authority: Option<HeaderValue>,
    /// The client's IP, for `X-Forwarded-For`.
    pub client_ip: HeaderValue,
    /// `http` or `https`, for `X-Forwarded-Proto`.
    pub scheme: HeaderValue,
    /// This hop's `Via` entry.
    pub via: &'static str,
    /// Numbers the `X-Request-Id` sent when the client sent none.
    pub request_number: u64,
}

impl Forwarding {
    /// A request number unique in this process; its id also differs between processes.
    pub fn next_request_number() -> u64 {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        COUNTER.fetch_add(1, Ordering::Relaxed)
    }
}

/// What forwarding does with a client's header line, by its name in any case.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Line {
    Keep,
    Host,
    /// `X-Request-Id`: kept, and none is added.
    RequestId,
    /// `X-Forwarded-For`, `Via`: folded into the line the proxy writes.
    Folded,
    /// `X-Forwarded-Proto`, `X-Forwarded-Host`: the proxy's replace them.
    Replaced,
    /// `Content-Length`, `Transfer-Encoding`: the codec frames the body itself.
    Framing,
}

/// Sorted by length first: this runs for every header line.
fn line_kind(name: &[u8]) -> Line {
    let is = |known: &str| name_is(name, known);
    match name.len() {
        3 if is("via") => Line::Folded,
        4 if is("host") => Line::Host,
        12 if is("x-request-id") => Line::RequestId,
        14 if is("content-length") => Line::Framing,
        15 if is("x-forwarded-for") => Line::Folded,
        16 if is("x-forwarded-host") => Line::Replaced,
        17 if is("x-forwarded-proto") => Line::Replaced,
        17 if is("transfer-encoding") => Line::Framing,
        _ => Line::Keep,
    }
}

/// Writes a request's header lines toward a backend: the client's `headers`, less framing ones,
/// with `forwarding`'s applied when there is one.
pub fn encode(out: &mut Vec<u8>, headers: &ClientHeaders, forwarding: Option<&Forwarding>) {
    let Some(forwarding) = forwarding else {
        for (name, value) in headers.iter() {
            if line_kind(name) != Line::Framing {
                put_line(out, name, value);
            }
        }
        return;
    };
    let mut host = forwarding.authority.as_ref().map(HeaderValue::as_bytes);
    if let Some(authority) = host {
        put_line(out, b"Host", authority);
    }
    let (mut folded, mut has_request_id) = (false, false);
    for (name, value) in headers.iter() {
        match line_kind(name) {
            Line::Keep => put_line(out, name, value),
            Line::Host => {
                if host.is_none() {
                    host = Some(value);
                    put_line(out, name, value);
                }
            }
            Line::RequestId => {
                has_request_id = true;
                put_line(out, name, value);
            }
            Line::Folded => folded = true,
            Line::Replaced | Line::Framing => {}
        }
    }
    match host {
        Some(host) => put_line(out, b"X-Forwarded-Host", host),
        None => put_line(out, b"Host", b""),
    }
    let earlier = |name: &'static str| folded.then(|| headers.get_all(name)).into_iter().flatten();
    put_list(
        out,
        b"X-Forwarded-For",
        earlier("x-forwarded-for"),
        forwarding.client_ip.as_bytes(),
    );
    put_line(out, b"X-Forwarded-Proto", forwarding.scheme.as_bytes());
    put_list(out, b"Via", earlier("via"), forwarding.via.as_bytes());
    if !has_request_id {
        let mut id = [0u8; 32];
        request_id(forwarding.request_number, &mut id);
        put_line(out, b"X-Request-Id", &id);
    }
}

fn put_line(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// One line of a list header: what earlier hops wrote, then `ours`.
fn put_list<'v>(
    out: &mut Vec<u8>,
    name: &[u8],
    earlier: impl Iterator<Item = &'v [u8]>,
    ours: &[u8],
) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    for value in earlier {
        out.extend_from_slice(value);
        out.extend_from_slice(b", ");
    }
    out.extend_from_slice(ours);
    out.extend_from_slice(b"\r\n");
}

/// The id of request `number`: a per-process random prefix and the number, as 32 hex digits.
pub fn request_id(number: u64, out: &mut [u8; 32]) {
    static PREFIX: OnceLock<u64> = OnceLock::new();
    let prefix = *PREFIX.get_or_init(process_seed);
    hex_into(prefix, &mut out[..16]);
    hex_into(number, &mut out[16..]);
}

fn hex_into(mut value: u64, out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for slot in out.iter_mut().rev() {
        *slot = DIGITS[(value & 0xf) as usize];
        value >>= 4;
    }
}

/// Differs between processes and restarts, so ids from two writegate instances do not collide.
fn process_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    if let Ok(now) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        hasher.write_u128(now.as_nanos());
    }
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_named_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, X-Secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn list_headers_append() {
        let mut h = HeaderMap::new();
        let via = header::VIA;
        append_to_list(&mut h, &via, &HeaderValue::from_static("1.0 a"));
        assert_eq!(h[&via], "1.0 a");
        h.append(&via, HeaderValue::from_static("1.1 b"));
        append_to_list(&mut h, &via, &HeaderValue::from_static("1.1 c"));
        assert_eq!(h[&via], "1.0 a, 1.1 b, 1.1 c");
        assert_eq!(h.get_all(&via).iter().count(), 1);
    }

    fn forwarding(authority: Option<&'static str>, number: u64) -> Forwarding {
        Forwarding {
            authority: authority.map(HeaderValue::from_static),
            client_ip: HeaderValue::from_static("10.9.9.9"),
            scheme: HeaderValue::from_static("https"),
            via: "1.1 writegate",
            request_number: number,
        }
    }

    fn encoded(
        headers: &[(&'static str, &'static str)],
        forwarding: Option<&Forwarding>,
    ) -> String {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(*name, HeaderValue::from_static(value));
        }
        let mut out = Vec::new();
        encode(&mut out, &ClientHeaders::Map(map), forwarding);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn forwarding_headers_fold_replace_and_add() {
        let out = encoded(
            &[
                ("x-forwarded-for", "203.0.113.7"),
                ("content-length", "5"),
                ("host", "api.example.com"),
                ("x-forwarded-proto", "http"),
                ("x-forwarded-host", "spoofed"),
                ("via", "1.0 edge"),
                ("x-forwarded-for", "198.51.100.2"),
                ("x-request-id", "client-1"),
                ("x-key", "k"),
            ],
            Some(&forwarding(None, 1)),
        );
        let mut lines: Vec<&str> = out.split_terminator("\r\n").collect();
        lines.sort_unstable();
        assert_eq!(
            lines,
            [
                "Via: 1.0 edge, 1.1 writegate",
                "X-Forwarded-For: 203.0.113.7, 198.51.100.2, 10.9.9.9",
                "X-Forwarded-Host: api.example.com",
                "X-Forwarded-Proto: https",
                "host: api.example.com",
                "x-key: k",
                "x-request-id: client-1",
            ]
        );
    }

    #[test]
    fn the_uri_authority_becomes_host_and_ids_are_generated() {
        let out = encoded(&[], Some(&forwarding(Some("kv.example:8080"), 7)));
        let lines: Vec<&str> = out.split_terminator("\r\n").collect();
        assert_eq!(
            lines[..5],
            [
                "Host: kv.example:8080",
                "X-Forwarded-Host: kv.example:8080",
                "X-Forwarded-For: 10.9.9.9",
                "X-Forwarded-Proto: https",
                "Via: 1.1 writegate",
            ]
        );
        let id = lines[5].strip_prefix("X-Request-Id: ").unwrap();
        assert_eq!(id.len(), 32);
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
        assert!(id.ends_with("0000000000000007"), "{id}");
        let other = encoded(&[], Some(&forwarding(None, 8)));
        assert!(
            other.starts_with("Host: \r\n") && !other.contains("X-Forwarded-Host"),
            "no host known: an empty Host line (RFC 9112 §3.2): {other}"
        );
        // The target's authority replaces the client's Host: routing used the authority.
        let absolute = encoded(
            &[("host", "b.example"), ("x-key", "k")],
            Some(&forwarding(Some("a.example"), 9)),
        );
        assert!(absolute.starts_with("Host: a.example\r\n"), "{absolute}");
        assert!(!absolute.contains("b.example"), "{absolute}");
        assert!(!other.contains(id), "ids differ per request: {other}");
    }

    #[test]
    fn without_forwarding_only_framing_headers_go() {
        let out = encoded(
            &[
                ("transfer-encoding", "chunked"),
                ("x-forwarded-for", "203.0.113.7"),
                ("user-agent", "check"),
            ],
            None,
        );
        assert_eq!(out, "x-forwarded-for: 203.0.113.7\r\nuser-agent: check\r\n");
    }
}
