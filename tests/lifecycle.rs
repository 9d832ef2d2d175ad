//! Connection lifetimes: graceful shutdown, slow and idle clients, clients that vanish.

mod support;

use std::sync::Arc;
use std::time::Duration;

use http::Method;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn graceful_shutdown_lets_an_in_flight_request_complete() {
    let gate = Gate::default();
    let b = gated_backend(&gate).await;
    let mut proxy = start_proxy(&simple_config(&[(b.addr, 1)], "")).await;
    let addr = proxy.addr;
    let in_flight = tokio::spawn(async move { send(addr, req(Method::PUT, "/k", b"v")).await });
    gate.entered().await;
    proxy.begin_shutdown();
    // New connections are refused once the listener is closed.
    eventually("listener to close", || {
        std::net::TcpStream::connect(addr).is_err()
    })
    .await;
    assert!(
        !proxy.is_finished(),
        "the proxy waits for the in-flight request"
    );
    gate.release(1);
    let reply = bounded("in-flight reply", in_flight).await.unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(reply.text(), "released");
    proxy.wait_finished().await;
}

#[tokio::test]
async fn shutdown_deadline_bounds_the_wait() {
    let gate = Gate::default();
    let b = gated_backend(&gate).await;
    let config = simple_config(&[(b.addr, 1)], "")
        .replace("[log]", "[runtime]\nshutdown_timeout = \"300ms\"\n\n[log]");
    let mut proxy = start_proxy(&config).await;
    let addr = proxy.addr;
    let _stuck = tokio::spawn(async move { send(addr, req(Method::PUT, "/k", b"v")).await });
    gate.entered().await;
    let started = std::time::Instant::now();
    proxy.begin_shutdown();
    proxy.wait_finished().await;
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(250),
        "waited for the deadline: {waited:?}"
    );
    assert!(
        waited < Duration::from_secs(5),
        "but not for the stuck request: {waited:?}"
    );
}

#[tokio::test]
async fn idle_keep_alive_connection_closes_at_once_on_shutdown() {
    let b = named_backend("b", Duration::ZERO).await;
    let proxy = start_proxy(&simple_config(&[(b.addr, 1)], "")).await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = bounded("first reply", stream.read(&mut buf)).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // The connection is now idle: shutdown must not wait for the client to leave.
    proxy.shutdown().await;
    let n = bounded("server close", stream.read(&mut buf))
        .await
        .unwrap_or(0);
    assert_eq!(n, 0, "the proxy closed the idle connection");
}

#[tokio::test]
async fn slow_header_sender_is_disconnected() {
    let b = named_backend("b", Duration::ZERO).await;
    let config = simple_config(&[(b.addr, 1)], "").replace(
        "listen = \"127.0.0.1:0\"\n\n[[upstreams]]",
        "listen = \"127.0.0.1:0\"\nheader_read_timeout = \"300ms\"\n\n[[upstreams]]",
    );
    let proxy = start_proxy(&config).await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut buf = vec![0u8; 1024];
    // The proxy closes the connection (possibly after a 408-style reply): read reaches EOF.
    loop {
        match bounded(
            "header timeout to close the connection",
            stream.read(&mut buf),
        )
        .await
        {
            Ok(0) | Err(_) => break,
            Ok(_) => continue,
        }
    }
    assert!(started.elapsed() >= Duration::from_millis(250));
    assert_eq!(b.count(), 0);
    proxy.shutdown().await;
}

#[tokio::test]
async fn idle_h2_connection_is_closed_after_idle_timeout() {
    let b = named_backend("b", Duration::ZERO).await;
    let config = simple_config(&[(b.addr, 1)], "").replace(
        "listen = \"127.0.0.1:0\"\n\n[[upstreams]]",
        "listen = \"127.0.0.1:0\"\nidle_timeout = \"300ms\"\n\n[[upstreams]]",
    );
    let proxy = start_proxy(&config).await;
    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    let conn = tokio::spawn(conn);
    let request = http::Request::builder()
        .uri(format!("http://x:{}/", proxy.addr.port()))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    assert_eq!(sender.send_request(request).await.unwrap().status(), 200);
    let started = std::time::Instant::now();
    bounded("idle h2 connection to be closed", conn)
        .await
        .unwrap()
        .ok();
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "{:?}",
        started.elapsed()
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn inflight_count_falls_when_the_client_goes_away() {
    let gate = Gate::default();
    let b = gated_backend(&gate).await;
    let proxy = start_proxy(&simple_config(&[(b.addr, 1)], "")).await;
    let snapshot = proxy.snapshots.load_full();
    let backend = Arc::clone(&snapshot.upstreams[0].members[0].backend);
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(b"POST /w HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nv")
        .await
        .unwrap();
    gate.entered().await;
    assert_eq!(backend.inflight(), 1);
    drop(stream);
    eventually("in-flight count to return to 0", || backend.inflight() == 0).await;
    proxy.shutdown().await;
}

#[test]
fn sigterm_stops_the_binary_with_exit_0() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.toml");
    // A listener on port 0 keeps the test free of fixed ports; the log tells us when it is up.
    std::fs::write(
        &path,
        "[[listeners]]\nname = \"h\"\nlisten = \"127.0.0.1:0\"\n\n[[upstreams]]\nname = \"u\"\nbackends = [{ address = \"127.0.0.1:9\" }]\n\n[[routes]]\nname = \"r\"\nupstream = \"u\"\n",
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_writegate"))
        .args(["--config", path.to_str().unwrap()])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let listening = lines
        .by_ref()
        .take(20)
        .flatten()
        .any(|l| l.contains("listening"));
    assert!(listening, "the proxy logs that it is listening");
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let rest: Vec<String> = lines.take(20).flatten().collect();
    let exit = child.wait().unwrap();
    assert_eq!(exit.code(), Some(0), "log after SIGTERM: {rest:?}");
    assert!(
        rest.iter().any(|l| l.contains("shutdown complete")),
        "{rest:?}"
    );
}

/// Runs the binary with `config`, sends one request once it listens, stops it, returns stderr.
fn run_binary_with_one_request(config: &str) -> Vec<String> {
    run_binary_with_one_request_as(config, "text")
}

fn run_binary_with_one_request_as(config: &str, log_format: &str) -> Vec<String> {
    run_binary_as(config, log_format, "HTTP/1.1 502")
}

/// Runs the binary with `config`, sends one PUT once it listens and expects a reply starting with
/// `expected`, stops it, returns stderr.
fn run_binary_as(config: &str, log_format: &str, expected: &str) -> Vec<String> {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.toml");
    std::fs::write(&path, config).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_writegate"))
        .args([
            "run",
            "--config",
            path.to_str().unwrap(),
            "--log-format",
            log_format,
        ])
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let listening = lines
        .by_ref()
        .take(20)
        .map_while(Result::ok)
        .find(|l| l.contains("listening"))
        .expect("the proxy logs that it is listening");
    let addr = match serde_json::from_str::<serde_json::Value>(&listening) {
        Ok(json) => json["addr"].as_str().unwrap().to_string(),
        Err(_) => listening
            .rsplit("addr=")
            .next()
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .to_string(),
    };
    let mut stream = std::net::TcpStream::connect(&addr).unwrap();
    stream.set_read_timeout(Some(STEP)).unwrap();
    stream
        .write_all(b"PUT /kv/k1?x=1 HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\nConnection: close\r\n\r\nv")
        .unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with(expected), "{reply}");
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert_eq!(child.wait().unwrap().code(), Some(0));
    rest
}

