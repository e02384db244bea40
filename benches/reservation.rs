//! Reservation throughput: `eventful-reservation` on Redis against its ceiling
//! (`redis-benchmark` calling the same Lua script by `EVALSHA`) and against the
//! PostgreSQL alternative (a guarded `UPDATE` of a stock row), all in one run.
//!
//! Run with `cargo bench --bench reservation` (about 3 minutes; needs `redis-server`,
//! `redis-benchmark` and the local PostgreSQL).
//!
//! What it measures (ops/s; one op = one reservation, i.e. 2 script calls for
//! reserve+confirm / reserve+release, 1 for reserve alone):
//! - `reserve_confirm` and `reserve_release` on one hot SKU and on 1,000 SKUs, with 1- and
//!   5-item reservations, at 1, 16 and 64 requests in flight (one shared multiplexed
//!   connection, `TCP_NODELAY` on);
//! - the ceiling: `reserve` alone (1 item, hot SKU) at 1, 16, 64 in flight, next to
//!   `redis-benchmark` running the identical `EVALSHA` (same keys and arguments, unique
//!   reservation ids via `__rand_int__`) with `-c K` connections and with `-c 1 -P K`
//!   pipelining, and next to plain redis-rs sending that `EVALSHA` (no library: what
//!   the Rust client and runtime cost on their own);
//! - `pg_update`: `UPDATE stock SET available = available - $1 WHERE sku = $2 AND
//!   available >= $1` on one hot row through sqlx with K connections.
//!
//! Redis is a private `redis-server` (no persistence) started on a spare port, so other
//! tests' keys and the shared server's load do not interfere. Every measured run starts
//! from a flushed keyspace: reservations add keys at up to ~100k/s, and a run that
//! happens to hit a rehash of a large keyspace is markedly slower, which made unreset
//! runs incomparable. In the ceiling comparison every contender does the same number of
//! reservations from that same state, in rounds that rotate the order, and each
//! contender's median is kept (2 cores are shared by client, server and
//! `redis-benchmark`, and the VM's speed drifts between seconds).
//!
//! The client runtime is a one-worker multi-thread Tokio runtime by default: the server
//! takes the other core, and `redis-benchmark` is single-threaded too. A second worker
//! competes with the server on this 2-core machine and lowers every figure.
//!
//! The PostgreSQL `UPDATE` is one atomic hold, so compare it with `reserve`;
//! `reserve_confirm` is two round trips (a PostgreSQL flow with a confirm would be too).
//!
//! Coalescing (`coalesced` group and table): `RedisReservations::reserve` with request
//! coalescing on (concurrent calls of a namespace sent as one batch script) at 1, 16, 64
//! and 256 in flight, next to the same call with coalescing off (one script per call),
//! `redis-benchmark -c 1 -P K` running the single reserve script (the one-script-per-call
//! ceiling) and the PostgreSQL hot-row `UPDATE` with K connections, all measured in the
//! same rounds (median of `BENCH_ROUNDS`), with p50 / p99 latency per call. The rows of
//! the other groups use a store with coalescing off, so they stay comparable with
//! earlier runs.
//!
//! Redis Cluster (`cluster` group and table): reserve, coalesced, on a hot SKU in each of
//! 6 namespaces with 64 calls in flight per namespace, on a private local cluster of 1
//! master and of 3 masters (two namespaces per master, placed by their hash tag's slot);
//! the ratio is the scale-out. On a machine with fewer cores than masters + client the
//! masters share cores, which caps it.
//!
//! Knobs: `BENCH_THREADS` (Tokio workers, default 1; 0 = current-thread runtime),
//! `BENCH_CONNECTIONS` (multiplexed Redis connections, default 1), `BENCH_ROUNDS`
//! (ceiling rounds, default 5). Criterion filters work as usual, e.g.
//! `cargo bench --bench reservation -- ceiling`.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use eventful_reservation::{RedisReservations, ReservationStore};
use eventful_test_support::{spare_port, RedisCluster, TestDatabase};

const IN_FLIGHT: [usize; 3] = [1, 16, 64];
const COALESCED_IN_FLIGHT: [usize; 4] = [1, 16, 64, 256];
const SKUS: usize = 1000;
const HOT: &str = "hot";
const PLENTY: u64 = 1_000_000_000_000;
const TTL: Duration = Duration::from_secs(600);
const RETENTION: Duration = Duration::from_secs(5);

