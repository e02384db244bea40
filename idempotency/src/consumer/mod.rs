//! The inbox: a Kafka consumer runtime that applies each event once (feature `kafka`).
//!
//! Per batch of the messages already queued for a partition (at most
//! [`InboxConsumerBuilder::max_batch`]): parse the envelopes → `BEGIN` → one guard insert for
//! every event id → each first delivery's typed handler, in offset order → `COMMIT` → only then
//! store the offsets. A handler that fails rolls the batch back; the events before it are
//! applied again as a batch, it is retried or dead-lettered alone, and the rest go on (see
//! [`InboxConsumerBuilder::max_batch`]). librdkafka commits
//! stored offsets every `auto.commit.interval.ms` (default 5 s), for revoked partitions on
//! every rebalance, and on close; shutdown also commits synchronously. Everything that was
//! committed to PostgreSQL but whose offset was not committed yet is redelivered after a crash
//! or rebalance and recognised as a duplicate by the guard.
//!
//! Partitions run concurrently (one task each); messages of one partition run in order. A
//! partition whose handler keeps failing transiently waits (it is paused in the client, so
//! the consumer keeps polling and stays in the group) while the others go on. A handler
//! that panics fails only its event: the panic is caught, the transaction rolled back, and
//! the event retried and then dead-lettered ([`InboxConsumerBuilder::max_panic_attempts`]).

mod batch;
#[cfg(test)]
mod batch_tests;
mod dead_letter;
mod metrics;
mod options;
mod partition;
mod runtime;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use async_trait::async_trait;
use eventful_core::Backoff;
use futures::future::BoxFuture;
use sqlx::{PgConnection, PgPool};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub use dead_letter::DeadLetter;
pub use options::ConsumerOptions;

use crate::{DecodeError, Error, EventHandler, EventMeta, HandlerError, ProcessedEvents};

/// What the runtime did with one message (reported to [`InboxConsumerBuilder::on_delivery`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// First delivery: the handler ran and its transaction committed.
    Applied,
    /// The guard recognised the event as already processed: nothing was applied.
    Duplicate,
    /// The message went to the dead-letter destination with this error.
    DeadLettered {
        /// Why (envelope error, undecodable payload, permanent handler error, ...).
        error: String,
    },
    /// No handler is registered for the event type and the policy is
    /// [`UnknownEventType::Skip`].
    Skipped,
}

/// One processed message, reported after its transaction committed and before its offset is
/// stored.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Delivery {
    /// Topic of the message.
    pub topic: String,
    /// Partition of the message.
    pub partition: i32,
    /// Offset of the message.
    pub offset: i64,
    /// Event id, when the envelope could be parsed.
    pub event_id: Option<Uuid>,
    /// Event type, when the envelope could be parsed.
    pub event_type: Option<String>,
    /// Handler attempts made for this delivery (more than 1 after transient failures).
    pub attempts: u32,
    /// What happened.
    pub outcome: Outcome,
}

/// What to do with events whose type has no registered handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum UnknownEventType {
    /// Skip them (default): topics often carry event types a given consumer ignores. The
    /// offset moves on; nothing is recorded.
    #[default]
    Skip,
    /// Send them to the dead-letter destination.
    DeadLetter,
}

/// Default of [`InboxConsumerBuilder::max_batch`].
pub const DEFAULT_MAX_BATCH: usize = 64;

type DeliveryHook = Arc<dyn Fn(Delivery) -> BoxFuture<'static, ()> + Send + Sync>;

/// Why one attempt at a message failed, as the runtime sees it.
#[derive(Debug)]
pub(crate) enum Failure {
    Decode(DecodeError),
    Handler(HandlerError),
}

/// A handler with its payload type erased.
#[async_trait]
pub(crate) trait ErasedHandler: Send + Sync {
    async fn handle(&self, tx: &mut PgConnection, event: &EventMeta) -> Result<(), Failure>;

