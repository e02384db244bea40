//! The orchestrator: starts sagas, applies replies and deadlines, records commands.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use eventful_core::Backoff;
use eventful_idempotency::{Processed, ProcessedEvents};
use eventful_outbox::{NewEvent, Outbox};
use serde::de::DeserializeOwned;
use serde::Serialize;
use sqlx::{Acquire as _, PgConnection, PgPool};
use tracing::Instrument as _;
use uuid::Uuid;

use crate::definition::{ErasedSaga, SagaDefinition};
use crate::machine::{self, Change, Decision, IgnoreReason, Input};
use crate::model::{SagaInstance, SagaStatus};
use crate::reply::{headers, SagaReply};
use crate::store::{self, Loaded, NewHistory};
use crate::Error;

/// Default reply topic: `eventful-saga-replies`.
pub const DEFAULT_REPLY_TOPIC: &str = "eventful-saga-replies";
/// Default consumer name of the coordinator's duplicate-reply guard: `eventful-saga`.
pub const DEFAULT_GUARD_NAME: &str = "eventful-saga";

/// What [`Coordinator::handle_reply`] did with a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReplyOutcome {
    /// The reply advanced the saga.
    Applied {
        /// The status after the transition.
        status: SagaStatus,
        /// The step now in flight (or the last one, once terminal).
        step: usize,
    },
    /// The reply changed nothing.
    Ignored(IgnoreReason),
}

/// The saga orchestrator (cheap to clone).
///
/// All state lives in PostgreSQL: any number of coordinators with the same definitions may
/// run against one database, and a restarted one resumes every in-flight saga.
#[derive(Clone)]
pub struct Coordinator {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) pool: PgPool,
    outbox: Outbox,
    guard: ProcessedEvents,
    reply_topic: String,
    sagas: HashMap<String, Arc<dyn ErasedSaga>>,
    pub(crate) types: Vec<String>,
    retry_backoff: Backoff,
    pub(crate) scan_interval: Duration,
    pub(crate) scan_batch: usize,
    pub(crate) error_backoff: Duration,
}

impl std::fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coordinator")
            .field("reply_topic", &self.inner.reply_topic)
            .field("sagas", &self.inner.types)
            .finish_non_exhaustive()
    }
}

/// Configures a [`Coordinator`].
pub struct CoordinatorBuilder {
    pool: PgPool,
    outbox: Outbox,
    guard_name: String,
    reply_topic: String,
    sagas: Vec<Result<Arc<dyn ErasedSaga>, Error>>,
    retry_backoff: Backoff,
    scan_interval: Duration,
    scan_batch: usize,
}

impl std::fmt::Debug for CoordinatorBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoordinatorBuilder")
            .field("reply_topic", &self.reply_topic)
            .finish_non_exhaustive()
    }
}

impl CoordinatorBuilder {
    /// Registers a saga definition (its name is the `saga_type` passed to
    /// [`Coordinator::start`]).
    pub fn saga<D>(mut self, definition: SagaDefinition<D>) -> Self
    where
        D: Serialize + DeserializeOwned + Send + Sync + 'static,
    {
        self.sagas.push(definition.into_erased());
        self
    }

    /// The topic participants reply on (sent in the `saga-reply-to` header of every
    /// command). Default [`DEFAULT_REPLY_TOPIC`].
    pub fn reply_topic(mut self, topic: impl Into<String>) -> Self {
        self.reply_topic = topic.into();
        self
    }

    /// The consumer name under which reply event ids are recorded by the duplicate guard
    /// (`eventful_processed_events`). Default [`DEFAULT_GUARD_NAME`]. It must differ from
    /// the reply consumer's name: a consumer so named is refused when built
    /// ([`Error::ConsumerIsGuard`]).
    pub fn guard_name(mut self, name: impl Into<String>) -> Self {
        self.guard_name = name.into();
        self
    }

