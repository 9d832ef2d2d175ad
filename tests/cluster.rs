//! Per-key order across replicas: three writegate processes as `[cluster]` peers in front of one
//! backend that records, per key, how many writes were ever in flight at once.

mod support;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::Full;
use support::ledger::{ledger_backend, Ledger};
use support::processes::{free_port, Writegate};
use support::*;

const SECRET: &str = "0123456789abcdef0123456789abcdef-test";

/// The config of one replica listening on `port`, with `peers` (ports) and route `mode`.
fn replica_config(
    backend: &TestBackend,
    port: u16,
    peers: &[u16],
    cluster_extra: &str,
    mode: &str,
) -> String {
    let peers: Vec<String> = peers.iter().map(|p| format!("\"127.0.0.1:{p}\"")).collect();
    format!(
        "[log]\naccess_log = false\n\n[[listeners]]\nname = \"l\"\nlisten = \"127.0.0.1:{port}\"\n\n\
         [[upstreams]]\nname = \"writers\"\nbackends = [{{ address = \"{}\" }}]\n\n\
         [[routes]]\nname = \"kv\"\nupstream = \"writers\"\nkey = \"path_segment:2\"\n\n\
         [routes.coalesce]\nmode = \"{mode}\"\n\n\
         [cluster]\npeers = [{}]\nsecret = \"{SECRET}\"\n{cluster_extra}\n",
        backend.addr,
        peers.join(", ")
    )
}

/// Starts one writegate process per port, each listing all of `ports` as its peers.
fn start_fleet(
    dir: &Path,
    backend: &TestBackend,
    ports: &[u16],
    extra: &str,
    mode: &str,
) -> Vec<Writegate> {
    ports
        .iter()
        .map(|port| {
            let path = dir.join(format!("replica-{port}.toml"));
            std::fs::write(&path, replica_config(backend, *port, ports, extra, mode))
                .expect("write config");
            Writegate::start(&path)
        })
        .collect()
}

fn put(key: &str, body: &str) -> Request<Full<Bytes>> {
    Request::builder()
        .method(Method::PUT)
        .uri(format!("/kv/{key}"))
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("request")
}

/// 48 clients spread over the replicas, each writing 6 times to one of 8 keys.
async fn write_through_all(replicas: &[std::net::SocketAddr]) -> Vec<Reply> {
    let clients: Vec<_> = (0..48)
        .map(|c| {
            let addr = replicas[c % replicas.len()];
            tokio::spawn(async move {
                let mut client = Client::connect(addr).await;
                let mut replies = Vec::new();
                for i in 0..6 {
                    replies.push(
                        client
                            .send(put(&format!("k{}", c % 8), &format!("c{c}-{i}")))
                            .await,
                    );
                }
                replies
            })
        })
        .collect();
    let mut all = Vec::new();
    for c in clients {
        all.extend(bounded("a client's writes", c).await.expect("client task"));
    }
    all
}

