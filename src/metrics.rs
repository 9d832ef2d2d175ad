//! Metric names, each a constant documented here and described once at start-up.
//!
//! The library only records through the `metrics` macros; `main` installs the Prometheus recorder
//! (without one, recording is a no-op). Labels are bounded: route, upstream and backend names come
//! from the config; never a key, a path or a client address. Hot-path counters are registered once
//! per config snapshot and kept as handles, so recording is one atomic add.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use std::time::Duration;

use http::{Method, StatusCode};
use metrics::{describe_counter, describe_gauge, describe_histogram, Counter, Histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Counter, labels `route` (`-` when none matched), `method`, `status_class` (`1xx`..`5xx`):
/// client requests, counted when their response head is ready.
pub const REQUESTS: &str = "writegate_requests_total";
/// Histogram, label `route`: time from receiving a request to its response head.
pub const REQUEST_DURATION: &str = "writegate_request_duration_seconds";
/// Counter, labels `upstream`, `backend`, `status_class` (`1xx`..`5xx`, or `error` when no
/// response came): requests sent to backends, retries included.
pub const UPSTREAM_REQUESTS: &str = "writegate_upstream_requests_total";
/// Histogram, labels `upstream`, `backend`: time from sending a request to its response head.
pub const UPSTREAM_DURATION: &str = "writegate_upstream_response_seconds";
/// Counter, labels `upstream`, `backend`: exchanges cut off because the backend sent or took
/// nothing for the route's `backend_idle` while a body was under way.
pub const BACKEND_STALLS: &str = "writegate_backend_stalls_total";
/// Counter, label `route`: requests whose client sent no body bytes for the route's
/// `client_body` timeout.
pub const CLIENT_BODY_TIMEOUTS: &str = "writegate_client_body_timeouts_total";
/// Gauge, labels `upstream`, `backend`: requests in flight to the backend.
pub const BACKEND_INFLIGHT: &str = "writegate_backend_inflight";

/// Gauge, label `listener`: keep-alive client connections waiting for a quiet client without a
/// task of their own (see [`crate::http1::idle`]).
pub const PARKED_CONNECTIONS: &str = "writegate_client_connections_parked";

/// Counter, label `backend`: connections opened to a backend (the pool reuses them).
pub const UPSTREAM_CONNECTIONS: &str = "writegate_upstream_connections_total";

/// Histogram buckets (seconds) for every duration metric.
pub const DURATION_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// How often the recorded samples are folded into the histograms' buckets. The recorder keeps
/// every sample until then, so the fold's length grows with the interval: every 5 s (the
/// exporter's default) it took 2.5 ms of the proxy's core at 24k requests/s, a stall for the
/// requests behind it, and its samples raised peak RSS by 4 MB; every 100 ms it takes about 50 µs.
const UPKEEP_EVERY: Duration = Duration::from_millis(100);

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
        let builder = PrometheusBuilder::new();
        let builder = match builder
            .set_buckets(&DURATION_BUCKETS)
            .and_then(|b| b.set_buckets_for_metric(Matcher::Full(BUFFER_BATCH.into()), &BATCH_BUCKETS))
        {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "histogram buckets rejected; durations become summaries");
                PrometheusBuilder::new()
            }
        };
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        let upkeep = handle.clone();
        std::thread::Builder::new()
            .name("metrics-upkeep".into())
            .spawn(move || loop {
                std::thread::sleep(UPKEEP_EVERY);
                upkeep.run_upkeep();
            })
            .ok();
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

