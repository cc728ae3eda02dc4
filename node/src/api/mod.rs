//! The gRPC face of a node: the `EventLog` and `Node` services of `proto/anthill/v1`, and the
//! domains' services ([`ledger`]).
//!
//! This module turns wire messages into [`crate::log`] calls and log outcomes into gRPC statuses,
//! one status per error kind, on purpose:
//!
//! | outcome                                  | status                |
//! |------------------------------------------|-----------------------|
//! | bad input (ids, sizes, partitions, ...)  | `INVALID_ARGUMENT`    |
//! | expected version not met                 | `FAILED_PRECONDITION` + trailer `anthill-actual-version` |
//! | storage full (map at its maximum)        | `RESOURCE_EXHAUSTED`  |
//! | a stored record fails its checksum       | `DATA_LOSS`           |
//! | node shutting down                       | `UNAVAILABLE`         |
//! | partition led by another node            | `UNAVAILABLE` + trailer `anthill-not-leader` (the partition); nothing written, safe to resend to the leader |
//! | `quorum` append, leadership lost first   | `ABORTED`: outcome unknown (retry with an expected version or a command id) |
//! | `quorum` append, no majority in 10 s     | `DEADLINE_EXCEEDED`: outcome unknown  |
//! | LMDB reader slots all in use             | `UNAVAILABLE`         |
//! | other storage failure                    | `INTERNAL`            |
//!
//! Input is validated before anything is queued, so a refused request writes nothing. Blocking
//! LMDB reads run on the blocking pool, never on the async workers.

mod append_session;
pub mod auth;
pub mod ledger;
mod subscribe;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use anthill_proto::v1 as pb;
use tokio::sync::watch;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::log::{self, AppendError, ExpectedVersion, Log, NewEvent};
use crate::security::auth::Auth;
use crate::security::auth::{Caller, Role, tenant_of};
use crate::security::keys::Keys;

/// Lets a cluster admin's operation through; an audit record says it was asked, and by whom
/// (a refusal is one too, made by the grant check).
fn audited<T: std::fmt::Debug>(request: &Request<T>, action: &str) -> Result<(), Status> {
    let caller = Caller::of(request)?;
    let about = format!("{:?}", request.get_ref());
    caller.require_to(action, &format!(", for {about}"), "", Role::ClusterAdmin)?;
    caller.audit(action, "allowed", about);
    Ok(())
}
use crate::storage::{EventRecord, ReadLimit, Slice, StorageError};

/// Shared state of both services.
#[derive(Clone)]
pub struct Api {
    log: Arc<Log>,
    cluster: Option<crate::coordination::member::ClusterHandle>,
    node_id: String,
    started: Instant,
    shutdown: watch::Receiver<bool>,
    /// Seals appended events and opens read ones, when the node encrypts.
    keys: Option<Keys>,
    /// The table long calls check their caller against at each step (with TLS).
    auth: Option<Auth>,
}

impl Api {
    /// `shutdown` turns true when the node stops; open subscriptions then end.
    pub fn new(log: Arc<Log>, node_id: String, shutdown: watch::Receiver<bool>) -> Self {
        Api { log, cluster: None, node_id, started: Instant::now(), shutdown, keys: None, auth: None }
    }

    /// The node authenticates its callers (docs/security.md).
    pub fn with_auth(mut self, auth: Option<Auth>) -> Self {
        self.auth = auth;
        self
    }

    /// The node encrypts its tenants' events (docs/security.md).
    pub fn with_keys(mut self, keys: Option<Keys>) -> Self {
        self.keys = keys;
        self
    }

    /// The wire form of a read event, opened when it was sealed: a forgotten tenant's event is
    /// an error, or with `redact` comes without payload and metadata.
    fn open(&self, event: EventRecord, redact: bool) -> Result<pb::RecordedEvent, Status> {
        let Some(keys) = &self.keys else { return Ok(recorded_event(event)) };
        let opened = if redact { keys.open_or_redact(event) } else { keys.open_event(event) };
        opened.map(recorded_event).map_err(|e| e.status())
    }

