//! Config validation: every error kind with its position, the example file, and `writegate check`.

use std::path::Path;
use std::process::Command;

use writegate::config::{
    CoalesceMode, Config, ConfigErrors, HashAlgorithm, DEFAULT_MAX_KEY_LENGTH,
};

fn errors(text: &str) -> ConfigErrors {
    match Config::parse(Path::new("w.toml"), text) {
        Ok(_) => panic!("config should be refused:\n{text}"),
        Err(e) => e,
    }
}

/// Asserts exactly one error, at `line:column`, whose message contains `needle`.
fn assert_one(text: &str, line: usize, column: usize, needle: &str) {
    let all = errors(text);
    assert_eq!(all.0.len(), 1, "expected one error, got:\n{all}");
    let e = &all.0[0];
    assert_eq!((e.line, e.column), (line, column), "position of: {e}");
    assert!(
        e.message.contains(needle),
        "{e:?} should mention {needle:?}"
    );
    assert_eq!(e.to_string().lines().count(), 1, "one line: {e}");
    assert!(
        e.to_string()
            .starts_with(&format!("w.toml:{line}:{column}: ")),
        "{e}"
    );
}

const BASE: &str = r#"[[listeners]]
name = "http"
listen = "127.0.0.1:8080"

[[upstreams]]
name = "up"
backends = [{ address = "127.0.0.1:9001" }]

[[routes]]
name = "r"
upstream = "up"
"#;

fn with(extra: &str) -> String {
    format!("{BASE}{extra}")
}

#[test]
fn base_is_valid() {
    let config = Config::parse(Path::new("w.toml"), BASE).unwrap();
    assert_eq!(config.routes[0].path_prefix, "/");
    assert_eq!(config.upstreams[0].backends[0].weight.get(), 1);
}

#[test]
fn syntax_error() {
    assert_one("[[listeners]\nname = 1", 1, 13, "expected `]`");
}

#[test]
fn unknown_field() {
    assert_one(
        &with("colour = \"blue\"\n"),
        12,
        1,
        "unknown option `colour`",
    );
    let text = BASE.replace("name = \"up\"", "name = \"up\"\nbalanse = \"least_conn\"");
    assert_one(
        &text,
        7,
        1,
        "unknown option `balanse`; did you mean `balance`?",
    );
}

#[test]
fn wrong_type_and_unknown_balance() {
    assert_one(
        &with("max_body = 5\n"),
        12,
        12,
        "`max_body` wants a string in quotes, not integer `5`",
    );
    let text = BASE.replace("name = \"up\"", "name = \"up\"\nbalance = \"random\"");
    assert_one(&text, 7, 11, "`balance` cannot be `random`");
}

#[test]
fn duplicate_names() {
    let text = format!("{BASE}\n[[routes]]\nname = \"r\"\nupstream = \"up\"\n");
    assert_one(&text, 14, 8, "duplicate route name \"r\"");
    let text = format!(
        "{BASE}\n[[upstreams]]\nname = \"up\"\nbackends = [{{ address = \"127.0.0.1:1\" }}]\n"
    );
    assert_one(&text, 14, 8, "duplicate upstream name \"up\"");
    let text = format!("{BASE}\n[[listeners]]\nname = \"http\"\nlisten = \"127.0.0.1:8081\"\n");
    assert_one(&text, 14, 8, "duplicate listener name \"http\"");
}

#[test]
fn route_names_unknown_upstream() {
    let text = BASE.replace("upstream = \"up\"", "upstream = \"nope\"");
    assert_one(&text, 11, 12, "unknown upstream \"nope\" (known: up)");
}

#[test]
fn upstream_without_backends() {
    let text = BASE.replace("[{ address = \"127.0.0.1:9001\" }]", "[]");
    assert_one(&text, 7, 12, "upstream \"up\" has no backends");
}