    /// Delays before a refused compensation is re-sent: from `base`, doubled per attempt,
    /// capped by `max` and by the step's compensation timeout, with equal jitter
    /// ([`Backoff`]). Default 1 s, capped by the compensation timeout only.
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.retry_backoff = backoff;
        self
    }

    /// How often the deadline scanner looks for due sagas when idle. Default 1 s.
    pub fn scan_interval(mut self, interval: Duration) -> Self {
        self.scan_interval = interval;
        self
    }

    /// How many due sagas the deadline scanner handles per transaction. Default 100.
    pub fn scan_batch_size(mut self, batch: usize) -> Self {
        self.scan_batch = batch.max(1);
        self
    }

    /// Builds the coordinator; fails on an invalid or duplicate definition.
    pub fn build(self) -> Result<Coordinator, Error> {
        let mut sagas = HashMap::new();
        let mut types = Vec::new();
        for saga in self.sagas {
            let saga = saga?;
            let name = saga.name().to_owned();
            if sagas.insert(name.clone(), saga).is_some() {
                return Err(Error::InvalidDefinition(format!(
                    "saga {name:?} registered twice"
                )));
            }
            types.push(name);
        }
        if self.guard_name.is_empty() || self.reply_topic.is_empty() {
            return Err(Error::InvalidDefinition(
                "guard name and reply topic must not be empty".into(),
            ));
        }
        Ok(Coordinator {
            inner: Arc::new(Inner {
                pool: self.pool,
                outbox: self.outbox,
                guard: ProcessedEvents::new(self.guard_name),
                reply_topic: self.reply_topic,
                sagas,
                types,
                retry_backoff: self.retry_backoff,
                scan_interval: self.scan_interval,
                scan_batch: self.scan_batch,
                error_backoff: Duration::from_secs(60),
            }),
        })
    }
}

impl Coordinator {
    /// A builder: `pool` serves [`inspect`](Coordinator::inspect), [`migrate`](Coordinator::migrate)
    /// and the deadline scanner; commands are recorded through `outbox`.
    pub fn builder(pool: PgPool, outbox: Outbox) -> CoordinatorBuilder {
        CoordinatorBuilder {
            pool,
            outbox,
            guard_name: DEFAULT_GUARD_NAME.to_owned(),
            reply_topic: DEFAULT_REPLY_TOPIC.to_owned(),
            sagas: Vec::new(),
            retry_backoff: Backoff::new(Duration::from_secs(1), Duration::MAX),
            scan_interval: Duration::from_secs(1),
            scan_batch: 100,
        }
    }

    /// Creates the saga tables, the outbox table and the duplicate guard's table if needed.
    pub async fn migrate(&self) -> Result<(), Error> {
        crate::migrate(&self.inner.pool).await?;
        self.inner.outbox.migrate(&self.inner.pool).await?;
        self.inner.guard.migrate(&self.inner.pool).await?;
        Ok(())
    }

    /// The reply topic named in every command.
    pub fn reply_topic(&self) -> &str {
        &self.inner.reply_topic
    }

    /// The consumer name the duplicate-reply guard records reply event ids under (see
    /// [`CoordinatorBuilder::guard_name`]); the reply consumer must be named differently.
    pub fn guard_name(&self) -> &str {
        self.inner.guard.consumer()
    }

    /// The pool given to the builder.
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// Starts a saga of type `saga_type` with a new id (UUIDv7) and returns the id.
    ///
    /// The instance, its first history row and the first step's action are written on
    /// `conn` (inside a savepoint when `conn` is in a transaction): they commit with the
    /// caller's transaction, or not at all.
    pub async fn start<D: Serialize>(
        &self,
        conn: &mut PgConnection,
        saga_type: &str,
        data: &D,
    ) -> Result<Uuid, Error> {
        let id = Uuid::now_v7();
        self.start_with_id(conn, saga_type, id, data).await?;
        Ok(id)
    }