/// Counter, labels `route`, `outcome` (`recorded`, `replayed`, `conflict`, `mismatch`, `missing`,
/// `invalid`, `indeterminate`, `unknown`, `store_error`, `released`, `unprotected`): requests on
/// routes with idempotency keys, by what happened to them (see README).
pub const IDEMPOTENCY_REQUESTS: &str = "writegate_idempotency_requests_total";
/// Histogram, labels `store`, `op` (`claim`, `record`, `indeterminate`, `release`): time an
/// idempotency store took to answer, timeouts included.
pub const IDEMPOTENCY_STORE_DURATION: &str = "writegate_idempotency_store_seconds";
/// Gauge, label `store`: entries an idempotency store holds (memory and file stores).
pub const IDEMPOTENCY_ENTRIES: &str = "writegate_idempotency_entries";
/// Counter, label `store`: entries a full memory store evicted before their ttl ran out.
pub const IDEMPOTENCY_EVICTIONS: &str = "writegate_idempotency_evictions_total";

/// Counter, label `route`: writes taken into a buffer (answered 202).
pub const BUFFER_ACCEPTED: &str = "writegate_buffer_accepted_total";
/// Counter, label `route`: buffered writes delivered (the backend answered 1xx-3xx).
pub const BUFFER_DELIVERED: &str = "writegate_buffer_delivered_total";
/// Counter, label `route`: delivery attempts that will be retried.
pub const BUFFER_RETRIED: &str = "writegate_buffer_retried_total";
/// Counter, label `route`: buffered writes that failed (a final 4xx, or attempts or age used
/// up) and went to the dead-letter list.
pub const BUFFER_FAILED: &str = "writegate_buffer_failed_total";
/// Counter, labels `route`, `reason` (`full`, `error`): writes the buffer could not take (503).
pub const BUFFER_REFUSED: &str = "writegate_buffer_refused_total";
/// Gauge, label `dir`: writes waiting in a buffer's log (set at each scrape).
pub const BUFFER_DEPTH: &str = "writegate_buffer_depth";
/// Gauge, label `dir`: bytes of the writes waiting in a buffer's log (set at each scrape).
pub const BUFFER_BYTES: &str = "writegate_buffer_bytes";
/// Gauge, label `dir`: age in seconds of the oldest write waiting in a buffer's log (0: none).
pub const BUFFER_OLDEST: &str = "writegate_buffer_oldest_seconds";
/// Counter, label `dir`: writes found waiting when a buffer's log opened (a restart resumes them;
/// after a crash, the ones in delivery at that moment may reach the backend again).
pub const BUFFER_RESUMED: &str = "writegate_buffer_resumed_total";
/// Histogram, label `dir`: time of one commit of a buffer's log, fsync included.
pub const BUFFER_COMMIT: &str = "writegate_buffer_commit_seconds";
/// Histogram, label `dir`: operations (appends, outcomes) that shared one commit.
pub const BUFFER_BATCH: &str = "writegate_buffer_commit_batch";
/// Histogram, label `queue`: time from publishing a buffered write to RabbitMQ to its confirm.
pub const BUFFER_PUBLISH: &str = "writegate_buffer_publish_seconds";
/// Gauge, label `queue`: 1 while this replica is the consumer of a RabbitMQ partition (from its
/// first message since subscribing until the connection ends).
pub const BUFFER_PARTITION_ACTIVE: &str = "writegate_buffer_partition_active";
/// Counter, label `queue`: messages RabbitMQ delivered again (a consumer before this one ended
/// without acknowledging them).
pub const BUFFER_REDELIVERED: &str = "writegate_buffer_redelivered_total";
/// Counter, label `queue`: writes a RabbitMQ buffer kept in its local fallback log while the
/// broker could not be reached (forwarded to it later).
pub const BUFFER_SPOOLED: &str = "writegate_buffer_spooled_total";
/// Counter, labels `upstream`, `result` (`records`, `empty`, `failed`): DNS lookups of an
/// upstream's discovery name.
pub const DISCOVERY_LOOKUPS: &str = "writegate_discovery_lookups_total";
/// Counter, label `upstream`: answers that changed an upstream's discovered backends.
pub const DISCOVERY_CHANGES: &str = "writegate_discovery_changes_total";
/// Gauge, label `upstream`: backends an upstream's discovery has in service.
pub const DISCOVERY_BACKENDS: &str = "writegate_discovery_backends";
/// Counter, label `peer`: writes forwarded to the replica that owns their key.
pub const CLUSTER_FORWARDED: &str = "writegate_cluster_forwarded_total";
/// Counter: writes received from a peer with a valid marker, ordered here.
pub const CLUSTER_RECEIVED: &str = "writegate_cluster_received_total";
/// Counter, labels `peer`, `reason` (`unreachable`, `failed`): forwards that got no response.
pub const CLUSTER_PEER_ERRORS: &str = "writegate_cluster_peer_errors_total";
/// Counter: requests refused for a `writegate-hop` marker no peer signed.
pub const CLUSTER_FORGED: &str = "writegate_cluster_forged_total";
/// Counter: writes ordered here because their owner was unreachable (`on_peer_down = "local"`).
pub const CLUSTER_LOCAL_FALLBACKS: &str = "writegate_cluster_local_fallbacks_total";
/// Buckets of [`BUFFER_BATCH`].
pub const BATCH_BUCKETS: [f64; 9] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 512.0];

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
/// Gauge, label `version`: always 1, to join the build to other series.
pub const BUILD_INFO: &str = "writegate_build_info";

