//! One replica of one partition: the replication protocol as a sans-IO state machine.
//!
//! Inputs: leadership granted by the coordination store ([`Replica::become_leader`]), messages
//! from the other replicas, proposals of the serving leader, timer ticks, and the shell's report
//! that a batch of effects is durable. Outputs: [`Effect`]s, taken in batches with
//! [`Replica::take_effects`]. The same code runs in the node (the shell executes effects on
//! LMDB and gRPC) and in the simulator (effects on memory, messages through a seeded network).
//!
//! **The shell's contract.** Execute a batch's effects in order: persist the promise, truncate,
//! append; make all of it durable; only then send the batch's messages; then call
//! [`Replica::on_durable`] with the batch's ticket. Batches are executed in the order taken. A
//! crash may lose batches that were not yet durable, never part of one. Reads through
//! [`ReplicaLog`] are only made below the durable position, so they see executed entries only.
//!
//! The protocol (docs/replication.md has the safety argument):
//! - **Epochs and fencing.** Leadership of epoch `E` comes from the coordination store (its lock
//!   index), one leader per epoch. A replica durably *promises* the highest epoch it has seen and
//!   refuses (`Stale`) anything from a lower one, so a deposed leader can neither append nor count
//!   a majority.
//! - **Recovery.** A new leader asks every replica for its promise and its log (`Recover`). With
//!   a majority (itself included), it adopts the most advanced log of them — highest last epoch,
//!   then longest — truncating its own divergent suffix and fetching what it lacks, then appends
//!   a marker entry in its own epoch and serves.
//! - **Replication.** The leader sends entries after a `(prev_position, prev_epoch)` the follower
//!   must hold; a follower that does not replies with its epoch history and the leader resends
//!   from the logs' common prefix ([`super::epochs::common_prefix`]); a follower truncates only
//!   entries that conflict with the leader's.
//! - **Commit.** The leader's commit position is the highest position durable on a majority,
//!   but only once that position is in its own epoch (at or past its marker): entries of earlier
//!   epochs are committed by the marker after them (Raft's rule, which avoids its "figure 8").
//!   Committed entries are never truncated (asserted).
//! - **State transfer.** A log may no longer hold its oldest entries (retention trims what is
//!   committed; [`ReplicaLog::floor`]). A peer that needs them gets a [`Snapshot`] instead
//!   ([`Effect::SendSnapshot`]: the shell makes it): the sender's state through some durable
//!   position, standing for its log up to there, with the epochs of that log. The receiver
//!   replaces its log up to there with it ([`Effect::Install`]) and goes on after it.

use std::collections::{BTreeMap, VecDeque};

use super::epochs::common_prefix;
use super::message::{AppendOutcome, Message};
use super::{Entry, EntryKind, Epoch, EpochHistory, NodeId, Position, Snapshot};

/// Reads the local log for sending. The replica reads only durable positions.
pub trait ReplicaLog {
    /// At most `max` consecutive entries from `from` on (fewer at the end of the log). Never
    /// asked for positions at or below [`ReplicaLog::floor`].
    fn entries(&self, from: Position, max: usize) -> Vec<Entry>;
    /// The last position whose entry the log no longer holds (its state stands for it), 0 when
    /// it holds them all. Only committed entries are ever given up.
    fn floor(&self) -> Position;
}

#[derive(Debug, Clone)]
pub struct ReplicaConfig {
    pub me: NodeId,
    /// The replica set, `me` included.
    pub members: Vec<NodeId>,
    /// Most entries in one Append or FetchReply.
    pub max_batch_entries: usize,
    /// Most entries a follower may have been sent beyond what it acknowledged.
    pub max_inflight_entries: u64,
    /// Ticks without progress before a leader resends (and heartbeats) or a recovering leader
    /// asks again.
    pub resend_ticks: u32,
}

/// What a replica keeps on disk and starts again from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DurableState {
    pub promised: Epoch,
    pub history: EpochHistory,
    pub last: Position,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Persist the promised epoch (before any later message is sent).
    PersistPromise(Epoch),
    /// Drop every entry after this position.
    Truncate {
        after: Position,
    },
    /// Append these entries (consecutive, right after the log's last).
    Append(Vec<Entry>),
    /// Replace the log through the snapshot's position, and the state, with the snapshot: the
    /// log then holds nothing up to there (its floor) and ends there.
    Install(Snapshot),
    Send {
        to: NodeId,
        message: Message,
    },
    /// Make a snapshot of the local state (durable only, so never more than a crash keeps: at
    /// or past the durable position, and at or past the floor) and send it to `to` as `reply`
    /// says. A snapshot that cannot be made is not sent (the replica tries again later).
    SendSnapshot {
        to: NodeId,
        reply: SnapshotReply,
    },
    /// Every entry up to here is committed: durable on a majority, never to be undone.
    Committed(Position),
    /// This replica now leads `epoch`; its entries start at `start` (the marker).
    Serving {
        epoch: Epoch,
        start: Position,
    },
    /// This replica led (or was recovering) an epoch and learned of a higher one: uncommitted
    /// proposals of its epoch may be lost.
    SteppedDown {
        epoch: Epoch,
    },
}

/// How a snapshot travels ([`Effect::SendSnapshot`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotReply {
    /// In a [`Message::Snapshot`] from the leader of `epoch`.
    Leader { epoch: Epoch, commit: Position, round: u64 },
    /// In a [`Message::FetchReply`] of `epoch`, with the sender's durable position.
    Fetch { epoch: Epoch, last: Position },
}

impl SnapshotReply {
    /// The message that carries `snapshot` this way.
    pub fn message(self, snapshot: Snapshot) -> Message {
        match self {
            SnapshotReply::Leader { epoch, commit, round } => Message::Snapshot { epoch, snapshot, commit, round },
            SnapshotReply::Fetch { epoch, last } => Message::FetchReply { epoch, entries: Vec::new(), last, snapshot: Some(snapshot) },
        }
    }
}

/// A batch of effects and the ticket to report its durability with.
#[derive(Debug)]
pub struct Effects {
    pub ticket: u64,
    pub effects: Vec<Effect>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    Follower { leader: Option<NodeId> },
    Recovering { epoch: Epoch },
    Leader { epoch: Epoch, start: Position },
}

impl Progress {
    fn new(next: Position, voter: bool) -> Self {
        Progress { matched: 0, base: next - 1, next, idle_ticks: 0, round: 0, voter, snapshot_wait: 0, snapshot_floor: 0 }
    }
}

#[derive(Debug, Clone)]
struct Progress {
    /// Durable on the follower and matching this leader's log.
    matched: Position,
    /// Where the entries sent since the follower's log was last sized up start after: where
    /// its log parts from this leader's, as its recovery reply or a `Diverged` reply showed;
    /// else (no reply yet, or a learner) the leader's last entry before the marker (or its
    /// last). Not known to be durable there, so it never counts for commits; it only bounds
    /// what is in flight and where a resend starts. A follower that does not hold it says so
    /// (`Diverged`).
    base: Position,
    /// Next position to send.
    next: Position,
    idle_ticks: u32,
    /// The highest read round the follower echoed in this epoch.
    round: u64,
    /// A member of the replica set (counted for commits and reads), not a learner.
    voter: bool,
    /// Ticks to wait before another snapshot is sent (one is on its way).
    snapshot_wait: u32,
    /// The log's floor when the snapshot on its way was asked for: the follower holds it once
    /// it acknowledges a position past that.
    snapshot_floor: Position,
}

#[derive(Debug)]
enum Phase {
    Following {
        leader: Option<NodeId>,
        /// Highest position known to match the current leader's log.
        matched: Position,
    },
    Recovering {
        replies: BTreeMap<NodeId, (EpochHistory, Position)>,
        /// The replica fetched from, and how far its log goes.
        fetching: Option<(NodeId, Position)>,
        idle_ticks: u32,
        /// Fetches resent without an answer; past [`FETCH_RETRIES`] the source is taken as gone
        /// and recovery starts over with whichever majority answers.
        unanswered: u32,
    },
    Leading {
        start: Position,
        /// The members and the learners (the target set's newcomers).
        peers: BTreeMap<NodeId, Progress>,
        /// Taking no proposals: handing the partition over to the target set.
        paused: bool,
    },
}

