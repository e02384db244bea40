//! Helpers shared by the outbox integration tests.
#![allow(dead_code, unreachable_pub)]

pub mod contract;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use eventful_outbox::{Error, Outbox, OutboxRecord, Publisher};
use eventful_test_support::kafka::{consumer, ReadMessage};
use eventful_test_support::TestDatabase;
use futures::StreamExt as _;
use rdkafka::consumer::Consumer as _;
use rdkafka::{Message as _, Offset, TopicPartitionList};
use uuid::Uuid;

/// A fresh database with the default outbox migrated.
pub async fn setup() -> (TestDatabase, Outbox) {
    eventful_test_support::init_tracing();
    let db = TestDatabase::create_with_pool_size(20).await;
    let outbox = Outbox::new();
    outbox.migrate(&db.pool).await.expect("migrate");
    (db, outbox)
}

/// Number of published rows.
pub async fn published_count(db: &TestDatabase) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM eventful_outbox WHERE published_at IS NOT NULL")
        .fetch_one(&db.pool)
        .await
        .expect("count")
}

/// Number of rows.
pub async fn row_count(db: &TestDatabase) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM eventful_outbox")
        .fetch_one(&db.pool)
        .await
        .expect("count")
}

/// Reads `topic` from the beginning until every id of `expected` has been seen (plus, when
/// `linger` is set, until the topic has been quiet for `linger`, to catch late duplicates),
/// or `timeout` passed. Messages are returned sorted by (partition, offset).
pub async fn read_topic(
    brokers: &str,
    topic: &str,
    expected: &HashSet<Uuid>,
    timeout: Duration,
    linger: Option<Duration>,
) -> Vec<ReadMessage> {
    // Manual assignment of every partition from the beginning: no consumer-group
    // coordination, which is slow on a loaded broker.
    let group = format!("outbox-test-{}", Uuid::new_v4().simple());
    let consumer = consumer(brokers, &group);
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(30))
        .expect("topic metadata");
    let mut assignment = TopicPartitionList::new();
    for t in metadata.topics().iter().filter(|t| t.name() == topic) {
        for p in t.partitions() {
            assignment
                .add_partition_offset(topic, p.id(), Offset::Beginning)
                .expect("partition offset");
        }
    }
    assert!(assignment.count() > 0, "topic {topic} has no partitions");
    consumer.assign(&assignment).expect("assign");
    let mut stream = consumer.stream();
    let deadline = tokio::time::Instant::now() + timeout;
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    loop {
        let complete = expected.iter().all(|id| seen.contains(id));
        let until = match (complete, linger) {
            (true, None) => break,
            (true, Some(quiet)) => (tokio::time::Instant::now() + quiet).min(deadline),
            (false, _) => deadline,
        };
        let Ok(Some(message)) = tokio::time::timeout_at(until, stream.next()).await else {
            break;
        };
        let message = message.expect("kafka read");
        let headers = message
            .headers()
            .map(|hs| {
                use rdkafka::message::Headers as _;
                hs.iter()
                    .map(|h| {
                        (
                            h.key.to_owned(),
                            String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                        )
                    })
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        let read = ReadMessage {
            partition: message.partition(),
            offset: message.offset(),
            key: message.key().map(<[u8]>::to_vec),
            payload: message.payload().map(<[u8]>::to_vec),
            headers,
        };
        if let Some(id) = read
            .header("event-id")
            .and_then(|s| Uuid::parse_str(s).ok())
        {
            seen.insert(id);
        }
        out.push(read);
    }
    out.sort_by_key(|m| (m.partition, m.offset));
    out
}

pub fn event_id(m: &ReadMessage) -> Uuid {
    Uuid::parse_str(m.header("event-id").expect("event-id header")).expect("uuid")
}

pub fn key_of(m: &ReadMessage) -> String {
    String::from_utf8(m.key.clone().expect("key")).expect("utf8 key")
}

/// Checks the per-key guarantee on messages sorted by (partition, offset): for every key of
/// `expected` (event ids in commit order), the first occurrences of its ids in the topic are
/// exactly that list; and no message carries an id outside `expected`.
pub fn assert_first_occurrences_in_commit_order(
    messages: &[ReadMessage],
    expected: &HashMap<String, Vec<Uuid>>,
) {
    let all: HashSet<Uuid> = expected.values().flatten().copied().collect();
    let mut firsts: HashMap<String, Vec<Uuid>> = HashMap::new();
    let mut seen = HashSet::new();
    let mut partition_of_key: HashMap<String, i32> = HashMap::new();
    for m in messages {
        let id = event_id(m);
        let key = key_of(m);
        assert!(
            all.contains(&id),
            "unexpected event {id} (key {key}) in the topic"
        );
        let p = *partition_of_key.entry(key.clone()).or_insert(m.partition);
        assert_eq!(p, m.partition, "key {key} spread over several partitions");
        if seen.insert(id) {
            firsts.entry(key).or_default().push(id);
        }
    }
    for (key, ids) in expected {
        let got = firsts.get(key).cloned().unwrap_or_default();
        let missing: Vec<_> = ids.iter().filter(|id| !seen.contains(id)).collect();
        assert!(
            missing.is_empty(),
            "key {key}: {} committed events missing: {missing:?}",
            missing.len()
        );
        if let Some(i) = got.iter().zip(ids).position(|(a, b)| a != b) {
            panic!(
                "key {key}: first occurrences not in commit order at position {i} of {}: topic has {}, commit order has {}",
                ids.len(),
                got[i],
                ids[i]
            );
        }
        assert_eq!(got.len(), ids.len(), "key {key}: event count");
    }
}

/// Wraps a publisher and records, per event id, how many times it was acknowledged, and
/// the maximum number of batches in flight at once across every relay sharing it.
#[derive(Clone)]
pub struct Recording<P> {
    pub inner: P,
    pub acks: Arc<Mutex<HashMap<Uuid, u32>>>,
    pub in_flight: Arc<Mutex<HashMap<Uuid, u32>>>,
    pub overlaps: Arc<Mutex<Vec<Uuid>>>,
    pub batches: Arc<std::sync::atomic::AtomicU64>,
}

impl<P> Recording<P> {
    pub fn new(inner: P) -> Self {
        Self {
            inner,
            acks: Default::default(),
            in_flight: Default::default(),
            overlaps: Default::default(),
            batches: Default::default(),
        }
    }
}

#[async_trait]
impl<P: Publisher> Publisher for Recording<P> {
    async fn publish_batch(&self, events: &[OutboxRecord]) -> Vec<Result<(), Error>> {
        self.batches
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        {
            let mut in_flight = self.in_flight.lock().unwrap();
            for e in events {
                let n = in_flight.entry(e.id).or_default();
                *n += 1;
                if *n > 1 {
                    self.overlaps.lock().unwrap().push(e.id);
                }
            }
        }
        let results = self.inner.publish_batch(events).await;
        {
            let mut in_flight = self.in_flight.lock().unwrap();
            let mut acks = self.acks.lock().unwrap();
            for (e, r) in events.iter().zip(&results) {
                if let Some(n) = in_flight.get_mut(&e.id) {
                    *n -= 1;
                }
                if r.is_ok() {
                    *acks.entry(e.id).or_default() += 1;
                }
            }
        }
        results
    }
}
