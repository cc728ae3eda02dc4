//! The embedded coordination store's core: [`KvState`] replicated by a Raft group of the
//! cluster's nodes, so 1 to 12 servers need no external service.
//!
//! Consensus is tikv's `raft` crate (raft-rs), not a hand-written algorithm: it is sans-IO
//! (messages, ticks and storage in; messages, entries to persist and committed entries out),
//! has run in TiKV's production for years, and a deterministic simulator can drive it.
//! (`openraft` was the other candidate; it owns its runtime and I/O, which the simulator of
//! issue 5 would have to fake.)
//!
//! Every operation ([`Op`]) is a Raft entry; every node applies the committed entries in order
//! to its own `KvState`, which is deterministic, so all nodes hold the same store and compute
//! the same outcomes. The node that proposed an operation reports its outcome to the caller
//! ([`RaftKv::take_outcomes`]). The leader proposes a [`Op::Tick`] now and then so sessions
//! expire even when nobody writes.
//!
//! Time comes from the Raft leader alone, as in Consul: only its `Tick` and `RenewAll` carry
//! its clock; every other operation is stamped 0 (the store's clock stays where the leader
//! put it). A member with a clock far ahead therefore cannot expire everyone's sessions; a new
//! leader whose clock is ahead gives every session at least half a TTL from its time first
//! (`RenewAll`), time for a live owner to renew; one whose clock is behind only makes sessions
//! live longer until it catches up, and the epochs fence a holder that lived too long
//! (docs/replication.md).
//!
//! This type is the state machine and its Raft node; `driver.rs` is its shell (the Raft log in
//! LMDB via `raft_log.rs`, the gRPC transport, proposals from async callers with timeouts).
//!
//! Determinism: raft-rs randomizes election timeouts with a thread-local RNG. With
//! `max_election_tick = min_election_tick + 1` the timeout is fixed; the shell (or the simulator,
//! from its seed) jitters when it ticks each node instead, which breaks ties just as well.

use std::collections::BTreeMap;

use raft::eraftpb::{EntryType, Message};
use raft::{Config, RawNode, StateRole};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::raft_log::RaftLog;
use super::state::{KvState, Op, Outcome};

/// How election timeouts are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Elections {
    /// raft-rs draws each timeout from a thread-local RNG (production: ties are broken by chance).
    Randomized,
    /// Every timeout is the same; whoever drives the node must jitter its ticks to break ties
    /// (simulations, which must replay exactly).
    Fixed,
}

/// Names a Raft member (raft-rs ids are non-zero).
pub type RaftId = u64;

#[derive(Debug, Error)]
pub enum RaftKvError {
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    #[error("no leader is known yet; retry shortly")]
    NoLeader,
    /// The group's leader changed while the proposal waited: it may have been lost with the old
    /// leader (or may still apply). Proposing again at once beats waiting out its timeout.
    #[error("the coordination group changed leaders; retry")]
    LeaderChanged,
}

/// A Raft entry's payload.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Proposal {
    /// The proposing node, its incarnation and its counter: who reports the outcome, and to
    /// which caller. After a restart the node re-applies its own old entries; their incarnation
    /// is not its current one, so their outcomes are not mistaken for new proposals'.
    pub(crate) origin: RaftId,
    pub(crate) incarnation: u64,
    pub(crate) id: u64,
    pub(crate) now_ms: u64,
    pub(crate) op: Op,
}

pub struct RaftKv {
    id: RaftId,
    incarnation: u64,
    node: RawNode<RaftLog>,
    state: KvState,
    next_proposal: u64,
    outcomes: Vec<(u64, Outcome)>,
    /// The index of the last entry applied to `state`.
    applied: u64,
    /// Applied entries between snapshots (log compaction, `raft_log.rs`).
    compact_every: u64,
    /// The index of the latest snapshot.
    snapshot_index: u64,
    /// Snapshots received from a leader and installed.
    installed: u64,
    /// The voters this member's configuration names: as the leader, it adds those the group
    /// lacks, one at a time ([`RaftKv::want_voters`]).
    wanted_voters: Vec<RaftId>,
    /// The cluster's key prefix: a member under `{prefix}decommissioned/` is not added, and
    /// leaves the group once no placement names it ([`RaftKv::set_prefix`]).
    prefix: String,
    /// Members' names from this member's configuration: the id of a decommissioned member
    /// whose key holds none.
    names: BTreeMap<String, RaftId>,
}

/// Applied entries between two snapshots of a member's state, after which its log drops the
/// entries before the latest: at a few entries a second, about an hour's worth.
pub const COMPACT_EVERY: u64 = 10_000;

/// Ticks between a leader's heartbeats, and before a follower calls an election.
pub const HEARTBEAT_TICKS: usize = 2;
pub const ELECTION_TICKS: usize = 6;

impl RaftKv {
    /// A member of a group of `members` (ids, `id` among them), starting empty. `incarnation`
    /// must differ each time the node starts (e.g. a random number, or the simulator's).
    /// In memory, with fixed election timeouts (see [`Elections`]).
    pub fn new(id: RaftId, members: &[RaftId], incarnation: u64) -> Result<Self, RaftKvError> {
        Self::open(id, RaftLog::in_memory(members), incarnation, Elections::Fixed)
    }

