//! `hash_algorithm = "ketama"` places keys exactly where nginx's `hash $key consistent` does.
//!
//! The backends sit on fixed loopback addresses because nginx hashes the server's address text.
//! `ketama_matches_the_recorded_nginx_placement` checks writegate against placements recorded from
//! nginx 1.22 (tests/fixtures/ketama_nginx.txt) on any machine; `ketama_matches_a_live_nginx`
//! sends the same keys through a real nginx and a real writegate side by side when nginx is
//! installed, and rewrites the fixture when WRITEGATE_RECORD_FIXTURE=1.

mod support;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use http::Request;
use support::*;
use writegate::config::Config;
use writegate::snapshot::Snapshot;

/// (address, weight): the upstream both proxies use.
const SERVERS: [(&str, u32); 4] = [
    ("127.0.10.1:19001", 1),
    ("127.0.10.2:19001", 1),
    ("127.0.10.3:19001", 2),
    ("127.0.10.4:19001", 1),
];

fn keys() -> Vec<String> {
    let mut keys: Vec<String> = (0..2_500).map(|i| format!("key-{i}")).collect();
    keys.extend((0..400).map(|i| format!("user:{}", i * 7919)));
    keys.extend((0..100).map(|i| format!("order/{:08x}-{}", i * 2_654_435_761u64 % (1 << 32), i)));
    keys
}

fn fixture_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ketama_nginx.txt")
}

fn writegate_config(listen: &str) -> String {
    let backends: Vec<String> = SERVERS
        .iter()
        .map(|(a, w)| format!("{{ address = \"{a}\", weight = {w} }}"))
        .collect();
    format!(
        "[log]\naccess_log = false\n\n[[listeners]]\nname = \"l\"\nlisten = \"{listen}\"\n\n\
         [[upstreams]]\nname = \"u\"\nbalance = \"consistent_hash\"\nhash_algorithm = \"ketama\"\n\
         backends = [{}]\n\n[[routes]]\nname = \"r\"\nupstream = \"u\"\nkey = \"header:x-key\"\n",
        backends.join(", ")
    )
}

/// Where writegate's ketama ring puts `key`, computed in-process.
fn writegate_placement(snapshot: &Snapshot, key: &str) -> String {
    let upstream = &snapshot.upstreams[0];
    let hash = upstream.balancer.hash_key(key.as_bytes());
    let pick = upstream
        .balancer
        .pick(&upstream.members, hash, 0, |_| true)
        .unwrap();
    upstream.members[pick.member].backend.label().to_string()
}

#[test]
fn ketama_matches_the_recorded_nginx_placement() {
    let text = std::fs::read_to_string(fixture_path()).expect("fixture present");
    let config = Config::parse("k.toml".as_ref(), &writegate_config("127.0.0.1:0")).unwrap();
    let snapshot = Snapshot::build(Arc::new(config), None);
    let mut checked = 0;
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (key, server) = line.split_once(' ').expect("'key server' lines");
        assert_eq!(writegate_placement(&snapshot, key), server, "key {key}");
        checked += 1;
    }
    assert_eq!(checked, keys().len(), "the fixture covers every key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ketama_matches_a_live_nginx() {
    let mut backends = Vec::new();
    for (addr, _) in SERVERS {
        let name: &'static str = Box::leak(addr.to_string().into_boxed_str());
        backends.push(named_backend_at(addr.parse().unwrap(), name).await);
    }
    let servers: String = SERVERS
        .iter()
        .map(|(a, w)| format!("  server {a} weight={w};\n"))
        .collect();
    let nginx_http = format!(
        "upstream u {{\n  hash $http_x_key consistent;\n{servers}}}\n\
         server {{ listen {{listen}}; location / {{ proxy_pass http://u; }} }}"
    );
    let Some(nginx) = start_nginx(&nginx_http).await else {
        return;
    };
    let proxy = start_proxy(&writegate_config("127.0.0.1:0")).await;
    let mut nginx_client = Client::connect(nginx.addr).await;
    let mut proxy_client = Client::connect(proxy.addr).await;
    let mut recorded = BTreeMap::new();
    for key in keys() {
        let request = || {
            Request::builder()
                .uri("/")
                .header("x-key", key.as_str())
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .unwrap()
        };
        let by_nginx = nginx_client.send(request()).await;
        let by_writegate = proxy_client.send(request()).await;
        assert_eq!(by_nginx.status, 200, "nginx: {}", by_nginx.text());
        assert_eq!(by_writegate.text(), by_nginx.text(), "key {key}");
        recorded.insert(key, by_nginx.text());
    }
    if std::env::var_os("WRITEGATE_RECORD_FIXTURE").is_some() {
        let mut out = String::from(
            "# Key placements recorded from nginx 1.22 `hash $http_x_key consistent` over\n\
             # 127.0.10.1:19001, 127.0.10.2:19001, 127.0.10.3:19001 weight=2, 127.0.10.4:19001.\n",
        );
        for (key, server) in &recorded {
            out.push_str(&format!("{key} {server}\n"));
        }
        std::fs::write(fixture_path(), out).unwrap();
    }
    proxy.shutdown().await;
}
