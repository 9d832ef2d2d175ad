//! Idempotency keys: a client's retry of a write gets the first attempt's recorded response
//! instead of applying the write again (draft-ietf-httpapi-idempotency-key-header, as Stripe's API
//! does it).
//!
//! This module owns what a key means: its syntax ([`parse_key`]), the identity of an entry (route,
//! key and `scope` values, hashed: [`Policy::entry_id`]), the fingerprint that tells a retry from a
//! different request under the same key, the record kept for replay ([`record`]), the stores that
//! keep entries ([`store`]), the errors a client can get ([`IdempotencyError`]) and the metrics.
//! The proxy's `idempotent` step drives it for each request of a route that has a policy.

pub mod record;
pub mod store;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use metrics::Counter;
use ring::digest::{Context, SHA256};
use ring::rand::{SecureRandom, SystemRandom};

pub use crate::byte_form::hex;
use crate::config::IdempotencyConfig;
use crate::key::KeySource;
use crate::wire::{BodyObserver, RequestHead};
pub use record::{Entry, Outcome, Record};
pub use store::{Claim, Claimed, Ending, Store, StoreError};

/// A SHA-256 digest.
pub type Digest = [u8; 32];
/// A claim's random token: only the request holding it may complete or release the entry.
pub type Token = [u8; 16];

/// Longest key, as the draft and Stripe allow.
pub const MAX_KEY_LENGTH: usize = 255;

/// The response header a replay carries.
pub static IDEMPOTENT_REPLAYED: http::HeaderName =
    http::HeaderName::from_static("idempotent-replayed");

/// A route's idempotency settings and the store its entries live in.
#[derive(Debug)]
pub struct Policy {
    pub config: IdempotencyConfig,
    pub store: Arc<dyn Store>,
    metrics: PolicyMetrics,
}

impl Policy {
    pub fn new(config: IdempotencyConfig, store: Arc<dyn Store>, route: &str) -> Policy {
        Policy {
            metrics: PolicyMetrics::new(route),
            config,
            store,
        }
    }

    /// Whether requests of this method carry keys under this policy.
    pub fn covers(&self, method: &http::Method) -> bool {
        self.config.methods.contains(method)
    }

    /// The request's key: `Ok(None)` when it sent none.
    pub fn key<'h>(&self, head: &'h RequestHead) -> Result<Option<Key<'h>>, IdempotencyError> {
        let mut values = head.headers.get_all(self.config.header.as_str());
        let Some(value) = values.next() else {
            return Ok(None);
        };
        if values.next().is_some() {
            return Err(IdempotencyError::Invalid(
                "the request has more than one key",
            ));
        }
        parse_key(value)
            .map(Some)
            .map_err(IdempotencyError::Invalid)
    }

    /// The entry's identity: the route, the key and each `scope` value, hashed, so that neither
    /// keys nor scope values (credentials, often) are stored.
    pub fn entry_id(&self, route: &str, key: &Key<'_>, head: &RequestHead) -> Digest {
        let mut hash = Context::new(&SHA256);
        hash.update(b"writegate idempotency v1\0");
        framed(&mut hash, Some(route.as_bytes()));
        framed(&mut hash, Some(key.as_bytes()));
        for source in &self.config.scope {
            framed(&mut hash, scope_value(source, head));
        }
        digest(hash)
    }

    /// Counts one request's outcome.
    pub fn count(&self, outcome: Counted) {
        self.metrics.outcomes[outcome as usize].increment(1);
    }
}

/// A scope attribute's value; the whole header for headers (a key source takes what it needs).
fn scope_value<'h>(source: &KeySource, head: &'h RequestHead) -> Option<&'h [u8]> {
    source.extract(head)
}

/// Length-prefixed, so that ("ab", "c") and ("a", "bc") differ; absence differs from empty.
fn framed(hash: &mut Context, part: Option<&[u8]>) {
    match part {
        None => hash.update(&[0]),
        Some(bytes) => {
            hash.update(&[1]);
            hash.update(&(bytes.len() as u64).to_be_bytes());
            hash.update(bytes);
        }
    }
}

