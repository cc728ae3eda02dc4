//! `anthill chaos`: a chaos run on real node processes (docs/chaos.md is to come with issue 6):
//! a local cluster under `quorum` appends while the nemesis kills and freezes partition leaders, then the
//! checker over every replica. Progress on stderr (each fault); `--json` for the report.

use std::time::Duration;

use anyhow::bail;
use clap::Args;

use crate::chaos::run::{ChaosSpec, run as run_chaos};
use crate::local::ClusterSpec;

#[derive(Args)]
pub(crate) struct ChaosArgs {
    /// Nodes of the cluster, 3 to 7.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    #[arg(long, default_value_t = 4)]
    partitions: u32,
    /// Seconds the nemesis runs, 5 to 86400.
    #[arg(long, default_value_t = 60.0)]
    duration: f64,
    /// Seconds between two faults (a partition's leader killed, or frozen past its TTL), 2 or
    /// more.
    #[arg(long, default_value_t = 4.0)]
    kill_every: f64,
    /// The nemesis's seed (random by default).
    #[arg(long)]
    seed: Option<u64>,
    /// Where the nodes keep their data and logs (a temporary directory, removed after a run
    /// that passed, by default).
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
    #[arg(long)]
    json: bool,
}

pub(crate) async fn run(args: ChaosArgs) -> anyhow::Result<()> {
    if !(3..=7).contains(&args.nodes) {
        bail!("--nodes must be between 3 and 7, got {}", args.nodes);
    }
    if !(1..=64).contains(&args.partitions) {
        bail!("--partitions must be between 1 and 64, got {}", args.partitions);
    }
    if !(args.duration.is_finite() && (5.0..=86_400.0).contains(&args.duration)) {
        bail!("--duration must be between 5 and 86400 seconds, got {}", args.duration);
    }
    if !(args.kill_every.is_finite() && args.kill_every >= 2.0) {
        bail!("--kill-every must be at least 2 seconds, got {}", args.kill_every);
    }
    let spec = ChaosSpec {
        cluster: ClusterSpec {
            nodes: args.nodes,
            partitions: args.partitions,
            replication_factor: 3,
            session_ttl_ms: 1_000,
            node_args: vec!["--log-level".into(), "warn".into()],
        },
        duration: Duration::from_secs_f64(args.duration),
        kill_every: Duration::from_secs_f64(args.kill_every),
        seed: args.seed.unwrap_or_else(rand::random),
        clients: 8,
    };
    let temp = tempfile::tempdir()?;
    let dir = args.dir.clone().unwrap_or_else(|| temp.path().to_path_buf());
    let exe = std::env::current_exe()?;
    let report = run_chaos(&exe, &dir, &spec).await?;
    if args.json {
        let mut json = serde_json::to_value(&report)?;
        json["passed"] = serde_json::json!(report.passed());
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        let worst = report.unavailability_ms.iter().flatten().max();
        println!(
            "chaos seed {}: {} nodes, {} operations, {} acknowledged, {} unknown; {} kills, {} pauses, worst unavailability {} ms",
            report.seed,
            report.nodes,
            report.operations,
            report.acknowledged,
            report.unknown,
            report.kills,
            report.pauses,
            worst.map_or("-".to_string(), u64::to_string)
        );
        let v = &report.verdict;
        println!(
            "lost {}, duplicated {}, failed yet stored {}, missing on a replica {}, diverged {}",
            v.lost.len(),
            v.duplicated.len(),
            v.failed_but_stored.len(),
            v.missing_on_a_replica.len(),
            v.diverged.len()
        );
    }
    if !report.passed() {
        // Keep the nodes' data and logs to look at.
        let kept = temp.keep();
        bail!(
            "the chaos run failed its checks (data and logs in {})",
            if args.dir.is_some() { dir.display().to_string() } else { kept.display().to_string() }
        );
    }
    Ok(())
}
