//! The replication protocol's messages on the wire (`proto/anthill/v1/cluster.proto`), both
//! ways. What arrives from the network is checked: a malformed message is an error, never a
//! panic (an epoch history must strictly increase, entries must name their kind).

use anthill_proto::v1 as pb;
use pb::replica_message::Kind;

use super::message::{AppendOutcome, Message};
use super::{Entry, EntryKind, EpochHistory, Snapshot};

fn history_out(h: &EpochHistory) -> Vec<pb::EpochStart> {
    h.starts().iter().map(|&(epoch, position)| pb::EpochStart { epoch, position }).collect()
}

fn history_in(starts: Vec<pb::EpochStart>) -> Result<EpochHistory, String> {
    EpochHistory::try_from_starts(starts.into_iter().map(|s| (s.epoch, s.position)).collect())
}

fn entries_out(entries: Vec<Entry>) -> Vec<pb::ReplicaEntry> {
    entries
        .into_iter()
        .map(|e| match e.kind {
            EntryKind::Data(data) => {
                pb::ReplicaEntry { position: e.position, epoch: e.epoch, data, marker: false, atomic_with_next: e.atomic_with_next }
            }
            EntryKind::Marker => pb::ReplicaEntry {
                position: e.position,
                epoch: e.epoch,
                data: Vec::new(),
                marker: true,
                atomic_with_next: e.atomic_with_next,
            },
        })
        .collect()
}

fn entries_in(entries: Vec<pb::ReplicaEntry>) -> Vec<Entry> {
    entries
        .into_iter()
        .map(|e| Entry {
            position: e.position,
            epoch: e.epoch,
            kind: if e.marker { EntryKind::Marker } else { EntryKind::Data(e.data) },
            atomic_with_next: e.atomic_with_next,
        })
        .collect()
}

fn snapshot_out(s: Snapshot) -> pb::SnapshotData {
    pb::SnapshotData { position: s.position, history: history_out(&s.history), data: s.data }
}

fn snapshot_in(s: pb::SnapshotData) -> Result<Snapshot, String> {
    Ok(Snapshot { position: s.position, history: history_in(s.history)?, data: s.data })
}

pub fn to_wire(message: Message) -> pb::ReplicaMessage {
    let kind = match message {
        Message::Recover { epoch } => Kind::Recover(pb::ReplicaRecover { epoch }),
        Message::RecoverReply { epoch, history, last } => {
            Kind::RecoverReply(pb::ReplicaRecoverReply { epoch, history: history_out(&history), last })
        }
        Message::Fetch { epoch, from } => Kind::Fetch(pb::ReplicaFetch { epoch, from }),
        Message::FetchReply { epoch, entries, last, snapshot } => {
            Kind::FetchReply(pb::ReplicaFetchReply { epoch, entries: entries_out(entries), last, snapshot: snapshot.map(snapshot_out) })
        }
        Message::Snapshot { epoch, snapshot, commit, round } => {
            Kind::Snapshot(pb::ReplicaSnapshot { epoch, snapshot: Some(snapshot_out(snapshot)), commit, round })
        }
        Message::Append { epoch, prev_position, prev_epoch, entries, commit, round } => {
            Kind::Append(pb::ReplicaAppend { epoch, prev_position, prev_epoch, entries: entries_out(entries), commit, round })
        }
        Message::AppendReply { epoch, outcome, round } => Kind::AppendReply(pb::ReplicaAppendReply {
            epoch,
            round,
            outcome: Some(match outcome {
                AppendOutcome::Durable(position) => pb::replica_append_reply::Outcome::Durable(position),
                AppendOutcome::Diverged { history, last } => {
                    pb::replica_append_reply::Outcome::Diverged(pb::ReplicaDiverged { history: history_out(&history), last })
                }
            }),
        }),
        Message::Stale { promised } => Kind::Stale(pb::ReplicaStale { promised }),
    };
    pb::ReplicaMessage { kind: Some(kind) }
}

