//! Request coalescing: concurrent reserve / confirm / release / expire calls of one
//! namespace go to Redis as one `batch.lua` invocation.
//!
//! One task per store drains a queue: it takes the first request, then whatever else is
//! already queued (up to the batch limits), and sends that batch as its own task. Up to
//! `batches_in_flight` batches run at once, each aiming at an even share of the calls in
//! flight and queued; while they are in flight the next one accumulates, so batches grow
//! with the load by themselves. Before
//! sending, the task yields to the callers that are ready to run (those a batch just
//! answered), so a closed loop of callers goes as one full batch. A lone call is sent after
//! one yield, as the same single-call script a store without coalescing sends: nothing
//! ever waits on a timer, and a batch of one costs the server no more. A request waits at most for
//! the batches in flight ahead of it, each bounded by [`max batch`](Coalescer::spawn)
//! entries and [`MAX_BATCH_KEYS`] keys, which also bounds the script's run time on the
//! server.
//!
//! A batch that fails as a whole (connection lost, `BUSY`, a restart) fails every request
//! in it with that error; each caller then retries on its own, with its own attempts and
//! backoff, so the queue never stalls behind a retrying batch.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use redis::{Script, ScriptInvocation, Value};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tracing::Instrument;

use super::scripts::Scripts;
use super::{KeyNames, RedisConnection};
use crate::Error;

/// The most keys one batch declares, counted as if each call declared its reservation key
/// and one stock key per item (a batch declares each stock key once, so fewer): bounds the
/// script's run time however many items calls have.
pub(crate) const MAX_BATCH_KEYS: usize = 4096;

/// Requests queued per store before callers wait to enqueue (backpressure).
const QUEUE: usize = 4096;

/// The smallest share of the demand a batch aims at before it is sent (smaller batches
/// cost the server more per call than overlapping them saves).
const MIN_SHARE: usize = 32;

/// The most times the batch task steps back for ready callers before sending a batch.
const MAX_YIELDS: usize = 8;

/// One call, as the batch script takes it.
#[derive(Debug)]
pub(crate) struct Entry {
    /// `reserve`, `confirm`, `release` or `expire`.
    pub(crate) op: &'static str,
    pub(crate) id: String,
    /// Time to live (reserve only; 0 otherwise).
    pub(crate) ttl_ms: u64,
    /// The canonical items JSON (for a settlement: as the client read it).
    pub(crate) items_json: String,
    /// The reservation key, then one stock key per item.
    pub(crate) keys: Vec<String>,
    /// The quantities (reserve only).
    pub(crate) qtys: Vec<u64>,
}

impl Entry {
    /// This call as its own `reserve.lua` / `settle.lua` invocation: what a store sends
    /// with coalescing off, and for a batch of one (the batch script would only add its
    /// per-batch work to a lone call).
    pub(crate) fn single<'s>(
        &self,
        reserve: &'s Script,
        settle: &'s Script,
        keys: &KeyNames,
        retention_ms: u64,
    ) -> Result<ScriptInvocation<'s>, Error> {
        let (reservation_key, stock_keys) = self
            .keys
            .split_first()
            .ok_or_else(|| Error::Protocol("a call without keys".to_owned()))?;
        let reserving = self.op == "reserve";
        let mut inv = if reserving { reserve } else { settle }.key(reservation_key);
        inv.key(&keys.expiries_key).key(&keys.holds_key);
        for key in stock_keys {
            inv.key(key);
        }
        inv.arg(&self.id);
        if reserving {
            inv.arg(self.ttl_ms);
        } else {
            inv.arg(self.op);
        }
        inv.arg(retention_ms)
            .arg(&keys.stock_prefix)
            .arg(&self.items_json);
        for qty in &self.qtys {
            inv.arg(*qty);
        }
        Ok(inv)
    }
}

struct Request {
    entry: Arc<Entry>,
    reply: oneshot::Sender<Result<Value, Error>>,
}

/// What the batch task needs to send a batch.
pub(crate) struct Context {
    pub(crate) conns: Arc<[RedisConnection]>,
    pub(crate) script: Script,
    pub(crate) reserve: Script,
    pub(crate) settle: Script,
    pub(crate) keys: KeyNames,
    pub(crate) retention_ms: u64,
    instruments: super::Instruments,
    next: AtomicUsize,
}

