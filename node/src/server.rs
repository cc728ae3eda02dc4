//! One running node: opens the store, starts the log's writer, serves gRPC (with health and
//! reflection) and the metrics endpoint, and shuts all of it down in order.
//!
//! Shutdown order: stop accepting requests and end subscriptions; let in-flight requests finish
//! (for at most [`SHUTDOWN_GRACE`]; then the server stops waiting for connections, which end
//! when the process exits);
//! close the append queue so the writer commits what it holds and stops; then close LMDB. An
//! append acknowledged before shutdown is durable; one not yet acknowledged is either committed
//! or answered with an error, never half-written.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anthill_proto::v1 as pb;
use anyhow::Context;
use pb::auth_server::AuthServer;
use pb::cluster_server::ClusterServer;
use pb::event_log_server::EventLogServer;
use pb::ledger_server::LedgerServer;
use pb::node_server::NodeServer;
use pb::tenants_server::TenantsServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::api::Api;
use crate::api::auth::{AuthApi, TenantsApi};
use crate::api::ledger::LedgerApi;
use crate::config::NodeConfig;
use crate::log::Log;
use crate::metrics::{self, Metrics};
use crate::security::auth::Auth;
use crate::security::identity::{ClientGate, PeerGate};
use crate::security::keys::{Kek, Keys};
use crate::security::tls::Tls;
use crate::storage::Store;
use tonic::service::interceptor::InterceptedService;

/// How long in-flight requests and open streams get to finish once a node stops.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

pub struct RunningNode {
    pub grpc_addr: SocketAddr,
    pub metrics_addr: Option<SocketAddr>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<anyhow::Result<()>>>,
    /// Why the node cannot go on (its gRPC server ended while it ran), once it cannot.
    failed: watch::Receiver<Option<String>>,
    log: Arc<Log>,
    /// The node's cluster member, and how long it drains before it stops.
    cluster: Option<(crate::coordination::member::ClusterHandle, Duration)>,
}

