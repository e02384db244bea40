//! A two-step saga (reserve stock, then charge), run twice: once to `Completed`, once
//! through a refused charge to `Compensated` (the reservation is released).
//!
//! Run with `cargo run -p eventful-saga --example two_step_saga` (PostgreSQL at
//! `DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432/postgres`; no broker: the
//! example plays the participants and answers the commands itself, from the outbox table).
//!
//! Semantics: every transition writes the instance, a history row and the next command in
//! one transaction; a failure at step n compensates steps n-1 … 0 in reverse.

use std::time::Duration;

use eventful_outbox::Outbox;
use eventful_saga::{Command, CommandContext, Coordinator, SagaDefinition, SagaStatus, Step};
use sqlx::PgPool;
use uuid::Uuid;

#[derive(serde::Serialize, serde::Deserialize)]
struct Order {
    sku: String,
    cents: i64,
}

/// The oldest unanswered command of `saga` in the outbox: its event type and correlation.
async fn next_command(
    pool: &PgPool,
    saga: Uuid,
    answered: usize,
) -> anyhow::Result<(String, CommandContext)> {
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT event_type, headers::text FROM example_two_step_saga_outbox \
         WHERE key = $1 ORDER BY seq OFFSET $2 LIMIT 1",
    )
    .bind(saga.to_string())
    .bind(i64::try_from(answered)?)
    .fetch_all(pool)
    .await?;
    let (event_type, headers) = rows
        .into_iter()
        .next()
        .ok_or_else(|| anyhow::anyhow!("no command"))?;
    let headers: Vec<(String, String)> = serde_json::from_str(&headers)?;
    let ctx = CommandContext::from_headers(headers.iter().map(|(k, v)| (k.as_str(), v.as_str())))?;
    Ok((event_type, ctx))
}

/// Plays the participants until the saga ends: every command succeeds except `Charge`
/// when `refuse_charge` is set.
async fn run(coordinator: &Coordinator, pool: &PgPool, refuse_charge: bool) -> anyhow::Result<()> {
    let order = Order {
        sku: "mug".into(),
        cents: 4200,
    };
    let mut tx = pool.begin().await?;
    let saga = coordinator.start(&mut tx, "checkout", &order).await?;
    tx.commit().await?;
    let mut answered = 0;
    loop {
        let instance = coordinator.inspect(saga).await?;
        if matches!(
            instance.status,
            SagaStatus::Completed | SagaStatus::Compensated
        ) {
            let path: Vec<String> = instance
                .history
                .iter()
                .map(|h| format!("{:?}", h.transition))
                .collect();
            println!(
                "saga {saga}: {:?} via {}",
                instance.status,
                path.join(" → ")
            );
            return Ok(());
        }
        let (command, ctx) = next_command(pool, saga, answered).await?;
        answered += 1;
        let reply = if refuse_charge && command == "Charge" {
            println!("  {command}: refused");
            ctx.failure("card declined")
        } else {
            println!("  {command}: done");
            ctx.success()
        };
        let mut tx = pool.begin().await?;
        coordinator.handle_reply(&mut tx, &reply).await?;
        tx.commit().await?;
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let pool = PgPool::connect(&url).await?;
    let outbox = Outbox::builder()
        .table("example_two_step_saga_outbox")
        .build()?;
    outbox.migrate(&pool).await?;

    let checkout = SagaDefinition::<Order>::new("checkout")
        .step(
            Step::new(
                "reserve",
                Command::new("inventory", "ReserveStock", |o: &Order| o.sku.clone()),
            )
            .compensate_with(Command::new("inventory", "ReleaseStock", |o: &Order| {
                o.sku.clone()
            }))
            .timeout(Duration::from_secs(30)),
        )
        .step(Step::new(
            "charge",
            Command::new("payments", "Charge", |o: &Order| o.cents),
        ));
    let coordinator = Coordinator::builder(pool.clone(), outbox)
        .guard_name("example-two-step-saga")
        .saga(checkout)
        .build()?;
    coordinator.migrate().await?;

    run(&coordinator, &pool, false).await?;
    run(&coordinator, &pool, true).await?;
    Ok(())
}
