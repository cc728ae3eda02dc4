//! The short form of the Kubernetes lab (tests/e2e/lab/): a single-node Kubernetes on this
//! machine that runs real pods (kubelet, containerd, runc, CNI, kube-proxy, CoreDNS), the
//! `anthill` and `anthill-operator` images built without a Docker engine, and the chart
//! installed with `helm install`; `helm test` passes. TLS is on (the operator's CA and
//! certificates; plain text refused). The operator makes the cluster, it becomes Available, its
//! nodes find each other by their DNS names, and `quorum` appends acknowledged while a node's pod
//! is deleted with no grace period, then while the version is upgraded (the operator drains and
//! restarts each pod in turn), while the pod of the node leading most partitions is evicted,
//! and while the cluster is scaled 3 → 5 → 3 (new pods join;
//! the removed ones are decommissioned first), are all read back, in order, once. `helm
//! uninstall` leaves no workload running. A second release's cluster decides ownership in a
//! real three-server Consul beside the Kubernetes: a new token in its Secret rolls its pods
//! under load, and `helm uninstall` deletes its keys (the chart's pre-delete hook deletes the
//! cluster before the operator goes). The lab's teardown leaves nothing behind.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anthill_node::local::consul::anthill_policy;
use serde_json::Value;

/// The lab, torn down when dropped (also when the test fails).
struct Lab {
    kubeconfig: PathBuf,
}

fn lab_script() -> PathBuf {
    anthill_e2e::repository().join("tests/e2e/lab/kube.sh")
}

impl Lab {
    fn up(images: &Path) -> Lab {
        let out = Command::new("bash").arg(lab_script()).arg("up").arg(images).output().expect("bash runs");
        assert!(out.status.success(), "the lab did not come up:\n{}", String::from_utf8_lossy(&out.stderr));
        let kubeconfig = String::from_utf8_lossy(&out.stdout).trim().lines().last().unwrap_or_default().to_string();
        Lab { kubeconfig: PathBuf::from(kubeconfig) }
    }

    fn kubectl(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new(anthill_e2e::tool("kubectl"))
            .arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .args(args)
            .output()
            .unwrap();
        anthill_e2e::output(&format!("kubectl {}", args.join(" ")), out)
    }

    fn helm(&self, args: &[&str]) -> Result<String, String> {
        let home = std::env::temp_dir().join("anthill-kubelab-helm");
        let out = Command::new(anthill_e2e::tool("helm"))
            .env("KUBECONFIG", &self.kubeconfig)
            .env("HELM_CACHE_HOME", home.join("cache"))
            .env("HELM_CONFIG_HOME", home.join("config"))
            .env("HELM_DATA_HOME", home.join("data"))
            .args(args)
            .output()
            .unwrap();
        anthill_e2e::output(&format!("helm {}", args.join(" ")), out)
    }

    /// `helm test RELEASE`, which must pass; on failure, with the test pod's log and events.
    fn helm_test(&self, release: &str) {
        match self.helm(&["test", release, "--namespace", "default", "--timeout", "120s"]) {
            Ok(tested) => assert!(tested.contains("Phase:          Succeeded"), "{tested}"),
            Err(e) => {
                let pod = format!("{release}-test-append");
                let log = self.kubectl(&["logs", &pod]);
                let described = self.kubectl(&["describe", "pod", &pod]);
                panic!("{e}\nits log: {log:?}\n{described:?}");
            }
        }
    }

    /// `consul ARGS` against the lab's Consul, with its management token.
    fn consul(&self, args: &[&str]) -> Result<String, String> {
        let lab = self.kubeconfig.parent().expect("the kubeconfig is in the lab's folder");
        let out = Command::new(anthill_e2e::tool("consul"))
            .env("CONSUL_HTTP_ADDR", "http://127.0.0.51:8501")
            .env("CONSUL_HTTP_TOKEN_FILE", lab.join("consul/management-token"))
            .args(args)
            .output()
            .unwrap();
        anthill_e2e::output(&format!("consul {}", args.join(" ")), out)
    }