/// ops and time measured per benchmark id (summed over criterion's calls).
static RESULTS: Mutex<BTreeMap<String, (u64, Duration)>> = Mutex::new(BTreeMap::new());
static NEXT_ID: AtomicU64 = AtomicU64::new(0);
/// The private Redis, for [`reset`].
static ADMIN_URL: std::sync::OnceLock<String> = std::sync::OnceLock::new();

fn record(id: &str, ops: u64, elapsed: Duration) {
    let mut results = RESULTS.lock().unwrap();
    let entry = results.entry(id.to_owned()).or_default();
    entry.0 += ops;
    entry.1 += elapsed;
}

fn ops_per_sec(id: &str) -> Option<f64> {
    let results = RESULTS.lock().unwrap();
    let (ops, elapsed) = results.get(id)?;
    Some(*ops as f64 / elapsed.as_secs_f64())
}

/// A private redis-server without persistence, killed on drop.
struct PrivateRedis {
    child: Child,
    port: u16,
}

impl PrivateRedis {
    fn start() -> Self {
        let port = spare_port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--dir", "/tmp"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { child, port }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Median ops/s over the ceiling rounds of each contender.
struct Ceiling {
    ours: f64,
    redis_rs: f64,
    by_clients: f64,
    by_pipeline: f64,
}

fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples.get(samples.len() / 2).copied().unwrap_or(f64::NAN)
}

fn all_skus() -> impl Iterator<Item = String> {
    std::iter::once(HOT.to_owned())
        .chain((1..5).map(|j| format!("hot-{j}")))
        .chain((0..SKUS).map(|i| format!("sku-{i}")))
}

/// Empties the private Redis and stocks every SKU again (see the header: runs from an
/// unreset, growing keyspace are not comparable).
async fn reset(store: &RedisReservations) {
    // FLUSHALL of a few hundred thousand reservations can outlast the store's 1 s response
    // timeout on a loaded machine: its own connection, without a timeout.
    let url = ADMIN_URL.get().expect("admin url");
    let config = redis::AsyncConnectionConfig::new().set_response_timeout(None);
    let mut conn = redis::Client::open(url.as_str())
        .expect("admin client")
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .expect("admin connection");
    redis::cmd("FLUSHALL")
        .query_async::<()>(&mut conn)
        .await
        .expect("FLUSHALL");
    let skus: Vec<String> = all_skus().collect();
    futures::future::try_join_all(skus.iter().map(|sku| store.set_stock(sku, PLENTY)))
        .await
        .expect("set stock");
}

#[derive(Clone, Copy)]
enum Op {
    ReserveConfirm,
    ReserveRelease,
    Reserve,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::ReserveConfirm => "reserve_confirm",
            Op::ReserveRelease => "reserve_release",
            Op::Reserve => "reserve",
        }
    }
}

/// The SKUs of reservation `n`: the hot one(s), or spread over 1,000 SKUs.
fn skus_for(n: u64, hot: bool, items: usize) -> Vec<String> {
    (0..items as u64)
        .map(|j| {
            if hot {
                if j == 0 {
                    HOT.to_owned()
                } else {
                    format!("hot-{j}")
                }
            } else {
                format!("sku-{}", ((n * 5 + j) * 7919) % SKUS as u64)
            }
        })
        .collect()
}

async fn one(store: &RedisReservations, op: Op, hot: bool, items: usize) {
    let n = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let id = format!("b{n}");
    let skus = skus_for(n, hot, items);
    let list: Vec<(&str, u64)> = skus.iter().map(|s| (s.as_str(), 1)).collect();
    store.reserve(&id, &list, TTL).await.expect("reserve");
    match op {
        Op::ReserveConfirm => drop(store.confirm(&id).await.expect("confirm")),
        Op::ReserveRelease => drop(store.release(&id).await.expect("release")),
        Op::Reserve => {}
    }
}

/// Like [`drive`], also returning every operation's latency.
async fn drive_timed<F, Fut>(iters: u64, in_flight: usize, op: F) -> (Duration, Vec<Duration>)
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let left = Arc::new(AtomicU64::new(iters));
    let start = Instant::now();
    let tasks: Vec<_> = (0..in_flight)
        .map(|_| {
            let (left, op) = (left.clone(), op.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                while left
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                    .is_ok()
                {
                    let t = Instant::now();
                    op().await;
                    latencies.push(t.elapsed());
                }
                latencies
            })
        })
        .collect();
    let mut latencies = Vec::with_capacity(iters as usize);
    for task in tasks {
        latencies.extend(task.await.expect("bench task"));
    }
    (start.elapsed(), latencies)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// One contender in the coalescing comparison: ops/s and latency per call, per round.
