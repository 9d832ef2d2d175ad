//! The TOML file schema, exactly as an operator writes it.
//!
//! These types only describe shape: unknown fields are refused here, and every value that needs a
//! semantic check keeps its [`Spanned`] position so that validation (in `mod.rs`) can point at it.
//! `config.example.toml` documents every field and its default.

use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub runtime: Option<RuntimeSection>,
    pub log: Option<LogSection>,
    pub admin: Option<AdminSection>,
    #[serde(default)]
    pub listeners: Vec<ListenerSection>,
    #[serde(default)]
    pub upstreams: Vec<UpstreamSection>,
    #[serde(default)]
    pub routes: Vec<RouteSection>,
    pub cluster: Option<Spanned<ClusterSection>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnPeerDownKind {
    Local,
    Reject,
}

/// `[cluster]`: the writegate replicas that share per-key order.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    #[serde(rename = "self")]
    pub self_addr: Option<Spanned<String>>,
    pub peers: Option<Vec<Spanned<String>>>,
    pub discovery: Option<Spanned<DiscoverySection>>,
    pub secret: Option<Spanned<String>>,
    pub tls_ca: Option<Spanned<String>>,
    pub tls_cert: Option<Spanned<String>>,
    pub tls_key: Option<Spanned<String>>,
    pub on_peer_down: Option<Spanned<OnPeerDownKind>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeSection {
    pub workers: Option<Spanned<i64>>,
    pub shutdown_timeout: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSection {
    pub access_log: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    pub listen: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerSection {
    pub name: Spanned<String>,
    pub listen: Spanned<String>,
    pub header_read_timeout: Option<Spanned<String>>,
    pub idle_timeout: Option<Spanned<String>>,
    pub tls: Option<Spanned<TlsSection>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    pub cert: Spanned<String>,
    pub key: Spanned<String>,
    pub client_ca: Option<Spanned<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BalanceKind {
    LeastConn,
    ConsistentHash,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HashAlgorithmKind {
    Rendezvous,
    Ketama,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnMissingKeyKind {
    Reject,
    LeastConn,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSection {
    pub name: Spanned<String>,
    pub balance: Option<Spanned<BalanceKind>>,
    pub hash_algorithm: Option<Spanned<HashAlgorithmKind>>,
    pub hash_balance_factor: Option<Spanned<f64>>,
    pub hash_balance_min_inflight: Option<Spanned<i64>>,
    pub backends: Option<Spanned<Vec<BackendEntry>>>,
    pub discovery: Option<Spanned<DiscoverySection>>,
    pub max_inflight_per_backend: Option<Spanned<i64>>,
    pub tls_ca: Option<Spanned<String>>,
    pub admission: Option<Spanned<AdmissionSection>>,
    pub outlier_detection: Option<OutlierSection>,
    pub health_check: Option<HealthCheckSection>,
}

/// `discovery = { dns = "...", ... }`: backends from DNS.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiscoverySection {
    pub dns: Spanned<String>,
    pub resolvers: Option<Vec<Spanned<String>>>,
    pub min_refresh: Option<Spanned<String>>,
    pub max_refresh: Option<Spanned<String>>,
    pub timeout: Option<Spanned<String>>,
    pub empty_after: Option<Spanned<i64>>,
    pub weight: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdmissionSection {
    pub max_inflight: Spanned<i64>,
    pub max_queue: Option<Spanned<i64>>,
    pub queue_timeout: Option<Spanned<String>>,
    pub shed_status: Option<Spanned<i64>>,
    pub adaptive: Option<bool>,
    pub min_inflight: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutlierSection {
    pub consecutive_failures: Option<Spanned<i64>>,
    pub base_ejection_time: Option<Spanned<String>>,
    pub max_ejection_time: Option<Spanned<String>>,
    pub max_ejection_percent: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckSection {
    pub path: Spanned<String>,
    pub interval: Option<Spanned<String>>,
    pub timeout: Option<Spanned<String>>,
    pub healthy_threshold: Option<Spanned<i64>>,
    pub unhealthy_threshold: Option<Spanned<i64>>,
    pub expected_status: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendEntry {
    pub address: Spanned<String>,
    pub weight: Option<Spanned<i64>>,
    pub down: Option<bool>,
    pub max_inflight: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSection {
    pub name: Spanned<String>,
    pub path_prefix: Option<Spanned<String>>,
    pub host: Option<Spanned<String>>,
    pub methods: Option<Vec<Spanned<String>>>,
    pub upstream: Spanned<String>,
    pub timeouts: Option<TimeoutsSection>,
    pub max_body: Option<Spanned<String>>,
    pub key: Option<Spanned<String>>,
    pub on_missing_key: Option<Spanned<OnMissingKeyKind>>,
    pub max_key_length: Option<Spanned<String>>,
    pub coalesce: Option<Spanned<CoalesceSection>>,
    pub admission: Option<Spanned<AdmissionSection>>,
    pub retries: Option<Spanned<i64>>,
    pub retry_idempotent: Option<bool>,
    pub retry_budget: Option<Spanned<f64>>,
    pub idempotency: Option<Spanned<IdempotencySection>>,
    pub buffer: Option<Spanned<BufferSection>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BufferWhenKind {
    Always,
    Prefer,
    Overflow,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FallbackKind {
    None,
    Local,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BufferStoreKind {
    Log,
    Rabbitmq,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncKind {
    Always,
    Batch,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BufferSection {
    pub when: Option<BufferWhenKind>,
    pub store: Option<Spanned<BufferStoreKind>>,
    pub dir: Option<Spanned<String>>,
    pub amqp_url: Option<Spanned<String>>,
    pub queue: Option<Spanned<String>>,
    pub partitions: Option<Spanned<i64>>,
    pub prefetch: Option<Spanned<i64>>,
    pub publish_timeout: Option<Spanned<String>>,
    pub receipts_url: Option<Spanned<String>>,
    pub fallback: Option<Spanned<FallbackKind>>,
    pub fallback_dir: Option<Spanned<String>>,
    pub max_bytes: Option<Spanned<String>>,
    pub min_free: Option<Spanned<String>>,
    pub sync: Option<SyncKind>,
    pub ordered: Option<bool>,
    pub max_attempts: Option<Spanned<i64>>,
    pub max_age: Option<Spanned<String>>,
    pub concurrency: Option<Spanned<i64>>,
    pub receipt_ttl: Option<Spanned<String>>,
    pub receipt_body_limit: Option<Spanned<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdempotencyStoreKind {
    Memory,
    File,
    Redis,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConcurrentKind {
    Reject,
    Wait,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnIndeterminateKind {
    Reject,
    Forward,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnStoreErrorKind {
    Reject,
    Pass,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdempotencySection {
    pub header: Option<Spanned<String>>,
    pub methods: Option<Vec<Spanned<String>>>,
    pub required: Option<bool>,
    pub scope: Option<Vec<Spanned<String>>>,
    pub ttl: Option<Spanned<String>>,
    pub lease: Option<Spanned<String>>,
    pub forward_header: Option<bool>,
    pub concurrent: Option<ConcurrentKind>,
    pub on_indeterminate: Option<OnIndeterminateKind>,
    pub max_response_body: Option<Spanned<String>>,
    pub store: Option<Spanned<IdempotencyStoreKind>>,
    pub max_entries: Option<Spanned<i64>>,
    pub path: Option<Spanned<String>>,
    pub redis_url: Option<Spanned<String>>,
    pub store_timeout: Option<Spanned<String>>,
    pub on_store_error: Option<OnStoreErrorKind>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CoalesceModeKind {
    Off,
    Serialize,
    Dedupe,
    Latest,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoalesceSection {
    pub mode: Option<Spanned<CoalesceModeKind>>,
    pub methods: Option<Vec<Spanned<String>>>,
    pub order_reads: Option<Spanned<bool>>,
    pub max_pending_per_key: Option<Spanned<i64>>,
    pub max_wait: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeoutsSection {
    pub connect: Option<Spanned<String>>,
    pub response: Option<Spanned<String>>,
    pub backend_idle: Option<Spanned<String>>,
    pub client_body: Option<Spanned<String>>,
}