    /// Starts from `storage` (a fresh log, or what a crash left on disk), re-applying its
    /// committed entries to an empty state.
    pub fn restart(id: RaftId, storage: RaftLog, incarnation: u64) -> Result<Self, RaftKvError> {
        Self::open(id, storage, incarnation, Elections::Fixed)
    }

    pub fn open(id: RaftId, storage: RaftLog, incarnation: u64, elections: Elections) -> Result<Self, RaftKvError> {
        // A compacted log starts from its snapshot: the state as of the snapshot's index.
        let (state, applied) = match storage.latest_snapshot() {
            Some(snapshot) => (decode_snapshot(&snapshot)?, snapshot.get_metadata().index),
            None => (KvState::default(), 0),
        };
        let config = Config {
            id,
            election_tick: ELECTION_TICKS,
            heartbeat_tick: HEARTBEAT_TICKS,
            min_election_tick: ELECTION_TICKS,
            max_election_tick: match elections {
                Elections::Fixed => ELECTION_TICKS + 1,
                Elections::Randomized => 2 * ELECTION_TICKS,
            },
            applied,
            pre_vote: true,
            check_quorum: true,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            ..Config::default()
        };
        config.validate()?;
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let node = RawNode::new(&config, storage, &logger)?;
        Ok(RaftKv {
            id,
            incarnation,
            node,
            state,
            next_proposal: 1,
            outcomes: Vec::new(),
            applied,
            compact_every: COMPACT_EVERY,
            snapshot_index: applied,
            installed: 0,
            wanted_voters: Vec::new(),
            prefix: String::new(),
            names: BTreeMap::new(),
        })
    }

    /// The voters this member's configuration names (`cluster.members`). While it leads, a
    /// member adds each one the group lacks as a voter, one configuration change at a time
    /// (Raft's single-server change: any two majorities of consecutive configurations overlap).
    /// Nothing is ever removed this way: during a rolling change of the configuration files an
    /// old file must not undo a new one.
    pub fn want_voters(&mut self, voters: &[RaftId]) {
        self.wanted_voters = voters.to_vec();
    }

    /// The cluster's key prefix in the store. A member decommissioned there
    /// (`{prefix}decommissioned/{name}`, its value the member's Raft id) is not added, and once
    /// no placement (`{prefix}placement/`) names it any more, the leader removes it from the
    /// group if the voters left still hold a majority of live ones. A leader leaving the group
    /// hands its leadership to another voter first. `anthill decommission --undo` lets it back
    /// in, as a learner first. The ids come from the store, not from this member's
    /// configuration, so a configuration that no longer lists the member changes nothing.
    pub fn set_prefix(&mut self, prefix: &str, names: BTreeMap<String, RaftId>) {
        self.prefix = prefix.to_string();
        self.names = names;
    }

    /// Decommissioned members: Raft id to name.
    fn decommissioned(&self) -> BTreeMap<RaftId, String> {
        if self.prefix.is_empty() {
            return BTreeMap::new();
        }
        let prefix = format!("{}decommissioned/", self.prefix);
        self.state
            .list(&prefix)
            .into_iter()
            .filter_map(|e| {
                let name = e.key.strip_prefix(&prefix)?.to_string();
                // A key without an id (written by a node that did not list the member): the id
                // this member's configuration gives the name, if any.
                let id = String::from_utf8_lossy(&e.value).trim().parse::<RaftId>().ok().or_else(|| self.names.get(&name).copied())?;
                Some((id, name))
            })
            .collect()
    }

    /// Whether a placement names `name` (in its set or its target; an unreadable one counts).
    fn placed(&self, name: &str) -> bool {
        let name = name.to_string();
        self.state.list(&format!("{}placement/", self.prefix)).iter().any(|entry| {
            super::election::Placement::decode(&String::from_utf8_lossy(&entry.value))
                .is_none_or(|p| p.replicas.contains(&name) || p.target.contains(&name))
        })
    }

    /// The group's voters as this member last applied them.
    pub fn voters(&self) -> Vec<RaftId> {
        let mut voters = raft::Storage::initial_state(self.node.store()).map(|s| s.conf_state.voters).unwrap_or_default();
        voters.sort_unstable();
        voters
    }

    /// As the leader with no configuration change in flight, takes the next step in shaping the
    /// group (at most one change at a time):
    /// 1. a leader no longer among the voters (it applied its own removal) hands its leadership
    ///    to a voter: raft-rs would let it lead on, dropping every proposal;
    /// 2. the first wanted member the group lacks (not decommissioned) is added as a *learner*
    ///    (it gets the log, it does not count), and promoted to voter once it holds everything
    ///    committed and answers: a member not running yet never enlarges the majority;
    /// 3. a decommissioned member no placement names leaves: other members before this leader,
    ///    silent ones first, and a voter only if the voters left still hold a majority of live
    ///    ones; this leader leaves last, after handing its leadership over.
    fn add_missing_voter(&mut self) {
        if !self.is_leader() || self.node.raft.has_pending_conf() || self.node.raft.lead_transferee.is_some() {
            return;
        }
        let conf = raft::Storage::initial_state(self.node.store()).map(|s| s.conf_state).unwrap_or_default();
        if !conf.voters.contains(&self.id) {
            // Not a transfer: its target could be dead, and raft-rs would retry it for ever. A
            // follower that is no voter never campaigns; the voters elect one of them.
            tracing::info!("no longer a voter of the coordination group: stepping down");
            let term = self.node.raft.term;
            self.node.raft.become_follower(term, raft::INVALID_ID);
            return;
        }
        let decommissioned = self.decommissioned();
        if self.add_or_promote(&conf, &decommissioned) {
            return;
        }
        self.remove_decommissioned(&conf, &decommissioned);
    }

