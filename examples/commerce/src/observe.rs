//! What operators scrape and probe: `GET /metrics` (Prometheus text) and `GET /ready`
//! (PostgreSQL, Kafka and, for the services that use it, Redis). `/health` (in
//! [`http`](crate::http)) stays liveness only: it checks nothing, so an outage of a
//! dependency makes a service unready, never restarted.
//!
//! The `metrics` recorder is process-wide: one is installed per process, the first time a
//! service builds its routes. Run one service per process and its `/metrics` shows that
//! service; the all-in-one `commerce` binary runs four services in one process, so each of
//! their `/metrics` shows all four, told apart by the labels (`database` of the outbox
//! series, `consumer` / `group` of the inbox series, the reservation `namespace`).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use rdkafka::producer::{BaseProducer, Producer as _};
use rdkafka::ClientConfig;
use serde_json::{json, Map, Value};
use sqlx::PgPool;

/// How long one readiness check may take before it counts as failed.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// Buckets of every `_seconds` histogram: 0.5 ms to 10 s.
const SECONDS_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

static RECORDER: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// The process's Prometheus recorder, installed on first use. `None` when another global
/// recorder was installed first (then `/metrics` answers 503).
///
/// Call it before building relays, consumers and stores ([`ServiceBase::prepare`] does):
/// an instrument registered while no recorder is installed stays a no-op.
///
/// [`ServiceBase::prepare`]: crate::service::ServiceBase::prepare
pub fn recorder() -> Option<&'static PrometheusHandle> {
    RECORDER
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets(&SECONDS_BUCKETS)
                .map_err(|e| tracing::error!(error = %e, "invalid histogram buckets"))
                .ok()?;
            match builder.install_recorder() {
                Ok(handle) => {
                    // Histograms are drained into their buckets by a scrape or by upkeep; upkeep
                    // bounds their memory when nobody scrapes.
                    let upkeep = handle.clone();
                    std::thread::Builder::new()
                        .name("metrics-upkeep".into())
                        .spawn(move || loop {
                            std::thread::sleep(Duration::from_secs(5));
                            upkeep.run_upkeep();
                        })
                        .map_err(|e| tracing::warn!(error = %e, "no metrics upkeep thread"))
                        .ok();
                    Some(handle)
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot install the Prometheus recorder");
                    None
                }
            }
        })
        .as_ref()
}

/// The dependencies `/ready` checks.
#[derive(Clone)]
pub struct Readiness {
    pool: PgPool,
    kafka: Arc<BaseProducer>,
    topic: String,
    redis: Option<redis::Client>,
}

impl Readiness {
    /// Checks `pool` and the Kafka `brokers` (metadata of `topic`).
    pub fn new(pool: PgPool, brokers: &str, topic: &str) -> anyhow::Result<Self> {
        // A client of its own: a metadata request on it never waits behind the relay's sends.
        let kafka: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .create()?;
        Ok(Self {
            pool,
            kafka: Arc::new(kafka),
            topic: topic.to_owned(),
            redis: None,
        })
    }

    /// Checks Redis at `url` as well (`PING` on a fresh connection).
    pub fn with_redis(mut self, url: &str) -> anyhow::Result<Self> {
        self.redis = Some(redis::Client::open(url)?);
        Ok(self)
    }

    /// Runs every check concurrently: `(ready, checks)`, each check `"ok"` or its error.
    pub async fn check(&self) -> (bool, Map<String, Value>) {
        let (postgres, kafka, redis) =
            tokio::join!(self.postgres(), self.kafka(), self.redis_ping());
        let mut checks = Map::new();
        let mut ready = true;
        let results = [
            ("postgres", Some(postgres)),
            ("kafka", Some(kafka)),
            ("redis", redis),
        ];
        for (name, result) in results {
            let Some(result) = result else { continue };
            ready &= result.is_ok();
            let value = match result {
                Ok(()) => "ok".to_owned(),
                Err(error) => error,
            };
            checks.insert(name.to_owned(), Value::String(value));
        }
        (ready, checks)
    }

    async fn postgres(&self) -> Result<(), String> {
        within_timeout(sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(&self.pool)).await
    }

    async fn kafka(&self) -> Result<(), String> {
        let client = self.kafka.clone();
        let topic = self.topic.clone();
        // librdkafka's metadata call blocks its thread until the answer or the timeout.
        let metadata = tokio::task::spawn_blocking(move || {
            client
                .client()
                .fetch_metadata(Some(&topic), CHECK_TIMEOUT)
                .map_err(|e| e.to_string())
                .and_then(|m| match m.topics().first().and_then(|t| t.error()) {
                    Some(error) => Err(format!("topic {topic}: {error:?}")),
                    None => Ok(()),
                })
        })
        .await;
        metadata.unwrap_or_else(|e| Err(e.to_string()))
    }

    async fn redis_ping(&self) -> Option<Result<(), String>> {
        let client = self.redis.as_ref()?;
        let ping = async {
            let config = redis::AsyncConnectionConfig::new()
                .set_connection_timeout(Some(CHECK_TIMEOUT))
                .set_response_timeout(Some(CHECK_TIMEOUT));
            let mut conn = client
                .get_multiplexed_async_connection_with_config(&config)
                .await?;
            redis::cmd("PING").query_async::<String>(&mut conn).await
        };
        Some(within_timeout(ping).await)
    }
}

/// `check`'s outcome within [`CHECK_TIMEOUT`]: `Ok`, or the error or the timeout as text.
async fn within_timeout<T, E: std::fmt::Display>(
    check: impl std::future::Future<Output = Result<T, E>>,
) -> Result<(), String> {
    match tokio::time::timeout(CHECK_TIMEOUT, check).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {CHECK_TIMEOUT:?}")),
    }
}

/// `GET /metrics` and `GET /ready`.
pub fn routes(readiness: Readiness) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/ready", get(ready))
        .with_state(readiness)
}

async fn metrics() -> Response {
    match recorder() {
        Some(handle) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            handle.render(),
        )
            .into_response(),
        None => (StatusCode::SERVICE_UNAVAILABLE, "no Prometheus recorder").into_response(),
    }
}

/// 200 `{"status":"ready","checks":{…}}`, or 503 `{"status":"unavailable","checks":{…}}`
/// with the failing dependency's error in its check.
async fn ready(State(readiness): State<Readiness>) -> Response {
    let (ready, checks) = readiness.check().await;
    if ready {
        (
            StatusCode::OK,
            Json(json!({ "status": "ready", "checks": checks })),
        )
            .into_response()
    } else {
        let failed: Vec<&String> = checks
            .iter()
            .filter(|(_, v)| *v != "ok")
            .map(|(k, _)| k)
            .collect();
        tracing::warn!(?failed, "not ready");
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "unavailable", "checks": checks })),
        )
            .into_response()
    }
}
