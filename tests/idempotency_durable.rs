//! The guarantee across processes: a file store survives `kill -9` of writegate, and two writegate
//! processes sharing one real `redis-server` send a write once however its retries are split.

mod support;

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use support::processes::{start_redis, Writegate};
use support::*;

fn keyed(key: &str) -> Request<Full<Bytes>> {
    let mut request = req(Method::POST, "/orders", b"{\"item\":7}");
    request
        .headers_mut()
        .insert("idempotency-key", key.parse().unwrap());
    request
}

/// Writes a config for one route to `backend` with `idempotency` lines; returns its path.
fn write_config(dir: &Path, backend: &TestBackend, idempotency: &str) -> std::path::PathBuf {
    let path = dir.join("writegate.toml");
    let text = format!(
        r#"
[log]
access_log = false

[[listeners]]
name = "main"
listen = "127.0.0.1:0"

[[upstreams]]
name = "orders"
backends = [{{ address = "{}" }}]

[[routes]]
name = "orders"
upstream = "orders"
retries = 0

[routes.idempotency]
{idempotency}
"#,
        backend.addr
    );
    std::fs::write(&path, text).unwrap();
    path
}

async fn created_backend() -> TestBackend {
    backend(|_| async {
        let mut response = Response::new(Full::new(Bytes::from_static(b"{\"order\":1}")));
        *response.status_mut() = StatusCode::CREATED;
        response
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_store_replays_after_writegate_is_killed() {
    let dir = tempfile::tempdir().unwrap();
    let backend = created_backend().await;
    let config = write_config(
        dir.path(),
        &backend,
        "store = \"file\"\npath = \"keys.redb\"",
    );
    let first_run = Writegate::start(&config);
    let first = send(first_run.addr, keyed("order-7")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    first_run.kill_9();

    let second_run = Writegate::start(&config);
    let retry = send(second_run.addr, keyed("order-7")).await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert_eq!(retry.body, first.body);
    assert_eq!(retry.headers["idempotent-replayed"], "true");
    assert_eq!(backend.count(), 1, "the write was applied once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_in_flight_when_writegate_dies_is_never_sent_again() {
    let dir = tempfile::tempdir().unwrap();
    let gate = Gate::default();
    let backend = gated_backend(&gate).await;
    let config = write_config(
        dir.path(),
        &backend,
        "store = \"file\"\npath = \"keys.redb\"",
    );
    let first_run = Writegate::start(&config);
    let addr = first_run.addr;
    let client = tokio::spawn(async move {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let io = hyper_util::rt::TokioIo::new(stream);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        let mut request = keyed("order-8");
        request
            .headers_mut()
            .insert("host", "orders".parse().unwrap());
        sender.send_request(request).await.map(|r| r.status())
    });
    gate.entered().await;
    first_run.kill_9();
    assert!(
        bounded("the client to see the proxy die", client)
            .await
            .unwrap()
            .is_err(),
        "the client got no answer"
    );

    let second_run = Writegate::start(&config);
    let retry = send(second_run.addr, keyed("order-8")).await;
    assert_eq!(retry.status, StatusCode::BAD_GATEWAY);
    let problem: serde_json::Value = serde_json::from_slice(&retry.body).unwrap();
    assert!(
        problem["type"]
            .as_str()
            .unwrap()
            .ends_with("/idempotency-outcome-unknown"),
        "{problem}"
    );
    gate.release(1);
    assert_eq!(backend.count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_writegates_sharing_redis_send_a_burst_of_one_key_once() {
    let Some(redis) = start_redis("two_writegates_sharing_redis_send_a_burst_of_one_key_once")
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let gate = Gate::default();
    let backend = gated_backend(&gate).await;
    let settings = format!(
        "store = \"redis\"\nredis_url = \"{}\"\nconcurrent = \"wait\"",
        redis.url()
    );
    let config = write_config(dir.path(), &backend, &settings);
    let replicas = [Writegate::start(&config), Writegate::start(&config)];
    let clients: Vec<_> = (0..40)
        .map(|i| {
            let addr = replicas[i % 2].addr;
            tokio::spawn(async move { send(addr, keyed("burst-1")).await })
        })
        .collect();
    gate.entered().await;
    // Every client has reached a replica and found the key taken before the write answers.
    tokio::time::sleep(Duration::from_millis(200)).await;
    gate.release(40);
    let mut replayed = 0;
    for client in clients {
        let reply = client.await.unwrap();
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
        assert_eq!(reply.body, "released");
        replayed += usize::from(reply.headers.contains_key("idempotent-replayed"));
    }
    assert_eq!(backend.count(), 1, "the backend applied the write once");
    assert_eq!(replayed, 39, "every other client got the recorded response");

    // And a retry after one replica is gone, at the other.
    let [first, second] = replicas;
    first.kill_9();
    let retry = send(second.addr, keyed("burst-1")).await;
    assert_eq!(retry.headers["idempotent-replayed"], "true");
    assert_eq!(backend.count(), 1);
}
