//! End to end through every real component: commands recorded by the coordinator are
//! published by the outbox relay to Kafka, consumed by participants running on the
//! `eventful-idempotency` inbox consumer (via `eventful_saga::participant`), whose replies
//! go back through their outbox, the relay and Kafka to the coordinator's reply consumer
//! (`Coordinator::reply_handler`). Midway the coordinator is stopped (or killed) and a new
//! one takes over the same consumer group. Runs on the shared broker, on topics of its own.

#![cfg(feature = "kafka")]

mod support;

use std::time::Duration;

use eventful_idempotency::{ConsumerOptions, InboxConsumer};
use eventful_outbox::{KafkaPublisher, Relay};
use eventful_saga::{
    participant, Coordinator, SagaStatus, StepKind, DEFAULT_GUARD_NAME, REPLY_EVENT_TYPE,
};
use eventful_test_support::{kafka, wait_until};
use support::*;
use tokio_util::sync::CancellationToken;

fn coordinator_on(
    h: &Harness,
    topics: &[String; 3],
    replies: &str,
    timeout: Duration,
) -> Coordinator {
    Coordinator::builder(h.db.pool.clone(), h.outbox.clone())
        .reply_topic(replies)
        .saga(checkout_on(topics.clone(), timeout, Duration::from_secs(3)))
        .scan_interval(Duration::from_millis(100))
        .build()
        .unwrap()
}

/// A member that vanishes without leaving keeps its partitions until its session times out;
/// librdkafka's 45 s default would stall the takeover that long. 10 s with 1 s heartbeats
/// bounds it.
fn with_short_sessions(options: ConsumerOptions) -> ConsumerOptions {
    options
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
}

fn reply_consumer(
    h: &Harness,
    brokers: &str,
    group: &str,
    replies: &str,
    c: &Coordinator,
) -> InboxConsumer {
    InboxConsumer::builder(
        with_short_sessions(ConsumerOptions::new(brokers, group, "saga-replies")),
        h.db.pool.clone(),
    )
    .topic(replies)
    .handler(REPLY_EVENT_TYPE, c.reply_handler())
    .backoff(eventful_saga::Backoff::new(
        Duration::from_millis(20),
        Duration::from_millis(500),
    ))
    .build()
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_sagas_flow_through_relay_kafka_and_inbox_consumers_across_a_coordinator_restart() {
    end_to_end(false).await;
}

/// The same with coordinator A killed: its reply consumer task aborted mid-flight (no
/// graceful shutdown, whatever offsets were not committed are redelivered to B and
/// recognised as duplicates), its scanner aborted, the value dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_sagas_survive_an_abrupt_kill_of_the_kafka_reply_consumer() {
    end_to_end(true).await;
}

