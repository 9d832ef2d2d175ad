//! Durable write buffering, in one process: the modes, receipts, what a delivery carries, final
//! failures on the dead-letter list and their replay from the admin API, and peak shaving.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use support::*;

/// One route `r` (key: the second path segment) to `backend`, buffered into `dir` with `buffer`
/// lines; `route` lines go in the route's table.
fn buffered_config(backend: SocketAddr, dir: &Path, buffer: &str, route: &str) -> String {
    let route = format!(
        "key = \"path_segment:2\"\nretries = 0\n{route}\n\n[routes.buffer]\ndir = \"{}\"\n{buffer}",
        dir.display()
    );
    simple_config(&[(backend, 1)], &route)
}

/// A backend that answers `status` to its first `failures` requests, then 201.
async fn failing_first(failures: usize, status: StatusCode) -> TestBackend {
    let left = Arc::new(AtomicUsize::new(failures));
    backend(move |_| {
        let fail = left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        async move {
            if fail {
                let mut r = Response::new(Full::new(Bytes::from_static(b"not now")));
                *r.status_mut() = status;
                r
            } else {
                created()
            }
        }
    })
    .await
}

fn write(path: &str, body: &'static [u8]) -> Request<Full<Bytes>> {
    let mut request = req(Method::PUT, path, body);
    request
        .headers_mut()
        .insert("x-tenant", "acme".parse().unwrap());
    request
}

async fn receipt(addr: SocketAddr, location: &str) -> serde_json::Value {
    let reply = get(addr, location).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    serde_json::from_slice(&reply.body).unwrap()
}