impl Context {
    pub(crate) fn new(
        conns: Arc<[RedisConnection]>,
        scripts: &Scripts,
        keys: KeyNames,
        retention_ms: u64,
        instruments: super::Instruments,
    ) -> Self {
        Self {
            instruments,
            conns,
            script: scripts.batch.clone(),
            reserve: scripts.reserve.clone(),
            settle: scripts.settle.clone(),
            keys,
            retention_ms,
            next: AtomicUsize::new(0),
        }
    }

    fn connection(&self) -> RedisConnection {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        self.conns[i % self.conns.len()].clone()
    }
}

/// The handle of a store's batch task; the task ends when the last handle is dropped.
#[derive(Debug)]
pub(crate) struct Coalescer {
    tx: mpsc::Sender<Request>,
}

impl Coalescer {
    /// Spawns the batch task on the current Tokio runtime.
    pub(crate) fn spawn(context: Context, max_batch: usize, max_in_flight: usize) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(
            rx,
            Arc::new(context),
            max_batch.max(1),
            max_in_flight.max(1),
        ));
        Self { tx }
    }

    /// Queues one call and waits for its own reply; `None` if the batch task is gone
    /// (its runtime shut down): the caller then sends the call by itself.
    pub(crate) async fn submit(&self, entry: Arc<Entry>) -> Option<Result<Value, Error>> {
        let (reply, answer) = oneshot::channel();
        self.tx.send(Request { entry, reply }).await.ok()?;
        answer.await.ok()
    }
}

async fn run(
    mut rx: mpsc::Receiver<Request>,
    context: Arc<Context>,
    max_batch: usize,
    max_in_flight: usize,
) {
    // One permit per batch in flight. Each batch is its own task, so its reply is
    // handed out while this task gathers the next batch.
    let slots = Arc::new(Semaphore::new(max_in_flight));
    let in_flight_calls = Arc::new(AtomicUsize::new(0));
    // A request taken from the queue that did not fit the previous batch's key limit.
    let mut carry: Option<Request> = None;
    loop {
        let first = match carry.take() {
            Some(request) => request,
            None => match rx.recv().await {
                Some(request) => request,
                None => return,
            },
        };
        // While every slot is busy the queue fills, and the next batch takes it all.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        // Each batch aims at an even share of the calls in flight and queued: a closed
        // loop of K callers then settles into batches of K / max_in_flight that overlap
        // (the server runs one while the client answers the callers of another) instead
        // of one batch of K with each side waiting for the other.
        let demand = in_flight_calls.load(Ordering::Relaxed) + rx.len() + 1;
        let share = demand.div_ceil(max_in_flight).max(MIN_SHARE).min(max_batch);
        let mut keys = first.entry.keys.len();
        let mut batch = vec![first];
        // The callers a finished batch just answered are ready to run and about to
        // send their next calls, but the first of them woke this task before the
        // others ran. So once the queue is drained, step back behind the ready tasks
        // (a yield, no timer) and take what they queued, until a step back brings
        // nothing: a lone call costs one yield, and a burst goes as one batch
        // instead of a small one plus the rest a round trip later.
        let mut yields = 0;
        // Batch size at the last yield (0 before the first, so the first always comes).
        let mut before_yield = 0;
        while batch.len() < share {
            match rx.try_recv() {
                Ok(request) if keys + request.entry.keys.len() > MAX_BATCH_KEYS => {
                    carry = Some(request);
                    break;
                }
                Ok(request) => {
                    keys += request.entry.keys.len();
                    batch.push(request);
                }
                Err(_) if yields < MAX_YIELDS && batch.len() > before_yield => {
                    yields += 1;
                    before_yield = batch.len();
                    tokio::task::yield_now().await;
                }
                Err(_) => break,
            }
        }
        in_flight_calls.fetch_add(batch.len(), Ordering::Relaxed);
        tokio::spawn(send(context.clone(), batch, slot, in_flight_calls.clone()));
    }
}

/// Sends one batch and hands every caller its own reply, then frees its slot.
async fn send(
    context: Arc<Context>,
    batch: Vec<Request>,
    _slot: OwnedSemaphorePermit,
    in_flight_calls: Arc<AtomicUsize>,
) {
    let calls = batch.len();
    answer(&context, batch).await;
    in_flight_calls.fetch_sub(calls, Ordering::Relaxed);
}

