//! Where idempotency entries live: this process's memory, an embedded database file, or Redis.
//!
//! Every store gives the same three operations and the same guarantee: [`Store::claim`] is atomic
//! (of any number of concurrent claimers of an entry, on one process or many, exactly one wins),
//! and [`Store::finish`] changes an entry only for the request whose token claimed it. A claim's
//! lease is how long its holder is trusted to be alive: an in-flight entry whose lease ran out
//! reads as indeterminate, and is never handed to a new claimer unless the route says so
//! (`on_indeterminate = "forward"`).

mod file;
mod memory;
mod redis;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use metrics::{Gauge, Histogram};

use super::{Digest, Record, Token};
use crate::config::IdempotencyStore;

pub use file::FileStore;
pub use memory::MemoryStore;
pub use redis::RedisStore;

/// A store operation under way.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// A store operation that failed; the request cannot be protected.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("{0}")]
    Unavailable(String),
    #[error("no answer within {0:?}")]
    TimedOut(Duration),
    /// Every entry of a full memory store is in flight: none can make room.
    #[error("the store is full of requests in flight")]
    Full,
}

/// What a request asks of the store before it is sent.
#[derive(Debug, Clone)]
pub struct Claim {
    pub token: Token,
    pub head: Digest,
    /// How long the entry is kept, in every state.
    pub ttl: Duration,
    pub lease: Duration,
    /// Take over an indeterminate entry (or one whose lease ran out) instead of reporting it.
    pub take_over: bool,
}

/// What the store answered a claim.
#[derive(Debug, Clone)]
pub enum Claimed {
    /// The entry is this request's: send it.
    Won,
    /// Another request holds the entry and its lease runs for `lease_left` yet.
    InFlight {
        head: Digest,
        lease_left: Duration,
    },
    Done(Arc<Record>),
    /// The first request's outcome is unknown (or its holder's lease ran out).
    Indeterminate {
        head: Digest,
    },
}

/// How a claimed request ended.
#[derive(Debug, Clone)]
pub enum Ending {
    /// A backend answered: keep its response for `ttl`.
    Record { record: Arc<Record>, ttl: Duration },
    /// Its bytes may have reached a backend, and no response came.
    Indeterminate { ttl: Duration },
    /// Nothing reached a backend: the key is free again.
    Release,
}

impl Ending {
    /// The index of its operation in [`OPS`].
    fn op(&self) -> usize {
        match self {
            Ending::Record { .. } => 1,
            Ending::Indeterminate { .. } => 2,
            Ending::Release => 3,
        }
    }
}

/// An entry store.
pub trait Store: Send + Sync + std::fmt::Debug {
    /// The store's name in metrics and logs (`memory`, `file:PATH`, `redis:HOST:PORT`).
    fn label(&self) -> &str;

    /// Claims `id` for the request holding `claim.token`, or says who has it.
    fn claim<'a>(&'a self, id: &'a Digest, claim: &'a Claim) -> StoreFuture<'a, Claimed>;

    /// Ends the claim of `token` on `id`; a no-op when the entry is no longer that claim's.
    fn finish<'a>(
        &'a self,
        id: &'a Digest,
        token: &'a Token,
        ending: Ending,
    ) -> StoreFuture<'a, ()>;

    /// Entries held, where the store can tell cheaply.
    fn entries(&self) -> Option<u64>;

    /// The store's latency histograms and entry gauge, registered once.
    fn metrics(&self) -> &StoreMetrics;
}

/// A store's metric handles: recording is an atomic add, no lookup per request.
#[derive(Debug)]
pub struct StoreMetrics {
    /// Latency of claim, record, indeterminate and release, in that order.
    ops: [Histogram; 4],
    entries: Gauge,
}

const OPS: [&str; 4] = ["claim", "record", "indeterminate", "release"];

