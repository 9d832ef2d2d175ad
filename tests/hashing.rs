//! Keyed routing over real HTTP: key sources, key errors, stickiness, determinism across processes,
//! bounded-load spills and the metrics that count them.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use support::*;

/// A consistent_hash upstream over `backends` and one route keyed by `key` (plus `route_extra`).
fn hash_config(
    backends: &[std::net::SocketAddr],
    key: &str,
    upstream_extra: &str,
    route_extra: &str,
) -> String {
    let list: Vec<String> = backends
        .iter()
        .map(|a| format!("{{ address = \"{a}\" }}"))
        .collect();
    format!(
        "[log]\naccess_log = false\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n[[listeners]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\n\n\
         [[upstreams]]\nname = \"hashed\"\nbalance = \"consistent_hash\"\n{upstream_extra}\nbackends = [{}]\n\n\
         [[routes]]\nname = \"kv\"\nupstream = \"hashed\"\nkey = \"{key}\"\n{route_extra}\n",
        list.join(", ")
    )
}

async fn three_backends() -> Vec<TestBackend> {
    vec![
        named_backend("a", Duration::ZERO).await,
        named_backend("b", Duration::ZERO).await,
        named_backend("c", Duration::ZERO).await,
    ]
}

fn with_header(path: &str, name: &str, value: &[u8]) -> Request<Full<Bytes>> {
    Request::builder()
        .method(Method::PUT)
        .uri(path)
        .header(name, http::HeaderValue::from_bytes(value).unwrap())
        .body(Full::new(Bytes::from_static(b"v")))
        .unwrap()
}

/// Sends one request per key (built by `request`) and returns which backend answered each.
async fn placements(
    addr: std::net::SocketAddr,
    keys: &[String],
    request: impl Fn(&str) -> Request<Full<Bytes>>,
) -> HashMap<String, String> {
    let mut client = Client::connect(addr).await;
    let mut out = HashMap::new();
    for key in keys {
        let reply = client.send(request(key)).await;
        assert_eq!(reply.status, 200, "key {key}: {}", reply.text());
        out.insert(key.clone(), reply.text());
    }
    out
}

/// Builds the request that carries a given key.
type RequestFor = fn(&str) -> Request<Full<Bytes>>;

fn keys(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("user{i}")).collect()
}

#[tokio::test]
async fn every_key_source_keeps_a_key_on_one_backend() {
    let b = three_backends().await;
    let addrs: Vec<_> = b.iter().map(|b| b.addr).collect();
    let sources: [(&str, RequestFor); 5] = [
        ("header:x-write-key", |k| {
            with_header("/kv/x", "x-write-key", k.as_bytes())
        }),
        ("query:id", |k| {
            req(Method::PUT, &format!("/kv/x?a=1&id={k}"), b"v")
        }),
        ("cookie:session", |k| {
            with_header(
                "/kv/x",
                "cookie",
                format!("theme=dark; session={k}").as_bytes(),
            )
        }),
        ("path", |k| {
            req(Method::PUT, &format!("/kv/{k}?ignored=1"), b"v")
        }),
        ("path_segment:2", |k| {
            req(Method::PUT, &format!("/kv/{k}/field"), b"v")
        }),
    ];
    for (source, request) in sources {
        let proxy = start_proxy(&hash_config(&addrs, source, "", "")).await;
        let first = placements(proxy.addr, &keys(60), request).await;
        let again = placements(proxy.addr, &keys(60), request).await;
        assert_eq!(
            first, again,
            "{source}: the same key reaches the same backend"
        );
        let used: std::collections::HashSet<_> = first.values().collect();
        assert_eq!(used.len(), 3, "{source}: 60 keys spread over all backends");
        proxy.shutdown().await;
    }
}

