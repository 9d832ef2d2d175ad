//! Every error a client can get from the proxy itself, produced for real.

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};

use support::*;

fn assert_names_route_and_upstream(reply: &Reply) {
    let text = reply.text();
    assert!(text.contains("route \"r\""), "body names the route: {text}");
    assert!(
        text.contains("upstream \"up\""),
        "body names the upstream: {text}"
    );
    assert!(
        !text.contains("127.0.0.1"),
        "body leaks no backend address: {text}"
    );
    assert_eq!(text.lines().count(), 1, "one line: {text}");
}

#[tokio::test]
async fn refused_connection_is_502() {
    let dead = refused_addr().await;
    let proxy = start_proxy(&simple_config(&[(dead, 1)], "")).await;
    let reply = send(proxy.addr, req(Method::POST, "/w", b"data")).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    assert!(
        reply
            .text()
            .starts_with("502 Bad Gateway: could not connect"),
        "{}",
        reply.text()
    );
    assert_names_route_and_upstream(&reply);
    proxy.shutdown().await;
}

#[tokio::test]
async fn reset_after_request_is_502_and_not_retried() {
    let (addr, hits) = resetting_backend().await;
    let proxy = start_proxy(&simple_config(&[(addr, 1)], "")).await;
    let reply = send(proxy.addr, req(Method::POST, "/w", b"data")).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    assert!(reply.text().contains("closed or reset"), "{}", reply.text());
    assert_names_route_and_upstream(&reply);
    assert_eq!(
        hits.load(Ordering::SeqCst),
        1,
        "a write that reached a backend is never resent"
    );
    proxy.shutdown().await;
}

/// A 504 for the response timeout, sent well before the backend's own (slower) answer.
fn assert_cut_off_by_the_response_timeout(reply: &Reply, started: std::time::Instant, why: &str) {
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
    assert!(started.elapsed() < Duration::from_secs(4), "{why}");
    assert!(reply
        .text()
        .contains("did not answer within the response timeout"));
}

#[tokio::test]
async fn slow_backend_is_504() {
    let slow = named_backend("slow", Duration::from_secs(5)).await;
    let config = simple_config(&[(slow.addr, 1)], "timeouts = { response = \"200ms\" }");
    let proxy = start_proxy(&config).await;
    let started = std::time::Instant::now();
    let reply = get(proxy.addr, "/").await;
    assert_cut_off_by_the_response_timeout(
        &reply,
        started,
        "answered at the timeout, not the backend's pace",
    );
    assert_names_route_and_upstream(&reply);
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_reused_backend_connection_still_times_out() {
    // The response timer is kept with the connection between exchanges; a later, slower answer on
    // the same connection must still be cut off at its own deadline.
    let gate = Gate::default();
    let b = gated_backend(&gate).await;
    let config = simple_config(&[(b.addr, 1)], "timeouts = { response = \"300ms\" }");
    let proxy = start_proxy(&config).await;
    gate.release(2);
    assert_eq!(get(proxy.addr, "/").await.status, StatusCode::OK);
    // Past the first exchange's deadline: the next one must get a deadline of its own.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(get(proxy.addr, "/").await.status, StatusCode::OK);
    let started = std::time::Instant::now();
    let reply = get(proxy.addr, "/").await;
    assert_cut_off_by_the_response_timeout(&reply, started, "cut off at 300 ms");
    assert_eq!(
        b.connections.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "all three went over one pooled connection"
    );
    gate.release(1);
    proxy.shutdown().await;
}

#[tokio::test]
async fn connect_timeout_is_504() {
    // A listener that never accepts, with its accept queue already full: the kernel drops new SYNs,
    // so a connect to it hangs until our connect timeout.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(1).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        if let Ok(Ok(s)) = tokio::time::timeout(
            Duration::from_millis(200),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            fillers.push(s);
        }
    }
    let config = simple_config(
        &[(addr, 1)],
        "timeouts = { connect = \"300ms\", response = \"5s\" }",
    );
    let proxy = start_proxy(&config).await;
    let reply = get(proxy.addr, "/").await;
    assert_eq!(
        reply.status,
        StatusCode::GATEWAY_TIMEOUT,
        "{}",
        reply.text()
    );
    assert!(
        reply.text().contains("timed out connecting"),
        "{}",
        reply.text()
    );
    assert_names_route_and_upstream(&reply);
    proxy.shutdown().await;
    drop(listener);
}

