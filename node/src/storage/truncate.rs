//! Truncating a partition's suffix: what a replica does when its newest events conflict with a
//! new leader's log (docs/replication.md). Only events that were never committed by the replica
//! set are ever truncated; the protocol core asserts it.
//!
//! The log is one sequence for all partitions, so a truncation leaves holes in it: sequences are
//! never reused (the highest one used is kept in `meta` as `seq_floor`), and the index drops the
//! removed events' entries. Both environments change, so the truncation is made crash-safe with
//! an intent:
//! 1. with the index writer held, sync the log and flush the whole index tail, so every event is
//!    in the index environment and the tail holds nothing;
//! 2. in one log transaction (synced): delete the events' records, drop the partition's epochs
//!    that started after the position, take back what the removed appends changed in domain
//!    state (from their undo records, `undo.rs`; for appends stored without one, a scope's state
//!    is forgotten and its kept events applied again, see [`Derived`] and `app/follow.rs`), and
//!    write the intent — the partition, the position kept, and the `(stream, version)` of every
//!    event removed;
//! 3. in one index transaction (synced): delete the partition's entries after the position and
//!    the listed stream entries; then clear the intent;
//! 4. reset the tail's run of the partition to continue right after the position.
//!
//! A crash after 2 leaves the intent; [`Store::open`] applies step 3 again (idempotent) before it
//! serves. A crash before 2 changed nothing.
//!
//! Readers: a concurrent read of the truncated partition may find an index entry whose record is
//! gone and report it as lost data; a replica serves reads of a partition only up to its commit
//! position, which truncation never touches.

use std::collections::BTreeMap;
use std::ops::Bound;

use heed::types::Bytes;
use heed::{Database, RwTxn};
use serde::{Deserialize, Serialize};

use super::record::{CorruptRecord, EventRecord};
use super::{StorageError, Store, be_u64, keys, meta_key, undo};

const INTENT: &str = "truncate_intent";

