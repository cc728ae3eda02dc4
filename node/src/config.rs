//! The node's configuration: one typed tree, read from YAML, defaults in one place, validated
//! before anything starts. Every field is documented in `docs/configuration.md`; every field can
//! also be set by a flag of `anthill node` (see [`crate::cli`]), which wins over the file.
//!
//! An invalid configuration is an error that names the field and the reason; the node never
//! starts half-configured.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::storage::MAX_STREAM_ID_BYTES;
use thiserror::Error;

/// Most members of a cluster (the embedded store's Raft group is all of them).
pub const MAX_CLUSTER_MEMBERS: usize = 12;

/// Longest command id retention: a week.
pub const MAX_COMMAND_ID_RETENTION_S: u64 = 7 * 24 * 3600;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid configuration: {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// Name of this node in logs, metrics and `anthill status`.
    pub node_id: String,
    /// Directory of the LMDB environment; created if missing.
    pub data_dir: PathBuf,
    /// gRPC listen address. Port 0 picks a free port (printed at start).
    pub listen_addr: SocketAddr,
    /// Prometheus `/metrics` listen address; absent turns the endpoint off.
    pub metrics_addr: Option<SocketAddr>,
    pub storage: StorageConfig,
    pub group_commit: GroupCommitConfig,
    pub limits: LimitsConfig,
    pub app: AppConfig,
    pub cluster: ClusterConfig,
    pub telemetry: TelemetryConfig,
    /// TLS on the gRPC port and mutual TLS between members (docs/security.md). Absent: plain
    /// text, and anyone who reaches the port may call anything.
    pub tls: Option<TlsConfig>,
    pub auth: AuthConfig,
    /// Encryption of tenants' events at rest (docs/security.md). Absent: events are stored as
    /// given.
    pub encryption: Option<EncryptionConfig>,
}

/// Where the key-encryption keys come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncryptionConfig {
    /// The current key-encryption key: a file of 64 hex digits. New data keys are wrapped by it.
    pub key_file: PathBuf,
    /// Earlier keys, still able to unwrap data keys until `anthill tenant rewrap-keys` has
    /// re-wrapped them all with the current one.
    #[serde(default)]
    pub previous_key_files: Vec<PathBuf>,
}

/// Who is let in when TLS is on (docs/security.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Client certificate common names that hold `cluster-admin`: the way in for the first
    /// admin, who then grants the rest (`anthill auth`).
    pub cluster_admins: Vec<String>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig { cluster_admins: vec!["admin".into()] }
    }
}

/// The node's certificate, its key and the cluster CA, as PEM files; read at start and again
/// whenever they change (rotation needs no restart).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// This node's certificate chain (leaf first). It must name `node_id` as a DNS subject
    /// alternative name (peers check it), chain to `ca_file`, and allow server and client
    /// authentication (the node is a client of its peers).
    pub cert_file: PathBuf,
    /// The certificate's private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// The CA certificates peers' and clients' certificates must chain to (several during a CA
    /// rotation).
    pub ca_file: PathBuf,
    /// How often the three files are checked for a change (ms).
    #[serde(default = "TlsConfig::default_reload_interval_ms")]
    pub reload_interval_ms: u64,
}

impl TlsConfig {
    pub const DEFAULT_RELOAD_INTERVAL_MS: u64 = 2_000;

    fn default_reload_interval_ms() -> u64 {
        Self::DEFAULT_RELOAD_INTERVAL_MS
    }
}

/// The cluster this node belongs to. No members: a single node, as before.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// Every node of the cluster, this one included (its `name` is `node_id`). The embedded
    /// coordination store, when chosen, runs on all of them.
    pub members: Vec<MemberConfig>,
    /// Replicas per partition.
    pub replication_factor: usize,
    /// A node is taken for dead this long after its last renewal of its coordination session.
    pub session_ttl_ms: u64,
    /// Where ownership is decided: the embedded store (default) or Consul.
    pub coordination: CoordinationConfig,
    /// This server is added to a running cluster (not one of its founders): its embedded
    /// coordination member starts with no voters and waits for the group to add it. Read only
    /// when its coordination log is new.
    pub join: bool,
    /// The names of the members that founded the cluster; a member not named here joins as
    /// with `join: true`, and the founders' embedded coordination group starts as these alone.
    /// Empty: every member is a founder. Lets one file serve every server of a cluster that
    /// grows (a StatefulSet's pods share one ConfigMap).
    pub founders: Vec<String>,
    /// On SIGTERM or SIGINT the node first drains (hands its leaderships over, as
    /// `anthill drain` does) for at most this long; 0 stops at once.
    pub drain_on_stop_ms: u64,
}

