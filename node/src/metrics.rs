//! Prometheus metrics of one node and the `/metrics` HTTP endpoint that serves them.
//!
//! Every queue and every disk sync has a metric: the append queue's depth, events per group
//! commit, commit (sync) latency, the index tail and its flushes, database and map size. Metrics are updated where the work
//! happens (the writer, the API) and only read here.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

type Labels = Vec<(&'static str, &'static str)>;

/// Outcomes of an append, as labelled in `anthill_append_requests_total`.
pub const APPEND_OUTCOMES: [&str; 4] = ["ok", "wrong_expected_version", "invalid", "error"];

pub struct Metrics {
    registry: Registry,
    append_outcomes: [Counter; 4],
    /// Append requests by outcome: `ok`, `wrong_expected_version`, `invalid`, `error`.
    pub append_requests: Family<Labels, Counter>,
    /// Commands by outcome: `ok`, `duplicate`, `rejected`, `error`.
    pub commands: Family<Labels, Counter>,
    pub events_appended: Counter,
    pub commits: Counter,
    pub batch_events: Histogram,
    pub commit_seconds: Histogram,
    pub sync_seconds: Histogram,
    pub index_flush_seconds: Histogram,
    pub index_flushed_events: Counter,
    pub index_tail_events: Gauge,
    pub index_waits: Counter,
    pub append_queue_depth: Gauge,
    pub db_used_bytes: Gauge,
    pub map_size_bytes: Gauge,
    pub events_read: Counter,
    pub subscribers: Gauge,
    /// Partition replicas rebuilt from the log after a failed effect or a protocol panic.
    pub replica_restarts: Counter,
    /// TLS handshakes that failed or timed out (a client or peer with a certificate of another
    /// CA, a plain-text client, a port scanner).
    pub tls_handshake_failures: Counter,
    /// Changed TLS files put in force, and changed ones that did not load.
    pub tls_reloads: Counter,
    pub tls_reload_failures: Counter,
    /// When the certificate in force expires (seconds since the Unix epoch; 0 without TLS).
    pub tls_certificate_expiry_seconds: Gauge,
    /// Calls refused before reaching a service, by reason: `unauthenticated`, `not_a_member`.
    pub requests_refused: Family<Labels, Counter>,
    /// Calls to peers opened, by call (`raft`, `replicate`): one per peer and call at start,
    /// then one per reconnection.
    pub peer_calls_opened: Family<Labels, Counter>,
    /// Connections closed as soon as accepted: their address had
    /// `limits.max_connections_per_address` open.
    pub connections_refused: Counter,
    /// Audit records appended to the node's audit stream, and those dropped because too many
    /// waited (they are in the log only).
    pub audit_records_written: Counter,
    pub audit_records_dropped: Counter,
    /// Audit records queued or being appended: not in the stream yet.
    pub audit_records_pending: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("anthill");
        let append_requests: Family<Labels, Counter> = Family::default();
        let m = Metrics {
            append_outcomes: APPEND_OUTCOMES.map(|o| append_requests.get_or_create_owned(&vec![("outcome", o)])),
            append_requests,
            commands: Family::default(),
            events_appended: Counter::default(),
            commits: Counter::default(),
            batch_events: Histogram::new(exponential_buckets(1.0, 2.0, 16)),
            commit_seconds: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
            sync_seconds: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
            index_flush_seconds: Histogram::new(exponential_buckets(0.000_5, 2.0, 16)),
            index_flushed_events: Counter::default(),
            index_tail_events: Gauge::default(),
            index_waits: Counter::default(),
            replica_restarts: Counter::default(),
            tls_handshake_failures: Counter::default(),
            tls_reloads: Counter::default(),
            tls_reload_failures: Counter::default(),
            tls_certificate_expiry_seconds: Gauge::default(),
            requests_refused: Family::default(),
            peer_calls_opened: Family::default(),
            connections_refused: Counter::default(),
            audit_records_written: Counter::default(),
            audit_records_dropped: Counter::default(),
            audit_records_pending: Gauge::default(),
            append_queue_depth: Gauge::default(),
            db_used_bytes: Gauge::default(),
            map_size_bytes: Gauge::default(),
            events_read: Counter::default(),
            subscribers: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register("append_requests", "Append requests by outcome", m.append_requests.clone());
        registry.register("commands", "Commands by outcome (ok, duplicate, rejected, error)", m.commands.clone());
        registry.register("tls_handshake_failures", "TLS handshakes that failed or timed out", m.tls_handshake_failures.clone());
        registry.register("tls_reloads", "Changed TLS files put in force", m.tls_reloads.clone());
        registry.register(
            "tls_certificate_expiry_seconds",
            "When the node's certificate in force expires, in seconds since the Unix epoch (alert well before: on bare metal it is renewed only by a converge, `anthill certs renew`)",
            m.tls_certificate_expiry_seconds.clone(),
        );
        registry.register(
            "tls_reload_failures",
            "Changed TLS files that did not load (the previous ones stay)",
            m.tls_reload_failures.clone(),
        );
        registry.register("requests_refused", "Calls refused before any service saw them, by reason", m.requests_refused.clone());
        registry.register(
            "peer_calls_opened",
            "Long-lived calls to peers opened, by call (raft, replicate): one per peer at start, then one per reconnection",
            m.peer_calls_opened.clone(),
        );
        registry.register(
            "connections_refused",
            "Connections closed as soon as accepted: their address had limits.max_connections_per_address open",
            m.connections_refused.clone(),
        );
        registry.register("audit_records_written", "Audit records appended to the node's audit stream", m.audit_records_written.clone());
        registry.register(
            "audit_records_dropped",
            "Audit records not appended to the audit stream because too many waited (they are in the log on the anthill::audit target)",
            m.audit_records_dropped.clone(),
        );
        registry.register(
            "audit_records_pending",
            "Audit records queued or being appended, not in the audit stream yet (growing: the stream's leader is not reached)",
            m.audit_records_pending.clone(),
        );
        registry.register("events_appended", "Events made durable", m.events_appended.clone());
        registry.register("commits", "Group commits (LMDB write transactions synced)", m.commits.clone());
        registry.register("batch_events", "Events per group commit", m.batch_events.clone());
        registry.register("commit_seconds", "Time to write one group commit and sync its data pages", m.commit_seconds.clone());
        registry.register("sync_seconds", "Time of the sync that makes committed batches durable", m.sync_seconds.clone());
        registry.register(
            "index_flush_seconds",
            "Time to write one batch of index entries to the index environment",
            m.index_flush_seconds.clone(),
        );
        registry.register(
            "index_flushed_events",
            "Events whose index entries were written to the index environment",
            m.index_flushed_events.clone(),
        );
        registry.register("index_tail_events", "Events whose index entries are held only in memory", m.index_tail_events.clone());
        registry.register("index_waits", "Group commits that waited for the indexer (index tail full)", m.index_waits.clone());
        registry.register(
            "replica_restarts",
            "Partition replicas rebuilt from the log after a failed effect or a protocol panic",
            m.replica_restarts.clone(),
        );
        registry.register("append_queue_depth", "Appends waiting for the writer", m.append_queue_depth.clone());
        registry.register("db_used_bytes", "Bytes of the LMDB map in use", m.db_used_bytes.clone());
        registry.register("map_size_bytes", "Size of the LMDB memory map", m.map_size_bytes.clone());
        registry.register("events_read", "Events returned by reads and subscriptions", m.events_read.clone());
        registry.register("subscribers", "Open subscriptions", m.subscribers.clone());
        Metrics { registry, ..m }
    }
}

