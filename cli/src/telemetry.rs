//! Logs and traces: human or JSON log lines on stderr, and, when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set, spans exported over OTLP/gRPC with the standard
//! `OTEL_*` variables honoured (service name, resource attributes, endpoint, headers).

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Holds the exporter; `shutdown` flushes the spans still buffered.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

fn otlp_configured() -> bool {
    [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|v| std::env::var(v).is_ok_and(|s| !s.is_empty()))
}

/// Sets up logging and, when configured, trace export. Call inside the tokio runtime
/// (the gRPC exporter's channel lives on it).
pub fn init(quiet: bool, json: bool, service: &str) -> Telemetry {
    let default = if quiet {
        "warn"
    } else {
        "info,tokio_postgres=warn"
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(crate::progress::LogWriter)
        .with_target(false);
    let fmt = if json {
        fmt.json().boxed()
    } else {
        fmt.compact().boxed()
    };
    let mut provider = None;
    let otel = if otlp_configured() {
        match opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()
        {
            Ok(exporter) => {
                let mut resource = Resource::builder();
                if std::env::var("OTEL_SERVICE_NAME").is_err() {
                    resource = resource.with_service_name(service.to_owned());
                }
                let p = SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_resource(resource.build())
                    .build();
                let layer = tracing_opentelemetry::layer()
                    .with_tracer(p.tracer("schemashift"))
                    // Our spans at info and above, whatever the log level on stderr.
                    .with_filter(EnvFilter::new(
                        "info,tokio_postgres=off,h2=off,tonic=off,hyper=off,tower=off,rdkafka=off",
                    ));
                provider = Some(p);
                Some(layer)
            }
            Err(e) => {
                eprintln!("warning: OTLP trace export not started: {e}");
                None
            }
        }
    } else {
        None
    };
    tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(otel)
        .init();
    Telemetry { provider }
}

impl Telemetry {
    /// Flushes and stops the exporter. Call from outside the runtime's `block_on`, while
    /// the runtime is still alive.
    pub fn shutdown(self) {
        if let Some(p) = self.provider {
            if let Err(e) = p.shutdown() {
                eprintln!("warning: flushing traces failed: {e}");
            }
        }
    }
}