fn digest(hash: Context) -> Digest {
    let mut out = [0; 32];
    out.copy_from_slice(hash.finish().as_ref());
    out
}

/// The method and target of a request: what must match, besides the body, for a retry.
pub fn head_digest(head: &RequestHead) -> Digest {
    let mut hash = Context::new(&SHA256);
    framed(&mut hash, Some(head.method.as_str().as_bytes()));
    let target = head.uri.path_and_query().map_or("/", |p| p.as_str());
    framed(&mut hash, Some(target.as_bytes()));
    digest(hash)
}

/// The digest of a body held in memory.
pub fn body_digest(body: &[u8]) -> Digest {
    let mut hash = Context::new(&SHA256);
    hash.update(body);
    digest(hash)
}

/// A fresh claim token.
pub fn new_token() -> Result<Token, StoreError> {
    let mut token = [0; 16];
    SystemRandom::new()
        .fill(&mut token)
        .map_err(|_| StoreError::Unavailable("the system random source failed".into()))?;
    Ok(token)
}

/// Hashes a streamed body as it is read; the digest appears in `done` at its end.
pub struct BodyHasher {
    hash: Option<Context>,
    done: Arc<OnceLock<Digest>>,
}

impl std::fmt::Debug for BodyHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BodyHasher")
            .field("done", &self.done.get().is_some())
            .finish()
    }
}

impl BodyHasher {
    pub fn new() -> (BodyHasher, Arc<OnceLock<Digest>>) {
        let done = Arc::new(OnceLock::new());
        let hasher = BodyHasher {
            hash: Some(Context::new(&SHA256)),
            done: Arc::clone(&done),
        };
        (hasher, done)
    }
}

impl BodyObserver for BodyHasher {
    fn data(&mut self, data: &[u8]) {
        if let Some(hash) = &mut self.hash {
            hash.update(data);
        }
    }

    fn end(&mut self) {
        if let Some(hash) = self.hash.take() {
            let _ = self.done.set(digest(hash));
        }
    }
}

/// A client's key: the draft's sf-string (`"..."`, unescaped here) or a bare token of the same
/// characters, as Stripe-style clients send it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key<'h> {
    Raw(&'h [u8]),
    Unescaped(Bytes),
}

impl Key<'_> {
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Key::Raw(bytes) => bytes,
            Key::Unescaped(bytes) => bytes,
        }
    }
}

/// Parses a key header value; the error says what is wrong, for the 400.
pub fn parse_key(value: &[u8]) -> Result<Key<'_>, &'static str> {
    let value = value.trim_ascii();
    let key = match value {
        [b'"', inner @ .., b'"'] => unescape(inner)?,
        [b'"', ..] => return Err("the key's quoted string is not closed"),
        bare => {
            if !bare
                .iter()
                .all(|&b| (0x21..=0x7e).contains(&b) && b != b'"' && b != b'\\')
            {
                return Err("the key must be printable ASCII, quoted as \"...\" if it has spaces");
            }
            Key::Raw(bare)
        }
    };
    match key.as_bytes().len() {
        0 => Err("the key is empty"),
        n if n > MAX_KEY_LENGTH => Err("the key is longer than 255 characters"),
        _ => Ok(key),
    }
}

/// The inside of an RFC 8941 sf-string: printable ASCII, `\"` and `\\` as the only escapes.
fn unescape(inner: &[u8]) -> Result<Key<'_>, &'static str> {
    if !inner.iter().all(|b| (0x20..=0x7e).contains(b)) {
        return Err("the key must be printable ASCII");
    }
    if !inner.iter().any(|&b| b == b'\\' || b == b'"') {
        return Ok(Key::Raw(inner));
    }
    let mut out = Vec::with_capacity(inner.len());
    let mut bytes = inner.iter();
    while let Some(&b) = bytes.next() {
        match b {
            b'\\' => match bytes.next() {
                Some(&escaped @ (b'"' | b'\\')) => out.push(escaped),
                _ => return Err("the key's quoted string has a bad escape"),
            },
            b'"' => return Err("the key's quoted string has an unescaped quote"),
            b => out.push(b),
        }
    }
    Ok(Key::Unescaped(out.into()))
}

