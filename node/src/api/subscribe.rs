//! Subscriptions: replay from a position, then follow new commits, with bounded memory.
//!
//! Each subscription is one task that reads the log itself, a chunk at a time, and pushes events
//! into a queue that tonic drains as the client reads. The queue is bounded in bytes
//! (`limits.subscribe_buffer_bytes`, a semaphore whose permits a message holds until tonic takes
//! it) and in messages. When the client is slow the queue fills and the task simply waits: a
//! subscriber costs at most its buffer plus one chunk (itself at most the buffer's size, or one
//! event), however far behind it is. New events are never pushed
//! to subscribers; a subscriber wakes on the log's commit point and reads them from LMDB, so a
//! thousand idle subscribers cost a thousand parked tasks and nothing more.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use anthill_proto::v1 as pb;
use std::pin::Pin;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::Status;

use super::{Api, recorded_event, storage_status};
use crate::log::{self, Log};
use crate::security::auth::{Auth, Caller, Role, tenant_of};
use crate::security::keys::Keys;
use crate::storage::ReadLimit;

/// Events read from LMDB per step; also bounds the events held outside the channel.
const CHUNK_EVENTS: usize = 256;

/// What one subscription follows and from where.
#[derive(Debug)]
pub(super) struct Plan {
    /// Next position to deliver, per followed partition.
    next: BTreeMap<u32, u64>,
    /// Only these streams, when set.
    streams: Option<HashSet<String>>,
    /// Bytes of events buffered for the client before the task waits.
    buffer_bytes: usize,
    /// Opens sealed events (a forgotten tenant's come redacted).
    keys: Option<Keys>,
    /// The caller, checked against the auth table as it is now after each read from disk: a
    /// revoked token or a withdrawn grant ends the subscription.
    caller: Option<(Caller, Auth)>,
}

impl Plan {
    pub fn from_request(api: &Api, req: pb::SubscribeRequest) -> Result<Self, Status> {
        if !req.partitions.is_empty() && !req.streams.is_empty() {
            return Err(Status::invalid_argument("partitions and streams: give one filter or the other, not both"));
        }
        let limits = api.log.limits();
        if req.streams.len() > limits.max_subscribe_streams {
            return Err(Status::invalid_argument(format!(
                "streams: {} streams in one Subscribe, the limit is {} (limits.max_subscribe_streams)",
                req.streams.len(),
                limits.max_subscribe_streams
            )));
        }
        let mut partitions: Vec<u32> = req.partitions.clone();
        for partition in &partitions {
            api.check_partition(*partition)?;
        }
        for stream in &req.streams {
            log::validate_stream_id(limits, stream).map_err(|e| Status::invalid_argument(format!("streams: {e}")))?;
            partitions.push(api.log.partition_of(stream));
        }
        if partitions.is_empty() {
            partitions = (0..api.log.partition_count()).collect();
        }
        for partition in req.partition_positions.keys() {
            api.check_partition(*partition).map_err(|s| Status::invalid_argument(format!("partition_positions: {}", s.message())))?;
        }
        let next =
            partitions.into_iter().map(|p| (p, req.partition_positions.get(&p).copied().unwrap_or(req.from_position).max(1))).collect();
        let streams = (!req.streams.is_empty()).then(|| req.streams.into_iter().collect());
        Ok(Plan { next, streams, buffer_bytes: limits.subscribe_buffer_bytes, keys: api.keys.clone(), caller: None })
    }

    pub fn checking(mut self, caller: Caller, auth: Option<Auth>) -> Self {
        self.caller = auth.map(|auth| (caller, auth));
        self
    }
}

/// Whether the subscription's caller may still read what it follows.
fn still_allowed(caller: &Option<(Caller, Auth)>, streams: &Option<HashSet<String>>) -> Result<(), Status> {
    let Some((caller, auth)) = caller else { return Ok(()) };
    let now = caller.now(Some(auth)).ok_or_else(|| Status::unauthenticated("the subscription's token was revoked"))?;
    match streams {
        Some(streams) => streams.iter().try_for_each(|s| now.require(tenant_of(s), Role::Read)),
        None => now.require("*", Role::Read),
    }
}

/// One message and the buffer bytes it holds until tonic takes it from the stream.
type Item = (Result<pb::SubscribeResponse, Status>, Option<OwnedSemaphorePermit>);
type Sender = mpsc::Sender<Item>;
pub(super) type EventStream = Pin<Box<dyn Stream<Item = Result<pb::SubscribeResponse, Status>> + Send>>;

/// How long the closing status of a subscription may wait for room in the client's queue.
const FINAL_STATUS_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Most messages queued per subscriber, whatever their size. With small events this count binds
/// before the byte budget (1,024 events of under 4 KiB stay under the default 4 MiB).
const QUEUE_MESSAGES: usize = 1024;

