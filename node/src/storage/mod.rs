//! The node's storage: a log in commit order and the indexes that find events in it.
//!
//! Two LMDB environments under the data directory ([`env::Lmdb`] each):
//!
//! | environment | database     | key (tuple, see [`keys`]) | value                              |
//! |-------------|--------------|---------------------------|------------------------------------|
//! | `log/`      | `log`        | `(seq,)`                  | [`record::EventRecord`] stored form |
//! | `log/`      | `meta`       | `(name,)`                 | format version, partition count     |
//! | `log/`      | `state`      | `(domain, scope, ...)`    | domain state, command ids (see [`crate::app`]) |
//! | `log/`      | `undo`       | `(partition, position)`   | state before an uncommitted append ([`undo`]) |
//! | `index/`    | `partitions` | `(partition, position)`   | seq, u64 big-endian                 |
//! | `index/`    | `streams`    | `(stream, version)`       | seq, u64 big-endian                 |
//! | `index/`    | `meta`       | `(name,)`                 | format version, `indexed_through`   |
//!
//! Why two: a group commit appends its events at the end of the log (`MDB_APPEND`, sequential
//! pages) and syncs only that. The index entries of the same events would land in random leaves
//! (one per partition touched and one per stream), so they are written by the indexer thread into
//! the second environment in large sorted batches, where many entries share a page. Until then they
//! live in memory in the [`tail::IndexTail`]; reads merge the index environment with the tail.
//!
//! Invariants:
//! - `seq` grows from 1 in the log, one per event, and is never reused; it is dense except where a
//!   partition's suffix was truncated (replication, see `truncate.rs`); every record names its
//!   partition, position, stream and version, so the index environment is derived data, rebuilt
//!   from the log at [`Store::open`];
//! - the index environment holds exactly the entries of the events with `seq <= indexed_through`
//!   (entries and watermark commit in one transaction), and only ever entries of durable events
//!   (the indexer is given the durable sequence), so a machine crash can never leave it pointing
//!   at an event the log lost;
//! - every event in the log past `indexed_through` has its entries in the tail; entries leave the
//!   tail only after the index commit that holds them;
//! - a reader takes the tail lock, then opens its index snapshot, then copies what it needs from
//!   the tail: the tail then holds at least everything the snapshot lacks (a trim needs the write
//!   lock and happens after the commit), and reads stitch the two at the run's first key.
//!
//! Locks are taken in the order tail, index gate, log gate; growing a map takes its gate alone.
//!
//! Durability of the log: a commit is atomic, and after `kill -9` the file holds exactly the
//! transactions that committed (the page cache survives a process crash). Against a machine crash
//! the log runs with `NO_META_SYNC`: a commit syncs its data pages before writing its meta page,
//! but leaves that page to the next sync ([`Store::sync_log`]). LMDB keeps the database intact under
//! this flag; a machine crash can undo only commits not yet synced, which the log answers no one
//! about before a sync (see `log/writer.rs`). The index environment runs with `NO_META_SYNC` too:
//! a machine crash may undo its last commits, which only lowers `indexed_through`; the events past
//! it are indexed again from the log at the next open.

mod env;
mod image;
pub mod keys;
pub mod record;
mod tail;
mod trim;
mod truncate;
pub mod undo;

use std::fs::{File, OpenOptions};
use std::ops::Bound;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use heed::types::Bytes;
use heed::{Database, EnvFlags, PutFlags, RoTxn, RwTxn, WithoutTls};
use parking_lot::RwLock;
use thiserror::Error;

use crate::config::StorageConfig;
use env::{Lmdb, Snapshot};
pub use image::PartitionImage;
use keys::{Elem, pack};
pub use record::{CorruptRecord, EventRecord, RecordRef};
use tail::IndexTail;
pub use truncate::{Derived, NothingDerived};
pub use undo::Journal;

/// Version of the on-disk layout described above; a node refuses a data directory of another.
/// Format 1 kept events under `(partition, position)` in one environment at the directory's top.
const FORMAT_VERSION: u64 = 2;

#[derive(Debug, Error)]
pub enum StorageError {
    #[error(
        "storage full: the log or its index needs more than storage.map_size_max_bytes = {max_bytes} bytes; raise it or free disk space"
    )]
    Full { max_bytes: u64 },
    #[error(
        "data directory {dir} was created with {stored} partitions, but the configuration asks for {configured}; the partition count is fixed when a cluster is created"
    )]
    PartitionCountMismatch { dir: PathBuf, stored: u32, configured: u32 },
    #[error("data directory {dir} has storage format {found}, this node reads format {FORMAT_VERSION}")]
    FormatMismatch { dir: PathBuf, found: u64 },
    #[error(
        "data directory {dir}: the index holds events up to log sequence {indexed_through} but the log ends at {last_seq}; the log lost committed events (restore the directory from a backup)"
    )]
    IndexAhead { dir: PathBuf, indexed_through: u64, last_seq: u64 },
    #[error("data directory {0} is in use by another process (lock file held)")]
    Locked(PathBuf),
    #[error("cannot prepare data directory {dir}: {source}")]
    DataDir { dir: PathBuf, source: std::io::Error },
    #[error("cannot start the log writer thread: {0}")]
    WriterThread(std::io::Error),
    #[error(transparent)]
    Corrupt(#[from] CorruptRecord),
    #[error("domain state: {0}")]
    State(String),
    #[error("LMDB: {0}")]
    Lmdb(#[from] heed::Error),
}

impl StorageError {
    /// An I/O failure of a file itself (a failed write or sync). After one, the kernel may
    /// already have dropped the pages it could not write and report success to the next sync,
    /// so nothing written afterwards can be trusted to be durable: the log stops writing.
    pub fn is_io_failure(&self) -> bool {
        matches!(self, StorageError::Lmdb(heed::Error::Io(_) | heed::Error::Mdb(heed::MdbError::Panic)))
    }

    pub fn is_map_full(&self) -> bool {
        matches!(self, StorageError::Lmdb(heed::Error::Mdb(heed::MdbError::MapFull)))
    }
}

#[derive(Clone, Copy)]
struct LogDbs {
    log: Database<Bytes, Bytes>,
    meta: Database<Bytes, Bytes>,
    /// Domain state, written in the same transactions as the events that change it.
    state: Database<Bytes, Bytes>,
    /// What uncommitted appends changed in `state`, to take back on a truncation ([`undo`]).
    undo: Database<Bytes, Bytes>,
}

/// Which index database an entry goes to; partitions sort first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum IndexDb {
    Partitions,
    Streams,
}

