//! `anthill-operator`: `run` runs the controller (docs/kubernetes.md); `crd` prints the
//! CustomResourceDefinition of `AnthillCluster`, as the chart commits it (`charts/anthill/crds/`);
//! `chart-readme` prints the chart's README from its values; `delete-cluster` is the chart's
//! pre-delete hook (docs/kubernetes.md).

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "anthill-operator", version, about = "The Anthill Kubernetes operator")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the AnthillCluster CRD as YAML (what charts/anthill/crds/ holds).
    Crd,
    /// Print the AnthillCluster reference, generated from the CRD (what docs/crd-reference.md
    /// holds).
    CrdReference,
    /// Print the chart's README, generated from its values.yaml (what charts/anthill/README.md
    /// holds).
    ChartReadme {
        /// The chart's folder.
        #[arg(long, default_value = "charts/anthill")]
        chart: std::path::PathBuf,
    },
    /// Delete an AnthillCluster and wait until it is gone, finalizers included (the chart's
    /// pre-delete hook, so the operator can still stop the pods and delete the Consul keys).
    DeleteCluster {
        /// The cluster's name.
        name: String,
        /// Its namespace.
        #[arg(long, env = "ANTHILL_OPERATOR_NAMESPACE", default_value = "default")]
        namespace: String,
        /// Give up (with an error naming what holds the cluster) after this long: `90`, `90s`, `4m`.
        #[arg(long, default_value = "270s", value_parser = anthill_node::cli::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Run the controller: keep every AnthillCluster's objects as its spec says. Connects the way
    /// kubectl does (in a pod: its service account; else KUBECONFIG or ~/.kube/config).
    Run {
        /// Watch this namespace only (default: every namespace).
        #[arg(long, env = "ANTHILL_OPERATOR_NAMESPACE")]
        namespace: Option<String>,
        /// `error`, `warn`, `info`, `debug` or `trace`, or a tracing filter.
        #[arg(long, default_value = "info")]
        log_level: String,
        /// `human` or `json` log lines.
        #[arg(long, default_value = "human")]
        log_format: String,
        /// An OTLP/gRPC collector to export the reconciles' spans to (`http://host:4317`).
        #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
        otlp_endpoint: Option<String>,
        /// Where `GET /metrics` (Prometheus) is served; `off` serves none.
        #[arg(long, default_value = "0.0.0.0:8080")]
        metrics_addr: String,
    },
}

/// A client connected the way kubectl connects.
async fn client() -> anyhow::Result<kube::Client> {
    kube::Client::try_default()
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach the Kubernetes API (in-cluster service account or KUBECONFIG): {e}"))
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Crd => print!("{}", anthill_operator::crd::crd_yaml()),
        Command::CrdReference => print!("{}", anthill_operator::reference::reference()),
        Command::ChartReadme { chart } => {
            let read = |f: &str| std::fs::read_to_string(chart.join(f)).map_err(|e| anyhow::anyhow!("{}: {e}", chart.join(f).display()));
            let text = anthill_operator::readme::readme(&read("Chart.yaml")?, &read("values.yaml")?).map_err(anyhow::Error::msg)?;
            print!("{text}");
        }
        Command::DeleteCluster { name, namespace, timeout } => {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(async {
                let client = client().await?;
                anthill_operator::uninstall::delete_cluster(client, &namespace, &name, timeout, &mut std::io::stdout()).await
            })?;
        }
        Command::Run { namespace, log_level, log_format, otlp_endpoint, metrics_addr } => {
            use anthill_node::config::{LogFormat, TelemetryConfig};
            tracing_subscriber::EnvFilter::try_new(&log_level)
                .map_err(|e| anyhow::anyhow!("--log-level {log_level:?} is not a level or a tracing filter: {e}"))?;
            let log_format = match log_format.as_str() {
                "human" => LogFormat::Human,
                "json" => LogFormat::Json,
                other => anyhow::bail!("--log-format {other:?}: human or json"),
            };
            let metrics_addr: Option<std::net::SocketAddr> = match metrics_addr.as_str() {
                "off" => None,
                text => Some(text.parse().map_err(|e| anyhow::anyhow!("--metrics-addr {text:?} is not an address:port or off: {e}"))?),
            };
            let telemetry = TelemetryConfig { log_format, log_level, otlp_endpoint, service_name: "anthill-operator".into() };
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            runtime.block_on(async {
                let _telemetry = anthill_node::telemetry::init(&telemetry)?;
                let metrics = std::sync::Arc::new(anthill_operator::metrics::Metrics::default());
                if let Some(addr) = metrics_addr {
                    let listener =
                        tokio::net::TcpListener::bind(addr).await.map_err(|e| anyhow::anyhow!("cannot serve metrics on {addr}: {e}"))?;
                    tracing::info!(%addr, "serving /metrics");
                    let render = metrics.clone();
                    tokio::spawn(anthill_node::metrics::serve(listener, move || render.render(), || true, std::future::pending()));
                }
                let client = client().await?;
                anthill_operator::controller::run(client, namespace, metrics).await
            })?;
        }
    }
    Ok(())
}
