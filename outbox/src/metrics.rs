//! [`RelayMetrics`]: counters and gauges of one relay, for export to your metrics system.

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

impl RelayMetricsHandle {
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
    }
}
