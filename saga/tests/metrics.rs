//! The coordinator's instruments in the `metrics` facade (feature `metrics`), read from a
//! process-wide recorder, against the real PostgreSQL. The test registers a saga type of
//! its own (the `saga_type` label), so parallel tests read only their own series.

mod support;

use std::time::Duration;

use eventful_outbox::Outbox;
use eventful_saga::{Command, Coordinator, SagaDefinition, SagaStatus, Step};
use eventful_test_support::metrics::{counter, gauge, install};
use eventful_test_support::{wait_until, TestDatabase};
use support::{commands, Order, REPLIES};
use tokio_util::sync::CancellationToken;

/// Three sagas start (running 3); one gets past its first step into a step that times out:
/// timed out 1, compensating 1, running 2, and the transitions are counted by name.
#[tokio::test]
async fn timeouts_transitions_and_in_flight_gauges_reach_the_recorder() {
    install();
    eventful_test_support::init_tracing();
    let db = TestDatabase::create().await;
    let outbox = Outbox::new();
    let saga_type = format!("metrics-{}", uuid::Uuid::new_v4().simple());
    let payload = |o: &Order| serde_json::json!({ "order_id": o.order_id });
    let definition = SagaDefinition::<Order>::new(saga_type.clone())
        .step(
            Step::new(
                "reserve",
                Command::new("inventory", "ReserveStock", payload),
            )
            .compensate_with(Command::new("inventory", "ReleaseStock", payload))
            .timeout(Duration::from_secs(600))
            .compensation_timeout(Duration::from_secs(600)),
        )
        .step(
            Step::new("pay", Command::new("payments", "Charge", payload))
                .timeout(Duration::from_millis(300)),
        );
    let coordinator = Coordinator::builder(db.pool.clone(), outbox.clone())
        .reply_topic(REPLIES)
        .saga(definition)
        .scan_interval(Duration::from_millis(20))
        .build()
        .unwrap();
    coordinator.migrate().await.unwrap();
    let cancel = CancellationToken::new();
    let scanner = coordinator.spawn_deadline_scanner(cancel.clone());

    let mut sagas = Vec::new();
    for _ in 0..3 {
        let mut tx = db.pool.begin().await.unwrap();
        sagas.push(
            coordinator
                .start(&mut tx, &saga_type, &Order::new())
                .await
                .unwrap(),
        );
        tx.commit().await.unwrap();
    }
    let by_type = [("saga_type", saga_type.as_str())];
    let transitions = |name: &'static str| {
        counter(
            "eventful_saga_transitions_total",
            &[("saga_type", saga_type.as_str()), ("transition", name)],
        )
    };
    assert_eq!(transitions("started"), 3);
    wait_until(
        "the gauges count 3 running",
        Duration::from_secs(10),
        || async {
            gauge("eventful_saga_running", &by_type) == Some(3.0)
                && gauge("eventful_saga_compensating", &by_type) == Some(0.0)
        },
    )
    .await;

    let reserve = commands(&db.pool, sagas[0]).await.pop().unwrap();
    let mut tx = db.pool.begin().await.unwrap();
    coordinator
        .handle_reply(&mut tx, &reserve.ctx.success())
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(transitions("step_succeeded"), 1);

    wait_until(
        "the pay step times out: counted, and the gauges move",
        Duration::from_secs(10),
        || async {
            counter("eventful_saga_timed_out_total", &by_type) == 1
                && gauge("eventful_saga_running", &by_type) == Some(2.0)
                && gauge("eventful_saga_compensating", &by_type) == Some(1.0)
        },
    )
    .await;
    assert_eq!(transitions("step_timed_out"), 1);
    assert_eq!(
        coordinator.inspect(sagas[0]).await.unwrap().status,
        SagaStatus::Compensating
    );
    cancel.cancel();
    scanner.await.unwrap();
}