    /// See [`EventHandler::applies_batches`].
    fn applies_batches(&self) -> bool;

    /// Decodes `events` and hands them to `handle_batch`; on failure, the failing position.
    async fn handle_batch(
        &self,
        tx: &mut PgConnection,
        events: &[&EventMeta],
    ) -> Result<(), (usize, Failure)>;

    fn check_consumer(&self, consumer_name: &str) -> Result<(), crate::BoxError>;
}

struct Typed<H>(H);

#[async_trait]
impl<H: EventHandler> ErasedHandler for Typed<H> {
    async fn handle(&self, tx: &mut PgConnection, event: &EventMeta) -> Result<(), Failure> {
        let payload: H::Payload = event.decode().map_err(Failure::Decode)?;
        self.0
            .handle(tx, event, payload)
            .await
            .map_err(Failure::Handler)
    }

    fn applies_batches(&self) -> bool {
        self.0.applies_batches()
    }

    async fn handle_batch(
        &self,
        tx: &mut PgConnection,
        events: &[&EventMeta],
    ) -> Result<(), (usize, Failure)> {
        let mut decoded = Vec::with_capacity(events.len());
        for (index, event) in events.iter().enumerate() {
            let payload: H::Payload = event.decode().map_err(|e| (index, Failure::Decode(e)))?;
            decoded.push((*event, payload));
        }
        self.0
            .handle_batch(tx, decoded)
            .await
            .map_err(|f| (f.index, Failure::Handler(f.error)))
    }

    fn check_consumer(&self, consumer_name: &str) -> Result<(), crate::BoxError> {
        self.0.check_consumer(consumer_name)
    }
}

/// Settings shared by every partition task.
pub(crate) struct Settings {
    pub(crate) pool: PgPool,
    pub(crate) guard: ProcessedEvents,
    pub(crate) handlers: HashMap<String, Arc<dyn ErasedHandler>>,
    pub(crate) unknown: UnknownEventType,
    pub(crate) dead_letter: dead_letter::Destination,
    pub(crate) backoff: Backoff,
    pub(crate) max_attempts: Option<u32>,
    pub(crate) max_panic_attempts: u32,
    pub(crate) max_batch: usize,
    pub(crate) on_delivery: Option<DeliveryHook>,
}

/// The inbox consumer: build with [`InboxConsumer::builder`], start with
/// [`InboxConsumer::spawn`].
pub struct InboxConsumer {
    options: ConsumerOptions,
    topics: Vec<String>,
    partition_buffer: usize,
    settings: Arc<Settings>,
}

impl std::fmt::Debug for InboxConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InboxConsumer")
            .field("options", &self.options)
            .field("topics", &self.topics)
            .finish_non_exhaustive()
    }
}

impl InboxConsumer {
    /// Starts configuring a consumer that reads with `options` and writes to `pool`.
    pub fn builder(options: ConsumerOptions, pool: PgPool) -> InboxConsumerBuilder {
        InboxConsumerBuilder {
            options,
            pool,
            topics: Vec::new(),
            handlers: HashMap::new(),
            unknown: UnknownEventType::default(),
            dead_letter: DeadLetter::Table,
            backoff: Backoff::default(),
            max_attempts: None,
            max_panic_attempts: 3,
            max_batch: DEFAULT_MAX_BATCH,
            partition_buffer: 1024,
            on_delivery: None,
        }
    }

    /// The consumer name (the guard's scope).
    pub fn consumer_name(&self) -> &str {
        self.settings.guard.consumer()
    }

    /// Runs until `cancel` fires, then finishes the in-flight message of every partition,
    /// commits offsets and leaves the group.
    ///
    /// Returns an error only if the consumer cannot start (client creation, subscription).
    pub async fn run(self, cancel: CancellationToken) -> Result<(), Error> {
        runtime::run(
            self.options,
            self.topics,
            self.partition_buffer,
            self.settings,
            cancel,
        )
        .await
    }

