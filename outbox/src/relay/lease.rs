//! Partition leases: which relay may publish which key-hash partitions.
//!
//! Each relay heartbeats its row in `<table>_relays`, renews every lease it holds, and
//! rebalances towards a fair share `ceil(64 / live relays)`: it claims free or expired
//! leases when below, and releases its highest partitions when above (only between rounds,
//! so a released partition has no publish in flight; a published batch may still be waiting
//! for its mark, which needs no lease).

use std::sync::atomic::Ordering;
use std::time::Duration;

use sqlx::PgPool;
use uuid::Uuid;

use crate::metrics::RelayMetricsHandle;
use crate::sql::{Sql, PARTITIONS};
use crate::Error;

pub(crate) struct Leases<'a> {
    pub(crate) pool: &'a PgPool,
    pub(crate) sql: &'a Sql,
    pub(crate) relay_id: Uuid,
    pub(crate) ttl: Duration,
    pub(crate) metrics: &'a RelayMetricsHandle,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl Leases<'_> {
    /// Upserts this relay's heartbeat and renews its leases; returns how many it holds.
    pub(crate) async fn heartbeat(&self) -> Result<(), Error> {
        sqlx::query(&self.sql.register)
            .bind(self.relay_id)
            .execute(self.pool)
            .await?;
        let renewed: Vec<i32> = sqlx::query_scalar(&self.sql.renew)
            .bind(self.relay_id)
            .bind(ms(self.ttl))
            .fetch_all(self.pool)
            .await?;
        self.metrics
            .counters
            .partitions
            .store(renewed.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Claims or releases leases towards this relay's fair share; returns the number of
    /// partitions claimed.
    pub(crate) async fn rebalance(
        &self,
        batch_lock: &tokio::sync::Mutex<()>,
    ) -> Result<usize, Error> {
        let held: i64 = sqlx::query_scalar(&self.sql.held)
            .bind(self.relay_id)
            .fetch_one(self.pool)
            .await?;
        let held = held.max(0) as usize;
        let live: i64 = sqlx::query_scalar(&self.sql.live_relays)
            .bind(ms(self.ttl))
            .fetch_one(self.pool)
            .await?;
        let live = live.max(1) as usize;
        let target = (PARTITIONS as usize).div_ceil(live);
        let mut held = held;
        let mut claimed = 0;
        if held > target {
            // Releasing waits for the batch in flight: a released partition must have
            // nothing in flight when another relay claims it. Claiming needs no such wait.
            let _guard = batch_lock.lock().await;
            let released: Vec<i32> = sqlx::query_scalar(&self.sql.release_some)
                .bind(self.relay_id)
                .bind((held - target) as i64)
                .fetch_all(self.pool)
                .await?;
            tracing::debug!(relay_id = %self.relay_id, ?released, live, "released partitions");
            held -= released.len();
        } else if held < target {
            let got: Vec<i32> = sqlx::query_scalar(&self.sql.claim)
                .bind(self.relay_id)
                .bind(ms(self.ttl))
                .bind((target - held) as i64)
                .fetch_all(self.pool)
                .await?;
            if !got.is_empty() {
                tracing::debug!(relay_id = %self.relay_id, claimed = ?got, live, "claimed partitions");
            }
            claimed = got.len();
            held += claimed;
        }
        self.metrics
            .counters
            .partitions
            .store(held as u64, Ordering::Relaxed);
        Ok(claimed)
    }

    /// Forgets relays whose heartbeat is older than ten TTLs.
    pub(crate) async fn prune(&self) -> Result<(), Error> {
        sqlx::query(&self.sql.prune_relays)
            .bind(ms(self.ttl * 10))
            .execute(self.pool)
            .await?;
        Ok(())
    }

    /// Gives every lease back and removes the heartbeat (graceful shutdown).
    pub(crate) async fn release_all(&self) -> Result<(), Error> {
        sqlx::query(&self.sql.release_all)
            .bind(self.relay_id)
            .execute(self.pool)
            .await?;
        sqlx::query(&self.sql.deregister)
            .bind(self.relay_id)
            .execute(self.pool)
            .await?;
        self.metrics.counters.partitions.store(0, Ordering::Relaxed);
        Ok(())
    }
}
