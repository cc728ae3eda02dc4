//! A seeded, single-threaded model of a replica set that drives the real [`Replica`] code:
//! messages are delayed, dropped, duplicated and reordered; a node is cut off from the others for
//! a while now and then (a network partition); nodes crash and lose what they had
//! not synced; the "coordination store" grants leadership of ever higher epochs to random nodes
//! while older leaders still believe they lead. After the storm the network heals, one last
//! leader is granted, and the replicas must converge.
//!
//! Checked: no two replicas ever commit different entries at a position; a committed entry is
//! never truncated (asserted inside the replica); every proposal its leader saw committed is in
//! the final log; proposals are groups of 1–3 entries (an atomic append), and no log ever holds,
//! nor any replica commits, part of one; a linearizable read (`Replica::read_index`) confirmed by
//! a leader never misses an entry committed anywhere before the read began; at the end every log
//! is identical and fully committed.
//!
//! The replica set moves, too: the "store" picks another set from a pool of two more nodes than
//! it holds; the leader replicates to the newcomers as learners, pauses, and asks for the switch
//! once [`Replica::handover_ready`]; the switch lands some steps later only if no other epoch was
//! granted meanwhile (the node's claim compare-and-set, docs/replication.md) and the target is
//! still the same, and then a node of the new set is granted the next epoch. Checked as well:
//! nothing committed before a move is missing from the new set's log, and a handed-over leader
//! never takes another proposal in its epoch. Logs give up committed entries now and then
//! (retention: a floor), so replicas that need them get snapshots ([`Snapshot`]) and install
//! them. A failing seed is printed and replays exactly.
//! (The whole-cluster simulator of issue 5 grows from this.)

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::app::ledger::query::LedgerQuery;
use crate::app::ledger::{Ledger, LedgerCommand, LedgerEvent};
use crate::app::state::{MemoryState, subspace};
use crate::app::{Context, Domain, State, StateView};
use crate::replication::message::Message;
use crate::replication::replica::{DurableState, Effect, Replica, ReplicaConfig, ReplicaLog, Role};
use crate::replication::{Entry, EntryKind, Epoch, EpochHistory, NodeId, Position, Snapshot};
use crate::storage::Journal;

/// A node's log. The sim keeps every entry (to check logs against each other), and models
/// retention with a floor: entries at or below it stand for the state the log gave them up to,
/// and are never read; a snapshot carries the entries it stands for.
#[derive(Default)]
struct Log {
    entries: Vec<Entry>,
    floor: Position,
    /// As of the last sync (what a crash keeps), with its floor.
    durable: Vec<Entry>,
    durable_floor: Position,
    /// The first index of `entries` changed since the last sync (its length when none): a sync
    /// copies only from there.
    dirty_from: usize,
}

impl ReplicaLog for Log {
    fn entries(&self, from: Position, max: usize) -> Vec<Entry> {
        assert!(from > self.floor, "read at {from}, at or below the log's floor {}", self.floor);
        self.entries.iter().skip(from as usize - 1).take(max).cloned().collect()
    }

    fn floor(&self) -> Position {
        self.floor
    }
}

impl Log {
    /// The durable state, as the node's LMDB shell makes it: its whole durable log (at or past
    /// the replica's durable position), and the commit it knows, the receiver's floor (the
    /// shell's image holds the entries after it, `storage/image.rs`).
    fn snapshot(&self, durable: Position, commit: Position) -> Option<Snapshot> {
        let position = self.durable.len() as Position;
        assert!(position >= durable && position >= self.durable_floor, "a snapshot short of the durable position {durable}");
        let mut data = commit.min(position).to_be_bytes().to_vec();
        data.extend(encode(&self.durable));
        (position > 0).then(|| Snapshot { position, history: history_of(&self.durable), data })
    }
}

/// Entries as a snapshot's bytes: per entry, position, epoch, continued, marker, data length, data.
fn encode(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        out.extend_from_slice(&e.position.to_be_bytes());
        out.extend_from_slice(&e.epoch.to_be_bytes());
        out.push(u8::from(e.atomic_with_next));
        let data: &[u8] = match &e.kind {
            EntryKind::Marker => {
                out.push(1);
                &[]
            }
            EntryKind::Data(data) => {
                out.push(0);
                data
            }
        };
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(data);
    }
    out
}

fn decode(mut bytes: &[u8]) -> Vec<Entry> {
    fn take(bytes: &mut &[u8], n: usize) -> Vec<u8> {
        let (head, rest) = bytes.split_at(n);
        *bytes = rest;
        head.to_vec()
    }
    let mut entries = Vec::new();
    while !bytes.is_empty() {
        let mut take = |n| take(&mut bytes, n);
        let position = u64::from_be_bytes(take(8).try_into().unwrap());
        let epoch = u64::from_be_bytes(take(8).try_into().unwrap());
        let (continued, marker) = (take(1)[0] == 1, take(1)[0] == 1);
        let len = u32::from_be_bytes(take(4).try_into().unwrap()) as usize;
        let data = take(len);
        let kind = if marker { EntryKind::Marker } else { EntryKind::Data(data) };
        entries.push(Entry { position, epoch, kind, atomic_with_next: continued });
    }
    entries
}

fn history_of(log: &[Entry]) -> EpochHistory {
    let mut h = EpochHistory::default();
    for e in log {
        h.record(e.epoch, e.position);
    }
    h
}

/// The ledger book a node's entries make: the ledger's own `evolve` over every ledger event of
/// its log, in memory (`app::state::MemoryState`), with an undo journal per append so a
/// truncation takes back what it removes, as the node's storage does (docs/storage.md).
#[derive(Default, Clone)]
struct Book {
    state: MemoryState,
    journals: BTreeMap<Position, Journal>,
}

const SCOPE: &str = "book";

/// A ledger event travels as an entry's data: `L` and its JSON (other entries are opaque).
fn ledger_event(entry: &Entry) -> Option<LedgerEvent> {
    match &entry.kind {
        EntryKind::Data(data) if data.first() == Some(&b'L') => {
            Some(serde_json::from_slice(&data[1..]).expect("a ledger entry holds a ledger event"))
        }
        _ => None,
    }
}

impl Book {
    /// The book of `entries` from nothing.
    fn replay(entries: &[Entry]) -> Book {
        let mut book = Book::default();
        book.apply(entries);
        book
    }

