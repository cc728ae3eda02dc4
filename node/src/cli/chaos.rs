//! `anthill chaos`: a chaos run on real node processes (docs/chaos.md): a local cluster under
//! load while the nemesis kills, pauses, partitions and restarts nodes, then the checker over
//! every replica and the ledger's books.
//!
//! The command runs itself again in a network namespace of its own (`chaos::net`), where the
//! partitions are cut. Progress on stderr (each fault, and a line every ten); the report on
//! stdout (`--json` for all of it), and `report.json`, `timeline.svg` and `history.jsonl` (every
//! operation with what it asked and how it ended) in `--dir`, where a
//! failed run also keeps the nodes' data and logs.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;

use crate::chaos::nemesis::FaultKind;
use crate::chaos::run::{ChaosReport, ChaosSpec, run as run_chaos};
use crate::chaos::workload::LoadSpec;
use crate::chaos::{net, timeline};
use crate::local::ClusterSpec;

#[derive(Args)]
pub(crate) struct ChaosArgs {
    /// Nodes of the cluster, 3 to 7.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Partitions, 1 to 64 (each has a ledger book).
    #[arg(long, default_value_t = 4)]
    partitions: u32,
    /// How long the nemesis runs: seconds, or with a unit (`90s`, `10m`, `1h`); 5 s to 24 h.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    duration: Duration,
    /// Inject exactly this many faults (however long that takes) instead of running for
    /// `--duration`.
    #[arg(long)]
    fault_count: Option<usize>,
    /// The pause before each fault: seconds, 1 or more.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    fault_every: Duration,
    /// The kinds of fault (comma-separated; by default all, `kill-consul` only with
    /// `--coordination consul`).
    #[arg(long, value_enum, value_delimiter = ',')]
    faults: Vec<FaultKind>,
    /// How long the clients run alone first, the steady state the throughput under chaos is
    /// compared with: 2 s or more.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    warmup: Duration,
    #[command(flatten)]
    load: ClientArgs,
    /// Where the report, the picture and (after a failure) the nodes' data and logs go;
    /// `./anthill-chaos-<seed>` by default.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Keep the nodes' data and logs after a run that passed too.
    #[arg(long)]
    keep_data: bool,
    /// Where partition ownership is decided: the embedded store, or a real Consul cluster that
    /// the run starts, one server beside each node (`--consul` names the binary).
    #[arg(long, value_enum, default_value_t = Coordination::Embedded)]
    coordination: Coordination,
    /// The Consul binary for `--coordination consul`; by default `consul` on PATH, else
    /// `.tools/bin/consul` (what `tests/e2e/tools/install.sh consul` builds).
    #[arg(long)]
    consul: Option<PathBuf>,
    /// The nodes' log level (`info` shows every lock taken and every leadership granted).
    #[arg(long, default_value = "warn")]
    node_log_level: String,
    /// Log the harness's own work (`debug`: the routing client's resends and table reloads)
    /// to `harness.log` in `--dir`; nothing by default.
    #[arg(long)]
    harness_log_level: Option<String>,
    /// TLS on every node (mutual between them) from a CA the run makes; the clients show a
    /// certificate too.
    #[arg(long)]
    tls: bool,
    /// Encrypt every tenant's events at rest (a key-encryption key the run makes).
    #[arg(long)]
    encrypt: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Coordination {
    Embedded,
    Consul,
}

/// The Consul binary to run: `given`, or `consul` on PATH, or `.tools/bin/consul`.
fn find_consul(given: Option<&std::path::Path>) -> anyhow::Result<PathBuf> {
    if let Some(path) = given {
        if !path.is_file() {
            bail!("--consul {}: no such file", path.display());
        }
        return Ok(path.to_path_buf());
    }
    let on_path =
        std::env::var_os("PATH").into_iter().flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>()).map(|d| d.join("consul"));
    on_path.chain([PathBuf::from(".tools/bin/consul")]).find(|p| p.is_file()).context(
        "--coordination consul needs a Consul binary: none on PATH nor in .tools/bin; pass --consul PATH \
         (tests/e2e/tools/install.sh consul builds one into .tools/bin)",
    )
}

