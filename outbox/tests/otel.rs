//! Trace context into the outbox gap, against the real PostgreSQL and Kafka: an event
//! recorded inside a span of a known trace reaches the topic with a `traceparent` of that
//! trace, naming the span that recorded it.

use std::time::Duration;

use eventful_outbox::{KafkaPublisher, NewEvent, Outbox, Relay};
use eventful_test_support::otel::SpanCapture;
use eventful_test_support::{kafka, TestDatabase};
use opentelemetry::trace::{SpanId, TraceId};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER: &str = "00f067aa0ba902b7";

// A current-thread runtime: the relay task runs on this thread, under the test's subscriber.
#[tokio::test]
async fn an_event_recorded_in_a_span_carries_its_trace_to_kafka() {
    let capture = SpanCapture::new();
    let _default = tracing::subscriber::set_default(capture.subscriber());

    let db = TestDatabase::create().await;
    let outbox = Outbox::builder()
        .traceparent_source(eventful_outbox::otel::current_traceparent)
        .build()
        .unwrap();
    outbox.migrate(&db.pool).await.unwrap();
    let brokers = kafka::brokers();
    let topic = kafka::create_topic(1).await;

    // The caller's request span continues a remote trace (as an HTTP handler would).
    let request = tracing::info_span!("request");
    assert!(eventful_core::otel::set_parent(
        &request,
        &format!("00-{TRACE}-{CALLER}-01")
    ));
    async {
        let mut tx = db.pool.begin().await.unwrap();
        outbox
            .record(&mut tx, NewEvent::bytes(&topic, "k", "Placed", vec![1]))
            .await
            .unwrap();
        // An explicit traceparent wins over the source.
        outbox
            .record(
                &mut tx,
                NewEvent::bytes(&topic, "k", "Explicit", vec![2]).traceparent("00-explicit-01"),
            )
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }
    .instrument(request)
    .await;
    // Outside any span of the caller: the recording span starts a trace of its own.
    let mut tx = db.pool.begin().await.unwrap();
    outbox
        .record(&mut tx, NewEvent::bytes(&topic, "k", "Untraced", vec![3]))
        .await
        .unwrap();
    tx.commit().await.unwrap();

    let cancel = CancellationToken::new();
    let relay = Relay::builder(
        db.pool.clone(),
        outbox.clone(),
        KafkaPublisher::new(&brokers).unwrap(),
    )
    .build()
    .unwrap()
    .spawn(cancel.clone());
    let messages = kafka::read_all(&brokers, &topic, 3, Duration::from_secs(60)).await;
    cancel.cancel();
    relay.await.unwrap().unwrap();
    assert_eq!(messages.len(), 3, "{messages:?}");

    let traceparent = messages[0].header("traceparent").unwrap();
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(parts.len(), 4, "{traceparent}");
    assert_eq!(parts[1], TRACE, "the caller's trace: {traceparent}");
    assert_eq!(messages[1].header("traceparent"), Some("00-explicit-01"));
    let own = messages[2].header("traceparent").unwrap();
    assert!(!own.contains(TRACE), "{own}");

    // The header names the span that recorded the event, a child of the caller's span.
    capture.provider.force_flush().unwrap();
    let spans = capture.exporter.get_finished_spans().unwrap();
    let recorder = spans
        .iter()
        .find(|s| s.span_context.span_id() == SpanId::from_hex(parts[2]).unwrap())
        .unwrap_or_else(|| panic!("no exported span {}: {spans:#?}", parts[2]));
    assert_eq!(recorder.name, "record_all");
    assert_eq!(
        recorder.span_context.trace_id(),
        TraceId::from_hex(TRACE).unwrap()
    );
    let request = spans.iter().find(|s| s.name == "request").unwrap();
    assert_eq!(recorder.parent_span_id, request.span_context.span_id());
    assert_eq!(request.parent_span_id, SpanId::from_hex(CALLER).unwrap());
    let own_id = SpanId::from_hex(own.split('-').nth(2).unwrap()).unwrap();
    let own = spans
        .iter()
        .find(|s| s.span_context.span_id() == own_id)
        .unwrap();
    assert_eq!(
        (own.name.as_ref(), own.parent_span_id),
        ("record_all", SpanId::INVALID)
    );
}
