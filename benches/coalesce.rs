//! Hot rows: what per-key coalescing buys when writes pile up on a few keys.
//!
//! 256 closed-loop writers pick keys from a Zipf(0.99) distribution over 1,000 keys and PUT them
//! through writegate to a backend that, like a database row lock, serializes writes to one key and
//! takes 2 ms per write. For each coalescing mode (`off`, `serialize`, `dedupe` with repeated
//! bodies, `latest`) it reports client writes/s, p50/p99 latency and backend writes per client
//! write. The same proxy serves four routes, one per mode (`/{mode}/{key}`); modes run one after
//! another, each after a warm-up. Where nginx is installed, the same load through nginx (one
//! worker, keep-alive to the backend) comes first, as the bar: it forwards each write as it
//! comes, like `off`.
//!
//! Run: `cargo bench --bench coalesce` (env: WG_BENCH_SECONDS=5, WG_BENCH_WRITERS=256,
//! WG_BENCH_KEYS=1000, WG_BENCH_SERVICE_MS=2).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
mod support;

use writegate::config::Config;
use writegate::server::Proxy;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Per-key row locks and a count of writes performed.
#[derive(Default)]
struct Rows {
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    writes: AtomicU64,
}

async fn spawn_backend(service: Duration) -> (SocketAddr, Arc<Rows>) {
    let rows = Arc::new(Rows::default());
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("backend bind");
    let addr = listener.local_addr().expect("addr");
    let state = Arc::clone(&rows);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let rows = Arc::clone(&state);
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let rows = Arc::clone(&rows);
                    async move {
                        let key = req.uri().path().split('/').nth(2).unwrap_or("").to_string();
                        let _ = req.into_body().collect().await;
                        let lock = {
                            let mut locks = rows.locks.lock().unwrap_or_else(|e| e.into_inner());
                            Arc::clone(locks.entry(key).or_default())
                        };
                        let _row = lock.lock().await;
                        tokio::time::sleep(service).await;
                        rows.writes.fetch_add(1, Ordering::Relaxed);
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok\n"))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, rows)
}

/// Zipf(s) over `n` keys by inverse CDF, with a small xorshift generator per writer.
struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    fn new(n: usize, s: f64) -> Zipf {
        let weights: Vec<f64> = (1..=n).map(|k| 1.0 / (k as f64).powf(s)).collect();
        let total: f64 = weights.iter().sum();
        let mut acc = 0.0;
        let cdf = weights
            .iter()
            .map(|w| {
                acc += w / total;
                acc
            })
            .collect();
        Zipf { cdf }
    }

    fn sample(&self, state: &mut u64) -> usize {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        let u = (*state >> 11) as f64 / (1u64 << 53) as f64;
        self.cdf.partition_point(|&c| c < u).min(self.cdf.len() - 1)
    }
}

struct ModeResult {
    writes: u64,
    errors: u64,
    elapsed: Duration,
    latencies_us: Vec<u32>,
    backend_writes: u64,
}

async fn writer(
    addr: SocketAddr,
    mode: &'static str,
    seed: u64,
    zipf: Arc<Zipf>,
    deadline: Instant,
    repeated_bodies: bool,
) -> (u64, u64, Vec<u32>) {
    let (mut ok, mut errors, mut latencies) = (0u64, 0u64, Vec::new());
    let mut state = seed.max(1);
    let mut sequence = 0u64;
    'connect: while Instant::now() < deadline {
        let Ok(stream) = TcpStream::connect(addr).await else {
            errors += 1;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let Ok((mut sender, conn)) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
        else {
            errors += 1;
            continue;
        };
        tokio::spawn(conn);
        while Instant::now() < deadline {
            if sender.ready().await.is_err() {
                continue 'connect;
            }
            let key = zipf.sample(&mut state);
            sequence += 1;
            let body = if repeated_bodies {
                Bytes::from(format!("value-of-{key}"))
            } else {
                Bytes::from(format!("writer-{seed}-write-{sequence}"))
            };
            let request = Request::builder()
                .method(Method::PUT)
                .uri(format!("/{mode}/key-{key}"))
                .header("host", "bench")
                .body(Full::new(body))
                .expect("request");
            let started = Instant::now();
            match sender.send_request(request).await {
                Ok(response) if response.status().is_success() => {
                    let _ = response.into_body().collect().await;
                    latencies.push(started.elapsed().as_micros() as u32);
                    ok += 1;
                }
                Ok(response) => {
                    let _ = response.into_body().collect().await;
                    errors += 1;
                }
                Err(_) => {
                    errors += 1;
                    continue 'connect;
                }
            }
        }
    }
    (ok, errors, latencies)
}