/// `90`, `90s`, `1.5s`, `10m`, `1h`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let (number, unit_s) = match text.strip_suffix('h') {
        Some(n) => (n, 3600.0),
        None => match text.strip_suffix('m') {
            Some(n) => (n, 60.0),
            None => (text.strip_suffix('s').unwrap_or(text), 1.0),
        },
    };
    match number.trim().parse::<f64>() {
        Ok(n) if n.is_finite() && n >= 0.0 && n * unit_s <= 1e7 => Ok(Duration::from_secs_f64(n * unit_s)),
        _ => Err(format!("{text:?} is not a duration (seconds, or a number with s, m or h)")),
    }
}

impl ChaosArgs {
    fn validate(&self) -> anyhow::Result<()> {
        if !(3..=7).contains(&self.nodes) {
            bail!("--nodes must be between 3 and 7, got {}", self.nodes);
        }
        if !(1..=64).contains(&self.partitions) {
            bail!("--partitions must be between 1 and 64, got {}", self.partitions);
        }
        if !(5.0..=86_400.0).contains(&self.duration.as_secs_f64()) {
            bail!("--duration must be between 5 s and 24 h, got {:?}", self.duration);
        }
        if self.fault_every < Duration::from_secs(1) {
            bail!("--fault-every must be at least 1 s, got {:?}", self.fault_every);
        }
        if self.fault_count == Some(0) {
            bail!("--fault-count must be at least 1");
        }
        if self.warmup < Duration::from_secs(2) {
            bail!("--warmup must be at least 2 s (its first second is not counted), got {:?}", self.warmup);
        }
        self.load.validate()?;
        if self.coordination == Coordination::Embedded {
            if let Some(kind) = self.faults.iter().find(|k| k.needs_consul()) {
                bail!("--faults {} needs --coordination consul", kind.name());
            }
            if self.consul.is_some() {
                bail!("--consul is for --coordination consul");
            }
        }
        Ok(())
    }
}

/// The clients' flags, shared by `anthill chaos` and `anthill workload`.
#[derive(clap::Args)]
pub(crate) struct ClientArgs {
    /// Client tasks sending at once, 1 to 256.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Operations per second, all clients together (fixed-rate mode); as fast as they are
    /// answered when absent (max-rate mode).
    #[arg(long)]
    rate: Option<f64>,
    /// The clients' seed (and `anthill chaos`'s nemesis's); random by default.
    #[arg(long)]
    seed: Option<u64>,
}

impl ClientArgs {
    fn validate(&self) -> anyhow::Result<()> {
        if !(1..=256).contains(&self.clients) {
            bail!("--clients must be between 1 and 256, got {}", self.clients);
        }
        if let Some(rate) = self.rate
            && !(rate.is_finite() && (1.0..=1_000_000.0).contains(&rate))
        {
            bail!("--rate must be between 1 and 1000000 operations per second, got {rate}");
        }
        Ok(())
    }

    /// The load these flags ask for over `partitions`, and its seed.
    fn spec(&self, partitions: u32) -> (LoadSpec, u64) {
        let seed = self.seed.unwrap_or_else(rand::random);
        (LoadSpec { clients: self.clients, rate: self.rate, partitions, seed }, seed)
    }
}

