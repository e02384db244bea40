//! The contract every [`ReservationStore`] backend must pass (feature `test-utils`).
//!
//! Plain public async functions that panic on a broken guarantee, in the style of
//! `object_store::integration`. Give each one a fresh, empty store; or let
//! [`contract_tests!`](crate::contract_tests) generate one `#[tokio::test]` per function:
//!
//! ```
//! use eventful_reservation::InMemoryReservations;
//!
//! eventful_reservation::contract_tests!(async { InMemoryReservations::new() });
//! # fn main() {}
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::future::Future;
use std::time::{Duration, Instant};

use crate::{Error, ReservationState, ReservationStore, StockLevel, MAX_QUANTITY, MAX_STOCK};

/// Generates one `#[tokio::test]` per contract function; `$factory` is an expression
/// evaluating to a future of a fresh store, evaluated once per test.
#[macro_export]
macro_rules! contract_tests {
    ($factory:expr) => {
        $crate::contract_tests!(@each $factory;
            stock_levels,
            reserve_confirm_release,
            all_or_nothing,
            idempotent_reserve,
            idempotent_confirm_and_release,
            expiry_returns_stock,
            confirm_after_deadline_expires_it,
            reap_in_bounded_batches,
            concurrent_reapers_expire_each_hold_once,
            confirm_races_expiry,
            no_oversell_under_concurrency,
            invalid_input,
            stock_limit_is_refused,
            overflowing_reserve_holds_nothing,
            expiry_cannot_be_poisoned,
            batch_mixed_outcomes,
            batch_duplicate_ids,
            batch_concurrent_settlements,
            batch_holds_expire_in_bounded_sweeps
        );
    };
    (@each $factory:expr; $($name:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let store = $factory.await;
                $crate::contract::$name(&store).await;
            }
        )*
    };
}

async fn eventually<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    while !condition().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn level(store: &dyn ReservationStore, sku: &str) -> StockLevel {
    store.stock(sku).await.expect("stock")
}

const HOUR: Duration = Duration::from_secs(3600);

/// Stock can be set, adjusted, read; never below zero; unknown SKUs are typed errors.
pub async fn stock_levels(store: &dyn ReservationStore) {
    assert!(matches!(store.stock("nope").await, Err(Error::UnknownSku { sku }) if sku == "nope"));
    assert!(matches!(
        store.adjust_stock("nope", 1).await,
        Err(Error::UnknownSku { .. })
    ));
    assert_eq!(
        store.set_stock("a", 10).await.unwrap(),
        StockLevel::new(10, 0, 0)
    );
    assert_eq!(
        store.adjust_stock("a", 5).await.unwrap(),
        StockLevel::new(15, 0, 0)
    );
    assert_eq!(
        store.adjust_stock("a", -15).await.unwrap(),
        StockLevel::new(0, 0, 0)
    );
    match store.adjust_stock("a", -1).await {
        Err(Error::InsufficientStock {
            sku,
            requested: 1,
            available: 0,
        }) => assert_eq!(sku, "a"),
        other => panic!("expected InsufficientStock, got {other:?}"),
    }
    assert_eq!(level(store, "a").await, StockLevel::new(0, 0, 0));
    // set_stock keeps held and sold.
    store.set_stock("a", 3).await.unwrap();
    store.reserve("r", &[("a", 2)], HOUR).await.unwrap();
    assert_eq!(
        store.set_stock("a", 7).await.unwrap(),
        StockLevel::new(7, 2, 0)
    );
}

/// A hold moves stock to `held`; confirm moves it to `sold`; release back to `available`.
pub async fn reserve_confirm_release(store: &dyn ReservationStore) {
    store.set_stock("a", 10).await.unwrap();
    store.set_stock("b", 10).await.unwrap();
    let r = store
        .reserve("r1", &[("b", 2), ("a", 3)], HOUR)
        .await
        .unwrap();
    assert_eq!(r.id, "r1");
    assert_eq!(r.state, ReservationState::Held);
    assert_eq!(r.items, vec![("a".to_owned(), 3), ("b".to_owned(), 2)]);
    let now = std::time::SystemTime::now();
    assert!(
        r.expires_at > now + Duration::from_secs(3500)
            && r.expires_at < now + Duration::from_secs(3700)
    );
    assert_eq!(level(store, "a").await, StockLevel::new(7, 3, 0));
    assert_eq!(level(store, "b").await, StockLevel::new(8, 2, 0));
    assert_eq!(store.reservation("r1").await.unwrap(), Some(r.clone()));

    let confirmed = store.confirm("r1").await.unwrap();
    assert_eq!(confirmed.state, ReservationState::Confirmed);
    assert_eq!(level(store, "a").await, StockLevel::new(7, 0, 3));
    assert_eq!(level(store, "b").await, StockLevel::new(8, 0, 2));

    store.reserve("r2", &[("a", 7)], HOUR).await.unwrap();
    assert_eq!(level(store, "a").await, StockLevel::new(0, 7, 3));
    let released = store.release("r2").await.unwrap();
    assert_eq!(released.state, ReservationState::Released);
    assert_eq!(level(store, "a").await, StockLevel::new(7, 0, 3));
    assert_eq!(
        store.reservation("r2").await.unwrap().unwrap().state,
        ReservationState::Released
    );
    assert_eq!(store.reservation("never").await.unwrap(), None);
}

