//! Several events of one partition in one PostgreSQL transaction.
//!
//! The runtime takes what is already waiting in a partition's queue (up to
//! [`InboxConsumerBuilder::max_batch`](super::InboxConsumerBuilder::max_batch), never
//! waiting for more) and applies it in one transaction: one `BEGIN`, one multi-row guard
//! `INSERT .. ON CONFLICT DO NOTHING RETURNING`, each first delivery's handler in offset
//! order, one `COMMIT`. That saves a commit (a WAL flush with `synchronous_commit` on) and
//! three round trips per event.
//!
//! A handler that fails (or panics) aborts the whole transaction. The batch is then rolled
//! back and split: the events before the failing one are applied again as a batch (their
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
    for (index, item) in items.iter().enumerate() {
        let (meta, handler) = match item {
            Prepared::Handle(meta, handler) => (meta, handler),
            _ => {
                outcomes.push(Outcome::Skipped);
                continue;
            }
        };
        // `remove`: a second copy of the same event in this batch is a duplicate.
        if !first.remove(&meta.id) {
            tracing::debug!(event_id = %meta.id, offset = meta.offset, "duplicate");
            outcomes.push(Outcome::Duplicate);
            continue;
        }
        // The same fields as on the one-event path; the event's trace context (not the
        // batch's) is the handler's parent, so each event stays in its own trace.
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
            AssertUnwindSafe(handler.handle(&mut tx, meta)).catch_unwind(),
        )
        .instrument(span)
        .await;
        if !matches!(handled, Ok(Ok(()))) {
            match &handled {
                Ok(Err(failure)) => {
                    tracing::debug!(offset = meta.offset, ?failure, "failed in a batch")
                }
                _ => tracing::debug!(offset = meta.offset, "panicked in a batch"),
            }
            let _ = tx.rollback().await;
            return BatchResult::FailedAt {
                index,
                panicked: handled.is_err(),
            };
        }
        outcomes.push(Outcome::Applied);
    }
    match tx.commit().await {
        Ok(()) => BatchResult::Committed(outcomes),
        Err(e) => BatchResult::Failed(format!("commit: {e}")),
    }
}
