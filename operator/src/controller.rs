//! The controller (`anthill-operator run`): for every `AnthillCluster` it keeps the objects of
//! [`crate::resources`] as the spec says (server-side apply, field manager `anthill-operator`,
//! each owned by the cluster), and reports what it sees in the status.
//!
//! Each reconcile, in order:
//! 1. `paused`: nothing is changed; the `ReconciliationPaused` condition says so.
//! 2. The nodes' configuration is made and checked (`resources::node_config`); a bad one changes
//!    nothing and makes the cluster `Degraded` with reason `InvalidConfig` and the node's message.
//! 3. ConfigMap, Services and StatefulSet are applied; the PodDisruptionBudget is applied, or
//!    deleted below 2 replicas.
//! 4. The status: replicas and ready replicas from the StatefulSet, the conditions
//!    ([`conditions`]), the pods' selector, the cluster id (the resource's uid, recorded once),
//!    the version every pod runs once the StatefulSet's pods all run its current template.
//!
//! 5. A changed template is rolled out one drained pod at a time ([`crate::roll`]); while it
//!    is, `Progressing` says `RollingUpdate` and what the roll does or waits for.
//!
//! Not built yet (issue 9): scaling's membership changes (new members joining the embedded
//! store with `cluster.join`), the finalizer, events and metrics.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use serde_json::json;

use crate::crd::{AnthillCluster, AnthillClusterStatus};
use crate::resources;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0} has no namespace")]
    NoNamespace(String),
}

struct Context {
    client: Client,
}

/// Runs the controller until SIGTERM or SIGINT, over every namespace or over `namespace`.
pub async fn run(client: Client, namespace: Option<String>) -> anyhow::Result<()> {
    fn api<K>(client: &Client, namespace: &Option<String>) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        match namespace {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }
    let owned = || watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={}", resources::MANAGER));
    tracing::info!(namespace = namespace.as_deref().unwrap_or("(all)"), "controller starting");
    Controller::new(api::<AnthillCluster>(&client, &namespace), watcher::Config::default())
        .owns(api::<StatefulSet>(&client, &namespace), owned())
        .owns(api::<ConfigMap>(&client, &namespace), owned())
        .owns(api::<Service>(&client, &namespace), owned())
        .owns(api::<PodDisruptionBudget>(&client, &namespace), owned())
        .shutdown_on_signal()
        .run(reconcile, error_policy, Arc::new(Context { client }))
        .for_each(|outcome| async move {
            match outcome {
                Ok((object, _)) => tracing::debug!(cluster = %object.name, namespace = ?object.namespace, "reconciled"),
                Err(e) => tracing::warn!(error = %e, "reconcile failed"),
            }
        })
        .await;
    tracing::info!("controller stopped");
    Ok(())
}

fn error_policy(cluster: Arc<AnthillCluster>, error: &Error, _: Arc<Context>) -> Action {
    tracing::warn!(cluster = %cluster.name_any(), %error, "reconcile failed; trying again in 10 s");
    Action::requeue(Duration::from_secs(10))
}

