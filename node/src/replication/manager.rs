//! The replication shell of one node: a task per partition it replicates, driving that
//! partition's [`Replica`] over the node's [`Log`].
//!
//! Effects run through the log's writer, each awaited until durable, in order (the shell's
//! contract of `replica.rs`): a promise through [`Log::promise`], a truncation through
//! [`Log::truncate_partition`], entries through [`Log::replicate`] (a new leader's marker becomes
//! an event of the partition's `$epochs-` stream); then the batch's messages go out. Leadership:
//! the partition serves (the writer takes appends for it, stamped with its epoch, see
//! [`crate::log::Roles`]) from the `Serving` effect until it steps down. The leader's own appends
//! reach the protocol when the log publishes them durable ([`Replica::leader_appended`]).
//!
//! Stepping down is fenced: before a leader's replica takes an input of a higher epoch, the
//! partition's role is cleared and a promise goes through the writer, which answers with the
//! partition's head counting every append it placed before; the replica learns those appends
//! first, so its view of the log is the log's.
//!
//! A failed effect or a panic of the protocol (on input it did not expect) restarts the
//! partition's replica from what the log holds, as a crash would, and it resumes the leadership
//! this node was granted if that is still its epoch (and it did not hand the partition over in
//! it).
//!
//! Moving the replica set ([`PartitionHandle::set_replicas`]): a leader with a target set
//! replicates to its newcomers as learners while it serves; once they are within
//! [`HANDOVER_CLOSE`] entries it pauses (the role cleared and the writer fenced, as for stepping
//! down) for at most [`HANDOVER_PAUSE`]. If the handover is ready meanwhile it reports it
//! ([`Handovers`]) and never serves that epoch again; otherwise it resumes and tries again after
//! as long a pause.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::{mpsc, watch};

use super::message::{AppendOutcome, Message};
use super::replica::{Effect, Effects, Replica, ReplicaConfig, Role};
use super::shell::{LogView, marker_record, marker_stream, record_of};
use super::{EntryKind, Epoch, EpochHistory, NodeId, Position, Snapshot};
use crate::coordination::election::Handovers;
use crate::log::{AppendError, Log, ReadIndexRequest};
use crate::storage::PartitionImage;

/// How often a partition's replica ticks (resends, heartbeats).
pub const TICK: Duration = Duration::from_millis(50);
/// Messages and grants queued for one partition's task before new ones are dropped.
const QUEUE: usize = 1024;
/// How close (in entries) every newcomer must be to the leader's log before it pauses to hand
/// the partition over.
pub const HANDOVER_CLOSE: Position = 2_048;
/// The longest a leader stays paused waiting for its handover to be ready; it then serves again
/// for as long before it tries again.
pub const HANDOVER_PAUSE: Duration = Duration::from_millis(500);

/// Carries one partition's messages to another node's replica of it. Lossy is fine.
pub trait ReplicaTransport: Send + Sync + 'static {
    fn send(&self, partition: u32, to: NodeId, message: Message);
}

/// What a node holds of one partition's task.
pub struct PartitionHandle {
    inbox: mpsc::Sender<(NodeId, Message)>,
    /// What the coordination store wants of the task: the latest always reaches it (a queue
    /// that drops when full could lose a set change and deliver the grant after it).
    control: watch::Sender<Desired>,
    /// The partition's commit position as this replica knows it.
    pub commit: watch::Receiver<Position>,
}

impl PartitionHandle {
    /// A message from `from` for this partition (dropped when the task is behind).
    pub fn deliver(&self, from: NodeId, message: Message) {
        let _ = self.inbox.try_send((from, message));
    }

    /// The coordination store made this node the partition's leader in `epoch`.
    pub fn grant(&self, epoch: Epoch) {
        self.control.send_if_modified(|d| {
            let higher = epoch > d.grant;
            d.grant = d.grant.max(epoch);
            higher
        });
    }

    /// The partition's replica set is `members` and it moves to `target` (empty: it does
    /// not); `target_names` names the target's nodes for the handover report. Call it before
    /// granting an epoch the new sets belong to: the task applies the sets first.
    pub fn set_replicas(&self, members: Vec<NodeId>, target: Vec<NodeId>, target_names: Vec<String>) {
        self.control.send_if_modified(|d| {
            let changed = d.members != members || d.target != target || d.target_names != target_names;
            (d.members, d.target, d.target_names) = (members, target, target_names);
            changed
        });
    }
}

