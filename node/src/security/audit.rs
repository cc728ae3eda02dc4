//! The audit stream: every admin action and every call refused for a missing grant, as an
//! event of the reserved stream `$audit/<node>` of the node that saw it (docs/security.md
//! "Audit").
//!
//! - A record is made where the action is decided ([`crate::security::auth::Caller::audit`]):
//!   logged on the `anthill::audit` target, then queued without waiting ([`Audit::record`]). At
//!   most [`QUEUE`] records wait; past that a record is counted in
//!   `anthill_audit_records_dropped_total` and kept in the log only, so a flood of refusals
//!   cannot hold up calls or fill memory.
//! - One task per node appends what waits, up to [`BATCH`] records per append, acknowledged by a
//!   quorum of the stream's partition: here when this node leads that partition, else through
//!   the `Cluster.Audit` call of its leader ([`Acceptor`]), which appends to the calling
//!   member's own stream only (with TLS, the member its certificate names). A batch not
//!   acknowledged is sent again until it is, so after a failover a record may be stored twice:
//!   each carries an id (`<node>:<boot>:<sequence>`) to tell.
//! - Clients cannot append to a stream whose id starts with `$` (the log refuses it; only
//!   [`Log::append_audit`] appends to `$audit/...`); reading
//!   `$audit/...` needs `read:*` or `cluster-admin` (its tenant, `$audit`, is one no tenant
//!   grant can name).
//!
//! Records queued when a node stops and not yet appended are lost from the stream (the log has
//! them). The records are not sealed by encryption at rest: they hold names, token ids, grants
//! and tenants, never payloads or secrets.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anthill_proto::v1 as pb;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tonic::Status;

use crate::config::MemberConfig;
use crate::coordination::election::ClusterView;
use crate::coordination::transport::{peer_endpoint, until_stopped};
use crate::log::{self, AppendError, AppendRequest, ExpectedVersion, Log, NewEvent};
use crate::metrics::Metrics;
use crate::security::identity::Peer;
use crate::security::tls::Tls;

/// Every node's audit stream is `$audit/<node>`.
pub const STREAM_PREFIX: &str = "$audit/";
/// The type of the audit stream's events (a JSON [`Record`] each).
pub const EVENT_TYPE: &str = "audit-record";
/// Records that may wait for their append; past it new ones are dropped (and counted).
pub const QUEUE: usize = 4096;
/// Most records in one append (and in one `Cluster.Audit` call).
pub const BATCH: usize = 256;
/// Largest record `Cluster.Audit` takes (a record's fields are clipped to [`MAX_FIELD_BYTES`],
/// which JSON escaping can grow up to six times).
pub const MAX_RECORD_BYTES: usize = 64 << 10;
/// How long a forwarded batch may wait for its acknowledgement.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);
const PAUSE_MIN: Duration = Duration::from_millis(100);
const PAUSE_MAX: Duration = Duration::from_secs(2);

/// A node's audit stream.
pub fn stream_of(node: &str) -> String {
    format!("{STREAM_PREFIX}{node}")
}

/// One audited action, as stored (JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// `<node>:<boot>:<sequence>`: a record stored twice (a batch sent again) has one id.
    pub id: String,
    pub at_unix_ms: u64,
    /// Who asked: `certificate "alice"`, `token 0123456789abcdef ("ci")`, `anonymous ""`.
    pub by: String,
    /// What was asked: `drain`, `token created`, `refused: missing grant`, ...
    pub action: String,
    /// `done`, `allowed` (an operation let through, before it runs) or `refused`.
    pub outcome: String,
    /// What it was about: the token, the grants, the tenant, the grant that was missing.
    pub detail: String,
}

/// Queues a node's audit records for its stream; cheap to clone.
#[derive(Clone)]
pub struct Audit {
    inner: Arc<Inner>,
}