impl StoreMetrics {
    pub fn new(label: &str) -> StoreMetrics {
        StoreMetrics {
            ops: OPS.map(|op| {
                metrics::histogram!(crate::metrics::IDEMPOTENCY_STORE_DURATION, "store" => label.to_string(), "op" => op)
            }),
            entries: metrics::gauge!(crate::metrics::IDEMPOTENCY_ENTRIES, "store" => label.to_string()),
        }
    }
}

/// Opens the store `config` describes. A file that cannot be opened, or a Redis URL that does not
/// parse, gives a store whose every operation fails: requests get 503 (or pass unprotected, as the
/// route says), never a silent loss of the guarantee.
pub fn open(config: &IdempotencyStore) -> Arc<dyn Store> {
    let opened: Result<Arc<dyn Store>, String> = match config {
        IdempotencyStore::Memory { max_entries } => Ok(Arc::new(MemoryStore::new(*max_entries))),
        IdempotencyStore::File { path } => FileStore::open(path).map(|s| Arc::new(s) as _),
        IdempotencyStore::Redis { url } => RedisStore::new(url).map(|s| Arc::new(s) as _),
    };
    opened.unwrap_or_else(|reason| {
        tracing::error!(store = ?config, error = %reason, "idempotency store cannot be opened; its routes answer 503");
        Arc::new(Broken(reason, StoreMetrics::new("broken")))
    })
}

/// A store that could not be opened, and why.
#[derive(Debug)]
struct Broken(String, StoreMetrics);

impl Store for Broken {
    fn label(&self) -> &str {
        "broken"
    }

    fn metrics(&self) -> &StoreMetrics {
        &self.1
    }

    fn claim<'a>(&'a self, _: &'a Digest, _: &'a Claim) -> StoreFuture<'a, Claimed> {
        Box::pin(async { Err(StoreError::Unavailable(self.0.clone())) })
    }

    fn finish<'a>(&'a self, _: &'a Digest, _: &'a Token, _: Ending) -> StoreFuture<'a, ()> {
        Box::pin(async { Err(StoreError::Unavailable(self.0.clone())) })
    }

    fn entries(&self) -> Option<u64> {
        None
    }
}

/// [`Store::claim`] within `timeout`, its latency recorded.
pub async fn claim(
    store: &dyn Store,
    id: &Digest,
    claim: &Claim,
    timeout: Duration,
) -> Result<Claimed, StoreError> {
    timed(store, 0, timeout, store.claim(id, claim)).await
}

/// [`Store::finish`] within `timeout`, its latency recorded.
pub async fn finish(
    store: &dyn Store,
    id: &Digest,
    token: &Token,
    ending: Ending,
    timeout: Duration,
) -> Result<(), StoreError> {
    let op = ending.op();
    timed(store, op, timeout, store.finish(id, token, ending)).await
}

async fn timed<T>(
    store: &dyn Store,
    op: usize,
    timeout: Duration,
    work: StoreFuture<'_, T>,
) -> Result<T, StoreError> {
    let started = Instant::now();
    let result = tokio::time::timeout(timeout, work)
        .await
        .unwrap_or(Err(StoreError::TimedOut(timeout)));
    let metrics = store.metrics();
    metrics.ops[op].record(started.elapsed());
    if let Some(n) = store.entries() {
        metrics.entries.set(n as f64);
    }
    result
}

fn ms(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// What a claim finds in an entry that exists and has not expired, for the stores that keep the
/// lease in the entry; `None` when the claim may take the entry over.
fn judge(entry: &super::Entry, claim: &Claim, now_ms: u64) -> Option<Claimed> {
    use super::Entry;
    let verdict = match entry {
        Entry::InFlight {
            head,
            lease_until_ms,
            ..
        } if *lease_until_ms > now_ms => {
            return Some(Claimed::InFlight {
                head: *head,
                lease_left: Duration::from_millis(lease_until_ms - now_ms),
            })
        }
        Entry::InFlight { head, .. } | Entry::Indeterminate { head } => {
            Claimed::Indeterminate { head: *head }
        }
        Entry::Done(record) => return Some(Claimed::Done(Arc::clone(record))),
    };
    (!claim.take_over).then_some(verdict)
}
