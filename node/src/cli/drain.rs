//! `anthill drain`: makes a node hand every partition it leads over to another replica (or, with
//! `--undo`, lead again), then follows until it leads nothing and every partition it replicates
//! has a full replica set in sync under another leader: then the node can be stopped without a
//! partition losing its quorum. Shows progress; `--json` for the report.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anthill_proto::v1 as pb;
use anyhow::bail;
use clap::Args;
use serde_json::json;

use super::ServerArg;
use crate::client::{self, Dial};

#[derive(Args)]
pub(crate) struct DrainArgs {
    /// The node to drain: the request goes to this address.
    #[command(flatten)]
    server: ServerArg,
    /// The node's member name (`cluster.members[].name`); the node refuses the request when it
    /// is another one (a guard against a stale address).
    #[arg(long)]
    node: Option<String>,
    /// Lead again.
    #[arg(long)]
    undo: bool,
    /// Return once the request is taken, without following the handovers.
    #[arg(long)]
    no_wait: bool,
    /// A follower more than this many events behind its leader is not in sync.
    #[arg(long, default_value_t = 2048)]
    max_lag: u64,
    /// Give up following after this many seconds (the node goes on draining).
    #[arg(long, default_value_t = 120)]
    timeout_s: u64,
    #[arg(long)]
    json: bool,
}

/// Where a drain stands: the partitions the node still leads, and each partition it replicates
/// whose replica set is not yet whole and in sync under another leader, with the reason.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct DrainProgress {
    /// Whether the cluster sees the node draining (its mark is in the coordination store).
    pub draining: bool,
    pub leading: Vec<u32>,
    pub not_in_sync: BTreeMap<u32, String>,
}

impl DrainProgress {
    pub fn done(&self) -> bool {
        self.draining && self.leading.is_empty() && self.not_in_sync.is_empty()
    }
}

/// The drain's progress from the drained node's `status` and the statuses of the partitions'
/// leaders (`leaders`, by member name; a leader missing there did not answer).
pub fn progress(status: &pb::StatusResponse, leaders: &BTreeMap<String, pb::StatusResponse>, max_lag: u64) -> DrainProgress {
    let me = status.node_id.as_str();
    let leading = status.partitions.iter().filter(|p| p.epoch > 0).map(|p| p.partition).collect();
    let mut not_in_sync = BTreeMap::new();
    let Some(cluster) = &status.cluster else { return DrainProgress { draining: false, leading, not_in_sync } };
    let draining = cluster.members.iter().any(|m| m.name == me && m.draining);
    let live = |name: &str| cluster.members.iter().any(|m| m.name == name && m.live);
    for o in cluster.partitions.iter().filter(|o| o.replicas.iter().any(|r| r == me)) {
        let reason = if o.leader.is_empty() {
            Some("no leader".to_string())
        } else if o.leader == me {
            Some("led by this node".to_string())
        } else if !o.target.is_empty() {
            Some(format!("moving to {}", o.target.join(",")))
        } else if let Some(down) = o.replicas.iter().find(|r| !live(r)) {
            Some(format!("{down} is down"))
        } else if let Some(leader) = leaders.get(&o.leader) {
            // The leader's own word, in the epoch the cluster grants it.
            match leader.partitions.iter().find(|p| p.partition == o.partition && p.epoch == o.epoch && p.epoch > 0) {
                None => Some(format!("{} does not lead it in epoch {} yet", o.leader, o.epoch)),
                Some(part) => o.replicas.iter().filter(|r| **r != o.leader).find_map(|r| {
                    match part.followers.iter().find(|f| f.node == *r) {
                        // Nothing matched: it has not answered in this epoch (a lag alone looks
                        // small on a short log).
                        None => Some(format!("{r} has not answered {}", o.leader)),
                        Some(f) if f.matched_position == 0 => Some(format!("{r} has not answered {}", o.leader)),
                        Some(f) if f.lag > max_lag => Some(format!("{r} is {} events behind", f.lag)),
                        Some(_) => None,
                    }
                }),
            }
        } else {
            Some(format!("{} did not answer", o.leader))
        };
        if let Some(reason) = reason {
            not_in_sync.insert(o.partition, reason);
        }
    }
    DrainProgress { draining, leading, not_in_sync }
}

