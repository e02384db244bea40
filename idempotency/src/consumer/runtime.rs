//! The polling loop: routes messages to partition workers, follows rebalances, shuts down.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Weak};
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Headers as _, Message as _};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::options::ConsumerOptions;
use super::partition::{run_partition, OffsetStore, RawMessage};
use super::Settings;
use crate::Error;

type Tp = (String, i32);

/// Forwards revocations from librdkafka's rebalance callback to the loop.
struct InboxContext {
    revoked: std::sync::mpsc::Sender<Vec<Tp>>,
    /// The consumer group, labelling the lag gauges.
    #[cfg(feature = "metrics")]
    group: String,
}

impl ClientContext for InboxContext {
    /// librdkafka's statistics (every `statistics.interval.ms`) carry each partition's lag.
    #[cfg(feature = "metrics")]
    fn stats(&self, statistics: rdkafka::statistics::Statistics) {
        super::metrics::lag(&self.group, &statistics);
    }
}

impl ConsumerContext for InboxContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(list) => {
                let tps: Vec<Tp> = list
                    .elements()
                    .iter()
                    .map(|e| (e.topic().to_owned(), e.partition()))
                    .collect();
                tracing::info!(partitions = ?tps, "partitions revoked");
                // The new owner reports the lag from now on; a stale value here would count
                // the same messages twice in a sum over members.
                #[cfg(feature = "metrics")]
                for (topic, partition) in &tps {
                    super::metrics::set_lag(&self.group, topic, *partition, 0.0);
                }
                // A partition the loop paused (full worker) stays paused through a rebalance
                // in librdkafka: clear that before it may come back to this member.
                if let Err(e) = consumer.resume(list) {
                    tracing::debug!(error = %e, "resuming revoked partitions");
                }
                let _ = self.revoked.send(tps);
            }
            Rebalance::Assign(list) => {
                let tps: Vec<Tp> = list
                    .elements()
                    .iter()
                    .map(|e| (e.topic().to_owned(), e.partition()))
                    .collect();
                tracing::info!(partitions = ?tps, "partitions assigned");
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(list) = rebalance {
            // New workers start unpaused; so must the partitions.
            if let Err(e) = consumer.resume(list) {
                tracing::debug!(error = %e, "resuming assigned partitions");
            }
        }
    }
}

type Client = StreamConsumer<InboxContext>;

/// Workers hold the client weakly: the polling loop owns it alone, so when the loop's
/// future is dropped (an aborted task) the client closes and leaves the group right
/// then, not whenever the last aborted worker gets dropped, so its partitions are handed
/// over at once instead of after the session timeout.
struct KafkaOffsets(Weak<Client>);

impl OffsetStore for KafkaOffsets {
    fn store(&self, topic: &str, partition: i32, next_offset: i64) {
        let Some(client) = self.0.upgrade() else {
            tracing::debug!(
                topic,
                partition,
                next_offset,
                "consumer closed; offset not stored"
            );
            return;
        };
        // Fails with a state error when the partition was revoked meanwhile: the new owner
        // redelivers the message and the guard reports it as a duplicate.
        // `rd_kafka_offsets_store` stores exactly the given offset (the legacy
        // `rd_kafka_offset_store` behind `store_offset` would add one).
        let mut list = TopicPartitionList::new();
        let stored = list
            .add_partition_offset(topic, partition, Offset::Offset(next_offset))
            .and_then(|()| client.store_offsets(&list));
        if let Err(e) = stored {
            tracing::debug!(topic, partition, next_offset, error = %e, "offset not stored");
        }
    }
}

struct Worker {
    sender: mpsc::Sender<RawMessage>,
    stop: CancellationToken,
    done: oneshot::Receiver<()>,
    /// Messages waiting for room in the channel; the partition is paused while non-empty.
    backlog: VecDeque<RawMessage>,
    paused: bool,
}

struct Loop {
    client: Arc<Client>,
    settings: Arc<Settings>,
    buffer: usize,
    workers: HashMap<Tp, Worker>,
    /// Completion signals of workers of revoked partitions, awaited by their successors.
    retired: HashMap<Tp, Vec<oneshot::Receiver<()>>>,
    tasks: JoinSet<()>,
    revoked: std::sync::mpsc::Receiver<Vec<Tp>>,
}

pub(crate) async fn run(
    options: ConsumerOptions,
    topics: Vec<String>,
    buffer: usize,
    settings: Arc<Settings>,
    cancel: CancellationToken,
) -> Result<(), Error> {
    let (revoked_tx, revoked_rx) = std::sync::mpsc::channel();
    let client: Client = options
        .consumer_config()
        .create_with_context(InboxContext {
            revoked: revoked_tx,
            #[cfg(feature = "metrics")]
            group: options.group_id.clone(),
        })?;
    let topic_refs: Vec<&str> = topics.iter().map(String::as_str).collect();
    client.subscribe(&topic_refs)?;
    tracing::info!(consumer = %options.consumer_name, group = %options.group_id, ?topics, "inbox started");
    let mut state = Loop {
        client: Arc::new(client),
        settings,
        buffer,
        workers: HashMap::new(),
        retired: HashMap::new(),
        tasks: JoinSet::new(),
        revoked: revoked_rx,
    };
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        state.follow_revocations();
        state.flush_backlogs();
        if let Some(failure) = state.reap_workers() {
            // A worker died outside the handler (handler panics are caught per event): its
            // partition would stall with its messages stuck in a backlog. Leave the group
            // so the partitions move to a healthy member, and report it to the caller.
            state.shutdown().await;
            return Err(failure);
        }
        let client = state.client.clone();
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            received = client.recv() => match received {
                Ok(message) => {
                    let raw = detach(&message);
                    drop(message);
                    // The callback that revoked partitions ran inside `recv`.
                    state.follow_revocations();
                    state.dispatch(raw);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "consumer error");
                    if is_fatal(&e) {
                        state.shutdown().await;
                        return Err(Error::Kafka(e));
                    }
                }
            },
            _ = tick.tick(), if state.has_backlog() => {}
        }
    }
    state.shutdown().await;
    Ok(())
}