/// Safety rules a test can switch off, one at a time, on its own thread, to prove the simulation
/// finds the violations that follow (`sim/replication.rs`). Compiled into test builds only.
pub mod rules {
    /// A replica refuses messages of an epoch lower than it promised.
    pub const FENCING: u32 = 1;
    /// A follower truncates its entries that conflict with the leader's.
    pub const TRUNCATION: u32 = 2;
    /// A recovering leader waits for a majority's logs.
    pub const RECOVERY_MAJORITY: u32 = 4;
    /// A recovering leader adopts the most advanced log of the majority.
    pub const ADOPT_MOST_ADVANCED: u32 = 8;

    #[cfg(test)]
    thread_local! {
        static OFF: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
    }

    /// Switches off `rules` on this thread (0: all on).
    #[cfg(test)]
    pub fn switch_off(rules: u32) {
        OFF.with(|off| off.set(rules));
    }

    #[cfg(test)]
    pub(super) fn off(rule: u32) -> bool {
        OFF.with(|off| off.get() & rule != 0)
    }

    #[cfg(not(test))]
    pub(super) fn off(_: u32) -> bool {
        false
    }
}

/// Unanswered fetches before a recovering leader gives up on its source.
const FETCH_RETRIES: u32 = 3;

/// A snapshot sent is given this many resend periods to be installed and acknowledged before
/// another is sent: a snapshot is large, and installing it takes longer than an append.
const SNAPSHOT_RESEND_PERIODS: u32 = 10;

pub struct Replica {
    config: ReplicaConfig,
    promised: Epoch,
    history: EpochHistory,
    last: Position,
    durable: Position,
    commit: Position,
    phase: Phase,
    effects: Vec<Effect>,
    next_ticket: u64,
    /// Leading: the latest read round (linearizable reads, [`Replica::read_index`]).
    round: u64,
    /// Following: the highest read round heard from the leader of the promised epoch.
    leader_round: u64,
    /// Taken batches not yet durable, with the log's last position as of each.
    pending: VecDeque<(u64, Position)>,
    /// The replica set the partition moves to ([`Replica::set_target`]); empty when none.
    target: Vec<NodeId>,
}

impl Replica {
    /// A replica starting from what it has on disk, as a follower of an unknown leader.
    pub fn new(config: ReplicaConfig, state: DurableState) -> Self {
        assert!(config.members.contains(&config.me), "the replica set must contain this replica");
        assert!(config.max_batch_entries > 0 && config.max_inflight_entries > 0 && config.resend_ticks > 0);
        Replica {
            config,
            promised: state.promised,
            history: state.history,
            last: state.last,
            durable: state.last,
            commit: 0,
            phase: Phase::Following { leader: None, matched: 0 },
            effects: Vec::new(),
            next_ticket: 1,
            round: 0,
            leader_round: 0,
            pending: VecDeque::new(),
            target: Vec::new(),
        }
    }

    pub fn role(&self) -> Role {
        match &self.phase {
            Phase::Following { leader, .. } => Role::Follower { leader: *leader },
            Phase::Recovering { .. } => Role::Recovering { epoch: self.promised },
            Phase::Leading { start, .. } => Role::Leader { epoch: self.promised, start: *start },
        }
    }

    pub fn promised(&self) -> Epoch {
        self.promised
    }

    pub fn last(&self) -> Position {
        self.last
    }

    pub fn durable(&self) -> Position {
        self.durable
    }

    pub fn commit(&self) -> Position {
        self.commit
    }

    /// On the leader: each follower and the position up to which it holds this leader's log,
    /// durably. Empty when not leading.
    pub fn followers(&self) -> Vec<(NodeId, Position)> {
        match &self.phase {
            Phase::Leading { peers, .. } => peers.iter().map(|(peer, progress)| (*peer, progress.matched)).collect(),
            _ => Vec::new(),
        }
    }

    pub fn history(&self) -> &EpochHistory {
        &self.history
    }

    /// Whether effects wait to be taken.
    pub fn has_effects(&self) -> bool {
        !self.effects.is_empty()
    }

    /// The effects so far, to execute under the shell's contract (module doc).
    pub fn take_effects(&mut self) -> Effects {
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        self.pending.push_back((ticket, self.last));
        Effects { ticket, effects: std::mem::take(&mut self.effects) }
    }

    /// Every batch up to `ticket` is durable.
    pub fn on_durable(&mut self, ticket: u64, log: &impl ReplicaLog) {
        let mut durable = self.durable;
        while let Some(&(t, last)) = self.pending.front() {
            if t > ticket {
                break;
            }
            durable = durable.max(last);
            self.pending.pop_front();
        }
        let durable = durable.min(self.last);
        if durable == self.durable {
            return;
        }
        self.durable = durable;
        match &self.phase {
            Phase::Following { leader: Some(leader), matched } => {
                let (leader, acked) = (*leader, (*matched).min(durable));
                let round = self.leader_round;
                self.send(leader, Message::AppendReply { epoch: self.promised, outcome: AppendOutcome::Durable(acked), round });
            }
            Phase::Leading { .. } => {
                self.advance_commit();
                for peer in self.leading_peers() {
                    self.replicate(peer, log);
                }
            }
            _ => {}
        }
    }

    /// The coordination store made this replica the leader of `epoch`. Refused (false) when it
    /// promised a higher epoch, or promised `epoch` and acts in it (follows a leader of it, or
    /// recovers or leads it already).
    ///
    /// `epoch` equal to the promise, while following nobody, is this replica resuming its own
    /// epoch after it restarted from its log (the grant is unique to this node: the lock index).
    /// That is safe: every replica that answered in `epoch` holds at most what this leader made
    /// durable before sending it, so recovery adopts this replica's own log, truncates nothing,
    /// and serves after a second marker of the epoch.
    pub fn become_leader(&mut self, epoch: Epoch) -> bool {
        let resumes = epoch == self.promised && matches!(self.phase, Phase::Following { leader: None, .. });
        if epoch < self.promised || (epoch == self.promised && !resumes) {
            return false;
        }
        if epoch > self.promised {
            self.promise(epoch);
        }
        self.start_recovery();
        true
    }

    fn start_recovery(&mut self) {
        let epoch = self.promised;
        let mut replies = BTreeMap::new();
        replies.insert(self.config.me, (self.history.clone(), self.last));
        self.phase = Phase::Recovering { replies, fetching: None, idle_ticks: 0, unanswered: 0 };
        for peer in self.peers() {
            self.send(peer, Message::Recover { epoch });
        }
        self.try_finish_recovery();
    }

    /// The serving leader appends `group` atomically (see [`Entry::atomic_with_next`]); returns
    /// the position of its last entry, or `None` when not serving (or the group is empty).
    pub fn propose(&mut self, group: Vec<Vec<u8>>) -> Option<Position> {
        let Phase::Leading { paused: false, .. } = self.phase else { return None };
        let (first, n) = (self.last + 1, group.len());
        if n == 0 {
            return None;
        }
        let entries = group
            .into_iter()
            .enumerate()
            .map(|(i, data)| Entry {
                position: first + i as Position,
                epoch: self.promised,
                kind: EntryKind::Data(data),
                atomic_with_next: i + 1 < n,
            })
            .collect();
        self.append_local(entries);
        Some(self.last)
    }

    /// The serving leader's shell appended entries of this epoch up to `last` itself (the node's
    /// processor writes events in its group commits), and they are durable: replicate them.
    /// Ignored when not serving (the shell refuses appends then; this may be a late report).
    pub fn leader_appended(&mut self, last: Position, log: &impl ReplicaLog) {
        let Phase::Leading { .. } = self.phase else { return };
        if last <= self.last {
            return;
        }
        self.history.record(self.promised, self.last + 1);
        self.last = last;
        self.durable = self.durable.max(last);
        self.advance_commit();
        for peer in self.leading_peers() {
            self.replicate(peer, log);
        }
    }

