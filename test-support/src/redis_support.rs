use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::{env_or, START_HINT};

/// Default Redis used by the tests.
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";

/// The shared Redis, with a key prefix owned by one test.
pub struct TestRedis {
    /// Client for the shared Redis.
    pub client: redis::Client,
    /// URL of the shared Redis (`REDIS_URL` or [`DEFAULT_REDIS_URL`]).
    pub url: String,
    /// Unique key prefix for this test, e.g. `test:1b4e…:`.
    pub prefix: String,
}

impl TestRedis {
    /// Checks that Redis answers `PING` and returns a fresh prefix. Panics when unreachable.
    pub async fn connect() -> Self {
        let url = env_or("REDIS_URL", DEFAULT_REDIS_URL);
        let client = redis::Client::open(url.as_str())
            .unwrap_or_else(|e| panic!("REDIS_URL {url:?} is invalid: {e}"));
        let ping = async {
            let mut conn = client.get_multiplexed_async_connection().await?;
            redis::cmd("PING").query_async::<String>(&mut conn).await
        };
        match tokio::time::timeout(Duration::from_secs(5), ping).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("Redis is not reachable at {url}: {e}; {START_HINT}"),
            Err(_) => panic!("Redis at {url} did not answer within 5 s; {START_HINT}"),
        }
        let prefix = format!("test:{}:", uuid::Uuid::new_v4().simple());
        Self {
            client,
            url,
            prefix,
        }
    }

    /// A reconnecting connection to the shared Redis.
    pub async fn connection_manager(&self) -> ConnectionManager {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(Duration::from_secs(5)));
        ConnectionManager::new_with_config(self.client.clone(), config)
            .await
            .unwrap_or_else(|e| panic!("Redis at {}: {e}; {START_HINT}", self.url))
    }
}