pub(super) fn start(log: Arc<Log>, plan: Plan, shutdown: watch::Receiver<bool>) -> EventStream {
    let (tx, rx) = mpsc::channel(QUEUE_MESSAGES);
    let budget = Arc::new(Semaphore::new(plan.buffer_bytes));
    tokio::spawn(async move {
        log.metrics().subscribers.inc();
        let partitions = plan.next.len();
        tracing::debug!(partitions, "subscription started");
        let outcome = follow(&log, plan, &tx, &budget, shutdown).await;
        if let Err(status) = outcome {
            // Deliver the closing status behind what is queued, but never wait long: a stalled
            // client must not hold the task (or shutdown) up.
            let _ = tokio::time::timeout(FINAL_STATUS_WAIT, tx.send((Err(status), None))).await;
        }
        log.metrics().subscribers.dec();
        tracing::debug!("subscription ended");
    });
    // The permit is released as tonic pulls the message, freeing its bytes of the budget.
    Box::pin(ReceiverStream::new(rx).map(|(message, _permit)| message))
}

/// Ok(()) when the client went away; Err with the status to end the stream with otherwise.
async fn follow(
    log: &Arc<Log>,
    mut plan: Plan,
    tx: &Sender,
    budget: &Arc<Semaphore>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), Status> {
    let mut commits = log.commits();
    let mut commit_moves = log.commit_moves();
    let mut caught_up = HashSet::new();
    let limit = ReadLimit { max_events: CHUNK_EVENTS, max_bytes: plan.buffer_bytes };
    loop {
        let heads = commits.borrow_and_update().heads.clone();
        for (&partition, next) in plan.next.iter_mut() {
            // Only committed events, on a leader too: a read model never sees what a failover
            // undoes (docs/replication.md, "Reads").
            let head = heads[partition as usize].min(log.committed_through(partition));
            loop {
                // Events retention gave up (also while this loop reads) are skipped: the
                // subscription goes on from the oldest one kept, as a Kafka consumer resets to
                // the earliest offset (docs/storage.md).
                *next = (*next).max(log.store().partition_floor(partition) + 1);
                if *next > head {
                    break;
                }
                let (reader, from) = (log.clone(), *next);
                let slice = tokio::task::spawn_blocking(move || reader.read_partition(partition, from, limit))
                    .await
                    .map_err(|e| Status::internal(format!("read task failed: {e}")))?
                    .map_err(|e| storage_status(&e))?;
                still_allowed(&plan.caller, &plan.streams)?;
                if slice.events.is_empty() {
                    if from <= log.store().partition_floor(partition) {
                        continue;
                    }
                    return Err(Status::data_loss(format!("partition {partition}: head is {head} but nothing is stored at {from}")));
                }
                for event in slice.events {
                    // Dense, but for events given up since `next` was set (a trim in between).
                    debug_assert!(event.position >= *next, "subscription positions only grow");
                    *next = event.position + 1;
                    if plan.streams.as_ref().is_some_and(|s| !s.contains(&event.stream)) {
                        continue;
                    }
                    let event = match &plan.keys {
                        Some(keys) => keys.open_or_redact(event).map_err(|e| e.status())?,
                        None => event,
                    };
                    let bytes = event.payload.len()
                        + event.stream.len()
                        + event.event_type.len()
                        + event.metadata.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
                        + 64;
                    if !send(
                        tx,
                        (budget, plan.buffer_bytes),
                        bytes,
                        pb::subscribe_response::Message::Event(recorded_event(event)),
                        &mut shutdown,
                    )
                    .await?
                    {
                        return Ok(());
                    }
                }
            }
            if caught_up.insert(partition) {
                let message = pb::subscribe_response::Message::CaughtUp(pb::CaughtUp { partition, position: (*next - 1).min(head) });
                if !send(tx, (budget, plan.buffer_bytes), 64, message, &mut shutdown).await? {
                    return Ok(());
                }
            }
        }
        tokio::select! {
            changed = commits.changed() => if changed.is_err() {
                return Err(Status::unavailable("the node is shutting down"));
            },
            // In a cluster the commit position moves after the head (a majority acknowledged).
            changed = commit_moves.changed() => if changed.is_err() {
                return Err(Status::unavailable("the node is shutting down"));
            },
            _ = shutdown.wait_for(|stop| *stop) => return Err(Status::unavailable("the node is shutting down")),
            _ = tx.closed() => return Ok(()),
        }
    }
}

/// Sends one message once the buffer has room for its bytes. Ok(false): the client is gone.
/// A node shutting down ends the wait, so a stalled client never holds up shutdown.
async fn send(
    tx: &Sender,
    (budget, total): (&Arc<Semaphore>, usize),
    bytes: usize,
    message: pb::subscribe_response::Message,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<bool, Status> {
    // A message larger than the whole budget takes all of it, and so goes alone.
    let permits = bytes.min(total).max(1) as u32;
    let stopping = || Status::unavailable("the node is shutting down");
    let permit = tokio::select! {
        permit = budget.clone().acquire_many_owned(permits) => permit.expect("the budget is never closed"),
        _ = shutdown.wait_for(|stop| *stop) => return Err(stopping()),
    };
    tokio::select! {
        sent = tx.send((Ok(pb::SubscribeResponse { message: Some(message) }), Some(permit))) => Ok(sent.is_ok()),
        _ = shutdown.wait_for(|stop| *stop) => Err(stopping()),
    }
}
