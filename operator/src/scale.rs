//! Scaling. Up: the StatefulSet gets the new pods at once; they are not founders
//! (`cluster.founders` names the pods that founded the cluster), so each joins the running
//! cluster and waits to be added, while the roll restarts the old pods one at a time with the
//! longer member list; the coordination group then adds the newcomers and the replica sets move
//! onto them (docs/replication.md, "Adding a server", "Moving a replica set").
//!
//! Down, one pod at a time, highest ordinal first, each reconcile one step ([`plan`]):
//! 1. the pod is decommissioned (`Node.Decommission`): every partition's leader moves its
//!    replica to a remaining node, fenced like any move; refused (`Degraded`, reason
//!    `ScaleDownBlocked`) while fewer live nodes than the replication factor would remain;
//! 2. the operator waits until no replica set or move target names it and, with the embedded
//!    store, until the coordination group has let it go;
//! 3. only then the StatefulSet shrinks by one, which removes that pod.
//!
//! The roll waits meanwhile (the member list shrinks once the pods are gone, and the roll
//! then restarts the rest). A pod the operator decommissioned that `replicas` covers again (a
//! scale-down reversed, mid-way or after) is let back in (`--undo`).

use std::time::Duration;

use anthill_proto::v1 as pb;

/// Pod `name`'s ordinal (`<cluster>-<ordinal>`).
pub fn ordinal(name: &str) -> Option<i32> {
    name.rsplit('-').next()?.parse().ok()
}

/// The view to decide about pod `top` by: of the nodes that answered and list `top` among
/// their members, the one that saw the most (the highest coordination index); else the one
/// that saw the most of all.
pub fn view_for<'a>(answers: &'a [(String, Option<pb::StatusResponse>)], top: &str) -> Option<&'a pb::ClusterStatus> {
    let views = || answers.iter().filter_map(|(_, s)| s.as_ref()?.cluster.as_ref());
    let listing = views().filter(|c| c.members.iter().any(|m| m.name == top)).max_by_key(|c| c.coordination_applied);
    listing.or_else(|| views().max_by_key(|c| c.coordination_applied))
}

/// Whether pod `name` (Raft id `id`) holds nothing in `view`: not live, in no replica set or
/// move target, no voter of the coordination group.
pub fn holds_nothing(view: &pb::ClusterStatus, name: &str, id: u64) -> bool {
    let live = view.members.iter().any(|m| m.name == name && m.live);
    let named = view.partitions.iter().any(|p| p.replicas.iter().chain(&p.target).any(|r| r == name));
    !live && !named && !view.coordination_voters.contains(&id)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The StatefulSet's replicas and the members listed (`resources::Shape::pods`).
    pub keep: i32,
    /// Pods to let back into the replica sets (`--undo`; kept until a node takes it, which
    /// once the pod runs again it does, since then every node knows it).
    pub recommission: Vec<String>,
    /// The pod a scale-down takes out (the highest ordinal), to record as the operator's.
    pub ours: Option<String>,
    /// The pod to decommission now.
    pub decommission: Option<String>,
    /// What a scale-down does or waits for (`Progressing`, reason `Scaling`).
    pub progress: Option<String>,
    /// Why a scale-down cannot go on (`Degraded`, reason `ScaleDownBlocked`).
    pub blocked: Option<String>,
    /// A scale-down step is under way (a decommission, its moves, a removal): the roll waits.
    /// Not while it is blocked or no node answers, so a broken pod can still be replaced.
    pub busy: bool,
}