/// What the coordination store wants of a partition's task: its replica set, the set it moves
/// to, and the highest epoch granted to this node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Desired {
    members: Vec<NodeId>,
    target: Vec<NodeId>,
    target_names: Vec<String>,
    grant: Epoch,
}

/// Starts the task of `partition` on `log`; it runs until the handle is dropped. Handovers
/// ready are reported to `handovers`.
pub fn start_partition(
    log: Arc<Log>,
    partition: u32,
    config: ReplicaConfig,
    transport: Arc<dyn ReplicaTransport>,
    handovers: Arc<Handovers>,
) -> PartitionHandle {
    let (inbox, messages) = mpsc::channel(QUEUE);
    let (control, controls) = watch::channel(Desired { members: config.members.clone(), ..Desired::default() });
    let (commit_tx, commit) = watch::channel(0);
    let (reads_tx, reads) = mpsc::channel(QUEUE);
    // Nothing is appended here until this replica serves.
    log.roles().set(partition, 0);
    log.serve_read_index(partition, reads_tx);
    let inputs = Inputs { messages, controls, reads };
    tokio::spawn(run_partition(log, partition, config, transport, inputs, commit_tx, handovers));
    PartitionHandle { inbox, control, commit }
}

/// Where a partition's task takes its inputs from.
struct Inputs {
    messages: mpsc::Receiver<(NodeId, Message)>,
    controls: watch::Receiver<Desired>,
    /// Linearizable reads asking for their read index ([`Log::read_index`]).
    reads: mpsc::Receiver<ReadIndexRequest>,
}

/// One input of a partition's replica.
enum Input {
    Message(NodeId, Message),
    Desired(Desired),
    Tick,
    /// The log published this head for the partition (the leader's own appends, durable).
    Head(Position),
    ReadIndex(ReadIndexRequest),
}

impl Input {
    /// Whether the input takes the replica past the epoch it promised (a leader steps down):
    /// a grant, or a message the replica promises on (replies of a higher epoch are ignored).
    fn raises(&self, promised: Epoch) -> bool {
        match self {
            Input::Message(
                _,
                message @ (Message::Stale { .. } | Message::Recover { .. } | Message::Fetch { .. } | Message::Append { .. }),
            ) => message.epoch() > promised,
            Input::Message(..) => false,
            Input::Desired(desired) => desired.grant > promised,
            Input::Tick | Input::Head(_) | Input::ReadIndex(_) => false,
        }
    }
}

/// Where a leader stands in handing its partition over to a target set.
#[derive(Default)]
struct Handover {
    /// The target set's names, as the store wrote them.
    target_names: Vec<String>,
    /// Paused since, waiting for the handover to be ready.
    paused_at: Option<tokio::time::Instant>,
    /// No new pause before then (a pause timed out).
    not_before: Option<tokio::time::Instant>,
    /// The epoch in which this node reported the handover ready: it never serves it again.
    reported: Epoch,
}

