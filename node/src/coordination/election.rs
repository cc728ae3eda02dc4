//! The ownership algorithm, written once against [`CoordinationStore`]: membership, placement
//! and leader election for every partition.
//!
//! Keys under the cluster's prefix:
//!
//! | key               | value            | held by (lock)      | meaning                               |
//! |-------------------|------------------|---------------------|---------------------------------------|
//! | `members/{node}`  | the node's address | the node's session | the node is alive (the key stays when it dies: a known member) |
//! | `draining/{node}` | empty            | the node's session  | the node hands its leaderships over and takes none (`anthill drain`); gone with the process |
//! | `decommissioned/{node}` | its Raft id | —                  | an operator takes the node out of every replica set (and the embedded store's group) |
//! | `placement/{p}`   | [`Placement`]    | —                   | partition `p`'s replica set, the set it moves to, and the epoch of the leader that claimed it |
//! | `leaders/{p}`     | the leader's name | the leader's session | `p`'s leader; the lock index is its epoch |
//!
//! Each node runs [`Elector::round`] in a loop, and between rounds waits for a change
//! ([`Elector::wait`]):
//! 1. renew its session, or make a new one if it expired (its locks are gone with it);
//! 2. hold its member key;
//! 3. once the cluster has `replication_factor` live members, write every missing placement
//!    (rendezvous hashing, [`super::placement`]) with a create-only compare-and-set, so every
//!    node ends up with the same sets whoever writes them first;
//! 4. for each partition whose leader lock is free, if this node is the set's preferred member
//!    (the first live one that is not draining, or the first live one when all of them are:
//!    [`ClusterView::preferred`]), take the lock: the lock index it gets is the epoch it leads in
//!    (`Replica::become_leader`);
//! 5. for each partition it holds the lock of: **claim** the placement for its epoch (a
//!    compare-and-set on the placement's modify index that writes the epoch into it) before the
//!    partition serves; then, as the claimed leader, write a target set when the desired set
//!    (rendezvous hashing over the known, not decommissioned members) differs from the current
//!    one and its newcomers are live, and switch the placement to the target once its replica
//!    reports the handover ready (`Replica::handover_ready`), releasing the lock so the new set
//!    elects its leader in a higher epoch.
//!
//! A node that dies stops renewing; once its session's TTL passes, the store releases its locks
//! and the next live replica of each of its partitions takes over with a higher epoch. The
//! epochs fence the old leader if it was only slow (docs/replication.md).
//!
//! Why the claim: the switch is a compare-and-set on the modify index the switching leader saw
//! with its own claim. A later leader claims (bumping that index) before it serves anything, so
//! a switch from a deposed leader, however late it arrives, can only land before any later
//! epoch served, when the deposed leader's log was still the whole log (docs/replication.md,
//! "Moving a replica set").
//!
//! Decisions a later engineer must know: a dead member is not replaced on its own (a restart
//! must not move data); an operator decommissions it (`anthill decommission`), and a member
//! seen for the first time joins the desired sets. Only the preferred replica of a set (the
//! first live one that does not drain) takes a free lock, so leadership spreads like the
//! placement. A node that comes back takes no lock
//! back itself; once it has been live for [`SETTLE_TTLS`] TTLs, each leader hands back to it
//! one partition per round whose set names it first (a handover as a draining leader makes,
//! below, then a release), so leadership spreads again without flapping after every restart.
//!
//! A draining node ([`Elector::drain_switch`], the `Node.Drain` call) holds `draining/{node}`
//! under its session, so the mark ends with the process (a restarted node leads again once
//! leaderships are handed back). Nobody hands a partition to it or takes a lock for it while a
//! live replica of the set is not draining. It hands each partition it leads over the same way a
//! moving set does, with its own set as the target ([`ClusterView::target_for`]): the leader
//! pauses, its whole log becomes durable on a majority of the set, it reports the handover ready
//! and never serves that epoch again, and its elector releases the lock. The preferred replica
//! then takes the lock in a higher epoch and its recovery over any majority adopts that whole
//! log, so not even an append acknowledged by the leader alone is lost (docs/replication.md,
//! "Draining a node").

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::Notify;

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

/// A partition's `placement/{p}` value: `a,b,c`, then `;target=d,b,c` while it moves and
/// `;claim=E` once the leader of epoch `E` claimed it (a bare `a,b,c` is a placement as first
/// written).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Placement {
    pub replicas: Vec<String>,
    /// The set the partition moves to; empty when it does not.
    pub target: Vec<String>,
    /// The epoch of the last leader that claimed the placement (0: none yet).
    pub claim: u64,
}

impl Placement {
    pub fn encode(&self) -> String {
        let mut value = self.replicas.join(",");
        if !self.target.is_empty() {
            value.push_str(";target=");
            value.push_str(&self.target.join(","));
        }
        if self.claim > 0 {
            value.push_str(&format!(";claim={}", self.claim));
        }
        value
    }

