//! The buffer on RabbitMQ: one set of queues shared by every writegate replica.
//!
//! A write becomes one persistent message, published to a consistent-hash exchange (the
//! `rabbitmq_consistent_hash_exchange` plugin) that spreads keys over `partitions` quorum queues;
//! the client's `202` waits for the broker's publisher confirm. Each queue has a single active
//! consumer, so one replica delivers a partition at a time and a key's writes, all in one
//! partition, stay in order across replicas; a message is acknowledged once its outcome is known,
//! so the partitions (and their unacknowledged messages, in order) of a replica that dies go to
//! another. Failed writes are published to the `NAME.dead` queue.
//!
//! Receipts live in Redis (`receipts_url`), which every replica reads: a receipt is a key with an
//! expiry, written when a write is accepted and when an attempt or the outcome is known.
//! RabbitMQ itself cannot look a message up by id, and the receipt must outlive the message.
//!
//! One connection per store, made and remade by a supervisor task with backoff: while it is
//! down, writes are answered 503 and deliveries pause; the broker hands the unacknowledged
//! messages of a lost connection to the next consumer.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Acker, BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::{watch, Notify, OnceCell};

use super::deliver::Dispatcher;
use super::log::{Limits, Log, LogError};
use super::queue::{Queue, QueueFuture, Waiting};
use super::{BufferedWrite, Outcome, Receipt, ReceiptId};
use crate::byte_form::{hex, unix_ms};
use crate::config::{BufferSync, RabbitSettings, DEFAULT_BUFFER_MIN_FREE};

/// Longest wait for a connection to the broker or to Redis.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for one Redis command.
const REDIS_TIMEOUT: Duration = Duration::from_secs(2);
/// Reconnection delays: doubling from the first to the last.
const RECONNECT_FIRST: Duration = Duration::from_millis(200);
const RECONNECT_MAX: Duration = Duration::from_secs(5);
/// How often the queues' depths are read while connected.
const DEPTH_REFRESH: Duration = Duration::from_secs(2);
/// Longest wait to hand an acknowledgement to the connection.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// Writes of the fallback log published before their confirms are awaited.
const FORWARD_BATCH: usize = 256;
/// Longest a write held when its connection was lost keeps its place in its lane, waiting for
/// the broker to deliver it again.
const REDELIVERY_WAIT: Duration = Duration::from_secs(30);
const REDELIVERY_POLL: Duration = Duration::from_millis(20);
/// How long a tombstone waits for its copy (then that copy went to another replica).
const TOMBSTONE_AGE: Duration = Duration::from_secs(600);
/// How often a new connection looks whether delivery has started.
const ATTACH_POLL: Duration = Duration::from_millis(50);
/// How often the fallback log is looked at for writes to forward.
const FORWARD_PAUSE: Duration = Duration::from_millis(200);
/// How long the fallback log keeps its own receipt of a forwarded write (the one in Redis is the
/// one served).
const FORWARDED_TTL: Duration = Duration::from_secs(1);
/// Longest the start-up waits for the first connection's verdict.
const FIRST_CONNECT_WAIT: Duration = Duration::from_secs(15);

/// Where the store's connection stands.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Link {
    Connecting,
    Up,
    /// The broker could not be reached (or the connection was lost): retried.
    Down(String),
    /// The broker refused the topology (a missing plugin, an old version, a queue declared
    /// with other arguments): retried, but the start-up stops on it.
    Refused(String),
}

/// A message received and not yet acknowledged.
struct Held {
    acker: Acker,
    /// The connection it came on: once that is lost, the broker gives the message to the next
    /// consumer, and this copy is dropped.
    session: Weak<Session>,
    write: BufferedWrite,
    attempts: u32,
    /// Delivered (its outcome recorded) while its connection was lost: a tombstone.
    done_at: Option<Instant>,
}

impl Held {
    fn alive(&self) -> bool {
        self.acker.usable()
            && self
                .session
                .upgrade()
                .is_some_and(|s| !s.lost.load(Ordering::SeqCst))
    }
}

/// The messages this replica holds, by sequence number and by receipt. An entry outlives the
/// connection it came on: RabbitMQ may deliver the same message again on the next connection
/// after newer ones of its key (seen after a broker restart), so the old entry keeps the write's
/// place in its lane until the copy arrives and takes it over, at most [`REDELIVERY_WAIT`]. An
/// entry whose write was delivered but whose acknowledgement was lost stays as a tombstone, so
/// that its copy is acknowledged without being delivered again.
#[derive(Default)]
struct HeldSet {
    by_seq: HashMap<u64, Held>,
    by_receipt: HashMap<ReceiptId, u64>,
}

