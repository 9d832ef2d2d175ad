//! End-to-end proxy benchmark: requests/s, latency and proxy CPU time per request.
//!
//! Compares, on the same fast backend and the same load (keep-alive connections sending small
//! POSTs, each connection to its own key), five paths: directly to the backend; through writegate
//! (one worker thread) on a least_conn route, on a route that coalesces with `serialize`, and on a
//! consistent_hash route keyed by the path; and through nginx (one worker process, when `nginx` is
//! installed), and through HAProxy (one thread, when `haproxy` is installed). At the end it prints
//! writegate's backend connection reuse, from its own metrics. Rounds are interleaved so that
//! drift on the machine hits every path alike; each round prints its ratios and the end prints the
//! medians.
//!
//! CPU time per request is the proxy process's user+system time over the round (from /proc)
//! divided by the requests it served: the figure that decides how many proxy cores a load needs.
//! Each round also prints the whole machine's idle time (in % of one core) and how often the
//! proxy went to sleep per request (voluntary context switches): a loop that leaves cores idle
//! waiting on wake-ups shows there, not in CPU time.
//!
//! Then an open-loop step: writegate, nginx, HAProxy and the backend directly (the floor) under a
//! fixed request rate of 25% and 50% of nginx's peak, rounds interleaved. The load comes from this
//! process, paced every 100 µs, each request's latency counted from when it was due
//! ([`paced_latencies`]); `WG_BENCH_LOADGEN=oha` uses `oha --latency-correction` instead, whose
//! pacer sends each millisecond's requests at once. It prints p50 and p99 and writegate's p50
//! over nginx's and p99 over HAProxy's: per round, as medians over the rounds, and over all
//! rounds' requests pooled, the last two with 95% bootstrap intervals. For that step the proxies
//! run on the last core and the load and the backend on the others (see [`CoreSplit`];
//! `WG_BENCH_PIN=0` leaves placement to the kernel). It starts by measuring how often each core
//! stalls with nothing running, which sets the p99 floor on a VM.
//!
//! nginx and HAProxy are configured to add the forwarding headers writegate adds by default, so
//! that every proxy does the same work and the backend parses the same requests.
//!
//! Run: `cargo bench --bench proxy` (env: WG_BENCH_SECONDS=5, WG_BENCH_ROUNDS=3,
//! WG_BENCH_LATENCY_ROUNDS=9, WG_BENCH_CONNECTIONS=64, WG_BENCH_BODY=128, WG_BENCH_PIN=1,
//! WG_BENCH_LOADGEN=paced; WG_BENCH_PEAK=RATE runs only the open-loop step, taking RATE as nginx's
//! peak).

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::{HAPROXY_FORWARDING, NGINX_FORWARDING};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

mod support;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let seconds = env_or("WG_BENCH_SECONDS", 5);
    let rounds = env_or("WG_BENCH_ROUNDS", 3);
    // A p99 over 5 s turns on a few scheduler stalls of the shared cores: more rounds than the
    // closed-loop step, so that the medians settle.
    let latency_rounds = env_or("WG_BENCH_LATENCY_ROUNDS", 9);
    let connections = env_or("WG_BENCH_CONNECTIONS", 64) as usize;
    let body_len = env_or("WG_BENCH_BODY", 128) as usize;
    let backend = support::spawn_fast_backend(STORED);
    let dir = tempfile::tempdir().expect("temp dir");
    let writegate = Writegate::start(dir.path(), backend);
    let nginx = Nginx::start(dir.path(), backend);
    if nginx.is_none() {
        println!("nginx not found: comparing with the backend directly only (apt-get install nginx-light)");
    }
    println!(
        "proxy benchmark: {connections} keep-alive connections, POST of {body_len} bytes, {seconds}s x {rounds} rounds"
    );
    let wg = Some(writegate.child.id());
    let mut targets: Vec<Target> = vec![
        Target {
            name: "direct",
            addr: backend,
            host: "bench",
            pid: None,
        },
        Target {
            name: "writegate",
            addr: writegate.addr,
            host: "bench",
            pid: wg,
        },
        Target {
            name: "wg-serial",
            addr: writegate.addr,
            host: "serialize.bench",
            pid: wg,
        },
        Target {
            name: "wg-hash",
            addr: writegate.addr,
            host: "hash.bench",
            pid: wg,
        },
    ];
    let haproxy = Haproxy::start(dir.path(), backend);
    if let Some(n) = &nginx {
        targets.push(Target {
            name: "nginx",
            addr: n.addr,
            host: "bench",
            pid: Some(n.peer.pid()),
        });
    }
    if let Some(h) = &haproxy {
        targets.push(Target {
            name: "haproxy",
            addr: h.addr,
            host: "bench",
            pid: Some(h.peer.pid()),
        });
    }
    // Open-loop latency at 25% and 50% of nginx's maximum rate (writegate's without nginx).
    let peak = match std::env::var("WG_BENCH_PEAK")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        Some(peak) => peak,
        None => closed_loop_step(
            &targets,
            connections,
            seconds,
            rounds,
            body_len,
            writegate.admin,
        ),
    };
    let latency_targets: Vec<&Target> = targets
        .iter()
        .filter(|t| matches!(t.name, "direct" | "writegate" | "nginx" | "haproxy"))
        .collect();
    latency_step(
        &latency_targets,
        peak,
        connections,
        seconds,
        latency_rounds,
        body_len,
    );
}