#[derive(Default)]
struct Rounds {
    rates: Vec<f64>,
    p50: Vec<Duration>,
    p99: Vec<Duration>,
}

impl Rounds {
    fn push(&mut self, ops: u64, elapsed: Duration, mut latencies: Vec<Duration>) {
        latencies.sort();
        self.rates.push(ops as f64 / elapsed.as_secs_f64());
        self.p50.push(percentile(&latencies, 0.50));
        self.p99.push(percentile(&latencies, 0.99));
    }

    fn rate(&self) -> Option<f64> {
        (!self.rates.is_empty()).then(|| median(self.rates.clone()))
    }

    fn latency(&self) -> Option<(Duration, Duration)> {
        let med = |v: &[Duration]| {
            let mut v = v.to_vec();
            v.sort();
            v[v.len() / 2]
        };
        (!self.p50.is_empty()).then(|| (med(&self.p50), med(&self.p99)))
    }
}

/// The coalescing comparison at one K (medians over the rounds).
#[derive(Default)]
struct CoalescedRow {
    coalesced: Rounds,
    single: Rounds,
    by_pipeline: Vec<f64>,
    pg: Vec<f64>,
}

/// Runs `iters` operations with `in_flight` of them outstanding at any time (one task
/// per slot pulling from a shared counter) and returns the elapsed time.
async fn drive<F, Fut>(iters: u64, in_flight: usize, op: F) -> Duration
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let left = Arc::new(AtomicU64::new(iters));
    let start = Instant::now();
    let tasks: Vec<_> = (0..in_flight)
        .map(|_| {
            let (left, op) = (left.clone(), op.clone());
            tokio::spawn(async move {
                while left
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                    .is_ok()
                {
                    op().await;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("bench task");
    }
    start.elapsed()
}

/// The reserve `EVALSHA` sent by plain redis-rs (one multiplexed connection, `TCP_NODELAY`
/// on), with the keys and arguments the library would send: what is left of the gap to
/// `redis-benchmark` once the library is taken away.
#[derive(Clone)]
struct RawRedisRs {
    conn: redis::aio::MultiplexedConnection,
    script: Arc<redis::Script>,
    expiries_key: String,
    holds_key: String,
    stock_key: String,
    stock_prefix: String,
    reservation_prefix: String,
}

impl RawRedisRs {
    async fn connect(redis: &PrivateRedis, store: &RedisReservations) -> Self {
        use redis::IntoConnectionInfo;
        let tcp = redis::io::tcp::TcpSettings::default().set_nodelay(true);
        let info = redis
            .url()
            .into_connection_info()
            .expect("url")
            .set_tcp_settings(tcp);
        let conn = redis::Client::open(info)
            .expect("client")
            .get_multiplexed_async_connection()
            .await
            .expect("connect");
        let stock_key = store.stock_key(HOT);
        Self {
            conn,
            script: Arc::new(redis::Script::new(
                eventful_reservation::redis::reserve_script_source(),
            )),
            expiries_key: store.expiries_key().to_owned(),
            holds_key: store.holds_key().to_owned(),
            stock_prefix: stock_key.strip_suffix(HOT).expect("prefix").to_owned(),
            stock_key,
            reservation_prefix: store.reservation_key(""),
        }
    }

    async fn reserve(&self) {
        let id = format!("raw{}", NEXT_ID.fetch_add(1, Ordering::Relaxed));
        let reply: redis::Value = self
            .script
            .key(format!("{}{id}", self.reservation_prefix))
            .key(&self.expiries_key)
            .key(&self.holds_key)
            .key(&self.stock_key)
            .arg(&id)
            .arg(TTL.as_millis() as u64)
            .arg(RETENTION.as_millis() as u64)
            .arg(&self.stock_prefix)
            .arg(r#"["hot","1"]"#)
            .arg(1)
            .invoke_async(&mut self.conn.clone())
            .await
            .expect("EVALSHA");
        // An integer (the deadline) when the hold was created, else the reply array.
        assert!(
            matches!(reply, redis::Value::Int(_) | redis::Value::Array(_)),
            "{reply:?}"
        );
    }
}

/// ops/s of `ops` operations with `in_flight` outstanding, from a reset keyspace.
fn rate_after_reset<F, Fut>(
    rt: &tokio::runtime::Runtime,
    store: &RedisReservations,
    ops: u64,
    in_flight: usize,
    op: F,
) -> f64
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    rt.block_on(async {
        reset(store).await;
        let elapsed = drive(ops, in_flight, op).await;
        ops as f64 / elapsed.as_secs_f64()
    })
}

/// Runs `requests` reserve scripts with `redis-benchmark` and returns its requests/s.
fn redis_benchmark(
    redis: &PrivateRedis,
    store: &RedisReservations,
    clients: usize,
    pipeline: usize,
    requests: u64,
) -> f64 {
    let sha = {
        let out = Command::new("redis-cli")
            .args(["-p", &redis.port.to_string(), "SCRIPT", "LOAD"])
            .arg(eventful_reservation::redis::reserve_script_source())
            .output()
            .expect("redis-cli SCRIPT LOAD");
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    let stock_key = store.stock_key(HOT);
    let stock_prefix = stock_key.strip_suffix(HOT).unwrap().to_owned();
    let res_key = store.reservation_key("rb__rand_int__");
    let out = Command::new("redis-benchmark")
        .args(["-h", "127.0.0.1", "-p", &redis.port.to_string()])
        .args(["-c", &clients.to_string(), "-P", &pipeline.to_string()])
        .args(["-n", &requests.to_string(), "-r", "1000000000", "--csv"])
        .args([
            "EVALSHA",
            &sha,
            "4",
            &res_key,
            store.expiries_key(),
            store.holds_key(),
            &stock_key,
        ])
        .args([
            "rb__rand_int__",
            &TTL.as_millis().to_string(),
            &RETENTION.as_millis().to_string(),
            &stock_prefix,
        ])
        .args([r#"["hot","1"]"#, "1"])
        .output()
        .expect("run redis-benchmark");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let row = stdout
        .lines()
        .rev()
        .find(|line| line.starts_with("\"EVALSHA"))
        .unwrap_or_else(|| {
            panic!(
                "no result from redis-benchmark: {stdout} {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    // The command (first field) holds quotes and commas; the 7 numbers follow it.
    let fields: Vec<&str> = row.split(',').collect();
    fields[fields.len() - 7]
        .trim_matches('"')
        .parse()
        .expect("rps")
}

fn main() {
    let env = |name: &str, default: usize| -> usize {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    // BENCH_THREADS=0: a current-thread runtime; otherwise that many workers.
    let threads = env("BENCH_THREADS", 1);
    let rounds = env("BENCH_ROUNDS", 5).max(1);
    let rt = if threads == 0 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(threads);
        builder
    }
    .enable_all()
    .build()
    .expect("runtime");
    let redis = PrivateRedis::start();
    ADMIN_URL.set(redis.url()).expect("one private Redis");
    let store = rt.block_on(async {
        let store = RedisReservations::builder(redis.url().as_str())
            .namespace("bench")
            .retention(RETENTION)
            .connections(env("BENCH_CONNECTIONS", 1))
            .coalesce(false)
            .connect()
            .await
            .expect("connect");
        reset(&store).await;
        store
    });
    // The same namespace with coalescing on (the library's default).
    let coalesced = rt.block_on(async {
        RedisReservations::builder(redis.url().as_str())
            .namespace("bench")
            .retention(RETENTION)
            .connections(env("BENCH_CONNECTIONS", 1))
            .coalesce(true)
            .connect()
            .await
            .expect("connect")
    });
    let db = rt.block_on(async {
        let db = TestDatabase::create_with_pool_size(64).await;
        sqlx::query("CREATE TABLE stock (sku text PRIMARY KEY, available bigint NOT NULL)")
            .execute(&db.pool)
            .await
            .expect("create table");
        sqlx::query("INSERT INTO stock VALUES ($1, $2)")
            .bind(HOT)
            .bind(PLENTY as i64)
            .execute(&db.pool)
            .await
            .expect("insert");
        db
    });

    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_millis(1200))
        .without_plots()
        .configure_from_args();

    // Our operations.
    let mut group = c.benchmark_group("reservation");
    group.throughput(Throughput::Elements(1));
    for op in [Op::ReserveConfirm, Op::ReserveRelease] {
        for (layout, hot) in [("hot", true), ("1000skus", false)] {
            for items in [1usize, 5] {
                for k in IN_FLIGHT {
                    let id = format!("{}/{layout}/{items}item/{k}", op.name());
                    group.bench_function(BenchmarkId::from_parameter(&id), |b| {
                        b.to_async(&rt).iter_custom(|iters| {
                            let (store, id) = (store.clone(), id.clone());
                            async move {
                                reset(&store).await;
                                let elapsed = drive(iters, k, move || {
                                    let store = store.clone();
                                    async move { one(&store, op, hot, items).await }
                                })
                                .await;
                                record(&id, iters, elapsed);
                                elapsed
                            }
                        })
                    });
                }
            }
        }
    }
    group.finish();

    // The ceiling: reserve alone, ours vs plain redis-rs vs redis-benchmark on the
    // identical EVALSHA, each doing the same number of reservations from a reset keyspace.
    let raw = rt.block_on(RawRedisRs::connect(&redis, &store));
    let mut ceiling = BTreeMap::new();
    let mut group = c.benchmark_group("ceiling");
    group.throughput(Throughput::Elements(1));
    for k in IN_FLIGHT {
        let id = format!("reserve/hot/1item/{k}");
        group.bench_function(BenchmarkId::from_parameter(&id), |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let (store, id) = (store.clone(), id.clone());
                async move {
                    reset(&store).await;
                    let elapsed = drive(iters, k, move || {
                        let store = store.clone();
                        async move { one(&store, Op::Reserve, true, 1).await }
                    })
                    .await;
                    record(&id, iters, elapsed);
                    elapsed
                }
            })
        });
        if ops_per_sec(&id).is_none() {
            continue; // filtered out
        }
        let ops: u64 = if k == 1 { 20_000 } else { 100_000 };
        let ours_run = || {
            let handle = store.clone();
            rate_after_reset(&rt, &store, ops, k, move || {
                let store = handle.clone();
                async move { one(&store, Op::Reserve, true, 1).await }
            })
        };
        let raw_run = || {
            let raw = raw.clone();
            rate_after_reset(&rt, &store, ops, k, move || {
                let raw = raw.clone();
                async move { raw.reserve().await }
            })
        };
        let benchmark_run = |clients: usize, pipeline: usize| {
            rt.block_on(reset(&store));
            redis_benchmark(&redis, &store, clients, pipeline, ops)
        };
        let (mut ours, mut redis_rs, mut by_clients, mut by_pipeline) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for round in 0..rounds {
            // Rotate who goes first: a slow stretch of the VM should not always hit the
            // same contender.
            for turn in 0..4 {
                match (round + turn) % 4 {
                    0 => ours.push(ours_run()),
                    1 => redis_rs.push(raw_run()),
                    2 => by_clients.push(benchmark_run(k, 1)),
                    _ if k > 1 => by_pipeline.push(benchmark_run(1, k)),
                    _ => {}
                }
            }
        }
        let by_clients = median(by_clients);
        ceiling.insert(
            k,
            Ceiling {
                ours: median(ours),
                redis_rs: median(redis_rs),
                by_clients,
                by_pipeline: if k == 1 {
                    by_clients
                } else {
                    median(by_pipeline)
                },
            },
        );
    }
    group.finish();

    // Coalescing: reserve on the hot SKU with coalescing on, against coalescing off, the
    // one-script-per-call ceiling (redis-benchmark -c 1 -P K) and PostgreSQL, in the same
    // rounds; latency per call for ours.
    let mut coalesced_rows: BTreeMap<usize, CoalescedRow> = BTreeMap::new();
    let mut group = c.benchmark_group("coalesced");
    group.throughput(Throughput::Elements(1));
    for k in COALESCED_IN_FLIGHT {
        let id = format!("coalesced/reserve/hot/1item/{k}");
        group.bench_function(BenchmarkId::from_parameter(&id), |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let (store, id) = (coalesced.clone(), id.clone());
                async move {
                    reset(&store).await;
                    let elapsed = drive(iters, k, move || {
                        let store = store.clone();
                        async move { one(&store, Op::Reserve, true, 1).await }
                    })
                    .await;
                    record(&id, iters, elapsed);
                    elapsed
                }
            })
        });
        if ops_per_sec(&id).is_none() {
            continue; // filtered out
        }
        let ops: u64 = if k == 1 { 20_000 } else { 100_000 };
        let timed = |store: &RedisReservations| {
            let handle = store.clone();
            rt.block_on(async {
                reset(store).await;
                drive_timed(ops, k, move || {
                    let store = handle.clone();
                    async move { one(&store, Op::Reserve, true, 1).await }
                })
                .await
            })
        };
        let pg_ops: u64 = if k == 1 { 2_000 } else { 4_000 };
        let pg_run = || {
            let pool = db.pool.clone();
            rt.block_on(async move {
                let elapsed = drive(pg_ops, k, move || {
                    let pool = pool.clone();
                    async move { pg_reserve(&pool).await }
                })
                .await;
                pg_ops as f64 / elapsed.as_secs_f64()
            })
        };
        let row = coalesced_rows.entry(k).or_default();
        for round in 0..rounds {
            for turn in 0..4 {
                match (round + turn) % 4 {
                    0 => {
                        let (elapsed, latencies) = timed(&coalesced);
                        row.coalesced.push(ops, elapsed, latencies);
                    }
                    1 => {
                        let (elapsed, latencies) = timed(&store);
                        row.single.push(ops, elapsed, latencies);
                    }
                    2 => {
                        rt.block_on(reset(&store));
                        row.by_pipeline
                            .push(redis_benchmark(&redis, &store, 1, k, ops));
                    }
                    // The pool has 64 connections: K=256 would only queue on it.
                    _ if k <= 64 => row.pg.push(pg_run()),
                    _ => {}
                }
            }
        }
    }
    group.finish();

    // Scale-out on a local Redis Cluster: 6 namespaces on 1 master vs on 3 masters.
    let mut cluster_rates: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
    let mut group = c.benchmark_group("cluster");
    group.throughput(Throughput::Elements(1));
    for masters in CLUSTER_MASTERS {
        let id = format!("cluster/reserve/hot/{masters}masters");
        // Started only if the filter selects the row (criterion calls the closure then).
        let stores: Mutex<Option<(RedisCluster, Vec<RedisReservations>)>> = Mutex::new(None);
        group.bench_function(BenchmarkId::from_parameter(&id), |b| {
            if stores.lock().unwrap().is_none() {
                *stores.lock().unwrap() = Some(rt.block_on(cluster_stores(masters)));
            }
            let namespaces = stores.lock().unwrap().as_ref().unwrap().1.clone();
            b.to_async(&rt).iter_custom(|iters| {
                let (namespaces, id) = (namespaces.clone(), id.clone());
                async move {
                    let elapsed = drive_namespaces(&namespaces, iters).await;
                    record(&id, iters, elapsed);
                    elapsed
                }
            })
        });
        let Some((_cluster, namespaces)) = stores.lock().unwrap().take() else {
            continue; // filtered out
        };
        for _ in 0..rounds {
            let ops = 60_000 * CLUSTER_NAMESPACES as u64;
            let elapsed = rt.block_on(drive_namespaces(&namespaces, ops));
            cluster_rates
                .entry(masters)
                .or_default()
                .push(ops as f64 / elapsed.as_secs_f64());
        }
    }
    group.finish();

    // The PostgreSQL alternative on the hot row.
    let mut group = c.benchmark_group("postgres");
    group.throughput(Throughput::Elements(1));
    for k in IN_FLIGHT {
        let id = format!("pg_update/hot/{k}");
        group.bench_function(BenchmarkId::from_parameter(&id), |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let (pool, id) = (db.pool.clone(), id.clone());
                async move {
                    let elapsed = drive(iters, k, move || {
                        let pool = pool.clone();
                        async move { pg_reserve(&pool).await }
                    })
                    .await;
                    record(&id, iters, elapsed);
                    elapsed
                }
            })
        });
    }
    group.finish();
    c.final_summary();

    print_table(&ceiling);
    print_coalesced(&coalesced_rows);
    print_cluster(&cluster_rates);
}

