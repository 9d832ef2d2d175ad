//! Fitting into systemd: readiness notifications from the real binary, and the unit's hardening.

mod support;

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};

use support::STEP;

fn kill(signal: &str, pid: u32) {
    let status = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn readiness_reload_and_stop_are_notified() {
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(STEP)).unwrap();
    let config = dir.path().join("w.toml");
    std::fs::write(
        &config,
        "[[listeners]]\nname = \"h\"\nlisten = \"127.0.0.1:0\"\n\n[[upstreams]]\nname = \"u\"\nbackends = [{ address = \"127.0.0.1:9\" }]\n\n[[routes]]\nname = \"r\"\nupstream = \"u\"\n",
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_writegate"))
        .args(["run", "--config", config.to_str().unwrap()])
        .env("NOTIFY_SOCKET", &socket_path)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 512];
    let mut next = || {
        let n = socket
            .recv(&mut buf)
            .expect("a notification within the step timeout");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    assert!(next().starts_with("READY=1"), "ready once listening");
    kill("-HUP", child.id());
    assert_eq!(next(), "RELOADING=1");
    assert_eq!(next(), "READY=1");
    kill("-TERM", child.id());
    assert_eq!(next(), "STOPPING=1");
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    let log: Vec<String> = BufReader::new(child.stderr.take().unwrap())
        .lines()
        .map_while(Result::ok)
        .collect();
    assert!(log.iter().any(|l| l.contains("config reloaded")), "{log:?}");
}

#[test]
fn the_unit_is_hardened() {
    let unit = concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/writegate.service");
    let text = std::fs::read_to_string(unit).unwrap();
    for line in [
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "User=writegate",
    ] {
        assert!(text.lines().any(|l| l == line), "the unit needs {line}");
    }
    // The documentation it names is where README's install steps put it.
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    assert!(text.contains("Documentation=file:///usr/share/doc/writegate/README.md"));
    assert!(readme.contains("install -D -m 0644 README.md /usr/share/doc/writegate/README.md"));
    // `systemctl reload` checks the file first, so that a bad edit fails the command.
    let reloads: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("ExecReload="))
        .collect();
    assert_eq!(
        reloads,
        [
            "ExecReload=/usr/local/bin/writegate check --config /etc/writegate/writegate.toml",
            "ExecReload=/bin/kill -HUP $MAINPID"
        ]
    );
    let Ok(output) = Command::new("systemd-analyze")
        .args(["security", "--offline=true", unit])
        .output()
    else {
        println!("skipped the exposure rating: systemd-analyze is not installed here");
        return;
    };
    let report = String::from_utf8_lossy(&output.stdout);
    let rating: f64 = report
        .lines()
        .find_map(|l| {
            l.split("writegate.service: ")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no overall rating in:\n{report}"));
    assert!(rating <= 1.5, "exposure {rating} is above 1.5:\n{report}");
}

#[tokio::test]
async fn status_shows_upstreams_backends_and_routes() {
    let b = support::named_backend("b", std::time::Duration::ZERO).await;
    let config = support::simple_config(
        &[(b.addr, 2)],
        "key = \"path\"\n\n[routes.coalesce]\nmode = \"dedupe\"\n\n[routes.admission]\nmax_inflight = 7",
    );
    let proxy = support::start_proxy(&config).await;
    assert_eq!(support::get(proxy.addr, "/x").await.status, 200);
    let text = support::get(proxy.admin.unwrap(), "/status").await.text();
    let status: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(status["ready"], true);
    assert!(status["version"]
        .as_str()
        .unwrap()
        .starts_with(env!("CARGO_PKG_VERSION")));
    let backend = &status["upstreams"][0]["backends"][0];
    assert_eq!(backend["address"], b.addr.to_string());
    assert_eq!(backend["weight"], 2);
    assert_eq!(backend["inflight"], 0);
    assert_eq!(backend["usable"], true);
    assert_eq!(
        (backend["requests"].as_u64(), backend["errors"].as_u64()),
        (Some(1), Some(0))
    );
    assert!(backend["last_state_change"].is_null(), "never changed");
    assert_eq!(status["upstreams"][0]["ready"], true);
    // Counted from the process's start, not from the first look at /status.
    let uptime = status["uptime_seconds"].as_f64().unwrap();
    let start = writegate::metrics::process_start_time().expect("/proc tells the start");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        (uptime - (now - start)).abs() < 1.0,
        "{uptime} vs {}",
        now - start
    );
    assert_eq!(status["upstreams"][0]["balance"], "least_conn");
    let route = &status["routes"][0];
    assert_eq!(route["name"], "r");
    assert_eq!(route["key"], "the path");
    assert_eq!(route["coalesce"]["mode"], "dedupe");
    assert_eq!(route["coalesce"]["active_keys"], 0);
    assert_eq!(route["admission"]["limit"], 7);
    assert_eq!(route["admission"]["shed"], 0);
    assert_eq!(
        route["coalesce"]["writes"]["sent"], 0,
        "a read is not a write"
    );
    let answered: u64 = route["latency"]["counts"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(serde_json::Value::as_u64)
        .sum();
    assert_eq!(answered, 1, "one request in the latency buckets");
    assert_eq!(route["requests"], 1);
    assert_eq!(route["admission"]["inflight"], 0);
    proxy.shutdown().await;
}
