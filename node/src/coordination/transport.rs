//! Messages between nodes over gRPC: the coordination store's Raft messages ([`GrpcTransport`],
//! one long-lived `Cluster.Raft` call to each peer) and the partitions' replication messages
//! ([`GrpcReplicaTransport`], one `Cluster.Replicate` call to each peer, every partition on it);
//! [`ClusterService`] is the receiving side of both.
//!
//! Everything is bounded and lossy on purpose: Raft resends what matters, so a full queue or a
//! broken call drops messages instead of building up memory. A call that breaks is opened again
//! at once when it had lived a while, else after a short, jittered backoff (at most 500 ms);
//! see [`stream_to_peer`] for why that matters to a failover.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;

use anthill_proto::v1 as pb;
use protobuf::Message as _;
use raft::eraftpb::Message;
use tokio::sync::{mpsc, watch};
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};

use super::driver::Transport;
use super::embedded::RaftId;
use crate::config::MemberConfig;
use crate::metrics::Metrics;
use crate::replication::NodeId;
use crate::replication::manager::{PartitionHandle, ReplicaTransport};
use crate::replication::message::Message as ReplicaMessage;
use crate::replication::wire::{from_wire, to_wire};
use crate::security::audit::Acceptor;
use crate::security::identity::Peer;
use crate::security::tls::Tls;

/// Messages queued for one peer (or for the local member) before new ones are dropped.
pub const QUEUE_MESSAGES: usize = 4096;
/// Largest message (Raft or replication) sent or accepted over the wire. A replication message
/// holds whole appends, about 4 MiB of them (`replication/shell.rs`), or one larger append: up to
/// `limits.max_request_bytes` (256 MiB at most) plus each event's record header and stream id.
pub const MAX_MESSAGE_BYTES: usize = 288 << 20;
const RECONNECT_MIN: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_millis(500);

/// Sends to peers over gRPC; a task per peer keeps its call open.
pub struct GrpcTransport {
    peers: HashMap<RaftId, mpsc::Sender<Message>>,
}

impl GrpcTransport {
    /// Starts a sender task for every peer, its connections from `local` (see
    /// [`outgoing_address`]); they end when `stopped` turns true.
    pub fn start(
        peers: &[MemberConfig],
        local: Option<IpAddr>,
        tls: Option<Tls>,
        metrics: &Metrics,
        stopped: watch::Receiver<bool>,
    ) -> Self {
        let opened = metrics.peer_calls_opened.get_or_create_owned(&vec![("call", "raft")]);
        let peers = peers
            .iter()
            .map(|member| {
                let (tx, rx) = mpsc::channel(QUEUE_MESSAGES);
                tokio::spawn(stream_to_peer(
                    PeerLink { member: member.clone(), local, tls: tls.clone(), opened: opened.clone() },
                    rx,
                    stopped.clone(),
                    |message: Message| message.write_to_bytes().map(|message| pb::RaftMessage { message }).map_err(|e| e.to_string()),
                    |mut client, stream| async move { client.raft(stream).await },
                ));
                (member.id, tx)
            })
            .collect();
        GrpcTransport { peers }
    }
}

impl Transport for GrpcTransport {
    fn send(&self, message: Message) {
        if let Some(peer) = self.peers.get(&message.to) {
            // Full: the peer is slow or away; Raft will resend.
            let _ = peer.try_send(message);
        }
    }
}

/// Sends the partitions' replication messages to peers over gRPC (one `Cluster.Replicate` call
/// per peer, every partition on it).
pub struct GrpcReplicaTransport {
    me: NodeId,
    peers: HashMap<NodeId, mpsc::Sender<pb::ReplicaEnvelope>>,
}

