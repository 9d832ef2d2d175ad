//! The runtime snapshot: everything a request reads, built once per config.
//!
//! A request loads the current [`Snapshot`] once, at its start, and uses it to the end, so a reload
//! never changes the rules under a request in flight. Building a snapshot reuses the live
//! [`Backend`] state of the previous one for every unchanged address: in-flight counts and pooled
//! connections survive a reload. An upstream's discovered backends ([`Discovered`]) are part of
//! the snapshot too: a reload keeps them while the upstream's `discovery` stays the same, and a
//! changed DNS answer builds the next snapshot from the same config (see [`Snapshot::rediscovered`]).

use std::collections::HashMap;
use std::sync::Arc;

use crate::admission::Limiter;
use crate::balance::Balancer;
use crate::buffer::Buffer;
use crate::cluster::Cluster;
use crate::coalesce::Coalescer;
use crate::config::{BufferConfig, CoalesceMode, Config, IdempotencyStore, UpstreamConfig};
use crate::discovery::{Discovered, Update, CLUSTER_PEERS};
use crate::idempotency::{store, Store};
use crate::metrics::RouteMetrics;
use crate::route::{Route, Router};
use crate::upstream::{Backend, Member, Upstream};

/// Immutable runtime state derived from one [`Config`].
#[derive(Debug)]
pub struct Snapshot {
    pub config: Arc<Config>,
    pub router: Router,
    pub upstreams: Box<[Upstream]>,
    /// Counters for requests that matched no route (labelled `route="-"`).
    pub unrouted: RouteMetrics,
    /// The discovered backends of each upstream with `discovery`, by upstream name (and the
    /// cluster's peers under [`CLUSTER_PEERS`]).
    pub discovered: HashMap<Box<str>, Discovered>,
    /// `[cluster]`: who owns which key among the replicas.
    pub cluster: Option<Cluster>,
}

impl Snapshot {
    /// Builds the snapshot for `config`, taking over live backend state from `previous`, and
    /// the discovered backends of upstreams whose `discovery` did not change.
    pub fn build(config: Arc<Config>, previous: Option<&Snapshot>) -> Snapshot {
        let mut discovered = HashMap::new();
        let upstreams = config
            .upstreams
            .iter()
            .filter_map(|u| Some((u.name.as_str(), u.discovery.as_ref()?)));
        let peers = config.cluster.as_ref().and_then(|c| c.discovery.as_ref());
        for (name, wanted) in upstreams.chain(peers.map(|d| (CLUSTER_PEERS, d))) {
            let kept = previous
                .and_then(|p| p.discovered.get(name))
                .filter(|d| d.config == *wanted)
                .cloned();
            let fresh = || Discovered::unresolved(wanted);
            discovered.insert(name.into(), kept.unwrap_or_else(fresh));
        }
        Snapshot::build_with(config, previous, discovered)
    }

    /// The next snapshot after a discovery `update`: same config, one upstream's set changed.
    /// `None` when the update is stale (a reload changed or removed that upstream's discovery).
    pub fn rediscovered(&self, update: Update) -> Option<Snapshot> {
        let current = self.discovered.get(&update.upstream)?;
        if current.config != update.config {
            return None;
        }
        let mut discovered = self.discovered.clone();
        let changed = Discovered {
            found: update.found,
            ..current.clone()
        };
        discovered.insert(update.upstream, changed);
        Some(Snapshot::build_with(
            Arc::clone(&self.config),
            Some(self),
            discovered,
        ))
    }

    /// Builds the snapshot for `config` with these discovered sets.
    pub fn build_with(
        config: Arc<Config>,
        previous: Option<&Snapshot>,
        discovered: HashMap<Box<str>, Discovered>,
    ) -> Snapshot {
        // Live state is kept per address as written: "https://a:443" and "a:443" are different.
        let mut live: HashMap<String, Arc<Backend>> = previous
            .map(|p| {
                p.backends()
                    .map(|b| (b.label().to_string(), Arc::clone(b)))
                    .collect()
            })
            .unwrap_or_default();
        let previous_upstreams: HashMap<&str, &Upstream> = previous
            .map(|p| p.upstreams.iter().map(|u| (&*u.name, u)).collect())
            .unwrap_or_default();
        let upstreams = config
            .upstreams
            .iter()
            .zip(&config.upstream_tls)
            .map(|(u, tls)| {
                let found = discovered
                    .get(u.name.as_str())
                    .map(|d| d.backends(u))
                    .unwrap_or_default();
                // A backend DNS adds to a running proxy waits for its health checks to pass.
                let probation = previous.is_some() && u.health_check.is_some();
                let statics = u.backends.iter().filter(|b| !b.down).map(|b| (b, false));
                let members: Box<[Member]> = statics
                    .chain(found.iter().map(|b| (b, probation)))
                    .map(|(b, probation)| {
                        let backend = live.entry(b.label.clone()).or_insert_with(|| {
                            let tls = tls.clone().zip(
                                b.tls_name
                                    .clone()
                                    .and_then(|n| rustls_pki_types::ServerName::try_from(n).ok()),
                            );
                            let backend = Backend::with_tls(b.address, &b.label, tls);
                            backend.health.set_actively_down(probation);
                            Arc::new(backend)
                        });
                        let mut member = Member::new(Arc::clone(backend), b.weight.get(), &u.name);
                        member.max_inflight = b.max_inflight;
                        member
                    })
                    .collect();
                let balancer = Balancer::new(u, &members);
                let before = previous_upstreams.get(u.name.as_str());
                let inflight = before.map_or_else(Arc::default, |b| Arc::clone(&b.inflight));
                let mut upstream = Upstream::new(&u.name, members, balancer, inflight);
                upstream.outlier = u.outlier.clone();
                upstream.admission = u
                    .admission
                    .as_ref()
                    .map(|a| Limiter::new(a, "upstream", &u.name));
                upstream
            })
            .collect();
        // Queues are kept by route name, so writes waiting on a key keep their order across reloads.
        let previous_routes: HashMap<&str, &Route> = previous
            .map(|p| p.router.routes().iter().map(|r| (&*r.name, r)).collect())
            .unwrap_or_default();
        let mut stores = IdempotencyStores::carried_from(previous);
        let mut buffers = Buffers::carried_from(previous);
        let routes = config
            .routes
            .iter()
            .map(|r| {
                let store = r.idempotency.as_ref().map(|i| stores.get(&i.store));
                let buffer = r.buffer.as_ref().map(|b| buffers.get(b));
                let before = previous_routes.get(r.name.as_str());
                let coalescer = (r.coalesce.mode != CoalesceMode::Off).then(|| {
                    before
                        .and_then(|b| b.coalescer.clone())
                        .unwrap_or_else(|| Coalescer::new(&r.name))
                });
                let admission = r.admission.as_ref().map(|a| {
                    Limiter::reuse_or_new(
                        before.and_then(|b| b.admission.as_ref()),
                        a,
                        "route",
                        &r.name,
                    )
                });
                Route::new(r, coalescer, admission, store, buffer)
            })
            .collect();
        let router = Router::new(routes);
        let cluster = config.cluster.as_ref().map(|c| {
            let found = discovered
                .get(CLUSTER_PEERS)
                .map(|d| d.beside(&c.peers, None))
                .unwrap_or_default();
            let listeners: Vec<_> = config.listeners.iter().map(|l| l.listen).collect();
            let before = previous.and_then(|p| p.cluster.as_ref());
            Cluster::build(c, config.cluster_tls.clone(), found, &listeners, before)
        });
        Snapshot {
            config,
            router,
            upstreams,
            unrouted: RouteMetrics::new("-"),
            discovered,
            cluster,
        }
    }