async fn run_partition(
    log: Arc<Log>,
    partition: u32,
    mut config: ReplicaConfig,
    transport: Arc<dyn ReplicaTransport>,
    inputs: Inputs,
    commit: watch::Sender<Position>,
    handovers: Arc<Handovers>,
) {
    let Inputs { mut messages, mut controls, mut reads } = inputs;
    let mut handover = Handover::default();
    // Linearizable reads waiting for a majority to confirm their round.
    let mut waiting_reads: Vec<(u64, ReadIndexRequest)> = Vec::new();
    // The highest epoch the coordination store granted this node: a replica restarted from the
    // log resumes it (`Replica::become_leader`).
    let mut granted: Epoch = 0;
    let Some(mut replica) = restart(&log, partition, &config, granted, 0).await else { return };
    let mut target: Vec<NodeId> = Vec::new();
    // The replica set as the store last named it (a newcomer's `config.members` is the target).
    let mut applied_members = config.members.clone();
    let mut head = log.partition_head(partition);
    let mut ticks = tokio::time::interval(TICK);
    // A grant whose first commit is still to come: its epoch and when it came (for the log line
    // that says how long taking over took).
    let mut taking_over: Option<(Epoch, std::time::Instant)> = None;
    loop {
        // Only a leader needs its partition's published head (its own appends), and it wakes
        // only when that head moves, not on every group commit of the node.
        let leading = matches!(replica.role(), Role::Leader { .. });
        let input = tokio::select! {
            message = messages.recv() => match message {
                Some((from, message)) => Input::Message(from, message),
                None => return,
            },
            changed = controls.changed() => {
                if changed.is_err() {
                    return;
                }
                Input::Desired(controls.borrow_and_update().clone())
            }
            request = reads.recv() => match request {
                Some(reply) => Input::ReadIndex(reply),
                None => return,
            },
            _ = ticks.tick() => Input::Tick,
            changed = head.changed(), if leading => {
                if changed.is_err() {
                    return;
                }
                Input::Head(*head.borrow_and_update())
            }
        };
        // What changed in what the store wants: the sets first, then a grant (of the new sets).
        let (mut regroup, mut grant) = (false, None);
        if let Input::Desired(desired) = &input {
            if desired.target != target || !same_members(&desired.members, &applied_members) {
                // A newcomer's replica works with the target set until the switch.
                let me = config.me;
                config.members = if desired.members.contains(&me) { desired.members.clone() } else { desired.target.clone() };
                applied_members = desired.members.clone();
                target = desired.target.clone();
                handover.target_names = desired.target_names.clone();
                regroup = true;
            }
            if desired.grant > granted {
                granted = desired.grant;
                grant = Some(desired.grant);
            }
        }
        let mut healthy = true;
        let regrouped = regroup && !same_members(replica.members(), &config.members);
        if matches!(replica.role(), Role::Leader { .. }) && (input.raises(replica.promised()) || regrouped) {
            // Fence before stepping down: once the role is cleared and a promise went through
            // the writer after every append it placed, the replica learns the true head of its
            // epoch; no append of that epoch lands after it decides anything in the next.
            log.roles().set(partition, 0);
            match log.promise(partition, replica.promised()).await {
                Ok(head) => healthy = guarded(partition, || replica.leader_appended(head, &LogView { log: &log, partition })),
                Err(e) => {
                    tracing::error!(partition, error = %e, "cannot fence the partition's appends before stepping down");
                    healthy = false;
                }
            }
        }
        healthy = healthy
            && guarded(partition, || {
                let view = LogView { log: &log, partition };
                match input {
                    Input::Message(from, message) => {
                        if let Some(kind) = notable(&message) {
                            tracing::debug!(partition, from, epoch = message.epoch(), kind, "received");
                        }
                        replica.on_message(from, message, &view)
                    }
                    Input::Desired(_) => {
                        if regroup {
                            replica.set_members(config.members.clone());
                            replica.set_target(target.clone());
                        }
                        if let Some(epoch) = grant {
                            let recovering = replica.become_leader(epoch);
                            tracing::info!(partition, epoch, recovering, "granted the partition's leadership");
                            if recovering {
                                taking_over = Some((epoch, std::time::Instant::now()));
                            }
                        }
                    }
                    Input::Tick => replica.tick(&view),
                    Input::Head(head) => replica.leader_appended(head, &view),
                    Input::ReadIndex(reply) => match replica.read_index(&view) {
                        Some(round) => waiting_reads.push((round, reply)),
                        None => {
                            let _ = reply.send(None);
                        }
                    },
                }
            });
        if healthy && let Err(e) = drive_handover(&log, partition, &mut replica, &mut handover, &handovers).await {
            tracing::error!(partition, error = %e, "cannot fence the partition's appends to hand it over");
            healthy = false;
        }
        // Effects until the replica has nothing more to do (durability reports make sends).
        while healthy {
            let batch = replica.take_effects();
            let ticket = batch.ticket;
            if !batch.effects.is_empty()
                && let Err(e) = execute(&log, partition, batch, transport.as_ref(), &commit).await
            {
                tracing::error!(partition, error = %e, "a replication effect failed");
                healthy = false;
                break;
            }
            healthy = guarded(partition, || replica.on_durable(ticket, &LogView { log: &log, partition }));
            if !replica.has_effects() {
                break;
            }
        }
        answer_reads(&replica, &mut waiting_reads, healthy);
        if !healthy {
            tracing::warn!(partition, "restarting the partition's replica from the log");
            log.metrics().replica_restarts.inc();
            // A leader never serves again an epoch it handed over.
            let resume = if granted == handover.reported { 0 } else { granted };
            let Some(again) = restart(&log, partition, &config, resume, replica.round()).await else { return };
            replica = again;
            replica.set_target(target.clone());
            continue;
        }
        if let Role::Leader { epoch, start } = replica.role() {
            log.publish_commit(partition, epoch, replica.commit());
            if let Some((granted_epoch, since)) = taking_over
                && granted_epoch == epoch
                && replica.commit() >= start
            {
                let ms = since.elapsed().as_millis() as u64;
                tracing::info!(partition, epoch, ms, "the leader's first entry is committed: the partition takes writes");
                taking_over = None;
            }
        }
        log.report_replica(partition, crate::log::ReplicaReport { commit: replica.commit(), followers: replica.followers() });
    }
}

