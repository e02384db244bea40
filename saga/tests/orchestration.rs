//! Orchestration against the real PostgreSQL: happy path, failures at every step,
//! timeouts, duplicates, late replies, racing replies, refused compensations.

mod support;

use std::time::Duration;

use eventful_saga::{
    IgnoreReason, Outcome, ReplyOutcome, SagaReply, SagaStatus, StepKind, Transition,
};
use eventful_test_support::wait_until;
use support::*;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const LONG: Duration = Duration::from_secs(60);

#[tokio::test]
async fn happy_path_runs_three_steps_in_order_and_completes() {
    let h = Harness::new(LONG).await;
    let order = Order::new();
    let saga = h.start(&order).await;
    assert_eq!(command_log(&h.db.pool, saga).await, expected_log(0, &[]));

    for step in 0..3 {
        let out = h.answer_with_payment(saga, step).await;
        let expected = if step < 2 {
            ReplyOutcome::Applied {
                status: SagaStatus::Running,
                step: step + 1,
            }
        } else {
            ReplyOutcome::Applied {
                status: SagaStatus::Completed,
                step: 2,
            }
        };
        assert_eq!(out, expected);
    }

    let cmds = commands(&h.db.pool, saga).await;
    let types: Vec<_> = cmds
        .iter()
        .map(|c| (c.topic.as_str(), c.event_type.as_str()))
        .collect();
    assert_eq!(
        types,
        [
            ("inventory", "ReserveStock"),
            ("payments", "Charge"),
            ("shipping", "Ship")
        ]
    );
    for c in &cmds {
        assert_eq!(c.ctx.saga_id, saga);
        assert_eq!(c.ctx.reply_to, REPLIES);
        assert_eq!(c.payload["order_id"], serde_json::json!(order.order_id));
    }

    let inst = h.coordinator.inspect(saga).await.unwrap();
    assert_eq!(inst.status, SagaStatus::Completed);
    assert_eq!(inst.version, 3);
    assert!(inst.step_deadline.is_none());
    // The payment reply's data was merged into the saga data.
    assert_eq!(
        inst.data["payment_id"],
        serde_json::json!(format!("pay-{saga}"))
    );
    let transitions: Vec<_> = inst.history.iter().map(|e| e.transition).collect();
    assert_eq!(
        transitions,
        [
            Transition::Started,
            Transition::StepSucceeded,
            Transition::StepSucceeded,
            Transition::StepSucceeded
        ]
    );
    // Every transition names the command it recorded, and every reply that caused one.
    assert_eq!(inst.history[0].emitted_event_id, Some(cmds[0].id));
    assert_eq!(inst.history[1].emitted_event_id, Some(cmds[1].id));
    assert_eq!(inst.history[2].emitted_event_id, Some(cmds[2].id));
    assert_eq!(inst.history[3].emitted_event_id, None);
    assert!(inst.history[1..].iter().all(|e| e.caused_by.is_some()));
    assert_eq!(inst.history[3].to_status, SagaStatus::Completed);
}

impl Harness {
    /// `answer` with the payment data the scripted participant would attach.
    async fn answer_with_payment(&self, saga: Uuid, step: usize) -> ReplyOutcome {
        let last = commands(&self.db.pool, saga).await.pop().unwrap();
        let mut reply = last.ctx.success();
        if step == 1 {
            reply = reply
                .with_data(&serde_json::json!({ "payment_id": format!("pay-{saga}") }))
                .unwrap();
        }
        self.reply(&reply).await
    }
}

