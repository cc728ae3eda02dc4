//! A node's part in its cluster: it opens its member of the embedded coordination store (the
//! Raft log under `data_dir/coordination`), talks to the other members over gRPC, runs the
//! ownership algorithm in a loop, publishing the cluster as it sees it, and replicates the
//! partitions placed on it (`replication/manager.rs`), leading those whose lock it holds.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anthill_proto::v1 as pb;
use anyhow::Context;
use tokio::sync::{mpsc, watch};

use super::driver::EmbeddedStore;
use super::election::{ClusterView, Elector, ElectorConfig};
use super::embedded::{Elections, RaftKv};
use super::raft_log::RaftLog;
use super::transport::{ClusterService, GrpcReplicaTransport, GrpcTransport, PartitionTasks, QUEUE_MESSAGES, until_stopped};
use crate::config::{MemberConfig, NodeConfig};
use crate::log::Log;
use crate::replication::NodeId;
use crate::replication::manager::start_partition;
use crate::replication::replica::ReplicaConfig;

/// The cluster's key prefix in the coordination store.
pub const PREFIX: &str = "anthill/";

/// A running member: the store, and the cluster as the latest round saw it.
#[derive(Clone)]
pub struct ClusterHandle {
    pub store: EmbeddedStore,
    pub view: watch::Receiver<ClusterView>,
    pub members: Vec<MemberConfig>,
}

impl ClusterHandle {
    /// `Node.Status`'s cluster part.
    pub fn status(&self) -> pb::ClusterStatus {
        let view = self.view.borrow().clone();
        let member = self.store.member_status();
        pb::ClusterStatus {
            members: self
                .members
                .iter()
                .map(|m| pb::ClusterMember {
                    name: m.name.clone(),
                    address: m.address.to_string(),
                    live: view.members.contains_key(&m.name),
                })
                .collect(),
            partitions: view
                .partitions
                .iter()
                .map(|(p, o)| pb::PartitionOwnership {
                    partition: *p,
                    replicas: o.replicas.clone(),
                    leader: o.leader.as_ref().map(|(l, _)| l.clone()).unwrap_or_default(),
                    epoch: o.leader.as_ref().map_or(0, |(_, e)| *e),
                })
                .collect(),
            coordination_leader: member.leader.unwrap_or(0),
            coordination_applied: member.applied,
        }
    }
}

/// Starts this node's member when the configuration names a cluster; returns its handle and the
/// gRPC service the other members send to. The loop ends (resigning the node's session, so its
/// locks go at once) when `stopped` turns true.
pub async fn start(
    config: &NodeConfig,
    log: Arc<Log>,
    stopped: watch::Receiver<bool>,
) -> anyhow::Result<Option<(ClusterHandle, ClusterService)>> {
    let Some(me) = config.me().cloned() else { return Ok(None) };
    let members: Vec<u64> = config.cluster.members.iter().map(|m| m.id).collect();
    let dir = config.data_dir.join("coordination");
    let raft_log = tokio::task::spawn_blocking(move || RaftLog::open(&dir, &members))
        .await?
        .context("cannot open the coordination store's Raft log")?;
    let node = RaftKv::open(me.id, raft_log, rand::random(), Elections::Randomized)?;
    let (inbox_tx, inbox) = mpsc::channel(QUEUE_MESSAGES);
    let peers: Vec<(u64, std::net::SocketAddr)> =
        config.cluster.members.iter().filter(|m| m.id != me.id).map(|m| (m.id, m.address)).collect();
    let transport = GrpcTransport::start(&peers, stopped.clone());
    let store = EmbeddedStore::start(node, inbox, Arc::new(transport));
    let elector_config = ElectorConfig {
        node: me.name.clone(),
        address: me.address.to_string(),
        partitions: config.storage.partitions,
        replication_factor: config.cluster.replication_factor,
        session_ttl: config.cluster.session_ttl(),
        prefix: PREFIX.into(),
    };
    let (view_tx, view) = watch::channel(ClusterView::default());
    tokio::spawn(run_elector(
        Elector::new(Arc::new(store.clone()), elector_config),
        view_tx,
        config.cluster.session_ttl(),
        stopped.clone(),
    ));
    // Replication: nothing is appended here until a partition serves, and `quorum` appends wait
    // for a majority.
    log.set_replicated();
    for p in 0..log.partition_count() {
        log.roles().set(p, 0);
    }
    let partitions: PartitionTasks = Arc::default();
    let replica_peers: Vec<(NodeId, std::net::SocketAddr)> =
        config.cluster.members.iter().filter(|m| m.id != me.id).map(|m| (m.id as NodeId, m.address)).collect();
    let transport = Arc::new(GrpcReplicaTransport::start(me.id as NodeId, &replica_peers, stopped.clone()));
    let ids: HashMap<String, NodeId> = config.cluster.members.iter().map(|m| (m.name.clone(), m.id as NodeId)).collect();
    let replication = Replication { log, me: me.id as NodeId, name: me.name.clone(), ids, partitions: partitions.clone(), transport };
    tokio::spawn(follow_ownership(replication, view.clone(), stopped));
    let handle = ClusterHandle { store, view, members: config.cluster.members.clone() };
    Ok(Some((handle, ClusterService::new(inbox_tx, partitions))))
}

