//! TLS over real sockets, with certificates made by rcgen for each test.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::client::TlsStream;

struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A leaf certificate with its key, as PEM and DER.
struct Leaf {
    cert_pem: String,
    key_pem: String,
    der: CertificateDer<'static>,
    key_der: Vec<u8>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        Ca {
            issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    fn leaf(&self, common_name: &str, names: &[&str]) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
            key_der: key.serialize_der(),
        }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    fn der(&self) -> CertificateDer<'static> {
        self.issuer.der().clone()
    }
}

/// Writes `leaf` (and optionally a client CA) into `dir`; returns the TOML `[listeners.tls]` table.
fn write_tls(dir: &Path, leaf: &Leaf, client_ca: Option<&Ca>) -> String {
    std::fs::write(dir.join("cert.pem"), &leaf.cert_pem).unwrap();
    std::fs::write(dir.join("key.pem"), &leaf.key_pem).unwrap();
    let mut table = format!(
        "[listeners.tls]\ncert = \"{}\"\nkey = \"{}\"\n",
        dir.join("cert.pem").display(),
        dir.join("key.pem").display()
    );
    if let Some(ca) = client_ca {
        std::fs::write(dir.join("client-ca.pem"), ca.pem()).unwrap();
        table.push_str(&format!(
            "client_ca = \"{}\"\n",
            dir.join("client-ca.pem").display()
        ));
    }
    table
}

fn tls_proxy_config(backend: SocketAddr, tls_table: &str, listener_extra: &str) -> String {
    format!(
        "[log]\naccess_log = false\n\n[[listeners]]\nname = \"tls\"\nlisten = \"127.0.0.1:0\"\n{listener_extra}\n{tls_table}\n\
         [[upstreams]]\nname = \"up\"\nbackends = [{{ address = \"{backend}\" }}]\n\n[[routes]]\nname = \"r\"\nupstream = \"up\"\n"
    )
}

