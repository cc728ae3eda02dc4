//! One chaos run on real processes: a [`LocalCluster`] of `anthill node`s on 127.0.0.x, clients
//! appending with `quorum` acknowledgements (each append's payload names its operation), and a
//! nemesis that, now and then, SIGKILLs the node leading a partition and starts it again a
//! second later, or (one time in three) freezes it with SIGSTOP for 1.5–3 session TTLs and
//! thaws it with SIGCONT: it wakes up believing it leads, and fencing must hold it off. When the run ends the nemesis stops, every node is up again, the clients stop, and
//! every replica of every partition is read back for the checker ([`super::history`]).
//!
//! Not yet (issue 6): network partitions, ledger transfers, rolling restarts, the picture, and
//! `tests/e2e`.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anthill_proto::v1 as pb;
use anyhow::Context;
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::history::{self, Outcome, Record, Stored, Verdict};
use crate::bench::{serving_node, wait_whole};
use crate::local::{ClusterSpec, LocalCluster};
use crate::router::Router;
use crate::{client, log};

/// What a run does.
#[derive(Debug, Clone)]
pub struct ChaosSpec {
    pub cluster: ClusterSpec,
    pub duration: Duration,
    /// How often the nemesis kills a partition's leader.
    pub kill_every: Duration,
    pub seed: u64,
    /// Client tasks appending at once.
    pub clients: usize,
}

/// What a run found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ChaosReport {
    pub seed: u64,
    pub nodes: usize,
    pub operations: usize,
    pub acknowledged: usize,
    pub unknown: usize,
    pub kills: usize,
    pub pauses: usize,
    /// Per fault, in order: milliseconds until the partition whose leader was killed or frozen
    /// acknowledged an append again.
    pub unavailability_ms: Vec<Option<u64>>,
    pub verdict: Verdict,
}

impl ChaosReport {
    pub fn passed(&self) -> bool {
        self.verdict.ok() && self.unavailability_ms.iter().all(Option::is_some)
    }
}

/// How long one append may take before its outcome counts as unknown.
const APPEND_TIMEOUT: Duration = Duration::from_secs(5);
/// Streams the clients append to (spread over the partitions).
const STREAMS: u64 = 32;

/// Runs `spec` with the `anthill` binary `exe`, its nodes' data under `dir`.
pub async fn run(exe: &Path, dir: &Path, spec: &ChaosSpec) -> anyhow::Result<ChaosReport> {
    let mut cluster = LocalCluster::start(exe, dir, &spec.cluster)?;
    wait_whole(&cluster, &spec.cluster, Duration::from_secs(60)).await.context("the cluster never formed")?;
    let router = Arc::new(Router::connect(&cluster.urls()).await?);
    let started = Instant::now();
    let history: Arc<Mutex<Vec<Record>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let next_op = Arc::new(AtomicU64::new(1));
    let partitions = spec.cluster.partitions;
    let clients: Vec<_> = (0..spec.clients)
        .map(|_| {
            let (router, history, stop, next_op) = (router.clone(), history.clone(), stop.clone(), next_op.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let id = next_op.fetch_add(1, Ordering::Relaxed);
                    let stream = format!("chaos-{}", id % STREAMS);
                    let partition = log::partitioning::partition_of(&stream, partitions);
                    let invoked_ms = started.elapsed().as_millis() as u64;
                    let request = pb::AppendRequest {
                        durability: pb::Durability::Quorum as i32,
                        stream,
                        expected_version: None,
                        events: vec![pb::EventData {
                            r#type: "Op".into(),
                            payload: id.to_string().into_bytes(),
                            metadata: Default::default(),
                        }],
                    };
                    // Any error may follow a write (the router resends only refusals that wrote
                    // nothing): the outcome is unknown, and the read decides.
                    let outcome = match tokio::time::timeout(APPEND_TIMEOUT, router.append(request)).await {
                        Ok(Ok(_)) => Outcome::Ok,
                        _ => Outcome::Unknown,
                    };
                    let completed_ms = started.elapsed().as_millis() as u64;
                    history.lock().push(Record { id, partition, invoked_ms, completed_ms, outcome });
                    if outcome == Outcome::Unknown {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            })
        })
        .collect();
    let (faults, kills) = nemesis(&mut cluster, spec, started).await?;
    // Heal: every node up, then the clients stop once the cluster is whole again.
    wait_whole(&cluster, &spec.cluster, Duration::from_secs(60)).await.context("the cluster did not heal")?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for task in clients {
        task.await?;
    }
    let history = std::mem::take(&mut *history.lock());
    let verdict = read_back(&cluster, partitions, &history).await?;
    let unavailability_ms = history::unavailability(&history, &faults);
    Ok(ChaosReport {
        seed: spec.seed,
        nodes: spec.cluster.nodes,
        operations: history.len(),
        acknowledged: verdict.acknowledged,
        unknown: verdict.unknown_applied + verdict.unknown_absent,
        kills,
        pauses: faults.len() - kills,
        unavailability_ms,
        verdict,
    })
}

