//! Entries in an embedded database file (redb): they survive a restart and a `kill -9`.
//!
//! Claims and records are committed durably (fsync) before the request goes on: a claim so that a
//! crash after the request was sent cannot let a retry send it again, a record so that a client
//! that saw the response gets it replayed after a crash. One writer thread owns the database and
//! commits group-wise ([`Committer`]), so a burst shares one fsync (a transaction per operation
//! managed about 900 requests/s on this machine's disk). Only this process can have the
//! file open (redb locks it), so entries still in flight when the file is opened belong to a
//! process that died: they become indeterminate at once.
//!
//! Expired entries are removed a batch at a time by the writer, at most every 10 s (an index by
//! expiry time makes that a range scan).

use crate::byte_form::unix_ms;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use redb::{Database, Durability, ReadableTable, ReadableTableMetadata, TableDefinition};

use super::{judge, ms, Claim, Claimed, Ending, Store, StoreError, StoreFuture, StoreMetrics};
use crate::group_commit::{Answer, Committer};
use crate::idempotency::{hex, Digest, Entry, Token};

/// Entry id → expiry (Unix ms, big-endian) followed by the entry's byte form.
const ENTRIES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("entries");
/// Expiry (Unix ms, big-endian) followed by the entry id: ordered by expiry.
const EXPIRY: TableDefinition<&[u8], ()> = TableDefinition::new("expiry");

/// Expired entries removed by one sweep at most.
const SWEEP_BATCH: usize = 256;
/// Least time between two sweeps.
const SWEEP_EVERY_MS: u64 = 10_000;

#[derive(Debug)]
pub struct FileStore {
    writer: Committer<Op, Option<Claimed>>,
    label: String,
    entries: Arc<AtomicU64>,
    metrics: StoreMetrics,
}

/// An operation for the writer thread; a claim's answer is `Some`.
#[derive(Debug)]
enum Op {
    Claim {
        id: Digest,
        claim: Claim,
    },
    Finish {
        id: Digest,
        token: Token,
        ending: Ending,
    },
}

fn failed(error: impl Into<redb::Error>) -> StoreError {
    StoreError::Unavailable(error.into().to_string())
}

