//! The embedded coordination store as a [`CoordinationStore`]: a task per member that drives a
//! [`RaftKv`] (ticks, messages, proposals, ready cycles), and handles that turn async calls into
//! proposals and wait for their outcomes.
//!
//! Writes are Raft proposals. Time comes from the Raft leader's wall clock alone (see
//! `embedded.rs`): it proposes a `Tick` every [`EXPIRY_TICK`] to keep the store's clock fresh (a
//! renewal counts from the store's clock, at most that much behind), and as soon as a session is
//! due by its clock (checked every [`TICK`]), so a dead node's session ends at most a tick after
//! its TTL. A new leader first proposes `RenewAll`, which gives every session at least half a TTL
//! from then, so the time the group spent without a leader (when nobody could renew) does not
//! expire a live owner, while a dead owner's session still ends close to its own TTL.
//! Reads (`get`, `list`) answer from the member's own applied state: they may lag the leader by a
//! few milliseconds, which ownership tolerates (every decision it takes is a write: a lock
//! acquisition or a compare-and-set). Blocking lists wake when the applied index moves.
//!
//! Transport between members is a [`Transport`]: in-process channels in tests, gRPC between
//! nodes (`transport.rs`). A node's member keeps its Raft log and hard state in LMDB
//! ([`RaftLog`], opened by `member.rs`), so a member that restarts rejoins with its log.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use raft::eraftpb::Message;
use tokio::sync::{mpsc, oneshot, watch};

use super::embedded::{Elections, RaftId, RaftKv, RaftKvError};
use super::raft_log::RaftLog;
use super::state::{KvState, Op, Outcome};
use super::{Cas, CoordinationError, CoordinationStore, KvEntry, Listing, Result, SessionId};

/// How often a member ticks its Raft node.
pub const TICK: Duration = Duration::from_millis(50);
/// How often the leader proposes a clock tick when no session is due.
pub const EXPIRY_TICK: Duration = Duration::from_millis(250);
/// How long a write waits for its outcome before it is tried again.
pub(crate) const PROPOSAL_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a write is tried (through elections and lost proposals) before the caller gets
/// `Unavailable`.
pub(crate) const WRITE_DEADLINE: Duration = Duration::from_secs(10);
/// Proposals waiting for the driver.
const QUEUE: usize = 1024;

/// Carries Raft messages between members.
pub trait Transport: Send + Sync + 'static {
    fn send(&self, message: Message);
}

/// In-process transport: one channel per member.
#[derive(Default, Clone)]
pub struct LocalTransport {
    members: Arc<Mutex<HashMap<RaftId, mpsc::Sender<Message>>>>,
}

impl LocalTransport {
    /// The inbox of member `id`.
    pub fn register(&self, id: RaftId) -> mpsc::Receiver<Message> {
        let (tx, rx) = mpsc::channel(super::transport::QUEUE_MESSAGES);
        self.members.lock().insert(id, tx);
        rx
    }

    /// Cuts a member off (as if its process died): messages to it are dropped.
    pub fn disconnect(&self, id: RaftId) {
        self.members.lock().remove(&id);
    }
}

impl Transport for LocalTransport {
    fn send(&self, message: Message) {
        if let Some(member) = self.members.lock().get(&message.to) {
            let _ = member.try_send(message);
        }
    }
}

struct Proposal {
    op: Op,
    reply: oneshot::Sender<std::result::Result<Outcome, RaftKvError>>,
}

/// A member's handle: implements [`CoordinationStore`] over the member's driver task.
#[derive(Clone)]
pub struct EmbeddedStore {
    proposals: mpsc::Sender<Proposal>,
    state: watch::Receiver<Arc<KvState>>,
    member: watch::Receiver<MemberStatus>,
}

/// What a member knows of its Raft group.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemberStatus {
    /// The Raft leader, when one is known.
    pub leader: Option<RaftId>,
    /// The last entry applied to this member's state.
    pub applied: u64,
    /// The group's voters as this member applied them.
    pub voters: Vec<RaftId>,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO).as_millis() as u64
}

