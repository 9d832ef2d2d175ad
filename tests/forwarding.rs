//! What a backend receives through the proxy, and what the client gets back.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::Full;
use support::*;

#[tokio::test]
async fn method_path_query_headers_and_body_arrive_intact() {
    let b = named_backend("b", Duration::ZERO).await;
    let proxy = start_proxy(&simple_config(&[(b.addr, 1)], "")).await;
    let request = Request::builder()
        .method(Method::PATCH)
        .uri("/orders/42/items?sort=desc&limit=5&e=%20x")
        .header("content-type", "application/json")
        .header("x-custom", "value one")
        .header("x-multi", "a")
        .header("x-multi", "b")
        .body(Full::new(Bytes::from_static(br#"{"qty": 3}"#)))
        .unwrap();
    let reply = send(proxy.addr, request).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.text(), "b");
    assert_eq!(
        reply.headers["x-backend"], "b",
        "backend headers reach the client"
    );
    let got = b.last();
    assert_eq!(got.method, Method::PATCH);
    assert_eq!(got.uri, "/orders/42/items?sort=desc&limit=5&e=%20x");
    assert_eq!(got.headers["content-type"], "application/json");
    assert_eq!(got.headers["x-custom"], "value one");
    let multi: Vec<_> = got.headers.get_all("x-multi").iter().collect();
    assert_eq!(multi, ["a", "b"]);
    assert_eq!(got.headers["host"], proxy.addr.to_string(), "Host is kept");
    assert_eq!(&got.body[..], br#"{"qty": 3}"#);
    proxy.shutdown().await;
}

#[tokio::test]
async fn large_streamed_body_arrives_byte_for_byte() {
    let b = named_backend("b", Duration::ZERO).await;
    let proxy = start_proxy(&simple_config(&[(b.addr, 1)], "max_body = \"4MiB\"")).await;
    let body: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let request = Request::builder()
        .method(Method::PUT)
        .uri("/blob")
        .body(Full::new(Bytes::from(body.clone())))
        .unwrap();
    let reply = send(proxy.addr, request).await;
    assert_eq!(reply.status, 200);
    assert_eq!(b.last().body, body);
    proxy.shutdown().await;
}

#[tokio::test]
async fn hop_by_hop_headers_are_stripped_and_forwarding_headers_added() {
    let b = named_backend("b", Duration::ZERO).await;
    let proxy = start_proxy(&simple_config(&[(b.addr, 1)], "")).await;
    let request = Request::builder()
        .uri("/x")
        .header("connection", "keep-alive, x-hop")
        .header("x-hop", "secret")
        .header("keep-alive", "timeout=5")
        .header("proxy-authorization", "Basic Zm9vOmJhcg==")
        .header("te", "trailers")
        .header("upgrade", "websocket")
        .header("x-forwarded-for", "203.0.113.7")
        .header("x-forwarded-for", "198.51.100.2")
        .header("x-forwarded-proto", "https")
        .header("x-forwarded-host", "spoofed.example")
        .header("via", "1.1 edge")
        .header("host", "api.example.com")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let reply = send(proxy.addr, request).await;
    assert_eq!(reply.status, 200);
    let got = b.last();
    for name in [
        "x-hop",
        "keep-alive",
        "proxy-authorization",
        "te",
        "upgrade",
    ] {
        assert!(
            !got.headers.contains_key(name),
            "{name} must not reach the backend"
        );
    }
    // hyper's client may add its own `connection` only when it closes; ours must be gone.
    assert!(got
        .headers
        .get("connection")
        .is_none_or(|v| v != "keep-alive, x-hop"));
    // Earlier hops' lines fold into one line with ours; the client cannot choose the others.
    let forwarded_for: Vec<_> = got.headers.get_all("x-forwarded-for").iter().collect();
    assert_eq!(forwarded_for, ["203.0.113.7, 198.51.100.2, 127.0.0.1"]);
    assert_eq!(got.headers.get_all("x-forwarded-proto").iter().count(), 1);
    assert_eq!(got.headers["x-forwarded-proto"], "http");
    assert_eq!(got.headers.get_all("x-forwarded-host").iter().count(), 1);
    assert_eq!(got.headers["x-forwarded-host"], "api.example.com");
    assert_eq!(got.headers["host"], "api.example.com");
    assert_eq!(got.headers["via"], "1.1 edge, 1.1 writegate");
    let id = got.headers["x-request-id"].to_str().unwrap();
    assert_eq!(id.len(), 32, "a request id is generated: {id}");
    assert_eq!(
        reply.headers["via"], "1.1 writegate",
        "responses carry Via too"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn client_request_id_is_kept_and_generated_ids_differ() {
    let b = named_backend("b", Duration::ZERO).await;
    let proxy = start_proxy(&simple_config(&[(b.addr, 1)], "")).await;
    let request = Request::builder()
        .uri("/x")
        .header("x-request-id", "client-chosen-1")
        .body(Full::new(Bytes::new()))
        .unwrap();
    send(proxy.addr, request).await;
    assert_eq!(b.last().headers["x-request-id"], "client-chosen-1");
    get(proxy.addr, "/y").await;
    let first = b.last().headers["x-request-id"].clone();
    get(proxy.addr, "/z").await;
    assert_ne!(b.last().headers["x-request-id"], first);
    proxy.shutdown().await;
}

#[tokio::test]
async fn response_hop_by_hop_headers_are_stripped() {
    let b = backend(|_| async {
        let mut r = http::Response::new(Full::new(Bytes::from_static(b"ok")));
        r.headers_mut()
            .insert("connection", "x-internal".parse().unwrap());
        r.headers_mut().insert("x-internal", "1".parse().unwrap());
        r.headers_mut().insert("x-public", "1".parse().unwrap());
        r.headers_mut()
            .insert("keep-alive", "timeout=5".parse().unwrap());
        r.headers_mut().append("via", "1.0 origin".parse().unwrap());
        r.headers_mut().append("via", "1.1 cache".parse().unwrap());
        r.headers_mut()
            .insert("date", "Mon, 01 Jan 2024 00:00:00 GMT".parse().unwrap());
        r
    })
    .await;
    let proxy = start_proxy(&simple_config(&[(b.addr, 1)], "")).await;
    let reply = get(proxy.addr, "/").await;
    assert_eq!(reply.status, 200);
    assert!(!reply.headers.contains_key("x-internal"));
    assert!(!reply.headers.contains_key("keep-alive"));
    assert_eq!(reply.headers["x-public"], "1");
    let vias: Vec<_> = reply.headers.get_all("via").iter().collect();
    assert_eq!(vias, ["1.0 origin, 1.1 cache, 1.1 writegate"]);
    let dates: Vec<_> = reply.headers.get_all("date").iter().collect();
    assert_eq!(
        dates,
        ["Mon, 01 Jan 2024 00:00:00 GMT"],
        "the backend's Date is kept"
    );
    assert_eq!(&reply.body[..], b"ok");
    proxy.shutdown().await;
}

#[tokio::test]
async fn backend_connections_are_reused() {
    let b = named_backend("b", Duration::ZERO).await;
    let proxy = start_proxy(&simple_config(&[(b.addr, 1)], "")).await;
    let mut client = Client::connect(proxy.addr).await;
    for _ in 0..20 {
        assert_eq!(client.send(req(Method::POST, "/w", b"x")).await.status, 200);
    }
    assert_eq!(b.count(), 20);
    let connections = b.connections.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        connections, 1,
        "20 sequential requests need one backend connection"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn h2c_clients_are_proxied_to_http1_backends() {
    let b = named_backend("b", Duration::ZERO).await;
    let proxy = start_proxy(&simple_config(&[(b.addr, 1)], "")).await;
    let request = Request::builder()
        .method(Method::PUT)
        .uri(format!(
            "http://kv.example.com:{}/kv/a?x=1",
            proxy.addr.port()
        ))
        .body(Full::new(Bytes::from_static(b"v")))
        .unwrap();
    let response = send_h2(proxy.addr, request).await;
    assert_eq!(response.status, 200);
    assert_eq!(response.headers["via"], "1.1 writegate");
    assert!(response.headers.contains_key("date"));
    assert!(!response.headers.contains_key("connection"));
    let got = b.last();
    assert_eq!(got.uri, "/kv/a?x=1", "the backend gets origin form");
    assert_eq!(
        got.headers["host"],
        format!("kv.example.com:{}", proxy.addr.port())
    );
    assert_eq!(got.headers["via"], "2 writegate");
    assert_eq!(&got.body[..], b"v");
    proxy.shutdown().await;
}
