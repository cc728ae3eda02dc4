//! A whole cluster on one thread: N nodes (3 to 7), each with its member of the embedded
//! coordination store (the real [`RaftKv`] driven by the real [`MemberCore`]), the real ownership
//! algorithm ([`Elector`], an async function polled by hand against the member), and a real
//! [`Replica`](crate::replication::replica::Replica) per partition placed on it
//! ([`super::model`]); clients send commands to the node the cluster view names as a
//! partition's leader. Raft messages and replication messages share one simulated network.
//!
//! Nothing grants leadership here but the store: sessions expire after their TTL by the Raft
//! leader's clock (each node's clock is skewed), the first live replica of a set takes a free
//! lock, and the lock index is the epoch. Faults: message loss, duplication, delay and
//! reordering; connection resets; a node cut off from all or some of the others, both ways or
//! one way; process crashes (a node keeps its Raft log and what its replicas synced, loses the
//! rest) and restarts; process pauses longer than a session TTL (a leader wakes up believing it
//! still leads); retention trims. After the storm everything heals and every partition must
//! take writes again within [`LIVENESS_MS`]; then the load stops and each partition's replicas
//! must hold the same fully committed log, books that replay it, and every acknowledged write.
//!
//! What differs from a node process, and why it does not matter to what is checked: the shells
//! (tokio tasks, gRPC, LMDB) are replaced by this loop; the store's writes retry with the
//! production constants ([`write_backoff`], [`PROPOSAL_TIMEOUT`], [`WRITE_DEADLINE`]) but on
//! simulated time; the router is modelled by a client that asks a random node's view.

use std::collections::{BTreeMap, BTreeSet};
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll, Waker};
use std::time::Duration;

use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::model::{Clients, Ctx, Event, History, Node as Replicant, Proposal, Stats, Trace, check_converged, kind_of};
use super::{Outcome, failure_of};
use crate::coordination::driver::{EXPIRY_TICK, MemberCore, PROPOSAL_TIMEOUT, RaftMember, TICK, WRITE_DEADLINE, write_backoff};
use crate::coordination::election::{ClusterView, DrainSwitch, Elector, ElectorConfig, Handovers, Placement};
use crate::coordination::embedded::{RaftId, RaftKv, RaftKvError};
use crate::coordination::member::{PREFIX, retry_delay};
use crate::coordination::raft_log::RaftLog;
use crate::coordination::state::{KvState, Op, Outcome as KvOutcome};
use crate::coordination::{Cas, CoordinationError, Result as KvResult};
use crate::replication::manager::{HANDOVER_PAUSE, HandoverStep, next_handover_step, same_members};
use crate::replication::message::Message;
use crate::replication::replica::{ReplicaConfig, Role};
use crate::replication::{Epoch, NodeId, Position};

/// A session's TTL: the node's default (`cluster.session_ttl_ms`).
pub const SESSION_TTL_MS: u64 = 1_000;
/// Simulated milliseconds of faults by default, then of calm with load, then at most this long
/// without load for the logs to settle.
pub const STORM_MS: u64 = 8_000;
pub const CALM_MS: u64 = 6_000;
const SETTLE_MS: u64 = 10_000;
/// After the network heals and every node is back, each partition must acknowledge a new write
/// within this long: a session TTL for the dead leaders' locks, a Raft election, rounds.
pub const LIVENESS_MS: u64 = 5_000;
/// How far a node's clock may be off the simulation's, either way.
const MAX_SKEW_MS: u64 = 400;
/// Wall clocks start here, so a clock behind the simulation's stays positive.
const EPOCH_MS: u64 = 1_000_000;
/// Events of the cluster itself (not of one partition) in the trace.
const CLUSTER: u32 = u32::MAX;
/// Applied entries between the coordination members' snapshots.
const STORE_COMPACT_EVERY: u64 = 40;
/// The replication factor.
const FACTOR: usize = 3;

/// One run of the whole-cluster simulation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    pub seed: u64,
    pub nodes: u64,
    pub partitions: u32,
    pub storm_ms: u64,
    pub calm_ms: u64,
}

impl Options {
    pub fn new(seed: u64, nodes: u64) -> Self {
        Options { seed, nodes, partitions: 3, storm_ms: STORM_MS, calm_ms: CALM_MS }
    }
}

/// A node's member of the coordination store, shared by the simulation (which steps it) and
/// the node's elector (which calls it through [`SimStore`]).
struct Member {
    /// `None` while the process is down.
    core: Option<MemberCore<u64>>,
    /// Outcomes of calls, for their futures to take.
    answers: BTreeMap<u64, Result<KvOutcome, RaftKvError>>,
    next_call: u64,
    /// Simulated time (monotonic) and this node's wall clock (skewed), in milliseconds.
    now_ms: u64,
    wall_ms: u64,
    /// Jitter of retries.
    rng: StdRng,
    /// Stall the process once its elector proposes a placement's compare-and-set (a switch
    /// after a handover), and whether it did.
    stall_on_switch: bool,
    stalled: bool,
}

/// The elector's coordination store: calls become proposals to the node's member, answered when
/// the simulation runs the member's cycles; waits are on simulated time.
#[derive(Clone)]
struct SimStore(Arc<Mutex<Member>>);

fn stopped() -> CoordinationError {
    CoordinationError::Unavailable("the member stopped".into())
}

impl SimStore {
    fn now_ms(&self) -> u64 {
        self.0.lock().now_ms
    }

    async fn until(&self, at_ms: u64) {
        poll_fn(|_| if self.now_ms() >= at_ms { Poll::Ready(()) } else { Poll::Pending }).await
    }

    /// Proposes `op` and waits for its outcome, or its loss, or [`PROPOSAL_TIMEOUT`].
    async fn attempt(&self, op: &Op) -> KvResult<Result<KvOutcome, String>> {
        let call = {
            let mut m = self.0.lock();
            let (call, wall_ms) = (m.next_call, m.wall_ms);
            m.next_call += 1;
            let switch = m.stall_on_switch && m.core.as_ref().is_some_and(|core| is_switch(core.node().state(), op));
            let core = m.core.as_mut().ok_or_else(stopped)?;
            match core.propose(op.clone(), wall_ms, call) {
                Ok(()) => {
                    if switch {
                        m.stall_on_switch = false;
                        m.stalled = true;
                    }
                    call
                }
                Err((_, e)) => return Ok(Err(e.to_string())),
            }
        };
        let timeout_at = self.now_ms() + PROPOSAL_TIMEOUT.as_millis() as u64;
        poll_fn(|_| {
            let mut m = self.0.lock();
            match m.answers.remove(&call) {
                Some(answer) => Poll::Ready(Ok(answer.map_err(|e| e.to_string()))),
                None if m.core.is_none() => Poll::Ready(Err(stopped())),
                None if m.now_ms >= timeout_at => Poll::Ready(Ok(Err(format!("no outcome within {PROPOSAL_TIMEOUT:?}")))),
                None => Poll::Pending,
            }
        })
        .await
    }
}