/// If one item is short nothing is held, and the error names the SKU and quantities.
pub async fn all_or_nothing(store: &dyn ReservationStore) {
    store.set_stock("plenty", 100).await.unwrap();
    store.set_stock("short", 2).await.unwrap();
    match store
        .reserve("r", &[("plenty", 5), ("short", 3)], HOUR)
        .await
    {
        Err(Error::InsufficientStock {
            sku,
            requested,
            available,
        }) => {
            assert_eq!((sku.as_str(), requested, available), ("short", 3, 2));
        }
        other => panic!("expected InsufficientStock, got {other:?}"),
    }
    match store
        .reserve("r", &[("plenty", 5), ("ghost", 1)], HOUR)
        .await
    {
        Err(Error::UnknownSku { sku }) => assert_eq!(sku, "ghost"),
        other => panic!("expected UnknownSku, got {other:?}"),
    }
    assert_eq!(level(store, "plenty").await, StockLevel::new(100, 0, 0));
    assert_eq!(level(store, "short").await, StockLevel::new(2, 0, 0));
    assert_eq!(
        store.reservation("r").await.unwrap(),
        None,
        "a refused reservation leaves no record"
    );
    // Duplicates count together: 2 + 1 > 2.
    assert!(matches!(
        store
            .reserve("r", &[("short", 2), ("short", 1)], HOUR)
            .await,
        Err(Error::InsufficientStock {
            requested: 3,
            available: 2,
            ..
        })
    ));
    // The same id can then be used for a reservation that fits.
    let r = store
        .reserve("r", &[("plenty", 5), ("short", 2)], HOUR)
        .await
        .unwrap();
    assert_eq!(r.state, ReservationState::Held);
    assert_eq!(level(store, "short").await, StockLevel::new(0, 2, 0));
}

/// Reserving a known id returns the existing reservation and holds nothing more.
pub async fn idempotent_reserve(store: &dyn ReservationStore) {
    store.set_stock("a", 10).await.unwrap();
    store.set_stock("b", 10).await.unwrap();
    let first = store
        .reserve("r", &[("a", 2), ("b", 1)], HOUR)
        .await
        .unwrap();
    for _ in 0..3 {
        // Same items in another order, or split: the same reservation.
        let again = store
            .reserve("r", &[("b", 1), ("a", 1), ("a", 1)], HOUR)
            .await
            .unwrap();
        assert_eq!(again, first);
    }
    assert_eq!(level(store, "a").await, StockLevel::new(8, 2, 0));
    assert!(matches!(
        store.reserve("r", &[("a", 3)], HOUR).await,
        Err(Error::IdConflict { reservation_id }) if reservation_id == "r"
    ));
    assert_eq!(level(store, "a").await, StockLevel::new(8, 2, 0));
    // After a final state, a retry reports that state and holds nothing.
    store.confirm("r").await.unwrap();
    let after = store
        .reserve("r", &[("a", 2), ("b", 1)], HOUR)
        .await
        .unwrap();
    assert_eq!(after.state, ReservationState::Confirmed);
    assert_eq!(level(store, "a").await, StockLevel::new(8, 0, 2));
}

/// Confirm / release twice are harmless; the other one after a final state is refused.
pub async fn idempotent_confirm_and_release(store: &dyn ReservationStore) {
    store.set_stock("a", 10).await.unwrap();
    store.reserve("c", &[("a", 1)], HOUR).await.unwrap();
    store.reserve("r", &[("a", 2)], HOUR).await.unwrap();
    for _ in 0..3 {
        assert_eq!(
            store.confirm("c").await.unwrap().state,
            ReservationState::Confirmed
        );
        assert_eq!(
            store.release("r").await.unwrap().state,
            ReservationState::Released
        );
    }
    assert_eq!(level(store, "a").await, StockLevel::new(9, 0, 1));
    assert!(
        matches!(store.confirm("r").await, Err(Error::AlreadyReleased { reservation_id }) if reservation_id == "r")
    );
    assert!(
        matches!(store.release("c").await, Err(Error::AlreadyConfirmed { reservation_id }) if reservation_id == "c")
    );
    assert!(matches!(
        store.confirm("x").await,
        Err(Error::ReservationNotFound { .. })
    ));
    assert!(matches!(
        store.release("x").await,
        Err(Error::ReservationNotFound { .. })
    ));
    assert_eq!(level(store, "a").await, StockLevel::new(9, 0, 1));
    assert!(!Error::AlreadyReleased {
        reservation_id: "r".into()
    }
    .is_retryable());
}

