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
//! 5. A scale-down takes one step ([`crate::scale`]): `Progressing` says `Scaling` and what it
//!    does or waits for, `Degraded` says `ScaleDownBlocked` when it cannot go on. Otherwise a
//!    changed template is rolled out one drained pod at a time ([`crate::roll`]); while it is,
//!    `Progressing` says `RollingUpdate` and what the roll does or waits for.
//!
//! Before the objects are applied, the nodes are asked for their view (`Node.Status`), which
//! decides the scale step and its pod count. Not built yet (issue 9): the finalizer, events
//! and metrics.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;

use crate::crd::{AnthillCluster, AnthillClusterStatus};
use crate::resources;
use crate::scale::Asked;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0} has no namespace")]
    NoNamespace(String),
}

struct Context {
    client: Client,
    recorder: Recorder,
    metrics: Arc<crate::metrics::Metrics>,
}

/// A Kubernetes event about a cluster: a step a user should see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    pub warning: bool,
    /// `PascalCase`, as `kubectl describe` shows it.
    pub reason: &'static str,
    pub message: String,
    /// The pod it is about, if one (the event's related object: events about two pods with
    /// the same reason stay two events).
    pub pod: Option<String>,
}

impl Note {
    pub fn normal(reason: &'static str, message: String) -> Note {
        Note { warning: false, reason, message, pod: None }
    }

    pub fn warning(reason: &'static str, message: String) -> Note {
        Note { warning: true, reason, message, pod: None }
    }

    /// About pod `pod`.
    pub fn on(self, pod: &str) -> Note {
        Note { pod: Some(pod.into()), ..self }
    }
}

/// The events for conditions that flipped from `old` to `new`: `Available` either way, and
/// `Degraded` turning true (with its reason).
pub fn flips(old: &AnthillClusterStatus, new: &AnthillClusterStatus) -> Vec<Note> {
    let find = |s: &AnthillClusterStatus, kind: &str| s.conditions.iter().find(|c| c.type_ == kind).cloned();
    let mut notes = Vec::new();
    let flipped = |kind: &str| {
        let now = find(new, kind)?;
        (find(old, kind).map(|c| c.status) != Some(now.status.clone())).then_some(now)
    };
    if let Some(c) = flipped("Available") {
        // The first report of a cluster that is not available yet is no news.
        if c.status == "True" {
            notes.push(Note::normal("Available", c.message));
        } else if find(old, "Available").is_some() {
            notes.push(Note::warning("Unavailable", format!("{}: {}", c.reason, c.message)));
        }
    }
    if let Some(c) = flipped("Degraded").filter(|c| c.status == "True") {
        let reason = match c.reason.as_str() {
            "InvalidConfig" => "InvalidConfig",
            "RollBlocked" => "RollBlocked",
            "TlsUnusable" => "TlsUnusable",
            "TlsModeFixed" => "TlsModeFixed",
            _ => "ScaleDownBlocked",
        };
        notes.push(Note::warning(reason, c.message));
    }
    notes
}

