//! Per-key order across writegate replicas: which replica owns a key, and the signed marker a
//! forwarded write carries.
//!
//! Every replica ranks the peers for a key by rendezvous hashing over the peers' addresses, so all
//! agree on a key's owner without talking to each other, and a peer joining or leaving moves only
//! the keys it wins or held. A write on a coalescing route whose key another replica owns is sent
//! to that owner (see the proxy's `clustered` step) with a `writegate-hop` header: who sent it,
//! for which client, when, and an HMAC-SHA256 over those and the request's method, target and key
//! under the shared `secret`. The owner checks it and coalesces the write with its own; a request
//! with a valid marker is never forwarded again, so there are no loops, and one without a valid
//! marker cannot skip its owner.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::header::HeaderValue;
use http::Method;
use metrics::Counter;
use ring::hmac;

use crate::balance::{rendezvous, Balancer};
use crate::config::{BackendConfig, ClusterConfig, OnPeerDown};
use crate::upstream::{Backend, Member, Upstream};

/// The header that marks a write forwarded by a peer.
pub const HOP_HEADER: &str = "writegate-hop";
/// How far a marker's clock may be from ours (replicas' clocks and the time a write waited).
const HOP_WINDOW: Duration = Duration::from_secs(60);
/// The internal upstream name of the peers, in metrics and logs.
pub const PEERS: &str = "cluster";

/// The cluster as one snapshot sees it.
#[derive(Debug)]
pub struct Cluster {
    /// The peers as backends (their live state is carried across snapshots); `self` included.
    pub peers: Upstream,
    table: rendezvous::Table,
    /// This replica's index in `peers`; `None` when it is not among them (it then owns no key).
    self_index: Option<usize>,
    /// This replica's name in the markers it signs.
    self_label: Box<str>,
    key: hmac::Key,
    pub on_peer_down: OnPeerDown,
    pub metrics: ClusterMetrics,
}

/// Where a key's writes are ordered.
pub enum Owner<'c> {
    Here,
    Peer(usize, &'c Member),
}

/// A checked marker: the client the first replica served.
#[derive(Debug, Clone)]
pub struct Hop {
    pub client_ip: HeaderValue,
    pub scheme: HeaderValue,
}

#[derive(Debug)]
pub struct ClusterMetrics {
    pub received: Counter,
    pub forged: Counter,
    pub local_fallbacks: Counter,
}

impl Cluster {
    /// Builds the cluster of `config` with `discovered` peers added, reusing the live peer state
    /// of `previous`. `listeners` are this process's listen addresses (to find `self`).
    pub fn build(
        config: &ClusterConfig,
        tls: Option<Arc<rustls::ClientConfig>>,
        discovered: Vec<BackendConfig>,
        listeners: &[SocketAddr],
        previous: Option<&Cluster>,
    ) -> Cluster {
        let mut live: HashMap<&str, &Arc<Backend>> = previous
            .iter()
            .flat_map(|p| p.peers.members.iter())
            .map(|m| (m.backend.label(), &m.backend))
            .collect();
        let mut peers = config.peers.clone();
        for peer in discovered {
            if !peers.iter().any(|p| p.address == peer.address) {
                peers.push(peer);
            }
        }
        let members: Box<[Member]> = peers
            .iter()
            .map(|p| {
                let backend = live.remove(p.label.as_str()).cloned().unwrap_or_else(|| {
                    let name = p
                        .tls_name
                        .clone()
                        .and_then(|n| rustls_pki_types::ServerName::try_from(n).ok());
                    Arc::new(Backend::with_tls(
                        p.address,
                        &p.label,
                        tls.clone().zip(name),
                    ))
                });
                Member::new(backend, 1, PEERS)
            })
            .collect();
        let self_index = match config.self_addr {
            Some(addr) => peers.iter().position(|p| p.address == addr),
            None => peers
                .iter()
                .position(|p| is_this_process(p.address, listeners)),
        };
        if self_index.is_none() && !peers.is_empty() {
            tracing::warn!("[cluster]: this replica is not among its peers; it forwards every coalesced write to its owner");
        }
        let labels: Vec<&str> = peers.iter().map(|p| p.label.as_str()).collect();
        let table = rendezvous::Table::build(&labels, &vec![1; labels.len()]);
        let self_label = self_index.map_or("-", |i| labels[i]).into();
        let inflight = previous.map_or_else(Arc::default, |p| Arc::clone(&p.peers.inflight));
        let mut upstream = Upstream::new(PEERS, members, Balancer::LeastConn, inflight);
        // A peer that refuses connections three times in a row is skipped for 5 s (doubling).
        upstream.outlier.consecutive_failures = 3;
        upstream.outlier.base_ejection_time = Duration::from_secs(5);
        upstream.outlier.max_ejection_percent = 100;
        Cluster {
            peers: upstream,
            table,
            self_index,
            self_label,
            key: hmac::Key::new(hmac::HMAC_SHA256, config.secret.0.as_bytes()),
            on_peer_down: config.on_peer_down,
            metrics: ClusterMetrics {
                received: metrics::counter!(crate::metrics::CLUSTER_RECEIVED),
                forged: metrics::counter!(crate::metrics::CLUSTER_FORGED),
                local_fallbacks: metrics::counter!(crate::metrics::CLUSTER_LOCAL_FALLBACKS),
            },
        }
    }

