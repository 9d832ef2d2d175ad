//! Delivery of buffered writes: per-key lanes, retries with backoff, dead letters.
//!
//! Writes with one key form a lane: the lane sends its front write, waits until it is final
//! (delivered, or failed onto the dead-letter list), then sends the next, so a key's writes reach
//! the backend in the order they were accepted, one at a time. Lanes of different keys run in
//! parallel, at most the route's `concurrency` at once, and each delivery goes through the normal
//! request path (balancer, coalescing, admission), so a route's limits hold. Keyless writes of an
//! `ordered` route share one lane; otherwise each is a lane of its own.
//!
//! A connect failure, a 5xx, a 408 or a 429 is retried with exponential backoff and full jitter
//! (at least the answer's `Retry-After`), up to `max_attempts` and `max_age`; any other 4xx is
//! final. A write is marked delivered after the backend answered, so a crash between the two
//! delivers that one write again: every delivery carries `Idempotency-Key: <receipt id>` for
//! backends that dedupe.

use crate::byte_form::unix_ms;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use tokio::sync::{Notify, Semaphore};

use super::queue::Queue;
use super::{BufferedWrite, Outcome};
use crate::config::BufferConfig;

/// First retry delay; it doubles per attempt up to [`MAX_BACKOFF`].
const BASE_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Wait before looking again for the settings of a route that a reload removed.
const NO_ROUTE_PAUSE: Duration = Duration::from_secs(1);

/// What came of one delivery attempt.
#[derive(Debug)]
pub enum Delivery {
    /// The backend (or the proxy on its behalf) answered.
    Answered {
        status: StatusCode,
        body: Bytes,
        retry_after: Option<Duration>,
    },
    /// No answer: the reason.
    Failed(String),
}

/// How the proxy sends a buffered write.
pub trait Deliver: Send + Sync + 'static {
    /// Sends `write` through the route's request path.
    fn deliver(&self, write: BufferedWrite) -> Pin<Box<dyn Future<Output = Delivery> + Send>>;
    /// The route's buffer settings now; `None` while no route of that name buffers.
    fn settings(&self, route: &str) -> Option<BufferConfig>;
}

/// Which lane a write waits in.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Lane {
    Key(String, Bytes),
    Ordered(String),
    Alone(u64),
}