impl GrpcReplicaTransport {
    pub fn start(
        me: NodeId,
        peers: &[MemberConfig],
        local: Option<IpAddr>,
        tls: Option<Tls>,
        metrics: &Metrics,
        stopped: watch::Receiver<bool>,
    ) -> Self {
        let opened = metrics.peer_calls_opened.get_or_create_owned(&vec![("call", "replicate")]);
        let peers = peers
            .iter()
            .map(|member| {
                let (tx, rx) = mpsc::channel(QUEUE_MESSAGES);
                tokio::spawn(stream_to_peer(
                    PeerLink { member: member.clone(), local, tls: tls.clone(), opened: opened.clone() },
                    rx,
                    stopped.clone(),
                    Ok,
                    |mut client, stream| async move { client.replicate(stream).await },
                ));
                (member.id as NodeId, tx)
            })
            .collect();
        GrpcReplicaTransport { me, peers }
    }
}

impl ReplicaTransport for GrpcReplicaTransport {
    fn send(&self, partition: u32, to: NodeId, message: ReplicaMessage) {
        if let Some(peer) = self.peers.get(&to) {
            let envelope = pb::ReplicaEnvelope { partition, from: u64::from(self.me), message: Some(to_wire(message)) };
            // Full: the peer is slow or away; the protocol resends.
            let _ = peer.try_send(envelope);
        }
    }
}

/// The address a node's connections to its peers leave from: the address it listens on, when
/// that is one address (not `0.0.0.0` or `::`). A peer then sees each connection come from the
/// member's own address, on hosts with several addresses too; and the chaos suite, which runs
/// every node on its own 127.0.0.x in one network namespace, can cut the traffic between two
/// nodes by their addresses (docs/chaos.md).
pub fn outgoing_address(listen: SocketAddr) -> Option<IpAddr> {
    (!listen.ip().is_unspecified()).then_some(listen.ip())
}

