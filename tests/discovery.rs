//! Backends from DNS, against a real `dnsmasq` on a loopback port: A and SRV answers, changes
//! applied like a reload (live state kept, only the changed backends' keys move), failed and
//! empty answers, and probation of new backends behind health checks.

mod support;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::Full;
use support::processes::{start_dnsmasq, Dnsmasq};
use support::*;

/// Longest wait for discovery to see a DNS change (refresh is 100–200 ms in these tests).
const SEE_CHANGE: Duration = Duration::from_secs(20);

/// A port free on 127.0.0.2 (and, with near certainty, on the other 127.0.0.x addresses): A
/// records carry no port, so the backends of one name share it.
fn shared_port() -> u16 {
    let probe = std::net::TcpListener::bind("127.0.0.2:0").expect("bind 127.0.0.2");
    probe.local_addr().expect("local addr").port()
}

async fn backend_on_host(last: u8, port: u16, name: &'static str) -> TestBackend {
    named_backend_at(SocketAddr::from(([127, 0, 0, last], port)), name).await
}

fn hosts(lasts: &[u8]) -> String {
    lasts
        .iter()
        .map(|last| format!("127.0.0.{last} writers.test\n"))
        .collect()
}

fn config(dns: &Dnsmasq, discovery: &str, upstream_extra: &str) -> String {
    format!(
        "[log]\naccess_log = false\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n[[listeners]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\n\n\
         [[upstreams]]\nname = \"writers\"\n{upstream_extra}\n\
         discovery = {{ {discovery}, resolvers = [\"{}\"], min_refresh = \"100ms\", max_refresh = \"200ms\", timeout = \"300ms\" }}\n\n\
         [[routes]]\nname = \"kv\"\nupstream = \"writers\"\nkey = \"header:x-key\"\n",
        dns.addr()
    )
}

/// The `writers` upstream as `/status` shows it.
async fn upstream_status(proxy: &TestProxy) -> serde_json::Value {
    let admin = proxy.admin.expect("admin listener");
    let status: serde_json::Value =
        serde_json::from_str(&get(admin, "/status").await.text()).expect("status is JSON");
    status["upstreams"][0].clone()
}

