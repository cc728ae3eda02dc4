//! The routing client: sends each request to the node that leads its stream's partition.
//!
//! A [`Router`] starts from seed addresses, asks a node for its view of the cluster
//! (`Node.Status`: members with their addresses, each partition's leader) and caches it as a
//! routing table. Each append goes to the leader of `partition_of(stream)`, over one HTTP/2
//! connection per node, shared by every caller of the router. A single node (no `cluster` in its
//! status) leads every partition.
//!
//! Retries are automatic only where they cannot write twice:
//! - `UNAVAILABLE` with the trailer `anthill-not-leader`: the node refused before writing
//!   anything. The router reloads the table (from any node that answers) and resends;
//! - a connection that could not be made: nothing was sent;
//! - while a partition has no leader (a failover in progress), the router waits and reloads.
//!
//! Both go on with a growing pause (5 ms up to 50 ms) until [`Router::retry_for`] has passed
//! (10 s by default: a failover takes the session TTL plus a recovery). Any other error goes
//! back to the caller: `ABORTED` or `DEADLINE_EXCEEDED` on a `quorum` append, or a connection
//! lost mid-request, mean the outcome is unknown. A command resent with the same command id
//! is answered once (its first outcome), so commands may be resent safely:
//! [`Router::on_leader_idempotent`] resends those unknown outcomes too, for requests that carry
//! a command id of the client's; plain appends should carry an expected version to be resent
//! safely.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anthill_proto::v1 as pb;
use anyhow::{Context, bail};
use parking_lot::Mutex;
use tonic::{Code, Status};

use crate::api::NOT_LEADER_TRAILER;
use crate::client::{self, Clients};

/// How long to wait for a node that does not answer a connection or a status request.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// The longest pause between two resends of a request.
const MAX_PAUSE: Duration = Duration::from_millis(50);
/// A table this fresh is not reloaded for a resend: the callers waiting on a failover share one
/// reload instead of each asking every node.
const FRESH_ENOUGH: Duration = Duration::from_millis(20);

/// Where each partition's requests go, as one node last described the cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteTable {
    pub partition_count: u32,
    /// Each partition's leader's URL, `None` while it has none.
    pub leaders: Vec<Option<String>>,
    /// Every member's URL (where to ask next time).
    pub members: Vec<String>,
}

impl RouteTable {
    /// The table a node's status describes; `asked` is the URL it was reached at.
    pub fn from_status(status: &pb::StatusResponse, asked: &str) -> RouteTable {
        let Some(cluster) = &status.cluster else {
            return RouteTable {
                partition_count: status.partition_count,
                leaders: vec![Some(asked.to_string()); status.partition_count as usize],
                members: vec![asked.to_string()],
            };
        };
        let url_of: HashMap<&str, String> = cluster.members.iter().map(|m| (m.name.as_str(), client::server_url(&m.address))).collect();
        let mut leaders = vec![None; status.partition_count as usize];
        for p in &cluster.partitions {
            if let Some(slot) = leaders.get_mut(p.partition as usize) {
                *slot = url_of.get(p.leader.as_str()).cloned();
            }
        }
        RouteTable { partition_count: status.partition_count, leaders, members: url_of.into_values().collect() }
    }
}

/// How good a node's description of the cluster is, higher being better: a view that places
/// partitions at all, then the one that has applied the most of the coordination store. A node
/// that just restarted may still describe leaders that are gone, and before its first round it
/// describes no partitions at all while its store member has already applied a long log: the
/// chaos suite saw such a view win and send every request to "no leader" for a moment.
fn view_rank(status: &pb::StatusResponse) -> (bool, u64) {
    status.cluster.as_ref().map_or((false, 0), |c| (!c.partitions.is_empty(), c.coordination_applied))
}

/// What went wrong with one attempt, and whether resending is safe.
enum Attempt {
    /// Nothing was written: reload the table and resend.
    Retry(String),
    /// The answer for the caller.
    Fail(Status),
}