    pub fn on_message(&mut self, from: NodeId, message: Message, log: &impl ReplicaLog) {
        let epoch = message.epoch();
        if let Message::Stale { promised } = message {
            if promised > self.promised {
                self.promise(promised);
                self.phase = Phase::Following { leader: None, matched: 0 };
            }
            return;
        }
        if epoch < self.promised && !rules::off(rules::FENCING) {
            // From a deposed leader, or a reply to one of ours from an earlier epoch.
            if matches!(message, Message::Recover { .. } | Message::Fetch { .. } | Message::Append { .. } | Message::Snapshot { .. }) {
                self.send(from, Message::Stale { promised: self.promised });
            }
            return;
        }
        match message {
            Message::Recover { epoch } => {
                self.follow(epoch, from);
                self.send(from, Message::RecoverReply { epoch, history: self.history.clone(), last: self.last });
            }
            Message::Fetch { epoch, from: start } => {
                self.follow(epoch, from);
                if start <= log.floor() && start <= self.durable {
                    let reply = SnapshotReply::Fetch { epoch, last: self.durable };
                    self.effects.push(Effect::SendSnapshot { to: from, reply });
                } else {
                    let entries = self.read(log, start);
                    self.send(from, Message::FetchReply { epoch, entries, last: self.durable, snapshot: None });
                }
            }
            Message::Snapshot { epoch, snapshot, commit, round } => {
                self.follow(epoch, from);
                self.leader_round = self.leader_round.max(round);
                self.on_snapshot(from, snapshot, commit);
            }
            Message::Append { epoch, prev_position, prev_epoch, entries, commit, round } => {
                self.follow(epoch, from);
                self.leader_round = self.leader_round.max(round);
                self.on_append(from, prev_position, prev_epoch, entries, commit);
            }
            // Only members count for recovery: a node the set moved away from may still answer.
            Message::RecoverReply { epoch, history, last } if epoch == self.promised && self.config.members.contains(&from) => {
                if let Phase::Recovering { replies, .. } = &mut self.phase {
                    replies.insert(from, (history, last));
                    self.try_finish_recovery();
                }
            }
            Message::FetchReply { epoch, entries, last, snapshot } if epoch == self.promised => {
                self.on_fetched(from, entries, last, snapshot)
            }
            Message::AppendReply { epoch, outcome, round } if epoch == self.promised => self.on_append_reply(from, outcome, round, log),
            // A reply for an epoch this replica promised but no longer acts in.
            _ => {}
        }
    }

    /// Starts this replica's read rounds above `base`. Rounds must grow across every replica
    /// object that leads one epoch: a replica rebuilt or restarted while its node still holds the
    /// lock resumes the same epoch, and followers may still echo (or be about to receive) the
    /// rounds of its previous incarnation; a new read's round must be above all of them, or an
    /// echo sent before the read arrived could confirm it. The shell seeds it from the wall clock
    /// in microseconds (and above the previous incarnation's round).
    pub fn start_rounds_at(&mut self, base: u64) {
        self.round = self.round.max(base);
    }

    /// The latest read round.
    pub fn round(&self) -> u64 {
        self.round
    }

    /// A linearizable read (Raft's ReadIndex): the serving leader starts a read round and sends
    /// every follower an Append carrying it; returns the round, or `None` when not serving (or
    /// its marker is not committed yet, so its commit position may miss earlier epochs' entries).
    /// Once [`Replica::confirmed_round`] reaches the round, a majority still followed this epoch
    /// after the read arrived: no later leader had committed anything before then, so a read of
    /// the log up to [`Replica::commit`] (as of then or later) sees every write acknowledged
    /// before the read began.
    ///
    /// A leader paused to hand its partition over refuses reads, as it refuses writes: once the
    /// switch lands, the new set elects and commits without the old set's members that left,
    /// so a majority of the old set could still confirm rounds of an epoch that no longer holds
    /// every write (found by the whole-cluster simulation, docs/simulation.md).
    pub fn read_index(&mut self, log: &impl ReplicaLog) -> Option<u64> {
        let Phase::Leading { start, paused, .. } = &self.phase else { return None };
        if self.commit < *start || *paused {
            return None;
        }
        self.round += 1;
        for peer in self.leading_peers() {
            self.send_append(peer, log, true);
        }
        Some(self.round)
    }

    /// The highest read round a majority of the replica set (this leader included) has
    /// confirmed in its epoch; 0 when not leading.
    pub fn confirmed_round(&self) -> u64 {
        let Phase::Leading { peers, .. } = &self.phase else { return 0 };
        let mut rounds: Vec<u64> = peers.values().filter(|p| p.voter).map(|p| p.round).chain([self.round]).collect();
        rounds.sort_unstable_by(|a, b| b.cmp(a));
        rounds[self.majority() - 1]
    }

    /// Resends what went unanswered.
    pub fn tick(&mut self, log: &impl ReplicaLog) {
        let resend_ticks = self.config.resend_ticks;
        match &mut self.phase {
            Phase::Leading { peers, .. } => {
                let mut due = Vec::new();
                for (peer, progress) in peers.iter_mut() {
                    progress.snapshot_wait = progress.snapshot_wait.saturating_sub(1);
                    progress.idle_ticks += 1;
                    if progress.idle_ticks >= resend_ticks {
                        progress.idle_ticks = 0;
                        progress.next = progress.matched.max(progress.base) + 1;
                        due.push(*peer);
                    }
                }
                for peer in due {
                    self.send_append(peer, log, true);
                }
            }
            Phase::Recovering { replies, fetching, idle_ticks, unanswered } => {
                *idle_ticks += 1;
                if *idle_ticks < resend_ticks {
                    return;
                }
                *idle_ticks = 0;
                let epoch = self.promised;
                match *fetching {
                    Some(_) if *unanswered >= FETCH_RETRIES => {
                        // The source went quiet (crashed, cut off): what it was to provide is
                        // held by some replica of any majority, so ask again.
                        self.start_recovery();
                    }
                    Some((source, _)) => {
                        *unanswered += 1;
                        self.send(source, Message::Fetch { epoch, from: self.last + 1 });
                    }
                    None => {
                        let missing: Vec<NodeId> = self.config.members.iter().copied().filter(|m| !replies.contains_key(m)).collect();
                        for peer in missing {
                            self.send(peer, Message::Recover { epoch });
                        }
                    }
                }
            }
            Phase::Following { .. } => {}
        }
    }

    // ---- moving the partition to another replica set ----

    /// The replica set the partition moves to (empty: none). A leader replicates to its
    /// newcomers as learners from now on; nothing else changes until [`Replica::set_members`].
    pub fn set_target(&mut self, target: Vec<NodeId>) {
        self.target = target;
        self.track_learners();
    }

    pub fn target(&self) -> &[NodeId] {
        &self.target
    }

    /// The replica set is now `members` (the coordination store switched it). A leader (its
    /// own handover done) steps down without a higher epoch, and takes nothing more in its
    /// epoch; a recovering one starts its recovery over the new set.
    pub fn set_members(&mut self, mut members: Vec<NodeId>) {
        assert!(members.contains(&self.config.me), "the replica set must contain this replica");
        let (mut old, mut new) = (self.config.members.clone(), members.clone());
        old.sort_unstable();
        new.sort_unstable();
        if old == new {
            return;
        }
        std::mem::swap(&mut self.config.members, &mut members);
        match self.phase {
            Phase::Leading { .. } => {
                self.effects.push(Effect::SteppedDown { epoch: self.promised });
                self.phase = Phase::Following { leader: None, matched: 0 };
            }
            Phase::Recovering { .. } => self.start_recovery(),
            Phase::Following { .. } => {}
        }
    }

    pub fn members(&self) -> &[NodeId] {
        &self.config.members
    }

    /// The serving leader stops (`true`) or resumes taking proposals. The shell fences its
    /// appends first, so the replica has learned every one it placed.
    pub fn pause(&mut self, pause: bool) {
        if let Phase::Leading { paused, .. } = &mut self.phase {
            *paused = pause;
        }
    }

    pub fn paused(&self) -> bool {
        matches!(self.phase, Phase::Leading { paused: true, .. })
    }

    /// Lowest position any newcomer of the target set holds this leader's log up to (the
    /// leader's last when there are none); for a leadership-only handover, how far the
    /// successor holds it; `None` when not leading towards a target.
    pub fn learners_matched(&self) -> Option<Position> {
        let Phase::Leading { peers, .. } = &self.phase else { return None };
        if self.target.is_empty() {
            return None;
        }
        if let Some(successor) = self.successor() {
            return Some(peers.get(&successor).map_or(0, |p| p.matched));
        }
        Some(peers.values().filter(|p| !p.voter).map(|p| p.matched).min().unwrap_or(self.last))
    }