    /// Every idempotency store in use, once each.
    pub fn idempotency_stores(&self) -> Vec<Arc<dyn Store>> {
        let mut stores: Vec<Arc<dyn Store>> = Vec::new();
        for route in self.router.routes() {
            if let Some(policy) = &route.idempotency {
                if !stores.iter().any(|s| Arc::ptr_eq(s, &policy.store)) {
                    stores.push(Arc::clone(&policy.store));
                }
            }
        }
        stores
    }

    /// Every open buffer, once each.
    pub fn buffers(&self) -> Vec<Arc<Buffer>> {
        let mut open: Vec<Arc<Buffer>> = Vec::new();
        for route in self.router.routes() {
            if let Some(Ok(buffer)) = route.buffer.as_ref().map(|b| &b.buffer) {
                if !open.iter().any(|b| Arc::ptr_eq(b, buffer)) {
                    open.push(Arc::clone(buffer));
                }
            }
        }
        open
    }

    /// The backends of `upstream` as this snapshot has them: static ones first, then discovered.
    pub fn backend_configs(&self, upstream: &UpstreamConfig) -> Vec<crate::config::BackendConfig> {
        let mut all = upstream.backends.clone();
        if let Some(d) = self.discovered.get(upstream.name.as_str()) {
            all.extend(d.backends(upstream));
        }
        all
    }

    /// Every backend of every upstream (an address listed in two upstreams appears twice).
    pub fn backends(&self) -> impl Iterator<Item = &Arc<Backend>> {
        self.upstreams
            .iter()
            .flat_map(|u| u.members.iter().map(|m| &m.backend))
    }
}

/// Idempotency stores by what they are (kind and place): routes that name the same store share
/// it, and a reload keeps an open store (its file lock, its Redis connection) instead of reopening.
struct IdempotencyStores(HashMap<IdempotencyStore, Arc<dyn Store>>);

impl IdempotencyStores {
    fn carried_from(previous: Option<&Snapshot>) -> IdempotencyStores {
        let mut open = HashMap::new();
        for route in previous.iter().flat_map(|p| p.router.routes()) {
            // A store that failed to open is opened again: the fault may be mended by now.
            if let Some(policy) = route
                .idempotency
                .as_ref()
                .filter(|p| p.store.label() != "broken")
            {
                open.entry(policy.config.store.clone())
                    .or_insert_with(|| Arc::clone(&policy.store));
            }
        }
        IdempotencyStores(open)
    }

    fn get(&mut self, config: &IdempotencyStore) -> Arc<dyn Store> {
        Arc::clone(
            self.0
                .entry(config.clone())
                .or_insert_with(|| store::open(config)),
        )
    }
}

/// Buffers by store: routes naming one directory (or one broker and queue name) share it, and a
/// reload keeps an open store (its file lock or connection, its delivery) instead of reopening it.
struct Buffers(HashMap<String, Arc<Buffer>>);

impl Buffers {
    fn carried_from(previous: Option<&Snapshot>) -> Buffers {
        let open = previous
            .iter()
            .flat_map(|p| p.router.routes())
            .filter_map(|r| r.buffer.as_ref())
            .filter_map(|b| Some((b.config.store.id(), Arc::clone(b.buffer.as_ref().ok()?))))
            .collect();
        Buffers(open)
    }

    fn get(&mut self, config: &BufferConfig) -> Result<Arc<Buffer>, String> {
        let id = config.store.id();
        if let Some(open) = self.0.get(&id) {
            return Ok(Arc::clone(open));
        }
        let opened = Buffer::open(config).inspect_err(|reason| {
            tracing::error!(store = %id, error = %reason, "buffer store cannot be opened; its routes answer writes with 503");
        })?;
        self.0.insert(id, Arc::clone(&opened));
        Ok(opened)
    }
}