impl HeldSet {
    fn remove(&mut self, seq: u64) -> Option<Held> {
        let entry = self.by_seq.remove(&seq)?;
        self.by_receipt.remove(&entry.write.receipt);
        Some(entry)
    }

    /// Drops tombstones older than `age` (their copies went to another replica).
    fn prune(&mut self, age: Duration) {
        let old: Vec<u64> = self
            .by_seq
            .iter()
            .filter(|(_, e)| e.done_at.is_some_and(|t| t.elapsed() > age))
            .map(|(seq, _)| *seq)
            .collect();
        for seq in old {
            self.remove(seq);
        }
    }
}

/// The current connection: the channel writes are published on (in confirm mode) and the one
/// the partitions are consumed on.
struct Session {
    connection: Connection,
    publish: Channel,
    consume: Channel,
    /// Notified when a consumer or the connection ends.
    broken: Notify,
    lost: AtomicBool,
}

impl Session {
    fn lose(&self) {
        self.lost.store(true, Ordering::SeqCst);
        self.broken.notify_one();
    }
}

/// Per partition: messages waiting (as last read) and whether this replica is its consumer.
#[derive(Debug, Default)]
struct Partition {
    messages: AtomicU64,
    consumers: AtomicU64,
    active_here: AtomicBool,
}