    /// The replica a leadership-only handover goes to: the first of a target that is the
    /// replica set itself (a draining leader's, or a hand-back; `ClusterView::target_for` puts
    /// the successor first). It must hold the whole log too, so that the lock goes to a replica
    /// that is alive and takes over without catching up first.
    fn successor(&self) -> Option<NodeId> {
        let mut target = self.target.clone();
        let mut members = self.config.members.clone();
        target.sort_unstable();
        members.sort_unstable();
        (target == members).then(|| self.target.first().copied()).flatten().filter(|n| *n != self.config.me)
    }

    /// Whether the paused leader may hand the partition over to its target set: its whole log
    /// is durable here, on every newcomer, and on a majority of the target set. Recovery in a
    /// later epoch over any majority of the target set then finds every entry this leader
    /// committed (docs/replication.md, "Moving a replica set"). Once the shell acts on it, this
    /// leader must never take a proposal in its epoch again.
    pub fn handover_ready(&self) -> bool {
        let Phase::Leading { peers, paused: true, .. } = &self.phase else { return false };
        if self.target.is_empty() || self.durable != self.last {
            return false;
        }
        let holds = |n: &NodeId| *n == self.config.me || peers.get(n).is_some_and(|p| p.matched == self.last);
        let newcomers_hold = self.target.iter().filter(|n| !self.config.members.contains(n)).all(holds);
        let successor_holds = self.successor().is_none_or(|n| holds(&n));
        newcomers_hold && successor_holds && self.target.iter().filter(|n| holds(n)).count() > self.target.len() / 2
    }

    // ---- following ----

    /// Takes `epoch` (promised already or now) and `leader` as the one to follow.
    fn follow(&mut self, epoch: Epoch, leader: NodeId) {
        if epoch > self.promised {
            self.promise(epoch);
            // What matched the leader of an earlier epoch says nothing about this one's log, even
            // when the same node leads both (its recovery may have adopted another log).
            self.phase = Phase::Following { leader: Some(leader), matched: 0 };
            self.leader_round = 0;
            return;
        }
        debug_assert_eq!(epoch, self.promised);
        match &self.phase {
            Phase::Following { leader: Some(current), .. } if *current == leader => {}
            Phase::Following { .. } => {
                self.phase = Phase::Following { leader: Some(leader), matched: 0 };
                self.leader_round = 0;
            }
            // One leader per epoch: this replica leads `epoch`, so nobody else can send in it.
            _ => debug_assert!(leader == self.config.me, "two leaders claim epoch {epoch}"),
        }
    }

    fn on_append(&mut self, leader: NodeId, prev_position: Position, prev_epoch: Epoch, entries: Vec<Entry>, commit: Position) {
        if !matches!(self.phase, Phase::Following { .. }) {
            return;
        }
        let epoch = self.promised;
        if !well_formed(prev_position, prev_epoch, &entries, epoch) {
            tracing::warn!(from = leader, prev_position, "ignoring a malformed Append (positions or epochs out of order)");
            return;
        }
        let holds_prev = prev_position == 0 || (prev_position <= self.last && self.history.epoch_at(prev_position) == Some(prev_epoch));
        if !holds_prev {
            let outcome = AppendOutcome::Diverged { history: self.history.clone(), last: self.last };
            self.send(leader, Message::AppendReply { epoch, outcome, round: self.leader_round });
            return;
        }
        let count = entries.len() as Position;
        let mut fresh = Vec::new();
        for entry in entries {
            if fresh.is_empty() && entry.position <= self.last {
                if self.history.epoch_at(entry.position) == Some(entry.epoch) || rules::off(rules::TRUNCATION) {
                    continue;
                }
                self.truncate_local(entry.position - 1);
            }
            fresh.push(entry);
        }
        if !fresh.is_empty() {
            self.append_local(fresh);
        }
        self.matched_through(leader, prev_position + count, commit);
    }

    /// Following `leader`: this replica's log matches the leader's through `position`; what the
    /// leader says committed is committed here as far as it matches; tells the leader how far
    /// it holds the log durably.
    fn matched_through(&mut self, leader: NodeId, position: Position, commit: Position) {
        let Phase::Following { matched, .. } = &mut self.phase else { unreachable!("only a follower matches a leader") };
        *matched = (*matched).max(position);
        let matched = *matched;
        let committed = commit.min(matched);
        if committed > self.commit {
            self.commit = committed;
            self.effects.push(Effect::Committed(committed));
        }
        let acked = matched.min(self.durable);
        self.send(leader, Message::AppendReply { epoch: self.promised, outcome: AppendOutcome::Durable(acked), round: self.leader_round });
    }

    /// A leader's snapshot: installed unless this replica's log already holds its position in
    /// the same epoch (and so, by the logs' matching, everything it stands for).
    fn on_snapshot(&mut self, leader: NodeId, snapshot: Snapshot, commit: Position) {
        if !matches!(self.phase, Phase::Following { .. }) {
            return;
        }
        if !snapshot_well_formed(&snapshot, self.promised) {
            tracing::warn!(from = leader, position = snapshot.position, "ignoring a malformed Snapshot");
            return;
        }
        let position = snapshot.position;
        let holds = position <= self.last && self.history.epoch_at(position) == snapshot.history.epoch_at(position);
        if !holds {
            self.install_local(snapshot);
        }
        self.matched_through(leader, position, commit);
    }

    // ---- recovering ----

    fn try_finish_recovery(&mut self) {
        let majority = self.majority();
        let Phase::Recovering { replies, fetching, .. } = &self.phase else { return };
        let majority = if rules::off(rules::RECOVERY_MAJORITY) { 1 } else { majority };
        if fetching.is_some() || replies.len() < majority {
            return;
        }
        // The most advanced log of a majority: highest last epoch, then longest; this
        // replica's own on a tie.
        let me = self.config.me;
        let (best, (best_history, best_last)) = replies
            .iter()
            .max_by_key(|(node, (history, last))| (history.last_epoch(), *last, **node == me))
            .map(|(node, log)| (*node, log.clone()))
            .expect("at least this replica's own log");
        if best == me || rules::off(rules::ADOPT_MOST_ADVANCED) {
            return self.start_serving();
        }
        let shared = common_prefix(&self.history, self.last, &best_history, best_last);
        self.truncate_local(shared);
        if let Phase::Recovering { fetching, .. } = &mut self.phase {
            *fetching = Some((best, best_last));
        }
        if self.last >= best_last {
            return self.start_serving();
        }
        self.send(best, Message::Fetch { epoch: self.promised, from: self.last + 1 });
    }

    fn on_fetched(&mut self, from: NodeId, entries: Vec<Entry>, source_last: Position, snapshot: Option<Snapshot>) {
        let Phase::Recovering { fetching: Some((source, target)), .. } = self.phase else { return };
        if from != source {
            return;
        }
        if let Some(snapshot) = snapshot {
            // The source no longer holds the entries asked for: its state through a later
            // position replaces this replica's log (which matches the source's up to its last).
            if snapshot.position > self.last && snapshot_well_formed(&snapshot, self.promised) {
                self.install_local(snapshot);
                if let Phase::Recovering { idle_ticks, unanswered, .. } = &mut self.phase {
                    (*idle_ticks, *unanswered) = (0, 0);
                }
            }
            if self.last >= target {
                return self.start_serving();
            }
            return self.send(source, Message::Fetch { epoch: self.promised, from: self.last + 1 });
        }
        // A repeated reply may overlap what was already appended: it is the same source's log.
        let fresh: Vec<Entry> = entries.into_iter().filter(|e| e.position > self.last).collect();
        let prev_epoch = self.history.last_epoch();
        if fresh.first().is_some_and(|e| e.position == self.last + 1) {
            if !well_formed(self.last, prev_epoch, &fresh, self.promised) {
                tracing::warn!(from, "ignoring a malformed FetchReply (positions or epochs out of order)");
                return;
            }
            self.append_local(fresh);
            // Progress: the source is alive and useful (only then, or a source answering
            // nothing useful would never be given up on).
            if let Phase::Recovering { idle_ticks, unanswered, .. } = &mut self.phase {
                (*idle_ticks, *unanswered) = (0, 0);
            }
        }
        if self.last >= target {
            return self.start_serving();
        }
        if source_last < target {
            // The source's durable log is shorter than it said: ask again after its next sync.
            debug_assert!(source_last >= self.last);
        }
        self.send(source, Message::Fetch { epoch: self.promised, from: self.last + 1 });
    }