/// Registers help texts with the installed recorder.
fn describe() {
    describe_counter!(
        REQUESTS,
        Unit::Count,
        "Client requests by route, method and status class."
    );
    describe_histogram!(
        REQUEST_DURATION,
        Unit::Seconds,
        "Time from a request to its response head."
    );
    describe_counter!(
        UPSTREAM_REQUESTS,
        Unit::Count,
        "Requests sent to backends, by status class."
    );
    describe_histogram!(
        UPSTREAM_DURATION,
        Unit::Seconds,
        "Backend time to response head."
    );
    describe_counter!(
        BACKEND_STALLS,
        Unit::Count,
        "Exchanges cut off because the backend stalled for backend_idle mid-body."
    );
    describe_counter!(
        CLIENT_BODY_TIMEOUTS,
        Unit::Count,
        "Requests whose client sent no body bytes for the route's client_body timeout."
    );
    describe_gauge!(
        BACKEND_INFLIGHT,
        Unit::Count,
        "Requests in flight to each backend."
    );
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
    describe_counter!(
        IDEMPOTENCY_REQUESTS,
        Unit::Count,
        "Requests on routes with idempotency keys, by outcome."
    );
    describe_histogram!(
        IDEMPOTENCY_STORE_DURATION,
        Unit::Seconds,
        "Time an idempotency store took to answer, by operation."
    );
    describe_gauge!(
        IDEMPOTENCY_ENTRIES,
        Unit::Count,
        "Entries held by an idempotency store."
    );
    describe_counter!(
        IDEMPOTENCY_EVICTIONS,
        Unit::Count,
        "Idempotency entries evicted from a full memory store before their ttl."
    );
    describe_counter!(
        BUFFER_ACCEPTED,
        Unit::Count,
        "Writes taken into a buffer (202)."
    );
    describe_counter!(BUFFER_DELIVERED, Unit::Count, "Buffered writes delivered.");
    describe_counter!(
        BUFFER_RETRIED,
        Unit::Count,
        "Delivery attempts of buffered writes that will be retried."
    );
    describe_counter!(
        BUFFER_FAILED,
        Unit::Count,
        "Buffered writes that failed and went to the dead-letter list."
    );
    describe_counter!(
        BUFFER_REFUSED,
        Unit::Count,
        "Writes a buffer could not take (503), by reason."
    );
    describe_counter!(
        BUFFER_RESUMED,
        Unit::Count,
        "Writes found waiting when a buffer's log opened."
    );
    describe_gauge!(
        BUFFER_DEPTH,
        Unit::Count,
        "Writes waiting in a buffer's log."
    );
    describe_gauge!(
        BUFFER_BYTES,
        Unit::Bytes,
        "Bytes of the writes waiting in a buffer's log."
    );
    describe_gauge!(
        BUFFER_OLDEST,
        Unit::Seconds,
        "Age of the oldest write waiting in a buffer's log."
    );
    describe_histogram!(
        BUFFER_COMMIT,
        Unit::Seconds,
        "Time of one commit of a buffer's log, fsync included."
    );
    describe_histogram!(
        BUFFER_BATCH,
        Unit::Count,
        "Operations that shared one commit of a buffer's log."
    );
    describe_histogram!(
        BUFFER_PUBLISH,
        Unit::Seconds,
        "Time from publishing a buffered write to RabbitMQ to the broker's confirm."
    );
    describe_gauge!(
        BUFFER_PARTITION_ACTIVE,
        Unit::Count,
        "1 while this replica consumes a RabbitMQ partition of a buffer."
    );
    describe_counter!(
        BUFFER_SPOOLED,
        Unit::Count,
        "Writes a RabbitMQ buffer kept in its local fallback log while the broker was away."
    );
    describe_counter!(
        BUFFER_REDELIVERED,
        Unit::Count,
        "Messages of a buffer RabbitMQ delivered again after a consumer ended."
    );
    describe_counter!(
        CLUSTER_FORWARDED,
        Unit::Count,
        "Writes forwarded to the replica that owns their key."
    );
    describe_counter!(
        CLUSTER_RECEIVED,
        Unit::Count,
        "Writes received from a peer replica and ordered here."
    );
    describe_counter!(
        CLUSTER_PEER_ERRORS,
        Unit::Count,
        "Forwards to a peer replica that got no response, by reason."
    );
    describe_counter!(
        CLUSTER_FORGED,
        Unit::Count,
        "Requests refused for a writegate-hop marker no peer signed."
    );
    describe_counter!(
        CLUSTER_LOCAL_FALLBACKS,
        Unit::Count,
        "Writes ordered here because the replica owning their key was unreachable."
    );
    describe_counter!(
        DISCOVERY_LOOKUPS,
        Unit::Count,
        "DNS lookups of an upstream's discovery name, by result (records, empty, failed)."
    );
    describe_counter!(
        DISCOVERY_CHANGES,
        Unit::Count,
        "DNS answers that changed an upstream's discovered backends."
    );
    describe_gauge!(
        DISCOVERY_BACKENDS,
        Unit::Count,
        "Backends an upstream's DNS discovery has in service."
    );
    describe_gauge!(
        PARKED_CONNECTIONS,
        Unit::Count,
        "Keep-alive client connections quiet for 100 ms or more, waiting without a task of their own."
    );
    describe_counter!(
        UPSTREAM_CONNECTIONS,
        Unit::Count,
        "Connections opened to each backend (the pool reuses them)."
    );
    describe_counter!(
        BACKEND_EJECTIONS,
        Unit::Count,
        "Ejections of each backend by passive outlier detection."
    );
    describe_counter!(
        ADMISSION_ADMITTED,
        Unit::Count,
        "Requests admitted by an admission limit."
    );
    describe_counter!(
        ADMISSION_REJECTED,
        Unit::Count,
        "Requests shed by an admission limit, by reason."
    );
    describe_gauge!(
        ADMISSION_QUEUE_DEPTH,
        Unit::Count,
        "Requests waiting for an admission slot."
    );
    describe_gauge!(
        ADMISSION_LIMIT,
        Unit::Count,
        "The current admission limit (it moves when adaptive)."
    );
    describe_gauge!(
        BACKEND_HEALTHY,
        "1 while a backend passes its active health checks, 0 while it fails them."
    );
    describe_counter!(
        CONFIG_RELOADS,
        Unit::Count,
        "Config reload attempts, by result."
    );
    describe_gauge!(
        CONFIG_LAST_RELOAD_SUCCESS,
        Unit::Seconds,
        "Unix time of the last successful config reload."
    );
    describe_counter!(
        TLS_HANDSHAKE_FAILURES,
        Unit::Count,
        "TLS handshakes that failed or timed out, by listener."
    );
    describe_gauge!(
        BUILD_INFO,
        "Always 1; the version label says which writegate build runs."
    );
    metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
}