const ONE_ROUTE: &str = "[[listeners]]\nname = \"h\"\nlisten = \"127.0.0.1:0\"\n\n[[upstreams]]\nname = \"u\"\nbackends = [{ address = \"127.0.0.1:9\" }]\n\n[[routes]]\nname = \"r\"\nupstream = \"u\"\n";

#[test]
fn access_log_has_one_line_per_request_and_can_be_switched_off() {
    let log = run_binary_with_one_request(ONE_ROUTE);
    let access: Vec<&String> = log
        .iter()
        .filter(|l| l.contains("writegate::access"))
        .collect();
    assert_eq!(access.len(), 1, "{log:?}");
    for field in [
        "method=PUT",
        "path=\"/kv/k1\"",
        "status=502",
        "route=\"r\"",
        "backend=\"127.0.0.1:9\"",
        "duration_us=",
    ] {
        assert!(
            access[0].contains(field),
            "{field} missing in {}",
            access[0]
        );
    }
    let quiet = run_binary_with_one_request(&format!("[log]\naccess_log = false\n\n{ONE_ROUTE}"));
    assert!(
        !quiet.iter().any(|l| l.contains("writegate::access")),
        "{quiet:?}"
    );
}

#[test]
fn json_logs_have_one_object_per_line_with_stable_access_fields() {
    let log = run_binary_with_one_request_as(ONE_ROUTE, "json");
    let access: Vec<serde_json::Value> = log
        .iter()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap_or_else(|e| panic!("{e}: {l}"))
        })
        .filter(|j| j["target"] == "writegate::access")
        .collect();
    assert_eq!(access.len(), 1, "{log:?}");
    let line = &access[0];
    assert_eq!(line["method"], "PUT");
    assert_eq!(line["path"], "/kv/k1");
    assert_eq!(line["status"], 502);
    assert_eq!(line["route"], "r");
    assert_eq!(line["backend"], "127.0.0.1:9");
    assert!(line["duration_us"].is_u64());
    assert!(line["head_us"].is_u64());
    assert_eq!(line["client"], "127.0.0.1");
    let id = line["request_id"].as_str().unwrap();
    assert!(
        id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "{line}"
    );
    assert_eq!(line["retries"], 0);
    assert_eq!(line["outcome"], "connect_failed");
    assert_eq!(line["bytes_in"], 1);
    assert!(line["bytes_out"].as_u64().unwrap() > 0, "{line}");
    assert_eq!(line["complete"], true);
}

/// The access line's duration is the whole request, body included (nginx's `$request_time`):
/// a backend that sends its head at once and its body 300 ms later.
#[test]
fn access_duration_covers_the_whole_response() {
    use std::io::{Read, Write};
    let backend = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = backend.local_addr().unwrap();
    let serving = std::thread::spawn(move || {
        let (mut stream, _) = backend.accept().unwrap();
        let mut buf = [0u8; 4096];
        let _ = stream.read(&mut buf);
        stream
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nConnection: close\r\n\r\n")
            .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        stream.write_all(b"slow").unwrap();
    });
    let config = ONE_ROUTE.replace("127.0.0.1:9", &addr.to_string());
    let log = run_binary_as(&config, "json", "HTTP/1.1 200");
    serving.join().unwrap();
    let line = log
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|j| j["target"] == "writegate::access")
        .unwrap_or_else(|| panic!("no access line: {log:?}"));
    let (head, whole) = (
        line["head_us"].as_u64().unwrap(),
        line["duration_us"].as_u64().unwrap(),
    );
    assert!(whole >= 300_000, "{line}");
    assert!(head < whole, "{line}");
    assert_eq!(line["bytes_out"], 4);
    assert_eq!(line["outcome"], "-");
    assert_eq!(line["complete"], true);
}