/// Longest stream id the storage can index. LMDB (as heed builds it) refuses keys over 511 bytes,
/// and a `streams` key is the id plus at most 11 bytes of tuple encoding (type code, terminator,
/// a version of up to 8 bytes with its code). The configuration's limit may not exceed this, so an
/// append the log accepted can always be indexed.
pub const MAX_STREAM_ID_BYTES: usize = 500;

/// Most index entries one index transaction writes (see [`Store::flush_index`]).
const INDEX_TXN_ENTRIES: usize = 512;

#[derive(Clone, Copy)]
struct IndexDbs {
    partitions: Database<Bytes, Bytes>,
    streams: Database<Bytes, Bytes>,
    meta: Database<Bytes, Bytes>,
}

/// An open data directory.
pub struct Store {
    log: Lmdb,
    log_dbs: LogDbs,
    index: Lmdb,
    index_dbs: IndexDbs,
    tail: RwLock<IndexTail>,
    /// The tail's event count, kept beside it so the syncer reads it without the tail's lock.
    tail_events: AtomicUsize,
    /// Every event up to this sequence is in the index environment (its `meta` says the same).
    indexed_through: AtomicU64,
    /// The log's last sequence when it was opened (or the highest ever used, when a truncation
    /// removed the last records); the writer continues from it.
    last_seq_at_open: u64,
    /// Held by whoever writes the index environment: the indexer's flushes, a truncation.
    index_writer: parking_lot::Mutex<()>,
    /// Shared by the log's reads (published heads, then the store), exclusive to a truncation
    /// (the store, then the heads moved back), so no read pairs old heads with a truncated store.
    truncation: parking_lot::RwLock<()>,
    partition_count: u32,
    /// Each partition's floor: the last position its log no longer holds (`trim.rs`).
    floors: Vec<AtomicU64>,
    config: StorageConfig,
    dir: PathBuf,
    _lock: File,
}

/// How much of the memory maps and the disk the two environments use together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StorageSizes {
    pub used_bytes: u64,
    pub map_size_bytes: u64,
}

fn meta_key(name: &str) -> Vec<u8> {
    pack(&[Elem::Str(name)])
}

impl Store {
    /// Opens (creating if needed) the data directory under `dir`, syncs the log and brings the
    /// index up to date with it (re-indexing what a crash left only in the log), so the store
    /// returned is whole: every committed event is durable and found by every read.
    pub fn open(dir: &Path, cfg: &StorageConfig) -> Result<Self, StorageError> {
        std::fs::create_dir_all(dir).map_err(|source| StorageError::DataDir { dir: dir.to_path_buf(), source })?;
        let lock = lock_data_dir(dir)?;
        if dir.join("data.mdb").exists() {
            return Err(StorageError::FormatMismatch { dir: dir.to_path_buf(), found: 1 });
        }
        // SAFETY: the lock file above guarantees no other process of ours opens this directory,
        // and this process opens it once per Store. NO_META_SYNC is safe as the log uses it:
        // nothing is acknowledged or shown to readers before a later sync.
        let log = unsafe { Lmdb::open(&dir.join("log"), "log", EnvFlags::NO_META_SYNC, 4, cfg)? };
        // SAFETY: as above. The index is derived from the log: a machine crash that undoes its
        // last commits only lowers `indexed_through`, and the next open indexes those events again.
        let index = unsafe { Lmdb::open(&dir.join("index"), "index", EnvFlags::NO_META_SYNC, 3, cfg)? };

        let mut wtxn = log.write()?;
        let log_dbs = LogDbs {
            log: log.env().create_database(&mut wtxn, Some("log"))?,
            meta: log.env().create_database(&mut wtxn, Some("meta"))?,
            state: log.env().create_database(&mut wtxn, Some("state"))?,
            undo: log.env().create_database(&mut wtxn, Some("undo"))?,
        };
        check_format(&mut wtxn, log_dbs.meta, dir)?;
        let partitions_key = meta_key("partition_count");
        match log_dbs.meta.get(&wtxn, &partitions_key)?.map(be_u64) {
            None => log_dbs.meta.put(&mut wtxn, &partitions_key, &u64::from(cfg.partitions).to_be_bytes())?,
            Some(stored) if stored == u64::from(cfg.partitions) => {}
            Some(stored) => {
                return Err(StorageError::PartitionCountMismatch {
                    dir: dir.to_path_buf(),
                    stored: stored as u32,
                    configured: cfg.partitions,
                });
            }
        }
        wtxn.commit()?;

        let mut wtxn = index.write()?;
        let index_dbs = IndexDbs {
            partitions: index.env().create_database(&mut wtxn, Some("partitions"))?,
            streams: index.env().create_database(&mut wtxn, Some("streams"))?,
            meta: index.env().create_database(&mut wtxn, Some("meta"))?,
        };
        check_format(&mut wtxn, index_dbs.meta, dir)?;
        let indexed_through = index_dbs.meta.get(&wtxn, &meta_key("indexed_through"))?.map(be_u64).unwrap_or(0);
        wtxn.commit()?;

        // After a crash the last commits may still sit unsynced in the page cache: make them
        // durable before anything (the index, a reader) acts on them.
        log.sync()?;
        let last_key = match log_dbs.log.last(&log.read()?.txn)? {
            Some((key, _)) => keys::decode_log_key(key).map_err(|_| CorruptRecord::at_seq(0, "undecodable last log key"))?,
            None => 0,
        };
        // A truncation may have removed the last records; their sequences are never reused.
        let seq_floor = log_dbs.meta.get(&log.read()?.txn, &meta_key("seq_floor"))?.map(be_u64).unwrap_or(0);
        let last_seq_at_open = last_key.max(seq_floor);
        if indexed_through > last_seq_at_open {
            return Err(StorageError::IndexAhead { dir: dir.to_path_buf(), indexed_through, last_seq: last_seq_at_open });
        }
        let mut store = Store {
            log,
            log_dbs,
            index,
            index_dbs,
            tail: RwLock::new(IndexTail::new([])),
            tail_events: AtomicUsize::new(0),
            indexed_through: AtomicU64::new(indexed_through),
            last_seq_at_open,
            index_writer: parking_lot::Mutex::new(()),
            truncation: parking_lot::RwLock::new(()),
            partition_count: cfg.partitions,
            floors: (0..cfg.partitions).map(|_| AtomicU64::new(0)).collect(),
            config: cfg.clone(),
            dir: dir.to_path_buf(),
            _lock: lock,
        };
        store.finish_truncation()?;
        for (p, floor) in store.load_floors()?.into_iter().enumerate() {
            store.floors[p].store(floor, Ordering::Release);
        }
        store.reindex_log_tail(cfg.index_flush_events)?;
        let mut heads = index_partition_heads(&store.index.read()?.txn, store.index_dbs, cfg.partitions)?;
        // A partition whose every event was given up goes on after its floor.
        for (head, floor) in heads.iter_mut().zip(&store.floors) {
            *head = (*head).max(floor.load(Ordering::Acquire));
        }
        store.tail = RwLock::new(IndexTail::new(heads.iter().map(|head| head + 1)));
        Ok(store)
    }

