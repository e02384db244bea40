//! The shared contract suite (`eventful_reservation::contract`) against both backends:
//! the in-memory store and the real Redis (a fresh key prefix per test).

mod in_memory {
    use eventful_reservation::InMemoryReservations;

    eventful_reservation::contract_tests!(async { InMemoryReservations::new() });

    #[tokio::test]
    async fn final_records_expire_after_retention() {
        let retention = std::time::Duration::from_millis(100);
        let store = InMemoryReservations::with_retention(retention);
        eventful_reservation::contract::final_records_expire_after_retention(&store, retention)
            .await;
    }
}

mod redis {
    use eventful_reservation::RedisReservations;
    use eventful_test_support::TestRedis;

    async fn store(coalesce: bool) -> RedisReservations {
        store_on(&TestRedis::connect().await, coalesce).await
    }

    async fn store_on(redis: &TestRedis, coalesce: bool) -> RedisReservations {
        RedisReservations::builder(redis.url.as_str())
            .key_prefix(redis.prefix.clone())
            .namespace("contract")
            .retention(std::time::Duration::from_secs(600))
            .coalesce(coalesce)
            .connect()
            .await
            .expect("connect to Redis")
    }

    eventful_reservation::contract_tests!(store(false));

    /// The same suite with request coalescing on: every call goes through the batch script.
    mod coalesced {
        eventful_reservation::contract_tests!(super::store(true));
    }

    #[tokio::test]
    async fn final_records_expire_after_retention() {
        let redis = TestRedis::connect().await;
        let retention = std::time::Duration::from_millis(100);
        let store = RedisReservations::builder(redis.url.as_str())
            .key_prefix(redis.prefix.clone())
            .retention(retention)
            .connect()
            .await
            .expect("connect to Redis");
        eventful_reservation::contract::final_records_expire_after_retention(&store, retention)
            .await;
    }

    /// The batch script and the single-call scripts share one record per reservation (a
    /// string, read and written in bulk by a batch): a reservation made by either path is
    /// the same reservation for the other — idempotent reserve, conflict on other items,
    /// settle once — and a final record keeps its retention.
    #[tokio::test]
    async fn batch_and_single_calls_share_each_reservation() {
        use eventful_reservation::{Error, ReservationState, ReservationStore, StockLevel};
        use std::time::Duration;
        let redis = TestRedis::connect().await;
        let single = store_on(&redis, false).await;
        let batched = store_on(&redis, true).await;
        let ttl = Duration::from_secs(600);
        single.set_stock("a", 10).await.unwrap();

        let first = single.reserve("r1", &[("a", 2)], ttl).await.unwrap();
        // Concurrent calls on the coalescing store: sent together when they queue.
        let (again, second, conflict) = tokio::join!(
            batched.reserve("r1", &[("a", 2)], ttl),
            batched.reserve("r2", &[("a", 3)], ttl),
            batched.reserve("r1", &[("a", 3)], ttl),
        );
        assert_eq!(again.unwrap(), first, "a batch sees the single call's hold");
        let second = second.unwrap();
        assert!(
            matches!(conflict, Err(Error::IdConflict { .. })),
            "{conflict:?}"
        );
        assert_eq!(
            single.reserve("r2", &[("a", 3)], ttl).await.unwrap(),
            second,
            "a single call sees the batch's hold"
        );
        assert_eq!(single.stock("a").await.unwrap(), StockLevel::new(5, 5, 0));

        let (confirmed, released) = tokio::join!(batched.confirm("r1"), batched.release("r2"));
        assert_eq!(confirmed.unwrap().state, ReservationState::Confirmed);
        assert_eq!(released.unwrap().state, ReservationState::Released);
        assert_eq!(
            single.confirm("r1").await.unwrap().state,
            ReservationState::Confirmed
        );
        assert!(matches!(
            single.confirm("r2").await,
            Err(Error::AlreadyReleased { .. })
        ));
        assert_eq!(
            single.reserve("r2", &[("a", 3)], ttl).await.unwrap().state,
            ReservationState::Released
        );
        assert_eq!(single.stock("a").await.unwrap(), StockLevel::new(8, 0, 2));

        let mut conn = redis
            .client
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        for id in ["r1", "r2"] {
            let ttl_ms: i64 = redis::cmd("PTTL")
                .arg(single.reservation_key(id))
                .query_async(&mut conn)
                .await
                .unwrap();
            assert!(
                (1..=600_000).contains(&ttl_ms),
                "{id}: a final record is kept for its retention, PTTL {ttl_ms}"
            );
        }
        let index: u64 = redis::cmd("ZCARD")
            .arg(single.expiries_key())
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(index, 0, "settled holds leave the expiry index");
    }

