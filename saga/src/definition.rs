//! Saga definitions: ordered steps, each an action command and an optional compensation.

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::machine::StepPlan;
use crate::model::StepKind;
use crate::Error;

/// Default deadline of a step's action: 30 s.
pub const DEFAULT_STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// Default interval at which an unacknowledged compensation is re-sent: 30 s.
pub const DEFAULT_COMPENSATION_TIMEOUT: Duration = Duration::from_secs(30);

type PayloadFn<D> = Arc<dyn Fn(&D) -> Result<serde_json::Value, serde_json::Error> + Send + Sync>;

/// A command a step sends through the outbox: topic, event type and a payload built from
/// the saga data. The Kafka key is always the saga id (one partition per saga, so a
/// step's compensation never overtakes its action when both use the same topic).
pub struct Command<D> {
    topic: String,
    event_type: String,
    payload: PayloadFn<D>,
}

impl<D> Clone for Command<D> {
    fn clone(&self) -> Self {
        Command {
            topic: self.topic.clone(),
            event_type: self.event_type.clone(),
            payload: Arc::clone(&self.payload),
        }
    }
}

impl<D> fmt::Debug for Command<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Command")
            .field("topic", &self.topic)
            .field("event_type", &self.event_type)
            .finish_non_exhaustive()
    }
}

impl<D> Command<D> {
    /// A command on `topic` of type `event_type` whose JSON payload `payload` builds from
    /// the saga data.
    pub fn new<P, F>(topic: impl Into<String>, event_type: impl Into<String>, payload: F) -> Self
    where
        P: Serialize,
        F: Fn(&D) -> P + Send + Sync + 'static,
    {
        Command {
            topic: topic.into(),
            event_type: event_type.into(),
            payload: Arc::new(move |data| serde_json::to_value(payload(data))),
        }
    }

    /// The topic the command is published on.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The command's event type.
    pub fn event_type(&self) -> &str {
        &self.event_type
    }
}

/// One step of a saga.
pub struct Step<D> {
    name: String,
    action: Command<D>,
    compensation: Option<Command<D>>,
    timeout: Duration,
    compensation_timeout: Duration,
}

impl<D> fmt::Debug for Step<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Step")
            .field("name", &self.name)
            .field("action", &self.action)
            .field("compensation", &self.compensation)
            .field("timeout", &self.timeout)
            .field("compensation_timeout", &self.compensation_timeout)
            .finish()
    }
}

impl<D> Step<D> {
    /// A step named `name` whose action is `action`; no compensation, deadline
    /// [`DEFAULT_STEP_TIMEOUT`].
    pub fn new(name: impl Into<String>, action: Command<D>) -> Self {
        Step {
            name: name.into(),
            action,
            compensation: None,
            timeout: DEFAULT_STEP_TIMEOUT,
            compensation_timeout: DEFAULT_COMPENSATION_TIMEOUT,
        }
    }

    /// The command that undoes this step. It is sent (and re-sent every
    /// [`compensation_timeout`](Step::compensation_timeout) until acknowledged) when a
    /// later step fails, or when this step times out. It must be idempotent and treat
    /// "nothing to undo" as success.
    pub fn compensate_with(mut self, compensation: Command<D>) -> Self {
        self.compensation = Some(compensation);
        self
    }

    /// How long the action may go unanswered before the saga compensates (default 30 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// How long a compensation may go unacknowledged before it is re-sent (default 30 s).
    pub fn compensation_timeout(mut self, timeout: Duration) -> Self {
        self.compensation_timeout = timeout;
        self
    }

    /// The step's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// A saga type: a name and its ordered steps, over saga data of type `D` (stored as JSONB).
pub struct SagaDefinition<D> {
    name: String,
    steps: Vec<Step<D>>,
    _data: PhantomData<fn(D)>,
}

impl<D> fmt::Debug for SagaDefinition<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SagaDefinition")
            .field("name", &self.name)
            .field("steps", &self.steps)
            .finish()
    }
}

impl<D> SagaDefinition<D>
where
    D: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    /// An empty definition named `name` (the `saga_type` of its instances).
    pub fn new(name: impl Into<String>) -> Self {
        SagaDefinition {
            name: name.into(),
            steps: Vec::new(),
            _data: PhantomData,
        }
    }

    /// Appends a step.
    pub fn step(mut self, step: Step<D>) -> Self {
        self.steps.push(step);
        self
    }

    /// The definition's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn into_erased(self) -> Result<Arc<dyn ErasedSaga>, Error> {
        if self.name.is_empty() {
            return Err(Error::InvalidDefinition("the saga name is empty".into()));
        }
        if self.steps.is_empty() {
            return Err(Error::InvalidDefinition(format!(
                "saga {:?} has no steps",
                self.name
            )));
        }
        let plan = self
            .steps
            .iter()
            .map(|s| StepPlan {
                name: s.name.clone(),
                has_compensation: s.compensation.is_some(),
                timeout: s.timeout,
                compensation_timeout: s.compensation_timeout,
            })
            .collect();
        Ok(Arc::new(Typed {
            name: self.name,
            steps: self.steps,
            plan,
        }))
    }
}

/// What the coordinator needs from a definition, independent of its data type.
pub(crate) trait ErasedSaga: Send + Sync {
    fn name(&self) -> &str;
    fn plan(&self) -> &[StepPlan];
    /// The command `(topic, event_type, payload)` of `step`'s action or compensation.
    fn command(
        &self,
        step: usize,
        kind: StepKind,
        data: &serde_json::Value,
    ) -> Result<(String, String, serde_json::Value), Error>;
}

struct Typed<D> {
    name: String,
    steps: Vec<Step<D>>,
    plan: Vec<StepPlan>,
}

impl<D> ErasedSaga for Typed<D>
where
    D: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    fn name(&self) -> &str {
        &self.name
    }

    fn plan(&self) -> &[StepPlan] {
        &self.plan
    }

    fn command(
        &self,
        step: usize,
        kind: StepKind,
        data: &serde_json::Value,
    ) -> Result<(String, String, serde_json::Value), Error> {
        let s = self.steps.get(step).ok_or_else(|| {
            Error::InvalidDefinition(format!("saga {:?} has no step {step}", self.name))
        })?;
        let command = match kind {
            StepKind::Action => &s.action,
            StepKind::Compensation => s.compensation.as_ref().ok_or_else(|| {
                Error::InvalidDefinition(format!(
                    "step {:?} of saga {:?} has no compensation",
                    s.name, self.name
                ))
            })?,
        };
        let typed: D = serde_json::from_value(data.clone()).map_err(Error::Data)?;
        let payload = (command.payload)(&typed).map_err(Error::Data)?;
        Ok((command.topic.clone(), command.event_type.clone(), payload))
    }
}
