//! `writegate demo`, run as a newcomer runs it: the binary tells its story (keyed routing, a hot
//! key with and without coalescing, shedding, a live reload, a retried payment), and every command
//! it prints works when pasted.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// curl, if installed; without it the pasted-command check says so in one line, unless
/// `WRITEGATE_EXTERNAL_TESTS=require` (as in CI) makes that a failure.
fn have_curl() -> bool {
    let found = Command::new("curl").arg("--version").output().is_ok();
    if !found {
        let required = std::env::var("WRITEGATE_EXTERNAL_TESTS").is_ok_and(|v| v == "require");
        assert!(!required, "curl is required here: apt-get install curl");
        println!("skipped running the demo's printed commands: curl is not installed (apt-get install curl)");
    }
    found
}

#[test]
fn the_demo_tells_its_story_and_its_commands_work() {
    let (listen, admin) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_writegate"))
        .args(["demo", "--listen", &listen, "--admin", &admin])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the demo");
    let stdout = child.stdout.take().unwrap();
    let (lines_tx, lines_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                return;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut tour = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines_rx.recv_timeout(left) {
            Ok(line) => {
                let done = line.contains("Press Ctrl-C");
                tour.push(line);
                if done {
                    break;
                }
            }
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "the demo's tour did not finish within 60 s:\n{}",
                    tour.join("\n")
                );
            }
        }
    }
    let text = tour.join("\n");
    // Keyed routing: each key's three writes went to one writer.
    let keyed: Vec<&str> = tour
        .iter()
        .filter_map(|l| l.trim().strip_prefix("/orders/order-"))
        .collect();
    assert_eq!(keyed.len(), 3, "{text}");
    for line in keyed {
        let writers: Vec<&str> = line
            .split(": ")
            .nth(1)
            .unwrap_or_default()
            .split(", ")
            .collect();
        assert!(
            writers.windows(2).all(|w| w[0] == w[1]),
            "a key moved: {line}"
        );
    }
    // The hot key: with coalescing no two writes of the row overlapped, and fewer were applied.
    let coalesced = tour
        .iter()
        .find(|l| l.trim_start().starts_with("orders (latest)"))
        .unwrap_or_else(|| panic!("no coalescing line:\n{text}"));
    assert!(
        coalesced.contains("50 of 50 clients got 200"),
        "{coalesced}"
    );
    assert!(coalesced.contains("0 of them overlapping"), "{coalesced}");
    assert!(!coalesced.contains("applied 50 writes"), "{coalesced}");
    // Shedding and the reload.
    let retry_after = text
        .split("shed with 503 and Retry-After: ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|seconds| seconds.parse::<u64>().ok());
    assert!(retry_after.is_some_and(|s| s >= 1), "{text}");
    let reload = tour
        .iter()
        .find(|l| l.contains("Live reload"))
        .unwrap_or_else(|| panic!("no reload line:\n{text}"));
    // "…; 6 of 20 keys moved, 6 of them to writer-4, …": every moved key went to the new writer.
    let counts: Vec<u32> = reload
        .split("; ")
        .nth(1)
        .unwrap_or_default()
        .split(' ')
        .filter_map(|w| w.parse().ok())
        .collect();
    let [moved, _, to_new] = counts[..] else {
        panic!("{reload}");
    };
    assert!(moved > 0, "{reload}");
    assert_eq!(
        moved, to_new,
        "keys moved elsewhere than the new writer: {reload}"
    );
    let retried = tour
        .iter()
        .find(|l| l.contains("A retried payment"))
        .unwrap_or_else(|| panic!("no idempotency line:\n{text}"));
    assert!(
        retried.contains("the writer applied 1 write")
            && retried.contains("(Idempotent-Replayed: true)"),
        "{retried}"
    );
    if have_curl() {
        for line in tour.iter().filter(|l| l.trim_start().starts_with("curl ")) {
            let command = line.trim().split("    #").next().unwrap_or_default().trim();
            let out = Command::new("sh")
                .args(["-c", command])
                .output()
                .expect("run sh");
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success(), "`{command}` failed:\n{stdout}");
            assert!(!stdout.is_empty(), "`{command}` printed nothing");
            assert!(!stdout.starts_with("HTTP/1.1 5"), "`{command}`:\n{stdout}");
        }
    }
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    assert_eq!(child.wait().unwrap().code(), Some(0));
}