pub struct Rabbit {
    settings: RabbitSettings,
    label: String,
    session: ArcSwapOption<Session>,
    link: watch::Sender<Link>,
    receipts: Receipts,
    dispatcher: OnceLock<Weak<Dispatcher>>,
    held: Mutex<HeldSet>,
    next_seq: AtomicU64,
    partitions: Vec<Partition>,
    dead: AtomicU64,
    /// `fallback = "local"`: the log that keeps writes while the broker cannot be reached.
    spool: Option<Arc<Log>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Rabbit {
    /// Checks the settings and starts connecting (in the background: writes are answered 503
    /// until the broker is reached). Needs the tokio runtime.
    pub fn open(settings: &RabbitSettings) -> Result<Arc<Rabbit>, String> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| "the RabbitMQ store needs the proxy's runtime".to_string())?;
        let spool = match &settings.fallback_dir {
            Some(dir) => {
                let limits = Limits {
                    max_bytes: settings.max_bytes,
                    min_free: DEFAULT_BUFFER_MIN_FREE,
                };
                Some(Arc::new(Log::open(dir, BufferSync::Batch, limits)?))
            }
            None => None,
        };
        let rabbit = Arc::new(Rabbit {
            spool,
            label: format!("{} {}", redacted(&settings.amqp_url), settings.name),
            session: ArcSwapOption::empty(),
            link: watch::channel(Link::Connecting).0,
            receipts: Receipts::new(&settings.receipts_url)?,
            dispatcher: OnceLock::new(),
            held: Mutex::default(),
            next_seq: AtomicU64::new(1),
            partitions: (0..settings.partitions)
                .map(|_| Partition::default())
                .collect(),
            dead: AtomicU64::new(0),
            settings: settings.clone(),
        });
        runtime.spawn(supervisor(Arc::downgrade(&rabbit)));
        if rabbit.spool.is_some() {
            runtime.spawn(forwarder(Arc::downgrade(&rabbit)));
        }
        Ok(rabbit)
    }

    fn queue_name(&self, partition: usize) -> String {
        format!("{}.{partition}", self.settings.name)
    }

    fn dead_queue(&self) -> String {
        format!("{}.dead", self.settings.name)
    }

    /// Connects, declares the exchange and queues, and opens the two channels.
    async fn connect(&self) -> Result<Session, Link> {
        let properties = ConnectionProperties::default()
            .with_connection_name(format!("writegate {}", std::process::id()).into());
        let connecting = Connection::connect(&self.settings.amqp_url, properties);
        let connection = match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
            Ok(Ok(connection)) => connection,
            Ok(Err(error)) => return Err(Link::Down(format!("cannot connect: {error}"))),
            Err(_) => return Err(Link::Down("connecting timed out".into())),
        };
        let down = |error: lapin::Error| Link::Down(error.to_string());
        let setup = connection.create_channel().await.map_err(down)?;
        self.declare(&setup).await?;
        let _ = setup.close(200, "declared".into()).await;
        let publish = connection.create_channel().await.map_err(down)?;
        publish
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(down)?;
        let consume = connection.create_channel().await.map_err(down)?;
        let prefetch = BasicQosOptions { global: false };
        consume
            .basic_qos(self.settings.prefetch, prefetch)
            .await
            .map_err(down)?;
        Ok(Session {
            connection,
            publish,
            consume,
            broken: Notify::new(),
            lost: AtomicBool::new(false),
        })
    }

    /// Declares (idempotently) the exchange, the partition queues and their bindings, and the
    /// dead-letter queue.
    async fn declare(&self, channel: &Channel) -> Result<(), Link> {
        let name = &self.settings.name;
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        let kind = ExchangeKind::Custom("x-consistent-hash".into());
        if let Err(error) = channel
            .exchange_declare(name.as_str().into(), kind, durable, FieldTable::default())
            .await
        {
            return Err(Link::Refused(format!(
                "RabbitMQ refused the exchange {name:?} of type x-consistent-hash ({error}): \
                 enable the plugin with `rabbitmq-plugins enable rabbitmq_consistent_hash_exchange`"
            )));
        }
        let per_queue = self.settings.max_bytes / u64::from(self.settings.partitions.max(1));
        let durable = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        for partition in 0..self.partitions.len() {
            let queue = self.queue_name(partition);
            let mut arguments = quorum();
            arguments.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
            let max = i64::try_from(per_queue).unwrap_or(i64::MAX);
            arguments.insert("x-max-length-bytes".into(), AMQPValue::LongLongInt(max));
            arguments.insert(
                "x-overflow".into(),
                AMQPValue::LongString("reject-publish".into()),
            );
            declare_queue(channel, &queue, durable, arguments).await?;
            channel
                .queue_bind(
                    queue.as_str().into(),
                    name.as_str().into(),
                    "1".into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|e| Link::Refused(format!("cannot bind {queue:?} to {name:?}: {e}")))?;
        }
        declare_queue(channel, &self.dead_queue(), durable, quorum()).await
    }

    /// Subscribes to every partition, feeding `dispatcher`.
    async fn subscribe(self: &Arc<Self>, session: &Arc<Session>) -> Result<(), String> {
        let tag_base = format!("writegate-{}", std::process::id());
        for partition in 0..self.partitions.len() {
            let queue = self.queue_name(partition);
            let consumer = session
                .consume
                .basic_consume(
                    queue.as_str().into(),
                    format!("{tag_base}-{partition}").into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|e| format!("cannot consume {queue:?}: {e}"))?;
            tokio::spawn(consume(
                Arc::downgrade(self),
                Arc::clone(session),
                partition,
                consumer,
            ));
        }
        Ok(())
    }

    /// Takes a message from partition `partition` into a lane.
    fn received(
        &self,
        session: &Arc<Session>,
        partition: usize,
        delivery: lapin::message::Delivery,
    ) {
        let slot = &self.partitions[partition];
        if !slot.active_here.swap(true, Ordering::Relaxed) {
            tracing::info!(queue = %self.queue_name(partition), "this replica now delivers the partition");
        }
        let queue = self.queue_name(partition);
        metrics::gauge!(crate::metrics::BUFFER_PARTITION_ACTIVE, "queue" => queue.clone()).set(1.0);
        if delivery.redelivered {
            metrics::counter!(crate::metrics::BUFFER_REDELIVERED, "queue" => queue.clone())
                .increment(1);
        }
        let write = match BufferedWrite::decode(&delivery.data) {
            Ok(write) => write,
            Err(error) => {
                // Not ours to deliver: left unacknowledged until the connection ends, reported.
                tracing::error!(%queue, %error, "a message of the buffer's queue does not decode; it is left unacknowledged");
                return;
            }
        };
        let Some(dispatcher) = self.dispatcher.get().and_then(Weak::upgrade) else {
            return;
        };
        let mut held = lock(&self.held);
        if let Some(&seq) = held.by_receipt.get(&write.receipt) {
            if let Some(entry) = held.by_seq.get_mut(&seq).filter(|e| !e.alive()) {
                if entry.done_at.is_some() {
                    // Delivered already: acknowledged, not delivered again.
                    held.remove(seq);
                    let acker = delivery.acker;
                    tokio::spawn(async move {
                        let ack = acker.ack(BasicAckOptions::default());
                        let _ = tokio::time::timeout(ACK_TIMEOUT, ack).await;
                    });
                } else {
                    // The copy takes the old entry's place in its lane.
                    entry.acker = delivery.acker;
                    entry.session = Arc::downgrade(session);
                }
                return;
            }
        }
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let (route, key) = (write.route.clone(), write.key.clone());
        held.by_receipt.insert(write.receipt, seq);
        held.by_seq.insert(
            seq,
            Held {
                acker: delivery.acker,
                session: Arc::downgrade(session),
                write,
                attempts: 0,
                done_at: None,
            },
        );
        drop(held);
        dispatcher.enqueue(seq, &route, key);
    }

    /// Publishes `payload` and waits for the broker's confirm.
    async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        payload: &[u8],
        message_id: &str,
    ) -> Result<(), LogError> {
        let started = Instant::now();
        let (session, confirm) = self
            .send(exchange, routing_key, payload, message_id)
            .await?;
        let confirmed = self.confirmed(&session, exchange, confirm).await;
        metrics::histogram!(crate::metrics::BUFFER_PUBLISH, "queue" => self.settings.name.clone())
            .record(started.elapsed().as_secs_f64());
        confirmed
    }

    /// Hands a persistent message to the connection; the confirm to wait for.
    async fn send(
        &self,
        exchange: &str,
        routing_key: &str,
        payload: &[u8],
        message_id: &str,
    ) -> Result<(Arc<Session>, lapin::PublisherConfirm), LogError> {
        let Some(session) = self.session.load_full() else {
            return Err(LogError::Failed(self.not_connected()));
        };
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(message_id.into());
        let mandatory = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        let sent = session
            .publish
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                mandatory,
                payload,
                properties,
            )
            .await;
        match sent {
            Ok(confirm) => Ok((session, confirm)),
            Err(error) => {
                session.lose();
                Err(LogError::Unconfirmed(format!(
                    "publishing to RabbitMQ failed: {error}"
                )))
            }
        }
    }

    /// Waits (at most `publish_timeout`) for the broker's confirm of a message sent on `session`.
    async fn confirmed(
        &self,
        session: &Session,
        exchange: &str,
        confirm: lapin::PublisherConfirm,
    ) -> Result<(), LogError> {
        match tokio::time::timeout(self.settings.publish_timeout, confirm).await {
            Err(_) => Err(LogError::Unconfirmed(format!(
                "RabbitMQ did not confirm the write within {:?}",
                self.settings.publish_timeout
            ))),
            Ok(Err(error)) => {
                session.lose();
                Err(LogError::Unconfirmed(format!(
                    "the connection to RabbitMQ failed before its confirm: {error}"
                )))
            }
            Ok(Ok(confirmation)) if confirmation.is_nack() => {
                Err(LogError::Full(self.settings.max_bytes))
            }
            Ok(Ok(confirmation)) => match confirmation.take_message() {
                None => Ok(()),
                Some(_) => Err(LogError::Failed(format!(
                    "RabbitMQ returned the write: no queue is bound to {exchange:?}"
                ))),
            },
        }
    }

    fn not_connected(&self) -> String {
        match &*self.link.borrow() {
            Link::Down(reason) | Link::Refused(reason) => {
                format!("not connected to RabbitMQ: {reason}")
            }
            _ => "not connected to RabbitMQ yet".to_string(),
        }
    }

    /// Reads the depth of every queue (on a channel of its own: a failed passive declare
    /// closes its channel).
    async fn refresh_depths(&self, session: &Session) -> Result<(), lapin::Error> {
        let channel = session.connection.create_channel().await?;
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        for (partition, slot) in self.partitions.iter().enumerate() {
            let queue = self.queue_name(partition);
            let state = channel
                .queue_declare(queue.as_str().into(), passive, FieldTable::default())
                .await?;
            slot.messages
                .store(u64::from(state.message_count()), Ordering::Relaxed);
            slot.consumers
                .store(u64::from(state.consumer_count()), Ordering::Relaxed);
        }
        let dead = self.dead_queue();
        let state = channel
            .queue_declare(dead.as_str().into(), passive, FieldTable::default())
            .await?;
        self.dead
            .store(u64::from(state.message_count()), Ordering::Relaxed);
        let _ = channel.close(200, "depths read".into()).await;
        Ok(())
    }

    /// Removes a live entry (to acknowledge it); an entry of a lost connection becomes a
    /// tombstone.
    fn take_held(&self, seq: u64) -> Option<Held> {
        let mut held = lock(&self.held);
        match held.by_seq.get_mut(&seq) {
            Some(entry) if entry.alive() => held.remove(seq),
            Some(entry) => {
                entry.done_at = Some(Instant::now());
                None
            }
            None => None,
        }
    }

    async fn put_receipt(
        &self,
        write: &BufferedWrite,
        receipt: Receipt,
        ttl: Duration,
    ) -> Result<(), String> {
        self.receipts
            .put(&write.receipt, &receipt.encode(), ttl)
            .await
    }

    fn receipt_for(
        write: &BufferedWrite,
        attempts: u32,
        last_error: String,
        outcome: Outcome,
    ) -> Receipt {
        Receipt {
            route: write.route.clone(),
            seq: 0,
            accepted_ms: write.accepted_ms,
            updated_ms: unix_ms(),
            attempts,
            last_error,
            outcome,
        }
    }
}

