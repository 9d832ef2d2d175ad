//! Upstreams and their backends.
//!
//! A [`Backend`] is the live state of one backend address: its in-flight count and its pool of
//! keep-alive connections. It lives in an `Arc` that a new config snapshot takes over from the old
//! one when the address is unchanged, so a reload keeps counts and warm connections. An [`Upstream`]
//! is per snapshot: a named set of backends with their configured weights and a balancer.

mod pool;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::Arc;

use metrics::Counter;

use crate::balance::Balancer;
pub use pool::{SendError, UpstreamConn};

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
}

impl Backend {
    pub fn new(address: SocketAddr, label: &str) -> Backend {
        Backend {
            address,
            label: label.into(),
            inflight: AtomicUsize::new(0),
            smooth_weight: AtomicI64::new(0),
            pool: pool::Pool::default(),
        }
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
}

impl InflightGuard {
    pub fn backend(&self) -> &Arc<Backend> {
        &self.backend
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.backend.inflight.fetch_sub(1, Ordering::Relaxed);
        self.upstream.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A backend as one snapshot sees it: live state plus this config's weight and counters.
#[derive(Debug, Clone)]
pub struct Member {
    pub backend: Arc<Backend>,
    pub weight: u32,
    picks: Counter,
}

impl Member {
    pub fn new(backend: Arc<Backend>, weight: u32, upstream: &str) -> Member {
        let picks = metrics::counter!(
            crate::metrics::BACKEND_PICKS,
            "upstream" => upstream.to_string(),
            "backend" => backend.label().to_string()
        );
        Member {
            backend,
            weight,
            picks,
        }
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
            spills,
        }
    }

    /// Chooses the backend for the next request (by `key` on a consistent-hash upstream) and counts
    /// it as in flight; `None` when no backend is usable.
    pub fn pick(&self, key: Option<&[u8]>) -> Option<(&Member, InflightGuard)> {
        let pick = self
            .balancer
            .pick(&self.members, key, self.inflight.load(Ordering::Relaxed))?;
        let member = &self.members[pick.member];
        member.picks.increment(1);
        if pick.spilled {
            self.spills.increment(1);
        }
        Some((member, self.start_on(pick.member)))
    }

    /// Counts a request on member `index` as in flight until the guard drops.
    pub fn start_on(&self, index: usize) -> InflightGuard {
        let backend = &self.members[index].backend;
        backend.inflight.fetch_add(1, Ordering::Relaxed);
        self.inflight.fetch_add(1, Ordering::Relaxed);
        InflightGuard {
            backend: Arc::clone(backend),
            upstream: Arc::clone(&self.inflight),
        }
    }
}