/// A TLS client trusting `ca`, offering `alpn`, with an optional client certificate.
async fn connect(
    addr: SocketAddr,
    ca: &Ca,
    alpn: &[&[u8]],
    client: Option<&Leaf>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der()).unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let mut config = match client {
        None => builder.with_no_client_auth(),
        Some(leaf) => builder
            .with_client_auth_cert(
                vec![leaf.der.clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf.key_der.clone())),
            )
            .unwrap(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = TcpStream::connect(addr).await?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

/// One GET over an established TLS stream, in HTTP/1.1 or h2 as negotiated.
async fn get_over(stream: TlsStream<TcpStream>) -> Result<(u16, String), hyper::Error> {
    let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2".as_slice());
    let io = TokioIo::new(stream);
    let request = Request::get("https://localhost/tls")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = if h2 {
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
        tokio::spawn(conn);
        sender.send_request(request).await?
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(conn);
        let mut request = request;
        request
            .headers_mut()
            .insert("host", "localhost".parse().unwrap());
        sender.send_request(request).await?
    };
    let status = response.status().as_u16();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

#[tokio::test]
async fn http1_and_h2_are_chosen_by_alpn() {
    let ca = Ca::new("test ca");
    let dir = tempfile::tempdir().unwrap();
    let b = named_backend("b", Duration::ZERO).await;
    let tls = write_tls(dir.path(), &ca.leaf("writegate", &["localhost"]), None);
    let proxy = start_proxy(&tls_proxy_config(b.addr, &tls, "")).await;
    for (alpn, expected) in [
        (b"h2".as_slice(), "h2"),
        (b"http/1.1".as_slice(), "http/1.1"),
    ] {
        let stream = connect(proxy.addr, &ca, &[alpn], None).await.unwrap();
        assert_eq!(
            stream.get_ref().1.alpn_protocol(),
            Some(expected.as_bytes())
        );
        assert_eq!(get_over(stream).await.unwrap(), (200, "b".to_string()));
        assert_eq!(b.last().headers["x-forwarded-proto"], "https");
    }
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_certificate_is_served_to_new_connections() {
    let ca = Ca::new("test ca");
    let dir = tempfile::tempdir().unwrap();
    let b = named_backend("b", Duration::ZERO).await;
    let first = ca.leaf("first", &["localhost"]);
    let tls = write_tls(dir.path(), &first, None);
    let path = dir.path().join("writegate.toml");
    std::fs::write(&path, tls_proxy_config(b.addr, &tls, "")).unwrap();
    let (proxy, state) = start_reloading_proxy(&path).await;
    let served = |s: &TlsStream<TcpStream>| s.get_ref().1.peer_certificates().unwrap()[0].clone();
    let open = connect(proxy.addr, &ca, &[b"http/1.1"], None)
        .await
        .unwrap();
    assert_eq!(served(&open), first.der);
    // Renew the certificate on disk, as certbot would: new files renamed over the old ones.
    let second = ca.leaf("second", &["localhost"]);
    for (name, text) in [("key.pem", &second.key_pem), ("cert.pem", &second.cert_pem)] {
        std::fs::write(dir.path().join("next"), text).unwrap();
        std::fs::rename(dir.path().join("next"), dir.path().join(name)).unwrap();
    }
    let deadline = Instant::now() + STEP;
    loop {
        let fresh = connect(proxy.addr, &ca, &[b"http/1.1"], None)
            .await
            .unwrap();
        if served(&fresh) == second.der {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the renewed certificate was not served: {:?}",
            state.status()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        get_over(open).await.unwrap().0,
        200,
        "an open connection keeps working"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn tls_1_1_garbage_and_stalled_handshakes_cost_only_their_connection() {
    let ca = Ca::new("test ca");
    let dir = tempfile::tempdir().unwrap();
    let b = named_backend("b", Duration::ZERO).await;
    let tls = write_tls(dir.path(), &ca.leaf("writegate", &["localhost"]), None);
    let proxy = start_proxy(&tls_proxy_config(
        b.addr,
        &tls,
        "header_read_timeout = \"300ms\"",
    ))
    .await;
    // A TLS 1.1 ClientHello (legacy version 3.2, no supported_versions extension).
    let mut body = vec![0x03, 0x02];
    body.extend([7u8; 32]);
    body.extend([0x00, 0x00, 0x02, 0x00, 0x2f, 0x01, 0x00]);
    let mut hello = vec![0x01, 0x00, 0x00, body.len() as u8];
    hello.extend(body);
    let mut record = vec![0x16, 0x03, 0x01, 0x00, hello.len() as u8];
    record.extend(hello);
    let mut old = TcpStream::connect(proxy.addr).await.unwrap();
    old.write_all(&record).await.unwrap();
    let mut answer = Vec::new();
    bounded("the TLS 1.1 answer", old.read_to_end(&mut answer))
        .await
        .ok();
    assert!(
        answer.is_empty() || answer[0] == 0x15,
        "an alert or a close, got {answer:?}"
    );
    // Garbage, then silence: each is dropped, the first at once, the second at the timeout.
    let mut garbage = TcpStream::connect(proxy.addr).await.unwrap();
    garbage
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut sink = Vec::new();
    bounded("garbage to be dropped", garbage.read_to_end(&mut sink))
        .await
        .ok();
    let started = Instant::now();
    let mut silent = TcpStream::connect(proxy.addr).await.unwrap();
    bounded(
        "a stalled handshake to be dropped",
        silent.read_to_end(&mut sink),
    )
    .await
    .ok();
    assert!(started.elapsed() >= Duration::from_millis(250));
    // The listener still serves.
    let stream = connect(proxy.addr, &ca, &[b"http/1.1"], None)
        .await
        .unwrap();
    assert_eq!(get_over(stream).await.unwrap().0, 200);
    proxy.shutdown().await;
}

#[tokio::test]
async fn mutual_tls_accepts_a_good_client_and_refuses_others() {
    let ca = Ca::new("server ca");
    let clients = Ca::new("client ca");
    let strangers = Ca::new("another ca");
    let dir = tempfile::tempdir().unwrap();
    let b = named_backend("b", Duration::ZERO).await;
    let tls = write_tls(
        dir.path(),
        &ca.leaf("writegate", &["localhost"]),
        Some(&clients),
    );
    let proxy = start_proxy(&tls_proxy_config(b.addr, &tls, "")).await;
    let good = clients.leaf("client-1", &["client-1"]);
    let stream = connect(proxy.addr, &ca, &[b"http/1.1"], Some(&good))
        .await
        .unwrap();
    assert_eq!(get_over(stream).await.unwrap().0, 200);
    for client in [None, Some(strangers.leaf("intruder", &["intruder"]))] {
        let refused = match connect(proxy.addr, &ca, &[b"http/1.1"], client.as_ref()).await {
            Err(_) => true,
            // With TLS 1.3 the server's verdict arrives after the client's handshake ends.
            Ok(stream) => get_over(stream).await.is_err(),
        };
        assert!(
            refused,
            "a client without a trusted certificate must be refused"
        );
    }
    assert_eq!(b.count(), 1);
    proxy.shutdown().await;
}

/// A backend speaking TLS with `leaf`; records the SNI name each connection asked for.
async fn tls_backend(addr: SocketAddr, leaf: &Leaf) -> Arc<Mutex<Vec<Option<String>>>> {
    let certs = vec![leaf.der.clone()];
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf.key_der.clone()));
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind(addr).await.unwrap();
    let names = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&names);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let (acceptor, seen) = (acceptor.clone(), Arc::clone(&seen));
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(tcp).await else {
                    return;
                };
                seen.lock()
                    .unwrap()
                    .push(stream.get_ref().1.server_name().map(str::to_string));
                let service = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from_static(
                        b"over tls",
                    ))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    names
}

#[tokio::test]
async fn an_https_backend_is_reached_with_sni_and_verified() {
    let ca = Ca::new("backend ca");
    let dir = tempfile::tempdir().unwrap();
    // Bind where "localhost" resolves first, as the proxy will connect there.
    let local: SocketAddr = std::net::ToSocketAddrs::to_socket_addrs("localhost:0")
        .unwrap()
        .next()
        .unwrap();
    let port = std::net::TcpListener::bind(local)
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let names = tls_backend(
        SocketAddr::new(local.ip(), port),
        &ca.leaf("backend", &["localhost"]),
    )
    .await;
    let ca_path: PathBuf = dir.path().join("backend-ca.pem");
    std::fs::write(&ca_path, ca.pem()).unwrap();
    let config = format!(
        "[log]\naccess_log = false\n\n[[listeners]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\n\n\
         [[upstreams]]\nname = \"secure\"\ntls_ca = \"{}\"\nbackends = [{{ address = \"https://localhost:{port}\" }}]\n\n\
         [[routes]]\nname = \"r\"\nupstream = \"secure\"\n",
        ca_path.display()
    );
    let proxy = start_proxy(&config).await;
    let reply = get(proxy.addr, "/").await;
    assert_eq!(
        (reply.status.as_u16(), reply.text()),
        (200, "over tls".to_string())
    );
    assert_eq!(
        names.lock().unwrap().first().cloned().flatten().as_deref(),
        Some("localhost")
    );
    proxy.shutdown().await;
    // A backend whose certificate the configured CA did not sign is refused: 502, not served.
    let other = Ca::new("someone else");
    let port2 = std::net::TcpListener::bind(local)
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    tls_backend(
        SocketAddr::new(local.ip(), port2),
        &other.leaf("backend", &["localhost"]),
    )
    .await;
    let proxy =
        start_proxy(&config.replace(&format!("localhost:{port}"), &format!("localhost:{port2}")))
            .await;
    assert_eq!(get(proxy.addr, "/").await.status, 502);
    proxy.shutdown().await;
}

/// Writes a peer's files: its listener certificate (for 127.0.0.1), the CA of the peers'
/// listeners, and, when given, its client certificate.
fn write_peer_files(dir: &Path, ca: &Ca, clients: &Ca, client: Option<&Leaf>) -> String {
    let tls = write_tls(dir, &ca.leaf("peer", &["127.0.0.1"]), Some(clients));
    std::fs::write(dir.join("peers-ca.pem"), ca.pem()).unwrap();
    let mut cluster = format!("tls_ca = \"{}\"\n", dir.join("peers-ca.pem").display());
    if let Some(client) = client {
        std::fs::write(dir.join("client.pem"), &client.cert_pem).unwrap();
        std::fs::write(dir.join("client.key"), &client.key_pem).unwrap();
        cluster.push_str(&format!(
            "tls_cert = \"{}\"\ntls_key = \"{}\"\n",
            dir.join("client.pem").display(),
            dir.join("client.key").display()
        ));
    }
    format!("{tls}\n__CLUSTER__{cluster}")
}

/// A replica with a plain listener for clients and a TLS one (client certificates required)
/// for its peers, which it reaches over mutual TLS.
fn peer_config(backend: SocketAddr, plain: u16, own: u16, peers: &[u16], files: &str) -> String {
    let (tls_table, cluster_tls) = files.split_once("__CLUSTER__").unwrap();
    let peers: Vec<String> = peers
        .iter()
        .map(|p| format!("\"https://127.0.0.1:{p}\""))
        .collect();
    format!(
        "[log]\naccess_log = false\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [[listeners]]\nname = \"clients\"\nlisten = \"127.0.0.1:{plain}\"\n\n\
         [[listeners]]\nname = \"peers\"\nlisten = \"127.0.0.1:{own}\"\n{tls_table}\n\
         [[upstreams]]\nname = \"up\"\nbackends = [{{ address = \"{backend}\" }}]\n\n\
         [[routes]]\nname = \"kv\"\nupstream = \"up\"\nkey = \"path_segment:2\"\n\n[routes.coalesce]\nmode = \"serialize\"\n\n\
         [cluster]\npeers = [{}]\nself = \"127.0.0.1:{own}\"\nsecret = \"0123456789abcdef0123456789abcdef\"\non_peer_down = \"reject\"\n{cluster_tls}",
        peers.join(", ")
    )
}

#[tokio::test]
async fn cluster_peers_forward_over_mutual_tls_and_need_a_client_certificate() {
    use support::processes::free_port;
    let (ca, clients) = (Ca::new("peers ca"), Ca::new("peer clients ca"));
    let b = named_backend("b", Duration::ZERO).await;
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a_plain, a_tls, b_plain, b_tls) = (free_port(), free_port(), free_port(), free_port());
    let peers = [a_tls, b_tls];
    let a_files = write_peer_files(
        dir_a.path(),
        &ca,
        &clients,
        Some(&clients.leaf("a", &["a"])),
    );
    let b_files = write_peer_files(
        dir_b.path(),
        &ca,
        &clients,
        Some(&clients.leaf("b", &["b"])),
    );
    let a = start_proxy(&peer_config(b.addr, a_plain, a_tls, &peers, &a_files)).await;
    let replica_b = start_proxy(&peer_config(b.addr, b_plain, b_tls, &peers, &b_files)).await;
    let put = |key: String| {
        Request::put(format!("/kv/{key}"))
            .header("host", "kv")
            .body(Full::new(Bytes::from_static(b"v")))
            .unwrap()
    };
    for i in 0..20 {
        let reply = send(a.addr, put(format!("k{i}"))).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    assert_eq!(b.count(), 20);
    let status: serde_json::Value =
        serde_json::from_str(&get(a.admin.unwrap(), "/status").await.text()).unwrap();
    let to_b = &status["cluster"]["peers"][1];
    assert_eq!(to_b["address"], format!("https://127.0.0.1:{b_tls}"));
    let forwarded = to_b["forwarded"].as_u64().unwrap();
    assert!(forwarded > 0, "nothing was forwarded to B: {status:#}");
    a.shutdown().await;

    // A replica without a client certificate cannot reach B: its writes for B's keys are not
    // taken, and none reaches the backend.
    let bare = write_peer_files(dir_a.path(), &ca, &clients, None);
    let a = start_proxy(&peer_config(b.addr, a_plain, a_tls, &peers, &bare)).await;
    let mut refused = 0;
    for i in 0..20 {
        let reply = send(a.addr, put(format!("k{i}"))).await;
        assert!(
            [200, 502, 503].contains(&reply.status.as_u16()),
            "{}",
            reply.text()
        );
        refused += usize::from(reply.status != 200);
    }
    assert_eq!(
        refused as u64, forwarded,
        "B's keys were taken without mutual TLS"
    );
    assert_eq!(b.count(), 40 - refused);
    a.shutdown().await;
    replica_b.shutdown().await;
}
