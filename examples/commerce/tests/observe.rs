//! `/metrics` and `/ready`: the readiness checks in-process (`Router::oneshot`) against the
//! real PostgreSQL, Redis and Kafka and against closed ports; the Prometheus scrape of the
//! four real service binaries after a few orders.

mod support;

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use commerce::http::with_common_layers;
use commerce::observe::{self, Readiness};
use eventful_test_support::{kafka, spare_port, wait_until, TestDatabase, TestRedis};
use serde_json::Value;
use sqlx::postgres::PgPoolOptions;
use support::{Options, System, SERVICES, SKU};
use tower::ServiceExt as _;

async fn get(readiness: &Readiness, path: &str) -> (StatusCode, Value) {
    let app = with_common_layers(observe::routes(readiness.clone()));
    let response = app
        .oneshot(Request::get(path).body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let body = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

/// Everything up: 200 with every check `ok`. Redis and Kafka on closed ports: 503 naming
/// both, PostgreSQL still `ok`; PostgreSQL on a closed port: 503 naming it. `/health`
/// answers 200 throughout (liveness checks nothing).
#[tokio::test]
async fn ready_names_the_unreachable_dependency_and_health_stays_up() {
    eventful_test_support::init_tracing();
    let db = TestDatabase::create().await;
    let redis = TestRedis::connect().await;
    let brokers = kafka::brokers();
    kafka::require_broker(&brokers).await;
    let topic = kafka::create_topic(1).await;

    let up = Readiness::new(db.pool.clone(), &brokers, &topic)
        .unwrap()
        .with_redis(&redis.url)
        .unwrap();
    let (status, body) = get(&up, "/ready").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "ready");
    for check in ["postgres", "redis", "kafka"] {
        assert_eq!(body["checks"][check], "ok", "{body}");
    }

    let closed = format!("127.0.0.1:{}", spare_port());
    let down = Readiness::new(db.pool.clone(), &closed, &topic)
        .unwrap()
        .with_redis(&format!("redis://127.0.0.1:{}", spare_port()))
        .unwrap();
    let (status, body) = get(&down, "/ready").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["status"], "unavailable");
    assert_eq!(body["checks"]["postgres"], "ok", "{body}");
    assert_ne!(body["checks"]["redis"], "ok", "{body}");
    assert_ne!(body["checks"]["kafka"], "ok", "{body}");
    let (status, body) = get(&down, "/health").await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let nowhere = PgPoolOptions::new()
        .acquire_timeout(Duration::from_secs(1))
        .connect_lazy(&format!("postgres://postgres@127.0.0.1:{}/x", spare_port()))
        .unwrap();
    let no_db = Readiness::new(nowhere, &brokers, &topic).unwrap();
    let (status, body) = get(&no_db, "/ready").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_ne!(body["checks"]["postgres"], "ok", "{body}");
    assert_eq!(body["checks"]["kafka"], "ok", "{body}");
    assert!(body["checks"].get("redis").is_none(), "not checked: {body}");
    let (status, _) = get(&no_db, "/health").await;
    assert_eq!(status, StatusCode::OK);
}

/// Sum of every series of `name` in a Prometheus text scrape (`None` if there is none).
fn sample(scrape: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in scrape.lines().filter(|l| !l.starts_with('#')) {
        let series = line.split([' ', '{']).next().unwrap_or_default();
        if series == name {
            let value: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
            *found.get_or_insert(0.0) += value;
        }
    }
    found
}

/// After a few orders each service's `/metrics` carries its crates' series with nonzero
/// values, and `/ready` is 200.
#[tokio::test(flavor = "multi_thread")]
async fn serial_each_service_exposes_its_metrics_and_is_ready() {
    let system = System::start(&SERVICES, Options::default()).await;
    system.set_stock(SKU, 10).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(system.order(100, SKU, 1).await.expect("stock is there"));
    }
    for id in &ids {
        system
            .wait_status(*id, "SHIPPING", Duration::from_secs(60))
            .await;
    }
    let expected: [(&str, &[&str]); 4] = [
        (
            "order",
            &[
                "eventful_outbox_published_total",
                "eventful_inbox_applied_total",
                "eventful_inbox_handler_duration_seconds_count",
                "eventful_reservation_holds_total",
                "eventful_reservation_script_duration_seconds_count",
            ],
        ),
        (
            "payment",
            &[
                "eventful_outbox_published_total",
                "eventful_inbox_applied_total",
                "eventful_inbox_skipped_total",
            ],
        ),
        (
            "shipping",
            &[
                "eventful_outbox_published_total",
                "eventful_inbox_applied_total",
            ],
        ),
        ("notification", &["eventful_inbox_applied_total"]),
    ];
    for (service, names) in expected {
        let url = system.url(service, "/metrics");
        let scrape = || async {
            system
                .http
                .get(&url)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        };
        wait_until(
            &format!("{service}'s /metrics shows {names:?} nonzero"),
            Duration::from_secs(30),
            || async {
                let text = scrape().await;
                names
                    .iter()
                    .all(|name| sample(&text, name).is_some_and(|v| v > 0.0))
            },
        )
        .await;
        // The lag gauge comes with librdkafka's statistics (every 5 s); the pending gauge
        // with the relay's first heartbeat.
        wait_until(
            &format!("{service}'s /metrics shows the lag gauge"),
            Duration::from_secs(30),
            || async { sample(&scrape().await, "eventful_inbox_lag").is_some() },
        )
        .await;
        if service != "notification" {
            let text = scrape().await;
            assert!(sample(&text, "eventful_outbox_pending").is_some(), "{text}");
        }
        let held = sample(&scrape().await, "eventful_reservation_holds_total");
        if service == "order" {
            assert_eq!(held, Some(3.0), "three holds made");
        } else {
            assert_eq!(held, None, "only the order service holds stock");
        }
        let response = system
            .http
            .get(system.url(service, "/ready"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{service} is ready");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["checks"]["kafka"], "ok");
        assert_eq!(body["checks"]["postgres"], "ok");
        let redis = if service == "order" { "ok" } else { "" };
        assert_eq!(body["checks"]["redis"].as_str().unwrap_or(""), redis);
    }
}