struct Inner {
    node: String,
    /// Tells this run's records from those of the node's earlier runs.
    boot: String,
    sequence: AtomicU64,
    queue: mpsc::Sender<Record>,
    refusals: parking_lot::Mutex<Refusals>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Audit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Audit({})", stream_of(&self.inner.node))
    }
}

/// Two handles are equal when they feed the same stream's queue.
impl PartialEq for Audit {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }
}

impl Eq for Audit {}

impl Audit {
    /// Queues a record; never waits. Dropped (and counted) when the queue is full, and a refusal
    /// also when half of it is taken or its caller had [`REFUSALS_PER_SECOND`] this second: a
    /// caller who sends refused calls as fast as it can fills neither the queue nor the stream,
    /// and leaves room for the operations.
    pub fn record(&self, by: &str, action: &str, outcome: &str, detail: &str) {
        let inner = &self.inner;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        if outcome == "refused"
            && (inner.queue.capacity() < inner.queue.max_capacity() / 2 || !inner.refusals.lock().take(by, now.as_secs()))
        {
            inner.metrics.audit_records_dropped.inc();
            return;
        }
        let sequence = inner.sequence.fetch_add(1, Ordering::Relaxed);
        let record = Record {
            id: format!("{}:{}:{sequence}", inner.node, inner.boot),
            at_unix_ms: now.as_millis() as u64,
            by: clipped(by),
            action: clipped(action),
            outcome: outcome.to_string(),
            detail: clipped(detail),
        };
        match inner.queue.try_send(record) {
            Ok(()) => _ = inner.metrics.audit_records_pending.inc(),
            Err(_) => _ = inner.metrics.audit_records_dropped.inc(),
        }
    }
}

/// Refusals a caller may add to the stream per second (the rest are logged only).
pub const REFUSALS_PER_SECOND: u32 = 20;
/// Callers whose refusals of the current second are counted; past it the count starts over.
const MAX_COUNTED: usize = 10_000;
/// Longest `by`, `action` or `detail` kept (a caller's stream or tenant name can be long).
pub const MAX_FIELD_BYTES: usize = 1024;

/// The refusals of each caller in the current second.
#[derive(Default)]
struct Refusals {
    second: u64,
    counts: std::collections::HashMap<String, u32>,
}

impl Refusals {
    /// Counts one refusal of `by` in `second`; `false` past the caller's allowance.
    fn take(&mut self, by: &str, second: u64) -> bool {
        if second != self.second || self.counts.len() >= MAX_COUNTED {
            (self.second, self.counts) = (second, Default::default());
        }
        let count = self.counts.entry(by.to_string()).or_default();
        *count += 1;
        *count <= REFUSALS_PER_SECOND
    }
}

/// `text`, cut to [`MAX_FIELD_BYTES`] (on a character boundary) with a mark saying so.
fn clipped(text: &str) -> String {
    if text.len() <= MAX_FIELD_BYTES {
        return text.to_string();
    }
    let mut end = MAX_FIELD_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes in all)", &text[..end], text.len())
}

/// How a node that does not lead its audit stream's partition reaches the one that does.
pub struct Forwarding {
    /// The cluster as this node's member sees it: who leads which partition, where members are.
    pub view: watch::Receiver<ClusterView>,
    /// The configured members (addresses of those the view has none for).
    pub members: Vec<MemberConfig>,
    /// The address connections leave from ([`crate::coordination::transport::outgoing_address`]).
    pub local: Option<IpAddr>,
    pub tls: Option<Tls>,
}

/// Starts the task that appends `node`'s records to its stream until `stopped`; `forwarding` is
/// `None` on a single node (it leads every partition).
pub fn start(node: String, log: Arc<Log>, forwarding: Option<Forwarding>, metrics: Arc<Metrics>, stopped: watch::Receiver<bool>) -> Audit {
    let (queue, waiting) = mpsc::channel(QUEUE);
    let boot = format!("{:08x}", rand::random::<u32>());
    let inner =
        Inner { node: node.clone(), boot, sequence: AtomicU64::new(1), queue, refusals: Default::default(), metrics: metrics.clone() };
    let audit = Audit { inner: Arc::new(inner) };
    let batch = BATCH.min(log.limits().max_events_per_append).max(1);
    let writer = Writer { stream: stream_of(&node), node, log, forwarding, channel: None, metrics, batch };
    tokio::spawn(writer.run(waiting, stopped));
    audit
}