    /// Spawns [`run`](Self::run) on the Tokio runtime.
    pub fn spawn(self, cancel: CancellationToken) -> JoinHandle<Result<(), Error>> {
        tokio::spawn(self.run(cancel))
    }
}

/// Configures an [`InboxConsumer`]. Defaults: dead letters to the `eventful_dead_letters`
/// table, unknown event types skipped, a handler that panics dead-lettered after 3
/// attempts, transient retries forever with exponential backoff
/// from 100 ms to 30 s, batches of up to [`DEFAULT_MAX_BATCH`] events, a buffer of 1,024
/// messages per partition.
pub struct InboxConsumerBuilder {
    options: ConsumerOptions,
    pool: PgPool,
    topics: Vec<String>,
    handlers: HashMap<String, Arc<dyn ErasedHandler>>,
    unknown: UnknownEventType,
    dead_letter: DeadLetter,
    backoff: Backoff,
    max_attempts: Option<u32>,
    max_panic_attempts: u32,
    max_batch: usize,
    partition_buffer: usize,
    on_delivery: Option<DeliveryHook>,
}

impl std::fmt::Debug for InboxConsumerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InboxConsumerBuilder")
            .field("options", &self.options)
            .field("topics", &self.topics)
            .finish_non_exhaustive()
    }
}

impl InboxConsumerBuilder {
    /// Subscribes to `topic` (call once per topic; at least one is required).
    pub fn topic(mut self, topic: impl Into<String>) -> Self {
        self.topics.push(topic.into());
        self
    }

    /// Registers `handler` for events whose `event-type` header is `event_type` (replacing an
    /// earlier registration of the same type).
    pub fn handler<H: EventHandler>(mut self, event_type: impl Into<String>, handler: H) -> Self {
        self.handlers
            .insert(event_type.into(), Arc::new(Typed(handler)));
        self
    }

    /// Where unprocessable messages go (default [`DeadLetter::Table`]).
    pub fn dead_letter(mut self, destination: DeadLetter) -> Self {
        self.dead_letter = destination;
        self
    }

    /// What to do with event types that have no handler (default [`UnknownEventType::Skip`]).
    pub fn unknown_event_types(mut self, policy: UnknownEventType) -> Self {
        self.unknown = policy;
        self
    }

