//! The nemesis: the faults a chaos run injects into a [`LocalCluster`] under load, one after
//! another with a pause between them, in an order drawn from the run's seed.
//!
//! The kinds ([`FaultKind`]), each healed before the next one starts:
//! - `kill-leader`: SIGKILL the node leading a random partition; start it again after 1 s;
//! - `kill-node`: the same for a random node, leader or not;
//! - `pause`: SIGSTOP the leader of a random partition for 1.5–3 session TTLs, then SIGCONT: it
//!   wakes believing it leads, and fencing must hold it off;
//! - `isolate`: cut the leader of a random partition off from every other node, both ways, for
//!   2–4 TTLs (clients still reach it: its writes must fail or wait, never be acknowledged);
//! - `one-way`: the leader of a random partition hears nothing from the other nodes but still
//!   sends to them, for 2–4 TTLs;
//! - `split`: a random minority of the nodes (⌊n/2⌋) cut off from the rest, for 2–4 TTLs;
//! - `rolling-restart`: every node in turn, the one leading most partitions last, stopped with
//!   SIGTERM (it drains first, handing each leadership over once a majority holds the leader's
//!   whole log, then resigns its session; `cluster.drain_on_stop_ms`),
//!   started again, and the next one only once every partition takes writes again: the
//!   zero-downtime upgrade path. Each node's restart is recorded as a fault of its own;
//! - `kill-consul` (only with Consul as the coordination store): SIGKILL a random Consul server
//!   and start it again after 1 s. The nodes that talk to it (as to their host's agent) cannot
//!   renew their sessions meanwhile; if it led, the others elect a new Consul leader.
//!
//! With Consul, the run starts one Consul server per node, and node `k` talks to server `k`, on
//! its own host: the network faults cut a node's Consul server off with it, so a node cut off
//! from its peers is cut off from Consul's majority too (as its agent would be), and its session
//! lapses as it would in the embedded store's group.
//! The schedule goes in cycles: each cycle has five `kill-leader`s and one of every other kind
//! chosen, shuffled. Each fault records the partitions whose leader it hit; the run measures how
//! long writes to those partitions were unavailable.

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use anthill_proto::v1 as pb;
use anyhow::Context;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::net::Cuts;
use crate::client;
use crate::local::consul::LocalConsul;
use crate::local::{ClusterSpec, LocalCluster};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    KillLeader,
    KillNode,
    Pause,
    Isolate,
    OneWay,
    Split,
    RollingRestart,
    KillConsul,
}

impl FaultKind {
    pub const ALL: [FaultKind; 8] = [
        FaultKind::KillLeader,
        FaultKind::KillNode,
        FaultKind::Pause,
        FaultKind::Isolate,
        FaultKind::OneWay,
        FaultKind::Split,
        FaultKind::RollingRestart,
        FaultKind::KillConsul,
    ];

    /// Whether the fault needs Consul as the coordination store.
    pub fn needs_consul(self) -> bool {
        self == FaultKind::KillConsul
    }

    /// The flag's spelling, e.g. `kill-leader`.
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::KillLeader => "kill-leader",
            FaultKind::KillNode => "kill-node",
            FaultKind::Pause => "pause",
            FaultKind::Isolate => "isolate",
            FaultKind::OneWay => "one-way",
            FaultKind::Split => "split",
            FaultKind::RollingRestart => "rolling-restart",
            FaultKind::KillConsul => "kill-consul",
        }
    }

    /// Whether the fault cuts the network (and needs [`Cuts`]).
    pub fn cuts_network(self) -> bool {
        matches!(self, FaultKind::Isolate | FaultKind::OneWay | FaultKind::Split)
    }
}

/// One fault as it happened.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Fault {
    pub kind: FaultKind,
    /// What it hit, e.g. `node-2 (leads 0, 3)`.
    pub target: String,
    /// When it began and when it was healed (the node started again and serving, thawed, the
    /// network whole), in milliseconds since the run began.
    pub at_ms: u64,
    pub healed_ms: u64,
    /// The partitions the hit nodes led just before: the ones whose writes it interrupts.
    pub partitions: Vec<u32>,
}

