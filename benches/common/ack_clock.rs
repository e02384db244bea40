//! Shared by the outbox benches (`outbox`, `outbox_xmin`): an env knob reader and a publisher
//! wrapper that notes when each event was acknowledged.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use eventful_outbox::{Error, KafkaPublisher, OutboxRecord, Publisher};
use uuid::Uuid;

pub(crate) fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Wraps the Kafka publisher and notes when each event was acknowledged.
pub(crate) struct AckClock {
    pub(crate) inner: KafkaPublisher,
    pub(crate) acks: Arc<Mutex<HashMap<Uuid, Instant>>>,
    pub(crate) count: Arc<AtomicUsize>,
}

impl Publisher for AckClock {
    fn publish_batch<'a, 'b, 'c>(
        &'a self,
        events: &'b [OutboxRecord],
    ) -> Pin<Box<dyn Future<Output = Vec<Result<(), Error>>> + Send + 'c>>
    where
        'a: 'c,
        'b: 'c,
        Self: 'c,
    {
        Box::pin(async move {
            let results = self.inner.publish_batch(events).await;
            let now = Instant::now();
            let mut acks = self.acks.lock().unwrap();
            for (event, result) in events.iter().zip(&results) {
                if result.is_ok() && acks.insert(event.id, now).is_none() {
                    self.count.fetch_add(1, Ordering::Relaxed);
                }
            }
            results
        })
    }
}
