//! A real Consul cluster for the suites: `n` servers (`consul agent -server`, built by
//! `tools/install.sh consul`), each with its own data directory and address (127.0.0.31 on),
//! joined into one Raft group, with ACLs on (default deny) and a management token that the
//! harness uses to make the least-privilege tokens the suites hand to Anthill.
//!
//! Servers are killed with SIGKILL and started again on the same data directory and ports, so a
//! suite can take the Consul leader away. Dropping the cluster kills every server and removes
//! its directories.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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

pub struct Consul {
    binary: PathBuf,
    dir: tempfile::TempDir,
    servers: Vec<Server>,
    /// The bootstrap (management) token: everything is allowed with it.
    pub management_token: String,
}

/// A port free on `ip` now (for TCP and UDP: Serf uses both).
fn free_port(ip: &str) -> u16 {
    loop {
        let port = TcpListener::bind((ip, 0)).expect("a loopback port").local_addr().unwrap().port();
        if std::net::UdpSocket::bind((ip, port)).is_ok() {
            return port;
        }
    }
}

impl Consul {
    /// Starts `n` servers and waits until they elected a leader and ACLs answer.
    pub fn start(binary: &Path, n: usize) -> Consul {
        let dir = tempfile::Builder::new().prefix("anthill-consul-").tempdir().expect("a temporary directory");
        let management_token = uuid_like();
        let mut servers: Vec<Server> = (0..n)
            .map(|i| {
                let ip = format!("127.0.0.{}", 31 + i);
                let (http, serf, rpc) = (free_port(&ip), free_port(&ip), free_port(&ip));
                Server {
                    config: dir.path().join(format!("consul-{}.json", i + 1)),
                    log: dir.path().join(format!("consul-{}.log", i + 1)),
                    ip,
                    http,
                    serf,
                    rpc,
                    child: None,
                }
            })
            .collect();
        let joins: Vec<String> = servers.iter().map(|s| format!("{}:{}", s.ip, s.serf)).collect();
        for (i, s) in servers.iter().enumerate() {
            let config = serde_json::json!({
                "node_name": format!("consul-{}", i + 1),
                "datacenter": "dc1",
                "server": true,
                "bootstrap_expect": n,
                "data_dir": dir.path().join(format!("consul-{}", i + 1)),
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
            std::fs::write(&s.config, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
        }
        let mut consul = Consul { binary: binary.to_path_buf(), dir, servers: Vec::new(), management_token };
        consul.servers = std::mem::take(&mut servers);
        for i in 0..n {
            consul.start_server(i);
        }
        consul.wait_for_leader(Duration::from_secs(60));
        // ACLs answer once the leader made the management token; ask until they do.
        let deadline = Instant::now() + Duration::from_secs(60);
        while consul.consul_cli(0, &["acl", "policy", "list"]).is_err() {
            assert!(Instant::now() < deadline, "Consul's ACLs did not answer within 60 s:\n{}", consul.logs());
            std::thread::sleep(Duration::from_millis(500));
        }
        consul
    }

    /// The HTTP address of server `i` (`http://127.0.0.3x:port`).
    pub fn http_address(&self, i: usize) -> String {
        format!("http://{}:{}", self.servers[i].ip, self.servers[i].http)
    }

    pub fn len(&self) -> usize {
        self.servers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.servers.is_empty()
    }

    /// Starts server `i` (again), on its data directory and ports.
    pub fn start_server(&mut self, i: usize) {
        let s = &mut self.servers[i];
        assert!(s.child.is_none(), "consul-{} runs already", i + 1);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&s.log).unwrap();
        let child = Command::new(&self.binary)
            .arg("agent")
            .arg(format!("-config-file={}", s.config.display()))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.binary.display()));
        s.child = Some(child);
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
    pub fn wait_for_leader(&self, within: Duration) -> usize {
        let deadline = Instant::now() + within;
        loop {
            let running: Vec<usize> = (0..self.servers.len()).filter(|i| self.servers[*i].child.is_some()).collect();
            let seen: Vec<Option<usize>> = running.iter().map(|i| self.leader_seen_by(*i)).collect();
            if let Some(Some(leader)) = seen.first()
                && seen.iter().all(|s| *s == Some(*leader))
                && running.contains(leader)
            {
                return *leader;
            }
            assert!(Instant::now() < deadline, "Consul elected no leader within {within:?} (seen: {seen:?}):\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Runs the `consul` command against server `i` with the management token; its stdout.
    pub fn consul_cli(&self, i: usize, args: &[&str]) -> Result<String, String> {
        let out = Command::new(&self.binary)
            .args(args)
            .env("CONSUL_HTTP_ADDR", self.http_address(i))
            .env("CONSUL_HTTP_TOKEN", &self.management_token)
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!("consul {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr)))
        }
    }

    /// A token bound to a new policy named `name` with `rules`; its secret.
    pub fn token_with(&self, name: &str, rules: &str) -> String {
        let rules_file = self.dir.path().join(format!("{name}.hcl"));
        std::fs::write(&rules_file, rules).unwrap();
        self.consul_cli(0, &["acl", "policy", "create", "-name", name, "-rules", &format!("@{}", rules_file.display())])
            .unwrap_or_else(|e| panic!("{e}"));
        let out = self
            .consul_cli(0, &["acl", "token", "create", "-description", name, "-policy-name", name, "-format", "json"])
            .unwrap_or_else(|e| panic!("{e}"));
        let token: serde_json::Value = serde_json::from_str(&out).expect("consul prints the token as JSON");
        token["SecretID"].as_str().expect("a SecretID").to_string()
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

impl Drop for Consul {
    fn drop(&mut self) {
        for i in 0..self.servers.len() {
            self.kill(i);
        }
    }
}

/// A random id in the UUID form Consul wants for tokens.
fn uuid_like() -> String {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes)).expect("random bytes");
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
