//! Logs and traces: a `tracing` subscriber writing human or JSON lines to stderr, plus an
//! OpenTelemetry layer exporting spans over OTLP/gRPC when `telemetry.otlp_endpoint` is set.
//!
//! Call [`init`] once, inside the tokio runtime (the OTLP exporter needs its reactor), and keep
//! the returned guard until the process ends: dropping it flushes spans still waiting for export.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{LogFormat, TelemetryConfig};

/// Flushes and stops the span exporter when dropped.
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(e) = provider.shutdown()
        {
            eprintln!("anthill: flushing spans to the OTLP collector failed: {e}");
        }
    }
}

/// Installs the global subscriber. `RUST_LOG`, when set, overrides `config.log_level`.
pub fn init(config: &TelemetryConfig) -> anyhow::Result<TelemetryGuard> {
    let filter =
        std::env::var("RUST_LOG").ok().and_then(|f| EnvFilter::try_new(f).ok()).unwrap_or_else(|| EnvFilter::new(&config.log_level));
    let fmt = match config.log_format {
        LogFormat::Human => tracing_subscriber::fmt::layer().with_writer(std::io::stderr).boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer().json().with_writer(std::io::stderr).boxed(),
    };
    let provider = match &config.otlp_endpoint {
        None => None,
        Some(endpoint) => {
            let exporter = opentelemetry_otlp::SpanExporter::builder().with_tonic().with_endpoint(endpoint.clone()).build()?;
            Some(
                SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_resource(Resource::builder().with_service_name(config.service_name.clone()).build())
                    .build(),
            )
        }
    };
    let otel = provider.as_ref().map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("anthill")));
    tracing_subscriber::registry().with(filter).with(fmt).with(otel).try_init()?;
    if let Some(endpoint) = &config.otlp_endpoint {
        tracing::info!(endpoint, "exporting spans over OTLP/gRPC");
    }
    Ok(TelemetryGuard { provider })
}
