//! The chaos suite's history and its checker, Jepsen-style: every operation a client sent is
//! recorded as invoked and then ok, failed (definitely not applied) or unknown (a timeout, a
//! dropped connection: it may or may not have been applied), and after the nemesis stops and
//! the cluster heals, what every replica stored is read back and checked against it.
//!
//! Every write carries its operation's id (in the payload of a raw append, as the command id of
//! a ledger command), so each stored event names the operation that wrote it.
//!
//! The checks ([`check`]):
//! - every acknowledged operation is stored, exactly once (as many events as it writes, in one
//!   contiguous run), at the same positions on every replica of its partition;
//! - no definitely failed operation is stored;
//! - replicas of a partition hold the same operations at the same positions (no divergence);
//! - an unknown outcome is resolved by the read: applied (once) or not, both fine.
//!
//! Availability ([`unavailability`]): for each fault, the time from the fault until an operation
//! on an affected partition was acknowledged again.

use std::collections::{BTreeMap, BTreeSet};

/// One operation a client sent.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Record {
    pub id: u64,
    pub kind: OpKind,
    /// What it asked for: an append's stream, a transfer's book, accounts and amount.
    pub value: String,
    /// The partition the operation went to.
    pub partition: u32,
    /// When it was sent and when its outcome came back, in milliseconds since the run began.
    pub invoked_ms: u64,
    pub completed_ms: u64,
    pub outcome: Outcome,
}

/// What an operation did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OpKind {
    /// A raw append of one event.
    Append,
    /// A ledger transfer (one event, or a rejection).
    Transfer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Outcome {
    /// Acknowledged (with the durability asked for).
    Ok,
    /// Definitely not applied (refused before anything was written).
    Fail,
    /// Not known: applied or not.
    Unknown,
}

/// One event a replica stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredEvent {
    pub position: u64,
    /// The operation that wrote it; none for the events no client operation wrote (leaders'
    /// markers, probes, the books' opening commands).
    pub op: Option<u64>,
    /// A digest of everything the event holds (stream, version, type, payload, metadata, epoch,
    /// time): replicas agree on a position only if they agree on this.
    pub fingerprint: u64,
}

/// What one replica of a partition stores, in position order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub node: String,
    pub partition: u32,
    pub events: Vec<StoredEvent>,
}

impl OpKind {
    /// How many events the operation writes when it is applied.
    pub fn events(self) -> usize {
        match self {
            // One `Transferred` event names both accounts.
            OpKind::Append | OpKind::Transfer => 1,
        }
    }
}

/// What [`check`] found. `ok()` when nothing is wrong.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Verdict {
    /// Acknowledged operations no replica of their partition stores.
    pub lost: Vec<u64>,
    /// Operations stored more than once: more events than the operation writes, or in two
    /// separate runs of positions.
    pub duplicated: Vec<u64>,
    /// Operations that failed definitely, yet are stored.
    pub failed_but_stored: Vec<u64>,
    /// Acknowledged operations some replica of their partition lacks.
    pub missing_on_a_replica: Vec<(u64, String)>,
    /// Positions at which two replicas of a partition store different events (any event, the
    /// clients' or not).
    pub diverged: Vec<(u32, u64)>,
    /// Unknown outcomes the read resolved: applied, and not.
    pub unknown_applied: usize,
    pub unknown_absent: usize,
    /// Acknowledged operations checked.
    pub acknowledged: usize,
}

impl Verdict {
    pub fn ok(&self) -> bool {
        self.lost.is_empty()
            && self.duplicated.is_empty()
            && self.failed_but_stored.is_empty()
            && self.missing_on_a_replica.is_empty()
            && self.diverged.is_empty()
    }
}

/// Per replica of a partition (named by its node), where each operation's events are.
type Replicas<'a> = Vec<(&'a str, BTreeMap<u64, Vec<u64>>)>;

/// Where each operation's events are on one replica: operation id to its positions.
fn placed(stored: &Stored) -> BTreeMap<u64, Vec<u64>> {
    let mut placed: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for event in &stored.events {
        if let Some(op) = event.op {
            placed.entry(op).or_default().push(event.position);
        }
    }
    placed
}

/// Whether `positions` (ascending) are one run with no gap.
fn contiguous(positions: &[u64]) -> bool {
    positions.windows(2).all(|pair| pair[1] == pair[0] + 1)
}