#[tokio::test]
async fn a_failure_at_each_step_compensates_exactly_the_completed_steps_in_reverse() {
    let h = Harness::new(LONG).await;
    for failing in 0..3usize {
        let saga = h.start(&Order::new()).await;
        for step in 0..failing {
            h.answer_with_payment(saga, step).await;
        }
        let out = h.answer(saga, failing, StepKind::Action, false).await;
        let completed: Vec<usize> = (0..failing).rev().collect();
        // Acknowledge each compensation as it appears; it must be the next lower step.
        for &step in &completed {
            assert_eq!(h.status(saga).await, SagaStatus::Compensating);
            h.answer(saga, step, StepKind::Compensation, true).await;
        }
        if failing == 0 {
            assert_eq!(
                out,
                ReplyOutcome::Applied {
                    status: SagaStatus::Compensated,
                    step: 0
                }
            );
        }
        assert_eq!(
            h.status(saga).await,
            SagaStatus::Compensated,
            "failing at {failing}"
        );
        assert_eq!(
            command_log(&h.db.pool, saga).await,
            expected_log(failing, &completed),
            "failing at {failing}"
        );
        let inst = h.coordinator.inspect(saga).await.unwrap();
        let failed = inst
            .history
            .iter()
            .find(|e| e.transition == Transition::StepFailed)
            .unwrap();
        assert_eq!(failed.reason.as_deref(), Some("refused"));
        let compensated: Vec<usize> = inst
            .history
            .iter()
            .filter(|e| e.transition == Transition::CompensationSucceeded)
            .map(|e| e.step)
            .collect();
        // history rows of acknowledged compensations name the next compensation's step (or the
        // last step once compensated): check the commands instead, plus the count
        assert_eq!(compensated.len(), completed.len());
        if failing == 2 {
            // The refund carries the payment id merged from the payment reply.
            let refund = commands(&h.db.pool, saga)
                .await
                .into_iter()
                .find(|c| c.event_type == "Refund")
                .unwrap();
            assert_eq!(
                refund.payload["payment_id"],
                serde_json::json!(format!("pay-{saga}"))
            );
        }
    }
}

#[tokio::test]
async fn a_step_timeout_compensates_the_step_in_flight_and_the_completed_ones() {
    let h = Harness::with(Duration::from_millis(300), LONG, Duration::from_millis(20)).await;
    let cancel = CancellationToken::new();
    let scanner = h.coordinator.spawn_deadline_scanner(cancel.clone());
    let saga = h.start(&Order::new()).await;
    h.answer(saga, 0, StepKind::Action, true).await; // step 1 (pay) now in flight, never answered

    wait_until(
        "the pay step times out",
        Duration::from_secs(10),
        || async { h.status(saga).await == SagaStatus::Compensating },
    )
    .await;
    assert_eq!(command_log(&h.db.pool, saga).await, expected_log(1, &[1]));
    // A reply for the timed-out action arriving now changes nothing.
    let before = outbox_count(&h.db.pool).await;
    let version = h.coordinator.inspect(saga).await.unwrap().version;
    let late = h.answer_late(saga, 1).await;
    assert_eq!(late, ReplyOutcome::Ignored(IgnoreReason::NotCurrent));
    assert_eq!(outbox_count(&h.db.pool).await, before);
    assert_eq!(h.coordinator.inspect(saga).await.unwrap().version, version);

    h.answer(saga, 1, StepKind::Compensation, true).await;
    h.answer(saga, 0, StepKind::Compensation, true).await;
    assert_eq!(h.status(saga).await, SagaStatus::Compensated);
    assert_eq!(
        command_log(&h.db.pool, saga).await,
        expected_log(1, &[1, 0])
    );
    let inst = h.coordinator.inspect(saga).await.unwrap();
    let timed_out: Vec<_> = inst
        .history
        .iter()
        .filter(|e| e.transition == Transition::StepTimedOut)
        .collect();
    assert_eq!(timed_out.len(), 1);
    assert_eq!(timed_out[0].caused_by, None);
    cancel.cancel();
    scanner.await.unwrap();
}

impl Harness {
    /// A success reply (fresh event id) to the action of `step`, whatever is in flight now.
    async fn answer_late(&self, saga: Uuid, step: usize) -> ReplyOutcome {
        let cmd = commands(&self.db.pool, saga)
            .await
            .into_iter()
            .find(|c| c.ctx.step == step && c.ctx.kind == StepKind::Action)
            .unwrap();
        self.reply(&cmd.ctx.success()).await
    }
}