impl RaftMember for SimStore {
    async fn write(&self, op: Op) -> KvResult<KvOutcome> {
        let deadline = self.now_ms() + WRITE_DEADLINE.as_millis() as u64;
        let (mut attempt, mut last_error) = (0u32, String::new());
        while self.now_ms() < deadline {
            attempt += 1;
            match self.attempt(&op).await? {
                Ok(outcome) => return Ok(outcome),
                Err(e) => last_error = e,
            }
            let random = self.0.lock().rng.random();
            self.until(self.now_ms() + write_backoff(attempt, random).as_millis() as u64).await;
        }
        Err(CoordinationError::Unavailable(format!("no quorum answered ({attempt} attempts): {last_error}")))
    }

    fn read<T>(&self, read: impl FnOnce(&KvState) -> T) -> KvResult<T> {
        let m = self.0.lock();
        Ok(read(m.core.as_ref().ok_or_else(stopped)?.node().state()))
    }

    async fn changed_after(&self, index: u64, wait: Duration) {
        let at_ms = self.now_ms() + wait.as_millis() as u64;
        poll_fn(|_| {
            let m = self.0.lock();
            let changed = m.core.as_ref().is_none_or(|core| core.node().state().index() > index);
            if changed || m.now_ms >= at_ms { Poll::Ready(()) } else { Poll::Pending }
        })
        .await
    }
}

/// Whether `op` switches a partition's replica set to the target it was moving to (a claim or a
/// new target writes a placement too).
fn is_switch(state: &KvState, op: &Op) -> bool {
    let Op::Put { key, value, cas: Cas::ModifyIndex(_) } = op else { return false };
    let placement = |bytes: &[u8]| Placement::decode(&String::from_utf8_lossy(bytes));
    let current = state.get(key).and_then(|entry| placement(&entry.value));
    match (current, placement(value)) {
        (Some(current), Some(new)) => !current.target.is_empty() && new.replicas == current.target,
        _ => false,
    }
}

/// The node's ownership loop, as `coordination/member.rs` runs it: a round, the view it saw
/// published, then a wait for a change (or a reported handover), with a pause after a failed one.
async fn run_elector(mut elector: Elector<SimStore>, store: SimStore, view: Arc<Mutex<Option<ClusterView>>>) {
    let ttl = Duration::from_millis(SESSION_TTL_MS);
    let (mut index, mut failed_waits) = (0, 0u32);
    loop {
        if let Ok(seen) = elector.round().await {
            index = seen.index;
            *view.lock() = Some(seen);
        }
        let handovers = elector.handovers();
        let waited = {
            let wait = std::pin::pin!(elector.wait(index, ttl / 3));
            let reported = std::pin::pin!(handovers.reported());
            match futures_util::future::select(wait, reported).await {
                futures_util::future::Either::Left((waited, _)) => waited,
                futures_util::future::Either::Right(_) => Ok(()),
            }
        };
        if waited.is_ok() {
            failed_waits = 0;
            continue;
        }
        failed_waits = failed_waits.saturating_add(1);
        let random = store.0.lock().rng.random();
        let delay = retry_delay(failed_waits, ttl, random);
        store.until(store.now_ms() + delay.as_millis() as u64).await;
    }
}

/// One node's replica of a partition and what its shell keeps beside it.
struct Part {
    replica: Replicant,
    /// Whether the node replicates the partition now (its task runs).
    active: bool,
    /// The highest epoch the store granted this node (this incarnation).
    granted: Epoch,
    /// The set the store names, and the set it moves to, as last applied.
    members: Vec<NodeId>,
    target: Vec<NodeId>,
    target_names: Vec<String>,
    /// The handover: the epoch it was reported in, when the pause began, no pause before.
    reported: Epoch,
    paused_at: Option<u64>,
    not_before: Option<u64>,
}

type ElectorTask = Pin<Box<dyn Future<Output = ()> + Send>>;

/// What a view applied to the replicas was: the store's index, the node's session, and the
/// partitions it hands back (its own intent, which moves no index).
type AppliedView = (u64, Option<crate::coordination::SessionId>, BTreeSet<u32>);

struct SimNode {
    name: String,
    member: SimStore,
    /// The Raft log a crash leaves (taken from the member when it goes down).
    raft_log: Option<RaftLog>,
    elector: Option<ElectorTask>,
    handovers: Arc<Handovers>,
    /// The process's drain switch (`Node.Drain`); a new process does not drain.
    drain: Option<DrainSwitch>,
    view: Arc<Mutex<Option<ClusterView>>>,
    /// The index of the view last applied to the replicas.
    applied_view: Option<AppliedView>,
    parts: BTreeMap<u32, Part>,
    up: bool,
    down_until: u64,
    paused_until: u64,
    skew_ms: i64,
    incarnation: u64,
    /// Where in each store tick period this incarnation's ticks fall (a random phase per
    /// process breaks election ties).
    tick_phase: u64,
}

/// A message in flight.
#[derive(Clone)]
enum Wire {
    Raft(raft::eraftpb::Message),
    Replica(u32, Message),
}

struct Sim {
    rng: StdRng,
    nodes: Vec<SimNode>,
    partitions: u32,
    /// Due step and sequence number to (from, to, message).
    network: BTreeMap<(u64, u64), (NodeId, NodeId, Wire)>,
    sent: u64,
    step: u64,
    storm: bool,
    /// Client load on (off while the logs settle at the end).
    load: bool,
    histories: Vec<History>,
    /// The clients of each partition's book (a retry goes to the same book).
    clients: Vec<Clients>,
    /// A node cut off from some others until a step: both ways, or only what it sends
    /// (`Some(true)`), or only what it receives (`Some(false)`).
    isolated: Option<(NodeId, Vec<NodeId>, u64, Option<bool>)>,
    /// When the storm ended, and per partition when it first acknowledged a write proposed after.
    healed_at: u64,
    recovered: BTreeMap<u32, u64>,
    /// The replica sets as of the newest view any node saw (its index): to count moves.
    sets: BTreeMap<u32, Vec<String>>,
    newest_view: u64,
    stats: Stats,
    trace: Trace,
}

