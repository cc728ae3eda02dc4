//! The single writer: group commit of appends into LMDB.
//!
//! One OS thread owns the only write transaction. It takes the first queued append, keeps taking
//! more until the batch is full (`max_batch_events` / `max_batch_bytes`) or `max_wait` has passed
//! since the first, checks each append's expected version *in order against the transaction's own
//! view* (so two appends to one stream in one batch see each other), writes the events and commits.
//!
//! LMDB's default durability is kept: `commit` writes the data pages, syncs them, writes the meta
//! page and syncs again, and returns only then. A variant that pipelined the second sync into the
//! next commit (`NO_META_SYNC`, answering a batch after the following commit's sync) was measured
//! slower on this project's benchmark machine at every concurrency tried (docs/benchmarks.md), so
//! the simple, obviously durable order stays.
//!
//! Invariants:
//! - an append is answered `Ok` only after the transaction holding its events is durable;
//! - readers and subscribers see events up to the published heads, published after the commit;
//! - an append that fails its expected version writes nothing; the others in the batch go ahead;
//! - if the transaction fails, nothing of the batch is stored, the in-memory partition heads are
//!   left as they were, and every append of the batch gets the error;
//! - partition positions and stream versions are assigned densely (next head, next version);
//!   heads never move backwards (asserted before commit);
//! - a panic in the writer aborts the process: a node never serves on without its writer.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{oneshot, watch};

use super::{AppendError, AppendRequest, Appended, CommitPoint, partitioning::partition_of};
use crate::config::GroupCommitConfig;
use crate::metrics::Metrics;
use crate::storage::{RecordRef, StorageError, Store};

/// What one append is answered with.
type Outcome = Result<Appended, AppendError>;

pub(super) struct AppendJob {
    pub request: AppendRequest,
    pub reply: oneshot::Sender<Outcome>,
}

impl AppendJob {
    fn events(&self) -> usize {
        self.request.events.len()
    }
    fn bytes(&self) -> usize {
        self.request.events.iter().map(|e| e.payload.len() + e.event_type.len()).sum::<usize>() + self.request.stream.len()
    }
}

pub(super) struct Writer {
    pub store: Arc<Store>,
    pub rx: flume::Receiver<AppendJob>,
    pub config: GroupCommitConfig,
    pub heads: Vec<u64>,
    pub epoch: u64,
    pub published: watch::Sender<CommitPoint>,
    pub metrics: Arc<Metrics>,
}

impl Writer {
    /// Runs until every sender is dropped and the queue is drained.
    pub fn run(mut self) {
        // An invariant broken here means the log can no longer be trusted in memory: stop the
        // process (a restart rebuilds the state from disk) rather than serve on without a writer.
        let _abort_on_panic = AbortOnPanic;
        let mut batch = Vec::new();
        let mut carry = None;
        while let Some(first) = carry.take().or_else(|| self.rx.recv().ok()) {
            carry = self.collect(first, &mut batch);
            self.metrics.append_queue_depth.set(self.rx.len() as i64);
            match self.commit_with_growth(&batch) {
                Ok(outcomes) => {
                    // Durable now: readers may see it, then its appends are answered.
                    self.publish();
                    for (job, outcome) in batch.drain(..).zip(outcomes) {
                        // The caller may have gone away (deadline, cancel): its events are stored anyway.
                        let _ = job.reply.send(outcome);
                    }
                }
                Err(error) => {
                    for job in batch.drain(..) {
                        let _ = job.reply.send(Err(AppendError::Storage(error.clone())));
                    }
                }
            }
        }
        tracing::info!("append queue closed; writer stopped");
    }

    /// Fills `batch` starting with `first`; returns an append that did not fit, for the next one.
    fn collect(&self, first: AppendJob, batch: &mut Vec<AppendJob>) -> Option<AppendJob> {
        debug_assert!(batch.is_empty());
        let (mut events, mut bytes) = (first.events(), first.bytes());
        batch.push(first);
        let deadline = Instant::now() + self.config.max_wait();
        loop {
            let next = match self.rx.try_recv() {
                Ok(job) => job,
                Err(flume::TryRecvError::Disconnected) => return None,
                Err(flume::TryRecvError::Empty) if self.config.max_wait_us == 0 => return None,
                Err(flume::TryRecvError::Empty) => match self.rx.recv_deadline(deadline) {
                    Ok(job) => job,
                    Err(_) => return None,
                },
            };
            if events + next.events() > self.config.max_batch_events || bytes + next.bytes() > self.config.max_batch_bytes {
                return Some(next);
            }
            events += next.events();
            bytes += next.bytes();
            batch.push(next);
        }
    }

