//! The batch guarantees, driven without Kafka: a partition worker fed from a pre-filled
//! queue (so batches are deterministic) against a real PostgreSQL database.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use eventful_test_support::TestDatabase;
use sqlx::{PgConnection, PgPool};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::partition::{run_partition, OffsetStore, RawMessage};
use super::{dead_letter, DeliveryHook, Settings, Typed, UnknownEventType};
use crate::{
    BatchFailure, Delivery, EventHandler, EventMeta, HandlerError, Outcome, ProcessedEvents,
};

const TOPIC: &str = "orders";

#[derive(serde::Deserialize)]
struct Payload {
    n: i64,
    #[serde(default)]
    poison: bool,
    #[serde(default)]
    panic: bool,
    /// Fails transiently this many times.
    #[serde(default)]
    flaky: u32,
}

/// Writes `(event id, n, the transaction id)` per application; counts calls per event.
#[derive(Clone, Default)]
struct Record {
    calls: Arc<Mutex<HashMap<i64, u32>>>,
}

impl Record {
    fn calls(&self, n: i64) -> u32 {
        self.calls.lock().unwrap().get(&n).copied().unwrap_or(0)
    }
}

#[async_trait]
impl EventHandler for Record {
    type Payload = Payload;

    async fn handle(
        &self,
        tx: &mut PgConnection,
        event: &EventMeta,
        payload: Payload,
    ) -> Result<(), HandlerError> {
        let call = {
            let mut calls = self.calls.lock().unwrap();
            let call = calls.entry(payload.n).or_default();
            *call += 1;
            *call
        };
        // Write first, then fail: a rollback must discard the write.
        sqlx::query("INSERT INTO effects (event_id, n, txid) VALUES ($1, $2, txid_current())")
            .bind(event.id)
            .bind(payload.n)
            .execute(&mut *tx)
            .await?;
        if payload.poison {
            return Err(HandlerError::permanent(format!("poisoned {}", payload.n)));
        }
        if payload.panic {
            let steps: Vec<u32> = Vec::new();
            let _ = steps[usize::try_from(payload.n).unwrap()];
        }
        if call <= payload.flaky {
            return Err(HandlerError::transient(format!("flaky call {call}")));
        }
        Ok(())
    }
}

#[derive(Default)]
struct Offsets(Mutex<Vec<i64>>);

impl OffsetStore for Arc<Offsets> {
    fn store(&self, _topic: &str, _partition: i32, next_offset: i64) {
        self.0.lock().unwrap().push(next_offset);
    }
}

impl Offsets {
    fn stored(&self) -> Vec<i64> {
        self.0.lock().unwrap().clone()
    }
}