impl EmbeddedStore {
    /// Starts member `id` of `members`, with its Raft log in memory, on an in-process transport.
    pub fn start_local(id: RaftId, members: &[RaftId], transport: LocalTransport) -> std::result::Result<Self, RaftKvError> {
        let node = RaftKv::open(id, RaftLog::in_memory(members), rand::random(), Elections::Randomized)?;
        let inbox = transport.register(id);
        Ok(Self::start(node, inbox, Arc::new(transport)))
    }

    /// Starts driving `node` on the current tokio runtime: it takes Raft messages from `inbox`
    /// and sends through `transport`, and stops when every handle is dropped.
    pub fn start(node: RaftKv, inbox: mpsc::Receiver<Message>, transport: Arc<dyn Transport>) -> Self {
        let (proposals, queue) = mpsc::channel(QUEUE);
        let (state_tx, state) = watch::channel(Arc::new(KvState::default()));
        let (member_tx, member) = watch::channel(MemberStatus::default());
        tokio::spawn(drive(node, inbox, queue, transport, state_tx, member_tx));
        EmbeddedStore { proposals, state, member }
    }

    /// What this member knows of its Raft group.
    pub fn member_status(&self) -> MemberStatus {
        self.member.borrow().clone()
    }

    async fn write(&self, op: Op) -> Result<Outcome> {
        let mut last_error = String::new();
        let deadline = tokio::time::Instant::now() + WRITE_DEADLINE;
        let mut attempt = 0u32;
        while tokio::time::Instant::now() < deadline {
            attempt += 1;
            let (reply, outcome) = oneshot::channel();
            self.proposals
                .send(Proposal { op: op.clone(), reply })
                .await
                .map_err(|_| CoordinationError::Unavailable("the member stopped".into()))?;
            match tokio::time::timeout(PROPOSAL_TIMEOUT, outcome).await {
                Ok(Ok(Ok(outcome))) => return Ok(outcome),
                Ok(Ok(Err(e))) => last_error = e.to_string(),
                Ok(Err(_)) => last_error = "the member dropped the proposal".into(),
                Err(_) => last_error = format!("no outcome within {PROPOSAL_TIMEOUT:?}"),
            }
            tokio::time::sleep(write_backoff(attempt, rand::random())).await;
        }
        Err(CoordinationError::Unavailable(format!("no quorum answered within {WRITE_DEADLINE:?} ({attempt} attempts): {last_error}")))
    }
}

/// What a member's task does with each input, without I/O or a clock of its own: `drive` runs
/// it on tokio, the simulator (`sim/cluster.rs`) on its own loop and time. `W` is whatever waits
/// for a proposal's outcome (a reply channel, or the simulator's call id).
pub struct MemberCore<W> {
    node: RaftKv,
    /// Proposals waiting for their outcome, by proposal id.
    waiting: std::collections::BTreeMap<u64, W>,
    /// Whether the node led at the end of the last cycle.
    leading: bool,
    /// When the leader last proposed a clock tick, by the caller's monotonic clock (`None`:
    /// not yet).
    last_tick_mono_ms: Option<u64>,
    known_leader: Option<RaftId>,
}

/// What one cycle of a member produced: messages for the other members, and the outcomes of
/// waiting proposals (an error when one may have been lost with a leader).
pub struct Cycle<W> {
    pub messages: Vec<Message>,
    pub answers: Vec<(W, std::result::Result<Outcome, RaftKvError>)>,
}

impl<W> MemberCore<W> {
    pub fn new(node: RaftKv) -> Self {
        let known_leader = node.leader();
        MemberCore { node, waiting: Default::default(), leading: false, last_tick_mono_ms: None, known_leader }
    }

    pub fn node(&self) -> &RaftKv {
        &self.node
    }

    /// Every [`TICK`], at `now_ms` by this node's wall clock and `mono_ms` by its monotonic one.
    pub fn tick(&mut self, now_ms: u64, mono_ms: u64) {
        self.node.tick();
        // A session is due: expire it now rather than at the next periodic tick (at most one
        // clock tick per TICK, whatever the wall clock does).
        let due = self.node.state().next_expiry_ms().is_some_and(|at| at <= now_ms);
        let quiet = self.last_tick_mono_ms.is_none_or(|at| mono_ms.saturating_sub(at) >= TICK.as_millis() as u64);
        if due && self.node.is_leader() && quiet {
            self.last_tick_mono_ms = Some(mono_ms);
            let _ = self.node.propose(Op::Tick, now_ms);
        }
    }