    /// Evolves the ledger events of `entries` (whole appends), journaling each append.
    fn apply(&mut self, entries: &[Entry]) {
        let prefix = subspace(Ledger::NAME, SCOPE);
        let mut journal = Journal::default();
        for entry in entries {
            if let Some(event) = ledger_event(entry) {
                Ledger::evolve(&mut State::memory(&mut self.state, &prefix, Some(&mut journal)), &event)
                    .expect("the ledger evolves its own events");
            }
            if !entry.atomic_with_next && !journal.is_empty() {
                self.journals.insert(entry.position, std::mem::take(&mut journal));
            }
        }
    }

    /// Takes back the appends after `after`, newest first.
    fn truncate(&mut self, after: Position) {
        let undone = self.journals.split_off(&(after + 1));
        for journal in undone.values().rev() {
            journal.undo_in(&mut self.state);
        }
    }

    /// The ledger's own audit of the book: every invariant it checks (money conserved, no
    /// account past its limit, holds adding up).
    fn audit(&self) -> Result<(), String> {
        let prefix = subspace(Ledger::NAME, SCOPE);
        let report = Ledger::query(&StateView::memory(&self.state, &prefix), &LedgerQuery::Audit {}).map_err(|e| format!("{e:?}"))?;
        if report["ok"] == serde_json::Value::Bool(true) { Ok(()) } else { Err(report["violations"].to_string()) }
    }
}

/// A random ledger command of the book's three accounts and two holds.
fn ledger_command(rng: &mut StdRng) -> LedgerCommand {
    let accounts = ["a", "b", "c"];
    let (x, y) = (accounts[rng.random_range(0..3)].to_string(), accounts[rng.random_range(0..3)].to_string());
    let (amount, hold) = (rng.random_range(1..100), format!("h{}", rng.random_range(0..2)));
    match rng.random_range(0..9) {
        0 => LedgerCommand::OpenAccount { account: x, currency: "EUR".into(), credit_limit: 40 },
        1 | 2 => LedgerCommand::Deposit { account: x, amount },
        3 => LedgerCommand::Withdraw { account: x, amount },
        4 | 5 => LedgerCommand::Transfer { from: x, to: y, amount, transfer: None },
        6 => LedgerCommand::PlaceHold { hold, account: x, amount },
        7 => LedgerCommand::CaptureHold { hold, amount: None, to: Some(y) },
        _ => LedgerCommand::ReleaseHold { hold },
    }
}

struct Node {
    book: Book,
    replica: Replica,
    up: bool,
    durable_promise: Epoch,
    log: Log,
    promise: Epoch,
    /// Executed batches not yet synced: their ticket and the messages they hold back.
    unsynced: VecDeque<(u64, Vec<(NodeId, Message)>)>,
}

struct Sim {
    rng: StdRng,
    config: ReplicaConfig,
    nodes: Vec<Node>,
    /// (deliver at step, from, to, message)
    network: Vec<(u64, NodeId, NodeId, Message)>,
    step: u64,
    next_epoch: Epoch,
    /// The last epoch granted to each node.
    granted: BTreeMap<NodeId, Epoch>,
    /// The store's replica set, and the set it moves to (empty: none).
    members: Vec<NodeId>,
    target: Vec<NodeId>,
    /// Every node that may ever replicate: the set and two spares.
    pool: Vec<NodeId>,
    /// The last epoch granted (the store's claim on the placement).
    claim: Epoch,
    /// A leader's handover request: (its epoch, the target it is for, the step it lands at).
    handover: Option<(Epoch, Vec<NodeId>, u64)>,
    /// (node, epoch) of leaders that asked for a handover: never to take a proposal again.
    handed_over: BTreeSet<(NodeId, Epoch)>,
    /// Every committed position's entry, as the first replica to commit it saw it.
    committed: BTreeMap<Position, Entry>,
    /// Proposals whose leader saw them committed in their own epoch: (position, data).
    acknowledged: Vec<(Position, Vec<u8>)>,
    /// Groups proposed and waiting for their leader's commit: (node, epoch, last position, data).
    proposed: Vec<(NodeId, Epoch, Position, Vec<Vec<u8>>)>,
    /// Linearizable reads waiting for their round: (node, epoch, round, the highest position
    /// committed anywhere when the read began).
    reads: Vec<(NodeId, Epoch, u64, Position)>,
    /// A node cut off from some of the others, or all of them, until a step: both ways, or
    /// only what it sends (`Some(true)`), or only what it receives (`Some(false)`).
    isolated: Option<(NodeId, Vec<NodeId>, u64, Option<bool>)>,
    /// Per node, the steps a pause (a process stopped, SIGSTOP-style) began and ends at.
    paused_until: BTreeMap<NodeId, (u64, u64)>,
    /// Which node served each epoch as its leader: at most one may.
    servers: BTreeMap<Epoch, NodeId>,
    storm: bool,
    stats: Stats,
    trace: Trace,
}

/// One thing that happened in a run: hashed into the trace hash, and the last ones kept to show
/// what led to a failure.
#[derive(Debug, Clone, Copy)]
enum Event {
    Deliver { step: u64, from: NodeId, to: NodeId, kind: &'static str, epoch: Epoch },
    Lost { step: u64, from: NodeId, to: NodeId, kind: &'static str },
    Crash { step: u64, node: NodeId },
    Restart { step: u64, node: NodeId },
    Grant { step: u64, node: NodeId, epoch: Epoch },
    Propose { step: u64, node: NodeId, last: Position },
    Committed { step: u64, node: NodeId, position: Position },
    Truncate { step: u64, node: NodeId, after: Position },
    Install { step: u64, node: NodeId, position: Position },
    Trim { step: u64, node: NodeId, floor: Position },
    Isolate { step: u64, node: NodeId, until: u64 },
    Pause { step: u64, node: NodeId, until: u64 },
    Reset { step: u64, a: NodeId, b: NodeId },
    Move { step: u64, members: u64 },
}

impl std::fmt::Display for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Event::Deliver { step, from, to, kind, epoch } => write!(f, "step {step}: {kind} of epoch {epoch} from node {from} to {to}"),
            Event::Lost { step, from, to, kind } => write!(f, "step {step}: {kind} from node {from} to {to} lost"),
            Event::Crash { step, node } => write!(f, "step {step}: node {node} crashes"),
            Event::Restart { step, node } => write!(f, "step {step}: node {node} restarts"),
            Event::Grant { step, node, epoch } => write!(f, "step {step}: node {node} granted epoch {epoch}"),
            Event::Propose { step, node, last } => write!(f, "step {step}: node {node} proposes through {last}"),
            Event::Committed { step, node, position } => write!(f, "step {step}: node {node} commits through {position}"),
            Event::Truncate { step, node, after } => write!(f, "step {step}: node {node} truncates after {after}"),
            Event::Install { step, node, position } => write!(f, "step {step}: node {node} installs a snapshot through {position}"),
            Event::Trim { step, node, floor } => write!(f, "step {step}: node {node} gives up its log through {floor}"),
            Event::Isolate { step, node, until } => write!(f, "step {step}: node {node} cut off until step {until}"),
            Event::Pause { step, node, until } => write!(f, "step {step}: node {node} paused until step {until}"),
            Event::Reset { step, a, b } => write!(f, "step {step}: the connection between nodes {a} and {b} resets"),
            Event::Move { step, members } => write!(f, "step {step}: the replica set moves ({members:#x})"),
        }
    }
}

