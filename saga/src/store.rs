//! PostgreSQL storage of saga instances and their history.
//!
//! Every write runs on the caller's connection (inside its transaction), so a transition,
//! its history row and the command it records in the outbox commit or roll back together.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::machine::State;
use crate::model::{HistoryEntry, SagaInstance, SagaStatus, Transition};
use crate::Error;

/// An instance as the coordinator reads it before a transition.
#[derive(Debug, Clone)]
pub(crate) struct Loaded {
    pub(crate) id: Uuid,
    pub(crate) saga_type: String,
    pub(crate) state: State,
    pub(crate) data: serde_json::Value,
    pub(crate) version: i64,
    /// The deadline had passed when the row was read (database clock).
    pub(crate) expired: bool,
}

fn millis(d: Option<Duration>) -> Option<i64> {
    d.map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn status(s: &str) -> Result<SagaStatus, Error> {
    s.parse().map_err(Error::Corrupt)
}

fn step(i: i32) -> Result<usize, Error> {
    usize::try_from(i).map_err(|_| Error::Corrupt(format!("negative step {i}")))
}

fn to_i32(i: usize) -> i32 {
    i32::try_from(i).unwrap_or(i32::MAX)
}

/// The columns of [`COLUMNS`], as stored.
#[derive(sqlx::FromRow)]
struct LoadedRow {
    id: Uuid,
    saga_type: String,
    status: String,
    current_step: i32,
    attempts: i32,
    data: serde_json::Value,
    version: i64,
    expired: bool,
}

impl TryFrom<LoadedRow> for Loaded {
    type Error = Error;

    fn try_from(row: LoadedRow) -> Result<Loaded, Error> {
        Ok(Loaded {
            id: row.id,
            saga_type: row.saga_type,
            state: State {
                status: status(&row.status)?,
                step: step(row.current_step)?,
                attempts: row.attempts,
            },
            data: row.data,
            version: row.version,
            expired: row.expired,
        })
    }
}

/// A row of `eventful_saga_instances`, as [`inspect`] reads it.
#[derive(sqlx::FromRow)]
struct InstanceRow {
    id: Uuid,
    saga_type: String,
    status: String,
    current_step: i32,
    data: serde_json::Value,
    version: i64,
    step_deadline: Option<DateTime<Utc>>,
    attempts: i32,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

/// A row of `eventful_saga_history`.
#[derive(sqlx::FromRow)]
struct HistoryRow {
    transition: String,
    step: i32,
    from_status: Option<String>,
    to_status: String,
    caused_by: Option<Uuid>,
    emitted_event_id: Option<Uuid>,
    reason: Option<String>,
    at: DateTime<Utc>,
}

impl TryFrom<HistoryRow> for HistoryEntry {
    type Error = Error;

    fn try_from(h: HistoryRow) -> Result<HistoryEntry, Error> {
        Ok(HistoryEntry {
            transition: h.transition.parse().map_err(Error::Corrupt)?,
            step: step(h.step)?,
            from_status: h.from_status.as_deref().map(status).transpose()?,
            to_status: status(&h.to_status)?,
            caused_by: h.caused_by,
            emitted_event_id: h.emitted_event_id,
            reason: h.reason,
            at: h.at,
        })
    }
}

const COLUMNS: &str = "id, saga_type, status, current_step, data, version, attempts, \
     (step_deadline IS NOT NULL AND step_deadline <= clock_timestamp()) AS expired";

/// Inserts a new instance and its first history row in one statement; `false` (nothing
/// written) when the id exists already.
pub(crate) async fn insert(
    conn: &mut PgConnection,
    saga_type: &str,
    state: State,
    data: &serde_json::Value,
    deadline: Option<Duration>,
    h: NewHistory<'_>,
) -> Result<bool, Error> {
    let done = sqlx::query(
        "WITH created AS ( \
             INSERT INTO eventful_saga_instances \
                 (id, saga_type, status, current_step, data, version, attempts, step_deadline) \
             VALUES ($1, $2, $3, $4, $5, 0, $6, \
                     clock_timestamp() + $7::bigint * interval '1 millisecond') \
             ON CONFLICT (id) DO NOTHING \
             RETURNING id) \
         INSERT INTO eventful_saga_history \
             (saga_id, transition, step, from_status, to_status, caused_by, emitted_event_id, reason) \
         SELECT id, $8, $9, $10, $11, $12, $13, $14 FROM created",
    )
    .bind(h.saga_id)
    .bind(saga_type)
    .bind(state.status.as_str())
    .bind(to_i32(state.step))
    .bind(data)
    .bind(state.attempts)
    .bind(millis(deadline))
    .bind(h.transition.as_str())
    .bind(to_i32(h.step))
    .bind(h.from.map(SagaStatus::as_str))
    .bind(h.to.as_str())
    .bind(h.caused_by)
    .bind(h.emitted)
    .bind(h.reason)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Reads one instance without locking it (optimistic concurrency: writers check `version`).
pub(crate) async fn load(conn: &mut PgConnection, id: Uuid) -> Result<Option<Loaded>, Error> {
    let row: Option<LoadedRow> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM eventful_saga_instances WHERE id = $1"
    ))
    .bind(id)
    .fetch_optional(conn)
    .await?;
    row.map(Loaded::try_from).transpose()
}

/// Reads several instances without locking them (see [`load`]); missing ids are absent.
pub(crate) async fn load_many(conn: &mut PgConnection, ids: &[Uuid]) -> Result<Vec<Loaded>, Error> {
    let rows: Vec<LoadedRow> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM eventful_saga_instances WHERE id = ANY($1)"
    ))
    .bind(ids)
    .fetch_all(conn)
    .await?;
    rows.into_iter().map(Loaded::try_from).collect()
}