/// The next step towards `wanted` pods from the `running` the StatefulSet has, with pods
/// `name(ordinal)`, replication factor `factor`, the nodes' `view` (of the highest ordinal:
/// [`view_for`]), the pods the operator decommissioned (module doc), and whether every pod
/// there runs the template that lists `wanted` members (`lists_all`: a scale-up adds pods only
/// then).
pub fn plan(
    wanted: i32,
    running: i32,
    factor: i32,
    view: Option<&pb::ClusterStatus>,
    decommissioned: &[String],
    lists_all: bool,
    name: impl Fn(i32) -> String,
) -> Plan {
    let mut plan = Plan {
        keep: wanted,
        recommission: decommissioned.iter().filter(|n| ordinal(n).is_some_and(|o| o < wanted)).cloned().collect(),
        ours: None,
        decommission: None,
        progress: None,
        blocked: None,
        busy: false,
    };
    if running < wanted && !lists_all {
        // The roll restarts the pods there with the longer list first (not busy: it runs).
        plan.keep = running;
        return plan;
    }
    if running <= wanted {
        return plan;
    }
    plan.keep = running;
    let top = name(running - 1);
    plan.ours = Some(top.clone());
    let Some(view) = view else {
        plan.progress = Some(format!("waiting for a node to answer before taking {top} out"));
        return plan;
    };
    let member = view.members.iter().find(|m| m.name == top);
    if !member.is_some_and(|m| m.decommissioned) {
        let staying = |m: &&pb::ClusterMember| ordinal(&m.name).is_some_and(|o| o < running - 1);
        let live = view.members.iter().filter(staying).filter(|m| m.live && !m.decommissioned).count() as i32;
        if live < factor {
            plan.blocked =
                Some(format!("cannot take {top} out: {live} live nodes would remain, fewer than the replication factor {factor}"));
        } else {
            plan.decommission = Some(top.clone());
            plan.progress = Some(format!("taking {top} out of the replica sets"));
            plan.busy = true;
        }
        return plan;
    }
    plan.busy = true;
    let naming = view.partitions.iter().filter(|p| p.replicas.iter().chain(&p.target).any(|r| *r == top)).count();
    if naming > 0 {
        plan.progress = Some(format!("moving {naming} partitions off {top}"));
    } else if view.coordination_voters.contains(&(running as u64)) {
        plan.progress = Some(format!("waiting for {top} to leave the coordination group"));
    } else {
        plan.keep = running - 1;
        plan.progress = Some(format!("removing {top}: it holds nothing now"));
    }
    plan
}

/// How a `Node.Decommission` request went.
#[derive(Debug)]
pub enum Asked {
    Done,
    /// Every node that answered said it does not know the pod (it never joined, or their
    /// views lag: see [`holds_nothing`] before taking it for one that never joined).
    Unknown,
    /// Refused by the node's rules (too few members would remain); why.
    Refused(String),
    /// Unanswered or failed; why.
    Failed(String),
}

