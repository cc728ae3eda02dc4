//! A 3-node cluster of real `anthill` processes on loopback addresses (127.0.0.11–13): the
//! embedded coordination store forms over gRPC, every partition gets a leader, and when the
//! node leading the most partitions is killed with SIGKILL, its partitions move to live replicas
//! in a higher epoch. (Replicating the partitions' events comes next; see docs/replication.md.)

mod common;

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use anthill_node::client;
use anthill_node::local::ChildNode;
use anthill_proto::v1 as pb;

const NODES: usize = 3;
const PARTITIONS: u32 = 8;
const SESSION_TTL_MS: u64 = 2_000;

/// The tests of this file run one at a time: each starts three nodes on the same two cores, and
/// a starved node that misses its session renewals would fail over for no reason.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn free_addr(ip: &str) -> SocketAddr {
    TcpListener::bind((ip, 0)).unwrap().local_addr().unwrap()
}

struct Cluster {
    dir: tempfile::TempDir,
    addrs: Vec<SocketAddr>,
    nodes: Vec<Option<ChildNode>>,
}

impl Cluster {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let addrs: Vec<SocketAddr> = (0..NODES).map(|i| free_addr(&format!("127.0.0.{}", 11 + i))).collect();
        let members: String =
            addrs.iter().enumerate().map(|(i, a)| format!("    - {{id: {}, name: node-{}, address: \"{a}\"}}\n", i + 1, i + 1)).collect();
        for i in 0..NODES {
            let config = format!(
                "node_id: node-{}\nstorage:\n  partitions: {PARTITIONS}\ncluster:\n  replication_factor: 3\n  session_ttl_ms: {SESSION_TTL_MS}\n  members:\n{members}",
                i + 1
            );
            std::fs::write(dir.path().join(format!("node-{}.yaml", i + 1)), config).unwrap();
        }
        let mut cluster = Cluster { dir, addrs, nodes: (0..NODES).map(|_| None).collect() };
        for i in 0..NODES {
            cluster.start_node(i);
        }
        cluster
    }

    fn start_node(&mut self, i: usize) {
        let config = self.dir.path().join(format!("node-{}.yaml", i + 1));
        let args = vec!["--config".to_string(), config.display().to_string()];
        let data = self.dir.path().join(format!("node-{}", i + 1));
        self.nodes[i] = Some(ChildNode::spawn_at(&common::exe(), &data, self.addrs[i], &args).unwrap());
    }

    async fn status(&self, i: usize) -> Option<pb::ClusterStatus> {
        let mut c = client::connect(&format!("http://{}", self.addrs[i])).await.ok()?;
        c.node.status(pb::StatusRequest {}).await.ok()?.into_inner().cluster
    }

    /// Polls node `i` until `ready` holds for its cluster view (at most `timeout`).
    async fn wait_for(&self, i: usize, timeout: Duration, ready: impl Fn(&pb::ClusterStatus) -> bool) -> pb::ClusterStatus {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.status(i).await;
            if let Some(s) = &status
                && ready(s)
            {
                return s.clone();
            }
            assert!(Instant::now() < deadline, "node-{} never got there; last view: {status:?}", i + 1);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn all_led(s: &pb::ClusterStatus) -> bool {
    s.partitions.len() == PARTITIONS as usize && s.partitions.iter().all(|p| !p.leader.is_empty())
}

fn leaders(s: &pb::ClusterStatus) -> BTreeMap<u32, (String, u64)> {
    s.partitions.iter().map(|p| (p.partition, (p.leader.clone(), p.epoch))).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_three_nodes_then_partitions_get_leaders_and_a_killed_leaders_partitions_fail_over_in_a_higher_epoch() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut cluster = Cluster::start();
    let formed = cluster.wait_for(0, Duration::from_secs(60), |s| all_led(s) && s.members.iter().all(|m| m.live)).await;
    for p in &formed.partitions {
        assert_eq!((p.replicas.len(), p.epoch), (3, 1), "{p:?}");
        assert_eq!(p.leader, p.replicas[0], "the first replica leads: {p:?}");
    }
    // Every node sees the same ownership.
    for i in 1..NODES {
        cluster.wait_for(i, Duration::from_secs(10), |s| leaders(s) == leaders(&formed)).await;
    }

    // Kill the node that leads the most partitions.
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for p in &formed.partitions {
        *counts.entry(p.leader.clone()).or_default() += 1;
    }
    let victim = counts.iter().max_by_key(|(_, n)| **n).map(|(name, _)| name.clone()).unwrap();
    let victim_index: usize = victim.trim_start_matches("node-").parse::<usize>().unwrap() - 1;
    let lost: Vec<u32> = formed.partitions.iter().filter(|p| p.leader == victim).map(|p| p.partition).collect();
    let observer = (victim_index + 1) % NODES;
    let killed_at = Instant::now();
    cluster.nodes[victim_index].take().unwrap().kill9().unwrap();
    let moved = cluster
        .wait_for(observer, Duration::from_secs(30), |s| {
            all_led(s) && s.partitions.iter().filter(|p| lost.contains(&p.partition)).all(|p| p.leader != victim)
        })
        .await;
    let failover = killed_at.elapsed();
    eprintln!("{} partitions of {victim} failed over in {failover:?} (session TTL {SESSION_TTL_MS} ms)", lost.len());
    for p in &moved.partitions {
        if lost.contains(&p.partition) {
            assert_eq!(p.epoch, 2, "the new leader's epoch fences the old one: {p:?}");
            assert!(p.replicas.contains(&p.leader), "{p:?}");
        } else {
            assert_eq!((p.leader.clone(), p.epoch), leaders(&formed)[&p.partition], "partition {} moved without cause", p.partition);
        }
    }
    assert!(!moved.members.iter().find(|m| m.name == victim).unwrap().live);

    // The node comes back: it is live again and takes nothing back.
    cluster.start_node(victim_index);
    let back = cluster.wait_for(observer, Duration::from_secs(30), |s| s.members.iter().all(|m| m.live)).await;
    assert_eq!(leaders(&back), leaders(&moved), "leadership flapped when the node came back");

    // `anthill status` shows the cluster, as text and as JSON.
    let server = format!("http://{}", cluster.addrs[observer]);
    let out = std::process::Command::new(common::exe()).args(["status", "--server", &server]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("cluster    node-1") && text.contains("leader@epoch by partition") && text.contains("@2"), "{text}");
    let out = std::process::Command::new(common::exe()).args(["status", "--json", "--server", &server]).output().unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["cluster"]["partitions"].as_array().unwrap().len(), PARTITIONS as usize, "{json}");
    assert!(json["cluster"]["members"].as_array().unwrap().iter().all(|m| m["live"] == true), "{json}");
}

