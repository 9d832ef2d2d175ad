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

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

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
    let backend = runtime.block_on(spawn_backend());
    let dir = tempfile::tempdir().expect("temp dir");
    let redis = Redis::start(dir.path());
    if redis.is_none() {
        println!("redis-server not found: skipping the redis rows (apt-get install redis-server)");
    }
    let writegate = Writegate::start(dir.path(), backend, redis.as_ref().map(|r| r.port));
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
        let median = |f: fn(&Load) -> f64| {
            let mut v: Vec<f64> = loads.iter().map(f).collect();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        println!(
            "  {:<16} {:>10.0} {:>9.2} {:>9.2}  {:>6.0}",
            row.name,
            median(|l| l.rate),
            median(|l| l.p50_ms),
            median(|l| l.p99_ms),
            median(|l| l.errors as f64),
        );
    }
}

struct Load {
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
}

impl Load {
    fn describe(&self) -> String {
        format!(
            "{:>8.0} req/s  p50 {:.2} ms  p99 {:.2} ms  errors {}",
            self.rate, self.p50_ms, self.p99_ms, self.errors
        )
    }
}

/// Runs `connections` closed loops against `row` for `duration`.
async fn load(
    addr: SocketAddr,
    row: &Row,
    connections: usize,
    duration: Duration,
    round: u64,
) -> Load {
    let errors = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + duration;
    let tasks: Vec<_> = (0..connections)
        .map(|c| {
            let (host, replay, errors) = (row.host, row.replay, Arc::clone(&errors));
            tokio::spawn(async move {
                connection(
                    addr,
                    host,
                    replay,
                    format!("r{round}-c{c}"),
                    deadline,
                    &errors,
                )
                .await
            })
        })
        .collect();
    let started = Instant::now();
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.unwrap_or_default());
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort_unstable();
    let quantile = |q: f64| {
        let at = ((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1));
        latencies.get(at).map_or(0.0, |us| *us as f64 / 1000.0)
    };
    Load {
        rate: latencies.len() as f64 / elapsed,
        p50_ms: quantile(0.50),
        p99_ms: quantile(0.99),
        errors: errors.load(Ordering::Relaxed),
    }
}

/// One keep-alive connection's loop; the latencies (µs) of its successful requests.
async fn connection(
    addr: SocketAddr,
    host: &'static str,
    replay: bool,
    name: String,
    deadline: Instant,
    errors: &AtomicU64,
) -> Vec<u64> {
    let body = Bytes::from(vec![b'v'; 128]);
    let mut latencies = Vec::new();
    let Ok(stream) = TcpStream::connect(addr).await else {
        errors.fetch_add(1, Ordering::Relaxed);
        return latencies;
    };
    let _ = stream.set_nodelay(true);
    let Ok((mut sender, conn)) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
    else {
        errors.fetch_add(1, Ordering::Relaxed);
        return latencies;
    };
    tokio::spawn(conn);
    let mut n = 0u64;
    while Instant::now() < deadline {
        let key = if replay {
            format!("{name}-replay")
        } else {
            format!("{name}-{n}")
        };
        n += 1;
        let request = Request::post("/orders")
            .header("host", host)
            .header("idempotency-key", key)
            .body(Full::new(body.clone()))
            .expect("request");
        let sent = Instant::now();
        let answered = match sender.send_request(request).await {
            Ok(response) => {
                let ok = response.status() == StatusCode::CREATED;
                response.into_body().collect().await.is_ok() && ok
            }
            Err(_) => false,
        };
        if answered {
            latencies.push(sent.elapsed().as_micros() as u64);
        } else {
            errors.fetch_add(1, Ordering::Relaxed);
            return latencies;
        }
    }
    latencies
}

/// A backend that answers every request 201 with a small JSON body.
async fn spawn_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("backend bind");
    let addr = listener.local_addr().expect("backend addr");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    |request: Request<hyper::body::Incoming>| async move {
                        let _ = request.into_body().collect().await;
                        let mut response = Response::new(Full::new(Bytes::from_static(
                            b"{\"order\":\"created\"}",
                        )));
                        *response.status_mut() = StatusCode::CREATED;
                        Ok::<_, std::convert::Infallible>(response)
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("probe bind");
    listener.local_addr().expect("probe addr").port()
}

fn wait_listening(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{what} did not listen on port {port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
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

struct Writegate {
    child: Child,
    addr: SocketAddr,
}

impl Writegate {
    fn start(dir: &Path, backend: SocketAddr, redis: Option<u16>) -> Writegate {
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
        let path = dir.join("writegate.toml");
        std::fs::write(&path, config).expect("write config");
        let child = Command::new(env!("CARGO_BIN_EXE_writegate"))
            .args(["run", "--config", path.to_str().expect("utf-8 path")])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("start writegate");
        wait_listening(port, "writegate");
        Writegate {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }
}

impl Drop for Writegate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
