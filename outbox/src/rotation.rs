//! Slot rotation: how the outbox table stays small whatever holds the xmin horizon.
//!
//! The table is two partitions ("slots", migration 3). Events are written to the current
//! slot. Once the sequence has moved `min_events` past the start of the current slot, a
//! rotation, in one transaction:
//! 1. locks the other slot (`ACCESS EXCLUSIVE`, waiting at most [`LOCK_TIMEOUT_MS`]): every
//!    transaction that wrote to it or is reading it has finished;
//! 2. copies its unpublished rows (parked ones, or ones still failing) into the current slot
//!    with every column kept (seq, attempts, parking), so ordering and re-drive are
//!    unchanged;
//! 3. `TRUNCATE`s it, which removes its rows, their dead versions and its index entries at
//!    once, even while a long transaction holds the horizon (an `UPDATE`/`DELETE` queue
//!    cannot reclaim anything then);
//! 4. makes it the current slot.
//!
//! A relay marking rows that were carried over meanwhile still finds them: marks go by seq
//! through the parent table. A rotation is skipped (and tried again later) while the other
//! slot has more than `max_carry` unpublished rows: the relay is behind, and copying its
//! backlog would cost more than it saves.

use std::time::Duration;

use sqlx::PgPool;

use crate::{Error, Outbox};

/// How long a rotation waits for the slot's lock before giving up until the next check.
/// While it waits, new statements on that slot queue behind it, so it is short.
pub const LOCK_TIMEOUT_MS: u64 = 50;

/// What [`Outbox::rotate`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Rotation {
    /// The other slot was emptied and is now current.
    Rotated {
        /// Unpublished rows carried over to the slot that stays.
        carried: u64,
        /// The slot new events now go to (0 or 1).
        current: i16,
    },
    /// Fewer than `min_events` events were recorded since the last rotation.
    NotDue,
    /// The other slot holds more than `max_carry` unpublished rows: not rotated.
    Backlogged {
        /// Unpublished rows counted (at most `max_carry + 1`).
        unpublished: u64,
    },
    /// Another relay is rotating, or a transaction holds a lock on the slot (for example a
    /// long-running query on the outbox table): not rotated, try again later.
    Busy,
}

#[derive(sqlx::FromRow)]
struct State {
    current: i16,
    since_seq: i64,
    last_value: i64,
}

impl State {
    /// At least `min_events` events were recorded since the current slot became current.
    fn is_due(&self, min_events: i64) -> bool {
        self.last_value.saturating_sub(self.since_seq) >= min_events
    }

    /// The slot a rotation empties (the one that is not current), as an index.
    fn other(&self) -> usize {
        usize::from(self.current == 0)
    }
}

impl Outbox {
    /// Rotates the slots if at least `min_events` events were recorded since the last
    /// rotation and the other slot has at most `max_carry` unpublished rows (see the
    /// [module docs](crate::rotation)). Relays call this on their own (see
    /// [`RelayBuilder::rotate_after`](crate::RelayBuilder::rotate_after)); call it directly
    /// to rotate from your own scheduler. `min_events = 0` rotates unconditionally.
    #[tracing::instrument(skip_all, fields(table = %self.qualified_table()))]
    pub async fn rotate(
        &self,
        pool: &PgPool,
        min_events: u64,
        max_carry: u64,
    ) -> Result<Rotation, Error> {
        let sql = self.sql();
        let min_events = i64::try_from(min_events).unwrap_or(i64::MAX);
        // A cheap look first, so the common "not yet" takes no lock.
        let state: State = sqlx::query_as(&sql.rotation_state).fetch_one(pool).await?;
        if !state.is_due(min_events) {
            return Ok(Rotation::NotDue);
        }
        let cap = i64::try_from(max_carry).unwrap_or(i64::MAX - 1);
        let unpublished: i64 = sqlx::query_scalar(&sql.unpublished_in_slot[state.other()])
            .bind(cap.saturating_add(1))
            .fetch_one(pool)
            .await?;
        if unpublished > cap {
            return Ok(Rotation::Backlogged {
                unpublished: unpublished as u64,
            });
        }

        let mut tx = pool.begin().await?;
        sqlx::query(&format!("SET LOCAL lock_timeout = '{LOCK_TIMEOUT_MS}ms'"))
            .execute(&mut *tx)
            .await?;
        let state: State = match sqlx::query_as(&sql.lock_slot_state)
            .fetch_one(&mut *tx)
            .await
        {
            Ok(state) => state,
            Err(e) if is_lock_unavailable(&e) => return Ok(Rotation::Busy),
            Err(e) => return Err(e.into()),
        };
        if !state.is_due(min_events) {
            // Someone else rotated between the look and the lock.
            return Ok(Rotation::NotDue);
        }
        let other = state.other();
        if let Err(e) = sqlx::query(&sql.lock_slot[other]).execute(&mut *tx).await {
            if is_lock_unavailable(&e) {
                return Ok(Rotation::Busy);
            }
            return Err(e.into());
        }
        let carried = sqlx::query(&sql.carry_over[other])
            .execute(&mut *tx)
            .await?
            .rows_affected();
        sqlx::query(&sql.truncate_slot[other])
            .execute(&mut *tx)
            .await?;
        let current = other as i16;
        sqlx::query(&sql.switch_slot)
            .bind(current)
            .bind(state.last_value)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        tracing::debug!(carried, current, "outbox slots rotated");
        Ok(Rotation::Rotated { carried, current })
    }
}

/// `55P03 lock_not_available`: `NOWAIT` or `lock_timeout`.
fn is_lock_unavailable(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(e) if e.code().as_deref() == Some("55P03"))
}

/// How a relay rotates: when `enabled`, every `check` it calls [`Outbox::rotate`] with these
/// bounds.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RotationPolicy {
    pub(crate) enabled: bool,
    pub(crate) min_events: u64,
    pub(crate) max_carry: u64,
    pub(crate) check: Duration,
}

impl Default for RotationPolicy {
    fn default() -> Self {
        RotationPolicy {
            enabled: true,
            min_events: 10_000,
            max_carry: 1_000,
            check: Duration::from_millis(250),
        }
    }
}
