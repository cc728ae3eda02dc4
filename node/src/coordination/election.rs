//! The ownership algorithm, written once against [`CoordinationStore`]: membership, placement
//! and leader election for every partition.
//!
//! Keys under the cluster's prefix:
//!
//! | key               | value            | held by (lock)      | meaning                               |
//! |-------------------|------------------|---------------------|---------------------------------------|
//! | `members/{node}`  | the node's address | the node's session | the node is alive                   |
//! | `placement/{p}`   | `a,b,c`          | —                   | partition `p`'s replica set, written once |
//! | `leaders/{p}`     | the leader's name | the leader's session | `p`'s leader; the lock index is its epoch |
//!
//! Each node runs [`Elector::round`] in a loop, and between rounds waits for a change
//! ([`Elector::wait`]):
//! 1. renew its session, or make a new one if it expired (its locks are gone with it);
//! 2. hold its member key;
//! 3. once the cluster has `replication_factor` live members, write every missing placement
//!    (rendezvous hashing, [`super::placement`]) with a create-only compare-and-set, so every
//!    node ends up with the same sets whoever writes them first;
//! 4. for each partition whose leader lock is free, if this node is the first live member of its
//!    replica set, take the lock: the lock index it gets is the epoch it leads in
//!    (`Replica::become_leader`).
//!
//! A node that dies stops renewing; once its session's TTL passes, the store releases its locks
//! and the next live replica of each of its partitions takes over with a higher epoch. The
//! epochs fence the old leader if it was only slow (docs/replication.md).
//!
//! Decisions a later engineer must know: a replica set is written once and does not follow
//! membership (moving a replica needs the newcomer caught up first; not built yet). Only the
//! first live replica of a set takes a free lock, so leadership spreads like the placement and
//! does not flap when a node comes back (it does not take back locks held by others).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::placement::replica_set;
use super::{Cas, CoordinationStore, Result, SessionId};

#[derive(Debug, Clone)]
pub struct ElectorConfig {
    pub node: String,
    /// Where other nodes reach this one (its gRPC address).
    pub address: String,
    pub partitions: u32,
    pub replication_factor: usize,
    /// A node is taken for dead this long after its last renewal.
    pub session_ttl: Duration,
    /// The cluster's key prefix, e.g. `anthill/`.
    pub prefix: String,
}

/// Who replicates and who leads one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionOwnership {
    pub replicas: Vec<String>,
    /// The leader and its epoch, when the lock is held.
    pub leader: Option<(String, u64)>,
}

/// The cluster as the store showed it at `index`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterView {
    /// Live members and their addresses.
    pub members: BTreeMap<String, String>,
    pub partitions: BTreeMap<u32, PartitionOwnership>,
    pub index: u64,
}

impl ClusterView {
    /// The partitions this node leads, with their epochs.
    pub fn led_by(&self, node: &str) -> BTreeMap<u32, u64> {
        self.partitions
            .iter()
            .filter_map(|(p, o)| o.leader.as_ref().filter(|(leader, _)| leader == node).map(|(_, epoch)| (*p, *epoch)))
            .collect()
    }
}

pub struct Elector<S> {
    store: Arc<S>,
    config: ElectorConfig,
    session: Option<SessionId>,
    /// When the session was last created or renewed.
    renewed: Option<tokio::time::Instant>,
}

impl<S: CoordinationStore> Elector<S> {
    pub fn new(store: Arc<S>, config: ElectorConfig) -> Self {
        assert!(config.replication_factor >= 1 && config.partitions >= 1);
        Elector { store, config, session: None, renewed: None }
    }

    fn key(&self, kind: &str, name: impl std::fmt::Display) -> String {
        format!("{}{kind}/{name}", self.config.prefix)
    }