    /// Indexes the events a crash (or a missing index directory) left only in the log, straight
    /// into the index environment, `chunk_events` per transaction. Entries the index may already
    /// hold (a flush cut short) are written again with the same value.
    fn reindex_log_tail(&self, chunk_events: usize) -> Result<(), StorageError> {
        let last_seq = self.last_seq_at_open;
        let mut next = self.indexed_through() + 1;
        if next > last_seq {
            return Ok(());
        }
        tracing::info!(events = last_seq + 1 - next, from_seq = next, "indexing events the index had not taken yet");
        let mut heads: Vec<Option<u64>> = vec![None; self.partition_count as usize];
        while next <= last_seq {
            let mut entries = Vec::with_capacity(2 * chunk_events);
            {
                let log = self.log.read()?;
                let start = keys::log_key(next);
                let range = (Bound::Included(start.as_slice()), Bound::Unbounded);
                for entry in self.log_dbs.log.range(&log.txn, &range)?.take(chunk_events) {
                    let (key, value) = entry?;
                    let seq = keys::decode_log_key(key).map_err(|_| CorruptRecord::at_seq(next, "undecodable log key"))?;
                    // Sequences a truncation removed leave holes; they never go backwards.
                    if seq < next {
                        return Err(CorruptRecord::at_seq(next, "log sequences out of order").into());
                    }
                    next = seq;
                    let record = EventRecord::decode(seq, value)?;
                    let head = heads.get_mut(record.partition as usize).ok_or(CorruptRecord::at_seq(seq, "unknown partition"))?;
                    if head.is_some_and(|head| record.position != head + 1) {
                        return Err(CorruptRecord::at_seq(seq, "record does not continue its partition").into());
                    }
                    *head = Some(record.position);
                    entries.push((IndexDb::Partitions, keys::event_key(record.partition, record.position), seq));
                    entries.push((IndexDb::Streams, keys::stream_key(&record.stream, record.stream_version), seq));
                    next += 1;
                }
            }
            if entries.is_empty() {
                // Only holes are left up to the highest sequence used.
                next = last_seq + 1;
            }
            entries.sort_unstable();
            self.write_index_with_growth(&entries, Some(next - 1))?;
            self.indexed_through.store(next - 1, Ordering::Release);
            tracing::info!(through_seq = next - 1, last_seq, "indexed from the log");
        }
        Ok(())
    }

    pub fn partition_count(&self) -> u32 {
        self.partition_count
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn config(&self) -> &StorageConfig {
        &self.config
    }

    /// The log's last sequence when the store was opened.
    pub fn last_seq_at_open(&self) -> u64 {
        self.last_seq_at_open
    }

    /// Position of the last event of each partition (0 when empty), as far as the writer has
    /// committed.
    pub fn partition_heads(&self) -> Vec<u64> {
        let tail = self.tail.read();
        (0..self.partition_count).map(|p| tail.partition(p).next() - 1).collect()
    }

    /// Every event up to this sequence is in the index environment.
    pub fn indexed_through(&self) -> u64 {
        self.indexed_through.load(Ordering::Acquire)
    }

    /// Events whose index entries are held only in memory.
    pub fn tail_events(&self) -> usize {
        self.tail_events.load(Ordering::Acquire)
    }

    /// Sizes of both environments together, as of their last refresh.
    pub fn sizes(&self) -> StorageSizes {
        let (log_used, log_map) = self.log.sizes();
        let (index_used, index_map) = self.index.sizes();
        StorageSizes { used_bytes: log_used + index_used, map_size_bytes: log_map + index_map }
    }

    /// The current version (0 when none) of each of `streams`, including events not yet
    /// durable: the tail's last version where the tail holds the stream, else the index's. Each is
    /// its own result, so one stream's damaged index entry fails only that stream. The tail lock
    /// is held only to read the tail and open the index snapshot (a stream the tail lacks then is
    /// wholly in that snapshot); the index lookups run after it is released.
    pub(crate) fn stream_versions(&self, streams: &[&str]) -> Result<Vec<Result<u64, StorageError>>, StorageError> {
        let (index, in_tail) = {
            let tail = self.tail.read();
            let index = self.index.read()?;
            (index, streams.iter().map(|stream| tail.stream(stream).map(|run| run.next() - 1)).collect::<Vec<_>>())
        };
        let versions = streams.iter().zip(in_tail).map(|(stream, in_tail)| match in_tail {
            Some(version) => Ok(version),
            // A stream whose every event was given up goes on after its floor.
            None => match index_stream_version(&index.txn, self.index_dbs, stream) {
                Ok(0) => self.stream_floor(stream),
                other => other,
            },
        });
        Ok(versions.collect())
    }

    /// The positions of `partition`'s appends that have undo records (`undo.rs`).
    #[cfg(test)]
    pub(crate) fn undo_positions(&self, partition: u32) -> Vec<u64> {
        let snapshot = self.log.read().unwrap();
        let prefix = partition.to_be_bytes();
        let records = self.log_dbs.undo.prefix_iter(&snapshot.txn, &prefix).unwrap();
        records.map(|e| u64::from_be_bytes(e.unwrap().0[4..12].try_into().unwrap())).collect()
    }

    /// The log's write transaction. Only the log's writer calls this.
    pub(crate) fn write(&self) -> Result<LogTxn<'_>, StorageError> {
        Ok(LogTxn {
            txn: self.log.write()?,
            appender: Appender { db: self.log_dbs.log, buf: Vec::with_capacity(512) },
            state: self.log_dbs.state,
            undo: self.log_dbs.undo,
            meta: self.log_dbs.meta,
        })
    }

