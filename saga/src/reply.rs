//! The wire format between the coordinator and participants.
//!
//! A **command** is an ordinary outbox event (key = saga id) whose headers carry the
//! correlation ([`headers`]). A participant answers with a **reply** event on the topic
//! named by the `saga-reply-to` header: key = saga id, event type [`REPLY_EVENT_TYPE`],
//! JSON payload `{"saga_id", "step", "step_name", "kind", "outcome", "reason", "data"}`.
//! The reply's identity (used to drop duplicates) is its `event-id` header.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use eventful_outbox::NewEvent;

use crate::model::{Outcome, StepKind};
use crate::Error;

/// Event type of every reply.
pub const REPLY_EVENT_TYPE: &str = "eventful.saga.reply";

/// Header names the coordinator puts on every command.
pub mod headers {
    /// The saga id (UUID).
    pub const SAGA_ID: &str = "saga-id";
    /// The saga type (definition name).
    pub const SAGA_TYPE: &str = "saga-type";
    /// The step index (0-based).
    pub const STEP: &str = "saga-step";
    /// The step name.
    pub const STEP_NAME: &str = "saga-step-name";
    /// `action` or `compensation`.
    pub const KIND: &str = "saga-kind";
    /// The topic the participant replies on.
    pub const REPLY_TO: &str = "saga-reply-to";
    /// Which send of this command it is (1 = first; compensations are re-sent).
    pub const ATTEMPT: &str = "saga-attempt";
}

/// The correlation of a saga command, read back from its headers by a participant.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CommandContext {
    /// The saga id.
    pub saga_id: Uuid,
    /// The saga type.
    pub saga_type: String,
    /// The step index.
    pub step: usize,
    /// The step name.
    pub step_name: String,
    /// Action or compensation.
    pub kind: StepKind,
    /// The topic to reply on.
    pub reply_to: String,
    /// Which send of the command this is (1 = first).
    pub attempt: u32,
}

impl CommandContext {
    /// Reads the correlation from a command's headers (`(name, value)` pairs).
    pub fn from_headers<'a, I>(headers: I) -> Result<Self, Error>
    where
        I: IntoIterator<Item = (&'a str, &'a str)>,
    {
        let mut saga_id = None;
        let mut saga_type = None;
        let mut step = None;
        let mut step_name = None;
        let mut kind = None;
        let mut reply_to = None;
        let mut attempt = 1u32;
        for (name, value) in headers {
            match name {
                headers::SAGA_ID => {
                    saga_id = Some(Uuid::parse_str(value).map_err(|e| {
                        Error::MalformedMessage(format!("header saga-id {value:?}: {e}"))
                    })?)
                }
                headers::SAGA_TYPE => saga_type = Some(value.to_owned()),
                headers::STEP => {
                    step = Some(value.parse::<usize>().map_err(|e| {
                        Error::MalformedMessage(format!("header saga-step {value:?}: {e}"))
                    })?)
                }
                headers::STEP_NAME => step_name = Some(value.to_owned()),
                headers::KIND => {
                    kind = Some(value.parse::<StepKind>().map_err(Error::MalformedMessage)?)
                }
                headers::REPLY_TO => reply_to = Some(value.to_owned()),
                headers::ATTEMPT => attempt = value.parse().unwrap_or(1),
                _ => {}
            }
        }
        let missing = |h: &str| Error::MalformedMessage(format!("command lacks header {h}"));
        Ok(CommandContext {
            saga_id: saga_id.ok_or_else(|| missing(headers::SAGA_ID))?,
            saga_type: saga_type.unwrap_or_default(),
            step: step.ok_or_else(|| missing(headers::STEP))?,
            step_name: step_name.unwrap_or_default(),
            kind: kind.ok_or_else(|| missing(headers::KIND))?,
            reply_to: reply_to.ok_or_else(|| missing(headers::REPLY_TO))?,
            attempt,
        })
    }

    /// A success reply to this command.
    pub fn success(&self) -> SagaReply {
        self.reply(Outcome::Success)
    }

    /// A failure reply to this command (the command had no effect).
    pub fn failure(&self, reason: impl Into<String>) -> SagaReply {
        let mut reply = self.reply(Outcome::Failure);
        reply.reason = Some(reason.into());
        reply
    }

