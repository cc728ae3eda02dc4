//! The chaos suite with Consul as the coordination store (issue 7, docs/chaos.md): `anthill
//! chaos --coordination consul` starts a real Consul server beside each of three nodes (ACLs
//! on, the nodes holding a least-privilege token; TLS and encryption at rest on), kills partition leaders and a Consul server
//! and cuts a leader's host off, then runs the same checks as with the embedded store.

use std::process::Command;

use serde_json::Value;

/// Consul's smallest session TTL, which the run uses; Consul frees a dead holder's lock between
/// one and two TTLs after its last renewal.
const TTL_MS: u64 = 10_000;

fn chaos(args: &[&str]) -> std::process::Output {
    anthill_e2e::ensure_tools();
    Command::new(anthill_e2e::anthill()).arg("chaos").args(args).output().expect("anthill chaos runs")
}

/// Processes whose command line names `needle`.
fn processes_naming(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(needle) {
                found.push(format!("{}: {cmdline}", entry.file_name().to_string_lossy()));
            }
        }
    }
    found
}

#[test]
fn given_consul_as_the_coordination_store_when_leaders_and_a_consul_server_are_killed_and_a_host_is_cut_off_then_nothing_acknowledged_is_lost()
 {
    let consul = anthill_e2e::tool("consul").display().to_string();
    let dir = tempfile::tempdir().unwrap();
    let dir_arg = dir.path().display().to_string();
    let out = chaos(&[
        "--coordination",
        "consul",
        "--consul",
        &consul,
        "--nodes",
        "3",
        "--faults",
        "kill-leader,kill-consul,isolate",
        "--fault-count",
        "7",
        // Each failover takes 2xTTL; a fault every 25 s keeps them from overlapping (a leader
        // elected after one kill, killed again before it took a write, would add both).
        "--fault-every",
        "25",
        "--seed",
        "11",
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
    assert_eq!(report["coordination"], "consul");
    assert_eq!((&report["tls"], &report["encrypted"]), (&Value::Bool(true), &Value::Bool(true)), "TLS and encryption on: {report:#}");
    let verdict = &report["verdict"];
    for check in ["lost", "duplicated", "failed_but_stored", "missing_on_a_replica", "diverged"] {
        assert_eq!(verdict[check].as_array().map(Vec::len), Some(0), "{check}: {verdict:#}");
    }
    assert_eq!(report["ledger"]["problems"].as_array().map(Vec::len), Some(0), "{:#}", report["ledger"]);
    assert!(stderr.contains("chaos: 3 Consul servers up"), "{stderr}");

    // One cycle of the schedule: five leader kills, a Consul server killed, a host cut off.
    let counts = &report["fault_counts"];
    let count = |kind: &str| counts[kind].as_u64().unwrap_or(0);
    assert_eq!((count("kill-leader"), count("kill-consul"), count("isolate")), (5, 1, 1), "{counts}");

    // A killed leader's lock is freed by Consul, not sooner than the TTL after its last renewal
    // (a third of a TTL before the kill at most) and not later than twice the TTL: the
    // unavailability shows that the nodes really decided ownership in Consul.
    let faults = report["faults"].as_array().unwrap();
    for fault in faults.iter().filter(|f| f["kind"] == "kill-leader") {
        let ms = fault["unavailability_ms"].as_u64().unwrap_or_else(|| panic!("no write after {fault}"));
        assert!((TTL_MS * 2 / 3..TTL_MS * 3).contains(&ms), "{fault}");
    }
    let killed = faults.iter().find(|f| f["kind"] == "kill-consul").unwrap();
    assert!(killed["target"].as_str().unwrap().starts_with("consul-"), "{killed}");

    // The servers ran in the run's namespace and were stopped with it.
    assert_eq!(processes_naming(&dir_arg), Vec::<String>::new());
    assert!(!dir.path().join("nodes").exists());
}

#[test]
fn consul_faults_and_flags_without_consul_are_refused_by_name() {
    for (bad, message) in [
        (vec!["--faults=kill-consul"], "--faults kill-consul needs --coordination consul"),
        (vec!["--consul=/bin/true"], "--consul is for --coordination consul"),
        (vec!["--coordination=consul", "--consul=/nonexistent/consul"], "--consul /nonexistent/consul: no such file"),
    ] {
        let out = chaos(&bad);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(message), "{bad:?}: {stderr}");
    }
}
