//! One chaos run on real processes, start to verdict:
//! 1. a [`LocalCluster`] of `anthill node`s on 127.0.0.x (in the run's own network namespace,
//!    [`super::net`]), and one ledger book per partition opened;
//! 2. the clients ([`super::workload`]) alone for the warm-up: the steady state's throughput;
//! 3. the nemesis ([`super::nemesis`]) injecting its faults, one after another, until the time
//!    or the number of faults asked for is reached;
//! 4. the heal: the network whole, every node running and every partition taking writes; then
//!    the clients stop;
//! 5. the checks: every replica of every partition read back against the history
//!    ([`super::history`]), and every book's totals, audit and balances asked of every replica
//!    of its partition (each replica keeps its own read model);
//! 6. the report: operations, faults with the unavailability each caused, throughput under
//!    chaos against the steady state, the per-second timeline ([`super::timeline`]).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anthill_proto::v1 as pb;
use anyhow::Context;
use rand::SeedableRng;
use rand::rngs::StdRng;

use super::history::{self, FaultWindow, OpKind, Outcome, Record, Stored, StoredEvent, Verdict};
use super::nemesis::{Fault, FaultKind, Nemesis, schedule};
use super::net::Cuts;
use super::timeline::{self, Second};
use super::workload::{self, Book, COMMAND_ID_PREFIX, Load, LoadSpec};
use crate::app::COMMAND_ID_METADATA_KEY;
use crate::client;
use crate::local::consul::{LocalConsul, anthill_policy};
use crate::local::{ClusterSpec, ConsulNodes, LocalCluster};
use crate::router::Router;

/// What a run does.
#[derive(Debug, Clone)]
pub struct ChaosSpec {
    pub cluster: ClusterSpec,
    /// How long the nemesis runs (the last fault starts only if it can end in time).
    pub duration: Duration,
    /// When set, the nemesis injects exactly this many faults instead, however long it takes.
    pub fault_count: Option<usize>,
    /// The pause before each fault.
    pub fault_every: Duration,
    /// The kinds of fault to inject.
    pub faults: Vec<FaultKind>,
    /// How long the clients run alone first (the steady state).
    pub warmup: Duration,
    pub load: LoadSpec,
    pub seed: u64,
    /// A Consul binary: the nodes decide ownership in a Consul cluster the run starts, one
    /// server beside each node (on 127.0.0.31 on, ACLs on, the nodes holding a least-privilege
    /// token), instead of the embedded store.
    pub consul: Option<std::path::PathBuf>,
}

/// The key prefix of a run's nodes in Consul.
const CONSUL_KEY_PREFIX: &str = "anthill-chaos/";

/// One fault and the write unavailability it caused.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FaultReport {
    #[serde(flatten)]
    pub fault: Fault,
    /// The longest time, from the fault until the first acknowledgement after its heal, that
    /// one of its partitions acknowledged nothing (`history::unavailability`), in ms; `None`
    /// when it hit no leader (nothing to measure) or a partition took no write after the heal.
    pub unavailability_ms: Option<u64>,
}

/// The books' checks: problems found on any replica (none: the ledger holds).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct LedgerCheck {
    pub books: usize,
    /// Replicas whose totals, audit and balances were read.
    pub replicas_checked: usize,
    pub problems: Vec<String>,
}

impl LedgerCheck {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// What a run found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ChaosReport {
    pub seed: u64,
    /// Where ownership was decided: `embedded` or `consul`.
    pub coordination: &'static str,
    /// TLS on every node, mutual between them, and the clients with certificates.
    pub tls: bool,
    /// Events encrypted at rest.
    pub encrypted: bool,
    /// When the run's clock started (every `…_ms` counts from it), in ms since the Unix epoch:
    /// to find a fault in the nodes' logs.
    pub started_unix_ms: u64,
    pub nodes: usize,
    pub partitions: u32,
    pub operations: usize,
    pub appends: usize,
    pub transfers: usize,
    pub acknowledged: usize,
    /// Refused definitely (transfers the ledger's rules refused).
    pub failed: usize,
    pub unknown: usize,
    pub faults: Vec<FaultReport>,
    /// How many faults of each kind.
    pub fault_counts: BTreeMap<&'static str, usize>,
    /// Unavailability after `kill-leader` faults: median, p99 (nearest rank) and worst, ms.
    pub kill_unavailability_ms: Option<[u64; 3]>,
    /// The worst unavailability after any fault, ms.
    pub worst_unavailability_ms: Option<u64>,
    /// Acknowledged operations per second in the warm-up (after its first second) and while the
    /// nemesis ran, and the second over the first.
    pub steady_ops_per_s: f64,
    pub chaos_ops_per_s: f64,
    pub throughput_ratio: f64,
    pub verdict: Verdict,
    pub ledger: LedgerCheck,
    pub timeline: Vec<Second>,
    /// Every operation, in the order invoked (written to `history.jsonl`, not into the report).
    #[serde(skip)]
    pub history: Vec<Record>,
}