/// The run's trace: a hash of every event (same seed and binary, same hash) and the last ones.
#[derive(Default)]
struct Trace {
    hash: u64,
    recent: VecDeque<Event>,
}

/// Events kept to show what led to a failure.
const RECENT_EVENTS: usize = 40;

impl Event {
    /// The event as numbers, for the trace hash: a tag, then its fields.
    fn words(&self) -> [u64; 6] {
        let name = |kind: &str| crate::log::partitioning::fnv1a_64(kind.as_bytes());
        match *self {
            Event::Deliver { step, from, to, kind, epoch } => [1, step, from.into(), to.into(), name(kind), epoch],
            Event::Lost { step, from, to, kind } => [2, step, from.into(), to.into(), name(kind), 0],
            Event::Crash { step, node } => [3, step, node.into(), 0, 0, 0],
            Event::Restart { step, node } => [4, step, node.into(), 0, 0, 0],
            Event::Grant { step, node, epoch } => [5, step, node.into(), epoch, 0, 0],
            Event::Propose { step, node, last } => [6, step, node.into(), last, 0, 0],
            Event::Committed { step, node, position } => [7, step, node.into(), position, 0, 0],
            Event::Truncate { step, node, after } => [8, step, node.into(), after, 0, 0],
            Event::Install { step, node, position } => [9, step, node.into(), position, 0, 0],
            Event::Trim { step, node, floor } => [10, step, node.into(), floor, 0, 0],
            Event::Isolate { step, node, until } => [11, step, node.into(), until, 0, 0],
            Event::Pause { step, node, until } => [13, step, node.into(), until, 0, 0],
            Event::Reset { step, a, b } => [14, step, a.into(), b.into(), 0, 0],
            Event::Move { step, members } => [12, step, members, 0, 0, 0],
        }
    }
}

impl Trace {
    fn note(&mut self, event: Event) {
        for word in event.words() {
            self.hash = (self.hash ^ word).wrapping_mul(0x0000_0100_0000_01b3).rotate_left(5);
        }
        if self.recent.len() == RECENT_EVENTS {
            self.recent.pop_front();
        }
        self.recent.push_back(event);
    }
}

fn kind_of(message: &Message) -> &'static str {
    match message {
        Message::Recover { .. } => "Recover",
        Message::RecoverReply { .. } => "RecoverReply",
        Message::Fetch { .. } => "Fetch",
        Message::FetchReply { .. } => "FetchReply",
        Message::Append { .. } => "Append",
        Message::Snapshot { .. } => "Snapshot",
        Message::AppendReply { .. } => "AppendReply",
        Message::Stale { .. } => "Stale",
    }
}

/// What a run went through, to show the storm was a storm.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct Stats {
    pub leaders: u64,
    pub crashes: u64,
    pub truncations: u64,
    pub lost_messages: u64,
    pub resumed: u64,
    /// Linearizable reads confirmed (and checked).
    pub reads: u64,
    /// Handovers asked for, and replica sets switched, during the storm.
    pub handovers: u64,
    pub moves: u64,
    /// Paused leaders that resumed before their handover was ready.
    pub resumed_pauses: u64,
    /// Logs trimmed (retention), and snapshots installed.
    pub trims: u64,
    pub installs: u64,
    /// Processes paused (and leaders among them replaced meanwhile), connections reset,
    /// one-way partitions.
    pub pauses: u64,
    pub paused_leaders_replaced: u64,
    pub resets: u64,
    pub one_way: u64,
    /// Ledger commands the leaders accepted (each checked by the ledger's audit on every book).
    pub ledger_commands: u64,
}

impl Stats {
    pub fn add(&mut self, other: &Stats) {
        self.leaders += other.leaders;
        self.crashes += other.crashes;
        self.truncations += other.truncations;
        self.lost_messages += other.lost_messages;
        self.resumed += other.resumed;
        self.reads += other.reads;
        self.handovers += other.handovers;
        self.moves += other.moves;
        self.resumed_pauses += other.resumed_pauses;
        self.trims += other.trims;
        self.installs += other.installs;
        self.pauses += other.pauses;
        self.paused_leaders_replaced += other.paused_leaders_replaced;
        self.resets += other.resets;
        self.one_way += other.one_way;
        self.ledger_commands += other.ledger_commands;
    }
}

/// Steps of faults (a step is a millisecond of simulated time: a node ticks about every 3).
pub const STORM_STEPS: u64 = 1_500;
/// Steps after the network heals and one last leader is granted, before the logs must agree.
pub const CALM_STEPS: u64 = 300;

/// Steps a paused leader keeps its lease: paused longer, another member is granted the next
/// epoch (the coordination store's session TTL, in the sim's time).
const PAUSE_LEASE_STEPS: u64 = 100;

/// One run of the replication simulation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    pub seed: u64,
    /// The replica set's size (3 to 7); the pool it moves in has two more nodes.
    pub replicas: u64,
    pub storm_steps: u64,
    pub calm_steps: u64,
}

impl Options {
    pub fn new(seed: u64, replicas: u64) -> Self {
        Options { seed, replicas, storm_steps: STORM_STEPS, calm_steps: CALM_STEPS }
    }
}

/// How a run went.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Outcome {
    pub seed: u64,
    pub replicas: u64,
    /// A hash of every event of the run: the same seed and binary give the same hash.
    pub trace_hash: String,
    /// Simulated milliseconds.
    pub steps: u64,
    /// Proposals whose leader saw them committed (each checked to be in the final log).
    pub acknowledged: usize,
    pub stats: Stats,
    pub failure: Option<Failure>,
}