/// What [`follow_ownership`] works with.
struct Replication {
    log: Arc<Log>,
    me: NodeId,
    name: String,
    /// Member names to their ids.
    ids: HashMap<String, NodeId>,
    partitions: PartitionTasks,
    transport: Arc<GrpcReplicaTransport>,
}

/// Replicates what the ownership view places on this node: starts a partition's replica once its
/// replica set names this node, and grants it leadership when the view shows this node holding
/// the partition's lock (the lock index is the epoch).
async fn follow_ownership(r: Replication, mut view: watch::Receiver<ClusterView>, mut stopped: watch::Receiver<bool>) {
    let Replication { log, me, name, ids, partitions, transport } = r;
    let mut granted: HashMap<u32, u64> = HashMap::new();
    loop {
        let current = view.borrow_and_update().clone();
        for (p, ownership) in &current.partitions {
            if !ownership.replicas.contains(&name) {
                continue;
            }
            if !partitions.read().contains_key(p) {
                let members: Vec<NodeId> = ownership.replicas.iter().filter_map(|r| ids.get(r).copied()).collect();
                let config = ReplicaConfig { me, members, max_batch_entries: 256, max_inflight_entries: 4096, resend_ticks: 4 };
                let handle = start_partition(log.clone(), *p, config, transport.clone());
                partitions.write().insert(*p, handle);
            }
            if let Some((leader, epoch)) = &ownership.leader
                && *leader == name
                && granted.get(p) != Some(epoch)
                && let Some(task) = partitions.read().get(p)
            {
                task.grant(*epoch);
                granted.insert(*p, *epoch);
            }
        }
        tokio::select! {
            changed = view.changed() => if changed.is_err() { return },
            _ = until_stopped(&mut stopped) => return,
        }
    }
}

/// Rounds of the ownership algorithm: at least three per session TTL (each renews the session),
/// and one after every change in the store.
async fn run_elector(
    mut elector: Elector<EmbeddedStore>,
    view: watch::Sender<ClusterView>,
    ttl: Duration,
    mut stopped: watch::Receiver<bool>,
) {
    let mut index = 0;
    loop {
        match elector.round().await {
            Ok(seen) => {
                index = seen.index;
                view.send_if_modified(|current| {
                    let changed = current.members != seen.members || current.partitions != seen.partitions;
                    *current = seen;
                    changed
                });
            }
            Err(e) => tracing::warn!(error = %e, "ownership round failed; trying again"),
        }
        tokio::select! {
            _ = elector.wait(index, ttl / 3) => {}
            _ = until_stopped(&mut stopped) => {
                if let Err(e) = elector.resign().await {
                    tracing::warn!(error = %e, "could not resign from the coordination store; the session will expire");
                }
                return;
            }
        }
    }
}
