//! Balancing: choosing a backend of an upstream for one request.
//!
//! A [`Balancer`] is built once per config snapshot and read without locks; at pick time it only
//! reads live in-flight counts. The algorithms:
//! - `least_conn` ([`least_conn`]): fewest in flight relative to weight.
//! - `consistent_hash`: the request key decides, through a [`rendezvous`] table (default) or an
//!   nginx-compatible [`ketama`] ring.
//!
//! Bounded loads (Mirrokni, Thorup and Zadimoghaddam, "Consistent Hashing with Bounded Loads";
//! HAProxy's `hash-balance-factor`) wrap the hash: with factor c, a backend of weight w may hold at
//! most ceil(c × (in-flight of the upstream + 1) × w / total weight) requests, this one included.
//! A key whose backend is full goes to the next backend of its own fixed order, so a hot key spills
//! over predictably and returns as soon as its backend has room again. If every backend is full
//! (possible only with c < 1, which the config refuses) the key's own backend is used.

pub mod ketama;
mod least_conn;
pub mod rendezvous;

use crate::config::{HashAlgorithm, UpstreamConfig};

/// What balancing needs to know of a backend. `upstream::Member` is one; balancing sits below
/// the upstream module and never names it.
pub trait Candidate {
    /// The backend's address as configured: what consistent hashing hashes.
    fn label(&self) -> &str;
    fn weight(&self) -> u32;
    /// Requests in flight to the backend now.
    fn inflight(&self) -> usize;
    /// The backend's running score for smooth weighted round-robin among equals.
    fn smooth_weight(&self) -> &std::sync::atomic::AtomicI64;
}

/// The selection algorithm of one upstream.
#[derive(Debug)]
pub enum Balancer {
    LeastConn,
    ConsistentHash {
        table: HashTable,
        /// `hash_balance_factor`; `None` disables bounded loads.
        balance_factor: Option<f64>,
        /// `hash_balance_min_inflight`: below it, a backend is never full.
        min_inflight: usize,
        /// Sum of the members' weights, for bounded loads.
        total_weight: u64,
    },
}

/// The key → backend structure of a consistent-hash upstream.
#[derive(Debug)]
pub enum HashTable {
    Rendezvous(rendezvous::Table),
    Ketama(ketama::Ring),
}

/// A chosen backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pick {
    /// Index into the upstream's members.
    pub member: usize,
    /// True when the key's own backend was passed over because it was full.
    pub spilled: bool,
}

impl Balancer {
    /// Builds the balancer for `members` (the usable backends of `config`, in that order).
    pub fn new<C: Candidate>(config: &UpstreamConfig, members: &[C]) -> Balancer {
        let Some(hash) = &config.consistent_hash else {
            return Balancer::LeastConn;
        };
        let labels: Vec<&str> = members.iter().map(|m| m.label()).collect();
        let weights: Vec<u32> = members.iter().map(|m| m.weight()).collect();
        let table = match hash.algorithm {
            _ if members.is_empty() => HashTable::Ketama(ketama::Ring::build(&[], &[])),
            HashAlgorithm::Rendezvous => {
                HashTable::Rendezvous(rendezvous::Table::build(&labels, &weights))
            }
            HashAlgorithm::Ketama => HashTable::Ketama(ketama::Ring::build(&labels, &weights)),
        };
        Balancer::ConsistentHash {
            table,
            balance_factor: hash.balance_factor,
            min_inflight: hash.balance_min_inflight,
            total_weight: weights.iter().map(|&w| u64::from(w)).sum(),
        }
    }

    /// Chooses a member. `key` is the request key on consistent-hash upstreams (`None` falls back to
    /// least connections); `upstream_inflight` is the upstream's total in flight, for bounded loads.
    /// The key's hash under this balancer's algorithm (`None` for least_conn), computed once per
    /// request and reused by retries.
    pub fn hash_key(&self, key: &[u8]) -> Option<KeyHash> {
        match self {
            Balancer::LeastConn => None,
            Balancer::ConsistentHash {
                table: HashTable::Rendezvous(_),
                ..
            } => Some(KeyHash::Rendezvous(rendezvous::key_hash(key))),
            Balancer::ConsistentHash {
                table: HashTable::Ketama(_),
                ..
            } => Some(KeyHash::Ketama(ketama::key_hash(key))),
        }
    }

