//! What an `AnthillCluster` becomes: the objects the controller keeps (server-side applied,
//! each owned by the cluster resource). Pure functions of the resource, so they are tested
//! without an API server.
//!
//! For a cluster `c` in namespace `ns`:
//! - ConfigMap `c-config`: `node.yaml`, the nodes' configuration ([`node_config`]); every pod
//!   reads the same file and gets its own `node_id` from its pod name (`--node-id`);
//! - Service `c-nodes`: headless, publishing not-ready pods too, so that each pod has a stable
//!   DNS name (`c-3.c-nodes.ns.svc`) the others reach it by while the cluster forms;
//! - Service `c`: the clients' address (gRPC 7400, metrics 7401);
//! - StatefulSet `c`: `replicas` pods started in parallel (a majority of the embedded store's
//!   founders must be up before any is ready), `updateStrategy: OnDelete` (the operator decides
//!   the order of restarts, draining each node first), one volume claim per pod;
//! - PodDisruptionBudget `c`: none below 2 replicas.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};

use crate::crd::{AnthillCluster, AntiAffinity, ReclaimPolicy, Store, TlsMode};

/// The nodes' gRPC and metrics ports.
pub const GRPC_PORT: u16 = 7400;
pub const METRICS_PORT: u16 = 7401;
/// Where a pod mounts its configuration, its volume and the Consul token.
const CONFIG_DIR: &str = "/etc/anthill";
const DATA_DIR: &str = "/var/lib/anthill";
const CONSUL_TOKEN_DIR: &str = "/etc/anthill/consul";
/// Every node's certificate Secret, one directory per pod (`<pod>/tls.crt`, `tls.key`,
/// `ca.crt`); each node reads its own (`--tls-*-file` with its pod name).
const TLS_DIR: &str = "/etc/anthill/tls";
/// The administrator's client certificate, which `anthill` run in the pod uses
/// (`ANTHILL_TLS_*`).
const ADMIN_TLS_DIR: &str = "/etc/anthill/admin";
/// The key-encryption keys: `key`, then `previous-<i>`.
const ENCRYPTION_DIR: &str = "/etc/anthill/encryption";
/// Secret files readable by their owner and the pod's group (fsGroup) only.
const SECRET_FILE_MODE: i32 = 0o440;
/// The field manager of the controller's server-side applies.
pub const MANAGER: &str = "anthill-operator";
/// The pod template's annotation holding a hash of the nodes' configuration: a change of the
/// configuration changes the template, which the operator then rolls out.
pub const CONFIG_HASH: &str = "anthill.io/config-hash";
/// The pod template's hash of the Consul ACL token: the node reads its token once, at start, so
/// a new token in the Secret must restart the pods (rolled like any change of template).
pub const CONSUL_TOKEN_HASH: &str = "anthill.io/consul-token-hash";
/// Grace before a pod's node is killed: its drain (`cluster.drain_on_stop_ms`, 10 s) plus the
/// node's shutdown grace (5 s), with room to spare.
const TERMINATION_GRACE_S: i64 = 30;

/// The labels on every object of cluster `name`, its node pods included.
pub fn labels(name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), "anthill".to_string()),
        ("app.kubernetes.io/instance".to_string(), name.to_string()),
        ("app.kubernetes.io/component".to_string(), "node".to_string()),
        ("app.kubernetes.io/managed-by".to_string(), MANAGER.to_string()),
    ])
}

/// The label selector of the cluster's node pods (its Services, its disruption budget, the
/// operator's pod lists and the scale subresource): name, instance and component, so no other
/// pod of a release named like the cluster (the chart's operator, a test pod) is counted.
pub fn selector(name: &str) -> BTreeMap<String, String> {
    labels(name).into_iter().filter(|(k, _)| k != "app.kubernetes.io/managed-by").collect()
}

/// The StatefulSet's own selector and the pods' anti-affinity term: name and instance only, as
/// the first StatefulSets were made (a StatefulSet's selector cannot change, and the term is in
/// the pod template, which would roll every pod).
pub fn stateful_set_selector(name: &str) -> BTreeMap<String, String> {
    labels(name).into_iter().filter(|(k, _)| k == "app.kubernetes.io/name" || k == "app.kubernetes.io/instance").collect()
}