/// A hold past its TTL gives its stock back through `reap_expired`, without a release.
pub async fn expiry_returns_stock(store: &dyn ReservationStore) {
    store.set_stock("a", 5).await.unwrap();
    store.reserve("keep", &[("a", 1)], HOUR).await.unwrap();
    let short = store
        .reserve("gone", &[("a", 3)], Duration::from_millis(50))
        .await
        .unwrap();
    assert_eq!(level(store, "a").await, StockLevel::new(1, 4, 0));
    eventually("the short hold is past its deadline", || async {
        store.reservation("gone").await.unwrap().unwrap().state == ReservationState::Expired
    })
    .await;
    let reaped = store.reap_expired(10).await.unwrap();
    assert_eq!(reaped, 1, "only the expired hold is reaped");
    assert_eq!(store.reap_expired(10).await.unwrap(), 0);
    assert_eq!(level(store, "a").await, StockLevel::new(4, 1, 0));
    assert!(matches!(
        store.confirm("gone").await,
        Err(Error::Expired { .. })
    ));
    assert_eq!(
        store.release("gone").await.unwrap().state,
        ReservationState::Expired
    );
    let retry = store
        .reserve("gone", &[("a", 3)], Duration::from_millis(50))
        .await
        .unwrap();
    assert_eq!(retry.state, ReservationState::Expired);
    assert_eq!(retry.expires_at, short.expires_at);
    assert_eq!(level(store, "a").await, StockLevel::new(4, 1, 0));
    assert_eq!(
        store.confirm("keep").await.unwrap().state,
        ReservationState::Confirmed
    );
}

/// Confirm after the deadline is refused and expires the hold itself (stock back even
/// before any reaper ran); release and reserve-retry after the deadline do the same.
pub async fn confirm_after_deadline_expires_it(store: &dyn ReservationStore) {
    store.set_stock("a", 10).await.unwrap();
    let ttl = Duration::from_millis(30);
    for id in ["c", "r", "again"] {
        store.reserve(id, &[("a", 2)], ttl).await.unwrap();
    }
    eventually("the holds are past their deadline", || async {
        store.reservation("again").await.unwrap().unwrap().state == ReservationState::Expired
    })
    .await;
    assert!(
        matches!(store.confirm("c").await, Err(Error::Expired { reservation_id }) if reservation_id == "c")
    );
    assert_eq!(level(store, "a").await, StockLevel::new(6, 4, 0));
    assert_eq!(
        store.release("r").await.unwrap().state,
        ReservationState::Expired
    );
    assert_eq!(level(store, "a").await, StockLevel::new(8, 2, 0));
    assert_eq!(
        store
            .reserve("again", &[("a", 2)], ttl)
            .await
            .unwrap()
            .state,
        ReservationState::Expired
    );
    assert_eq!(level(store, "a").await, StockLevel::new(10, 0, 0));
    assert_eq!(
        store.reap_expired(100).await.unwrap(),
        0,
        "nothing left to reap"
    );
}

/// `reap_expired(n)` expires at most `n` holds per call.
pub async fn reap_in_bounded_batches(store: &dyn ReservationStore) {
    store.set_stock("a", 100).await.unwrap();
    for i in 0..25 {
        store
            .reserve(&format!("r{i}"), &[("a", 2)], Duration::from_millis(20))
            .await
            .unwrap();
    }
    store.reserve("live", &[("a", 1)], HOUR).await.unwrap();
    eventually("every short hold is past its deadline", || async {
        for i in 0..25 {
            let r = store.reservation(&format!("r{i}")).await.unwrap().unwrap();
            if r.state != ReservationState::Expired {
                return false;
            }
        }
        true
    })
    .await;
    assert_eq!(store.reap_expired(10).await.unwrap(), 10);
    assert_eq!(level(store, "a").await, StockLevel::new(69, 31, 0));
    assert_eq!(store.reap_expired(10).await.unwrap(), 10);
    assert_eq!(store.reap_expired(10).await.unwrap(), 5);
    assert_eq!(store.reap_expired(10).await.unwrap(), 0);
    assert_eq!(level(store, "a").await, StockLevel::new(99, 1, 0));
}