async fn end_to_end(abrupt: bool) {
    let brokers = kafka::brokers();
    let timeout = Duration::from_secs(60);
    let h = Harness::new(timeout).await;
    create_participant_table(&h.db.pool).await;
    let mut names = Vec::new();
    let run = uuid::Uuid::now_v7().simple().to_string();
    for name in ["inventory", "payments", "shipping", "saga-replies"] {
        let topic = format!("test-{name}-{run}");
        kafka::create_topic_on(&brokers, &topic, 2).await;
        names.push(topic);
    }
    let replies = names.pop().unwrap();
    let topics: [String; 3] = names.try_into().unwrap();
    let cancel = CancellationToken::new();

    // The relay publishes every outbox row: commands and replies.
    let relay = Relay::builder(
        h.db.pool.clone(),
        h.outbox.clone(),
        KafkaPublisher::new(&brokers).unwrap(),
    )
    .poll_interval(Duration::from_millis(100))
    .build()
    .unwrap()
    .spawn(cancel.clone());

    // Participants: one registration line per command type.
    let mut builder = InboxConsumer::builder(
        with_short_sessions(ConsumerOptions::new(
            &brokers,
            format!("participants-{}", uuid::Uuid::now_v7()),
            "participants",
        )),
        h.db.pool.clone(),
    );
    for t in &topics {
        builder = builder.topic(t.clone());
    }
    for (_, action, undo) in STEP_TYPES {
        builder = builder
            .handler(action, participant(h.outbox.clone(), ScriptedParticipant))
            .handler(undo, participant(h.outbox.clone(), ScriptedParticipant));
    }
    let participants = builder.build().unwrap().spawn(cancel.clone());

    // Coordinator A: reply consumer + deadline scanner.
    let group = format!("coordinator-{}", uuid::Uuid::now_v7());
    let a = coordinator_on(&h, &topics, &replies, timeout);
    let a_cancel = CancellationToken::new();
    let a_consumer = reply_consumer(&h, &brokers, &group, &replies, &a).spawn(a_cancel.clone());
    let a_scanner = a.spawn_deadline_scanner(a_cancel.clone());

    let mut sagas = Vec::new();
    for i in 0..12usize {
        let mut order = Order::new();
        // Half complete, half fail at step 0, 1 or 2. (Timeouts are covered in-process: a
        // step deadline here must outlast the consumer-group takeover after the kill.)
        if i % 2 == 1 {
            order.fail_at = Some(i / 2 % 3);
        }
        let mut tx = h.db.pool.begin().await.unwrap();
        let id = a.start(&mut tx, SAGA, &order).await.unwrap();
        tx.commit().await.unwrap();
        sagas.push((id, order));
    }

    wait_until(
        "a first saga finishes through Kafka",
        Duration::from_secs(60),
        || async { in_flight(&h.db.pool).await < 12 },
    )
    .await;
    // Stop (or kill) coordinator A. Replies published meanwhile wait in Kafka for B.
    if abrupt {
        a_consumer.abort();
        let _ = a_consumer.await;
    } else {
        a_cancel.cancel();
        a_consumer.await.unwrap().unwrap();
    }
    a_scanner.abort();
    let _ = a_scanner.await;
    drop(a);
    assert!(
        in_flight(&h.db.pool).await > 0,
        "the kill must strand sagas mid-flight"
    );

    let b = coordinator_on(&h, &topics, &replies, timeout);
    let b_consumer = reply_consumer(&h, &brokers, &group, &replies, &b).spawn(cancel.clone());
    let b_scanner = b.spawn_deadline_scanner(cancel.clone());
    wait_until(
        "every saga is completed or compensated",
        Duration::from_secs(90),
        || async { in_flight(&h.db.pool).await == 0 },
    )
    .await;

    for (saga, order) in &sagas {
        let inst = b.inspect(*saga).await.unwrap();
        let log = command_log(&h.db.pool, *saga).await;
        let (status, expected) = match (order.fail_at, order.silent_at) {
            (None, None) => (SagaStatus::Completed, expected_log(2, &[])),
            (Some(k), _) => (
                SagaStatus::Compensated,
                expected_log(k, &(0..k).rev().collect::<Vec<_>>()),
            ),
            (_, Some(k)) => (
                SagaStatus::Compensated,
                expected_log(k, &(0..=k).rev().collect::<Vec<_>>()),
            ),
        };
        assert_eq!(inst.status, status, "saga {saga} ({order:?})");
        assert_eq!(without_resends(&log), expected, "saga {saga} ({order:?})");
        for step in 0..3 {
            assert!(
                log.iter()
                    .filter(|e| **e == (step, StepKind::Action))
                    .count()
                    <= 1
            );
        }
        assert_eq!(inst.history.len() as i64, inst.version + 1);
    }
    // Every command reached a participant exactly once (Kafka redeliveries were deduplicated).
    let commands_sent: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM eventful_outbox WHERE event_type <> 'eventful.saga.reply'",
    )
    .fetch_one(&h.db.pool)
    .await
    .unwrap();
    let (effects, distinct): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(DISTINCT event_id) FROM participant_effects")
            .fetch_one(&h.db.pool)
            .await
            .unwrap();
    assert_eq!((effects, distinct), (commands_sent, commands_sent));
    // Replies reach the coordinator only through Kafka here (no in-process pump): every
    // reply the participants emitted was consumed and recorded by the coordinator's guard.
    let (replies_sent, replies_seen): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(p.event_id) FROM eventful_outbox o \
         LEFT JOIN eventful_processed_events p ON p.consumer = 'eventful-saga' AND p.event_id = o.id \
         WHERE o.event_type = 'eventful.saga.reply'",
    )
    .fetch_one(&h.db.pool)
    .await
    .unwrap();
    assert_eq!(replies_seen, replies_sent);
    // Participants' emitted events carry the causation id of the command they answer.
    let uncaused: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM eventful_outbox WHERE event_type = 'eventful.saga.reply' \
         AND NOT headers @> '[[\"causation-id\"]]'::jsonb",
    )
    .fetch_one(&h.db.pool)
    .await
    .unwrap();
    assert_eq!(uncaused, 0);

    cancel.cancel();
    b_scanner.await.unwrap();
    b_consumer.await.unwrap().unwrap();
    participants.await.unwrap().unwrap();
    relay.await.unwrap().unwrap();
}

/// A reply consumer whose consumer name is the coordinator's guard name would record each
/// reply's event id under that name before the coordinator's guard checks it: the guard would
/// see every reply as a duplicate and no saga would move past its first step (issue #16,
/// 10a). Such a consumer is refused when built; any other name is accepted.
#[tokio::test]
async fn a_reply_consumer_named_like_the_guard_is_refused_when_built() {
    let h = Harness::new(Duration::from_secs(60)).await;
    let consumer = |coordinator: &Coordinator, name: &str| {
        InboxConsumer::builder(
            ConsumerOptions::new(kafka::brokers(), "coordinator", name),
            h.db.pool.clone(),
        )
        .topic("saga-replies")
        .handler(REPLY_EVENT_TYPE, coordinator.reply_handler())
        .build()
    };

    let refused = consumer(&h.coordinator, DEFAULT_GUARD_NAME)
        .expect_err("a reply consumer named like the guard must be refused");
    let message = refused.to_string();
    assert!(
        message.contains(DEFAULT_GUARD_NAME) && message.contains("duplicate"),
        "{message}"
    );
    consumer(&h.coordinator, "saga-replies").expect("another name is fine");

    // A guard renamed with the builder is checked the same way.
    let renamed = Coordinator::builder(h.db.pool.clone(), h.outbox.clone())
        .guard_name("saga-replies")
        .saga(checkout(Duration::from_secs(60), Duration::from_secs(30)))
        .build()
        .unwrap();
    assert_eq!(renamed.guard_name(), "saga-replies");
    assert!(consumer(&renamed, "saga-replies").is_err());
    consumer(&renamed, DEFAULT_GUARD_NAME).expect("the default name is free now");
}