async fn clients_of(cluster: &Cluster, i: usize) -> anthill_node::client::Clients {
    client::connect(&format!("http://{}", cluster.addrs[i])).await.unwrap()
}

fn index_of(name: &str) -> usize {
    name.trim_start_matches("node-").parse::<usize>().unwrap() - 1
}

async fn partition_events(cluster: &Cluster, i: usize, partition: u32) -> Vec<pb::RecordedEvent> {
    let mut c = clients_of(cluster, i).await;
    common::read_partition_all(&mut c, partition).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_a_cluster_then_a_partitions_leader_takes_appends_its_followers_hold_them_and_a_new_leader_continues_after_a_kill() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut cluster = Cluster::start();
    let formed = cluster.wait_for(0, Duration::from_secs(60), |s| all_led(s) && s.members.iter().all(|m| m.live)).await;
    let stream = "order-7";
    let partition = anthill_node::log::partition_of(stream, PARTITIONS);
    let owner = formed.partitions.iter().find(|p| p.partition == partition).unwrap().clone();
    let leader = index_of(&owner.leader);
    let follower = (leader + 1) % NODES;

    // The leader serves once it has recovered and written its epoch's marker.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut c = clients_of(&cluster, leader).await;
        let mut first = common::append(stream, None, vec![common::event("Placed", "1")]);
        first.durability = pb::Durability::Quorum as i32;
        match c.log.append(first).await {
            Ok(_) => break,
            Err(status) => assert!(Instant::now() < deadline, "the leader never took the append: {status:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Acknowledged only once a majority of the partition's replicas holds them.
    for i in 2..=3 {
        let mut request = common::append(stream, None, vec![common::event("Placed", &i.to_string())]);
        request.durability = pb::Durability::Quorum as i32;
        clients_of(&cluster, leader).await.log.append(request).await.unwrap();
    }
    let refused = clients_of(&cluster, follower)
        .await
        .log
        .append(common::append(stream, None, vec![common::event("Placed", "x")]))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable);
    assert_eq!(refused.metadata().get(anthill_node::api::NOT_LEADER_TRAILER).unwrap().to_str().unwrap(), partition.to_string());

    // Domain commands are refused in a cluster until followers build domain state.
    let command = pb::OpenAccountRequest {
        book: "b".into(),
        command_id: String::new(),
        account: "a".into(),
        currency: "EUR".into(),
        credit_limit: 0,
    };
    let refused = clients_of(&cluster, leader).await.ledger.open_account(command).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");

    // Every replica holds the same partition: the marker, then the three events.
    let deadline = Instant::now() + Duration::from_secs(30);
    let on_leader = partition_events(&cluster, leader, partition).await;
    assert_eq!(on_leader.len(), 4, "{on_leader:?}");
    for i in 0..NODES {
        loop {
            let held = partition_events(&cluster, i, partition).await;
            if held == on_leader {
                break;
            }
            assert!(Instant::now() < deadline, "node-{} never caught up: {} events", i + 1, held.len());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    // The leader dies; a live replica takes over in a higher epoch and continues the log.
    cluster.nodes[leader].take().unwrap().kill9().unwrap();
    let moved = cluster
        .wait_for(follower, Duration::from_secs(30), |s| {
            s.partitions.iter().find(|p| p.partition == partition).is_some_and(|p| !p.leader.is_empty() && p.leader != owner.leader)
        })
        .await;
    let successor = index_of(&moved.partitions.iter().find(|p| p.partition == partition).unwrap().leader);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut c = clients_of(&cluster, successor).await;
        match c.log.append(common::append(stream, None, vec![common::event("Placed", "4")])).await {
            Ok(response) => {
                let r = response.into_inner();
                assert_eq!((r.first_position, r.stream_version), (6, 4), "after the old events and the new leader's marker");
                break;
            }
            Err(status) => assert!(Instant::now() < deadline, "the new leader never took the append: {status:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let events = partition_events(&cluster, successor, partition).await;
    assert_eq!(&events[..4], &on_leader[..], "the new leader kept every event of the old one");
    assert!(events[5].epoch > events[0].epoch);
}
