//! Per-key write coalescing over real HTTP, against backends that record what they receive.

mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use support::ledger::{ledger_backend, order, Ledger};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use writegate::coalesce::Coalescer;

/// A proxy whose one route coalesces on `path_segment:2` with the given `[routes.coalesce]` lines.
async fn coalescing_proxy(backend: &TestBackend, coalesce: &str, route_extra: &str) -> TestProxy {
    let config = simple_config(
        &[(backend.addr, 1)],
        &format!("key = \"path_segment:2\"\n{route_extra}\n\n[routes.coalesce]\n{coalesce}\n"),
    );
    start_proxy(&config).await
}

fn coalescer(proxy: &TestProxy) -> Arc<Coalescer> {
    proxy.snapshots.load().router.routes()[0]
        .coalescer
        .clone()
        .expect("the route coalesces")
}

/// Waits until exactly `n` clients are queued on `key`.
async fn queued(proxy: &TestProxy, key: &str, n: usize) {
    let c = coalescer(proxy);
    eventually(&format!("{n} clients queued on {key}"), || {
        c.waiting(key.as_bytes()) == n
    })
    .await;
}

fn put(key: &str, body: &str) -> Request<Full<Bytes>> {
    Request::builder()
        .method(Method::PUT)
        .uri(format!("/kv/{key}"))
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

fn spawn_send(
    addr: std::net::SocketAddr,
    request: Request<Full<Bytes>>,
) -> tokio::task::JoinHandle<Reply> {
    tokio::spawn(async move { send(addr, request).await })
}

fn how(reply: &Reply) -> &str {
    reply
        .headers
        .get("x-writegate-coalesce")
        .map_or("-", |v| v.to_str().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_two_writes_of_a_key_are_ever_in_flight() {
    for mode in ["serialize", "dedupe", "latest"] {
        let (b, ledger) = ledger_backend(None, Duration::from_millis(1)).await;
        let proxy = coalescing_proxy(&b, &format!("mode = \"{mode}\""), "").await;
        let addr = proxy.addr;
        let clients: Vec<_> = (0..64)
            .map(|c| {
                tokio::spawn(async move {
                    let mut client = Client::connect(addr).await;
                    for i in 0..6 {
                        let reply = client
                            .send(put(&format!("k{}", c % 8), &format!("c{c}-{i}")))
                            .await;
                        assert_eq!(reply.status, 200, "{mode}: {}", reply.text());
                        assert_ne!(how(&reply), "-", "{mode}: every write says what happened");
                    }
                })
            })
            .collect();
        for c in clients {
            bounded("client", c).await.unwrap();
        }
        check_ledger(&ledger.lock().unwrap(), mode);
        assert_eq!(
            coalescer(&proxy).active_keys(),
            0,
            "{mode}: no key state is left"
        );
        proxy.shutdown().await;
    }
}

/// The ledger after 64 clients wrote 6 times each to 8 keys.
fn check_ledger(l: &Ledger, mode: &str) {
    assert_eq!(
        l.max_concurrent_per_key, 1,
        "{mode}: one write per key in flight"
    );
    let sent: usize = l.order.values().map(Vec::len).sum();
    if mode == "serialize" {
        assert_eq!(sent, 64 * 6, "serialize sends every write");
        // Each client's writes reach the backend in the order the client sent them.
        for c in 0..64 {
            let mine: Vec<&String> = l.order[&format!("k{}", c % 8)]
                .iter()
                .filter(|b| b.starts_with(&format!("c{c}-")))
                .collect();
            let expected: Vec<String> = (0..6).map(|i| format!("c{c}-{i}")).collect();
            assert_eq!(mine, expected.iter().collect::<Vec<_>>());
        }
    }
}

#[tokio::test]
async fn serialize_keeps_arrival_order() {
    let gate = Gate::default();
    let (b, ledger) = ledger_backend(Some(gate.clone()), Duration::ZERO).await;
    let proxy = coalescing_proxy(&b, "mode = \"serialize\"", "").await;
    let mut replies = vec![spawn_send(proxy.addr, put("a", "w1"))];
    gate.entered().await;
    for (i, body) in ["w2", "w3", "w4", "w5"].iter().enumerate() {
        replies.push(spawn_send(proxy.addr, put("a", body)));
        queued(&proxy, "a", i + 1).await;
    }
    assert_eq!(
        b.count(),
        1,
        "later writes wait while the first is in flight"
    );
    gate.release(5);
    for r in replies {
        let reply = bounded("reply", r).await.unwrap();
        assert_eq!((reply.status.as_u16(), how(&reply)), (200, "sent"));
    }
    assert_eq!(order(&ledger, "a"), ["w1", "w2", "w3", "w4", "w5"]);
    proxy.shutdown().await;
}

#[tokio::test]
async fn dedupe_merges_only_identical_pending_writes() {
    let gate = Gate::default();
    let (b, ledger) = ledger_backend(Some(gate.clone()), Duration::ZERO).await;
    let proxy = coalescing_proxy(&b, "mode = \"dedupe\"", "").await;
    let with_type = |body: &str, content_type: &str| {
        let mut r = put("a", body);
        r.headers_mut()
            .insert("content-type", content_type.parse().unwrap());
        r
    };
    let post = Request::builder()
        .method(Method::POST)
        .uri("/kv/a")
        .body(Full::new(Bytes::from_static(b"B")))
        .unwrap();
    let mut query = put("a", "B");
    *query.uri_mut() = "/kv/a?v=2".parse().unwrap();
    // A is in flight; nothing may join it.
    let a1 = spawn_send(proxy.addr, put("a", "A"));
    gate.entered().await;
    let requests = vec![
        put("a", "A"),            // new entry: the in-flight A is never joined
        put("a", "A"),            // joins the pending A
        with_type("A", "text/x"), // different content type: new entry
        put("a", "B"),            // different body: new entry
        post,                     // different method: new entry
        query,                    // different query: new entry
        put("a", "B"),            // not identical to the newest pending (the query one): new
    ];
    let mut replies = vec![a1];
    for (i, r) in requests.into_iter().enumerate() {
        replies.push(spawn_send(proxy.addr, r));
        queued(&proxy, "a", i + 1).await;
    }
    gate.release(10);
    let mut hows = Vec::new();
    for r in replies {
        let reply = bounded("reply", r).await.unwrap();
        assert_eq!(reply.status, 200);
        // Shared replies carry the backend's headers, Via included.
        assert_eq!(reply.headers["via"], "1.1 writegate");
        hows.push(how(&reply).to_string());
    }
    assert_eq!(
        hows,
        [
            "sent",
            "sent",
            "deduplicated",
            "sent",
            "sent",
            "sent",
            "sent",
            "sent"
        ]
    );
    assert_eq!(
        order(&ledger, "a"),
        ["A", "A", "A", "B", "B", "B", "B"],
        "7 sends for 8 writes"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn latest_sends_only_the_newest_pending_write() {
    let gate = Gate::default();
    let (b, ledger) = ledger_backend(Some(gate.clone()), Duration::ZERO).await;
    let proxy = coalescing_proxy(&b, "mode = \"latest\"", "").await;
    let first = spawn_send(proxy.addr, put("a", "v1"));
    gate.entered().await;
    let mut later = Vec::new();
    for (i, body) in ["v2", "v3", "v4"].iter().enumerate() {
        let mut r = put("a", body);
        if *body == "v4" {
            r.headers_mut().insert("x-status", "201".parse().unwrap());
        }
        later.push(spawn_send(proxy.addr, r));
        queued(&proxy, "a", i + 1).await;
    }
    gate.release(4);
    assert_eq!(how(&bounded("first", first).await.unwrap()), "sent");
    let replies: Vec<Reply> = futures_join(later).await;
    for (reply, expected) in replies.iter().zip(["superseded", "superseded", "sent"]) {
        assert_eq!(reply.status, 201, "every client gets the winner's status");
        assert_eq!(reply.text(), "ok:v4", "and its body");
        assert_eq!(how(reply), expected);
    }
    assert_eq!(order(&ledger, "a"), ["v1", "v4"]);
    proxy.shutdown().await;
}

async fn futures_join(handles: Vec<tokio::task::JoinHandle<Reply>>) -> Vec<Reply> {
    let mut out = Vec::new();
    for h in handles {
        out.push(bounded("reply", h).await.unwrap());
    }
    out
}

/// A coalesced write's response is buffered to be shared; the backend's header lines travel with
/// it, written as they came to HTTP/1 clients and put into a map for HTTP/2 ones.
#[tokio::test]
async fn coalesced_replies_carry_the_backend_headers_to_http1_and_http2_clients() {
    let b = named_backend("b", Duration::ZERO).await;
    let proxy = coalescing_proxy(&b, "mode = \"serialize\"", "").await;
    for (protocol, reply) in [
        ("HTTP/1.1", send(proxy.addr, put("a", "1")).await),
        ("HTTP/2", send_h2(proxy.addr, put("a", "2")).await),
    ] {
        assert_eq!(reply.status, 200, "{protocol}");
        assert_eq!(reply.headers["x-backend"], "b", "{protocol}");
        assert_eq!(reply.headers["via"], "1.1 writegate", "{protocol}");
        assert_eq!(how(&reply), "sent", "{protocol}");
        assert_eq!(reply.text(), "b", "{protocol}");
    }
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_failed_winner_fails_every_merged_client() {
    // 500 from the backend, in latest mode.
    let gate = Gate::default();
    let (b, _ledger) = ledger_backend(Some(gate.clone()), Duration::ZERO).await;
    let proxy = coalescing_proxy(&b, "mode = \"latest\"", "").await;
    let first = spawn_send(proxy.addr, put("a", "v1"));
    gate.entered().await;
    let older = spawn_send(proxy.addr, put("a", "v2"));
    queued(&proxy, "a", 1).await;
    let mut failing = put("a", "v3");
    failing
        .headers_mut()
        .insert("x-status", "500".parse().unwrap());
    let newest = spawn_send(proxy.addr, failing);
    queued(&proxy, "a", 2).await;
    gate.release(3);
    assert_eq!(bounded("first", first).await.unwrap().status, 200);
    let (older, newest) = (
        bounded("older", older).await.unwrap(),
        bounded("newest", newest).await.unwrap(),
    );
    assert_eq!(
        (older.status, how(&older)),
        (StatusCode::INTERNAL_SERVER_ERROR, "superseded")
    );
    assert_eq!(
        (newest.status, how(&newest)),
        (StatusCode::INTERNAL_SERVER_ERROR, "sent")
    );
    proxy.shutdown().await;

    // A timeout, in dedupe mode: the in-flight write and the pair merged behind it all get 504.
    let never = Gate::default();
    let (b, _ledger) = ledger_backend(Some(never.clone()), Duration::ZERO).await;
    let proxy = coalescing_proxy(
        &b,
        "mode = \"dedupe\"",
        "timeouts = { response = \"300ms\" }",
    )
    .await;
    let first = spawn_send(proxy.addr, put("a", "x"));
    never.entered().await;
    let second = spawn_send(proxy.addr, put("a", "y"));
    queued(&proxy, "a", 1).await;
    let third = spawn_send(proxy.addr, put("a", "y"));
    queued(&proxy, "a", 2).await;
    for (r, expected) in [(first, "sent"), (second, "sent"), (third, "deduplicated")] {
        let reply = bounded("reply", r).await.unwrap();
        assert_eq!(
            (reply.status, how(&reply)),
            (StatusCode::GATEWAY_TIMEOUT, expected),
            "{}",
            reply.text()
        );
    }
    proxy.shutdown().await;
}

/// A backend that holds GETs for `hold` and answers them, but resets the connection on any write.
async fn reads_only_backend(hold: Duration) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = stream.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                    if !buf.starts_with(b"GET") {
                        let _ = stream.set_zero_linger();
                        return;
                    }
                    tokio::time::sleep(hold).await;
                    let _ = stream
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nread")
                        .await;
                }
            });
        }
    });
    addr
}

