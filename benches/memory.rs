//! Memory per client connection: writegate against nginx and HAProxy (when installed).
//!
//! For each proxy (one worker each): RSS of its processes before, then with 9,000 idle
//! keep-alive connections open (each has served one request, as real keep-alive clients have;
//! they arrive with at most 256 in their first request at once),
//! then with 4,000 connections each holding a request in flight at a slow backend. Every request
//! is a small POST (128-byte body): a write proxy's clients send writes, and a request whose body
//! is still in the client connection's buffer is what a proxy must hold while the backend works.
//! Prints the RSS growth per connection. RSS is read from /proc (VmRSS of the process and its
//! children); 4,000 in flight resolve the allocators' 2 MiB steps to 0.5 KiB.
//!
//! Rounds run on fresh processes and the end prints the medians: the figures move from run to run
//! with what the allocators keep after the burst of connections.
//!
//! (9,000 rather than 10,000: HAProxy sizes its file descriptors from maxconn, and this machine
//! allows 20,000 per process.) Run: `cargo bench --bench memory` (env: WG_BENCH_IDLE=9000,
//! WG_BENCH_ACTIVE=4000, WG_BENCH_ROUNDS=3, WG_BENCH_ARRIVING=256 idle connections at most in
//! their first request at once, WG_BENCH_BINARY=path to another writegate build).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A backend that answers `/slow` after 3 s and anything else at once.
async fn spawn_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let service = service_fn(|req: Request<hyper::body::Incoming>| async move {
                    if req.uri().path() == "/slow" {
                        tokio::time::sleep(Duration::from_secs(3)).await;
                    }
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
}

fn wait_listening(addr: SocketAddr) {
    for _ in 0..500 {
        if std::net::TcpStream::connect(addr).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("nothing listens on {addr}");
}

/// VmRSS in KiB of `pid` and its direct children.
fn rss_kib(pid: u32) -> u64 {
    let rss = |p: u32| -> u64 {
        std::fs::read_to_string(format!("/proc/{p}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS:"))?
                    .split_whitespace()
                    .nth(1)?
                    .parse()
                    .ok()
            })
            .unwrap_or(0)
    };
    let mut total = rss(pid);
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.flatten() {
            let Some(child) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            let parent = std::fs::read_to_string(format!("/proc/{child}/stat"))
                .ok()
                .and_then(|s| {
                    s.rsplit_once(')')?
                        .1
                        .split_whitespace()
                        .nth(1)?
                        .parse::<u32>()
                        .ok()
                });
            if parent == Some(pid) {
                total += rss(child);
            }
        }
    }
    total
}

