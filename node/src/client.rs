//! The client side used by the CLI, the benchmark and the tests: connecting to a node, and the
//! human and JSON renderings of what it answers.
//!
//! TLS is a setting of the process ([`use_tls`]): the CLI sets it once from `--tls-ca`,
//! `--tls-cert` and `--tls-key` (or `ANTHILL_TLS_*`), a test harness from the certificates it
//! made. With it every connection is `https` and shows the client certificate; a process talks
//! to one cluster, as one identity.

use std::path::Path;
use std::time::Duration;

use anthill_proto::v1 as pb;
use anyhow::Context;
use pb::auth_client::AuthClient;
use pb::event_log_client::EventLogClient;
use pb::ledger_client::LedgerClient;
use pb::node_client::NodeClient;
use pb::tenants_client::TenantsClient;
use serde_json::{Value, json};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

/// Largest response a client accepts (a node caps reads well below this).
const MAX_RESPONSE_BYTES: usize = 256 << 20;

/// Default server address of the CLI (`ANTHILL_SERVER` overrides it).
pub const DEFAULT_SERVER: &str = "127.0.0.1:7400";

#[derive(Clone)]
pub struct Clients {
    pub log: EventLogClient<Conn>,
    pub node: NodeClient<Conn>,
    pub ledger: LedgerClient<Conn>,
    pub auth: AuthClient<Conn>,
    pub tenants: TenantsClient<Conn>,
}

/// The cluster CA a client checks nodes against, and the certificate it shows them.
#[derive(Clone)]
pub struct ClientTls {
    ca_pem: Vec<u8>,
    identity: Option<(Vec<u8>, Vec<u8>)>,
    /// The name every node's certificate is checked against, instead of the dialled host.
    server_name: Option<String>,
}

impl ClientTls {
    /// Reads the CA and, when given, the client's certificate and key (PEM files).
    pub fn from_files(ca: &Path, identity: Option<(&Path, &Path)>) -> anyhow::Result<ClientTls> {
        let read = |path: &Path, what: &str| std::fs::read(path).with_context(|| format!("cannot read the {what} {}", path.display()));
        let ca_pem = read(ca, "cluster CA (--tls-ca)")?;
        crate::security::tls::certificates(&ca_pem).map_err(|e| anyhow::anyhow!("the cluster CA (--tls-ca) {}: {e}", ca.display()))?;
        let identity = match identity {
            Some((cert, key)) => Some((read(cert, "client certificate (--tls-cert)")?, read(key, "client key (--tls-key)")?)),
            None => None,
        };
        Ok(ClientTls { ca_pem, identity, server_name: None })
    }

    /// Checks every node's certificate against `name` instead of the host each is dialled at
    /// (`--tls-server-name`): for nodes reached at addresses their certificates do not name, as
    /// in the clouds, where certificates are made before the machines get their addresses. Every
    /// node's certificate must then carry `name` (`anthill certs node … --host NAME`).
    pub fn with_server_name(mut self, name: &str) -> anyhow::Result<ClientTls> {
        rustls_pki_types::ServerName::try_from(name.to_string())
            .map_err(|e| anyhow::anyhow!("--tls-server-name {name:?} is not a DNS name ({e})"))?;
        self.server_name = Some(name.to_string());
        Ok(self)
    }

    /// The CA and, when given, the client's certificate and key, as PEM bytes (a process that
    /// reads them from somewhere else than files: the operator, from Secrets).
    pub fn from_pem(ca_pem: Vec<u8>, identity: Option<(Vec<u8>, Vec<u8>)>) -> anyhow::Result<ClientTls> {
        crate::security::tls::certificates(&ca_pem).map_err(|e| anyhow::anyhow!("the cluster CA: {e}"))?;
        Ok(ClientTls { ca_pem, identity, server_name: None })
    }

    fn config(&self) -> tonic::transport::ClientTlsConfig {
        let mut config = tonic::transport::ClientTlsConfig::new().ca_certificate(tonic::transport::Certificate::from_pem(&self.ca_pem));
        if let Some(name) = &self.server_name {
            config = config.domain_name(name);
        }
        match &self.identity {
            Some((cert, key)) => config.identity(tonic::transport::Identity::from_pem(cert, key)),
            None => config,
        }
    }
}

static TLS: std::sync::RwLock<Option<ClientTls>> = std::sync::RwLock::new(None);
static TOKEN: std::sync::RwLock<Option<String>> = std::sync::RwLock::new(None);

/// A connection with this process's credentials on every call.
pub type Conn = InterceptedService<Channel, Credentials>;

