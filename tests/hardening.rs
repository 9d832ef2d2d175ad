//! HTTP/1 hardening, tried as an attacker would over real sockets: limits that hold while the peer
//! keeps sending, waits that end, one Host, strict framing both ways, interim responses.

mod support;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A backend that hands each accepted connection to `serve`; counts connections.
async fn raw_backend<F, Fut>(serve: F) -> (SocketAddr, Arc<AtomicUsize>)
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&connections);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(serve(stream));
        }
    });
    (addr, connections)
}

/// Reads one request head (and as much as came with it) off `stream`.
async fn read_head(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Some(buf)
}

/// A backend answering every request (head read, body not awaited) with `answer`, then keeping
/// the connection open for the next one.
async fn answering_backend(answer: &'static [u8]) -> (SocketAddr, Arc<AtomicUsize>) {
    raw_backend(move |mut stream| async move {
        while read_head(&mut stream).await.is_some() {
            if stream.write_all(answer).await.is_err() {
                return;
            }
        }
    })
    .await
}

/// What an HTTP/1.1 client gets for `request` through a proxy in front of a backend that answers
/// every request with `answer`.
async fn reply_through_proxy(answer: Vec<u8>, request: &[u8]) -> String {
    let (addr, _) = answering_backend(Box::leak(answer.into_boxed_slice())).await;
    let proxy = start_proxy(&config_with_route(addr, "")).await;
    let (reply, _) = raw_exchange(proxy.addr, request).await;
    proxy.shutdown().await;
    reply
}

const GET_CLOSE: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";