    /// The node runs in a cluster: `Node.Status` shows it.
    pub fn with_cluster(mut self, cluster: Option<crate::coordination::member::ClusterHandle>) -> Self {
        self.cluster = cluster;
        self
    }

    fn check_partition(&self, partition: u32) -> Result<(), Status> {
        let count = self.log.partition_count();
        if partition >= count {
            return Err(Status::invalid_argument(format!(
                "partition: {partition} does not exist; this cluster has partitions 0 to {}",
                count - 1
            )));
        }
        Ok(())
    }

    /// The limit of one read: the request's `max_count` capped by `limits.max_read_count`, and
    /// the stored size capped by `limits.max_request_bytes`.
    fn read_limit(&self, max_count: u32) -> ReadLimit {
        let limits = self.log.limits();
        let cap = limits.max_read_count;
        ReadLimit { max_events: (if max_count == 0 { cap } else { max_count.min(cap) }) as usize, max_bytes: limits.max_request_bytes }
    }

    /// Runs a blocking read and turns it into a `ReadResponse`.
    /// Reads on the blocking pool; a linearizable read first learns its read index from the
    /// partition's leader (`Log::read_index`) and shows nothing past it.
    async fn read_slice<F>(
        &self,
        partition: u32,
        next_of: fn(&EventRecord) -> u64,
        read: F,
        from: u64,
        linearizable: bool,
        redact: bool,
    ) -> Result<pb::ReadResponse, Status>
    where
        F: FnOnce(&Log) -> Result<Slice, StorageError> + Send + 'static,
    {
        let through = if linearizable { Some(self.log.read_index(partition).await.map_err(append_status)?) } else { None };
        // The read serves up to what this node shows readers; if that fell below the read index
        // (its replica restarted and stopped leading meanwhile), it would come back short.
        let short = |log: &Log| through.is_some_and(|through| log.readable_through(partition) < through);
        if short(&self.log) {
            return Err(append_status(AppendError::NotLeader { partition }));
        }
        let log = self.log.clone();
        let mut slice = tokio::task::spawn_blocking(move || read(&log))
            .await
            .map_err(|e| Status::internal(format!("read task failed: {e}")))?
            .map_err(|e| storage_status(&e))?;
        if short(&self.log) {
            return Err(append_status(AppendError::NotLeader { partition }));
        }
        if let Some(through) = through
            && let Some(cut) = slice.events.iter().position(|e| e.position > through)
        {
            slice.events.truncate(cut);
            slice.more = false;
        }
        let next = slice.events.last().map(|e| next_of(e) + 1).unwrap_or(from.max(1));
        Ok(pb::ReadResponse {
            events: slice.events.into_iter().map(|e| self.open(e, redact)).collect::<Result<_, _>>()?,
            next,
            end_of_stream: !slice.more,
            commit_position: self.log.replica_report(partition).commit,
            leader: self.log.leads(partition),
        })
    }
}

#[tonic::async_trait]
impl pb::event_log_server::EventLog for Api {
    async fn append(&self, request: Request<pb::AppendRequest>) -> Result<Response<pb::AppendResponse>, Status> {
        Caller::of(&request)?.require(tenant_of(&request.get_ref().stream), Role::Write)?;
        let req = request.into_inner();
        let span = tracing::info_span!(
            "append",
            stream = %req.stream,
            events = req.events.len(),
            partition = tracing::field::Empty,
            position = tracing::field::Empty
        );
        let quorum = req.durability == pb::Durability::Quorum as i32;
        let mut append = append_request(req)?;
        if let Some(keys) = &self.keys {
            // The plaintext is checked first: a request refused anyway makes no key, and the
            // limits apply to what the client sent.
            log::validate_append(self.log.limits(), &append).map_err(Status::invalid_argument)?;
            keys.seal_events(&append.stream, &mut append.events).await?;
        }
        let done = self.log.append(append).instrument(span.clone()).await.map_err(append_status)?;
        if quorum {
            self.log.wait_quorum(&done, log::QUORUM_WAIT).instrument(span.clone()).await.map_err(append_status)?;
        }
        span.record("partition", done.partition);
        span.record("position", done.last_position);
        Ok(Response::new(appended(done)))
    }

