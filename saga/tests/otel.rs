//! With the `opentelemetry` feature, an event a participant emits carries the trace context
//! of the span handling it (so the next hop is a child of this one), in the same trace as
//! the handled event; an explicit `traceparent` is kept.

use eventful_idempotency::{EventHandler, EventMeta, HandlerError};
use eventful_outbox::{NewEvent, Outbox};
use eventful_saga::{participant, Emitter, Participant};
use eventful_test_support::otel::SpanCapture;
use eventful_test_support::TestDatabase;
use tracing::Instrument as _;
use uuid::Uuid;

const TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const UPSTREAM: &str = "b7ad6b7169203331";

struct Forward;

#[async_trait::async_trait]
impl Participant for Forward {
    type Event = serde_json::Value;

    async fn handle(
        &self,
        cx: &mut Emitter<'_>,
        _e: serde_json::Value,
    ) -> Result<(), HandlerError> {
        let next = NewEvent::json("next", "k", "Next", &serde_json::json!({}))
            .map_err(HandlerError::permanent)?;
        cx.emit(next).await?;
        let explicit = NewEvent::json("next", "k", "Explicit", &serde_json::json!({}))
            .map_err(HandlerError::permanent)?
            .traceparent("00-explicit-01");
        cx.emit(explicit).await?;
        Ok(())
    }
}

#[tokio::test]
async fn an_emitted_event_is_a_child_of_the_handler_span() {
    let capture = SpanCapture::new();
    let _default = tracing::subscriber::set_default(capture.subscriber());
    let db = TestDatabase::create().await;
    let outbox = Outbox::new();
    outbox.migrate(&db.pool).await.unwrap();
    let upstream = format!("00-{TRACE}-{UPSTREAM}-01");
    let meta = EventMeta::parse(
        "orders",
        0,
        7,
        Some(b"k"),
        vec![
            ("event-id".into(), Uuid::now_v7().to_string().into_bytes()),
            ("event-type".into(), b"Placed".to_vec()),
            ("content-type".into(), b"application/json".to_vec()),
            ("traceparent".into(), upstream.clone().into_bytes()),
        ],
        Some(b"{}"),
    )
    .unwrap();

    // As the inbox runs it: in a handler span parented on the event's traceparent.
    let span = tracing::info_span!("inbox.message");
    assert!(eventful_core::otel::set_parent(&span, &upstream));
    let handler = participant(outbox.clone(), Forward);
    let mut tx = db.pool.begin().await.unwrap();
    handler
        .handle(&mut tx, &meta, meta.decode().unwrap())
        .instrument(span)
        .await
        .unwrap();
    tx.commit().await.unwrap();

    let emitted: Vec<serde_json::Value> =
        sqlx::query_scalar("SELECT headers FROM eventful_outbox ORDER BY seq")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    let traceparents: Vec<Vec<String>> = emitted
        .into_iter()
        .map(|headers| {
            let headers: Vec<(String, String)> = serde_json::from_value(headers).unwrap();
            headers
                .into_iter()
                .filter(|(name, _)| name == "traceparent")
                .map(|(_, value)| value)
                .collect()
        })
        .collect();
    assert_eq!(traceparents[1], vec!["00-explicit-01".to_owned()]);
    let [next] = traceparents[0].as_slice() else {
        panic!("one traceparent: {traceparents:?}")
    };
    assert!(next.starts_with(&format!("00-{TRACE}-")), "{next}");
    assert_ne!(
        next, &upstream,
        "the handler's own span, not the upstream one"
    );
    capture.provider.force_flush().unwrap();
    let spans = capture.exporter.get_finished_spans().unwrap();
    let emitter = spans
        .iter()
        .find(|s| next.contains(&s.span_context.span_id().to_string()))
        .unwrap_or_else(|| panic!("{next} names no exported span: {spans:#?}"));
    assert!(
        ["inbox.message", "saga.participant"].contains(&emitter.name.as_ref()),
        "{}",
        emitter.name
    );
}