/// Waits until the peer closes `stream` (EOF or reset), discarding what it sends.
async fn closed_by_peer(stream: &mut TcpStream) {
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

fn config_with_route(backend: SocketAddr, route_lines: &str) -> String {
    simple_config(&[(backend, 1)], route_lines)
}

fn status_of(reply: &str) -> &str {
    reply.get(9..12).unwrap_or("")
}

/// A chunked request whose trailer section holds `lines`.
fn request_with_trailers(lines: &[String]) -> Vec<u8> {
    let mut out = b"POST /t HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n".to_vec();
    for line in lines {
        out.extend_from_slice(line.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// A trailer line of exactly `len` bytes (CRLF not counted).
fn trailer_line(len: usize) -> String {
    format!("X-T: {}", "t".repeat(len - 5))
}

#[tokio::test]
async fn trailer_limit_holds_at_its_exact_boundary_for_requests() {
    let b = named_backend("b", Duration::ZERO).await;
    let proxy = start_proxy(&simple_config(&[(b.addr, 1)], "")).await;
    // The section's lines and their CRLFs may take 16,384 bytes: a line of 16,382 fits.
    for len in 16_381..=16_386 {
        let (reply, _) =
            raw_exchange(proxy.addr, &request_with_trailers(&[trailer_line(len)])).await;
        let want = if len <= 16_382 { "200" } else { "400" };
        assert_eq!(
            status_of(&reply),
            want,
            "trailer line of {len} bytes: {reply}"
        );
    }
    // Several lines that add up past the limit, by one byte and by one line.
    let lines = vec![trailer_line(8_190), trailer_line(8_191)];
    let (reply, _) = raw_exchange(proxy.addr, &request_with_trailers(&lines)).await;
    assert_eq!(status_of(&reply), "400", "{reply}");
    let lines = vec![trailer_line(8_190), trailer_line(8_190)];
    let (reply, _) = raw_exchange(proxy.addr, &request_with_trailers(&lines)).await;
    assert_eq!(
        status_of(&reply),
        "200",
        "16,384 bytes in two lines fit: {reply}"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn trailer_limit_holds_at_its_exact_boundary_for_responses() {
    for len in 16_381..=16_386 {
        let mut answer =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n".to_vec();
        answer.extend_from_slice(trailer_line(len).as_bytes());
        answer.extend_from_slice(b"\r\n\r\n");
        let reply = reply_through_proxy(answer, GET_CLOSE).await;
        if len <= 16_382 {
            assert_eq!(status_of(&reply), "200", "{len}: {reply}");
            assert!(reply.ends_with("5\r\nhello\r\n0\r\n\r\n"), "{len}: {reply}");
        } else {
            assert_eq!(status_of(&reply), "502", "{len}: {reply}");
            assert!(reply.contains("trailer section too long"), "{reply}");
        }
    }
}

/// The memory hole: trailers that never end, sent as fast as the client can. The proxy answers
/// 400 and closes once 16 KiB are past, instead of buffering all of it.
#[tokio::test]
async fn endless_trailers_are_cut_off_not_buffered() {
    let b = named_backend("b", Duration::ZERO).await;
    let proxy = start_proxy(&simple_config(&[(b.addr, 1)], "")).await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\nX-A: ",
        )
        .await
        .unwrap();
    let (mut reader, mut writer) = stream.into_split();
    let flood = tokio::spawn(async move {
        let junk = vec![b'a'; 64 * 1024];
        let mut sent = 0usize;
        // 64 MiB at most: far past any bound, short of hurting the machine.
        while sent < 64 << 20 {
            match writer.write_all(&junk).await {
                Ok(()) => sent += junk.len(),
                Err(_) => break,
            }
        }
        sent
    });
    let mut reply = Vec::new();
    let _ = bounded(
        "the proxy to refuse and close",
        reader.read_to_end(&mut reply),
    )
    .await;
    let reply = String::from_utf8_lossy(&reply);
    assert!(
        reply.starts_with("HTTP/1.1 400") && reply.contains("trailer section too long"),
        "{reply}"
    );
    let sent = bounded("the flood to stop", flood).await.unwrap();
    assert!(
        sent < 64 << 20,
        "the proxy kept reading: {sent} bytes taken"
    );
    assert_eq!(
        b.count(),
        0,
        "a request with broken framing reaches no backend"
    );
    proxy.shutdown().await;
}

/// The same hole from the backend side: a response whose trailers never end is a 502, and the
/// backend connection is closed rather than read forever.
#[tokio::test]
async fn a_backend_with_endless_trailers_is_cut_off() {
    let (addr, _) = raw_backend(|mut stream| async move {
        if read_head(&mut stream).await.is_none() {
            return;
        }
        let _ = stream
            .write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\nX-A: ")
            .await;
        let junk = vec![b'a'; 64 * 1024];
        for _ in 0..1024 {
            if stream.write_all(&junk).await.is_err() {
                return;
            }
        }
        panic!("the proxy read 64 MiB of trailers");
    })
    .await;
    let proxy = start_proxy(&config_with_route(addr, "")).await;
    let (reply, _) = raw_exchange(
        proxy.addr,
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 502"), "{reply}");
    assert!(reply.contains("(upstream \"up\")"), "{reply}");
    proxy.shutdown().await;
}

#[tokio::test]
async fn endless_chunk_size_lines_and_heads_are_cut_off() {
    let b = named_backend("b", Duration::ZERO).await;
    let proxy = start_proxy(&simple_config(&[(b.addr, 1)], "")).await;
    let mut chunk_line =
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1;ext=".to_vec();
    chunk_line.extend(std::iter::repeat_n(b'e', 1 << 20));
    let (reply, _) = raw_exchange(proxy.addr, &chunk_line).await;
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    let mut head = b"GET / HTTP/1.1\r\nHost: x\r\nX-Long: ".to_vec();
    head.extend(std::iter::repeat_n(b'h', 1 << 20));
    let (reply, _) = raw_exchange(proxy.addr, &head).await;
    assert!(reply.starts_with("HTTP/1.1 431"), "{reply}");
    let mut many = b"GET / HTTP/1.1\r\nHost: x\r\n".to_vec();
    for i in 0..200 {
        many.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    let (reply, _) = raw_exchange(proxy.addr, &many).await;
    assert!(reply.starts_with("HTTP/1.1 431"), "{reply}");
    // Empty lines before a request are skipped (RFC 9112 §2.2), however many come.
    let mut blank = b"\r\n".repeat(40_000);
    blank.extend_from_slice(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let (reply, _) = raw_exchange(proxy.addr, &blank).await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert_eq!(b.count(), 1);
    proxy.shutdown().await;
}

/// A head trickled a byte at a time is still within header_read_timeout as a whole: slowloris.
#[tokio::test]
async fn a_trickled_head_is_cut_off_by_the_header_timeout() {
    let b = named_backend("b", Duration::ZERO).await;
    let config = simple_config(&[(b.addr, 1)], "").replace(
        "listen = \"127.0.0.1:0\"\n\n[[upstreams]]",
        "listen = \"127.0.0.1:0\"\nheader_read_timeout = \"400ms\"\n\n[[upstreams]]",
    );
    let proxy = start_proxy(&config).await;
    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    let started = Instant::now();
    let trickle = tokio::spawn(async move {
        let head = format!("GET / HTTP/1.1\r\nHost: x\r\nX-Slow: {}", "s".repeat(1000));
        for byte in head.as_bytes() {
            if writer.write_all(&[*byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let mut rest = Vec::new();
    let _ = bounded("the header timeout to close", reader.read_to_end(&mut rest)).await;
    assert!(started.elapsed() >= Duration::from_millis(350));
    trickle.abort();
    assert_eq!(b.count(), 0);
    proxy.shutdown().await;
}

/// A backend that sends its head and part of the body, then goes silent, is cut after
/// backend_idle: both connections close, and the client sees a body that did not end.
#[tokio::test]
async fn a_backend_silent_mid_body_is_cut_after_backend_idle() {
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel::<Duration>();
    let closed_tx = Arc::new(std::sync::Mutex::new(Some(closed_tx)));
    let (addr, _) = raw_backend(move |mut stream| {
        let closed_tx = Arc::clone(&closed_tx);
        async move {
            if read_head(&mut stream).await.is_none() {
                return;
            }
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
                .await;
            let silent_since = Instant::now();
            closed_by_peer(&mut stream).await;
            if let Some(tx) = closed_tx.lock().unwrap().take() {
                let _ = tx.send(silent_since.elapsed());
            }
        }
    })
    .await;
    let proxy = start_proxy(&config_with_route(
        addr,
        "timeouts = { response = \"10s\", backend_idle = \"300ms\" }",
    ))
    .await;
    let (reply, _) = raw_exchange(proxy.addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(reply.ends_with("partial"), "the body did not end: {reply}");
    let silent = bounded("the backend connection to close", closed_rx)
        .await
        .unwrap();
    assert!(silent >= Duration::from_millis(250), "cut after {silent:?}");
    proxy.shutdown().await;
}

/// A client that leaves while a response streams: the backend connection is closed at once, not
/// read on (or pooled) until backend_idle.
#[tokio::test]
async fn a_client_leaving_mid_response_closes_the_backend_connection() {
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel::<()>();
    let closed_tx = Arc::new(std::sync::Mutex::new(Some(closed_tx)));
    let (addr, _) = raw_backend(move |mut stream| {
        let closed_tx = Arc::clone(&closed_tx);
        async move {
            if read_head(&mut stream).await.is_none() {
                return;
            }
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
                .await;
            closed_by_peer(&mut stream).await;
            if let Some(tx) = closed_tx.lock().unwrap().take() {
                let _ = tx.send(());
            }
        }
    })
    .await;
    let proxy = start_proxy(&config_with_route(addr, "")).await;
    let mut client = TcpStream::connect(proxy.addr).await.unwrap();
    client
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let mut got = Vec::new();
    while !got.ends_with(b"partial") {
        let n = bounded("the partial response", client.read(&mut buf))
            .await
            .unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    drop(client);
    bounded("the backend connection to close", closed_rx)
        .await
        .unwrap();
    proxy.shutdown().await;
}

/// A client silent mid-body: 408. On a coalescing route the body is read before anything goes
/// upstream, so the backend sees nothing; on a streaming route the backend connection is closed.
#[tokio::test]
async fn a_client_silent_mid_body_gets_408() {
    let b = named_backend("b", Duration::ZERO).await;
    let routes = "timeouts = { client_body = \"300ms\" }\nkey = \"header:x-key\"\n\
                  on_missing_key = \"least_conn\"\ncoalesce = { mode = \"serialize\" }";
    let proxy = start_proxy(&simple_config(&[(b.addr, 1)], routes)).await;
    for (key_line, reached) in [("X-Key: k\r\n", false), ("", true)] {
        let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
        let head = format!(
            "POST /w HTTP/1.1\r\nHost: x\r\n{key_line}Content-Length: 100\r\n\r\nonly-ten-b"
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        let started = Instant::now();
        let mut reply = Vec::new();
        let _ = bounded("the 408", stream.read_to_end(&mut reply)).await;
        let reply = String::from_utf8_lossy(&reply);
        assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
        assert_eq!(
            reply.contains("the backend got part of the request"),
            reached,
            "{reply}"
        );
        assert!(started.elapsed() >= Duration::from_millis(250));
    }
    assert_eq!(b.count(), 0, "no backend acted on a cut-off body");
    proxy.shutdown().await;
}

/// The response timeout starts once the request is sent: a slow upload of a write is not a 504.
#[tokio::test]
async fn the_response_timeout_starts_after_the_upload() {
    let b = named_backend("b", Duration::ZERO).await;
    let proxy = start_proxy(&simple_config(
        &[(b.addr, 1)],
        "timeouts = { response = \"300ms\" }",
    ))
    .await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(b"PUT /w HTTP/1.1\r\nHost: x\r\nContent-Length: 8\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        stream.write_all(b"x").await.unwrap();
    }
    let mut reply = Vec::new();
    let _ = bounded("the reply", stream.read_to_end(&mut reply)).await;
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert_eq!(b.bodies(), [b"xxxxxxxx".to_vec()]);
    proxy.shutdown().await;
}

#[tokio::test]
async fn host_must_be_one_valid_value() {
    let b = named_backend("b", Duration::ZERO).await;
    let proxy = start_proxy(&simple_config(&[(b.addr, 1)], "")).await;
    let cases: [(&[u8], &str); 7] = [
        (
            b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n",
            "more than one Host",
        ),
        (
            b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            "more than one Host",
        ),
        (b"GET / HTTP/1.1\r\n\r\n", "needs a Host header"),
        (b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", "not a valid host"),
        (b"GET / HTTP/1.1\r\nHost: a:b\r\n\r\n", "not a valid host"),
        (b"GET / HTTP/1.1\r\nHost: a@b\r\n\r\n", "not a valid host"),
        (
            b"GET http://u@a/ HTTP/1.1\r\nHost: a\r\n\r\n",
            "authority is not a valid",
        ),
    ];
    for (bytes, reason) in cases {
        let (reply, _) = raw_exchange(proxy.addr, bytes).await;
        assert!(reply.starts_with("HTTP/1.1 400"), "{bytes:?}: {reply}");
        assert!(reply.contains(reason), "{bytes:?}: {reply}");
    }
    for ok in [
        &b"GET / HTTP/1.1\r\nHost: [::1]:8080\r\nConnection: close\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nHost: 10.0.0.1\r\nConnection: close\r\n\r\n",
        b"GET / HTTP/1.0\r\n\r\n",
    ] {
        let (reply, _) = raw_exchange(proxy.addr, ok).await;
        assert!(reply.starts_with("HTTP/1.1 200"), "{ok:?}: {reply}");
    }
    assert_eq!(b.count(), 3);
    proxy.shutdown().await;
}

/// The route and the backend see the same host: the absolute-form target's, in place of Host.
/// `Connection: Host` does not strip it, and an HTTP/1.0 request without one gets an empty one.
#[tokio::test]
async fn route_and_forwarded_host_come_from_one_value() {
    let a = named_backend("a", Duration::ZERO).await;
    let b = named_backend("b", Duration::ZERO).await;
    let config = format!(
        r#"
[log]
access_log = false

[[listeners]]
name = "main"
listen = "127.0.0.1:0"

[[upstreams]]
name = "ua"
backends = [{{ address = "{}" }}]

[[upstreams]]
name = "ub"
backends = [{{ address = "{}" }}]

[[routes]]
name = "ra"
upstream = "ua"
host = "a.example"

[[routes]]
name = "rb"
upstream = "ub"
"#,
        a.addr, b.addr
    );
    let proxy = start_proxy(&config).await;
    let (reply, _) = raw_exchange(
        proxy.addr,
        b"PUT http://a.example/kv/1 HTTP/1.1\r\nHost: b.example\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        reply.ends_with("\r\n\r\na"),
        "routed by the target's host: {reply}"
    );
    assert_eq!(a.last().headers["host"], "a.example");
    let (reply, _) = raw_exchange(
        proxy.addr,
        b"GET /kv/2 HTTP/1.0\r\nHost: a.example\r\nConnection: Host\r\n\r\n",
    )
    .await;
    assert!(reply.ends_with("\r\n\r\na"), "{reply}");
    assert_eq!(
        a.last().headers["host"],
        "a.example",
        "Connection: Host kept it"
    );
    let (reply, _) = raw_exchange(proxy.addr, b"GET /kv/3 HTTP/1.0\r\n\r\n").await;
    assert!(reply.ends_with("\r\n\r\nb"), "{reply}");
    assert_eq!(
        b.last().headers["host"],
        "",
        "an empty Host for a request without one"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn malformed_chunk_lines_are_refused_both_ways() {
    let bad_lines: [&[u8]; 7] = [
        b" 5\r\nhello\r\n0\r\n\r\n",
        b"5\rhello\r\n0\r\n\r\n",
        b"5\nhello\r\n0\r\n\r\n",
        b"5\r\rhello\r\n0\r\n\r\n",
        b"00000000000000005\r\nhello\r\n0\r\n\r\n",
        b"+5\r\nhello\r\n0\r\n\r\n",
        b"5 x\r\nhello\r\n0\r\n\r\n",
    ];
    let b = named_backend("b", Duration::ZERO).await;
    let proxy = start_proxy(&simple_config(&[(b.addr, 1)], "")).await;
    for body in bad_lines {
        let mut request =
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        request.extend_from_slice(body);
        let (reply, _) = raw_exchange(proxy.addr, &request).await;
        assert!(reply.starts_with("HTTP/1.1 400"), "{body:?}: {reply}");
    }
    // Spaces before `;` and extensions are allowed.
    let (reply, _) = raw_exchange(
        proxy.addr,
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5 \t;a=\"b c\"\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert_eq!(b.bodies(), [b"hello".to_vec()]);
    // Transfer-Encoding with a malformed Content-Length beside it.
    let (reply, _) = raw_exchange(
        proxy.addr,
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: abc\r\n\r\n0\r\n\r\n",
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    proxy.shutdown().await;
    for body in bad_lines {
        let mut answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        answer.extend_from_slice(body);
        let reply = reply_through_proxy(answer, GET_CLOSE).await;
        assert!(reply.starts_with("HTTP/1.1 502"), "{body:?}: {reply}");
        assert!(reply.contains("(upstream \"up\")"), "{reply}");
    }
}

#[tokio::test]
async fn response_framing_and_status_rules() {
    // Both Content-Length and chunked: read as chunked, and the connection is not reused.
    let (addr, connections) = answering_backend(
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    let proxy = start_proxy(&config_with_route(addr, "")).await;
    for _ in 0..2 {
        let reply = get(proxy.addr, "/").await;
        assert_eq!(
            (reply.status.as_u16(), reply.text().as_str()),
            (200, "hello")
        );
    }
    assert_eq!(connections.load(Ordering::SeqCst), 2, "never reused");
    proxy.shutdown().await;
    // Status codes outside 100-599.
    for answer in [
        &b"HTTP/1.1 600 Nope\r\nContent-Length: 0\r\n\r\n"[..],
        b"HTTP/1.1 099 Nope\r\nContent-Length: 0\r\n\r\n",
    ] {
        let reply = reply_through_proxy(answer.to_vec(), GET_CLOSE).await;
        assert_eq!(status_of(&reply), "502", "{answer:?}: {reply}");
    }
    // A 204 carries no Content-Length and no body, whatever the backend wrote.
    let reply = reply_through_proxy(
        b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\nX-A: 1\r\n\r\n".to_vec(),
        b"DELETE / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 204"), "{reply}");
    assert!(
        !reply.to_ascii_lowercase().contains("content-length"),
        "{reply}"
    );
    assert!(reply.ends_with("\r\n\r\n"), "{reply}");
}

/// 103 Early Hints (and any 1xx but 101) reach HTTP/1.1 clients ahead of the final response;
/// HTTP/1.0 clients never see them.
#[tokio::test]
async fn interim_responses_reach_http11_clients_only() {
    let answer =
        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\nConnection: x\r\n\r\n\
          HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
    let reply = reply_through_proxy(answer.to_vec(), GET_CLOSE).await;
    assert!(
        reply.starts_with("HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\nHTTP/1.1 200 OK\r\n"),
        "{reply}"
    );
    assert!(reply.ends_with("ok"), "{reply}");
    let reply = reply_through_proxy(answer.to_vec(), b"GET / HTTP/1.0\r\nHost: x\r\n\r\n").await;
    assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply}");
}

/// `Expect: 100-continue`: the client gets its 100 once the proxy is ready for the body, before
/// sending any of it, and the write completes end to end.
#[tokio::test]
async fn expect_continue_works_end_to_end() {
    let b = named_backend("b", Duration::ZERO).await;
    let proxy = start_proxy(&simple_config(&[(b.addr, 1)], "")).await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(b"PUT /w HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 256];
    let n = bounded("100 Continue before the body", stream.read(&mut buf))
        .await
        .unwrap();
    assert_eq!(&buf[..n], b"HTTP/1.1 100 Continue\r\n\r\n");
    stream.write_all(b"hello").await.unwrap();
    let mut reply = Vec::new();
    let _ = bounded("the reply", stream.read_to_end(&mut reply)).await;
    assert!(String::from_utf8_lossy(&reply).starts_with("HTTP/1.1 200"));
    assert_eq!(b.bodies(), [b"hello".to_vec()]);
    assert!(
        !b.last().headers.contains_key("expect"),
        "the proxy answered it"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn connect_and_trace_need_a_route_that_allows_them() {
    let b = named_backend("b", Duration::ZERO).await;
    let proxy = start_proxy(&simple_config(&[(b.addr, 1)], "")).await;
    for request in [
        &b"CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\nConnection: close\r\n\r\n"[..],
        b"TRACE / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    ] {
        let (reply, _) = raw_exchange(proxy.addr, request).await;
        assert!(reply.starts_with("HTTP/1.1 405"), "{reply}");
    }
    assert_eq!(b.count(), 0);
    proxy.shutdown().await;
    let proxy = start_proxy(&simple_config(&[(b.addr, 1)], "methods = [\"TRACE\"]")).await;
    let (reply, _) = raw_exchange(
        proxy.addr,
        b"TRACE / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert_eq!(b.count(), 1);
    proxy.shutdown().await;
}

/// A backend that takes the head and then reads nothing: the upload stalls, and after
/// backend_idle the client gets a 504 instead of waiting for ever.
#[tokio::test]
async fn a_backend_that_stops_reading_the_upload_is_a_504() {
    let (addr, _) = raw_backend(|mut stream| async move {
        let _ = read_head(&mut stream).await;
        // Holds the connection open, reading nothing more; the test ends well before this does.
        tokio::time::sleep(STEP).await;
        drop(stream);
    })
    .await;
    let proxy = start_proxy(&config_with_route(
        addr,
        "max_body = \"64MiB\"\ntimeouts = { backend_idle = \"300ms\" }",
    ))
    .await;
    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    const LEN: usize = 48 << 20;
    let upload = tokio::spawn(async move {
        let head = format!("PUT /w HTTP/1.1\r\nHost: x\r\nContent-Length: {LEN}\r\n\r\n");
        writer.write_all(head.as_bytes()).await.unwrap();
        let piece = vec![b'u'; 1 << 20];
        for _ in 0..LEN / piece.len() {
            if writer.write_all(&piece).await.is_err() {
                return;
            }
        }
    });
    let mut reply = Vec::new();
    let _ = bounded("the 504", reader.read_to_end(&mut reply)).await;
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("HTTP/1.1 504"), "{reply}");
    assert!(reply.contains("stopped reading the request"), "{reply}");
    upload.abort();
    proxy.shutdown().await;
}