    /// The epoch history of `partition`'s events (empty for a partition never written).
    pub fn epoch_history(&self, partition: u32) -> Result<crate::replication::EpochHistory, StorageError> {
        let snapshot = self.log.read()?;
        match self.log_dbs.meta.get(&snapshot.txn, &history_key(partition))? {
            None => Ok(crate::replication::EpochHistory::default()),
            Some(bytes) => {
                let starts: Vec<(u64, u64)> =
                    serde_json::from_slice(bytes).map_err(|_| CorruptRecord::in_partition(partition, 0, "undecodable epoch history"))?;
                Ok(crate::replication::EpochHistory::from_starts(starts))
            }
        }
    }

    /// The highest epoch this replica of `partition` promised (0: none).
    pub fn promised_epoch(&self, partition: u32) -> Result<u64, StorageError> {
        Ok(self.log_dbs.meta.get(&self.log.read()?.txn, &promise_key(partition))?.map(be_u64).unwrap_or(0))
    }

    /// Runs `read` on a snapshot of the domain state; returns its answer and the log sequence
    /// the snapshot holds state up to. That sequence may not be durable yet (a commit is visible
    /// before its sync): the caller waits for it before answering anyone.
    pub fn read_state<R>(&self, read: impl FnOnce(&RoTxn<'_, WithoutTls>, Database<Bytes, Bytes>) -> R) -> Result<(R, u64), StorageError> {
        let snapshot = self.log.read()?;
        let seq = match self.log_dbs.log.last(&snapshot.txn)? {
            Some((key, _)) => keys::decode_log_key(key).map_err(|_| CorruptRecord::at_seq(0, "undecodable last log key"))?,
            None => 0,
        };
        Ok((read(&snapshot.txn, self.log_dbs.state), seq))
    }

    /// Records the index entries of a committed batch: `(partition, position, stream, version,
    /// seq)` in sequence order. The writer calls this after the commit and before anyone is told.
    pub(crate) fn extend_tail<'a>(&self, entries: impl IntoIterator<Item = (u32, u64, &'a str, u64, u64)>) {
        let mut tail = self.tail.write();
        for (partition, position, stream, version, seq) in entries {
            tail.push(partition, position, stream, version, seq);
        }
        self.tail_events.store(tail.events(), Ordering::Release);
    }

    /// Syncs everything committed to the log so far (fdatasync), including the last meta page.
    pub(crate) fn sync_log(&self) -> Result<(), StorageError> {
        self.log.sync()
    }

    /// Grows the log's map (see [`Lmdb::grow_map`]). Only the log's writer calls this.
    pub(crate) fn grow_log_map(&self, needed_bytes: u64) -> Result<u64, StorageError> {
        self.log.grow_map(needed_bytes)
    }

    pub(crate) fn refresh_log_sizes(&self) {
        self.log.refresh_sizes();
    }

    /// Moves the tail's entries of every event up to `through_seq` into the index environment,
    /// then drops them from the tail; returns how many events that was. The caller guarantees
    /// that every event up to `through_seq` is durable in the log, and is the index's one writer.
    pub(crate) fn flush_index(&self, through_seq: u64) -> Result<usize, StorageError> {
        let _only_writer = self.index_writer.lock();
        self.flush_index_locked(through_seq)
    }

    /// [`Store::flush_index`], for a caller that holds `index_writer`.
    fn flush_index_locked(&self, through_seq: u64) -> Result<usize, StorageError> {
        let indexed = self.indexed_through();
        if through_seq <= indexed {
            return Ok(0);
        }
        let unindexed = self.tail.read().unindexed(through_seq);
        let events = unindexed.partitions.len();
        // Fewer than the sequences when a truncation left holes.
        assert!(events as u64 <= through_seq - indexed, "the tail holds every event past the index, once");
        // Sorted, so the B-tree inserts walk the leaves in order and each chunk below touches
        // its own leaves.
        let mut entries: Vec<(IndexDb, Vec<u8>, u64)> = Vec::with_capacity(2 * events);
        entries.extend(unindexed.partitions.iter().map(|&(p, pos, seq)| (IndexDb::Partitions, keys::event_key(p, pos), seq)));
        entries.extend(unindexed.streams.iter().map(|(stream, version, seq)| (IndexDb::Streams, keys::stream_key(stream, *version), *seq)));
        entries.sort_unstable();
        // One transaction per chunk bounds the pages a commit writes and syncs at once, and so
        // the time a log sync waits behind it on the disk. Only the last chunk moves the mark; a
        // crash before it leaves entries past the mark, which reads do not use (they take those
        // from the tail) and the next open writes again.
        let mut chunks = entries.chunks(INDEX_TXN_ENTRIES).peekable();
        while let Some(chunk) = chunks.next() {
            let mark = chunks.peek().is_none().then_some(through_seq);
            self.write_index_with_growth(chunk, mark)?;
        }
        self.indexed_through.store(through_seq, Ordering::Release);
        let mut tail = self.tail.write();
        tail.trim(through_seq);
        self.tail_events.store(tail.events(), Ordering::Release);
        drop(tail);
        self.index.refresh_sizes();
        Ok(events)
    }

    /// Writes index entries (sorted) in one transaction, with `indexed_through` when given,
    /// growing the index map when it is full.
    fn write_index_with_growth(&self, entries: &[(IndexDb, Vec<u8>, u64)], indexed_through: Option<u64>) -> Result<(), StorageError> {
        loop {
            match self.write_index(entries, indexed_through) {
                Ok(()) => return Ok(()),
                Err(e) if e.is_map_full() => {
                    // Room for the entries three times over: keys, values and page splits.
                    let entry_bytes: usize = entries.iter().map(|(_, key, _)| key.len() + 16).sum();
                    self.index.grow_map(entry_bytes as u64 * 3)?;
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn write_index(&self, entries: &[(IndexDb, Vec<u8>, u64)], indexed_through: Option<u64>) -> Result<(), StorageError> {
        let mut txn = self.index.write()?;
        for (db, key, seq) in entries {
            let db = match db {
                IndexDb::Partitions => self.index_dbs.partitions,
                IndexDb::Streams => self.index_dbs.streams,
            };
            db.put(&mut txn, key, &seq.to_be_bytes())?;
        }
        if let Some(mark) = indexed_through {
            self.index_dbs.meta.put(&mut txn, &meta_key("indexed_through"), &mark.to_be_bytes())?;
        }
        txn.commit()?;
        Ok(())
    }

    /// Held while reading published heads and then the store: a truncation waits for it.
    pub(crate) fn reading(&self) -> parking_lot::RwLockReadGuard<'_, ()> {
        self.truncation.read()
    }

    /// Held by the writer from a truncation until its heads are published.
    pub(crate) fn truncating(&self) -> parking_lot::RwLockWriteGuard<'_, ()> {
        self.truncation.write()
    }

    /// Events of `partition` from `from_position` up to `until_position` (inclusive), within `limit`.
    /// Events the log gave up (below its floor, `trim.rs`) are skipped.
    pub fn read_partition(&self, partition: u32, from_position: u64, until_position: u64, limit: ReadLimit) -> Result<Slice, StorageError> {
        let from = from_position.max(self.partition_floor(partition) + 1);
        let mut reader = EventReader::new(limit);
        if from > until_position {
            return Ok(reader.slice);
        }
        let (index, run_first, held) = {
            let tail = self.tail.read();
            let index = self.index.read()?;
            let run = tail.partition(partition);
            // One past the limit, so the read can tell that more follow.
            (index, run.first(), run.entries_from(from, limit.max_events.saturating_add(1)).collect::<Vec<_>>())
        };
        let log = self.log.read()?;
        let mut expected = from;
        // Positions below the run's first are in the index environment, the rest in the tail.
        let index_last = until_position.min(run_first - 1);
        if expected <= index_last {
            let (start, end) = (keys::event_key(partition, from), keys::event_key(partition, index_last + 1));
            for entry in self.index_dbs.partitions.range(&index.txn, &span(&start, &end))? {
                let (key, value) = entry?;
                let corrupt = |reason| CorruptRecord::in_partition(partition, expected, reason);
                let (_, position) = keys::decode_event_key(key).map_err(|_| corrupt("undecodable index key"))?;
                if position != expected {
                    return Err(corrupt("gap in partition positions").into());
                }
                let found = |r: &EventRecord| r.partition == partition && r.position == position;
                if !reader.push(self, &log, be_u64(value), found, || corrupt("index entry leads to another event"))? {
                    return Ok(reader.slice);
                }
                expected += 1;
            }
            if expected <= index_last {
                return Err(CorruptRecord::in_partition(partition, expected, "missing from the partition index").into());
            }
        }
        for (position, seq) in held.into_iter().take_while(|(position, _)| *position <= until_position) {
            debug_assert_eq!(position, expected);
            let found = |r: &EventRecord| r.partition == partition && r.position == position;
            let corrupt = || CorruptRecord::in_partition(partition, position, "index entry leads to another event");
            if !reader.push(self, &log, seq, found, corrupt)? {
                break;
            }
            expected += 1;
        }
        Ok(reader.slice)
    }

    /// Events of `stream` from `from_version` on, within `limit`, stopping before the first event
    /// past log sequence `until_seq`.
    /// Versions the log gave up (at or below the stream's floor, `trim.rs`) are skipped.
    pub fn read_stream(&self, stream: &str, from_version: u64, until_seq: u64, limit: ReadLimit) -> Result<Slice, StorageError> {
        let from = from_version.max(self.stream_floor(stream)? + 1);
        let mut reader = EventReader::new(limit);
        let (index, held) = {
            let tail = self.tail.read();
            let index = self.index.read()?;
            let held = tail
                .stream(stream)
                .map(|run| (run.first(), run.entries_from(from, limit.max_events.saturating_add(1)).collect::<Vec<_>>()));
            (index, held)
        };
        let log = self.log.read()?;
        let mut expected = from;
        let prefix = keys::stream_prefix(stream);
        // Versions below the run's first (all of them, without a run) are in the index environment.
        let end = match &held {
            Some((run_first, _)) => keys::stream_key(stream, *run_first),
            None => [prefix.as_slice(), &[0xFF]].concat(),
        };
        let run_first = held.as_ref().map_or(u64::MAX, |(first, _)| *first);
        if expected < run_first {
            let start = keys::stream_key(stream, from);
            for entry in self.index_dbs.streams.range(&index.txn, &span(&start, &end))? {
                let (key, value) = entry?;
                let corrupt = |reason| CorruptRecord::in_stream(stream, expected, reason);
                match keys::unpack(&key[prefix.len()..]).as_deref() {
                    Ok([keys::Value::U64(version)]) if *version == expected => {}
                    Ok([keys::Value::U64(_)]) => return Err(corrupt("gap in stream versions").into()),
                    _ => return Err(corrupt("undecodable stream index key").into()),
                }
                let seq = be_u64(value);
                if seq > until_seq {
                    // Not yet published; the stream's visible end.
                    return Ok(reader.slice);
                }
                let version = expected;
                let found = |r: &EventRecord| r.stream == stream && r.stream_version == version;
                if !reader.push(self, &log, seq, found, || corrupt("index entry leads to another event"))? {
                    return Ok(reader.slice);
                }
                expected += 1;
            }
            if held.is_some() && expected < run_first {
                return Err(CorruptRecord::in_stream(stream, expected, "missing from the stream index").into());
            }
        }
        for (version, seq) in held.map(|(_, entries)| entries).unwrap_or_default() {
            debug_assert_eq!(version, expected);
            if seq > until_seq {
                break;
            }
            let found = |r: &EventRecord| r.stream == stream && r.stream_version == version;
            let corrupt = || CorruptRecord::in_stream(stream, version, "index entry leads to another event");
            if !reader.push(self, &log, seq, found, corrupt)? {
                break;
            }
            expected += 1;
        }
        Ok(reader.slice)
    }

    /// The stream's current version (0 when it has no events), including events not yet durable.
    pub fn stream_version(&self, stream: &str) -> Result<u64, StorageError> {
        self.stream_versions(&[stream])?.pop().expect("one version per stream asked")
    }
}

fn check_format(wtxn: &mut RwTxn<'_>, meta: Database<Bytes, Bytes>, dir: &Path) -> Result<(), StorageError> {
    let key = meta_key("format_version");
    match meta.get(wtxn, &key)?.map(be_u64) {
        None => meta.put(wtxn, &key, &FORMAT_VERSION.to_be_bytes())?,
        Some(FORMAT_VERSION) => {}
        Some(found) => return Err(StorageError::FormatMismatch { dir: dir.to_path_buf(), found }),
    }
    Ok(())
}

/// Position of the last indexed event of each partition (0 when none), indexed by partition.
fn index_partition_heads(txn: &RoTxn<'_, WithoutTls>, dbs: IndexDbs, partition_count: u32) -> Result<Vec<u64>, StorageError> {
    (0..partition_count)
        .map(|p| {
            let range = keys::partition_prefix(p)..keys::partition_prefix(p + 1);
            match dbs.partitions.rev_range(txn, &span(&range.start, &range.end))?.next() {
                None => Ok(0),
                Some(entry) => Ok(keys::decode_event_key(entry?.0)
                    .map_err(|_| CorruptRecord::in_partition(p, 0, "undecodable partition index key"))?
                    .1),
            }
        })
        .collect()
}

fn lock_data_dir(dir: &Path) -> Result<File, StorageError> {
    let path = dir.join("anthill.lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| StorageError::DataDir { dir: dir.to_path_buf(), source })?;
    // SAFETY: flock on a file descriptor we own; released when the file is closed.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        return Err(StorageError::Locked(dir.to_path_buf()));
    }
    Ok(file)
}

/// The key range `[start, end)` in the form heed takes for unsized keys.
fn span<'k>(start: &'k [u8], end: &'k [u8]) -> (Bound<&'k [u8]>, Bound<&'k [u8]>) {
    (Bound::Included(start), Bound::Excluded(end))
}

