//! [`KafkaPublisher`]: an idempotent rdkafka producer (feature `kafka`).

use std::collections::{HashMap, VecDeque};
use std::sync::RwLock;
use std::time::Duration;

use async_trait::async_trait;
use futures::future::{self, Either};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use rdkafka::ClientConfig;

use super::{earlier_event_failed, Publisher};
use crate::{Error, OutboxRecord};

/// Publishes to Kafka with `enable.idempotence=true` and `acks=all`.
///
/// Per the wire contract the event key becomes the message key, the payload the value, and
/// `event-id`, `event-type`, `content-type` plus the user's headers become Kafka headers.
/// A batch keeps at most one event per key in flight (see
/// [`publish_batch`](Publisher::publish_batch)); only delivered events are reported `Ok`. After a batch with failed deliveries (or a fatal producer error) the
/// producer is replaced by a fresh one (new idempotent producer id), so a broker that lost
/// track of the producer's sequence numbers during an outage cannot wedge it.
pub struct KafkaPublisher {
    config: ClientConfig,
    producer: RwLock<FutureProducer>,
}

impl std::fmt::Debug for KafkaPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaPublisher")
            .field("bootstrap.servers", &self.config.get("bootstrap.servers"))
            .finish()
    }
}

/// Builder for [`KafkaPublisher`].
///
/// Defaults: `enable.idempotence=true`, `acks=all`, `linger.ms=2` (a batch is enqueued at
/// once, so a long linger only adds latency), `message.timeout.ms=30000` (a delivery that
/// has not succeeded by then fails as retryable and the relay backs off).
#[derive(Clone, Debug)]
pub struct KafkaPublisherBuilder {
    config: ClientConfig,
}

impl KafkaPublisherBuilder {
    /// How long librdkafka keeps trying to deliver one message (`message.timeout.ms`).
    pub fn message_timeout(mut self, timeout: Duration) -> Self {
        self.config
            .set("message.timeout.ms", timeout.as_millis().to_string());
        self
    }

    /// `linger.ms`.
    pub fn linger(mut self, linger: Duration) -> Self {
        self.config.set("linger.ms", linger.as_millis().to_string());
        self
    }

    /// Any other librdkafka producer property. `enable.idempotence` cannot be turned off.
    pub fn set(mut self, key: &str, value: impl Into<String>) -> Self {
        self.config.set(key, value);
        self
    }

    /// Creates the producer.
    pub fn build(mut self) -> Result<KafkaPublisher, Error> {
        self.config.set("enable.idempotence", "true");
        self.config.set("acks", "all");
        let producer = create(&self.config)?;
        Ok(KafkaPublisher {
            config: self.config,
            producer: RwLock::new(producer),
        })
    }
}

fn create(config: &ClientConfig) -> Result<FutureProducer, Error> {
    config
        .create()
        .map_err(|e| Error::Config(format!("cannot create the Kafka producer: {e}")))
}

impl KafkaPublisher {
    /// A builder for the brokers `bootstrap_servers` (e.g. `127.0.0.1:9092`).
    pub fn builder(bootstrap_servers: &str) -> KafkaPublisherBuilder {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", bootstrap_servers)
            .set("linger.ms", "2")
            .set("message.timeout.ms", "30000");
        KafkaPublisherBuilder { config }
    }

    /// A publisher with the default settings.
    pub fn new(bootstrap_servers: &str) -> Result<KafkaPublisher, Error> {
        Self::builder(bootstrap_servers).build()
    }

    fn producer(&self) -> FutureProducer {
        match self.producer.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Swaps in a new producer; the old one is dropped on a blocking thread (librdkafka's
    /// destroy may wait).
    fn replace(&self, old: FutureProducer) {
        if let Some((code, reason)) = old.client().fatal_error() {
            tracing::error!(?code, %reason, "fatal Kafka producer error");
        }
        tracing::info!("replacing the Kafka producer after failed deliveries");
        match create(&self.config) {
            Ok(fresh) => {
                let previous = match self.producer.write() {
                    Ok(mut guard) => std::mem::replace(&mut *guard, fresh),
                    Err(poisoned) => std::mem::replace(&mut *poisoned.into_inner(), fresh),
                };
                tokio::task::spawn_blocking(move || drop((old, previous)));
            }
            Err(e) => tracing::error!(error = %e, "cannot re-create the Kafka producer"),
        }
    }

    /// Waits up to `timeout` for messages still queued in librdkafka to be delivered.
    pub fn flush(&self, timeout: Duration) -> Result<(), Error> {
        self.producer().flush(timeout).map_err(|e| map_error(&e))
    }
}

/// Why one event of a batch was not delivered.
enum Failure {
    /// Rejected before it was enqueued (nothing was sent).
    Enqueue(KafkaError),
    /// Enqueued, but the delivery report is an error.
    Delivery(KafkaError),
    /// Not sent because an earlier event of its key failed.
    Skipped(String),
    /// The producer went away before reporting.
    Dropped,
}

/// Enqueues `event`; the future resolves with its delivery report.
fn send(
    producer: &FutureProducer,
    event: &OutboxRecord,
) -> impl std::future::Future<Output = Result<(), Failure>> + Send + 'static {
    let wire = event.wire_headers();
    let mut headers = OwnedHeaders::new_with_capacity(wire.len());
    for (name, value) in &wire {
        headers = headers.insert(Header {
            key: name,
            value: Some(value.as_bytes()),
        });
    }
    let record = FutureRecord::to(&event.topic)
        .key(event.key.as_bytes())
        .payload(&event.payload)
        .headers(headers);
    match producer.send_result(record) {
        Ok(delivery) => Either::Right(async move {
            match delivery.await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err((e, _))) => Err(Failure::Delivery(e)),
                Err(_) => Err(Failure::Dropped),
            }
        }),
        Err((e, _)) => Either::Left(future::ready(Err(Failure::Enqueue(e)))),
    }
}

