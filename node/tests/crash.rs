//! Kill -9 in the middle of a load, restart, and prove that nothing acknowledged was lost:
//! every acknowledged event is at the position it was acknowledged at, positions have no gaps,
//! stream versions are dense, and no event (acknowledged or not) appears twice.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use anthill_proto::v1 as pb;
use common::{event, read_partition_all, start_in};
use parking_lot::Mutex;

const PARTITIONS: u32 = 8;
const WRITERS: usize = 24;
const KILLS: usize = 3;
/// Small index flushes and a small index tail, so kills land while the indexer writes and while
/// the writer waits for it, and each restart has events to index again from the log.
const ARGS: [&str; 8] =
    ["--partitions", "8", "--index-flush-events", "300", "--index-flush-interval-ms", "20", "--index-tail-max-events", "1000"];

/// (partition, position) each acknowledged event id was given.
type Acked = Arc<Mutex<HashMap<String, (u32, u64)>>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_sigkill_mid_load_when_restarted_then_every_acknowledged_event_is_there_once() {
    let dir = tempfile::tempdir().unwrap();
    let acked = load_and_stop(&dir.path().join("node"), KILLS, |node| node.kill9().unwrap()).await;
    verify(&dir.path().join("node"), &acked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_sigterm_mid_load_then_the_node_exits_cleanly_and_every_acknowledged_event_is_there_once() {
    let dir = tempfile::tempdir().unwrap();
    let acked = load_and_stop(&dir.path().join("node"), 1, |node| node.terminate(Duration::from_secs(30)).unwrap()).await;
    verify(&dir.path().join("node"), &acked).await;
}

/// `rounds` times: start the node, load it from many writers, stop it with `stop` mid-load.
async fn load_and_stop(data_dir: &std::path::Path, rounds: usize, stop: fn(anthill_node::local::ChildNode)) -> Acked {
    let acked: Acked = Arc::default();
    for round in 0..rounds {
        let (node, clients) = start_in(data_dir, &ARGS).await;
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let (mut clients, acked) = (clients.clone(), acked.clone());
                tokio::spawn(async move {
                    for i in 0u64.. {
                        let n = 1 + (i % 4) as usize;
                        let ids: Vec<String> = (0..n).map(|k| format!("r{round}-w{w}-i{i}-k{k}")).collect();
                        let events = ids.iter().map(|id| event("Written", id)).collect();
                        let request = pb::AppendRequest {
                            durability: pb::Durability::Leader as i32,
                            stream: format!("s-{}", (w as u64 * 31 + i) % 40),
                            expected_version: None,
                            events,
                        };
                        let Ok(response) = clients.log.append(request).await else { return };
                        let r = response.into_inner();
                        let mut acked = acked.lock();
                        for (k, id) in ids.into_iter().enumerate() {
                            acked.insert(id, (r.partition, r.first_position + k as u64));
                        }
                    }
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(700 + 300 * round as u64)).await;
        let before = acked.lock().len();
        tokio::task::spawn_blocking(move || stop(node)).await.unwrap();
        for w in writers {
            w.await.unwrap();
        }
        assert!(before > 20, "round {round}: only {before} events acknowledged before the stop");
    }
    acked
}

/// Restarts the node and checks the stored log against what was acknowledged.
async fn verify(data_dir: &std::path::Path, acked: &Acked) {
    let (node, mut clients) = start_in(data_dir, &ARGS).await;
    let mut found: HashMap<String, (u32, u64)> = HashMap::new();
    let mut versions: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for partition in 0..PARTITIONS {
        let events = read_partition_all(&mut clients, partition).await;
        for (i, e) in events.iter().enumerate() {
            assert_eq!(e.position, i as u64 + 1, "partition {partition} has a gap before position {}", e.position);
            let id = String::from_utf8(e.payload.clone()).unwrap();
            let previous = found.insert(id.clone(), (partition, e.position));
            assert!(previous.is_none(), "event {id} is stored twice");
            versions.entry(e.stream.clone()).or_default().push(e.stream_version);
        }
    }
    for (stream, mut v) in versions {
        v.sort_unstable();
        assert_eq!(v, (1..=v.len() as u64).collect::<Vec<_>>(), "stream {stream} versions are not dense");
        // The stream index (rebuilt in part from the log at each start) finds the same events.
        let read = clients
            .log
            .read(pb::ReadRequest { stream: stream.clone(), from_version: 1, max_count: 0, linearizable: false })
            .await
            .unwrap()
            .into_inner();
        let by_index: Vec<u64> = read.events.iter().map(|e| e.stream_version).collect();
        assert_eq!(by_index, v, "stream {stream}: the stream index disagrees with the partitions");
    }
    {
        let acked = acked.lock();
        for (id, at) in acked.iter() {
            assert_eq!(found.get(id), Some(at), "acknowledged event {id} is missing or moved");
        }
        assert!(found.len() >= acked.len());
        eprintln!("{} acknowledged events survived; {} stored in all", acked.len(), found.len());
    }
    drop(clients);
    tokio::task::spawn_blocking(move || node.terminate(Duration::from_secs(20))).await.unwrap().unwrap();
}