const CLUSTER_MASTERS: [usize; 2] = [1, 3];
const CLUSTER_NAMESPACES: usize = 6;
const CLUSTER_IN_FLIGHT: usize = 64;

/// A private cluster of `masters` and one coalescing store per namespace, the namespaces
/// spread evenly over the masters (by their hash tag's slot), each with a stocked hot SKU.
async fn cluster_stores(masters: usize) -> (RedisCluster, Vec<RedisReservations>) {
    let cluster = RedisCluster::with_masters(masters).await;
    let per_master = CLUSTER_NAMESPACES / masters;
    let mut placed: Vec<(String, usize)> = Vec::new();
    for n in 0.. {
        let namespace = format!("bench-{n}");
        let node = cluster.node_of(&format!("{{{namespace}}}")).await;
        if placed.iter().filter(|(_, at)| *at == node).count() < per_master {
            placed.push((namespace, node));
        }
        if placed.len() == CLUSTER_NAMESPACES {
            break;
        }
    }
    let mut stores = Vec::new();
    for (namespace, _) in placed {
        let store = RedisReservations::builder_cluster(cluster.urls())
            .coalesce(true)
            .namespace(namespace)
            .retention(RETENTION)
            .connect()
            .await
            .expect("connect to the cluster");
        store.set_stock(HOT, PLENTY).await.expect("set stock");
        stores.push(store);
    }
    (cluster, stores)
}