fn raft_id(n: NodeId) -> RaftId {
    RaftId::from(n) + 1
}

/// Runs one seed; a broken check ends the run and is reported with the events that led to it.
pub fn run(options: &Options) -> Outcome {
    assert!((3..=7).contains(&options.nodes) && options.partitions >= 1, "3 to 7 nodes and at least a partition");
    let mut sim = Sim::new(options);
    let failure = failure_of(std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sim.run(options))), &sim.trace);
    Outcome {
        seed: options.seed,
        nodes: options.nodes,
        partitions: options.partitions,
        trace_hash: format!("{:016x}", sim.trace.hash),
        steps: sim.step,
        acknowledged: sim.histories.iter().map(|h| h.acknowledged.len()).sum(),
        recovery_ms: sim.recovered.values().max().copied(),
        stats: sim.stats,
        failure,
    }
}

impl Sim {
    fn new(options: &Options) -> Self {
        let mut rng = StdRng::seed_from_u64(options.seed);
        let count = options.nodes as NodeId;
        let nodes = (0..count)
            .map(|n| {
                let skew_ms = rng.random_range(-(MAX_SKEW_MS as i64)..=MAX_SKEW_MS as i64);
                let member = Member {
                    core: None,
                    answers: BTreeMap::new(),
                    next_call: 0,
                    now_ms: 0,
                    wall_ms: 0,
                    rng: StdRng::seed_from_u64(rng.random()),
                    stall_on_switch: false,
                    stalled: false,
                };
                let ids: Vec<RaftId> = (0..count).map(raft_id).collect();
                SimNode {
                    name: format!("n{n}"),
                    member: SimStore(Arc::new(Mutex::new(member))),
                    raft_log: Some(RaftLog::in_memory(&ids)),
                    elector: None,
                    handovers: Arc::default(),
                    drain: None,
                    view: Arc::default(),
                    applied_view: None,
                    parts: BTreeMap::new(),
                    up: false,
                    down_until: 0,
                    paused_until: 0,
                    skew_ms,
                    incarnation: 0,
                    tick_phase: 0,
                }
            })
            .collect();
        let mut sim = Sim {
            rng,
            nodes,
            partitions: options.partitions,
            network: BTreeMap::new(),
            sent: 0,
            step: 0,
            storm: true,
            load: true,
            histories: (0..options.partitions).map(|_| History::default()).collect(),
            clients: (0..options.partitions).map(|_| Clients::default()).collect(),
            isolated: None,
            healed_at: 0,
            recovered: BTreeMap::new(),
            sets: BTreeMap::new(),
            newest_view: 0,
            stats: Stats::default(),
            trace: Trace { partitioned: true, ..Trace::default() },
        };
        for n in 0..count {
            sim.start(n);
        }
        sim
    }

    /// Starts node `n`'s process: its member from its Raft log, a new elector (a new session),
    /// and no replica until its view places one.
    fn start(&mut self, n: NodeId) {
        let count = self.nodes.len() as NodeId;
        let tick_phase = self.rng.random_range(0..TICK.as_millis() as u64);
        let node = &mut self.nodes[n as usize];
        node.incarnation += 1;
        node.tick_phase = tick_phase;
        let log = node.raft_log.take().expect("a stopped node keeps its Raft log");
        let mut kv = RaftKv::restart(raft_id(n), log, node.incarnation).expect("the member opens its log");
        let ids: Vec<RaftId> = (0..count).map(raft_id).collect();
        kv.want_voters(&ids);
        // Snapshots every few dozen entries (the node's are every 10,000), so that members
        // compact, and lagging ones install the leader's snapshot, within a run.
        kv.set_compaction(STORE_COMPACT_EVERY);
        kv.set_prefix(PREFIX, (0..count).map(|m| (format!("n{m}"), raft_id(m))).collect());
        {
            let mut member = node.member.0.lock();
            member.core = Some(MemberCore::new(kv));
            member.answers.clear();
        }
        let config = ElectorConfig {
            node: node.name.clone(),
            address: node.name.clone(),
            partitions: self.partitions,
            replication_factor: FACTOR,
            session_ttl: Duration::from_millis(SESSION_TTL_MS),
            prefix: PREFIX.into(),
        };
        let clock_store = node.member.clone();
        let clock = Arc::new(move || Duration::from_millis(clock_store.now_ms()));
        let elector = Elector::new(Arc::new(node.member.clone()), config).with_clock(clock);
        node.handovers = elector.handovers();
        node.drain = Some(elector.drain_switch());
        *node.view.lock() = None;
        node.applied_view = None;
        node.elector = Some(Box::pin(run_elector(elector, node.member.clone(), node.view.clone())));
        node.up = true;
        for part in node.parts.values_mut() {
            part.active = false;
            part.granted = 0;
        }
    }

    fn crash(&mut self, n: NodeId) {
        self.stats.crashes += 1;
        self.trace.note_in(CLUSTER, Event::Crash { step: self.step, node: n });
        let node = &mut self.nodes[n as usize];
        node.up = false;
        node.down_until = self.step + self.rng.random_range(50..3_000);
        node.elector = None;
        let core = node.member.0.lock().core.take().expect("a running node has a member");
        self.stats.store_snapshots_installed += core.node().snapshots_installed();
        node.raft_log = Some(core.node().storage().reopen());
        for part in node.parts.values_mut() {
            part.replica.crash();
            part.active = false;
        }
        for history in &mut self.histories {
            history.proposed.retain(|proposal| proposal.node != n);
        }
    }

    /// Runs node `n`'s replica of `p`: its effects, or (`ticket`) what follows a sync.
    fn drain_or_synced(&mut self, n: NodeId, p: u32, ticket: Option<u64>) {
        let Sim { nodes, histories, stats, trace, step, .. } = self;
        let part = nodes[n as usize].parts.get_mut(&p).expect("an active part");
        let mut cx = Ctx { step: *step, partition: p, history: &mut histories[p as usize], stats, trace };
        match ticket {
            Some(ticket) => part.replica.synced(n, ticket, &mut cx),
            None => part.replica.drain(n, &mut cx),
        }
    }

