//! Hot reload over real files, real file watching and real traffic. (SIGHUP has its own test
//! binary, `reload_sighup.rs`: a signal reaches every proxy of the process it is sent to.)

mod support;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::Method;
use support::*;
use writegate::reload::ReloadState;

/// A config with one upstream over `backends` (listeners stay as written: they need a restart).
fn config_text(backends: &[std::net::SocketAddr], route_extra: &str) -> String {
    let list: Vec<String> = backends
        .iter()
        .map(|a| format!("{{ address = \"{a}\" }}"))
        .collect();
    format!(
        "[log]\naccess_log = false\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n[[listeners]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\n\n\
         [[upstreams]]\nname = \"writers\"\nbackends = [{}]\n\n[[routes]]\nname = \"kv\"\nupstream = \"writers\"\n{route_extra}\n",
        list.join(", ")
    )
}

/// Replaces `path` the way editors do: write a new file, rename it over the old one.
fn rename_over(path: &Path, text: &str) {
    let staging = path.with_extension("tmp");
    std::fs::write(&staging, text).unwrap();
    std::fs::rename(&staging, path).unwrap();
}

async fn reloads(state: &ReloadState, succeeded: u64) {
    let deadline = Instant::now() + STEP;
    while state.status().succeeded < succeeded {
        assert!(
            Instant::now() < deadline,
            "{succeeded} successful reload(s) expected: {:?}",
            state.status()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_added_backend_gets_traffic_within_two_seconds() {
    let a = named_backend("a", Duration::ZERO).await;
    let b = named_backend("b", Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("writegate.toml");
    std::fs::write(&path, config_text(&[a.addr], "")).unwrap();
    let (proxy, state) = start_reloading_proxy(&path).await;
    assert_eq!(get(proxy.addr, "/").await.text(), "a");
    let edited = Instant::now();
    rename_over(&path, &config_text(&[a.addr, b.addr], ""));
    let mut client = Client::connect(proxy.addr).await;
    while b.count() == 0 {
        assert!(
            edited.elapsed() < Duration::from_secs(2),
            "the new backend got no traffic within 2 s"
        );
        assert_eq!(client.send(req(Method::GET, "/", b"")).await.status, 200);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let status = state.status();
    assert_eq!(
        status.last_changes.as_deref(),
        Some(format!("upstream writers: +{}", b.addr).as_str())
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_backend_gets_nothing_new_and_finishes_what_it_has() {
    let gate = Gate::default();
    let a = gated_backend(&gate).await;
    let b = named_backend("b", Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("writegate.toml");
    std::fs::write(&path, config_text(&[a.addr, b.addr], "")).unwrap();
    let (proxy, state) = start_reloading_proxy(&path).await;
    let addr = proxy.addr;
    // The first pick of a fresh upstream is its first backend: a, which holds the request.
    let held = tokio::spawn(async move { send(addr, req(Method::PUT, "/k", b"in flight")).await });
    gate.entered().await;
    rename_over(&path, &config_text(&[b.addr], ""));
    reloads(&state, 1).await;
    let mut client = Client::connect(proxy.addr).await;
    for _ in 0..10 {
        assert_eq!(
            client.send(req(Method::PUT, "/k", b"new")).await.text(),
            "b"
        );
    }
    assert_eq!(a.count(), 1, "the removed backend got no new request");
    gate.release(1);
    let reply = bounded("the in-flight request", held).await.unwrap();
    assert_eq!(
        (reply.status.as_u16(), reply.text()),
        (200, "released".to_string())
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_edit_keeps_the_old_config_and_is_reported_until_fixed() {
    writegate::metrics::install();
    let a = named_backend("a", Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("writegate.toml");
    let good = config_text(&[a.addr], "");
    std::fs::write(&path, &good).unwrap();
    let (proxy, state) = start_reloading_proxy(&path).await;
    let admin = proxy.admin.unwrap();
    rename_over(
        &path,
        &good.replace("upstream = \"writers\"", "upstream = \"nobody\""),
    );
    eventually("the failed reload to be reported", || {
        state.status().failed >= 1
    })
    .await;
    assert_eq!(
        get(proxy.addr, "/").await.status,
        200,
        "the old config keeps serving"
    );
    let status: serde_json::Value =
        serde_json::from_str(&get(admin, "/status").await.text()).unwrap();
    assert_eq!(status["reload"]["ok"], false);
    let error = status["reload"]["error"].as_str().unwrap();
    assert!(
        error.contains("writegate.toml:17:12: route \"kv\" names unknown upstream \"nobody\""),
        "{error}"
    );
    let scrape = get(admin, "/metrics").await.text();
    assert!(
        scrape.contains("writegate_config_reloads_total{result=\"failure\"}"),
        "{scrape}"
    );
    // A listener change needs a restart: refused, and said so.
    rename_over(&path, &good.replace("name = \"l\"", "name = \"renamed\""));
    eventually("the listener change to be refused", || {
        state.status().failed >= 2
    })
    .await;
    assert!(state
        .status()
        .error
        .unwrap()
        .contains("restart writegate to apply this"));
    // A good edit clears the error.
    rename_over(&path, &config_text(&[a.addr], "max_body = \"1KiB\""));
    reloads(&state, 1).await;
    let status: serde_json::Value =
        serde_json::from_str(&get(admin, "/status").await.text()).unwrap();
    assert_eq!(status["reload"]["ok"], true);
    assert_eq!(status["reload"]["last_changes"], "route kv: changed");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_symlink_swap_is_seen() {
    let a = named_backend("a", Duration::ZERO).await;
    let b = named_backend("b", Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    // ConfigMap style: the file is a symlink into a versioned directory, swapped atomically.
    for (version, backend) in [("v1", a.addr), ("v2", b.addr)] {
        std::fs::create_dir(dir.path().join(version)).unwrap();
        std::fs::write(
            dir.path().join(version).join("writegate.toml"),
            config_text(&[backend], ""),
        )
        .unwrap();
    }
    let path = dir.path().join("writegate.toml");
    std::os::unix::fs::symlink("v1/writegate.toml", &path).unwrap();
    let (proxy, state) = start_reloading_proxy(&path).await;
    assert_eq!(get(proxy.addr, "/").await.text(), "a");
    let staging = dir.path().join("next.toml");
    std::os::unix::fs::symlink("v2/writegate.toml", &staging).unwrap();
    std::fs::rename(&staging, &path).unwrap();
    reloads(&state, 1).await;
    assert_eq!(get(proxy.addr, "/").await.text(), "b");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_reloads_under_load_fail_no_request() {
    let backends = [
        named_backend("a", Duration::from_millis(1)).await,
        named_backend("b", Duration::from_millis(1)).await,
        named_backend("c", Duration::from_millis(1)).await,
    ];
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("writegate.toml");
    std::fs::write(&path, config_text(&addrs[..2], "")).unwrap();
    let (proxy, state) = start_reloading_proxy(&path).await;
    let addr = proxy.addr;
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let clients: Vec<_> = (0..8)
        .map(|i| {
            let (stop, ok, failed) = (Arc::clone(&stop), Arc::clone(&ok), Arc::clone(&failed));
            tokio::spawn(async move {
                let mut client = Client::connect(addr).await;
                while !stop.load(Ordering::Relaxed) {
                    let reply = client.send(req(Method::PUT, &format!("/k{i}"), b"v")).await;
                    let counter = if reply.status == 200 { &ok } else { &failed };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for round in 1..=20u64 {
        // Alternate the backend set and a route setting, so every reload changes something.
        let set = if round % 2 == 0 {
            &addrs[..2]
        } else {
            &addrs[1..]
        };
        let extra = if round % 3 == 0 { "retries = 2" } else { "" };
        rename_over(&path, &config_text(set, extra));
        reloads(&state, round).await;
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        bounded("client", c).await.unwrap();
    }
    assert_eq!(state.status().failed, 0);
    assert!(
        ok.load(Ordering::Relaxed) > 100,
        "traffic flowed during the reloads"
    );
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "no request failed across 20 reloads"
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_writes_and_backend_state_survive_a_reload() {
    let gate = Gate::default();
    let b = gated_backend(&gate).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("writegate.toml");
    let coalescing = "key = \"path\"\n\n[routes.coalesce]\nmode = \"serialize\"";
    std::fs::write(&path, config_text(&[b.addr], coalescing)).unwrap();
    let (proxy, state) = start_reloading_proxy(&path).await;
    let before = proxy.snapshots.load_full();
    let addr = proxy.addr;
    let put = |body: &'static [u8]| {
        tokio::spawn(async move { send(addr, req(Method::PUT, "/k", body)).await })
    };
    let mut writes = vec![put(b"1")];
    gate.entered().await;
    let queue = before.router.routes()[0].coalescer.clone().unwrap();
    for (i, body) in [b"2", b"3"].into_iter().enumerate() {
        writes.push(put(body));
        eventually("the write to queue", || queue.waiting(b"/k") == i + 1).await;
    }
    // Reload with a changed route setting while one write is in flight and two are queued.
    rename_over(
        &path,
        &config_text(&[b.addr], &format!("max_body = \"1MiB\"\n{coalescing}")),
    );
    reloads(&state, 1).await;
    let after = proxy.snapshots.load_full();
    let (old, new) = (
        &before.upstreams[0].members[0],
        &after.upstreams[0].members[0],
    );
    assert!(
        Arc::ptr_eq(&old.backend, &new.backend),
        "the backend's live state was kept"
    );
    assert_eq!(new.backend.inflight(), 1, "its in-flight count came along");
    let new_queue = after.router.routes()[0].coalescer.clone().unwrap();
    assert!(
        Arc::ptr_eq(&queue, &new_queue),
        "the route's key queues were kept"
    );
    writes.push(put(b"4"));
    eventually("the post-reload write to queue behind the others", || {
        new_queue.waiting(b"/k") == 3
    })
    .await;
    gate.release(4);
    for w in writes {
        assert_eq!(bounded("write", w).await.unwrap().status, 200);
    }
    assert_eq!(
        b.bodies(),
        [b"1".to_vec(), b"2".to_vec(), b"3".to_vec(), b"4".to_vec()],
        "arrival order across the reload"
    );
    proxy.shutdown().await;
}

/// A refused file is judged once: writes to other files in its directory (a log file beside it)
/// try nothing again; and restoring the running config clears the error without a SIGHUP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_file_is_judged_once_and_restoring_it_clears_the_error() {
    let a = named_backend("a", Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("writegate.toml");
    let good = config_text(&[a.addr], "");
    std::fs::write(&path, &good).unwrap();
    let (proxy, state) = start_reloading_proxy(&path).await;
    rename_over(
        &path,
        &good.replace("upstream = \"writers\"", "upstream = \"nobody\""),
    );
    eventually("the failed reload", || state.status().failed >= 1).await;
    let log = dir.path().join("writegate.log");
    for line in 0..5 {
        std::fs::write(&log, format!("log line {line}\n")).unwrap();
        // Longer than the debounce, so that each write is an event of its own.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(state.status().failed, 1, "{:?}", state.status());
    rename_over(&path, &good);
    eventually("the error to clear", || state.status().error.is_none()).await;
    let status = state.status();
    assert_eq!((status.failed, status.succeeded), (1, 0), "{status:?}");
    proxy.shutdown().await;
}
