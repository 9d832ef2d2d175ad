//! `writegate demo`: in-memory key-value writers behind the proxy, and a tour that shows what
//! writegate is for: keyed routing, per-key coalescing of a hot key, shedding under a burst, a
//! live reload that adds a writer and a retried write answered from its idempotency record, then
//! prints commands to try and the status page's address.
//!
//! The writers share one store, like stateless application servers in front of one database, so a
//! value written through one of them can be read back through any other; each answer names the
//! writer that served it in `x-served-by`. Each write takes a few milliseconds, and the writers
//! count writes to one key that overlapped (what a database sees as lock contention or lost
//! updates): the tour compares them with and without per-key coalescing.

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::config::Config;
use crate::server::Proxy;

type Store = Arc<Mutex<HashMap<String, (Bytes, Option<HeaderValue>)>>>;

/// How long one demo write takes at a writer: long enough for writes to one key to overlap.
const WRITE_TIME: Duration = Duration::from_millis(5);

/// What the writers saw, per path (`/kv/hot`): writes applied, writes that began while another
/// write of the same path was in progress, and writes in progress now.
#[derive(Debug, Default)]
pub struct WriterStats {
    paths: Mutex<HashMap<String, PathStats>>,
}

#[derive(Debug, Default, Clone, Copy)]
struct PathStats {
    applied: u64,
    overlapped: u64,
    in_progress: u64,
}

impl WriterStats {
    fn begin(&self, path: &str) {
        let mut paths = self.paths.lock().unwrap_or_else(|e| e.into_inner());
        let entry = paths.entry(path.to_string()).or_default();
        if entry.in_progress > 0 {
            entry.overlapped += 1;
        }
        entry.in_progress += 1;
    }

    fn end(&self, path: &str) {
        let mut paths = self.paths.lock().unwrap_or_else(|e| e.into_inner());
        let entry = paths.entry(path.to_string()).or_default();
        entry.in_progress = entry.in_progress.saturating_sub(1);
        entry.applied += 1;
    }

    /// Writes applied to `path`, and how many overlapped another.
    pub fn of(&self, path: &str) -> (u64, u64) {
        let paths = self.paths.lock().unwrap_or_else(|e| e.into_inner());
        paths
            .get(path)
            .map_or((0, 0), |p| (p.applied, p.overlapped))
    }
}

/// Starts one key-value writer on `127.0.0.1:0`, sharing `store`; returns its address.
pub async fn spawn_kv_backend(name: &'static str, store: Store) -> std::io::Result<SocketAddr> {
    spawn_writer(name, store, Arc::default(), Duration::ZERO).await
}

/// A writer that takes `write_time` per write and counts what it sees in `stats`.
async fn spawn_writer(
    name: &'static str,
    store: Store,
    stats: Arc<WriterStats>,
    write_time: Duration,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let (store, stats) = (Arc::clone(&store), Arc::clone(&stats));
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    kv_handle(
                        name,
                        Arc::clone(&store),
                        Arc::clone(&stats),
                        write_time,
                        req,
                    )
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(addr)
}

async fn kv_handle(
    name: &'static str,
    store: Store,
    stats: Arc<WriterStats>,
    write_time: Duration,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = request.uri().path().to_string();
    // `/kv/{key}`, `/orders/{key}`: one store, the first segment names the route.
    let Some(key) = path
        .strip_prefix('/')
        .and_then(|p| p.split_once('/'))
        .map(|(_, key)| key)
        .filter(|k| !k.is_empty())
    else {
        return Ok(reply(
            name,
            StatusCode::NOT_FOUND,
            "use /kv/{key} or /orders/{key}\n",
        ));
    };
    let key = key.to_string();
    let method = request.method().clone();
    let content_type = request.headers().get(CONTENT_TYPE).cloned();
    let response = match method {
        Method::PUT | Method::POST => match request.into_body().collect().await {
            Ok(body) => {
                let body = body.to_bytes();
                let len = body.len();
                stats.begin(&path);
                if !write_time.is_zero() {
                    tokio::time::sleep(write_time).await;
                }
                lock(&store).insert(key.clone(), (body, content_type));
                stats.end(&path);
                reply(
                    name,
                    StatusCode::OK,
                    format!("stored {key} ({len} bytes)\n"),
                )
            }
            Err(_) => reply(name, StatusCode::BAD_REQUEST, "body read failed\n"),
        },
        Method::GET | Method::HEAD => match lock(&store).get(&key).cloned() {
            Some((value, content_type)) => {
                let mut response = reply(name, StatusCode::OK, value);
                if let Some(ct) = content_type {
                    response.headers_mut().insert(CONTENT_TYPE, ct);
                }
                response
            }
            None => reply(name, StatusCode::NOT_FOUND, format!("no value for {key}\n")),
        },
        Method::DELETE => match lock(&store).remove(&key) {
            Some(_) => reply(name, StatusCode::OK, format!("deleted {key}\n")),
            None => reply(name, StatusCode::NOT_FOUND, format!("no value for {key}\n")),
        },
        _ => reply(
            name,
            StatusCode::METHOD_NOT_ALLOWED,
            "use PUT, POST, GET, HEAD or DELETE\n",
        ),
    };
    Ok(response)
}

