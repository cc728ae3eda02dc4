//! `anthill bench`: a load generator for a node, and the raw-LMDB baseline it is compared with.
//!
//! Workloads:
//! - `append`: `--concurrency` clients, each sending Appends of `--batch` events of
//!   `--event-size` bytes to random streams, closed-loop, or open-loop at `--rate` requests/s in
//!   total (latency is then measured from each request's *scheduled* start, so a stalled server is
//!   not hidden by clients that slowed down with it — no coordinated omission);
//! - `session`: the same appends, each client sending them over its own `AppendSession` call (one
//!   message per append instead of one HTTP/2 stream; still one append in flight per client);
//! - `read`: clients reading every partition with ReadPartition, `--batch` events per request;
//! - `ledger`: ledger Transfer commands between random accounts of [`LEDGER_BOOKS`] books of
//!   [`LEDGER_ACCOUNTS`] accounts each (opened and funded before the clock starts): the command
//!   processor's cost (decide, evolve, state in the same transaction) over plain appends;
//! - `disk`: no node and no LMDB: random page writes and a sync in a loop, the disk's own cost
//!   and stalls, measured in the same run as the rest;
//! - `raw`: the same appends as `append`, into a [`Log`] in this process — the same LMDB writer
//!   and group commit, no gRPC, no network: the baseline that shows what the API costs;
//! - `seal`: no node, no LMDB, no disk: `--concurrency` threads sealing `--batch` events of
//!   `--event-size` bytes (payload and one metadata entry) with a tenant's data key, as the API
//!   seals a client's events with encryption at rest on — what encryption costs the CPU, apart
//!   from the disk's noise.
//!
//! `--cluster N` runs `append` against one node (the baseline), then against N nodes started on
//! loopback, through the routing client, and with `--kills K` measures K failovers (each a
//! SIGKILL of a partition's leader, timed until that partition acknowledges an append again).
//!
//! `--suite` runs the set recorded in `docs/benchmarks.md` and prints every figure with its
//! baseline ratio. Without `--server` a fresh node is started on loopback (a child process, the
//! real binary) in a temporary directory. Progress goes to stderr once a second; the report goes
//! to stdout, as a table or `--json`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anthill_proto::v1 as pb;
use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use rand::Rng;
use serde::Serialize;

use crate::client::{self, Clients};
use crate::config::{GroupCommitConfig, LimitsConfig, StorageConfig};
use crate::cpu_quota::CpuQuota;
use crate::local::{ChildNode, ClusterSpec, LocalCluster, probe_append, streams_per_partition};
use crate::log::{self, ExpectedVersion, Log, NewEvent};
use crate::metrics::Metrics;
use crate::router::Router;
use crate::storage::Store;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    Append,
    /// The same appends as `append`, each client pipelining them over its own AppendSession call.
    Session,
    Read,
    /// Ledger transfers (commands) instead of appends.
    Ledger,
    Raw,
    /// The disk alone: [`DISK_PROBE_PAGES`] random 4 KiB page writes and one `fdatasync`, over
    /// and over, in a file beside the node's data (or in the temporary directory) — what a group
    /// commit costs the disk, without LMDB, to judge the other figures (and their tail latency) by.
    Disk,
    /// Sealing alone (encryption at rest): events sealed with a tenant's data key in memory.
    Seal,
}