    /// A key of another type where a reservation record belongs (e.g. a hash written by an
    /// older version, or foreign data under the prefix) fails that call only, on either
    /// path, and is never overwritten; calls batched with it are unaffected.
    #[tokio::test]
    async fn foreign_data_at_a_reservation_key_fails_only_that_call() {
        use eventful_reservation::{ReservationState, ReservationStore, StockLevel};
        use std::time::Duration;
        let redis = TestRedis::connect().await;
        let single = store_on(&redis, false).await;
        let batched = store_on(&redis, true).await;
        let ttl = Duration::from_secs(600);
        single.set_stock("a", 10).await.unwrap();
        let mut conn = redis
            .client
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let _: () = redis::cmd("HSET")
            .arg(single.reservation_key("old"))
            .arg(&["state", "held", "items", r#"["a","1"]"#, "expires_at", "1"])
            .query_async(&mut conn)
            .await
            .unwrap();

        for (path, store) in [("single", &single), ("batched", &batched)] {
            let new_id = format!("new-{path}");
            let (old, new) = tokio::join!(
                store.reserve("old", &[("a", 1)], ttl),
                store.reserve(&new_id, &[("a", 1)], ttl),
            );
            let error = old.expect_err(path);
            assert!(!error.is_retryable(), "{path}: {error:?}");
            assert_eq!(new.unwrap().state, ReservationState::Held, "{path}");
            assert!(store.confirm("old").await.is_err(), "{path}");
        }
        let kind: String = redis::cmd("TYPE")
            .arg(single.reservation_key("old"))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(kind, "hash", "the foreign key was overwritten");
        assert_eq!(single.stock("a").await.unwrap(), StockLevel::new(8, 2, 0));
    }

    async fn index_members(redis: &TestRedis, store: &RedisReservations) -> u64 {
        let mut conn = redis
            .client
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        redis::cmd("ZCARD")
            .arg(store.expiries_key())
            .query_async(&mut conn)
            .await
            .unwrap()
    }

    async fn holds_counted(redis: &TestRedis, store: &RedisReservations) -> u64 {
        let mut conn = redis
            .client
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let holds: Option<u64> = redis::cmd("GET")
            .arg(store.holds_key())
            .query_async(&mut conn)
            .await
            .unwrap();
        holds.unwrap_or(0)
    }

    /// Sweeps `times` times with batches of 100; returns how many holds were expired.
    async fn sweep(store: &RedisReservations, times: usize) -> usize {
        use eventful_reservation::ReservationStore;
        let mut reaped = 0;
        for _ in 0..times {
            reaped += store.reap_expired(100).await.unwrap();
        }
        reaped
    }

    /// Waits until `id` reads as expired (its deadline passed, by the server's clock).
    async fn until_expired(store: &RedisReservations, id: &str) {
        use eventful_reservation::{ReservationState, ReservationStore};
        for _ in 0..500 {
            let state = store.reservation(id).await.unwrap().map(|r| r.state);
            if state == Some(ReservationState::Expired) {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("{id} never expired");
    }

    /// Holds a batch makes with one deadline are one member of the expiry index (one zset
    /// insert, not one per hold); the holds counter behind the active-holds gauge follows
    /// every hold made and ended; once the group is due and swept, nothing is left.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_of_holds_is_one_index_member_and_the_holds_counter_follows() {
        use eventful_reservation::{ReservationStore, StockLevel};
        let redis = TestRedis::connect().await;
        let store = store_on(&redis, true).await;
        store.set_stock("a", 100).await.unwrap();
        let ttl = std::time::Duration::from_millis(400);
        let held = futures::future::join_all((0..32).map(|i| {
            let store = store.clone();
            async move { store.reserve(&format!("h{i}"), &[("a", 1)], ttl).await }
        }))
        .await;
        assert!(held.iter().all(Result::is_ok));
        let members = index_members(&redis, &store).await;
        assert!(
            members < 32,
            "32 holds made at once took {members} index members"
        );
        assert_eq!(holds_counted(&redis, &store).await, 32);
        let settled = futures::future::join_all((0..16).map(|i| {
            let store = store.clone();
            async move {
                let id = format!("h{i}");
                if i < 10 {
                    store.confirm(&id).await
                } else {
                    store.release(&id).await
                }
            }
        }))
        .await;
        assert!(settled.iter().all(Result::is_ok));
        assert_eq!(holds_counted(&redis, &store).await, 16);
        until_expired(&store, "h31").await;
        let reaped = sweep(&store, 20).await;
        assert_eq!(reaped, 16);
        assert_eq!(store.stock("a").await.unwrap(), StockLevel::new(90, 0, 10));
        assert_eq!(
            index_members(&redis, &store).await,
            0,
            "the index is left empty"
        );
        assert_eq!(holds_counted(&redis, &store).await, 0);
    }

    /// Ids confirmed, forgotten after their retention and reserved again are still in the
    /// group they were first indexed in: when that group falls due, the new holds are not
    /// expired early, the reaper does not keep finding them (re-indexed together, each is
    /// its own member at its own deadline), and they expire at their own deadline.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_id_reused_after_retention_expires_at_its_own_deadline() {
        use eventful_reservation::{ReservationState, ReservationStore, StockLevel};
        use std::time::Duration;
        const FIRST: u64 = 24;
        const REUSED: u64 = 16;
        let redis = TestRedis::connect().await;
        let store = RedisReservations::builder(redis.url.as_str())
            .key_prefix(redis.prefix.clone())
            .namespace("reused")
            .retention(Duration::from_millis(100))
            .coalesce(true)
            .connect()
            .await
            .unwrap();
        store.set_stock("a", 100).await.unwrap();
        let reserve_all = |ids: Vec<String>, ttl: Duration| {
            let store = store.clone();
            async move {
                let calls = ids.into_iter().map(|id| {
                    let store = store.clone();
                    async move { store.reserve(&id, &[("a", 1)], ttl).await }
                });
                let results = futures::future::join_all(calls).await;
                assert!(results.iter().all(Result::is_ok), "{results:?}");
            }
        };
        let ids = |range: std::ops::Range<u64>, prefix: &str| -> Vec<String> {
            range.map(|i| format!("{prefix}{i}")).collect()
        };
        reserve_all(ids(0..FIRST, "x"), Duration::from_millis(600)).await;
        let members = index_members(&redis, &store).await;
        assert!(
            members < FIRST,
            "{FIRST} holds made at once took {members} index members"
        );
        for id in ids(0..REUSED, "x") {
            store.confirm(&id).await.unwrap();
        }
        let last = format!("x{}", REUSED - 1);
        for _ in 0..100 {
            if store.reservation(&last).await.unwrap().is_none() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for id in ids(0..REUSED, "x") {
            assert_eq!(
                store.reservation(&id).await.unwrap(),
                None,
                "{id} outlived its retention"
            );
        }
        let mut again = ids(0..REUSED, "x");
        again.extend(ids(0..3, "y"));
        reserve_all(again, Duration::from_secs(3)).await;
        until_expired(&store, "x23").await;
        // One sweep: the old group is split, its 8 holds still held expire, and the 16
        // reused ids (settled together) are each put back at their own deadline.
        assert_eq!(store.reap_expired(100).await.unwrap(), 8);
        for id in ids(0..REUSED, "x") {
            assert_eq!(
                store.reservation(&id).await.unwrap().unwrap().state,
                ReservationState::Held,
                "{id}"
            );
        }
        assert_eq!(store.stock("a").await.unwrap(), StockLevel::new(65, 19, 16));
        // Nothing else is due before the new deadline: the reaper finds nothing.
        let mut conn = redis
            .client
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let due: Vec<String> = redis::cmd("ZRANGEBYSCORE")
            .arg(store.expiries_key())
            .arg("-inf")
            .arg(now_ms)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(due.is_empty(), "still due: {due:?}");
        until_expired(&store, "y2").await;
        let reaped = sweep(&store, 10).await;
        assert_eq!(reaped, 19);
        assert_eq!(store.stock("a").await.unwrap(), StockLevel::new(84, 0, 16));
        assert_eq!(index_members(&redis, &store).await, 0);
        assert_eq!(holds_counted(&redis, &store).await, 0);
    }

    /// Holds of one batch that were all confirmed stay indexed in their group until its
    /// deadline; one sweep looks past them to the holds still due and leaves the index
    /// empty, so a reaper never stalls behind settled holds.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_sweep_looks_past_settled_holds_to_the_ones_due() {
        use eventful_reservation::{ReservationStore, StockLevel};
        use std::time::Duration;
        let redis = TestRedis::connect().await;
        let store = store_on(&redis, true).await;
        store.set_stock("a", 1000).await.unwrap();
        let ttl = Duration::from_millis(500);
        let held = futures::future::join_all((0..305).map(|i| {
            let store = store.clone();
            async move { store.reserve(&format!("s{i}"), &[("a", 1)], ttl).await }
        }))
        .await;
        assert!(held.iter().all(Result::is_ok));
        let confirmed = futures::future::join_all((0..300).map(|i| {
            let store = store.clone();
            async move { store.confirm(&format!("s{i}")).await }
        }))
        .await;
        assert!(confirmed.iter().all(Result::is_ok));
        assert!(
            index_members(&redis, &store).await < 300,
            "no group was made of 305 holds at once"
        );
        // The last holds made are the ones left: due last, behind the 300 settled ones.
        until_expired(&store, "s304").await;
        assert_eq!(
            store.reap_expired(10).await.unwrap(),
            5,
            "one sweep expires the 5 holds due past 300 settled ones"
        );
        assert_eq!(
            store.stock("a").await.unwrap(),
            StockLevel::new(700, 0, 300)
        );
        assert_eq!(index_members(&redis, &store).await, 0);
    }
}
