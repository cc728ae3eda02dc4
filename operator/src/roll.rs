//! Rolling a changed pod template out (a new version, a new configuration), one pod at a time.
//! The StatefulSet's `updateStrategy` is `OnDelete`, so no pod restarts until the operator
//! deletes it. Each reconcile takes one step:
//! 1. nothing to do once every pod runs the StatefulSet's update revision;
//! 2. wait while any pod is not ready (the last one restarted comes back and catches up first);
//! 3. otherwise the pod on an old template that leads the fewest partitions (so the busiest goes
//!    last, when the others already run the new version), highest ordinal first on a tie, is
//!    asked to drain (`Node.Drain`, docs/replication.md "Draining a node");
//! 4. once it leads nothing and every partition it replicates has all its replicas live and in
//!    sync under another leader (`anthill_node::cli::drain::check`), it is evicted (the
//!    Eviction API: the PodDisruptionBudget still has the last word); the StatefulSet makes it
//!    again on the new template.
//!
//! A pod is never deleted while a partition it holds lacks a live, in-sync replica set, so a
//! roll never takes a partition's quorum; it waits instead and says why in `Progressing`.

use std::cmp::Reverse;

use std::time::Duration;

use anthill_node::cli::drain;
use anthill_node::client::{ClientTls, Dial};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, EvictParams, ListParams, Patch, PatchParams, Preconditions};
use kube::{Api, Client, ResourceExt};

use crate::controller::Note;
use crate::crd::AnthillCluster;
use crate::resources;

/// A follower this many events behind its leader is not in sync (`anthill drain --max-lag`).
const MAX_LAG: u64 = 2048;

/// The annotation the operator puts on a pod it asks to drain: the update revision it drains
/// it for. Only such a drain is undone (when that pod's template is current again); a node
/// that drains itself on SIGTERM, or by `anthill drain`, is left alone.
pub const DRAINED_FOR: &str = "anthill.io/drained-for";

/// When the operator asked the pod to drain (RFC 3339), so that a drain that does not finish
/// is reported.
pub const DRAIN_STARTED: &str = "anthill.io/drain-started";

/// A drain that has not finished after this long makes the cluster `Degraded` (`RollBlocked`):
/// some partition has lacked a live, in-sync replica set all that time, and a person should look.
pub const PATIENCE: Duration = Duration::from_secs(600);

/// Whether a drain started at `started` (the [`DRAIN_STARTED`] annotation) has waited past
/// [`PATIENCE`] at `now`.
pub fn overdue(started: Option<&str>, now: k8s_openapi::jiff::Timestamp) -> bool {
    let Some(started) = started.and_then(|s| s.parse::<k8s_openapi::jiff::Timestamp>().ok()) else { return false };
    now.duration_since(started) > k8s_openapi::jiff::SignedDuration::try_from(PATIENCE).expect("a small duration")
}

/// What a roll step reports: what it does or waits for, and whether it is stuck (a drain past
/// [`PATIENCE`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub message: String,
    pub stuck: bool,
}

impl From<String> for Report {
    fn from(message: String) -> Report {
        Report { message, stuck: false }
    }
}

/// One pod as the roll sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodView {
    pub name: String,
    pub ordinal: i32,
    /// Runs the StatefulSet's update revision.
    pub current: bool,
    pub ready: bool,
    /// Being deleted (it has a deletion timestamp).
    pub terminating: bool,
    /// Partitions its node leads (unknown when it did not answer).
    pub leaderships: Option<usize>,
    /// Its node drains (as it says).
    pub draining: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RollStep {
    Done,
    Wait(String),
    Drain(String),
    /// An outdated pod that is not ready (its node is down already, e.g. a release that does
    /// not start): replaced at once, since waiting for it would wait forever.
    Replace(String),
}

