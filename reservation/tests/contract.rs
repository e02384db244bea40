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
        let redis = TestRedis::connect().await;
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
}