/// One instance's move for [`transition_many`].
pub(crate) struct Move<'a> {
    pub(crate) expected_version: i64,
    pub(crate) to: State,
    pub(crate) data: Option<serde_json::Value>,
    pub(crate) deadline: Option<Duration>,
    pub(crate) history: NewHistory<'a>,
}

/// Applies transitions of instances (distinct ids) and appends their history rows in one
/// statement, each only if nobody else moved its instance since `expected_version` was read.
/// Returns how many moved: fewer than `moves` when some version check failed (those wrote
/// nothing).
pub(crate) async fn transition_many(
    conn: &mut PgConnection,
    moves: &[Move<'_>],
) -> Result<usize, Error> {
    let done = sqlx::query(
        "WITH u AS ( \
             SELECT * FROM unnest($1::uuid[], $2::bigint[], $3::text[], $4::int[], $5::int[], \
                                  $6::jsonb[], $7::bigint[]) \
               AS u(id, expected, status, step, attempts, data, deadline_ms)), \
         moved AS ( \
             UPDATE eventful_saga_instances i SET \
                 status = u.status, current_step = u.step, attempts = u.attempts, \
                 data = COALESCE(u.data, i.data), \
                 step_deadline = clock_timestamp() + u.deadline_ms * interval '1 millisecond', \
                 version = i.version + 1, updated_at = clock_timestamp() \
             FROM u WHERE i.id = u.id AND i.version = u.expected \
             RETURNING i.id) \
         INSERT INTO eventful_saga_history \
             (saga_id, transition, step, from_status, to_status, caused_by, emitted_event_id, reason) \
         SELECT h.saga_id, h.transition, h.step, h.from_status, h.to_status, h.caused_by, \
                h.emitted, h.reason \
         FROM unnest($1::uuid[], $8::text[], $9::int[], $10::text[], $11::text[], $12::uuid[], \
                     $13::uuid[], $14::text[]) WITH ORDINALITY \
           AS h(saga_id, transition, step, from_status, to_status, caused_by, emitted, reason, ord) \
         WHERE h.saga_id IN (SELECT id FROM moved) \
         ORDER BY h.ord",
    )
    .bind(moves.iter().map(|m| m.history.saga_id).collect::<Vec<_>>())
    .bind(moves.iter().map(|m| m.expected_version).collect::<Vec<_>>())
    .bind(moves.iter().map(|m| m.to.status.as_str()).collect::<Vec<_>>())
    .bind(moves.iter().map(|m| to_i32(m.to.step)).collect::<Vec<_>>())
    .bind(moves.iter().map(|m| m.to.attempts).collect::<Vec<_>>())
    .bind(moves.iter().map(|m| m.data.clone()).collect::<Vec<_>>())
    .bind(moves.iter().map(|m| millis(m.deadline)).collect::<Vec<_>>())
    .bind(moves.iter().map(|m| m.history.transition.as_str()).collect::<Vec<_>>())
    .bind(moves.iter().map(|m| to_i32(m.history.step)).collect::<Vec<_>>())
    .bind(moves.iter().map(|m| m.history.from.map(SagaStatus::as_str)).collect::<Vec<_>>())
    .bind(moves.iter().map(|m| m.history.to.as_str()).collect::<Vec<_>>())
    .bind(moves.iter().map(|m| m.history.caused_by).collect::<Vec<_>>())
    .bind(moves.iter().map(|m| m.history.emitted).collect::<Vec<_>>())
    .bind(moves.iter().map(|m| m.history.reason).collect::<Vec<_>>())
    .execute(conn)
    .await?;
    Ok(usize::try_from(done.rows_affected()).unwrap_or(usize::MAX))
}

/// One history row.
pub(crate) struct NewHistory<'a> {
    pub(crate) saga_id: Uuid,
    pub(crate) transition: Transition,
    pub(crate) step: usize,
    pub(crate) from: Option<SagaStatus>,
    pub(crate) to: SagaStatus,
    pub(crate) caused_by: Option<Uuid>,
    pub(crate) emitted: Option<Uuid>,
    pub(crate) reason: Option<&'a str>,
}