/// The roll's next step for `pods` (module doc), `wanted` of them asked for.
pub fn next_step(pods: &[PodView], wanted: i32) -> RollStep {
    if pods.iter().all(|p| p.current && !p.terminating) && pods.len() as i32 == wanted {
        return RollStep::Done;
    }
    if let Some(p) = pods.iter().find(|p| p.terminating) {
        return RollStep::Wait(format!("waiting for {} to go before the next pod", p.name));
    }
    for ordinal in 0..wanted {
        if !pods.iter().any(|p| p.ordinal == ordinal) {
            return RollStep::Wait(format!("waiting for the pod of ordinal {ordinal} to exist"));
        }
    }
    if let Some(p) = pods.iter().find(|p| !p.ready && p.current) {
        return RollStep::Wait(format!("waiting for {} to be ready before the next pod", p.name));
    }
    if let Some(p) = pods.iter().find(|p| !p.ready && !p.current) {
        return RollStep::Replace(p.name.clone());
    }
    // A pod already draining goes on first (an operator restarted mid-roll keeps its choice);
    // then the one leading fewest partitions, the highest ordinal on a tie.
    let next = pods.iter().filter(|p| !p.current).min_by_key(|p| (!p.draining, p.leaderships.unwrap_or(usize::MAX), Reverse(p.ordinal)));
    match next {
        Some(p) => RollStep::Drain(p.name.clone()),
        None => RollStep::Wait("waiting for the StatefulSet to catch up".into()),
    }
}

