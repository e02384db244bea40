//! Dead-letter destinations: a PostgreSQL table or a Kafka topic.

use std::time::Duration;

use eventful_core::headers;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use sqlx::PgPool;

use super::options::ConsumerOptions;
use super::partition::RawMessage;
use crate::{Error, EventMeta};

/// Where messages that cannot be processed go.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeadLetter {
    /// Rows in `eventful_dead_letters` (consumer, topic, partition, offset, event id and type,
    /// key, payload, headers as JSON, error, time). One row per message position: a
    /// redelivered poison message does not add a second row.
    Table,
    /// A Kafka topic (create it beforehand): the original key, payload and headers plus
    /// `dead-letter-error`, `dead-letter-consumer`, `dead-letter-topic`,
    /// `dead-letter-partition` and `dead-letter-offset` headers. At-least-once: a crash right
    /// after the send may send it again.
    Topic(String),
}

pub(crate) enum Destination {
    Table,
    Topic {
        topic: String,
        producer: FutureProducer,
    },
}

impl Destination {
    pub(crate) fn new(
        dead_letter: &DeadLetter,
        options: &ConsumerOptions,
    ) -> Result<Destination, Error> {
        Ok(match dead_letter {
            DeadLetter::Table => Destination::Table,
            DeadLetter::Topic(topic) => {
                if topic.trim().is_empty() {
                    return Err(Error::Config("dead-letter topic name is empty".into()));
                }
                let producer = ClientConfig::new()
                    .set("bootstrap.servers", &options.brokers)
                    .set("enable.idempotence", "true")
                    .set("message.timeout.ms", "30000")
                    .create()?;
                Destination::Topic {
                    topic: topic.clone(),
                    producer,
                }
            }
        })
    }

    pub(crate) async fn write(
        &self,
        pool: &PgPool,
        consumer: &str,
        message: &RawMessage,
        meta: Option<&EventMeta>,
        error: &str,
    ) -> Result<(), Error> {
        match self {
            Destination::Table => {
                let headers: Vec<(String, String)> = message
                    .headers
                    .iter()
                    .map(|(k, v)| (k.clone(), String::from_utf8_lossy(v).into_owned()))
                    .collect();
                sqlx::query(
                    "INSERT INTO eventful_dead_letters \
                       (consumer, topic, \"partition\", \"offset\", event_id, event_type, key, payload, headers, error) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
                     ON CONFLICT (consumer, topic, \"partition\", \"offset\") DO NOTHING",
                )
                .bind(consumer)
                .bind(&message.topic)
                .bind(message.partition)
                .bind(message.offset)
                .bind(meta.map(|m| m.id))
                .bind(meta.map(|m| m.event_type.as_str()))
                .bind(message.key.as_deref())
                .bind(message.payload.as_deref())
                .bind(serde_json::to_value(&headers)?)
                .bind(error)
                .execute(pool)
                .await?;
                Ok(())
            }
            Destination::Topic { topic, producer } => {
                let mut headers = OwnedHeaders::new_with_capacity(message.headers.len() + 5);
                for (key, value) in &message.headers {
                    headers = headers.insert(Header {
                        key,
                        value: Some(value.as_slice()),
                    });
                }
                let partition = message.partition.to_string();
                let offset = message.offset.to_string();
                for (key, value) in [
                    (headers::DEAD_LETTER_ERROR, error),
                    (headers::DEAD_LETTER_CONSUMER, consumer),
                    (headers::DEAD_LETTER_TOPIC, message.topic.as_str()),
                    (headers::DEAD_LETTER_PARTITION, partition.as_str()),
                    (headers::DEAD_LETTER_OFFSET, offset.as_str()),
                ] {
                    headers = headers.insert(Header {
                        key,
                        value: Some(value),
                    });
                }
                let mut record: FutureRecord<'_, [u8], [u8]> =
                    FutureRecord::to(topic).headers(headers);
                if let Some(key) = &message.key {
                    record = record.key(key.as_slice());
                }
                if let Some(payload) = &message.payload {
                    record = record.payload(payload.as_slice());
                }
                producer
                    .send(record, Duration::from_secs(30))
                    .await
                    .map_err(|(e, _)| Error::Kafka(e))?;
                Ok(())
            }
        }
    }
}
