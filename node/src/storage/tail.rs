//! The index tail: index entries of events that are in the log but not yet known to be in the
//! index environment.
//!
//! For every partition a run of positions, and for every stream with unindexed events a run of
//! versions, each mapping to the event's log sequence. The log's writer pushes a batch's entries
//! after its commit (before anyone is told of it); the indexer copies out the durable ones, writes
//! them to the index environment and, once that commit is done, trims them here.
//!
//! Invariants:
//! - a run's keys are dense: the run holds keys `first .. first + len`;
//! - sequences only grow along a run, and across all runs pushes come in sequence order, so
//!   trimming "everything up to sequence S" removes a prefix of every run;
//! - a partition run's `first` is always the partition's next position once the run is empty: the
//!   index environment holds every position below `first`, the run every one from `first` on;
//! - a stream run exists only while it holds entries; a stream without one is wholly in the index.
//!
//! Pure data: no I/O and no locking (the store wraps it in a lock).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

/// Dense keys (positions or versions) from `first` on, each with its log sequence.
#[derive(Debug, Default, Clone)]
pub(crate) struct Run {
    first: u64,
    seqs: VecDeque<u64>,
}

impl Run {
    fn starting_at(first: u64) -> Self {
        Run { first, seqs: VecDeque::new() }
    }

    /// The first key the run holds (or would hold next, when empty).
    pub fn first(&self) -> u64 {
        self.first
    }

    /// The key after the last one held.
    pub fn next(&self) -> u64 {
        self.first + self.seqs.len() as u64
    }

    /// Up to `max` `(key, seq)` entries from key `from` on.
    pub fn entries_from(&self, from: u64, max: usize) -> impl Iterator<Item = (u64, u64)> + '_ {
        // Straight to the entry: readers following a long run's end must not walk it.
        let skip = (from.saturating_sub(self.first) as usize).min(self.seqs.len());
        (self.first + skip as u64..).zip(self.seqs.range(skip..).copied()).take(max)
    }

    fn push(&mut self, key: u64, seq: u64) {
        assert_eq!(key, self.next(), "index tail keys are dense");
        debug_assert!(self.seqs.back().is_none_or(|last| *last < seq), "sequences grow along a run");
        self.seqs.push_back(seq);
    }

    /// Drops the entries with sequences up to `through_seq`; returns how many.
    fn trim(&mut self, through_seq: u64) -> usize {
        let n = self.seqs.partition_point(|seq| *seq <= through_seq);
        self.seqs.drain(..n);
        self.first += n as u64;
        n
    }
}

/// Entries copied out of the tail for the indexer: `(partition, position, seq)` in partition
/// order, `(stream, version, seq)` in no particular order.
#[derive(Debug, Default)]
pub(crate) struct Unindexed {
    pub partitions: Vec<(u32, u64, u64)>,
    pub streams: Vec<(Arc<str>, u64, u64)>,
}

#[derive(Debug)]
pub(crate) struct IndexTail {
    partitions: Vec<Run>,
    streams: HashMap<Arc<str>, Run>,
    /// Events held (each has one partition entry and one stream entry).
    events: usize,
}

impl IndexTail {
    /// An empty tail; `next_positions[p]` is partition `p`'s next position (its head + 1).
    pub fn new(next_positions: impl IntoIterator<Item = u64>) -> Self {
        let partitions = next_positions.into_iter().map(Run::starting_at).collect();
        IndexTail { partitions, streams: HashMap::new(), events: 0 }
    }

    pub fn events(&self) -> usize {
        self.events
    }

    pub fn partition(&self, partition: u32) -> &Run {
        &self.partitions[partition as usize]
    }

    pub fn stream(&self, stream: &str) -> Option<&Run> {
        self.streams.get(stream)
    }

    /// Adds one event's entries. Positions and versions must continue their runs.
    pub fn push(&mut self, partition: u32, position: u64, stream: &str, version: u64, seq: u64) {
        self.partitions[partition as usize].push(position, seq);
        match self.streams.get_mut(stream) {
            Some(run) => run.push(version, seq),
            None => {
                let mut run = Run::starting_at(version);
                run.push(version, seq);
                self.streams.insert(stream.into(), run);
            }
        }
        self.events += 1;
    }