#[test]
fn bad_addresses() {
    let text = BASE.replace("\"127.0.0.1:9001\"", "\"127.0.0.1\"");
    assert_one(&text, 7, 25, "bad backend address");
    let text = BASE.replace("\"127.0.0.1:9001\"", "\"127.0.0.1:99999\"");
    assert_one(&text, 7, 25, "bad backend address");
    let text = BASE.replace("listen = \"127.0.0.1:8080\"", "listen = \"localhost:http\"");
    assert_one(&text, 3, 10, "bad address \"localhost:http\"");
    let text = BASE.replace("\"127.0.0.1:9001\"", "\"no-such-host.invalid:80\"");
    assert_one(&text, 7, 25, "cannot resolve");
    let text = BASE.replace(
        "[{ address = \"127.0.0.1:9001\" }]",
        "[{ address = \"127.0.0.1:9001\" }, { address = \"127.0.0.1:9001\" }]",
    );
    assert_one(&text, 7, 57, "listed twice");
}

#[test]
fn zero_and_huge_weights() {
    let text = BASE.replace("\"127.0.0.1:9001\" }", "\"127.0.0.1:9001\", weight = 0 }");
    assert_one(&text, 7, 52, "weight 0 is out of range");
    let text = BASE.replace(
        "\"127.0.0.1:9001\" }",
        "\"127.0.0.1:9001\", weight = 1000000 }",
    );
    assert_one(&text, 7, 52, "out of range");
}

#[test]
fn zero_absurd_and_malformed_durations() {
    assert_one(
        &with("timeouts = { connect = \"0s\" }\n"),
        12,
        24,
        "greater than zero",
    );
    assert_one(
        &with("timeouts = { response = \"2h\" }\n"),
        12,
        25,
        "too long",
    );
    assert_one(
        &with("timeouts = { response = \"10\" }\n"),
        12,
        25,
        "no unit",
    );
    assert_one(
        &with("timeouts = { response = \"10 parsecs\" }\n"),
        12,
        25,
        "unknown unit",
    );
    let text = BASE.replace(
        "listen = \"127.0.0.1:8080\"",
        "listen = \"127.0.0.1:8080\"\nidle_timeout = \"0ms\"",
    );
    assert_one(&text, 4, 16, "greater than zero");
}

#[test]
fn bad_sizes_prefixes_hosts_methods() {
    assert_one(&with("max_body = \"8 furlongs\"\n"), 12, 12, "unknown unit");
    assert_one(&with("max_body = \"100GiB\"\n"), 12, 12, "too large");
    assert_one(
        &with("path_prefix = \"kv/\"\n"),
        12,
        15,
        "must start with '/'",
    );
    assert_one(&with("host = \"api.example.com:80\"\n"), 12, 8, "bad host");
    assert_one(
        &with("methods = [\"PUT\", \"G ET\"]\n"),
        12,
        19,
        "bad method",
    );
}

#[test]
fn missing_listeners_and_many_errors_at_once() {
    let text = "[[upstreams]]\nname = \"up\"\nbackends = []\n\n[[routes]]\nname = \"r\"\nupstream = \"x\"\nmax_body = \"lots\"\n";
    let all = errors(text);
    let lines: Vec<String> = all.0.iter().map(ToString::to_string).collect();
    assert_eq!(all.0.len(), 4, "every error is reported:\n{all}");
    assert!(lines[0].contains("no [[listeners]]"), "{lines:?}");
    assert!(
        lines[1].starts_with("w.toml:3:12: upstream \"up\" has no backends"),
        "{lines:?}"
    );
    assert!(
        lines[2].starts_with("w.toml:7:12: route \"r\" names unknown upstream"),
        "{lines:?}"
    );
    assert!(
        lines[3].starts_with("w.toml:8:12: size \"lots\""),
        "{lines:?}"
    );
}