    fn start_serving(&mut self) {
        let epoch = self.promised;
        let start = self.last + 1;
        // Where each log that answered recovery parts from this one: its follower starts there.
        let shared: BTreeMap<NodeId, Position> = match &self.phase {
            Phase::Recovering { replies, .. } => {
                replies.iter().map(|(node, (history, last))| (*node, common_prefix(&self.history, self.last, history, *last))).collect()
            }
            _ => BTreeMap::new(),
        };
        self.append_local(vec![Entry { position: start, epoch, kind: EntryKind::Marker, atomic_with_next: false }]);
        let peers = self
            .peers()
            .into_iter()
            .map(|peer| {
                let mut progress = Progress::new(start, true);
                if let Some(shared) = shared.get(&peer) {
                    (progress.base, progress.next) = (*shared, shared + 1);
                }
                (peer, progress)
            })
            .collect();
        self.phase = Phase::Leading { start, peers, paused: false };
        self.track_learners();
        self.effects.push(Effect::Serving { epoch, start });
    }

    // ---- leading ----

    fn on_append_reply(&mut self, from: NodeId, outcome: AppendOutcome, round: u64, log: &impl ReplicaLog) {
        let Phase::Leading { peers, .. } = &mut self.phase else { return };
        let Some(progress) = peers.get_mut(&from) else { return };
        progress.idle_ticks = 0;
        // A round this leader never sent is not an echo: it confirms nothing.
        if round <= self.round {
            progress.round = progress.round.max(round);
        }
        match outcome {
            AppendOutcome::Durable(position) => {
                // Nobody holds more of this leader's log than it has.
                progress.matched = progress.matched.max(position.min(self.last));
                progress.next = progress.next.max(progress.matched + 1);
                if progress.matched > progress.snapshot_floor {
                    // The snapshot on its way (if any) is installed, or no longer needed.
                    progress.snapshot_wait = 0;
                }
                self.advance_commit();
            }
            AppendOutcome::Diverged { history, last } => {
                let shared = common_prefix(&self.history, self.last, &history, last);
                (progress.base, progress.next) = (shared, shared + 1);
            }
        }
        self.replicate(from, log);
    }

    /// Sends `peer` what it lacks, within the in-flight bound.
    fn replicate(&mut self, peer: NodeId, log: &impl ReplicaLog) {
        let Phase::Leading { peers, .. } = &self.phase else { return };
        let progress = &peers[&peer];
        let sent_ahead = (progress.next - 1).saturating_sub(progress.matched.max(progress.base));
        if progress.next <= self.durable && sent_ahead < self.config.max_inflight_entries {
            self.send_append(peer, log, false);
        }
    }

    /// Sends `peer` the durable entries from its `next` on (or, as a heartbeat, none); a
    /// snapshot when the log no longer holds them (and none is on its way).
    fn send_append(&mut self, peer: NodeId, log: &impl ReplicaLog, heartbeat: bool) {
        let epoch = self.promised;
        let commit = self.commit;
        let (next, snapshot_wait) = match &self.phase {
            Phase::Leading { peers, .. } => (peers[&peer].next, peers[&peer].snapshot_wait),
            _ => return,
        };
        if next <= log.floor() && snapshot_wait == 0 {
            // The follower's acknowledgement of the snapshot's position moves `next` past it.
            let (wait, floor) = (self.config.resend_ticks * SNAPSHOT_RESEND_PERIODS, log.floor());
            if let Phase::Leading { peers, .. } = &mut self.phase {
                let progress = peers.get_mut(&peer).expect("a member");
                (progress.snapshot_wait, progress.snapshot_floor) = (wait, floor);
            }
            let reply = SnapshotReply::Leader { epoch, commit, round: self.round };
            return self.effects.push(Effect::SendSnapshot { to: peer, reply });
        }
        let entries = self.read(log, next);
        if entries.is_empty() && !heartbeat {
            return;
        }
        let prev_position = next - 1;
        let prev_epoch = self.history.epoch_at(prev_position).unwrap_or(0);
        if let Phase::Leading { peers, .. } = &mut self.phase {
            let progress = peers.get_mut(&peer).expect("a member");
            progress.next = next + entries.len() as Position;
        }
        let round = self.round;
        self.send(peer, Message::Append { epoch, prev_position, prev_epoch, entries, commit, round });
    }

    /// Commits the highest position durable on a majority, once it is in this epoch.
    fn advance_commit(&mut self) {
        let majority = self.majority();
        let Phase::Leading { start, peers, .. } = &self.phase else { return };
        let mut durable: Vec<Position> = peers.values().filter(|p| p.voter).map(|p| p.matched).chain([self.durable]).collect();
        durable.sort_unstable_by(|a, b| b.cmp(a));
        let quorum = durable[majority - 1];
        if quorum >= *start && quorum > self.commit {
            self.commit = quorum;
            self.effects.push(Effect::Committed(quorum));
        }
    }

    // ---- the local log ----

    fn promise(&mut self, epoch: Epoch) {
        debug_assert!(epoch > self.promised);
        if !matches!(self.phase, Phase::Following { .. }) {
            self.effects.push(Effect::SteppedDown { epoch: self.promised });
            self.phase = Phase::Following { leader: None, matched: 0 };
        }
        self.promised = epoch;
        self.effects.push(Effect::PersistPromise(epoch));
    }

    fn append_local(&mut self, entries: Vec<Entry>) {
        for entry in &entries {
            assert_eq!(entry.position, self.last + 1, "entries are appended densely");
            self.history.record(entry.epoch, entry.position);
            self.last = entry.position;
        }
        self.effects.push(Effect::Append(entries));
    }

    fn truncate_local(&mut self, after: Position) {
        if after >= self.last {
            return;
        }
        assert!(
            after >= self.commit,
            "replica {} would truncate committed entries: commit {}, truncating after {after}",
            self.config.me,
            self.commit
        );
        self.history.truncate_after(after);
        self.last = after;
        self.durable = self.durable.min(after);
        for (_, last) in self.pending.iter_mut() {
            *last = (*last).min(after);
        }
        if let Phase::Following { matched, .. } = &mut self.phase {
            *matched = (*matched).min(after);
        }
        self.effects.push(Effect::Truncate { after });
    }

    /// Durable entries from `from` on, one batch's worth of whole appends: the batch ends with
    /// the last entry of an append (more than `max_batch_entries` when one append is longer).
    /// `from` starts an append: every log holds whole appends only, so every position a peer
    /// holds up to, and every durable position, ends one.
    fn read(&self, log: &impl ReplicaLog, from: Position) -> Vec<Entry> {
        if from == 0 || from > self.durable || from <= log.floor() {
            return Vec::new();
        }
        let available = (self.durable - from + 1) as usize;
        let mut max = self.config.max_batch_entries.min(available);
        loop {
            let mut entries = log.entries(from, max);
            debug_assert!(
                entries.iter().enumerate().all(|(i, e)| e.position == from + i as Position),
                "the log returned non-consecutive entries"
            );
            let whole = entries.iter().rposition(|e| !e.atomic_with_next).map_or(0, |i| i + 1);
            if whole > 0 || entries.len() < max || max == available {
                debug_assert!(whole > 0 || entries.is_empty() || entries.len() < max, "the durable log ends inside an append");
                entries.truncate(whole);
                return entries;
            }
            max = (max * 2).min(available);
        }
    }

