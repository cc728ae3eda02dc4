//! A node's part in its cluster: it opens its coordination store, runs the ownership algorithm
//! against it in a loop, publishing the cluster as it sees it, and replicates the partitions
//! placed on it (`replication/manager.rs`), leading those whose lock it holds.
//!
//! The store is the one `cluster.coordination` names: its member of the embedded store (the Raft
//! log under `data_dir/coordination`, Raft messages to the other members over gRPC), or a
//! [`ConsulStore`], in which case no Raft member is opened and `Cluster.Raft` calls are refused.
//! Either way the same [`Elector`] runs, and replication between the members uses
//! `cluster.members`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anthill_proto::v1 as pb;
use anyhow::Context;
use tokio::sync::{mpsc, watch};

use super::CoordinationStore;
use super::consul::{self, ConsulStore};
use super::driver::EmbeddedStore;
use super::election::{ClusterView, DrainSwitch, Elector, ElectorConfig, Handovers};
use super::embedded::{Elections, RaftKv};
use super::lease::Lease;
use super::raft_log::RaftLog;
use super::transport::{
    ClusterService, GrpcReplicaTransport, GrpcTransport, PartitionTasks, QUEUE_MESSAGES, outgoing_address, until_stopped,
};
use crate::config::{ConsulConfig, CoordinationConfig, MemberConfig, NodeConfig};
use crate::log::Log;
use crate::replication::NodeId;
use crate::replication::manager::start_partition;
use crate::replication::replica::ReplicaConfig;
use crate::security::audit::Acceptor;
use crate::security::tls::Tls;

/// The cluster's key prefix in the embedded store (Consul's is `cluster.coordination.key_prefix`).
pub const PREFIX: &str = "anthill/";
/// The first pause after the store failed to answer a wait; it doubles up to a third of a TTL.
const RETRY_MIN: Duration = Duration::from_millis(100);

/// The coordination store a member runs against.
#[derive(Clone)]
pub enum Coordination {
    Embedded(EmbeddedStore),
    Consul(Arc<ConsulStore>),
}

impl Coordination {
    /// Writes `value` under `key`, whatever it held.
    async fn put(&self, key: &str, value: &[u8]) -> super::Result<bool> {
        match self {
            Coordination::Embedded(store) => store.put(key, value, super::Cas::Any).await,
            Coordination::Consul(store) => store.put(key, value, super::Cas::Any).await,
        }
    }

    pub(crate) async fn get(&self, key: &str) -> super::Result<Option<super::KvEntry>> {
        match self {
            Coordination::Embedded(store) => store.get(key).await,
            Coordination::Consul(store) => store.get(key).await,
        }
    }

    pub(crate) async fn put_if(&self, key: &str, value: &[u8], cas: super::Cas) -> super::Result<bool> {
        match self {
            Coordination::Embedded(store) => store.put(key, value, cas).await,
            Coordination::Consul(store) => store.put(key, value, cas).await,
        }
    }

    /// A blocking list of `prefix` for a follower of one key: unlike the elector's lists, it
    /// does not move the index `Node.Status` reports.
    pub(crate) async fn follow(&self, prefix: &str, min_index: u64, wait: Duration) -> super::Result<super::Listing> {
        match self {
            Coordination::Embedded(store) => store.list(prefix, min_index, wait).await,
            Coordination::Consul(store) => store.list_quietly(prefix, min_index, wait).await,
        }
    }

    async fn delete(&self, key: &str) -> super::Result<bool> {
        match self {
            Coordination::Embedded(store) => store.delete(key, super::Cas::Any).await,
            Coordination::Consul(store) => store.delete(key, super::Cas::Any).await,
        }
    }

    /// `Node.Status`'s `(coordination_leader, coordination_applied)`: the embedded store's Raft
    /// leader (0 when none is known) and the last entry this member applied; with Consul, 0 and
    /// the index of the last read of the cluster's prefix (every node reads the same Consul, so
    /// the router can still compare them).
    pub fn status(&self) -> (u64, u64) {
        match self {
            Coordination::Embedded(store) => {
                let member = store.member_status();
                (member.leader.unwrap_or(0), member.applied)
            }
            Coordination::Consul(store) => (0, store.last_index()),
        }
    }