    /// Commits the batch durably, growing the LMDB map and retrying when it is full. On success
    /// the writer's heads move to the committed ones.
    fn commit_with_growth(&mut self, batch: &[AppendJob]) -> Result<Vec<Outcome>, Arc<StorageError>> {
        let batch_bytes: usize = batch.iter().map(AppendJob::bytes).sum();
        loop {
            let started = Instant::now();
            match self.commit(batch) {
                Ok((outcomes, heads)) => {
                    self.metrics.commit_seconds.observe(started.elapsed().as_secs_f64());
                    self.metrics.commits.inc();
                    let events: u64 = heads.iter().zip(&self.heads).map(|(after, before)| after - before).sum();
                    self.metrics.batch_events.observe(events as f64);
                    self.metrics.events_appended.inc_by(events);
                    self.heads = heads;
                    return Ok(outcomes);
                }
                Err(e) if e.is_map_full() => {
                    // Room for the batch at least three times over: values, indexes and page splits.
                    if let Err(e) = self.store.grow_map(batch_bytes as u64 * 3) {
                        tracing::error!(error = %e, "refusing writes: the database is full");
                        return Err(Arc::new(e));
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, appends = batch.len(), "group commit failed; nothing of it was stored, the appends get the error");
                    return Err(Arc::new(e));
                }
            }
        }
    }

    fn commit(&self, batch: &[AppendJob]) -> Result<(Vec<Outcome>, Vec<u64>), StorageError> {
        let partition_count = self.store.partition_count();
        let mut heads = self.heads.clone();
        let mut txn = self.store.write()?;
        let now_us = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO).as_micros() as u64;
        let mut results = Vec::with_capacity(batch.len());
        for job in batch {
            let req = &job.request;
            let partition = partition_of(&req.stream, partition_count);
            let current = txn.stream_version(&req.stream)?;
            if !req.expected.allows(current) {
                results.push(Err(AppendError::WrongExpectedVersion {
                    stream: req.stream.clone(),
                    expected: req.expected,
                    actual: current,
                }));
                continue;
            }
            let head = &mut heads[partition as usize];
            let first_position = *head + 1;
            for (i, event) in req.events.iter().enumerate() {
                let record = RecordRef {
                    stream: &req.stream,
                    stream_version: current + 1 + i as u64,
                    event_type: &event.event_type,
                    payload: &event.payload,
                    metadata: &event.metadata,
                    append_time_us: now_us,
                    epoch: self.epoch,
                };
                txn.put_event(partition, first_position + i as u64, &record)?;
            }
            *head += req.events.len() as u64;
            results.push(Ok(Appended {
                partition,
                first_position,
                last_position: *head,
                stream_version: current + req.events.len() as u64,
            }));
        }
        for (before, after) in self.heads.iter().zip(&heads) {
            assert!(after >= before, "partition head went backwards: {before} -> {after}");
        }
        txn.commit()?;
        Ok((results, heads))
    }

    /// Makes the writer's (durable) heads visible to readers and subscribers.
    fn publish(&mut self) {
        self.published.send_if_modified(|point| {
            let moved = *point.heads != *self.heads;
            if moved {
                point.seq += 1;
                point.heads = self.heads.as_slice().into();
            }
            moved
        });
        self.store.refresh_sizes();
        let sizes = self.store.sizes();
        self.metrics.db_used_bytes.set(sizes.used_bytes as i64);
        self.metrics.map_size_bytes.set(sizes.map_size_bytes as i64);
    }
}

struct AbortOnPanic;

impl Drop for AbortOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            tracing::error!("the log writer panicked; aborting the process so a restart recovers from disk");
            std::process::abort();
        }
    }
}