    /// A new token of the lab's Consul bound to a new policy `name` with `rules`; its secret.
    fn consul_token(&self, name: &str, rules: &str) -> String {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), rules).unwrap();
        self.consul(&["acl", "policy", "create", "-name", name, "-rules", &format!("@{}", file.path().display())]).unwrap();
        let token = self.consul(&["acl", "token", "create", "-description", name, "-policy-name", name, "-format", "json"]).unwrap();
        let token: Value = serde_json::from_str(&token).unwrap();
        token["SecretID"].as_str().unwrap().to_string()
    }

    /// `kubectl ARGS` with `input` on its standard input.
    fn kubectl_stdin(&self, args: &[&str], input: &str) -> Result<String, String> {
        use std::io::Write;
        let mut child = Command::new(anthill_e2e::tool("kubectl"))
            .arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        anthill_e2e::output(&format!("kubectl {}", args.join(" ")), child.wait_with_output().unwrap())
    }

    /// `anthill ARGS` in pod `pod` (the node image holds the CLI), against its cluster's client
    /// Service (the pod's name without its ordinal), over TLS as the cluster's administrator
    /// (the pod's `ANTHILL_TLS_*`).
    fn anthill(&self, pod: &str, args: &[&str]) -> Result<String, String> {
        let server = format!("{}:7400", pod.rsplit_once('-').map_or(pod, |(cluster, _)| cluster));
        let mut all = vec!["exec", pod, "--", "anthill"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--server", &server]);
        self.kubectl(&all)
    }

    /// Whether cluster `name` has `pods` ready nodes, each `Ready` in its status, no change in
    /// progress and every partition led, as of its latest spec.
    fn settled(&self, name: &str, pods: usize) -> bool {
        let Ok(json) = self.kubectl(&["get", &format!("anthillcluster/{name}"), "-o", "json"]) else { return false };
        let cluster: Value = serde_json::from_str(&json).unwrap_or_default();
        let condition = |kind: &str| {
            cluster["status"]["conditions"].as_array().into_iter().flatten().find(|c| c["type"] == kind).map(|c| c["reason"].clone())
        };
        let nodes = cluster["status"]["nodes"].as_array().cloned().unwrap_or_default();
        cluster["status"]["observedGeneration"] == cluster["metadata"]["generation"]
            && cluster["status"]["readyReplicas"] == pods
            && nodes.len() == pods
            && nodes.iter().all(|n| n["role"] == "Ready")
            && condition("Progressing") == Some(Value::from("Stable"))
            && condition("Available") == Some(Value::from("AllPartitionsLed"))
    }

    /// Reads stream `payments` from `pod` (linearizable) and checks that every payload of
    /// `acked` is there, in order, once.
    fn read_back(&self, pod: &str, acked: &[String]) {
        let read = self.anthill(pod, &["read", "payments", "--max", "0", "--linearizable", "--json"]).unwrap();
        let read: Value = serde_json::from_str(&read).unwrap_or_else(|e| panic!("{e}: {read}"));
        let stored: Vec<String> =
            read["events"].as_array().into_iter().flatten().filter_map(|e| e["payload"].as_str().map(str::to_string)).collect();
        let mut next = stored.iter();
        for payload in acked {
            assert!(next.any(|s| s == payload), "acknowledged {payload} is missing or out of order; stored: {stored:?}");
        }
        for payload in acked {
            assert_eq!(stored.iter().filter(|s| *s == payload).count(), 1, "{payload} stored more than once");
        }
        eprintln!("all {} acknowledged appends read back from {pod}", acked.len());
    }
}

impl Lab {
    /// Tears the lab down and checks that it left nothing: no process of it, no network
    /// namespace in its pod network, no bridge, no KUBE- chain, no folder.
    fn down_and_check(self, netns_before: &str) {
        let out = Command::new("bash").arg(lab_script()).arg("down").output().unwrap();
        assert!(out.status.success(), "the lab's teardown failed:\n{}", String::from_utf8_lossy(&out.stderr));
        let sh = |script: &str| String::from_utf8_lossy(&Command::new("sh").args(["-c", script]).output().unwrap().stdout).into_owned();
        let left = [
            ("processes", sh("pgrep -a -f '[/]tmp/anthill-kubelab|[k]ubelet|[k]ube-apiserver|[c]ontainerd --config' || true")),
            (
                "network namespaces",
                sh(
                    "for ns in $(ip netns list | awk '{print $1}'); do ip netns exec $ns ip -4 -o addr | grep -q ' 10\\.88\\.' && echo $ns; done",
                ),
            ),
            ("new cni network namespaces", {
                let now = sh("ip netns list | awk '/^cni-/ {print $1}'");
                now.lines().filter(|ns| !netns_before.lines().any(|b| b.starts_with(ns))).collect::<Vec<_>>().join("\n")
            }),
            ("bridge", sh("ip link show anthill0 2>/dev/null || true")),
            ("iptables chains", sh("iptables-save | grep KUBE- || true")),
            ("folder", sh("ls -d /tmp/anthill-kubelab 2>/dev/null || true")),
        ];
        for (what, found) in left {
            assert!(found.trim().is_empty(), "the lab left {what} behind:\n{found}");
        }
        std::mem::forget(self);
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = Command::new("bash").arg(lab_script()).arg("down").status();
    }
}