    /// Step 2 of [`RaftKv::add_missing_voter`]; whether it proposed a change.
    fn add_or_promote(&mut self, conf: &raft::eraftpb::ConfState, decommissioned: &BTreeMap<RaftId, String>) -> bool {
        let committed = self.node.raft.raft_log.committed;
        let caught_up = |kv: &Self, id: RaftId| kv.node.raft.prs().get(id).is_some_and(|p| p.matched >= committed && p.recent_active);
        let wanted: Vec<RaftId> =
            self.wanted_voters.iter().copied().filter(|id| !conf.voters.contains(id) && !decommissioned.contains_key(id)).collect();
        let step = wanted.iter().find_map(|&id| {
            if !conf.learners.contains(&id) {
                Some((id, raft::eraftpb::ConfChangeType::AddLearnerNode))
            } else if caught_up(self, id) {
                Some((id, raft::eraftpb::ConfChangeType::AddNode))
            } else {
                None
            }
        });
        let Some((member, change_type)) = step else { return false };
        self.propose_change(member, change_type, conf)
    }

    /// Step 3 of [`RaftKv::add_missing_voter`].
    fn remove_decommissioned(&mut self, conf: &raft::eraftpb::ConfState, decommissioned: &BTreeMap<RaftId, String>) {
        let leaving: Vec<RaftId> = decommissioned
            .iter()
            .filter(|(id, name)| (conf.voters.contains(id) || conf.learners.contains(id)) && !self.placed(name))
            .map(|(id, _)| *id)
            .collect();
        let active = |kv: &Self, id: RaftId| id == kv.id || kv.node.raft.prs().get(id).is_some_and(|p| p.recent_active);
        // Learners first (they count for nothing), then silent voters, then live ones.
        let mut order: Vec<RaftId> = leaving.iter().copied().filter(|id| *id != self.id).collect();
        order.sort_by_key(|id| (conf.voters.contains(id), active(self, *id)));
        for member in order {
            if conf.learners.contains(&member) {
                self.propose_change(member, raft::eraftpb::ConfChangeType::RemoveNode, conf);
                return;
            }
            let rest: Vec<RaftId> = conf.voters.iter().copied().filter(|v| *v != member).collect();
            let live = rest.iter().filter(|v| active(self, **v)).count();
            if !rest.is_empty() && live > rest.len() / 2 {
                self.propose_change(member, raft::eraftpb::ConfChangeType::RemoveNode, conf);
                return;
            }
        }
        if leaving.contains(&self.id) {
            let committed = self.node.raft.raft_log.committed;
            let to = conf.voters.iter().copied().find(|v| {
                *v != self.id
                    && !decommissioned.contains_key(v)
                    && self.node.raft.prs().get(*v).is_some_and(|p| p.matched >= committed && p.recent_active)
            });
            if let Some(to) = to {
                tracing::info!(to, "handing the coordination group's leadership over before leaving it");
                self.node.transfer_leader(to);
            }
        }
    }

    /// Proposes one change of the group; whether raft-rs took it.
    fn propose_change(&mut self, member: RaftId, change_type: raft::eraftpb::ConfChangeType, conf: &raft::eraftpb::ConfState) -> bool {
        let change = raft::eraftpb::ConfChange { change_type, node_id: member, ..Default::default() };
        match self.node.propose_conf_change(Vec::new(), change) {
            Ok(()) => {
                tracing::info!(member, ?change_type, voters = ?conf.voters, learners = ?conf.learners, "changing the coordination group");
                true
            }
            Err(e) => {
                tracing::debug!(member, error = %e, "cannot propose a change of the coordination group now");
                false
            }
        }
    }

    /// Takes a snapshot every `entries` applied entries instead of [`COMPACT_EVERY`] (tests).
    pub fn set_compaction(&mut self, entries: u64) {
        self.compact_every = entries.max(1);
    }

    /// The index of the latest snapshot (0: never compacted).
    pub fn snapshot_index(&self) -> u64 {
        self.snapshot_index
    }

    /// How many snapshots this member installed from a leader.
    pub fn snapshots_installed(&self) -> u64 {
        self.installed
    }

    pub fn id(&self) -> RaftId {
        self.id
    }

    /// The store as this node has applied it.
    pub fn state(&self) -> &KvState {
        &self.state
    }

    /// The Raft storage (what is, or would be, on disk).
    pub fn storage(&self) -> &RaftLog {
        self.node.store()
    }

    pub fn is_leader(&self) -> bool {
        self.node.raft.state == StateRole::Leader
    }

    pub fn leader(&self) -> Option<RaftId> {
        let leader = self.node.raft.leader_id;
        (leader != raft::INVALID_ID).then_some(leader)
    }

    pub fn applied(&self) -> u64 {
        self.applied
    }

    pub fn tick(&mut self) {
        self.node.tick();
        self.add_missing_voter();
    }