/// Runs the controller until SIGTERM or SIGINT, over every namespace or over `namespace`,
/// counting into `metrics`.
pub async fn run(client: Client, namespace: Option<String>, metrics: Arc<crate::metrics::Metrics>) -> anyhow::Result<()> {
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
    let instance = std::env::var("POD_NAME").ok();
    let recorder = Recorder::new(client.clone(), Reporter { controller: resources::MANAGER.into(), instance });
    Controller::new(api::<AnthillCluster>(&client, &namespace), watcher::Config::default())
        .owns(api::<StatefulSet>(&client, &namespace), owned())
        .owns(api::<ConfigMap>(&client, &namespace), owned())
        .owns(api::<Service>(&client, &namespace), owned())
        .owns(api::<PodDisruptionBudget>(&client, &namespace), owned())
        .shutdown_on_signal()
        .run(measured, error_policy, Arc::new(Context { client, recorder, metrics }))
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

/// The finalizer of a cluster whose Consul keys are deleted with it
/// (`coordination.consul.deleteKeysOnRemoval`).
pub const FINALIZER: &str = "anthill.io/consul-keys";

/// Whether `cluster` asks for its Consul keys to be deleted with it.
fn deletes_keys(cluster: &AnthillCluster) -> bool {
    let c = &cluster.spec.coordination;
    c.store == crate::crd::Store::Consul && c.consul.as_ref().is_some_and(|c| c.delete_keys_on_removal)
}

fn has_finalizer(cluster: &AnthillCluster) -> bool {
    cluster.finalizers().iter().any(|f| f == FINALIZER)
}

/// Adds or removes [`FINALIZER`], with a JSON patch that first checks the object is still the
/// version seen (so no other finalizer added meanwhile is dropped).
async fn set_finalizer(clusters: &Api<AnthillCluster>, cluster: &AnthillCluster, on: bool) -> Result<(), Error> {
    let version = json!({ "op": "test", "path": "/metadata/resourceVersion", "value": cluster.resource_version() });
    let patch = match cluster.finalizers().iter().position(|f| f == FINALIZER) {
        Some(i) if !on => json!([version, { "op": "remove", "path": format!("/metadata/finalizers/{i}") }]),
        None if on && cluster.metadata.finalizers.is_some() => {
            json!([version, { "op": "add", "path": "/metadata/finalizers/-", "value": FINALIZER }])
        }
        None if on => json!([version, { "op": "add", "path": "/metadata/finalizers", "value": [FINALIZER] }]),
        _ => return Ok(()),
    };
    let patch: json_patch::Patch = serde_json::from_value(patch).expect("a JSON patch");
    clusters.patch(&cluster.name_any(), &PatchParams::default(), &Patch::Json::<()>(patch)).await?;
    Ok(())
}

/// Why the keys of a cluster being deleted are left where they are, if they are: another
/// cluster's prefix overlaps its own (deleting the tree would take that cluster's keys too).
fn overlapping(cluster: &AnthillCluster, others: &[AnthillCluster]) -> Option<String> {
    let prefix = resources::key_prefix(cluster);
    let address = cluster.spec.coordination.consul.as_ref().map(|c| c.address.clone());
    others
        .iter()
        .filter(|o| o.metadata.uid != cluster.metadata.uid && o.spec.coordination.store == crate::crd::Store::Consul)
        .filter(|o| o.spec.coordination.consul.as_ref().map(|c| c.address.clone()) == address)
        .find(|o| {
            let theirs = resources::key_prefix(o);
            theirs.starts_with(&prefix) || prefix.starts_with(&theirs)
        })
        .map(|o| {
            format!(
                "cluster {}/{} keeps its keys under {}, which overlaps {prefix}",
                o.namespace().unwrap_or_default(),
                o.name_any(),
                resources::key_prefix(o)
            )
        })
}

/// A cluster being deleted with [`FINALIZER`]: its pods are stopped (the StatefulSet scaled to
/// 0; each node resigns its Consul session as it stops), then every key under its prefix is
/// deleted, then the finalizer is removed and the resource goes. The keys stay, with a warning
/// event, when the spec no longer asks for it, when the token's Secret is gone (a namespace
/// being deleted takes it first), or when another cluster's prefix overlaps.
async fn remove(cluster: &AnthillCluster, ctx: &Context) -> Result<Action, Error> {
    if !has_finalizer(cluster) {
        return Ok(Action::await_change());
    }
    let (name, ns) = (cluster.name_any(), cluster.namespace().unwrap_or_default());
    let client = &ctx.client;
    let clusters: Api<AnthillCluster> = Api::namespaced(client.clone(), &ns);
    ctx.metrics.forget(&ns, &name);
    let prefix = resources::key_prefix(cluster);
    let (name_, prefix_, clusters_) = (&name, &prefix, &clusters);
    let leave = |why: String| async move {
        tracing::warn!(cluster = %name_, %why, "leaving the cluster's Consul keys");
        publish(ctx, cluster, vec![Note::warning("KeysLeft", format!("the keys under {prefix_} stay: {why}"))]).await;
        set_finalizer(clusters_, cluster, false).await.map(|()| Action::await_change())
    };
    if !deletes_keys(cluster) {
        return leave("the spec no longer asks for them to go".into()).await;
    }
    let token = match consul_token(client, cluster).await? {
        Ok(token) => token,
        Err(why) => return leave(why).await,
    };
    let all = Api::<AnthillCluster>::all(client.clone()).list(&Default::default()).await;
    // Without the right to list every namespace, the cluster's own namespace is what it sees.
    let others = match all {
        Ok(list) => list.items,
        Err(_) => Api::<AnthillCluster>::namespaced(client.clone(), &ns).list(&Default::default()).await?.items,
    };
    if let Some(why) = overlapping(cluster, &others) {
        return leave(why).await;
    }
    let sets = Api::<StatefulSet>::namespaced(client.clone(), &ns);
    if sets.get_opt(&name).await?.is_some_and(|s| s.spec.and_then(|s| s.replicas) != Some(0)) {
        sets.patch(&name, &PatchParams::default(), &Patch::Merge(json!({ "spec": { "replicas": 0 } }))).await?;
        publish(ctx, cluster, vec![Note::normal("Stopping", "the cluster is deleted: stopping its pods before its Consul keys go".into())])
            .await;
    }
    let pods = Api::<k8s_openapi::api::core::v1::Pod>::namespaced(client.clone(), &ns);
    let left = pods.list(&kube::api::ListParams::default().labels(&resources::selector_query(&name))).await?.items.len();
    if left > 0 {
        return Ok(Action::requeue(Duration::from_secs(2)));
    }
    if let Err(why) = delete_keys(cluster, token, &prefix).await {
        tracing::warn!(cluster = %name, %why, "cannot delete the cluster's Consul keys yet");
        publish(ctx, cluster, vec![Note::warning("KeysNotDeleted", format!("the keys under {prefix}: {why}"))]).await;
        return Ok(Action::requeue(Duration::from_secs(10)));
    }
    tracing::info!(cluster = %name, %prefix, "the cluster's Consul keys are deleted");
    publish(ctx, cluster, vec![Note::normal("KeysDeleted", format!("every key under {prefix} is deleted"))]).await;
    set_finalizer(&clusters, cluster, false).await?;
    Ok(Action::await_change())
}

/// The cluster's Consul token from its Secret; `Err(why)` when the Secret or its key is gone.
async fn consul_token(
    client: &Client,
    cluster: &AnthillCluster,
) -> Result<Result<anthill_node::coordination::consul::AclToken, String>, Error> {
    let Some(consul) = cluster.spec.coordination.consul.as_ref() else { return Ok(Err("no Consul in the spec".into())) };
    let secrets = Api::<Secret>::namespaced(client.clone(), &cluster.namespace().unwrap_or_default());
    let reference = &consul.token_secret_ref;
    let token = secrets.get_opt(&reference.name).await?.and_then(|s| s.data?.remove(&reference.key));
    let Some(token) = token else { return Ok(Err(format!("no key {:?} in Secret {:?}", reference.key, reference.name))) };
    Ok(anthill_node::coordination::consul::AclToken::new(String::from_utf8_lossy(&token.0).trim())
        .ok_or("the token is not a header value".into()))
}

/// Deletes every key under `prefix` in the cluster's Consul.
async fn delete_keys(cluster: &AnthillCluster, token: anthill_node::coordination::consul::AclToken, prefix: &str) -> Result<(), String> {
    use anthill_node::coordination::consul::{ConsulStore, parse_address};
    let consul = cluster.spec.coordination.consul.as_ref().ok_or("no Consul in the spec")?;
    let store = ConsulStore::new(parse_address(&consul.address)?, Some(token), None);
    store.delete_tree(prefix).await.map_err(|e| e.to_string())
}

/// [`reconcile`], timed and counted.
async fn measured(cluster: Arc<AnthillCluster>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    let outcome = reconcile(cluster, ctx.clone()).await;
    ctx.metrics.reconciled(outcome.is_ok(), started.elapsed());
    outcome
}

async fn reconcile(cluster: Arc<AnthillCluster>, ctx: Arc<Context>) -> Result<Action, Error> {
    let name = cluster.name_any();
    let ns = cluster.namespace().ok_or_else(|| Error::NoNamespace(name.clone()))?;
    let client = &ctx.client;
    if cluster.metadata.deletion_timestamp.is_some() {
        return remove(&cluster, &ctx).await;
    }
    if deletes_keys(&cluster) != has_finalizer(&cluster) {
        set_finalizer(&Api::namespaced(client.clone(), &ns), &cluster, deletes_keys(&cluster)).await?;
    }
    let old = cluster.status.clone().unwrap_or_default();
    let mut notes = Vec::new();
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let mut status = AnthillClusterStatus {
        observed_generation: cluster.metadata.generation,
        selector: Some(resources::selector_query(&name)),
        cluster_id: old.cluster_id.clone().or_else(|| cluster.metadata.uid.clone()),
        ..old.clone()
    };
    let sets = Api::<StatefulSet>::namespaced(client.clone(), &ns);
    // The pods there are now (more than asked for while a scale-down goes on, fewer while the
    // old ones learn of new ones).
    let existing = sets.get_opt(&name).await?;
    let running = existing.as_ref().and_then(|s| s.spec.as_ref()?.replicas).unwrap_or(cluster.spec.replicas);
    // The transport security is the cluster's for good: nodes of two modes cannot talk. Decided
    // and recorded before anything is made, and what every object below is made with.
    let tls_mode = resources::decide_tls_mode(&cluster, existing.as_ref());
    status.tls_mode = Some(tls_mode);
    let cluster = {
        let mut decided = (*cluster).clone();
        decided.status.get_or_insert_default().tls_mode = Some(tls_mode);
        Arc::new(decided)
    };
    // A running cluster's certificates are kept valid whatever else happens (paused, a spec
    // refused): they would expire meanwhile. A new cluster gets its own below, once its spec
    // passed.
    let mut issued = Vec::new();
    let renewed = match existing {
        Some(_) => Some(crate::certs::ensure(client, &cluster, tls_mode, running.max(cluster.spec.replicas), &mut issued).await),
        None => None,
    };
    if cluster.spec.paused {
        set_condition(&mut status, &now, "ReconciliationPaused", true, "Paused", "spec.paused is true: the operator changes nothing");
        finish(&ctx, &cluster, &old, &status, issued_note(&issued)).await?;
        return Ok(Action::requeue(Duration::from_secs(60)));
    }
    set_condition(&mut status, &now, "ReconciliationPaused", false, "Reconciling", "the operator reconciles the cluster");
    let spec = &cluster.spec;
    if let Some(asked) = spec.tls.as_ref().map(|t| t.mode).filter(|m| *m != tls_mode) {
        let why = format!("spec.tls.mode is {asked:?} but the cluster was made with {tls_mode:?}, which it keeps");
        set_condition(&mut status, &now, "Degraded", true, "TlsModeFixed", &why);
        set_condition(&mut status, &now, "Progressing", false, "TlsModeFixed", "nothing changes until spec.tls.mode is set back");
        finish(&ctx, &cluster, &old, &status, issued_note(&issued)).await?;
        return Ok(Action::requeue(RENEWAL_CHECK));
    }
    // Recorded once: the pods there at the first reconcile (an operator that takes over a
    // cluster finds its StatefulSet), or the spec's.
    let founders = *status.founders.get_or_insert(running);
    // A configuration the node would refuse stops everything before anything is made or any
    // node is asked anything (checked again below with the pod count the scale step decides).
    let config_for = |keep: i32, founders: i32| {
        let members = keep.max(spec.replicas);
        // A cluster shrunk below its founders: the founders left are those still there, so a pod
        // made again later joins rather than founds.
        let founders = founders.min(members);
        resources::node_config(&cluster, resources::Shape { pods: members, founders }).map(|c| (c, founders))
    };
    if let Err(e) = config_for(running, founders) {
        return invalid_config(&ctx, &cluster, &old, status, &now, e, issued_note(&issued)).await;
    }
    // The certificates of every pod there or asked for, and the operator's own towards them; a
    // Secret a user must fix stops everything (the pods could not start or be reached).
    let ensured = match renewed {
        Some(done) => done,
        None => crate::certs::ensure(client, &cluster, tls_mode, running.max(spec.replicas), &mut issued).await,
    };
    notes.extend(issued_note(&issued));
    let tls = match ensured {
        Ok(tls) => tls,
        Err(crate::certs::CertError::Unusable(why)) => {
            tracing::warn!(cluster = %name, error = %why, "the cluster's certificates cannot be used; nothing changed");
            set_condition(&mut status, &now, "Degraded", true, "TlsUnusable", &why);
            set_condition(&mut status, &now, "Progressing", false, "TlsUnusable", "nothing changes until the Secrets are fixed");
            finish(&ctx, &cluster, &old, &status, notes).await?;
            return Ok(Action::requeue(Duration::from_secs(30)));
        }
        Err(crate::certs::CertError::Kube(e)) => return Err(e.into()),
    };
    // The nodes' own view: roles, leaderships, lag, membership; whether every partition is led.
    let answers = crate::nodes::ask(&cluster, running.max(spec.replicas), tls.as_ref()).await;
    let pod_name = |i: i32| resources::member(&cluster, i).0;
    let addresses: Vec<String> = (0..running.max(spec.replicas)).map(|i| resources::member(&cluster, i).1).collect();
    let view = crate::scale::view_for(&answers, &pod_name(running - 1));
    // Every member is listed: the pods there, and those a scale-up adds (`config_for`).
    // A scale-up adds its pods only once every pod there runs the template that lists them (the
    // roll restarts them first): a node that does not list a member cannot replicate to it.
    let listing = config_for(spec.replicas, founders).map(|(config, _)| resources::config_hash(&config)).ok();
    let lists_all = existing.as_ref().is_some_and(|s| {
        let template =
            s.spec.as_ref().and_then(|s| s.template.metadata.as_ref()?.annotations.as_ref()?.get(resources::CONFIG_HASH).cloned());
        template.is_some() && template == listing && Observed::of(s).all_current(running)
    });
    let mut plan =
        crate::scale::plan(spec.replicas, running, spec.replication_factor as i32, view, &status.decommissioned, lists_all, pod_name);
    // A configuration the node would refuse stops everything before any node is asked anything.
    if let Err(e) = config_for(plan.keep, founders) {
        return invalid_config(&ctx, &cluster, &old, status, &now, e, notes).await;
    }
    // The pod a scale-down takes out is the operator's to let back in, whatever happens next
    // (recorded before it is asked, and again if a status write was lost).
    if let Some(pod) = plan.ours.clone().filter(|p| !status.decommissioned.contains(p)) {
        status.decommissioned.push(pod);
    }
    for pod in &plan.recommission {
        match crate::scale::request(&addresses, pod, true, tls.as_ref()).await {
            Asked::Done => {
                tracing::info!(cluster = %name, %pod, "let back into the replica sets");
                notes.push(
                    Note::normal("Recommissioning", format!("{pod} is let back into the replica sets (replicas covers it again)")).on(pod),
                );
                status.decommissioned.retain(|p| p != pod);
            }
            Asked::Unknown | Asked::Refused(_) | Asked::Failed(_) => {
                tracing::warn!(cluster = %name, %pod, "cannot let it back into the replica sets yet")
            }
        }
    }
    if let Some(pod) = plan.decommission.clone() {
        match crate::scale::request(&addresses, &pod, false, tls.as_ref()).await {
            Asked::Done => {
                tracing::info!(cluster = %name, %pod, "taking it out of the replica sets for a scale-down");
                notes
                    .push(Note::normal("Decommissioning", format!("{pod} is taken out of the replica sets before it is removed")).on(&pod));
            }
            // No node knows it: removed only if nothing names it either (a view that lags
            // could say "unknown" of a member that holds replicas).
            Asked::Unknown if view.is_some_and(|v| crate::scale::holds_nothing(v, &pod, running as u64)) => {
                tracing::info!(cluster = %name, %pod, "it never joined: removing it");
                plan.keep = running - 1;
            }
            Asked::Unknown => plan.progress = Some(format!("no node knows {pod} yet; asking again")),
            Asked::Refused(why) => {
                plan.blocked = Some(format!("cannot take {pod} out: {why}"));
                plan.busy = false;
            }
            Asked::Failed(why) => plan.progress = Some(format!("cannot take {pod} out yet: {why}")),
        }
    }
    if plan.keep < running {
        let pod = pod_name(plan.keep);
        notes.push(Note::normal("RemovingPod", format!("{pod} holds no replica any more: removing it")).on(&pod));
    } else if plan.keep > running {
        notes.push(Note::normal("Scaling", format!("from {running} to {} pods; the new ones join the cluster", plan.keep)));
    } else if spec.replicas > running && !lists_all {
        notes.push(Note::normal("Scaling", format!("restarting the {running} pods with the longer member list before adding pods")));
    }
    let (config, founders) = config_for(plan.keep, founders).expect("checked above with the same spec");
    status.founders = Some(founders);
    let params = PatchParams::apply(resources::MANAGER).force();
    Api::<ConfigMap>::namespaced(client.clone(), &ns)
        .patch(&resources::config_map_name(&name), &params, &Patch::Apply(resources::config_map(&cluster, &config)))
        .await?;
    let services = Api::<Service>::namespaced(client.clone(), &ns);
    services.patch(&resources::headless_service_name(&name), &params, &Patch::Apply(resources::headless_service(&cluster))).await?;
    services.patch(&name, &params, &Patch::Apply(resources::client_service(&cluster))).await?;
    let token_hash = consul_token_hash(client, &cluster).await?;
    let stateful_set = resources::stateful_set(&cluster, &config, plan.keep, token_hash.as_deref());
    let set = sets.patch(&name, &params, &Patch::Apply(stateful_set)).await?;
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
    let (nodes, all_led) = crate::nodes::summarize(&answers);
    status.nodes = nodes;
    for (kind, value, reason, message) in conditions(cluster.spec.replicas, &seen, all_led) {
        set_condition(&mut status, &now, kind, value, reason, &message);
    }
    if let Some(why) = &plan.blocked {
        set_condition(&mut status, &now, "Degraded", true, "ScaleDownBlocked", why);
    }
    // A changed template goes out one drained pod at a time (`roll`), once no scale-down is
    // under way (it waits for the pods to go, and their going changes the template again).
    let rolling = if let Some(what) = plan.progress.clone().filter(|_| plan.busy) {
        set_condition(&mut status, &now, "Progressing", true, "Scaling", &what);
        Some(what)
    } else {
        let report = match crate::roll::step(client, &cluster, &set, plan.keep, tls.as_ref(), &mut notes).await {
            Ok(report) => report,
            // Reported, not returned: the status above is still worth writing.
            Err(e) => Some(format!("the roll cannot go on: {e}").into()),
        };
        if let Some(report) = report.as_ref().filter(|r| r.stuck) {
            set_condition(&mut status, &now, "Degraded", true, "RollBlocked", &report.message);
        }
        let rolling = report.map(|r| r.message);
        match (&rolling, plan.progress.clone().or_else(|| plan.blocked.clone())) {
            (Some(roll), Some(scale)) => {
                set_condition(&mut status, &now, "Progressing", true, "RollingUpdate", &format!("{roll}; the scale-down: {scale}"))
            }
            (Some(roll), None) => set_condition(&mut status, &now, "Progressing", true, "RollingUpdate", roll),
            (None, Some(scale)) => set_condition(&mut status, &now, "Progressing", true, "Scaling", &scale),
            (None, None) => {}
        }
        rolling.or(plan.progress.clone())
    };
    finish(&ctx, &cluster, &old, &status, notes).await?;
    // The pods' readiness changes the StatefulSet, which wakes this; the period catches the rest
    // (a roll is followed closely: a drain moves in seconds).
    Ok(Action::requeue(Duration::from_secs(if rolling.is_some() { 2 } else { 30 })))
}

/// Reports a configuration the node would refuse; nothing else changes.
async fn invalid_config(
    ctx: &Context,
    cluster: &AnthillCluster,
    old: &AnthillClusterStatus,
    mut status: AnthillClusterStatus,
    now: &Time,
    e: resources::ConfigError,
    notes: Vec<Note>,
) -> Result<Action, Error> {
    tracing::warn!(cluster = %cluster.name_any(), error = %e, "the nodes' configuration is invalid; nothing changed");
    set_condition(&mut status, now, "Degraded", true, "InvalidConfig", &e.to_string());
    set_condition(&mut status, now, "Progressing", false, "InvalidConfig", "nothing changes until spec.config is fixed");
    finish(ctx, cluster, old, &status, notes).await?;
    // Woken by a change of the spec, and now and then to keep the certificates valid.
    Ok(Action::requeue(RENEWAL_CHECK))
}

/// How often a cluster that waits for its spec to change is looked at again (certificates).
const RENEWAL_CHECK: Duration = Duration::from_secs(3600);

/// The event naming the certificates issued in this reconcile, if any.
fn issued_note(issued: &[String]) -> Vec<Note> {
    if issued.is_empty() {
        return Vec::new();
    }
    vec![Note::normal("CertificatesIssued", format!("issued the certificates of {}", issued.join(", ")))]
}

/// The hash of the Consul ACL token in the cluster's Secret, when it uses Consul and the Secret
/// holds the key (a missing one is the kubelet's to report: the pods cannot start).
async fn consul_token_hash(client: &Client, cluster: &AnthillCluster) -> Result<Option<String>, Error> {
    let spec = &cluster.spec.coordination;
    let Some(consul) = spec.consul.as_ref().filter(|_| spec.store == crate::crd::Store::Consul) else { return Ok(None) };
    let secrets = Api::<Secret>::namespaced(client.clone(), &cluster.namespace().unwrap_or_default());
    let Some(secret) = secrets.get_opt(&consul.token_secret_ref.name).await? else { return Ok(None) };
    let token = secret.data.as_ref().and_then(|d| d.get(&consul.token_secret_ref.key));
    // Salted with the cluster's uid; Consul's tokens are random UUIDs, so 64 bits of a hash
    // reveal nothing usable about one.
    let salt = cluster.metadata.uid.clone().unwrap_or_default();
    Ok(token.map(|t| resources::config_hash(&format!("{salt}:{}", String::from_utf8_lossy(&t.0)))))
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

/// A condition set twice in one reconcile (a default, then what a step found) must not take a
/// new transition time unless it ends where it did not start: the times of `old` are kept for
/// every condition whose status is what it was.
pub fn keep_transition_times(old: &AnthillClusterStatus, status: &mut AnthillClusterStatus) {
    for c in &mut status.conditions {
        if let Some(before) = old.conditions.iter().find(|o| o.type_ == c.type_ && o.status == c.status) {
            c.last_transition_time = before.last_transition_time.clone();
        }
    }
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

/// Writes `status` over `old`, then publishes `notes` and the events of conditions that flipped
/// (failing to publish is logged, not returned: the events are for people).
async fn finish(
    ctx: &Context,
    cluster: &AnthillCluster,
    old: &AnthillClusterStatus,
    status: &AnthillClusterStatus,
    mut notes: Vec<Note>,
) -> Result<(), Error> {
    let clusters: Api<AnthillCluster> = Api::namespaced(ctx.client.clone(), &cluster.namespace().unwrap_or_default());
    let mut status = status.clone();
    keep_transition_times(old, &mut status);
    let status = &status;
    let patch = json!({ "status": status });
    clusters.patch_status(&cluster.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await?;
    notes.extend(flips(old, status));
    ctx.metrics.status(&cluster.namespace().unwrap_or_default(), &cluster.name_any(), status);
    publish(ctx, cluster, notes).await;
    Ok(())
}

/// Publishes `notes` as events on `cluster`; one that cannot be published is logged.
async fn publish(ctx: &Context, cluster: &AnthillCluster, notes: Vec<Note>) {
    let reference = cluster.object_ref(&());
    for note in notes {
        ctx.metrics.event(note.reason);
        let type_ = if note.warning { EventType::Warning } else { EventType::Normal };
        let secondary = note.pod.map(|pod| k8s_openapi::api::core::v1::ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            name: Some(pod),
            namespace: cluster.namespace(),
            ..Default::default()
        });
        let event = Event { type_, reason: note.reason.into(), note: Some(note.message), action: note.reason.into(), secondary };
        if let Err(e) = ctx.recorder.publish(&event, &reference).await {
            tracing::warn!(cluster = %cluster.name_any(), error = %e, "cannot publish an event");
        }
    }
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
    fn keys_are_left_when_another_cluster_on_the_same_consul_has_an_overlapping_prefix() {
        let on_consul = |name: &str, prefix: Option<&str>, address: &str| {
            let mut consul = json!({ "address": address, "tokenSecretRef": { "name": "t", "key": "token" }, "deleteKeysOnRemoval": true });
            if let Some(prefix) = prefix {
                consul["keyPrefix"] = json!(prefix);
            }
            let mut c = resources::tests::cluster(json!({
                "replicas": 3, "version": "0.1.0", "storage": { "size": "1Gi" },
                "coordination": { "store": "Consul", "consul": consul },
            }));
            c.metadata.name = Some(name.into());
            c.metadata.uid = Some(format!("uid-{name}"));
            c
        };
        let broad = on_consul("broad", Some("anthill/"), "http://consul:8500");
        let shop = on_consul("shop", None, "http://consul:8500");
        let elsewhere = on_consul("other", None, "http://other-consul:8500");
        let why = overlapping(&broad, &[broad.clone(), shop.clone()]).unwrap();
        assert!(why.contains("prod/shop") && why.contains("anthill/prod/shop/"), "{why}");
        assert!(overlapping(&shop, &[broad.clone(), shop.clone()]).is_some(), "either way round");
        assert_eq!(overlapping(&shop, &[shop.clone(), elsewhere]), None, "its own prefix, or another Consul's, is no overlap");
        assert!(deletes_keys(&shop));
    }

    #[test]
    fn a_condition_set_twice_in_a_reconcile_keeps_its_transition_time_when_it_ends_as_it_was() {
        let mut old = AnthillClusterStatus::default();
        set_condition(&mut old, &at(10), "Degraded", true, "ScaleDownBlocked", "m");
        // This reconcile: the default first, then the step that finds it blocked still.
        let mut now = old.clone();
        set_condition(&mut now, &at(20), "Degraded", false, "AsExpected", "m");
        set_condition(&mut now, &at(20), "Degraded", true, "ScaleDownBlocked", "m");
        assert_eq!(now.conditions[0].last_transition_time, at(20));
        keep_transition_times(&old, &mut now);
        assert_eq!(now.conditions[0].last_transition_time, at(10));
        // A real flip keeps its new time.
        set_condition(&mut now, &at(30), "Degraded", false, "AsExpected", "m");
        keep_transition_times(&old, &mut now);
        assert_eq!(now.conditions[0].last_transition_time, at(30));
    }

    #[test]
    fn events_come_from_conditions_that_flip_and_not_from_the_first_unavailable_report() {
        let with = |conditions: &[(&str, bool, &str)]| {
            let mut status = AnthillClusterStatus::default();
            for (kind, value, reason) in conditions {
                set_condition(&mut status, &at(1), kind, *value, reason, "m");
            }
            status
        };
        let none = AnthillClusterStatus::default();
        let starting = with(&[("Available", false, "NodesNotReady"), ("Degraded", false, "AsExpected")]);
        assert_eq!(flips(&none, &starting), [], "a cluster that is not available yet is no news");
        let up = with(&[("Available", true, "AllPartitionsLed"), ("Degraded", false, "AsExpected")]);
        assert_eq!(flips(&starting, &up), [Note::normal("Available", "m".into())]);
        assert_eq!(flips(&up, &up), [], "nothing flipped");
        let blocked = with(&[("Available", false, "PartitionsWithoutLeader"), ("Degraded", true, "ScaleDownBlocked")]);
        assert_eq!(
            flips(&up, &blocked),
            [Note::warning("Unavailable", "PartitionsWithoutLeader: m".into()), Note::warning("ScaleDownBlocked", "m".into())]
        );
        let invalid = with(&[("Degraded", true, "InvalidConfig")]);
        assert_eq!(flips(&none, &invalid), [Note::warning("InvalidConfig", "m".into())]);
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

/// Reconciles against a mocked API server (`tower-test`), checking each request the controller
/// makes, in order, and nothing more. No node answers here (their names do not resolve).
#[cfg(test)]
mod mocked {
    use super::*;
    use http::{Request, Response};
    use kube::client::Body;
    use serde_json::Value;
    use tower_test::mock;

    type Handle = mock::Handle<Request<Body>, Response<Body>>;

    struct Api {
        handle: Handle,
    }

    impl Api {
        fn start() -> (Api, Arc<Context>) {
            let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
            let client = Client::new(service, "prod");
            let recorder = Recorder::new(client.clone(), Reporter { controller: resources::MANAGER.into(), instance: None });
            (Api { handle }, Arc::new(Context { client, recorder, metrics: Default::default() }))
        }

        /// The next request: `METHOD path?query` and its JSON body (null when empty); answered
        /// with `status` and `answer`, or with the request's own body when `answer` is null.
        async fn next(&mut self, status: u16, answer: Value) -> (String, Value) {
            let (request, send) = self.handle.next_request().await.expect("a request");
            let line = format!("{} {}", request.method(), request.uri());
            let bytes = request.into_body().collect_bytes().await.unwrap();
            let body: Value = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap() };
            let reply = if answer.is_null() { body.clone() } else { answer };
            send.send_response(Response::builder().status(status).body(Body::from(serde_json::to_vec(&reply).unwrap())).unwrap());
            (line, body)
        }

        async fn nothing_more(mut self) {
            let more = tokio::time::timeout(Duration::from_millis(200), self.handle.next_request()).await;
            assert!(!matches!(more, Ok(Some(_))), "a request more than expected");
        }
    }

    fn not_found() -> Value {
        json!({ "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found" })
    }

    /// `line` is an apply by the operator's field manager, forced, of `path`.
    fn assert_apply(line: &str, path: &str) {
        assert!(line.starts_with(&format!("PATCH {path}?")), "{line}");
        assert!(line.contains("fieldManager=anthill-operator") && line.contains("force=true"), "{line}");
    }

    #[tokio::test]
    async fn a_new_cluster_applies_its_objects_in_order_and_reports_a_status_counting_its_founders() {
        let (mut api, ctx) = Api::start();
        let cluster = Arc::new(resources::tests::cluster(
            json!({ "replicas": 3, "version": "0.1.0", "storage": { "size": "1Gi" }, "tls": { "mode": "Disabled" } }),
        ));
        let reconciling = tokio::spawn(reconcile(cluster.clone(), ctx));
        let (line, _) = api.next(404, not_found()).await;
        assert_eq!(line, "GET /apis/apps/v1/namespaces/prod/statefulsets/shop");
        let (line, config_map) = api.next(200, Value::Null).await;
        assert_apply(&line, "/api/v1/namespaces/prod/configmaps/shop-config");
        let node: Value = serde_yaml::from_str(config_map["data"]["node.yaml"].as_str().unwrap()).unwrap();
        assert!(node["cluster"].get("founders").is_none(), "every member founds a new cluster: {node}");
        let (line, _) = api.next(200, Value::Null).await;
        assert_apply(&line, "/api/v1/namespaces/prod/services/shop-nodes");
        let (line, _) = api.next(200, Value::Null).await;
        assert_apply(&line, "/api/v1/namespaces/prod/services/shop");
        let (line, set) = api.next(200, Value::Null).await;
        assert_apply(&line, "/apis/apps/v1/namespaces/prod/statefulsets/shop");
        assert_eq!(set["spec"]["replicas"], 3);
        let (line, _) = api.next(200, Value::Null).await;
        assert_apply(&line, "/apis/policy/v1/namespaces/prod/poddisruptionbudgets/shop");
        let (line, patch) = api.next(200, serde_json::to_value(&*cluster).unwrap()).await;
        assert_eq!(line, "PATCH /apis/anthill.io/v1alpha1/namespaces/prod/anthillclusters/shop/status?");
        let status = &patch["status"];
        assert_eq!((status["founders"].as_i64(), status["clusterId"].as_str()), (Some(3), Some("0a1b2c3d")));
        let reason = |kind: &str| status["conditions"].as_array().unwrap().iter().find(|c| c["type"] == kind).unwrap()["reason"].clone();
        assert_eq!((reason("Available"), reason("Degraded")), (json!("NodesNotReady"), json!("AsExpected")));
        assert!(reconciling.await.unwrap().is_ok());
        api.nothing_more().await;
    }

    #[tokio::test]
    async fn a_new_cluster_with_tls_gets_a_ca_then_each_nodes_certificate_and_the_administrators_before_anything_else() {
        let (mut api, ctx) = Api::start();
        let cluster = Arc::new(resources::tests::cluster(
            json!({ "replicas": 2, "replicationFactor": 1, "version": "0.1.0", "storage": { "size": "1Gi" } }),
        ));
        let reconciling = tokio::spawn(reconcile(cluster.clone(), ctx));
        let (line, _) = api.next(404, not_found()).await;
        assert_eq!(line, "GET /apis/apps/v1/namespaces/prod/statefulsets/shop");
        let (line, _) = api.next(404, not_found()).await;
        assert_eq!(line, "GET /api/v1/namespaces/prod/secrets/shop-ca");
        let (line, ca) = api.next(201, Value::Null).await;
        assert_eq!(line, "POST /api/v1/namespaces/prod/secrets?");
        assert_eq!((ca["metadata"]["name"].as_str(), ca["type"].as_str()), (Some("shop-ca"), Some("kubernetes.io/tls")));
        let ca_pem = String::from_utf8(base64_decode(ca["data"]["tls.crt"].as_str().unwrap())).unwrap();
        for name in ["shop-0-tls", "shop-1-tls", "shop-admin-tls"] {
            let (line, _) = api.next(404, not_found()).await;
            assert_eq!(line, format!("GET /api/v1/namespaces/prod/secrets/{name}"));
            let (line, secret) = api.next(200, Value::Null).await;
            assert_apply(&line, &format!("/api/v1/namespaces/prod/secrets/{name}"));
            assert_eq!(String::from_utf8(base64_decode(secret["data"]["ca.crt"].as_str().unwrap())).unwrap(), ca_pem);
            assert!(secret["metadata"]["annotations"][crate::certs::ISSUED_FOR].is_string(), "{secret}");
        }
        let (line, config_map) = api.next(200, Value::Null).await;
        assert_apply(&line, "/api/v1/namespaces/prod/configmaps/shop-config");
        let node: Value = serde_yaml::from_str(config_map["data"]["node.yaml"].as_str().unwrap()).unwrap();
        assert_eq!(node["auth"]["cluster_admins"], json!(["admin"]));
        for _ in 0..2 {
            api.next(200, Value::Null).await;
        }
        let (line, set) = api.next(200, Value::Null).await;
        assert_apply(&line, "/apis/apps/v1/namespaces/prod/statefulsets/shop");
        assert!(set.to_string().contains("shop-admin-tls"), "{set}");
        let (line, _) = api.next(200, Value::Null).await;
        assert_apply(&line, "/apis/policy/v1/namespaces/prod/poddisruptionbudgets/shop");
        let (line, patch) = api.next(200, serde_json::to_value(&*cluster).unwrap()).await;
        assert_eq!(line, "PATCH /apis/anthill.io/v1alpha1/namespaces/prod/anthillclusters/shop/status?");
        assert_eq!(patch["status"]["tlsMode"], "Operator");
        // One event names every certificate issued, and why.
        let (line, event) = api.next(201, Value::Null).await;
        assert_eq!(line, "POST /apis/events.k8s.io/v1/namespaces/prod/events?");
        assert_eq!(event["reason"], "CertificatesIssued");
        assert!(event["note"].as_str().unwrap().contains("shop-admin-tls (it does not exist)"), "{event}");
        assert!(reconciling.await.unwrap().is_ok());
        api.nothing_more().await;
    }

    fn base64_decode(text: &str) -> Vec<u8> {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.decode(text).unwrap()
    }

    #[tokio::test]
    async fn a_config_the_node_refuses_changes_nothing_and_is_reported_in_the_status_and_an_event() {
        let (mut api, ctx) = Api::start();
        let cluster = Arc::new(resources::tests::cluster(json!({
            "replicas": 3, "version": "0.1.0", "storage": { "size": "1Gi" }, "config": { "cluster": { "session_ttl_ms": 5 } },
        })));
        let reconciling = tokio::spawn(reconcile(cluster.clone(), ctx));
        let (line, _) = api.next(404, not_found()).await;
        assert_eq!(line, "GET /apis/apps/v1/namespaces/prod/statefulsets/shop");
        // No apply: straight to the status.
        let (line, patch) = api.next(200, serde_json::to_value(&*cluster).unwrap()).await;
        assert_eq!(line, "PATCH /apis/anthill.io/v1alpha1/namespaces/prod/anthillclusters/shop/status?");
        let degraded = patch["status"]["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Degraded").unwrap().clone();
        assert_eq!((degraded["status"].as_str(), degraded["reason"].as_str()), (Some("True"), Some("InvalidConfig")));
        let (line, event) = api.next(201, Value::Null).await;
        assert_eq!(line, "POST /apis/events.k8s.io/v1/namespaces/prod/events?");
        assert_eq!((event["type"].as_str(), event["reason"].as_str()), (Some("Warning"), Some("InvalidConfig")));
        assert!(event["note"].as_str().unwrap().contains("cluster.session_ttl_ms"), "{event}");
        assert_eq!(event["regarding"]["name"], "shop");
        assert!(reconciling.await.unwrap().is_ok());
        api.nothing_more().await;
    }
}
