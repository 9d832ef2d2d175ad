//! What a buffer's storage does, whatever keeps the writes: the embedded log ([`super::log`]) or
//! RabbitMQ ([`super::rabbit`]). Everything above it (the route modes, receipts' URL, per-key
//! lanes, retries, dead letters, shutdown) is shared and lives in [`super`] and [`super::deliver`].
//!
//! A write is named by a sequence number the store gives it: the log's own (durable, in log
//! order), or for RabbitMQ a number the consumer hands out per message received (held only in
//! memory, as the broker keeps the message until it is acknowledged).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::deliver::Dispatcher;
use super::log::LogError;
use super::{BufferedWrite, Outcome, ReceiptId};

pub type QueueFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A write waiting for delivery: its sequence number, route and key.
pub type Waiting = (u64, String, Option<Bytes>);

/// The storage of a buffer.
pub trait Queue: Send + Sync + 'static {
    /// The store as metrics, logs and the admin API name it.
    fn label(&self) -> &str;

    /// Keeps `write` safely (on disk, or confirmed by the broker) and returns once it is: the
    /// sequence number the dispatcher delivers it by, or `None` when the store feeds the
    /// dispatcher itself (RabbitMQ, whose consumer receives it).
    fn append(&self, write: BufferedWrite) -> QueueFuture<'_, Result<Option<u64>, LogError>>;

    /// Waits for the store's first verdict at start-up: an error stops the start (a broker
    /// that refuses the store's queues), a store still out of reach does not.
    fn ready(&self) -> QueueFuture<'_, Result<(), String>> {
        Box::pin(std::future::ready(Ok(())))
    }

    /// The writes kept from before a restart, in delivery order (read once, at start).
    fn recovered(&self) -> Result<Vec<Waiting>, String>;

    /// Starts feeding `dispatcher` with what the store receives, where it does so itself.
    fn attach(&self, dispatcher: &Arc<Dispatcher>);

    /// The write at `seq`; `None` if it is no longer pending (finished, or handed to another
    /// replica with a lost connection).
    fn pending(&self, seq: u64) -> QueueFuture<'_, Result<Option<BufferedWrite>, String>>;

    /// Notes a failed attempt on the write's receipt.
    fn attempt(
        &self,
        seq: u64,
        write: &BufferedWrite,
        error: String,
    ) -> QueueFuture<'_, Result<(), String>>;

    /// Ends a pending write: delivered, or failed onto the dead-letter list; its receipt is kept
    /// for `ttl`.
    fn finish(
        &self,
        seq: u64,
        write: &BufferedWrite,
        outcome: Outcome,
        ttl: Duration,
    ) -> QueueFuture<'_, Result<(), String>>;

    /// The receipt of `id` as its URL serves it (JSON), if this store has it.
    fn receipt(&self, id: ReceiptId) -> QueueFuture<'_, Result<Option<Bytes>, String>>;

    /// Puts the dead letter of `id` back for delivery: the write to enqueue, `None` if this
    /// store has no such dead letter.
    fn replay(&self, id: ReceiptId) -> QueueFuture<'_, Result<Option<Waiting>, String>>;

    /// The store's state for the admin API (with the first `dead_letters` dead letters).
    fn state(&self, dead_letters: usize) -> QueueFuture<'_, serde_json::Value>;

    /// Writes waiting (as last known, for a store that has to ask a server).
    fn depth(&self) -> u64;

    /// Sets the store's gauges (at each scrape).
    fn record_gauges(&self);
}
