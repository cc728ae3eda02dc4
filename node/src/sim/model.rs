//! One node's replica of one partition as the simulator models it, shared by the replica-set
//! simulation ([`super::replication`]) and the whole-cluster one ([`super::cluster`]): the
//! node's log (with a retention floor, and what its last sync made durable), its ledger book, and
//! the execution of the real [`Replica`]'s effects, checked against the partition's [`History`]
//! as they happen; and the run's trace (events, hashed) and statistics.
//!
//! Storage is modelled, not run: LMDB's own I/O cannot be intercepted, so a node's durable state
//! is what its last sync copied (docs/simulation.md, "Storage"). A crash keeps that and loses the
//! rest; the book is then rebuilt from the durable log, as the node's storage holds state and
//! events in the same transactions.

use std::collections::{BTreeMap, VecDeque};

use rand::Rng;
use rand::rngs::StdRng;

use crate::app::commands::{self, CommandRecord};
use crate::app::ledger::query::LedgerQuery;
use crate::app::ledger::{Ledger, LedgerCommand, LedgerError, LedgerEvent};
use crate::app::processor::{self, Decision, Failure};
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
pub(super) struct Log {
    pub(super) entries: Vec<Entry>,
    pub(super) floor: Position,
    /// As of the last sync (what a crash keeps), with its floor.
    pub(super) durable: Vec<Entry>,
    pub(super) durable_floor: Position,
    /// The first index of `entries` changed since the last sync (its length when none): a sync
    /// copies only from there.
    pub(super) dirty_from: usize,
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
    pub(super) fn snapshot(&self, durable: Position, commit: Position) -> Option<Snapshot> {
        let position = self.durable.len() as Position;
        assert!(position >= durable && position >= self.durable_floor, "a snapshot short of the durable position {durable}");
        let mut data = commit.min(position).to_be_bytes().to_vec();
        data.extend(encode(&self.durable));
        (position > 0).then(|| Snapshot { position, history: history_of(&self.durable), data })
    }
}

