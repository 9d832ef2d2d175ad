//! Real processes for the tests that need them: writegate itself (to `kill -9` it) and external
//! servers such as `redis-server`, each on a free loopback port with its own directory, stopped
//! by PID when dropped.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Whether a missing external server fails the test (`WRITEGATE_EXTERNAL_TESTS=require`, as in
/// CI) instead of skipping it.
pub fn external_required() -> bool {
    std::env::var("WRITEGATE_EXTERNAL_TESTS").is_ok_and(|v| v == "require")
}

/// The binary at `path`, or `None` after one line saying which test is skipped and what to
/// install (a failure when external servers are required).
pub fn external_binary(path: &'static str, test: &str, package: &str) -> Option<&'static str> {
    if Path::new(path).exists() {
        return Some(path);
    }
    assert!(
        !external_required(),
        "{path} is required for {test}: apt-get install {package}"
    );
    println!("skipped {test}: {path} is not installed (apt-get install {package})");
    None
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local addr").port()
}

/// A child process killed (SIGKILL) and reaped when dropped.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A `redis-server` of this test's own.
pub struct Redis {
    pub port: u16,
    _process: Killed,
    _dir: tempfile::TempDir,
}

impl Redis {
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }
}

/// Starts `redis-server` on a free port (persistence off: the tests kill writegate, not Redis),
/// waiting until it answers; `None` (skipped) where it is not installed.
pub fn start_redis(test: &str) -> Option<Redis> {
    let binary = external_binary("/usr/bin/redis-server", test, "redis-server")?;
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let child = Command::new(binary)
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
        ])
        .args(["--appendonly", "no", "--dir"])
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start redis-server");
    let process = Killed(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            use std::io::{Read, Write};
            let mut reply = [0; 7];
            if stream.write_all(b"PING\r\n").is_ok() && stream.read_exact(&mut reply).is_ok() {
                assert_eq!(&reply, b"+PONG\r\n");
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "redis-server did not answer on port {port} within 10 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Some(Redis {
        port,
        _process: process,
        _dir: dir,
    })
}

/// A writegate process started from a config file, and the address it listens on.
pub struct Writegate {
    pub process: Killed,
    pub addr: SocketAddr,
}

impl Writegate {
    /// Starts the binary with the config at `path` and waits for its listener (at most 20 s).
    pub fn start(path: &Path) -> Writegate {
        let mut child = Command::new(env!("CARGO_BIN_EXE_writegate"))
            .args(["run", "--config"])
            .arg(path)
            .args(["--log-format", "json"])
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .spawn()
            .expect("start writegate");
        let stderr = child.stderr.take().expect("stderr");
        let (found, listening) = std::sync::mpsc::channel();
        // Keeps reading the log so that the child never blocks on a full pipe.
        let echo = std::env::var_os("WRITEGATE_TEST_LOG").is_some();
        std::thread::spawn(move || {
            let mut found = Some(found);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if echo {
                    eprintln!("writegate: {line}");
                }
                if line.contains("listening") {
                    if let Some(found) = found.take() {
                        let _ = found.send(line);
                    }
                }
            }
        });
        let line = listening
            .recv_timeout(Duration::from_secs(20))
            .expect("writegate logs that it is listening within 20 s");
        let json: serde_json::Value = serde_json::from_str(&line).expect("a JSON log line");
        let addr = json["addr"]
            .as_str()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no addr in {line}"));
        Writegate {
            process: Killed(child),
            addr,
        }
    }

    /// `kill -9`: no shutdown, no flush, nothing of the process runs again.
    pub fn kill_9(mut self) {
        let status = Command::new("kill")
            .args(["-9", &self.process.0.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
        let _ = self.process.0.wait();
    }
}