struct Writer {
    node: String,
    stream: String,
    log: Arc<Log>,
    forwarding: Option<Forwarding>,
    /// The connection to the leader last forwarded to, by its name.
    channel: Option<(String, tonic::transport::Channel)>,
    metrics: Arc<Metrics>,
    /// Most records per append: [`BATCH`], or fewer when `limits.max_events_per_append` says so.
    batch: usize,
}

/// Why an append of records failed.
enum Failure {
    /// It may work later (no leader yet, a failover, a peer away, a leader of an older version).
    Passing(String),
    /// The log or the leader refused the records: sent again, they would be refused again.
    Refused(String),
}

impl Writer {
    async fn run(mut self, mut waiting: mpsc::Receiver<Record>, mut stopped: watch::Receiver<bool>) {
        // Records taken from the queue, oldest first; the next append takes up to a batch of
        // them, or one while `one_by_one` records of a refused batch are left (so one bad record
        // costs only itself).
        let mut pending: std::collections::VecDeque<Record> = Default::default();
        let mut one_by_one = 0usize;
        let mut pause = PAUSE_MIN;
        let mut failures = 0u32;
        loop {
            if pending.is_empty() {
                tokio::select! {
                    record = waiting.recv() => match record {
                        Some(record) => pending.push_back(record),
                        None => return,
                    },
                    _ = until_stopped(&mut stopped) => return,
                }
            }
            while pending.len() < self.batch {
                let Ok(record) = waiting.try_recv() else { break };
                pending.push_back(record);
            }
            let n = if one_by_one > 0 { 1 } else { pending.len().min(self.batch) };
            let batch: Vec<Record> = pending.iter().take(n).cloned().collect();
            let sent = tokio::select! {
                sent = self.append(&batch) => sent,
                _ = until_stopped(&mut stopped) => return,
            };
            match sent {
                Ok(()) => {
                    self.metrics.audit_records_written.inc_by(n as u64);
                    self.metrics.audit_records_pending.dec_by(n as i64);
                    pending.drain(..n);
                    one_by_one = one_by_one.saturating_sub(n);
                    (pause, failures) = (PAUSE_MIN, 0);
                }
                Err(Failure::Refused(e)) if n > 1 => {
                    tracing::warn!(stream = %self.stream, records = n, error = %e, "a batch of audit records was refused; sending them one by one");
                    one_by_one = n;
                }
                Err(Failure::Refused(e)) => {
                    let record = pending.pop_front().expect("the record just sent");
                    tracing::error!(stream = %self.stream, id = %record.id, error = %e, "an audit record was refused; it is in the log only");
                    self.metrics.audit_records_dropped.inc();
                    self.metrics.audit_records_pending.dec();
                    one_by_one = one_by_one.saturating_sub(1);
                }
                Err(Failure::Passing(e)) => {
                    // Expected for a moment at start and during failovers; worth a warning
                    // when it lasts.
                    failures = failures.saturating_add(1);
                    if failures >= 8 && failures.is_power_of_two() {
                        tracing::warn!(stream = %self.stream, records = batch.len(), error = %e, failures, "audit records not appended yet; still trying");
                    } else {
                        tracing::debug!(stream = %self.stream, error = %e, "audit records not appended; trying again");
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = until_stopped(&mut stopped) => return,
                    }
                    pause = (pause * 2).min(PAUSE_MAX);
                }
            }
        }
    }

