//! The single writer: group commit of appends into the log.
//!
//! One OS thread owns the log's only write transaction. It takes the first queued job (an append,
//! or a command of a domain), keeps taking more until the batch is full (`max_batch_events` /
//! `max_batch_bytes`) or `max_wait` has passed since the first, and runs the jobs *in order* in one
//! transaction: an append's expected version is checked against the store's versions plus the
//! batch's own earlier jobs (so two appends to one stream in one batch see each other); a command
//! is decided against the domain state as the batch has left it and its events are evolved into
//! that state (the LMAX processor, see `app/processor.rs`). Accepted events go at the end of the
//! log, each with the next global sequence. Then it commits, and hands the events' index entries
//! to the store's in-memory index tail, which the indexer thread (`indexer.rs`) moves to the index
//! environment later.
//!
//! Durability is split over two threads so that syncing one batch overlaps with building the next.
//! The store runs LMDB with `NO_META_SYNC`: the writer's commit writes the batch's data pages,
//! syncs them, writes the meta page (which makes the transaction part of the database after a
//! restart) and returns without syncing it. The committed batch goes to the syncer thread, which
//! calls `fdatasync` — once for every batch that queued up meanwhile — and only then publishes the
//! new heads and answers the appends. LMDB documents that the database stays intact under this flag
//! and that a machine crash can undo only commits whose meta page was not yet synced: exactly the
//! ones nobody was told about. Measured against LMDB's fully synced commit on the benchmark machine
//! in 4-second in-process runs (64 clients, single-event appends), this gave 27,500–29,500 events/s
//! against 23,500–25,900 (docs/architecture.md); a variant that waited for the *next* commit's sync
//! instead of syncing at once was slower than both.
//!
//! Invariants:
//! - an append is answered `Ok` only after a sync that started after its commit returned;
//! - readers and subscribers see events up to the published heads, published at that sync;
//! - batches are synced, published and answered in commit order, so heads only move forward;
//! - an append that fails its expected version, and a command that is rejected (or whose state
//!   cannot be read while deciding), writes nothing; the others in the batch go ahead;
//! - a command's events and its state changes commit in the same transaction;
//! - if the transaction fails, nothing of the batch is stored, the in-memory partition heads are
//!   left as they were, and every append of the batch gets the error;
//! - after an I/O failure of a commit or a sync, nothing more is written, published or
//!   acknowledged until the node restarts (see [`Poison`]);
//! - partition positions, stream versions and log sequences are assigned densely (next head,
//!   next version, next sequence); heads never move backwards (asserted before commit);
//! - a batch's index entries reach the tail before the batch goes to the syncer, so a published
//!   head never names an event that neither the index nor the tail can find;
//! - the writer does not commit while the index tail holds `storage.index_tail_max_events`
//!   (it waits for the indexer, see [`super::indexer::Room`]);
//! - a panic in the writer aborts the process: a node never serves on without its writer.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{oneshot, watch};

use heed::RwTxn;

use super::indexer::{Indexer, Room};
use super::{AppendError, AppendRequest, Appended, CommandDone, CommandError, CommitPoint, NewEvent, partitioning::partition_of};
use crate::app::StateError;
use crate::app::commands::{self, CommandRecord};
use crate::app::processor::{Executed, Failure, Routed};
use crate::config::GroupCommitConfig;
use crate::metrics::Metrics;
use crate::replication::EpochHistory;
use crate::security::keys::Keys;
use crate::storage::{Appender, EventRecord, Journal, PartitionImage, RecordRef, StorageError, Store, undo};

type Db = heed::Database<heed::types::Bytes, heed::types::Bytes>;

/// What one append is answered with.
type AppendOutcome = Result<Appended, AppendError>;
type CommandOutcome = Result<CommandDone, CommandError>;

/// What the writer runs: appends and commands share the queue and the group commit.
pub(super) enum Job {
    Append {
        request: AppendRequest,
        reply: oneshot::Sender<AppendOutcome>,
    },
    Command {
        command: Box<dyn Routed>,
        reply: oneshot::Sender<CommandOutcome>,
    },
    /// Persist the epoch a replica of a partition promised (docs/replication.md).
    Promise {
        partition: u32,
        epoch: u64,
        /// The partition's head once the promise is durable: every append placed before it.
        reply: oneshot::Sender<Result<u64, AppendError>>,
    },
    /// Events a replica receives from its partition's leader: appended at the leader's
    /// positions (the partition's next ones) with the leader's epochs and times.
    Replicate {
        records: Vec<EventRecord>,
        reply: oneshot::Sender<Result<u64, AppendError>>,
    },
    /// Remove a partition's events after a position (a replica reconciling with a new leader);
    /// run alone, between batches (see [`Writer::truncate`]).
    Truncate {
        partition: u32,
        after: u64,
        reply: oneshot::Sender<Result<usize, AppendError>>,
    },
    /// Give up a partition's committed events up to a position (retention); run alone.
    Trim {
        partition: u32,
        through: u64,
        reply: oneshot::Sender<Result<usize, AppendError>>,
    },
    /// Make the image of a partition (a replica's snapshot, `storage/image.rs`); run alone.
    Image {
        partition: u32,
        reply: oneshot::Sender<Result<PartitionImage, AppendError>>,
    },
    /// Replace a partition with an image another replica made; run alone.
    Install {
        image: Box<PartitionImage>,
        reply: oneshot::Sender<Result<u64, AppendError>>,
    },
}

