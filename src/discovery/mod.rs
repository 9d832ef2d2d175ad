//! Backends from DNS: resolving an upstream's `discovery` name and watching it for changes.
//!
//! At start each discovered upstream is resolved once, before the proxy serves. Then a watcher
//! task per upstream asks again when the answer's TTL runs out (bounded by `min_refresh` and
//! `max_refresh`) and sends each answer that changes the set as an [`Update`] to the reloader,
//! which builds the next snapshot with it, as a config reload would: backends that stay keep their
//! live state, new ones are added, removed ones finish what they have in flight.
//!
//! Nothing here empties an upstream on a doubt. A failed lookup (timeout, SERVFAIL, refused,
//! unreachable name server) keeps the last good set; an authoritative "no such records"
//! (NXDOMAIN, or NOERROR without data) empties it only after `empty_after` such answers in a row.

pub mod dns;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;

use crate::config::{BackendConfig, DiscoveryConfig, UpstreamConfig, MAX_HASH_BACKENDS};
use dns::{Answer, Found, Lookup};

/// One upstream's discovered backends and what its lookups said, carried from snapshot to
/// snapshot while the upstream's `discovery` stays the same.
#[derive(Debug, Clone)]
pub struct Discovered {
    pub config: DiscoveryConfig,
    /// The set in service (sorted by address).
    pub found: Arc<[Found]>,
    pub status: Arc<StatusCell>,
}

impl Discovered {
    /// A discovery not asked yet: no backends until its watcher's first answer.
    pub fn unresolved(config: &DiscoveryConfig) -> Discovered {
        Discovered {
            config: config.clone(),
            found: Arc::default(),
            status: Arc::default(),
        }
    }

    /// The discovered set as backends of `upstream`.
    pub fn backends(&self, upstream: &UpstreamConfig) -> Vec<BackendConfig> {
        self.beside(&upstream.backends, upstream.max_inflight_per_backend)
    }

    /// The discovered set as backends, less those already in `statics`.
    pub fn beside(
        &self,
        statics: &[BackendConfig],
        max_inflight: Option<usize>,
    ) -> Vec<BackendConfig> {
        self.found
            .iter()
            .filter(|f| !statics.iter().any(|b| b.address == f.address))
            .take(MAX_HASH_BACKENDS.saturating_sub(statics.len()))
            .map(|f| BackendConfig {
                label: label(&self.config, f.address),
                address: f.address,
                weight: f.weight,
                down: false,
                max_inflight,
                tls_name: f.tls_name.clone(),
            })
            .collect()
    }
}

/// The key of the `[cluster]` peers' discovery among the upstreams' (brackets: no upstream
/// can be named so, see config validation).
pub const CLUSTER_PEERS: &str = "[cluster]";

/// A discovered backend's name in logs, metrics and `/status`: its address, with `https://` for
/// TLS ones (as a static backend would be written).
fn label(config: &DiscoveryConfig, address: SocketAddr) -> String {
    if config.https {
        format!("https://{address}")
    } else {
        address.to_string()
    }
}

/// What the lookups of one upstream said last, for `/status`.
#[derive(Debug, Clone, Default)]
pub struct Status {
    pub last_lookup: Option<SystemTime>,
    /// `records`, `empty` or `failed`.
    pub last_result: &'static str,
    pub ttl: Option<Duration>,
    pub error: Option<String>,
    pub empty_in_a_row: u32,
    pub failed_in_a_row: u32,
    pub changes: u64,
}

/// The status, shared by the watcher (which writes it) and `/status` (which reads it).
#[derive(Debug, Default)]
pub struct StatusCell(Mutex<Status>);