#[tokio::test]
async fn missing_empty_and_oversized_keys_are_rejected_with_the_source_named() {
    let b = three_backends().await;
    let addrs: Vec<_> = b.iter().map(|b| b.addr).collect();
    let proxy = start_proxy(&hash_config(
        &addrs,
        "header:x-write-key",
        "",
        "max_key_length = \"16\"",
    ))
    .await;
    let missing = send(proxy.addr, req(Method::PUT, "/kv/a", b"v")).await;
    assert_eq!(missing.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        missing.text(),
        "400 Bad Request: this route needs a request key in header x-write-key (route \"kv\", upstream \"hashed\")\n"
    );
    let empty = send(proxy.addr, with_header("/kv/a", "x-write-key", b"")).await;
    assert_eq!(
        empty.status,
        StatusCode::BAD_REQUEST,
        "an empty key counts as missing"
    );
    let long = send(proxy.addr, with_header("/kv/a", "x-write-key", &[b'k'; 17])).await;
    assert_eq!(long.status, StatusCode::BAD_REQUEST);
    assert!(
        long.text().contains("longer than 16 bytes"),
        "{}",
        long.text()
    );
    let just_fits = send(proxy.addr, with_header("/kv/a", "x-write-key", &[b'k'; 16])).await;
    assert_eq!(just_fits.status, 200);
    let binary = send(
        proxy.addr,
        with_header("/kv/a", "x-write-key", &[0xff, 0xfe, 0x80]),
    )
    .await;
    assert_eq!(
        binary.status,
        200,
        "non-UTF-8 keys are fine: {}",
        binary.text()
    );
    let total: usize = b.iter().map(TestBackend::count).sum();
    assert_eq!(total, 2, "rejected requests never reach a backend");
    proxy.shutdown().await;

    let proxy = start_proxy(&hash_config(&addrs, "query:id", "", "")).await;
    let missing = send(proxy.addr, req(Method::PUT, "/kv/a?other=1", b"v")).await;
    assert!(
        missing.text().contains("query parameter id"),
        "{}",
        missing.text()
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn keyless_requests_can_fall_back_to_least_conn() {
    let b = three_backends().await;
    let addrs: Vec<_> = b.iter().map(|b| b.addr).collect();
    let config = hash_config(
        &addrs,
        "header:x-write-key",
        "",
        "on_missing_key = \"least_conn\"",
    );
    let proxy = start_proxy(&config).await;
    let mut client = Client::connect(proxy.addr).await;
    for _ in 0..30 {
        assert_eq!(
            client.send(req(Method::PUT, "/kv/a", b"v")).await.status,
            200
        );
    }
    for backend in &b {
        assert_eq!(
            backend.count(),
            10,
            "keyless requests are balanced, not rejected"
        );
    }
    proxy.shutdown().await;
}

#[tokio::test]
async fn two_proxies_with_backends_in_any_order_agree() {
    let b = three_backends().await;
    let forward: Vec<_> = b.iter().map(|b| b.addr).collect();
    let backward: Vec<_> = forward.iter().rev().copied().collect();
    let p1 = start_proxy(&hash_config(&forward, "path_segment:2", "", "")).await;
    let p2 = start_proxy(&hash_config(&backward, "path_segment:2", "", "")).await;
    let request = |k: &str| req(Method::PUT, &format!("/kv/{k}"), b"v");
    let one = placements(p1.addr, &keys(200), request).await;
    let two = placements(p2.addr, &keys(200), request).await;
    assert_eq!(one, two);
    p1.shutdown().await;
    p2.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_key_spills_to_its_next_backend_and_comes_back() {
    // Backends hold every request until released, so in-flight counts stay where the test puts them.
    let gate = Gate::default();
    let mut b = Vec::new();
    for _ in 0..3 {
        b.push(gated_backend(&gate).await);
    }
    let addrs: Vec<_> = b.iter().map(|b| b.addr).collect();
    // No floor: the bound applies from the first request in flight.
    let bound = "hash_balance_factor = 1.25\nhash_balance_min_inflight = 0";
    let config = hash_config(&addrs, "path_segment:2", bound, "");
    let proxy = start_proxy(&config).await;
    let addr = proxy.addr;
    let hot = || async move { send(addr, req(Method::PUT, "/kv/hot", b"v")).await };
    let counts = |b: &[TestBackend]| b.iter().map(TestBackend::count).collect::<Vec<_>>();

    // One request at a time, each held. Capacity per backend is ceil(1.25 × (in flight + 1) / 3):
    // 1, 1, 2, 2, 3, 3, so the key alternates between its own backend and its next one.
    let mut held = Vec::new();
    let mut landed = Vec::new();
    for _ in 0..6 {
        let before = counts(&b);
        held.push(tokio::spawn(hot()));
        gate.entered().await;
        let after = counts(&b);
        landed.push((0..3).find(|&i| after[i] > before[i]).unwrap());
    }
    let (own, next) = (landed[0], landed[1]);
    assert_ne!(own, next);
    assert_eq!(
        landed,
        [own, next, own, next, own, next],
        "spills follow the key's fixed order"
    );

    gate.release(6);
    for h in held {
        assert_eq!(bounded("held reply", h).await.unwrap().status, 200);
    }
    // The load is gone: the key is back on its own backend.
    let before = counts(&b);
    let reply = tokio::spawn(hot());
    gate.entered().await;
    assert_eq!(
        counts(&b)[own],
        before[own] + 1,
        "the key returned to its own backend"
    );
    gate.release(1);
    assert_eq!(bounded("reply", reply).await.unwrap().status, 200);
    proxy.shutdown().await;
}

/// The value of the sample `name{labels}` in a Prometheus scrape, 0 when absent.
fn sample(scrape: &str, name_and_labels: &str) -> u64 {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn picks_and_spills_are_counted_without_keys_in_labels() {
    writegate::metrics::install();
    let gate = Gate::default();
    let mut b = Vec::new();
    for _ in 0..3 {
        b.push(gated_backend(&gate).await);
    }
    let addrs: Vec<_> = b.iter().map(|b| b.addr).collect();
    let bound = "hash_balance_factor = 1.25\nhash_balance_min_inflight = 0";
    let config =
        hash_config(&addrs, "path_segment:2", bound, "").replace("\"hashed\"", "\"metered\"");
    let proxy = start_proxy(&config).await;
    let addr = proxy.addr;
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(tokio::spawn(async move {
            send(addr, req(Method::PUT, "/kv/secret-key-42", b"v")).await
        }));
        gate.entered().await;
    }
    gate.release(4);
    for h in held {
        bounded("held reply", h).await.unwrap();
    }
    let scrape = get(proxy.admin.unwrap(), "/metrics").await;
    assert_eq!(scrape.status, 200);
    let text = scrape.text();
    let picks: u64 = b
        .iter()
        .map(|x| {
            sample(
                &text,
                &format!(
                    "writegate_backend_picks_total{{upstream=\"metered\",backend=\"{}\"}}",
                    x.addr
                ),
            )
        })
        .sum();
    assert_eq!(picks, 4, "{text}");
    assert_eq!(
        sample(&text, "writegate_hash_spills_total{upstream=\"metered\"}"),
        2,
        "{text}"
    );
    assert!(
        text.contains("# HELP writegate_hash_spills_total"),
        "{text}"
    );
    assert!(!text.contains("secret-key-42"), "keys never become labels");
    proxy.shutdown().await;
}

/// Four clients over three backends with the example config's `hash_balance_factor = 1.25`: no
/// backend is loaded, so every key stays on its one backend (without `hash_balance_min_inflight`
/// the bound allowed 3 in flight each, and 71 of 100 keys reached all three backends).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_low_load_keys_stay_home_under_bounded_loads() {
    let backends = [
        named_backend("a", Duration::from_millis(2)).await,
        named_backend("b", Duration::from_millis(2)).await,
        named_backend("c", Duration::from_millis(2)).await,
    ];
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let proxy = start_proxy(&hash_config(
        &addrs,
        "path",
        "hash_balance_factor = 1.25",
        "",
    ))
    .await;
    let clients: Vec<_> = (0..4)
        .map(|c| {
            let addr = proxy.addr;
            tokio::spawn(async move {
                let mut client = Client::connect(addr).await;
                for i in 0..250 {
                    let key = (i * 7 + c * 13) % 100;
                    let reply = client
                        .send(req(Method::PUT, &format!("/k{key}"), b"v"))
                        .await;
                    assert_eq!(reply.status, 200);
                }
            })
        })
        .collect();
    for client in clients {
        bounded("a client's 250 writes", client).await.unwrap();
    }
    let mut homes: HashMap<String, Vec<usize>> = HashMap::new();
    for (index, backend) in backends.iter().enumerate() {
        for uri in backend.uris() {
            let seen = homes.entry(uri).or_default();
            if !seen.contains(&index) {
                seen.push(index);
            }
        }
    }
    assert_eq!(homes.len(), 100);
    let wandered: Vec<_> = homes.iter().filter(|(_, b)| b.len() > 1).collect();
    assert!(wandered.is_empty(), "keys that left home: {wandered:?}");
    proxy.shutdown().await;
}