/// Keeps one long-lived call to a peer open, feeding it what arrives on `queue` (encoded by
/// `encode`), and opens it again when it breaks: at once after a call that lived a while (the
/// peer restarted, or a connection dropped), else after a jittered backoff (the peer is down or
/// refuses the call).
///
/// The call is watched while the queue is idle and while a message waits for room in it, so a
/// peer that went away and came back is reconnected before the next message, not when that
/// message fails; and a message that found the call broken goes first on the next one instead
/// of being lost (what the broken call had buffered is lost: the protocols resend). Both matter
/// to a failover: a new leader's first messages to a follower that restarted, and the replies
/// of a follower to a leader that restarted, would otherwise wait for a resend period or a
/// backoff. While the peer cannot be reached, what is queued for it is dropped at every failed
/// attempt, so a peer that comes back gets at most a backoff's worth of old messages.
async fn stream_to_peer<T, W, E, O, F>(link: PeerLink, mut queue: mpsc::Receiver<T>, mut stopped: watch::Receiver<bool>, encode: E, open: O)
where
    T: Send + 'static,
    W: Send + 'static,
    E: Fn(T) -> Result<W, String> + Send + 'static,
    O: Fn(pb::cluster_client::ClusterClient<tonic::transport::Channel>, tokio_stream::wrappers::ReceiverStream<W>) -> F + Send + 'static,
    F: std::future::Future<Output = Result<Response<pb::RaftAck>, Status>> + Send + 'static,
{
    let mut backoff = RECONNECT_MIN;
    // Connection attempts that failed in a row; logged as a warning at 8, 16, 32, … of them.
    let mut failures = 0u32;
    // A message taken from the queue that no call carried: it goes first on the next call.
    let mut held: Option<W> = None;
    let (id, address) = (link.member.id, link.member.address.clone());
    loop {
        let endpoint = match link.endpoint() {
            Ok(endpoint) => endpoint,
            Err(e) => {
                // The TLS files as they are now do not make a client configuration: wait for
                // them to be fixed (the reload replaces them), trying again after a backoff.
                tracing::error!(peer = id, %address, error = %e, "cannot make a TLS configuration for a peer; trying again");
                tokio::select! {
                    _ = tokio::time::sleep(RECONNECT_MAX) => continue,
                    _ = until_stopped(&mut stopped) => return,
                }
            }
        };
        let endpoint = endpoint
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true)
            // A peer whose address went away without a reset (a pod made again under a new
            // IP, a host cut off) is noticed within a few seconds, and the next connection
            // resolves its name again.
            .http2_keep_alive_interval(Duration::from_secs(1))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true)
            .local_address(link.local);
        let connected = tokio::select! {
            connected = endpoint.connect() => connected,
            _ = until_stopped(&mut stopped) => return,
        };
        match connected {
            Ok(channel) => {
                failures = 0;
                link.opened.inc();
                let client = pb::cluster_client::ClusterClient::new(channel).max_encoding_message_size(MAX_MESSAGE_BYTES);
                let (tx, rx) = mpsc::channel::<W>(256);
                let mut call = tokio::spawn(open(client, tokio_stream::wrappers::ReceiverStream::new(rx)));
                let opened = tokio::time::Instant::now();
                // Forward until the call breaks or the node stops.
                let ended = loop {
                    let wire = match held.take() {
                        Some(wire) => wire,
                        None => tokio::select! {
                            item = queue.recv() => {
                                let Some(item) = item else { call.abort(); return };
                                match encode(item) {
                                    Ok(wire) => wire,
                                    Err(e) => {
                                        tracing::error!(peer = id, error = %e, "cannot encode a message for a peer; dropped");
                                        continue;
                                    }
                                }
                            }
                            ended = &mut call => break Some(ended),
                            _ = until_stopped(&mut stopped) => { call.abort(); return; }
                        },
                    };
                    tokio::select! {
                        biased;
                        ended = &mut call => { held = Some(wire); break Some(ended); }
                        permit = tx.reserve() => match permit {
                            Ok(permit) => permit.send(wire),
                            // The call let go of its stream: it is ending.
                            Err(_) => { held = Some(wire); break None; }
                        },
                        _ = until_stopped(&mut stopped) => { call.abort(); return; }
                    }
                };
                let ended = match ended {
                    Some(ended) => Some(ended),
                    None => tokio::select! {
                        ended = tokio::time::timeout(RECONNECT_MAX, &mut call) => ended.ok(),
                        _ = until_stopped(&mut stopped) => { call.abort(); return; }
                    },
                };
                call.abort();
                if let Some(Ok(Err(status))) = ended {
                    tracing::debug!(peer = id, %address, %status, "call to a peer ended; reconnecting");
                }
                if opened.elapsed() >= RECONNECT_MAX {
                    // It worked for a while: the peer is likely back already (a restart), or
                    // about to be.
                    backoff = RECONNECT_MIN;
                    continue;
                }
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                if failures >= 8 && failures.is_power_of_two() {
                    tracing::warn!(peer = id, %address, error = %e, failures, "cannot connect to a peer; still trying");
                } else {
                    tracing::debug!(peer = id, %address, error = %e, "cannot connect to a peer; trying again");
                }
            }
        }
        // The peer is down or refuses the call: what was queued for it is stale by the time it
        // is back (the protocols resend what still matters), and holding it would pile up to the
        // queue's bound of messages, each up to a batch of entries, for as long as it is away.
        held = None;
        while queue.try_recv().is_ok() {}
        let jitter = Duration::from_millis(rand::random::<u64>() % 50);
        tokio::select! {
            _ = tokio::time::sleep(backoff + jitter) => {}
            _ = until_stopped(&mut stopped) => return,
        }
        backoff = (backoff * 2).min(RECONNECT_MAX);
    }
}

/// Where a peer is and how to reach it.
struct PeerLink {
    member: MemberConfig,
    /// The address connections leave from ([`outgoing_address`]).
    local: Option<IpAddr>,
    /// This node's TLS, when on: the peer is reached over TLS, must present a certificate naming
    /// it, and is shown this node's certificate.
    tls: Option<Tls>,
    /// Counts the calls opened (`peer_calls_opened`).
    opened: prometheus_client::metrics::counter::Counter,
}

impl PeerLink {
    /// The endpoint of the next connection, with the TLS files as they are now (a rotated
    /// certificate is used from the next connection on).
    fn endpoint(&self) -> Result<tonic::transport::Endpoint, tonic::transport::Error> {
        peer_endpoint(&self.member.name, &self.member.address.to_string(), self.tls.as_ref())
    }
}

