//! The participant building block against the real PostgreSQL: the participant's state
//! change and the events it emits (through the outbox) commit or roll back with the
//! transaction the consumer runtime hands it. (Driven by the Kafka inbox runtime in
//! `kafka.rs`; here the adapter is called directly, as the runtime does.)

mod support;

use eventful_core::headers::CAUSATION_ID;
use eventful_idempotency::{EventHandler, EventMeta, HandlerError};
use eventful_outbox::{NewEvent, Outbox};
use eventful_saga::{participant, Emitter, Participant};
use eventful_test_support::TestDatabase;
use uuid::Uuid;

#[derive(serde::Deserialize)]
struct OrderPlaced {
    order_id: Uuid,
    qty: i32,
}

/// Reserves stock and emits `StockReserved`; refuses (permanently) orders of more than 10.
struct ReserveStock;

#[async_trait::async_trait]
impl Participant for ReserveStock {
    type Event = OrderPlaced;

    async fn handle(&self, cx: &mut Emitter<'_>, e: OrderPlaced) -> Result<(), HandlerError> {
        sqlx::query("INSERT INTO reservations (order_id, qty) VALUES ($1, $2)")
            .bind(e.order_id)
            .bind(e.qty)
            .execute(cx.conn())
            .await?;
        let event = NewEvent::json(
            "inventory-events",
            e.order_id.to_string(),
            "StockReserved",
            &serde_json::json!({ "order_id": e.order_id, "qty": e.qty }),
        )
        .map_err(HandlerError::permanent)?;
        cx.emit(event).await?;
        if e.qty > 10 {
            // Written and emitted above, refused now: everything must roll back.
            return Err(HandlerError::permanent("not enough stock"));
        }
        Ok(())
    }
}

fn meta(order_id: Uuid, qty: i32) -> EventMeta {
    let payload =
        serde_json::to_vec(&serde_json::json!({ "order_id": order_id, "qty": qty })).unwrap();
    EventMeta::parse(
        "orders",
        0,
        7,
        Some(order_id.to_string().as_bytes()),
        vec![
            ("event-id".into(), Uuid::now_v7().to_string().into_bytes()),
            ("event-type".into(), b"OrderPlaced".to_vec()),
            ("content-type".into(), b"application/json".to_vec()),
            (
                "traceparent".into(),
                b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_vec(),
            ),
        ],
        Some(&payload),
    )
    .unwrap()
}

#[tokio::test]
async fn a_participants_state_and_emitted_events_commit_or_roll_back_together() {
    let db = TestDatabase::create().await;
    let outbox = Outbox::new();
    outbox.migrate(&db.pool).await.unwrap();
    sqlx::query("CREATE TABLE reservations (order_id uuid PRIMARY KEY, qty int NOT NULL)")
        .execute(&db.pool)
        .await
        .unwrap();
    let handler = participant(outbox.clone(), ReserveStock);

    // Accepted: the reservation and StockReserved commit together.
    let ok = meta(Uuid::now_v7(), 3);
    let mut tx = db.pool.begin().await.unwrap();
    handler
        .handle(&mut tx, &ok, ok.decode().unwrap())
        .await
        .unwrap();
    tx.commit().await.unwrap();

    // Refused after writing and emitting: the runtime rolls back on the error.
    let refused = meta(Uuid::now_v7(), 11);
    let mut tx = db.pool.begin().await.unwrap();
    let err = handler
        .handle(&mut tx, &refused, refused.decode().unwrap())
        .await
        .unwrap_err();
    assert!(!err.is_transient());
    tx.rollback().await.unwrap();

    let reservations: i64 = sqlx::query_scalar("SELECT count(*) FROM reservations")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let emitted: Vec<(String, serde_json::Value)> =
        sqlx::query_as("SELECT key, headers FROM eventful_outbox ORDER BY seq")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(reservations, 1);
    assert_eq!(emitted.len(), 1);
    assert_eq!(emitted[0].0, ok.key);
    // The emitted event names its cause and continues the trace.
    let headers: Vec<(String, String)> = serde_json::from_value(emitted[0].1.clone()).unwrap();
    assert!(headers.contains(&(CAUSATION_ID.to_owned(), ok.id.to_string())));
    assert!(headers.contains(&(
        "traceparent".to_owned(),
        ok.header("traceparent").unwrap().to_owned()
    )));
}

#[tokio::test]
async fn a_saga_command_without_correlation_is_a_permanent_failure() {
    let db = TestDatabase::create().await;
    let outbox = Outbox::new();
    outbox.migrate(&db.pool).await.unwrap();
    let plain = meta(Uuid::now_v7(), 1);
    let mut tx = db.pool.begin().await.unwrap();
    let cx = Emitter::new(&mut tx, &outbox, &plain);
    let err = cx.command().unwrap_err();
    assert!(!err.is_transient());
    assert!(cx.emitted().is_empty());
}