    /// Replaces the log through the snapshot's position with it. Only entries that no committed
    /// entry follows in another epoch can differ from it (asserted, as for a truncation).
    fn install_local(&mut self, mut snapshot: Snapshot) {
        let position = snapshot.position;
        snapshot.history.truncate_after(position);
        let shared = common_prefix(&self.history, self.last, &snapshot.history, position);
        assert!(
            shared >= self.commit,
            "replica {} would replace committed entries: commit {}, snapshot at {position} shares {shared}",
            self.config.me,
            self.commit
        );
        self.history = snapshot.history.clone();
        self.last = position;
        // What stays durable is what the old log shares with the snapshot; batches taken before
        // speak of the old log.
        self.durable = self.durable.min(shared);
        for (_, last) in self.pending.iter_mut() {
            *last = (*last).min(shared);
        }
        if let Phase::Following { matched, .. } = &mut self.phase {
            *matched = (*matched).min(shared);
        }
        self.effects.push(Effect::Install(snapshot));
    }

    fn send(&mut self, to: NodeId, message: Message) {
        self.effects.push(Effect::Send { to, message });
    }

    fn peers(&self) -> Vec<NodeId> {
        self.config.members.iter().copied().filter(|m| *m != self.config.me).collect()
    }

    /// Whom a leader replicates to: its peers and the learners.
    fn leading_peers(&self) -> Vec<NodeId> {
        match &self.phase {
            Phase::Leading { peers, .. } => peers.keys().copied().collect(),
            _ => Vec::new(),
        }
    }

    /// Leading: replicates to the target set's newcomers as learners (not counted), from the
    /// end of the log back to where theirs matches; stops replicating to those no longer in it.
    fn track_learners(&mut self) {
        let (me, last) = (self.config.me, self.last);
        let members = &self.config.members;
        let target = &self.target;
        let Phase::Leading { peers, .. } = &mut self.phase else { return };
        peers.retain(|peer, progress| progress.voter || target.contains(peer));
        for learner in target.iter().filter(|n| **n != me && !members.contains(n)) {
            peers.entry(*learner).or_insert_with(|| Progress::new(last + 1, false));
        }
    }

    fn majority(&self) -> usize {
        self.config.members.len() / 2 + 1
    }
}

/// Whether a snapshot received in `epoch` can be installed: it covers a position, and its
/// history says the epoch of that position and names no epoch past `epoch`.
fn snapshot_well_formed(snapshot: &Snapshot, epoch: Epoch) -> bool {
    snapshot.position > 0
        && snapshot.history.epoch_at(snapshot.position).is_some()
        && snapshot.history.starts().iter().all(|(e, _)| *e <= epoch && *e > 0)
}