/// A job's answer, kept until the batch is durable.
enum Outcome {
    Append(AppendOutcome),
    Command(CommandOutcome),
    /// The partition's position after a replicated job.
    Replicate(Result<u64, AppendError>),
    Promise(Result<u64, AppendError>),
}

impl Job {
    fn stream(&self) -> &str {
        match self {
            Job::Append { request, .. } => &request.stream,
            Job::Command { command, .. } => command.stream(),
            // Its own streams are looked up when it is placed.
            Job::Replicate { records, .. } => records.first().map_or("", |r| r.stream.as_str()),
            Job::Promise { .. } => "",
            Job::Truncate { .. } | Job::Trim { .. } | Job::Image { .. } | Job::Install { .. } => {
                unreachable!("a truncation, a trim or an image is never part of a batch")
            }
        }
    }
    /// Events the job adds (a command's are not known before it is decided: counted as one).
    fn events(&self) -> usize {
        match self {
            Job::Append { request, .. } => request.events.len(),
            Job::Command { .. }
            | Job::Truncate { .. }
            | Job::Trim { .. }
            | Job::Image { .. }
            | Job::Install { .. }
            | Job::Promise { .. } => 1,
            Job::Replicate { records, .. } => records.len(),
        }
    }
    fn bytes(&self) -> usize {
        match self {
            Job::Append { request, .. } => {
                request.events.iter().map(|e| e.payload.len() + e.event_type.len()).sum::<usize>() + request.stream.len()
            }
            Job::Command { command, .. } => command.size_bytes(),
            Job::Replicate { records, .. } => records.iter().map(|r| r.payload.len() + r.event_type.len() + r.stream.len()).sum(),
            Job::Truncate { .. } | Job::Trim { .. } | Job::Image { .. } | Job::Install { .. } | Job::Promise { .. } => 0,
        }
    }
    /// Answers the job. A failure of the whole batch (`failure`) overrides every outcome, a
    /// refusal too: a wrong expected version or a rejection was decided against state of this
    /// batch or an earlier one that never became durable, so it must not be shown either.
    fn answer(self, outcome: Outcome, failure: Option<&AppendError>) {
        if let Some(error) = failure {
            return self.fail(error.clone());
        }
        match (self, outcome) {
            (Job::Append { reply, .. }, Outcome::Append(outcome)) => {
                let _ = reply.send(outcome);
            }
            (Job::Command { reply, .. }, Outcome::Command(outcome)) => {
                let _ = reply.send(outcome);
            }
            (Job::Replicate { reply, .. }, Outcome::Replicate(outcome)) => {
                let _ = reply.send(outcome);
            }
            (Job::Promise { reply, .. }, Outcome::Promise(outcome)) => {
                let _ = reply.send(outcome);
            }
            _ => unreachable!("every job gets an outcome of its own kind"),
        }
    }
    /// Answers the job with the error that failed its whole batch.
    fn fail(self, error: AppendError) {
        match self {
            Job::Append { reply, .. } => {
                let _ = reply.send(Err(error));
            }
            Job::Command { reply, .. } => {
                let _ = reply.send(Err(CommandError::Failed(error)));
            }
            Job::Truncate { reply, .. } | Job::Trim { reply, .. } => {
                let _ = reply.send(Err(error));
            }
            Job::Image { reply, .. } => {
                let _ = reply.send(Err(error));
            }
            Job::Install { reply, .. } => {
                let _ = reply.send(Err(error));
            }
            Job::Replicate { reply, .. } => {
                let _ = reply.send(Err(error));
            }
            Job::Promise { reply, .. } => {
                let _ = reply.send(Err(error));
            }
        }
    }
}

/// Times a truncation grows a full map and tries again, and by how much each time.
const TRUNCATE_GROWTHS: usize = 8;
const TRUNCATE_GROWTH_BYTES: u64 = 256 << 20;

pub(super) struct Writer {
    /// Each partition's published head alone (moved with `published`).
    pub partition_heads: Arc<[watch::Sender<u64>]>,
    pub store: Arc<Store>,
    pub rx: flume::Receiver<Job>,
    pub config: GroupCommitConfig,
    pub heads: Vec<u64>,
    /// Each partition's epoch history, as committed.
    pub histories: Vec<EpochHistory>,
    /// The log's last sequence committed.
    pub last_seq: u64,
    /// The epoch each partition is appended to in (0: not led here).
    pub roles: Arc<super::Roles>,
    pub published: watch::Sender<CommitPoint>,
    pub metrics: Arc<Metrics>,
    pub poison: Arc<Poison>,
    /// How long accepted command ids are remembered.
    pub command_id_retention: Duration,
    /// Per partition, through which position the undo journal was pruned (`storage/undo.rs`).
    pub pruned: Vec<u64>,
    /// The tenants' data keys, once encryption at rest is on (`Log::set_keys`).
    pub keys: Arc<std::sync::OnceLock<Keys>>,
}

