//! Real processes for the tests that need them: writegate itself (to `kill -9` it) and external
//! servers such as `redis-server`, each on a free loopback port with its own directory, stopped
//! by PID when dropped.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
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

/// A port nothing listens on right now, for a process started next that must know it in advance.
/// Taken below Linux's ephemeral range (32768–60999), which the kernel hands to every `bind` to
/// port 0 and every outgoing connection: one of this suite's many connections could otherwise
/// take the port between this check and the process binding it.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
        ^ u64::from(std::process::id()) << 32;
    for _ in 0..200 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        // A multiplicative hash of (seed, n): spread over the range, different per process.
        let mixed = (seed.wrapping_add(n)).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40;
        let port = 20_000 + (mixed % 12_000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
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
        // The last lines, for the failure message of a process that never listens.
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        let kept = Arc::clone(&tail);
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
                } else if found.is_some() {
                    let mut tail = kept.lock().unwrap_or_else(|e| e.into_inner());
                    if tail.len() == 20 {
                        tail.pop_front();
                    }
                    tail.push_back(line);
                }
            }
        });
        let line = match listening.recv_timeout(Duration::from_secs(20)) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                let status = child.wait();
                let tail = tail.lock().unwrap_or_else(|e| e.into_inner());
                panic!(
                    "writegate did not log that it is listening within 20 s ({status:?}); its last lines:\n{}",
                    Vec::from(tail.clone()).join("\n")
                )
            }
        };
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

/// A `rabbitmq-server` node of this test's own: its ports, its data directory, the
/// consistent-hash exchange plugin enabled. Started as root, the server drops to the `rabbitmq`
/// user, so its directory is handed to that user.
pub struct RabbitMq {
    pub port: u16,
    node: String,
    epmd_port: u16,
    dist_port: u16,
    dir: tempfile::TempDir,
    /// The `rabbitmq-server` script while the node runs.
    server: Option<Child>,
}

const RABBITMQ_SERVER: &str = "/usr/sbin/rabbitmq-server";

/// Starts a broker (at most 60 s), or `None` (skipped) where it is not installed.
pub fn start_rabbitmq(test: &str) -> Option<RabbitMq> {
    start_rabbitmq_with(test, "[rabbitmq_consistent_hash_exchange].\n")
}

/// [`start_rabbitmq`] with `plugins` as the node's enabled plugins file.
pub fn start_rabbitmq_with(test: &str, plugins: &str) -> Option<RabbitMq> {
    external_binary(RABBITMQ_SERVER, test, "rabbitmq-server")?;
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(
        dir.path().join("rabbitmq.conf"),
        "loopback_users = none\nlog.console = false\n",
    )
    .expect("write rabbitmq.conf");
    std::fs::write(dir.path().join("enabled_plugins"), plugins).expect("write enabled_plugins");
    let owned = Command::new("chown")
        .args(["-R", "rabbitmq:rabbitmq"])
        .arg(dir.path())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        owned,
        "cannot hand {} to the rabbitmq user",
        dir.path().display()
    );
    let port = free_port();
    let mut broker = RabbitMq {
        port,
        node: format!("wgtest{port}@localhost"),
        epmd_port: free_port(),
        dist_port: free_port(),
        dir,
        server: None,
    };
    broker.start();
    Some(broker)
}