    pub fn decode(value: &str) -> Option<Placement> {
        let names = |list: &str| list.split(',').filter(|r| !r.is_empty()).map(str::to_string).collect::<Vec<_>>();
        let mut parts = value.split(';');
        let mut placement = Placement { replicas: names(parts.next()?), ..Placement::default() };
        for part in parts {
            match part.split_once('=')? {
                ("target", list) => placement.target = names(list),
                ("claim", epoch) => placement.claim = epoch.parse().ok()?,
                _ => return None,
            }
        }
        Some(placement)
    }
}

/// Whether two lists name the same members, in any order.
pub fn same_set(a: &[String], b: &[String]) -> bool {
    a.iter().collect::<BTreeSet<_>>() == b.iter().collect::<BTreeSet<_>>()
}

/// Who replicates and who leads one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionOwnership {
    pub replicas: Vec<String>,
    /// The leader and its epoch, when the lock is held.
    pub leader: Option<(String, u64)>,
    /// The set the partition moves to (empty: none).
    pub target: Vec<String>,
    /// The epoch of the leader that claimed the placement; a leader serves only once its
    /// epoch is claimed.
    pub claim: u64,
    /// The placement key's modify index (what a claim or a switch compares against).
    pub modify_index: u64,
    /// The session holding the leader lock.
    pub leader_session: Option<SessionId>,
}

impl PartitionOwnership {
    /// The leader, when it holds the lock and claimed the placement for its epoch.
    pub fn serving_leader(&self) -> Option<(&str, u64)> {
        self.leader.as_ref().filter(|(_, epoch)| *epoch == self.claim).map(|(leader, epoch)| (leader.as_str(), *epoch))
    }
}

/// The cluster as the store showed it at `index`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterView {
    /// Live members and their addresses.
    pub members: BTreeMap<String, String>,
    /// Every member that ever joined (live or not).
    pub known: BTreeSet<String>,
    /// Members an operator took out of the replica sets.
    pub decommissioned: BTreeSet<String>,
    /// Live members handing their leaderships over (module doc).
    pub draining: BTreeSet<String>,
    /// Partitions this node leads and hands back to their preferred replica (module doc): this
    /// node's own intent, not the store's.
    pub handing_back: BTreeSet<u32>,
    pub partitions: BTreeMap<u32, PartitionOwnership>,
    pub index: u64,
    /// This node's session as of the view.
    pub session: Option<SessionId>,
}

impl ClusterView {
    /// The epoch this node's current session leads `partition` in, with the placement claimed
    /// for it. A lock held by an earlier session of this node (a process restarted within its
    /// TTL) is not this node's to serve: that process may have handed the epoch over, so the
    /// partition waits for the old session to expire and a new epoch.
    pub fn serving_here(&self, partition: u32, node: &str) -> Option<u64> {
        let o = self.partitions.get(&partition)?;
        let (leader, epoch) = o.serving_leader()?;
        (leader == node && o.leader_session.is_some() && o.leader_session == self.session && o.replicas.iter().any(|r| r == node))
            .then_some(epoch)
    }

    /// Who should lead a partition with replica set `replicas`: its first live member that is
    /// not draining, or, when every live member drains, the first live one (a partition is
    /// better led by a draining node than not at all).
    pub fn preferred<'a>(&self, replicas: &'a [String]) -> Option<&'a String> {
        let mut live = replicas.iter().filter(|r| self.members.contains_key(*r));
        let first = live.clone().next();
        live.find(|r| !self.draining.contains(*r)).or(first)
    }

    /// The set `node`'s replica of `partition` works towards: the placement's target while the
    /// set moves; while `node` serves as the partition's leader and drains or hands the
    /// partition back, its own set with the successor (the preferred replica) first, as long
    /// as that is another live replica that does not drain (the handover moves only the
    /// leadership, and waits until the successor holds the whole log: `Replica::successor`);
    /// otherwise none. `node` is the view's own node (`handing_back` is its intent).
    pub fn target_for(&self, partition: u32, node: &str) -> Vec<String> {
        let Some(o) = self.partitions.get(&partition) else { return Vec::new() };
        if !o.target.is_empty() {
            return o.target.clone();
        }
        let successor = self.preferred(&o.replicas).filter(|m| *m != node && !self.draining.contains(*m));
        let handing = self.draining.contains(node) || self.handing_back.contains(&partition);
        if let Some(successor) = successor.filter(|_| handing && self.serving_here(partition, node).is_some()) {
            let mut target = vec![successor.clone()];
            target.extend(o.replicas.iter().filter(|r| *r != successor).cloned());
            return target;
        }
        Vec::new()
    }
}

/// Handovers the partitions' replicas report ready (`Replica::handover_ready`), for the
/// elector to switch: partition to (epoch, target set).
#[derive(Default)]
pub struct Handovers {
    ready: Mutex<BTreeMap<u32, (u64, Vec<String>)>>,
    notify: Notify,
}