/// `ops` reservations split over the namespaces, each with 64 in flight; the elapsed time.
async fn drive_namespaces(stores: &[RedisReservations], ops: u64) -> Duration {
    let share = ops.div_ceil(stores.len() as u64);
    let start = Instant::now();
    let runs: Vec<_> = stores
        .iter()
        .map(|store| {
            let store = store.clone();
            tokio::spawn(async move {
                drive(share, CLUSTER_IN_FLIGHT, move || {
                    let store = store.clone();
                    async move { one(&store, Op::Reserve, true, 1).await }
                })
                .await
            })
        })
        .collect();
    for run in runs {
        run.await.expect("namespace run");
    }
    start.elapsed()
}

fn print_cluster(rates: &BTreeMap<usize, Vec<f64>>) {
    if rates.is_empty() {
        return;
    }
    println!(
        "\nRedis Cluster: reserve, coalesced, hot SKU per namespace, {CLUSTER_NAMESPACES} namespaces x {CLUSTER_IN_FLIGHT} in flight (median of the rounds; ops/s)"
    );
    let rate = |m: usize| rates.get(&m).map(|v| median(v.clone()));
    for m in CLUSTER_MASTERS {
        if let Some(r) = rate(m) {
            println!("  {m} master(s): {r:>10.0}");
        }
    }
    if let (Some(one), Some(three)) = (rate(1), rate(3)) {
        println!("  scale-out 1 -> 3 masters: {:.2}x", three / one);
    }
}

