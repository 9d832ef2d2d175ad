//! The load users compare proxies with: `wrk`, one thread, 64 keep-alive connections, a Lua
//! script sending `POST /kv/{key}` with a 64-byte body and the key also in `x-write-key`, keys
//! drawn from 1,000 with Zipf 0.99 out of a ring of pre-built requests. Three fast backends
//! (an empty 204 per request). Every proxy runs one worker with its access log off: writegate
//! (least_conn, and consistent_hash with `serialize` coalescing), nginx (`least_conn`,
//! `proxy_http_version 1.1`, upstream `keepalive 64`) and HAProxy (`leastconn`,
//! `http-keep-alive`). Rounds are interleaved; each prints requests/s, p99 (wrk's) and the proxy's
//! CPU time per request from /proc (with its system time, the kernel's part), and the end prints
//! medians and writegate's ratios per proxy core.
//!
//! Skipped, with a message, where `wrk` is missing (`apt-get install wrk`); nginx and HAProxy
//! rows only where they are installed (`apt-get install nginx-light haproxy`).
//!
//! writegate adds `X-Forwarded-For`/`-Proto`/`-Host`, `Via` both ways and an `X-Request-Id` to
//! every request; nginx and HAProxy are configured to add the same (as in `benches/proxy.rs`),
//! unless `WG_BENCH_PEER_HEADERS=0`, which runs them as the issue that asked for this benchmark
//! did: without.
//!
//! Run: `cargo bench --bench wrk` (env: WG_BENCH_SECONDS=10, WG_BENCH_ROUNDS=3,
//! WG_BENCH_CONNECTIONS=64, WG_BENCH_PEER_HEADERS=1, WG_BENCH_ACCESS_LOG=0; with 1, writegate
//! and nginx log every request to a file, nginx with `buffer=64k`).

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use support::{env_or, free_port, Peer, Writegate, HAPROXY_FORWARDING, NGINX_FORWARDING};

const WRK: &str = "/usr/bin/wrk";

/// The wrk script: a ring of 8,192 requests whose keys follow Zipf 0.99 over 1,000 keys.
const SCRIPT: &str = r#"
local keys, exponent, ring_size = 1000, 0.99, 8192
local ring, n = {}, 0
init = function(args)
  local cdf, sum = {}, 0
  for k = 1, keys do sum = sum + 1 / (k ^ exponent); cdf[k] = sum end
  math.randomseed(42)
  local body = string.rep("v", 64)
  for i = 1, ring_size do
    local u, lo, hi = math.random() * sum, 1, keys
    while lo < hi do
      local mid = math.floor((lo + hi) / 2)
      if cdf[mid] < u then lo = mid + 1 else hi = mid end
    end
    local key = "k" .. lo
    ring[i] = wrk.format("POST", "/kv/" .. key, { ["x-write-key"] = key }, body)
  end
end
request = function()
  n = n % ring_size + 1
  return ring[n]
end
"#;

/// One proxy under load.
struct Target {
    name: &'static str,
    port: u16,
    /// The process whose CPU time (with its children's) is counted.
    pid: u32,
    /// The `Host` that picks writegate's route.
    host: &'static str,
}

/// What one wrk run measured.
#[derive(Clone, Copy, Default)]
struct Run {
    rps: f64,
    p99_ms: f64,
    cpu_us_per_request: f64,
    /// The part of it spent in the kernel (system time).
    kernel_us_per_request: f64,
}

