//! Write buffering benchmark: how fast writegate answers buffered writes 202 (each on disk first)
//! with `sync = "batch"` (group commit) and `sync = "always"` (one fsync per write), next to the
//! same writes sent synchronously; and how fast a backlog drains into a backend of known capacity.
//!
//! One writegate process (one worker thread). Accept rows: a closed loop of keep-alive
//! connections sending `POST /orders/k{n % 1000}` with 128 bytes; the rows differ only in the
//! `Host` header, which picks a route. Buffered writes are delivered to a fast backend while the
//! load runs; each row waits for its backlog to drain before the next starts, and reports that
//! time. Rounds are interleaved and the medians printed.
//!
//! Drain row: a backend that answers after `WG_BENCH_BACKEND_MS` (2 ms), so that with the route's
//! 32 deliveries in flight it can take at most 32 / 2 ms = 16,000 writes/s. It holds its answers
//! while `WG_BENCH_BACKLOG` (20,000) writes are buffered, then lets them go; the time to an empty
//! log gives the delivery rate.
//!
//! Where `rabbitmq-server` and `redis-server` are installed, a fourth row buffers on a RabbitMQ
//! broker of its own (`store = "rabbitmq"`, 4 partitions, receipts in Redis); its drain time is
//! read from a depth the proxy refreshes every 2 s.
//!
//! Run: `cargo bench --bench buffer` (env: WG_BENCH_SECONDS=5, WG_BENCH_ROUNDS=3,
//! WG_BENCH_CONNECTIONS=32, WG_BENCH_BACKLOG=20000, WG_BENCH_BACKEND_MS=2).

#[path = "../tests/support/processes.rs"]
#[allow(dead_code)]
mod processes;
mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use support::{closed_loop, env_or, free_port, spawn_backend, Load, Writegate};
use tokio::net::TcpStream;

/// One accept row: a route (by host) and the status its writes get.
struct Row {
    name: &'static str,
    host: &'static str,
    expect: StatusCode,
}

/// The RabbitMQ row: measured where `rabbitmq-server` and `redis-server` are installed.
const RABBIT_ROW: Row = Row {
    name: "rabbitmq",
    host: "rabbit.bench",
    expect: StatusCode::ACCEPTED,
};

const ROWS: [Row; 3] = [
    Row {
        name: "synchronous",
        host: "sync.bench",
        expect: StatusCode::CREATED,
    },
    Row {
        name: "sync = batch",
        host: "batch.bench",
        expect: StatusCode::ACCEPTED,
    },
    Row {
        name: "sync = always",
        host: "always.bench",
        expect: StatusCode::ACCEPTED,
    },
];

