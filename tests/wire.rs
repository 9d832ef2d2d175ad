//! Backend responses as they appear on the wire: framings, interim responses, broken bodies.
//!
//! These backends are raw sockets answering with scripted bytes, so that every framing a real
//! backend may use (chunked with trailers, close-delimited, 1xx before the answer) is exercised.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::Full;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One scripted answer: the bytes to write, and whether to close the connection after them.
#[derive(Clone, Copy)]
struct Answer(&'static [u8], bool);

struct ScriptedBackend {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    requests: Arc<Mutex<Vec<Vec<u8>>>>,
}

/// Answers the n-th request (over all connections) with `script[n]`, the last one repeated.
async fn scripted_backend(script: &'static [Answer]) -> ScriptedBackend {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let requests = Arc::new(Mutex::new(Vec::new()));
    let (conns, reqs) = (Arc::clone(&connections), Arc::clone(&requests));
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            conns.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(serve_script(stream, script, Arc::clone(&reqs)));
        }
    });
    ScriptedBackend {
        addr,
        connections,
        requests,
    }
}

async fn serve_script(
    mut stream: TcpStream,
    script: &'static [Answer],
    log: Arc<Mutex<Vec<Vec<u8>>>>,
) {
    let mut buf = Vec::new();
    loop {
        let Some(request) = read_request(&mut stream, &mut buf).await else {
            return;
        };
        let index = {
            let mut log = log.lock().unwrap();
            log.push(request);
            log.len() - 1
        };
        let Answer(bytes, close) = script[index.min(script.len() - 1)];
        if stream.write_all(bytes).await.is_err() || close {
            return;
        }
    }
}

