//! One partition's worker: processes its messages in order, in batches of what is queued.

use std::any::Any;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use eventful_core::headers::{EVENT_ID, EVENT_TYPE};
use futures::FutureExt as _;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use super::batch::{self, BatchResult, Prepared};
use super::{Delivery, Failure, Outcome, Settings, UnknownEventType};
use crate::{EventMeta, HandlerError, Processed};

/// A consumed message, detached from the client.
#[derive(Debug, Clone)]
pub(crate) struct RawMessage {
    pub(crate) topic: String,
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    pub(crate) key: Option<Vec<u8>>,
    pub(crate) payload: Option<Vec<u8>>,
    pub(crate) headers: Vec<(String, Vec<u8>)>,
}

impl RawMessage {
    /// The value of header `name` when it is UTF-8 (the span fields and the trace parent;
    /// the envelope itself is validated by `EventMeta::parse`).
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key == name)
            .and_then(|(_, value)| std::str::from_utf8(value).ok())
    }
}

/// Stores the offset after a message (implemented by the runtime over the Kafka client).
pub(crate) trait OffsetStore: Send + Sync + 'static {
    fn store(&self, topic: &str, partition: i32, next_offset: i64);
}

/// Runs one partition until its channel closes or `stop` fires (after the in-flight batch).
///
/// `previous` are completion signals of earlier workers of the same partition (a revoked and
/// reassigned partition): this worker starts after they ended, so offsets never go backwards.
pub(crate) async fn run_partition(
    settings: Arc<Settings>,
    offsets: Arc<dyn OffsetStore>,
    mut messages: mpsc::Receiver<RawMessage>,
    stop: CancellationToken,
    previous: Vec<oneshot::Receiver<()>>,
    _done: oneshot::Sender<()>,
) {
    for earlier in previous {
        let _ = earlier.await;
    }
    let max_batch = settings.max_batch.max(1);
    let mut batch = Vec::with_capacity(max_batch);
    loop {
        let message = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            message = messages.recv() => match message {
                Some(message) => message,
                None => return,
            },
        };
        batch.clear();
        batch.push(message);
        // Only what is already queued, never waiting for more: batches form when the
        // partition is behind, and a lone event is not delayed.
        while batch.len() < max_batch {
            match messages.try_recv() {
                Ok(message) => batch.push(message),
                Err(_) => break,
            }
        }
        if !settle_batch(&settings, offsets.as_ref(), &batch, &stop).await {
            // Interrupted by shutdown/revocation while waiting to retry: the offsets of the
            // unsettled messages are not stored, they will be redelivered.
            return;
        }
    }
}

/// Settles every message of `batch` in order (see [`batch`](super::batch)), storing each
/// one's offset once it is settled; `false` when `stop` fired during a backoff.
async fn settle_batch(
    settings: &Settings,
    offsets: &dyn OffsetStore,
    batch: &[RawMessage],
    stop: &CancellationToken,
) -> bool {
    if let [message] = batch {
        return settle_alone(settings, offsets, message, stop, Prior::default()).await;
    }
    let prepared: Vec<Prepared> = batch
        .iter()
        .map(|message| Prepared::new(settings, message))
        .collect();
    let mut next = 0;
    // A message whose handler failed in a batch: it goes alone, after what precedes it.
    let mut alone: Option<(usize, Prior)> = None;
    // After a failure of the batch itself (BEGIN, guard, COMMIT), up to here one at a time.
    let mut one_by_one_until = 0;
    while next < batch.len() {
        let prior = match alone {
            Some((index, prior)) if index == next => Some(prior),
            _ => None,
        };
        if prior.is_some() || next < one_by_one_until || !prepared[next].batchable() {
            let prior = prior.unwrap_or_default();
            if !settle_alone(settings, offsets, &batch[next], stop, prior).await {
                return false;
            }
            next += 1;
            continue;
        }
        let end = (next..batch.len())
            .find(|&i| !prepared[i].batchable() || alone.is_some_and(|(index, _)| index == i))
            .unwrap_or(batch.len());
        let items: Vec<&Prepared> = prepared[next..end].iter().collect();
        let span = tracing::info_span!(
            "inbox.batch",
            consumer = settings.guard.consumer(),
            topic = %batch[next].topic,
            partition = batch[next].partition,
            offset = batch[next].offset,
            events = items.len(),
        );
        match batch::apply(settings, &items).instrument(span).await {
            BatchResult::Committed(outcomes) => {
                for (i, outcome) in (next..end).zip(outcomes) {
                    let delivery = delivery(&batch[i], prepared[i].meta(), 1, outcome);
                    settle(settings, offsets, &batch[i], delivery).await;
                }
                next = end;
            }
            BatchResult::FailedAt { index, panicked } => {
                let prior = Prior {
                    attempts: 1,
                    panics: u32::from(panicked),
                };
                alone = Some((next + index, prior));
            }
            BatchResult::Failed(error) => {
                tracing::warn!(error = %error, "batch failed, processing its events one by one");
                one_by_one_until = end;
            }
        }
    }
    true
}

