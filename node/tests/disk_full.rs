//! A real full disk: the node's data directory sits on a small tmpfs mounted by the test (this
//! project's tests run as root, as CI does). The first failed write poisons the log: appends are
//! refused from then on, reads keep working, and after a restart with room every acknowledged
//! event is there.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anthill_proto::v1 as pb;
use common::{append, event, start_in, total_events};
use tonic::Code;

/// A tmpfs mounted for the test's life, unmounted (lazily, so never left behind) on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "anthill-test"]).arg(dir).output().unwrap();
        assert!(out.status.success(), "mount tmpfs (the tests need root): {}", String::from_utf8_lossy(&out.stderr));
        Tmpfs(dir.to_path_buf())
    }

    fn resize(&self, size: &str) {
        let out = Command::new("mount").args(["-o", &format!("remount,size={size}")]).arg(&self.0).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_a_full_disk_then_writes_stop_reads_go_on_and_a_restart_keeps_every_acknowledged_event() {
    let dir = tempfile::tempdir().unwrap();
    let fs = Tmpfs::mount(&dir.path().join("mnt"), "6m");
    let data_dir = fs.0.join("node");
    let args = ["--partitions", "1", "--map-size-initial-bytes", "1048576", "--map-size-max-bytes", "268435456"];
    let (node, mut clients) = start_in(&data_dir, &args).await;

    let payload = "d".repeat(60_000);
    let mut acknowledged = 0u64;
    let failure = loop {
        let events = (0..4).map(|_| event("Fill", &payload)).collect();
        match clients.log.append(append("fill", None, events)).await {
            Ok(r) => acknowledged = r.into_inner().stream_version,
            Err(status) => break status,
        }
        assert!(acknowledged < 1000, "a 6 MiB disk never filled");
    };
    assert_eq!(failure.code(), Code::Internal, "{failure:?}");
    // LMDB reports the short write of a full disk as ENOSPC or EIO.
    assert!(
        failure.message().contains("No space left on device") || failure.message().contains("Input/output error"),
        "{}",
        failure.message()
    );
    assert!(acknowledged > 0);

    // Poisoned: even a tiny append is refused now, with the original cause.
    let refused = clients.log.append(append("tiny", None, vec![event("T", "1")])).await.unwrap_err();
    assert_eq!(refused.code(), Code::Internal);
    assert_eq!(refused.message(), failure.message());
    // The node says so: Status names the failure, health reports EventLog NOT_SERVING.
    let status = clients.node.status(pb::StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(status.write_failure, failure.message());
    let channel = tonic::transport::Endpoint::from_shared(node.url()).unwrap().connect().await.unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let serving = || tonic_health::pb::HealthCheckRequest { service: "anthill.v1.EventLog".into() };
    let mut status = health.check(serving()).await.unwrap().into_inner().status();
    for _ in 0..500 {
        if status == tonic_health::pb::health_check_response::ServingStatus::NotServing {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        status = health.check(serving()).await.unwrap().into_inner().status();
    }
    assert_eq!(status, tonic_health::pb::health_check_response::ServingStatus::NotServing);
    // And so does `/ready` on the metrics port (the readiness probe of a pod that speaks TLS).
    let ready = common::http_get_any(node.metrics_addr.expect("metrics are served"), "/ready");
    assert!(ready.starts_with("HTTP/1.1 503") && ready.contains("storage failure"), "{ready}");
    // Reads still serve exactly what was acknowledged.
    assert_eq!(total_events(&mut clients).await, acknowledged);
    let last = clients
        .log
        .read(pb::ReadRequest { stream: "fill".into(), from_version: acknowledged, max_count: 1, linearizable: false })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(last.events.len(), 1);

    drop(clients);
    tokio::task::spawn_blocking(move || node.terminate(Duration::from_secs(30))).await.unwrap().unwrap();
    fs.resize("64m");
    let (node, mut clients) = start_in(&data_dir, &args).await;
    assert_eq!(total_events(&mut clients).await, acknowledged);
    assert_eq!(clients.node.status(pb::StatusRequest {}).await.unwrap().into_inner().write_failure, "");
    let r = clients
        .log
        .append(append("fill", Some(pb::expected_version::Kind::Exact(acknowledged)), vec![event("After", "ok")]))
        .await
        .unwrap();
    assert_eq!(r.into_inner().stream_version, acknowledged + 1);
    drop(clients);
    tokio::task::spawn_blocking(move || node.terminate(Duration::from_secs(30))).await.unwrap().unwrap();
}