/// `selector` as a label query (`a=b,c=d`), as the scale subresource reports it.
pub fn selector_query(name: &str) -> String {
    selector(name).iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

pub fn headless_service_name(name: &str) -> String {
    format!("{name}-nodes")
}

pub fn config_map_name(name: &str) -> String {
    format!("{name}-config")
}

/// Node `ordinal`'s member name (its pod's name) and its stable address.
pub fn member(cluster: &AnthillCluster, ordinal: i32) -> (String, String) {
    let name = cluster.name_any();
    let namespace = cluster.namespace().unwrap_or_else(|| "default".into());
    let pod = format!("{name}-{ordinal}");
    let address = format!("{pod}.{}.{namespace}.svc:{GRPC_PORT}", headless_service_name(&name));
    (pod, address)
}

/// The cluster's key prefix in Consul: the spec's, or `anthill/<namespace>/<name>/`, so that
/// clusters sharing a Consul never share keys.
pub fn key_prefix(cluster: &AnthillCluster) -> String {
    let given = cluster.spec.coordination.consul.as_ref().and_then(|c| c.key_prefix.clone());
    given.unwrap_or_else(|| format!("anthill/{}/{}/", cluster.namespace().unwrap_or_else(|| "default".into()), cluster.name_any()))
}

/// Why the nodes' configuration cannot be made.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("spec.config must be a mapping of the node's configuration fields")]
    NotAMapping,
    #[error("spec.config sets {0}, which the operator owns (from the spec and the pods)")]
    Owned(String),
    #[error("spec.config: {0}")]
    Invalid(String),
}

/// Fields of the node's configuration the operator sets from the spec and the pods; a
/// `spec.config` that sets one is refused rather than silently overridden.
const OWNED: &[&str] = &[
    "node_id",
    "data_dir",
    "listen_addr",
    "metrics_addr",
    "storage.partitions",
    "cluster.members",
    "cluster.founders",
    "cluster.join",
    "cluster.replication_factor",
    "cluster.coordination",
    "tls",
    "encryption",
];

/// The transport security of `cluster`: as recorded in its status (the controller records
/// [`decide_tls_mode`] before anything is made), else as its spec asks, else `Operator`.
pub fn tls_mode(cluster: &AnthillCluster) -> TlsMode {
    let recorded = cluster.status.as_ref().and_then(|s| s.tls_mode);
    recorded.or(cluster.spec.tls.as_ref().map(|t| t.mode)).unwrap_or(TlsMode::Operator)
}

/// The transport security the cluster has for good: as recorded; else, for a cluster whose
/// StatefulSet exists (made before the mode was recorded, or its record lost), what its pods
/// run: no TLS flags, `Disabled` whatever the spec says (switching would cut replication);
/// else the spec's, or `Operator` for a new cluster.
pub fn decide_tls_mode(cluster: &AnthillCluster, existing: Option<&StatefulSet>) -> TlsMode {
    if let Some(mode) = cluster.status.as_ref().and_then(|s| s.tls_mode) {
        return mode;
    }
    let asked = cluster.spec.tls.as_ref().map(|t| t.mode);
    let Some(set) = existing else { return asked.unwrap_or(TlsMode::Operator) };
    let runs_tls = set
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .is_some_and(|pod| pod.containers.iter().any(|c| c.args.iter().flatten().any(|a| a == "--tls-cert-file")));
    match (runs_tls, asked) {
        (false, _) => TlsMode::Disabled,
        (true, Some(mode)) if mode != TlsMode::Disabled => mode,
        (true, _) => TlsMode::Operator,
    }
}

/// How many pods the cluster has now and how many founded it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// The StatefulSet's replicas and the members every node lists: `spec.replicas`, or more
    /// while a scale-down takes the highest ordinals out one at a time (`crate::scale`).
    pub pods: i32,
    /// The pods that founded the cluster (`status.founders`): ordinals below it. The others
    /// join a running cluster (`cluster.founders` in the node's configuration).
    pub founders: i32,
}

impl Shape {
    /// A cluster as its spec asks, founded by that many pods.
    pub fn of(cluster: &AnthillCluster) -> Shape {
        Shape { pods: cluster.spec.replicas, founders: cluster.spec.replicas }
    }
}

