//! The vocabulary shared by the coordinator, its storage and the wire format.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use uuid::Uuid;

/// Where a saga instance stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SagaStatus {
    /// A step's action is in flight.
    Running,
    /// A step failed or timed out; compensations of the completed steps are in flight.
    Compensating,
    /// Every step succeeded (terminal).
    Completed,
    /// Every completed step was compensated (terminal).
    Compensated,
}

impl SagaStatus {
    /// The name stored in PostgreSQL (`running`, `compensating`, `completed`, `compensated`).
    pub fn as_str(self) -> &'static str {
        match self {
            SagaStatus::Running => "running",
            SagaStatus::Compensating => "compensating",
            SagaStatus::Completed => "completed",
            SagaStatus::Compensated => "compensated",
        }
    }

    /// `true` for [`Completed`](SagaStatus::Completed) and [`Compensated`](SagaStatus::Compensated).
    pub fn is_terminal(self) -> bool {
        matches!(self, SagaStatus::Completed | SagaStatus::Compensated)
    }
}

impl fmt::Display for SagaStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SagaStatus {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "running" => Ok(SagaStatus::Running),
            "compensating" => Ok(SagaStatus::Compensating),
            "completed" => Ok(SagaStatus::Completed),
            "compensated" => Ok(SagaStatus::Compensated),
            other => Err(format!("unknown saga status {other:?}")),
        }
    }
}

/// Whether a command (and its reply) is a step's action or its compensation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepKind {
    /// The step's forward action.
    Action,
    /// The step's compensation (undo).
    Compensation,
}

impl StepKind {
    /// `action` or `compensation` (the `saga-kind` header value).
    pub fn as_str(self) -> &'static str {
        match self {
            StepKind::Action => "action",
            StepKind::Compensation => "compensation",
        }
    }
}

impl fmt::Display for StepKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for StepKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "action" => Ok(StepKind::Action),
            "compensation" => Ok(StepKind::Compensation),
            other => Err(format!("unknown step kind {other:?}")),
        }
    }
}

/// What a participant reports about a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The command took effect.
    Success,
    /// The command was refused and had no effect (a business failure, e.g. insufficient stock).
    Failure,
}

/// The kind of a recorded transition (one row of a saga's history).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Transition {
    /// The saga was started and its first action sent.
    Started,
    /// A step's action succeeded (the next action was sent, or the saga completed).
    StepSucceeded,
    /// A step's action failed; compensation began.
    StepFailed,
    /// A step's deadline passed before its reply; compensation began.
    StepTimedOut,
    /// A compensation was acknowledged.
    CompensationSucceeded,
    /// A compensation was refused; it will be re-sent after a back-off.
    CompensationFailed,
    /// A compensation was re-sent because its deadline passed unacknowledged.
    CompensationResent,
}

impl Transition {
    /// The name stored in the history table.
    pub fn as_str(self) -> &'static str {
        match self {
            Transition::Started => "started",
            Transition::StepSucceeded => "step_succeeded",
            Transition::StepFailed => "step_failed",
            Transition::StepTimedOut => "step_timed_out",
            Transition::CompensationSucceeded => "compensation_succeeded",
            Transition::CompensationFailed => "compensation_failed",
            Transition::CompensationResent => "compensation_resent",
        }
    }
}

impl fmt::Display for Transition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Transition {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "started" => Transition::Started,
            "step_succeeded" => Transition::StepSucceeded,
            "step_failed" => Transition::StepFailed,
            "step_timed_out" => Transition::StepTimedOut,
            "compensation_succeeded" => Transition::CompensationSucceeded,
            "compensation_failed" => Transition::CompensationFailed,
            "compensation_resent" => Transition::CompensationResent,
            other => return Err(format!("unknown transition {other:?}")),
        })
    }
}

/// A saga instance as stored, with its history (see [`Coordinator::inspect`](crate::Coordinator::inspect)).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SagaInstance {
    /// The saga id (also the Kafka key of every command and reply).
    pub id: Uuid,
    /// The definition's name.
    pub saga_type: String,
    /// Current status.
    pub status: SagaStatus,
    /// The step whose action (Running) or compensation (Compensating) is in flight.
    pub current_step: usize,
    /// The saga data (JSON), including fields merged from replies.
    pub data: serde_json::Value,
    /// Optimistic-concurrency version; +1 per transition.
    pub version: i64,
    /// When the in-flight command times out or is re-sent; `None` once terminal.
    pub step_deadline: Option<DateTime<Utc>>,
    /// How many times the in-flight command has been sent.
    pub attempts: i32,
    /// When the saga started.
    pub created_at: DateTime<Utc>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
    /// Every transition, oldest first.
    pub history: Vec<HistoryEntry>,
}

/// One transition of a saga.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct HistoryEntry {
    /// What happened.
    pub transition: Transition,
    /// The step concerned.
    pub step: usize,
    /// Status before (`None` for [`Transition::Started`]).
    pub from_status: Option<SagaStatus>,
    /// Status after.
    pub to_status: SagaStatus,
    /// The reply event that caused it (`None` for start and timeouts).
    pub caused_by: Option<Uuid>,
    /// The command this transition recorded in the outbox, if any.
    pub emitted_event_id: Option<Uuid>,
    /// The failure reason carried by a failure reply, or the timeout note.
    pub reason: Option<String>,
    /// When it happened (database clock).
    pub at: DateTime<Utc>,
}