/// The coordination store a cluster decides ownership in (docs/replication.md, "Ownership").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum CoordinationConfig {
    /// A Raft group of all members, its log in `data_dir/coordination/` (the default).
    // A struct variant, so fields of another kind under `kind: embedded` are refused.
    Embedded {},
    /// A Consul cluster the members share.
    Consul(ConsulConfig),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConsulConfig {
    /// Consul's HTTP API, best a local agent: `http://host:port`.
    pub address: String,
    /// A file holding the ACL token. Unset: the `ANTHILL_CONSUL_TOKEN` environment variable, if
    /// set; the token itself never goes in this file.
    pub token_file: Option<PathBuf>,
    /// The cluster's keys live under this prefix; clusters sharing a Consul need different ones.
    pub key_prefix: String,
    /// The Consul datacenter; unset: the agent's own.
    pub datacenter: Option<String>,
}

impl Default for CoordinationConfig {
    fn default() -> Self {
        CoordinationConfig::Embedded {}
    }
}

impl Default for ConsulConfig {
    fn default() -> Self {
        ConsulConfig { address: "http://127.0.0.1:8500".into(), token_file: None, key_prefix: "anthill/".into(), datacenter: None }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberConfig {
    /// The member's Raft id in the coordination store: unique, not 0, never reused.
    pub id: u64,
    /// Its `node_id`.
    pub name: String,
    /// Its gRPC address as the others reach it: `host:port`, the host an IP address or a DNS
    /// name (a StatefulSet pod's stable name on Kubernetes, where pod IPs change), resolved at
    /// each connection.
    pub address: PeerAddress,
}

/// A member's address: `host:port` (an IPv6 host in brackets). Checked when the configuration
/// is read; a DNS name is resolved each time a connection is made, so a member that comes back
/// on another IP under the same name is found there.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PeerAddress(String);

impl PeerAddress {
    /// The host part (an IPv6 address without its brackets).
    pub fn host(&self) -> &str {
        let (host, _) = self.0.rsplit_once(':').expect("checked when made");
        host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host)
    }

    /// The address as a socket address, when its host is an IP address (no resolution).
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        self.0.parse().ok()
    }
}

impl TryFrom<String> for PeerAddress {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        let bad = |why: &str| Err(format!("{text:?} is not host:port ({why}); e.g. 10.0.0.5:7400 or anthill-0.anthill-nodes:7400"));
        if let Ok(address) = text.parse::<SocketAddr>() {
            if address.port() == 0 {
                return bad("the port must be 1 to 65535");
            }
            return Ok(PeerAddress(text));
        }
        let Some((host, port)) = text.rsplit_once(':') else { return bad("no port") };
        match port.parse::<u16>() {
            Ok(p) if p > 0 => {}
            _ => return bad("the port must be 1 to 65535"),
        }
        // A DNS name (RFC 1123 labels); an IP address parsed above already.
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        // One trailing dot (a fully qualified name) is fine; a last label of digits only is not a
        // name (it would be a mistyped IP address, such as 10.0.0.300).
        let name = host.strip_suffix('.').unwrap_or(host);
        let last_numeric = name.rsplit('.').next().is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()));
        if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) || last_numeric {
            return bad("the host must be an IP address or a DNS name");
        }
        Ok(PeerAddress(text))
    }
}

impl std::str::FromStr for PeerAddress {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        PeerAddress::try_from(text.to_string())
    }
}

impl From<PeerAddress> for String {
    fn from(address: PeerAddress) -> String {
        address.0
    }
}

impl From<SocketAddr> for PeerAddress {
    fn from(address: SocketAddr) -> Self {
        PeerAddress(address.to_string())
    }
}

impl std::fmt::Display for PeerAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl Default for ClusterConfig {
    fn default() -> Self {
        // 1 s: failovers within 2 s with the embedded store (docs/benchmarks.md); a node starved
        // of CPU for most of a second may then be taken for dead, which moves its partitions but
        // loses nothing (raise it on overloaded machines).
        ClusterConfig {
            members: Vec::new(),
            replication_factor: 3,
            session_ttl_ms: 1_000,
            coordination: CoordinationConfig::Embedded {},
            join: false,
            founders: Vec::new(),
            drain_on_stop_ms: 10_000,
        }
    }
}

impl ClusterConfig {
    pub fn session_ttl(&self) -> Duration {
        Duration::from_millis(self.session_ttl_ms)
    }

    /// Whether member `name` is added to a running cluster rather than founding it: `join`, or
    /// a list of founders that does not name it.
    pub fn joins(&self, name: &str) -> bool {
        self.join || (!self.founders.is_empty() && !self.founders.iter().any(|f| f == name))
    }

