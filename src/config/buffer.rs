//! A route's `[routes.buffer]` section: durable write buffering, validated.

use super::file::{BufferSection, BufferWhenKind, SyncKind};
use super::idempotency::MAX_IDEMPOTENCY_TTL;
use super::*;

/// Default most bytes of writes waiting in one log.
pub const DEFAULT_BUFFER_MAX_BYTES: u64 = 1 << 30;
/// Default free space a log leaves on its filesystem.
pub const DEFAULT_BUFFER_MIN_FREE: u64 = 64 << 20;
/// Default longest a buffered write may wait for delivery before it fails.
pub const DEFAULT_BUFFER_MAX_AGE: Duration = Duration::from_secs(24 * 3600);
/// Default delivery attempts of one write.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 20;
/// Default deliveries in flight per route.
pub const DEFAULT_DELIVERY_CONCURRENCY: usize = 32;
/// Default time a receipt is kept after its write was delivered or failed.
pub const DEFAULT_RECEIPT_TTL: Duration = Duration::from_secs(24 * 3600);
/// Default most bytes of a backend's response body a receipt keeps.
pub const DEFAULT_RECEIPT_BODY_LIMIT: u64 = 4 << 10;

/// Which writes of a route are buffered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BufferWhen {
    /// Every write: answered 202 once on disk.
    Always,
    /// Writes that ask for it with `Prefer: respond-async`.
    Prefer,
    /// Writes that admission control would shed.
    Overflow,
}

/// When a write is on stable storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BufferSync {
    /// One transaction and fsync per write.
    Always,
    /// Group commit: the writes that arrive during a sync share the next one.
    Batch,
}

/// A route's validated `[routes.buffer]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BufferConfig {
    pub when: BufferWhen,
    /// The directory of the log (`buffer.redb`); routes naming one directory share its log.
    pub dir: PathBuf,
    pub max_bytes: u64,
    /// Free bytes the log's filesystem keeps: appends past them answer 503.
    pub min_free: u64,
    pub sync: BufferSync,
    /// Keyless writes are delivered in arrival order, one at a time.
    pub ordered: bool,
    pub max_attempts: u32,
    pub max_age: Duration,
    pub concurrency: usize,
    pub receipt_ttl: Duration,
    pub receipt_body_limit: usize,
}

impl Validator<'_, '_> {
    pub(super) fn buffer(&mut self, section: Spanned<BufferSection>) -> BufferConfig {
        let s = section.into_inner();
        let dir = self.path(s.dir.get_ref());
        if !dir.is_dir() {
            self.sink.at(
                s.dir.span(),
                format!("the buffer directory {} does not exist", dir.display()),
            );
        }
        let max_bytes = match s.max_bytes {
            None => DEFAULT_BUFFER_MAX_BYTES,
            Some(text) => match units::parse_size(text.get_ref()) {
                Ok(n) if n >= 1 << 20 => n,
                Ok(_) => {
                    self.sink.at(text.span(), "max_bytes must be at least 1MiB");
                    DEFAULT_BUFFER_MAX_BYTES
                }
                Err(e) => {
                    self.sink.at(text.span(), e);
                    DEFAULT_BUFFER_MAX_BYTES
                }
            },
        };
        let min_free = match s.min_free {
            None => DEFAULT_BUFFER_MIN_FREE,
            Some(text) => units::parse_size(text.get_ref()).unwrap_or_else(|e| {
                self.sink.at(text.span(), e);
                DEFAULT_BUFFER_MIN_FREE
            }),
        };
        let receipt_body_limit = match s.receipt_body_limit {
            None => DEFAULT_RECEIPT_BODY_LIMIT,
            Some(text) => match units::parse_size(text.get_ref()) {
                Ok(n) if n <= 1 << 20 => n,
                Ok(_) => {
                    self.sink
                        .at(text.span(), "receipt_body_limit is at most 1MiB");
                    DEFAULT_RECEIPT_BODY_LIMIT
                }
                Err(e) => {
                    self.sink.at(text.span(), e);
                    DEFAULT_RECEIPT_BODY_LIMIT
                }
            },
        } as usize;
        let long = MAX_IDEMPOTENCY_TTL;
        BufferConfig {
            when: match s.when {
                None | Some(BufferWhenKind::Always) => BufferWhen::Always,
                Some(BufferWhenKind::Prefer) => BufferWhen::Prefer,
                Some(BufferWhenKind::Overflow) => BufferWhen::Overflow,
            },
            dir,
            max_bytes,
            min_free,
            sync: match s.sync {
                None | Some(SyncKind::Batch) => BufferSync::Batch,
                Some(SyncKind::Always) => BufferSync::Always,
            },
            ordered: s.ordered.unwrap_or(false),
            max_attempts: s
                .max_attempts
                .and_then(|n| self.count("max_attempts", n, 1, 1000))
                .map_or(DEFAULT_MAX_ATTEMPTS, |n| n as u32),
            max_age: self.long_duration(s.max_age, DEFAULT_BUFFER_MAX_AGE, long),
            concurrency: s
                .concurrency
                .and_then(|n| self.count("concurrency", n, 1, 10_000))
                .unwrap_or(DEFAULT_DELIVERY_CONCURRENCY),
            receipt_ttl: self.long_duration(s.receipt_ttl, DEFAULT_RECEIPT_TTL, long),
            receipt_body_limit,
        }
    }
}