pub struct Router {
    seeds: Vec<String>,
    table: Mutex<RouteTable>,
    channels: Mutex<HashMap<String, Clients>>,
    /// When the table was last loaded; held while loading, so concurrent reloads become one.
    loaded: tokio::sync::Mutex<Instant>,
    /// How long a request keeps being resent while no leader takes it.
    pub retry_for: Duration,
    /// How long one attempt may wait for the leader's answer (none: as long as it takes). A
    /// leader that is stopped, or cut off from its peers with its lease not yet lapsed, keeps a
    /// request waiting; past this deadline the router reloads its table, so the next request
    /// goes to whoever leads now, and the attempt's outcome is unknown (`DEADLINE_EXCEEDED`,
    /// resent only by [`Router::on_leader_idempotent`]).
    pub attempt_timeout: Option<Duration>,
}

impl Router {
    /// A router that has loaded its table from one of `seeds` (URLs or `host:port`).
    pub async fn connect(seeds: &[String]) -> anyhow::Result<Router> {
        if seeds.is_empty() {
            bail!("the router needs at least one node address");
        }
        let router = Router {
            seeds: seeds.iter().map(|s| client::server_url(s)).collect(),
            table: Mutex::new(RouteTable::default()),
            channels: Mutex::new(HashMap::new()),
            loaded: tokio::sync::Mutex::new(Instant::now()),
            retry_for: Duration::from_secs(10),
            attempt_timeout: None,
        };
        router.refresh().await?;
        Ok(router)
    }

    pub fn table(&self) -> RouteTable {
        self.table.lock().clone()
    }

    /// The partition `stream` belongs to.
    pub fn partition_of(&self, stream: &str) -> u32 {
        crate::log::partitioning::home_partition(stream, self.table.lock().partition_count.max(1))
    }

    /// Reloads the table from the first node that answers, asking the known members and the
    /// seeds at once (a dead member would otherwise cost a whole timeout first).
    pub async fn refresh(&self) -> anyhow::Result<()> {
        let mut loaded = self.loaded.lock().await;
        self.load().await?;
        *loaded = Instant::now();
        Ok(())
    }

    /// Reloads the table unless it was loaded within [`FRESH_ENOUGH`] (or while this call
    /// waited for another caller's reload).
    async fn refresh_if_stale(&self) -> anyhow::Result<()> {
        let asked = Instant::now();
        let mut loaded = self.loaded.lock().await;
        if *loaded + FRESH_ENOUGH > asked {
            return Ok(());
        }
        self.load().await?;
        *loaded = Instant::now();
        Ok(())
    }

    async fn load(&self) -> anyhow::Result<()> {
        let mut candidates = self.table.lock().members.clone();
        for seed in &self.seeds {
            if !candidates.contains(seed) {
                candidates.push(seed.clone());
            }
        }
        let mut asking: futures_util::stream::FuturesUnordered<_> = candidates
            .into_iter()
            .map(|url| async move {
                let status = self.status_of(&url).await;
                (url, status)
            })
            .collect();
        let mut last_error = None;
        // The first answer, then whichever others come within [`FRESH_ENOUGH`]: the best view
        // wins ([`view_rank`]).
        let mut best: Option<((bool, u64), String, pb::StatusResponse)> = None;
        let mut until: Option<tokio::time::Instant> = None;
        loop {
            let next = futures_util::StreamExt::next(&mut asking);
            let answer = match until {
                None => next.await,
                Some(at) => tokio::time::timeout_at(at, next).await.unwrap_or(None),
            };
            let Some((url, status)) = answer else { break };
            match status {
                Ok(status) => {
                    let rank = view_rank(&status);
                    if best.as_ref().is_none_or(|(seen, _, _)| rank > *seen) {
                        best = Some((rank, url, status));
                    }
                    until.get_or_insert_with(|| tokio::time::Instant::now() + FRESH_ENOUGH);
                }
                Err(e) => last_error = Some(e),
            }
        }
        match best {
            Some(((_, applied), url, status)) => {
                let table = RouteTable::from_status(&status, &url);
                tracing::debug!(from = %url, applied, leaders = ?table.leaders, "reloaded the routing table");
                *self.table.lock() = table;
                Ok(())
            }
            None => Err(last_error.expect("at least one seed").context("no node of the cluster answered")),
        }
    }

