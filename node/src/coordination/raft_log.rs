//! The embedded coordination store's Raft log: raft-rs's in-memory storage, written through to
//! an LMDB environment so a member that restarts keeps its votes, its log and what it committed.
//!
//! Layout (`coordination/` beside the node's data): database `entries` maps a Raft index
//! (8 bytes big-endian) to the protobuf-encoded entry; `meta` holds the hard state (term, vote,
//! commit) and the configuration state. Every change is one LMDB transaction, committed with a
//! full sync before raft-rs is told it is stored (so before the messages that depend on it are
//! sent: raft-rs's `Ready` contract). Reads are served from the in-memory copy, loaded at open.
//!
//! Compaction: every so many applied entries the member takes a snapshot of the store's state
//! at its applied index ([`RaftLog::compact`], called by `embedded.rs`) and drops the entries
//! before that index, in one transaction; `meta` then holds the snapshot too. A member that
//! restarts starts from its snapshot and the entries after it; a member whose next entry the
//! leader no longer holds gets the leader's snapshot ([`Storage::snapshot`]) and replaces its
//! log with it ([`RaftLog::apply_snapshot`]). The entry at the snapshot's index is kept, so its
//! term is known without the snapshot's metadata.

use std::path::Path;

use heed::types::Bytes;
use heed::{Database, Env, EnvOpenOptions, WithoutTls};
use parking_lot::Mutex;
use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::storage::MemStorage;
use raft::{GetEntriesContext, RaftState, Storage};

use super::embedded::RaftId;

const MAP_SIZE_BYTES: usize = 1 << 30;

struct Disk {
    env: Env<WithoutTls>,
    entries: Database<Bytes, Bytes>,
    meta: Database<Bytes, Bytes>,
}

/// A Raft log in memory, optionally persisted to LMDB.
pub struct RaftLog {
    mem: MemStorage,
    disk: Option<Disk>,
    /// The latest snapshot (its data is the store's state), if the log was ever compacted.
    snapshot: Mutex<Option<Snapshot>>,
}

fn storage_error(e: impl std::fmt::Display) -> raft::Error {
    raft::Error::Store(raft::StorageError::Other(e.to_string().into()))
}

impl RaftLog {
    /// A log that lives in memory only (tests and the simulator).
    pub fn in_memory(members: &[RaftId]) -> Self {
        RaftLog { mem: MemStorage::new_with_conf_state((members.to_vec(), vec![])), disk: None, snapshot: Mutex::new(None) }
    }

    /// What a crash leaves of an in-memory log, for a member started anew on it (the
    /// simulator's restart): everything stored (raft-rs's entries wait in memory until the
    /// member stores them, before sending what depends on them).
    pub fn reopen(&self) -> Self {
        assert!(self.disk.is_none(), "only an in-memory log is reopened this way; an LMDB one is opened from its directory");
        RaftLog { mem: self.mem.clone(), disk: None, snapshot: Mutex::new(self.snapshot.lock().clone()) }
    }

    /// Opens (creating if needed) the log in `dir`. A new log starts with `members` as its
    /// configuration; an existing one keeps its own.
    pub fn open(dir: &Path, members: &[RaftId]) -> raft::Result<Self> {
        std::fs::create_dir_all(dir).map_err(storage_error)?;
        // SAFETY: the node's data-directory lock keeps other processes out, and a node opens its
        // coordination log once.
        let env =
            unsafe { EnvOpenOptions::new().read_txn_without_tls().map_size(MAP_SIZE_BYTES).max_dbs(2).open(dir) }.map_err(storage_error)?;
        let mut txn = env.write_txn().map_err(storage_error)?;
        let entries: Database<Bytes, Bytes> = env.create_database(&mut txn, Some("entries")).map_err(storage_error)?;
        let meta: Database<Bytes, Bytes> = env.create_database(&mut txn, Some("meta")).map_err(storage_error)?;
        let mem = MemStorage::new();
        let snapshot = match meta.get(&txn, b"snapshot").map_err(storage_error)? {
            Some(bytes) => Some(Snapshot::parse_from_bytes(bytes).map_err(storage_error)?),
            None => None,
        };
        let conf_state = match meta.get(&txn, b"conf_state").map_err(storage_error)? {
            Some(bytes) => ConfState::parse_from_bytes(bytes).map_err(storage_error)?,
            None => {
                let cs = ConfState { voters: members.to_vec(), ..ConfState::default() };
                meta.put(&mut txn, b"conf_state", &cs.write_to_bytes().map_err(storage_error)?).map_err(storage_error)?;
                cs
            }
        };
        let since = snapshot.as_ref().map_or(0, |s| s.get_metadata().index);
        {
            let mut core = mem.wl();
            if let Some(snapshot) = &snapshot {
                core.apply_snapshot(snapshot.clone())?;
            }
            core.set_conf_state(conf_state);
            if let Some(bytes) = meta.get(&txn, b"hard_state").map_err(storage_error)? {
                core.set_hardstate(HardState::parse_from_bytes(bytes).map_err(storage_error)?);
            }
            let mut stored = Vec::new();
            for entry in entries.iter(&txn).map_err(storage_error)? {
                let (_, bytes) = entry.map_err(storage_error)?;
                let entry = Entry::parse_from_bytes(bytes).map_err(storage_error)?;
                // The snapshot stands for its index and everything before it.
                if entry.index > since {
                    stored.push(entry);
                }
            }
            core.append(&stored)?;
        }
        txn.commit().map_err(storage_error)?;
        Ok(RaftLog { mem, disk: Some(Disk { env, entries, meta }), snapshot: Mutex::new(snapshot) })
    }