/// Several reapers at once expire every hold exactly once.
pub async fn concurrent_reapers_expire_each_hold_once(store: &dyn ReservationStore) {
    store.set_stock("a", 1000).await.unwrap();
    for i in 0..200 {
        store
            .reserve(&format!("r{i}"), &[("a", 1)], Duration::from_millis(20))
            .await
            .unwrap();
    }
    eventually("the last hold is past its deadline", || async {
        store.reservation("r199").await.unwrap().unwrap().state == ReservationState::Expired
    })
    .await;
    let reaper = || async {
        let mut total = 0;
        loop {
            let n = store.reap_expired(7).await.unwrap();
            if n == 0 {
                return total;
            }
            total += n;
        }
    };
    let (a, b, c, d) = tokio::join!(reaper(), reaper(), reaper(), reaper());
    assert_eq!(
        a + b + c + d,
        200,
        "each hold expired exactly once ({a}+{b}+{c}+{d})"
    );
    assert_eq!(level(store, "a").await, StockLevel::new(1000, 0, 0));
}

/// A confirm racing the expiry (and a reaper) resolves to exactly one outcome, and the
/// stock agrees with it.
pub async fn confirm_races_expiry(store: &dyn ReservationStore) {
    const ROUNDS: u64 = 60;
    store.set_stock("a", 1000).await.unwrap();
    let (mut confirmed, mut expired) = (0u64, 0u64);
    for round in 0..ROUNDS {
        let id = format!("race{round}");
        let ttl = Duration::from_millis(15);
        store.reserve(&id, &[("a", 1)], ttl).await.unwrap();
        // Confirm somewhere between well before and well after the deadline.
        let delay = Duration::from_millis(round % 30);
        let confirm = async {
            tokio::time::sleep(delay).await;
            store.confirm(&id).await
        };
        let reap = async {
            let start = Instant::now();
            let mut n = 0;
            while start.elapsed() < Duration::from_millis(40) {
                n += store.reap_expired(10).await.unwrap();
                tokio::task::yield_now().await;
            }
            n
        };
        let (outcome, reaped) = tokio::join!(confirm, reap);
        let state = store.reservation(&id).await.unwrap().unwrap().state;
        match outcome {
            Ok(r) => {
                assert_eq!(r.state, ReservationState::Confirmed);
                assert_eq!(state, ReservationState::Confirmed);
                assert_eq!(reaped, 0, "a confirmed hold was also reaped");
                confirmed += 1;
            }
            Err(Error::Expired { .. }) => {
                assert_eq!(state, ReservationState::Expired);
                expired += 1;
            }
            Err(e) => panic!("unexpected confirm outcome {e:?}"),
        }
        assert_eq!(
            level(store, "a").await,
            StockLevel::new(1000 - confirmed, 0, confirmed),
            "round {round}: stock disagrees with the outcomes"
        );
    }
    assert!(
        confirmed > 0 && expired > 0,
        "the race was not exercised: {confirmed} confirmed, {expired} expired"
    );
}

/// Many concurrent reservations on one SKU never hold more than the stock.
pub async fn no_oversell_under_concurrency(store: &dyn ReservationStore) {
    store.set_stock("hot", 50).await.unwrap();
    let attempts = (0..200).map(|i| async move {
        let id = format!("r{i}");
        match store.reserve(&id, &[("hot", 1)], HOUR).await {
            Ok(_) => Some(store.confirm(&id).await.unwrap()),
            Err(Error::InsufficientStock { .. }) => None,
            Err(e) => panic!("unexpected {e:?}"),
        }
    });
    let sold = futures::future::join_all(attempts)
        .await
        .into_iter()
        .flatten()
        .count();
    assert_eq!(sold, 50);
    assert_eq!(level(store, "hot").await, StockLevel::new(0, 0, 50));
}

/// Invalid input is refused before anything is written.
pub async fn invalid_input(store: &dyn ReservationStore) {
    store.set_stock("a", 10).await.unwrap();
    assert!(matches!(
        store.reserve("r", &[], HOUR).await,
        Err(Error::NoItems)
    ));
    assert!(matches!(
        store.reserve("r", &[("a", 0)], HOUR).await,
        Err(Error::InvalidQuantity { quantity: 0, .. })
    ));
    assert!(matches!(
        store.reserve("r", &[("a", 1)], Duration::ZERO).await,
        Err(Error::InvalidTtl(_))
    ));
    assert!(matches!(
        store.reserve("", &[("a", 1)], HOUR).await,
        Err(Error::InvalidId(_))
    ));
    assert!(matches!(
        store.reserve("r\0s", &[("a", 1)], HOUR).await,
        Err(Error::InvalidId(_))
    ));
    assert!(matches!(
        store.set_stock("", 1).await,
        Err(Error::InvalidId(_))
    ));
    assert_eq!(store.reservation("r").await.unwrap(), None);
    assert_eq!(level(store, "a").await, StockLevel::new(10, 0, 0));
}

