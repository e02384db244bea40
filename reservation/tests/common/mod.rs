//! The contention harness: many tasks reserving, confirming, releasing and abandoning
//! holds on a few hot SKUs while samplers check the stock invariants.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eventful_reservation::{Error, Reaper, ReservationState, ReservationStore};
use eventful_test_support::wait_until;
use futures::StreamExt;
use rand::Rng;
use tokio_util::sync::CancellationToken;

/// What a client was told about one reservation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Told {
    /// reserve refused (insufficient stock): nothing may exist.
    Refused,
    /// Held and left to expire.
    Abandoned,
    /// confirm answered Ok.
    Confirmed,
    /// confirm answered Expired.
    ConfirmExpired,
    /// release answered Ok (Released or Expired).
    Released,
    /// A call failed with a retryable error: the outcome is unknown to the client.
    Unknown,
}

pub(crate) struct Config {
    pub(crate) tasks: usize,
    pub(crate) duration: Duration,
    pub(crate) skus: Vec<String>,
    pub(crate) initial: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            tasks: 64,
            duration: Duration::from_secs(5),
            skus: (0..4).map(|i| format!("hot-{i}")).collect(),
            initial: 40,
        }
    }
}

pub(crate) struct Report {
    /// Stock added per SKU by the restocker during the run.
    pub(crate) added: HashMap<String, u64>,
    pub(crate) operations: u64,
    pub(crate) samples: u64,
    pub(crate) retryable_errors: u64,
    pub(crate) ops_after_disruption: u64,
    pub(crate) told: HashMap<String, (Told, Vec<(String, u64)>)>,
}

