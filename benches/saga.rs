//! Coordinator throughput: three-step sagas completed per second on the real PostgreSQL.
//!
//! Run with `cargo bench --bench saga` (needs PostgreSQL at `DATABASE_URL`, default
//! `postgres://postgres@127.0.0.1:5432/postgres`; a fresh database is created per run).
//!
//! What one saga costs: `Coordinator::start` (one transaction: instance + history row + the
//! first command in the outbox), then three replies, each one `handle_reply` transaction
//! (duplicate guard insert, read, versioned `UPDATE`, history row, next command in the
//! outbox). So 4 transactions and ~17 statements per saga, all on PostgreSQL.
//!
//! In-process participants: a dispatcher reads the command rows the coordinator recorded in
//! the outbox table (by `seq`, with a look-back window and a seen-set so rows that commit
//! out of sequence order are not missed) and `WORKERS` tasks answer each command with a
//! success reply through `handle_reply`, each in its own transaction. No broker: this
//! measures the coordinator and its storage, not Kafka.
//!
//! Reading the result: `sagas/s` is completed sagas over wall time from the first start to
//! the last completion; `ceiling` is the rate of trivial one-row-insert transactions on the
//! same pool and concurrency (each saga needs 4 richer transactions, so 1/4 of the ceiling
//! is the upper bound). Machine load matters: check `uptime` alongside.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use eventful_outbox::Outbox;
use eventful_saga::{Command, CommandContext, Coordinator, SagaDefinition, Step};
use eventful_test_support::TestDatabase;
use sqlx::types::{Json, JsonValue};
use sqlx::PgPool;

const WORKERS: usize = 8;
const WARMUP: usize = 200;
const SAGAS: usize = 2_000;
const ROUNDS: usize = 3;

fn definition() -> SagaDefinition<JsonValue> {
    let step = |name: &str, topic: &str, action: &str, undo: &str| {
        Step::new(name, Command::new(topic, action, |d: &JsonValue| d.clone()))
            .compensate_with(Command::new(topic, undo, |d: &JsonValue| d.clone()))
            .timeout(Duration::from_secs(300))
    };
    SagaDefinition::new("checkout")
        .step(step("reserve", "inventory", "ReserveStock", "ReleaseStock"))
        .step(step("pay", "payments", "Charge", "Refund"))
        .step(step("ship", "shipping", "Ship", "CancelShipment"))
}

fn main() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let db = TestDatabase::create_with_pool_size(WORKERS as u32 + 4).await;
    let pool = db.pool.clone();
    let coordinator = Coordinator::builder(pool.clone(), Outbox::new())
        .saga(definition())
        .build()?;
    coordinator.migrate().await?;

    let ceiling = insert_ceiling(&pool).await?;
    println!("saga/ceiling: {ceiling:>8.0} one-row insert transactions/s ({WORKERS} connections)");

    run_round(&pool, &coordinator, WARMUP).await?;
    let mut rates = Vec::new();
    for round in 1..=ROUNDS {
        let (elapsed, rate) = run_round(&pool, &coordinator, SAGAS).await?;
        println!(
            "saga/three_steps: round {round}: {SAGAS} sagas completed in {:.2} s = {rate:>6.0} sagas/s ({:.0} coordinator transactions/s)",
            elapsed.as_secs_f64(),
            rate * 4.0
        );
        rates.push(rate);
    }
    rates.sort_by(f64::total_cmp);
    println!(
        "saga/three_steps: median {:.0} sagas/s (min {:.0}, max {:.0}; {WORKERS} workers, 2 runtime threads)",
        rates[rates.len() / 2],
        rates[0],
        rates[rates.len() - 1]
    );
    Ok(())
}

