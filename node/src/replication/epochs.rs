//! The leader-epoch history of one partition's log, and how two logs are reconciled with it.
//!
//! Every entry carries the epoch of the leader that wrote it, and a leader only ever appends to
//! its log, so a log's epochs never decrease along its positions. The history stores, for each
//! epoch that wrote entries, the position of its first entry — a handful of pairs, however long
//! the log. Two facts make it enough to reconcile logs (Raft's *log matching*, Kafka's
//! leader-epoch cache):
//! - entries of one epoch were written by one leader, in one order, so two logs whose entries at
//!   position `p` have the same epoch hold the same entries at every position up to `p`;
//! - therefore the longest common prefix of two logs is the largest position at which both
//!   histories name the same epoch ([`common_prefix`]), computed from the histories alone.

use super::{Epoch, Position};

/// For each epoch that wrote entries, the position of its first entry; both strictly increase.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EpochHistory {
    starts: Vec<(Epoch, Position)>,
}

impl EpochHistory {
    pub fn from_starts(starts: Vec<(Epoch, Position)>) -> Self {
        for pair in starts.windows(2) {
            assert!(pair[0].0 < pair[1].0 && pair[0].1 < pair[1].1, "epoch history must strictly increase: {starts:?}");
        }
        EpochHistory { starts }
    }

    /// Like [`EpochHistory::from_starts`], for pairs from the network or the disk: an error
    /// instead of a panic when they do not strictly increase.
    pub fn try_from_starts(starts: Vec<(Epoch, Position)>) -> Result<Self, String> {
        if starts.windows(2).any(|pair| pair[0].0 >= pair[1].0 || pair[0].1 >= pair[1].1) {
            return Err(format!("an epoch history must strictly increase, got {starts:?}"));
        }
        Ok(EpochHistory { starts })
    }

    pub fn starts(&self) -> &[(Epoch, Position)] {
        &self.starts
    }

    /// Notes that the entry at `position` has `epoch`; the caller appends in order.
    pub fn record(&mut self, epoch: Epoch, position: Position) {
        match self.starts.last() {
            Some(&(last_epoch, _)) if last_epoch == epoch => {}
            Some(&(last_epoch, start)) => {
                assert!(
                    epoch > last_epoch && position > start,
                    "epochs only grow along a log: {epoch} at {position} after {last_epoch} from {start}"
                );
                self.starts.push((epoch, position));
            }
            None => self.starts.push((epoch, position)),
        }
    }

    /// The epoch of the entry at `position`, for a position the log holds.
    pub fn epoch_at(&self, position: Position) -> Option<Epoch> {
        let after = self.starts.partition_point(|&(_, start)| start <= position);
        after.checked_sub(1).map(|i| self.starts[i].0)
    }

    /// The epoch of the last entry, 0 for an empty log.
    pub fn last_epoch(&self) -> Epoch {
        self.starts.last().map_or(0, |&(epoch, _)| epoch)
    }

    /// Forgets every entry after `position`.
    pub fn truncate_after(&mut self, position: Position) {
        self.starts.retain(|&(_, start)| start <= position);
    }
}