/// A key's writes share a routing key, so the exchange puts them in one partition; keyless ones
/// share their route's.
fn routing_key(write: &BufferedWrite) -> String {
    let hashed = write.key.as_deref().unwrap_or(write.route.as_bytes());
    format!("{:016x}", xxhash_rust::xxh3::xxh3_64(hashed))
}

/// Publishes what the fallback log holds, in its order, whenever the broker is connected.
async fn forwarder(store: Weak<Rabbit>) {
    loop {
        let Some(this) = store.upgrade() else { return };
        if let Some(spool) = this.spool.clone() {
            if this.session.load().is_some() && Log::depth(&spool).0 > 0 {
                match this.forward(&spool).await {
                    Ok(n) => {
                        tracing::info!(store = %this.label, writes = n, "forwarded the writes the fallback log kept to RabbitMQ")
                    }
                    Err(error) => {
                        tracing::warn!(store = %this.label, %error, "forwarding the fallback log to RabbitMQ stopped; trying again")
                    }
                }
            }
        }
        drop(this);
        tokio::time::sleep(FORWARD_PAUSE).await;
    }
}

impl Rabbit {
    /// Publishes every write of the fallback log, oldest first, and removes each once the broker
    /// confirmed it; how many.
    async fn forward(&self, spool: &Log) -> Result<usize, String> {
        let waiting = spool.scan()?;
        let mut forwarded = 0;
        for batch in waiting.chunks(FORWARD_BATCH) {
            // Sent in log order on one channel, then confirmed: the broker keeps that order.
            let mut sent = Vec::with_capacity(batch.len());
            for (seq, _, _) in batch {
                let Some(write) = Log::pending(spool, *seq)? else {
                    continue;
                };
                let id = hex(&write.receipt);
                let routing = routing_key(&write);
                let name = &self.settings.name;
                let (session, confirm) = self
                    .send(name, &routing, &write.encode(), &id)
                    .await
                    .map_err(|e| e.to_string())?;
                sent.push((*seq, write.receipt, session, confirm));
            }
            let mut finishing = Vec::with_capacity(sent.len());
            let mut failed = None;
            for (seq, receipt, session, confirm) in sent {
                if let Err(error) = self.confirmed(&session, &self.settings.name, confirm).await {
                    failed = Some(error.to_string());
                    break;
                }
                let forwarded = Outcome::Delivered {
                    status: http::StatusCode::ACCEPTED,
                    body: Bytes::new(),
                };
                finishing.push(Log::finish(spool, seq, receipt, forwarded, FORWARDED_TTL));
            }
            // The confirmed ones leave the log (one group commit); the others are sent again.
            for finished in futures_util::future::join_all(finishing).await {
                finished?;
                forwarded += 1;
            }
            if let Some(error) = failed {
                return Err(error);
            }
        }
        Ok(forwarded)
    }
}

