//! Several events of one partition in one PostgreSQL transaction.
//!
//! The runtime takes what is already waiting in a partition's queue (up to
//! [`InboxConsumerBuilder::max_batch`](super::InboxConsumerBuilder::max_batch), never
//! waiting for more) and applies it in one transaction: one `BEGIN`, one multi-row guard
//! `INSERT .. ON CONFLICT DO NOTHING RETURNING`, each first delivery's handler in offset
//! order, one `COMMIT`. That saves a commit (a WAL flush with `synchronous_commit` on) and
//! three round trips per event. A handler whose `applies_batches` is true is handed each run
//! of consecutive first deliveries for it in one `handle_batch` call instead of one `handle`
//! call per event.
//!
//! A handler that fails (or panics) aborts the whole transaction. The batch is then rolled
//! back and split (a run's failure at the position its handler reports; a run's panic on
//! the run's first event): the events before the failing one are applied again as a batch (their
//! handlers run again, in a new transaction; nothing of the first attempt committed), the
//! failing event goes through the one-event path alone (retried with backoff, or
//! dead-lettered), and the events after it form the next batch. A failure that belongs to no
//! single event (`BEGIN`, the guard, `COMMIT`) sends the whole batch through the one-event
//! path.

use std::collections::HashSet;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures::FutureExt as _;
use tracing::Instrument as _;
use uuid::Uuid;

use super::partition::RawMessage;
use super::{ErasedHandler, Outcome, Settings, UnknownEventType};
use crate::EventMeta;

/// A message read for a batch: its envelope and handler, or why it must go alone.
pub(crate) enum Prepared {
    /// First deliveries run the handler; duplicates are recognised by the guard.
    Handle(EventMeta, Arc<dyn ErasedHandler>),
    /// An event type without a handler under [`UnknownEventType::Skip`]: settled without a
    /// transaction.
    Skip(EventMeta),
    /// Invalid envelope, or an unknown type to dead-letter: the one-event path handles it.
    Alone,
}

impl Prepared {
    pub(crate) fn new(settings: &Settings, message: &RawMessage) -> Prepared {
        let Ok(meta) = EventMeta::parse(
            &message.topic,
            message.partition,
            message.offset,
            message.key.as_deref(),
            message.headers.clone(),
            message.payload.as_deref(),
        ) else {
            return Prepared::Alone;
        };
        match settings.handlers.get(&meta.event_type) {
            Some(handler) => Prepared::Handle(meta, handler.clone()),
            None => match settings.unknown {
                UnknownEventType::DeadLetter => Prepared::Alone,
                _ => Prepared::Skip(meta),
            },
        }
    }

    pub(crate) fn batchable(&self) -> bool {
        !matches!(self, Prepared::Alone)
    }

    pub(crate) fn meta(&self) -> Option<&EventMeta> {
        match self {
            Prepared::Handle(meta, _) | Prepared::Skip(meta) => Some(meta),
            Prepared::Alone => None,
        }
    }
}

/// How a batch attempt ended.
pub(crate) enum BatchResult {
    /// Committed: one outcome per event, in order.
    Committed(Vec<Outcome>),
    /// The handler of the event at this index (in the batch) failed (`panicked: false`) or
    /// panicked; the transaction was rolled back and nothing of the batch applied.
    FailedAt { index: usize, panicked: bool },
    /// `BEGIN`, the guard or `COMMIT` failed; nothing is known to be applied (a `COMMIT` whose
    /// outcome is unknown may have applied everything: the guard answers `Duplicate` then).
    Failed(String),
}

