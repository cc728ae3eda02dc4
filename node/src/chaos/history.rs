//! The chaos suite's history and its checker, Jepsen-style: every operation a client sent is
//! recorded as invoked and then ok, failed (definitely not applied) or unknown (a timeout, a
//! dropped connection: it may or may not have been applied), and after the nemesis stops and
//! the cluster heals, what every replica stored is read back and checked against it.
//!
//! Every write carries its operation's id (in the payload of a raw append, as the command id of
//! a ledger command), so each stored event names the operation that wrote it.
//!
//! The checks ([`check`]):
//! - every acknowledged operation is stored, exactly once (its events one contiguous run), at the
//!   same positions on every replica of its partition;
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
    /// A ledger transfer (two events, or a rejection).
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

/// What one replica of a partition stores: per position, the operation that wrote the event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub node: String,
    pub partition: u32,
    pub events: Vec<(u64, u64)>,
}

/// What [`check`] found. `ok()` when nothing is wrong.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Verdict {
    /// Acknowledged operations no replica of their partition stores.
    pub lost: Vec<u64>,
    /// Operations stored more than once (in two separate runs of positions).
    pub duplicated: Vec<u64>,
    /// Operations that failed definitely, yet are stored.
    pub failed_but_stored: Vec<u64>,
    /// Acknowledged operations some replica of their partition lacks.
    pub missing_on_a_replica: Vec<(u64, String)>,
    /// Positions at which two replicas of a partition store different operations.
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
    for (position, op) in &stored.events {
        placed.entry(*op).or_default().push(*position);
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
    // Divergence: the same position holds the same operation on every replica that has it.
    for (partition, stores) in &by_partition {
        let mut at: BTreeMap<u64, u64> = BTreeMap::new();
        let mut diverged = BTreeSet::new();
        for stored in stores {
            for (position, op) in &stored.events {
                if *at.entry(*position).or_insert(*op) != *op {
                    diverged.insert(*position);
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
        if copies.iter().any(|(_, positions)| positions.is_some_and(|p| !contiguous(p))) {
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

/// For each fault (when it happened, and the partitions it affected): how long until an
/// operation on an affected partition invoked after the fault was acknowledged; `None` when none
/// was before the history ends.
pub fn unavailability(history: &[Record], faults: &[(u64, Vec<u32>)]) -> Vec<Option<u64>> {
    faults
        .iter()
        .map(|(at_ms, partitions)| {
            history
                .iter()
                .filter(|r| r.outcome == Outcome::Ok && r.invoked_ms >= *at_ms && partitions.contains(&r.partition))
                .map(|r| r.completed_ms - at_ms)
                .min()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(id: u64, partition: u32, outcome: Outcome) -> Record {
        Record { id, kind: OpKind::Append, partition, invoked_ms: id * 10, completed_ms: id * 10 + 5, outcome }
    }

    fn stored(node: &str, partition: u32, ops: &[u64]) -> Stored {
        Stored { node: node.into(), partition, events: ops.iter().enumerate().map(|(i, op)| (i as u64 + 1, *op)).collect() }
    }

    #[test]
    fn given_every_acknowledged_operation_stored_once_on_every_replica_then_the_history_checks() {
        let history = [op(1, 0, Outcome::Ok), op(2, 0, Outcome::Fail), op(3, 0, Outcome::Unknown), op(4, 0, Outcome::Unknown)];
        // Operation 1 wrote two events; the unknown 3 was applied, 4 was not.
        let replicas = [stored("a", 0, &[1, 1, 3]), stored("b", 0, &[1, 1, 3])];
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
    fn unavailability_is_the_time_to_the_first_acknowledgement_after_the_fault_on_an_affected_partition() {
        let mut history = vec![op(1, 0, Outcome::Ok), op(2, 1, Outcome::Ok), op(3, 0, Outcome::Fail), op(4, 0, Outcome::Ok)];
        history[3].completed_ms = 70;
        // A fault at 15 ms on partition 0: operation 2 is on another partition, 3 failed; 4
        // (invoked at 40) was acknowledged at 70. A fault no later operation saw ends the run.
        assert_eq!(unavailability(&history, &[(15, vec![0]), (15, vec![1]), (100, vec![0])]), [Some(55), Some(10), None]);
    }
}