async fn reconcile(cluster: Arc<AnthillCluster>, ctx: Arc<Context>) -> Result<Action, Error> {
    let name = cluster.name_any();
    let ns = cluster.namespace().ok_or_else(|| Error::NoNamespace(name.clone()))?;
    let client = &ctx.client;
    let clusters: Api<AnthillCluster> = Api::namespaced(client.clone(), &ns);
    let old = cluster.status.clone().unwrap_or_default();
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let mut status = AnthillClusterStatus {
        observed_generation: cluster.metadata.generation,
        selector: Some(resources::selector_query(&name)),
        cluster_id: old.cluster_id.clone().or_else(|| cluster.metadata.uid.clone()),
        ..old.clone()
    };
    if cluster.spec.paused {
        set_condition(&mut status, &now, "ReconciliationPaused", true, "Paused", "spec.paused is true: the operator changes nothing");
        write_status(&clusters, &name, &status).await?;
        return Ok(Action::requeue(Duration::from_secs(60)));
    }
    set_condition(&mut status, &now, "ReconciliationPaused", false, "Reconciling", "the operator reconciles the cluster");
    let config = match resources::node_config(&cluster) {
        Ok(config) => config,
        Err(e) => {
            tracing::warn!(cluster = %name, error = %e, "the nodes' configuration is invalid; nothing changed");
            set_condition(&mut status, &now, "Degraded", true, "InvalidConfig", &e.to_string());
            set_condition(&mut status, &now, "Progressing", false, "InvalidConfig", "nothing changes until spec.config is fixed");
            write_status(&clusters, &name, &status).await?;
            return Ok(Action::await_change());
        }
    };
    let params = PatchParams::apply(resources::MANAGER).force();
    Api::<ConfigMap>::namespaced(client.clone(), &ns)
        .patch(&resources::config_map_name(&name), &params, &Patch::Apply(resources::config_map(&cluster, &config)))
        .await?;
    let services = Api::<Service>::namespaced(client.clone(), &ns);
    services.patch(&resources::headless_service_name(&name), &params, &Patch::Apply(resources::headless_service(&cluster))).await?;
    services.patch(&name, &params, &Patch::Apply(resources::client_service(&cluster))).await?;
    let sets = Api::<StatefulSet>::namespaced(client.clone(), &ns);
    let set = sets.patch(&name, &params, &Patch::Apply(resources::stateful_set(&cluster, &config))).await?;
    let budgets = Api::<PodDisruptionBudget>::namespaced(client.clone(), &ns);
    match resources::disruption_budget(&cluster) {
        Some(budget) => {
            budgets.patch(&name, &params, &Patch::Apply(budget)).await?;
        }
        None => {
            if budgets.get_opt(&name).await?.is_some() {
                budgets.delete(&name, &DeleteParams::default()).await?;
            }
        }
    }
    let seen = Observed::of(&set);
    status.replicas = seen.replicas;
    status.ready_replicas = seen.ready;
    if seen.all_current(cluster.spec.replicas) {
        status.current_version = Some(cluster.spec.version.clone());
    }
    // The nodes' own view: roles, leaderships, lag; and whether every partition has a leader.
    let (nodes, all_led) = crate::nodes::summarize(&crate::nodes::ask(&cluster).await);
    status.nodes = nodes;
    for (kind, value, reason, message) in conditions(cluster.spec.replicas, &seen, all_led) {
        set_condition(&mut status, &now, kind, value, reason, &message);
    }
    // A changed template goes out one drained pod at a time (`roll`).
    let rolling = match crate::roll::step(client, &cluster, &set).await {
        Ok(rolling) => rolling,
        // Reported, not returned: the status above is still worth writing.
        Err(e) => Some(format!("the roll cannot go on: {e}")),
    };
    if let Some(what) = &rolling {
        set_condition(&mut status, &now, "Progressing", true, "RollingUpdate", what);
    }
    write_status(&clusters, &name, &status).await?;
    // The pods' readiness changes the StatefulSet, which wakes this; the period catches the rest
    // (a roll is followed closely: a drain moves in seconds).
    Ok(Action::requeue(Duration::from_secs(if rolling.is_some() { 2 } else { 30 })))
}

/// What the StatefulSet says about its pods.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Observed {
    pub replicas: i32,
    pub ready: i32,
    /// Pods running the current template (its update revision).
    pub updated: i32,
    /// Whether the StatefulSet controller has seen the latest spec.
    pub caught_up: bool,
}

impl Observed {
    pub fn of(set: &StatefulSet) -> Observed {
        let generation = set.metadata.generation;
        let Some(s) = &set.status else { return Observed::default() };
        // Not `currentRevision`: with `OnDelete` the StatefulSet controller never moves it on.
        Observed {
            replicas: s.replicas,
            ready: s.ready_replicas.unwrap_or(0),
            updated: s.updated_replicas.unwrap_or(0),
            caught_up: s.observed_generation.is_some() && s.observed_generation == generation,
        }
    }

    /// Every pod asked for runs the current template and is ready.
    pub fn all_current(&self, wanted: i32) -> bool {
        self.caught_up && self.replicas == wanted && self.ready == wanted && self.updated == wanted
    }
}