/// `set_stock` / `adjust_stock` refuse to take a SKU's total above [`MAX_STOCK`], and a
/// refused call changes nothing; up to the limit everything works.
pub async fn stock_limit_is_refused(store: &dyn ReservationStore) {
    assert_eq!(
        store.set_stock("a", MAX_STOCK).await.unwrap(),
        StockLevel::new(MAX_STOCK, 0, 0)
    );
    for over in [MAX_STOCK + 1, i64::MAX as u64, u64::MAX] {
        match store.set_stock("b", over).await {
            Err(Error::StockLimit {
                sku,
                available,
                held: 0,
                sold: 0,
            }) => assert_eq!((sku.as_str(), available), ("b", over)),
            other => panic!("set_stock(b, {over}): expected StockLimit, got {other:?}"),
        }
    }
    assert!(
        matches!(store.stock("b").await, Err(Error::UnknownSku { .. })),
        "a refused set_stock created the SKU: {:?}",
        store.stock("b").await
    );
    for delta in [1, i64::MAX] {
        match store.adjust_stock("a", delta).await {
            Err(Error::StockLimit { sku, .. }) => assert_eq!(sku, "a"),
            other => panic!("adjust_stock(a, {delta}): expected StockLimit, got {other:?}"),
        }
    }
    assert_eq!(level(store, "a").await, StockLevel::new(MAX_STOCK, 0, 0));
    assert!(matches!(
        store.adjust_stock("a", i64::MIN).await,
        Err(Error::InsufficientStock { .. })
    ));
    assert_eq!(level(store, "a").await, StockLevel::new(MAX_STOCK, 0, 0));
    // Held and sold count towards the limit.
    store.set_stock("c", 10).await.unwrap();
    store.reserve("r", &[("c", 4)], HOUR).await.unwrap();
    match store.set_stock("c", MAX_STOCK - 3).await {
        Err(Error::StockLimit {
            available, held, ..
        }) => assert_eq!((available, held), (MAX_STOCK - 3, 4)),
        other => panic!("expected StockLimit, got {other:?}"),
    }
    assert_eq!(level(store, "c").await, StockLevel::new(6, 4, 0));
    assert_eq!(
        store.set_stock("c", MAX_STOCK - 4).await.unwrap(),
        StockLevel::new(MAX_STOCK - 4, 4, 0)
    );
    store.confirm("r").await.unwrap();
    assert_eq!(
        level(store, "c").await,
        StockLevel::new(MAX_STOCK - 4, 0, 4)
    );
    assert!(matches!(
        store.adjust_stock("c", 1).await,
        Err(Error::StockLimit { sold: 4, .. })
    ));
    assert_eq!(
        store.adjust_stock("c", -1).await.unwrap(),
        StockLevel::new(MAX_STOCK - 5, 0, 4)
    );
}

/// A reservation with one item that would overflow, or is invalid, holds nothing of the
/// others: `available + held + sold` is conserved for every SKU, and nothing is held
/// without a reservation holding it.
pub async fn overflowing_reserve_holds_nothing(store: &dyn ReservationStore) {
    store.set_stock("a", 10).await.unwrap();
    // Refused now. Before the limit it was stored, and every reserve of `a` with `b`
    // then failed halfway on Redis, leaving a unit of `a` held by no reservation.
    let huge = store.set_stock("b", u64::MAX).await;
    for attempt in 0..3 {
        let result = store.reserve("r", &[("a", 1), ("b", 1)], HOUR).await;
        let a = level(store, "a").await;
        match store.reservation("r").await.unwrap() {
            Some(r) => assert_eq!(
                (r.state, a),
                (ReservationState::Held, StockLevel::new(9, 1, 0)),
                "attempt {attempt}: {result:?}"
            ),
            None => assert_eq!(
                a,
                StockLevel::new(10, 0, 0),
                "attempt {attempt}: a refused reservation ({result:?}) left stock of `a` held"
            ),
        }
    }
    assert!(
        matches!(huge, Err(Error::StockLimit { .. })),
        "set_stock(b, u64::MAX): expected StockLimit, got {huge:?}"
    );
    // An invalid quantity beside a valid item: refused before anything is written.
    assert!(matches!(
        store
            .reserve("r2", &[("a", 1), ("c", MAX_QUANTITY + 1)], HOUR)
            .await,
        Err(Error::InvalidQuantity { .. })
    ));
    assert_eq!(store.reservation("r2").await.unwrap(), None);
    // At the limit everything still moves exactly.
    store.set_stock("max", MAX_STOCK).await.unwrap();
    let before = level(store, "a").await;
    store
        .reserve("big", &[("a", 1), ("max", MAX_QUANTITY)], HOUR)
        .await
        .unwrap();
    assert_eq!(level(store, "max").await, StockLevel::new(0, MAX_STOCK, 0));
    store.confirm("big").await.unwrap();
    assert_eq!(level(store, "max").await, StockLevel::new(0, 0, MAX_STOCK));
    let a = level(store, "a").await;
    assert_eq!((a.total(), a.sold), (before.total(), before.sold + 1));
}