/// What events derive outside the log, in the log's own `state` database (a domain's state):
/// rebuilt, in the truncation's transaction, for every stream that loses events.
pub trait Derived {
    /// Whether `stream`'s events derive anything.
    fn derives(&self, stream: &str) -> bool;
    /// Forgets everything `stream`'s events derived.
    fn reset(&self, txn: &mut RwTxn<'_>, state: Database<Bytes, Bytes>, stream: &str) -> Result<(), StorageError>;
    /// Applies one kept event again; `group_first` is the position its append starts at.
    fn apply(&self, txn: &mut RwTxn<'_>, state: Database<Bytes, Bytes>, record: &EventRecord, group_first: u64)
    -> Result<(), StorageError>;
    /// The stream whose events derived the state row under `key` (a partition's image takes the
    /// rows of its streams, `image.rs`); `None` for a row of no stream.
    fn stream_of_key(&self, key: &[u8]) -> Option<String>;
}

/// Events that derive nothing.
pub struct NothingDerived;

impl Derived for NothingDerived {
    fn derives(&self, _: &str) -> bool {
        false
    }
    fn reset(&self, _: &mut RwTxn<'_>, _: Database<Bytes, Bytes>, _: &str) -> Result<(), StorageError> {
        Ok(())
    }
    fn apply(&self, _: &mut RwTxn<'_>, _: Database<Bytes, Bytes>, _: &EventRecord, _: u64) -> Result<(), StorageError> {
        Ok(())
    }
    fn stream_of_key(&self, _: &[u8]) -> Option<String> {
        None
    }
}

/// An event a truncation (or a trim) removes.
pub(super) struct Victim {
    pub seq: u64,
    pub position: u64,
    pub stream: String,
    pub version: u64,
    /// Not the last event of its append.
    pub continued: bool,
}

/// What a truncation (or a trim, `trim.rs`) removes from the index, kept in the log's `meta`
/// until it is done: the partition's entries after `after` (up to `through`, when given).
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Intent {
    pub partition: u32,
    pub after: u64,
    #[serde(default)]
    pub through: Option<u64>,
    /// `(stream, version)` of every event removed.
    pub streams: Vec<(String, u64)>,
}

impl Store {
    /// Removes every event of `partition` after position `after`; returns how many. The caller
    /// is the log's writer, holds no transaction, and has committed everything up to `last_seq`.
    pub(crate) fn truncate_partition(
        &self,
        partition: u32,
        after: u64,
        last_seq: u64,
        derived: &dyn Derived,
    ) -> Result<usize, StorageError> {
        // Only committed events are given up (`trim.rs`), and committed events are never
        // truncated: a truncation below the floor is a broken invariant, refused.
        let floor = self.partition_floor(partition);
        if after < floor {
            return Err(StorageError::State(format!(
                "partition {partition}: a truncation after position {after} reaches below the log's floor {floor}"
            )));
        }
        let _only_writer = self.index_writer.lock();
        self.sync_log()?;
        self.flush_index_locked(last_seq)?;
        let victims = self.events_in(partition, after, u64::MAX)?;
        let mut history = self.epoch_history(partition)?;
        let before = history.clone();
        history.truncate_after(after);
        if victims.is_empty() {
            // No events to remove, but the history may still name an epoch starting after `after`
            // (a marker never stored): it goes too, as the writer's copy does.
            if history != before {
                let mut txn = self.log.write()?;
                super::ReplicaMeta { meta: self.log_dbs.meta }.put_history(&mut txn, partition, &history)?;
                txn.commit()?;
                self.sync_log()?;
            }
            return Ok(0);
        }
        let intent = Intent { partition, after, through: None, streams: victims.iter().map(|v| (v.stream.clone(), v.version)).collect() };
        let mut txn = self.log.write()?;
        super::ReplicaMeta { meta: self.log_dbs.meta }.put_history(&mut txn, partition, &history)?;
        for victim in &victims {
            self.log_dbs.log.delete(&mut txn, &keys::log_key(victim.seq))?;
        }
        // What the removed appends derived goes: taken back through their undo records when
        // every one of them has its record (`undo.rs`), else by forgetting each stream's state and
        // applying its kept events again (appends stored before the journal existed).
        let mut journaled = true;
        for victim in victims.iter().filter(|v| !v.continued && derived.derives(&v.stream)) {
            journaled &= undo::has(&txn, self.log_dbs.undo, partition, victim.position)?;
        }
        if journaled {
            undo::undo_after(&mut txn, self.log_dbs.undo, self.log_dbs.state, partition, after)?;
        } else {
            tracing::warn!(partition, after, "truncating appends without undo records: applying the kept events of their streams again");
            // Each stream that loses events keeps its versions below the first one removed.
            let mut rebuilt: BTreeMap<&str, u64> = BTreeMap::new();
            for victim in victims.iter().filter(|v| derived.derives(&v.stream)) {
                let kept = rebuilt.entry(victim.stream.as_str()).or_insert(u64::MAX);
                *kept = (*kept).min(victim.version - 1);
            }
            for (stream, kept) in &rebuilt {
                derived.reset(&mut txn, self.log_dbs.state, stream)?;
                self.apply_stream(&mut txn, stream, *kept, derived)?;
            }
            undo::forget_after(&mut txn, self.log_dbs.undo, partition, after)?;
        }
        let floor = self.log_dbs.meta.get(&txn, &meta_key("seq_floor"))?.map(be_u64).unwrap_or(0).max(last_seq);
        self.log_dbs.meta.put(&mut txn, &meta_key("seq_floor"), &floor.to_be_bytes())?;
        self.put_intent(&mut txn, &intent)?;
        txn.commit()?;
        self.sync_log()?;
        self.apply_intent(&intent)?;
        let mut tail = self.tail.write();
        tail.restart_partition(partition, after + 1);
        tracing::info!(partition, after, events = victims.len(), "truncated a partition's suffix");
        Ok(victims.len())
    }

    /// Applies `stream`'s events up to `version` through `derived`, in order, from the index
    /// environment (which holds every event once the tail is flushed) and `txn`'s log.
    fn apply_stream(&self, txn: &mut RwTxn<'_>, stream: &str, version: u64, derived: &dyn Derived) -> Result<(), StorageError> {
        let index = self.index.read()?;
        let (start, end) = (keys::stream_key(stream, 1), keys::stream_key(stream, version));
        let mut group_first = None;
        for entry in self.index_dbs.streams.range(&index.txn, &(Bound::Included(start.as_slice()), Bound::Included(end.as_slice())))? {
            let seq = be_u64(entry?.1);
            let bytes =
                self.log_dbs.log.get(txn, &keys::log_key(seq))?.ok_or(CorruptRecord::at_seq(seq, "indexed event missing from the log"))?;
            let record = EventRecord::decode(seq, bytes)?;
            let first = *group_first.get_or_insert(record.position);
            derived.apply(txn, self.log_dbs.state, &record, first)?;
            if !record.atomic_with_next {
                group_first = None;
            }
        }
        Ok(())
    }

    pub(super) fn put_intent(&self, txn: &mut RwTxn<'_>, intent: &Intent) -> Result<(), StorageError> {
        let encoded = serde_json::to_vec(intent).map_err(|e| StorageError::State(format!("cannot encode a truncation: {e}")))?;
        self.log_dbs.meta.put(txn, &meta_key(INTENT), &encoded)?;
        Ok(())
    }

    /// The events of `partition` after `after` up to `through`, from the index environment
    /// (which holds every event once the tail is flushed).
    pub(super) fn events_in(&self, partition: u32, after: u64, through: u64) -> Result<Vec<Victim>, StorageError> {
        let index = self.index.read()?;
        let log = self.log.read()?;
        let (start, end) = (keys::event_key(partition, after + 1), keys::event_key(partition, through));
        let mut victims = Vec::new();
        for entry in self.index_dbs.partitions.range(&index.txn, &(Bound::Included(start.as_slice()), Bound::Included(end.as_slice())))? {
            let (_, value) = entry?;
            let seq = be_u64(value);
            let bytes = self
                .log_dbs
                .log
                .get(&log.txn, &keys::log_key(seq))?
                .ok_or(CorruptRecord::at_seq(seq, "indexed event missing from the log"))?;
            let record = EventRecord::decode(seq, bytes)?;
            victims.push(Victim {
                seq,
                position: record.position,
                stream: record.stream,
                version: record.stream_version,
                continued: record.atomic_with_next,
            });
        }
        Ok(victims)
    }

    /// Step 3 of the module doc: the index forgets the removed events; then the intent goes.
    pub(super) fn apply_intent(&self, intent: &Intent) -> Result<(), StorageError> {
        let mut txn = self.index.write()?;
        let through = intent.through.unwrap_or(u64::MAX);
        let (start, end) = (keys::event_key(intent.partition, intent.after + 1), keys::event_key(intent.partition, through));
        self.index_dbs.partitions.delete_range(&mut txn, &(Bound::Included(start.as_slice()), Bound::Included(end.as_slice())))?;
        for (stream, version) in &intent.streams {
            self.index_dbs.streams.delete(&mut txn, &keys::stream_key(stream, *version))?;
        }
        txn.commit()?;
        self.index.sync()?;
        let mut txn = self.log.write()?;
        self.log_dbs.meta.delete(&mut txn, &meta_key(INTENT))?;
        txn.commit()?;
        Ok(())
    }

    /// At open: finishes a truncation a crash interrupted after its log step.
    pub(super) fn finish_truncation(&self) -> Result<(), StorageError> {
        let stored = self.log_dbs.meta.get(&self.log.read()?.txn, &meta_key(INTENT))?.map(<[u8]>::to_vec);
        let Some(bytes) = stored else { return Ok(()) };
        let intent: Intent =
            serde_json::from_slice(&bytes).map_err(|e| StorageError::State(format!("undecodable truncation intent: {e}")))?;
        tracing::warn!(partition = intent.partition, after = intent.after, "finishing a truncation a crash interrupted");
        self.apply_intent(&intent)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::config::StorageConfig;
    use crate::storage::{ReadLimit, RecordRef};

    const ALL: ReadLimit = ReadLimit { max_events: usize::MAX, max_bytes: usize::MAX };

    fn cfg() -> StorageConfig {
        StorageConfig { partitions: 2, ..StorageConfig::default() }
    }

    /// Appends `(partition, stream)` events one transaction each, as the writer would; returns
    /// the last sequence.
    fn append(
        store: &Store,
        seq: &mut u64,
        heads: &mut [u64],
        versions: &mut std::collections::HashMap<String, u64>,
        events: &[(u32, &str)],
    ) {
        let mut txn = store.write().unwrap();
        let mut entries = Vec::new();
        for (partition, stream) in events {
            *seq += 1;
            heads[*partition as usize] += 1;
            let version = versions.entry(stream.to_string()).or_insert(0);
            *version += 1;
            let record = RecordRef {
                partition: *partition,
                position: heads[*partition as usize],
                stream,
                stream_version: *version,
                event_type: "E",
                payload: b"x",
                metadata: &[],
                append_time_us: 0,
                epoch: 1,
                atomic_with_next: false,
            };
            txn.append(*seq, &record).unwrap();
            entries.push((*partition, record.position, *stream, *version, *seq));
        }
        txn.commit().unwrap();
        store.extend_tail(entries);
    }

    #[test]
    fn given_a_partition_suffix_when_truncated_then_reads_versions_and_new_appends_continue_from_the_kept_position_also_after_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let (mut seq, mut heads, mut versions) = (0, vec![0u64; 2], std::collections::HashMap::new());
        {
            let store = Store::open(dir.path(), &cfg()).unwrap();
            append(&store, &mut seq, &mut heads, &mut versions, &[(0, "a"), (1, "b"), (0, "a"), (0, "c")]);
            store.flush_index(seq).unwrap(); // some in the index...
            append(&store, &mut seq, &mut heads, &mut versions, &[(0, "a"), (1, "b"), (0, "c")]); // ...some in the tail
            // Partition 0 holds a@1 a@2 c@1 a@3 c@2 at positions 1..=5; keep 1..=2.
            assert_eq!(store.truncate_partition(0, 2, seq, &NothingDerived).unwrap(), 3);
            let kept = store.read_partition(0, 1, u64::MAX, ALL).unwrap().events;
            assert_eq!(
                kept.iter().map(|e| (e.position, e.stream.as_str(), e.stream_version)).collect::<Vec<_>>(),
                [(1, "a", 1), (2, "a", 2)]
            );
            assert_eq!(store.stream_version("a").unwrap(), 2);
            assert_eq!(store.stream_version("c").unwrap(), 0, "every event of c was after the kept position");
            assert_eq!(store.read_partition(1, 1, u64::MAX, ALL).unwrap().events.len(), 2, "other partitions are untouched");
            assert_eq!(store.partition_heads(), [2, 2]);
            // New events continue at position 3 with new sequences.
            heads[0] = 2;
            versions.insert("a".into(), 2);
            versions.insert("c".into(), 0);
            append(&store, &mut seq, &mut heads, &mut versions, &[(0, "c")]);
            let read = store.read_partition(0, 3, u64::MAX, ALL).unwrap().events;
            assert_eq!(read.iter().map(|e| (e.position, e.stream.as_str())).collect::<Vec<_>>(), [(3, "c")]);
        }
        let store = Arc::new(Store::open(dir.path(), &cfg()).unwrap());
        assert_eq!(store.partition_heads(), [3, 2]);
        assert_eq!(store.last_seq_at_open(), seq, "sequences are not reused");
        let events = store.read_partition(0, 1, u64::MAX, ALL).unwrap().events;
        assert_eq!(
            events.iter().map(|e| (e.position, e.stream.as_str(), e.stream_version)).collect::<Vec<_>>(),
            [(1, "a", 1), (2, "a", 2), (3, "c", 1)]
        );
        assert_eq!(store.read_stream("c", 1, u64::MAX, ALL).unwrap().events.len(), 1);
    }

    #[test]
    fn given_the_last_events_truncated_when_reopened_then_their_sequences_stay_used() {
        let dir = tempfile::tempdir().unwrap();
        let (mut seq, mut heads, mut versions) = (0, vec![0u64; 2], std::collections::HashMap::new());
        {
            let store = Store::open(dir.path(), &cfg()).unwrap();
            append(&store, &mut seq, &mut heads, &mut versions, &[(1, "b"), (0, "a"), (0, "a")]);
            assert_eq!(store.truncate_partition(0, 0, seq, &NothingDerived).unwrap(), 2);
        }
        let store = Store::open(dir.path(), &cfg()).unwrap();
        assert_eq!(store.last_seq_at_open(), 3);
        assert_eq!(store.partition_heads(), [0, 1]);
        assert_eq!(store.stream_version("a").unwrap(), 0);
    }

    #[test]
    fn given_a_crash_after_the_log_step_when_reopened_then_the_index_is_finished() {
        let dir = tempfile::tempdir().unwrap();
        let (mut seq, mut heads, mut versions) = (0, vec![0u64; 2], std::collections::HashMap::new());
        {
            let store = Store::open(dir.path(), &cfg()).unwrap();
            append(&store, &mut seq, &mut heads, &mut versions, &[(0, "a"), (0, "a"), (0, "a")]);
            store.flush_index(seq).unwrap();
            // Steps 1 and 2 only: the records go and the intent stays, as if the process died.
            let intent = Intent { partition: 0, after: 1, through: None, streams: vec![("a".into(), 2), ("a".into(), 3)] };
            let mut txn = store.log.write().unwrap();
            for s in 2..=3u64 {
                store.log_dbs.log.delete(&mut txn, &keys::log_key(s)).unwrap();
            }
            store.log_dbs.meta.put(&mut txn, &meta_key("seq_floor"), &seq.to_be_bytes()).unwrap();
            store.log_dbs.meta.put(&mut txn, &meta_key(INTENT), &serde_json::to_vec(&intent).unwrap()).unwrap();
            txn.commit().unwrap();
        }
        let store = Store::open(dir.path(), &cfg()).unwrap();
        assert_eq!(store.partition_heads(), [1, 0]);
        assert_eq!(store.stream_version("a").unwrap(), 1);
        assert_eq!(store.read_stream("a", 1, u64::MAX, ALL).unwrap().events.len(), 1);
        assert!(store.log_dbs.meta.get(&store.log.read().unwrap().txn, &meta_key(INTENT)).unwrap().is_none(), "the intent is cleared");
    }
}