impl Metrics {
    /// Counts one append by outcome. The counters of the known outcomes are looked up once, so
    /// the hot path is one atomic add.
    pub fn count_append(&self, outcome: &'static str) {
        match APPEND_OUTCOMES.iter().position(|o| *o == outcome) {
            Some(i) => self.append_outcomes[i].inc(),
            None => self.append_requests.get_or_create_owned(&vec![("outcome", outcome)]).inc(),
        };
    }

    /// Counts one command by outcome.
    pub fn count_command(&self, outcome: &'static str) {
        self.commands.get_or_create_owned(&vec![("outcome", outcome)]).inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

/// Serves `GET /metrics` on `listener`, the text `render` makes, and `GET /ready` (200 while
/// `ready` says so, else 503: the readiness probe of a pod whose gRPC port speaks TLS, which
/// the kubelet's gRPC probe cannot), until `shutdown` resolves (the node's and the operator's).
pub async fn serve(
    listener: TcpListener,
    render: impl Fn() -> String + Clone + Send + Sync + 'static,
    ready: impl Fn() -> bool + Clone + Send + Sync + 'static,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || {
                let text = render();
                async move { ([(axum::http::header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text) }
            }),
        )
        .route(
            "/ready",
            axum::routing::get(move || {
                let ready = ready();
                async move {
                    if ready {
                        (axum::http::StatusCode::OK, "serving\n")
                    } else {
                        (axum::http::StatusCode::SERVICE_UNAVAILABLE, "not serving: writes stopped after a storage failure\n")
                    }
                }
            }),
        );
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendered_text_has_every_metric_with_the_prefix() {
        let m = Metrics::default();
        m.count_append("ok");
        m.events_appended.inc_by(3);
        let text = m.render();
        assert!(text.contains("anthill_append_requests_total{outcome=\"ok\"} 1"), "{text}");
        assert!(text.contains("anthill_events_appended_total 3"), "{text}");
        assert!(text.contains("anthill_commit_seconds_bucket"), "{text}");
    }
}
