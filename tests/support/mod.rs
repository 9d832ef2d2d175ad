//! Real servers on 127.0.0.1:0 for the black-box tests: recording backends with chosen behaviour,
//! the proxy itself (in-process, with its own shutdown), and a small HTTP/1.1 client.
#![allow(dead_code)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use writegate::config::Config;
use writegate::server::Proxy;

pub mod ledger;
pub mod processes;
pub mod writes;

/// Longest any single step of a test may take before it fails with a message.
pub const STEP: Duration = Duration::from_secs(10);

/// Awaits `future`, failing the test with `what` if it takes longer than [`STEP`].
pub async fn bounded<T>(what: &str, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(STEP, future).await {
        Ok(value) => value,
        Err(_) => panic!("timed out after {STEP:?}: {what}"),
    }
}

/// A request as a backend received it.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: Method,
    pub uri: Uri,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// A running backend and what it has seen.
#[derive(Clone)]
pub struct TestBackend {
    pub addr: SocketAddr,
    pub received: Arc<Mutex<Vec<Received>>>,
    pub inflight: Arc<AtomicUsize>,
    pub max_inflight: Arc<AtomicUsize>,
    pub connections: Arc<AtomicUsize>,
    /// Requests whose body broke off before its end.
    pub incomplete: Arc<AtomicUsize>,
}

impl TestBackend {
    pub fn count(&self) -> usize {
        self.received.lock().unwrap().len()
    }

    /// The bodies received so far, in arrival order.
    pub fn bodies(&self) -> Vec<Vec<u8>> {
        let received = self.received.lock().unwrap();
        received.iter().map(|r| r.body.to_vec()).collect()
    }

    /// The request targets received so far, in arrival order.
    pub fn uris(&self) -> Vec<String> {
        let received = self.received.lock().unwrap();
        received.iter().map(|r| r.uri.to_string()).collect()
    }

    pub fn last(&self) -> Received {
        self.received
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("backend received no request")
    }
}

/// Starts a backend that records each request (body included) and answers with `handler`.
pub async fn backend<F, Fut>(handler: F) -> TestBackend
where
    F: Fn(Received) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    backend_at("127.0.0.1:0".parse().unwrap(), handler).await
}

/// [`backend`] on a chosen address.
pub async fn backend_at<F, Fut>(addr: SocketAddr, handler: F) -> TestBackend
where
    F: Fn(Received) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let listener = TcpListener::bind(addr)
        .await
        .unwrap_or_else(|e| panic!("test backend cannot bind {addr}: {e}"));
    serve(listener, handler)
}

/// A port held by a bound socket that does not listen yet: connecting to it is refused, and no
/// other socket can take it before [`backend_on`] serves on it.
pub struct ReservedPort {
    socket: tokio::net::TcpSocket,
    pub addr: SocketAddr,
}

pub fn reserve_port() -> ReservedPort {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = socket.local_addr().unwrap();
    ReservedPort { socket, addr }
}

/// [`backend`] on a reserved port.
pub fn backend_on<F, Fut>(port: ReservedPort, handler: F) -> TestBackend
where
    F: Fn(Received) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let listener = port
        .socket
        .listen(1024)
        .unwrap_or_else(|e| panic!("test backend cannot listen on {}: {e}", port.addr));
    serve(listener, handler)
}

