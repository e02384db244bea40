//! The saga state machine: a pure function from (state, input) to a decision.
//!
//! Everything that touches PostgreSQL or the outbox lives in the coordinator; this module
//! only decides, so every rule is unit-tested without a database.

use std::time::Duration;

use eventful_core::Backoff;

use crate::model::{Outcome, SagaStatus, StepKind, Transition};

/// What the machine needs to know about one step of a definition.
#[derive(Debug, Clone)]
pub(crate) struct StepPlan {
    pub(crate) name: String,
    pub(crate) has_compensation: bool,
    pub(crate) timeout: Duration,
    pub(crate) compensation_timeout: Duration,
}

/// The stored state of an instance that the rules look at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct State {
    pub(crate) status: SagaStatus,
    pub(crate) step: usize,
    pub(crate) attempts: i32,
}

/// What happened to an instance.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Input {
    /// A participant replied.
    Reply {
        step: usize,
        kind: StepKind,
        outcome: Outcome,
        /// The in-flight command's deadline had passed when the reply was handled.
        expired: bool,
    },
    /// The in-flight command's deadline passed.
    Deadline,
}

/// Why an input changed nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum IgnoreReason {
    /// The reply's event id was processed before.
    Duplicate,
    /// The reply names a step or kind that is not in flight (any more).
    NotCurrent,
    /// The reply arrived after the step's deadline; the timeout decides instead.
    AfterDeadline,
    /// The saga already finished.
    Terminal,
    /// No saga with this id exists.
    UnknownSaga,
}

/// A transition to apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Change {
    pub(crate) transition: Transition,
    pub(crate) to: State,
    /// Deadline from now for the new in-flight command (`None` when terminal).
    pub(crate) deadline: Option<Duration>,
    /// The command to record in the outbox.
    pub(crate) send: Option<(usize, StepKind)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Decision {
    Ignore(IgnoreReason),
    Apply(Change),
}

/// The state and command of a freshly started saga.
pub(crate) fn start(plan: &[StepPlan]) -> Change {
    Change {
        transition: Transition::Started,
        to: State {
            status: SagaStatus::Running,
            step: 0,
            attempts: 1,
        },
        deadline: plan.first().map(|s| s.timeout),
        send: Some((0, StepKind::Action)),
    }
}

/// Applies the rules. `retry_backoff` spaces the re-sends of a refused compensation
/// (doubled per attempt from its base, capped by its max and by the step's compensation
/// timeout, with the equal jitter of [`Backoff`]: sagas refused together by one failing
/// participant do not all re-send at the same instant).
pub(crate) fn decide(
    plan: &[StepPlan],
    state: State,
    input: Input,
    retry_backoff: Backoff,
) -> Decision {
    if state.status.is_terminal() {
        return Decision::Ignore(IgnoreReason::Terminal);
    }
    let i = state.step;
    match (state.status, input) {
        (
            SagaStatus::Running,
            Input::Reply {
                step,
                kind: StepKind::Action,
                outcome,
                expired,
            },
        ) if step == i => {
            if expired {
                return Decision::Ignore(IgnoreReason::AfterDeadline);
            }
            match outcome {
                Outcome::Success if i + 1 < plan.len() => Decision::Apply(Change {
                    transition: Transition::StepSucceeded,
                    to: State {
                        status: SagaStatus::Running,
                        step: i + 1,
                        attempts: 1,
                    },
                    deadline: Some(plan[i + 1].timeout),
                    send: Some((i + 1, StepKind::Action)),
                }),
                Outcome::Success => Decision::Apply(Change {
                    transition: Transition::StepSucceeded,
                    to: State {
                        status: SagaStatus::Completed,
                        step: i,
                        attempts: state.attempts,
                    },
                    deadline: None,
                    send: None,
                }),
                // The failed step had no effect: compensate the steps before it.
                Outcome::Failure => {
                    Decision::Apply(begin_compensation(plan, i, i, Transition::StepFailed))
                }
            }
        }
        // The step in flight may have taken effect (its reply is missing, not negative):
        // compensate it too. Compensations must tolerate "nothing to undo".
        (SagaStatus::Running, Input::Deadline) => {
            Decision::Apply(begin_compensation(plan, i, i + 1, Transition::StepTimedOut))
        }
        (
            SagaStatus::Compensating,
            Input::Reply {
                step,
                kind: StepKind::Compensation,
                outcome,
                ..
            },
        ) if step == i => match outcome {
            Outcome::Success => Decision::Apply(continue_compensation(
                plan,
                i,
                Transition::CompensationSucceeded,
            )),
            Outcome::Failure => {
                let delay = retry_backoff
                    .with_max(retry_backoff.max.min(plan[i].compensation_timeout))
                    .delay(u32::try_from(state.attempts).unwrap_or(0));
                Decision::Apply(Change {
                    transition: Transition::CompensationFailed,
                    to: state,
                    deadline: Some(delay),
                    send: None,
                })
            }
        },
        (SagaStatus::Compensating, Input::Deadline) => Decision::Apply(Change {
            transition: Transition::CompensationResent,
            to: State {
                attempts: state.attempts.saturating_add(1),
                ..state
            },
            deadline: Some(plan[i].compensation_timeout),
            send: Some((i, StepKind::Compensation)),
        }),
        _ => Decision::Ignore(IgnoreReason::NotCurrent),
    }
}

