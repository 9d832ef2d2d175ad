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

use crate::balance::Balancer;
pub use pool::{SendError, UpstreamConn};

/// Live state of one backend address, shared by every snapshot that lists it.
#[derive(Debug)]
pub struct Backend {
    address: SocketAddr,
    /// The address as the config wrote it; used in logs.
    label: Box<str>,
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

    /// Requests currently sent to this backend whose response has not finished.
    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Relaxed)
    }

    /// Counts a request as in flight until the returned guard is dropped, which also happens when the
    /// client goes away mid-request (its future and response body are dropped).
    pub fn start_request(self: &Arc<Self>) -> InflightGuard {
        self.inflight.fetch_add(1, Ordering::Relaxed);
        InflightGuard {
            backend: Arc::clone(self),
        }
    }

    /// Idle pooled connections (for tests and the status endpoint).
    pub fn idle_connections(&self) -> usize {
        self.pool.idle_len()
    }
}

/// Holds one unit of a backend's in-flight count.
#[derive(Debug)]
pub struct InflightGuard {
    backend: Arc<Backend>,
}

impl InflightGuard {
    pub fn backend(&self) -> &Arc<Backend> {
        &self.backend
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.backend.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A backend as one snapshot sees it: live state plus this config's weight.
#[derive(Debug, Clone)]
pub struct Member {
    pub backend: Arc<Backend>,
    pub weight: u32,
}

/// A named group of backends and the way requests are spread over them.
#[derive(Debug)]
pub struct Upstream {
    pub name: Box<str>,
    pub members: Box<[Member]>,
    pub balancer: Balancer,
}

impl Upstream {
    /// Chooses the backend for the next request, or `None` when no backend is usable.
    pub fn pick(&self) -> Option<&Arc<Backend>> {
        self.balancer
            .pick(&self.members)
            .map(|i| &self.members[i].backend)
    }
}
