//! W3C trace context across processes: the coordinator hands its run's `traceparent` to
//! workers (registration, gRPC metadata, Kafka headers), so one run is one trace.

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use std::collections::HashMap;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The `traceparent` of the current span, when tracing export is on.
pub fn current_traceparent() -> Option<String> {
    let cx = tracing::Span::current().context();
    let mut carrier: HashMap<String, String> = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    carrier.remove("traceparent")
}

/// Makes `span` a child of the remote span that `traceparent` names.
pub fn set_parent(span: &tracing::Span, traceparent: Option<&str>) {
    let Some(tp) = traceparent.filter(|t| !t.is_empty()) else {
        return;
    };
    let carrier: HashMap<String, String> =
        HashMap::from([("traceparent".to_owned(), tp.to_owned())]);
    let cx = TraceContextPropagator::new().extract(&carrier);
    // Fails only when the span is disabled; then there is nothing to link.
    let _ = span.set_parent(cx);
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::TracerProvider;
    use tracing_subscriber::layer::SubscriberExt;

    #[test]
    fn a_child_of_a_remote_parent_carries_its_trace_id() {
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("t")));
        tracing::subscriber::with_default(subscriber, || {
            assert_eq!(current_traceparent(), None, "no span, no context");
            let parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
            let span = tracing::info_span!("child");
            set_parent(&span, Some(parent));
            let tp = span.in_scope(current_traceparent).unwrap_or_default();
            assert!(
                tp.starts_with("00-0af7651916cd43dd8448eb211c80319c-"),
                "{tp}"
            );
            assert!(
                !tp.contains("b7ad6b7169203331"),
                "the child has its own span id"
            );
        });
    }
}
