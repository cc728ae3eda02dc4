//! The bare-metal lab (tests/e2e/lab/metal.sh): Debian hosts on this machine, each a real
//! systemd with sshd in its own container, on a bridge of the lab's own network namespace. The
//! short form (`.ci/run`) has four hosts; `tests/e2e/lab/metal-long.sh` runs the same test with
//! twelve (`ANTHILL_METALLAB_HOSTS`: the hosts of the first apply, one more is added).
//! `terraform apply` of `terraform/examples/bare-metal-12` on all but the last of them
//! (the module converges them with the Ansible playbooks) makes a cluster that serves writes, and
//! a second plan changes nothing. Then, while the chaos suite's clients run against it
//! (`anthill workload`, acknowledgements from a quorum): a rolling upgrade (a new version, each
//! node drained first), a host powered off and booted again, another killed at once (every
//! process) and booted again, a host added with `apply`, a host removed with `apply`
//! (decommissioned first, its data deleted). The suite's checker finds nothing acknowledged
//! lost, and reports how long writes were unavailable during each step. The teardown leaves
//! nothing running or mounted. The same again with coordination `consul`: the module runs
//! Consul servers on three of the hosts (ACLs on, gossip encrypted) and a client agent on the
//! others, and a host leaving takes its agent out of the Consul cluster (not in `.ci/run`, for
//! CI's time: `metal-long.sh --coordination consul --hosts 3`). Both runs have TLS
//! (the module's default: a development CA and certificates made by the playbook) and
//! encryption at rest on.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn metal_sh() -> PathBuf {
    anthill_e2e::repository().join("tests/e2e/lab/metal.sh")
}

/// The lab, torn down when dropped (also when the test fails).
struct Lab {
    /// The cluster's TLS files (the module makes them there): the CA and the administrator's
    /// client certificate, which the test's own commands use.
    tls: PathBuf,
    /// The node binary of this run ([`pinned_binary`]).
    anthill: PathBuf,
}

/// The node binary this run tests, copied once into `dir`: a `cargo build` meanwhile (of an
/// edit, or of another test) must not change it between two applies.
fn pinned_binary(dir: &Path) -> PathBuf {
    let path = dir.join("anthill");
    std::fs::copy(anthill_e2e::anthill(), &path).unwrap();
    path
}

/// `command` as the cluster's administrator over TLS (`ANTHILL_TLS_*`).
fn as_admin(command: &mut Command, tls: &Path) {
    command
        .env("ANTHILL_TLS_CA", tls.join("ca.crt"))
        .env("ANTHILL_TLS_CERT", tls.join("admin.crt"))
        .env("ANTHILL_TLS_KEY", tls.join("admin.key"));
}

impl Lab {
    /// `hosts` hosts booted from `rootfs` (an image's rootfs.tar), or from the lab's Debian.
    fn up(hosts: usize, rootfs: Option<&Path>, tls: PathBuf, anthill: PathBuf) -> Lab {
        let mut command = Command::new("bash");
        command.arg(metal_sh()).args(["up", "--hosts", &hosts.to_string()]);
        if let Some(rootfs) = rootfs {
            command.arg("--rootfs").arg(rootfs);
        }
        let out = command.output().expect("bash runs");
        assert!(out.status.success(), "the lab did not come up:\n{}", String::from_utf8_lossy(&out.stderr));
        Lab { tls, anthill }
    }

    /// `metal.sh ARGS`: its output.
    fn run(&self, args: &[&str]) -> Result<String, String> {
        let mut command = Command::new("bash");
        as_admin(command.arg(metal_sh()).args(args), &self.tls);
        let out = command.output().unwrap();
        anthill_e2e::output(&format!("metal.sh {}", args.join(" ")), out)
    }