fn is_fatal(error: &KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(RDKafkaErrorCode::Fatal | RDKafkaErrorCode::InvalidGroupId)
    )
}

fn detach(message: &rdkafka::message::BorrowedMessage<'_>) -> RawMessage {
    let headers = message
        .headers()
        .map(|hs| {
            hs.iter()
                .map(|h| {
                    (
                        h.key.to_owned(),
                        h.value.map(<[u8]>::to_vec).unwrap_or_default(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    RawMessage {
        topic: message.topic().to_owned(),
        partition: message.partition(),
        offset: message.offset(),
        key: message.key().map(<[u8]>::to_vec),
        payload: message.payload().map(<[u8]>::to_vec),
        headers,
    }
}

impl Loop {
    fn follow_revocations(&mut self) {
        while let Ok(tps) = self.revoked.try_recv() {
            for tp in tps {
                if let Some(worker) = self.workers.remove(&tp) {
                    // The worker finishes its in-flight message and exits; a successor for the
                    // same partition waits for it.
                    worker.stop.cancel();
                    self.retired.entry(tp).or_default().push(worker.done);
                }
            }
        }
    }

    fn dispatch(&mut self, message: RawMessage) {
        let tp = (message.topic.clone(), message.partition);
        if !self.workers.contains_key(&tp) {
            self.start_worker(tp.clone());
        }
        let Some(worker) = self.workers.get_mut(&tp) else {
            return;
        };
        if !worker.backlog.is_empty() {
            worker.backlog.push_back(message);
            return;
        }
        match worker.sender.try_send(message) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(message))
            | Err(mpsc::error::TrySendError::Closed(message)) => {
                worker.backlog.push_back(message);
                if !worker.paused {
                    worker.paused = true;
                    if let Err(e) = self.client.pause(&tpl(&tp)) {
                        tracing::warn!(topic = %tp.0, partition = tp.1, error = %e, "pause failed");
                    }
                }
            }
        }
    }

    fn start_worker(&mut self, tp: Tp) {
        let (sender, receiver) = mpsc::channel(self.buffer);
        let (done_tx, done_rx) = oneshot::channel();
        let stop = CancellationToken::new();
        let previous = self.retired.remove(&tp).unwrap_or_default();
        let offsets: Arc<dyn OffsetStore> = Arc::new(KafkaOffsets(Arc::downgrade(&self.client)));
        self.tasks.spawn(run_partition(
            self.settings.clone(),
            offsets,
            receiver,
            stop.clone(),
            previous,
            done_tx,
        ));
        self.workers.insert(
            tp,
            Worker {
                sender,
                stop,
                done: done_rx,
                backlog: VecDeque::new(),
                paused: false,
            },
        );
    }

    /// Collects finished worker tasks; a task that panicked is returned as an error.
    fn reap_workers(&mut self) -> Option<Error> {
        while let Some(result) = self.tasks.try_join_next() {
            if let Err(e) = result {
                if e.is_panic() {
                    let panic = super::partition::panic_message(&*e.into_panic());
                    tracing::error!(panic = %panic, "partition worker panicked");
                    return Some(Error::WorkerPanicked(panic));
                }
            }
        }
        None
    }

    fn has_backlog(&self) -> bool {
        self.workers
            .values()
            .any(|w| w.paused || !w.backlog.is_empty())
    }

    fn flush_backlogs(&mut self) {
        for (tp, worker) in &mut self.workers {
            while let Some(message) = worker.backlog.pop_front() {
                match worker.sender.try_send(message) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(message))
                    | Err(mpsc::error::TrySendError::Closed(message)) => {
                        worker.backlog.push_front(message);
                        break;
                    }
                }
            }
            // Hysteresis: resume only once the worker has drained half its buffer. Every
            // pause drops librdkafka's prefetched messages for the partition, so resuming at
            // the first free slot would refetch for every single message.
            let drained = worker.sender.capacity() * 2 >= worker.sender.max_capacity();
            if worker.backlog.is_empty() && worker.paused && drained {
                worker.paused = false;
                if let Err(e) = self.client.resume(&tpl(tp)) {
                    tracing::warn!(topic = %tp.0, partition = tp.1, error = %e, "resume failed");
                }
            }
        }
    }

    /// Stops every worker after its in-flight message, commits stored offsets, leaves the
    /// group.
    async fn shutdown(mut self) {
        for worker in self.workers.values() {
            worker.stop.cancel();
        }
        while self.tasks.join_next().await.is_some() {}
        match self.client.commit_consumer_state(CommitMode::Sync) {
            Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
            Err(e) => tracing::warn!(error = %e, "final offset commit failed"),
        }
        self.client.unsubscribe();
        tracing::info!("inbox stopped");
        // Dropping the client closes it (librdkafka commits stored offsets once more).
    }
}

fn tpl(tp: &Tp) -> TopicPartitionList {
    let mut list = TopicPartitionList::new();
    // The offset is ignored by pause/resume.
    let _ = list.add_partition_offset(&tp.0, tp.1, Offset::Invalid);
    list
}