/// Closed-loop rounds over every target, then backend reuse and the medians; returns nginx's
/// median requests/s (writegate's without nginx).
fn closed_loop_step(
    targets: &[Target],
    connections: usize,
    seconds: u64,
    rounds: u64,
    body_len: usize,
    admin: SocketAddr,
) -> f64 {
    // Warm up every path (connections, pools, caches) before measuring.
    for t in targets {
        load(t, connections, Duration::from_secs(1), body_len);
    }
    let mut results: Vec<Vec<Round>> = vec![Vec::new(); targets.len()];
    for round in 1..=rounds {
        println!("\nround {round}");
        for (i, t) in targets.iter().enumerate() {
            let before = Usage::now(t.pid);
            let result = load(t, connections, Duration::from_secs(seconds), body_len);
            let r = Round::new(result, Usage::now(t.pid).since(&before));
            println!("  {:<10} {}", t.name, r.describe());
            results[i].push(r);
        }
        print_ratios(targets, &results, round as usize - 1);
    }
    print_reuse(admin);
    println!("\nmedians over {rounds} rounds");
    for (i, t) in targets.iter().enumerate() {
        println!("  {:<10} {}", t.name, Round::median(&results[i]).describe());
    }
    let medians: Vec<Vec<Round>> = results.iter().map(|r| vec![Round::median(r)]).collect();
    print_ratios(targets, &medians, 0);
    targets
        .iter()
        .position(|t| t.name == "nginx")
        .map_or(medians[1][0].rps, |i| medians[i][0].rps)
}

/// `oha` from PATH or cargo's bin directory.
fn find_oha() -> Option<std::path::PathBuf> {
    let home = std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo/bin/oha"));
    std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("oha"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default()
        .into_iter()
        .chain(home)
        .find(|p| p.is_file())
}

/// Latency added under an open-loop load (latency-corrected, so a stall counts for every request
/// it delays), interleaved rounds per rate; prints p50/p99 per target and writegate's p50 over
/// nginx's and p99 over HAProxy's per round, then the summaries of [`print_latency_summary`].
fn latency_step(
    targets: &[&Target],
    peak: f64,
    connections: usize,
    seconds: u64,
    rounds: u64,
    body_len: usize,
) {
    if rounds == 0 {
        return;
    }
    let load = if std::env::var("WG_BENCH_LOADGEN").as_deref() == Ok("oha") {
        let Some(oha) = find_oha() else {
            println!(
                "
oha not found: no open-loop latency step (cargo install oha)"
            );
            return;
        };
        OpenLoad::Oha(oha)
    } else {
        OpenLoad::Paced
    };
    // Before the split: this process may still run on every core.
    print_scheduling_stalls(Duration::from_secs(3));
    let _split = (env_or("WG_BENCH_PIN", 1) == 1)
        .then(|| CoreSplit::apply(targets))
        .flatten();
    let body = "w".repeat(body_len);
    for share in [0.25, 0.5] {
        let rate = (peak * share) as u64;
        println!(
            "
open-loop latency at {rate} req/s ({:.0}% of the peak rate), {}",
            share * 100.0,
            load.describe()
        );
        let mut rounds_run: Vec<Vec<Option<Latencies>>> = Vec::new();
        for round in 1..=rounds {
            // Each round starts with the next target, so that no proxy always runs first.
            let mut run: Vec<Option<Latencies>> = vec![None; targets.len()];
            for k in 0..targets.len() {
                let i = (k + round as usize - 1) % targets.len();
                let t = targets[i];
                run[i] = load.run(t, rate, connections, seconds, &body);
                match run[i].as_ref().and_then(Latencies::percentiles) {
                    Some((p50, p99)) => println!(
                        "  round {round} {:<10} p50 {p50:>6.0} µs  p99 {p99:>6.0} µs",
                        t.name
                    ),
                    None => println!("  round {round} {:<10} load failed", t.name),
                }
            }
            print_latency_ratios("", latency_ratios(targets, &percentiles_of(&run)));
            rounds_run.push(run);
        }
        print_latency_summary(targets, &rounds_run);
    }
}

/// The medians of the rounds' p50 and p99, then every target's requests of all rounds pooled,
/// each with writegate's ratios and a 95% bootstrap interval over the rounds.
fn print_latency_summary(targets: &[&Target], rounds_run: &[Vec<Option<Latencies>>]) {
    let per_round: Vec<Vec<Percentiles>> = rounds_run.iter().map(|r| percentiles_of(r)).collect();
    println!("  medians of the rounds:");
    let medians: Vec<Percentiles> = (0..targets.len())
        .map(|i| {
            let (p50, p99): (Vec<f64>, Vec<f64>) = per_round.iter().filter_map(|r| r[i]).unzip();
            (!p50.is_empty()).then(|| (median(&p50), median(&p99)))
        })
        .collect();
    print_percentiles(targets, &medians);
    print_latency_ratios("of the medians:", latency_ratios(targets, &medians));
    let (p50_ratios, p99_ratios): (Vec<Option<f64>>, Vec<Option<f64>>) =
        per_round.iter().map(|r| latency_ratios(targets, r)).unzip();
    let p50_ratios: Vec<f64> = p50_ratios.into_iter().flatten().collect();
    let p99_ratios: Vec<f64> = p99_ratios.into_iter().flatten().collect();
    let median_of = |v: &[f64]| (!v.is_empty()).then(|| median(v));
    print_latency_ratios(
        "median of the rounds' ratios:",
        (median_of(&p50_ratios), median_of(&p99_ratios)),
    );
    print_interval(
        "of those medians",
        median_interval(&p50_ratios),
        median_interval(&p99_ratios),
    );
    // Pooled, a round that met a long stall weighs by the requests it delayed, as it does for a
    // user over a longer time, rather than as one round in the median. Only rounds where every
    // target ran count, so that the targets stay paired.
    let complete: Vec<&Vec<Option<Latencies>>> = rounds_run
        .iter()
        .filter(|r| r.iter().all(Option::is_some))
        .collect();
    if complete.is_empty() {
        return;
    }
    // Each target's p50 and p99 over the picked rounds' requests.
    let pool = |picks: &[usize]| -> Vec<Percentiles> {
        (0..targets.len())
            .map(|i| {
                let mut sum = Latencies::default();
                picks
                    .iter()
                    .flat_map(|&round| &complete[round][i])
                    .for_each(|l| sum.add(l));
                sum.percentiles()
            })
            .collect()
    };
    let all: Vec<usize> = (0..complete.len()).collect();
    println!(
        "  all requests of the {} complete rounds pooled:",
        all.len()
    );
    let pooled = pool(&all);
    print_percentiles(targets, &pooled);
    print_latency_ratios("pooled:", latency_ratios(targets, &pooled));
    let pooled_ratios = |picks: &[usize]| latency_ratios(targets, &pool(picks));
    print_interval(
        "of the pooled ratios (rounds resampled)",
        bootstrap_interval(all.len(), |picks| pooled_ratios(picks).0),
        bootstrap_interval(all.len(), |picks| pooled_ratios(picks).1),
    );
}

fn print_percentiles(targets: &[&Target], values: &[Percentiles]) {
    for (t, value) in targets.iter().zip(values) {
        if let Some((p50, p99)) = value {
            println!("  {:<10} p50 {p50:>6.0} µs  p99 {p99:>6.0} µs", t.name);
        }
    }
}

fn print_interval(what: &str, p50: Option<(f64, f64)>, p99: Option<(f64, f64)>) {
    if let (Some((p50_low, p50_high)), Some((p99_low, p99_high))) = (p50, p99) {
        println!(
            "  95% bootstrap interval {what}: p50 {p50_low:.2}–{p50_high:.2}  p99 {p99_low:.2}–{p99_high:.2}"
        );
    }
}

/// A 95% bootstrap interval for the median of `values`, one per round.
fn median_interval(values: &[f64]) -> Option<(f64, f64)> {
    bootstrap_interval(values.len(), |picks| {
        Some(median(
            &picks.iter().map(|&i| values[i]).collect::<Vec<_>>(),
        ))
    })
}

/// A 95% bootstrap interval for a statistic of `n` rounds: the statistic over 2,000 resamples
/// of the rounds drawn with replacement (`statistic` gets the picked rounds' indices), their
/// 2.5th and 97.5th percentiles. Says whether a ratio below 1 is more than luck of the rounds.
/// `None` for fewer than 5 rounds.
fn bootstrap_interval(n: usize, statistic: impl Fn(&[usize]) -> Option<f64>) -> Option<(f64, f64)> {
    const RESAMPLES: usize = 2000;
    if n < 5 {
        return None;
    }
    // xorshift64: a fixed seed, so that a run's output can be reproduced from its rounds.
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next_index = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % n as u64) as usize
    };
    let mut values: Vec<f64> = (0..RESAMPLES)
        .filter_map(|_| {
            let picks: Vec<usize> = (0..n).map(|_| next_index()).collect();
            statistic(&picks)
        })
        .collect();
    if values.len() < RESAMPLES {
        return None;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    Some((
        values[RESAMPLES / 40],
        values[RESAMPLES - RESAMPLES / 40 - 1],
    ))
}