    fn drain(&mut self, n: NodeId, p: u32) {
        self.drain_or_synced(n, p, None);
    }

    /// A group commit of node `n`: every active replica's writes become durable, then the
    /// messages they held back go out.
    fn sync(&mut self, n: NodeId) {
        let parts: Vec<u32> = self.nodes[n as usize].parts.iter().filter(|(_, part)| part.active).map(|(p, _)| *p).collect();
        for p in parts {
            let Some((ticket, sends)) = self.nodes[n as usize].parts.get_mut(&p).and_then(|part| part.replica.sync()) else { continue };
            for (to, message) in sends {
                self.post(n, to, Wire::Replica(p, message));
            }
            self.drain_or_synced(n, p, Some(ticket));
        }
    }

    fn cut_off(&self, from: NodeId, to: NodeId) -> bool {
        self.isolated.as_ref().is_some_and(|(n, others, until, way)| {
            let sent = *n == from && others.contains(&to) && *way != Some(false);
            let received = *n == to && others.contains(&from) && *way != Some(true);
            (sent || received) && self.step < *until
        })
    }

    fn post(&mut self, from: NodeId, to: NodeId, wire: Wire) {
        if self.storm && (self.cut_off(from, to) || self.rng.random_bool(0.05)) {
            self.stats.lost_messages += 1;
            let kind = match &wire {
                Wire::Raft(_) => "Raft",
                Wire::Replica(_, message) => kind_of(message),
            };
            self.trace.note_in(CLUSTER, Event::Lost { step: self.step, from, to, kind });
            return;
        }
        if self.storm && self.rng.random_bool(0.02) {
            self.send(from, to, wire.clone());
        }
        self.send(from, to, wire);
    }

    fn send(&mut self, from: NodeId, to: NodeId, wire: Wire) {
        let delay = if self.storm { self.rng.random_range(1..20) } else { self.rng.random_range(1..3) };
        // A stopped process sends nothing until it wakes.
        let sent_at = self.step.max(self.nodes[from as usize].paused_until);
        self.sent += 1;
        self.network.insert((sent_at + delay, self.sent), (from, to, wire));
    }

    fn running(&self, n: NodeId) -> bool {
        let node = &self.nodes[n as usize];
        node.up && node.paused_until <= self.step
    }

    /// Delivers what is due, in a random order among the due ones.
    fn deliver(&mut self) {
        let later = self.network.split_off(&(self.step + 1, 0));
        let mut due: Vec<(NodeId, NodeId, Wire)> = std::mem::replace(&mut self.network, later).into_values().collect();
        while !due.is_empty() {
            let (from, to, wire) = due.swap_remove(self.rng.random_range(0..due.len()));
            let node = &self.nodes[to as usize];
            if !node.up {
                continue;
            }
            if node.paused_until > self.step {
                // A stopped process reads nothing; its connections hold what was sent until it
                // wakes up.
                self.sent += 1;
                self.network.insert((node.paused_until, self.sent), (from, to, wire));
                continue;
            }
            match wire {
                Wire::Raft(message) => {
                    self.trace.note_in(CLUSTER, Event::Deliver { step: self.step, from, to, kind: "Raft", epoch: message.term });
                    if let Some(core) = self.nodes[to as usize].member.0.lock().core.as_mut() {
                        core.step(message);
                    }
                }
                Wire::Replica(p, message) => {
                    let Some(part) = self.nodes[to as usize].parts.get_mut(&p).filter(|part| part.active) else { continue };
                    self.trace.note_in(p, Event::Deliver { step: self.step, from, to, kind: kind_of(&message), epoch: message.epoch() });
                    part.replica.replica.on_message(from, message, &part.replica.log);
                    self.drain(to, p);
                }
            }
        }
    }

    /// Node `n`'s member runs a cycle: its messages go out, its answers wait for their callers.
    fn cycle(&mut self, n: NodeId) {
        let messages = {
            let mut member = self.nodes[n as usize].member.0.lock();
            let wall_ms = member.wall_ms;
            let Some(core) = member.core.as_mut() else { return };
            let cycle = core.cycle(wall_ms).expect("a member's ready cycle succeeds on an in-memory log");
            member.answers.extend(cycle.answers);
            cycle.messages
        };
        for message in messages {
            let to = (message.to - 1) as NodeId;
            self.post(n, to, Wire::Raft(message));
        }
    }

    /// Polls node `n`'s elector once (it runs until it waits on the store or on time).
    fn poll_elector(&mut self, n: NodeId) {
        let Some(task) = self.nodes[n as usize].elector.as_mut() else { return };
        let mut cx = TaskContext::from_waker(Waker::noop());
        assert!(task.as_mut().poll(&mut cx).is_pending(), "the elector loop never ends");
    }

    /// Node `n` replicates what its view places on it, as `follow_ownership` and the partition
    /// tasks do: starts a replica once its set or target names the node, tells it both sets as
    /// they change, stops it once neither does, and grants leadership when the view shows this
    /// session holding the lock with the placement claimed for its epoch.
    fn follow(&mut self, n: NodeId) {
        let view = {
            let node = &self.nodes[n as usize];
            let view = node.view.lock();
            let Some(view) =
                view.as_ref().filter(|v| node.applied_view.as_ref() != Some(&(v.index, v.session.clone(), v.handing_back.clone())))
            else {
                return;
            };
            view.clone()
        };
        self.nodes[n as usize].applied_view = Some((view.index, view.session.clone(), view.handing_back.clone()));
        self.count_moves(&view);
        let id = |name: &String| name.strip_prefix('n').and_then(|i| i.parse::<NodeId>().ok()).expect("members are named n<i>");
        let name = self.nodes[n as usize].name.clone();
        for (p, ownership) in &view.partitions {
            // A draining leader's target is its own set (`ClusterView::target_for`).
            let target_names = view.target_for(*p, &name);
            let (p, members, target) = (*p, ownership.replicas.iter().map(id).collect::<Vec<_>>(), target_names.iter().map(id).collect());
            self.place(n, p, members, target, target_names);
            if let Some(epoch) = view.serving_here(p, &name)
                && let Some(part) = self.nodes[n as usize].parts.get_mut(&p).filter(|part| part.active && epoch > part.granted)
            {
                part.granted = epoch;
                self.trace.note_in(p, Event::Grant { step: self.step, node: n, epoch });
                if part.replica.replica.become_leader(epoch) {
                    self.stats.leaders += 1;
                }
                self.drain(n, p);
            }
        }
    }

