//! Backend health: passive outlier detection and the verdict of active checks.
//!
//! Both live in the backend's shared state, so they survive reloads and are seen by every upstream
//! that lists the backend. A backend is *usable* when no active check holds it down and it is not
//! ejected.
//!
//! Passive (in the manner of Envoy's outlier detection): every finished exchange reports success
//! or failure (a connect failure, a reset, a timeout or a 5xx). `consecutive_failures` failures in
//! a row eject the backend for `base_ejection_time × 2^(n−1)` on its n-th ejection, capped at
//! `max_ejection_time`; no more than `max_ejection_percent` of an upstream is ejected at once
//! (though one backend always may be). When the time is up the backend is back on probation: one
//! more failure before a success ejects it again, for twice as long. A success clears the streak,
//! and after a full `max_ejection_time` without ejection the doubling starts over.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use crate::config::OutlierConfig;

/// Milliseconds on a monotonic clock local to this process.
pub fn clock_ms() -> u64 {
    ms_at(Instant::now())
}

/// [`clock_ms`] at `instant`, for a caller that has just read the clock anyway (each read costs
/// tens of nanoseconds, and a request would otherwise read it a dozen times).
pub fn ms_at(instant: Instant) -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = *START.get_or_init(|| instant);
    instant.saturating_duration_since(start).as_millis() as u64
}

/// Health state of one backend.
#[derive(Debug, Default)]
pub struct Health {
    consecutive_failures: AtomicU32,
    /// While `clock_ms()` is below this, the backend is ejected (0: never ejected).
    ejected_until_ms: AtomicU64,
    /// Ejections since the doubling last started over.
    ejections: AtomicU32,
    /// Set after an ejection ends, until the next success: one failure ejects again.
    on_probation: AtomicBool,
    /// Held down by active health checks.
    actively_down: AtomicBool,
    /// Unix time (ms) of the last change between usable and not (0: none yet).
    changed_at_unix_ms: AtomicU64,
    /// Why the last failed active check failed, for `/status`.
    last_check_failure: Mutex<Option<String>>,
}

/// How an exchange with a backend went, for outlier detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Failure,
}

impl Health {
    /// Usable for new requests at `now_ms`.
    pub fn usable(&self, now_ms: u64) -> bool {
        !self.actively_down.load(Ordering::Relaxed) && !self.is_ejected(now_ms)
    }

    pub fn is_ejected(&self, now_ms: u64) -> bool {
        now_ms < self.ejected_until_ms.load(Ordering::Relaxed)
    }

    /// Records an exchange. Returns `Some(ejection time)` when this failure calls for an ejection;
    /// the caller decides (against `max_ejection_percent`) and then calls [`Health::eject`].
    pub fn record(
        &self,
        outcome: Outcome,
        config: &OutlierConfig,
        now_ms: u64,
    ) -> Option<Duration> {
        match outcome {
            Outcome::Success => {
                self.consecutive_failures.store(0, Ordering::Relaxed);
                self.on_probation.store(false, Ordering::Relaxed);
                None
            }
            Outcome::Failure => {
                if self.is_ejected(now_ms) {
                    return None;
                }
                let failures = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
                let probation = self.on_probation.load(Ordering::Relaxed);
                (failures >= config.consecutive_failures || probation)
                    .then(|| self.next_ejection(config, now_ms))
            }
        }
    }

    fn next_ejection(&self, config: &OutlierConfig, now_ms: u64) -> Duration {
        let last_end = self.ejected_until_ms.load(Ordering::Relaxed);
        let quiet = now_ms.saturating_sub(last_end);
        let repeats = if last_end == 0 || quiet >= config.max_ejection_time.as_millis() as u64 {
            0
        } else {
            self.ejections.load(Ordering::Relaxed)
        };
        config
            .base_ejection_time
            .saturating_mul(1u32 << repeats.min(16))
            .min(config.max_ejection_time)
    }

