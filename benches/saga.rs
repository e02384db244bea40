//! Coordinator throughput: three-step sagas completed per second on the real PostgreSQL.
//!
//! Run with `cargo bench --bench saga` (needs PostgreSQL at `DATABASE_URL`, default
//! `postgres://postgres@127.0.0.1:5432/postgres`; a fresh database is created per run).
//! `SAGA_BENCH_BATCH` (default 64, the inbox's default `max_batch`) bounds how many replies
//! one participant transaction applies; `SAGA_BENCH_BATCH=1` gives the old one-reply-per-
//! transaction figure.
//!
//! What one saga costs: `Coordinator::start` (one transaction: instance + history row + the
//! first command in the outbox), then three replies applied through the coordinator's
//! [`ReplyHandler`](eventful_saga::ReplyHandler) — the handler the product registers on its
//! reply consumer — each in a savepoint: duplicate guard insert + read, versioned `UPDATE` +
//! history row, next command in the outbox.
//!
//! Replies are applied the way the product's consumer runtime applies them: the inbox takes
//! what is waiting in a partition's queue (up to `max_batch`, never waiting for more) and
//! runs every handler in ONE transaction after one multi-row insert of its own guard (the
//! reply consumer's processed-event record). Each of the `WORKERS` participant tasks here is
//! such a partition: it takes the replies waiting in the channel (up to `SAGA_BENCH_BATCH`),
//! records their event ids with the same statement the inbox uses, hands the first
//! deliveries to the reply handler in one `handle_batch` call (the runtime does so for a
//! handler whose `applies_batches` is true, as the reply handler's is) and commits once; a retryable failure rolls the batch
//! back and applies it again. Until 2026-11 this bench committed every reply alone, which the
//! product never does when replies queue up.
//!
//! In-process participants: a dispatcher reads the command rows the coordinator recorded in
//! the outbox table (by `seq` above a floor that moves only past rows every transaction
//! that could still commit below it has ended (by xid and snapshot xmin), so rows committing
//! out of `seq` order are not missed; read-only, so the harness costs the database little)
//! and hands a success reply for each to the workers.
//! No broker: this measures the coordinator and its storage, not Kafka.
//!
//! Reading the result: `sagas/s` is completed sagas over wall time from the first start to
//! the last completion; `ceiling` is the rate of trivial one-row-insert transactions on the
//! same pool and concurrency (the starts alone are one transaction per saga). Machine load
//! matters: check `uptime` alongside.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use eventful_idempotency::{EventHandler as _, EventMeta, ProcessedEvents};
use eventful_outbox::Outbox;
use eventful_saga::{
    Command, CommandContext, Coordinator, ReplyHandler, SagaDefinition, Step, REPLY_EVENT_TYPE,
};
use eventful_test_support::TestDatabase;
use sqlx::types::{Json, JsonValue};
use sqlx::PgPool;

const WORKERS: usize = 8;
const WARMUP: usize = 200;
const SAGAS: usize = 2_000;
const ROUNDS: usize = 3;
/// The reply consumer's name (its inbox guard); must differ from the coordinator's guard.
const REPLY_CONSUMER: &str = "bench-saga-replies";

fn batch_limit() -> usize {
    std::env::var("SAGA_BENCH_BATCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64usize)
        .max(1)
}

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
        let (elapsed, started, rate) = run_round(&pool, &coordinator, SAGAS).await?;
        println!(
            "saga/three_steps: round {round}: {SAGAS} sagas completed in {:.2} s = {rate:>6.0} sagas/s ({:.0} replies/s; all started after {:.2} s)",
            elapsed.as_secs_f64(),
            rate * 3.0,
            started.as_secs_f64()
        );
        rates.push(rate);
    }
    rates.sort_by(f64::total_cmp);
    println!(
        "saga/three_steps: median {:.0} sagas/s (min {:.0}, max {:.0}; {WORKERS} workers, replies in batches of up to {}, 2 runtime threads)",
        rates[rates.len() / 2],
        rates[0],
        rates[rates.len() - 1],
        batch_limit()
    );
    Ok(())
}