/// How late a 100 µs sleep wakes on each core with the machine otherwise idle: on a VM, the
/// host running something else on our virtual CPU. Stalls of a millisecond or more, a few per
/// second, are the floor under every p99 of the open-loop step, whichever proxy it measures.
fn print_scheduling_stalls(duration: Duration) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let probes: Vec<_> = (0..cores)
        .map(|cpu| std::thread::spawn(move || oversleeps_on(cpu, duration)))
        .collect();
    println!("\nscheduling stalls with the machine idle (a 100 µs sleep waking over 1 ms late):");
    for (cpu, probe) in probes.into_iter().enumerate() {
        match probe.join() {
            Ok(Some((stalls, worst))) => println!(
                "  CPU {cpu}: {:.1} per second, worst {:.1} ms late",
                stalls as f64 / duration.as_secs_f64(),
                worst.as_secs_f64() * 1e3
            ),
            _ => println!("  CPU {cpu}: could not pin the probe (taskset)"),
        }
    }
}

/// Pins the calling thread to `cpu`, then sleeps 100 µs at a time for `duration`; returns how
/// many sleeps woke over 1 ms late and the latest.
fn oversleeps_on(cpu: usize, duration: Duration) -> Option<(u32, Duration)> {
    // "/proc/thread-self" links to "PID/task/TID".
    let link = std::fs::read_link("/proc/thread-self").ok()?;
    let tid: u32 = link.file_name()?.to_str()?.parse().ok()?;
    if !taskset(Threads::One, tid, &cpu.to_string()) {
        return None;
    }
    let nap = Duration::from_micros(100);
    let (mut stalls, mut worst) = (0, Duration::ZERO);
    let end = Instant::now() + duration;
    while Instant::now() < end {
        let start = Instant::now();
        std::thread::sleep(nap);
        let late = start.elapsed().saturating_sub(nap);
        stalls += u32::from(late > Duration::from_millis(1));
        worst = worst.max(late);
    }
    Some((stalls, worst))
}

/// p50 and p99 in µs of one target; `None` when it has none (its run failed).
type Percentiles = Option<(f64, f64)>;

/// writegate's p50 over nginx's and p99 over HAProxy's, each when both ran.
type Ratios = (Option<f64>, Option<f64>);

/// The ratios from one (p50, p99) per target.
fn latency_ratios(targets: &[&Target], values: &[Percentiles]) -> Ratios {
    let of = |name: &str| {
        targets
            .iter()
            .position(|t| t.name == name)
            .and_then(|i| values[i])
    };
    let wg = of("writegate");
    (
        wg.zip(of("nginx")).map(|(w, n)| w.0 / n.0),
        wg.zip(of("haproxy")).map(|(w, h)| w.1 / h.1),
    )
}

fn print_latency_ratios(label: &str, (p50, p99): Ratios) {
    let mut line = format!("  {label}");
    if let Some(r) = p50 {
        line += &format!("  writegate/nginx p50: {r:.2}");
    }
    if let Some(r) = p99 {
        line += &format!("  writegate/haproxy p99: {r:.2}");
    }
    println!("{line}");
}

