//! An in-memory OpenTelemetry pipeline for trace tests (feature `opentelemetry`): every
//! `tracing` span becomes an OpenTelemetry span kept in memory, to assert trace ids and
//! parent links.

use opentelemetry::trace::TracerProvider as _;
pub use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tracing_subscriber::layer::SubscriberExt as _;

/// The exporter that keeps the finished spans and the provider that feeds it.
pub struct SpanCapture {
    /// Read the finished spans with `get_finished_spans()`.
    pub exporter: InMemorySpanExporter,
    /// Exports each span as it ends (a simple exporter: no batching to flush).
    pub provider: SdkTracerProvider,
}

impl SpanCapture {
    /// A provider exporting every span to a fresh in-memory exporter.
    pub fn new() -> Self {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        Self { exporter, provider }
    }

    /// A subscriber recording `tracing` spans through this capture's provider; install it
    /// with `tracing::subscriber::set_default` (tests on a current-thread runtime) or
    /// `tracing::Dispatch::new`.
    pub fn subscriber(&self) -> impl tracing::Subscriber + Send + Sync + 'static {
        tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(self.provider.tracer("test")))
    }
}

impl Default for SpanCapture {
    fn default() -> Self {
        Self::new()
    }
}
