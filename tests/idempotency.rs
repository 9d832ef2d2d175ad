//! Idempotency keys through the proxy (memory store): replays, conflicts, mismatches, what each
//! outcome of the first attempt leaves behind, and the problem documents clients get.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use support::*;

/// A backend that numbers the writes it applies: 201 "created-N" with `x-order: N`.
async fn counting_backend() -> (TestBackend, Arc<AtomicUsize>) {
    let applied = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&applied);
    let backend = backend(move |_| {
        let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            let mut response = Response::new(Full::new(Bytes::from(format!("created-{n}"))));
            *response.status_mut() = StatusCode::CREATED;
            response
                .headers_mut()
                .insert("x-order", n.to_string().parse().unwrap());
            response
        }
    })
    .await;
    (backend, applied)
}

fn keyed(method: Method, path: &str, key: &str, body: &'static [u8]) -> Request<Full<Bytes>> {
    let mut request = req(method, path, body);
    request
        .headers_mut()
        .insert("idempotency-key", key.parse().unwrap());
    request
}

fn config(backend: &TestBackend, idempotency: &str) -> String {
    simple_config(
        &[(backend.addr, 1)],
        &format!("\n[routes.idempotency]\n{idempotency}\n"),
    )
}

fn problem_type(reply: &Reply) -> String {
    assert_eq!(
        reply.headers["content-type"], "application/problem+json",
        "{reply:?}"
    );
    let doc: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(doc["status"], reply.status.as_u16(), "{doc}");
    doc["type"]
        .as_str()
        .unwrap()
        .rsplit('/')
        .next()
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn a_retry_gets_the_recorded_response_and_the_backend_applies_once() {
    let (backend, applied) = counting_backend().await;
    let proxy = start_proxy(&config(&backend, "")).await;
    let first = send(
        proxy.addr,
        keyed(Method::POST, "/orders", "\"ord-1\"", b"{\"n\":1}"),
    )
    .await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(first.body, "created-1");
    assert!(first.headers.get("idempotent-replayed").is_none());
    assert_eq!(
        backend.last().headers["idempotency-key"],
        "\"ord-1\"",
        "the key is forwarded"
    );
    // The bare token names the same key.
    for key in ["\"ord-1\"", "ord-1"] {
        let retry = send(
            proxy.addr,
            keyed(Method::POST, "/orders", key, b"{\"n\":1}"),
        )
        .await;
        assert_eq!(retry.status, StatusCode::CREATED);
        assert_eq!(retry.body, "created-1");
        assert_eq!(retry.headers["x-order"], "1");
        assert_eq!(retry.headers["idempotent-replayed"], "true");
    }
    // Over HTTP/2 too.
    let h2 = send_h2(
        proxy.addr,
        keyed(Method::POST, "/orders", "ord-1", b"{\"n\":1}"),
    )
    .await;
    assert_eq!(h2.body, "created-1");
    assert_eq!(applied.load(Ordering::SeqCst), 1);
    // Another key is another write.
    let other = send(
        proxy.addr,
        keyed(Method::POST, "/orders", "ord-2", b"{\"n\":1}"),
    )
    .await;
    assert_eq!(other.body, "created-2");
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_key_reused_for_another_request_gets_422() {
    let (backend, applied) = counting_backend().await;
    let proxy = start_proxy(&config(&backend, "")).await;
    send(proxy.addr, keyed(Method::POST, "/orders", "k", b"one")).await;
    for other in [
        keyed(Method::POST, "/orders", "k", b"two"),
        keyed(Method::POST, "/orders?x=1", "k", b"one"),
        keyed(Method::PUT, "/orders", "k", b"one"),
    ] {
        let reply = send(proxy.addr, other).await;
        assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(problem_type(&reply), "idempotency-key-reused");
    }
    assert_eq!(applied.load(Ordering::SeqCst), 1);
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_retry_while_the_first_is_in_flight_gets_409_then_the_replay() {
    let gate = Gate::default();
    let backend = gated_backend(&gate).await;
    let proxy = start_proxy(&config(&backend, "")).await;
    let addr = proxy.addr;
    let first = tokio::spawn(async move { send(addr, keyed(Method::POST, "/", "k", b"w")).await });
    gate.entered().await;
    let busy = send(addr, keyed(Method::POST, "/", "k", b"w")).await;
    assert_eq!(busy.status, StatusCode::CONFLICT);
    assert_eq!(busy.headers["retry-after"], "1");
    assert_eq!(problem_type(&busy), "idempotency-key-in-use");
    gate.release(1);
    assert_eq!(first.await.unwrap().body, "released");
    let replay = send(addr, keyed(Method::POST, "/", "k", b"w")).await;
    assert_eq!(replay.headers["idempotent-replayed"], "true");
    assert_eq!(backend.count(), 1);
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_burst_of_one_key_with_concurrent_wait_is_sent_once_and_all_get_its_response() {
    let gate = Gate::default();
    let backend = gated_backend(&gate).await;
    let proxy = start_proxy(&config(&backend, "concurrent = \"wait\"")).await;
    let addr = proxy.addr;
    let clients: Vec<_> = (0..40)
        .map(|_| tokio::spawn(async move { send(addr, keyed(Method::POST, "/", "k", b"w")).await }))
        .collect();
    gate.entered().await;
    // Let the others find the key taken before the first answers.
    tokio::time::sleep(Duration::from_millis(50)).await;
    gate.release(40);
    let mut replayed = 0;
    for client in clients {
        let reply = client.await.unwrap();
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.body, "released");
        replayed += usize::from(reply.headers.contains_key("idempotent-replayed"));
    }
    assert_eq!(backend.count(), 1, "the write was applied once");
    assert_eq!(replayed, 39);
    proxy.shutdown().await;
}

#[tokio::test]
async fn missing_and_malformed_keys_get_400_problems() {
    let (backend, applied) = counting_backend().await;
    let proxy = start_proxy(&config(&backend, "required = true")).await;
    let missing = send(proxy.addr, req(Method::POST, "/", b"w")).await;
    assert_eq!(missing.status, StatusCode::BAD_REQUEST);
    assert_eq!(problem_type(&missing), "idempotency-key-missing");
    for bad in ["\"\"", "has space", "\"open", &"k".repeat(256)] {
        let reply = send(proxy.addr, keyed(Method::POST, "/", bad, b"w")).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{bad}");
        assert_eq!(problem_type(&reply), "idempotency-key-invalid");
    }
    // Reads are not covered: they pass without a key.
    assert_eq!(get(proxy.addr, "/").await.status, StatusCode::CREATED);
    assert_eq!(applied.load(Ordering::SeqCst), 1);
    proxy.shutdown().await;
}

#[tokio::test]
async fn without_required_a_request_with_no_key_passes_unprotected() {
    let (backend, applied) = counting_backend().await;
    let proxy = start_proxy(&config(&backend, "")).await;
    send(proxy.addr, req(Method::POST, "/", b"w")).await;
    send(proxy.addr, req(Method::POST, "/", b"w")).await;
    assert_eq!(applied.load(Ordering::SeqCst), 2);
    proxy.shutdown().await;
}

#[tokio::test]
async fn error_responses_of_a_backend_are_recorded_too() {
    let backend = status_backend(StatusCode::INTERNAL_SERVER_ERROR).await;
    let proxy = start_proxy(&config(&backend, "")).await;
    let first = send(proxy.addr, keyed(Method::POST, "/", "k", b"w")).await;
    assert_eq!(first.status, StatusCode::INTERNAL_SERVER_ERROR);
    let retry = send(proxy.addr, keyed(Method::POST, "/", "k", b"w")).await;
    assert_eq!(retry.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(retry.body, "backend says no");
    assert_eq!(retry.headers["idempotent-replayed"], "true");
    assert_eq!(backend.count(), 1);
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_request_that_reached_no_backend_releases_its_key() {
    let refused = refused_addr().await;
    let toml = simple_config(&[(refused, 1)], "retries = 0\n[routes.idempotency]\n");
    let proxy = start_proxy(&toml).await;
    for _ in 0..2 {
        let reply = send(proxy.addr, keyed(Method::POST, "/", "k", b"w")).await;
        assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
        // The proxy's plain error each time: the retry was sent again, not answered "unknown".
        assert!(
            reply.headers["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/plain"),
            "{reply:?}"
        );
    }
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_request_that_may_have_reached_a_backend_is_never_sent_again() {
    let (addr, hits) = resetting_backend().await;
    let toml = simple_config(&[(addr, 1)], "retries = 0\n[routes.idempotency]\n");
    let proxy = start_proxy(&toml).await;
    let first = send(proxy.addr, keyed(Method::POST, "/", "k", b"w")).await;
    assert_eq!(first.status, StatusCode::BAD_GATEWAY);
    let retry = send(proxy.addr, keyed(Method::POST, "/", "k", b"w")).await;
    assert_eq!(retry.status, StatusCode::BAD_GATEWAY);
    assert_eq!(problem_type(&retry), "idempotency-outcome-unknown");
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    proxy.shutdown().await;

    // For a backend that dedupes on the forwarded key, the retry may go again.
    let toml = simple_config(
        &[(addr, 1)],
        "retries = 0\n[routes.idempotency]\non_indeterminate = \"forward\"\n",
    );
    let proxy = start_proxy(&toml).await;
    send(proxy.addr, keyed(Method::POST, "/", "k", b"w")).await;
    let retry = send(proxy.addr, keyed(Method::POST, "/", "k", b"w")).await;
    assert!(retry.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    assert_eq!(hits.load(Ordering::SeqCst), 3);
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_response_too_large_to_keep_reaches_the_client_and_is_not_sent_again() {
    let big = Bytes::from(vec![b'x'; 10_000]);
    let body = big.clone();
    let backend = backend(move |_| {
        let body = body.clone();
        async move { Response::new(Full::new(body)) }
    })
    .await;
    let proxy = start_proxy(&config(&backend, "max_response_body = \"4KiB\"")).await;
    let first = send(proxy.addr, keyed(Method::POST, "/", "k", b"w")).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.body, big, "the whole body, streamed past the limit");
    let retry = send(proxy.addr, keyed(Method::POST, "/", "k", b"w")).await;
    assert_eq!(retry.status, StatusCode::OK, "the original status");
    assert_eq!(problem_type(&retry), "idempotency-response-not-kept");
    assert_eq!(retry.headers["idempotent-replayed"], "true");
    assert_eq!(backend.count(), 1);
    proxy.shutdown().await;
}

#[tokio::test]
async fn scope_keeps_tenants_apart_and_forward_header_can_hide_the_key() {
    let (backend, applied) = counting_backend().await;
    let toml = config(
        &backend,
        "scope = [\"header:authorization\"]\nforward_header = false",
    );
    let proxy = start_proxy(&toml).await;
    let as_tenant = |tenant: &str| {
        let mut request = keyed(Method::POST, "/", "same-key", b"w");
        request
            .headers_mut()
            .insert("authorization", format!("Bearer {tenant}").parse().unwrap());
        request
    };
    let a = send(proxy.addr, as_tenant("a")).await;
    let b = send(proxy.addr, as_tenant("b")).await;
    assert_eq!(
        (a.body.as_ref(), b.body.as_ref()),
        (&b"created-1"[..], &b"created-2"[..])
    );
    assert!(backend.last().headers.get("idempotency-key").is_none());
    assert_eq!(send(proxy.addr, as_tenant("a")).await.body, "created-1");
    assert_eq!(send(proxy.addr, as_tenant("b")).await.body, "created-2");
    assert_eq!(applied.load(Ordering::SeqCst), 2);
    proxy.shutdown().await;
}

#[tokio::test]
async fn coalesced_routes_record_per_client_key() {
    let (backend, applied) = counting_backend().await;
    let toml = simple_config(
        &[(backend.addr, 1)],
        "key = \"path_segment:1\"\n[routes.coalesce]\nmode = \"serialize\"\n[routes.idempotency]\n",
    );
    let proxy = start_proxy(&toml).await;
    let first = send(proxy.addr, keyed(Method::PUT, "/row7", "k1", b"v")).await;
    let retry = send(proxy.addr, keyed(Method::PUT, "/row7", "k1", b"v")).await;
    assert_eq!(first.body, retry.body);
    assert_eq!(retry.headers["idempotent-replayed"], "true");
    assert_eq!(applied.load(Ordering::SeqCst), 1);
    proxy.shutdown().await;
}

#[tokio::test]
async fn idempotency_outcomes_are_counted() {
    writegate::metrics::install();
    let (backend, _) = counting_backend().await;
    let proxy = start_proxy(&config(&backend, "")).await;
    send(proxy.addr, keyed(Method::POST, "/", "count-me", b"w")).await;
    send(proxy.addr, keyed(Method::POST, "/", "count-me", b"w")).await;
    send(proxy.addr, keyed(Method::POST, "/", "count-me", b"other")).await;
    let admin = proxy.admin.unwrap();
    let metrics = get(admin, "/metrics").await.text();
    for outcome in ["recorded", "replayed", "mismatch"] {
        let line =
            format!("writegate_idempotency_requests_total{{route=\"r\",outcome=\"{outcome}\"}}");
        assert!(metrics.contains(&line), "{line} missing:\n{metrics}");
    }
    assert!(metrics
        .contains("writegate_idempotency_store_seconds_bucket{store=\"memory\",op=\"claim\""));
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_store_that_does_not_answer_fails_closed_or_passes_as_configured() {
    let (backend, applied) = counting_backend().await;
    let unreachable = format!(
        "store = \"redis\"\nredis_url = \"redis://127.0.0.1:{}/0\"\nstore_timeout = \"300ms\"",
        processes::free_port()
    );
    let proxy = start_proxy(&config(&backend, &unreachable)).await;
    let reply = send(proxy.addr, keyed(Method::POST, "/", "k", b"w")).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(problem_type(&reply), "idempotency-store-unavailable");
    assert_eq!(reply.headers["retry-after"], "1");
    assert_eq!(
        applied.load(Ordering::SeqCst),
        0,
        "nothing sent unprotected"
    );
    proxy.shutdown().await;

    let passing = format!("{unreachable}\non_store_error = \"pass\"");
    let proxy = start_proxy(&config(&backend, &passing)).await;
    let reply = send(proxy.addr, keyed(Method::POST, "/", "k", b"w")).await;
    assert_eq!(reply.status, StatusCode::CREATED);
    assert_eq!(applied.load(Ordering::SeqCst), 1);
    proxy.shutdown().await;
}
