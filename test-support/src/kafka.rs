//! Topics and clients on the Kafka broker (`KAFKA_BROKERS`, default `127.0.0.1:9092`).

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::producer::FutureProducer;
use rdkafka::ClientConfig;

use crate::{env_or, START_HINT};

/// Default broker address. `127.0.0.1`, not `localhost`: librdkafka may try `::1` first.
pub const DEFAULT_BROKERS: &str = "127.0.0.1:9092";

/// The broker list: `KAFKA_BROKERS` or [`DEFAULT_BROKERS`].
pub fn brokers() -> String {
    env_or("KAFKA_BROKERS", DEFAULT_BROKERS)
}

/// Fails the test unless the broker at `brokers` answers a metadata request within 30 s
/// (a loaded 2-core machine can make one request slow, so it retries until the deadline).
pub async fn require_broker(brokers: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match fetch_any_metadata(brokers).await {
            Ok(()) => return,
            Err(e) if tokio::time::Instant::now() >= deadline => {
                panic!("the Kafka broker is not reachable at {brokers}: {e}; {START_HINT}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

async fn fetch_any_metadata(brokers: &str) -> Result<(), String> {
    let owned = brokers.to_owned();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &owned)
            .create()
            .map_err(|e| e.to_string())?;
        consumer
            .fetch_metadata(None, Duration::from_secs(10))
            .map(|_| ())
            .map_err(|e| e.to_string())
    })
    .await
    .unwrap_or_else(|e| Err(e.to_string()))
}

/// Creates a topic with a unique name (`test-<uuid>`) and `partitions` partitions on the
/// shared broker, and returns its name.
pub async fn create_topic(partitions: i32) -> String {
    let name = format!("test-{}", uuid::Uuid::new_v4().simple());
    create_topic_on(&brokers(), &name, partitions).await;
    name
}

/// Creates `name` with `partitions` partitions on `brokers` (an existing topic is fine) and
/// waits until its metadata shows every partition.
pub async fn create_topic_on(brokers: &str, name: &str, partitions: i32) {
    require_broker(brokers).await;
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap_or_else(|e| panic!("Kafka admin client for {brokers}: {e}"));
    let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = admin
        .create_topics([&topic], &options)
        .await
        .unwrap_or_else(|e| panic!("creating topic {name} on {brokers}: {e}"));
    for result in results {
        match result {
            Ok(_) | Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => panic!("creating topic {topic} on {brokers}: {code:?}"),
        }
    }
    wait_for_partitions(brokers, name, partitions).await;
}

async fn wait_for_partitions(brokers: &str, name: &str, partitions: i32) {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap_or_else(|e| panic!("Kafka client for {brokers}: {e}"));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let seen = consumer
            .fetch_metadata(Some(name), Duration::from_secs(5))
            .ok()
            .and_then(|m| {
                m.topics()
                    .iter()
                    .find(|t| t.name() == name && t.error().is_none())
                    .map(|t| t.partitions().len())
            })
            .unwrap_or(0);
        if seen >= partitions as usize {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("topic {name} on {brokers} shows {seen} of {partitions} partitions after 15 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An idempotent producer (`acks=all`) for tests.
pub fn producer(brokers: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("message.timeout.ms", "30000")
        .set("linger.ms", "5")
        .create()
        .unwrap_or_else(|e| panic!("Kafka producer for {brokers}: {e}"))
}

/// A group consumer with manual commits that starts at the earliest offset.
pub fn consumer(brokers: &str, group: &str) -> StreamConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        .create()
        .unwrap_or_else(|e| panic!("Kafka consumer for {brokers}: {e}"))
}

/// Reads every message of `topic` from the start until `expected` have arrived or
/// `timeout` has passed; returns `(key, payload)` pairs in partition order per partition.
pub async fn read_all(
    brokers: &str,
    topic: &str,
    expected: usize,
    timeout: Duration,
) -> Vec<ReadMessage> {
    use futures::StreamExt as _;
    use rdkafka::Message as _;

    let group = format!("reader-{}", uuid::Uuid::new_v4().simple());
    let consumer = consumer(brokers, &group);
    consumer
        .subscribe(&[topic])
        .unwrap_or_else(|e| panic!("subscribing to {topic}: {e}"));
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    let mut stream = consumer.stream();
    while out.len() < expected {
        let next = tokio::time::timeout_at(deadline, stream.next()).await;
        let Ok(Some(message)) = next else { break };
        let message = message.unwrap_or_else(|e| panic!("reading {topic}: {e}"));
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
                    .collect()
            })
            .unwrap_or_default();
        out.push(ReadMessage {
            partition: message.partition(),
            offset: message.offset(),
            key: message.key().map(<[u8]>::to_vec),
            payload: message.payload().map(<[u8]>::to_vec),
            headers,
        });
    }
    out
}

/// One message read back by [`read_all`].
#[derive(Debug, Clone)]
pub struct ReadMessage {
    /// Partition it was read from.
    pub partition: i32,
    /// Offset in that partition.
    pub offset: i64,
    /// Message key.
    pub key: Option<Vec<u8>>,
    /// Message payload.
    pub payload: Option<Vec<u8>>,
    /// Headers as `(name, value)` pairs, values decoded lossily as UTF-8.
    pub headers: Vec<(String, String)>,
}

impl ReadMessage {
    /// The value of header `name`, if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }
}
