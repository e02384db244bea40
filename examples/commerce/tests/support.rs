//! Runs the real service binaries against the real PostgreSQL, Redis and broker, each test
//! with its own databases, topic, consumer groups, inventory namespace and ports.

#![allow(dead_code, unreachable_pub)] // a helper module of the test binaries

use std::collections::HashMap;
use std::process::Stdio;
use std::time::Duration;

use eventful_test_support::{kafka, spare_port, wait_until, TestDatabase, TestRedis};
use serde_json::Value;
use sqlx::PgPool;
use tokio::process::{Child, Command};
use uuid::Uuid;

pub const SERVICES: [&str; 4] = ["order", "payment", "shipping", "notification"];
pub const SKU: &str = "SKU-1";

pub fn user() -> Uuid {
    Uuid::new_v4()
}

/// One isolated commerce system: four child processes sharing a topic.
pub struct System {
    env: Vec<(String, String)>,
    ports: HashMap<&'static str, u16>,
    children: HashMap<&'static str, Child>,
    pub http: reqwest::Client,
    pub topic: String,
    pub database_prefix: String,
    pub brokers: String,
}

/// Knobs a test may turn.
pub struct Options {
    pub reservation_ttl_ms: u64,
    pub payment_limit: i64,
    /// Partitions of the test's topic. One by default: a marker event then proves that
    /// everything before it was consumed.
    pub partitions: i32,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            reservation_ttl_ms: 600_000,
            payment_limit: 1_000,
            partitions: 1,
        }
    }
}

impl System {
    /// Starts the named services and waits for their `/health`.
    pub async fn start(services: &[&'static str], options: Options) -> Self {
        eventful_test_support::init_tracing();
        // Fail loudly, naming the service, when one is missing.
        let _ = TestRedis::connect().await;
        let brokers = kafka::brokers();
        kafka::require_broker(&brokers).await;
        let id = Uuid::new_v4().simple().to_string();
        let topic = format!("test-commerce-{id}");
        kafka::create_topic_on(&brokers, &topic, options.partitions).await;
        let database_prefix = format!("eventful_test_{}_", &id[..12]);
        let ports: HashMap<&'static str, u16> =
            SERVICES.iter().map(|s| (*s, spare_port())).collect();
        let mut env = vec![
            ("DATABASE_URL".to_owned(), TestDatabase::admin_url()),
            ("KAFKA_BROKERS".to_owned(), brokers.clone()),
            ("COMMERCE_TOPIC".to_owned(), topic.clone()),
            (
                "COMMERCE_TOPIC_PARTITIONS".to_owned(),
                options.partitions.to_string(),
            ),
            (
                "COMMERCE_DATABASE_PREFIX".to_owned(),
                database_prefix.clone(),
            ),
            ("COMMERCE_GROUP_PREFIX".to_owned(), format!("test-{id}")),
            ("COMMERCE_INVENTORY".to_owned(), format!("test-{id}")),
            (
                "ORDER_RESERVATION_TTL_MS".to_owned(),
                options.reservation_ttl_ms.to_string(),
            ),
            ("ORDER_EXPIRY_INTERVAL_MS".to_owned(), "200".to_owned()),
            (
                "PAYMENT_LIMIT".to_owned(),
                options.payment_limit.to_string(),
            ),
            // A SIGKILLed member keeps its partitions until its session times out: keep the
            // hand-over short.
            ("COMMERCE_SESSION_TIMEOUT_MS".to_owned(), "6000".to_owned()),
            (
                "RUST_LOG".to_owned(),
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".to_owned()),
            ),
        ];
        if let Ok(url) = std::env::var("REDIS_URL") {
            env.push(("REDIS_URL".to_owned(), url));
        }
        for service in SERVICES {
            env.push((
                format!("{}_ADDR", service.to_uppercase()),
                format!("127.0.0.1:{}", ports[service]),
            ));
        }
        let mut system = Self {
            env,
            ports,
            children: HashMap::new(),
            http: reqwest::Client::new(),
            topic,
            database_prefix,
            brokers,
        };
        for service in services {
            system.spawn(service).await;
        }
        system
    }

    fn binary(service: &str) -> &'static str {
        match service {
            "order" => env!("CARGO_BIN_EXE_order"),
            "payment" => env!("CARGO_BIN_EXE_payment"),
            "shipping" => env!("CARGO_BIN_EXE_shipping"),
            "notification" => env!("CARGO_BIN_EXE_notification"),
            other => panic!("no service {other}"),
        }
    }