/// The proxies on the last core, this process (the backend and the load, or the oha it starts) on
/// the others, for the open-loop step; undone on drop. Left to itself, the kernel places the
/// backend's thread beside whichever proxy writes to it (a socket's reader is woken next to its
/// writer) or beside the load generator, run after run differently, and the p50 then measures
/// that placement more than the proxy; separate cores for the proxy are also how proxies run.
struct CoreSplit {
    pids: Vec<u32>,
    all: String,
}

impl CoreSplit {
    fn apply(targets: &[&Target]) -> Option<CoreSplit> {
        let cores = std::thread::available_parallelism().ok()?.get();
        if cores < 2 {
            return None;
        }
        let proxy = (cores - 1).to_string();
        let load = (0..cores - 1)
            .map(|cpu| cpu.to_string())
            .collect::<Vec<_>>()
            .join(",");
        let proxies: Vec<u32> = targets
            .iter()
            .filter_map(|t| t.pid)
            .flat_map(process_tree)
            .collect();
        let split = CoreSplit {
            pids: proxies
                .iter()
                .copied()
                .chain([std::process::id()])
                .collect(),
            all: format!("0-{}", cores - 1),
        };
        let pinned = taskset(Threads::All, std::process::id(), &load)
            && proxies
                .iter()
                .all(|&pid| taskset(Threads::All, pid, &proxy));
        if !pinned {
            println!("\ntaskset failed: the open-loop step runs unpinned");
            return None;
        }
        println!(
            "\nopen-loop step: proxies on CPU {proxy}, the load and the backend on CPU {load} (WG_BENCH_PIN=0: unpinned)"
        );
        Some(split)
    }
}

impl Drop for CoreSplit {
    fn drop(&mut self) {
        for &pid in &self.pids {
            taskset(Threads::All, pid, &self.all);
        }
    }
}

/// Which threads [`taskset`] sets: every thread of a process, or the one thread a TID names
/// (`-a` with a TID would reach all its process's threads).
#[derive(Clone, Copy, PartialEq)]
enum Threads {
    All,
    One,
}

