//! The axum Idempotency-Key layer against the real PostgreSQL.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{Request, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use axum::{Json, Router};
use eventful_idempotency::http::REPLAYED_HEADER;
use eventful_idempotency::IdempotencyLayer;
use eventful_test_support::{wait_until, TestDatabase};
use http_body_util::BodyExt as _;
use tokio::sync::Semaphore;
use tower::ServiceExt as _;

#[derive(Clone)]
struct App {
    /// Handler executions.
    runs: Arc<AtomicUsize>,
    /// Handlers wait for a permit when `gated`.
    gate: Arc<Semaphore>,
    gated: bool,
    /// Fail with 500 while this counter is positive.
    failures: Arc<AtomicUsize>,
}

async fn create_order(
    State(app): State<App>,
    Path(id): Path<String>,
    body: String,
) -> axum::response::Response {
    let run = app.runs.fetch_add(1, Ordering::SeqCst) + 1;
    if app.gated {
        let _permit = app.gate.acquire().await;
    }
    if app
        .failures
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        return (StatusCode::INTERNAL_SERVER_ERROR, "boom").into_response();
    }
    (
        StatusCode::CREATED,
        Json(serde_json::json!({ "order": id, "run": run, "body": body })),
    )
        .into_response()
}

struct Fixture {
    _db: TestDatabase,
    pool: sqlx::PgPool,
    app: App,
    router: Router,
}

async fn fixture(gated: bool, layer: impl FnOnce(IdempotencyLayer) -> IdempotencyLayer) -> Fixture {
    let db = TestDatabase::create_with_pool_size(30).await;
    eventful_idempotency::migrate(&db.pool).await.unwrap();
    let app = App {
        runs: Arc::new(AtomicUsize::new(0)),
        gate: Arc::new(Semaphore::new(0)),
        gated,
        failures: Arc::new(AtomicUsize::new(0)),
    };
    let router = Router::new()
        .route("/orders/{id}", post(create_order))
        .route("/refunds/{id}", post(create_order))
        .route_layer(layer(
            IdempotencyLayer::new(db.pool.clone()).caller_header("x-caller"),
        ))
        .with_state(app.clone());
    Fixture {
        pool: db.pool.clone(),
        _db: db,
        app,
        router,
    }
}

fn request(path: &str, key: Option<&str>, caller: &str, body: &str) -> Request<Body> {
    let mut builder = Request::post(path)
        .header("content-type", "application/json")
        .header("x-caller", caller);
    if let Some(key) = key {
        builder = builder.header("idempotency-key", key);
    }
    builder.body(Body::from(body.to_owned())).unwrap()
}

struct Answer {
    status: StatusCode,
    replayed: bool,
    content_type: Option<String>,
    body: serde_json::Value,
}

async fn send(router: &Router, request: Request<Body>) -> Answer {
    let response = router.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let replayed = response.headers().get(REPLAYED_HEADER).is_some();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned());
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let body = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    Answer {
        status,
        replayed,
        content_type,
        body,
    }
}