#[derive(Args, Clone)]
pub struct BenchArgs {
    /// Node to load. Without it, a fresh node is started on loopback in a temporary directory.
    #[arg(long, short)]
    pub server: Option<String>,
    #[arg(long, value_enum, default_value = "append")]
    pub workload: Workload,
    /// Concurrent clients (each with at most one request in flight).
    #[arg(long, short, default_value_t = 64)]
    pub concurrency: usize,
    /// Events per Append (or per ReadPartition for `read`).
    #[arg(long, short, default_value_t = 1)]
    pub batch: usize,
    /// Payload bytes per event.
    #[arg(long, default_value_t = 256)]
    pub event_size: usize,
    /// How long to run, in seconds.
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// Stop after this many requests in total (whichever comes first with --seconds).
    #[arg(long)]
    pub count: Option<u64>,
    /// Open loop: this many requests per second in total.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Number of distinct streams appended to.
    #[arg(long, default_value_t = 10_000)]
    pub streams: u64,
    /// gRPC connections the clients share.
    #[arg(long, default_value_t = 8)]
    pub connections: usize,
    /// Run the standard suite of docs/benchmarks.md instead of one workload.
    #[arg(long)]
    pub suite: bool,
    /// Extra flags for the node the benchmark starts (e.g. --node-arg=--group-commit-max-wait-us=0).
    #[arg(long = "node-arg", allow_hyphen_values = true)]
    pub node_args: Vec<String>,
    /// When appends are acknowledged: by the partition's leader, or by a majority of its replicas.
    #[arg(long, value_enum, default_value = "leader")]
    pub durability: crate::cli::DurabilityArg,
    /// Run the `append` (or `ledger`) workload against a cluster of this many nodes started on
    /// loopback (127.0.0.11 on), through the routing client, after the same load against one
    /// node (the baseline, measured in the same run). Ledger commands are acknowledged once
    /// committed in a cluster, whatever --durability says.
    #[arg(long, value_parser = clap::value_parser!(u16).range(2..=12))]
    pub cluster: Option<u16>,
    /// With --cluster: then kill a partition's leader this many times (SIGKILL, one at a time,
    /// restarting it after) and measure how long until appends to that partition succeed again.
    #[arg(long, default_value_t = 0)]
    pub kills: usize,
    /// With --cluster: keep the nodes' data directories and logs (the path is printed).
    #[arg(long)]
    pub keep: bool,
    /// With --cluster: partitions of the single node and of the cluster.
    #[arg(long, default_value_t = crate::config::StorageConfig::default().partitions)]
    pub partitions: u32,
    /// With --cluster: the nodes' session TTL (how long a dead node goes unnoticed).
    #[arg(long, default_value_t = 1_000)]
    pub session_ttl_ms: u64,
    /// With --cluster: hold every node process to this many cores (a cgroup CPU quota), in the
    /// one-node run and in the cluster alike, as a node per machine would be; the client is not
    /// held. Nodes restarted by --kills run without it.
    #[arg(long)]
    pub cpu_per_node: Option<f64>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct LatencyUs {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    pub name: String,
    pub workload: Workload,
    pub concurrency: usize,
    pub batch: usize,
    pub event_size: usize,
    pub rate: Option<f64>,
    pub requests: u64,
    pub events: u64,
    pub errors: u64,
    pub seconds: f64,
    pub requests_per_sec: f64,
    pub events_per_sec: f64,
    pub latency_us: LatencyUs,
    /// Bytes written to the node's disk per event appended, from the device's counters (so it
    /// includes what the file system adds); absent when the node is not local or for reads.
    pub disk_write_bytes_per_event: Option<f64>,
    /// This result's events/s over its baseline's, when it has one.
    pub baseline: Option<String>,
    pub ratio_to_baseline: Option<f64>,
}

/// Shared counters of one run, read by the progress reporter.
struct Progress {
    requests: AtomicU64,
    events: AtomicU64,
    errors: AtomicU64,
    stop: AtomicBool,
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    if let Some(nodes) = args.cluster {
        return cluster_run(&args, nodes as usize).await;
    }
    if args.kills > 0 {
        bail!("--kills needs --cluster");
    }
    if args.cpu_per_node.is_some() {
        bail!("--cpu-per-node needs --cluster (it holds the nodes the cluster benchmark starts)");
    }
    let needs_node = args.suite || !matches!(args.workload, Workload::Raw | Workload::Disk | Workload::Seal);
    let (node, _dir, url) = match (&args.server, needs_node) {
        (Some(server), _) => (None, None, server.clone()),
        (None, false) => (None, None, String::new()),
        (None, true) => {
            let dir = tempfile::Builder::new().prefix("anthill-bench-").tempdir()?;
            let exe = std::env::current_exe()?;
            let node_args = started_node_args(&args);
            let node = ChildNode::spawn(&exe, &dir.path().join("node"), &node_args)?;
            eprintln!("bench: started a node at {} (data in {})", node.url(), dir.path().display());
            let url = node.url();
            (Some(node), Some(dir), url)
        }
    };
    // Disk writes are counted only for a node this process started (its data directory is known).
    let server = Server { url, data_dir: node.as_ref().map(|n| n.data_dir.clone()), seeds: None };
    let results = if args.suite { suite(&args, &server).await? } else { vec![one(&args, &server, None).await?] };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "machine": machine(), "results": results }))?);
    } else {
        print!("{}", table(&results));
    }
    Ok(())
}

/// The standard set: each gRPC figure next to its raw baseline, latency at half load, reads.
async fn suite(args: &BenchArgs, server: &Server) -> anyhow::Result<Vec<BenchResult>> {
    let base = BenchArgs { suite: false, rate: None, count: None, ..args.clone() };
    let mut results = Vec::new();
    let mut add = |mut r: BenchResult, baseline: Option<&BenchResult>| {
        if let Some(b) = baseline {
            r.baseline = Some(b.name.clone());
            r.ratio_to_baseline = Some(r.events_per_sec / b.events_per_sec);
        }
        results.push(r.clone());
        r
    };
    // Single-event runs first, on a node that holds little; each run starts after the disk settled.
    let disk = BenchArgs { workload: Workload::Disk, concurrency: 1, batch: 1, ..base.clone() };
    add(one(&disk, server, Some(&format!("disk: {DISK_PROBE_PAGES} random pages + fdatasync"))).await?, None);
    settle().await;
    let single = BenchArgs { batch: 1, concurrency: 64, ..base.clone() };
    let raw1 = add(one(&BenchArgs { workload: Workload::Raw, ..single.clone() }, server, Some("raw: 1 event/append")).await?, None);
    settle().await;
    let max1 =
        add(one(&BenchArgs { workload: Workload::Append, ..single.clone() }, server, Some("grpc: 1 event/append")).await?, Some(&raw1));
    settle().await;
    let half = BenchArgs { workload: Workload::Append, rate: Some((max1.requests_per_sec / 2.0).floor().max(1.0)), ..single.clone() };
    add(one(&half, server, Some("grpc: 1 event/append at half max")).await?, Some(&raw1));
    settle().await;
    let session = BenchArgs { workload: Workload::Session, ..single.clone() };
    let max_session = add(one(&session, server, Some("session: 1 event/append")).await?, Some(&raw1));
    settle().await;
    let half = BenchArgs { rate: Some((max_session.requests_per_sec / 2.0).floor().max(1.0)), ..session };
    add(one(&half, server, Some("session: 1 event/append at half max")).await?, Some(&raw1));
    settle().await;
    let ledger = BenchArgs { workload: Workload::Ledger, ..single };
    let max_ledger = add(one(&ledger, server, Some("ledger: 1 transfer/command")).await?, Some(&raw1));
    settle().await;
    let half = BenchArgs { rate: Some((max_ledger.requests_per_sec / 2.0).floor().max(1.0)), ..ledger };
    add(one(&half, server, Some("ledger: 1 transfer/command at half max")).await?, Some(&raw1));
    settle().await;
    let batched = BenchArgs { batch: 100, concurrency: 8, ..base.clone() };
    let raw100 = add(one(&BenchArgs { workload: Workload::Raw, ..batched.clone() }, server, Some("raw: 100 events/append")).await?, None);
    settle().await;
    add(one(&BenchArgs { workload: Workload::Append, ..batched }, server, Some("grpc: 100 events/append")).await?, Some(&raw100));
    settle().await;
    let read = BenchArgs { workload: Workload::Read, batch: 1000, concurrency: 4, ..base };
    add(one(&read, server, Some("grpc: ReadPartition 1000/request")).await?, None);
    Ok(results)
}

