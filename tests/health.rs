//! Backend health and safe retries over real sockets.

mod support;

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Response, StatusCode};
use http_body_util::Full;
use support::*;
use writegate::upstream::clock_ms;

/// A backend that answers `status` (changeable), with its own name in the body.
async fn switchable_backend(name: &'static str, status: Arc<AtomicU16>) -> TestBackend {
    backend(move |_| {
        let status = Arc::clone(&status);
        async move {
            let mut response = Response::new(Full::new(Bytes::from(name)));
            *response.status_mut() = StatusCode::from_u16(status.load(Ordering::SeqCst)).unwrap();
            response
        }
    })
    .await
}

fn upstream_extra(config: String, extra: &str) -> String {
    config.replace("[[routes]]", &format!("{extra}\n\n[[routes]]"))
}

#[tokio::test]
async fn a_refused_connection_is_retried_on_another_backend() {
    let dead = refused_addr().await;
    let good = named_backend("good", Duration::ZERO).await;
    let proxy = start_proxy(&simple_config(&[(dead, 1), (good.addr, 1)], "")).await;
    let mut client = Client::connect(proxy.addr).await;
    for _ in 0..6 {
        let reply = client.send(req(Method::POST, "/w", b"v")).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    assert_eq!(
        good.count(),
        6,
        "every write landed once, on the live backend"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_write_that_reached_a_backend_is_never_retried() {
    let (resetting, hits) = resetting_backend().await;
    let good = named_backend("good", Duration::ZERO).await;
    // The first pick of a fresh least_conn upstream is its first backend.
    let proxy = start_proxy(&simple_config(&[(resetting, 1), (good.addr, 1)], "")).await;
    let reply = send(proxy.addr, req(Method::POST, "/w", b"v")).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    assert_eq!(
        good.count(),
        0,
        "the POST may have been applied: it is not sent again"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn idempotent_requests_are_retried_only_when_the_route_allows() {
    let (resetting, hits) = resetting_backend().await;
    let good = named_backend("good", Duration::ZERO).await;
    let backends = [(resetting, 1), (good.addr, 1)];
    let proxy = start_proxy(&simple_config(&backends, "retry_idempotent = true")).await;
    let reply = send(proxy.addr, req(Method::PUT, "/w", b"v")).await;
    assert_eq!(
        reply.status, 200,
        "a PUT is idempotent: retried on the other backend"
    );
    assert_eq!((hits.load(Ordering::SeqCst), good.count()), (1, 1));
    assert_eq!(good.last().body, "v", "the retried PUT carried its body");
    proxy.shutdown().await;
    // A POST is never retried once sent, whatever the route says.
    let proxy = start_proxy(&simple_config(&backends, "retry_idempotent = true")).await;
    let reply = send(proxy.addr, req(Method::POST, "/w", b"v")).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    assert_eq!(good.count(), 1);
    proxy.shutdown().await;
}

#[tokio::test]
async fn consecutive_failures_eject_a_backend_until_its_time_is_up() {
    let failing_status = Arc::new(AtomicU16::new(500));
    let failing = switchable_backend("failing", Arc::clone(&failing_status)).await;
    let good = named_backend("good", Duration::ZERO).await;
    let config = upstream_extra(
        simple_config(&[(failing.addr, 1), (good.addr, 1)], ""),
        "[upstreams.outlier_detection]\nconsecutive_failures = 2\nbase_ejection_time = \"400ms\"",
    );
    let proxy = start_proxy(&config).await;
    let mut client = Client::connect(proxy.addr).await;
    for _ in 0..10 {
        client.send(req(Method::GET, "/", b"")).await;
    }
    assert_eq!(
        failing.count(),
        2,
        "two failures in a row, then no more requests"
    );
    let member = proxy.snapshots.load().upstreams[0].members[0].clone();
    assert!(member.backend.health.is_ejected(clock_ms()));
    // The ejection ends; the backend, fixed meanwhile, is back in rotation.
    failing_status.store(200, Ordering::SeqCst);
    eventually("the ejection to end", || {
        !member.backend.health.is_ejected(clock_ms())
    })
    .await;
    for _ in 0..4 {
        assert_eq!(client.send(req(Method::GET, "/", b"")).await.status, 200);
    }
    assert!(
        failing.count() > 2,
        "the recovered backend receives requests again"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn no_more_than_max_ejection_percent_is_ejected() {
    let status = Arc::new(AtomicU16::new(500));
    let a = switchable_backend("a", Arc::clone(&status)).await;
    let b = switchable_backend("b", Arc::clone(&status)).await;
    let config = upstream_extra(
        simple_config(&[(a.addr, 1), (b.addr, 1)], ""),
        "[upstreams.outlier_detection]\nconsecutive_failures = 1\nmax_ejection_percent = 50",
    );
    let proxy = start_proxy(&config).await;
    let mut client = Client::connect(proxy.addr).await;
    for _ in 0..10 {
        assert_eq!(client.send(req(Method::GET, "/", b"")).await.status, 500);
    }
    let snapshot = proxy.snapshots.load();
    let ejected = snapshot.upstreams[0]
        .members
        .iter()
        .filter(|m| m.backend.health.is_ejected(clock_ms()))
        .count();
    assert_eq!(
        ejected, 1,
        "half of two backends: one may be ejected, never both"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn active_checks_take_a_backend_out_and_bring_it_back() {
    let health = Arc::new(AtomicU16::new(200));
    let checked = {
        let health = Arc::clone(&health);
        backend(move |r| {
            let health = Arc::clone(&health);
            async move {
                let status = if r.uri.path() == "/health" {
                    health.load(Ordering::SeqCst)
                } else {
                    200
                };
                let mut response = Response::new(Full::new(Bytes::from_static(b"checked")));
                *response.status_mut() = StatusCode::from_u16(status).unwrap();
                response
            }
        })
        .await
    };
    let config = upstream_extra(
        simple_config(&[(checked.addr, 1)], ""),
        "[upstreams.health_check]\npath = \"/health\"\ninterval = \"50ms\"\ntimeout = \"1s\"\nhealthy_threshold = 2\nunhealthy_threshold = 2",
    );
    let proxy = start_proxy(&config).await;
    let admin = proxy.admin.unwrap();
    let member = proxy.snapshots.load().upstreams[0].members[0].clone();
    eventually("a first check", || checked.count() >= 1).await;
    assert_eq!(get(proxy.addr, "/work").await.status, 200);
    health.store(503, Ordering::SeqCst);
    eventually("the backend to be marked down", || {
        member.backend.health.actively_down()
    })
    .await;
    let started = std::time::Instant::now();
    let reply = get(proxy.addr, "/work").await;
    assert_eq!(
        reply.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "no usable backend"
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "answered at once, not after a timeout"
    );
    let status: serde_json::Value =
        serde_json::from_str(&get(admin, "/status").await.text()).unwrap();
    let backend = &status["upstreams"][0]["backends"][0];
    assert_eq!(backend["failing_health_checks"], true);
    assert!(
        backend["last_health_check_failure"]
            .as_str()
            .is_some_and(|r| r.contains("503")),
        "{backend}"
    );
    assert!(backend["last_state_change"].as_f64().is_some(), "{backend}");
    assert_eq!(status["upstreams"][0]["ready"], false);
    assert_eq!(get(admin, "/readyz").await.status, StatusCode::OK);
    assert_eq!(
        get(admin, "/readyz/upstream/up").await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    health.store(200, Ordering::SeqCst);
    eventually("the backend to be healthy again", || {
        !member.backend.health.actively_down()
    })
    .await;
    assert_eq!(get(proxy.addr, "/work").await.status, 200);
    assert_eq!(get(admin, "/readyz/upstream/up").await.status, 200);
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_backend_at_its_limit_is_skipped_like_a_full_one() {
    let gate = Gate::default();
    let a = gated_backend(&gate).await;
    let b = gated_backend(&gate).await;
    let list = format!(
        "{{ address = \"{}\", max_inflight = 1 }}, {{ address = \"{}\", max_inflight = 1 }}",
        a.addr, b.addr
    );
    let config = simple_config(&[], "key = \"path\"").replace(
        "backends = []",
        &format!("balance = \"consistent_hash\"\nbackends = [{list}]"),
    );
    let proxy = start_proxy(&config).await;
    let addr = proxy.addr;
    let first = tokio::spawn(async move { send(addr, req(Method::PUT, "/kv/hot", b"1")).await });
    gate.entered().await;
    let second = tokio::spawn(async move { send(addr, req(Method::PUT, "/kv/hot", b"2")).await });
    gate.entered().await;
    assert_eq!(
        (a.count(), b.count()),
        (1, 1),
        "the key's second request went to its next backend"
    );
    let third = send(proxy.addr, req(Method::PUT, "/kv/hot", b"3")).await;
    assert_eq!(
        third.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "both at their limit: no usable backend"
    );
    gate.release(2);
    for r in [first, second] {
        assert_eq!(bounded("reply", r).await.unwrap().status, 200);
    }
    proxy.shutdown().await;
}

#[tokio::test]
async fn with_consistent_hashing_a_retry_goes_to_the_keys_next_backend() {
    let dead = refused_addr().await;
    let b1 = named_backend("b1", Duration::ZERO).await;
    let b2 = named_backend("b2", Duration::ZERO).await;
    let list = format!(
        "{{ address = \"{dead}\" }}, {{ address = \"{}\" }}, {{ address = \"{}\" }}",
        b1.addr, b2.addr
    );
    let config = simple_config(&[], "key = \"path\"").replace(
        "backends = []",
        &format!("balance = \"consistent_hash\"\nbackends = [{list}]"),
    );
    let proxy = start_proxy(&config).await;
    let snapshot = proxy.snapshots.load_full();
    let upstream = &snapshot.upstreams[0];
    // Keys whose own backend is the dead one (member 0), and where each should go next.
    let mut expected = Vec::new();
    for i in 0..200 {
        let path = format!("/kv/{i}");
        let hash = upstream.balancer.hash_key(path.as_bytes());
        let own = upstream
            .balancer
            .pick(&upstream.members, hash, 0, |_| true)
            .unwrap()
            .member;
        if own == 0 {
            let next = upstream
                .balancer
                .pick(&upstream.members, hash, 0, |m| m != 0)
                .unwrap()
                .member;
            expected.push((path, if next == 1 { "b1" } else { "b2" }));
        }
    }
    assert!(
        expected.len() > 20,
        "about a third of the keys belong to the dead backend"
    );
    let mut client = Client::connect(proxy.addr).await;
    for (path, next) in expected.iter().take(8) {
        let reply = client.send(req(Method::PUT, path, b"v")).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(
            reply.text(),
            *next,
            "{path} retried on its own next backend"
        );
    }
    proxy.shutdown().await;
}
