//! The buffer's log: an embedded database (redb) in the route's `dir`, written by one group-commit
//! thread.
//!
//! redb is copy-on-write with checksummed pages and commits: a commit torn by a crash is detected
//! when the file is opened and the database is the last complete commit, so a write that was
//! answered 202 (its commit returned) is there after a crash, and a half-written one is not. A
//! full disk fails the commit, and the client gets 503: nothing is answered 202 that is not on
//! disk. Tables: pending writes by sequence number (the delivery order), receipts by id, the
//! dead-letter list, and a counter for sequence numbers.

use crate::byte_form::unix_ms;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use redb::{Database, Durability, ReadableTable, ReadableTableMetadata, TableDefinition};

use super::deliver::Dispatcher;
use super::queue::{Queue, QueueFuture, Waiting};
use super::{BufferedWrite, Outcome, Receipt, ReceiptId};
use crate::config::BufferSync;
use crate::group_commit::{Answer, Committer};

/// Pending writes: sequence number → write.
const WRITES: TableDefinition<u64, &[u8]> = TableDefinition::new("writes");
/// Receipts: id → receipt.
const RECEIPTS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("receipts");
/// Failed writes, kept for replay by hand: sequence number → write.
const DEAD: TableDefinition<u64, &[u8]> = TableDefinition::new("dead");
/// Finished receipts by expiry: expiry (Unix ms, big-endian) and id → ().
const RECEIPT_EXPIRY: TableDefinition<&[u8], ()> = TableDefinition::new("receipt_expiry");
/// `next_seq`.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// Finished receipts removed per commit at most.
const SWEEP_BATCH: usize = 256;

/// Why a write could not be taken.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LogError {
    #[error("the buffer is full ({0} bytes)")]
    Full(u64),
    #[error("the disk of the buffer is full (min_free reached)")]
    DiskFull,
    #[error("the buffer's store failed: {0}")]
    Failed(String),
    /// The store may have kept the write, but did not say so in time (a publish whose confirm
    /// was lost): the client is refused, and the write may still be delivered.
    #[error("the buffer's store did not confirm the write: {0}")]
    Unconfirmed(String),
}

fn failed(error: impl Into<redb::Error>) -> String {
    error.into().to_string()
}

/// What the writer thread does.
#[derive(Debug)]
enum Op {
    Append(Box<BufferedWrite>),
    Attempt {
        receipt: ReceiptId,
        error: String,
    },
    Finish {
        seq: u64,
        receipt: ReceiptId,
        outcome: Outcome,
        ttl: Duration,
    },
    Replay {
        receipt: ReceiptId,
    },
}

/// The database; empty while the writer reopens it after a failed commit.
type Slot = ArcSwapOption<Database>;

/// How much a log may hold.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Bytes of pending writes.
    pub max_bytes: u64,
    /// Free bytes the log's filesystem keeps: appends stop short of them, so that a full disk
    /// refuses new writes instead of failing the commits that deliver the old ones.
    pub min_free: u64,
}

/// One log, shared by the routes that name its directory.
#[derive(Debug)]
pub struct Log {
    db: Arc<Slot>,
    writer: Committer<Op, u64>,
    label: String,
    /// Bytes of pending writes, and how many.
    bytes: Arc<AtomicU64>,
    depth: Arc<AtomicU64>,
}

