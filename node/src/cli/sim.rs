//! `anthill sim`: runs the deterministic simulation (docs/simulation.md). One seed prints its
//! trace hash (the same seed and binary always give the same one) and, if a check fails, the
//! check and the events that led to it; `--hunt` runs random seeds for a while, shows progress,
//! and prints every failing seed with the command that replays it. `--json` for the report.

use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Args;
use serde_json::json;

use crate::sim::{Outcome, Stats, cluster, replication};

#[derive(Args)]
pub(crate) struct SimArgs {
    /// The seed to run (replays exactly).
    #[arg(long, conflicts_with = "hunt")]
    seed: Option<u64>,
    /// Run random seeds instead, for `--minutes`.
    #[arg(long)]
    hunt: bool,
    /// How long a hunt runs, in wall-clock minutes.
    #[arg(long, default_value_t = 1.0)]
    minutes: f64,
    /// The cluster's nodes, 3 to 7 (with `--replica-set`: the set's size; the pool it moves
    /// among has two more nodes).
    #[arg(long, default_value_t = 5)]
    nodes: u64,
    /// The cluster's partitions, 1 to 64, each replicated by 3 nodes.
    #[arg(long, default_value_t = 3)]
    partitions: u32,
    /// Simulated seconds of faults before everything heals (then calm under load, then the
    /// logs settle). Default: 8, or 1.5 with `--replica-set`.
    #[arg(long)]
    duration: Option<f64>,
    /// Simulate one partition's replica set instead of the whole cluster, its leaders granted
    /// at random rather than by the coordination store (harsher replication storms).
    #[arg(long)]
    replica_set: bool,
    #[arg(long)]
    json: bool,
}

impl SimArgs {
    fn duration(&self) -> f64 {
        let default_ms = if self.replica_set { replication::STORM_STEPS } else { cluster::STORM_MS };
        self.duration.unwrap_or(default_ms as f64 / 1000.0)
    }

    /// Checks the arguments once, before anything runs.
    fn check(&self) -> anyhow::Result<()> {
        if !(3..=7).contains(&self.nodes) {
            bail!("--nodes must be between 3 and 7, got {}", self.nodes);
        }
        if !(1..=64).contains(&self.partitions) {
            bail!("--partitions must be between 1 and 64, got {}", self.partitions);
        }
        let duration = self.duration();
        if !(duration.is_finite() && duration > 0.0 && duration <= 3600.0) {
            bail!("--duration must be between 0 and 3600 simulated seconds, got {duration}");
        }
        Ok(())
    }

    /// Runs `seed` (failed checks are reported in the outcome, not on stderr).
    fn run(&self, seed: u64) -> Outcome {
        let storm_ms = (self.duration() * 1000.0).round().max(1.0) as u64;
        if self.replica_set {
            let options = replication::Options { storm_steps: storm_ms, ..replication::Options::new(seed, self.nodes) };
            quietly(|| replication::run(&options))
        } else {
            let options = cluster::Options { partitions: self.partitions, storm_ms, ..cluster::Options::new(seed, self.nodes) };
            quietly(|| cluster::run(&options))
        }
    }

    fn replay_command(&self, seed: u64) -> String {
        if self.replica_set {
            format!("anthill sim --replica-set --seed {seed} --nodes {} --duration {}", self.nodes, self.duration())
        } else {
            format!("anthill sim --seed {seed} --nodes {} --partitions {} --duration {}", self.nodes, self.partitions, self.duration())
        }
    }

    /// What runs, in words.
    fn what(&self) -> String {
        if self.replica_set {
            format!("a replica set of {}", self.nodes)
        } else {
            format!("{} nodes, {} partitions", self.nodes, self.partitions)
        }
    }
}

pub(crate) fn run(args: SimArgs) -> anyhow::Result<()> {
    args.check()?;
    match (args.seed, args.hunt) {
        (Some(seed), _) => one(&args, seed),
        (None, true) => hunt(&args),
        (None, false) => bail!("give --seed S to replay one run, or --hunt to look for failing seeds"),
    }
}

fn one(args: &SimArgs, seed: u64) -> anyhow::Result<()> {
    let started = Instant::now();
    let outcome = args.run(seed);
    let wall = started.elapsed();
    if args.json {
        let mut report = serde_json::to_value(&outcome)?;
        report["wall_ms"] = json!(wall.as_millis() as u64);
        report["replay"] = json!(args.replay_command(seed));
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "seed {seed}, {}: {} simulated ms in {:.0} ms ({:.0}x real time); {} writes acknowledged",
            args.what(),
            outcome.steps,
            wall.as_secs_f64() * 1000.0,
            outcome.steps as f64 / 1000.0 / wall.as_secs_f64().max(1e-9),
            outcome.acknowledged
        );
        println!("{}", stats_line(&outcome.stats));
        if let Some(ms) = outcome.recovery_ms {
            println!("every partition took writes again {ms} ms after the faults healed");
        }
        println!("trace hash {}", outcome.trace_hash);
        if let Some(failure) = &outcome.failure {
            println!("FAILED: {}\nlast events:\n  {}", failure.check, failure.recent.join("\n  "));
        }
    }
    match outcome.failure {
        Some(failure) => bail!("seed {seed} failed: {}", failure.check),
        None => Ok(()),
    }
}

