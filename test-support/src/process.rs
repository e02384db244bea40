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

/// The Apache Kafka version `scripts/services` fetches (`scripts/kafka/version`).
pub const KAFKA_VERSION: &str = include_str!("../../scripts/kafka/version").trim_ascii();

const SERVER_PROPERTIES: &str = include_str!("../../scripts/kafka/server.properties");
const LOG4J2_PROPERTIES: &str = include_str!("../../scripts/kafka/log4j2.properties");

/// The folder holding Apache Kafka's jars in `libs/`: `EVENTFUL_KAFKA_HOME`, else
/// `~/.cache/eventful/kafka-<version>`, where `scripts/services install` puts them.
pub fn kafka_home() -> PathBuf {
    if let Ok(home) = std::env::var("EVENTFUL_KAFKA_HOME") {
        return PathBuf::from(home);
    }
    let home = env_or("HOME", "/root");
    Path::new(&home).join(format!(".cache/eventful/kafka-{KAFKA_VERSION}"))
}

fn java_bin() -> PathBuf {
    std::env::var("JAVA_HOME")
        .map(|home| Path::new(&home).join("bin/java"))
        .ok()
        .filter(|java| java.exists())
        .unwrap_or_else(|| PathBuf::from("java"))
}

/// A `java` command with Kafka's jars on the class path and its log going to `dir`.
fn kafka_java(dir: &Path, heap: &str) -> Command {
    let libs = kafka_home().join("libs");
    if !libs.join(".complete").exists() {
        panic!(
            "Apache Kafka {KAFKA_VERSION}'s jars are not in {}: run `scripts/services install`",
            libs.display()
        );
    }
    let mut command = Command::new(java_bin());
    command
        .arg(format!("-Xmx{heap}"))
        .args([
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            "-Djava.awt.headless=true",
        ])
        .arg(format!("-Dkafka.logs.dir={}", dir.display()))
        .arg(format!(
            "-Dlog4j2.configurationFile={}",
            dir.join("log4j2.properties").display()
        ))
        .arg("-cp")
        .arg(format!("{}/*", libs.display()));
    command
}

/// A private single-node Apache Kafka broker (KRaft: broker and controller in one process)
/// on spare ports, with its data in a temporary directory.
///
/// Data, committed offsets and groups survive [`KafkaBroker::restart`].
/// [`KafkaBroker::pause`] freezes the process (SIGSTOP) so clients see a broker that stops
/// answering. A failing test prints the end of the broker's log.
pub struct KafkaBroker {
    child: Option<Child>,
    dir: tempfile::TempDir,
    port: u16,
}