#[async_trait]
impl Publisher for KafkaPublisher {
    /// Sends in waves: each wave sends the oldest unsent event of every key at once and
    /// awaits their delivery reports; a key's next event goes out in the next wave, and only
    /// if this one was delivered. So at most one event per key is in flight: a failed event
    /// can never be overtaken by a later one of its key (librdkafka alone does not prevent
    /// that once a message fails for good: the later one may travel in another produce
    /// request and be appended). A batch costs one round trip per event of its busiest key;
    /// events of different keys travel together.
    ///
    /// A broker rejects a whole produce request (all the events of one partition in it) when
    /// one event is too large, so a permanent delivery error in a wave of several events is
    /// checked by sending that event again alone: only an event that fails alone is
    /// reported failed. (This assumes no other batch is in flight on the same publisher; the
    /// relay publishes one batch at a time.)
    async fn publish_batch(&self, events: &[OutboxRecord]) -> Vec<Result<(), Error>> {
        let producer = self.producer();
        // Per key (in order of first appearance), its events' indices in batch order.
        let mut key_index: HashMap<&str, usize> = HashMap::new();
        let mut queues: Vec<VecDeque<usize>> = Vec::new();
        for (i, event) in events.iter().enumerate() {
            let k = *key_index.entry(event.key.as_str()).or_insert_with(|| {
                queues.push(VecDeque::new());
                queues.len() - 1
            });
            queues[k].push_back(i);
        }
        let mut outcomes: Vec<Option<Result<(), Failure>>> =
            std::iter::repeat_with(|| None).take(events.len()).collect();
        let mut delivery_failed = false;
        loop {
            let heads: Vec<(usize, usize)> = queues
                .iter_mut()
                .enumerate()
                .filter_map(|(k, q)| q.pop_front().map(|i| (k, i)))
                .collect();
            if heads.is_empty() {
                break;
            }
            let sends: Vec<_> = heads
                .iter()
                .map(|&(_, i)| send(&producer, &events[i]))
                .collect();
            let reports = future::join_all(sends).await;
            let crowded = heads.len() > 1;
            for (&(k, i), report) in heads.iter().zip(reports) {
                let report = match report {
                    Err(Failure::Delivery(e)) if crowded && is_permanent(&e) => {
                        tracing::debug!(event_id = %events[i].id, error = %e, "rejected in a shared request; sending it alone");
                        send(&producer, &events[i]).await
                    }
                    other => other,
                };
                if let Err(failure) = &report {
                    if matches!(failure, Failure::Delivery(e) if !is_permanent(e)) {
                        delivery_failed = true;
                    }
                    // The rest of this key stays unsent (and is reported retryable).
                    for j in queues[k].drain(..) {
                        outcomes[j] = Some(Err(Failure::Skipped(events[j].key.clone())));
                    }
                }
                outcomes[i] = Some(report);
            }
        }
        // Every delivery of this batch has reported, so nothing of ours is left in the
        // producer. After a failed delivery (timeouts during an outage, or a broker that lost
        // track of the idempotent producer's sequence numbers and now rejects every message)
        // start over with a fresh producer id rather than risk a wedged producer.
        if delivery_failed || producer.client().fatal_error().is_some() {
            self.replace(producer);
        }
        outcomes
            .into_iter()
            .map(|o| {
                o.unwrap_or(Err(Failure::Dropped))
                    .map_err(|failure| match failure {
                        Failure::Enqueue(e) | Failure::Delivery(e) => map_error(&e),
                        Failure::Skipped(key) => earlier_event_failed(&key),
                        Failure::Dropped => Error::PublishRetryable(
                            "the Kafka producer was dropped before delivery".to_owned(),
                        ),
                    })
            })
            .collect()
    }
}

fn is_permanent(error: &KafkaError) -> bool {
    matches!(map_error(error), Error::PublishPermanent(_))
}

fn map_error(error: &KafkaError) -> Error {
    let permanent = matches!(
        error.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::InvalidMessageSize
                | RDKafkaErrorCode::InvalidMessage
                | RDKafkaErrorCode::InvalidRecord
                | RDKafkaErrorCode::InvalidTopic
                | RDKafkaErrorCode::TopicAuthorizationFailed
                | RDKafkaErrorCode::PolicyViolation
        )
    );
    if permanent {
        Error::PublishPermanent(error.to_string())
    } else {
        Error::PublishRetryable(error.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_errors_are_permanent_timeouts_retryable() {
        let too_big = KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge);
        assert!(matches!(map_error(&too_big), Error::PublishPermanent(_)));
        let timeout = KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut);
        assert!(map_error(&timeout).is_retryable());
        let unknown = KafkaError::MessageProduction(RDKafkaErrorCode::UnknownTopicOrPartition);
        assert!(map_error(&unknown).is_retryable());
    }

    #[test]
    fn idempotence_cannot_be_disabled() {
        let publisher = KafkaPublisher::builder("127.0.0.1:1")
            .set("enable.idempotence", "false")
            .build()
            .unwrap();
        assert_eq!(publisher.config.get("enable.idempotence"), Some("true"));
        assert_eq!(publisher.config.get("acks"), Some("all"));
    }
}