fn be_u64(bytes: &[u8]) -> u64 {
    let mut be = [0u8; 8];
    let n = bytes.len().min(8);
    be[8 - n..].copy_from_slice(&bytes[bytes.len() - n..]);
    u64::from_be_bytes(be)
}

/// How much one read may return.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadLimit {
    pub max_events: usize,
    /// Stored bytes (encoded records); the first event is returned whatever its size.
    pub max_bytes: usize,
}

/// What one read found.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Slice {
    pub events: Vec<EventRecord>,
    /// More events follow in the range read (the read stopped at its limit).
    pub more: bool,
}

/// Fills a [`Slice`] with events fetched from the log by sequence, within a limit.
struct EventReader {
    slice: Slice,
    limit: ReadLimit,
    bytes: usize,
}

impl EventReader {
    fn new(limit: ReadLimit) -> Self {
        EventReader { slice: Slice::default(), limit, bytes: 0 }
    }

    /// Adds the event at `seq` unless the limit is reached; false (and `more` set) when it is.
    /// `found` checks that the record is the one its index entry meant.
    fn push(
        &mut self,
        store: &Store,
        log: &Snapshot<'_>,
        seq: u64,
        found: impl FnOnce(&EventRecord) -> bool,
        corrupt: impl FnOnce() -> CorruptRecord,
    ) -> Result<bool, StorageError> {
        let slice = &mut self.slice;
        if slice.events.len() >= self.limit.max_events {
            slice.more = true;
            return Ok(false);
        }
        let Some(value) = store.log_dbs.log.get(&log.txn, &keys::log_key(seq))? else {
            return Err(corrupt().into());
        };
        if !slice.events.is_empty() && self.bytes + value.len() > self.limit.max_bytes {
            slice.more = true;
            return Ok(false);
        }
        self.bytes += value.len();
        let record = EventRecord::decode(seq, value)?;
        if !found(&record) {
            return Err(corrupt().into());
        }
        slice.events.push(record);
        Ok(true)
    }
}