/// Why a request with (or without) a key got the proxy's answer rather than a backend's.
#[derive(Debug, Clone, thiserror::Error)]
pub enum IdempotencyError {
    #[error("the route requires an idempotency key in {0}")]
    Missing(http::HeaderName),
    #[error("invalid idempotency key: {0}")]
    Invalid(&'static str),
    #[error("a request with this idempotency key is still in progress")]
    InFlight { retry_after: Duration },
    #[error("this idempotency key was used for a different request")]
    Mismatch,
    #[error("the first request with this idempotency key may have reached the backend, and its outcome is unknown")]
    Unknown,
    /// The store did not answer in time or failed; the reason for the log.
    #[error("the idempotency store is unavailable: {0}")]
    Store(String),
}

impl IdempotencyError {
    pub fn status(&self) -> http::StatusCode {
        use http::StatusCode;
        match self {
            IdempotencyError::Missing(_) | IdempotencyError::Invalid(_) => StatusCode::BAD_REQUEST,
            IdempotencyError::InFlight { .. } => StatusCode::CONFLICT,
            IdempotencyError::Mismatch => StatusCode::UNPROCESSABLE_ENTITY,
            IdempotencyError::Unknown => StatusCode::BAD_GATEWAY,
            IdempotencyError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The problem type's last path segment, and its title (RFC 9457).
    pub fn problem(&self) -> (&'static str, &'static str) {
        match self {
            IdempotencyError::Missing(_) => ("idempotency-key-missing", "Idempotency key missing"),
            IdempotencyError::Invalid(_) => ("idempotency-key-invalid", "Invalid idempotency key"),
            IdempotencyError::InFlight { .. } => (
                "idempotency-key-in-use",
                "A request with this key is in progress",
            ),
            IdempotencyError::Mismatch => (
                "idempotency-key-reused",
                "Idempotency key reused for a different request",
            ),
            IdempotencyError::Unknown => ("idempotency-outcome-unknown", "Outcome unknown"),
            IdempotencyError::Store(_) => (
                "idempotency-store-unavailable",
                "Idempotency store unavailable",
            ),
        }
    }

    /// What the client reads in `detail` (the store's reason stays in the log).
    pub fn detail(&self) -> String {
        match self {
            IdempotencyError::Store(_) => {
                "the store that records idempotency keys did not answer; the request was not sent"
                    .to_string()
            }
            IdempotencyError::Unknown => "the first request with this key may have reached the \
                backend, but no response came; it is not sent again, so check the resource \
                before retrying with a new key"
                .to_string(),
            other => other.to_string(),
        }
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            IdempotencyError::InFlight { retry_after } => Some(*retry_after),
            IdempotencyError::Store(_) => Some(Duration::from_secs(1)),
            _ => None,
        }
    }

    pub fn label(&self) -> &'static str {
        match self {
            IdempotencyError::Missing(_) => "idempotency_key_missing",
            IdempotencyError::Invalid(_) => "idempotency_key_invalid",
            IdempotencyError::InFlight { .. } => "idempotency_conflict",
            IdempotencyError::Mismatch => "idempotency_mismatch",
            IdempotencyError::Unknown => "idempotency_unknown",
            IdempotencyError::Store(_) => "idempotency_store_error",
        }
    }
}

/// An RFC 9457 problem document.
pub fn problem_json(
    kind: &str,
    title: &str,
    status: http::StatusCode,
    detail: &str,
    route: Option<&str>,
) -> Bytes {
    let mut body = serde_json::json!({
        "type": format!("https://writegate.dev/problems/{kind}"),
        "title": title,
        "status": status.as_u16(),
        "detail": detail,
    });
    if let (Some(route), Some(map)) = (route, body.as_object_mut()) {
        map.insert("route".into(), route.into());
    }
    let mut text = body.to_string();
    text.push('\n');
    Bytes::from(text)
}

/// How a request on a route with a policy ended, as counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    /// Its response was recorded for replay.
    Recorded,
    /// It got a recorded response.
    Replayed,
    /// 409: the first request with its key was still in flight.
    Conflict,
    /// 422: its key was used for a different request.
    Mismatch,
    /// 400: the route requires a key and it had none.
    Missing,
    /// 400: its key was malformed.
    Invalid,
    /// It may have reached a backend and got no response: recorded as unknown.
    Indeterminate,
    /// A retry of a request whose outcome is unknown: answered 502.
    Unknown,
    /// The store failed or was too slow.
    StoreError,
    /// Answered by the proxy before any byte reached a backend: the claim was released.
    Released,
    /// Sent without protection: no key (and none required), or the store failed under
    /// `on_store_error = "pass"`.
    Unprotected,
}