/// Locks up to `limit` in-flight instances of `types` whose deadline has passed, oldest
/// deadline first, skipping rows other transactions hold.
pub(crate) async fn lock_due(
    conn: &mut PgConnection,
    types: &[String],
    limit: i64,
) -> Result<Vec<Loaded>, Error> {
    let rows: Vec<LoadedRow> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM eventful_saga_instances \
         WHERE status IN ('running', 'compensating') \
           AND step_deadline <= clock_timestamp() \
           AND saga_type = ANY($1) \
         ORDER BY step_deadline \
         LIMIT $2 \
         FOR UPDATE SKIP LOCKED"
    ))
    .bind(types)
    .bind(limit)
    .fetch_all(conn)
    .await?;
    rows.into_iter().map(Loaded::try_from).collect()
}

/// `(saga_type, status, count)` of the in-flight instances of `types` (the gauges).
#[cfg(feature = "metrics")]
pub(crate) async fn count_in_flight(
    pool: &sqlx::PgPool,
    types: &[String],
) -> Result<Vec<(String, String, i64)>, Error> {
    // Served by the partial index of in-flight instances.
    Ok(sqlx::query_as(
        "SELECT saga_type, status, count(*) FROM eventful_saga_instances \
         WHERE status IN ('running', 'compensating') AND saga_type = ANY($1) \
         GROUP BY saga_type, status",
    )
    .bind(types)
    .fetch_all(pool)
    .await?)
}

/// Pushes a deadline back (used when a due instance cannot be processed).
pub(crate) async fn postpone(conn: &mut PgConnection, id: Uuid, by: Duration) -> Result<(), Error> {
    sqlx::query(
        "UPDATE eventful_saga_instances \
         SET step_deadline = clock_timestamp() + $2::bigint * interval '1 millisecond' \
         WHERE id = $1",
    )
    .bind(id)
    .bind(millis(Some(by)))
    .execute(conn)
    .await?;
    Ok(())
}

/// The instance and its history.
pub(crate) async fn inspect(pool: &PgPool, id: Uuid) -> Result<Option<SagaInstance>, Error> {
    let Some(row): Option<InstanceRow> = sqlx::query_as(
        "SELECT id, saga_type, status, current_step, data, version, step_deadline, attempts, \
                created_at, updated_at \
         FROM eventful_saga_instances WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(pool)
    .await?
    else {
        return Ok(None);
    };
    let history = sqlx::query_as::<_, HistoryRow>(
        "SELECT transition, step, from_status, to_status, caused_by, emitted_event_id, reason, at \
         FROM eventful_saga_history WHERE saga_id = $1 ORDER BY seq",
    )
    .bind(id)
    .fetch_all(pool)
    .await?
    .into_iter()
    .map(HistoryEntry::try_from)
    .collect::<Result<Vec<_>, Error>>()?;
    Ok(Some(SagaInstance {
        id: row.id,
        saga_type: row.saga_type,
        status: status(&row.status)?,
        current_step: step(row.current_step)?,
        data: row.data,
        version: row.version,
        step_deadline: row.step_deadline,
        attempts: row.attempts,
        created_at: row.created_at,
        updated_at: row.updated_at,
        history,
    }))
}