/// A check that failed, and the last events before it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Failure {
    pub check: String,
    pub recent: Vec<String>,
}

/// Runs one seed; a broken check (an assertion of the simulation or of the replica) ends the
/// run and is reported, with the events that led to it.
pub fn run(options: &Options) -> Outcome {
    let mut sim = Sim::new(options.seed, options.replicas);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        sim.run(options.storm_steps, options.calm_steps);
        sim.check_converged(options.seed);
    }));
    let failure = result.err().map(|panic| Failure {
        check: panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "a check failed".into()),
        recent: sim.trace.recent.iter().map(Event::to_string).collect(),
    });
    Outcome {
        seed: options.seed,
        replicas: options.replicas,
        trace_hash: format!("{:016x}", sim.trace.hash),
        steps: sim.step,
        acknowledged: sim.acknowledged.len(),
        stats: sim.stats,
        failure,
    }
}

impl Sim {
    /// A replica set of `size` nodes.
    fn new(seed: u64, size: u64) -> Self {
        let members: Vec<NodeId> = (0..size as NodeId).collect();
        let pool: Vec<NodeId> = (0..size as NodeId + 2).collect();
        let config = |me| {
            let members = if members.contains(&me) { members.clone() } else { vec![me] };
            ReplicaConfig { me, members, max_batch_entries: 4, max_inflight_entries: 8, resend_ticks: 3 }
        };
        let nodes = pool
            .iter()
            .map(|&me| Node {
                book: Book::default(),
                replica: Replica::new(config(me), DurableState::default()),
                up: true,
                durable_promise: 0,
                log: Log::default(),
                promise: 0,
                unsynced: VecDeque::new(),
            })
            .collect();
        Sim {
            rng: StdRng::seed_from_u64(seed),
            config: config(0),
            nodes,
            network: Vec::new(),
            step: 0,
            next_epoch: 1,
            granted: BTreeMap::new(),
            members,
            target: Vec::new(),
            pool,
            claim: 0,
            handover: None,
            handed_over: BTreeSet::new(),
            committed: BTreeMap::new(),
            acknowledged: Vec::new(),
            proposed: Vec::new(),
            reads: Vec::new(),
            isolated: None,
            paused_until: BTreeMap::new(),
            servers: BTreeMap::new(),
            storm: true,
            stats: Stats::default(),
            trace: Trace::default(),
        }
    }

    /// Takes a node's effects and executes them (writes now, messages after its next sync).
    fn drain(&mut self, n: NodeId) {
        let step = self.step;
        let node = &mut self.nodes[n as usize];
        let batch = node.replica.take_effects();
        let mut sends = Vec::new();
        for effect in batch.effects {
            match effect {
                Effect::PersistPromise(epoch) => node.promise = epoch,
                Effect::Truncate { after } => {
                    // Floors stay at or below a commit, and commits are never truncated: the
                    // node's storage refuses a truncation below its floor.
                    assert!(after >= node.log.floor, "node {n} truncates after {after}, below its floor {}", node.log.floor);
                    node.log.entries.truncate(after as usize);
                    node.log.dirty_from = node.log.dirty_from.min(after as usize);
                    node.book.truncate(after);
                    self.stats.truncations += 1;
                    self.trace.note(Event::Truncate { step, node: n, after });
                }
                Effect::Append(entries) => {
                    node.book.apply(&entries);
                    for e in entries {
                        assert_eq!(e.position as usize, node.log.entries.len() + 1, "node {n}: append not at the end");
                        node.log.dirty_from = node.log.dirty_from.min(node.log.entries.len());
                        node.log.entries.push(e);
                    }
                }
                Effect::Install(snapshot) => {
                    let floor = u64::from_be_bytes(snapshot.data[..8].try_into().unwrap());
                    let entries = decode(&snapshot.data[8..]);
                    assert_eq!(entries.len() as Position, snapshot.position, "node {n}: a snapshot that is not a whole prefix");
                    assert_eq!(history_of(&entries), snapshot.history, "node {n}: a snapshot whose history is not its log's");
                    // The snapshot's state: the ledger of the entries it stands for.
                    node.book = Book::replay(&entries);
                    node.log.entries = entries;
                    node.log.dirty_from = 0;
                    node.log.floor = floor;
                    self.stats.installs += 1;
                    self.trace.note(Event::Install { step, node: n, position: snapshot.position });
                }
                Effect::Send { to, message } => sends.push((to, message)),
                Effect::SendSnapshot { to, reply } => {
                    let Some(snapshot) = node.log.snapshot(node.replica.durable(), node.replica.commit()) else { continue };
                    sends.push((to, reply.message(snapshot)));
                }
                Effect::Committed(position) => {
                    self.trace.note(Event::Committed { step, node: n, position });
                    let end = &node.log.entries[position as usize - 1];
                    assert!(!end.atomic_with_next, "node {n} commits through {position}, inside an append");
                    for e in &node.log.entries[..position as usize] {
                        match self.committed.get(&e.position) {
                            Some(first) => {
                                assert_eq!(first, e, "node {n} commits another entry at {} than was committed before", e.position)
                            }
                            None => {
                                self.committed.insert(e.position, e.clone());
                            }
                        }
                    }
                    let epoch = node.replica.promised();
                    let (done, waiting): (Vec<_>, Vec<_>) =
                        self.proposed.drain(..).partition(|(leader, e, p, _)| *leader == n && *e == epoch && *p <= position);
                    self.proposed = waiting;
                    for (_, _, last, group) in done {
                        let first = last + 1 - group.len() as Position;
                        self.acknowledged.extend((first..=last).zip(group));
                    }
                }
                Effect::Serving { epoch, .. } => {
                    let first = *self.servers.entry(epoch).or_insert(n);
                    assert_eq!(first, n, "nodes {first} and {n} both serve epoch {epoch} as its leader");
                }
                Effect::SteppedDown { .. } => self.proposed.retain(|(leader, _, _, _)| *leader != n),
            }
        }
        let end = node.log.entries.last();
        assert!(end.is_none_or(|e| !e.atomic_with_next), "node {n}'s log ends inside an append at {:?}", end.map(|e| e.position));
        node.unsynced.push_back((batch.ticket, sends));
    }