impl Writer {
    /// Runs until every sender is dropped and the queue is drained.
    pub fn run(mut self) {
        // An invariant broken here means the log can no longer be trusted in memory: stop the
        // process (a restart rebuilds the state from disk) rather than serve on without a writer.
        let _abort_on_panic = AbortOnPanic;
        let (to_syncer, committed) = flume::bounded::<Committed>(SYNC_QUEUE_BATCHES);
        // One pending kick is enough: the indexer looks at the whole tail when it wakes.
        let (kick, kicked) = flume::bounded::<()>(1);
        let room = Arc::new(Room::default());
        let poison = self.poison.clone();
        let indexer = Indexer {
            store: self.store.clone(),
            durable: self.published.subscribe(),
            kick: kicked,
            room: room.clone(),
            metrics: self.metrics.clone(),
            poison: poison.clone(),
        };
        let syncer = Syncer {
            partition_heads: self.partition_heads.clone(),
            store: self.store.clone(),
            published: self.published.clone(),
            metrics: self.metrics.clone(),
            poison: poison.clone(),
            kick: kick.clone(),
        };
        let tail_max_events = self.store.config().index_tail_max_events;
        std::thread::scope(|scope| {
            std::thread::Builder::new()
                .name("anthill-indexer".into())
                .spawn_scoped(scope, move || indexer.run())
                .expect("cannot start the indexer thread");
            std::thread::Builder::new()
                .name("anthill-syncer".into())
                .spawn_scoped(scope, move || syncer.run(&committed))
                .expect("cannot start the syncer thread");
            let mut batch = Vec::new();
            let mut carry = None;
            while let Some(first) = carry.take().or_else(|| self.rx.recv().ok()) {
                // Jobs that run alone, between group commits.
                let first = match first {
                    Job::Truncate { partition, after, reply } => {
                        let _ = reply.send(self.truncate(partition, after));
                        continue;
                    }
                    Job::Trim { partition, through, reply } => {
                        let _ = reply.send(self.trim(partition, through));
                        continue;
                    }
                    Job::Image { partition, reply } => {
                        let _ = reply.send(self.image(partition));
                        continue;
                    }
                    Job::Install { image, reply } => {
                        let _ = reply.send(self.install(&image));
                        continue;
                    }
                    first => first,
                };
                carry = self.collect(first, &mut batch);
                self.metrics.append_queue_depth.set(self.rx.len() as i64);
                let committed = match self.ready_to_commit(&room, &kick, tail_max_events) {
                    Err(error) => Err(error),
                    Ok(()) => self.commit_with_growth(&batch).map_err(|error| {
                        if error.is_io_failure() {
                            tracing::error!(error = %error, "commit failed on I/O; refusing all writes until the node restarts");
                            poison.set(error.clone());
                        }
                        AppendError::Storage(error)
                    }),
                };
                match committed {
                    Ok(outcomes) => {
                        self.store.refresh_log_sizes();
                        let jobs = std::mem::take(&mut batch);
                        let _ = to_syncer.send(Committed { jobs, outcomes, heads: self.heads.clone(), seq: self.last_seq });
                    }
                    Err(error) => {
                        for job in batch.drain(..) {
                            job.fail(error.clone());
                        }
                    }
                }
            }
            drop(to_syncer);
            drop(kick);
        });
        tracing::info!("append queue closed; writer stopped");
    }

    /// Removes `partition`'s events after `after`, alone: once every batch handed to the syncer
    /// is published (so no older heads are published after the new ones), the store truncates
    /// (`storage/truncate.rs`) and the partition's head moves back.
    fn truncate(&mut self, partition: u32, after: u64) -> Result<usize, AppendError> {
        let keys = self.keys.clone();
        let derived = crate::app::follow::DomainState { ids_since_us: self.ids_since_us(), keys: keys.get() };
        // Taking back a scope's state rewrites it in the truncation's transaction, which may not
        // fit the map.
        let removed =
            self.alone("a truncation", TRUNCATE_GROWTH_BYTES, |w| w.store.truncate_partition(partition, after, w.last_seq, &derived))?;
        let head = &mut self.heads[partition as usize];
        *head = (*head).min(after);
        self.histories[partition as usize].truncate_after(after);
        let heads: Arc<[u64]> = self.heads.as_slice().into();
        self.published.send_modify(|point| point.heads = heads);
        self.partition_heads[partition as usize].send_replace(self.heads[partition as usize]);
        Ok(removed)
    }

    /// Gives up `partition`'s events up to `through` (`storage/trim.rs`), alone, once everything
    /// committed is published; only what this node knows committed (its head on a single node).
    fn trim(&mut self, partition: u32, through: u64) -> Result<usize, AppendError> {
        if let Some(error) = poisoned_error(&self.poison) {
            return Err(error);
        }
        let committed = if self.roles.journaling() { self.roles.known_committed(partition) } else { self.heads[partition as usize] };
        if through > committed.min(self.heads[partition as usize]) {
            return Err(AppendError::Invalid(format!(
                "partition {partition}: cannot give up events through position {through}, past what is known committed ({committed})"
            )));
        }
        self.alone("trimming", TRUNCATE_GROWTH_BYTES, |w| w.store.trim_partition(partition, through, w.last_seq))
    }

    /// Runs `job` on the store alone: once every batch handed to the syncer is published, with
    /// readers held off (`Store::truncating`), growing a full map by `growth_bytes` and trying
    /// again (nothing of a failed attempt is stored), as the group commit does. An I/O failure
    /// poisons the log.
    fn alone<T>(&mut self, what: &str, growth_bytes: u64, mut job: impl FnMut(&Self) -> Result<T, StorageError>) -> Result<T, AppendError> {
        self.wait_published()?;
        let store = self.store.clone();
        let _readers_wait = store.truncating();
        let mut attempt = job(self);
        for _ in 0..TRUNCATE_GROWTHS {
            match &attempt {
                Err(e) if e.is_map_full() => {
                    if let Err(e) = self.store.grow_log_map(growth_bytes) {
                        attempt = Err(e);
                        break;
                    }
                    attempt = job(self);
                }
                _ => break,
            }
        }
        attempt.map_err(|e| {
            let e = Arc::new(e);
            if e.is_io_failure() {
                tracing::error!(error = %e, "{what} failed on I/O; refusing all writes until the node restarts");
                self.poison.set(e.clone());
            }
            AppendError::Storage(e)
        })
    }

