//! A real Kubernetes API server for the suites, the way operator projects test against one
//! (envtest): etcd (Debian's `etcd-server`) and `kube-apiserver` (built from Kubernetes' Go
//! modules), both from `tools/install.sh kubernetes`, on a loopback address with free ports and
//! their own temporary directory. No kubelet, scheduler or controllers: objects are stored and
//! served, no pod runs.
//!
//! The API server has RBAC on, a self-signed serving certificate and one static bearer token in
//! `system:masters`; [`ApiServer::kubeconfig`] names a kubeconfig with that token for `kubectl`
//! and `helm`. Dropping the server kills both processes and removes the directory.

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where the API servers of the suites listen; ports are free ones.
const IP: &str = "127.0.0.41";

/// A process killed (and reaped) when dropped, also when a step after its start panics.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub struct ApiServer {
    // Dropped in this order: the API server, then etcd, then the directory.
    _apiserver: Running,
    _etcd: Running,
    dir: tempfile::TempDir,
    kubectl: PathBuf,
    /// A kubeconfig for the admin token (`system:masters`).
    pub kubeconfig: PathBuf,
    /// `https://127.0.0.41:port`.
    pub url: String,
}

fn free_port() -> u16 {
    TcpListener::bind((IP, 0)).expect("a loopback port").local_addr().unwrap().port()
}

fn spawn(program: &Path, args: &[String], log: &Path) -> Running {
    let log = std::fs::File::create(log).unwrap();
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
    Running(child)
}

impl ApiServer {
    /// Starts etcd and the API server (tools installed first if missing) and waits until
    /// `/readyz` says `ok`.
    pub fn start() -> ApiServer {
        let (etcd, apiserver, kubectl) = (crate::tool("etcd"), crate::tool("kube-apiserver"), crate::tool("kubectl"));
        let dir = tempfile::Builder::new().prefix("anthill-kube-").tempdir().expect("a temporary directory");
        let path = |name: &str| dir.path().join(name);

        let (client, peer) = (free_port(), free_port());
        let etcd_url = format!("http://{IP}:{client}");
        let peer_url = format!("http://{IP}:{peer}");
        let etcd_args = [
            "--name=default".to_string(),
            format!("--data-dir={}", path("etcd").display()),
            format!("--listen-client-urls={etcd_url}"),
            format!("--advertise-client-urls={etcd_url}"),
            format!("--listen-peer-urls={peer_url}"),
            format!("--initial-advertise-peer-urls={peer_url}"),
            format!("--initial-cluster=default={peer_url}"),
        ];
        let etcd = spawn(&etcd, &etcd_args, &path("etcd.log"));

        // The service-account tokens' signing key (the API server will not start without one).
        let key = path("service-account.key");
        let out = Command::new("openssl").args(["genrsa", "-out"]).arg(&key).arg("2048").output().expect("openssl runs");
        assert!(out.status.success(), "openssl genrsa: {}", String::from_utf8_lossy(&out.stderr));
        let token = format!("anthill-test-{}", std::process::id());
        std::fs::write(path("tokens.csv"), format!("{token},admin,admin,\"system:masters\"\n")).unwrap();

        let port = free_port();
        let url = format!("https://{IP}:{port}");
        let apiserver_args = [
            format!("--etcd-servers={etcd_url}"),
            format!("--bind-address={IP}"),
            format!("--advertise-address={IP}"),
            format!("--secure-port={port}"),
            format!("--cert-dir={}", path("certs").display()),
            format!("--token-auth-file={}", path("tokens.csv").display()),
            "--authorization-mode=RBAC".to_string(),
            format!("--service-account-key-file={}", key.display()),
            format!("--service-account-signing-key-file={}", key.display()),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".to_string(),
            "--service-cluster-ip-range=10.96.0.0/24".to_string(),
        ];
        let apiserver = spawn(&apiserver, &apiserver_args, &path("kube-apiserver.log"));

        let kubeconfig = path("kubeconfig");
        // The serving certificate is self-signed, made at start: nothing to pin it to.
        let config = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {url}\n    insecure-skip-tls-verify: true\n\
             users:\n- name: admin\n  user:\n    token: {token}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: admin\n\
             current-context: test\n"
        );
        std::fs::write(&kubeconfig, config).unwrap();
        let server = ApiServer { _apiserver: apiserver, _etcd: etcd, dir, kubectl, kubeconfig, url };
        server.wait_ready(Duration::from_secs(90));
        server
    }

    fn wait_ready(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            match self.kubectl(&["get", "--raw", "/readyz"]) {
                Ok(body) if body.trim() == "ok" => return,
                answer => assert!(Instant::now() < deadline, "the API server is not ready after {within:?} ({answer:?}):\n{}", self.logs()),
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Runs `kubectl` with the admin kubeconfig; its stdout, or what it printed on failure.
    pub fn kubectl(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new(&self.kubectl)
            .arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .args(args)
            .output()
            .map_err(|e| format!("cannot run {}: {e}", self.kubectl.display()))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!("kubectl {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
        }
    }

    /// `kubectl <verb> -f -` with `manifest` on stdin; its stdout, or its stderr on failure.
    pub fn kubectl_stdin(&self, verb: &[&str], manifest: &str) -> Result<String, String> {
        let mut child = Command::new(&self.kubectl)
            .arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .args(verb)
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kubectl runs");
        child.stdin.take().unwrap().write_all(manifest.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// [`ApiServer::start`] with the `AnthillCluster` CRD as the chart commits it, established.
    pub fn with_crd() -> ApiServer {
        let api = ApiServer::start();
        let crd = crate::repository().join("charts/anthill/crds/anthillclusters.anthill.io.yaml");
        api.kubectl(&["apply", "--server-side", "-f", &crd.display().to_string()]).expect("the CRD installs");
        api.kubectl(&["wait", "--for=condition=Established", "--timeout=60s", "crd/anthillclusters.anthill.io"])
            .expect("the CRD is established");
        api
    }

    /// The end of etcd's and the API server's logs, for a failure message.
    pub fn logs(&self) -> String {
        ["etcd.log", "kube-apiserver.log"]
            .iter()
            .map(|name| {
                let text = std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(20).collect();
                format!("--- {name} ---\n{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}
