//! Cluster benchmark: the cost of the owner hop. Requests/s and latency of coalesced writes
//! (`serialize`) through one writegate replica of a two-replica `[cluster]`, for keys that
//! replica owns (ordered where they arrive) and keys the other owns (forwarded to it, signed,
//! and answered back), next to the same route on a writegate without `[cluster]`.
//!
//! Three writegate processes (one worker thread each) and one fast backend (201, small body) on
//! loopback; a closed loop of keep-alive connections, each writing `PUT /kv/<key>` with a 64-byte
//! body to a key of its own (so that no two connections wait on one key). Which replica owns a
//! key is computed as writegate does (rendezvous over the peers' addresses). Rounds are
//! interleaved and the medians printed.
//!
//! Run: `cargo bench --bench cluster` (env: WG_BENCH_SECONDS=5, WG_BENCH_ROUNDS=3,
//! WG_BENCH_CONNECTIONS=32).

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use support::{closed_loop, env_or, free_port, spawn_backend, Load, Writegate};
use writegate::balance::rendezvous;

const SECRET: &str = "benchmark-secret-0123456789abcdef0123";

fn config(port: u16, backend: SocketAddr, peers: Option<&[u16]>) -> String {
    let mut text = format!(
        "[runtime]\nworkers = 1\n\n[log]\naccess_log = false\n\n\
         [[listeners]]\nname = \"l\"\nlisten = \"127.0.0.1:{port}\"\n\n\
         [[upstreams]]\nname = \"writers\"\nbackends = [{{ address = \"{backend}\" }}]\n\n\
         [[routes]]\nname = \"kv\"\nupstream = \"writers\"\nkey = \"path_segment:2\"\n\n\
         [routes.coalesce]\nmode = \"serialize\"\n"
    );
    if let Some(peers) = peers {
        let list: Vec<String> = peers.iter().map(|p| format!("\"127.0.0.1:{p}\"")).collect();
        text.push_str(&format!(
            "\n[cluster]\npeers = [{}]\nsecret = \"{SECRET}\"\n",
            list.join(", ")
        ));
    }
    text
}

/// `n` keys whose owner among `peers` is peer `owner`.
fn keys_owned_by(peers: &[u16], owner: usize, n: usize) -> Vec<String> {
    let labels: Vec<String> = peers.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
    let table = rendezvous::Table::build(&labels, &vec![1; labels.len()]);
    (0..)
        .map(|i| format!("key{i}"))
        .filter(|k| table.primary(rendezvous::key_hash(k.as_bytes())) == owner)
        .take(n)
        .collect()
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
    let backend = runtime.block_on(spawn_backend(Duration::ZERO));
    let peers = [free_port(), free_port()];
    let alone_port = free_port();
    let dirs: Vec<tempfile::TempDir> = (0..3)
        .map(|_| tempfile::tempdir().expect("temp dir"))
        .collect();
    let _replicas: Vec<Writegate> = peers
        .iter()
        .zip(&dirs)
        .map(|(port, dir)| {
            Writegate::start(dir.path(), &config(*port, backend, Some(&peers)), *port)
        })
        .collect();
    let alone = Writegate::start(
        dirs[2].path(),
        &config(alone_port, backend, None),
        alone_port,
    );
    let entry = SocketAddr::from(([127, 0, 0, 1], peers[0]));
    let rows: [(&str, SocketAddr, Vec<String>); 3] = [
        (
            "no [cluster]",
            alone.addr,
            keys_owned_by(&peers, 0, connections),
        ),
        (
            "cluster, key owned here",
            entry,
            keys_owned_by(&peers, 0, connections),
        ),
        (
            "cluster, key forwarded",
            entry,
            keys_owned_by(&peers, 1, connections),
        ),
    ];
    let mut results: Vec<Vec<Load>> = rows.iter().map(|_| Vec::new()).collect();
    for _ in 0..rounds {
        for (row, (_, addr, keys)) in rows.iter().enumerate() {
            let keys = Arc::new(keys.clone());
            let make: support::MakeRequest = Arc::new(move |c, n| {
                Request::builder()
                    .method(Method::PUT)
                    .uri(format!("/kv/{}", keys[c % keys.len()]))
                    .header("host", "bench")
                    .body(Full::new(Bytes::from(format!("{n:064}"))))
                    .expect("request")
            });
            let duration = Duration::from_secs(seconds);
            let load = runtime.block_on(closed_loop(
                *addr,
                connections,
                duration,
                StatusCode::CREATED,
                make,
            ));
            results[row].push(load);
        }
    }
    println!("cluster: {connections} connections, {seconds} s x {rounds} rounds, medians");
    for ((name, _, _), loads) in rows.iter().zip(&results) {
        println!("  {name:<26} {}", Load::median(loads).describe());
    }
}