#[tokio::test]
async fn duplicate_replies_and_replies_after_the_deadline_change_nothing() {
    // No scanner: the deadline passes but nothing acts on it until `expire_due`.
    let h = Harness::with(Duration::from_millis(400), LONG, LONG).await;
    let saga = h.start(&Order::new()).await;
    let first = commands(&h.db.pool, saga)
        .await
        .pop()
        .unwrap()
        .ctx
        .success();
    assert!(matches!(
        h.reply(&first).await,
        ReplyOutcome::Applied { .. }
    ));

    let snapshot = |h: &Harness| {
        let pool = h.db.pool.clone();
        let coordinator = h.coordinator.clone();
        async move {
            let inst = coordinator.inspect(saga).await.unwrap();
            (
                inst.status,
                inst.current_step,
                inst.version,
                inst.history.len(),
                outbox_count(&pool).await,
            )
        }
    };
    let before = snapshot(&h).await;
    // The very same reply again (same event id): duplicate.
    assert_eq!(
        h.reply(&first).await,
        ReplyOutcome::Ignored(IgnoreReason::Duplicate)
    );
    // The same answer re-sent as a new event (new id): the step is no longer current.
    let resent = SagaReply::new(Uuid::now_v7(), saga, 0, StepKind::Action, Outcome::Success);
    assert_eq!(
        h.reply(&resent).await,
        ReplyOutcome::Ignored(IgnoreReason::NotCurrent)
    );
    // A compensation reply while running, a reply to a step not reached, an unknown saga.
    let odd = SagaReply::new(
        Uuid::now_v7(),
        saga,
        1,
        StepKind::Compensation,
        Outcome::Success,
    );
    assert_eq!(
        h.reply(&odd).await,
        ReplyOutcome::Ignored(IgnoreReason::NotCurrent)
    );
    let ahead = SagaReply::new(Uuid::now_v7(), saga, 2, StepKind::Action, Outcome::Success);
    assert_eq!(
        h.reply(&ahead).await,
        ReplyOutcome::Ignored(IgnoreReason::NotCurrent)
    );
    let stranger = SagaReply::new(
        Uuid::now_v7(),
        Uuid::now_v7(),
        0,
        StepKind::Action,
        Outcome::Success,
    );
    assert_eq!(
        h.reply(&stranger).await,
        ReplyOutcome::Ignored(IgnoreReason::UnknownSaga)
    );
    assert_eq!(snapshot(&h).await, before);

    // Let step 1's deadline pass; its (otherwise valid) reply is now late.
    wait_until(
        "step 1's deadline passes",
        Duration::from_secs(10),
        || async {
            sqlx::query_scalar::<_, bool>(
            "SELECT step_deadline <= clock_timestamp() FROM eventful_saga_instances WHERE id = $1",
        )
        .bind(saga)
        .fetch_one(&h.db.pool)
        .await
        .unwrap()
        },
    )
    .await;
    let late = commands(&h.db.pool, saga)
        .await
        .pop()
        .unwrap()
        .ctx
        .success();
    assert_eq!(
        h.reply(&late).await,
        ReplyOutcome::Ignored(IgnoreReason::AfterDeadline)
    );
    assert_eq!(snapshot(&h).await, before);

    // The deadline, not the late reply, decides: compensation of steps 1 and 0.
    assert_eq!(h.coordinator.expire_due().await.unwrap(), 1);
    assert_eq!(h.status(saga).await, SagaStatus::Compensating);
    assert_eq!(command_log(&h.db.pool, saga).await, expected_log(1, &[1]));
    // The late reply redelivered after the timeout was applied: still nothing.
    let after = snapshot(&h).await;
    assert_eq!(
        h.reply(&late).await,
        ReplyOutcome::Ignored(IgnoreReason::Duplicate)
    );
    let late2 = late.clone().with_event_id(Uuid::now_v7());
    assert_eq!(
        h.reply(&late2).await,
        ReplyOutcome::Ignored(IgnoreReason::NotCurrent)
    );
    assert_eq!(snapshot(&h).await, after);

    // Finish; then replies to a terminal saga are ignored too.
    h.answer(saga, 1, StepKind::Compensation, true).await;
    let ack0 = commands(&h.db.pool, saga)
        .await
        .pop()
        .unwrap()
        .ctx
        .success();
    h.reply(&ack0).await;
    assert_eq!(h.status(saga).await, SagaStatus::Compensated);
    let done = snapshot(&h).await;
    let again = ack0.with_event_id(Uuid::now_v7());
    assert_eq!(
        h.reply(&again).await,
        ReplyOutcome::Ignored(IgnoreReason::Terminal)
    );
    assert_eq!(h.coordinator.expire_due().await.unwrap(), 0);
    assert_eq!(snapshot(&h).await, done);
}

