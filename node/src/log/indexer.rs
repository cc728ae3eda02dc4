//! The indexer thread: moves index entries from memory into the index environment.
//!
//! The writer's group commits append events to the log only; their `(partition, position)` and
//! `(stream, version)` entries wait in the store's in-memory index tail (see `storage/mod.rs`).
//! This thread writes them to the index environment in large sorted batches: once
//! `storage.index_flush_events` durable events wait (the syncer kicks it), or every
//! `storage.index_flush_interval_ms` when fewer do, and once more when the log closes.
//!
//! Invariants:
//! - it indexes only events the syncer has published as durable, so the index never holds an
//!   entry for an event a machine crash could take out of the log;
//! - it is the index environment's only writer (and so the only thread that grows its map);
//! - a failed flush stops all writing: an I/O failure poisons the log like a failed log sync, and
//!   a full index map makes the writer refuse appends once the tail is full, since the tail could
//!   otherwise only grow;
//! - the writer waits ([`Room`]) while the tail holds `storage.index_tail_max_events`, so the
//!   memory held for unindexed events is bounded.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use tokio::sync::watch;

use super::CommitPoint;
use super::writer::{AbortOnPanic, Poison};
use crate::metrics::Metrics;
use crate::storage::{StorageError, Store};

/// Where the writer waits for room in the index tail.
#[derive(Default)]
pub(super) struct Room {
    lock: Mutex<()>,
    freed: Condvar,
    /// Set when the index environment cannot grow: the tail cannot drain any more.
    full: OnceLock<Arc<StorageError>>,
}

/// Longest single wait of the writer before it looks at the tail again (a kick may be lost when
/// the channel already holds one; this bounds the cost of that).
const ROOM_RECHECK: Duration = Duration::from_millis(100);

impl Room {
    /// Blocks while the tail holds `max_events` or more. `Err` when it never will drain: the log
    /// is poisoned or the index is full.
    pub fn wait(&self, store: &Store, max_events: usize, kick: &flume::Sender<()>, poison: &Poison) -> Result<(), Arc<StorageError>> {
        let mut guard = self.lock.lock();
        while store.tail_events() >= max_events {
            if let Some(error) = poison.error().or(self.full.get()) {
                return Err(error.clone());
            }
            let _ = kick.try_send(());
            self.freed.wait_for(&mut guard, ROOM_RECHECK);
        }
        Ok(())
    }

    fn notify(&self) {
        // Under the lock, so a waiter between its check and its wait cannot miss it.
        let _guard = self.lock.lock();
        self.freed.notify_all();
    }
}

pub(super) struct Indexer {
    pub store: Arc<Store>,
    pub durable: watch::Receiver<CommitPoint>,
    pub kick: flume::Receiver<()>,
    pub room: Arc<Room>,
    pub metrics: Arc<Metrics>,
    pub poison: Arc<Poison>,
}

impl Indexer {
    /// Runs until every kick sender is gone (the writer and the syncer stopped), then flushes
    /// what is durable one last time, so the next start has nothing to re-index.
    pub fn run(self) {
        let _abort_on_panic = AbortOnPanic;
        let config = self.store.config().clone();
        let mut last_flush = Instant::now();
        loop {
            let closed = matches!(self.kick.recv_timeout(config.index_flush_interval()), Err(flume::RecvTimeoutError::Disconnected));
            let durable = self.durable.borrow().seq;
            let waiting = durable.saturating_sub(self.store.indexed_through());
            let due = closed || waiting >= config.index_flush_events as u64 || last_flush.elapsed() >= config.index_flush_interval();
            if waiting > 0 && due && self.poison.error().is_none() && self.room.full.get().is_none() {
                self.flush(durable);
                last_flush = Instant::now();
            }
            if closed {
                break;
            }
        }
        tracing::info!(indexed_through = self.store.indexed_through(), "log closed; indexer stopped");
    }

    fn flush(&self, through_seq: u64) {
        let started = Instant::now();
        match self.store.flush_index(through_seq) {
            Ok(events) => {
                self.metrics.index_flush_seconds.observe(started.elapsed().as_secs_f64());
                self.metrics.index_flushed_events.inc_by(events as u64);
            }
            Err(error @ StorageError::Full { .. }) => {
                tracing::error!(error = %error, "the index is full; appends are refused once the index tail is full");
                let _ = self.room.full.set(Arc::new(error));
            }
            Err(error) => {
                tracing::error!(error = %error, "index flush failed; refusing all writes until the node restarts");
                self.poison.set(Arc::new(error));
            }
        }
        self.metrics.index_tail_events.set(self.store.tail_events() as i64);
        self.room.notify();
    }
}
