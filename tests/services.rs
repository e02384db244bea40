//! Round trips through every real service the suite depends on, and the consumer-group
//! resume that at-least-once delivery rests on, across a broker restart.

use std::time::Duration;

use eventful_test_support::{kafka, KafkaBroker, TestDatabase, TestRedis};
use futures::StreamExt;
use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::producer::FutureRecord;
use rdkafka::{Message, Offset, TopicPartitionList};

#[tokio::test]
async fn postgres_round_trip() {
    let db = TestDatabase::create().await;
    sqlx::query("CREATE TABLE notes (id BIGINT PRIMARY KEY, body TEXT NOT NULL)")
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO notes VALUES (1, 'hello')")
        .execute(&db.pool)
        .await
        .unwrap();
    let body: String = sqlx::query_scalar("SELECT body FROM notes WHERE id = 1")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(body, "hello");
}

#[tokio::test]
async fn redis_round_trip_through_a_script() {
    let redis = TestRedis::connect().await;
    let mut conn = redis.connection_manager().await;
    let key = format!("{}counter", redis.prefix);
    let script = redis::Script::new("return redis.call('INCRBY', KEYS[1], ARGV[1])");
    let first: i64 = script
        .key(&key)
        .arg(5)
        .invoke_async(&mut conn)
        .await
        .unwrap();
    let second: i64 = script
        .key(&key)
        .arg(2)
        .invoke_async(&mut conn)
        .await
        .unwrap();
    assert_eq!((first, second), (5, 7));
}

#[tokio::test]
async fn kafka_produce_and_consume() {
    let brokers = kafka::brokers();
    let topic = kafka::create_topic(1).await;
    let producer = kafka::producer(&brokers);
    producer
        .send(
            FutureRecord::to(&topic).key("k").payload("hello"),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap();
    let read = kafka::read_all(&brokers, &topic, 1, Duration::from_secs(30)).await;
    assert_eq!(read.len(), 1);
    assert_eq!(read[0].key.as_deref(), Some(&b"k"[..]));
    assert_eq!(read[0].payload.as_deref(), Some(&b"hello"[..]));
}

/// Produces `count` messages concurrently (so the broker stores them in batches).
async fn produce_batch(brokers: &str, topic: &str, count: usize) {
    let producer = kafka::producer(brokers);
    let sends = (0..count).map(|i| {
        let producer = producer.clone();
        let payload = i.to_string();
        async move {
            producer
                .send(
                    FutureRecord::to(topic).key("k").payload(&payload),
                    Duration::from_secs(30),
                )
                .await
                .map_err(|(e, _)| e)
        }
    });
    for result in futures::future::join_all(sends).await {
        result.unwrap();
    }
}

/// Consumes up to `count` messages with `group`; when `commit` is true, commits the offset
/// after the last one. Returns the payloads read.
async fn consume(
    brokers: &str,
    topic: &str,
    group: &str,
    count: usize,
    commit: bool,
) -> Vec<usize> {
    let consumer = kafka::consumer(brokers, group);
    consumer.subscribe(&[topic]).unwrap();
    let mut seen = Vec::new();
    let mut stream = consumer.stream();
    let mut last_offset = None;
    while seen.len() < count {
        let idle = if seen.is_empty() { 20 } else { 5 };
        let Ok(Some(message)) =
            tokio::time::timeout(Duration::from_secs(idle), stream.next()).await
        else {
            break;
        };
        let message = message.unwrap();
        let payload = std::str::from_utf8(message.payload().unwrap()).unwrap();
        seen.push(payload.parse().unwrap());
        last_offset = Some((message.partition(), message.offset()));
    }
    drop(stream);
    if let (true, Some((partition, offset))) = (commit, last_offset) {
        let mut offsets = TopicPartitionList::new();
        offsets
            .add_partition_offset(topic, partition, Offset::Offset(offset + 1))
            .unwrap();
        consumer.commit(&offsets, CommitMode::Sync).unwrap();
    }
    seen
}

async fn assert_resume_reads_exactly_the_rest(brokers: &str, restart: Option<&mut KafkaBroker>) {
    let topic = format!("resume-{}", uuid::Uuid::new_v4().simple());
    kafka::create_topic_on(brokers, &topic, 1).await;
    produce_batch(brokers, &topic, 100).await;
    let group = format!("group-{}", uuid::Uuid::new_v4().simple());

    let first = consume(brokers, &topic, &group, 40, true).await;
    assert_eq!(first, (0..40).collect::<Vec<_>>());

    if let Some(broker) = restart {
        broker.restart().await;
        kafka::require_broker(brokers).await;
    }

    // Ask for more than remain: the rest must arrive, and nothing else.
    let second = consume(brokers, &topic, &group, 61, false).await;
    assert_eq!(second, (40..100).collect::<Vec<_>>());
}

#[tokio::test]
async fn consumer_group_resumes_from_a_committed_offset_inside_a_batch() {
    assert_resume_reads_exactly_the_rest(&kafka::brokers(), None).await;
}

#[tokio::test]
async fn serial_consumer_group_resumes_across_a_broker_restart() {
    let mut broker = KafkaBroker::start().await;
    let brokers = broker.brokers();
    assert_resume_reads_exactly_the_rest(&brokers, Some(&mut broker)).await;
}