#[test]
fn example_config_is_valid_and_documents_defaults() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.toml");
    let config =
        Config::load(&path).unwrap_or_else(|e| panic!("config.example.toml is invalid:\n{e}"));
    let listener = &config.listeners[0];
    let route = &config.routes[0];
    // The example writes out every default; it must agree with the code's.
    use writegate::config::*;
    assert_eq!(listener.header_read_timeout, DEFAULT_HEADER_READ_TIMEOUT);
    assert_eq!(listener.idle_timeout, DEFAULT_IDLE_TIMEOUT);
    assert_eq!(route.connect_timeout, DEFAULT_CONNECT_TIMEOUT);
    assert_eq!(route.response_timeout, DEFAULT_RESPONSE_TIMEOUT);
    assert_eq!(route.max_body, DEFAULT_MAX_BODY);
    assert_eq!(config.runtime.shutdown_timeout, DEFAULT_SHUTDOWN_TIMEOUT);
    assert_eq!(config.runtime.workers, None);
    assert!(config.log.access_log);
    assert_eq!(route.retries, DEFAULT_RETRIES);
    assert_eq!(route.retry_budget, DEFAULT_RETRY_BUDGET);
    assert!(!route.retry_idempotent);
    let admission = route
        .admission
        .as_ref()
        .expect("the example shows admission");
    assert_eq!(admission.max_queue, DEFAULT_MAX_QUEUE);
    assert_eq!(admission.queue_timeout, DEFAULT_QUEUE_TIMEOUT);
    assert_eq!(admission.shed_status, 503);
    assert!(!admission.adaptive);
    assert_eq!(admission.min_inflight, 1);
    let writers = &config.upstreams[0];
    assert_eq!(writers.outlier, OutlierConfig::default());
    let check = writers
        .health_check
        .as_ref()
        .expect("the example shows health checks");
    assert_eq!(check.interval, DEFAULT_HEALTH_INTERVAL);
    assert_eq!(check.timeout, DEFAULT_HEALTH_TIMEOUT);
    assert_eq!(check.healthy_threshold, DEFAULT_HEALTHY_THRESHOLD);
    assert_eq!(check.unhealthy_threshold, DEFAULT_UNHEALTHY_THRESHOLD);
    assert_eq!(check.expected_status, (200, 399));
    assert_eq!(writers.backends[1].max_inflight, Some(512));
    let hash = config.upstreams[1]
        .consistent_hash
        .as_ref()
        .expect("a consistent_hash example");
    assert_eq!(hash.algorithm, HashAlgorithm::Rendezvous);
    assert_eq!(hash.balance_factor, None);
    let key = config.routes[1]
        .key
        .as_ref()
        .expect("a keyed route example");
    assert_eq!(key.max_length, DEFAULT_MAX_KEY_LENGTH);
    assert_eq!(key.on_missing, writegate::key::OnMissingKey::Reject);
    let coalesce = &config.routes[1].coalesce;
    assert_eq!(
        coalesce.mode,
        CoalesceMode::Serialize,
        "the example shows a coalescing route"
    );
    let defaults = CoalesceConfig::default();
    assert_eq!(coalesce.methods, defaults.methods);
    assert_eq!(coalesce.order_reads, defaults.order_reads);
    assert_eq!(coalesce.max_pending_per_key, DEFAULT_MAX_PENDING_PER_KEY);
    assert_eq!(coalesce.max_wait, DEFAULT_MAX_WAIT);
    assert_eq!(
        config.routes[0].coalesce.mode,
        CoalesceMode::Off,
        "off by default"
    );
}

fn writegate(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_writegate"))
        .args(args)
        .output()
        .expect("run writegate")
}

#[test]
fn check_exits_0_with_a_summary_for_a_good_file() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.toml");
    let out = writegate(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let first = stdout.lines().next().unwrap_or_default();
    assert!(
        first.ends_with("ok: 1 listener(s), 2 route(s), 2 upstream(s), 5 backend(s)"),
        "{stdout}"
    );
    // Then what it means, on one screen.
    assert!(stdout.lines().count() < 40, "{stdout}");
    assert!(stdout.contains("ledger       host * path /ledger/ methods * -> ledger  [key path segment 2; coalesce serialize; idempotency idempotency-key (memory)]"), "{stdout}");
    assert!(
        stdout.contains("127.0.0.1:9002               weight 1, max_inflight 512"),
        "{stdout}"
    );
}

