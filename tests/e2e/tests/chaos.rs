//! The chaos suite's short run, in CI (issue 6, docs/chaos.md): `anthill chaos` on 3 real nodes
//! under load through two cycles of the nemesis — ten leader kills and two of every other fault
//! (node kill, pause, isolation, one-way cut, split, rolling restart) — then the checks over
//! every replica and the ledger's books, with TLS on (mutual between the nodes, clients with
//! certificates) and events encrypted at rest. And the run leaves nothing behind on this host.

use std::process::Command;

use serde_json::Value;

fn chaos(args: &[&str]) -> std::process::Output {
    anthill_e2e::ensure_tools();
    Command::new(anthill_e2e::anthill()).arg("chaos").args(args).output().expect("anthill chaos runs")
}

fn host_loopback_qdiscs() -> String {
    let out = Command::new("tc").args(["qdisc", "show", "dev", "lo"]).output().expect("tc runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn given_three_nodes_under_load_when_leaders_are_killed_paused_cut_off_and_restarted_then_nothing_acknowledged_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let loopback_before = host_loopback_qdiscs();
    let dir_arg = dir.path().display().to_string();
    let out = chaos(&[
        "--nodes",
        "3",
        "--fault-count",
        "22",
        "--fault-every",
        "2",
        "--seed",
        "7",
        "--tls",
        "--encrypt",
        "--json",
        "--dir",
        &dir_arg,
    ]);
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "stdout: {stdout}\nstderr: {stderr}");
    let report: Value = serde_json::from_str(&stdout).expect("a JSON report");
    assert_eq!(report["passed"], true, "{report:#}");
    assert_eq!((&report["tls"], &report["encrypted"]), (&Value::Bool(true), &Value::Bool(true)), "TLS and encryption on: {report:#}");
    let verdict = &report["verdict"];
    for check in ["lost", "duplicated", "failed_but_stored", "missing_on_a_replica", "diverged"] {
        assert_eq!(verdict[check].as_array().map(Vec::len), Some(0), "{check}: {verdict:#}");
    }
    assert_eq!(report["ledger"]["problems"].as_array().map(Vec::len), Some(0), "{:#}", report["ledger"]);
    assert_eq!(report["ledger"]["replicas_checked"], 12, "4 books on 3 replicas each");

    // Two cycles of the schedule: every kind of fault, ten leader kills; a rolling restart
    // restarts each of the three nodes.
    let counts = &report["fault_counts"];
    let count = |kind: &str| counts[kind].as_u64().unwrap_or(0);
    assert!(count("kill-leader") >= 10, "{counts}");
    for kind in ["kill-node", "pause", "isolate", "one-way", "split"] {
        assert!(count(kind) >= 1, "{kind}: {counts}");
    }
    assert_eq!(count("rolling-restart"), 6, "{counts}");

    // Under load throughout, transfers among the operations, some refused by the ledger's
    // rules; each leader kill's partitions took writes again within the clients' patience.
    assert!(report["acknowledged"].as_u64().unwrap() > 1_000, "{report:#}");
    assert!(report["transfers"].as_u64().unwrap() > 100 && report["failed"].as_u64().unwrap() > 0, "{report:#}");
    let faults = report["faults"].as_array().unwrap();
    for fault in faults.iter().filter(|f| f["kind"] == "kill-leader") {
        let ms = fault["unavailability_ms"].as_u64();
        assert!(ms.is_some_and(|ms| ms < 10_000), "{fault}");
    }
    assert!(report["steady_ops_per_s"].as_f64().unwrap() > 0.0 && report["chaos_ops_per_s"].as_f64().unwrap() > 0.0);

    // The progress named every fault; the report and the picture are in the run's directory,
    // each fault marked in both panels; the nodes' data is gone after a pass.
    let progress = stderr.lines().filter(|l| l.starts_with("chaos: ") && faults.iter().any(|f| l.contains(f["target"].as_str().unwrap())));
    assert_eq!(progress.count(), faults.len(), "{stderr}");
    let written: Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join("report.json")).unwrap()).unwrap();
    assert_eq!(written, report);
    let history = std::fs::read_to_string(dir.path().join("history.jsonl")).unwrap();
    assert_eq!(history.lines().count() as u64, report["operations"].as_u64().unwrap());
    let first: Value = serde_json::from_str(history.lines().next().unwrap()).unwrap();
    for field in ["id", "kind", "value", "partition", "invoked_ms", "completed_ms", "outcome"] {
        assert!(!first[field].is_null(), "{field}: {first}");
    }
    let picture = std::fs::read_to_string(dir.path().join("timeline.svg")).unwrap();
    assert_eq!(picture.matches("<title>").count(), 2 * faults.len());
    assert!(!dir.path().join("nodes").exists());

    // The cuts were made in the run's own network namespace: this host's loopback is as it was.
    assert_eq!(host_loopback_qdiscs(), loopback_before);
}

#[test]
fn bad_arguments_are_refused_with_the_flag_named() {
    for (bad, message) in [
        ("--nodes=2", "--nodes must be between 3 and 7"),
        ("--fault-every=0.5", "--fault-every must be at least 1 s"),
        ("--duration=2", "--duration must be between 5 s and 24 h"),
        ("--duration=ten", "is not a duration"),
        ("--faults=meteor", "invalid value 'meteor'"),
        ("--rate=0", "--rate must be between 1 and 1000000"),
    ] {
        let out = chaos(&[bad]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(message), "{bad}: {stderr}");
    }
}