    pub fn step(&mut self, message: Message) -> Result<(), RaftKvError> {
        Ok(self.node.step(message)?)
    }

    /// Proposes `op`; returns the id its outcome will be reported under, once committed and
    /// applied here. A proposal can be lost (leader change): the caller times out. `now_ms` is
    /// kept only for the leader's `Tick` and `RenewAll` (module doc: time comes from the leader).
    pub fn propose(&mut self, op: Op, now_ms: u64) -> Result<u64, RaftKvError> {
        if self.leader().is_none() {
            return Err(RaftKvError::NoLeader);
        }
        let keeps_time = self.is_leader() && matches!(op, Op::Tick | Op::RenewAll);
        let now_ms = if keeps_time { now_ms } else { 0 };
        let id = self.next_proposal;
        self.next_proposal += 1;
        let proposal = Proposal { origin: self.id, incarnation: self.incarnation, id, now_ms, op };
        let data = serde_json::to_vec(&proposal).expect("a proposal serializes");
        self.node.propose(vec![], data)?;
        Ok(id)
    }

    /// Outcomes of this node's proposals applied since the last call: `(proposal id, outcome)`.
    pub fn take_outcomes(&mut self) -> Vec<(u64, Outcome)> {
        std::mem::take(&mut self.outcomes)
    }

    /// Persists what Raft asks for, applies what it committed, and returns the messages to send
    /// (raft-rs's `Ready` cycle). Storage writes here are to memory; the LMDB shell must make
    /// them durable before sending the messages that follow them.
    pub fn handle_ready(&mut self) -> Result<Vec<Message>, RaftKvError> {
        let mut out = Vec::new();
        if !self.node.has_ready() {
            return Ok(out);
        }
        let mut ready = self.node.ready();
        out.extend(ready.take_messages());
        if !ready.snapshot().is_empty() {
            // The leader's state replaces this member's (its log was behind the leader's).
            let snapshot = ready.snapshot().clone();
            let state = decode_snapshot(&snapshot)?;
            self.node.store().apply_snapshot(snapshot.clone())?;
            self.state = state;
            self.applied = snapshot.get_metadata().index;
            self.snapshot_index = self.applied;
            self.installed += 1;
        }
        let mut regrouped = self.apply(ready.take_committed_entries())?;
        if !ready.entries().is_empty() {
            self.node.store().append(ready.entries())?;
        }
        if let Some(hard_state) = ready.hs() {
            self.node.store().set_hardstate(hard_state.clone())?;
        }
        out.extend(ready.take_persisted_messages());
        let mut light = self.node.advance(ready);
        if let Some(commit) = light.commit_index() {
            self.node.store().set_commit(commit)?;
        }
        out.extend(light.take_messages());
        // After `advance`, as raft-rs asks of calls on the node.
        self.report_snapshots(&out);
        regrouped |= self.apply(light.take_committed_entries())?;
        self.node.advance_apply();
        // After a change of the group at once: a member added later gets the group from the
        // leader's latest snapshot (its own log starts empty), which must therefore name it.
        if regrouped || self.applied >= self.snapshot_index + self.compact_every {
            self.compact()?;
        }
        Ok(out)
    }

    /// Snapshots the state at the applied index and drops the log's entries before it.
    fn compact(&mut self) -> Result<(), RaftKvError> {
        let data = serde_json::to_vec(&self.state).map_err(|e| raft::Error::Store(raft::StorageError::Other(e.into())))?;
        let mut snapshot = raft::eraftpb::Snapshot { data: data.into(), ..Default::default() };
        let meta = snapshot.mut_metadata();
        meta.index = self.applied;
        meta.term = raft::Storage::term(self.node.store(), self.applied)?;
        meta.set_conf_state(raft::Storage::initial_state(self.node.store())?.conf_state);
        self.node.store().compact(snapshot)?;
        self.snapshot_index = self.applied;
        Ok(())
    }

    /// Applies committed entries; whether one changed the group.
    fn apply(&mut self, entries: Vec<raft::eraftpb::Entry>) -> Result<bool, RaftKvError> {
        let mut regrouped = false;
        for entry in entries {
            self.applied = entry.index;
            if matches!(entry.get_entry_type(), EntryType::EntryConfChange | EntryType::EntryConfChangeV2) {
                self.apply_conf_change(&entry)?;
                regrouped = true;
                continue;
            }
            // Empty entries are a new leader's no-op.
            if entry.data.is_empty() || entry.get_entry_type() != EntryType::EntryNormal {
                continue;
            }
            let proposal: Proposal = match serde_json::from_slice(&entry.data) {
                Ok(p) => p,
                Err(e) => {
                    // Every node skips it alike, so the states stay equal.
                    tracing::error!(index = entry.index, error = %e, "skipping an undecodable coordination entry");
                    continue;
                }
            };
            let outcome = self.state.apply(&proposal.op, proposal.now_ms);
            if proposal.origin == self.id && proposal.incarnation == self.incarnation {
                self.outcomes.push((proposal.id, outcome));
            }
        }
        Ok(regrouped)
    }