/// Delivers one store's writes.
pub struct Dispatcher {
    queue: Arc<dyn Queue>,
    deliver: Arc<dyn Deliver>,
    lanes: Mutex<HashMap<Lane, VecDeque<u64>>>,
    permits: Mutex<HashMap<String, (usize, Arc<Semaphore>)>>,
    stopping: AtomicBool,
    active: AtomicUsize,
    idle: Notify,
}

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher")
            .field("store", &self.queue.label())
            .finish()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Dispatcher {
    /// Starts delivering `queue`: first every write it kept, in order. `publish` makes the
    /// dispatcher visible to the writers of the store; until the store is scanned, their
    /// [`Dispatcher::enqueue`] waits, so that a write appended meanwhile queues behind the older
    /// ones (a write both scanned and enqueued is found delivered the second time, and skipped).
    pub fn start(
        queue: Arc<dyn Queue>,
        deliver: Arc<dyn Deliver>,
        publish: impl FnOnce(Arc<Dispatcher>),
    ) -> Result<(), String> {
        let dispatcher = Arc::new(Dispatcher {
            queue,
            deliver,
            lanes: Mutex::default(),
            permits: Mutex::default(),
            stopping: AtomicBool::new(false),
            active: AtomicUsize::new(0),
            idle: Notify::new(),
        });
        let mut lanes = lock(&dispatcher.lanes);
        publish(Arc::clone(&dispatcher));
        let started: Vec<Lane> = dispatcher
            .queue
            .recovered()?
            .into_iter()
            .filter_map(|(seq, route, key)| dispatcher.queue(&mut lanes, seq, &route, key))
            .collect();
        drop(lanes);
        for lane in started {
            tokio::spawn(Arc::clone(&dispatcher).run_lane(lane));
        }
        dispatcher.queue.attach(&dispatcher);
        Ok(())
    }

    /// Queues the write `seq` of `route` behind the earlier writes of its lane.
    pub fn enqueue(self: &Arc<Self>, seq: u64, route: &str, key: Option<Bytes>) {
        let started = self.queue(&mut lock(&self.lanes), seq, route, key);
        if let Some(lane) = started {
            tokio::spawn(Arc::clone(self).run_lane(lane));
        }
    }

    /// Puts `seq` at the end of its lane; the lane, if it is new and needs a task.
    fn queue(
        &self,
        lanes: &mut HashMap<Lane, VecDeque<u64>>,
        seq: u64,
        route: &str,
        key: Option<Bytes>,
    ) -> Option<Lane> {
        let ordered = self.deliver.settings(route).is_some_and(|s| s.ordered);
        let lane = match key {
            Some(key) => Lane::Key(route.to_string(), key),
            None if ordered => Lane::Ordered(route.to_string()),
            None => Lane::Alone(seq),
        };
        if let Some(waiting) = lanes.get_mut(&lane) {
            waiting.push_back(seq);
            return None;
        }
        lanes.insert(lane.clone(), VecDeque::from([seq]));
        Some(lane)
    }

    /// Stops starting deliveries; those under way finish. What is left stays in the log.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.idle.notify_waiters();
    }

    /// Waits until no delivery is under way (after [`Dispatcher::stop`]), at most `limit`.
    pub async fn wait_idle(&self, limit: Duration) {
        let _ = tokio::time::timeout(limit, async {
            while self.active.load(Ordering::SeqCst) > 0 {
                let notified = self.idle.notified();
                if self.active.load(Ordering::SeqCst) == 0 {
                    break;
                }
                notified.await;
            }
        })
        .await;
    }

    async fn run_lane(self: Arc<Self>, lane: Lane) {
        loop {
            if self.stopping.load(Ordering::SeqCst) {
                lock(&self.lanes).remove(&lane);
                return;
            }
            let Some(seq) = lock(&self.lanes)
                .get(&lane)
                .and_then(|w| w.front().copied())
            else {
                lock(&self.lanes).remove(&lane);
                return;
            };
            self.deliver_one(seq).await;
            let mut lanes = lock(&self.lanes);
            let done = match lanes.get_mut(&lane) {
                Some(waiting) => {
                    waiting.pop_front();
                    waiting.is_empty()
                }
                None => true,
            };
            if done {
                lanes.remove(&lane);
                return;
            }
        }
    }

    /// Delivers the write `seq` until it is final (or the dispatcher stops).
    async fn deliver_one(&self, seq: u64) {
        // A write that cannot be read holds its lane: the writes behind it must not pass it.
        let read = self.until_ok("read a buffered write", seq, || self.queue.pending(seq));
        let Some(Some(write)) = read.await else {
            return;
        };
        let settings = loop {
            if let Some(settings) = self.deliver.settings(&write.route) {
                break settings;
            }
            if self.stopping.load(Ordering::SeqCst) {
                return;
            }
            tokio::time::sleep(NO_ROUTE_PAUSE).await;
        };
        self.attempts(seq, &write, &settings).await;
    }

    /// Sends `write` until its outcome is final. A permit of the route's `concurrency` is held
    /// per attempt, until its outcome is on disk (so that a crash repeats at most `concurrency`
    /// writes per route), but not across the pause between attempts, so that writes waiting out
    /// a backoff leave room for the others.
    async fn attempts(&self, seq: u64, write: &BufferedWrite, settings: &BufferConfig) {
        let route = write.route.as_str();
        let permits = self.permits(route, settings.concurrency);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let permit = tokio::select! {
                permit = permits.acquire() => permit,
                () = self.stopped() => return,
            };
            let Ok(_permit) = permit else { return };
            let _active = Active::enter(self);
            let (retry, error) = match self.deliver.deliver(write.clone()).await {
                Delivery::Answered {
                    status, mut body, ..
                } if !retryable(status) => {
                    body.truncate(settings.receipt_body_limit);
                    let outcome = if status.is_client_error() {
                        Outcome::Failed {
                            status: Some(status),
                            reason: format!("the backend answered {} (final)", status.as_u16()),
                        }
                    } else {
                        Outcome::Delivered { status, body }
                    };
                    self.finish(seq, write, outcome, settings).await;
                    return;
                }
                Delivery::Answered {
                    status,
                    retry_after,
                    ..
                } => (
                    retry_after,
                    format!("the backend answered {}", status.as_u16()),
                ),
                Delivery::Failed(error) => (None, error),
            };
            let age = Duration::from_millis(unix_ms().saturating_sub(write.accepted_ms));
            if attempt >= settings.max_attempts || age >= settings.max_age {
                let reason = format!(
                    "gave up after {attempt} attempts over {}s: {error}",
                    age.as_secs()
                );
                let outcome = Outcome::Failed {
                    status: None,
                    reason,
                };
                self.finish(seq, write, outcome, settings).await;
                return;
            }
            metrics::counter!(crate::metrics::BUFFER_RETRIED, "route" => route.to_string())
                .increment(1);
            tracing::debug!(route, attempt, %error, "buffered write will be retried");
            if let Err(e) = self.queue.attempt(seq, write, error).await {
                tracing::warn!(store = self.queue.label(), error = %e, "could not note a delivery attempt");
            }
            drop(_active);
            drop(_permit);
            let pause = backoff(attempt).max(retry.unwrap_or_default());
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = self.stopped() => return,
            }
        }
    }

    async fn stopped(&self) {
        loop {
            let notified = self.idle.notified();
            if self.stopping.load(Ordering::SeqCst) {
                return;
            }
            notified.await;
        }
    }

    async fn finish(
        &self,
        seq: u64,
        write: &BufferedWrite,
        outcome: Outcome,
        settings: &BufferConfig,
    ) {
        let route = write.route.clone();
        let counter = match &outcome {
            Outcome::Delivered { .. } => crate::metrics::BUFFER_DELIVERED,
            _ => {
                tracing::warn!(route, receipt = %crate::byte_form::hex(&write.receipt), ?outcome, "buffered write failed; it is on the dead-letter list");
                crate::metrics::BUFFER_FAILED
            }
        };
        // The lane waits until the outcome is on disk: the key's next write must not reach the
        // backend while this one could still be delivered again after a restart.
        let ttl = settings.receipt_ttl;
        let recorded = self.until_ok("record a delivery's outcome", seq, || {
            self.queue.finish(seq, write, outcome.clone(), ttl)
        });
        if recorded.await.is_some() {
            metrics::counter!(counter, "route" => route).increment(1);
        }
    }

    /// Runs `op` until it succeeds, pausing with backoff after each failure; `None` if the
    /// dispatcher stops first (what was not recorded stays in the store for the next start).
    async fn until_ok<T, F, Fut>(&self, what: &str, seq: u64, mut op: F) -> Option<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, String>>,
    {
        let mut failures = 0;
        loop {
            match op().await {
                Ok(value) => return Some(value),
                Err(error) => {
                    failures += 1;
                    tracing::error!(store = self.queue.label(), seq, %error, failures, "could not {what}; trying again");
                }
            }
            tokio::select! {
                () = tokio::time::sleep(backoff(failures)) => {}
                () = self.stopped() => return None,
            }
        }
    }

    fn permits(&self, route: &str, concurrency: usize) -> Arc<Semaphore> {
        let mut permits = lock(&self.permits);
        match permits.get(route) {
            Some((n, semaphore)) if *n == concurrency => Arc::clone(semaphore),
            _ => {
                let semaphore = Arc::new(Semaphore::new(concurrency));
                permits.insert(route.to_string(), (concurrency, Arc::clone(&semaphore)));
                semaphore
            }
        }
    }
}

/// A delivery under way, counted while it lives (for [`Dispatcher::wait_idle`]).
struct Active<'d>(&'d Dispatcher);

impl<'d> Active<'d> {
    fn enter(dispatcher: &'d Dispatcher) -> Active<'d> {
        dispatcher.active.fetch_add(1, Ordering::SeqCst);
        Active(dispatcher)
    }
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Statuses that say "later": 408, 429 and every 5xx.
fn retryable(status: StatusCode) -> bool {
    status.is_server_error()
        || status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT
}

/// Full jitter over an exponential ceiling.
fn backoff(attempt: u32) -> Duration {
    let ceiling = BASE_BACKOFF
        .saturating_mul(1 << attempt.saturating_sub(1).min(16))
        .min(MAX_BACKOFF);
    let mut random = [0u8; 4];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut random);
    let fraction = f64::from(u32::from_be_bytes(random)) / f64::from(u32::MAX);
    ceiling.mul_f64(fraction.max(0.1))
}