impl Log {
    /// Opens (or creates) `dir/buffer.redb`; `sync` decides whether writes share commits.
    pub fn open(dir: &Path, sync: BufferSync, limits: Limits) -> Result<Log, String> {
        let path = dir.join("buffer.redb");
        let mut db =
            Database::create(&path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        if free_bytes(dir).is_some_and(|free| free < limits.min_free) {
            // Pages freed before a restart are only known to redb: give them back to the disk.
            if let Err(error) = db.compact() {
                tracing::warn!(log = %path.display(), %error, "could not compact the buffer's log on a full disk");
            }
        }
        let (bytes, depth) =
            pending_size(&db).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        if depth > 0 {
            tracing::info!(log = %path.display(), writes = depth, "resuming the delivery of buffered writes");
        }
        metrics::counter!(crate::metrics::BUFFER_RESUMED, "dir" => dir.display().to_string())
            .increment(depth);
        let (bytes, depth) = (
            Arc::new(AtomicU64::new(bytes)),
            Arc::new(AtomicU64::new(depth)),
        );
        let batch = match sync {
            BufferSync::Always => 1,
            BufferSync::Batch => usize::MAX,
        };
        let db = Arc::new(Slot::from_pointee(db));
        let (db_w, bytes_w, depth_w) = (Arc::clone(&db), Arc::clone(&bytes), Arc::clone(&depth));
        let (dir_w, path_w) = (dir.to_path_buf(), path.clone());
        let dir_label = dir.display().to_string();
        let commit_time =
            metrics::histogram!(crate::metrics::BUFFER_COMMIT, "dir" => dir_label.clone());
        let batch_size = metrics::histogram!(crate::metrics::BUFFER_BATCH, "dir" => dir_label);
        let mut peak_allocated = 0;
        let writer = Committer::start_with("buffer-log", batch, move |ops: &[Op]| {
            let started = std::time::Instant::now();
            let db = match db_w.load_full() {
                Some(db) => db,
                None => reopen(&db_w, &path_w)?,
            };
            let room = room(&db, &dir_w, limits, ops, &mut peak_allocated);
            let answers = apply(&db, ops, limits.max_bytes, room, &bytes_w, &depth_w);
            drop(db);
            commit_time.record(started.elapsed().as_secs_f64());
            batch_size.record(ops.len() as f64);
            if let Err(error) = &answers {
                tracing::error!(log = %path_w.display(), %error, "a commit of the buffer's log failed; reopening it");
                let _ = reopen(&db_w, &path_w);
            }
            answers
        })
        .map_err(|e| format!("cannot start the writer of {}: {e}", path.display()))?;
        Ok(Log {
            db,
            writer,
            label: dir.display().to_string(),
            bytes,
            depth,
        })
    }

    fn db(&self) -> Result<Arc<Database>, String> {
        let db = self.db.load_full();
        db.ok_or_else(|| "the log is being reopened after a failed commit".to_string())
    }

    /// The log's directory, as metrics and logs name it.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Writes waiting, and their bytes.
    pub fn depth(&self) -> (u64, u64) {
        (
            self.depth.load(Ordering::Relaxed),
            self.bytes.load(Ordering::Relaxed),
        )
    }

    /// Appends `write` durably; its sequence number.
    pub async fn append(&self, write: BufferedWrite) -> Result<u64, LogError> {
        self.writer
            .submit(Op::Append(Box::new(write)))
            .await
            .map_err(|e| {
                if let Some(limit) = e.strip_prefix(FULL) {
                    LogError::Full(limit.parse().unwrap_or(0))
                } else if e.starts_with(DISK) {
                    LogError::DiskFull
                } else {
                    LogError::Failed(e)
                }
            })
    }

    /// Notes a failed attempt on the receipt.
    pub async fn attempt(&self, receipt: ReceiptId, error: String) -> Result<(), String> {
        self.writer
            .submit(Op::Attempt { receipt, error })
            .await
            .map(|_| ())
    }

    /// Ends a pending write: delivered, or failed onto the dead-letter list.
    pub async fn finish(
        &self,
        seq: u64,
        receipt: ReceiptId,
        outcome: Outcome,
        ttl: Duration,
    ) -> Result<(), String> {
        let op = Op::Finish {
            seq,
            receipt,
            outcome,
            ttl,
        };
        self.writer.submit(op).await.map(|_| ())
    }

    /// Puts the dead letter of `receipt` back in the log, at its end: its new sequence number,
    /// route and key, or `None` if this log has no such dead letter.
    pub async fn replay(
        &self,
        receipt: ReceiptId,
    ) -> Result<Option<(u64, String, Option<Bytes>)>, String> {
        match self.writer.submit(Op::Replay { receipt }).await? {
            NOT_FOUND => Ok(None),
            seq => Ok(self.pending(seq)?.map(|w| (seq, w.route, w.key))),
        }
    }

    /// Unix ms at which the oldest pending write was accepted.
    pub fn oldest_ms(&self) -> Result<Option<u64>, String> {
        let txn = self.db()?.begin_read().map_err(failed)?;
        let table = txn.open_table(WRITES).map_err(failed)?;
        let Some((_, value)) = table.first().map_err(failed)? else {
            return Ok(None);
        };
        let write = BufferedWrite::decode(value.value()).map_err(|e| e.to_string())?;
        Ok(Some(write.accepted_ms))
    }

    /// The pending write at `seq`.
    pub fn pending(&self, seq: u64) -> Result<Option<BufferedWrite>, String> {
        let txn = self.db()?.begin_read().map_err(failed)?;
        let table = txn.open_table(WRITES).map_err(failed)?;
        let Some(value) = table.get(seq).map_err(failed)? else {
            return Ok(None);
        };
        BufferedWrite::decode(value.value())
            .map(Some)
            .map_err(|e| e.to_string())
    }

    /// Every pending write's sequence number, route and key, in log order (at start-up).
    pub fn scan(&self) -> Result<Vec<(u64, String, Option<Bytes>)>, String> {
        let txn = self.db()?.begin_read().map_err(failed)?;
        let table = txn.open_table(WRITES).map_err(failed)?;
        let mut out = Vec::new();
        for item in table.iter().map_err(failed)? {
            let (seq, value) = item.map_err(failed)?;
            // A write that does not decode stays where it is, and is reported.
            match BufferedWrite::decode(value.value()) {
                Ok(write) => out.push((seq.value(), write.route, write.key)),
                Err(e) => {
                    tracing::error!(log = %self.label, seq = seq.value(), error = %e, "a buffered write cannot be read; it is left in the log")
                }
            }
        }
        Ok(out)
    }

    /// A receipt, and how many writes are ahead of it while it waits.
    pub fn receipt(&self, id: &ReceiptId) -> Result<Option<(Receipt, Option<u64>)>, String> {
        let txn = self.db()?.begin_read().map_err(failed)?;
        let receipts = txn.open_table(RECEIPTS).map_err(failed)?;
        let Some(value) = receipts.get(id.as_slice()).map_err(failed)? else {
            return Ok(None);
        };
        let receipt = Receipt::decode(value.value()).map_err(|e| e.to_string())?;
        let position = match receipt.outcome {
            Outcome::Pending => {
                let writes = txn.open_table(WRITES).map_err(failed)?;
                Some(writes.range(..receipt.seq).map_err(failed)?.count() as u64)
            }
            _ => None,
        };
        Ok(Some((receipt, position)))
    }

    /// The dead-letter list: each failed write's receipt.
    pub fn dead_letters(&self, limit: usize) -> Result<Vec<(ReceiptId, Receipt)>, String> {
        let txn = self.db()?.begin_read().map_err(failed)?;
        let dead = txn.open_table(DEAD).map_err(failed)?;
        let receipts = txn.open_table(RECEIPTS).map_err(failed)?;
        let mut out = Vec::new();
        for item in dead.iter().map_err(failed)?.take(limit) {
            let (_, value) = item.map_err(failed)?;
            let Ok(write) = BufferedWrite::decode(value.value()) else {
                continue;
            };
            if let Some(r) = receipts.get(write.receipt.as_slice()).map_err(failed)? {
                if let Ok(receipt) = Receipt::decode(r.value()) {
                    out.push((write.receipt, receipt));
                }
            }
        }
        Ok(out)
    }
}

impl Queue for Log {
    fn label(&self) -> &str {
        &self.label
    }