impl KafkaBroker {
    /// Formats the storage, starts the broker and waits until it accepts connections.
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("temporary directory: {e}"));
        let port = spare_port();
        let controller_port = spare_port();
        let properties = SERVER_PROPERTIES
            .replace("@PORT@", &port.to_string())
            .replace("@CONTROLLER_PORT@", &controller_port.to_string())
            .replace("@DATA_DIR@", &dir.path().join("data").display().to_string());
        let write = |name: &str, text: &str| {
            std::fs::write(dir.path().join(name), text)
                .unwrap_or_else(|e| panic!("writing {name} for the private broker: {e}"))
        };
        write("server.properties", &properties);
        write("log4j2.properties", LOG4J2_PROPERTIES);
        let format = kafka_java(dir.path(), "256m")
            .args(["kafka.tools.StorageTool", "format", "--standalone"])
            // Any fixed 16-byte base64 id will do for a private one-node cluster.
            .args(["--cluster-id", "ZXZlbnRmdWwtdGVzdC1jbA"])
            .arg("--config")
            .arg(dir.path().join("server.properties"))
            .stdout(Stdio::null())
            .output()
            .await
            .unwrap_or_else(|e| panic!("cannot run java for Kafka's storage tool: {e}"));
        if !format.status.success() {
            panic!(
                "formatting the private broker's storage failed: {}",
                String::from_utf8_lossy(&format.stderr)
            );
        }
        let mut broker = Self {
            child: None,
            dir,
            port,
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
        let stdout = std::fs::File::create(self.dir.path().join("stdout.log"))
            .unwrap_or_else(|e| panic!("private broker's stdout file: {e}"));
        let child = kafka_java(self.dir.path(), "512m")
            .arg("kafka.Kafka")
            .arg(self.dir.path().join("server.properties"))
            .stdout(stdout)
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start the private Kafka broker: {e}"));
        self.child = Some(child);
        let port = self.port;
        wait_until(
            "the private Kafka broker listens",
            Duration::from_secs(60),
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

    /// Kills the broker and starts it again on the same ports and the same data.
    pub async fn restart(&mut self) {
        self.kill().await;
        self.spawn().await;
    }
}

impl Drop for KafkaBroker {
    /// A failing test shows the end of the broker's log, which its temporary directory
    /// would otherwise take with it.
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let log = std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let tail = &lines[lines.len().saturating_sub(200)..];
        eprintln!(
            "--- last {} lines of the private Kafka broker's log ---\n{}",
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

/// A private Redis Cluster: `masters` redis-server processes in cluster mode (no
/// persistence, no replicas) on spare loopback ports, the 16,384 slots split evenly in
/// order, started and joined before [`start`](Self::start) returns; killed on drop.
pub struct RedisCluster {
    nodes: Vec<Child>,
    ports: Vec<u16>,
    /// The first slot of each node's range (node `i` owns `firsts[i]..firsts[i + 1]`).
    firsts: Vec<u16>,
    _dir: tempfile::TempDir,
}

impl RedisCluster {
    /// Three masters.
    pub async fn start() -> Self {
        Self::with_masters(3).await
    }

    /// `masters` masters (at least 1), each owning an equal range of slots.
    pub async fn with_masters(masters: usize) -> Self {
        let masters = masters.max(1);
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("temporary directory: {e}"));
        let mut nodes = Vec::with_capacity(masters);
        let mut ports = Vec::with_capacity(masters);
        for i in 0..masters {
            let port = spare_port();
            let node_dir = dir.path().join(format!("node-{i}"));
            std::fs::create_dir_all(&node_dir)
                .unwrap_or_else(|e| panic!("{}: {e}", node_dir.display()));
            let child = Command::new(env_or("REDIS_SERVER_BIN", "redis-server"))
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "5000"])
                .args(["--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(&node_dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start redis-server: {e}; install Redis 7"));
            nodes.push(child);
            ports.push(port);
        }
        let firsts: Vec<u16> = (0..masters)
            .map(|i| u16::try_from(i * 16384 / masters).unwrap_or(u16::MAX))
            .collect();
        let cluster = Self {
            nodes,
            ports,
            firsts,
            _dir: dir,
        };
        for &port in &cluster.ports {
            wait_until("a cluster node listens", Duration::from_secs(20), || {
                port_open(port)
            })
            .await;
        }
        for i in 0..masters {
            let last = cluster.firsts.get(i + 1).map_or(16383, |next| next - 1);
            let _: () = cluster
                .command(
                    i,
                    &[
                        "CLUSTER",
                        "ADDSLOTSRANGE",
                        &cluster.firsts[i].to_string(),
                        &last.to_string(),
                    ],
                )
                .await;
        }
        for &port in &cluster.ports[1..] {
            let _: () = cluster
                .command(0, &["CLUSTER", "MEET", "127.0.0.1", &port.to_string()])
                .await;
        }
        let known = format!("cluster_known_nodes:{masters}");
        wait_until(
            "every cluster node is joined and reports cluster_state:ok",
            Duration::from_secs(30),
            || {
                let (cluster, known) = (&cluster, known.clone());
                async move {
                    for i in 0..masters {
                        let info: String = cluster.command(i, &["CLUSTER", "INFO"]).await;
                        if !info.contains("cluster_state:ok") || !info.contains(&known) {
                            return false;
                        }
                    }
                    true
                }
            },
        )
        .await;
        cluster
    }

    /// `redis://127.0.0.1:<port>` of every node, in slot order.
    pub fn urls(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|port| format!("redis://127.0.0.1:{port}"))
            .collect()
    }

    /// The index (in [`urls`](Self::urls)) of the node owning `key`'s slot.
    pub async fn node_of(&self, key: &str) -> usize {
        let slot: i64 = self.command(0, &["CLUSTER", "KEYSLOT", key]).await;
        self.firsts
            .iter()
            .rposition(|&first| i64::from(first) <= slot)
            .unwrap_or(0)
    }

    /// Runs one command on node `i` (a plain connection: no redirects followed).
    pub async fn command<T: redis::FromRedisValue>(&self, i: usize, args: &[&str]) -> T {
        let url = format!("redis://127.0.0.1:{}", self.ports[i]);
        let mut cmd = redis::cmd(args[0]);
        for arg in &args[1..] {
            cmd.arg(*arg);
        }
        let result = async {
            let mut conn = redis::Client::open(url.as_str())?
                .get_multiplexed_async_connection()
                .await?;
            cmd.query_async(&mut conn).await
        }
        .await;
        result.unwrap_or_else(|e| panic!("{args:?} on {url}: {e}"))
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            let _ = node.start_kill();
        }
    }
}

/// The newest installed PostgreSQL's `bin` folder: `PG_BINDIR`, else the highest
/// `/usr/lib/postgresql/<major>/bin` (Debian keeps `initdb` and `postgres` there; the same
/// choice as `scripts/services`), else the `PATH`.
fn pg_bindir() -> Option<PathBuf> {
    if let Ok(dir) = std::env::var("PG_BINDIR") {
        return Some(PathBuf::from(dir));
    }
    let mut majors: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let major = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("postgres").exists().then_some((major, bin))
        })
        .collect();
    majors.sort();
    majors.pop().map(|(_, bin)| bin)
}

fn pg_command(name: &str) -> Command {
    Command::new(pg_bindir().map_or_else(|| PathBuf::from(name), |bin| bin.join(name)))
}

