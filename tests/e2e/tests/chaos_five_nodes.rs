//! The chaos suite on 5 real nodes (issue 6, docs/chaos.md), TLS and encryption at rest on: one cycle of the nemesis — five
//! leader kills and one of every other fault, where a split cuts two nodes off from three — in
//! fixed-rate mode, and the same checks as on 3 nodes. A file of its own so cargo runs it after the 3-node suite,
//! not beside it on the same cores.

use std::process::Command;

use serde_json::Value;

#[test]
fn given_five_nodes_under_load_when_one_cycle_of_faults_runs_then_nothing_acknowledged_is_lost_and_the_ledger_holds() {
    anthill_e2e::ensure_tools();
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(anthill_e2e::anthill())
        .args(["chaos", "--nodes", "5", "--partitions", "5", "--fault-count", "11", "--fault-every", "2", "--seed", "11"])
        .args(["--rate", "300", "--tls", "--encrypt", "--json"])
        .arg("--dir")
        .arg(dir.path())
        .output()
        .expect("anthill chaos runs");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "stdout: {stdout}\nstderr: {stderr}");
    let report: Value = serde_json::from_str(&stdout).expect("a JSON report");
    assert_eq!(report["passed"], true, "{report:#}");
    assert_eq!((&report["tls"], &report["encrypted"]), (&Value::Bool(true), &Value::Bool(true)), "TLS and encryption on: {report:#}");
    assert_eq!(report["verdict"]["lost"].as_array().map(Vec::len), Some(0));
    assert_eq!(report["ledger"]["replicas_checked"], 15, "5 books on 3 replicas each");
    let counts = &report["fault_counts"];
    assert_eq!((counts["kill-leader"].as_u64(), counts["rolling-restart"].as_u64()), (Some(5), Some(5)), "{counts}");
    // The split's minority is two of the five nodes.
    let split = report["faults"].as_array().unwrap().iter().find(|f| f["kind"] == "split").expect("a split");
    assert_eq!(split["target"].as_str().unwrap().matches("node-").count(), 2, "{split}");
    assert!(report["acknowledged"].as_u64().unwrap() > 1_000, "{report:#}");
    // Fixed rate: the steady state sends 300 operations a second, of which all but the
    // transfers the ledger refuses are acknowledged.
    let steady = report["steady_ops_per_s"].as_f64().unwrap();
    assert!((180.0..=310.0).contains(&steady), "steady state {steady}/s at a rate of 300/s");
}
