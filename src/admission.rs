//! Admission control: how many requests of a route (or an upstream) may be in flight to backends,
//! and what happens to the rest.
//!
//! A [`Limiter`] admits up to its limit at once; further requests wait in a FIFO (tokio's
//! semaphore is fair) of at most `max_queue`, for at most `queue_timeout`. A full queue or an
//! expired wait is shed at once with no upstream work done, with a `Retry-After` estimated from the
//! real state: the requests ahead divided by the measured throughput (limit / recent latency).
//!
//! Permits are taken just before a request goes upstream and held until its response has been
//! read, so writes merged by the coalescer (one upstream request for many clients) take one slot.
//!
//! **Adaptive limit** (`adaptive = true`), after TCP Vegas as used by Netflix's concurrency-limits:
//! each response's latency (request sent → response head) is a sample. `no_load` is the lowest
//! latency seen recently (re-measured every 1,000 samples, so it follows a backend that changed).
//! The queue a limit L builds at the backend is estimated as `L × (1 − no_load / latency)`: while
//! it is below `alpha = max(3, log10 L × 3)` and the limit is actually used, L grows by one; above
//! `beta = 2 × alpha`, L shrinks by one; the limit stays within `[min_inflight, max_inflight]`. A
//! backend that slows down once more than K requests are in flight thus holds the limit a few
//! above K. Updates take a lock per limiter, tried and skipped when busy, never waited for.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::AdmissionConfig;

/// Why a request was shed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShedReason {
    /// `max_queue` requests were already waiting.
    QueueFull,
    /// The request waited `queue_timeout`.
    QueueTimeout,
}

/// A shed request: nothing was sent upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shed {
    pub reason: ShedReason,
    pub limit: usize,
    pub max_queue: usize,
    pub retry_after: Duration,
    pub status: http::StatusCode,
}

/// Samples between re-measurements of the no-load latency.
const NO_LOAD_WINDOW: u32 = 1000;

#[derive(Debug)]
struct Vegas {
    no_load: Duration,
    next_no_load: Duration,
    samples: u32,
}

/// The admission limit of one route or upstream.
#[derive(Debug)]
pub struct Limiter {
    config: AdmissionConfig,
    semaphore: Arc<Semaphore>,
    /// The current limit (fixed, or moved by the adaptive algorithm).
    limit: AtomicUsize,
    /// Permits to retire as they come back, after the limit was lowered below what is in use.
    debt: AtomicUsize,
    queued: AtomicUsize,
    inflight: AtomicUsize,
    /// Requests shed so far, for `/status`.
    shed_total: AtomicU64,
    /// Recent response latency (exponential average), in microseconds.
    latency_us: AtomicU64,
    vegas: Mutex<Vegas>,
    admitted: metrics::Counter,
    queue_depth: metrics::Gauge,
    limit_gauge: metrics::Gauge,
    scope: &'static str,
    name: Box<str>,
}

impl Limiter {
    /// `scope` ("route" or "upstream") and `name` label its metrics.
    pub fn new(config: &AdmissionConfig, scope: &'static str, name: &str) -> Arc<Limiter> {
        let start = if config.adaptive {
            config.min_inflight.max(config.max_inflight / 4).max(1)
        } else {
            config.max_inflight
        };
        let limiter = Arc::new(Limiter {
            config: config.clone(),
            semaphore: Arc::new(Semaphore::new(start)),
            limit: AtomicUsize::new(start),
            debt: AtomicUsize::new(0),
            queued: AtomicUsize::new(0),
            inflight: AtomicUsize::new(0),
            shed_total: AtomicU64::new(0),
            latency_us: AtomicU64::new(0),
            vegas: Mutex::new(Vegas {
                no_load: Duration::MAX,
                next_no_load: Duration::MAX,
                samples: 0,
            }),
            admitted: metrics::counter!(crate::metrics::ADMISSION_ADMITTED, "scope" => scope, "name" => name.to_string()),
            queue_depth: metrics::gauge!(crate::metrics::ADMISSION_QUEUE_DEPTH, "scope" => scope, "name" => name.to_string()),
            limit_gauge: metrics::gauge!(crate::metrics::ADMISSION_LIMIT, "scope" => scope, "name" => name.to_string()),
            scope,
            name: name.into(),
        });
        limiter.limit_gauge.set(start as f64);
        limiter
    }

    /// The settings this limiter was built with.
    pub fn config(&self) -> &AdmissionConfig {
        &self.config
    }