    /// Waits until every batch handed to the syncer is published (durable).
    fn wait_published(&self) -> Result<(), AppendError> {
        while self.published.borrow().seq < self.last_seq {
            if let Some(error) = poisoned_error(&self.poison) {
                return Err(error);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        poisoned_error(&self.poison).map_or(Ok(()), Err)
    }

    /// The image of `partition` as of its head (`storage/image.rs`): everything in it durable.
    fn image(&mut self, partition: u32) -> Result<PartitionImage, AppendError> {
        if partition >= self.store.partition_count() {
            return Err(AppendError::Invalid(format!("partition {partition} does not exist")));
        }
        self.wait_published()?;
        let head = self.heads[partition as usize];
        let committed = if self.roles.journaling() { self.roles.known_committed(partition) } else { head };
        let keys = self.keys.clone();
        let derived = crate::app::follow::DomainState { ids_since_us: self.ids_since_us(), keys: keys.get() };
        self.store.partition_image(partition, head, committed, self.last_seq, &derived).map_err(|e| AppendError::Storage(Arc::new(e)))
    }

    /// Replaces a partition with `image` (`storage/image.rs`); returns its new head. Readers
    /// wait, as for a truncation.
    fn install(&mut self, image: &PartitionImage) -> Result<u64, AppendError> {
        let partition = image.partition;
        if partition >= self.store.partition_count() {
            return Err(AppendError::Invalid(format!("partition {partition} does not exist")));
        }
        let history = EpochHistory::try_from_starts(image.history.clone()).map_err(AppendError::Invalid)?;
        let keys = self.keys.clone();
        let derived = crate::app::follow::DomainState { ids_since_us: self.ids_since_us(), keys: keys.get() };
        let growth = image.encode().len() as u64 * 3 + TRUNCATE_GROWTH_BYTES;
        let entries = self.alone("installing a partition image", growth, |w| w.store.install_image(image, w.last_seq, &derived))?;
        self.last_seq += entries.len() as u64;
        self.store.extend_tail(entries.iter().map(|(p, position, stream, version, seq)| (*p, *position, stream.as_str(), *version, *seq)));
        self.heads[partition as usize] = image.position;
        self.histories[partition as usize] = history;
        let (heads, seq): (Arc<[u64]>, u64) = (self.heads.as_slice().into(), self.last_seq);
        self.published.send_modify(|point| {
            point.heads = heads;
            point.seq = seq;
        });
        self.partition_heads[partition as usize].send_replace(image.position);
        Ok(image.position)
    }

    /// Command ids recorded before this time (microseconds since the epoch) have expired.
    fn ids_since_us(&self) -> u64 {
        let now_us = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO).as_micros() as u64;
        now_us.saturating_sub(self.command_id_retention.as_micros() as u64)
    }

    /// Ok once a batch may be committed: the log is not poisoned and the index tail has room
    /// (waiting for the indexer while it has none).
    fn ready_to_commit(&self, room: &Room, kick: &flume::Sender<()>, tail_max_events: usize) -> Result<(), AppendError> {
        if let Some(error) = poisoned_error(&self.poison) {
            return Err(error);
        }
        if self.store.tail_events() >= tail_max_events {
            self.metrics.index_waits.inc();
            room.wait(&self.store, tail_max_events, kick, &self.poison).map_err(AppendError::Storage)?;
        }
        Ok(())
    }

    /// Fills `batch` starting with `first`; returns an append that did not fit, for the next one.
    fn collect(&self, first: Job, batch: &mut Vec<Job>) -> Option<Job> {
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
            if matches!(next, Job::Truncate { .. } | Job::Trim { .. } | Job::Image { .. } | Job::Install { .. })
                || events + next.events() > self.config.max_batch_events
                || bytes + next.bytes() > self.config.max_batch_bytes
            {
                return Some(next);
            }
            events += next.events();
            bytes += next.bytes();
            batch.push(next);
        }
    }

