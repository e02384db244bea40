//! End-to-end: the four real service binaries over HTTP, against the real PostgreSQL, Redis
//! and Kafka broker. Names start with `serial_`: each starts four processes, so
//! nextest runs them one at a time.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use eventful_test_support::{kafka, wait_until};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use serde_json::{json, Value};
use support::{user, Options, System, SERVICES, SKU};
use uuid::Uuid;

const FLOW: Duration = Duration::from_secs(60);

fn history(order: &Value) -> Vec<String> {
    order["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["toStatus"].as_str().unwrap().to_owned())
        .collect()
}

async fn notification_kinds(system: &System, order: Uuid, expected: usize) -> Vec<String> {
    let url = system.url("notification", &format!("/notifications?orderId={order}"));
    let fetch = || async {
        let response = system.http.get(&url).send().await.unwrap();
        let status = response.status();
        let list: Value = response.json().await.unwrap();
        list.as_array()
            .unwrap_or_else(|| panic!("GET {url} answered {status} with {list}"))
            .iter()
            .map(|n| n["kind"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    wait_until("the notifications arrive", FLOW, || async {
        fetch().await.len() >= expected
    })
    .await;
    let mut kinds = fetch().await;
    kinds.sort();
    kinds
}

async fn get_json(system: &System, service: &str, path: &str) -> (u16, Value) {
    let response = system
        .http
        .get(system.url(service, path))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread")]
async fn serial_happy_path_reaches_shipping() {
    let system = System::start(&SERVICES, Options::default()).await;
    system.set_stock(SKU, 10).await;
    let id = system.order(500, SKU, 2).await.expect("stock is there");

    let order = system.wait_status(id, "SHIPPING", FLOW).await;
    assert_eq!(order["version"], 3);
    assert_eq!(history(&order), ["ORDER_RESERVED", "PAID", "SHIPPING"]);
    assert_eq!(system.stock(SKU).await, (8, 0, 2));
    let (_, payment) = get_json(&system, "payment", &format!("/payments/{id}")).await;
    assert_eq!(payment["status"], "APPROVED");
    let (status, _) = get_json(&system, "shipping", &format!("/shipments/{id}")).await;
    assert_eq!(status, 200);
    assert_eq!(
        notification_kinds(&system, id, 3).await,
        ["ORDER_RESERVED", "PAYMENT_APPROVED", "SHIPPING_STARTED"]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn serial_declined_payment_cancels_the_order_and_returns_the_stock() {
    let system = System::start(&SERVICES, Options::default()).await;
    system.set_stock(SKU, 10).await;
    let id = system.order(5_000, SKU, 3).await.expect("stock is there");

    let order = system.wait_status(id, "ORDER_CANCELED", FLOW).await;
    assert_eq!(history(&order), ["ORDER_RESERVED", "ORDER_CANCELED"]);
    assert_eq!(system.stock(SKU).await, (10, 0, 0));
    let (_, payment) = get_json(&system, "payment", &format!("/payments/{id}")).await;
    assert_eq!(payment["status"], "DECLINED");
    let (status, _) = get_json(&system, "shipping", &format!("/shipments/{id}")).await;
    assert_eq!(status, 404);
    assert_eq!(
        notification_kinds(&system, id, 3).await,
        ["ORDER_CANCELED", "ORDER_RESERVED", "PAYMENT_FAILED"]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn serial_unpaid_reservation_expires_and_a_late_payment_is_refunded() {
    let options = Options {
        reservation_ttl_ms: 1_500,
        ..Options::default()
    };
    // No payment service yet: nobody pays in time.
    let mut system = System::start(&["order", "notification"], options).await;
    system.set_stock(SKU, 10).await;
    let id = system.order(500, SKU, 4).await.expect("stock is there");
    assert_eq!(system.stock(SKU).await, (6, 4, 0));

    let order = system.wait_status(id, "ORDER_EXPIRED", FLOW).await;
    assert_eq!(history(&order), ["ORDER_RESERVED", "ORDER_EXPIRED"]);
    assert_eq!(system.stock(SKU).await, (10, 0, 0));

    // The payment service arrives late, approves, then sees the expiry and refunds.
    system.spawn("payment").await;
    system.spawn("shipping").await;
    wait_until("the late payment is refunded", FLOW, || async {
        get_json(&system, "payment", &format!("/payments/{id}"))
            .await
            .1["status"]
            == "REFUNDED"
    })
    .await;
    let order = system.get_order(id).await;
    assert_eq!(order["status"], "ORDER_EXPIRED");
    assert_eq!(order["version"], 2);
    assert_eq!(system.stock(SKU).await, (10, 0, 0));
    let (status, _) = get_json(&system, "shipping", &format!("/shipments/{id}")).await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn serial_two_hundred_concurrent_orders_for_fifty_units_create_exactly_fifty() {
    let system = Arc::new(System::start(&SERVICES, Options::default()).await);
    system.set_stock(SKU, 50).await;

    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (system, done) = (system.clone(), done.clone());
        tokio::spawn(async move {
            let mut samples = 0;
            while !done.load(Ordering::Relaxed) {
                let (available, held, sold) = system.stock(SKU).await;
                assert_eq!(available + held + sold, 50, "stock conservation");
                samples += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            samples
        })
    };
    let posts: Vec<_> = (0..200)
        .map(|_| {
            let system = system.clone();
            tokio::spawn(async move { system.order(100, SKU, 1).await })
        })
        .collect();
    let mut created = Vec::new();
    for post in posts {
        created.extend(post.await.unwrap());
    }
    assert_eq!(created.len(), 50, "exactly the stock was sold");

    let statuses = system.wait_terminal(&created, FLOW).await;
    done.store(true, Ordering::Relaxed);
    assert!(sampler.await.unwrap() > 0);
    assert!(statuses.values().all(|s| s == "SHIPPING"), "{statuses:?}");
    assert_eq!(system.stock(SKU).await, (0, 0, 50));
    assert_eq!(
        system.count("order", "SELECT count(*) FROM orders").await,
        50
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn serial_the_same_events_injected_twice_change_nothing() {
    let system = System::start(&SERVICES, Options::default()).await;
    system.set_stock(SKU, 10).await;
    let first = system.order(500, SKU, 2).await.unwrap();
    system.wait_status(first, "SHIPPING", FLOW).await;
    notification_kinds(&system, first, 3).await;

    // Every event of the first order, produced again exactly as it was.
    let events = kafka::read_all(&system.brokers, &system.topic, 4, FLOW).await;
    let types: Vec<_> = events
        .iter()
        .map(|m| m.header("event-type").unwrap())
        .collect();
    assert_eq!(
        types,
        [
            "ORDER_RESERVED",
            "PAYMENT_APPROVED",
            "ORDER_PAID",
            "SHIPPING_STARTED"
        ]
    );
    let producer = kafka::producer(&system.brokers);
    for event in &events {
        let mut headers = OwnedHeaders::new();
        for (name, value) in &event.headers {
            headers = headers.insert(Header {
                key: name,
                value: Some(value.as_bytes()),
            });
        }
        producer
            .send(
                FutureRecord::to(&system.topic)
                    .key(event.key.as_deref().unwrap())
                    .payload(event.payload.as_deref().unwrap())
                    .headers(headers),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }

    // A second order after them: once it is done, the duplicates were consumed (one partition).
    let marker = system.order(500, SKU, 1).await.unwrap();
    system.wait_status(marker, "SHIPPING", FLOW).await;
    notification_kinds(&system, marker, 3).await;

    let order = system.get_order(first).await;
    assert_eq!(order["version"], 3);
    assert_eq!(history(&order).len(), 3);
    assert_eq!(system.stock(SKU).await, (7, 0, 3));
    assert_eq!(
        system
            .count("payment", "SELECT count(*) FROM payments")
            .await,
        2
    );
    assert_eq!(
        system
            .count("shipping", "SELECT count(*) FROM shipments")
            .await,
        2
    );
    assert_eq!(notification_kinds(&system, first, 3).await.len(), 3);
    let dead = "SELECT count(*) FROM eventful_dead_letters";
    for service in SERVICES {
        assert_eq!(
            system.count(service, dead).await,
            0,
            "{service} dead letters"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn serial_services_killed_mid_run_lose_nothing_and_pay_once() {
    let mut system = System::start(&SERVICES, Options::default()).await;
    system.set_stock(SKU, 1_000).await;
    let mut created = Vec::new();
    for round in 0..3 {
        let posts: Vec<_> = (0..20)
            .map(|i| {
                // Every fifth order is above the payment limit and gets declined.
                let amount = if i % 5 == 0 { 5_000 } else { 200 };
                let body = json!([{ "userId": user(), "totalAmount": amount,
                                    "items": [{ "sku": SKU, "quantity": 1 }] }]);
                let (http, url) = (system.http.clone(), system.url("order", "/orders"));
                tokio::spawn(async move {
                    let ids: Vec<Uuid> = http
                        .post(url)
                        .json(&body)
                        .send()
                        .await
                        .unwrap()
                        .json()
                        .await
                        .unwrap();
                    ids
                })
            })
            .collect();
        for post in posts {
            created.extend(post.await.unwrap());
        }
        // SIGKILL while the events of this round are in flight, then restart.
        match round {
            0 => {
                system.kill("payment").await;
                system.kill("shipping").await;
                system.spawn("payment").await;
                system.spawn("shipping").await;
            }
            1 => {
                system.kill("order").await;
                system.kill("notification").await;
                system.spawn("order").await;
                system.spawn("notification").await;
            }
            _ => {}
        }
    }
    assert_eq!(created.len(), 60);

    let statuses = system
        .wait_terminal(&created, Duration::from_secs(120))
        .await;
    let shipped = statuses.values().filter(|s| *s == "SHIPPING").count();
    let canceled = statuses.values().filter(|s| *s == "ORDER_CANCELED").count();
    assert_eq!((shipped, canceled), (48, 12), "{statuses:?}");

    // A marker order after all of them: once it is notified, every earlier event was consumed
    // by every service (one partition), so a late duplicate would already show.
    let marker = system.order(200, SKU, 1).await.unwrap();
    system.wait_status(marker, "SHIPPING", FLOW).await;
    notification_kinds(&system, marker, 3).await;

    // One payment per order, a shipment exactly for the approved ones (the marker included).
    let payments = "SELECT count(*) FROM payments";
    assert_eq!(system.count("payment", payments).await, 61);
    let approved = "SELECT count(*) FROM payments WHERE status = 'APPROVED'";
    assert_eq!(system.count("payment", approved).await, 49);
    assert_eq!(
        system
            .count("shipping", "SELECT count(*) FROM shipments")
            .await,
        49
    );
    // No event lost or applied twice: exactly the notifications each outcome implies.
    for id in &created {
        let expected = if statuses[id] == "SHIPPING" {
            ["ORDER_RESERVED", "PAYMENT_APPROVED", "SHIPPING_STARTED"]
        } else {
            ["ORDER_CANCELED", "ORDER_RESERVED", "PAYMENT_FAILED"]
        };
        assert_eq!(
            notification_kinds(&system, *id, 3).await,
            expected,
            "order {id}"
        );
    }
    let dead = "SELECT count(*) FROM eventful_dead_letters";
    for service in SERVICES {
        assert_eq!(
            system.count(service, dead).await,
            0,
            "{service} dead letters"
        );
    }
    assert_eq!(system.stock(SKU).await, (1_000 - 49, 0, 49));
}

#[tokio::test(flavor = "multi_thread")]
async fn serial_payments_racing_the_expiry_end_in_exactly_one_outcome() {
    // A TTL about as long as a payment takes: some orders are paid first, some expire first
    // (by the scheduler, or by the Redis reaper before the payment's confirm).
    let options = Options {
        reservation_ttl_ms: 1_000,
        ..Options::default()
    };
    let system = Arc::new(System::start(&SERVICES, options).await);
    system.set_stock(SKU, 1_000).await;
    let mut created = Vec::new();
    for _ in 0..10 {
        let posts: Vec<_> = (0..10)
            .map(|_| {
                let system = system.clone();
                tokio::spawn(async move { system.order(100, SKU, 1).await })
            })
            .collect();
        for post in posts {
            created.extend(post.await.unwrap());
        }
    }
    assert_eq!(created.len(), 100);

    let statuses = system.wait_terminal(&created, FLOW).await;
    let shipped: Vec<Uuid> = created
        .iter()
        .copied()
        .filter(|id| statuses[id] == "SHIPPING")
        .collect();
    for id in &created {
        let order = system.get_order(*id).await;
        let transitions = history(&order);
        let (payment, shipment) = if statuses[id] == "SHIPPING" {
            assert_eq!(transitions, ["ORDER_RESERVED", "PAID", "SHIPPING"], "{id}");
            ("APPROVED", 200)
        } else {
            assert_eq!(transitions, ["ORDER_RESERVED", "ORDER_EXPIRED"], "{id}");
            ("REFUNDED", 404)
        };
        let path = format!("/payments/{id}");
        wait_until(&format!("payment of {id} is {payment}"), FLOW, || async {
            get_json(&system, "payment", &path).await.1["status"] == payment
        })
        .await;
        let (status, _) = get_json(&system, "shipping", &format!("/shipments/{id}")).await;
        assert_eq!(status, shipment, "shipment of {id}");
    }
    let sold = shipped.len() as u64;
    assert_eq!(system.stock(SKU).await, (1_000 - sold, 0, sold));
    eprintln!("{sold} of 100 orders paid before their reservation expired");
}

#[tokio::test(flavor = "multi_thread")]
async fn serial_bad_input_gets_a_json_4xx_and_writes_nothing() {
    let system = System::start(&["order"], Options::default()).await;
    system.set_stock(SKU, 10).await;
    let u = user();
    let one = json!({ "userId": u, "totalAmount": 1 });
    let cases: Vec<(String, u16)> =
        vec![
        ("{not json".to_owned(), 400),
        (json!({ "userId": u, "totalAmount": 1 }).to_string(), 400),
        ("[]".to_owned(), 422),
        (json!([{ "userId": "not-a-uuid", "totalAmount": 1 }]).to_string(), 422),
        (json!([{ "userId": u, "totalAmount": 0 }]).to_string(), 422),
        (json!([{ "userId": u, "totalAmount": -3 }]).to_string(), 422),
        (
            json!([{ "userId": u, "totalAmount": 1, "items": [{ "sku": "NOPE", "quantity": 1 }] }])
                .to_string(),
            422,
        ),
        (
            json!([{ "userId": u, "totalAmount": 1, "items": [{ "sku": SKU, "quantity": -1 }] }])
                .to_string(),
            422,
        ),
        (Value::Array(vec![one; 101]).to_string(), 422),
    ];
    for (body, expected) in cases {
        let response = system
            .http
            .post(system.url("order", "/orders"))
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), expected, "{body}");
        let error: Value = response.json().await.expect("a JSON error body");
        assert!(error["error"]["message"].is_string(), "{body}: {error}");
    }
    // Rejections axum and tower-http answer on their own get the same JSON shape.
    let too_large = system
        .http
        .post(system.url("order", "/orders"))
        .header("content-type", "application/json")
        // The server answers before reading the whole body and then closes the
        // connection: it must not go back to the pool for the next request.
        .header("connection", "close")
        .body(vec![b' '; commerce::http::MAX_BODY_BYTES + 1])
        .send()
        .await
        .unwrap();
    assert_eq!(too_large.status().as_u16(), 413);
    let error: Value = too_large.json().await.expect("a JSON 413 body");
    assert_eq!(error["error"]["code"], "body_too_large", "{error}");
    let wrong_method = system
        .http
        .delete(system.url("order", "/orders"))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_method.status().as_u16(), 405);
    assert!(wrong_method.headers().contains_key("allow"));
    let error: Value = wrong_method.json().await.expect("a JSON 405 body");
    assert_eq!(error["error"]["code"], "method_not_allowed", "{error}");

    let (status, error) = get_json(&system, "order", "/orders/not-a-uuid").await;
    assert_eq!(
        (status, error["error"]["code"].as_str()),
        (400, Some("invalid_body"))
    );
    let (status, _) = get_json(&system, "order", &format!("/orders/{}", Uuid::new_v4())).await;
    assert_eq!(status, 404);

    assert_eq!(
        system.count("order", "SELECT count(*) FROM orders").await,
        0
    );
    let outbox = "SELECT count(*) FROM eventful_outbox";
    assert_eq!(system.count("order", outbox).await, 0);
    assert_eq!(system.stock(SKU).await, (10, 0, 0));
}

/// The README's first request, sent as `curl -X POST localhost:8081/orders -H
/// 'Content-Type: application/json' -d '<BODY>'` sends it (same header casing, same bytes),
/// on a fresh start: nobody has set any stock, yet the default SKU has some.
#[tokio::test(flavor = "multi_thread")]
async fn serial_the_reference_request_places_one_order_on_a_fresh_start() {
    const BODY: &str = r#"[{"userId":"297A520A-F08D-4CA9-8EC9-5BFE21C0575A","totalAmount":10000}]"#;
    const DEFAULT_SKU: &str = "DEFAULT-SKU";
    // The services' own default payment limit (100000), not the tests' 1000: the order
    // takes the path it takes for someone trying the example.
    let options = Options {
        payment_limit: 100_000,
        ..Options::default()
    };
    let mut system = System::start(&SERVICES, options).await;
    let curl_like = reqwest::Client::builder()
        .http1_title_case_headers()
        .build()
        .unwrap();
    let response = curl_like
        .post(system.url("order", "/orders"))
        .header("Content-Type", "application/json")
        .body(BODY)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let answer: Value = response.json().await.unwrap_or(Value::Null);
    assert!(matches!(status, 200 | 201), "{status}: {answer}");
    let ids = answer.as_array().unwrap_or_else(|| panic!("{answer}"));
    assert_eq!(ids.len(), 1, "exactly one order id: {answer}");
    let id = Uuid::parse_str(ids[0].as_str().unwrap()).unwrap();

    let terminal = system.wait_terminal(&[id], FLOW).await;
    assert_eq!(
        terminal[&id], "SHIPPING",
        "10000 is within the default limit"
    );
    let stock = system.stock(DEFAULT_SKU).await;
    assert_eq!((stock.1, stock.2), (0, 1), "one unit sold, none held");

    // A restart keeps the stock as it is: the starting stock applies only when there is none.
    system.kill("order").await;
    system.spawn("order").await;
    assert_eq!(system.stock(DEFAULT_SKU).await, stock);
}