    async fn status_of(&self, url: &str) -> anyhow::Result<pb::StatusResponse> {
        let mut clients = self.clients(url).await?;
        let status = tokio::time::timeout(CONNECT_TIMEOUT, clients.node.status(pb::StatusRequest {}))
            .await
            .with_context(|| format!("{url} did not answer within {CONNECT_TIMEOUT:?}"))?
            .map_err(client::status_error)?;
        Ok(status.into_inner())
    }

    /// The connection to `url`, made once and shared.
    async fn clients(&self, url: &str) -> anyhow::Result<Clients> {
        if let Some(clients) = self.channels.lock().get(url) {
            return Ok(clients.clone());
        }
        let channel = client::endpoint(url)?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .connect()
            .await
            .with_context(|| format!("cannot connect to {url}"))?;
        let clients = client::clients(channel);
        self.channels.lock().insert(url.to_string(), clients.clone());
        Ok(clients)
    }

    /// The leader's connection for `partition`, or why there is none now.
    async fn leader_of(&self, partition: u32) -> Result<Clients, Attempt> {
        let leader = self.table.lock().leaders.get(partition as usize).cloned().flatten();
        let Some(url) = leader else { return Err(Attempt::Retry(format!("partition {partition} has no leader now"))) };
        self.clients(&url).await.map_err(|e| {
            // A dead node's connection is dropped, so a restarted one gets a fresh one.
            self.channels.lock().remove(&url);
            Attempt::Retry(format!("{e:#}"))
        })
    }

    /// Runs `call` against `partition`'s leader, resending while that is safe (module doc).
    pub async fn on_leader<T, F, Fut>(&self, partition: u32, call: F) -> Result<T, Status>
    where
        F: FnMut(Clients) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        self.on_leader_with(partition, call, classify).await
    }

    /// Like [`Router::on_leader`], for a request that writes at most once however often it is
    /// sent (a command with a command id the client chose): it is also resent when its outcome
    /// is unknown (`ABORTED`, `DEADLINE_EXCEEDED`, any `UNAVAILABLE`, a connection lost
    /// mid-request), and the node answers a resend of what it already ran with the first result.
    pub async fn on_leader_idempotent<T, F, Fut>(&self, partition: u32, call: F) -> Result<T, Status>
    where
        F: FnMut(Clients) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        self.on_leader_with(partition, call, classify_idempotent).await
    }

    async fn on_leader_with<T, F, Fut>(&self, partition: u32, mut call: F, classify: fn(Status) -> Attempt) -> Result<T, Status>
    where
        F: FnMut(Clients) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        let deadline = Instant::now() + self.retry_for;
        let mut pause = Duration::from_millis(5);
        loop {
            let began = Instant::now();
            let attempt = match self.leader_of(partition).await {
                Ok(clients) => match self.answer_within(partition, call(clients)).await {
                    Ok(answer) => return Ok(answer),
                    Err(status) => classify(status),
                },
                Err(attempt) => attempt,
            };
            let why = match attempt {
                Attempt::Fail(status) => return Err(status),
                Attempt::Retry(why) => why,
            };
            tracing::debug!(partition, took_ms = began.elapsed().as_millis() as u64, %why, "resending");
            if Instant::now() + pause > deadline {
                return Err(Status::unavailable(format!(
                    "partition {partition}: no leader took the request within {:?}: {why}",
                    self.retry_for
                )));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(MAX_PAUSE);
            // A failed reload leaves the table as it was; the next attempt tells.
            let _ = self.refresh_if_stale().await;
        }
    }

    /// `answer`, or after [`Router::attempt_timeout`] an unknown outcome, with the table
    /// reloaded first.
    async fn answer_within<T>(&self, partition: u32, answer: impl std::future::Future<Output = Result<T, Status>>) -> Result<T, Status> {
        let Some(limit) = self.attempt_timeout else { return answer.await };
        match tokio::time::timeout(limit, answer).await {
            Ok(answer) => answer,
            Err(_) => {
                // A failed reload leaves the table as it was; the next attempt tells.
                let _ = self.refresh_if_stale().await;
                Err(Status::deadline_exceeded(format!(
                    "partition {partition}: the leader did not answer within {limit:?}; the outcome is unknown"
                )))
            }
        }
    }

    /// Appends to the leader of the request's stream.
    pub async fn append(&self, request: pb::AppendRequest) -> Result<pb::AppendResponse, Status> {
        let partition = self.partition_of(&request.stream);
        self.on_leader(partition, |mut c| {
            let request = request.clone();
            async move { c.log.append(request).await.map(tonic::Response::into_inner) }
        })
        .await
    }

    /// Every event of `stream` the partition's leader serves, read page by page.
    pub async fn read_stream_all(&self, stream: &str) -> Result<Vec<pb::RecordedEvent>, Status> {
        let mut events = Vec::new();
        let mut from = 1;
        loop {
            let read =
                self.read(pb::ReadRequest { stream: stream.to_string(), from_version: from, max_count: 0, linearizable: false }).await?;
            let done = read.end_of_stream || read.events.is_empty();
            from = read.next;
            events.extend(read.events);
            if done {
                return Ok(events);
            }
        }
    }

    /// Reads a stream from its partition's leader.
    pub async fn read(&self, request: pb::ReadRequest) -> Result<pb::ReadResponse, Status> {
        let partition = self.partition_of(&request.stream);
        self.on_leader(partition, |mut c| {
            let request = request.clone();
            async move { c.log.read(request).await.map(tonic::Response::into_inner) }
        })
        .await
    }
}