fn lock(store: &Store) -> std::sync::MutexGuard<'_, HashMap<String, (Bytes, Option<HeaderValue>)>> {
    store.lock().unwrap_or_else(|e| e.into_inner())
}

fn reply(name: &'static str, status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert("x-served-by", HeaderValue::from_static(name));
    response
}

/// Where the demo listens.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub listen: SocketAddr,
    pub admin: SocketAddr,
}

const WRITERS: [&str; 4] = ["writer-1", "writer-2", "writer-3", "writer-4"];

/// Runs the demo until `shutdown` completes: writers, the proxy, the tour.
pub async fn run(
    options: DemoOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), Box<dyn std::error::Error>> {
    let store = Store::default();
    let stats = Arc::new(WriterStats::default());
    let mut writers = Vec::new();
    for name in WRITERS {
        writers.push(spawn_writer(name, Arc::clone(&store), Arc::clone(&stats), WRITE_TIME).await?);
    }
    let path = std::env::temp_dir().join(format!("writegate-demo-{}.toml", std::process::id()));
    // The fourth writer joins during the tour, by a reload.
    let text = demo_config(&options, &writers[..3]);
    std::fs::write(&path, &text)?;
    let config = Config::parse(&path, &text)?;
    let mut proxy = Proxy::bind(config).await.map_err(|e| {
        format!("{e}\n(choose other ports with: writegate demo --listen 127.0.0.1:PORT --admin 127.0.0.1:PORT)")
    })?;
    proxy.enable_reload();
    let tour = Tour {
        options: options.clone(),
        writers,
        stats,
        path: path.clone(),
        reloads: proxy.reload_state(),
    };
    let running = tokio::spawn(async move {
        match tour.run().await {
            Ok(report) => println!("{report}"),
            Err(e) => println!("the demo's tour failed: {e} (the proxy keeps running)"),
        }
    });
    proxy.run(shutdown).await;
    running.abort();
    let _ = std::fs::remove_file(path);
    Ok(())
}

fn demo_config(options: &DemoOptions, writers: &[SocketAddr]) -> String {
    let list: String = writers
        .iter()
        .map(|w| format!("  {{ address = \"{w}\" }},\n"))
        .collect();
    format!(
        r#"# writegate demo config (generated)
[admin]
listen = "{admin}"

[log]
access_log = false

[[listeners]]
name = "http"
listen = "{listen}"

# Plain balancing: fewest requests in flight.
[[upstreams]]
name = "writers"
backends = [
{list}]

# The same writers, each key on its own writer.
[[upstreams]]
name = "keyed"
balance = "consistent_hash"
backends = [
{list}]

[[routes]]
name = "kv"
path_prefix = "/kv/"
upstream = "writers"

[[routes]]
name = "orders"
path_prefix = "/orders/"
upstream = "keyed"
key = "path"
coalesce = {{ mode = "latest" }}
admission = {{ max_inflight = 8, max_queue = 16, queue_timeout = "50ms" }}

# A retried POST with an Idempotency-Key gets the first answer; the writer applies it once.
[[routes]]
name = "payments"
path_prefix = "/payments/"
upstream = "writers"
idempotency = {{}}
"#,
        admin = options.admin,
        listen = options.listen,
    )
}

