//! Write buffering on RabbitMQ, with a real `rabbitmq-server` and `redis-server` started by each
//! test: two writegate replicas sharing the queues, one of them killed with `kill -9`, and a
//! broker restart. Skipped (one line each) where the servers are not installed.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::StatusCode;
use support::processes::{
    start_rabbitmq, start_rabbitmq_with, start_redis, RabbitMq, Redis, Writegate,
};
use support::writes::*;
use support::*;

/// A config for one replica: one route to `backend` keyed by the second path segment, buffered
/// on `broker` in `partitions` partitions, receipts in `redis`.
fn replica_config(
    dir: &Path,
    name: &str,
    backend: SocketAddr,
    broker: &RabbitMq,
    redis: &Redis,
    extra: &str,
) -> PathBuf {
    let path = dir.join(format!("{name}.toml"));
    let buffer = format!(
        "store = \"rabbitmq\"\namqp_url = \"{}\"\nreceipts_url = \"{}\"\n\
         partitions = 4\npublish_timeout = \"2s\"\n{extra}",
        broker.url(),
        redis.url(),
    );
    let text = buffered_config(backend, &buffer);
    std::fs::write(&path, text).unwrap();
    path
}

/// Bound of the steps that wait on brokers and replicas (several of each start per test).
const WAIT: Duration = Duration::from_secs(60);

/// One test at a time: each starts a broker and replicas, too much at once for two cores.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The broker and Redis, or `None` when the test is skipped.
fn servers(test: &str) -> Option<(RabbitMq, Redis)> {
    let redis = start_redis(test)?;
    let broker = start_rabbitmq(test)?;
    Some((broker, redis))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_deliver_every_write_once_in_key_order() {
    let _serial = SERIAL.lock().await;
    const KEYS: usize = 500;
    const PER_KEY: u64 = 10;
    const CLIENTS: usize = 50;
    let Some((broker, redis)) = servers("two_replicas_deliver_every_write_once_in_key_order")
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let backend_port = reserve_port();
    let backend = backend_port.addr;
    let a = Writegate::start(&replica_config(
        dir.path(),
        "a",
        backend,
        &broker,
        &redis,
        "",
    ));
    let b = Writegate::start(&replica_config(
        dir.path(),
        "b",
        backend,
        &broker,
        &redis,
        "",
    ));
    let replicas = [a.addr, b.addr];

    // A key's writes go one after the other, alternating between the replicas.
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            tokio::spawn(async move {
                let mut connections = [None, None];
                let mut receipts = Vec::new();
                for n in 0..PER_KEY {
                    for k in (c..KEYS).step_by(CLIENTS) {
                        let key = format!("k{k}");
                        let side = (k + n as usize) % 2;
                        let answer =
                            try_write(&mut connections[side], replicas[side], &key, n).await;
                        let (status, location) =
                            answer.unwrap_or_else(|| panic!("no answer for {key}:{n}"));
                        assert_eq!(status, StatusCode::ACCEPTED, "{key}:{n}");
                        let location = location.expect("a 202 names its receipt");
                        receipts.push((side, location));
                    }
                }
                receipts
            })
        })
        .collect();
    let mut receipts = Vec::new();
    for client in clients {
        receipts.extend(client.await.unwrap());
    }
    let total = KEYS * PER_KEY as usize;
    assert_eq!(receipts.len(), total);
    // Receipts are shared: one accepted by a replica is read on the other.
    let (side, location) = &receipts[0];
    let other = replicas[1 - side];
    let queued: serde_json::Value = serde_json::from_slice(&get(other, location).await.body)
        .expect("a receipt is JSON on the other replica");
    assert!(
        queued["state"] == "queued" || queued["state"] == "delivering",
        "{queued}"
    );

    let applied = deduping_backend(backend_port, Duration::ZERO);
    drained(&applied, "every write reaches the backend", |a| {
        a.seen.len() == total
    })
    .await;
    {
        let state = applied.lock().unwrap();
        state.assert_in_order();
        assert_eq!(state.per_key.len(), KEYS);
        assert_eq!(state.deliveries, total, "no write was delivered twice");
    }
    for (side, location) in receipts.iter().step_by(97) {
        let json: serde_json::Value =
            serde_json::from_slice(&get(replicas[1 - side], location).await.body).unwrap();
        assert_eq!(json["state"], "delivered", "{json}");
        assert_eq!(json["status"], 201);
    }
}