/// Starts compensating the steps `< below` that have a compensation, highest first.
fn begin_compensation(
    plan: &[StepPlan],
    current: usize,
    below: usize,
    transition: Transition,
) -> Change {
    match highest_compensable(plan, below) {
        Some(j) => Change {
            transition,
            to: State {
                status: SagaStatus::Compensating,
                step: j,
                attempts: 1,
            },
            deadline: Some(plan[j].compensation_timeout),
            send: Some((j, StepKind::Compensation)),
        },
        None => Change {
            transition,
            to: State {
                status: SagaStatus::Compensated,
                step: current,
                attempts: 1,
            },
            deadline: None,
            send: None,
        },
    }
}

/// Step `i`'s compensation was acknowledged: move to the next lower one, or finish.
fn continue_compensation(plan: &[StepPlan], i: usize, transition: Transition) -> Change {
    let mut change = begin_compensation(plan, i, i, transition);
    if change.to.status == SagaStatus::Compensated {
        change.to.step = i;
    }
    change
}

fn highest_compensable(plan: &[StepPlan], below: usize) -> Option<usize> {
    (0..below.min(plan.len()))
        .rev()
        .find(|&j| plan[j].has_compensation)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(compensable: &[bool]) -> Vec<StepPlan> {
        compensable
            .iter()
            .enumerate()
            .map(|(i, &c)| StepPlan {
                name: format!("s{i}"),
                has_compensation: c,
                timeout: Duration::from_secs(10),
                compensation_timeout: Duration::from_secs(20),
            })
            .collect()
    }

    fn running(step: usize) -> State {
        State {
            status: SagaStatus::Running,
            step,
            attempts: 1,
        }
    }

    fn compensating(step: usize, attempts: i32) -> State {
        State {
            status: SagaStatus::Compensating,
            step,
            attempts,
        }
    }

    fn reply(step: usize, kind: StepKind, outcome: Outcome) -> Input {
        Input::Reply {
            step,
            kind,
            outcome,
            expired: false,
        }
    }

    const B: Backoff = Backoff::new(Duration::from_millis(100), Duration::MAX);

    fn apply(d: Decision) -> Change {
        match d {
            Decision::Apply(c) => c,
            Decision::Ignore(r) => panic!("expected a change, got ignore {r:?}"),
        }
    }

    #[test]
    fn success_walks_every_step_then_completes() {
        let p = plan(&[true, true, true]);
        let mut s = start(&p).to;
        for i in 0..3 {
            let c = apply(decide(
                &p,
                s,
                reply(i, StepKind::Action, Outcome::Success),
                B,
            ));
            assert_eq!(c.transition, Transition::StepSucceeded);
            s = c.to;
            if i < 2 {
                assert_eq!(c.send, Some((i + 1, StepKind::Action)));
                assert_eq!(s, running(i + 1));
            } else {
                assert_eq!(c.send, None);
                assert_eq!(c.deadline, None);
                assert_eq!(s.status, SagaStatus::Completed);
            }
        }
    }

    #[test]
    fn failure_compensates_only_earlier_steps_in_reverse() {
        let p = plan(&[true, true, true]);
        // failure at step 0: nothing to compensate
        let c = apply(decide(
            &p,
            running(0),
            reply(0, StepKind::Action, Outcome::Failure),
            B,
        ));
        assert_eq!(c.to.status, SagaStatus::Compensated);
        assert_eq!(c.send, None);
        // failure at step 2: compensate 1 then 0
        let c = apply(decide(
            &p,
            running(2),
            reply(2, StepKind::Action, Outcome::Failure),
            B,
        ));
        assert_eq!(c.send, Some((1, StepKind::Compensation)));
        let c = apply(decide(
            &p,
            c.to,
            reply(1, StepKind::Compensation, Outcome::Success),
            B,
        ));
        assert_eq!(c.send, Some((0, StepKind::Compensation)));
        let c = apply(decide(
            &p,
            c.to,
            reply(0, StepKind::Compensation, Outcome::Success),
            B,
        ));
        assert_eq!(c.send, None);
        assert_eq!(c.to.status, SagaStatus::Compensated);
    }

    #[test]
    fn steps_without_compensation_are_skipped() {
        let p = plan(&[true, false, true]);
        let c = apply(decide(
            &p,
            running(2),
            reply(2, StepKind::Action, Outcome::Failure),
            B,
        ));
        assert_eq!(c.send, Some((0, StepKind::Compensation)));
    }

    #[test]
    fn timeout_compensates_the_step_in_flight_too() {
        let p = plan(&[true, true, true]);
        let c = apply(decide(&p, running(1), Input::Deadline, B));
        assert_eq!(c.transition, Transition::StepTimedOut);
        assert_eq!(c.send, Some((1, StepKind::Compensation)));
        assert_eq!(c.deadline, Some(Duration::from_secs(20)));
    }

    #[test]
    fn late_stale_and_terminal_replies_are_ignored() {
        let p = plan(&[true, true, true]);
        let late = Input::Reply {
            step: 1,
            kind: StepKind::Action,
            outcome: Outcome::Success,
            expired: true,
        };
        assert_eq!(
            decide(&p, running(1), late, B),
            Decision::Ignore(IgnoreReason::AfterDeadline)
        );
        assert_eq!(
            decide(
                &p,
                running(2),
                reply(1, StepKind::Action, Outcome::Success),
                B
            ),
            Decision::Ignore(IgnoreReason::NotCurrent)
        );
        assert_eq!(
            decide(
                &p,
                compensating(1, 1),
                reply(1, StepKind::Action, Outcome::Success),
                B
            ),
            Decision::Ignore(IgnoreReason::NotCurrent)
        );
        let done = State {
            status: SagaStatus::Completed,
            step: 2,
            attempts: 1,
        };
        assert_eq!(
            decide(&p, done, Input::Deadline, B),
            Decision::Ignore(IgnoreReason::Terminal)
        );
    }

    #[test]
    fn refused_compensation_backs_off_then_is_resent() {
        let p = plan(&[true, true]);
        let c = apply(decide(
            &p,
            compensating(0, 3),
            reply(0, StepKind::Compensation, Outcome::Failure),
            B,
        ));
        assert_eq!(c.transition, Transition::CompensationFailed);
        assert_eq!(c.send, None);
        // Third refusal: ceiling 100 ms · 2², jittered into [200 ms, 400 ms].
        let deadline = c.deadline.expect("a re-send deadline");
        assert!(
            deadline >= Duration::from_millis(200) && deadline <= Duration::from_millis(400),
            "{deadline:?}"
        );
        let c = apply(decide(&p, c.to, Input::Deadline, B));
        assert_eq!(c.transition, Transition::CompensationResent);
        assert_eq!(c.send, Some((0, StepKind::Compensation)));
        assert_eq!(c.to.attempts, 4);
        // a late acknowledgement of any attempt is accepted
        let late_ack = Input::Reply {
            step: 0,
            kind: StepKind::Compensation,
            outcome: Outcome::Success,
            expired: true,
        };
        let c = apply(decide(&p, c.to, late_ack, B));
        assert_eq!(c.to.status, SagaStatus::Compensated);
    }
}
