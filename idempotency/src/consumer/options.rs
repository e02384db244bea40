//! Connection options of the inbox consumer.

use rdkafka::ClientConfig;

use crate::Error;

/// Where and as whom the inbox consumes.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ConsumerOptions {
    /// Bootstrap servers, e.g. `127.0.0.1:9092`.
    pub brokers: String,
    /// Kafka consumer group: instances sharing it split the partitions.
    pub group_id: String,
    /// Name of the logical consumer in the processed-event guard. Usually equal to the group
    /// id; two groups sharing a name share their dedup records.
    pub consumer_name: String,
    /// Extra librdkafka settings applied last (e.g. `session.timeout.ms`; with the `metrics`
    /// feature, `statistics.interval.ms` sets how often the lag gauges refresh, default
    /// 5000). The runtime's own
    /// `enable.auto.commit=true` and `enable.auto.offset.store=false` must not be overridden.
    pub client_config: Vec<(String, String)>,
}

impl ConsumerOptions {
    /// Options with librdkafka defaults plus `auto.offset.reset=earliest`.
    pub fn new(
        brokers: impl Into<String>,
        group_id: impl Into<String>,
        consumer_name: impl Into<String>,
    ) -> ConsumerOptions {
        ConsumerOptions {
            brokers: brokers.into(),
            group_id: group_id.into(),
            consumer_name: consumer_name.into(),
            client_config: Vec::new(),
        }
    }

    /// Adds a librdkafka setting.
    pub fn set(mut self, key: impl Into<String>, value: impl Into<String>) -> ConsumerOptions {
        self.client_config.push((key.into(), value.into()));
        self
    }

    pub(crate) fn validate(&self) -> Result<(), Error> {
        if self.brokers.trim().is_empty() {
            return Err(Error::Config("brokers is empty".into()));
        }
        if self.group_id.trim().is_empty() {
            return Err(Error::Config("group_id is empty".into()));
        }
        if self.consumer_name.trim().is_empty() {
            return Err(Error::Config("consumer_name is empty".into()));
        }
        for (key, _) in &self.client_config {
            if key == "enable.auto.offset.store" || key == "enable.auto.commit" {
                return Err(Error::Config(format!(
                    "`{key}` is managed by the inbox (offsets are stored after the commit)"
                )));
            }
        }
        Ok(())
    }

    pub(crate) fn consumer_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.brokers)
            .set("group.id", &self.group_id)
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            // Offsets are stored by the runtime only after the PostgreSQL commit; librdkafka
            // commits stored offsets periodically, on revoke and on close.
            .set("enable.auto.commit", "true")
            .set("enable.auto.offset.store", "false");
        // The partition lag gauges come from librdkafka's statistics (a setting in
        // `client_config` overrides the interval; 0 turns them off).
        #[cfg(feature = "metrics")]
        config.set("statistics.interval.ms", "5000");
        for (key, value) in &self.client_config {
            config.set(key, value);
        }
        config
    }
}