    type AppendSessionStream = append_session::AnswerStream;

    async fn append_session(
        &self,
        request: Request<tonic::Streaming<pb::AppendSessionRequest>>,
    ) -> Result<Response<Self::AppendSessionStream>, Status> {
        let caller = Caller::of(&request)?;
        let caller = (caller, self.auth.clone());
        let session = append_session::start(self.log.clone(), caller, self.keys.clone(), request.into_inner(), self.shutdown.clone());
        Ok(Response::new(session))
    }

    async fn read(&self, request: Request<pb::ReadRequest>) -> Result<Response<pb::ReadResponse>, Status> {
        Caller::of(&request)?.require(tenant_of(&request.get_ref().stream), Role::Read)?;
        let req = request.into_inner();
        log::validate_stream_id(self.log.limits(), &req.stream).map_err(Status::invalid_argument)?;
        let limit = self.read_limit(req.max_count);
        let from = req.from_version;
        let stream = req.stream;
        let span = tracing::info_span!("read", stream = %stream, from_version = from);
        let partition = self.log.partition_of(&stream);
        let response = self
            .read_slice(partition, |e| e.stream_version, move |log| log.read_stream(&stream, from, limit), from, req.linearizable, false)
            .instrument(span)
            .await?;
        Ok(Response::new(response))
    }

    async fn read_partition(&self, request: Request<pb::ReadPartitionRequest>) -> Result<Response<pb::ReadResponse>, Status> {
        // A partition holds every tenant's streams.
        Caller::of(&request)?.require("*", Role::Read)?;
        let req = request.into_inner();
        self.check_partition(req.partition)?;
        let limit = self.read_limit(req.max_count);
        let (partition, from) = (req.partition, req.from_position);
        let span = tracing::info_span!("read_partition", partition, from_position = from);
        let response = self
            .read_slice(partition, |e| e.position, move |log| log.read_partition(partition, from, limit), from, req.linearizable, true)
            .instrument(span)
            .await?;
        Ok(Response::new(response))
    }

    type SubscribeStream = subscribe::EventStream;

    async fn subscribe(&self, request: Request<pb::SubscribeRequest>) -> Result<Response<Self::SubscribeStream>, Status> {
        // Streams: each one's tenant; partitions (or everything): every tenant.
        let caller = Caller::of(&request)?;
        if request.get_ref().streams.is_empty() {
            caller.require("*", Role::Read)?;
        }
        for stream in &request.get_ref().streams {
            caller.require(tenant_of(stream), Role::Read)?;
        }
        let plan = subscribe::Plan::from_request(self, request.into_inner())?.checking(caller, self.auth.clone());
        Ok(Response::new(subscribe::start(self.log.clone(), plan, self.shutdown.clone())))
    }
}

#[tonic::async_trait]
impl pb::node_server::Node for Api {
    async fn decommission(&self, request: Request<pb::DecommissionRequest>) -> Result<Response<pb::DecommissionResponse>, Status> {
        use crate::coordination::member::DecommissionError;
        audited(&request, "decommission")?;
        let request = request.into_inner();
        let Some(cluster) = &self.cluster else {
            return Err(Status::failed_precondition("this node runs alone (no cluster.members): there are no replica sets to leave"));
        };
        match cluster.decommission(&request.node, request.undo).await {
            Ok(partitions) => Ok(Response::new(pb::DecommissionResponse { partitions })),
            Err(e @ DecommissionError::Unknown { .. }) => Err(Status::not_found(e.to_string())),
            Err(e @ (DecommissionError::TooFew { .. } | DecommissionError::NotConfigured { .. })) => {
                Err(Status::failed_precondition(e.to_string()))
            }
            Err(e @ DecommissionError::Store(_)) => Err(Status::unavailable(e.to_string())),
        }
    }