/// `Available`, `Progressing` and `Degraded` from what the StatefulSet shows and whether the
/// nodes see every partition led (`all_led`; `None` when no node answered): (type, status,
/// reason, message). `Available` means every pod is ready and every partition has a leader.
pub fn conditions(wanted: i32, seen: &Observed, all_led: Option<bool>) -> Vec<(&'static str, bool, &'static str, String)> {
    let ready = format!("{} of {wanted} nodes ready", seen.ready);
    let available = if seen.ready < wanted || wanted == 0 {
        ("Available", false, "NodesNotReady", ready.clone())
    } else {
        match all_led {
            Some(true) => ("Available", true, "AllPartitionsLed", format!("{ready}; every partition has a leader")),
            Some(false) => ("Available", false, "PartitionsWithoutLeader", format!("{ready}; some partitions have no leader yet")),
            None => ("Available", false, "NodesNotAnswering", format!("{ready}; no node answered the operator")),
        }
    };
    let progressing = if seen.all_current(wanted) {
        ("Progressing", false, "Stable", format!("{wanted} nodes run the current template"))
    } else if !seen.caught_up || seen.replicas != wanted {
        ("Progressing", true, "Scaling", format!("{} of {wanted} pods exist", seen.replicas))
    } else if seen.updated < wanted {
        ("Progressing", true, "Updating", format!("{} of {wanted} pods run the current template", seen.updated))
    } else {
        ("Progressing", true, "Starting", ready)
    };
    let degraded = ("Degraded", false, "AsExpected", "nothing is wrong that the operator can see".to_string());
    vec![available, progressing, degraded]
}

/// Sets condition `kind` in `status`; its transition time changes only when its status flips.
pub fn set_condition(status: &mut AnthillClusterStatus, now: &Time, kind: &str, value: bool, reason: &str, message: &str) {
    let value = if value { "True" } else { "False" }.to_string();
    let generation = status.observed_generation;
    match status.conditions.iter_mut().find(|c| c.type_ == kind) {
        Some(c) => {
            if c.status != value {
                c.last_transition_time = now.clone();
            }
            (c.status, c.reason, c.message, c.observed_generation) = (value, reason.into(), message.into(), generation);
        }
        None => status.conditions.push(Condition {
            type_: kind.into(),
            status: value,
            reason: reason.into(),
            message: message.into(),
            last_transition_time: now.clone(),
            observed_generation: generation,
        }),
    }
}

async fn write_status(clusters: &Api<AnthillCluster>, name: &str, status: &AnthillClusterStatus) -> Result<(), Error> {
    let patch = json!({ "status": status });
    clusters.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(seconds).unwrap())
    }

    #[test]
    fn a_conditions_transition_time_changes_only_when_its_status_flips() {
        let mut status = AnthillClusterStatus { observed_generation: Some(1), ..Default::default() };
        set_condition(&mut status, &at(10), "Available", false, "NodesNotReady", "0 of 3");
        set_condition(&mut status, &at(20), "Available", false, "NodesNotReady", "2 of 3");
        let c = &status.conditions[0];
        assert_eq!((c.last_transition_time.clone(), c.message.as_str()), (at(10), "2 of 3"));
        set_condition(&mut status, &at(30), "Available", true, "AllNodesReady", "3 of 3");
        assert_eq!(status.conditions[0].last_transition_time, at(30));
        assert_eq!(status.conditions.len(), 1);
    }

    #[test]
    fn conditions_follow_the_stateful_set() {
        let reason = |seen: &Observed, kind: &str| {
            conditions(3, seen, Some(true)).into_iter().find(|c| c.0 == kind).map(|(_, status, reason, _)| (status, reason)).unwrap()
        };
        let none = Observed::default();
        assert_eq!(reason(&none, "Available"), (false, "NodesNotReady"));
        assert_eq!(reason(&none, "Progressing"), (true, "Scaling"));
        let updating = Observed { replicas: 3, ready: 3, updated: 1, caught_up: true };
        assert_eq!(reason(&updating, "Progressing"), (true, "Updating"));
        assert_eq!(reason(&updating, "Available"), (true, "AllPartitionsLed"));
        let available = |led| conditions(3, &updating, led).into_iter().find(|c| c.0 == "Available").map(|c| (c.1, c.2)).unwrap();
        assert_eq!(available(Some(false)), (false, "PartitionsWithoutLeader"));
        assert_eq!(available(None), (false, "NodesNotAnswering"));
        let stable = Observed { updated: 3, ..updating };
        assert!(stable.all_current(3));
        assert_eq!(reason(&stable, "Progressing"), (false, "Stable"));
        assert_eq!(reason(&Observed { ready: 2, ..stable.clone() }, "Progressing"), (true, "Starting"));
    }
}
