//! writegate: a layer-7 load-balancing write proxy.
//!
//! A request flows one way through these modules:
//!
//! ```text
//! server (listener) → http1 (connection) → proxy (the service) → route (which route)
//!     → key (what the write is about) → coalesce (the key's queue) → balance (which backend)
//!     → upstream (pooled connection) → response
//! ```
//!
//! - [`config`]: the TOML schema and its validation into a typed [`config::Config`].
//! - [`snapshot`]: the immutable runtime state built from a config, swapped atomically.
//! - [`route`]: matching requests to routes.
//! - [`key`]: extracting the request key a route balances (and later coalesces) on.
//! - [`admission`]: admission limits, queues and shedding, with an adaptive limit.
//! - [`coalesce`]: per-key write queues: serialize, dedupe, last-write-wins, ordered reads.
//! - [`balance`]: choosing a backend: weighted least-connections, consistent hashing, bounded loads.
//! - [`upstream`]: backends' live state, carried across reloads, and their connection pools.
//! - [`proxy`]: the hyper service that forwards one request, with header rewriting and bodies.
//! - [`reload`]: watching the config file and swapping in the next snapshot.
//! - [`server`]: listeners, connection handling, timeouts and graceful shutdown.
//! - [`tls`]: rustls configs for listeners and https backends.
//! - [`admin`]: health and readiness endpoints on the admin listener.
//! - [`http1`]: HTTP/1.1 on the wire, both for client connections (one task each, no buffer while
//!   idle) and for backend connections (driven by the request's own task).
//! - [`error`]: the proxy's errors and their mapping to responses.
//! - [`notify`]: systemd readiness notifications.
//! - [`metrics`]: every metric name, described once.
//! - [`demo`]: the in-memory key-value backends and tour behind `writegate demo`.

pub mod admin;
pub mod admission;
pub mod balance;
pub mod coalesce;
pub mod config;
pub mod demo;
pub mod http1;
pub mod key;
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
