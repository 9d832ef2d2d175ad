//! A route's `[routes.buffer]` section: durable write buffering, validated.

use super::file::{BufferSection, BufferStoreKind, BufferWhenKind, FallbackKind, SyncKind};
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
/// Default number of RabbitMQ queues a route's keys are spread over.
pub const DEFAULT_PARTITIONS: u16 = 4;
/// Default messages a RabbitMQ consumer holds unacknowledged, per partition.
pub const DEFAULT_PREFETCH: u16 = 256;
/// Default longest wait for the broker's confirm of a published write.
pub const DEFAULT_PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);

/// Where a buffer keeps its writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BufferStore {
    /// The embedded log, `buffer.redb` in `dir`: routes naming one directory share it.
    Log { dir: PathBuf },
    /// Quorum queues on RabbitMQ, shared by every replica pointing at the same broker and name.
    RabbitMq(RabbitSettings),
}

/// `store = "rabbitmq"`: the broker, the queues, and where receipts are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RabbitSettings {
    pub amqp_url: String,
    /// Name of the exchange, and prefix of the queues (`NAME.0`, `NAME.1`, ..., `NAME.dead`).
    pub name: String,
    pub partitions: u16,
    pub prefetch: u16,
    pub publish_timeout: Duration,
    /// Redis, where every replica reads and writes receipts.
    pub receipts_url: String,
    /// Most bytes of writes waiting, over all partitions (the broker refuses more).
    pub max_bytes: u64,
    /// How long a receipt of a write not yet final is kept: `max_age` + `receipt_ttl`.
    pub pending_ttl: Duration,
    /// `fallback = "local"`: the directory of the log that keeps writes while the broker
    /// cannot be reached, forwarded to it when it can.
    pub fallback_dir: Option<PathBuf>,
}

