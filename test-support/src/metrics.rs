//! One process-wide `metrics` recorder that tests read without resetting (feature `metrics`).
//!
//! `metrics::with_local_recorder` covers only the current thread, and the crates record from
//! spawned tasks, so a test binary installs this recorder globally with [`install`] (once;
//! every call after the first is a no-op). Tests running in parallel in the same binary
//! share it: each one labels its instruments uniquely (its own table, consumer group or
//! namespace) and reads only those. Unlike `metrics-util`'s `DebuggingRecorder`, reading
//! does not reset counters or gauges, so concurrent readers do not disturb each other.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use metrics_util::registry::{AtomicStorage, Registry};

static REGISTRY: OnceLock<Arc<Registry<Key, AtomicStorage>>> = OnceLock::new();

struct Shared(Arc<Registry<Key, AtomicStorage>>);

impl Recorder for Shared {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        self.0
            .get_or_create_counter(key, |c| Counter::from_arc(c.clone()))
    }

    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        self.0
            .get_or_create_gauge(key, |g| Gauge::from_arc(g.clone()))
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        self.0
            .get_or_create_histogram(key, |h| Histogram::from_arc(h.clone()))
    }
}

/// Installs the shared recorder as the global one (first call; later calls do nothing).
///
/// Call it before building the object under test: the crates register their instruments
/// when they are built, and an instrument registered before any recorder stays a no-op.
///
/// # Panics
/// If another global recorder was installed first.
pub fn install() {
    REGISTRY.get_or_init(|| {
        let registry = Arc::new(Registry::atomic());
        if metrics::set_global_recorder(Shared(registry.clone())).is_err() {
            panic!("another global metrics recorder is installed");
        }
        registry
    });
}

fn registry() -> &'static Registry<Key, AtomicStorage> {
    install();
    match REGISTRY.get() {
        Some(registry) => registry,
        None => unreachable!("installed above"),
    }
}

fn matches(key: &Key, name: &str, labels: &[(&str, &str)]) -> bool {
    key.name() == name
        && labels
            .iter()
            .all(|(k, v)| key.labels().any(|l| l.key() == *k && l.value() == *v))
}

/// Sum of the counters named `name` whose labels include all of `labels` (0 if none).
pub fn counter(name: &str, labels: &[(&str, &str)]) -> u64 {
    let mut sum = 0;
    registry().visit_counters(|key, c: &Arc<AtomicU64>| {
        if matches(key, name, labels) {
            sum += c.load(Ordering::Relaxed);
        }
    });
    sum
}

/// The gauge named `name` with all of `labels`, `None` if it was never registered (the
/// first match when several series match).
pub fn gauge(name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut value = None;
    registry().visit_gauges(|key, g: &Arc<AtomicU64>| {
        if value.is_none() && matches(key, name, labels) {
            value = Some(f64::from_bits(g.load(Ordering::Relaxed)));
        }
    });
    value
}

/// Every value recorded so far by the histograms named `name` with all of `labels`.
pub fn histogram(name: &str, labels: &[(&str, &str)]) -> Vec<f64> {
    let mut values = Vec::new();
    registry().visit_histograms(|key, h| {
        if matches(key, name, labels) {
            values.extend(h.data());
        }
    });
    values
}
