//! The deadline scanner: a background task that applies due deadlines.

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::Coordinator;

impl Coordinator {
    /// Spawns the deadline scanner and returns its handle.
    ///
    /// Every [`scan_interval`](crate::CoordinatorBuilder::scan_interval) it runs
    /// [`expire_due`](Coordinator::expire_due) until a batch comes back short (so a
    /// backlog drains at full speed), then sleeps. Timed-out actions start compensation;
    /// unacknowledged compensations are re-sent. On `cancel` it finishes the batch in hand
    /// and returns. Errors are logged and retried at the next tick. With the `metrics`
    /// feature it also refreshes the running / compensating gauges each interval. Any number of scanners
    /// (in any number of processes) may run against one database.
    pub fn spawn_deadline_scanner(&self, cancel: CancellationToken) -> JoinHandle<()> {
        let coordinator = self.clone();
        let span = tracing::info_span!("saga.deadline_scanner");
        tokio::spawn(
            async move {
                let interval = coordinator.inner().scan_interval;
                let batch = coordinator.inner().scan_batch;
                loop {
                    loop {
                        if cancel.is_cancelled() {
                            return;
                        }
                        match coordinator.expire_due().await {
                            Ok(n) if n >= batch => continue,
                            Ok(_) => break,
                            Err(e) => {
                                tracing::warn!(error = %e, "deadline scan failed; retrying");
                                break;
                            }
                        }
                    }
                    #[cfg(feature = "metrics")]
                    if let Err(e) = coordinator.refresh_in_flight_gauges().await {
                        tracing::debug!(error = %e, "counting in-flight sagas failed");
                    }
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(interval) => {}
                    }
                }
            }
            .instrument(span),
        )
    }
}