/// Polls `/status` until `condition` holds for the upstream, failing with `what` after `limit`.
async fn until_status(
    proxy: &TestProxy,
    what: &str,
    mut condition: impl FnMut(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + SEE_CHANGE;
    loop {
        let status = upstream_status(proxy).await;
        if condition(&status) {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {SEE_CHANGE:?}: {what}; last status: {status:#}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn discovered(status: &serde_json::Value) -> u64 {
    status["discovery"]["backends"].as_u64().unwrap_or(u64::MAX)
}

fn keyed(key: &str) -> Request<Full<Bytes>> {
    Request::builder()
        .method(Method::PUT)
        .uri("/kv")
        .header("x-key", key)
        .body(Full::new(Bytes::from_static(b"v")))
        .expect("request")
}

/// Which backend answers each key.
async fn placements(proxy: &TestProxy, keys: &[String]) -> HashMap<String, String> {
    let mut client = Client::connect(proxy.addr).await;
    let mut out = HashMap::new();
    for key in keys {
        let reply = client.send(keyed(key)).await;
        assert_eq!(reply.status, 200, "key {key}: {}", reply.text());
        out.insert(key.clone(), reply.text());
    }
    out
}

fn backend_requests(status: &serde_json::Value, label: &str) -> u64 {
    let backends = status["backends"].as_array().expect("backends");
    let backend = backends.iter().find(|b| b["address"] == label);
    backend.and_then(|b| b["requests"].as_u64()).unwrap_or(0)
}

async fn with_dnsmasq<F: Future<Output = ()>>(
    test: &str,
    hosts: &str,
    records: &str,
    run: impl FnOnce(Dnsmasq) -> F,
) {
    if let Some(dns) = start_dnsmasq(test, hosts, records) {
        run(dns).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_changes_apply_like_a_reload_and_move_only_their_keys() {
    let test = "a_record_changes_apply_like_a_reload_and_move_only_their_keys";
    with_dnsmasq(test, &hosts(&[2, 3, 4]), "", |dns| async move {
        let port = shared_port();
        let _b2 = backend_on_host(2, port, "b2").await;
        let _b3 = backend_on_host(3, port, "b3").await;
        let _b4 = backend_on_host(4, port, "b4").await;
        let _b5 = backend_on_host(5, port, "b5").await;
        let toml = config(
            &dns,
            &format!("dns = \"writers.test:{port}\""),
            "balance = \"consistent_hash\"",
        );
        let proxy = start_proxy(&toml).await;
        // The first answer is in before the proxy serves.
        let status = upstream_status(&proxy).await;
        assert_eq!(discovered(&status), 3, "{status:#}");
        let keys: Vec<String> = (0..300).map(|i| format!("user{i}")).collect();
        let before = placements(&proxy, &keys).await;
        let used: HashSet<&str> = before.values().map(String::as_str).collect();
        assert_eq!(used, HashSet::from(["b2", "b3", "b4"]));
        let b2_label = format!("127.0.0.2:{port}");
        let b2_before = backend_requests(&upstream_status(&proxy).await, &b2_label);
        assert!(b2_before > 0);

        dns.set_hosts(&hosts(&[2, 3, 4, 5]));
        until_status(&proxy, "the fourth address is discovered", |s| {
            discovered(s) == 4
        })
        .await;
        let added = placements(&proxy, &keys).await;
        let moved: Vec<&String> = keys.iter().filter(|k| before[*k] != added[*k]).collect();
        assert!(!moved.is_empty(), "no key moved to the new backend");
        for key in &moved {
            assert_eq!(added[*key], "b5", "key {key} moved between old backends");
        }
        // A backend that stayed kept its live state: its request count carried over.
        let status = upstream_status(&proxy).await;
        assert!(
            backend_requests(&status, &b2_label) >= b2_before,
            "b2's counts were reset by the change: {status:#}"
        );

        dns.set_hosts(&hosts(&[2, 4, 5]));
        until_status(&proxy, "the removed address is gone", |s| {
            discovered(s) == 3
        })
        .await;
        let removed = placements(&proxy, &keys).await;
        for key in &keys {
            if added[key] == "b3" {
                assert_ne!(removed[key], "b3", "key {key} still on the removed backend");
            } else {
                assert_eq!(
                    removed[key], added[key],
                    "key {key} moved though its backend stayed"
                );
            }
        }
        proxy.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_lookups_keep_the_set_and_only_repeated_empty_answers_empty_it() {
    let test = "failed_lookups_keep_the_set_and_only_repeated_empty_answers_empty_it";
    with_dnsmasq(test, &hosts(&[2]), "", |mut dns| async move {
        let port = shared_port();
        let b2 = backend_on_host(2, port, "b2").await;
        let toml = config(&dns, &format!("dns = \"writers.test:{port}\""), "");
        let proxy = start_proxy(&toml).await;
        assert_eq!(send(proxy.addr, keyed("k")).await.status, 200);

        dns.stop();
        let status = until_status(&proxy, "lookups fail while dnsmasq is down", |s| {
            s["discovery"]["failed_in_a_row"].as_u64() >= Some(3)
        })
        .await;
        assert_eq!(discovered(&status), 1, "a failed lookup changed the set");
        assert!(status["discovery"]["error"].is_string(), "{status:#}");
        assert_eq!(send(proxy.addr, keyed("k")).await.status, 200);

        dns.start();
        until_status(&proxy, "lookups answer again", |s| {
            s["discovery"]["last_result"] == "records"
        })
        .await;
        dns.set_hosts("");
        // Until three empty answers in a row, the set stays; whenever /status shows fewer, it
        // must still list the backend.
        let status = until_status(&proxy, "three empty answers empty the upstream", |s| {
            let empties = s["discovery"]["empty_in_a_row"].as_u64().unwrap_or(0);
            if (1..3).contains(&empties) {
                assert_eq!(discovered(s), 1, "emptied before empty_after: {s:#}");
            }
            discovered(s) == 0
        })
        .await;
        assert_eq!(status["ready"], false, "{status:#}");
        let started = Instant::now();
        let reply = send(proxy.addr, keyed("k")).await;
        assert_eq!(reply.status, 503, "{}", reply.text());
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "503 was not at once"
        );
        let served = b2.count();

        dns.set_hosts(&hosts(&[2]));
        until_status(&proxy, "the name resolves again", |s| discovered(s) == 1).await;
        assert_eq!(send(proxy.addr, keyed("k")).await.status, 200);
        assert_eq!(b2.count(), served + 1);
        proxy.shutdown().await;
    })
    .await;
}

fn srv_records(targets: &[(&str, u16, u16, u16)]) -> String {
    let mut lines = String::new();
    for (name, port, priority, weight) in targets {
        lines.push_str(&format!(
            "srv-host=_http._tcp.writers.test,{name}.test,{port},{priority},{weight}\n\
             host-record={name}.test,127.0.0.1\n"
        ));
    }
    lines
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn srv_records_give_ports_and_weights_and_backups_wait() {
    let test = "srv_records_give_ports_and_weights_and_backups_wait";
    let s1 = named_backend("s1", Duration::ZERO).await;
    let s2 = named_backend("s2", Duration::ZERO).await;
    let s3 = named_backend("s3", Duration::ZERO).await;
    let (p1, p2, p3) = (s1.addr.port(), s2.addr.port(), s3.addr.port());
    // s3 has a higher priority number: a backup, unused while the first group answers.
    let records = srv_records(&[("w1", p1, 0, 1), ("w2", p2, 0, 3), ("w3", p3, 1, 5)]);
    with_dnsmasq(test, "", &records, |mut dns| async move {
        let toml = config(&dns, "dns = \"_http._tcp.writers.test\"", "");
        let proxy = start_proxy(&toml).await;
        let status = upstream_status(&proxy).await;
        let weights: HashMap<String, u64> = status["backends"]
            .as_array()
            .expect("backends")
            .iter()
            .map(|b| {
                (
                    b["address"].as_str().unwrap_or("").to_string(),
                    b["weight"].as_u64().unwrap_or(0),
                )
            })
            .collect();
        let expected = HashMap::from([
            (format!("127.0.0.1:{p1}"), 1),
            (format!("127.0.0.1:{p2}"), 3),
        ]);
        assert_eq!(weights, expected, "{status:#}");
        let mut client = Client::connect(proxy.addr).await;
        for i in 0..400 {
            let reply = client.send(keyed(&format!("k{i}"))).await;
            assert_eq!(reply.status, 200);
        }
        assert_eq!(s3.count(), 0, "the backup target got requests");
        assert!(
            s2.count() > 2 * s1.count(),
            "weights 1:3 were not followed: s1 {} s2 {}",
            s1.count(),
            s2.count()
        );

        // dnsmasq reads SRV lines only at start: it restarts on its port, and lookups fail
        // meanwhile (the set stays).
        dns.set_records(&srv_records(&[
            ("w1", p1, 0, 1),
            ("w2", p2, 0, 3),
            ("w3", p3, 0, 5),
        ]));
        until_status(&proxy, "the third target is discovered", |s| {
            discovered(s) == 3
        })
        .await;
        for i in 0..50 {
            assert_eq!(client.send(keyed(&format!("k{i}"))).await.status, 200);
        }
        assert!(s3.count() > 0, "the new target got no requests");
        proxy.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_dns_adds_wait_for_their_health_checks() {
    let test = "backends_dns_adds_wait_for_their_health_checks";
    with_dnsmasq(test, &hosts(&[2]), "", |dns| async move {
        let port = shared_port();
        let b2 = backend_on_host(2, port, "b2").await;
        let failing = backend_at(SocketAddr::from(([127, 0, 0, 3], port)), |_| async {
            let mut response = http::Response::new(Full::new(Bytes::from_static(b"broken")));
            *response.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
            response
        })
        .await;
        let b4 = backend_on_host(4, port, "b4").await;
        let checks = "[upstreams.health_check]\npath = \"/health\"\ninterval = \"100ms\"\nhealthy_threshold = 2";
        let mut toml = config(&dns, &format!("dns = \"writers.test:{port}\""), "");
        toml = toml.replace("\n\n[[routes]]", &format!("\n{checks}\n\n[[routes]]"));
        let proxy = start_proxy(&toml).await;
        assert_eq!(send(proxy.addr, keyed("k")).await.status, 200);

        dns.set_hosts(&hosts(&[2, 3]));
        let failing_label = format!("127.0.0.3:{port}");
        until_status(&proxy, "the failing backend is discovered and checked", |s| {
            let backends = s["backends"].as_array().cloned().unwrap_or_default();
            backends.iter().any(|b| {
                b["address"] == failing_label.as_str() && b["last_health_check_failure"].is_string()
            })
        })
        .await;
        let mut client = Client::connect(proxy.addr).await;
        for i in 0..50 {
            let reply = client.send(keyed(&format!("k{i}"))).await;
            assert_eq!(reply.status, 200, "{}", reply.text());
        }
        let to_failing = failing.uris().iter().filter(|u| *u != "/health").count();
        assert_eq!(to_failing, 0, "a backend on probation got client requests");
        assert!(b2.count() > 50);

        dns.set_hosts(&hosts(&[2, 3, 4]));
        let b4_label = format!("127.0.0.4:{port}");
        until_status(&proxy, "the healthy new backend passes its checks", |s| {
            let backends = s["backends"].as_array().cloned().unwrap_or_default();
            backends
                .iter()
                .any(|b| b["address"] == b4_label.as_str() && b["usable"] == true)
        })
        .await;
        for i in 0..50 {
            assert_eq!(client.send(keyed(&format!("k{i}"))).await.status, 200);
        }
        let b4_requests = b4.uris().iter().filter(|u| *u != "/health").count();
        assert!(b4_requests > 0, "the new healthy backend got no requests");
        proxy.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_dns_removes_finishes_its_requests_in_flight() {
    let test = "a_backend_dns_removes_finishes_its_requests_in_flight";
    with_dnsmasq(test, &hosts(&[2]), "", |dns| async move {
        let port = shared_port();
        let gate = Gate::default();
        let held = gate.clone();
        let _slow = backend_at(SocketAddr::from(([127, 0, 0, 2], port)), move |_| {
            let held = held.clone();
            async move {
                held.hold().await;
                http::Response::new(Full::new(Bytes::from_static(b"finished")))
            }
        })
        .await;
        let _b3 = backend_on_host(3, port, "b3").await;
        let toml = config(&dns, &format!("dns = \"writers.test:{port}\""), "");
        let proxy = start_proxy(&toml).await;
        let addr = proxy.addr;
        let in_flight = tokio::spawn(async move { send(addr, keyed("k")).await });
        gate.entered().await;
        dns.set_hosts(&hosts(&[3]));
        until_status(&proxy, "the slow backend is replaced", |s| {
            s["backends"][0]["address"] == format!("127.0.0.3:{port}").as_str()
        })
        .await;
        assert_eq!(send(proxy.addr, keyed("k")).await.text(), "b3");
        gate.release(1);
        let reply = bounded("the request in flight", in_flight)
            .await
            .expect("task");
        assert_eq!(
            (reply.status.as_u16(), reply.text()),
            (200, "finished".to_string())
        );
        proxy.shutdown().await;
    })
    .await;
}