    /// This limiter if it was built with `config`, otherwise a new one: a reload that leaves the
    /// settings alone keeps the in-flight count and the learned limit.
    pub fn reuse_or_new(
        previous: Option<&Arc<Limiter>>,
        config: &AdmissionConfig,
        scope: &'static str,
        name: &str,
    ) -> Arc<Limiter> {
        match previous {
            Some(limiter) if limiter.config == *config => Arc::clone(limiter),
            _ => Limiter::new(config, scope, name),
        }
    }

    /// The current limit.
    pub fn limit(&self) -> usize {
        self.limit.load(Ordering::Relaxed)
    }

    /// Requests waiting for a permit.
    /// Requests shed since this limiter was built.
    pub fn shed_total(&self) -> u64 {
        self.shed_total.load(Ordering::Relaxed)
    }

    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// Requests holding a permit.
    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Relaxed)
    }

    /// Waits for a permit, or sheds.
    pub async fn acquire(self: &Arc<Self>) -> Result<AdmissionPermit, Shed> {
        if let Ok(permit) = Arc::clone(&self.semaphore).try_acquire_owned() {
            return Ok(self.admitted(permit));
        }
        // fetch_add first, then check: concurrent arrivals cannot all slip past the bound.
        if self.queued.fetch_add(1, Ordering::Relaxed) >= self.config.max_queue {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            return Err(self.shed(ShedReason::QueueFull));
        }
        self.queue_depth.increment(1.0);
        // Counted out however the wait ends: a client that goes away drops this future mid-wait.
        let in_queue = InQueue(self);
        let waited = tokio::time::timeout(
            self.config.queue_timeout,
            Arc::clone(&self.semaphore).acquire_owned(),
        )
        .await;
        drop(in_queue);
        match waited {
            Ok(Ok(permit)) => Ok(self.admitted(permit)),
            // The semaphore is never closed; treat it like a timeout all the same.
            Ok(Err(_)) | Err(_) => Err(self.shed(ShedReason::QueueTimeout)),
        }
    }

    fn admitted(self: &Arc<Self>, permit: OwnedSemaphorePermit) -> AdmissionPermit {
        self.inflight.fetch_add(1, Ordering::Relaxed);
        self.admitted.increment(1);
        AdmissionPermit {
            limiter: Arc::clone(self),
            permit: Some(permit),
            sent: Instant::now(),
        }
    }

    fn shed(&self, reason: ShedReason) -> Shed {
        let label = match reason {
            ShedReason::QueueFull => "queue_full",
            ShedReason::QueueTimeout => "queue_timeout",
        };
        metrics::counter!(
            crate::metrics::ADMISSION_REJECTED,
            "scope" => self.scope,
            "name" => self.name.to_string(),
            "reason" => label
        )
        .increment(1);
        self.shed_total.fetch_add(1, Ordering::Relaxed);
        Shed {
            reason,
            limit: self.limit(),
            max_queue: self.config.max_queue,
            retry_after: self.retry_after(),
            status: self.config.shed_status,
        }
    }

    /// When the requests now waiting will have been served: queue / (limit / latency).
    pub fn retry_after(&self) -> Duration {
        let latency = Duration::from_micros(self.latency_us.load(Ordering::Relaxed))
            .max(Duration::from_millis(1));
        let ahead = self.queued() as u32 + 1;
        (latency * ahead / self.limit().max(1) as u32).max(Duration::from_secs(1))
    }

    /// Records a response latency (request sent → response head).
    fn sample(&self, latency: Duration) {
        let us = latency.as_micros() as u64;
        // EWMA with weight 1/8; the first sample sets it.
        let _ = self
            .latency_us
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
                Some(if old == 0 { us } else { old - old / 8 + us / 8 })
            });
        if self.config.adaptive {
            self.adapt(latency);
        }
    }

    fn adapt(&self, latency: Duration) {
        let Ok(mut vegas) = self.vegas.try_lock() else {
            return; // another response is updating the limit; this sample is not needed
        };
        vegas.samples += 1;
        vegas.next_no_load = vegas.next_no_load.min(latency);
        if vegas.samples >= NO_LOAD_WINDOW {
            vegas.no_load = vegas.next_no_load;
            vegas.next_no_load = Duration::MAX;
            vegas.samples = 0;
        }
        vegas.no_load = vegas.no_load.min(latency);
        let limit = self.limit();
        let ratio = vegas.no_load.as_secs_f64() / latency.as_secs_f64().max(1e-9);
        let queue = limit as f64 * (1.0 - ratio);
        let alpha = (3.0 * (limit as f64).log10()).max(3.0);
        let beta = 2.0 * alpha;
        // Grow only when the limit is really used: an idle route must not inflate it.
        let busy = self.inflight() + 1 >= limit / 2;
        if queue < alpha && busy && limit < self.config.max_inflight {
            self.set_limit(limit + 1);
        } else if queue > beta && limit > self.config.min_inflight {
            self.set_limit(limit - 1);
        }
    }

    fn set_limit(&self, new: usize) {
        let old = self.limit.swap(new, Ordering::Relaxed);
        self.limit_gauge.set(new as f64);
        if new > old {
            let mut add = new - old;
            // Cancel debt first: those permits are still out and will now stay.
            while add > 0 {
                let debt = self.debt.load(Ordering::Relaxed);
                if debt == 0 {
                    break;
                }
                if self
                    .debt
                    .compare_exchange(debt, debt - 1, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
                {
                    add -= 1;
                }
            }
            self.semaphore.add_permits(add);
        } else {
            let take = old - new;
            let forgotten = self.semaphore.forget_permits(take);
            self.debt.fetch_add(take - forgotten, Ordering::Relaxed);
        }
    }
}