    /// Like [`start`](Coordinator::start) with a caller-chosen id (e.g. the order id), so a
    /// redelivered trigger cannot start the saga twice: an existing id gives
    /// [`Error::AlreadyExists`] and writes nothing.
    #[tracing::instrument(name = "saga.start", skip_all, fields(saga_id = %saga_id, saga_type = saga_type))]
    pub async fn start_with_id<D: Serialize>(
        &self,
        conn: &mut PgConnection,
        saga_type: &str,
        saga_id: Uuid,
        data: &D,
    ) -> Result<(), Error> {
        let saga = self.saga(saga_type)?;
        let data = serde_json::to_value(data).map_err(Error::Data)?;
        let change = machine::start(saga.plan());
        let command = self.command(saga.as_ref(), saga_id, &change, &data)?;
        let history = NewHistory {
            saga_id,
            transition: change.transition,
            step: 0,
            from: None,
            to: change.to.status,
            caused_by: None,
            emitted: command.as_ref().map(NewEvent::id),
            reason: None,
        };
        let mut tx = conn.begin().await?;
        if !store::insert(
            &mut tx,
            saga_type,
            change.to,
            &data,
            change.deadline,
            history,
        )
        .await?
        {
            return Err(Error::AlreadyExists(saga_id));
        }
        self.record(&mut tx, command).await?;
        tx.commit().await?;
        crate::metrics::transition(saga_type, change.transition);
        tracing::debug!("saga started");
        Ok(())
    }

