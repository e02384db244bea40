//! [`Retention`]: deletes a consumer's old processed-event records, in bounded batches.

use std::time::Duration;

use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::{Error, ProcessedEvents};

/// Periodically deletes the records of one guard ([`ProcessedEvents`]) older than
/// `max_age`, at most `batch_size` rows per statement (short transactions: no long lock,
/// no long-held xmin horizon). The same shape as `eventful_outbox::Retention`.
///
/// An event redelivered after its record was deleted is processed again: keep `max_age`
/// well above the longest possible redelivery delay (topic retention, consumer lag).
///
/// Defaults: `max_age` 7 days, `batch_size` 1000, `interval` 60 s.
#[derive(Clone, Debug)]
pub struct Retention {
    pool: PgPool,
    guard: ProcessedEvents,
    max_age: Duration,
    batch_size: usize,
    interval: Duration,
}

impl Retention {
    /// Retention for the records of `guard` with the defaults.
    pub fn new(pool: PgPool, guard: ProcessedEvents) -> Retention {
        Retention {
            pool,
            guard,
            max_age: Duration::from_secs(7 * 24 * 3600),
            batch_size: 1000,
            interval: Duration::from_secs(60),
        }
    }

    /// Keep records this long (default 7 days).
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

    /// Deletes every expired record, batch after batch; returns how many.
    pub async fn run_once(&self) -> Result<u64, Error> {
        self.guard
            .purge_older_than(&self.pool, self.max_age, self.batch_size)
            .await
    }

    /// Runs [`run_once`](Self::run_once) every `interval` until `cancel` fires. Failures
    /// are logged and retried at the next run.
    pub fn spawn(self, cancel: CancellationToken) -> JoinHandle<()> {
        tokio::spawn(async move {
            let consumer = self.guard.consumer().to_owned();
            loop {
                match self.run_once().await {
                    Ok(n) if n > 0 => {
                        tracing::info!(%consumer, deleted = n, "processed-event retention")
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(%consumer, error = %e, "processed-event retention failed")
                    }
                }
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(self.interval) => {}
                }
            }
        })
    }
}