/// One admitted request. Dropping it returns the slot (or retires it, if the limit was lowered).
#[derive(Debug)]
pub struct AdmissionPermit {
    limiter: Arc<Limiter>,
    permit: Option<OwnedSemaphorePermit>,
    sent: Instant,
}

impl AdmissionPermit {
    /// The response head arrived: its latency feeds the limiter.
    pub fn responded(&self) {
        self.limiter.sample(self.sent.elapsed());
    }
}

/// A request's place in a limiter's queue, given up when dropped.
struct InQueue<'a>(&'a Limiter);

impl Drop for InQueue<'_> {
    fn drop(&mut self) {
        self.0.queued.fetch_sub(1, Ordering::Relaxed);
        self.0.queue_depth.decrement(1.0);
    }
}

impl Drop for AdmissionPermit {
    fn drop(&mut self) {
        self.limiter.inflight.fetch_sub(1, Ordering::Relaxed);
        let Some(permit) = self.permit.take() else {
            return;
        };
        let retire = self
            .limiter
            .debt
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |d| d.checked_sub(1))
            .is_ok();
        if retire {
            permit.forget();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(max: usize, queue: usize, adaptive: bool) -> AdmissionConfig {
        AdmissionConfig {
            max_inflight: max,
            max_queue: queue,
            queue_timeout: Duration::from_millis(100),
            shed_status: http::StatusCode::SERVICE_UNAVAILABLE,
            adaptive,
            min_inflight: 1,
        }
    }

    #[tokio::test]
    async fn admits_up_to_the_limit_queues_then_sheds() {
        let limiter = Limiter::new(&config(2, 1, false), "route", "t");
        let a = limiter.acquire().await.unwrap();
        let _b = limiter.acquire().await.unwrap();
        let waiting = tokio::spawn({
            let l = Arc::clone(&limiter);
            async move { l.acquire().await }
        });
        while limiter.queued() == 0 {
            tokio::task::yield_now().await;
        }
        let full = limiter.acquire().await.unwrap_err();
        assert_eq!(full.reason, ShedReason::QueueFull);
        assert!(full.retry_after >= Duration::from_secs(1));
        drop(a);
        let _queued = waiting
            .await
            .unwrap()
            .expect("the queued request got the freed slot");
        let late = limiter.acquire().await.unwrap_err();
        assert_eq!(late.reason, ShedReason::QueueTimeout);
    }

    #[tokio::test]
    async fn a_wait_abandoned_mid_queue_gives_its_place_back() {
        let limiter = Limiter::new(&config(1, 1, false), "route", "t");
        let _held = limiter.acquire().await.unwrap();
        {
            let mut waiting = std::pin::pin!(limiter.acquire());
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            assert!(std::future::Future::poll(waiting.as_mut(), &mut cx).is_pending());
            assert_eq!(limiter.queued(), 1);
        }
        assert_eq!(
            limiter.queued(),
            0,
            "the dropped wait still counts as queued"
        );
        // The queue (of one) has room again: a wait is timed out, not refused as full.
        let late = limiter.acquire().await.unwrap_err();
        assert_eq!(late.reason, ShedReason::QueueTimeout);
    }

    #[tokio::test]
    async fn lowering_the_limit_retires_permits_as_they_return() {
        let limiter = Limiter::new(&config(4, 0, false), "route", "t");
        let held: Vec<_> = futures_all(&limiter, 4).await;
        limiter.set_limit(2);
        drop(held);
        let again: Vec<_> = futures_all(&limiter, 2).await;
        assert!(limiter.acquire().await.is_err(), "only 2 slots remain");
        drop(again);
        limiter.set_limit(3);
        assert_eq!(futures_all(&limiter, 3).await.len(), 3);
    }

    async fn futures_all(limiter: &Arc<Limiter>, n: usize) -> Vec<AdmissionPermit> {
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(limiter.acquire().await.unwrap());
        }
        out
    }
}
