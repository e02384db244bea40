//! [`InMemoryPublisher`]: keeps published messages in memory (unit tests, embedded use).

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use uuid::Uuid;

use super::{earlier_event_failed, Publisher};
use crate::{Error, OutboxRecord};

/// A message as the in-memory "broker" stored it (the wire contract: key, payload, headers).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct PublishedMessage {
    /// Topic.
    pub topic: String,
    /// Message key (the event key).
    pub key: String,
    /// Payload.
    pub payload: Vec<u8>,
    /// Headers: `event-id`, `event-type`, `content-type`, then the user's.
    pub headers: Vec<(String, String)>,
    /// The event id (also in the `event-id` header).
    pub event_id: Uuid,
}

impl PublishedMessage {
    /// The value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

type FailureRule = Arc<dyn Fn(&OutboxRecord) -> Option<Error> + Send + Sync>;

#[derive(Default)]
struct State {
    messages: Vec<PublishedMessage>,
    failure: Option<FailureRule>,
    calls: u64,
}

/// A [`Publisher`] that appends every event to an in-memory log, in publish order.
///
/// Clones share the log. [`InMemoryPublisher::fail_when`] injects failures (for example to
/// exercise parking), which is how the relay's retry paths are tested without a broker.
#[derive(Clone, Default)]
pub struct InMemoryPublisher {
    state: Arc<Mutex<State>>,
}

impl std::fmt::Debug for InMemoryPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.lock();
        f.debug_struct("InMemoryPublisher")
            .field("messages", &state.messages.len())
            .field("failing", &state.failure.is_some())
            .finish()
    }
}

impl InMemoryPublisher {
    /// An empty log.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the log half-written (every update is
        // a single push), so a poisoned lock is still usable.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Every message published so far, in publish order.
    pub fn messages(&self) -> Vec<PublishedMessage> {
        self.lock().messages.clone()
    }

    /// Number of messages published so far.
    pub fn len(&self) -> usize {
        self.lock().messages.len()
    }

    /// `true` when nothing has been published.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of `publish_batch` calls so far.
    pub fn batches(&self) -> u64 {
        self.lock().calls
    }

    /// From now on, events for which `rule` returns an error fail with that error (and are
    /// not stored). Replaces an earlier rule.
    pub fn fail_when(&self, rule: impl Fn(&OutboxRecord) -> Option<Error> + Send + Sync + 'static) {
        self.lock().failure = Some(Arc::new(rule));
    }

    /// Removes the failure rule.
    pub fn stop_failing(&self) {
        self.lock().failure = None;
    }
}

#[async_trait]
impl Publisher for InMemoryPublisher {
    async fn publish_batch(&self, events: &[OutboxRecord]) -> Vec<Result<(), Error>> {
        let mut state = self.lock();
        state.calls += 1;
        let rule = state.failure.clone();
        let mut failed_keys: HashSet<&str> = HashSet::new();
        let mut results = Vec::with_capacity(events.len());
        for event in events {
            if failed_keys.contains(event.key.as_str()) {
                results.push(Err(earlier_event_failed(&event.key)));
                continue;
            }
            if let Some(error) = rule.as_ref().and_then(|rule| rule(event)) {
                failed_keys.insert(&event.key);
                results.push(Err(error));
                continue;
            }
            state.messages.push(PublishedMessage {
                topic: event.topic.clone(),
                key: event.key.clone(),
                payload: event.payload.clone(),
                headers: event.wire_headers(),
                event_id: event.id,
            });
            results.push(Ok(()));
        }
        results
    }
}
