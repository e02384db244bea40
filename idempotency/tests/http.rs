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
use eventful_idempotency::http::{ReleaseKey, REPLAYED_HEADER};
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

/// Answers a 4 KiB body (above the fixture's 1 KiB `max_body_bytes` where configured).
async fn big_order(State(app): State<App>, Path(id): Path<String>) -> axum::response::Response {
    let run = app.runs.fetch_add(1, Ordering::SeqCst) + 1;
    (
        StatusCode::CREATED,
        Json(serde_json::json!({ "order": id, "run": run, "padding": "x".repeat(4096) })),
    )
        .into_response()
}

/// While `failures` is positive: `503` marked [`ReleaseKey`] (nothing was done).
async fn busy_order(State(app): State<App>, Path(id): Path<String>) -> axum::response::Response {
    let run = app.runs.fetch_add(1, Ordering::SeqCst) + 1;
    if app
        .failures
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        return (StatusCode::SERVICE_UNAVAILABLE, ReleaseKey, "busy").into_response();
    }
    (
        StatusCode::CREATED,
        Json(serde_json::json!({ "order": id, "run": run })),
    )
        .into_response()
}

/// While `failures` is positive: `429`.
async fn limited_order(State(app): State<App>, Path(id): Path<String>) -> axum::response::Response {
    let run = app.runs.fetch_add(1, Ordering::SeqCst) + 1;
    if app
        .failures
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        return (StatusCode::TOO_MANY_REQUESTS, "slow down").into_response();
    }
    (
        StatusCode::CREATED,
        Json(serde_json::json!({ "order": id, "run": run })),
    )
        .into_response()
}

/// Panics after counting its run (a bug mid-request).
async fn panicking_order(State(app): State<App>) -> axum::response::Response {
    app.runs.fetch_add(1, Ordering::SeqCst);
    let steps: Vec<u32> = Vec::new();
    let step = 2;
    (StatusCode::CREATED, steps[step].to_string()).into_response()
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
        .route("/big/{id}", post(big_order))
        .route("/busy/{id}", post(busy_order))
        .route("/limited/{id}", post(limited_order))
        .route("/panic/{id}", post(panicking_order))
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
    retry_after: Option<String>,
    replayed: bool,
    content_type: Option<String>,
    body: serde_json::Value,
}