fn max_concurrent(ledger: &Arc<Mutex<Ledger>>) -> usize {
    ledger.lock().expect("ledger").max_concurrent_per_key
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_serialize_each_key_across_the_fleet() {
    let (backend, ledger) = ledger_backend(None, Duration::from_millis(2)).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let ports = [free_port(), free_port(), free_port()];
    let fleet = start_fleet(dir.path(), &backend, &ports, "", "serialize");
    let addrs: Vec<_> = fleet.iter().map(|w| w.addr).collect();
    let replies = write_through_all(&addrs).await;
    for reply in &replies {
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    assert_eq!(
        max_concurrent(&ledger),
        1,
        "two writes of one key were in flight at once"
    );
    let l = ledger.lock().expect("ledger");
    assert_eq!(
        l.order.values().map(Vec::len).sum::<usize>(),
        48 * 6,
        "serialize sends every write"
    );
    for c in 0..48 {
        let mine: Vec<&String> = l.order[&format!("k{}", c % 8)]
            .iter()
            .filter(|b| b.starts_with(&format!("c{c}-")))
            .collect();
        let expected: Vec<String> = (0..6).map(|i| format!("c{c}-{i}")).collect();
        assert_eq!(
            mine,
            expected.iter().collect::<Vec<_>>(),
            "client {c}'s writes out of order"
        );
    }
}

/// The same fleet without `[cluster]` shows what it prevents: each replica orders its own
/// writes only, and writes of one key overlap at the backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_cluster_replicas_overlap_on_a_key() {
    let (backend, ledger) = ledger_backend(None, Duration::from_millis(2)).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let ports = [free_port(), free_port(), free_port()];
    let fleet: Vec<Writegate> = ports
        .iter()
        .map(|port| {
            let path = dir.path().join(format!("alone-{port}.toml"));
            let text = replica_config(&backend, *port, &ports, "", "serialize");
            let alone = text
                .split("[cluster]")
                .next()
                .expect("config head")
                .to_string();
            std::fs::write(&path, alone).expect("write config");
            Writegate::start(&path)
        })
        .collect();
    let addrs: Vec<_> = fleet.iter().map(|w| w.addr).collect();
    write_through_all(&addrs).await;
    assert!(
        max_concurrent(&ledger) > 1,
        "the witness saw no overlap: the cluster test proves nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_write_wins_holds_across_replicas() {
    let (backend, ledger) = ledger_backend(None, Duration::from_millis(2)).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let ports = [free_port(), free_port(), free_port()];
    let fleet = start_fleet(dir.path(), &backend, &ports, "", "latest");
    let addrs: Vec<_> = fleet.iter().map(|w| w.addr).collect();
    let replies = write_through_all(&addrs).await;
    assert_eq!(
        max_concurrent(&ledger),
        1,
        "two writes of one key were in flight at once"
    );
    let l = ledger.lock().expect("ledger");
    let sent: usize = l.order.values().map(Vec::len).sum();
    assert!(
        sent < 48 * 6,
        "latest merged nothing across the fleet ({sent} sent)"
    );
    for reply in &replies {
        assert_eq!(reply.status, 200, "{}", reply.text());
        // Every client hears the write that won: one the backend received for that key.
        let winner = reply.text().trim_start_matches("ok:").to_string();
        let key = format!(
            "k{}",
            winner
                .trim_start_matches('c')
                .split('-')
                .next()
                .and_then(|c| c.parse::<usize>().ok())
                .unwrap_or(0)
                % 8
        );
        assert!(
            l.order[&key].contains(&winner),
            "{winner} answered but never sent"
        );
    }
    // Each key's last write at the backend is the last one any client sent to it.
    for key in 0..8 {
        let last = l.order[&format!("k{key}")].last().expect("a write");
        assert!(
            last.ends_with("-5"),
            "k{key} ended on {last}, not a final write"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_write_is_never_forwarded_again_and_markers_cannot_be_forged() {
    let (backend, ledger) = ledger_backend(None, Duration::ZERO).await;
    let dir = tempfile::tempdir().expect("temp dir");
    // Two replicas that disagree: each lists only the other, so each thinks the other owns
    // every key. Without the hop marker a write would bounce between them for ever.
    let (a, b) = (free_port(), free_port());
    let write = |port: u16, peer: u16| {
        let path = dir.path().join(format!("r{port}.toml"));
        std::fs::write(
            &path,
            replica_config(&backend, port, &[peer], "", "serialize"),
        )
        .expect("write config");
        Writegate::start(&path)
    };
    let first = write(a, b);
    let second = write(b, a);
    let reply = bounded(
        "a write through disagreeing replicas",
        send(first.addr, put("x", "once")),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(ledger.lock().expect("ledger").order["x"], ["once"]);

    let mut forged = put("x", "forged");
    let marker = "v1 127.0.0.1:1 192.0.2.1 http 1 00";
    forged
        .headers_mut()
        .insert("writegate-hop", marker.parse().expect("header"));
    let reply = send(second.addr, forged).await;
    assert_eq!(reply.status, 403, "{}", reply.text());
    assert!(reply.text().contains("writegate-hop"), "{}", reply.text());
    assert_eq!(
        ledger.lock().expect("ledger").order["x"],
        ["once"],
        "a forged write reached the backend"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_peer_moves_its_keys_and_nothing_hangs() {
    let (backend, ledger) = ledger_backend(None, Duration::from_millis(1)).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let ports = [free_port(), free_port(), free_port()];
    let mut fleet = start_fleet(dir.path(), &backend, &ports, "", "serialize");
    let killed = fleet.pop().expect("three replicas");
    killed.kill_9();
    let addrs: Vec<_> = fleet.iter().map(|w| w.addr).collect();
    let started = Instant::now();
    let replies = write_through_all(&addrs).await;
    for reply in &replies {
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "writes hung on the dead peer"
    );
    let sent: usize = ledger
        .lock()
        .expect("ledger")
        .order
        .values()
        .map(Vec::len)
        .sum();
    assert_eq!(sent, 48 * 6);

    // With on_peer_down = "reject", a key of the dead peer gets 503 with Retry-After.
    let (backend, _) = ledger_backend(None, Duration::ZERO).await;
    let ports = [free_port(), free_port()];
    let mut pair = start_fleet(
        dir.path(),
        &backend,
        &ports,
        "on_peer_down = \"reject\"",
        "serialize",
    );
    pair.pop().expect("two replicas").kill_9();
    let survivor = pair[0].addr;
    let mut statuses = Vec::new();
    for i in 0..40 {
        let reply = bounded(
            "a write whose owner is dead",
            send(survivor, put(&format!("r{i}"), "v")),
        )
        .await;
        if reply.status == 503 {
            assert!(
                reply.headers.contains_key("retry-after"),
                "503 without Retry-After"
            );
            assert!(reply.text().contains("unreachable"), "{}", reply.text());
        }
        statuses.push(reply.status.as_u16());
    }
    assert!(
        statuses.contains(&503),
        "no key was owned by the dead peer: {statuses:?}"
    );
    assert!(
        statuses.contains(&200),
        "no key was owned by the survivor: {statuses:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_found_in_dns_share_the_order_too() {
    let test = "peers_found_in_dns_share_the_order_too";
    let ports = [free_port(), free_port(), free_port()];
    let records: String = ports
        .iter()
        .enumerate()
        .map(|(i, port)| {
            format!("srv-host=_writegate._tcp.peers.test,r{i}.test,{port},0,1\nhost-record=r{i}.test,127.0.0.1\n")
        })
        .collect();
    let Some(dns) = support::processes::start_dnsmasq(test, "", &records) else {
        return;
    };
    let (backend, ledger) = ledger_backend(None, Duration::from_millis(2)).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let discovery = format!(
        "discovery = {{ dns = \"_writegate._tcp.peers.test\", resolvers = [\"{}\"] }}",
        dns.addr()
    );
    let fleet: Vec<Writegate> = ports
        .iter()
        .map(|port| {
            let path = dir.path().join(format!("dns-{port}.toml"));
            let text = replica_config(&backend, *port, &[], &discovery, "serialize");
            std::fs::write(&path, text).expect("write config");
            Writegate::start(&path)
        })
        .collect();
    let addrs: Vec<_> = fleet.iter().map(|w| w.addr).collect();
    for reply in write_through_all(&addrs).await {
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    assert_eq!(
        max_concurrent(&ledger),
        1,
        "two writes of one key were in flight at once"
    );
}
