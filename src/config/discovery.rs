//! An upstream's `discovery` section: backends from DNS, validated.

use super::file::DiscoverySection;
use super::*;

/// Default shortest time between two lookups (a TTL of 0 is re-asked this often).
pub const DEFAULT_MIN_REFRESH: Duration = Duration::from_secs(1);
/// Default longest time between two lookups, whatever the TTL says.
pub const DEFAULT_MAX_REFRESH: Duration = Duration::from_secs(30);
/// Default time one lookup may take before it counts as failed.
pub const DEFAULT_DISCOVERY_TIMEOUT: Duration = Duration::from_secs(2);
/// Default authoritative empty answers in a row that empty an upstream.
pub const DEFAULT_EMPTY_AFTER: u32 = 3;
/// Shortest accepted `min_refresh`: faster polling only loads the DNS server.
const SHORTEST_REFRESH: Duration = Duration::from_millis(100);

/// What a discovery name asks DNS for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum DnsName {
    /// `host:port`: the host's A and AAAA records, each address with `port`.
    Address { host: String, port: u16 },
    /// `_service._proto.name`: SRV records, each target's addresses with the record's port.
    Service { name: String },
}

/// A validated `discovery = { ... }`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DiscoveryConfig {
    pub name: DnsName,
    /// `https://` names: backends are reached over TLS, verified against the DNS name (A/AAAA)
    /// or the SRV target.
    pub https: bool,
    /// Name servers to ask; empty uses the system's (`/etc/resolv.conf`).
    pub resolvers: Vec<SocketAddr>,
    pub min_refresh: Duration,
    pub max_refresh: Duration,
    pub timeout: Duration,
    pub empty_after: u32,
    /// Weight of each A/AAAA backend (SRV backends take the record's weight).
    pub weight: NonZeroU32,
}

impl DiscoveryConfig {
    /// The name as the config wrote it, for logs and `/status`.
    pub fn describe(&self) -> String {
        let scheme = if self.https { "https://" } else { "" };
        match &self.name {
            DnsName::Address { host, port } => format!("{scheme}{host}:{port}"),
            DnsName::Service { name } => format!("{scheme}{name}"),
        }
    }
}

impl Validator<'_, '_> {
    pub(super) fn discovery(
        &mut self,
        section: Spanned<DiscoverySection>,
    ) -> Option<DiscoveryConfig> {
        let d = section.into_inner();
        let (name, https) = self.dns_name(&d.dns)?;
        let resolvers = d
            .resolvers
            .unwrap_or_default()
            .iter()
            .filter_map(|r| self.resolver_addr(r))
            .collect();
        let min_span = d.min_refresh.as_ref().map(Spanned::span);
        let min_refresh = self.duration(d.min_refresh, DEFAULT_MIN_REFRESH);
        if min_refresh < SHORTEST_REFRESH {
            self.sink.at(
                min_span.clone().unwrap_or(0..0),
                "min_refresh is below 100ms",
            );
        }
        let max_refresh = self.duration(d.max_refresh, DEFAULT_MAX_REFRESH);
        if max_refresh < min_refresh {
            self.sink.at(
                min_span.unwrap_or(0..0),
                "min_refresh is longer than max_refresh",
            );
        }
        Some(DiscoveryConfig {
            name,
            https,
            resolvers,
            min_refresh,
            max_refresh,
            timeout: self.duration(d.timeout, DEFAULT_DISCOVERY_TIMEOUT),
            empty_after: d
                .empty_after
                .map_or(Some(DEFAULT_EMPTY_AFTER as usize), |n| {
                    self.count("empty_after", n, 1, 100)
                })
                .unwrap_or(1) as u32,
            weight: self.weight(d.weight)?,
        })
    }

    /// `[https://]host:port` or `[https://]_service._proto.name`.
    fn dns_name(&mut self, text: &Spanned<String>) -> Option<(DnsName, bool)> {
        let raw = text.get_ref().trim_end_matches('.');
        let (rest, https, default_port) = if let Some(rest) = raw.strip_prefix("https://") {
            (rest, true, Some(443))
        } else if let Some(rest) = raw.strip_prefix("http://") {
            (rest, false, Some(80))
        } else {
            (raw, false, None)
        };
        let bad = |why: &str| format!("bad discovery name {raw:?}: {why}");
        if rest.starts_with('_') {
            if rest.contains(':') {
                self.sink.at(
                    text.span(),
                    bad("an SRV name takes its ports from its records; remove the port"),
                );
                return None;
            }
            if !is_dns_name(rest) {
                self.sink.at(text.span(), bad("not a DNS name"));
                return None;
            }
            return Some((
                DnsName::Service {
                    name: rest.to_string(),
                },
                https,
            ));
        }
        let (host, port) = match rest.rsplit_once(':') {
            Some((host, port)) => (host, port.parse::<u16>().ok().filter(|p| *p != 0)),
            None => (rest, default_port),
        };
        let Some(port) = port else {
            self.sink.at(
                text.span(),
                bad("expected HOST:PORT (A/AAAA records) or _service._proto.name (SRV records)"),
            );
            return None;
        };
        if host.parse::<std::net::IpAddr>().is_ok() || host.starts_with('[') {
            self.sink.at(
                text.span(),
                bad("this is an address, not a name; list it under `backends`"),
            );
            return None;
        }
        if !is_dns_name(host) {
            self.sink.at(text.span(), bad("not a DNS name"));
            return None;
        }
        Some((
            DnsName::Address {
                host: host.to_string(),
                port,
            },
            https,
        ))
    }

    /// `IP` (port 53) or `IP:PORT`.
    fn resolver_addr(&mut self, text: &Spanned<String>) -> Option<SocketAddr> {
        let raw = text.get_ref();
        if let Ok(ip) = raw.parse::<std::net::IpAddr>() {
            return Some(SocketAddr::new(ip, 53));
        }
        match raw.parse::<SocketAddr>() {
            Ok(addr) if addr.port() != 0 => Some(addr),
            _ => {
                self.sink.at(
                    text.span(),
                    format!("bad resolver {raw:?}: expected IP or IP:PORT such as \"10.0.0.2:53\""),
                );
                None
            }
        }
    }
}

/// Letters, digits, `-` and `_` in dot-separated labels of 1 to 63 characters.
fn is_dns_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}