/// The kind of a message worth a debug line: everything but the steady stream of appends and
/// their durable acknowledgements (a `Diverged` reply is logged).
fn notable(message: &Message) -> Option<&'static str> {
    match message {
        Message::Recover { .. } => Some("recover"),
        Message::RecoverReply { .. } => Some("recover-reply"),
        Message::Fetch { .. } => Some("fetch"),
        Message::FetchReply { .. } => Some("fetch-reply"),
        Message::Snapshot { .. } => Some("snapshot"),
        Message::Stale { .. } => Some("stale"),
        Message::AppendReply { outcome: AppendOutcome::Diverged { .. }, .. } => Some("diverged"),
        Message::Append { .. } | Message::AppendReply { .. } => None,
    }
}

/// Whether two replica sets name the same nodes, in any order.
pub fn same_members(a: &[NodeId], b: &[NodeId]) -> bool {
    let (mut a, mut b) = (a.to_vec(), b.to_vec());
    a.sort_unstable();
    b.sort_unstable();
    a == b
}

/// What a leader does next about its target set ([`next_handover_step`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandoverStep {
    /// It does not lead (any pause is over).
    NotLeading,
    /// Nothing to do now.
    Stay,
    /// The move was called off while it paused: serve again.
    CallOff,
    /// Its newcomers are close: pause (fenced like a step-down) to hand over.
    Pause,
    /// Paused and ready: report the handover; it never serves this epoch again.
    Report,
    /// Paused for [`HANDOVER_PAUSE`] and not ready: serve again, and pause no sooner than as
    /// long from now.
    Resume,
}

/// The handover decision of a leader (module doc), shared by the node's shell and the
/// simulator: `reported` is the epoch it last reported a handover in, `paused_for` how long it
/// has been paused to hand over (if it is), `may_pause` whether a pause may start now.
pub fn next_handover_step(replica: &Replica, reported: Epoch, paused_for: Option<Duration>, may_pause: bool) -> HandoverStep {
    let Role::Leader { epoch, .. } = replica.role() else { return HandoverStep::NotLeading };
    if reported == epoch {
        return HandoverStep::Stay;
    }
    if replica.target().is_empty() {
        return if paused_for.is_some() { HandoverStep::CallOff } else { HandoverStep::Stay };
    }
    match paused_for {
        None => {
            let close = replica.learners_matched().is_some_and(|m| m + HANDOVER_CLOSE >= replica.last());
            if close && may_pause { HandoverStep::Pause } else { HandoverStep::Stay }
        }
        Some(_) if replica.handover_ready() => HandoverStep::Report,
        Some(paused) if paused >= HANDOVER_PAUSE => HandoverStep::Resume,
        Some(_) => HandoverStep::Stay,
    }
}

/// A leader with a target set: pauses once its newcomers are close (fencing the writer so the
/// replica knows every append placed), reports the handover once ready, or resumes after
/// [`HANDOVER_PAUSE`] (module doc, [`next_handover_step`]). Errors only when the fence fails.
async fn drive_handover(
    log: &Log,
    partition: u32,
    replica: &mut Replica,
    handover: &mut Handover,
    handovers: &Handovers,
) -> Result<(), AppendError> {
    let now = tokio::time::Instant::now();
    let paused_for = handover.paused_at.map(|since| now.duration_since(since));
    let may_pause = handover.not_before.is_none_or(|t| now >= t);
    let epoch = replica.promised();
    match next_handover_step(replica, handover.reported, paused_for, may_pause) {
        HandoverStep::NotLeading => handover.paused_at = None,
        HandoverStep::Stay => {}
        HandoverStep::CallOff => {
            handover.paused_at = None;
            replica.pause(false);
            log.roles().pause(partition, false);
            tracing::info!(partition, epoch, "the move was called off; serving again");
        }
        HandoverStep::Pause => {
            // Fenced like a step-down (the writer takes no more, the promise counts what it
            // placed), while `quorum` appends already placed still wait for their commit.
            log.roles().pause(partition, true);
            let head = log.promise(partition, epoch).await?;
            replica.leader_appended(head, &LogView { log, partition });
            replica.pause(true);
            handover.paused_at = Some(now);
            tracing::info!(partition, epoch, "paused to hand the partition over");
        }
        HandoverStep::Report => {
            handover.reported = epoch;
            handover.paused_at = None;
            handovers.report(partition, epoch, handover.target_names.clone());
            tracing::info!(partition, epoch, target = ?handover.target_names, "handover ready");
        }
        HandoverStep::Resume => {
            replica.pause(false);
            log.roles().pause(partition, false);
            handover.paused_at = None;
            handover.not_before = Some(now + HANDOVER_PAUSE);
            tracing::info!(partition, epoch, "the handover was not ready in time; serving again");
        }
    }
    Ok(())
}

