//! One lookup of a discovery name, through hickory's resolver.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::NetError;
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::RData;
use hickory_resolver::TokioResolver;

use crate::config::{DiscoveryConfig, DnsName};

/// A backend a lookup found.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Found {
    pub address: SocketAddr,
    pub weight: NonZeroU32,
    /// For `https://` names: the name to verify the certificate against.
    pub tls_name: Option<String>,
}

/// What one lookup said.
#[derive(Debug)]
pub enum Answer {
    /// Records, sorted by address, and how long they may be trusted.
    Records { found: Vec<Found>, ttl: Duration },
    /// The name server said, with authority, that the name has no such records (NXDOMAIN, or
    /// NOERROR with no data).
    Empty { ttl: Duration },
    /// No answer: timeout, refused, server failure, unreachable name server.
    Failed { error: String },
}

/// A resolver set up for one discovery name.
pub struct Lookup {
    resolver: TokioResolver,
    config: DiscoveryConfig,
}

impl Lookup {
    pub fn new(config: &DiscoveryConfig) -> Result<Lookup, String> {
        let provider = TokioRuntimeProvider::default();
        let mut builder = if config.resolvers.is_empty() {
            TokioResolver::builder(provider)
                .map_err(|e| format!("cannot read the system resolver config: {e}"))?
        } else {
            let servers = config.resolvers.iter().map(name_server).collect();
            let mut builder = TokioResolver::builder_with_config(
                ResolverConfig::from_name_servers(servers),
                provider,
            );
            builder.options_mut().use_hosts_file = ResolveHosts::Never;
            builder
        };
        let options: &mut ResolverOpts = builder.options_mut();
        options.timeout = config.timeout;
        options.attempts = 1;
        // The watcher asks again when the TTL runs out; a cache would only answer it stale.
        options.cache_size = 0;
        let resolver = builder
            .build()
            .map_err(|e| format!("cannot set up the resolver: {e}"))?;
        Ok(Lookup {
            resolver,
            config: config.clone(),
        })
    }

    /// Asks once, within the configured timeout.
    pub async fn ask(&self) -> Answer {
        let asked = tokio::time::timeout(self.config.timeout * 2, self.ask_unbounded()).await;
        asked.unwrap_or_else(|_| Answer::Failed {
            error: format!("no answer within {:?}", self.config.timeout * 2),
        })
    }

    async fn ask_unbounded(&self) -> Answer {
        match &self.config.name {
            DnsName::Address { host, port } => {
                let tls_name = self.config.https.then(|| host.clone());
                self.addresses(host, *port, self.config.weight, tls_name)
                    .await
            }
            DnsName::Service { name } => self.service(name).await,
        }
    }

    /// A and AAAA records of `host`, each with `port`.
    async fn addresses(
        &self,
        host: &str,
        port: u16,
        weight: NonZeroU32,
        tls_name: Option<String>,
    ) -> Answer {
        match self.resolver.lookup_ip(absolute(host)).await {
            Ok(lookup) => {
                let mut found: Vec<Found> = lookup
                    .iter()
                    .map(|ip: IpAddr| Found {
                        address: SocketAddr::new(ip, port),
                        weight,
                        tls_name: tls_name.clone(),
                    })
                    .collect();
                found.sort();
                found.dedup();
                Answer::Records {
                    found,
                    ttl: remaining(lookup.valid_until()),
                }
            }
            Err(error) => answer_for(&error),
        }
    }

    /// SRV records of `name`: the targets of the lowest priority present (the others are
    /// backups, RFC 2782), each of their addresses with the record's port and weight.
    async fn service(&self, name: &str) -> Answer {
        let lookup = match self.resolver.srv_lookup(absolute(name)).await {
            Ok(lookup) => lookup,
            Err(error) => return answer_for(&error),
        };
        let mut ttl = remaining(lookup.valid_until());
        let mut by_priority: BTreeMap<u16, Vec<(String, u16, u16)>> = BTreeMap::new();
        for record in lookup.answers() {
            if let RData::SRV(srv) = &record.data {
                let target = srv.target.to_ascii();
                by_priority
                    .entry(srv.priority)
                    .or_default()
                    .push((target, srv.port, srv.weight));
            }
        }
        let Some((_, targets)) = by_priority.into_iter().next() else {
            return Answer::Empty { ttl };
        };
        // The targets are asked at once: the whole answer stays within two lookup timeouts.
        let lookups = targets.into_iter().map(|(target, port, weight)| {
            // SRV weight 0 means "rarely": the smallest weight a backend can have.
            let weight = NonZeroU32::new(u32::from(weight)).unwrap_or(NonZeroU32::MIN);
            let tls_name = self
                .config
                .https
                .then(|| target.trim_end_matches('.').to_string());
            async move { self.addresses(&target, port, weight, tls_name).await }
        });
        let mut found = Vec::new();
        for answer in futures_util::future::join_all(lookups).await {
            match answer {
                Answer::Records {
                    found: addresses,
                    ttl: target_ttl,
                } => {
                    found.extend(addresses);
                    ttl = ttl.min(target_ttl);
                }
                // A target without addresses is skipped; a lookup that failed fails the answer,
                // so that a half-resolved set never replaces a whole one.
                Answer::Empty { .. } => {}
                failed @ Answer::Failed { .. } => return failed,
            }
        }
        found.sort();
        found.dedup();
        Answer::Records { found, ttl }
    }
}

fn name_server(addr: &SocketAddr) -> NameServerConfig {
    let mut udp = ConnectionConfig::udp();
    udp.port = addr.port();
    let mut tcp = ConnectionConfig::tcp();
    tcp.port = addr.port();
    NameServerConfig::new(addr.ip(), true, vec![udp, tcp])
}

/// The name made absolute, so that no search domain is tried before it.
fn absolute(name: &str) -> String {
    if name.ends_with('.') {
        name.to_string()
    } else {
        format!("{name}.")
    }
}

fn remaining(valid_until: Instant) -> Duration {
    valid_until.saturating_duration_since(Instant::now())
}

/// A lookup error as an answer: only a name server's own "no such records" is empty.
fn answer_for(error: &NetError) -> Answer {
    use hickory_resolver::net::DnsError;
    if let NetError::Dns(DnsError::NoRecordsFound(no_records)) = error {
        if matches!(
            no_records.response_code,
            ResponseCode::NXDomain | ResponseCode::NoError
        ) {
            let ttl = no_records
                .negative_ttl
                .map_or(Duration::ZERO, |s| Duration::from_secs(u64::from(s)));
            return Answer::Empty { ttl };
        }
    }
    Answer::Failed {
        error: error.to_string(),
    }
}
