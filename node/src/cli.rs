//! The `anthill` command line: `node` runs a node; `append`, `read`, `tail` and `status` are a
//! small client; `ledger` drives the ledger domain ([`ledger`]); `specs` runs specifications;
//! `bench` is the load generator; `demo` is the README's main job.
//!
//! Every report has a `--json` form on stdout; progress and logs go to stderr.

use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anthill_proto::v1 as pb;
use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use tokio_stream::StreamExt;

mod auth;
mod certs;
mod chaos;
pub use chaos::parse_duration;
mod decommission;
pub mod drain;
mod ledger;
mod sim;

use crate::client::{self, DEFAULT_SERVER};
use crate::config::{LogFormat, NodeConfig};

#[derive(Parser)]
#[command(name = "anthill", version, about = "Anthill: a durable, partitioned event log and command processor")]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    tls: TlsArgs,
}

/// How this command reaches TLS nodes (docs/security.md); nodes themselves take `tls` from
/// their config.
#[derive(Args)]
struct TlsArgs {
    /// The cluster CA (PEM): connect with TLS and check nodes against it.
    #[arg(long, global = true, env = "ANTHILL_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// This client's certificate (PEM), signed by the cluster CA.
    #[arg(long, global = true, env = "ANTHILL_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// The client certificate's key (PEM).
    #[arg(long, global = true, env = "ANTHILL_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// Check every node's certificate against this name instead of the host dialled (nodes
    /// whose certificates do not name their addresses, as made for the cloud modules).
    #[arg(long, global = true, env = "ANTHILL_TLS_SERVER_NAME")]
    tls_server_name: Option<String>,
    /// A bearer token (`anthill auth token create`), sent on every call (over TLS only).
    #[arg(long, global = true, env = "ANTHILL_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

impl TlsArgs {
    fn client_tls(&self) -> anyhow::Result<Option<client::ClientTls>> {
        let identity = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some((cert.as_path(), key.as_path())),
            (None, None) => None,
            _ => bail!("--tls-cert and --tls-key go together (ANTHILL_TLS_CERT, ANTHILL_TLS_KEY)"),
        };
        match &self.tls_ca {
            Some(ca) => {
                let tls = client::ClientTls::from_files(ca, identity)?;
                Ok(Some(match &self.tls_server_name {
                    Some(name) => tls.with_server_name(name)?,
                    None => tls,
                }))
            }
            None if identity.is_some() => bail!("--tls-cert needs --tls-ca: the CA the nodes' certificates are checked against"),
            None if self.tls_server_name.is_some() => bail!("--tls-server-name needs --tls-ca (ANTHILL_TLS_CA)"),
            None => Ok(None),
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run a node.
    Node(Box<NodeArgs>),
    /// Append events to a stream.
    Append(AppendArgs),
    /// Read a stream, or a partition with --partition.
    Read(ReadArgs),
    /// Follow new events (replaying from --from first).
    Tail(TailArgs),
    /// Show a node's state.
    Status(StatusArgs),
    /// Take a member out of every replica set (its partitions move to the others), or back in.
    Decommission(decommission::DecommissionArgs),
    /// Make a node hand its leaderships to other replicas and take none (before stopping it),
    /// or lead again.
    Drain(drain::DrainArgs),
    /// Load a node and report throughput and latency.
    Bench(crate::bench::BenchArgs),
    /// Start a node on loopback, push a short load at it, and show what happened.
    Demo(crate::demo::DemoArgs),
    /// Ledger commands and queries (accounts, transfers, holds).
    Ledger(ledger::LedgerArgs),
    /// Run the deterministic simulation: one seed (replayed exactly), or a hunt for failing ones.
    Sim(sim::SimArgs),
    /// Run a local cluster of real node processes under load while leaders are killed, then
    /// check that nothing acknowledged was lost.
    Chaos(chaos::ChaosArgs),
    /// Run the chaos suite's clients against a running cluster (while something else disturbs
    /// it), then check that nothing acknowledged was lost and that the replicas agree.
    Workload(chaos::WorkloadArgs),
    /// Run given-when-then specs (or measure their speed with --perf).
    Specs(crate::app::specs::command::SpecsArgs),
    /// Make a development CA and node or client certificates signed by it.
    Certs(certs::CertsArgs),
    /// Bearer tokens and the grants of certificate principals (who may do what).
    Auth(auth::AuthArgs),
    /// Tenants' data at rest: forget a tenant for good, re-wrap data keys after a key rotation.
    Tenant(auth::TenantArgs),
}

/// Every field of the config file as a flag; a flag wins over the file.
#[derive(Args, Default)]
pub struct NodeArgs {
    /// YAML config file (see docs/configuration.md). Without it, defaults and flags.
    #[arg(long, short)]
    config: Option<PathBuf>,
    #[arg(long)]
    node_id: Option<String>,
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// gRPC listen address (port 0: any free port).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Prometheus listen address, or `none`.
    #[arg(long)]
    metrics_listen: Option<String>,
    #[arg(long)]
    partitions: Option<u32>,
    #[arg(long)]
    map_size_initial_bytes: Option<u64>,
    #[arg(long)]
    map_size_max_bytes: Option<u64>,
    #[arg(long)]
    max_readers: Option<u32>,
    #[arg(long)]
    index_flush_events: Option<usize>,
    #[arg(long)]
    index_flush_interval_ms: Option<u64>,
    #[arg(long)]
    index_tail_max_events: Option<usize>,
    #[arg(long)]
    retention_max_events: Option<u64>,
    #[arg(long)]
    retention_max_age_s: Option<u64>,
    #[arg(long)]
    group_commit_max_wait_us: Option<u64>,
    #[arg(long)]
    group_commit_max_batch_events: Option<usize>,
    #[arg(long)]
    group_commit_max_batch_bytes: Option<usize>,
    #[arg(long)]
    group_commit_queue_capacity: Option<usize>,
    #[arg(long)]
    max_stream_id_bytes: Option<usize>,
    #[arg(long)]
    max_event_type_bytes: Option<usize>,
    #[arg(long)]
    max_event_bytes: Option<usize>,
    #[arg(long)]
    max_events_per_append: Option<usize>,
    #[arg(long)]
    max_request_bytes: Option<usize>,
    #[arg(long)]
    max_read_count: Option<u32>,
    #[arg(long)]
    subscribe_buffer_bytes: Option<usize>,
    #[arg(long)]
    max_session_in_flight: Option<usize>,
    #[arg(long)]
    max_subscribe_streams: Option<usize>,
    #[arg(long)]
    max_concurrent_calls_per_connection: Option<usize>,
    #[arg(long)]
    calls_per_second_per_caller: Option<u32>,
    #[arg(long)]
    max_connections_per_address: Option<usize>,
    #[arg(long)]
    command_id_retention_s: Option<u64>,
    /// `human` or `json`.
    #[arg(long, value_parser = parse_log_format)]
    log_format: Option<LogFormat>,
    #[arg(long)]
    log_level: Option<String>,
    /// OTLP/gRPC endpoint for spans, e.g. http://127.0.0.1:4317.
    #[arg(long)]
    otlp_endpoint: Option<String>,
    #[arg(long)]
    service_name: Option<String>,
    /// `tls.cert_file`: this node's certificate (PEM); with the two below, TLS is on.
    #[arg(long, requires_all = ["tls_key_file", "tls_ca_file"])]
    tls_cert_file: Option<PathBuf>,
    /// `tls.key_file`.
    #[arg(long, requires_all = ["tls_cert_file", "tls_ca_file"])]
    tls_key_file: Option<PathBuf>,
    /// `tls.ca_file`.
    #[arg(long, requires_all = ["tls_cert_file", "tls_key_file"])]
    tls_ca_file: Option<PathBuf>,
    /// `encryption.key_file`: encrypt tenants' events at rest under this key-encryption key.
    #[arg(long)]
    encryption_key_file: Option<PathBuf>,
    /// Print the effective configuration as YAML and exit.
    #[arg(long)]
    print_config: bool,
}

fn parse_log_format(s: &str) -> Result<LogFormat, String> {
    match s {
        "human" => Ok(LogFormat::Human),
        "json" => Ok(LogFormat::Json),
        _ => Err(format!("expected `human` or `json`, got {s:?}")),
    }
}

impl NodeArgs {
    /// The file's configuration (or the defaults) with every given flag applied over it.
    pub fn config(&self) -> anyhow::Result<NodeConfig> {
        let mut c = match &self.config {
            Some(path) => NodeConfig::load(path)?,
            None => NodeConfig::default(),
        };
        macro_rules! set {
            ($($flag:ident => $($field:ident).+),* $(,)?) => {
                $(if let Some(v) = &self.$flag { c.$($field).+ = v.clone().into(); })*
            };
        }
        set!(
            node_id => node_id, data_dir => data_dir, listen => listen_addr,
            partitions => storage.partitions, map_size_initial_bytes => storage.map_size_initial_bytes,
            map_size_max_bytes => storage.map_size_max_bytes, max_readers => storage.max_readers,
            index_flush_events => storage.index_flush_events, index_flush_interval_ms => storage.index_flush_interval_ms,
            index_tail_max_events => storage.index_tail_max_events,
            retention_max_events => storage.retention_max_events, retention_max_age_s => storage.retention_max_age_s,
            group_commit_max_wait_us => group_commit.max_wait_us,
            group_commit_max_batch_events => group_commit.max_batch_events,
            group_commit_max_batch_bytes => group_commit.max_batch_bytes,
            group_commit_queue_capacity => group_commit.queue_capacity,
            max_stream_id_bytes => limits.max_stream_id_bytes, max_event_type_bytes => limits.max_event_type_bytes,
            max_event_bytes => limits.max_event_bytes, max_events_per_append => limits.max_events_per_append,
            max_request_bytes => limits.max_request_bytes, max_read_count => limits.max_read_count,
            subscribe_buffer_bytes => limits.subscribe_buffer_bytes, max_session_in_flight => limits.max_session_in_flight,
            max_subscribe_streams => limits.max_subscribe_streams,
            max_concurrent_calls_per_connection => limits.max_concurrent_calls_per_connection,
            calls_per_second_per_caller => limits.calls_per_second_per_caller,
            max_connections_per_address => limits.max_connections_per_address,
            command_id_retention_s => app.command_id_retention_s,
            log_format => telemetry.log_format, log_level => telemetry.log_level,
            service_name => telemetry.service_name,
        );
        if let Some(endpoint) = &self.otlp_endpoint {
            c.telemetry.otlp_endpoint = Some(endpoint.clone());
        }
        if let (Some(cert_file), Some(key_file), Some(ca_file)) = (&self.tls_cert_file, &self.tls_key_file, &self.tls_ca_file) {
            let reload_interval_ms = c.tls.as_ref().map_or(crate::config::TlsConfig::DEFAULT_RELOAD_INTERVAL_MS, |t| t.reload_interval_ms);
            c.tls = Some(crate::config::TlsConfig {
                cert_file: cert_file.clone(),
                key_file: key_file.clone(),
                ca_file: ca_file.clone(),
                reload_interval_ms,
            });
        }
        if let Some(key_file) = &self.encryption_key_file {
            let previous_key_files = c.encryption.take().map(|e| e.previous_key_files).unwrap_or_default();
            c.encryption = Some(crate::config::EncryptionConfig { key_file: key_file.clone(), previous_key_files });
        }
        if let Some(addr) = &self.metrics_listen {
            c.metrics_addr = match addr.as_str() {
                "none" => None,
                a => Some(a.parse().with_context(|| format!("--metrics-listen: {a:?} is not an address or `none`"))?),
            };
        }
        Ok(c)
    }
}

#[derive(Args)]
pub(crate) struct ServerArg {
    /// Node to talk to; for `append`, any node of the cluster (or several, comma-separated):
    /// the append goes to its partition's leader.
    #[arg(long, short, env = "ANTHILL_SERVER", default_value = DEFAULT_SERVER, global = true)]
    pub(crate) server: String,
}

/// When an append is acknowledged (docs/replication.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DurabilityArg {
    /// Once the partition's leader has it on disk: fast, lost if the leader fails before a
    /// majority has it.
    Leader,
    /// Once a majority of the partition's replicas has it on disk: never lost.
    Quorum,
}

impl DurabilityArg {
    pub fn wire(self) -> i32 {
        match self {
            DurabilityArg::Leader => pb::Durability::Leader as i32,
            DurabilityArg::Quorum => pb::Durability::Quorum as i32,
        }
    }
}

#[derive(Args)]
struct AppendArgs {
    #[command(flatten)]
    server: ServerArg,
    stream: String,
    /// Event type of every appended event.
    #[arg(long = "type", short = 't')]
    event_type: String,
    /// Payload of one event; repeat for several events in one atomic append.
    #[arg(long, short)]
    data: Vec<String>,
    /// Read payloads from stdin, one event per line (after any --data).
    #[arg(long)]
    stdin: bool,
    /// `any`, `no-stream`, `exists` or a version number.
    #[arg(long, default_value = "any")]
    expected: String,
    /// Metadata `key=value` on every event; repeatable.
    #[arg(long = "meta", short)]
    metadata: Vec<String>,
    #[arg(long, value_enum, default_value = "quorum")]
    durability: DurabilityArg,
    /// Then read the appended events back from the partition's leader (a linearizable read) and
    /// fail unless they are what was appended: a smoke test of a cluster (the chart's `helm test`).
    #[arg(long)]
    verify: bool,
    /// Keep trying for up to this many seconds while no node of the cluster answers (a cluster
    /// just installed, its Service not yet routed); 0: give up at once.
    #[arg(long, value_name = "SECONDS", default_value_t = 0)]
    wait_for_cluster: u64,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ReadArgs {
    #[command(flatten)]
    server: ServerArg,
    /// Stream to read (or use --partition).
    #[arg(required_unless_present = "partition")]
    stream: Option<String>,
    #[arg(long, conflicts_with = "stream")]
    partition: Option<u32>,
    /// First version (stream) or position (partition).
    #[arg(long, default_value_t = 1)]
    from: u64,
    /// Most events to print (0: all, page by page).
    #[arg(long, default_value_t = 100)]
    max: u64,
    /// Read at the partition's leader once a majority confirmed its leadership: the read sees
    /// every write acknowledged before it (--server may list several nodes of the cluster).
    #[arg(long)]
    linearizable: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct TailArgs {
    #[command(flatten)]
    server: ServerArg,
    /// Partitions to follow (repeatable); default all.
    #[arg(long)]
    partition: Vec<u32>,
    /// Streams to follow (repeatable).
    #[arg(long, conflicts_with = "partition")]
    stream: Vec<String>,
    /// Start position in each partition (0/1: the beginning). Default: only new events.
    #[arg(long)]
    from: Option<u64>,
    /// Stop after this many events.
    #[arg(long)]
    count: Option<u64>,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct StatusArgs {
    #[command(flatten)]
    server: ServerArg,
    #[arg(long)]
    json: bool,
}

/// Runs the command; the process's exit code is 0 on success.
pub fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // A node takes TLS from its config; `certs` may be making the very files the flags name.
    if !matches!(cli.command, Command::Node(_) | Command::Certs(_)) {
        client::use_tls(cli.tls.client_tls()?);
        client::use_token(cli.tls.token.clone())?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    match cli.command {
        Command::Node(args) => runtime.block_on(run_node(*args)),
        Command::Append(args) => runtime.block_on(append(args)),
        Command::Read(args) => runtime.block_on(read(args)),
        Command::Tail(args) => runtime.block_on(tail(args)),
        Command::Status(args) => runtime.block_on(status(args)),
        Command::Decommission(args) => runtime.block_on(decommission::run(args)),
        Command::Drain(args) => runtime.block_on(drain::run(args)),
        Command::Bench(args) => runtime.block_on(crate::bench::run(args)),
        Command::Demo(args) => runtime.block_on(crate::demo::run(args)),
        Command::Specs(args) => crate::app::specs::command::run(args),
        Command::Ledger(args) => runtime.block_on(ledger::run(args)),
        Command::Sim(args) => sim::run(args),
        Command::Chaos(args) => runtime.block_on(chaos::run(args)),
        Command::Workload(args) => runtime.block_on(chaos::workload(args)),
        Command::Certs(args) => certs::run(args),
        Command::Auth(args) => runtime.block_on(auth::run(args)),
        Command::Tenant(args) => runtime.block_on(auth::tenant(args)),
    }
}

async fn run_node(args: NodeArgs) -> anyhow::Result<()> {
    let config = args.config()?;
    config.validate()?;
    if args.print_config {
        print!("{}", serde_yaml::to_string(&config)?);
        return Ok(());
    }
    let _telemetry = crate::telemetry::init(&config.telemetry)?;
    // Handlers first: a SIGTERM sent as soon as the node says it is ready must stop it cleanly.
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let node = crate::server::start(&config).await?;
    let metrics = node.metrics_addr.map_or("none".to_string(), |a| a.to_string());
    println!("{} grpc={} metrics={}", crate::local::READY_PREFIX, node.grpc_addr, metrics);
    std::io::stdout().flush()?;
    tokio::select! {
        _ = interrupt.recv() => tracing::info!("SIGINT: stopping"),
        _ = terminate.recv() => tracing::info!("SIGTERM: stopping"),
        why = node.failed() => {
            // No drain: nobody can reach the node any more. Exits with a failure, so that
            // systemd (`Restart=on-failure`) or the kubelet starts it again.
            node.stop();
            let _ = node.stopped().await;
            anyhow::bail!("{why}; stopped");
        }
    }
    // A cluster node hands its leaderships over first (`cluster.drain_on_stop_ms`).
    node.drain_before_stop(async {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
    })
    .await;
    node.stop();
    node.stopped().await
}

fn parse_expected(s: &str) -> anyhow::Result<pb::ExpectedVersion> {
    use pb::expected_version::Kind;
    let kind = match s {
        "any" => Kind::Any(pb::Empty {}),
        "no-stream" => Kind::NoStream(pb::Empty {}),
        "exists" => Kind::StreamExists(pb::Empty {}),
        v => Kind::Exact(v.parse().with_context(|| format!("--expected: {v:?} is not any, no-stream, exists or a version"))?),
    };
    Ok(pb::ExpectedVersion { kind: Some(kind) })
}

/// A router to the cluster behind `seeds`, trying again every second for up to `wait` while no
/// node answers; each failed try is reported on stderr.
async fn connect_waiting(seeds: &[String], wait: Duration) -> anyhow::Result<crate::router::Router> {
    let until = tokio::time::Instant::now() + wait;
    loop {
        match crate::router::Router::connect(seeds).await {
            Ok(router) => return Ok(router),
            Err(e) if tokio::time::Instant::now() < until => {
                eprintln!(
                    "anthill: waiting for the cluster ({}s left): {e:#}",
                    until.saturating_duration_since(tokio::time::Instant::now()).as_secs()
                );
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

async fn append(args: AppendArgs) -> anyhow::Result<()> {
    let mut payloads = args.data.clone();
    if args.stdin {
        for line in std::io::stdin().lock().lines() {
            payloads.push(line?);
        }
    }
    if payloads.is_empty() {
        bail!("nothing to append: give --data PAYLOAD (repeatable) or --stdin");
    }
    let metadata = args
        .metadata
        .iter()
        .map(|kv| {
            kv.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())).with_context(|| format!("--meta: {kv:?} is not key=value"))
        })
        .collect::<anyhow::Result<std::collections::HashMap<_, _>>>()?;
    let request = pb::AppendRequest {
        durability: args.durability.wire(),
        stream: args.stream.clone(),
        expected_version: Some(parse_expected(&args.expected)?),
        events: payloads
            .into_iter()
            .map(|p| pb::EventData { r#type: args.event_type.clone(), payload: p.into_bytes(), metadata: metadata.clone() })
            .collect(),
    };
    let n = request.events.len();
    let seeds: Vec<String> = args.server.server.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
    let router = connect_waiting(&seeds, Duration::from_secs(args.wait_for_cluster)).await?;
    let r = router.append(request.clone()).await.map_err(client::status_error)?;
    if args.verify {
        let first = r.stream_version + 1 - n as u64;
        let read = pb::ReadRequest { stream: args.stream.clone(), from_version: first, max_count: n as u32, linearizable: true };
        let read = router.read(read).await.map_err(client::status_error).context("reading the appended events back")?;
        let got: Vec<(&str, &[u8])> = read.events.iter().map(|e| (e.r#type.as_str(), e.payload.as_slice())).collect();
        let sent: Vec<(&str, &[u8])> = request.events.iter().map(|e| (e.r#type.as_str(), e.payload.as_slice())).collect();
        if got != sent {
            bail!("read back {} event(s) from {} at versions {first}.. that differ from what was appended", got.len(), args.stream);
        }
    }
    if args.json {
        println!(
            "{}",
            serde_json::json!({"stream": args.stream, "events": n, "partition": r.partition,
                "first_position": r.first_position, "last_position": r.last_position, "stream_version": r.stream_version,
                "verified": args.verify})
        );
    } else {
        let verified = if args.verify { "; read back from the leader" } else { "" };
        println!(
            "appended {n} event(s) to {}: partition {}, positions {}..={}, stream version {}{verified}",
            args.stream, r.partition, r.first_position, r.last_position, r.stream_version
        );
    }
    Ok(())
}

async fn read(args: ReadArgs) -> anyhow::Result<()> {
    // A linearizable read goes to the partition's leader, wherever it is; others to `--server`.
    let seeds: Vec<String> = args.server.server.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
    let router = if args.linearizable { Some(crate::router::Router::connect(&seeds).await?) } else { None };
    let mut clients = client::connect(seeds.first().map_or(DEFAULT_SERVER, String::as_str)).await?;
    let linearizable = args.linearizable;
    let mut from = args.from;
    let mut printed = 0u64;
    let mut events_json = Vec::new();
    loop {
        let want = if args.max == 0 { 0 } else { (args.max - printed).min(u64::from(u32::MAX)) as u32 };
        let response = match (&args.stream, args.partition, &router) {
            (Some(stream), _, Some(router)) => {
                router.read(pb::ReadRequest { stream: stream.clone(), from_version: from, max_count: want, linearizable }).await
            }
            (Some(stream), _, None) => {
                let request = pb::ReadRequest { stream: stream.clone(), from_version: from, max_count: want, linearizable };
                clients.log.read(request).await.map(tonic::Response::into_inner)
            }
            (None, Some(partition), Some(router)) => {
                let request = pb::ReadPartitionRequest { partition, from_position: from, max_count: want, linearizable };
                router
                    .on_leader(partition, |mut c| async move { c.log.read_partition(request).await.map(tonic::Response::into_inner) })
                    .await
            }
            (None, Some(partition), None) => {
                let request = pb::ReadPartitionRequest { partition, from_position: from, max_count: want, linearizable };
                clients.log.read_partition(request).await.map(tonic::Response::into_inner)
            }
            (None, None, _) => unreachable!("clap requires a stream or a partition"),
        }
        .map_err(client::status_error)?;
        for event in &response.events {
            if args.json {
                events_json.push(client::event_json(event));
            } else {
                println!("{}", client::event_line(event));
            }
        }
        printed += response.events.len() as u64;
        from = response.next;
        if response.end_of_stream || response.events.is_empty() || (args.max != 0 && printed >= args.max) {
            if args.json {
                println!("{}", serde_json::json!({"events": events_json, "next": from, "end_of_stream": response.end_of_stream}));
            } else if printed == 0 {
                eprintln!("no events");
            }
            return Ok(());
        }
    }
}

async fn tail(args: TailArgs) -> anyhow::Result<()> {
    let mut clients = client::connect(&args.server.server).await?;
    let mut request = pb::SubscribeRequest {
        partitions: args.partition.clone(),
        streams: args.stream.clone(),
        from_position: args.from.unwrap_or(1),
        ..Default::default()
    };
    if args.from.is_none() {
        // Only new events: start every partition just past its current head.
        let status = clients.node.status(pb::StatusRequest {}).await.map_err(client::status_error)?.into_inner();
        request.partition_positions = status.partitions.iter().map(|p| (p.partition, p.head_position + 1)).collect();
    }
    let mut stream = clients.log.subscribe(request).await.map_err(client::status_error)?.into_inner();
    let mut seen = 0u64;
    while let Some(message) = stream.next().await {
        match message.map_err(client::status_error)?.message {
            Some(pb::subscribe_response::Message::Event(event)) => {
                if args.json {
                    println!("{}", client::event_json(&event));
                } else {
                    println!("{}", client::event_line(&event));
                }
                seen += 1;
                if args.count.is_some_and(|c| seen >= c) {
                    return Ok(());
                }
            }
            Some(pb::subscribe_response::Message::CaughtUp(c)) if args.from.is_some() && !args.json => {
                eprintln!("-- partition {} caught up at position {}", c.partition, c.position);
            }
            _ => {}
        }
    }
    bail!("the node ended the subscription")
}

async fn status(args: StatusArgs) -> anyhow::Result<()> {
    let mut clients = client::connect(&args.server.server).await?;
    let status = clients.node.status(pb::StatusRequest {}).await.map_err(client::status_error)?.into_inner();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&client::status_json(&status))?);
    } else {
        print!("{}", client::status_text(&status));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_definition_is_consistent() {
        // Clap's own checks (clashing flags, a global flag shadowed by a subcommand's, ...),
        // which it otherwise makes only when a command is parsed.
        <super::Cli as clap::CommandFactory>::command().debug_assert();
    }
}
