//! Stock written before `MAX_STOCK` existed (or by hand) beyond the limits: the scripts
//! refuse to touch such a SKU instead of failing halfway, and it does not hold up other
//! SKUs' reservations or expiries.

use std::time::Duration;

use eventful_reservation::{
    Error, RedisReservations, ReservationState, ReservationStore, StockLevel,
};
use eventful_test_support::{wait_until, TestRedis};

#[tokio::test]
async fn stock_beyond_the_limit_in_redis_is_refused_whole() {
    let redis = TestRedis::connect().await;
    let store = RedisReservations::builder(redis.url.as_str())
        .key_prefix(redis.prefix.clone())
        .namespace("limits")
        .connect()
        .await
        .unwrap();
    let mut conn = redis.connection_manager().await;
    for sku in ["a", "c"] {
        store.set_stock(sku, 10).await.unwrap();
    }
    let ttl = Duration::from_millis(40);
    store
        .reserve("bad", &[("a", 1), ("c", 1)], ttl)
        .await
        .unwrap();
    store.reserve("good", &[("a", 2)], ttl).await.unwrap();
    // What set_stock(b, u64::MAX) stored before the limit; and a level pushed past it.
    let _: () = redis::cmd("HSET")
        .arg(store.stock_key("b"))
        .arg(&[
            "available",
            "18446744073709551615",
            "held",
            "0",
            "sold",
            "0",
        ])
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = redis::cmd("HSET")
        .arg(store.stock_key("c"))
        .arg(&["available", "9007199254740991"])
        .query_async(&mut conn)
        .await
        .unwrap();

    match store.reserve("r", &[("a", 1), ("b", 1)], ttl).await {
        Err(Error::StockLimit { sku, available, .. }) => {
            assert_eq!((sku.as_str(), available), ("b", u64::MAX))
        }
        other => panic!("expected StockLimit, got {other:?}"),
    }
    assert_eq!(store.stock("a").await.unwrap(), StockLevel::new(7, 3, 0));
    assert!(store.reservation("r").await.unwrap().is_none());

    wait_until(
        "the holds are past their deadline",
        Duration::from_secs(10),
        || async {
            store.reservation("good").await.unwrap().unwrap().state == ReservationState::Expired
        },
    )
    .await;
    // `bad` cannot return its unit of `c` without passing the limit: it stays held, and
    // neither `a` of `bad` nor the other hold is touched halfway or held up.
    assert_eq!(store.reap_expired(10).await.unwrap(), 1);
    assert_eq!(store.stock("a").await.unwrap(), StockLevel::new(9, 1, 0));
    assert!(matches!(
        store.release("bad").await,
        Err(Error::StockLimit { .. })
    ));
    assert_eq!(store.stock("a").await.unwrap(), StockLevel::new(9, 1, 0));
    // set_stock repairs it; then the hold expires normally.
    store.set_stock("c", 100).await.unwrap();
    assert_eq!(store.reap_expired(10).await.unwrap(), 1);
    assert_eq!(store.stock("a").await.unwrap(), StockLevel::new(10, 0, 0));
    assert_eq!(store.stock("c").await.unwrap(), StockLevel::new(101, 0, 0));
}