/// Entries as a snapshot's bytes: per entry, position, epoch, continued, marker, data length, data.
pub(super) fn encode(entries: &[Entry]) -> Vec<u8> {
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

pub(super) fn decode(mut bytes: &[u8]) -> Vec<Entry> {
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

pub(super) fn history_of(log: &[Entry]) -> EpochHistory {
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
pub(super) struct Book {
    pub(super) state: MemoryState,
    journals: BTreeMap<Position, Journal>,
}

pub(super) const SCOPE: &str = "book";

/// A ledger event as it travels in an entry's data: `L` and this as JSON (other entries are
/// opaque). The last event of a command carries its id, its hash and how many events it wrote,
/// as a node's event metadata does (`app/follow.rs`), so every replica records the id.
#[derive(serde::Serialize, serde::Deserialize)]
struct LedgerEntry {
    event: LedgerEvent,
    command: Option<(String, u64, u32)>,
}

fn ledger_entry(entry: &Entry) -> Option<LedgerEntry> {
    match &entry.kind {
        EntryKind::Data(data) if data.first() == Some(&b'L') => {
            Some(serde_json::from_slice(&data[1..]).expect("a ledger entry holds a ledger event"))
        }
        _ => None,
    }
}

/// The command id an entry ends, if it ends a command.
fn command_of(entry: &Entry) -> Option<String> {
    ledger_entry(entry)?.command.map(|(id, ..)| id)
}

impl Book {
    /// The book of `entries` from nothing.
    pub(super) fn replay(entries: &[Entry]) -> Book {
        let mut book = Book::default();
        book.apply(entries);
        book
    }

    /// Evolves the ledger events of `entries` (whole appends), journaling each append.
    pub(super) fn apply(&mut self, entries: &[Entry]) {
        let prefix = subspace(Ledger::NAME, SCOPE);
        let mut journal = Journal::default();
        let stream = crate::app::stream_of(Ledger::NAME, SCOPE);
        for entry in entries {
            if let Some(LedgerEntry { event, command }) = ledger_entry(entry) {
                Ledger::evolve(&mut State::memory(&mut self.state, &prefix, Some(&mut journal)), &event)
                    .expect("the ledger evolves its own events");
                // The command's id, recorded from the entry as a follower records it.
                if let Some((id, command_hash, events)) = command {
                    let record = CommandRecord {
                        partition: 0,
                        first_position: entry.position + 1 - Position::from(events),
                        last_position: entry.position,
                        stream_version: 0,
                        events,
                        recorded_at_us: 0,
                        command_hash,
                    };
                    commands::record_in(&mut State::memory(&mut self.state, &[], Some(&mut journal)), &stream, &id, &record)
                        .expect("a command record is written");
                }
            }
            if !entry.atomic_with_next && !journal.is_empty() {
                self.journals.insert(entry.position, std::mem::take(&mut journal));
            }
        }
    }

    /// Takes back the appends after `after`, newest first.
    pub(super) fn truncate(&mut self, after: Position) {
        let undone = self.journals.split_off(&(after + 1));
        for journal in undone.values().rev() {
            journal.undo_in(&mut self.state);
        }
    }

    /// A leader's decision on the command `id` against its book, LMAX style, by the node's own
    /// processor code (`processor::decide`: the id looked up, then the ledger's decide).
    fn decide(&self, command: &LedgerCommand, id: &str, step: u64) -> Decision<LedgerEvent, LedgerError> {
        let ctx = Context { now_us: step * 1_000, command_id: id, remember_id: true, ids_since_us: 0 };
        let stream = crate::app::stream_of(Ledger::NAME, SCOPE);
        processor::decide::<Ledger>(&StateView::memory(&self.state, &[]), &stream, SCOPE, command, &ctx).expect("a command encodes")
    }

    /// The ledger's own audit of the book: every invariant it checks (money conserved, no
    /// account past its limit, holds adding up).
    pub(super) fn audit(&self) -> Result<(), String> {
        let prefix = subspace(Ledger::NAME, SCOPE);
        let report = Ledger::query(&StateView::memory(&self.state, &prefix), &LedgerQuery::Audit {}).map_err(|e| format!("{e:?}"))?;
        if report["ok"] == serde_json::Value::Bool(true) { Ok(()) } else { Err(report["violations"].to_string()) }
    }
}

/// The entries' data for a command's events: the last one names the command.
fn entries_of(events: &[LedgerEvent], id: &str, command_hash: u64) -> Vec<Vec<u8>> {
    let count = events.len() as u32;
    let last = events.len().saturating_sub(1);
    let entry = |(i, event): (usize, &LedgerEvent)| {
        let command = (i == last).then(|| (id.to_string(), command_hash, count));
        let entry = LedgerEntry { event: event.clone(), command };
        [b"L".as_slice(), &serde_json::to_vec(&entry).expect("events encode")].concat()
    };
    events.iter().enumerate().map(entry).collect()
}

/// Clients of the ledger: each command gets an id, and some are sent again (a client that did
/// not hear back retries with the same id, maybe on another leader).
#[derive(Default)]
pub(super) struct Clients {
    /// Commands sent lately, to retry.
    sent: VecDeque<(String, LedgerCommand)>,
    next: u64,
}

/// Commands kept for retries.
const RETRYABLE: usize = 32;

impl Clients {
    /// A command to send, with its id: a fifth of the time one sent before.
    pub(super) fn request(&mut self, rng: &mut StdRng) -> (String, LedgerCommand) {
        if !self.sent.is_empty() && rng.random_bool(0.2) {
            return self.sent[rng.random_range(0..self.sent.len())].clone();
        }
        self.next += 1;
        let sent = (format!("c{}", self.next), ledger_command(rng));
        if self.sent.len() == RETRYABLE {
            self.sent.pop_front();
        }
        self.sent.push_back(sent.clone());
        sent
    }
}

impl Node {
    /// Node `n`'s leader takes the client command `id` (module doc of `app/processor.rs`): the
    /// group to propose when it is decided now; nothing when refused, or when it is a duplicate,
    /// which is acknowledged once the first result's last event is committed in this epoch (the
    /// node answers a duplicate only then), so the history waits for that entry.
    pub(super) fn ledger_request(&self, n: NodeId, id: &str, command: &LedgerCommand, step: u64, cx: &mut Ctx) -> Vec<Vec<u8>> {
        // A paused partition takes no command, duplicates included (its role reads as none).
        if self.replica.paused() {
            return Vec::new();
        }
        match self.book.decide(command, id, step) {
            Decision::Decided { events, command_hash } => {
                cx.stats.ledger_commands += u64::from(!events.is_empty());
                entries_of(&events, id, command_hash)
            }
            Decision::Duplicate(record) => {
                let last = record.last_position;
                let entry = self.log.entries.get(last as usize - 1);
                assert_eq!(
                    entry.and_then(command_of).as_deref(),
                    Some(id),
                    "node {n}'s record of command {id} points at {last}, which does not end that command"
                );
                let data = match &entry.expect("checked above").kind {
                    EntryKind::Data(data) => data.clone(),
                    EntryKind::Marker => unreachable!("a marker ends no command"),
                };
                let epoch = self.replica.promised();
                cx.history.proposed.push(Proposal { node: n, epoch, last, group: vec![data], at: cx.step, duplicate: true });
                cx.stats.duplicates += 1;
                Vec::new()
            }
            Decision::Failed(Failure::IdReused) => panic!("node {n} refused a retry of command {id} as an id reused for another command"),
            Decision::Failed(_) => Vec::new(),
        }
    }
}

/// A random ledger command of the book's three accounts and two holds.
pub(super) fn ledger_command(rng: &mut StdRng) -> LedgerCommand {
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

/// One node's replica of a partition: the real [`Replica`] and the storage it runs over.
pub(super) struct Node {
    pub(super) book: Book,
    pub(super) replica: Replica,
    pub(super) up: bool,
    pub(super) durable_promise: Epoch,
    pub(super) log: Log,
    pub(super) promise: Epoch,
    /// Executed batches not yet synced: their ticket and the messages they hold back.
    pub(super) unsynced: VecDeque<(u64, Vec<(NodeId, Message)>)>,
    /// The entries of the log through here were checked against what was committed (checking
    /// only what is new keeps a long run linear).
    checked: Position,
}

/// What the replicas of one partition did, checked as it happens: entries committed, proposals
/// acknowledged, and who served each epoch.
#[derive(Default)]
pub(super) struct History {
    /// Every committed position's entry, as the first replica to commit it saw it.
    pub(super) committed: BTreeMap<Position, Entry>,
    /// Proposals whose leader saw them committed in their own epoch: (position, data).
    pub(super) acknowledged: Vec<(Position, Vec<u8>)>,
    /// Groups proposed and waiting for their leader's commit.
    pub(super) proposed: Vec<Proposal>,
    /// The step of the latest new write (not a duplicate) acknowledged so far.
    pub(super) latest_acknowledged_at: u64,
    /// Which node served each epoch as its leader: at most one may.
    pub(super) servers: BTreeMap<Epoch, NodeId>,
    /// Linearizable reads waiting for their round: (node, epoch, round, the highest position
    /// committed anywhere when the read began).
    pub(super) reads: Vec<(NodeId, Epoch, u64, Position)>,
}

impl History {
    /// A read its leader confirmed sees everything committed before it began; a read whose
    /// leader stepped down or is gone (`replica_of` gives a node's running replica) is dropped
    /// (it failed, and its client retries). How many were confirmed.
    pub(super) fn check_reads<'a>(&mut self, replica_of: impl Fn(NodeId) -> Option<&'a Replica>) -> u64 {
        let mut confirmed = 0;
        self.reads.retain(|(n, epoch, round, required)| {
            let Some(replica) = replica_of(*n).filter(|r| r.promised() == *epoch && matches!(r.role(), Role::Leader { .. })) else {
                return false;
            };
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
        confirmed
    }

    /// Node `n`'s replica asks for a read's round, now.
    pub(super) fn read(&mut self, n: NodeId, node: &mut Node) -> bool {
        let required = self.committed.keys().next_back().copied().unwrap_or(0);
        match node.replica.read_index(&node.log) {
            Some(round) => {
                self.reads.push((n, node.replica.promised(), round, required));
                true
            }
            None => false,
        }
    }
}

/// At the end of a run (`run` names it in failures), a partition's replicas (`members`) hold one
/// log, all of it committed, with every entry committed and every write acknowledged during the
/// run, and no append split across epochs; each book is its log replayed and passes the audit.
pub(super) fn check_converged(history: &History, members: &[(NodeId, &Node)], run: &str) {
    let reference = &members[0].1.log.entries;
    let replayed = Book::replay(reference);
    for (n, node) in members {
        assert_eq!(&node.log.entries, reference, "{run}: logs differ after healing");
        assert_eq!(node.replica.commit(), reference.len() as Position, "{run}: not everything is committed after healing");
        // Each replica's ledger, kept from what it appended, truncated and installed, is the
        // ledger of its log replayed.
        assert!(node.book.state == replayed.state, "{run}: node {n}'s ledger is not a replay of its log");
        node.book.audit().unwrap_or_else(|v| panic!("{run}: node {n}'s ledger breaks its invariants: {v}"));
    }
    for (position, entry) in &history.committed {
        assert_eq!(reference.get(*position as usize - 1), Some(entry), "{run}: committed entry at {position} lost");
    }
    for pair in reference.windows(2) {
        assert!(
            !pair[0].atomic_with_next || pair[0].epoch == pair[1].epoch,
            "{run}: an append at {} goes on in another epoch",
            pair[0].position
        );
    }
    for (position, data) in &history.acknowledged {
        let entry = &reference[*position as usize - 1];
        assert_eq!(entry.kind, EntryKind::Data(data.clone()), "{run}: acknowledged proposal at {position} lost");
    }
    // Exactly once: however often a client retried a command, on whichever leader, its events
    // are in the log once.
    let mut ids = std::collections::BTreeSet::new();
    for entry in reference {
        if let Some(id) = command_of(entry) {
            assert!(ids.insert(id.clone()), "{run}: command {id} was applied twice (again at {})", entry.position);
        }
    }
}

/// A group of entries a leader took, waiting for its commit in the leader's epoch.
pub(super) struct Proposal {
    pub(super) node: NodeId,
    pub(super) epoch: Epoch,
    /// The position of its last entry.
    pub(super) last: Position,
    pub(super) group: Vec<Vec<u8>>,
    /// The step it was proposed at.
    pub(super) at: u64,
    /// A duplicate's answer waiting for its first result (not a new write).
    pub(super) duplicate: bool,
}

/// Where a node's effects are recorded: the partition's history, the run's stats and trace.
pub(super) struct Ctx<'a> {
    pub(super) step: u64,
    pub(super) partition: u32,
    pub(super) history: &'a mut History,
    pub(super) stats: &'a mut Stats,
    pub(super) trace: &'a mut Trace,
}

impl Node {
    /// A replica that starts with nothing.
    pub(super) fn new(config: ReplicaConfig) -> Self {
        Node {
            book: Book::default(),
            replica: Replica::new(config, DurableState::default()),
            up: true,
            durable_promise: 0,
            log: Log::default(),
            promise: 0,
            unsynced: VecDeque::new(),
            checked: 0,
        }
    }

    /// Takes the replica's effects and executes them (writes now, messages after its next sync).
    pub(super) fn drain(&mut self, n: NodeId, cx: &mut Ctx) {
        let (step, p) = (cx.step, cx.partition);
        let node = self;
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
                    node.checked = node.checked.min(after);
                    cx.stats.truncations += 1;
                    cx.trace.note_in(p, Event::Truncate { step, node: n, after });
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
                    // Check the new log's committed entries again.
                    node.checked = 0;
                    cx.stats.installs += 1;
                    cx.trace.note_in(p, Event::Install { step, node: n, position: snapshot.position });
                }
                Effect::Send { to, message } => sends.push((to, message)),
                Effect::SendSnapshot { to, reply } => {
                    let Some(snapshot) = node.log.snapshot(node.replica.durable(), node.replica.commit()) else { continue };
                    sends.push((to, reply.message(snapshot)));
                }
                Effect::Committed(position) => {
                    cx.trace.note_in(p, Event::Committed { step, node: n, position });
                    let end = &node.log.entries[position as usize - 1];
                    assert!(!end.atomic_with_next, "node {n} commits through {position}, inside an append");
                    for e in &node.log.entries[node.checked.min(position) as usize..position as usize] {
                        match cx.history.committed.get(&e.position) {
                            Some(first) => {
                                assert_eq!(first, e, "node {n} commits another entry at {} than was committed before", e.position)
                            }
                            None => {
                                cx.history.committed.insert(e.position, e.clone());
                            }
                        }
                    }
                    node.checked = node.checked.max(position);
                    let epoch = node.replica.promised();
                    let (done, waiting): (Vec<_>, Vec<_>) =
                        cx.history.proposed.drain(..).partition(|p| p.node == n && p.epoch == epoch && p.last <= position);
                    cx.history.proposed = waiting;
                    for Proposal { last, group, at, duplicate, .. } in done {
                        let first = last + 1 - group.len() as Position;
                        cx.history.acknowledged.extend((first..=last).zip(group));
                        if !duplicate {
                            cx.history.latest_acknowledged_at = cx.history.latest_acknowledged_at.max(at);
                        }
                    }
                }
                Effect::Serving { epoch, .. } => {
                    let first = *cx.history.servers.entry(epoch).or_insert(n);
                    assert_eq!(first, n, "nodes {first} and {n} both serve epoch {epoch} as its leader");
                }
                Effect::SteppedDown { .. } => cx.history.proposed.retain(|p| p.node != n),
            }
        }
        let end = node.log.entries.last();
        assert!(end.is_none_or(|e| !e.atomic_with_next), "node {n}'s log ends inside an append at {:?}", end.map(|e| e.position));
        node.unsynced.push_back((batch.ticket, sends));
    }

    /// Makes everything executed durable: the messages held back until then, to send, and the
    /// ticket to report durable ([`Node::synced`]); `None` when nothing waited.
    pub(super) fn sync(&mut self) -> Option<(u64, Vec<(NodeId, Message)>)> {
        let &(ticket, _) = self.unsynced.back()?;
        let from = self.log.dirty_from.min(self.log.durable.len());
        self.log.durable.truncate(from);
        self.log.durable.extend_from_slice(&self.log.entries[from..]);
        self.log.dirty_from = self.log.entries.len();
        self.log.durable_floor = self.log.floor;
        self.durable_promise = self.promise;
        let sends = self.unsynced.drain(..).flat_map(|(_, sends)| sends).collect();
        Some((ticket, sends))
    }

    /// Tells the replica its batches through `ticket` are durable, and executes what follows.
    pub(super) fn synced(&mut self, n: NodeId, ticket: u64, cx: &mut Ctx) {
        self.replica.on_durable(ticket, &self.log);
        self.drain(n, cx);
    }

    /// Retention: gives up the log up to the end of some append (drawn by `rng`) the replica
    /// knows committed and holds durably; a trim is durable at once, as the node's is. The new
    /// floor, if there was anything to give up.
    pub(super) fn trim(&mut self, rng: &mut StdRng) -> Option<Position> {
        let bound = self.replica.commit().min(self.log.durable.len() as Position);
        let floor = self.log.floor;
        let ends: Vec<Position> =
            self.log.durable[..bound as usize].iter().filter(|e| !e.atomic_with_next && e.position > floor).map(|e| e.position).collect();
        if ends.is_empty() {
            return None;
        }
        let floor = ends[rng.random_range(0..ends.len())];
        self.log.floor = floor;
        self.log.durable_floor = self.log.durable_floor.max(floor);
        Some(floor)
    }

    /// The process dies: the log and the promise are what the last sync made durable, and the
    /// book is the durable log's (the storage keeps both in the same transactions).
    pub(super) fn crash(&mut self) {
        self.up = false;
        self.log.entries = self.log.durable.clone();
        self.log.dirty_from = self.log.entries.len();
        self.log.floor = self.log.durable_floor;
        self.book = Book::replay(&self.log.entries);
        self.promise = self.durable_promise;
        self.unsynced.clear();
        self.checked = self.checked.min(self.log.entries.len() as Position);
    }

    /// A new replica from the durable state (a restarted process, or a task started anew), its
    /// read rounds above every earlier incarnation's (what the shell does with its clock).
    pub(super) fn restart(&mut self, config: ReplicaConfig, target: Vec<NodeId>, rounds_from: u64) {
        let state = DurableState {
            promised: self.durable_promise,
            history: history_of(&self.log.durable),
            last: self.log.durable.len() as Position,
        };
        self.replica = Replica::new(config, state);
        self.replica.set_target(target);
        self.replica.start_rounds_at(rounds_from);
        self.up = true;
    }
}

/// One thing that happened in a run: hashed into the trace hash, and the last ones kept to show
/// what led to a failure.
#[derive(Debug, Clone, Copy)]
pub(super) enum Event {
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
    Drain { step: u64, node: NodeId, on: bool },
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
            Event::Drain { step, node, on: true } => write!(f, "step {step}: node {node} drains"),
            Event::Drain { step, node, on: false } => write!(f, "step {step}: node {node} leads again"),
        }
    }
}

