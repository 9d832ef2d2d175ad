//! The `[cluster]` section: the writegate replicas that share per-key order, validated.

use super::file::{ClusterSection, OnPeerDownKind};
use super::*;

/// Shortest accepted `secret`: 32 characters of a random string hold enough entropy for HMAC.
pub const MIN_SECRET_LEN: usize = 32;

/// What a write gets when the replica that owns its key cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnPeerDown {
    /// Coalesced here: order holds among this replica's writes until the owner is back.
    Local,
    /// 503 with `Retry-After`.
    Reject,
}

/// The shared secret that signs forwarded requests; never shown in logs or `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// A validated `[cluster]`.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterConfig {
    /// This replica's address as the peer list has it; `None` finds it: the peer whose IP is
    /// this host's and whose port is one of this process's listeners.
    pub self_addr: Option<SocketAddr>,
    /// The static `peers`, as backends (the address is a listener of that replica).
    pub peers: Vec<BackendConfig>,
    /// Peers from DNS, added to the static ones.
    pub discovery: Option<DiscoveryConfig>,
    pub secret: Secret,
    pub on_peer_down: OnPeerDown,
    pub tls_ca: Option<PathBuf>,
    /// Client certificate and key for peers that ask for one (mutual TLS).
    pub tls_identity: Option<(PathBuf, PathBuf)>,
}

impl Validator<'_, '_> {
    /// The section, and the TLS client config for `https://` peers.
    pub(super) fn cluster(
        &mut self,
        section: Spanned<ClusterSection>,
    ) -> (Option<ClusterConfig>, Option<Arc<rustls::ClientConfig>>) {
        let span = section.span();
        let c = section.into_inner();
        let secret = match c.secret {
            Some(s) if s.get_ref().chars().count() >= MIN_SECRET_LEN => Some(s.into_inner()),
            Some(s) => {
                let message = format!(
                    "`secret` is too short: use at least {MIN_SECRET_LEN} random characters"
                );
                self.sink.at(s.span(), message);
                None
            }
            None => {
                self.sink.at(
                    span.clone(),
                    format!("[cluster] needs `secret` (at least {MIN_SECRET_LEN} characters, the same on every replica): it signs forwarded writes so that no client can pass as a peer"),
                );
                None
            }
        };
        let has_discovery = c.discovery.is_some();
        let discovery = c.discovery.and_then(|d| self.discovery(d));
        let mut peers = Vec::new();
        for entry in c.peers.iter().flatten() {
            let Some((address, tls_name)) = self.backend_addr(entry) else {
                continue;
            };
            if peers.iter().any(|p: &BackendConfig| p.address == address) {
                self.sink
                    .at(entry.span(), format!("peer {address} is listed twice"));
                continue;
            }
            peers.push(BackendConfig {
                label: entry.get_ref().clone(),
                address,
                weight: NonZeroU32::MIN,
                down: false,
                max_inflight: None,
                tls_name,
            });
        }
        if peers.is_empty() && !has_discovery {
            self.sink.at(
                span.clone(),
                "[cluster] has no peers: list `peers` or set `discovery`",
            );
        }
        let self_addr = c.self_addr.as_ref().and_then(|s| {
            let addr = self.socket_addr(s)?;
            let listed = peers.iter().any(|p| p.address == addr);
            if !listed && !has_discovery {
                self.sink
                    .at(s.span(), format!("self {addr} is not among the peers"));
            }
            Some(addr)
        });
        let tls_ca = c.tls_ca.as_ref().map(|p| self.path(p.get_ref()));
        let tls_identity = match (&c.tls_cert, &c.tls_key) {
            (Some(cert), Some(key)) => Some((self.path(cert.get_ref()), self.path(key.get_ref()))),
            (None, None) => None,
            (Some(one), None) | (None, Some(one)) => {
                self.sink.at(one.span(), "tls_cert and tls_key go together");
                None
            }
        };
        let uses_tls = peers.iter().any(|p| p.tls_name.is_some())
            || discovery.as_ref().is_some_and(|d| d.https);
        let tls = if uses_tls {
            let identity = tls_identity
                .as_ref()
                .map(|(c, k)| (c.as_path(), k.as_path()));
            crate::tls::client_config_with(tls_ca.as_deref(), identity)
                .map_err(|e| self.sink.at(span.clone(), e))
                .ok()
        } else {
            None
        };
        let on_peer_down = match c.on_peer_down.map(Spanned::into_inner) {
            None | Some(OnPeerDownKind::Local) => OnPeerDown::Local,
            Some(OnPeerDownKind::Reject) => OnPeerDown::Reject,
        };
        let config = secret.map(|secret| ClusterConfig {
            self_addr,
            peers,
            discovery,
            secret: Secret(secret),
            on_peer_down,
            tls_ca,
            tls_identity,
        });
        (config, tls)
    }
}
