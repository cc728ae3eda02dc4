//! Retention on a real node process: `--retention-max-events` gives up a partition's oldest
//! events on its own (checked every 10 s); reads start after them, `anthill status` shows how far,
//! and a restart keeps it so.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use anthill_proto::v1 as pb;
use common::{append, event, start, start_in};

async fn versions(clients: &mut anthill_node::client::Clients, stream: &str) -> Vec<u64> {
    let read = pb::ReadRequest { stream: stream.into(), from_version: 1, max_count: 0, linearizable: false };
    clients.log.read(read).await.unwrap().into_inner().events.iter().map(|e| e.stream_version).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_a_retention_limit_gives_up_its_oldest_events_and_keeps_going_after_a_restart() {
    let mut t = start(&["--partitions", "1", "--retention-max-events", "4"]).await;
    for i in 0..10 {
        t.clients.log.append(append("orders", None, vec![event("Placed", &i.to_string())])).await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = t.clients.node.status(pb::StatusRequest {}).await.unwrap().into_inner();
        if status.partitions[0].floor_position == 6 {
            assert_eq!(status.total_events, 4, "only the events kept are counted");
            break;
        }
        assert!(Instant::now() < deadline, "retention never trimmed: {:?}", status.partitions[0]);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(versions(&mut t.clients, "orders").await, [7, 8, 9, 10], "reads start after what went");
    // A subscription from the start begins at the oldest event kept.
    let request = pb::SubscribeRequest { partitions: vec![0], from_position: 1, ..Default::default() };
    let mut subscription = t.clients.log.subscribe(request).await.unwrap().into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), subscription.message()).await.unwrap().unwrap();
    match first.and_then(|m| m.message) {
        Some(pb::subscribe_response::Message::Event(event)) => assert_eq!(event.position, 7),
        other => panic!("expected the first event kept, got {other:?}"),
    }
    drop(subscription);
    let out = Command::new(common::exe()).args(["status", "--json", "--server", &t.node.url()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["partitions"][0]["floor_position"], 6, "{status}");
    let out = Command::new(common::exe()).args(["status", "--server", &t.node.url()]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("given up through (retention): p0=6"));

    // Restarted, the node keeps the floor, and appends go on at the stream's version.
    let data_dir = t.dir.path().join("node");
    drop(t.clients);
    tokio::task::spawn_blocking(move || t.node.terminate(Duration::from_secs(30))).await.unwrap().unwrap();
    let (_node, mut clients) = start_in(&data_dir, &["--partitions", "1"]).await;
    let exact = Some(pb::expected_version::Kind::Exact(10));
    let appended = clients.log.append(append("orders", exact, vec![event("Placed", "10")])).await.unwrap().into_inner();
    assert_eq!(versions(&mut clients, "orders").await, [7, 8, 9, 10, 11], "{appended:?}");
}
