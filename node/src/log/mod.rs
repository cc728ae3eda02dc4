//! The partitioned event log: the rules on top of [`crate::storage`].
//!
//! A [`Log`] validates appends against the configured limits, routes each stream to its partition
//! ([`partitioning`]), queues appends for the single group-commit [`writer`], and publishes the
//! committed head of every partition so reads and subscriptions know what is durable.
//!
//! Only durable events are ever visible: readers use LMDB snapshots (which never show an
//! uncommitted transaction) cut at the published [`CommitPoint`] (moved once a commit is synced),
//! and subscriptions wake when that point moves.

pub mod expected;
mod indexer;
pub mod partitioning;
pub mod retention;
mod writer;

use std::sync::Arc;

use parking_lot::Mutex;
use thiserror::Error;
use tokio::sync::{oneshot, watch};

use crate::app::commands::CommandRecord;
use crate::app::processor::{Rejected, Routed};
use crate::app::{StateView, state::subspace};
use crate::config::{AppConfig, GroupCommitConfig, LimitsConfig};
use crate::metrics::Metrics;
use crate::security::keys::{Keys, OpenError};
use crate::storage::{ReadLimit, Slice, StorageError, Store};
pub use expected::ExpectedVersion;
pub use partitioning::partition_of;

/// Longest metadata key (the stored format has room for 65,535 bytes; this keeps keys sane).
pub const MAX_METADATA_KEY_BYTES: usize = 1024;

/// The epoch stamped on events written by a single node. Replication will assign real epochs.
pub const SINGLE_NODE_EPOCH: u64 = 1;

/// One event to append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    pub event_type: String,
    pub payload: Vec<u8>,
    /// Sorted by key, keys unique.
    pub metadata: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppendRequest {
    pub stream: String,
    pub expected: ExpectedVersion,
    pub events: Vec<NewEvent>,
}

/// Where an acknowledged append landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    pub partition: u32,
    pub first_position: u64,
    pub last_position: u64,
    pub stream_version: u64,
    /// The epoch the events were appended in.
    pub epoch: u64,
}

/// What an accepted (or repeated) command did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommandDone {
    /// Where its events landed (the first result, for a duplicate).
    pub record: CommandRecord,
    /// The command id was seen before: nothing was decided or written now.
    pub duplicate: bool,
    /// The epoch this node led the partition in when it ran the command: its events (a
    /// duplicate's too, which this node's log holds) are committed once the partition is
    /// committed through them in that epoch.
    pub epoch: u64,
}

#[derive(Debug, Clone, Error)]
pub enum CommandError {
    /// The domain said no; nothing was written.
    #[error("rejected: {}: {}", .0.code, .0.message)]
    Rejected(Rejected),
    /// The command could not be run (invalid, storage, shutdown); nothing of it was written.
    #[error("{0}")]
    Failed(AppendError),
}

#[derive(Debug, Clone, Error)]
pub enum AppendError {
    #[error("{0}")]
    Invalid(String),
    #[error("wrong expected version for stream {stream:?}: expected {expected}, actual version {actual}")]
    WrongExpectedVersion { stream: String, expected: ExpectedVersion, actual: u64 },
    #[error("{0}")]
    Storage(Arc<StorageError>),
    #[error("the node is shutting down")]
    ShuttingDown,
    /// A `quorum` append's majority did not answer within [`QUORUM_WAIT`]; it may still commit.
    #[error("partition {partition}: no majority of its replicas acknowledged the append in time; it may still be committed")]
    QuorumTimeout { partition: u32 },
    /// The partition is led by another node (or by none right now): send it to its leader.
    /// Nothing of the request was written, so it is safe to send again.
    #[error("this node does not lead partition {partition} now; send the request to its leader")]
    NotLeader { partition: u32 },
    /// With encryption at rest, the stream's tenant key cannot be used here: it has not
    /// reached this node yet (retry), or the tenant was forgotten. Nothing was written.
    #[error("{stream}: {error}")]
    TenantKey { stream: String, error: crate::security::keys::OpenError },
    /// A `quorum` append was written here, but this node stopped leading the partition before a
    /// majority confirmed it: the new leader may or may not hold it.
    #[error(
        "partition {partition}: this node lost (or, its session with the coordination store lapsed, may have lost) the \
         leadership before a majority confirmed the append; it may or may not be committed \
         (retry with an expected version, or as a command with the same command id)"
    )]
    OutcomeUnknown { partition: u32 },
}

/// Which partitions this node may append to, and in which epoch: the leader's epoch of each
/// partition this node serves, 0 for the others. A single node serves all of them in
/// [`SINGLE_NODE_EPOCH`]; in a cluster the replication manager sets them.
pub struct Roles {
    epochs: Vec<std::sync::atomic::AtomicU64>,
    /// A leader handing its partition over: it still leads its epoch (its `quorum` appends
    /// still wait for their commit) but the writer takes no new appends.
    paused: Vec<std::sync::atomic::AtomicBool>,
    /// Until when the node's lease holds (`coordination/lease.rs`), in nanoseconds of
    /// [`monotonic_ns`]: past it the writer takes no new appends for any partition. `u64::MAX`
    /// without a coordination store (a single node).
    lease_until_ns: std::sync::atomic::AtomicU64,
    /// Per partition, the epoch the coordination store grants this node now, as its latest view
    /// says (0: none): the writer appends only in that epoch. `u64::MAX` without a store.
    granted: Vec<std::sync::atomic::AtomicU64>,
    /// Replicated: appends of domain streams keep an undo journal until committed
    /// (`storage/undo.rs`).
    journaling: std::sync::atomic::AtomicBool,
    /// Per partition, the highest position this node's replica reported committed.
    committed: Vec<std::sync::atomic::AtomicU64>,
}

impl Roles {
    pub fn new(partitions: u32, epoch: u64) -> Self {
        Roles {
            epochs: (0..partitions).map(|_| std::sync::atomic::AtomicU64::new(epoch)).collect(),
            paused: (0..partitions).map(|_| std::sync::atomic::AtomicBool::new(false)).collect(),
            lease_until_ns: std::sync::atomic::AtomicU64::new(u64::MAX),
            granted: (0..partitions).map(|_| std::sync::atomic::AtomicU64::new(u64::MAX)).collect(),
            journaling: std::sync::atomic::AtomicBool::new(false),
            committed: (0..partitions).map(|_| std::sync::atomic::AtomicU64::new(0)).collect(),
        }
    }

    /// Whether appends that change state keep an undo journal (a replicated node).
    pub fn journaling(&self) -> bool {
        self.journaling.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The highest position of `partition` this node knows committed (0 on a single node).
    pub fn known_committed(&self, partition: u32) -> u64 {
        self.committed[partition as usize].load(std::sync::atomic::Ordering::Acquire)
    }

    /// Stops (or resumes) the writer taking appends for `partition`, whose leader it stays.
    pub fn pause(&self, partition: u32, paused: bool) {
        self.paused[partition as usize].store(paused, std::sync::atomic::Ordering::Release);
    }

    /// From now on the node's partitions are owned through a coordination store: no lease and
    /// no grant yet, so nothing is appended until the store grants it and a round renews the
    /// lease.
    pub fn use_coordination(&self) {
        self.lease_until_ns.store(0, std::sync::atomic::Ordering::Release);
        for granted in &self.granted {
            granted.store(0, std::sync::atomic::Ordering::Release);
        }
    }

    /// The node's lease holds until `until` (`coordination/lease.rs`); after it, the writer
    /// takes no new appends for any partition, which the node may still lead.
    pub fn set_lease_until(&self, until: std::time::Instant) {
        self.lease_until_ns.store(monotonic_ns(until), std::sync::atomic::Ordering::Release);
    }

    /// Whether the lease lapsed (never on a single node).
    pub fn lease_lapsed(&self) -> bool {
        monotonic_ns(std::time::Instant::now()) >= self.lease_until_ns.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The coordination store grants this node `partition` in `epoch` now (0: not at all).
    pub fn set_granted(&self, partition: u32, epoch: u64) {
        self.granted[partition as usize].store(epoch, std::sync::atomic::Ordering::Release);
    }

    /// Whether this node leads any partition (in some epoch, paused or not).
    pub fn leads_any(&self) -> bool {
        (0..self.epochs.len() as u32).any(|p| self.epoch(p) > 0)
    }

    /// Whether appends of `partition` in `epoch` must stop: the lease lapsed, or the store no
    /// longer grants this node that epoch (it was deposed, or its session expired and was made
    /// anew while its replica still leads the old epoch).
    pub fn deposed(&self, partition: u32, epoch: u64) -> bool {
        let granted = self.granted[partition as usize].load(std::sync::atomic::Ordering::Acquire);
        self.lease_lapsed() || (granted != u64::MAX && granted != epoch)
    }

    /// The epoch this node appends to `partition` in, 0 when it does not lead it.
    pub fn epoch(&self, partition: u32) -> u64 {
        self.epochs[partition as usize].load(std::sync::atomic::Ordering::Acquire)
    }

    /// This node appends to `partition` in `epoch` (0: not at all), not paused.
    pub fn set(&self, partition: u32, epoch: u64) {
        self.paused[partition as usize].store(false, std::sync::atomic::Ordering::Release);
        self.epochs[partition as usize].store(epoch, std::sync::atomic::Ordering::Release);
    }

    /// What the writer appends in: each partition's epoch, 0 where it does not lead, is paused
    /// or is [`Roles::deposed`].
    fn snapshot(&self) -> Vec<u64> {
        (0..self.epochs.len() as u32)
            .map(|p| {
                let epoch = self.epoch(p);
                if self.paused[p as usize].load(std::sync::atomic::Ordering::Acquire) || self.deposed(p, epoch) { 0 } else { epoch }
            })
            .collect()
    }
}

/// What a partition's replica on this node knows of its replication.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplicaReport {
    /// Every event up to here is on a majority of the replica set.
    pub commit: u64,
    /// On the leader: each follower's node id and the position up to which it durably holds
    /// the leader's log. Empty elsewhere.
    pub followers: Vec<(u32, u64)>,
}

/// The committed state that readers and subscribers may see.
#[derive(Debug, Clone)]
pub struct CommitPoint {
    /// Position of the last durable event of each partition, indexed by partition.
    pub heads: Arc<[u64]>,
    /// The log sequence of the last durable event.
    pub seq: u64,
}

/// An append the writer has queued; [`PendingAppend::outcome`] waits for its answer.
pub struct PendingAppend {
    answer: oneshot::Receiver<Result<Appended, AppendError>>,
    metrics: Arc<Metrics>,
}

impl PendingAppend {
    /// Resolves once the events are durable (`Ok`) or the append failed; counts the outcome.
    pub async fn outcome(self) -> Result<Appended, AppendError> {
        let outcome = self.answer.await.map_err(|_| AppendError::ShuttingDown).and_then(|outcome| outcome);
        self.metrics.count_append(outcome.as_ref().map_or_else(failure_label, |_| "ok"));
        outcome
    }
}

/// The `outcome` label of `anthill_append_requests_total` for a failed append.
fn failure_label(error: &AppendError) -> &'static str {
    match error {
        AppendError::WrongExpectedVersion { .. } => "wrong_expected_version",
        AppendError::Invalid(_) => "invalid",
        _ => "error",
    }
}

