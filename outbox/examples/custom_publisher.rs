//! The outbox with a publisher of your own: events recorded in a PostgreSQL transaction
//! are relayed to a `tokio::sync::mpsc` channel instead of Kafka.
//!
//! Run with `cargo run -p eventful-outbox --example custom_publisher` (PostgreSQL at
//! `DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432/postgres`; the example
//! uses a table of its own, `example_custom_publisher_outbox`, so it runs again and again).
//!
//! Delivery semantics are the relay's: at least once, in commit order per key. A publisher
//! only has to keep the `Publisher` contract — one result per event, in order; after a
//! failure, hold back the rest of that key's events in the batch — and
//! `eventful_outbox::contract` (feature `test-utils`) checks that it does.

// `&mut *tx` is the documented way to hand a transaction to `record`.
#![allow(clippy::explicit_auto_deref)]

use std::time::Duration;

use async_trait::async_trait;
use eventful_outbox::{CancellationToken, Error, NewEvent, Outbox, OutboxRecord, Publisher, Relay};
use tokio::sync::mpsc;

/// Sends each event's key and payload down a channel; the channel acknowledges on send.
struct ChannelPublisher(mpsc::UnboundedSender<(String, String)>);

#[async_trait]
impl Publisher for ChannelPublisher {
    async fn publish_batch(&self, events: &[OutboxRecord]) -> Vec<Result<(), Error>> {
        events
            .iter()
            .map(|event| {
                let payload = String::from_utf8_lossy(&event.payload).into_owned();
                self.0
                    .send((event.key.clone(), payload))
                    // A closed channel is an outage: the relay backs off and retries.
                    .map_err(|e| Error::PublishRetryable(e.to_string()))
            })
            .collect()
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let pool = sqlx::PgPool::connect(&url).await?;
    let outbox = Outbox::builder()
        .table("example_custom_publisher_outbox")
        .build()?;
    outbox.migrate(&pool).await?;

    // Record three events with the business change, in one transaction.
    let mut tx = pool.begin().await?;
    for step in ["placed", "paid", "shipped"] {
        let event = NewEvent::json("orders", "order-42", "OrderChanged", &step)?;
        outbox.record(&mut *tx, event).await?;
    }
    tx.commit().await?;

    let (sender, mut received) = mpsc::unbounded_channel();
    let cancel = CancellationToken::new();
    let relay = Relay::builder(pool.clone(), outbox.clone(), ChannelPublisher(sender)).build()?;
    let handle = relay.spawn(cancel.clone());

    for _ in 0..3 {
        let (key, payload) = tokio::time::timeout(Duration::from_secs(30), received.recv())
            .await?
            .ok_or_else(|| anyhow::anyhow!("relay stopped"))?;
        println!("{key}: {payload}");
    }
    cancel.cancel();
    handle.await??;

    let stats = outbox.stats(&pool).await?;
    println!("pending after the relay: {}", stats.pending);
    Ok(())
}
