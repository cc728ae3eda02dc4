//! What replicas of one partition say to each other. The transport (one multiplexed stream per
//! pair of nodes) adds the partition; the replica core ([`super::replica`]) neither knows nor
//! cares how messages travel, and tolerates them being lost, repeated, delayed and reordered.

use super::{Entry, Epoch, EpochHistory, Position, Snapshot};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// A new leader asks every replica to stop taking anything from older epochs and to tell
    /// it where its log ends.
    Recover { epoch: Epoch },
    /// The replica's promise for `epoch`, and its durable log.
    RecoverReply { epoch: Epoch, history: EpochHistory, last: Position },
    /// A recovering leader fetches the entries from `from` on of the most advanced replica.
    Fetch { epoch: Epoch, from: Position },
    /// The source's entries from the fetch's `from` on; or, when its log no longer holds them,
    /// its state through some position at or past `from` (and no entries).
    FetchReply { epoch: Epoch, entries: Vec<Entry>, last: Position, snapshot: Option<Snapshot> },
    /// The leader's entries after `prev_position` (whose entry has `prev_epoch`; 0 and 0 for the
    /// start of the log), and how far it knows the log to be committed. With no entries it is a
    /// probe and a heartbeat. `round` is the leader's latest read round (see
    /// [`super::replica::Replica::read_index`]).
    Append { epoch: Epoch, prev_position: Position, prev_epoch: Epoch, entries: Vec<Entry>, commit: Position, round: u64 },
    /// The leader's state through `snapshot.position`, in place of entries its log no longer
    /// holds, with its commit position and read round (as an Append).
    Snapshot { epoch: Epoch, snapshot: Snapshot, commit: Position, round: u64 },
    /// `round`: the highest read round the follower has heard from its leader in this epoch.
    AppendReply { epoch: Epoch, outcome: AppendOutcome, round: u64 },
    /// The receiver has promised a higher epoch than the message's: its sender is deposed.
    Stale { promised: Epoch },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppendOutcome {
    /// The follower's log matches the leader's and is durable up to here.
    Durable(Position),
    /// The follower has no entry at `prev_position` with `prev_epoch`: here is its log, so the
    /// leader can find where they part.
    Diverged { history: EpochHistory, last: Position },
}

impl Message {
    /// The epoch the message was sent in (for `Stale`, the one its sender promised).
    pub fn epoch(&self) -> Epoch {
        match self {
            Message::Recover { epoch }
            | Message::RecoverReply { epoch, .. }
            | Message::Fetch { epoch, .. }
            | Message::FetchReply { epoch, .. }
            | Message::Append { epoch, .. }
            | Message::Snapshot { epoch, .. }
            | Message::AppendReply { epoch, .. } => *epoch,
            Message::Stale { promised } => *promised,
        }
    }
}