    fn reply(&self, outcome: Outcome) -> SagaReply {
        SagaReply {
            event_id: Uuid::now_v7(),
            saga_id: self.saga_id,
            step: self.step,
            step_name: Some(self.step_name.clone()),
            kind: self.kind,
            outcome,
            reason: None,
            data: None,
        }
    }

    /// The reply as an outbox event on [`reply_to`](CommandContext::reply_to).
    pub fn reply_event(&self, reply: &SagaReply) -> Result<NewEvent, Error> {
        reply.to_event(&self.reply_to)
    }
}

/// A participant's answer to a command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct SagaReply {
    /// Identity of the reply (its `event-id` header on the wire); duplicates are dropped by it.
    #[serde(skip, default = "Uuid::nil")]
    pub event_id: Uuid,
    /// The saga it answers.
    pub saga_id: Uuid,
    /// The step index it answers.
    pub step: usize,
    /// The step name (informational).
    #[serde(default)]
    pub step_name: Option<String>,
    /// Whether it answers the action or the compensation.
    pub kind: StepKind,
    /// Success or failure.
    pub outcome: Outcome,
    /// Why it failed.
    #[serde(default)]
    pub reason: Option<String>,
    /// Fields merged into the saga data on a success (a JSON object), e.g. a payment id
    /// a later compensation needs.
    #[serde(default)]
    pub data: Option<serde_json::Value>,
}

impl SagaReply {
    /// A reply with identity `event_id`.
    pub fn new(
        event_id: Uuid,
        saga_id: Uuid,
        step: usize,
        kind: StepKind,
        outcome: Outcome,
    ) -> Self {
        SagaReply {
            event_id,
            saga_id,
            step,
            step_name: None,
            kind,
            outcome,
            reason: None,
            data: None,
        }
    }

    /// Sets the identity (the `event-id` of the message that carried it).
    pub fn with_event_id(mut self, event_id: Uuid) -> Self {
        self.event_id = event_id;
        self
    }

    /// Attaches fields to merge into the saga data (must serialize to a JSON object).
    pub fn with_data<T: Serialize>(mut self, data: &T) -> Result<Self, Error> {
        let value = serde_json::to_value(data).map_err(Error::Data)?;
        if !value.is_object() {
            return Err(Error::MalformedMessage(
                "reply data must be a JSON object".into(),
            ));
        }
        self.data = Some(value);
        Ok(self)
    }

    /// Decodes a reply payload; `event_id` comes from the message's `event-id` header.
    pub fn from_payload(event_id: Uuid, payload: &[u8]) -> Result<Self, Error> {
        let reply: SagaReply = serde_json::from_slice(payload)
            .map_err(|e| Error::MalformedMessage(format!("saga reply payload: {e}")))?;
        Ok(reply.with_event_id(event_id))
    }

    /// The reply as an outbox event on `topic` (key = saga id). The outbox gives the
    /// event its own id, which becomes the reply's identity on the receiving side.
    pub fn to_event(&self, topic: &str) -> Result<NewEvent, Error> {
        Ok(NewEvent::json(
            topic,
            self.saga_id.to_string(),
            REPLY_EVENT_TYPE,
            self,
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_headers_round_trip_into_a_reply() {
        let id = Uuid::now_v7();
        let id_s = id.to_string();
        let hs = [
            (headers::SAGA_ID, id_s.as_str()),
            (headers::SAGA_TYPE, "order"),
            (headers::STEP, "2"),
            (headers::STEP_NAME, "ship"),
            (headers::KIND, "compensation"),
            (headers::REPLY_TO, "replies"),
            ("traceparent", "x"),
        ];
        let ctx = CommandContext::from_headers(hs).unwrap();
        assert_eq!(ctx.step, 2);
        assert_eq!(ctx.kind, StepKind::Compensation);
        let reply = ctx.failure("no");
        let bytes = serde_json::to_vec(&reply).unwrap();
        let back = SagaReply::from_payload(reply.event_id, &bytes).unwrap();
        assert_eq!(back, reply);
        assert_eq!(back.outcome, Outcome::Failure);
    }

    #[test]
    fn missing_correlation_is_rejected() {
        let err = CommandContext::from_headers([(headers::STEP, "1")]).unwrap_err();
        assert!(matches!(err, Error::MalformedMessage(_)));
    }
}
