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
    assert!(tested.contains("8 passed, 0 failed"), "{tested}");

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

/// Node processes killed when the test ends.
struct Nodes(Vec<std::process::Child>);

impl Drop for Nodes {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The cloud modules' TLS without a cloud: certificates made before any machine has an address
/// (member names and the shared client name only, as docs/clouds.md says), the user data the
/// node-config module renders from them, and three real nodes started from the files that user
/// data writes, at loopback addresses no certificate names. They form a cluster (peers check
/// member names, not addresses), and the CLI reaches them with `--tls-server-name` only.
#[test]
fn cloud_nodes_with_certificates_made_before_their_addresses_form_a_tls_cluster_from_the_rendered_user_data() {
    use base64::Engine as _;
    install(&["terraform"]);
    let anthill = anthill_e2e::anthill();
    let root = tempfile::tempdir().unwrap();
    let certs = root.path().join("anthill-tls");
    let certs_dir = certs.display().to_string();
    let make = |args: &[&str]| {
        let out = Command::new(&anthill).arg("certs").args(args).args(["--dir", &certs_dir]).output().unwrap();
        anthill_e2e::output(&format!("anthill certs {args:?}"), out).unwrap();
    };
    make(&["ca"]);
    for member in ["c-1", "c-2", "c-3"] {
        make(&["node", member, "--host", "anthill"]);
    }
    make(&["client", "admin"]);

    let module = anthill_e2e::repository().join("terraform/modules/anthill-node-config");
    let members: String = (1..=3).map(|i| format!("{{ name = \"c-{i}\", address = \"127.0.0.{}\", raft_id = {i} }},", 40 + i)).collect();
    std::fs::write(
        root.path().join("main.tf"),
        format!(
            "module \"config\" {{\n  source = \"{}\"\n  members = [{members}]\n  partitions = 4\n  tls = {{ dir = \"{certs_dir}\", server_name = \"anthill\" }}\n}}\n\n\
             output \"user_data\" {{\n  value = module.config.cloud_init\n  sensitive = true\n}}\n",
            module.display()
        ),
    )
    .unwrap();
    let data = root.path().join(".terraform");
    terraform(root.path(), &data, &["init", "-input=false", "-no-color"]).unwrap();
    terraform(root.path(), &data, &["apply", "-auto-approve", "-input=false", "-no-color"]).unwrap();
    let user_data: serde_json::Value =
        serde_json::from_str(&terraform(root.path(), &data, &["output", "-json", "user_data"]).unwrap()).unwrap();

    // Each member's machine: the files its user data writes, under a folder of its own.
    let mut nodes = Nodes(Vec::new());
    for i in 1..=3 {
        let machine = root.path().join(format!("c-{i}"));
        let cloud_init: serde_yaml::Value = serde_yaml::from_str(user_data[format!("c-{i}")].as_str().unwrap()).unwrap();
        let mut written = std::collections::BTreeMap::new();
        for file in cloud_init["write_files"].as_sequence().unwrap() {
            let path = file["path"].as_str().unwrap().to_string();
            let bytes = base64::engine::general_purpose::STANDARD.decode(file["content"].as_str().unwrap()).unwrap();
            let local = machine.join(path.trim_start_matches('/'));
            std::fs::create_dir_all(local.parent().unwrap()).unwrap();
            std::fs::write(&local, &bytes).unwrap();
            written.insert(path, local);
        }
        let config: serde_yaml::Value =
            serde_yaml::from_str(&std::fs::read_to_string(&written["/etc/anthill/node.yaml"]).unwrap()).unwrap();
        // The configuration names the files the user data writes, and the node's key is its own.
        let named = |field: &str| written[config["tls"][field].as_str().unwrap()].clone();
        let own_key = std::fs::read(certs.join(format!("c-{i}.key"))).unwrap();
        assert_eq!(std::fs::read(named("key_file")).unwrap(), own_key, "c-{i}'s user data writes another key");
        let address = format!("127.0.0.{}", 40 + i);
        let child = Command::new(&anthill)
            .args(["node", "--config"])
            .arg(&written["/etc/anthill/node.yaml"])
            .arg("--data-dir")
            .arg(machine.join("data"))
            .args(["--listen", &format!("{address}:7400"), "--metrics-listen", "none"])
            .arg("--tls-cert-file")
            .arg(named("cert_file"))
            .arg("--tls-key-file")
            .arg(named("key_file"))
            .arg("--tls-ca-file")
            .arg(named("ca_file"))
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(machine.join("node.log")).unwrap())
            .spawn()
            .unwrap();
        nodes.0.push(child);
    }

    let status = |server_name: Option<&str>| {
        let mut command = Command::new(&anthill);
        command
            .env("ANTHILL_TLS_CA", certs.join("ca.crt"))
            .env("ANTHILL_TLS_CERT", certs.join("admin.crt"))
            .env("ANTHILL_TLS_KEY", certs.join("admin.key"))
            .args(["status", "--json", "--server", "https://127.0.0.42:7400"]);
        if let Some(name) = server_name {
            command.args(["--tls-server-name", name]);
        }
        let out = command.output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
    };
    let whole = |text: &str| {
        let Ok(status) = serde_json::from_str::<serde_json::Value>(text) else { return false };
        let members = status["cluster"]["members"].as_array().cloned().unwrap_or_default();
        let partitions = status["cluster"]["partitions"].as_array().cloned().unwrap_or_default();
        members.len() == 3
            && members.iter().all(|m| m["live"] == true)
            && partitions.len() == 4
            && partitions.iter().all(|p| p["leader"].is_string())
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let (served, said) = status(Some("anthill"));
        if served && whole(&said) {
            break;
        }
        if std::time::Instant::now() > deadline {
            let logs: Vec<String> =
                (1..=3).map(|i| std::fs::read_to_string(root.path().join(format!("c-{i}/node.log"))).unwrap_or_default()).collect();
            panic!("no whole cluster within a minute: {said}\n{}", logs.join("\n----\n"));
        }
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    // At its address alone, no node's certificate passes: it names none.
    let (served, said) = status(None);
    assert!(!served && said.starts_with("anthill: "), "a certificate made before the address named it: {said}");
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