#[tokio::test]
async fn two_replies_racing_on_two_connections_advance_the_saga_once() {
    let h = Harness::new(LONG).await;
    let saga = h.start(&Order::new()).await;
    let ctx = commands(&h.db.pool, saga).await.pop().unwrap().ctx;
    // Two distinct reply events (e.g. a participant that answered twice).
    let (a, b) = (ctx.success(), ctx.success());
    assert_ne!(a.event_id, b.event_id);

    let mut tx_a = h.db.pool.begin().await.unwrap();
    let mut tx_b = h.db.pool.begin().await.unwrap();
    // Both read version 0 before either commits.
    let out_a = h.coordinator.handle_reply(&mut tx_a, &a).await.unwrap();
    assert!(matches!(out_a, ReplyOutcome::Applied { .. }));
    let coordinator = h.coordinator.clone();
    let racer = tokio::spawn(async move {
        let out = coordinator.handle_reply(&mut tx_b, &b).await;
        (out, tx_b)
    });
    // B is now blocked on A's row lock (its UPDATE ... AND version = 0).
    let pool = h.db.pool.clone();
    wait_until("B waits for A's lock", Duration::from_secs(10), || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(&pool)
        .await
        .unwrap()
            >= 1
    })
    .await;
    tx_a.commit().await.unwrap();
    let (out_b, tx_b) = racer.await.unwrap();
    match out_b {
        Err(e @ eventful_saga::Error::Conflict { .. }) => {
            assert!(e.is_retryable());
            assert!(
                matches!(e, eventful_saga::Error::Conflict { saga_id, expected: 0 } if saga_id == saga)
            );
        }
        other => panic!("expected a version conflict, got {other:?}"),
    }
    tx_b.rollback().await.unwrap();

    let inst = h.coordinator.inspect(saga).await.unwrap();
    assert_eq!(inst.version, 1);
    assert_eq!(inst.current_step, 1);
    assert_eq!(command_log(&h.db.pool, saga).await, expected_log(1, &[]));
    // Handled again (what a runtime does after a retryable error), B is now stale.
    let mut tx = h.db.pool.begin().await.unwrap();
    let b_again = ctx.success().with_event_id(Uuid::now_v7());
    assert_eq!(
        h.coordinator.handle_reply(&mut tx, &b_again).await.unwrap(),
        ReplyOutcome::Ignored(IgnoreReason::NotCurrent)
    );
    tx.commit().await.unwrap();
}