/// For requests that write at most once: every answer that is not the application's own
/// (a rejection, a bad request, a missing or existing thing) may be resent.
fn classify_idempotent(status: Status) -> Attempt {
    match status.code() {
        Code::Unavailable | Code::Aborted | Code::DeadlineExceeded | Code::Unknown | Code::Cancelled => {
            Attempt::Retry(format!("{:?}: {}", status.code(), status.message()))
        }
        _ => Attempt::Fail(status),
    }
}

fn classify(status: Status) -> Attempt {
    if status.code() == Code::Unavailable && status.metadata().get(NOT_LEADER_TRAILER).is_some() {
        return Attempt::Retry(status.message().to_string());
    }
    if status.code() == Code::Unavailable && never_sent(&status) {
        return Attempt::Retry(format!("connection refused: {}", status.message()));
    }
    Attempt::Fail(status)
}

/// Whether the status comes from a connection that could not be made (so the request never
/// left): the transport error's chain says so.
fn never_sent(status: &Status) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    while let Some(error) = source {
        let text = error.to_string().to_ascii_lowercase();
        if text.contains("connection refused") || text.contains("tcp connect error") || text.contains("error trying to connect") {
            return true;
        }
        source = error.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(cluster: Option<pb::ClusterStatus>) -> pb::StatusResponse {
        pb::StatusResponse { partition_count: 3, cluster, ..Default::default() }
    }

    #[test]
    fn a_single_node_leads_every_partition() {
        let table = RouteTable::from_status(&status(None), "http://n:1");
        assert_eq!(table.leaders, vec![Some("http://n:1".to_string()); 3]);
    }

    #[test]
    fn a_cluster_maps_leader_names_to_member_addresses_and_leaderless_partitions_to_none() {
        let member =
            |name: &str, address: &str| pb::ClusterMember { name: name.into(), address: address.into(), live: true, ..Default::default() };
        let partition = |partition, leader: &str| pb::PartitionOwnership { partition, leader: leader.into(), ..Default::default() };
        let cluster = pb::ClusterStatus {
            members: vec![member("a", "127.0.0.11:7400"), member("b", "127.0.0.12:7400")],
            partitions: vec![partition(0, "b"), partition(1, ""), partition(2, "a")],
            ..Default::default()
        };
        let table = RouteTable::from_status(&status(Some(cluster)), "http://127.0.0.11:7400");
        assert_eq!(table.leaders, [Some("http://127.0.0.12:7400".to_string()), None, Some("http://127.0.0.11:7400".to_string())]);
        assert_eq!(table.members.len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn an_attempt_past_its_deadline_is_an_unknown_outcome_and_a_prompt_one_is_answered() {
        let mut router = Router {
            seeds: vec!["http://127.0.0.1:1".into()],
            table: Mutex::new(RouteTable::default()),
            channels: Mutex::new(HashMap::new()),
            loaded: tokio::sync::Mutex::new(Instant::now() - Duration::from_secs(1)),
            retry_for: Duration::from_secs(10),
            attempt_timeout: Some(Duration::from_secs(2)),
        };
        let stuck = router.answer_within(3, std::future::pending::<Result<(), Status>>()).await.unwrap_err();
        assert_eq!(stuck.code(), Code::DeadlineExceeded);
        assert!(stuck.message().contains("partition 3") && stuck.message().contains("outcome is unknown"), "{stuck:?}");
        // Resent only when the request writes at most once.
        assert!(matches!(classify(stuck.clone()), Attempt::Fail(_)) && matches!(classify_idempotent(stuck), Attempt::Retry(_)));
        assert_eq!(router.answer_within(3, async { Ok::<_, Status>(7) }).await.unwrap(), 7);
        router.attempt_timeout = None;
        let slow = async {
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok::<_, Status>(8)
        };
        assert_eq!(router.answer_within(3, slow).await.unwrap(), 8, "no deadline: as long as it takes");
    }

    #[test]
    fn a_view_that_places_partitions_beats_one_that_has_applied_more_but_places_none() {
        let view = |applied, partitions: u32| {
            let partitions = (0..partitions).map(|partition| pb::PartitionOwnership { partition, ..Default::default() }).collect();
            status(Some(pb::ClusterStatus { coordination_applied: applied, partitions, ..Default::default() }))
        };
        assert!(view_rank(&view(10, 3)) > view_rank(&view(11_831, 0)), "a restarted node before its first round");
        assert!(view_rank(&view(11, 3)) > view_rank(&view(10, 3)), "then the one that applied more");
        assert!(view_rank(&view(1, 0)) > view_rank(&status(None)), "a single node describes no cluster");
    }

    #[test]
    fn only_refusals_that_wrote_nothing_are_resent() {
        let mut not_leader = Status::unavailable("not the leader");
        not_leader.metadata_mut().insert(NOT_LEADER_TRAILER, "2".parse().unwrap());
        assert!(matches!(classify(not_leader), Attempt::Retry(_)));
        assert!(matches!(classify(Status::aborted("outcome unknown")), Attempt::Fail(_)));
        assert!(matches!(classify(Status::unavailable("the node is shutting down")), Attempt::Fail(_)));
        assert!(matches!(classify(Status::deadline_exceeded("no majority")), Attempt::Fail(_)));
    }

    #[test]
    fn a_request_that_writes_at_most_once_is_resent_on_unknown_outcomes_but_not_on_answers() {
        for unknown in [Status::aborted("outcome unknown"), Status::deadline_exceeded("no majority"), Status::unavailable("gone")] {
            assert!(matches!(classify_idempotent(unknown), Attempt::Retry(_)));
        }
        for answer in [Status::failed_precondition("InsufficientFunds"), Status::invalid_argument("bad"), Status::already_exists("id")] {
            assert!(matches!(classify_idempotent(answer), Attempt::Fail(_)));
        }
    }
}