impl FileStore {
    pub fn open(path: &Path) -> Result<FileStore, String> {
        let db =
            Database::create(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        let count = orphans_to_indeterminate(&db)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let label = format!("file:{}", path.display());
        let entries = Arc::new(AtomicU64::new(count));
        let counted = Arc::clone(&entries);
        let mut swept_at = 0;
        let writer = Committer::start("idempotency-file", move |batch: &[Op]| {
            let now = unix_ms();
            let sweep = now.saturating_sub(swept_at) >= SWEEP_EVERY_MS;
            if sweep {
                swept_at = now;
            }
            let (answers, count) = apply(&db, batch, sweep, now).map_err(|e| e.to_string())?;
            counted.store(count, Ordering::Relaxed);
            Ok(answers)
        })
        .map_err(|e| format!("cannot start the writer of {}: {e}", path.display()))?;
        Ok(FileStore {
            writer,
            metrics: StoreMetrics::new(&label),
            label,
            entries,
        })
    }

    async fn submit(&self, op: Op) -> Result<Option<Claimed>, StoreError> {
        self.writer
            .submit(op)
            .await
            .map_err(StoreError::Unavailable)
    }
}

/// One operation's answer: a claim's is `Some`.
type Answered = Answer<Option<Claimed>>;

/// Applies a batch in one write transaction; the commit is durable unless the batch only
/// releases keys (a lost release leaves an entry in flight, which a restart reads as
/// indeterminate: safe; a lost claim or record would not be).
fn apply(
    db: &Database,
    batch: &[Op],
    sweep: bool,
    now: u64,
) -> Result<(Vec<Answered>, u64), StoreError> {
    let mut txn = db.begin_write().map_err(failed)?;
    let releases_only = batch.iter().all(|op| {
        matches!(
            op,
            Op::Finish {
                ending: Ending::Release,
                ..
            }
        )
    });
    txn.set_durability(if releases_only {
        Durability::Eventual
    } else {
        Durability::Immediate
    });
    let results = {
        let mut tables = Tables {
            entries: txn.open_table(ENTRIES).map_err(failed)?,
            expiry: txn.open_table(EXPIRY).map_err(failed)?,
        };
        if sweep {
            sweep_expired(&mut tables.entries, &mut tables.expiry, now)?;
        }
        batch
            .iter()
            .map(|op| {
                let answer = match op {
                    Op::Claim { id, claim } => tables.claim(id, claim, now).map(Some),
                    Op::Finish { id, token, ending } => {
                        tables.finish(id, token, ending, now).map(|()| None)
                    }
                };
                answer.map_err(|e| e.to_string())
            })
            .collect::<Vec<_>>()
    };
    let count = txn
        .open_table(ENTRIES)
        .map_err(failed)?
        .len()
        .map_err(failed)?;
    txn.commit().map_err(failed)?;
    Ok((results, count))
}

/// Marks the entries a dead process left in flight as indeterminate; returns the entry count.
fn orphans_to_indeterminate(db: &Database) -> Result<u64, StoreError> {
    let txn = db.begin_write().map_err(failed)?;
    {
        let mut table = txn.open_table(ENTRIES).map_err(failed)?;
        txn.open_table(EXPIRY).map_err(failed)?;
        let mut orphans = Vec::new();
        for item in table.iter().map_err(failed)? {
            let (id, value) = item.map_err(failed)?;
            if let Some((expires, Entry::InFlight { head, .. })) = split(value.value()) {
                orphans.push((id.value().to_vec(), expires, head));
            }
        }
        for (id, expires, head) in orphans {
            let value = joined(expires, &Entry::Indeterminate { head });
            table
                .insert(id.as_slice(), value.as_slice())
                .map_err(failed)?;
        }
    }
    let count = txn
        .open_table(ENTRIES)
        .map_err(failed)?
        .len()
        .map_err(failed)?;
    txn.commit().map_err(failed)?;
    Ok(count)
}

/// A stored value: its expiry and its entry; `None` when it does not decode.
fn split(value: &[u8]) -> Option<(u64, Entry)> {
    let (expires, entry) = value.split_first_chunk::<8>()?;
    Some((u64::from_be_bytes(*expires), Entry::decode(entry).ok()?))
}

fn joined(expires_ms: u64, entry: &Entry) -> Vec<u8> {
    let mut value = expires_ms.to_be_bytes().to_vec();
    value.extend_from_slice(&entry.encode());
    value
}

fn expiry_key(expires_ms: u64, id: &[u8]) -> Vec<u8> {
    let mut key = expires_ms.to_be_bytes().to_vec();
    key.extend_from_slice(id);
    key
}

/// The two tables of one write transaction.
struct Tables<'t> {
    entries: redb::Table<'t, &'static [u8], &'static [u8]>,
    expiry: redb::Table<'t, &'static [u8], ()>,
}