/// Applies `items` (all [`Prepared::batchable`]) in one transaction.
pub(crate) async fn apply(settings: &Settings, items: &[&Prepared]) -> BatchResult {
    let mut ids: Vec<Uuid> = items
        .iter()
        .filter_map(|item| match item {
            Prepared::Handle(meta, _) => Some(meta.id),
            _ => None,
        })
        .collect();
    ids.sort_unstable();
    ids.dedup();
    if ids.is_empty() {
        // Only skipped types: nothing to record or apply.
        return BatchResult::Committed(items.iter().map(|_| Outcome::Skipped).collect());
    }
    let mut tx = match settings.pool.begin().await {
        Ok(tx) => tx,
        Err(e) => return BatchResult::Failed(format!("begin: {e}")),
    };
    let mut first: HashSet<Uuid> = match settings.guard.check_and_record_many(&mut tx, &ids).await {
        Ok(first) => first.into_iter().collect(),
        Err(e) => {
            let _ = tx.rollback().await;
            return BatchResult::Failed(format!("guard: {e}"));
        }
    };
    let mut outcomes = Vec::with_capacity(items.len());
    let mut index = 0;
    while index < items.len() {
        let (meta, handler) = match items[index] {
            Prepared::Handle(meta, handler) => (meta, handler),
            _ => {
                outcomes.push(Outcome::Skipped);
                index += 1;
                continue;
            }
        };
        // `remove`: a second copy of the same event in this batch is a duplicate.
        if !first.remove(&meta.id) {
            tracing::debug!(event_id = %meta.id, offset = meta.offset, "duplicate");
            outcomes.push(Outcome::Duplicate);
            index += 1;
            continue;
        }
        // A run: this event and the first deliveries right after it for the same handler,
        // handed over in one `handle_batch` call.
        let mut run = vec![meta];
        let mut end = index + 1;
        while let Some(Prepared::Handle(next, next_handler)) =
            items.get(end).filter(|_| handler.applies_batches())
        {
            if !Arc::ptr_eq(next_handler, handler) || !first.remove(&next.id) {
                break;
            }
            run.push(next);
            end += 1;
        }
        let failed = if run.len() == 1 {
            apply_one(settings, &mut tx, meta, handler).await
        } else {
            apply_run(settings, &mut tx, &run, handler).await
        };
        if let Some((at, panicked)) = failed {
            let _ = tx.rollback().await;
            return BatchResult::FailedAt {
                index: index + at,
                panicked,
            };
        }
        outcomes.extend(run.iter().map(|_| Outcome::Applied));
        index = end;
    }
    match tx.commit().await {
        Ok(()) => BatchResult::Committed(outcomes),
        Err(e) => BatchResult::Failed(format!("commit: {e}")),
    }
}

/// Runs one event's handler on the batch's transaction; on failure, `(0, panicked)`.
async fn apply_one(
    settings: &Settings,
    tx: &mut sqlx::PgConnection,
    meta: &EventMeta,
    handler: &Arc<dyn ErasedHandler>,
) -> Option<(usize, bool)> {
    // The same fields as on the one-event path; the event's trace context (not the batch's)
    // is the handler's parent, so each event stays in its own trace.
    let span = tracing::info_span!(
        "inbox.message",
        consumer = settings.guard.consumer(),
        topic = %meta.topic,
        partition = meta.partition,
        offset = meta.offset,
        event_type = %meta.event_type,
        event_id = %meta.id,
    );
    #[cfg(feature = "opentelemetry")]
    if let Some(traceparent) = meta.header(eventful_core::headers::TRACEPARENT) {
        eventful_core::otel::set_parent(&span, traceparent);
    }
    // Panics are caught per event, as on the one-event path.
    let handled = super::metrics::timed(
        settings.guard.consumer(),
        &meta.event_type,
        AssertUnwindSafe(handler.handle(tx, meta)).catch_unwind(),
    )
    .instrument(span)
    .await;
    match handled {
        Ok(Ok(())) => None,
        Ok(Err(failure)) => {
            tracing::debug!(offset = meta.offset, ?failure, "failed in a batch");
            Some((0, false))
        }
        Err(_) => {
            tracing::debug!(offset = meta.offset, "panicked in a batch");
            Some((0, true))
        }
    }
}

/// Hands a run of events of one handler to its `handle_batch`; on failure, the failing
/// position in the run and whether it panicked. A panic cannot be pinned on one event: it
/// is put on the run's first, which then goes alone, and the rest run again as a batch.
async fn apply_run(
    settings: &Settings,
    tx: &mut sqlx::PgConnection,
    run: &[&EventMeta],
    handler: &Arc<dyn ErasedHandler>,
) -> Option<(usize, bool)> {
    let (first, last) = (run[0], run[run.len() - 1]);
    let span = tracing::info_span!(
        "inbox.messages",
        consumer = settings.guard.consumer(),
        topic = %first.topic,
        partition = first.partition,
        first_offset = first.offset,
        last_offset = last.offset,
        event_type = %first.event_type,
        events = run.len(),
    );
    let handled = super::metrics::timed(
        settings.guard.consumer(),
        &first.event_type,
        AssertUnwindSafe(handler.handle_batch(tx, run)).catch_unwind(),
    )
    .instrument(span)
    .await;
    match handled {
        Ok(Ok(())) => None,
        Ok(Err((at, failure))) => {
            let offset = run.get(at).map(|m| m.offset);
            tracing::debug!(?offset, ?failure, "failed in a batch");
            Some((at.min(run.len() - 1), false))
        }
        Err(_) => {
            tracing::debug!(first_offset = first.offset, "a batch handler panicked");
            Some((0, true))
        }
    }
}