/// Answers the reads whose round a majority confirmed (with the commit position: everything
/// committed before they arrived is at or below it), and fails them all when the replica no
/// longer leads (or is about to restart).
fn answer_reads(replica: &Replica, waiting: &mut Vec<(u64, ReadIndexRequest)>, healthy: bool) {
    if waiting.is_empty() {
        return;
    }
    if !healthy || !matches!(replica.role(), Role::Leader { .. }) {
        for (_, reply) in waiting.drain(..) {
            let _ = reply.send(None);
        }
        return;
    }
    let (confirmed, commit) = (replica.confirmed_round(), replica.commit());
    for (_, reply) in waiting.extract_if(.., |(round, _)| *round <= confirmed) {
        let _ = reply.send(Some(commit));
    }
}

/// Runs a step of the protocol; false if it panicked (on input it did not expect: the replica
/// is then rebuilt from the log rather than the node brought down).
fn guarded(partition: u32, step: impl FnOnce()) -> bool {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(step)) {
        Ok(()) => true,
        Err(panic) => {
            let what = panic.downcast_ref::<String>().map(String::as_str).or_else(|| panic.downcast_ref::<&str>().copied());
            let what = what.unwrap_or("?");
            tracing::error!(partition, panic = what, "the partition's replica panicked");
            // A broken safety invariant is not bad input: rebuilding would forget the commit
            // position that guards it, and the next attempt could pass. Stop the node loudly.
            if what.contains("would truncate committed entries") || what.contains("two leaders claim") {
                eprintln!("anthill: partition {partition}: replication invariant broken: {what}; stopping");
                std::process::abort();
            }
            false
        }
    }
}

/// A replica of `partition` from what the log holds, as after a crash: the partition takes no
/// appends until it serves again, and it first fences the writer (appends placed before are
/// durable and counted). It resumes leading `granted` when that is still its epoch, with read
/// rounds above `after_round` (the replica it replaces) and above the clock in microseconds
/// (an earlier process's): see [`Replica::start_rounds_at`].
async fn restart(log: &Log, partition: u32, config: &ReplicaConfig, granted: Epoch, after_round: u64) -> Option<Replica> {
    log.roles().set(partition, 0);
    let fenced = match log.store().promised_epoch(partition) {
        Ok(promised) => log.promise(partition, promised).await.map(|_| ()).map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    let state = fenced.and_then(|()| log.replica_state(partition).map_err(|e| e.to_string()));
    match state {
        Ok(state) => {
            let mut replica = Replica::new(config.clone(), state);
            let now_us = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64);
            replica.start_rounds_at(now_us.max(after_round + 1));
            if granted > 0 && replica.become_leader(granted) {
                tracing::info!(partition, epoch = granted, "resuming the leadership granted to this node");
            }
            Some(replica)
        }
        Err(e) => {
            tracing::error!(partition, error = %e, "cannot read the partition's replica state; it will not replicate");
            None
        }
    }
}