/// Sets the CPU affinity of `id`'s threads (util-linux's `taskset`).
fn taskset(threads: Threads, id: u32, cpus: &str) -> bool {
    let all = (threads == Threads::All).then_some("-a");
    Command::new("taskset")
        .args(all)
        .args(["-p", "-c", cpus, &id.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// The latencies of one oha run against `addr`, from its per-request CSV; `None` when the run
/// failed.
fn oha_latencies(
    oha: &Path,
    addr: SocketAddr,
    rate: u64,
    connections: usize,
    seconds: u64,
    body: &str,
) -> Option<Latencies> {
    let output = Command::new(oha)
        .args([
            "-z",
            &format!("{seconds}s"),
            "-q",
            &rate.to_string(),
            "--latency-correction",
        ])
        .args([
            "--no-tui",
            "-c",
            &connections.to_string(),
            "-m",
            "POST",
            "-d",
            body,
        ])
        .args(["--output-format", "csv", &format!("http://{addr}/lat")])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let csv = String::from_utf8(output.stdout).ok()?;
    let mut latencies = Latencies::default();
    let mut not_ok = 0;
    // request-start,DNS,DNS+dialup,Response-delay,request-duration,bytes,status
    for line in csv.lines().skip(1) {
        let mut fields = line.split(',');
        let duration: f64 = fields.nth(4)?.parse().ok()?;
        let status = fields.nth(1)?;
        not_ok += u32::from(!status.starts_with('2'));
        latencies.record(duration * 1e6);
    }
    // The CSV lists answered requests only. Latency of failed requests says nothing: a run with
    // an error status, or with fewer answers than it sent beyond those still in flight when the
    // time was up (one per connection, or a stall's worth), is reported as failed.
    let sent = rate * seconds;
    let cut_off = (connections as u64).max(sent / 100);
    if not_ok > 0 || latencies.count + cut_off < sent {
        println!(
            "  oha against {addr}: {} answered of {sent} sent, {not_ok} with an error status",
            latencies.count
        );
        return None;
    }
    Some(latencies)
}

/// The open-loop load generator: our own, paced finely (the default), or oha
/// (`WG_BENCH_LOADGEN=oha`).
enum OpenLoad {
    Paced,
    Oha(std::path::PathBuf),
}

impl OpenLoad {
    fn describe(&self) -> String {
        match self {
            OpenLoad::Paced => format!(
                "paced every {} µs, latency from when each request was due",
                PACING.as_micros()
            ),
            OpenLoad::Oha(_) => "oha --latency-correction".into(),
        }
    }

    fn run(
        &self,
        target: &Target,
        rate: u64,
        connections: usize,
        seconds: u64,
        body: &str,
    ) -> Option<Latencies> {
        match self {
            OpenLoad::Paced => {
                let request = post("/lat", target.host, body.as_bytes());
                paced_latencies(target.addr, rate, seconds, connections, &request)
            }
            OpenLoad::Oha(oha) => oha_latencies(oha, target.addr, rate, connections, seconds, body),
        }
    }
}

/// How finely the open-loop load paces its requests. oha's pacer sleeps on tokio's 1 ms timer and
/// sends each millisecond's requests at once (24 at 24k requests/s), so that its p50 measured
/// mostly the queue each burst makes; finer steps cost the load core a wake-up each.
const PACING: Duration = Duration::from_micros(100);

/// Open-loop load: request k is due at `start + k / rate`, sent on the first free connection of
/// `connections`, and its latency counts from when it was due, so a request that waited for a
/// connection, or for this thread after a stall, counts that wait too (the latency correction).
/// One thread: nonblocking sockets and a timerfd under epoll. `None`, said why, when a response
/// is not 2xx or cannot be framed, a connection closes, or the load is not all answered within
/// 5 s of its end.
fn paced_latencies(
    addr: SocketAddr,
    rate: u64,
    seconds: u64,
    connections: usize,
    request: &[u8],
) -> Option<Latencies> {
    let fail = |why: String| {
        println!("  paced load against {addr}: {why}");
        None
    };
    let poller = Poller::new()?;
    let mut conns = Vec::with_capacity(connections);
    for i in 0..connections {
        let Ok(stream) = std::net::TcpStream::connect(addr) else {
            return fail("cannot connect".into());
        };
        stream.set_nodelay(true).ok()?;
        stream.set_nonblocking(true).ok()?;
        poller.watch(stream.as_raw_fd(), i as u64)?;
        conns.push((stream, None::<Instant>, Vec::with_capacity(4096)));
    }
    let total = rate * seconds;
    let start = Instant::now() + Duration::from_millis(1);
    let due = |k: u64| start + Duration::from_nanos(k * 1_000_000_000 / rate);
    let deadline = due(total) + Duration::from_secs(5);
    // Requests that have come due (then wait for a connection), and those answered.
    let (mut queued, mut answered) = (0u64, 0u64);
    let mut waiting: std::collections::VecDeque<Instant> = Default::default();
    let mut free: Vec<usize> = (0..connections).rev().collect();
    let mut latencies = Latencies::default();
    let mut chunk = [0u8; 4096];
    while answered < total {
        let now = Instant::now();
        if now > deadline {
            return fail(format!("{answered} of {total} answered"));
        }
        while queued < total && due(queued) <= now {
            waiting.push_back(due(queued));
            queued += 1;
        }
        while !waiting.is_empty() && !free.is_empty() {
            let (Some(at), Some(i)) = (waiting.pop_front(), free.pop()) else {
                break;
            };
            let (stream, started, _) = &mut conns[i];
            if stream.write_all(request).is_err() {
                return fail("a write failed".into());
            }
            *started = Some(at);
        }
        let wake = (queued < total).then(|| due(queued).saturating_duration_since(now).max(PACING));
        for ready in poller.wait(wake)? {
            let (stream, started, buf) = &mut conns[ready];
            loop {
                match stream.read(&mut chunk) {
                    Ok(0) => return fail("a connection closed".into()),
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => return fail(format!("read: {e}")),
                }
            }
            loop {
                let answer = match frame_response(buf) {
                    Ok(Some(answer)) => answer,
                    Ok(None) => break,
                    Err(()) => return fail("a response that cannot be framed".into()),
                };
                buf.drain(..answer.len);
                let Some(at) = started.take() else {
                    return fail("an answer to no request".into());
                };
                if !(200..300).contains(&answer.status) {
                    return fail(format!("status {}", answer.status));
                }
                latencies.record(at.elapsed().as_secs_f64() * 1e6);
                answered += 1;
                free.push(ready);
            }
        }
    }
    Some(latencies)
}

/// epoll with a timerfd: waits for readable sockets or a timeout finer than epoll's milliseconds.
struct Poller {
    epoll: std::os::fd::OwnedFd,
    timer: std::os::fd::OwnedFd,
}

impl Poller {
    const TIMER: u64 = u64::MAX;

    fn new() -> Option<Poller> {
        use std::os::fd::FromRawFd;
        // SAFETY: plain system calls; each descriptor is owned (and closed) by an OwnedFd.
        let (epoll, timer) = unsafe {
            let epoll = libc::epoll_create1(libc::EPOLL_CLOEXEC);
            let timer = libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            );
            if epoll < 0 || timer < 0 {
                return None;
            }
            (
                std::os::fd::OwnedFd::from_raw_fd(epoll),
                std::os::fd::OwnedFd::from_raw_fd(timer),
            )
        };
        let poller = Poller { epoll, timer };
        poller.watch(poller.timer.as_raw_fd(), Self::TIMER)?;
        Some(poller)
    }

    /// Reports `fd` readable (level-triggered) as `token`.
    fn watch(&self, fd: i32, token: u64) -> Option<()> {
        let mut event = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: token,
        };
        // SAFETY: both descriptors are open; the event is read during the call only.
        let added =
            unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut event) };
        (added == 0).then_some(())
    }

    /// The tokens of the sockets readable within `timeout` (none: wait for a socket).
    fn wait(&self, timeout: Option<Duration>) -> Option<Vec<usize>> {
        if let Some(timeout) = timeout {
            let value = libc::itimerspec {
                it_interval: libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                },
                it_value: libc::timespec {
                    tv_sec: timeout.as_secs() as libc::time_t,
                    tv_nsec: timeout.subsec_nanos().into(),
                },
            };
            // SAFETY: the timer is open; `value` is read during the call only.
            let set = unsafe {
                libc::timerfd_settime(self.timer.as_raw_fd(), 0, &value, std::ptr::null_mut())
            };
            if set != 0 {
                return None;
            }
        }
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 64];
        // SAFETY: `events` outlives the call, which writes at most its length.
        let n = unsafe { libc::epoll_wait(self.epoll.as_raw_fd(), events.as_mut_ptr(), 64, 1000) };
        if n < 0 {
            return (std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted)
                .then(Vec::new);
        }
        let mut ready = Vec::with_capacity(n as usize);
        for event in &events[..n as usize] {
            if event.u64 == Self::TIMER {
                let mut expirations = [0u8; 8];
                // SAFETY: reads at most 8 bytes into a buffer of 8.
                unsafe { libc::read(self.timer.as_raw_fd(), expirations.as_mut_ptr().cast(), 8) };
            } else {
                ready.push(event.u64 as usize);
            }
        }
        Some(ready)
    }
}

/// Latencies in buckets 1% wide on a log scale from 1 µs: percentiles within 0.5%, and rounds
/// that can be pooled and resampled without keeping every request.
#[derive(Clone, Default)]
struct Latencies {
    buckets: Vec<u64>,
    count: u64,
}

impl Latencies {
    const GROWTH: f64 = 1.01;

