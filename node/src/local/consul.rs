//! A real Consul cluster on loopback, for the suites and for `anthill chaos --coordination
//! consul`: `n` servers (`consul agent -server`; the binary comes from the caller, e.g. built by
//! `tests/e2e/tools/install.sh consul`), each with its own data directory and address (127.0.0.31
//! on), joined into one Raft group, with ACLs on (default deny) and a management token that the
//! harness uses to make the least-privilege tokens handed to Anthill.
//!
//! Servers are killed with SIGKILL and started again on the same data directory and ports, so a
//! run can take the Consul leader away. Dropping the cluster kills every server (and removes its
//! directory if the cluster made it). A server is also killed when the thread that started it
//! ends (`PR_SET_PDEATHSIG`, as the nodes of a [`super::LocalCluster`]): start them from a
//! thread that lives as long as the cluster, never from a blocking-pool thread.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// The policy Anthill's nodes need: sessions, and keys under their prefix (docs/replication.md,
/// "The Consul store").
pub fn anthill_policy(key_prefix: &str) -> String {
    format!("key_prefix \"{key_prefix}\" {{ policy = \"write\" }}\nsession_prefix \"\" {{ policy = \"write\" }}\n")
}

struct Server {
    ip: String,
    http: u16,
    serf: u16,
    rpc: u16,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

pub struct LocalConsul {
    binary: PathBuf,
    dir: PathBuf,
    /// The directory, when the cluster made it (removed on drop).
    _temporary: Option<tempfile::TempDir>,
    servers: Vec<Server>,
    /// The bootstrap (management) token: everything is allowed with it.
    pub management_token: String,
}

/// A port free on `ip` now (for TCP and UDP: Serf uses both).
fn free_port(ip: &str) -> anyhow::Result<u16> {
    loop {
        let port = TcpListener::bind((ip, 0)).with_context(|| format!("cannot bind {ip}"))?.local_addr()?.port();
        if std::net::UdpSocket::bind((ip, port)).is_ok() {
            return Ok(port);
        }
    }
}

impl LocalConsul {
    /// Starts `n` servers in a temporary directory and waits until they elected a leader and
    /// ACLs answer.
    pub fn start(binary: &Path, n: usize) -> anyhow::Result<LocalConsul> {
        let temporary = tempfile::Builder::new().prefix("anthill-consul-").tempdir().context("cannot make a temporary directory")?;
        let mut consul = Self::start_in(binary, temporary.path(), n)?;
        consul._temporary = Some(temporary);
        Ok(consul)
    }

    /// Like [`LocalConsul::start`], with the servers' data, configurations and logs in `dir`
    /// (kept after the cluster is dropped).
    pub fn start_in(binary: &Path, dir: &Path, n: usize) -> anyhow::Result<LocalConsul> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let management_token = uuid_like();
        let mut servers: Vec<Server> = Vec::new();
        for i in 0..n {
            let ip = format!("127.0.0.{}", 31 + i);
            let (http, serf, rpc) = (free_port(&ip)?, free_port(&ip)?, free_port(&ip)?);
            servers.push(Server {
                config: dir.join(format!("consul-{}.json", i + 1)),
                log: dir.join(format!("consul-{}.log", i + 1)),
                ip,
                http,
                serf,
                rpc,
                child: None,
            });
        }
        let joins: Vec<String> = servers.iter().map(|s| format!("{}:{}", s.ip, s.serf)).collect();
        for (i, s) in servers.iter().enumerate() {
            let config = serde_json::json!({
                "node_name": format!("consul-{}", i + 1),
                "datacenter": "dc1",
                "server": true,
                "bootstrap_expect": n,
                "data_dir": dir.join(format!("consul-{}", i + 1)),
                "bind_addr": s.ip,
                "advertise_addr": s.ip,
                "client_addr": s.ip,
                "ports": { "http": s.http, "serf_lan": s.serf, "server": s.rpc, "dns": -1, "serf_wan": -1, "grpc": -1, "grpc_tls": -1 },
                "retry_join": joins.iter().filter(|j| !j.starts_with(&format!("{}:", s.ip))).collect::<Vec<_>>(),
                "retry_interval": "1s",
                "acl": {
                    "enabled": true,
                    "default_policy": "deny",
                    "enable_token_persistence": true,
                    "tokens": { "initial_management": management_token, "agent": management_token },
                },
                "disable_update_check": true,
                "log_level": "info",
                "performance": { "raft_multiplier": 1 },
                "ui_config": { "enabled": false },
            });
            std::fs::write(&s.config, serde_json::to_vec_pretty(&config)?)
                .with_context(|| format!("cannot write {}", s.config.display()))?;
        }
        let mut consul = LocalConsul { binary: binary.to_path_buf(), dir: dir.to_path_buf(), _temporary: None, servers, management_token };
        for i in 0..n {
            consul.start_server(i)?;
        }
        consul.wait_for_leader(Duration::from_secs(60))?;
        // ACLs answer once the leader made the management token; ask until they do.
        let deadline = Instant::now() + Duration::from_secs(60);
        while let Err(e) = consul.consul_cli(&["acl", "policy", "list"]) {
            if Instant::now() > deadline {
                bail!("Consul's ACLs did not answer within 60 s ({e:#}):\n{}", consul.logs());
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        Ok(consul)
    }

    /// Where the servers' data, configurations and logs are.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The HTTP address of server `i` (`http://127.0.0.3x:port`).
    pub fn http_address(&self, i: usize) -> String {
        format!("http://{}:{}", self.servers[i].ip, self.servers[i].http)
    }

    /// The address of server `i`, for cuts in a network namespace.
    pub fn ip(&self, i: usize) -> std::net::Ipv4Addr {
        self.servers[i].ip.parse().expect("an IPv4 address")
    }

    pub fn len(&self) -> usize {
        self.servers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.servers.is_empty()
    }

    /// Starts server `i` (again), on its data directory and ports; nothing if it runs.
    pub fn start_server(&mut self, i: usize) -> anyhow::Result<()> {
        let s = &mut self.servers[i];
        if s.child.is_some() {
            return Ok(());
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&s.log)
            .with_context(|| format!("cannot open {}", s.log.display()))?;
        let mut command = Command::new(&self.binary);
        // SAFETY: between fork and exec only the async-signal-safe prctl(2) runs.
        unsafe {
            command.pre_exec(super::die_with_parent);
        }
        let child = command
            .arg("agent")
            .arg(format!("-config-file={}", s.config.display()))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| {
                format!("cannot start Consul from {} (tests/e2e/tools/install.sh consul builds one)", self.binary.display())
            })?;
        s.child = Some(child);
        Ok(())
    }