    /// Only members for which `usable` holds are chosen; a key whose own backend is unusable moves
    /// to the next usable one in its order (not counted as a spill). `key` comes from
    /// [`Balancer::hash_key`]; `None` falls back to least connections.
    pub fn pick<C: Candidate>(
        &self,
        members: &[C],
        key: Option<KeyHash>,
        upstream_inflight: usize,
        usable: impl Fn(usize) -> bool,
    ) -> Option<Pick> {
        let (table, bound, hash) = match (self, key) {
            (
                Balancer::ConsistentHash {
                    table,
                    balance_factor,
                    min_inflight,
                    total_weight,
                },
                Some(key),
            ) if !members.is_empty() => {
                let bound = balance_factor.map(|f| LoadBound {
                    floor: *min_inflight,
                    ..LoadBound::new(f, *total_weight, upstream_inflight)
                });
                (table, bound, key)
            }
            _ => {
                return least_conn::pick(members, &usable).map(|member| Pick {
                    member,
                    spilled: false,
                })
            }
        };
        let fits = |m: usize| bound.as_ref().is_none_or(|b| b.fits(&members[m]));
        let own = match (table, hash) {
            (HashTable::Rendezvous(t), KeyHash::Rendezvous(h)) => t.primary(h),
            (HashTable::Ketama(ring), KeyHash::Ketama(h)) => ring.primary(h)?,
            _ => return None,
        };
        if usable(own) && fits(own) {
            return Some(Pick {
                member: own,
                spilled: false,
            });
        }
        // The rare path: walk the key's fixed order.
        let order = match (table, hash) {
            (HashTable::Rendezvous(t), KeyHash::Rendezvous(h)) => t.ranking(h),
            (HashTable::Ketama(r), KeyHash::Ketama(h)) => r.ranking(h, members.len()),
            _ => return None,
        };
        let first = |accept: &dyn Fn(usize) -> bool| order.iter().copied().find(|&m| accept(m));
        if usable(own) {
            // Full under bounded loads: spill to the next that fits, else stay.
            let member = first(&|m| m != own && usable(m) && fits(m));
            return Some(Pick {
                member: member.unwrap_or(own),
                spilled: member.is_some(),
            });
        }
        // Unusable (unhealthy, at its limit, or already tried): move along the key's order.
        first(&|m| usable(m) && fits(m))
            .or_else(|| first(&|m| usable(m)))
            .map(|member| Pick {
                member,
                spilled: false,
            })
    }
}

/// A key's hash under the table's algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyHash {
    Rendezvous(u64),
    Ketama(u32),
}

/// The bounded-load capacity test for one pick.
///
/// HAProxy's `hash-balance-factor` and Envoy's `hash_balance_factor` apply the bound from the
/// first request. At low load it is a handful of requests (4 in flight over 3 backends with c =
/// 1.25 allow 3 each), so two hot keys on one backend already push a third key off its home,
/// and keys wander over every backend while none is busy: bad for a write proxy, whose backends
/// keep per-key caches and locks. Below `floor` requests in flight a backend therefore always
/// takes its own keys; the bound starts to matter once a backend is really loaded.
struct LoadBound {
    /// factor × (upstream in-flight + 1) / total weight: capacity per unit of weight.
    per_weight: f64,
    /// In-flight requests below which a backend is never full.
    floor: usize,
}

impl LoadBound {
    fn new(factor: f64, total_weight: u64, upstream_inflight: usize) -> LoadBound {
        LoadBound {
            per_weight: factor * (upstream_inflight as f64 + 1.0) / total_weight.max(1) as f64,
            floor: 0,
        }
    }

