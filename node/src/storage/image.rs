//! A partition's image: what a replica sends another that needs entries its log gave up (the
//! snapshot's data, docs/replication.md "State transfer"), and how a replica installs one.
//!
//! Made by the log's writer, alone between group commits, once everything committed is durable,
//! so it is exactly the partition as of its head `S`:
//! - the domain state rows of the partition's streams (found by [`Derived::stream_of_key`]) and
//!   the undo records of its appends after `C`, the commit the sender knows;
//! - the events after `C` up to `S` (few: what is not yet known committed), so the receiver's log
//!   holds them and its floor is `C`. Every floor then stays at or below a commit, and no
//!   truncation reaches below one;
//! - each of the partition's streams with its version at `C`, the receiver's stream floors;
//! - the epoch history up to `S`.
//!
//! Installing replaces all of that partition's in one log transaction, crash-safe like a
//! truncation (`truncate.rs`: the index entries of the events replaced go by an intent).
//!
//! Cost: making one scans the whole state database and every stream of the index (the state and
//! streams of other partitions are skipped, not read twice); the writer holds writes for that
//! long. Fine for the states of today's tests; a large store will want it made from a read
//! snapshot off the writer thread, and sent in chunks (the Cluster API bounds one message).

use std::collections::BTreeMap;
use std::ops::Bound;

use heed::{RoTxn, WithoutTls};

use super::keys::{self, Elem, pack};
use super::record::EventRecord;
use super::truncate::{Derived, Intent};
use super::undo::key as undo_key;
use super::{ReadLimit, StorageError, Store, be_u64, meta_key};
use crate::log::partitioning::home_partition;

/// A partition as of one position, to install on another replica (module doc).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PartitionImage {
    pub partition: u32,
    /// `S`: the last position the image stands for.
    pub position: u64,
    /// `C`: the commit its maker knew; the receiver's floor.
    pub floor: u64,
    pub history: Vec<(u64, u64)>,
    /// The events after `floor` up to `position`.
    pub records: Vec<EventRecord>,
    /// Each stream of the partition, with its version at `floor` (0s left out).
    pub stream_floors: Vec<(String, u64)>,
    pub state: Vec<Row>,
    /// Undo records of appends ending after `floor`: (their last position, the record).
    pub undo: Vec<(u64, Vec<u8>)>,
}

const MAGIC: &[u8; 8] = b"anthimg1";

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u64).to_be_bytes());
    out.extend_from_slice(bytes);
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err(format!("a partition image cut short ({} bytes missing)", n - self.0.len()));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let n = self.u64()?;
        let n = usize::try_from(n).map_err(|_| "a partition image with an impossible length".to_string())?;
        self.take(n)
    }
    fn count(&mut self) -> Result<usize, String> {
        let n = self.u64()?;
        // Every item takes at least 8 bytes: a count past that is a damaged image, not an
        // allocation to attempt.
        if n > (self.0.len() / 8) as u64 + 1 {
            return Err(format!("a partition image claims {n} items in {} bytes", self.0.len()));
        }
        Ok(n as usize)
    }
}