    /// The Raft ids of the founding members (`founders`, else every member).
    pub fn founder_ids(&self) -> Vec<u64> {
        self.members.iter().filter(|m| self.founders.is_empty() || self.founders.contains(&m.name)).map(|m| m.id).collect()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AppConfig {
    /// How long an accepted command's id is remembered: a retry within this window returns the
    /// first result and writes nothing (the duplicate window; see `app/commands.rs`).
    pub command_id_retention_s: u64,
}

impl Default for AppConfig {
    fn default() -> Self {
        AppConfig { command_id_retention_s: 600 }
    }
}

impl AppConfig {
    pub fn command_id_retention(&self) -> Duration {
        Duration::from_secs(self.command_id_retention_s)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// Number of partitions, fixed when the data directory is created.
    pub partitions: u32,
    /// Memory map size at first open (capped at `map_size_max_bytes`); it grows as the database does.
    pub map_size_initial_bytes: u64,
    /// The map never grows past this; writes are then refused with a clear error.
    pub map_size_max_bytes: u64,
    /// LMDB reader slots: the most read transactions open at once.
    pub max_readers: u32,
    /// The indexer writes the index entries held in memory to the index environment once this
    /// many durable events wait for it (or `index_flush_interval_ms` has passed).
    pub index_flush_events: usize,
    /// ... or once this long has passed since its last flush, if any event waits.
    pub index_flush_interval_ms: u64,
    /// Most events whose index entries are held only in memory; past it the writer waits for
    /// the indexer (backpressure). Bounds the memory of the index tail.
    pub index_tail_max_events: usize,
    /// Retention: a partition gives up its oldest events beyond this many (0: keeps them all).
    /// The state they made stays (docs/storage.md, "Retention").
    pub retention_max_events: u64,
    /// ... and events older than this, in seconds (0: keeps them at any age).
    pub retention_max_age_s: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GroupCommitConfig {
    /// How long the writer waits for more appends after the first of a batch, in microseconds.
    /// 0: commit whatever queued up while the previous commit was syncing.
    pub max_wait_us: u64,
    /// A batch closes once it holds this many events...
    pub max_batch_events: usize,
    /// ... or this many payload bytes.
    pub max_batch_bytes: usize,
    /// Appends waiting for the writer; when full, callers wait (backpressure).
    pub queue_capacity: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    pub max_stream_id_bytes: usize,
    pub max_event_type_bytes: usize,
    /// Largest event: payload plus metadata keys and values.
    pub max_event_bytes: usize,
    pub max_events_per_append: usize,
    /// Largest gRPC message the node accepts.
    pub max_request_bytes: usize,
    /// Most events one Read or ReadPartition returns.
    pub max_read_count: u32,
    /// Bytes of events buffered per subscriber before the node waits for it to read.
    pub subscribe_buffer_bytes: usize,
    /// Appends of one AppendSession call waiting for their answer before the node stops reading it.
    pub max_session_in_flight: usize,
    /// Most streams one Subscribe call may name.
    pub max_subscribe_streams: usize,
    /// Calls (HTTP/2 streams) one connection may have open at once; more wait their turn.
    pub max_concurrent_calls_per_connection: usize,
    /// Connections one remote address may have open at once (peers and clients alike); more
    /// are closed as soon as accepted. 0: no limit.
    pub max_connections_per_address: usize,
    /// Calls per second one caller (a token, a certificate's principal) may start, over all
    /// its connections to this node; past it calls get `RESOURCE_EXHAUSTED`. 0: no limit. Only
    /// with TLS (without it nobody is told apart).
    pub calls_per_second_per_caller: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// `human` or `json`.
    pub log_format: LogFormat,
    /// A tracing filter, e.g. `info` or `anthill_node=debug,info`.
    pub log_level: String,
    /// OTLP/gRPC collector endpoint, e.g. `http://127.0.0.1:4317`; absent: no export.
    pub otlp_endpoint: Option<String>,
    /// `service.name` of exported spans.
    pub service_name: String,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            node_id: "node-1".into(),
            data_dir: PathBuf::from("anthill-data"),
            listen_addr: SocketAddr::from(([127, 0, 0, 1], 7400)),
            metrics_addr: Some(SocketAddr::from(([127, 0, 0, 1], 7401))),
            storage: StorageConfig::default(),
            group_commit: GroupCommitConfig::default(),
            limits: LimitsConfig::default(),
            app: AppConfig::default(),
            cluster: ClusterConfig::default(),
            telemetry: TelemetryConfig::default(),
            tls: None,
            auth: AuthConfig::default(),
            encryption: None,
        }
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            partitions: 64,
            map_size_initial_bytes: 1 << 30,
            map_size_max_bytes: 256 << 30,
            max_readers: 1024,
            index_flush_events: 65_536,
            index_flush_interval_ms: 5_000,
            index_tail_max_events: 524_288,
            retention_max_events: 0,
            retention_max_age_s: 0,
        }
    }
}

impl Default for GroupCommitConfig {
    fn default() -> Self {
        GroupCommitConfig { max_wait_us: 0, max_batch_events: 20_000, max_batch_bytes: 32 << 20, queue_capacity: 4096 }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_stream_id_bytes: 256,
            max_event_type_bytes: 256,
            max_event_bytes: 1 << 20,
            max_events_per_append: 10_000,
            max_request_bytes: 16 << 20,
            max_read_count: 10_000,
            subscribe_buffer_bytes: 4 << 20,
            max_session_in_flight: 1024,
            max_subscribe_streams: 1_000,
            max_concurrent_calls_per_connection: 1_024,
            max_connections_per_address: 1_024,
            calls_per_second_per_caller: 0,
        }
    }
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig { log_format: LogFormat::Human, log_level: "info".into(), otlp_endpoint: None, service_name: "anthill".into() }
    }
}