impl ChaosReport {
    /// No acknowledged write lost or doubled, replicas agree, the ledger holds, and every
    /// partition a fault hit took writes again.
    pub fn passed(&self) -> bool {
        self.verdict.ok() && self.ledger.ok() && self.faults.iter().all(|f| f.fault.partitions.is_empty() || f.unavailability_ms.is_some())
    }
}

/// Runs `spec` with the `anthill` binary `exe`, its nodes' data under `dir`. Network faults need
/// the run's own network namespace ([`super::net`]).
pub async fn run(exe: &Path, dir: &Path, spec: &ChaosSpec) -> anyhow::Result<ChaosReport> {
    let cuts = if spec.faults.iter().any(|k| k.cuts_network()) { Some(Cuts::install()?) } else { None };
    let mut spec = spec.clone();
    let mut consul = match &spec.consul {
        Some(binary) => {
            let (consul, nodes) = start_consul(binary, dir, spec.cluster.nodes)?;
            spec.cluster.consul = Some(nodes);
            Some(consul)
        }
        None => None,
    };
    let spec = &spec;
    let mut cluster = LocalCluster::start(exe, dir, &spec.cluster)?;
    cluster.wait_whole(&spec.cluster, Duration::from_secs(60)).await.context("the cluster never formed")?;
    let mut router = Router::connect(&cluster.urls()).await?;
    router.attempt_timeout = Some(workload::ATTEMPT_TIMEOUT);
    let router = Arc::new(router);
    let books = Arc::new(workload::books(spec.cluster.partitions));
    workload::open_books(&router, &books).await?;
    let started = Instant::now();
    let started_unix_ms = unix_ms();
    let load = Load::start(router.clone(), books.clone(), &spec.load, started);
    eprintln!("chaos: {} nodes up, {} clients; steady state for {:?}", spec.cluster.nodes, spec.load.clients, spec.warmup);
    tokio::time::sleep(spec.warmup).await;
    let chaos_from_ms = started.elapsed().as_millis() as u64;
    let faults = inject(&mut cluster, consul.as_mut(), spec, cuts, started, &load).await?;
    let chaos_to_ms = started.elapsed().as_millis() as u64;
    cluster.wait_whole(&spec.cluster, Duration::from_secs(60)).await.context("the cluster did not heal")?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let history = load.stop().await?;
    cluster.check_running()?;
    eprintln!("chaos: healed at {:.1} s; reading every replica back", chaos_to_ms as f64 / 1000.0);
    let members = Members((0..cluster.nodes.len()).map(|i| (LocalCluster::name(i), cluster.url(i))).collect());
    let verdict = read_back(&members, spec.cluster.partitions, &history).await?;
    let ledger = check_ledger(&members, &books).await?;
    let steady_ops_per_s = timeline::throughput(&history, 1_000, chaos_from_ms);
    let chaos_ops_per_s = timeline::throughput(&history, chaos_from_ms, chaos_to_ms);
    let mut report = report(spec, history, faults, verdict, ledger, steady_ops_per_s, chaos_ops_per_s);
    report.started_unix_ms = started_unix_ms;
    Ok(report)
}

/// What [`against`] found: the chaos suite's clients run against a cluster that something else
/// disturbs (a Kubernetes operator rolling it, a person), and the suite's checks.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WorkloadReport {
    pub partitions: u32,
    pub seconds: f64,
    pub operations: usize,
    pub acknowledged: usize,
    pub ops_per_s: f64,
    pub verdict: Verdict,
    pub ledger: LedgerCheck,
    /// The steps of the steps file, with the unavailability each caused.
    pub steps: Vec<StepReport>,
}

