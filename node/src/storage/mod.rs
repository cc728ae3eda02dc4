//! The node's one LMDB environment and the databases inside it.
//!
//! | database       | key (tuple, see [`keys`])  | value                                   |
//! |----------------|----------------------------|-----------------------------------------|
//! | `events`       | `(partition, position)`    | [`record::EventRecord`] stored form     |
//! | `streams`      | `(stream, version)`        | position, u64 big-endian                |
//! | `meta`         | `(name,)`                  | format version, partition count          |
//!
//! This module owns the key layout and the LMDB environment's life: opening it (exclusively,
//! through a lock file, so two nodes never share a data directory), growing its memory map, and
//! handing out read views and the one write transaction. It knows nothing of expected versions or
//! batching; [`crate::log`] owns those rules.
//!
//! Durability: a commit is atomic, and after `kill -9` the file holds exactly the transactions
//! that committed (the page cache survives a process crash). Against a machine crash the
//! environment uses `NO_META_SYNC`: a commit syncs its data pages before writing its meta page,
//! but leaves that page to the next sync ([`Store::sync`], or the next commit's). LMDB keeps the
//! database intact under this flag; a machine crash can undo only commits not yet synced, which
//! the log answers no one about before a sync (see `log/writer.rs`). Growing the map needs no
//! transaction to be open in this process;
//! the `gate` lock makes every reader hold a shared guard for the (short) life of its transaction
//! while the writer takes it exclusively to resize.

pub mod keys;
pub mod record;

use std::fs::{File, OpenOptions};
use std::ops::Bound;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use heed::types::Bytes;
use heed::{Database, Env, EnvFlags, EnvOpenOptions, RoTxn, RwTxn, WithoutTls};
use parking_lot::{RwLock, RwLockReadGuard};
use thiserror::Error;

use crate::config::StorageConfig;
use keys::{Elem, pack};
pub use record::{CorruptRecord, EventRecord, RecordRef};

/// Version of the on-disk layout described above; a node refuses a data directory of another.
const FORMAT_VERSION: u64 = 1;
const MAP_GROWTH_MAX_STEP_BYTES: u64 = 8 << 30;
const MAP_ALIGN_BYTES: u64 = 1 << 20;