    fn append(&self, write: BufferedWrite) -> QueueFuture<'_, Result<Option<u64>, LogError>> {
        Box::pin(async move { Log::append(self, write).await.map(Some) })
    }

    fn recovered(&self) -> Result<Vec<Waiting>, String> {
        self.scan()
    }

    fn attach(&self, _dispatcher: &Arc<Dispatcher>) {}

    fn pending(&self, seq: u64) -> QueueFuture<'_, Result<Option<BufferedWrite>, String>> {
        Box::pin(std::future::ready(Log::pending(self, seq)))
    }

    fn attempt(
        &self,
        _seq: u64,
        write: &BufferedWrite,
        error: String,
    ) -> QueueFuture<'_, Result<(), String>> {
        Box::pin(Log::attempt(self, write.receipt, error))
    }

    fn finish(
        &self,
        seq: u64,
        write: &BufferedWrite,
        outcome: Outcome,
        ttl: Duration,
    ) -> QueueFuture<'_, Result<(), String>> {
        Box::pin(Log::finish(self, seq, write.receipt, outcome, ttl))
    }

    fn receipt(&self, id: ReceiptId) -> QueueFuture<'_, Result<Option<Bytes>, String>> {
        let found = Log::receipt(self, &id)
            .map(|r| r.map(|(receipt, position)| receipt.to_json(&id, position, unix_ms())));
        Box::pin(std::future::ready(found))
    }

    fn replay(&self, id: ReceiptId) -> QueueFuture<'_, Result<Option<Waiting>, String>> {
        Box::pin(Log::replay(self, id))
    }

    fn state(&self, dead_letters: usize) -> QueueFuture<'_, serde_json::Value> {
        let (depth, bytes) = Log::depth(self);
        let now = unix_ms();
        let oldest = self.oldest_ms().ok().flatten();
        let dead: Vec<serde_json::Value> = match self.dead_letters(dead_letters) {
            Ok(list) => list
                .into_iter()
                .map(|(id, receipt)| {
                    let json = receipt.to_json(&id, None, now);
                    serde_json::from_slice(&json).unwrap_or_default()
                })
                .collect(),
            Err(error) => vec![serde_json::json!({ "error": error })],
        };
        Box::pin(std::future::ready(serde_json::json!({
            "store": "log",
            "dir": self.label,
            "depth": depth,
            "bytes": bytes,
            "oldest_age_seconds": oldest.map(|t| now.saturating_sub(t) as f64 / 1000.0),
            "dead_letters": dead,
        })))
    }

    fn depth(&self) -> u64 {
        Log::depth(self).0
    }

    fn record_gauges(&self) {
        let (depth, bytes) = Log::depth(self);
        let oldest = self.oldest_ms().ok().flatten();
        let age = oldest.map_or(0.0, |t| unix_ms().saturating_sub(t) as f64 / 1000.0);
        let dir = self.label.clone();
        metrics::gauge!(crate::metrics::BUFFER_DEPTH, "dir" => dir.clone()).set(depth as f64);
        metrics::gauge!(crate::metrics::BUFFER_BYTES, "dir" => dir.clone()).set(bytes as f64);
        metrics::gauge!(crate::metrics::BUFFER_OLDEST, "dir" => dir).set(age);
    }
}