/// Reads one request (head, and a Content-Length or chunked body) off `stream`.
async fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    loop {
        if let Some(end) = find(buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let body_end = if head.contains("transfer-encoding: chunked") {
                find(&buf[end..], b"\r\n0\r\n\r\n").map(|e| end + e + 7)
            } else {
                let len = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .map_or(0, |v| v.trim().parse::<usize>().unwrap());
                (buf.len() >= end + 4 + len).then_some(end + 4 + len)
            };
            if let Some(body_end) = body_end {
                return Some(buf.drain(..body_end).collect());
            }
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

impl ScriptedBackend {
    fn expect_connections(&self, n: usize, why: &str) {
        assert_eq!(self.connections.load(Ordering::SeqCst), n, "{why}");
    }
}

fn expect(reply: &Reply, status: u16, text: &str) {
    assert_eq!(
        (reply.status.as_u16(), reply.text().as_str()),
        (status, text)
    );
}

/// A client connection for requests with any body type.
async fn raw_sender<B>(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<B>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    sender
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[tokio::test]
async fn chunked_responses_with_trailers_arrive_whole_and_keep_the_connection() {
    static SCRIPT: &[Answer] = &[Answer(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-B: 1\r\n\r\n5\r\nhello\r\n6;x=y\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n",
        false,
    )];
    let b = scripted_backend(SCRIPT).await;
    let proxy = start_proxy(&simple_config(&[(b.addr, 1)], "")).await;
    let mut client = Client::connect(proxy.addr).await;
    for _ in 0..3 {
        let reply = client.send(req(Method::POST, "/w", b"x")).await;
        expect(&reply, 200, "hello world");
        assert_eq!(reply.headers["x-b"], "1");
    }
    b.expect_connections(1, "the backend connection is reused");
    proxy.shutdown().await;
}

#[tokio::test]
async fn close_delimited_responses_arrive_whole_and_are_not_reused() {
    static SCRIPT: &[Answer] = &[Answer(
        b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end",
        true,
    )];
    let b = scripted_backend(SCRIPT).await;
    let proxy = start_proxy(&simple_config(&[(b.addr, 1)], "")).await;
    let mut client = Client::connect(proxy.addr).await;
    for _ in 0..2 {
        let reply = client.send(req(Method::POST, "/w", b"x")).await;
        expect(&reply, 200, "until the end");
    }
    b.expect_connections(2, "a close-delimited body ends its connection");
    proxy.shutdown().await;
}

/// An interim response ahead of the final one does not disturb the exchange (clients take it,
/// see tests/hardening.rs), and HEAD responses carry no body.
#[tokio::test]
async fn interim_responses_pass_and_head_responses_have_no_body() {
    static SCRIPT: &[Answer] = &[
        Answer(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok",
            false,
        ),
        Answer(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n", false),
        Answer(b"HTTP/1.1 204 No Content\r\n\r\n", false),
    ];
    let b = scripted_backend(SCRIPT).await;
    let proxy = start_proxy(&simple_config(&[(b.addr, 1)], "")).await;
    let mut client = Client::connect(proxy.addr).await;
    let reply = client.send(req(Method::POST, "/w", b"x")).await;
    expect(&reply, 201, "ok");
    let reply = client.send(req(Method::HEAD, "/w", b"")).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.headers["content-length"], "1000");
    let reply = client.send(req(Method::DELETE, "/w", b"")).await;
    assert_eq!(reply.status, 204);
    b.expect_connections(1, "one backend connection serves them all");
    proxy.shutdown().await;
}

/// A body that breaks before any of it reached the client is answered 502 in its place.
#[tokio::test]
async fn a_response_body_broken_at_once_is_a_502_and_its_connection_closes() {
    static SCRIPT: &[Answer] = &[
        Answer(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX",
            false,
        ),
        Answer(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext", false),
    ];
    let b = scripted_backend(SCRIPT).await;
    let proxy = start_proxy(&simple_config(&[(b.addr, 1)], "")).await;
    let mut sender = raw_sender(proxy.addr).await;
    let request = Request::post("/w")
        .header("host", "x")
        .body(Full::new(Bytes::from_static(b"x")))
        .unwrap();
    let response = bounded("response", sender.send_request(request))
        .await
        .expect("a response");
    let reply = Reply::read(response).await;
    assert_eq!(reply.status, 502, "{}", reply.text());
    assert!(
        reply
            .text()
            .contains("chunk data not followed by CRLF (upstream \"up\")"),
        "{}",
        reply.text()
    );
    let reply = get(proxy.addr, "/again").await;
    expect(&reply, 200, "next");
    b.expect_connections(2, "the broken connection is not reused");
    proxy.shutdown().await;
}

#[tokio::test]
async fn bodies_of_unknown_length_are_sent_chunked() {
    static SCRIPT: &[Answer] = &[Answer(
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        false,
    )];
    let b = scripted_backend(SCRIPT).await;
    let proxy = start_proxy(&simple_config(&[(b.addr, 1)], "")).await;
    let mut sender = raw_sender(proxy.addr).await;
    let body = Pieces(["first,", "second,", "third"].into());
    let request = Request::post("/w").header("host", "x").body(body).unwrap();
    let response = bounded("response", sender.send_request(request))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let seen = String::from_utf8(b.requests.lock().unwrap()[0].clone()).unwrap();
    let lower = seen.to_ascii_lowercase();
    assert!(lower.contains("transfer-encoding: chunked\r\n"), "{seen}");
    assert!(!lower.contains("content-length"), "{seen}");
    assert!(
        seen.ends_with("\r\n\r\n6\r\nfirst,\r\n7\r\nsecond,\r\n5\r\nthird\r\n0\r\n\r\n"),
        "{seen}"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn request_heads_reach_the_backend_as_sent_plus_forwarding_lines() {
    static SCRIPT: &[Answer] = &[Answer(
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        false,
    )];
    let b = scripted_backend(SCRIPT).await;
    let proxy = start_proxy(&simple_config(&[(b.addr, 1)], "")).await;
    let requests: [&[u8]; 2] = [
        b"PUT /kv/a?v=1 HTTP/1.1\r\nHost: kv.example\r\nX-Mixed-Case: One\r\n\
          Content-Length: 2\r\nX-Forwarded-For: 203.0.113.7\r\nConnection: close\r\n\r\nhi",
        // Absolute form: the backend gets origin form, and the URI's host as Host, in place of
        // the client's (RFC 9112 §3.2.2).
        b"GET http://abs.example:81/kv/b HTTP/1.1\r\nHost: other.example\r\nConnection: close\r\n\r\n",
    ];
    for bytes in requests {
        let (reply, _) = raw_exchange(proxy.addr, bytes).await;
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    }
    let seen: Vec<String> = b
        .requests
        .lock()
        .unwrap()
        .iter()
        .map(|r| String::from_utf8_lossy(r).into_owned())
        .collect();
    let first = &seen[0];
    assert!(
        first.starts_with("PUT /kv/a?v=1 HTTP/1.1\r\nHost: kv.example\r\nX-Mixed-Case: One\r\n"),
        "names keep their case, lines their order: {first}"
    );
    assert!(
        first.contains("\r\nX-Forwarded-For: 203.0.113.7, 127.0.0.1\r\n"),
        "{first}"
    );
    assert!(
        first.contains("\r\nX-Forwarded-Host: kv.example\r\n"),
        "{first}"
    );
    assert!(
        first.ends_with("\r\ncontent-length: 2\r\n\r\nhi"),
        "{first}"
    );
    assert!(
        !first.to_ascii_lowercase().contains("connection"),
        "{first}"
    );
    let second = &seen[1];
    assert!(
        second.starts_with(
            "GET /kv/b HTTP/1.1\r\nHost: abs.example:81\r\nX-Forwarded-Host: abs.example:81\r\n"
        ),
        "{second}"
    );
    assert!(!second.contains("other.example"), "{second}");
    proxy.shutdown().await;
}

/// A body of several pieces and no declared length.
struct Pieces(std::collections::VecDeque<&'static str>);

impl http_body::Body for Pieces {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        std::task::Poll::Ready(
            self.0
                .pop_front()
                .map(|p| Ok(hyper::body::Frame::data(Bytes::from(p)))),
        )
    }
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order_and_http10_closes() {
    let b = named_backend("b", std::time::Duration::ZERO).await;
    let proxy = start_proxy(&simple_config(&[(b.addr, 1)], "")).await;
    let (reply, read) = raw_exchange(
        proxy.addr,
        b"POST /1 HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\naPOST /2 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nb\r\n0\r\n\r\nGET /3 HTTP/1.0\r\nHost: x\r\n\r\n",
    )
    .await;
    read.unwrap();
    assert_eq!(reply.matches("HTTP/1.1 200 OK").count(), 3, "{reply}");
    assert_eq!(b.uris(), ["/1", "/2", "/3"]);
    assert_eq!(b.bodies(), [b"a".to_vec(), b"b".to_vec(), Vec::new()]);
    assert!(
        reply.ends_with('b'),
        "the HTTP/1.0 request's response ends the connection: {reply}"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn expect_continue_is_answered_before_the_body_is_read() {
    let b = named_backend("b", std::time::Duration::ZERO).await;
    let proxy = start_proxy(&simple_config(&[(b.addr, 1)], "")).await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(
            b"PUT /k HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n",
        )
        .await
        .unwrap();
    let mut interim = [0u8; 25];
    bounded("100 Continue", stream.read_exact(&mut interim))
        .await
        .unwrap();
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    stream.write_all(b"hello").await.unwrap();
    let mut head = [0u8; 15];
    bounded("final response", stream.read_exact(&mut head))
        .await
        .unwrap();
    assert_eq!(&head, b"HTTP/1.1 200 OK");
    assert_eq!(&b.last().body[..], b"hello");
    assert!(
        !b.last().headers.contains_key("expect"),
        "the proxy answered the expectation itself"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn framing_the_proxy_cannot_trust_is_refused_with_a_reason() {
    let b = named_backend("b", std::time::Duration::ZERO).await;
    let proxy = start_proxy(&simple_config(&[(b.addr, 1)], "")).await;
    let many_headers: String = (0..120).map(|i| format!("x-h{i}: v\r\n")).collect();
    // Just over 64 KiB, so that it is all sent before the proxy answers (and closes).
    let long_headers: String = (0..2)
        .map(|i| format!("x-long{i}: {}\r\n", "v".repeat(32_800)))
        .collect();
    let cases: Vec<(Vec<u8>, &str, &str)> = vec![
        (
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd"
                .to_vec(),
            "HTTP/1.1 400",
            "conflicting Content-Length",
        ),
        (
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"
                .to_vec(),
            "HTTP/1.1 501",
            "chunked",
        ),
        (
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\n".to_vec(),
            "HTTP/1.1 400",
            "must end with chunked",
        ),
        (
            format!("GET / HTTP/1.1\r\nHost: x\r\n{many_headers}\r\n").into_bytes(),
            "HTTP/1.1 431",
            "too large",
        ),
        (
            // Few headers but over 64 KiB in all: refused however many reads bring it.
            format!("GET / HTTP/1.1\r\nHost: x\r\n{long_headers}\r\n").into_bytes(),
            "HTTP/1.1 431",
            "too large",
        ),
    ];
    for (bytes, status, reason) in cases {
        let (reply, read) = raw_exchange(proxy.addr, &bytes).await;
        read.unwrap();
        assert!(reply.starts_with(status), "{reply}");
        assert!(reply.contains(reason), "{reply}");
    }
    assert_eq!(b.count(), 0);
    proxy.shutdown().await;
}

/// A backend that writes its response head and body in two writes with Nagle's algorithm on (as
/// Python's `http.server` does) holds the body until the head is acknowledged, and so does a
/// client that writes its request that way; a proxy that delays those ACKs made every such
/// exchange wait 40 ms. Twenty keep-alive writes each way: with the stall they take 800 ms or
/// more; without, a few ms.
#[tokio::test]
async fn a_backend_with_nagle_on_does_not_stall_its_responses() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                // Nagle stays on: the default, as in Python's socketserver.
                let mut buf = Vec::new();
                while read_request(&mut stream, &mut buf).await.is_some() {
                    let head = b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n";
                    if stream.write_all(head).await.is_err()
                        || stream.write_all(b"stored\n").await.is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    let proxy = start_proxy(&simple_config(&[(addr, 1)], "")).await;
    let mut client = Client::connect(proxy.addr).await;
    let started = std::time::Instant::now();
    for _ in 0..20 {
        let reply = client.send(req(Method::PUT, "/k", b"hello")).await;
        expect(&reply, 200, "stored\n");
    }
    let took = started.elapsed();
    assert!(
        took < std::time::Duration::from_millis(400),
        "20 writes took {took:?}: the backend's body waited for delayed ACKs"
    );
    // The same from the client's side: head and body in two writes, Nagle on.
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    let started = std::time::Instant::now();
    for _ in 0..20 {
        stream
            .write_all(b"PUT /k HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n")
            .await
            .unwrap();
        stream.write_all(b"hello").await.unwrap();
        let mut reply = Vec::new();
        while !reply.ends_with(b"stored\n") {
            let mut buf = [0u8; 1024];
            let n = bounded("a reply", stream.read(&mut buf)).await.unwrap();
            assert!(n > 0, "closed after {reply:?}");
            reply.extend_from_slice(&buf[..n]);
        }
    }
    let took = started.elapsed();
    assert!(
        took < std::time::Duration::from_millis(400),
        "20 writes took {took:?}: the client's body waited for delayed ACKs"
    );
    proxy.shutdown().await;
}
