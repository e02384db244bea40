//! A coordinator killed mid-saga (its tasks aborted, in-flight transactions rolled back,
//! the value dropped) and a new one started on the same database finishes or compensates
//! every saga. Messages flow through the real outbox table with in-process participants.

mod support;

use std::time::Duration;

use eventful_saga::{SagaStatus, StepKind};
use eventful_test_support::wait_until;
use support::*;
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn serial_a_restarted_coordinator_finishes_or_compensates_every_saga() {
    let timeout = Duration::from_secs(8);
    let h = Harness::with(timeout, Duration::from_secs(2), Duration::from_millis(50)).await;
    create_participant_table(&h.db.pool).await;
    let pool = h.db.new_pool(8).await;

    // 60 sagas: a third complete, a third fail at step 0/1/2, a third go silent at 0/1/2.
    let mut sagas = Vec::new();
    for i in 0..60usize {
        let mut order = Order::new();
        match i % 3 {
            0 => {}
            1 => order.fail_at = Some(i % 9 / 3),
            _ => order.silent_at = Some(i % 9 / 3),
        }
        sagas.push((h.start(&order).await, order));
    }

    // Coordinator A with its reply pump and deadline scanner; participants run throughout.
    let participants_cancel = CancellationToken::new();
    let participants =
        spawn_participants(pool.clone(), h.outbox.clone(), participants_cancel.clone());
    let a = coordinator(
        &pool,
        &h.outbox,
        timeout,
        Duration::from_secs(2),
        Duration::from_millis(50),
    );
    let a_cancel = CancellationToken::new();
    let a_pump = spawn_reply_pump(pool.clone(), a.clone(), a_cancel.clone());
    let a_scanner = a.spawn_deadline_scanner(a_cancel.clone());
    wait_until(
        "some sagas finish under coordinator A",
        Duration::from_secs(30),
        || async { in_flight(&pool).await <= 45 },
    )
    .await;

    // Kill A abruptly: abort (not cancel) its tasks; open transactions roll back.
    a_pump.abort();
    a_scanner.abort();
    let _ = a_pump.await;
    let _ = a_scanner.await;
    drop(a);
    let stranded = in_flight(&pool).await;
    assert!(stranded > 0, "the kill must strand sagas mid-flight");
    // While no coordinator runs, participants keep answering: replies queue up.
    wait_until(
        "participants have answered every command",
        Duration::from_secs(30),
        || async { participant_pass(&pool, &h.outbox, 50).await == 0 },
    )
    .await;

    // Coordinator B: a new value over the same database.
    let b = coordinator(
        &pool,
        &h.outbox,
        timeout,
        Duration::from_secs(2),
        Duration::from_millis(50),
    );
    let b_cancel = CancellationToken::new();
    let b_pump = spawn_reply_pump(pool.clone(), b.clone(), b_cancel.clone());
    let b_scanner = b.spawn_deadline_scanner(b_cancel.clone());
    wait_until(
        "every saga is completed or compensated",
        Duration::from_secs(60),
        || async { in_flight(&pool).await == 0 },
    )
    .await;
    b_cancel.cancel();
    participants_cancel.cancel();
    b_pump.await.unwrap();
    b_scanner.await.unwrap();
    participants.await.unwrap();

    for (saga, order) in &sagas {
        let inst = b.inspect(*saga).await.unwrap();
        let log = command_log(&pool, *saga).await;
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
        // Compensations may have been re-sent while the coordinator was down; nothing else.
        assert_eq!(without_resends(&log), expected, "saga {saga} ({order:?})");
        // Each action was sent exactly once.
        for step in 0..3 {
            let sent = log
                .iter()
                .filter(|e| **e == (step, StepKind::Action))
                .count();
            assert!(sent <= 1, "saga {saga}: action {step} sent {sent} times");
        }
        // The participant applied every action and compensation it received exactly once
        // per command event (guarded), and the history has one row per transition.
        let effects: i64 =
            sqlx::query_scalar("SELECT count(*) FROM participant_effects WHERE saga_id = $1")
                .bind(saga)
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!(effects as usize, log.len(), "saga {saga}");
        assert_eq!(inst.history.len() as i64, inst.version + 1, "saga {saga}");
    }
}