    /// Every [`EXPIRY_TICK`]: the leader moves the store's clock.
    pub fn expiry_tick(&mut self, now_ms: u64, mono_ms: u64) {
        if self.node.is_leader() {
            self.last_tick_mono_ms = Some(mono_ms);
            let _ = self.node.propose(Op::Tick, now_ms);
        }
    }

    /// A message from another member.
    pub fn step(&mut self, message: Message) {
        let _ = self.node.step(message);
    }

    /// Proposes `op` for `waiter`; gives the waiter back with the error when it cannot be.
    pub fn propose(&mut self, op: Op, now_ms: u64, waiter: W) -> std::result::Result<(), (W, RaftKvError)> {
        match self.node.propose(op, now_ms) {
            Ok(id) => {
                self.waiting.insert(id, waiter);
                Ok(())
            }
            Err(e) => Err((waiter, e)),
        }
    }

    /// Forgets the waiters `keep` says no longer wait.
    pub fn retain_waiting(&mut self, mut keep: impl FnMut(&W) -> bool) {
        self.waiting.retain(|_, w| keep(w));
    }

    /// After every input: the ready cycle (persist, apply, messages), a new leader's
    /// `RenewAll`, and the outcomes of waiting proposals. An error means raft-rs moved past the
    /// cycle's entries: the member must stop (going on would leave its state short of them).
    pub fn cycle(&mut self, now_ms: u64) -> std::result::Result<Cycle<W>, RaftKvError> {
        let messages = self.node.handle_ready()?;
        // A new leader first gives every session at least half a TTL: while the group had no
        // leader, nobody could renew, and its first expiry tick must not count that against them.
        if self.node.is_leader() != self.leading {
            self.leading = self.node.is_leader();
            if self.leading {
                let _ = self.node.propose(Op::RenewAll, now_ms);
            }
        }
        let mut answers = Vec::new();
        for (id, outcome) in self.node.take_outcomes() {
            if let Some(waiter) = self.waiting.remove(&id) {
                answers.push((waiter, Ok(outcome)));
            }
        }
        // Proposals made to a leader that is gone may be lost: their callers retry now rather
        // than after PROPOSAL_TIMEOUT (a retried write is idempotent or re-checked by its caller).
        // After the outcomes above, so a proposal applied in this very cycle gets its own.
        if self.node.leader() != self.known_leader {
            self.known_leader = self.node.leader();
            answers.extend(std::mem::take(&mut self.waiting).into_values().map(|w| (w, Err(RaftKvError::LeaderChanged))));
        }
        Ok(Cycle { messages, answers })
    }
}

/// The pause before a write's next attempt: a little more each time, with jitter (`random`
/// draws it) so members do not retry in step.
pub(crate) fn write_backoff(attempt: u32, random: u64) -> Duration {
    TICK * attempt.min(10) + Duration::from_millis(random % 50)
}

