//! Helpers shared by the outbox integration tests.
#![allow(dead_code, unreachable_pub)]

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

/// Number of rows not yet marked published (parked ones included). Unlike the published
/// rows, these survive slot rotations.
pub async fn unpublished_count(db: &TestDatabase) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM eventful_outbox WHERE published_at IS NULL")
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

/// A TCP proxy in front of PostgreSQL that can refuse `LISTEN`: while `block_listen` is set,
/// a connection whose client sends a `LISTEN` statement is cut (counted in `blocked`);
/// otherwise `LISTEN`s pass (counted in `passed`). Connections must not use TLS
/// (`sslmode=disable`), so the proxy can see the statements.
pub struct PgProxy {
    pub port: u16,
    pub block_listen: Arc<std::sync::atomic::AtomicBool>,
    pub blocked: Arc<std::sync::atomic::AtomicU64>,
    pub passed: Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for PgProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl PgProxy {
    /// Starts a proxy to the server of `url`.
    pub async fn start(url: &str) -> PgProxy {
        use std::str::FromStr as _;
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let target = sqlx::postgres::PgConnectOptions::from_str(url).expect("database url");
        let upstream = format!("{}:{}", target.get_host(), target.get_port());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let block_listen = Arc::new(AtomicBool::new(false));
        let blocked = Arc::new(AtomicU64::new(0));
        let passed = Arc::new(AtomicU64::new(0));
        let (block, b, p) = (block_listen.clone(), blocked.clone(), passed.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                    continue;
                };
                let (block, blocked, passed) = (block.clone(), b.clone(), p.clone());
                tokio::spawn(async move {
                    let (mut client_read, mut client_write) = client.into_split();
                    let (mut server_read, mut server_write) = server.into_split();
                    let down = tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
                    });
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match client_read.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let chunk = &buf[..n];
                        if chunk.windows(7).any(|w| w == b"LISTEN ") {
                            if block.load(Ordering::SeqCst) {
                                blocked.fetch_add(1, Ordering::SeqCst);
                                break;
                            }
                            passed.fetch_add(1, Ordering::SeqCst);
                        }
                        if server_write.write_all(chunk).await.is_err() {
                            break;
                        }
                    }
                    // Cut both directions.
                    down.abort();
                });
            }
        });
        PgProxy {
            port,
            block_listen,
            blocked,
            passed,
            task,
        }
    }

    /// A pool of `max` connections to `url`'s database through this proxy.
    pub async fn pool(&self, url: &str, max: u32) -> sqlx::PgPool {
        use std::str::FromStr as _;
        let options = sqlx::postgres::PgConnectOptions::from_str(url)
            .expect("database url")
            .host("127.0.0.1")
            .port(self.port)
            .ssl_mode(sqlx::postgres::PgSslMode::Disable);
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(max)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await
            .expect("pool through the proxy")
    }
}

/// Creates a topic whose broker-side `max.message.bytes` is `max_bytes`.
pub async fn create_small_topic(brokers: &str, partitions: i32, max_bytes: usize) -> String {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    eventful_test_support::kafka::require_broker(brokers).await;
    let name = format!("test-small-{}", Uuid::new_v4().simple());
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let max_bytes = max_bytes.to_string();
    let topic = NewTopic::new(&name, partitions, TopicReplication::Fixed(1))
        .set("max.message.bytes", &max_bytes);
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for result in admin.create_topics([&topic], &options).await.unwrap() {
        result.unwrap();
    }
    // Waits for the partitions' metadata (an existing topic is fine).
    eventful_test_support::kafka::create_topic_on(brokers, &name, partitions).await;
    name
}
