//! Goodput under overload, with admission control on and off.
//!
//! A backend that serves at most 16 requests at once, 5 ms each (capacity 3,200 requests/s), sits
//! behind writegate. An open-loop generator offers 1×, 2× and 4× that rate for a few seconds;
//! latency is measured from each request's scheduled send time (so a stalled client cannot hide
//! queueing), and a response later than the client timeout (1 s) counts as a failure. Reported:
//! goodput (successful, in-time responses per second), p99 latency of the successful ones, and
//! how many requests were shed. "off" is a plain route; "on" adds `[routes.admission]` with
//! `max_inflight = 16`, `max_queue = 16`, `queue_timeout = "20ms"`.
//!
//! Run: `cargo bench --bench admission` (env: WG_BENCH_SECONDS=3).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Mutex, Semaphore};
use writegate::config::Config;
use writegate::server::Proxy;

const CAPACITY: usize = 16;
const SERVICE: Duration = Duration::from_millis(5);
const CLIENT_TIMEOUT: Duration = Duration::from_secs(1);
const CONNECTIONS: usize = 512;

async fn spawn_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let slots = Arc::new(Semaphore::new(CAPACITY));
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let slots = Arc::clone(&slots);
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let slots = Arc::clone(&slots);
                    async move {
                        let _ = req.into_body().collect().await;
                        let _slot = slots.acquire().await;
                        tokio::time::sleep(SERVICE).await;
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
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

#[derive(Default)]
struct Tally {
    ok: u64,
    shed: u64,
    failed: u64,
    latencies_us: Vec<u32>,
}

/// Offers `rate` requests/s to `addr` for `duration`, open loop.
async fn offer(addr: SocketAddr, host: &'static str, rate: u64, duration: Duration) -> Tally {
    let (tx, rx) = mpsc::unbounded_channel::<Instant>();
    let rx = Arc::new(Mutex::new(rx));
    let tally = Arc::new(std::sync::Mutex::new(Tally::default()));
    let workers: Vec<_> = (0..CONNECTIONS)
        .map(|_| {
            let (rx, tally) = (Arc::clone(&rx), Arc::clone(&tally));
            tokio::spawn(async move {
                let Ok(stream) = TcpStream::connect(addr).await else {
                    return;
                };
                let Ok((mut sender, conn)) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
                else {
                    return;
                };
                tokio::spawn(conn);
                loop {
                    let Some(scheduled) = rx.lock().await.recv().await else {
                        return;
                    };
                    if sender.ready().await.is_err() {
                        tally.lock().unwrap_or_else(|e| e.into_inner()).failed += 1;
                        return;
                    }
                    let request = Request::builder()
                        .method(Method::POST)
                        .uri("/w")
                        .header("host", host)
                        .body(Full::new(Bytes::from_static(b"payload")))
                        .expect("request");
                    let result = sender.send_request(request).await;
                    let status = match result {
                        Ok(response) => {
                            let status = response.status();
                            let _ = response.into_body().collect().await;
                            Some(status)
                        }
                        Err(_) => None,
                    };
                    let took = scheduled.elapsed();
                    let mut t = tally.lock().unwrap_or_else(|e| e.into_inner());
                    match status {
                        Some(s) if s.is_success() && took <= CLIENT_TIMEOUT => {
                            t.ok += 1;
                            t.latencies_us.push(took.as_micros() as u32);
                        }
                        Some(s) if s.as_u16() == 503 || s.as_u16() == 429 => t.shed += 1,
                        _ => t.failed += 1,
                    }
                }
            })
        })
        .collect();
    let started = Instant::now();
    let total = rate * duration.as_secs();
    for i in 0..total {
        let at = started + Duration::from_secs_f64(i as f64 / rate as f64);
        tokio::time::sleep_until(at.into()).await;
        let _ = tx.send(at);
    }
    drop(tx);
    // Let what was offered finish (or time out) before counting.
    for w in workers {
        let _ = tokio::time::timeout(CLIENT_TIMEOUT * 3, w).await;
    }
    Arc::try_unwrap(tally)
        .map(|m| m.into_inner().unwrap_or_else(|e| e.into_inner()))
        .unwrap_or_default()
}

fn main() {
    let seconds = std::env::var("WG_BENCH_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3u64);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let backend = spawn_backend().await;
        let config = format!(
            "[log]\naccess_log = false\n\n[[listeners]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\n\n\
             [[upstreams]]\nname = \"b\"\nbackends = [{{ address = \"{backend}\" }}]\n\n\
             [[routes]]\nname = \"off\"\nupstream = \"b\"\n\n\
             [[routes]]\nname = \"on\"\nhost = \"admitted\"\nupstream = \"b\"\n\n\
             [routes.admission]\nmax_inflight = {CAPACITY}\nmax_queue = {CAPACITY}\nqueue_timeout = \"20ms\"\n"
        );
        let config = Config::parse(Path::new("bench.toml"), &config).expect("config");
        let proxy = Proxy::bind(config).await.expect("bind");
        let addr = proxy.listener_addrs()[0].1;
        tokio::spawn(proxy.run(std::future::pending()));
        let capacity = (CAPACITY as f64 / SERVICE.as_secs_f64()) as u64;
        println!(
            "backend: {CAPACITY} at once, {SERVICE:?} each = {capacity} requests/s; client timeout {CLIENT_TIMEOUT:?}; {seconds}s per cell\n"
        );
        println!("| offered | admission | goodput (req/s) | p99 of successes | shed | failed or late |");
        println!("|---|---|---|---|---|---|");
        for multiple in [1, 2, 4] {
            for (label, host) in [("off", "plain"), ("on", "admitted")] {
                let mut t = offer(addr, host, capacity * multiple, Duration::from_secs(seconds)).await;
                t.latencies_us.sort_unstable();
                let p99 = t
                    .latencies_us
                    .get(((t.latencies_us.len() as f64 - 1.0) * 0.99) as usize)
                    .copied()
                    .unwrap_or(0);
                println!(
                    "| {multiple}× ({} req/s) | {label} | {:.0} | {:.1} ms | {} | {} |",
                    capacity * multiple,
                    t.ok as f64 / seconds as f64,
                    p99 as f64 / 1000.0,
                    t.shed,
                    t.failed
                );
                // Let the backend drain before the next cell.
                tokio::time::sleep(Duration::from_millis(1500)).await;
            }
        }
    });
}