/// The longest common prefix of two logs, given their histories and last positions: the
/// largest position `p <= min(a_last, b_last)` whose entries have the same epoch in both (0 if
/// none). By log matching, the logs agree on every position up to it and differ right after it.
pub fn common_prefix(a: &EpochHistory, a_last: Position, b: &EpochHistory, b_last: Position) -> Position {
    let end = a_last.min(b_last);
    // Between consecutive breakpoints (a start in either history) both epochs are constant, so
    // checking each segment's first position is enough; keep the end of the last agreeing one.
    let mut breaks: Vec<Position> = a.starts.iter().chain(&b.starts).map(|&(_, start)| start).filter(|&p| p <= end).collect();
    breaks.sort_unstable();
    breaks.dedup();
    let mut agreed = 0;
    for (i, &start) in breaks.iter().enumerate() {
        let segment_end = breaks.get(i + 1).map_or(end, |next| next - 1);
        match (a.epoch_at(start), b.epoch_at(start)) {
            (Some(x), Some(y)) if x == y => agreed = segment_end,
            // Log matching: once they differ, no later position can agree.
            _ => break,
        }
    }
    agreed
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn history(starts: &[(Epoch, Position)]) -> EpochHistory {
        EpochHistory::from_starts(starts.to_vec())
    }

    #[test]
    fn given_a_history_then_each_position_has_the_epoch_that_wrote_it() {
        let h = history(&[(1, 1), (3, 5), (7, 6)]);
        assert_eq!(
            [h.epoch_at(0), h.epoch_at(1), h.epoch_at(4), h.epoch_at(5), h.epoch_at(6), h.epoch_at(99)],
            [None, Some(1), Some(1), Some(3), Some(7), Some(7)]
        );
    }

    #[test]
    fn given_a_truncation_then_epochs_that_started_after_it_are_forgotten() {
        let mut h = history(&[(1, 1), (3, 5), (7, 6)]);
        h.truncate_after(5);
        assert_eq!(h.starts(), [(1, 1), (3, 5)]);
        h.truncate_after(0);
        assert_eq!(h.last_epoch(), 0);
    }

    #[test]
    fn given_logs_that_split_after_a_shared_epoch_then_the_common_prefix_ends_where_they_split() {
        // Both have epoch 1 up to 4; a has epoch 2 from 5, b has epoch 3 from 5.
        assert_eq!(common_prefix(&history(&[(1, 1), (2, 5)]), 9, &history(&[(1, 1), (3, 5)]), 7), 4);
        // One log is a prefix of the other.
        assert_eq!(common_prefix(&history(&[(1, 1), (2, 5)]), 6, &history(&[(1, 1), (2, 5)]), 9), 6);
        // a wrote epoch 2 entries that b never saw; b's epoch 3 started later.
        assert_eq!(common_prefix(&history(&[(1, 1), (2, 4)]), 5, &history(&[(1, 1), (3, 6)]), 8), 3);
        assert_eq!(common_prefix(&history(&[(2, 1)]), 5, &history(&[(3, 1)]), 5), 0);
        assert_eq!(common_prefix(&EpochHistory::default(), 0, &history(&[(3, 1)]), 5), 0);
    }

    /// Builds a log: for each step, append `count` entries in `epoch` (epochs made increasing).
    fn log_from(steps: &[(u64, u64)]) -> (EpochHistory, Vec<Epoch>) {
        let mut h = EpochHistory::default();
        let mut epochs = Vec::new();
        let mut epoch = 0;
        for &(bump, count) in steps {
            epoch += bump;
            for _ in 0..count {
                epochs.push(epoch);
                h.record(epoch, epochs.len() as Position);
            }
        }
        (h, epochs)
    }

    proptest! {
        /// Two logs that share a prefix and then continue on their own: the common prefix the
        /// histories give is exactly the longest prefix whose epochs agree position by position.
        #[test]
        fn the_common_prefix_matches_a_position_by_position_comparison(
            shared in proptest::collection::vec((1u64..3, 0u64..4), 0..4),
            a_rest in proptest::collection::vec((1u64..3, 0u64..4), 0..4),
            b_rest in proptest::collection::vec((1u64..3, 0u64..4), 0..4),
        ) {
            // b's own epochs are offset so the two continuations never reuse an epoch number
            // (one epoch, one leader), as in a real cluster.
            let a_steps: Vec<_> = shared.iter().chain(&a_rest).copied().collect();
            let b_steps: Vec<_> = shared.iter().copied().chain(b_rest.iter().enumerate().map(|(i, &(bump, n))| (if i == 0 { bump + 10 } else { bump }, n))).collect();
            let (ha, ea) = log_from(&a_steps);
            let (hb, eb) = log_from(&b_steps);
            let expected = ea.iter().zip(&eb).take_while(|(x, y)| x == y).count() as Position;
            prop_assert_eq!(common_prefix(&ha, ea.len() as Position, &hb, eb.len() as Position), expected);
        }
    }
}
