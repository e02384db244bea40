//! PostgreSQL storage of idempotency keys (`eventful_idempotency_keys`).

use std::time::Duration;

use sqlx::PgPool;
use uuid::Uuid;

use crate::Error;

/// What a request found when it tried to claim its key.
pub(crate) enum Claim {
    /// This request owns the key and must run the handler.
    Owned { token: Uuid },
    /// Another request with a different fingerprint used the key.
    Mismatch,
    /// The first request is still running.
    InFlight,
    /// The first request completed: replay its response.
    Completed {
        status: u16,
        content_type: Option<String>,
        body: Vec<u8>,
    },
}

/// `(request_hash, state, status, content_type, body)` of a stored key.
type KeyRow = (String, String, Option<i16>, Option<String>, Option<Vec<u8>>);

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

pub(crate) async fn claim(
    pool: &PgPool,
    scope: &str,
    key: &str,
    request_hash: &str,
    ttl: Duration,
    in_flight_timeout: Duration,
) -> Result<Claim, Error> {
    // A row deleted between the insert attempt and the read (a released key) is retried.
    for _ in 0..5 {
        let token = Uuid::new_v4();
        // One statement: concurrent claims of one key serialise on the primary key, so
        // exactly one of them inserts (or takes over an expired / abandoned row).
        let owned = sqlx::query(
            "INSERT INTO eventful_idempotency_keys \
               (scope, key, request_hash, token, state, expires_at) \
             VALUES ($1, $2, $3, $4, 'in_flight', now() + make_interval(secs => $5::float8 / 1e6)) \
             ON CONFLICT (scope, key) DO UPDATE SET \
               request_hash = EXCLUDED.request_hash, token = EXCLUDED.token, state = 'in_flight', \
               status = NULL, content_type = NULL, body = NULL, created_at = now(), \
               expires_at = EXCLUDED.expires_at \
             WHERE eventful_idempotency_keys.expires_at < now() \
                OR (eventful_idempotency_keys.state = 'in_flight' \
                    AND eventful_idempotency_keys.created_at \
                        < now() - make_interval(secs => $6::float8 / 1e6))",
        )
        .bind(scope)
        .bind(key)
        .bind(request_hash)
        .bind(token)
        .bind(micros(ttl))
        .bind(micros(in_flight_timeout))
        .execute(pool)
        .await?
        .rows_affected();
        if owned == 1 {
            return Ok(Claim::Owned { token });
        }
        let row: Option<KeyRow> = sqlx::query_as(
            "SELECT request_hash, state, status, content_type, body \
                 FROM eventful_idempotency_keys WHERE scope = $1 AND key = $2",
        )
        .bind(scope)
        .bind(key)
        .fetch_optional(pool)
        .await?;
        let Some((hash, state, status, content_type, body)) = row else {
            continue;
        };
        if hash != request_hash {
            return Ok(Claim::Mismatch);
        }
        return Ok(match (state.as_str(), status) {
            ("completed", Some(status)) => Claim::Completed {
                status: u16::try_from(status).unwrap_or(500),
                content_type,
                body: body.unwrap_or_default(),
            },
            _ => Claim::InFlight,
        });
    }
    Ok(Claim::InFlight)
}

pub(crate) async fn complete(
    pool: &PgPool,
    scope: &str,
    key: &str,
    token: Uuid,
    status: u16,
    content_type: Option<&str>,
    body: &[u8],
) -> Result<(), Error> {
    sqlx::query(
        "UPDATE eventful_idempotency_keys \
         SET state = 'completed', status = $4, content_type = $5, body = $6 \
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

pub(crate) async fn purge_expired(pool: &PgPool, batch_size: u32) -> Result<u64, Error> {
    let batch = i64::from(batch_size.max(1));
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
