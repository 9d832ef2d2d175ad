//! Upstreams and their backends.
//!
//! A [`Backend`] is the live state of one backend address: its in-flight count and its pool of
//! keep-alive connections. It lives in an `Arc` that a new config snapshot takes over from the old
//! one when the address is unchanged, so a reload keeps counts and warm connections. An [`Upstream`]
//! is per snapshot: a named set of backends with their configured weights and a balancer.

pub mod checks;
pub mod health;
mod pool;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use metrics::Counter;

use crate::admission::Limiter;
use crate::balance::{Balancer, Candidate, KeyHash};
use crate::config::OutlierConfig;
use crate::http1::Http1Error;
use crate::metrics::BackendMetrics;
pub use health::{clock_ms, ms_at, Health, Outcome};
pub use pool::{SendError, SendFailure, UpstreamConn};

/// Live state of one backend address, shared by every snapshot that lists it.
#[derive(Debug)]
pub struct Backend {
    address: SocketAddr,
    /// The address as the config wrote it; used in logs.
    label: Arc<str>,
    inflight: AtomicUsize,
    /// Running score for smooth weighted round-robin among equally loaded backends.
    pub(crate) smooth_weight: AtomicI64,
    pool: pool::Pool,
    pub health: Health,
    /// For `https://` backends: the client config and the name for SNI and verification.
    tls: Option<(
        Arc<rustls::ClientConfig>,
        rustls_pki_types::ServerName<'static>,
    )>,
    /// New connections opened to this backend (reuse = 1 − connections / requests).
    connections_opened: Counter,
    /// Exchanges since the backend first appeared, and those that failed (no response, or a
    /// 5xx), for `/status`: live state, carried across reloads.
    exchanges: AtomicU64,
    failed_exchanges: AtomicU64,
}

impl Backend {
    pub fn new(address: SocketAddr, label: &str) -> Backend {
        Backend::with_tls(address, label, None)
    }

    pub fn with_tls(
        address: SocketAddr,
        label: &str,
        tls: Option<(
            Arc<rustls::ClientConfig>,
            rustls_pki_types::ServerName<'static>,
        )>,
    ) -> Backend {
        Backend {
            connections_opened: metrics::counter!(crate::metrics::UPSTREAM_CONNECTIONS, "backend" => label.to_string()),
            tls,
            address,
            label: label.into(),
            inflight: AtomicUsize::new(0),
            smooth_weight: AtomicI64::new(0),
            pool: pool::Pool::default(),
            health: Health::default(),
            exchanges: AtomicU64::new(0),
            failed_exchanges: AtomicU64::new(0),
        }
    }

    /// Counts one exchange, and whether it failed (no response, or a 5xx).
    pub fn count_exchange(&self, failed: bool) {
        self.exchanges.fetch_add(1, Ordering::Relaxed);
        if failed {
            self.failed_exchanges.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Exchanges so far, and how many of them failed.
    pub fn exchange_counts(&self) -> (u64, u64) {
        (
            self.exchanges.load(Ordering::Relaxed),
            self.failed_exchanges.load(Ordering::Relaxed),
        )
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    /// The label as a shared string, for responses that outlive the request.
    pub fn shared_label(&self) -> Arc<str> {
        Arc::clone(&self.label)
    }

    /// Requests currently sent to this backend whose response has not finished.
    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Relaxed)
    }

    /// Idle pooled connections (for tests and the status endpoint).
    pub fn idle_connections(&self) -> usize {
        self.pool.idle_len()
    }
}

/// Holds one unit of a backend's and its upstream's in-flight counts. Dropping it (also when the
/// client goes away mid-request, with its future and response body) gives them back.
#[derive(Debug)]
pub struct InflightGuard {
    backend: Arc<Backend>,
    upstream: Arc<AtomicUsize>,
    metrics: Arc<BackendMetrics>,
}

impl InflightGuard {
    pub fn backend(&self) -> &Arc<Backend> {
        &self.backend
    }

    pub fn upstream_name(&self) -> &str {
        &self.metrics.upstream
    }

    /// A response body broke off: logged, and counted when the backend went silent.
    pub fn body_failed(&self, error: &Http1Error) {
        if matches!(error, Http1Error::Stalled(_)) {
            self.metrics.stalls.increment(1);
        }
        tracing::warn!(
            upstream = &*self.metrics.upstream,
            backend = self.backend.label(),
            error = %error,
            "backend response body broke off; closing its connection and the client's"
        );
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.backend.inflight.fetch_sub(1, Ordering::Relaxed);
        self.upstream.fetch_sub(1, Ordering::Relaxed);
        self.metrics.inflight.decrement(1.0);
    }
}

/// A backend as one snapshot sees it: live state plus this config's weight, limit and counters.
#[derive(Debug, Clone)]
pub struct Member {
    pub backend: Arc<Backend>,
    pub weight: u32,
    /// Most requests in flight to this backend (`max_inflight`); `None` is unlimited.
    pub max_inflight: Option<usize>,
    picks: Counter,
    ejections: Counter,
    pub metrics: Arc<BackendMetrics>,
}

impl Member {
    pub fn new(backend: Arc<Backend>, weight: u32, upstream: &str) -> Member {
        let labels = [
            ("upstream", upstream.to_string()),
            ("backend", backend.label().to_string()),
        ];
        Member {
            picks: metrics::counter!(crate::metrics::BACKEND_PICKS, &labels),
            ejections: metrics::counter!(crate::metrics::BACKEND_EJECTIONS, &labels),
            metrics: Arc::new(BackendMetrics::new(upstream, backend.label())),
            backend,
            weight,
            max_inflight: None,
        }
    }