/// Starts `n` sagas with `WORKERS` concurrent starters while the participants answer;
/// returns the wall time until all `n` completed and the rate.
async fn run_round(
    pool: &PgPool,
    coordinator: &Coordinator,
    n: usize,
) -> anyhow::Result<(Duration, f64)> {
    let completed_before = completed(pool).await?;
    let first_seq: i64 = sqlx::query_scalar("SELECT COALESCE(max(seq), 0) FROM eventful_outbox")
        .fetch_one(pool)
        .await?;
    let done = Arc::new(AtomicBool::new(false));
    let begin = Instant::now();
    let participants = tokio::spawn(participants(
        pool.clone(),
        coordinator.clone(),
        first_seq,
        done.clone(),
    ));
    let next = Arc::new(AtomicUsize::new(0));
    let mut starters = Vec::new();
    for _ in 0..WORKERS {
        let (pool, coordinator, next) = (pool.clone(), coordinator.clone(), next.clone());
        starters.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < n {
                let mut tx = pool.begin().await?;
                let data: JsonValue = [("sku", "sku-1"), ("customer", "c-1")]
                    .into_iter()
                    .collect();
                coordinator.start(&mut tx, "checkout", &data).await?;
                tx.commit().await?;
            }
            anyhow::Ok(())
        }));
    }
    for s in starters {
        s.await??;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while completed(pool).await? < completed_before + n as i64 {
        anyhow::ensure!(
            Instant::now() < deadline,
            "sagas did not complete within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let elapsed = begin.elapsed();
    done.store(true, Ordering::Relaxed);
    participants.await??;
    Ok((elapsed, n as f64 / elapsed.as_secs_f64()))
}

async fn completed(pool: &PgPool) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM eventful_saga_instances WHERE status = 'completed'",
    )
    .fetch_one(pool)
    .await?)
}

/// `(seq, id, headers)` of a command row in the outbox table.
type CommandRow = (i64, uuid::Uuid, Json<Vec<(String, String)>>);

/// The in-process participants: read new command rows, answer each with success.
async fn participants(
    pool: PgPool,
    coordinator: Coordinator,
    first_seq: i64,
    done: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let (tx, rx) = async_channel(WORKERS * 64);
    let mut workers = Vec::new();
    for _ in 0..WORKERS {
        let (pool, coordinator, rx) = (pool.clone(), coordinator.clone(), rx.clone());
        workers.push(tokio::spawn(async move {
            while let Ok(ctx) = rx.recv().await {
                let reply = ctx.success();
                loop {
                    let mut tx = pool.begin().await?;
                    match coordinator.handle_reply(&mut tx, &reply).await {
                        Ok(_) => {
                            tx.commit().await?;
                            break;
                        }
                        Err(e) if e.is_retryable() => continue,
                        Err(e) => {
                            eprintln!("participant: {e}");
                            return Err(anyhow::Error::from(e));
                        }
                    }
                }
            }
            anyhow::Ok(())
        }));
    }
    drop(rx);
    // Rows may commit out of `seq` order: look back a window (smaller than the page, so the
    // page always reaches past `high`) and remember what was sent.
    let mut seen = HashSet::new();
    let mut high = first_seq;
    while !done.load(Ordering::Relaxed) {
        let rows: Vec<CommandRow> = sqlx::query_as(
            "SELECT seq, id, headers FROM eventful_outbox WHERE seq > $1 ORDER BY seq LIMIT 2000",
        )
        .bind((high - 200).max(first_seq))
        .fetch_all(&pool)
        .await?;
        let mut fresh = 0;
        for (seq, id, Json(headers)) in rows {
            high = high.max(seq);
            if !seen.insert(id) {
                continue;
            }
            fresh += 1;
            let ctx = CommandContext::from_headers(
                headers.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            )?;
            tx.send(ctx).await?;
        }
        if fresh == 0 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    drop(tx);
    for w in workers {
        w.await??;
    }
    Ok(())
}

/// A bounded multi-consumer channel from tokio primitives.
fn async_channel(capacity: usize) -> (tokio::sync::mpsc::Sender<CommandContext>, SharedReceiver) {
    let (tx, rx) = tokio::sync::mpsc::channel(capacity);
    (tx, SharedReceiver(Arc::new(tokio::sync::Mutex::new(rx))))
}

#[derive(Clone)]
struct SharedReceiver(Arc<tokio::sync::Mutex<tokio::sync::mpsc::Receiver<CommandContext>>>);

impl SharedReceiver {
    async fn recv(&self) -> Result<CommandContext, ()> {
        self.0.lock().await.recv().await.ok_or(())
    }
}

/// Trivial transactions/s on the same pool and concurrency, for scale.
async fn insert_ceiling(pool: &PgPool) -> anyhow::Result<f64> {
    sqlx::query("CREATE TABLE bench_ceiling (id bigserial PRIMARY KEY, v int NOT NULL)")
        .execute(pool)
        .await?;
    let n = 8_000usize;
    let next = Arc::new(AtomicUsize::new(0));
    let begin = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..WORKERS {
        let (pool, next) = (pool.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < n {
                let mut tx = pool.begin().await?;
                sqlx::query("INSERT INTO bench_ceiling (v) VALUES (1)")
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(n as f64 / begin.elapsed().as_secs_f64())
}