    /// Counts the replica sets that switched, as the newest view seen so far shows them.
    fn count_moves(&mut self, view: &ClusterView) {
        if view.index <= self.newest_view {
            return;
        }
        self.newest_view = view.index;
        for (p, ownership) in &view.partitions {
            let before = self.sets.insert(*p, ownership.replicas.clone());
            if before.is_some_and(|before| !crate::coordination::election::same_set(&before, &ownership.replicas)) {
                self.stats.moves += 1;
                let members = ownership.replicas.iter().fold(0u64, |set, name| set | 1 << name[1..].parse::<u64>().unwrap_or(63));
                self.trace.note_in(*p, Event::Move { step: self.step, members });
            }
        }
    }

    /// Partition `p`'s replica set is `members`, moving to `target`, as node `n` sees it.
    fn place(&mut self, n: NodeId, p: u32, members: Vec<NodeId>, target: Vec<NodeId>, target_names: Vec<String>) {
        let step = self.step;
        let node = &mut self.nodes[n as usize];
        let here = members.contains(&n) || target.contains(&n);
        let set = if members.contains(&n) { members.clone() } else { target.clone() };
        let config = ReplicaConfig { me: n, members: set.clone(), max_batch_entries: 4, max_inflight_entries: 8, resend_ticks: 3 };
        if !here && !node.parts.contains_key(&p) {
            return;
        }
        let part = node.parts.entry(p).or_insert_with(|| Part {
            replica: Replicant::new(config.clone()),
            active: false,
            granted: 0,
            members: Vec::new(),
            target: Vec::new(),
            target_names: Vec::new(),
            reported: 0,
            paused_at: None,
            not_before: None,
        });
        if !here {
            if part.active {
                // The task stops; what it wrote stays on disk (a sync first, as its writes
                // were each durable before the next).
                part.active = false;
                let _ = part.replica.sync();
                self.histories[p as usize].proposed.retain(|proposal| proposal.node != n);
            }
            return;
        }
        if !part.active {
            // A task started anew: nothing granted, no handover under way.
            part.replica.restart(config, target.clone(), step * 1_000_000);
            part.active = true;
            (part.granted, part.reported, part.paused_at, part.not_before) = (0, 0, None, None);
            (part.members, part.target, part.target_names) = (members, target, target_names);
            return;
        }
        let regroup = part.target != target || !same_members(&part.members, &members);
        (part.members, part.target, part.target_names) = (members, target.clone(), target_names);
        if regroup {
            part.replica.replica.set_members(set);
            part.replica.replica.set_target(target);
            self.drain(n, p);
        }
    }

    /// A leader with a target: pauses, reports the handover, or resumes, by the node's own
    /// decision ([`next_handover_step`]).
    fn drive_handover(&mut self, n: NodeId, p: u32) {
        let step = self.step;
        let node = &mut self.nodes[n as usize];
        let Some(part) = node.parts.get_mut(&p).filter(|part| part.active) else { return };
        let paused_for = part.paused_at.map(|at| Duration::from_millis(step - at));
        let may_pause = part.not_before.is_none_or(|t| step >= t);
        let replica = &mut part.replica.replica;
        let epoch = replica.promised();
        match next_handover_step(replica, part.reported, paused_for, may_pause) {
            HandoverStep::NotLeading => part.paused_at = None,
            HandoverStep::Stay => {}
            HandoverStep::CallOff => {
                part.paused_at = None;
                replica.pause(false);
            }
            HandoverStep::Pause => {
                replica.pause(true);
                part.paused_at = Some(step);
            }
            HandoverStep::Report => {
                part.reported = epoch;
                part.paused_at = None;
                node.handovers.report(p, epoch, part.target_names.clone());
                self.stats.handovers += 1;
                if same_members(&part.target, &part.members) {
                    // A handover of the leadership alone: for a drain, or a hand-back.
                    let draining = node.drain.as_ref().is_some_and(DrainSwitch::is_on);
                    *if draining { &mut self.stats.drain_handovers } else { &mut self.stats.hand_backs } += 1;
                }
                // Now and then the process stalls right after its elector proposes the switch
                // (a rare moment made common): the switch may land long after a later epoch
                // took over, which the placement's claim must fence off.
                node.member.0.lock().stall_on_switch = self.storm && self.rng.random_bool(0.3);
            }
            HandoverStep::Resume => {
                replica.pause(false);
                part.paused_at = None;
                part.not_before = Some(step + HANDOVER_PAUSE.as_millis() as u64);
                self.stats.resumed_pauses += 1;
            }
        }
    }

    /// A client's command: it asks a random running node which node leads a random partition
    /// (the router), and sends it there; a node that does not lead refuses it.
    fn client(&mut self) {
        let p = self.rng.random_range(0..self.partitions);
        let asked = self.rng.random_range(0..self.nodes.len()) as NodeId;
        if !self.running(asked) {
            return;
        }
        let leader = self.nodes[asked as usize].view.lock().as_ref().and_then(|v| v.partitions.get(&p)?.leader.clone());
        let Some((name, _)) = leader else { return };
        let Some(n) = name.strip_prefix('n').and_then(|i| i.parse::<NodeId>().ok()) else { return };
        if !self.running(n) {
            return;
        }
        let step = self.step;
        let size = self.rng.random_range(1..=3);
        let ledger = self.rng.random_bool(0.5);
        // A tenth of requests are linearizable reads.
        let read = self.rng.random_bool(0.1);
        let (id, command) = self.clients[p as usize].request(&mut self.rng);
        let Some(part) = self.nodes[n as usize].parts.get_mut(&p).filter(|part| part.active) else { return };
        if !matches!(part.replica.replica.role(), Role::Leader { .. }) {
            return;
        }
        if read {
            if self.histories[p as usize].read(n, &mut part.replica) {
                self.drain(n, p);
            }
            return;
        }
        let group = if ledger {
            let Sim { histories, stats, trace, .. } = self;
            let mut cx = Ctx { step, partition: p, history: &mut histories[p as usize], stats, trace };
            part.replica.ledger_request(n, &id, &command, step, &mut cx)
        } else {
            (0..size).map(|i| format!("s{step}-n{n}-{i}").into_bytes()).collect()
        };
        if let Some(last) = part.replica.replica.propose(group.clone()) {
            let epoch = part.replica.replica.promised();
            assert_ne!(part.reported, epoch, "node {n} took a proposal in epoch {epoch} of partition {p}, which it handed over");
            self.histories[p as usize].proposed.push(Proposal { node: n, epoch, last, group, at: step, duplicate: false });
            self.trace.note_in(p, Event::Propose { step, node: n, last });
            self.drain(n, p);
        }
    }

