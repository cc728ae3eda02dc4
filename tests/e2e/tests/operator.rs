//! The operator's controller (`anthill-operator run`, a real process) against a real Kubernetes
//! API server with the CRD installed: an `AnthillCluster` becomes its ConfigMap, Services,
//! StatefulSet and PodDisruptionBudget, owned by it; the status reports what is there; `paused`
//! stops every change and says so; a scale-up lists the new members first and adds pods only
//! once the pods there run that list; a
//! bad `spec.config` changes nothing and is reported as `Degraded` with the node's own message;
//! TLS is on by default (a CA and every certificate in Secrets, the mode fixed for good);
//! a new Consul token changes the template; a cluster asking for it has its keys deleted from a
//! real Consul before it goes.
//! (No kubelet or controller-manager runs here, so no pod starts: the Kubernetes lab does that.)

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anthill_e2e::kube::ApiServer;
use anthill_node::local::consul::{LocalConsul, anthill_policy};
use serde_json::Value;

/// The operator process, killed when dropped.
struct Operator(Child);

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Where the operator serves its metrics in this test.
const METRICS: &str = "127.0.0.1:18931";

/// The operator's `GET /metrics`.
fn metrics() -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(METRICS).expect("the operator serves metrics");
    write!(stream, "GET /metrics HTTP/1.0\r\nHost: {METRICS}\r\n\r\n").unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    text
}

fn start_operator(api: &ApiServer) -> Operator {
    let log = std::fs::File::create(std::env::temp_dir().join("anthill-operator-e2e.log")).unwrap();
    let child = Command::new(anthill_e2e::operator())
        .args(["run", "--namespace", "default", "--log-level", "info", "--metrics-addr", METRICS])
        .env("KUBECONFIG", &api.kubeconfig)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("the operator starts");
    Operator(child)
}

fn get(api: &ApiServer, what: &str) -> Option<Value> {
    api.kubectl(&["get", what, "-o", "json"]).ok().and_then(|s| serde_json::from_str(&s).ok())
}

