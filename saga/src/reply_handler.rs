//! Drives the coordinator from the consumer runtime: replies arriving on a topic.

use async_trait::async_trait;
use eventful_idempotency::{BatchFailure, BoxError, EventHandler, EventMeta, HandlerError};
use sqlx::PgConnection;

use crate::reply::SagaReply;
use crate::{Coordinator, Error};

/// How many times a reply that lost a version race is re-applied in the same transaction
/// before the runtime is asked to retry it.
const CONFLICT_RETRIES: usize = 5;

/// An [`EventHandler`] that feeds reply events to [`Coordinator::handle_reply`]. Register it
/// for [`REPLY_EVENT_TYPE`](crate::REPLY_EVENT_TYPE) on a consumer of the reply topic:
/// `.handler(eventful_saga::REPLY_EVENT_TYPE, coordinator.reply_handler())`.
///
/// Replies queued in one partition reach it as a run (it applies batches): they are applied
/// together ([`Coordinator::handle_replies_together`]), or one by one when they cannot be.
///
/// The reply's identity is the message's `event-id`. A reply that loses a race for its
/// saga ([`Error::Conflict`]) is re-applied (it then sees the winner's state); malformed
/// replies and unknown saga types are permanent failures (dead-lettered by the runtime).
///
/// The consumer it is registered on must not be named like the coordinator's guard
/// ([`Coordinator::guard_name`]): building such a consumer fails with
/// [`Error::ConsumerIsGuard`].
#[derive(Debug, Clone)]
pub struct ReplyHandler {
    coordinator: Coordinator,
}

impl Coordinator {
    /// The consumer-runtime adapter that applies replies (see [`ReplyHandler`]).
    pub fn reply_handler(&self) -> ReplyHandler {
        ReplyHandler {
            coordinator: self.clone(),
        }
    }
}

#[async_trait]
impl EventHandler for ReplyHandler {
    type Payload = serde_json::Value;

    async fn handle(
        &self,
        tx: &mut PgConnection,
        event: &EventMeta,
        payload: serde_json::Value,
    ) -> Result<(), HandlerError> {
        let reply = parse(event, payload)?;
        self.apply_one(tx, &reply).await
    }

    /// Replies that queue up in a partition are applied together
    /// ([`Coordinator::handle_replies_together`]); when they cannot be, or anything about
    /// that fails, one by one as [`handle`](Self::handle) does, so that a failure is pinned
    /// on its own reply.
    fn applies_batches(&self) -> bool {
        true
    }

    async fn handle_batch(
        &self,
        tx: &mut PgConnection,
        events: Vec<(&EventMeta, serde_json::Value)>,
    ) -> Result<(), BatchFailure> {
        let mut replies = Vec::with_capacity(events.len());
        for (index, (event, payload)) in events.into_iter().enumerate() {
            replies.push(parse(event, payload).map_err(|e| BatchFailure::new(index, e))?);
        }
        match self.coordinator.handle_replies_together(tx, &replies).await {
            Ok(Some(_)) => return Ok(()),
            Ok(None) => {}
            Err(e) => tracing::debug!(error = %e, "replies not applied together; one by one"),
        }
        for (index, reply) in replies.iter().enumerate() {
            self.apply_one(tx, reply)
                .await
                .map_err(|e| BatchFailure::new(index, e))?;
        }
        Ok(())
    }

    fn check_consumer(&self, consumer_name: &str) -> Result<(), BoxError> {
        // The runtime records the event id under its consumer name before calling us; the
        // guard, checking the same id under the same name, would take it for a duplicate.
        if consumer_name == self.coordinator.guard_name() {
            return Err(Error::ConsumerIsGuard(consumer_name.to_owned()).into());
        }
        Ok(())
    }
}

/// The reply an event carries, with the event's id.
fn parse(event: &EventMeta, payload: serde_json::Value) -> Result<SagaReply, HandlerError> {
    let reply: SagaReply = serde_json::from_value(payload)
        .map_err(|e| HandlerError::permanent(Error::MalformedMessage(e.to_string())))?;
    Ok(reply.with_event_id(event.id))
}

impl ReplyHandler {
    /// Applies one reply, re-applying it after a lost version race.
    async fn apply_one(
        &self,
        tx: &mut PgConnection,
        reply: &SagaReply,
    ) -> Result<(), HandlerError> {
        let mut attempt = 0;
        loop {
            // handle_reply works in a savepoint: a lost race rolls back only its own writes,
            // and the next attempt reads the winner's committed state.
            match self.coordinator.handle_reply(tx, reply).await {
                Ok(_) => return Ok(()),
                Err(Error::Conflict { .. }) if attempt < CONFLICT_RETRIES => attempt += 1,
                Err(e) if e.is_retryable() => return Err(HandlerError::transient(e)),
                Err(e) => return Err(HandlerError::permanent(e)),
            }
        }
    }
}