#[tokio::test]
async fn no_usable_backend_is_503_at_once() {
    let b = named_backend("b", Duration::ZERO).await;
    let config = simple_config(&[], "").replace(
        "backends = []",
        &format!("backends = [{{ address = \"{}\", down = true }}]", b.addr),
    );
    let proxy = start_proxy(&config).await;
    let reply = get(proxy.addr, "/").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(reply.headers.contains_key("retry-after"));
    assert!(reply.text().contains("no backend is available"));
    assert_names_route_and_upstream(&reply);
    assert_eq!(b.count(), 0, "a backend marked down gets nothing");
    let admin = proxy.admin.unwrap();
    // The process serves (every other route would): ready. The upstream is not.
    assert_eq!(get(admin, "/readyz").await.status, StatusCode::OK);
    let ready = get(admin, "/readyz/upstream/up").await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(ready.text().contains("\"up\""), "{}", ready.text());
    assert_eq!(
        get(admin, "/readyz/upstream/nope").await.status,
        StatusCode::NOT_FOUND
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn unmatched_path_is_404_and_wrong_method_405() {
    let b = named_backend("b", Duration::ZERO).await;
    let config = simple_config(
        &[(b.addr, 1)],
        "path_prefix = \"/kv/\"\nmethods = [\"PUT\", \"GET\"]",
    );
    let proxy = start_proxy(&config).await;
    let reply = get(proxy.addr, "/other").await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert_eq!(
        reply.text(),
        "404 Not Found: no route matches this host and path\n"
    );
    let reply = send(proxy.addr, req(Method::DELETE, "/kv/a", b"")).await;
    assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(get(proxy.addr, "/kv/a").await.status, 200);
    assert_eq!(b.count(), 1);
    proxy.shutdown().await;
}

#[tokio::test]
async fn declared_body_over_limit_is_413_without_touching_the_backend() {
    let b = named_backend("b", Duration::ZERO).await;
    let proxy = start_proxy(&simple_config(&[(b.addr, 1)], "max_body = \"1KiB\"")).await;
    let reply = send(proxy.addr, req(Method::PUT, "/w", &[b'x'; 1025])).await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(reply.text().contains("1024 bytes"), "{}", reply.text());
    assert_names_route_and_upstream(&reply);
    assert_eq!(
        send(proxy.addr, req(Method::PUT, "/w", &[b'x'; 1024]))
            .await
            .status,
        200
    );
    assert_eq!(
        b.count(),
        1,
        "only the request within the limit was forwarded"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn chunked_body_over_limit_is_413_and_cut_off() {
    let b = named_backend("b", Duration::ZERO).await;
    let proxy = start_proxy(&simple_config(&[(b.addr, 1)], "max_body = \"1KiB\"")).await;
    // No Content-Length: the proxy only finds out while streaming.
    let body = Chunks { left: 8, size: 512 };
    let stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let request = Request::builder()
        .method(Method::PUT)
        .uri("/w")
        .header("host", "x")
        .body(body)
        .unwrap();
    let response = bounded("chunked upload", sender.send_request(request))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    // The backend never saw a complete (and so acceptable) body.
    assert_eq!(b.count(), 0);
    proxy.shutdown().await;
}

/// A body of `left` chunks of `size` bytes with no declared length (sent chunked).
struct Chunks {
    left: usize,
    size: usize,
}

impl http_body::Body for Chunks {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        if self.left == 0 {
            return std::task::Poll::Ready(None);
        }
        self.left -= 1;
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from(vec![
            b'y';
            self.size
        ])))))
    }
}

#[tokio::test]
async fn http11_request_without_host_is_400() {
    let b = named_backend("b", Duration::ZERO).await;
    let proxy = start_proxy(&simple_config(&[(b.addr, 1)], "")).await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    stream.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let mut buf = vec![0u8; 1024];
    let n = bounded("400 reply", stream.read(&mut buf)).await.unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert!(text.contains("needs a Host header"), "{text}");
    assert_eq!(b.count(), 0);
    proxy.shutdown().await;
}

#[tokio::test]
async fn malformed_requests_get_4xx_and_the_proxy_keeps_serving() {
    let b = named_backend("b", Duration::ZERO).await;
    let proxy = start_proxy(&simple_config(&[(b.addr, 1)], "")).await;
    let cases: [(&[u8], &str); 4] = [
        (b"GARBAGE\r\n\r\n", "HTTP/1.1 400"),
        (
            b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
            "HTTP/1.1 400",
        ),
        (
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
            "HTTP/1.1 400",
        ),
        (
            &[0xff, 0xfe, 0x00, 0x01, b'\r', b'\n', b'\r', b'\n'],
            "HTTP/1.1 400",
        ),
    ];
    for (bytes, expected) in cases {
        let (reply, _) = raw_exchange(proxy.addr, bytes).await;
        assert!(reply.starts_with(expected), "{bytes:?} got {reply:?}");
    }
    let long_uri = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(70_000));
    assert!(raw_exchange(proxy.addr, long_uri.as_bytes())
        .await
        .0
        .starts_with("HTTP/1.1 414"));
    assert_eq!(b.count(), 0);
    assert_eq!(get(proxy.addr, "/still-alive").await.status, 200);
    proxy.shutdown().await;
}

