//! The provisioning code's own checks, without the lab: `ansible-lint` at its `production`
//! profile over `ansible/`, `terraform fmt -check` over `terraform/`, and `terraform validate` of
//! every module and example whose providers are at hand (the bare-metal ones need none).
//! `terraform init` runs with the project's CLI configuration (`terraform/cli.tfrc`), which
//! keeps it off the network. `packer fmt -check` and `packer validate` of the image recipe
//! (`packer/`), every source (the lab's and the clouds', their plugins built by the installer).
//! The Hetzner module validates with the provider the installer builds. The lab's test
//! (`metallab.rs`) applies the bare-metal ones for real, and builds the lab's image.

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

#[test]
fn the_hetzner_module_and_example_validate_offline_with_the_provider_the_installer_builds() {
    install(&["terraform", "terraform-providers"]);
    let root = anthill_e2e::repository().join("terraform");
    let plugins = format!("-plugin-dir={}", anthill_e2e::repository().join(".tools/terraform-providers").display());
    let data = tempfile::tempdir().unwrap();
    for dir in ["modules/anthill-hetzner", "examples/hetzner-three-locations"] {
        let data = data.path().join(dir.replace('/', "-"));
        terraform(&root.join(dir), &data, &["init", "-input=false", "-no-color", &plugins]).unwrap_or_else(|e| panic!("{dir}: {e}"));
        let valid = terraform(&root.join(dir), &data, &["validate", "-no-color"]).unwrap_or_else(|e| panic!("{dir}: {e}"));
        assert!(valid.contains("The configuration is valid"), "{dir}: {valid}");
    }
    // The provider's schema is checked: an argument hcloud_server does not have is refused.
    let broken = tempfile::tempdir().unwrap();
    std::fs::write(
        broken.path().join("main.tf"),
        "terraform {\n  required_providers {\n    hcloud = { source = \"hetznercloud/hcloud\" }\n  }\n}\n\nresource \"hcloud_server\" \"x\" {\n  name = \"x\"\n  server_type = \"cx22\"\n  flavour = \"large\"\n}\n",
    )
    .unwrap();
    let data = broken.path().join(".terraform");
    terraform(broken.path(), &data, &["init", "-input=false", "-no-color", &plugins]).unwrap();
    let refused = terraform(broken.path(), &data, &["validate", "-no-color"]).expect_err("an unknown argument is refused");
    assert!(refused.contains("flavour"), "{refused}");
}

/// The AWS and Google providers cannot be built here, so those modules are only formatted
/// (above); the node configuration every cloud module writes comes from a module without a
/// provider, checked here: its own `terraform test`, and what it renders accepted by the node.
#[test]
fn the_node_configuration_of_the_cloud_modules_passes_its_tests_and_the_node_accepts_it() {
    install(&["terraform"]);
    let module = anthill_e2e::repository().join("terraform/modules/anthill-node-config");
    let data = tempfile::tempdir().unwrap();
    terraform(&module, data.path(), &["init", "-input=false", "-no-color"]).unwrap();
    let tested = terraform(&module, data.path(), &["test", "-no-color"]).unwrap();
    assert!(tested.contains("5 passed, 0 failed"), "{tested}");

    let root = tempfile::tempdir().unwrap();
    let members = r#"[{ name = "n-1", address = "10.0.0.1", raft_id = 1 }, { name = "n-2", address = "10.0.0.2", raft_id = 2 }, { name = "n-3", address = "10.0.0.3", raft_id = 3 }]"#;
    std::fs::write(
        root.path().join("main.tf"),
        format!(
            "module \"config\" {{\n  source = \"{}\"\n  members = {members}\n  coordination = {{ kind = \"consul\" }}\n}}\n\noutput \"n2\" {{\n  value = module.config.yaml[\"n-2\"]\n}}\n",
            module.display()
        ),
    )
    .unwrap();
    let data = root.path().join(".terraform");
    terraform(root.path(), &data, &["init", "-input=false", "-no-color"]).unwrap();
    terraform(root.path(), &data, &["apply", "-auto-approve", "-input=false", "-no-color"]).unwrap();
    let yaml = terraform(root.path(), &data, &["output", "-raw", "n2"]).unwrap();
    let config = root.path().join("node.yaml");
    std::fs::write(&config, &yaml).unwrap();
    let out = Command::new(anthill_e2e::anthill()).args(["node", "--config"]).arg(&config).arg("--print-config").output().unwrap();
    let printed = anthill_e2e::output("anthill node --print-config", out).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    assert!(printed.contains("n-2") && printed.contains("10.0.0.3:7400"), "{printed}");
}

fn packer(args: &[&str]) -> Result<String, String> {
    let repo = anthill_e2e::repository();
    let config = tempfile::tempdir().unwrap();
    let out = Command::new(anthill_e2e::tool("packer"))
        .args(args)
        .env("CHECKPOINT_DISABLE", "1")
        .env("PACKER_PLUGIN_PATH", repo.join(".tools/packer-plugins"))
        .env("PACKER_CONFIG_DIR", config.path())
        .current_dir(&repo)
        .output()
        .unwrap();
    // Packer says what is wrong on its standard output.
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    // Only Packer's own words in the error: the arguments would match any needle a test looks for.
    if out.status.success() { Ok(text) } else { Err(text) }
}

#[test]
fn the_image_recipe_is_formatted_and_every_source_validates() {
    install(&["packer", "ansible"]);
    packer(&["fmt", "-check", "-diff", "packer"]).unwrap_or_else(|e| panic!("packer fmt -check: {e}"));
    let keys = tempfile::tempdir().unwrap();
    let key = keys.path().join("id_ed25519");
    let made = Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(&key).status().unwrap();
    assert!(made.success(), "ssh-keygen");
    let vars = [
        format!("-var=anthill_binary={}", anthill_e2e::anthill().display()),
        "-var=anthill_version=0.1.0".to_string(),
        format!("-var=ansible_playbook={}", anthill_e2e::tool("ansible-playbook").display()),
        format!("-var=lab_ssh_key={}", key.display()),
    ];
    let validate = |extra: &[&str]| {
        let mut args: Vec<&str> = vec!["validate"];
        args.extend(vars.iter().map(String::as_str));
        args.extend(extra);
        args.push("packer");
        packer(&args)
    };
    for source in ["anthill.null.lab", "anthill.amazon-ebs.debian", "anthill.googlecompute.debian"] {
        let valid = validate(&[&format!("-only={source}")]).unwrap_or_else(|e| panic!("{source}: {e}"));
        assert!(valid.contains("The configuration is valid"), "{source}: {valid}");
    }
    // A source missing what it needs is refused, naming it.
    let refused = validate(&["-only=anthill.googlecompute.debian", "-var=gcp_zone="]).expect_err("no zone is refused");
    assert!(refused.contains("a zone must be specified"), "{refused}");
}