/// Checks `history` against what the replicas store (module doc). `replicas` holds every
/// replica of every partition the history touched, read after the cluster healed.
pub fn check(history: &[Record], replicas: &[Stored]) -> Verdict {
    let mut verdict = Verdict::default();
    let mut by_partition: BTreeMap<u32, Vec<&Stored>> = BTreeMap::new();
    for stored in replicas {
        by_partition.entry(stored.partition).or_default().push(stored);
    }
    // Divergence: the same position holds the same event on every replica that has it.
    for (partition, stores) in &by_partition {
        let mut at: BTreeMap<u64, u64> = BTreeMap::new();
        let mut diverged = BTreeSet::new();
        for stored in stores {
            for event in &stored.events {
                if *at.entry(event.position).or_insert(event.fingerprint) != event.fingerprint {
                    diverged.insert(event.position);
                }
            }
        }
        verdict.diverged.extend(diverged.into_iter().map(|position| (*partition, position)));
    }
    let placements: BTreeMap<u32, Replicas<'_>> = by_partition
        .iter()
        .map(|(partition, stores)| (*partition, stores.iter().map(|s| (s.node.as_str(), placed(s))).collect()))
        .collect();
    let mut duplicated = BTreeSet::new();
    for record in history {
        let stores = placements.get(&record.partition).map(Vec::as_slice).unwrap_or(&[]);
        let copies: Vec<(&str, Option<&Vec<u64>>)> = stores.iter().map(|(node, placed)| (*node, placed.get(&record.id))).collect();
        if copies.iter().any(|(_, positions)| positions.is_some_and(|p| p.len() != record.kind.events() || !contiguous(p))) {
            duplicated.insert(record.id);
        }
        let stored_anywhere = copies.iter().any(|(_, positions)| positions.is_some());
        match record.outcome {
            Outcome::Ok => {
                verdict.acknowledged += 1;
                if !stored_anywhere {
                    verdict.lost.push(record.id);
                    continue;
                }
                for (node, positions) in &copies {
                    if positions.is_none() {
                        verdict.missing_on_a_replica.push((record.id, node.to_string()));
                    }
                }
            }
            Outcome::Fail if stored_anywhere => verdict.failed_but_stored.push(record.id),
            Outcome::Fail => {}
            Outcome::Unknown if stored_anywhere => verdict.unknown_applied += 1,
            Outcome::Unknown => verdict.unknown_absent += 1,
        }
    }
    verdict.duplicated = duplicated.into_iter().collect();
    verdict
}

/// One fault, as the availability measure sees it: when it began, when it was healed, and the
/// partitions whose leader it hit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultWindow {
    pub at_ms: u64,
    pub healed_ms: u64,
    pub partitions: Vec<u32>,
}