/// The `process_*` families Prometheus client libraries export, read from `/proc` at scrape
/// time (the recorder has no collector hook): CPU seconds, resident memory, open and allowed
/// file descriptors, start time. Empty where `/proc` is not there.
pub fn process_metrics() -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let Some(stat) = ProcStat::read() else {
        return out;
    };
    let field = |n: usize| stat.field(n);
    let ticks = clock_ticks();
    // SAFETY: sysconf only reads a system constant.
    let page = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        p if p > 0 => p as f64,
        _ => 4096.0,
    };
    let mut family = |name: &str, kind: &str, help: &str, value: Option<f64>| {
        if let Some(value) = value {
            let _ = write!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
            );
        }
    };
    let cpu = field(14).zip(field(15)).map(|(u, s)| (u + s) / ticks);
    family(
        "process_cpu_seconds_total",
        "counter",
        "User and system CPU time spent in seconds.",
        cpu,
    );
    family(
        "process_resident_memory_bytes",
        "gauge",
        "Resident memory size in bytes.",
        field(24).map(|pages| pages * page),
    );
    family(
        "process_start_time_seconds",
        "gauge",
        "Start time of the process since unix epoch in seconds.",
        stat.start_time(),
    );
    let open = std::fs::read_dir("/proc/self/fd")
        .ok()
        .map(|d| d.count() as f64);
    family(
        "process_open_fds",
        "gauge",
        "Number of open file descriptors.",
        open,
    );
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct it is given.
    let max = (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0)
        .then_some(limit.rlim_cur as f64);
    family(
        "process_max_fds",
        "gauge",
        "Maximum number of open file descriptors.",
        max,
    );
    out
}