#[derive(Debug, Error)]
pub enum StorageError {
    #[error("storage full: the database needs more than storage.map_size_max_bytes = {max_bytes} bytes; raise it or free disk space")]
    Full { max_bytes: u64 },
    #[error(
        "data directory {dir} was created with {stored} partitions, but the configuration asks for {configured}; the partition count is fixed when a cluster is created"
    )]
    PartitionCountMismatch { dir: PathBuf, stored: u32, configured: u32 },
    #[error("data directory {dir} has storage format {found}, this node reads format {FORMAT_VERSION}")]
    FormatMismatch { dir: PathBuf, found: u64 },
    #[error("data directory {0} is in use by another process (lock file held)")]
    Locked(PathBuf),
    #[error("cannot prepare data directory {dir}: {source}")]
    DataDir { dir: PathBuf, source: std::io::Error },
    #[error("cannot start the log writer thread: {0}")]
    WriterThread(std::io::Error),
    #[error(transparent)]
    Corrupt(#[from] CorruptRecord),
    #[error("LMDB: {0}")]
    Lmdb(#[from] heed::Error),
}

impl StorageError {
    /// An I/O failure of the file itself (a failed write or sync). After one, the kernel may
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
struct Dbs {
    events: Database<Bytes, Bytes>,
    streams: Database<Bytes, Bytes>,
    meta: Database<Bytes, Bytes>,
}

/// An open data directory.
pub struct Store {
    env: Env<WithoutTls>,
    dbs: Dbs,
    gate: RwLock<()>,
    partition_count: u32,
    map_size_max_bytes: u64,
    dir: PathBuf,
    /// Sizes as of the last [`Store::refresh_sizes`]: reading them from LMDB touches the memory
    /// map, which only the writer thread (the one thread that resizes it) may do unguarded.
    used_bytes: AtomicU64,
    map_size_bytes: AtomicU64,
    _lock: File,
}

/// How much of the memory map and the disk the database uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StorageSizes {
    pub used_bytes: u64,
    pub map_size_bytes: u64,
}

impl Store {
    /// Opens (creating if needed) the environment under `dir`.
    pub fn open(dir: &Path, cfg: &StorageConfig) -> Result<Self, StorageError> {
        let data_dir_err = |source| StorageError::DataDir { dir: dir.to_path_buf(), source };
        std::fs::create_dir_all(dir).map_err(data_dir_err)?;
        let lock = lock_data_dir(dir)?;
        let env = unsafe {
            // SAFETY: the lock file above guarantees no other process of ours opens this
            // directory, and this process opens it once per Store. NO_META_SYNC is safe as the
            // log uses it: nothing is acknowledged or shown to readers before a later sync.
            let mut options = EnvOpenOptions::new().read_txn_without_tls();
            options.flags(EnvFlags::NO_META_SYNC);
            options
                .map_size(align_up(cfg.map_size_initial_bytes.min(cfg.map_size_max_bytes)) as usize)
                .max_dbs(8)
                .max_readers(cfg.max_readers)
                .open(dir)?
        };
        let mut wtxn = env.write_txn()?;
        let dbs = Dbs {
            events: env.create_database(&mut wtxn, Some("events"))?,
            streams: env.create_database(&mut wtxn, Some("streams"))?,
            meta: env.create_database(&mut wtxn, Some("meta"))?,
        };
        let format_key = pack(&[Elem::Str("format_version")]);
        let partitions_key = pack(&[Elem::Str("partition_count")]);
        match dbs.meta.get(&wtxn, &format_key)?.map(be_u64) {
            None => {
                dbs.meta.put(&mut wtxn, &format_key, &FORMAT_VERSION.to_be_bytes())?;
                dbs.meta.put(&mut wtxn, &partitions_key, &u64::from(cfg.partitions).to_be_bytes())?;
            }
            Some(FORMAT_VERSION) => {}
            Some(found) => return Err(StorageError::FormatMismatch { dir: dir.to_path_buf(), found }),
        }
        let stored = dbs.meta.get(&wtxn, &partitions_key)?.map(be_u64).unwrap_or(0) as u32;
        if stored != cfg.partitions {
            return Err(StorageError::PartitionCountMismatch { dir: dir.to_path_buf(), stored, configured: cfg.partitions });
        }
        wtxn.commit()?;
        let store = Store {
            env,
            dbs,
            gate: RwLock::new(()),
            partition_count: cfg.partitions,
            map_size_max_bytes: cfg.map_size_max_bytes,
            dir: dir.to_path_buf(),
            used_bytes: AtomicU64::new(0),
            map_size_bytes: AtomicU64::new(0),
            _lock: lock,
        };
        store.refresh_sizes();
        Ok(store)
    }

    pub fn partition_count(&self) -> u32 {
        self.partition_count
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A consistent snapshot to read from. Keep it short-lived: it holds back map growth.
    pub fn read(&self) -> Result<ReadView<'_>, StorageError> {
        let gate = self.gate.read();
        let txn = self.env.read_txn()?;
        Ok(ReadView { txn, dbs: self.dbs, _gate: gate })
    }

    /// The write transaction. Only the log's single writer calls this.
    pub(crate) fn write(&self) -> Result<WriteTxn<'_>, StorageError> {
        Ok(WriteTxn { txn: self.env.write_txn()?, dbs: self.dbs, buf: Vec::with_capacity(512) })
    }

    /// Syncs everything committed so far (fdatasync), including the last meta page.
    pub(crate) fn sync(&self) -> Result<(), StorageError> {
        // LMDB reads the current meta page through the memory map here: hold the gate so the
        // writer cannot remap it (grow the map) meanwhile.
        let _gate = self.gate.read();
        self.env.force_sync()?;
        Ok(())
    }

    /// Sizes as of the writer's last commit.
    pub fn sizes(&self) -> StorageSizes {
        StorageSizes { used_bytes: self.used_bytes.load(Ordering::Relaxed), map_size_bytes: self.map_size_bytes.load(Ordering::Relaxed) }
    }

    /// Re-reads the sizes from LMDB. Only the writer thread calls this (or `open`, before anyone
    /// else can), so it never races with [`Store::grow_map`].
    pub(crate) fn refresh_sizes(&self) {
        let info = self.env.info();
        let page_bytes = u64::from(self.env.stat().page_size);
        self.used_bytes.store((info.last_page_number as u64 + 1) * page_bytes, Ordering::Relaxed);
        self.map_size_bytes.store(info.map_size as u64, Ordering::Relaxed);
    }

    /// Grows the memory map so that at least `needed_bytes` more fit, or fails with
    /// [`StorageError::Full`] when that would pass the configured maximum. The caller must hold no
    /// transaction; readers are waited for.
    pub(crate) fn grow_map(&self, needed_bytes: u64) -> Result<u64, StorageError> {
        let _exclusive = self.gate.write();
        let current = self.env.info().map_size as u64;
        let step = current.clamp(MAP_ALIGN_BYTES, MAP_GROWTH_MAX_STEP_BYTES).max(needed_bytes);
        let target = align_up(current.saturating_add(step)).min(self.map_size_max_bytes / MAP_ALIGN_BYTES * MAP_ALIGN_BYTES);
        if target <= current {
            return Err(StorageError::Full { max_bytes: self.map_size_max_bytes });
        }
        // SAFETY: the exclusive gate guarantees no read transaction is open, and the caller (the
        // single writer) holds no write transaction.
        unsafe { self.env.resize(target as usize)? };
        self.map_size_bytes.store(target, Ordering::Relaxed);
        tracing::info!(from_bytes = current, to_bytes = target, "grew the LMDB map; writes continue");
        Ok(target)
    }
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

fn align_up(bytes: u64) -> u64 {
    bytes.div_ceil(MAP_ALIGN_BYTES).max(1) * MAP_ALIGN_BYTES
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

/// A read snapshot. Field order matters: the transaction is dropped before the gate guard.
pub struct ReadView<'s> {
    txn: RoTxn<'s, WithoutTls>,
    dbs: Dbs,
    _gate: RwLockReadGuard<'s, ()>,
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

impl Slice {
    /// Adds one stored event unless the limit is reached; false (and `more` set) when it is.
    fn push_within(
        &mut self,
        limit: ReadLimit,
        bytes: &mut usize,
        value: &[u8],
        decode: impl FnOnce() -> Result<EventRecord, StorageError>,
    ) -> Result<bool, StorageError> {
        if self.events.len() >= limit.max_events || (!self.events.is_empty() && *bytes + value.len() > limit.max_bytes) {
            self.more = true;
            return Ok(false);
        }
        *bytes += value.len();
        self.events.push(decode()?);
        Ok(true)
    }
}

impl ReadView<'_> {
    /// Events of `partition` from `from_position` up to `until_position` (inclusive), within `limit`.
    pub fn read_partition(&self, partition: u32, from_position: u64, until_position: u64, limit: ReadLimit) -> Result<Slice, StorageError> {
        let from = from_position.max(1);
        let mut slice = Slice::default();
        if from > until_position {
            return Ok(slice);
        }
        let start = keys::event_key(partition, from);
        let end = match until_position.checked_add(1) {
            Some(next) => keys::event_key(partition, next),
            None => keys::partition_prefix(partition + 1),
        };
        let mut bytes = 0;
        for (expected, entry) in (from..).zip(self.dbs.events.range(&self.txn, &span(&start, &end))?) {
            let (key, value) = entry?;
            let corrupt = |reason| CorruptRecord { partition, position: expected, reason };
            let (p, position) = keys::decode_event_key(key).map_err(|_| corrupt("undecodable event key"))?;
            debug_assert_eq!(p, partition);
            // Positions are dense: a gap means the file lost an event.
            if position != expected {
                return Err(corrupt("gap in partition positions").into());
            }
            if !slice.push_within(limit, &mut bytes, value, || Ok(EventRecord::decode(partition, position, value)?))? {
                break;
            }
        }
        Ok(slice)
    }

    /// Events of `stream` (which lives in `partition`) from `from_version` on, within `limit`,
    /// stopping before the first event past `until_position` of the partition.
    pub fn read_stream(
        &self,
        partition: u32,
        stream: &str,
        from_version: u64,
        until_position: u64,
        limit: ReadLimit,
    ) -> Result<Slice, StorageError> {
        let from = from_version.max(1);
        let start = keys::stream_key(stream, from);
        let prefix = keys::stream_prefix(stream);
        let mut end = prefix.clone();
        end.push(0xFF);
        let mut slice = Slice::default();
        let mut bytes = 0;
        for (expected, entry) in (from..).zip(self.dbs.streams.range(&self.txn, &span(&start, &end))?) {
            let (key, position) = entry?;
            let position = be_u64(position);
            let corrupt = |reason| CorruptRecord { partition, position, reason };
            // Versions are dense: a gap means the index lost an entry.
            match keys::unpack(&key[prefix.len()..]).as_deref() {
                Ok([keys::Value::U64(version)]) if *version == expected => {}
                Ok([keys::Value::U64(_)]) => return Err(corrupt("gap in stream versions").into()),
                _ => return Err(corrupt("undecodable stream index key").into()),
            }
            if position > until_position {
                // Not yet published; the stream's visible end.
                break;
            }
            let value = self
                .dbs
                .events
                .get(&self.txn, &keys::event_key(partition, position))?
                .ok_or(corrupt("stream index points at a missing event"))?;
            if !slice.push_within(limit, &mut bytes, value, || Ok(EventRecord::decode(partition, position, value)?))? {
                break;
            }
        }
        Ok(slice)
    }

    /// The stream's current version (0 when it has no events).
    pub fn stream_version(&self, stream: &str) -> Result<u64, StorageError> {
        stream_version(&self.txn, self.dbs, stream)
    }

    /// Position of the last event of each partition (0 when empty), indexed by partition.
    pub fn partition_heads(&self, partition_count: u32) -> Result<Vec<u64>, StorageError> {
        (0..partition_count)
            .map(|p| {
                let range = keys::partition_prefix(p)..keys::partition_prefix(p + 1);
                match self.dbs.events.rev_range(&self.txn, &span(&range.start, &range.end))?.next() {
                    None => Ok(0),
                    Some(entry) => Ok(keys::decode_event_key(entry?.0)
                        .map_err(|_| CorruptRecord { partition: p, position: 0, reason: "undecodable event key" })?
                        .1),
                }
            })
            .collect()
    }
}

/// A stream's version is the version in its last `streams` key (0 when it has none): one B-tree
/// search, and no separate per-stream record to rewrite on every append.
fn stream_version(txn: &RoTxn<'_, WithoutTls>, dbs: Dbs, stream: &str) -> Result<u64, StorageError> {
    let prefix = keys::stream_prefix(stream);
    let mut end = prefix.clone();
    end.push(0xFF);
    let Some(entry) = dbs.streams.rev_range(txn, &span(&prefix, &end))?.next() else {
        return Ok(0);
    };
    let (key, position) = entry?;
    match keys::unpack(&key[prefix.len()..]).as_deref() {
        Ok([keys::Value::U64(version)]) => Ok(*version),
        _ => Err(CorruptRecord { partition: 0, position: be_u64(position), reason: "undecodable stream index key" }.into()),
    }
}

/// The single write transaction, with the operations the log's writer needs.
pub(crate) struct WriteTxn<'s> {
    txn: RwTxn<'s>,
    dbs: Dbs,
    buf: Vec<u8>,
}

