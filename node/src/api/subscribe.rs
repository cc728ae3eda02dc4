//! Subscriptions: replay from a position, then follow new commits, with bounded memory.
//!
//! Each subscription is one task that reads the log itself, a chunk at a time, and pushes events
//! into a channel of `limits.subscribe_buffer_events` slots that tonic drains as the client reads.
//! When the client is slow the channel fills and the task simply waits: nothing is buffered beyond
//! that channel and one chunk, however far behind the subscriber is. New events are never pushed
//! to subscribers; a subscriber wakes on the log's commit point and reads them from LMDB, so a
//! thousand idle subscribers cost a thousand parked tasks and nothing more.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use anthill_proto::v1 as pb;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use super::{Api, recorded_event, storage_status};
use crate::log::{self, Log};

/// Events read from LMDB per step; also bounds the events held outside the channel.
const CHUNK_EVENTS: usize = 256;

/// What one subscription follows and from where.
#[derive(Debug)]
pub(super) struct Plan {
    /// Next position to deliver, per followed partition.
    next: BTreeMap<u32, u64>,
    /// Only these streams, when set.
    streams: Option<HashSet<String>>,
    buffer_events: usize,
}

impl Plan {
    pub fn from_request(api: &Api, req: pb::SubscribeRequest) -> Result<Self, Status> {
        if !req.partitions.is_empty() && !req.streams.is_empty() {
            return Err(Status::invalid_argument("partitions and streams: give one filter or the other, not both"));
        }
        let limits = api.log.limits();
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
        Ok(Plan { next, streams, buffer_events: limits.subscribe_buffer_events })
    }
}

type Sender = mpsc::Sender<Result<pb::SubscribeResponse, Status>>;

pub(super) fn start(log: Arc<Log>, plan: Plan, shutdown: watch::Receiver<bool>) -> ReceiverStream<Result<pb::SubscribeResponse, Status>> {
    let (tx, rx) = mpsc::channel(plan.buffer_events);
    tokio::spawn(async move {
        log.metrics().subscribers.inc();
        let partitions = plan.next.len();
        tracing::debug!(partitions, "subscription started");
        let outcome = follow(&log, plan, &tx, shutdown).await;
        if let Err(status) = outcome {
            let _ = tx.send(Err(status)).await;
        }
        log.metrics().subscribers.dec();
        tracing::debug!("subscription ended");
    });
    ReceiverStream::new(rx)
}

/// Ok(()) when the client went away; Err with the status to end the stream with otherwise.
async fn follow(log: &Arc<Log>, mut plan: Plan, tx: &Sender, mut shutdown: watch::Receiver<bool>) -> Result<(), Status> {
    let mut commits = log.commits();
    let mut caught_up = HashSet::new();
    loop {
        let heads = commits.borrow_and_update().heads.clone();
        for (&partition, next) in plan.next.iter_mut() {
            let head = heads[partition as usize];
            while *next <= head {
                let (reader, from) = (log.clone(), *next);
                let events = tokio::task::spawn_blocking(move || reader.read_partition(partition, from, CHUNK_EVENTS))
                    .await
                    .map_err(|e| Status::internal(format!("read task failed: {e}")))?
                    .map_err(|e| storage_status(&e))?;
                if events.is_empty() {
                    return Err(Status::internal(format!("partition {partition}: head is {head} but nothing is stored at {from}")));
                }
                for event in events {
                    debug_assert_eq!(event.position, *next, "subscription positions are dense");
                    *next = event.position + 1;
                    if plan.streams.as_ref().is_some_and(|s| !s.contains(&event.stream)) {
                        continue;
                    }
                    if !send(tx, pb::subscribe_response::Message::Event(recorded_event(event)), &mut shutdown).await? {
                        return Ok(());
                    }
                }
            }
            if caught_up.insert(partition) {
                let message = pb::subscribe_response::Message::CaughtUp(pb::CaughtUp { partition, position: *next - 1 });
                if !send(tx, message, &mut shutdown).await? {
                    return Ok(());
                }
            }
        }
        tokio::select! {
            changed = commits.changed() => if changed.is_err() {
                return Err(Status::unavailable("the node is shutting down"));
            },
            _ = shutdown.wait_for(|stop| *stop) => return Err(Status::unavailable("the node is shutting down")),
            _ = tx.closed() => return Ok(()),
        }
    }
}

/// Sends one message, waiting while the client's buffer is full. Ok(false): the client is gone.
/// A node shutting down ends the wait, so a stalled client never holds up shutdown.
async fn send(tx: &Sender, message: pb::subscribe_response::Message, shutdown: &mut watch::Receiver<bool>) -> Result<bool, Status> {
    tokio::select! {
        sent = tx.send(Ok(pb::SubscribeResponse { message: Some(message) })) => Ok(sent.is_ok()),
        _ = shutdown.wait_for(|stop| *stop) => Err(Status::unavailable("the node is shutting down")),
    }
}