/// The PostgreSQL alternative to one reservation: a guarded hot-row `UPDATE`.
async fn pg_reserve(pool: &sqlx::PgPool) {
    let done = sqlx::query(
        "UPDATE stock SET available = available - $1 WHERE sku = $2 AND available >= $1",
    )
    .bind(1i64)
    .bind(HOT)
    .execute(pool)
    .await
    .expect("update");
    assert_eq!(done.rows_affected(), 1);
}

fn print_coalesced(rows: &BTreeMap<usize, CoalescedRow>) {
    if rows.is_empty() {
        return;
    }
    let ks = COALESCED_IN_FLIGHT;
    println!(
        "\ncoalescing: reserve, 1 item, hot SKU (median of the rounds; same reservations from a reset keyspace)"
    );
    println!(
        "{:<44} {:>13} {:>13} {:>13} {:>13}",
        "K in flight", "K=1", "K=16", "K=64", "K=256"
    );
    let line = |label: &str, cell: &dyn Fn(&CoalescedRow) -> Option<String>| {
        let cells: Vec<String> = ks
            .iter()
            .map(|k| rows.get(k).and_then(cell).unwrap_or_else(|| "-".to_owned()))
            .collect();
        println!(
            "{label:<44} {:>13} {:>13} {:>13} {:>13}",
            cells[0], cells[1], cells[2], cells[3]
        );
    };
    let rate = |v: Option<f64>| v.map(|v| format!("{v:.0}"));
    let lat = |l: Option<(Duration, Duration)>| {
        l.map(|(p50, p99)| format!("{}/{}", p50.as_micros(), p99.as_micros()))
    };
    line("reserve, coalesced (ops/s)", &|r| rate(r.coalesced.rate()));
    line("  p50/p99 per call (µs)", &|r| lat(r.coalesced.latency()));
    line("reserve, one script per call (ops/s)", &|r| {
        rate(r.single.rate())
    });
    line("  p50/p99 per call (µs)", &|r| lat(r.single.latency()));
    line("redis-benchmark -c 1 -P K, same script", &|r| {
        rate((!r.by_pipeline.is_empty()).then(|| median(r.by_pipeline.clone())))
    });
    line("PostgreSQL hot-row UPDATE, K connections", &|r| {
        rate((!r.pg.is_empty()).then(|| median(r.pg.clone())))
    });
    println!("ratios:");
    for (k, r) in rows {
        let ours = r.coalesced.rate().unwrap_or(f64::NAN);
        let ceiling = median(r.by_pipeline.clone());
        let single = r.single.rate().unwrap_or(f64::NAN);
        print!(
            "  K={k:<3} coalesced: {:>5.2}x redis-benchmark -c 1 -P {k}, {:>5.2}x one script per call",
            ours / ceiling,
            ours / single
        );
        if !r.pg.is_empty() {
            print!(", {:>6.1}x PostgreSQL", ours / median(r.pg.clone()));
        }
        println!();
    }
    if let (Some(c), Some(s)) = (
        rows.get(&1).and_then(|r| r.coalesced.latency()),
        rows.get(&1).and_then(|r| r.single.latency()),
    ) {
        println!(
            "  K=1   latency cost of coalescing: p50 {:+} µs, p99 {:+} µs",
            c.0.as_micros() as i64 - s.0.as_micros() as i64,
            c.1.as_micros() as i64 - s.1.as_micros() as i64
        );
    }
}

