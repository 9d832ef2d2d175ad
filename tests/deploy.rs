//! The shipped alert rules and dashboard: promtool accepts the rules, and every metric they name
//! is in the scrape of a running proxy (one that has checked health, coalesced, shed and
//! reloaded, so that each family has series).

mod support;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use http::Method;
use support::*;

const RULES: &str = "deploy/prometheus/alerts.yml";
const DASHBOARD: &str = "deploy/grafana/writegate.json";

fn repo_file(relative: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// promtool, if installed; without it the rules test says so in one line and passes, unless
/// `WRITEGATE_EXTERNAL_TESTS=require` (as in CI) makes that a failure.
fn promtool() -> Option<&'static str> {
    if Path::new("/usr/bin/promtool").exists() {
        return Some("/usr/bin/promtool");
    }
    let required = std::env::var("WRITEGATE_EXTERNAL_TESTS").is_ok_and(|v| v == "require");
    assert!(
        !required,
        "promtool is required here: apt-get install prometheus"
    );
    println!(
        "skipped alert_rules_pass_promtool: promtool is not installed (apt-get install prometheus)"
    );
    None
}

#[test]
fn alert_rules_pass_promtool() {
    let Some(promtool) = promtool() else { return };
    let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join(RULES);
    let out = std::process::Command::new(promtool)
        .args(["check", "rules"])
        .arg(&rules)
        .output()
        .expect("run promtool");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_dashboard_is_valid_json_with_panels() {
    let dashboard: serde_json::Value = serde_json::from_str(&repo_file(DASHBOARD)).unwrap();
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 8);
    for panel in panels {
        assert!(
            panel["targets"].as_array().is_some_and(|t| !t.is_empty()),
            "{panel}"
        );
    }
}

/// Every `writegate_*` name in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (at, _) in text.match_indices("writegate_") {
        let name: String = text[at..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || *c == '_')
            .collect();
        names.insert(name);
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_in_the_rules_and_dashboard_is_scraped() {
    writegate::metrics::install();
    let kv = named_backend("kv", Duration::ZERO).await;
    let gate = Gate::default();
    let slow = gated_backend(&gate).await;
    let config = |extra: &str| {
        format!(
            r#"
[log]
access_log = false

[admin]
listen = "127.0.0.1:0"

[[listeners]]
name = "l"
listen = "127.0.0.1:0"

[[upstreams]]
name = "dkv"
backends = [{{ address = "{kv}" }}]

[upstreams.health_check]
path = "/health"
interval = "50ms"

[[upstreams]]
name = "dslow"
backends = [{{ address = "{slow}" }}]

# Backends from a name no server answers for, beside a static one: lookups fail.
[[upstreams]]
name = "ddns"
backends = [{{ address = "{kv}" }}]
discovery = {{ dns = "writers.invalid:80", resolvers = ["127.0.0.1:9"], timeout = "200ms" }}

[[routes]]
name = "dwrites"
upstream = "dkv"
path_prefix = "/kv/"
key = "path"
coalesce = {{ mode = "serialize" }}
{extra}

[[routes]]
name = "dshed"
upstream = "dslow"
path_prefix = "/slow/"
admission = {{ max_inflight = 1, max_queue = 0 }}

# A cluster whose only other peer is gone: coalesced writes are ordered here, and counted.
[cluster]
peers = ["127.0.0.1:9"]
secret = "deploy-test-secret-0123456789abcdef"
"#,
            kv = kv.addr,
            slow = slow.addr
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("writegate.toml");
    std::fs::write(&path, config("")).unwrap();
    let (proxy, state) = start_reloading_proxy(&path).await;
    assert_eq!(
        send(proxy.addr, req(Method::PUT, "/kv/a", b"v"))
            .await
            .status,
        200
    );
    let held = tokio::spawn({
        let addr = proxy.addr;
        async move { send(addr, req(Method::PUT, "/slow/x", b"v")).await }
    });
    gate.entered().await;
    let shed = send(proxy.addr, req(Method::PUT, "/slow/y", b"v")).await;
    assert_eq!(shed.status, 503, "{}", shed.text());
    gate.release(1);
    assert_eq!(bounded("the held write", held).await.unwrap().status, 200);
    std::fs::write(&path, config("max_body = \"1KiB\"")).unwrap();
    eventually("the reload", || state.status().succeeded >= 1).await;
    let scrape = get(proxy.admin.unwrap(), "/metrics").await.text();
    let scraped = metric_names(&scrape);
    let mut missing = Vec::new();
    for file in [RULES, DASHBOARD] {
        for name in metric_names(&repo_file(file)) {
            if !scraped.contains(&name) {
                missing.push(format!("{file}: {name}"));
            }
        }
    }
    assert!(missing.is_empty(), "not in /metrics: {missing:?}\n{scrape}");
    proxy.shutdown().await;
}