/// Stock near the limit cannot poison expiry: after the holds expire every level still
/// reads, balances and stays within [`MAX_STOCK`], and a later expiry in the same store
/// is not stuck behind the first.
pub async fn expiry_cannot_be_poisoned(store: &dyn ReservationStore) {
    store.set_stock("a", 10).await.unwrap();
    store.set_stock("b", 10).await.unwrap();
    let ttl = Duration::from_millis(40);
    store.reserve("first", &[("a", 5)], ttl).await.unwrap();
    store.reserve("second", &[("b", 2)], ttl).await.unwrap();
    // With 5 held, `a` may have at most MAX_STOCK - 5 available.
    assert_eq!(
        store.set_stock("a", MAX_STOCK - 5).await.unwrap(),
        StockLevel::new(MAX_STOCK - 5, 5, 0)
    );
    // Both refused now; before the limit both were stored, and the expiry of `first`
    // then pushed `a` over MAX_STOCK, or failed halfway and stalled every later expiry.
    let at_limit = store.set_stock("a", MAX_STOCK).await;
    let too_big = store.set_stock("a", u64::MAX).await;
    eventually("both holds are past their deadline", || async {
        store.reservation("second").await.unwrap().unwrap().state == ReservationState::Expired
    })
    .await;
    let (mut reaped, mut errors) = (0, Vec::new());
    for _ in 0..5 {
        match store.reap_expired(10).await {
            Ok(n) => reaped += n,
            Err(e) => errors.push(e),
        }
    }
    let a = store.stock("a").await;
    let b = store.stock("b").await;
    assert!(
        matches!(&a, Ok(level) if level.held == 0 && level.total() <= MAX_STOCK),
        "stock(a) after expiry: {a:?} (reap errors: {errors:?})"
    );
    assert_eq!(
        b.unwrap(),
        StockLevel::new(10, 0, 0),
        "the later expiry was stuck (reap errors: {errors:?})"
    );
    assert_eq!((reaped, errors.len()), (2, 0), "reap errors: {errors:?}");
    assert_eq!(a.unwrap(), StockLevel::new(MAX_STOCK, 0, 0));
    assert!(
        matches!(at_limit, Err(Error::StockLimit { held: 5, .. })),
        "{at_limit:?}"
    );
    assert!(
        matches!(too_big, Err(Error::StockLimit { .. })),
        "{too_big:?}"
    );
}

/// Final reservations stay readable (and retries idempotent) for the store's retention,
/// then are forgotten; holds are never forgotten before they end. Call with a store
/// configured with a short `retention` (well under a second).
pub async fn final_records_expire_after_retention(
    store: &dyn ReservationStore,
    retention: Duration,
) {
    store.set_stock("a", 10).await.unwrap();
    store.reserve("done", &[("a", 1)], HOUR).await.unwrap();
    store
        .reserve(
            "live",
            &[("a", 1)],
            Duration::from_millis(200) + retention * 3,
        )
        .await
        .unwrap();
    store.confirm("done").await.unwrap();
    // Right after, a retry sees the outcome.
    assert_eq!(
        store.confirm("done").await.unwrap().state,
        ReservationState::Confirmed
    );
    eventually("the final record is forgotten", || async {
        store.reservation("done").await.unwrap().is_none()
    })
    .await;
    assert!(matches!(
        store.confirm("done").await,
        Err(Error::ReservationNotFound { .. })
    ));
    // The live hold outlived the retention period of final records.
    assert_eq!(
        store.reservation("live").await.unwrap().unwrap().state,
        ReservationState::Held
    );
    assert_eq!(level(store, "a").await, StockLevel::new(8, 1, 1));
}