/// The endpoint of a connection to member `name` at `address` (`host:port`), with this node's
/// TLS files as they are now: the peer must present a certificate naming it.
pub(crate) fn peer_endpoint(name: &str, address: &str, tls: Option<&Tls>) -> Result<tonic::transport::Endpoint, tonic::transport::Error> {
    match tls {
        None => {
            Ok(tonic::transport::Endpoint::from_shared(format!("http://{address}")).expect("a checked host:port is a valid URI authority"))
        }
        Some(tls) => tonic::transport::Endpoint::from_shared(format!("https://{address}"))
            .expect("a checked host:port is a valid URI authority")
            .tls_config(tls.current().client_to(name)),
    }
}

pub(crate) async fn until_stopped(stopped: &mut watch::Receiver<bool>) {
    let _ = stopped.wait_for(|stop| *stop).await;
}

/// The partitions this node replicates, by partition: where replication messages go.
pub type PartitionTasks = Arc<RwLock<HashMap<u32, PartitionHandle>>>;

/// The `Cluster` service: Raft messages from peers go to the local member's driver, replication
/// messages to the partitions' tasks, audit records to the log ([`Acceptor`]).
pub struct ClusterService {
    /// `None` when the node coordinates through Consul: it runs no embedded store member.
    inbox: Option<mpsc::Sender<Message>>,
    partitions: PartitionTasks,
    audit: Option<Acceptor>,
}

impl ClusterService {
    pub fn new(inbox: Option<mpsc::Sender<Message>>, partitions: PartitionTasks) -> Self {
        ClusterService { inbox, partitions, audit: None }
    }

    /// Takes the members' audit records for the partitions this node leads.
    pub fn with_audit(mut self, acceptor: Acceptor) -> Self {
        self.audit = Some(acceptor);
        self
    }
}

#[tonic::async_trait]
impl pb::cluster_server::Cluster for ClusterService {
    async fn raft(&self, request: Request<tonic::Streaming<pb::RaftMessage>>) -> Result<Response<pb::RaftAck>, Status> {
        let Some(inbox) = &self.inbox else {
            return Err(Status::failed_precondition(
                "this node coordinates through Consul and runs no embedded store member: cluster.coordination must be the same on every member",
            ));
        };
        let peer = request.extensions().get::<Peer>().copied();
        let mut stream = request.into_inner();
        while let Some(message) = stream.next().await {
            let message = message?;
            match Message::parse_from_bytes(&message.message) {
                Ok(message) if peer.is_some_and(|p| p.id != message.from) => {
                    return Err(impersonation(peer, message.from));
                }
                // Full: the member is behind; Raft will resend.
                Ok(message) => {
                    let _ = inbox.try_send(message);
                }
                Err(e) => tracing::warn!(error = %e, "dropping an undecodable Raft message"),
            }
        }
        Ok(Response::new(pb::RaftAck {}))
    }

    async fn replicate(&self, request: Request<tonic::Streaming<pb::ReplicaEnvelope>>) -> Result<Response<pb::RaftAck>, Status> {
        let peer = request.extensions().get::<Peer>().copied();
        let mut stream = request.into_inner();
        while let Some(envelope) = stream.next().await {
            let envelope = envelope?;
            if peer.is_some_and(|p| p.id != envelope.from) {
                return Err(impersonation(peer, envelope.from));
            }
            let Ok(from) = NodeId::try_from(envelope.from) else { continue };
            let message = match envelope.message.map(from_wire) {
                Some(Ok(message)) => message,
                Some(Err(e)) => {
                    tracing::warn!(from, partition = envelope.partition, error = %e, "dropping a malformed replication message");
                    continue;
                }
                None => continue,
            };
            // A partition this node does not replicate (yet): the sender resends.
            if let Some(task) = self.partitions.read().get(&envelope.partition) {
                task.deliver(from, message);
            }
        }
        Ok(Response::new(pb::RaftAck {}))
    }