fn serve<F, Fut>(listener: TcpListener, handler: F) -> TestBackend
where
    F: Fn(Received) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let backend = TestBackend {
        addr: listener.local_addr().unwrap(),
        received: Arc::default(),
        inflight: Arc::default(),
        max_inflight: Arc::default(),
        connections: Arc::default(),
        incomplete: Arc::default(),
    };
    let handler = Arc::new(handler);
    let state = backend.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            state.connections.fetch_add(1, Ordering::SeqCst);
            let handler = Arc::clone(&handler);
            let state = state.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    let handler = Arc::clone(&handler);
                    let state = state.clone();
                    async move {
                        let now = state.inflight.fetch_add(1, Ordering::SeqCst) + 1;
                        state.max_inflight.fetch_max(now, Ordering::SeqCst);
                        let (parts, body) = req.into_parts();
                        let Ok(body) = body.collect().await.map(|b| b.to_bytes()) else {
                            // A truncated body is not a request a real backend would act on.
                            state.incomplete.fetch_add(1, Ordering::SeqCst);
                            state.inflight.fetch_sub(1, Ordering::SeqCst);
                            let mut r =
                                Response::new(Full::new(Bytes::from_static(b"incomplete body")));
                            *r.status_mut() = StatusCode::BAD_REQUEST;
                            return Ok(r);
                        };
                        let received = Received {
                            method: parts.method,
                            uri: parts.uri,
                            headers: parts.headers,
                            body,
                        };
                        state.received.lock().unwrap().push(received.clone());
                        let response = handler(received).await;
                        state.inflight.fetch_sub(1, Ordering::SeqCst);
                        Ok::<_, Infallible>(response)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    backend
}

/// A backend that answers 200 with `name` in the body and `x-backend`, after `delay`.
pub async fn named_backend(name: &'static str, delay: Duration) -> TestBackend {
    backend(move |_| async move {
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let mut response = Response::new(Full::new(Bytes::from(name)));
        response
            .headers_mut()
            .insert("x-backend", name.parse().unwrap());
        response
    })
    .await
}

/// Counts requests into gated backends and lets them go, one permit per request. Semaphores, not
/// `Notify`: permits add up, so no arrival or release is ever coalesced with another.
#[derive(Clone)]
pub struct Gate {
    entered: Arc<tokio::sync::Semaphore>,
    release: Arc<tokio::sync::Semaphore>,
}

impl Default for Gate {
    fn default() -> Gate {
        Gate {
            entered: Arc::new(tokio::sync::Semaphore::new(0)),
            release: Arc::new(tokio::sync::Semaphore::new(0)),
        }
    }
}

impl Gate {
    /// Waits until one more request has reached a gated backend.
    pub async fn entered(&self) {
        bounded("a request to reach a gated backend", self.entered.acquire())
            .await
            .expect("gate open")
            .forget();
    }

    /// Lets `n` held (or future) requests answer.
    pub fn release(&self, n: usize) {
        self.release.add_permits(n);
    }

    /// The backend side: announce arrival, then wait to be released.
    pub async fn hold(&self) {
        self.entered.add_permits(1);
        if let Ok(permit) = self.release.acquire().await {
            permit.forget();
        }
    }
}

/// A backend that holds every request until `gate` releases it, then answers 200 "released".
pub async fn gated_backend(gate: &Gate) -> TestBackend {
    let gate = gate.clone();
    backend(move |_| {
        let gate = gate.clone();
        async move {
            gate.hold().await;
            Response::new(Full::new(Bytes::from_static(b"released")))
        }
    })
    .await
}

/// Polls `condition` every 10 ms until it holds, failing with `what` after [`STEP`]. For state
/// that has no event to await (counters inside the proxy).
pub async fn eventually(what: &str, condition: impl FnMut() -> bool) {
    eventually_within(STEP, what, condition).await;
}

/// [`eventually`] with a bound of its own, for steps that wait on a server's restart.
pub async fn eventually_within(limit: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let waited = tokio::time::timeout(limit, async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "timed out after {limit:?}: {what}");
}

/// A backend on `addr` that answers 200 with `name` as the body.
pub async fn named_backend_at(addr: SocketAddr, name: &'static str) -> TestBackend {
    backend_at(addr, move |_| async move {
        Response::new(Full::new(Bytes::from(name)))
    })
    .await
}

/// nginx running in the foreground with a config of ours; stopped on drop.
pub struct Nginx {
    child: std::process::Child,
    pub addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

/// Where nginx is installed, if it is.
pub fn nginx_binary() -> Option<&'static str> {
    [
        "/usr/sbin/nginx",
        "/usr/local/sbin/nginx",
        "/usr/local/nginx/sbin/nginx",
    ]
    .into_iter()
    .find(|p| Path::new(p).exists())
}