    /// A snapshot handed to the transport is reported sent at once: the follower's progress
    /// then probes after it, and if the snapshot was lost the probe is refused and the leader
    /// sends it again (raft-rs otherwise waits for a report forever).
    fn report_snapshots(&mut self, messages: &[Message]) {
        for m in messages.iter().filter(|m| m.get_msg_type() == raft::eraftpb::MessageType::MsgSnapshot) {
            self.node.report_snapshot(m.to, raft::SnapshotStatus::Finish);
        }
    }
}

impl RaftKv {
    /// A committed configuration change: raft-rs takes the new configuration, and the log keeps
    /// it (a restart starts from it; a snapshot carries it).
    fn apply_conf_change(&mut self, entry: &raft::eraftpb::Entry) -> Result<(), RaftKvError> {
        use protobuf::Message as _;
        let conf = if entry.get_entry_type() == EntryType::EntryConfChangeV2 {
            let change = raft::eraftpb::ConfChangeV2::parse_from_bytes(&entry.data).map_err(raft::Error::from)?;
            self.node.apply_conf_change(&change)?
        } else {
            let change = raft::eraftpb::ConfChange::parse_from_bytes(&entry.data).map_err(raft::Error::from)?;
            self.node.apply_conf_change(&change)?
        };
        // In memory now; on disk with the snapshot taken right after this cycle (a restart
        // before it replays this entry from the log, so the disk never names a group ahead of
        // what its snapshot and entries hold).
        self.node.store().set_conf_state(conf.clone())?;
        tracing::info!(index = entry.index, voters = ?conf.voters, learners = ?conf.learners, "the coordination group changed");
        Ok(())
    }
}