    /// Appends `batch` to the stream, here or at its partition's leader.
    async fn append(&mut self, batch: &[Record]) -> Result<(), Failure> {
        let partition = self.log.partition_of(&self.stream);
        if self.forwarding.is_none() || self.log.leads(partition) {
            return append_here(&self.log, &self.stream, batch.iter().map(event).collect()).await.map_err(|e| match e {
                AppendError::Invalid(_) => Failure::Refused(e.to_string()),
                _ => Failure::Passing(e.to_string()),
            });
        }
        let forwarding = self.forwarding.as_ref().expect("checked above");
        let (leader, address) = {
            let view = forwarding.view.borrow();
            let leader = view.partitions.get(&partition).and_then(|o| o.serving_leader()).map(|(name, _)| name.to_string());
            let Some(leader) = leader else { return Err(Failure::Passing(format!("partition {partition} has no leader"))) };
            let address = view
                .members
                .get(&leader)
                .cloned()
                .or_else(|| forwarding.members.iter().find(|m| m.name == leader).map(|m| m.address.to_string()));
            (leader, address)
        };
        if leader == self.node {
            return Err(Failure::Passing(format!("partition {partition} is becoming this node's")));
        }
        let Some(address) = address else {
            return Err(Failure::Passing(format!("the address of {leader}, partition {partition}'s leader, is unknown")));
        };
        let channel = match &self.channel {
            Some((name, channel)) if *name == leader => channel.clone(),
            _ => {
                let endpoint = peer_endpoint(&leader, &address, forwarding.tls.as_ref()).map_err(|e| Failure::Passing(e.to_string()))?;
                let channel = endpoint.connect_timeout(Duration::from_secs(1)).local_address(forwarding.local).connect_lazy();
                self.channel = Some((leader.clone(), channel.clone()));
                channel
            }
        };
        let records = batch.iter().map(|r| serde_json::to_vec(r).expect("a record serializes")).collect();
        let mut request = tonic::Request::new(pb::AuditBatch { member: self.node.clone(), records });
        request.set_timeout(CALL_TIMEOUT);
        match pb::cluster_client::ClusterClient::new(channel).audit(request).await {
            Ok(_) => Ok(()),
            // The leader checked the records and refused them.
            // (Not `PERMISSION_DENIED`: a leader that does not list this node yet, in a
            // membership change, refuses it that way for a while.)
            Err(status) if status.code() == tonic::Code::InvalidArgument => Err(Failure::Refused(format!("{leader}: {status}"))),
            Err(status) => {
                // Connect again next time, with the TLS files as they are then.
                self.channel = None;
                Err(Failure::Passing(format!("{leader}: {status}")))
            }
        }
    }
}

fn event(record: &Record) -> NewEvent {
    NewEvent { event_type: EVENT_TYPE.into(), payload: serde_json::to_vec(record).expect("a record serializes"), metadata: Vec::new() }
}

/// Appends `events` to `stream` on this node (which must lead its partition), acknowledged by
/// a quorum.
async fn append_here(log: &Log, stream: &str, events: Vec<NewEvent>) -> Result<(), AppendError> {
    let done = log.append_audit(AppendRequest { stream: stream.to_string(), expected: ExpectedVersion::Any, events }).await?;
    log.wait_quorum(&done, log::QUORUM_WAIT).await
}

/// The leader's side of `Cluster.Audit`: appends a member's records to that member's stream.
pub struct Acceptor {
    log: Arc<Log>,
    /// Member names by id.
    members: BTreeMap<u64, String>,
}

impl Acceptor {
    pub fn new(log: Arc<Log>, members: &[MemberConfig]) -> Self {
        Acceptor { log, members: members.iter().map(|m| (m.id, m.name.clone())).collect() }
    }

    /// Checks `batch` ([`check_batch`]) and appends it to its member's stream.
    pub async fn accept(&self, peer: Option<Peer>, batch: pb::AuditBatch) -> Result<(), Status> {
        let events = check_batch(&self.members, peer, &batch)?;
        append_here(&self.log, &stream_of(&batch.member), events).await.map_err(crate::api::append_status)
    }
}

