//! The processed-event guard on its own: the same event delivered three times, twice at
//! the same moment on two connections, takes effect once.
//!
//! Run with `cargo run -p eventful-idempotency --example inbox_guard` (PostgreSQL at
//! `DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432/postgres`; the example's
//! effect table is `example_inbox_guard_payments`, its guard name `example-inbox-guard`).
//!
//! Semantics: exactly-once *effects* on top of at-least-once delivery. The guard's record
//! and the effect commit in one transaction; a racing delivery waits on the record's
//! primary key and then sees `Duplicate`.

use eventful_idempotency::{Processed, ProcessedEvents};
use sqlx::PgPool;
use uuid::Uuid;

/// One delivery: record the event and, the first time only, write its effect.
async fn deliver(
    pool: &PgPool,
    guard: &ProcessedEvents,
    event_id: Uuid,
) -> anyhow::Result<Processed> {
    let mut tx = pool.begin().await?;
    let seen = guard.check_and_record(&mut tx, event_id).await?;
    if seen.is_first() {
        sqlx::query("INSERT INTO example_inbox_guard_payments (event_id, cents) VALUES ($1, 4200)")
            .bind(event_id)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(seen)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect(&url)
        .await?;
    eventful_idempotency::migrate(&pool).await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS example_inbox_guard_payments (event_id uuid NOT NULL, cents bigint NOT NULL)",
    )
    .execute(&pool)
    .await?;
    let guard = ProcessedEvents::new("example-inbox-guard");

    let event_id = Uuid::now_v7();
    // Two deliveries racing on two connections, then a late redelivery.
    let (a, b) = tokio::join!(
        deliver(&pool, &guard, event_id),
        deliver(&pool, &guard, event_id)
    );
    let late = deliver(&pool, &guard, event_id).await?;
    println!(
        "racing deliveries: {:?} and {:?}; redelivery: {late:?}",
        a?, b?
    );

    let effects: i64 =
        sqlx::query_scalar("SELECT count(*) FROM example_inbox_guard_payments WHERE event_id = $1")
            .bind(event_id)
            .fetch_one(&pool)
            .await?;
    println!("payments written for event {event_id}: {effects}");
    anyhow::ensure!(effects == 1, "the effect must be applied exactly once");
    Ok(())
}