#[test]
fn check_exits_1_with_every_error_for_a_bad_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    let text = BASE
        .replace("upstream = \"up\"", "upstream = \"nope\"")
        .replace("\"127.0.0.1:9001\" }", "\"127.0.0.1:9001\", weight = 0 }");
    std::fs::write(&path, text).unwrap();
    let out = writegate(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let p = path.display();
    assert!(
        stderr.contains(&format!("{p}:7:52: weight 0 is out of range")),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("{p}:11:12: route \"r\" names unknown upstream")),
        "{stderr}"
    );
    assert!(stderr.contains("2 error(s)"), "{stderr}");
}

#[test]
fn check_reports_a_missing_file_and_usage() {
    let out = writegate(&["check", "--config", "/nonexistent/writegate.toml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read config file"));
    let out = writegate(&["check"]);
    assert_eq!(out.status.code(), Some(2), "no --config is a usage error");
    let out = writegate(&["--version"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("writegate "));
}

fn hashed(upstream_extra: &str, route_extra: &str) -> String {
    BASE.replace(
        "name = \"up\"",
        &format!("name = \"up\"\nbalance = \"consistent_hash\"\n{upstream_extra}"),
    )
    .replace(
        "upstream = \"up\"",
        &format!("upstream = \"up\"\n{route_extra}"),
    )
}

#[test]
fn keyed_routing_options_are_validated() {
    let config = Config::parse(
        Path::new("w.toml"),
        &hashed("hash_balance_factor = 1.25", "key = \"header:x-k\""),
    )
    .unwrap();
    let hash = config.upstreams[0].consistent_hash.as_ref().unwrap();
    assert_eq!(hash.balance_factor, Some(1.25));
    assert_eq!(hash.algorithm, HashAlgorithm::Rendezvous);
    let key = config.routes[0].key.as_ref().unwrap();
    assert_eq!(key.max_length, DEFAULT_MAX_KEY_LENGTH);
    assert_eq!(key.on_missing, writegate::key::OnMissingKey::Reject);

    // A hashed upstream needs keyed routes.
    assert_one(&hashed("", ""), 13, 12, "needs a key");
    assert_one(&hashed("", "key = \"body\""), 14, 7, "bad key \"body\"");
    assert_one(&hashed("", "key = \"path_segment:0\""), 14, 7, "from 1");
    assert_one(
        &hashed("hash_balance_factor = 0.5", "key = \"path\""),
        8,
        23,
        "out of range",
    );
    assert_one(
        &hashed("hash_algorithm = \"maglev\"", "key = \"path\""),
        8,
        18,
        "`hash_algorithm` cannot be `maglev`",
    );
    assert_one(
        &hashed("", "key = \"path\"\nmax_key_length = \"0\""),
        15,
        18,
        "from 1 byte",
    );
    assert_one(
        &hashed("", "key = \"path\"\non_missing_key = \"guess\""),
        15,
        18,
        "`on_missing_key` cannot be `guess`",
    );
    // Hash options on a least_conn upstream, key options without a key.
    let text = BASE.replace(
        "name = \"up\"",
        "name = \"up\"\nhash_algorithm = \"ketama\"",
    );
    assert_one(
        &text,
        7,
        18,
        "applies only to balance = \"consistent_hash\"",
    );
    assert_one(
        &with("on_missing_key = \"least_conn\"\n"),
        12,
        18,
        "needs a key on the route",
    );
    // A key on a least_conn route is allowed (coalescing uses it).
    assert!(Config::parse(Path::new("w.toml"), &with("key = \"header:x-k\"\n")).is_ok());
}

#[test]
fn coalescing_options_are_validated() {
    let coalesce = |lines: &str| with(&format!("key = \"path\"\n\n[routes.coalesce]\n{lines}\n"));
    let config = Config::parse(
        Path::new("w.toml"),
        &coalesce("mode = \"latest\"\nmethods = [\"PUT\"]"),
    )
    .unwrap();
    assert_eq!(config.routes[0].coalesce.mode, CoalesceMode::Latest);
    assert_eq!(config.routes[0].coalesce.methods, [http::Method::PUT]);
    // Line 15 is the first line inside [routes.coalesce].
    assert_one(
        &coalesce("mode = \"merge\""),
        15,
        8,
        "`mode` cannot be `merge`",
    );
    assert_one(
        &coalesce("methods = [\"PUT\", \"GET\"]"),
        15,
        19,
        "reads are ordered with order_reads",
    );
    assert_one(
        &coalesce("order_reads = true"),
        15,
        15,
        "needs a coalescing mode",
    );
    assert_one(
        &coalesce("mode = \"dedupe\"\nmax_pending_per_key = 0"),
        16,
        23,
        "out of range",
    );
    assert_one(
        &coalesce("mode = \"dedupe\"\nmax_wait = \"0s\""),
        16,
        12,
        "greater than zero",
    );
    assert_one(
        &coalesce("mode = \"dedupe\"\nbatch = 3"),
        16,
        1,
        "unknown option `batch`",
    );
    let keyless = with("\n[routes.coalesce]\nmode = \"serialize\"\n");
    assert_one(&keyless, 13, 1, "needs a key");
}

#[test]
fn admission_health_and_retry_options_are_validated() {
    let route = |lines: &str| with(&format!("{lines}\n"));
    assert_one(&route("retries = 11"), 12, 11, "retries 11 is out of range");
    assert_one(
        &route("retry_budget = 1.5"),
        12,
        16,
        "retry_budget 1.5 is out of range",
    );
    let admission = |lines: &str| with(&format!("\n[routes.admission]\n{lines}\n"));
    assert_one(
        &admission("max_inflight = 0"),
        14,
        16,
        "max_inflight 0 is out of range",
    );
    assert_one(
        &admission("max_inflight = 4\nshed_status = 500"),
        15,
        15,
        "use 503 or 429",
    );
    assert_one(
        &admission("max_inflight = 4\nmin_inflight = 8"),
        15,
        16,
        "above max_inflight",
    );
    assert_one(
        &admission("max_queue = 3"),
        13,
        1,
        "required option `max_inflight` is missing",
    );
    let upstream = |lines: &str| BASE.replace("\n[[routes]]", &format!("{lines}\n\n[[routes]]"));
    assert_one(
        &upstream("\n[upstreams.health_check]\npath = \"health\""),
        10,
        8,
        "must start with '/'",
    );
    assert_one(
        &upstream("\n[upstreams.health_check]\npath = \"/h\"\nexpected_status = \"2xx\""),
        11,
        19,
        "use a status or a range",
    );
    assert_one(
        &upstream("\n[upstreams.outlier_detection]\nbase_ejection_time = \"1m\"\nmax_ejection_time = \"10s\""),
        11,
        21,
        "shorter than base_ejection_time",
    );
    assert_one(
        &upstream("\n[upstreams.outlier_detection]\nmax_ejection_percent = 101"),
        10,
        24,
        "out of range",
    );
}

/// `writegate check ... | head -1`: a reader that has gone away ends the program quietly with the
/// status the command documents, not a panic about a broken pipe. The pipe's read end is closed
/// before the program starts, so every run meets the broken pipe.
#[test]
fn check_into_a_closed_pipe_exits_quietly() {
    use std::os::fd::{FromRawFd, OwnedFd};
    let mut fds = [0i32; 2];
    // SAFETY: pipe(2) fills both descriptors on success; each is owned exactly once below.
    let (read_end, write_end) = unsafe {
        assert_eq!(libc::pipe(fds.as_mut_ptr()), 0, "pipe(2)");
        (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]))
    };
    drop(read_end);
    let good = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.toml");
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[[routes]]\nname = 1\n").unwrap();
    for (path, status) in [(&good, 0), (&bad, 1)] {
        let out = Command::new(env!("CARGO_BIN_EXE_writegate"))
            .args(["check", "--config", path.to_str().unwrap()])
            .stdout(std::process::Stdio::from(write_end.try_clone().unwrap()))
            .stderr(if status == 0 {
                std::process::Stdio::piped()
            } else {
                std::process::Stdio::from(write_end.try_clone().unwrap())
            })
            .output()
            .expect("run writegate");
        assert_eq!(
            out.status.code(),
            Some(status),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
    }
}