/// This process's `/proc/self/stat`, split into fields.
struct ProcStat {
    /// The fields after the command name (which is in parentheses and may hold spaces).
    fields: Vec<String>,
}

impl ProcStat {
    fn read() -> Option<ProcStat> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        let (_, rest) = stat.rsplit_once(')')?;
        Some(ProcStat {
            fields: rest.split_whitespace().map(str::to_string).collect(),
        })
    }

    /// Field `n`, numbered as proc(5) numbers them (from 1; the first after the name is 3).
    fn field(&self, n: usize) -> Option<f64> {
        self.fields.get(n.checked_sub(3)?)?.parse().ok()
    }

    /// When the process started, in Unix seconds: boot time plus the start's clock ticks.
    fn start_time(&self) -> Option<f64> {
        let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("btime ")?.trim().parse::<f64>().ok())
        })?;
        Some(boot + self.field(22)? / clock_ticks())
    }
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf only reads a system constant.
    match unsafe { libc::sysconf(libc::_SC_CLK_TCK) } {
        t if t > 0 => t as f64,
        _ => 100.0,
    }
}

/// Unix time in seconds at which this process started, where `/proc` tells.
pub fn process_start_time() -> Option<f64> {
    ProcStat::read()?.start_time()
}

/// The methods that get their own label value; the rest count as `other`.
const METHODS: [Method; 7] = [
    Method::GET,
    Method::HEAD,
    Method::POST,
    Method::PUT,
    Method::PATCH,
    Method::DELETE,
    Method::OPTIONS,
];
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

fn class_index(status: StatusCode) -> usize {
    (status.as_u16() / 100).clamp(1, 5) as usize - 1
}