async fn run_mode(
    addr: SocketAddr,
    rows: &Rows,
    mode: &'static str,
    writers: usize,
    zipf: &Arc<Zipf>,
    duration: Duration,
) -> ModeResult {
    let repeated = mode == "dedupe";
    let backend_before = rows.writes.load(Ordering::Relaxed);
    let started = Instant::now();
    let deadline = started + duration;
    let tasks: Vec<_> = (0..writers)
        .map(|i| {
            let seed = 0x9E37_79B9_7F4A_7C15u64.wrapping_mul(i as u64 + 1);
            tokio::spawn(writer(
                addr,
                mode,
                seed,
                Arc::clone(zipf),
                deadline,
                repeated,
            ))
        })
        .collect();
    let mut result = ModeResult {
        writes: 0,
        errors: 0,
        elapsed: Duration::ZERO,
        latencies_us: Vec::new(),
        backend_writes: 0,
    };
    for t in tasks {
        let (ok, errors, lat) = t.await.expect("writer");
        result.writes += ok;
        result.errors += errors;
        result.latencies_us.extend(lat);
    }
    result.elapsed = started.elapsed();
    // Writes still in flight at the deadline finish before we count the backend's work.
    tokio::time::sleep(Duration::from_millis(200)).await;
    result.backend_writes = rows.writes.load(Ordering::Relaxed) - backend_before;
    result
}

fn main() {
    let seconds = env_or("WG_BENCH_SECONDS", 5);
    let writers = env_or("WG_BENCH_WRITERS", 256) as usize;
    let keys = env_or("WG_BENCH_KEYS", 1000) as usize;
    let service = Duration::from_millis(env_or("WG_BENCH_SERVICE_MS", 2));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let (backend, rows) = spawn_backend(service).await;
        let mut config = format!(
            "[log]\naccess_log = false\n\n[[listeners]]\nname = \"bench\"\nlisten = \"127.0.0.1:0\"\n\n\
             [[upstreams]]\nname = \"rows\"\nbackends = [{{ address = \"{backend}\" }}]\n"
        );
        for mode in ["off", "serialize", "dedupe", "latest"] {
            config.push_str(&format!(
                "\n[[routes]]\nname = \"{mode}\"\npath_prefix = \"/{mode}/\"\nupstream = \"rows\"\n\
                 key = \"path_segment:2\"\n\n[routes.coalesce]\nmode = \"{mode}\"\n"
            ));
        }
        let config = Config::parse(Path::new("bench.toml"), &config).expect("bench config");
        let proxy = Proxy::bind(config).await.expect("proxy binds");
        let addr = proxy.listener_addrs()[0].1;
        tokio::spawn(proxy.run(std::future::pending()));
        let zipf = Arc::new(Zipf::new(keys, 0.99));
        println!(
            "hot rows: {writers} writers, Zipf(0.99) over {keys} keys, backend {service:?} per write with a per-key row lock, {seconds}s per mode\n"
        );
        let dir = tempfile::tempdir().expect("temp dir");
        let nginx = support::nginx_least_conn(dir.path(), &[backend], "");
        if nginx.is_none() {
            println!("nginx not found: the ratios are to writegate's `off` (apt-get install nginx-light)\n");
        }
        let mut targets: Vec<(&str, SocketAddr, &'static str)> = Vec::new();
        if let Some(nginx) = &nginx {
            targets.push(("nginx", SocketAddr::from(([127, 0, 0, 1], nginx.port)), "off"));
        }
        for mode in ["off", "serialize", "dedupe", "latest"] {
            targets.push((mode, addr, mode));
        }
        println!("| through | client writes/s | p50 | p99 | backend writes per client write | errors |");
        println!("|---|---|---|---|---|---|");
        let mut off_rate = None;
        for (name, addr, mode) in targets {
            run_mode(addr, &rows, mode, writers, &zipf, Duration::from_secs(1)).await;
            let mut r = run_mode(addr, &rows, mode, writers, &zipf, Duration::from_secs(seconds)).await;
            r.latencies_us.sort_unstable();
            let pick = |q: f64| {
                let lat = &r.latencies_us;
                lat.get(((lat.len() as f64 - 1.0) * q) as usize).copied().unwrap_or(0)
            };
            let rate = r.writes as f64 / r.elapsed.as_secs_f64();
            let off = *off_rate.get_or_insert(rate);
            let bar = if nginx.is_some() { "nginx" } else { "off" };
            println!(
                "| {name} | {rate:.0} ({:.1}× {bar}) | {:.1} ms | {:.1} ms | {:.2} | {} |",
                rate / off,
                pick(0.5) as f64 / 1000.0,
                pick(0.99) as f64 / 1000.0,
                r.backend_writes as f64 / r.writes.max(1) as f64,
                r.errors
            );
        }
    });
}