    /// Makes everything a node executed durable, sends what it held back, reports durability.
    fn sync(&mut self, n: NodeId) {
        let node = &mut self.nodes[n as usize];
        let Some(&(ticket, _)) = node.unsynced.back() else { return };
        let from = node.log.dirty_from.min(node.log.durable.len());
        node.log.durable.truncate(from);
        node.log.durable.extend_from_slice(&node.log.entries[from..]);
        node.log.dirty_from = node.log.entries.len();
        node.log.durable_floor = node.log.floor;
        node.durable_promise = node.promise;
        let batches: Vec<_> = node.unsynced.drain(..).collect();
        for (_, sends) in batches {
            for (to, message) in sends {
                self.post(n, to, message);
            }
        }
        let node = &mut self.nodes[n as usize];
        node.replica.on_durable(ticket, &node.log);
        self.drain(n);
    }

    /// Whether `n` replicates the partition: a member, or a newcomer of the target set.
    fn active(&self, n: NodeId) -> bool {
        self.members.contains(&n) || self.target.contains(&n)
    }

    /// The replica set `n`'s replica works with: the store's, or the target for a newcomer.
    fn set_of(&self, n: NodeId) -> Vec<NodeId> {
        if self.members.contains(&n) { self.members.clone() } else { self.target.clone() }
    }

    fn post(&mut self, from: NodeId, to: NodeId, message: Message) {
        let cut_off = self.isolated.as_ref().is_some_and(|(n, others, until, way)| {
            let sent = *n == from && others.contains(&to) && *way != Some(false);
            let received = *n == to && others.contains(&from) && *way != Some(true);
            (sent || received) && self.step < *until
        });
        if self.storm && (cut_off || self.rng.random_bool(0.1)) {
            self.stats.lost_messages += 1;
            self.trace.note(Event::Lost { step: self.step, from, to, kind: kind_of(&message) });
            return;
        }
        let copies = if self.storm && self.rng.random_bool(0.05) { 2 } else { 1 };
        for _ in 0..copies {
            let delay = if self.storm { self.rng.random_range(1..20) } else { 1 };
            self.network.push((self.step + delay, from, to, message.clone()));
        }
    }

    fn crash(&mut self, n: NodeId) {
        self.stats.crashes += 1;
        self.trace.note(Event::Crash { step: self.step, node: n });
        let node = &mut self.nodes[n as usize];
        node.up = false;
        node.log.entries = node.log.durable.clone();
        node.log.dirty_from = node.log.entries.len();
        node.log.floor = node.log.durable_floor;
        // What a crash keeps of the state is what it keeps of the log.
        node.book = Book::replay(&node.log.entries);
        node.promise = node.durable_promise;
        node.unsynced.clear();
        self.proposed.retain(|(leader, _, _, _)| *leader != n);
        self.reads.retain(|(reader, ..)| *reader != n);
    }

    fn restart(&mut self, n: NodeId) {
        self.trace.note(Event::Restart { step: self.step, node: n });
        let config = ReplicaConfig { me: n, members: self.set_of(n), ..self.config.clone() };
        let target = self.target.clone();
        let node = &mut self.nodes[n as usize];
        let state = DurableState {
            promised: node.durable_promise,
            history: history_of(&node.log.durable),
            last: node.log.durable.len() as Position,
        };
        node.replica = Replica::new(config, state);
        node.replica.set_target(target);
        // Read rounds above every earlier incarnation's (what the shell does with its clock).
        node.replica.start_rounds_at(self.step * 1_000_000);
        node.up = true;
        // A node restarted from its log while the store still shows it holding its lock resumes
        // its own epoch (what the node's shell does after a failed effect), unless it handed the
        // partition over in that epoch.
        let promised = node.durable_promise;
        // It still holds the lock only if no epoch was granted since its own (a switch of the
        // set grants one too), so its epoch's replica set is still the store's.
        let may_resume = self.claim == promised && self.granted.get(&n) == Some(&promised) && !self.handed_over.contains(&(n, promised));
        if self.storm && may_resume && self.rng.random_bool(0.5) {
            let node = &mut self.nodes[n as usize];
            if node.replica.become_leader(promised) {
                self.stats.resumed += 1;
                self.drain(n);
            }
        }
    }

    fn grant(&mut self, n: NodeId) {
        let epoch = self.next_epoch;
        self.next_epoch += 1;
        self.claim = epoch;
        self.granted.insert(n, epoch);
        self.trace.note(Event::Grant { step: self.step, node: n, epoch });
        if self.nodes[n as usize].up && self.nodes[n as usize].replica.become_leader(epoch) {
            self.stats.leaders += 1;
            self.drain(n);
        }
    }