/// Polls `what` until `ready` holds for it (at most a minute); returns it.
fn wait_for(api: &ApiServer, what: &str, ready: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let seen = get(api, what);
        if let Some(v) = seen.as_ref().filter(|v| ready(v)) {
            return v.clone();
        }
        let log = std::fs::read_to_string(std::env::temp_dir().join("anthill-operator-e2e.log")).unwrap_or_default();
        assert!(Instant::now() < deadline, "{what} never got there; last seen: {seen:#?}\noperator log:\n{log}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn condition<'a>(cluster: &'a Value, kind: &str) -> Option<&'a Value> {
    cluster["status"]["conditions"].as_array()?.iter().find(|c| c["type"] == kind)
}

/// How many members the nodes' configuration in `config_map` lists.
fn members(config_map: &Value) -> usize {
    let config: Value = serde_yaml::from_str(config_map["data"]["node.yaml"].as_str().unwrap_or_default()).unwrap_or_default();
    config["cluster"]["members"].as_array().map_or(0, Vec::len)
}

const CLUSTER: &str = "apiVersion: anthill.io/v1alpha1\nkind: AnthillCluster\nmetadata:\n  name: shop\n  namespace: default\nspec:\n  replicas: 3\n  version: 0.1.0\n  storage:\n    size: 1Gi\n";

#[test]
fn the_controller_makes_a_clusters_objects_reports_its_status_honours_paused_and_refuses_a_bad_config() {
    anthill_e2e::ensure_tools();
    let api = ApiServer::with_crd();
    let operator = start_operator(&api);
    api.kubectl_stdin(&["create"], CLUSTER).expect("the cluster is created");
    let cluster = get(&api, "anthillcluster/shop").unwrap();
    let uid = cluster["metadata"]["uid"].as_str().unwrap().to_string();

    // Its objects, each owned by the cluster (the garbage collector deletes them with it).
    let set = wait_for(&api, "statefulset/shop", |s| s["spec"]["replicas"] == 3);
    assert_eq!(set["spec"]["updateStrategy"]["type"], "OnDelete");
    assert_eq!(set["spec"]["serviceName"], "shop-nodes");
    assert_eq!(set["spec"]["template"]["spec"]["containers"][0]["image"], "anthill:0.1.0");
    for what in ["statefulset/shop", "configmap/shop-config", "service/shop", "service/shop-nodes", "poddisruptionbudget/shop"] {
        let object = wait_for(&api, what, |_| true);
        let owner = &object["metadata"]["ownerReferences"][0];
        assert_eq!(
            (owner["kind"].as_str(), owner["uid"].as_str(), owner["controller"].as_bool()),
            (Some("AnthillCluster"), Some(uid.as_str()), Some(true)),
            "{what}"
        );
        assert_eq!(object["metadata"]["labels"]["app.kubernetes.io/managed-by"], "anthill-operator", "{what}");
    }
    let config = wait_for(&api, "configmap/shop-config", |_| true);
    assert_eq!(members(&config), 3);
    assert!(config["data"]["node.yaml"].as_str().unwrap().contains("shop-2.shop-nodes.default.svc:7400"), "{config}");
    assert_eq!(wait_for(&api, "service/shop-nodes", |_| true)["spec"]["clusterIP"], "None");

    // TLS by default: the cluster's CA, each node's certificate and the administrator's, in
    // Secrets owned by the cluster; a node's passes the node's own checks of its files.
    for what in ["secret/shop-ca", "secret/shop-0-tls", "secret/shop-1-tls", "secret/shop-2-tls", "secret/shop-admin-tls"] {
        let secret = wait_for(&api, what, |_| true);
        assert_eq!(secret["type"], "kubernetes.io/tls", "{what}");
        assert_eq!(secret["metadata"]["ownerReferences"][0]["uid"], uid.as_str(), "{what}");
    }
    let files = tempfile::tempdir().unwrap();
    let file = |secret: &str, key: &str| {
        let template = format!("go-template={{{{index .data \"{key}\" | base64decode}}}}");
        let path = files.path().join(format!("{secret}-{key}"));
        std::fs::write(&path, api.kubectl(&["get", "secret", secret, "-o", &template]).unwrap()).unwrap();
        path
    };
    let node_files = anthill_node::config::TlsConfig {
        cert_file: file("shop-1-tls", "tls.crt"),
        key_file: file("shop-1-tls", "tls.key"),
        ca_file: file("shop-1-tls", "ca.crt"),
        reload_interval_ms: 2000,
    };
    let names = ["shop-0", "shop-1", "shop-2"].map(String::from);
    if let Err(e) = anthill_node::security::tls::Material::check(&node_files, "shop-1", &names) {
        panic!("the node would refuse the certificate the operator issued: {e}");
    }
    let set = get(&api, "statefulset/shop").unwrap();
    assert!(set.to_string().contains("/etc/anthill/tls/$(POD_NAME)/tls.crt"), "{set}");
    // The mode is the cluster's for good: a spec asking for another is reported and changes
    // nothing, until it goes back.
    api.kubectl(&["patch", "anthillcluster/shop", "--type=merge", "-p", r#"{"spec":{"tls":{"mode":"Disabled"}}}"#]).unwrap();
    let fixed = wait_for(&api, "anthillcluster/shop", |c| condition(c, "Degraded").is_some_and(|d| d["reason"] == "TlsModeFixed"));
    assert_eq!(fixed["status"]["tlsMode"], "Operator");
    std::thread::sleep(Duration::from_secs(2));
    assert!(get(&api, "statefulset/shop").unwrap().to_string().contains("--tls-cert-file"), "switched to plain text");
    api.kubectl(&["patch", "anthillcluster/shop", "--type=merge", "-p", r#"{"spec":{"tls":null}}"#]).unwrap();
    wait_for(&api, "anthillcluster/shop", |c| condition(c, "Degraded").is_some_and(|d| d["status"] == "False"));
    assert!(get(&api, "statefulset/shop").unwrap().to_string().contains("--tls-cert-file"), "still TLS");

    // The status: no pod runs here, so nothing is ready and the cluster is still coming up.
    let cluster = wait_for(&api, "anthillcluster/shop", |c| c["status"]["observedGeneration"] == c["metadata"]["generation"]);
    assert_eq!(cluster["status"]["clusterId"], uid.as_str());
    assert_eq!(
        cluster["status"]["selector"],
        "app.kubernetes.io/component=node,app.kubernetes.io/instance=shop,app.kubernetes.io/name=anthill"
    );
    assert_eq!(condition(&cluster, "Available").unwrap()["status"], "False", "{cluster:#}");
    assert_eq!(condition(&cluster, "Progressing").unwrap()["status"], "True", "{cluster:#}");
    assert_eq!(condition(&cluster, "ReconciliationPaused").unwrap()["status"], "False", "{cluster:#}");
    let available_since = condition(&cluster, "Available").unwrap()["lastTransitionTime"].clone();

    // Paused: a scale changes nothing until it is unpaused.
    api.kubectl(&["patch", "anthillcluster/shop", "--type=merge", "-p", r#"{"spec":{"paused":true}}"#]).unwrap();
    wait_for(&api, "anthillcluster/shop", |c| condition(c, "ReconciliationPaused").is_some_and(|c| c["status"] == "True"));
    api.kubectl(&["scale", "anthillcluster/shop", "--replicas=5"]).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(get(&api, "statefulset/shop").unwrap()["spec"]["replicas"], 3, "a paused cluster changed");
    api.kubectl(&["patch", "anthillcluster/shop", "--type=merge", "-p", r#"{"spec":{"paused":false}}"#]).unwrap();
    // The members follow at once; the pods only once the three there run the template that
    // lists the new ones (a node must know a member to replicate to it). No pod runs here, so
    // the StatefulSet keeps its three.
    let grown = wait_for(&api, "configmap/shop-config", |c| members(c) == 5);
    let founders: Value =
        serde_yaml::from_str::<Value>(grown["data"]["node.yaml"].as_str().unwrap()).unwrap()["cluster"]["founders"].clone();
    assert_eq!(founders, serde_json::json!(["shop-0", "shop-1", "shop-2"]), "the new pods join; the first three founded it");
    // Their certificates are there before any pod lists them.
    wait_for(&api, "secret/shop-4-tls", |s| s["type"] == "kubernetes.io/tls");
    let scaling = wait_for(&api, "anthillcluster/shop", |c| {
        c["status"]["founders"] == 3 && c["status"]["observedGeneration"] == c["metadata"]["generation"]
    });
    assert_eq!(condition(&scaling, "Progressing").unwrap()["status"], "True", "{scaling:#}");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(get(&api, "statefulset/shop").unwrap()["spec"]["replicas"], 3, "pods were added before the others listed them");
    // Back to 3 before anything was added: the members are three again.
    api.kubectl(&["scale", "anthillcluster/shop", "--replicas=3"]).unwrap();
    wait_for(&api, "configmap/shop-config", |c| members(c) == 3);
    let cluster = wait_for(&api, "anthillcluster/shop", |c| condition(c, "ReconciliationPaused").is_some_and(|c| c["status"] == "False"));
    assert_eq!(condition(&cluster, "Available").unwrap()["lastTransitionTime"], available_since, "Available did not flip");

    // A configuration the node would refuse changes nothing, and says why.
    api.kubectl(&["patch", "anthillcluster/shop", "--type=merge", "-p", r#"{"spec":{"config":{"cluster":{"session_ttl_ms":5}}}}"#])
        .unwrap();
    let degraded = wait_for(&api, "anthillcluster/shop", |c| condition(c, "Degraded").is_some_and(|c| c["status"] == "True"));
    let why = &condition(&degraded, "Degraded").unwrap();
    assert_eq!(why["reason"], "InvalidConfig");
    assert!(why["message"].as_str().unwrap().contains("cluster.session_ttl_ms"), "{why}");
    // … and tells it in an event on the cluster.
    let events = wait_for(&api, "events", |e| {
        e["items"].as_array().into_iter().flatten().any(|e| e["reason"] == "InvalidConfig" && e["involvedObject"]["name"] == "shop")
    });
    let event = events["items"].as_array().unwrap().iter().find(|e| e["reason"] == "InvalidConfig").unwrap().clone();
    assert_eq!(event["type"], "Warning");
    assert!(event["message"].as_str().unwrap().contains("cluster.session_ttl_ms"), "{event}");
    // … and in its metrics.
    let text = metrics();
    for line in [
        "anthill_operator_cluster_condition{namespace=\"default\",cluster=\"shop\",type=\"Degraded\"} 1",
        "anthill_operator_events_total{reason=\"InvalidConfig\"}",
        "anthill_operator_reconciles_total{outcome=\"ok\"}",
    ] {
        assert!(text.contains(line), "{line} missing from the operator's metrics:\n{text}");
    }
    let hash = |s: &Value| s["spec"]["template"]["metadata"]["annotations"]["anthill.io/config-hash"].clone();
    let before = hash(&get(&api, "statefulset/shop").unwrap());
    api.kubectl(&["patch", "anthillcluster/shop", "--type=merge", "-p", r#"{"spec":{"config":{"cluster":{"session_ttl_ms":3000}}}}"#])
        .unwrap();
    wait_for(&api, "anthillcluster/shop", |c| condition(c, "Degraded").is_some_and(|c| c["status"] == "False"));
    let after = wait_for(&api, "statefulset/shop", |s| hash(s) != before);
    assert!(after["spec"]["template"]["metadata"]["annotations"]["anthill.io/config-hash"].is_string());
    assert!(get(&api, "configmap/shop-config").unwrap()["data"]["node.yaml"].as_str().unwrap().contains("session_ttl_ms: 3000"));

    // A cluster on Consul: a new token in its Secret changes the template (the nodes read their
    // token at start, so the pods must roll).
    api.kubectl_stdin(&["create"], "apiVersion: v1\nkind: Secret\nmetadata:\n  name: consul-acl\nstringData:\n  token: first\n").unwrap();
    let ledger = CLUSTER.replace("name: shop", "name: ledger")
        + "  coordination:\n    store: Consul\n    consul:\n      address: http://consul:8500\n      tokenSecretRef:\n        name: consul-acl\n        key: token\n";
    api.kubectl_stdin(&["create"], &ledger).expect("the Consul cluster is created");
    let token_hash = |s: &Value| s["spec"]["template"]["metadata"]["annotations"]["anthill.io/consul-token-hash"].clone();
    let first = token_hash(&wait_for(&api, "statefulset/ledger", |s| token_hash(s).is_string()));
    api.kubectl(&["patch", "secret/consul-acl", "--type=merge", "-p", r#"{"stringData":{"token":"second"}}"#]).unwrap();
    let second = token_hash(&wait_for(&api, "statefulset/ledger", |s| token_hash(s).is_string() && token_hash(s) != first));
    assert!(!second.as_str().unwrap().contains("second"), "the token itself is not in the template");

    // `deleteKeysOnRemoval`: a finalizer stops the cluster's pods and deletes its keys in a real
    // Consul (ACLs on, the nodes' least-privilege token) before the resource goes; the keys of
    // another cluster stay.
    let consul = LocalConsul::start(&anthill_e2e::tool("consul"), 1).unwrap();
    let prefix = "anthill/default/orders/";
    let token = consul.token_with("orders", &anthill_policy(prefix)).unwrap();
    for key in [format!("{prefix}members/orders-0"), format!("{prefix}placement/3"), "anthill/default/other/members/x".into()] {
        consul.consul_cli(&["kv", "put", &key, "x"]).unwrap();
    }
    let secret = format!("apiVersion: v1\nkind: Secret\nmetadata:\n  name: consul-orders\nstringData:\n  token: {token}\n");
    api.kubectl_stdin(&["create"], &secret).unwrap();
    let orders = CLUSTER.replace("name: shop", "name: orders")
        + &format!(
            "  coordination:\n    store: Consul\n    consul:\n      address: {}\n      deleteKeysOnRemoval: true\n      tokenSecretRef:\n        name: consul-orders\n        key: token\n",
            consul.http_address(0)
        );
    api.kubectl_stdin(&["create"], &orders).unwrap();
    wait_for(&api, "anthillcluster/orders", |c| c["metadata"]["finalizers"] == serde_json::json!(["anthill.io/consul-keys"]));
    wait_for(&api, "statefulset/orders", |_| true);
    // Deleted the way the chart's pre-delete hook does (`helm uninstall` would otherwise remove
    // the operator first), which returns once the cluster is gone.
    let deleted = delete_cluster(&api, "orders", "60s").unwrap_or_else(|e| {
        let log = std::fs::read_to_string(std::env::temp_dir().join("anthill-operator-e2e.log")).unwrap_or_default();
        panic!("the cluster was never let go: {e}\n{log}")
    });
    assert!(deleted.contains("deleting AnthillCluster default/orders") && deleted.contains("is gone"), "{deleted}");
    assert!(get(&api, "anthillcluster/orders").is_none());
    let left = consul.consul_cli(&["kv", "get", "-recurse", "anthill/"]).unwrap();
    assert_eq!(left.trim(), "anthill/default/other/members/x:x", "only the other cluster's keys stay");
    assert_eq!(get(&api, "statefulset/orders").unwrap()["spec"]["replicas"], 0, "its pods were stopped first");

    // With no operator to let it go, the hook gives up at its timeout and names what holds the
    // cluster; a cluster already gone is done.
    drop(operator);
    let held = CLUSTER.replace("name: shop", "name: held\n  finalizers: [anthill.io/consul-keys]");
    api.kubectl_stdin(&["create"], &held).unwrap();
    let refused = delete_cluster(&api, "held", "3s").expect_err("nothing lets the cluster go");
    assert!(refused.contains("still there after 3 s") && refused.contains("anthill.io/consul-keys"), "{refused}");
    assert!(refused.contains("Is the operator running?"), "{refused}");
    let gone = delete_cluster(&api, "orders", "3s").unwrap();
    assert!(gone.contains("not there: nothing to delete"), "{gone}");
}

/// `anthill-operator delete-cluster NAME --timeout T` in namespace `default`: its output.
fn delete_cluster(api: &ApiServer, name: &str, timeout: &str) -> Result<String, String> {
    let out = Command::new(anthill_e2e::operator())
        .args(["delete-cluster", name, "--namespace", "default", "--timeout", timeout])
        .env("KUBECONFIG", &api.kubeconfig)
        .output()
        .unwrap();
    anthill_e2e::output("anthill-operator delete-cluster", out)
}