    /// Ejects the backend for `duration` from `now_ms`.
    pub fn eject(&self, duration: Duration, config: &OutlierConfig, now_ms: u64) {
        let last_end = self.ejected_until_ms.load(Ordering::Relaxed);
        let fresh = last_end == 0
            || now_ms.saturating_sub(last_end) >= config.max_ejection_time.as_millis() as u64;
        if fresh {
            self.ejections.store(1, Ordering::Relaxed);
        } else {
            self.ejections.fetch_add(1, Ordering::Relaxed);
        }
        self.ejected_until_ms
            .store(now_ms + duration.as_millis() as u64, Ordering::Relaxed);
        self.consecutive_failures.store(0, Ordering::Relaxed);
        self.on_probation.store(true, Ordering::Relaxed);
        self.mark_changed();
    }

    /// Sets the active health checks' verdict.
    pub fn set_actively_down(&self, down: bool) {
        if self.actively_down.swap(down, Ordering::Relaxed) != down {
            self.mark_changed();
        }
    }

    /// Notes why an active check failed (kept after the backend recovers, as the last failure).
    pub fn check_failed(&self, reason: String) {
        *self
            .last_check_failure
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(reason);
    }

    pub fn last_check_failure(&self) -> Option<String> {
        self.last_check_failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Unix time in seconds of the last change between usable and not, if there was one.
    pub fn last_change(&self) -> Option<f64> {
        let ms = self.changed_at_unix_ms.load(Ordering::Relaxed);
        (ms > 0).then(|| ms as f64 / 1000.0)
    }

    fn mark_changed(&self) {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        self.changed_at_unix_ms.store(now, Ordering::Relaxed);
    }

    pub fn actively_down(&self) -> bool {
        self.actively_down.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> OutlierConfig {
        OutlierConfig {
            consecutive_failures: 3,
            base_ejection_time: Duration::from_secs(10),
            max_ejection_time: Duration::from_secs(60),
            max_ejection_percent: 50,
        }
    }

    #[test]
    fn consecutive_failures_eject_and_times_double_then_cap() {
        let (h, c) = (Health::default(), config());
        assert_eq!(h.record(Outcome::Failure, &c, 0), None);
        assert_eq!(h.record(Outcome::Failure, &c, 0), None);
        let first = h.record(Outcome::Failure, &c, 0).unwrap();
        assert_eq!(first, Duration::from_secs(10));
        h.eject(first, &c, 0);
        assert!(!h.usable(5_000));
        assert!(h.usable(10_000), "back after the ejection time");
        // On probation: one failure ejects again, for twice as long.
        let second = h.record(Outcome::Failure, &c, 10_000).unwrap();
        assert_eq!(second, Duration::from_secs(20));
        h.eject(second, &c, 10_000);
        let third = h.record(Outcome::Failure, &c, 30_000).unwrap();
        assert_eq!(third, Duration::from_secs(40));
        h.eject(third, &c, 30_000);
        let fourth = h.record(Outcome::Failure, &c, 70_000).unwrap();
        assert_eq!(
            fourth,
            Duration::from_secs(60),
            "capped at max_ejection_time"
        );
    }

    #[test]
    fn a_success_clears_the_streak_and_probation() {
        let (h, c) = (Health::default(), config());
        h.record(Outcome::Failure, &c, 0);
        h.record(Outcome::Failure, &c, 0);
        h.record(Outcome::Success, &c, 0);
        assert_eq!(
            h.record(Outcome::Failure, &c, 0),
            None,
            "the streak started over"
        );
        assert_eq!(h.record(Outcome::Failure, &c, 0), None);
        assert!(
            h.record(Outcome::Failure, &c, 0).is_some(),
            "three in a row eject"
        );
        h.eject(Duration::from_secs(10), &c, 0);
        h.record(Outcome::Success, &c, 10_000);
        assert_eq!(
            h.record(Outcome::Failure, &c, 10_000),
            None,
            "probation ended with the success"
        );
    }

    #[test]
    fn a_long_quiet_spell_restarts_the_doubling() {
        let (h, c) = (Health::default(), config());
        for _ in 0..3 {
            h.record(Outcome::Failure, &c, 0);
        }
        h.eject(Duration::from_secs(10), &c, 0);
        h.record(Outcome::Success, &c, 10_000);
        for _ in 0..2 {
            h.record(Outcome::Failure, &c, 200_000);
        }
        assert_eq!(
            h.record(Outcome::Failure, &c, 200_000),
            Some(Duration::from_secs(10))
        );
    }
}