/// Flags of the nodes the benchmark starts: quiet (`--log-level warn`) unless `--node-arg` says.
fn started_node_args(args: &BenchArgs) -> Vec<String> {
    let mut node_args = Vec::new();
    if !args.node_args.iter().any(|a| a.starts_with("--log-level")) {
        node_args.extend(["--log-level".to_string(), "warn".to_string()]);
    }
    node_args.extend(args.node_args.iter().cloned());
    node_args
}

/// Failover times measured by `--kills`.
#[derive(Debug, Clone, Serialize)]
pub struct FailoverReport {
    pub kills: usize,
    pub session_ttl_ms: u64,
    /// From each SIGKILL of a partition's leader to the first `quorum` append to that partition
    /// acknowledged after it (sent after it), in milliseconds, in kill order.
    pub samples_ms: Vec<f64>,
    pub p50_ms: f64,
    pub max_ms: f64,
    /// `quorum` appends the probes had acknowledged over all kills, and how many of them were
    /// missing from their stream at the end (must be 0).
    pub acknowledged: u64,
    pub lost: u64,
}

/// `--cluster N`: the append load against one node (the baseline), then against N nodes through
/// the routing client, then `--kills` failovers.
async fn cluster_run(args: &BenchArgs, nodes: usize) -> anyhow::Result<()> {
    if args.server.is_some() || args.suite || !matches!(args.workload, Workload::Append | Workload::Ledger) {
        bail!("--cluster starts its own nodes and runs the append or the ledger workload: leave out --server and --suite");
    }
    let workload = format!("{:?}", args.workload).to_lowercase();
    let mut dir = tempfile::Builder::new().prefix("anthill-bench-cluster-").tempdir()?;
    if args.keep {
        dir.disable_cleanup(true);
        eprintln!("bench: the nodes' data and logs stay in {}", dir.path().display());
    }
    let exe = std::env::current_exe()?;
    let node_args = started_node_args(args);

    let mut single_args = node_args.clone();
    single_args.extend(["--partitions".to_string(), args.partitions.to_string()]);
    let single = ChildNode::spawn(&exe, &dir.path().join("single"), &single_args)?;
    eprintln!("bench: started one node at {} for the baseline", single.url());
    let quota = |pid: u32, name: &str| -> anyhow::Result<Option<CpuQuota>> {
        args.cpu_per_node.map(|cores| CpuQuota::limit(pid, cores, &format!("bench-{name}"))).transpose()
    };
    let single_quota = quota(single.pid(), "single")?;
    let server = Server { url: single.url(), data_dir: Some(single.data_dir.clone()), seeds: None };
    let mut baseline = one(args, &server, Some(&format!("{workload}: 1 node"))).await?;
    baseline.baseline = None;
    single.terminate(Duration::from_secs(30))?;
    drop(single_quota);
    settle().await;

    let spec = ClusterSpec {
        nodes,
        partitions: args.partitions,
        replication_factor: nodes.min(3) as u32,
        session_ttl_ms: args.session_ttl_ms,
        node_args: node_args.clone(),
        consul: None,
        tls: false,
        encrypt: false,
    };
    let mut cluster = LocalCluster::start(&exe, &dir.path().join("cluster"), &spec)?;
    eprintln!("bench: started {nodes} nodes at {}", cluster.urls().join(", "));
    let mut quotas = Vec::new();
    for (i, node) in cluster.nodes.iter().enumerate() {
        if let Some(node) = node {
            quotas.extend(quota(node.pid(), &LocalCluster::name(i))?);
        }
    }
    if let Some(cores) = args.cpu_per_node {
        eprintln!("bench: every node held to {cores} cores (the one-node run too)");
    }
    cluster.wait_whole(&spec, Duration::from_secs(60)).await?;
    let server = Server { url: cluster.url(0), data_dir: Some(cluster.dir().to_path_buf()), seeds: Some(cluster.urls()) };
    // Commands are acknowledged once committed in a cluster, whatever --durability says.
    let durability = if args.workload == Workload::Ledger { "quorum".to_string() } else { format!("{:?}", args.durability).to_lowercase() };
    let mut routed = one(args, &server, Some(&format!("{workload}: {nodes} nodes, {durability} acks"))).await?;
    routed.baseline = Some(baseline.name.clone());
    routed.ratio_to_baseline = Some(routed.events_per_sec / baseline.events_per_sec);
    let results = vec![baseline, routed];

    let failover = if args.kills > 0 { Some(failovers(args.kills, &mut cluster, &spec).await?) } else { None };
    // The nodes first (each is waited for), then their now empty groups.
    drop(cluster);
    drop(quotas);
    if args.json {
        let report =
            serde_json::json!({ "machine": machine(), "cpu_per_node": args.cpu_per_node, "results": results, "failover": failover });
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", table(&results));
        if let Some(f) = &failover {
            println!(
                "failover: {} kills, session TTL {} ms: p50 {:.0} ms, max {:.0} ms; {} quorum appends acknowledged, {} lost",
                f.kills, f.session_ttl_ms, f.p50_ms, f.max_ms, f.acknowledged, f.lost
            );
        }
    }
    Ok(())
}