pub struct Log {
    store: Arc<Store>,
    limits: LimitsConfig,
    queue: Mutex<Option<flume::Sender<writer::Job>>>,
    commits: watch::Receiver<CommitPoint>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    metrics: Arc<Metrics>,
    poison: Arc<writer::Poison>,
    roles: Arc<Roles>,
    /// Per partition, `(epoch, position)`: how far this node, leading in `epoch`, knows the
    /// partition committed by a majority. Unused by a single node (see [`Log::wait_quorum`]).
    committed: Vec<watch::Sender<(u64, u64)>>,
    /// What this node's replica of each partition last reported, for `Node.Status`.
    replica_reports: parking_lot::Mutex<Vec<ReplicaReport>>,
    /// Bumped whenever a partition's reported commit position moves (subscribers wake on it).
    commit_moved: watch::Sender<u64>,
    /// Each partition's published head alone: a partition's leader wakes only when its own moves.
    partition_heads: Arc<[watch::Sender<u64>]>,
    /// Per partition, how many truncations it went through: an answer decided against state
    /// that a truncation then undid is not given (see [`Log::query`]).
    truncations: Vec<std::sync::atomic::AtomicU64>,
    replicated: std::sync::atomic::AtomicBool,
    /// Per partition, where this node's replica takes linearizable read requests.
    read_indexes: parking_lot::Mutex<Vec<Option<tokio::sync::mpsc::Sender<ReadIndexRequest>>>>,
    /// The tenants' data keys, with encryption at rest on ([`Log::set_keys`]): domains' events
    /// and state are sealed with them.
    keys: Arc<std::sync::OnceLock<Keys>>,
}

/// A linearizable read's request to its partition's replica: answered with the position to read
/// up to once a majority confirmed the leadership, or `None` when this node does not serve the
/// partition (docs/replication.md, "Reads").
pub type ReadIndexRequest = oneshot::Sender<Option<u64>>;

/// Nanoseconds from the first call in this process to `at` (0 before it): a clock that atomics
/// can hold.
fn monotonic_ns(at: std::time::Instant) -> u64 {
    static ORIGIN: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let origin = *ORIGIN.get_or_init(std::time::Instant::now);
    at.saturating_duration_since(origin).as_nanos().min(u128::from(u64::MAX - 1)) as u64
}

/// How long an append waits for its partition's majority before it gives up.
pub const QUORUM_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