    /// The replica that orders writes to `key`.
    pub fn owner(&self, key: &[u8]) -> Owner<'_> {
        if self.peers.members.is_empty() {
            return Owner::Here;
        }
        let index = self.table.primary(rendezvous::key_hash(key));
        if Some(index) == self.self_index {
            return Owner::Here;
        }
        Owner::Peer(index, &self.peers.members[index])
    }

    /// This replica's index among the peers, if it is one.
    pub fn self_index(&self) -> Option<usize> {
        self.self_index
    }

    /// The marker for a write of `client_ip` over `scheme` sent to a peer.
    pub fn sign(
        &self,
        hop: &Hop,
        method: &Method,
        target: &str,
        key: &[u8],
    ) -> Option<HeaderValue> {
        let millis = unix_millis(SystemTime::now());
        let fields = MarkerFields {
            from: &self.self_label,
            client: hop.client_ip.to_str().ok()?,
            scheme: hop.scheme.to_str().ok()?,
            millis,
        };
        let tag = hmac::sign(&self.key, &fields.signed_bytes(method, target, key));
        let value = format!("v1 {} {}", fields.text(), hex(tag.as_ref()));
        HeaderValue::from_str(&value).ok()
    }

    /// Checks a marker; the client it names, or why it is refused.
    pub fn verify(
        &self,
        value: &[u8],
        method: &Method,
        target: &str,
        key: &[u8],
    ) -> Result<Hop, &'static str> {
        let text = std::str::from_utf8(value).map_err(|_| "not text")?;
        let parts: Vec<&str> = text.split(' ').collect();
        let ["v1", from, client, scheme, millis, tag] = parts[..] else {
            return Err("not a v1 marker");
        };
        let client_ip: IpAddr = client.parse().map_err(|_| "bad client address")?;
        if scheme != "http" && scheme != "https" {
            return Err("bad scheme");
        }
        let millis: u64 = millis.parse().map_err(|_| "bad time")?;
        let now = unix_millis(SystemTime::now());
        if now.abs_diff(millis) > HOP_WINDOW.as_millis() as u64 {
            return Err("signed more than 60 s away from this replica's clock");
        }
        let tag = unhex(tag).ok_or("bad signature encoding")?;
        let fields = MarkerFields {
            from,
            client,
            scheme,
            millis,
        };
        hmac::verify(&self.key, &fields.signed_bytes(method, target, key), &tag)
            .map_err(|_| "the signature does not match (a different secret?)")?;
        Ok(Hop {
            client_ip: HeaderValue::from_str(&client_ip.to_string()).map_err(|_| "bad client")?,
            scheme: HeaderValue::from_static(if scheme == "https" { "https" } else { "http" }),
        })
    }
}

/// What a marker says and signs.
struct MarkerFields<'a> {
    from: &'a str,
    client: &'a str,
    scheme: &'a str,
    millis: u64,
}

impl MarkerFields<'_> {
    fn text(&self) -> String {
        format!(
            "{} {} {} {}",
            self.from, self.client, self.scheme, self.millis
        )
    }

    /// The marker's fields and the request's method, target and key, each length-prefixed so
    /// that no two different requests sign the same bytes.
    fn signed_bytes(&self, method: &Method, target: &str, key: &[u8]) -> Vec<u8> {
        let millis = self.millis.to_string();
        let parts: [&[u8]; 7] = [
            self.from.as_bytes(),
            self.client.as_bytes(),
            self.scheme.as_bytes(),
            millis.as_bytes(),
            method.as_str().as_bytes(),
            target.as_bytes(),
            key,
        ];
        let mut out = Vec::with_capacity(parts.iter().map(|p| p.len() + 8).sum());
        for part in parts {
            out.extend_from_slice(&(part.len() as u64).to_be_bytes());
            out.extend_from_slice(part);
        }
        out
    }
}