/// Many reservations at once on one hot SKU (a coalescing backend sends them as batches):
/// each gets its own answer — held, refused for stock with the available count it was
/// evaluated against, or refused for an unknown SKU of its own — and no refusal decides
/// another call's outcome.
pub async fn batch_mixed_outcomes(store: &dyn ReservationStore) {
    store.set_stock("hot", 10).await.unwrap();
    store.set_stock("other", 100).await.unwrap();
    let calls = (0..40u64).map(|i| async move {
        let id = format!("m{i}");
        let qty = if i % 2 == 0 { 1 } else { 3 };
        let items: Vec<(&str, u64)> = match i % 5 {
            0 => vec![("hot", qty), ("ghost", 1)],
            1 => vec![("hot", qty), ("other", 2)],
            _ => vec![("hot", qty)],
        };
        let result = store.reserve(&id, &items, HOUR).await;
        (i, id, qty, result)
    });
    let results = futures::future::join_all(calls).await;
    let (mut held_hot, mut held_other, mut refused) = (0, 0, Vec::new());
    for (i, id, qty, result) in results {
        let record = store.reservation(&id).await.unwrap();
        match result {
            Ok(r) => {
                assert_ne!(i % 5, 0, "{id}: held with an unknown SKU");
                assert_eq!(r.state, ReservationState::Held, "{id}");
                assert_eq!(record, Some(r), "{id}: the answer is not the record");
                held_hot += qty;
                if i % 5 == 1 {
                    held_other += 2;
                }
            }
            Err(Error::InsufficientStock {
                sku,
                requested,
                available,
            }) => {
                assert_eq!((sku.as_str(), requested), ("hot", qty), "{id}");
                assert!(
                    available < requested,
                    "{id}: refused with {available} available"
                );
                assert_eq!(record, None, "{id}: refused but recorded");
                refused.push(available);
            }
            Err(Error::UnknownSku { sku }) => {
                assert_eq!((sku.as_str(), i % 5), ("ghost", 0), "{id}");
                assert_eq!(record, None, "{id}: refused but recorded");
            }
            other => panic!("{id}: unexpected {other:?}"),
        }
    }
    let hot = level(store, "hot").await;
    assert_eq!(hot, StockLevel::new(10 - held_hot, held_hot, 0));
    assert!(
        held_hot > 0 && !refused.is_empty(),
        "no mix: {held_hot} held, {refused:?}"
    );
    // Stock only went down, so each refusal saw at least what is left now.
    assert!(
        refused.iter().all(|&available| available >= hot.available),
        "a refusal reported less than is available now ({hot:?}): {refused:?}"
    );
    assert_eq!(
        level(store, "other").await,
        StockLevel::new(100 - held_other, held_other, 0)
    );
}

/// One id sent many times at once (one batch, or several) is one reservation: every call
/// gets it, nothing more is held; the same id with other items is a conflict; concurrent
/// confirms and releases of one hold resolve to exactly one of them.
pub async fn batch_duplicate_ids(store: &dyn ReservationStore) {
    store.set_stock("a", 10).await.unwrap();
    store.set_stock("b", 10).await.unwrap();
    let same = (0..16).map(|i| async move {
        let items: &[(&str, u64)] = if i % 2 == 0 {
            &[("a", 2), ("b", 1)]
        } else {
            &[("b", 1), ("a", 1), ("a", 1)]
        };
        store.reserve("dup", items, HOUR).await
    });
    let results = futures::future::join_all(same).await;
    let first = results[0].as_ref().unwrap().clone();
    for result in &results {
        assert_eq!(result.as_ref().unwrap(), &first);
    }
    assert_eq!(level(store, "a").await, StockLevel::new(8, 2, 0));
    assert_eq!(level(store, "b").await, StockLevel::new(9, 1, 0));
    // Across batches: a later retry is the same reservation.
    assert_eq!(
        store
            .reserve("dup", &[("a", 2), ("b", 1)], HOUR)
            .await
            .unwrap(),
        first
    );

    // One id, other items, at once: one of them holds, every other call conflicts.
    let other = (0..8).map(|i| async move {
        let items: &[(&str, u64)] = if i % 2 == 0 { &[("a", 1)] } else { &[("b", 1)] };
        store.reserve("dup2", items, HOUR).await
    });
    let results = futures::future::join_all(other).await;
    let held: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert!(!held.is_empty(), "{results:?}");
    assert!(held.iter().all(|r| r.items == held[0].items), "{results:?}");
    for result in &results {
        assert!(
            matches!(result, Ok(_) | Err(Error::IdConflict { .. })),
            "{result:?}"
        );
    }
    let (a, b) = (level(store, "a").await, level(store, "b").await);
    assert_eq!(a.held + b.held, 4, "dup2 held more than once: {a:?} {b:?}");

    // Confirms and releases of one hold at once: one outcome, and everyone agrees.
    let settle = (0..10).map(|i| async move {
        if i % 2 == 0 {
            (true, store.confirm("dup").await)
        } else {
            (false, store.release("dup").await)
        }
    });
    let results = futures::future::join_all(settle).await;
    let confirmed = store.reservation("dup").await.unwrap().unwrap().state;
    for (confirm, result) in &results {
        match (confirmed, confirm, result) {
            (ReservationState::Confirmed, true, Ok(r)) => {
                assert_eq!(r.state, ReservationState::Confirmed)
            }
            (ReservationState::Confirmed, false, Err(Error::AlreadyConfirmed { .. })) => {}
            (ReservationState::Released, false, Ok(r)) => {
                assert_eq!(r.state, ReservationState::Released)
            }
            (ReservationState::Released, true, Err(Error::AlreadyReleased { .. })) => {}
            other => panic!("disagreeing outcome: {other:?}"),
        }
    }
    let sold = u64::from(confirmed == ReservationState::Confirmed);
    let a = level(store, "a").await;
    assert_eq!((a.total(), a.sold), (10, 2 * sold), "{a:?}");
}