/// The stream's last version in the index environment (0 when it has none there).
fn index_stream_version(txn: &RoTxn<'_, WithoutTls>, dbs: IndexDbs, stream: &str) -> Result<u64, StorageError> {
    let prefix = keys::stream_prefix(stream);
    let end = [prefix.as_slice(), &[0xFF]].concat();
    let Some(entry) = dbs.streams.rev_range(txn, &span(&prefix, &end))?.next() else {
        return Ok(0);
    };
    let (key, _) = entry?;
    match keys::unpack(&key[prefix.len()..]).as_deref() {
        Ok([keys::Value::U64(version)]) => Ok(*version),
        _ => Err(CorruptRecord::in_stream(stream, 0, "undecodable stream index key").into()),
    }
}

/// The log's single write transaction: events, and the domain state they change.
pub(crate) struct LogTxn<'s> {
    txn: RwTxn<'s>,
    appender: Appender,
    state: Database<Bytes, Bytes>,
    undo: Database<Bytes, Bytes>,
    meta: Database<Bytes, Bytes>,
}

/// A log transaction taken apart for one group commit (see [`LogTxn::parts`]).
pub(crate) struct TxnParts<'t, 's> {
    pub txn: &'t mut RwTxn<'s>,
    pub appender: &'t mut Appender,
    pub state: Database<Bytes, Bytes>,
    /// The undo journal's records ([`undo`]).
    pub undo: Database<Bytes, Bytes>,
    pub replicas: ReplicaMeta,
}

/// Where a partition's replication state is kept: its promised epoch and its epoch history,
/// in the log's `meta` database, changed in the transactions that append the events.
#[derive(Clone, Copy)]
pub(crate) struct ReplicaMeta {
    meta: Database<Bytes, Bytes>,
}

impl ReplicaMeta {
    pub fn put_history(&self, txn: &mut RwTxn<'_>, partition: u32, history: &crate::replication::EpochHistory) -> Result<(), StorageError> {
        let encoded = serde_json::to_vec(history.starts()).expect("pairs of numbers serialize");
        self.meta.put(txn, &history_key(partition), &encoded)?;
        Ok(())
    }

    pub fn put_promise(&self, txn: &mut RwTxn<'_>, partition: u32, epoch: u64) -> Result<(), StorageError> {
        self.meta.put(txn, &promise_key(partition), &epoch.to_be_bytes())?;
        Ok(())
    }
}

fn history_key(partition: u32) -> Vec<u8> {
    pack(&[Elem::Str("epochs"), Elem::U64(partition.into())])
}

fn promise_key(partition: u32) -> Vec<u8> {
    pack(&[Elem::Str("promised"), Elem::U64(partition.into())])
}

/// Appends events to the log in a transaction it is handed.
pub(crate) struct Appender {
    db: Database<Bytes, Bytes>,
    buf: Vec<u8>,
}

