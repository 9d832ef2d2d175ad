//! least_conn over real backends: weights and load both steer requests.

mod support;

use std::time::Duration;

use http::Method;
use support::*;

/// Sends `total` requests from `clients` concurrent keep-alive connections.
async fn load(addr: std::net::SocketAddr, clients: usize, total: usize) {
    let per_client = total / clients;
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            tokio::spawn(async move {
                let mut client = Client::connect(addr).await;
                for _ in 0..per_client {
                    let reply = client.send(req(Method::POST, "/w", b"v")).await;
                    assert_eq!(reply.status, 200, "{}", reply.text());
                }
            })
        })
        .collect();
    for t in tasks {
        bounded("load client", t).await.unwrap();
    }
}

#[tokio::test]
async fn sequential_requests_follow_weights() {
    let heavy = named_backend("heavy", Duration::ZERO).await;
    let light = named_backend("light", Duration::ZERO).await;
    let proxy = start_proxy(&simple_config(&[(heavy.addr, 2), (light.addr, 1)], "")).await;
    load(proxy.addr, 1, 300).await;
    let (h, l) = (heavy.count(), light.count());
    assert_eq!(h + l, 300);
    assert!(
        (190..=210).contains(&h),
        "weight 2 of 3 should get ~200 of 300, got {h} (light {l})"
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_follow_weights() {
    let heavy = named_backend("heavy", Duration::from_millis(5)).await;
    let light = named_backend("light", Duration::from_millis(5)).await;
    let proxy = start_proxy(&simple_config(&[(heavy.addr, 2), (light.addr, 1)], "")).await;
    load(proxy.addr, 12, 600).await;
    let (h, l) = (heavy.count(), light.count());
    let share = h as f64 / (h + l) as f64;
    assert!(
        (0.58..=0.75).contains(&share),
        "weight 2 of 3 should get ~67%, got {share:.2} ({h}/{l})"
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_backend_gets_fewer_requests() {
    let fast = named_backend("fast", Duration::from_millis(1)).await;
    let slow = named_backend("slow", Duration::from_millis(40)).await;
    let proxy = start_proxy(&simple_config(&[(fast.addr, 1), (slow.addr, 1)], "")).await;
    load(proxy.addr, 8, 400).await;
    let (f, s) = (fast.count(), slow.count());
    assert_eq!(f + s, 400);
    assert!(
        s * 4 < f,
        "the slow backend should get far fewer: fast {f}, slow {s}"
    );
    // In-flight counts return to zero once every response is done.
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn equal_backends_share_evenly() {
    let backends = [
        named_backend("a", Duration::ZERO).await,
        named_backend("b", Duration::ZERO).await,
        named_backend("c", Duration::ZERO).await,
    ];
    let list: Vec<_> = backends.iter().map(|b| (b.addr, 1)).collect();
    let proxy = start_proxy(&simple_config(&list, "")).await;
    load(proxy.addr, 4, 600).await;
    for b in &backends {
        let c = b.count();
        assert!(
            (150..=250).contains(&c),
            "each of 3 should get ~200 of 600, got {c}"
        );
    }
    proxy.shutdown().await;
}