/// The run's trace: a hash of every event (same seed and binary, same hash) and the last ones.
#[derive(Default)]
pub(super) struct Trace {
    pub(super) hash: u64,
    /// The last events, with the partition each happened in.
    pub(super) recent: VecDeque<(u32, Event)>,
    /// Whether the run has several partitions (failure reports then name them).
    pub(super) partitioned: bool,
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
            Event::Drain { step, node, on } => [15, step, node.into(), on.into(), 0, 0],
        }
    }
}

impl Trace {
    /// Notes an event of partition 0 (a one-partition run).
    pub(super) fn note(&mut self, event: Event) {
        self.note_in(0, event);
    }

    /// Notes an event of `partition`.
    pub(super) fn note_in(&mut self, partition: u32, event: Event) {
        for word in event.words().into_iter().chain([u64::from(partition)]) {
            self.hash = (self.hash ^ word).wrapping_mul(0x0000_0100_0000_01b3).rotate_left(5);
        }
        if self.recent.len() == RECENT_EVENTS {
            self.recent.pop_front();
        }
        self.recent.push_back((partition, event));
    }
}

pub(super) fn kind_of(message: &Message) -> &'static str {
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

impl Trace {
    /// The last events, as a failure report shows them.
    pub(super) fn recent(&self) -> Vec<String> {
        // Events of the whole cluster (not of one partition) are noted in partition `u32::MAX`.
        let show = |(p, e): &(u32, Event)| if self.partitioned && *p != u32::MAX { format!("partition {p}, {e}") } else { e.to_string() };
        self.recent.iter().map(show).collect()
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
    /// Retried commands answered as duplicates (each checked to be in the final log once).
    pub duplicates: u64,
    /// Coordination members that installed their Raft leader's snapshot (the whole cluster).
    pub store_snapshots_installed: u64,
    /// Nodes told to drain, and leaderships they handed over for it (a handover to the leader's
    /// own set), and leaderships handed back to a preferred replica the same way.
    pub drains: u64,
    pub drain_handovers: u64,
    pub hand_backs: u64,
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
        self.duplicates += other.duplicates;
        self.store_snapshots_installed += other.store_snapshots_installed;
        self.drains += other.drains;
        self.drain_handovers += other.drain_handovers;
        self.hand_backs += other.hand_backs;
    }
}