fn main() {
    let seconds = env_or("WG_BENCH_SECONDS", 5);
    let rounds = env_or("WG_BENCH_ROUNDS", 3);
    let connections = env_or("WG_BENCH_CONNECTIONS", 32) as usize;
    let backlog = env_or("WG_BENCH_BACKLOG", 20_000);
    let backend_ms = env_or("WG_BENCH_BACKEND_MS", 2);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("load runtime");
    let fast = runtime.block_on(spawn_backend(Duration::ZERO));
    let (open, gate) = tokio::sync::watch::channel(false);
    let slow = runtime.block_on(spawn_gated_backend(Duration::from_millis(backend_ms), gate));
    let dir = tempfile::tempdir().expect("temp dir");
    let (port, admin) = (free_port(), free_port());
    let redis = processes::start_redis("the rabbitmq row of the buffer benchmark");
    let broker = redis
        .as_ref()
        .and_then(|_| processes::start_rabbitmq("the rabbitmq row of the buffer benchmark"));
    let rabbit = redis.as_ref().zip(broker.as_ref()).map(|(redis, broker)| {
        format!(
            "[routes.buffer]\nstore = \"rabbitmq\"\namqp_url = \"{}\"\nreceipts_url = \"{}\"\n",
            broker.url(),
            redis.url()
        )
    });
    let mut rows: Vec<&Row> = ROWS.iter().collect();
    if rabbit.is_some() {
        rows.push(&RABBIT_ROW);
    }
    let config = config(dir.path(), port, admin, fast, slow, rabbit.as_deref());
    let writegate = Writegate::start(dir.path(), &config, port);
    let admin = SocketAddr::from(([127, 0, 0, 1], admin));

    println!(
        "buffer benchmark: {connections} keep-alive connections, POST of 128 bytes over 1,000 keys, {seconds}s x {rounds} rounds"
    );
    let mut results: Vec<(Vec<Load>, Vec<f64>)> = rows.iter().map(|_| Default::default()).collect();
    for round in 1..=rounds {
        for (row, results) in rows.iter().zip(&mut results) {
            let duration = Duration::from_secs(seconds);
            let load = runtime.block_on(accept(writegate.addr, row, connections, duration));
            let drained = runtime.block_on(drain_seconds(admin));
            println!(
                "  round {round} {:<14} {}  drained {drained:.2}s later",
                row.name,
                load.describe()
            );
            results.0.push(load);
            results.1.push(drained);
        }
    }
    println!("\nmedians over {rounds} rounds:");
    println!(
        "  {:<14} {:>10} {:>9} {:>9}  {:>6} {:>12}",
        "", "req/s", "p50 ms", "p99 ms", "errors", "drain s"
    );
    for (row, (loads, drains)) in rows.iter().zip(&mut results) {
        let median = Load::median(loads);
        drains.sort_by(f64::total_cmp);
        println!(
            "  {:<14} {:>10.0} {:>9.2} {:>9.2}  {:>6} {:>12.2}",
            row.name,
            median.rate,
            median.p50_ms,
            median.p99_ms,
            median.errors,
            drains[drains.len() / 2]
        );
    }

    let rate = runtime.block_on(drain_rate(writegate.addr, admin, &open, backlog));
    // What the backend takes from 32 connections sending straight to it (timer granularity
    // makes a "2 ms" answer take longer).
    let direct = runtime.block_on(accept(slow, &ROWS[0], 32, Duration::from_secs(seconds)));
    println!(
        "\ndrain: {backlog} buffered writes into a backend of {backend_ms} ms per write: {rate:.0} writes/s; \
         the same backend from 32 direct connections: {:.0} writes/s ({:.0}%)",
        direct.rate,
        rate / direct.rate * 100.0
    );
}

fn config(
    dir: &std::path::Path,
    port: u16,
    admin: u16,
    fast: SocketAddr,
    slow: SocketAddr,
    rabbit: Option<&str>,
) -> String {
    for log in ["batch", "always", "drain"] {
        std::fs::create_dir_all(dir.join(log)).expect("log dir");
    }
    let route = |name: &str, upstream: &str, buffer: &str| {
        format!(
            "[[routes]]\nname = \"{name}\"\nhost = \"{name}.bench\"\nupstream = \"{upstream}\"\nkey = \"path_segment:2\"\nretries = 0\n{buffer}\n"
        )
    };
    let buffer = |log: &str, sync: &str| {
        format!(
            "[routes.buffer]\ndir = \"{}\"\nsync = \"{sync}\"\n",
            dir.join(log).display()
        )
    };
    let mut config = format!(
        "[runtime]\nworkers = 1\n\n[log]\naccess_log = false\n\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n\n\
         [[listeners]]\nname = \"bench\"\nlisten = \"127.0.0.1:{port}\"\n\n\
         [[upstreams]]\nname = \"fast\"\nbackends = [{{ address = \"{fast}\" }}]\n\n\
         [[upstreams]]\nname = \"slow\"\nbackends = [{{ address = \"{slow}\" }}]\n\n"
    );
    config.push_str(&route("sync", "fast", ""));
    config.push_str(&route("batch", "fast", &buffer("batch", "batch")));
    config.push_str(&route("always", "fast", &buffer("always", "always")));
    config.push_str(&route("drain", "slow", &buffer("drain", "batch")));
    if let Some(rabbit) = rabbit {
        config.push_str(&route("rabbit", "fast", rabbit));
    }
    config
}