pub fn from_wire(message: pb::ReplicaMessage) -> Result<Message, String> {
    Ok(match message.kind.ok_or("a replication message without a kind")? {
        Kind::Recover(m) => Message::Recover { epoch: m.epoch },
        Kind::RecoverReply(m) => Message::RecoverReply { epoch: m.epoch, history: history_in(m.history)?, last: m.last },
        Kind::Fetch(m) => Message::Fetch { epoch: m.epoch, from: m.from },
        Kind::FetchReply(m) => Message::FetchReply {
            epoch: m.epoch,
            entries: entries_in(m.entries),
            last: m.last,
            snapshot: m.snapshot.map(snapshot_in).transpose()?,
        },
        Kind::Snapshot(m) => Message::Snapshot {
            epoch: m.epoch,
            snapshot: snapshot_in(m.snapshot.ok_or("a snapshot message without its snapshot")?)?,
            commit: m.commit,
            round: m.round,
        },
        Kind::Append(m) => Message::Append {
            epoch: m.epoch,
            prev_position: m.prev_position,
            prev_epoch: m.prev_epoch,
            entries: entries_in(m.entries),
            commit: m.commit,
            round: m.round,
        },
        Kind::AppendReply(m) => Message::AppendReply {
            epoch: m.epoch,
            outcome: match m.outcome.ok_or("an append reply without an outcome")? {
                pb::replica_append_reply::Outcome::Durable(position) => AppendOutcome::Durable(position),
                pb::replica_append_reply::Outcome::Diverged(d) => AppendOutcome::Diverged { history: history_in(d.history)?, last: d.last },
            },
            round: m.round,
        },
        Kind::Stale(m) => Message::Stale { promised: m.promised },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn history(starts: &[(u64, u64)]) -> EpochHistory {
        EpochHistory::from_starts(starts.to_vec())
    }

    #[test]
    fn every_message_survives_the_wire() {
        let entries = vec![
            Entry { position: 4, epoch: 2, kind: EntryKind::Data(vec![1, 2, 3]), atomic_with_next: true },
            Entry { position: 5, epoch: 2, kind: EntryKind::Marker, atomic_with_next: false },
        ];
        let messages = vec![
            Message::Recover { epoch: 3 },
            Message::RecoverReply { epoch: 3, history: history(&[(1, 1), (2, 4)]), last: 9 },
            Message::Fetch { epoch: 3, from: 5 },
            Message::FetchReply { epoch: 3, entries: entries.clone(), last: 9, snapshot: None },
            Message::FetchReply {
                epoch: 3,
                entries: Vec::new(),
                last: 9,
                snapshot: Some(Snapshot { position: 7, history: history(&[(1, 1), (2, 4)]), data: b"state".to_vec() }),
            },
            Message::Snapshot {
                epoch: 3,
                snapshot: Snapshot { position: 7, history: history(&[(2, 1)]), data: vec![0, 1] },
                commit: 5,
                round: 4,
            },
            Message::Append { epoch: 3, prev_position: 3, prev_epoch: 1, entries, commit: 2, round: 9 },
            Message::AppendReply { epoch: 3, outcome: AppendOutcome::Durable(7), round: 9 },
            Message::AppendReply { epoch: 3, outcome: AppendOutcome::Diverged { history: history(&[(1, 1)]), last: 2 }, round: 8 },
            Message::Stale { promised: 8 },
        ];
        for message in messages {
            assert_eq!(from_wire(to_wire(message.clone())).unwrap(), message);
        }
    }

    #[test]
    fn malformed_messages_are_errors_not_panics() {
        assert!(from_wire(pb::ReplicaMessage { kind: None }).is_err());
        let bad_history = vec![pb::EpochStart { epoch: 3, position: 5 }, pb::EpochStart { epoch: 2, position: 9 }];
        let reply = pb::ReplicaRecoverReply { epoch: 3, history: bad_history, last: 9 };
        assert!(from_wire(pb::ReplicaMessage { kind: Some(Kind::RecoverReply(reply)) }).is_err());
        let no_outcome = pb::ReplicaAppendReply { epoch: 1, outcome: None, round: 0 };
        assert!(from_wire(pb::ReplicaMessage { kind: Some(Kind::AppendReply(no_outcome)) }).is_err());
    }
}
