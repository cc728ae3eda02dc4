//! A node run as a child process on loopback: how the benchmark, the demo, the chaos suite and
//! the integration tests start a real `anthill node`, find its ephemeral ports, and stop or kill
//! it; and a [`LocalCluster`] of them, with the questions those harnesses ask of it (is it whole,
//! who serves a partition).
//!
//! The child prints one line to stdout when it is serving:
//! `anthill node ready grpc=<addr> metrics=<addr|none>`; everything else goes to its log file.

pub mod consul;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anthill_proto::v1 as pb;

use anyhow::{Context, bail};

use crate::router::Router;
use crate::security::certs::{self as certificates, Kind};
use crate::{client, log};

/// How long the cluster helpers wait for a node's status (a frozen node never answers).
const STATUS_TIMEOUT: Duration = Duration::from_secs(2);

/// The line a node prints on stdout once it serves, followed by its addresses.
pub const READY_PREFIX: &str = "anthill node ready";

pub struct ChildNode {
    child: Child,
    pub grpc_addr: SocketAddr,
    pub metrics_addr: Option<SocketAddr>,
    pub data_dir: PathBuf,
    pub log_file: PathBuf,
}

impl ChildNode {
    /// Starts `exe node` on `data_dir` with ports picked by the kernel, plus `extra_args`.
    /// Its logs go to `<data_dir>.log`. Waits until it serves (at most 60 s).
    pub fn spawn(exe: &Path, data_dir: &Path, extra_args: &[String]) -> anyhow::Result<ChildNode> {
        Self::spawn_at(exe, data_dir, "127.0.0.1:0".parse().expect("an address"), extra_args)
    }

