//! The spec suite: every spec under `node/specs/` passes, the binary carries exactly those files,
//! and a failing or malformed spec is reported by name with a readable difference.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use anthill_node::app::specs::{BUILTIN, read_files, runner};

fn specs_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/specs"))
}

#[test]
fn every_spec_under_node_specs_passes() {
    let files = read_files(specs_dir()).unwrap();
    let specs = runner::load(&files).unwrap();
    let results = runner::run_all(&specs).unwrap();
    let failures: Vec<String> = results.iter().filter(|r| !r.passed).map(anthill_node::app::specs::command::describe_failure).collect();
    assert!(failures.is_empty(), "{} specs failed:\n{}", failures.len(), failures.join("\n"));
    let ledger = results.iter().filter(|r| r.file.contains("/ledger/")).count();
    assert!(ledger >= 40, "only {ledger} ledger specs");
}

#[test]
fn the_binary_carries_exactly_the_spec_files_of_the_tree() {
    let on_disk: BTreeSet<(String, String)> = read_files(specs_dir())
        .unwrap()
        .into_iter()
        .map(|(path, text)| (path.strip_prefix(&format!("{}/", specs_dir().display())).unwrap().to_string(), text))
        .collect();
    let built_in: BTreeSet<(String, String)> = BUILTIN.iter().map(|(p, t)| (p.to_string(), t.to_string())).collect();
    assert_eq!(on_disk, built_in, "add new spec files to BUILTIN in node/src/app/specs/mod.rs");
}

const WRONG: &str = r#"
domain: ledger
specs:
  - name: a deposit is counted once
    given:
      - AccountOpened: {account: a, currency: EUR, credit_limit: 0, opened_at_us: 1}
    when:
      Deposit: {account: a, amount: 20}
    then:
      events:
        - Deposited: {account: a, amount: 30}
"#;

#[test]
fn given_a_wrong_spec_when_run_then_the_cli_names_it_shows_the_difference_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("wrong.yaml");
    std::fs::write(&file, WRONG).unwrap();
    let out = Command::new(common::exe()).arg("specs").arg(&file).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(stdout.contains("FAIL") && stdout.contains("a deposit is counted once"), "{stdout}");
    assert!(stdout.contains("then.events[0].Deposited.amount: expected 30, got 20"), "{stdout}");
    assert!(stdout.contains("1 specs: 0 passed, 1 failed"), "{stdout}");

    let out = Command::new(common::exe()).arg("specs").arg(&file).arg("--json").output().unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((report["passed"].as_u64(), report["failed"].as_u64()), (Some(0), Some(1)));
    assert_eq!(report["results"][0]["actual"]["events"][0]["Deposited"]["amount"], 20);
}

#[test]
fn given_a_spec_with_a_typo_when_loaded_then_the_error_names_the_file_the_spec_and_the_field() {
    let text = WRONG.replace("amount: 20}", "amout: 20}");
    let error = runner::load(&[("typo.yaml".into(), text)]).err().expect("a typo must not load");
    let message = error.to_string();
    assert!(message.contains("typo.yaml") && message.contains("a deposit is counted once") && message.contains("amout"), "{message}");
}

#[test]
fn given_an_unknown_domain_then_loading_names_the_domains_this_node_runs() {
    let error = runner::load(&[("x.yaml".into(), "domain: stock\nspecs: []\n".into())]).err().expect("unknown domain");
    assert!(error.to_string().contains("ledger"), "{error}");
}