impl Log {
    /// Starts the writer over an open store.
    pub fn start(
        store: Arc<Store>,
        group_commit: &GroupCommitConfig,
        limits: &LimitsConfig,
        app: &AppConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Self, StorageError> {
        // `Store::open` synced the log and indexed it: everything in it is durable and findable.
        let heads = store.partition_heads();
        let last_seq = store.last_seq_at_open();
        let histories = (0..store.partition_count()).map(|p| store.epoch_history(p)).collect::<Result<Vec<_>, _>>()?;
        let (published, commits) = watch::channel(CommitPoint { heads: heads.clone().into(), seq: last_seq });
        let (tx, rx) = flume::bounded(group_commit.queue_capacity);
        let poison = Arc::new(writer::Poison::default());
        let roles = Arc::new(Roles::new(store.partition_count(), SINGLE_NODE_EPOCH));
        let partition_heads: Arc<[watch::Sender<u64>]> = heads.iter().map(|h| watch::Sender::new(*h)).collect();
        let keys = Arc::new(std::sync::OnceLock::new());
        let writer = writer::Writer {
            keys: keys.clone(),
            partition_heads: partition_heads.clone(),
            store: store.clone(),
            rx,
            config: group_commit.clone(),
            heads,
            histories,
            last_seq,
            roles: roles.clone(),
            published,
            metrics: metrics.clone(),
            poison: poison.clone(),
            command_id_retention: app.command_id_retention(),
            pruned: vec![0; store.partition_count() as usize],
        };
        let handle =
            std::thread::Builder::new().name("anthill-writer".into()).spawn(move || writer.run()).map_err(StorageError::WriterThread)?;
        Ok(Log {
            store,
            limits: limits.clone(),
            queue: Mutex::new(Some(tx)),
            commits,
            writer: Mutex::new(Some(handle)),
            metrics,
            poison,
            committed: (0..roles.epochs.len()).map(|_| watch::Sender::new((0, 0))).collect(),
            replica_reports: parking_lot::Mutex::new(vec![ReplicaReport::default(); roles.epochs.len()]),
            commit_moved: watch::Sender::new(0),
            read_indexes: parking_lot::Mutex::new(vec![None; roles.epochs.len()]),
            truncations: (0..roles.epochs.len()).map(|_| std::sync::atomic::AtomicU64::new(0)).collect(),
            partition_heads,
            roles,
            replicated: std::sync::atomic::AtomicBool::new(false),
            keys,
        })
    }

    /// Turns encryption at rest on for the domains (the ledger): from now on the writer seals
    /// the events and state values of a book with its tenant's data key, and opens them where
    /// it follows a leader or re-applies events. Set once, before the node serves; a domain's
    /// sealed event that arrives earlier is refused and replicated again later.
    pub fn set_keys(&self, keys: Keys) {
        if self.keys.set(keys).is_err() {
            tracing::warn!("the log's keys were set already; the first ones stay");
        }
    }

    /// This node's partitions are replicated (a cluster): `quorum` appends wait for a majority.
    pub fn set_replicated(&self) {
        self.roles.journaling.store(true, std::sync::atomic::Ordering::Release);
        self.replicated.store(true, std::sync::atomic::Ordering::Release);
    }

    /// The replication shell reports that, leading `partition` in `epoch`, it knows a majority
    /// holds everything up to `position`.
    pub fn publish_commit(&self, partition: u32, epoch: u64, position: u64) {
        self.committed[partition as usize].send_if_modified(|current| {
            let changed = *current != (epoch, position);
            *current = (epoch, position);
            changed
        });
    }

    /// The position up to which readers of `partition` see its events here: everything durable
    /// when this node leads it (or is a single node), else only what it knows committed, which
    /// may trail the leader by the follower's lag (docs/replication.md, "Reads").
    pub fn readable_through(&self, partition: u32) -> u64 {
        let head = self.commits.borrow().heads[partition as usize];
        if !self.replicated.load(std::sync::atomic::Ordering::Acquire) || self.roles.epoch(partition) != 0 {
            return head;
        }
        head.min(self.replica_reports.lock()[partition as usize].commit)
    }

    /// Whether this node serves `partition` as its leader (a single node leads them all).
    pub fn leads(&self, partition: u32) -> bool {
        self.roles.epoch(partition) != 0
    }

    /// Records what this node's replica of `partition` knows (the replication shell calls it).
    pub fn report_replica(&self, partition: u32, report: ReplicaReport) {
        self.roles.committed[partition as usize].fetch_max(report.commit, std::sync::atomic::Ordering::AcqRel);
        let mut reports = self.replica_reports.lock();
        let current = &mut reports[partition as usize];
        if *current != report {
            let moved = current.commit != report.commit;
            *current = report;
            drop(reports);
            if moved {
                self.commit_moved.send_modify(|n| *n += 1);
            }
        }
    }

    /// Through which position `partition`'s events are committed here: its head on a single
    /// node; in a cluster, what this node's replica knows committed (leader or follower).
    /// Subscriptions deliver up to it, so no subscriber ever sees an event a failover undoes.
    pub fn committed_through(&self, partition: u32) -> u64 {
        let head = self.commits.borrow().heads[partition as usize];
        if !self.replicated.load(std::sync::atomic::Ordering::Acquire) {
            return head;
        }
        head.min(self.replica_reports.lock()[partition as usize].commit)
    }

    /// Where `partition`'s replica takes linearizable read requests (the replication shell).
    pub fn serve_read_index(&self, partition: u32, requests: tokio::sync::mpsc::Sender<ReadIndexRequest>) {
        self.read_indexes.lock()[partition as usize] = Some(requests);
    }

    /// The position through which a linearizable read of `partition` must see its events: on a
    /// single node its head (everything durable is committed); in a cluster, the commit position
    /// of its leader, once a majority confirmed that leadership after this call (Raft's
    /// ReadIndex). `NotLeader` when this node does not serve the partition, `QuorumTimeout`
    /// when no majority answers within [`QUORUM_WAIT`].
    pub async fn read_index(&self, partition: u32) -> Result<u64, AppendError> {
        if partition >= self.partition_count() {
            return Err(AppendError::Invalid(format!("partition {partition} does not exist")));
        }
        if !self.replicated.load(std::sync::atomic::Ordering::Acquire) {
            return Ok(self.commits.borrow().heads[partition as usize]);
        }
        let requests = self.read_indexes.lock()[partition as usize].clone().ok_or(AppendError::NotLeader { partition })?;
        let (reply, answer) = oneshot::channel();
        let asked = async {
            requests.send(reply).await.map_err(|_| AppendError::NotLeader { partition })?;
            answer.await.ok().flatten().ok_or(AppendError::NotLeader { partition })
        };
        tokio::time::timeout(QUORUM_WAIT, asked).await.map_err(|_| AppendError::QuorumTimeout { partition })?
    }

    /// Changes whenever some partition's commit position moves (see [`Log::committed_through`]).
    pub fn commit_moves(&self) -> watch::Receiver<u64> {
        self.commit_moved.subscribe()
    }

    /// The partition's commit position as this node knows it, and, on its leader, how far each
    /// follower holds its log. A single node commits what it holds.
    pub fn replica_report(&self, partition: u32) -> ReplicaReport {
        if !self.replicated.load(std::sync::atomic::Ordering::Acquire) {
            return ReplicaReport { commit: self.commits.borrow().heads[partition as usize], followers: Vec::new() };
        }
        self.replica_reports.lock()[partition as usize].clone()
    }

    /// Waits until a majority holds `appended` (committed in the epoch it was appended in).
    /// Fails with `OutcomeUnknown` when this node stops leading that epoch first or its lease
    /// lapses (it may be deposed: the append may or may not commit), and with
    /// `QuorumTimeout` after `timeout` (the API uses [`QUORUM_WAIT`]).
    /// A single node returns at once: it is its own majority.
    pub async fn wait_quorum(&self, appended: &Appended, timeout: std::time::Duration) -> Result<(), AppendError> {
        if !self.replicated.load(std::sync::atomic::Ordering::Acquire) {
            return Ok(());
        }
        let (partition, epoch, position) = (appended.partition, appended.epoch, appended.last_position);
        let mut committed = self.committed[partition as usize].subscribe();
        let wait = async {
            loop {
                let (e, p) = *committed.borrow_and_update();
                if e == epoch && p >= position {
                    return Ok(());
                }
                if self.roles.epoch(partition) != epoch || self.roles.deposed(partition, epoch) {
                    return Err(AppendError::OutcomeUnknown { partition });
                }
                // Woken by the commit watch; checked at least every 50 ms for a lost leadership.
                let _ = tokio::time::timeout(std::time::Duration::from_millis(50), committed.changed()).await;
            }
        };
        tokio::time::timeout(timeout, wait).await.map_err(|_| AppendError::QuorumTimeout { partition })?
    }

    /// Which partitions this node appends to, in which epoch.
    pub fn roles(&self) -> &Arc<Roles> {
        &self.roles
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    pub fn limits(&self) -> &LimitsConfig {
        &self.limits
    }

    pub fn partition_count(&self) -> u32 {
        self.store.partition_count()
    }

    /// The partition whose log holds `stream` (a partition's `$epochs-N` marker stream is N's).
    pub fn partition_of(&self, stream: &str) -> u32 {
        partitioning::home_partition(stream, self.store.partition_count())
    }

    /// Appends atomically; resolves once the events are durable or the append failed.
    pub async fn append(&self, request: AppendRequest) -> Result<Appended, AppendError> {
        self.submit(request).await?.outcome().await
    }

    /// Validates the append and queues it for the writer, waiting while the queue is full; the
    /// returned [`PendingAppend`] resolves once it is durable or failed. Appends queued one after
    /// the other are committed in that order (the queue is FIFO and the writer applies a batch in
    /// order), which lets one caller pipeline appends to one stream. Every append is counted in
    /// the metrics once: a refused one here, a queued one when its outcome is known.
    pub async fn submit(&self, request: AppendRequest) -> Result<PendingAppend, AppendError> {
        let queued = self.queue_append(request).await;
        if let Err(error) = &queued {
            self.metrics.count_append(failure_label(error));
        }
        queued
    }

    /// Queues the writer job `job` makes around its reply channel and waits for the answer.
    async fn ask<T>(&self, job: impl FnOnce(oneshot::Sender<Result<T, AppendError>>) -> writer::Job) -> Result<T, AppendError> {
        let queue = self.queue.lock().clone().ok_or(AppendError::ShuttingDown)?;
        let (reply, answer) = oneshot::channel();
        queue.send_async(job(reply)).await.map_err(|_| AppendError::ShuttingDown)?;
        // Never hold a sender while waiting: `close` ends the writer once all senders are gone.
        drop(queue);
        answer.await.map_err(|_| AppendError::ShuttingDown)?
    }

    /// Appends to a node's audit stream (`$audit/<node>`, [`crate::security::audit`]), which
    /// [`Log::append`] refuses like every stream starting with `$`.
    pub async fn append_audit(&self, request: AppendRequest) -> Result<Appended, AppendError> {
        let checked = if request.stream.starts_with(crate::security::audit::STREAM_PREFIX) {
            validate_stream_id(&self.limits, &request.stream).and_then(|()| validate_events(&self.limits, &request))
        } else {
            Err(format!("stream: {:?} is not an audit stream", request.stream))
        };
        let queued = match checked {
            Ok(()) => self.enqueue(request).await,
            Err(e) => Err(AppendError::Invalid(e)),
        };
        if let Err(error) = &queued {
            self.metrics.count_append(failure_label(error));
        }
        queued?.outcome().await
    }

    async fn queue_append(&self, request: AppendRequest) -> Result<PendingAppend, AppendError> {
        validate_append(&self.limits, &request).map_err(AppendError::Invalid)?;
        self.enqueue(request).await
    }

    async fn enqueue(&self, request: AppendRequest) -> Result<PendingAppend, AppendError> {
        let queue = self.queue.lock().clone().ok_or(AppendError::ShuttingDown)?;
        let (reply, answer) = oneshot::channel();
        queue.send_async(writer::Job::Append { request, reply }).await.map_err(|_| AppendError::ShuttingDown)?;
        // Never hold a sender while waiting: `close` ends the writer once all senders are gone.
        drop(queue);
        Ok(PendingAppend { answer, metrics: self.metrics.clone() })
    }

    /// Runs a command on its domain's processor (the writer); resolves once its events and state
    /// changes are durable — in a cluster, once they are committed (`quorum`: a command is never
    /// acknowledged before it is safe) — or it was rejected or failed (then nothing of it was
    /// written, except for `OutcomeUnknown`/`QuorumTimeout`, see [`Log::wait_quorum`]). The
    /// caller validated the command's scope and id.
    pub async fn command(&self, command: Box<dyn Routed>) -> Result<CommandDone, CommandError> {
        let partition = self.partition_of(command.stream());
        let truncations = self.truncations_of(partition);
        let outcome = match self.run_command(command).await {
            Ok(done) => self.command_committed(done).await,
            Err(CommandError::Rejected(rejected)) => self.rejection_committed(partition, truncations, rejected).await,
            failed => failed,
        };
        self.metrics.count_command(match &outcome {
            Ok(done) if done.duplicate => "duplicate",
            Ok(_) => "ok",
            Err(CommandError::Rejected(_)) => "rejected",
            Err(CommandError::Failed(_)) => "error",
        });
        outcome
    }

    /// In a cluster, waits until the command's events (a duplicate's first ones too) are
    /// committed in the epoch it ran in.
    async fn command_committed(&self, done: CommandDone) -> Result<CommandDone, CommandError> {
        let record = done.record;
        if !self.replicated.load(std::sync::atomic::Ordering::Acquire) || record.last_position == 0 {
            return Ok(done);
        }
        let appended = Appended {
            partition: record.partition,
            first_position: record.first_position,
            last_position: record.last_position,
            stream_version: record.stream_version,
            epoch: done.epoch,
        };
        self.wait_quorum(&appended, QUORUM_WAIT).await.map_err(CommandError::Failed)?;
        Ok(done)
    }

    /// In a cluster, a rejection stands once the state it was decided against is committed: if a
    /// truncation undid part of that state first, the command was decided on events that never
    /// happened, and the caller is told to resend it (nothing was written) as from a node that
    /// no longer leads.
    async fn rejection_committed(&self, partition: u32, truncations: u64, rejected: Rejected) -> Result<CommandDone, CommandError> {
        if !self.replicated.load(std::sync::atomic::Ordering::Acquire) {
            return Err(CommandError::Rejected(rejected));
        }
        // Answered after the batch that decided it was published: the head covers that state.
        let head = self.commits.borrow().heads[partition as usize];
        self.wait_committed_through(partition, head).await.map_err(CommandError::Failed)?;
        if self.truncations_of(partition) != truncations {
            return Err(CommandError::Failed(AppendError::NotLeader { partition }));
        }
        Err(CommandError::Rejected(rejected))
    }

    async fn run_command(&self, command: Box<dyn Routed>) -> Result<CommandDone, CommandError> {
        let queue = self.queue.lock().clone().ok_or(CommandError::Failed(AppendError::ShuttingDown))?;
        let (reply, answer) = oneshot::channel();
        queue.send_async(writer::Job::Command { command, reply }).await.map_err(|_| CommandError::Failed(AppendError::ShuttingDown))?;
        drop(queue);
        answer.await.map_err(|_| CommandError::Failed(AppendError::ShuttingDown)).and_then(|outcome| outcome)
    }

    /// Answers a query from the state of `scope` of `domain` (the read runs on the blocking
    /// pool), once every command that state reflects is durable — in a cluster, committed: a
    /// query never shows what a crash or a failover could still undo. On a follower that is its
    /// read model, as far as it knows the partition committed (docs/replication.md, "Reads").
    pub async fn query<R, F>(&self, domain: &str, scope: &str, read: F) -> Result<R, AppendError>
    where
        F: FnOnce(&StateView<'_>) -> R + Send + 'static,
        R: Send + 'static,
    {
        let (store, prefix) = (self.store.clone(), subspace(domain, scope));
        let stream = crate::app::stream_of(domain, scope);
        let partition = self.partition_of(&stream);
        let truncations = self.truncations_of(partition);
        // Values sealed with the tenant's key open with it; without one yet, the values are in
        // clear (or the node has not heard of the key: the read reports them undecodable).
        let data_key = match self.keys.get().map(|keys| keys.data_key(crate::security::auth::tenant_of(&stream))) {
            None | Some(Err(OpenError::NotYet(_))) => None,
            Some(Ok(key)) => Some(key),
            Some(Err(error)) => return Err(AppendError::TenantKey { stream, error }),
        };
        let (answer, seq) = tokio::task::spawn_blocking(move || {
            store.read_state(|txn, db| read(&StateView::new(txn, db, &prefix).sealed(data_key.as_ref())))
        })
        .await
        .map_err(|_| AppendError::ShuttingDown)?
        .map_err(|e| AppendError::Storage(Arc::new(e)))?;
        let mut commits = self.commits.clone();
        if commits.borrow().seq < seq {
            tokio::select! {
                reached = commits.wait_for(|point| point.seq >= seq) => { reached.map_err(|_| AppendError::ShuttingDown)?; }
                _ = self.write_failed() => {
                    return Err(AppendError::Storage(self.write_failure().expect("write_failed resolves once poisoned")));
                }
            }
        }
        if self.replicated.load(std::sync::atomic::Ordering::Acquire) {
            // The state reflects at most the partition's durable head, published by now. If a
            // truncation undid part of it meanwhile (the commit then passes the head with other
            // events), the answer is not given: the caller asks again (UNAVAILABLE, not leader).
            let head = commits.borrow().heads[partition as usize];
            self.wait_committed_through(partition, head).await?;
            if self.truncations_of(partition) != truncations {
                return Err(AppendError::NotLeader { partition });
            }
        }
        Ok(answer)
    }

    /// Waits (at most [`QUORUM_WAIT`]) until this node knows `partition` committed through
    /// `position`.
    async fn wait_committed_through(&self, partition: u32, position: u64) -> Result<(), AppendError> {
        let mut moves = self.commit_moves();
        let wait = async {
            while self.committed_through(partition) < position {
                // Woken when a commit moves; checked every 50 ms too, in case one was missed.
                let _ = tokio::time::timeout(std::time::Duration::from_millis(50), moves.changed()).await;
            }
        };
        tokio::time::timeout(QUORUM_WAIT, wait).await.map_err(|_| AppendError::QuorumTimeout { partition })
    }

    /// Appends a leader's events to this replica, at the leader's positions, epochs and times
    /// (they must continue the partition and every stream exactly); resolves once durable with
    /// the partition's new head.
    pub async fn replicate(&self, records: Vec<crate::storage::EventRecord>) -> Result<u64, AppendError> {
        self.ask(|reply| writer::Job::Replicate { records, reply }).await
    }

    /// Persists the epoch this replica of `partition` promised (docs/replication.md): durable
    /// once this resolves. Returns the partition's head as of the promise: it counts every
    /// append the writer placed before it, all durable now — with the partition's role cleared
    /// first, this is a fence after which no append of the old epoch lands.
    pub async fn promise(&self, partition: u32, epoch: u64) -> Result<u64, AppendError> {
        if partition >= self.partition_count() {
            return Err(AppendError::Invalid(format!("partition: {partition} does not exist")));
        }
        self.ask(|reply| writer::Job::Promise { partition, epoch, reply }).await
    }

    /// What this replica of `partition` keeps for replication: its promise, its epoch history
    /// and its durable head (what `Replica::new` starts from).
    pub fn replica_state(&self, partition: u32) -> Result<crate::replication::replica::DurableState, StorageError> {
        Ok(crate::replication::replica::DurableState {
            promised: self.store.promised_epoch(partition)?,
            history: self.store.epoch_history(partition)?,
            last: self.commits.borrow().heads[partition as usize],
        })
    }

    /// Gives up `partition`'s events up to position `through`, the end of an append this node
    /// knows committed (retention, `storage/trim.rs`); returns how many went. Reads then start
    /// after it.
    pub async fn trim_partition(&self, partition: u32, through: u64) -> Result<usize, AppendError> {
        if partition >= self.partition_count() {
            return Err(AppendError::Invalid(format!("partition: {partition} does not exist")));
        }
        self.ask(|reply| writer::Job::Trim { partition, through, reply }).await
    }

    /// Removes `partition`'s events after position `after` (a replica's uncommitted suffix that
    /// conflicts with a new leader's log; docs/replication.md); returns how many. Appends queued
    /// before it are committed first; the partition's head then moves back to `after`.
    pub async fn truncate_partition(&self, partition: u32, after: u64) -> Result<usize, AppendError> {
        if partition >= self.partition_count() {
            return Err(AppendError::Invalid(format!("partition: {partition} does not exist")));
        }
        let removed = self.ask(|reply| writer::Job::Truncate { partition, after, reply }).await;
        // After the truncation (and its state rebuild): whoever read state before it sees the
        // count move; whoever reads after it reads the rebuilt state.
        self.truncations[partition as usize].fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        removed
    }

    /// The image of `partition` as of its head: what a replica that needs entries this log gave
    /// up installs instead (`storage/image.rs`). Everything in it is durable.
    pub async fn partition_image(&self, partition: u32) -> Result<crate::storage::PartitionImage, AppendError> {
        self.ask(|reply| writer::Job::Image { partition, reply }).await
    }

    /// Replaces a partition with `image` (another replica's, `storage/image.rs`); returns its
    /// new head. Durable once this resolves.
    pub async fn install_image(&self, image: crate::storage::PartitionImage) -> Result<u64, AppendError> {
        let partition = image.partition;
        if partition >= self.partition_count() {
            return Err(AppendError::Invalid(format!("partition: {partition} does not exist")));
        }
        let head = self.ask(|reply| writer::Job::Install { image: Box::new(image), reply }).await;
        // The state changed under any reader, as with a truncation.
        self.truncations[partition as usize].fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        head
    }

    fn truncations_of(&self, partition: u32) -> u64 {
        self.truncations[partition as usize].load(std::sync::atomic::Ordering::Acquire)
    }

    /// `partition`'s published head (as in [`Log::commits`]); `changed()` wakes only when it moves.
    pub fn partition_head(&self, partition: u32) -> watch::Receiver<u64> {
        self.partition_heads[partition as usize].subscribe()
    }

    /// The latest commit point; `changed()` on the receiver wakes on every new commit.
    pub fn commits(&self) -> watch::Receiver<CommitPoint> {
        self.commits.clone()
    }

    /// Durable events of a stream from `from_version` on, within `limit`.
    pub fn read_stream(&self, stream: &str, from_version: u64, limit: ReadLimit) -> Result<Slice, StorageError> {
        // The commit point first, snapshots second: they hold at least every event up to it, and
        // the read stops there, so it never shows what readers elsewhere cannot see yet.
        let _no_truncation = self.store.reading();
        let durable_seq = self.commits.borrow().seq;
        let mut slice = self.store.read_stream(stream, from_version, durable_seq, limit)?;
        // A follower shows only committed events (a leader's uncommitted ones may be undone).
        let readable = self.readable_through(self.partition_of(stream));
        if let Some(cut) = slice.events.iter().position(|e| e.position > readable) {
            slice.events.truncate(cut);
            slice.more = false;
        }
        self.metrics.events_read.inc_by(slice.events.len() as u64);
        Ok(slice)
    }

    /// Durable events of a partition from `from_position` on, within `limit`.
    pub fn read_partition(&self, partition: u32, from_position: u64, limit: ReadLimit) -> Result<Slice, StorageError> {
        let _no_truncation = self.store.reading();
        let slice = self.store.read_partition(partition, from_position, self.readable_through(partition), limit)?;
        self.metrics.events_read.inc_by(slice.events.len() as u64);
        Ok(slice)
    }

    /// Every durable event of a partition from `from_position` on, committed or not: what
    /// replication sends and compares (readers use [`Log::read_partition`]).
    pub fn read_partition_durable(&self, partition: u32, from_position: u64, limit: ReadLimit) -> Result<Slice, StorageError> {
        let _no_truncation = self.store.reading();
        let head = self.commits.borrow().heads[partition as usize];
        let slice = self.store.read_partition(partition, from_position, head, limit)?;
        self.metrics.events_read.inc_by(slice.events.len() as u64);
        Ok(slice)
    }

    /// The I/O failure that stopped all writing, if one happened (see `writer.rs`).
    pub fn write_failure(&self) -> Option<Arc<StorageError>> {
        self.poison.error().cloned()
    }

    /// Resolves once writing has stopped for good after an I/O failure.
    pub async fn write_failed(&self) {
        // Register before checking, so a failure between the check and the wait is not missed.
        let notified = self.poison.poisoned.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if self.poison.error().is_none() {
            notified.await;
        }
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Stops taking appends, lets the writer commit what is queued, and waits for it.
    pub fn close(&self) {
        self.queue.lock().take();
        if let Some(handle) = self.writer.lock().take() {
            let _ = handle.join();
        }
    }
}

impl Drop for Log {
    fn drop(&mut self) {
        self.close();
    }
}

/// Checks an append against the limits. The message names what is wrong and where.
pub fn validate_append(limits: &LimitsConfig, request: &AppendRequest) -> Result<(), String> {
    validate_stream_id(limits, &request.stream)?;
    if request.stream.starts_with('$') {
        return Err(format!("stream: {:?} is a system stream (names starting with '$' are reserved)", request.stream));
    }
    if crate::app::is_domain_stream(&request.stream) {
        return Err(format!("stream: {:?} belongs to a domain; only its commands append to it (e.g. `anthill ledger`)", request.stream));
    }
    validate_events(limits, request)
}

/// Checks an append's events against the limits.
fn validate_events(limits: &LimitsConfig, request: &AppendRequest) -> Result<(), String> {
    if request.events.is_empty() {
        return Err("events: an append needs at least one event".into());
    }
    if request.events.len() > limits.max_events_per_append {
        return Err(format!(
            "events: {} events in one append, the limit is {} (limits.max_events_per_append)",
            request.events.len(),
            limits.max_events_per_append
        ));
    }
    for (i, event) in request.events.iter().enumerate() {
        if event.event_type.is_empty() {
            return Err(format!("events[{i}].type: must not be empty"));
        }
        if event.event_type.len() > limits.max_event_type_bytes {
            return Err(format!(
                "events[{i}].type: {} bytes, the limit is {} (limits.max_event_type_bytes)",
                event.event_type.len(),
                limits.max_event_type_bytes
            ));
        }
        let size = event.payload.len() + event.metadata.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>();
        if size > limits.max_event_bytes {
            return Err(format!(
                "events[{i}]: payload and metadata are {size} bytes, the limit is {} (limits.max_event_bytes)",
                limits.max_event_bytes
            ));
        }
        if event.metadata.len() > usize::from(u16::MAX) {
            return Err(format!("events[{i}].metadata: {} entries, the limit is 65535", event.metadata.len()));
        }
        if let Some((key, _)) = event.metadata.iter().find(|(k, _)| k.is_empty() || k.len() > MAX_METADATA_KEY_BYTES) {
            return Err(format!("events[{i}].metadata: key of {} bytes; keys must be 1 to {MAX_METADATA_KEY_BYTES} bytes", key.len()));
        }
    }
    Ok(())
}

/// Checks a stream id: not empty, within the length limit, no NUL character.
pub fn validate_stream_id(limits: &LimitsConfig, stream: &str) -> Result<(), String> {
    if stream.is_empty() {
        return Err("stream: must not be empty".into());
    }
    if stream.len() > limits.max_stream_id_bytes {
        return Err(format!("stream: {} bytes, the limit is {} (limits.max_stream_id_bytes)", stream.len(), limits.max_stream_id_bytes));
    }
    if stream.contains('\0') {
        return Err("stream: must not contain the NUL character".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::config::StorageConfig;
    use proptest::prelude::*;

    const ALL: ReadLimit = ReadLimit { max_events: 100_000, max_bytes: usize::MAX };

    fn open(dir: &std::path::Path, wait_us: u64) -> Log {
        open_with(dir, wait_us, StorageConfig { partitions: 4, ..StorageConfig::default() })
    }

    fn open_with(dir: &std::path::Path, wait_us: u64, storage: StorageConfig) -> Log {
        let store = Arc::new(Store::open(dir, &storage).unwrap());
        let gc = GroupCommitConfig { max_wait_us: wait_us, ..GroupCommitConfig::default() };
        Log::start(store, &gc, &LimitsConfig::default(), &AppConfig::default(), Arc::new(Metrics::default())).unwrap()
    }

    fn req(stream: &str, expected: ExpectedVersion, n: usize) -> AppendRequest {
        let events = (0..n).map(|i| NewEvent { event_type: "E".into(), payload: vec![i as u8; 8], metadata: vec![] }).collect();
        AppendRequest { stream: stream.into(), expected, events }
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
    }

    /// A log whose partitions are owned through a coordination store, its lease holding for a
    /// minute, leading `stream`'s partition in epoch 2 as the store grants it.
    fn leading_through_a_store(dir: &std::path::Path, stream: &str) -> (Log, u32) {
        let log = open(dir, 0);
        log.set_replicated();
        log.roles().use_coordination();
        let p = log.partition_of(stream);
        log.roles().set_lease_until(std::time::Instant::now() + std::time::Duration::from_secs(60));
        log.roles().set_granted(p, 2);
        log.roles().set(p, 2);
        (log, p)
    }

    #[test]
    fn given_a_lapsed_lease_then_appends_and_commands_are_refused_as_not_leader_until_it_is_renewed() {
        let dir = tempfile::tempdir().unwrap();
        let (log, p) = leading_through_a_store(dir.path(), "s");
        let book = log.partition_of("ledger/book");
        log.roles().set_granted(book, 2);
        log.roles().set(book, 2);
        log.publish_commit(p, 2, u64::MAX);
        let rt = runtime();
        log.roles().set_lease_until(std::time::Instant::now());
        let refused = rt.block_on(log.append(req("s", ExpectedVersion::Any, 1)));
        assert!(matches!(refused, Err(AppendError::NotLeader { .. })), "{refused:?}");
        let command = rt.block_on(log.command(ledger(Some("c1"), open_account("a"))));
        assert!(matches!(command, Err(CommandError::Failed(AppendError::NotLeader { .. }))), "{command:?}");
        assert_eq!(*log.partition_head(p).borrow(), 0, "nothing written");
        // Renewed: taken again, in the epoch the node kept leading.
        log.roles().set_lease_until(std::time::Instant::now() + std::time::Duration::from_secs(60));
        rt.block_on(log.append(req("s", ExpectedVersion::Any, 1))).unwrap();
    }

    /// Appends to `s` on `log`, waits for its majority, and once the wait has begun calls `end`;
    /// returns how the wait ended.
    fn wait_ended_by(log: &Arc<Log>, rt: &tokio::runtime::Runtime, end: impl FnOnce(&Roles)) -> Result<(), AppendError> {
        let appended = rt.block_on(log.append(req("s", ExpectedVersion::Any, 1))).unwrap();
        rt.block_on(async {
            let waiting = {
                let log = log.clone();
                tokio::spawn(async move { log.wait_quorum(&appended, std::time::Duration::from_secs(10)).await })
            };
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            assert!(!waiting.is_finished(), "no majority confirmed it yet");
            end(log.roles());
            waiting.await.unwrap()
        })
    }

    #[test]
    fn given_an_epoch_the_store_no_longer_grants_then_its_appends_are_refused_and_its_waits_end_unknown() {
        let dir = tempfile::tempdir().unwrap();
        let (log, p) = leading_through_a_store(dir.path(), "s");
        let log = Arc::new(log);
        let rt = runtime();
        // The store's view: another node leads in epoch 3 (or this one, in a new session).
        let outcome = wait_ended_by(&log, &rt, |roles| roles.set_granted(p, 0));
        assert!(matches!(outcome, Err(AppendError::OutcomeUnknown { .. })), "{outcome:?}");
        let refused = rt.block_on(log.append(req("s", ExpectedVersion::Any, 1)));
        assert!(matches!(refused, Err(AppendError::NotLeader { .. })), "{refused:?}");
        log.roles().set_granted(p, 3);
        assert!(rt.block_on(log.append(req("s", ExpectedVersion::Any, 1))).is_err(), "granted a later epoch than it leads");
        log.roles().set_granted(p, 2);
        rt.block_on(log.append(req("s", ExpectedVersion::Any, 1))).unwrap();
    }

    #[test]
    fn given_a_quorum_append_waiting_for_its_majority_when_the_lease_lapses_then_its_outcome_is_unknown() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = leading_through_a_store(dir.path(), "s");
        let outcome = wait_ended_by(&Arc::new(log), &runtime(), |roles| roles.set_lease_until(std::time::Instant::now()));
        assert!(matches!(outcome, Err(AppendError::OutcomeUnknown { .. })), "{outcome:?}");
    }

    #[test]
    fn given_concurrent_appends_when_batched_then_positions_are_dense_and_each_is_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(open(dir.path(), 2_000));
        let rt = runtime();
        let results = rt.block_on(async {
            let tasks: Vec<_> = (0..50)
                .map(|i| {
                    let log = log.clone();
                    tokio::spawn(async move { log.append(req(&format!("s-{}", i % 5), ExpectedVersion::Any, 3)).await })
                })
                .collect();
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await.unwrap().unwrap());
            }
            out
        });
        // Batching really happened: fewer commits than appends.
        let commits = log.metrics().commits.get();
        assert!(commits < 50, "{commits} commits for 50 appends");
        let mut positions: Vec<(u32, u64)> =
            results.iter().flat_map(|a| (a.first_position..=a.last_position).map(move |p| (a.partition, p))).collect();
        positions.sort();
        for p in 0..4 {
            let mine: Vec<u64> = positions.iter().filter(|(q, _)| *q == p).map(|(_, pos)| *pos).collect();
            assert_eq!(mine, (1..=mine.len() as u64).collect::<Vec<_>>(), "partition {p}");
        }
        for s in 0..5 {
            assert_eq!(log.read_stream(&format!("s-{s}"), 1, ALL).unwrap().events.len(), 30);
        }
    }

    #[test]
    fn given_two_concurrent_appends_at_the_same_version_then_exactly_one_wins() {
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(open(dir.path(), 5_000));
        let rt = runtime();
        let (a, b) = rt.block_on(async {
            tokio::join!(log.append(req("race", ExpectedVersion::NoStream, 1)), log.append(req("race", ExpectedVersion::NoStream, 2)))
        });
        assert!(a.is_ok() != b.is_ok(), "{a:?} {b:?}");
        let loser = if a.is_ok() { b } else { a };
        match loser.unwrap_err() {
            AppendError::WrongExpectedVersion { actual, .. } => assert!(actual == 1 || actual == 2),
            e => panic!("{e}"),
        }
    }

    #[test]
    fn given_invalid_appends_then_the_error_names_the_field_and_nothing_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path(), 0);
        let rt = runtime();
        let mut bad = req("s", ExpectedVersion::Any, 2);
        bad.events[1].event_type.clear();
        let err = rt.block_on(log.append(bad)).unwrap_err().to_string();
        assert_eq!(err, "events[1].type: must not be empty");
        let err = rt.block_on(log.append(req("", ExpectedVersion::Any, 1))).unwrap_err().to_string();
        assert_eq!(err, "stream: must not be empty");
        let mut big = req("s", ExpectedVersion::Any, 1);
        big.events[0].payload = vec![0; (1 << 20) + 1];
        assert!(rt.block_on(log.append(big)).unwrap_err().to_string().contains("limits.max_event_bytes"));
        assert!(log.read_stream("s", 1, ALL).unwrap().events.is_empty());
        assert_eq!(log.commits().borrow().heads.iter().sum::<u64>(), 0);
    }

