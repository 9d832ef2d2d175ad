//! A route's `[routes.idempotency]` section: its validated form and its checks.

use super::file::{
    ConcurrentKind, IdempotencySection, IdempotencyStoreKind, OnIndeterminateKind, OnStoreErrorKind,
};
use super::*;

/// Default header that carries a client's idempotency key.
pub const DEFAULT_IDEMPOTENCY_HEADER: &str = "idempotency-key";
/// Default time a recorded response is kept for retries (Stripe keeps keys for 24 hours).
pub const DEFAULT_IDEMPOTENCY_TTL: Duration = Duration::from_secs(24 * 3600);
/// Longest accepted `ttl`.
pub const MAX_IDEMPOTENCY_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// Default largest response body recorded for replay.
pub const DEFAULT_MAX_RESPONSE_BODY: u64 = 1 << 20;
/// Largest accepted `max_response_body` (a record is one store value).
pub const MAX_RESPONSE_BODY_LIMIT: u64 = 64 << 20;
/// Default most entries of a memory store.
pub const DEFAULT_MAX_ENTRIES: usize = 100_000;
/// Default longest wait for the store.
pub const DEFAULT_STORE_TIMEOUT: Duration = Duration::from_secs(1);
/// Added to the longest a request of the route can take, for the default claim lease.
pub const LEASE_MARGIN: Duration = Duration::from_secs(10);

/// What a request with a key still in flight gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Concurrent {
    /// 409 with `Retry-After`.
    Reject,
    /// Wait for the first to finish (up to the route's response timeout), then replay.
    Wait,
}

/// What a retry of a request whose outcome is unknown gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnIndeterminate {
    /// 502 saying the first attempt's outcome is unknown.
    Reject,
    /// Forwarded again, for backends that dedupe on the forwarded key.
    Forward,
}

/// What a request gets when the store cannot answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnStoreError {
    /// 503: fail closed.
    Reject,
    /// Forwarded without protection (counted).
    Pass,
}

/// Where entries are kept.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum IdempotencyStore {
    /// This process's memory, at most `max_entries`.
    Memory { max_entries: usize },
    /// An embedded database file: survives restarts and crashes of this process.
    File { path: PathBuf },
    /// A Redis server shared by several writegate processes.
    Redis { url: String },
}

/// A route's validated `[routes.idempotency]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyConfig {
    /// Lowercase.
    pub header: http::HeaderName,
    pub methods: Vec<Method>,
    pub required: bool,
    /// Request attributes that, with the route and the key, identify an entry.
    pub scope: Vec<KeySource>,
    pub ttl: Duration,
    /// How long a claim holds before its holder is presumed gone.
    pub lease: Duration,
    pub forward_header: bool,
    pub concurrent: Concurrent,
    pub on_indeterminate: OnIndeterminate,
    pub max_response_body: u64,
    pub store: IdempotencyStore,
    pub store_timeout: Duration,
    pub on_store_error: OnStoreError,
}

/// The longest a route's request can take, from which the default lease is derived.
pub(super) struct RouteTimes {
    pub longest: Duration,
}

impl Validator<'_, '_> {
    pub(super) fn idempotency(
        &mut self,
        section: Spanned<IdempotencySection>,
        times: RouteTimes,
    ) -> IdempotencyConfig {
        let span = section.span();
        let s = section.into_inner();
        let header = s.header.map_or_else(
            || http::HeaderName::from_static(DEFAULT_IDEMPOTENCY_HEADER),
            |h| {
                http::HeaderName::from_bytes(h.get_ref().as_bytes()).unwrap_or_else(|_| {
                    self.sink.at(
                        h.span(),
                        format!("{:?} is not a valid header name", h.get_ref()),
                    );
                    http::HeaderName::from_static(DEFAULT_IDEMPOTENCY_HEADER)
                })
            },
        );
        let methods = match s.methods {
            None => DEFAULT_COALESCE_METHODS.to_vec(),
            Some(list) => list.into_iter().filter_map(|m| self.method(m)).collect(),
        };
        let scope = s
            .scope
            .unwrap_or_default()
            .into_iter()
            .filter_map(|text| {
                KeySource::parse(text.get_ref())
                    .map_err(|e| self.sink.at(text.span(), format!("scope: {e}")))
                    .ok()
            })
            .collect();
        let ttl = self.long_duration(s.ttl, DEFAULT_IDEMPOTENCY_TTL, MAX_IDEMPOTENCY_TTL);
        let lease = self.long_duration(s.lease, times.longest + LEASE_MARGIN, MAX_DURATION);
        let max_response_body = match s.max_response_body {
            None => DEFAULT_MAX_RESPONSE_BODY,
            Some(text) => match units::parse_size(text.get_ref()) {
                Ok(n) if n <= MAX_RESPONSE_BODY_LIMIT => n,
                Ok(_) => {
                    self.sink
                        .at(text.span(), "max_response_body is too large: at most 64MiB");
                    DEFAULT_MAX_RESPONSE_BODY
                }
                Err(e) => {
                    self.sink.at(text.span(), e);
                    DEFAULT_MAX_RESPONSE_BODY
                }
            },
        };
        let store = self.idempotency_store(span, s.store, s.max_entries, s.path, s.redis_url);
        IdempotencyConfig {
            header,
            methods,
            required: s.required.unwrap_or(false),
            scope,
            ttl,
            lease,
            forward_header: s.forward_header.unwrap_or(true),
            concurrent: match s.concurrent {
                None | Some(ConcurrentKind::Reject) => Concurrent::Reject,
                Some(ConcurrentKind::Wait) => Concurrent::Wait,
            },
            on_indeterminate: match s.on_indeterminate {
                None | Some(OnIndeterminateKind::Reject) => OnIndeterminate::Reject,
                Some(OnIndeterminateKind::Forward) => OnIndeterminate::Forward,
            },
            max_response_body,
            store,
            store_timeout: self.duration(s.store_timeout, DEFAULT_STORE_TIMEOUT),
            on_store_error: match s.on_store_error {
                None | Some(OnStoreErrorKind::Reject) => OnStoreError::Reject,
                Some(OnStoreErrorKind::Pass) => OnStoreError::Pass,
            },
        }
    }