    async fn drain(&self, request: Request<pb::DrainRequest>) -> Result<Response<pb::DrainResponse>, Status> {
        audited(&request, "drain")?;
        let request = request.into_inner();
        let Some(cluster) = &self.cluster else {
            return Err(Status::failed_precondition(
                "this node runs alone (no cluster.members): there is nobody to hand its partitions to",
            ));
        };
        if !request.node.is_empty() && request.node != cluster.name {
            return Err(Status::failed_precondition(format!(
                "this node is {:?}, not {:?}: send the drain to {:?}'s own address",
                cluster.name, request.node, request.node
            )));
        }
        let leading = cluster.drain(request.undo);
        Ok(Response::new(pb::DrainResponse { node: cluster.name.clone(), leading }))
    }

    async fn status(&self, request: Request<pb::StatusRequest>) -> Result<Response<pb::StatusResponse>, Status> {
        // What a node holds is for callers with some grant (the routing client of any writer
        // or reader), not for every certificate the CA ever signed.
        let caller = Caller::of(&request)?;
        if caller.grants.is_empty() {
            caller.audit("refused: missing grant", "refused", "needs any grant, for Node.Status".into());
            return Err(Status::permission_denied(format!("{} holds no grant: Status needs at least one", caller.who())));
        }
        let heads = self.log.commits().borrow().heads.clone();
        let sizes = self.log.store().sizes();
        let name_of = |id: u32| {
            let member = self.cluster.as_ref().and_then(|c| c.members.iter().find(|m| m.id == u64::from(id)));
            member.map_or_else(|| id.to_string(), |m| m.name.clone())
        };
        let partition = |p: usize, head: u64| {
            let report = self.log.replica_report(p as u32);
            let followers = report
                .followers
                .iter()
                .map(|&(node, matched)| pb::FollowerProgress {
                    node: name_of(node),
                    matched_position: matched,
                    lag: head.saturating_sub(matched),
                })
                .collect();
            pb::PartitionStatus {
                partition: p as u32,
                head_position: head,
                epoch: self.log.roles().epoch(p as u32),
                commit_position: report.commit,
                followers,
                floor_position: self.log.store().partition_floor(p as u32),
            }
        };
        Ok(Response::new(pb::StatusResponse {
            node_id: self.node_id.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            partition_count: self.log.partition_count(),
            partitions: heads.iter().enumerate().map(|(p, &head)| partition(p, head)).collect(),
            // Events held: what retention gave up is not counted.
            total_events: heads.iter().enumerate().map(|(p, head)| head - self.log.store().partition_floor(p as u32)).sum(),
            db_size_bytes: sizes.used_bytes,
            map_size_bytes: sizes.map_size_bytes,
            uptime_ms: self.started.elapsed().as_millis() as u64,
            data_dir: self.log.store().dir().display().to_string(),
            write_failure: self.log.write_failure().map(|e| e.to_string()).unwrap_or_default(),
            cluster: self.cluster.as_ref().map(|c| c.status()),
        }))
    }
}

fn expected_version(expected: Option<pb::ExpectedVersion>) -> Result<ExpectedVersion, Status> {
    use pb::expected_version::Kind;
    Ok(match expected.and_then(|e| e.kind) {
        None | Some(Kind::Any(_)) => ExpectedVersion::Any,
        Some(Kind::NoStream(_)) => ExpectedVersion::NoStream,
        Some(Kind::StreamExists(_)) => ExpectedVersion::StreamExists,
        Some(Kind::Exact(v)) => ExpectedVersion::Exact(v),
    })
}

pub(crate) fn append_request(req: pb::AppendRequest) -> Result<log::AppendRequest, Status> {
    for event in &req.events {
        let metadata: Vec<(String, String)> = event.metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        crate::security::keys::check_metadata_keys(&metadata).map_err(Status::invalid_argument)?;
    }
    Ok(log::AppendRequest {
        expected: expected_version(req.expected_version)?,
        events: req.events.into_iter().map(new_event).collect::<Vec<_>>(),
        stream: req.stream,
    })
}