    fn record(&mut self, micros: f64) {
        let bucket = (micros.max(1.0).ln() / Self::GROWTH.ln()) as usize;
        if bucket >= self.buckets.len() {
            self.buckets.resize(bucket + 1, 0);
        }
        self.buckets[bucket] += 1;
        self.count += 1;
    }

    fn add(&mut self, other: &Latencies) {
        if other.buckets.len() > self.buckets.len() {
            self.buckets.resize(other.buckets.len(), 0);
        }
        for (sum, n) in self.buckets.iter_mut().zip(&other.buckets) {
            *sum += n;
        }
        self.count += other.count;
    }

    /// The value at quantile `q` (nearest rank), the middle of its bucket.
    fn quantile(&self, q: f64) -> Option<f64> {
        let rank = ((q * self.count as f64).ceil() as u64).max(1);
        let mut seen = 0;
        let bucket = self.buckets.iter().position(|&n| {
            seen += n;
            seen >= rank
        })?;
        Some(Self::GROWTH.powf(bucket as f64 + 0.5))
    }

    fn percentiles(&self) -> Percentiles {
        self.quantile(0.5).zip(self.quantile(0.99))
    }
}

fn percentiles_of(run: &[Option<Latencies>]) -> Vec<Percentiles> {
    run.iter()
        .map(|l| l.as_ref().and_then(Latencies::percentiles))
        .collect()
}

/// One path under test; `host` selects the writegate route.
struct Target {
    name: &'static str,
    addr: SocketAddr,
    host: &'static str,
    pid: Option<u32>,
}

fn print_ratios(targets: &[Target], results: &[Vec<Round>], round: usize) {
    let wg = &results[1][round];
    println!(
        "  writegate/direct req/s: {:.2}",
        wg.rps / results[0][round].rps
    );
    let ratio = |i: usize, what: &str| {
        println!(
            "  {what}: req/s {:.2}   CPU per request {:.2}",
            results[i][round].rps / wg.rps,
            results[i][round].cpu_us_per_request.unwrap_or(f64::NAN)
                / wg.cpu_us_per_request.unwrap_or(f64::NAN)
        );
    };
    ratio(2, "coalesce serialize/off (unique keys)");
    ratio(3, "consistent_hash/least_conn");
    for peer in ["nginx", "haproxy"] {
        let Some(i) = targets.iter().position(|t| t.name == peer) else {
            continue;
        };
        let other = &results[i][round];
        println!(
            "  writegate/{peer:<8} req/s: {:.2}   req/s per core: {:.2}   CPU per request: {:.2}",
            wg.rps / other.rps,
            wg.rps_per_core.unwrap_or(f64::NAN) / other.rps_per_core.unwrap_or(f64::NAN),
            wg.cpu_us_per_request.unwrap_or(f64::NAN)
                / other.cpu_us_per_request.unwrap_or(f64::NAN)
        );
    }
}

#[derive(Clone, Debug)]
struct Round {
    rps: f64,
    p50_us: u32,
    p99_us: u32,
    errors: u64,
    cpu_us_per_request: Option<f64>,
    rps_per_core: Option<f64>,
    /// Idle CPU time of the whole machine over the round, in % of one core.
    idle_percent: f64,
    /// Times the proxy went to sleep (voluntary context switches) per request.
    sleeps_per_request: Option<f64>,
}

impl Round {
    fn new(load: LoadResult, usage: Usage) -> Round {
        let mut lat = load.latencies_us;
        lat.sort_unstable();
        let pick = |q: f64| {
            lat.get(((lat.len() as f64 - 1.0) * q) as usize)
                .copied()
                .unwrap_or(0)
        };
        let rps = load.requests as f64 / load.elapsed.as_secs_f64();
        let requests = load.requests.max(1) as f64;
        let cpu_us_per_request = usage.proxy_cpu.map(|c| c.as_secs_f64() * 1e6 / requests);
        Round {
            rps,
            p50_us: pick(0.5),
            p99_us: pick(0.99),
            errors: load.errors,
            cpu_us_per_request,
            rps_per_core: cpu_us_per_request.map(|us| 1e6 / us),
            idle_percent: 100.0 * usage.idle.as_secs_f64() / load.elapsed.as_secs_f64(),
            sleeps_per_request: usage.proxy_sleeps.map(|n| n as f64 / requests),
        }
    }

    fn median(rounds: &[Round]) -> Round {
        fn med(mut v: Vec<f64>) -> f64 {
            v.sort_by(|a, b| a.total_cmp(b));
            v[v.len() / 2]
        }
        let opt = |f: fn(&Round) -> Option<f64>| -> Option<f64> {
            rounds.iter().map(f).collect::<Option<Vec<_>>>().map(med)
        };
        Round {
            rps: med(rounds.iter().map(|r| r.rps).collect()),
            p50_us: med(rounds.iter().map(|r| r.p50_us as f64).collect()) as u32,
            p99_us: med(rounds.iter().map(|r| r.p99_us as f64).collect()) as u32,
            errors: rounds.iter().map(|r| r.errors).sum(),
            cpu_us_per_request: opt(|r| r.cpu_us_per_request),
            rps_per_core: opt(|r| r.rps_per_core),
            idle_percent: med(rounds.iter().map(|r| r.idle_percent).collect()),
            sleeps_per_request: opt(|r| r.sleeps_per_request),
        }
    }

    fn describe(&self) -> String {
        let cpu = match (self.cpu_us_per_request, self.rps_per_core) {
            (Some(us), Some(per_core)) => {
                format!("  proxy CPU {us:>5.1} µs/req  ({per_core:>7.0} req/s per core)")
            }
            _ => String::new(),
        };
        let sleeps = self
            .sleeps_per_request
            .map_or(String::new(), |n| format!("  sleeps/req {n:.3}"));
        format!(
            "{:>8.0} req/s  p50 {:>5} µs  p99 {:>6} µs  errors {}{cpu}  idle {:>3.0}%{sleeps}",
            self.rps, self.p50_us, self.p99_us, self.errors, self.idle_percent
        )
    }
}

