//! Entries in an embedded database file (redb): they survive a restart and a `kill -9`.
//!
//! A claim and a record are each one write transaction, committed durably (fsync) before the
//! request goes on: a claim so that a crash after the request was sent cannot let a retry send it
//! again, a record so that a client that saw the response gets it replayed after a crash. Only
//! this process can have the file open (redb locks it), so entries still in flight when the file
//! is opened belong to a process that died: they become indeterminate at once.
//!
//! Expired entries are removed a batch at a time by the claims that come after them (an index by
//! expiry time makes that a range scan); nothing runs in the background.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use redb::{Database, Durability, ReadableTable, ReadableTableMetadata, TableDefinition};

use super::{judge, ms, unix_ms, Claim, Claimed, Ending, Store, StoreError, StoreFuture};
use crate::idempotency::{Digest, Entry, Token};

/// Entry id → expiry (Unix ms, big-endian) followed by the entry's byte form.
const ENTRIES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("entries");
/// Expiry (Unix ms, big-endian) followed by the entry id: ordered by expiry.
const EXPIRY: TableDefinition<&[u8], ()> = TableDefinition::new("expiry");

/// Expired entries removed by one claim at most.
const SWEEP_BATCH: usize = 256;
/// Least time between two sweeps.
const SWEEP_EVERY_MS: u64 = 10_000;

#[derive(Debug)]
pub struct FileStore {
    db: Arc<Database>,
    label: String,
    entries: Arc<AtomicU64>,
    swept_at: Arc<AtomicU64>,
}

fn failed(error: impl Into<redb::Error>) -> StoreError {
    StoreError::Unavailable(error.into().to_string())
}

impl FileStore {
    pub fn open(path: &Path) -> Result<FileStore, String> {
        let db =
            Database::create(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        let entries = orphans_to_indeterminate(&db)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Ok(FileStore {
            db: Arc::new(db),
            label: format!("file:{}", path.display()),
            entries: Arc::new(AtomicU64::new(entries)),
            swept_at: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Runs `work` on the blocking pool: redb's calls block on the disk.
    fn blocking<'a, T: Send + 'static>(
        &'a self,
        work: impl FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    ) -> StoreFuture<'a, T> {
        let db = Arc::clone(&self.db);
        Box::pin(async move {
            tokio::task::spawn_blocking(move || work(&db))
                .await
                .map_err(|e| StoreError::Unavailable(e.to_string()))?
        })
    }
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

fn claim_in(
    db: &Database,
    id: &Digest,
    claim: &Claim,
    sweep: bool,
) -> Result<(Claimed, u64), StoreError> {
    let now = unix_ms();
    let mut txn = db.begin_write().map_err(failed)?;
    txn.set_durability(Durability::Immediate);
    let found = {
        let mut entries = txn.open_table(ENTRIES).map_err(failed)?;
        let mut expiry = txn.open_table(EXPIRY).map_err(failed)?;
        if sweep {
            sweep_expired(&mut entries, &mut expiry, now)?;
        }
        let stored = entries
            .get(id.as_slice())
            .map_err(failed)?
            .map(|v| v.value().to_vec());
        let current = stored.as_deref().and_then(split);
        match current
            .as_ref()
            .filter(|(expires, _)| *expires > now)
            .and_then(|(_, entry)| judge(entry, claim, now))
        {
            Some(found) => Some(found),
            None => {
                if let Some((old_expiry, _)) = current {
                    expiry
                        .remove(expiry_key(old_expiry, id).as_slice())
                        .map_err(failed)?;
                }
                let expires = now.saturating_add(ms(claim.ttl));
                let entry = Entry::InFlight {
                    token: claim.token,
                    head: claim.head,
                    lease_until_ms: now.saturating_add(ms(claim.lease)),
                };
                entries
                    .insert(id.as_slice(), joined(expires, &entry).as_slice())
                    .map_err(failed)?;
                expiry
                    .insert(expiry_key(expires, id).as_slice(), ())
                    .map_err(failed)?;
                None
            }
        }
    };
    let count = txn
        .open_table(ENTRIES)
        .map_err(failed)?
        .len()
        .map_err(failed)?;
    match found {
        // Nothing changed (unless a sweep did): no need to wait for the disk.
        Some(found) if !sweep => {
            txn.abort().map_err(failed)?;
            Ok((found, count))
        }
        Some(found) => {
            txn.commit().map_err(failed)?;
            Ok((found, count))
        }
        None => {
            txn.commit().map_err(failed)?;
            Ok((Claimed::Won, count))
        }
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

fn finish_in(db: &Database, id: &Digest, token: &Token, ending: Ending) -> Result<(), StoreError> {
    let now = unix_ms();
    let mut txn = db.begin_write().map_err(failed)?;
    let durability = match ending {
        // A lost release leaves the entry in flight: after a restart it reads as indeterminate,
        // which is safe; a lost record would not be.
        Ending::Release => Durability::Eventual,
        _ => Durability::Immediate,
    };
    txn.set_durability(durability);
    {
        let mut entries = txn.open_table(ENTRIES).map_err(failed)?;
        let mut expiry = txn.open_table(EXPIRY).map_err(failed)?;
        let stored = entries
            .get(id.as_slice())
            .map_err(failed)?
            .and_then(|v| split(v.value()));
        let Some((
            old_expiry,
            Entry::InFlight {
                token: held, head, ..
            },
        )) = stored
        else {
            return Ok(());
        };
        if held != *token {
            return Ok(());
        }
        expiry
            .remove(expiry_key(old_expiry, id).as_slice())
            .map_err(failed)?;
        let next = match ending {
            Ending::Record { record, ttl } => Some((Entry::Done(record), ttl)),
            Ending::Indeterminate { ttl } => Some((Entry::Indeterminate { head }, ttl)),
            Ending::Release => None,
        };
        match next {
            Some((entry, ttl)) => {
                let expires = now.saturating_add(ms(ttl));
                entries
                    .insert(id.as_slice(), joined(expires, &entry).as_slice())
                    .map_err(failed)?;
                expiry
                    .insert(expiry_key(expires, id).as_slice(), ())
                    .map_err(failed)?;
            }
            None => {
                entries.remove(id.as_slice()).map_err(failed)?;
            }
        }
    }
    txn.commit().map_err(failed)
}

impl Store for FileStore {
    fn label(&self) -> &str {
        &self.label
    }

    fn claim<'a>(&'a self, id: &'a Digest, claim: &'a Claim) -> StoreFuture<'a, Claimed> {
        let (id, claim) = (*id, claim.clone());
        let now = unix_ms();
        let last = self.swept_at.load(Ordering::Relaxed);
        let sweep = now.saturating_sub(last) >= SWEEP_EVERY_MS
            && self
                .swept_at
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok();
        let entries = Arc::clone(&self.entries);
        self.blocking(move |db| {
            let (found, count) = claim_in(db, &id, &claim, sweep)?;
            entries.store(count, Ordering::Relaxed);
            Ok(found)
        })
    }

    fn finish<'a>(
        &'a self,
        id: &'a Digest,
        token: &'a Token,
        ending: Ending,
    ) -> StoreFuture<'a, ()> {
        let (id, token) = (*id, *token);
        self.blocking(move |db| finish_in(db, &id, &token, ending))
    }

    fn entries(&self) -> Option<u64> {
        Some(self.entries.load(Ordering::Relaxed))
    }
}