/// For each fault: the longest stretch, from the fault until the first acknowledgement after
/// its heal, in which one of its partitions acknowledged nothing; the worst of its partitions.
/// `None` when a partition acknowledged nothing after the heal (or the fault hit none).
///
/// The longest gap, not the time to the first acknowledgement: a leader cut off with enough of
/// its replicas may go on committing for a while, then stop until the heal.
pub fn unavailability(history: &[Record], faults: &[FaultWindow]) -> Vec<Option<u64>> {
    let mut acknowledged: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
    for r in history.iter().filter(|r| r.outcome == Outcome::Ok) {
        acknowledged.entry(r.partition).or_default().push(r.completed_ms);
    }
    for times in acknowledged.values_mut() {
        times.sort_unstable();
    }
    let worst_gap = |fault: &FaultWindow, partition: u32| -> Option<u64> {
        let times = acknowledged.get(&partition)?;
        let after = times.partition_point(|t| *t < fault.at_ms);
        let recovered = after + times[after..].iter().position(|t| *t >= fault.healed_ms)?;
        let mut previous = fault.at_ms;
        let mut worst = 0;
        for t in &times[after..=recovered] {
            worst = worst.max(t - previous);
            previous = *t;
        }
        Some(worst)
    };
    faults
        .iter()
        .map(|fault| {
            if fault.partitions.is_empty() {
                return None;
            }
            fault.partitions.iter().map(|p| worst_gap(fault, *p)).collect::<Option<Vec<u64>>>()?.into_iter().max()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(id: u64, partition: u32, outcome: Outcome) -> Record {
        Record { id, kind: OpKind::Append, value: String::new(), partition, invoked_ms: id * 10, completed_ms: id * 10 + 5, outcome }
    }

    fn transfer(id: u64, partition: u32, outcome: Outcome) -> Record {
        Record { kind: OpKind::Transfer, ..op(id, partition, outcome) }
    }

    /// A replica storing `ops`' events from position 1 on (0: an event no operation wrote).
    fn stored(node: &str, partition: u32, ops: &[u64]) -> Stored {
        let events = ops
            .iter()
            .enumerate()
            .map(|(i, op)| StoredEvent { position: i as u64 + 1, op: (*op > 0).then_some(*op), fingerprint: *op })
            .collect();
        Stored { node: node.into(), partition, events }
    }

    #[test]
    fn given_every_acknowledged_operation_stored_once_on_every_replica_then_the_history_checks() {
        let history = [transfer(1, 0, Outcome::Ok), op(2, 0, Outcome::Fail), op(3, 0, Outcome::Unknown), op(4, 0, Outcome::Unknown)];
        // The unknown 3 was applied, 4 was not; a leader's marker (no operation) sits between.
        let replicas = [stored("a", 0, &[1, 0, 3]), stored("b", 0, &[1, 0, 3])];
        let verdict = check(&history, &replicas);
        assert!(verdict.ok(), "{verdict:?}");
        assert_eq!((verdict.acknowledged, verdict.unknown_applied, verdict.unknown_absent), (1, 1, 1));
    }

    #[test]
    fn given_an_acknowledged_operation_no_replica_stores_then_it_is_lost() {
        let verdict = check(&[op(1, 0, Outcome::Ok), op(2, 0, Outcome::Ok)], &[stored("a", 0, &[1]), stored("b", 0, &[1])]);
        assert_eq!(verdict.lost, [2]);
        assert!(!verdict.ok());
    }

    #[test]
    fn given_an_operation_stored_twice_or_a_failed_one_stored_then_both_are_named() {
        let history = [op(1, 0, Outcome::Ok), op(2, 0, Outcome::Fail), op(3, 0, Outcome::Unknown)];
        let verdict = check(&history, &[stored("a", 0, &[1, 2, 3, 1])]);
        assert_eq!(verdict.duplicated, [1]);
        assert_eq!(verdict.failed_but_stored, [2]);
    }

    #[test]
    fn given_replicas_that_differ_then_the_positions_and_the_replica_missing_an_acknowledged_operation_are_named() {
        let history = [op(1, 0, Outcome::Ok), op(2, 0, Outcome::Ok), op(5, 1, Outcome::Ok)];
        let replicas = [stored("a", 0, &[1, 2]), stored("b", 0, &[1, 7]), stored("c", 1, &[5]), stored("a", 1, &[5])];
        let verdict = check(&history, &replicas);
        assert_eq!(verdict.diverged, [(0, 2)]);
        assert_eq!(verdict.missing_on_a_replica, [(2, "b".to_string())]);
        assert!(verdict.lost.is_empty());
    }

    #[test]
    fn given_an_operation_stored_twice_in_a_row_then_it_is_a_duplicate() {
        let history = [op(1, 0, Outcome::Ok), transfer(2, 0, Outcome::Ok), transfer(3, 0, Outcome::Ok)];
        // 1 and 2 each applied twice, one right after the other; 3 once.
        let verdict = check(&history, &[stored("a", 0, &[1, 1, 2, 2, 3])]);
        assert_eq!(verdict.duplicated, [1, 2]);
    }

    #[test]
    fn given_replicas_that_differ_at_an_event_no_operation_wrote_then_they_diverged() {
        // Replica b holds an old leader's operation 2 where a holds the new leader's marker.
        let history = [op(1, 0, Outcome::Ok), op(2, 0, Outcome::Unknown)];
        let verdict = check(&history, &[stored("a", 0, &[1, 0]), stored("b", 0, &[1, 2])]);
        assert_eq!(verdict.diverged, [(0, 2)]);
    }

    fn acked(partition: u32, completed_ms: u64) -> Record {
        Record { completed_ms, invoked_ms: completed_ms.saturating_sub(5), ..op(completed_ms, partition, Outcome::Ok) }
    }

    #[test]
    fn unavailability_is_the_longest_silence_of_a_partition_until_its_first_acknowledgement_after_the_heal() {
        let window = |at_ms, healed_ms, partitions: &[u32]| FaultWindow { at_ms, healed_ms, partitions: partitions.to_vec() };
        // Partition 0 acknowledges at 10, 20, then nothing until 70 (the heal at 60), then 80.
        // Partition 1 goes on at 12, 22, 32, ... 92.
        let mut history: Vec<Record> = [10, 20, 70, 80].iter().map(|t| acked(0, *t)).collect();
        history.extend((0..9).map(|i| acked(1, 12 + 10 * i)));
        history.push(Record { outcome: Outcome::Unknown, ..acked(0, 50) });
        let faults = [
            // Still committing for a while, then silent until the heal: 20 to 70.
            window(15, 60, &[0]),
            // The worst of its partitions counts, not the first to recover.
            window(15, 60, &[1, 0]),
            window(15, 60, &[1]),
            // No acknowledgement after the heal; a fault that hit no leader.
            window(85, 90, &[0]),
            window(15, 60, &[]),
        ];
        assert_eq!(unavailability(&history, &faults), [Some(50), Some(50), Some(10), None, None]);
    }
}