/// Attempts already made for a message in a batch that was rolled back.
#[derive(Debug, Clone, Copy, Default)]
struct Prior {
    attempts: u32,
    panics: u32,
}

/// Settles one message in its own transaction; `false` when `stop` fired during a backoff.
async fn settle_alone(
    settings: &Settings,
    offsets: &dyn OffsetStore,
    message: &RawMessage,
    stop: &CancellationToken,
    prior: Prior,
) -> bool {
    let span = tracing::info_span!(
        "inbox.message",
        consumer = settings.guard.consumer(),
        topic = %message.topic,
        partition = message.partition,
        offset = message.offset,
        event_type = message.header(EVENT_TYPE).unwrap_or(""),
        event_id = message.header(EVENT_ID).unwrap_or(""),
        outcome = tracing::field::Empty,
    );
    #[cfg(feature = "opentelemetry")]
    if let Some(traceparent) = message.header(eventful_core::headers::TRACEPARENT) {
        eventful_core::otel::set_parent(&span, traceparent);
    }
    let Some(delivery) = process(settings, message, stop, prior)
        .instrument(span.clone())
        .await
    else {
        return false;
    };
    span.record("outcome", outcome_label(&delivery.outcome));
    settle(settings, offsets, message, delivery).await;
    true
}

/// The `outcome` field of an `inbox.message` span.
fn outcome_label(outcome: &Outcome) -> &'static str {
    match outcome {
        Outcome::Applied => "applied",
        Outcome::Duplicate => "duplicate",
        Outcome::DeadLettered { .. } => "dead_lettered",
        Outcome::Skipped => "skipped",
    }
}

/// Reports a settled message to the hook, then stores its offset.
async fn settle(
    settings: &Settings,
    offsets: &dyn OffsetStore,
    message: &RawMessage,
    delivery: Delivery,
) {
    super::metrics::settled(settings.guard.consumer(), &delivery);
    if let Some(hook) = &settings.on_delivery {
        // The message is settled: a panicking hook must not kill the partition.
        if let Err(panic) = AssertUnwindSafe(async { hook(delivery).await })
            .catch_unwind()
            .await
        {
            tracing::error!(panic = %panic_message(&*panic), "on_delivery hook panicked");
        }
    }
    offsets.store(&message.topic, message.partition, message.offset + 1);
}

fn delivery(
    message: &RawMessage,
    meta: Option<&EventMeta>,
    attempts: u32,
    outcome: Outcome,
) -> Delivery {
    Delivery {
        topic: message.topic.clone(),
        partition: message.partition,
        offset: message.offset,
        event_id: meta.map(|m| m.id),
        event_type: meta.map(|m| m.event_type.clone()),
        attempts,
        outcome,
    }
}

enum Attempt {
    Done(Option<EventMeta>, Outcome),
    Transient(Option<EventMeta>, String),
    Permanent(Option<EventMeta>, String),
    /// The handler panicked (its transaction was rolled back); the panic message.
    Panicked(Option<EventMeta>, String),
}

/// Processes one message to completion (applied, duplicate, skipped or dead-lettered),
/// retrying transient failures; `None` when `stop` fired during a backoff.
async fn process(
    settings: &Settings,
    message: &RawMessage,
    stop: &CancellationToken,
    prior: Prior,
) -> Option<Delivery> {
    let mut attempts = prior.attempts;
    let mut panics = prior.panics;
    loop {
        attempts += 1;
        let (meta, outcome) = match attempt(settings, message).await {
            Attempt::Done(meta, outcome) => (meta, outcome),
            Attempt::Permanent(meta, error) => {
                let error = dead_letter(settings, message, meta.as_ref(), error, stop).await?;
                (meta, Outcome::DeadLettered { error })
            }
            Attempt::Transient(meta, error) => {
                if settings.max_attempts.is_some_and(|max| attempts >= max) {
                    let error = format!("gave up after {attempts} attempts: {error}");
                    let error = dead_letter(settings, message, meta.as_ref(), error, stop).await?;
                    (meta, Outcome::DeadLettered { error })
                } else {
                    let delay = settings.backoff.delay(attempts);
                    tracing::warn!(attempts, error = %error, ?delay, "transient failure, retrying");
                    sleep_or_stop(delay, stop).await?;
                    continue;
                }
            }
            Attempt::Panicked(meta, panic) => {
                panics += 1;
                let error = format!("handler panicked: {panic}");
                let exhausted = panics >= settings.max_panic_attempts
                    || settings.max_attempts.is_some_and(|max| attempts >= max);
                if exhausted {
                    let error = format!("{error} (gave up after {attempts} attempts)");
                    let error = dead_letter(settings, message, meta.as_ref(), error, stop).await?;
                    (meta, Outcome::DeadLettered { error })
                } else {
                    let delay = settings.backoff.delay(attempts);
                    tracing::error!(attempts, error = %error, ?delay, "handler panicked, retrying");
                    sleep_or_stop(delay, stop).await?;
                    continue;
                }
            }
        };
        return Some(delivery(message, meta.as_ref(), attempts, outcome));
    }
}