/// The statuses of the leaders of the partitions `status` names, by member name.
pub async fn leader_statuses(status: &pb::StatusResponse, dial: Dial<'_>) -> BTreeMap<String, pb::StatusResponse> {
    let mut out = BTreeMap::new();
    let Some(cluster) = &status.cluster else { return out };
    let mut leaders: Vec<&str> = cluster.partitions.iter().map(|p| p.leader.as_str()).filter(|l| !l.is_empty()).collect();
    leaders.sort_unstable();
    leaders.dedup();
    for leader in leaders {
        let Some(member) = cluster.members.iter().find(|m| m.name == leader) else { continue };
        let asked = async {
            let mut c = dial.connect(&member.address).await.ok()?;
            c.node.status(pb::StatusRequest {}).await.ok().map(|r| r.into_inner())
        };
        if let Ok(Some(answer)) = tokio::time::timeout(Duration::from_secs(3), asked).await {
            out.insert(leader.to_string(), answer);
        }
    }
    out
}

/// How long a call of [`request`] or [`check`] may take: a node that hangs must not hang its
/// caller (the operator's reconcile).
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Asks the node at `server`, which must be member `node`, to drain (or, with `undo`, to lead
/// again).
pub async fn request(server: &str, node: &str, undo: bool, dial: Dial<'_>) -> anyhow::Result<()> {
    let asked = async {
        let mut clients = dial.connect(server).await?;
        clients.node.drain(pb::DrainRequest { node: node.into(), undo }).await.map_err(client::status_error)?;
        anyhow::Ok(())
    };
    tokio::time::timeout(CALL_TIMEOUT, asked).await.map_err(|_| anyhow::anyhow!("{server} did not answer within {CALL_TIMEOUT:?}"))?
}

/// Where the drain of the node at `server` stands, from its status and its partitions' leaders'.
pub async fn check(server: &str, max_lag: u64, dial: Dial<'_>) -> anyhow::Result<DrainProgress> {
    let asked = async {
        let mut clients = dial.connect(server).await?;
        let status = clients.node.status(pb::StatusRequest {}).await.map_err(client::status_error)?.into_inner();
        anyhow::Ok(progress(&status, &leader_statuses(&status, dial).await, max_lag))
    };
    tokio::time::timeout(CALL_TIMEOUT, asked).await.map_err(|_| anyhow::anyhow!("{server} did not answer within {CALL_TIMEOUT:?}"))?
}

pub(crate) async fn run(args: DrainArgs) -> anyhow::Result<()> {
    let mut clients = client::connect(&args.server.server).await?;
    let request = pb::DrainRequest { node: args.node.clone().unwrap_or_default(), undo: args.undo };
    let answer = clients.node.drain(request).await.map_err(client::status_error)?.into_inner();
    let (node, at_start) = (answer.node, answer.leading);
    let started = Instant::now();
    if !args.json {
        let what = if args.undo { "leads again" } else { "draining" };
        eprintln!("{node}: {what}; it leads {} partitions now", at_start.len());
    }
    let mut state = DrainProgress::default();
    let mut done = args.no_wait || args.undo;
    while !done {
        let status = clients.node.status(pb::StatusRequest {}).await.map_err(client::status_error)?.into_inner();
        state = progress(&status, &leader_statuses(&status, Dial::Process).await, args.max_lag);
        done = state.done();
        if !args.json {
            let first = state.not_in_sync.iter().next().map(|(p, why)| format!(" (partition {p}: {why})")).unwrap_or_default();
            let not_yet = if state.draining { "" } else { ", not draining yet" };
            eprintln!(
                "  {:>6.1} s: leads {}, {} partitions not in sync{first}{not_yet}",
                started.elapsed().as_secs_f64(),
                state.leading.len(),
                state.not_in_sync.len()
            );
        }
        if done {
            break;
        }
        if started.elapsed() > Duration::from_secs(args.timeout_s) {
            bail!(
                "{node} still leads {:?} and {} partitions are not in sync after {} s (it goes on draining): {:?}",
                state.leading,
                state.not_in_sync.len(),
                args.timeout_s,
                state.not_in_sync
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    if args.json {
        let not_in_sync: Vec<_> = state.not_in_sync.iter().map(|(p, why)| json!({"partition": p, "reason": why})).collect();
        let report = json!({
            "node": node, "undo": args.undo, "waited": !(args.no_wait || args.undo), "seconds": seconds,
            "leading_at_start": at_start, "leading": state.leading, "not_in_sync": not_in_sync,
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else if args.undo {
        println!("{node}: leads again; leaderships come back to it as they are handed back");
    } else if args.no_wait {
        println!("{node}: draining; `anthill status` shows the partitions it still leads");
    } else {
        println!("{node}: leads nothing and every partition it replicates is in sync elsewhere ({seconds:.1} s); it can be stopped");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(name: &str, live: bool) -> pb::ClusterMember {
        pb::ClusterMember { name: name.into(), address: format!("{name}:7400"), live, draining: name == "a", ..Default::default() }
    }

    fn owned(partition: u32, leader: &str) -> pb::PartitionOwnership {
        let replicas = vec!["a".to_string(), "b".to_string(), "c".to_string()];
        pb::PartitionOwnership { partition, replicas, leader: leader.into(), epoch: 3, target: Vec::new() }
    }

    fn led(partition: u32, lags: &[(&str, u64)]) -> pb::PartitionStatus {
        let followers =
            lags.iter().map(|(n, lag)| pb::FollowerProgress { node: (*n).into(), matched_position: 5_000 - lag, lag: *lag }).collect();
        pb::PartitionStatus { partition, epoch: 3, followers, ..Default::default() }
    }

    fn drained(leads: &[u32], partitions: Vec<pb::PartitionOwnership>, live_c: bool) -> pb::StatusResponse {
        pb::StatusResponse {
            node_id: "a".into(),
            partitions: leads.iter().map(|p| pb::PartitionStatus { partition: *p, epoch: 2, ..Default::default() }).collect(),
            cluster: Some(pb::ClusterStatus {
                members: vec![member("a", true), member("b", true), member("c", live_c)],
                partitions,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn given_a_node_leading_nothing_with_every_set_whole_and_in_sync_then_the_drain_is_done() {
        let status = drained(&[], vec![owned(0, "b"), owned(1, "c")], true);
        let leaders = BTreeMap::from([
            ("b".to_string(), pb::StatusResponse { partitions: vec![led(0, &[("a", 0), ("c", 10)])], ..Default::default() }),
            ("c".to_string(), pb::StatusResponse { partitions: vec![led(1, &[("a", 5), ("b", 2048)])], ..Default::default() }),
        ]);
        let state = progress(&status, &leaders, 2048);
        assert_eq!(state, DrainProgress { draining: true, ..DrainProgress::default() });
        assert!(state.done());
        // Not done until the cluster sees the node draining.
        let mut undrained = status.clone();
        undrained.cluster.as_mut().unwrap().members[0].draining = false;
        assert!(!progress(&undrained, &leaders, 2048).done());
    }

    #[test]
    fn given_what_keeps_a_drain_going_then_each_is_named() {
        let leaders = BTreeMap::from([(
            "b".to_string(),
            pb::StatusResponse { partitions: vec![led(0, &[("a", 0), ("c", 2049)]), led(2, &[("a", 0)])], ..Default::default() },
        )]);
        let mut moving = owned(5, "b");
        moving.target = vec!["b".into(), "c".into(), "d".into()];
        let mut stale = owned(6, "b");
        stale.epoch = 4;
        let partitions = vec![owned(0, "b"), owned(1, "a"), owned(2, "b"), owned(3, ""), owned(4, "c"), moving, stale];
        let status = drained(&[1], partitions, true);
        let state = progress(&status, &leaders, 2048);
        assert_eq!(state.leading, vec![1]);
        assert_eq!(state.not_in_sync[&0], "c is 2049 events behind");
        assert_eq!(state.not_in_sync[&1], "led by this node");
        assert_eq!(state.not_in_sync[&2], "c has not answered b");
        assert_eq!(state.not_in_sync[&3], "no leader");
        assert_eq!(state.not_in_sync[&4], "c did not answer");
        assert_eq!(state.not_in_sync[&5], "moving to b,c,d");
        assert_eq!(state.not_in_sync[&6], "b does not lead it in epoch 4 yet");
        assert!(!state.done());
        let down = progress(&drained(&[], vec![owned(0, "b")], false), &leaders, 2048);
        assert_eq!(down.not_in_sync[&0], "c is down");
    }
}
