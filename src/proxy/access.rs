//! The access log: one line per request, written when its response has been sent whole (or
//! abandoned), so that its duration is the client's (nginx's `$request_time`, HAProxy's `Tt`),
//! with the time to the response head beside it.
//!
//! Requests refused because the proxy is at a limit (admission sheds, key queues) get their access
//! line and a counter, not a warning each: under overload that would be a warning per request,
//! when the operator needs one line saying how many. [`OverloadSummary`] writes that line at most
//! every ten seconds.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Method, Uri};

use super::headers;

/// What one request's access line says; filled in along the way, written on drop.
#[derive(Debug)]
pub struct AccessLine {
    pub started: Instant,
    /// When the response head was ready.
    pub head_at: Instant,
    pub client: IpAddr,
    pub method: Method,
    pub uri: Uri,
    pub status: u16,
    pub route: Option<Arc<str>>,
    pub backend: Option<Arc<str>>,
    /// The client's `X-Request-Id`, or the one the proxy generated.
    pub request_id: RequestId,
    /// Sends after the first, to other backends.
    pub retries: u32,
    /// How the request was carried out, when not plainly: the coalescing disposition
    /// (`sent`, `deduplicated`, `superseded`), or the error's label (`shed`, `connect_failed`, ...).
    pub outcome: &'static str,
    /// The request body's declared length (`None` when chunked).
    pub bytes_in: Option<u64>,
    /// Response body bytes handed to the connection.
    pub bytes_out: u64,
    /// Whether the response body was read to its end (false: the client or backend left).
    pub complete: bool,
}

/// A request id as logged: the client's, or the proxy's number for one it generated.
#[derive(Debug, Default)]
pub enum RequestId {
    #[default]
    None,
    Client(Box<str>),
    Generated(u64),
}

impl Drop for AccessLine {
    fn drop(&mut self) {
        let now = Instant::now();
        let mut generated = [0u8; 32];
        let request_id = match &self.request_id {
            RequestId::None => "-",
            RequestId::Client(id) => id,
            RequestId::Generated(number) => {
                headers::request_id(*number, &mut generated);
                std::str::from_utf8(&generated).unwrap_or("-")
            }
        };
        tracing::info!(
            target: "writegate::access",
            client = %self.client,
            method = %self.method,
            path = self.uri.path(),
            status = self.status,
            route = self.route.as_deref().unwrap_or("-"),
            backend = self.backend.as_deref().unwrap_or("-"),
            request_id,
            retries = self.retries,
            outcome = self.outcome,
            bytes_in = self.bytes_in,
            bytes_out = self.bytes_out,
            complete = self.complete,
            head_us = micros(self.head_at - self.started),
            duration_us = micros(now.saturating_duration_since(self.started)),
        );
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Counts requests refused at a limit and says so in one `warn` line every ten seconds at most.
pub struct OverloadSummary {
    refused: AtomicU64,
    last_line_ms: AtomicU64,
}

/// Shortest time between two summary lines.
const SUMMARY_EVERY: Duration = Duration::from_secs(10);

impl OverloadSummary {
    pub const fn new() -> OverloadSummary {
        OverloadSummary {
            refused: AtomicU64::new(0),
            last_line_ms: AtomicU64::new(0),
        }
    }

    /// Counts one refusal (`reason`, a label) at `now_ms` ([`crate::upstream::clock_ms`]); writes
    /// the summary when the last one is old enough.
    pub fn note(&self, reason: &'static str, now_ms: u64) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        let last = self.last_line_ms.load(Ordering::Relaxed);
        let due = last == 0 || now_ms.saturating_sub(last) >= SUMMARY_EVERY.as_millis() as u64;
        // One thread wins the right to write the line; the others just count.
        if due
            && self
                .last_line_ms
                .compare_exchange(last, now_ms.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let refused = self.refused.swap(0, Ordering::Relaxed);
            tracing::warn!(
                refused,
                last = reason,
                "requests refused at admission or key-queue limits since the last such line \
                 (see writegate_admission_rejected_total and writegate_coalesce_rejected_total)"
            );
        }
    }
}

impl Default for OverloadSummary {
    fn default() -> OverloadSummary {
        OverloadSummary::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first refusal is reported at once; the next ones are counted into the line written
    /// ten seconds later, not one line each.
    #[test]
    fn refusals_are_summarized_not_logged_each() {
        let summary = OverloadSummary::new();
        summary.note("shed", 1_000);
        assert_eq!(
            summary.refused.load(Ordering::Relaxed),
            0,
            "reported at once"
        );
        for ms in [1_001, 5_000, 10_999] {
            summary.note("shed", ms);
        }
        assert_eq!(
            summary.refused.load(Ordering::Relaxed),
            3,
            "counted, not logged"
        );
        summary.note("key_queue_full", 11_000);
        assert_eq!(
            summary.refused.load(Ordering::Relaxed),
            0,
            "the next line, 10 s on"
        );
        assert_eq!(summary.last_line_ms.load(Ordering::Relaxed), 11_000);
    }
}