fn main() {
    if !Path::new(WRK).exists() {
        println!("wrk benchmark skipped: {WRK} is not installed (apt-get install wrk)");
        return;
    }
    let seconds = env_or("WG_BENCH_SECONDS", 10);
    let rounds = env_or("WG_BENCH_ROUNDS", 3);
    let connections = env_or("WG_BENCH_CONNECTIONS", 64);
    let backends: Vec<SocketAddr> = (0..3)
        .map(|_| support::spawn_fast_backend(b"HTTP/1.1 204 No Content\r\n\r\n"))
        .collect();
    let dir = tempfile::tempdir().expect("temp dir");
    let script = dir.path().join("zipf.lua");
    std::fs::write(&script, SCRIPT).expect("write the wrk script");

    // WG_BENCH_ACCESS_LOG=1: writegate logs every request (its default) to a file, and nginx
    // too, buffered (`buffer=64k`); HAProxy logs only through syslog and stays without.
    let access_log = env_or("WG_BENCH_ACCESS_LOG", 0) == 1;
    let port = free_port();
    let config = writegate_config(port, &backends, access_log);
    let writegate = if access_log {
        let log = dir.path().join("writegate-access.log");
        Writegate::start_logging(dir.path(), &config, port, &log)
    } else {
        Writegate::start(dir.path(), &config, port)
    };
    let mut targets = vec![
        Target {
            name: "writegate least_conn",
            port,
            pid: writegate.pid(),
            host: "lc.bench",
        },
        Target {
            name: "writegate hash+serialize",
            port,
            pid: writegate.pid(),
            host: "hash.bench",
        },
    ];
    // writegate adds forwarding headers to every request (X-Forwarded-*, Via, X-Request-Id);
    // by default the peers add the same, so that every proxy does the same work.
    let same_headers = env_or("WG_BENCH_PEER_HEADERS", 1) == 1;
    let nginx = nginx(dir.path(), &backends, same_headers, access_log);
    let haproxy = haproxy(dir.path(), &backends, same_headers);
    for (name, peer) in [("nginx", &nginx), ("haproxy", &haproxy)] {
        match peer {
            Some(peer) => targets.push(Target {
                name,
                port: peer.port,
                pid: peer.pid(),
                host: "bench",
            }),
            None => println!("{name} is not installed: its row is left out"),
        }
    }
    println!(
        "wrk benchmark: 1 thread, {connections} connections, {seconds}s x {rounds} rounds, POST /kv/{{key}} (64 bytes, Zipf 0.99 over 1,000 keys)"
    );
    let mut runs: Vec<Vec<Run>> = targets.iter().map(|_| Vec::new()).collect();
    for round in 1..=rounds {
        for (target, runs) in targets.iter().zip(&mut runs) {
            let run = wrk(target, &script, connections, seconds);
            println!(
                "  round {round} {:<26} {:>9.0} req/s  p99 {:>6.2} ms  proxy CPU {:>5.1} µs/req, kernel {:>5.1} ({:>7.0} req/s per core)",
                target.name,
                run.rps,
                run.p99_ms,
                run.cpu_us_per_request,
                run.kernel_us_per_request,
                1e6 / run.cpu_us_per_request
            );
            runs.push(run);
        }
    }
    println!("\nmedians over {rounds} rounds:");
    let medians: Vec<Run> = runs.iter().map(|r| median(r)).collect();
    for (target, m) in targets.iter().zip(&medians) {
        println!(
            "  {:<26} {:>9.0} req/s  p99 {:>6.2} ms  proxy CPU {:>5.1} µs/req, kernel {:>5.1} ({:>7.0} req/s per core)",
            target.name,
            m.rps,
            m.p99_ms,
            m.cpu_us_per_request,
            m.kernel_us_per_request,
            1e6 / m.cpu_us_per_request
        );
    }
    for (i, target) in targets.iter().enumerate().skip(2) {
        for (w, wg) in targets.iter().enumerate().take(2) {
            println!(
                "  {} / {}: {:.2}x per core, p99 {:.2} vs {:.2} ms",
                wg.name,
                target.name,
                medians[i].cpu_us_per_request / medians[w].cpu_us_per_request,
                medians[w].p99_ms,
                medians[i].p99_ms
            );
        }
    }
}

fn writegate_config(port: u16, backends: &[SocketAddr], access_log: bool) -> String {
    let list: Vec<String> = backends
        .iter()
        .map(|b| format!("{{ address = \"{b}\" }}"))
        .collect();
    let list = list.join(", ");
    format!(
        "[runtime]\nworkers = 1\n\n[log]\naccess_log = {access_log}\n\n\
         [[listeners]]\nname = \"bench\"\nlisten = \"127.0.0.1:{port}\"\n\n\
         [[upstreams]]\nname = \"lc\"\nbackends = [{list}]\n\n\
         [[upstreams]]\nname = \"hash\"\nbalance = \"consistent_hash\"\nbackends = [{list}]\n\n\
         [[routes]]\nname = \"lc\"\nhost = \"lc.bench\"\nupstream = \"lc\"\n\n\
         [[routes]]\nname = \"hash\"\nhost = \"hash.bench\"\nupstream = \"hash\"\nkey = \"header:x-write-key\"\n\n\
         [routes.coalesce]\nmode = \"serialize\"\n"
    )
}