/// Kills the leader of partition `k` (of the current routing table) `kills` times.
async fn failovers(kills: usize, cluster: &mut LocalCluster, spec: &ClusterSpec) -> anyhow::Result<FailoverReport> {
    let router = Arc::new(Router::connect(&cluster.urls()).await?);
    let streams = streams_per_partition("bench-failover", spec.partitions);
    let mut samples = Vec::new();
    let mut acked: Vec<(String, String)> = Vec::new();
    for k in 0..kills {
        cluster.wait_whole(spec, Duration::from_secs(60)).await?;
        router.refresh().await?;
        let partition = (k as u32 * 7) % spec.partitions;
        let stream = streams[partition as usize].clone();
        // The node that serves the partition now, by its own word (a view may lag).
        let victim = cluster.serving_node(partition).await.with_context(|| format!("no node serves partition {partition}"))?;
        // The probe appends to the partition all along: (sent, answered, payload) of each ack.
        let stop = Arc::new(AtomicBool::new(false));
        let acks: Arc<Mutex<Vec<(Instant, Instant, String)>>> = Arc::default();
        let probe = {
            let (router, stop, stream, acks) = (router.clone(), stop.clone(), stream.clone(), acks.clone());
            tokio::spawn(async move {
                for n in 0.. {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let payload = format!("kill-{k}-{n}");
                    let sent = Instant::now();
                    // A failed append (the leader died mid-request, or no leader yet) is retried.
                    if router.append(probe_append(&stream, &payload)).await.is_ok() {
                        acks.lock().push((sent, Instant::now(), payload));
                    }
                }
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        let killed_at = Instant::now();
        cluster.kill9(victim)?;
        let deadline = killed_at + Duration::from_secs(30);
        let first_after = |acks: &[(Instant, Instant, String)]| {
            acks.iter().find(|(sent, _, _)| *sent > killed_at).map(|(_, answered, _)| *answered - killed_at)
        };
        let took = loop {
            tokio::time::sleep(Duration::from_millis(10)).await;
            if let Some(took) = first_after(&acks.lock()) {
                break Some(took);
            }
            if Instant::now() > deadline {
                break None;
            }
        };
        stop.store(true, Ordering::Relaxed);
        probe.await?;
        let Some(took) = took else {
            bail!(
                "kill {}: partition {partition} took no append within 30 s of killing {} (logs in {})",
                k + 1,
                LocalCluster::name(victim),
                cluster.dir().display()
            );
        };
        eprintln!(
            "bench: kill {}/{kills}: {} (leader of partition {partition}) → appends acknowledged again after {:.0} ms",
            k + 1,
            LocalCluster::name(victim),
            took.as_secs_f64() * 1000.0
        );
        samples.push(took.as_secs_f64() * 1000.0);
        acked.extend(acks.lock().drain(..).map(|(_, _, payload)| (stream.clone(), payload)));
        cluster.start_node(victim, &spec.node_args)?;
    }
    // Every acknowledged probe append is in its stream.
    let mut lost = 0;
    let mut by_stream: std::collections::BTreeMap<&str, Vec<&str>> = Default::default();
    for (stream, payload) in &acked {
        by_stream.entry(stream).or_default().push(payload);
    }
    for (stream, payloads) in by_stream {
        let events = router.read_stream_all(stream).await.map_err(client::status_error)?;
        let stored: std::collections::HashSet<String> =
            events.into_iter().map(|e| String::from_utf8_lossy(&e.payload).into_owned()).collect();
        lost += payloads.iter().filter(|p| !stored.contains(**p)).count() as u64;
    }
    let mut sorted = samples.clone();
    sorted.sort_by(f64::total_cmp);
    Ok(FailoverReport {
        kills,
        session_ttl_ms: spec.session_ttl_ms,
        p50_ms: sorted[sorted.len() / 2],
        max_ms: *sorted.last().expect("at least one kill"),
        samples_ms: samples,
        acknowledged: acked.len() as u64,
        lost,
    })
}

/// Lets the previous run's writeback finish so it does not bill the next run.
async fn settle() {
    // SAFETY: sync(2) has no preconditions.
    tokio::task::spawn_blocking(|| unsafe { libc::sync() }).await.ok();
    tokio::time::sleep(Duration::from_secs(1)).await;
}

async fn one(args: &BenchArgs, server: &Server, name: Option<&str>) -> anyhow::Result<BenchResult> {
    if args.concurrency == 0 || args.batch == 0 {
        bail!("--concurrency and --batch must be at least 1");
    }
    if !(args.seconds.is_finite() && args.seconds > 0.0) {
        bail!("--seconds must be a positive number, got {}", args.seconds);
    }
    if let Some(rate) = args.rate
        && !(rate.is_finite() && rate > 0.0)
    {
        bail!("--rate must be a positive number of requests per second, got {rate}");
    }
    let name = name.map(str::to_string).unwrap_or_else(|| format!("{:?}", args.workload).to_lowercase());
    eprintln!("bench: {name}: {} clients, {} events/request, {} s", args.concurrency, args.batch, args.seconds);
    let progress = Arc::new(Progress {
        requests: AtomicU64::new(0),
        events: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    });
    let histogram = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?));
    // The disk that takes the writes: the temporary directory's for the in-process baseline.
    let disk = if args.workload == Workload::Raw { Some(std::env::temp_dir()) } else { server.data_dir.clone() };
    let written_before = disk.as_deref().and_then(disk_written_bytes);
    // The disk probe's file is written in full before the clock starts.
    let probe_file = match args.workload {
        Workload::Disk => {
            // Beside the node's data when this benchmark started the node, so it is the same disk.
            let dir = server.data_dir.as_deref().and_then(std::path::Path::parent).map_or_else(std::env::temp_dir, |d| d.to_path_buf());
            Some(tokio::task::spawn_blocking(move || prepare_disk_probe(&dir)).await??)
        }
        _ => None,
    };
    if args.workload == Workload::Ledger {
        let books = match &server.seeds {
            Some(seeds) => Books::Routed(Arc::new(Router::connect(seeds).await?)),
            None => Books::Direct(Box::new(connect_pool(&server.url, 1).await?.remove(0))),
        };
        open_ledger_books(&books).await?;
    }
    let reporter = tokio::spawn(report_progress(progress.clone(), name.clone()));
    let started = Instant::now();
    match args.workload {
        Workload::Append if server.seeds.is_some() => {
            let seeds = server.seeds.as_deref().expect("checked");
            // As many routers (each with one connection per node) as the pool has connections.
            let mut routers = Vec::new();
            for _ in 0..args.connections.min(args.concurrency).max(1) {
                routers.push(Arc::new(Router::connect(seeds).await?));
            }
            drive(args, &Target::Routed(routers), &progress, &histogram).await?;
        }
        Workload::Append | Workload::Session => {
            let pool = connect_pool(&server.url, args.connections.min(args.concurrency)).await?;
            let target = if args.workload == Workload::Session { Target::Session(pool) } else { Target::Grpc(pool) };
            drive(args, &target, &progress, &histogram).await?;
        }
        Workload::Raw => {
            let dir = tempfile::Builder::new().prefix("anthill-bench-raw-").tempdir()?;
            let store = Arc::new(Store::open(dir.path(), &StorageConfig::default())?);
            let log = Arc::new(Log::start(
                store,
                &GroupCommitConfig::default(),
                &LimitsConfig::default(),
                &crate::config::AppConfig::default(),
                Arc::new(Metrics::default()),
            )?);
            let target = Target::Raw(log.clone());
            drive(args, &target, &progress, &histogram).await?;
            tokio::task::spawn_blocking(move || log.close()).await?;
        }
        Workload::Read => {
            let pool = connect_pool(&server.url, args.connections.min(args.concurrency)).await?;
            read_all(args, &pool, &progress, &histogram).await?;
        }
        Workload::Ledger if server.seeds.is_some() => {
            let seeds = server.seeds.as_deref().expect("checked");
            let mut routers = Vec::new();
            for _ in 0..args.connections.min(args.concurrency).max(1) {
                routers.push(Arc::new(Router::connect(seeds).await?));
            }
            drive(args, &Target::RoutedLedger(routers), &progress, &histogram).await?;
        }
        Workload::Ledger => {
            let pool = connect_pool(&server.url, args.connections.min(args.concurrency)).await?;
            drive(args, &Target::Ledger(pool), &progress, &histogram).await?;
        }
        Workload::Disk => {
            let file = probe_file.expect("prepared above");
            let (seconds, progress, histogram) = (args.seconds, progress.clone(), histogram.clone());
            tokio::task::spawn_blocking(move || probe_disk(&file, seconds, &progress, &histogram)).await??;
        }
        Workload::Seal => {
            let dir = tempfile::Builder::new().prefix("anthill-bench-seal-").tempdir()?;
            let kek: String = (0..32).map(|_| format!("{:02x}", rand::random::<u8>())).collect();
            let kek = crate::security::keys::Kek::from_hex(&kek).map_err(anyhow::Error::msg)?;
            let keys = crate::security::keys::Keys::in_file(dir.path().join("keys.json"), [kek])?;
            let key = keys.data_key_for_write("bench").await.map_err(client::status_error)?;
            let deadline = Instant::now() + Duration::from_secs_f64(args.seconds);
            let budget = Arc::new(AtomicU64::new(args.count.unwrap_or(u64::MAX)));
            let mut workers = Vec::new();
            for _ in 0..args.concurrency.max(1) {
                let (key, budget, progress, histogram) = (key.clone(), budget.clone(), progress.clone(), histogram.clone());
                let (size, batch) = (args.event_size, args.batch);
                workers.push(tokio::task::spawn_blocking(move || seal_loop(&key, size, batch, deadline, &budget, &progress, &histogram)));
            }
            for worker in workers {
                worker.await??;
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let written = written_before.zip(disk.as_deref().and_then(disk_written_bytes)).map(|(before, after)| after.saturating_sub(before));
    progress.stop.store(true, Ordering::Relaxed);
    reporter.await?;
    let h = histogram.lock();
    let requests = progress.requests.load(Ordering::Relaxed);
    let events = progress.events.load(Ordering::Relaxed);
    let errors = progress.errors.load(Ordering::Relaxed);
    if requests == 0 {
        bail!("{name}: no request succeeded ({errors} errors)");
    }
    Ok(BenchResult {
        name,
        workload: args.workload,
        // The disk probe is one thread whatever --concurrency says.
        concurrency: if args.workload == Workload::Disk { 1 } else { args.concurrency },
        batch: args.batch,
        event_size: args.event_size,
        rate: args.rate,
        requests,
        events,
        errors,
        seconds,
        requests_per_sec: requests as f64 / seconds,
        events_per_sec: events as f64 / seconds,
        latency_us: LatencyUs {
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        },
        disk_write_bytes_per_event: written
            .filter(|_| !matches!(args.workload, Workload::Read | Workload::Disk | Workload::Seal))
            .map(|bytes| bytes as f64 / events.max(1) as f64),
        baseline: None,
        ratio_to_baseline: None,
    })
}

/// The node the benchmark loads.
struct Server {
    url: String,
    /// Known when the benchmark started the node itself.
    data_dir: Option<std::path::PathBuf>,
    /// A cluster's nodes: appends go through the routing client.
    seeds: Option<Vec<String>>,
}

/// Bytes written so far to the block device holding `path` (its sectors-written counter in
/// /sys/dev/block/MAJ:MIN/stat), by every process: the benchmark runs on an otherwise idle machine.
fn disk_written_bytes(path: &std::path::Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(path).ok()?.dev();
    let stat = std::fs::read_to_string(format!("/sys/dev/block/{}:{}/stat", libc::major(dev), libc::minor(dev))).ok()?;
    let sectors: u64 = stat.split_whitespace().nth(6)?.parse().ok()?;
    Some(sectors * 512)
}

async fn connect_pool(server: &str, connections: usize) -> anyhow::Result<Vec<Clients>> {
    let mut pool = Vec::new();
    for _ in 0..connections.max(1) {
        pool.push(client::connect(server).await?);
    }
    Ok(pool)
}

enum Target {
    Grpc(Vec<Clients>),
    Routed(Vec<Arc<Router>>),
    Ledger(Vec<Clients>),
    /// Transfers, each to the leader of its book's partition.
    RoutedLedger(Vec<Arc<Router>>),
    Session(Vec<Clients>),
    Raw(Arc<Log>),
}

/// Where one client sends its appends.
enum Sink {
    Grpc(Box<Clients>),
    Routed(Arc<Router>),
    Ledger(Box<Clients>),
    RoutedLedger(Arc<Router>),
    Session(Box<Session>),
    Raw(Arc<Log>),
}

/// One client's AppendSession call: requests go in through `requests`, answers come back in order.
struct Session {
    requests: tokio::sync::mpsc::Sender<pb::AppendSessionRequest>,
    answers: tonic::Streaming<pb::AppendSessionResponse>,
    next_id: u64,
}

impl Session {
    async fn open(clients: &Clients) -> anyhow::Result<Self> {
        let (requests, rx) = tokio::sync::mpsc::channel(1);
        let answers =
            clients.log.clone().append_session(tokio_stream::wrappers::ReceiverStream::new(rx)).await.map_err(client::status_error)?;
        Ok(Session { requests, answers: answers.into_inner(), next_id: 0 })
    }

    /// Sends one append and waits for its answer; true when it was appended.
    async fn append(&mut self, append: pb::AppendRequest) -> bool {
        self.next_id += 1;
        let id = self.next_id;
        if self.requests.send(pb::AppendSessionRequest { id, append: Some(append) }).await.is_err() {
            return false;
        }
        match self.answers.message().await {
            Ok(Some(answer)) => answer.id == id && matches!(answer.result, Some(pb::append_session_response::Result::Appended(_))),
            _ => false,
        }
    }
}

/// Runs the append clients until the time or the request count is used up.
async fn drive(args: &BenchArgs, target: &Target, progress: &Arc<Progress>, histogram: &Arc<Mutex<Histogram<u64>>>) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs_f64(args.seconds);
    let budget = Arc::new(AtomicU64::new(args.count.unwrap_or(u64::MAX)));
    let interval = args.rate.map(|r| Duration::from_secs_f64(args.concurrency as f64 / r));
    let payload = vec![b'x'; args.event_size];
    // Every client is ready (sessions open) before the first starts, so a failure leaves none running.
    let mut clients = Vec::with_capacity(args.concurrency);
    for worker in 0..args.concurrency {
        clients.push(match target {
            Target::Grpc(pool) => Sink::Grpc(Box::new(pool[worker % pool.len()].clone())),
            Target::Routed(routers) => Sink::Routed(routers[worker % routers.len()].clone()),
            Target::Ledger(pool) => Sink::Ledger(Box::new(pool[worker % pool.len()].clone())),
            Target::RoutedLedger(routers) => Sink::RoutedLedger(routers[worker % routers.len()].clone()),
            Target::Session(pool) => Sink::Session(Box::new(Session::open(&pool[worker % pool.len()]).await?)),
            Target::Raw(log) => Sink::Raw(log.clone()),
        });
    }
    let mut tasks = Vec::new();
    for (worker, client) in clients.into_iter().enumerate() {
        let (progress, histogram, budget, payload) = (progress.clone(), histogram.clone(), budget.clone(), payload.clone());
        let (batch, streams, durability) = (args.batch, args.streams.max(1), args.durability.wire());
        tasks.push(tokio::spawn(async move {
            let mut local = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
            let mut client = client;
            // Spread open-loop clients over the interval so they do not fire in lockstep.
            let mut scheduled = Instant::now() + interval.map_or(Duration::ZERO, |i| i.mul_f64(worker as f64 / 64.0 % 1.0));
            while Instant::now() < deadline && take_one(&budget) {
                if interval.is_some() {
                    tokio::time::sleep_until(scheduled.into()).await;
                }
                let start = if interval.is_some() { scheduled } else { Instant::now() };
                let stream = format!("bench-{}", rand::rng().random_range(0..streams));
                let wire = || {
                    let events = (0..batch)
                        .map(|_| pb::EventData { r#type: "BenchEvent".into(), payload: payload.clone(), metadata: Default::default() })
                        .collect();
                    pb::AppendRequest { durability, stream: stream.clone(), expected_version: None, events }
                };
                let ok = match &mut client {
                    Sink::Grpc(clients) => clients.log.append(wire()).await.is_ok(),
                    Sink::Routed(router) => router.append(wire()).await.is_ok(),
                    Sink::Session(session) => session.append(wire()).await,
                    // A rejection (insufficient funds) is the processor's answer too: it counts.
                    Sink::Ledger(clients) => match clients.ledger.transfer(random_transfer()).await {
                        Ok(_) => true,
                        Err(status) => status.metadata().get(crate::api::ledger::REJECTION_TRAILER).is_some(),
                    },
                    Sink::RoutedLedger(router) => {
                        let transfer = random_transfer();
                        let partition = router.partition_of(&format!("ledger/{}", transfer.book));
                        let sent = router
                            .on_leader(partition, |mut c| {
                                let transfer = transfer.clone();
                                async move { c.ledger.transfer(transfer).await }
                            })
                            .await;
                        match sent {
                            Ok(_) => true,
                            Err(status) => status.metadata().get(crate::api::ledger::REJECTION_TRAILER).is_some(),
                        }
                    }
                    Sink::Raw(log) => {
                        let events = (0..batch)
                            .map(|_| NewEvent { event_type: "BenchEvent".into(), payload: payload.clone(), metadata: vec![] })
                            .collect();
                        log.append(log::AppendRequest { stream, expected: ExpectedVersion::Any, events }).await.is_ok()
                    }
                };
                if ok {
                    let _ = local.record(start.elapsed().as_micros().max(1) as u64);
                    progress.requests.fetch_add(1, Ordering::Relaxed);
                    progress.events.fetch_add(batch as u64, Ordering::Relaxed);
                } else {
                    progress.errors.fetch_add(1, Ordering::Relaxed);
                }
                if let Some(interval) = interval {
                    scheduled += interval;
                }
            }
            histogram.lock().add(&local).expect("same bounds");
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    Ok(())
}

/// Books of the `ledger` workload (spread over the partitions by their stream's hash).
pub const LEDGER_BOOKS: usize = 64;
/// Accounts per book of the `ledger` workload.
pub const LEDGER_ACCOUNTS: usize = 64;
/// Each account's opening deposit; transfers move 1 to 100.
const LEDGER_FUNDING: u64 = 1_000_000;

/// Where the `ledger` workload's books are opened: one node, or each book's leader in a cluster.
enum Books {
    Direct(Box<Clients>),
    Routed(Arc<Router>),
}

impl Books {
    async fn open(&self, open: pb::OpenAccountRequest) -> Result<(), tonic::Status> {
        match self {
            Books::Direct(clients) => clients.ledger.clone().open_account(open).await.map(|_| ()),
            Books::Routed(router) => {
                let partition = router.partition_of(&format!("ledger/{}", open.book));
                router
                    .on_leader_idempotent(partition, |mut c| {
                        let open = open.clone();
                        async move { c.ledger.open_account(open).await.map(|_| ()) }
                    })
                    .await
            }
        }
    }

    async fn fund(&self, fund: pb::DepositRequest) -> Result<(), tonic::Status> {
        match self {
            Books::Direct(clients) => clients.ledger.clone().deposit(fund).await.map(|_| ()),
            Books::Routed(router) => {
                let partition = router.partition_of(&format!("ledger/{}", fund.book));
                router
                    .on_leader_idempotent(partition, |mut c| {
                        let fund = fund.clone();
                        async move { c.ledger.deposit(fund).await.map(|_| ()) }
                    })
                    .await
            }
        }
    }
}

/// Opens and funds every account of the `ledger` workload, 64 commands in flight. Command ids
/// make it idempotent, so a node benchmarked before keeps its books, and a cluster's router
/// resends a command whose outcome a lost leadership left unknown.
async fn open_ledger_books(books: &Books) -> anyhow::Result<()> {
    use futures_util::StreamExt;
    eprintln!("bench: opening {LEDGER_BOOKS} books of {LEDGER_ACCOUNTS} accounts");
    let accounts = (0..LEDGER_BOOKS).flat_map(|b| (0..LEDGER_ACCOUNTS).map(move |a| (format!("bench-{b}"), format!("acct-{a}"))));
    let results: Vec<anyhow::Result<()>> = futures_util::stream::iter(accounts)
        .map(|(book, account)| async move {
            let open = pb::OpenAccountRequest {
                book: book.clone(),
                command_id: format!("open-{account}"),
                account: account.clone(),
                currency: "EUR".into(),
                credit_limit: 0,
            };
            books.open(open).await.map_err(client::status_error)?;
            let fund = pb::DepositRequest { book, command_id: format!("fund-{account}"), account, amount: LEDGER_FUNDING };
            books.fund(fund).await.map_err(client::status_error)?;
            Ok(())
        })
        .buffer_unordered(64)
        .collect()
        .await;
    results.into_iter().collect::<anyhow::Result<Vec<()>>>().context("opening the ledger workload's accounts")?;
    Ok(())
}

/// A transfer between two random accounts of a random book of the `ledger` workload.
fn random_transfer() -> pb::TransferRequest {
    let mut rng = rand::rng();
    let from = rng.random_range(0..LEDGER_ACCOUNTS);
    let to = (from + rng.random_range(1..LEDGER_ACCOUNTS)) % LEDGER_ACCOUNTS;
    pb::TransferRequest {
        book: format!("bench-{}", rng.random_range(0..LEDGER_BOOKS)),
        command_id: String::new(),
        from: format!("acct-{from}"),
        to: format!("acct-{to}"),
        amount: rng.random_range(1..=100),
        transfer: String::new(),
    }
}

/// Random 4 KiB pages written per sync by the `disk` workload: about what a group commit of
/// twenty single-event appends writes (docs/benchmarks.md).
pub const DISK_PROBE_PAGES: u64 = 48;
const DISK_PROBE_FILE_BYTES: u64 = 256 << 20;

/// The probe's file in `dir`, written in full (not just sized) so the probe measures overwrites, as
/// LMDB's reused pages are.
fn prepare_disk_probe(dir: &std::path::Path) -> anyhow::Result<tempfile::NamedTempFile> {
    use std::os::unix::fs::FileExt;
    let file = tempfile::Builder::new().prefix("anthill-bench-disk-").tempfile_in(dir)?;
    let chunk = vec![0u8; 1 << 20];
    for offset in (0..DISK_PROBE_FILE_BYTES).step_by(chunk.len()) {
        file.as_file().write_all_at(&chunk, offset)?;
    }
    file.as_file().sync_all()?;
    Ok(file)
}

/// Writes [`DISK_PROBE_PAGES`] random pages of the probe file and syncs, until time is up; each
/// sync is one request and one "event".
fn probe_disk(file: &tempfile::NamedTempFile, seconds: f64, progress: &Progress, histogram: &Mutex<Histogram<u64>>) -> anyhow::Result<()> {
    use std::os::unix::fs::FileExt;
    let page = vec![0xA5u8; 4096];
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let mut rng = rand::rng();
    let mut local = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    while Instant::now() < deadline {
        let start = Instant::now();
        for _ in 0..DISK_PROBE_PAGES {
            let offset = rng.random_range(0..DISK_PROBE_FILE_BYTES / 4096) * 4096;
            file.as_file().write_all_at(&page, offset)?;
        }
        file.as_file().sync_data()?;
        let _ = local.record(start.elapsed().as_micros().max(1) as u64);
        progress.requests.fetch_add(1, Ordering::Relaxed);
        progress.events.fetch_add(1, Ordering::Relaxed);
    }
    histogram.lock().add(&local)?;
    Ok(())
}

/// One thread of the `seal` workload: `batch` events of `size` bytes sealed as the API seals a
/// client's (payload and metadata, stream and type bound to them), until `deadline`.
fn seal_loop(
    key: &crate::security::keys::DataKey,
    size: usize,
    batch: usize,
    deadline: Instant,
    budget: &AtomicU64,
    progress: &Progress,
    histogram: &Mutex<Histogram<u64>>,
) -> anyhow::Result<()> {
    let payload = vec![b'x'; size];
    let mut local = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    while Instant::now() < deadline && take_one(budget) {
        let start = Instant::now();
        for _ in 0..batch {
            let mut event =
                NewEvent { event_type: "BenchEvent".into(), payload: payload.clone(), metadata: vec![("trace".into(), "t-1".into())] };
            key.seal_event("bench/stream", &mut event);
            std::hint::black_box(&event);
        }
        let _ = local.record(start.elapsed().as_micros().max(1) as u64);
        progress.requests.fetch_add(1, Ordering::Relaxed);
        progress.events.fetch_add(batch as u64, Ordering::Relaxed);
    }
    histogram.lock().add(&local)?;
    Ok(())
}

fn take_one(budget: &AtomicU64) -> bool {
    budget.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1)).is_ok()
}

/// Reads every partition front to back with ReadPartition, over and over, until time is up.
async fn read_all(
    args: &BenchArgs,
    pool: &[Clients],
    progress: &Arc<Progress>,
    histogram: &Arc<Mutex<Histogram<u64>>>,
) -> anyhow::Result<()> {
    let mut node = pool[0].node.clone();
    let status = node.status(pb::StatusRequest {}).await.map_err(client::status_error)?.into_inner();
    if status.total_events == 0 {
        bail!("read: the node holds no events; run an append workload first (or use --suite)");
    }
    let partitions: Vec<u32> = status.partitions.iter().filter(|p| p.head_position > 0).map(|p| p.partition).collect();
    let deadline = Instant::now() + Duration::from_secs_f64(args.seconds);
    let mut tasks = Vec::new();
    for worker in 0..args.concurrency {
        let mut clients = pool[worker % pool.len()].clone();
        let mine: Vec<u32> = partitions.iter().copied().skip(worker).step_by(args.concurrency).collect();
        let (progress, histogram, batch) = (progress.clone(), histogram.clone(), args.batch as u32);
        tasks.push(tokio::spawn(async move {
            let mut local = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
            'outer: while !mine.is_empty() {
                for &partition in &mine {
                    let mut from = 1;
                    loop {
                        if Instant::now() >= deadline {
                            break 'outer;
                        }
                        let start = Instant::now();
                        let request = pb::ReadPartitionRequest { partition, from_position: from, max_count: batch, linearizable: false };
                        match clients.log.read_partition(request).await {
                            Ok(r) => {
                                let r = r.into_inner();
                                let _ = local.record(start.elapsed().as_micros().max(1) as u64);
                                progress.requests.fetch_add(1, Ordering::Relaxed);
                                progress.events.fetch_add(r.events.len() as u64, Ordering::Relaxed);
                                from = r.next;
                                if r.end_of_stream || r.events.is_empty() {
                                    break;
                                }
                            }
                            Err(_) => {
                                progress.errors.fetch_add(1, Ordering::Relaxed);
                                break;
                            }
                        }
                    }
                }
            }
            histogram.lock().add(&local).expect("same bounds");
        }));
    }
    for task in tasks {
        task.await.context("read client failed")?;
    }
    Ok(())
}

async fn report_progress(progress: Arc<Progress>, name: String) {
    let started = Instant::now();
    let mut last = (0u64, Instant::now());
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    while !progress.stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let events = progress.events.load(Ordering::Relaxed);
        let rate = (events - last.0) as f64 / last.1.elapsed().as_secs_f64();
        last = (events, Instant::now());
        eprintln!(
            "bench: {name}: {:>5.1} s  {:>12} events  {:>10.0} events/s  {} errors",
            started.elapsed().as_secs_f64(),
            events,
            rate,
            progress.errors.load(Ordering::Relaxed)
        );
    }
}

/// The report as a table for people.
pub fn table(results: &[BenchResult]) -> String {
    let mut out = format!(
        "{:<36} {:>4} {:>5} {:>12} {:>10} {:>8} {:>8} {:>8} {:>8} {:>8} {:>7} {:>9}\n",
        "benchmark", "conc", "batch", "events/s", "req/s", "p50 µs", "p90 µs", "p99 µs", "p99.9", "max µs", "vs raw", "disk B/ev"
    );
    for r in results {
        out.push_str(&format!(
            "{:<36} {:>4} {:>5} {:>12.0} {:>10.0} {:>8} {:>8} {:>8} {:>8} {:>8} {:>7} {:>9}\n",
            r.name,
            r.concurrency,
            r.batch,
            r.events_per_sec,
            r.requests_per_sec,
            r.latency_us.p50,
            r.latency_us.p90,
            r.latency_us.p99,
            r.latency_us.p999,
            r.latency_us.max,
            r.ratio_to_baseline.map_or("-".into(), |x| format!("{x:.2}")),
            r.disk_write_bytes_per_event.map_or("-".into(), |b| format!("{b:.0}")),
        ));
        if r.errors > 0 {
            out.push_str(&format!("{:<36} {} errors\n", "", r.errors));
        }
    }
    out
}

/// What the figures were measured on.
fn machine() -> serde_json::Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string()))
        .unwrap_or_default();
    serde_json::json!({
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu_model": cpu,
        "anthill_version": env!("CARGO_PKG_VERSION"),
    })
}
