//! Prometheus metrics after real traffic: names, labels and values move as they should.

mod support;

use std::time::Duration;

use http::Method;
use support::*;

/// The value of the sample `series` (name with labels, exactly as rendered), 0 when absent.
fn sample(scrape: &str, series: &str) -> f64 {
    scrape
        .lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

#[tokio::test]
async fn traffic_moves_the_documented_metrics() {
    writegate::metrics::install();
    let b = named_backend("b", Duration::ZERO).await;
    let dead = refused_addr().await;
    let config = simple_config(&[(b.addr, 1)], "path_prefix = \"/kv/\"")
        .replace("name = \"r\"", "name = \"metered\"")
        .replace("name = \"up\"", "name = \"mup\"")
        .replace("upstream = \"up\"", "upstream = \"mup\"")
        + &format!(
            "\n[[upstreams]]\nname = \"gone\"\nbackends = [{{ address = \"{dead}\" }}]\n\n[[routes]]\nname = \"broken\"\npath_prefix = \"/broken/\"\nupstream = \"gone\"\n"
        );
    let proxy = start_proxy(&config).await;
    let mut client = Client::connect(proxy.addr).await;
    for _ in 0..3 {
        assert_eq!(
            client
                .send(req(Method::PUT, "/kv/secret-path-1", b"v"))
                .await
                .status,
            200
        );
    }
    assert_eq!(
        client.send(req(Method::GET, "/kv/x", b"")).await.status,
        200
    );
    assert_eq!(
        client.send(req(Method::GET, "/nowhere", b"")).await.status,
        404
    );
    assert_eq!(
        send(proxy.addr, req(Method::POST, "/broken/x", b"v"))
            .await
            .status,
        502
    );
    let scrape = get(proxy.admin.unwrap(), "/metrics").await.text();
    let backend = b.addr.to_string();
    let expect = |series: String, value: f64| {
        assert_eq!(sample(&scrape, &series), value, "{series} in\n{scrape}");
    };
    expect(
        r#"writegate_requests_total{route="metered",method="PUT",status_class="2xx"}"#.into(),
        3.0,
    );
    expect(
        r#"writegate_requests_total{route="metered",method="GET",status_class="2xx"}"#.into(),
        1.0,
    );
    expect(
        r#"writegate_requests_total{route="-",method="GET",status_class="4xx"}"#.into(),
        1.0,
    );
    expect(
        r#"writegate_requests_total{route="broken",method="POST",status_class="5xx"}"#.into(),
        1.0,
    );
    expect(
        r#"writegate_request_duration_seconds_count{route="metered"}"#.into(),
        4.0,
    );
    expect(
        format!(
            r#"writegate_upstream_requests_total{{upstream="mup",backend="{backend}",status_class="2xx"}}"#
        ),
        4.0,
    );
    expect(
        format!(
            r#"writegate_upstream_response_seconds_count{{upstream="mup",backend="{backend}"}}"#
        ),
        4.0,
    );
    expect(
        format!(
            r#"writegate_upstream_requests_total{{upstream="gone",backend="{dead}",status_class="error"}}"#
        ),
        1.0,
    );
    expect(
        format!(r#"writegate_backend_inflight{{upstream="mup",backend="{backend}"}}"#),
        0.0,
    );
    expect(
        format!(r#"writegate_backend_picks_total{{upstream="mup",backend="{backend}"}}"#),
        4.0,
    );
    assert!(
        scrape.contains(r#"writegate_request_duration_seconds_bucket{route="metered",le="0.005"}"#),
        "explicit buckets"
    );
    assert!(
        scrape.contains("# HELP writegate_requests_total"),
        "described"
    );
    assert!(!scrape.contains("secret-path"), "paths never become labels");
    assert!(
        !scrape.contains("127.0.0.1\",method"),
        "client addresses never become labels"
    );
    proxy.shutdown().await;
}

/// The health gauge, `/status` and the balancer read one live state across reloads: an unrelated
/// reload does not make a failing backend look healthy. A backend removed from the config leaves
/// the scrape.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_gauges_follow_live_state_across_reloads_and_leave_with_their_backend() {
    writegate::metrics::install();
    let good = named_backend("good", Duration::ZERO).await;
    let sick = status_backend(http::StatusCode::SERVICE_UNAVAILABLE).await;
    let config = |backends: &[std::net::SocketAddr], route_extra: &str| {
        simple_config(
            &backends.iter().map(|a| (*a, 1)).collect::<Vec<_>>(),
            route_extra,
        )
        .replace("name = \"up\"", "name = \"hup\"")
        .replace("upstream = \"up\"", "upstream = \"hup\"")
        .replace(
            "[[routes]]",
            "[upstreams.health_check]\npath = \"/health\"\ninterval = \"50ms\"\nunhealthy_threshold = 1\n\n[[routes]]",
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("writegate.toml");
    std::fs::write(&path, config(&[good.addr, sick.addr], "")).unwrap();
    let (proxy, state) = start_reloading_proxy(&path).await;
    let admin = proxy.admin.unwrap();
    let healthy = |addr: std::net::SocketAddr| {
        format!("writegate_backend_healthy{{upstream=\"hup\",backend=\"{addr}\"}}")
    };
    let scrape = || async { get(admin, "/metrics").await.text() };
    let sick_series = healthy(sick.addr);
    bounded("the sick backend's gauge to fall", async {
        while !scrape().await.contains(&format!("{sick_series} 0")) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    std::fs::write(
        &path,
        config(&[good.addr, sick.addr], "max_body = \"1KiB\""),
    )
    .unwrap();
    eventually("the unrelated reload", || state.status().succeeded >= 1).await;
    let text = scrape().await;
    assert_eq!(sample(&text, &sick_series), 0.0, "{text}");
    assert!(text.contains(&format!("{sick_series} 0")), "{text}");
    assert_eq!(sample(&text, &healthy(good.addr)), 1.0, "{text}");
    std::fs::write(&path, config(&[good.addr], "max_body = \"1KiB\"")).unwrap();
    eventually("the removing reload", || state.status().succeeded >= 2).await;
    let text = scrape().await;
    assert!(
        !text.contains(&sick.addr.to_string()),
        "a removed backend leaves the scrape: {text}"
    );
    assert_eq!(sample(&text, &healthy(good.addr)), 1.0, "{text}");
    proxy.shutdown().await;
}

/// Every family in a scrape says what it is (`# HELP`), and the build and process families are
/// there.
#[tokio::test]
async fn every_family_has_help_and_process_metrics_are_there() {
    writegate::metrics::install();
    let b = named_backend("b", Duration::ZERO).await;
    let proxy = start_proxy(&simple_config(&[(b.addr, 1)], "")).await;
    assert_eq!(get(proxy.addr, "/").await.status, 200);
    let scrape = get(proxy.admin.unwrap(), "/metrics").await.text();
    let helped: std::collections::HashSet<&str> = scrape
        .lines()
        .filter_map(|l| l.strip_prefix("# HELP ")?.split(' ').next())
        .collect();
    for line in scrape
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let name = line.split(['{', ' ']).next().unwrap_or_default();
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix).filter(|f| helped.contains(f)))
            .unwrap_or(name);
        assert!(helped.contains(family), "{family} has no # HELP:\n{scrape}");
    }
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        sample(
            &scrape,
            &format!("writegate_build_info{{version=\"{version}\"}}")
        ),
        1.0
    );
    assert!(
        sample(&scrape, "process_resident_memory_bytes") > 1e6,
        "{scrape}"
    );
    assert!(sample(&scrape, "process_open_fds") >= 3.0, "{scrape}");
    assert!(
        sample(&scrape, "process_start_time_seconds") > 1.6e9,
        "{scrape}"
    );
    assert!(scrape.contains("# TYPE process_cpu_seconds_total counter"));
    proxy.shutdown().await;
}