    /// Retention on node `n`'s replica of `p` (`model::Node::trim`).
    fn trim(&mut self, n: NodeId, p: u32) {
        let Some(part) = self.nodes[n as usize].parts.get_mut(&p).filter(|part| part.active) else { return };
        if let Some(floor) = part.replica.trim(&mut self.rng) {
            self.stats.trims += 1;
            self.trace.note_in(p, Event::Trim { step: self.step, node: n, floor });
        }
    }

    /// Everything a node does in a millisecond.
    fn node_step(&mut self, n: NodeId) {
        let step = self.step;
        {
            let node = &self.nodes[n as usize];
            let mut member = node.member.0.lock();
            member.now_ms = step;
            member.wall_ms = (EPOCH_MS + step).saturating_add_signed(node.skew_ms);
        }
        if !self.nodes[n as usize].up {
            if self.storm && self.nodes[n as usize].down_until <= step {
                // Its clock may have been set meanwhile.
                if self.rng.random_bool(0.5) {
                    self.nodes[n as usize].skew_ms = self.rng.random_range(-(MAX_SKEW_MS as i64)..=MAX_SKEW_MS as i64);
                }
                self.trace.note_in(CLUSTER, Event::Restart { step, node: n });
                self.start(n);
            }
            return;
        }
        if !self.running(n) {
            return;
        }
        if self.storm && self.rng.random_bool(0.0002) {
            self.crash(n);
            return;
        }
        if self.storm && self.rng.random_bool(0.0002) {
            self.pause(n, 100..2_500);
            return;
        }
        // The member ticks on its own phase (jitter breaks election ties, embedded.rs).
        let phase = self.nodes[n as usize].tick_phase;
        {
            let mut member = self.nodes[n as usize].member.0.lock();
            let wall_ms = member.wall_ms;
            if let Some(core) = member.core.as_mut() {
                if (step + phase).is_multiple_of(TICK.as_millis() as u64) {
                    core.tick(wall_ms, step);
                }
                if (step + phase).is_multiple_of(EXPIRY_TICK.as_millis() as u64) {
                    core.expiry_tick(wall_ms, step);
                }
            }
        }
        self.cycle(n);
        self.poll_elector(n);
        let stalled = std::mem::take(&mut self.nodes[n as usize].member.0.lock().stalled);
        if stalled {
            // Stopped before the proposal's messages left: they go when it wakes.
            self.pause(n, SESSION_TTL_MS..3 * SESSION_TTL_MS);
        }
        self.cycle(n);
        if stalled {
            return;
        }
        self.follow(n);
        let parts: Vec<u32> = self.nodes[n as usize].parts.iter().filter(|(_, part)| part.active).map(|(p, _)| *p).collect();
        for p in parts {
            if self.rng.random_bool(0.1) {
                let part = self.nodes[n as usize].parts.get_mut(&p).expect("an active part");
                part.replica.replica.tick(&part.replica.log);
                self.drain(n, p);
            }
            self.drive_handover(n, p);
            if self.storm && self.rng.random_bool(0.001) {
                self.trim(n, p);
            }
        }
        if self.rng.random_bool(0.5) {
            self.sync(n);
        }
    }

    /// Stops node `n`'s process for a while (`ms`): it neither ticks, runs its elector nor
    /// reads its messages, and wakes up believing what it believed.
    fn pause(&mut self, n: NodeId, ms: std::ops::Range<u64>) {
        let until = self.step + self.rng.random_range(ms);
        self.nodes[n as usize].paused_until = until;
        self.stats.pauses += 1;
        self.trace.note_in(CLUSTER, Event::Pause { step: self.step, node: n, until });
    }

    /// Node `n` wakes from a pause: counts the partitions it still leads in an epoch that a
    /// later one replaced meanwhile (fencing must now hold it off).
    fn woke(&mut self, n: NodeId) {
        for (p, part) in self.nodes[n as usize].parts.iter().filter(|(_, part)| part.active) {
            let replica = &part.replica.replica;
            let latest = self.histories[*p as usize].servers.keys().next_back().copied().unwrap_or(0);
            if matches!(replica.role(), Role::Leader { .. }) && replica.promised() < latest {
                self.stats.paused_leaders_replaced += 1;
            }
        }
    }

    fn faults(&mut self) {
        let count = self.nodes.len() as NodeId;
        if self.rng.random_bool(0.001) {
            // An operator drains the node a random node's view names as a random partition's
            // leader, as before an upgrade (`Node.Drain`), or lets a draining node lead again.
            let (asked, p) = (self.rng.random_range(0..count), self.rng.random_range(0..self.partitions));
            let leader = self.nodes[asked as usize].view.lock().as_ref().and_then(|v| v.partitions.get(&p)?.leader.clone());
            let undrain = self.rng.random_bool(0.3);
            let n = match leader.and_then(|(name, _)| name[1..].parse::<NodeId>().ok()) {
                Some(leader) if !undrain => Some(leader),
                _ => (0..count).find(|m| self.nodes[*m as usize].drain.as_ref().is_some_and(DrainSwitch::is_on)),
            };
            if let Some(n) = n.filter(|n| self.nodes[*n as usize].up)
                && let Some(drain) = self.nodes[n as usize].drain.as_ref()
                && drain.is_on() == undrain
            {
                drain.set(!undrain);
                self.stats.drains += u64::from(!undrain);
                self.trace.note_in(CLUSTER, Event::Drain { step: self.step, node: n, on: !undrain });
            }
        }
        if self.isolated.as_ref().is_none_or(|(_, _, until, _)| *until <= self.step) && self.rng.random_bool(0.001) {
            let n = self.rng.random_range(0..count);
            let all = self.rng.random_bool(0.5);
            let others: Vec<NodeId> = (0..count).filter(|m| *m != n && (all || self.rng.random_bool(0.5))).collect();
            let until = self.step + self.rng.random_range(100..2_500);
            let way = match self.rng.random_range(0..6) {
                0 => Some(true),
                1 => Some(false),
                _ => None,
            };
            self.stats.one_way += u64::from(way.is_some());
            self.isolated = Some((n, others, until, way));
            self.trace.note_in(CLUSTER, Event::Isolate { step: self.step, node: n, until });
        }
        if self.rng.random_bool(0.001) {
            let (a, b) = (self.rng.random_range(0..count), self.rng.random_range(0..count));
            let before = self.network.len();
            self.network.retain(|_, (from, to, _)| !((*from == a && *to == b) || (*from == b && *to == a)));
            self.stats.lost_messages += (before - self.network.len()) as u64;
            self.stats.resets += 1;
            self.trace.note_in(CLUSTER, Event::Reset { step: self.step, a, b });
        }
    }

