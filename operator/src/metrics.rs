//! The operator's Prometheus metrics, served on `GET /metrics` (`run --metrics-addr`):
//! - `anthill_operator_reconciles_total{outcome}`: reconciles, `ok` or `error`;
//! - `anthill_operator_reconcile_seconds`: how long each took (it asks every node);
//! - `anthill_operator_cluster_condition{namespace,cluster,type}`: 1 when the condition is
//!   true, else 0, as last reported;
//! - `anthill_operator_cluster_ready_nodes{namespace,cluster}`;
//! - `anthill_operator_events_total{reason}`: the events published (roll, scale, conditions).
//!
//! A cluster deleted with the finalizer has its series dropped; one deleted without it keeps
//! them until the operator restarts (it is never reconciled again).

use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::crd::AnthillClusterStatus;

type Labels = Vec<(&'static str, String)>;

pub struct Metrics {
    registry: Registry,
    reconciles: Family<Labels, Counter>,
    reconcile_seconds: Histogram,
    conditions: Family<Labels, Gauge>,
    ready_nodes: Family<Labels, Gauge>,
    events: Family<Labels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("anthill_operator");
        let reconciles = Family::<Labels, Counter>::default();
        registry.register("reconciles", "Reconciles by outcome (ok, error)", reconciles.clone());
        let reconcile_seconds = Histogram::new(exponential_buckets(0.005, 2.0, 14));
        registry.register("reconcile_seconds", "How long a reconcile took", reconcile_seconds.clone());
        let conditions = Family::<Labels, Gauge>::default();
        registry.register("cluster_condition", "A cluster's condition: 1 true, 0 false", conditions.clone());
        let ready_nodes = Family::<Labels, Gauge>::default();
        registry.register("cluster_ready_nodes", "A cluster's ready nodes", ready_nodes.clone());
        let events = Family::<Labels, Counter>::default();
        registry.register("events", "Events published, by reason", events.clone());
        Metrics { registry, reconciles, reconcile_seconds, conditions, ready_nodes, events }
    }
}

impl Metrics {
    pub fn reconciled(&self, ok: bool, took: Duration) {
        self.reconciles.get_or_create(&vec![("outcome", if ok { "ok" } else { "error" }.to_string())]).inc();
        self.reconcile_seconds.observe(took.as_secs_f64());
    }

    /// What `status` of cluster `namespace/name` says.
    pub fn status(&self, namespace: &str, name: &str, status: &AnthillClusterStatus) {
        let cluster = || vec![("namespace", namespace.to_string()), ("cluster", name.to_string())];
        self.ready_nodes.get_or_create(&cluster()).set(i64::from(status.ready_replicas));
        for c in &status.conditions {
            let mut labels = cluster();
            labels.push(("type", c.type_.clone()));
            self.conditions.get_or_create(&labels).set(i64::from(c.status == "True"));
        }
    }

    /// Drops the series of cluster `namespace/name` (it is being deleted).
    pub fn forget(&self, namespace: &str, name: &str) {
        let cluster = || vec![("namespace", namespace.to_string()), ("cluster", name.to_string())];
        self.ready_nodes.remove(&cluster());
        for kind in ["Available", "Progressing", "Degraded", "ReconciliationPaused"] {
            let mut labels = cluster();
            labels.push(("type", kind.to_string()));
            self.conditions.remove(&labels);
        }
    }

    pub fn event(&self, reason: &str) {
        self.events.get_or_create(&vec![("reason", reason.to_string())]).inc();
    }

    /// The OpenMetrics text.
    pub fn render(&self) -> String {
        let mut text = String::new();
        encode(&mut text, &self.registry).expect("writing to a String cannot fail");
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconciles_conditions_and_events_are_counted() {
        let metrics = Metrics::default();
        metrics.reconciled(true, Duration::from_millis(30));
        metrics.reconciled(false, Duration::from_millis(10));
        let mut status = AnthillClusterStatus { ready_replicas: 2, ..Default::default() };
        let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::from_second(1).unwrap());
        crate::controller::set_condition(&mut status, &now, "Available", true, "AllPartitionsLed", "m");
        crate::controller::set_condition(&mut status, &now, "Degraded", false, "AsExpected", "m");
        metrics.status("prod", "shop", &status);
        metrics.event("Draining");
        let text = metrics.render();
        for line in [
            "anthill_operator_reconciles_total{outcome=\"ok\"} 1",
            "anthill_operator_reconciles_total{outcome=\"error\"} 1",
            "anthill_operator_reconcile_seconds_count 2",
            "anthill_operator_cluster_condition{namespace=\"prod\",cluster=\"shop\",type=\"Available\"} 1",
            "anthill_operator_cluster_condition{namespace=\"prod\",cluster=\"shop\",type=\"Degraded\"} 0",
            "anthill_operator_cluster_ready_nodes{namespace=\"prod\",cluster=\"shop\"} 2",
            "anthill_operator_events_total{reason=\"Draining\"} 1",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
    }
}