/// Sends one batch and hands every caller its own reply.
async fn answer(context: &Context, mut batch: Vec<Request>) {
    if batch.len() == 1 {
        if let Some(request) = batch.pop() {
            let result = match request.entry.single(
                &context.reserve,
                &context.settle,
                &context.keys,
                context.retention_ms,
            ) {
                Ok(inv) => {
                    let mut conn = context.connection();
                    let invoked = inv.invoke_async::<Value>(&mut conn);
                    context
                        .instruments
                        .timed(request.entry.op, invoked)
                        .await
                        .map_err(Error::from)
                }
                Err(e) => Err(e),
            };
            let _ = request.reply.send(result);
        }
        return;
    }
    let inv = batch_invocation(context, &batch);
    let span = tracing::debug_span!("reservation.batch", size = batch.len());
    let mut conn = context.connection();
    let invoked = inv.invoke_async::<Value>(&mut conn).instrument(span);
    let result = context.instruments.timed("batch", invoked).await;
    match result {
        Ok(Value::Array(replies)) if replies.len() == batch.len() => {
            for (request, reply) in batch.into_iter().zip(replies) {
                let _ = request.reply.send(entry_result(reply));
            }
        }
        Ok(other) => {
            for request in batch {
                let _ = request.reply.send(Err(Error::Protocol(format!(
                    "batch replied {other:?} to {} calls",
                    request.entry.op
                ))));
            }
        }
        Err(e) => {
            tracing::debug!(error = %e, "batch failed; every caller retries on its own");
            for request in batch {
                let _ = request.reply.send(Err(Error::Redis(e.clone())));
            }
        }
    }
}

/// One distinct (op, ttl, items) of a batch, sent once for all its calls.
type Shape<'a> = (&'static str, u64, &'a str);

/// The `batch.lua` invocation of `batch`: the distinct stock keys and shapes once each,
/// then each call as its record key, and the calls' shapes as runs of consecutive calls.
fn batch_invocation<'s>(context: &'s Context, batch: &[Request]) -> ScriptInvocation<'s> {
    // Each distinct stock key with its position (1-based), and the keys in that order.
    let mut stock_keys: HashMap<&str, usize> = HashMap::new();
    let mut stock_order: Vec<&str> = Vec::new();
    let mut shapes: HashMap<Shape<'_>, usize> = HashMap::new();
    let mut shape_entries: Vec<&Entry> = Vec::new();
    // Consecutive calls of one shape: (shape number, calls).
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for request in batch {
        let entry = &*request.entry;
        for key in entry.keys.iter().skip(1) {
            stock_keys.entry(key).or_insert_with(|| {
                stock_order.push(key);
                stock_order.len()
            });
        }
        let next = shape_entries.len() + 1;
        let shape = *shapes
            .entry((entry.op, entry.ttl_ms, &entry.items_json))
            .or_insert_with(|| {
                shape_entries.push(entry);
                next
            });
        match runs.last_mut() {
            Some((last, calls)) if *last == shape => *calls += 1,
            _ => runs.push((shape, 1)),
        }
    }
    let mut inv = context.script.key(&context.keys.expiries_key);
    inv.key(&context.keys.holds_key);
    for key in &stock_order {
        inv.key(*key);
    }
    for request in batch {
        if let Some(record_key) = request.entry.keys.first() {
            inv.key(record_key);
        }
    }
    inv.arg(context.retention_ms)
        .arg(&context.keys.stock_prefix)
        .arg(stock_keys.len())
        .arg(shape_entries.len())
        .arg(batch.len())
        .arg(&context.keys.res_prefix);
    for entry in &shape_entries {
        let items = entry.keys.len().saturating_sub(1);
        inv.arg(entry.op)
            .arg(entry.ttl_ms)
            .arg(&entry.items_json)
            .arg(items);
        for (i, key) in entry.keys.iter().skip(1).enumerate() {
            inv.arg(stock_keys.get(key.as_str()).copied().unwrap_or(0))
                .arg(entry.qtys.get(i).copied().unwrap_or(0));
        }
    }
    inv.arg(runs.len());
    for (shape, calls) in runs {
        inv.arg(shape).arg(calls);
    }
    inv
}

/// `{'error', message}`: a Redis command of this entry failed (the others are unaffected).
fn entry_result(reply: Value) -> Result<Value, Error> {
    if let Value::Array(fields) = &reply {
        if let [Value::BulkString(kind), message] = fields.as_slice() {
            if kind.as_slice() == b"error" {
                let message = match message {
                    Value::BulkString(bytes) => String::from_utf8_lossy(bytes).into_owned(),
                    other => format!("{other:?}"),
                };
                return Err(Error::Protocol(message));
            }
        }
    }
    Ok(reply)
}
