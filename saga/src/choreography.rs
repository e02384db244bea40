//! Choreography: the participant building block each service uses.
//!
//! A participant reacts to one event type. The consumer runtime of `eventful-idempotency`
//! drives it: for each event it opens a transaction, passes the processed-event guard,
//! calls the participant, and commits (then the Kafka offset) — the participant only
//! writes its state on [`Emitter::conn`] and emits events with [`Emitter::emit`], which
//! records them in the outbox **in the same transaction**. No consume/dedupe/commit loop
//! in the service.

use async_trait::async_trait;
use eventful_core::headers::{CAUSATION_ID, TRACEPARENT};
use eventful_idempotency::{EventHandler, EventMeta, HandlerError};
use eventful_outbox::{NewEvent, Outbox};
use serde::de::DeserializeOwned;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::reply::{CommandContext, SagaReply};

/// A service's reaction to one event type, run inside the consumer's transaction.
///
/// ```
/// use eventful_saga::{Emitter, Participant};
/// use eventful_idempotency::HandlerError;
///
/// #[derive(serde::Deserialize)]
/// struct OrderPlaced { order_id: uuid::Uuid, sku: String, qty: i32 }
///
/// struct ReserveStock;
///
/// #[async_trait::async_trait]
/// impl Participant for ReserveStock {
///     type Event = OrderPlaced;
///
///     async fn handle(&self, cx: &mut Emitter<'_>, e: OrderPlaced) -> Result<(), HandlerError> {
///         sqlx::query("UPDATE stock SET qty = qty - $2 WHERE sku = $1")
///             .bind(&e.sku).bind(e.qty)
///             .execute(cx.conn()).await?;
///         let reserved = eventful_outbox::NewEvent::json(
///             "inventory-events", e.order_id.to_string(), "StockReserved",
///             &serde_json::json!({ "order_id": e.order_id }),
///         ).map_err(HandlerError::permanent)?;
///         cx.emit(reserved).await?;
///         Ok(())
///     }
/// }
/// // Registration (one line on the consumer builder):
/// // .handler("OrderPlaced", eventful_saga::participant(outbox.clone(), ReserveStock))
/// ```
#[async_trait]
pub trait Participant: Send + Sync + 'static {
    /// The event's payload type (JSON).
    type Event: DeserializeOwned + Send;

    /// Applies the event: write state on `cx.conn()`, emit events with `cx.emit(..)`.
    /// Everything commits together with the guard's record, or nothing does.
    /// [`HandlerError::Transient`] retries the event; [`HandlerError::Permanent`]
    /// dead-letters it.
    async fn handle(&self, cx: &mut Emitter<'_>, event: Self::Event) -> Result<(), HandlerError>;
}

/// The participant's handle on the open transaction and the outbox.
pub struct Emitter<'a> {
    conn: &'a mut PgConnection,
    outbox: &'a Outbox,
    meta: &'a EventMeta,
    emitted: Vec<Uuid>,
}

impl std::fmt::Debug for Emitter<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Emitter")
            .field("event", &self.meta.id)
            .field("emitted", &self.emitted)
            .finish_non_exhaustive()
    }
}

impl<'a> Emitter<'a> {
    /// An emitter over `conn` (an open transaction) for the event `meta`. The adapter
    /// builds it; tests and custom runtimes may too.
    pub fn new(conn: &'a mut PgConnection, outbox: &'a Outbox, meta: &'a EventMeta) -> Self {
        Emitter {
            conn,
            outbox,
            meta,
            emitted: Vec::new(),
        }
    }

    /// The open transaction: write the service's state here.
    pub fn conn(&mut self) -> &mut PgConnection {
        self.conn
    }

    /// The handled event's metadata (id, type, key, headers, topic/partition/offset).
    pub fn event(&self) -> &EventMeta {
        self.meta
    }

    /// Records `event` in the outbox in this transaction, with a `causation-id` header (the
    /// handled event's id) and a `traceparent` unless it has one: with the `opentelemetry`
    /// feature, the current span's (the handler's, so the next hop is its child), else the
    /// handled event's, if any. Returns its id.
    pub async fn emit(&mut self, event: NewEvent) -> Result<Uuid, HandlerError> {
        let mut event = event.header(CAUSATION_ID, self.meta.id.to_string());
        if !event.has_header(TRACEPARENT) {
            #[cfg(feature = "opentelemetry")]
            let current = eventful_core::otel::current_traceparent();
            #[cfg(not(feature = "opentelemetry"))]
            let current: Option<String> = None;
            if let Some(tp) = current.as_deref().or(self.meta.header(TRACEPARENT)) {
                event = event.header(TRACEPARENT, tp);
            }
        }
        let id = self
            .outbox
            .record(self.conn, event)
            .await
            .map_err(outbox_error)?;
        self.emitted.push(id);
        Ok(id)
    }

    /// The saga correlation of the handled event, when it is a saga command.
    pub fn command(&self) -> Result<CommandContext, HandlerError> {
        CommandContext::from_headers(
            self.meta
                .headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str())),
        )
        .map_err(HandlerError::permanent)
    }

    /// Emits `reply` to the saga command being handled (on its `saga-reply-to` topic).
    pub async fn reply(&mut self, reply: &SagaReply) -> Result<Uuid, HandlerError> {
        let cx = self.command()?;
        let event = cx.reply_event(reply).map_err(HandlerError::permanent)?;
        self.emit(event).await
    }

    /// Ids of the events emitted so far in this transaction.
    pub fn emitted(&self) -> &[Uuid] {
        &self.emitted
    }
}

fn outbox_error(e: eventful_outbox::Error) -> HandlerError {
    if e.is_retryable() {
        HandlerError::transient(e)
    } else {
        HandlerError::permanent(e)
    }
}

/// Adapts a [`Participant`] to `eventful-idempotency`'s [`EventHandler`], so the consumer
/// runtime drives it. Build it with [`participant`].
pub struct ParticipantHandler<P> {
    outbox: Outbox,
    participant: P,
}

impl<P> std::fmt::Debug for ParticipantHandler<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParticipantHandler")
            .field("outbox", &self.outbox)
            .finish_non_exhaustive()
    }
}

/// Wraps `participant` for registration on the consumer runtime:
/// `.handler("OrderPlaced", eventful_saga::participant(outbox.clone(), ReserveStock))`.
pub fn participant<P: Participant>(outbox: Outbox, participant: P) -> ParticipantHandler<P> {
    ParticipantHandler {
        outbox,
        participant,
    }
}

#[async_trait]
impl<P: Participant> EventHandler for ParticipantHandler<P> {
    type Payload = P::Event;

    async fn handle(
        &self,
        tx: &mut PgConnection,
        event: &EventMeta,
        payload: Self::Payload,
    ) -> Result<(), HandlerError> {
        let span = tracing::debug_span!(
            "saga.participant",
            event_id = %event.id,
            event_type = %event.event_type,
            saga_id = event.header(crate::headers::SAGA_ID).unwrap_or(""),
        );
        let mut cx = Emitter::new(tx, &self.outbox, event);
        tracing::Instrument::instrument(self.participant.handle(&mut cx, payload), span).await
    }
}