/// Polls the receipt at `location` until its state is `state`.
async fn receipt_reaches(addr: SocketAddr, location: &str, state: &str) -> serde_json::Value {
    bounded(&format!("receipt {location} to reach {state}"), async {
        loop {
            let json = receipt(addr, location).await;
            if json["state"] == state {
                return json;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

fn created() -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(b"{\"saved\":true}")));
    *response.status_mut() = StatusCode::CREATED;
    response
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buffered_write_is_answered_202_and_delivered_as_it_was_sent() {
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens yet: the write waits in the log.
    let port = reserve_port();
    let proxy = start_proxy(&buffered_config(port.addr, dir.path(), "", "")).await;

    let accepted = send(proxy.addr, write("/kv/k1?v=1", b"one")).await;
    assert_eq!(accepted.status, StatusCode::ACCEPTED, "{}", accepted.text());
    let location = accepted.headers["location"].to_str().unwrap().to_string();
    assert!(location.starts_with("/_writegate/receipts/"), "{location}");
    assert!(!accepted.headers.contains_key("preference-applied"));
    let id = location.rsplit('/').next().unwrap().to_string();
    assert_eq!(id.len(), 32);
    let json: serde_json::Value = serde_json::from_slice(&accepted.body).unwrap();
    assert_eq!(json["receipt"], id.as_str());

    let pending = receipt(proxy.addr, &location).await;
    assert!(
        pending["state"] == "queued" || pending["state"] == "delivering",
        "{pending}"
    );

    let backend = backend_on(port, |_| async { created() });
    let done = receipt_reaches(proxy.addr, &location, "delivered").await;
    assert_eq!(done["status"], 201);
    assert_eq!(done["body"], "{\"saved\":true}");
    // The admin listener serves the same receipt.
    let admin = receipt(proxy.admin.unwrap(), &location).await;
    assert_eq!(admin["state"], "delivered");

    assert_eq!(backend.count(), 1);
    let sent = backend.last();
    assert_eq!(sent.method, Method::PUT);
    assert_eq!(sent.uri, "/kv/k1?v=1");
    assert_eq!(sent.body, "one");
    assert_eq!(sent.headers["x-tenant"], "acme");
    assert_eq!(sent.headers["idempotency-key"], id.as_str());
    assert_eq!(sent.headers["x-forwarded-for"], "127.0.0.1");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefer_mode_buffers_only_what_asks_for_it() {
    let dir = tempfile::tempdir().unwrap();
    let backend = backend(|_| async { created() }).await;
    let config = buffered_config(backend.addr, dir.path(), "when = \"prefer\"", "");
    let proxy = start_proxy(&config).await;

    let direct = send(proxy.addr, write("/kv/a", b"sync")).await;
    assert_eq!(direct.status, StatusCode::CREATED);

    let mut asking = write("/kv/a", b"async");
    asking
        .headers_mut()
        .insert("prefer", "wait=10, respond-async".parse().unwrap());
    let accepted = send(proxy.addr, asking).await;
    assert_eq!(accepted.status, StatusCode::ACCEPTED);
    assert_eq!(accepted.headers["preference-applied"], "respond-async");
    let location = accepted.headers["location"].to_str().unwrap();
    receipt_reaches(proxy.addr, location, "delivered").await;
    assert_eq!(backend.bodies(), [b"sync".to_vec(), b"async".to_vec()]);
    // Reads are never buffered.
    assert_eq!(get(proxy.addr, "/kv/a").await.status, StatusCode::CREATED);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_final_4xx_goes_to_the_dead_letters_and_can_be_replayed_by_hand() {
    let dir = tempfile::tempdir().unwrap();
    let backend = failing_first(1, StatusCode::UNPROCESSABLE_ENTITY).await;
    let proxy = start_proxy(&buffered_config(backend.addr, dir.path(), "", "")).await;
    let accepted = send(proxy.addr, write("/kv/x", b"v")).await;
    let location = accepted.headers["location"].to_str().unwrap().to_string();
    let failed = receipt_reaches(proxy.addr, &location, "failed").await;
    assert_eq!(failed["status"], 422);
    assert_eq!(backend.count(), 1, "a final 4xx is not retried");

    let admin = proxy.admin.unwrap();
    let state: serde_json::Value =
        serde_json::from_slice(&get(admin, "/buffers").await.body).unwrap();
    let log = &state["buffers"][0];
    assert_eq!(log["routes"][0], "r");
    assert_eq!(log["depth"], 0);
    let id = location.rsplit('/').next().unwrap();
    assert_eq!(log["dead_letters"][0]["receipt"], id);

    let unknown = send(
        admin,
        req(
            Method::POST,
            &format!("/buffers/replay/{}", "0".repeat(32)),
            b"",
        ),
    )
    .await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    let replayed = send(
        admin,
        req(Method::POST, &format!("/buffers/replay/{id}"), b""),
    )
    .await;
    assert_eq!(replayed.status, StatusCode::OK, "{}", replayed.text());
    let delivered = receipt_reaches(proxy.addr, &location, "delivered").await;
    assert_eq!(delivered["status"], 201);
    assert_eq!(backend.count(), 2);
    let state: serde_json::Value =
        serde_json::from_slice(&get(admin, "/buffers").await.body).unwrap();
    assert_eq!(state["buffers"][0]["dead_letters"], serde_json::json!([]));
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_5xx_is_retried_until_the_backend_takes_the_write() {
    let dir = tempfile::tempdir().unwrap();
    let backend = failing_first(2, StatusCode::SERVICE_UNAVAILABLE).await;
    let proxy = start_proxy(&buffered_config(backend.addr, dir.path(), "", "")).await;
    let accepted = send(proxy.addr, write("/kv/x", b"v")).await;
    let location = accepted.headers["location"].to_str().unwrap().to_string();
    let done = receipt_reaches(proxy.addr, &location, "delivered").await;
    assert_eq!(done["attempts"], 3, "{done}");
    assert_eq!(backend.count(), 3);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_receipts_are_404_and_reveal_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let backend = backend(|_| async { created() }).await;
    let proxy = start_proxy(&buffered_config(backend.addr, dir.path(), "", "")).await;
    let missing = get(
        proxy.addr,
        &format!("/_writegate/receipts/{}", "a".repeat(32)),
    )
    .await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    let garbage = get(proxy.addr, "/_writegate/receipts/../../etc/passwd").await;
    assert_eq!(garbage.status, StatusCode::NOT_FOUND);
    assert_eq!(backend.count(), 0);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overflow_buffers_what_admission_would_shed_and_drains_after_the_burst() {
    const CAPACITY: usize = 4;
    const CLIENTS: usize = 4 * CAPACITY;
    const WRITES_PER_CLIENT: usize = 25;
    let dir = tempfile::tempdir().unwrap();
    let backend = backend(|_| async {
        tokio::time::sleep(Duration::from_millis(5)).await;
        created()
    })
    .await;
    let admission = format!(
        "[routes.admission]\nmax_inflight = {CAPACITY}\nmax_queue = 2\nqueue_timeout = \"50ms\""
    );
    let config = buffered_config(backend.addr, dir.path(), "when = \"overflow\"", &admission);
    let proxy = start_proxy(&config).await;

    let (mut direct, mut buffered) = (0, 0);
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let addr = proxy.addr;
            tokio::spawn(async move {
                let mut client = Client::connect(addr).await;
                let mut statuses = Vec::new();
                for n in 0..WRITES_PER_CLIENT {
                    let path = format!("/kv/c{c}-{n}");
                    statuses.push(client.send(req(Method::PUT, &path, b"v")).await.status);
                }
                statuses
            })
        })
        .collect();
    for client in clients {
        for status in bounded("a client's writes", client).await.unwrap() {
            match status {
                StatusCode::CREATED => direct += 1,
                StatusCode::ACCEPTED => buffered += 1,
                other => panic!("a write was answered {other}, not 201 or 202"),
            }
        }
    }
    assert!(buffered > 0, "a burst of 4x capacity buffers some writes");
    assert!(direct > 0);
    let total = CLIENTS * WRITES_PER_CLIENT;
    eventually("the buffer drains to the backend", || {
        backend.count() == total
    })
    .await;
    assert!(
        backend.max_inflight.load(Ordering::SeqCst) <= CAPACITY,
        "the backend saw {} writes at once, above its limit {CAPACITY}",
        backend.max_inflight.load(Ordering::SeqCst)
    );
    let mut targets = backend.uris();
    targets.sort();
    targets.dedup();
    assert_eq!(targets.len(), total, "every write arrived once");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_below_min_free_refuses_writes_with_503() {
    let dir = tempfile::tempdir().unwrap();
    let backend = backend(|_| async { created() }).await;
    let config = buffered_config(backend.addr, dir.path(), "min_free = \"1000000GiB\"", "");
    let proxy = start_proxy(&config).await;
    let refused = send(proxy.addr, write("/kv/a", b"v")).await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused.headers["retry-after"], "1");
    assert!(
        refused.text().contains("write buffer"),
        "{}",
        refused.text()
    );
    assert_eq!(backend.count(), 0, "a refused write is not sent either");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_deliveries_in_flight_and_the_next_start_resumes_the_rest() {
    writegate::metrics::install();
    let dir = tempfile::tempdir().unwrap();
    let gate = Gate::default();
    let backend = gated_backend(&gate).await;
    let config = buffered_config(backend.addr, dir.path(), "concurrency = 2", "");
    let mut proxy = start_proxy(&config).await;
    for key in ["a", "b", "c", "d", "e"] {
        let accepted = send(proxy.addr, write(&format!("/kv/{key}"), b"v")).await;
        assert_eq!(accepted.status, StatusCode::ACCEPTED);
    }
    gate.entered().await;
    gate.entered().await;
    proxy.begin_shutdown();
    gate.release(2);
    proxy.wait_finished().await;
    assert_eq!(backend.count(), 2, "only the deliveries in flight finish");

    let proxy = start_proxy(&config).await;
    let scrape = get(proxy.admin.unwrap(), "/metrics").await.text();
    let resumed = format!(
        "writegate_buffer_resumed_total{{dir=\"{}\"}} 3",
        dir.path().display()
    );
    assert!(scrape.contains(&resumed), "no {resumed} in\n{scrape}");
    gate.release(3);
    eventually("the next start delivers the rest", || backend.count() == 5).await;
    let mut targets = backend.uris();
    targets.sort();
    assert_eq!(targets, ["/kv/a", "/kv/b", "/kv/c", "/kv/d", "/kv/e"]);
    proxy.shutdown().await;
}