impl Handovers {
    /// The leader of `partition` in `epoch` paused with its whole log on `target`'s newcomers
    /// and a majority of it, and will take nothing more in that epoch.
    pub fn report(&self, partition: u32, epoch: u64, target: Vec<String>) {
        self.ready.lock().insert(partition, (epoch, target));
        self.notify.notify_one();
    }

    /// Resolves when a handover is reported (or was since the last call).
    pub async fn reported(&self) {
        self.notify.notified().await;
    }
}

/// Turns a node's draining on or off (`Node.Drain`) and wakes its elector to act on it.
#[derive(Clone)]
pub struct DrainSwitch {
    on: Arc<AtomicBool>,
    handovers: Arc<Handovers>,
}

impl DrainSwitch {
    pub fn set(&self, on: bool) {
        self.on.store(on, Ordering::Release);
        // The elector's loop waits on the handovers' notification between rounds.
        self.handovers.notify.notify_one();
    }

    pub fn is_on(&self) -> bool {
        self.on.load(Ordering::Acquire)
    }
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

/// A monotonic clock: the time since some origin. The node's is tokio's; the simulator's is
/// its simulated time.
pub type Clock = Arc<dyn Fn() -> Duration + Send + Sync>;

pub struct Elector<S> {
    store: Arc<S>,
    config: ElectorConfig,
    handovers: Arc<Handovers>,
    session: Option<SessionId>,
    /// When the request that last created or renewed the session was sent, by `clock` (the
    /// store's TTL runs from a moment after it).
    renewed: Option<Duration>,
    /// Since when (by `clock`) each live member has been live without a break, as this node saw
    /// it: a leader hands a partition back to its first live replica only once that one has
    /// been live for [`SETTLE_TTLS`] TTLs.
    live_since: BTreeMap<String, Duration>,
    clock: Clock,
    /// Whether this node drains (module doc), set through [`Elector::drain_switch`].
    draining: Arc<AtomicBool>,
    /// The session this node's `draining/` key is held under, when it is.
    drain_held: Option<SessionId>,
    /// Partitions this node hands back (`ClusterView::handing_back`).
    handing_back: Mutex<BTreeSet<u32>>,
}

/// How many session TTLs a member must have been live before leaderships return to it.
pub const SETTLE_TTLS: u32 = 2;

impl<S: CoordinationStore> Elector<S> {
    pub fn new(store: Arc<S>, config: ElectorConfig) -> Self {
        assert!(config.replication_factor >= 1 && config.partitions >= 1);
        let origin = tokio::time::Instant::now();
        let clock: Clock = Arc::new(move || origin.elapsed());
        Elector {
            store,
            config,
            handovers: Arc::default(),
            session: None,
            renewed: None,
            live_since: BTreeMap::new(),
            clock,
            draining: Arc::default(),
            drain_held: None,
            handing_back: Mutex::default(),
        }
    }

    /// The switch that makes this node drain or lead again (module doc).
    pub fn drain_switch(&self) -> DrainSwitch {
        DrainSwitch { on: self.draining.clone(), handovers: self.handovers.clone() }
    }

    /// When the request that last created or renewed the session was sent, by [`Elector::clock`].
    pub fn renewed_at(&self) -> Option<Duration> {
        self.renewed
    }

    pub fn clock(&self) -> Clock {
        self.clock.clone()
    }

    /// The elector with another clock (the simulator's).
    pub fn with_clock(self, clock: Clock) -> Self {
        Elector { clock, ..self }
    }

    /// Where this node's replicas report handovers ready.
    pub fn handovers(&self) -> Arc<Handovers> {
        self.handovers.clone()
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
        self.mark_draining(&session).await?;
        let view = self.view().await?;
        let now = (self.clock)();
        self.live_since.retain(|m, _| view.members.contains_key(m));
        for m in view.members.keys() {
            self.live_since.entry(m.clone()).or_insert(now);
        }
        let settled: BTreeSet<String> = self
            .live_since
            .iter()
            .filter(|(_, since)| now.saturating_sub(**since) >= self.config.session_ttl * SETTLE_TTLS)
            .map(|(m, _)| m.clone())
            .collect();
        let live: Vec<String> = view.members.keys().filter(|m| !view.decommissioned.contains(*m)).cloned().collect();
        if live.len() >= self.config.replication_factor {
            for p in (0..self.config.partitions).filter(|p| !view.partitions.contains_key(p)) {
                let placement = Placement { replicas: replica_set(p, &live, self.config.replication_factor), ..Placement::default() };
                self.store.put(&self.key("placement", p), placement.encode().as_bytes(), Cas::Absent).await?;
            }
        }
        let view = self.view().await?;
        // All at once: after a node dies, this one may take many locks, and each is a write.
        let takes = view
            .partitions
            .iter()
            .filter(|(_, ownership)| ownership.leader.is_none() && view.preferred(&ownership.replicas) == Some(&self.config.node));
        let keys: Vec<String> = takes.map(|(p, _)| self.key("leaders", p)).collect();
        let acquired =
            futures_util::future::join_all(keys.iter().map(|key| self.store.acquire(key, self.config.node.as_bytes(), &session))).await;
        let mut took = false;
        for (key, outcome) in keys.iter().zip(acquired) {
            if let Some(epoch) = outcome? {
                tracing::info!(node = %self.config.node, %key, epoch, "took a free leader lock");
                took = true;
            }
        }
        let view = if took { self.view().await? } else { view };
        if self.lead(&view, &session, &settled).await? { self.view().await } else { Ok(view) }
    }