impl Tables<'_> {
    fn claim(&mut self, id: &Digest, claim: &Claim, now: u64) -> Result<Claimed, StoreError> {
        let current = self.current(id)?;
        let found = current
            .as_ref()
            .filter(|(expires, _)| *expires > now)
            .and_then(|(_, entry)| judge(entry, claim, now));
        if let Some(found) = found {
            return Ok(found);
        }
        let entry = Entry::InFlight {
            token: claim.token,
            head: claim.head,
            lease_until_ms: now.saturating_add(ms(claim.lease)),
        };
        let old_expiry = current.map(|(expires, _)| expires);
        self.put(id, old_expiry, &entry, now.saturating_add(ms(claim.ttl)))?;
        Ok(Claimed::Won)
    }

    fn finish(
        &mut self,
        id: &Digest,
        token: &Token,
        ending: &Ending,
        now: u64,
    ) -> Result<(), StoreError> {
        let Some((
            old_expiry,
            Entry::InFlight {
                token: held, head, ..
            },
        )) = self.current(id)?
        else {
            return Ok(());
        };
        if held != *token {
            return Ok(());
        }
        let (entry, ttl) = match ending {
            Ending::Record { record, ttl } => (Entry::Done(Arc::clone(record)), *ttl),
            Ending::Indeterminate { ttl } => (Entry::Indeterminate { head }, *ttl),
            Ending::Release => {
                self.expiry
                    .remove(expiry_key(old_expiry, id).as_slice())
                    .map_err(failed)?;
                self.entries.remove(id.as_slice()).map_err(failed)?;
                return Ok(());
            }
        };
        self.put(id, Some(old_expiry), &entry, now.saturating_add(ms(ttl)))
    }

    /// The entry stored under `id`, with its expiry. One that does not decode is an error, not
    /// an absence: treating it as free could send a write twice.
    fn current(&self, id: &Digest) -> Result<Option<(u64, Entry)>, StoreError> {
        let Some(value) = self.entries.get(id.as_slice()).map_err(failed)? else {
            return Ok(None);
        };
        split(value.value())
            .map(Some)
            .ok_or_else(|| StoreError::Unavailable(format!("the entry {} is corrupt", hex(id))))
    }

    /// Stores `entry` under `id` until `expires`, moving its expiry index entry.
    fn put(
        &mut self,
        id: &Digest,
        old_expiry: Option<u64>,
        entry: &Entry,
        expires: u64,
    ) -> Result<(), StoreError> {
        if let Some(old) = old_expiry {
            self.expiry
                .remove(expiry_key(old, id).as_slice())
                .map_err(failed)?;
        }
        self.entries
            .insert(id.as_slice(), joined(expires, entry).as_slice())
            .map_err(failed)?;
        self.expiry
            .insert(expiry_key(expires, id).as_slice(), ())
            .map_err(failed)?;
        Ok(())
    }
}

fn sweep_expired(
    entries: &mut redb::Table<&[u8], &[u8]>,
    expiry: &mut redb::Table<&[u8], ()>,
    now: u64,
) -> Result<(), StoreError> {
    let end = expiry_key(now, &[]);
    let due: Vec<Vec<u8>> = expiry
        .range(..end.as_slice())
        .map_err(failed)?
        .take(SWEEP_BATCH)
        .filter_map(|item| item.ok().map(|(key, _)| key.value().to_vec()))
        .collect();
    for key in due {
        expiry.remove(key.as_slice()).map_err(failed)?;
        let id = &key[8..];
        let still_due = entries
            .get(id)
            .map_err(failed)?
            .and_then(|v| split(v.value()))
            .is_some_and(|(expires, _)| expires <= now);
        if still_due {
            entries.remove(id).map_err(failed)?;
        }
    }
    Ok(())
}

impl Store for FileStore {
    fn label(&self) -> &str {
        &self.label
    }

    fn claim<'a>(&'a self, id: &'a Digest, claim: &'a Claim) -> StoreFuture<'a, Claimed> {
        let op = Op::Claim {
            id: *id,
            claim: claim.clone(),
        };
        Box::pin(async move {
            self.submit(op)
                .await?
                .ok_or_else(|| StoreError::Unavailable("no answer to a claim".into()))
        })
    }

    fn finish<'a>(
        &'a self,
        id: &'a Digest,
        token: &'a Token,
        ending: Ending,
    ) -> StoreFuture<'a, ()> {
        let op = Op::Finish {
            id: *id,
            token: *token,
            ending,
        };
        Box::pin(async move { self.submit(op).await.map(|_| ()) })
    }

    fn entries(&self) -> Option<u64> {
        Some(self.entries.load(Ordering::Relaxed))
    }

    fn metrics(&self) -> &StoreMetrics {
        &self.metrics
    }
}
