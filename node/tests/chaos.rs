//! `anthill chaos` on real processes: a short run with leader kills passes its checks, and the
//! report says what happened (issue 6; the longer suite and the other faults are to come).

mod common;

use std::process::Command;

#[test]
fn a_short_chaos_run_with_leaders_killed_and_frozen_loses_no_acknowledged_append_and_reports_each_fault() {
    let out = Command::new(common::exe())
        .args(["chaos", "--nodes", "3", "--duration", "16", "--kill-every", "3", "--seed", "7", "--json"])
        .output()
        .expect("anthill chaos runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "stdout: {stdout}\nstderr: {}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("a JSON report");
    assert_eq!(report["passed"], true, "{report}");
    let (kills, pauses) = (report["kills"].as_u64().unwrap(), report["pauses"].as_u64().unwrap());
    assert!(kills >= 2 && pauses >= 1, "{report}");
    // Every fault's partition took appends again, and the run was under load throughout.
    let unavailability = report["unavailability_ms"].as_array().unwrap();
    assert_eq!(unavailability.len() as u64, kills + pauses);
    assert!(unavailability.iter().all(|ms| ms.as_u64().is_some_and(|ms| ms < 10_000)), "{report}");
    assert!(report["acknowledged"].as_u64().unwrap() > 1_000, "{report}");
    assert!(report["verdict"]["lost"].as_array().unwrap().is_empty(), "{report}");
    // The progress shows each fault.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!((stderr.matches("killed node-").count() as u64, stderr.matches("froze node-").count() as u64), (kills, pauses));
}

#[test]
fn bad_arguments_are_refused_with_the_flag_named() {
    for (bad, message) in [("--nodes=2", "--nodes must be between 3 and 7"), ("--kill-every=0.5", "--kill-every must be at least 2")] {
        let out = Command::new(common::exe()).args(["chaos", bad]).output().unwrap();
        assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains(message), "{bad}");
    }
}
