//! Shared fixtures: a three-step saga, an in-process participant and reply pump that move
//! messages through the real outbox table (no broker), and queries over outbox and history.
#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use eventful_idempotency::{EventMeta, HandlerError, ProcessedEvents};
use eventful_outbox::Outbox;
use eventful_saga::{
    Command, CommandContext, Coordinator, Emitter, Participant, ReplyOutcome, SagaDefinition,
    SagaReply, SagaStatus, Step, StepKind,
};
use eventful_test_support::TestDatabase;
use serde::{Deserialize, Serialize};
use sqlx::{PgPool, Row as _};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub const SAGA: &str = "checkout";
pub const REPLIES: &str = "saga-replies";

/// Saga data; the `fail_at` / `silent_at` fields script the in-process participant.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Order {
    pub order_id: Uuid,
    pub sku: String,
    pub cents: i64,
    /// The participant refuses this step's action.
    #[serde(default)]
    pub fail_at: Option<usize>,
    /// The participant never answers this step's action.
    #[serde(default)]
    pub silent_at: Option<usize>,
    /// Set by the payment reply (merged into the data).
    #[serde(default)]
    pub payment_id: Option<String>,
}

impl Order {
    pub fn new() -> Self {
        Order {
            order_id: Uuid::now_v7(),
            sku: "sku-1".into(),
            cents: 4200,
            ..Order::default()
        }
    }
}

pub const STEP_TYPES: [(&str, &str, &str); 3] = [
    ("inventory", "ReserveStock", "ReleaseStock"),
    ("payments", "Charge", "Refund"),
    ("shipping", "Ship", "CancelShipment"),
];

/// reserve → pay → ship, every step compensable, each with `timeout`.
pub fn checkout(timeout: Duration, compensation_timeout: Duration) -> SagaDefinition<Order> {
    checkout_on(
        STEP_TYPES.map(|(t, _, _)| t.to_owned()),
        timeout,
        compensation_timeout,
    )
}

/// [`checkout`] with the command topics of the three steps given.
pub fn checkout_on(
    topics: [String; 3],
    timeout: Duration,
    compensation_timeout: Duration,
) -> SagaDefinition<Order> {
    let mut def = SagaDefinition::<Order>::new(SAGA);
    for (i, (_, action, undo)) in STEP_TYPES.iter().enumerate() {
        let topic = topics[i].clone();
        let name = ["reserve", "pay", "ship"][i];
        def = def.step(
            Step::new(
                name,
                Command::new(topic.clone(), *action, |o: &Order| {
                    serde_json::json!({
                        "order_id": o.order_id, "sku": o.sku, "cents": o.cents,
                        "fail_at": o.fail_at, "silent_at": o.silent_at,
                    })
                }),
            )
            .compensate_with(Command::new(topic, *undo, |o: &Order| {
                serde_json::json!({ "order_id": o.order_id, "payment_id": o.payment_id })
            }))
            .timeout(timeout)
            .compensation_timeout(compensation_timeout),
        );
    }
    def
}

pub struct Harness {
    pub db: TestDatabase,
    pub outbox: Outbox,
    pub coordinator: Coordinator,
}

impl Harness {
    pub async fn new(timeout: Duration) -> Harness {
        Self::with(timeout, Duration::from_secs(30), Duration::from_millis(50)).await
    }

    pub async fn with(
        timeout: Duration,
        compensation_timeout: Duration,
        scan_interval: Duration,
    ) -> Harness {
        eventful_test_support::init_tracing();
        let db = TestDatabase::create().await;
        let outbox = Outbox::new();
        let coordinator = coordinator(
            &db.pool,
            &outbox,
            timeout,
            compensation_timeout,
            scan_interval,
        );
        coordinator.migrate().await.unwrap();
        Harness {
            db,
            outbox,
            coordinator,
        }
    }

    pub async fn start(&self, order: &Order) -> Uuid {
        let mut tx = self.db.pool.begin().await.unwrap();
        let id = self.coordinator.start(&mut tx, SAGA, order).await.unwrap();
        tx.commit().await.unwrap();
        id
    }

    /// Applies `reply` in its own transaction and commits.
    pub async fn reply(&self, reply: &SagaReply) -> ReplyOutcome {
        let mut tx = self.db.pool.begin().await.unwrap();
        let out = self.coordinator.handle_reply(&mut tx, reply).await.unwrap();
        tx.commit().await.unwrap();
        out
    }

    /// Answers the latest command of `saga` (which must be `(step, kind)`) with `outcome`.
    pub async fn answer(&self, saga: Uuid, step: usize, kind: StepKind, ok: bool) -> ReplyOutcome {
        let last = commands(&self.db.pool, saga)
            .await
            .pop()
            .expect("a command");
        assert_eq!(
            (last.ctx.step, last.ctx.kind),
            (step, kind),
            "latest command of {saga}"
        );
        let reply = if ok {
            last.ctx.success()
        } else {
            last.ctx.failure("refused")
        };
        self.reply(&reply).await
    }