/// `connections` closed loops of writes over 1,000 keys to the row's route.
async fn accept(addr: SocketAddr, row: &Row, connections: usize, duration: Duration) -> Load {
    let host = row.host;
    let body = Bytes::from(vec![b'v'; 128]);
    let make = Arc::new(move |c: usize, n: u64| {
        let key = (c as u64 * 7919 + n) % 1000;
        Request::post(format!("/orders/k{key}"))
            .header("host", host)
            .body(Full::new(body.clone()))
            .expect("request")
    });
    closed_loop(addr, connections, duration, row.expect, make).await
}

/// Writes waiting in every buffer, from the admin API.
async fn depth(admin: SocketAddr) -> u64 {
    let stream = TcpStream::connect(admin).await.expect("admin connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("admin handshake");
    tokio::spawn(conn);
    let request = Request::get("/buffers")
        .header("host", "admin")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let response = sender.send_request(request).await.expect("GET /buffers");
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    let json: serde_json::Value = serde_json::from_slice(&body).expect("/buffers JSON");
    // RabbitMQ's depth counts the messages ready (read every 2 s); those a replica holds
    // unacknowledged are counted apart.
    json["buffers"].as_array().map_or(0, |list| {
        list.iter()
            .map(|b| {
                b["depth"].as_u64().unwrap_or(0) + b["unacknowledged_here"].as_u64().unwrap_or(0)
            })
            .sum()
    })
}

/// Seconds until every buffer is empty (at most 10 minutes).
async fn drain_seconds(admin: SocketAddr) -> f64 {
    let started = Instant::now();
    while depth(admin).await > 0 {
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "the buffers did not drain in 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    started.elapsed().as_secs_f64()
}

/// Buffers `backlog` writes for the slow upstream while its backend holds its answers, then
/// opens it and times the drain: writes delivered per second.
async fn drain_rate(
    addr: SocketAddr,
    admin: SocketAddr,
    open: &tokio::sync::watch::Sender<bool>,
    backlog: u64,
) -> f64 {
    let body = Bytes::from(vec![b'v'; 128]);
    let per_connection = backlog.div_ceil(32);
    let mut tasks = Vec::new();
    for c in 0..32u64 {
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            let stream = TcpStream::connect(addr).await.expect("connect");
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .expect("handshake");
            tokio::spawn(conn);
            for n in 0..per_connection {
                let request = Request::post(format!("/orders/k{}", (n * 32 + c) % 1000))
                    .header("host", "drain.bench")
                    .body(Full::new(body.clone()))
                    .expect("request");
                let response = sender.send_request(request).await.expect("buffered write");
                assert_eq!(response.status(), StatusCode::ACCEPTED);
                let _ = response.into_body().collect().await;
            }
        }));
    }
    for task in tasks {
        task.await.expect("writer");
    }
    let queued = depth(admin).await;
    let started = Instant::now();
    open.send_replace(true);
    drain_seconds(admin).await;
    queued as f64 / started.elapsed().as_secs_f64()
}

/// A backend that answers 201 after `delay`, once `gate` is true.
async fn spawn_gated_backend(
    delay: Duration,
    gate: tokio::sync::watch::Receiver<bool>,
) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("backend bind");
    let addr = listener.local_addr().expect("backend addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let gate = gate.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                        let mut gate = gate.clone();
                        async move {
                            let _ = request.into_body().collect().await;
                            let _ = gate.wait_for(|open| *open).await;
                            tokio::time::sleep(delay).await;
                            let mut response = http::Response::new(Full::new(Bytes::new()));
                            *response.status_mut() = StatusCode::CREATED;
                            Ok::<_, std::convert::Infallible>(response)
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}