    /// Commits the batch, growing the log's map and retrying when it is full. On success the
    /// batch's index entries are in the tail and the writer's heads and sequence move on.
    fn commit_with_growth(&mut self, batch: &[Job]) -> Result<Vec<Outcome>, Arc<StorageError>> {
        let batch_bytes: usize = batch.iter().map(Job::bytes).sum();
        loop {
            let started = Instant::now();
            match self.commit(batch) {
                Ok(BatchCommit { outcomes, heads, entries, histories, pruned }) => {
                    for (partition, history) in histories {
                        self.histories[partition as usize] = history;
                    }
                    for (partition, through) in pruned {
                        self.pruned[partition as usize] = through;
                    }
                    let last_seq = self.last_seq + entries.len() as u64;
                    self.store.extend_tail(entries);
                    self.metrics.commit_seconds.observe(started.elapsed().as_secs_f64());
                    self.metrics.commits.inc();
                    let events: u64 = heads.iter().zip(&self.heads).map(|(after, before)| after - before).sum();
                    self.metrics.batch_events.observe(events as f64);
                    self.metrics.events_appended.inc_by(events);
                    debug_assert_eq!(last_seq - self.last_seq, events, "one sequence per event");
                    self.heads = heads;
                    self.last_seq = last_seq;
                    return Ok(outcomes);
                }
                Err(e) if e.is_map_full() => {
                    // Room for the batch at least three times over: values, keys and page splits.
                    if let Err(e) = self.store.grow_log_map(batch_bytes as u64 * 3) {
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

    /// Runs the batch's jobs in order in one transaction and commits. Nothing of the batch is
    /// stored when it fails.
    fn commit<'b>(&self, batch: &'b [Job]) -> Result<BatchCommit<'b>, StorageError> {
        let now_us = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO).as_micros() as u64;
        let streams: Vec<&str> = batch.iter().map(Job::stream).collect();
        // Versions as stored, one per job, taken before the batch moves any.
        let stored = self.store.stream_versions(&streams)?;
        let mut placer = Placer {
            heads: self.heads.clone(),
            seq: self.last_seq,
            moved: HashMap::new(),
            entries: Vec::new(),
            partition_count: self.store.partition_count(),
            epochs: self.roles.snapshot(),
            now_us,
            ids_since_us: now_us.saturating_sub(self.command_id_retention.as_micros() as u64),
            histories: &self.histories,
            changed_histories: BTreeMap::new(),
            journaling: self.roles.journaling(),
            keys: self.keys.get(),
        };
        let mut log_txn = self.store.write()?;
        let parts = log_txn.parts();
        let (txn, appender, state_db, undo_db, replicas) = (parts.txn, parts.appender, parts.state, parts.undo, parts.replicas);
        let mut outcomes = Vec::with_capacity(batch.len());
        let mut commands_run = 0;
        for (job, stored) in batch.iter().zip(stored) {
            let current = match placer.current(job.stream(), stored) {
                Ok(version) => version,
                // One stream's damaged index fails that job, not the whole batch.
                Err(e @ StorageError::Corrupt(_)) => {
                    let error = AppendError::Storage(Arc::new(e));
                    outcomes.push(match job {
                        Job::Append { .. } => Outcome::Append(Err(error)),
                        Job::Command { .. } => Outcome::Command(Err(CommandError::Failed(error))),
                        Job::Replicate { .. } => Outcome::Replicate(Err(error)),
                        Job::Promise { .. } => Outcome::Promise(Err(error)),
                        Job::Truncate { .. } | Job::Trim { .. } | Job::Image { .. } | Job::Install { .. } => {
                            unreachable!("a truncation, a trim or an image is never part of a batch")
                        }
                    });
                    continue;
                }
                Err(e) => return Err(e),
            };
            outcomes.push(match job {
                Job::Append { request, .. } => Outcome::Append(placer.append(txn, appender, request, current)?),
                Job::Command { command, .. } => {
                    commands_run += 1;
                    Outcome::Command(placer.command(txn, appender, (state_db, undo_db), command.as_ref(), current)?)
                }
                Job::Replicate { records, .. } => {
                    Outcome::Replicate(placer.replicate(txn, appender, (state_db, undo_db), &self.store, records)?)
                }
                Job::Promise { partition, epoch, .. } => {
                    if *partition >= placer.partition_count {
                        Outcome::Promise(Err(AppendError::Invalid(format!("partition {partition} does not exist"))))
                    } else {
                        replicas.put_promise(txn, *partition, *epoch)?;
                        Outcome::Promise(Ok(placer.heads[*partition as usize]))
                    }
                }
                Job::Truncate { .. } | Job::Trim { .. } | Job::Image { .. } | Job::Install { .. } => {
                    unreachable!("a truncation, a trim or an image is never part of a batch")
                }
            });
        }
        // More than the batch can have recorded, so expired records never pile up under load.
        let expire_max = commands::EXPIRE_PER_COMMIT + 2 * commands_run;
        commands::expire(txn, state_db, placer.ids_since_us, expire_max)?;
        for (before, after) in self.heads.iter().zip(&placer.heads) {
            assert!(after >= before, "partition head went backwards: {before} -> {after}");
        }
        for (partition, history) in &placer.changed_histories {
            replicas.put_history(txn, *partition, history)?;
        }
        // The undo records of appends this node now knows committed are never needed again.
        let mut pruned = Vec::new();
        if placer.journaling {
            for (partition, done) in self.pruned.iter().enumerate() {
                let committed = self.roles.known_committed(partition as u32);
                if committed > *done {
                    undo::prune(txn, undo_db, partition as u32, committed)?;
                    pruned.push((partition as u32, committed));
                }
            }
        }
        let Placer { heads, entries, changed_histories, .. } = placer;
        log_txn.commit()?;
        Ok(BatchCommit { outcomes, heads, entries, histories: changed_histories, pruned })
    }
}

/// Places a batch's events: partition positions, stream versions, log sequences, index entries.
struct Placer<'b, 'h> {
    heads: Vec<u64>,
    /// Each partition's epoch history as committed, and as this batch changed it.
    histories: &'h [EpochHistory],
    changed_histories: BTreeMap<u32, EpochHistory>,
    /// The log's last sequence used.
    seq: u64,
    /// Versions this batch already moved: later jobs on the same stream see them.
    moved: HashMap<&'b str, u64>,
    entries: Vec<(u32, u64, &'b str, u64, u64)>,
    partition_count: u32,
    /// The epoch each partition is appended to in, as the batch started (0: not led here).
    epochs: Vec<u64>,
    now_us: u64,
    /// Command ids recorded before this have expired.
    ids_since_us: u64,
    /// Appends that change state keep an undo journal (`storage/undo.rs`).
    journaling: bool,
    /// The tenants' data keys, with encryption at rest on: a book's events and state are sealed.
    keys: Option<&'h Keys>,
}

impl<'b> Placer<'b, '_> {
    /// The stream's version as the batch has left it so far.
    fn current(&self, stream: &str, stored: Result<u64, StorageError>) -> Result<u64, StorageError> {
        match self.moved.get(stream) {
            Some(version) => Ok(*version),
            None => stored,
        }
    }

    /// An append: checks its expected version, then places its events.
    fn append(
        &mut self,
        txn: &mut RwTxn<'_>,
        appender: &mut Appender,
        req: &'b AppendRequest,
        current: u64,
    ) -> Result<AppendOutcome, StorageError> {
        let partition = partition_of(&req.stream, self.partition_count);
        if self.epochs[partition as usize] == 0 {
            return Ok(Err(AppendError::NotLeader { partition }));
        }
        if !req.expected.allows(current) {
            return Ok(Err(AppendError::WrongExpectedVersion { stream: req.stream.clone(), expected: req.expected, actual: current }));
        }
        self.place(txn, appender, &req.stream, current, &req.events).map(Ok)
    }

    /// A command: runs it against state (see `app/processor.rs`), placing its events if accepted.
    fn command(
        &mut self,
        txn: &mut RwTxn<'_>,
        appender: &mut Appender,
        (state_db, undo_db): (Db, Db),
        command: &'b dyn Routed,
        current: u64,
    ) -> Result<CommandOutcome, StorageError> {
        let (now_us, ids_since_us, journaling) = (self.now_us, self.ids_since_us, self.journaling);
        let stream = command.stream();
        let partition = partition_of(stream, self.partition_count);
        let epoch = self.epochs[partition as usize];
        if epoch == 0 {
            return Ok(Err(CommandError::Failed(AppendError::NotLeader { partition })));
        }
        // With encryption on, the book's events and state are sealed with its tenant's key (the
        // API made sure it exists before sending the command).
        let data_key = match self.keys.map(|keys| keys.data_key(crate::security::auth::tenant_of(stream))) {
            None => None,
            Some(Ok(key)) => Some(key),
            Some(Err(error)) => return Ok(Err(CommandError::Failed(AppendError::TenantKey { stream: stream.to_string(), error }))),
        };
        let mut place = |txn: &mut RwTxn<'_>, events: Vec<NewEvent>| -> Result<CommandRecord, StateError> {
            let record = CommandRecord {
                partition: partition_of(stream, self.partition_count),
                first_position: 0,
                last_position: 0,
                stream_version: current,
                events: 0,
                recorded_at_us: now_us,
                command_hash: 0,
            };
            if events.is_empty() {
                return Ok(record);
            }
            let appended = self.place(txn, appender, stream, current, &events).map_err(|e| StateError::Log(Box::new(e)))?;
            Ok(CommandRecord {
                first_position: appended.first_position,
                last_position: appended.last_position,
                stream_version: appended.stream_version,
                events: events.len() as u32,
                ..record
            })
        };
        let mut journal = journaling.then(Journal::default);
        let executed = command.execute(txn, state_db, now_us, ids_since_us, journal.as_mut(), data_key.as_ref(), &mut place)?;
        if let (Some(journal), Ok(Executed::Accepted { record, .. })) = (&journal, &executed)
            && record.events > 0
        {
            undo::record(txn, undo_db, partition, record.last_position, journal)?;
        }
        Ok(match executed {
            Ok(Executed::Accepted { record, .. }) => Ok(CommandDone { record, duplicate: false, epoch }),
            Ok(Executed::Duplicate(record)) => Ok(CommandDone { record, duplicate: true, epoch }),
            Err(Failure::Rejected(rejected)) => Err(CommandError::Rejected(rejected)),
            Err(Failure::IdReused) => Err(CommandError::Rejected(crate::app::processor::Rejected::id_reused(command.command_id()))),
            Err(Failure::Unreadable(e)) => Err(CommandError::Failed(AppendError::Storage(Arc::new(e.into())))),
        })
    }

    /// A leader's events for one partition, at its positions: checked to continue the partition
    /// and each stream exactly, then appended with their own epochs and times. Nothing of the
    /// job is written when a check fails.
    fn replicate(
        &mut self,
        txn: &mut RwTxn<'_>,
        appender: &mut Appender,
        (state_db, undo_db): (Db, Db),
        store: &Store,
        records: &'b [EventRecord],
    ) -> Result<Result<u64, AppendError>, StorageError> {
        let Some(first) = records.first() else { return Ok(Err(AppendError::Invalid("a replicated batch needs events".into()))) };
        let partition = first.partition;
        if records.last().is_some_and(|r| r.atomic_with_next) {
            return Ok(Err(AppendError::Invalid(format!(
                "a replicated batch of partition {partition} ends inside an append (at position {}): appends are stored whole",
                records[records.len() - 1].position
            ))));
        }
        if partition >= self.partition_count {
            return Ok(Err(AppendError::Invalid(format!("partition {partition} does not exist"))));
        }
        let streams: Vec<&str> = records.iter().map(|r| r.stream.as_str()).collect();
        let stored = store.stream_versions(&streams)?;
        let mut versions: HashMap<&str, u64> = HashMap::new();
        let mut head = self.heads[partition as usize];
        let mut last_epoch = self.history(partition).last_epoch();
        // Each record read as its domain's event (None: of no domain), read once.
        let mut decoded = Vec::with_capacity(records.len());
        for (record, stored) in records.iter().zip(stored) {
            let current = match versions.get(record.stream.as_str()) {
                Some(v) => *v,
                None => self.current(&record.stream, stored)?,
            };
            if record.epoch < last_epoch {
                return Ok(Err(AppendError::Invalid(format!(
                    "replicated event at position {} has epoch {}, older than this replica's last epoch {last_epoch}",
                    record.position, record.epoch
                ))));
            }
            last_epoch = record.epoch;
            if record.partition != partition || record.position != head + 1 || record.stream_version != current + 1 {
                return Ok(Err(AppendError::Invalid(format!(
                    "replicated event {}@{} at partition {} position {} does not continue this replica (head {head}, stream version {current})",
                    record.stream, record.stream_version, record.partition, record.position
                ))));
            }
            head = record.position;
            versions.insert(&record.stream, record.stream_version);
            // A domain's event that cannot be read refuses the job here, before anything of it
            // is written; one that `evolve` refuses below fails the whole batch (like a command's).
            match crate::app::follow::decode(record, self.keys) {
                Ok(event) => decoded.push(event),
                Err(e) => return Ok(Err(AppendError::Invalid(format!("replicated event at position {}: {e}", record.position)))),
            }
        }
        // This batch starts an append: the replica's head ends one.
        let mut group_first = first.position;
        // What the append's events change in state, and whether any is a domain's.
        let (mut journal, mut derives) = (Journal::default(), false);
        for (record, event) in records.iter().zip(&decoded) {
            self.seq += 1;
            let stored = RecordRef {
                partition,
                position: record.position,
                stream: &record.stream,
                stream_version: record.stream_version,
                event_type: &record.event_type,
                payload: &record.payload,
                metadata: &record.metadata,
                append_time_us: record.append_time_us,
                epoch: record.epoch,
                atomic_with_next: record.atomic_with_next,
            };
            appender.append(txn, self.seq, &stored)?;
            self.entries.push((partition, record.position, &record.stream, record.stream_version, self.seq));
            self.moved.insert(&record.stream, record.stream_version);
            self.record_epoch(partition, record.epoch, record.position);
            // The follower's read models (app/follow.rs), in the transaction that stores the event.
            let noted = self.journaling.then_some(&mut journal);
            crate::app::follow::apply_decoded(txn, state_db, record, event.as_ref(), group_first, self.ids_since_us, noted)?;
            derives |= event.is_some();
            if !record.atomic_with_next {
                group_first = record.position + 1;
                if self.journaling && derives {
                    undo::record(txn, undo_db, partition, record.position, &journal)?;
                }
                (journal, derives) = (Journal::default(), false);
            }
        }
        self.heads[partition as usize] = head;
        Ok(Ok(head))
    }

    /// The partition's epoch history as this batch has left it.
    fn history(&self, partition: u32) -> &EpochHistory {
        self.changed_histories.get(&partition).unwrap_or(&self.histories[partition as usize])
    }

    /// Notes that the event at `position` of `partition` has `epoch`.
    fn record_epoch(&mut self, partition: u32, epoch: u64, position: u64) {
        if self.history(partition).last_epoch() == epoch {
            return;
        }
        let base = &self.histories[partition as usize];
        self.changed_histories.entry(partition).or_insert_with(|| base.clone()).record(epoch, position);
    }

    /// Appends `events` to `stream` (at version `current`) at the end of the log.
    fn place(
        &mut self,
        txn: &mut RwTxn<'_>,
        appender: &mut Appender,
        stream: &'b str,
        current: u64,
        events: &[NewEvent],
    ) -> Result<Appended, StorageError> {
        debug_assert!(!events.is_empty());
        let partition = partition_of(stream, self.partition_count);
        let first_position = self.heads[partition as usize] + 1;
        for (i, event) in events.iter().enumerate() {
            self.seq += 1;
            let record = RecordRef {
                partition,
                position: first_position + i as u64,
                stream,
                stream_version: current + 1 + i as u64,
                event_type: &event.event_type,
                payload: &event.payload,
                metadata: &event.metadata,
                append_time_us: self.now_us,
                epoch: self.epochs[partition as usize],
                atomic_with_next: i + 1 < events.len(),
            };
            appender.append(txn, self.seq, &record)?;
            self.entries.push((partition, record.position, stream, record.stream_version, self.seq));
            self.record_epoch(partition, self.epochs[partition as usize], record.position);
        }
        let n = events.len() as u64;
        self.heads[partition as usize] += n;
        self.moved.insert(stream, current + n);
        let epoch = self.epochs[partition as usize];
        Ok(Appended { partition, first_position, last_position: first_position + n - 1, stream_version: current + n, epoch })
    }
}

/// What a committed batch produced.
struct BatchCommit<'b> {
    /// One per append, in batch order.
    outcomes: Vec<Outcome>,
    /// Partition heads after the batch.
    heads: Vec<u64>,
    /// Each appended event's index entries, `(partition, position, stream, version, seq)`, in
    /// sequence order (from the log's last sequence + 1 on), as they were appended.
    entries: Vec<(u32, u64, &'b str, u64, u64)>,
    /// Epoch histories the batch changed.
    histories: BTreeMap<u32, EpochHistory>,
    /// Partitions whose undo journal the batch pruned, and through which position.
    pruned: Vec<(u32, u64)>,
}

/// Set once a commit or a sync failed with an I/O error. From then on nothing is written,
/// published or acknowledged until the node restarts: after a failed `fdatasync` the kernel may
/// have dropped the unwritten pages and report success to the next one (and the writer's and the
/// syncer's syncs can each consume the other's error), so no later success proves durability.
#[derive(Default)]
pub(crate) struct Poison {
    error: OnceLock<Arc<StorageError>>,
    /// Wakes every waiter when the log is poisoned (the node then reports itself not serving).
    pub(crate) poisoned: tokio::sync::Notify,
}

impl Poison {
    /// Records the first failure; later ones are the same story and are dropped.
    pub(super) fn set(&self, error: Arc<StorageError>) -> Arc<StorageError> {
        let first = self.error.get_or_init(|| error).clone();
        self.poisoned.notify_waiters();
        first
    }