#[tokio::test]
async fn serial_many_concurrent_replies_per_saga_exactly_one_advances_each() {
    let h = Harness::new(LONG).await;
    let pool = h.db.new_pool(16).await;
    let mut sagas = Vec::new();
    for _ in 0..20 {
        sagas.push(h.start(&Order::new()).await);
    }
    let mut tasks = Vec::new();
    for &saga in &sagas {
        let ctx = commands(&pool, saga).await.pop().unwrap().ctx;
        for _ in 0..6 {
            let (pool, coordinator, reply) = (pool.clone(), h.coordinator.clone(), ctx.success());
            tasks.push(tokio::spawn(async move {
                let mut tx = pool.begin().await.unwrap();
                let out = coordinator.handle_reply(&mut tx, &reply).await;
                match &out {
                    Ok(_) => tx.commit().await.unwrap(),
                    Err(_) => tx.rollback().await.unwrap(),
                }
                (saga, out)
            }));
        }
    }
    let mut applied = std::collections::HashMap::<Uuid, usize>::new();
    for t in tasks {
        let (saga, out) = t.await.unwrap();
        match out {
            Ok(ReplyOutcome::Applied { .. }) => *applied.entry(saga).or_default() += 1,
            Ok(ReplyOutcome::Ignored(IgnoreReason::NotCurrent)) => {}
            Err(eventful_saga::Error::Conflict { .. }) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    for saga in sagas {
        assert_eq!(applied.get(&saga), Some(&1), "saga {saga}");
        let inst = h.coordinator.inspect(saga).await.unwrap();
        assert_eq!((inst.version, inst.current_step), (1, 1));
        assert_eq!(command_log(&pool, saga).await, expected_log(1, &[]));
    }
}

#[tokio::test]
async fn a_compensation_is_resent_until_acknowledged() {
    // Compensations unacknowledged for 200 ms are re-sent; refusals back off (50 ms base).
    let h = Harness::with(LONG, Duration::from_millis(200), Duration::from_millis(20)).await;
    let cancel = CancellationToken::new();
    let scanner = h.coordinator.spawn_deadline_scanner(cancel.clone());
    let saga = h.start(&Order::new()).await;
    h.answer(saga, 0, StepKind::Action, true).await;
    h.answer(saga, 1, StepKind::Action, false).await; // compensate step 0
                                                      // Nobody answers: the compensation is re-sent on its deadline.
    wait_until(
        "the compensation is re-sent twice",
        Duration::from_secs(10),
        || async { command_log(&h.db.pool, saga).await.len() >= 5 },
    )
    .await;
    // Refuse it: it is re-sent after a back-off.
    let n = command_log(&h.db.pool, saga).await.len();
    let out = h.answer(saga, 0, StepKind::Compensation, false).await;
    assert_eq!(
        out,
        ReplyOutcome::Applied {
            status: SagaStatus::Compensating,
            step: 0
        }
    );
    wait_until(
        "the refused compensation is re-sent",
        Duration::from_secs(10),
        || async { command_log(&h.db.pool, saga).await.len() > n },
    )
    .await;
    cancel.cancel();
    scanner.await.unwrap();
    // Finally acknowledged (an acknowledgement of any attempt counts).
    let first_attempt = commands(&h.db.pool, saga)
        .await
        .into_iter()
        .find(|c| c.ctx.kind == StepKind::Compensation)
        .unwrap();
    assert_eq!(first_attempt.ctx.attempt, 1);
    assert_eq!(
        h.reply(&first_attempt.ctx.success()).await,
        ReplyOutcome::Applied {
            status: SagaStatus::Compensated,
            step: 0
        }
    );
    let log = command_log(&h.db.pool, saga).await;
    assert_eq!(without_resends(&log), expected_log(1, &[0]));
    let cmds = commands(&h.db.pool, saga).await;
    let attempts: Vec<u32> = cmds
        .iter()
        .filter(|c| c.ctx.kind == StepKind::Compensation)
        .map(|c| c.ctx.attempt)
        .collect();
    assert!(attempts.len() >= 3, "{attempts:?}");
    assert_eq!(attempts, (1..=attempts.len() as u32).collect::<Vec<_>>());
    let inst = h.coordinator.inspect(saga).await.unwrap();
    assert!(inst
        .history
        .iter()
        .any(|e| e.transition == Transition::CompensationFailed));
    assert!(
        inst.history
            .iter()
            .filter(|e| e.transition == Transition::CompensationResent)
            .count()
            >= 2
    );
    // Once terminal, nothing is due any more.
    assert_eq!(h.coordinator.expire_due().await.unwrap(), 0);
    assert_eq!(command_log(&h.db.pool, saga).await.len(), log.len());
}

#[tokio::test]
async fn start_with_id_starts_once_and_start_is_atomic_with_the_callers_transaction() {
    let h = Harness::new(LONG).await;
    let id = Uuid::now_v7();
    let order = Order::new();
    let mut tx = h.db.pool.begin().await.unwrap();
    h.coordinator
        .start_with_id(&mut tx, SAGA, id, &order)
        .await
        .unwrap();
    // The same id again in the same transaction: refused, transaction still usable.
    let again = h.coordinator.start_with_id(&mut tx, SAGA, id, &order).await;
    assert!(matches!(again, Err(eventful_saga::Error::AlreadyExists(x)) if x == id));
    tx.commit().await.unwrap();
    assert_eq!(command_log(&h.db.pool, id).await, expected_log(0, &[]));

    // Rolled back by the caller: neither the instance nor its command exist.
    let before = outbox_count(&h.db.pool).await;
    let mut tx = h.db.pool.begin().await.unwrap();
    let ghost = h.coordinator.start(&mut tx, SAGA, &order).await.unwrap();
    tx.rollback().await.unwrap();
    assert!(matches!(
        h.coordinator.inspect(ghost).await,
        Err(eventful_saga::Error::NotFound(_))
    ));
    assert_eq!(outbox_count(&h.db.pool).await, before);

    // Unknown type, and data that does not fit the definition: permanent errors.
    let mut tx = h.db.pool.begin().await.unwrap();
    let unknown = h.coordinator.start(&mut tx, "nope", &order).await;
    assert!(matches!(
        unknown,
        Err(eventful_saga::Error::UnknownSagaType(_))
    ));
    let bad = h
        .coordinator
        .start(&mut tx, SAGA, &serde_json::json!({ "x": 1 }))
        .await;
    assert!(matches!(&bad, Err(e @ eventful_saga::Error::Data(_)) if !e.is_retryable()));
}

#[tokio::test]
async fn a_reply_rolled_back_by_the_caller_leaves_no_trace_and_applies_later() {
    let h = Harness::new(LONG).await;
    let saga = h.start(&Order::new()).await;
    let reply = commands(&h.db.pool, saga)
        .await
        .pop()
        .unwrap()
        .ctx
        .success();
    let before = outbox_count(&h.db.pool).await;

    let mut tx = h.db.pool.begin().await.unwrap();
    let out = h.coordinator.handle_reply(&mut tx, &reply).await.unwrap();
    assert!(matches!(out, ReplyOutcome::Applied { .. }));
    tx.rollback().await.unwrap(); // e.g. the caller's own write failed

    let inst = h.coordinator.inspect(saga).await.unwrap();
    assert_eq!(
        (inst.version, inst.current_step, inst.history.len()),
        (0, 0, 1)
    );
    assert_eq!(outbox_count(&h.db.pool).await, before);
    // Redelivered, the same reply (same event id) is not a duplicate: it applies now.
    assert!(matches!(
        h.reply(&reply).await,
        ReplyOutcome::Applied {
            status: SagaStatus::Running,
            step: 1
        }
    ));
    assert_eq!(command_log(&h.db.pool, saga).await, expected_log(1, &[]));
}

#[tokio::test]
async fn serial_concurrent_deadline_scanners_time_each_saga_out_once() {
    // Two coordinators (as in two processes) scan the same due sagas at the same time.
    let h = Harness::with(Duration::from_millis(200), LONG, Duration::from_millis(10)).await;
    let other = coordinator(
        &h.db.pool,
        &h.outbox,
        Duration::from_millis(200),
        LONG,
        Duration::from_millis(10),
    );
    let mut sagas = Vec::new();
    for _ in 0..40 {
        sagas.push(h.start(&Order::new()).await);
    }
    let cancel = CancellationToken::new();
    let scanners = [
        h.coordinator.spawn_deadline_scanner(cancel.clone()),
        other.spawn_deadline_scanner(cancel.clone()),
        h.coordinator.spawn_deadline_scanner(cancel.clone()),
    ];
    let pool = h.db.pool.clone();
    wait_until(
        "every saga is compensating",
        Duration::from_secs(20),
        || async {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM eventful_saga_instances WHERE status = 'compensating'",
            )
            .fetch_one(&pool)
            .await
            .unwrap()
                == 40
        },
    )
    .await;
    cancel.cancel();
    for s in scanners {
        s.await.unwrap();
    }
    for saga in sagas {
        assert_eq!(
            command_log(&h.db.pool, saga).await,
            expected_log(0, &[0]),
            "saga {saga}"
        );
        let inst = h.coordinator.inspect(saga).await.unwrap();
        let timeouts = inst
            .history
            .iter()
            .filter(|e| e.transition == Transition::StepTimedOut)
            .count();
        assert_eq!((timeouts, inst.version), (1, 1), "saga {saga}");
    }
}

#[tokio::test]
async fn a_due_saga_that_cannot_be_processed_is_postponed_without_blocking_others() {
    let h = Harness::with(Duration::from_millis(100), LONG, LONG).await;
    let broken = h.start(&Order::new()).await;
    let healthy = h.start(&Order::new()).await;
    // The stored data no longer fits the definition's data type (e.g. after a bad deploy).
    sqlx::query("UPDATE eventful_saga_instances SET data = '{\"unexpected\": true}' WHERE id = $1")
        .bind(broken)
        .execute(&h.db.pool)
        .await
        .unwrap();
    let pool = h.db.pool.clone();
    wait_until("both deadlines pass", Duration::from_secs(10), || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM eventful_saga_instances WHERE step_deadline <= clock_timestamp()",
        )
        .fetch_one(&pool)
        .await
        .unwrap()
            == 2
    })
    .await;
    assert_eq!(h.coordinator.expire_due().await.unwrap(), 2);
    assert_eq!(h.status(healthy).await, SagaStatus::Compensating);
    let stuck = h.coordinator.inspect(broken).await.unwrap();
    assert_eq!((stuck.status, stuck.version), (SagaStatus::Running, 0));
    // Postponed (by a minute), so the next scans do not spin on it.
    assert!(stuck.step_deadline.unwrap() > chrono::Utc::now() + chrono::Duration::seconds(30));
    assert_eq!(h.coordinator.expire_due().await.unwrap(), 0);
    assert_eq!(command_log(&h.db.pool, broken).await, expected_log(0, &[]));
}