/// One try: envelope, transaction, guard, handler, commit.
async fn attempt(settings: &Settings, message: &RawMessage) -> Attempt {
    let meta = match EventMeta::parse(
        &message.topic,
        message.partition,
        message.offset,
        message.key.as_deref(),
        message.headers.clone(),
        message.payload.as_deref(),
    ) {
        Ok(meta) => meta,
        Err(e) => return Attempt::Permanent(None, format!("invalid envelope: {e}")),
    };
    let Some(handler) = settings.handlers.get(&meta.event_type) else {
        return match settings.unknown {
            UnknownEventType::DeadLetter => {
                let error = format!("no handler for event type `{}`", meta.event_type);
                Attempt::Permanent(Some(meta), error)
            }
            _ => Attempt::Done(Some(meta), Outcome::Skipped),
        };
    };
    let mut tx = match settings.pool.begin().await {
        Ok(tx) => tx,
        Err(e) => return Attempt::Transient(Some(meta), format!("begin: {e}")),
    };
    // Guard failures are infrastructure failures (connection, missing table): retried, never
    // dead-lettered.
    match settings.guard.check_and_record(&mut tx, meta.id).await {
        Ok(Processed::First) => {}
        Ok(Processed::Duplicate) => {
            let _ = tx.rollback().await;
            tracing::debug!(event_id = %meta.id, "duplicate");
            return Attempt::Done(Some(meta), Outcome::Duplicate);
        }
        Err(e) => return Attempt::Transient(Some(meta), format!("guard: {e}")),
    }
    // A panic (a bug such as an out-of-bounds index) is caught per event: unwinding out of
    // here would end the partition's task and stall the partition for good. The transaction
    // is rolled back, so nothing of the panicking attempt is applied.
    let handled = super::metrics::timed(
        settings.guard.consumer(),
        &meta.event_type,
        AssertUnwindSafe(async { handler.handle(&mut tx, &meta).await }).catch_unwind(),
    )
    .await;
    match handled {
        Ok(Ok(())) => {}
        Err(panic) => {
            let _ = tx.rollback().await;
            return Attempt::Panicked(Some(meta), panic_message(&*panic));
        }
        Ok(Err(failure)) => {
            let _ = tx.rollback().await;
            return match failure {
                Failure::Decode(e) => Attempt::Permanent(Some(meta), e.to_string()),
                Failure::Handler(HandlerError::Transient(e)) => {
                    Attempt::Transient(Some(meta), e.to_string())
                }
                Failure::Handler(e) => Attempt::Permanent(Some(meta), e.to_string()),
            };
        }
    }
    // A commit whose outcome is unknown is retried: if it did commit, the guard answers
    // Duplicate on the retry.
    match tx.commit().await {
        Ok(()) => Attempt::Done(Some(meta), Outcome::Applied),
        Err(e) => Attempt::Transient(Some(meta), format!("commit: {e}")),
    }
}

/// Writes the message to the dead-letter destination, retrying until it succeeds or `stop`
/// fires; returns the error text recorded.
async fn dead_letter(
    settings: &Settings,
    message: &RawMessage,
    meta: Option<&EventMeta>,
    error: String,
    stop: &CancellationToken,
) -> Option<String> {
    tracing::warn!(error = %error, "dead-lettering message");
    let mut failures = 0u32;
    loop {
        match settings
            .dead_letter
            .write(
                &settings.pool,
                settings.guard.consumer(),
                message,
                meta,
                &error,
            )
            .await
        {
            Ok(()) => return Some(error),
            Err(e) => {
                failures = failures.saturating_add(1);
                tracing::error!(error = %e, "writing the dead letter failed, retrying");
                sleep_or_stop(settings.backoff.delay(failures), stop).await?;
            }
        }
    }
}

async fn sleep_or_stop(delay: Duration, stop: &CancellationToken) -> Option<()> {
    tokio::select! {
        _ = stop.cancelled() => None,
        _ = tokio::time::sleep(delay) => Some(()),
    }
}

/// The text of a panic payload (`panic!` with a literal or a formatted message).
pub(crate) fn panic_message(panic: &(dyn Any + Send)) -> String {
    if let Some(text) = panic.downcast_ref::<&str>() {
        (*text).to_owned()
    } else if let Some(text) = panic.downcast_ref::<String>() {
        text.clone()
    } else {
        "panic with a non-string payload".to_owned()
    }
}
