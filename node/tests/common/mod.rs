//! Shared harness of the integration tests: a real `anthill` binary on loopback, in a
//! temporary data directory, reached over real gRPC.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use anthill_node::client::{self, Clients};
use anthill_node::local::ChildNode;
use anthill_proto::v1 as pb;

pub fn exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_anthill"))
}

pub struct TestNode {
    pub node: ChildNode,
    pub clients: Clients,
    pub dir: tempfile::TempDir,
}

pub async fn start(extra_args: &[&str]) -> TestNode {
    let dir = tempfile::tempdir().unwrap();
    let (node, clients) = start_in(&dir.path().join("node"), extra_args).await;
    TestNode { node, clients, dir }
}

pub async fn start_in(data_dir: &Path, extra_args: &[&str]) -> (ChildNode, Clients) {
    let args: Vec<String> = extra_args.iter().map(|s| s.to_string()).collect();
    let node = ChildNode::spawn(&exe(), data_dir, &args).unwrap();
    let clients = client::connect(&node.url()).await.unwrap();
    (node, clients)
}

/// The sum of a metric's samples (whatever their labels) in a `/metrics` page; 0 when absent.
pub fn metric_sum(page: &str, name: &str) -> u64 {
    page.lines()
        .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with([' ', '{'])))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum::<f64>() as u64
}

pub fn event(ty: &str, payload: &str) -> pb::EventData {
    pb::EventData { r#type: ty.into(), payload: payload.as_bytes().to_vec(), metadata: Default::default() }
}

pub fn append(stream: &str, expected: Option<pb::expected_version::Kind>, events: Vec<pb::EventData>) -> pb::AppendRequest {
    pb::AppendRequest {
        durability: pb::Durability::Leader as i32,
        stream: stream.into(),
        expected_version: expected.map(|k| pb::ExpectedVersion { kind: Some(k) }),
        events,
    }
}

/// Every event of a partition, page by page.
pub async fn read_partition_all(clients: &mut Clients, partition: u32) -> Vec<pb::RecordedEvent> {
    let mut out = Vec::new();
    let mut from = 1;
    loop {
        let r = clients
            .log
            .read_partition(pb::ReadPartitionRequest { partition, from_position: from, max_count: 1000, linearizable: false })
            .await
            .unwrap()
            .into_inner();
        from = r.next;
        let done = r.end_of_stream;
        out.extend(r.events);
        if done {
            return out;
        }
    }
}

pub async fn total_events(clients: &mut Clients) -> u64 {
    clients.node.status(pb::StatusRequest {}).await.unwrap().into_inner().total_events
}

/// `GET path` over plain HTTP/1.1 (the metrics endpoint); the whole response, checked to be 200.
pub fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    let body = http_get_any(addr, path);
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    body
}

/// `GET path`: the whole response, whatever its status.
pub fn http_get_any(addr: std::net::SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).unwrap();
    body
}

/// A loopback address no other part of the tests connects from: only a test's own
/// connections count against its connection limit.
pub const LIMITED_SOURCE: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 50));

/// A TCP connection to `addr` from [`LIMITED_SOURCE`].
pub async fn connect_from_limited_source(addr: std::net::SocketAddr) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(std::net::SocketAddr::new(LIMITED_SOURCE, 0)).unwrap();
    socket.connect(addr).await.unwrap()
}

/// Whether a node without TLS serves `stream` (its HTTP/2 server speaks first, with its
/// settings) rather than closing it unread. Waits for one or the other however slowly the
/// node accepts, so the answer never depends on timing.
pub async fn served_in_plain(stream: &mut tokio::net::TcpStream) -> bool {
    use tokio::io::AsyncReadExt;
    match tokio::time::timeout(std::time::Duration::from_secs(60), stream.read(&mut [0u8; 64])).await {
        Err(_) => panic!("the node neither served nor closed a connection in 60 s"),
        Ok(Ok(read)) => read > 0,
        Ok(Err(_reset)) => false,
    }
}
