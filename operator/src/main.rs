//! `anthill-operator`: `run` runs the controller (docs/kubernetes.md); `crd` prints the
//! CustomResourceDefinition of `AnthillCluster`, as the chart commits it (`charts/anthill/crds/`);
//! `chart-readme` prints the chart's README from its values.

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
    /// Print the chart's README, generated from its values.yaml (what charts/anthill/README.md
    /// holds).
    ChartReadme {
        /// The chart's folder.
        #[arg(long, default_value = "charts/anthill")]
        chart: std::path::PathBuf,
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
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Crd => print!("{}", anthill_operator::crd::crd_yaml()),
        Command::ChartReadme { chart } => {
            let read = |f: &str| std::fs::read_to_string(chart.join(f)).map_err(|e| anyhow::anyhow!("{}: {e}", chart.join(f).display()));
            let text = anthill_operator::readme::readme(&read("Chart.yaml")?, &read("values.yaml")?).map_err(anyhow::Error::msg)?;
            print!("{text}");
        }
        Command::Run { namespace, log_level } => {
            let filter = tracing_subscriber::EnvFilter::try_new(&log_level)
                .map_err(|e| anyhow::anyhow!("--log-level {log_level:?} is not a level or a tracing filter: {e}"))?;
            use std::io::IsTerminal;
            let ansi = std::io::stderr().is_terminal();
            tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).init();
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            runtime.block_on(async {
                let client = kube::Client::try_default()
                    .await
                    .map_err(|e| anyhow::anyhow!("cannot reach the Kubernetes API (in-cluster service account or KUBECONFIG): {e}"))?;
                anthill_operator::controller::run(client, namespace).await
            })?;
        }
    }
    Ok(())
}