impl PartitionImage {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        for n in [u64::from(self.partition), self.position, self.floor] {
            out.extend_from_slice(&n.to_be_bytes());
        }
        out.extend_from_slice(&(self.history.len() as u64).to_be_bytes());
        for (epoch, start) in &self.history {
            out.extend_from_slice(&epoch.to_be_bytes());
            out.extend_from_slice(&start.to_be_bytes());
        }
        out.extend_from_slice(&(self.records.len() as u64).to_be_bytes());
        let mut buf = Vec::new();
        for record in &self.records {
            record.as_ref().encode_into(&mut buf);
            put_bytes(&mut out, &buf);
        }
        out.extend_from_slice(&(self.stream_floors.len() as u64).to_be_bytes());
        for (stream, version) in &self.stream_floors {
            put_bytes(&mut out, stream.as_bytes());
            out.extend_from_slice(&version.to_be_bytes());
        }
        out.extend_from_slice(&(self.state.len() as u64).to_be_bytes());
        for (key, value) in &self.state {
            put_bytes(&mut out, key);
            put_bytes(&mut out, value);
        }
        out.extend_from_slice(&(self.undo.len() as u64).to_be_bytes());
        for (position, record) in &self.undo {
            out.extend_from_slice(&position.to_be_bytes());
            put_bytes(&mut out, record);
        }
        out
    }

    /// Reads an image, checking it is whole and that its events continue each other.
    pub fn decode(bytes: &[u8]) -> Result<PartitionImage, String> {
        let mut r = Reader(bytes);
        if r.take(8)? != MAGIC {
            return Err("not a partition image (or one of another format)".into());
        }
        let partition = u32::try_from(r.u64()?).map_err(|_| "a partition image of an impossible partition".to_string())?;
        let (position, floor) = (r.u64()?, r.u64()?);
        let mut image = PartitionImage { partition, position, floor, ..PartitionImage::default() };
        for _ in 0..r.count()? {
            image.history.push((r.u64()?, r.u64()?));
        }
        for _ in 0..r.count()? {
            let record = EventRecord::decode(0, r.bytes()?).map_err(|e| format!("an event of a partition image: {e}"))?;
            image.records.push(record);
        }
        for _ in 0..r.count()? {
            let stream = String::from_utf8(r.bytes()?.to_vec()).map_err(|_| "a stream name that is not UTF-8".to_string())?;
            image.stream_floors.push((stream, r.u64()?));
        }
        for _ in 0..r.count()? {
            let key = r.bytes()?.to_vec();
            image.state.push((key, r.bytes()?.to_vec()));
        }
        for _ in 0..r.count()? {
            let position = r.u64()?;
            image.undo.push((position, r.bytes()?.to_vec()));
        }
        if !r.0.is_empty() {
            return Err(format!("{} bytes after the end of a partition image", r.0.len()));
        }
        if floor > position {
            return Err(format!("a partition image whose floor {floor} is past its position {position}"));
        }
        // Compared one by one: a claimed position far past the floor must not make the range
        // (fuzzing found an image claiming 2^59 events).
        let dense = image.records.len() as u64 == position - floor
            && image.records.iter().zip(floor..).all(|(r, before)| r.position == before + 1 && r.partition == partition);
        if !dense {
            return Err(format!(
                "a partition image's events do not run from {} to {position} in partition {partition}",
                floor.saturating_add(1)
            ));
        }
        if image.records.last().is_some_and(|r| r.atomic_with_next) {
            return Err("a partition image ends inside an append".into());
        }
        Ok(image)
    }
}

/// A state row: key and value.
type Row = (Vec<u8>, Vec<u8>);

/// An event's index entries for the tail: partition, position, stream, version, sequence.
pub(crate) type TailEntry = (u32, u64, String, u64, u64);

fn stream_floor_prefix() -> Vec<u8> {
    pack(&[Elem::Str("stream_floor")])
}

impl Store {
    /// Every stream of `partition` with its current version, from the index environment (which
    /// must hold every event: the tail flushed) and the stream floors.
    fn partition_streams(&self, partition: u32, meta: &RoTxn<'_, WithoutTls>) -> Result<BTreeMap<String, u64>, StorageError> {
        let mut streams = BTreeMap::new();
        let index = self.index.read()?;
        // One seek per stream: from each stream's first key to the next stream.
        let mut from: Option<Vec<u8>> = None;
        loop {
            let range = (from.as_deref().map_or(Bound::Unbounded, Bound::Included), Bound::Unbounded);
            let Some(entry) = self.index_dbs.streams.range(&index.txn, &range)?.next() else { break };
            let (key, _) = entry?;
            let stream = match keys::unpack(key).as_deref() {
                Ok([keys::Value::Str(stream), keys::Value::U64(_)]) => stream.clone(),
                _ => return Err(super::CorruptRecord::at_seq(0, "undecodable stream index key").into()),
            };
            let prefix = keys::stream_prefix(&stream);
            from = Some([prefix.as_slice(), &[0xFF]].concat());
            if home_partition(&stream, self.partition_count) == partition {
                let version = super::index_stream_version(&index.txn, self.index_dbs, &stream)?;
                streams.insert(stream, version);
            }
        }
        let prefix = stream_floor_prefix();
        for entry in self.log_dbs.meta.prefix_iter(meta, &prefix)? {
            let (key, value) = entry?;
            if let Ok([_, keys::Value::Str(stream)]) = keys::unpack(key).as_deref()
                && home_partition(stream, self.partition_count) == partition
            {
                let version = streams.entry(stream.clone()).or_insert(0);
                *version = (*version).max(be_u64(value));
            }
        }
        Ok(streams)
    }

    /// The keys of the state rows of `partition`'s streams.
    fn partition_state_keys(&self, txn: &RoTxn<'_, WithoutTls>, partition: u32, derived: &dyn Derived) -> Result<Vec<Row>, StorageError> {
        let mut rows = Vec::new();
        for entry in self.log_dbs.state.iter(txn)? {
            let (key, value) = entry?;
            if derived.stream_of_key(key).is_some_and(|stream| home_partition(&stream, self.partition_count) == partition) {
                rows.push((key.to_vec(), value.to_vec()));
            }
        }
        Ok(rows)
    }