pub(crate) async fn run(args: ChaosArgs) -> anyhow::Result<()> {
    args.validate()?;
    if !net::in_own_namespace() {
        // The run itself happens in a namespace of its own; this process waits for it.
        let status = net::rerun_in_own_namespace()?;
        std::process::exit(status.code().unwrap_or(1));
    }
    net::loopback_up()?;
    let consul = match args.coordination {
        Coordination::Consul => Some(find_consul(args.consul.as_deref())?),
        Coordination::Embedded => None,
    };
    // Consul's sessions live at least 10 s (`coordination::consul::MIN_SESSION_TTL`).
    let session_ttl_ms = if consul.is_some() { crate::coordination::consul::MIN_SESSION_TTL.as_millis() as u64 } else { 1_000 };
    let faults: Vec<FaultKind> = if args.faults.is_empty() {
        FaultKind::ALL.into_iter().filter(|k| consul.is_some() || !k.needs_consul()).collect()
    } else {
        args.faults.clone()
    };
    let (load, seed) = args.load.spec(args.partitions);
    let spec = ChaosSpec {
        cluster: ClusterSpec {
            nodes: args.nodes,
            partitions: args.partitions,
            replication_factor: 3,
            session_ttl_ms,
            node_args: vec!["--log-level".into(), args.node_log_level.clone()],
            consul: None,
            tls: args.tls,
            encrypt: args.encrypt,
        },
        duration: args.duration,
        fault_count: args.fault_count,
        fault_every: args.fault_every,
        faults,
        warmup: args.warmup,
        load,
        seed,
        consul,
    };
    let dir = args.dir.clone().unwrap_or_else(|| PathBuf::from(format!("anthill-chaos-{seed}")));
    let nodes_dir = dir.join("nodes");
    if nodes_dir.exists() {
        bail!("{} holds an earlier run's nodes; remove it or choose another --dir", nodes_dir.display());
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    if let Some(level) = &args.harness_log_level {
        let file = std::fs::File::create(dir.join("harness.log")).with_context(|| format!("cannot write {}", dir.display()))?;
        let filter = tracing_subscriber::EnvFilter::try_new(format!("anthill_node={level}"))
            .with_context(|| format!("--harness-log-level: {level:?} is not a log level"))?;
        tracing_subscriber::fmt().with_writer(std::sync::Mutex::new(file)).with_ansi(false).with_env_filter(filter).init();
    }
    let exe = std::env::current_exe()?;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    // Interrupted, the run is dropped, and with it the cluster: every node is killed.
    let report = tokio::select! {
        report = run_chaos(&exe, &nodes_dir, &spec) => report.with_context(|| format!("the nodes' data and logs are in {}", nodes_dir.display()))?,
        _ = terminate.recv() => bail!("stopped by SIGTERM; the nodes are stopped, their data and logs are in {}", nodes_dir.display()),
        _ = interrupt.recv() => bail!("interrupted; the nodes are stopped, their data and logs are in {}", nodes_dir.display()),
    };
    let mut json = serde_json::to_value(&report)?;
    json["passed"] = serde_json::json!(report.passed());
    std::fs::write(dir.join("report.json"), serde_json::to_string_pretty(&json)?)?;
    let mut history = String::new();
    for record in &report.history {
        history.push_str(&serde_json::to_string(record)?);
        history.push('\n');
    }
    std::fs::write(dir.join("history.jsonl"), history)?;
    let title = format!("anthill chaos, seed {seed}: {} nodes, {} partitions", report.nodes, report.partitions);
    std::fs::write(
        dir.join("timeline.svg"),
        timeline::svg(&title, &report.timeline, &report.faults.iter().map(|f| f.fault.clone()).collect::<Vec<_>>()),
    )?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        print_summary(&report, &dir);
    }
    if !report.passed() {
        bail!("the chaos run failed its checks (report, data and logs in {})", dir.display());
    }
    if !args.keep_data {
        std::fs::remove_dir_all(&nodes_dir).with_context(|| format!("cannot remove {}", nodes_dir.display()))?;
    }
    Ok(())
}