async fn send(router: &Router, request: Request<Body>) -> Answer {
    let response = router.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let replayed = response.headers().get(REPLAYED_HEADER).is_some();
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned());
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let body = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    Answer {
        status,
        retry_after,
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
    assert_eq!(retry.body["error"], "idempotency_key_in_use");
    assert!(
        retry.retry_after.is_some(),
        "409 in use carries Retry-After"
    );
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

/// A 5xx answered after the handler ran is stored like any response: the handler may have
/// committed its effects before failing, so a retry must not run it again.
#[tokio::test]
async fn server_errors_are_stored_and_replayed() {
    let f = fixture(false, |l| l).await;
    f.app.failures.store(1, Ordering::SeqCst);
    let failed = send(&f.router, request("/orders/1", Some("k"), "alice", "{}")).await;
    assert_eq!(failed.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(!failed.replayed);
    let retried = send(&f.router, request("/orders/1", Some("k"), "alice", "{}")).await;
    assert_eq!(
        (retried.status, retried.replayed),
        (StatusCode::INTERNAL_SERVER_ERROR, true),
        "the retry gets the stored 500"
    );
    assert_eq!(f.app.runs.load(Ordering::SeqCst), 1, "the handler ran once");
}

/// Sends `request` and drops its future once the (gated) handler has started, as a timeout
/// layer or a client going away mid-handler does.
async fn drop_mid_handler(router: &Router, request: Request<Body>, runs: &Arc<AtomicUsize>) {
    let before = runs.load(Ordering::SeqCst);
    let runs = runs.clone();
    tokio::select! {
        answer = send(router, request) => panic!("the gated handler answered {}", answer.status),
        () = wait_until("the handler runs", Duration::from_secs(10), || {
            let runs = runs.clone();
            async move { runs.load(Ordering::SeqCst) > before }
        }) => {}
    }
}

/// Retries a request until it is no longer answered `409 idempotency_key_in_use`.
async fn retry_until_settled(router: &Router, path: &str, key: &str) -> Answer {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let answer = send(router, request(path, Some(key), "alice", "{}")).await;
        let in_use = answer.status == StatusCode::CONFLICT
            && answer.body["error"] != "idempotency_key_abandoned"
            && answer.body["error"] != "idempotency_response_not_stored";
        if !in_use || tokio::time::Instant::now() > deadline {
            return answer;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The request future is dropped mid-handler (a timeout layer answering 504, a client
/// that went away): the handler may have committed, so the key is not released. A retry
/// is told the outcome is unknown instead of running the handler again.
#[tokio::test]
async fn dropped_request_keeps_its_key_and_the_retry_is_told_the_outcome_is_unknown() {
    let f = fixture(true, |l| l).await;
    let router = f.router.clone();
    drop_mid_handler(
        &router,
        request("/orders/1", Some("gone"), "alice", "{}"),
        &f.app.runs,
    )
    .await;
    assert_eq!(f.app.runs.load(Ordering::SeqCst), 1);
    f.app.gate.add_permits(100);
    let retry = retry_until_settled(&f.router, "/orders/1", "gone").await;
    assert_eq!(
        (retry.status, retry.body["error"].as_str()),
        (StatusCode::CONFLICT, Some("idempotency_key_abandoned")),
        "{:?}",
        retry.body
    );
    assert!(!retry.replayed);
    assert_eq!(
        f.app.runs.load(Ordering::SeqCst),
        1,
        "the handler ran once across the request and its retry"
    );
}

/// A request still running past `in_flight_timeout` (or whose process died): retries get
/// `409 idempotency_key_in_use` with Retry-After, then `409 idempotency_key_abandoned`;
/// if the request completes after all, its response is stored and replayed.
#[tokio::test]
async fn in_flight_key_past_its_timeout_is_reported_abandoned_until_it_completes() {
    let f = fixture(true, |l| l.in_flight_timeout(Duration::from_millis(500))).await;
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
    let early = send(&f.router, request("/orders/1", Some("slow"), "alice", "{}")).await;
    assert_eq!(early.status, StatusCode::CONFLICT);
    assert_eq!(early.body["error"], "idempotency_key_in_use");
    assert!(early.retry_after.is_some());
    let late = retry_until_settled(&f.router, "/orders/1", "slow").await;
    assert_eq!(
        (late.status, late.body["error"].as_str()),
        (StatusCode::CONFLICT, Some("idempotency_key_abandoned")),
        "{:?}",
        late.body
    );
    f.app.gate.add_permits(100);
    let first = first.await.unwrap();
    assert_eq!(first.status, StatusCode::CREATED);
    let replay = send(&f.router, request("/orders/1", Some("slow"), "alice", "{}")).await;
    assert!(replay.replayed);
    assert_eq!(replay.body, first.body);
    assert_eq!(f.app.runs.load(Ordering::SeqCst), 1);
}

/// A response above `max_body_bytes` is returned whole but not stored; the key records
/// that the request completed, so a retry gets `409 idempotency_response_not_stored`
/// instead of a second run.
#[tokio::test]
async fn oversized_response_is_returned_and_the_retry_is_told_it_was_not_stored() {
    let f = fixture(false, |l| l.max_body_bytes(1024)).await;
    let first = send(&f.router, request("/big/1", Some("big"), "alice", "{}")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(
        first.body["padding"].as_str().map(str::len),
        Some(4096),
        "the whole response reached the client"
    );
    let retry = send(&f.router, request("/big/1", Some("big"), "alice", "{}")).await;
    assert_eq!(
        (retry.status, retry.body["error"].as_str()),
        (
            StatusCode::CONFLICT,
            Some("idempotency_response_not_stored")
        ),
        "{:?}",
        retry.body
    );
    assert_eq!(f.app.runs.load(Ordering::SeqCst), 1, "the handler ran once");
}

/// Responses that say nothing was done (`ReleaseKey`, `429`) release the key: the retry
/// runs the handler, and its response is stored.
#[tokio::test]
async fn responses_that_say_nothing_was_done_release_the_key() {
    let f = fixture(false, |l| l).await;
    for path in ["/busy/1", "/limited/1"] {
        f.app.runs.store(0, Ordering::SeqCst);
        f.app.failures.store(1, Ordering::SeqCst);
        let first = send(&f.router, request(path, Some("k"), "alice", "{}")).await;
        assert!(
            first.status == StatusCode::SERVICE_UNAVAILABLE
                || first.status == StatusCode::TOO_MANY_REQUESTS,
            "{path}: {:?}",
            first.status
        );
        let retry = send(&f.router, request(path, Some("k"), "alice", "{}")).await;
        assert_eq!(
            (retry.status, retry.replayed),
            (StatusCode::CREATED, false),
            "{path}"
        );
        let replay = send(&f.router, request(path, Some("k"), "alice", "{}")).await;
        assert_eq!(
            (replay.status, replay.replayed),
            (StatusCode::CREATED, true),
            "{path}"
        );
        assert_eq!(replay.body, retry.body);
        assert_eq!(f.app.runs.load(Ordering::SeqCst), 2, "{path}");
    }
}

/// A handler that panics leaves its key abandoned (it may have committed before the panic):
/// the retry does not run it again.
#[tokio::test]
async fn a_panicking_handler_leaves_its_key_abandoned() {
    let f = fixture(false, |l| l).await;
    let router = f.router.clone();
    let crashed =
        tokio::spawn(
            async move { send(&router, request("/panic/1", Some("p"), "alice", "{}")).await },
        )
        .await;
    assert!(
        matches!(crashed, Err(e) if e.is_panic()),
        "the handler panicked"
    );
    let retry = retry_until_settled(&f.router, "/panic/1", "p").await;
    assert_eq!(
        (retry.status, retry.body["error"].as_str()),
        (StatusCode::CONFLICT, Some("idempotency_key_abandoned")),
        "{:?}",
        retry.body
    );
    assert_eq!(f.app.runs.load(Ordering::SeqCst), 1);
}

/// With `rerun_abandoned(true)` (the application declares the handler safe to run again),
/// a retry of an interrupted request takes the key over and runs the handler; its response
/// is then stored and replayed.
#[tokio::test]
async fn abandoned_keys_run_again_when_the_handler_is_declared_safe() {
    let f = fixture(true, |l| l.rerun_abandoned(true)).await;
    let router = f.router.clone();
    drop_mid_handler(
        &router,
        request("/orders/1", Some("again"), "alice", "{}"),
        &f.app.runs,
    )
    .await;
    f.app.gate.add_permits(100);
    let retry = retry_until_settled(&f.router, "/orders/1", "again").await;
    assert_eq!((retry.status, retry.replayed), (StatusCode::CREATED, false));
    assert_eq!(
        f.app.runs.load(Ordering::SeqCst),
        2,
        "the retry ran the handler"
    );
    let replay = send(
        &f.router,
        request("/orders/1", Some("again"), "alice", "{}"),
    )
    .await;
    assert!(replay.replayed);
    assert_eq!(replay.body, retry.body);
    // A different request with the same key is still a mismatch, not a takeover.
    let other = send(
        &f.router,
        request("/orders/1", Some("again"), "alice", "{\"x\":1}"),
    )
    .await;
    assert_eq!(other.status, StatusCode::UNPROCESSABLE_ENTITY);
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