/// The answer of a replay that found no dead letter (sequence numbers start at 1).
const NOT_FOUND: u64 = 0;

/// Waits for readers to let go of the database (at most [`REOPEN_WAIT`]) and opens it again: redb
/// refuses every transaction after a failed I/O until then. The slot stays empty (and every
/// operation fails) until a reopen succeeds.
fn reopen(slot: &Slot, path: &Path) -> Result<Arc<Database>, String> {
    let deadline = std::time::Instant::now() + REOPEN_WAIT;
    if let Some(old) = slot.swap(None) {
        while Arc::strong_count(&old) > 1 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    loop {
        match Database::create(path) {
            Ok(db) => {
                let db = Arc::new(db);
                slot.store(Some(Arc::clone(&db)));
                tracing::info!(log = %path.display(), "the buffer's log was reopened");
                return Ok(db);
            }
            // A read transaction of the old handle may still hold the file.
            Err(redb::DatabaseError::DatabaseAlreadyOpen)
                if std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(error) => return Err(format!("cannot reopen {}: {error}", path.display())),
        }
    }
}

/// Longest a reopen waits for readers of the old handle.
const REOPEN_WAIT: Duration = Duration::from_secs(5);

/// Bytes the appends of this batch may add (`None`: no appends, or the free space is unknown):
/// the filesystem's free space above `min_free`, and, when that is short, the pages redb freed
/// below the most it ever held (delivered writes free them; the file does not shrink, so the
/// filesystem does not see them). `peak` keeps that most, measured only when space is short.
fn room(db: &Database, dir: &Path, limits: Limits, ops: &[Op], peak: &mut u64) -> Option<u64> {
    let appending: u64 = ops
        .iter()
        .map(|op| match op {
            Op::Append(write) => disk_cost(write.body.len() as u64),
            _ => 0,
        })
        .sum();
    if appending == 0 {
        return None;
    }
    let free = free_bytes(dir)?.saturating_sub(limits.min_free);
    if free >= appending {
        return Some(free);
    }
    let allocated = allocated_bytes(db)?;
    *peak = (*peak).max(allocated);
    Some(free.saturating_add(*peak - allocated))
}

/// A generous estimate of the disk a record of `len` bytes takes in redb: values larger than a
/// page live in power-of-two runs of pages, and the receipt and tree pages come on top.
fn disk_cost(len: u64) -> u64 {
    len.saturating_add(1).next_power_of_two().max(4096) + 4096
}

/// Bytes of the pages redb holds. Walks the trees: only called near a full disk.
fn allocated_bytes(db: &Database) -> Option<u64> {
    let stats = db.begin_write().ok()?.stats().ok()?;
    Some(
        stats
            .allocated_pages()
            .saturating_mul(stats.page_size() as u64),
    )
}

/// Free bytes (for unprivileged users) of the filesystem holding `dir`.
fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: an all-zero statvfs is a valid value of this plain C struct.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is NUL-terminated and `stat` is a valid place for the answer.
    let done = unsafe { libc::statvfs(path.as_ptr(), &mut stat) } == 0;
    done.then(|| stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// The prefix of a batch error that means "the disk is (almost) full", followed by the room.
const DISK: &str = "disk:";

/// The prefix of a batch error that means "full", followed by the limit.
const FULL: &str = "full:";

/// The bytes and count of pending writes, at open.
fn pending_size(db: &Database) -> Result<(u64, u64), String> {
    let txn = db.begin_write().map_err(failed)?;
    let mut bytes = 0;
    let count;
    {
        // Creates the tables on first open.
        let writes = txn.open_table(WRITES).map_err(failed)?;
        txn.open_table(RECEIPTS).map_err(failed)?;
        txn.open_table(DEAD).map_err(failed)?;
        txn.open_table(RECEIPT_EXPIRY).map_err(failed)?;
        txn.open_table(META).map_err(failed)?;
        for item in writes.iter().map_err(failed)? {
            let (_, value) = item.map_err(failed)?;
            bytes += value.value().len() as u64;
        }
        count = writes.len().map_err(failed)?;
    }
    txn.commit().map_err(failed)?;
    Ok((bytes, count))
}

/// Applies a batch in one transaction. Appends past `max_bytes` are refused one by one; the rest
/// of the batch goes on. Only a batch of attempt notes skips the fsync (a lost note costs a
/// receipt one count).
fn apply(
    db: &Database,
    ops: &[Op],
    max_bytes: u64,
    mut room: Option<u64>,
    bytes: &AtomicU64,
    depth: &AtomicU64,
) -> Result<Vec<Answer<u64>>, String> {
    // Every commit is durable, attempts too: redb reuses the pages a commit frees only after a
    // durable one, so an outage recording attempts without one would grow the file until the
    // disk is full.
    let mut txn = db.begin_write().map_err(failed)?;
    txn.set_durability(Durability::Immediate);
    let now = unix_ms();
    let (mut size, mut count) = (bytes.load(Ordering::Relaxed), depth.load(Ordering::Relaxed));
    let answers = {
        let mut t = Tables {
            writes: txn.open_table(WRITES).map_err(failed)?,
            receipts: txn.open_table(RECEIPTS).map_err(failed)?,
            dead: txn.open_table(DEAD).map_err(failed)?,
            expiry: txn.open_table(RECEIPT_EXPIRY).map_err(failed)?,
            meta: txn.open_table(META).map_err(failed)?,
        };
        t.sweep(now)?;
        let mut answers = Vec::with_capacity(ops.len());
        for op in ops {
            answers.push(match op {
                Op::Append(write) => {
                    let encoded = write.encode();
                    let len = encoded.len() as u64;
                    if size + len > max_bytes {
                        Err(format!("{FULL}{max_bytes}"))
                    } else if room.is_some_and(|room| room < disk_cost(len)) {
                        Err(format!("{DISK}{}", room.unwrap_or_default()))
                    } else {
                        let seq = t.append(write, &encoded, now)?;
                        room = room.map(|room| room.saturating_sub(disk_cost(len)));
                        size += len;
                        count += 1;
                        Ok(seq)
                    }
                }
                Op::Attempt { receipt, error } => t.attempt(receipt, error, now).map(|()| 0),
                Op::Finish {
                    seq,
                    receipt,
                    outcome,
                    ttl,
                } => {
                    let removed = t.finish(*seq, receipt, outcome, *ttl, now)?;
                    if removed > 0 {
                        size = size.saturating_sub(removed);
                        count = count.saturating_sub(1);
                    }
                    Ok(0)
                }
                Op::Replay { receipt } => match t.replay(receipt, now)? {
                    Some((seq, len)) => {
                        size += len;
                        count += 1;
                        Ok(seq)
                    }
                    None => Ok(NOT_FOUND),
                },
            });
        }
        answers
    };
    txn.commit().map_err(failed)?;
    bytes.store(size, Ordering::Relaxed);
    depth.store(count, Ordering::Relaxed);
    Ok(answers)
}

/// The tables of one write transaction.
struct Tables<'t> {
    writes: redb::Table<'t, u64, &'static [u8]>,
    receipts: redb::Table<'t, &'static [u8], &'static [u8]>,
    dead: redb::Table<'t, u64, &'static [u8]>,
    expiry: redb::Table<'t, &'static [u8], ()>,
    meta: redb::Table<'t, &'static str, u64>,
}

impl Tables<'_> {
    fn next_seq(&mut self) -> Result<u64, String> {
        let seq = self
            .meta
            .get("next_seq")
            .map_err(failed)?
            .map_or(1, |v| v.value());
        self.meta.insert("next_seq", seq + 1).map_err(failed)?;
        Ok(seq)
    }

    fn append(&mut self, write: &BufferedWrite, encoded: &[u8], now: u64) -> Result<u64, String> {
        let seq = self.next_seq()?;
        self.writes.insert(seq, encoded).map_err(failed)?;
        let receipt = Receipt {
            route: write.route.clone(),
            seq,
            accepted_ms: write.accepted_ms,
            updated_ms: now,
            attempts: 0,
            last_error: String::new(),
            outcome: Outcome::Pending,
        };
        self.put_receipt(&write.receipt, &receipt)?;
        Ok(seq)
    }

    fn receipt(&self, id: &ReceiptId) -> Result<Option<Receipt>, String> {
        let Some(value) = self.receipts.get(id.as_slice()).map_err(failed)? else {
            return Ok(None);
        };
        Receipt::decode(value.value())
            .map(Some)
            .map_err(|e| e.to_string())
    }

    fn put_receipt(&mut self, id: &ReceiptId, receipt: &Receipt) -> Result<(), String> {
        self.receipts
            .insert(id.as_slice(), receipt.encode().as_slice())
            .map_err(failed)?;
        Ok(())
    }

    fn attempt(&mut self, id: &ReceiptId, error: &str, now: u64) -> Result<(), String> {
        if let Some(mut receipt) = self.receipt(id)? {
            receipt.attempts += 1;
            receipt.last_error = error.chars().take(500).collect();
            receipt.updated_ms = now;
            self.put_receipt(id, &receipt)?;
        }
        Ok(())
    }

    /// Removes the pending write `seq` (onto the dead-letter list if it failed); its bytes.
    fn finish(
        &mut self,
        seq: u64,
        id: &ReceiptId,
        outcome: &Outcome,
        ttl: Duration,
        now: u64,
    ) -> Result<u64, String> {
        let Some(write) = self
            .writes
            .remove(seq)
            .map_err(failed)?
            .map(|v| v.value().to_vec())
        else {
            return Ok(0);
        };
        if let Outcome::Failed { .. } = outcome {
            self.dead.insert(seq, write.as_slice()).map_err(failed)?;
        }
        if let Some(mut receipt) = self.receipt(id)? {
            receipt.outcome = outcome.clone();
            receipt.updated_ms = now;
            if let Outcome::Delivered { .. } = outcome {
                receipt.attempts += 1;
            }
            self.put_receipt(id, &receipt)?;
            // Dead letters keep their receipt until replayed.
            if let Outcome::Delivered { .. } = outcome {
                let expires = now.saturating_add(ttl.as_millis() as u64);
                self.expiry
                    .insert(expiry_key(expires, id).as_slice(), ())
                    .map_err(failed)?;
            }
        }
        Ok(write.len() as u64)
    }

    /// Moves the dead letter of receipt `id` back to the log's end.
    fn replay(&mut self, id: &ReceiptId, now: u64) -> Result<Option<(u64, u64)>, String> {
        let Some(mut receipt) = self.receipt(id)? else {
            return Ok(None);
        };
        if !matches!(receipt.outcome, Outcome::Failed { .. }) {
            return Ok(None);
        }
        let Some(write) = self
            .dead
            .remove(receipt.seq)
            .map_err(failed)?
            .map(|v| v.value().to_vec())
        else {
            return Ok(None);
        };
        let seq = self.next_seq()?;
        self.writes.insert(seq, write.as_slice()).map_err(failed)?;
        receipt.seq = seq;
        receipt.attempts = 0;
        receipt.outcome = Outcome::Pending;
        receipt.updated_ms = now;
        self.put_receipt(id, &receipt)?;
        Ok(Some((seq, write.len() as u64)))
    }

    /// Removes delivered receipts whose time is up.
    fn sweep(&mut self, now: u64) -> Result<(), String> {
        let end = expiry_key(now, &[0; 16]);
        let due: Vec<Vec<u8>> = self
            .expiry
            .range(..end.as_slice())
            .map_err(failed)?
            .take(SWEEP_BATCH)
            .filter_map(|item| item.ok().map(|(key, _)| key.value().to_vec()))
            .collect();
        for key in due {
            self.expiry.remove(key.as_slice()).map_err(failed)?;
            self.receipts.remove(&key[8..]).map_err(failed)?;
        }
        Ok(())
    }
}

fn expiry_key(expires_ms: u64, id: &[u8]) -> Vec<u8> {
    let mut key = expires_ms.to_be_bytes().to_vec();
    key.extend_from_slice(id);
    key
}