/// Starts nginx with one worker and `http_body` inside its `http {}` block; `{listen}` in the body is
/// replaced by a free loopback address. `None` (with a printed reason) when nginx is not installed.
pub async fn start_nginx(http_body: &str) -> Option<Nginx> {
    let Some(binary) = nginx_binary() else {
        println!("skipped: nginx is not installed (apt-get install nginx-light)");
        return None;
    };
    let dir = tempfile::tempdir().unwrap();
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let d = dir.path().display();
    let config = format!(
        "worker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
         events {{ worker_connections 1024; }}\n\
         http {{\n access_log off;\n client_body_temp_path {d}/body;\n proxy_temp_path {d}/proxy;\n\
         fastcgi_temp_path {d}/fcgi;\n uwsgi_temp_path {d}/uwsgi;\n scgi_temp_path {d}/scgi;\n{}\n}}\n",
        http_body.replace("{listen}", &addr.to_string())
    );
    let path = dir.path().join("nginx.conf");
    std::fs::write(&path, config).unwrap();
    let child = std::process::Command::new(binary)
        .args(["-p", &d.to_string(), "-c", path.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("start nginx");
    let nginx = Nginx {
        child,
        addr,
        _dir: dir,
    };
    eventually("nginx to listen", || {
        std::net::TcpStream::connect(addr).is_ok()
    })
    .await;
    Some(nginx)
}

/// A backend that answers every request with `status`.
pub async fn status_backend(status: StatusCode) -> TestBackend {
    backend(move |_| async move {
        let mut response = Response::new(Full::new(Bytes::from_static(b"backend says no")));
        *response.status_mut() = status;
        response
    })
    .await
}

/// An address on which nothing listens: connecting is refused.
pub async fn refused_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

/// A backend that reads a request head and then resets the connection without answering.
pub async fn resetting_backend() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&hits);
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            let counter = Arc::clone(&counter);
            tokio::spawn(async move {
                use tokio::io::AsyncReadExt;
                let mut buf = [0u8; 4096];
                if let Ok(n) = stream.read(&mut buf).await {
                    if n > 0 {
                        counter.fetch_add(1, Ordering::SeqCst);
                    }
                }
                // Linger 0 makes close send RST instead of FIN.
                let _ = stream.set_zero_linger();
                drop(stream);
            });
        }
    });
    (addr, hits)
}