/// `quorum` appends through the client Service, one after another, from the first three pods
/// in turn; what was acknowledged.
struct Load {
    /// The cluster appended to (its pods are `<cluster>-<ordinal>`).
    cluster: &'static str,
    acked: Vec<String>,
    next: usize,
}

impl Load {
    /// Appends until `done` (for at most 5 minutes), checking meanwhile that never two of
    /// `watched` pods are down (not ready, going or missing) at once, that one was, and that at
    /// least half the appends were acknowledged.
    fn until(&mut self, lab: &Lab, what: &str, watched: &[&str], mut done: impl FnMut() -> bool) {
        let down_now = || -> Result<Vec<String>, String> {
            let json = lab.kubectl(&["get", "pods", "-l", "app.kubernetes.io/component=node", "-o", "json"])?;
            let pods: Value = serde_json::from_str(&json).map_err(|e| e.to_string())?;
            let items = pods["items"].as_array().cloned().unwrap_or_default();
            let ready = |p: &Value| {
                p["status"]["conditions"].as_array().into_iter().flatten().any(|c| c["type"] == "Ready" && c["status"] == "True")
            };
            let up: Vec<&str> = items
                .iter()
                .filter(|p| p["metadata"]["deletionTimestamp"].is_null() && ready(p))
                .filter_map(|p| p["metadata"]["name"].as_str())
                .collect();
            Ok(watched.iter().filter(|w| !up.contains(w)).map(|w| w.to_string()).collect())
        };
        let deadline = Instant::now() + Duration::from_secs(300);
        let (mut attempts, before, mut most_down) = (0, self.acked.len(), 0);
        let mut failures: Vec<String> = Vec::new();
        loop {
            if let Ok(down) = down_now() {
                assert!(down.len() <= 1, "{what}: two pods down at once: {down:?}");
                most_down = most_down.max(down.len());
            }
            let payload = format!("payment-{}", self.next);
            let pod = format!("{}-{}", self.cluster, self.next % 3);
            (self.next, attempts) = (self.next + 1, attempts + 1);
            match lab.anthill(&pod, &["append", "payments", "--type", "Paid", "--data", &payload, "--durability", "quorum"]) {
                Ok(_) => self.acked.push(payload),
                Err(e) => failures.push(format!("{pod}: {}", e.lines().last().unwrap_or_default())),
            }
            if done() {
                break;
            }
            let cluster = format!("anthillcluster/{}", self.cluster);
            let conditions = lab.kubectl(&["get", &cluster, "-o", "jsonpath={.status.conditions}"]).unwrap_or_default();
            assert!(Instant::now() < deadline, "{what} did not finish; conditions: {conditions}");
        }
        let during = self.acked.len() - before;
        eprintln!("{what}: done with {during} of {attempts} quorum appends acknowledged meanwhile; failures: {failures:#?}");
        assert!(most_down == 1, "{what}: no pod was ever seen restarting: was anything rolled?");
        assert!(during * 2 >= attempts, "{what}: only {during} of {attempts} appends were acknowledged");
    }
}