impl WriteTxn<'_> {
    /// The stream's version as this transaction sees it, including its own uncommitted writes.
    pub fn stream_version(&self, stream: &str) -> Result<u64, StorageError> {
        stream_version(&self.txn, self.dbs, stream)
    }

    /// Writes one event and its index entries. The caller guarantees that `position` is the
    /// partition's next position and `record.stream_version` the stream's next version.
    pub fn put_event(&mut self, partition: u32, position: u64, record: &RecordRef<'_>) -> Result<(), StorageError> {
        record.encode_into(&mut self.buf);
        self.dbs.events.put(&mut self.txn, &keys::event_key(partition, position), &self.buf)?;
        self.dbs.streams.put(&mut self.txn, &keys::stream_key(record.stream, record.stream_version), &position.to_be_bytes())?;
        Ok(())
    }

    /// Commits: atomic, data pages synced; durable once [`Store::sync`] (or a later commit) ran.
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

    fn event(partition: u32, position: u64, stream: &str, version: u64) -> EventRecord {
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
        }
    }

    #[test]
    fn given_committed_events_when_reopened_then_they_read_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path(), &cfg(4)).unwrap();
            let mut w = store.write().unwrap();
            w.put_event(2, 1, &event(2, 1, "s", 1).as_ref()).unwrap();
            w.put_event(2, 2, &event(2, 2, "s", 2).as_ref()).unwrap();
            w.put_event(1, 1, &event(1, 1, "t", 1).as_ref()).unwrap();
            w.commit().unwrap();
        }
        let store = Store::open(dir.path(), &cfg(4)).unwrap();
        let view = store.read().unwrap();
        assert_eq!(view.partition_heads(4).unwrap(), vec![0, 1, 2, 0]);
        assert_eq!(view.stream_version("s").unwrap(), 2);
        let all = ReadLimit { max_events: 10, max_bytes: 1 << 20 };
        assert_eq!(view.read_partition(2, 2, u64::MAX, all).unwrap(), Slice { events: vec![event(2, 2, "s", 2)], more: false });
        assert_eq!(view.read_stream(2, "s", 0, u64::MAX, all).unwrap().events.len(), 2);
        assert!(view.read_stream(2, "s\0", 0, u64::MAX, all).unwrap().events.is_empty());
        // Cut by the position bound, by count, and by bytes (the first event always fits).
        assert_eq!(view.read_stream(2, "s", 1, 1, all).unwrap(), Slice { events: vec![event(2, 1, "s", 1)], more: false });
        let one = ReadLimit { max_events: 1, max_bytes: 1 << 20 };
        assert_eq!(view.read_partition(2, 1, u64::MAX, one).unwrap(), Slice { events: vec![event(2, 1, "s", 1)], more: true });
        let tiny = ReadLimit { max_events: 10, max_bytes: 1 };
        assert_eq!(view.read_stream(2, "s", 1, u64::MAX, tiny).unwrap(), Slice { events: vec![event(2, 1, "s", 1)], more: true });
    }

    #[test]
    fn given_an_uncommitted_transaction_when_dropped_then_nothing_is_stored() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &cfg(4)).unwrap();
        let mut w = store.write().unwrap();
        w.put_event(0, 1, &event(0, 1, "s", 1).as_ref()).unwrap();
        drop(w);
        assert_eq!(store.read().unwrap().stream_version("s").unwrap(), 0);
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
            let mut w = store.write().unwrap();
            let mut big = event(0, position, "s", position);
            big.payload = vec![1; 64 << 10];
            match w.put_event(0, position, &big.as_ref()).and_then(|()| w.commit()) {
                Ok(()) => position += 1,
                Err(e) if e.is_map_full() => match store.grow_map(0) {
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
        let view = store.read().unwrap();
        let all = ReadLimit { max_events: usize::MAX, max_bytes: usize::MAX };
        assert_eq!(view.read_partition(0, 1, u64::MAX, all).unwrap().events.len() as u64, position - 1);
    }
}