impl StatusCell {
    pub fn get(&self) -> Status {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn update(&self, f: impl FnOnce(&mut Status)) {
        f(&mut self.0.lock().unwrap_or_else(|e| e.into_inner()));
    }
}

/// A changed set for one upstream, from its watcher to the reloader.
#[derive(Debug)]
pub struct Update {
    pub upstream: Box<str>,
    pub config: DiscoveryConfig,
    pub found: Arc<[Found]>,
}

/// Resolves `config` once, for the first snapshot: a failure leaves the set empty, with the
/// error in the status, and the watcher tries again after `min_refresh`.
pub async fn first(upstream: &str, config: &DiscoveryConfig) -> Discovered {
    let status = Arc::new(StatusCell::default());
    let mut tracker = Tracker::new(config.clone(), Arc::default());
    let answer = match Lookup::new(config) {
        Ok(lookup) => lookup.ask().await,
        Err(error) => Answer::Failed { error },
    };
    let (found, _) = tracker.judge(upstream, answer, &status);
    Discovered {
        config: config.clone(),
        found: found.unwrap_or_default(),
        status,
    }
}

/// A running watcher; dropping it stops the task.
pub struct Watcher(tokio::task::JoinHandle<()>);

impl Drop for Watcher {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Watches `discovered` of `upstream`, sending changed sets to `updates`.
pub fn watch(upstream: &str, discovered: &Discovered, updates: mpsc::Sender<Update>) -> Watcher {
    let upstream: Box<str> = upstream.into();
    let config = discovered.config.clone();
    let status = Arc::clone(&discovered.status);
    let mut tracker = Tracker::new(config.clone(), Arc::clone(&discovered.found));
    Watcher(tokio::spawn(async move {
        let lookup = loop {
            match Lookup::new(&config) {
                Ok(lookup) => break lookup,
                Err(error) => {
                    let (_, wait) = tracker.judge(&upstream, Answer::Failed { error }, &status);
                    tokio::time::sleep(wait).await;
                }
            }
        };
        let mut wait = tracker.first_wait(&status);
        loop {
            tokio::time::sleep(wait).await;
            let answer = lookup.ask().await;
            let found;
            (found, wait) = tracker.judge(&upstream, answer, &status);
            if let Some(found) = found {
                let update = Update {
                    upstream: upstream.clone(),
                    config: config.clone(),
                    found,
                };
                if updates.send(update).await.is_err() {
                    return; // the reloader is gone: shutting down
                }
            }
        }
    }))
}

/// Decides what each answer does to the set, and when to ask next.
struct Tracker {
    config: DiscoveryConfig,
    current: Arc<[Found]>,
    empty_in_a_row: u32,
    failed_in_a_row: u32,
}

impl Tracker {
    fn new(config: DiscoveryConfig, current: Arc<[Found]>) -> Tracker {
        Tracker {
            config,
            current,
            empty_in_a_row: 0,
            failed_in_a_row: 0,
        }
    }

    /// The wait before the watcher's first lookup: the first answer's TTL if it had records,
    /// `min_refresh` after a failure.
    fn first_wait(&self, status: &StatusCell) -> Duration {
        let status = status.get();
        match status.last_result {
            "records" | "empty" => self.refresh(status.ttl.unwrap_or_default()),
            "failed" => self.config.min_refresh,
            _ => Duration::ZERO, // never asked: a reload added this name
        }
    }

    fn refresh(&self, ttl: Duration) -> Duration {
        ttl.clamp(self.config.min_refresh, self.config.max_refresh)
    }

