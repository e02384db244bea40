//! The order service's placement and expiry, called in-process: the library functions and the
//! HTTP router (`Router::oneshot`) over a real PostgreSQL database and Redis, without Kafka or
//! child processes. Each test has its own database and Redis key prefix.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use commerce::config::Settings;
use commerce::order::expiry::ExpiryScheduler;
use commerce::order::flow::OrderIds;
use commerce::order::request::{NewOrder, RequestLimits};
use commerce::order::{api, OrderService};
use commerce::service::ServiceBase;
use eventful_outbox::Outbox;
use eventful_reservation::{RedisReservations, ReservationState, ReservationStore};
use eventful_test_support::{wait_until, TestDatabase, TestRedis};
use serde_json::{json, Value};
use tower::ServiceExt as _;
use uuid::Uuid;

const SKU: &str = "SKU-1";

struct Harness {
    service: OrderService,
    store: RedisReservations,
    _db: TestDatabase,
}

impl Harness {
    /// An order service on a fresh database and Redis prefix, `stock` units of [`SKU`].
    async fn start(stock: u64, reservation_ttl: Duration) -> Self {
        eventful_test_support::init_tracing();
        let db = TestDatabase::create().await;
        sqlx::migrate!("./migrations/order")
            .run(&db.pool)
            .await
            .unwrap();
        let outbox = Outbox::new();
        outbox.migrate(&db.pool).await.unwrap();
        eventful_idempotency::migrate(&db.pool).await.unwrap();
        let redis = TestRedis::connect().await;
        let store = RedisReservations::builder(redis.url.as_str())
            .key_prefix(redis.prefix.clone())
            .namespace("orders")
            .connect()
            .await
            .unwrap();
        store.set_stock(SKU, stock).await.unwrap();
        let mut settings = Settings::from_env().unwrap();
        settings.reservation_ttl = reservation_ttl;
        let service = OrderService {
            base: ServiceBase {
                name: "order",
                settings,
                pool: db.pool.clone(),
                outbox,
            },
            reservations: Arc::new(store.clone()),
            limits: RequestLimits::default(),
        };
        Self {
            service,
            store,
            _db: db,
        }
    }

    fn pool(&self) -> &sqlx::PgPool {
        &self.service.base.pool
    }