/// Most partitions a cluster may have (keeps per-partition state small and bounded).
pub const MAX_PARTITIONS: u32 = 4096;

impl NodeConfig {
    /// Reads and validates a YAML file. Fields the file leaves out take their defaults.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        NodeConfig::from_yaml(&text).map_err(|message| ConfigError::Parse { path: path.into(), message })
    }

    /// Parses YAML text (empty: the defaults); not validated yet.
    pub fn from_yaml(text: &str) -> Result<Self, String> {
        if text.trim().is_empty() {
            return Ok(NodeConfig::default());
        }
        serde_yaml::from_str(text).map_err(|e| e.to_string())
    }

    /// Checks every rule the fields must meet together; the first broken one is the error.
    fn validate_cluster(&self) -> Result<(), ConfigError> {
        let invalid = |field, reason: String| Err(ConfigError::Invalid { field, reason });
        let c = &self.cluster;
        if c.members.is_empty() {
            if c.coordination != (CoordinationConfig::Embedded {}) {
                return invalid("cluster.coordination", "a coordination store is for a cluster, and cluster.members is empty".into());
            }
            return Ok(());
        }
        if c.members.len() > MAX_CLUSTER_MEMBERS {
            return invalid("cluster.members", format!("at most {MAX_CLUSTER_MEMBERS} members, got {}", c.members.len()));
        }
        let mut ids = std::collections::HashSet::new();
        let mut names = std::collections::HashSet::new();
        for m in &c.members {
            if m.id == 0 || m.id > u64::from(u32::MAX) || !ids.insert(m.id) {
                return invalid("cluster.members", format!("member ids must be unique, 1 to {}; {} is not", u32::MAX, m.id));
            }
            if m.name.trim().is_empty() || !names.insert(m.name.as_str()) {
                return invalid("cluster.members", format!("member names must be unique and not empty; {:?} is not", m.name));
            }
        }
        if !names.contains(self.node_id.as_str()) {
            return invalid("cluster.members", format!("no member is named {:?} (node_id)", self.node_id));
        }
        if !c.founders.is_empty() && !c.founders.iter().any(|f| names.contains(f.as_str())) {
            return invalid(
                "cluster.founders",
                format!("names no member of cluster.members ({:?}): nobody would found the coordination group", c.founders),
            );
        }
        if c.replication_factor == 0 || c.replication_factor > c.members.len() {
            return invalid(
                "cluster.replication_factor",
                format!("must be between 1 and the number of members ({}), got {}", c.members.len(), c.replication_factor),
            );
        }
        if !(500..=600_000).contains(&c.session_ttl_ms) {
            return invalid("cluster.session_ttl_ms", format!("must be between 500 and 600000, got {}", c.session_ttl_ms));
        }
        if c.drain_on_stop_ms > 600_000 {
            return invalid("cluster.drain_on_stop_ms", format!("must be at most 600000 (0: no drain), got {}", c.drain_on_stop_ms));
        }
        match &c.coordination {
            CoordinationConfig::Embedded {} => Ok(()),
            CoordinationConfig::Consul(consul) => self.validate_consul(consul),
        }
    }

    fn validate_consul(&self, consul: &ConsulConfig) -> Result<(), ConfigError> {
        let invalid = |field, reason: String| Err(ConfigError::Invalid { field, reason });
        let min_ttl_ms = crate::coordination::consul::MIN_SESSION_TTL.as_millis();
        if u128::from(self.cluster.session_ttl_ms) < min_ttl_ms {
            return invalid(
                "cluster.session_ttl_ms",
                format!(
                    "Consul's sessions live at least 10 s: must be at least {min_ttl_ms} with consul, got {}",
                    self.cluster.session_ttl_ms
                ),
            );
        }
        if let Err(reason) = crate::coordination::consul::parse_address(&consul.address) {
            return invalid("cluster.coordination.address", reason);
        }
        let key_char = |c: char| c.is_ascii_alphanumeric() || "-_./".contains(c);
        let p = &consul.key_prefix;
        if p.is_empty() || p.starts_with('/') || !p.ends_with('/') || p.contains("//") || !p.chars().all(key_char) {
            return invalid(
                "cluster.coordination.key_prefix",
                format!("must be like anthill/ (letters, digits, - _ . and /, ending in /, not starting with it), got {p:?}"),
            );
        }
        if let Some(dc) = &consul.datacenter
            && (dc.is_empty() || !dc.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)))
        {
            return invalid(
                "cluster.coordination.datacenter",
                format!("must be a Consul datacenter name (letters, digits, - _ .), got {dc:?}"),
            );
        }
        if consul.token_file.as_ref().is_some_and(|f| f.as_os_str().is_empty()) {
            return invalid("cluster.coordination.token_file", "must not be empty; leave it out to read ANTHILL_CONSUL_TOKEN".into());
        }
        Ok(())
    }

    fn validate_tls(&self) -> Result<(), ConfigError> {
        let invalid = |field, reason: String| Err(ConfigError::Invalid { field, reason });
        let Some(tls) = &self.tls else { return Ok(()) };
        for (field, path) in [("tls.cert_file", &tls.cert_file), ("tls.key_file", &tls.key_file), ("tls.ca_file", &tls.ca_file)] {
            if path.as_os_str().is_empty() {
                return invalid(field, "must name a PEM file".into());
            }
        }
        if !(100..=3_600_000).contains(&tls.reload_interval_ms) {
            return invalid("tls.reload_interval_ms", format!("must be between 100 and 3600000, got {}", tls.reload_interval_ms));
        }
        // Peers are told apart by the DNS names in their certificates.
        // Peers are told apart by the DNS names in their certificates, which compare without
        // regard to case: lower-case names leave no doubt.
        let fields = std::iter::once(("node_id", &self.node_id)).chain(self.cluster.members.iter().map(|m| ("cluster.members", &m.name)));
        for (field, name) in fields {
            let dns = rustls_pki_types::DnsName::try_from(name.as_str()).is_ok() && name.parse::<std::net::IpAddr>().is_err();
            if !dns || name.chars().any(|c| c.is_ascii_uppercase()) {
                return invalid(
                    field,
                    format!("with tls, node and member names must be lower-case DNS names (certificates name them); {name:?} is not"),
                );
            }
        }
        Ok(())
    }

    /// This node's member entry, when it runs in a cluster.
    pub fn me(&self) -> Option<&MemberConfig> {
        self.cluster.members.iter().find(|m| m.name == self.node_id)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field, reason: String| Err(ConfigError::Invalid { field, reason });
        self.validate_tls()?;
        if let Some(encryption) = &self.encryption
            && std::iter::once(&encryption.key_file).chain(&encryption.previous_key_files).any(|f| f.as_os_str().is_empty())
        {
            return invalid("encryption.key_file", "must name a key file (and previous_key_files no empty entry)".into());
        }
        let s = &self.storage;
        let g = &self.group_commit;
        let l = &self.limits;
        if self.node_id.trim().is_empty() {
            return invalid("node_id", "must not be empty".into());
        }
        if s.partitions == 0 || s.partitions > MAX_PARTITIONS {
            return invalid("storage.partitions", format!("must be between 1 and {MAX_PARTITIONS}, got {}", s.partitions));
        }
        if s.map_size_max_bytes < (16 << 20) {
            return invalid("storage.map_size_max_bytes", format!("must be at least 16 MiB, got {}", s.map_size_max_bytes));
        }
        if s.map_size_initial_bytes == 0 {
            return invalid("storage.map_size_initial_bytes", "must be at least 1".into());
        }
        if s.max_readers < 16 {
            return invalid("storage.max_readers", format!("must be at least 16, got {}", s.max_readers));
        }
        if s.index_flush_events == 0 {
            return invalid("storage.index_flush_events", "must be at least 1".into());
        }
        if s.index_flush_interval_ms == 0 || s.index_flush_interval_ms > 60_000 {
            return invalid("storage.index_flush_interval_ms", format!("must be between 1 and 60000, got {}", s.index_flush_interval_ms));
        }
        if s.index_tail_max_events < s.index_flush_events {
            return invalid(
                "storage.index_tail_max_events",
                format!("must be at least storage.index_flush_events ({}), got {}", s.index_flush_events, s.index_tail_max_events),
            );
        }
        if self.app.command_id_retention_s == 0 || self.app.command_id_retention_s > MAX_COMMAND_ID_RETENTION_S {
            return invalid(
                "app.command_id_retention_s",
                format!("must be between 1 and {MAX_COMMAND_ID_RETENTION_S} (7 days), got {}", self.app.command_id_retention_s),
            );
        }
        self.validate_cluster()?;
        if g.max_wait_us > 1_000_000 {
            return invalid("group_commit.max_wait_us", format!("must be at most 1000000 (1 s), got {}", g.max_wait_us));
        }
        if g.max_batch_events < l.max_events_per_append {
            return invalid(
                "group_commit.max_batch_events",
                format!("must be at least limits.max_events_per_append ({}), got {}", l.max_events_per_append, g.max_batch_events),
            );
        }
        if g.max_batch_bytes < l.max_request_bytes {
            return invalid(
                "group_commit.max_batch_bytes",
                format!("must be at least limits.max_request_bytes ({}), got {}", l.max_request_bytes, g.max_batch_bytes),
            );
        }
        if g.queue_capacity == 0 {
            return invalid("group_commit.queue_capacity", "must be at least 1".into());
        }
        if l.max_stream_id_bytes == 0 || l.max_stream_id_bytes > MAX_STREAM_ID_BYTES {
            return invalid(
                "limits.max_stream_id_bytes",
                format!(
                    "must be between 1 and {MAX_STREAM_ID_BYTES} (the stream index's keys must fit LMDB's), got {}",
                    l.max_stream_id_bytes
                ),
            );
        }
        if l.max_event_type_bytes == 0 || l.max_event_type_bytes > 1024 {
            return invalid("limits.max_event_type_bytes", format!("must be between 1 and 1024, got {}", l.max_event_type_bytes));
        }
        if l.max_event_bytes == 0 || l.max_event_bytes > l.max_request_bytes {
            return invalid(
                "limits.max_event_bytes",
                format!("must be between 1 and limits.max_request_bytes ({}), got {}", l.max_request_bytes, l.max_event_bytes),
            );
        }
        if l.max_request_bytes > (256 << 20) {
            return invalid("limits.max_request_bytes", format!("must be at most 256 MiB, got {}", l.max_request_bytes));
        }
        if l.max_events_per_append == 0 {
            return invalid("limits.max_events_per_append", "must be at least 1".into());
        }
        if l.max_read_count == 0 {
            return invalid("limits.max_read_count", "must be at least 1".into());
        }
        if l.subscribe_buffer_bytes < 1024 || l.subscribe_buffer_bytes > (1 << 30) {
            return invalid("limits.subscribe_buffer_bytes", format!("must be between 1 KiB and 1 GiB, got {}", l.subscribe_buffer_bytes));
        }
        if l.max_subscribe_streams == 0 || l.max_subscribe_streams > 100_000 {
            return invalid("limits.max_subscribe_streams", format!("must be between 1 and 100000, got {}", l.max_subscribe_streams));
        }
        if l.max_concurrent_calls_per_connection == 0 || l.max_concurrent_calls_per_connection > 65_536 {
            return invalid(
                "limits.max_concurrent_calls_per_connection",
                format!("must be between 1 and 65536, got {}", l.max_concurrent_calls_per_connection),
            );
        }
        if l.calls_per_second_per_caller > 1_000_000 {
            return invalid(
                "limits.calls_per_second_per_caller",
                format!("must be at most 1000000 (0: no limit), got {}", l.calls_per_second_per_caller),
            );
        }
        if l.max_session_in_flight == 0 || l.max_session_in_flight > 65_536 {
            return invalid("limits.max_session_in_flight", format!("must be between 1 and 65536, got {}", l.max_session_in_flight));
        }
        if let Some(endpoint) = &self.telemetry.otlp_endpoint
            && !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
        {
            return invalid("telemetry.otlp_endpoint", format!("must be an http:// or https:// URL, got {endpoint:?}"));
        }
        if tracing_subscriber::EnvFilter::try_new(&self.telemetry.log_level).is_err() {
            return invalid("telemetry.log_level", format!("is not a tracing filter: {:?}", self.telemetry.log_level));
        }
        Ok(())
    }
}