/// The tour: requests the demo sends itself, and what they show.
struct Tour {
    options: DemoOptions,
    writers: Vec<SocketAddr>,
    stats: Arc<WriterStats>,
    path: PathBuf,
    reloads: Arc<crate::reload::ReloadState>,
}

/// One response, as the tour needs it.
struct Answer {
    status: u16,
    served_by: Option<String>,
    retry_after: Option<String>,
    replayed: Option<String>,
}

impl Tour {
    async fn run(&self) -> Result<String, Box<dyn std::error::Error + Send + Sync>> {
        let mut out = String::new();
        let proxy = format!("http://{}", self.options.listen);
        let admin = format!("http://{}", self.options.admin);
        let _ = writeln!(
            out,
            "\nwritegate demo is running: proxy {proxy}, admin {admin}"
        );
        let _ = writeln!(
            out,
            "  config {}  (edit it: writegate applies it live)",
            self.path.display()
        );

        // 1. Keyed routing.
        let _ = writeln!(
            out,
            "\n1. Keyed routing: route \"orders\" sends each key to its own writer"
        );
        for key in ["order-1", "order-2", "order-3"] {
            let mut seen = Vec::new();
            for _ in 0..3 {
                let answer = self
                    .send(Method::PUT, &format!("/orders/{key}"), "v")
                    .await?;
                seen.push(answer.served_by.unwrap_or_default());
            }
            let _ = writeln!(out, "   /orders/{key}: {}", seen.join(", "));
        }

        // 2. A hot key, with and without coalescing.
        let _ = writeln!(
            out,
            "\n2. A hot key: 50 clients write one row at once ({} ms per write at the writer)",
            WRITE_TIME.as_millis()
        );
        for (route, path) in [
            ("kv (no coalescing)", "/kv/hot-row"),
            ("orders (latest)", "/orders/hot-row"),
        ] {
            let statuses = self.burst(50, |_| path.to_string()).await?;
            let ok = statuses.iter().filter(|s| **s == 200).count();
            let (applied, overlapped) = self.stats.of(path);
            let _ = writeln!(
                out,
                "   {route:<20} {ok} of 50 clients got 200; the writer applied {applied} writes, {overlapped} of them overlapping another on this row"
            );
        }

        // 3. Shedding.
        let _ = writeln!(
            out,
            "\n3. A burst of 200 writes to distinct keys on \"orders\" (8 in flight, 16 queued)"
        );
        let answers = self
            .burst_answers(200, |i| format!("/orders/burst-{i}"))
            .await?;
        let shed: Vec<&Answer> = answers.iter().filter(|a| a.status == 503).collect();
        let ok = answers.iter().filter(|a| a.status == 200).count();
        let retry = shed
            .first()
            .and_then(|a| a.retry_after.clone())
            .unwrap_or_else(|| "-".into());
        let _ = writeln!(
            out,
            "   {ok} answered 200, {} shed with 503 and Retry-After: {retry}",
            shed.len()
        );

        // 4. A live reload that adds a writer.
        let keys: Vec<String> = (0..20).map(|i| format!("/orders/customer-{i}")).collect();
        let before = self.placements(&keys).await?;
        let text = demo_config(&self.options, &self.writers);
        std::fs::write(&self.path, text)?;
        let waited = tokio::time::timeout(Duration::from_secs(10), async {
            while self.reloads.status().succeeded == 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        if waited.is_err() {
            return Err("the reload did not happen within 10 s".into());
        }
        let after = self.placements(&keys).await?;
        let moved: Vec<&String> = keys
            .iter()
            .filter(|k| before.get(*k) != after.get(*k))
            .collect();
        let to_new = moved
            .iter()
            .filter(|k| after.get(**k).map(String::as_str) == Some("writer-4"))
            .count();
        let _ = writeln!(
            out,
            "\n4. Live reload: writer-4 was added to the config file; {} of 20 keys moved, {to_new} of them to writer-4, the rest stayed",
            moved.len()
        );

        // 5. A client's retry with an idempotency key.
        let mut replayed = None;
        for _ in 0..2 {
            let answer = self
                .send_keyed(Method::POST, "/payments/pay-1", "amount=5", "pay-1")
                .await?;
            replayed = answer.replayed;
        }
        let (applied, _) = self.stats.of("/payments/pay-1");
        let _ = writeln!(
            out,
            "\n5. A retried payment: POST /payments/pay-1 twice with Idempotency-Key: pay-1; the writer applied {applied} write, the retry was answered from the record (Idempotent-Replayed: {})",
            replayed.as_deref().unwrap_or("-")
        );

        let _ = writeln!(out, "\nTry, in another terminal:\n");
        for command in commands(&self.options) {
            let _ = writeln!(out, "  {command}");
        }
        let _ = writeln!(
            out,
            "\nThe status page: {admin}/ (open it in a browser). Press Ctrl-C to stop."
        );
        Ok(out)
    }

    async fn placements(
        &self,
        keys: &[String],
    ) -> Result<HashMap<String, String>, Box<dyn std::error::Error + Send + Sync>> {
        let mut out = HashMap::new();
        for key in keys {
            let answer = self.send(Method::PUT, key, "v").await?;
            out.insert(key.clone(), answer.served_by.unwrap_or_default());
        }
        Ok(out)
    }

    async fn burst(
        &self,
        n: usize,
        path: impl Fn(usize) -> String,
    ) -> Result<Vec<u16>, Box<dyn std::error::Error + Send + Sync>> {
        Ok(self
            .burst_answers(n, path)
            .await?
            .iter()
            .map(|a| a.status)
            .collect())
    }

    async fn burst_answers(
        &self,
        n: usize,
        path: impl Fn(usize) -> String,
    ) -> Result<Vec<Answer>, Box<dyn std::error::Error + Send + Sync>> {
        let sends: Vec<_> = (0..n)
            .map(|i| {
                let (addr, path) = (self.options.listen, path(i));
                tokio::spawn(async move { send(addr, Method::PUT, &path, "v", "").await })
            })
            .collect();
        let mut answers = Vec::with_capacity(n);
        for sent in sends {
            answers.push(sent.await.map_err(|e| e.to_string())??);
        }
        Ok(answers)
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: &str,
    ) -> Result<Answer, Box<dyn std::error::Error + Send + Sync>> {
        send(self.options.listen, method, path, body, "").await
    }

    async fn send_keyed(
        &self,
        method: Method,
        path: &str,
        body: &str,
        key: &str,
    ) -> Result<Answer, Box<dyn std::error::Error + Send + Sync>> {
        let header = format!("Idempotency-Key: {key}\r\n");
        send(self.options.listen, method, path, body, &header).await
    }
}

/// One request on a new connection, read to its end (the tour's own small client). `headers` are
/// extra header lines, each ending in CRLF.
async fn send(
    addr: SocketAddr,
    method: Method,
    path: &str,
    body: &str,
    headers: &str,
) -> Result<Answer, Box<dyn std::error::Error + Send + Sync>> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: demo\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await?;
        let mut reply = Vec::new();
        stream.read_to_end(&mut reply).await?;
        Ok::<_, std::io::Error>(reply)
    };
    let reply = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| "no answer within 10 s")??;
    let text = String::from_utf8_lossy(&reply);
    let head = text.split("\r\n\r\n").next().unwrap_or_default();
    let status = head
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .ok_or("a reply without a status")?;
    let header = |name: &str| {
        head.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    };
    Ok(Answer {
        status,
        served_by: header("x-served-by"),
        retry_after: header("retry-after"),
        replayed: header("idempotent-replayed"),
    })
}

/// Commands to paste, each of which works against the running demo (its test runs them all).
pub fn commands(options: &DemoOptions) -> Vec<String> {
    let proxy = format!("http://{}", options.listen);
    let admin = format!("http://{}", options.admin);
    vec![
        format!("curl -si -X PUT --data 'hello' {proxy}/kv/greeting"),
        format!("curl -si {proxy}/kv/greeting"),
        format!("curl -si -X PUT --data 'v2' {proxy}/orders/order-1    # x-served-by: always the same writer"),
        format!("curl -si {proxy}/orders/order-1"),
        format!("curl -si {proxy}/elsewhere                           # 404 from writegate: no route"),
        format!("curl -si -X POST -H 'Idempotency-Key: pay-2' --data 'amount=5' {proxy}/payments/pay-2    # twice: Idempotent-Replayed"),
        format!("curl -s {admin}/status"),
        format!("curl -s {admin}/metrics | grep writegate_coalesce_outcomes_total"),
    ]
}