    pub async fn status(&self, saga: Uuid) -> SagaStatus {
        self.coordinator.inspect(saga).await.unwrap().status
    }
}

pub fn coordinator(
    pool: &PgPool,
    outbox: &Outbox,
    timeout: Duration,
    compensation_timeout: Duration,
    scan_interval: Duration,
) -> Coordinator {
    Coordinator::builder(pool.clone(), outbox.clone())
        .reply_topic(REPLIES)
        .saga(checkout(timeout, compensation_timeout))
        .scan_interval(scan_interval)
        .backoff(eventful_saga::Backoff::new(
            Duration::from_millis(50),
            Duration::MAX,
        ))
        .build()
        .unwrap()
}

/// A saga command read back from the outbox table.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub seq: i64,
    pub id: Uuid,
    pub topic: String,
    pub event_type: String,
    pub ctx: CommandContext,
    pub payload: serde_json::Value,
}

fn headers_of(row: &sqlx::postgres::PgRow) -> Vec<(String, String)> {
    let value: serde_json::Value = row.get("headers");
    serde_json::from_value(value).unwrap()
}

/// Every command the coordinator recorded for `saga`, in outbox order.
pub async fn commands(pool: &PgPool, saga: Uuid) -> Vec<Recorded> {
    sqlx::query(
        "SELECT seq, id, topic, event_type, payload, headers FROM eventful_outbox \
         WHERE key = $1 AND event_type <> 'eventful.saga.reply' ORDER BY seq",
    )
    .bind(saga.to_string())
    .fetch_all(pool)
    .await
    .unwrap()
    .iter()
    .map(|row| {
        let headers = headers_of(row);
        Recorded {
            seq: row.get("seq"),
            id: row.get("id"),
            topic: row.get("topic"),
            event_type: row.get("event_type"),
            ctx: CommandContext::from_headers(
                headers.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            )
            .unwrap(),
            payload: serde_json::from_slice(row.get::<&[u8], _>("payload")).unwrap(),
        }
    })
    .collect()
}

/// `(step, kind)` of every command of `saga`, in outbox order.
pub async fn command_log(pool: &PgPool, saga: Uuid) -> Vec<(usize, StepKind)> {
    commands(pool, saga)
        .await
        .into_iter()
        .map(|c| (c.ctx.step, c.ctx.kind))
        .collect()
}

/// The command log a saga must end with: actions `0..=last_action`, then the compensations
/// of `compensate` (highest first).
pub fn expected_log(last_action: usize, compensate: &[usize]) -> Vec<(usize, StepKind)> {
    let mut log: Vec<_> = (0..=last_action).map(|i| (i, StepKind::Action)).collect();
    log.extend(compensate.iter().map(|&i| (i, StepKind::Compensation)));
    log
}

/// Removes consecutive repeats of a compensation (re-sends) from a log.
pub fn without_resends(log: &[(usize, StepKind)]) -> Vec<(usize, StepKind)> {
    let mut out: Vec<(usize, StepKind)> = Vec::new();
    for entry in log {
        if entry.1 == StepKind::Compensation && out.last() == Some(entry) {
            continue;
        }
        out.push(*entry);
    }
    out
}

pub async fn outbox_count(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM eventful_outbox")
        .fetch_one(pool)
        .await
        .unwrap()
}

// ---------------------------------------------------------------------------------------
// In-process messaging through the outbox table (no broker): the participant handles each
// command with the real idempotency guard and the saga `Participant`/`Emitter` adapter,
// replying into the outbox; the reply pump feeds reply rows to `handle_reply`.

/// The scripted participant of every step: refuses `fail_at`, ignores `silent_at`,
/// acknowledges everything else (compensations included).
pub struct ScriptedParticipant;

#[async_trait::async_trait]
impl Participant for ScriptedParticipant {
    type Event = serde_json::Value;

    async fn handle(
        &self,
        cx: &mut Emitter<'_>,
        payload: serde_json::Value,
    ) -> Result<(), HandlerError> {
        let cmd = cx.command()?;
        let saga: Uuid = cmd.saga_id;
        let script = |field: &str| {
            payload
                .get(field)
                .and_then(|v| v.as_u64())
                .map(|v| v as usize)
        };
        let (fail_at, silent_at) = (script("fail_at"), script("silent_at"));
        // Record the effect (the participant's own state), in the same transaction.
        sqlx::query("INSERT INTO participant_effects (saga_id, step, kind, event_id) VALUES ($1, $2, $3, $4)")
            .bind(saga)
            .bind(cmd.step as i32)
            .bind(cmd.kind.as_str())
            .bind(cx.event().id)
            .execute(cx.conn())
            .await?;
        if cmd.kind == StepKind::Action && silent_at == Some(cmd.step) {
            return Ok(());
        }
        let reply = if cmd.kind == StepKind::Action && fail_at == Some(cmd.step) {
            cmd.failure("scripted refusal")
        } else if cmd.kind == StepKind::Action && cmd.step == 1 {
            cmd.success()
                .with_data(&serde_json::json!({ "payment_id": format!("pay-{saga}") }))
                .map_err(HandlerError::permanent)?
        } else {
            cmd.success()
        };
        cx.reply(&reply).await?;
        Ok(())
    }
}