struct LoadResult {
    requests: u64,
    errors: u64,
    elapsed: Duration,
    latencies_us: Vec<u32>,
}

/// Closed-loop load: `connections` keep-alive connections, each sending the next POST (to a key of
/// its own) as soon as the previous response is read, for `duration`. Runs on one thread of its
/// own. The client is a few lines over httparse rather than hyper's: hyper's client cost more CPU
/// per request than the proxies under test, so on two cores it, not the proxy, set the pace.
fn load(target: &Target, connections: usize, duration: Duration, body_len: usize) -> LoadResult {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("load runtime");
    runtime.block_on(async move {
        let body = vec![b'w'; body_len];
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + duration;
        let tasks: Vec<_> = (0..connections)
            .map(|i| {
                let request = post(&format!("/kv/key-{i}"), target.host, &body);
                tokio::spawn(connection_loop(target.addr, request, deadline))
            })
            .collect();
        let mut total = LoadResult {
            requests: 0,
            errors: 0,
            elapsed: Duration::ZERO,
            latencies_us: Vec::new(),
        };
        for t in tasks {
            let (ok, errors, lat) = t.await.expect("load task");
            total.requests += ok;
            total.errors += errors;
            total.latencies_us.extend(lat);
        }
        total.elapsed = started.elapsed();
        total
    })
}

/// The bytes of a POST as hyper's client would send them.
fn post(path: &str, host: &str, body: &[u8]) -> Vec<u8> {
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/octet-stream\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    request
}

async fn connection_loop(
    addr: SocketAddr,
    request: Vec<u8>,
    deadline: tokio::time::Instant,
) -> (u64, u64, Vec<u32>) {
    let (mut ok, mut errors, mut latencies) = (0u64, 0u64, Vec::with_capacity(100_000));
    let mut buf = Vec::with_capacity(4096);
    'reconnect: while tokio::time::Instant::now() < deadline {
        let Ok(mut stream) = TcpStream::connect(addr).await else {
            errors += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        buf.clear();
        while tokio::time::Instant::now() < deadline {
            let started = Instant::now();
            if stream.write_all(&request).await.is_err() {
                errors += 1;
                continue 'reconnect;
            }
            match read_message(&mut stream, &mut buf, frame_response).await {
                Some(answer) if (200..300).contains(&answer.status) => {
                    latencies.push(started.elapsed().as_micros() as u32);
                    ok += 1;
                    // A server may close a keep-alive connection after a full answer: reconnect.
                    if answer.close {
                        continue 'reconnect;
                    }
                }
                _ => {
                    errors += 1;
                    continue 'reconnect;
                }
            }
        }
    }
    (ok, errors, latencies)
}

/// A whole message at the start of a buffer.
struct Message {
    len: usize,
    status: u16,
    close: bool,
}

/// Frames the message at the start of `buf`: `Ok(None)` while it is not all there, `Err` when it
/// cannot be framed (a malformed head, or a chunked body: nothing in this benchmark sends one).
type Framer = fn(&[u8]) -> Result<Option<Message>, ()>;

fn frame_response(buf: &[u8]) -> Result<Option<Message>, ()> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    match response.parse(buf).map_err(drop)? {
        httparse::Status::Partial => Ok(None),
        httparse::Status::Complete(head) => {
            let status = response.code.unwrap_or(0);
            framed(buf.len(), head, response.headers, status)
        }
    }
}

fn framed(
    available: usize,
    head: usize,
    headers: &[httparse::Header<'_>],
    status: u16,
) -> Result<Option<Message>, ()> {
    let mut body = 0;
    let mut close = false;
    for h in headers {
        if h.name.eq_ignore_ascii_case("content-length") {
            let value = std::str::from_utf8(h.value).map_err(drop)?;
            body = value.trim().parse().map_err(drop)?;
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(());
        } else if h.name.eq_ignore_ascii_case("connection") {
            close = h.value.eq_ignore_ascii_case(b"close");
        }
    }
    let len = head + body;
    Ok((available >= len).then_some(Message { len, status, close }))
}

/// Reads until `buf` starts with a whole message, which it removes and returns; `None` when the
/// peer closed or sent what cannot be framed.
async fn read_message(stream: &mut TcpStream, buf: &mut Vec<u8>, frame: Framer) -> Option<Message> {
    loop {
        if let Some(message) = frame(buf).ok()? {
            buf.drain(..message.len);
            return Some(message);
        }
        if stream.read_buf(buf).await.ok()? == 0 {
            return None;
        }
    }
}

/// What the backend answers to every request: hyper's answer to the same, byte for byte but the date.
const STORED: &[u8] =
    b"HTTP/1.1 200 OK\r\ncontent-length: 7\r\ndate: Sat, 21 Nov 2026 18:00:00 GMT\r\n\r\nstored\n";

fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("probe bind");
    l.local_addr().expect("probe addr")
}