impl BufferStore {
    /// What identifies one store: routes with the same one share it, and a reload keeps it open.
    pub fn id(&self) -> String {
        match self {
            BufferStore::Log { dir } => dir.display().to_string(),
            BufferStore::RabbitMq(r) => format!("{} {}", r.amqp_url, r.name),
        }
    }
}

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
    pub store: BufferStore,
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
    pub(super) fn buffer(&mut self, route: &str, section: Spanned<BufferSection>) -> BufferConfig {
        let span = section.span();
        let s = section.into_inner();
        let max_bytes = match s.max_bytes.clone() {
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
        let min_free = match s.min_free.clone() {
            None => DEFAULT_BUFFER_MIN_FREE,
            Some(text) => units::parse_size(text.get_ref()).unwrap_or_else(|e| {
                self.sink.at(text.span(), e);
                DEFAULT_BUFFER_MIN_FREE
            }),
        };
        let receipt_body_limit = match s.receipt_body_limit.clone() {
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
        let max_age = self.long_duration(s.max_age.clone(), DEFAULT_BUFFER_MAX_AGE, long);
        let receipt_ttl = self.long_duration(s.receipt_ttl.clone(), DEFAULT_RECEIPT_TTL, long);
        let store = self.buffer_store(route, span, &s, max_bytes, max_age + receipt_ttl);
        BufferConfig {
            when: match s.when {
                None | Some(BufferWhenKind::Always) => BufferWhen::Always,
                Some(BufferWhenKind::Prefer) => BufferWhen::Prefer,
                Some(BufferWhenKind::Overflow) => BufferWhen::Overflow,
            },
            store,
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
            max_age,
            concurrency: s
                .concurrency
                .and_then(|n| self.count("concurrency", n, 1, 10_000))
                .unwrap_or(DEFAULT_DELIVERY_CONCURRENCY),
            receipt_ttl,
            receipt_body_limit,
        }
    }
}

impl Validator<'_, '_> {
    /// The store the section names, with the settings of its kind; settings of the other kind
    /// are errors.
    fn buffer_store(
        &mut self,
        route: &str,
        section: Range<usize>,
        s: &BufferSection,
        max_bytes: u64,
        pending_ttl: Duration,
    ) -> BufferStore {
        let kind_span = s.store.as_ref().map_or(section, |k| k.span());
        let rabbit = s
            .store
            .as_ref()
            .is_some_and(|k| *k.get_ref() == BufferStoreKind::Rabbitmq);
        let log_only = [
            ("dir", s.dir.as_ref().map(|v| v.span())),
            ("min_free", s.min_free.as_ref().map(|v| v.span())),
        ];
        let rabbit_only = [
            ("amqp_url", s.amqp_url.as_ref().map(|v| v.span())),
            ("queue", s.queue.as_ref().map(|v| v.span())),
            ("partitions", s.partitions.as_ref().map(|v| v.span())),
            ("prefetch", s.prefetch.as_ref().map(|v| v.span())),
            (
                "publish_timeout",
                s.publish_timeout.as_ref().map(|v| v.span()),
            ),
            ("receipts_url", s.receipts_url.as_ref().map(|v| v.span())),
            ("fallback", s.fallback.as_ref().map(|v| v.span())),
            ("fallback_dir", s.fallback_dir.as_ref().map(|v| v.span())),
        ];
        let (misplaced, other): (&[Setting], &str) = if rabbit {
            (&log_only, "log")
        } else {
            (&rabbit_only, "rabbitmq")
        };
        for (name, span) in misplaced {
            if let Some(span) = span {
                let message = format!("{name} is for store = \"{other}\"");
                self.sink.at(span.clone(), message);
            }
        }
        if !rabbit {
            let dir = match &s.dir {
                Some(text) => {
                    let dir = self.path(text.get_ref());
                    if !dir.is_dir() {
                        self.sink.at(
                            text.span(),
                            format!("the buffer directory {} does not exist", dir.display()),
                        );
                    }
                    dir
                }
                None => {
                    self.sink.at(
                        kind_span.clone(),
                        "a buffer needs dir = \"DIRECTORY\" for its log",
                    );
                    PathBuf::new()
                }
            };
            return BufferStore::Log { dir };
        }
        let amqp_url = match &s.amqp_url {
            Some(url)
                if url.get_ref().starts_with("amqp://")
                    || url.get_ref().starts_with("amqps://") =>
            {
                url.get_ref().clone()
            }
            Some(url) => {
                self.sink.at(
                    url.span(),
                    "amqp_url must start with amqp:// or amqps:// (amqp://USER:PASSWORD@HOST:PORT/VHOST)",
                );
                String::new()
            }
            None => {
                self.sink.at(
                    kind_span.clone(),
                    "store = \"rabbitmq\" needs amqp_url = \"amqp://USER:PASSWORD@HOST:PORT/VHOST\"",
                );
                String::new()
            }
        };
        let receipts_url = match &s.receipts_url {
            Some(url) => {
                if let Err(e) = redis::Client::open(url.get_ref().as_str()) {
                    self.sink.at(
                        url.span(),
                        format!("receipts_url is not a valid Redis URL: {e}"),
                    );
                }
                url.get_ref().clone()
            }
            None => {
                self.sink.at(
                    kind_span.clone(),
                    "store = \"rabbitmq\" needs receipts_url = \"redis://HOST:PORT\" (every replica reads receipts there)",
                );
                String::new()
            }
        };
        let name = match &s.queue {
            Some(name) if valid_queue_name(name.get_ref()) => name.get_ref().clone(),
            Some(name) => {
                self.sink.at(
                    name.span(),
                    "queue must be 1 to 200 characters of letters, digits, '.', '-' and '_'",
                );
                String::new()
            }
            None => format!("writegate.{route}"),
        };
        let partitions = s
            .partitions
            .clone()
            .and_then(|n| self.count("partitions", n, 1, 256))
            .map_or(DEFAULT_PARTITIONS, |n| n as u16);
        let prefetch = s
            .prefetch
            .clone()
            .and_then(|n| self.count("prefetch", n, 1, 65_535))
            .map_or(DEFAULT_PREFETCH, |n| n as u16);
        let publish_timeout = self.duration(s.publish_timeout.clone(), DEFAULT_PUBLISH_TIMEOUT);
        let fallback_dir = self.fallback_dir(s, kind_span);
        BufferStore::RabbitMq(RabbitSettings {
            amqp_url,
            name,
            partitions,
            prefetch,
            publish_timeout,
            receipts_url,
            max_bytes,
            pending_ttl,
            fallback_dir,
        })
    }

    /// The fallback log's directory when `fallback = "local"` (which needs `fallback_dir`).
    fn fallback_dir(&mut self, s: &BufferSection, section: Range<usize>) -> Option<PathBuf> {
        let local = s
            .fallback
            .as_ref()
            .is_some_and(|f| *f.get_ref() == FallbackKind::Local);
        match (&s.fallback_dir, local) {
            (None, false) => None,
            (Some(text), false) => {
                self.sink
                    .at(text.span(), "fallback_dir is for fallback = \"local\"");
                None
            }
            (None, true) => {
                let span = s.fallback.as_ref().map_or(section, |f| f.span());
                self.sink.at(
                    span,
                    "fallback = \"local\" needs fallback_dir = \"DIRECTORY\"",
                );
                None
            }
            (Some(text), true) => {
                let dir = self.path(text.get_ref());
                if !dir.is_dir() {
                    let message =
                        format!("the fallback directory {} does not exist", dir.display());
                    self.sink.at(text.span(), message);
                }
                Some(dir)
            }
        }
    }
}

/// A setting's name and where it is, if the section has it.
type Setting<'a> = (&'a str, Option<Range<usize>>);

fn valid_queue_name(name: &str) -> bool {
    (1..=200).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}