    /// The new set when `answer` changes it, and the wait before the next lookup.
    fn judge(
        &mut self,
        upstream: &str,
        answer: Answer,
        status: &StatusCell,
    ) -> (Option<Arc<[Found]>>, Duration) {
        let name = self.config.describe();
        let result = match &answer {
            Answer::Records { .. } => "records",
            Answer::Empty { .. } => "empty",
            Answer::Failed { .. } => "failed",
        };
        metrics::counter!(crate::metrics::DISCOVERY_LOOKUPS, "upstream" => upstream.to_string(), "result" => result).increment(1);
        let (next, wait, ttl, error): (Option<Arc<[Found]>>, _, _, _) = match answer {
            Answer::Records { found, ttl } => {
                (self.empty_in_a_row, self.failed_in_a_row) = (0, 0);
                let changed = *found != *self.current;
                (
                    changed.then(|| Arc::from(found)),
                    self.refresh(ttl),
                    Some(ttl),
                    None,
                )
            }
            Answer::Empty { ttl } => {
                self.failed_in_a_row = 0;
                self.empty_in_a_row = self.empty_in_a_row.saturating_add(1);
                let empties =
                    self.empty_in_a_row >= self.config.empty_after && !self.current.is_empty();
                if !empties && !self.current.is_empty() {
                    tracing::warn!(upstream, name = %name, in_a_row = self.empty_in_a_row, empty_after = self.config.empty_after, "DNS says the discovery name has no records; keeping the last set until empty_after answers in a row say so");
                }
                (
                    empties.then(|| Arc::from(Vec::new())),
                    self.refresh(ttl),
                    Some(ttl),
                    None,
                )
            }
            Answer::Failed { error } => {
                self.failed_in_a_row = self.failed_in_a_row.saturating_add(1);
                tracing::warn!(upstream, name = %name, error = %error, backends = self.current.len(), "DNS lookup failed; keeping the last good set");
                // Back off while the name server is away: min_refresh, doubling up to max_refresh.
                let doublings = self.failed_in_a_row.saturating_sub(1).min(16);
                let wait =
                    (self.config.min_refresh * (1u32 << doublings)).min(self.config.max_refresh);
                (None, wait, None, Some(error))
            }
        };
        if let Some(found) = &next {
            let missing_from = |set: &[Found], other: &[Found]| -> Vec<String> {
                set.iter()
                    .filter(|f| !other.contains(f))
                    .map(|f| f.address.to_string())
                    .collect()
            };
            let added = missing_from(found, &self.current).join(" ");
            let removed = missing_from(&self.current, found).join(" ");
            tracing::info!(upstream, name = %name, added, removed, "discovered backends changed");
            metrics::counter!(crate::metrics::DISCOVERY_CHANGES, "upstream" => upstream.to_string()).increment(1);
            self.current = Arc::clone(found);
        }
        metrics::gauge!(crate::metrics::DISCOVERY_BACKENDS, "upstream" => upstream.to_string())
            .set(self.current.len() as f64);
        let (empty_in_a_row, failed_in_a_row) = (self.empty_in_a_row, self.failed_in_a_row);
        let changed = next.is_some();
        status.update(|s| {
            s.last_lookup = Some(SystemTime::now());
            s.last_result = result;
            if ttl.is_some() {
                s.ttl = ttl;
            }
            s.error = error;
            s.empty_in_a_row = empty_in_a_row;
            s.failed_in_a_row = failed_in_a_row;
            s.changes += u64::from(changed);
        });
        (next, wait)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DnsName;
    use std::num::NonZeroU32;

    fn config() -> DiscoveryConfig {
        DiscoveryConfig {
            name: DnsName::Address {
                host: "writers.test".into(),
                port: 8080,
            },
            https: false,
            resolvers: vec![],
            min_refresh: Duration::from_secs(1),
            max_refresh: Duration::from_secs(30),
            timeout: Duration::from_secs(2),
            empty_after: 3,
            weight: NonZeroU32::MIN,
        }
    }

    fn found(last: u8) -> Found {
        Found {
            address: SocketAddr::from(([10, 0, 0, last], 8080)),
            weight: NonZeroU32::MIN,
            tls_name: None,
        }
    }

    fn records(found: Vec<Found>, ttl: u64) -> Answer {
        Answer::Records {
            found,
            ttl: Duration::from_secs(ttl),
        }
    }

    #[test]
    fn failures_keep_the_set_and_empties_need_empty_after_in_a_row() {
        let status = StatusCell::default();
        let mut t = Tracker::new(config(), Arc::default());
        let (set, wait) = t.judge("u", records(vec![found(1), found(2)], 10), &status);
        assert_eq!(set.as_deref(), Some(&[found(1), found(2)][..]));
        assert_eq!(wait, Duration::from_secs(10));
        let (set, _) = t.judge("u", records(vec![found(1), found(2)], 0), &status);
        assert!(set.is_none(), "an unchanged answer is no update");
        for attempt in 1..=5 {
            let failed = Answer::Failed {
                error: "timeout".into(),
            };
            let (set, wait) = t.judge("u", failed, &status);
            assert!(set.is_none(), "a failure changed the set");
            let expected = Duration::from_secs(1 << (attempt - 1)).min(Duration::from_secs(30));
            assert_eq!(wait, expected, "back-off after failure {attempt}");
        }
        let empty = || Answer::Empty {
            ttl: Duration::ZERO,
        };
        assert!(t.judge("u", empty(), &status).0.is_none());
        assert!(t
            .judge("u", records(vec![found(1), found(2)], 5), &status)
            .0
            .is_none());
        assert!(
            t.judge("u", empty(), &status).0.is_none(),
            "the run of empties restarted"
        );
        assert!(t.judge("u", empty(), &status).0.is_none());
        let (set, wait) = t.judge("u", empty(), &status);
        assert_eq!(
            set.as_deref(),
            Some(&[][..]),
            "three empties in a row empty the set"
        );
        assert_eq!(
            wait,
            Duration::from_secs(1),
            "a TTL of 0 is asked again after min_refresh"
        );
        assert!(
            t.judge("u", empty(), &status).0.is_none(),
            "an empty set stays empty quietly"
        );
        assert_eq!(status.get().changes, 2);
    }
}