/// Many confirms and releases at once, with duplicates and unknown ids among them: each
/// gets its own answer and the stock agrees with them.
pub async fn batch_concurrent_settlements(store: &dyn ReservationStore) {
    store.set_stock("a", 100).await.unwrap();
    let holds = (0..30).map(|i| async move {
        store
            .reserve(&format!("s{i}"), &[("a", 1)], HOUR)
            .await
            .unwrap()
    });
    futures::future::join_all(holds).await;
    assert_eq!(level(store, "a").await, StockLevel::new(70, 30, 0));
    let calls = (0..70).map(|n| async move {
        let i = n % 35;
        let id = format!("s{i}");
        let result = if i % 2 == 0 {
            store.confirm(&id).await
        } else {
            store.release(&id).await
        };
        (i, result)
    });
    for (i, result) in futures::future::join_all(calls).await {
        match (i, result) {
            (30.., Err(Error::ReservationNotFound { reservation_id })) => {
                assert_eq!(reservation_id, format!("s{i}"))
            }
            (..30, Ok(r)) if i % 2 == 0 => assert_eq!(r.state, ReservationState::Confirmed),
            (..30, Ok(r)) => assert_eq!(r.state, ReservationState::Released),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(level(store, "a").await, StockLevel::new(85, 0, 15));
}

/// Holds made at once with one deadline (a coalescing backend indexes a batch's holds
/// together), some of them confirmed or released before it: once due, sweeps of at most 7
/// expire exactly the ones still held, each once, and then find nothing more.
pub async fn batch_holds_expire_in_bounded_sweeps(store: &dyn ReservationStore) {
    store.set_stock("a", 1000).await.unwrap();
    let ttl = Duration::from_millis(300);
    let holds = (0..60).map(|i| async move {
        store
            .reserve(&format!("g{i}"), &[("a", 1)], ttl)
            .await
            .unwrap()
    });
    futures::future::join_all(holds).await;
    let settlements = (0..30).map(|i| async move {
        let id = format!("g{i}");
        if i < 20 {
            store.confirm(&id).await.unwrap().state
        } else {
            store.release(&id).await.unwrap().state
        }
    });
    for (i, state) in futures::future::join_all(settlements)
        .await
        .into_iter()
        .enumerate()
    {
        let expected = if i < 20 {
            ReservationState::Confirmed
        } else {
            ReservationState::Released
        };
        assert_eq!(state, expected, "g{i}");
    }
    assert_eq!(level(store, "a").await, StockLevel::new(950, 30, 20));
    eventually("the 30 holds left are past their deadline", || async {
        store.reservation("g59").await.unwrap().unwrap().state == ReservationState::Expired
    })
    .await;
    let (mut reaped, mut sweeps) = (0, 0);
    while reaped < 30 {
        let n = store.reap_expired(7).await.unwrap();
        assert!(n <= 7, "a sweep of at most 7 expired {n}");
        reaped += n;
        sweeps += 1;
        assert!(sweeps <= 30, "{reaped} of 30 expired after {sweeps} sweeps");
    }
    assert_eq!(reaped, 30);
    for _ in 0..10 {
        assert_eq!(store.reap_expired(7).await.unwrap(), 0);
    }
    assert_eq!(level(store, "a").await, StockLevel::new(980, 0, 20));
    for i in 0..60 {
        let state = store
            .reservation(&format!("g{i}"))
            .await
            .unwrap()
            .unwrap()
            .state;
        let expected = match i {
            0..20 => ReservationState::Confirmed,
            20..30 => ReservationState::Released,
            _ => ReservationState::Expired,
        };
        assert_eq!(state, expected, "g{i}");
    }
}
