//! Per-key write coalescing: the key lock, deduplication, last-write-wins and ordered reads.
//!
//! Each coalescing route owns a [`Coalescer`]: per request key, a FIFO of pending entries and a
//! busy state (idle, one write in flight, or a group of reads running). State lives in 64 shards,
//! each a mutex around a map, so unrelated keys never contend on one lock, and a key's entry is
//! removed as soon as it has nothing pending or in flight.
//!
//! Modes (see README for the user-facing contract):
//! - `serialize`: one write per key in flight; later writes wait in arrival order.
//! - `dedupe`: as `serialize`, and a write identical (method, path and query, `Content-Type`,
//!   body bytes) to the newest *pending* write of its key joins it: one upstream request, every
//!   joined client gets a copy of the response. A write already sent is never joined.
//! - `latest`: when the key becomes free, of the run of consecutive pending writes at the head of
//!   its queue only the newest is sent; the older ones are answered with its response, since their
//!   effect would have been overwritten. A run never crosses a pending read, so reads still see
//!   exactly the writes that arrived before them.
//! - `order_reads`: reads take a shared lock: they run together, after earlier writes and before
//!   later ones. A read holds it until its response head arrives.
//!
//! Safety rules, each enforced here: a write that has been handed to its upstream task runs to
//! completion (or its response timeout) even if every client leaves, and the key's next entry
//! waits for it; a pending write whose every client has gone (disconnect or `max_wait`) is removed
//! before it is sent, under the shard lock, so a client told "503" can rely on its write not
//! having been sent; a failed exchange is what every merged client receives.

use std::collections::hash_map::Entry as MapEntry;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::hash::{BuildHasher, Hasher, RandomState};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderMap, HeaderValue};
use http::{Method, StatusCode, Uri};
use metrics::{Counter, Gauge};
use tokio::sync::oneshot;

use crate::config::{CoalesceConfig, CoalesceMode};
use crate::wire::PendingHeaders;

const SHARDS: usize = 64;

mod keys;
mod queue;
mod reply;
#[cfg(test)]
mod tests;

use keys::{KeyHashing, KeyMap};
use queue::{Busy, Entry, KeyQueue, Start, Waiter};
use reply::{internal_error, Reply};
pub use reply::{Disposition, Fingerprint, Job, Origin, Refusal, SharedResponse};

/// The per-key queues of one route. Survives reloads (the snapshot carries it over by route name),
/// so queued writes keep their order.
pub struct Coalescer {
    route: Box<str>,
    shards: Box<[Mutex<KeyMap>]>,
    hashing: KeyHashing,
    active_keys: AtomicUsize,
    keys_gauge: Gauge,
    outcomes: [Counter; 3],
    /// The same outcomes as plain counts, readable for `/status`.
    outcome_counts: [AtomicU64; 3],
    dropped: Counter,
}

impl std::fmt::Debug for Coalescer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coalescer")
            .field("route", &self.route)
            .field("active_keys", &self.active_keys())
            .finish()
    }
}

impl Coalescer {
    pub fn new(route: &str) -> Arc<Coalescer> {
        let hashing = KeyHashing::random();
        let outcome = |label: &'static str| metrics::counter!(crate::metrics::COALESCE_OUTCOMES, "route" => route.to_string(), "outcome" => label);
        Arc::new(Coalescer {
            route: route.into(),
            shards: (0..SHARDS)
                .map(|_| Mutex::new(HashMap::with_hasher(hashing)))
                .collect(),
            hashing,
            active_keys: AtomicUsize::new(0),
            keys_gauge: metrics::gauge!(crate::metrics::COALESCE_KEYS_ACTIVE, "route" => route.to_string()),
            outcomes: [
                outcome("sent"),
                outcome("deduplicated"),
                outcome("superseded"),
            ],
            dropped: outcome("dropped"),
            outcome_counts: Default::default(),
        })
    }