/// The uid and gid of the `postgres` account: `initdb` and `postgres` refuse to run as
/// root, so as root the private instance runs as that account (as `scripts/services` does).
fn postgres_account() -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.first() == Some(&"postgres") && fields.len() > 3)
            .then(|| Some((fields[2].parse().ok()?, fields[3].parse().ok()?)))
            .flatten()
    })
}

fn running_as_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| out.stdout.trim_ascii() == b"0")
}

/// A private PostgreSQL server (`initdb` + `postgres` in the foreground) on a spare port,
/// with its data in a temporary directory; role `postgres`, trust on loopback.
///
/// [`PostgresServer::restart`] is a crash: an immediate shutdown (SIGQUIT: no checkpoint,
/// clients cut off) and a start that replays the WAL, so every committed transaction
/// survives and nothing else does. Durability settings stay at their defaults (`fsync`,
/// `synchronous_commit` on).
pub struct PostgresServer {
    child: Option<Child>,
    dir: tempfile::TempDir,
    port: u16,
    account: Option<(u32, u32)>,
}

impl PostgresServer {
    /// Creates the cluster (`initdb`), starts the server and waits until it accepts
    /// connections.
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("temporary directory: {e}"));
        let account = if running_as_root() {
            Some(postgres_account().unwrap_or_else(|| {
                panic!("running as root, but there is no `postgres` account to run PostgreSQL")
            }))
        } else {
            None
        };
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap_or_else(|e| panic!("{}: {e}", data.display()));
        if let Some((uid, gid)) = account {
            use std::os::unix::fs::PermissionsExt;
            // The postgres account must reach its data folder inside root's temporary one.
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
                .and_then(|()| std::os::unix::fs::chown(&data, Some(uid), Some(gid)))
                .unwrap_or_else(|e| panic!("handing {} to postgres: {e}", data.display()));
        }
        let mut initdb = pg_command("initdb");
        initdb
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "--auth-local=trust", "--auth-host=trust"])
            .args(["--encoding=UTF8", "--locale=C.UTF-8", "--no-sync"]);
        if let Some((uid, gid)) = account {
            initdb.uid(uid).gid(gid);
        }
        let out = initdb
            .output()
            .await
            .unwrap_or_else(|e| panic!("cannot run initdb ({e}): install PostgreSQL"));
        if !out.status.success() {
            panic!(
                "initdb failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let mut server = Self {
            child: None,
            dir,
            port: spare_port(),
            account,
        };
        server.spawn().await;
        server
    }

    /// `postgres://postgres@127.0.0.1:<port>/postgres`, the administrative URL.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// The server's process id (the postmaster) while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    async fn spawn(&mut self) {
        let data = self.dir.path().join("data");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("server.log"))
            .unwrap_or_else(|e| panic!("private PostgreSQL's log file: {e}"));
        let mut command = pg_command("postgres");
        command
            .arg("-D")
            .arg(&data)
            .args(["-p", &self.port.to_string(), "-h", "127.0.0.1"])
            // The socket goes in the data folder: no clash with the shared server's.
            .arg("-k")
            .arg(&data)
            .args(["-c", "max_connections=300"])
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true);
        if let Some((uid, gid)) = self.account {
            command.uid(uid).gid(gid);
        }
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start the private PostgreSQL: {e}"));
        self.child = Some(child);
        let url = self.url();
        wait_until(
            "the private PostgreSQL accepts connections",
            Duration::from_secs(60),
            || accepts(url.clone()),
        )
        .await;
    }

    /// Stops the server as a crash would (SIGQUIT: immediate shutdown) and waits for it.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGQUIT, not SIGKILL: the postmaster then takes its backends down with it, so
            // the next start finds no stale shared memory still in use.
            if let Some(pid) = child.id() {
                let _ = std::process::Command::new("kill")
                    .args(["-QUIT", &pid.to_string()])
                    .status();
            }
            if tokio::time::timeout(Duration::from_secs(30), child.wait())
                .await
                .is_err()
            {
                let _ = child.start_kill();
                let _ = child.wait().await;
            }
        }
    }

    /// Crashes the server ([`kill`](Self::kill)) and starts it again on the same port and
    /// data, which replays the WAL.
    pub async fn restart(&mut self) {
        self.kill().await;
        self.spawn().await;
    }
}

async fn accepts(url: String) -> bool {
    use sqlx::Connection;
    match sqlx::PgConnection::connect(&url).await {
        Ok(conn) => {
            let _ = conn.close().await;
            true
        }
        Err(_) => false,
    }
}

impl Drop for PostgresServer {
    /// SIGQUIT so the backends go with the postmaster (a SIGKILL from `kill_on_drop` would
    /// leave them to notice on their own).
    fn drop(&mut self) {
        if let Some(pid) = self.pid() {
            let _ = std::process::Command::new("kill")
                .args(["-QUIT", &pid.to_string()])
                .status();
        }
    }
}
