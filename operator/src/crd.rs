//! The `AnthillCluster` resource (`anthill.io/v1alpha1`): what a user asks for (the spec) and
//! what the operator reports (the status). The CRD is generated from these types
//! ([`crd_yaml`]) and committed in the chart (`charts/anthill/crds/`); a test fails when the
//! two differ.
//!
//! The rules a user should hear about at `kubectl apply` time are in the schema, as CEL
//! (`x-kubernetes-validations`), so the API server refuses a bad spec before the operator sees
//! it: partitions, replication factor and storage class never change after creation, storage
//! only grows, the version never goes down, there are at least as many replicas as the
//! replication factor, and a Consul store names its address and token. Everything else the
//! operator checks when it reconciles, and reports in the status's conditions.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ResourceRequirements, SecretKeySelector, Toleration, TopologySpreadConstraint};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// An Anthill cluster: `replicas` nodes in a StatefulSet, the event log split into `partitions`,
/// each replicated to `replicationFactor` of them.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "anthill.io",
    version = "v1alpha1",
    kind = "AnthillCluster",
    plural = "anthillclusters",
    shortname = "anthill",
    category = "anthill",
    namespaced,
    status = "AnthillClusterStatus",
    derive = "PartialEq",
    doc = "An Anthill cluster: a replicated, partitioned event log and command processor (docs/kubernetes.md).",
    scale(spec_replicas_path = ".spec.replicas", status_replicas_path = ".status.replicas", label_selector_path = ".status.selector"),
    printcolumn(name = "Replicas", type_ = "integer", json_path = ".spec.replicas", description = "Nodes asked for"),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.readyReplicas", description = "Nodes running and caught up"),
    printcolumn(name = "Version", type_ = "string", json_path = ".status.currentVersion", description = "The version every node runs"),
    printcolumn(
        name = "Available",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Available\")].status",
        description = "Every partition has a leader that takes writes"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Degraded\")].reason",
        description = "Why the cluster is degraded",
        priority = 1
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("self.spec.replicas >= self.spec.replicationFactor")
        .message("spec.replicas must be at least spec.replicationFactor: each partition needs that many nodes")
        .field_path(".spec.replicas"),
    // Pod names (`<name>-11`), the headless Service (`<name>-nodes`) and the StatefulSet's
    // revision labels must stay within Kubernetes' 63-character limits.
    validation = Rule::new("size(self.metadata.name) <= 40").message("metadata.name must be at most 40 characters (the pods and Services are named after it)"),
    // A disruption may take at most a minority of any replica set, or a partition loses its quorum.
    validation = Rule::new("!has(self.spec.disruptionBudget) || !has(self.spec.disruptionBudget.maxUnavailable) || self.spec.disruptionBudget.maxUnavailable <= 1 || self.spec.disruptionBudget.maxUnavailable <= (self.spec.replicationFactor - 1) / 2")
        .message("spec.disruptionBudget.maxUnavailable must be at most (replicationFactor - 1) / 2 (and 1 is always allowed): more would let a disruption take a partition's quorum")
        .field_path(".spec.disruptionBudget.maxUnavailable")
)]
#[serde(rename_all = "camelCase")]
pub struct AnthillClusterSpec {
    /// Nodes of the cluster (pods of its StatefulSet); a node takes at most 12 members
    /// (`config::MAX_CLUSTER_MEMBERS`).
    #[schemars(range(min = 1, max = 12))]
    pub replicas: i32,

    /// The node image, without its tag (the tag is `version`).
    #[serde(default = "default_image")]
    pub image: String,