/// A step that something else took while the workload ran (an upgrade, a server powered off),
/// as its steps file names it, and the write unavailability it caused: the longest stretch,
/// from its beginning until the first acknowledgement after its end, in which some partition
/// acknowledged nothing (`history::unavailability` over every partition); `None` when some
/// partition acknowledged nothing after it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StepReport {
    pub name: String,
    /// Since the workload began.
    pub began_ms: u64,
    pub ended_ms: u64,
    pub unavailability_ms: Option<u64>,
}

/// What a steps file says, written while a workload runs by whatever takes the steps: lines
/// `UNIX_MS begin NAME`, `UNIX_MS end NAME` and, to stop the workload early, `UNIX_MS stop`
/// (UNIX_MS: milliseconds since the Unix epoch). A step not yet ended ends at `now_unix_ms`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Steps {
    /// Name, began and ended, in Unix ms, in the order they began.
    pub steps: Vec<(String, u64, u64)>,
    pub stop: bool,
}

impl Steps {
    /// Only whole lines count: a last line without its newline may be half written.
    pub fn parse(text: &str, now_unix_ms: u64) -> Result<Steps, String> {
        let mut out = Steps::default();
        let whole = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
        for (i, line) in whole.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let bad = || format!("steps file, line {}: {line:?} is not `UNIX_MS begin|end NAME` or `UNIX_MS stop`", i + 1);
            let mut words = line.trim().splitn(3, ' ');
            let at: u64 = words.next().and_then(|w| w.parse().ok()).ok_or_else(bad)?;
            match (words.next(), words.next().map(str::trim)) {
                (Some("stop"), None) => out.stop = true,
                (Some("begin"), Some(name)) if !name.is_empty() => out.steps.push((name.to_string(), at, u64::MAX)),
                (Some("end"), Some(name)) => {
                    let step = out.steps.iter_mut().rev().find(|(n, _, end)| n == name && *end == u64::MAX);
                    step.ok_or_else(|| format!("steps file, line {}: step {name:?} ends but did not begin", i + 1))?.2 = at;
                }
                _ => return Err(bad()),
            }
        }
        for step in &mut out.steps {
            step.2 = step.2.min(now_unix_ms.max(step.1));
        }
        Ok(out)
    }

    /// Each step's unavailability in `history`, whose times count from `started_unix_ms`.
    pub fn report(&self, history: &[Record], partitions: u32, started_unix_ms: u64) -> Vec<StepReport> {
        let ms = |unix: u64| unix.saturating_sub(started_unix_ms);
        let windows: Vec<FaultWindow> = self
            .steps
            .iter()
            .map(|(_, began, ended)| FaultWindow { at_ms: ms(*began), healed_ms: ms(*ended), partitions: (0..partitions).collect() })
            .collect();
        let unavailable = history::unavailability(history, &windows);
        self.steps
            .iter()
            .zip(unavailable)
            .map(|((name, began, ended), unavailability_ms)| StepReport {
                name: name.clone(),
                began_ms: ms(*began),
                ended_ms: ms(*ended),
                unavailability_ms,
            })
            .collect()
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// The steps file at `path` now (none yet: no step).
fn read_steps(path: &Path) -> anyhow::Result<Steps> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => anyhow::bail!("cannot read the steps file {}: {e}", path.display()),
    };
    Steps::parse(&text, unix_ms()).map_err(anyhow::Error::msg)
}

impl WorkloadReport {
    pub fn passed(&self) -> bool {
        self.verdict.ok() && self.ledger.ok()
    }
}