    /// Applies a participant's reply on `conn` (the caller's transaction).
    ///
    /// In one savepoint: records the reply's event id with the duplicate guard, reads the
    /// instance, decides, then `UPDATE ... WHERE id = $1 AND version = $2`, appends the
    /// history row and records the next command (next action or a compensation) in the
    /// outbox. Duplicates (same event id), replies for a step or kind that is not in flight,
    /// replies after the step's deadline and replies to finished sagas return
    /// [`ReplyOutcome::Ignored`] and change nothing but the guard's record.
    ///
    /// [`Error::Conflict`] means another transaction advanced the saga first: roll back
    /// and handle the reply again (it will then be ignored or applied to the new state).
    #[tracing::instrument(
        name = "saga.reply",
        skip_all,
        fields(saga_id = %reply.saga_id, step = reply.step, kind = %reply.kind, outcome = ?reply.outcome, event_id = %reply.event_id)
    )]
    pub async fn handle_reply(
        &self,
        conn: &mut PgConnection,
        reply: &SagaReply,
    ) -> Result<ReplyOutcome, Error> {
        let mut tx = conn.begin().await?;
        if self
            .inner
            .guard
            .check_and_record(&mut tx, reply.event_id)
            .await?
            == Processed::Duplicate
        {
            tracing::debug!("duplicate reply ignored");
            tx.commit().await?;
            return Ok(ReplyOutcome::Ignored(IgnoreReason::Duplicate));
        }
        let Some(row) = store::load(&mut tx, reply.saga_id).await? else {
            tracing::warn!("reply for an unknown saga ignored");
            tx.commit().await?;
            return Ok(ReplyOutcome::Ignored(IgnoreReason::UnknownSaga));
        };
        let saga = self.saga(&row.saga_type)?;
        match self.decide_reply(saga.as_ref(), &row, reply) {
            Decision::Ignore(reason) => {
                tracing::debug!(?reason, status = %row.state.status, current = row.state.step, "reply ignored");
                tx.commit().await?;
                Ok(ReplyOutcome::Ignored(reason))
            }
            Decision::Apply(change) => {
                let merged = merged_data(&row, reply);
                let to = change.to;
                let transition = change.transition;
                self.apply(
                    &mut tx,
                    saga.as_ref(),
                    &row,
                    change,
                    merged,
                    Some(reply.event_id),
                    reply.reason.as_deref(),
                )
                .await?;
                tx.commit().await?;
                crate::metrics::transition(&row.saga_type, transition);
                tracing::debug!(status = %to.status, step = to.step, "reply applied");
                Ok(ReplyOutcome::Applied {
                    status: to.status,
                    step: to.step,
                })
            }
        }
    }

    /// Applies several replies in order on `conn`, as [`handle_reply`](Self::handle_reply)
    /// would one after the other, with a fixed number of statements: in one savepoint, one
    /// guard insert for all their event ids, one read of their instances, one versioned
    /// `UPDATE` with the history rows, one outbox insert of the next commands. Returns one
    /// outcome per reply.
    ///
    /// Replies it cannot apply together — two for the same saga, or an instance that moved
    /// since it was read ([`Error::Conflict`] on the one-by-one path) — are not applied by
    /// it: it writes nothing and returns `Ok(None)`, and the caller applies them one by one.
    #[tracing::instrument(name = "saga.replies", skip_all, fields(replies = replies.len()))]
    pub async fn handle_replies_together(
        &self,
        conn: &mut PgConnection,
        replies: &[SagaReply],
    ) -> Result<Option<Vec<ReplyOutcome>>, Error> {
        let mut sagas: Vec<Uuid> = replies.iter().map(|r| r.saga_id).collect();
        sagas.sort_unstable();
        sagas.dedup();
        if sagas.len() < replies.len() {
            return Ok(None);
        }
        let mut tx = conn.begin().await?;
        let ids: Vec<Uuid> = replies.iter().map(|r| r.event_id).collect();
        let first: std::collections::HashSet<Uuid> = self
            .inner
            .guard
            .check_and_record_many(&mut tx, &ids)
            .await?
            .into_iter()
            .collect();
        let fresh: Vec<Uuid> = replies
            .iter()
            .filter(|r| first.contains(&r.event_id))
            .map(|r| r.saga_id)
            .collect();
        let rows: HashMap<Uuid, Loaded> = store::load_many(&mut tx, &fresh)
            .await?
            .into_iter()
            .map(|row| (row.id, row))
            .collect();
        let mut outcomes = Vec::with_capacity(replies.len());
        let mut moves = Vec::new();
        let mut commands = Vec::new();
        let mut applied = Vec::new();
        for reply in replies {
            if !first.contains(&reply.event_id) {
                outcomes.push(ReplyOutcome::Ignored(IgnoreReason::Duplicate));
                continue;
            }
            let Some(row) = rows.get(&reply.saga_id) else {
                tracing::warn!(saga_id = %reply.saga_id, "reply for an unknown saga ignored");
                outcomes.push(ReplyOutcome::Ignored(IgnoreReason::UnknownSaga));
                continue;
            };
            let saga = self.saga(&row.saga_type)?;
            let change = match self.decide_reply(saga.as_ref(), row, reply) {
                Decision::Ignore(reason) => {
                    outcomes.push(ReplyOutcome::Ignored(reason));
                    continue;
                }
                Decision::Apply(change) => change,
            };
            let merged = merged_data(row, reply);
            let (command, history) = self.prepare(
                saga.as_ref(),
                row,
                &change,
                merged.as_ref(),
                Some(reply.event_id),
                reply.reason.as_deref(),
            )?;
            outcomes.push(ReplyOutcome::Applied {
                status: change.to.status,
                step: change.to.step,
            });
            applied.push((row.saga_type.as_str(), change.transition));
            commands.extend(command);
            moves.push(store::Move {
                expected_version: row.version,
                to: change.to,
                data: merged,
                deadline: change.deadline,
                history,
            });
        }
        if !moves.is_empty() && store::transition_many(&mut tx, &moves).await? < moves.len() {
            // Someone else moved one of them: dropping `tx` rolls the savepoint back.
            return Ok(None);
        }
        self.inner.outbox.record_all(&mut tx, commands).await?;
        tx.commit().await?;
        for (saga_type, transition) in applied {
            crate::metrics::transition(saga_type, transition);
        }
        Ok(Some(outcomes))
    }

    /// The decision for `reply` on the instance as read.
    fn decide_reply(&self, saga: &dyn ErasedSaga, row: &Loaded, reply: &SagaReply) -> Decision {
        let input = Input::Reply {
            step: reply.step,
            kind: reply.kind,
            outcome: reply.outcome,
            expired: row.expired,
        };
        machine::decide(saga.plan(), row.state, input, self.inner.retry_backoff)
    }

    /// The saga's state and full history.
    pub async fn inspect(&self, saga_id: Uuid) -> Result<SagaInstance, Error> {
        store::inspect(&self.inner.pool, saga_id)
            .await?
            .ok_or(Error::NotFound(saga_id))
    }

    /// Handles one batch of due deadlines (what the scanner task does each tick) and
    /// returns how many sagas it handled. Timed-out actions start compensation;
    /// unacknowledged (or refused) compensations are re-sent.
    ///
    /// Rows are locked with `FOR UPDATE SKIP LOCKED`, so several coordinators can scan at
    /// once; a row that cannot be processed (e.g. data that no longer fits the definition)
    /// is logged and postponed by a minute instead of blocking the batch.
    #[tracing::instrument(name = "saga.deadlines", skip_all)]
    pub async fn expire_due(&self) -> Result<usize, Error> {
        let mut tx = self.inner.pool.begin().await?;
        let due = store::lock_due(
            &mut tx,
            &self.inner.types,
            i64::try_from(self.inner.scan_batch).unwrap_or(i64::MAX),
        )
        .await?;
        let mut applied = Vec::new();
        for row in &due {
            let mut sp = tx.begin().await?;
            match self.expire_one(&mut sp, row).await {
                Ok(transition) => {
                    sp.commit().await?;
                    applied.extend(transition.map(|t| (row.saga_type.as_str(), t)));
                }
                Err(e) if e.is_retryable() => return Err(e),
                Err(e) => {
                    sp.rollback().await?;
                    tracing::error!(saga_id = %row.id, error = %e, "cannot handle deadline; postponed");
                    store::postpone(&mut tx, row.id, self.inner.error_backoff).await?;
                }
            }
        }
        tx.commit().await?;
        for (saga_type, transition) in applied {
            crate::metrics::transition(saga_type, transition);
        }
        Ok(due.len())
    }

    /// Sets the running / compensating gauges from a count in PostgreSQL.
    #[cfg(feature = "metrics")]
    pub(crate) async fn refresh_in_flight_gauges(&self) -> Result<(), Error> {
        let counts = store::count_in_flight(&self.inner.pool, &self.inner.types).await?;
        crate::metrics::in_flight(&self.inner.types, &counts);
        Ok(())
    }

    /// Applies a due deadline; the transition made, if any.
    async fn expire_one(
        &self,
        conn: &mut PgConnection,
        row: &Loaded,
    ) -> Result<Option<crate::Transition>, Error> {
        let span = tracing::info_span!(
            "saga.deadline",
            saga_id = %row.id,
            step = row.state.step,
            status = %row.state.status
        );
        async {
            let saga = self.saga(&row.saga_type)?;
            let decision = machine::decide(
                saga.plan(),
                row.state,
                Input::Deadline,
                self.inner.retry_backoff,
            );
            let Decision::Apply(change) = decision else {
                return Ok(None);
            };
            let transition = change.transition;
            tracing::info!(transition = %change.transition, "deadline passed");
            let reason = (change.transition == crate::Transition::StepTimedOut)
                .then_some("step deadline passed");
            self.apply(conn, saga.as_ref(), row, change, None, None, reason)
                .await?;
            Ok(Some(transition))
        }
        .instrument(span)
        .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn apply(
        &self,
        conn: &mut PgConnection,
        saga: &dyn ErasedSaga,
        row: &Loaded,
        change: Change,
        merged: Option<serde_json::Value>,
        caused_by: Option<Uuid>,
        reason: Option<&str>,
    ) -> Result<(), Error> {
        let (command, history) =
            self.prepare(saga, row, &change, merged.as_ref(), caused_by, reason)?;
        let only = store::Move {
            expected_version: row.version,
            to: change.to,
            data: merged,
            deadline: change.deadline,
            history,
        };
        if store::transition_many(conn, std::slice::from_ref(&only)).await? != 1 {
            return Err(Error::Conflict {
                saga_id: row.id,
                expected: row.version,
            });
        }
        self.record(conn, command).await?;
        Ok(())
    }

    /// The command a change sends (if any) and its history row.
    fn prepare<'a>(
        &self,
        saga: &dyn ErasedSaga,
        row: &Loaded,
        change: &Change,
        merged: Option<&serde_json::Value>,
        caused_by: Option<Uuid>,
        reason: Option<&'a str>,
    ) -> Result<(Option<NewEvent>, NewHistory<'a>), Error> {
        let data = merged.unwrap_or(&row.data);
        let command = self.command(saga, row.id, change, data)?;
        // The event id is chosen when the event is built: the history row can name it
        // before the outbox records it.
        let history = NewHistory {
            saga_id: row.id,
            transition: change.transition,
            step: change.send.map_or(row.state.step, |(s, _)| s),
            from: Some(row.state.status),
            to: change.to.status,
            caused_by,
            emitted: command.as_ref().map(NewEvent::id),
            reason,
        };
        Ok((command, history))
    }

    async fn record(
        &self,
        conn: &mut PgConnection,
        command: Option<NewEvent>,
    ) -> Result<Option<Uuid>, Error> {
        match command {
            Some(event) => Ok(Some(self.inner.outbox.record(conn, event).await?)),
            None => Ok(None),
        }
    }

    /// Builds the outbox event for the change's command, if any.
    fn command(
        &self,
        saga: &dyn ErasedSaga,
        saga_id: Uuid,
        change: &Change,
        data: &serde_json::Value,
    ) -> Result<Option<NewEvent>, Error> {
        let Some((step, kind)) = change.send else {
            return Ok(None);
        };
        let (topic, event_type, payload) = saga.command(step, kind, data)?;
        let step_name = saga.plan().get(step).map_or("", |s| s.name.as_str());
        let event = NewEvent::json(topic, saga_id.to_string(), event_type, &payload)?
            .header(headers::SAGA_ID, saga_id.to_string())
            .header(headers::SAGA_TYPE, saga.name())
            .header(headers::STEP, step.to_string())
            .header(headers::STEP_NAME, step_name)
            .header(headers::KIND, kind.as_str())
            .header(headers::REPLY_TO, self.inner.reply_topic.as_str())
            .header(headers::ATTEMPT, change.to.attempts.to_string());
        Ok(Some(event))
    }

    fn saga(&self, saga_type: &str) -> Result<Arc<dyn ErasedSaga>, Error> {
        self.inner
            .sagas
            .get(saga_type)
            .cloned()
            .ok_or_else(|| Error::UnknownSagaType(saga_type.to_owned()))
    }

    pub(crate) fn inner(&self) -> &Inner {
        &self.inner
    }
}

/// The instance's data after a successful reply that carries data (`None`: unchanged).
fn merged_data(row: &Loaded, reply: &SagaReply) -> Option<serde_json::Value> {
    match (&reply.data, reply.outcome) {
        (Some(extra), crate::Outcome::Success) => Some(merge(&row.data, extra)),
        _ => None,
    }
}

/// Shallow merge of `extra`'s fields into `data` (both JSON objects; otherwise `data`).
fn merge(data: &serde_json::Value, extra: &serde_json::Value) -> serde_json::Value {
    match (data, extra) {
        (serde_json::Value::Object(base), serde_json::Value::Object(add)) => {
            let mut out = base.clone();
            for (k, v) in add {
                out.insert(k.clone(), v.clone());
            }
            serde_json::Value::Object(out)
        }
        _ => data.clone(),
    }
}
