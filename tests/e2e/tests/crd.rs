//! The `AnthillCluster` CRD as the chart commits it (`charts/anthill/crds/`, generated from
//! operator/src/crd.rs), installed into a real Kubernetes API server: it becomes established,
//! takes a good cluster with its defaults filled in, scales through the scale subresource, and
//! its CEL rules refuse, at `kubectl apply` time and with their messages, what the operator
//! could not honour.

use anthill_e2e::kube::ApiServer;

/// `kubectl <verb> -f -` with `manifest` on stdin.
fn kubectl_stdin(api: &ApiServer, verb: &[&str], manifest: &str) -> Result<String, String> {
    api.kubectl_stdin(verb, manifest)
}

/// An AnthillCluster named `name` with `spec` (YAML, indented by four spaces).
fn cluster(name: &str, spec: &str) -> String {
    format!("apiVersion: anthill.io/v1alpha1\nkind: AnthillCluster\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n{spec}")
}

const GOOD: &str = "    replicas: 3\n    version: 0.2.0\n    storage:\n      size: 10Gi\n      storageClassName: fast\n";

fn installed() -> ApiServer {
    ApiServer::with_crd()
}

#[test]
fn the_crd_installs_takes_a_good_cluster_with_its_defaults_and_scales_through_the_scale_subresource() {
    let api = installed();
    kubectl_stdin(&api, &["create"], &cluster("orders", GOOD)).expect("a good cluster is taken");
    let spec = api.kubectl(&["get", "anthillcluster", "orders", "-o", "jsonpath={.spec}"]).unwrap();
    let spec: serde_json::Value = serde_json::from_str(&spec).unwrap();
    assert_eq!(spec["partitions"], 16, "{spec}");
    assert_eq!(spec["replicationFactor"], 3, "{spec}");
    assert_eq!(spec["image"], "anthill", "{spec}");
    assert_eq!(spec["coordination"]["store"], "Embedded", "{spec}");
    assert_eq!(spec["storage"]["reclaimPolicy"], "Retain", "{spec}");
    api.kubectl(&["scale", "anthillcluster/orders", "--replicas=5"]).expect("the scale subresource");
    assert_eq!(api.kubectl(&["get", "anthillcluster", "orders", "-o", "jsonpath={.spec.replicas}"]).unwrap(), "5");
    // The short name and the printer columns.
    let table = api.kubectl(&["get", "anthill"]).unwrap();
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["NAME", "REPLICAS", "READY", "VERSION", "AVAILABLE", "AGE"], "{table}");
    assert!(table.lines().nth(1).is_some_and(|row| row.starts_with("orders") && row.split_whitespace().nth(1) == Some("5")), "{table}");
}

#[test]
fn the_cel_rules_refuse_bad_clusters_and_bad_changes_with_their_messages() {
    let api = installed();
    for (spec, message) in [
        ("    replicas: 2\n    version: 0.2.0\n    storage: {size: 10Gi}\n", "spec.replicas must be at least spec.replicationFactor"),
        ("    replicas: 3\n    version: latest\n    storage: {size: 10Gi}\n", "version must be MAJOR.MINOR.PATCH"),
        ("    replicas: 3\n    version: 0.2.0\n    storage: {size: ten}\n", "storage.size must be a quantity"),
        ("    replicas: 3\n    version: 0.2.0\n    storage: {size: '0'}\n", "storage.size must be a quantity above 0"),
        ("    replicas: 3\n    version: 1.2.3456789012\n    storage: {size: 10Gi}\n", "at most 9 digits each"),
        (
            "    replicas: 5\n    version: 0.2.0\n    storage: {size: 10Gi}\n    disruptionBudget: {maxUnavailable: 2}\n",
            "maxUnavailable must be at most (replicationFactor - 1) / 2",
        ),
        (
            "    replicas: 3\n    version: 0.2.0\n    storage: {size: 10Gi}\n    coordination: {store: Consul}\n",
            "coordination.store Consul needs coordination.consul",
        ),
    ] {
        let refused = kubectl_stdin(&api, &["create"], &cluster("bad", spec)).expect_err(spec);
        assert!(refused.contains(message), "{spec}: {refused}");
    }
    let long = "a".repeat(41);
    let refused = kubectl_stdin(&api, &["create"], &cluster(&long, GOOD)).expect_err("a 41-character name");
    assert!(refused.contains("metadata.name must be at most 40 characters"), "{refused}");
    // Five copies of each partition: two may go at once.
    let five = "    replicas: 5\n    replicationFactor: 5\n    version: 0.2.0\n    storage: {size: 10Gi}\n    disruptionBudget: {maxUnavailable: 2}\n";
    kubectl_stdin(&api, &["create"], &cluster("five", five)).expect("two of five copies may go at once");
    // The coordination store and the Consul key prefix stay as created.
    let consul = |prefix: &str| {
        format!(
            "{GOOD}    coordination:\n      store: Consul\n      consul:\n        address: http://consul:8500\n        tokenSecretRef: {{name: acl, key: token}}\n{prefix}"
        )
    };
    kubectl_stdin(&api, &["apply", "--server-side"], &cluster("billing", &consul(""))).expect("a Consul cluster");
    let refused = kubectl_stdin(&api, &["apply", "--server-side"], &cluster("billing", &consul("        keyPrefix: other/\n")))
        .expect_err("a new prefix");
    assert!(refused.contains("keyPrefix cannot change"), "{refused}");
    let refused = kubectl_stdin(&api, &["apply", "--server-side"], &cluster("billing", GOOD)).expect_err("back to the embedded store");
    assert!(refused.contains("coordination.store cannot change"), "{refused}");

    kubectl_stdin(&api, &["apply", "--server-side"], &cluster("orders", GOOD)).expect("a good cluster is taken");
    let change = |from: &str, to: &str| GOOD.replace(from, to);
    for (spec, message) in [
        (format!("{GOOD}    partitions: 32\n"), "partitions cannot change after the cluster is created"),
        (format!("{GOOD}    replicationFactor: 1\n"), "replicationFactor cannot change after the cluster is created"),
        (change("size: 10Gi", "size: 5Gi"), "storage.size can only grow"),
        (change("storageClassName: fast", "storageClassName: slow"), "storage.storageClassName cannot change"),
        (change("      storageClassName: fast\n", ""), "storage.storageClassName cannot change"),
        (change("version: 0.2.0", "version: 0.1.9"), "version cannot go down"),
        (change("version: 0.2.0", "version: 0.1.10"), "version cannot go down"),
    ] {
        let refused = kubectl_stdin(&api, &["apply", "--server-side"], &cluster("orders", &spec)).expect_err(&spec);
        assert!(refused.contains(message), "{spec}: {refused}");
    }
    // What may change does: storage grows, the version goes up (compared as numbers: 0.10.0
    // is after 0.2.0), replicas change.
    let grown = change("size: 10Gi", "size: 20Gi").replace("version: 0.2.0", "version: 0.10.0").replace("replicas: 3", "replicas: 4");
    kubectl_stdin(&api, &["apply", "--server-side"], &cluster("orders", &grown)).expect("growing storage, a newer version, more replicas");
    let spec =
        api.kubectl(&["get", "anthillcluster", "orders", "-o", "jsonpath={.spec.storage.size} {.spec.version} {.spec.replicas}"]).unwrap();
    assert_eq!(spec, "20Gi 0.10.0 4");
}
