//! Entries in this process's memory: fast, bounded, and gone with the process.
//!
//! Sharded so that concurrent requests on different keys rarely share a lock; each lock is held
//! for a map operation, never across an await. When a shard is full the oldest entry that is not
//! in flight makes room; if it had not expired yet, its key loses its protection early, so every
//! such eviction is counted and logged.

use crate::byte_form::unix_ms;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use super::{judge, ms, Claim, Claimed, Ending, Store, StoreError, StoreFuture, StoreMetrics};
use crate::idempotency::{Digest, Entry, Token};

const SHARDS: usize = 16;

#[derive(Debug)]
pub struct MemoryStore {
    shards: Box<[Mutex<Shard>]>,
    per_shard: usize,
    entries: AtomicU64,
    /// Unix ms of the last eviction log line, so that a flood of evictions logs once a minute.
    logged_at: AtomicU64,
    evictions: metrics::Counter,
    metrics: StoreMetrics,
}

#[derive(Debug, Default)]
struct Shard {
    map: HashMap<Digest, Slot>,
    /// Ids in the order they were claimed; an id whose slot has another generation is stale.
    order: VecDeque<(Digest, u64)>,
    generation: u64,
}

#[derive(Debug)]
struct Slot {
    entry: Kept,
    expires_ms: u64,
    generation: u64,
}

/// An entry as kept: a finished one in its byte form, which copies the response out of the
/// connection buffers it was read into (a slice of one would pin the whole buffer) and takes a
/// fraction of the room of a header map.
#[derive(Debug)]
enum Kept {
    Open(Entry),
    Done(Box<[u8]>),
}

impl Kept {
    fn entry(&self) -> Result<Entry, StoreError> {
        match self {
            Kept::Open(entry) => Ok(entry.clone()),
            Kept::Done(bytes) => {
                Entry::decode(bytes).map_err(|e| StoreError::Unavailable(e.to_string()))
            }
        }
    }
}

impl MemoryStore {
    pub fn new(max_entries: usize) -> MemoryStore {
        MemoryStore {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            per_shard: max_entries.div_ceil(SHARDS).max(1),
            entries: AtomicU64::new(0),
            logged_at: AtomicU64::new(0),
            evictions: metrics::counter!(crate::metrics::IDEMPOTENCY_EVICTIONS, "store" => "memory"),
            metrics: StoreMetrics::new("memory"),
        }
    }

    fn shard(&self, id: &Digest) -> MutexGuard<'_, Shard> {
        // Ids are SHA-256 digests: any byte spreads them evenly.
        let shard = &self.shards[id[0] as usize % SHARDS];
        shard
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn claim_now(&self, id: &Digest, claim: &Claim) -> Result<Claimed, StoreError> {
        let now = unix_ms();
        let mut shard = self.shard(id);
        if let Some(slot) = shard.map.get(id).filter(|s| s.expires_ms > now) {
            if let Some(found) = judge(&slot.entry.entry()?, claim, now) {
                return Ok(found);
            }
        }
        let entry = Entry::InFlight {
            token: claim.token,
            head: claim.head,
            lease_until_ms: now.saturating_add(ms(claim.lease)),
        };
        let replaced = shard.map.contains_key(id);
        if !replaced && shard.map.len() >= self.per_shard {
            self.make_room(&mut shard, now)?;
        }
        shard.generation += 1;
        let generation = shard.generation;
        shard.order.push_back((*id, generation));
        shard.map.insert(
            *id,
            Slot {
                entry: Kept::Open(entry),
                expires_ms: now.saturating_add(ms(claim.ttl)),
                generation,
            },
        );
        if !replaced {
            self.entries.fetch_add(1, Ordering::Relaxed);
        }
        Ok(Claimed::Won)
    }

    /// Removes the oldest entry that is not in flight.
    fn make_room(&self, shard: &mut Shard, now: u64) -> Result<(), StoreError> {
        for _ in 0..shard.order.len() {
            let Some((id, generation)) = shard.order.pop_front() else {
                break;
            };
            let Some(slot) = shard.map.get(&id).filter(|s| s.generation == generation) else {
                continue; // stale: claimed again since, or already gone
            };
            if matches!(slot.entry, Kept::Open(Entry::InFlight { .. })) && slot.expires_ms > now {
                shard.order.push_back((id, generation));
                continue;
            }
            let live = slot.expires_ms > now;
            shard.map.remove(&id);
            self.entries.fetch_sub(1, Ordering::Relaxed);
            if live {
                self.note_eviction();
            }
            return Ok(());
        }
        Err(StoreError::Full)
    }

    fn note_eviction(&self) {
        self.evictions.increment(1);
        let now = unix_ms();
        let last = self.logged_at.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= 60_000
            && self
                .logged_at
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                "the idempotency memory store is full: entries are evicted before their ttl, and \
                 retries of those requests are no longer recognized (raise max_entries, or use \
                 the file or redis store)"
            );
        }
    }

    fn finish_now(&self, id: &Digest, token: &Token, ending: Ending) {
        let now = unix_ms();
        let mut shard = self.shard(id);
        let Some(slot) = shard.map.get_mut(id) else {
            return;
        };
        let Kept::Open(Entry::InFlight {
            token: held, head, ..
        }) = &slot.entry
        else {
            return;
        };
        if held != token {
            return;
        }
        match ending {
            Ending::Record { record, ttl } => {
                slot.entry = Kept::Done(Entry::Done(record).encode().into_boxed_slice());
                slot.expires_ms = now.saturating_add(ms(ttl));
            }
            Ending::Indeterminate { ttl } => {
                slot.entry = Kept::Open(Entry::Indeterminate { head: *head });
                slot.expires_ms = now.saturating_add(ms(ttl));
            }
            Ending::Release => {
                shard.map.remove(id);
                self.entries.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }
}

impl Store for MemoryStore {
    fn label(&self) -> &str {
        "memory"
    }

    fn claim<'a>(&'a self, id: &'a Digest, claim: &'a Claim) -> StoreFuture<'a, Claimed> {
        let result = self.claim_now(id, claim);
        Box::pin(std::future::ready(result))
    }

    fn finish<'a>(
        &'a self,
        id: &'a Digest,
        token: &'a Token,
        ending: Ending,
    ) -> StoreFuture<'a, ()> {
        self.finish_now(id, token, ending);
        Box::pin(std::future::ready(Ok(())))
    }

    fn entries(&self) -> Option<u64> {
        Some(self.entries.load(Ordering::Relaxed))
    }

    fn metrics(&self) -> &StoreMetrics {
        &self.metrics
    }
}