    fn fits<C: Candidate>(&self, member: &C) -> bool {
        let inflight = member.inflight();
        if inflight < self.floor {
            return true;
        }
        let capacity = (self.per_weight * f64::from(member.weight())).ceil();
        (inflight + 1) as f64 <= capacity
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;
    use std::sync::Arc;

    use super::*;
    use crate::config::{BackendConfig, HashConfig};
    use crate::upstream::{Backend, Member, Upstream};

    fn pick(up: &Upstream, key: &[u8], inflight: usize) -> Option<Pick> {
        up.balancer
            .pick(&up.members, up.balancer.hash_key(key), inflight, |_| true)
    }

    fn upstream(n: usize, algorithm: HashAlgorithm, factor: Option<f64>) -> Upstream {
        upstream_with_floor(n, algorithm, factor, 0)
    }

    fn upstream_with_floor(
        n: usize,
        algorithm: HashAlgorithm,
        factor: Option<f64>,
        floor: usize,
    ) -> Upstream {
        let backends: Vec<BackendConfig> = (0..n)
            .map(|i| {
                let label = format!("127.0.0.{}:9000", i + 1);
                BackendConfig {
                    address: label.parse().unwrap(),
                    label,
                    weight: NonZeroU32::MIN,
                    down: false,
                    max_inflight: None,
                    tls_name: None,
                }
            })
            .collect();
        let config = UpstreamConfig {
            name: "u".into(),
            consistent_hash: Some(HashConfig {
                algorithm,
                balance_factor: factor,
                balance_min_inflight: floor,
            }),
            backends,
            discovery: None,
            max_inflight_per_backend: None,
            admission: None,
            outlier: Default::default(),
            health_check: None,
            tls_ca: None,
        };
        let members: Box<[Member]> = config
            .backends
            .iter()
            .map(|b| Member::new(Arc::new(Backend::new(b.address, &b.label)), 1, "u"))
            .collect();
        let balancer = Balancer::new(&config, &members);
        Upstream::new("u", members, balancer, Default::default())
    }

    #[test]
    fn a_full_backend_spills_to_the_keys_next_one_and_back() {
        for algorithm in [HashAlgorithm::Rendezvous, HashAlgorithm::Ketama] {
            let up = upstream(4, algorithm, Some(1.25));
            let key = b"hot-key".as_slice();
            let own = pick(&up, key, 0).unwrap();
            assert!(!own.spilled);
            // Load the key's backend alone: with 8 in flight on 4 backends, capacity is
            // ceil(1.25 × 9 / 4) = 3, and the key's backend holds 8.
            let held: Vec<_> = (0..8).map(|_| up.start_on(own.member)).collect();
            let total = up.inflight.load(std::sync::atomic::Ordering::Relaxed);
            let spill = pick(&up, key, total).unwrap();
            assert!(spill.spilled, "{algorithm:?}");
            assert_ne!(spill.member, own.member);
            // The spill follows the key's fixed order: always the same second choice.
            for _ in 0..5 {
                assert_eq!(pick(&up, key, total).unwrap(), spill);
            }
            drop(held);
            let back = pick(&up, key, 0).unwrap();
            assert_eq!(back, own, "the key returns when its backend has room");
        }
    }

    /// At low load the bound alone moves keys (4 in flight over 3 backends allow 3 each); with a
    /// floor of 8 the key stays home until its backend really is loaded, then spills.
    #[test]
    fn below_the_floor_a_key_stays_home() {
        let up = upstream_with_floor(3, HashAlgorithm::Rendezvous, Some(1.25), 8);
        let own = pick(&up, b"k", 0).unwrap();
        let mut held: Vec<_> = (0..7).map(|_| up.start_on(own.member)).collect();
        assert_eq!(pick(&up, b"k", 7).unwrap(), own, "7 in flight: home");
        let bare = upstream(3, HashAlgorithm::Rendezvous, Some(1.25));
        let _bare_held: Vec<_> = (0..3).map(|_| bare.start_on(own.member)).collect();
        assert!(
            pick(&bare, b"k", 3).unwrap().spilled,
            "without a floor it spills at 3"
        );
        held.push(up.start_on(own.member));
        assert!(
            pick(&up, b"k", 8).unwrap().spilled,
            "at the floor the bound applies"
        );
    }

    #[test]
    fn without_a_factor_the_key_never_moves() {
        let up = upstream(3, HashAlgorithm::Rendezvous, None);
        let own = pick(&up, b"k", 0).unwrap();
        let _held: Vec<_> = (0..50).map(|_| up.start_on(own.member)).collect();
        assert_eq!(pick(&up, b"k", 50).unwrap(), own);
    }

    #[test]
    fn keyless_requests_use_least_conn() {
        let up = upstream(3, HashAlgorithm::Rendezvous, None);
        let _a = up.start_on(0);
        let _b = up.start_on(1);
        assert_eq!(
            up.balancer
                .pick(&up.members, None, 2, |_| true)
                .unwrap()
                .member,
            2
        );
    }

    #[test]
    fn a_backend_marked_down_moves_only_its_keys() {
        for algorithm in [HashAlgorithm::Rendezvous, HashAlgorithm::Ketama] {
            let all = upstream(5, algorithm, None);
            // The same upstream with backend 2 out of rotation (down backends are not members).
            let config_members: Vec<Member> = all
                .members
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != 2)
                .map(|(_, m)| m.clone())
                .collect();
            let config = UpstreamConfig {
                name: "u".into(),
                consistent_hash: Some(HashConfig {
                    algorithm,
                    balance_factor: None,
                    balance_min_inflight: 0,
                }),
                backends: Vec::new(),
                discovery: None,
                max_inflight_per_backend: None,
                admission: None,
                outlier: Default::default(),
                health_check: None,
                tls_ca: None,
            };
            let balancer = Balancer::new(&config, &config_members);
            for i in 0..5_000u32 {
                let key = i.to_le_bytes();
                let before = pick(&all, &key, 0).unwrap().member;
                let hash = balancer.hash_key(&key);
                let after = balancer
                    .pick(&config_members, hash, 0, |_| true)
                    .unwrap()
                    .member;
                let after_label = config_members[after].backend.label();
                if before != 2 {
                    assert_eq!(
                        after_label,
                        all.members[before].backend.label(),
                        "{algorithm:?}"
                    );
                }
            }
        }
    }
}