impl RabbitMq {
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    fn command(&self, program: &str) -> Command {
        let base = self.dir.path();
        let mut command = Command::new(program);
        command
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("ERL_EPMD_PORT", self.epmd_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", base.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", base.join("log"))
            .env("RABBITMQ_CONFIG_FILE", base.join("rabbitmq"))
            .env(
                "RABBITMQ_ENABLED_PLUGINS_FILE",
                base.join("enabled_plugins"),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        command
    }

    /// Starts the node (again, on the same data) and waits until it takes AMQP connections.
    pub fn start(&mut self) {
        let server = self
            .command(RABBITMQ_SERVER)
            .spawn()
            .expect("start rabbitmq-server");
        self.server = Some(server);
        let deadline = Instant::now() + Duration::from_secs(60);
        // `rabbitmqctl await_startup` returns once the node is fully booted.
        loop {
            let ready = self
                .command("/usr/sbin/rabbitmqctl")
                .args(["-n", &self.node, "await_startup", "--timeout", "5"])
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "rabbitmq-server did not start on port {} within 60 s (logs in {})",
                self.port,
                self.dir.path().join("log").display()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Stops the node cleanly (what it confirmed is on its disk).
    pub fn stop(&mut self) {
        let Some(mut server) = self.server.take() else {
            return;
        };
        let _ = self
            .command("/usr/sbin/rabbitmqctl")
            .args(["-n", &self.node, "stop"])
            .status();
        // The node has stopped; its start script ends with it (or is ended here).
        let _ = server.kill();
        let _ = server.wait();
    }
}

impl Drop for RabbitMq {
    fn drop(&mut self) {
        self.stop();
        // epmd refuses to stop while it still lists the node, which it does for a moment after
        // the node stopped: ask again, for at most 10 s.
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let killed = self
                .command("epmd")
                .args(["-port", &self.epmd_port.to_string(), "-kill"])
                .stdout(Stdio::piped())
                .output()
                .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains("Killed"));
            if killed {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A `dnsmasq` of this test's own on a free loopback port. It answers for names under `.test`
/// only, from two files of the test's: `hosts` (A/AAAA records, re-read on SIGHUP) and
/// `records.conf` (`srv-host=` lines, which dnsmasq reads only at start: changing them restarts
/// it on the same port). Names it does not know get NXDOMAIN.
pub struct Dnsmasq {
    pub port: u16,
    binary: &'static str,
    process: Option<Killed>,
    dir: tempfile::TempDir,
}

/// Starts `dnsmasq` with these hosts lines and SRV lines; `None` (skipped) where it is not
/// installed.
pub fn start_dnsmasq(test: &str, hosts: &str, records: &str) -> Option<Dnsmasq> {
    let binary = external_binary("/usr/sbin/dnsmasq", test, "dnsmasq")?;
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("hosts"), hosts).expect("write hosts");
    std::fs::write(dir.path().join("records.conf"), records).expect("write records");
    let mut dnsmasq = Dnsmasq {
        port: free_port(),
        binary,
        process: None,
        dir,
    };
    dnsmasq.start();
    Some(dnsmasq)
}

impl Dnsmasq {
    /// `127.0.0.1:PORT`, as `resolvers` takes it.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Starts (or starts again) on the same port, and waits until it takes connections.
    pub fn start(&mut self) {
        let file = |name: &str| self.dir.path().join(name).display().to_string();
        let child = Command::new(self.binary)
            .args([
                "--keep-in-foreground",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
            ])
            .args(["--listen-address=127.0.0.1", "--local=/test/"])
            // Started as root, dnsmasq would drop to `nobody`, who cannot read the test's files.
            .args(running_as_root().then_some("--user=root"))
            .arg(format!("--port={}", self.port))
            .arg(format!("--addn-hosts={}", file("hosts")))
            .arg(format!("--conf-file={}", file("records.conf")))
            .arg(format!("--pid-file={}", file("dnsmasq.pid")))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start dnsmasq");
        self.process = Some(Killed(child));
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "dnsmasq did not listen on port {} within 10 s",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops it (SIGKILL): lookups time out or are refused until [`start`](Dnsmasq::start).
    pub fn stop(&mut self) {
        self.process = None;
    }

    /// Replaces the A/AAAA records and has dnsmasq re-read them (SIGHUP).
    pub fn set_hosts(&self, hosts: &str) {
        std::fs::write(self.dir.path().join("hosts"), hosts).expect("write hosts");
        let pid = self.process.as_ref().expect("dnsmasq runs").0.id();
        let status = Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -HUP {pid} failed");
    }

    /// Replaces the SRV lines: dnsmasq is restarted on the same port to read them.
    pub fn set_records(&mut self, records: &str) {
        std::fs::write(self.dir.path().join("records.conf"), records).expect("write records");
        self.stop();
        self.start();
    }
}