/// Unknown options, wrong types and bad values are all reported in one run, each where it is and
/// in words: what the option wants, and the nearest known name for a typo.
#[test]
fn every_schema_error_is_reported_in_words() {
    let text = "[[listeners]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\n\n\
                [[upstreams]]\nname = \"u\"\nbalance = \"consistant_hash\"\nhash_algorithm = \"ketamma\"\nbackends = [{ address = \"127.0.0.1:1\" }]\n\n\
                [[routes]]\nname = \"r\"\nupstream = \"u\"\nretriez = 2\nretries = \"2\"\nmax_bodi = \"1KiB\"\n";
    let errors = Config::parse(Path::new("five.toml"), text)
        .expect_err("five errors")
        .to_string();
    let lines: Vec<&str> = errors.lines().collect();
    assert_eq!(
        lines,
        [
            "five.toml:7:11: `balance` cannot be `consistant_hash`; did you mean `consistent_hash`? (one of: least_conn, consistent_hash)",
            "five.toml:8:18: `hash_algorithm` cannot be `ketamma`; did you mean `ketama`? (one of: rendezvous, ketama)",
            "five.toml:14:1: unknown option `retriez`; did you mean `retries`?",
            "five.toml:15:11: `retries` wants a whole number, not string \"2\" (write 2 without quotes)",
            "five.toml:16:1: unknown option `max_bodi`; did you mean `max_body`?",
        ],
        "{errors}"
    );
    let twice = Config::parse(
        Path::new("t.toml"),
        "[log]\naccess_log = false\naccess_log = true\n",
    )
    .expect_err("a duplicate key")
    .to_string();
    assert_eq!(twice, "t.toml:3:1: `access_log` is set twice in this table");
}