    /// The Anthill version the nodes run: the image's tag, `MAJOR.MINOR.PATCH`. It may go up
    /// (a rolling upgrade, one node at a time) but never down.
    #[schemars(length(min = 5, max = 32))]
    #[x_kube(
        validation = Rule::new("self.matches('^[0-9]{1,9}\\\\.[0-9]{1,9}\\\\.[0-9]{1,9}$')")
            .message("version must be MAJOR.MINOR.PATCH with at most 9 digits each, e.g. 0.1.0"),
        validation = Rule::new(DOWNGRADE_RULE).message("version cannot go down: downgrades are not supported (restore from a backup instead)")
    )]
    pub version: String,

    /// How the event log is split; fixed when the cluster is created.
    #[serde(default = "default_partitions")]
    #[schemars(range(min = 1, max = 1024))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("partitions cannot change after the cluster is created"))]
    pub partitions: u32,

    /// How many nodes hold each partition (3 keeps a partition writable through the loss of
    /// one node); fixed when the cluster is created.
    #[serde(default = "default_replication_factor")]
    #[schemars(range(min = 1, max = 7))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("replicationFactor cannot change after the cluster is created"))]
    pub replication_factor: u32,

    /// Each node's volume.
    pub storage: Storage,

    /// Each node's CPU and memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// Node configuration (`anthill node --config`'s YAML) merged over what the operator
    /// writes; checked by the node's own configuration rules when the operator reconciles.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_form_object")]
    pub config: Option<serde_json::Value>,

    /// Where the nodes' pods may run.
    #[serde(default)]
    pub placement: Placement,

    /// The PodDisruptionBudget the operator keeps (none with fewer than 2 replicas).
    #[serde(default)]
    pub disruption_budget: DisruptionBudget,

    /// Where partition ownership is decided.
    #[serde(default)]
    pub coordination: Coordination,

    /// Transport security: TLS towards clients and mutual TLS between the nodes
    /// (docs/security.md). Unset: `Operator` for a new cluster, `Disabled` for one whose pods
    /// run without TLS. The mode is fixed once the cluster runs (recorded in the status): nodes
    /// of two modes cannot talk to each other, so a spec asking for another is reported
    /// (`Degraded`, `TlsModeFixed`) and changes nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<Tls>,

    /// Encryption at rest of every tenant's events under a key-encryption key read from a
    /// Secret (docs/security.md). Unset: events are stored as sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<Encryption>,

    /// While true the operator changes nothing (and says so in the `ReconciliationPaused`
    /// condition).
    #[serde(default)]
    pub paused: bool,
}

/// The version rule: `self` and `oldSelf` as MAJOR.MINOR.PATCH, compared part by part (CEL's
/// strings library splits; a transition rule runs only on updates).
const DOWNGRADE_RULE: &str = "!self.matches('^[0-9]{1,9}\\\\.[0-9]{1,9}\\\\.[0-9]{1,9}$') || !oldSelf.matches('^[0-9]{1,9}\\\\.[0-9]{1,9}\\\\.[0-9]{1,9}$') || \
     int(self.split('.')[0]) > int(oldSelf.split('.')[0]) || \
     int(self.split('.')[0]) == int(oldSelf.split('.')[0]) && \
     (int(self.split('.')[1]) > int(oldSelf.split('.')[1]) || \
      int(self.split('.')[1]) == int(oldSelf.split('.')[1]) && int(self.split('.')[2]) >= int(oldSelf.split('.')[2]))";

fn default_image() -> String {
    "anthill".into()
}

fn default_partitions() -> u32 {
    16
}

fn default_replication_factor() -> u32 {
    3
}

/// An object of any shape, kept as given (`x-kubernetes-preserve-unknown-fields`).
fn free_form_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({ "type": "object", "x-kubernetes-preserve-unknown-fields": true })
}

/// Each node's persistent volume (a claim of the StatefulSet's template).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(
    "has(self.storageClassName) == has(oldSelf.storageClassName) && (!has(self.storageClassName) || self.storageClassName == oldSelf.storageClassName)"
).message("storage.storageClassName cannot change after the cluster is created"))]
pub struct Storage {
    /// The volume's size, a Kubernetes quantity (`10Gi`); it may grow (where the storage class
    /// allows expansion) but never shrink.
    #[schemars(length(max = 32))]
    #[x_kube(
        validation = Rule::new("isQuantity(self) && quantity(self).isGreaterThan(quantity('0'))").message("storage.size must be a quantity above 0, such as 10Gi"),
        validation = Rule::new("!isQuantity(self) || !isQuantity(oldSelf) || quantity(self).compareTo(quantity(oldSelf)) >= 0")
            .message("storage.size can only grow")
    )]
    pub size: String,

    /// The storage class of the claims (the cluster's default when unset); fixed when the
    /// cluster is created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,

    /// What happens to the claims when the cluster is deleted or scaled down: `Retain` (the
    /// default: the data stays until someone deletes the claims) or `Delete`.
    #[serde(default)]
    pub reclaim_policy: ReclaimPolicy,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ReclaimPolicy {
    #[default]
    Retain,
    Delete,
}

