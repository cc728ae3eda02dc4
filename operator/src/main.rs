//! `anthill-operator`: `run` runs the controller (docs/kubernetes.md); `crd` prints the
//! CustomResourceDefinition of `AnthillCluster`, as the chart commits it (`charts/anthill/crds/`).

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