/// Whether `peer` is this process: one of its listeners' ports, on an address of this host.
fn is_this_process(peer: SocketAddr, listeners: &[SocketAddr]) -> bool {
    listeners.iter().any(|l| {
        l.port() == peer.port()
            && (l.ip() == peer.ip() || (l.ip().is_unspecified() && is_local_address(peer.ip())))
    })
}

/// An address is this host's when a socket can be bound to it.
fn is_local_address(ip: IpAddr) -> bool {
    UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

fn unix_millis(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Secret, MIN_SECRET_LEN};
    use std::num::NonZeroU32;

    fn config(peers: &[&str], self_addr: &str) -> ClusterConfig {
        ClusterConfig {
            self_addr: Some(self_addr.parse().unwrap()),
            peers: peers
                .iter()
                .map(|p| BackendConfig {
                    label: p.to_string(),
                    address: p.parse().unwrap(),
                    weight: NonZeroU32::MIN,
                    down: false,
                    max_inflight: None,
                    tls_name: None,
                })
                .collect(),
            discovery: None,
            secret: Secret("s".repeat(MIN_SECRET_LEN)),
            on_peer_down: OnPeerDown::Local,
            tls_ca: None,
            tls_identity: None,
        }
    }

    fn owner_label(cluster: &Cluster, key: &[u8]) -> String {
        match cluster.owner(key) {
            Owner::Here => "here".into(),
            Owner::Peer(_, m) => m.backend.label().into(),
        }
    }

    #[test]
    fn replicas_agree_on_owners_and_a_leaving_peer_moves_only_its_keys() {
        let peers = ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"];
        let views: Vec<Cluster> = peers
            .iter()
            .map(|me| Cluster::build(&config(&peers, me), None, vec![], &[], None))
            .collect();
        let two = Cluster::build(&config(&peers[..2], peers[0]), None, vec![], &[], None);
        let mut owned = [0; 3];
        for i in 0..3000 {
            let key = format!("key{i}");
            let owners: Vec<String> = views
                .iter()
                .zip(peers)
                .map(|(v, me)| owner_label(v, key.as_bytes()).replace("here", me))
                .collect();
            assert!(
                owners.iter().all(|o| *o == owners[0]),
                "replicas disagree on {key}: {owners:?}"
            );
            owned[peers.iter().position(|p| *p == owners[0]).unwrap()] += 1;
            let after = owner_label(&two, key.as_bytes()).replace("here", peers[0]);
            if owners[0] != peers[2] {
                assert_eq!(after, owners[0], "{key} moved though its owner stayed");
            }
        }
        assert!(
            owned.iter().all(|n| (800..1200).contains(n)),
            "uneven: {owned:?}"
        );
    }

    #[test]
    fn markers_verify_only_for_the_request_they_were_signed_for() {
        let peers = ["10.0.0.1:80", "10.0.0.2:80"];
        let a = Cluster::build(&config(&peers, peers[0]), None, vec![], &[], None);
        let b = Cluster::build(&config(&peers, peers[1]), None, vec![], &[], None);
        let hop = Hop {
            client_ip: HeaderValue::from_static("192.0.2.7"),
            scheme: HeaderValue::from_static("https"),
        };
        let marker = a.sign(&hop, &Method::PUT, "/kv/1", b"k1").unwrap();
        let checked = b
            .verify(marker.as_bytes(), &Method::PUT, "/kv/1", b"k1")
            .unwrap();
        assert_eq!(checked.client_ip, "192.0.2.7");
        assert_eq!(checked.scheme, "https");
        for (method, target, key) in [
            (Method::POST, "/kv/1", &b"k1"[..]),
            (Method::PUT, "/kv/2", b"k1"),
            (Method::PUT, "/kv/1", b"k2"),
        ] {
            assert!(b.verify(marker.as_bytes(), &method, target, key).is_err());
        }
        let mut other = config(&peers, peers[1]);
        other.secret = Secret("t".repeat(MIN_SECRET_LEN));
        let stranger = Cluster::build(&other, None, vec![], &[], None);
        assert!(stranger
            .verify(marker.as_bytes(), &Method::PUT, "/kv/1", b"k1")
            .is_err());
        let forged = marker.to_str().unwrap().replace("192.0.2.7", "192.0.2.8");
        assert!(b
            .verify(forged.as_bytes(), &Method::PUT, "/kv/1", b"k1")
            .is_err());
        assert!(b
            .verify(b"v1 x 1.2.3.4 http 0 00", &Method::PUT, "/kv/1", b"k1")
            .is_err());
    }
}
