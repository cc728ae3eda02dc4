//! The first pieces of the replica's LMDB shell: how a partition's stored events are the
//! protocol's entries, and how a leader's epoch marker is stored.
//!
//! An entry's data is the event's stored record (record format 3: partition, position, stream,
//! version, type, payload, metadata, time, epoch), so a follower stores exactly what the leader
//! stored ([`crate::log::Log::replicate`]). A new leader's marker is an event too, of the system
//! stream `$epochs-{partition}` placed in its partition, so it has a position like any event;
//! streams whose names start with `$` are the system's, and clients cannot append to them.

use super::replica::ReplicaLog;
use super::{Entry, EntryKind, Epoch, Position};
use crate::log::Log;
use crate::storage::{EventRecord, ReadLimit};

/// About the most bytes one read for replication returns: it always returns whole appends, so
/// the first append whatever its size (bounded by `limits.max_request_bytes` and the record
/// overhead, within the Cluster API's message bound, `coordination/transport.rs`).
pub const MAX_READ_BYTES: usize = 4 << 20;

pub use crate::log::partitioning::marker_stream;

/// A new leader's marker, as the event it is stored as.
pub fn marker_record(partition: u32, position: Position, epoch: Epoch, stream_version: u64, now_us: u64) -> EventRecord {
    EventRecord {
        partition,
        position,
        stream: marker_stream(partition),
        stream_version,
        event_type: "$LeaderElected".into(),
        payload: format!("{{\"epoch\":{epoch}}}").into_bytes(),
        metadata: Vec::new(),
        append_time_us: now_us,
        epoch,
        atomic_with_next: false,
    }
}

/// A stored event as the protocol's entry.
pub fn entry_of(record: &EventRecord) -> Entry {
    let mut bytes = Vec::new();
    record.as_ref().encode_into(&mut bytes);
    Entry { position: record.position, epoch: record.epoch, kind: EntryKind::Data(bytes), atomic_with_next: record.atomic_with_next }
}

/// A received entry as the event to store. Markers travel as the leader stored them (data), so a
/// bare [`EntryKind::Marker`] never arrives here.
pub fn record_of(entry: &Entry) -> Result<EventRecord, String> {
    match &entry.kind {
        EntryKind::Data(bytes) => {
            let record = EventRecord::decode(0, bytes).map_err(|e| format!("entry at position {}: {e}", entry.position))?;
            if (record.position, record.epoch, record.atomic_with_next) != (entry.position, entry.epoch, entry.atomic_with_next) {
                return Err(format!(
                    "entry at position {} epoch {} (continued: {}) holds an event of position {} epoch {} (continued: {})",
                    entry.position, entry.epoch, entry.atomic_with_next, record.position, record.epoch, record.atomic_with_next
                ));
            }
            Ok(record)
        }
        EntryKind::Marker => {
            Err(format!("entry at position {} is a bare marker; the leader's shell stores markers as events", entry.position))
        }
    }
}

/// One partition of a [`Log`], read as the protocol's entries (durable events only).
pub struct LogView<'a> {
    pub log: &'a Log,
    pub partition: u32,
}