    /// The embedded store's voters (empty with Consul).
    pub fn voters(&self) -> Vec<u64> {
        match self {
            Coordination::Embedded(store) => store.member_status().voters,
            Coordination::Consul(_) => Vec::new(),
        }
    }
}

/// A running member: the store, and the cluster as the latest round saw it.
#[derive(Clone)]
pub struct ClusterHandle {
    pub coordination: Coordination,
    pub view: watch::Receiver<ClusterView>,
    /// This node's member name.
    pub name: String,
    /// Turns this node's draining on and off ([`ClusterHandle::drain`]).
    pub drain_switch: DrainSwitch,
    pub members: Vec<MemberConfig>,
    /// The cluster's key prefix in the store.
    pub prefix: String,
    pub replication_factor: usize,
}

/// Why a decommission request is refused.
#[derive(Debug, thiserror::Error)]
pub enum DecommissionError {
    #[error("unknown member {node:?}: the cluster knows {known:?}")]
    Unknown { node: String, known: Vec<String> },
    #[error("decommissioning {node:?} would leave {left} members in the replica sets, fewer than the replication factor {factor}")]
    TooFew { node: String, left: usize, factor: usize },
    #[error("{node:?} is not in this node's cluster.members, so its Raft id is unknown here: ask a node that lists it")]
    NotConfigured { node: String },
    #[error(transparent)]
    Store(#[from] super::CoordinationError),
}

impl ClusterHandle {
    /// Takes `node` out of every replica set (`undo`: lets it back in) by writing (deleting) its
    /// `decommissioned/` key; each partition's leader then moves the replica. Returns the
    /// partitions whose set names the node now.
    pub async fn decommission(&self, node: &str, undo: bool) -> Result<Vec<u32>, DecommissionError> {
        let view = self.view.borrow().clone();
        if !view.known.contains(node) {
            return Err(DecommissionError::Unknown { node: node.into(), known: view.known.iter().cloned().collect() });
        }
        let key = format!("{}decommissioned/{node}", self.prefix);
        if undo {
            self.coordination.delete(&key).await?;
        } else {
            let left = view.known.iter().filter(|m| *m != node && !view.decommissioned.contains(*m)).count();
            if left < self.replication_factor {
                return Err(DecommissionError::TooFew { node: node.into(), left, factor: self.replication_factor });
            }
            // The value is the member's Raft id: the embedded store's leader takes it out of the
            // coordination group by that, whatever its own configuration lists.
            let id = self.members.iter().find(|m| m.name == node).map(|m| m.id.to_string());
            if id.is_none() && matches!(self.coordination, Coordination::Embedded(_)) {
                return Err(DecommissionError::NotConfigured { node: node.into() });
            }
            self.coordination.put(&key, id.unwrap_or_default().as_bytes()).await?;
        }
        tracing::info!(node, undo, "decommission requested");
        Ok(view.partitions.iter().filter(|(_, o)| o.replicas.iter().any(|r| r == node)).map(|(p, _)| *p).collect())
    }

    /// Makes this node hand every leadership over and take none (`undo`: lead again), for as
    /// long as this process runs (`election` module doc). Returns the partitions it leads now;
    /// `Node.Status` shows them going.
    pub fn drain(&self, undo: bool) -> Vec<u32> {
        self.drain_switch.set(!undo);
        tracing::info!(node = %self.name, undo, "drain requested");
        self.view.borrow().led_by(&self.name).into_keys().collect()
    }