    /// Copies out every entry with a sequence up to `through_seq`.
    pub fn unindexed(&self, through_seq: u64) -> Unindexed {
        let mut out = Unindexed::default();
        for (partition, run) in self.partitions.iter().enumerate() {
            let held = run.entries_from(run.first, usize::MAX).take_while(|(_, seq)| *seq <= through_seq);
            out.partitions.extend(held.map(|(position, seq)| (partition as u32, position, seq)));
        }
        for (stream, run) in &self.streams {
            let held = run.entries_from(run.first, usize::MAX).take_while(|(_, seq)| *seq <= through_seq);
            out.streams.extend(held.map(|(version, seq)| (stream.clone(), version, seq)));
        }
        debug_assert_eq!(out.partitions.len(), out.streams.len(), "every event has one entry of each kind");
        out
    }

    /// Makes an empty partition run continue at `next` (after a truncation of the partition).
    pub fn restart_partition(&mut self, partition: u32, next: u64) {
        let run = &mut self.partitions[partition as usize];
        assert!(run.seqs.is_empty(), "a partition is truncated only once its tail is flushed");
        run.first = next;
    }

    /// Drops every entry with a sequence up to `through_seq` (now in the index environment).
    pub fn trim(&mut self, through_seq: u64) {
        let trimmed: usize = self.partitions.iter_mut().map(|run| run.trim(through_seq)).sum();
        let mut trimmed_streams = 0;
        self.streams.retain(|_, run| {
            trimmed_streams += run.trim(through_seq);
            !run.seqs.is_empty()
        });
        assert_eq!(trimmed, trimmed_streams, "partition and stream entries of the tail disagree");
        self.events -= trimmed;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_pushed_events_when_read_then_runs_continue_from_their_first_keys() {
        let mut tail = IndexTail::new([1, 5]);
        tail.push(1, 5, "a", 1, 10);
        tail.push(0, 1, "a", 2, 11);
        tail.push(1, 6, "b", 3, 12);
        assert_eq!(tail.events(), 3);
        assert_eq!(tail.partition(1).entries_from(6, 10).collect::<Vec<_>>(), vec![(6, 12)]);
        assert_eq!(tail.partition(1).entries_from(1, 1).collect::<Vec<_>>(), vec![(5, 10)]);
        assert_eq!(tail.partition(1).entries_from(9, 10).count(), 0, "past the run's end");
        let a = tail.stream("a").unwrap();
        assert_eq!((a.first(), a.next()), (1, 3));
        assert_eq!(tail.stream("b").unwrap().first(), 3);
        assert!(tail.stream("c").is_none());
    }

    #[test]
    fn given_a_trim_when_done_then_only_later_entries_stay_and_empty_streams_go() {
        let mut tail = IndexTail::new([1, 1]);
        tail.push(0, 1, "a", 1, 1);
        tail.push(1, 1, "b", 1, 2);
        tail.push(0, 2, "a", 2, 3);
        let copied = tail.unindexed(2);
        assert_eq!(copied.partitions, vec![(0, 1, 1), (1, 1, 2)]);
        assert_eq!(copied.streams.len(), 2);
        tail.trim(2);
        assert_eq!(tail.events(), 1);
        assert!(tail.stream("b").is_none(), "an emptied stream run is dropped");
        assert_eq!(tail.stream("a").unwrap().entries_from(0, 9).collect::<Vec<_>>(), vec![(2, 3)]);
        // An emptied partition run still knows its next position.
        assert_eq!((tail.partition(1).first(), tail.partition(1).next()), (2, 2));
        tail.push(1, 2, "b", 2, 4);
        assert_eq!(tail.stream("b").unwrap().first(), 2);
    }

    #[test]
    #[should_panic(expected = "dense")]
    fn given_a_position_gap_when_pushed_then_it_panics() {
        let mut tail = IndexTail::new([1]);
        tail.push(0, 2, "a", 1, 1);
    }
}
