//! A node's part in its cluster: it opens its member of the embedded coordination store (the
//! Raft log under `data_dir/coordination`), talks to the other members over gRPC, and runs the
//! ownership algorithm in a loop, publishing the cluster as it sees it.

use std::sync::Arc;
use std::time::Duration;

use anthill_proto::v1 as pb;
use anyhow::Context;
use tokio::sync::{mpsc, watch};

use super::driver::EmbeddedStore;
use super::election::{ClusterView, Elector, ElectorConfig};
use super::embedded::{Elections, RaftKv};
use super::raft_log::RaftLog;
use super::transport::{ClusterService, GrpcTransport, QUEUE_MESSAGES, until_stopped};
use crate::config::{MemberConfig, NodeConfig};

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
pub async fn start(config: &NodeConfig, stopped: watch::Receiver<bool>) -> anyhow::Result<Option<(ClusterHandle, ClusterService)>> {
    let Some(me) = config.me().cloned() else { return Ok(None) };
    let members: Vec<u64> = config.cluster.members.iter().map(|m| m.id).collect();
    let dir = config.data_dir.join("coordination");
    let log = tokio::task::spawn_blocking(move || RaftLog::open(&dir, &members))
        .await?
        .context("cannot open the coordination store's Raft log")?;
    let node = RaftKv::open(me.id, log, rand::random(), Elections::Randomized)?;
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
    tokio::spawn(run_elector(Elector::new(Arc::new(store.clone()), elector_config), view_tx, config.cluster.session_ttl(), stopped));
    let handle = ClusterHandle { store, view, members: config.cluster.members.clone() };
    Ok(Some((handle, ClusterService::new(inbox_tx))))
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