    fn one_step(&mut self) {
        self.step += 1;
        // Deliver what is due, in a random order among the due ones.
        let mut due: Vec<_> = Vec::new();
        let mut i = 0;
        while i < self.network.len() {
            if self.network[i].0 <= self.step {
                due.push(self.network.swap_remove(i));
            } else {
                i += 1;
            }
        }
        while !due.is_empty() {
            let (_, from, to, message) = due.swap_remove(self.rng.random_range(0..due.len()));
            if !self.active(to) {
                continue;
            }
            if self.paused(to) {
                // A stopped process reads nothing; its connections hold what was sent.
                self.network.push((self.step + 1, from, to, message));
                continue;
            }
            let node = &mut self.nodes[to as usize];
            if node.up {
                self.trace.note(Event::Deliver { step: self.step, from, to, kind: kind_of(&message), epoch: message.epoch() });
                node.replica.on_message(from, message, &node.log);
                self.drain(to);
            }
        }
        for n in self.pool.clone() {
            if !self.active(n) {
                continue;
            }
            if !self.nodes[n as usize].up {
                if self.rng.random_bool(0.05) {
                    self.restart(n);
                }
                continue;
            }
            if self.paused(n) {
                continue;
            }
            if self.storm && self.rng.random_bool(0.002) {
                self.pause(n);
                continue;
            }
            if self.rng.random_bool(0.5) {
                self.sync(n);
            }
            if self.rng.random_bool(0.3) {
                let node = &mut self.nodes[n as usize];
                node.replica.tick(&node.log);
                self.drain(n);
            }
            if self.rng.random_bool(0.3) {
                let size = self.rng.random_range(1..=3);
                let mut group: Vec<Vec<u8>> = (0..size).map(|i| format!("s{}-n{n}-{i}", self.step).into_bytes()).collect();
                // Half the proposals are ledger commands, decided by the leader's ledger against
                // its book (LMAX style); their events are the group.
                if self.rng.random_bool(0.5) && matches!(self.nodes[n as usize].replica.role(), Role::Leader { .. }) {
                    let command = ledger_command(&mut self.rng);
                    let id = format!("s{}", self.step);
                    let ctx = Context { now_us: self.step * 1_000, command_id: &id, remember_id: false, ids_since_us: 0 };
                    let prefix = subspace(Ledger::NAME, SCOPE);
                    match Ledger::decide(&StateView::memory(&self.nodes[n as usize].book.state, &prefix), &command, &ctx) {
                        Ok(events) if !events.is_empty() => {
                            group =
                                events.iter().map(|e| [b"L".as_slice(), &serde_json::to_vec(e).expect("events encode")].concat()).collect();
                            self.stats.ledger_commands += 1;
                        }
                        _ => group.clear(),
                    }
                }
                let node = &mut self.nodes[n as usize];
                if let Some(last) = node.replica.propose(group.clone()) {
                    self.proposed.push((n, node.replica.promised(), last, group));
                    self.trace.note(Event::Propose { step: self.step, node: n, last });
                    self.drain(n);
                }
            }
            if self.rng.random_bool(0.1) {
                let required = self.committed.keys().next_back().copied().unwrap_or(0);
                let node = &mut self.nodes[n as usize];
                if let Some(round) = node.replica.read_index(&node.log) {
                    self.reads.push((n, node.replica.promised(), round, required));
                    self.drain(n);
                }
            }
            self.drive_handover(n);
            if self.storm && self.rng.random_bool(0.02) {
                self.trim(n);
            }
            if self.storm && self.rng.random_bool(0.004) {
                self.crash(n);
            }
        }
        if self.storm && self.rng.random_bool(0.01) {
            let n = self.members[self.rng.random_range(0..self.members.len())];
            self.grant(n);
        }
        // A new target now and then; one in progress changes only rarely.
        let retarget = if self.target.is_empty() { 0.01 } else { 0.001 };
        if self.storm && self.rng.random_bool(retarget) {
            self.retarget();
        }
        if self.handover.as_ref().is_some_and(|(_, _, at)| *at <= self.step) {
            self.land_handover();
        }
        // A network partition: one node cut off for a while from all the others, or from some
        // (a deposed leader that does not know, yet still reaches a target set's newcomers).
        if self.storm && self.isolated.as_ref().is_none_or(|(_, _, until, _)| *until <= self.step) && self.rng.random_bool(0.005) {
            let n = self.pool[self.rng.random_range(0..self.pool.len())];
            let all = self.rng.random_bool(0.5);
            let others: Vec<NodeId> = self.pool.iter().copied().filter(|m| *m != n && (all || self.rng.random_bool(0.5))).collect();
            let until = self.step + self.rng.random_range(30..150);
            // A third of partitions are one-way: the node is not heard, or does not hear.
            let way = match self.rng.random_range(0..6) {
                0 => Some(true),
                1 => Some(false),
                _ => None,
            };
            if way.is_some() {
                self.stats.one_way += 1;
            }
            self.isolated = Some((n, others, until, way));
            self.trace.note(Event::Isolate { step: self.step, node: n, until });
        }
        // A connection reset: what was in flight between two nodes is gone.
        if self.storm && self.rng.random_bool(0.003) {
            let (a, b) = (self.pool[self.rng.random_range(0..self.pool.len())], self.pool[self.rng.random_range(0..self.pool.len())]);
            let before = self.network.len();
            self.network.retain(|(_, from, to, _)| !((*from == a && *to == b) || (*from == b && *to == a)));
            self.stats.lost_messages += (before - self.network.len()) as u64;
            self.stats.resets += 1;
            self.trace.note(Event::Reset { step: self.step, a, b });
        }
        // A paused leader's lease runs out: the store grants the next epoch to another member.
        let pauses: Vec<(NodeId, (u64, u64))> = self.paused_until.iter().map(|(n, pause)| (*n, *pause)).collect();
        for (n, (start, until)) in pauses {
            let leads = matches!(self.nodes[n as usize].replica.role(), Role::Leader { .. });
            let expired = self.step >= start + PAUSE_LEASE_STEPS && self.step < until;
            if self.storm && leads && expired && self.granted.get(&n) == Some(&self.claim) {
                let others: Vec<NodeId> = self.members.iter().copied().filter(|m| *m != n).collect();
                if !others.is_empty() {
                    let next = others[self.rng.random_range(0..others.len())];
                    self.grant(next);
                    self.stats.paused_leaders_replaced += 1;
                }
            }
        }
        self.check_reads();
        // Every book, at any moment, keeps the ledger's invariants.
        if self.step.is_multiple_of(20) {
            for n in self.pool.clone() {
                if let Err(violations) = self.nodes[n as usize].book.audit() {
                    panic!("node {n}'s ledger breaks its invariants: {violations}");
                }
            }
        }
    }

    fn paused(&self, n: NodeId) -> bool {
        self.paused_until.get(&n).is_some_and(|(_, until)| *until > self.step)
    }

    /// Stops `n` for 50–300 steps: it neither ticks, syncs, proposes nor reads its messages,
    /// and wakes up believing what it believed (a leader still thinks it leads).
    fn pause(&mut self, n: NodeId) {
        let until = self.step + self.rng.random_range(50..300);
        self.paused_until.insert(n, (self.step, until));
        self.stats.pauses += 1;
        self.trace.note(Event::Pause { step: self.step, node: n, until });
    }

    /// Retention: `n` gives up the entries of its log up to the end of some append it knows
    /// committed and holds durably (a trim is durable at once, as the node's is).
    fn trim(&mut self, n: NodeId) {
        let node = &mut self.nodes[n as usize];
        let bound = node.replica.commit().min(node.log.durable.len() as Position);
        let ends: Vec<Position> = node.log.durable[..bound as usize]
            .iter()
            .filter(|e| !e.atomic_with_next && e.position > node.log.floor)
            .map(|e| e.position)
            .collect();
        if ends.is_empty() {
            return;
        }
        let floor = ends[self.rng.random_range(0..ends.len())];
        node.log.floor = floor;
        node.log.durable_floor = node.log.durable_floor.max(floor);
        self.stats.trims += 1;
        self.trace.note(Event::Trim { step: self.step, node: n, floor });
    }