    /// The image of `partition` at its head `head`, knowing it committed through `committed`.
    /// The caller is the log's writer, holding no transaction, with everything up to `last_seq`
    /// committed and durable.
    pub(crate) fn partition_image(
        &self,
        partition: u32,
        head: u64,
        committed: u64,
        last_seq: u64,
        derived: &dyn Derived,
    ) -> Result<PartitionImage, StorageError> {
        let _only_writer = self.index_writer.lock();
        self.flush_index_locked(last_seq)?;
        let floor = committed.min(head).max(self.partition_floor(partition));
        let records = self.read_partition(partition, floor + 1, head, ReadLimit { max_events: usize::MAX, max_bytes: usize::MAX })?.events;
        let log = self.log.read()?;
        let mut versions = self.partition_streams(partition, &log.txn)?;
        // Back to each stream's version at the floor: before its first event after it.
        for record in records.iter().rev() {
            versions.insert(record.stream.clone(), record.stream_version - 1);
        }
        let mut history = self.epoch_history(partition)?;
        history.truncate_after(head);
        let (start, end) = (undo_key(partition, floor + 1), undo_key(partition, u64::MAX));
        let mut undo = Vec::new();
        for entry in self.log_dbs.undo.range(&log.txn, &(Bound::Included(start.as_slice()), Bound::Included(end.as_slice())))? {
            let (key, value) = entry?;
            undo.push((be_u64(&key[4..12]), value.to_vec()));
        }
        Ok(PartitionImage {
            partition,
            position: head,
            floor,
            history: history.starts().to_vec(),
            records,
            stream_floors: versions.into_iter().filter(|(_, v)| *v > 0).collect(),
            state: self.partition_state_keys(&log.txn, partition, derived)?,
            undo,
        })
    }

    /// Replaces `partition` (events, state, undo records, floors, epochs) with `image`; its
    /// events get sequences after `last_seq`. The caller is the log's writer, holding no
    /// transaction, with everything up to `last_seq` committed. Returns the index entries of the
    /// events appended, for the tail, which the caller pushes once the partition's run restarts.
    pub(crate) fn install_image(
        &self,
        image: &PartitionImage,
        last_seq: u64,
        derived: &dyn Derived,
    ) -> Result<Vec<TailEntry>, StorageError> {
        let partition = image.partition;
        // Nothing of another partition's: an image that says otherwise is refused whole.
        let foreign = |stream: &str| home_partition(stream, self.partition_count) != partition;
        if let Some((stream, _)) = image.stream_floors.iter().find(|(stream, _)| foreign(stream)) {
            return Err(StorageError::State(format!("the image of partition {partition} names stream {stream} of another partition")));
        }
        if let Some(record) = image.records.iter().find(|r| foreign(&r.stream)) {
            return Err(StorageError::State(format!("the image of partition {partition} holds an event of stream {}", record.stream)));
        }
        if image.state.iter().any(|(key, _)| derived.stream_of_key(key).is_none_or(|stream| foreign(&stream))) {
            return Err(StorageError::State(format!("the image of partition {partition} holds state of no stream of the partition")));
        }
        let _only_writer = self.index_writer.lock();
        self.sync_log()?;
        self.flush_index_locked(last_seq)?;
        let old_floor = self.partition_floor(partition);
        let victims = self.events_in(partition, old_floor, u64::MAX)?;
        let history = crate::replication::EpochHistory::try_from_starts(image.history.clone()).map_err(StorageError::State)?;
        let mut txn = self.log.write()?;
        let (old_state, old_streams) = {
            let snapshot: &RoTxn<'_, WithoutTls> = &txn;
            (self.partition_state_keys(snapshot, partition, derived)?, self.stream_floor_keys(snapshot, partition)?)
        };
        for victim in &victims {
            self.log_dbs.log.delete(&mut txn, &keys::log_key(victim.seq))?;
        }
        for (key, _) in &old_state {
            self.log_dbs.state.delete(&mut txn, key)?;
        }
        for (key, value) in &image.state {
            self.log_dbs.state.put(&mut txn, key, value)?;
        }
        super::undo::forget_after(&mut txn, self.log_dbs.undo, partition, 0)?;
        for (position, record) in &image.undo {
            self.log_dbs.undo.put(&mut txn, &undo_key(partition, *position), record)?;
        }
        for key in &old_streams {
            self.log_dbs.meta.delete(&mut txn, key)?;
        }
        for (stream, version) in &image.stream_floors {
            self.put_stream_floor(&mut txn, stream, *version)?;
        }
        self.put_partition_floor(&mut txn, partition, image.floor)?;
        super::ReplicaMeta { meta: self.log_dbs.meta }.put_history(&mut txn, partition, &history)?;
        let mut appender = super::Appender { db: self.log_dbs.log, buf: Vec::new() };
        let mut entries = Vec::with_capacity(image.records.len());
        let mut seq = last_seq;
        for record in &image.records {
            seq += 1;
            appender.append(&mut txn, seq, &record.as_ref())?;
            entries.push((partition, record.position, record.stream.clone(), record.stream_version, seq));
        }
        let seq_floor = self.log_dbs.meta.get(&txn, &meta_key("seq_floor"))?.map(be_u64).unwrap_or(0).max(seq);
        self.log_dbs.meta.put(&mut txn, &meta_key("seq_floor"), &seq_floor.to_be_bytes())?;
        let intent =
            Intent { partition, after: old_floor, through: None, streams: victims.iter().map(|v| (v.stream.clone(), v.version)).collect() };
        self.put_intent(&mut txn, &intent)?;
        txn.commit()?;
        // From here the log holds the image and the writer does not know it yet: a failure
        // stops the process, and the next open finishes the intent. The intent's clearing is
        // synced before the image's events are published: once the indexer writes their
        // entries, an intent that a machine crash brought back would delete them (its range is
        // by position, and they took the replaced events' positions).
        let finish = || -> Result<(), StorageError> {
            self.sync_log()?;
            self.apply_intent(&intent)?;
            self.sync_log()
        };
        if let Err(e) = finish() {
            // Not a panic: unwinding would let readers in on the half-installed partition
            // before the process ends.
            tracing::error!(partition, error = %e, "installing a partition image failed after its log commit; stopping (the next start finishes it)");
            eprintln!(
                "anthill: installing the image of partition {partition} failed after its log commit ({e}); stopping, the next start finishes it"
            );
            std::process::abort();
        }
        self.floors[partition as usize].store(image.floor, std::sync::atomic::Ordering::Release);
        self.tail.write().restart_partition(partition, image.floor + 1);
        tracing::info!(
            partition,
            position = image.position,
            floor = image.floor,
            replaced = victims.len(),
            state_rows = image.state.len(),
            "installed a partition image"
        );
        Ok(entries)
    }