    /// `POST /orders` through the service's router and the common layers.
    async fn post(&self, key: Option<&str>, body: &Value) -> (StatusCode, Value) {
        let app = commerce::http::with_common_layers(api::routes(self.service.clone()));
        let mut request = Request::post("/orders").header("content-type", "application/json");
        if let Some(key) = key {
            request = request.header("idempotency-key", key);
        }
        let response = app
            .oneshot(request.body(Body::from(body.to_string())).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    /// `(available, held, sold)` of [`SKU`].
    async fn stock(&self) -> (u64, u64, u64) {
        let level = self.store.stock(SKU).await.unwrap();
        (level.available, level.held, level.sold)
    }

    async fn count(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sql)
            .fetch_one(self.pool())
            .await
            .unwrap()
    }

    async fn status(&self, id: Uuid) -> String {
        sqlx::query_scalar("SELECT status FROM orders WHERE id = $1")
            .bind(id)
            .fetch_one(self.pool())
            .await
            .unwrap()
    }

    async fn reservation_state(&self, id: Uuid) -> Option<ReservationState> {
        self.store
            .reservation(&id.to_string())
            .await
            .unwrap()
            .map(|r| r.state)
    }

    /// Makes every insert into `orders` whose `total_amount` is `amount` fail, the way a
    /// database error midway through a request would.
    async fn fail_inserts_of_amount(&self, amount: i64) {
        sqlx::query(&format!(
            "CREATE FUNCTION fail_insert() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
             IF NEW.total_amount = {amount} THEN RAISE EXCEPTION 'injected failure'; END IF; \
             RETURN NEW; END $$"
        ))
        .execute(self.pool())
        .await
        .unwrap();
        sqlx::query(
            "CREATE TRIGGER fail_insert BEFORE INSERT ON orders \
             FOR EACH ROW EXECUTE FUNCTION fail_insert()",
        )
        .execute(self.pool())
        .await
        .unwrap();
    }

    async fn heal_inserts(&self) {
        sqlx::query("DROP TRIGGER fail_insert ON orders")
            .execute(self.pool())
            .await
            .unwrap();
    }
}

fn order_body(user: Uuid, amount: i64, quantity: u32) -> Value {
    json!({ "userId": user, "totalAmount": amount, "items": [{ "sku": SKU, "quantity": quantity }] })
}

fn ids(body: &Value) -> Vec<Uuid> {
    body.as_array()
        .unwrap_or_else(|| panic!("expected an array of ids, got {body}"))
        .iter()
        .map(|id| Uuid::parse_str(id.as_str().unwrap()).unwrap())
        .collect()
}

fn new_order(quantity: u32) -> NewOrder {
    NewOrder {
        user_id: Uuid::new_v4(),
        total_amount: 100,
        items: vec![commerce::events::OrderItem {
            sku: SKU.to_owned(),
            quantity,
        }],
    }
}

/// Issue #16 item 5: a reservation id whose hold was released (or expired) must never back an
/// order: placing under it takes a fresh hold or fails.
#[tokio::test]
async fn a_spent_reservation_id_never_backs_an_order() {
    let h = Harness::start(10, Duration::from_secs(600)).await;
    let orders = [new_order(2), new_order(3)];
    let ids = OrderIds::keyed("spent-key", &orders);
    // An earlier try held and released the first order's id; the second's expired.
    let (released, expired) = (ids.id(0, 0), ids.id(1, 0));
    h.store
        .reserve(&released.to_string(), &[(SKU, 2)], Duration::from_secs(600))
        .await
        .unwrap();
    h.store.release(&released.to_string()).await.unwrap();
    h.store
        .reserve(&expired.to_string(), &[(SKU, 3)], Duration::from_millis(50))
        .await
        .unwrap();
    wait_until("the hold expires", Duration::from_secs(10), || async {
        h.reservation_state(expired).await == Some(ReservationState::Expired)
    })
    .await;
    assert_eq!(h.store.reap_expired(10).await.unwrap(), 1);
    assert_eq!(h.stock().await, (10, 0, 0));

    let placed = h.service.place_orders(&ids, &orders).await.unwrap();
    assert_eq!(placed.len(), 2);
    for order in &placed {
        assert!(
            ![released, expired].contains(&order.id),
            "placed on a spent id"
        );
        assert_eq!(
            h.reservation_state(order.id).await,
            Some(ReservationState::Held),
            "order {} was placed on a reservation that holds nothing",
            order.id
        );
    }
    assert_eq!(h.stock().await, (5, 5, 0), "the orders' stock is held");

    // A retry of the same request finds the same orders and holds nothing more.
    let again = h.service.place_orders(&ids, &orders).await.unwrap();
    let ids_of =
        |orders: &[commerce::order::store::Order]| orders.iter().map(|o| o.id).collect::<Vec<_>>();
    assert_eq!(ids_of(&again), ids_of(&placed));
    assert_eq!(h.stock().await, (5, 5, 0));
    assert_eq!(h.count("SELECT count(*) FROM orders").await, 2);
}

/// An id derived for one order but found holding another (a fingerprint collision, simulated
/// by reusing one) is refused with a 422 naming the reused key; nothing more is held.
#[tokio::test]
async fn an_id_found_holding_another_order_is_a_reused_key() {
    let h = Harness::start(10, Duration::from_secs(600)).await;
    let fingerprint = Uuid::new_v4();
    let ids = OrderIds::Keyed {
        key: "k".to_owned(),
        fingerprint,
    };
    let first = h.service.place_orders(&ids, &[new_order(1)]).await.unwrap();
    assert_eq!(first.len(), 1);
    // Same items (so Redis sees the same reservation), another user.
    let error = h
        .service
        .place_orders(&ids, &[new_order(1)])
        .await
        .unwrap_err();
    assert_eq!(error.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(error.code, "idempotency_key_reused");
    // Other items: Redis refuses the id.
    let error = h
        .service
        .place_orders(&ids, &[new_order(4)])
        .await
        .unwrap_err();
    assert_eq!(error.code, "idempotency_key_reused");
    assert_eq!(h.stock().await, (9, 1, 0));
    assert_eq!(h.count("SELECT count(*) FROM orders").await, 1);
}

/// Issue #16 item 5 over HTTP: a keyed `POST /orders` whose insert failed (500, hold released)
/// and is retried with the same key places an order that holds its stock.
#[tokio::test]
async fn a_keyed_retry_after_a_failed_insert_holds_the_stock_again() {
    let h = Harness::start(10, Duration::from_secs(600)).await;
    let body = json!([order_body(Uuid::new_v4(), 700, 3)]);
    h.fail_inserts_of_amount(700).await;
    let (status, answer) = h.post(Some("retry-key"), &body).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{answer}");
    assert_eq!(
        h.stock().await,
        (10, 0, 0),
        "the failed attempt holds nothing"
    );

    h.heal_inserts().await;
    let (status, answer) = h.post(Some("retry-key"), &body).await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    let placed = ids(&answer);
    assert_eq!(placed.len(), 1, "{answer}");
    assert_eq!(
        h.reservation_state(placed[0]).await,
        Some(ReservationState::Held),
        "the retried order must hold its stock"
    );
    assert_eq!(h.stock().await, (7, 3, 0));
    assert_eq!(h.status(placed[0]).await, "ORDER_RESERVED");
}

/// Issue #16 item 8: once the key's record is gone (TTL), the same key from another user
/// places that user's order; it never answers with the first user's order.
#[tokio::test]
async fn a_reused_key_from_another_user_never_answers_with_the_old_order() {
    let h = Harness::start(10, Duration::from_secs(600)).await;
    let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
    let (status, answer) = h
        .post(Some("shared-key"), &json!([order_body(alice, 500, 1)]))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    let first = ids(&answer);

    // The key's 24 h TTL passes.
    sqlx::query("DELETE FROM eventful_idempotency_keys")
        .execute(h.pool())
        .await
        .unwrap();
    let (status, answer) = h
        .post(Some("shared-key"), &json!([order_body(bob, 500, 1)]))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    let second = ids(&answer);
    assert_eq!(second.len(), 1, "{answer}");
    assert_ne!(second, first, "bob was answered with alice's order");
    let owner: Uuid = sqlx::query_scalar("SELECT user_id FROM orders WHERE id = $1")
        .bind(second[0])
        .fetch_one(h.pool())
        .await
        .unwrap();
    assert_eq!(owner, bob);
    assert_eq!(h.count("SELECT count(*) FROM orders").await, 2);
    assert_eq!(h.stock().await, (8, 2, 0));

    // The same user reusing the expired key for another order gets that order too.
    sqlx::query("DELETE FROM eventful_idempotency_keys")
        .execute(h.pool())
        .await
        .unwrap();
    let (status, answer) = h
        .post(Some("shared-key"), &json!([order_body(bob, 900, 1)]))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    let third = ids(&answer);
    assert!(third != first && third != second, "{answer}");
    assert_eq!(h.count("SELECT count(*) FROM orders").await, 3);
    assert_eq!(h.stock().await, (7, 3, 0));
}

/// Issue #16 item 9: a `POST /orders` whose third order fails in the database answers 500 and
/// leaves nothing behind: no order, no event, no held stock.
#[tokio::test]
async fn a_batch_failing_midway_places_nothing_and_holds_nothing() {
    let h = Harness::start(10, Duration::from_secs(600)).await;
    h.fail_inserts_of_amount(333).await;
    let body = json!([
        order_body(Uuid::new_v4(), 111, 1),
        order_body(Uuid::new_v4(), 222, 1),
        order_body(Uuid::new_v4(), 333, 1),
    ]);
    let (status, answer) = h.post(None, &body).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{answer}");
    assert_eq!(answer["error"]["code"], "internal", "{answer}");
    assert_eq!(
        h.count("SELECT count(*) FROM orders").await,
        0,
        "a 500 placed orders"
    );
    assert_eq!(
        h.count("SELECT count(*) FROM eventful_outbox").await,
        0,
        "a 500 recorded events"
    );
    assert_eq!(h.stock().await, (10, 0, 0), "a 500 left stock held");
}

/// Issue #16 item 10b, PostgreSQL ahead of Redis: an order whose `expires_at` has passed by
/// PostgreSQL's clock while Redis still holds its stock is not expired; it is once Redis's
/// deadline passes.
#[tokio::test]
async fn the_scheduler_keeps_an_order_whose_redis_hold_lives() {
    // Long enough to outlive the first round on a busy machine.
    let h = Harness::start(10, Duration::from_secs(3)).await;
    let (status, answer) = h
        .post(None, &json!([order_body(Uuid::new_v4(), 100, 2)]))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    let id = ids(&answer)[0];
    sqlx::query("UPDATE orders SET expires_at = now() - interval '1 hour' WHERE id = $1")
        .bind(id)
        .execute(h.pool())
        .await
        .unwrap();

    let scheduler = ExpiryScheduler::new(h.service.clone());
    let expired = scheduler.settle_due().await.unwrap();
    assert_eq!(expired, 0, "expired an order whose Redis hold lives");
    assert_eq!(h.status(id).await, "ORDER_RESERVED");
    assert_eq!(h.reservation_state(id).await, Some(ReservationState::Held));
    assert_eq!(h.stock().await, (8, 2, 0));

    wait_until(
        "Redis's deadline passes",
        Duration::from_secs(10),
        || async { h.reservation_state(id).await == Some(ReservationState::Expired) },
    )
    .await;
    assert_eq!(scheduler.settle_due().await.unwrap(), 1);
    assert_eq!(h.status(id).await, "ORDER_EXPIRED");
    assert_eq!(h.stock().await, (10, 0, 0));
}

/// Issue #16 item 10b, PostgreSQL behind Redis: Redis's deadline has passed but PostgreSQL's
/// clock says the order has a second left; the order is expired anyway.
#[tokio::test]
async fn the_scheduler_expires_an_order_redis_expired_while_postgres_lags() {
    let h = Harness::start(10, Duration::from_millis(300)).await;
    let (status, answer) = h
        .post(None, &json!([order_body(Uuid::new_v4(), 100, 2)]))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    let id = ids(&answer)[0];
    wait_until(
        "Redis expires the hold",
        Duration::from_secs(10),
        || async { h.reservation_state(id).await == Some(ReservationState::Expired) },
    )
    .await;
    sqlx::query("UPDATE orders SET expires_at = now() + interval '1 second' WHERE id = $1")
        .bind(id)
        .execute(h.pool())
        .await
        .unwrap();

    let scheduler = ExpiryScheduler::new(h.service.clone());
    let expired = scheduler.settle_due().await.unwrap();
    assert_eq!(expired, 1, "Redis expired the hold; the order must follow");
    assert_eq!(h.status(id).await, "ORDER_EXPIRED");
    assert_eq!(h.stock().await, (10, 0, 0));
}

/// A transition's history row is written exactly when the versioned update wins: a stale
/// version changes nothing and writes no history; a new order gets its `created` row, and
/// inserting an existing id writes none.
#[tokio::test]
async fn a_stale_version_transition_changes_nothing_and_writes_no_history() {
    use commerce::order::domain::OrderStatus;
    use commerce::order::store;

    let h = Harness::start(10, Duration::from_secs(600)).await;
    let placed = h
        .service
        .place_orders(&OrderIds::Fresh, &[new_order(1)])
        .await
        .unwrap();
    let order = placed[0].clone();
    let pool = h.pool().clone();
    let history = |id: Uuid| {
        let pool = pool.clone();
        async move {
            let mut conn = pool.acquire().await.unwrap();
            store::history(&mut conn, id)
                .await
                .unwrap()
                .into_iter()
                .map(|t| (t.version, t.from_status, t.to_status, t.reason))
                .collect::<Vec<_>>()
        }
    };
    let created = (1, None, "ORDER_RESERVED".to_owned(), "created".to_owned());
    assert_eq!(history(order.id).await, std::slice::from_ref(&created));

    let mut conn = h.pool().acquire().await.unwrap();
    // The same id again: no order, no second `created` row.
    let again = store::insert(
        &mut conn,
        order.id,
        order.user_id,
        order.total_amount,
        &order.items,
        order.expires_at,
    )
    .await
    .unwrap();
    assert!(again.is_none());
    let paid = store::transition(&mut conn, &order, OrderStatus::Paid, "payment approved")
        .await
        .unwrap()
        .expect("the current version wins");
    assert_eq!((paid.status, paid.version), (OrderStatus::Paid, 2));
    // `order` is version 1 now: the update matches no row, so no history row either.
    let stale = store::transition(&mut conn, &order, OrderStatus::OrderCanceled, "late")
        .await
        .unwrap();
    assert!(stale.is_none(), "a stale version must lose");
    let now = store::find(&mut conn, order.id).await.unwrap().unwrap();
    assert_eq!((now.status, now.version), (OrderStatus::Paid, 2));
    drop(conn);
    assert_eq!(
        history(order.id).await,
        [
            created,
            (
                2,
                Some("ORDER_RESERVED".to_owned()),
                "PAID".to_owned(),
                "payment approved".to_owned()
            )
        ]
    );
}