/// A route's request counters and duration histogram, registered once per config snapshot so
/// that recording a request is an atomic add and a bucket push.
#[derive(Debug)]
pub struct RouteMetrics {
    /// Indexed by method (`METHODS`, then `other`) × 5 + status class.
    requests: Box<[Counter]>,
    duration: Histogram,
    /// The same requests as plain counts, readable for `/status` (the recorder's are not).
    answered: AtomicU64,
    server_errors: AtomicU64,
    /// Requests by duration, in [`DURATION_BUCKETS`] (the last slot is above them all).
    latency: [AtomicU64; DURATION_BUCKETS.len() + 1],
}

impl RouteMetrics {
    pub fn new(route: &str) -> RouteMetrics {
        let methods = METHODS.iter().map(Method::as_str).chain(["other"]);
        let requests = methods
            .flat_map(|m| {
                CLASSES.iter().map(move |c| {
                    metrics::counter!(REQUESTS, "route" => route.to_string(), "method" => m, "status_class" => *c)
                })
            })
            .collect();
        RouteMetrics {
            requests,
            duration: metrics::histogram!(REQUEST_DURATION, "route" => route.to_string()),
            answered: AtomicU64::new(0),
            server_errors: AtomicU64::new(0),
            latency: Default::default(),
        }
    }

    pub fn record(&self, method: &Method, status: StatusCode, took: Duration) {
        let m = METHODS
            .iter()
            .position(|x| x == method)
            .unwrap_or(METHODS.len());
        self.requests[m * CLASSES.len() + class_index(status)].increment(1);
        self.duration.record(took.as_secs_f64());
        self.answered.fetch_add(1, Ordering::Relaxed);
        let seconds = took.as_secs_f64();
        let slot = DURATION_BUCKETS
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(DURATION_BUCKETS.len());
        self.latency[slot].fetch_add(1, Ordering::Relaxed);
        if status.is_server_error() {
            self.server_errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Requests by duration bucket (bounds: [`DURATION_BUCKETS`], then everything above).
    pub fn latency_counts(&self) -> Vec<u64> {
        self.latency
            .iter()
            .map(|count| count.load(Ordering::Relaxed))
            .collect()
    }

    /// Requests answered under this config, and how many with a 5xx, for `/status`.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.answered.load(Ordering::Relaxed),
            self.server_errors.load(Ordering::Relaxed),
        )
    }
}

/// One backend's counters as one upstream sees it.
#[derive(Debug, Clone)]
pub struct BackendMetrics {
    pub upstream: Box<str>,
    /// 1xx..5xx, then `error`.
    requests: [Counter; 6],
    duration: Histogram,
    pub inflight: metrics::Gauge,
    /// Exchanges cut off because the backend stalled for `backend_idle`.
    pub stalls: Counter,
}

impl BackendMetrics {
    pub fn new(upstream: &str, backend: &str) -> BackendMetrics {
        let counter = |class: &'static str| metrics::counter!(UPSTREAM_REQUESTS, "upstream" => upstream.to_string(), "backend" => backend.to_string(), "status_class" => class);
        BackendMetrics {
            upstream: upstream.into(),
            stalls: metrics::counter!(BACKEND_STALLS, "upstream" => upstream.to_string(), "backend" => backend.to_string()),
            requests: [
                counter("1xx"),
                counter("2xx"),
                counter("3xx"),
                counter("4xx"),
                counter("5xx"),
                counter("error"),
            ],
            duration: metrics::histogram!(UPSTREAM_DURATION, "upstream" => upstream.to_string(), "backend" => backend.to_string()),
            inflight: metrics::gauge!(BACKEND_INFLIGHT, "upstream" => upstream.to_string(), "backend" => backend.to_string()),
        }
    }

    pub fn responded(&self, status: StatusCode, took: Duration) {
        self.requests[class_index(status)].increment(1);
        self.duration.record(took.as_secs_f64());
    }

    pub fn failed(&self) {
        self.requests[5].increment(1);
    }
}