    async fn audit(&self, request: Request<pb::AuditBatch>) -> Result<Response<pb::AuditAck>, Status> {
        let Some(acceptor) = &self.audit else { return Err(Status::unimplemented("this node takes no audit records")) };
        let peer = request.extensions().get::<Peer>().copied();
        acceptor.accept(peer, request.into_inner()).await?;
        Ok(Response::new(pb::AuditAck {}))
    }
}

/// A member's certificate on a call whose messages claim another member as their sender: the
/// call ends, nothing of it is taken.
fn impersonation(peer: Option<Peer>, claimed: u64) -> Status {
    let id = peer.map_or(0, |p| p.id);
    tracing::warn!(member = id, claimed, "a member sent messages in another member's name; call refused");
    Status::permission_denied(format!("the caller's certificate names member {id}, but its messages claim to come from member {claimed}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A peer's runtime: dropping it ends the peer and its connections, as when its process dies.
    struct Peer(Option<tokio::runtime::Runtime>);

    impl Drop for Peer {
        fn drop(&mut self) {
            if let Some(runtime) = self.0.take() {
                runtime.shutdown_background();
            }
        }
    }

    /// A peer: the `Cluster` service on `address`, in a runtime of its own, once it listens.
    async fn peer(address: SocketAddr) -> (Peer, mpsc::Receiver<Message>) {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let (inbox, received) = mpsc::channel(16);
        let (listening, bound) = tokio::sync::oneshot::channel();
        runtime.spawn(async move {
            let listen = || -> std::io::Result<tokio::net::TcpListener> {
                let socket = tokio::net::TcpSocket::new_v4()?;
                socket.set_reuseaddr(true)?;
                socket.bind(address)?;
                socket.listen(16)
            };
            let listener = match listen() {
                Ok(listener) => listener,
                Err(e) => return listening.send(Err(e.to_string())).unwrap(),
            };
            listening.send(Ok(())).unwrap();
            let incoming = tonic::transport::server::TcpIncoming::from(listener);
            let service = ClusterService::new(Some(inbox), PartitionTasks::default());
            tonic::transport::Server::builder()
                .add_service(pb::cluster_server::ClusterServer::new(service))
                .serve_with_incoming(incoming)
                .await
                .unwrap();
        });
        bound.await.unwrap().unwrap_or_else(|e| panic!("the peer cannot listen on {address}: {e}"));
        (Peer(Some(runtime)), received)
    }

    fn message(index: u64) -> Message {
        Message { to: 2, index, ..Default::default() }
    }

    async fn next_index(received: &mut mpsc::Receiver<Message>) -> u64 {
        tokio::time::timeout(Duration::from_secs(5), received.recv()).await.expect("a message within 5 s").expect("the peer runs").index
    }

    #[tokio::test]
    async fn given_a_peer_that_restarted_while_nothing_was_sent_to_it_then_the_first_message_afterwards_arrives() {
        let address: SocketAddr = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            probe.local_addr().unwrap()
        };
        let (runtime, mut received) = peer(address).await;
        let (_stop, stopped) = watch::channel(false);
        let transport = GrpcTransport::start(
            &[MemberConfig { id: 2, name: "node-2".into(), address: address.into() }],
            None,
            None,
            &Metrics::default(),
            stopped,
        );
        // The first call may find the peer not listening yet: its backoff is short.
        transport.send(message(1));
        let first = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(200), received.recv()).await {
                    return m.index;
                }
                transport.send(message(1));
            }
        });
        assert_eq!(first.await.expect("the peer took a message"), 1);
        // The peer dies and comes back on its address while this node has nothing to send it,
        // as a follower that restarted between two failovers.
        drop(runtime);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (_runtime, mut received) = peer(address).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        // Sent once: no protocol resend here, so a lost message would never arrive.
        transport.send(message(2));
        assert_eq!(next_index(&mut received).await, 2, "the first message after the restart arrives");
    }
}