/// Puts the bearer token of [`use_token`] (as it was when the connection was made) on every
/// call.
#[derive(Clone)]
pub struct Credentials(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl Credentials {
    fn current() -> Credentials {
        let token = TOKEN.read().unwrap_or_else(|e| e.into_inner()).clone();
        Credentials(token.and_then(|t| format!("Bearer {t}").parse().ok()))
    }
}

impl tonic::service::Interceptor for Credentials {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// Makes every later connection of this process send `token` as its bearer token; a token
/// that cannot be a header value (a stray newline) is an error, not silently left out.
pub fn use_token(token: Option<String>) -> anyhow::Result<()> {
    if let Some(t) = &token
        && format!("Bearer {t}").parse::<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>().is_err()
    {
        anyhow::bail!("the bearer token holds characters a header cannot carry (a newline?)");
    }
    *TOKEN.write().unwrap_or_else(|e| e.into_inner()) = token;
    Ok(())
}

/// Makes every later connection of this process use `tls` (module doc); `None`: plain text.
pub fn use_tls(tls: Option<ClientTls>) {
    *TLS.write().unwrap_or_else(|e| e.into_inner()) = tls;
}

fn tls() -> Option<ClientTls> {
    TLS.read().unwrap_or_else(|e| e.into_inner()).clone()
}

/// `host:port` or a URL; plain addresses get `https://` when the process uses TLS, else
/// `http://`.
pub fn server_url(server: &str) -> String {
    url_for(server, tls().is_some())
}

fn url_for(server: &str, tls: bool) -> String {
    if server.contains("://") {
        return server.to_string();
    }
    let scheme = if tls { "https" } else { "http" };
    format!("{scheme}://{server}")
}

/// The endpoint of `url`, with this process's TLS when it is `https`.
pub fn endpoint(url: &str) -> anyhow::Result<Endpoint> {
    let token = TOKEN.read().unwrap_or_else(|e| e.into_inner()).is_some();
    endpoint_for(url, tls().as_ref(), token)
}

fn endpoint_for(url: &str, tls: Option<&ClientTls>, token: bool) -> anyhow::Result<Endpoint> {
    let endpoint = Endpoint::from_shared(url.to_string()).with_context(|| format!("bad node address {url:?}"))?;
    if !url.starts_with("https://") {
        if token {
            anyhow::bail!("{url} is plain http: a bearer token is only sent over TLS (give the cluster CA with --tls-ca)");
        }
        return Ok(endpoint);
    }
    let Some(tls) = tls else {
        anyhow::bail!("{url} is https: give the cluster CA with --tls-ca (or ANTHILL_TLS_CA)");
    };
    endpoint.tls_config(tls.config()).with_context(|| format!("cannot use TLS towards {url}"))
}

async fn open(url: &str, endpoint: Endpoint) -> anyhow::Result<Channel> {
    endpoint.connect_timeout(Duration::from_secs(5)).tcp_nodelay(true).connect().await.with_context(|| format!("cannot connect to {url}"))
}

/// Connects (one HTTP/2 connection, shared by both clients).
pub async fn connect(server: &str) -> anyhow::Result<Clients> {
    let url = server_url(server);
    let channel = open(&url, endpoint(&url)?).await?;
    Ok(clients(channel))
}

/// Connects with `tls` (plain text when `None`) and no token, whatever this process's own
/// settings: for a process that talks to several clusters, each with its own CA (the
/// operator).
pub async fn connect_with(server: &str, tls: Option<&ClientTls>) -> anyhow::Result<Clients> {
    let url = url_for(server, tls.is_some());
    let channel = open(&url, endpoint_for(&url, tls, false)?).await?;
    Ok(clients_with(channel, Credentials(None)))
}

/// Whose credentials a connection carries: this process's ([`use_tls`], [`use_token`]), or the
/// TLS given (a process talking to several clusters, each with its own CA: the operator).
#[derive(Clone, Copy)]
pub enum Dial<'a> {
    Process,
    With(Option<&'a ClientTls>),
}

impl Dial<'_> {
    pub async fn connect(self, server: &str) -> anyhow::Result<Clients> {
        match self {
            Dial::Process => connect(server).await,
            Dial::With(tls) => connect_with(server, tls).await,
        }
    }
}

pub fn clients(channel: Channel) -> Clients {
    clients_with(channel, Credentials::current())
}

fn clients_with(channel: Channel, credentials: Credentials) -> Clients {
    let channel = InterceptedService::new(channel, credentials);
    Clients {
        auth: AuthClient::new(channel.clone()),
        tenants: TenantsClient::new(channel.clone()),
        log: EventLogClient::new(channel.clone())
            .max_decoding_message_size(MAX_RESPONSE_BYTES)
            .max_encoding_message_size(MAX_RESPONSE_BYTES),
        node: NodeClient::new(channel.clone()),
        ledger: LedgerClient::new(channel),
    }
}

/// A gRPC status as a one-line error: code and message.
pub fn status_error(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", status.code(), status.message())
}

/// JSON form of an event; the payload as text when it is UTF-8, else as hex.
pub fn event_json(e: &pb::RecordedEvent) -> Value {
    let mut metadata: Vec<_> = e.metadata.iter().collect();
    metadata.sort();
    let mut v = json!({
        "partition": e.partition,
        "position": e.position,
        "stream": e.stream,
        "stream_version": e.stream_version,
        "type": e.r#type,
        "metadata": metadata.into_iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect::<serde_json::Map<_, _>>(),
        "append_time_us": e.append_time_us,
        "epoch": e.epoch,
    });
    match std::str::from_utf8(&e.payload) {
        Ok(text) => v["payload"] = Value::String(text.into()),
        Err(_) => v["payload_hex"] = Value::String(e.payload.iter().map(|b| format!("{b:02x}")).collect()),
    }
    v
}

/// One line per event for people.
pub fn event_line(e: &pb::RecordedEvent) -> String {
    let payload = String::from_utf8_lossy(&e.payload);
    let payload = if payload.len() > 120 { format!("{}…", &payload[..payload.floor_char_boundary(120)]) } else { payload.into_owned() };
    format!("p{}#{} {}@{} {} {}", e.partition, e.position, e.stream, e.stream_version, e.r#type, payload)
}

pub fn status_json(s: &pb::StatusResponse) -> Value {
    json!({
        "node_id": s.node_id,
        "version": s.version,
        "partition_count": s.partition_count,
        "total_events": s.total_events,
        "db_size_bytes": s.db_size_bytes,
        "map_size_bytes": s.map_size_bytes,
        "uptime_ms": s.uptime_ms,
        "data_dir": s.data_dir,
        "write_failure": (!s.write_failure.is_empty()).then(|| s.write_failure.clone()),
        "partitions": s.partitions.iter().map(|p| json!({
            "partition": p.partition, "head_position": p.head_position, "epoch": p.epoch,
            "commit_position": p.commit_position, "floor_position": p.floor_position,
            "followers": p.followers.iter().map(|f| json!({
                "node": f.node, "matched_position": f.matched_position, "lag": f.lag,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "cluster": s.cluster.as_ref().map(cluster_json),
    })
}

fn cluster_json(c: &pb::ClusterStatus) -> Value {
    json!({
        "members": c.members.iter().map(|m| json!({
            "name": m.name, "address": m.address, "live": m.live, "decommissioned": m.decommissioned,
            "draining": m.draining,
        })).collect::<Vec<_>>(),
        "partitions": c.partitions.iter().map(|p| json!({
            "partition": p.partition, "replicas": p.replicas,
            "leader": (!p.leader.is_empty()).then(|| p.leader.clone()), "epoch": p.epoch,
            "moving_to": (!p.target.is_empty()).then(|| p.target.clone()),
        })).collect::<Vec<_>>(),
        "coordination": c.coordination,
        "coordination_leader": c.coordination_leader,
        "coordination_applied": c.coordination_applied,
        "coordination_voters": c.coordination_voters,
    })
}

/// The cluster part of `anthill status`: members, then each partition's leader and epoch.
fn cluster_text(c: &pb::ClusterStatus) -> String {
    let members: Vec<String> = c
        .members
        .iter()
        .map(|m| {
            let down = if m.live { "" } else { ", down" };
            let out = if m.decommissioned { ", decommissioned" } else { "" };
            let draining = if m.draining { ", draining" } else { "" };
            format!("{} ({}{down}{out}{draining})", m.name, m.address)
        })
        .collect();
    let mut out = format!(
        "
cluster    {}
",
        members.join(", ")
    );
    if c.coordination == "consul" {
        out.push_str(&format!(
            "coordination Consul, last index read {}
",
            c.coordination_applied
        ));
    } else {
        let voters: Vec<String> = c.coordination_voters.iter().map(u64::to_string).collect();
        out.push_str(&format!(
            "coordination embedded, leader {} (raft id), applied through {}, voters {}
",
            c.coordination_leader,
            c.coordination_applied,
            voters.join(",")
        ));
    }
    if c.partitions.is_empty() {
        out.push_str(
            "partitions not placed yet (waiting for enough live members)
",
        );
        return out;
    }
    out.push_str("leader@epoch by partition:\n");
    for row in c.partitions.chunks(4) {
        let cells: Vec<String> = row
            .iter()
            .map(|p| {
                let leader = if p.leader.is_empty() { "none".to_string() } else { format!("{}@{}", p.leader, p.epoch) };
                format!("{:>22}", format!("p{}={leader}", p.partition))
            })
            .collect();
        out.push_str(&format!("{}\n", cells.join("")));
    }
    let moving: Vec<String> = c
        .partitions
        .iter()
        .filter(|p| !p.target.is_empty())
        .map(|p| format!("p{} {} -> {}", p.partition, p.replicas.join(","), p.target.join(",")))
        .collect();
    if !moving.is_empty() {
        out.push_str(&format!("moving     {}\n", moving.join("; ")));
    }
    out
}

pub fn status_text(s: &pb::StatusResponse) -> String {
    let used: Vec<_> = s.partitions.iter().filter(|p| p.head_position > 0).collect();
    let mut out = format!(
        "node       {} (anthill {})\nuptime     {:.1} s\ndata dir   {}\nevents     {}\nstorage    {} used of a {} map\npartitions {} ({} hold events)\n",
        s.node_id,
        s.version,
        s.uptime_ms as f64 / 1000.0,
        s.data_dir,
        s.total_events,
        human_bytes(s.db_size_bytes),
        human_bytes(s.map_size_bytes),
        s.partition_count,
        used.len()
    );
    if !s.write_failure.is_empty() {
        out.push_str(&format!("writes     REFUSED until restart: {}\n", s.write_failure));
    }
    if let Some(cluster) = &s.cluster {
        out.push_str(&cluster_text(cluster));
    }
    if !used.is_empty() {
        // Compact: eight partitions a line, `p<partition>=<head position>`, epochs below if mixed.
        out.push_str("\nhead position by partition:\n");
        for row in used.chunks(8) {
            let cells: Vec<String> = row.iter().map(|p| format!("{:>12}", format!("p{}={}", p.partition, p.head_position))).collect();
            out.push_str(&format!("{}\n", cells.join("")));
        }
        let trimmed: Vec<String> =
            used.iter().filter(|p| p.floor_position > 0).map(|p| format!("p{}={}", p.partition, p.floor_position)).collect();
        if !trimmed.is_empty() {
            out.push_str(&format!("given up through (retention): {}\n", trimmed.join(" ")));
        }
        let epochs: std::collections::BTreeSet<u64> = used.iter().map(|p| p.epoch).collect();
        out.push_str(&format!("epochs     {}\n", epochs.iter().map(u64::to_string).collect::<Vec<_>>().join(", ")));
    }
    if s.cluster.is_some() {
        out.push_str(&replication_text(&s.partitions));
    }
    out
}

/// A cluster node's replication: commit positions, and its followers' lag where it leads.
fn replication_text(partitions: &[pb::PartitionStatus]) -> String {
    let behind: Vec<String> = partitions
        .iter()
        .filter(|p| p.commit_position < p.head_position)
        .map(|p| format!("p{}={}", p.partition, p.head_position - p.commit_position))
        .collect();
    let mut out = format!(
        "uncommitted {}\n",
        if behind.is_empty() { "none (every event here is on a majority)".to_string() } else { behind.join(" ") }
    );
    let led: Vec<&pb::PartitionStatus> = partitions.iter().filter(|p| !p.followers.is_empty()).collect();
    if !led.is_empty() {
        out.push_str(&format!("followers' lag on the {} partitions this node leads:\n", led.len()));
        for row in led.chunks(4) {
            let cells: Vec<String> = row
                .iter()
                .map(|p| {
                    let lags: Vec<String> = p.followers.iter().map(|f| format!("{}:{}", f.node, f.lag)).collect();
                    format!("{:<30}", format!("p{} {}", p.partition, lags.join(" ")))
                })
                .collect();
            out.push_str(&format!("{}\n", cells.join("").trim_end()));
        }
    }
    out
}

pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{bytes} B") } else { format!("{value:.1} {}", UNITS[unit]) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_addresses_get_a_scheme() {
        assert_eq!(server_url("127.0.0.1:7400"), "http://127.0.0.1:7400");
        assert_eq!(server_url("https://n1:7400"), "https://n1:7400");
    }

    #[test]
    fn binary_payloads_render_as_hex() {
        let e = pb::RecordedEvent { payload: vec![0xff, 0x00], ..Default::default() };
        assert_eq!(event_json(&e)["payload_hex"], "ff00");
        assert_eq!(human_bytes(1536), "1.5 KiB");
    }
}