#[tokio::test]
async fn retry_with_same_key_replays_the_stored_response() {
    let f = fixture(false, |l| l).await;
    let first = send(
        &f.router,
        request("/orders/1", Some("k1"), "alice", r#"{"qty":2}"#),
    )
    .await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert!(!first.replayed);
    for _ in 0..3 {
        let again = send(
            &f.router,
            request("/orders/1", Some("k1"), "alice", r#"{"qty":2}"#),
        )
        .await;
        assert_eq!(again.status, StatusCode::CREATED);
        assert!(again.replayed);
        assert_eq!(again.body, first.body, "the stored body is returned");
        assert_eq!(again.content_type.as_deref(), Some("application/json"));
    }
    assert_eq!(f.app.runs.load(Ordering::SeqCst), 1, "the handler ran once");
    // Requests without a key are not deduplicated.
    send(&f.router, request("/orders/1", None, "alice", "{}")).await;
    send(&f.router, request("/orders/1", None, "alice", "{}")).await;
    assert_eq!(f.app.runs.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn same_key_with_a_different_request_gets_422() {
    let f = fixture(false, |l| l).await;
    let first = send(
        &f.router,
        request("/orders/1", Some("k"), "alice", r#"{"qty":2}"#),
    )
    .await;
    assert_eq!(first.status, StatusCode::CREATED);
    let other_body = send(
        &f.router,
        request("/orders/1", Some("k"), "alice", r#"{"qty":3}"#),
    )
    .await;
    assert_eq!(other_body.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(other_body.body["error"], "idempotency_key_mismatch");
    // Same route, different path parameter: a different request too.
    let other_path = send(
        &f.router,
        request("/orders/2", Some("k"), "alice", r#"{"qty":2}"#),
    )
    .await;
    assert_eq!(other_path.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(f.app.runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn retry_while_the_first_runs_gets_409() {
    let f = fixture(true, |l| l).await;
    let router = f.router.clone();
    let first = tokio::spawn(async move {
        send(&router, request("/orders/1", Some("slow"), "alice", "{}")).await
    });
    let runs = f.app.runs.clone();
    wait_until("the first request runs", Duration::from_secs(10), || {
        let runs = runs.clone();
        async move { runs.load(Ordering::SeqCst) == 1 }
    })
    .await;
    let retry = send(&f.router, request("/orders/1", Some("slow"), "alice", "{}")).await;
    assert_eq!(retry.status, StatusCode::CONFLICT);
    assert_eq!(retry.body["error"], "idempotency_request_in_progress");
    f.app.gate.add_permits(100);
    let first = first.await.unwrap();
    assert_eq!(first.status, StatusCode::CREATED);
    let after = send(&f.router, request("/orders/1", Some("slow"), "alice", "{}")).await;
    assert!(after.replayed);
    assert_eq!(after.body, first.body);
    assert_eq!(f.app.runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn twenty_concurrent_retries_run_the_handler_once() {
    let f = fixture(false, |l| l).await;
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let router = f.router.clone();
        tasks.push(tokio::spawn(async move {
            send(
                &router,
                request("/orders/9", Some("burst"), "alice", r#"{"qty":1}"#),
            )
            .await
        }));
    }
    let mut fresh = 0;
    let mut replayed = 0;
    let mut conflicts = 0;
    let mut bodies = Vec::new();
    for task in tasks {
        let answer = task.await.unwrap();
        match (answer.status, answer.replayed) {
            (StatusCode::CREATED, false) => fresh += 1,
            (StatusCode::CREATED, true) => {
                replayed += 1;
                bodies.push(answer.body);
            }
            (StatusCode::CONFLICT, _) => conflicts += 1,
            other => panic!("unexpected answer {other:?}"),
        }
    }
    assert_eq!(fresh, 1, "exactly one request ran");
    assert_eq!(fresh + replayed + conflicts, 20);
    assert_eq!(f.app.runs.load(Ordering::SeqCst), 1, "the handler ran once");
    let last = send(
        &f.router,
        request("/orders/9", Some("burst"), "alice", r#"{"qty":1}"#),
    )
    .await;
    assert!(last.replayed);
    assert!(bodies.iter().all(|b| *b == last.body));
}

#[tokio::test]
async fn keys_are_scoped_by_route_and_caller() {
    let f = fixture(false, |l| l).await;
    let a = send(&f.router, request("/orders/1", Some("k"), "alice", "{}")).await;
    let b = send(&f.router, request("/orders/1", Some("k"), "bob", "{}")).await;
    let c = send(&f.router, request("/refunds/1", Some("k"), "alice", "{}")).await;
    for answer in [&a, &b, &c] {
        assert_eq!(answer.status, StatusCode::CREATED);
        assert!(!answer.replayed);
    }
    assert_eq!(f.app.runs.load(Ordering::SeqCst), 3);
    let (rows,): (i64,) = sqlx::query_as("SELECT count(*) FROM eventful_idempotency_keys")
        .fetch_one(&f.pool)
        .await
        .unwrap();
    assert_eq!(rows, 3);
}

#[tokio::test]
async fn expired_keys_may_be_reused() {
    let f = fixture(false, |l| l.ttl(Duration::from_millis(300))).await;
    let first = send(
        &f.router,
        request("/orders/1", Some("k"), "alice", r#"{"v":1}"#),
    )
    .await;
    assert_eq!(first.status, StatusCode::CREATED);
    let early = send(
        &f.router,
        request("/orders/1", Some("k"), "alice", r#"{"v":2}"#),
    )
    .await;
    assert_eq!(
        early.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "not expired yet"
    );
    let pool = f.pool.clone();
    wait_until("the key expires", Duration::from_secs(10), || {
        let pool = pool.clone();
        async move {
            let (expired,): (bool,) = sqlx::query_as(
                "SELECT bool_and(expires_at < now()) FROM eventful_idempotency_keys",
            )
            .fetch_one(&pool)
            .await
            .unwrap();
            expired
        }
    })
    .await;
    let reused = send(
        &f.router,
        request("/orders/1", Some("k"), "alice", r#"{"v":2}"#),
    )
    .await;
    assert_eq!(reused.status, StatusCode::CREATED);
    assert!(!reused.replayed);
    assert_eq!(reused.body["body"], r#"{"v":2}"#);
    assert_eq!(f.app.runs.load(Ordering::SeqCst), 2);
    // Expired keys are purged in batches.
    let pool = f.pool.clone();
    wait_until("the reused key expires", Duration::from_secs(10), || {
        let pool = pool.clone();
        async move {
            let (expired,): (bool,) = sqlx::query_as(
                "SELECT bool_and(expires_at < now()) FROM eventful_idempotency_keys",
            )
            .fetch_one(&pool)
            .await
            .unwrap();
            expired
        }
    })
    .await;
    let layer = IdempotencyLayer::new(f.pool.clone());
    assert_eq!(layer.purge_expired(10).await.unwrap(), 1);
    assert_eq!(layer.purge_expired(10).await.unwrap(), 0);
}

#[tokio::test]
async fn server_errors_release_the_key() {
    let f = fixture(false, |l| l).await;
    f.app.failures.store(1, Ordering::SeqCst);
    let failed = send(&f.router, request("/orders/1", Some("k"), "alice", "{}")).await;
    assert_eq!(failed.status, StatusCode::INTERNAL_SERVER_ERROR);
    let retried = send(&f.router, request("/orders/1", Some("k"), "alice", "{}")).await;
    assert_eq!(retried.status, StatusCode::CREATED);
    assert!(!retried.replayed, "the retry ran the handler");
    let replay = send(&f.router, request("/orders/1", Some("k"), "alice", "{}")).await;
    assert!(replay.replayed);
    assert_eq!(f.app.runs.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn abandoned_request_releases_the_key() {
    let f = fixture(true, |l| l).await;
    let router = f.router.clone();
    let first = tokio::spawn(async move {
        send(&router, request("/orders/1", Some("gone"), "alice", "{}")).await
    });
    let runs = f.app.runs.clone();
    wait_until("the first request runs", Duration::from_secs(10), || {
        let runs = runs.clone();
        async move { runs.load(Ordering::SeqCst) == 1 }
    })
    .await;
    // The client goes away: the request future is dropped mid-handler.
    first.abort();
    let pool = f.pool.clone();
    wait_until("the key is released", Duration::from_secs(10), || {
        let pool = pool.clone();
        async move {
            let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM eventful_idempotency_keys")
                .fetch_one(&pool)
                .await
                .unwrap();
            n == 0
        }
    })
    .await;
    f.app.gate.add_permits(100);
    let retry = send(&f.router, request("/orders/1", Some("gone"), "alice", "{}")).await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert!(!retry.replayed);
    assert_eq!(f.app.runs.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn missing_or_invalid_keys_are_rejected_when_required() {
    let f = fixture(false, |l| l.require_key(true)).await;
    let missing = send(&f.router, request("/orders/1", None, "alice", "{}")).await;
    assert_eq!(missing.status, StatusCode::BAD_REQUEST);
    assert_eq!(missing.body["error"], "idempotency_key_missing");
    let long = "x".repeat(300);
    let invalid = send(&f.router, request("/orders/1", Some(&long), "alice", "{}")).await;
    assert_eq!(invalid.status, StatusCode::BAD_REQUEST);
    assert_eq!(f.app.runs.load(Ordering::SeqCst), 0);
    // Expired keys are purged in batches.
    let purged = IdempotencyLayer::new(f.pool.clone())
        .purge_expired(10)
        .await
        .unwrap();
    assert_eq!(purged, 0);
}

/// Twenty concurrent requests with one key while the first is held inside the handler: the
/// other nineteen get 409 at once, the handler runs exactly once, and a later retry replays.
#[tokio::test]
async fn concurrent_retries_while_the_first_is_held_get_409() {
    let f = fixture(true, |l| l).await;
    let answered = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let (router, answered) = (f.router.clone(), answered.clone());
        tasks.push(tokio::spawn(async move {
            let answer = send(&router, request("/orders/5", Some("held"), "alice", "{}")).await;
            answered.fetch_add(1, Ordering::SeqCst);
            answer
        }));
    }
    let a = answered.clone();
    wait_until(
        "nineteen requests are answered",
        Duration::from_secs(10),
        || {
            let a = a.clone();
            async move { a.load(Ordering::SeqCst) == 19 }
        },
    )
    .await;
    assert_eq!(
        f.app.runs.load(Ordering::SeqCst),
        1,
        "only the owner entered the handler"
    );
    f.app.gate.add_permits(100);
    let mut statuses = Vec::new();
    for task in tasks {
        statuses.push(task.await.unwrap().status);
    }
    assert_eq!(
        statuses
            .iter()
            .filter(|s| **s == StatusCode::CREATED)
            .count(),
        1
    );
    assert_eq!(
        statuses
            .iter()
            .filter(|s| **s == StatusCode::CONFLICT)
            .count(),
        19
    );
    let later = send(&f.router, request("/orders/5", Some("held"), "alice", "{}")).await;
    assert!(later.replayed);
    assert_eq!(f.app.runs.load(Ordering::SeqCst), 1);
}
