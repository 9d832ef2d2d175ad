//! What the write-path benchmarks share: a writegate process started from a config text, a fast
//! backend, and closed loops of keep-alive connections that time each request.

#![allow(dead_code)]

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

pub fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("probe bind");
    listener.local_addr().expect("probe addr").port()
}

pub fn wait_listening(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{what} did not listen on port {port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A writegate process, killed when dropped.
pub struct Writegate {
    child: Child,
    pub addr: SocketAddr,
}

impl Writegate {
    /// Writes `config` (which must listen on `port`) to `dir` and starts writegate on it.
    pub fn start(dir: &Path, config: &str, port: u16) -> Writegate {
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

impl Writegate {
    /// [`Writegate::start`] with its log (the access log among it) written to `log`.
    pub fn start_logging(dir: &Path, config: &str, port: u16, log: &Path) -> Writegate {
        let path = dir.join("writegate.toml");
        std::fs::write(&path, config).expect("write config");
        let file = std::fs::File::create(log).expect("create the log file");
        let child = Command::new(env!("CARGO_BIN_EXE_writegate"))
            .args(["run", "--config", path.to_str().expect("utf-8 path")])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("start writegate");
        wait_listening(port, "writegate");
        Writegate {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Writegate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A backend that answers every request 201 with a small JSON body, after `delay` (none: at once).
pub async fn spawn_backend(delay: Duration) -> SocketAddr {
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
                    move |request: Request<hyper::body::Incoming>| async move {
                        let _ = request.into_body().collect().await;
                        if !delay.is_zero() {
                            tokio::time::sleep(delay).await;
                        }
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

/// What one closed-loop run measured.
pub struct Load {
    pub rate: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub errors: u64,
}

impl Load {
    pub fn describe(&self) -> String {
        format!(
            "{:>8.0} req/s  p50 {:.2} ms  p99 {:.2} ms  errors {}",
            self.rate, self.p50_ms, self.p99_ms, self.errors
        )
    }

    /// The median of each figure over `loads`.
    pub fn median(loads: &[Load]) -> Load {
        let median = |f: fn(&Load) -> f64| {
            let mut v: Vec<f64> = loads.iter().map(f).collect();
            v.sort_by(f64::total_cmp);
            v.get(v.len() / 2).copied().unwrap_or_default()
        };
        Load {
            rate: median(|l| l.rate),
            p50_ms: median(|l| l.p50_ms),
            p99_ms: median(|l| l.p99_ms),
            errors: median(|l| l.errors as f64) as u64,
        }
    }
}

/// Builds the `n`th request of connection `c`.
pub type MakeRequest = Arc<dyn Fn(usize, u64) -> Request<Full<Bytes>> + Send + Sync>;

/// Runs `connections` closed loops against `addr` for `duration`; a request counts when it is
/// answered `expect`, and a connection stops at its first error.
pub async fn closed_loop(
    addr: SocketAddr,
    connections: usize,
    duration: Duration,
    expect: StatusCode,
    make: MakeRequest,
) -> Load {
    let errors = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + duration;
    let tasks: Vec<_> = (0..connections)
        .map(|c| {
            let (errors, make) = (Arc::clone(&errors), Arc::clone(&make));
            tokio::spawn(
                async move { connection(addr, c, deadline, expect, &*make, &errors).await },
            )
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
    c: usize,
    deadline: Instant,
    expect: StatusCode,
    make: &(dyn Fn(usize, u64) -> Request<Full<Bytes>> + Send + Sync),
    errors: &AtomicU64,
) -> Vec<u64> {
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
        let request = make(c, n);
        n += 1;
        let sent = Instant::now();
        let answered = match sender.send_request(request).await {
            Ok(response) => {
                let ok = response.status() == expect;
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

/// nginx directives adding what writegate adds to every request and response by default (see
/// README, "What the backend sees"), so that each proxy sends the backend the same request and the client the
/// same response: X-Forwarded-For/-Proto/-Host, Via both ways, an X-Request-Id, the client's Host.
pub const NGINX_FORWARDING: &str = "      proxy_set_header Host $http_host;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto $scheme;
      proxy_set_header X-Forwarded-Host $host;
      proxy_set_header Via \"1.1 nginx\";
      proxy_set_header X-Request-Id $request_id;
      add_header Via \"1.1 nginx\";
";

/// The same forwarding headers for HAProxy's frontend (see [`NGINX_FORWARDING`]).
pub const HAPROXY_FORWARDING: &str = "  option forwardfor
  http-request set-header X-Forwarded-Proto http
  http-request set-header X-Forwarded-Host %[req.hdr(host)]
  http-request add-header Via \"1.1 haproxy\"
  unique-id-format %{+X}o\\ %ci:%cp_%fi:%fp_%Ts_%rt:%pid
  unique-id-header X-Request-Id
  http-response add-header Via \"1.1 haproxy\"
";

/// nginx or HAProxy running on a config of the benchmark's, stopped with SIGTERM when dropped
/// (nginx's master then stops its worker; a kill would orphan it).
pub struct Peer {
    child: Child,
    pub port: u16,
}

impl Peer {
    /// nginx (`worker_processes`, paths and `listen` are the config's) on `dir/nginx.conf`.
    pub fn nginx(dir: &Path, port: u16, config: &str) -> Option<Peer> {
        let binary = [
            "/usr/sbin/nginx",
            "/usr/local/sbin/nginx",
            "/usr/local/nginx/sbin/nginx",
        ]
        .into_iter()
        .find(|p| Path::new(p).exists())?;
        let path = dir.join("nginx.conf");
        std::fs::write(&path, config).ok()?;
        Peer::spawn(
            binary,
            &["-c", path.to_str()?, "-p", dir.to_str()?],
            port,
            "nginx",
        )
    }

    /// HAProxy in the foreground on `dir/haproxy.cfg`.
    pub fn haproxy(dir: &Path, port: u16, config: &str) -> Option<Peer> {
        let binary = ["/usr/sbin/haproxy", "/usr/local/sbin/haproxy"]
            .into_iter()
            .find(|p| Path::new(p).exists())?;
        let path = dir.join("haproxy.cfg");
        std::fs::write(&path, config).ok()?;
        Peer::spawn(binary, &["-db", "-f", path.to_str()?], port, "haproxy")
    }

    fn spawn(binary: &str, args: &[&str], port: u16, what: &str) -> Option<Peer> {
        let child = Command::new(binary)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        wait_listening(port, what);
        Some(Peer { child, port })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

/// nginx with one worker and its access log off, spreading over `backends` by least_conn with
/// 64 keep-alive connections, adding `headers` (directives such as [`NGINX_FORWARDING`]).
pub fn nginx_least_conn(dir: &Path, backends: &[SocketAddr], headers: &str) -> Option<Peer> {
    let port = free_port();
    let d = dir.display();
    let servers: String = backends.iter().map(|b| format!("server {b}; ")).collect();
    let config = format!(
        "worker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/nginx-error.log warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  keepalive_requests 1000000;\n  client_body_temp_path {d}/body;\n\
           proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
           upstream backend {{ least_conn; {servers}keepalive 64; }}\n\
           server {{\n    listen 127.0.0.1:{port};\n    location / {{\n      proxy_pass http://backend;\n\
                 proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n{headers}    }}\n  }}\n}}\n"
    );
    Peer::nginx(dir, port, &config)
}

/// A fast backend on a thread of its own: answers each request with `answer` once the request's
/// body has arrived (framed by Content-Length; a chunked or unparsable request closes the
/// connection, and the proxy reports it). A few lines over httparse: hyper's server costs about as
/// much CPU per request as the proxies under test.
pub fn spawn_fast_backend(answer: &'static [u8]) -> SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("backend runtime");
        runtime.block_on(async move {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            tx.send(listener.local_addr().expect("addr")).expect("send");
            while let Ok((stream, _)) = listener.accept().await {
                let _ = stream.set_nodelay(true);
                tokio::spawn(answer_each(stream, answer));
            }
        });
    });
    rx.recv().expect("backend address")
}

async fn answer_each(mut stream: TcpStream, answer: &'static [u8]) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = Vec::with_capacity(4096);
    loop {
        match request_length(&buf) {
            Err(()) => return,
            Ok(Some(used)) => {
                buf.drain(..used);
                if stream.write_all(answer).await.is_err() {
                    return;
                }
            }
            Ok(None) => match stream.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            },
        }
    }
}

/// The length of the whole request at the front of `buf`, `None` while part of it is missing.
fn request_length(buf: &[u8]) -> Result<Option<usize>, ()> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut request = httparse::Request::new(&mut headers);
    let httparse::Status::Complete(head) = request.parse(buf).map_err(drop)? else {
        return Ok(None);
    };
    let mut body = 0usize;
    for h in request.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            body = std::str::from_utf8(h.value)
                .map_err(drop)?
                .trim()
                .parse()
                .map_err(drop)?;
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(());
        }
    }
    let len = head.checked_add(body).ok_or(())?;
    Ok((buf.len() >= len).then_some(len))
}
