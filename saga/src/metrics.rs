//! The coordinator's instruments in the `metrics` facade (feature `metrics`), labelled with
//! the saga type (one of the registered definitions, so the label stays bounded); without
//! the feature every function here is an empty inline call.
//!
//! | name | type | labels |
//! |---|---|---|
//! | `eventful_saga_transitions_total` | counter | `saga_type`, `transition` |
//! | `eventful_saga_timed_out_total` | counter | `saga_type` |
//! | `eventful_saga_running` | gauge | `saga_type` |
//! | `eventful_saga_compensating` | gauge | `saga_type` |
//!
//! Transitions are counted when the coordinator's own transaction or savepoint commits (a
//! caller's outer transaction that rolls back afterwards is still counted). The gauges are
//! counted in PostgreSQL by the deadline scanner, once per scan interval.

use crate::Transition;

/// Counts a committed transition (and a step timeout under its own name as well).
#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
#[inline]
pub(crate) fn transition(saga_type: &str, transition: Transition) {
    #[cfg(feature = "metrics")]
    {
        ::metrics::counter!(
            "eventful_saga_transitions_total",
            "saga_type" => saga_type.to_owned(),
            "transition" => transition.as_str()
        )
        .increment(1);
        if transition == Transition::StepTimedOut {
            ::metrics::counter!("eventful_saga_timed_out_total", "saga_type" => saga_type.to_owned())
                .increment(1);
        }
    }
}

/// Sets the running and compensating gauges of every registered type from
/// `(saga_type, status, count)` rows (types without a row are 0).
#[cfg(feature = "metrics")]
pub(crate) fn in_flight(types: &[String], counts: &[(String, String, i64)]) {
    for saga_type in types {
        for status in ["running", "compensating"] {
            let n = counts
                .iter()
                .find(|(t, s, _)| t == saga_type && s == status)
                .map_or(0, |(_, _, n)| *n);
            let name = if status == "running" {
                "eventful_saga_running"
            } else {
                "eventful_saga_compensating"
            };
            ::metrics::gauge!(name, "saga_type" => saga_type.clone()).set(n as f64);
        }
    }
}