/// The order of the faults: cycles of five `kill-leader`s and one of each other kind in
/// `kinds`, each cycle shuffled by `rng`.
pub fn schedule(kinds: &[FaultKind], count: usize, rng: &mut StdRng) -> Vec<FaultKind> {
    let mut cycle: Vec<FaultKind> = Vec::new();
    for kind in FaultKind::ALL.into_iter().filter(|k| kinds.contains(k)) {
        let times = if kind == FaultKind::KillLeader { 5 } else { 1 };
        cycle.extend(std::iter::repeat_n(kind, times));
    }
    let mut out = Vec::with_capacity(count);
    while out.len() < count && !cycle.is_empty() {
        cycle.shuffle(rng);
        out.extend(cycle.iter().copied().take(count - out.len()));
    }
    out
}

/// Injects faults into a cluster (module doc).
pub struct Nemesis<'a> {
    cluster: &'a mut LocalCluster,
    /// The Consul cluster the nodes decide ownership in, if not the embedded store.
    consul: Option<&'a mut LocalConsul>,
    spec: ClusterSpec,
    cuts: Option<Cuts>,
    rng: StdRng,
    started: Instant,
    pub faults: Vec<Fault>,
}

impl<'a> Nemesis<'a> {
    /// `cuts` must be installed when any network fault is scheduled, `consul` given when the
    /// nodes use it.
    pub fn new(
        cluster: &'a mut LocalCluster,
        consul: Option<&'a mut LocalConsul>,
        spec: &ClusterSpec,
        cuts: Option<Cuts>,
        seed: u64,
        started: Instant,
    ) -> Self {
        Nemesis { cluster, consul, spec: spec.clone(), cuts, rng: StdRng::seed_from_u64(seed), started, faults: Vec::new() }
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn ttl(&self) -> Duration {
        Duration::from_millis(self.spec.session_ttl_ms)
    }

    /// Injects one fault of `kind` and heals it. A node that exited on its own (a crash) fails
    /// the run here rather than being restarted unnoticed.
    pub async fn inject(&mut self, kind: FaultKind) -> anyhow::Result<()> {
        self.cluster.check_running()?;
        match kind {
            FaultKind::KillLeader => {
                let Some((partition, victim)) = self.leader_of_random_partition().await else { return Ok(()) };
                self.kill_and_restart(kind, victim, Some(partition)).await
            }
            FaultKind::KillNode => {
                let victim = self.rng.random_range(0..self.cluster.nodes.len());
                self.kill_and_restart(kind, victim, None).await
            }
            FaultKind::Pause => {
                let Some((partition, victim)) = self.leader_of_random_partition().await else { return Ok(()) };
                let paused_for = self.ttl().mul_f64(self.rng.random_range(1.5..3.0));
                let partitions = led_by(self.cluster, victim, Some(partition)).await;
                let at_ms = self.now_ms();
                let node = self.cluster.nodes[victim].as_ref().context("the leader runs")?;
                node.freeze(true);
                tokio::time::sleep(paused_for).await;
                node.freeze(false);
                self.record(kind, format!("{} for {} ms", describe(victim, &partitions), paused_for.as_millis()), at_ms, partitions);
                Ok(())
            }
            FaultKind::Isolate | FaultKind::OneWay | FaultKind::Split => self.cut(kind).await,
            FaultKind::RollingRestart => self.rolling_restart().await,
            FaultKind::KillConsul => self.kill_consul().await,
        }
    }

    /// SIGKILL a random Consul server, start it again 1 s later (module doc).
    async fn kill_consul(&mut self) -> anyhow::Result<()> {
        let servers = self.consul.as_ref().context("kill-consul needs Consul as the coordination store")?.len();
        let victim = self.rng.random_range(0..servers);
        let talkers: Vec<usize> = (0..self.cluster.nodes.len()).filter(|i| i % servers == victim).collect();
        let mut partitions = Vec::new();
        for &i in &talkers {
            partitions.extend(led_by(self.cluster, i, None).await);
        }
        partitions.sort_unstable();
        let at_ms = self.now_ms();
        let consul = self.consul.as_mut().context("kill-consul needs Consul as the coordination store")?;
        // Blocking calls (an HTTP request, a wait for the process), on this runtime thread: the
        // restarted server dies with the thread that starts it, so not a blocking-pool one.
        let led = tokio::task::block_in_place(|| {
            let led = consul.leader_seen_by(victim) == Some(victim);
            consul.kill(victim);
            led
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        let consul = self.consul.as_mut().context("kill-consul needs Consul as the coordination store")?;
        tokio::task::block_in_place(|| consul.start_server(victim))?;
        let names: Vec<String> = talkers.iter().map(|i| LocalCluster::name(*i)).collect();
        let target = format!(
            "consul-{}{} (talked to by {}, leading {})",
            victim + 1,
            if led { ", Consul's leader" } else { "" },
            names.join(", "),
            list(&partitions)
        );
        self.record(FaultKind::KillConsul, target, at_ms, partitions);
        Ok(())
    }

    /// A random partition and the node leading it; asked again while none does (right after a
    /// heal a partition may still be electing), for up to 10 s or three TTLs (Consul frees a
    /// dead holder's lock only twice its TTL after the last renewal).
    async fn leader_of_random_partition(&mut self) -> Option<(u32, usize)> {
        let partition = self.rng.random_range(0..self.spec.partitions);
        let deadline = Instant::now() + Duration::from_secs(10).max(self.ttl() * 3);
        loop {
            let leader = self.cluster.serving_node(partition).await;
            if leader.is_some() || Instant::now() > deadline {
                return leader.map(|node| (partition, node));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn kill_and_restart(&mut self, kind: FaultKind, victim: usize, leads: Option<u32>) -> anyhow::Result<()> {
        let partitions = led_by(self.cluster, victim, leads).await;
        let at_ms = self.now_ms();
        self.cluster.kill9(victim)?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        self.cluster.start_node(victim, &self.spec.node_args)?;
        self.record(kind, describe(victim, &partitions), at_ms, partitions);
        Ok(())
    }

    async fn cut(&mut self, kind: FaultKind) -> anyhow::Result<()> {
        let nodes = self.cluster.nodes.len();
        let (side, leads): (Vec<usize>, Option<u32>) = match kind {
            FaultKind::Split => {
                let mut all: Vec<usize> = (0..nodes).collect();
                all.shuffle(&mut self.rng);
                all.truncate(nodes / 2);
                all.sort_unstable();
                (all, None)
            }
            _ => match self.leader_of_random_partition().await {
                Some((partition, victim)) => (vec![victim], Some(partition)),
                None => return Ok(()),
            },
        };
        let rest: Vec<usize> = (0..nodes).filter(|i| !side.contains(i)).collect();
        let mut partitions = Vec::new();
        for &i in &side {
            partitions.extend(led_by(self.cluster, i, leads).await);
        }
        partitions.sort_unstable();
        partitions.dedup();
        let cut_for = self.ttl().mul_f64(self.rng.random_range(2.0..4.0));
        let (side_ips, rest_ips) = (self.ips(&side), self.ips(&rest));
        let cuts = self.cuts.as_mut().context("network faults need the run's own network namespace")?;
        match kind {
            FaultKind::OneWay => {
                for from in &rest_ips {
                    for to in &side_ips {
                        cuts.cut(*from, *to)?;
                    }
                }
            }
            _ => cuts.partition(&side_ips, &rest_ips)?,
        }
        // From when every cut is in force (each is a `tc` run of a few milliseconds).
        let at_ms = self.started.elapsed().as_millis() as u64;
        tokio::time::sleep(cut_for).await;
        cuts.heal()?;
        let names: Vec<String> = side.iter().map(|i| LocalCluster::name(*i)).collect();
        let what = match kind {
            FaultKind::OneWay => format!("{} hears nothing from the others", names[0]),
            _ => format!("{} cut off from the rest", names.join(", ")),
        };
        self.record(kind, format!("{what} for {} ms (leads {})", cut_for.as_millis(), list(&partitions)), at_ms, partitions);
        Ok(())
    }

    /// Every node in turn, the one leading most partitions last (module doc).
    async fn rolling_restart(&mut self) -> anyhow::Result<()> {
        let mut order = Vec::new();
        for i in 0..self.cluster.nodes.len() {
            order.push((led_by(self.cluster, i, None).await.len(), i));
        }
        order.sort_unstable();
        for (step, (_, i)) in order.iter().enumerate() {
            let partitions = led_by(self.cluster, *i, None).await;
            let at_ms = self.now_ms();
            // A drain (at most `cluster.drain_on_stop_ms`, 10 s) and the shutdown grace (5 s);
            // off the runtime's worker, which the clients share.
            tokio::task::block_in_place(|| self.cluster.terminate(*i, Duration::from_secs(30)))?;
            self.cluster.start_node(*i, &self.spec.node_args)?;
            self.cluster
                .wait_whole(&self.spec, Duration::from_secs(60))
                .await
                .with_context(|| format!("the cluster did not recover after {} restarted", LocalCluster::name(*i)))?;
            let target = format!("{} restarted, step {} of {}", describe(*i, &partitions), step + 1, order.len());
            self.record(FaultKind::RollingRestart, target, at_ms, partitions);
        }
        Ok(())
    }

    /// The addresses on the hosts of `nodes`: each node's, and the Consul server's on its host
    /// (module doc).
    fn ips(&self, nodes: &[usize]) -> Vec<Ipv4Addr> {
        let mut ips: Vec<Ipv4Addr> = nodes
            .iter()
            .map(|i| match self.cluster.addrs[*i].ip() {
                IpAddr::V4(ip) => ip,
                IpAddr::V6(_) => unreachable!("local clusters are on 127.0.0.x"),
            })
            .collect();
        if let Some(consul) = &self.consul {
            ips.extend(nodes.iter().filter(|i| **i < consul.len()).map(|i| consul.ip(*i)));
        }
        ips
    }

    fn record(&mut self, kind: FaultKind, target: String, at_ms: u64, partitions: Vec<u32>) {
        let healed_ms = self.now_ms();
        eprintln!("chaos: {:>7.1} s: {} {target}", at_ms as f64 / 1000.0, kind.name());
        self.faults.push(Fault { kind, target, at_ms, healed_ms, partitions });
    }

    /// Undoes whatever is still in force: the network whole, every node running and thawed.
    /// Every step is tried, whatever failed before it; the first failure is returned.
    pub fn heal(&mut self) -> anyhow::Result<()> {
        let mut first_error = None;
        if let Some(cuts) = self.cuts.as_mut()
            && let Err(e) = cuts.heal()
        {
            first_error = Some(e);
        }
        if let Some(consul) = self.consul.as_mut() {
            for i in 0..consul.len() {
                if let Err(e) = consul.start_server(i) {
                    first_error.get_or_insert(e);
                }
            }
        }
        for i in 0..self.cluster.nodes.len() {
            let healed = match &self.cluster.nodes[i] {
                Some(node) => {
                    node.freeze(false);
                    Ok(())
                }
                None => self.cluster.start_node(i, &self.spec.node_args),
            };
            if let Err(e) = healed {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// The partitions node `i` leads now, as it says, with `leads` (the partition it was found
/// leading) whether or not it says so now or answers at all.
pub async fn led_by(cluster: &LocalCluster, i: usize, leads: Option<u32>) -> Vec<u32> {
    let mut led: Vec<u32> = leads.into_iter().collect();
    if let Ok(mut c) = client::connect(&cluster.url(i)).await
        && let Ok(Ok(status)) = tokio::time::timeout(Duration::from_secs(2), c.node.status(pb::StatusRequest {})).await
    {
        led.extend(status.into_inner().partitions.iter().filter(|p| p.epoch > 0).map(|p| p.partition));
    }
    led.sort_unstable();
    led.dedup();
    led
}

fn describe(node: usize, partitions: &[u32]) -> String {
    format!("{} (leads {})", LocalCluster::name(node), list(partitions))
}

fn list(partitions: &[u32]) -> String {
    if partitions.is_empty() {
        return "nothing".into();
    }
    partitions.iter().map(u32::to_string).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_schedule_of_two_cycles_has_ten_leader_kills_and_two_of_every_other_kind() {
        let plan = schedule(&FaultKind::ALL, 24, &mut StdRng::seed_from_u64(1));
        assert_eq!(plan.len(), 24);
        for kind in FaultKind::ALL {
            let expected = if kind == FaultKind::KillLeader { 10 } else { 2 };
            assert_eq!(plan.iter().filter(|k| **k == kind).count(), expected, "{kind:?}");
        }
        // The order is the seed's.
        assert_eq!(plan, schedule(&FaultKind::ALL, 24, &mut StdRng::seed_from_u64(1)));
        assert_ne!(plan, schedule(&FaultKind::ALL, 24, &mut StdRng::seed_from_u64(2)));
    }

    #[test]
    fn a_schedule_has_only_the_kinds_asked_for() {
        let plan = schedule(&[FaultKind::Pause], 3, &mut StdRng::seed_from_u64(1));
        assert_eq!(plan, [FaultKind::Pause; 3]);
        assert!(schedule(&[], 3, &mut StdRng::seed_from_u64(1)).is_empty());
    }
}