fn appended(done: log::Appended) -> pb::AppendResponse {
    pb::AppendResponse {
        partition: done.partition,
        first_position: done.first_position,
        last_position: done.last_position,
        stream_version: done.stream_version,
    }
}

/// A client's event; its metadata may not use the reserved `anthill-` keys.
fn new_event(event: pb::EventData) -> NewEvent {
    let mut metadata: Vec<(String, String)> = event.metadata.into_iter().collect();
    metadata.sort_unstable();
    NewEvent { event_type: event.r#type, payload: event.payload, metadata }
}

/// The wire form of a stored event.
pub fn recorded_event(e: EventRecord) -> pb::RecordedEvent {
    pb::RecordedEvent {
        partition: e.partition,
        position: e.position,
        stream: e.stream,
        stream_version: e.stream_version,
        r#type: e.event_type,
        payload: e.payload,
        metadata: e.metadata.into_iter().collect::<HashMap<_, _>>(),
        append_time_us: e.append_time_us,
        epoch: e.epoch,
    }
}

/// Name of the trailer that says which partition a node does not lead, on `UNAVAILABLE`.
pub const NOT_LEADER_TRAILER: &str = "anthill-not-leader";

/// Name of the trailer that carries a stream's actual version on `FAILED_PRECONDITION`.
pub const ACTUAL_VERSION_TRAILER: &str = "anthill-actual-version";

pub(crate) fn append_status(error: AppendError) -> Status {
    match &error {
        AppendError::Invalid(message) => Status::invalid_argument(message.clone()),
        AppendError::WrongExpectedVersion { actual, .. } => {
            let mut status = Status::failed_precondition(error.to_string());
            status.metadata_mut().insert(ACTUAL_VERSION_TRAILER, actual.to_string().parse().expect("a number is valid metadata"));
            status
        }
        AppendError::Storage(e) => storage_status(e),
        AppendError::ShuttingDown => Status::unavailable(error.to_string()),
        AppendError::QuorumTimeout { .. } => Status::deadline_exceeded(error.to_string()),
        AppendError::OutcomeUnknown { .. } => Status::aborted(error.to_string()),
        AppendError::NotLeader { partition } => {
            let mut status = Status::unavailable(error.to_string());
            status.metadata_mut().insert(NOT_LEADER_TRAILER, partition.to_string().parse().expect("a number is valid metadata"));
            status
        }
        // Not yet here: UNAVAILABLE (retry); forgotten: FAILED_PRECONDITION, as for reads of
        // its streams.
        AppendError::TenantKey { error: key, .. } => Status::new(key.status().code(), error.to_string()),
    }
}

fn storage_status(error: &StorageError) -> Status {
    match error {
        StorageError::Full { .. } => Status::resource_exhausted(error.to_string()),
        StorageError::Corrupt(_) => Status::data_loss(error.to_string()),
        // Transient: too many concurrent readers; the client may retry.
        StorageError::Lmdb(heed::Error::Mdb(heed::MdbError::ReadersFull)) => Status::unavailable(error.to_string()),
        _ => Status::internal(error.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::security::keys::OpenError;

    #[test]
    fn given_a_tenant_key_missing_at_the_writer_then_not_yet_is_unavailable_and_forgotten_a_failed_precondition() {
        let status = |error: OpenError| append_status(AppendError::TenantKey { stream: "acme/book-1".into(), error });
        let not_yet = status(OpenError::NotYet("acme".into()));
        assert_eq!(not_yet.code(), tonic::Code::Unavailable);
        assert!(not_yet.message().starts_with("acme/book-1: ") && not_yet.message().contains("try again"), "{}", not_yet.message());
        let forgotten = status(OpenError::Forgotten("acme".into()));
        assert_eq!(forgotten.code(), tonic::Code::FailedPrecondition);
        assert!(forgotten.message().contains("forgotten"), "{}", forgotten.message());
        assert_eq!(status(OpenError::Failed("unwrap failed".into())).code(), tonic::Code::Internal);
    }
}