    /// Like [`ChildNode::spawn`], with gRPC on `listen` (a cluster's members must know each
    /// other's addresses before they start).
    pub fn spawn_at(exe: &Path, data_dir: &Path, listen: SocketAddr, extra_args: &[String]) -> anyhow::Result<ChildNode> {
        let log_file = data_dir.with_extension("log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_file)
            .with_context(|| format!("cannot open node log {}", log_file.display()))?;
        let mut command = Command::new(exe);
        // SAFETY: between fork and exec only the async-signal-safe prctl(2) runs.
        unsafe {
            command.pre_exec(die_with_parent);
        }
        let mut child = command
            .arg("node")
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--listen")
            .arg(listen.to_string())
            .args(["--metrics-listen", "127.0.0.1:0"])
            .args(extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", exe.display()))?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            for line in lines.by_ref() {
                let Ok(line) = line else { break };
                if line.starts_with(READY_PREFIX) {
                    let _ = tx.send(line);
                    break;
                }
            }
            // Keep draining so the child never blocks on a full pipe.
            for _ in lines {}
        });
        let line = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                let log = std::fs::read_to_string(&log_file).unwrap_or_default();
                bail!("node did not become ready; its log ({}):\n{}", log_file.display(), tail(&log, 40));
            }
        };
        let (grpc_addr, metrics_addr) = parse_ready_line(&line)?;
        Ok(ChildNode { child, grpc_addr, metrics_addr, data_dir: data_dir.to_path_buf(), log_file })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.grpc_addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: the process dies at once, mid-write if it was writing.
    pub fn kill9(mut self) -> anyhow::Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// SIGSTOP (`true`) or SIGCONT (`false`): the process is frozen, as by a long GC pause or
    /// a stalled VM, and thaws believing what it believed.
    pub fn freeze(&self, frozen: bool) {
        let signal = if frozen { libc::SIGSTOP } else { libc::SIGCONT };
        // SAFETY: signalling our own child process by its pid.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    /// How the process ended, if it did (without being waited for by [`ChildNode::kill9`] or
    /// [`ChildNode::terminate`]): a crash, to a harness that did not stop it.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGTERM and wait for a clean exit (at most `timeout`, then SIGKILL and an error).
    pub fn terminate(mut self, timeout: Duration) -> anyhow::Result<()> {
        // SAFETY: signalling our own child process by its pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                if !status.success() {
                    bail!("node exited with {status} after SIGTERM");
                }
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                self.child.kill()?;
                self.child.wait()?;
                bail!("node did not stop within {timeout:?} of SIGTERM; killed");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ChildNode {
    fn drop(&mut self) {
        // Never leave a node running behind a failed test or an interrupted benchmark.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// What a [`LocalCluster`] is made of.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    pub nodes: usize,
    pub partitions: u32,
    pub replication_factor: u32,
    pub session_ttl_ms: u64,
    /// Flags every node gets (e.g. `--log-level warn`).
    pub node_args: Vec<String>,
    /// Ownership through a Consul cluster; `None`: the embedded store.
    pub consul: Option<ConsulNodes>,
    /// TLS on every node, mutual between them, from a CA made under the cluster's directory;
    /// this process then talks to them as the client `admin` ([`LocalCluster::configure`]).
    pub tls: bool,
    /// Tenants' events encrypted at rest, under a key-encryption key made at `dir/kek`.
    pub encrypt: bool,
}

impl ClusterSpec {
    /// `nodes` nodes deciding ownership in the embedded store, with no extra flags.
    pub fn embedded(nodes: usize, partitions: u32, replication_factor: u32, session_ttl_ms: u64) -> ClusterSpec {
        ClusterSpec {
            nodes,
            partitions,
            replication_factor,
            session_ttl_ms,
            node_args: Vec::new(),
            consul: None,
            tls: false,
            encrypt: false,
        }
    }
}

/// How the nodes of a [`LocalCluster`] reach Consul: node `i` talks to `addresses[i % len]`, as
/// it would to the Consul agent on its own host, with the ACL token in `token_file`.
#[derive(Debug, Clone)]
pub struct ConsulNodes {
    pub addresses: Vec<String>,
    pub token_file: PathBuf,
    pub key_prefix: String,
}

/// A cluster of real `anthill node` processes on loopback, node `i` (named `node-{i+1}`) on
/// 127.0.0.{11+i} with a port the kernel picked: what the integration tests, the benchmark and
/// the demo run. Every node's process is killed when this is dropped.
pub struct LocalCluster {
    exe: PathBuf,
    dir: PathBuf,
    pub addrs: Vec<SocketAddr>,
    pub nodes: Vec<Option<ChildNode>>,
    /// `https` with TLS, else `http`.
    scheme: &'static str,
}

impl LocalCluster {
    /// Writes each node's configuration under `dir` and starts them all (each waits until it
    /// serves; the cluster forms on its own after that).
    pub fn start(exe: &Path, dir: &Path, spec: &ClusterSpec) -> anyhow::Result<LocalCluster> {
        let mut cluster = Self::configure(exe, dir, spec)?;
        for i in 0..spec.nodes {
            cluster.start_node(i, &spec.node_args)?;
        }
        Ok(cluster)
    }

    /// Writes each node's configuration under `dir` (every node a member) and starts none:
    /// [`LocalCluster::start_node`] starts each. With `spec.tls`, also a CA, a certificate per
    /// node and one for the client `admin` under `dir/certs` (kept when they exist, so a
    /// restarted harness reuses them), and this process's clients use TLS as `admin`.
    pub fn configure(exe: &Path, dir: &Path, spec: &ClusterSpec) -> anyhow::Result<LocalCluster> {
        if spec.nodes == 0 || spec.nodes > 200 {
            bail!("a local cluster has 1 to 200 nodes, not {}", spec.nodes);
        }
        let addrs = (0..spec.nodes)
            .map(|i| {
                let ip = format!("127.0.0.{}", 11 + i);
                let listener = std::net::TcpListener::bind((ip.as_str(), 0)).with_context(|| format!("cannot bind {ip}"))?;
                Ok(listener.local_addr()?)
            })
            .collect::<anyhow::Result<Vec<SocketAddr>>>()?;
        let members: String = addrs
            .iter()
            .enumerate()
            .map(|(i, a)| format!("    - {{id: {}, name: {}, address: \"{a}\"}}\n", i + 1, Self::name(i)))
            .collect();
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        for (i, address) in addrs.iter().enumerate() {
            let mut config = format!(
                "node_id: {}\nstorage:\n  partitions: {}\ncluster:\n  replication_factor: {}\n  session_ttl_ms: {}\n  members:\n{members}",
                Self::name(i),
                spec.partitions,
                spec.replication_factor,
                spec.session_ttl_ms,
            );
            if let Some(consul) = &spec.consul {
                config.push_str(&format!(
                    "  coordination:\n    kind: consul\n    address: \"{}\"\n    token_file: \"{}\"\n    key_prefix: \"{}\"\n",
                    consul.addresses[i % consul.addresses.len()],
                    consul.token_file.display(),
                    consul.key_prefix
                ));
            }
            if spec.tls {
                config.push_str(&tls_section(&dir.join("certs"), &Self::name(i), *address)?);
            }
            if spec.encrypt {
                let kek = dir.join("kek");
                if !kek.exists() {
                    let key: String = (0..32).map(|_| format!("{:02x}", rand::random::<u8>())).collect();
                    std::fs::write(&kek, key)?;
                }
                config.push_str(&format!("encryption:\n  key_file: \"{}\"\n", kek.display()));
            }
            std::fs::write(dir.join(format!("{}.yaml", Self::name(i))), config)?;
        }
        // The process talks to this cluster now (module doc of `client`).
        if spec.tls {
            use_tls_as_admin(&dir.join("certs"))?;
        } else {
            client::use_tls(None);
        }
        let scheme = if spec.tls { "https" } else { "http" };
        Ok(LocalCluster { exe: exe.to_path_buf(), dir: dir.to_path_buf(), addrs, nodes: (0..spec.nodes).map(|_| None).collect(), scheme })
    }

    /// The name of node `i`.
    pub fn name(i: usize) -> String {
        format!("node-{}", i + 1)
    }

    /// The index of the node named `name`.
    pub fn index_of(name: &str) -> Option<usize> {
        name.strip_prefix("node-")?.parse::<usize>().ok()?.checked_sub(1)
    }

    /// (Re)starts node `i` on its data directory and address.
    pub fn start_node(&mut self, i: usize, node_args: &[String]) -> anyhow::Result<()> {
        let name = Self::name(i);
        let mut args = vec!["--config".to_string(), self.dir.join(format!("{name}.yaml")).display().to_string()];
        args.extend(node_args.iter().cloned());
        self.nodes[i] = Some(ChildNode::spawn_at(&self.exe, &self.dir.join(&name), self.addrs[i], &args)?);
        Ok(())
    }

    /// SIGKILL node `i` (nothing if it is not running).
    pub fn kill9(&mut self, i: usize) -> anyhow::Result<()> {
        match self.nodes[i].take() {
            Some(node) => node.kill9(),
            None => Ok(()),
        }
    }

    /// Fails, naming the node, its exit and the end of its log, when a node the harness started
    /// and did not stop has exited on its own.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        for (i, node) in self.nodes.iter_mut().enumerate() {
            if let Some(node) = node
                && let Some(status) = node.exited()
            {
                let log = std::fs::read_to_string(&node.log_file).unwrap_or_default();
                bail!("{} exited on its own ({status}); its log ({}):\n{}", Self::name(i), node.log_file.display(), tail(&log, 40));
            }
        }
        Ok(())
    }

    /// SIGTERM node `i` and wait for its clean exit (see [`ChildNode::terminate`]; nothing if
    /// it is not running).
    pub fn terminate(&mut self, i: usize, timeout: Duration) -> anyhow::Result<()> {
        match self.nodes[i].take() {
            Some(node) => node.terminate(timeout),
            None => Ok(()),
        }
    }

    pub fn url(&self, i: usize) -> String {
        format!("{}://{}", self.scheme, self.addrs[i])
    }

    pub fn urls(&self) -> Vec<String> {
        (0..self.addrs.len()).map(|i| self.url(i)).collect()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Waits until every member is live and every partition has a leader that takes appends.
    pub async fn wait_whole(&self, spec: &ClusterSpec, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut whole = false;
            for i in (0..self.nodes.len()).filter(|i| self.nodes[*i].is_some()) {
                let Ok(mut c) = client::connect(&self.url(i)).await else { continue };
                let Ok(Ok(status)) = tokio::time::timeout(STATUS_TIMEOUT, c.node.status(pb::StatusRequest {})).await else { continue };
                if let Some(view) = status.into_inner().cluster {
                    whole = view.members.iter().all(|m| m.live)
                        && view.partitions.len() == spec.partitions as usize
                        && view.partitions.iter().all(|p| !p.leader.is_empty());
                }
                break;
            }
            let mut why = "not every member is live and every partition led".to_string();
            if whole {
                // Each leader serves once it recovered: one quorum append per partition says so. A
                // leadership that moves meanwhile (a starved node's session expiring) fails one:
                // then the cluster is not whole yet, and the check starts over.
                let router = Router::connect(&self.urls()).await?;
                let mut failed = None;
                for stream in streams_per_partition("bench-probe", spec.partitions) {
                    if let Err(e) = router.append(probe_append(&stream, "ready")).await {
                        failed = Some(format!("the partition of {stream} does not take appends: {}", e.message()));
                        break;
                    }
                }
                match failed {
                    None => return Ok(()),
                    Some(e) => why = e,
                }
            }
            if Instant::now() > deadline {
                bail!("the cluster did not become whole within {timeout:?}: {why} (logs in {})", self.dir().display());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The live node that leads `partition` in the highest epoch, as the nodes' statuses say (a
    /// node that does not answer within [`STATUS_TIMEOUT`], e.g. a frozen one, is passed over).
    pub async fn serving_node(&self, partition: u32) -> Option<usize> {
        let mut best: Option<(u64, usize)> = None;
        for i in (0..self.nodes.len()).filter(|i| self.nodes[*i].is_some()) {
            let Ok(mut c) = client::connect(&self.url(i)).await else { continue };
            let Ok(Ok(status)) = tokio::time::timeout(STATUS_TIMEOUT, c.node.status(pb::StatusRequest {})).await else { continue };
            let epoch = status.into_inner().partitions.get(partition as usize).map_or(0, |p| p.epoch);
            if epoch > 0 && best.is_none_or(|(e, _)| epoch > e) {
                best = Some((epoch, i));
            }
        }
        best.map(|(_, i)| i)
    }
}

/// The `tls` section of node `name`'s configuration, its certificate (for its name and its
/// address) made under `certs` unless it is there.
fn tls_section(certs: &Path, name: &str, address: SocketAddr) -> anyhow::Result<String> {
    let tls = node_tls(certs, name, address)?;
    Ok(format!(
        "tls:\n  cert_file: \"{}\"\n  key_file: \"{}\"\n  ca_file: \"{}\"\n  reload_interval_ms: 200\n",
        tls.cert_file.display(),
        tls.key_file.display(),
        tls.ca_file.display()
    ))
}

/// The TLS files of node `name` reached at `address`, made under `certs` (with the CA) unless
/// they are there.
pub fn node_tls(certs: &Path, name: &str, address: SocketAddr) -> anyhow::Result<crate::config::TlsConfig> {
    ensure_certificate(certs, &Kind::Ca, "ca")?;
    ensure_certificate(certs, &Kind::Node { hosts: vec![address.ip().to_string()] }, name)?;
    Ok(crate::config::TlsConfig {
        cert_file: certs.join(format!("{name}.crt")),
        key_file: certs.join(format!("{name}.key")),
        ca_file: certs.join("ca.crt"),
        reload_interval_ms: crate::config::TlsConfig::DEFAULT_RELOAD_INTERVAL_MS,
    })
}

/// Makes this process's clients use TLS as `admin`, a client of the CA under `certs` (made
/// unless it is there).
pub fn use_tls_as_admin(certs: &Path) -> anyhow::Result<()> {
    ensure_certificate(certs, &Kind::Ca, "ca")?;
    ensure_certificate(certs, &Kind::Client, "admin")?;
    let identity = (certs.join("admin.crt"), certs.join("admin.key"));
    client::use_tls(Some(client::ClientTls::from_files(&certs.join("ca.crt"), Some((&identity.0, &identity.1)))?));
    Ok(())
}

/// Makes `certs/<stem>.crt` and `.key` (the CA when `kind` is one, else signed by `certs/ca.*`)
/// unless they exist.
pub fn ensure_certificate(certs: &Path, kind: &Kind, name: &str) -> anyhow::Result<()> {
    let stem = if matches!(kind, Kind::Ca) { "ca" } else { name };
    if certs.join(format!("{stem}.crt")).exists() {
        return Ok(());
    }
    let ca = match kind {
        Kind::Ca => None,
        _ => Some(certificates::read_ca(certs)?),
    };
    let issued = certificates::issue(kind, if ca.is_none() { "Anthill local cluster CA" } else { name }, 30, ca.as_ref())?;
    certificates::write(certs, stem, &issued)?;
    Ok(())
}

/// One stream name per partition, `{prefix}-{n}`.
pub fn streams_per_partition(prefix: &str, partitions: u32) -> Vec<String> {
    (0..partitions)
        .map(|p| (0..).map(|n| format!("{prefix}-{n}")).find(|s| log::partition_of(s, partitions) == p).expect("some name hashes there"))
        .collect()
}

pub fn probe_append(stream: &str, payload: &str) -> pb::AppendRequest {
    pb::AppendRequest {
        durability: pb::Durability::Quorum as i32,
        stream: stream.to_string(),
        expected_version: None,
        events: vec![pb::EventData { r#type: "Probe".into(), payload: payload.as_bytes().to_vec(), metadata: Default::default() }],
    }
}

/// Asks the kernel to SIGKILL this (child) process when the thread that started it ends, so a
/// harness killed before its destructors ran (the chaos command SIGKILLed, a test aborted)
/// leaves no node behind. The harnesses start nodes from threads that live as long as they do
/// (a test's thread, a runtime's worker), never from a short-lived blocking-pool thread.
fn die_with_parent() -> std::io::Result<()> {
    // SAFETY: prctl with PR_SET_PDEATHSIG takes a signal number and changes nothing else.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) } == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

/// The addresses in a ready line.
pub fn parse_ready_line(line: &str) -> anyhow::Result<(SocketAddr, Option<SocketAddr>)> {
    let mut grpc = None;
    let mut metrics = None;
    for field in line.split_whitespace() {
        if let Some(v) = field.strip_prefix("grpc=") {
            grpc = Some(v.parse().with_context(|| format!("bad grpc address in {line:?}"))?);
        } else if let Some(v) = field.strip_prefix("metrics=") {
            metrics = if v == "none" { None } else { Some(v.parse().with_context(|| format!("bad metrics address in {line:?}"))?) };
        }
    }
    Ok((grpc.with_context(|| format!("no grpc= in {line:?}"))?, metrics))
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_lines_parse() {
        let (g, m) = parse_ready_line("anthill node ready grpc=127.0.0.1:5000 metrics=none").unwrap();
        assert_eq!(g.port(), 5000);
        assert_eq!(m, None);
        assert!(parse_ready_line("anthill node ready").is_err());
    }
}