/// Runs one batch of effects, each durable before the next; sends last.
async fn execute(
    log: &Log,
    partition: u32,
    batch: Effects,
    transport: &dyn ReplicaTransport,
    commit: &watch::Sender<Position>,
) -> Result<(), AppendError> {
    let mut sends = Vec::new();
    for effect in batch.effects {
        match effect {
            Effect::PersistPromise(epoch) => {
                log.promise(partition, epoch).await?;
            }
            Effect::Truncate { after } => {
                log.truncate_partition(partition, after).await?;
            }
            Effect::Append(entries) => {
                let mut records = Vec::with_capacity(entries.len());
                for entry in &entries {
                    records.push(match entry.kind {
                        EntryKind::Marker => {
                            let version =
                                log.store().stream_version(&marker_stream(partition)).map_err(|e| AppendError::Storage(Arc::new(e)))? + 1;
                            let now_us =
                                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64);
                            marker_record(partition, entry.position, entry.epoch, version, now_us)
                        }
                        EntryKind::Data(_) => record_of(entry).map_err(AppendError::Invalid)?,
                    });
                }
                log.replicate(records).await?;
            }
            Effect::Install(snapshot) => {
                let image = PartitionImage::decode(&snapshot.data).map_err(AppendError::Invalid)?;
                if image.partition != partition || image.position != snapshot.position || image.history != snapshot.history.starts() {
                    return Err(AppendError::Invalid(format!(
                        "partition {partition}: a snapshot at {} holds the image of partition {} at {}, or other epochs",
                        snapshot.position, image.partition, image.position
                    )));
                }
                log.install_image(image).await?;
            }
            Effect::Send { to, message } => {
                if let Some(kind) = notable(&message) {
                    tracing::debug!(partition, to, epoch = message.epoch(), kind, "sending");
                }
                sends.push((to, message));
            }
            Effect::SendSnapshot { to, reply } => {
                let image = log.partition_image(partition).await?;
                let history = EpochHistory::try_from_starts(image.history.clone()).map_err(AppendError::Invalid)?;
                tracing::info!(
                    partition,
                    to,
                    position = image.position,
                    floor = image.floor,
                    "sending a snapshot to a replica that needs it"
                );
                let snapshot = Snapshot { position: image.position, history, data: image.encode() };
                sends.push((to, reply.message(snapshot)));
            }
            Effect::Committed(position) => {
                commit.send_replace(position);
            }
            Effect::Serving { epoch, start } => {
                log.roles().set(partition, epoch);
                tracing::info!(partition, epoch, start, "serving the partition as its leader");
            }
            Effect::SteppedDown { epoch } => {
                log.roles().set(partition, 0);
                tracing::info!(partition, epoch, "stepped down: a higher epoch exists");
            }
        }
    }
    for (to, message) in sends {
        transport.send(partition, to, message);
    }
    Ok(())
}

/// In-process transport between nodes' partition tasks (tests, and one process running several
/// nodes); messages to a node not registered, or cut off, are dropped.
#[derive(Default, Clone)]
pub struct LocalNet {
    nodes: Arc<Mutex<HashMap<NodeId, NodePartitions>>>,
    cut: Arc<Mutex<std::collections::HashSet<NodeId>>>,
}

/// One node's partition tasks, by partition.
pub type NodePartitions = Arc<HashMap<u32, PartitionHandle>>;

/// One node's sending side on a [`LocalNet`].
pub struct LocalSender {
    net: LocalNet,
    from: NodeId,
}

impl LocalNet {
    pub fn sender(&self, from: NodeId) -> Arc<LocalSender> {
        Arc::new(LocalSender { net: self.clone(), from })
    }

    pub fn register(&self, node: NodeId, partitions: NodePartitions) {
        self.nodes.lock().insert(node, partitions);
    }

    /// Cuts `node` off (both ways) or reconnects it.
    pub fn set_cut(&self, node: NodeId, cut: bool) {
        let mut set = self.cut.lock();
        if cut {
            set.insert(node);
        } else {
            set.remove(&node);
        }
    }
}