/// The nodes' `node.yaml`: what the spec says (partitions, members by their stable DNS names,
/// the founders, replication factor, coordination), `spec.config` merged over the rest, checked
/// by the node's own configuration rules (`anthill_node::config`). `node_id` is each pod's
/// name, given as a flag.
pub fn node_config(cluster: &AnthillCluster, shape: Shape) -> Result<String, ConfigError> {
    let spec = &cluster.spec;
    let members: Vec<Value> = (0..shape.pods)
        .map(|i| {
            let (name, address) = member(cluster, i);
            json!({ "id": i + 1, "name": name, "address": address })
        })
        .collect();
    let founders: Vec<String> = (0..shape.founders).map(|i| member(cluster, i).0).collect();
    let mut config = json!({
        "data_dir": DATA_DIR,
        "listen_addr": format!("0.0.0.0:{GRPC_PORT}"),
        "metrics_addr": format!("0.0.0.0:{METRICS_PORT}"),
        "storage": { "partitions": spec.partitions },
        "cluster": { "members": members, "replication_factor": spec.replication_factor },
    });
    // Only once the cluster grew past them: an empty list means every member founded it, and a
    // node older than `cluster.founders` refuses the field.
    if shape.pods > shape.founders {
        config["cluster"]["founders"] = json!(founders);
    }
    if let Some(consul) = spec.coordination.consul.as_ref().filter(|_| spec.coordination.store == Store::Consul) {
        config["cluster"]["coordination"] = json!({
            "kind": "consul",
            "address": consul.address,
            "token_file": format!("{CONSUL_TOKEN_DIR}/token"),
            "key_prefix": key_prefix(cluster),
        });
        config["cluster"]["session_ttl_ms"] = json!(consul.session_ttl_ms);
    }
    if let Some(overrides) = &spec.config {
        let Value::Object(overrides) = overrides else { return Err(ConfigError::NotAMapping) };
        for path in OWNED {
            let mut at = Some(&Value::Object(overrides.clone()));
            for part in path.split('.') {
                at = at.and_then(|v| v.get(part));
            }
            if at.is_some() {
                return Err(ConfigError::Owned((*path).into()));
            }
        }
        merge(&mut config, &Value::Object(overrides.clone()));
    }
    // With TLS the nodes know who calls: the operator (and `anthill` in a pod) is `admin`, a
    // cluster administrator whatever else the list holds. The files come as flags, per pod.
    if tls_mode(cluster) != TlsMode::Disabled {
        let auth = config.as_object_mut().expect("a mapping").entry("auth").or_insert(json!({}));
        let Value::Object(auth) = auth else { return Err(ConfigError::Invalid("auth must be a mapping".into())) };
        let admins = auth.entry("cluster_admins").or_insert(json!([]));
        let Value::Array(list) = admins else {
            return Err(ConfigError::Invalid("auth.cluster_admins must be a list of principals".into()));
        };
        if !list.iter().any(|a| a == crate::certs::ADMIN) {
            list.push(json!(crate::certs::ADMIN));
        }
    }
    if let Some(encryption) = &spec.encryption {
        let previous: Vec<String> =
            (0..encryption.previous_key_secret_refs.len()).map(|i| format!("{ENCRYPTION_DIR}/previous-{i}")).collect();
        config["encryption"] = json!({ "key_file": format!("{ENCRYPTION_DIR}/key"), "previous_key_files": previous });
    }
    // The node's own rules, with the first member as the node (each pod is one of them).
    let mut check = config.clone();
    check["node_id"] = json!(member(cluster, 0).0);
    let parsed: anthill_node::config::NodeConfig = serde_json::from_value(check).map_err(|e| ConfigError::Invalid(e.to_string()))?;
    parsed.validate().map_err(|e| ConfigError::Invalid(e.to_string()))?;
    Ok(serde_yaml::to_string(&config).expect("JSON values serialize as YAML"))
}

/// `overrides` merged into `base`: mappings key by key, anything else replaced.
fn merge(base: &mut Value, overrides: &Value) {
    match (base, overrides) {
        (Value::Object(base), Value::Object(overrides)) => {
            for (k, v) in overrides {
                merge(base.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (base, overrides) => *base = overrides.clone(),
    }
}

/// A short stable hash of the configuration (FNV-1a, hex), for [`CONFIG_HASH`].
pub fn config_hash(config: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in config.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Metadata of an object of the cluster: its name, namespace, labels, and the cluster as its
/// controlling owner (deleted with it by the garbage collector).
fn metadata(cluster: &AnthillCluster, name: String) -> Value {
    let owner = cluster.controller_owner_ref(&()).expect("a cluster read from the API server has a uid");
    json!({
        "name": name,
        "namespace": cluster.namespace(),
        "labels": labels(&cluster.name_any()),
        "ownerReferences": [owner],
    })
}

pub fn config_map(cluster: &AnthillCluster, config: &str) -> ConfigMap {
    let value = json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": metadata(cluster, config_map_name(&cluster.name_any())),
        "data": { "node.yaml": config },
    });
    serde_json::from_value(value).expect("a ConfigMap")
}

pub fn headless_service(cluster: &AnthillCluster) -> Service {
    let name = cluster.name_any();
    let value = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": metadata(cluster, headless_service_name(&name)),
        "spec": {
            "clusterIP": "None",
            // The nodes find each other before any is ready (readiness needs the cluster formed).
            "publishNotReadyAddresses": true,
            "selector": selector(&name),
            "ports": [{ "name": "grpc", "port": GRPC_PORT, "targetPort": "grpc" }],
        },
    });
    serde_json::from_value(value).expect("a Service")
}

pub fn client_service(cluster: &AnthillCluster) -> Service {
    let name = cluster.name_any();
    let value = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": metadata(cluster, name.clone()),
        "spec": {
            "type": "ClusterIP",
            "selector": selector(&name),
            "ports": [
                { "name": "grpc", "port": GRPC_PORT, "targetPort": "grpc" },
                { "name": "metrics", "port": METRICS_PORT, "targetPort": "metrics" },
            ],
        },
    });
    serde_json::from_value(value).expect("a Service")
}