/// Writers for `keys` keys sending `key:n` in order to `addr` until `stop`, recording what was
/// answered 202; a writer whose replica dies stops.
fn writers(
    addr: SocketAddr,
    keys: std::ops::Range<usize>,
    next: &Arc<Vec<AtomicU64>>,
    accepted: &Arc<Mutex<Vec<(String, u64)>>>,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    keys.map(|k| {
        let (next, accepted, stop) = (Arc::clone(next), Arc::clone(accepted), Arc::clone(stop));
        tokio::spawn(async move {
            let mut client = None;
            let key = format!("k{k}");
            while !stop.load(Ordering::SeqCst) {
                let n = next[k].fetch_add(1, Ordering::SeqCst);
                match try_write(&mut client, addr, &key, n).await {
                    Some((StatusCode::ACCEPTED, _)) => {
                        accepted.lock().unwrap().push((key.clone(), n));
                    }
                    // Not taken (the broker is away): the write was refused, the next one goes.
                    Some((StatusCode::SERVICE_UNAVAILABLE, _)) => {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Some((status, _)) => panic!("{key}:{n} answered {status}"),
                    None => return,
                }
            }
        })
    })
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_mid_delivery_hands_its_partitions_over() {
    let _serial = SERIAL.lock().await;
    const KEYS: usize = 40;
    const CONCURRENCY: usize = 4;
    let Some((broker, redis)) = servers("a_replica_killed_mid_delivery_hands_its_partitions_over")
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let backend_port = reserve_port();
    let backend = backend_port.addr;
    // A slow backend and few deliveries at once: the queues hold writes when the kill comes.
    let applied = deduping_backend(backend_port, Duration::from_millis(3));
    let extra = format!("concurrency = {CONCURRENCY}");
    let first = Writegate::start(&replica_config(
        dir.path(),
        "a",
        backend,
        &broker,
        &redis,
        &extra,
    ));
    let accepted = Arc::new(Mutex::new(Vec::new()));
    let next: Arc<Vec<AtomicU64>> = Arc::new((0..KEYS).map(|_| AtomicU64::new(0)).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = writers(first.addr, 0..KEYS / 2, &next, &accepted, &stop);
    // The first replica delivers before the second subscribes: it is every partition's single
    // active consumer, and the second one waits.
    eventually_within(WAIT, "the first replica delivers", || {
        applied.lock().unwrap().seen.len() >= 50
    })
    .await;
    let second = Writegate::start(&replica_config(
        dir.path(),
        "b",
        backend,
        &broker,
        &redis,
        &extra,
    ));
    tasks.extend(writers(
        second.addr,
        KEYS / 2..KEYS,
        &next,
        &accepted,
        &stop,
    ));
    eventually_within(WAIT, "both replicas take writes", || {
        accepted.lock().unwrap().len() >= 600
    })
    .await;
    let backlog = accepted.lock().unwrap().len() - applied.lock().unwrap().seen.len();
    first.kill_9();
    eprintln!("killed the delivering replica with {backlog} writes still queued");
    assert!(backlog > 0, "the kill came with writes still queued");
    // The second replica goes on taking writes for every key.
    let later = accepted.lock().unwrap().len() + 300;
    let more = writers(second.addr, 0..KEYS / 2, &next, &accepted, &stop);
    eventually_within(WAIT, "the second replica takes more writes", || {
        accepted.lock().unwrap().len() >= later
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    for task in tasks.into_iter().chain(more) {
        bounded("writers stop", task).await.unwrap();
    }

    let accepted = accepted.lock().unwrap().clone();
    drained(&applied, "every write answered 202 is delivered", |a| {
        accepted.iter().all(|(key, n)| a.contains(key, *n))
    })
    .await;
    let state = applied.lock().unwrap();
    state.assert_in_order();
    let applied_count: usize = state.per_key.values().map(Vec::len).sum();
    let repeated = state.deliveries - applied_count;
    eprintln!("{} accepted, {repeated} delivered twice", accepted.len());
    assert!(
        repeated <= CONCURRENCY,
        "{repeated} repeats: at most the deliveries in flight at the kill"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_keeps_every_confirmed_write() {
    let test = "a_broker_restart_keeps_every_confirmed_write";
    let Some((refused, during_outage)) = through_a_broker_restart(test, false).await else {
        return;
    };
    assert!(refused > 0, "writes were refused while the broker was away");
    assert_eq!(
        during_outage, 0,
        "no write was answered 202 without the broker"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_local_fallback_writes_are_taken_while_the_broker_is_away() {
    let test = "with_a_local_fallback_writes_are_taken_while_the_broker_is_away";
    let Some((refused, during_outage)) = through_a_broker_restart(test, true).await else {
        return;
    };
    assert!(
        during_outage > 0,
        "writes were taken while the broker was away"
    );
    // Only writes whose publish was under way when the broker stopped may be refused.
    assert!(refused <= 20, "{refused} writes refused");
}

/// Writers on 20 keys through one replica while its broker stops and starts again; every write
/// answered 202 must be delivered, and in each key's order. Returns how many writes were refused
/// and how many were answered 202 while the broker was stopped.
async fn through_a_broker_restart(test: &str, fallback: bool) -> Option<(u64, usize)> {
    let _serial = SERIAL.lock().await;
    const KEYS: usize = 20;
    let (mut broker, redis) = servers(test)?;
    let dir = tempfile::tempdir().unwrap();
    let backend_port = reserve_port();
    let backend = backend_port.addr;
    let applied = deduping_backend(backend_port, Duration::from_millis(1));
    let extra = if fallback {
        let spool = dir.path().join("spool");
        std::fs::create_dir_all(&spool).unwrap();
        format!(
            "fallback = \"local\"\nfallback_dir = \"{}\"",
            spool.display()
        )
    } else {
        String::new()
    };
    let config = replica_config(dir.path(), "a", backend, &broker, &redis, &extra);
    let proxy = Writegate::start(&config);
    let accepted = Arc::new(Mutex::new(Vec::new()));
    let next: Arc<Vec<AtomicU64>> = Arc::new((0..KEYS).map(|_| AtomicU64::new(0)).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = writers(proxy.addr, 0..KEYS, &next, &accepted, &stop);

    eventually_within(WAIT, "writes are accepted", || {
        accepted.lock().unwrap().len() >= 200
    })
    .await;
    broker = tokio::task::spawn_blocking(move || {
        broker.stop();
        broker
    })
    .await
    .unwrap();
    let stopped = accepted.lock().unwrap().len();
    // Writers keep going for a second with the broker away.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let during_outage = accepted.lock().unwrap().len() - stopped;
    let _broker = tokio::task::spawn_blocking(move || {
        broker.start();
        broker
    })
    .await
    .unwrap();
    let restarted = accepted.lock().unwrap().len();
    // The proxy reconnects with backoff (at most 5 s between attempts) once the broker is up.
    let again = "writes are accepted again after the restart";
    eventually_within(Duration::from_secs(60), again, || {
        accepted.lock().unwrap().len() >= restarted + 200
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    for task in tasks {
        bounded("writers stop", task).await.unwrap();
    }
    let refused: u64 = next.iter().map(|n| n.load(Ordering::SeqCst)).sum::<u64>()
        - accepted.lock().unwrap().len() as u64;
    eprintln!("{refused} writes refused (503); {during_outage} taken while the broker was away");

    let accepted = accepted.lock().unwrap().clone();
    let waited = tokio::time::timeout(DRAIN, async {
        while !accepted
            .iter()
            .all(|(key, n)| applied.lock().unwrap().contains(key, *n))
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    if waited.is_err() {
        let state = applied.lock().unwrap();
        let missing: Vec<_> = accepted
            .iter()
            .filter(|(k, n)| !state.contains(k, *n))
            .take(20)
            .collect();
        panic!("not delivered within {DRAIN:?}: {missing:?}");
    }
    let state = applied.lock().unwrap();
    let late: usize = state.per_key.values().map(Vec::len).sum::<usize>() - accepted.len();
    eprintln!("{late} writes refused with 503 were applied all the same");
    state.assert_accepted_in_order(&accepted);
    Some((refused, during_outage))
}

#[test]
fn a_broker_without_the_plugin_stops_the_start_with_a_clear_message() {
    let _serial = SERIAL.blocking_lock();
    let test = "a_broker_without_the_plugin_stops_the_start_with_a_clear_message";
    let Some(redis) = start_redis(test) else {
        return;
    };
    let Some(broker) = start_rabbitmq_with(test, "[].\n") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let backend = reserve_port().addr;
    let config = replica_config(dir.path(), "a", backend, &broker, &redis, "");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_writegate"))
        .args(["run", "--config"])
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("writegate kept running with a broker that lacks the plugin");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains("rabbitmq-plugins enable rabbitmq_consistent_hash_exchange"),
        "{stderr}"
    );
}
