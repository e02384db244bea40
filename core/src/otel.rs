//! W3C trace context across the outbox gap, for OpenTelemetry through
//! `tracing-opentelemetry` (feature `opentelemetry`).
//!
//! The producer side formats the context of the current `tracing` span as a
//! [`TRACEPARENT`] header value ([`current_traceparent`], what the outbox's
//! `traceparent_source` takes); the consumer side makes an event's `traceparent` the
//! OpenTelemetry parent of the span that handles it ([`set_parent`]). Both use the W3C
//! `TraceContextPropagator` directly, not the global propagator: the header contract is
//! `traceparent`, whatever the application installed globally.
//!
//! Without an `OpenTelemetryLayer` in the subscriber there is no context to read or to
//! set: [`current_traceparent`] returns `None` and [`set_parent`] does nothing.
//!
//! ```
//! use eventful_core::otel;
//!
//! // No OpenTelemetry layer installed here: nothing to propagate.
//! assert_eq!(otel::current_traceparent(), None);
//! let span = tracing::info_span!("handle");
//! assert!(!otel::set_parent(&span, "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"));
//! assert!(!otel::set_parent(&span, "not a traceparent"));
//! ```

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator as _;
use opentelemetry::trace::TraceContextExt as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::headers::TRACEPARENT;

/// The W3C `traceparent` of the current `tracing` span's OpenTelemetry context, or `None`
/// when there is none (no OpenTelemetry layer, or no span). Give it to the outbox:
/// `Outbox::builder().traceparent_source(eventful_outbox::otel::current_traceparent)`.
pub fn current_traceparent() -> Option<String> {
    traceparent_of(&tracing::Span::current())
}

/// The W3C `traceparent` of `span`'s OpenTelemetry context, or `None` when it has no valid
/// one.
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    let context = span.context();
    if !context.span().span_context().is_valid() {
        return None;
    }
    let mut carrier: HashMap<String, String> = HashMap::new();
    TraceContextPropagator::new().inject_context(&context, &mut carrier);
    carrier.remove(TRACEPARENT)
}

/// The remote OpenTelemetry context a W3C `traceparent` value names, or `None` when the
/// value is not a valid `traceparent`.
pub fn context_of(traceparent: &str) -> Option<opentelemetry::Context> {
    let carrier = HashMap::from([(TRACEPARENT.to_owned(), traceparent.trim().to_owned())]);
    let context = TraceContextPropagator::new().extract(&carrier);
    context.span().span_context().is_valid().then_some(context)
}

/// Makes the span `traceparent` names the OpenTelemetry parent of `span`; `true` when it
/// did. Call it right after creating `span`, before it is first entered. An invalid value,
/// a span without an OpenTelemetry layer, or one already started is left as it is (a
/// broken trace must not fail the event).
pub fn set_parent(span: &tracing::Span, traceparent: &str) -> bool {
    let Some(context) = context_of(traceparent) else {
        tracing::debug!(traceparent, "ignoring an invalid traceparent");
        return false;
    };
    match span.set_parent(context) {
        Ok(()) => true,
        Err(error) => {
            tracing::trace!(%error, "span not parented on the event's traceparent");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use eventful_test_support::otel::{InMemorySpanExporter, SdkTracerProvider, SpanCapture};
    use opentelemetry::trace::{SpanId, TraceId};

    use super::*;

    const TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
    const PARENT: &str = "b7ad6b7169203331";

    fn capture() -> (InMemorySpanExporter, SdkTracerProvider, tracing::Dispatch) {
        let capture = SpanCapture::new();
        let dispatch = tracing::Dispatch::new(capture.subscriber());
        (capture.exporter, capture.provider, dispatch)
    }

    /// The consumer side: a span parented on a traceparent joins that trace under that span,
    /// and its own traceparent (the producer side) names itself in the same trace.
    #[test]
    fn a_span_parented_on_a_traceparent_continues_its_trace() {
        let (exporter, provider, dispatch) = capture();
        let propagated = tracing::dispatcher::with_default(&dispatch, || {
            let span = tracing::info_span!("handle");
            assert!(set_parent(&span, &format!("00-{TRACE}-{PARENT}-01")));
            let _entered = span.enter();
            current_traceparent()
        });
        provider.force_flush().unwrap();
        let spans = exporter.get_finished_spans().unwrap();
        let [span] = spans.as_slice() else {
            panic!("one span expected: {spans:?}")
        };
        assert_eq!(
            span.span_context.trace_id(),
            TraceId::from_hex(TRACE).unwrap()
        );
        assert_eq!(span.parent_span_id, SpanId::from_hex(PARENT).unwrap());
        assert_eq!(
            propagated.as_deref(),
            Some(format!("00-{TRACE}-{}-01", span.span_context.span_id()).as_str())
        );
    }

    #[test]
    fn without_a_valid_traceparent_a_span_starts_its_own_trace() {
        let (exporter, provider, dispatch) = capture();
        tracing::dispatcher::with_default(&dispatch, || {
            for value in ["", "00-zz-yy-01", &format!("00-{:032}-{PARENT}-01", 0)] {
                let span = tracing::info_span!("handle");
                assert!(!set_parent(&span, value), "{value:?}");
                drop(span.enter());
            }
        });
        provider.force_flush().unwrap();
        let spans = exporter.get_finished_spans().unwrap();
        assert_eq!(spans.len(), 3);
        for span in spans {
            assert_eq!(span.parent_span_id, SpanId::INVALID);
            assert_ne!(
                span.span_context.trace_id(),
                TraceId::from_hex(TRACE).unwrap()
            );
        }
    }

    #[test]
    fn no_context_outside_a_span() {
        let (_exporter, _provider, dispatch) = capture();
        tracing::dispatcher::with_default(&dispatch, || assert_eq!(current_traceparent(), None));
    }
}