#[test]
fn routes_that_shadow_each_other_are_an_error() {
    let base = "[[listeners]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\n\n\
                [[upstreams]]\nname = \"u\"\nbackends = [{ address = \"127.0.0.1:1\" }]\n";
    let routes = "[[routes]]\nname = \"a\"\nupstream = \"u\"\nhost = \"x.example\"\npath_prefix = \"/kv\"\n\n\
                  [[routes]]\nname = \"b\"\nupstream = \"u\"\nhost = \"X.example\"\npath_prefix = \"/kv\"\n";
    let errors = Config::parse(Path::new("s.toml"), &format!("{base}\n{routes}"))
        .expect_err("b never matches")
        .to_string();
    assert!(
        errors.contains("route \"b\" has the same host, path_prefix and methods as route \"a\""),
        "{errors}"
    );
    // Disjoint methods split one path between two routes: allowed.
    let split = "[[routes]]\nname = \"reads\"\nupstream = \"u\"\nmethods = [\"GET\"]\n\n\
                 [[routes]]\nname = \"writes\"\nupstream = \"u\"\nmethods = [\"PUT\"]\n";
    assert!(Config::parse(Path::new("s.toml"), &format!("{base}\n{split}")).is_ok());
}

#[test]
fn idempotency_sections_are_checked_with_positions() {
    // BASE has 11 lines; the section starts on line 12.
    let section = |body: &str| with(&format!("[routes.idempotency]\n{body}\n"));
    assert_one(&section("store = \"file\""), 13, 9, "needs path");
    assert_one(&section("store = \"redis\""), 13, 9, "needs redis_url");
    assert_one(
        &section("store = \"redis\"\nredis_url = \"http://x\""),
        14,
        13,
        "must start with redis://",
    );
    assert_one(
        &section("path = \"keys.redb\""),
        13,
        8,
        "path is for store = \"file\"",
    );
    assert_one(
        &section("store = \"file\"\npath = \"/no/such/dir/keys.redb\""),
        14,
        8,
        "does not exist",
    );
    assert_one(&section("ttl = \"90d\""), 13, 7, "too long");
    assert_one(&section("scope = [\"body\"]"), 13, 10, "scope:");
    assert_one(
        &section("header = \"bad header\""),
        13,
        10,
        "not a valid header name",
    );
    assert_one(
        &section("max_response_body = \"1GiB\""),
        13,
        21,
        "at most 64MiB",
    );
    assert_one(
        &section("concurent = \"wait\""),
        13,
        1,
        "did you mean `concurrent`",
    );
    assert_one(&section("on_store_error = \"ignore\""), 13, 18, "reject");
}