    /// The store, with the one setting its kind needs; settings of another kind are errors.
    fn idempotency_store(
        &mut self,
        section: Range<usize>,
        kind: Option<Spanned<IdempotencyStoreKind>>,
        max_entries: Option<Spanned<i64>>,
        path: Option<Spanned<String>>,
        redis_url: Option<Spanned<String>>,
    ) -> IdempotencyStore {
        let kind_span = kind.as_ref().map_or(section, |k| k.span());
        let kind = kind.map_or(IdempotencyStoreKind::Memory, Spanned::into_inner);
        let misplaced: [(&str, Option<Range<usize>>, IdempotencyStoreKind); 3] = [
            (
                "max_entries",
                max_entries.as_ref().map(|m| m.span()),
                IdempotencyStoreKind::Memory,
            ),
            (
                "path",
                path.as_ref().map(|p| p.span()),
                IdempotencyStoreKind::File,
            ),
            (
                "redis_url",
                redis_url.as_ref().map(|u| u.span()),
                IdempotencyStoreKind::Redis,
            ),
        ];
        for (name, span, wanted) in misplaced {
            if let (Some(span), true) = (span, kind != wanted) {
                let store = format!("{wanted:?}").to_lowercase();
                self.sink
                    .at(span, format!("{name} is for store = \"{store}\""));
            }
        }
        match kind {
            IdempotencyStoreKind::Memory => IdempotencyStore::Memory {
                max_entries: max_entries
                    .and_then(|n| self.count("max_entries", n, 1, 100_000_000))
                    .unwrap_or(DEFAULT_MAX_ENTRIES),
            },
            IdempotencyStoreKind::File => {
                let Some(text) = path else {
                    self.sink
                        .at(kind_span, "store = \"file\" needs path = \"FILE\"");
                    return IdempotencyStore::Memory {
                        max_entries: DEFAULT_MAX_ENTRIES,
                    };
                };
                let path = self.path(text.get_ref());
                let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
                if dir.is_some_and(|d| !d.is_dir()) {
                    self.sink.at(
                        text.span(),
                        format!("the directory of {} does not exist", path.display()),
                    );
                }
                IdempotencyStore::File { path }
            }
            IdempotencyStoreKind::Redis => {
                let Some(url) = redis_url else {
                    self.sink.at(
                        kind_span,
                        "store = \"redis\" needs redis_url = \"redis://HOST:PORT\"",
                    );
                    return IdempotencyStore::Memory {
                        max_entries: DEFAULT_MAX_ENTRIES,
                    };
                };
                if !url.get_ref().starts_with("redis://") {
                    self.sink.at(
                        url.span(),
                        "redis_url must start with redis:// (redis://[:PASSWORD@]HOST:PORT[/DB])",
                    );
                } else if let Err(e) = redis::Client::open(url.get_ref().as_str()) {
                    self.sink
                        .at(url.span(), format!("redis_url is not valid: {e}"));
                }
                IdempotencyStore::Redis {
                    url: url.into_inner(),
                }
            }
        }
    }

    /// A duration that may be longer than the hour other timeouts are held to.
    pub(super) fn long_duration(
        &mut self,
        text: Option<Spanned<String>>,
        default: Duration,
        max: Duration,
    ) -> Duration {
        let Some(text) = text else {
            return default;
        };
        match units::parse_duration(text.get_ref()) {
            Ok(d) if d.is_zero() => {
                self.sink
                    .at(text.span(), "duration must be greater than zero");
                default
            }
            Ok(d) if d > max => {
                self.sink.at(
                    text.span(),
                    format!("duration {:?} is too long: at most {max:?}", text.get_ref()),
                );
                default
            }
            Ok(d) => d,
            Err(message) => {
                self.sink.at(text.span(), message);
                default
            }
        }
    }
}