    /// When the certificate host `host` (ordinal) serves expires (its metric), 0 when unknown.
    fn certificate_expiry(&self, host: u32) -> i64 {
        let url = format!("http://10.77.0.{}:7401/metrics", 10 + host);
        let metrics = self.run(&["run", "curl", "-sf", &url]).unwrap_or_default();
        let line = metrics.lines().find(|l| l.starts_with("anthill_tls_certificate_expiry_seconds "));
        line.and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse::<f64>().ok()).map_or(0, |v| v as i64)
    }

    /// `anthill status --json` of a node, asked from inside the lab.
    fn status(&self, address: &str) -> Option<Value> {
        let anthill = self.anthill.display().to_string();
        let out = self.run(&["run", &anthill, "status", "--server", &format!("https://{address}:7400"), "--json"]).ok()?;
        serde_json::from_str(&out).ok()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            hold_for_inspection();
        }
        let _ = Command::new("bash").arg(metal_sh()).arg("down").status();
    }
}

/// After a failure, with `ANTHILL_METALLAB_HOLD_MINUTES=N` (at most 60), keeps the lab up for
/// N minutes, or until the file the message names exists, so that its hosts can be looked at
/// (`metal.sh ssh I …`) before the teardown.
fn hold_for_inspection() {
    let Some(minutes) = std::env::var("ANTHILL_METALLAB_HOLD_MINUTES").ok().and_then(|m| m.parse::<u64>().ok()) else { return };
    let release = std::env::temp_dir().join("anthill-metallab-release");
    let _ = std::fs::remove_file(&release);
    eprintln!("metallab: the lab stays up {} min for inspection; `touch {}` tears it down now", minutes.min(60), release.display());
    let until = Instant::now() + Duration::from_secs(minutes.min(60) * 60);
    while Instant::now() < until && !release.exists() {
        std::thread::sleep(Duration::from_secs(2));
    }
}

/// Terraform on the example, inside the lab's network, its state and working data in `dir`.
struct Terraform {
    dir: PathBuf,
    /// More `-var`s (the coordination's).
    vars: Vec<String>,
    /// The node binary the hosts get.
    anthill: PathBuf,
    /// `tls.renew_within_days`.
    renew_within_days: u32,
}

impl Terraform {
    fn command(&self, args: &[&str]) -> Command {
        let repo = anthill_e2e::repository();
        let mut command = Command::new("bash");
        command
            .arg(metal_sh())
            .args(["run", &anthill_e2e::tool("terraform").display().to_string()])
            .arg(format!("-chdir={}", repo.join("terraform/examples/bare-metal-12").display()))
            .args(args)
            .env("TF_CLI_CONFIG_FILE", repo.join("terraform/cli.tfrc"))
            .env("TF_DATA_DIR", self.dir.join(".terraform"))
            .env("TF_IN_AUTOMATION", "1");
        command
    }

    /// The key-encryption key the nodes encrypt every tenant's events under (made once).
    fn key_file(&self) -> PathBuf {
        let path = self.dir.join("kek");
        if !path.exists() {
            let key: String = (0..32).map(|_| format!("{:02x}", rand_byte())).collect();
            std::fs::write(&path, key).unwrap();
        }
        path
    }

    /// `init`, then `apply` or `plan` with the lab's settings and `hosts` (ordinals).
    fn init(&self) {
        let out = self.command(&["init", "-input=false", "-no-color"]).output().unwrap();
        anthill_e2e::output("terraform init", out).unwrap();
    }

    fn settings(&self, hosts: &[u32], version: &str) -> Vec<String> {
        let tfvars = self.dir.join(format!("hosts-{}.tfvars", hosts.iter().map(u32::to_string).collect::<Vec<_>>().join("-")));
        let list: String =
            hosts.iter().map(|i| format!("  {{ name = \"host-{i:02}\", address = \"10.77.0.{}\", raft_id = {i} }},\n", 10 + i)).collect();
        std::fs::write(&tfvars, format!("hosts = [\n{list}]\n")).unwrap();
        vec![
            "-input=false".into(),
            "-no-color".into(),
            format!("-state={}", self.dir.join("terraform.tfstate").display()),
            format!("-var-file={}", tfvars.display()),
            format!("-var=anthill_binary={}", self.anthill.display()),
            format!("-var=anthill_version={version}"),
            format!("-var=ansible_playbook={}", anthill_e2e::tool("ansible-playbook").display()),
            format!("-var=tls={{ dir = \"{}\", renew_within_days = {} }}", self.dir.join("tls").display(), self.renew_within_days),
            format!("-var=encryption_key_file={}", self.key_file().display()),
        ]
        .into_iter()
        .chain(self.vars.iter().cloned())
        .collect()
    }

