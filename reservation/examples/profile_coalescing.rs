//! Where a reservation's time goes: server CPU vs client CPU per reservation on one hot SKU.
//!
//! Run with `cargo run --release -p eventful-reservation --example profile_coalescing -- K OPS COALESCE [MAX_BATCH] [BATCHES_IN_FLIGHT]`
//! (needs `redis-server`; starts a private one without persistence).

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use eventful_reservation::{RedisReservations, ReservationStore};

static NEXT: AtomicU64 = AtomicU64::new(0);

/// The private redis-server, killed on drop (also when a panic unwinds).
struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn proc_cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let after = stat.rsplit_once(')').unwrap().1;
    let f: Vec<&str> = after.split_whitespace().collect();
    // fields 14 and 15 (1-based) are utime, stime; `after` starts at field 3.
    let utime: f64 = f[11].parse().unwrap();
    let stime: f64 = f[12].parse().unwrap();
    (utime + stime) / 100.0
}

async fn info(conn: &mut redis::aio::MultiplexedConnection, section: &str) -> String {
    redis::cmd("INFO")
        .arg(section)
        .query_async(conn)
        .await
        .unwrap()
}

fn field(info: &str, name: &str) -> f64 {
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

fn cmdstat(info: &str, cmd: &str, key: &str) -> f64 {
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("cmdstat_{cmd}:")))
        .and_then(|rest| {
            rest.split(',')
                .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        })
        .map_or(0.0, |v| v.parse().unwrap())
}

async fn drive(store: &RedisReservations, ops: u64, k: usize) -> Duration {
    let left = Arc::new(AtomicU64::new(ops));
    let start = Instant::now();
    let tasks: Vec<_> = (0..k)
        .map(|_| {
            let (left, store) = (left.clone(), store.clone());
            tokio::spawn(async move {
                while left
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                    .is_ok()
                {
                    let id = format!("p{}", NEXT.fetch_add(1, Ordering::Relaxed));
                    store
                        .reserve(&id, &[("hot", 1)], Duration::from_secs(600))
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    start.elapsed()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize, d: &str| args.get(i).cloned().unwrap_or_else(|| d.to_owned());
    let k: usize = arg(1, "64").parse().unwrap();
    let ops: u64 = arg(2, "100000").parse().unwrap();
    let coalesce: bool = arg(3, "true").parse().unwrap();
    let max_batch: usize = arg(4, "128").parse().unwrap();
    let in_flight: usize = arg(5, "1").parse().unwrap();
    let port = eventful_test_support::spare_port();
    let _server = Server(
        Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--dir", "/tmp"])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        std::thread::sleep(Duration::from_millis(20));
    }
    let url = format!("redis://127.0.0.1:{port}");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let store = RedisReservations::builder(url.as_str())
            .namespace("prof")
            .coalesce(coalesce)
            .max_batch(max_batch)
            .batches_in_flight(in_flight)
            .connect()
            .await
            .unwrap();
        store.set_stock("hot", 1_000_000_000_000).await.unwrap();
        let mut admin = redis::Client::open(url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        drive(&store, ops / 5, k).await;
        let _: () = redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query_async(&mut admin)
            .await
            .unwrap();
        let cpu0 = info(&mut admin, "cpu").await;
        let me0 = proc_cpu_secs();
        let elapsed = drive(&store, ops, k).await;
        let me1 = proc_cpu_secs();
        let cpu1 = info(&mut admin, "cpu").await;
        let stats = info(&mut admin, "commandstats").await;
        let server_cpu = |i: &str| field(i, "used_cpu_user") + field(i, "used_cpu_sys");
        let server = server_cpu(&cpu1) - server_cpu(&cpu0);
        let client = me1 - me0;
        let per = |s: f64| s * 1e6 / ops as f64;
        let calls = cmdstat(&stats, "evalsha", "calls");
        let usec = cmdstat(&stats, "evalsha", "usec");
        println!(
            "K={k} coalesce={coalesce} max_batch={max_batch} in_flight={in_flight}: {:.0} ops/s, wall {:.2} µs/op; server cpu {:.2} µs/op (script {:.2} µs/op inside EVALSHA, {:.1} ops/script, {:.1} µs/script); client cpu {:.2} µs/op",
            ops as f64 / elapsed.as_secs_f64(),
            per(elapsed.as_secs_f64()),
            per(server),
            usec / ops as f64,
            ops as f64 / calls,
            usec / calls,
            per(client),
        );
        for line in stats.lines().filter(|l| l.starts_with("cmdstat_")) {
            println!("  {line}");
        }
    });
}