/// Runs the clients of `load` against the cluster at `servers` for `duration` (showing progress
/// every 10 s on stderr), then reads every replica of every partition back against the history
/// and checks every book. The cluster should be new to the workload: its operation ids start
/// at 1 each time.
///
/// With `steps` (a steps file, [`Steps`]), the report has the unavailability of each step it
/// names, and a `stop` line there stops the clients before `duration`.
pub async fn against(servers: &[String], duration: Duration, mut load: LoadSpec, steps: Option<&Path>) -> anyhow::Result<WorkloadReport> {
    let first = servers.first().context("no server given")?;
    let members = Members::of(first).await?;
    let mut c = client::connect(first).await?;
    let partitions = c.node.status(pb::StatusRequest {}).await.map_err(client::status_error)?.into_inner().partitions.len() as u32;
    load.partitions = partitions;
    let mut router = Router::connect(servers).await?;
    router.attempt_timeout = Some(workload::ATTEMPT_TIMEOUT);
    let router = Arc::new(router);
    let books = Arc::new(workload::books(partitions));
    workload::open_books(&router, &books).await?;
    let started = Instant::now();
    let started_unix_ms = unix_ms();
    let running = Load::start(router, books.clone(), &load, started);
    eprintln!("workload: {} clients on {partitions} partitions of {} members, for {duration:?}", load.clients, members.0.len());
    let mut shown = Instant::now();
    while started.elapsed() < duration {
        tokio::time::sleep((duration - started.elapsed()).min(Duration::from_secs(1))).await;
        let stop = match steps {
            Some(path) => read_steps(path)?.stop,
            None => false,
        };
        if stop || shown.elapsed() >= Duration::from_secs(10) || started.elapsed() >= duration {
            shown = Instant::now();
            let (done, acked) = running.progress();
            eprintln!("  {:>6.1} s: {done} operations, {acked} acknowledged", started.elapsed().as_secs_f64());
        }
        if stop {
            eprintln!("workload: the steps file says stop");
            break;
        }
    }
    let history = running.stop().await?;
    let steps = match steps {
        Some(path) => read_steps(path)?.report(&history, partitions, started_unix_ms),
        None => Vec::new(),
    };
    let seconds = started.elapsed().as_secs_f64();
    eprintln!("workload: stopped; reading every replica back");
    let members = members.and_now(servers).await;
    let verdict = read_back(&members, partitions, &history).await?;
    let ledger = check_ledger(&members, &books).await?;
    let acknowledged = history.iter().filter(|r| r.outcome == Outcome::Ok).count();
    Ok(WorkloadReport {
        partitions,
        seconds,
        operations: history.len(),
        acknowledged,
        ops_per_s: history.len() as f64 / seconds.max(0.001),
        verdict,
        ledger,
        steps,
    })
}

/// Starts the Consul servers of a run, one per node (in `dir/consul`), and makes the nodes'
/// token (in `dir/consul-token`): its policy allows the run's key prefix and sessions, nothing
/// else. Blocks this runtime thread until Consul answers (up to two minutes): the servers die
/// with the thread that started them, so it must be one that lives as long as the run, not a
/// blocking-pool thread.
fn start_consul(binary: &Path, dir: &Path, servers: usize) -> anyhow::Result<(LocalConsul, ConsulNodes)> {
    tokio::task::block_in_place(|| {
        let consul = LocalConsul::start_in(binary, &dir.join("consul"), servers).context("Consul did not start")?;
        let token = consul.token_with("anthill", &anthill_policy(CONSUL_KEY_PREFIX))?;
        let token_file = dir.join("consul-token");
        std::fs::write(&token_file, token).with_context(|| format!("cannot write {}", token_file.display()))?;
        let addresses = (0..consul.len()).map(|i| consul.http_address(i)).collect();
        eprintln!("chaos: {} Consul servers up ({})", consul.len(), consul.dir().display());
        Ok((consul, ConsulNodes { addresses, token_file, key_prefix: CONSUL_KEY_PREFIX.into() }))
    })
}

/// The nemesis's part of the run: the schedule's faults until the time or count is reached,
/// then everything healed (also when a fault failed to inject).
async fn inject(
    cluster: &mut LocalCluster,
    consul: Option<&mut LocalConsul>,
    spec: &ChaosSpec,
    cuts: Option<Cuts>,
    started: Instant,
    load: &Load,
) -> anyhow::Result<Vec<Fault>> {
    let plan = schedule(&spec.faults, spec.fault_count.unwrap_or(usize::MAX / 2).min(1_000_000), &mut StdRng::seed_from_u64(spec.seed));
    let nemesis_started = Instant::now();
    let mut nemesis = Nemesis::new(cluster, consul, &spec.cluster, cuts, spec.seed, started);
    let mut result = Ok(());
    for (n, kind) in plan.into_iter().enumerate() {
        if spec.fault_count.is_none() && nemesis_started.elapsed() + spec.fault_every + Duration::from_secs(4) > spec.duration {
            break;
        }
        tokio::time::sleep(spec.fault_every).await;
        if let Err(e) = nemesis.inject(kind).await {
            result = Err(e.context(format!("the nemesis could not inject {}", kind.name())));
            break;
        }
        if (n + 1) % 10 == 0 {
            let (operations, acknowledged) = load.progress();
            eprintln!(
                "chaos: {:>7.1} s: {} faults so far; {operations} operations, {acknowledged} acknowledged",
                started.elapsed().as_secs_f64(),
                n + 1
            );
        }
    }
    let healed = nemesis.heal();
    result.and(healed)?;
    Ok(nemesis.faults)
}