pub async fn create_participant_table(pool: &PgPool) {
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS participant_effects ( \
            saga_id uuid NOT NULL, step int NOT NULL, kind text NOT NULL, event_id uuid NOT NULL, \
            at timestamptz NOT NULL DEFAULT clock_timestamp())",
    )
    .execute(pool)
    .await
    .unwrap();
}

fn meta_of(row: &sqlx::postgres::PgRow) -> EventMeta {
    let id: Uuid = row.get("id");
    let mut headers: Vec<(String, Vec<u8>)> = vec![
        ("event-id".into(), id.to_string().into_bytes()),
        (
            "event-type".into(),
            row.get::<String, _>("event_type").into_bytes(),
        ),
        (
            "content-type".into(),
            row.get::<String, _>("content_type").into_bytes(),
        ),
    ];
    headers.extend(
        headers_of(row)
            .into_iter()
            .map(|(k, v)| (k, v.into_bytes())),
    );
    let key: String = row.get("key");
    EventMeta::parse(
        row.get::<&str, _>("topic"),
        0,
        row.get("seq"),
        Some(key.as_bytes()),
        headers,
        Some(row.get::<&[u8], _>("payload")),
    )
    .unwrap()
}

const ROW: &str = "o.seq, o.id, o.topic, o.key, o.event_type, o.content_type, o.payload, o.headers";

/// One participant pass: handles up to `batch` unhandled commands, each in its own
/// transaction behind the guard `participants`. Returns how many it handled.
pub async fn participant_pass(pool: &PgPool, outbox: &Outbox, batch: i64) -> usize {
    let guard = ProcessedEvents::new("participants");
    let rows = sqlx::query(&format!(
        "SELECT {ROW} FROM eventful_outbox o WHERE o.event_type <> 'eventful.saga.reply' \
         AND NOT EXISTS (SELECT 1 FROM eventful_processed_events p \
                         WHERE p.consumer = 'participants' AND p.event_id = o.id) \
         ORDER BY o.seq LIMIT $1"
    ))
    .bind(batch)
    .fetch_all(pool)
    .await
    .unwrap();
    let mut handled = 0;
    for row in &rows {
        let meta = meta_of(row);
        let mut tx = pool.begin().await.unwrap();
        if !guard
            .check_and_record(&mut tx, meta.id)
            .await
            .unwrap()
            .is_first()
        {
            continue;
        }
        let payload = meta.decode::<serde_json::Value>().unwrap();
        let mut cx = Emitter::new(&mut tx, outbox, &meta);
        ScriptedParticipant.handle(&mut cx, payload).await.unwrap();
        tx.commit().await.unwrap();
        handled += 1;
    }
    handled
}

/// One reply-pump pass: feeds up to `batch` replies the coordinator has not processed
/// (its guard has no record of them) to `handle_reply`, each in its own transaction.
pub async fn reply_pass(pool: &PgPool, coordinator: &Coordinator, batch: i64) -> usize {
    let rows = sqlx::query(&format!(
        "SELECT {ROW} FROM eventful_outbox o WHERE o.event_type = 'eventful.saga.reply' \
         AND NOT EXISTS (SELECT 1 FROM eventful_processed_events p \
                         WHERE p.consumer = 'eventful-saga' AND p.event_id = o.id) \
         ORDER BY o.seq LIMIT $1"
    ))
    .bind(batch)
    .fetch_all(pool)
    .await
    .unwrap();
    let mut handled = 0;
    for row in &rows {
        let meta = meta_of(row);
        let reply = SagaReply::from_payload(meta.id, &meta.payload).unwrap();
        loop {
            let mut tx = pool.begin().await.unwrap();
            match coordinator.handle_reply(&mut tx, &reply).await {
                Ok(_) => {
                    tx.commit().await.unwrap();
                    break;
                }
                Err(e) if e.is_retryable() => continue,
                Err(e) => panic!("reply {}: {e}", reply.event_id),
            }
        }
        handled += 1;
    }
    handled
}

/// Runs `participant_pass` in a loop until cancelled.
pub fn spawn_participants(
    pool: PgPool,
    outbox: Outbox,
    cancel: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        while !cancel.is_cancelled() {
            if participant_pass(&pool, &outbox, 50).await == 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    })
}

/// Runs `reply_pass` in a loop until cancelled.
pub fn spawn_reply_pump(
    pool: PgPool,
    coordinator: Coordinator,
    cancel: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        while !cancel.is_cancelled() {
            if reply_pass(&pool, &coordinator, 50).await == 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    })
}

/// How many sagas are not yet terminal.
pub async fn in_flight(pool: &PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM eventful_saga_instances WHERE status IN ('running', 'compensating')",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}