/// Runs the workload; `disruption` runs concurrently (e.g. restarts Redis) and the run
/// records how many operations succeeded after it finished.
pub(crate) async fn run<D>(
    store: Arc<dyn ReservationStore>,
    config: Config,
    disruption: D,
) -> Report
where
    D: Future<Output = ()>,
{
    for sku in &config.skus {
        store
            .set_stock(sku, config.initial)
            .await
            .expect("set stock");
    }
    let cancel = CancellationToken::new();
    // Two reapers at once, as two processes would run them.
    let reapers: Vec<_> = (0..2)
        .map(|_| {
            Reaper::new(store.clone())
                .interval(Duration::from_millis(50))
                .batch_size(16)
                .spawn(cancel.clone())
        })
        .collect();

    let stop = Arc::new(AtomicBool::new(false));
    let disrupted = Arc::new(AtomicBool::new(false));
    let operations = Arc::new(AtomicU64::new(0));
    let after = Arc::new(AtomicU64::new(0));
    let retryable = Arc::new(AtomicU64::new(0));
    let samples = Arc::new(AtomicU64::new(0));
    let told = Arc::new(Mutex::new(HashMap::new()));
    // Stock added by the restocker. It is the only writer of totals; it holds the write
    // side of `totals` while changing a total, samplers the read side while sampling.
    let totals = Arc::new(tokio::sync::RwLock::new(
        config
            .skus
            .iter()
            .map(|s| (s.clone(), 0u64))
            .collect::<HashMap<_, _>>(),
    ));

    // The restocker keeps the hot SKUs from selling out for good, so contention (and
    // refusals) lasts the whole run.
    let restocker = {
        let (store, stop, totals) = (store.clone(), stop.clone(), totals.clone());
        let (skus, initial) = (config.skus.clone(), config.initial);
        tokio::spawn(async move {
            let top_up = initial / 2;
            while !stop.load(Ordering::Relaxed) {
                for sku in &skus {
                    let Ok(level) = store.stock(sku).await else {
                        continue;
                    };
                    // Only a sold-out SKU is topped up: until the next poll (20 ms) every
                    // reserve of it is refused, so refusals happen however fast the
                    // machine is (a higher threshold let a quiet machine run without any).
                    if level.available > 0 {
                        continue;
                    }
                    let mut added = totals.write().await;
                    let expected = initial + added[sku];
                    match store.adjust_stock(sku, top_up as i64).await {
                        Ok(_) => *added.get_mut(sku).unwrap() += top_up,
                        Err(e) if e.is_retryable() => {
                            // Unknown whether it applied (adjust is not idempotent and
                            // not retried): read the total, which nothing else changes.
                            let total = loop {
                                if let Ok(level) = store.stock(sku).await {
                                    break level.total();
                                }
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            };
                            assert!(
                                total == expected || total == expected + top_up,
                                "{sku}: total {total}, expected {expected}"
                            );
                            *added.get_mut(sku).unwrap() += total - expected;
                        }
                        Err(e) => panic!("adjust_stock: {e}"),
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    // Samplers: at every moment, per SKU, available + held + sold == initial, and no
    // quantity negative (a negative would fail to parse as u64 and surface as Protocol).
    let sampler = {
        let (store, stop, samples) = (store.clone(), stop.clone(), samples.clone());
        let (skus, initial, totals) = (config.skus.clone(), config.initial, totals.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let added = totals.read().await;
                for sku in &skus {
                    match store.stock(sku).await {
                        Ok(level) => {
                            assert_eq!(
                                level.total(),
                                initial + added[sku],
                                "{sku}: invariant broken at a sample: {level:?}"
                            );
                            samples.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) if e.is_retryable() => {}
                        Err(e) => panic!("{sku}: sampling failed: {e}"),
                    }
                }
                drop(added);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };

    let workers: Vec<_> = (0..config.tasks)
        .map(|task| {
            let store = store.clone();
            let skus = config.skus.clone();
            let (stop, disrupted) = (stop.clone(), disrupted.clone());
            let (operations, after, retryable, told) = (
                operations.clone(),
                after.clone(),
                retryable.clone(),
                told.clone(),
            );
            tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    // The in-memory store never waits: let the other tasks run.
                    tokio::task::yield_now().await;
                    n += 1;
                    let id = format!("t{task}-{n}");
                    let (items, ttl, action, delay, dup) = {
                        let mut rng = rand::rng();
                        let count = rng.random_range(1..=3usize);
                        let mut items: Vec<(String, u64)> = (0..count)
                            .map(|_| {
                                (
                                    skus[rng.random_range(0..skus.len())].clone(),
                                    rng.random_range(1..=3u64),
                                )
                            })
                            .collect();
                        items.sort();
                        // The store merges an SKU listed twice; record the merged list.
                        items.dedup_by(|next, kept| {
                            let same = next.0 == kept.0;
                            if same {
                                kept.1 += next.1;
                            }
                            same
                        });
                        let ttl = Duration::from_millis(rng.random_range(60..250));
                        // The delay before confirming may cross the deadline: confirm races expiry.
                        let delay = Duration::from_millis(rng.random_range(0..300));
                        (
                            items,
                            ttl,
                            rng.random_range(0..100u32),
                            delay,
                            rng.random_bool(0.2),
                        )
                    };
                    let refs: Vec<(&str, u64)> =
                        items.iter().map(|(s, q)| (s.as_str(), *q)).collect();
                    let mut outcome = match store.reserve(&id, &refs, ttl).await {
                        // The reserve ran, its reply was lost to the restart, and the
                        // automatic retry (same id) found it already past its deadline:
                        // the existing reservation is reported, expired, nothing more held.
                        Ok(r) if r.state == ReservationState::Expired => Told::Abandoned,
                        Ok(r) => {
                            assert_eq!(r.state, ReservationState::Held);
                            if dup {
                                // A client retry: the same reservation, nothing more held.
                                match store.reserve(&id, &refs, ttl).await {
                                    Ok(again) => assert_eq!(again.expires_at, r.expires_at),
                                    Err(e) => assert!(e.is_retryable(), "{e}"),
                                }
                            }
                            Told::Abandoned
                        }
                        Err(Error::InsufficientStock { .. }) => Told::Refused,
                        Err(e) if e.is_retryable() => Told::Unknown,
                        Err(e) => panic!("reserve: {e}"),
                    };
                    if outcome == Told::Abandoned && action < 70 {
                        let confirm = action < 40;
                        tokio::time::sleep(delay).await;
                        let calls = if dup { 2 } else { 1 };
                        for _ in 0..calls {
                            outcome = if confirm {
                                match store.confirm(&id).await {
                                    Ok(_) => Told::Confirmed,
                                    Err(Error::Expired { .. }) => Told::ConfirmExpired,
                                    Err(e) if e.is_retryable() => Told::Unknown,
                                    Err(e) => panic!("confirm: {e}"),
                                }
                            } else {
                                match store.release(&id).await {
                                    Ok(_) => Told::Released,
                                    Err(e) if e.is_retryable() => Told::Unknown,
                                    Err(e) => panic!("release: {e}"),
                                }
                            };
                        }
                    }
                    if outcome == Told::Unknown {
                        retryable.fetch_add(1, Ordering::Relaxed);
                    } else {
                        operations.fetch_add(1, Ordering::Relaxed);
                        if disrupted.load(Ordering::Relaxed) {
                            after.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    // Keep every reservation that held something, and a sample of refusals.
                    if outcome != Told::Refused || n.is_multiple_of(50) {
                        told.lock().unwrap().insert(id, (outcome, items));
                    }
                }
            })
        })
        .collect();

    let timer = tokio::time::sleep(config.duration);
    tokio::pin!(timer);
    let disruption = async {
        disruption.await;
        disrupted.store(true, Ordering::Relaxed);
    };
    tokio::pin!(disruption);
    let mut disruption_done = false;
    loop {
        tokio::select! {
            () = &mut timer => break,
            () = &mut disruption, if !disruption_done => disruption_done = true,
        }
    }
    assert!(
        disruption_done,
        "the disruption did not finish within the run"
    );
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.await.expect("worker panicked");
    }
    sampler.await.expect("sampler panicked");
    restocker.await.expect("restocker panicked");

    // Every hold ends: after the reapers catch up, nothing is held any more.
    let skus = config.skus.clone();
    wait_until(
        "every hold is confirmed, released or expired",
        Duration::from_secs(20),
        || {
            let (store, skus) = (store.clone(), skus.clone());
            async move {
                for sku in &skus {
                    match store.stock(sku).await {
                        Ok(level) if level.held == 0 => {}
                        _ => return false,
                    }
                }
                true
            }
        },
    )
    .await;
    cancel.cancel();
    for reaper in reapers {
        reaper.await.expect("reaper panicked");
    }

    let told = std::mem::take(&mut *told.lock().unwrap());
    let added = totals.read().await.clone();
    Report {
        added,
        operations: operations.load(Ordering::Relaxed),
        samples: samples.load(Ordering::Relaxed),
        retryable_errors: retryable.load(Ordering::Relaxed),
        ops_after_disruption: after.load(Ordering::Relaxed),
        told,
    }
}

/// The end-state checks: per SKU the totals balance, nothing is held, `sold` equals the
/// confirmed reservations' quantities, and every answer a client got is what the store
/// recorded (no acknowledged outcome lost or changed).
pub(crate) async fn check_end_state(
    store: &dyn ReservationStore,
    config: &Config,
    report: &Report,
) {
    let mut sold_by_records: HashMap<String, u64> = HashMap::new();
    let mut finals: HashMap<ReservationState, u64> = HashMap::new();
    let records: Vec<_> = futures::stream::iter(report.told.iter())
        .map(|(id, told)| async move {
            (
                id,
                told,
                store.reservation(id).await.expect("read reservation"),
            )
        })
        .buffer_unordered(64)
        .collect()
        .await;
    for (id, (told, items), record) in records {
        let Some(record) = record else {
            assert!(
                matches!(told, Told::Refused | Told::Unknown),
                "{id}: the client was told {told:?} but the store has no record"
            );
            continue;
        };
        assert_ne!(*told, Told::Refused, "{id}: refused but recorded");
        assert!(record.state.is_final(), "{id} still {:?}", record.state);
        assert_eq!(&record.items, items, "{id}: items");
        *finals.entry(record.state).or_default() += 1;
        match *told {
            Told::Confirmed => assert_eq!(
                record.state,
                ReservationState::Confirmed,
                "{id}: acknowledged confirm lost"
            ),
            Told::ConfirmExpired => assert_eq!(record.state, ReservationState::Expired, "{id}"),
            Told::Released => assert!(
                matches!(
                    record.state,
                    ReservationState::Released | ReservationState::Expired
                ),
                "{id}: acknowledged release became {:?}",
                record.state
            ),
            Told::Abandoned => assert!(
                matches!(record.state, ReservationState::Expired),
                "{id}: abandoned hold became {:?}",
                record.state
            ),
            Told::Refused | Told::Unknown => {}
        }
        if record.state == ReservationState::Confirmed {
            for (sku, qty) in items {
                *sold_by_records.entry(sku.clone()).or_default() += qty;
            }
        }
    }
    for sku in &config.skus {
        let level = store.stock(sku).await.expect("stock");
        assert_eq!(
            level.total(),
            config.initial + report.added[sku],
            "{sku}: {level:?}"
        );
        assert_eq!(level.held, 0, "{sku}: {level:?}");
        assert_eq!(
            level.sold,
            sold_by_records.get(sku).copied().unwrap_or(0),
            "{sku}: sold != confirmed reservations"
        );
    }
    eprintln!(
        "contention: stock added {:?}, {} ops ({} retryable failures, {} after the disruption), {} samples, final states {finals:?}",
        report.added, report.operations, report.retryable_errors, report.ops_after_disruption, report.samples
    );
    let outcomes = |t: Told| report.told.values().filter(|(told, _)| *told == t).count();
    for t in [
        Told::Refused,
        Told::Confirmed,
        Told::ConfirmExpired,
        Told::Released,
        Told::Abandoned,
    ] {
        assert!(
            outcomes(t) > 0,
            "the run never produced {t:?}: the workload did not exercise it"
        );
    }
    assert!(
        report.samples > 100,
        "too few invariant samples: {}",
        report.samples
    );
}