    /// `Node.Status`'s cluster part.
    pub fn status(&self) -> pb::ClusterStatus {
        let view = self.view.borrow().clone();
        let (coordination_leader, coordination_applied) = self.coordination.status();
        // The configured members, then the live ones this node's configuration does not list (a
        // server added since this node started: its drain checks and the operator must see it).
        let configured = self.members.iter().map(|m| (m.name.clone(), m.address.to_string()));
        let added = view.members.iter().filter(|(name, _)| !self.members.iter().any(|m| m.name == **name));
        let members = configured.chain(added.map(|(name, address)| (name.clone(), address.clone())));
        pb::ClusterStatus {
            members: members
                .map(|(name, address)| pb::ClusterMember {
                    live: view.members.contains_key(&name),
                    decommissioned: view.decommissioned.contains(&name),
                    draining: view.draining.contains(&name),
                    name,
                    address,
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
                    target: o.target.clone(),
                })
                .collect(),
            coordination_leader,
            coordination_applied,
            coordination_voters: self.coordination.voters(),
            coordination: match self.coordination {
                Coordination::Embedded(_) => "embedded".into(),
                Coordination::Consul(_) => "consul".into(),
            },
        }
    }
}

/// Starts this node's member when the configuration names a cluster; returns its handle and the
/// gRPC service the other members send to. The loop ends (resigning the node's session, so its
/// locks go at once) when `stopped` turns true.
pub async fn start(
    config: &NodeConfig,
    log: Arc<Log>,
    tls: Option<Tls>,
    stopped: watch::Receiver<bool>,
) -> anyhow::Result<Option<(ClusterHandle, ClusterService)>> {
    let Some(me) = config.me().cloned() else { return Ok(None) };
    let elector_config = |prefix: &str| ElectorConfig {
        node: me.name.clone(),
        address: me.address.to_string(),
        partitions: config.storage.partitions,
        replication_factor: config.cluster.replication_factor,
        session_ttl: config.cluster.session_ttl(),
        prefix: prefix.into(),
    };
    let (view_tx, view) = watch::channel(ClusterView::default());
    let (coordination, raft_inbox, handovers, drain) = match &config.cluster.coordination {
        CoordinationConfig::Embedded {} => {
            let members: Vec<u64> = config.cluster.members.iter().map(|m| m.id).collect();
            let dir = config.data_dir.join("coordination");
            // A founder starts its log with the founders as voters; a server added later starts
            // with none and learns the group from the leader's snapshot once it is added.
            let bootstrap = if config.cluster.joins(&me.name) { Vec::new() } else { config.cluster.founder_ids() };
            let raft_log = tokio::task::spawn_blocking(move || RaftLog::open(&dir, &bootstrap))
                .await?
                .context("cannot open the coordination store's Raft log")?;
            let mut node = RaftKv::open(me.id, raft_log, rand::random(), Elections::Randomized)?;
            node.want_voters(&members);
            node.set_prefix(PREFIX, config.cluster.members.iter().map(|m| (m.name.clone(), m.id)).collect());
            let (inbox_tx, inbox) = mpsc::channel(QUEUE_MESSAGES);
            let peers: Vec<MemberConfig> = config.cluster.members.iter().filter(|m| m.id != me.id).cloned().collect();
            let transport = GrpcTransport::start(&peers, outgoing_address(config.listen_addr), tls.clone(), log.metrics(), stopped.clone());
            let store = EmbeddedStore::start(node, inbox, Arc::new(transport));
            let elector = Elector::new(Arc::new(store.clone()), elector_config(PREFIX));
            let (handovers, drain) = (elector.handovers(), elector.drain_switch());
            spawn_elector(elector, view_tx, &log, config.cluster.session_ttl(), &stopped);
            (Coordination::Embedded(store), Some(inbox_tx), handovers, drain)
        }
        CoordinationConfig::Consul(consul) => {
            let store = Arc::new(open_consul(consul)?);
            let elector = Elector::new(store.clone(), elector_config(&consul.key_prefix));
            let (handovers, drain) = (elector.handovers(), elector.drain_switch());
            spawn_elector(elector, view_tx, &log, config.cluster.session_ttl(), &stopped);
            (Coordination::Consul(store), None, handovers, drain)
        }
    };
    // Replication: nothing is appended here until a partition serves, and `quorum` appends wait
    // for a majority.
    log.set_replicated();
    log.roles().use_coordination();
    for p in 0..log.partition_count() {
        log.roles().set(p, 0);
    }
    let partitions: PartitionTasks = Arc::default();
    let replica_peers: Vec<MemberConfig> = config.cluster.members.iter().filter(|m| m.id != me.id).cloned().collect();
    let transport = Arc::new(GrpcReplicaTransport::start(
        me.id as NodeId,
        &replica_peers,
        outgoing_address(config.listen_addr),
        tls,
        log.metrics(),
        stopped.clone(),
    ));
    let ids: HashMap<String, NodeId> = config.cluster.members.iter().map(|m| (m.name.clone(), m.id as NodeId)).collect();
    let audit_log = log.clone();
    let replication =
        Replication { log, me: me.id as NodeId, name: me.name.clone(), ids, partitions: partitions.clone(), transport, handovers };
    tokio::spawn(follow_ownership(replication, view.clone(), stopped));
    let prefix = match &config.cluster.coordination {
        CoordinationConfig::Embedded {} => PREFIX.to_string(),
        CoordinationConfig::Consul(consul) => consul.key_prefix.clone(),
    };
    let handle = ClusterHandle {
        coordination,
        view,
        name: me.name.clone(),
        drain_switch: drain,
        members: config.cluster.members.clone(),
        prefix,
        replication_factor: config.cluster.replication_factor,
    };
    let service = ClusterService::new(raft_inbox, partitions).with_audit(Acceptor::new(audit_log, &config.cluster.members));
    Ok(Some((handle, service)))
}

/// The Consul store `consul` describes, its ACL token read from `token_file` or the environment.
fn open_consul(consul: &ConsulConfig) -> anyhow::Result<ConsulStore> {
    let base = consul::parse_address(&consul.address).map_err(|reason| anyhow::anyhow!("cluster.coordination.address {reason}"))?;
    let token = consul::read_token(consul.token_file.as_deref(), std::env::var(consul::TOKEN_ENV).ok()).map_err(anyhow::Error::msg)?;
    let token_from = match (&consul.token_file, &token) {
        (Some(_), _) => "token_file",
        (None, Some(_)) => consul::TOKEN_ENV,
        (None, None) => "none",
    };
    tracing::info!(
        address = %base, datacenter = ?consul.datacenter, key_prefix = %consul.key_prefix, token_from,
        "coordinating through Consul; no embedded store member runs on this node"
    );
    Ok(ConsulStore::new(base, token, consul.datacenter.clone()))
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
    handovers: Arc<Handovers>,
}

/// Replicates what the ownership view places on this node: starts a partition's replica once its
/// replica set or the set it moves to names this node (stops it once neither does), tells it
/// both sets as they change, and grants it leadership when the view shows this node holding the
/// partition's lock (the lock index is the epoch) and the placement claimed for that epoch.
async fn follow_ownership(r: Replication, mut view: watch::Receiver<ClusterView>, mut stopped: watch::Receiver<bool>) {
    let Replication { log, me, name, ids, partitions, transport, handovers } = r;
    loop {
        let current = view.borrow_and_update().clone();
        for (p, ownership) in &current.partitions {
            let members: Vec<NodeId> = ownership.replicas.iter().filter_map(|r| ids.get(r).copied()).collect();
            // A target naming a node this one cannot reach (not in `cluster.members`) is not
            // followed: the leader could not tell whether it caught up.
            // A draining leader's target is its own set (`ClusterView::target_for`).
            let mut target_names = current.target_for(*p, &name);
            let target: Vec<NodeId> = match target_names.iter().map(|r| ids.get(r).copied()).collect::<Option<Vec<_>>>() {
                Some(target) => target,
                None => {
                    tracing::warn!(partition = p, target = ?target_names, "the target set names a node missing from cluster.members; not moving");
                    target_names.clear();
                    Vec::new()
                }
            };
            // The writer appends only in the epoch the store grants now (`coordination/lease.rs`).
            log.roles().set_granted(*p, current.serving_here(*p, &name).unwrap_or(0));
            if !members.contains(&me) && !target.contains(&me) {
                if partitions.write().remove(p).is_some() {
                    log.roles().set(*p, 0);
                    tracing::info!(partition = p, replicas = ?ownership.replicas, "this node no longer replicates the partition");
                }
                continue;
            }
            if !partitions.read().contains_key(p) {
                let set = if members.contains(&me) { members.clone() } else { target.clone() };
                let config = ReplicaConfig { me, members: set, max_batch_entries: 256, max_inflight_entries: 4096, resend_ticks: 4 };
                let handle = start_partition(log.clone(), *p, config, transport.clone(), handovers.clone());
                partitions.write().insert(*p, handle);
            }
            // Both are idempotent; the sets go first, so a grant finds the set it belongs to.
            if let Some(task) = partitions.read().get(p) {
                task.set_replicas(members.clone(), target, target_names);
                if let Some(epoch) = current.serving_here(*p, &name) {
                    task.grant(epoch);
                }
            }
        }
        tokio::select! {
            changed = view.changed() => if changed.is_err() { return },
            _ = until_stopped(&mut stopped) => return,
        }
    }
}

/// Starts the ownership algorithm's loop and the node's lease (`lease.rs`) on the elector's clock.
fn spawn_elector<S: CoordinationStore>(
    elector: Elector<S>,
    view: watch::Sender<ClusterView>,
    log: &Arc<Log>,
    ttl: Duration,
    stopped: &watch::Receiver<bool>,
) {
    let lease = Lease::new(log.clone(), ttl, elector.clock());
    tokio::spawn(lease.clone().watch(stopped.clone()));
    tokio::spawn(run_elector(elector, view, lease, ttl, stopped.clone()));
}

/// Rounds of the ownership algorithm: at least three per session TTL (each renews the session),
/// and one after every change in the store. When the store cannot even be waited on (Consul out
/// of reach answers at once), the next round waits [`retry_delay`] instead of starting at once.
async fn run_elector<S: CoordinationStore>(
    mut elector: Elector<S>,
    view: watch::Sender<ClusterView>,
    lease: Arc<Lease>,
    ttl: Duration,
    mut stopped: watch::Receiver<bool>,
) {
    let mut index = 0;
    let mut failed_waits = 0u32;
    loop {
        let round = elector.round().await;
        // A round that failed after its renewal renewed all the same.
        if let Some(sent) = elector.renewed_at() {
            lease.renewed(sent);
        }
        match round {
            Ok(seen) => {
                index = seen.index;
                view.send_if_modified(|current| {
                    let changed = current.members != seen.members
                        || current.partitions != seen.partitions
                        || current.session != seen.session
                        || current.draining != seen.draining
                        || current.handing_back != seen.handing_back;
                    *current = seen;
                    changed
                });
            }
            Err(e) => tracing::warn!(error = %e, "ownership round failed; trying again"),
        }
        let handovers = elector.handovers();
        let waited = tokio::select! {
            waited = elector.wait(index, ttl / 3) => waited,
            () = handovers.reported() => Ok(()),
            _ = until_stopped(&mut stopped) => return resign(&mut elector).await,
        };
        let Err(e) = waited else {
            failed_waits = 0;
            continue;
        };
        failed_waits = failed_waits.saturating_add(1);
        let delay = retry_delay(failed_waits, ttl, rand::random());
        tracing::debug!(error = %e, ?delay, "could not wait for changes in the coordination store; next round after a pause");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = until_stopped(&mut stopped) => return resign(&mut elector).await,
        }
    }
}