/// The store's state a snapshot carries.
pub(crate) fn decode_snapshot(snapshot: &raft::eraftpb::Snapshot) -> Result<KvState, RaftKvError> {
    serde_json::from_slice(&snapshot.data).map_err(|e| {
        let reason = format!("undecodable coordination snapshot at index {}: {e}", snapshot.get_metadata().index);
        RaftKvError::Raft(raft::Error::Store(raft::StorageError::Other(reason.into())))
    })
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};

    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::coordination::SessionId;

    const IDS: [RaftId; 3] = [1, 2, 3];

    struct Group {
        nodes: BTreeMap<RaftId, RaftKv>,
        /// Crashed members: their Raft logs stay on disk.
        down: Vec<RaftId>,
        dir: tempfile::TempDir,
        network: Vec<(u64, Message)>,
        rng: StdRng,
        step: u64,
        lossy: bool,
        incarnations: u64,
        /// Applied entries between snapshots (`None`: the production setting).
        compact_every: Option<u64>,
        /// Snapshots installed by members that have since crashed.
        installed: u64,
    }

    impl Group {
        fn new(seed: u64) -> Self {
            Self::compacting(seed, None)
        }

        fn compacting(seed: u64, compact_every: Option<u64>) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let mut g = Group {
                nodes: BTreeMap::new(),
                down: Vec::new(),
                dir,
                network: Vec::new(),
                rng: StdRng::seed_from_u64(seed),
                step: 0,
                lossy: true,
                incarnations: 0,
                compact_every,
                installed: 0,
            };
            for id in IDS {
                g.start(id, 0);
            }
            g
        }

        fn start(&mut self, id: RaftId, incarnation: u64) {
            let log = RaftLog::open(&self.dir.path().join(id.to_string()), &IDS).unwrap();
            let mut node = RaftKv::restart(id, log, incarnation).unwrap();
            if let Some(entries) = self.compact_every {
                node.set_compaction(entries);
            }
            self.nodes.insert(id, node);
        }

        fn run(&mut self, steps: u64) {
            for _ in 0..steps {
                self.step += 1;
                let ids: Vec<RaftId> = self.nodes.keys().copied().collect();
                for id in ids {
                    // Jittered ticking breaks election ties deterministically (module doc).
                    if self.rng.random_bool(0.7) {
                        self.nodes.get_mut(&id).unwrap().tick();
                    }
                    let messages = self.nodes.get_mut(&id).unwrap().handle_ready().unwrap();
                    for m in messages {
                        if self.lossy && self.rng.random_bool(0.05) {
                            continue;
                        }
                        let delay = if self.lossy { self.rng.random_range(1..4) } else { 1 };
                        self.network.push((self.step + delay, m));
                    }
                }
                let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.network).into_iter().partition(|(at, _)| *at <= self.step);
                self.network = later;
                for (_, m) in due {
                    if let Some(node) = self.nodes.get_mut(&m.to) {
                        let _ = node.step(m);
                    }
                }
            }
        }

        fn leader(&self) -> Option<RaftId> {
            self.nodes.values().find(|n| n.is_leader()).map(|n| n.id())
        }

        /// Proposes on `id` and runs until its outcome is applied there (or gives up).
        fn call(&mut self, id: RaftId, op: Op, now_ms: u64) -> Option<Outcome> {
            // Like a client retrying until the node knows a leader.
            for _ in 0..200 {
                if self.nodes.get(&id)?.leader().is_some() {
                    break;
                }
                self.run(1);
            }
            let proposal = self.nodes.get_mut(&id)?.propose(op, now_ms).ok()?;
            for _ in 0..200 {
                self.run(1);
                let outcomes = self.nodes.get_mut(&id)?.take_outcomes();
                if let Some((_, outcome)) = outcomes.into_iter().find(|(p, _)| *p == proposal) {
                    return Some(outcome);
                }
            }
            None
        }

        /// The process dies: only what its Raft log made durable survives.
        fn crash(&mut self, id: RaftId) {
            self.installed += self.nodes.remove(&id).unwrap().snapshots_installed();
            self.down.push(id);
        }

        fn restart(&mut self, id: RaftId) {
            self.down.retain(|d| *d != id);
            self.incarnations += 1;
            self.start(id, self.incarnations);
        }
    }

    #[test]
    fn given_three_members_then_one_leader_is_elected_and_proposals_apply_alike_everywhere() {
        let mut g = Group::new(1);
        g.run(100);
        let leader = g.leader().expect("a leader within 100 steps");
        let Some(Outcome::Session(session)) = g.call(leader, Op::CreateSession { node: "n1".into(), ttl_ms: 10_000 }, 0) else {
            panic!("no session")
        };
        let follower = IDS.into_iter().find(|id| *id != leader).unwrap();
        // A follower's proposal is forwarded to the leader and its outcome reported to it.
        let acquired = g.call(follower, Op::Acquire { key: "leaders/0".into(), value: b"n1".to_vec(), session: session.clone() }, 1);
        assert_eq!(acquired, Some(Outcome::Acquired(Some(1))));
        g.run(20);
        let states: Vec<&KvState> = g.nodes.values().map(|n| n.state()).collect();
        assert!(states.windows(2).all(|w| w[0] == w[1]), "replicas differ");
        assert_eq!(states[0].get("leaders/0").unwrap().session, Some(session));
    }

    /// Starts members `ids` as servers added to the running group (`cluster.join`): empty
    /// logs with no voters.
    fn join(g: &mut Group, ids: &[RaftId]) {
        for id in ids {
            let log = RaftLog::open(&g.dir.path().join(id.to_string()), &[]).unwrap();
            let mut node = RaftKv::restart(*id, log, 0).unwrap();
            if let Some(entries) = g.compact_every {
                node.set_compaction(entries);
            }
            g.nodes.insert(*id, node);
        }
    }

    fn want(g: &mut Group, voters: &[RaftId]) {
        for node in g.nodes.values_mut() {
            node.want_voters(voters);
        }
    }

    fn sessions(g: &mut Group, n: usize) {
        for i in 0..n {
            let leader = g.leader().expect("a leader");
            let outcome = g.call(leader, Op::CreateSession { node: format!("s{i}"), ttl_ms: 60_000 }, 0);
            assert!(matches!(outcome, Some(Outcome::Session(_))), "{outcome:?}");
        }
    }

    #[test]
    fn given_a_member_added_to_a_compacted_group_then_it_joins_as_a_learner_gets_a_snapshot_and_becomes_a_voter_that_counts() {
        let mut g = Group::compacting(5, Some(10));
        g.lossy = false;
        g.run(100);
        sessions(&mut g, 30);
        assert!(g.nodes[&1].snapshot_index() > 1, "the group compacted its log");
        join(&mut g, &[4]);
        g.run(50);
        assert!(g.leader() != Some(4) && IDS.iter().all(|id| g.nodes[id].voters() == [1, 2, 3]), "nobody wanted it yet");
        want(&mut g, &[1, 2, 3, 4]);
        g.run(300);
        for id in [1, 2, 3, 4] {
            assert_eq!(g.nodes[&id].voters(), [1, 2, 3, 4], "member {id}");
        }
        assert!(g.nodes[&4].snapshots_installed() >= 1, "the newcomer started from a snapshot");
        sessions(&mut g, 2);
        g.run(20);
        let leader = g.leader().unwrap();
        assert_eq!(g.nodes[&4].state(), g.nodes[&leader].state(), "the new member applies what the group commits");
        // Every member restarts from its disk and keeps the group it applied.
        for id in [1, 2, 3, 4] {
            g.crash(id);
        }
        for id in [1, 2, 3, 4] {
            g.restart(id);
        }
        g.run(200);
        assert!([1, 2, 3, 4].iter().all(|id| g.nodes[id].voters() == [1, 2, 3, 4]));
        // Member 4 counts: with 3 and 4 down, members 1 and 2 are a majority of the old group
        // but not of the new one, so nothing commits until 4 is back.
        g.crash(3);
        g.crash(4);
        g.run(50);
        assert!(g.call(1, Op::CreateSession { node: "n2".into(), ttl_ms: 10_000 }, 0).is_none(), "two of four voters committed");
        g.restart(4);
        assert!(matches!(g.call(1, Op::CreateSession { node: "n3".into(), ttl_ms: 10_000 }, 0), Some(Outcome::Session(_))));
    }

    #[test]
    fn given_a_wanted_member_that_is_not_running_then_it_stays_a_learner_and_the_group_keeps_its_majority() {
        let mut g = Group::new(6);
        g.lossy = false;
        g.run(100);
        want(&mut g, &[1, 2, 3, 4]);
        g.run(100);
        assert_eq!(g.nodes[&1].voters(), [1, 2, 3], "not promoted before it holds the log");
        // One of three down: the old majority still commits (a voter 4 that never answers
        // would have made it two of four).
        let leader = g.leader().unwrap();
        let other = IDS.into_iter().find(|id| *id != leader).unwrap();
        g.crash(other);
        sessions(&mut g, 1);
    }

    #[test]
    fn given_more_newcomers_than_founders_started_at_once_then_they_elect_nobody_until_added_and_the_group_stays_one() {
        let mut g = Group::new(7);
        g.run(100);
        let founders_leader = g.leader().unwrap();
        sessions(&mut g, 3);
        join(&mut g, &[4, 5, 6, 7]);
        g.run(300);
        assert!(g.nodes.values().filter(|n| n.is_leader()).count() == 1 && g.leader().is_some_and(|l| l <= 3), "a newcomer leads");
        want(&mut g, &[1, 2, 3, 4, 5, 6, 7]);
        g.run(1_500);
        for id in 1..=7 {
            assert_eq!(g.nodes[&id].voters(), [1, 2, 3, 4, 5, 6, 7], "member {id}");
        }
        sessions(&mut g, 2);
        g.run(50);
        let states: Vec<&KvState> = g.nodes.values().map(|n| n.state()).collect();
        assert!(states.windows(2).all(|w| w[0] == w[1]), "members differ");
        let _ = founders_leader;
    }

    fn put(g: &mut Group, key: &str, value: &str) {
        let leader = g.leader().expect("a leader");
        let op = Op::Put { key: key.into(), value: value.as_bytes().to_vec(), cas: crate::coordination::Cas::Any };
        assert_eq!(g.call(leader, op, 0), Some(Outcome::Done(true)));
    }

    #[test]
    fn given_a_decommissioned_member_then_it_leaves_the_group_once_no_placement_names_it_and_comes_back_when_let_in() {
        let mut g = Group::new(8);
        g.lossy = false;
        g.run(100);
        for node in g.nodes.values_mut() {
            node.want_voters(&IDS);
            node.set_prefix("anthill/", BTreeMap::new());
        }
        put(&mut g, "anthill/placement/0", "node-1,node-2,node-3");
        // The leader itself is decommissioned: it stays while a placement names it...
        let first = g.leader().unwrap();
        put(&mut g, &format!("anthill/decommissioned/node-{first}"), &first.to_string());
        g.run(100);
        assert!(g.nodes.values().all(|n| n.voters() == [1, 2, 3]), "removed while a placement names it");
        // ...and leaves once none does, handing its leadership over first.
        let rest: Vec<String> = IDS.iter().filter(|id| **id != first).map(|id| format!("node-{id}")).collect();
        put(&mut g, "anthill/placement/0", &rest.join(","));
        g.run(300);
        let left: Vec<RaftId> = IDS.into_iter().filter(|id| *id != first).collect();
        for id in &left {
            assert_eq!(g.nodes[id].voters(), left, "member {id}");
        }
        assert!(g.leader().is_some_and(|l| l != first), "a remaining member leads");
        sessions(&mut g, 1);
        // Undone: the member comes back, as a learner first.
        let leader = g.leader().unwrap();
        let op = Op::Delete { key: format!("anthill/decommissioned/node-{first}"), cas: crate::coordination::Cas::Any };
        assert_eq!(g.call(leader, op, 0), Some(Outcome::Done(true)));
        g.run(300);
        assert!(IDS.iter().all(|id| g.nodes[id].voters() == [1, 2, 3]), "let back in");
    }

    #[test]
    fn a_decommissioned_voter_leaves_only_if_the_voters_left_hold_a_majority_of_live_ones() {
        let mut g = Group::new(9);
        g.lossy = false;
        g.run(100);
        join(&mut g, &[4, 5]);
        for node in g.nodes.values_mut() {
            node.set_prefix("anthill/", BTreeMap::new());
        }
        want(&mut g, &[1, 2, 3, 4, 5]);
        g.run(400);
        assert!(g.nodes.values().all(|n| n.voters() == [1, 2, 3, 4, 5]));
        // 4 and 5 die; live node 1 (not the leader, say) is decommissioned. Removing it would
        // leave 2 and 3 alive of four voters: it stays, and the group goes on.
        g.crash(4);
        g.crash(5);
        g.run(50);
        let leader = g.leader().unwrap();
        let member = IDS.into_iter().find(|id| *id != leader).unwrap();
        put(&mut g, &format!("anthill/decommissioned/node-{member}"), &member.to_string());
        g.run(200);
        assert!(g.nodes.values().all(|n| n.voters() == [1, 2, 3, 4, 5]), "a live voter left while two were dead");
        sessions(&mut g, 1);
        // The dead ones decommissioned too: they go first (silent), then the live one.
        put(&mut g, "anthill/decommissioned/node-4", "4");
        put(&mut g, "anthill/decommissioned/node-5", "5");
        g.run(600);
        let left: Vec<RaftId> = IDS.into_iter().filter(|id| *id != member).collect();
        assert!(g.nodes.values().all(|n| n.voters() == left), "{:?}", g.nodes.values().map(|n| n.voters()).collect::<Vec<_>>());
        sessions(&mut g, 1);
    }

    #[test]
    fn given_a_member_whose_clock_runs_far_ahead_then_its_operations_expire_no_session() {
        let mut g = Group::new(3);
        g.run(100);
        let leader = g.leader().expect("a leader within 100 steps");
        let Some(Outcome::Session(session)) = g.call(leader, Op::CreateSession { node: "n1".into(), ttl_ms: 10_000 }, 1_000) else {
            panic!("no session")
        };
        assert!(g.call(leader, Op::Tick, 2_000).is_some());
        let skewed = IDS.into_iter().find(|id| *id != leader).unwrap();
        let an_hour_ahead = 2_000 + 3_600_000;
        assert!(g.call(skewed, Op::CreateSession { node: "n2".into(), ttl_ms: 10_000 }, an_hour_ahead).is_some());
        assert!(g.call(leader, Op::Tick, 3_000).is_some());
        g.run(20);
        for node in g.nodes.values() {
            assert_eq!(node.state().session_node(&session), Some("n1"), "the leader's clock says the session has 9 s left");
        }
        // The leader's own clock does expire it.
        assert!(g.call(leader, Op::Tick, 12_000).is_some());
        assert_eq!(g.nodes[&leader].state().session_node(&session), None);
    }

    /// Many sessions race for the same locks on every node while messages are lost and delayed
    /// and members crash and restart from their Raft storage: each lock index of each key is
    /// granted to at most one session, and every replica ends with the same state.
    #[test]
    fn under_loss_and_crashes_lock_epochs_are_granted_once_and_replicas_converge() {
        let (restarts, grants, _) = lock_storm(None);
        assert!(restarts >= 5 && grants >= 100, "the runs must crash members and grant locks: {restarts} restarts, {grants} grants");
    }

    /// The same storm with a snapshot every 25 applied entries: members restart from their
    /// snapshots, and members that fell behind the leader's compacted log install its snapshot.
    #[test]
    fn under_loss_crashes_and_compaction_lock_epochs_are_granted_once_and_replicas_converge() {
        let (restarts, grants, installed) = lock_storm(Some(25));
        assert!(restarts >= 5 && grants >= 100, "the runs must crash members and grant locks: {restarts} restarts, {grants} grants");
        assert!(installed > 0, "no member ever installed a leader's snapshot");
    }

    /// Runs the lock storm over 20 seeds; returns the restarts, the locks granted, and the
    /// snapshots installed.
    fn lock_storm(compact_every: Option<u64>) -> (u64, usize, u64) {
        let (mut restarts, mut grants, mut installed) = (0, 0, 0);
        for seed in 0..20 {
            let mut g = Group::compacting(seed, compact_every);
            g.run(60);
            let mut sessions: Vec<SessionId> = Vec::new();
            let mut granted: HashMap<(String, u64), SessionId> = HashMap::new();
            for round in 0..60u64 {
                let now = round * 100;
                // Time moves with the leader's ticks (module doc): sessions do expire.
                if let Some(leader) = g.leader()
                    && g.rng.random_bool(0.5)
                {
                    g.call(leader, Op::Tick, now);
                }
                let proposer = IDS[g.rng.random_range(0..IDS.len())];
                if !g.nodes.contains_key(&proposer) {
                    g.restart(proposer);
                    continue;
                }
                if sessions.len() < 6 || g.rng.random_bool(0.1) {
                    if let Some(Outcome::Session(s)) = g.call(proposer, Op::CreateSession { node: format!("n{round}"), ttl_ms: 2_000 }, now)
                    {
                        sessions.push(s);
                    }
                    continue;
                }
                let session = sessions[g.rng.random_range(0..sessions.len())].clone();
                let key = format!("leaders/{}", g.rng.random_range(0..3));
                let op = if g.rng.random_bool(0.3) {
                    Op::RenewSession { session: session.clone() }
                } else {
                    Op::Acquire { key: key.clone(), value: vec![], session: session.clone() }
                };
                let expected_kind = matches!(op, Op::Acquire { .. });
                let got = g.call(proposer, op, now);
                assert!(
                    got.is_none() || matches!(got, Some(Outcome::Acquired(_))) == expected_kind,
                    "seed {seed}: an outcome of another proposal: {got:?}"
                );
                if let Some(Outcome::Acquired(Some(epoch))) = got {
                    let holder = granted.entry((key.clone(), epoch)).or_insert(session.clone());
                    assert_eq!(*holder, session, "seed {seed}: epoch {epoch} of {key} granted to two sessions");
                }
                if g.down.is_empty() && g.rng.random_bool(0.05) {
                    let victim = IDS[g.rng.random_range(0..IDS.len())];
                    g.crash(victim);
                }
            }
            let down: Vec<RaftId> = g.down.clone();
            for id in down {
                g.restart(id);
            }
            g.lossy = false;
            g.run(300);
            let applied: Vec<u64> = g.nodes.values().map(|n| n.applied()).collect();
            assert!(applied.windows(2).all(|w| w[0] == w[1]), "seed {seed}: applied {applied:?}");
            let states: Vec<&KvState> = g.nodes.values().map(|n| n.state()).collect();
            assert!(states.windows(2).all(|w| w[0] == w[1]), "seed {seed}: replicas differ");
            assert!(!granted.is_empty(), "seed {seed}: no lock was ever granted");
            if compact_every.is_some() {
                assert!(g.nodes.values().all(|n| n.snapshot_index() > 0), "seed {seed}: a member never compacted");
            }
            restarts += g.incarnations;
            grants += granted.len();
            installed += g.installed + g.nodes.values().map(|n| n.snapshots_installed()).sum::<u64>();
        }
        (restarts, grants, installed)
    }
}