    /// Step 5 of a round (module doc) for every partition whose lock this node holds: claims,
    /// targets, switches, and releases, including one leadership handed back per round to the
    /// partition's first live replica once it has been live for a while (`settled`). Whether
    /// it wrote anything.
    async fn lead(&self, view: &ClusterView, session: &SessionId, settled: &BTreeSet<String>) -> Result<bool> {
        let eligible: Vec<String> = view.known.iter().filter(|m| !view.decommissioned.contains(*m)).cloned().collect();
        // Reports stay until their outcome is known, or their epoch is no longer this node's.
        let ready = {
            let mut ready = self.handovers.ready.lock();
            ready.retain(|p, (epoch, _)| {
                view.partitions.get(p).and_then(|o| o.leader.as_ref()) == Some(&(self.config.node.clone(), *epoch))
            });
            ready.clone()
        };
        // A hand-back stands while its partition's preferred replica is another, settled node
        // and the set does not move; otherwise it is called off (and taken up again once so).
        let called_off = {
            let mut handing_back = self.handing_back.lock();
            let before = handing_back.len();
            handing_back.retain(|p| {
                view.partitions.get(p).is_some_and(|o| {
                    o.target.is_empty() && view.preferred(&o.replicas).is_some_and(|m| *m != self.config.node && settled.contains(m))
                })
            });
            handing_back.len() != before
        };
        let mut writes = Vec::new();
        // Locks to release, and whether a handover report is settled once released.
        let mut releases: Vec<(u32, bool)> = Vec::new();
        let mut handed_back = false;
        for (p, o) in &view.partitions {
            let Some((leader, epoch)) = &o.leader else { continue };
            // Only a lock of this session: an earlier session's is left to expire.
            if *leader != self.config.node || o.leader_session.as_ref() != Some(session) {
                continue;
            }
            let current = Placement { replicas: o.replicas.clone(), target: o.target.clone(), claim: o.claim };
            if !o.replicas.contains(&self.config.node) {
                // Took the lock of a set that switched away from this node meanwhile.
                releases.push((*p, false));
            } else if o.claim < *epoch {
                writes.push((*p, o.modify_index, Placement { claim: *epoch, ..current }, false));
            } else if o.claim > *epoch {
                // A later epoch claimed it: this lock is stale (the view will show it gone).
            } else if let Some((_, target)) = ready.get(p).filter(|(at, _)| at == epoch) {
                if *target == o.target {
                    let switched = Placement { replicas: target.clone(), target: Vec::new(), claim: *epoch };
                    writes.push((*p, o.modify_index, switched, true));
                } else {
                    // A draining leader's handover of its own set (`ClusterView::target_for`),
                    // or the switch landed (a write whose answer was lost), or this node wrote
                    // another target since: either way its paused leader is done with its epoch.
                    releases.push((*p, true));
                }
            } else if eligible.len() >= self.config.replication_factor {
                let desired = replica_set(*p, &eligible, self.config.replication_factor);
                // A target whose newcomer is down is dropped: the leader would pause for it in
                // vain, again and again. It is written again once the newcomer is back.
                let newcomers_live = desired.iter().all(|m| o.replicas.contains(m) || view.members.contains_key(m));
                let target = if same_set(&desired, &o.replicas) || !newcomers_live { Vec::new() } else { desired };
                let draining = view.draining.contains(&self.config.node);
                if !same_set(&target, &o.target) {
                    tracing::info!(partition = p, from = ?o.replicas, to = ?target, "moving the partition's replica set");
                    writes.push((*p, o.modify_index, Placement { target, ..current }, false));
                } else if let Some(preferred) = view.preferred(&o.replicas).filter(|m| **m != self.config.node && settled.contains(*m))
                    && o.target.is_empty()
                    && !handed_back
                    && !draining
                {
                    // Leadership gathers on the nodes that stay up (a node back from a failure
                    // takes no lock back); handing it back to the set's first live replica, as
                    // placement spreads them, spreads the leaders' work and a failure's reach.
                    // As a draining leader does: a handover to its own set, then a release once
                    // ready; the preferred replica takes the lock in a higher epoch.
                    if self.handing_back.lock().insert(*p) {
                        tracing::info!(partition = p, epoch, to = %preferred, "handing the partition's leadership back to its first live replica");
                        handed_back = true;
                    }
                }
            }
        }
        let wrote = !writes.is_empty() || !releases.is_empty() || handed_back || called_off;
        let puts: Vec<(String, String, u64)> =
            writes.iter().map(|(p, index, placement, _)| (self.key("placement", p), placement.encode(), *index)).collect();
        let outcomes = futures_util::future::join_all(
            puts.iter().map(|(key, value, index)| self.store.put(key, value.as_bytes(), Cas::ModifyIndex(*index))),
        )
        .await;
        for ((p, _, placement, switch), outcome) in writes.iter().zip(outcomes) {
            // An unknown outcome keeps a switch's report: the next round compares again (the
            // claim or the modify index then says whether it landed).
            let done = outcome?;
            if *switch {
                // Switched or not (a later epoch claimed meanwhile), this leader is done with
                // its epoch: the set's first live member takes the lock in a higher one.
                tracing::info!(partition = p, switched = done, to = ?placement.replicas, "handing the partition over");
                releases.push((*p, true));
            }
        }
        for (p, settles_report) in releases {
            // The report stays until the lock is gone, so a failed release is tried again.
            self.store.release(&self.key("leaders", p), session).await?;
            if settles_report {
                self.handovers.ready.lock().remove(&p);
            }
        }
        Ok(wrote)
    }