    fn count(&self, disposition: Disposition) {
        self.outcomes[disposition as usize].increment(1);
        self.outcome_counts[disposition as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Client writes so far: sent, deduplicated (merged into an identical one) and superseded.
    pub fn outcome_counts(&self) -> [u64; 3] {
        self.outcome_counts
            .each_ref()
            .map(|count| count.load(Ordering::Relaxed))
    }

    /// Keys with anything pending or in flight.
    pub fn active_keys(&self) -> usize {
        self.active_keys.load(Ordering::Relaxed)
    }

    /// Clients waiting on `key` (not counting what is in flight).
    pub fn waiting(&self, key: &[u8]) -> usize {
        self.shard(key).get(key).map_or(0, |q| q.waiting)
    }

    fn shard(&self, key: &[u8]) -> MutexGuard<'_, KeyMap> {
        let index = self.hashing.shard(key);
        self.shards[index].lock().unwrap_or_else(|e| e.into_inner())
    }

    fn queue<'m>(&self, map: &'m mut KeyMap, key: &Bytes) -> &'m mut KeyQueue {
        map.entry(key.clone()).or_insert_with(|| {
            self.active_keys.fetch_add(1, Ordering::Relaxed);
            self.keys_gauge.increment(1.0);
            KeyQueue::new()
        })
    }

    /// Runs `f` on `key`'s queue, if it has one, then removes the key's state if that left it with
    /// nothing: one map lookup for both.
    fn with_queue<T>(&self, key: &Bytes, f: impl FnOnce(&mut KeyQueue) -> T) -> Option<T> {
        let mut map = self.shard(key);
        let MapEntry::Occupied(mut entry) = map.entry(key.clone()) else {
            return None;
        };
        let result = f(entry.get_mut());
        if entry.get().is_done() {
            entry.remove();
            self.active_keys.fetch_sub(1, Ordering::Relaxed);
            self.keys_gauge.decrement(1.0);
        }
        Some(result)
    }

    /// Queues a write and waits for its response (or the response it was merged into).
    /// (Not an `async fn`, which would keep a second copy of the job and fingerprint.)
    #[allow(clippy::manual_async_fn)]
    pub fn write<'a>(
        self: &'a Arc<Self>,
        key: Bytes,
        fingerprint: Option<Box<Fingerprint>>,
        job: Job,
        settings: &'a CoalesceConfig,
    ) -> impl Future<Output = Result<Reply, Refusal>> + Send + 'a {
        async move {
            let mode = settings.mode;
            // Decide under the shard lock; every await happens after it is released.
            let plan = {
                let mut map = self.shard(&key);
                let queue = self.queue(&mut map, &key);
                if queue.is_done() {
                    // Nothing waits or runs on this key: send now, from the client's own task.
                    queue.busy = Busy::Writing;
                    WritePlan::Now(job)
                } else if queue.waiting >= settings.max_pending_per_key {
                    WritePlan::Refused(Refusal::QueueFull {
                        retry_after: queue.retry_after(),
                    })
                } else {
                    let id = queue.next_id;
                    queue.next_id += 1;
                    queue.waiting += 1;
                    let (tx, rx) = oneshot::channel();
                    let joins_newest = mode == CoalesceMode::Dedupe
                        && matches!(queue.queue.back(), Some(Entry::Write { fingerprint: Some(newest), .. }) if Some(newest) == fingerprint.as_ref());
                    match queue.queue.back_mut() {
                        Some(Entry::Write { waiters, .. }) if joins_newest => {
                            waiters.push(Waiter {
                                id,
                                tx,
                                disposition: Disposition::Deduplicated,
                            });
                            WritePlan::Wait {
                                id,
                                rx,
                                start: None,
                            }
                        }
                        _ => {
                            queue.queue.push_back(Entry::Write {
                                fingerprint,
                                job,
                                waiters: vec![Waiter {
                                    id,
                                    tx,
                                    disposition: Disposition::Sent,
                                }],
                            });
                            let start = self.dispatch(queue, mode, &key);
                            WritePlan::Wait { id, rx, start }
                        }
                    }
                }
            };
            match plan {
                WritePlan::Now(job) => Ok(self.write_now(key, job, mode).await),
                WritePlan::Refused(refusal) => Err(refusal),
                WritePlan::Wait { id, rx, start } => {
                    self.run(key.clone(), start, mode);
                    // Boxed: a queued write's wait is three times the size of a free key's
                    // exchange, and most writes find their key free.
                    Box::pin(self.wait(key, id, rx, settings.max_wait)).await
                }
            }
        }
    }

    /// Sends a write on a free key from the caller's task (no queue, channel or spawned task). If
    /// the caller is dropped mid-exchange, [`InlineWrite`] finishes the exchange on a task of its own.
    async fn write_now(self: &Arc<Self>, key: Bytes, job: Job, mode: CoalesceMode) -> Reply {
        let mut inline = InlineWrite {
            coalescer: Arc::clone(self),
            key,
            mode,
            began: Instant::now(),
            exchange: Some(job),
        };
        let response = match inline.exchange.as_mut() {
            Some(exchange) => exchange.await,
            None => internal_error(),
        };
        inline.exchange = None;
        self.count(Disposition::Sent);
        let next = self.finish_write(&inline.key, mode, inline.began.elapsed());
        self.run(inline.key.clone(), next, mode);
        (response, Disposition::Sent)
    }

    /// Waits for a queued write's reply; withdraws it on timeout or when the client goes away.
    async fn wait(
        self: &Arc<Self>,
        key: Bytes,
        id: u64,
        rx: oneshot::Receiver<Reply>,
        max_wait: Duration,
    ) -> Result<Reply, Refusal> {
        let reply = self.await_turn(key, id, rx, max_wait).await?;
        // The upstream task answers every waiter before it lets go; a closed channel would be a bug.
        Ok(reply.unwrap_or_else(|_| (internal_error(), Disposition::Sent)))
    }

    /// Waits for a queued entry's turn. At `max_wait` the entry is withdrawn if it has not
    /// started (a refusal); if it has, the wait goes on, since it will be carried out. A client
    /// that goes away mid-wait is withdrawn the same way.
    async fn await_turn<T>(
        self: &Arc<Self>,
        key: Bytes,
        id: u64,
        mut rx: oneshot::Receiver<T>,
        max_wait: Duration,
    ) -> Result<Result<T, oneshot::error::RecvError>, Refusal> {
        let mut withdraw = Withdraw {
            coalescer: Arc::clone(self),
            key,
            id,
            armed: true,
        };
        let outcome = match tokio::time::timeout(max_wait, &mut rx).await {
            Ok(outcome) => outcome,
            Err(_) => match self.withdraw(&withdraw.key, id) {
                Withdrawn::Removed(retry_after) => {
                    withdraw.armed = false;
                    return Err(Refusal::WaitTimeout { retry_after });
                }
                Withdrawn::AlreadyStarted => rx.await,
            },
        };
        withdraw.armed = false;
        Ok(outcome)
    }

    /// Takes a read lock on `key` (order_reads), waiting behind earlier writes.
    pub async fn read(
        self: &Arc<Self>,
        key: Bytes,
        settings: &CoalesceConfig,
    ) -> Result<ReadPermit, Refusal> {
        let (id, rx) = {
            let mut map = self.shard(&key);
            let queue = self.queue(&mut map, &key);
            match queue.busy {
                Busy::Idle if queue.queue.is_empty() => {
                    queue.busy = Busy::Reading(1);
                    return Ok(self.permit(key, settings.mode));
                }
                Busy::Reading(n) if queue.queue.is_empty() => {
                    queue.busy = Busy::Reading(n + 1);
                    return Ok(self.permit(key, settings.mode));
                }
                _ => {}
            }
            if queue.waiting >= settings.max_pending_per_key {
                return Err(Refusal::QueueFull {
                    retry_after: queue.retry_after(),
                });
            }
            let id = queue.next_id;
            queue.next_id += 1;
            let (go, rx) = oneshot::channel();
            queue.waiting += 1;
            queue.queue.push_back(Entry::Read { id, go });
            (id, rx)
        };
        self.await_turn(key, id, rx, settings.max_wait)
            .await?
            .map_err(|_| Refusal::WaitTimeout {
                retry_after: Duration::from_secs(1),
            })
    }

    fn permit(self: &Arc<Self>, key: Bytes, mode: CoalesceMode) -> ReadPermit {
        ReadPermit {
            coalescer: Some(Arc::clone(self)),
            key,
            mode,
        }
    }

    /// Decides what the key does next; called with the shard locked. Reads are started here (their
    /// clients are signalled); a write is returned for [`Coalescer::run`] to carry out unlocked.
    fn dispatch(
        self: &Arc<Self>,
        queue: &mut KeyQueue,
        mode: CoalesceMode,
        key: &Bytes,
    ) -> Option<Start> {
        loop {
            match (queue.busy, queue.queue.front()) {
                (Busy::Writing, _) | (_, None) => return None,
                (Busy::Idle | Busy::Reading(_), Some(Entry::Read { .. })) => {
                    let Some(Entry::Read { go, .. }) = queue.queue.pop_front() else {
                        return None;
                    };
                    queue.waiting -= 1;
                    let readers = match queue.busy {
                        Busy::Reading(n) => n,
                        _ => 0,
                    };
                    let started = match go.send(self.permit(key.clone(), mode)) {
                        Ok(()) => true,
                        // The reader has gone: disarm its permit (we hold the shard lock that
                        // releasing would take) and do not count it.
                        Err(mut unused) => {
                            unused.coalescer = None;
                            false
                        }
                    };
                    queue.busy = Busy::Reading(readers + usize::from(started));
                    if queue.busy == Busy::Reading(0) {
                        queue.busy = Busy::Idle;
                    }
                }
                (Busy::Reading(_), Some(Entry::Write { .. })) => return None,
                (Busy::Idle, Some(Entry::Write { .. })) => {
                    queue.busy = Busy::Writing;
                    return Some(self.take_writes(queue, mode));
                }
            }
        }
    }

    /// Pops the write to send (with, in `latest` mode, the run of writes it supersedes).
    fn take_writes(&self, queue: &mut KeyQueue, mode: CoalesceMode) -> Start {
        let mut superseded = Vec::new();
        loop {
            let Some(Entry::Write {
                job, mut waiters, ..
            }) = queue.queue.pop_front()
            else {
                unreachable!("take_writes is called with a write at the front");
            };
            queue.waiting -= waiters.len();
            let newer_write_follows = matches!(queue.queue.front(), Some(Entry::Write { .. }));
            if mode == CoalesceMode::Latest && newer_write_follows {
                for w in &mut waiters {
                    w.disposition = Disposition::Superseded;
                }
                superseded.append(&mut waiters);
                continue;
            }
            waiters.append(&mut superseded);
            return Start { job, waiters };
        }
    }

    /// Carries out started work on its own task, then dispatches the key's next entry, until the
    /// key has nothing more to send.
    fn run(self: &Arc<Self>, key: Bytes, start: Option<Start>, mode: CoalesceMode) {
        let Some(mut start) = start else { return };
        let this = Arc::clone(self);
        // A spawned task, not the client's future: a sent write must finish even if clients leave.
        tokio::spawn(async move {
            loop {
                let Start { job, waiters } = start;
                let began = Instant::now();
                // Should the job ever panic, the guard frees the key so later writes are not stuck.
                let mut guard = KeyWriting {
                    coalescer: &this,
                    key: &key,
                    mode,
                    done: false,
                };
                let response = job.await;
                guard.done = true;
                this.answer(waiters, response);
                match this.finish_write(&key, mode, began.elapsed()) {
                    Some(next) => start = next,
                    None => return,
                }
            }
        });
    }

    /// Gives every waiter of a write its response (the last one without a copy).
    fn answer(&self, waiters: Vec<Waiter>, response: SharedResponse) {
        let last = waiters.len().saturating_sub(1);
        let mut response = Some(response);
        for (i, w) in waiters.into_iter().enumerate() {
            let reply = if i == last {
                response.take()
            } else {
                response.clone()
            };
            if let Some(reply) = reply {
                self.count(w.disposition);
                let _ = w.tx.send((reply, w.disposition));
            }
        }
    }

    /// Marks the key's write as done and decides what it does next.
    fn finish_write(
        self: &Arc<Self>,
        key: &Bytes,
        mode: CoalesceMode,
        took: Duration,
    ) -> Option<Start> {
        self.with_queue(key, |queue| {
            queue.busy = Busy::Idle;
            queue.last_service = took;
            self.dispatch(queue, mode, key)
        })
        .flatten()
    }

    /// Removes a waiting client (timed out or gone) if its entry has not started.
    fn withdraw(&self, key: &Bytes, id: u64) -> Withdrawn {
        self.with_queue(key, |queue| self.withdraw_from(queue, id))
            .unwrap_or(Withdrawn::AlreadyStarted)
    }

    fn withdraw_from(&self, queue: &mut KeyQueue, id: u64) -> Withdrawn {
        let mut found = false;
        let mut emptied = None;
        for (index, entry) in queue.queue.iter_mut().enumerate() {
            match entry {
                Entry::Write { waiters, .. } => {
                    if let Some(pos) = waiters.iter().position(|w| w.id == id) {
                        waiters.remove(pos);
                        found = true;
                        if waiters.is_empty() {
                            emptied = Some(index);
                        }
                        break;
                    }
                }
                Entry::Read { id: read_id, .. } if *read_id == id => {
                    found = true;
                    emptied = Some(index);
                    break;
                }
                Entry::Read { .. } => {}
            }
        }
        if !found {
            return Withdrawn::AlreadyStarted;
        }
        queue.waiting -= 1;
        if let Some(index) = emptied {
            if matches!(queue.queue.remove(index), Some(Entry::Write { .. })) {
                // Every client of this write left before it was sent: it is never sent.
                self.dropped.increment(1);
            }
        }
        Withdrawn::Removed(queue.retry_after())
    }

    /// Releases one read lock (a finished or abandoned read).
    fn release_read(self: &Arc<Self>, key: &Bytes, mode: CoalesceMode) {
        let start = self
            .with_queue(key, |queue| {
                queue.busy = match queue.busy {
                    Busy::Reading(n) if n > 1 => Busy::Reading(n - 1),
                    _ => Busy::Idle,
                };
                self.dispatch(queue, mode, key)
            })
            .flatten();
        self.run(key.clone(), start, mode);
    }
}