fn report(
    spec: &ChaosSpec,
    history: Vec<Record>,
    faults: Vec<Fault>,
    verdict: Verdict,
    ledger: LedgerCheck,
    steady_ops_per_s: f64,
    chaos_ops_per_s: f64,
) -> ChaosReport {
    let windows: Vec<FaultWindow> =
        faults.iter().map(|f| FaultWindow { at_ms: f.at_ms, healed_ms: f.healed_ms, partitions: f.partitions.clone() }).collect();
    let unavailability = history::unavailability(&history, &windows);
    let faults: Vec<FaultReport> = faults
        .into_iter()
        .zip(unavailability)
        .map(|(fault, ms)| FaultReport { unavailability_ms: if fault.partitions.is_empty() { None } else { ms }, fault })
        .collect();
    let mut fault_counts = BTreeMap::new();
    for f in &faults {
        *fault_counts.entry(f.fault.kind.name()).or_default() += 1;
    }
    let mut kills: Vec<u64> = faults.iter().filter(|f| f.fault.kind == FaultKind::KillLeader).filter_map(|f| f.unavailability_ms).collect();
    let kill_unavailability_ms =
        match (timeline::percentile(&mut kills, 0.5), timeline::percentile(&mut kills, 0.99), kills.iter().max().copied()) {
            (Some(p50), Some(p99), Some(max)) => Some([p50, p99, max]),
            _ => None,
        };
    let count = |kind: OpKind| history.iter().filter(|r| r.kind == kind).count();
    let outcomes = |outcome: Outcome| history.iter().filter(|r| r.outcome == outcome).count();
    ChaosReport {
        seed: spec.seed,
        coordination: if spec.consul.is_some() { "consul" } else { "embedded" },
        tls: spec.cluster.tls,
        encrypted: spec.cluster.encrypt,
        started_unix_ms: 0,
        nodes: spec.cluster.nodes,
        partitions: spec.cluster.partitions,
        operations: history.len(),
        appends: count(OpKind::Append),
        transfers: count(OpKind::Transfer),
        acknowledged: outcomes(Outcome::Ok),
        failed: outcomes(Outcome::Fail),
        unknown: outcomes(Outcome::Unknown),
        worst_unavailability_ms: faults.iter().filter_map(|f| f.unavailability_ms).max(),
        faults,
        fault_counts,
        kill_unavailability_ms,
        steady_ops_per_s,
        chaos_ops_per_s,
        throughput_ratio: if steady_ops_per_s > 0.0 { chaos_ops_per_s / steady_ops_per_s } else { 0.0 },
        verdict,
        ledger,
        timeline: timeline::per_second(&history),
        history,
    }
}

/// Reads every replica of every partition back and checks the history against them; a replica
/// still catching up is read again (for up to 20 s) before anything counts as missing.
async fn read_back(members: &Members, partitions: u32, history: &[Record]) -> anyhow::Result<Verdict> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let stored = stored(members, partitions).await?;
        let verdict = history::check(history, &stored);
        if verdict.missing_on_a_replica.is_empty() || Instant::now() > deadline {
            return Ok(verdict);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The nodes the checks read: each member's name and URL.
pub struct Members(pub Vec<(String, String)>);

impl Members {
    /// The members as the node at `server` lists them (their addresses as the nodes reach each
    /// other: DNS names inside a Kubernetes cluster).
    pub async fn of(server: &str) -> anyhow::Result<Members> {
        let mut c = client::connect(server).await?;
        let status = c.node.status(pb::StatusRequest {}).await.map_err(client::status_error)?.into_inner();
        let view = status.cluster.with_context(|| format!("{server} runs alone: there are no replicas to compare"))?;
        Ok(Members(view.members.into_iter().map(|m| (m.name, client::server_url(&m.address))).collect()))
    }

    /// These members and those the first of `servers` that answers lists now (servers added
    /// while a workload ran).
    async fn and_now(mut self, servers: &[String]) -> Members {
        for server in servers {
            if let Ok(now) = Members::of(server).await {
                for (name, url) in now.0 {
                    if !self.0.iter().any(|(n, _)| *n == name) {
                        self.0.push((name, url));
                    }
                }
                break;
            }
        }
        self
    }

    fn url(&self, name: &str) -> anyhow::Result<&str> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, url)| url.as_str()).with_context(|| format!("unknown member {name}"))
    }
}