/// The consumer runtime applies a partition's waiting replies in one transaction, calling
/// the reply handler for each on the same connection: each reply is applied once, a copy of
/// a reply in the same transaction is a duplicate, a stranger is ignored, and a batch rolled
/// back (a later handler failed) leaves no trace, so re-applying it applies each reply once.
#[tokio::test]
async fn replies_of_several_sagas_in_one_transaction_apply_once_each() {
    let h = Harness::new(LONG).await;
    let mut sagas = Vec::new();
    for _ in 0..3 {
        sagas.push(h.start(&Order::new()).await);
    }
    let mut replies = Vec::new();
    for &saga in &sagas {
        replies.push(
            commands(&h.db.pool, saga)
                .await
                .pop()
                .unwrap()
                .ctx
                .success(),
        );
    }
    let stranger = SagaReply::new(
        Uuid::now_v7(),
        Uuid::now_v7(),
        0,
        StepKind::Action,
        Outcome::Success,
    );
    let outbox_before = outbox_count(&h.db.pool).await;
    let batch = [
        &replies[0],
        &replies[1],
        &replies[0],
        &stranger,
        &replies[2],
    ];

    // First attempt: the batch is rolled back (as when a later event's handler fails).
    let mut tx = h.db.pool.begin().await.unwrap();
    apply_in_one_transaction(&h, &mut tx, &batch).await;
    tx.rollback().await.unwrap();
    for &saga in &sagas {
        let inst = h.coordinator.inspect(saga).await.unwrap();
        assert_eq!((inst.version, inst.history.len()), (0, 1), "{saga}");
    }
    assert_eq!(outbox_count(&h.db.pool).await, outbox_before);

    // Re-applied in a new transaction: each applies once.
    let mut tx = h.db.pool.begin().await.unwrap();
    let outcomes = apply_in_one_transaction(&h, &mut tx, &batch).await;
    tx.commit().await.unwrap();
    let step1 = ReplyOutcome::Applied {
        status: SagaStatus::Running,
        step: 1,
    };
    assert_eq!(
        outcomes,
        [
            step1,
            step1,
            ReplyOutcome::Ignored(IgnoreReason::Duplicate),
            ReplyOutcome::Ignored(IgnoreReason::UnknownSaga),
            step1
        ]
    );
    for &saga in &sagas {
        let inst = h.coordinator.inspect(saga).await.unwrap();
        assert_eq!(
            (
                inst.status,
                inst.current_step,
                inst.version,
                inst.history.len()
            ),
            (SagaStatus::Running, 1, 1, 2),
            "{saga}"
        );
        assert_eq!(command_log(&h.db.pool, saga).await, expected_log(1, &[]));
    }
    assert_eq!(outbox_count(&h.db.pool).await, outbox_before + 3);
    // The committed batch's replies are duplicates on redelivery.
    for reply in &replies {
        assert_eq!(
            h.reply(reply).await,
            ReplyOutcome::Ignored(IgnoreReason::Duplicate)
        );
    }
}