impl Appender {
    /// Appends one event at `seq`, which must follow the log's last sequence.
    pub fn append(&mut self, txn: &mut RwTxn<'_>, seq: u64, record: &RecordRef<'_>) -> Result<(), StorageError> {
        record.encode_into(&mut self.buf);
        // APPEND: LMDB puts the key at the end without a search and fills pages completely; it
        // refuses (KEYEXIST) a key that does not sort after the last one.
        self.db.put_with_flags(txn, PutFlags::APPEND, &keys::log_key(seq), &self.buf)?;
        Ok(())
    }
}

impl<'s> LogTxn<'s> {
    /// Appends one event at `seq`, which must follow the log's last sequence.
    #[cfg(test)]
    pub fn append(&mut self, seq: u64, record: &RecordRef<'_>) -> Result<(), StorageError> {
        self.appender.append(&mut self.txn, seq, record)
    }

    /// The transaction, the log's appender and the state database, for a command that writes
    /// state and appends its events in this transaction.
    pub fn parts(&mut self) -> TxnParts<'_, 's> {
        TxnParts {
            txn: &mut self.txn,
            appender: &mut self.appender,
            state: self.state,
            undo: self.undo,
            replicas: ReplicaMeta { meta: self.meta },
        }
    }

    /// Commits: atomic, data pages synced; durable once [`Store::sync_log`] (or a later commit) ran.
    pub fn commit(self) -> Result<(), StorageError> {
        self.txn.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(partitions: u32) -> StorageConfig {
        StorageConfig { partitions, ..StorageConfig::default() }
    }

    const ALL: ReadLimit = ReadLimit { max_events: usize::MAX, max_bytes: usize::MAX };

    pub(super) fn event(partition: u32, position: u64, stream: &str, version: u64) -> EventRecord {
        EventRecord {
            partition,
            position,
            stream: stream.into(),
            stream_version: version,
            event_type: "T".into(),
            payload: vec![7; 10],
            metadata: vec![],
            append_time_us: 1,
            epoch: 1,
            atomic_with_next: false,
        }
    }

    /// Commits `events` as the log's writer does: appended to the log from `first_seq` on, then
    /// their entries handed to the tail.
    pub(super) fn commit(store: &Store, first_seq: u64, events: &[EventRecord]) {
        let mut w = store.write().unwrap();
        for (seq, e) in (first_seq..).zip(events) {
            w.append(seq, &e.as_ref()).unwrap();
        }
        w.commit().unwrap();
        store.extend_tail((first_seq..).zip(events).map(|(seq, e)| (e.partition, e.position, e.stream.as_str(), e.stream_version, seq)));
    }

    fn positions(slice: &Slice) -> Vec<(u32, u64)> {
        slice.events.iter().map(|e| (e.partition, e.position)).collect()
    }

    fn versions(slice: &Slice) -> Vec<u64> {
        slice.events.iter().map(|e| e.stream_version).collect()
    }

    #[test]
    fn given_committed_events_when_read_and_reopened_then_they_read_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let events = [event(2, 1, "s", 1), event(2, 2, "s", 2), event(1, 1, "t", 1)];
        let check = |store: &Store| {
            assert_eq!(store.partition_heads(), vec![0, 1, 2, 0]);
            assert_eq!(store.stream_version("s").unwrap(), 2);
            assert_eq!(store.read_partition(2, 2, u64::MAX, ALL).unwrap(), Slice { events: vec![events[1].clone()], more: false });
            assert_eq!(store.read_stream("s", 0, u64::MAX, ALL).unwrap().events, events[..2].to_vec());
            assert!(store.read_stream("s\0", 0, u64::MAX, ALL).unwrap().events.is_empty());
            // Cut by the durable sequence, by count, and by bytes (the first event always fits).
            assert_eq!(store.read_stream("s", 1, 1, ALL).unwrap(), Slice { events: vec![events[0].clone()], more: false });
            let one = ReadLimit { max_events: 1, max_bytes: 1 << 20 };
            assert_eq!(store.read_partition(2, 1, u64::MAX, one).unwrap(), Slice { events: vec![events[0].clone()], more: true });
            let tiny = ReadLimit { max_events: 10, max_bytes: 1 };
            assert_eq!(store.read_stream("s", 1, u64::MAX, tiny).unwrap(), Slice { events: vec![events[0].clone()], more: true });
        };
        {
            let store = Store::open(dir.path(), &cfg(4)).unwrap();
            commit(&store, 1, &events);
            assert_eq!(store.tail_events(), 3, "nothing flushed yet: every entry is in the tail");
            check(&store);
        }
        // Reopened without a flush: the log is indexed again at open.
        let store = Store::open(dir.path(), &cfg(4)).unwrap();
        assert_eq!((store.last_seq_at_open(), store.indexed_through(), store.tail_events()), (3, 3, 0));
        check(&store);
    }