/// Asks the nodes at `addresses`, in turn, to decommission `node` (`undo`: let it back in)
/// until one takes it; one that does not know `node` passes the question on.
pub async fn request(addresses: &[String], node: &str, undo: bool, tls: Option<&anthill_node::client::ClientTls>) -> Asked {
    let (mut why, mut unknown) = (String::from("no node to ask"), false);
    for address in addresses {
        let asked = async {
            let mut clients =
                anthill_node::client::connect_with(address, tls).await.map_err(|e| tonic::Status::unavailable(format!("{e:#}")))?;
            clients.node.decommission(pb::DecommissionRequest { node: node.into(), undo }).await
        };
        match tokio::time::timeout(Duration::from_secs(10), asked).await {
            Ok(Ok(_)) => return Asked::Done,
            Ok(Err(status)) if status.code() == tonic::Code::NotFound => unknown = true,
            Ok(Err(status)) if status.code() == tonic::Code::FailedPrecondition => return Asked::Refused(status.message().into()),
            Ok(Err(status)) => why = format!("{address}: {}", status.message()),
            Err(_) => why = format!("{address} did not answer within 10 s"),
        }
    }
    if unknown { Asked::Unknown } else { Asked::Failed(why) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(i: i32) -> String {
        format!("shop-{i}")
    }

    fn view(live: &[i32], out: &[i32], sets: &[&[i32]], voters: &[u64]) -> pb::ClusterStatus {
        let members = (0..5)
            .map(|i| pb::ClusterMember { name: name(i), live: live.contains(&i), decommissioned: out.contains(&i), ..Default::default() })
            .collect();
        let partitions = sets
            .iter()
            .enumerate()
            .map(|(p, set)| pb::PartitionOwnership {
                partition: p as u32,
                replicas: set.iter().map(|i| name(*i)).collect(),
                ..Default::default()
            })
            .collect();
        pb::ClusterStatus { members, partitions, coordination_voters: voters.to_vec(), ..Default::default() }
    }

    #[test]
    fn a_scale_down_takes_the_highest_ordinal_out_first_and_removes_it_only_once_it_holds_nothing() {
        let all = [0, 1, 2, 3, 4];
        // 5 → 3: shop-4 first.
        let start = view(&all, &[], &[&[0, 1, 4], &[2, 3, 4]], &[1, 2, 3, 4, 5]);
        let p = plan(3, 5, 3, Some(&start), &[], true, name);
        assert_eq!((p.keep, p.decommission.as_deref(), p.blocked, p.busy), (5, Some("shop-4"), None, true));
        assert_eq!(p.ours.as_deref(), Some("shop-4"), "recorded as the operator's before it is asked");
        let moving = view(&all, &[4], &[&[0, 1, 2], &[2, 3, 4]], &[1, 2, 3, 4, 5]);
        let p = plan(3, 5, 3, Some(&moving), &["shop-4".into()], true, name);
        assert_eq!((p.keep, p.decommission, p.progress.as_deref()), (5, None, Some("moving 1 partitions off shop-4")));
        let in_group = view(&all, &[4], &[&[0, 1, 2], &[2, 3, 1]], &[1, 2, 3, 4, 5]);
        assert_eq!(plan(3, 5, 3, Some(&in_group), &[], true, name).keep, 5, "still a voter of the coordination group");
        let gone = view(&all, &[4], &[&[0, 1, 2], &[2, 3, 1]], &[1, 2, 3, 4]);
        assert_eq!(plan(3, 5, 3, Some(&gone), &[], true, name).keep, 4, "shop-4 goes");
        // Then shop-3, and nothing more once 3 are left.
        assert_eq!(plan(3, 4, 3, Some(&gone), &[], true, name).decommission.as_deref(), Some("shop-3"));
        let done = plan(3, 3, 3, Some(&gone), &[], true, name);
        assert_eq!((done.keep, done.decommission, done.progress, done.busy), (3, None, None, false));
    }

    #[test]
    fn a_scale_up_adds_pods_only_once_every_pod_there_runs_the_template_that_lists_them() {
        let all = view(&[0, 1, 2], &[], &[&[0, 1, 2]], &[1, 2, 3]);
        let waiting = plan(5, 3, 3, Some(&all), &[], false, name);
        assert_eq!((waiting.keep, waiting.busy, waiting.decommission), (3, false, None), "the roll goes first");
        assert_eq!(plan(5, 3, 3, Some(&all), &[], true, name).keep, 5);
    }

    #[test]
    fn the_view_comes_from_a_node_that_lists_the_pod_and_a_pod_unknown_to_all_holds_nothing_only_if_nothing_names_it() {
        let answer = |applied: u64, members: i32| {
            let members = (0..members).map(|i| pb::ClusterMember { name: name(i), ..Default::default() }).collect();
            let cluster = pb::ClusterStatus { members, coordination_applied: applied, ..Default::default() };
            Some(pb::StatusResponse { cluster: Some(cluster), ..Default::default() })
        };
        // shop-0 restarted with a shorter list saw more, but does not list shop-4.
        let answers = vec![(name(0), answer(90, 4)), (name(1), answer(80, 5)), (name(2), None)];
        assert_eq!(view_for(&answers, "shop-4").unwrap().coordination_applied, 80);
        assert_eq!(view_for(&answers, "shop-9").unwrap().coordination_applied, 90);
        let named = view(&[0, 1, 2], &[], &[&[0, 1, 4]], &[1, 2, 3]);
        assert!(!holds_nothing(&named, "shop-4", 5), "a replica set names it");
        assert!(!holds_nothing(&view(&[0, 4], &[], &[], &[]), "shop-4", 5), "it is live");
        assert!(!holds_nothing(&view(&[0], &[], &[], &[1, 5]), "shop-4", 5), "it votes");
        assert!(holds_nothing(&view(&[0, 1, 2], &[], &[&[0, 1, 2]], &[1, 2, 3]), "shop-4", 5));
    }

    #[test]
    fn a_scale_down_that_would_leave_too_few_live_nodes_is_refused_and_a_reversed_one_lets_the_pod_back() {
        // shop-1 is down: taking shop-3 out would leave 2 live nodes for a factor of 3.
        let one_down = view(&[0, 2, 3], &[], &[&[0, 1, 3]], &[1, 2, 3, 4]);
        let p = plan(3, 4, 3, Some(&one_down), &[], true, name);
        assert_eq!((p.keep, p.decommission), (4, None));
        assert_eq!(p.blocked.as_deref(), Some("cannot take shop-3 out: 2 live nodes would remain, fewer than the replication factor 3"));
        // No node answers: nothing is decided.
        let p = plan(3, 4, 3, None, &[], true, name);
        assert_eq!((p.keep, p.decommission, p.blocked), (4, None, None));
        assert!(!p.busy, "a blocked scale-down lets the roll go on (it may replace the broken pod)");
        // Back to 5 while shop-4 moves out (or after it went): it is let back in, and so is
        // shop-3 (whatever a view that may lag says).
        let out = view(&[0, 1, 2, 3, 4], &[4], &[&[0, 1, 3]], &[1, 2, 3, 4]);
        let p = plan(5, 5, 3, Some(&out), &["shop-4".into(), "shop-3".into()], true, name);
        assert_eq!((p.keep, p.recommission), (5, vec!["shop-4".to_string(), "shop-3".to_string()]));
        assert_eq!(plan(4, 5, 3, None, &["shop-4".into(), "shop-3".into()], true, name).recommission, ["shop-3"]);
    }
}