    /// The store picks another replica set of the same size from the pool (or, now and then,
    /// none): every active node learns it, newcomers start replicating from their durable logs.
    fn retarget(&mut self) {
        let mut target = self.pool.clone();
        for i in (1..target.len()).rev() {
            target.swap(i, self.rng.random_range(0..=i));
        }
        target.truncate(self.members.len());
        let same = |a: &[NodeId], b: &[NodeId]| a.iter().collect::<BTreeSet<_>>() == b.iter().collect::<BTreeSet<_>>();
        if same(&target, &self.members) || self.rng.random_bool(0.1) {
            target.clear();
        }
        let before: Vec<NodeId> = self.pool.iter().copied().filter(|n| self.active(*n)).collect();
        self.target = target;
        for n in self.pool.clone() {
            let (was, is) = (before.contains(&n), self.active(n));
            if was && !is {
                self.deactivate(n);
            } else if !was && is {
                // A newcomer's task starts from its durable log.
                self.sync(n);
                self.restart(n);
            } else if is && self.nodes[n as usize].up {
                let target = self.target.clone();
                self.nodes[n as usize].replica.set_target(target);
                self.drain(n);
            }
        }
    }

    /// `n` no longer replicates the partition: its task stops (what it wrote stays).
    fn deactivate(&mut self, n: NodeId) {
        if self.nodes[n as usize].up {
            self.sync(n);
        }
        self.proposed.retain(|(leader, _, _, _)| *leader != n);
        self.reads.retain(|(reader, ..)| *reader != n);
    }

    /// A leader with a target: pauses once its newcomers are close, asks for the switch once the
    /// handover is ready, or (not yet asked) resumes now and then.
    fn drive_handover(&mut self, n: NodeId) {
        let replica = &mut self.nodes[n as usize].replica;
        let epoch = replica.promised();
        if !matches!(replica.role(), Role::Leader { .. }) || self.handed_over.contains(&(n, epoch)) {
            return;
        }
        if replica.target().is_empty() {
            // The move was called off: a paused leader serves again.
            replica.pause(false);
            return;
        }
        if !replica.paused() {
            let close = replica.learners_matched().is_some_and(|m| m + 64 >= replica.last());
            if close && self.rng.random_bool(0.2) {
                replica.pause(true);
            }
        } else if replica.handover_ready() {
            let delay = if self.storm { self.rng.random_range(1..30) } else { 1 };
            self.handover = Some((epoch, replica.target().to_vec(), self.step + delay));
            self.handed_over.insert((n, epoch));
            self.stats.handovers += 1;
        } else if self.rng.random_bool(0.05) {
            replica.pause(false);
            self.stats.resumed_pauses += 1;
        }
    }

    /// The switch lands if no epoch was granted since the request (the claim compare-and-set)
    /// and the target is the one it was for; a node of the new set is then granted leadership.
    fn land_handover(&mut self) {
        let Some((epoch, target, _)) = self.handover.take() else { return };
        if self.claim != epoch || self.target != target {
            return;
        }
        let before = self.members.clone();
        self.members = target;
        self.target.clear();
        if self.storm {
            self.stats.moves += 1;
        }
        let members = self.members.iter().fold(0u64, |set, m| set | (1 << m));
        self.trace.note(Event::Move { step: self.step, members });
        for n in self.pool.clone() {
            if before.contains(&n) && !self.members.contains(&n) {
                self.deactivate(n);
            } else if self.members.contains(&n) && self.nodes[n as usize].up {
                let members = self.members.clone();
                let replica = &mut self.nodes[n as usize].replica;
                replica.set_members(members);
                replica.set_target(Vec::new());
                self.drain(n);
            }
        }
        let next = self.members[self.rng.random_range(0..self.members.len())];
        self.grant(next);
    }

    /// A read its leader confirmed sees everything committed before it began; a read whose
    /// leader stepped down or crashed is dropped (it failed, and its client retries).
    fn check_reads(&mut self) {
        let nodes = &self.nodes;
        let mut confirmed = 0;
        self.reads.retain(|(n, epoch, round, required)| {
            let replica = &nodes[*n as usize].replica;
            let leading = nodes[*n as usize].up && replica.promised() == *epoch && matches!(replica.role(), Role::Leader { .. });
            if !leading {
                return false;
            }
            if replica.confirmed_round() < *round {
                return true;
            }
            assert!(
                replica.commit() >= *required,
                "node {n} confirmed a read of epoch {epoch} at commit {}, missing the entry committed at {required} before the read began",
                replica.commit()
            );
            confirmed += 1;
            false
        });
        self.stats.reads += confirmed;
    }

    fn run(&mut self, storm_steps: u64, calm_steps: u64) {
        for _ in 0..storm_steps {
            self.one_step();
        }
        // Heal: everyone up, nothing lost, one last leader.
        self.paused_until.clear();
        self.storm = false;
        for n in self.members.clone() {
            if !self.nodes[n as usize].up {
                self.restart(n);
            }
        }
        for n in self.pool.clone() {
            if self.active(n) && !self.nodes[n as usize].up {
                self.restart(n);
            }
        }
        let leader = self.members[self.rng.random_range(0..self.members.len())];
        self.grant(leader);
        for _ in 0..calm_steps {
            self.one_step();
        }
        // Quiesce: sync and tick until nothing moves (or long enough that something is stuck).
        for _ in 0..2_000 {
            // (Heartbeats keep the network busy forever: settled is about the logs.)
            let reference = &self.nodes[self.members[0] as usize].log.entries;
            let settled = self
                .members
                .iter()
                .map(|n| &self.nodes[*n as usize])
                .all(|n| n.replica.commit() == n.log.entries.len() as Position && n.log.entries == *reference);
            if settled && self.target.is_empty() {
                break;
            }
            self.step += 1;
            if self.handover.is_some() {
                self.land_handover();
            }
            for n in self.pool.clone() {
                if !self.active(n) {
                    continue;
                }
                self.drive_handover(n);
                self.sync(n);
                let node = &mut self.nodes[n as usize];
                node.replica.tick(&node.log);
                self.drain(n);
            }
            let due: Vec<_> = std::mem::take(&mut self.network);
            for (_, from, to, message) in due {
                if !self.active(to) {
                    continue;
                }
                let node = &mut self.nodes[to as usize];
                node.replica.on_message(from, message, &node.log);
                self.drain(to);
            }
        }
    }