fn affinity(cluster: &AnthillCluster) -> Value {
    let term =
        json!({ "labelSelector": { "matchLabels": stateful_set_selector(&cluster.name_any()) }, "topologyKey": "kubernetes.io/hostname" });
    match cluster.spec.placement.anti_affinity {
        AntiAffinity::None => Value::Null,
        AntiAffinity::Preferred => json!({ "podAntiAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [{ "weight": 100, "podAffinityTerm": term }],
        }}),
        AntiAffinity::Required => json!({ "podAntiAffinity": { "requiredDuringSchedulingIgnoredDuringExecution": [term] } }),
    }
}

/// The StatefulSet of `pods` pods running `config`, with `token_hash` ([`config_hash`] of the
/// Consul token) when the cluster uses Consul and its Secret was read.
pub fn stateful_set(cluster: &AnthillCluster, config: &str, pods: i32, token_hash: Option<&str>) -> StatefulSet {
    let name = cluster.name_any();
    let spec = &cluster.spec;
    let retention = match spec.storage.reclaim_policy {
        ReclaimPolicy::Retain => "Retain",
        ReclaimPolicy::Delete => "Delete",
    };
    let mut volumes = vec![json!({ "name": "config", "configMap": { "name": config_map_name(&name) } })];
    let mut mounts =
        vec![json!({ "name": "config", "mountPath": CONFIG_DIR, "readOnly": true }), json!({ "name": "data", "mountPath": DATA_DIR })];
    if let Some(consul) = spec.coordination.consul.as_ref().filter(|_| spec.coordination.store == Store::Consul) {
        let secret = &consul.token_secret_ref;
        volumes.push(json!({ "name": "consul-token", "secret": {
            "secretName": secret.name, "items": [{ "key": secret.key, "path": "token" }],
        }}));
        mounts.push(json!({ "name": "consul-token", "mountPath": CONSUL_TOKEN_DIR, "readOnly": true }));
    }
    // Ready once the node serves: gRPC health (`tonic-health`, the EventLog service); with TLS,
    // `/ready` on the metrics port (plain HTTP: the kubelet's gRPC probe cannot speak TLS; 503
    // after a storage failure, as the gRPC health says NOT_SERVING).
    let mut readiness = json!({ "grpc": { "port": GRPC_PORT }, "periodSeconds": 2, "failureThreshold": 3 });
    let mut args =
        vec![json!("node"), json!("--config"), json!(format!("{CONFIG_DIR}/node.yaml")), json!("--node-id"), json!("$(POD_NAME)")];
    let mut env = vec![json!({ "name": "POD_NAME", "valueFrom": { "fieldRef": { "fieldPath": "metadata.name" } } })];
    if tls_mode(cluster) != TlsMode::Disabled {
        readiness = json!({ "httpGet": { "path": "/ready", "port": "metrics" }, "periodSeconds": 2, "failureThreshold": 3 });
        // Every member's Secret, as the config lists them (a pod template is the same for all
        // pods, so each pod gets every directory and reads its own; a projected Secret, unlike
        // a subPath, follows renewals).
        let members = pods.max(spec.replicas);
        let sources: Vec<Value> = (0..members)
            .map(|i| {
                let pod = member(cluster, i).0;
                let items: Vec<Value> =
                    ["tls.crt", "tls.key", "ca.crt"].iter().map(|k| json!({ "key": k, "path": format!("{pod}/{k}") })).collect();
                json!({ "secret": { "name": crate::certs::node_secret_name(&name, i), "items": items } })
            })
            .collect();
        volumes.push(json!({ "name": "tls", "projected": { "sources": sources, "defaultMode": SECRET_FILE_MODE } }));
        mounts.push(json!({ "name": "tls", "mountPath": TLS_DIR, "readOnly": true }));
        for (flag, file) in [("--tls-cert-file", "tls.crt"), ("--tls-key-file", "tls.key"), ("--tls-ca-file", "ca.crt")] {
            args.push(json!(flag));
            args.push(json!(format!("{TLS_DIR}/$(POD_NAME)/{file}")));
        }
        volumes.push(json!({ "name": "admin-tls", "secret": {
            "secretName": crate::certs::admin_secret_name(&name), "defaultMode": SECRET_FILE_MODE,
        }}));
        mounts.push(json!({ "name": "admin-tls", "mountPath": ADMIN_TLS_DIR, "readOnly": true }));
        for (var, file) in [("ANTHILL_TLS_CA", "ca.crt"), ("ANTHILL_TLS_CERT", "tls.crt"), ("ANTHILL_TLS_KEY", "tls.key")] {
            env.push(json!({ "name": var, "value": format!("{ADMIN_TLS_DIR}/{file}") }));
        }
    }
    if let Some(encryption) = &spec.encryption {
        let mut sources = vec![json!({ "secret": {
            "name": encryption.key_secret_ref.name, "items": [{ "key": encryption.key_secret_ref.key, "path": "key" }],
        }})];
        for (i, previous) in encryption.previous_key_secret_refs.iter().enumerate() {
            sources
                .push(json!({ "secret": { "name": previous.name, "items": [{ "key": previous.key, "path": format!("previous-{i}") }] } }));
        }
        volumes.push(json!({ "name": "encryption", "projected": { "sources": sources, "defaultMode": SECRET_FILE_MODE } }));
        mounts.push(json!({ "name": "encryption", "mountPath": ENCRYPTION_DIR, "readOnly": true }));
    }
    let mut claim = json!({
        "metadata": { "name": "data", "labels": labels(&name) },
        "spec": { "accessModes": ["ReadWriteOnce"], "resources": { "requests": { "storage": spec.storage.size } } },
    });
    if let Some(class) = &spec.storage.storage_class_name {
        claim["spec"]["storageClassName"] = json!(class);
    }
    let mut pod_spec = json!({
        "terminationGracePeriodSeconds": TERMINATION_GRACE_S,
        "securityContext": { "runAsNonRoot": true, "runAsUser": 65532, "fsGroup": 65532, "seccompProfile": { "type": "RuntimeDefault" } },
        "containers": [{
            "name": "anthill",
            "image": format!("{}:{}", spec.image, spec.version),
            "args": args,
            "env": env,
            "ports": [
                { "name": "grpc", "containerPort": GRPC_PORT },
                { "name": "metrics", "containerPort": METRICS_PORT },
            ],
            "readinessProbe": readiness,
            "volumeMounts": mounts,
            "securityContext": { "allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true, "capabilities": { "drop": ["ALL"] } },
        }],
        "volumes": volumes,
    });
    if let Some(resources) = &spec.resources {
        pod_spec["containers"][0]["resources"] = serde_json::to_value(resources).expect("resources serialize");
    }
    let affinity = affinity(cluster);
    if !affinity.is_null() {
        pod_spec["affinity"] = affinity;
    }
    let placement = &spec.placement;
    if let Some(spread) = &placement.topology_spread_constraints {
        pod_spec["topologySpreadConstraints"] = serde_json::to_value(spread).expect("constraints serialize");
    }
    if let Some(selector) = &placement.node_selector {
        pod_spec["nodeSelector"] = json!(selector);
    }
    if let Some(tolerations) = &placement.tolerations {
        pod_spec["tolerations"] = serde_json::to_value(tolerations).expect("tolerations serialize");
    }
    let mut annotations = json!({ CONFIG_HASH: config_hash(config) });
    if let Some(hash) = token_hash {
        annotations[CONSUL_TOKEN_HASH] = json!(hash);
    }
    let value = json!({
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": metadata(cluster, name.clone()),
        "spec": {
            "replicas": pods,
            "serviceName": headless_service_name(&name),
            "podManagementPolicy": "Parallel",
            "updateStrategy": { "type": "OnDelete" },
            "persistentVolumeClaimRetentionPolicy": { "whenDeleted": retention, "whenScaled": retention },
            "selector": { "matchLabels": stateful_set_selector(&name) },
            "template": {
                "metadata": { "labels": labels(&name), "annotations": annotations },
                "spec": pod_spec,
            },
            "volumeClaimTemplates": [claim],
        },
    });
    serde_json::from_value(value).expect("a StatefulSet")
}

/// The PodDisruptionBudget, or none below 2 replicas (it could only block every eviction).
pub fn disruption_budget(cluster: &AnthillCluster) -> Option<PodDisruptionBudget> {
    if cluster.spec.replicas < 2 {
        return None;
    }
    let name = cluster.name_any();
    let value = json!({
        "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
        "metadata": metadata(cluster, name.clone()),
        // A pod that is not ready is down already: evicting it (the roll replacing a broken
        // pod) takes nothing more away.
        "spec": {
            "maxUnavailable": cluster.spec.disruption_budget.max_unavailable,
            "selector": { "matchLabels": selector(&name) },
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    });
    Some(serde_json::from_value(value).expect("a PodDisruptionBudget"))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::crd::AnthillClusterSpec;

    /// A cluster as the API server would hand it over (with a uid).
    pub(crate) fn cluster(spec: Value) -> AnthillCluster {
        let mut c = AnthillCluster::new("shop", serde_json::from_value::<AnthillClusterSpec>(spec).unwrap());
        c.metadata.namespace = Some("prod".into());
        c.metadata.uid = Some("0a1b2c3d".into());
        c
    }

    fn three() -> AnthillCluster {
        cluster(json!({ "replicas": 3, "version": "0.1.0", "storage": { "size": "10Gi" } }))
    }

    #[test]
    fn the_node_config_names_every_member_by_its_stable_dns_name_and_passes_the_nodes_own_rules() {
        let config: Value = serde_yaml::from_str(&node_config(&three(), Shape::of(&three())).unwrap()).unwrap();
        assert_eq!(config["storage"]["partitions"], 16);
        assert_eq!(config["cluster"]["replication_factor"], 3);
        let members = config["cluster"]["members"].as_array().unwrap();
        assert_eq!(members.len(), 3);
        assert_eq!(members[2], json!({ "id": 3, "name": "shop-2", "address": "shop-2.shop-nodes.prod.svc:7400" }));
        assert!(config.get("node_id").is_none(), "each pod names itself");
    }

    #[test]
    fn a_grown_cluster_lists_every_pod_and_names_its_founders_so_that_the_new_pods_join() {
        let c = three();
        let config: Value = serde_yaml::from_str(&node_config(&c, Shape { pods: 5, founders: 3 }).unwrap()).unwrap();
        assert_eq!(config["cluster"]["members"].as_array().unwrap().len(), 5);
        assert_eq!(config["cluster"]["founders"], json!(["shop-0", "shop-1", "shop-2"]));
        let node: anthill_node::config::NodeConfig = serde_json::from_value(config).unwrap();
        assert!(node.cluster.joins("shop-3") && !node.cluster.joins("shop-2"));
        // As many pods as founders: no list (every member founded it), as before founders existed.
        let config: Value = serde_yaml::from_str(&node_config(&c, Shape { pods: 3, founders: 3 }).unwrap()).unwrap();
        assert!(config["cluster"].get("founders").is_none(), "{config}");
        let set = serde_json::to_value(stateful_set(&c, "x", 5, None)).unwrap();
        assert_eq!(set["spec"]["replicas"], 5);
    }

    #[test]
    fn given_overrides_then_they_merge_and_owned_or_invalid_ones_are_refused_by_name() {
        let mut c = three();
        c.spec.config = Some(json!({ "group_commit": { "max_wait_us": 200 }, "cluster": { "session_ttl_ms": 3000 } }));
        let config: Value = serde_yaml::from_str(&node_config(&c, Shape::of(&c)).unwrap()).unwrap();
        assert_eq!((config["group_commit"]["max_wait_us"].as_u64(), config["cluster"]["session_ttl_ms"].as_u64()), (Some(200), Some(3000)));
        assert_eq!(config["cluster"]["members"].as_array().unwrap().len(), 3, "merged, not replaced");
        c.spec.config = Some(json!({ "storage": { "partitions": 8 } }));
        assert_eq!(node_config(&c, Shape::of(&c)), Err(ConfigError::Owned("storage.partitions".into())));
        c.spec.config = Some(json!({ "cluster": { "session_ttl_ms": 5 } }));
        let err = node_config(&c, Shape::of(&c)).unwrap_err().to_string();
        assert!(err.contains("cluster.session_ttl_ms") && err.contains("got 5"), "{err}");
        c.spec.config = Some(json!({ "colour": "red" }));
        assert!(node_config(&c, Shape::of(&c)).unwrap_err().to_string().contains("colour"));
        c.spec.config = Some(json!([1, 2]));
        assert_eq!(node_config(&c, Shape::of(&c)), Err(ConfigError::NotAMapping));
    }

    #[test]
    fn given_consul_then_the_config_reads_the_token_from_the_mounted_secret() {
        let c = cluster(json!({
            "replicas": 3, "version": "0.1.0", "storage": { "size": "1Gi" },
            "coordination": { "store": "Consul", "consul": {
                "address": "http://consul:8500", "tokenSecretRef": { "name": "consul-acl", "key": "token" }, "keyPrefix": "shop/",
            }},
        }));
        let config: Value = serde_yaml::from_str(&node_config(&c, Shape::of(&c)).unwrap()).unwrap();
        assert_eq!(config["cluster"]["coordination"]["token_file"], "/etc/anthill/consul/token");
        assert_eq!(config["cluster"]["session_ttl_ms"], 10_000);
        assert_eq!(config["cluster"]["coordination"]["key_prefix"], "shop/");
        let mut unset = c.clone();
        unset.spec.coordination.consul.as_mut().unwrap().key_prefix = None;
        assert_eq!(key_prefix(&unset), "anthill/prod/shop/", "one prefix per cluster");
        let set = serde_json::to_value(stateful_set(&c, "x", 3, Some("0011"))).unwrap();
        let volumes = set["spec"]["template"]["spec"]["volumes"].as_array().unwrap();
        assert!(volumes.iter().any(|v| v["secret"]["secretName"] == "consul-acl" && v["secret"]["items"][0]["key"] == "token"));
        // A new token is a new template: the pods roll, since a node reads its token at start.
        assert_eq!(set["spec"]["template"]["metadata"]["annotations"][CONSUL_TOKEN_HASH], "0011");
    }

    #[test]
    fn the_stateful_set_restarts_only_when_told_starts_in_parallel_and_carries_the_config_hash_and_claims() {
        let c = three();
        let config = node_config(&c, Shape::of(&c)).unwrap();
        let set = serde_json::to_value(stateful_set(&c, &config, c.spec.replicas, None)).unwrap();
        let spec = &set["spec"];
        assert_eq!(spec["updateStrategy"]["type"], "OnDelete");
        assert_eq!(spec["podManagementPolicy"], "Parallel");
        assert_eq!(spec["serviceName"], "shop-nodes");
        assert_eq!(spec["template"]["metadata"]["annotations"][CONFIG_HASH], config_hash(&config));
        assert_eq!(spec["template"]["spec"]["containers"][0]["image"], "anthill:0.1.0");
        assert_eq!(spec["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"], "10Gi");
        assert_eq!(spec["persistentVolumeClaimRetentionPolicy"]["whenScaled"], "Retain");
        assert_eq!(set["metadata"]["ownerReferences"][0]["controller"], true);
        let anti = &spec["template"]["spec"]["affinity"]["podAntiAffinity"];
        assert!(anti["preferredDuringSchedulingIgnoredDuringExecution"].is_array(), "{anti}");
        assert_ne!(config_hash(&config), config_hash(&format!("{config} ")));
    }

    #[test]
    fn with_tls_each_pod_reads_its_own_certificate_and_admin_is_a_cluster_administrator() {
        let mut c = three();
        assert_eq!(tls_mode(&c), TlsMode::Operator, "on by default for a new cluster");
        c.spec.config = Some(json!({ "auth": { "cluster_admins": ["ops"] } }));
        let config = node_config(&c, Shape::of(&c)).unwrap();
        let parsed: Value = serde_yaml::from_str(&config).unwrap();
        assert_eq!(parsed["auth"]["cluster_admins"], json!(["ops", "admin"]));
        let set = serde_json::to_value(stateful_set(&c, &config, 3, None)).unwrap();
        let pod = &set["spec"]["template"]["spec"];
        let args: Vec<&str> = pod["containers"][0]["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
        let at = args.iter().position(|a| *a == "--tls-cert-file").unwrap();
        assert_eq!(args[at + 1], "/etc/anthill/tls/$(POD_NAME)/tls.crt");
        let tls = pod["volumes"].as_array().unwrap().iter().find(|v| v["name"] == "tls").unwrap();
        let sources = tls["projected"]["sources"].as_array().unwrap();
        assert_eq!(sources.len(), 3);
        assert_eq!(sources[2]["secret"]["name"], "shop-2-tls");
        assert_eq!(sources[2]["secret"]["items"][1], json!({ "key": "tls.key", "path": "shop-2/tls.key" }));
        assert_eq!(tls["projected"]["defaultMode"], 0o440);
        let env = pod["containers"][0]["env"].as_array().unwrap();
        assert!(env.iter().any(|e| e["name"] == "ANTHILL_TLS_CERT" && e["value"] == "/etc/anthill/admin/tls.crt"), "{env:?}");
        assert_eq!(pod["containers"][0]["readinessProbe"]["httpGet"]["path"], "/ready");
        // A scale-up's pods are listed with the members, so the template changes once.
        let grown = serde_json::to_value(stateful_set(&c, &config, 5, None)).unwrap();
        let volumes = grown["spec"]["template"]["spec"]["volumes"].as_array().unwrap();
        assert_eq!(volumes.iter().find(|v| v["name"] == "tls").unwrap()["projected"]["sources"].as_array().unwrap().len(), 5);
        // Set in spec.config, the files would be the same for every pod: refused.
        c.spec.config = Some(json!({ "tls": { "cert_file": "/x" } }));
        assert_eq!(node_config(&c, Shape::of(&c)), Err(ConfigError::Owned("tls".into())));
        // An `auth` of another shape is refused, not a panic.
        c.spec.config = Some(json!({ "auth": "admin" }));
        assert!(node_config(&c, Shape::of(&c)).unwrap_err().to_string().contains("auth must be a mapping"));
        c.spec.config = Some(json!({ "auth": { "cluster_admins": "ops" } }));
        assert!(node_config(&c, Shape::of(&c)).unwrap_err().to_string().contains("must be a list"));
    }

    #[test]
    fn tls_is_off_for_a_cluster_made_before_it_and_stays_as_recorded() {
        let mut c = three();
        c.spec.tls = Some(crate::crd::Tls { mode: TlsMode::Disabled });
        assert_eq!(tls_mode(&c), TlsMode::Disabled);
        let config = node_config(&c, Shape::of(&c)).unwrap();
        assert!(serde_yaml::from_str::<Value>(&config).unwrap().get("auth").is_none(), "{config}");
        let set = serde_json::to_value(stateful_set(&c, &config, 3, None)).unwrap();
        assert!(!set.to_string().contains("--tls-cert-file") && !set.to_string().contains("ANTHILL_TLS"));
        assert_eq!(set["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["port"], 7400);
        // A cluster whose pods run without TLS (made before TLS existed): off, whatever the spec
        // asks (the controller reports the difference); with TLS flags: on.
        let mut old = three();
        old.spec.tls = Some(crate::crd::Tls { mode: TlsMode::Operator });
        let plain: StatefulSet = serde_json::from_value(set.clone()).unwrap();
        assert_eq!(decide_tls_mode(&old, Some(&plain)), TlsMode::Disabled);
        assert_eq!(decide_tls_mode(&old, None), TlsMode::Operator, "a new cluster");
        let with_tls = stateful_set(&three(), &node_config(&three(), Shape::of(&three())).unwrap(), 3, None);
        old.spec.tls = None;
        assert_eq!(decide_tls_mode(&old, Some(&with_tls)), TlsMode::Operator);
        // Recorded: the record wins over the spec and the pods.
        old.status = Some(crate::crd::AnthillClusterStatus { tls_mode: Some(TlsMode::Secrets), ..Default::default() });
        old.spec.tls = Some(crate::crd::Tls { mode: TlsMode::Disabled });
        assert_eq!(decide_tls_mode(&old, Some(&plain)), TlsMode::Secrets);
        assert_eq!(tls_mode(&old), TlsMode::Secrets);
    }

    #[test]
    fn given_encryption_then_the_keys_are_mounted_and_named_in_the_config() {
        let mut c = three();
        c.spec.encryption = Some(
            serde_json::from_value(json!({
                "keySecretRef": { "name": "kek-2", "key": "key" }, "previousKeySecretRefs": [{ "name": "kek-1", "key": "key" }],
            }))
            .unwrap(),
        );
        let config = node_config(&c, Shape::of(&c)).unwrap();
        let parsed: Value = serde_yaml::from_str(&config).unwrap();
        assert_eq!(
            parsed["encryption"],
            json!({ "key_file": "/etc/anthill/encryption/key", "previous_key_files": ["/etc/anthill/encryption/previous-0"] })
        );
        let set = serde_json::to_value(stateful_set(&c, &config, 3, None)).unwrap();
        let volumes = set["spec"]["template"]["spec"]["volumes"].as_array().unwrap();
        let keys = volumes.iter().find(|v| v["name"] == "encryption").unwrap();
        assert_eq!(
            keys["projected"]["sources"][1]["secret"],
            json!({ "name": "kek-1", "items": [{ "key": "key", "path": "previous-0" }] })
        );
        c.spec.config = Some(json!({ "encryption": { "key_file": "/x" } }));
        assert_eq!(node_config(&c, Shape::of(&c)), Err(ConfigError::Owned("encryption".into())));
    }

    #[test]
    fn a_disruption_budget_exists_only_from_two_replicas() {
        assert!(disruption_budget(&three()).is_some());
        let one = cluster(json!({ "replicas": 1, "replicationFactor": 1, "version": "0.1.0", "storage": { "size": "1Gi" } }));
        assert!(disruption_budget(&one).is_none());
        assert!(serde_json::to_value(headless_service(&one)).unwrap()["spec"]["publishNotReadyAddresses"] == true);
    }

    #[test]
    fn services_and_the_budget_select_node_pods_only_and_the_stateful_set_keeps_the_selector_it_was_made_with() {
        let c = three();
        let nodes =
            json!({ "app.kubernetes.io/name": "anthill", "app.kubernetes.io/instance": "shop", "app.kubernetes.io/component": "node" });
        assert_eq!(serde_json::to_value(client_service(&c)).unwrap()["spec"]["selector"], nodes);
        assert_eq!(serde_json::to_value(headless_service(&c)).unwrap()["spec"]["selector"], nodes);
        assert_eq!(serde_json::to_value(disruption_budget(&c)).unwrap()["spec"]["selector"]["matchLabels"], nodes);
        assert_eq!(
            selector_query("shop"),
            "app.kubernetes.io/component=node,app.kubernetes.io/instance=shop,app.kubernetes.io/name=anthill"
        );
        let config = node_config(&c, Shape::of(&c)).unwrap();
        let set = serde_json::to_value(stateful_set(&c, &config, 3, None)).unwrap();
        let made_with = json!({ "app.kubernetes.io/name": "anthill", "app.kubernetes.io/instance": "shop" });
        assert_eq!(set["spec"]["selector"]["matchLabels"], made_with);
        // Every node pod matches every selector.
        let pod_labels = set["spec"]["template"]["metadata"]["labels"].as_object().unwrap().clone();
        assert!(nodes.as_object().unwrap().iter().all(|(k, v)| pod_labels.get(k) == Some(v)), "{pod_labels:?}");
    }
}