#[test]
fn idempotency_defaults_are_the_documented_ones() {
    let text = with("[routes.idempotency]\n");
    let config = Config::parse(Path::new("w.toml"), &text).unwrap();
    let i = config.routes[0].idempotency.as_ref().unwrap();
    assert_eq!(i.header.as_str(), "idempotency-key");
    assert_eq!(i.ttl, std::time::Duration::from_secs(24 * 3600));
    assert_eq!(i.max_response_body, 1 << 20);
    assert!(i.forward_header && !i.required);
    // The longest the route can take (1 s connect + 30 s response) and 10 s.
    assert_eq!(i.lease, std::time::Duration::from_secs(41));
    assert_eq!(
        i.store,
        writegate::config::IdempotencyStore::Memory {
            max_entries: 100_000
        }
    );
}

#[test]
fn rabbitmq_buffer_sections_are_checked_with_positions() {
    // BASE has 11 lines; the section starts on line 12.
    let section = |body: &str| with(&format!("[routes.buffer]\n{body}\n"));
    let rabbit = "store = \"rabbitmq\"\namqp_url = \"amqp://127.0.0.1:5672/%2f\"";
    assert_one(
        &section("store = \"rabbitmq\"\nreceipts_url = \"redis://127.0.0.1\""),
        13,
        9,
        "needs amqp_url",
    );
    assert_one(&section(rabbit), 13, 9, "needs receipts_url");
    let with_receipts = |extra: &str| {
        section(&format!(
            "{rabbit}\nreceipts_url = \"redis://127.0.0.1\"\n{extra}"
        ))
    };
    assert_one(
        &with_receipts("dir = \"/tmp\""),
        16,
        7,
        "dir is for store = \"log\"",
    );
    assert_one(&with_receipts("partitions = 0"), 16, 14, "partitions");
    assert_one(
        &with_receipts("queue = \"bad name\""),
        16,
        9,
        "queue must be",
    );
    assert_one(
        &with_receipts("fallback = \"local\""),
        16,
        12,
        "needs fallback_dir",
    );
    assert_one(
        &with_receipts("fallback_dir = \"/tmp\""),
        16,
        16,
        "fallback_dir is for fallback = \"local\"",
    );
    assert_one(
        &section(
            "store = \"rabbitmq\"\namqp_url = \"http://x\"\nreceipts_url = \"redis://127.0.0.1\"",
        ),
        14,
        12,
        "must start with amqp://",
    );
    assert_one(
        &section("partitions = 4\ndir = \"/tmp\""),
        13,
        14,
        "partitions is for store = \"rabbitmq\"",
    );
    assert_one(&section("when = \"always\""), 12, 1, "needs dir");
    let text = with_receipts("");
    let config = Config::parse(Path::new("w.toml"), &text).unwrap();
    let buffer = config.routes[0].buffer.as_ref().unwrap();
    match &buffer.store {
        writegate::config::BufferStore::RabbitMq(r) => {
            assert_eq!(r.name, format!("writegate.{}", config.routes[0].name));
            assert_eq!((r.partitions, r.prefetch), (4, 256));
        }
        other => panic!("not rabbitmq: {other:?}"),
    }
}

