//! Raft messages of the embedded coordination store between nodes, over gRPC: the client side
//! ([`GrpcTransport`]: one long-lived `Cluster.Raft` call to each peer) and the server side
//! ([`ClusterService`]: hands what arrives to the local member's driver).
//!
//! Everything is bounded and lossy on purpose: Raft resends what matters, so a full queue or a
//! broken call drops messages instead of building up memory. A call that fails is opened again
//! after a short, jittered backoff.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use anthill_proto::v1 as pb;
use protobuf::Message as _;
use raft::eraftpb::Message;
use tokio::sync::{mpsc, watch};
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};

use super::driver::Transport;
use super::embedded::RaftId;

/// Messages queued for one peer (or for the local member) before new ones are dropped.
pub const QUEUE_MESSAGES: usize = 4096;
/// Largest Raft message accepted over the wire.
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;
const RECONNECT_MIN: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(2);

/// Sends to peers over gRPC; a task per peer keeps its call open.
pub struct GrpcTransport {
    peers: HashMap<RaftId, mpsc::Sender<Message>>,
}

impl GrpcTransport {
    /// Starts a sender task for every peer; they end when `stopped` turns true.
    pub fn start(peers: &[(RaftId, SocketAddr)], stopped: watch::Receiver<bool>) -> Self {
        let peers = peers
            .iter()
            .map(|&(id, address)| {
                let (tx, rx) = mpsc::channel(QUEUE_MESSAGES);
                tokio::spawn(send_to_peer(id, address, rx, stopped.clone()));
                (id, tx)
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

async fn send_to_peer(id: RaftId, address: SocketAddr, mut queue: mpsc::Receiver<Message>, mut stopped: watch::Receiver<bool>) {
    let mut backoff = RECONNECT_MIN;
    loop {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
            .expect("a socket address is a valid URI")
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true)
            .connect_lazy();
        let mut client = pb::cluster_client::ClusterClient::new(channel).max_encoding_message_size(MAX_MESSAGE_BYTES);
        let (tx, rx) = mpsc::channel::<pb::RaftMessage>(256);
        let call = tokio::spawn(async move { client.raft(tokio_stream::wrappers::ReceiverStream::new(rx)).await });
        // Forward until the call breaks (its receiver closes) or the node stops.
        loop {
            tokio::select! {
                message = queue.recv() => {
                    let Some(message) = message else { return };
                    let bytes = match message.write_to_bytes() {
                        Ok(bytes) => bytes,
                        Err(e) => { tracing::error!(peer = id, error = %e, "cannot encode a Raft message; dropped"); continue; }
                    };
                    if tx.send(pb::RaftMessage { message: bytes }).await.is_err() {
                        break;
                    }
                    backoff = RECONNECT_MIN;
                }
                _ = until_stopped(&mut stopped) => { call.abort(); return; }
            }
        }
        if let Ok(Err(status)) = call.await {
            tracing::debug!(peer = id, %address, %status, "Raft call to a peer ended; reconnecting");
        }
        let jitter = Duration::from_millis(rand::random::<u64>() % 50);
        tokio::select! {
            _ = tokio::time::sleep(backoff + jitter) => {}
            _ = until_stopped(&mut stopped) => return,
        }
        backoff = (backoff * 2).min(RECONNECT_MAX);
    }
}

pub(crate) async fn until_stopped(stopped: &mut watch::Receiver<bool>) {
    let _ = stopped.wait_for(|stop| *stop).await;
}

/// The `Cluster` service: Raft messages from peers go to the local member's driver.
pub struct ClusterService {
    inbox: mpsc::Sender<Message>,
}

impl ClusterService {
    pub fn new(inbox: mpsc::Sender<Message>) -> Self {
        ClusterService { inbox }
    }
}

#[tonic::async_trait]
impl pb::cluster_server::Cluster for ClusterService {
    async fn raft(&self, request: Request<tonic::Streaming<pb::RaftMessage>>) -> Result<Response<pb::RaftAck>, Status> {
        let mut stream = request.into_inner();
        while let Some(message) = stream.next().await {
            let message = message?;
            match Message::parse_from_bytes(&message.message) {
                // Full: the member is behind; Raft will resend.
                Ok(message) => {
                    let _ = self.inbox.try_send(message);
                }
                Err(e) => tracing::warn!(error = %e, "dropping an undecodable Raft message"),
            }
        }
        Ok(Response::new(pb::RaftAck {}))
    }
}
