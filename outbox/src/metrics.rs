//! [`RelayMetrics`]: counters and gauges of one relay, for export to your metrics system.
//!
//! With the `metrics` feature the same values also go through the
//! [`metrics`](https://docs.rs/metrics) facade, labelled with the database and the outbox
//! table (so relays of several databases in one process stay apart), at the same points:
//! counters when a batch is marked, gauges when the heartbeat refreshes them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A snapshot of one relay's counters (since it started) and gauges (refreshed every
/// heartbeat, i.e. every quarter of the lease TTL).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RelayMetrics {
    /// Events this relay published and marked.
    pub published: u64,
    /// Failed attempts that were scheduled for a retry.
    pub retried: u64,
    /// Events this relay parked.
    pub parked: u64,
    /// Batches handed to the publisher.
    pub batches: u64,
    /// Partitions this relay holds a lease on.
    pub partitions: u64,
    /// Slot rotations this relay did (see [`crate::rotation`]).
    pub rotations: u64,
    /// Unpublished rows those rotations carried over.
    pub carried: u64,
    /// Unpublished, unparked events in the whole table.
    pub pending: i64,
    /// Parked events in the whole table.
    pub parked_pending: i64,
    /// Age of the oldest unpublished, unparked event in the table.
    pub oldest_pending_age: Option<Duration>,
}

#[derive(Default)]
pub(crate) struct Counters {
    #[cfg(feature = "metrics")]
    facade: Option<Facade>,
    pub(crate) published: AtomicU64,
    pub(crate) retried: AtomicU64,
    pub(crate) parked: AtomicU64,
    pub(crate) batches: AtomicU64,
    pub(crate) partitions: AtomicU64,
    pub(crate) rotations: AtomicU64,
    pub(crate) carried: AtomicU64,
    pub(crate) gauges: Mutex<(i64, i64, Option<Duration>)>,
}

/// A cheap, cloneable view of a relay's metrics that stays valid after the relay is spawned.
#[derive(Clone, Default)]
pub struct RelayMetricsHandle {
    pub(crate) counters: Arc<Counters>,
}

impl std::fmt::Debug for RelayMetricsHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.snapshot().fmt(f)
    }
}

/// The relay's instruments in the installed `metrics` recorder, registered once per relay.
#[cfg(feature = "metrics")]
struct Facade {
    published: ::metrics::Counter,
    retried: ::metrics::Counter,
    parked: ::metrics::Counter,
    pending: ::metrics::Gauge,
    parked_pending: ::metrics::Gauge,
    oldest_pending_age: ::metrics::Gauge,
    rotations: ::metrics::Counter,
    carried: ::metrics::Counter,
}

#[cfg(feature = "metrics")]
impl Facade {
    fn new(database: &str, table: &str) -> Facade {
        let labels = [
            ::metrics::Label::new("database", database.to_owned()),
            ::metrics::Label::new("table", table.to_owned()),
        ];
        Facade {
            published: ::metrics::counter!("eventful_outbox_published_total", labels.iter()),
            retried: ::metrics::counter!("eventful_outbox_retried_total", labels.iter()),
            parked: ::metrics::counter!("eventful_outbox_parked_total", labels.iter()),
            pending: ::metrics::gauge!("eventful_outbox_pending", labels.iter()),
            parked_pending: ::metrics::gauge!("eventful_outbox_parked", labels.iter()),
            oldest_pending_age: ::metrics::gauge!(
                "eventful_outbox_oldest_pending_age_seconds",
                labels.iter()
            ),
            rotations: ::metrics::counter!("eventful_outbox_rotations_total", labels.iter()),
            carried: ::metrics::counter!("eventful_outbox_carried_total", labels.iter()),
        }
    }
}

impl RelayMetricsHandle {
    /// A handle for the relay of `table` (qualified) in `database`, which label the
    /// facade's instruments.
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn new(database: &str, table: &str) -> RelayMetricsHandle {
        RelayMetricsHandle {
            counters: Arc::new(Counters {
                #[cfg(feature = "metrics")]
                facade: Some(Facade::new(database, table)),
                ..Counters::default()
            }),
        }
    }

    /// Counts the outcome of one batch.
    pub(crate) fn add_batch(&self, published: u64, retried: u64, parked: u64) {
        let c = &self.counters;
        c.published.fetch_add(published, Ordering::Relaxed);
        c.retried.fetch_add(retried, Ordering::Relaxed);
        c.parked.fetch_add(parked, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        if let Some(f) = &c.facade {
            f.published.increment(published);
            f.retried.increment(retried);
            f.parked.increment(parked);
        }
    }

    /// Counts one slot rotation that carried `carried` unpublished rows over.
    pub(crate) fn add_rotation(&self, carried: u64) {
        let c = &self.counters;
        c.rotations.fetch_add(1, Ordering::Relaxed);
        c.carried.fetch_add(carried, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        if let Some(f) = &c.facade {
            f.rotations.increment(1);
            f.carried.increment(carried);
        }
    }

    /// The current values.
    pub fn snapshot(&self) -> RelayMetrics {
        let c = &self.counters;
        let (pending, parked_pending, oldest_pending_age) = match c.gauges.lock() {
            Ok(g) => *g,
            Err(poisoned) => *poisoned.into_inner(),
        };
        RelayMetrics {
            published: c.published.load(Ordering::Relaxed),
            retried: c.retried.load(Ordering::Relaxed),
            parked: c.parked.load(Ordering::Relaxed),
            batches: c.batches.load(Ordering::Relaxed),
            partitions: c.partitions.load(Ordering::Relaxed),
            rotations: c.rotations.load(Ordering::Relaxed),
            carried: c.carried.load(Ordering::Relaxed),
            pending,
            parked_pending,
            oldest_pending_age,
        }
    }

    pub(crate) fn set_gauges(&self, pending: i64, parked: i64, oldest: Option<Duration>) {
        match self.counters.gauges.lock() {
            Ok(mut g) => *g = (pending, parked, oldest),
            Err(poisoned) => *poisoned.into_inner() = (pending, parked, oldest),
        }
        #[cfg(feature = "metrics")]
        if let Some(f) = &self.counters.facade {
            f.pending.set(pending as f64);
            f.parked_pending.set(parked as f64);
            // No pending event: an age of 0, so an alert on the age clears.
            f.oldest_pending_age
                .set(oldest.map_or(0.0, |age| age.as_secs_f64()));
        }
    }
}