fn wait_until(what: &str, within: Duration, mut done: impl FnMut() -> Result<bool, String>) {
    let deadline = Instant::now() + within;
    loop {
        let last = done();
        if last == Ok(true) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: not after {within:?} (last: {last:?})");
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn helm_install_on_a_real_kubernetes_makes_a_cluster_that_keeps_every_quorum_append_through_a_pod_deleted_without_grace_a_rolled_upgrade_and_scaling()
 {
    let install = Command::new("bash")
        .arg(anthill_e2e::repository().join("tests/e2e/tools/install.sh"))
        .args(["kubernetes", "kubelab", "helm"])
        .status()
        .expect("the installer runs");
    assert!(install.success(), "the lab's tools did not install");
    let images = tempfile::tempdir().unwrap();
    let profile = if cfg!(debug_assertions) { "debug" } else { "release" };
    let built = Command::new("bash")
        .arg(anthill_e2e::repository().join("tests/e2e/lab/images.sh"))
        .arg(images.path())
        .args(["0.1.0", profile])
        .status()
        .expect("the image builder runs");
    assert!(built.success(), "the images were not built");
    let netns_before = String::from_utf8_lossy(&Command::new("ip").args(["netns", "list"]).output().unwrap().stdout).into_owned();
    let lab = Lab::up(images.path());

    let chart = anthill_e2e::repository().join("charts/anthill").display().to_string();
    lab.helm(&[
        "install",
        "anthill",
        &chart,
        "--namespace",
        "default",
        "--set",
        "cluster.storage.storageClassName=lab",
        "--set",
        "cluster.storage.size=1Gi",
    ])
    .unwrap();
    lab.kubectl(&["wait", "anthillcluster/anthill", "--for=condition=Available", "--timeout=300s"]).unwrap();
    // Every partition led: the nodes formed the cluster through their DNS names.
    wait_until("every partition has a leader", Duration::from_secs(60), || {
        let status: Value = serde_json::from_str(&lab.anthill("anthill-1", &["status", "--json"])?).map_err(|e| e.to_string())?;
        let partitions = status["cluster"]["partitions"].as_array().cloned().unwrap_or_default();
        Ok(partitions.len() == 16 && partitions.iter().all(|p| p["leader"].is_string()))
    });

    // The status has the nodes' own view: every node ready, the 16 leaderships among them.
    wait_until("the status shows the nodes", Duration::from_secs(60), || {
        let cluster: Value =
            serde_json::from_str(&lab.kubectl(&["get", "anthillcluster/anthill", "-o", "json"])?).map_err(|e| e.to_string())?;
        let nodes = cluster["status"]["nodes"].as_array().cloned().unwrap_or_default();
        let leads: u64 = nodes.iter().filter_map(|n| n["leaderships"].as_u64()).sum();
        let reason = cluster["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["type"] == "Available")
            .map(|c| c["reason"].clone());
        Ok(nodes.len() == 3 && nodes.iter().all(|n| n["role"] == "Ready") && leads == 16 && reason == Some(Value::from("AllPartitionsLed")))
    });

    // The chart's own test: a pod appends through the client Service and reads it back.
    lab.helm_test("anthill");
    // TLS is on by default: plain text is refused; in a node's pod the CLI is the administrator.
    let plain = lab.kubectl(&["exec", "anthill-1", "--", "anthill", "status", "--server", "http://anthill:7400"]);
    assert!(plain.is_err(), "a plain-text client was served: {plain:?}");
    let me = lab.kubectl(&["exec", "anthill-1", "--", "anthill", "auth", "--server", "anthill:7400", "whoami"]).unwrap();
    assert!(me.contains("\"admin\"") && me.contains("cluster-admin"), "{me}");

    // Appends acknowledged by a majority, through the client Service, while anthill-0 is
    // force-deleted (the object goes at once and the StatefulSet makes the pod again; the
    // kubelet still stops the old process with SIGTERM, on which it drains first).
    let mut acked = Vec::new();
    for i in 0..45 {
        if i == 15 {
            lab.kubectl(&["delete", "pod", "anthill-0", "--grace-period=0", "--force"]).unwrap();
        }
        let pod = if i % 2 == 0 { "anthill-1" } else { "anthill-2" };
        let payload = format!("payment-{i}");
        let appended = lab.anthill(pod, &["append", "payments", "--type", "Paid", "--data", &payload, "--durability", "quorum"]);
        if appended.is_ok() {
            acked.push(payload);
        }
    }
    assert!(acked.len() >= 30, "only {} of 45 appends were acknowledged", acked.len());
    wait_until("anthill-0 is back and ready", Duration::from_secs(120), || {
        Ok(lab.kubectl(&["get", "pod", "anthill-0", "-o", "jsonpath={.status.containerStatuses[0].ready}"])? == "true")
    });
    lab.kubectl(&["wait", "anthillcluster/anthill", "--for=condition=Available", "--timeout=120s"]).unwrap();
    eprintln!("{} of 45 quorum appends acknowledged across the pod's deletion", acked.len());

    // An upgrade (the lab has the same build under 0.1.1): the operator drains each pod and
    // restarts it on the new template, one at a time, the busiest last, while appends go on.
    lab.kubectl(&["patch", "anthillcluster/anthill", "--type=merge", "-p", r#"{"spec":{"version":"0.1.1"}}"#]).unwrap();
    let images =
        || lab.kubectl(&["get", "pods", "-l", "app.kubernetes.io/component=node", "-o", "jsonpath={.items[*].spec.containers[0].image}"]);
    let founders = ["anthill-0", "anthill-1", "anthill-2"];
    let mut load = Load { cluster: "anthill", acked, next: 45 };
    load.until(&lab, "the upgrade", &founders, || {
        let version = lab.kubectl(&["get", "anthillcluster/anthill", "-o", "jsonpath={.status.currentVersion}"]).unwrap_or_default();
        version == "0.1.1" && images().is_ok_and(|i| i.split_whitespace().filter(|i| *i == "anthill:0.1.1").count() == 3)
    });
    lab.kubectl(&["wait", "anthillcluster/anthill", "--for=condition=Available", "--timeout=120s"]).unwrap();

    // The node holding most leaderships is drained: its pod is evicted (what `kubectl drain`
    // does to a Kubernetes node's pods, through the disruption budget); on SIGTERM the node
    // hands its leaderships over before it stops, and the StatefulSet makes the pod again.
    let json = lab.kubectl(&["get", "anthillcluster/anthill", "-o", "json"]).unwrap();
    let cluster: Value = serde_json::from_str(&json).unwrap();
    let nodes = cluster["status"]["nodes"].as_array().cloned().unwrap_or_default();
    let busiest = nodes.iter().max_by_key(|n| n["leaderships"].as_u64()).unwrap()["name"].as_str().unwrap().to_string();
    let uid = |pod: &str| lab.kubectl(&["get", "pod", pod, "-o", "jsonpath={.metadata.uid}"]).unwrap_or_default();
    let before = uid(&busiest);
    let eviction = format!(r#"{{"apiVersion":"policy/v1","kind":"Eviction","metadata":{{"name":"{busiest}","namespace":"default"}}}}"#);
    lab.kubectl_stdin(&["create", "--raw", &format!("/api/v1/namespaces/default/pods/{busiest}/eviction"), "-f", "-"], &eviction).unwrap();
    load.until(&lab, &format!("the eviction of {busiest}, which led most partitions"), &founders, || {
        let again = uid(&busiest);
        !again.is_empty() && again != before && lab.settled("anthill", 3)
    });

    // Scale 3 → 5: the new pods join (not founders), the old ones restart one at a time with
    // the longer member list, and replica sets move onto the newcomers.
    lab.kubectl(&["scale", "anthillcluster/anthill", "--replicas=5"]).unwrap();
    let sets_naming = |pods: &[&str]| -> usize {
        let Ok(status) = lab.anthill("anthill-0", &["status", "--json"]) else { return usize::MAX };
        let status: Value = serde_json::from_str(&status).unwrap_or_default();
        let partitions = status["cluster"]["partitions"].as_array().cloned().unwrap_or_default();
        if partitions.len() != 16 {
            return usize::MAX;
        }
        let names = |p: &Value, key: &str| p[key].as_array().into_iter().flatten().any(|r| pods.iter().any(|n| r == n));
        partitions.iter().filter(|p| names(p, "replicas") || names(p, "target")).count()
    };
    let newcomers = ["anthill-3", "anthill-4"];
    load.until(&lab, "the scale-up to 5", &founders, || lab.settled("anthill", 5) && (1..=16).contains(&sets_naming(&newcomers)));
    eprintln!("scaled up: {} of 16 replica sets name anthill-3 or anthill-4", sets_naming(&newcomers));

    // Scale 5 → 3: anthill-4 then anthill-3 are decommissioned (their replicas move away), and
    // only then removed; the rest restart with the shorter member list.
    lab.kubectl(&["scale", "anthillcluster/anthill", "--replicas=3"]).unwrap();
    load.until(&lab, "the scale-down to 3", &founders, || lab.settled("anthill", 3) && sets_naming(&newcomers) == 0);
    let decommissioned = lab.kubectl(&["get", "anthillcluster/anthill", "-o", "jsonpath={.status.decommissioned}"]).unwrap();
    assert!(decommissioned.contains("anthill-3") && decommissioned.contains("anthill-4"), "{decommissioned}");
    let acked = load.acked;

    lab.kubectl(&["wait", "anthillcluster/anthill", "--for=condition=Available", "--timeout=120s"]).unwrap();
    lab.read_back("anthill-0", &acked);

    // `helm uninstall` takes the operator and the cluster's resource; the cluster's objects go
    // with it (owned by it), and with them every pod.
    lab.helm(&["uninstall", "anthill", "--namespace", "default", "--wait"]).unwrap();
    wait_until("no pod left", Duration::from_secs(120), || Ok(lab.kubectl(&["get", "pods", "-o", "name"])?.trim().is_empty()));

    // A second release, its cluster on Consul: the lab's three Consul servers beside the
    // Kubernetes (their HTTP API also on the lab's 10.88.0.1 for the pods), ACLs on, the nodes'
    // least-privilege token in a Secret; its keys are deleted with it.
    let prefix = "anthill/default/ledger/";
    let first = lab.consul_token("ledger-first", &anthill_policy(prefix));
    lab.kubectl(&["create", "secret", "generic", "consul-acl", &format!("--from-literal=token={first}")]).unwrap();
    let values = [
        "cluster.name=ledger",
        "cluster.version=0.1.1",
        "cluster.storage.storageClassName=lab",
        "cluster.storage.size=1Gi",
        "cluster.storage.reclaimPolicy=Delete",
        "cluster.coordination.store=Consul",
        "cluster.coordination.consul.address=http://10.88.0.1:8501",
        "cluster.coordination.consul.tokenSecretRef.name=consul-acl",
        "cluster.coordination.consul.deleteKeysOnRemoval=true",
    ];
    let mut install = vec!["install", "ledger", &chart, "--namespace", "default"];
    install.extend(values.iter().flat_map(|v| ["--set", v]));
    lab.helm(&install).unwrap();
    lab.kubectl(&["wait", "anthillcluster/ledger", "--for=condition=Available", "--timeout=300s"]).unwrap();
    wait_until("the ledger cluster settles", Duration::from_secs(120), || Ok(lab.settled("ledger", 3)));
    lab.helm_test("ledger");
    let keys = || lab.consul(&["kv", "get", "-recurse", prefix]).expect("the lab's Consul answers");
    assert!(keys().contains(&format!("{prefix}members/ledger-0")), "the nodes hold their keys in Consul: {}", keys());
    // A new token in the Secret rolls the pods (a node reads its token at start).
    let token_hash = || {
        lab.kubectl(&["get", "statefulset/ledger", "-o", r"jsonpath={.spec.template.metadata.annotations.anthill\.io/consul-token-hash}"])
            .unwrap_or_default()
    };
    let before = token_hash();
    let second = lab.consul_token("ledger-second", &anthill_policy(prefix));
    lab.kubectl(&["patch", "secret/consul-acl", "--type=merge", "-p", &format!(r#"{{"stringData":{{"token":"{second}"}}}}"#)]).unwrap();
    let mut ledger_load = Load { cluster: "ledger", acked: Vec::new(), next: 0 };
    ledger_load.until(&lab, "the roll for a new Consul token", &["ledger-0", "ledger-1", "ledger-2"], || {
        let now = token_hash();
        !now.is_empty() && now != before && lab.settled("ledger", 3)
    });
    lab.read_back("ledger-0", &ledger_load.acked);

    // `helm uninstall` of a release holding both the operator and the cluster: its pre-delete
    // hook deletes the cluster while the operator still runs, which stops the pods, then deletes
    // the keys, then lets the cluster go; only then does the operator go.
    if let Err(e) = lab.helm(&["uninstall", "ledger", "--namespace", "default", "--wait", "--timeout", "5m"]) {
        let log = lab.kubectl(&["logs", "job/ledger-anthill-delete-cluster"]);
        panic!("{e}\nthe hook's log: {log:?}");
    }
    assert_eq!(keys().trim(), "", "the ledger's keys are gone from Consul");
    assert_eq!(lab.kubectl(&["get", "anthillclusters,jobs", "-o", "name"]).unwrap().trim(), "", "no cluster and no hook job are left");
    wait_until("no pod left", Duration::from_secs(120), || Ok(lab.kubectl(&["get", "pods", "-o", "name"])?.trim().is_empty()));
    lab.down_and_check(&netns_before);
}
