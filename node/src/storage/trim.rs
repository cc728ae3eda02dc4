//! Giving up a partition's oldest events (retention): the log's *floor*.
//!
//! A partition's floor is the last position whose event its log no longer holds; the domain state
//! those events made stays (state is never trimmed). Reads start after it, and a stream whose
//! oldest events went starts after its own floor, its last version given up. Both floors live in
//! the log's `meta`: `("floor", partition)` and `("stream_floor", stream)`. Only the log's writer
//! trims, alone between group commits, and only events it knows committed, whole appends at a
//! time (docs/storage.md, "Retention"; a replica that then needs them gets a snapshot,
//! docs/replication.md, "State transfer").
//!
//! Crash-safe the way a truncation is (`truncate.rs`): with the index writer held, the log is
//! synced and the whole index tail flushed; one synced log transaction deletes the records,
//! raises the floors and writes the intent naming the index entries to delete; the index
//! transaction then deletes them and clears the intent. A crash between the two finishes the
//! index step at the next open.

use std::collections::BTreeMap;

use heed::RwTxn;

use super::keys::{Elem, pack};
use super::truncate::Intent;
use super::{StorageError, Store, be_u64, keys, meta_key, undo};

fn floor_key(partition: u32) -> Vec<u8> {
    pack(&[Elem::Str("floor"), Elem::U64(partition.into())])
}

fn stream_floor_key(stream: &str) -> Vec<u8> {
    pack(&[Elem::Str("stream_floor"), Elem::Str(stream)])
}

impl Store {
    /// The last position of `partition` whose event the log no longer holds (0: it holds all).
    pub fn partition_floor(&self, partition: u32) -> u64 {
        self.floors[partition as usize].load(std::sync::atomic::Ordering::Acquire)
    }

    /// Every partition's floor, as stored (at open).
    pub(super) fn load_floors(&self) -> Result<Vec<u64>, StorageError> {
        let snapshot = self.log.read()?;
        (0..self.partition_count).map(|p| Ok(self.log_dbs.meta.get(&snapshot.txn, &floor_key(p))?.map(be_u64).unwrap_or(0))).collect()
    }

    /// The last version of `stream` the log no longer holds (0: it holds all its events).
    pub fn stream_floor(&self, stream: &str) -> Result<u64, StorageError> {
        let snapshot = self.log.read()?;
        Ok(self.log_dbs.meta.get(&snapshot.txn, &stream_floor_key(stream))?.map(be_u64).unwrap_or(0))
    }

    /// Gives up `partition`'s events after its floor up to `through`, which must end an append
    /// the caller (the log's writer, holding no transaction, everything up to `last_seq`
    /// committed) knows committed; returns how many went.
    pub(crate) fn trim_partition(&self, partition: u32, through: u64, last_seq: u64) -> Result<usize, StorageError> {
        let floor = self.partition_floor(partition);
        if through <= floor {
            return Ok(0);
        }
        let _only_writer = self.index_writer.lock();
        self.sync_log()?;
        self.flush_index_locked(last_seq)?;
        let victims = self.events_in(partition, floor, through)?;
        match victims.last() {
            Some(last) if last.position == through && !last.continued => {}
            _ => {
                return Err(StorageError::State(format!(
                    "partition {partition}: cannot trim through position {through}: no append of the log ends there"
                )));
            }
        }
        // Each stream's floor rises to its last version given up.
        let mut stream_floors: BTreeMap<&str, u64> = BTreeMap::new();
        for victim in &victims {
            let floor = stream_floors.entry(victim.stream.as_str()).or_insert(0);
            *floor = (*floor).max(victim.version);
        }
        let intent = Intent {
            partition,
            after: floor,
            through: Some(through),
            streams: victims.iter().map(|v| (v.stream.clone(), v.version)).collect(),
        };
        let mut txn = self.log.write()?;
        for victim in &victims {
            self.log_dbs.log.delete(&mut txn, &keys::log_key(victim.seq))?;
        }
        for (stream, version) in &stream_floors {
            self.put_stream_floor(&mut txn, stream, *version)?;
        }
        self.put_partition_floor(&mut txn, partition, through)?;
        // Sequences are never reused, also when the log's last records went.
        let seq_floor = self.log_dbs.meta.get(&txn, &meta_key("seq_floor"))?.map(be_u64).unwrap_or(0).max(last_seq);
        self.log_dbs.meta.put(&mut txn, &meta_key("seq_floor"), &seq_floor.to_be_bytes())?;
        // Committed appends are never undone.
        undo::prune(&mut txn, self.log_dbs.undo, partition, through)?;
        self.put_intent(&mut txn, &intent)?;
        txn.commit()?;
        self.sync_log()?;
        self.floors[partition as usize].store(through, std::sync::atomic::Ordering::Release);
        self.apply_intent(&intent)?;
        tracing::info!(partition, through, events = victims.len(), "gave up a partition's oldest events");
        Ok(victims.len())
    }

    pub(super) fn put_partition_floor(&self, txn: &mut RwTxn<'_>, partition: u32, floor: u64) -> Result<(), StorageError> {
        self.log_dbs.meta.put(txn, &floor_key(partition), &floor.to_be_bytes())?;
        Ok(())
    }

    /// Raises `stream`'s floor to `version` (never lowers it).
    pub(super) fn put_stream_floor(&self, txn: &mut RwTxn<'_>, stream: &str, version: u64) -> Result<(), StorageError> {
        let key = stream_floor_key(stream);
        let current = self.log_dbs.meta.get(txn, &key)?.map(be_u64).unwrap_or(0);
        if version > current {
            self.log_dbs.meta.put(txn, &key, &version.to_be_bytes())?;
        }
        Ok(())
    }
}
