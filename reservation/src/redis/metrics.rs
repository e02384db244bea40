//! The Redis store's instruments in the `metrics` facade (feature `metrics`), labelled with
//! the namespace; without the feature [`Instruments`] is empty and every method a no-op.
//!
//! | name | type | labels |
//! |---|---|---|
//! | `eventful_reservation_holds_total` | counter | `namespace`, `outcome` (`held`, `existing`, `insufficient`, `conflict`, `unknown_sku`) |
//! | `eventful_reservation_expired_total` | counter | `namespace` |
//! | `eventful_reservation_active_holds` | gauge | `namespace` |
//! | `eventful_reservation_script_duration_seconds` | histogram | `namespace`, `op` |

use std::future::Future;

/// The `op` label values (the scripts' operations; `batch` is a coalesced invocation).
#[cfg(feature = "metrics")]
const OPS: [&str; 9] = [
    "reserve",
    "confirm",
    "release",
    "expire",
    "batch",
    "due",
    "reservation",
    "set_stock",
    "adjust_stock",
];

/// The `outcome` label values of `eventful_reservation_holds_total`.
#[cfg(feature = "metrics")]
const OUTCOMES: [&str; 5] = [
    "held",
    "existing",
    "insufficient",
    "conflict",
    "unknown_sku",
];

/// One store's instruments, registered once when it connects.
#[derive(Clone)]
pub(super) struct Instruments {
    #[cfg(feature = "metrics")]
    handles: std::sync::Arc<Handles>,
}

#[cfg(feature = "metrics")]
struct Handles {
    namespace: String,
    holds: [::metrics::Counter; OUTCOMES.len()],
    expired: ::metrics::Counter,
    active: ::metrics::Gauge,
    scripts: [::metrics::Histogram; OPS.len()],
}

impl Instruments {
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(super) fn new(namespace: &str) -> Instruments {
        Instruments {
            #[cfg(feature = "metrics")]
            handles: std::sync::Arc::new(Handles {
                namespace: namespace.to_owned(),
                holds: OUTCOMES.map(|outcome| {
                    ::metrics::counter!(
                        "eventful_reservation_holds_total",
                        "namespace" => namespace.to_owned(),
                        "outcome" => outcome
                    )
                }),
                expired: ::metrics::counter!(
                    "eventful_reservation_expired_total",
                    "namespace" => namespace.to_owned()
                ),
                active: ::metrics::gauge!(
                    "eventful_reservation_active_holds",
                    "namespace" => namespace.to_owned()
                ),
                scripts: OPS.map(|op| script_histogram(namespace, op)),
            }),
        }
    }

    /// Counts a `reserve` call by its outcome (one of [`OUTCOMES`]).
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    #[inline]
    pub(super) fn hold(&self, outcome: &'static str) {
        #[cfg(feature = "metrics")]
        if let Some(i) = OUTCOMES.iter().position(|o| *o == outcome) {
            self.handles.holds[i].increment(1);
        }
    }

    /// Counts holds this store expired and returned to stock.
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    #[inline]
    pub(super) fn expired(&self, holds: usize) {
        #[cfg(feature = "metrics")]
        self.handles.expired.increment(holds as u64);
    }

    /// Whether the active-holds gauge is kept (the reaper then reads the holds counter).
    #[inline]
    pub(super) fn wants_active_holds(&self) -> bool {
        cfg!(feature = "metrics")
    }

    /// Sets the number of holds not yet final.
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    #[inline]
    pub(super) fn active_holds(&self, holds: u64) {
        #[cfg(feature = "metrics")]
        self.handles.active.set(holds as f64);
    }

    /// Runs one script invocation, recording its round trip (whatever its result).
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    #[inline]
    pub(super) async fn timed<T>(&self, op: &'static str, script: impl Future<Output = T>) -> T {
        #[cfg(feature = "metrics")]
        {
            let started = std::time::Instant::now();
            let result = script.await;
            let elapsed = started.elapsed();
            match OPS.iter().position(|o| *o == op) {
                Some(i) => self.handles.scripts[i].record(elapsed),
                None => script_histogram(&self.handles.namespace, op).record(elapsed),
            }
            result
        }
        #[cfg(not(feature = "metrics"))]
        script.await
    }
}

#[cfg(feature = "metrics")]
fn script_histogram(namespace: &str, op: &'static str) -> ::metrics::Histogram {
    ::metrics::histogram!(
        "eventful_reservation_script_duration_seconds",
        "namespace" => namespace.to_owned(),
        "op" => op
    )
}