    fn one_step(&mut self) {
        self.step += 1;
        for n in 0..self.nodes.len() as NodeId {
            if self.nodes[n as usize].up && self.nodes[n as usize].paused_until == self.step {
                self.woke(n);
            }
        }
        self.deliver();
        for n in 0..self.nodes.len() as NodeId {
            self.node_step(n);
        }
        if self.storm {
            self.faults();
        }
        if self.load && self.rng.random_bool(0.3) {
            self.client();
        }
        self.note_recoveries();
        self.check_reads();
        if self.step.is_multiple_of(50) {
            self.audit();
        }
    }

    /// Reads confirmed by their leaders, checked (`History::check_reads`).
    fn check_reads(&mut self) {
        let nodes = &self.nodes;
        for (p, history) in self.histories.iter_mut().enumerate() {
            let p = p as u32;
            let replica_of = |n: NodeId| {
                let node = &nodes[n as usize];
                node.parts.get(&p).filter(|part| node.up && part.active).map(|part| &part.replica.replica)
            };
            self.stats.reads += history.check_reads(replica_of);
        }
    }

    /// Every book, at any moment, keeps the ledger's invariants.
    fn audit(&self) {
        for (n, node) in self.nodes.iter().enumerate() {
            for (p, part) in node.parts.iter().filter(|(_, part)| part.active) {
                if let Err(violations) = part.replica.book.audit() {
                    panic!("node {n}'s ledger of partition {p} breaks its invariants: {violations}");
                }
            }
        }
    }

    /// After the heal, the first write each partition acknowledges that was proposed after it.
    fn note_recoveries(&mut self) {
        if self.storm {
            return;
        }
        for p in 0..self.partitions {
            if self.recovered.contains_key(&p) {
                continue;
            }
            if self.histories[p as usize].latest_acknowledged_at > self.healed_at {
                self.recovered.insert(p, self.step - self.healed_at);
            }
        }
    }

    fn heal(&mut self) {
        self.storm = false;
        self.isolated = None;
        self.healed_at = self.step;
        for n in 0..self.nodes.len() as NodeId {
            self.nodes[n as usize].paused_until = 0;
            self.nodes[n as usize].member.0.lock().stall_on_switch = false;
            if !self.nodes[n as usize].up {
                self.trace.note_in(CLUSTER, Event::Restart { step: self.step, node: n });
                self.start(n);
            }
        }
        // What waited for a paused process to wake goes now.
        let late = self.network.split_off(&(self.step + 20, 0));
        for ((_, seq), message) in late {
            self.network.insert((self.step + 1, seq), message);
        }
    }

    fn run(&mut self, options: &Options) {
        for _ in 0..options.storm_ms {
            self.one_step();
        }
        self.heal();
        for _ in 0..options.calm_ms {
            self.one_step();
        }
        for p in 0..self.partitions {
            let took = self.recovered.get(&p).copied();
            assert!(
                took.is_some_and(|ms| ms <= LIVENESS_MS),
                "partition {p} took no write within {LIVENESS_MS} ms after everything healed (took: {took:?})"
            );
        }
        // The load stops; the logs must settle.
        self.load = false;
        for _ in 0..SETTLE_MS {
            if self.settled() {
                break;
            }
            self.one_step();
        }
        for node in &self.nodes {
            if let Some(core) = node.member.0.lock().core.as_ref() {
                self.stats.store_snapshots_installed += core.node().snapshots_installed();
            }
        }
        self.check(options.seed);
    }

    /// The placement of each partition in the newest view any node has: (replicas, target).
    /// Once settled, every member applied the same store.
    fn placements(&self) -> BTreeMap<u32, (Vec<NodeId>, Vec<NodeId>)> {
        let views = self.nodes.iter().filter_map(|node| node.view.lock().clone());
        let view = views.max_by_key(|view| view.index).expect("some node has a view");
        let id = |name: &String| name.strip_prefix('n').and_then(|i| i.parse::<NodeId>().ok()).expect("members are named n<i>");
        view.partitions.iter().map(|(p, o)| (*p, (o.replicas.iter().map(id).collect(), o.target.iter().map(id).collect()))).collect()
    }

    /// Whether the logs settled: every placement's members hold one fully committed log, and
    /// every coordination member applied the same entries.
    fn settled(&self) -> bool {
        let applied: BTreeSet<u64> =
            self.nodes.iter().filter_map(|node| node.member.0.lock().core.as_ref().map(|core| core.node().applied())).collect();
        let placements = self.placements();
        applied.len() == 1
            && placements.len() == self.partitions as usize
            && placements.iter().all(|(p, (members, target))| {
                let logs: Vec<&Replicant> = members
                    .iter()
                    .filter_map(|n| self.nodes[*n as usize].parts.get(p).filter(|part| part.active))
                    .map(|part| &part.replica)
                    .collect();
                target.is_empty()
                    && logs.len() == members.len()
                    && logs.iter().all(|r| r.replica.commit() == r.log.entries.len() as Position && r.log.entries == logs[0].log.entries)
            })
    }