/// A write sent from its client's task. Dropped before the exchange completed (the client went
/// away), it moves the exchange to a task of its own, which finishes it and frees the key.
struct InlineWrite {
    coalescer: Arc<Coalescer>,
    key: Bytes,
    mode: CoalesceMode,
    began: Instant,
    exchange: Option<Job>,
}

impl Drop for InlineWrite {
    fn drop(&mut self) {
        let Some(exchange) = self.exchange.take() else {
            return;
        };
        let (coalescer, key, mode, began) = (
            Arc::clone(&self.coalescer),
            self.key.clone(),
            self.mode,
            self.began,
        );
        tokio::spawn(async move {
            let mut guard = KeyWriting {
                coalescer: &coalescer,
                key: &key,
                mode,
                done: false,
            };
            exchange.await;
            guard.done = true;
            coalescer.count(Disposition::Sent);
            let next = coalescer.finish_write(&key, mode, began.elapsed());
            coalescer.run(key.clone(), next, mode);
        });
    }
}

/// Frees a key whose write task unwound before finishing (its clients get 500 from `wait`).
struct KeyWriting<'a> {
    coalescer: &'a Arc<Coalescer>,
    key: &'a Bytes,
    mode: CoalesceMode,
    done: bool,
}

impl Drop for KeyWriting<'_> {
    fn drop(&mut self) {
        if !self.done {
            let next = self
                .coalescer
                .finish_write(self.key, self.mode, Duration::ZERO);
            self.coalescer.run(self.key.clone(), next, self.mode);
        }
    }
}

/// What [`Coalescer::write`] decided under the shard lock.
enum WritePlan {
    Now(Job),
    Refused(Refusal),
    Wait {
        id: u64,
        rx: oneshot::Receiver<Reply>,
        start: Option<Start>,
    },
}

enum Withdrawn {
    Removed(Duration),
    AlreadyStarted,
}

/// Withdraws a waiting client when its request future is dropped (the client went away).
struct Withdraw {
    coalescer: Arc<Coalescer>,
    key: Bytes,
    id: u64,
    armed: bool,
}

impl Drop for Withdraw {
    fn drop(&mut self) {
        if self.armed {
            self.coalescer.withdraw(&self.key, self.id);
        }
    }
}

/// A held read lock on a key; dropping it lets the key's next writes go.
pub struct ReadPermit {
    /// `None` once released (or for a permit that was never handed to a reader).
    coalescer: Option<Arc<Coalescer>>,
    key: Bytes,
    mode: CoalesceMode,
}

impl Drop for ReadPermit {
    fn drop(&mut self) {
        if let Some(c) = self.coalescer.take() {
            c.release_read(&self.key, self.mode);
        }
    }
}