/// Each partition's replicas (member names), in the view of the member that has applied the
/// most of the coordination store (members that do not answer are skipped).
async fn replica_sets(members: &Members, partitions: u32) -> anyhow::Result<Vec<Vec<String>>> {
    let mut best: Option<pb::ClusterStatus> = None;
    for (name, url) in &members.0 {
        let Ok(mut c) = client::connect(url).await else { continue };
        let Ok(status) = c.node.status(pb::StatusRequest {}).await else { continue };
        let view = status.into_inner().cluster.with_context(|| format!("{name} reports no cluster"))?;
        if best.as_ref().is_none_or(|b| view.coordination_applied > b.coordination_applied) {
            best = Some(view);
        }
    }
    let view = best.context("no member answered")?;
    (0..partitions)
        .map(|p| {
            let ownership = view.partitions.iter().find(|o| o.partition == p).with_context(|| format!("no placement of partition {p}"))?;
            Ok(ownership.replicas.clone())
        })
        .collect()
}

/// The operation that wrote `event`: a transfer's command id, or a raw append's payload.
fn operation_of(event: &pb::RecordedEvent) -> Option<u64> {
    match event.metadata.get(COMMAND_ID_METADATA_KEY) {
        Some(id) => id.strip_prefix(COMMAND_ID_PREFIX)?.parse().ok(),
        None if event.r#type == "Op" => String::from_utf8_lossy(&event.payload).parse().ok(),
        None => None,
    }
}

/// A digest of everything an event holds, for comparing replicas.
fn fingerprint(event: &pb::RecordedEvent) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (&event.stream, event.stream_version, &event.r#type, &event.payload, event.epoch, event.append_time_us).hash(&mut hasher);
    let metadata: BTreeMap<&String, &String> = event.metadata.iter().collect();
    metadata.hash(&mut hasher);
    hasher.finish()
}

/// What each replica of each partition stores.
async fn stored(members: &Members, partitions: u32) -> anyhow::Result<Vec<Stored>> {
    let mut out = Vec::new();
    for (p, replicas) in replica_sets(members, partitions).await?.into_iter().enumerate() {
        let p = p as u32;
        for name in replicas {
            let mut node = client::connect(members.url(&name)?).await?;
            let mut events = Vec::new();
            let mut from = 1;
            loop {
                let request = pb::ReadPartitionRequest { partition: p, from_position: from, max_count: 1_000, linearizable: false };
                let batch = node.log.read_partition(request).await.map_err(client::status_error)?.into_inner().events;
                let Some(last) = batch.last().map(|e| e.position) else { break };
                // Markers, probes and the books' opening commands name no operation.
                events.extend(batch.iter().map(|e| StoredEvent { position: e.position, op: operation_of(e), fingerprint: fingerprint(e) }));
                from = last + 1;
            }
            out.push(Stored { node: name, partition: p, events });
        }
    }
    Ok(out)
}