impl ReplicaLog for LogView<'_> {
    /// Stops at the byte bound only where an append ends: a read that the bound cut inside an
    /// append goes on until that append is whole and no further (or until `max`; the replica
    /// core trims), so a batch is at most the bound plus one append.
    fn entries(&self, from: Position, max: usize) -> Vec<Entry> {
        let mut entries: Vec<Entry> = Vec::new();
        loop {
            let next = from + entries.len() as Position;
            let limit = ReadLimit { max_events: max - entries.len(), max_bytes: MAX_READ_BYTES };
            let continuing = !entries.is_empty();
            match self.log.read_partition_durable(self.partition, next, limit) {
                Ok(slice) => {
                    let read = slice.events.iter().map(entry_of);
                    if continuing {
                        // Only the rest of the append the first read cut.
                        let mut ended = false;
                        entries.extend(read.take_while(|e| {
                            let take = !ended;
                            ended = !e.atomic_with_next;
                            take
                        }));
                    } else {
                        entries.extend(read);
                    }
                }
                Err(e) => {
                    // The replica resends on its next tick; a lasting failure shows in the reads too.
                    tracing::error!(partition = self.partition, from, error = %e, "cannot read entries to replicate");
                    return Vec::new();
                }
            }
            let cut_inside = entries.last().is_some_and(|e| e.atomic_with_next && e.position >= next);
            if !cut_inside || entries.len() >= max {
                return entries;
            }
        }
    }

    fn floor(&self) -> Position {
        self.log.store().partition_floor(self.partition)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::config::{AppConfig, GroupCommitConfig, LimitsConfig, StorageConfig};
    use crate::log::{AppendRequest, ExpectedVersion, NewEvent};
    use crate::metrics::Metrics;
    use crate::storage::Store;

    #[test]
    fn given_stored_events_then_the_view_gives_entries_that_decode_back_to_the_same_events() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path(), &StorageConfig { partitions: 2, ..StorageConfig::default() }).unwrap());
        let log =
            Log::start(store, &GroupCommitConfig::default(), &LimitsConfig::default(), &AppConfig::default(), Arc::new(Metrics::default()))
                .unwrap();
        let events =
            (0..3).map(|i| NewEvent { event_type: "E".into(), payload: vec![i], metadata: vec![("k".into(), "v".into())] }).collect();
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(log.append(AppendRequest { stream: "s".into(), expected: ExpectedVersion::Any, events })).unwrap();
        let p = log.partition_of("s");
        let view = LogView { log: &log, partition: p };
        let entries = view.entries(2, 10);
        assert_eq!(entries.iter().map(|e| e.position).collect::<Vec<_>>(), [2, 3]);
        let stored = log.read_partition(p, 2, ReadLimit { max_events: 10, max_bytes: usize::MAX }).unwrap().events;
        let decoded: Vec<EventRecord> = entries.iter().map(|e| record_of(e).unwrap()).collect();
        assert_eq!(decoded, stored);
        assert_eq!(view.entries(2, 1).len(), 1, "at most `max`");
        assert!(view.entries(9, 10).is_empty(), "nothing past the head");
    }

    #[test]
    fn given_an_append_larger_than_the_read_bound_then_the_view_returns_it_whole() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path(), &StorageConfig { partitions: 2, ..StorageConfig::default() }).unwrap());
        let log =
            Log::start(store, &GroupCommitConfig::default(), &LimitsConfig::default(), &AppConfig::default(), Arc::new(Metrics::default()))
                .unwrap();
        let big = |n: usize| (0..n).map(|_| NewEvent { event_type: "E".into(), payload: vec![7; 1 << 20], metadata: vec![] }).collect();
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        // 6 MiB in one append, then 1 MiB in another: the bound (4 MiB) falls inside the first.
        rt.block_on(log.append(AppendRequest { stream: "s".into(), expected: ExpectedVersion::Any, events: big(6) })).unwrap();
        rt.block_on(log.append(AppendRequest { stream: "s".into(), expected: ExpectedVersion::Any, events: big(1) })).unwrap();
        let view = LogView { log: &log, partition: log.partition_of("s") };
        let entries = view.entries(1, 100);
        assert_eq!(entries.len(), 6, "the first append whole, and nothing past the bound after it");
        assert!(!entries[5].atomic_with_next && entries[..5].iter().all(|e| e.atomic_with_next));
        // Appends of 5 MiB one after the other, each cut by the bound: the read past the bound
        // finishes the append it cut and stops there, so a batch stays within the bound plus
        // one append (it used to read a whole bound more, cut the next append, and go on).
        for _ in 0..4 {
            rt.block_on(log.append(AppendRequest { stream: "s".into(), expected: ExpectedVersion::Any, events: big(5) })).unwrap();
        }
        let entries = view.entries(8, 100);
        assert_eq!(entries.len(), 5, "the first 5 MiB append, no more");
        assert!(!entries[4].atomic_with_next);
    }

    #[test]
    fn a_marker_is_an_event_of_its_partitions_system_stream_and_a_bare_marker_is_refused() {
        let marker = marker_record(3, 7, 4, 2, 100);
        assert_eq!((marker.stream.as_str(), marker.epoch, marker.position), ("$epochs-3", 4, 7));
        assert_eq!(record_of(&entry_of(&marker)).unwrap(), marker);
        assert!(record_of(&Entry { position: 7, epoch: 4, kind: EntryKind::Marker, atomic_with_next: false }).is_err());
        let mismatched = Entry { position: 8, ..entry_of(&marker) };
        assert!(record_of(&mismatched).is_err());
    }
}