    #[test]
    fn given_events_split_between_the_index_and_the_tail_then_reads_stitch_them_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &cfg(2)).unwrap();
        commit(&store, 1, &[event(1, 1, "s", 1), event(0, 1, "u", 1), event(1, 2, "s", 2)]);
        assert_eq!(store.flush_index(2).unwrap(), 2, "only up to the given sequence");
        assert_eq!((store.indexed_through(), store.tail_events()), (2, 1));
        commit(&store, 4, &[event(1, 3, "s", 3), event(1, 4, "s", 4)]);
        assert_eq!(store.flush_index(2).unwrap(), 0, "an old sequence flushes nothing");
        // Partition 1: position 1 in the index, 2..=4 in the tail.
        let all = store.read_partition(1, 1, u64::MAX, ALL).unwrap();
        assert_eq!(positions(&all), vec![(1, 1), (1, 2), (1, 3), (1, 4)]);
        assert_eq!(positions(&store.read_partition(1, 1, 3, ALL).unwrap()), vec![(1, 1), (1, 2), (1, 3)]);
        let two = ReadLimit { max_events: 2, max_bytes: usize::MAX };
        assert_eq!(store.read_partition(1, 1, u64::MAX, two).unwrap(), Slice { events: all.events[..2].to_vec(), more: true });
        // Stream s: version 1 in the index, 2..=4 in the tail; cut at durable sequence 4.
        assert_eq!(versions(&store.read_stream("s", 1, u64::MAX, ALL).unwrap()), vec![1, 2, 3, 4]);
        assert_eq!(versions(&store.read_stream("s", 1, 4, ALL).unwrap()), vec![1, 2, 3]);
        assert_eq!(versions(&store.read_stream("s", 3, u64::MAX, ALL).unwrap()), vec![3, 4]);
        assert_eq!(store.stream_version("s").unwrap(), 4);
        assert_eq!(store.stream_version("u").unwrap(), 1, "a stream wholly in the index");
        // Everything flushed: the same answers from the index alone.
        assert_eq!(store.flush_index(5).unwrap(), 3);
        assert_eq!(store.tail_events(), 0);
        assert_eq!(store.read_partition(1, 1, u64::MAX, ALL).unwrap(), all);
        assert_eq!(versions(&store.read_stream("s", 2, u64::MAX, ALL).unwrap()), vec![2, 3, 4]);
        assert_eq!(store.stream_version("s").unwrap(), 4);
    }

    #[test]
    fn given_the_longest_stream_id_when_indexed_then_it_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &cfg(1)).unwrap();
        let stream = "x".repeat(MAX_STREAM_ID_BYTES);
        // A version of 8 significant bytes: the longest key encoding.
        let version = 1 << 60;
        commit(&store, 1, &[event(0, 1, &stream, version)]);
        assert_eq!(store.flush_index(1).unwrap(), 1, "an index key this long fits LMDB's limit");
        assert_eq!(versions(&store.read_stream(&stream, version, u64::MAX, ALL).unwrap()), vec![version]);
    }

    #[test]
    fn given_an_uncommitted_transaction_when_dropped_then_nothing_is_stored() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path(), &cfg(4)).unwrap();
            let mut w = store.write().unwrap();
            w.append(1, &event(0, 1, "s", 1).as_ref()).unwrap();
            drop(w);
            assert_eq!(store.stream_version("s").unwrap(), 0);
        }
        let store = Store::open(dir.path(), &cfg(4)).unwrap();
        assert_eq!(store.last_seq_at_open(), 0);
        assert_eq!(store.partition_heads(), vec![0; 4]);
    }

    #[test]
    fn given_a_deleted_index_when_reopened_then_it_is_rebuilt_from_the_log_in_chunks() {
        let dir = tempfile::tempdir().unwrap();
        // Ten events over 3 partitions and 2 streams, positions and versions dense.
        let (mut heads, mut versions) = ([0u64; 3], [0u64; 2]);
        let events: Vec<_> = (0..10usize)
            .map(|i| {
                let (p, s) = (i % 3, i % 2);
                heads[p] += 1;
                versions[s] += 1;
                event(p as u32, heads[p], &format!("s{s}"), versions[s])
            })
            .collect();
        {
            let store = Store::open(dir.path(), &cfg(3)).unwrap();
            commit(&store, 1, &events);
            store.flush_index(10).unwrap();
        }
        std::fs::remove_dir_all(dir.path().join("index")).unwrap();
        let store = Store::open(dir.path(), &StorageConfig { index_flush_events: 3, ..cfg(3) }).unwrap();
        assert_eq!((store.indexed_through(), store.tail_events()), (10, 0));
        assert_eq!(store.partition_heads(), heads.to_vec());
        assert_eq!(store.read_stream("s0", 1, u64::MAX, ALL).unwrap().events.len(), 5);
        for p in 0..3 {
            assert_eq!(store.read_partition(p, 1, u64::MAX, ALL).unwrap().events.len() as u64, heads[p as usize]);
        }
    }

    #[test]
    fn given_an_index_ahead_of_the_log_when_opened_then_it_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path(), &cfg(1)).unwrap();
            commit(&store, 1, &[event(0, 1, "s", 1)]);
            store.flush_index(1).unwrap();
        }
        std::fs::remove_dir_all(dir.path().join("log")).unwrap();
        let err = Store::open(dir.path(), &cfg(1)).err().unwrap();
        assert!(matches!(err, StorageError::IndexAhead { indexed_through: 1, last_seq: 0, .. }), "{err}");
        assert!(err.to_string().contains("the log lost committed events"), "{err}");
    }

    #[test]
    fn given_a_directory_of_format_1_when_opened_then_it_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("data.mdb"), b"").unwrap();
        let err = Store::open(dir.path(), &cfg(4)).err().unwrap();
        assert!(err.to_string().contains("has storage format 1, this node reads format 2"), "{err}");
    }

    #[test]
    fn given_another_partition_count_when_reopened_then_it_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        drop(Store::open(dir.path(), &cfg(4)).unwrap());
        let err = Store::open(dir.path(), &cfg(8)).err().unwrap();
        assert!(err.to_string().contains("created with 4 partitions"), "{err}");
    }

    #[test]
    fn given_an_open_store_when_opened_again_then_the_lock_refuses_it() {
        let dir = tempfile::tempdir().unwrap();
        let _store = Store::open(dir.path(), &cfg(4)).unwrap();
        assert!(matches!(Store::open(dir.path(), &cfg(4)), Err(StorageError::Locked(_))));
    }

    #[test]
    fn given_a_small_map_when_it_fills_then_it_grows_until_the_maximum_and_then_refuses() {
        let dir = tempfile::tempdir().unwrap();
        let config = StorageConfig { map_size_initial_bytes: 1 << 20, map_size_max_bytes: 4 << 20, ..cfg(1) };
        let store = Store::open(dir.path(), &config).unwrap();
        let mut grown = 0;
        let mut position = 1;
        loop {
            let mut big = event(0, position, "s", position);
            big.payload = vec![1; 64 << 10];
            let mut w = store.write().unwrap();
            match w.append(position, &big.as_ref()).and_then(|()| w.commit()) {
                Ok(()) => {
                    store.extend_tail([(0, position, "s", position, position)]);
                    position += 1;
                }
                Err(e) if e.is_map_full() => match store.grow_log_map(0) {
                    Ok(_) => grown += 1,
                    Err(StorageError::Full { max_bytes }) => {
                        assert_eq!(max_bytes, 4 << 20);
                        break;
                    }
                    Err(e) => panic!("{e}"),
                },
                Err(e) => panic!("{e}"),
            }
        }
        assert!(grown >= 2, "grew {grown} times");
        // Everything committed before the refusal is intact.
        assert_eq!(store.read_partition(0, 1, u64::MAX, ALL).unwrap().events.len() as u64, position - 1);
    }
}