    /// The meta keys of the stream floors of `partition`'s streams.
    fn stream_floor_keys(&self, txn: &RoTxn<'_, WithoutTls>, partition: u32) -> Result<Vec<Vec<u8>>, StorageError> {
        let mut found = Vec::new();
        for entry in self.log_dbs.meta.prefix_iter(txn, &stream_floor_prefix())? {
            let (key, _) = entry?;
            if let Ok([_, keys::Value::Str(stream)]) = keys::unpack(key).as_deref()
                && home_partition(stream, self.partition_count) == partition
            {
                found.push(key.to_vec());
            }
        }
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::StorageConfig;
    use crate::log::partitioning::partition_of;
    use crate::storage::tests::{commit, event};
    use crate::storage::truncate::NothingDerived;

    fn install(store: &Store, image: &PartitionImage, last_seq: u64) {
        let entries = store.install_image(image, last_seq, &NothingDerived).unwrap();
        store.extend_tail(entries.iter().map(|(p, position, stream, version, seq)| (*p, *position, stream.as_str(), *version, *seq)));
    }

    #[test]
    fn given_a_partitions_marker_stream_that_hashes_elsewhere_then_its_image_carries_its_version_and_no_other_partitions_image_touches_it()
    {
        let cfg = StorageConfig { partitions: 4, ..StorageConfig::default() };
        let (from, to, other) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let leader = Store::open(from.path(), &cfg).unwrap();
        // Partition 1's marker stream hashes to partition 3.
        assert_eq!(partition_of("$epochs-1", 4), 3);
        commit(&leader, 1, &[event(1, 1, "$epochs-1", 1), event(1, 2, "b", 1), event(1, 3, "b", 2), event(3, 1, "t", 1)]);
        let image = leader.partition_image(1, 3, 2, 4, &NothingDerived).unwrap();
        assert!(image.stream_floors.contains(&("$epochs-1".to_string(), 1)), "{:?}", image.stream_floors);
        let receiver = Store::open(to.path(), &cfg).unwrap();
        install(&receiver, &image, 0);
        assert_eq!(receiver.stream_version("$epochs-1").unwrap(), 1, "the next marker continues at version 2");
        // The image of partition 3 says nothing of partition 1's marker stream.
        let image3 = leader.partition_image(3, 1, 1, 4, &NothingDerived).unwrap();
        assert!(image3.stream_floors.iter().all(|(stream, _)| stream != "$epochs-1"), "{:?}", image3.stream_floors);
        let fresh = Store::open(other.path(), &cfg).unwrap();
        install(&fresh, &image3, 0);
        assert_eq!(fresh.stream_version("$epochs-1").unwrap(), 0);
        // An image naming another partition's stream is refused whole.
        let mut foreign = image3.clone();
        foreign.stream_floors.push(("$epochs-1".into(), 9));
        let refused = fresh.install_image(&foreign, 1, &NothingDerived).unwrap_err();
        assert!(refused.to_string().contains("names stream $epochs-1 of another partition"), "{refused}");
    }
}