    /// `terraform apply`; its output, kept in the test's folder.
    fn apply(&self, hosts: &[u32], version: &str) -> String {
        let mut args = vec!["apply".to_string(), "-auto-approve".into()];
        args.extend(self.settings(hosts, version));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let started = Instant::now();
        let out = self.command(&args).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        let log = self.dir.join(format!("apply-{}.log", started.elapsed().as_millis()));
        std::fs::write(&log, &text).unwrap();
        assert!(out.status.success(), "terraform apply failed ({}):\n{}", log.display(), tail(&text, 60));
        eprintln!("terraform apply on {hosts:?} ({version}): {:.0} s", started.elapsed().as_secs_f64());
        text
    }

    /// `terraform plan -detailed-exitcode`: 0 when nothing would change.
    fn plan(&self, hosts: &[u32], version: &str) -> (i32, String) {
        let mut args = vec!["plan".to_string(), "-detailed-exitcode".into()];
        args.extend(self.settings(hosts, version));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = self.command(&args).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        (out.status.code().unwrap_or(-1), text)
    }
}

/// A byte from the kernel's random source.
fn rand_byte() -> u8 {
    use std::io::Read;
    let mut byte = [0u8; 1];
    std::fs::File::open("/dev/urandom").unwrap().read_exact(&mut byte).unwrap();
    byte[0]
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The steps file the workload reads: `UNIX_MS begin|end NAME`, `UNIX_MS stop`.
struct Steps(PathBuf);

impl Steps {
    fn write(&self, line: &str) {
        use std::io::Write;
        let unix_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis();
        // One write: the workload may read the file at any moment.
        let mut file = std::fs::OpenOptions::new().create(true).append(true).open(&self.0).unwrap();
        file.write_all(format!("{unix_ms} {line}\n").as_bytes()).unwrap();
    }

    fn step<T>(&self, name: &str, f: impl FnOnce() -> T) -> T {
        self.write(&format!("begin {name}"));
        let out = f();
        self.write(&format!("end {name}"));
        out
    }
}

fn wait_until(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not after {within:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The status of the node at `address` once the nodes of `hosts` are live and every partition
/// led, and no node has crashed. The playbook's health check waits for each node to serve and
/// see itself live, not for the partitions' leaders: right after an apply some partition may
/// still be without one (a partition moving to a host just added, a leader elected again after
/// a lease lost under load), so this waits up to a minute. Whether a node crashed, systemd says:
/// `NRestarts` counts the restarts its `Restart=on-failure` made. Either failure prints the
/// hosts' node journals.
fn whole_after_apply(lab: &Lab, address: &str, hosts: &[u32]) -> Option<Value> {
    let journals = || journals(lab, hosts);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut status = lab.status(address);
    while !whole(&status, hosts) {
        assert!(Instant::now() < deadline, "not whole a minute after the apply: {status:?}\n{}", journals());
        std::thread::sleep(Duration::from_millis(500));
        status = lab.status(address);
    }
    for i in hosts {
        let restarts = lab.run(&["ssh", &i.to_string(), "systemctl show anthill -p NRestarts --value"]).unwrap();
        assert_eq!(restarts.trim(), "0", "systemd restarted host-{i:02}'s node: it crashed\n{}", journals());
    }
    status
}

/// The last lines of the node's journal on each of `hosts`, with systemd's restart count.
fn journals(lab: &Lab, hosts: &[u32]) -> String {
    let journal = |i: &u32| {
        // What listens (a node running without its gRPC listener was seen once), then its log.
        let command = "systemctl show anthill -p NRestarts -p ActiveState -p MainPID; (ss -ltnp 2>/dev/null || cat /proc/net/tcp) | head -12; \
                       pid=$(systemctl show anthill -p MainPID --value); echo \"fds: $(ls /proc/$pid/fd 2>/dev/null | wc -l), threads: $(ls /proc/$pid/task 2>/dev/null | wc -l)\"; \
                       journalctl -u anthill --no-pager -n 40 -o short-precise";
        lab.run(&["ssh", &i.to_string(), command]).unwrap_or_else(|e| e)
    };
    hosts.iter().map(|i| format!("host-{i:02}:\n{}", journal(i))).collect::<Vec<_>>().join("\n")
}

/// Whether `status` shows the nodes of `hosts` (ordinals) live and every partition led.
fn whole(status: &Option<Value>, hosts: &[u32]) -> bool {
    let Some(cluster) = status.as_ref().map(|s| &s["cluster"]) else { return false };
    let live = |name: &str| cluster["members"].as_array().into_iter().flatten().any(|m| m["name"] == name && m["live"] == true);
    let partitions = cluster["partitions"].as_array().cloned().unwrap_or_default();
    names(hosts).iter().all(|m| live(m)) && partitions.len() == 16 && partitions.iter().all(|p| p["leader"].is_string())
}

/// The hosts of the first apply (ordinals from 1); one more is added later.
fn first_hosts() -> u32 {
    let hosts = std::env::var("ANTHILL_METALLAB_HOSTS").map_or(3, |v| v.parse().expect("ANTHILL_METALLAB_HOSTS is a number"));
    assert!((3..=11).contains(&hosts), "ANTHILL_METALLAB_HOSTS: 3 to 11");
    hosts
}

fn names(hosts: &[u32]) -> Vec<String> {
    hosts.iter().map(|i| format!("host-{i:02}")).collect()
}

/// The workload's process group, killed if the test ends before it does.
struct Workload(Option<Child>);

impl Workload {
    fn wait(mut self) -> std::process::Output {
        self.0.take().unwrap().wait_with_output().unwrap()
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        if let Some(child) = &self.0 {
            let _ = Command::new("kill").args(["-KILL", "--", &format!("-{}", child.id())]).status();
        }
    }
}

/// The chaos suite's clients against the cluster until the steps file says stop (at most
/// `limit`), acknowledgements from a quorum.
fn workload(steps: &Path, limit: Duration, lab: &Lab) -> Workload {
    use std::os::unix::process::CommandExt;
    let anthill = lab.anthill.display().to_string();
    let servers = "https://10.77.0.11:7400,https://10.77.0.13:7400";
    let mut command = Command::new("bash");
    as_admin(&mut command, &lab.tls);
    let child = command
        .arg(metal_sh())
        .args(["run", &anthill, "workload", "--server", servers, "--clients", "4", "--json", "--steps"])
        .arg(steps)
        .args(["--duration", &format!("{}s", limit.as_secs())])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("the workload starts");
    Workload(Some(child))
}

/// Where the cluster decides partition ownership in a run of the scenario.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Coordination {
    Embedded,
    /// Consul servers on three of the hosts (the module runs them, ACLs on), a client agent on
    /// every other; each node reaches Consul through its own host's agent.
    Consul,
}

/// Lab runs one at a time (one network namespace).
static LAB: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn terraform_apply_on_bare_metal_hosts_makes_a_cluster_that_loses_no_acknowledged_write_through_an_upgrade_a_power_cut_and_a_host_added_and_removed()
 {
    scenario(Coordination::Embedded);
}

/// Not in `.ci/run` (about ten minutes more than CI's budget allows): a command,
/// `tests/e2e/lab/metal-long.sh --coordination consul [--hosts 3]` (docs/bare-metal.md).
#[test]
#[ignore = "CI's time: run it with tests/e2e/lab/metal-long.sh --coordination consul --hosts 3"]
fn the_same_with_consul_servers_on_three_of_the_hosts_run_by_the_module() {
    scenario(Coordination::Consul);
}

/// The Consul the module runs: its files (tokens, gossip key) in `dir`, the hosts of its servers.
fn consul_vars(dir: &Path, servers: &[u32]) -> Vec<String> {
    let uuid = || std::fs::read_to_string("/proc/sys/kernel/random/uuid").unwrap().trim().to_string();
    let file = |name: &str, content: &str| {
        let path = dir.join(name);
        std::fs::write(&path, content).unwrap();
        path.display().to_string()
    };
    let consul = anthill_e2e::tool("consul");
    let key = Command::new(&consul).arg("keygen").output().unwrap();
    let key = anthill_e2e::output("consul keygen", key).unwrap();
    let management = file("consul-management-token", &uuid());
    let nodes = file("consul-anthill-token", &uuid());
    let gossip = file("consul-gossip-key", key.trim());
    let servers: Vec<String> = names(servers).iter().map(|n| format!("\"{n}\"")).collect();
    vec![
        r#"-var=coordination={kind="consul"}"#.to_string(),
        format!("-var=consul_token_file={nodes}"),
        format!(
            "-var=consul={{servers=[{}],binary=\"{}\",management_token_file=\"{management}\",encrypt_key_file=\"{gossip}\"}}",
            servers.join(","),
            consul.display()
        ),
    ]
}

/// The image of the recipe's lab source (tests/e2e/lab/image.sh), into `out`: its rootfs.tar,
/// checked against its manifest.
fn build_image(out: &Path, anthill: &Path) -> PathBuf {
    let script = anthill_e2e::repository().join("tests/e2e/lab/image.sh");
    let built = Command::new("bash").arg(script).arg(out).arg("--binary").arg(anthill).output().unwrap();
    anthill_e2e::output("tests/e2e/lab/image.sh", built).unwrap();
    let rootfs = out.join("rootfs.tar");
    let manifest: Value = serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    let sum = Command::new("sha256sum").arg(&rootfs).output().unwrap();
    let sum = String::from_utf8_lossy(&sum.stdout);
    assert_eq!(manifest["sha256"].as_str(), sum.split_whitespace().next(), "the manifest names the image's SHA-256");
    assert_eq!(manifest["anthill_version"], "0.1.0", "{manifest}");
    rootfs
}

/// Hosts booted from the image: the node installed and enabled but not started (no
/// configuration yet), and each host with an identity of its own (machine-id, SSH host key).
fn check_booted_from_the_image(lab: &Lab, hosts: u32) {
    let mut identities = std::collections::BTreeSet::new();
    for host in 1..=hosts {
        let on = |command: &str| lab.run(&["ssh", &host.to_string(), command]).unwrap().trim().to_string();
        assert_eq!(on("systemctl is-enabled anthill"), "enabled", "host {host}");
        assert_eq!(on("systemctl is-active anthill || true"), "inactive", "host {host}: no configuration, no node");
        assert_eq!(on("readlink -f /usr/local/bin/anthill"), "/opt/anthill/0.1.0/anthill", "host {host}");
        let identity = on("cat /etc/machine-id; ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub");
        assert!(identity.lines().count() == 2 && identity.len() > 40, "host {host}: {identity}");
        assert!(identities.insert(identity.clone()), "host {host} has another host's identity: {identity}");
    }
}

fn scenario(coordination: Coordination) {
    let _one_at_a_time = LAB.lock().unwrap_or_else(|e| e.into_inner());
    let mut tools = vec!["metallab", "ansible", "terraform"];
    if coordination == Coordination::Consul {
        tools.push("consul");
    }
    let install = Command::new("bash")
        .arg(anthill_e2e::repository().join("tests/e2e/tools/install.sh"))
        .args(&tools)
        .status()
        .expect("the installer runs");
    assert!(install.success(), "the lab's tools did not install");
    let netns_before = String::from_utf8_lossy(&Command::new("ip").args(["netns", "list"]).output().unwrap().stdout).into_owned();
    let n = first_hosts();
    let first: Vec<u32> = (1..=n).collect();
    let all: Vec<u32> = (1..=n + 1).collect();
    // Consul's servers on three of the first hosts: host-02 among them only when there are no
    // others (then the host removed is the one added, which runs a client agent).
    let servers: Vec<u32> = if n >= 4 { vec![1, 3, 4] } else { vec![1, 2, 3] };
    let gone = if coordination == Coordination::Consul && servers.contains(&2) { n + 1 } else { 2 };
    let kept: Vec<u32> = all.iter().copied().filter(|i| *i != gone).collect();
    let added = format!("host-{:02}", n + 1);
    let removed = format!("host-{gone:02}");
    let dir = tempfile::tempdir().unwrap();
    // The embedded run's hosts boot from the image its recipe builds (packer/, docs/images.md).
    let anthill = pinned_binary(dir.path());
    let image = (coordination == Coordination::Embedded).then(|| build_image(&dir.path().join("image"), &anthill));
    let lab = Lab::up(n as usize + 1, image.as_deref(), dir.path().join("tls"), anthill.clone());
    if image.is_some() {
        check_booted_from_the_image(&lab, n + 1);
    }
    let vars = match coordination {
        Coordination::Embedded => Vec::new(),
        Coordination::Consul => consul_vars(dir.path(), &servers),
    };
    let mut terraform = Terraform { dir: dir.path().to_path_buf(), vars, anthill, renew_within_days: 30 };
    terraform.init();

    // Three hosts: the founders. The cluster serves writes once apply returns (the playbook
    // waited until every node was live and every partition led).
    terraform.apply(&first, "0.1.0");
    whole_after_apply(&lab, "10.77.0.12", &first);
    let (code, plan) = terraform.plan(&first, "0.1.0");
    assert_eq!(code, 0, "a second plan would change something:\n{plan}");
    // TLS is on: a plain-text client (no TLS settings at all) cannot even connect.
    let anthill = lab.anthill.display().to_string();
    let plain =
        Command::new("bash").arg(metal_sh()).args(["run", &anthill, "status", "--server", "http://10.77.0.12:7400"]).output().unwrap();
    let said = String::from_utf8_lossy(&plain.stderr);
    // (The CLI ran and its call failed: its own error line, not a usage error or a lab failure;
    // the same call over https was answered just above.)
    assert!(!plain.status.success() && said.starts_with("anthill: ") && !said.contains("Usage"), "a plain-text client: {said}");
    // The unit is hardened and runs as its own user.
    let unit = lab.run(&["ssh", "1", "systemctl show anthill -p User -p NoNewPrivileges -p ProtectSystem -p LimitNOFILE"]).unwrap();
    for setting in ["User=anthill", "NoNewPrivileges=yes", "ProtectSystem=strict", "LimitNOFILE=65536"] {
        assert!(unit.contains(setting), "{setting}: {unit}");
    }
    let consul = |host: u32, command: &str| {
        let token = std::fs::read_to_string(dir.path().join("consul-management-token")).unwrap();
        lab.run(&["ssh", &host.to_string(), &format!("CONSUL_HTTP_TOKEN={} consul {command}", token.trim())]).unwrap()
    };
    if coordination == Coordination::Consul {
        // Every host's agent is a member (three servers), and the nodes hold their keys in Consul.
        let members = consul(1, "members");
        assert_eq!(members.lines().filter(|l| l.contains(" alive ")).count(), n as usize, "{members}");
        assert_eq!(members.lines().filter(|l| l.contains(" server ")).count(), 3, "{members}");
        let keys = consul(1, "kv get -keys -recurse anthill/members/");
        assert!(names(&first).iter().all(|h| keys.contains(&format!("anthill/members/{h}"))), "{keys}");
    }

    let steps = Steps(dir.path().join("steps"));
    // Each step restarts every node at most once, about 25 s each; the stop line ends it sooner.
    // A bound past the steps' time (a run where the workload's limit, then 600 + 150 s a host,
    // came before the last step's end could not measure it), within metal-long.sh's 90 minutes
    // for the whole run.
    let load = workload(&steps.0, Duration::from_secs(900 + 300 * u64::from(n)), &lab);
    std::thread::sleep(Duration::from_secs(5));

    // A rolling upgrade: each node drained, restarted on the new version, healthy again. The
    // short form with Consul leaves it out (CI's time; its drained restarts are those of the
    // embedded run, and those of the host added below): the version stays 0.1.0.
    let upgrade = coordination == Coordination::Embedded || n > 3;
    let version = if upgrade { "0.1.1" } else { "0.1.0" };
    if upgrade {
        steps.step("rolling upgrade to 0.1.1", || terraform.apply(&first, version));
        let installed = lab.run(&["ssh", "2", "readlink -f /usr/local/bin/anthill"]).unwrap();
        assert!(installed.contains("/opt/anthill/0.1.1/anthill"), "{installed}");
    }

    // host-02 powered off (its systemd stops everything, the node drains on SIGTERM), then
    // booted again: its node starts at boot and catches up.
    steps.step("host-02 powered off and booted", || {
        lab.run(&["poweroff", "2"]).unwrap();
        std::thread::sleep(Duration::from_secs(5));
        lab.run(&["start", "2"]).unwrap();
        wait_until("host-02's node is back", Duration::from_secs(120), || whole(&lab.status("10.77.0.11"), &first));
    });

    // host-03 killed at once, every process of it (no drain, no clean stop), then booted again.
    steps.step("host-03 killed and booted", || {
        lab.run(&["kill", "3"]).unwrap();
        std::thread::sleep(Duration::from_secs(3));
        lab.run(&["start", "3"]).unwrap();
        wait_until("host-03's node is back", Duration::from_secs(120), || whole(&lab.status("10.77.0.11"), &first));
    });

    // With Consul: a new Consul version (the same program in a new folder) restarts every
    // agent, one host at a time, each back and healthy before the next; the nodes keep their
    // sessions (an agent stopped does not leave, so Consul does not end its host's sessions).
    if coordination == Coordination::Consul {
        for var in terraform.vars.iter_mut() {
            if let Some(rest) = var.strip_prefix("-var=consul={") {
                *var = format!("-var=consul={{version=\"1.20.2-lab\",{rest}");
            }
        }
        steps.step("Consul restarted on a new version", || terraform.apply(&first, version));
        for host in &first {
            let consul = lab.run(&["ssh", &host.to_string(), "readlink -f /usr/local/bin/consul"]).unwrap();
            assert_eq!(consul.trim(), "/opt/consul/1.20.2-lab/consul", "host {host}");
        }
        let members = consul(1, "members");
        assert_eq!(members.lines().filter(|l| l.contains(" alive ")).count(), n as usize, "{members}");
        whole_after_apply(&lab, "10.77.0.11", &first);
    }

    // A host added: the others restart in turn with the longer member list, then it joins.
    steps.step(&format!("{added} added"), || terraform.apply(&all, version));
    let status = whole_after_apply(&lab, &format!("10.77.0.{}", 11 + n), &all);
    if coordination == Coordination::Embedded {
        let voters = status.as_ref().unwrap()["cluster"]["coordination_voters"].clone();
        assert_eq!(voters, serde_json::json!(all), "{added} is a voter of the coordination group");
    }

    // A host removed: decommissioned first (its replicas move to the others), then stopped.
    let applied = steps.step(&format!("{removed} removed"), || terraform.apply(&kept, version));
    assert!(applied.contains(&format!("terraform_data.node[\"{removed}\"]: Destruction complete")), "{}", tail(&applied, 40));
    let status = lab.status("10.77.0.11");
    let named = status.as_ref().unwrap()["cluster"]["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["replicas"].as_array().unwrap().iter().any(|r| *r == removed))
        .count();
    assert_eq!(named, 0, "no replica set names {removed}");
    let on_removed = |command: &str| lab.run(&["ssh", &gone.to_string(), command]).unwrap().trim().to_string();
    assert_eq!(on_removed("systemctl is-active anthill || true"), "inactive");
    assert_eq!(on_removed("test -e /var/lib/anthill && echo kept || echo deleted"), "deleted");
    if coordination == Coordination::Consul {
        // Its Consul agent left the Consul cluster and no longer runs.
        assert_eq!(on_removed("systemctl is-active consul || true"), "inactive");
        let members = consul(1, "members");
        assert!(members.lines().any(|l| l.starts_with(&removed) && l.contains(" left ")), "{members}");
    }
    let (code, plan) = terraform.plan(&kept, version);
    assert_eq!(code, 0, "a plan after the removal would change something:\n{plan}");

    // Certificates renewed under load: a converge renewing all of them (each ends within 400
    // days) places them, and every node serves its new one without a restart.
    let before: Vec<i64> = kept.iter().map(|h| lab.certificate_expiry(*h)).collect();
    assert!(before.iter().all(|e| *e > 0), "every node reports its certificate's expiry: {before:?}");
    terraform.renew_within_days = 400;
    let renewing = Instant::now();
    let applied = steps.step("certificates renewed", || terraform.apply(&kept, version));
    let renewal = applied
        .split("Renew the certificates that end soon")
        .nth(1)
        .and_then(|rest| rest.lines().find(|l| ["ok:", "changed:", "skipping:"].iter().any(|s| l.contains(s))).map(str::to_string));
    assert!(renewal.as_deref().is_some_and(|l| l.contains("changed:")), "{renewal:?}\n{}", tail(&applied, 40));
    wait_until("every node serves its renewed certificate", Duration::from_secs(30), || {
        kept.iter().zip(&before).all(|(h, b)| lab.certificate_expiry(*h) > *b)
    });
    for host in &kept {
        let status = lab.status(&format!("10.77.0.{}", 10 + host)).unwrap();
        let uptime = status["uptime_ms"].as_u64().unwrap();
        assert!(uptime > renewing.elapsed().as_millis() as u64, "host-{host:02} restarted during the renewal: {status}");
    }

    // The clients go on for a while after the last step, so that every partition's first
    // acknowledgement after it is seen (a step's unavailability ends there; stopped at once,
    // the last step has none).
    std::thread::sleep(Duration::from_secs(10));
    // The clients stop; every replica is read back against what they were told.
    steps.write("stop");
    let out = load.wait();
    assert!(
        out.status.success(),
        "the workload failed:\n{}\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        tail(&String::from_utf8_lossy(&out.stderr), 40),
        journals(&lab, &kept)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["passed"], true, "{report}");
    assert_eq!(report["verdict"]["lost"], serde_json::json!([]), "{report}");
    assert!(report["acknowledged"].as_u64().unwrap() > 1000, "{report}");
    let steps = report["steps"].as_array().unwrap();
    let ran_ms = (report["seconds"].as_f64().unwrap() * 1000.0) as u64;
    let last_end = steps.iter().filter_map(|s| s["ended_ms"].as_u64()).max().unwrap_or(0);
    assert!(ran_ms > last_end + 5_000, "the workload's time limit ended it before the steps did (ran {ran_ms} ms): {report}");
    let expected = 5 + usize::from(upgrade) + usize::from(coordination == Coordination::Consul);
    assert_eq!(steps.len(), expected, "{report}");
    for step in steps {
        assert!(step["unavailability_ms"].is_u64(), "writes came back after {}: {report}", step["name"]);
        eprintln!("{}: writes unavailable at most {} ms", step["name"], step["unavailability_ms"]);
    }
    eprintln!(
        "{} operations, {} acknowledged by a quorum, none lost; {} books on {} replicas checked",
        report["operations"], report["acknowledged"], report["ledger"]["books"], report["ledger"]["replicas_checked"]
    );

    drop(lab);
    let netns_after = String::from_utf8_lossy(&Command::new("ip").args(["netns", "list"]).output().unwrap().stdout).into_owned();
    assert_eq!(netns_after, netns_before, "the lab's namespace is gone");
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    assert!(!mounts.contains("anthill-metallab"), "a host's overlay is still mounted");
    let nspawn = Command::new("pgrep").args(["-f", "systemd-nspawn.*anthill-br0"]).output().unwrap();
    assert!(nspawn.stdout.is_empty(), "a host still runs");
    // Ansible's SSH masters went with the lab: one left would hang the next lab's first play.
    let masters = Command::new("pgrep").args(["-f", "ssh: /tmp/anthill-metallab/"]).output().unwrap();
    assert!(masters.stdout.is_empty(), "an SSH master of the lab still runs");
}
