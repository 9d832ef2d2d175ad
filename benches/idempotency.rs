//! Idempotency keys benchmark: requests/s and latency of keyed writes through writegate with
//! idempotency off, and with the memory, file (redb, fsync per claim and per record) and Redis
//! stores, and of replays (every request a retry of a recorded one).
//!
//! One writegate process (one worker thread), one fast backend (201 with a small body), a closed
//! loop of keep-alive connections sending `POST`s of 128 bytes, each with a fresh
//! `Idempotency-Key` (a new write every time), except in the replay rows, where each connection
//! repeats one key. The rows differ only in the `Host` header, which picks a route. Rounds are
//! interleaved and the medians printed. Redis rows need `redis-server` (started here on a free
//! port, persistence off); without it they are skipped with a message.
//!
//! Run: `cargo bench --bench idempotency` (env: WG_BENCH_SECONDS=5, WG_BENCH_ROUNDS=3,
//! WG_BENCH_CONNECTIONS=32, WG_BENCH_ROWS=off,memory to run only the rows named).

mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use support::{closed_loop, env_or, free_port, spawn_backend, wait_listening, Load, Writegate};

/// One row of the table: a route (by host) and whether requests repeat their key.
struct Row {
    name: &'static str,
    host: &'static str,
    replay: bool,
}

fn main() {
    let seconds = env_or("WG_BENCH_SECONDS", 5);
    let rounds = env_or("WG_BENCH_ROUNDS", 3);
    let connections = env_or("WG_BENCH_CONNECTIONS", 32) as usize;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("load runtime");
    let backend = runtime.block_on(spawn_backend(Duration::ZERO));
    let dir = tempfile::tempdir().expect("temp dir");
    let redis = Redis::start(dir.path());
    if redis.is_none() {
        println!("redis-server not found: skipping the redis rows (apt-get install redis-server)");
    }
    let writegate = start_writegate(dir.path(), backend, redis.as_ref().map(|r| r.port));
    let mut rows = vec![
        Row {
            name: "off",
            host: "off.bench",
            replay: false,
        },
        Row {
            name: "memory",
            host: "memory.bench",
            replay: false,
        },
        Row {
            name: "file",
            host: "file.bench",
            replay: false,
        },
        Row {
            name: "memory replays",
            host: "memory.bench",
            replay: true,
        },
        Row {
            name: "file replays",
            host: "file.bench",
            replay: true,
        },
    ];
    if redis.is_some() {
        rows.insert(
            3,
            Row {
                name: "redis",
                host: "redis.bench",
                replay: false,
            },
        );
        rows.push(Row {
            name: "redis replays",
            host: "redis.bench",
            replay: true,
        });
    }
    if let Ok(only) = std::env::var("WG_BENCH_ROWS") {
        rows.retain(|row| only.split(',').any(|name| name.trim() == row.name));
    }
    println!(
        "idempotency benchmark: {connections} keep-alive connections, POST of 128 bytes, {seconds}s x {rounds} rounds"
    );
    let mut results: Vec<Vec<Load>> = rows.iter().map(|_| Vec::new()).collect();
    for round in 1..=rounds {
        for (row, results) in rows.iter().zip(&mut results) {
            let duration = Duration::from_secs(seconds);
            let load = runtime.block_on(load(writegate.addr, row, connections, duration, round));
            println!("  round {round} {:<16} {}", row.name, load.describe());
            results.push(load);
        }
    }
    println!("\nmedians over {rounds} rounds:");
    println!(
        "  {:<16} {:>10} {:>9} {:>9}  {:>6}",
        "", "req/s", "p50 ms", "p99 ms", "errors"
    );
    for (row, loads) in rows.iter().zip(&results) {
        let median = Load::median(loads);
        println!(
            "  {:<16} {:>10.0} {:>9.2} {:>9.2}  {:>6}",
            row.name, median.rate, median.p50_ms, median.p99_ms, median.errors,
        );
    }
}

/// Runs `connections` closed loops against `row` for `duration`: each request a fresh key, or
/// (replay rows) each connection repeating one.
async fn load(
    addr: std::net::SocketAddr,
    row: &Row,
    connections: usize,
    duration: Duration,
    round: u64,
) -> Load {
    let (host, replay) = (row.host, row.replay);
    let body = Bytes::from(vec![b'v'; 128]);
    let make = Arc::new(move |c: usize, n: u64| {
        let key = if replay {
            format!("r{round}-c{c}-replay")
        } else {
            format!("r{round}-c{c}-{n}")
        };
        Request::post("/orders")
            .header("host", host)
            .header("idempotency-key", key)
            .body(Full::new(body.clone()))
            .expect("request")
    });
    closed_loop(addr, connections, duration, StatusCode::CREATED, make).await
}

struct Redis {
    child: Child,
    port: u16,
}

impl Redis {
    fn start(dir: &Path) -> Option<Redis> {
        let binary = Path::new("/usr/bin/redis-server");
        if !binary.exists() {
            return None;
        }
        let port = free_port();
        let child = Command::new(binary)
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(["--appendonly", "no", "--dir"])
            .arg(dir)
            .stdout(Stdio::null())
            .spawn()
            .ok()?;
        wait_listening(port, "redis-server");
        Some(Redis { child, port })
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_writegate(dir: &Path, backend: std::net::SocketAddr, redis: Option<u16>) -> Writegate {
    let port = free_port();
    let route = |name: &str, idempotency: &str| {
        format!("[[routes]]\nname = \"{name}\"\nhost = \"{name}.bench\"\nupstream = \"b\"\n{idempotency}\n")
    };
    let mut config = format!(
        "[runtime]\nworkers = 1\n\n[log]\naccess_log = false\n\n[[listeners]]\nname = \"bench\"\nlisten = \"127.0.0.1:{port}\"\n\n\
         [[upstreams]]\nname = \"b\"\nbackends = [{{ address = \"{backend}\" }}]\n\n"
    );
    config.push_str(&route("off", ""));
    config.push_str(&route(
        "memory",
        "[routes.idempotency]\nstore = \"memory\"\nmax_entries = 10000000",
    ));
    config.push_str(&route(
        "file",
        "[routes.idempotency]\nstore = \"file\"\npath = \"keys.redb\"",
    ));
    if let Some(redis) = redis {
        config.push_str(&route(
            "redis",
            &format!("[routes.idempotency]\nstore = \"redis\"\nredis_url = \"redis://127.0.0.1:{redis}/0\""),
        ));
    }
    Writegate::start(dir, &config, port)
}