    pub(crate) fn error(&self) -> Option<&Arc<StorageError>> {
        self.error.get()
    }
}

fn poisoned_error(poison: &Poison) -> Option<AppendError> {
    poison.error().map(|e| AppendError::Storage(e.clone()))
}

/// Batches the syncer may hold before the writer waits for it.
const SYNC_QUEUE_BATCHES: usize = 8;

/// A committed batch whose meta page still has to reach the disk.
struct Committed {
    jobs: Vec<Job>,
    outcomes: Vec<Outcome>,
    /// Partition heads once this batch is durable.
    heads: Vec<u64>,
    /// The log's last sequence once this batch is durable.
    seq: u64,
}

/// The syncer thread: syncs committed batches (one `fdatasync` for all that queued up), then
/// publishes and answers, and kicks the indexer when enough durable events wait for it.
struct Syncer {
    partition_heads: Arc<[watch::Sender<u64>]>,
    store: Arc<Store>,
    published: watch::Sender<CommitPoint>,
    metrics: Arc<Metrics>,
    poison: Arc<Poison>,
    kick: flume::Sender<()>,
}

impl Syncer {
    fn run(self, committed: &flume::Receiver<Committed>) {
        let _abort_on_panic = AbortOnPanic;
        let flush_events = self.store.config().index_flush_events;
        while let Ok(first) = committed.recv() {
            let mut batches = vec![first];
            batches.extend(committed.try_iter());
            let failure = match poisoned_error(&self.poison) {
                Some(error) => Some(error),
                None => {
                    let started = Instant::now();
                    let synced = self.store.sync_log();
                    self.metrics.sync_seconds.observe(started.elapsed().as_secs_f64());
                    synced.err().map(|e| {
                        let e = Arc::new(e);
                        tracing::error!(error = %e, "sync failed; refusing all writes until the node restarts");
                        AppendError::Storage(self.poison.set(e))
                    })
                }
            };
            if failure.is_none() {
                let last = batches.last().expect("at least one batch");
                self.published.send_if_modified(|point| {
                    let moved = point.seq != last.seq;
                    if moved {
                        debug_assert!(last.seq > point.seq, "the durable sequence only grows");
                        point.heads = last.heads.as_slice().into();
                        point.seq = last.seq;
                    }
                    moved
                });
                for (head, published) in last.heads.iter().zip(self.partition_heads.iter()) {
                    published.send_if_modified(|h| std::mem::replace(h, *head) != *head);
                }
                let tail_events = self.store.tail_events();
                self.metrics.index_tail_events.set(tail_events as i64);
                if tail_events >= flush_events {
                    let _ = self.kick.try_send(());
                }
            }
            let sizes = self.store.sizes();
            self.metrics.db_used_bytes.set(sizes.used_bytes as i64);
            self.metrics.map_size_bytes.set(sizes.map_size_bytes as i64);
            for batch in batches {
                for (job, outcome) in batch.jobs.into_iter().zip(batch.outcomes) {
                    job.answer(outcome, failure.as_ref());
                }
            }
        }
    }
}

pub(super) struct AbortOnPanic;

impl Drop for AbortOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            tracing::error!("the log writer panicked; aborting the process so a restart recovers from disk");
            std::process::abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::processor::Rejected;
    use crate::app::{Domain, ledger};

