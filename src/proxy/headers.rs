//! Header rewriting between client and backend.
//!
//! Hop-by-hop headers (RFC 9110 §7.6.1: the fixed list plus every header the `Connection` header
//! names) belong to one connection and are removed in both directions: the HTTP/1 codec leaves
//! them out of the maps it builds, and [`strip_hop_by_hop`] cleans maps from elsewhere (HTTP/2).
//! Toward the backend the proxy adds `X-Forwarded-For` (appended), `X-Forwarded-Proto`,
//! `X-Forwarded-Host`, `Via` (appended) and an `x-request-id` when the client sent none. `Host` is
//! kept as the client sent it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use bytes::{BufMut, BytesMut};
use http::header::{self, Entry, HeaderMap, HeaderName, HeaderValue};
use http::Version;

use crate::http1::codec;
use crate::http1::fields::is_hop_by_hop;

pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

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
pub fn via_value(version: Version) -> HeaderValue {
    HeaderValue::from_static(match version {
        Version::HTTP_09 => "0.9 writegate",
        Version::HTTP_10 => "1.0 writegate",
        Version::HTTP_2 => "2 writegate",
        Version::HTTP_3 => "3 writegate",
        _ => "1.1 writegate",
    })
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

/// A fresh request id: a per-process random prefix and a counter, as 32 hex digits.
pub fn new_request_id() -> HeaderValue {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    static PREFIX: OnceLock<u64> = OnceLock::new();
    let prefix = *PREFIX.get_or_init(process_seed);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut text = [0u8; 32];
    hex_into(prefix, &mut text[..16]);
    hex_into(n, &mut text[16..]);
    HeaderValue::from_bytes(&text).unwrap_or_else(|_| HeaderValue::from_static("0"))
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
        append_to_list(
            &mut h,
            &X_FORWARDED_FOR,
            &HeaderValue::from_static("10.0.0.1"),
        );
        assert_eq!(h[&X_FORWARDED_FOR], "10.0.0.1");
        h.append(&X_FORWARDED_FOR, HeaderValue::from_static("10.0.0.2"));
        append_to_list(
            &mut h,
            &X_FORWARDED_FOR,
            &HeaderValue::from_static("10.0.0.3"),
        );
        assert_eq!(h[&X_FORWARDED_FOR], "10.0.0.1, 10.0.0.2, 10.0.0.3");
        assert_eq!(h.get_all(&X_FORWARDED_FOR).iter().count(), 1);
    }

    #[test]
    fn request_ids_are_unique_hex() {
        let a = new_request_id();
        let b = new_request_id();
        assert_ne!(a, b);
        assert_eq!(a.len(), 32);
        assert!(a.as_bytes().iter().all(u8::is_ascii_hexdigit));
    }
}