/// A backend whose first answer stops mid-body (3 of 10 bytes, connection held open); later
/// connections are answered in full.
async fn stalls_mid_body_once() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut first = true;
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            let stall = std::mem::take(&mut first);
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = stream.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                    if stall {
                        let head = b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc";
                        let _ = stream.write_all(head).await;
                        tokio::time::sleep(Duration::from_secs(30)).await;
                        return;
                    }
                    let whole = b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n0123456789";
                    let _ = stream.write_all(whole).await;
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_response_stalled_mid_body_times_out_and_frees_its_key() {
    let addr = stalls_mid_body_once().await;
    let config = simple_config(
        &[(addr, 1)],
        "key = \"path_segment:2\"\ntimeouts = { response = \"300ms\" }\n\n[routes.coalesce]\nmode = \"serialize\"\n",
    );
    let proxy = start_proxy(&config).await;
    let started = std::time::Instant::now();
    let stalled = send(proxy.addr, put("a", "first")).await;
    assert_eq!(
        stalled.status,
        StatusCode::GATEWAY_TIMEOUT,
        "{}",
        stalled.text()
    );
    assert!(
        stalled
            .text()
            .contains("did not answer within the response timeout"),
        "{}",
        stalled.text()
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "cut off by the response timeout, not the backend's 30 s stall"
    );
    // The key is free again: the next write on it is sent and answered in full.
    let next = bounded(
        "the next write on the key",
        spawn_send(proxy.addr, put("a", "second")),
    )
    .await
    .unwrap();
    assert_eq!((next.status, how(&next)), (StatusCode::OK, "sent"));
    assert_eq!(next.text(), "0123456789");
    assert_eq!(coalescer(&proxy).active_keys(), 0);
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_backend_failure_reaches_every_merged_client() {
    let addr = reads_only_backend(Duration::from_millis(300)).await;
    let config = simple_config(
        &[(addr, 1)],
        "key = \"path_segment:2\"\n\n[routes.coalesce]\nmode = \"dedupe\"\norder_reads = true\n",
    );
    let proxy = start_proxy(&config).await;
    // The read holds the key while two identical writes queue behind it and merge.
    let read = spawn_send(proxy.addr, req(Method::GET, "/kv/a", b""));
    eventually("the read to hold the key", || {
        coalescer(&proxy).active_keys() == 1
    })
    .await;
    let w1 = spawn_send(proxy.addr, put("a", "same"));
    queued(&proxy, "a", 1).await;
    let w2 = spawn_send(proxy.addr, put("a", "same"));
    queued(&proxy, "a", 2).await;
    assert_eq!(bounded("read", read).await.unwrap().status, 200);
    let (r1, r2) = (
        bounded("w1", w1).await.unwrap(),
        bounded("w2", w2).await.unwrap(),
    );
    assert_eq!((r1.status, how(&r1)), (StatusCode::BAD_GATEWAY, "sent"));
    assert_eq!(
        (r2.status, how(&r2)),
        (StatusCode::BAD_GATEWAY, "deduplicated")
    );
    assert!(r2.text().contains("closed or reset"), "{}", r2.text());
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_pending_write_whose_client_left_is_never_sent() {
    let gate = Gate::default();
    let (b, ledger) = ledger_backend(Some(gate.clone()), Duration::ZERO).await;
    let proxy = coalescing_proxy(&b, "mode = \"serialize\"", "").await;
    let first = spawn_send(proxy.addr, put("a", "kept-1"));
    gate.entered().await;
    let mut quitter = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    quitter
        .write_all(b"PUT /kv/a HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\ngone")
        .await
        .unwrap();
    queued(&proxy, "a", 1).await;
    drop(quitter);
    queued(&proxy, "a", 0).await;
    gate.release(1);
    assert_eq!(bounded("first", first).await.unwrap().status, 200);
    gate.release(1);
    assert_eq!(send(proxy.addr, put("a", "kept-2")).await.status, 200);
    assert_eq!(
        order(&ledger, "a"),
        ["kept-1", "kept-2"],
        "the abandoned write was dropped unsent"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_sent_write_finishes_after_its_client_left_and_the_next_waits_for_it() {
    let gate = Gate::default();
    let (b, ledger) = ledger_backend(Some(gate.clone()), Duration::ZERO).await;
    let proxy = coalescing_proxy(&b, "mode = \"serialize\"", "").await;
    let mut quitter = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    quitter
        .write_all(b"PUT /kv/a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nfirst")
        .await
        .unwrap();
    gate.entered().await;
    drop(quitter);
    let next = spawn_send(proxy.addr, put("a", "second"));
    queued(&proxy, "a", 1).await;
    assert_eq!(
        b.count(),
        1,
        "the next write waits for the abandoned one in flight"
    );
    gate.release(2);
    assert_eq!(bounded("next", next).await.unwrap().status, 200);
    assert_eq!(order(&ledger, "a"), ["first", "second"]);
    proxy.shutdown().await;
}

#[tokio::test]
async fn key_queue_limits_answer_429_503_and_413() {
    let gate = Gate::default();
    let (b, ledger) = ledger_backend(Some(gate.clone()), Duration::ZERO).await;
    let coalesce = "mode = \"serialize\"\nmax_pending_per_key = 2\nmax_wait = \"300ms\"";
    let proxy = coalescing_proxy(&b, coalesce, "max_body = \"1KiB\"").await;
    let first = spawn_send(proxy.addr, put("a", "1"));
    gate.entered().await;
    let second = spawn_send(proxy.addr, put("a", "2"));
    let third = spawn_send(proxy.addr, put("a", "3"));
    queued(&proxy, "a", 2).await;
    let full = send(proxy.addr, put("a", "4")).await;
    assert_eq!(full.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(full.headers.contains_key("retry-after"));
    assert!(
        full.text()
            .contains("too many requests are waiting on this key"),
        "{}",
        full.text()
    );
    // The two queued writes wait longer than max_wait: 503, and they are never sent.
    for r in [second, third] {
        let reply = bounded("queued reply", r).await.unwrap();
        assert_eq!(
            reply.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{}",
            reply.text()
        );
        let retry: u64 = reply.headers["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(retry >= 1);
        assert!(reply.text().contains("waited too long"), "{}", reply.text());
    }
    gate.release(1);
    assert_eq!(bounded("first", first).await.unwrap().status, 200);
    gate.release(1);
    assert_eq!(send(proxy.addr, put("a", "5")).await.status, 200);
    assert_eq!(order(&ledger, "a"), ["1", "5"]);
    let big = send(proxy.addr, put("a", &"x".repeat(2000))).await;
    assert_eq!(big.status, StatusCode::PAYLOAD_TOO_LARGE);
    proxy.shutdown().await;
}

#[tokio::test]
async fn reads_bypass_the_queue_unless_ordered() {
    let gate = Gate::default();
    let (b, _ledger) = ledger_backend(Some(gate.clone()), Duration::ZERO).await;
    let proxy = coalescing_proxy(&b, "mode = \"serialize\"", "").await;
    let write = spawn_send(proxy.addr, put("a", "w"));
    gate.entered().await;
    let read = spawn_send(proxy.addr, req(Method::GET, "/kv/a", b""));
    gate.entered().await; // the read reached the backend while the write is still in flight
    gate.release(2);
    let read = bounded("read", read).await.unwrap();
    assert_eq!(read.status, 200);
    assert_eq!(how(&read), "-", "reads are not coalesced");
    bounded("write", write).await.unwrap();
    proxy.shutdown().await;
}

#[tokio::test]
async fn ordered_reads_wait_for_earlier_writes_and_run_together() {
    let gate = Gate::default();
    let (b, ledger) = ledger_backend(Some(gate.clone()), Duration::ZERO).await;
    let proxy = coalescing_proxy(&b, "mode = \"serialize\"\norder_reads = true", "").await;
    let write = spawn_send(proxy.addr, put("a", "w1"));
    gate.entered().await;
    let r1 = spawn_send(proxy.addr, req(Method::GET, "/kv/a", b""));
    queued(&proxy, "a", 1).await;
    let r2 = spawn_send(proxy.addr, req(Method::GET, "/kv/a", b""));
    queued(&proxy, "a", 2).await;
    let later = spawn_send(proxy.addr, put("a", "w2"));
    queued(&proxy, "a", 3).await;
    assert_eq!(b.count(), 1, "the reads wait for the earlier write");
    gate.release(1);
    // Both reads run together, and the later write waits for them.
    gate.entered().await;
    gate.entered().await;
    assert_eq!(order(&ledger, "a"), ["w1", "GET", "GET"]);
    gate.release(3);
    for r in [write, r1, r2, later] {
        assert_eq!(bounded("reply", r).await.unwrap().status, 200);
    }
    assert_eq!(order(&ledger, "a"), ["w1", "GET", "GET", "w2"]);
    assert_eq!(coalescer(&proxy).active_keys(), 0);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_state_returns_to_zero_and_the_gauge_says_so() {
    writegate::metrics::install();
    let (b, _ledger) = ledger_backend(None, Duration::ZERO).await;
    let config = simple_config(
        &[(b.addr, 1)],
        "key = \"path_segment:2\"\n\n[routes.coalesce]\nmode = \"dedupe\"\norder_reads = true\n",
    )
    .replace("name = \"r\"", "name = \"gauged\"");
    let proxy = start_proxy(&config).await;
    let addr = proxy.addr;
    let clients: Vec<_> = (0..16)
        .map(|c| {
            tokio::spawn(async move {
                let mut client = Client::connect(addr).await;
                for i in 0..60 {
                    let key = format!("u{c}-{i}");
                    assert_eq!(client.send(put(&key, "v")).await.status, 200);
                    assert_eq!(
                        client
                            .send(req(Method::GET, &format!("/kv/{key}"), b""))
                            .await
                            .status,
                        200
                    );
                }
            })
        })
        .collect();
    for c in clients {
        bounded("client", c).await.unwrap();
    }
    assert_eq!(coalescer(&proxy).active_keys(), 0);
    let scrape = get(proxy.admin.unwrap(), "/metrics").await.text();
    assert!(
        scrape.contains("writegate_coalesce_keys_active{route=\"gauged\"} 0"),
        "{scrape}"
    );
    assert!(
        scrape.contains("writegate_coalesce_outcomes_total{route=\"gauged\",outcome=\"sent\"} 960"),
        "{scrape}"
    );
    proxy.shutdown().await;
}