impl ReplicaTransport for LocalSender {
    fn send(&self, partition: u32, to: NodeId, message: Message) {
        {
            let cut = self.net.cut.lock();
            if cut.contains(&self.from) || cut.contains(&to) {
                return;
            }
        }
        let target = self.net.nodes.lock().get(&to).cloned();
        if let Some(handle) = target.as_ref().and_then(|partitions| partitions.get(&partition)) {
            handle.deliver(self.from, message);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::config::{AppConfig, GroupCommitConfig, LimitsConfig, StorageConfig};
    use crate::log::{AppendRequest, ExpectedVersion, NewEvent};
    use crate::metrics::Metrics;
    use crate::storage::{EventRecord, ReadLimit, Store};

    const ALL: ReadLimit = ReadLimit { max_events: 10_000, max_bytes: usize::MAX };
    const IDS: [NodeId; 3] = [1, 2, 3];

    struct Cluster {
        logs: Vec<Arc<Log>>,
        partitions: Vec<Arc<HashMap<u32, PartitionHandle>>>,
        net: LocalNet,
        _dirs: Vec<tempfile::TempDir>,
    }

    impl Cluster {
        fn start() -> Self {
            let net = LocalNet::default();
            let (mut logs, mut partitions, mut dirs) = (Vec::new(), Vec::new(), Vec::new());
            for id in IDS {
                let dir = tempfile::tempdir().unwrap();
                let store = Arc::new(Store::open(dir.path(), &StorageConfig { partitions: 2, ..StorageConfig::default() }).unwrap());
                let log = Arc::new(
                    Log::start(
                        store,
                        &GroupCommitConfig::default(),
                        &LimitsConfig::default(),
                        &AppConfig::default(),
                        Arc::new(Metrics::default()),
                    )
                    .unwrap(),
                );
                log.set_replicated();
                let config =
                    ReplicaConfig { me: id, members: IDS.to_vec(), max_batch_entries: 64, max_inflight_entries: 256, resend_ticks: 4 };
                let handles: HashMap<u32, PartitionHandle> =
                    (0..2).map(|p| (p, start_partition(log.clone(), p, config.clone(), net.sender(id), Arc::default()))).collect();
                let handles = Arc::new(handles);
                net.register(id, handles.clone());
                logs.push(log);
                partitions.push(handles);
                dirs.push(dir);
            }
            Cluster { logs, partitions, net, _dirs: dirs }
        }

        fn node(&self, id: NodeId) -> &Arc<Log> {
            &self.logs[id as usize - 1]
        }

        fn events(&self, id: NodeId) -> Vec<EventRecord> {
            self.node(id).read_partition_durable(0, 1, ALL).unwrap().events
        }
    }

    /// A stream of partition 0 (of 2).
    fn stream(log: &Log) -> String {
        (0..100).map(|i| format!("s-{i}")).find(|s| log.partition_of(s) == 0).unwrap()
    }

    fn append(stream: &str, payload: &str) -> AppendRequest {
        AppendRequest {
            stream: stream.into(),
            expected: ExpectedVersion::Any,
            events: vec![NewEvent { event_type: "E".into(), payload: payload.into(), metadata: vec![] }],
        }
    }

    async fn until(what: &str, timeout: Duration, mut ready: impl FnMut() -> bool) {
        let deadline = Instant::now() + timeout;
        while !ready() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn given_a_leader_then_followers_hold_its_events_only_it_takes_appends_and_a_new_leader_continues_the_same_log() {
        let c = Cluster::start();
        let s = stream(c.node(1));
        c.partitions[0][&0].grant(1);
        until("node 1 to serve", Duration::from_secs(10), || c.node(1).roles().epoch(0) == 1).await;
        for i in 0..5 {
            let done = c.node(1).append(append(&s, &format!("a{i}"))).await.unwrap();
            // A majority holds every acknowledged `quorum` append.
            c.node(1).wait_quorum(&done, Duration::from_secs(10)).await.unwrap();
            let on_majority = [2, 3].iter().filter(|id| c.events(**id).len() as u64 >= done.last_position).count();
            assert!(on_majority >= 1, "committed at {} with no follower holding it", done.last_position);
        }
        assert!(matches!(c.node(2).append(append(&s, "x")).await, Err(AppendError::NotLeader { partition: 0 })));
        until("followers to hold the marker and five events", Duration::from_secs(10), || {
            let leader = c.events(1);
            leader.len() == 6 && c.events(2) == leader && c.events(3) == leader
        })
        .await;
        until("the leader to commit them", Duration::from_secs(10), || *c.partitions[0][&0].commit.borrow() == 6).await;
        assert_eq!(c.events(1)[0].stream, marker_stream(0), "the leader's epoch starts with its marker");

        c.partitions[1][&0].grant(2);
        until("node 2 to serve and node 1 to step down", Duration::from_secs(10), || {
            c.node(2).roles().epoch(0) == 2 && c.node(1).roles().epoch(0) == 0
        })
        .await;
        for i in 0..2 {
            c.node(2).append(append(&s, &format!("b{i}"))).await.unwrap();
        }
        until("every replica to hold both epochs", Duration::from_secs(10), || {
            let leader = c.events(2);
            leader.len() == 9 && c.events(1) == leader && c.events(3) == leader
        })
        .await;
        let epochs: Vec<u64> = c.events(3).iter().map(|e| e.epoch).collect();
        assert_eq!(epochs, [1, 1, 1, 1, 1, 1, 2, 2, 2]);
        // Stream versions continue across epochs; a follower shows them once it knows them
        // committed (the next Append or heartbeat tells it).
        until("node 3 to show the stream's seven events", Duration::from_secs(10), || {
            c.node(3).read_stream(&s, 1, ALL).unwrap().events.iter().map(|e| e.stream_version).eq(1..=7)
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn given_a_cut_off_leaders_unreplicated_events_when_a_new_leader_serves_then_the_old_leader_truncates_them_and_converges() {
        let c = Cluster::start();
        let s = stream(c.node(1));
        c.partitions[0][&0].grant(1);
        until("node 1 to serve", Duration::from_secs(10), || c.node(1).roles().epoch(0) == 1).await;
        until("the marker to reach the followers", Duration::from_secs(10), || c.events(2).len() == 1 && c.events(3).len() == 1).await;
        c.net.set_cut(1, true);
        for i in 0..3 {
            let done = c.node(1).append(append(&s, &format!("lost{i}"))).await.unwrap();
            // Acknowledged by the leader alone: a `quorum` append would still be waiting.
            let quorum = c.node(1).wait_quorum(&done, Duration::from_millis(300)).await;
            assert!(matches!(quorum, Err(AppendError::QuorumTimeout { partition: 0 })), "{quorum:?}");
        }
        assert_eq!(c.events(1).len(), 4, "durable on the cut-off leader only");
        c.partitions[1][&0].grant(2);
        until("node 2 to serve", Duration::from_secs(10), || c.node(2).roles().epoch(0) == 2).await;
        c.node(2).append(append(&s, "kept")).await.unwrap();
        c.net.set_cut(1, false);
        until("node 1 to converge on node 2's log", Duration::from_secs(10), || {
            let leader = c.events(2);
            leader.len() == 3 && c.events(1) == leader && c.events(3) == leader
        })
        .await;
        let payloads: Vec<String> = c.events(1).iter().map(|e| String::from_utf8_lossy(&e.payload).into_owned()).collect();
        assert!(!payloads.iter().any(|p| p.starts_with("lost")), "{payloads:?}");
        assert_eq!(c.node(1).roles().epoch(0), 0);
        assert_eq!(c.node(1).store().stream_version(&s).unwrap(), 1, "the truncated events are gone from the stream too");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn given_a_leader_under_load_when_it_steps_down_and_is_granted_again_then_it_serves_again_and_the_logs_converge() {
        let c = Arc::new(Cluster::start());
        let s = stream(c.node(1));
        c.partitions[0][&0].grant(1);
        until("node 1 to serve", Duration::from_secs(10), || c.node(1).roles().epoch(0) == 1).await;
        // Appends to node 1 all along: some land while it steps down.
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let load = {
            let (c, s, stop) = (c.clone(), s.clone(), stop.clone());
            tokio::spawn(async move {
                let mut ok = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if c.node(1).append(append(&s, "load")).await.is_ok() {
                        ok += 1;
                    } else {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
                ok
            })
        };
        until("some appends", Duration::from_secs(10), || c.events(1).len() > 20).await;
        c.partitions[1][&0].grant(2);
        until("node 2 to serve", Duration::from_secs(10), || c.node(2).roles().epoch(0) == 2).await;
        c.partitions[0][&0].grant(3);
        until("node 1 to serve again", Duration::from_secs(10), || c.node(1).roles().epoch(0) == 3).await;
        let before = c.events(1).len();
        until("appends to land in epoch 3", Duration::from_secs(10), || c.events(1).len() > before + 20).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(load.await.unwrap() > 40);
        until("every replica to hold node 1's log", Duration::from_secs(10), || {
            let leader = c.events(1);
            c.events(2) == leader && c.events(3) == leader
        })
        .await;
        let restarts: u64 = c.logs.iter().map(|l| l.metrics().replica_restarts.get()).sum();
        assert_eq!(restarts, 0, "stepping down under load is fenced, not repaired by a restart");
        let epochs: Vec<u64> = c.events(1).iter().map(|e| e.epoch).collect();
        assert!(epochs.windows(2).all(|w| w[0] <= w[1]) && epochs.contains(&2) && epochs.last() == Some(&3), "{epochs:?}");
    }
}