    fn check(&self, seed: u64) {
        // The coordination store: every member applied the same entries into the same state.
        let states: Vec<(u64, KvState)> = self
            .nodes
            .iter()
            .filter_map(|node| node.member.0.lock().core.as_ref().map(|core| (core.node().applied(), core.node().state().clone())))
            .collect();
        assert_eq!(states.len(), self.nodes.len(), "seed {seed}: a node is down after the heal");
        assert!(
            states.windows(2).all(|pair| pair[0] == pair[1]),
            "seed {seed}: the coordination members did not settle on one state (applied: {:?})",
            states.iter().map(|(applied, _)| applied).collect::<Vec<_>>()
        );
        for (p, (members, target)) in self.placements() {
            assert!(target.is_empty(), "seed {seed}: partition {p}'s move to {target:?} never finished");
            let replicas: Vec<(NodeId, &Replicant)> = members
                .iter()
                .map(|n| {
                    let part = self.nodes[*n as usize].parts.get(&p).filter(|part| part.active);
                    (*n, &part.unwrap_or_else(|| panic!("seed {seed}: node {n} does not replicate partition {p}")).replica)
                })
                .collect();
            check_converged(&self.histories[p as usize], &replicas, &format!("seed {seed}, partition {p}"));
        }
    }
}

/// Runs the seeds `seeds` of `nodes` nodes; returns the writes acknowledged and what the runs
/// went through, having checked that it was a storm.
#[cfg(test)]
fn storms(nodes: u64, seeds: std::ops::Range<u64>) -> (usize, Stats) {
    let (mut acknowledged, mut total, count) = (0, Stats::default(), seeds.end - seeds.start);
    for seed in seeds {
        let outcome = run(&Options::new(seed, nodes));
        if let Some(failure) = &outcome.failure {
            panic!(
                "cluster simulation failed with seed {seed} of {nodes} nodes (rerun: anthill sim --seed {seed} --nodes {nodes}): {}\nlast events:\n{}",
                failure.check,
                failure.recent.join("\n")
            );
        }
        acknowledged += outcome.acknowledged;
        total.add(&outcome.stats);
    }
    eprintln!("{count} seeds of {nodes} nodes: {acknowledged} writes acknowledged; {total:?}");
    // Leaders changed through the store (three to start with, then failovers), nodes crashed
    // and were paused past their TTL, logs were trimmed and snapshots installed, and the load
    // went on: it was a storm, and the protocol was not starved by it.
    assert!(total.leaders > 5 * count && total.crashes > count && total.pauses > count, "{total:?}");
    assert!(total.trims > count && total.installs > count && total.one_way > 0 && total.resets > count, "{total:?}");
    assert!(total.reads > 20 * count, "few linearizable reads were confirmed: {total:?}");
    assert!(total.duplicates > 5 * count, "few retried commands were answered as duplicates: {total:?}");
    assert!(total.store_snapshots_installed > 0, "no coordination member ever installed a snapshot: {total:?}");
    assert!(total.drains >= count / 2 && total.drain_handovers > count / 2, "nodes hardly drained: {total:?}");
    assert!(total.ledger_commands > 100 * count && acknowledged > 500 * count as usize, "{acknowledged} acknowledged; {total:?}");
    (acknowledged, total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::env_or;

    /// Seeds that failed once, kept after their fix: (seed, nodes, what the failure was). A
    /// change to what the simulation draws moves their scenarios; they keep running anyway.
    const REGRESSIONS: &[(u64, u64, &str)] = &[(
        2_230_378_064,
        7,
        "a leader paused to hand its partition over confirmed a linearizable read through a member that had left the set",
    )];

    #[test]
    fn seeds_that_once_failed_pass() {
        for (seed, nodes, what) in REGRESSIONS {
            let outcome = run(&Options::new(*seed, *nodes));
            assert!(outcome.failure.is_none(), "seed {seed} of {nodes} nodes ({what}) fails again: {:?}", outcome.failure);
        }
    }

    #[test]
    fn three_nodes_under_crashes_pauses_partitions_and_skewed_clocks_lose_no_acknowledged_write_and_recover() {
        let (_, total) = storms(3, 0..env_or("ANTHILL_CLUSTER_SEEDS", 20));
        assert!(total.paused_leaders_replaced > 0, "no paused leader woke up replaced: {total:?}");
        assert!(total.hand_backs > 0, "no leadership was handed back to a restarted node: {total:?}");
    }

    #[test]
    fn five_nodes_move_replica_sets_through_the_store_under_the_same_storm_and_converge() {
        let (_, total) = storms(5, 0..env_or("ANTHILL_CLUSTER_SEEDS", 20) / 2);
        // With more nodes than a replica set, sets first placed over the first live members
        // move to where the nodes' names place them, each through a handover.
        assert!(total.moves > 0 && total.handovers >= total.moves, "{total:?}");
        assert!(total.hand_backs > 0, "no leadership was handed back to a restarted node: {total:?}");
        assert!(total.paused_leaders_replaced > 0, "no paused leader woke up replaced: {total:?}");
    }

    #[test]
    fn seven_nodes_lose_no_acknowledged_write() {
        storms(7, 0..env_or("ANTHILL_CLUSTER_SEEDS", 20) / 4);
    }

    /// The whole-cluster simulation can never go blind unnoticed either: with any one safety rule
    /// of the replica switched off, a bounded number of seeds finds a violation.
    #[test]
    fn with_any_one_safety_rule_switched_off_the_cluster_simulation_finds_a_violation() {
        crate::sim::find_each_broken_rule(SEEDS_TO_BITE, |seed| run(&Options::new(seed, 5)).failure.is_some());
    }

    /// Seeds within which each broken rule must be found.
    const SEEDS_TO_BITE: u64 = 60;

    #[test]
    fn a_seed_replays_exactly_to_the_same_trace_hash_and_another_seed_does_not() {
        let seed = env_or("ANTHILL_CLUSTER_SEED", 3);
        let first = run(&Options::new(seed, 5));
        let again = run(&Options::new(seed, 5));
        assert!(first.failure.is_none(), "{:?}", first.failure);
        assert_eq!((first.trace_hash.clone(), first.acknowledged, first.steps), (again.trace_hash, again.acknowledged, again.steps));
        assert_ne!(first.trace_hash, run(&Options::new(seed + 1, 5)).trace_hash);
    }

    #[test]
    fn given_no_time_after_the_heal_then_the_liveness_check_fails() {
        let outcome = run(&Options { calm_ms: 0, ..Options::new(1, 3) });
        let failure = outcome.failure.expect("no partition can have acknowledged a write after the heal");
        assert!(failure.check.contains("took no write within"), "{}", failure.check);
    }
}