const COUNTED: [(Counted, &str); 11] = [
    (Counted::Recorded, "recorded"),
    (Counted::Replayed, "replayed"),
    (Counted::Conflict, "conflict"),
    (Counted::Mismatch, "mismatch"),
    (Counted::Missing, "missing"),
    (Counted::Invalid, "invalid"),
    (Counted::Indeterminate, "indeterminate"),
    (Counted::Unknown, "unknown"),
    (Counted::StoreError, "store_error"),
    (Counted::Released, "released"),
    (Counted::Unprotected, "unprotected"),
];

#[derive(Debug)]
struct PolicyMetrics {
    outcomes: [Counter; COUNTED.len()],
}

impl PolicyMetrics {
    fn new(route: &str) -> PolicyMetrics {
        PolicyMetrics {
            outcomes: COUNTED.map(|(_, label)| {
                metrics::counter!(crate::metrics::IDEMPOTENCY_REQUESTS, "route" => route.to_string(), "outcome" => label)
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_sf_strings_or_bare_tokens() {
        assert_eq!(parse_key(b"\"abc-123\"").unwrap().as_bytes(), b"abc-123");
        assert_eq!(parse_key(b"abc-123").unwrap().as_bytes(), b"abc-123");
        assert_eq!(
            parse_key(b"\"a b\\\"c\\\\\"").unwrap().as_bytes(),
            b"a b\"c\\"
        );
        assert_eq!(parse_key(b"  k1  ").unwrap().as_bytes(), b"k1");
        assert_eq!(parse_key(&[b'k'; 255]).unwrap().as_bytes().len(), 255);
        for bad in [
            &b"\"\""[..],
            b"",
            b"a b",
            b"\"abc",
            b"\"a\\nb\"",
            b"\"a\"b\"",
            b"caf\xc3\xa9",
            b"\"tab\there\"",
            &[b'k'; 256],
        ] {
            assert!(
                parse_key(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn quoted_and_bare_forms_name_the_same_key() {
        assert_eq!(
            parse_key(b"\"ord-1\"").unwrap().as_bytes(),
            parse_key(b"ord-1").unwrap().as_bytes()
        );
    }

    #[test]
    fn framing_keeps_parts_apart() {
        let id = |parts: &[Option<&[u8]>]| {
            let mut hash = Context::new(&SHA256);
            for part in parts {
                framed(&mut hash, *part);
            }
            digest(hash)
        };
        assert_ne!(
            id(&[Some(b"ab"), Some(b"c")]),
            id(&[Some(b"a"), Some(b"bc")])
        );
        assert_ne!(id(&[None]), id(&[Some(b"")]));
    }

    #[test]
    fn the_body_hasher_matches_a_whole_body_digest() {
        let (mut hasher, done) = BodyHasher::new();
        hasher.data(b"hello ");
        hasher.data(b"world");
        assert!(done.get().is_none());
        hasher.end();
        hasher.end();
        assert_eq!(done.get(), Some(&body_digest(b"hello world")));
    }
}