    /// The snapshot the log was last compacted to (or installed from a leader), if any.
    pub fn latest_snapshot(&self) -> Option<Snapshot> {
        self.snapshot.lock().clone()
    }

    /// Keeps `snapshot` (the store's state at an applied index) and drops the entries before its
    /// index, on disk in one transaction. The caller applied everything up to that index.
    pub fn compact(&self, snapshot: Snapshot) -> raft::Result<()> {
        let index = snapshot.get_metadata().index;
        if let Some(disk) = &self.disk {
            let mut txn = disk.env.write_txn().map_err(storage_error)?;
            disk.meta.put(&mut txn, b"snapshot", &snapshot.write_to_bytes().map_err(storage_error)?).map_err(storage_error)?;
            let conf_state = snapshot.get_metadata().get_conf_state();
            disk.meta.put(&mut txn, b"conf_state", &conf_state.write_to_bytes().map_err(storage_error)?).map_err(storage_error)?;
            let below = index.to_be_bytes();
            disk.entries
                .delete_range(&mut txn, &(std::ops::Bound::Unbounded, std::ops::Bound::Excluded(&below[..])))
                .map_err(storage_error)?;
            txn.commit().map_err(storage_error)?;
        }
        self.mem.wl().compact(index)?;
        *self.snapshot.lock() = Some(snapshot);
        Ok(())
    }

    /// Appends entries, replacing any stored from the first one's index on (a new leader's log
    /// wins over an old one's unstable suffix).
    pub fn append(&self, entries: &[Entry]) -> raft::Result<()> {
        let Some(first) = entries.first() else { return Ok(()) };
        if let Some(disk) = &self.disk {
            let mut txn = disk.env.write_txn().map_err(storage_error)?;
            let from = first.index.to_be_bytes();
            disk.entries
                .delete_range(&mut txn, &(std::ops::Bound::Included(&from[..]), std::ops::Bound::Unbounded))
                .map_err(storage_error)?;
            for entry in entries {
                disk.entries
                    .put(&mut txn, &entry.index.to_be_bytes(), &entry.write_to_bytes().map_err(storage_error)?)
                    .map_err(storage_error)?;
            }
            txn.commit().map_err(storage_error)?;
        }
        self.mem.wl().append(entries)
    }

    pub fn set_hardstate(&self, hard_state: HardState) -> raft::Result<()> {
        self.persist_hardstate(&hard_state)?;
        self.mem.wl().set_hardstate(hard_state);
        Ok(())
    }

    pub fn set_commit(&self, commit: u64) -> raft::Result<()> {
        let mut hard_state = self.mem.rl().hard_state().clone();
        hard_state.commit = commit;
        self.set_hardstate(hard_state)
    }

    fn persist_hardstate(&self, hard_state: &HardState) -> raft::Result<()> {
        if let Some(disk) = &self.disk {
            let mut txn = disk.env.write_txn().map_err(storage_error)?;
            disk.meta.put(&mut txn, b"hard_state", &hard_state.write_to_bytes().map_err(storage_error)?).map_err(storage_error)?;
            txn.commit().map_err(storage_error)?;
        }
        Ok(())
    }

    /// The group's configuration changed (a committed configuration change was applied): in
    /// memory only. The disk keeps it with the next snapshot ([`RaftLog::compact`]), which the
    /// member takes right after such a change; until then a restart replays the change from
    /// the log. Written at once, it could name a group ahead of the log, and a restarted leader
    /// would then feed a newcomer entries from index 1 (found by review).
    pub fn set_conf_state(&self, conf_state: ConfState) -> raft::Result<()> {
        self.mem.wl().set_conf_state(conf_state);
        Ok(())
    }

    /// Replaces the log with a leader's snapshot: the snapshot is kept with its configuration,
    /// every entry goes, and the hard state commits through the snapshot's index (one
    /// transaction on disk).
    pub fn apply_snapshot(&self, snapshot: Snapshot) -> raft::Result<()> {
        let mut core = self.mem.wl();
        core.apply_snapshot(snapshot.clone())?;
        if let Some(disk) = &self.disk {
            let mut txn = disk.env.write_txn().map_err(storage_error)?;
            disk.meta.put(&mut txn, b"snapshot", &snapshot.write_to_bytes().map_err(storage_error)?).map_err(storage_error)?;
            let conf_state = snapshot.get_metadata().get_conf_state();
            disk.meta.put(&mut txn, b"conf_state", &conf_state.write_to_bytes().map_err(storage_error)?).map_err(storage_error)?;
            disk.meta.put(&mut txn, b"hard_state", &core.hard_state().write_to_bytes().map_err(storage_error)?).map_err(storage_error)?;
            disk.entries.clear(&mut txn).map_err(storage_error)?;
            txn.commit().map_err(storage_error)?;
        }
        *self.snapshot.lock() = Some(snapshot);
        Ok(())
    }
}

impl Storage for RaftLog {
    fn initial_state(&self) -> raft::Result<RaftState> {
        self.mem.initial_state()
    }

    fn entries(&self, low: u64, high: u64, max_size: impl Into<Option<u64>>, context: GetEntriesContext) -> raft::Result<Vec<Entry>> {
        self.mem.entries(low, high, max_size, context)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        self.mem.term(idx)
    }

    fn first_index(&self) -> raft::Result<u64> {
        self.mem.first_index()
    }

    fn last_index(&self) -> raft::Result<u64> {
        self.mem.last_index()
    }

    /// The latest snapshot: raft-rs asks for one when a follower needs entries compacted away.
    fn snapshot(&self, _request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        self.latest_snapshot().ok_or(raft::Error::Store(raft::StorageError::SnapshotTemporarilyUnavailable))
    }
}
