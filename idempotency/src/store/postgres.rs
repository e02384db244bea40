//! PostgreSQL backend of the guard (`eventful_processed_events`).

use std::time::Duration;

use async_trait::async_trait;
use sqlx::{PgConnection, PgPool, Postgres, Transaction};
use uuid::Uuid;

use super::ProcessedStore;
use crate::{Error, Processed};

pub(crate) async fn check_and_record(
    conn: &mut PgConnection,
    consumer: &str,
    event_id: Uuid,
) -> Result<Processed, Error> {
    let inserted = sqlx::query(
        "INSERT INTO eventful_processed_events (consumer, event_id) VALUES ($1, $2) \
         ON CONFLICT (consumer, event_id) DO NOTHING",
    )
    .bind(consumer)
    .bind(event_id)
    .execute(conn)
    .await?
    .rows_affected();
    Ok(if inserted == 1 {
        Processed::First
    } else {
        Processed::Duplicate
    })
}

/// Records every id of `event_ids` in one statement and returns those this call recorded
/// (the first deliveries); ids already recorded are left alone. `event_ids` must not repeat.
/// Rows are inserted in id order, so two overlapping batches lock them in the same order
/// and wait for each other instead of deadlocking.
pub(crate) async fn check_and_record_many(
    conn: &mut PgConnection,
    consumer: &str,
    event_ids: &[Uuid],
) -> Result<Vec<Uuid>, Error> {
    let recorded = sqlx::query_scalar(
        "INSERT INTO eventful_processed_events (consumer, event_id) \
         SELECT $1, id FROM unnest($2::uuid[]) AS batch(id) ORDER BY id \
         ON CONFLICT (consumer, event_id) DO NOTHING RETURNING event_id",
    )
    .bind(consumer)
    .bind(event_ids)
    .fetch_all(conn)
    .await?;
    Ok(recorded)
}

pub(crate) async fn save_result(
    conn: &mut PgConnection,
    consumer: &str,
    event_id: Uuid,
    result: serde_json::Value,
) -> Result<(), Error> {
    sqlx::query(
        "UPDATE eventful_processed_events SET result = $3 WHERE consumer = $1 AND event_id = $2",
    )
    .bind(consumer)
    .bind(event_id)
    .bind(result)
    .execute(conn)
    .await?;
    Ok(())
}

pub(crate) async fn stored_result(
    conn: &mut PgConnection,
    consumer: &str,
    event_id: Uuid,
) -> Result<Option<serde_json::Value>, Error> {
    let row: Option<(Option<serde_json::Value>,)> = sqlx::query_as(
        "SELECT result FROM eventful_processed_events WHERE consumer = $1 AND event_id = $2",
    )
    .bind(consumer)
    .bind(event_id)
    .fetch_optional(conn)
    .await?;
    Ok(row.and_then(|(result,)| result))
}

pub(crate) async fn purge_older_than(
    pool: &PgPool,
    consumer: &str,
    age: Duration,
    batch_size: usize,
) -> Result<u64, Error> {
    let age_micros = i64::try_from(age.as_micros()).unwrap_or(i64::MAX);
    let batch = i64::try_from(batch_size.max(1)).unwrap_or(i64::MAX);
    let mut total = 0;
    loop {
        let deleted = sqlx::query(
            "DELETE FROM eventful_processed_events WHERE ctid IN ( \
               SELECT ctid FROM eventful_processed_events \
               WHERE consumer = $1 AND processed_at < now() - make_interval(secs => $2::float8 / 1e6) \
               LIMIT $3)",
        )
        .bind(consumer)
        .bind(age_micros)
        .bind(batch)
        .execute(pool)
        .await?
        .rows_affected();
        total += deleted;
        if deleted < batch as u64 {
            return Ok(total);
        }
    }
}

/// The PostgreSQL [`ProcessedStore`]: the same SQL as [`crate::ProcessedEvents`], with
/// transactions taken from a pool.
#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: PgPool,
}

impl PostgresStore {
    /// A store on `pool` (run [`crate::migrate`] first).
    pub fn new(pool: PgPool) -> PostgresStore {
        PostgresStore { pool }
    }
}

#[async_trait]
impl ProcessedStore for PostgresStore {
    type Tx = Transaction<'static, Postgres>;

    async fn begin(&self) -> Result<Self::Tx, Error> {
        Ok(self.pool.begin().await?)
    }

    async fn commit(&self, tx: Self::Tx) -> Result<(), Error> {
        Ok(tx.commit().await?)
    }

    async fn rollback(&self, tx: Self::Tx) -> Result<(), Error> {
        Ok(tx.rollback().await?)
    }

    async fn check_and_record(
        &self,
        tx: &mut Self::Tx,
        consumer: &str,
        event_id: Uuid,
    ) -> Result<Processed, Error> {
        check_and_record(tx, consumer, event_id).await
    }

    async fn save_result(
        &self,
        tx: &mut Self::Tx,
        consumer: &str,
        event_id: Uuid,
        result: serde_json::Value,
    ) -> Result<(), Error> {
        save_result(tx, consumer, event_id, result).await
    }

    async fn stored_result(
        &self,
        tx: &mut Self::Tx,
        consumer: &str,
        event_id: Uuid,
    ) -> Result<Option<serde_json::Value>, Error> {
        stored_result(tx, consumer, event_id).await
    }

    async fn purge_older_than(
        &self,
        consumer: &str,
        age: Duration,
        batch_size: usize,
    ) -> Result<u64, Error> {
        purge_older_than(&self.pool, consumer, age, batch_size).await
    }
}