fn print_summary(report: &ChaosReport, dir: &std::path::Path) {
    let pass = |ok: bool| if ok { "pass" } else { "FAIL" };
    let v = &report.verdict;
    println!(
        "chaos seed {}: {} nodes, {} partitions, {} coordination store",
        report.seed, report.nodes, report.partitions, report.coordination
    );
    println!(
        "operations: {} ({} appends, {} transfers): {} acknowledged, {} refused, {} unknown ({} of them applied)",
        report.operations, report.appends, report.transfers, report.acknowledged, report.failed, report.unknown, v.unknown_applied
    );
    let counts: Vec<String> = report.fault_counts.iter().map(|(kind, n)| format!("{n} {kind}")).collect();
    println!("faults: {}", counts.join(", "));
    println!("[{}] no acknowledged operation lost: {} lost", pass(v.lost.is_empty()), v.lost.len());
    println!("[{}] none stored twice: {} duplicated", pass(v.duplicated.is_empty()), v.duplicated.len());
    println!("[{}] nothing refused is stored: {}", pass(v.failed_but_stored.is_empty()), v.failed_but_stored.len());
    println!(
        "[{}] every replica holds the same operations at the same positions: {} missing, {} diverged",
        pass(v.missing_on_a_replica.is_empty() && v.diverged.is_empty()),
        v.missing_on_a_replica.len(),
        v.diverged.len()
    );
    println!(
        "[{}] ledger: totals conserved, audits clean, balances within limits and equal on every replica ({} books, {} replicas){}",
        pass(report.ledger.ok()),
        report.ledger.books,
        report.ledger.replicas_checked,
        report.ledger.problems.first().map_or(String::new(), |p| format!(": {p}"))
    );
    let stuck = report.faults.iter().filter(|f| !f.fault.partitions.is_empty() && f.unavailability_ms.is_none()).count();
    println!("[{}] every partition a fault hit took writes again: {stuck} did not", pass(stuck == 0));
    if let Some([p50, p99, max]) = report.kill_unavailability_ms {
        println!("unavailability after a leader kill: median {p50} ms, p99 {p99} ms, worst {max} ms");
    }
    println!("worst unavailability after any fault: {} ms", report.worst_unavailability_ms.map_or("-".into(), |ms| ms.to_string()));
    println!(
        "throughput: {:.0} acknowledged/s under chaos, {:.0}/s in the steady state ({:.0}%)",
        report.chaos_ops_per_s,
        report.steady_ops_per_s,
        report.throughput_ratio * 100.0
    );
    println!(
        "report: {}, picture: {}, every operation: {}",
        dir.join("report.json").display(),
        dir.join("timeline.svg").display(),
        dir.join("history.jsonl").display()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_seconds_or_a_unit() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1_500));
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3_600));
        for bad in ["", "ten", "-1", "5d", "NaNs"] {
            assert!(parse_duration(bad).unwrap_err().contains("not a duration"), "{bad}");
        }
    }
}

/// `anthill workload`: the chaos suite's clients against a running cluster, then its checks.
#[derive(clap::Args)]
pub(crate) struct WorkloadArgs {
    #[command(flatten)]
    server: super::ServerArg,
    /// How long the clients run: seconds, or with a unit (`90s`, `10m`); 1 s to 24 h.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    duration: Duration,
    #[command(flatten)]
    load: ClientArgs,
    /// A steps file: lines `UNIX_MS begin NAME` and `UNIX_MS end NAME` that whatever disturbs the
    /// cluster writes while the workload runs (an upgrade, a server powered off); the report
    /// gives the unavailability each step caused. A line `UNIX_MS stop` stops the clients early.
    #[arg(long)]
    steps: Option<std::path::PathBuf>,
    #[arg(long)]
    json: bool,
}

pub(crate) async fn workload(args: WorkloadArgs) -> anyhow::Result<()> {
    args.load.validate()?;
    if !(Duration::from_secs(1)..=Duration::from_secs(86_400)).contains(&args.duration) {
        bail!("--duration must be between 1 s and 24 h, got {:?}", args.duration);
    }
    let servers: Vec<String> = args.server.server.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
    // The partitions are the cluster's (`against` asks).
    let (load, seed) = args.load.spec(0);
    let report = crate::chaos::run::against(&servers, args.duration, load, args.steps.as_deref()).await?;
    if args.json {
        let mut json = serde_json::to_value(&report)?;
        json["passed"] = serde_json::json!(report.passed());
        json["seed"] = serde_json::json!(seed);
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        let v = &report.verdict;
        println!(
            "{} operations in {:.1} s ({:.0}/s), {} acknowledged; lost {}, duplicated {}, failed but stored {}, missing on a replica {}, diverged {}; ledger: {} books on {} replicas, {} problems",
            report.operations,
            report.seconds,
            report.ops_per_s,
            report.acknowledged,
            v.lost.len(),
            v.duplicated.len(),
            v.failed_but_stored.len(),
            v.missing_on_a_replica.len(),
            v.diverged.len(),
            report.ledger.books,
            report.ledger.replicas_checked,
            report.ledger.problems.len(),
        );
        for problem in report.ledger.problems.iter().take(10) {
            println!("  {problem}");
        }
        for step in &report.steps {
            let unavailable = step.unavailability_ms.map_or("some partition took no write after it".to_string(), |ms| format!("{ms} ms"));
            println!(
                "step {}: {:.1} s to {:.1} s, writes unavailable at most {unavailable}",
                step.name,
                step.began_ms as f64 / 1000.0,
                step.ended_ms as f64 / 1000.0
            );
        }
    }
    if !report.passed() {
        bail!("the checks failed (seed {seed})");
    }
    Ok(())
}