    /// Starts `service` and waits until its `/health` answers.
    pub async fn spawn(&mut self, service: &'static str) {
        // Each service logs to a file of its own (appended across restarts), for post-mortems.
        let log_path = std::env::temp_dir().join(format!("{}{service}.log", self.database_prefix));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .unwrap_or_else(|e| panic!("{}: {e}", log_path.display()));
        let child = Command::new(Self::binary(service))
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {service}: {e}"));
        self.children.insert(service, child);
        let url = self.url(service, "/health");
        let http = self.http.clone();
        wait_until(
            &format!("{service} answers /health"),
            Duration::from_secs(60),
            || {
                let http = http.clone();
                let url = url.clone();
                async move {
                    matches!(http.get(&url).send().await, Ok(r) if r.status().is_success())
                }
            },
        )
        .await;
    }

    /// SIGKILLs `service` (no graceful shutdown) and waits for it to exit.
    pub async fn kill(&mut self, service: &str) {
        if let Some(mut child) = self.children.remove(service) {
            child.start_kill().unwrap();
            child.wait().await.unwrap();
        }
    }

    pub fn url(&self, service: &str, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.ports[service])
    }

    pub async fn set_stock(&self, sku: &str, available: u64) {
        let response = self
            .http
            .put(self.url("order", &format!("/stock/{sku}")))
            .json(&serde_json::json!({ "available": available }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{:?}", response.text().await);
    }

    /// `(available, held, sold)` of `sku`.
    pub async fn stock(&self, sku: &str) -> (u64, u64, u64) {
        let body: Value = self
            .http
            .get(self.url("order", &format!("/stock/{sku}")))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let field = |name: &str| body[name].as_u64().unwrap();
        (field("available"), field("held"), field("sold"))
    }

    /// Posts `body` to `/orders`; returns the status and the JSON answer.
    pub async fn post_orders(&self, body: &Value) -> (u16, Value) {
        let response = self
            .http
            .post(self.url("order", "/orders"))
            .json(body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Places one order for `quantity` of `sku`; `None` when it was left out for want of stock.
    pub async fn order(&self, amount: i64, sku: &str, quantity: u32) -> Option<Uuid> {
        let body = serde_json::json!([{
            "userId": user(), "totalAmount": amount,
            "items": [{ "sku": sku, "quantity": quantity }]
        }]);
        let (status, ids) = self.post_orders(&body).await;
        assert_eq!(status, 201, "{ids}");
        let ids = ids.as_array().unwrap();
        ids.first()
            .map(|id| Uuid::parse_str(id.as_str().unwrap()).unwrap())
    }

    pub async fn get_order(&self, id: Uuid) -> Value {
        self.http
            .get(self.url("order", &format!("/orders/{id}")))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Waits until order `id` is in `status`.
    pub async fn wait_status(&self, id: Uuid, status: &str, timeout: Duration) -> Value {
        let what = format!("order {id} is {status}");
        wait_until(&what, timeout, || async {
            self.get_order(id).await["status"] == status
        })
        .await;
        self.get_order(id).await
    }

    /// Waits until every order in `ids` is terminal; returns their statuses.
    pub async fn wait_terminal(&self, ids: &[Uuid], timeout: Duration) -> HashMap<Uuid, String> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut statuses = HashMap::new();
        for id in ids {
            loop {
                let status = self.get_order(*id).await["status"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                if ["SHIPPING", "ORDER_CANCELED", "ORDER_EXPIRED"].contains(&status.as_str()) {
                    statuses.insert(*id, status);
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "order {id} still {status} after {timeout:?}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        statuses
    }

    /// A pool on `service`'s database, to count rows.
    pub async fn database(&self, service: &str) -> PgPool {
        let url = eventful_test_support::database_url(
            &TestDatabase::admin_url(),
            &format!("{}{service}_service", self.database_prefix),
        );
        PgPool::connect(&url).await.unwrap()
    }

    pub async fn count(&self, service: &str, sql: &str) -> i64 {
        let pool = self.database(service).await;
        let count = sqlx::query_scalar(sql).fetch_one(&pool).await.unwrap();
        pool.close().await;
        count
    }
}

/// Waits until `sql` (a count on `service`'s database) reaches `expected`.
pub async fn wait_for_count(
    system: &System,
    service: &str,
    sql: &str,
    expected: i64,
    timeout: Duration,
) {
    let what = format!("{service}: {sql} reaches {expected}");
    wait_until(&what, timeout, || async {
        system.count(service, sql).await >= expected
    })
    .await;
    assert_eq!(system.count(service, sql).await, expected, "{sql}");
}
