//! Logs and traces: a `tracing` subscriber that logs to stderr and, with an exporter chosen
//! by `COMMERCE_TRACE_EXPORTER`, turns spans into OpenTelemetry spans.
//!
//! One order is one trace across the four services: the HTTP span of `POST /orders`
//! (continuing an incoming `traceparent` header, if any) records `ORDER_RESERVED` through
//! the outbox, whose `traceparent_source` writes the recording span's context into the
//! event's `traceparent` header ([`crate::service::ServiceBase`]); the inbox of the next
//! service parents its handler span on it, and the saga `Emitter` passes the handler's
//! context on to the events it emits. With the default exporter (`none`) no OpenTelemetry
//! layer is installed, nothing is exported and the events carry no `traceparent`.

use std::time::Duration;

use axum::extract::MatchedPath;
use axum::http::{Request, Response};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tower_http::classify::{ServerErrorsAsFailures, SharedClassifier};
use tower_http::trace::{DefaultOnRequest, MakeSpan, OnResponse, TraceLayer};
use tracing::Span;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

/// Where the services' spans go (`COMMERCE_TRACE_EXPORTER`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum TraceExporter {
    /// No OpenTelemetry: logs only, and events carry no `traceparent`.
    #[default]
    None,
    /// Every finished span as JSON on stdout (batched), for a look without a collector.
    Stdout,
}

/// Which spans become OpenTelemetry spans: the HTTP requests, the outbox recording, the
/// inbox handlers and the relay batches are at `info`; the saga participant span (`debug`)
/// is the one whose context an emitted event carries.
pub const SPAN_FILTER: &str = "info,eventful_saga=debug";

/// The installed subscriber's tracer provider; [`Telemetry::shutdown`] flushes it.
#[derive(Debug, Default)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports the spans still buffered and stops the exporter.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider {
            if let Err(error) = provider.shutdown() {
                eprintln!("trace exporter shutdown: {error}");
            }
        }
    }
}

/// Installs the global subscriber: logs to stderr (`RUST_LOG`, default `info`) and, unless
/// `exporter` is [`TraceExporter::None`], OpenTelemetry spans to that exporter.
pub fn init(exporter: TraceExporter) -> Telemetry {
    let provider = match exporter {
        TraceExporter::None => None,
        TraceExporter::Stdout => Some(
            SdkTracerProvider::builder()
                .with_batch_exporter(opentelemetry_stdout::SpanExporter::default())
                .build(),
        ),
    };
    let _ = subscriber(provider.as_ref()).try_init();
    Telemetry { provider }
}

/// The subscriber [`init`] installs, with spans going to `provider` (when given): tests
/// install it with an in-memory exporter.
pub fn subscriber(
    provider: Option<&SdkTracerProvider>,
) -> impl tracing::Subscriber + Send + Sync + 'static {
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")));
    let spans = provider.map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("commerce"))
            .with_filter(EnvFilter::new(SPAN_FILTER))
    });
    tracing_subscriber::registry().with(logs).with(spans)
}

/// The request span of every service: named `METHOD /route` (the route template, not the
/// path, so `GET /orders/{id}` is one name), a child of the caller's span when the request
/// carries a W3C `traceparent` header.
pub type HttpTraceLayer =
    TraceLayer<SharedClassifier<ServerErrorsAsFailures>, HttpSpan, DefaultOnRequest, HttpStatus>;

/// The [`HttpTraceLayer`] the services wrap their routes in.
pub fn http_trace_layer() -> HttpTraceLayer {
    TraceLayer::new_for_http()
        .make_span_with(HttpSpan)
        .on_response(HttpStatus)
}

/// Makes the request span (see [`HttpTraceLayer`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct HttpSpan;

impl<B> MakeSpan<B> for HttpSpan {
    fn make_span(&mut self, request: &Request<B>) -> Span {
        let route = request
            .extensions()
            .get::<MatchedPath>()
            .map_or("unmatched", MatchedPath::as_str);
        let span = tracing::info_span!(
            "http.request",
            otel.name = format!("{} {route}", request.method()),
            otel.kind = "server",
            http.request.method = %request.method(),
            http.route = route,
            url.path = request.uri().path(),
            http.response.status_code = tracing::field::Empty,
        );
        let traceparent = request
            .headers()
            .get(eventful_core::headers::TRACEPARENT)
            .and_then(|value| value.to_str().ok());
        if let Some(traceparent) = traceparent {
            eventful_core::otel::set_parent(&span, traceparent);
        }
        span
    }
}

/// Records the response status on the request span.
#[derive(Debug, Clone, Copy, Default)]
pub struct HttpStatus;

impl<B> OnResponse<B> for HttpStatus {
    fn on_response(self, response: &Response<B>, _latency: Duration, span: &Span) {
        span.record("http.response.status_code", response.status().as_u16());
    }
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::routing::get;
    use axum::Router;
    use clap::Parser as _;
    use opentelemetry::trace::{SpanId, TraceId};
    use opentelemetry_sdk::trace::InMemorySpanExporter;
    use tower::ServiceExt as _;

    use super::*;

    /// An incoming `traceparent` makes the request span the caller's child; the span is
    /// named by the route template and records the status.
    #[tokio::test]
    async fn the_request_span_continues_the_callers_trace() {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let _default = tracing::subscriber::set_default(subscriber(Some(&provider)));
        let app = Router::new()
            .route("/orders/{id}", get(|| async { "ok" }))
            .layer(http_trace_layer());
        let request = Request::get("/orders/42")
            .header(
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            )
            .body(Body::empty())
            .unwrap();
        let response = app.oneshot(request).await.unwrap();
        assert_eq!(response.status(), 200);
        drop(response);
        provider.force_flush().unwrap();
        let spans = exporter.get_finished_spans().unwrap();
        let [span] = spans.as_slice() else {
            panic!("one span: {spans:#?}")
        };
        assert_eq!(span.name, "GET /orders/{id}");
        assert_eq!(
            span.span_context.trace_id(),
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap()
        );
        assert_eq!(
            span.parent_span_id,
            SpanId::from_hex("00f067aa0ba902b7").unwrap()
        );
        assert!(span.attributes.iter().any(|kv| {
            kv.key.as_str() == "http.response.status_code" && kv.value.as_str() == "200"
        }));
    }

    #[test]
    fn the_exporter_is_none_unless_chosen() {
        let default = crate::config::Settings::try_parse_from(["commerce"]).unwrap();
        let stdout =
            crate::config::Settings::try_parse_from(["commerce", "--trace-exporter", "stdout"])
                .unwrap();
        // The variable may be set in the environment of whoever runs the tests.
        if std::env::var_os("COMMERCE_TRACE_EXPORTER").is_none() {
            assert_eq!(default.trace_exporter, TraceExporter::None);
        }
        assert_eq!(stdout.trace_exporter, TraceExporter::Stdout);
    }
}