/// Runs wrk against `target`; its rate, p99 and the proxy's CPU per request.
fn wrk(target: &Target, script: &Path, connections: u64, seconds: u64) -> Run {
    let before = process_cpu(target.pid);
    let output = Command::new(WRK)
        .args(["-t1", &format!("-c{connections}"), &format!("-d{seconds}s")])
        .args(["--latency", "-H", &format!("Host: {}", target.host), "-s"])
        .arg(script)
        .arg(format!("http://127.0.0.1:{}/", target.port))
        .output()
        .expect("run wrk");
    let after = process_cpu(target.pid);
    let cpu = after.total() - before.total();
    let kernel = after.kernel - before.kernel;
    let text = String::from_utf8_lossy(&output.stdout);
    let rps = field(&text, "Requests/sec:").unwrap_or(0.0);
    let p99_ms = text
        .lines()
        .find(|l| l.trim_start().starts_with("99%"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(millis)
        .unwrap_or(f64::NAN);
    if text.contains("Non-2xx") || text.contains("Socket errors") {
        println!("  wrk reported errors for {}:\n{text}", target.name);
    }
    let requests = rps * seconds as f64;
    Run {
        rps,
        p99_ms,
        cpu_us_per_request: cpu.as_secs_f64() * 1e6 / requests.max(1.0),
        kernel_us_per_request: kernel.as_secs_f64() * 1e6 / requests.max(1.0),
    }
}

fn field(text: &str, name: &str) -> Option<f64> {
    let line = text.lines().find(|l| l.trim_start().starts_with(name))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// wrk's latency ("812.00us", "2.51ms", "1.02s") in milliseconds.
fn millis(text: &str) -> Option<f64> {
    let (number, scale) = if let Some(n) = text.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = text.strip_suffix("ms") {
        (n, 1.0)
    } else {
        (text.strip_suffix('s')?, 1000.0)
    };
    Some(number.parse::<f64>().ok()? * scale)
}

fn median(runs: &[Run]) -> Run {
    let pick = |f: fn(&Run) -> f64| {
        let mut values: Vec<f64> = runs.iter().map(f).collect();
        values.sort_by(f64::total_cmp);
        values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
    };
    Run {
        rps: pick(|r| r.rps),
        p99_ms: pick(|r| r.p99_ms),
        cpu_us_per_request: pick(|r| r.cpu_us_per_request),
        kernel_us_per_request: pick(|r| r.kernel_us_per_request),
    }
}

/// CPU time of a process and its children, split as /proc reports it.
#[derive(Clone, Copy)]
struct CpuTime {
    user: Duration,
    kernel: Duration,
}

impl CpuTime {
    fn total(self) -> Duration {
        self.user + self.kernel
    }
}

/// User and system time of `pid` and its children (nginx's worker), from /proc.
fn process_cpu(pid: u32) -> CpuTime {
    let mut pids = vec![pid];
    if let Ok(entries) = std::fs::read_dir("/proc") {
        let numbered = entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok());
        pids.extend(
            numbered.filter(|&p| stat(p).and_then(|f| f.get(1)?.parse().ok()) == Some(pid)),
        );
    }
    let (mut user, mut kernel) = (0u64, 0u64);
    for fields in pids.iter().filter_map(|&p| stat(p)) {
        let ticks = |i: usize| {
            fields
                .get(i)
                .and_then(|f| f.parse::<u64>().ok())
                .unwrap_or(0)
        };
        user += ticks(11);
        kernel += ticks(12);
    }
    // USER_HZ is 100 on Linux.
    CpuTime {
        user: Duration::from_millis(user * 10),
        kernel: Duration::from_millis(kernel * 10),
    }
}

/// The fields of /proc/PID/stat after the command name.
fn stat(pid: u32) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = text.rsplit_once(')')?.1;
    Some(after.split_whitespace().map(str::to_string).collect())
}

fn nginx(dir: &Path, backends: &[SocketAddr], same_headers: bool, log: bool) -> Option<Peer> {
    let mut directives = if same_headers { NGINX_FORWARDING } else { "" }.to_string();
    if log {
        let path = dir.join("nginx-access.log");
        directives.push_str(&format!(
            "      access_log {} combined buffer=64k;\n",
            path.display()
        ));
    }
    support::nginx_least_conn(dir, backends, &directives)
}

fn haproxy(dir: &Path, backends: &[SocketAddr], same_headers: bool) -> Option<Peer> {
    let port = free_port();
    let servers: String = backends
        .iter()
        .enumerate()
        .map(|(i, b)| format!("  server s{i} {b}\n"))
        .collect();
    let headers = if same_headers { HAPROXY_FORWARDING } else { "" };
    let config = format!(
        "global\n  maxconn 4096\n  nbthread 1\ndefaults\n  mode http\n  option http-keep-alive\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\
         frontend f\n  bind 127.0.0.1:{port}\n  default_backend b\n{headers}backend b\n  balance leastconn\n  http-reuse always\n{servers}"
    );
    Peer::haproxy(dir, port, &config)
}