/// Where the nodes' pods may run.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Placement {
    /// Keep the cluster's pods on different Kubernetes nodes: `Preferred` (the default),
    /// `Required` (a pod stays pending rather than share a node) or `None`.
    #[serde(default)]
    pub anti_affinity: AntiAffinity,
    /// Topology spread constraints of the node pods (Kubernetes' own fields).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology_spread_constraints: Option<Vec<TopologySpreadConstraint>>,
    /// Labels a Kubernetes node must have to run a node pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,
    /// Taints the node pods tolerate (Kubernetes' own fields).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<Toleration>>,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AntiAffinity {
    #[default]
    Preferred,
    Required,
    None,
}

/// The PodDisruptionBudget: how many of the cluster's pods a voluntary disruption (a node
/// drain) may take at once.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DisruptionBudget {
    /// How many node pods a voluntary disruption (an eviction, a Kubernetes node drain) may
    /// take at once.
    #[serde(default = "default_max_unavailable")]
    #[schemars(range(min = 1))]
    pub max_unavailable: i32,
}

impl Default for DisruptionBudget {
    fn default() -> Self {
        DisruptionBudget { max_unavailable: default_max_unavailable() }
    }
}

fn default_max_unavailable() -> i32 {
    1
}

/// Where partition ownership is decided (docs/replication.md, "Ownership"); fixed when the
/// cluster is created (the nodes' leaderships live in the store).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.store != 'Consul' || has(self.consul)").message("coordination.store Consul needs coordination.consul"),
    validation = Rule::new("self.store == oldSelf.store").message("coordination.store cannot change after the cluster is created"),
    validation = Rule::new("has(self.consul) == has(oldSelf.consul) && (!has(self.consul) || !has(oldSelf.consul) || (has(self.consul.keyPrefix) == has(oldSelf.consul.keyPrefix) && (!has(self.consul.keyPrefix) || self.consul.keyPrefix == oldSelf.consul.keyPrefix)))")
        .message("coordination.consul.keyPrefix cannot change after the cluster is created (the cluster's keys live under it)")
)]
pub struct Coordination {
    /// `Embedded` (the default: the nodes run the store themselves, no other service) or
    /// `Consul`.
    #[serde(default)]
    pub store: Store,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consul: Option<ConsulStore>,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Store {
    #[default]
    Embedded,
    Consul,
}

/// A Consul cluster the nodes decide ownership in.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ConsulStore {
    /// Consul's HTTP API, `http://host:port`.
    #[schemars(regex(pattern = r"^http://[^/]+$"))]
    pub address: String,
    /// The Secret key holding the nodes' ACL token (a policy on `keyPrefix` and sessions,
    /// docs/replication.md).
    pub token_secret_ref: SecretKeySelector,
    /// The cluster's keys live under this prefix (letters, digits, `-`, `_`, `.`, `/`, ending in
    /// `/`); unset: `anthill/<namespace>/<name>/`, so clusters sharing a Consul never collide.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[A-Za-z0-9_.\-][A-Za-z0-9_./\-]*/$"), length(max = 200))]
    pub key_prefix: Option<String>,
    /// The nodes' session TTL with Consul, at least Consul's minimum of 10 s; a dead node's
    /// partitions move about twice this after its last renewal.
    #[serde(default = "default_session_ttl_ms")]
    #[schemars(range(min = 10_000, max = 600_000))]
    pub session_ttl_ms: u32,
    /// When the cluster is deleted, stop its pods and delete every key under `keyPrefix` before
    /// the resource goes (a finalizer; the operator must be running). Off by default: a cluster
    /// deleted by mistake and made again with the same prefix and volume claims finds its
    /// partitions' ownership as it was. The token needs write on the prefix, as the nodes'.
    #[serde(default)]
    pub delete_keys_on_removal: bool,
}

fn default_session_ttl_ms() -> u32 {
    10_000
}