/// The events of a `Cluster.Audit` batch, once checked: `peer` is the member the caller's
/// certificate names (with TLS), and a member appends to its own stream only; without TLS the
/// batch's member must be one of `members` (nothing is authenticated then; docs/security.md).
/// Each record must parse, be at most [`MAX_RECORD_BYTES`] and carry one of its member's ids.
pub fn check_batch(members: &BTreeMap<u64, String>, peer: Option<Peer>, batch: &pb::AuditBatch) -> Result<Vec<NewEvent>, Status> {
    match peer {
        Some(peer) if members.get(&peer.id) != Some(&batch.member) => {
            tracing::warn!(member = peer.id, claimed = %batch.member, "a member sent audit records for another member's stream; refused");
            return Err(Status::permission_denied(format!(
                "member {} may append audit records to its own stream only, not to {:?}'s",
                peer.id, batch.member
            )));
        }
        Some(_) => {}
        None if !members.values().any(|m| *m == batch.member) => {
            return Err(Status::invalid_argument(format!("member: {:?} is not a member of this cluster", batch.member)));
        }
        None => {}
    }
    if batch.records.is_empty() || batch.records.len() > BATCH {
        return Err(Status::invalid_argument(format!("records: {} of them; 1 to {BATCH} per call", batch.records.len())));
    }
    let own = format!("{}:", batch.member);
    let mut events = Vec::with_capacity(batch.records.len());
    for (i, bytes) in batch.records.iter().enumerate() {
        if bytes.len() > MAX_RECORD_BYTES {
            return Err(Status::invalid_argument(format!("records[{i}]: {} bytes, the limit is {MAX_RECORD_BYTES}", bytes.len())));
        }
        let record: Record =
            serde_json::from_slice(bytes).map_err(|e| Status::invalid_argument(format!("records[{i}]: not an audit record: {e}")))?;
        if !record.id.starts_with(&own) {
            return Err(Status::invalid_argument(format!("records[{i}]: id {:?} is not one of {:?}'s", record.id, batch.member)));
        }
        events.push(event(&record));
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_audit_streams_then_they_name_their_node_and_a_tenant_no_grant_names() {
        assert_eq!(stream_of("node-2"), "$audit/node-2");
        assert_eq!(crate::security::auth::tenant_of(&stream_of("node-2")), "$audit");
    }

    #[tokio::test]
    async fn given_a_full_queue_then_records_are_dropped_and_counted_without_waiting() {
        let metrics = Arc::new(Metrics::default());
        let (queue, mut waiting) = mpsc::channel(2);
        let audit = Audit {
            inner: Arc::new(Inner {
                node: "node-1".into(),
                boot: "b".into(),
                sequence: AtomicU64::new(1),
                queue,
                refusals: Default::default(),
                metrics: metrics.clone(),
            }),
        };
        for i in 0..5 {
            audit.record("certificate \"alice\"", "drain", "refused", &format!("call {i}"));
        }
        assert_eq!((metrics.audit_records_dropped.get(), metrics.audit_records_pending.get()), (3, 2));
        let first = waiting.recv().await.unwrap();
        assert_eq!((first.id.as_str(), first.detail.as_str()), ("node-1:b:1", "call 0"));
        assert_eq!(waiting.recv().await.unwrap().id, "node-1:b:2");
        assert!(waiting.try_recv().is_err());
    }

    #[test]
    fn given_long_fields_then_they_are_cut_on_a_character_boundary_and_say_so() {
        assert_eq!(clipped("short"), "short");
        let long = "é".repeat(MAX_FIELD_BYTES); // two bytes each
        let cut = clipped(&long);
        assert!(cut.len() < MAX_FIELD_BYTES + 40 && cut.ends_with(&format!("… ({} bytes in all)", long.len())), "{cut}");
        let odd = format!("x{long}");
        assert!(clipped(&odd).starts_with('x'), "an odd cut lands on a boundary without panicking");
    }

    #[tokio::test]
    async fn given_a_caller_refused_again_and_again_then_only_its_first_refusals_of_a_second_and_every_operation_are_queued() {
        let metrics = Arc::new(Metrics::default());
        let (queue, mut waiting) = mpsc::channel(QUEUE);
        let inner = Inner {
            node: "n".into(),
            boot: "b".into(),
            sequence: AtomicU64::new(1),
            queue,
            refusals: Default::default(),
            metrics: metrics.clone(),
        };
        let audit = Audit { inner: Arc::new(inner) };
        for _ in 0..(REFUSALS_PER_SECOND + 30) {
            audit.record("token t (\"flood\")", "refused: missing grant", "refused", "needs write:x");
        }
        audit.record("certificate \"other\"", "refused: missing grant", "refused", "needs write:x");
        audit.record("certificate \"admin\"", "drain", "allowed", "node-2");
        let mut queued = Vec::new();
        while let Ok(record) = waiting.try_recv() {
            queued.push(record.by);
        }
        // (A second may turn between two records: then a few more of the flood are queued.)
        let flood = queued.iter().filter(|b| b.contains("flood")).count();
        assert!((REFUSALS_PER_SECOND as usize..=2 * REFUSALS_PER_SECOND as usize).contains(&flood), "{flood} of the flood queued");
        assert!(queued.iter().any(|b| b.contains("other")) && queued.last().unwrap().contains("admin"), "{queued:?}");
        assert_eq!(metrics.audit_records_dropped.get() as usize, REFUSALS_PER_SECOND as usize + 30 - flood);
    }

    #[tokio::test]
    async fn given_a_record_the_log_refuses_then_it_alone_is_dropped_and_the_others_are_appended_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let storage = crate::config::StorageConfig { partitions: 2, ..Default::default() };
        let store = Arc::new(crate::storage::Store::open(dir.path(), &storage).unwrap());
        let limits = crate::config::LimitsConfig { max_event_bytes: 600, ..Default::default() };
        let metrics = Arc::new(Metrics::default());
        let log = Arc::new(Log::start(store.clone(), &Default::default(), &limits, &Default::default(), metrics.clone()).unwrap());
        let (_stop, stopped) = watch::channel(false);
        let audit = start("node-1".into(), log.clone(), None, metrics.clone(), stopped);
        audit.record("certificate \"admin\"", "drain", "allowed", "first");
        audit.record("certificate \"admin\"", "drain", "allowed", &"x".repeat(700));
        audit.record("certificate \"admin\"", "drain", "allowed", "third");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while metrics.audit_records_written.get() + metrics.audit_records_dropped.get() < 3 {
            assert!(std::time::Instant::now() < deadline, "the records were neither appended nor dropped");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!((metrics.audit_records_written.get(), metrics.audit_records_dropped.get()), (2, 1));
        assert_eq!(metrics.audit_records_pending.get(), 0, "none left waiting");
        let all = crate::storage::ReadLimit { max_events: 100, max_bytes: usize::MAX };
        let stored = store.read_stream("$audit/node-1", 0, u64::MAX, all).unwrap().events;
        let details: Vec<String> = stored.iter().map(|e| serde_json::from_slice::<Record>(&e.payload).unwrap().detail).collect();
        assert_eq!(details, vec!["first", "third"]);
    }

    fn record(id: &str) -> Vec<u8> {
        let record = Record {
            id: id.into(),
            at_unix_ms: 1,
            by: "token 0123456789abcdef (\"ci\")".into(),
            action: "refused: missing grant".into(),
            outcome: "refused".into(),
            detail: "needs write:globex".into(),
        };
        serde_json::to_vec(&record).unwrap()
    }

    #[tokio::test]
    async fn given_batches_from_members_then_each_goes_to_its_senders_stream_only_and_whole() {
        let dir = tempfile::tempdir().unwrap();
        let storage = crate::config::StorageConfig { partitions: 4, ..Default::default() };
        let store = Arc::new(crate::storage::Store::open(dir.path(), &storage).unwrap());
        let log = Arc::new(
            Log::start(store.clone(), &Default::default(), &Default::default(), &Default::default(), Arc::new(Metrics::default())).unwrap(),
        );
        let members: Vec<MemberConfig> =
            serde_yaml::from_str("[{id: 1, name: node-1, address: '127.0.0.1:1'}, {id: 2, name: node-2, address: '127.0.0.1:2'}]").unwrap();
        let acceptor = Acceptor::new(log.clone(), &members);
        let batch = |member: &str, records: Vec<Vec<u8>>| pb::AuditBatch { member: member.into(), records };
        let code = |outcome: Result<(), Status>| outcome.unwrap_err().code();

        // Member 2's certificate cannot write member 1's stream, nor records with its ids.
        let as_2 = Some(Peer { id: 2 });
        assert_eq!(code(acceptor.accept(as_2, batch("node-1", vec![record("node-1:b:1")])).await), tonic::Code::PermissionDenied);
        assert_eq!(code(acceptor.accept(as_2, batch("node-2", vec![record("node-1:b:1")])).await), tonic::Code::InvalidArgument);
        // Without TLS the member must be one; bad records refuse the whole batch.
        assert_eq!(code(acceptor.accept(None, batch("node-9", vec![record("node-9:b:1")])).await), tonic::Code::InvalidArgument);
        let mixed = vec![record("node-2:b:1"), b"{not json".to_vec()];
        assert_eq!(code(acceptor.accept(as_2, batch("node-2", mixed)).await), tonic::Code::InvalidArgument);
        assert_eq!(
            code(acceptor.accept(as_2, batch("node-2", vec![vec![b' '; MAX_RECORD_BYTES + 1]])).await),
            tonic::Code::InvalidArgument
        );
        assert_eq!(code(acceptor.accept(as_2, batch("node-2", Vec::new())).await), tonic::Code::InvalidArgument);
        assert_eq!(code(acceptor.accept(as_2, batch("node-2", vec![record("node-2:b:1"); BATCH + 1])).await), tonic::Code::InvalidArgument);
        // The log refuses clients' appends to `$` streams, and audit appends to others.
        let to = |stream: &str| AppendRequest {
            stream: stream.into(),
            expected: ExpectedVersion::Any,
            events: vec![event(&serde_json::from_slice(&record("node-2:b:9")).unwrap())],
        };
        assert!(matches!(log.append(to("$audit/node-2")).await, Err(AppendError::Invalid(_))));
        assert!(matches!(log.append_audit(to("$epochs-0")).await, Err(AppendError::Invalid(_))));
        assert!(matches!(log.append_audit(to("acme/orders")).await, Err(AppendError::Invalid(_))));
        let all = crate::storage::ReadLimit { max_events: 100, max_bytes: usize::MAX };
        for node in ["node-1", "node-2", "node-9"] {
            assert!(store.read_stream(&stream_of(node), 0, u64::MAX, all).unwrap().events.is_empty(), "{node}: nothing refused is stored");
        }

        acceptor.accept(as_2, batch("node-2", vec![record("node-2:b:1"), record("node-2:b:2")])).await.unwrap();
        let stored = store.read_stream("$audit/node-2", 0, u64::MAX, all).unwrap().events;
        let ids: Vec<String> = stored
            .iter()
            .map(|e| {
                assert_eq!(e.event_type, EVENT_TYPE);
                serde_json::from_slice::<Record>(&e.payload).unwrap().id
            })
            .collect();
        assert_eq!(ids, vec!["node-2:b:1", "node-2:b:2"]);
        log.close();
    }
}
