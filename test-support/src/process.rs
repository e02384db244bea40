//! Private server processes for failure tests: stopped, paused and restarted at will.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use crate::{env_or, wait_until};

/// A free TCP port on 127.0.0.1 (bound once, then released for the caller to use).
pub fn spare_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .unwrap_or_else(|e| panic!("no spare TCP port on 127.0.0.1: {e}"))
}

async fn port_open(port: u16) -> bool {
    tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_ok()
}

fn signal(pid: Option<u32>, name: &str) {
    let Some(pid) = pid else { return };
    let status = std::process::Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status();
    if !matches!(status, Ok(s) if s.success()) {
        panic!("kill -{name} {pid} failed: {status:?}");
    }
}

/// Path of the `tansu` binary: `TANSU_BIN`, else `~/.cargo/bin/tansu`, else `tansu` on `PATH`.
pub fn tansu_bin() -> PathBuf {
    if let Ok(bin) = std::env::var("TANSU_BIN") {
        return PathBuf::from(bin);
    }
    let cargo_home = env_or("CARGO_HOME", &format!("{}/.cargo", env_or("HOME", "/root")));
    let candidate = Path::new(&cargo_home).join("bin/tansu");
    if candidate.exists() {
        candidate
    } else {
        PathBuf::from("tansu")
    }
}

/// A private Tansu broker on a spare port with SQLite storage in a temporary directory.
///
/// Data and committed offsets survive [`TansuBroker::restart`]. [`TansuBroker::pause`]
/// freezes the process (SIGSTOP) so clients see a broker that stops answering.
pub struct TansuBroker {
    child: Option<Child>,
    dir: tempfile::TempDir,
    port: u16,
}

impl TansuBroker {
    /// Starts a broker and waits until it accepts connections.
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("temporary directory: {e}"));
        let mut broker = Self {
            child: None,
            dir,
            port: spare_port(),
        };
        broker.spawn().await;
        broker
    }

    /// `127.0.0.1:<port>`, for `bootstrap.servers`.
    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The broker's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    async fn spawn(&mut self) {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let log = std::fs::File::create(self.dir.path().join("tansu.log"))
            .unwrap_or_else(|e| panic!("tansu log file: {e}"));
        let child = Command::new(tansu_bin())
            .current_dir(self.dir.path())
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "sqlite://tansu.db"])
            // TANSU_LOG (e.g. `info`) raises the broker's own log level for a diagnosis.
            .env("RUST_LOG", crate::env_or("TANSU_LOG", "warn"))
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {}: {e}; install it with `scripts/services up`",
                    tansu_bin().display()
                )
            });
        self.child = Some(child);
        let port = self.port;
        wait_until(
            "the private tansu broker listens",
            Duration::from_secs(30),
            || port_open(port),
        )
        .await;
    }

    /// Freezes the broker (SIGSTOP): connections stay open but nothing is answered.
    pub fn pause(&self) {
        signal(self.pid(), "STOP");
    }

    /// Thaws a paused broker (SIGCONT).
    pub fn resume(&self) {
        signal(self.pid(), "CONT");
    }

    /// Kills the broker (SIGKILL) and waits for it to exit.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
    }

    /// Kills the broker and starts it again on the same port and the same SQLite file.
    pub async fn restart(&mut self) {
        self.kill().await;
        self.spawn().await;
    }
}

impl Drop for TansuBroker {
    /// A failing test shows the end of the broker's log, which its temporary directory
    /// would otherwise take with it.
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let log = std::fs::read_to_string(self.dir.path().join("tansu.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let tail = &lines[lines.len().saturating_sub(200)..];
        eprintln!(
            "--- last {} lines of the private tansu broker's log ---\n{}",
            tail.len(),
            tail.join("\n")
        );
    }
}

/// A private `redis-server` on a spare port with `appendonly yes` and
/// `appendfsync always`, so a restart keeps every acknowledged write.
pub struct RedisServer {
    child: Option<Child>,
    dir: tempfile::TempDir,
    port: u16,
}

impl RedisServer {
    /// Starts the server and waits until it accepts connections.
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("temporary directory: {e}"));
        let mut server = Self {
            child: None,
            dir,
            port: spare_port(),
        };
        server.spawn().await;
        server
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn spawn(&mut self) {
        let dir = self.dir.path().display().to_string();
        let child = Command::new(env_or("REDIS_SERVER_BIN", "redis-server"))
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ])
            .args(["--dir", &dir])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start redis-server: {e}; install Redis 7"));
        self.child = Some(child);
        let port = self.port;
        wait_until(
            "the private redis-server listens",
            Duration::from_secs(20),
            || port_open(port),
        )
        .await;
    }

    /// Kills the server (SIGKILL) and waits for it to exit.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
    }

    /// Kills the server and starts it again on the same port and data directory.
    pub async fn restart(&mut self) {
        self.kill().await;
        self.spawn().await;
    }
}