/// Waits until `addr` accepts connections (bounded).
fn wait_listening(addr: SocketAddr, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(
            Instant::now() < deadline,
            "{what} did not start listening on {addr}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

struct Writegate {
    child: Child,
    addr: SocketAddr,
    admin: SocketAddr,
}

impl Writegate {
    fn start(dir: &Path, backend: SocketAddr) -> Writegate {
        let addr = free_port();
        let admin = free_port();
        let config = format!(
            "[runtime]\nworkers = 1\n\n[log]\naccess_log = false\n\n[admin]\nlisten = \"{admin}\"\n\n[[listeners]]\nname = \"bench\"\nlisten = \"{addr}\"\n\n\
             [[upstreams]]\nname = \"b\"\nbackends = [{{ address = \"{backend}\" }}]\n\n\
             [[upstreams]]\nname = \"h\"\nbalance = \"consistent_hash\"\nbackends = [{{ address = \"{backend}\" }}]\n\n\
             [[routes]]\nname = \"all\"\nupstream = \"b\"\n\n\
             [[routes]]\nname = \"hashed\"\nhost = \"hash.bench\"\nupstream = \"h\"\nkey = \"path\"\n\n\
             [[routes]]\nname = \"serialized\"\nhost = \"serialize.bench\"\nupstream = \"b\"\nkey = \"path\"\n\n\
             [routes.coalesce]\nmode = \"serialize\"\n"
        );
        let path = dir.join("writegate.toml");
        std::fs::write(&path, config).expect("write config");
        let child = Command::new(env!("CARGO_BIN_EXE_writegate"))
            .args(["run", "--config", path.to_str().expect("utf-8 path")])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("start writegate");
        wait_listening(addr, "writegate");
        Writegate { child, addr, admin }
    }
}

impl Drop for Writegate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Nginx {
    peer: support::Peer,
    addr: SocketAddr,
}

impl Nginx {
    fn start(dir: &Path, backend: SocketAddr) -> Option<Nginx> {
        let addr = free_port();
        let d = dir.display();
        let config = format!(
            "worker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/nginx-error.log warn;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n  access_log off;\n  keepalive_requests 1000000;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
               fastcgi_temp_path {d}/fcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
               upstream backend {{ server {backend}; keepalive 128; }}\n\
               server {{\n    listen {addr};\n    location / {{\n      proxy_pass http://backend;\n\
                     proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n{NGINX_FORWARDING}    }}\n  }}\n}}\n"
        );
        let peer = support::Peer::nginx(dir, addr.port(), &config)?;
        Some(Nginx { peer, addr })
    }
}

/// Counters from /proc, read before and after a round: the proxy's CPU time and sleeps (of
/// `pid` and its direct children, nginx's worker), and the whole machine's idle time.
#[derive(Clone, Copy)]
struct Usage {
    proxy_cpu: Option<Duration>,
    proxy_sleeps: Option<u64>,
    idle: Duration,
}

/// USER_HZ: the unit of /proc's tick counts, fixed at 100 on Linux.
const TICKS_PER_SECOND: f64 = 100.0;

impl Usage {
    fn now(pid: Option<u32>) -> Usage {
        let tree = pid.map(process_tree);
        Usage {
            proxy_cpu: tree.as_ref().map(|pids| {
                let ticks: u64 = pids.iter().filter_map(|&p| cpu_ticks(p)).sum();
                Duration::from_secs_f64(ticks as f64 / TICKS_PER_SECOND)
            }),
            proxy_sleeps: tree
                .as_ref()
                .map(|pids| pids.iter().map(|&p| sleeps(p)).sum()),
            idle: machine_idle(),
        }
    }

    fn since(&self, before: &Usage) -> Usage {
        let minus = |a: Option<u64>, b: Option<u64>| a.zip(b).map(|(a, b)| a.saturating_sub(b));
        Usage {
            proxy_cpu: self.proxy_cpu.zip(before.proxy_cpu).map(|(a, b)| a - b),
            proxy_sleeps: minus(self.proxy_sleeps, before.proxy_sleeps),
            idle: self.idle.saturating_sub(before.idle),
        }
    }
}

/// `pid` and its direct children.
fn process_tree(pid: u32) -> Vec<u32> {
    let mut pids = vec![pid];
    if let Ok(entries) = std::fs::read_dir("/proc") {
        let numbered = entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok());
        pids.extend(numbered.filter(|&p| parent_pid(p) == Some(pid)));
    }
    pids
}

/// Voluntary context switches of every thread of `pid`: how often it went to sleep.
fn sleeps(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .filter_map(|status| {
            let line = status
                .lines()
                .find(|l| l.starts_with("voluntary_ctxt_switches:"))?;
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .sum()
}

/// Idle time of all CPUs together, from /proc/stat.
fn machine_idle() -> Duration {
    let ticks = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|stat| {
            let cpu = stat.lines().next()?;
            cpu.split_whitespace().nth(4)?.parse::<u64>().ok()
        })
        .unwrap_or(0);
    Duration::from_secs_f64(ticks as f64 / TICKS_PER_SECOND)
}

/// Fields after the command name in /proc/PID/stat (the name may contain spaces).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = stat.rsplit_once(')')?.1;
    Some(after_name.split_whitespace().map(str::to_string).collect())
}

fn cpu_ticks(pid: u32) -> Option<u64> {
    let f = stat_fields(pid)?;
    // utime and stime are fields 14 and 15 of stat: 12 and 13 after the name.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn parent_pid(pid: u32) -> Option<u32> {
    stat_fields(pid)?.get(1)?.parse().ok()
}

struct Haproxy {
    peer: support::Peer,
    addr: SocketAddr,
}

impl Haproxy {
    fn start(dir: &Path, backend: SocketAddr) -> Option<Haproxy> {
        let addr = free_port();
        let config = format!(
            "global\n  maxconn 1000\n  nbthread 1\ndefaults\n  mode http\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\
             frontend f\n  bind {addr}\n  default_backend b\n{HAPROXY_FORWARDING}backend b\n  http-reuse always\n  server s1 {backend}\n"
        );
        let peer = support::Peer::haproxy(dir, addr.port(), &config)?;
        Some(Haproxy { peer, addr })
    }
}

/// Backend connection reuse over the whole run, from writegate's own metrics.
fn print_reuse(admin: SocketAddr) {
    let Ok(mut stream) = std::net::TcpStream::connect(admin) else {
        return;
    };
    use std::io::{Read, Write};
    let _ = stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n");
    let mut text = String::new();
    let _ = stream.read_to_string(&mut text);
    let sum = |prefix: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let connections = sum("writegate_upstream_connections_total");
    let requests = sum("writegate_upstream_requests_total");
    if requests > 0.0 {
        println!(
            "\nbackend connection reuse: {} connections for {requests:.0} upstream requests: {:.4}% reused ({:.3} new per 1,000)",
            connections,
            100.0 * (1.0 - connections / requests),
            1000.0 * connections / requests
        );
    }
}
