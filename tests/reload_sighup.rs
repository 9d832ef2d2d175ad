//! SIGHUP reloads. A test binary of its own: the signal goes to the whole test process, and would
//! make every other reloading proxy in it reload too.

mod support;

use std::time::{Duration, Instant};

use support::*;

fn config_text(backend: std::net::SocketAddr) -> String {
    format!(
        "[log]\naccess_log = false\n\n[[listeners]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\n\n\
         [[upstreams]]\nname = \"writers\"\nbackends = [{{ address = \"{backend}\" }}]\n\n\
         [[routes]]\nname = \"kv\"\nupstream = \"writers\"\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads() {
    // Our own SIGHUP handler first, so the signal can never reach a process without one.
    let mut hangups =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).unwrap();
    let a = named_backend("a", Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("writegate.toml");
    std::fs::write(&path, config_text(a.addr)).unwrap();
    let (proxy, state) = start_reloading_proxy(&path).await;
    // Give the reloader time to register its handler, then signal until it has reloaded.
    let before = state.status().succeeded;
    let deadline = Instant::now() + STEP;
    while state.status().succeeded == before {
        assert!(Instant::now() < deadline, "SIGHUP did not cause a reload");
        std::process::Command::new("kill")
            .args(["-HUP", &std::process::id().to_string()])
            .status()
            .unwrap();
        bounded("our own SIGHUP", hangups.recv()).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(state.status().last_changes.as_deref(), Some("no changes"));
    proxy.shutdown().await;
}