/// Every `kill_every` until the run's time is up, kills the leader of a random partition and
/// starts it again a second later, or freezes it for a while (module doc). The faults it made
/// (when, the partition), and how many were kills.
async fn nemesis(cluster: &mut LocalCluster, spec: &ChaosSpec, started: Instant) -> anyhow::Result<(Vec<(u64, Vec<u32>)>, usize)> {
    let mut rng = StdRng::seed_from_u64(spec.seed);
    let (mut faults, mut kills) = (Vec::new(), 0);
    let ttl = Duration::from_millis(spec.cluster.session_ttl_ms);
    while started.elapsed() + spec.kill_every < spec.duration {
        tokio::time::sleep(spec.kill_every).await;
        let partition = rng.random_range(0..spec.cluster.partitions);
        let freeze = rng.random_bool(1.0 / 3.0);
        let frozen_for = ttl.mul_f64(rng.random_range(1.5..3.0));
        let Some(victim) = serving_node(cluster, partition).await else { continue };
        let at = started.elapsed();
        faults.push((at.as_millis() as u64, vec![partition]));
        let name = LocalCluster::name(victim);
        if freeze {
            let node = cluster.nodes[victim].as_ref().context("the leader runs")?;
            node.freeze(true);
            eprintln!("chaos: {:.1} s: froze {name} (leader of partition {partition}) for {} ms", at.as_secs_f64(), frozen_for.as_millis());
            tokio::time::sleep(frozen_for).await;
            node.freeze(false);
        } else {
            cluster.kill9(victim)?;
            kills += 1;
            eprintln!("chaos: {:.1} s: killed {name} (leader of partition {partition})", at.as_secs_f64());
            tokio::time::sleep(Duration::from_secs(1)).await;
            cluster.start_node(victim, &spec.cluster.node_args)?;
        }
    }
    Ok((faults, kills))
}

/// Reads every replica of every partition back and checks the history against them; a replica
/// still catching up is read again (for up to 20 s) before anything counts as missing.
async fn read_back(cluster: &LocalCluster, partitions: u32, history: &[Record]) -> anyhow::Result<Verdict> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let stored = stored(cluster, partitions).await?;
        let verdict = history::check(history, &stored);
        if verdict.missing_on_a_replica.is_empty() || Instant::now() > deadline {
            return Ok(verdict);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// What each replica of each partition stores, by its replica set in a node's view.
async fn stored(cluster: &LocalCluster, partitions: u32) -> anyhow::Result<Vec<Stored>> {
    let mut c = client::connect(&cluster.url(0)).await?;
    let status = c.node.status(pb::StatusRequest {}).await.map_err(client::status_error)?.into_inner();
    let view = status.cluster.context("node-1 reports no cluster")?;
    let mut out = Vec::new();
    for p in 0..partitions {
        let ownership = view.partitions.iter().find(|o| o.partition == p).with_context(|| format!("no placement of partition {p}"))?;
        for name in &ownership.replicas {
            let i = LocalCluster::index_of(name).with_context(|| format!("unknown member {name}"))?;
            let mut node = client::connect(&cluster.url(i)).await?;
            let mut events = Vec::new();
            let mut from = 1;
            loop {
                let request = pb::ReadPartitionRequest { partition: p, from_position: from, max_count: 1_000, linearizable: false };
                let batch = node.log.read_partition(request).await.map_err(client::status_error)?.into_inner().events;
                let Some(last) = batch.last().map(|e| e.position) else { break };
                // Only the clients' appends name an operation (markers and probes do not).
                events.extend(
                    batch
                        .iter()
                        .filter(|e| e.r#type == "Op")
                        .filter_map(|e| Some((e.position, String::from_utf8_lossy(&e.payload).parse().ok()?))),
                );
                from = last + 1;
            }
            out.push(Stored { node: name.clone(), partition: p, events });
        }
    }
    Ok(out)
}