/// Ends the node's session, so its locks go at once instead of after the TTL.
async fn resign<S: CoordinationStore>(elector: &mut Elector<S>) {
    if let Err(e) = elector.resign().await {
        tracing::warn!(error = %e, "could not resign from the coordination store; the session will expire");
    }
}

/// The pause after `failures` failed waits in a row: [`RETRY_MIN`] doubling up to a third of a
/// TTL (how often rounds renew the session), plus up to a quarter of it as jitter so the nodes
/// do not all come back at once (`random` draws it).
pub(crate) fn retry_delay(failures: u32, ttl: Duration, random: u64) -> Duration {
    let doubled = RETRY_MIN.saturating_mul(1u32 << failures.saturating_sub(1).min(16));
    let delay = doubled.min(ttl / 3).max(RETRY_MIN);
    let jitter_ms = random % (delay.as_millis() as u64 / 4 + 1);
    delay + Duration::from_millis(jitter_ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{AppConfig, GroupCommitConfig, LimitsConfig};
    use crate::metrics::Metrics;
    use crate::storage::Store;

    /// A one-member cluster in `dir` coordinating through `coordination`, and its log.
    fn one_member(dir: &std::path::Path, coordination: CoordinationConfig) -> (NodeConfig, Arc<Log>) {
        let mut config = NodeConfig { node_id: "node-1".into(), data_dir: dir.to_path_buf(), ..NodeConfig::default() };
        config.storage.partitions = 2;
        config.cluster.members = vec![MemberConfig { id: 1, name: "node-1".into(), address: "127.0.0.1:7400".parse().unwrap() }];
        config.cluster.replication_factor = 1;
        config.cluster.session_ttl_ms = 10_000;
        config.cluster.coordination = coordination;
        config.validate().unwrap();
        let store = Arc::new(Store::open(dir, &config.storage).unwrap());
        let log =
            Log::start(store, &GroupCommitConfig::default(), &LimitsConfig::default(), &AppConfig::default(), Arc::new(Metrics::default()))
                .unwrap();
        (config, Arc::new(log))
    }

    #[tokio::test]
    async fn given_consul_coordination_then_the_node_opens_no_raft_member_and_reports_consuls_index() {
        let dir = tempfile::tempdir().unwrap();
        // Nobody listens there: the elector's rounds fail and pause, the node still starts.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let consul = ConsulConfig { address: format!("http://127.0.0.1:{port}"), ..ConsulConfig::default() };
        let (config, log) = one_member(dir.path(), CoordinationConfig::Consul(consul));
        let (stop, stopped) = watch::channel(false);
        let (handle, _service) = start(&config, log, None, stopped).await.unwrap().expect("a cluster member");
        assert!(matches!(handle.coordination, Coordination::Consul(_)));
        assert!(!dir.path().join("coordination").exists(), "no Raft log is opened");
        let status = handle.status();
        assert_eq!((status.coordination_leader, status.coordination_applied), (0, 0), "no prefix read has succeeded");
        stop.send(true).unwrap();
    }

    #[tokio::test]
    async fn given_the_default_coordination_then_the_node_opens_its_embedded_store_member() {
        let dir = tempfile::tempdir().unwrap();
        let (config, log) = one_member(dir.path(), CoordinationConfig::default());
        let (stop, stopped) = watch::channel(false);
        let (handle, _service) = start(&config, log, None, stopped).await.unwrap().expect("a cluster member");
        assert!(matches!(handle.coordination, Coordination::Embedded(_)));
        assert!(dir.path().join("coordination").exists(), "the Raft log is opened in data_dir/coordination");
        stop.send(true).unwrap();
    }

    #[test]
    fn retry_delays_double_from_the_minimum_and_stay_under_a_third_of_a_ttl_plus_jitter() {
        let ttl = Duration::from_secs(12);
        for (failures, base_ms) in [(1, 100), (2, 200), (3, 400), (6, 3_200), (7, 4_000), (40, 4_000)] {
            let delay = retry_delay(failures, ttl, rand::random());
            let base = Duration::from_millis(base_ms);
            assert!(delay >= base && delay <= base + base / 4, "{failures} failures: {delay:?}, expected {base:?} plus a quarter at most");
        }
    }
}