    /// Holds this node's `draining/` key under `session` while the switch is on, and lets it go
    /// once it is off. A key an earlier session of this node still holds is taken once that
    /// session expires.
    async fn mark_draining(&mut self, session: &SessionId) -> Result<()> {
        let key = self.key("draining", &self.config.node);
        let want = self.draining.load(Ordering::Acquire);
        if want && self.drain_held.as_ref() != Some(session) {
            if self.store.acquire(&key, b"", session).await?.is_some() {
                tracing::info!(node = %self.config.node, "draining: handing every leadership over");
                self.drain_held = Some(session.clone());
            }
        } else if !want && let Some(held) = self.drain_held.clone() {
            if held == *session {
                self.store.release(&key, session).await?;
                tracing::info!(node = %self.config.node, "no longer draining");
            }
            self.drain_held = None;
        }
        Ok(())
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
            let now = (self.clock)();
            if self.renewed.is_some_and(|at| now.saturating_sub(at) < self.config.session_ttl / 6) {
                return Ok(session.clone());
            }
            let sent = (self.clock)();
            if self.store.renew_session(session).await? {
                self.renewed = Some(sent);
                return Ok(session.clone());
            }
            tracing::warn!(node = %self.config.node, %session, "coordination session expired; every lock it held is gone, starting a new one");
        }
        let sent = (self.clock)();
        let session = self.store.create_session(&self.config.node, self.config.session_ttl).await?;
        self.session = Some(session.clone());
        self.renewed = Some(sent);
        Ok(session)
    }

    async fn view(&self) -> Result<ClusterView> {
        let listing = self.store.list(&self.config.prefix, 0, Duration::ZERO).await?;
        let mut view = ClusterView { index: listing.index, session: self.session.clone(), ..ClusterView::default() };
        let mut leaders = BTreeMap::new();
        for entry in listing.entries {
            let Some(rest) = entry.key.strip_prefix(&self.config.prefix) else { continue };
            let value = String::from_utf8_lossy(&entry.value).into_owned();
            match rest.split_once('/') {
                Some(("members", node)) => {
                    view.known.insert(node.to_string());
                    if entry.session.is_some() {
                        view.members.insert(node.to_string(), value);
                    }
                }
                Some(("decommissioned", node)) => {
                    view.decommissioned.insert(node.to_string());
                }
                Some(("draining", node)) if entry.session.is_some() => {
                    view.draining.insert(node.to_string());
                }
                Some(("placement", p)) => match (p.parse::<u32>(), Placement::decode(&value)) {
                    (Ok(p), Some(placement)) => {
                        let Placement { replicas, target, claim } = placement;
                        let modify_index = entry.modify_index;
                        let ownership = PartitionOwnership { replicas, leader: None, target, claim, modify_index, leader_session: None };
                        view.partitions.insert(p, ownership);
                    }
                    _ => tracing::warn!(key = %entry.key, %value, "ignoring a placement this version cannot read"),
                },
                Some(("leaders", p)) if entry.session.is_some() => {
                    if let Ok(p) = p.parse::<u32>() {
                        leaders.insert(p, ((value, entry.lock_index), entry.session.clone()));
                    }
                }
                _ => {}
            }
        }
        for (p, (leader, session)) in leaders {
            if let Some(ownership) = view.partitions.get_mut(&p) {
                ownership.leader = Some(leader);
                ownership.leader_session = session;
            }
        }
        // A hand-back lasts as long as this session serves the partition.
        let mut handing_back = self.handing_back.lock();
        handing_back.retain(|p| view.serving_here(*p, &self.config.node).is_some());
        view.handing_back = handing_back.clone();
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
        // Once node-2 has been live for SETTLE_TTLS TTLs, its leaders hand its partitions back
        // (one per round each, each once its handover is ready), in a higher epoch still:
        // leadership spreads as placement does.
        let first_leads = |v: &ClusterView| v.partitions.values().all(|o| o.leader.as_ref().is_some_and(|(l, _)| *l == o.replicas[0]));
        let settled = rounds_until(&mut [&mut a, &mut b, &mut c], 120, |_, _| true, first_leads).await;
        for (p, o) in &settled.partitions {
            let (leader, epoch) = o.leader.clone().unwrap_or_else(|| panic!("partition {p} has no leader"));
            assert_eq!(leader, o.replicas[0], "partition {p}");
            if lost.contains_key(p) {
                assert_eq!(epoch, 3, "partition {p}: handed back in a higher epoch");
            }
        }
        let quiet = settled.index;
        assert_eq!(rounds(&mut [&mut a, &mut b, &mut c], 2).await.index, quiet, "nothing moves once every partition is back");
    }

