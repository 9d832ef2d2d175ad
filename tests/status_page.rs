//! The admin status page in a real browser: headless Chromium renders it against a running proxy,
//! and the DOM it builds must show each backend with its state. A screenshot is left in
//! `target/tmp/status_page.png` for a person to look at.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

/// Chromium, if installed; without it the test says so in one line and passes, unless
/// `WRITEGATE_EXTERNAL_TESTS=require` (as in CI) makes that a failure.
fn chromium() -> Option<PathBuf> {
    let found = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists());
    if found.is_none() {
        let required = std::env::var("WRITEGATE_EXTERNAL_TESTS").is_ok_and(|v| v == "require");
        assert!(
            !required,
            "chromium is required here: apt-get install chromium"
        );
        println!("skipped status_page tests: chromium is not installed (apt-get install chromium)");
    }
    found
}

/// Runs headless Chromium with `args` on `url`; its standard output, within 60 s.
fn run_chromium(binary: &Path, profile: &Path, args: &[&str], url: &str) -> String {
    let mut child = Command::new(binary)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromium");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if child.try_wait().expect("chromium status").is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish within 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut out = String::new();
    if let Some(mut stdout) = child.stdout.take() {
        use std::io::Read;
        let _ = stdout.read_to_string(&mut out);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_backends_and_their_states() {
    let Some(binary) = chromium() else { return };
    let good = named_backend("good", Duration::ZERO).await;
    let spare = named_backend("spare", Duration::ZERO).await;
    let config = simple_config(&[(good.addr, 1)], "").replace(
        &format!("backends = [{{ address = \"{}\", weight = 1 }}]", good.addr),
        &format!(
            "backends = [{{ address = \"{}\", weight = 1 }}, {{ address = \"{}\", down = true }}]",
            good.addr, spare.addr
        ),
    );
    let proxy = start_proxy(&config).await;
    for _ in 0..3 {
        assert_eq!(get(proxy.addr, "/w").await.status, 200);
    }
    let admin = proxy.admin.expect("an admin listener");
    let url = format!("http://{admin}/");
    let page = get(admin, "/").await;
    assert_eq!(page.headers["content-type"], "text/html; charset=utf-8");
    let profile = tempfile::tempdir().unwrap();
    let screenshot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("status_page.png");
    let (dom, shot) = tokio::task::spawn_blocking({
        let (binary, profile, screenshot) = (
            binary.clone(),
            profile.path().to_path_buf(),
            screenshot.clone(),
        );
        move || {
            let dom = run_chromium(
                &binary,
                &profile,
                &["--virtual-time-budget=3000", "--dump-dom"],
                &url,
            );
            let shot = format!("--screenshot={}", screenshot.display());
            run_chromium(
                &binary,
                &profile,
                &[
                    "--virtual-time-budget=3000",
                    "--window-size=1100,900",
                    &shot,
                ],
                &url,
            );
            (dom, screenshot)
        }
    })
    .await
    .unwrap();
    let healthy = format!("data-backend=\"{}\" data-state=\"healthy\"", good.addr);
    let down = format!(
        "data-backend=\"{}\" data-state=\"down (config)\"",
        spare.addr
    );
    assert!(
        dom.contains(&healthy),
        "no healthy row for {}:\n{dom}",
        good.addr
    );
    assert!(
        dom.contains(&down),
        "no down row for {}:\n{dom}",
        spare.addr
    );
    assert!(dom.contains("data-reload=\"ok\""), "{dom}");
    assert!(dom.contains("data-route=\"r\""), "{dom}");
    assert!(dom.contains("<th>p99</th>"), "{dom}");
    // Trouble first: the down backend's row comes before the healthy one.
    assert!(dom.find(&down) < dom.find(&healthy), "{dom}");
    let png = std::fs::metadata(&shot).map(|m| m.len()).unwrap_or(0);
    assert!(png > 1000, "no screenshot at {}", shot.display());
    proxy.shutdown().await;
}
