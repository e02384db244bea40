//! What a new user writes with `eventful = { features = ["full"] }` and nothing else from the
//! workspace: the outbox and its Kafka relay, the inbox (guard + consumer runtime), Redis
//! reservations and a saga. Only compiled (`cargo check`), never run.

use std::sync::Arc;
use std::time::Duration;

use eventful::idempotency::{
    async_trait, ConsumerOptions, EventHandler, EventMeta, HandlerError, InboxConsumer,
    ProcessedEvents,
};
use eventful::outbox::{CancellationToken, KafkaPublisher, NewEvent, Outbox, Relay};
use eventful::reservation::{Reaper, RedisReservations, ReservationStore};
use eventful::saga::{Command, Coordinator, SagaDefinition, Step};

#[derive(serde::Serialize, serde::Deserialize)]
struct OrderPlaced {
    order_id: String,
    sku: String,
    cents: i64,
}

struct Invoice;

#[async_trait]
impl EventHandler for Invoice {
    type Payload = OrderPlaced;
    async fn handle(
        &self,
        tx: &mut sqlx::PgConnection,
        _event: &EventMeta,
        order: OrderPlaced,
    ) -> Result<(), HandlerError> {
        sqlx::query("INSERT INTO invoices (order_id, cents) VALUES ($1, $2)")
            .bind(order.order_id)
            .bind(order.cents)
            .execute(&mut *tx)
            .await?;
        Ok(())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let pool = sqlx::PgPool::connect("postgres://postgres@127.0.0.1/shop").await?;
    let cancel = CancellationToken::new();

    // Outbox + relay.
    let outbox = Outbox::new();
    outbox.migrate(&pool).await?;
    let order = OrderPlaced {
        order_id: "o-1".into(),
        sku: "sku-1".into(),
        cents: 4200,
    };
    let mut tx = pool.begin().await?;
    outbox
        .record(
            &mut *tx,
            NewEvent::json("orders", "o-1", "OrderPlaced", &order)?,
        )
        .await?;
    tx.commit().await?;
    let relay = Relay::builder(
        pool.clone(),
        outbox.clone(),
        KafkaPublisher::new("127.0.0.1:9092")?,
    )
    .build()?;
    let relay = relay.spawn(cancel.clone());

    // Inbox: the guard alone, and the consumer runtime around it.
    eventful::idempotency::migrate(&pool).await?;
    let guard = ProcessedEvents::new("billing");
    let mut tx = pool.begin().await?;
    let _first = guard
        .check_and_record(&mut tx, uuid::Uuid::new_v4())
        .await?;
    tx.commit().await?;
    let inbox = InboxConsumer::builder(
        ConsumerOptions::new("127.0.0.1:9092", "billing", "billing"),
        pool.clone(),
    )
    .topic("orders")
    .handler("OrderPlaced", Invoice)
    .build()?;
    let inbox = inbox.spawn(cancel.clone());

    // Redis reservations.
    let store = RedisReservations::builder("redis://127.0.0.1:6379")
        .connect()
        .await?;
    store.set_stock("sku-1", 10).await?;
    let hold = store
        .reserve("o-1", &[("sku-1", 2)], Duration::from_secs(900))
        .await?;
    store.confirm(&hold.id).await?;
    let reaper = Reaper::new(Arc::new(store.clone())).spawn(cancel.clone());

    // A two-step saga.
    let checkout = SagaDefinition::<OrderPlaced>::new("checkout")
        .step(
            Step::new(
                "reserve",
                Command::new("inventory", "ReserveStock", |o: &OrderPlaced| o.sku.clone()),
            )
            .compensate_with(Command::new(
                "inventory",
                "ReleaseStock",
                |o: &OrderPlaced| o.sku.clone(),
            )),
        )
        .step(Step::new(
            "pay",
            Command::new("payments", "Charge", |o: &OrderPlaced| o.cents),
        ));
    let coordinator = Coordinator::builder(pool.clone(), outbox)
        .reply_topic("saga-replies")
        .saga(checkout)
        .build()?;
    coordinator.migrate().await?;
    let mut tx = pool.begin().await?;
    let saga_id = coordinator.start(&mut tx, "checkout", &order).await?;
    tx.commit().await?;
    println!("{:?}", coordinator.inspect(saga_id).await?.status);

    cancel.cancel();
    let _ = (relay.await, inbox.await, reaper.await);
    Ok(())
}