#[tokio::test]
async fn conflicting_framing_cannot_smuggle_a_request() {
    // Content-Length says 40 bytes; chunked framing says the body is empty and a second request
    // follows. The backend must see exactly one request, framed by Transfer-Encoding (RFC 9112 §6.3),
    // with no stale Content-Length, and the client connection must close after the reply.
    let b = named_backend("b", Duration::ZERO).await;
    let proxy = start_proxy(&simple_config(&[(b.addr, 1)], "")).await;
    let (reply, _) = raw_exchange(
        proxy.addr,
        b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    let received = b.received.lock().unwrap().clone();
    assert_eq!(received.len(), 1, "{received:?}");
    assert_eq!(received[0].uri, "/a");
    assert!(received[0].body.is_empty());
    assert!(
        !received[0].headers.contains_key("content-length")
            || received[0].headers["content-length"] == "0"
    );
    proxy.shutdown().await;
}

/// A backend that answers each request with `response` as soon as its head is in, before reading
/// any of the body. Then, with `hang_up`, it closes at once (a reset, with the body unread);
/// otherwise it reads on until the proxy closes, and sends how many body bytes it got.
async fn early_answering_backend(
    response: &'static [u8],
    hang_up: bool,
) -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<usize>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let head_end = loop {
                    let mut buf = [0u8; 4096];
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                    if let Some(at) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                        break at + 4;
                    }
                };
                if stream.write_all(response).await.is_err() || hang_up {
                    return;
                }
                let mut rest = Vec::new();
                let _ = stream.read_to_end(&mut rest).await;
                let _ = tx.send(seen.len() - head_end + rest.len());
            });
        }
    });
    (addr, rx)
}

const EARLY_REFUSAL: &[u8] =
    b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 9\r\n\r\ntoo large";

#[tokio::test]
async fn an_early_refusal_reaches_a_client_still_sending_its_body() {
    let (addr, mut closed) = early_answering_backend(EARLY_REFUSAL, false).await;
    let proxy = start_proxy(&simple_config(&[(addr, 1)], "")).await;
    // The client declares a megabyte but sends a kilobyte, then waits for an answer.
    let mut request = b"PUT /w HTTP/1.1\r\nhost: x\r\ncontent-length: 1000000\r\n\r\n".to_vec();
    request.extend_from_slice(&[b'x'; 1000]);
    let (reply, _) = raw_exchange(proxy.addr, &request).await;
    assert!(
        reply.starts_with("HTTP/1.1 413 Payload Too Large\r\n"),
        "the backend's refusal is relayed: {reply}"
    );
    assert!(reply.ends_with("\r\n\r\ntoo large"), "{reply}");
    assert!(
        reply.to_ascii_lowercase().contains("connection: close"),
        "the client's half-read body ends its connection: {reply}"
    );
    let got = bounded("the backend connection to be closed", closed.recv()).await;
    assert!(
        got.is_some_and(|n| n <= 1000),
        "the half-sent request's connection is closed, not pooled: {got:?}"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn an_early_refusal_and_reset_is_relayed_not_502() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (addr, _) = early_answering_backend(EARLY_REFUSAL, true).await;
    let proxy = start_proxy(&simple_config(&[(addr, 1)], "")).await;
    let body_len = 4 << 20;
    let stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    tokio::spawn(async move {
        let head = format!("PUT /w HTTP/1.1\r\nhost: x\r\ncontent-length: {body_len}\r\n\r\n");
        let _ = writer.write_all(head.as_bytes()).await;
        // Fails once the proxy has answered and closed: the body is not wanted.
        let _ = writer.write_all(&vec![b'x'; body_len]).await;
    });
    let mut reply = Vec::new();
    let _ = bounded("the proxy to answer", reader.read_to_end(&mut reply)).await;
    let reply = String::from_utf8_lossy(&reply);
    assert!(
        reply.starts_with("HTTP/1.1 413 Payload Too Large\r\n"),
        "the backend's answer, not a 502: {reply}"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn an_early_success_stands_when_the_backend_then_resets() {
    let (addr, _) =
        early_answering_backend(b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok", true).await;
    let proxy = start_proxy(&simple_config(&[(addr, 1)], "")).await;
    let body: &'static [u8] = Box::leak(vec![b'y'; 4 << 20].into_boxed_slice());
    let reply = send(proxy.addr, req(Method::PUT, "/w", body)).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
    assert_eq!(reply.text(), "ok");
    proxy.shutdown().await;
}

#[tokio::test]
async fn an_early_success_still_gets_the_whole_body_sent() {
    let (addr, mut received) = early_answering_backend(
        b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok",
        false,
    )
    .await;
    let proxy = start_proxy(&simple_config(&[(addr, 1)], "")).await;
    let body: &'static [u8] = Box::leak(vec![b'y'; 256 * 1024].into_boxed_slice());
    let reply = send(proxy.addr, req(Method::PUT, "/w", body)).await;
    assert_eq!(reply.status, StatusCode::CREATED);
    assert_eq!(reply.text(), "ok");
    proxy.shutdown().await;
    let got = bounded("the backend to read the body", received.recv()).await;
    assert_eq!(got, Some(body.len()), "the body went whole");
}