    /// Backoff between transient failures: starts at `base`, doubles up to `max`, with
    /// equal jitter ([`Backoff`]; default 100 ms → 30 s; a `max` below `base` is raised to it).
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff.with_max(backoff.max.max(backoff.base));
        self
    }

    /// Dead-letter a message after this many transiently failed attempts (default: retry
    /// forever, since a transient failure such as a database outage affects every message).
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = Some(attempts.max(1));
        self
    }

    /// Dead-letter a message after its handler panicked this many times (default 3, also
    /// bounded by [`max_attempts`](Self::max_attempts)). A panic is caught per event and
    /// its transaction rolled back; it is retried with the transient backoff, since a panic
    /// is usually a bug that fails the same way again, only a few times, and then
    /// dead-lettered with the panic message, so the partition goes on.
    pub fn max_panic_attempts(mut self, attempts: u32) -> Self {
        self.max_panic_attempts = attempts.max(1);
        self
    }

    /// Most events of one partition applied in one transaction (default
    /// [`DEFAULT_MAX_BATCH`]; 1 gives one transaction per event).
    ///
    /// A batch is what is already queued for the partition when its worker is free: the
    /// runtime never waits to fill one, so a lone event is not delayed, and batches grow
    /// only while the partition is behind. One `BEGIN`, one multi-row guard insert, each
    /// first delivery's handler on the same transaction in offset order, one `COMMIT`;
    /// then each message is reported and its offset stored. If a handler fails or panics,
    /// the batch is rolled back and split: the events before it are applied again as a
    /// batch (their handlers run again; nothing of the rolled-back attempt committed), the
    /// failing event is retried or dead-lettered alone, and the events after it go on. A
    /// handler therefore shares its transaction with the other events of its batch: it
    /// sees their writes, and locks it takes are held until the batch commits.
    pub fn max_batch(mut self, events: usize) -> Self {
        self.max_batch = events.max(1);
        self
    }

    /// Messages buffered per partition before the partition is paused in the client
    /// (default 1,024); it resumes once half of them are processed. Pausing makes
    /// librdkafka drop and later refetch what it had prefetched for the partition, so keep
    /// the buffer well above a batch: pausing is meant for a partition stuck retrying.
    pub fn partition_buffer(mut self, messages: usize) -> Self {
        self.partition_buffer = messages.max(1);
        self
    }

    /// Called after each message's transaction committed and before its offset is stored
    /// (metrics, tests). The offset is stored when the returned future completes, so keep it
    /// short.
    pub fn on_delivery<F, Fut>(mut self, hook: F) -> Self
    where
        F: Fn(Delivery) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.on_delivery = Some(Arc::new(move |delivery| Box::pin(hook(delivery))));
        self
    }

    /// Validates the configuration, including each handler's
    /// [`check_consumer`](crate::EventHandler::check_consumer).
    pub fn build(self) -> Result<InboxConsumer, Error> {
        if self.topics.is_empty() {
            return Err(Error::Config("no topic to consume".into()));
        }
        if self.handlers.is_empty() {
            return Err(Error::Config("no handler registered".into()));
        }
        self.options.validate()?;
        for (event_type, handler) in &self.handlers {
            handler
                .check_consumer(&self.options.consumer_name)
                .map_err(|e| Error::Config(format!("handler for {event_type:?}: {e}")))?;
        }
        let dead_letter = dead_letter::Destination::new(&self.dead_letter, &self.options)?;
        let guard = ProcessedEvents::new(self.options.consumer_name.clone());
        Ok(InboxConsumer {
            topics: self.topics,
            partition_buffer: self.partition_buffer,
            settings: Arc::new(Settings {
                pool: self.pool,
                guard,
                handlers: self.handlers,
                unknown: self.unknown,
                dead_letter,
                backoff: self.backoff,
                max_attempts: self.max_attempts,
                max_panic_attempts: self.max_panic_attempts,
                max_batch: self.max_batch,
                on_delivery: self.on_delivery,
            }),
            options: self.options,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BoxError;

    /// Works under any consumer name but `forbidden`.
    struct Picky {
        forbidden: &'static str,
    }

    #[async_trait]
    impl EventHandler for Picky {
        type Payload = serde_json::Value;

        async fn handle(
            &self,
            _tx: &mut PgConnection,
            _event: &EventMeta,
            _payload: serde_json::Value,
        ) -> Result<(), HandlerError> {
            Ok(())
        }

        fn check_consumer(&self, consumer_name: &str) -> Result<(), BoxError> {
            if consumer_name == self.forbidden {
                return Err(format!("not under {consumer_name}").into());
            }
            Ok(())
        }
    }

    fn build(consumer_name: &str) -> Result<InboxConsumer, Error> {
        // Building connects to nothing: a lazy pool to nowhere is enough.
        let pool =
            PgPool::connect_lazy("postgres://nobody@127.0.0.1:1/none").map_err(Error::from)?;
        InboxConsumer::builder(
            ConsumerOptions::new("127.0.0.1:9092", "group", consumer_name),
            pool,
        )
        .topic("events")
        .handler("Thing", Picky { forbidden: "guard" })
        .build()
    }

    #[tokio::test]
    async fn a_handler_can_refuse_the_consumer_name_when_the_consumer_is_built() {
        let error = build("guard").expect_err("the handler refuses this name");
        assert!(
            matches!(&error, Error::Config(m) if m.contains("not under guard")),
            "{error}"
        );
        assert!(build("inbox").is_ok());
    }
}