    fn check_converged(&self, seed: u64) {
        assert!(self.target.is_empty(), "seed {seed}: the move to {:?} never finished", self.target);
        let reference = &self.nodes[self.members[0] as usize].log.entries;
        let replayed = Book::replay(reference);
        for (n, node) in self.members.iter().map(|n| (n, &self.nodes[*n as usize])) {
            assert_eq!(&node.log.entries, reference, "seed {seed}: logs differ after healing");
            assert_eq!(node.replica.commit(), reference.len() as Position, "seed {seed}: not everything is committed after healing");
            // Each replica's ledger, kept from what it appended, truncated and installed, is the
            // ledger of its log replayed.
            assert!(node.book.state == replayed.state, "seed {seed}: node {n}'s ledger is not a replay of its log");
            node.book.audit().unwrap_or_else(|v| panic!("seed {seed}: node {n}'s ledger breaks its invariants: {v}"));
        }
        for (position, entry) in &self.committed {
            assert_eq!(reference.get(*position as usize - 1), Some(entry), "seed {seed}: committed entry at {position} lost");
        }
        for pair in reference.windows(2) {
            assert!(
                !pair[0].atomic_with_next || pair[0].epoch == pair[1].epoch,
                "seed {seed}: an append at {} goes on in another epoch",
                pair[0].position
            );
        }
        for (position, data) in &self.acknowledged {
            let entry = &reference[*position as usize - 1];
            assert_eq!(entry.kind, EntryKind::Data(data.clone()), "seed {seed}: acknowledged proposal at {position} lost");
        }
    }
}

/// Runs `seeds` seeded storms over a replica set of `size`; returns what they went through.
#[cfg(test)]
fn storms(size: u64, seeds: u64) -> (usize, Stats) {
    let (mut acknowledged, mut total) = (0, Stats::default());
    for seed in 0..seeds {
        let outcome = run(&Options::new(seed, size));
        if let Some(failure) = &outcome.failure {
            panic!(
                "replication simulation failed with seed {seed} of {size} replicas (rerun: anthill sim --seed {seed} --replicas {size}): \
                 {}\nlast events:\n{}",
                failure.check,
                failure.recent.join("\n")
            );
        }
        acknowledged += outcome.acknowledged;
        total.add(&outcome.stats);
    }
    eprintln!("{seeds} seeds of {size} replicas: {acknowledged} proposals committed; {total:?}");
    // The storm was one (leaders changed, nodes crashed, followers had to truncate, restarted
    // leaders resumed their epoch), and it did not starve the protocol: proposals get committed.
    assert!(total.leaders > 2 * seeds && total.crashes > seeds && total.truncations > seeds / 4 && total.resumed > 0, "{total:?}");
    assert!(total.reads > seeds * 10, "few linearizable reads were confirmed: {total:?}");
    // Moves land during the storm, and some handovers are fenced off by a later epoch.
    assert!(total.moves > seeds / 4 && total.handovers > total.moves && total.resumed_pauses > 0, "replica sets hardly moved: {total:?}");
    assert!(acknowledged > seeds as usize * 20, "only {acknowledged} proposals committed over {seeds} seeds");
    // Logs gave entries up, and replicas that needed them got snapshots instead.
    assert!(total.trims > seeds && total.installs > seeds / 4, "few trims or snapshots: {total:?}");
    assert!(total.pauses > seeds && total.paused_leaders_replaced > 0 && total.resets > seeds && total.one_way > 0, "{total:?}");
    assert!(total.ledger_commands > seeds * 10, "few ledger commands were accepted: {total:?}");
    (acknowledged, total)
}

#[cfg(test)]
fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Seeds within which each broken rule must be found.
    const SEEDS_TO_BITE: u64 = 100;

    /// Seeds that failed once, kept after their fix: (seed, replicas, what the failure was).
    /// A change to what the simulation draws moves their scenarios; they keep running anyway.
    const REGRESSIONS: &[(u64, u64, &str)] =
        &[(576, 3, "a restarted node resumed its old epoch with a replica set granted later (the simulation's model of the lock)")];

    #[test]
    fn seeds_that_once_failed_pass() {
        for (seed, replicas, what) in REGRESSIONS {
            let outcome = run(&Options::new(*seed, *replicas));
            assert!(outcome.failure.is_none(), "seed {seed} of {replicas} ({what}) fails again: {:?}", outcome.failure);
        }
    }

    #[test]
    fn under_loss_reordering_crashes_and_competing_leaders_no_committed_entry_is_lost_and_replicas_converge() {
        storms(3, env_or("ANTHILL_REPLICATION_SEEDS", 300));
    }

    #[test]
    fn five_replicas_under_the_same_storm_lose_no_committed_entry_and_converge() {
        storms(5, env_or("ANTHILL_REPLICATION_SEEDS", 300) / 2);
    }

    /// The simulation can never go blind unnoticed: with any one safety rule of the replica
    /// switched off, a few seeds find a violation.
    #[test]
    fn with_any_one_safety_rule_switched_off_the_simulation_finds_a_violation_within_a_few_seeds() {
        use crate::replication::replica::rules;
        let switches = [
            (rules::FENCING, "fencing"),
            (rules::TRUNCATION, "truncating a divergent suffix"),
            (rules::RECOVERY_MAJORITY, "the majority of recovery"),
            (rules::ADOPT_MOST_ADVANCED, "adopting the most advanced log"),
        ];
        for (rule, name) in switches {
            rules::switch_off(rule);
            let found = (0..SEEDS_TO_BITE).find(|seed| run(&Options::new(*seed, 3)).failure.is_some());
            rules::switch_off(0);
            let seed = found.unwrap_or_else(|| panic!("with {name} off, {SEEDS_TO_BITE} seeds found no violation"));
            eprintln!("{name} off: seed {seed} fails");
        }
        assert!(run(&Options::new(0, 3)).failure.is_none(), "every rule back on");
    }

    #[test]
    fn a_single_seed_replays_exactly_to_the_same_trace_hash_and_another_seed_does_not() {
        let (seed, size) = (env_or("ANTHILL_REPLICATION_SEED", 7), env_or("ANTHILL_REPLICATION_SIZE", 3));
        let replay = |seed| {
            let mut sim = Sim::new(seed, size);
            sim.run(STORM_STEPS, CALM_STEPS);
            sim.check_converged(seed);
            (sim.nodes[0].log.entries.clone(), sim.acknowledged.clone(), sim.trace.hash)
        };
        let first = replay(seed);
        assert_eq!(first, replay(seed));
        assert_ne!(first.2, replay(seed + 1).2);
        let outcome = run(&Options::new(seed, size));
        assert_eq!(outcome.trace_hash, format!("{:016x}", first.2));
        assert!(outcome.failure.is_none());
    }
}