fn quorum() -> FieldTable {
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    arguments
}

async fn declare_queue(
    channel: &Channel,
    queue: &str,
    options: QueueDeclareOptions,
    arguments: FieldTable,
) -> Result<(), Link> {
    channel
        .queue_declare(queue.into(), options, arguments)
        .await
        .map(drop)
        .map_err(|error| {
            Link::Refused(format!(
                "RabbitMQ refused the quorum queue {queue:?} ({error}): writegate needs RabbitMQ \
                 3.8 or newer, and a queue declared before with other arguments (partitions, \
                 max_bytes) must be deleted first"
            ))
        })
}

/// `amqp://user:password@host` without the password.
fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let user = url[scheme + 3..at].split(':').next().unwrap_or_default();
            format!("{}{user}@{}", &url[..scheme + 3], &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

/// Keeps the store connected: connects, subscribes once delivery is attached, refreshes the
/// depths, and starts over with backoff when the connection is lost.
async fn supervisor(store: Weak<Rabbit>) {
    let mut pause = RECONNECT_FIRST;
    loop {
        let Some(this) = store.upgrade() else { return };
        match this.connect().await {
            Ok(session) => {
                pause = RECONNECT_FIRST;
                let session = Arc::new(session);
                watch_connection(&session);
                this.session.store(Some(Arc::clone(&session)));
                this.link.send_replace(Link::Up);
                lock(&this.held).prune(TOMBSTONE_AGE);
                tracing::info!(store = %this.label, "connected to RabbitMQ");
                drop(this);
                let ended = run_session(&store, &session).await;
                let this = store.upgrade();
                let Some(this) = this.filter(|_| ended.is_some()) else {
                    // The store is gone (a reload removed its routes): so is its connection.
                    let _ = session.connection.close(200, "store closed".into()).await;
                    return;
                };
                let ended = ended.unwrap_or_default();
                this.session.store(None);
                for slot in &this.partitions {
                    slot.active_here.store(false, Ordering::Relaxed);
                }
                for partition in 0..this.partitions.len() {
                    let queue = this.queue_name(partition);
                    metrics::gauge!(crate::metrics::BUFFER_PARTITION_ACTIVE, "queue" => queue)
                        .set(0.0);
                }
                tracing::warn!(store = %this.label, reason = %ended, "the connection to RabbitMQ ended; reconnecting");
                this.link.send_replace(Link::Down(ended));
                let _ = session.connection.close(200, "reconnecting".into()).await;
            }
            Err(link) => {
                if let Link::Refused(reason) | Link::Down(reason) = &link {
                    tracing::warn!(store = %this.label, %reason, "cannot use RabbitMQ; trying again");
                }
                this.link.send_replace(link);
                drop(this);
            }
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(RECONNECT_MAX);
    }
}

/// Serves one connection until it breaks: why it ended, or `None` once the store is gone. Holds
/// the store only while it works on it, so that a store a reload dropped ends.
async fn run_session(store: &Weak<Rabbit>, session: &Arc<Session>) -> Option<String> {
    let broke = || Some("the connection broke".to_string());
    // Delivery attaches once the proxy runs, right after the first connection.
    while store.upgrade()?.dispatcher.get().is_none() {
        tokio::select! {
            () = session.broken.notified() => return broke(),
            () = tokio::time::sleep(ATTACH_POLL) => {}
        }
    }
    if let Err(error) = store.upgrade()?.subscribe(session).await {
        return Some(error);
    }
    loop {
        if session.lost.load(Ordering::SeqCst) {
            return broke();
        }
        if let Err(error) = store.upgrade()?.refresh_depths(session).await {
            return Some(format!("reading the queues failed: {error}"));
        }
        tokio::select! {
            () = tokio::time::sleep(DEPTH_REFRESH) => {}
            () = session.broken.notified() => return broke(),
        }
    }
}

/// Marks the session lost when the connection reports an error.
fn watch_connection(session: &Arc<Session>) {
    let mut events = session.connection.events_listener();
    let weak = Arc::downgrade(session);
    tokio::spawn(async move {
        while let Some(event) = events.next().await {
            if let lapin::Event::Error(error) = event {
                tracing::debug!(%error, "the RabbitMQ connection reported an error");
                if let Some(session) = weak.upgrade() {
                    session.lose();
                }
                return;
            }
        }
    });
}

/// Reads one partition's consumer until it ends.
async fn consume(
    store: Weak<Rabbit>,
    session: Arc<Session>,
    partition: usize,
    mut consumer: lapin::Consumer,
) {
    while let Some(delivery) = consumer.next().await {
        let Some(this) = store.upgrade() else { return };
        match delivery {
            Ok(delivery) => this.received(&session, partition, delivery),
            Err(error) => {
                tracing::warn!(store = %this.label, partition, %error, "consuming a partition failed");
                break;
            }
        }
    }
    session.lose();
}

impl Queue for Rabbit {
    fn label(&self) -> &str {
        &self.label
    }

    fn append(&self, write: BufferedWrite) -> QueueFuture<'_, Result<Option<u64>, LogError>> {
        Box::pin(async move {
            // While the local log holds writes, new ones queue behind them: a replica's writes
            // to one key reach the broker in the order it took them.
            let spool = self
                .spool
                .as_ref()
                .filter(|s| self.session.load().is_none() || Log::depth(s).0 > 0);
            if self.session.load().is_none() && spool.is_none() {
                return Err(LogError::Failed(self.not_connected()));
            }
            // The receipt first: the consumer's later updates must not be overtaken by it.
            let queued = Rabbit::receipt_for(&write, 0, String::new(), Outcome::Pending);
            self.put_receipt(&write, queued, self.settings.pending_ttl)
                .await
                .map_err(|e| LogError::Failed(format!("cannot record the receipt: {e}")))?;
            if let Some(spool) = spool {
                spool.append(write).await?;
                metrics::counter!(crate::metrics::BUFFER_SPOOLED, "queue" => self.settings.name.clone())
                    .increment(1);
                return Ok(None);
            }
            let id = hex(&write.receipt);
            let published = self
                .publish(
                    &self.settings.name,
                    &routing_key(&write),
                    &write.encode(),
                    &id,
                )
                .await;
            if published.is_err() {
                let _ = self.receipts.delete(&write.receipt).await;
            }
            published.map(|()| None)
        })
    }

    fn ready(&self) -> QueueFuture<'_, Result<(), String>> {
        Box::pin(async move {
            let mut link = self.link.subscribe();
            let verdict = async {
                link.wait_for(|l| *l != Link::Connecting)
                    .await
                    .map(|state| state.clone())
            };
            match tokio::time::timeout(FIRST_CONNECT_WAIT, verdict).await {
                Ok(Ok(state)) => match &state {
                    Link::Refused(reason) => Err(reason.clone()),
                    Link::Down(reason) => {
                        tracing::warn!(store = %self.label, %reason, "RabbitMQ cannot be reached yet: buffered writes get 503 until it can");
                        Ok(())
                    }
                    _ => Ok(()),
                },
                _ => Ok(()),
            }
        })
    }

    fn recovered(&self) -> Result<Vec<Waiting>, String> {
        // The broker keeps what was not acknowledged; the consumers receive it again.
        Ok(Vec::new())
    }

    fn attach(&self, dispatcher: &Arc<Dispatcher>) {
        let _ = self.dispatcher.set(Arc::downgrade(dispatcher));
    }

    fn pending(&self, seq: u64) -> QueueFuture<'_, Result<Option<BufferedWrite>, String>> {
        Box::pin(async move {
            let deadline = Instant::now() + REDELIVERY_WAIT;
            loop {
                {
                    let mut held = lock(&self.held);
                    match held.by_seq.get(&seq) {
                        None => return Ok(None),
                        Some(entry) if entry.alive() => return Ok(Some(entry.write.clone())),
                        // Its connection is gone: wait for the broker to deliver it again.
                        Some(_) if Instant::now() < deadline => {}
                        Some(_) => {
                            held.remove(seq);
                            tracing::info!(store = %self.label, "a write held when the connection was lost did not come back; another replica has it");
                            return Ok(None);
                        }
                    }
                }
                tokio::time::sleep(REDELIVERY_POLL).await;
            }
        })
    }

    fn attempt(
        &self,
        seq: u64,
        write: &BufferedWrite,
        error: String,
    ) -> QueueFuture<'_, Result<(), String>> {
        let attempts = {
            let mut held = lock(&self.held);
            held.by_seq.get_mut(&seq).map_or(1, |entry| {
                entry.attempts += 1;
                entry.attempts
            })
        };
        let receipt = Rabbit::receipt_for(write, attempts, error, Outcome::Pending);
        let write = write.clone();
        Box::pin(async move {
            self.put_receipt(&write, receipt, self.settings.pending_ttl)
                .await
        })
    }

    fn finish(
        &self,
        seq: u64,
        write: &BufferedWrite,
        outcome: Outcome,
        ttl: Duration,
    ) -> QueueFuture<'_, Result<(), String>> {
        let write = write.clone();
        Box::pin(async move {
            let attempts = lock(&self.held)
                .by_seq
                .get(&seq)
                .map_or(1, |entry| entry.attempts + 1);
            if let Outcome::Failed { .. } = outcome {
                let id = hex(&write.receipt);
                self.publish("", &self.dead_queue(), &write.encode(), &id)
                    .await
                    .map_err(|e| format!("cannot keep the dead letter: {e}"))?;
            }
            let receipt = Rabbit::receipt_for(&write, attempts, String::new(), outcome);
            self.put_receipt(&write, receipt, ttl).await?;
            // With a lost connection the broker delivers the message again (the backend sees its
            // Idempotency-Key a second time).
            if let Some(entry) = self.take_held(seq) {
                let ack = entry.acker.ack(BasicAckOptions::default());
                match tokio::time::timeout(ACK_TIMEOUT, ack).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(error)) => {
                        tracing::debug!(store = %self.label, %error, "an acknowledgement was lost with its channel");
                    }
                    Err(_) => {
                        tracing::warn!(store = %self.label, "an acknowledgement was not sent in time; the broker may deliver the write again");
                    }
                }
            }
            Ok(())
        })
    }

    fn receipt(&self, id: ReceiptId) -> QueueFuture<'_, Result<Option<Bytes>, String>> {
        Box::pin(async move {
            let Some(bytes) = self.receipts.get(&id).await? else {
                return Ok(None);
            };
            let receipt = Receipt::decode(&bytes).map_err(|e| e.to_string())?;
            Ok(Some(receipt.to_json(&id, None, unix_ms())))
        })
    }

    fn replay(&self, _id: ReceiptId) -> QueueFuture<'_, Result<Option<Waiting>, String>> {
        // Dead letters are messages of NAME.dead: moved back with RabbitMQ's own tools.
        Box::pin(std::future::ready(Ok(None)))
    }

    fn state(&self, _dead_letters: usize) -> QueueFuture<'_, serde_json::Value> {
        let link = self.link.borrow().clone();
        let (connected, error) = match link {
            Link::Up => (true, None),
            Link::Connecting => (false, None),
            Link::Down(reason) | Link::Refused(reason) => (false, Some(reason)),
        };
        let partitions: Vec<serde_json::Value> = self
            .partitions
            .iter()
            .enumerate()
            .map(|(i, slot)| {
                serde_json::json!({
                    "queue": self.queue_name(i),
                    "messages": slot.messages.load(Ordering::Relaxed),
                    "consumers": slot.consumers.load(Ordering::Relaxed),
                    "delivered_by_this_replica": slot.active_here.load(Ordering::Relaxed),
                })
            })
            .collect();
        let held = lock(&self.held).by_seq.len();
        Box::pin(std::future::ready(serde_json::json!({
            "store": "rabbitmq",
            "broker": self.label,
            "connected": connected,
            "error": error,
            "depth": self.depth(),
            "unacknowledged_here": held,
            "partitions": partitions,
            "dead_letter_queue": { "queue": self.dead_queue(), "messages": self.dead.load(Ordering::Relaxed) },
            "fallback": self.spool.as_ref().map(|spool| serde_json::json!({
                "dir": spool.label(),
                "waiting": Log::depth(spool).0,
            })),
        })))
    }

    fn depth(&self) -> u64 {
        let spooled = self.spool.as_ref().map_or(0, |spool| Log::depth(spool).0);
        let queued: u64 = self
            .partitions
            .iter()
            .map(|p| p.messages.load(Ordering::Relaxed))
            .sum();
        queued + spooled
    }

    fn record_gauges(&self) {
        let label = self.label.clone();
        metrics::gauge!(crate::metrics::BUFFER_DEPTH, "dir" => label).set(self.depth() as f64);
    }
}

