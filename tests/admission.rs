//! Admission control over real sockets: limits, queues, shedding, and the adaptive limit.

mod support;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Response, StatusCode};
use http_body_util::Full;
use support::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use writegate::admission::Limiter;

fn route_limiter(proxy: &TestProxy) -> Arc<Limiter> {
    proxy.snapshots.load().router.routes()[0]
        .admission
        .clone()
        .expect("the route has an admission limit")
}

fn admission(lines: &str) -> String {
    format!("\n[routes.admission]\n{lines}\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_shed_fast_and_admitted_requests_all_succeed() {
    let gate = Gate::default();
    let b = gated_backend(&gate).await;
    let config = simple_config(
        &[(b.addr, 1)],
        &admission("max_inflight = 4\nmax_queue = 4\nqueue_timeout = \"10s\""),
    );
    let proxy = start_proxy(&config).await;
    let limiter = route_limiter(&proxy);
    let addr = proxy.addr;
    // 4× more clients than max_inflight + max_queue, all at once.
    let clients: Vec<_> = (0..32)
        .map(|_| {
            tokio::spawn(async move {
                let started = Instant::now();
                let reply = send(addr, req(Method::POST, "/w", b"v")).await;
                (reply, started.elapsed())
            })
        })
        .collect();
    for _ in 0..4 {
        gate.entered().await;
    }
    eventually("4 requests queued", || limiter.queued() == 4).await;
    eventually("the 24 excess requests to be answered", || {
        clients.iter().filter(|c| c.is_finished()).count() == 24
    })
    .await;
    // Everything else has been shed already, while the admitted ones are still held.
    let mut shed = 0;
    let mut admitted = Vec::new();
    for c in clients {
        if c.is_finished() {
            let (reply, took) = c.await.unwrap();
            assert_eq!(
                reply.status,
                StatusCode::SERVICE_UNAVAILABLE,
                "{}",
                reply.text()
            );
            assert!(reply.headers.contains_key("retry-after"));
            assert!(
                reply
                    .text()
                    .contains("at its limit of 4 requests in flight and its queue of 4 is full"),
                "{}",
                reply.text()
            );
            assert!(took < Duration::from_secs(1), "shed at once, took {took:?}");
            shed += 1;
        } else {
            admitted.push(c);
        }
    }
    assert_eq!(shed + admitted.len(), 32);
    assert_eq!(admitted.len(), 8, "4 in flight and 4 queued are kept");
    gate.release(8);
    for c in admitted {
        let (reply, _) = bounded("admitted reply", c).await.unwrap();
        assert_eq!(reply.status, 200);
    }
    assert!(
        b.max_inflight.load(Ordering::SeqCst) <= 4,
        "the backend never saw more than the limit"
    );
    assert_eq!(b.count(), 8, "shed requests never reached the backend");
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_queued_request_waits_at_most_queue_timeout() {
    let gate = Gate::default();
    let b = gated_backend(&gate).await;
    let config = simple_config(
        &[(b.addr, 1)],
        &admission("max_inflight = 1\nqueue_timeout = \"200ms\"\nshed_status = 429"),
    );
    let proxy = start_proxy(&config).await;
    let addr = proxy.addr;
    let held = tokio::spawn(async move { send(addr, req(Method::POST, "/w", b"1")).await });
    gate.entered().await;
    let started = Instant::now();
    let late = send(proxy.addr, req(Method::POST, "/w", b"2")).await;
    assert!(started.elapsed() >= Duration::from_millis(150));
    assert_eq!(
        late.status,
        StatusCode::TOO_MANY_REQUESTS,
        "shed_status = 429"
    );
    assert!(
        late.text().contains("waited too long in its queue"),
        "{}",
        late.text()
    );
    let retry: u64 = late.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry >= 1);
    gate.release(1);
    assert_eq!(bounded("held", held).await.unwrap().status, 200);
    assert_eq!(b.count(), 1);
    proxy.shutdown().await;
}

/// A request whose client leaves while it waits for admission leaves the queue and is never
/// sent: the client cannot learn what became of its write, so the write must not happen.
#[tokio::test]
async fn a_queued_write_whose_client_left_is_never_sent() {
    let gate = Gate::default();
    let b = gated_backend(&gate).await;
    // A queue timeout far beyond the test's bounded waits: only noticing the departure empties it.
    let config = simple_config(
        &[(b.addr, 1)],
        &admission("max_inflight = 1\nqueue_timeout = \"1h\""),
    );
    let proxy = start_proxy(&config).await;
    let limiter = route_limiter(&proxy);
    let addr = proxy.addr;
    let held = tokio::spawn(async move { send(addr, req(Method::POST, "/w", b"1")).await });
    gate.entered().await;
    // A whole write, body included, queued behind the held one; then its client goes away.
    let mut leaving = bounded("connect", TcpStream::connect(addr)).await.unwrap();
    leaving
        .write_all(b"POST /w HTTP/1.1\r\nHost: w\r\nContent-Length: 1\r\n\r\n2")
        .await
        .unwrap();
    eventually("the write to queue", || limiter.queued() == 1).await;
    drop(leaving);
    eventually("the departed client's write to leave the queue", || {
        limiter.queued() == 0
    })
    .await;
    gate.release(2);
    assert_eq!(bounded("held", held).await.unwrap().status, 200);
    let next = send(addr, req(Method::POST, "/w", b"3")).await;
    assert_eq!(next.status, 200);
    assert_eq!(b.count(), 2, "the departed client's write was sent");
    proxy.shutdown().await;
}

#[tokio::test]
async fn merged_writes_take_one_slot() {
    let gate = Gate::default();
    let b = gated_backend(&gate).await;
    let config = simple_config(
        &[(b.addr, 1)],
        "key = \"path\"\n\n[routes.coalesce]\nmode = \"latest\"\n\n[routes.admission]\nmax_inflight = 1\nmax_queue = 0",
    );
    let proxy = start_proxy(&config).await;
    let coalescer = proxy.snapshots.load().router.routes()[0]
        .coalescer
        .clone()
        .unwrap();
    let addr = proxy.addr;
    let mut writes = vec![tokio::spawn(async move {
        send(addr, req(Method::PUT, "/kv/a", b"1")).await
    })];
    gate.entered().await;
    for i in 1..6 {
        writes.push(tokio::spawn(async move {
            send(addr, req(Method::PUT, "/kv/a", b"n")).await
        }));
        eventually("the write to queue on its key", || {
            coalescer.waiting(b"/kv/a") == i
        })
        .await;
    }
    gate.release(2);
    for w in writes {
        assert_eq!(
            bounded("write", w).await.unwrap().status,
            200,
            "no write was shed"
        );
    }
    assert_eq!(b.count(), 2, "one slot, two upstream writes, six clients");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_adaptive_limit_settles_near_the_backends_capacity() {
    // The backend serves at most K requests at once; more wait, so latency grows past K.
    const K: usize = 5;
    let capacity = Arc::new(tokio::sync::Semaphore::new(K));
    let b = backend(move |_| {
        let capacity = Arc::clone(&capacity);
        async move {
            let _slot = capacity.acquire().await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            Response::new(Full::new(Bytes::from_static(b"ok")))
        }
    })
    .await;
    let config = simple_config(
        &[(b.addr, 1)],
        &admission("max_inflight = 100\nmin_inflight = 1\nmax_queue = 10000\nqueue_timeout = \"30s\"\nadaptive = true"),
    );
    let proxy = start_proxy(&config).await;
    let limiter = route_limiter(&proxy);
    let addr = proxy.addr;
    let deadline = Instant::now() + Duration::from_secs(4);
    let clients: Vec<_> = (0..30)
        .map(|_| {
            tokio::spawn(async move {
                let mut client = Client::connect(addr).await;
                while Instant::now() < deadline {
                    assert_eq!(client.send(req(Method::POST, "/w", b"v")).await.status, 200);
                }
            })
        })
        .collect();
    // Watch the limit over the last 1.5 s, once it has had time to find the capacity.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        seen.push(limiter.limit());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for c in clients {
        bounded("client", c).await.unwrap();
    }
    seen.sort_unstable();
    let median = seen[seen.len() / 2];
    assert!(
        (K..=3 * K).contains(&median),
        "the limit should settle near the capacity {K}, saw {seen:?}"
    );
    proxy.shutdown().await;
}
