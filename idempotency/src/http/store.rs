//! PostgreSQL storage of idempotency keys (`eventful_idempotency_keys`).
//!
//! States of a row: `in_flight` (claimed, its request runs until `locked_until`),
//! `abandoned` (the request future was dropped or panicked), `completed` (response stored),
//! `not_stored` (completed, only the status kept). A row is deleted only when its response
//! says nothing was done ([`release`]) or when it expired ([`purge_expired`]).

use std::time::Duration;

use sqlx::PgPool;
use uuid::Uuid;

use crate::Error;

/// What a request found when it tried to claim its key.
pub(crate) enum Claim {
    /// This request owns the key (with the token it passed) and must run the handler.
    Owned,
    /// Another request with a different fingerprint used the key.
    Mismatch,
    /// The first request is still running.
    InFlight,
    /// The first request was interrupted (future dropped, panic, process gone, or still
    /// running past the in-flight timeout): whether it took effect is unknown.
    Abandoned,
    /// The first request completed with `status`, but its response was not stored.
    NotStored { status: u16 },
    /// The first request completed: replay its response.
    Completed {
        status: u16,
        content_type: Option<String>,
        body: Vec<u8>,
    },
}

/// How [`claim`] treats a key whose first request was interrupted.
#[derive(Clone, Copy)]
pub(crate) struct ClaimPolicy {
    pub(crate) ttl: Duration,
    pub(crate) in_flight_timeout: Duration,
    /// Take over an abandoned key (same request) and run the handler again.
    pub(crate) rerun_abandoned: bool,
}

/// `(request_hash, state, status, content_type, body, lock_expired)` of a stored key.
type KeyRow = (
    String,
    String,
    Option<i16>,
    Option<String>,
    Option<Vec<u8>>,
    bool,
);

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

fn status_of(status: Option<i16>) -> u16 {
    status.and_then(|s| u16::try_from(s).ok()).unwrap_or(500)
}

pub(crate) async fn claim(
    pool: &PgPool,
    scope: &str,
    key: &str,
    token: Uuid,
    request_hash: &str,
    policy: ClaimPolicy,
) -> Result<Claim, Error> {
    // A row deleted between the insert attempt and the read (a released key) is retried.
    for _ in 0..5 {
        // One statement: concurrent claims of one key serialise on the primary key, so
        // exactly one of them inserts (or takes over an expired row, or an abandoned one
        // when the application allows re-running).
        let owned = sqlx::query(
            "INSERT INTO eventful_idempotency_keys AS k \
               (scope, key, request_hash, token, state, expires_at, locked_until) \
             VALUES ($1, $2, $3, $4, 'in_flight', \
                     now() + make_interval(secs => $5::float8 / 1e6), \
                     now() + make_interval(secs => $6::float8 / 1e6)) \
             ON CONFLICT (scope, key) DO UPDATE SET \
               request_hash = EXCLUDED.request_hash, token = EXCLUDED.token, state = 'in_flight', \
               status = NULL, content_type = NULL, body = NULL, created_at = now(), \
               expires_at = EXCLUDED.expires_at, locked_until = EXCLUDED.locked_until \
             WHERE k.expires_at < now() \
                OR ($7 AND k.request_hash = EXCLUDED.request_hash \
                    AND (k.state = 'abandoned' \
                         OR (k.state = 'in_flight' \
                             AND COALESCE(k.locked_until, \
                                          k.created_at + make_interval(secs => $6::float8 / 1e6)) \
                                 < now())))",
        )
        .bind(scope)
        .bind(key)
        .bind(request_hash)
        .bind(token)
        .bind(micros(policy.ttl))
        .bind(micros(policy.in_flight_timeout))
        .bind(policy.rerun_abandoned)
        .execute(pool)
        .await?
        .rows_affected();
        if owned == 1 {
            return Ok(Claim::Owned);
        }
        let row: Option<KeyRow> = sqlx::query_as(
            "SELECT request_hash, state, status, content_type, body, \
                    COALESCE(locked_until, created_at + make_interval(secs => $3::float8 / 1e6)) \
                        < now() \
                 FROM eventful_idempotency_keys WHERE scope = $1 AND key = $2",
        )
        .bind(scope)
        .bind(key)
        .bind(micros(policy.in_flight_timeout))
        .fetch_optional(pool)
        .await?;
        let Some((hash, state, status, content_type, body, lock_expired)) = row else {
            continue;
        };
        if hash != request_hash {
            return Ok(Claim::Mismatch);
        }
        return Ok(match state.as_str() {
            "completed" => Claim::Completed {
                status: status_of(status),
                content_type,
                body: body.unwrap_or_default(),
            },
            "not_stored" => Claim::NotStored {
                status: status_of(status),
            },
            "in_flight" if !lock_expired => Claim::InFlight,
            // Abandoned between the insert attempt and the read: take it over now.
            _ if policy.rerun_abandoned => continue,
            // 'abandoned', an in-flight row past its lock, or a state this version does not
            // know: the outcome is unknown to this process.
            _ => Claim::Abandoned,
        });
    }
    Ok(Claim::InFlight)
}

/// Stores the response of the request holding `token`; `body` `None` records the status
/// only (`not_stored`). Also settles an `abandoned` row: the request finished after all.
pub(crate) async fn complete(
    pool: &PgPool,
    scope: &str,
    key: &str,
    token: Uuid,
    status: u16,
    content_type: Option<&str>,
    body: Option<&[u8]>,
) -> Result<(), Error> {
    sqlx::query(
        "UPDATE eventful_idempotency_keys \
         SET state = CASE WHEN $6::bytea IS NULL THEN 'not_stored' ELSE 'completed' END, \
             status = $4, content_type = $5, body = $6 \
         WHERE scope = $1 AND key = $2 AND token = $3",
    )
    .bind(scope)
    .bind(key)
    .bind(token)
    .bind(i16::try_from(status).unwrap_or(500))
    .bind(content_type)
    .bind(body)
    .execute(pool)
    .await?;
    Ok(())
}

/// Marks the in-flight key of `token` as abandoned (its request future was dropped).
pub(crate) async fn abandon(
    pool: &PgPool,
    scope: &str,
    key: &str,
    token: Uuid,
) -> Result<(), Error> {
    sqlx::query(
        "UPDATE eventful_idempotency_keys SET state = 'abandoned' \
         WHERE scope = $1 AND key = $2 AND token = $3 AND state = 'in_flight'",
    )
    .bind(scope)
    .bind(key)
    .bind(token)
    .execute(pool)
    .await?;
    Ok(())
}

/// Deletes the key of `token`: its response said nothing was done.
pub(crate) async fn release(
    pool: &PgPool,
    scope: &str,
    key: &str,
    token: Uuid,
) -> Result<(), Error> {
    sqlx::query(
        "DELETE FROM eventful_idempotency_keys WHERE scope = $1 AND key = $2 AND token = $3",
    )
    .bind(scope)
    .bind(key)
    .bind(token)
    .execute(pool)
    .await?;
    Ok(())
}

pub(crate) async fn purge_expired(pool: &PgPool, batch_size: usize) -> Result<u64, Error> {
    let batch = i64::try_from(batch_size.max(1)).unwrap_or(i64::MAX);
    let mut total = 0;
    loop {
        let deleted = sqlx::query(
            "DELETE FROM eventful_idempotency_keys WHERE ctid IN ( \
               SELECT ctid FROM eventful_idempotency_keys WHERE expires_at < now() LIMIT $1)",
        )
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