fn print_table(ceiling: &BTreeMap<usize, Ceiling>) {
    let uptime = Command::new("uptime")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    println!("\n=== eventful-reservation throughput (ops/s; one op = one reservation) ===");
    println!("load: {}", uptime.unwrap_or_default());
    println!(
        "{:<36} {:>10} {:>10} {:>10}",
        "criterion runs", "K=1", "K=16", "K=64"
    );
    let fmt = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.0}"));
    let row = |label: &str, cells: Vec<String>| {
        println!(
            "{label:<36} {:>10} {:>10} {:>10}",
            cells[0], cells[1], cells[2]
        );
    };
    let ids: Vec<String> = {
        let results = RESULTS.lock().unwrap();
        let mut ids: Vec<String> = results
            .keys()
            // The coalesced and cluster rows have their own tables below.
            .filter(|id| !id.starts_with("coalesced/") && !id.starts_with("cluster/"))
            .filter_map(|id| id.rsplit_once('/').map(|(base, _)| base.to_owned()))
            .collect();
        ids.dedup();
        ids
    };
    for base in &ids {
        row(
            base,
            IN_FLIGHT
                .iter()
                .map(|k| fmt(ops_per_sec(&format!("{base}/{k}"))))
                .collect(),
        );
    }
    if !ceiling.is_empty() {
        println!("ceiling (median of the rounds; same reservations from a reset keyspace):");
        let pick = |f: fn(&Ceiling) -> f64| -> Vec<String> {
            IN_FLIGHT
                .iter()
                .map(|k| fmt(ceiling.get(k).map(f)))
                .collect()
        };
        row("reserve/hot/1item (ours)", pick(|c| c.ours));
        row("redis-rs EVALSHA (no library)", pick(|c| c.redis_rs));
        row("redis-benchmark -c K -P 1", pick(|c| c.by_clients));
        row("redis-benchmark -c 1 -P K", pick(|c| c.by_pipeline));
    }
    println!("\nratios at matching concurrency K:");
    for k in IN_FLIGHT {
        if let Some(c) = ceiling.get(&k) {
            println!(
                "  K={k:<3} reserve vs redis-benchmark: {:>5.1}% of -c {k} -P 1, {:>5.1}% of -c 1 -P {k}; vs plain redis-rs: {:>5.1}%",
                100.0 * c.ours / c.by_clients,
                100.0 * c.ours / c.by_pipeline,
                100.0 * c.ours / c.redis_rs
            );
        }
        let pg = ops_per_sec(&format!("pg_update/hot/{k}"));
        for base in [
            "reserve/hot/1item",
            "reserve_confirm/hot/1item",
            "reserve_release/hot/1item",
        ] {
            if let (Some(ours), Some(pg)) = (ops_per_sec(&format!("{base}/{k}")), pg) {
                println!(
                    "  K={k:<3} {base} vs PostgreSQL hot-row UPDATE: {:>6.1}x",
                    ours / pg
                );
            }
        }
    }
}
