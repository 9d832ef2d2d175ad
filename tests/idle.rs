//! Quiet keep-alive connections wait parked, without a task of their own: they still serve their
//! next request, close at their idle timeout and at shutdown, and a fresh one can still speak
//! HTTP/2. Each test names its listener, so that its parked-connections gauge is its own.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use http::Method;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const REQUEST: &[u8] = b"PUT /k HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nv";

fn parked(listener: &str) -> f64 {
    let series = format!("writegate_client_connections_parked{{listener=\"{listener}\"}} ");
    writegate::metrics::install()
        .render()
        .lines()
        .find_map(|l| l.strip_prefix(series.as_str())?.trim().parse().ok())
        .unwrap_or(0.0)
}

async fn wait_parked(listener: &str, count: f64) {
    eventually(
        &format!("{count} connections of {listener} to park"),
        || parked(listener) == count,
    )
    .await;
}

async fn proxy_with(listener: &str, backend: SocketAddr, listener_lines: &str) -> TestProxy {
    writegate::metrics::install();
    let config = simple_config(&[(backend, 1)], "")
        .replace("name = \"main\"", &format!("name = \"{listener}\""))
        .replace(
            "listen = \"127.0.0.1:0\"\n\n[[upstreams]]",
            &format!("listen = \"127.0.0.1:0\"\n{listener_lines}\n\n[[upstreams]]"),
        );
    start_proxy(&config).await
}

/// Sends one request on `stream` and reads its response head and 2-byte body.
async fn exchange(stream: &mut TcpStream) -> String {
    stream.write_all(REQUEST).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let mut got = String::new();
    while !got.contains("\r\n\r\n") {
        let n = bounded("a response", stream.read(&mut buf)).await.unwrap();
        assert!(n > 0, "the proxy closed instead of answering: {got:?}");
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    got
}

async fn read_eof(stream: &mut TcpStream) {
    let mut buf = vec![0u8; 1024];
    loop {
        match bounded("the proxy to close", stream.read(&mut buf)).await {
            Ok(0) | Err(_) => return,
            Ok(_) => continue,
        }
    }
}

#[tokio::test]
async fn a_quiet_connection_parks_and_serves_its_next_request() {
    let b = named_backend("b", Duration::ZERO).await;
    let proxy = proxy_with("parks-and-serves", b.addr, "").await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    assert!(exchange(&mut stream).await.starts_with("HTTP/1.1 200"));
    wait_parked("parks-and-serves", 1.0).await;
    let again = exchange(&mut stream).await;
    assert!(again.starts_with("HTTP/1.1 200"), "{again}");
    assert_eq!(parked("parks-and-serves"), 0.0, "it left the table");
    assert_eq!(b.count(), 2);
    // And parks again once quiet.
    wait_parked("parks-and-serves", 1.0).await;
    proxy.shutdown().await;
    assert_eq!(parked("parks-and-serves"), 0.0);
}

#[tokio::test]
async fn many_parked_connections_each_resume_on_their_own_request() {
    let b = named_backend("b", Duration::ZERO).await;
    let proxy = proxy_with("many-park", b.addr, "").await;
    let mut streams = Vec::new();
    for _ in 0..200 {
        let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
        assert!(exchange(&mut stream).await.starts_with("HTTP/1.1 200"));
        streams.push(stream);
    }
    wait_parked("many-park", 200.0).await;
    // Every other client writes: exactly those are served, the rest stay parked.
    for stream in streams.iter_mut().step_by(2) {
        assert!(exchange(stream).await.starts_with("HTTP/1.1 200"));
    }
    assert_eq!(b.count(), 300);
    wait_parked("many-park", 200.0).await;
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_parked_connection_closes_at_its_idle_timeout() {
    let b = named_backend("b", Duration::ZERO).await;
    let proxy = proxy_with("parked-idle", b.addr, "idle_timeout = \"700ms\"").await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    assert!(exchange(&mut stream).await.starts_with("HTTP/1.1 200"));
    let answered = Instant::now();
    wait_parked("parked-idle", 1.0).await;
    read_eof(&mut stream).await;
    let quiet = answered.elapsed();
    assert!(
        quiet >= Duration::from_millis(650),
        "closed after {quiet:?}, before the 700 ms idle timeout"
    );
    assert_eq!(parked("parked-idle"), 0.0);
    proxy.shutdown().await;
}

#[tokio::test]
async fn shutdown_closes_parked_connections_at_once() {
    let b = named_backend("b", Duration::ZERO).await;
    let proxy = proxy_with("parked-shutdown", b.addr, "").await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    assert!(exchange(&mut stream).await.starts_with("HTTP/1.1 200"));
    wait_parked("parked-shutdown", 1.0).await;
    let started = Instant::now();
    proxy.shutdown().await;
    read_eof(&mut stream).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "shutdown waited {:?} for a parked connection",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_fresh_connection_parked_before_its_first_request_can_speak_http2() {
    let b = named_backend("b", Duration::ZERO).await;
    let proxy = proxy_with("fresh-h2", b.addr, "").await;
    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    wait_parked("fresh-h2", 1.0).await;
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let mut request = req(Method::PUT, "/k", b"v");
    *request.uri_mut() = format!("http://{}/k", proxy.addr).parse().unwrap();
    let response = bounded("an h2 response", sender.send_request(request))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(b.count(), 1);
    drop(sender);
    proxy.shutdown().await;
}