/// A proxy running in this process.
pub struct TestProxy {
    pub addr: SocketAddr,
    pub admin: Option<SocketAddr>,
    pub snapshots: Arc<arc_swap::ArcSwap<writegate::snapshot::Snapshot>>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl TestProxy {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Starts graceful shutdown and returns the task that completes when it is done.
    pub fn begin_shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    pub async fn shutdown(mut self) {
        self.begin_shutdown();
        bounded("proxy shutdown", &mut self.task).await.unwrap();
    }

    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    pub async fn wait_finished(self) {
        bounded("proxy to finish", self.task).await.unwrap();
    }
}

/// Starts a proxy from the config file at `path`, reloading it on change and on SIGHUP.
pub async fn start_reloading_proxy(
    path: &Path,
) -> (TestProxy, Arc<writegate::reload::ReloadState>) {
    let config = Config::load(path).unwrap_or_else(|e| panic!("test config is invalid:\n{e}"));
    let mut proxy = Proxy::bind(config).await.expect("proxy binds");
    proxy.enable_reload();
    let state = proxy.reload_state();
    (launch(proxy), state)
}

/// Validates `toml` (failing the test on any error) and starts a proxy with it.
pub async fn start_proxy(toml: &str) -> TestProxy {
    let config = match Config::parse(Path::new("test.toml"), toml) {
        Ok(config) => config,
        Err(errors) => panic!("test config is invalid:\n{errors}\n---\n{toml}"),
    };
    launch(Proxy::bind(config).await.expect("proxy binds"))
}

fn launch(proxy: Proxy) -> TestProxy {
    let addr = proxy.listener_addrs()[0].1;
    let admin = proxy.admin_addr();
    let snapshots = proxy.snapshots();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(proxy.run(async {
        let _ = stopped.await;
    }));
    TestProxy {
        addr,
        admin,
        snapshots,
        stop: Some(stop),
        task,
    }
}

/// A config with one listener on port 0, one upstream `up` over `backends` (address, weight) and
/// one route `r` on `/`, plus `extra_route` lines inside the route table.
pub fn simple_config(backends: &[(SocketAddr, u32)], extra_route: &str) -> String {
    let list: Vec<String> = backends
        .iter()
        .map(|(a, w)| format!("{{ address = \"{a}\", weight = {w} }}"))
        .collect();
    format!(
        r#"
[log]
access_log = false

[admin]
listen = "127.0.0.1:0"

[[listeners]]
name = "main"
listen = "127.0.0.1:0"

[[upstreams]]
name = "up"
backends = [{}]

[[routes]]
name = "r"
upstream = "up"
{extra_route}
"#,
        list.join(", ")
    )
}

/// A response with its body read.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    /// Reads `response` whole.
    pub async fn read(response: Response<hyper::body::Incoming>) -> Reply {
        let (parts, body) = response.into_parts();
        let body = body.collect().await.expect("response body").to_bytes();
        Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A keep-alive HTTP/1.1 client connection.
pub struct Client {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    addr: SocketAddr,
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> Client {
        let stream = bounded("connect to proxy", TcpStream::connect(addr))
            .await
            .unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        Client { sender, addr }
    }

    /// Sends `request` (the Host header is filled in when missing).
    pub async fn send(&mut self, mut request: Request<Full<Bytes>>) -> Reply {
        if !request.headers().contains_key(http::header::HOST) {
            let host = self.addr.to_string().parse().unwrap();
            request.headers_mut().insert(http::header::HOST, host);
        }
        if self.sender.ready().await.is_err() {
            // The server closed the keep-alive connection after its last answer: reconnect.
            *self = Client::connect(self.addr).await;
        }
        bounded("request through the proxy", async {
            self.sender.ready().await.expect("connection ready");
            let response = self.sender.send_request(request).await.expect("response");
            Reply::read(response).await
        })
        .await
    }
}

/// One request on a fresh connection.
pub async fn send(addr: SocketAddr, request: Request<Full<Bytes>>) -> Reply {
    Client::connect(addr).await.send(request).await
}

/// One request over HTTP/2 (cleartext, prior knowledge) on a fresh connection. A relative URI
/// is made absolute with `addr`.
pub async fn send_h2(addr: SocketAddr, mut request: Request<Full<Bytes>>) -> Reply {
    if request.uri().authority().is_none() {
        *request.uri_mut() = format!("http://{addr}{}", request.uri()).parse().unwrap();
    }
    let stream = bounded("connect to proxy", TcpStream::connect(addr))
        .await
        .unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    bounded("HTTP/2 request through the proxy", async {
        let response = sender.send_request(request).await.expect("response");
        Reply::read(response).await
    })
    .await
}

pub fn req(method: Method, path: &str, body: &'static [u8]) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri(path)
        .body(Full::new(Bytes::from_static(body)))
        .unwrap()
}

pub async fn get(addr: SocketAddr, path: &str) -> Reply {
    send(addr, req(Method::GET, path, b"")).await
}

/// Writes `bytes` to the proxy on a new connection and reads until the proxy closes it: what came
/// back, and how the read ended (a reset after a rejection is an error, with the reply kept).
pub async fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> (String, std::io::Result<usize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let ended = bounded("proxy to answer and close", stream.read_to_end(&mut out)).await;
    (String::from_utf8_lossy(&out).into_owned(), ended)
}