/// The nodes' certificates.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Tls {
    /// `Operator`: the operator keeps a CA (Secret `<name>-ca`) and issues every node's
    /// certificate (`<name>-<ordinal>-tls`) and the administrator's client certificate
    /// (`<name>-admin-tls`), renewing each a month before it expires. `Secrets`: those Secrets
    /// come from elsewhere (cert-manager Certificates; docs/kubernetes.md lists what each must
    /// hold). `Disabled`: plain text, no authentication.
    pub mode: TlsMode,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsMode {
    Operator,
    Secrets,
    Disabled,
}

/// Where the key-encryption key comes from.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Encryption {
    /// The Secret key holding the key-encryption key: 64 hex digits (`openssl rand -hex 32`).
    pub key_secret_ref: SecretKeySelector,
    /// Keys used before `keySecretRef`, still read while `anthill tenant rewrap-keys` moves
    /// the tenants' data keys to the new one (key rotation, docs/security.md).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 4))]
    pub previous_key_secret_refs: Vec<SecretKeySelector>,
}

/// What the operator last saw.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AnthillClusterStatus {
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Available`, `Progressing`, `Degraded` and `ReconciliationPaused`; a condition's
    /// transition time changes only when its status flips.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Pods of the cluster.
    #[serde(default)]
    pub replicas: i32,
    /// Its pods that are ready (their node serves).
    #[serde(default)]
    pub ready_replicas: i32,
    /// The version every node runs (unset while they differ).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_version: Option<String>,
    /// Recorded when the cluster was first created; never changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_id: Option<String>,
    /// How many pods founded the cluster (ordinals below it): recorded at the first reconcile,
    /// lowered when the cluster shrinks below it; pods beyond it join the running cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub founders: Option<i32>,
    /// Pods the operator took out of the replica sets for a scale-down (`anthill decommission`);
    /// each is let back in when `replicas` covers it again.
    // Always written: the status is a merge patch, and an omitted list would keep the old one.
    #[serde(default)]
    pub decommissioned: Vec<String>,
    /// The transport security the cluster was made with (`spec.tls.mode`, or what its absence
    /// meant then): recorded at the first reconcile; never changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_mode: Option<TlsMode>,
    /// The label selector of the cluster's pods (for the scale subresource).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// Per node: its role, how many partitions it leads, how far behind it is.
    #[serde(default)]
    pub nodes: Vec<NodeStatus>,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    pub name: String,
    /// `Ready`, `Starting`, `Draining`, `Decommissioning` or `Down`.
    pub role: String,
    pub leaderships: u32,
    /// Committed events the node's replicas still lack, summed over its partitions.
    pub lag: u64,
}

/// The CRD as YAML, as committed in the chart.
pub fn crd_yaml() -> String {
    let yaml = serde_yaml::to_string(&AnthillCluster::crd()).expect("a CRD serializes");
    format!("# Generated by `cargo run -p anthill-operator -- crd`; do not edit (operator/src/crd.rs).\n{yaml}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where the chart keeps the CRD.
    const COMMITTED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../charts/anthill/crds/anthillclusters.anthill.io.yaml");

    #[test]
    fn the_committed_crd_is_the_one_the_types_generate() {
        let committed = std::fs::read_to_string(COMMITTED).unwrap_or_default();
        assert!(
            committed == crd_yaml(),
            "{COMMITTED} differs from the CRD operator/src/crd.rs generates; write it again with\n  \
             cargo run -q -p anthill-operator -- crd > charts/anthill/crds/anthillclusters.anthill.io.yaml"
        );
    }

    #[test]
    fn the_crd_has_the_scale_and_status_subresources_and_the_cel_rules() {
        let crd = serde_json::to_value(AnthillCluster::crd()).unwrap();
        let version = &crd["spec"]["versions"][0];
        assert_eq!(version["subresources"]["scale"]["specReplicasPath"], ".spec.replicas");
        assert!(version["subresources"]["status"].is_object());
        let text = crd.to_string();
        for rule in
            ["self == oldSelf", "self.spec.replicas >= self.spec.replicationFactor", "quantity(self).compareTo(quantity(oldSelf)) >= 0"]
        {
            assert!(text.contains(rule), "{rule}");
        }
    }
}
