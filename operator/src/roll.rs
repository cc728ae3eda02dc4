//! Rolling a changed pod template out (a new version, a new configuration), one pod at a time.
//! The StatefulSet's `updateStrategy` is `OnDelete`, so no pod restarts until the operator
//! deletes it. Each reconcile takes one step:
//! 1. nothing to do once every pod runs the StatefulSet's update revision;
//! 2. wait while any pod is not ready (the last one restarted comes back and catches up first);
//! 3. otherwise the pod on an old template that leads the fewest partitions (so the busiest goes
//!    last, when the others already run the new version), highest ordinal first on a tie, is
//!    asked to drain (`Node.Drain`, docs/replication.md "Draining a node");
//! 4. once it leads nothing and every partition it replicates has all its replicas live and in
//!    sync under another leader (`anthill_node::cli::drain::check`), it is deleted; the
//!    StatefulSet makes it again on the new template.
//!
//! A pod is never deleted while a partition it holds lacks a live, in-sync replica set, so a
//! roll never takes a partition's quorum; it waits instead and says why in `Progressing`.

use std::cmp::Reverse;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, ListParams};
use kube::{Api, Client, ResourceExt};

use crate::crd::AnthillCluster;
use crate::resources;

/// A follower this many events behind its leader is not in sync (`anthill drain --max-lag`).
const MAX_LAG: u64 = 2048;

/// One pod as the roll sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodView {
    pub name: String,
    pub ordinal: i32,
    /// Runs the StatefulSet's update revision.
    pub current: bool,
    pub ready: bool,
    /// Partitions its node leads (unknown when it did not answer).
    pub leaderships: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RollStep {
    Done,
    Wait(String),
    Drain(String),
}

/// The roll's next step for `pods` (module doc).
pub fn next_step(pods: &[PodView]) -> RollStep {
    if pods.iter().all(|p| p.current) {
        return RollStep::Done;
    }
    if let Some(p) = pods.iter().find(|p| !p.ready) {
        return RollStep::Wait(format!("waiting for {} to be ready before the next pod", p.name));
    }
    let next = pods.iter().filter(|p| !p.current).min_by_key(|p| (p.leaderships.unwrap_or(usize::MAX), Reverse(p.ordinal)));
    RollStep::Drain(next.expect("a pod on an old template").name.clone())
}

fn ready(pod: &Pod) -> bool {
    let conditions = pod.status.as_ref().and_then(|s| s.conditions.as_ref());
    conditions.is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// How many partitions the node at `address` leads and whether it drains, as it says (none
/// when it does not answer).
async fn node_view(address: &str) -> Option<(usize, bool)> {
    let asked = async {
        let mut clients = anthill_node::client::connect(address).await.ok()?;
        let status = clients.node.status(anthill_proto::v1::StatusRequest {}).await.ok()?.into_inner();
        let leads = status.partitions.iter().filter(|p| p.epoch > 0).count();
        let draining = status.cluster.as_ref().is_some_and(|c| c.members.iter().any(|m| m.name == status.node_id && m.draining));
        Some((leads, draining))
    };
    tokio::time::timeout(std::time::Duration::from_secs(3), asked).await.ok().flatten()
}

/// One step of the roll of `cluster` (module doc): `None` when every pod runs the current
/// template, else what it is doing or waiting for.
pub async fn step(client: &Client, cluster: &AnthillCluster, set: &StatefulSet) -> Result<Option<String>, kube::Error> {
    let ns = cluster.namespace().unwrap_or_default();
    let Some(update) = set.status.as_ref().and_then(|s| s.update_revision.clone()) else { return Ok(None) };
    let pods_api = Api::<Pod>::namespaced(client.clone(), &ns);
    let pods = pods_api.list(&ListParams::default().labels(&resources::selector_query(&cluster.name_any()))).await?;
    let mut views = Vec::new();
    for pod in &pods.items {
        let name = pod.name_any();
        let Some(ordinal) = name.rsplit('-').next().and_then(|o| o.parse::<i32>().ok()) else { continue };
        let current = pod.labels().get("controller-revision-hash") == Some(&update);
        let address = resources::member(cluster, ordinal).1;
        let seen = node_view(&address).await;
        if current && seen.is_some_and(|(_, draining)| draining) {
            // Drained for a template that is current again (the spec went back before it was
            // restarted): it leads again.
            tracing::info!(cluster = %cluster.name_any(), pod = %name, "drained for a roll that no longer needs it; leading again");
            let _ = anthill_node::cli::drain::request(&address, true).await;
        }
        views.push(PodView { name, ordinal, current, ready: ready(pod), leaderships: seen.map(|(leads, _)| leads) });
    }
    match next_step(&views) {
        RollStep::Done => Ok(None),
        RollStep::Wait(why) => Ok(Some(why)),
        RollStep::Drain(name) => {
            let ordinal = views.iter().find(|v| v.name == name).map_or(0, |v| v.ordinal);
            let address = resources::member(cluster, ordinal).1;
            if let Err(e) = anthill_node::cli::drain::request(&address, false).await {
                return Ok(Some(format!("cannot ask {name} to drain: {e:#}")));
            }
            let progress = match anthill_node::cli::drain::check(&address, MAX_LAG).await {
                Ok(progress) => progress,
                Err(e) => return Ok(Some(format!("cannot read {name}'s drain: {e:#}"))),
            };
            if !progress.done() {
                let why = progress.not_in_sync.iter().next().map(|(p, why)| format!("; partition {p}: {why}")).unwrap_or_default();
                return Ok(Some(format!("draining {name}: it leads {} partitions{why}", progress.leading.len())));
            }
            tracing::info!(cluster = %cluster.name_any(), pod = %name, "drained; restarting it on the new template");
            pods_api.delete(&name, &DeleteParams::default()).await?;
            Ok(Some(format!("restarting {name} on the new template")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ordinal: i32, current: bool, ready: bool, leaderships: Option<usize>) -> PodView {
        PodView { name: format!("shop-{ordinal}"), ordinal, current, ready, leaderships }
    }

    #[test]
    fn the_pod_leading_fewest_partitions_goes_first_and_the_busiest_last_one_at_a_time() {
        let pods = [pod(0, false, true, Some(5)), pod(1, false, true, Some(2)), pod(2, false, true, Some(2))];
        assert_eq!(next_step(&pods), RollStep::Drain("shop-2".into()), "fewest leaderships, highest ordinal on a tie");
        let pods = [pod(0, false, true, Some(5)), pod(1, false, true, Some(2)), pod(2, true, true, None)];
        assert_eq!(next_step(&pods), RollStep::Drain("shop-1".into()));
        let pods = [pod(0, false, true, Some(5)), pod(1, true, false, None), pod(2, true, true, None)];
        assert_eq!(next_step(&pods), RollStep::Wait("waiting for shop-1 to be ready before the next pod".into()));
        let pods = [pod(0, false, true, None), pod(1, false, true, Some(7))];
        assert_eq!(next_step(&pods), RollStep::Drain("shop-1".into()), "a node that does not answer goes last");
        assert_eq!(next_step(&[pod(0, true, false, None), pod(1, true, true, None)]), RollStep::Done);
    }
}