impl StorageConfig {
    pub fn index_flush_interval(&self) -> Duration {
        Duration::from_millis(self.index_flush_interval_ms)
    }
}

impl GroupCommitConfig {
    pub fn max_wait(&self) -> Duration {
        Duration::from_micros(self.max_wait_us)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<NodeConfig, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.yaml");
        std::fs::write(&path, yaml).unwrap();
        let config = NodeConfig::load(&path)?;
        config.validate()?;
        Ok(config)
    }

    #[test]
    fn defaults_are_valid() {
        NodeConfig::default().validate().unwrap();
    }

    #[test]
    fn given_a_partial_file_when_loaded_then_other_fields_take_defaults() {
        let config = parse("node_id: a\nstorage:\n  partitions: 8\n").unwrap();
        assert_eq!(config.storage.partitions, 8);
        assert_eq!(config.storage.map_size_max_bytes, StorageConfig::default().map_size_max_bytes);
    }

    #[test]
    fn given_an_unknown_field_when_loaded_then_the_error_names_it() {
        let err = parse("storage:\n  partitons: 8\n").unwrap_err().to_string();
        assert!(err.contains("partitons"), "{err}");
    }

    #[test]
    fn given_zero_partitions_when_validated_then_the_error_names_the_field_and_reason() {
        let err = parse("storage:\n  partitions: 0\n").unwrap_err().to_string();
        assert_eq!(err, "invalid configuration: storage.partitions: must be between 1 and 4096, got 0");
    }

