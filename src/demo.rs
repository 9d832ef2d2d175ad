//! `writegate demo`: three in-memory key-value writers behind the proxy, and a printed tour.
//!
//! The writers share one store, like stateless application servers in front of one database, so a
//! value written through one of them can be read back through any other; each answer names the writer
//! that served it in `x-served-by`, which shows the balancing at work. The writers are also used by
//! the benchmarks as a realistic, fast backend.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::config::Config;
use crate::server::Proxy;

type Store = Arc<Mutex<HashMap<String, (Bytes, Option<HeaderValue>)>>>;

/// Starts one key-value writer on `127.0.0.1:0`, sharing `store`; returns its address.
pub async fn spawn_kv_backend(name: &'static str, store: Store) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                let service = service_fn(move |req| kv_handle(name, Arc::clone(&store), req));
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
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let Some(key) = request
        .uri()
        .path()
        .strip_prefix("/kv/")
        .filter(|k| !k.is_empty())
    else {
        return Ok(reply(name, StatusCode::NOT_FOUND, "use /kv/{key}\n"));
    };
    let key = key.to_string();
    let method = request.method().clone();
    let content_type = request.headers().get(CONTENT_TYPE).cloned();
    let response = match method {
        Method::PUT | Method::POST => match request.into_body().collect().await {
            Ok(body) => {
                let body = body.to_bytes();
                let len = body.len();
                lock(&store).insert(key.clone(), (body, content_type));
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

/// Runs the demo until `shutdown` completes.
pub async fn run(
    options: DemoOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), Box<dyn std::error::Error>> {
    let store = Store::default();
    let mut backends = Vec::new();
    for name in ["writer-1", "writer-2", "writer-3"] {
        backends.push(spawn_kv_backend(name, Arc::clone(&store)).await?);
    }
    let text = demo_config(&options, &backends);
    let path = std::env::temp_dir().join(format!("writegate-demo-{}.toml", std::process::id()));
    std::fs::write(&path, &text)?;
    let config = Config::parse(&path, &text)?;
    let proxy = Proxy::bind(config).await.map_err(|e| {
        format!("{e}\n(choose other ports with: writegate demo --listen 127.0.0.1:PORT --admin 127.0.0.1:PORT)")
    })?;
    print_tour(&options, &backends, &path);
    proxy.run(shutdown).await;
    let _ = std::fs::remove_file(path);
    Ok(())
}

fn demo_config(options: &DemoOptions, backends: &[SocketAddr]) -> String {
    let backend_lines: String = backends
        .iter()
        .enumerate()
        .map(|(i, b)| {
            // The first writer gets weight 2 to show weights at work.
            let weight = if i == 0 { 2 } else { 1 };
            format!("  {{ address = \"{b}\", weight = {weight} }},\n")
        })
        .collect();
    format!(
        r#"# writegate demo config (generated)
[admin]
listen = "{admin}"

[[listeners]]
name = "http"
listen = "{listen}"

[[upstreams]]
name = "writers"
balance = "least_conn"
backends = [
{backend_lines}]

[[routes]]
name = "kv"
path_prefix = "/kv/"
upstream = "writers"
timeouts = {{ connect = "1s", response = "10s" }}
max_body = "1MiB"
"#,
        admin = options.admin,
        listen = options.listen,
    )
}

fn print_tour(options: &DemoOptions, backends: &[SocketAddr], config: &Path) {
    let proxy = format!("http://{}", options.listen);
    let admin = format!("http://{}", options.admin);
    let writers: Vec<String> = backends.iter().map(ToString::to_string).collect();
    println!(
        r#"
writegate demo is running.

  proxy        {proxy}   (route "kv": /kv/{{key}} → upstream "writers", least_conn)
  admin        {admin}   (/healthz, /readyz, /status, /metrics)
  writers      {writers}   (in-memory key-value store, weights 2, 1, 1)
  config       {config}

Try, in another terminal:

  curl -i -X PUT --data 'hello' {proxy}/kv/greeting
  curl -i {proxy}/kv/greeting
  curl -i -X DELETE {proxy}/kv/greeting
  curl -i {proxy}/kv/greeting                 # 404 from the writer: the value is gone
  curl -i {proxy}/elsewhere                   # 404 from writegate: no route
  curl -i {admin}/readyz

The x-served-by header names the writer that answered. Press Ctrl-C to stop.
"#,
        writers = writers.join(", "),
        config = config.display(),
    );
}
