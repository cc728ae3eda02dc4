//! The `anthill` commands people run first: the README's `demo`, `bench` (one workload and the
//! suite) and `tail`, each run as the real binary with its `--json` report checked.

mod common;

use std::process::Command;

use common::{append, event, start};

fn run_json(args: &[&str]) -> serde_json::Value {
    let out = Command::new(common::exe()).args(args).output().unwrap();
    assert!(out.status.success(), "anthill {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("anthill {args:?}: not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn the_demo_appends_races_runs_the_ledger_restarts_and_finds_every_acknowledged_event() {
    let report = run_json(&["demo", "--events", "2000", "--json"]);
    assert_eq!(report["events_acknowledged"], 2000);
    // TLS is on by default: the demo's clients spoke https to its node.
    assert!(report["url"].as_str().unwrap().starts_with("https://"), "{report}");
    // Ledger: 20 accounts opened and funded, the accepted transfers, and at most one more if the
    // retried t-0 had been refused the first time.
    let ledger = &report["ledger"];
    let (events, accepted) = (ledger["events"].as_u64().unwrap(), ledger["transfers_accepted"].as_u64().unwrap());
    assert!(events == 40 + accepted || events == 41 + accepted, "{ledger}");
    assert_eq!(accepted + ledger["transfers_rejected"].as_u64().unwrap(), 2000, "{ledger}");
    assert_eq!(ledger["total_balance"], "200000", "{ledger}");
    // The 2,000 load events plus the race's winner and the loser's retry, and the ledger's.
    assert_eq!(report["events_after_restart"].as_u64().unwrap(), 2002 + events);
    assert_eq!(report["subscriber_live_events"].as_u64().unwrap(), 2002 + events);
    assert!(report["race"].as_str().unwrap().contains("FAILED_PRECONDITION"), "{report}");
    // The cluster act: a leader killed under quorum load, its partitions back, nothing lost.
    let cluster = &report["cluster"];
    assert_eq!(cluster["nodes"], 3, "{cluster}");
    assert!(cluster["partitions_failed_over"].as_u64().unwrap() > 0, "{cluster}");
    assert!(cluster["appends_acknowledged"].as_u64().unwrap() > 0 && cluster["failover_ms"].as_f64().unwrap() > 0.0, "{cluster}");
    assert_eq!(cluster["lost"], 0, "{cluster}");
    // Its ledger part: transfers went on through the kill, and every book's balances match them
    // on the leaders and in the restarted node's own state.
    let ledger = &cluster["ledger"];
    assert_eq!(ledger["books"], 16, "{ledger}");
    assert!(ledger["transfers_acknowledged"].as_u64().unwrap() > 0, "{ledger}");
    assert_eq!(ledger["balances_match"], true, "{ledger}");
}

#[test]
fn bench_reports_throughput_and_latency_percentiles_as_json() {
    let report = run_json(&["bench", "--seconds", "1", "--concurrency", "4", "--batch", "10", "--json"]);
    let r = &report["results"][0];
    assert!(r["events"].as_u64().unwrap() > 0 && r["errors"] == 0, "{r}");
    assert_eq!(r["events"].as_u64().unwrap(), r["requests"].as_u64().unwrap() * 10);
    let l = &r["latency_us"];
    assert!(l["p50"].as_u64().unwrap() <= l["p99"].as_u64().unwrap() && l["p99"].as_u64().unwrap() <= l["max"].as_u64().unwrap(), "{l}");
    assert!(report["machine"]["cpus"].as_u64().unwrap() >= 1);
}

#[test]
fn bench_measures_sealing_alone_without_a_node() {
    let report = run_json(&["bench", "--workload", "seal", "--seconds", "1", "--concurrency", "1", "--batch", "10", "--json"]);
    let r = &report["results"][0];
    assert_eq!(r["workload"], "seal", "{r}");
    assert!(r["events"].as_u64().unwrap() > 0 && r["errors"] == 0, "{r}");
    assert_eq!(r["events"].as_u64().unwrap(), r["requests"].as_u64().unwrap() * 10);
    assert!(r["disk_write_bytes_per_event"].is_null(), "sealing writes nothing: {r}");
}

fn temp_dir_has_block_device_counters() -> bool {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(std::env::temp_dir()).unwrap().dev();
    std::path::Path::new(&format!("/sys/dev/block/{}:{}/stat", libc::major(dev), libc::minor(dev))).exists()
}

#[test]
fn the_bench_suite_runs_every_workload_with_its_baseline() {
    let report = run_json(&["bench", "--suite", "--seconds", "0.5", "--json"]);
    let results = report["results"].as_array().unwrap();
    let names: Vec<&str> = results.iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(names.len(), 11, "{names:?}");
    for r in results {
        assert!(r["events_per_sec"].as_f64().unwrap() > 0.0, "{r}");
        // Appends say what they cost the disk (where the data sits on a block device with
        // counters; tmpfs has none); reads and the disk probe itself do not.
        let writes = r["disk_write_bytes_per_event"].as_f64();
        if r["workload"] == "read" || r["workload"] == "disk" {
            assert!(writes.is_none(), "{r}");
        } else if temp_dir_has_block_device_counters() {
            assert!(writes.unwrap() > 0.0, "{r}");
        }
    }
    let disk = results.iter().find(|r| r["workload"] == "disk").unwrap();
    assert_eq!(disk["concurrency"], 1, "{disk}");
    assert!(disk["requests"].as_u64().unwrap() > 0 && disk["latency_us"]["p50"].as_u64().unwrap() > 0, "{disk}");
    let session = results.iter().find(|r| r["name"] == "session: 1 event/append").unwrap();
    assert_eq!((&session["workload"], &session["baseline"]), (&"session".into(), &"raw: 1 event/append".into()));
    let grpc = results.iter().find(|r| r["name"] == "grpc: 1 event/append").unwrap();
    assert_eq!(grpc["baseline"], "raw: 1 event/append");
    assert!(grpc["ratio_to_baseline"].as_f64().unwrap() > 0.0);
    let half = results.iter().find(|r| r["name"] == "grpc: 1 event/append at half max").unwrap();
    assert!(half["rate"].as_f64().unwrap() >= 1.0);
    let ledger = results.iter().find(|r| r["name"] == "ledger: 1 transfer/command").unwrap();
    assert_eq!((&ledger["workload"], &ledger["errors"]), (&"ledger".into(), &0.into()), "{ledger}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_replays_and_follows_as_json_lines() {
    let mut t = start(&["--log-format", "json"]).await;
    t.clients.log.append(append("tailed", None, vec![event("A", "1"), event("B", "2")])).await.unwrap();
    let url = t.node.url();
    let tail = tokio::task::spawn_blocking(move || {
        Command::new(common::exe())
            .args(["tail", "--stream", "tailed", "--from", "1", "--count", "3", "--json", "--server", &url])
            .output()
            .unwrap()
    });
    // The third event is appended only once `tail` is subscribed, so it arrives live.
    let metrics = t.node.metrics_addr.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !common::http_get(metrics, "/metrics").contains("anthill_subscribers 1") {
        assert!(std::time::Instant::now() < deadline, "tail never subscribed");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    t.clients.log.append(append("tailed", None, vec![event("C", "3")])).await.unwrap();
    let out = tail.await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let types: Vec<&str> = lines.iter().map(|l| l["type"].as_str().unwrap()).collect();
    assert_eq!(types, ["A", "B", "C"]);
    // The node was asked for JSON logs: every line it wrote (stopped first, so none is half
    // written) parses.
    let log_file = t.node.log_file.clone();
    drop(t.clients);
    tokio::task::spawn_blocking(move || t.node.terminate(std::time::Duration::from_secs(30))).await.unwrap().unwrap();
    let log = std::fs::read_to_string(&log_file).unwrap();
    assert!(log.lines().count() >= 2, "{log}");
    for line in log.lines() {
        let entry: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(entry["level"].is_string() && entry["fields"].is_object(), "{line}");
    }
}

#[test]
fn bench_refuses_nonsense_durations_and_rates_with_a_clear_error() {
    for (args, message) in [
        (vec!["bench", "--workload", "raw", "--seconds=-1"], "--seconds must be a positive number"),
        (vec!["bench", "--workload", "raw", "--rate", "0"], "--rate must be a positive number"),
        (vec!["bench", "--workload", "raw", "--concurrency", "0"], "--concurrency and --batch must be at least 1"),
    ] {
        let out = Command::new(common::exe()).args(&args).output().unwrap();
        assert!(!out.status.success(), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(message), "{args:?}: {stderr}");
    }
}

#[test]
fn sim_replays_a_seed_to_the_same_trace_hash_and_a_short_hunt_reports_its_seeds() {
    let args = ["sim", "--seed", "7", "--nodes", "5", "--duration", "3", "--json"];
    let first = run_json(&args);
    let again = run_json(&args);
    assert_eq!(first["trace_hash"], again["trace_hash"], "{first}");
    assert!(first["failure"].is_null() && first["acknowledged"].as_u64().unwrap() > 0, "{first}");
    assert!(first["recovery_ms"].as_u64().is_some() && first["stats"]["leaders"].as_u64().unwrap() >= 3, "{first}");
    assert_eq!(first["replay"], "anthill sim --seed 7 --nodes 5 --partitions 3 --duration 3");
    let other = run_json(&["sim", "--seed", "8", "--nodes", "5", "--duration", "3", "--json"]);
    assert_ne!(first["trace_hash"], other["trace_hash"]);
    let set = run_json(&["sim", "--replica-set", "--seed", "7", "--nodes", "5", "--json"]);
    assert_eq!(set["replay"], "anthill sim --replica-set --seed 7 --nodes 5 --duration 1.5");
    assert!(set["failure"].is_null() && set["partitions"] == 1 && set["recovery_ms"].is_null(), "{set}");
    let hunt = run_json(&["sim", "--hunt", "--minutes", "0.05", "--nodes", "3", "--json"]);
    assert!(hunt["seeds"].as_u64().unwrap() > 0 && hunt["failed"].as_array().unwrap().is_empty(), "{hunt}");
    for (bad, message) in [("--nodes=2", "--nodes must be between 3 and 7"), ("--partitions=0", "--partitions must be between 1 and 64")] {
        let out = Command::new(common::exe()).args(["sim", "--seed", "1", bad]).output().unwrap();
        assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains(message), "{bad}");
    }
}