    #[tokio::test(start_paused = true)]
    async fn given_fewer_members_than_the_replication_factor_then_no_placement_is_written() {
        let store = Arc::new(MemoryStore::default());
        let (mut a, mut b) = (elector(&store, "node-1"), elector(&store, "node-2"));
        let view = rounds(&mut [&mut a, &mut b], 2).await;
        assert_eq!(view.members.len(), 2);
        assert!(view.partitions.is_empty());
    }

    #[test]
    fn placements_read_back_what_they_wrote_and_a_bare_list_is_a_first_placement() {
        let moving = Placement { replicas: vec!["a".into(), "b".into()], target: vec!["c".into(), "b".into()], claim: 7 };
        assert_eq!(Placement::decode(&moving.encode()), Some(moving));
        let first = Placement::decode("a,b,c").unwrap();
        assert_eq!((first.replicas.len(), first.target.len(), first.claim), (3, 0, 0));
        assert_eq!(Placement::decode("a,b;claim=x"), None);
        assert_eq!(Placement::decode("a,b;colour=red"), None);
    }

    /// Rounds until `done` holds for the view (at most `max`); the handover of every partition
    /// whose leader has a target (`ClusterView::target_for`: a draining leader's is its own set)
    /// is reported ready by its leader when `ready` says so.
    async fn rounds_until(
        electors: &mut [&mut Elector<MemoryStore>],
        max: usize,
        ready: impl Fn(&ClusterView, u32) -> bool,
        done: impl Fn(&ClusterView) -> bool,
    ) -> ClusterView {
        let mut view = ClusterView::default();
        for _ in 0..max {
            for e in electors.iter_mut() {
                view = e.round().await.unwrap();
                for (p, o) in &view.partitions {
                    let target = view.target_for(*p, &e.config.node);
                    if let Some((leader, epoch)) = o.serving_leader()
                        && leader == e.config.node
                        && !target.is_empty()
                        && ready(&view, *p)
                    {
                        e.handovers().report(*p, epoch, target);
                    }
                }
            }
            if done(&view) {
                return view;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("not done after {max} rounds: {view:#?}");
    }

    #[tokio::test(start_paused = true)]
    async fn given_a_decommissioned_member_then_each_of_its_partitions_targets_a_live_member_and_switches_when_its_leader_is_ready() {
        let store = Arc::new(MemoryStore::default());
        let (mut a, mut b, mut c, mut d) =
            (elector(&store, "node-1"), elector(&store, "node-2"), elector(&store, "node-3"), elector(&store, "node-4"));
        let before = rounds(&mut [&mut a, &mut b, &mut c, &mut d], 2).await;
        assert!(
            before.partitions.values().all(|o| o.leader.as_ref().is_some_and(|(_, e)| *e == o.claim)),
            "every leader claimed: {before:#?}"
        );
        let holding: Vec<u32> =
            before.partitions.iter().filter(|(_, o)| o.replicas.contains(&"node-2".to_string())).map(|(p, _)| *p).collect();
        assert!(!holding.is_empty());
        store.put("anthill/decommissioned/node-2", b"", Cas::Any).await.unwrap();
        // Nobody reports ready: the targets are written and nothing switches.
        let targeted = rounds(&mut [&mut a, &mut b, &mut c, &mut d], 3).await;
        for (p, o) in &targeted.partitions {
            if holding.contains(p) {
                assert_eq!(o.replicas, before.partitions[p].replicas, "partition {p} switched before its handover was ready");
                assert!(o.target.len() == 3 && !o.target.contains(&"node-2".to_string()), "partition {p}: {o:?}");
            } else {
                assert!(o.target.is_empty(), "partition {p} moves without cause: {o:?}");
            }
        }
        let after = rounds_until(
            &mut [&mut a, &mut b, &mut c, &mut d],
            20,
            |_, _| true,
            |v| {
                v.partitions
                    .values()
                    .all(|o| o.target.is_empty() && !o.replicas.contains(&"node-2".to_string()) && o.serving_leader().is_some())
            },
        )
        .await;
        for p in &holding {
            let (o, was) = (&after.partitions[p], &before.partitions[p]);
            let (leader, epoch) = o.serving_leader().unwrap();
            assert!(o.replicas.contains(&leader.to_string()), "partition {p}: {o:?}");
            assert!(epoch > was.leader.as_ref().unwrap().1, "partition {p}: the new set leads in a higher epoch: {o:?}");
            let kept = was.replicas.iter().filter(|r| *r != "node-2").count();
            assert_eq!(
                o.replicas.iter().filter(|r| was.replicas.contains(r)).count(),
                kept,
                "only node-2's place changed: {was:?} -> {o:?}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn given_a_draining_node_then_its_leaderships_move_only_once_ready_it_takes_none_back_and_leads_again_once_undrained() {
        let store = Arc::new(MemoryStore::default());
        let (mut a, mut b, mut c) = (elector(&store, "node-1"), elector(&store, "node-2"), elector(&store, "node-3"));
        let before = rounds(&mut [&mut a, &mut b, &mut c], 2).await;
        let led = before.led_by("node-1");
        assert!(!led.is_empty());
        a.drain_switch().set(true);
        // Nobody reports ready: node-1 keeps its locks; its target is its own set, in its view
        // and nobody else's, and no placement is written.
        let waiting = rounds(&mut [&mut a, &mut b, &mut c], 3).await;
        assert_eq!(waiting.draining, BTreeSet::from(["node-1".to_string()]));
        assert_eq!(waiting.led_by("node-1"), led);
        // (A target is a node's own: `serving_here` compares the lock's session with the view's.)
        let (seen_a, seen_b, seen_c) = (a.round().await.unwrap(), b.round().await.unwrap(), c.round().await.unwrap());
        for (p, o) in &seen_a.partitions {
            // The successor (the first replica that does not drain) first, then the others.
            let successor = o.replicas.iter().find(|r| *r != "node-1").unwrap();
            let mut own = vec![successor.clone()];
            own.extend(o.replicas.iter().filter(|r| *r != successor).cloned());
            let own = if led.contains_key(p) { own } else { Vec::new() };
            assert_eq!(seen_a.target_for(*p, "node-1"), own, "partition {p}");
            assert!(o.target.is_empty() && seen_b.target_for(*p, "node-2").is_empty() && seen_c.target_for(*p, "node-3").is_empty());
        }
        // Ready: each lock goes to the first member of the set that does not drain, in a higher
        // epoch, and the set stays as it was.
        let all = &mut [&mut a, &mut b, &mut c];
        let served = |v: &ClusterView| v.partitions.values().all(|o| o.serving_leader().is_some());
        let drained = rounds_until(all, 20, |_, _| true, |v| v.led_by("node-1").is_empty() && served(v)).await;
        for (p, epoch) in &led {
            let o = &drained.partitions[p];
            let (leader, e) = o.serving_leader().unwrap();
            assert_eq!(Some(leader), o.replicas.iter().find(|r| *r != "node-1").map(String::as_str), "partition {p}");
            assert!(e > *epoch, "partition {p}: {o:?}");
            assert_eq!(o.replicas, before.partitions[p].replicas, "partition {p}: only the leadership moves");
        }
        // However long it stays live, nothing comes back to it while it drains.
        assert!(rounds(&mut [&mut a, &mut b, &mut c], 12).await.led_by("node-1").is_empty());
        // Undrained: the partitions whose sets name it first come back to it.
        a.drain_switch().set(false);
        let first_leads = |v: &ClusterView| v.partitions.values().all(|o| o.leader.as_ref().is_some_and(|(l, _)| *l == o.replicas[0]));
        let back = rounds_until(&mut [&mut a, &mut b, &mut c], 120, |_, _| true, first_leads).await;
        assert!(back.draining.is_empty());
        for (p, o) in &back.partitions {
            assert_eq!(o.leader.as_ref().map(|(l, _)| l), Some(&o.replicas[0]), "partition {p}");
        }
        // The mark lives with the process: drained again, then stopped, it drains no more.
        a.drain_switch().set(true);
        assert!(a.round().await.unwrap().draining.contains("node-1"));
        a.resign().await.unwrap();
        assert!(b.round().await.unwrap().draining.is_empty());
    }

    #[test]
    fn the_preferred_replica_is_the_first_live_one_that_does_not_drain_or_else_the_first_live_one() {
        let names = |list: &[&str]| list.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        let mut view = ClusterView::default();
        for m in ["a", "b", "c"] {
            view.members.insert(m.into(), String::new());
        }
        view.draining = BTreeSet::from(["a".to_string()]);
        let set = names(&["d", "a", "b", "c"]);
        assert_eq!(view.preferred(&set).map(String::as_str), Some("b"), "d is not live, a drains");
        view.draining.extend(names(&["b", "c"]));
        assert_eq!(view.preferred(&set).map(String::as_str), Some("a"), "every live member drains");
        view.members.clear();
        assert_eq!(view.preferred(&set), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_handover_reported_for_an_epoch_a_later_leader_claimed_does_not_switch() {
        let store = Arc::new(MemoryStore::default());
        let (mut a, mut b, mut c, mut d) =
            (elector(&store, "node-1"), elector(&store, "node-2"), elector(&store, "node-3"), elector(&store, "node-4"));
        rounds(&mut [&mut a, &mut b, &mut c, &mut d], 2).await;
        store.put("anthill/decommissioned/node-3", b"", Cas::Any).await.unwrap();
        let view = rounds(&mut [&mut a, &mut b, &mut c, &mut d], 2).await;
        let (p, o) = view
            .partitions
            .iter()
            .find(|(_, o)| !o.target.is_empty() && o.leader.as_ref().unwrap().0 == "node-1")
            .expect("node-1 leads a moving partition");
        let (p, epoch) = (*p, o.leader.as_ref().unwrap().1);
        // node-1's handover is ready as of this view, but its switch is delayed (a slow
        // process, a write stuck in the network) while its session expires and another node
        // claims the partition in a later epoch.
        let (o, session) = (o.clone(), a.session.clone().unwrap());
        let later = rounds(&mut [&mut b, &mut c, &mut d], 8).await;
        let (leader, later_epoch) =
            later.partitions[&p].serving_leader().map(|(l, e)| (l.to_string(), e)).expect("a new leader claimed it");
        assert!(leader != "node-1" && later_epoch > epoch);
        a.handovers().report(p, epoch, o.target.clone());
        a.lead(&view, &session, &BTreeSet::new()).await.unwrap();
        let after = b.round().await.unwrap();
        assert_eq!(after.partitions[&p].replicas, o.replicas, "a deposed leader's late handover switched the set");
        assert_eq!(after.partitions[&p].claim, later_epoch);
        // Its own leadership (the control): a report in the current epoch switches.
        let (later_leader, o) = (later.partitions[&p].leader.clone().unwrap(), later.partitions[&p].clone());
        let mut electors = [b, c, d];
        let e = electors.iter_mut().find(|e| e.config.node == later_leader.0).unwrap();
        e.handovers().report(p, later_epoch, o.target.clone());
        let switched = e.round().await.unwrap();
        assert!(same_set(&switched.partitions[&p].replicas, &o.target), "{:?}", switched.partitions[&p]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_node_restarted_while_its_old_session_holds_its_locks_serves_none_of_them_until_a_new_epoch() {
        let store = Arc::new(MemoryStore::default());
        let (mut a, mut b, mut c) = (elector(&store, "node-1"), elector(&store, "node-2"), elector(&store, "node-3"));
        rounds(&mut [&mut a, &mut b, &mut c], 2).await;
        let before = a.round().await.unwrap();
        let led = before.led_by("node-1");
        assert!(!led.is_empty() && led.keys().all(|p| before.serving_here(*p, "node-1").is_some()), "its current session serves them");
        // node-1's process restarts: a new elector, a new session; the old one still holds the locks.
        let mut a = elector(&store, "node-1");
        let restarted = a.round().await.unwrap();
        for (p, epoch) in &led {
            assert_eq!(restarted.partitions[p].leader.as_ref().map(|(_, e)| *e), Some(*epoch), "the old session's lock");
            assert_eq!(restarted.serving_here(*p, "node-1"), None, "partition {p} served again in epoch {epoch} by a new process");
        }
        // Once the old session expires, each of them gets a higher epoch.
        let after = rounds(&mut [&mut a, &mut b, &mut c], 8).await;
        for (p, epoch) in &led {
            let (leader, now) = after.partitions[p].serving_leader().unwrap();
            assert!(now > *epoch, "partition {p} led by {leader} in {now}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_target_whose_newcomer_goes_down_is_dropped_and_written_again_when_it_is_back() {
        let store = Arc::new(MemoryStore::default());
        let (mut a, mut b, mut c) = (elector(&store, "node-1"), elector(&store, "node-2"), elector(&store, "node-3"));
        rounds(&mut [&mut a, &mut b, &mut c], 2).await;
        // node-4 joins: sets that now want it get a target naming it.
        let mut d = elector(&store, "node-4");
        let joined = rounds(&mut [&mut a, &mut b, &mut c, &mut d], 2).await;
        let moving: Vec<u32> =
            joined.partitions.iter().filter(|(_, o)| o.target.contains(&"node-4".to_string())).map(|(p, _)| *p).collect();
        assert!(!moving.is_empty(), "{joined:#?}");
        // node-4 stops before any handover: once its session expires, those targets go.
        let gone = rounds(&mut [&mut a, &mut b, &mut c], 8).await;
        assert!(gone.partitions.values().all(|o| o.target.is_empty()), "{gone:#?}");
        let mut d = elector(&store, "node-4");
        let back = rounds(&mut [&mut a, &mut b, &mut c, &mut d], 2).await;
        let again: Vec<u32> = back.partitions.iter().filter(|(_, o)| o.target.contains(&"node-4".to_string())).map(|(p, _)| *p).collect();
        assert_eq!(again, moving);
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