    /// Whether server `i` was started and not killed.
    pub fn is_running(&self, i: usize) -> bool {
        self.servers[i].child.is_some()
    }

    /// Kills server `i` with SIGKILL.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.servers[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Which server leads, as server `asked` sees it (`None`: no leader, or it does not answer).
    pub fn leader_seen_by(&self, asked: usize) -> Option<usize> {
        let s = &self.servers[asked];
        let body = http_get(&format!("{}:{}", s.ip, s.http), "/v1/status/leader").ok()?;
        let leader: String = serde_json::from_str(&body).ok()?;
        self.servers.iter().position(|s| leader == format!("{}:{}", s.ip, s.rpc))
    }

    /// Waits until every running server names the same leader; returns it.
    pub fn wait_for_leader(&self, within: Duration) -> anyhow::Result<usize> {
        let deadline = Instant::now() + within;
        loop {
            let running: Vec<usize> = (0..self.servers.len()).filter(|i| self.is_running(*i)).collect();
            let seen: Vec<Option<usize>> = running.iter().map(|i| self.leader_seen_by(*i)).collect();
            if let Some(Some(leader)) = seen.first()
                && seen.iter().all(|s| *s == Some(*leader))
                && running.contains(leader)
            {
                return Ok(*leader);
            }
            if Instant::now() > deadline {
                bail!("Consul elected no leader within {within:?} (seen: {seen:?}):\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Runs the `consul` command against the first running server with the management token;
    /// its stdout.
    pub fn consul_cli(&self, args: &[&str]) -> anyhow::Result<String> {
        let i = (0..self.servers.len()).find(|i| self.is_running(*i)).context("no Consul server runs")?;
        let out = Command::new(&self.binary)
            .args(args)
            .env("CONSUL_HTTP_ADDR", self.http_address(i))
            .env("CONSUL_HTTP_TOKEN", &self.management_token)
            .output()
            .with_context(|| format!("cannot run {}", self.binary.display()))?;
        if !out.status.success() {
            bail!("consul {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// A token bound to a new policy named `name` with `rules`; its secret.
    pub fn token_with(&self, name: &str, rules: &str) -> anyhow::Result<String> {
        let rules_file = self.dir.join(format!("{name}.hcl"));
        std::fs::write(&rules_file, rules).with_context(|| format!("cannot write {}", rules_file.display()))?;
        self.consul_cli(&["acl", "policy", "create", "-name", name, "-rules", &format!("@{}", rules_file.display())])?;
        let out = self.consul_cli(&["acl", "token", "create", "-description", name, "-policy-name", name, "-format", "json"])?;
        let token: serde_json::Value = serde_json::from_str(&out).context("consul printed no token as JSON")?;
        Ok(token["SecretID"].as_str().context("consul printed a token without a SecretID")?.to_string())
    }

    /// The end of every server's log, for a failure message.
    pub fn logs(&self) -> String {
        self.servers
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let text = std::fs::read_to_string(&s.log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(15).collect();
                format!("--- consul-{} ---\n{}", i + 1, tail.into_iter().rev().collect::<Vec<_>>().join("\n"))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for LocalConsul {
    fn drop(&mut self) {
        for i in 0..self.servers.len() {
            self.kill(i);
        }
    }
}

/// A random id in the UUID form Consul wants for tokens.
fn uuid_like() -> String {
    let bytes: [u8; 16] = rand::random();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &hex[0..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..32])
}

/// A plain HTTP/1.0 GET on loopback; the body.
fn http_get(address: &str, path: &str) -> std::io::Result<String> {
    let address: SocketAddr = address.parse().map_err(std::io::Error::other)?;
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(1))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").ok_or_else(|| std::io::Error::other("no HTTP head"))?;
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        return Err(std::io::Error::other(head.lines().next().unwrap_or_default().to_string()));
    }
    Ok(body.to_string())
}
