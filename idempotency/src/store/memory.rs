//! In-memory twin of the PostgreSQL guard storage, for unit tests.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::Notify;
use uuid::Uuid;

use super::ProcessedStore;
use crate::{Error, Processed};

type Key = (String, Uuid);

#[derive(Debug)]
struct Record {
    at: Instant,
    result: Option<serde_json::Value>,
}

#[derive(Debug, Default)]
struct State {
    committed: HashMap<Key, Record>,
    /// Records written by open transactions: key → owning transaction id.
    pending: HashMap<Key, u64>,
    next_tx: u64,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    /// Woken whenever a transaction ends (commit or rollback).
    ended: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-updated (each update is
        // a single insert/remove), so a poisoned lock is still consistent.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// In-memory [`ProcessedStore`] with the same visibility and blocking rules as PostgreSQL
/// (a concurrent record of the same id waits for the owning transaction to end).
#[derive(Debug, Clone, Default)]
pub struct InMemoryStore {
    shared: Arc<Shared>,
}

impl InMemoryStore {
    /// An empty store.
    pub fn new() -> InMemoryStore {
        InMemoryStore::default()
    }
}

/// A transaction of [`InMemoryStore`]; dropping it rolls back.
#[derive(Debug)]
pub struct InMemoryTx {
    id: u64,
    shared: Arc<Shared>,
    recorded: Vec<(Key, Option<serde_json::Value>)>,
    updates: Vec<(Key, serde_json::Value)>,
    done: bool,
}

impl InMemoryTx {
    fn end(&mut self, commit: bool) {
        if self.done {
            return;
        }
        self.done = true;
        let mut state = self.shared.lock();
        let now = Instant::now();
        for (key, result) in self.recorded.drain(..) {
            state.pending.remove(&key);
            if commit {
                state.committed.insert(key, Record { at: now, result });
            }
        }
        if commit {
            for (key, value) in self.updates.drain(..) {
                if let Some(record) = state.committed.get_mut(&key) {
                    record.result = Some(value);
                }
            }
        }
        drop(state);
        self.shared.ended.notify_waiters();
    }
}

impl Drop for InMemoryTx {
    fn drop(&mut self) {
        self.end(false);
    }
}

#[async_trait]
impl ProcessedStore for InMemoryStore {
    type Tx = InMemoryTx;

    async fn begin(&self) -> Result<InMemoryTx, Error> {
        let mut state = self.shared.lock();
        state.next_tx += 1;
        Ok(InMemoryTx {
            id: state.next_tx,
            shared: self.shared.clone(),
            recorded: Vec::new(),
            updates: Vec::new(),
            done: false,
        })
    }

    async fn commit(&self, mut tx: InMemoryTx) -> Result<(), Error> {
        tx.end(true);
        Ok(())
    }

    async fn rollback(&self, mut tx: InMemoryTx) -> Result<(), Error> {
        tx.end(false);
        Ok(())
    }

    async fn check_and_record(
        &self,
        tx: &mut InMemoryTx,
        consumer: &str,
        event_id: Uuid,
    ) -> Result<Processed, Error> {
        let key = (consumer.to_owned(), event_id);
        loop {
            let ended = self.shared.ended.notified();
            tokio::pin!(ended);
            {
                let mut state = self.shared.lock();
                if state.committed.contains_key(&key) {
                    return Ok(Processed::Duplicate);
                }
                match state.pending.get(&key) {
                    Some(owner) if *owner == tx.id => return Ok(Processed::Duplicate),
                    Some(_) => {
                        // Register before unlocking so the owner's end cannot be missed.
                        ended.as_mut().enable();
                    }
                    None => {
                        state.pending.insert(key.clone(), tx.id);
                        tx.recorded.push((key, None));
                        return Ok(Processed::First);
                    }
                }
            }
            ended.await;
        }
    }

    async fn save_result(
        &self,
        tx: &mut InMemoryTx,
        consumer: &str,
        event_id: Uuid,
        result: serde_json::Value,
    ) -> Result<(), Error> {
        let key = (consumer.to_owned(), event_id);
        if let Some((_, slot)) = tx.recorded.iter_mut().find(|(k, _)| *k == key) {
            *slot = Some(result);
        } else {
            tx.updates.push((key, result));
        }
        Ok(())
    }

    async fn stored_result(
        &self,
        tx: &mut InMemoryTx,
        consumer: &str,
        event_id: Uuid,
    ) -> Result<Option<serde_json::Value>, Error> {
        let key = (consumer.to_owned(), event_id);
        if let Some((_, value)) = tx.updates.iter().rev().find(|(k, _)| *k == key) {
            return Ok(Some(value.clone()));
        }
        if let Some((_, slot)) = tx.recorded.iter().find(|(k, _)| *k == key) {
            return Ok(slot.clone());
        }
        let state = self.shared.lock();
        Ok(state.committed.get(&key).and_then(|r| r.result.clone()))
    }

    async fn purge_older_than(
        &self,
        consumer: &str,
        age: Duration,
        batch_size: usize,
    ) -> Result<u64, Error> {
        let batch = batch_size.max(1);
        let now = Instant::now();
        let mut total = 0u64;
        loop {
            let mut state = self.shared.lock();
            let old: Vec<Key> = state
                .committed
                .iter()
                .filter(|((c, _), r)| c == consumer && now.duration_since(r.at) > age)
                .map(|(k, _)| k.clone())
                .take(batch)
                .collect();
            for key in &old {
                state.committed.remove(key);
            }
            total += old.len() as u64;
            if old.len() < batch {
                return Ok(total);
            }
        }
    }
}