/// The member's task: ticks, messages, proposals, ready cycles ([`MemberCore`]).
async fn drive(
    node: RaftKv,
    mut inbox: mpsc::Receiver<Message>,
    mut queue: mpsc::Receiver<Proposal>,
    transport: Arc<dyn Transport>,
    state: watch::Sender<Arc<KvState>>,
    member: watch::Sender<MemberStatus>,
) {
    let mut core: MemberCore<oneshot::Sender<std::result::Result<Outcome, RaftKvError>>> = MemberCore::new(node);
    let mut ticks = tokio::time::interval(TICK);
    let mut expiry = tokio::time::interval(EXPIRY_TICK);
    let mut published = 0;
    let started = std::time::Instant::now();
    let mono_ms = || started.elapsed().as_millis() as u64;
    loop {
        tokio::select! {
            _ = ticks.tick() => core.tick(now_ms(), mono_ms()),
            _ = expiry.tick() => core.expiry_tick(now_ms(), mono_ms()),
            message = inbox.recv() => match message {
                Some(message) => core.step(message),
                None => return,
            },
            proposal = queue.recv() => match proposal {
                Some(Proposal { op, reply }) => {
                    if let Err((reply, e)) = core.propose(op, now_ms(), reply) {
                        let _ = reply.send(Err(e));
                    }
                }
                // Every handle is gone: the member stops.
                None => return,
            },
        }
        match core.cycle(now_ms()) {
            Ok(cycle) => {
                cycle.messages.into_iter().for_each(|m| transport.send(m));
                // The state first, then the answers: a caller that reads after its write returned
                // sees the write (read-your-writes, as Consul's consistent reads give).
                let node = core.node();
                if node.applied() != published {
                    published = node.applied();
                    state.send_replace(Arc::new(node.state().clone()));
                }
                for (reply, outcome) in cycle.answers {
                    let _ = reply.send(outcome);
                }
            }
            Err(e) => {
                // raft-rs has moved past the cycle's entries: going on would leave this member's
                // state short of them. It stops; its callers get "the member stopped", this
                // node's sessions lapse, and the other members carry on.
                tracing::error!(error = %e, "coordination member failed a ready cycle; it stops");
                return;
            }
        }
        // Callers whose proposal was lost gave up after their timeout; forget them.
        core.retain_waiting(|reply| !reply.is_closed());
        let node = core.node();
        if node.applied() != published {
            published = node.applied();
            state.send_replace(Arc::new(node.state().clone()));
        }
        member.send_if_modified(|m| {
            if (m.leader, m.applied) == (node.leader(), node.applied()) {
                return false;
            }
            *m = MemberStatus { leader: node.leader(), applied: node.applied(), voters: node.voters() };
            true
        });
    }
}

/// What the embedded store's [`CoordinationStore`] needs of a member, shared by the node's
/// [`EmbeddedStore`] and the simulator's (`sim/cluster.rs`): writes are proposals that come back
/// with their outcome, reads see the member's applied state.
pub trait RaftMember: Send + Sync + 'static {
    /// Proposes `op` (trying again through elections and lost proposals) and returns its outcome.
    fn write(&self, op: Op) -> impl Future<Output = Result<Outcome>> + Send;
    /// Reads the member's applied state.
    fn read<T>(&self, read: impl FnOnce(&KvState) -> T) -> Result<T>;
    /// Resolves once the applied state's index passes `index`, or after `wait`.
    fn changed_after(&self, index: u64, wait: Duration) -> impl Future<Output = ()> + Send;
}

impl RaftMember for EmbeddedStore {
    fn write(&self, op: Op) -> impl Future<Output = Result<Outcome>> + Send {
        EmbeddedStore::write(self, op)
    }

    fn read<T>(&self, read: impl FnOnce(&KvState) -> T) -> Result<T> {
        Ok(read(&self.state.borrow()))
    }

    async fn changed_after(&self, index: u64, wait: Duration) {
        let mut state = self.state.clone();
        let _ = tokio::time::timeout(wait, state.wait_for(|s| s.index() > index)).await;
    }
}

fn done(outcome: Outcome) -> Result<bool> {
    match outcome {
        Outcome::Done(done) => Ok(done),
        other => Err(CoordinationError::Other(format!("unexpected outcome {other:?}"))),
    }
}

impl<M: RaftMember> CoordinationStore for M {
    async fn create_session(&self, node: &str, ttl: Duration) -> Result<SessionId> {
        match self.write(Op::CreateSession { node: node.into(), ttl_ms: ttl.as_millis() as u64 }).await? {
            Outcome::Session(id) => Ok(id),
            other => Err(CoordinationError::Other(format!("unexpected outcome {other:?}"))),
        }
    }

    async fn renew_session(&self, session: &SessionId) -> Result<bool> {
        done(self.write(Op::RenewSession { session: session.clone() }).await?)
    }

    async fn destroy_session(&self, session: &SessionId) -> Result<()> {
        done(self.write(Op::DestroySession { session: session.clone() }).await?).map(|_| ())
    }

    async fn get(&self, key: &str) -> Result<Option<KvEntry>> {
        self.read(|s| s.get(key).cloned())
    }

    async fn list(&self, prefix: &str, min_index: u64, wait: Duration) -> Result<Listing> {
        if min_index > 0 {
            self.changed_after(min_index, wait).await;
        }
        self.read(|s| Listing { entries: s.list(prefix), index: s.index() })
    }