#[test]
fn discovery_alone_is_enough_and_its_mistakes_have_positions() {
    let discovered = BASE.replace(
        "backends = [{ address = \"127.0.0.1:9001\" }]",
        "discovery = { dns = \"writers.internal:8080\", resolvers = [\"10.0.0.2\", \"10.0.0.3:5353\"] }",
    );
    let config = Config::parse(Path::new("w.toml"), &discovered).unwrap();
    let d = config.upstreams[0].discovery.as_ref().unwrap();
    assert!(config.upstreams[0].backends.is_empty());
    assert_eq!(d.describe(), "writers.internal:8080");
    assert_eq!(d.resolvers[0].to_string(), "10.0.0.2:53");
    assert_eq!(d.resolvers[1].to_string(), "10.0.0.3:5353");
    assert_eq!(d.empty_after, 3);
    let srv = discovered.replace("writers.internal:8080", "_http._tcp.writers.service.consul");
    Config::parse(Path::new("w.toml"), &srv).unwrap();

    let neither = BASE.replace("backends = [{ address = \"127.0.0.1:9001\" }]", "");
    assert_one(&neither, 6, 8, "list `backends` or set `discovery`");
    let cases = [
        ("_http._tcp.x.consul:80", "takes its ports from its records"),
        ("writers.internal", "expected HOST:PORT"),
        ("10.0.0.1:8080", "list it under `backends`"),
        ("bad name:80", "not a DNS name"),
    ];
    for (name, needle) in cases {
        let text = discovered.replace("writers.internal:8080", name);
        assert_one(&text, 7, 21, needle);
    }
    let text = discovered.replace("\"10.0.0.2\"", "\"resolver\"");
    assert_one(&text, 7, 59, "bad resolver \"resolver\"");
    let text = discovered.replace(
        "resolvers = [\"10.0.0.2\", \"10.0.0.3:5353\"]",
        "min_refresh = \"10s\", max_refresh = \"5s\"",
    );
    assert_one(&text, 7, 60, "min_refresh is longer than max_refresh");
    let text = discovered.replace(
        "resolvers = [\"10.0.0.2\", \"10.0.0.3:5353\"]",
        "empty_after = 0",
    );
    assert_one(&text, 7, 60, "empty_after 0 is out of range");
}

#[test]
fn a_cluster_needs_a_secret_and_peers() {
    let secret = "secret = \"0123456789abcdef0123456789abcdef\"";
    let good = with(&format!(
        "\n[cluster]\npeers = [\"10.0.0.1:8080\", \"10.0.0.2:8080\"]\nself = \"10.0.0.1:8080\"\n{secret}\n"
    ));
    let config = Config::parse(Path::new("w.toml"), &good).unwrap();
    let cluster = config.cluster.as_ref().unwrap();
    assert_eq!(cluster.peers.len(), 2);
    assert!(
        !format!("{cluster:?}").contains("0123456789"),
        "Debug shows the secret"
    );

    let no_secret = with("\n[cluster]\npeers = [\"10.0.0.1:8080\"]\n");
    assert_one(&no_secret, 13, 1, "[cluster] needs `secret`");
    let short = with("\n[cluster]\npeers = [\"10.0.0.1:8080\"]\nsecret = \"short\"\n");
    assert_one(&short, 15, 10, "`secret` is too short");
    let no_peers = with(&format!("\n[cluster]\n{secret}\n"));
    assert_one(&no_peers, 13, 1, "list `peers` or set `discovery`");
    let stranger = good.replace("self = \"10.0.0.1:8080\"", "self = \"10.0.0.9:8080\"");
    assert_one(
        &stranger,
        15,
        8,
        "self 10.0.0.9:8080 is not among the peers",
    );
    let half_tls = with(&format!(
        "\n[cluster]\npeers = [\"https://peer.internal:8443\"]\n{secret}\ntls_cert = \"c.pem\"\n"
    ));
    assert!(errors(&half_tls)
        .to_string()
        .contains("tls_cert and tls_key go together"));
}