async fn apply_in_one_transaction(
    h: &Harness,
    tx: &mut sqlx::PgConnection,
    replies: &[&SagaReply],
) -> Vec<ReplyOutcome> {
    let mut outcomes = Vec::new();
    for reply in replies {
        outcomes.push(h.coordinator.handle_reply(&mut *tx, reply).await.unwrap());
    }
    outcomes
}

/// `handle_replies_together` applies replies of several sagas with a fixed number of
/// statements and gives the outcomes one-by-one application would: each applies once, a
/// processed reply is a duplicate, a stranger is ignored; rolled back with its transaction it
/// leaves no trace. It refuses (writes nothing, returns `None`) two replies for one saga, and
/// a batch in which an instance did not move (a lost version race, made here by a trigger
/// that skips one instance's update): the guard keeps no record of either, so the replies
/// then apply one by one.
#[tokio::test]
async fn replies_applied_together_match_one_by_one_and_refuse_what_they_cannot_apply() {
    let h = Harness::new(LONG).await;
    let mut sagas = Vec::new();
    for _ in 0..4 {
        sagas.push(h.start(&Order::new()).await);
    }
    let mut replies = Vec::new();
    for &saga in &sagas {
        let last = commands(&h.db.pool, saga).await.pop().unwrap();
        replies.push(last.ctx.success());
    }
    assert_eq!(
        h.reply(&replies[3]).await,
        ReplyOutcome::Applied {
            status: SagaStatus::Running,
            step: 1
        }
    );
    let stranger = SagaReply::new(
        Uuid::now_v7(),
        Uuid::now_v7(),
        0,
        StepKind::Action,
        Outcome::Success,
    );
    let batch = vec![
        replies[0].clone(),
        replies[1].clone(),
        stranger,
        replies[2].clone(),
        replies[3].clone(),
    ];
    let outbox_before = outbox_count(&h.db.pool).await;

    let mut tx = h.db.pool.begin().await.unwrap();
    let outcomes = h
        .coordinator
        .handle_replies_together(&mut tx, &batch)
        .await
        .unwrap();
    assert!(outcomes.is_some());
    tx.rollback().await.unwrap();
    for &saga in &sagas[..3] {
        let inst = h.coordinator.inspect(saga).await.unwrap();
        assert_eq!((inst.version, inst.history.len()), (0, 1), "{saga}");
    }
    assert_eq!(outbox_count(&h.db.pool).await, outbox_before);

    let mut tx = h.db.pool.begin().await.unwrap();
    let outcomes = h
        .coordinator
        .handle_replies_together(&mut tx, &batch)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let step1 = ReplyOutcome::Applied {
        status: SagaStatus::Running,
        step: 1,
    };
    assert_eq!(
        outcomes,
        Some(vec![
            step1,
            step1,
            ReplyOutcome::Ignored(IgnoreReason::UnknownSaga),
            step1,
            ReplyOutcome::Ignored(IgnoreReason::Duplicate),
        ])
    );
    for &saga in &sagas {
        let inst = h.coordinator.inspect(saga).await.unwrap();
        assert_eq!(
            (
                inst.status,
                inst.current_step,
                inst.version,
                inst.history.len()
            ),
            (SagaStatus::Running, 1, 1, 2),
            "{saga}"
        );
        assert_eq!(command_log(&h.db.pool, saga).await, expected_log(1, &[]));
        let last = inst.history.last().unwrap();
        assert_eq!(last.transition, Transition::StepSucceeded, "{saga}");
        assert!(
            last.caused_by.is_some() && last.emitted_event_id.is_some(),
            "{saga}"
        );
    }
    assert_eq!(outbox_count(&h.db.pool).await, outbox_before + 3);

    // The step-1 replies of sagas 0 and 1, plus a second reply for saga 0: refused.
    let mut step1_replies = Vec::new();
    for &saga in &sagas[..2] {
        step1_replies.push(
            commands(&h.db.pool, saga)
                .await
                .pop()
                .unwrap()
                .ctx
                .success(),
        );
    }
    let twice = vec![
        step1_replies[0].clone(),
        step1_replies[1].clone(),
        step1_replies[0].clone().with_event_id(Uuid::now_v7()),
    ];
    let mut tx = h.db.pool.begin().await.unwrap();
    assert_eq!(
        h.coordinator
            .handle_replies_together(&mut tx, &twice)
            .await
            .unwrap(),
        None
    );
    tx.commit().await.unwrap();

    // Saga 1's instance does not move: the batch is refused and leaves nothing behind.
    sqlx::query(&format!(
        "CREATE FUNCTION stand_still() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN IF OLD.id = '{}' THEN RETURN NULL; END IF; RETURN NEW; END $$",
        sagas[1]
    ))
    .execute(&h.db.pool)
    .await
    .unwrap();
    sqlx::query(
        "CREATE TRIGGER stand_still BEFORE UPDATE ON eventful_saga_instances \
         FOR EACH ROW EXECUTE FUNCTION stand_still()",
    )
    .execute(&h.db.pool)
    .await
    .unwrap();
    let outbox_before = outbox_count(&h.db.pool).await;
    let mut tx = h.db.pool.begin().await.unwrap();
    assert_eq!(
        h.coordinator
            .handle_replies_together(&mut tx, &step1_replies)
            .await
            .unwrap(),
        None
    );
    tx.commit().await.unwrap();
    assert_eq!(outbox_count(&h.db.pool).await, outbox_before);
    sqlx::query("DROP TRIGGER stand_still ON eventful_saga_instances")
        .execute(&h.db.pool)
        .await
        .unwrap();
    for (reply, saga) in step1_replies.iter().zip(&sagas) {
        assert_eq!(
            h.reply(reply).await,
            ReplyOutcome::Applied {
                status: SagaStatus::Running,
                step: 2
            },
            "{saga}: not recorded by the refused batches"
        );
    }
}