/// Receipts in Redis: `writegate:receipt:{ID}` → the receipt's byte form, with an expiry.
struct Receipts {
    client: redis::Client,
    connection: OnceCell<ConnectionManager>,
}

impl Receipts {
    fn new(url: &str) -> Result<Receipts, String> {
        let client = redis::Client::open(url).map_err(|e| format!("bad receipts_url: {e}"))?;
        Ok(Receipts {
            client,
            connection: OnceCell::new(),
        })
    }

    async fn connection(&self) -> Result<ConnectionManager, String> {
        let connection = self
            .connection
            .get_or_try_init(|| {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(CONNECT_TIMEOUT))
                    .set_response_timeout(Some(REDIS_TIMEOUT))
                    .set_number_of_retries(1);
                ConnectionManager::new_with_config(self.client.clone(), config)
            })
            .await
            .map_err(|e| format!("Redis: {e}"))?;
        Ok(connection.clone())
    }

    fn key(id: &ReceiptId) -> String {
        format!("writegate:receipt:{}", hex(id))
    }

    async fn put(&self, id: &ReceiptId, value: &[u8], ttl: Duration) -> Result<(), String> {
        let mut connection = self.connection().await?;
        let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        redis::cmd("SET")
            .arg(Receipts::key(id))
            .arg(value)
            .arg("PX")
            .arg(ms)
            .query_async::<()>(&mut connection)
            .await
            .map_err(|e| format!("Redis: {e}"))
    }

    async fn get(&self, id: &ReceiptId) -> Result<Option<Vec<u8>>, String> {
        let mut connection = self.connection().await?;
        redis::cmd("GET")
            .arg(Receipts::key(id))
            .query_async(&mut connection)
            .await
            .map_err(|e| format!("Redis: {e}"))
    }

    async fn delete(&self, id: &ReceiptId) -> Result<(), String> {
        let mut connection = self.connection().await?;
        redis::cmd("DEL")
            .arg(Receipts::key(id))
            .query_async::<()>(&mut connection)
            .await
            .map_err(|e| format!("Redis: {e}"))
    }
}