    async fn put(&self, key: &str, value: &[u8], cas: Cas) -> Result<bool> {
        done(self.write(Op::Put { key: key.into(), value: value.to_vec(), cas }).await?)
    }

    async fn delete(&self, key: &str, cas: Cas) -> Result<bool> {
        done(self.write(Op::Delete { key: key.into(), cas }).await?)
    }

    async fn acquire(&self, key: &str, value: &[u8], session: &SessionId) -> Result<Option<u64>> {
        match self.write(Op::Acquire { key: key.into(), value: value.to_vec(), session: session.clone() }).await? {
            Outcome::Acquired(index) => Ok(index),
            other => Err(CoordinationError::Other(format!("unexpected outcome {other:?}"))),
        }
    }

    async fn release(&self, key: &str, session: &SessionId) -> Result<bool> {
        done(self.write(Op::Release { key: key.into(), session: session.clone() }).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coordination::election::{ClusterView, Elector, ElectorConfig};

    const IDS: [RaftId; 3] = [1, 2, 3];

    fn elector(store: EmbeddedStore, node: &str) -> Elector<EmbeddedStore> {
        Elector::new(
            Arc::new(store),
            ElectorConfig {
                node: node.into(),
                address: format!("{node}:7400"),
                partitions: 8,
                replication_factor: 3,
                session_ttl: Duration::from_secs(2),
                prefix: "anthill/".into(),
            },
        )
    }

    async fn rounds(electors: &mut [&mut Elector<EmbeddedStore>], times: usize) -> ClusterView {
        let mut view = ClusterView::default();
        for _ in 0..times {
            for e in electors.iter_mut() {
                view = e.round().await.unwrap();
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        view
    }

    /// The conformance suite of every store (`conformance.rs`), unchanged, against the embedded
    /// store: a three-member Raft group in one process, called through one member. It expires a
    /// session within a store tick of one TTL after its last renewal (its clock moves with the
    /// leader's ticks), hence `expires_after`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_embedded_store_passes_the_coordination_store_conformance_suite() {
        let transport = LocalTransport::default();
        let stores: Vec<EmbeddedStore> = IDS.iter().map(|&id| EmbeddedStore::start_local(id, &IDS, transport.clone()).unwrap()).collect();
        let ttl = Duration::from_secs(1);
        let timing = crate::coordination::conformance::Timing { ttl, expires_after: ttl - EXPIRY_TICK, expires_within: ttl };
        crate::coordination::conformance::run(&stores[1], "conformance/", timing).await;
    }

    /// The ownership algorithm over the real Raft store (three members in one process): leaders
    /// are elected, and when one member's node stops and its Raft member is cut off, its
    /// partitions fail over with a higher epoch through the two that remain.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn given_a_raft_backed_store_then_ownership_elects_and_fails_over() {
        let transport = LocalTransport::default();
        let stores: Vec<EmbeddedStore> = IDS.iter().map(|&id| EmbeddedStore::start_local(id, &IDS, transport.clone()).unwrap()).collect();
        let (mut a, mut b, mut c) =
            (elector(stores[0].clone(), "node-1"), elector(stores[1].clone(), "node-2"), elector(stores[2].clone(), "node-3"));
        let before = rounds(&mut [&mut a, &mut b, &mut c], 3).await;
        assert_eq!(before.members.len(), 3, "{before:?}");
        assert!(before.partitions.values().all(|o| o.leader.as_ref().is_some_and(|(_, epoch)| *epoch == 1)), "{before:?}");
        let lost = before.led_by("node-2");
        assert!(!lost.is_empty());

        // node-2 dies: its elector stops and its Raft member is cut off.
        drop(b);
        transport.disconnect(2);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let after = loop {
            let view = rounds(&mut [&mut a, &mut c], 1).await;
            let moved =
                lost.keys().all(|p| view.partitions[p].leader.as_ref().is_some_and(|(leader, epoch)| leader != "node-2" && *epoch == 2));
            if moved || tokio::time::Instant::now() > deadline {
                break view;
            }
        };
        for p in lost.keys() {
            let (leader, epoch) = after.partitions[p].leader.clone().expect("a new leader");
            assert_ne!(leader, "node-2", "partition {p}");
            assert_eq!(epoch, 2, "partition {p}");
        }
        assert!(!after.members.contains_key("node-2"));
    }
}