struct Running {
    name: &'static str,
    child: Child,
    addr: SocketAddr,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

fn start(name: &'static str, program: &str, args: &[&str], addr: SocketAddr) -> Running {
    let child = Command::new(program)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start proxy");
    wait_listening(addr);
    Running { name, child, addr }
}

fn proxies(dir: &Path, backend: SocketAddr) -> Vec<Running> {
    let mut out = Vec::new();
    let wg = free_port();
    let config = dir.join("writegate.toml");
    std::fs::write(
        &config,
        format!(
            "[runtime]\nworkers = 1\n\n[log]\naccess_log = false\n\n[[listeners]]\nname = \"l\"\nlisten = \"{wg}\"\nidle_timeout = \"10m\"\nheader_read_timeout = \"10m\"\n\n\
             [[upstreams]]\nname = \"b\"\nbackends = [{{ address = \"{backend}\" }}]\n\n[[routes]]\nname = \"r\"\nupstream = \"b\"\n"
        ),
    )
    .expect("config");
    // WG_BENCH_BINARY measures another build (an A/B of two commits).
    let binary =
        std::env::var("WG_BENCH_BINARY").unwrap_or_else(|_| env!("CARGO_BIN_EXE_writegate").into());
    out.push(start(
        "writegate",
        &binary,
        &["run", "--config", config.to_str().expect("path")],
        wg,
    ));
    if Path::new("/usr/sbin/nginx").exists() {
        let port = free_port();
        let d = dir.display();
        let conf = dir.join("nginx.conf");
        std::fs::write(
            &conf,
            format!(
                "worker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/nginx.err;\nworker_rlimit_nofile 20000;\n\
                 events {{ worker_connections 19000; }}\nhttp {{ access_log off; keepalive_timeout 10m; keepalive_requests 1000000;\n\
                 client_body_temp_path {d}/b; proxy_temp_path {d}/p; fastcgi_temp_path {d}/f; uwsgi_temp_path {d}/u; scgi_temp_path {d}/s;\n\
                 upstream b {{ server {backend}; keepalive 256; }}\n\
                 server {{ listen {port}; location / {{ proxy_pass http://b; proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_read_timeout 60s; }} }} }}\n"
            ),
        )
        .expect("nginx conf");
        out.push(start(
            "nginx",
            "/usr/sbin/nginx",
            &["-p", &d.to_string(), "-c", conf.to_str().expect("path")],
            port,
        ));
    }
    if Path::new("/usr/sbin/haproxy").exists() {
        let port = free_port();
        let conf = dir.join("haproxy.cfg");
        std::fs::write(
            &conf,
            format!(
                "global\n  maxconn 9900\n  nbthread 1\ndefaults\n  mode http\n  timeout connect 5s\n  timeout client 10m\n  timeout server 60s\n  timeout http-keep-alive 10m\n\
                 frontend f\n  bind {port}\n  default_backend b\nbackend b\n  http-reuse always\n  server s1 {backend}\n"
            ),
        )
        .expect("haproxy conf");
        out.push(start(
            "haproxy",
            "/usr/sbin/haproxy",
            &["-db", "-f", conf.to_str().expect("path")],
            port,
        ));
    }
    out
}

/// Opens `n` connections that each complete one GET of `path` (or only send it, when `wait` is
/// false) and stay open; returns them.
/// Each request is a small write, as the proxy's clients send.
const WRITE: &[u8] = &[b'w'; 128];

async fn open(
    addr: SocketAddr,
    n: usize,
    path: &'static str,
    wait: bool,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut held = Vec::with_capacity(n);
    let (tx, mut ready) = tokio::sync::mpsc::channel::<()>(n.max(1));
    // Idle connections arrive over time, as real keep-alive clients do: at most this many are in
    // their first request at once. (All at once would measure a burst of thousands of concurrent
    // requests, and what the allocator keeps after it, not idle connections.)
    let arriving = Arc::new(tokio::sync::Semaphore::new(if wait {
        env_or("WG_BENCH_ARRIVING", 256)
    } else {
        n.max(1)
    }));
    for _ in 0..n {
        let tx = tx.clone();
        let arriving = Arc::clone(&arriving);
        held.push(tokio::spawn(async move {
            let Ok(permit) = arriving.acquire_owned().await else {
                return;
            };
            let Ok(stream) = TcpStream::connect(addr).await else {
                return;
            };
            let Ok((mut sender, conn)) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
            else {
                return;
            };
            tokio::spawn(conn);
            let request = Request::post(path)
                .header("host", "bench")
                .body(Full::new(Bytes::from_static(WRITE)))
                .expect("request");
            let response = sender.send_request(request);
            if wait {
                if let Ok(r) = response.await {
                    let _ = r.into_body().collect().await;
                }
                drop(permit);
                let _ = tx.send(()).await;
                std::future::pending::<()>().await; // keep the connection idle and open
                drop(sender);
            } else {
                drop(permit);
                let _ = tx.send(()).await;
                let _ = response.await;
            }
        }));
    }
    for _ in 0..n {
        let _ = ready.recv().await;
    }
    held
}

fn main() {
    let idle = env_or("WG_BENCH_IDLE", 9_000);
    let active = env_or("WG_BENCH_ACTIVE", 4_000);
    let rounds = env_or("WG_BENCH_ROUNDS", 3).max(1);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let backend = spawn_backend().await;
        println!("RSS growth per client connection ({idle} idle keep-alive, {active} with a request in flight), {rounds} rounds\n");
        // Per proxy name: (idle KiB, active KiB) of each round.
        let mut results: Vec<(&'static str, Vec<f64>, Vec<f64>)> = Vec::new();
        for round in 1..=rounds {
            for (name, idle_kib, active_kib) in measure_round(backend, idle, active).await {
                println!("  round {round} {name:<10} idle {idle_kib:.2} KiB   active {active_kib:.2} KiB");
                match results.iter_mut().find(|(n, _, _)| *n == name) {
                    Some((_, idles, actives)) => {
                        idles.push(idle_kib);
                        actives.push(active_kib);
                    }
                    None => results.push((name, vec![idle_kib], vec![active_kib])),
                }
            }
        }
        println!("\nmedians over {rounds} rounds\n");
        println!("| proxy | idle: RSS growth per connection | active: RSS growth per connection |");
        println!("|---|---|---|");
        for (name, idles, actives) in &results {
            println!("| {name} | {:.2} KiB | {:.2} KiB |", median(idles), median(actives));
        }
    });
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// One round on fresh processes: each proxy's idle and active RSS growth per connection, in KiB.
async fn measure_round(
    backend: SocketAddr,
    idle: usize,
    active: usize,
) -> Vec<(&'static str, f64, f64)> {
    let dir = tempfile::tempdir().expect("dir");
    let mut idle_growth = Vec::new();
    for proxy in proxies(dir.path(), backend) {
        // Warm up: allocators and pools settle before the baseline.
        drop(open(proxy.addr, 100, "/", true).await);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = rss_kib(proxy.child.id());
        let conns = open(proxy.addr, idle, "/", true).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        idle_growth.push(rss_kib(proxy.child.id()).saturating_sub(before) as f64 / idle as f64);
        for c in &conns {
            c.abort();
        }
    }
    // Fresh processes for the active phase: memory kept from the idle phase would hide growth.
    let fresh = tempfile::tempdir().expect("dir");
    let second = proxies(fresh.path(), backend);
    let mut rows = Vec::new();
    for (proxy, idle_kib) in second.iter().zip(idle_growth) {
        drop(open(proxy.addr, 100, "/", true).await);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = rss_kib(proxy.child.id());
        let conns = open(proxy.addr, active, "/slow", false).await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let active_kib = rss_kib(proxy.child.id()).saturating_sub(before) as f64 / active as f64;
        rows.push((proxy.name, idle_kib, active_kib));
        for c in &conns {
            c.abort();
        }
    }
    rows
}