    fn command_job() -> (Job, oneshot::Receiver<CommandOutcome>) {
        let (reply, answer) = oneshot::channel();
        let command = crate::app::processor::Command::<ledger::Ledger>::new(
            "b".into(),
            Some("c-1".into()),
            ledger::LedgerCommand::CloseAccount { account: "a".into() },
        );
        assert_eq!(ledger::Ledger::NAME, "ledger");
        (Job::Command { command: Box::new(command), reply }, answer)
    }

    fn append_job() -> (Job, oneshot::Receiver<AppendOutcome>) {
        let (reply, answer) = oneshot::channel();
        (
            Job::Append {
                request: AppendRequest { stream: "s".into(), expected: super::super::ExpectedVersion::NoStream, events: vec![] },
                reply,
            },
            answer,
        )
    }

    #[test]
    fn given_a_failed_sync_then_refusals_decided_on_undurable_state_are_answered_with_the_failure_too() {
        let failure = AppendError::ShuttingDown;
        let (job, mut answer) = command_job();
        let rejected = Rejected::id_reused("c-1");
        job.answer(Outcome::Command(Err(CommandError::Rejected(rejected))), Some(&failure));
        assert!(matches!(answer.try_recv().unwrap(), Err(CommandError::Failed(AppendError::ShuttingDown))));

        let (job, mut answer) = append_job();
        let wrong = AppendError::WrongExpectedVersion { stream: "s".into(), expected: super::super::ExpectedVersion::NoStream, actual: 3 };
        job.answer(Outcome::Append(Err(wrong)), Some(&failure));
        assert!(matches!(answer.try_recv().unwrap(), Err(AppendError::ShuttingDown)));
    }

    #[test]
    fn given_a_durable_batch_then_each_job_gets_its_own_outcome() {
        let (job, mut answer) = command_job();
        job.answer(Outcome::Command(Err(CommandError::Rejected(Rejected::id_reused("c-1")))), None);
        assert!(matches!(answer.try_recv().unwrap(), Err(CommandError::Rejected(r)) if r.code == "CommandIdReused"));
    }
}