/// Starts a node; returns once it is listening.
pub async fn start(config: &NodeConfig) -> anyhow::Result<RunningNode> {
    config.validate()?;
    let metrics = Arc::new(Metrics::default());
    let (stop, stopped) = watch::channel(false);
    // TLS files first: a mistake in them stops the start before the store is opened.
    let tls = match &config.tls {
        Some(files) => {
            let members: Vec<String> = config.cluster.members.iter().map(|m| m.name.clone()).collect();
            Some(Tls::start(files, &config.node_id, &members, metrics.clone(), stopped.clone())?)
        }
        None => None,
    };
    let (store_config, dir) = (config.storage.clone(), config.data_dir.clone());
    let store = tokio::task::spawn_blocking(move || Store::open(&dir, &store_config)).await??;
    let log = Arc::new(Log::start(Arc::new(store), &config.group_commit, &config.limits, &config.app, metrics.clone())?);
    let heads = log.commits().borrow().heads.clone();
    tracing::info!(
        data_dir = %config.data_dir.display(),
        partitions = heads.len(),
        events = heads.iter().sum::<u64>(),
        "opened the event log"
    );

    let listener = TcpListener::bind(config.listen_addr)
        .await
        .with_context(|| format!("cannot listen for gRPC on {} (listen_addr)", config.listen_addr))?;
    let grpc_addr = listener.local_addr()?;
    let cluster = crate::coordination::member::start(config, log.clone(), tls.clone(), stopped.clone()).await?;
    let (cluster_handle, cluster_service) = cluster.map_or((None, None), |(h, s)| (Some(h), Some(s)));
    // Admin actions and refusals, appended to `$audit/<node>` (here, or at that partition's
    // leader).
    let forwarding = cluster_handle.as_ref().map(|handle| crate::security::audit::Forwarding {
        view: handle.view.clone(),
        members: handle.members.clone(),
        local: crate::coordination::transport::outgoing_address(config.listen_addr),
        tls: tls.clone(),
    });
    let audit = crate::security::audit::start(config.node_id.clone(), log.clone(), forwarding, metrics.clone(), stopped.clone());
    let drain_on_stop = Duration::from_millis(config.cluster.drain_on_stop_ms);
    let cluster = cluster_handle.clone().map(|handle| (handle, drain_on_stop));
    let api = Api::new(log.clone(), config.node_id.clone(), stopped.clone()).with_cluster(cluster_handle);
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<EventLogServer<Api>>().await;
    let reflection =
        tonic_reflection::server::Builder::configure().register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET).build_v1()?;
    let max_request_bytes = config.limits.max_request_bytes;
    // Who may do what: with TLS, the table of tokens and grants, kept in the cluster's
    // coordination store (or a single node's data directory).
    let auth = match (&tls, &cluster) {
        (None, _) => None,
        (Some(_), Some((handle, _))) => Some(Auth::in_store(
            handle.coordination.clone(),
            format!("{}auth/table", handle.prefix),
            config.auth.cluster_admins.clone(),
            stopped.clone(),
        )),
        (Some(_), None) => Some(Auth::in_file(config.data_dir.join("auth.json"), config.auth.cluster_admins.clone())?),
    };
    // Tenants' data keys, wrapped by the key-encryption key(s) of `encryption`, kept like the
    // auth table.
    let keys = match &config.encryption {
        None => None,
        Some(encryption) => {
            let keks = std::iter::once(&encryption.key_file)
                .chain(&encryption.previous_key_files)
                .map(|file| Kek::from_file(file).map_err(|e| anyhow::anyhow!("encryption: {e}")))
                .collect::<anyhow::Result<Vec<Kek>>>()?;
            Some(match &cluster {
                Some((handle, _)) => {
                    Keys::in_store(handle.coordination.clone(), format!("{}keys/table", handle.prefix), keks, stopped.clone())
                }
                None => Keys::in_file(config.data_dir.join("keys.json"), keks)?,
            })
        }
    };
    if let Some(keys) = &keys {
        // The ledger's events and state are sealed by the writer (a follower refuses a sealed
        // event it receives before this, and is sent it again).
        log.set_keys(keys.clone());
    }
    let api = api.with_keys(keys.clone()).with_auth(auth.clone());
    // Health stays open (probes carry no certificate); every other service is behind a gate.
    let client = ClientGate::new(auth.clone(), metrics.clone()).with_rate(config.limits.calls_per_second_per_caller).with_audit(audit);
    let members = config.cluster.members.iter().map(|m| (m.name.clone(), m.id)).collect();
    let peers = PeerGate::new(tls.is_some(), members, metrics.clone());
    let calls_per_connection = config.limits.max_concurrent_calls_per_connection;
    let router = tonic::transport::Server::builder()
        // A connection's calls beyond the limit wait (HTTP/2 tells the client so); idle or dead
        // connections are found by keep-alive pings.
        .max_concurrent_streams(Some(calls_per_connection as u32))
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(health_service)
        .add_service(InterceptedService::new(reflection, client.clone()))
        .add_service(InterceptedService::new(EventLogServer::new(api.clone()).max_decoding_message_size(max_request_bytes), client.clone()))
        .add_service(InterceptedService::new(NodeServer::new(api), client.clone()))
        .add_service(InterceptedService::new(AuthServer::new(AuthApi::new(auth)), client.clone()))
        .add_service(InterceptedService::new(TenantsServer::new(TenantsApi::new(keys.clone())), client.clone()))
        .add_service(InterceptedService::new(
            LedgerServer::new(LedgerApi::new(log.clone()).with_keys(keys.clone())).max_decoding_message_size(max_request_bytes),
            client,
        ))
        .add_optional_service(cluster_service.map(|s| {
            InterceptedService::new(
                ClusterServer::new(s).max_decoding_message_size(crate::coordination::transport::MAX_MESSAGE_BYTES),
                peers,
            )
        }));
    // After an I/O failure the log takes no more writes until a restart: say so to health checks
    // (gRPC health, and `/ready` on the metrics port).
    let serving = Arc::new(std::sync::atomic::AtomicBool::new(true));
    tokio::spawn({
        let (log, health, stopped, serving) = (log.clone(), health.clone(), stopped.clone(), serving.clone());
        async move {
            // Ends with the node too, so it never keeps the log (and LMDB) open past a stop.
            tokio::select! {
                _ = log.write_failed() => {
                    serving.store(false, std::sync::atomic::Ordering::Relaxed);
                    health.set_not_serving::<EventLogServer<Api>>().await;
                    tracing::error!("writes stopped after a storage failure; EventLog reports NOT_SERVING until the node restarts");
                }
                _ = wait_for_stop(stopped) => {}
            }
        }
    });
    let retention =
        crate::log::retention::Retention { max_events: config.storage.retention_max_events, max_age_s: config.storage.retention_max_age_s };
    if retention.is_on() {
        tokio::spawn(crate::log::retention::run(log.clone(), retention, stopped.clone()));
    }
    let max_connections_per_address = config.limits.max_connections_per_address;
    let (fail, failed) = watch::channel(None);
    let mut tasks = vec![tokio::spawn({
        let (stopped, metrics) = (stopped.clone(), metrics.clone());
        async move {
            let limits = crate::security::connections::PerAddress::new(max_connections_per_address, metrics.clone());
            let served = match tls {
                None => {
                    let incoming = crate::security::connections::incoming(listener, limits, stopped.clone());
                    router.serve_with_incoming_shutdown(incoming, wait_for_stop(stopped.clone())).await
                }
                Some(tls) => {
                    let incoming = crate::security::tls::incoming(listener, tls, limits, metrics, stopped.clone());
                    router.serve_with_incoming_shutdown(incoming, wait_for_stop(stopped.clone())).await
                }
            };
            // The server ends when the node stops. Ended otherwise (its listener gone: the
            // accept task ended or panicked), the node would run on without taking a
            // connection: it says so and stops, so that its supervisor starts it again.
            if !*stopped.borrow() {
                let why = match &served {
                    Ok(()) => "it stopped accepting connections".to_string(),
                    Err(e) => e.to_string(),
                };
                tracing::error!(error = %why, "the gRPC server ended while the node runs; stopping the node");
                fail.send_replace(Some(format!("the gRPC server ended while the node ran: {why}")));
            }
            served?;
            Ok(())
        }
    })];

    let mut metrics_addr = None;
    if let Some(addr) = config.metrics_addr {
        let listener = TcpListener::bind(addr).await.with_context(|| format!("cannot listen for metrics on {addr} (metrics_addr)"))?;
        metrics_addr = Some(listener.local_addr()?);
        let stopped = stopped.clone();
        tasks.push(tokio::spawn(async move {
            let ready = move || serving.load(std::sync::atomic::Ordering::Relaxed);
            metrics::serve(listener, move || metrics.render(), ready, wait_for_stop(stopped)).await?;
            Ok(())
        }));
    }
    tracing::info!(node_id = %config.node_id, %grpc_addr, ?metrics_addr, "node serving");
    Ok(RunningNode { grpc_addr, metrics_addr, stop, tasks, failed, log, cluster })
}

