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