fn hunt(args: &SimArgs) -> anyhow::Result<()> {
    if !(args.minutes.is_finite() && args.minutes > 0.0 && args.minutes <= 24.0 * 60.0) {
        bail!("--minutes must be between 0 and 1440, got {}", args.minutes);
    }
    let deadline = Instant::now() + Duration::from_secs_f64(args.minutes * 60.0);
    let started = Instant::now();
    let first: u64 = rand::random::<u32>().into();
    let (mut runs, mut steps, mut total, mut failed) = (0u64, 0u64, Stats::default(), Vec::<Outcome>::new());
    let mut shown = Instant::now();
    while Instant::now() < deadline {
        let seed = first + runs;
        let outcome = args.run(seed);
        runs += 1;
        steps += outcome.steps;
        total.add(&outcome.stats);
        if let Some(failure) = &outcome.failure {
            eprintln!("seed {seed} FAILED: {}\n  replay: {}", failure.check, args.replay_command(seed));
            failed.push(outcome);
        }
        if !args.json && shown.elapsed() >= Duration::from_secs(5) {
            eprintln!("{runs} seeds, {} failed, {:.0} s of {:.0}", failed.len(), started.elapsed().as_secs_f64(), args.minutes * 60.0);
            shown = Instant::now();
        }
    }
    let wall = started.elapsed().as_secs_f64();
    let speed = steps as f64 / 1000.0 / wall.max(1e-9);
    if args.json {
        let report = json!({
            "seeds": runs,
            "first_seed": first,
            "nodes": args.nodes,
            "partitions": if args.replica_set { 1 } else { args.partitions },
            "replica_set": args.replica_set,
            "simulated_seconds": steps as f64 / 1000.0,
            "wall_seconds": wall,
            "times_real_time": speed,
            "stats": total,
            "failed": failed.iter().map(|o| json!({
                "seed": o.seed,
                "check": o.failure.as_ref().map(|f| f.check.clone()),
                "replay": args.replay_command(o.seed),
            })).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "{runs} seeds (from {first}) of {} in {wall:.0} s: {:.0} simulated s, {speed:.0}x real time; {} failed",
            args.what(),
            steps as f64 / 1000.0,
            failed.len()
        );
        println!("{}", stats_line(&total));
        for outcome in &failed {
            println!(
                "FAILED seed {}: {}\n  replay: {}",
                outcome.seed,
                outcome.failure.as_ref().map_or("", |f| &f.check),
                args.replay_command(outcome.seed)
            );
        }
    }
    if !failed.is_empty() {
        bail!("{} of {runs} seeds failed", failed.len());
    }
    Ok(())
}

fn stats_line(s: &Stats) -> String {
    format!(
        "leaders {}, crashes {}, pauses {}, truncations {}, messages lost {}, reads checked {}, set moves {}, trims {}, snapshots installed {}, \
         ledger commands {}, drains {} ({} leaderships handed over), hand-backs {}",
        s.leaders,
        s.crashes,
        s.pauses,
        s.truncations,
        s.lost_messages,
        s.reads,
        s.moves,
        s.trims,
        s.installs,
        s.ledger_commands,
        s.drains,
        s.drain_handovers,
        s.hand_backs
    )
}

/// Where the last failed check was (file:line), kept by [`quietly`]'s panic hook.
static FAILED_AT: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

/// Runs `f` without the default panic message on stderr (a failing check is a panic inside the
/// run, caught and reported by it); a failure's check then names where it failed.
fn quietly(f: impl FnOnce() -> Outcome) -> Outcome {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|info| {
        let at = info.location().map(|l| format!("{}:{}", l.file(), l.line()));
        *FAILED_AT.lock().unwrap_or_else(|e| e.into_inner()) = at;
    }));
    let mut outcome = f();
    std::panic::set_hook(hook);
    if let (Some(failure), Some(at)) = (outcome.failure.as_mut(), FAILED_AT.lock().unwrap_or_else(|e| e.into_inner()).take()) {
        failure.check = format!("{} (at {at})", failure.check);
    }
    outcome
}