/// Starts `n` sagas with `WORKERS` concurrent starters while the participants answer;
/// returns the wall time until all `n` completed and the rate.
async fn run_round(
    pool: &PgPool,
    coordinator: &Coordinator,
    n: usize,
) -> anyhow::Result<(Duration, Duration, f64)> {
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
    let started = begin.elapsed();
    let deadline = Instant::now() + Duration::from_secs(60);
    while completed(pool).await? < completed_before + n as i64 {
        if Instant::now() >= deadline {
            let stuck: Vec<(String, i32, i64, i64)> = sqlx::query_as(
                "SELECT i.status, i.current_step, i.version, \
                        (SELECT max(seq) FROM eventful_outbox o WHERE o.key = i.id::text) \
                 FROM eventful_saga_instances i WHERE status <> 'completed' LIMIT 5",
            )
            .fetch_all(pool)
            .await?;
            anyhow::bail!("sagas did not complete within 60 s (first_seq {first_seq}): {stuck:?}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let elapsed = begin.elapsed();
    done.store(true, Ordering::Relaxed);
    participants.await??;
    Ok((elapsed, started, n as f64 / elapsed.as_secs_f64()))
}

async fn completed(pool: &PgPool) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM eventful_saga_instances WHERE status = 'completed'",
    )
    .fetch_one(pool)
    .await?)
}

/// `(snapshot xmin, the poll's own xid, seq, id, headers)`: a poll's snapshot and a command row
/// of the outbox table (none when nothing is above the floor).
type PollRow = (
    i64,
    i64,
    Option<i64>,
    Option<uuid::Uuid>,
    Option<Json<Vec<(String, String)>>>,
);