    /// Takes new requests now: healthy, not ejected, below its own limit.
    pub fn usable(&self, now_ms: u64) -> bool {
        self.backend.health.usable(now_ms)
            && self
                .max_inflight
                .is_none_or(|max| self.backend.inflight() < max)
    }
}

impl Candidate for Member {
    fn label(&self) -> &str {
        self.backend.label()
    }

    fn weight(&self) -> u32 {
        self.weight
    }

    fn inflight(&self) -> usize {
        self.backend.inflight()
    }

    fn smooth_weight(&self) -> &AtomicI64 {
        &self.backend.smooth_weight
    }
}

/// A named group of backends and the way requests are spread over them.
#[derive(Debug)]
pub struct Upstream {
    pub name: Box<str>,
    pub members: Box<[Member]>,
    pub balancer: Balancer,
    /// Requests of this upstream in flight; carried across reloads like backend state.
    pub inflight: Arc<AtomicUsize>,
    pub outlier: OutlierConfig,
    pub admission: Option<Arc<Limiter>>,
    spills: Counter,
}

impl Upstream {
    pub fn new(
        name: &str,
        members: Box<[Member]>,
        balancer: Balancer,
        inflight: Arc<AtomicUsize>,
    ) -> Upstream {
        let spills = metrics::counter!(crate::metrics::HASH_SPILLS, "upstream" => name.to_string());
        Upstream {
            name: name.into(),
            members,
            balancer,
            inflight,
            outlier: OutlierConfig::default(),
            admission: None,
            spills,
        }
    }

    /// Chooses a usable backend for the next request (by `key` on a consistent-hash upstream),
    /// avoiding the members in `tried`, and counts it as in flight; `None` when no backend is
    /// usable. Returns the member's index. `now` is [`clock_ms`] as the caller last read it.
    pub fn pick(
        &self,
        key: Option<KeyHash>,
        tried: &[usize],
        now: u64,
    ) -> Option<(usize, &Member, InflightGuard)> {
        let usable = |m: usize| !tried.contains(&m) && self.members[m].usable(now);
        let pick = self.balancer.pick(
            &self.members,
            key,
            self.inflight.load(Ordering::Relaxed),
            usable,
        )?;
        let member = &self.members[pick.member];
        member.picks.increment(1);
        if pick.spilled {
            self.spills.increment(1);
        }
        Some((pick.member, member, self.start_on(pick.member)))
    }

    /// Records how an exchange with member `index` went, ejecting it when outlier detection says
    /// so and `max_ejection_percent` allows. `now` is [`clock_ms`] as the caller last read it.
    pub fn record(&self, index: usize, outcome: Outcome, now: u64) {
        if self.outlier.consecutive_failures == 0 {
            return;
        }
        let member = &self.members[index];
        let Some(duration) = member.backend.health.record(outcome, &self.outlier, now) else {
            return;
        };
        let ejected = self
            .members
            .iter()
            .filter(|m| m.backend.health.is_ejected(now))
            .count();
        let allowed =
            (self.members.len() * self.outlier.max_ejection_percent as usize / 100).max(1);
        if ejected >= allowed {
            tracing::warn!(
                upstream = &*self.name,
                backend = member.backend.label(),
                "backend keeps failing but max_ejection_percent is reached; not ejecting"
            );
            return;
        }
        member.backend.health.eject(duration, &self.outlier, now);
        member.ejections.increment(1);
        tracing::warn!(
            upstream = &*self.name,
            backend = member.backend.label(),
            seconds = duration.as_secs_f64(),
            "backend ejected after consecutive failures"
        );
    }

    /// True when at least one backend takes requests now.
    pub fn has_usable_backend(&self) -> bool {
        let now = clock_ms();
        self.members.iter().any(|m| m.backend.health.usable(now))
    }

    /// Counts a request on member `index` as in flight until the guard drops.
    pub fn start_on(&self, index: usize) -> InflightGuard {
        let member = &self.members[index];
        member.backend.inflight.fetch_add(1, Ordering::Relaxed);
        self.inflight.fetch_add(1, Ordering::Relaxed);
        member.metrics.inflight.increment(1.0);
        InflightGuard {
            backend: Arc::clone(&member.backend),
            upstream: Arc::clone(&self.inflight),
            metrics: Arc::clone(&member.metrics),
        }
    }
}
