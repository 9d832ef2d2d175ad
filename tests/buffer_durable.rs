//! Durable write buffering across real processes and a real disk: an outage of the backend, a
//! writegate killed with `kill -9` while accepting and delivering, and a full disk.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::StatusCode;
use support::processes::Writegate;
use support::writes::*;
use support::*;

/// A writegate config buffering into `dir/log` with `buffer` lines.
fn write_config(dir: &Path, backend: SocketAddr, buffer: &str) -> PathBuf {
    let path = dir.join("writegate.toml");
    let log = format!("dir = \"{}\"\n{buffer}", dir.join("log").display());
    let text = buffered_config(backend, &log);
    std::fs::create_dir_all(dir.join("log")).unwrap();
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_taken_during_an_outage_are_delivered_once_in_key_order() {
    const KEYS: usize = 1_000;
    const PER_KEY: u64 = 10;
    const CLIENTS: usize = 50;
    let dir = tempfile::tempdir().unwrap();
    let backend_port = reserve_port();
    let config = write_config(dir.path(), backend_port.addr, "");
    let writegate = Writegate::start(&config);
    let addr = writegate.addr;

    // Each client owns KEYS / CLIENTS keys and writes each of them PER_KEY times, in order.
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            tokio::spawn(async move {
                let mut client = None;
                let mut receipts = Vec::new();
                for n in 0..PER_KEY {
                    for k in (c..KEYS).step_by(CLIENTS) {
                        let key = format!("k{k}");
                        let (status, location) = try_write(&mut client, addr, &key, n)
                            .await
                            .unwrap_or_else(|| panic!("no answer for {key}:{n}"));
                        assert_eq!(status, StatusCode::ACCEPTED, "{key}:{n}");
                        receipts.push(location.expect("a 202 names its receipt"));
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
    assert_eq!(receipts.len(), KEYS * PER_KEY as usize);
    let pending: serde_json::Value =
        serde_json::from_slice(&get(addr, &receipts[0]).await.body).unwrap();
    assert!(
        pending["state"] == "queued" || pending["state"] == "delivering",
        "{pending}"
    );

    let applied = deduping_backend(backend_port, Duration::ZERO);
    let total = KEYS * PER_KEY as usize;
    drained(&applied, "every buffered write reaches the backend", |a| {
        a.seen.len() == total
    })
    .await;
    {
        let state = applied.lock().unwrap();
        state.assert_in_order();
        assert_eq!(state.per_key.len(), KEYS);
        assert_eq!(state.deliveries, total, "no write was delivered twice");
    }
    for location in receipts.iter().step_by(97) {
        let json: serde_json::Value =
            serde_json::from_slice(&get(addr, location).await.body).unwrap();
        assert_eq!(json["state"], "delivered", "{json}");
        assert_eq!(json["status"], 201);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_write_answered_202_survives_kill_9_in_order() {
    const ROUNDS: u64 = 4;
    const KEYS: usize = 40;
    let dir = tempfile::tempdir().unwrap();
    let backend_port = reserve_port();
    let backend_addr = backend_port.addr;
    // A slow backend, few deliveries at once: the log holds writes whenever writegate dies.
    let applied = deduping_backend(backend_port, Duration::from_millis(3));
    let config = write_config(dir.path(), backend_addr, "concurrency = 4");
    let accepted = Arc::new(Mutex::new(Vec::<(String, u64)>::new()));
    let next: Arc<Vec<std::sync::atomic::AtomicU64>> =
        Arc::new((0..KEYS).map(|_| Default::default()).collect());

    let mut backlogs = Vec::new();
    for round in 0..ROUNDS {
        let writegate = Writegate::start(&config);
        let addr = writegate.addr;
        let writers: Vec<_> = (0..KEYS)
            .map(|k| {
                let (accepted, next) = (Arc::clone(&accepted), Arc::clone(&next));
                tokio::spawn(async move {
                    let mut client = None;
                    let key = format!("k{k}");
                    loop {
                        let n = next[k].fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        match try_write(&mut client, addr, &key, n).await {
                            Some((StatusCode::ACCEPTED, _)) => {
                                accepted.lock().unwrap().push((key.clone(), n));
                            }
                            Some((status, _)) => panic!("{key}:{n} answered {status}"),
                            // Killed: this write's fate is unknown; the next round goes on.
                            None => return,
                        }
                    }
                })
            })
            .collect();
        // Let it accept and deliver for a while, then kill it mid-stride.
        let taken = accepted.lock().unwrap().len();
        eventually(&format!("round {round} accepts writes"), || {
            accepted.lock().unwrap().len() >= taken + 300
        })
        .await;
        let taken = accepted.lock().unwrap().len();
        let delivered = applied.lock().unwrap().seen.len();
        backlogs.push(taken.saturating_sub(delivered));

        writegate.kill_9();
        for writer in writers {
            bounded("writers notice the kill", writer).await.unwrap();
        }
    }

    assert!(
        backlogs.iter().any(|&b| b > 0),
        "writegate was killed with writes still to deliver at least once: {backlogs:?}"
    );
    eprintln!("backlog at each kill: {backlogs:?}");
    let accepted = accepted.lock().unwrap().clone();
    let _last = Writegate::start(&config);
    drained(&applied, "every write answered 202 is delivered", |a| {
        accepted.iter().all(|(key, n)| a.contains(key, *n))
    })
    .await;
    let state = applied.lock().unwrap();
    state.assert_in_order();
    let applied_count: usize = state.per_key.values().map(Vec::len).sum();
    assert!(applied_count >= accepted.len());
    // A write applied just before a kill may be delivered again (and deduped): at most one per
    // delivery in flight per kill.
    let repeated = state.deliveries - applied_count;
    eprintln!(
        "{} accepted, {applied_count} applied, {repeated} repeated",
        accepted.len()
    );
    assert!(
        repeated <= (ROUNDS as usize) * 4,
        "{repeated} repeated deliveries after {ROUNDS} kills"
    );
}

/// A tmpfs of `size` mounted on `path`, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts it, or `None` after one line saying why the test is skipped (a failure when
    /// external tests are required: CI runs as root).
    fn mount(path: &Path, size: &str, test: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(path).unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .status()
            .is_ok_and(|s| s.success());
        if mounted {
            return Some(Tmpfs(path.to_path_buf()));
        }
        assert!(
            !support::processes::external_required(),
            "{test} needs to mount a tmpfs (run as root)"
        );
        println!("skipped {test}: mounting a tmpfs needs root");
        None
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_answers_503_and_what_was_accepted_still_delivers() {
    let dir = tempfile::tempdir().unwrap();
    let test = "a_full_disk_answers_503_and_what_was_accepted_still_delivers";
    let Some(_disk) = Tmpfs::mount(&dir.path().join("log"), "16m", test) else {
        return;
    };
    let backend_port = reserve_port();
    let config = write_config(dir.path(), backend_port.addr, "min_free = \"4MiB\"");
    let writegate = Writegate::start(&config);
    let addr = writegate.addr;

    let padding = "x".repeat(8 << 10);
    let mut client = None;
    let mut accepted = Vec::new();
    let refused = loop {
        let n = accepted.len() as u64;
        assert!(n < 2_000, "16 MiB of disk took {n} writes of 8 KiB");
        let key = format!("k{}", n % 10);
        let reply = try_padded_write(&mut client, addr, &key, n, &padding).await;
        match reply.expect("writegate answers while the disk is full") {
            (StatusCode::ACCEPTED, _) => accepted.push(n),
            (status, _) => break status,
        }
    };
    assert_eq!(refused, StatusCode::SERVICE_UNAVAILABLE);
    assert!(accepted.len() > 10, "only {} writes fit", accepted.len());

    let applied = deduping_backend(backend_port, Duration::ZERO);
    drained(
        &applied,
        "the writes accepted before the disk filled are delivered",
        |a| a.seen.len() >= accepted.len(),
    )
    .await;
    applied.lock().unwrap().assert_in_order();
    // Delivered writes free their space: the log takes writes again.
    let again = try_write(&mut None, addr, "k0", 10_000).await;
    assert_eq!(again.map(|(status, _)| status), Some(StatusCode::ACCEPTED));
}