async fn database() -> TestDatabase {
    let db = TestDatabase::create_with_pool_size(4).await;
    crate::migrate(&db.pool).await.unwrap();
    sqlx::query(
        "CREATE TABLE effects (seq bigserial PRIMARY KEY, event_id uuid NOT NULL, \
         n bigint NOT NULL, txid bigint NOT NULL)",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    db
}

fn message(offset: i64, id: Uuid, payload: serde_json::Value) -> RawMessage {
    RawMessage {
        topic: TOPIC.into(),
        partition: 0,
        offset,
        key: Some(b"k".to_vec()),
        payload: Some(serde_json::to_vec(&payload).unwrap()),
        headers: vec![
            ("event-id".into(), id.to_string().into_bytes()),
            ("event-type".into(), b"OrderPlaced".to_vec()),
            ("content-type".into(), b"application/json".to_vec()),
        ],
    }
}

/// `n` events at offsets `0..n`, payload `{"n": i}` plus `extra(i)`.
fn events(ids: &[Uuid], extra: impl Fn(i64) -> serde_json::Value) -> Vec<RawMessage> {
    ids.iter()
        .enumerate()
        .map(|(i, id)| {
            let i = i as i64;
            let mut payload = serde_json::json!({ "n": i });
            if let (Some(payload), serde_json::Value::Object(extra)) =
                (payload.as_object_mut(), extra(i))
            {
                payload.extend(extra);
            }
            message(i, *id, payload)
        })
        .collect()
}

type Log = Arc<Mutex<Vec<Delivery>>>;

fn settings(
    pool: &PgPool,
    handler: impl EventHandler,
    max_batch: usize,
    hook: DeliveryHook,
) -> Settings {
    let mut handlers: HashMap<String, Arc<dyn super::ErasedHandler>> = HashMap::new();
    handlers.insert("OrderPlaced".into(), Arc::new(Typed(handler)));
    Settings {
        pool: pool.clone(),
        guard: ProcessedEvents::new("batch"),
        handlers,
        unknown: UnknownEventType::Skip,
        dead_letter: dead_letter::Destination::Table,
        backoff: eventful_core::Backoff::new(Duration::from_millis(5), Duration::from_millis(20)),
        max_attempts: None,
        max_panic_attempts: 3,
        max_batch,
        on_delivery: Some(hook),
    }
}

fn logging(log: &Log) -> DeliveryHook {
    let log = log.clone();
    Arc::new(move |delivery| {
        log.lock().unwrap().push(delivery);
        Box::pin(async {})
    })
}

/// Queues every message, then runs one worker until the queue is drained.
async fn run(settings: Settings, offsets: &Arc<Offsets>, messages: Vec<RawMessage>) {
    let (sender, receiver) = mpsc::channel(messages.len().max(1));
    for message in messages {
        sender.try_send(message).unwrap();
    }
    drop(sender);
    let (done, _) = oneshot::channel();
    let offsets: Arc<dyn OffsetStore> = Arc::new(offsets.clone());
    tokio::time::timeout(
        Duration::from_secs(60),
        run_partition(
            Arc::new(settings),
            offsets,
            receiver,
            CancellationToken::new(),
            Vec::new(),
            done,
        ),
    )
    .await
    .expect("the worker drains its queue");
}

/// `(n, txid)` of every committed effect, in commit order.
async fn effects(pool: &PgPool) -> Vec<(i64, i64)> {
    sqlx::query_as("SELECT n, txid FROM effects ORDER BY seq")
        .fetch_all(pool)
        .await
        .unwrap()
}

fn outcomes(log: &Log) -> Vec<(i64, Outcome, u32)> {
    log.lock()
        .unwrap()
        .iter()
        .map(|d| (d.offset, d.outcome.clone(), d.attempts))
        .collect()
}

fn ids(n: usize) -> Vec<Uuid> {
    (0..n).map(|_| Uuid::now_v7()).collect()
}

/// [`Record`] that takes runs of events through `handle_batch` and logs each run's length.
#[derive(Clone, Default)]
struct RunRecord {
    record: Record,
    runs: Arc<Mutex<Vec<usize>>>,
}

#[async_trait]
impl EventHandler for RunRecord {
    type Payload = Payload;

    async fn handle(
        &self,
        tx: &mut PgConnection,
        event: &EventMeta,
        payload: Payload,
    ) -> Result<(), HandlerError> {
        self.record.handle(tx, event, payload).await
    }

    fn applies_batches(&self) -> bool {
        true
    }

    async fn handle_batch(
        &self,
        tx: &mut PgConnection,
        events: Vec<(&EventMeta, Payload)>,
    ) -> Result<(), BatchFailure> {
        self.runs.lock().unwrap().push(events.len());
        for (index, (event, payload)) in events.into_iter().enumerate() {
            self.record
                .handle(tx, event, payload)
                .await
                .map_err(|e| BatchFailure::new(index, e))?;
        }
        Ok(())
    }
}

#[tokio::test]
async fn a_handler_that_applies_batches_gets_each_run_in_one_call() {
    let db = database().await;
    let (handler, log, offsets) = (RunRecord::default(), Log::default(), Arc::default());
    let messages = events(&ids(10), |_| serde_json::json!({}));
    run(
        settings(&db.pool, handler.clone(), 64, logging(&log)),
        &offsets,
        messages,
    )
    .await;

    assert_eq!(*handler.runs.lock().unwrap(), vec![10]);
    let effects = effects(&db.pool).await;
    let order: Vec<i64> = effects.iter().map(|e| e.0).collect();
    assert_eq!(order, (0..10).collect::<Vec<_>>());
    assert!(
        effects.iter().all(|e| e.1 == effects[0].1),
        "one transaction: {effects:?}"
    );
    assert_eq!(offsets.stored(), (1..=10).collect::<Vec<_>>());
}

/// A run whose handler reports the failing position: that event alone is retried and
/// dead-lettered (through `handle`), the events before it are applied again as a run, the
/// ones after it as the next run; each effect commits once, in order.
#[tokio::test]
async fn a_failure_reported_inside_a_run_is_pinned_on_its_event() {
    let db = database().await;
    let (handler, log, offsets) = (RunRecord::default(), Log::default(), Arc::default());
    let ids = ids(10);
    let messages = events(&ids, |i| serde_json::json!({ "poison": i == 5 }));
    run(
        settings(&db.pool, handler.clone(), 64, logging(&log)),
        &offsets,
        messages,
    )
    .await;

    let order: Vec<i64> = effects(&db.pool).await.iter().map(|e| e.0).collect();
    assert_eq!(order, vec![0, 1, 2, 3, 4, 6, 7, 8, 9]);
    assert_eq!(
        *handler.runs.lock().unwrap(),
        vec![10, 5, 4],
        "the whole run, then the five before the poison, then the four after it"
    );
    assert_eq!(handler.record.calls(5), 2, "in the run, then alone");
    let dead: Uuid =
        sqlx::query_scalar("SELECT event_id FROM eventful_dead_letters WHERE consumer = 'batch'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(dead, ids[5]);
    assert_eq!(offsets.stored(), (1..=10).collect::<Vec<_>>());
    assert!(outcomes(&log)
        .iter()
        .all(|(offset, outcome, _)| (*offset == 5) != (*outcome == Outcome::Applied)));
}

#[tokio::test]
async fn a_batch_applies_its_events_in_one_transaction_in_order() {
    let db = database().await;
    let (handler, log, offsets) = (Record::default(), Log::default(), Arc::default());
    let messages = events(&ids(10), |_| serde_json::json!({}));
    run(
        settings(&db.pool, handler, 64, logging(&log)),
        &offsets,
        messages,
    )
    .await;

    let effects = effects(&db.pool).await;
    let order: Vec<i64> = effects.iter().map(|e| e.0).collect();
    assert_eq!(order, (0..10).collect::<Vec<_>>());
    // All ten were queued before the worker started: one transaction.
    assert!(
        effects.iter().all(|e| e.1 == effects[0].1),
        "one transaction: {effects:?}"
    );
    assert_eq!(offsets.stored(), (1..=10).collect::<Vec<_>>());
    assert!(outcomes(&log)
        .iter()
        .all(|(_, outcome, attempts)| *outcome == Outcome::Applied && *attempts == 1));
}

#[tokio::test]
async fn a_poison_event_in_a_batch_is_retried_and_dead_lettered_alone_and_its_neighbours_apply_once(
) {
    let db = database().await;
    let (handler, log, offsets) = (Record::default(), Log::default(), Arc::default());
    let ids = ids(10);
    let messages = events(&ids, |i| serde_json::json!({ "poison": i == 5 }));
    run(
        settings(&db.pool, handler.clone(), 64, logging(&log)),
        &offsets,
        messages,
    )
    .await;

    let effects = effects(&db.pool).await;
    let order: Vec<i64> = effects.iter().map(|e| e.0).collect();
    assert_eq!(
        order,
        vec![0, 1, 2, 3, 4, 6, 7, 8, 9],
        "the neighbours once each, in order, nothing of the poison"
    );
    assert!(
        effects[..5].iter().all(|e| e.1 == effects[0].1)
            && effects[5..].iter().all(|e| e.1 == effects[5].1),
        "before and after the poison: one batch each: {effects:?}"
    );
    assert_eq!(
        handler.calls(5),
        2,
        "the poison: tried in the batch, retried alone"
    );
    let (dead_offset, dead_id, error): (i64, Uuid, String) = sqlx::query_as(
        "SELECT \"offset\", event_id, error FROM eventful_dead_letters WHERE consumer = 'batch'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((dead_offset, dead_id), (5, ids[5]));
    assert!(error.contains("poisoned 5"), "{error}");
    let (recorded,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM eventful_processed_events WHERE consumer = 'batch' AND event_id = $1",
    )
    .bind(ids[5])
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(recorded, 0, "the poison is not recorded as processed");
    assert_eq!(
        offsets.stored(),
        (1..=10).collect::<Vec<_>>(),
        "every offset stored once, in order"
    );
    let outcomes = outcomes(&log);
    assert!(
        matches!(&outcomes[5], (5, Outcome::DeadLettered { error }, 2) if error.contains("poisoned 5")),
        "{outcomes:?}"
    );
    assert!(outcomes
        .iter()
        .filter(|(offset, ..)| *offset != 5)
        .all(|(_, outcome, _)| *outcome == Outcome::Applied));
}

#[tokio::test]
async fn a_transient_failure_in_a_batch_is_retried_alone_in_order() {
    let db = database().await;
    let (handler, log, offsets) = (Record::default(), Log::default(), Arc::default());
    let messages = events(
        &ids(10),
        |i| serde_json::json!({ "flaky": if i == 5 { 3 } else { 0 } }),
    );
    run(
        settings(&db.pool, handler.clone(), 64, logging(&log)),
        &offsets,
        messages,
    )
    .await;

    let order: Vec<i64> = effects(&db.pool).await.iter().map(|e| e.0).collect();
    assert_eq!(order, (0..10).collect::<Vec<_>>(), "in order, once each");
    assert_eq!(handler.calls(5), 4, "1 in the batch + 3 alone");
    assert!(outcomes(&log).contains(&(5, Outcome::Applied, 4)));
    assert_eq!(offsets.stored(), (1..=10).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_panic_in_a_batch_counts_toward_max_panic_attempts() {
    let db = database().await;
    let (handler, log, offsets) = (Record::default(), Log::default(), Arc::default());
    let messages = events(&ids(6), |i| serde_json::json!({ "panic": i == 2 }));
    run(
        settings(&db.pool, handler.clone(), 64, logging(&log)),
        &offsets,
        messages,
    )
    .await;

    let order: Vec<i64> = effects(&db.pool).await.iter().map(|e| e.0).collect();
    assert_eq!(order, vec![0, 1, 3, 4, 5]);
    assert_eq!(handler.calls(2), 3, "max_panic_attempts (3) in all");
    let outcomes = outcomes(&log);
    assert!(
        matches!(&outcomes[2], (2, Outcome::DeadLettered { error }, 3) if error.contains("panicked")),
        "{outcomes:?}"
    );
    assert_eq!(offsets.stored(), (1..=6).collect::<Vec<_>>());
}

#[tokio::test]
async fn duplicates_inside_one_batch_are_applied_once() {
    let db = database().await;
    let (handler, log, offsets) = (Record::default(), Log::default(), Arc::default());
    let [a, b, c] = [Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7()];
    let messages: Vec<RawMessage> = [(a, 0), (b, 1), (b, 1), (c, 2), (b, 1), (a, 0)]
        .iter()
        .enumerate()
        .map(|(offset, (id, n))| message(offset as i64, *id, serde_json::json!({ "n": n })))
        .collect();
    run(
        settings(&db.pool, handler.clone(), 64, logging(&log)),
        &offsets,
        messages,
    )
    .await;

    let effects = effects(&db.pool).await;
    assert_eq!(
        effects.iter().map(|e| e.0).collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    assert!(effects.iter().all(|e| e.1 == effects[0].1), "one batch");
    assert_eq!((handler.calls(0), handler.calls(1)), (1, 1));
    let outcomes: Vec<Outcome> = outcomes(&log).into_iter().map(|o| o.1).collect();
    assert_eq!(
        outcomes,
        vec![
            Outcome::Applied,
            Outcome::Applied,
            Outcome::Duplicate,
            Outcome::Applied,
            Outcome::Duplicate,
            Outcome::Duplicate
        ]
    );
    assert_eq!(offsets.stored(), (1..=6).collect::<Vec<_>>());
}

/// The worker dies after the batch committed, while reporting its third message: the first
/// two offsets were stored, the rest not. Redelivered from the stored offset, those are
/// duplicates: nothing applies twice.
#[tokio::test]
async fn a_crash_between_batch_commit_and_offset_store_redelivers_duplicates() {
    let db = database().await;
    let handler = Record::default();
    let offsets: Arc<Offsets> = Arc::default();
    let ids = ids(6);
    let messages = events(&ids, |_| serde_json::json!({}));
    let (crashed_tx, crashed_rx) = oneshot::channel::<()>();
    let crashed_tx = Mutex::new(Some(crashed_tx));
    let hook: DeliveryHook = Arc::new(move |delivery: Delivery| {
        let signal = if delivery.offset == 2 {
            crashed_tx.lock().unwrap().take()
        } else {
            None
        };
        Box::pin(async move {
            if let Some(signal) = signal {
                let _ = signal.send(());
                std::future::pending::<()>().await;
            }
        })
    });
    let worker = tokio::spawn({
        let settings = settings(&db.pool, handler.clone(), 64, hook);
        let offsets = offsets.clone();
        let messages = messages.clone();
        async move { run(settings, &offsets, messages).await }
    });
    tokio::time::timeout(Duration::from_secs(30), crashed_rx)
        .await
        .unwrap()
        .unwrap();
    worker.abort();
    assert!(worker.await.unwrap_err().is_cancelled());
    assert_eq!(effects(&db.pool).await.len(), 6, "the batch committed");
    assert_eq!(
        offsets.stored(),
        vec![1, 2],
        "offsets stored up to the crash"
    );

    // Redelivery from the committed position.
    let log = Log::default();
    let redelivered: Vec<RawMessage> = messages[2..].to_vec();
    run(
        settings(&db.pool, handler.clone(), 64, logging(&log)),
        &offsets,
        redelivered,
    )
    .await;
    assert_eq!(
        outcomes(&log),
        (2..6)
            .map(|o| (o, Outcome::Duplicate, 1))
            .collect::<Vec<_>>()
    );
    let effects = effects(&db.pool).await;
    assert_eq!(
        effects.iter().map(|e| e.0).collect::<Vec<_>>(),
        (0..6).collect::<Vec<_>>(),
        "nothing applied twice"
    );
    assert!((0..6).all(|n| handler.calls(n) == 1));
    assert_eq!(offsets.stored(), vec![1, 2, 3, 4, 5, 6]);
}

#[tokio::test]
async fn max_batch_bounds_a_transaction() {
    let db = database().await;
    let (log, offsets) = (Log::default(), Arc::default());
    let messages = events(&ids(10), |_| serde_json::json!({}));
    run(
        settings(&db.pool, Record::default(), 4, logging(&log)),
        &offsets,
        messages,
    )
    .await;
    let effects = effects(&db.pool).await;
    let mut sizes: Vec<usize> = Vec::new();
    for (i, e) in effects.iter().enumerate() {
        if i > 0 && effects[i - 1].1 == e.1 {
            *sizes.last_mut().unwrap() += 1;
        } else {
            sizes.push(1);
        }
    }
    assert_eq!(sizes, vec![4, 4, 2]);
}

/// The handler span of each event continues the event's trace (its `traceparent` header),
/// on the batch path and on the one-event path alike.
#[cfg(feature = "opentelemetry")]
mod trace_context {
    use eventful_test_support::otel::SpanCapture;
    use opentelemetry::trace::{SpanId, TraceId};

    use super::*;

    /// Remembers the current span's `traceparent` per event `n`.
    #[derive(Clone, Default)]
    struct Traced(Arc<Mutex<HashMap<i64, String>>>);

    #[async_trait]
    impl EventHandler for Traced {
        type Payload = Payload;

        async fn handle(
            &self,
            _tx: &mut PgConnection,
            _event: &EventMeta,
            payload: Payload,
        ) -> Result<(), HandlerError> {
            let traceparent = eventful_core::otel::current_traceparent().unwrap_or_default();
            self.0.lock().unwrap().insert(payload.n, traceparent);
            Ok(())
        }
    }

    fn trace(n: i64) -> String {
        format!("{:032x}", 0xa000 + n)
    }

    fn parent(n: i64) -> String {
        format!("{:016x}", 0xb000 + n)
    }

    async fn check(max_batch: usize) {
        let capture = SpanCapture::new();
        // A current-thread runtime: the worker runs on this thread, under this subscriber.
        let _default = tracing::subscriber::set_default(capture.subscriber());

        let db = database().await;
        let handler = Traced::default();
        let mut handlers: HashMap<String, Arc<dyn super::super::ErasedHandler>> = HashMap::new();
        handlers.insert("OrderPlaced".into(), Arc::new(Typed(handler.clone())));
        let mut settings = settings(
            &db.pool,
            Record::default(),
            max_batch,
            logging(&Log::default()),
        );
        settings.handlers = handlers;
        let mut messages = events(&ids(6), |_| serde_json::json!({}));
        for (n, message) in (0..).zip(&mut messages) {
            // Event 3 carries none: its handler is not in any event's trace.
            if n != 3 {
                let value = format!("00-{}-{}-01", trace(n), parent(n));
                message
                    .headers
                    .push(("traceparent".into(), value.into_bytes()));
            }
        }
        run(settings, &Arc::default(), messages).await;
        capture.provider.force_flush().unwrap();

        let seen = handler.0.lock().unwrap().clone();
        let spans = capture.exporter.get_finished_spans().unwrap();
        let handler_spans: Vec<_> = spans.iter().filter(|s| s.name == "inbox.message").collect();
        assert_eq!(handler_spans.len(), 6, "{spans:#?}");
        for n in 0..6 {
            let traceparent = &seen[&n];
            let span = handler_spans
                .iter()
                .find(|s| traceparent.contains(&s.span_context.span_id().to_string()))
                .unwrap_or_else(|| panic!("event {n}: no handler span for {traceparent}"));
            if n == 3 {
                // Under its batch's span, or a root on the one-event path.
                let batch = spans
                    .iter()
                    .find(|s| s.span_context.span_id() == span.parent_span_id)
                    .map(|s| s.name.as_ref());
                match max_batch {
                    1 => assert_eq!(span.parent_span_id, SpanId::INVALID, "{span:?}"),
                    _ => assert_eq!(batch, Some("inbox.batch"), "{span:?}"),
                }
                assert!(!traceparent.contains(&trace(3)), "{traceparent}");
                continue;
            }
            assert!(
                traceparent.starts_with(&format!("00-{}-", trace(n))),
                "event {n} handled in {traceparent}"
            );
            assert_eq!(
                span.span_context.trace_id(),
                TraceId::from_hex(&trace(n)).unwrap()
            );
            assert_eq!(span.parent_span_id, SpanId::from_hex(&parent(n)).unwrap());
            assert!(
                span.attributes
                    .iter()
                    .any(|kv| kv.key.as_str() == "consumer" && kv.value.as_str() == "batch"),
                "{span:?}"
            );
        }
    }

    #[tokio::test]
    async fn batched_handlers_continue_each_events_trace() {
        check(64).await;
    }

    #[tokio::test]
    async fn single_handlers_continue_the_events_trace() {
        check(1).await;
    }
}
