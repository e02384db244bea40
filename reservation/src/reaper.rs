//! `Reaper`: the background task that returns the stock of expired holds.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::ReservationStore;

/// Default pause between sweeps when nothing is due.
pub const DEFAULT_REAP_INTERVAL: Duration = Duration::from_millis(250);
/// Default number of due holds looked at per sweep.
pub const DEFAULT_REAP_BATCH: usize = 100;

/// Periodically calls [`ReservationStore::reap_expired`] in bounded batches.
///
/// Run one per process or many: each hold is expired atomically, and exactly once.
/// While batches come back full it sweeps again at once; otherwise it waits
/// [`interval`](Self::interval). Errors are logged and retried after the interval.
#[derive(Clone)]
#[must_use]
pub struct Reaper {
    store: Arc<dyn ReservationStore>,
    interval: Duration,
    batch: usize,
}

impl std::fmt::Debug for Reaper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reaper")
            .field("interval", &self.interval)
            .field("batch", &self.batch)
            .finish_non_exhaustive()
    }
}

impl Reaper {
    /// A reaper with [`DEFAULT_REAP_INTERVAL`] and [`DEFAULT_REAP_BATCH`].
    pub fn new(store: Arc<dyn ReservationStore>) -> Self {
        Self {
            store,
            interval: DEFAULT_REAP_INTERVAL,
            batch: DEFAULT_REAP_BATCH,
        }
    }

    /// Pause between sweeps when nothing more is due. A hold's stock comes back at most
    /// about this long after its deadline (sooner if someone touches the reservation).
    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    /// The most holds expired per call (each by its own short script, coalesced).
    pub fn batch_size(mut self, batch: usize) -> Self {
        self.batch = batch.max(1);
        self
    }

    /// Sweeps until `cancel` fires; a batch in progress completes first.
    pub async fn run(self, cancel: CancellationToken) {
        let span = tracing::info_span!("reservation.reaper");
        async move {
            loop {
                if cancel.is_cancelled() {
                    return;
                }
                let pause = match self.store.reap_expired(self.batch).await {
                    Ok(n) if n >= self.batch => continue,
                    Ok(n) => {
                        if n > 0 {
                            tracing::debug!(expired = n, "returned the stock of expired holds");
                        }
                        self.interval
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "reaping expired holds failed");
                        self.interval
                    }
                };
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(pause) => {}
                }
            }
        }
        .instrument(span)
        .await
    }

    /// Spawns [`run`](Self::run) on the current Tokio runtime.
    pub fn spawn(self, cancel: CancellationToken) -> JoinHandle<()> {
        tokio::spawn(self.run(cancel))
    }
}
