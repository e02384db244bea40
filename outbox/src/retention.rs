//! [`Retention`]: deletes published events older than a configured age, in bounded batches.

use std::time::Duration;

use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::{Error, Outbox};

/// Periodically deletes published events older than `max_age`, at most `batch_size` rows per
/// statement (short transactions: no long lock, no long-held xmin horizon).
///
/// Defaults: `max_age` 7 days, `batch_size` 1000, `interval` 60 s.
#[derive(Clone, Debug)]
pub struct Retention {
    pool: PgPool,
    outbox: Outbox,
    max_age: Duration,
    batch_size: usize,
    interval: Duration,
}

impl Retention {
    /// Retention for `outbox` with the defaults.
    pub fn new(pool: PgPool, outbox: Outbox) -> Retention {
        Retention {
            pool,
            outbox,
            max_age: Duration::from_secs(7 * 24 * 3600),
            batch_size: 1000,
            interval: Duration::from_secs(60),
        }
    }

    /// Keep published events this long (default 7 days).
    pub fn max_age(mut self, max_age: Duration) -> Self {
        self.max_age = max_age;
        self
    }

    /// Rows deleted per statement (default 1000, at least 1).
    pub fn batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size.max(1);
        self
    }

    /// Time between runs (default 60 s).
    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    /// Deletes every expired published event, batch after batch; returns how many.
    pub async fn run_once(&self) -> Result<u64, Error> {
        let mut total = 0;
        loop {
            let deleted = self
                .outbox
                .delete_published(&self.pool, self.max_age, self.batch_size)
                .await?;
            total += deleted;
            if deleted < self.batch_size as u64 {
                return Ok(total);
            }
            tokio::task::yield_now().await;
        }
    }

    /// Runs [`run_once`](Self::run_once) every `interval` until `cancel` fires.
    pub fn spawn(self, cancel: CancellationToken) -> JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                match self.run_once().await {
                    Ok(n) if n > 0 => tracing::info!(deleted = n, "outbox retention"),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "outbox retention failed"),
                }
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(self.interval) => {}
                }
            }
        })
    }
}