/// The in-process participants: read new command rows, answer each with success.
async fn participants(
    pool: PgPool,
    coordinator: Coordinator,
    first_seq: i64,
    done: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let (tx, rx) = async_channel(WORKERS * 64);
    let limit = batch_limit();
    let mut workers = Vec::new();
    for _ in 0..WORKERS {
        let (pool, handler, rx) = (pool.clone(), coordinator.reply_handler(), rx.clone());
        let guard = ProcessedEvents::new(REPLY_CONSUMER);
        workers.push(tokio::spawn(async move {
            while let Some(batch) = rx.recv_batch(limit).await {
                let replies = batch
                    .iter()
                    .map(reply_event)
                    .collect::<anyhow::Result<Vec<_>>>()?;
                loop {
                    match apply_batch(&pool, &guard, &handler, &replies).await {
                        Ok(true) => break,
                        Ok(false) => continue,
                        Err(e) => {
                            eprintln!("participant: {e:#}");
                            return Err(e);
                        }
                    }
                }
            }
            anyhow::Ok(())
        }));
    }
    drop(rx);
    // Rows commit out of `seq` order. Each poll reads the rows above `floor` (seen ones are
    // skipped) and takes a fresh xid (`pg_current_xact_id()`, after its snapshot): every
    // transaction that drew a seq up to the highest one read held an older xid (all of them
    // write a row before they draw an outbox seq). Once a later poll's snapshot xmin has
    // passed that xid, those transactions have all ended, that poll saw their rows, and
    // `floor` moves up. Small read-only polls on the primary key (on a connection with
    // synchronous_commit off: the xid's commit need not wait for a WAL flush). A sweep from
    // the round's first row every 2 s checks it and prints what it finds.
    let mut conn = pool.acquire().await?;
    sqlx::query("SET synchronous_commit = off")
        .execute(&mut *conn)
        .await?;
    let mut seen = HashSet::new();
    let mut floor = first_seq;
    let mut last_sweep = Instant::now();
    let mut swept = 0usize;
    let mut pending: VecDeque<(i64, i64)> = VecDeque::new();
    // A round writes 4 command rows per saga: the sweep reads all of them in one page.
    const PAGE: usize = 4 * SAGAS + 1000;
    while !done.load(Ordering::Relaxed) {
        let rows: Vec<PollRow> = sqlx::query_as(
            "SELECT s.xmin, s.xmax, r.seq, r.id, r.headers FROM ( \
                 SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint AS xmin, \
                        pg_current_xact_id()::text::bigint AS xmax) s \
             LEFT JOIN LATERAL (SELECT seq, id, headers FROM eventful_outbox WHERE seq > $1 \
                                ORDER BY seq LIMIT $2) r ON true",
        )
        .bind(if last_sweep.elapsed() > Duration::from_secs(2) {
            last_sweep = Instant::now();
            first_seq
        } else {
            floor
        })
        .bind(PAGE as i64)
        .fetch_all(&mut *conn)
        .await?;
        let (xmin, xmax) = rows.first().map_or((0, 0), |r| (r.0, r.1));
        let mut fresh = 0;
        let mut last = floor;
        for (_, _, seq, _, headers) in &rows {
            let (Some(seq), Some(Json(headers))) = (seq, headers) else {
                continue;
            };
            last = *seq;
            if !seen.insert(*seq) {
                continue;
            }
            if *seq <= floor {
                swept += 1;
            }
            fresh += 1;
            let ctx = CommandContext::from_headers(
                headers.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            )?;
            tx.send(ctx).await?;
        }
        let full = rows.len() >= PAGE;
        let mut settled = floor;
        while let Some(&(px, pseq)) = pending.front() {
            if px > xmin {
                break;
            }
            settled = settled.max(pseq);
            pending.pop_front();
        }
        floor = floor.max(if full { settled.min(last) } else { settled });
        pending.push_back((xmax, last));
        if fresh == 0 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    if swept > 0 {
        eprintln!("saga bench: {swept} command rows found only by the sweep");
    }
    drop(tx);
    for w in workers {
        w.await??;
    }
    Ok(())
}

/// A reply as the consumer runtime sees it: envelope + JSON payload.
fn reply_event(ctx: &CommandContext) -> anyhow::Result<(EventMeta, JsonValue)> {
    let reply = ctx.success();
    let event_id = uuid::Uuid::now_v7();
    let meta = EventMeta::parse(
        "replies",
        0,
        0,
        Some(reply.saga_id.to_string().as_bytes()),
        vec![
            ("event-id".into(), event_id.to_string().into_bytes()),
            ("event-type".into(), REPLY_EVENT_TYPE.as_bytes().to_vec()),
        ],
        None,
    )?;
    Ok((meta, serde_json::to_value(&reply)?))
}

/// One inbox batch: the reply consumer's guard for every event id (the inbox's own
/// `check_and_record_many`), the reply handler for each first delivery on the same
/// transaction, one commit. `false`: a retryable failure rolled the batch back; apply it
/// again.
async fn apply_batch(
    pool: &PgPool,
    guard: &ProcessedEvents,
    handler: &ReplyHandler,
    replies: &[(EventMeta, JsonValue)],
) -> anyhow::Result<bool> {
    let mut tx = pool.begin().await?;
    let ids: Vec<uuid::Uuid> = replies.iter().map(|(m, _)| m.id).collect();
    let first = guard.check_and_record_many(&mut tx, &ids).await?;
    let fresh: Vec<(&EventMeta, JsonValue)> = replies
        .iter()
        .filter(|(meta, _)| first.contains(&meta.id))
        .map(|(meta, payload)| (meta, payload.clone()))
        .collect();
    // The runtime hands a run of first deliveries to a handler that applies batches (the
    // reply handler does) in one call, one call per event otherwise.
    let handled = if handler.applies_batches() {
        handler
            .handle_batch(&mut tx, fresh)
            .await
            .map_err(|f| f.error)
    } else {
        let mut handled = Ok(());
        for (meta, payload) in fresh {
            handled = handler.handle(&mut tx, meta, payload).await;
            if handled.is_err() {
                break;
            }
        }
        handled
    };
    match handled {
        Ok(()) => {}
        Err(e) if e.is_transient() => return Ok(false),
        Err(e) => anyhow::bail!("{e}"),
    }
    tx.commit().await?;
    Ok(true)
}

/// A bounded multi-consumer channel from tokio primitives.
fn async_channel(capacity: usize) -> (tokio::sync::mpsc::Sender<CommandContext>, SharedReceiver) {
    let (tx, rx) = tokio::sync::mpsc::channel(capacity);
    (tx, SharedReceiver(Arc::new(tokio::sync::Mutex::new(rx))))
}

#[derive(Clone)]
struct SharedReceiver(Arc<tokio::sync::Mutex<tokio::sync::mpsc::Receiver<CommandContext>>>);

impl SharedReceiver {
    /// Waits for one item, then takes what else is already waiting, up to `limit`.
    async fn recv_batch(&self, limit: usize) -> Option<Vec<CommandContext>> {
        let mut rx = self.0.lock().await;
        let mut batch = vec![rx.recv().await?];
        while batch.len() < limit {
            match rx.try_recv() {
                Ok(item) => batch.push(item),
                Err(_) => break,
            }
        }
        Some(batch)
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
