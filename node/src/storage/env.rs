//! One LMDB environment with what every user of it needs: a gate that lets the map grow safely,
//! map growth up to a configured maximum, and size figures for metrics.
//!
//! The node opens two of these (see [`super`]): the log, written by the log's writer thread, and
//! the index, written by the indexer thread. Each has exactly one thread that writes it and so the
//! one thread that grows its map.
//!
//! Growing the map (`mdb_env_set_mapsize`) needs no transaction to be open in this process. The
//! `gate` lock makes every reader hold a shared guard for the (short) life of its transaction,
//! and anything else that reads through the map (a sync, the size figures) hold one too, while
//! the growing thread takes it exclusively. A thread never takes a second guard of the same gate.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use heed::{Env, EnvFlags, EnvOpenOptions, RoTxn, RwTxn, WithoutTls};
use parking_lot::{RwLock, RwLockReadGuard};

use super::StorageError;
use crate::config::StorageConfig;

const MAP_GROWTH_MAX_STEP_BYTES: u64 = 8 << 30;
const MAP_ALIGN_BYTES: u64 = 1 << 20;

pub(crate) struct Lmdb {
    env: Env<WithoutTls>,
    gate: RwLock<()>,
    map_size_max_bytes: u64,
    /// What this environment is, for logs: `log` or `index`.
    name: &'static str,
    /// Sizes as of the last [`Lmdb::refresh_sizes`].
    used_bytes: AtomicU64,
    map_size_bytes: AtomicU64,
}

/// A read transaction and the gate guard that keeps the map from moving under it. Field order
/// matters: the transaction is dropped before the guard.
pub(crate) struct Snapshot<'e> {
    pub txn: RoTxn<'e, WithoutTls>,
    _gate: RwLockReadGuard<'e, ()>,
}

impl Lmdb {
    /// Opens (creating if needed) the environment in `dir`.
    ///
    /// # Safety
    /// The caller guarantees no other process opens `dir` (the store's lock file does) and this
    /// process opens it once.
    pub unsafe fn open(dir: &Path, name: &'static str, flags: EnvFlags, max_dbs: u32, cfg: &StorageConfig) -> Result<Self, StorageError> {
        std::fs::create_dir_all(dir).map_err(|source| StorageError::DataDir { dir: dir.to_path_buf(), source })?;
        let env = unsafe {
            let mut options = EnvOpenOptions::new().read_txn_without_tls();
            options.flags(flags);
            options
                .map_size(align_up(cfg.map_size_initial_bytes.min(cfg.map_size_max_bytes)) as usize)
                .max_dbs(max_dbs)
                .max_readers(cfg.max_readers)
                .open(dir)?
        };
        let lmdb = Lmdb {
            env,
            gate: RwLock::new(()),
            map_size_max_bytes: cfg.map_size_max_bytes,
            name,
            used_bytes: AtomicU64::new(0),
            map_size_bytes: AtomicU64::new(0),
        };
        lmdb.refresh_sizes();
        Ok(lmdb)
    }

    pub fn env(&self) -> &Env<WithoutTls> {
        &self.env
    }

    /// A consistent snapshot. Keep it short-lived: it holds back map growth.
    pub fn read(&self) -> Result<Snapshot<'_>, StorageError> {
        let gate = self.gate.read();
        Ok(Snapshot { txn: self.env.read_txn()?, _gate: gate })
    }

    /// The write transaction. Only the environment's one writing thread calls this.
    pub fn write(&self) -> Result<RwTxn<'_>, StorageError> {
        Ok(self.env.write_txn()?)
    }

    /// Syncs everything committed so far (fdatasync), including the last meta page.
    pub fn sync(&self) -> Result<(), StorageError> {
        // LMDB reads the current meta page through the memory map here.
        let _gate = self.gate.read();
        self.env.force_sync()?;
        Ok(())
    }

    /// Bytes in use and the map's size, as of the last refresh.
    pub fn sizes(&self) -> (u64, u64) {
        (self.used_bytes.load(Ordering::Relaxed), self.map_size_bytes.load(Ordering::Relaxed))
    }

    /// Re-reads the size figures from LMDB.
    pub fn refresh_sizes(&self) {
        let _gate = self.gate.read();
        let info = self.env.info();
        let page_bytes = u64::from(self.env.stat().page_size);
        self.used_bytes.store((info.last_page_number as u64 + 1) * page_bytes, Ordering::Relaxed);
        self.map_size_bytes.store(info.map_size as u64, Ordering::Relaxed);
    }

    /// Grows the memory map so that at least `needed_bytes` more fit, or fails with
    /// [`StorageError::Full`] when that would pass the configured maximum. The caller (the one
    /// writing thread) must hold no transaction of this environment; readers are waited for.
    pub fn grow_map(&self, needed_bytes: u64) -> Result<u64, StorageError> {
        let _exclusive = self.gate.write();
        let current = self.env.info().map_size as u64;
        let step = current.clamp(MAP_ALIGN_BYTES, MAP_GROWTH_MAX_STEP_BYTES).max(needed_bytes);
        let target = align_up(current.saturating_add(step)).min(self.map_size_max_bytes / MAP_ALIGN_BYTES * MAP_ALIGN_BYTES);
        if target <= current {
            return Err(StorageError::Full { max_bytes: self.map_size_max_bytes });
        }
        // SAFETY: the exclusive gate guarantees no read transaction is open, and the caller holds
        // no write transaction.
        unsafe { self.env.resize(target as usize)? };
        self.map_size_bytes.store(target, Ordering::Relaxed);
        tracing::info!(env = self.name, from_bytes = current, to_bytes = target, "grew the LMDB map; writes continue");
        Ok(target)
    }
}

fn align_up(bytes: u64) -> u64 {
    bytes.div_ceil(MAP_ALIGN_BYTES).max(1) * MAP_ALIGN_BYTES
}
