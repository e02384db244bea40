//! Trace context across the outbox gap, both directions, against the real PostgreSQL and
//! Kafka: an event recorded inside a span of a known trace is relayed with its
//! `traceparent`, and the inbox's handler span for it continues that trace, as a child of
//! the span that recorded it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use eventful_idempotency::{ConsumerOptions, EventHandler, EventMeta, HandlerError, InboxConsumer};
use eventful_outbox::{KafkaPublisher, NewEvent, Outbox, Relay};
use eventful_test_support::otel::SpanCapture;
use eventful_test_support::{kafka, wait_until, TestDatabase};
use opentelemetry::trace::{SpanId, TraceId};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER: &str = "00f067aa0ba902b7";

/// Remembers the `traceparent` of the span its handler runs in.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Option<String>>>);

#[async_trait]
impl EventHandler for Seen {
    type Payload = serde_json::Value;

    async fn handle(
        &self,
        _tx: &mut sqlx::PgConnection,
        _event: &EventMeta,
        _payload: serde_json::Value,
    ) -> Result<(), HandlerError> {
        *self.0.lock().unwrap() = eventful_outbox::otel::current_traceparent();
        Ok(())
    }
}

// A current-thread runtime: the relay and the consumer run on this thread, under the test's
// subscriber.
#[tokio::test]
async fn the_handler_span_continues_the_trace_that_recorded_the_event() {
    let capture = SpanCapture::new();
    let _default = tracing::subscriber::set_default(capture.subscriber());

    let db = TestDatabase::create_with_pool_size(8).await;
    let outbox = Outbox::builder()
        .traceparent_source(eventful_outbox::otel::current_traceparent)
        .build()
        .unwrap();
    outbox.migrate(&db.pool).await.unwrap();
    eventful_idempotency::migrate(&db.pool).await.unwrap();
    let brokers = kafka::brokers();
    let topic = kafka::create_topic(1).await;

    let request = tracing::info_span!("request");
    assert!(eventful_core::otel::set_parent(
        &request,
        &format!("00-{TRACE}-{CALLER}-01")
    ));
    async {
        let mut tx = db.pool.begin().await.unwrap();
        outbox
            .record(
                &mut tx,
                NewEvent::json(&topic, "k", "Placed", &serde_json::json!({})).unwrap(),
            )
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }
    .instrument(request)
    .await;

    let cancel = CancellationToken::new();
    let relay = Relay::builder(
        db.pool.clone(),
        outbox.clone(),
        KafkaPublisher::new(&brokers).unwrap(),
    )
    .build()
    .unwrap()
    .spawn(cancel.clone());
    let seen = Seen::default();
    let group = format!("otel-{}", uuid::Uuid::new_v4().simple());
    let consumer = InboxConsumer::builder(
        ConsumerOptions::new(&brokers, &group, &group).set("session.timeout.ms", "30000"),
        db.pool.clone(),
    )
    .topic(&topic)
    .handler("Placed", seen.clone())
    .build()
    .unwrap()
    .spawn(cancel.clone());
    wait_until("the event is handled", Duration::from_secs(60), || async {
        seen.0.lock().unwrap().is_some()
    })
    .await;
    cancel.cancel();
    relay.await.unwrap().unwrap();
    consumer.await.unwrap().unwrap();

    // What travelled: the recording span's context, in the caller's trace.
    let published = kafka::read_all(&brokers, &topic, 1, Duration::from_secs(30)).await;
    let header = published[0].header("traceparent").unwrap().to_owned();
    let recorder_id = header.split('-').nth(2).unwrap();
    assert!(header.starts_with(&format!("00-{TRACE}-")), "{header}");

    capture.provider.force_flush().unwrap();
    let spans = capture.exporter.get_finished_spans().unwrap();
    let span = |name: &str| {
        spans
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no {name} span: {spans:#?}"))
    };
    let (request, recorder, handler) = (span("request"), span("record_all"), span("inbox.message"));
    let trace = TraceId::from_hex(TRACE).unwrap();
    for s in [request, recorder, handler] {
        assert_eq!(
            s.span_context.trace_id(),
            trace,
            "{} not in the trace",
            s.name
        );
    }
    assert_eq!(
        recorder.span_context.span_id(),
        SpanId::from_hex(recorder_id).unwrap()
    );
    assert_eq!(recorder.parent_span_id, request.span_context.span_id());
    assert_eq!(
        handler.parent_span_id,
        recorder.span_context.span_id(),
        "the handler span is a child of the span that recorded the event"
    );
    // The handler itself ran inside that span.
    let inside = seen.0.lock().unwrap().clone().unwrap();
    assert_eq!(
        inside,
        format!("00-{TRACE}-{}-01", handler.span_context.span_id())
    );
}
