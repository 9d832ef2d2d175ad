//! Metric names, each a constant documented here and described once at start-up.
//!
//! The library only records through the `metrics` macros; `main` installs the Prometheus recorder
//! (without one, recording is a no-op). Labels are bounded: route, upstream and backend names come
//! from the config; never a key, a path or a client address. Hot-path counters are registered once
//! per config snapshot and kept as handles, so recording is one atomic add.

use std::sync::OnceLock;

use metrics::{describe_counter, describe_gauge, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Counter, labels `upstream`, `backend`: requests the balancer sent to each backend.
pub const BACKEND_PICKS: &str = "writegate_backend_picks_total";
/// Counter, label `upstream`: requests that left their key's own backend because it was at its
/// bounded-load capacity.
pub const HASH_SPILLS: &str = "writegate_hash_spills_total";

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the Prometheus recorder for this process (once; later calls return the same handle).
/// Call it before building a proxy so that its counters record.
pub fn install() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_ok() {
            describe();
        } else {
            tracing::warn!("a metrics recorder was already installed; /metrics will be empty");
        }
        handle
    })
}

/// The installed recorder's handle, if [`install`] was called.
pub fn handle() -> Option<&'static PrometheusHandle> {
    HANDLE.get()
}

/// Counter, labels `route`, `outcome` (`sent`, `deduplicated`, `superseded`, `dropped`): client
/// writes on coalescing routes by how they were carried out; `dropped` counts writes removed
/// unsent because every client of them left.
pub const COALESCE_OUTCOMES: &str = "writegate_coalesce_outcomes_total";
/// Gauge, label `route`: keys with writes or reads pending or in flight.
pub const COALESCE_KEYS_ACTIVE: &str = "writegate_coalesce_keys_active";
/// Counter, labels `route`, `reason` (`queue_full`, `wait_timeout`): requests refused by a key queue.
pub const COALESCE_REJECTED: &str = "writegate_coalesce_rejected_total";

/// Counter, labels `upstream`, `backend`: ejections by passive outlier detection.
pub const BACKEND_EJECTIONS: &str = "writegate_backend_ejections_total";

/// Counter, labels `scope` (`route`, `upstream`), `name`: requests admitted by an admission limit.
pub const ADMISSION_ADMITTED: &str = "writegate_admission_admitted_total";
/// Counter, labels `scope`, `name`, `reason` (`queue_full`, `queue_timeout`): requests shed.
pub const ADMISSION_REJECTED: &str = "writegate_admission_rejected_total";
/// Gauge, labels `scope`, `name`: requests waiting for an admission slot.
pub const ADMISSION_QUEUE_DEPTH: &str = "writegate_admission_queue_depth";
/// Gauge, labels `scope`, `name`: the current limit (moves when adaptive).
pub const ADMISSION_LIMIT: &str = "writegate_admission_limit";

/// Gauge, labels `upstream`, `backend`: 1 while active health checks pass, 0 while they fail.
pub const BACKEND_HEALTHY: &str = "writegate_backend_healthy";

/// Counter, label `result` (`success`, `failure`): config reload attempts.
pub const CONFIG_RELOADS: &str = "writegate_config_reloads_total";
/// Gauge: Unix time of the last successful config reload.
pub const CONFIG_LAST_RELOAD_SUCCESS: &str =
    "writegate_config_last_reload_success_timestamp_seconds";

/// Counter, label `listener`: TLS handshakes that failed or timed out.
pub const TLS_HANDSHAKE_FAILURES: &str = "writegate_tls_handshake_failures_total";

/// Registers help texts with the installed recorder.
fn describe() {
    describe_counter!(
        BACKEND_PICKS,
        Unit::Count,
        "Requests sent to each backend by the balancer."
    );
    describe_counter!(
        HASH_SPILLS,
        Unit::Count,
        "Requests that spilled from their key's backend to the next one because of bounded loads."
    );
    describe_counter!(
        COALESCE_OUTCOMES,
        Unit::Count,
        "Client writes on coalescing routes by outcome."
    );
    describe_gauge!(
        COALESCE_KEYS_ACTIVE,
        Unit::Count,
        "Keys with writes or reads pending or in flight."
    );
    describe_counter!(
        COALESCE_REJECTED,
        Unit::Count,
        "Requests refused by a key queue, by reason."
    );
}