/// Asks every replica of each book's partition for the book's totals, audit and balances
/// (module doc); a replica still applying what it stores is asked again, for up to 20 s.
async fn check_ledger(members: &Members, books: &[Book]) -> anyhow::Result<LedgerCheck> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let check = check_ledger_once(members, books).await?;
        if check.ok() || Instant::now() > deadline {
            return Ok(check);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn check_ledger_once(members: &Members, books: &[Book]) -> anyhow::Result<LedgerCheck> {
    let sets = replica_sets(members, books.len() as u32).await?;
    let expected = (workload::BOOK_ACCOUNTS as u64 * workload::OPENING_DEPOSIT).to_string();
    let mut check = LedgerCheck { books: books.len(), ..LedgerCheck::default() };
    for book in books {
        let mut first: Option<(String, Vec<i64>)> = None;
        for name in &sets[book.partition as usize] {
            let mut problem = |what: String| check.problems.push(format!("book {} on {name}: {what}", book.name));
            let mut c = client::connect(members.url(name)?).await?;
            let totals = match c.ledger.get_totals(pb::GetTotalsRequest { book: book.name.clone() }).await {
                Ok(totals) => totals.into_inner(),
                Err(status) => {
                    problem(format!("no totals: {}", status.message()));
                    continue;
                }
            };
            match totals.currencies.get("EUR") {
                Some(t) if t.balance == expected && t.deposited == expected && t.withdrawn == "0" && t.held == "0" => {}
                other => problem(format!("totals {other:?}, expected balance and deposits {expected} and nothing withdrawn or held")),
            }
            match c.ledger.audit(pb::AuditRequest { book: book.name.clone() }).await {
                Ok(audit) if audit.get_ref().ok && audit.get_ref().complete => {}
                Ok(audit) => problem(format!("audit found {:?}", audit.into_inner().violations)),
                Err(status) => problem(format!("no audit: {}", status.message())),
            }
            let mut balances = Vec::new();
            for k in 0..workload::BOOK_ACCOUNTS {
                let request = pb::GetBalanceRequest { book: book.name.clone(), account: workload::account(k) };
                match c.ledger.get_balance(request).await {
                    Ok(b) if b.get_ref().balance >= -(workload::credit_limit(k) as i64) => balances.push(b.get_ref().balance),
                    Ok(b) => problem(format!("{} is at {}, past its credit limit", workload::account(k), b.get_ref().balance)),
                    Err(status) => problem(format!("no balance of {}: {}", workload::account(k), status.message())),
                }
            }
            match &first {
                None => first = Some((name.clone(), balances)),
                Some((other, theirs)) if *theirs != balances => problem(format!("balances {balances:?}, but {other} has {theirs:?}")),
                Some(_) => {}
            }
            check.replicas_checked += 1;
        }
    }
    Ok(check)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acked(partition: u32, completed_ms: u64) -> Record {
        Record {
            id: completed_ms,
            kind: OpKind::Append,
            value: String::new(),
            partition,
            invoked_ms: completed_ms.saturating_sub(5),
            completed_ms,
            outcome: Outcome::Ok,
        }
    }

    #[test]
    fn a_steps_file_gives_each_step_its_window_and_may_stop_the_workload() {
        let text = "1000 begin upgrade\n\n1500 begin host-02 off\n2000 end upgrade\n2600 end host-02 off\n3000 begin add host-04\n";
        let steps = Steps::parse(text, 3500).unwrap();
        assert_eq!(
            steps.steps,
            [("upgrade".to_string(), 1000, 2000), ("host-02 off".to_string(), 1500, 2600), ("add host-04".to_string(), 3000, 3500)]
        );
        assert!(!steps.stop);
        assert!(Steps::parse("4000 stop\n", 4000).unwrap().stop);
        // A line being written is not read yet.
        assert_eq!(Steps::parse("1000 begin a\n1200 en", 2000).unwrap().steps, [("a".to_string(), 1000, 2000)]);
        assert!(!Steps::parse("4000 sto", 4000).unwrap().stop);
        for bad in ["x begin a\n", "1000 begin\n", "1000 pause a\n", "1000 end never-began\n"] {
            assert!(Steps::parse(bad, 5000).unwrap_err().contains("steps file, line 1"), "{bad}");
        }
    }

    #[test]
    fn a_steps_unavailability_is_the_longest_silence_of_any_partition_until_writes_come_back_after_it() {
        // The workload began at Unix ms 10,000; a step from 10,100 to 10,300.
        let steps = Steps::parse("10100 begin roll\n10300 end roll\n", 20_000).unwrap();
        let history = [acked(0, 50), acked(1, 60), acked(0, 120), acked(1, 250), acked(0, 310), acked(1, 320)];
        let report = steps.report(&history, 2, 10_000);
        // Partition 1 was silent from 100 (the step's beginning) to 250, partition 0 from 120 to
        // 310, its first write after the step: the worst of the two.
        assert_eq!(report, [StepReport { name: "roll".into(), began_ms: 100, ended_ms: 300, unavailability_ms: Some(190) }]);
        // A partition with no write after the step: no figure.
        let report = steps.report(&history[..5], 2, 10_000);
        assert_eq!(report[0].unavailability_ms, None);
    }
}
