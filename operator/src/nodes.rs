//! The nodes' own view, for the status: each node's role, how many partitions it leads and how
//! far its replicas trail their leaders, and whether every partition has a leader. Read with
//! `Node.Status` from each pod by its stable address (the operator runs in the cluster).

use std::collections::BTreeMap;
use std::time::Duration;

use anthill_node::client::ClientTls;
use anthill_proto::v1 as pb;

use crate::crd::{AnthillCluster, NodeStatus};
use crate::resources;

/// What the first `pods` nodes say: per node (by member name, in ordinal order) its status when
/// it answered.
pub async fn ask(cluster: &AnthillCluster, pods: i32, tls: Option<&ClientTls>) -> Vec<(String, Option<pb::StatusResponse>)> {
    let asks = (0..pods).map(|i| {
        let (name, address) = resources::member(cluster, i);
        async move {
            let asked = async {
                let mut clients = anthill_node::client::connect_with(&address, tls).await.ok()?;
                clients.node.status(pb::StatusRequest {}).await.ok().map(|r| r.into_inner())
            };
            (name, tokio::time::timeout(Duration::from_secs(2), asked).await.ok().flatten())
        }
    });
    futures_util::future::join_all(asks).await
}

/// The status's `nodes`, and whether every partition has a leader as the nodes that answered
/// see it (`None` when none answered).
pub fn summarize(answers: &[(String, Option<pb::StatusResponse>)]) -> (Vec<NodeStatus>, Option<bool>) {
    // How far each node's replicas trail: the lag its leaders report for it, summed. A partition
    // two nodes claim to lead (a deposed leader that does not know it yet) counts once, from the
    // claim of the highest epoch.
    let mut reports: BTreeMap<u32, &pb::PartitionStatus> = BTreeMap::new();
    for status in answers.iter().filter_map(|(_, s)| s.as_ref()) {
        for p in status.partitions.iter().filter(|p| p.epoch > 0) {
            if reports.get(&p.partition).is_none_or(|r| r.epoch < p.epoch) {
                reports.insert(p.partition, p);
            }
        }
    }
    let mut lag: BTreeMap<&str, u64> = BTreeMap::new();
    for p in reports.values() {
        for f in &p.followers {
            *lag.entry(f.node.as_str()).or_default() += f.lag;
        }
    }
    let nodes = answers
        .iter()
        .map(|(name, status)| {
            let lag = lag.get(name.as_str()).copied().unwrap_or(0);
            let Some(status) = status else { return NodeStatus { name: name.clone(), role: "Down".into(), leaderships: 0, lag } };
            let me = status.cluster.as_ref().and_then(|c| c.members.iter().find(|m| m.name == status.node_id));
            let role = match me {
                Some(m) if m.decommissioned => "Decommissioning",
                Some(m) if m.draining => "Draining",
                Some(m) if m.live => "Ready",
                _ => "Starting",
            };
            let leaderships = status.partitions.iter().filter(|p| p.epoch > 0).count() as u32;
            NodeStatus { name: name.clone(), role: role.into(), leaderships, lag }
        })
        .collect();
    let views: Vec<&pb::ClusterStatus> = answers.iter().filter_map(|(_, s)| s.as_ref()?.cluster.as_ref()).collect();
    // The view of the node that saw the most: the one with the highest coordination index.
    let led = views
        .iter()
        .max_by_key(|c| c.coordination_applied)
        .map(|c| !c.partitions.is_empty() && c.partitions.iter().all(|p| !p.leader.is_empty()));
    (nodes, led)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(name: &str, leads: &[(u32, &[(&str, u64)])], draining: bool, all_led: bool) -> pb::StatusResponse {
        let partitions = leads
            .iter()
            .map(|(p, followers)| pb::PartitionStatus {
                partition: *p,
                epoch: 2,
                followers: followers
                    .iter()
                    .map(|(n, lag)| pb::FollowerProgress { node: (*n).into(), lag: *lag, matched_position: 1 })
                    .collect(),
                ..Default::default()
            })
            .collect();
        let member = pb::ClusterMember { name: name.into(), live: true, draining, ..Default::default() };
        let ownership = |p: u32, leader: &str| pb::PartitionOwnership { partition: p, leader: leader.into(), ..Default::default() };
        let cluster = pb::ClusterStatus {
            members: vec![member],
            partitions: vec![ownership(0, "shop-0"), ownership(1, if all_led { "shop-1" } else { "" })],
            coordination_applied: 7,
            ..Default::default()
        };
        pb::StatusResponse { node_id: name.into(), partitions, cluster: Some(cluster), ..Default::default() }
    }

    #[test]
    fn roles_leaderships_and_lag_come_from_the_nodes_and_a_silent_node_is_down() {
        let answers = vec![
            ("shop-0".to_string(), Some(status("shop-0", &[(0, &[("shop-1", 5), ("shop-2", 40)])], false, true))),
            ("shop-1".to_string(), Some(status("shop-1", &[(1, &[("shop-0", 0), ("shop-2", 2)])], true, true))),
            ("shop-2".to_string(), None),
        ];
        let (nodes, led) = summarize(&answers);
        assert_eq!(led, Some(true));
        let got: Vec<(&str, &str, u32, u64)> = nodes.iter().map(|n| (n.name.as_str(), n.role.as_str(), n.leaderships, n.lag)).collect();
        assert_eq!(got, [("shop-0", "Ready", 1, 0), ("shop-1", "Draining", 1, 5), ("shop-2", "Down", 0, 42)]);
        // shop-2 still thinks it leads partition 0, in an older epoch: its report does not count.
        let mut deposed = status("shop-2", &[(0, &[("shop-1", 900)])], false, true);
        deposed.partitions[0].epoch = 1;
        let mut with_deposed = answers.clone();
        with_deposed[2].1 = Some(deposed);
        let lags: Vec<u64> = summarize(&with_deposed).0.iter().map(|n| n.lag).collect();
        assert_eq!(lags, [0, 5, 42]);
        let leaderless = vec![("shop-0".to_string(), Some(status("shop-0", &[], false, false)))];
        assert_eq!(summarize(&leaderless).1, Some(false));
        assert_eq!(summarize(&[("shop-0".to_string(), None)]).1, None);
    }
}
