//! writegate: a layer-7 load-balancing write proxy.
//!
//! A request flows one way through these modules:
//!
//! ```text
//! server (listener) → http1 (connection) → proxy (the pipeline) → route (which route)
//!     → key (what the write is about) → idempotency (a retry replays) → cluster (the replica that
//!     owns the key) → coalesce (the key's queue) → admission → balance (which backend)
//!     → upstream (pooled connection) → response
//! ```
//!
//! The modules are layered; each uses only those on lower lines (`tests/layering.rs` keeps it so):
//!
//! 12. [`demo`]: the in-memory key-value backends and tour behind `writegate demo`.
//! 11. [`server`]: listeners, connection handling, timeouts and graceful shutdown.
//! 10. [`admin`]: health, readiness, status and metrics on the admin listener.
//! 9. [`reload`]: watching the config file and swapping in the next snapshot.
//! 8. [`proxy`]: the request pipeline composing everything below, and the one mapping of errors
//!    to responses.
//! 7. [`snapshot`]: the immutable runtime state built from a config, swapped atomically.
//! 6. [`route`]: matching requests to routes. [`upstream`]: backends' live state, carried across
//!    reloads, their connection pools and health checks. Above them, [`cluster`]: which writegate
//!    replica owns a key, and the signed marker of a write forwarded to it.
//! 5. [`admission`]: limits, queues and shedding. [`balance`]: choosing a backend (least
//!    connections, consistent hashing, bounded loads). [`coalesce`]: per-key write queues.
//!    [`idempotency`]: idempotency keys, their records and stores. [`buffer`]: durable write
//!    buffering, receipts and delivery. [`discovery`]: backends from DNS, watched for changes.
//! 4. [`config`]: the TOML schema and its validation into a typed [`config::Config`].
//! 3. [`http1`]: HTTP/1.1 for client connections (serving a [`http1::server::Handler`]) and
//!    backend connections. [`key`]: the request key a route balances and coalesces on.
//! 2. [`wire`]: HTTP messages as they pass through: framing, header lines, requests, bodies.
//! 1. [`metrics`]: every metric name, described once. [`notify`]: systemd notifications.
//!    [`tls`]: rustls configs. [`log_writer`]: log lines gathered per thread, written in blocks. [`group_commit`]: one writer thread per embedded database. [`byte_form`]: stored records' bytes.

pub mod admin;
pub mod admission;
pub mod balance;
pub mod buffer;
pub mod byte_form;
pub mod cluster;
pub mod coalesce;
pub mod config;
pub mod demo;
pub mod discovery;
pub mod group_commit;
pub mod http1;
pub mod idempotency;
pub mod key;
pub mod log_writer;
pub mod metrics;
pub mod notify;
pub mod proxy;
pub mod reload;
pub mod route;
pub mod server;
pub mod snapshot;
pub mod tls;
pub mod upstream;
pub mod wire;