    #[test]
    fn given_a_wrong_type_when_loaded_then_the_error_says_where() {
        let err = parse("listen_addr: not-an-address\n").unwrap_err().to_string();
        assert!(err.contains("listen_addr") || err.contains("line 1"), "{err}");
    }

    #[test]
    fn given_a_session_without_room_for_one_append_when_validated_then_it_is_refused() {
        let err = parse("limits:\n  max_session_in_flight: 0\n").unwrap_err().to_string();
        assert_eq!(err, "invalid configuration: limits.max_session_in_flight: must be between 1 and 65536, got 0");
    }

    #[test]
    fn given_a_stream_id_limit_past_what_the_index_can_hold_when_validated_then_it_is_refused() {
        let err = parse("limits:\n  max_stream_id_bytes: 501\n").unwrap_err().to_string();
        assert!(err.starts_with("invalid configuration: limits.max_stream_id_bytes: must be between 1 and 500"), "{err}");
    }

    #[test]
    fn given_an_index_tail_smaller_than_a_flush_when_validated_then_it_is_refused() {
        let err = parse("storage:\n  index_flush_events: 1000\n  index_tail_max_events: 999\n").unwrap_err().to_string();
        assert_eq!(
            err,
            "invalid configuration: storage.index_tail_max_events: must be at least storage.index_flush_events (1000), got 999"
        );
    }

