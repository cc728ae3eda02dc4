//! The provisioning code's own checks, without the lab: `ansible-lint` at its `production`
//! profile over `ansible/`, `terraform fmt -check` over `terraform/`, and `terraform validate` of
//! every module and example whose providers are at hand (the bare-metal ones need none).
//! `terraform init` runs with the project's CLI configuration (`terraform/cli.tfrc`), which
//! keeps it off the network. The lab's test (`metallab.rs`) applies them for real.

use std::path::Path;
use std::process::Command;

fn install(tools: &[&str]) {
    let status = Command::new("bash")
        .arg(anthill_e2e::repository().join("tests/e2e/tools/install.sh"))
        .args(tools)
        .status()
        .expect("the installer runs");
    assert!(status.success(), "{tools:?} did not install");
}

#[test]
fn the_playbooks_pass_ansible_lint_at_its_production_profile() {
    install(&["ansible"]);
    let out = Command::new(anthill_e2e::tool("ansible-lint"))
        .current_dir(anthill_e2e::repository().join("ansible"))
        .args(["--offline", "--profile", "production", "--nocolor"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "ansible-lint:\n{text}");
    assert!(text.contains("Profile 'production' was required, and it passed"), "{text}");
}

fn terraform(dir: &Path, data: &Path, args: &[&str]) -> Result<String, String> {
    let out = Command::new(anthill_e2e::tool("terraform"))
        .arg(format!("-chdir={}", dir.display()))
        .args(args)
        .env("TF_CLI_CONFIG_FILE", anthill_e2e::repository().join("terraform/cli.tfrc"))
        .env("TF_DATA_DIR", data)
        .env("TF_IN_AUTOMATION", "1")
        .output()
        .unwrap();
    anthill_e2e::output(&format!("terraform {}", args.join(" ")), out)
}

#[test]
fn the_terraform_code_is_formatted_and_every_bare_metal_module_validates_offline() {
    install(&["terraform"]);
    let root = anthill_e2e::repository().join("terraform");
    let data = tempfile::tempdir().unwrap();
    terraform(&root, data.path(), &["fmt", "-check", "-recursive", "-diff"]).expect("terraform fmt -check");
    for dir in ["modules/anthill-bare-metal", "examples/bare-metal-12"] {
        let data = data.path().join(dir.replace('/', "-"));
        terraform(&root.join(dir), &data, &["init", "-input=false", "-no-color"]).unwrap_or_else(|e| panic!("{dir}: {e}"));
        let valid = terraform(&root.join(dir), &data, &["validate", "-no-color"]).unwrap_or_else(|e| panic!("{dir}: {e}"));
        assert!(valid.contains("The configuration is valid"), "{dir}: {valid}");
    }
    // A bad host list is refused with the rule named.
    let example = root.join("examples/bare-metal-12");
    let data = data.path().join("examples-bare-metal-12");
    let refused = terraform(
        &example,
        &data,
        &["plan", "-input=false", "-no-color", "-var=anthill_binary=/bin/true", r#"-var=hosts=[{name="a",address="10.0.0.1",raft_id=0}]"#],
    )
    .expect_err("raft_id 0 is refused");
    assert!(refused.contains("raft_id must be a whole number above 0"), "{refused}");
}