/// Whether `entries` may follow `(prev_position, prev_epoch)` in a log of an epoch up to
/// `epoch`: consecutive positions, epochs never decreasing and never past `epoch`, whole
/// appends only (the last entry ends one, and an append has one epoch). Messages come from the
/// network; one that breaks this is ignored, never applied (nor a panic).
fn well_formed(prev_position: Position, prev_epoch: Epoch, entries: &[Entry], epoch: Epoch) -> bool {
    let mut last_epoch = prev_epoch;
    prev_epoch <= epoch
        && entries.last().is_none_or(|e| !e.atomic_with_next)
        && entries.windows(2).all(|w| !w[0].atomic_with_next || w[0].epoch == w[1].epoch)
        && entries.iter().enumerate().all(|(i, e)| {
            let ok = e.position == prev_position + 1 + i as Position && e.epoch >= last_epoch && e.epoch <= epoch && e.epoch > 0;
            last_epoch = e.epoch;
            ok
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Mem(Vec<Entry>);

    impl ReplicaLog for Mem {
        fn entries(&self, from: Position, max: usize) -> Vec<Entry> {
            self.0.iter().skip(from as usize - 1).take(max).cloned().collect()
        }
        fn floor(&self) -> Position {
            0
        }
    }

    fn data(position: Position, epoch: Epoch) -> Entry {
        Entry { position, epoch, kind: EntryKind::Data(vec![position as u8]), atomic_with_next: false }
    }

    /// Replica 1 of five, holding positions 1..=6 of epoch 1, durable.
    fn follower() -> Replica {
        let mut history = EpochHistory::default();
        history.record(1, 1);
        let config = ReplicaConfig { me: 1, members: vec![0, 1, 2, 3, 4], max_batch_entries: 4, max_inflight_entries: 8, resend_ticks: 3 };
        Replica::new(config, DurableState { promised: 1, history, last: 6 })
    }

    fn durable_acks(replica: &mut Replica) -> Vec<Position> {
        let batch = replica.take_effects();
        replica.on_durable(batch.ticket, &Mem(Vec::new()));
        let mut effects = batch.effects;
        effects.extend(replica.take_effects().effects);
        effects
            .into_iter()
            .filter_map(|e| match e {
                Effect::Send { message: Message::AppendReply { outcome: AppendOutcome::Durable(p), .. }, .. } => Some(p),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn given_a_follower_matched_in_one_epoch_when_the_same_leader_sends_a_prefix_in_a_later_epoch_then_it_acks_only_that_prefix() {
        let mut f = follower();
        let log = Mem((1..=6).map(|p| data(p, 1)).collect());
        f.on_message(0, Message::Append { epoch: 1, prev_position: 0, prev_epoch: 0, entries: log.0.clone(), commit: 0, round: 0 }, &log);
        assert_eq!(durable_acks(&mut f), [6]);
        // Node 0 leads epoch 3 over a log that shares positions 1..=4 only (epoch 2's leader
        // replaced the rest); its first Append in epoch 3 resends 1..=4.
        let prefix: Vec<Entry> = (1..=4).map(|p| data(p, 1)).collect();
        f.on_message(0, Message::Append { epoch: 3, prev_position: 0, prev_epoch: 0, entries: prefix, commit: 6, round: 0 }, &log);
        assert_eq!(durable_acks(&mut f), [4], "positions 5 and 6 matched epoch 1's log, not epoch 3's");
        assert_eq!(f.commit(), 4, "nor may the follower take them as committed");
    }

    /// A log of entries 1..=n in epoch 1, given up through `floor`.
    struct Trimmed {
        entries: Vec<Entry>,
        floor: Position,
    }

    impl ReplicaLog for Trimmed {
        fn entries(&self, from: Position, max: usize) -> Vec<Entry> {
            assert!(from > self.floor, "read below the floor");
            self.entries.iter().skip(from as usize - 1).take(max).cloned().collect()
        }
        fn floor(&self) -> Position {
            self.floor
        }
    }

    fn snapshots_to(effects: &[Effect], peer: NodeId) -> usize {
        effects.iter().filter(|e| matches!(e, Effect::SendSnapshot { to, .. } if *to == peer)).count()
    }

    #[test]
    fn given_a_follower_behind_the_floor_then_one_snapshot_is_sent_and_another_only_after_ten_resend_periods_without_it() {
        let mut log = Trimmed { entries: (1..=10).map(|p| data(p, 1)).collect(), floor: 8 };
        let history = EpochHistory::from_starts(vec![(1, 1)]);
        let config = ReplicaConfig { me: 0, members: vec![0, 1, 2], max_batch_entries: 4, max_inflight_entries: 8, resend_ticks: 3 };
        let mut leader = Replica::new(config, DurableState { promised: 1, history: history.clone(), last: 10 });
        assert!(leader.become_leader(2));
        leader.on_message(2, Message::RecoverReply { epoch: 2, history: history.clone(), last: 10 }, &log);
        let batch = leader.take_effects();
        for effect in &batch.effects {
            if let Effect::Append(entries) = effect {
                log.entries.extend(entries.iter().map(|e| Entry { kind: EntryKind::Data(vec![]), ..e.clone() }));
            }
        }
        leader.on_durable(batch.ticket, &log);
        assert!(matches!(leader.role(), Role::Leader { .. }));
        let _ = leader.take_effects();
        // Follower 1 holds positions 1..=5: below the floor, it needs a snapshot.
        let diverged = AppendOutcome::Diverged { history: history.clone(), last: 5 };
        leader.on_message(1, Message::AppendReply { epoch: 2, outcome: diverged, round: 0 }, &log);
        let mut sent = snapshots_to(&leader.take_effects().effects, 1);
        assert_eq!(sent, 1);
        // While it is on its way the follower answers heartbeats with what it holds: no second
        // snapshot within ten resend periods...
        for _ in 0..(3 * SNAPSHOT_RESEND_PERIODS - 1) {
            leader.tick(&log);
            leader.on_message(1, Message::AppendReply { epoch: 2, outcome: AppendOutcome::Durable(5), round: 0 }, &log);
            sent += snapshots_to(&leader.take_effects().effects, 1);
        }
        assert_eq!(sent, 1, "a second snapshot while the first was on its way");
        // ... then one, the first one apparently lost.
        for _ in 0..3 {
            leader.tick(&log);
            sent += snapshots_to(&leader.take_effects().effects, 1);
        }
        assert_eq!(sent, 2);
        // Installed: the follower acknowledges past the floor, and gets entries from there.
        leader.on_message(1, Message::AppendReply { epoch: 2, outcome: AppendOutcome::Durable(10), round: 0 }, &log);
        let effects = leader.take_effects().effects;
        assert_eq!(snapshots_to(&effects, 1), 0);
        assert!(
            effects.iter().any(|e| matches!(e, Effect::Send { to: 1, message: Message::Append { prev_position: 10, .. } })),
            "{effects:?}"
        );
    }

    #[test]
    fn given_malformed_appends_then_the_follower_ignores_them_without_panicking() {
        let mut f = follower();
        let log = Mem(Vec::new());
        let malformed = [
            // Positions skip.
            (0, 0, vec![data(1, 1), data(3, 1)]),
            // Epochs go down.
            (0, 0, vec![data(1, 2), data(2, 1)]),
            // An entry of a later epoch than the message's.
            (0, 0, vec![data(1, 5)]),
            // An entry older than the previous one.
            (6, 2, vec![data(7, 1)]),
        ];
        for (prev_position, prev_epoch, entries) in malformed {
            f.on_message(0, Message::Append { epoch: 2, prev_position, prev_epoch, entries, commit: 0, round: 0 }, &log);
            assert_eq!(f.last(), 6);
            assert!(!f.take_effects().effects.iter().any(|e| matches!(e, Effect::Append(_) | Effect::Truncate { .. })));
        }
    }

    #[test]
    fn given_a_set_moved_while_recovering_then_only_the_new_members_answers_count() {
        let config = ReplicaConfig { me: 0, members: vec![0, 1, 2], max_batch_entries: 4, max_inflight_entries: 8, resend_ticks: 3 };
        let mut leader = Replica::new(config, DurableState::default());
        assert!(leader.become_leader(1));
        leader.set_members(vec![0, 3, 4]);
        let log = Mem(Vec::new());
        // Node 1 left the set; its late answer must not make a majority with node 0.
        leader.on_message(1, Message::RecoverReply { epoch: 1, history: EpochHistory::default(), last: 0 }, &log);
        assert_eq!(leader.role(), Role::Recovering { epoch: 1 });
        leader.on_message(3, Message::RecoverReply { epoch: 1, history: EpochHistory::default(), last: 0 }, &log);
        assert!(matches!(leader.role(), Role::Leader { epoch: 1, .. }), "{:?}", leader.role());
    }

    /// Replica 0 of {0, 1, 2}, serving epoch 1 with its marker durable at position 1 (1 and 2
    /// answered its recovery with empty logs), and its log.
    fn serving_leader() -> (Replica, Mem) {
        let config = ReplicaConfig { me: 0, members: vec![0, 1, 2], max_batch_entries: 4, max_inflight_entries: 8, resend_ticks: 3 };
        let mut leader = Replica::new(config, DurableState::default());
        assert!(leader.become_leader(1));
        let log = Mem(vec![Entry { position: 1, epoch: 1, kind: EntryKind::Marker, atomic_with_next: false }]);
        for peer in [1, 2] {
            leader.on_message(peer, Message::RecoverReply { epoch: 1, history: EpochHistory::default(), last: 0 }, &log);
        }
        let batch = leader.take_effects();
        leader.on_durable(batch.ticket, &log);
        (leader, log)
    }

    #[test]
    fn given_a_leader_with_a_target_then_learners_do_not_count_and_the_handover_waits_for_every_newcomer_and_a_majority() {
        let (mut leader, log) = serving_leader();
        // Moving from {0,1,2} to {0,3,4}: learners 3 and 4 hold the log, the members do not.
        leader.set_target(vec![0, 3, 4]);
        let durable = |leader: &mut Replica, peer, position| {
            leader.on_message(peer, Message::AppendReply { epoch: 1, outcome: AppendOutcome::Durable(position), round: 0 }, &log)
        };
        durable(&mut leader, 3, 1);
        durable(&mut leader, 4, 1);
        assert_eq!(leader.commit(), 0, "learners do not commit");
        assert_eq!(leader.learners_matched(), Some(1));
        assert!(!leader.handover_ready(), "not paused");
        leader.pause(true);
        assert!(leader.propose(vec![b"x".to_vec()]).is_none(), "a paused leader takes no proposal");
        assert!(leader.handover_ready(), "itself and both newcomers: every newcomer and a majority of the target");
        // Moving to {1,2,3} instead: newcomer 3 holds the log, but only it and none of 1 and 2.
        leader.set_target(vec![1, 2, 3]);
        assert!(!leader.handover_ready(), "one of three holds the log: no majority of the target");
        durable(&mut leader, 1, 1);
        assert!(leader.handover_ready());
        leader.set_target(vec![1, 2, 4]);
        leader.set_target(vec![1, 2, 5]);
        assert!(!leader.handover_ready(), "newcomer 5 holds nothing");
    }

    #[test]
    fn given_a_leadership_only_handover_then_it_waits_for_the_successor_as_well_as_a_majority() {
        let (mut leader, log) = serving_leader();
        let durable = |leader: &mut Replica, peer, position| {
            leader.on_message(peer, Message::AppendReply { epoch: 1, outcome: AppendOutcome::Durable(position), round: 0 }, &log)
        };
        // Its own set, successor 2 first (a drain or a hand-back): 1 holds the log, 2 nothing.
        leader.set_target(vec![2, 0, 1]);
        durable(&mut leader, 1, 1);
        assert_eq!(leader.learners_matched(), Some(0), "how far the successor holds the log");
        leader.pause(true);
        assert!(!leader.handover_ready(), "a majority holds the log, but not the successor");
        durable(&mut leader, 2, 1);
        assert_eq!(leader.learners_matched(), Some(1));
        assert!(leader.handover_ready());
        // The successor alone with the leader is a majority too.
        let (mut leader, log) = serving_leader();
        leader.set_target(vec![1, 2, 0]);
        leader.on_message(1, Message::AppendReply { epoch: 1, outcome: AppendOutcome::Durable(1), round: 0 }, &log);
        leader.pause(true);
        assert!(leader.handover_ready());
    }

    /// The appends `effects` send, by peer: (prev_position, entry positions).
    fn appends(effects: &[Effect]) -> Vec<(NodeId, Position, Vec<Position>)> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::Send { to, message: Message::Append { prev_position, entries, .. } } => {
                    Some((*to, *prev_position, entries.iter().map(|e| e.position).collect()))
                }
                _ => None,
            })
            .collect()
    }

    #[test]
    fn given_a_new_leader_of_a_log_longer_than_the_inflight_bound_then_it_sends_its_marker_at_once_and_resends_only_after_what_recovery_showed()
     {
        // Positions 1..=100 of epoch 1 on all three; node 0 takes epoch 2.
        let config = ReplicaConfig { me: 0, members: vec![0, 1, 2], max_batch_entries: 4, max_inflight_entries: 8, resend_ticks: 3 };
        let history = EpochHistory::from_starts(vec![(1, 1)]);
        let mut leader = Replica::new(config, DurableState { promised: 1, history: history.clone(), last: 100 });
        assert!(leader.become_leader(2));
        let mut log = Mem((1..=100).map(|p| data(p, 1)).collect());
        leader.on_message(1, Message::RecoverReply { epoch: 2, history: history.clone(), last: 100 }, &log);
        log.0.push(Entry { position: 101, epoch: 2, kind: EntryKind::Marker, atomic_with_next: false });
        let batch = leader.take_effects();
        leader.on_durable(batch.ticket, &log);
        let sent = appends(&leader.take_effects().effects);
        assert_eq!(sent, [(1, 100, vec![101]), (2, 100, vec![101])], "the marker goes out once it is durable, after the log's last entry");
        // Nothing answers: a resend period later the same append goes again, not the log from 1.
        for _ in 0..3 {
            leader.tick(&log);
        }
        let sent = appends(&leader.take_effects().effects);
        assert_eq!(sent, [(1, 100, vec![101]), (2, 100, vec![101])]);
        // Node 2 does not hold position 100 (its log ends at 60): the leader goes back to where
        // the logs part, and sends from there within the in-flight bound.
        leader.on_message(
            2,
            Message::AppendReply { epoch: 2, outcome: AppendOutcome::Diverged { history: history.clone(), last: 60 }, round: 0 },
            &log,
        );
        let sent = appends(&leader.take_effects().effects);
        assert_eq!(sent, [(2, 60, vec![61, 62, 63, 64])]);
        leader.on_message(1, Message::AppendReply { epoch: 2, outcome: AppendOutcome::Durable(101), round: 0 }, &log);
        assert_eq!(leader.commit(), 101, "itself and node 1 hold the marker");
    }

    #[test]
    fn given_a_new_leader_then_a_follower_whose_recovery_reply_showed_a_shorter_log_gets_what_it_lacks_at_once() {
        let config = ReplicaConfig { me: 0, members: vec![0, 1, 2, 3, 4], max_batch_entries: 4, max_inflight_entries: 8, resend_ticks: 3 };
        let history = EpochHistory::from_starts(vec![(1, 1)]);
        let mut leader = Replica::new(config, DurableState { promised: 1, history: history.clone(), last: 100 });
        assert!(leader.become_leader(2));
        let mut log = Mem((1..=100).map(|p| data(p, 1)).collect());
        leader.on_message(1, Message::RecoverReply { epoch: 2, history: history.clone(), last: 100 }, &log);
        leader.on_message(2, Message::RecoverReply { epoch: 2, history: history.clone(), last: 60 }, &log);
        log.0.push(Entry { position: 101, epoch: 2, kind: EntryKind::Marker, atomic_with_next: false });
        let batch = leader.take_effects();
        leader.on_durable(batch.ticket, &log);
        let sent = appends(&leader.take_effects().effects);
        assert_eq!(sent, [(1, 100, vec![101]), (2, 60, vec![61, 62, 63, 64]), (3, 100, vec![101]), (4, 100, vec![101])]);
    }

    #[test]
    fn given_a_leader_then_followers_claiming_more_than_it_holds_count_only_for_what_it_holds() {
        let (mut leader, log) = serving_leader();
        for peer in [1, 2] {
            leader.on_message(peer, Message::AppendReply { epoch: 1, outcome: AppendOutcome::Durable(1_000), round: 0 }, &log);
        }
        assert_eq!((leader.last(), leader.commit()), (1, 1), "its whole log is committed, and nothing beyond");
    }

    #[test]
    fn given_a_read_round_then_it_is_confirmed_only_by_a_majority_echoing_it_in_the_leaders_epoch() {
        let config = ReplicaConfig { me: 0, members: vec![0, 1, 2, 3, 4], max_batch_entries: 4, max_inflight_entries: 8, resend_ticks: 3 };
        let mut leader = Replica::new(config, DurableState::default());
        let log = Mem(vec![Entry { position: 1, epoch: 1, kind: EntryKind::Marker, atomic_with_next: false }]);
        assert_eq!(leader.read_index(&log), None, "not leading");
        assert!(leader.become_leader(1));
        for peer in [1, 2, 3, 4] {
            leader.on_message(peer, Message::RecoverReply { epoch: 1, history: EpochHistory::default(), last: 0 }, &log);
        }
        let batch = leader.take_effects();
        leader.on_durable(batch.ticket, &log);
        assert_eq!(leader.read_index(&log), None, "its marker is not committed yet");
        let reply = |round| Message::AppendReply { epoch: 1, outcome: AppendOutcome::Durable(1), round };
        for peer in [1, 2] {
            leader.on_message(peer, reply(0), &log);
        }
        leader.take_effects();
        let round = leader.read_index(&log).expect("serving, marker committed");
        let sent: Vec<u64> = leader
            .take_effects()
            .effects
            .into_iter()
            .filter_map(|e| match e {
                Effect::Send { message: Message::Append { round, .. }, .. } => Some(round),
                _ => None,
            })
            .collect();
        assert_eq!(sent, [round; 4], "every follower is asked");
        // A reply of another epoch, or naming a round never sent, confirms nothing.
        leader.on_message(1, Message::AppendReply { epoch: 0, outcome: AppendOutcome::Durable(1), round }, &log);
        leader.on_message(3, reply(round + 5), &log);
        assert_eq!(leader.confirmed_round(), round - 1, "itself alone");
        leader.on_message(2, reply(round), &log);
        assert_eq!(leader.confirmed_round(), round - 1, "itself and one follower: two of five");
        leader.on_message(4, reply(round), &log);
        assert_eq!(leader.confirmed_round(), round, "itself and two followers: a majority");
    }

    #[test]
    fn given_a_leader_paused_to_hand_over_then_it_refuses_reads_until_it_serves_again() {
        let config = ReplicaConfig { me: 0, members: vec![0, 1, 2], max_batch_entries: 4, max_inflight_entries: 8, resend_ticks: 3 };
        let mut leader = Replica::new(config, DurableState::default());
        let log = Mem(vec![Entry { position: 1, epoch: 1, kind: EntryKind::Marker, atomic_with_next: false }]);
        assert!(leader.become_leader(1));
        for peer in [1, 2] {
            leader.on_message(peer, Message::RecoverReply { epoch: 1, history: EpochHistory::default(), last: 0 }, &log);
        }
        let batch = leader.take_effects();
        leader.on_durable(batch.ticket, &log);
        leader.on_message(1, Message::AppendReply { epoch: 1, outcome: AppendOutcome::Durable(1), round: 0 }, &log);
        leader.take_effects();
        assert!(leader.read_index(&log).is_some(), "serving, marker committed");
        // Paused, the switch to its target set may land at any moment: a majority of this set
        // could still confirm a round while the new set commits without it.
        leader.pause(true);
        assert_eq!(leader.read_index(&log), None, "paused to hand over");
        leader.pause(false);
        assert!(leader.read_index(&log).is_some(), "serving again");
    }

    #[test]
    fn given_a_leader_rebuilt_in_its_epoch_then_echoes_of_its_old_rounds_confirm_none_of_its_new_reads() {
        let config = ReplicaConfig { me: 0, members: vec![0, 1, 2], max_batch_entries: 4, max_inflight_entries: 8, resend_ticks: 3 };
        let marker = |position| Entry { position, epoch: 1, kind: EntryKind::Marker, atomic_with_next: false };
        let log = Mem(vec![marker(1), marker(2)]);
        // Serving epoch 1 with `last` held, marker committed, followers echoing `echo`.
        let serve = |leader: &mut Replica, last: Position, echo: u64| {
            let history = EpochHistory::from_starts(vec![(1, 1)]);
            for peer in [1, 2] {
                leader.on_message(peer, Message::RecoverReply { epoch: 1, history: history.clone(), last: last - 1 }, &log);
            }
            let batch = leader.take_effects();
            leader.on_durable(batch.ticket, &log);
            for peer in [1, 2] {
                leader.on_message(peer, Message::AppendReply { epoch: 1, outcome: AppendOutcome::Durable(last), round: echo }, &log);
            }
            assert_eq!(leader.commit(), last);
        };
        let mut first = Replica::new(config.clone(), DurableState::default());
        assert!(first.become_leader(1));
        serve(&mut first, 1, 0);
        for _ in 0..5 {
            first.read_index(&log).unwrap();
        }
        let old = first.round();
        // Rebuilt from its log (a failed effect), it resumes epoch 1; the followers still echo
        // the old incarnation's last round in every reply, including replies sent before a new
        // read begins.
        let mut second = Replica::new(config, DurableState { promised: 1, history: EpochHistory::from_starts(vec![(1, 1)]), last: 1 });
        second.start_rounds_at(1_000);
        assert!(second.become_leader(1), "resumes its own epoch");
        serve(&mut second, 2, old);
        for _ in 0..10 {
            let round = second.read_index(&log).unwrap();
            for peer in [1, 2] {
                second.on_message(peer, Message::AppendReply { epoch: 1, outcome: AppendOutcome::Durable(2), round: old }, &log);
            }
            assert!(second.confirmed_round() < round, "a stale echo ({old}) confirmed read round {round}");
        }
    }
}