    #[test]
    fn member_addresses_are_ip_or_dns_host_and_port() {
        for good in [
            "127.0.0.1:7400",
            "[::1]:7400",
            "anthill-0.anthill-nodes.default.svc.cluster.local:7400",
            "anthill-0.anthill-nodes.default.svc.cluster.local.:7400",
            "localhost:1",
            "node-1:7400",
        ] {
            let address: PeerAddress = good.parse().unwrap_or_else(|e| panic!("{good}: {e}"));
            assert_eq!(address.to_string(), good);
        }
        assert_eq!("[::1]:7400".parse::<PeerAddress>().unwrap().host(), "::1");
        assert_eq!("node-1:7400".parse::<PeerAddress>().unwrap().host(), "node-1");
        assert_eq!("node-1:7400".parse::<PeerAddress>().unwrap().socket_addr(), None);
        for (bad, why) in [
            ("node-1", "no port"),
            ("node-1:0", "the port must be"),
            ("node-1:99999", "the port must be"),
            (":7400", "the host must be"),
            ("no_underscores:7400", "the host must be"),
            ("-dash:7400", "the host must be"),
            ("http://node-1:7400", "the host must be"),
            ("127.0.0.1:0", "the port must be"),
            ("10.0.0.300:7400", "the host must be"),
            ("node-1..:7400", "the host must be"),
            (".:7400", "the host must be"),
        ] {
            let err = bad.parse::<PeerAddress>().unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
        let yaml = "node_id: a\ncluster:\n  members:\n    - {id: 1, name: a, address: \"no_such host:7400\"}\n  replication_factor: 1\n";
        let err = parse(yaml).unwrap_err().to_string();
        assert!(err.contains("is not host:port"), "{err}");
    }

    const CLUSTER: &str = "node_id: a\ncluster:\n  members:\n    - {id: 1, name: a, address: 127.0.0.1:7400}\n  replication_factor: 1\n";

    #[test]
    fn given_retention_limits_then_they_are_read_for_a_single_node_and_a_cluster() {
        let single = parse("storage:\n  retention_max_events: 1000\n  retention_max_age_s: 60\n").unwrap();
        assert_eq!((single.storage.retention_max_events, single.storage.retention_max_age_s), (1000, 60));
        let cluster = parse(&format!("{CLUSTER}storage:\n  retention_max_age_s: 60\n")).unwrap();
        assert_eq!(cluster.storage.retention_max_age_s, 60);
    }

    #[test]
    fn given_no_coordination_section_then_the_embedded_store_is_used() {
        assert_eq!(parse(CLUSTER).unwrap().cluster.coordination, CoordinationConfig::Embedded {});
        let config = parse(&format!("{CLUSTER}  coordination:\n    kind: embedded\n")).unwrap();
        assert_eq!(config.cluster.coordination, CoordinationConfig::Embedded {});
    }

    #[test]
    fn given_consul_with_only_an_address_then_the_other_fields_take_their_defaults() {
        let yaml = format!("{CLUSTER}  session_ttl_ms: 10000\n  coordination:\n    kind: consul\n    address: http://10.0.0.5:8500\n");
        let config = parse(&yaml).unwrap();
        let expected = ConsulConfig { address: "http://10.0.0.5:8500".into(), ..ConsulConfig::default() };
        assert_eq!(config.cluster.coordination, CoordinationConfig::Consul(expected));
        assert_eq!(ConsulConfig::default().key_prefix, "anthill/");
    }

    #[test]
    fn given_consul_with_every_field_then_each_is_read() {
        let yaml = format!(
            "{CLUSTER}  session_ttl_ms: 15000\n  coordination:\n    kind: consul\n    address: http://consul:8500\n    token_file: /etc/anthill/consul-token\n    key_prefix: prod/anthill/\n    datacenter: eu-west-1\n"
        );
        let CoordinationConfig::Consul(consul) = parse(&yaml).unwrap().cluster.coordination else { panic!("not consul") };
        assert_eq!(consul.token_file.as_deref(), Some(Path::new("/etc/anthill/consul-token")));
        assert_eq!((consul.key_prefix.as_str(), consul.datacenter.as_deref()), ("prod/anthill/", Some("eu-west-1")));
    }

    #[test]
    fn given_consul_with_the_default_ttl_when_validated_then_the_ttl_is_refused_for_consuls_minimum() {
        let err = parse(&format!("{CLUSTER}  coordination:\n    kind: consul\n")).unwrap_err().to_string();
        assert_eq!(
            err,
            "invalid configuration: cluster.session_ttl_ms: Consul's sessions live at least 10 s: must be at least 10000 with consul, got 1000"
        );
    }

    #[test]
    fn given_consul_with_a_bad_address_prefix_or_datacenter_when_validated_then_the_error_names_the_field() {
        let consul = |fields: &str| parse(&format!("{CLUSTER}  session_ttl_ms: 10000\n  coordination:\n    kind: consul\n{fields}"));
        for (fields, field) in [
            ("    address: 127.0.0.1:8500\n", "cluster.coordination.address"),
            ("    address: https://consul:8501\n", "cluster.coordination.address"),
            ("    key_prefix: anthill\n", "cluster.coordination.key_prefix"),
            ("    key_prefix: /anthill/\n", "cluster.coordination.key_prefix"),
            ("    key_prefix: \"an thill/\"\n", "cluster.coordination.key_prefix"),
            ("    datacenter: \"\"\n", "cluster.coordination.datacenter"),
            ("    token_file: \"\"\n", "cluster.coordination.token_file"),
        ] {
            let err = consul(fields).unwrap_err().to_string();
            assert!(err.starts_with(&format!("invalid configuration: {field}: ")), "{fields:?}: {err}");
        }
    }

    #[test]
    fn given_a_token_or_an_unknown_field_in_the_consul_section_when_loaded_then_it_is_refused() {
        let err = parse(&format!("{CLUSTER}  session_ttl_ms: 10000\n  coordination:\n    kind: consul\n    token: s3cret\n")).unwrap_err();
        assert!(err.to_string().contains("unknown field `token`"), "{err}");
        let err = parse(&format!("{CLUSTER}  coordination:\n    kind: etcd\n")).unwrap_err();
        assert!(err.to_string().contains("etcd"), "{err}");
    }

    #[test]
    fn given_consul_fields_under_the_embedded_kind_when_loaded_then_they_are_refused() {
        let err = parse(&format!("{CLUSTER}  coordination:\n    kind: embedded\n    address: http://consul:8500\n")).unwrap_err();
        assert!(err.to_string().contains("address"), "{err}");
    }

    #[test]
    fn a_consul_configuration_printed_as_yaml_reads_back_the_same() {
        let mut config = parse(CLUSTER).unwrap();
        config.cluster.session_ttl_ms = 10_000;
        config.cluster.coordination =
            CoordinationConfig::Consul(ConsulConfig { datacenter: Some("dc1".into()), ..ConsulConfig::default() });
        let yaml = serde_yaml::to_string(&config).unwrap();
        assert!(yaml.contains("kind: consul"), "{yaml}");
        assert_eq!(parse(&yaml).unwrap(), config);
    }

    #[test]
    fn given_consul_without_cluster_members_when_validated_then_it_is_refused() {
        let err = parse("cluster:\n  session_ttl_ms: 10000\n  coordination:\n    kind: consul\n").unwrap_err().to_string();
        assert!(err.starts_with("invalid configuration: cluster.coordination: "), "{err}");
    }

    #[test]
    fn given_founders_then_the_others_join_and_the_group_starts_as_the_founders() {
        let members = "  members:\n    - { id: 1, name: a, address: 'a:1' }\n    - { id: 2, name: b, address: 'b:1' }\n    - { id: 3, name: c, address: 'c:1' }\n";
        let config = parse(&format!("node_id: c\ncluster:\n  replication_factor: 1\n  founders: [a, b]\n{members}")).unwrap();
        assert_eq!(config.cluster.founder_ids(), [1, 2]);
        assert!(config.cluster.joins("c") && !config.cluster.joins("a"));
        let everyone = parse(&format!("node_id: c\ncluster:\n  replication_factor: 1\n{members}")).unwrap();
        assert_eq!(everyone.cluster.founder_ids(), [1, 2, 3]);
        assert!(!everyone.cluster.joins("c"));
        // A founder gone since (a cluster scaled down) is fine; a list naming no member is not.
        parse(&format!("node_id: a\ncluster:\n  replication_factor: 1\n  founders: [a, gone]\n{members}")).unwrap();
        let err = parse(&format!("node_id: a\ncluster:\n  replication_factor: 1\n  founders: [x]\n{members}")).unwrap_err().to_string();
        assert!(err.starts_with("invalid configuration: cluster.founders: names no member"), "{err}");
    }

    #[test]
    fn given_an_event_limit_over_the_request_limit_when_validated_then_it_is_refused() {
        let err = parse("limits:\n  max_event_bytes: 100000000\n  max_request_bytes: 1000\n").unwrap_err().to_string();
        assert!(err.starts_with("invalid configuration: limits.max_event_bytes"), "{err}");
    }
}