    /// One round of the algorithm (module doc); returns the cluster as it is afterwards.
    pub async fn round(&mut self) -> Result<ClusterView> {
        let session = self.ensure_session().await?;
        let member_key = self.key("members", &self.config.node);
        // Acquired only when this session does not hold it yet: acquiring again would bump the
        // store's index and wake every other node's round, which would do the same, forever.
        let held = self
            .store
            .get(&member_key)
            .await?
            .is_some_and(|e| e.session.as_ref() == Some(&session) && e.value == self.config.address.as_bytes());
        if !held {
            // `None`: an earlier session of this node still holds it; it expires on its own.
            self.store.acquire(&member_key, self.config.address.as_bytes(), &session).await?;
        }
        let view = self.view().await?;
        if view.members.len() >= self.config.replication_factor {
            let members: Vec<String> = view.members.keys().cloned().collect();
            for p in (0..self.config.partitions).filter(|p| !view.partitions.contains_key(p)) {
                let set = replica_set(p, &members, self.config.replication_factor);
                self.store.put(&self.key("placement", p), set.join(",").as_bytes(), Cas::Absent).await?;
            }
        }
        let view = self.view().await?;
        // All at once: after a node dies, this one may take many locks, and each is a write.
        let takes = view.partitions.iter().filter(|(_, ownership)| {
            let first_live = ownership.replicas.iter().find(|r| view.members.contains_key(*r));
            ownership.leader.is_none() && first_live == Some(&self.config.node)
        });
        let keys: Vec<String> = takes.map(|(p, _)| self.key("leaders", p)).collect();
        let acquired =
            futures_util::future::join_all(keys.iter().map(|key| self.store.acquire(key, self.config.node.as_bytes(), &session))).await;
        for (key, outcome) in keys.iter().zip(acquired) {
            if let Some(epoch) = outcome? {
                tracing::info!(node = %self.config.node, %key, epoch, "took a free leader lock");
            }
        }
        self.view().await
    }

    /// Waits until the cluster changes after `index`, at most `wait`.
    pub async fn wait(&self, index: u64, wait: Duration) -> Result<()> {
        self.store.list(&self.config.prefix, index, wait).await.map(|_| ())
    }

    /// Ends this node's session: its locks are released at once (a clean shutdown).
    pub async fn resign(&mut self) -> Result<()> {
        if let Some(session) = self.session.take() {
            self.store.destroy_session(&session).await?;
        }
        Ok(())
    }

    async fn ensure_session(&mut self) -> Result<SessionId> {
        if let Some(session) = &self.session {
            // Renewed moments ago (a round woken by a change): no need to write again before
            // taking locks, which is what a failover waits for.
            if self.renewed.is_some_and(|at| at.elapsed() < self.config.session_ttl / 6) {
                return Ok(session.clone());
            }
            if self.store.renew_session(session).await? {
                self.renewed = Some(tokio::time::Instant::now());
                return Ok(session.clone());
            }
            tracing::warn!(node = %self.config.node, %session, "coordination session expired; every lock it held is gone, starting a new one");
        }
        let session = self.store.create_session(&self.config.node, self.config.session_ttl).await?;
        self.session = Some(session.clone());
        self.renewed = Some(tokio::time::Instant::now());
        Ok(session)
    }

