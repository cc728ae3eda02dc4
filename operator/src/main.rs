//! `anthill-operator`: `crd` prints the CustomResourceDefinition of `AnthillCluster`, as the
//! chart commits it (`charts/anthill/crds/`).

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
}

fn main() {
    match Cli::parse().command {
        Command::Crd => print!("{}", anthill_operator::crd::crd_yaml()),
    }
}