    #[test]
    fn given_a_small_index_tail_when_loaded_then_the_writer_waits_for_the_indexer_and_every_append_lands() {
        let dir = tempfile::tempdir().unwrap();
        let storage = StorageConfig {
            partitions: 4,
            index_flush_events: 8,
            index_tail_max_events: 16,
            index_flush_interval_ms: 60_000,
            ..StorageConfig::default()
        };
        let log = Arc::new(open_with(dir.path(), 0, storage));
        let rt = runtime();
        rt.block_on(async {
            let tasks: Vec<_> = (0..20)
                .map(|i| {
                    let log = log.clone();
                    tokio::spawn(async move {
                        for _ in 0..10 {
                            log.append(req(&format!("s-{}", i % 7), ExpectedVersion::Any, 2)).await.unwrap();
                        }
                    })
                })
                .collect();
            for t in tasks {
                t.await.unwrap();
            }
        });
        let metrics = log.metrics();
        assert!(metrics.index_waits.get() > 0, "the tail never filled: the bound was not exercised");
        // A group commit is checked against the bound before it runs, so the tail may pass the
        // bound by at most one batch (20 appends of 2 events here).
        let held = log.store().tail_events();
        assert!(held <= 16 + 20 * 2, "tail holds {held}");
        // The indexer may still be flushing: its count and the tail's move one after the other,
        // so read them once it is done.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let counted = loop {
            let (held, flushed) = (log.store().tail_events() as u64, metrics.index_flushed_events.get());
            if held + flushed == 400 || std::time::Instant::now() > deadline {
                break held + flushed;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        assert_eq!(counted, 400, "every event is flushed or held, once");
        let all: usize = (0..4).map(|p| log.read_partition(p, 1, ALL).unwrap().events.len()).sum();
        assert_eq!(all, 400);
        for s in 0..7 {
            let events = log.read_stream(&format!("s-{s}"), 1, ALL).unwrap().events;
            assert!(events.iter().enumerate().all(|(i, e)| e.stream_version == i as u64 + 1), "stream s-{s}");
        }
    }

    #[test]
    fn given_a_closed_log_then_every_durable_event_is_indexed_and_the_tail_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path(), 0);
        let rt = runtime();
        for i in 0..5 {
            rt.block_on(log.append(req(&format!("s-{i}"), ExpectedVersion::Any, 3))).unwrap();
        }
        assert_eq!(log.store().indexed_through(), 0, "the default thresholds are not reached by 15 events");
        log.close();
        assert_eq!((log.store().indexed_through(), log.store().tail_events()), (15, 0));
        assert_eq!(log.commits().borrow().seq, 15);
    }

    #[test]
    fn given_a_truncated_partition_then_its_head_moves_back_and_appends_continue_while_other_partitions_keep_theirs() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path(), 0);
        let rt = runtime();
        let p = log.partition_of("s");
        let other = (0..100).map(|i| format!("o-{i}")).find(|s| log.partition_of(s) != p).unwrap();
        rt.block_on(async {
            log.append(req("s", ExpectedVersion::Any, 3)).await.unwrap();
            log.append(req(&other, ExpectedVersion::Any, 2)).await.unwrap();
            log.append(req("s", ExpectedVersion::Any, 2)).await.unwrap();
            assert_eq!(log.truncate_partition(p, 3).await.unwrap(), 2);
            assert_eq!(log.commits().borrow().heads[p as usize], 3);
            // The stream is back at version 3: an exact expectation of 3 holds, 5 does not.
            assert!(log.append(req("s", ExpectedVersion::Exact(5), 1)).await.is_err());
            let again = log.append(req("s", ExpectedVersion::Exact(3), 1)).await.unwrap();
            assert_eq!((again.first_position, again.stream_version), (4, 4));
        });
        let positions: Vec<u64> = log.read_partition(p, 1, ALL).unwrap().events.iter().map(|e| e.position).collect();
        assert_eq!(positions, [1, 2, 3, 4]);
        assert_eq!(log.read_stream(&other, 1, ALL).unwrap().events.len(), 2);
        assert!(matches!(rt.block_on(log.truncate_partition(99, 0)), Err(AppendError::Invalid(_))));
    }

    #[test]
    fn given_a_follower_then_readers_see_only_what_it_knows_committed_and_its_leader_sees_everything() {
        let (leader_dir, follower_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (leader, follower) = (open(leader_dir.path(), 0), open(follower_dir.path(), 0));
        let rt = runtime();
        let p = leader.partition_of("s");
        rt.block_on(leader.append(req("s", ExpectedVersion::Any, 5))).unwrap();
        let events = leader.read_partition(p, 1, ALL).unwrap().events;
        follower.set_replicated();
        follower.roles().set(p, 0);
        rt.block_on(follower.replicate(events.clone())).unwrap();
        follower.report_replica(p, ReplicaReport { commit: 3, followers: Vec::new() });
        let positions = |slice: Slice| slice.events.iter().map(|e| e.position).collect::<Vec<_>>();
        assert_eq!(positions(follower.read_partition(p, 1, ALL).unwrap()), [1, 2, 3]);
        let stream = follower.read_stream("s", 1, ALL).unwrap();
        assert_eq!((positions(stream.clone()), stream.more), (vec![1, 2, 3], false), "the end of what is readable now");
        assert_eq!(follower.read_partition_durable(p, 1, ALL).unwrap().events, events, "replication sees every durable event");
        // Leading the partition, it serves everything it holds.
        follower.roles().set(p, 2);
        assert_eq!(positions(follower.read_partition(p, 1, ALL).unwrap()), [1, 2, 3, 4, 5]);
    }

    #[test]
    fn given_a_leaders_events_when_replicated_then_the_follower_holds_them_at_the_same_positions_epochs_and_versions() {
        let (leader_dir, follower_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (leader, follower) = (open(leader_dir.path(), 0), open(follower_dir.path(), 0));
        let rt = runtime();
        let p = leader.partition_of("s");
        let other = (0..100).map(|i| format!("o-{i}")).find(|s| leader.partition_of(s) == p && s != "s").unwrap();
        rt.block_on(async {
            leader.append(req("s", ExpectedVersion::Any, 2)).await.unwrap();
            leader.append(req(&other, ExpectedVersion::Any, 1)).await.unwrap();
            leader.append(req("s", ExpectedVersion::Any, 1)).await.unwrap();
        });
        let events = leader.read_partition(p, 1, ALL).unwrap().events;
        assert_eq!(events.len(), 4);
        let continued: Vec<bool> = events.iter().map(|e| e.atomic_with_next).collect();
        assert_eq!(continued, [true, false, false, false], "the events of one append but its last go on at the next position");
        // In two pieces, as a leader sends them; a piece that does not follow, or that ends inside
        // an append, is refused whole.
        assert!(matches!(rt.block_on(follower.replicate(events[1..].to_vec())), Err(AppendError::Invalid(_))));
        assert!(matches!(rt.block_on(follower.replicate(events[..1].to_vec())), Err(AppendError::Invalid(_))));
        assert!(follower.read_partition_durable(p, 1, ALL).unwrap().events.is_empty());
        assert_eq!(rt.block_on(follower.replicate(events[..2].to_vec())).unwrap(), 2);
        assert_eq!(rt.block_on(follower.replicate(events[2..].to_vec())).unwrap(), 4);
        let copied = follower.read_partition(p, 1, ALL).unwrap().events;
        assert_eq!(copied, events, "same positions, streams, versions, payloads, times and epochs");
        assert_eq!(follower.read_stream("s", 1, ALL).unwrap().events.len(), 3);
        // The follower's own appends (if it later leads) continue the streams.
        let next = rt.block_on(follower.append(req("s", ExpectedVersion::Exact(3), 1))).unwrap();
        assert_eq!((next.first_position, next.stream_version), (5, 4));
    }

    /// Every key and value of the `state` database: domain state and command records.
    fn state_dump(log: &Log) -> Vec<(Vec<u8>, Vec<u8>)> {
        let (dump, _) = log
            .store()
            .read_state(|txn, db| db.iter(txn).unwrap().map(|e| e.map(|(k, v)| (k.to_vec(), v.to_vec())).unwrap()).collect::<Vec<_>>())
            .unwrap();
        dump
    }

    /// Asserts that two replicas hold the same state, naming the first key they differ at.
    fn same_state(a: &Log, b: &Log, what: &str) {
        let (a, b) = (state_dump(a), state_dump(b));
        let differ = a.iter().zip(&b).find(|(x, y)| x != y).map(|(x, y)| (String::from_utf8_lossy(&x.0), String::from_utf8_lossy(&y.0)));
        assert!(a == b, "{what}: {} keys against {}, first difference {differ:?}", a.len(), b.len());
    }

    fn ledger(id: Option<&str>, command: crate::app::ledger::LedgerCommand) -> Box<dyn Routed> {
        Box::new(crate::app::processor::Command::<crate::app::ledger::Ledger>::new("book".into(), id.map(String::from), command))
    }

    fn open_account(account: &str) -> crate::app::ledger::LedgerCommand {
        crate::app::ledger::LedgerCommand::OpenAccount { account: account.into(), currency: "EUR".into(), credit_limit: 0 }
    }

    fn transfer(amount: u64) -> crate::app::ledger::LedgerCommand {
        crate::app::ledger::LedgerCommand::Transfer { from: "a".into(), to: "b".into(), amount, transfer: None }
    }

    /// A follower of `leader`'s partition `p` that stored its first `n` events.
    fn follower_of(leader: &Log, p: u32, n: usize, dir: &std::path::Path, rt: &tokio::runtime::Runtime) -> Log {
        let follower = open(dir, 0);
        follower.set_replicated();
        follower.roles().set(p, 0);
        let events = leader.read_partition(p, 1, ALL).unwrap().events;
        if n > 0 {
            rt.block_on(follower.replicate(events[..n].to_vec())).unwrap();
        }
        follower
    }

    #[test]
    fn given_committed_events_when_a_partition_is_trimmed_then_reads_start_after_its_floor_versions_go_on_and_state_stays_also_after_reopening()
     {
        use crate::app::ledger::LedgerCommand::Deposit;
        let dir = tempfile::tempdir().unwrap();
        let rt = runtime();
        let p;
        let state;
        {
            let log = open(dir.path(), 0);
            p = log.partition_of("ledger/book");
            let other = (0..).map(|i| format!("s{i}")).find(|s| log.partition_of(s) == p).unwrap();
            rt.block_on(async {
                log.command(ledger(Some("c1"), open_account("a"))).await.unwrap();
                log.append(req(&other, ExpectedVersion::Any, 3)).await.unwrap(); // positions 2..=4
                log.command(ledger(Some("c2"), Deposit { account: "a".into(), amount: 7 })).await.unwrap(); // 5
                log.append(req(&other, ExpectedVersion::Any, 2)).await.unwrap(); // 6..=7
            });
            state = state_dump(&log);
            // Only whole appends, only what is committed (everything durable, on a single node).
            let inside = rt.block_on(log.trim_partition(p, 3)).unwrap_err();
            assert!(inside.to_string().contains("no append of the log ends there"), "{inside}");
            let past = rt.block_on(log.trim_partition(p, 8)).unwrap_err();
            assert!(past.to_string().contains("past what is known committed"), "{past}");
            assert_eq!(rt.block_on(log.trim_partition(p, 4)).unwrap(), 4);
            assert_eq!(log.store().partition_floor(p), 4);
            let read = log.read_partition(p, 1, ALL).unwrap().events;
            assert_eq!(read.iter().map(|e| e.position).collect::<Vec<_>>(), [5, 6, 7], "reads start after the floor");
            let versions: Vec<u64> = log.read_stream(&other, 1, ALL).unwrap().events.iter().map(|e| e.stream_version).collect();
            assert_eq!(versions, [4, 5], "the stream's first three versions went");
            assert_eq!(log.read_stream("ledger/book", 1, ALL).unwrap().events.len(), 1);
            assert_eq!(state_dump(&log), state, "the state the events made stays");
            // Appends go on at the stream's version; a repeat of a trimmed command is still
            // known by its id.
            rt.block_on(log.append(req(&other, ExpectedVersion::Exact(5), 1))).unwrap();
            let again = rt.block_on(log.command(ledger(Some("c1"), open_account("a")))).unwrap();
            assert!(again.duplicate);
            // Everything of the partition goes: its head and versions stay.
            assert_eq!(rt.block_on(log.trim_partition(p, 8)).unwrap(), 4);
            assert!(log.read_partition(p, 1, ALL).unwrap().events.is_empty());
        }
        let log = open(dir.path(), 0);
        assert_eq!((log.store().partition_floor(p), log.store().partition_heads()[p as usize]), (8, 8));
        let other = (0..).map(|i| format!("s{i}")).find(|s| log.partition_of(s) == p).unwrap();
        assert_eq!(log.store().stream_version(&other).unwrap(), 6);
        let appended = rt.block_on(log.append(req(&other, ExpectedVersion::Exact(6), 1))).unwrap();
        assert_eq!((appended.first_position, appended.stream_version), (9, 7));
        let balance = rt.block_on(log.query("ledger", "book", |view| {
            <crate::app::ledger::Ledger as crate::app::Domain>::query(
                view,
                &crate::app::ledger::query::LedgerQuery::Balance { account: "a".into() },
            )
            .ok()
        }));
        assert_eq!(balance.unwrap().unwrap()["balance"], 7, "state outlives the events that made it");
    }

    #[test]
    fn given_retention_limits_then_each_partition_keeps_at_most_its_newest_events_and_none_older_than_the_age_whole_appends_only() {
        use super::retention::{Retention, trim_all};
        let dir = tempfile::tempdir().unwrap();
        let rt = runtime();
        let log = open(dir.path(), 0);
        let streams: Vec<String> = {
            let p0 = log.partition_of("a");
            let other = (0..).map(|i| format!("s{i}")).find(|s| log.partition_of(s) != p0).unwrap();
            vec!["a".into(), other]
        };
        rt.block_on(async {
            for stream in &streams {
                for _ in 0..4 {
                    log.append(req(stream, ExpectedVersion::Any, 3)).await.unwrap(); // 12 events, appends of 3
                }
            }
        });
        let positions = |stream: &str| {
            log.read_partition(log.partition_of(stream), 1, ALL).unwrap().events.iter().map(|e| e.position).collect::<Vec<_>>()
        };
        // At most 5 events: 7 would go, but only whole appends do, so 6 go and 6 stay.
        rt.block_on(trim_all(&log, Retention { max_events: 5, max_age_s: 0 }));
        for stream in &streams {
            assert_eq!(positions(stream), (7..=12).collect::<Vec<_>>(), "{stream}");
        }
        rt.block_on(trim_all(&log, Retention { max_events: 5, max_age_s: 0 }));
        assert_eq!(positions(&streams[0]).len(), 6, "nothing more goes while within the limit");
        // By age: what was appended before the pause goes, what came after stays.
        std::thread::sleep(std::time::Duration::from_millis(1_100));
        rt.block_on(log.append(req(&streams[0], ExpectedVersion::Any, 2))).unwrap();
        rt.block_on(trim_all(&log, Retention { max_events: 0, max_age_s: 1 }));
        assert_eq!(positions(&streams[0]), [13, 14]);
        assert!(positions(&streams[1]).is_empty(), "every event of the other partition is older than a second");
        assert_eq!(log.store().stream_version(&streams[1]).unwrap(), 12);
    }

    /// `n` random ledger commands of book `book` (accounts, money, holds; ids repeated now and
    /// then, so some are duplicates or reused ids; many are refused).
    fn random_ledger_commands(seed: u64, n: usize) -> Vec<(Option<String>, crate::app::ledger::LedgerCommand)> {
        use crate::app::ledger::LedgerCommand::*;
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let accounts = ["a", "b", "c"];
        let mut commands: Vec<(Option<String>, crate::app::ledger::LedgerCommand)> = accounts
            .iter()
            .map(|a| (Some(format!("open-{a}")), OpenAccount { account: (*a).into(), currency: "EUR".into(), credit_limit: 50 }))
            .collect();
        for i in 0..n {
            let account = accounts[rng.random_range(0..3)].to_string();
            let other = accounts[rng.random_range(0..3)].to_string();
            let amount = rng.random_range(1..120);
            let hold = format!("h{}", rng.random_range(0..4));
            let command = match rng.random_range(0..7) {
                0 | 1 => Deposit { account, amount },
                2 => Withdraw { account, amount },
                3 => Transfer { from: account, to: other, amount, transfer: None },
                4 => PlaceHold { hold, account, amount },
                5 => CaptureHold { hold, amount: None, to: Some(other) },
                _ => ReleaseHold { hold },
            };
            let id = match rng.random_range(0..6) {
                0 => None,
                1 if i > 0 => Some(format!("c{}", rng.random_range(0..i))),
                _ => Some(format!("c{i}")),
            };
            commands.push((id, command));
        }
        commands
    }

    #[test]
    fn a_partitions_marker_stream_is_read_in_that_partition_also_on_a_follower() {
        let dir = tempfile::tempdir().unwrap();
        let rt = runtime();
        let log = open(dir.path(), 0);
        log.set_replicated();
        let p = 1;
        let marker = crate::replication::shell::marker_stream(p);
        assert_ne!(partition_of(&marker, 4), p, "the name hashes elsewhere");
        assert_eq!(log.partition_of(&marker), p);
        log.roles().set(p, 0);
        rt.block_on(log.replicate(vec![crate::replication::shell::marker_record(p, 1, 1, 1, 0)])).unwrap();
        log.report_replica(p, ReplicaReport { commit: 1, followers: Vec::new() });
        let read = log.read_stream(&marker, 1, ALL).unwrap().events;
        assert_eq!(read.iter().map(|e| (e.partition, e.position)).collect::<Vec<_>>(), [(p, 1)], "cut at its own partition's commit");
    }

    type Waiting = Vec<tokio::task::JoinHandle<Result<CommandDone, CommandError>>>;

    /// Runs `n` random ledger commands on `leader`, made a replicated leader whose commits are
    /// known at once: its commands keep undo records (nothing reports them committed, so none
    /// is pruned). Returns once all are stored, with the book's partition and the commands'
    /// answers: refusals wait for a reported commit to cover what they read.
    fn random_commands_on_a_replicated_leader(leader: &Arc<Log>, seed: u64, n: usize, rt: &tokio::runtime::Runtime) -> (u32, Waiting) {
        leader.set_replicated();
        let p = leader.partition_of("ledger/book");
        leader.publish_commit(p, SINGLE_NODE_EPOCH, u64::MAX);
        let waiting: Vec<_> = random_ledger_commands(seed, n)
            .into_iter()
            .map(|(id, command)| {
                let leader = leader.clone();
                rt.spawn(async move { leader.command(ledger(id.as_deref(), command)).await })
            })
            .collect();
        let elsewhere = (0..).map(|i| format!("s{i}")).find(|s| leader.partition_of(s) != p).unwrap();
        rt.block_on(async {
            // Each command queued at its first poll, before this last append.
            for _ in 0..4 {
                tokio::task::yield_now().await;
            }
            leader.append(req(&elsewhere, ExpectedVersion::Any, 1)).await
        })
        .unwrap();
        (p, waiting)
    }

    #[test]
    fn given_a_trimmed_replicated_leader_when_replicas_install_its_image_then_they_hold_its_state_versions_and_uncommitted_events_and_go_on()
     {
        use crate::app::ledger::LedgerCommand::Deposit;
        let rt = runtime();
        let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
        let leader = Arc::new(open(dirs[0].path(), 0));
        let (p, _waiting) = random_commands_on_a_replicated_leader(&leader, 11, 50, &rt);
        let events = leader.read_partition(p, 1, ALL).unwrap().events;
        let ends: Vec<u64> = events.iter().filter(|e| !e.atomic_with_next).map(|e| e.position).collect();
        // Known committed through an append 60% of the way; given up through one at 30%.
        let (committed, trimmed) = (ends[ends.len() * 3 / 5], ends[ends.len() * 3 / 10]);
        // A replica whose log went another way from the start: another leader's commands, with
        // state rows the leader never had.
        let other_dir = tempfile::tempdir().unwrap();
        let other = Arc::new(open(other_dir.path(), 0));
        let _other_waiting = random_commands_on_a_replicated_leader(&other, 12, 10, &rt);
        rt.block_on(other.command(ledger(Some("zz"), open_account("zz")))).unwrap();
        let other_events = other.read_partition(p, 1, ALL).unwrap().events.len();
        let diverged = follower_of(&other, p, other_events, dirs[2].path(), &rt);
        assert!(state_dump(&diverged).len() > 3);
        leader.report_replica(p, ReplicaReport { commit: committed, followers: Vec::new() });
        rt.block_on(leader.trim_partition(p, trimmed)).unwrap();
        let image = rt.block_on(leader.partition_image(p)).unwrap();
        let head = events.last().unwrap().position;
        assert_eq!((image.position, image.floor), (head, committed));
        assert_eq!(crate::storage::PartitionImage::decode(&image.encode()).unwrap(), image, "it travels as bytes");
        let same_as_leader = |replica: &Log, what: &str| {
            same_state(replica, &leader, what);
            assert_eq!(replica.store().partition_floor(p), committed, "{what}: its floor is the commit the image's maker knew");
            let kept: Vec<u64> = replica.store().read_partition(p, 1, u64::MAX, ALL).unwrap().events.iter().map(|e| e.position).collect();
            assert_eq!(kept, (committed + 1..=head).collect::<Vec<_>>(), "{what}: it holds the events not known committed");
            assert_eq!(
                replica.store().undo_positions(p),
                leader.store().undo_positions(p).into_iter().filter(|e| *e > committed).collect::<Vec<_>>()
            );
            assert_eq!(replica.store().stream_version("ledger/book").unwrap(), leader.store().stream_version("ledger/book").unwrap());
            let stream = |log: &Log| log.store().read_stream("ledger/book", 1, u64::MAX, ALL).unwrap().events;
            let expected: Vec<_> = stream(&leader).into_iter().filter(|e| e.position > committed).collect();
            assert_eq!(stream(replica), expected, "{what}: the book's stream reads from its first event kept");
            assert_eq!(replica.store().epoch_history(p).unwrap(), leader.store().epoch_history(p).unwrap());
        };
        // Into an empty replica, and into the one whose log went another way.
        let fresh = open(dirs[1].path(), 0);
        fresh.set_replicated();
        fresh.roles().set(p, 0);
        assert_eq!(rt.block_on(fresh.install_image(image.clone())).unwrap(), head);
        same_as_leader(&fresh, "fresh");
        rt.block_on(diverged.install_image(image)).unwrap();
        same_as_leader(&diverged, "diverged");
        // Both go on replicating the leader's next events.
        leader.report_replica(p, ReplicaReport { commit: u64::MAX, followers: Vec::new() });
        rt.block_on(leader.command(ledger(Some("after"), Deposit { account: "a".into(), amount: 5 }))).unwrap();
        let next = leader.read_partition(p, head + 1, ALL).unwrap().events;
        assert!(!next.is_empty());
        for replica in [&fresh, &diverged] {
            rt.block_on(replica.replicate(next.clone())).unwrap();
            same_state(replica, &leader, "after the next events");
        }
        // And a restart keeps it all.
        drop(fresh);
        let reopened = open(dirs[1].path(), 0);
        same_state(&reopened, &leader, "reopened");
        assert_eq!(reopened.store().partition_floor(p), committed);
        let kept = reopened.store().read_partition(p, 1, u64::MAX, ALL).unwrap().events;
        assert_eq!(kept.len() as u64, next.last().unwrap().position - committed);
    }

    #[test]
    fn given_random_commands_when_a_replica_truncates_any_suffix_then_its_undo_records_leave_the_state_of_a_replica_that_never_had_it() {
        let rt = runtime();
        for seed in 0..4 {
            let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
            // A replicated leader whose commits are known at once: its commands keep undo
            // records (nothing reports them committed, so none is pruned).
            let leader = Arc::new(open(dirs[0].path(), 0));
            let (p, waiting) = random_commands_on_a_replicated_leader(&leader, seed, 60, &rt);
            let events = leader.read_partition(p, 1, ALL).unwrap().events;
            let (leader_undo, leader_state) = (leader.store().undo_positions(p), state_dump(&leader));
            leader.report_replica(p, ReplicaReport { commit: u64::MAX, followers: Vec::new() });
            for answer in waiting {
                let _ = rt.block_on(answer).unwrap();
            }
            let ends: Vec<u64> = events.iter().filter(|e| !e.atomic_with_next).map(|e| e.position).collect();
            assert!(ends.len() > 20, "seed {seed}: only {} accepted commands", ends.len());
            assert_eq!(leader_undo, ends, "seed {seed}: one undo record per accepted command");
            // Followers store the same events in other batches: the same records.
            let follower = follower_of(&leader, p, events.len(), dirs[1].path(), &rt);
            assert_eq!(follower.store().undo_positions(p), ends);
            assert_eq!(state_dump(&follower), leader_state);
            // Cut at several append ends, newest first, on the follower; then the leader, at once
            // to the first of them: each state is that of a replica holding only the kept events.
            let mut cuts: Vec<u64> = [ends.len() * 3 / 4, ends.len() / 2, ends.len() / 5].iter().map(|i| ends[*i]).collect();
            cuts.push(0);
            for after in &cuts {
                rt.block_on(follower.truncate_partition(p, *after)).unwrap();
                let kept = events.iter().filter(|e| e.position <= *after).count();
                let dir = tempfile::tempdir().unwrap();
                let shorter = follower_of(&leader, p, kept, dir.path(), &rt);
                same_state(&follower, &shorter, &format!("seed {seed}: truncated after {after}"));
                assert!(follower.store().undo_positions(p).iter().all(|e| e <= after), "the undone appends' records go");
            }
            // The leader's records are still there: no batch ran after the commit was reported.
            assert_eq!(leader.store().undo_positions(p), ends);
            rt.block_on(leader.truncate_partition(p, cuts[1])).unwrap();
            let kept = events.iter().filter(|e| e.position <= cuts[1]).count();
            let shorter = follower_of(&leader, p, kept, dirs[2].path(), &rt);
            same_state(&leader, &shorter, &format!("seed {seed}: the leader's own commands undone"));
        }
    }

    #[test]
    fn given_a_follower_when_it_learns_a_commit_then_the_undo_records_of_committed_appends_are_pruned() {
        use crate::app::ledger::LedgerCommand::Deposit;
        let rt = runtime();
        let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
        let leader = open(dirs[0].path(), 0);
        let p = leader.partition_of("ledger/book");
        rt.block_on(async {
            leader.command(ledger(Some("c1"), open_account("a"))).await.unwrap();
            for i in 0..4 {
                leader.command(ledger(None, Deposit { account: "a".into(), amount: 10 + i })).await.unwrap();
            }
        });
        assert!(leader.store().undo_positions(p).is_empty(), "a single node keeps no undo records");
        let events = leader.read_partition(p, 1, ALL).unwrap().events;
        let follower = follower_of(&leader, p, 3, dirs[1].path(), &rt);
        assert_eq!(follower.store().undo_positions(p), [1, 2, 3]);
        follower.report_replica(p, ReplicaReport { commit: 2, followers: Vec::new() });
        rt.block_on(follower.replicate(events[3..].to_vec())).unwrap();
        assert_eq!(follower.store().undo_positions(p), [3, 4, 5], "records through the commit go with the next batch");
    }

    #[test]
    fn given_a_leaders_commands_when_a_follower_stores_their_events_then_it_holds_the_same_state_and_command_records() {
        use crate::app::ledger::LedgerCommand::Deposit;
        let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
        let leader = open(dirs[0].path(), 0);
        let rt = runtime();
        let p = leader.partition_of("ledger/book");
        rt.block_on(async {
            leader.command(ledger(Some("c1"), open_account("a"))).await.unwrap();
            leader.command(ledger(Some("c2"), open_account("b"))).await.unwrap();
            leader.command(ledger(Some("c3"), Deposit { account: "a".into(), amount: 100 })).await.unwrap();
            // No id of the client's: nothing recorded, on either side.
            leader.command(ledger(None, Deposit { account: "b".into(), amount: 5 })).await.unwrap();
            leader.command(ledger(Some("c5"), transfer(30))).await.unwrap();
        });
        let events = leader.read_partition(p, 1, ALL).unwrap().events;
        assert_eq!(events.len(), 5);
        let follower = follower_of(&leader, p, 5, dirs[1].path(), &rt);
        assert_eq!(state_dump(&follower), state_dump(&leader), "the same balances, history and command records");

        // A replica that truncates the last two events holds what one that never had them holds.
        let truncated = follower_of(&leader, p, 5, dirs[2].path(), &rt);
        assert_eq!(rt.block_on(truncated.truncate_partition(p, events[2].position)).unwrap(), 2);
        let shorter = follower_of(&leader, p, 3, dirs[3].path(), &rt);
        assert_eq!(state_dump(&truncated), state_dump(&shorter));
        assert_ne!(state_dump(&truncated), state_dump(&leader), "the truncated events changed state");

        // Promoted, the follower answers a retry of the old leader's command as a duplicate with
        // its first result, and refuses the id for another command.
        follower.roles().set(p, 2);
        follower.publish_commit(p, 2, events[4].position);
        follower.report_replica(p, ReplicaReport { commit: events[4].position, followers: Vec::new() });
        let first = rt.block_on(leader.command(ledger(Some("c5"), transfer(30)))).unwrap();
        let retried = rt.block_on(follower.command(ledger(Some("c5"), transfer(30)))).unwrap();
        assert!(retried.duplicate);
        assert_eq!(retried.record, first.record);
        let reused = rt.block_on(follower.command(ledger(Some("c5"), transfer(31)))).unwrap_err();
        assert!(matches!(&reused, CommandError::Rejected(r) if r.code == crate::app::processor::ID_REUSED), "{reused:?}");
    }

    /// What a later leader of `epoch` wrote at `position` of `partition` instead of `leader`'s
    /// event there: the first event of a stream of no domain.
    fn another_leaders_event(leader: &Log, partition: u32, position: u64, epoch: u64) -> crate::storage::EventRecord {
        let other = (0..1000).map(|k| format!("other-{k}")).find(|s| leader.partition_of(s) == partition).unwrap();
        let mut replaced = leader.read_partition(partition, position, ALL).unwrap().events[0].clone();
        (replaced.stream, replaced.stream_version, replaced.epoch, replaced.event_type) = (other, 1, epoch, "E".into());
        (replaced.payload, replaced.metadata) = (b"{}".to_vec(), Vec::new());
        replaced
    }

    #[test]
    fn given_a_query_waiting_for_its_commit_when_a_truncation_undoes_what_it_read_then_it_is_not_answered() {
        use crate::app::ledger::LedgerCommand::Deposit;
        use crate::app::ledger::query::LedgerQuery;
        let (leader_dir, follower_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let leader = open(leader_dir.path(), 0);
        let rt = runtime();
        let p = leader.partition_of("ledger/book");
        rt.block_on(async {
            leader.command(ledger(Some("c1"), open_account("a"))).await.unwrap();
            leader.command(ledger(Some("c2"), Deposit { account: "a".into(), amount: 100 })).await.unwrap();
        });
        let follower = Arc::new(follower_of(&leader, p, 2, follower_dir.path(), &rt));
        follower.report_replica(p, ReplicaReport { commit: 1, followers: Vec::new() });
        // Another leader's event at position 2 (the deposit never committed).
        let replaced = another_leaders_event(&leader, p, 2, 2);
        let balance = |log: Arc<Log>| async move {
            log.query("ledger", "book", |view| {
                <crate::app::ledger::Ledger as crate::app::Domain>::query(view, &LedgerQuery::Balance { account: "a".into() }).ok()
            })
            .await
        };
        let answer = rt.block_on(async {
            // The query reads the deposit (not committed) and waits for the commit to cover it.
            let waiting = tokio::spawn(balance(follower.clone()));
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            follower.truncate_partition(p, 1).await.unwrap();
            follower.replicate(vec![replaced]).await.unwrap();
            follower.report_replica(p, ReplicaReport { commit: 2, followers: Vec::new() });
            waiting.await.unwrap()
        });
        assert!(matches!(answer, Err(AppendError::NotLeader { .. })), "answered from undone state: {answer:?}");
        // Asked again, it answers from the rebuilt state: the deposit is gone.
        let again = rt.block_on(balance(follower.clone())).unwrap().unwrap();
        assert_eq!(again["balance"], 0, "{again}");
    }

    #[test]
    fn given_a_rejection_decided_on_state_a_truncation_then_undoes_then_it_is_turned_into_not_leader() {
        use crate::app::ledger::LedgerCommand::{Deposit, Withdraw};
        let (leader_dir, follower_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let leader = open(leader_dir.path(), 0);
        let rt = runtime();
        let p = leader.partition_of("ledger/book");
        rt.block_on(async {
            leader.command(ledger(Some("c1"), open_account("a"))).await.unwrap();
            leader.command(ledger(Some("c2"), Deposit { account: "a".into(), amount: 100 })).await.unwrap();
            leader.command(ledger(Some("c3"), Withdraw { account: "a".into(), amount: 100 })).await.unwrap();
        });
        // The node holds all three, the withdrawal not committed, and leads (as a deposed leader
        // that does not know it yet would).
        let node = Arc::new(follower_of(&leader, p, 3, follower_dir.path(), &rt));
        node.report_replica(p, ReplicaReport { commit: 2, followers: Vec::new() });
        node.roles().set(p, 2);
        let replaced = another_leaders_event(&leader, p, 3, 3);
        let answer = rt.block_on(async {
            // Rejected against a balance of 0, which counts the withdrawal nobody committed.
            let n = node.clone();
            let waiting = tokio::spawn(async move { n.command(ledger(Some("c4"), Withdraw { account: "a".into(), amount: 50 })).await });
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            node.truncate_partition(p, 2).await.unwrap();
            node.replicate(vec![replaced]).await.unwrap();
            node.report_replica(p, ReplicaReport { commit: 3, followers: Vec::new() });
            waiting.await.unwrap()
        });
        assert!(matches!(answer, Err(CommandError::Failed(AppendError::NotLeader { .. }))), "{answer:?}");
    }

    #[test]
    fn given_epochs_and_a_promise_then_the_replica_state_is_kept_across_restarts_and_truncation_trims_it() {
        let dir = tempfile::tempdir().unwrap();
        let rt = runtime();
        let p;
        {
            let log = open(dir.path(), 0);
            p = log.partition_of("s");
            rt.block_on(log.append(req("s", ExpectedVersion::Any, 2))).unwrap();
            assert_eq!(log.replica_state(p).unwrap().history.starts(), [(SINGLE_NODE_EPOCH, 1)]);
            // A leader of epoch 3 sends two more events.
            let mut more = log.read_partition(p, 1, ALL).unwrap().events;
            for (i, e) in more.iter_mut().enumerate() {
                e.position = 3 + i as u64;
                e.stream_version = 3 + i as u64;
                e.epoch = 3;
            }
            assert_eq!(rt.block_on(log.replicate(more.clone())).unwrap(), 4);
            rt.block_on(log.promise(p, 5)).unwrap();
            // An event of an older epoch than the log's last cannot follow.
            let mut old = more[1].clone();
            (old.position, old.stream_version, old.epoch) = (5, 5, 2);
            assert!(matches!(rt.block_on(log.replicate(vec![old])), Err(AppendError::Invalid(_))));
        }
        let log = open(dir.path(), 0);
        let state = log.replica_state(p).unwrap();
        assert_eq!((state.promised, state.history.starts(), state.last), (5, &[(SINGLE_NODE_EPOCH, 1), (3, 3)][..], 4));
        assert_eq!(rt.block_on(log.truncate_partition(p, 2)).unwrap(), 2);
        assert_eq!(log.replica_state(p).unwrap().history.starts(), [(SINGLE_NODE_EPOCH, 1)]);
        drop(log);
        let log = open(dir.path(), 0);
        let state = log.replica_state(p).unwrap();
        assert_eq!((state.history.starts(), state.last), (&[(SINGLE_NODE_EPOCH, 1)][..], 2));
    }

    #[test]
    fn given_a_closed_log_then_appends_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path(), 0);
        log.close();
        let err = runtime().block_on(log.append(req("s", ExpectedVersion::Any, 1))).unwrap_err();
        assert!(matches!(err, AppendError::ShuttingDown));
    }

    fn expected() -> impl Strategy<Value = ExpectedVersion> {
        prop_oneof![
            Just(ExpectedVersion::Any),
            Just(ExpectedVersion::NoStream),
            Just(ExpectedVersion::StreamExists),
            (0u64..6).prop_map(ExpectedVersion::Exact),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
        /// The real log, fed random appends with random expected versions, accepts exactly those
        /// a model of the rules accepts, and stores exactly the accepted events.
        #[test]
        fn the_log_follows_the_expected_version_rules(ops in proptest::collection::vec((0usize..3, expected(), 1usize..4), 1..40)) {
            let dir = tempfile::tempdir().unwrap();
            let log = open(dir.path(), 0);
            let rt = runtime();
            let mut model: HashMap<String, u64> = HashMap::new();
            for (stream, rule, n) in ops {
                let stream = format!("p-{stream}");
                let current = model.get(&stream).copied().unwrap_or(0);
                let outcome = rt.block_on(log.append(req(&stream, rule, n)));
                if rule.allows(current) {
                    let appended = outcome.unwrap();
                    prop_assert_eq!(appended.stream_version, current + n as u64);
                    model.insert(stream, current + n as u64);
                } else {
                    match outcome {
                        Err(AppendError::WrongExpectedVersion { actual, .. }) => prop_assert_eq!(actual, current),
                        other => prop_assert!(false, "expected a wrong-version error, got {:?}", other),
                    }
                }
            }
            for (stream, version) in model {
                let events = log.read_stream(&stream, 1, ALL).unwrap().events;
                prop_assert_eq!(events.len() as u64, version);
                prop_assert!(events.iter().enumerate().all(|(i, e)| e.stream_version == i as u64 + 1));
            }
        }
    }
}