fn ready(pod: &Pod) -> bool {
    let conditions = pod.status.as_ref().and_then(|s| s.conditions.as_ref());
    pod.metadata.deletion_timestamp.is_none() && conditions.is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// How many partitions the node at `address` leads and whether it drains, as it says (none
/// when it does not answer).
async fn node_view(address: &str, tls: Option<&ClientTls>) -> Option<(usize, bool)> {
    let asked = async {
        let mut clients = anthill_node::client::connect_with(address, tls).await.ok()?;
        let status = clients.node.status(anthill_proto::v1::StatusRequest {}).await.ok()?.into_inner();
        let leads = status.partitions.iter().filter(|p| p.epoch > 0).count();
        let draining = status.cluster.as_ref().is_some_and(|c| c.members.iter().any(|m| m.name == status.node_id && m.draining));
        Some((leads, draining))
    };
    tokio::time::timeout(Duration::from_secs(3), asked).await.ok().flatten()
}

/// Evicts `pod` (the Eviction API, so the PodDisruptionBudget has the last word against any
/// other disruption under way) only if it is still the same pod (its uid). `Some(why)` when the
/// budget refuses now.
async fn evict(pods: &Api<Pod>, pod: &Pod) -> Result<Option<String>, kube::Error> {
    let preconditions = Some(Preconditions { uid: pod.metadata.uid.clone(), resource_version: None });
    let params = EvictParams { delete_options: Some(DeleteParams { preconditions, ..DeleteParams::default() }), ..Default::default() };
    match pods.evict(&pod.name_any(), &params).await {
        Ok(_) => Ok(None),
        Err(kube::Error::Api(status)) if status.code == 429 => {
            Ok(Some(format!("the disruption budget allows no eviction of {} now: {}", pod.name_any(), status.message)))
        }
        // Gone already, or made again meanwhile (the uid precondition): the next step sees it.
        Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => {
            Ok(Some(format!("{} changed under the roll ({}); looking again", pod.name_any(), status.message)))
        }
        Err(e) => Err(e),
    }
}

/// One step of the roll of `cluster`'s `wanted` pods (module doc): `None` when every pod runs
/// the current template, else what it is doing or waiting for.
pub async fn step(
    client: &Client,
    cluster: &AnthillCluster,
    set: &StatefulSet,
    wanted: i32,
    tls: Option<&ClientTls>,
    notes: &mut Vec<Note>,
) -> Result<Option<Report>, kube::Error> {
    let ns = cluster.namespace().unwrap_or_default();
    let Some(status) = &set.status else { return Ok(None) };
    // A status from before the latest template could name an old update revision.
    if status.observed_generation != set.metadata.generation {
        return Ok(Some(String::from("waiting for the StatefulSet to see the latest template").into()));
    }
    let Some(update) = status.update_revision.clone() else { return Ok(None) };
    let pods_api = Api::<Pod>::namespaced(client.clone(), &ns);
    let pods = pods_api.list(&ListParams::default().labels(&resources::selector_query(&cluster.name_any()))).await?;
    let mut views = Vec::new();
    let mut by_name = std::collections::BTreeMap::new();
    for pod in &pods.items {
        let name = pod.name_any();
        let Some(ordinal) = name.rsplit('-').next().and_then(|o| o.parse::<i32>().ok()) else { continue };
        let current = pod.labels().get("controller-revision-hash") == Some(&update);
        let terminating = pod.metadata.deletion_timestamp.is_some();
        let address = resources::member(cluster, ordinal).1;
        let seen = if terminating { None } else { node_view(&address, tls).await };
        let drained_by_us = pod.annotations().contains_key(DRAINED_FOR);
        if current && !terminating && drained_by_us && seen.is_some_and(|(_, draining)| draining) {
            // Drained by a roll for a template that is current again (the spec went back before
            // the pod was restarted): it leads again.
            tracing::info!(cluster = %cluster.name_any(), pod = %name, "drained for a roll that no longer needs it; leading again");
            if drain::request(&address, &name, true, Dial::With(tls)).await.is_ok() {
                let unmark = serde_json::json!({ "metadata": { "annotations": { DRAINED_FOR: null, DRAIN_STARTED: null } } });
                pods_api.patch(&name, &PatchParams::default(), &Patch::Merge(&unmark)).await?;
            }
        }
        let draining = seen.is_some_and(|(_, draining)| draining);
        views.push(PodView {
            name: name.clone(),
            ordinal,
            current,
            ready: ready(pod),
            terminating,
            leaderships: seen.map(|(l, _)| l),
            draining,
        });
        by_name.insert(name, pod);
    }
    match next_step(&views, wanted) {
        RollStep::Done => Ok(None),
        RollStep::Wait(why) => Ok(Some(why.into())),
        RollStep::Replace(name) => {
            tracing::warn!(cluster = %cluster.name_any(), pod = %name, "an outdated pod that is not ready: replacing it on the new template");
            if let Some(why) = evict(&pods_api, by_name[&name]).await? {
                return Ok(Some(why.into()));
            }
            notes.push(Note::warning("Replacing", format!("{name} runs an old template and is not ready: replacing it")).on(&name));
            Ok(Some(format!("replacing {name}, outdated and not ready, on the new template").into()))
        }
        RollStep::Drain(name) => {
            let pod = by_name[&name];
            let ordinal = views.iter().find(|v| v.name == name).map_or(0, |v| v.ordinal);
            let address = resources::member(cluster, ordinal).1;
            // A mark left from a roll to another revision (undone, or paused by a scale-down) is
            // made again, so the drain is timed from now.
            if pod.annotations().get(DRAINED_FOR) != Some(&update) {
                let started = k8s_openapi::jiff::Timestamp::now().to_string();
                let patch = serde_json::json!({ "metadata": { "annotations": { DRAINED_FOR: update, DRAIN_STARTED: started } } });
                pods_api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
                notes.push(
                    Note::normal("Draining", format!("{name} hands its leaderships over before it restarts on the new template")).on(&name),
                );
            }
            if let Err(e) = drain::request(&address, &name, false, Dial::With(tls)).await {
                return Ok(Some(format!("cannot ask {name} to drain: {e:#}").into()));
            }
            // With a replication factor of 1 no other replica can take over: the partition is
            // down while its only node restarts (docs/kubernetes.md).
            if cluster.spec.replication_factor > 1 {
                let progress = match drain::check(&address, MAX_LAG, Dial::With(tls)).await {
                    Ok(progress) => progress,
                    Err(e) => return Ok(Some(format!("cannot read {name}'s drain: {e:#}").into())),
                };
                if !progress.done() {
                    let why = progress.not_in_sync.iter().next().map(|(p, why)| format!("; partition {p}: {why}")).unwrap_or_default();
                    let started = pod.annotations().get(DRAIN_STARTED).map(String::as_str);
                    let stuck = overdue(started, k8s_openapi::jiff::Timestamp::now());
                    let waited = if stuck { format!(" (for over {} minutes)", PATIENCE.as_secs() / 60) } else { String::new() };
                    let message = format!("draining {name}{waited}: it leads {} partitions{why}", progress.leading.len());
                    return Ok(Some(Report { message, stuck }));
                }
            }
            tracing::info!(cluster = %cluster.name_any(), pod = %name, "drained; restarting it on the new template");
            if let Some(why) = evict(&pods_api, pod).await? {
                return Ok(Some(why.into()));
            }
            notes.push(Note::normal("Restarting", format!("{name} drained: restarting it on the new template")).on(&name));
            Ok(Some(format!("restarting {name} on the new template").into()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ordinal: i32, current: bool, ready: bool, leaderships: Option<usize>) -> PodView {
        PodView { name: format!("shop-{ordinal}"), ordinal, current, ready, terminating: false, leaderships, draining: false }
    }

    #[test]
    fn the_pod_leading_fewest_partitions_goes_first_and_the_busiest_last_one_at_a_time() {
        let pods = [pod(0, false, true, Some(5)), pod(1, false, true, Some(2)), pod(2, false, true, Some(2))];
        assert_eq!(next_step(&pods, 3), RollStep::Drain("shop-2".into()), "fewest leaderships, highest ordinal on a tie");
        let pods = [pod(0, false, true, Some(5)), pod(1, false, true, Some(2)), pod(2, true, true, None)];
        assert_eq!(next_step(&pods, 3), RollStep::Drain("shop-1".into()));
        let pods = [pod(0, false, true, Some(5)), pod(1, true, false, None), pod(2, true, true, None)];
        assert_eq!(next_step(&pods, 3), RollStep::Wait("waiting for shop-1 to be ready before the next pod".into()));
        let pods = [pod(0, false, true, None), pod(1, false, true, Some(7))];
        assert_eq!(next_step(&pods, 2), RollStep::Drain("shop-1".into()), "a node that does not answer goes last");
        assert_eq!(next_step(&[pod(0, true, false, None), pod(1, true, true, None)], 2), RollStep::Done);
    }

    #[test]
    fn a_drain_is_overdue_only_past_the_patience_and_only_with_a_readable_start() {
        let at = |s: i64| k8s_openapi::jiff::Timestamp::from_second(s).unwrap();
        let started = at(1_000).to_string();
        assert!(!overdue(Some(&started), at(1_000 + 600)));
        assert!(overdue(Some(&started), at(1_000 + 601)));
        assert!(!overdue(None, at(1_000_000)), "a drain the operator did not start is not timed");
        assert!(!overdue(Some("yesterday"), at(1_000_000)));
    }

    #[test]
    fn a_pod_going_or_missing_stops_the_roll_a_draining_one_goes_on_and_a_broken_outdated_one_is_replaced() {
        let mut going = pod(1, false, true, Some(0));
        going.terminating = true;
        let pods = [pod(0, false, true, Some(0)), going, pod(2, true, true, Some(3))];
        assert_eq!(next_step(&pods, 3), RollStep::Wait("waiting for shop-1 to go before the next pod".into()));
        let pods = [pod(0, false, true, Some(0)), pod(2, true, true, Some(3))];
        assert_eq!(next_step(&pods, 3), RollStep::Wait("waiting for the pod of ordinal 1 to exist".into()));
        let mut draining = pod(0, false, true, Some(4));
        draining.draining = true;
        let pods = [draining, pod(1, false, true, Some(1)), pod(2, true, true, Some(3))];
        assert_eq!(next_step(&pods, 3), RollStep::Drain("shop-0".into()), "the drain under way goes on");
        // A new release that does not start, then a newer one: the broken pod is outdated now.
        let pods = [pod(0, false, true, Some(8)), pod(1, false, true, Some(8)), pod(2, false, false, None)];
        assert_eq!(next_step(&pods, 3), RollStep::Replace("shop-2".into()));
        assert_eq!(next_step(&[pod(0, true, true, None)], 2), RollStep::Wait("waiting for the pod of ordinal 1 to exist".into()));
    }
}
