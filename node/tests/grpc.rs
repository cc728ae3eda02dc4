//! The real binary on an ephemeral loopback port, spoken to over gRPC: appends, reads,
//! expected versions, validation, subscriptions, health, reflection, metrics and the CLI.

mod common;

use std::time::Duration;

use anthill_proto::v1 as pb;
use common::{append, event, http_get, read_partition_all, start, total_events};
use pb::expected_version::Kind;
use tokio_stream::StreamExt;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_appended_events_when_read_back_then_every_field_round_trips() {
    let mut t = start(&[]).await;
    let mut e = event("OrderPlaced", "{\"total\":12}");
    e.metadata.insert("correlation".into(), "c-9".into());
    let r = t
        .clients
        .log
        .append(append("order-1", Some(Kind::NoStream(pb::Empty {})), vec![e, event("OrderPaid", "")]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.first_position, r.last_position, r.stream_version), (1, 2, 2));

    let read = t
        .clients
        .log
        .read(pb::ReadRequest { stream: "order-1".into(), from_version: 0, max_count: 0, linearizable: false })
        .await
        .unwrap()
        .into_inner();
    assert!(read.end_of_stream);
    assert_eq!(read.next, 3);
    let first = &read.events[0];
    assert_eq!((first.partition, first.position, first.stream_version, first.epoch), (r.partition, 1, 1, 1));
    assert_eq!(first.r#type, "OrderPlaced");
    assert_eq!(first.payload, b"{\"total\":12}");
    assert_eq!(first.metadata.get("correlation").map(String::as_str), Some("c-9"));
    assert!(first.append_time_us > 1_600_000_000_000_000);

    let by_partition = read_partition_all(&mut t.clients, r.partition).await;
    assert_eq!(by_partition, read.events);
    // Paging: one event at a time, `next` continues where the last page ended.
    let page = t
        .clients
        .log
        .read(pb::ReadRequest { stream: "order-1".into(), from_version: 2, max_count: 1, linearizable: false })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((page.events.len(), page.events[0].stream_version, page.next), (1, 2, 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_a_single_node_then_an_admin_operation_is_a_record_of_its_audit_stream_and_clients_cannot_write_that_stream() {
    let mut t = start(&[]).await;
    let node = t.clients.node.status(pb::StatusRequest {}).await.unwrap().into_inner().node_id;
    let refused = t.clients.node.decommission(pb::DecommissionRequest { node: "node-9".into(), undo: false }).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "a single node has no replica sets: {refused:?}");
    let stream = format!("$audit/{node}");
    let forged = t.clients.log.append(append(&stream, None, vec![event("audit-record", "{}")])).await.unwrap_err();
    assert_eq!(forged.code(), Code::InvalidArgument);
    assert!(forged.message().contains("reserved"), "{forged:?}");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let read = t.clients.log.read(pb::ReadRequest { stream: stream.clone(), from_version: 1, max_count: 10, linearizable: false });
        let events = read.await.unwrap().into_inner().events;
        if let Some(e) = events.first() {
            assert_eq!(events.len(), 1, "one operation, one record: {events:?}");
            let record: serde_json::Value = serde_json::from_slice(&e.payload).unwrap();
            assert_eq!(
                (e.r#type.as_str(), &record["action"], &record["outcome"]),
                ("audit-record", &"decommission".into(), &"allowed".into())
            );
            assert_eq!(record["by"], "anonymous \"\"", "no TLS: nobody is authenticated");
            assert!(record["detail"].as_str().unwrap().contains("node-9"), "{record}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no audit record in {stream} after 10 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_a_stale_expected_version_when_appending_then_failed_precondition_carries_the_actual_version() {
    let mut t = start(&[]).await;
    t.clients.log.append(append("acct", None, vec![event("A", "1"), event("B", "2")])).await.unwrap();
    let err = t.clients.log.append(append("acct", Some(Kind::Exact(1)), vec![event("C", "3")])).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(err.metadata().get("anthill-actual-version").unwrap().to_str().unwrap(), "2");
    assert!(err.message().contains("expected version 1, actual version 2"), "{}", err.message());
    let err = t.clients.log.append(append("nope", Some(Kind::StreamExists(pb::Empty {})), vec![event("C", "3")])).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let ok = t.clients.log.append(append("acct", Some(Kind::Exact(2)), vec![event("C", "3")])).await.unwrap().into_inner();
    assert_eq!(ok.stream_version, 3);
    assert_eq!(total_events(&mut t.clients).await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_bad_input_then_invalid_argument_names_the_problem_and_nothing_is_written() {
    let mut t = start(&["--max-events-per-append", "5", "--max-event-bytes", "1000", "--partitions", "8"]).await;
    let cases = [
        (append("", None, vec![event("A", "")]), "stream: must not be empty"),
        (append(&"s".repeat(300), None, vec![event("A", "")]), "limits.max_stream_id_bytes"),
        (append("s", None, vec![]), "at least one event"),
        (append("s", None, vec![event("A", ""); 6]), "6 events in one append, the limit is 5"),
        (append("s", None, vec![event("A", ""), event("", "")]), "events[1].type: must not be empty"),
        (append("s", None, vec![event("A", ""), event("A", &"x".repeat(1001))]), "events[1]: payload and metadata are 1001 bytes"),
    ];
    for (request, message) in cases {
        let err = t.clients.log.append(request).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{message}");
        assert!(err.message().contains(message), "{:?} does not contain {message:?}", err.message());
    }
    let err = t
        .clients
        .log
        .read_partition(pb::ReadPartitionRequest { partition: 8, from_position: 1, max_count: 1, linearizable: false })
        .await
        .unwrap_err();
    assert_eq!((err.code(), err.message()), (Code::InvalidArgument, "partition: 8 does not exist; this cluster has partitions 0 to 7"));
    let err = t
        .clients
        .log
        .subscribe(pb::SubscribeRequest { partitions: vec![1], streams: vec!["s".into()], ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(total_events(&mut t.clients).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_a_subscription_then_it_replays_reports_caught_up_and_continues_live() {
    let mut t = start(&["--partitions", "4"]).await;
    for i in 0..10 {
        t.clients.log.append(append(&format!("s-{}", i % 3), None, vec![event("Old", &i.to_string())])).await.unwrap();
    }
    let mut sub =
        t.clients.log.subscribe(pb::SubscribeRequest { streams: vec!["s-1".into()], ..Default::default() }).await.unwrap().into_inner();
    let mut replayed = Vec::new();
    while let pb::subscribe_response::Message::Event(e) = sub.next().await.unwrap().unwrap().message.unwrap() {
        replayed.push(e);
    }
    assert_eq!(replayed.iter().map(|e| e.stream_version).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert!(replayed.iter().all(|e| e.stream == "s-1"));
    t.clients.log.append(append("s-2", None, vec![event("New", "other stream")])).await.unwrap();
    t.clients.log.append(append("s-1", None, vec![event("New", "live")])).await.unwrap();
    let live = tokio::time::timeout(Duration::from_secs(10), sub.next()).await.unwrap().unwrap().unwrap();
    match live.message.unwrap() {
        pb::subscribe_response::Message::Event(e) => {
            assert_eq!((e.stream.as_str(), e.stream_version, e.payload.as_slice()), ("s-1", 4, &b"live"[..]))
        }
        other => panic!("expected the live event, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_a_subscriber_that_does_not_read_then_appends_go_on_and_it_later_gets_everything_in_order() {
    let mut t = start(&["--partitions", "1", "--subscribe-buffer-bytes", "65536"]).await;
    let mut sub = t.clients.log.subscribe(pb::SubscribeRequest { from_position: 1, ..Default::default() }).await.unwrap().into_inner();
    // 4,000 events of 4 KiB (16 MiB) while the subscriber reads nothing: the node waits for it
    // instead of buffering, so the appends are not held up.
    let payload = "x".repeat(4096);
    let appends = tokio::time::timeout(Duration::from_secs(60), async {
        for _ in 0..40 {
            let events = (0..100).map(|_| event("Big", &payload)).collect();
            t.clients.log.append(append("firehose", None, events)).await.unwrap();
        }
    });
    appends.await.expect("appends were blocked by a slow subscriber");
    let mut position = 0;
    while position < 4000 {
        if let pb::subscribe_response::Message::Event(e) = sub.next().await.unwrap().unwrap().message.unwrap() {
            assert_eq!(e.position, position + 1, "positions arrive dense and in order");
            position = e.position;
        }
    }
    let metrics = http_get(t.node.metrics_addr.unwrap(), "/metrics");
    assert!(metrics.contains("anthill_subscribers 1"), "{metrics}");
    assert!(http_get(t.node.metrics_addr.unwrap(), "/ready").ends_with("serving\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reflection_status_and_metrics_are_served() {
    let mut t = start(&["--node-id", "n-test"]).await;
    t.clients.log.append(append("m", None, vec![event("A", "1")])).await.unwrap();

    let channel = tonic::transport::Endpoint::from_shared(t.node.url()).unwrap().connect().await.unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let serving = health.check(tonic_health::pb::HealthCheckRequest { service: "anthill.v1.EventLog".into() }).await.unwrap().into_inner();
    assert_eq!(serving.status(), tonic_health::pb::health_check_response::ServingStatus::Serving);

    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient, server_reflection_request::MessageRequest,
        server_reflection_response::MessageResponse,
    };
    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest { host: String::new(), message_request: Some(MessageRequest::ListServices(String::new())) };
    let mut responses = reflection.server_reflection_info(tokio_stream::iter(vec![request])).await.unwrap().into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) = responses.next().await.unwrap().unwrap().message_response else {
        panic!("no service list")
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"anthill.v1.EventLog") && names.contains(&"anthill.v1.Node"), "{names:?}");

    let status = t.clients.node.status(pb::StatusRequest {}).await.unwrap().into_inner();
    assert_eq!((status.node_id.as_str(), status.partition_count, status.total_events), ("n-test", 64, 1));
    assert!(status.db_size_bytes > 0 && status.map_size_bytes >= status.db_size_bytes);

    let metrics = http_get(t.node.metrics_addr.unwrap(), "/metrics");
    for needle in [
        "anthill_events_appended_total 1",
        "anthill_append_requests_total{outcome=\"ok\"} 1",
        "anthill_commit_seconds_count 1",
        "anthill_db_used_bytes",
    ] {
        assert!(metrics.contains(needle), "{needle} missing from:\n{metrics}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_appends_reads_and_reports_status_as_json() {
    let t = start(&[]).await;
    let url = t.node.url();
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(common::exe()).args(args).args(["--server", &url]).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let appended =
        cli(&["append", "cart-1", "--type", "ItemAdded", "--data", "{\"sku\":1}", "--data", "{\"sku\":2}", "--meta", "k=v", "--json"]);
    assert_eq!(appended["stream_version"], 2);
    let read = cli(&["read", "cart-1", "--json"]);
    assert_eq!(read["events"][1]["payload"], "{\"sku\":2}");
    assert_eq!(read["events"][0]["metadata"]["k"], "v");
    // --verify reads what it appended back from the leader.
    let verified = cli(&["append", "cart-1", "--type", "Checked", "--data", "a", "--data", "b", "--verify", "--json"]);
    assert_eq!((verified["stream_version"].as_u64(), verified["verified"].as_bool()), (Some(4), Some(true)), "{verified}");
    let status = cli(&["status", "--json"]);
    assert_eq!(status["total_events"], 4);

    let out = std::process::Command::new(common::exe())
        .args(["append", "cart-1", "--type", "X", "--data", "1", "--expected", "no-stream", "--server", &url])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("FailedPrecondition"));
}

#[test]
fn an_append_told_to_wait_for_the_cluster_succeeds_once_a_node_comes_up_and_one_not_told_fails_at_once() {
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = free.local_addr().unwrap();
    drop(free);
    let url = format!("http://{addr}");
    let append = |wait: &str| {
        std::process::Command::new(common::exe())
            .args(["append", "orders-1", "--type", "Placed", "--data", "x", "--verify", "--json", "--server", &url])
            .args(["--wait-for-cluster", wait])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let refused = append("0").wait_with_output().unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("no node of the cluster answered"));

    let waiting = append("60");
    std::thread::sleep(std::time::Duration::from_secs(2));
    let dir = tempfile::tempdir().unwrap();
    let _node = anthill_node::local::ChildNode::spawn_at(&common::exe(), &dir.path().join("node"), addr, &[]).unwrap();
    let out = waiting.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("waiting for the cluster"), "{stderr}");
    let appended: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(appended["verified"], true, "{appended}");
}

#[test]
fn given_an_invalid_config_the_node_refuses_to_start_and_names_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("node.yaml");
    std::fs::write(&config, "group_commit:\n  max_batch_events: 10\n").unwrap();
    let out = std::process::Command::new(common::exe()).args(["node", "--config"]).arg(&config).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("group_commit.max_batch_events: must be at least limits.max_events_per_append"), "{stderr}");

    std::fs::write(&config, "storage:\n  partitons: 8\n").unwrap();
    let out = std::process::Command::new(common::exe()).args(["node", "--config"]).arg(&config).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown field `partitons`"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_a_data_dir_created_with_other_partitions_then_the_node_refuses_it() {
    let t = start(&["--partitions", "8"]).await;
    let dir = t.node.data_dir.clone();
    t.node.terminate(Duration::from_secs(20)).unwrap();
    let out = std::process::Command::new(common::exe())
        .args(["node", "--partitions", "16", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("created with 8 partitions"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_the_map_at_its_maximum_then_appends_get_resource_exhausted_and_stored_events_survive() {
    let limits = ["--partitions", "4", "--map-size-initial-bytes", "1048576", "--map-size-max-bytes", "16777216"];
    let mut t = start(&limits).await;
    let payload = "p".repeat(60_000);
    let mut acknowledged = 0u64;
    let refusal = loop {
        let events = (0..10).map(|_| event("Big", &payload)).collect();
        match t.clients.log.append(append("filler", None, events)).await {
            Ok(r) => acknowledged = r.into_inner().stream_version,
            Err(status) => break status,
        }
        assert!(acknowledged < 10_000, "the map never filled");
    };
    assert_eq!(refusal.code(), Code::ResourceExhausted, "{refusal:?}");
    assert!(refusal.message().contains("storage.map_size_max_bytes"), "{}", refusal.message());
    assert!(acknowledged >= 100, "the map grew to hold only {acknowledged} events");
    // Reads still work and hold exactly what was acknowledged.
    let last = t
        .clients
        .log
        .read(pb::ReadRequest { stream: "filler".into(), from_version: acknowledged, max_count: 0, linearizable: false })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((last.events.len(), last.events[0].payload.len(), last.end_of_stream), (1, 60_000, true));
    assert_eq!(total_events(&mut t.clients).await, acknowledged);

    // After a restart with room to grow, every acknowledged event is there and appends go on.
    let dir = t.node.data_dir.clone();
    drop(t.clients);
    t.node.terminate(Duration::from_secs(20)).unwrap();
    let (node, mut clients) = common::start_in(&dir, &["--partitions", "4", "--map-size-max-bytes", "67108864"]).await;
    assert_eq!(total_events(&mut clients).await, acknowledged);
    clients.log.append(append("filler", Some(Kind::Exact(acknowledged)), vec![event("Small", "ok")])).await.unwrap();
    node.terminate(Duration::from_secs(20)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_a_stalled_subscriber_when_the_node_is_stopped_then_it_still_exits_cleanly() {
    let mut t = start(&["--partitions", "1", "--subscribe-buffer-bytes", "65536"]).await;
    // Subscribe and never read: the node's buffer and the HTTP/2 window both fill up.
    let _stalled = t.clients.log.subscribe(pb::SubscribeRequest { from_position: 1, ..Default::default() }).await.unwrap().into_inner();
    let payload = "s".repeat(4096);
    for _ in 0..20 {
        let events = (0..100).map(|_| event("Big", &payload)).collect();
        t.clients.log.append(append("stall", None, events)).await.unwrap();
    }
    let started = std::time::Instant::now();
    tokio::task::spawn_blocking(move || t.node.terminate(Duration::from_secs(30))).await.unwrap().unwrap();
    assert!(started.elapsed() < Duration::from_secs(15), "stopping took {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_a_huge_metadata_key_then_the_append_is_refused_before_anything_is_stored() {
    let mut t = start(&[]).await;
    let mut e = event("A", "x");
    e.metadata.insert("k".repeat(70_000), "v".into());
    let err = t.clients.log.append(append("meta", None, vec![e])).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("events[0].metadata: key of 70000 bytes"), "{}", err.message());
    assert_eq!(total_events(&mut t.clients).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_events_larger_than_the_response_limit_then_reads_page_by_size_and_miss_nothing() {
    let mut t = start(&["--partitions", "1", "--max-request-bytes", "1048576", "--max-event-bytes", "300000"]).await;
    let payload = "r".repeat(250_000);
    for _ in 0..3 {
        let events = (0..4).map(|_| event("Large", &payload)).collect();
        t.clients.log.append(append("large", None, events)).await.unwrap();
    }
    // 12 events of 250 kB against a 1 MiB response limit: pages of at most 4, all 12 read.
    let mut from = 1;
    let mut seen = 0;
    loop {
        let r = t
            .clients
            .log
            .read(pb::ReadRequest { stream: "large".into(), from_version: from, max_count: 0, linearizable: false })
            .await
            .unwrap()
            .into_inner();
        assert!((1..=4).contains(&r.events.len()), "page of {} events", r.events.len());
        assert_eq!(r.events[0].stream_version, from);
        seen += r.events.len();
        from = r.next;
        if r.end_of_stream {
            break;
        }
    }
    assert_eq!(seen, 12);
    assert_eq!(read_partition_all(&mut t.clients, 0).await.len(), 12);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_per_partition_start_positions_then_a_subscription_resumes_exactly_there() {
    let mut t = start(&["--partitions", "2"]).await;
    for i in 0..20 {
        t.clients.log.append(append(&format!("r-{i}"), None, vec![event("Old", &i.to_string())])).await.unwrap();
    }
    let status = t.clients.node.status(pb::StatusRequest {}).await.unwrap().into_inner();
    // Resume partition 0 after its first event, partition 1 past its head (only new events).
    let positions = [(0u32, 2u64), (1u32, status.partitions[1].head_position + 1)].into_iter().collect();
    let mut sub =
        t.clients.log.subscribe(pb::SubscribeRequest { partition_positions: positions, ..Default::default() }).await.unwrap().into_inner();
    let mut replayed = Vec::new();
    let mut caught_up = 0;
    while caught_up < 2 {
        match sub.next().await.unwrap().unwrap().message.unwrap() {
            pb::subscribe_response::Message::Event(e) => replayed.push((e.partition, e.position)),
            pb::subscribe_response::Message::CaughtUp(c) => {
                assert_eq!(c.position, status.partitions[c.partition as usize].head_position);
                caught_up += 1;
            }
        }
    }
    let expected: Vec<(u32, u64)> = (2..=status.partitions[0].head_position).map(|p| (0, p)).collect();
    assert!(expected.len() >= 2, "partition 0 holds too few events for the test: {status:?}");
    assert_eq!(replayed, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_an_address_at_its_connection_limit_then_its_next_connection_is_closed_and_a_freed_place_is_taken_again() {
    let mut t = start(&["--max-connections-per-address", "3"]).await;
    t.clients.log.append(append("m", None, vec![event("A", "1")])).await.unwrap();
    // Three connections from one address are served; its fourth is closed unread. The node
    // accepts in the order the connections were made, so this holds however slow it is.
    let addr = t.node.grpc_addr;
    let mut open = Vec::new();
    for n in 1..=3 {
        let mut stream = common::connect_from_limited_source(addr).await;
        assert!(common::served_in_plain(&mut stream).await, "connection {n} of 3 was closed");
        open.push(stream);
    }
    let mut fourth = common::connect_from_limited_source(addr).await;
    assert!(!common::served_in_plain(&mut fourth).await, "a fourth connection from one address was served");
    let refused_total = || common::metric_sum(&http_get(t.node.metrics_addr.unwrap(), "/metrics"), "anthill_connections_refused_total");
    assert_eq!(refused_total(), 1);
    // The client, at another address, is still served.
    t.clients.log.append(append("m", None, vec![event("A", "2")])).await.unwrap();
    // A connection ended frees its place (once the node has seen it end).
    drop(open.pop().unwrap());
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut refused = 1;
    loop {
        let mut stream = common::connect_from_limited_source(addr).await;
        if common::served_in_plain(&mut stream).await {
            break;
        }
        refused += 1;
        assert!(std::time::Instant::now() < deadline, "the freed place was not given again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(refused_total(), refused);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(debug_assertions), ignore = "the fault it sets is compiled into debug builds only")]
async fn given_a_node_whose_listener_is_lost_when_the_next_connection_comes_then_the_node_exits_with_a_failure() {
    use std::io::BufRead;
    // `ANTHILL_TEST_ACCEPTS=1` (debug builds, security/connections.rs): the accept loop ends at
    // the connection after the first, as if the listener were lost.
    let dir = tempfile::tempdir().unwrap();
    let log_file = dir.path().join("node.log");
    let mut child = std::process::Command::new(common::exe())
        .args(["node", "--data-dir"])
        .arg(dir.path().join("node"))
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .env("ANTHILL_TEST_ACCEPTS", "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&log_file).unwrap())
        .spawn()
        .unwrap();
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let stdout = child.stdout.take().unwrap();
    let mut child = KillOnDrop(child);
    let ready = tokio::task::spawn_blocking(move || {
        std::io::BufReader::new(stdout).lines().map_while(Result::ok).find(|l| l.starts_with(anthill_node::local::READY_PREFIX))
    });
    let ready = tokio::time::timeout(Duration::from_secs(60), ready).await.unwrap().unwrap().expect("the node's ready line");
    let (grpc_addr, _) = anthill_node::local::parse_ready_line(&ready).unwrap();

    // The one connection it accepts is served.
    let mut clients = anthill_node::client::connect(&format!("http://{grpc_addr}")).await.unwrap();
    clients.log.append(append("before", None, vec![event("Served", "1")])).await.unwrap();
    drop(clients);

    // The next finds the listener gone: closed unserved, and the node stops with a failure
    // (so that systemd or the kubelet starts it again) saying why.
    let mut next = tokio::net::TcpStream::connect(grpc_addr).await.unwrap();
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(10), tokio::io::AsyncReadExt::read(&mut next, &mut byte)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "the connection after the listener's loss was not closed: {read:?}");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "the node still runs 30 s after losing its listener");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let log = std::fs::read_to_string(&log_file).unwrap();
    assert!(!status.success(), "the node exited with {status}; its log:\n{log}");
    assert!(log.contains("the gRPC server ended while the node ran"), "the node's log does not say why it stopped:\n{log}");
    assert!(tokio::net::TcpStream::connect(grpc_addr).await.is_err(), "the port still takes connections after the node exited");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_a_stream_id_that_is_not_utf8_then_the_append_is_refused_naming_the_field_and_nothing_is_stored() {
    /// `AppendRequest` with its `stream` as bytes: what a hostile client can put on the wire.
    #[derive(Clone, PartialEq, prost::Message)]
    struct RawAppend {
        #[prost(bytes = "vec", tag = "1")]
        stream: Vec<u8>,
        #[prost(message, repeated, tag = "3")]
        events: Vec<pb::EventData>,
    }
    let mut t = start(&[]).await;
    let channel = tonic::transport::Channel::from_shared(t.node.url()).unwrap().connect().await.unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    for stream in [b"order-\xff\xfe".to_vec(), b"acme/\xc3(".to_vec()] {
        let raw = RawAppend { stream, events: vec![event("OrderPlaced", "1")] };
        grpc.ready().await.unwrap();
        let path = http::uri::PathAndQuery::from_static("/anthill.v1.EventLog/Append");
        let codec = tonic_prost::ProstCodec::<RawAppend, pb::AppendResponse>::default();
        let refused = grpc.unary(tonic::Request::new(raw), path, codec).await.unwrap_err();
        // The protobuf decoder's refusal, INTERNAL as in every gRPC implementation (grpc-go's
        // "error unmarshalling request" too), naming the message, the field and why.
        assert_eq!(refused.code(), Code::Internal, "{refused:?}");
        assert!(refused.message().contains("AppendRequest.stream") && refused.message().contains("UTF-8"), "{}", refused.message());
    }
    assert_eq!(total_events(&mut t.clients).await, 0);
    // The node serves on.
    t.clients.log.append(append("order-1", None, vec![event("OrderPlaced", "1")])).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_a_subscribe_naming_more_streams_than_the_limit_then_it_is_refused_naming_the_limit() {
    let mut t = start(&["--max-subscribe-streams", "3"]).await;
    let streams = |n: usize| (0..n).map(|i| format!("s-{i}")).collect::<Vec<_>>();
    let refused = t.clients.log.subscribe(pb::SubscribeRequest { streams: streams(4), ..Default::default() }).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(
        refused.message().contains("4 streams in one Subscribe, the limit is 3 (limits.max_subscribe_streams)"),
        "{}",
        refused.message()
    );
    // At the limit, it follows.
    t.clients.log.append(append("s-2", None, vec![event("A", "1")])).await.unwrap();
    let mut followed =
        t.clients.log.subscribe(pb::SubscribeRequest { streams: streams(3), ..Default::default() }).await.unwrap().into_inner();
    // Past the other partitions' caught-up marks, the event.
    let event = loop {
        let next = tokio::time::timeout(Duration::from_secs(10), followed.next()).await.unwrap().unwrap().unwrap();
        match next.message {
            Some(pb::subscribe_response::Message::CaughtUp(_)) => continue,
            other => break other,
        }
    };
    assert!(matches!(&event, Some(pb::subscribe_response::Message::Event(e)) if e.stream == "s-2"), "{event:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_a_connection_at_its_call_limit_then_its_next_call_waits_for_a_place_and_other_connections_are_served() {
    let mut t = start(&["--max-concurrent-calls-per-connection", "2"]).await;
    // Two subscriptions hold the connection's two places (open calls that never end).
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(t.clients.log.subscribe(pb::SubscribeRequest::default()).await.unwrap().into_inner());
    }
    let mut same = t.clients.log.clone();
    let waiting = tokio::spawn(async move { same.append(append("waits", None, vec![event("A", "1")])).await });
    // Another connection is served meanwhile; the third call on the first is not.
    let mut other = anthill_node::client::connect(&t.node.url()).await.unwrap();
    other.log.append(append("other", None, vec![event("A", "1")])).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiting.is_finished(), "a third call on a connection limited to two was answered: {:?}", waiting.await);
    // A place freed, it goes through.
    drop(held.pop());
    let answered = tokio::time::timeout(Duration::from_secs(10), waiting).await.expect("the waiting call after a place was freed");
    answered.unwrap().unwrap();
    assert_eq!(total_events(&mut other).await, 2);
}