async fn wait_for_stop(mut stopped: watch::Receiver<bool>) {
    let _ = stopped.wait_for(|stop| *stop).await;
}

impl RunningNode {
    /// Drains a cluster node before it stops (`cluster.drain_on_stop_ms`): hands its
    /// leaderships over and returns once it leads nothing, at the limit, or when `cut_short`
    /// resolves (a second signal), whichever is first. The node keeps serving meanwhile: the
    /// appends it takes go to partitions it still leads, and followers keep replicating.
    pub async fn drain_before_stop(&self, cut_short: impl std::future::Future<Output = ()>) {
        let Some((cluster, limit)) = &self.cluster else { return };
        if limit.is_zero() {
            return;
        }
        // Even leading nothing now, it waits until its mark is in the store: until then it
        // could still take a free lock (and give it up plainly when it stops).
        let leading = cluster.drain(false);
        tracing::info!(partitions = leading.len(), limit_ms = limit.as_millis() as u64, "draining before stopping");
        let mut view = cluster.view.clone();
        let name = cluster.name.clone();
        // Done once the view shows the node draining and leading nothing it could hand over (a
        // partition none of whose other live replicas drains stays: all of them stopping at once
        // do not wait for each other).
        let drained = async move {
            let _ =
                view.wait_for(|v| v.draining.contains(&name) && v.led_by(&name).keys().all(|p| v.target_for(*p, &name).is_empty())).await;
        };
        let started = std::time::Instant::now();
        tokio::select! {
            _ = drained => {
                let left = cluster.view.borrow().led_by(&cluster.name).len();
                tracing::info!(ms = started.elapsed().as_millis() as u64, still_leading = left, "drained");
            }
            _ = tokio::time::sleep(*limit) => {
                let left = cluster.view.borrow().led_by(&cluster.name).len();
                tracing::warn!(partitions = left, "still leading when the drain's time ran out; stopping anyway");
            }
            _ = cut_short => tracing::info!("second signal: stopping without waiting for the drain"),
        }
    }

    /// Resolves, with the reason, if the node cannot go on (its gRPC server ended while it ran):
    /// the caller stops it and exits with a failure.
    pub async fn failed(&self) -> String {
        let mut failed = self.failed.clone();
        match failed.wait_for(Option::is_some).await {
            Ok(why) => why.clone().unwrap_or_default(),
            // The serve task is gone without a word: it panicked.
            Err(_) => "the gRPC server's task ended (a panic?)".to_string(),
        }
    }

    /// Begins shutdown; [`RunningNode::stopped`] waits for it to finish.
    pub fn stop(&self) {
        self.stop.send_replace(true);
    }

    /// Waits until the node has stopped (after [`RunningNode::stop`]) and the log is closed.
    pub async fn stopped(self) -> anyhow::Result<()> {
        let mut first_error = None;
        for mut task in self.tasks {
            // Connections get a grace period to finish; a client that stalls past it is cut off.
            let outcome = match tokio::time::timeout(SHUTDOWN_GRACE, &mut task).await {
                Ok(joined) => joined.map_err(anyhow::Error::from).and_then(|r| r),
                Err(_) => {
                    tracing::warn!(grace = ?SHUTDOWN_GRACE, "connections still open after the grace period; closing them");
                    task.abort();
                    Ok(())
                }
            };
            if let Err(e) = outcome {
                first_error.get_or_insert(e);
            }
        }
        let log = self.log;
        tokio::task::spawn_blocking(move || log.close()).await?;
        tracing::info!("node stopped; the log is closed");
        first_error.map_or(Ok(()), Err)
    }

    pub fn log(&self) -> &Arc<Log> {
        &self.log
    }
}
