//! Consumer-group hand-over time on the shared Apache Kafka broker, with the classic group
//! protocol and with KIP-848's consumer protocol (`group.protocol=consumer`, which the
//! bundled librdkafka 2.12 supports), side by side in one run.
//!
//! Run with `cargo bench --bench rebalance` (needs `scripts/services up`). For each protocol
//! and round, on a fresh 4-partition topic and group, it measures:
//! - **first join**: `subscribe` until the only member owns all 4 partitions;
//! - **second join**: member B's `subscribe` until A and B split the 4 partitions;
//! - **graceful leave**: A's close until B owns all 4 partitions;
//! - **kill**: A vanishes without leaving (its client leaked, polling stopped) until B owns
//!   all 4; bounded by the session timeout (10 s classic, the broker's
//!   `group.consumer.session.timeout.ms` for the consumer protocol, 45 s by default).
//!
//! Each row prints the median and the maximum over the rounds, in milliseconds.

use std::io::{BufRead as _, BufReader, Write as _};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use eventful_test_support::kafka;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;

const ROUNDS: usize = 3;
const PARTITIONS: usize = 4;

/// One group member in a child process of its own (this binary, run as `member`), so that
/// a kill is a real SIGKILL: librdkafka heartbeats from its own threads, so a client merely
/// dropped without closing inside this process would keep its partitions.
struct Member {
    owned: Arc<AtomicUsize>,
    child: Child,
}

impl Member {
    fn join(protocol: &str, group: &str, topic: &str) -> Self {
        let mut child = Command::new(std::env::current_exe().expect("own path"))
            .args(["member", protocol, group, topic])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("member process");
        let owned = Arc::new(AtomicUsize::new(0));
        let stdout = child.stdout.take().expect("member stdout");
        let counter = owned.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(count) = line.trim().parse() {
                    counter.store(count, Ordering::Relaxed);
                }
            }
        });
        Self { owned, child }
    }

    fn owned(&self) -> usize {
        self.owned.load(Ordering::Relaxed)
    }

    /// Leaves the group gracefully (the member closes its consumer) and waits for the exit.
    fn leave(mut self) {
        if let Some(mut stdin) = self.child.stdin.take() {
            let _ = writeln!(stdin, "leave");
        }
        let _ = self.child.wait();
    }

    /// SIGKILL: no LeaveGroup, no more heartbeats.
    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The child side: consume until told to leave on stdin, printing the owned partition count
/// whenever it changes.
fn member(protocol: &str, group: &str, topic: &str) {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", kafka::brokers())
        .set("group.id", group)
        .set("group.protocol", protocol)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest");
    if protocol == "classic" {
        config
            .set("session.timeout.ms", "10000")
            .set("heartbeat.interval.ms", "1000");
    }
    let consumer: BaseConsumer = config.create().expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let leave = Arc::new(AtomicBool::new(false));
    {
        let leave = leave.clone();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = std::io::stdin().read_line(&mut line);
            leave.store(true, Ordering::Relaxed);
        });
    }
    let mut last = usize::MAX;
    while !leave.load(Ordering::Relaxed) {
        let _ = consumer.poll(Duration::from_millis(20));
        let count = consumer.assignment().map(|a| a.count()).unwrap_or(0);
        if count != last {
            println!("{count}");
            last = count;
        }
    }
    consumer.unsubscribe();
    drop(consumer);
}

fn wait(what: &str, condition: impl Fn() -> bool) -> Duration {
    let start = Instant::now();
    while !condition() {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "{what}: no hand-over in 120 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    start.elapsed()
}

fn round(runtime: &tokio::runtime::Runtime, protocol: &str) -> [Duration; 4] {
    let topic = runtime.block_on(kafka::create_topic(PARTITIONS as i32));
    let group = format!("rebalance-{}", uuid::Uuid::new_v4().simple());
    let start = Instant::now();
    let a = Member::join(protocol, &group, &topic);
    wait("first join", || a.owned() == PARTITIONS);
    let first = start.elapsed();
    let start = Instant::now();
    let b = Member::join(protocol, &group, &topic);
    wait("second join", || {
        a.owned() + b.owned() == PARTITIONS && a.owned() > 0 && b.owned() > 0
    });
    let second = start.elapsed();
    let start = Instant::now();
    a.leave();
    wait("graceful leave", || b.owned() == PARTITIONS);
    let leave = start.elapsed();
    let c = Member::join(protocol, &group, &topic);
    wait("third join", || b.owned() > 0 && c.owned() > 0);
    let start = Instant::now();
    b.kill();
    wait("kill", || c.owned() == PARTITIONS);
    let kill = start.elapsed();
    c.leave();
    [first, second, leave, kill]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("member") {
        member(&args[2], &args[3], &args[4]);
        return;
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(kafka::require_broker(&kafka::brokers()));
    println!(
        "consumer-group hand-over, {ROUNDS} rounds, {PARTITIONS} partitions (ms: median / max)"
    );
    println!(
        "{:<10} {:>14} {:>14} {:>16} {:>16}",
        "protocol", "first join", "second join", "graceful leave", "kill"
    );
    for protocol in ["classic", "consumer"] {
        let mut rows: Vec<[Duration; 4]> = (0..ROUNDS).map(|_| round(&runtime, protocol)).collect();
        let mut cells = Vec::new();
        for column in 0..4 {
            rows.sort_by_key(|row| row[column]);
            let (median, max) = (rows[ROUNDS / 2][column], rows[ROUNDS - 1][column]);
            cells.push(format!("{} / {}", median.as_millis(), max.as_millis()));
        }
        println!(
            "{:<10} {:>14} {:>14} {:>16} {:>16}",
            protocol, cells[0], cells[1], cells[2], cells[3]
        );
    }
}