    async fn view(&self) -> Result<ClusterView> {
        let listing = self.store.list(&self.config.prefix, 0, Duration::ZERO).await?;
        let mut view = ClusterView { index: listing.index, ..ClusterView::default() };
        let mut leaders = BTreeMap::new();
        for entry in listing.entries {
            let Some(rest) = entry.key.strip_prefix(&self.config.prefix) else { continue };
            let value = String::from_utf8_lossy(&entry.value).into_owned();
            match rest.split_once('/') {
                Some(("members", node)) if entry.session.is_some() => {
                    view.members.insert(node.to_string(), value);
                }
                Some(("placement", p)) => {
                    if let Ok(p) = p.parse::<u32>() {
                        let replicas = value.split(',').filter(|r| !r.is_empty()).map(str::to_string).collect();
                        view.partitions.insert(p, PartitionOwnership { replicas, leader: None });
                    }
                }
                Some(("leaders", p)) if entry.session.is_some() => {
                    if let Ok(p) = p.parse::<u32>() {
                        leaders.insert(p, (value, entry.lock_index));
                    }
                }
                _ => {}
            }
        }
        for (p, leader) in leaders {
            if let Some(ownership) = view.partitions.get_mut(&p) {
                ownership.leader = Some(leader);
            }
        }
        Ok(view)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coordination::memory::MemoryStore;

    const PARTITIONS: u32 = 12;

    fn elector(store: &Arc<MemoryStore>, node: &str) -> Elector<MemoryStore> {
        Elector::new(
            store.clone(),
            ElectorConfig {
                node: node.into(),
                address: format!("{node}:7400"),
                partitions: PARTITIONS,
                replication_factor: 3,
                session_ttl: Duration::from_secs(2),
                prefix: "anthill/".into(),
            },
        )
    }

    async fn rounds(electors: &mut [&mut Elector<MemoryStore>], times: usize) -> ClusterView {
        let mut view = ClusterView::default();
        for _ in 0..times {
            for e in electors.iter_mut() {
                view = e.round().await.unwrap();
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        view
    }

    #[tokio::test(start_paused = true)]
    async fn given_three_nodes_then_every_partition_gets_one_leader_from_its_replica_set_in_epoch_one() {
        let store = Arc::new(MemoryStore::default());
        let (mut a, mut b, mut c) = (elector(&store, "node-1"), elector(&store, "node-2"), elector(&store, "node-3"));
        let view = rounds(&mut [&mut a, &mut b, &mut c], 2).await;
        assert_eq!(view.members.len(), 3);
        assert_eq!(view.partitions.len(), PARTITIONS as usize);
        for (p, o) in &view.partitions {
            assert_eq!(o.replicas.len(), 3, "partition {p}");
            let (leader, epoch) = o.leader.clone().unwrap_or_else(|| panic!("partition {p} has no leader"));
            assert_eq!((leader.as_str(), epoch), (o.replicas[0].as_str(), 1), "partition {p}");
        }
        assert!(["node-1", "node-2", "node-3"].iter().all(|n| !view.led_by(n).is_empty()), "leadership spreads: {view:?}");
        // Once settled, a round changes nothing in the store, so it wakes no other node's round.
        let settled = rounds(&mut [&mut a, &mut b, &mut c], 1).await.index;
        assert_eq!(rounds(&mut [&mut a, &mut b, &mut c], 2).await.index, settled, "rounds of a settled cluster keep writing");
    }

    #[tokio::test(start_paused = true)]
    async fn given_a_node_that_stops_when_its_session_expires_then_its_partitions_move_to_live_replicas_with_a_higher_epoch() {
        let store = Arc::new(MemoryStore::default());
        let (mut a, mut b, mut c) = (elector(&store, "node-1"), elector(&store, "node-2"), elector(&store, "node-3"));
        let before = rounds(&mut [&mut a, &mut b, &mut c], 2).await;
        let lost = before.led_by("node-2");
        assert!(!lost.is_empty());
        // node-2 stops renewing; the others go on.
        let after = rounds(&mut [&mut a, &mut c], 6).await;
        assert!(!after.members.contains_key("node-2"));
        for (p, o) in &after.partitions {
            let (leader, epoch) = o.leader.clone().unwrap_or_else(|| panic!("partition {p} has no leader after the failover"));
            if lost.contains_key(p) {
                assert_ne!(leader, "node-2");
                assert_eq!(epoch, 2, "partition {p}: the new leader's epoch fences the old one");
                let live_first = o.replicas.iter().find(|r| *r != "node-2").unwrap();
                assert_eq!(&leader, live_first);
            } else {
                assert_eq!(Some(&(leader, epoch)), before.partitions[p].leader.as_ref(), "partition {p} moved without cause");
            }
        }
        // node-2 comes back: it is a member again, and takes no lock back.
        let mut b = elector(&store, "node-2");
        let back = rounds(&mut [&mut a, &mut b, &mut c], 3).await;
        assert!(back.members.contains_key("node-2"));
        assert!(back.led_by("node-2").is_empty());
        assert_eq!(
            back.partitions.values().map(|o| o.replicas.clone()).collect::<Vec<_>>(),
            before.partitions.values().map(|o| o.replicas.clone()).collect::<Vec<_>>(),
            "placement is written once"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn given_fewer_members_than_the_replication_factor_then_no_placement_is_written() {
        let store = Arc::new(MemoryStore::default());
        let (mut a, mut b) = (elector(&store, "node-1"), elector(&store, "node-2"));
        let view = rounds(&mut [&mut a, &mut b], 2).await;
        assert_eq!(view.members.len(), 2);
        assert!(view.partitions.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_blocking_wait_returns_when_the_cluster_changes() {
        let store = Arc::new(MemoryStore::default());
        let mut a = elector(&store, "node-1");
        let view = a.round().await.unwrap();
        let waiter = tokio::spawn({
            let a = elector(&store, "node-1");
            async move { a.wait(view.index, Duration::from_secs(60)).await }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!waiter.is_finished());
        let mut b = elector(&store, "node-2");
        b.round().await.unwrap();
        tokio::time::timeout(Duration::from_secs(1), waiter).await.expect("woke on the change").unwrap().unwrap();
    }
}
