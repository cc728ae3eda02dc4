//! The Consul coordination store (`coordination/consul.rs`) against a real Consul: three
//! servers on loopback with data directories, Raft and ACLs (default deny), built by
//! `tools/install.sh consul`. Anthill's calls carry a token of the least-privilege policy
//! that docs/replication.md documents.

use std::sync::Arc;
use std::time::Duration;

use anthill_node::chaos::net::Cuts;
use anthill_node::coordination::conformance::{self, Timing, patiently};
use anthill_node::coordination::consul::{AclToken, ConsulStore};
use anthill_node::coordination::{Cas, CoordinationError, CoordinationStore, SessionId};
use anthill_node::local::consul::{LocalConsul as Consul, anthill_policy};
use tokio::time::Instant;

/// Consul's smallest session TTL; Consul invalidates a session up to twice its TTL after the
/// last renewal.
const TIMING: Timing =
    Timing { ttl: Duration::from_secs(10), expires_after: Duration::from_secs(10), expires_within: Duration::from_secs(20) };

/// Three servers, started from this runtime thread: a server dies with the thread that started
/// it, so not from a blocking-pool thread (`LocalConsul`).
async fn cluster() -> Consul {
    let binary = tokio::task::block_in_place(|| anthill_e2e::tool("consul"));
    tokio::task::block_in_place(|| Consul::start(&binary, 3)).expect("a Consul cluster")
}

fn store(consul: &Consul, server: usize, token: &str) -> ConsulStore {
    ConsulStore::new(consul.http_address(server), Some(AclToken::new(token).expect("a token is a header value")), None)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consul_store_passes_the_conformance_suite_on_a_real_three_server_consul_with_acls() {
    let consul = cluster().await;
    let token = consul.token_with("anthill", &anthill_policy("anthill/")).unwrap();
    // Through a follower: every call must reach the leader's state (consistent reads).
    let leader = consul.wait_for_leader(Duration::from_secs(30)).unwrap();
    let follower = (leader + 1) % consul.len();
    conformance::run(&store(&consul, follower, &token), "anthill/conformance/", TIMING).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_without_the_policy_is_refused_by_name_and_the_policy_stops_at_its_prefix() {
    let consul = cluster().await;
    let token = consul.token_with("anthill", &anthill_policy("anthill/")).unwrap();
    let allowed = store(&consul, 0, &token);
    assert!(patiently("put in the prefix", || allowed.put("anthill/x", b"v", Cas::Any)).await);
    match allowed.put("elsewhere/x", b"v", Cas::Any).await {
        Err(CoordinationError::Other(e)) if e.contains("403") => {}
        other => panic!("a write outside the policy's prefix: {other:?}"),
    }
    let nobody = consul.token_with("nothing", "key_prefix \"unrelated/\" { policy = \"read\" }\n").unwrap();
    let refused = store(&consul, 0, &nobody);
    match refused.create_session("node-1", TIMING.ttl).await {
        Err(CoordinationError::Other(e)) if e.contains("403") => {}
        other => panic!("a session made with a token without session rights: {other:?}"),
    }
    match refused.put("anthill/x", b"v", Cas::Any).await {
        Err(CoordinationError::Other(e)) if e.contains("403") => {}
        other => panic!("a write with a token without key rights: {other:?}"),
    }
}

/// The Consul leader is killed while a session holds a lock: the store answers again once the
/// two others elect a leader, the renewed session keeps its lock in the same epoch (a new
/// Consul leader restarts every session's TTL), and the killed server rejoins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_consul_leader_is_killed_then_a_renewed_session_keeps_its_lock_and_the_store_answers_again() {
    let mut consul = cluster().await;
    let token = consul.token_with("anthill", &anthill_policy("anthill/")).unwrap();
    let leader = consul.wait_for_leader(Duration::from_secs(30)).unwrap();
    let through = (leader + 1) % consul.len();
    let client = store(&consul, through, &token);
    let session = patiently("create session", || client.create_session("node-1", TIMING.ttl)).await;
    let epoch = patiently("acquire", || client.acquire("anthill/leaders/0", b"node-1", &session)).await.expect("a free lock");

    consul.kill(leader);
    let killed_at = tokio::time::Instant::now();
    // Renew every third of a TTL through the election, as the elector does.
    let mut unavailable = 0;
    while killed_at.elapsed() < TIMING.ttl * 3 {
        match client.renew_session(&session).await {
            Ok(alive) => assert!(alive, "the session was lost with the Consul leader"),
            Err(CoordinationError::Unavailable(_)) => unavailable += 1,
            Err(e) => panic!("renewal during the election: {e}"),
        }
        tokio::time::sleep(TIMING.ttl / 3).await;
    }
    let new_leader = tokio::task::block_in_place(|| consul.wait_for_leader(Duration::from_secs(30)).unwrap());
    assert_ne!(new_leader, leader, "the killed server still leads");
    let held = patiently("get", || client.get("anthill/leaders/0")).await.expect("the lock's key");
    assert_eq!((held.session, held.lock_index), (Some(session.clone()), epoch), "the lock changed hands or epochs");
    eprintln!("renewals refused as unavailable during the election: {unavailable}");

    consul.start_server(leader).unwrap();
    tokio::task::block_in_place(|| consul.wait_for_leader(Duration::from_secs(60)).unwrap());
    let again = store(&consul, leader, &token);
    let seen = patiently("get on the restarted server", || again.get("anthill/leaders/0")).await.expect("the lock's key");
    assert_eq!(seen.session, Some(session.clone()), "the restarted server sees another holder");
    patiently("destroy", || client.destroy_session(&session)).await;
}

/// A runtime for the tests that first run themselves again in a network namespace of their own
/// (`#[tokio::test]` would start one in both runs).
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("a runtime")
}

/// A cluster, a token of Anthill's policy on `anthill/`, and the server that leads.
async fn cluster_with_token() -> (Consul, String, usize) {
    let consul = cluster().await;
    let token = consul.token_with("anthill", &anthill_policy("anthill/")).unwrap();
    let leader = tokio::task::block_in_place(|| consul.wait_for_leader(Duration::from_secs(30)).unwrap());
    (consul, token, leader)
}

/// Renews `session` through `client` every `every` until `stop`, as the elector does; each
/// renewal's send time and outcome (`Ok(false)`: the session is gone).
async fn keep_renewing(
    client: ConsulStore,
    session: SessionId,
    every: Duration,
    stop: Arc<tokio::sync::Notify>,
) -> Vec<(Instant, Result<bool, String>)> {
    let mut renewals = Vec::new();
    loop {
        let sent = Instant::now();
        let outcome = client.renew_session(&session).await;
        match &outcome {
            Ok(_) | Err(CoordinationError::Unavailable(_)) => {}
            Err(e) => panic!("a renewal failed other than as unavailable (the elector would give up): {e}"),
        }
        renewals.push((sent, outcome.map_err(|e| e.to_string())));
        tokio::select! {
            _ = stop.notified() => return renewals,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// The server a lock holder talks to is cut off from the two others (a partition, not a
/// crash): no one else gets the lock until the holder's session has gone a whole TTL without a
/// renewal that went through, which is what lets the holder trust its lease that long
/// (docs/replication.md); and another node gets it within twice the TTL (Consul's bound).
/// After the heal the cut-off server serves the new holder's lock, in a higher epoch.
#[test]
fn when_the_server_a_lock_holder_talks_to_is_cut_off_then_no_one_takes_the_lock_within_a_ttl_of_its_last_renewal_and_another_gets_it_within_two()
 {
    if !anthill_e2e::alone_in_own_network_namespace(
        "when_the_server_a_lock_holder_talks_to_is_cut_off_then_no_one_takes_the_lock_within_a_ttl_of_its_last_renewal_and_another_gets_it_within_two",
        &["consul"],
    ) {
        return;
    }
    runtime().block_on(async {
        let (consul, token, leader) = cluster_with_token().await;
        let (cut_off, majority) = ((leader + 1) % 3, (leader + 2) % 3);
        let holder = store(&consul, cut_off, &token);
        let rival = store(&consul, majority, &token);
        let held = patiently("create session", || holder.create_session("node-1", TIMING.ttl)).await;
        let first_epoch = patiently("acquire", || holder.acquire("anthill/leaders/0", b"node-1", &held)).await.expect("a free lock");
        let contender = patiently("create the rival's session", || rival.create_session("node-2", TIMING.ttl)).await;
        let stop = Arc::new(tokio::sync::Notify::new());
        let renewing = tokio::spawn(keep_renewing(store(&consul, cut_off, &token), held.clone(), TIMING.ttl / 3, stop.clone()));
        tokio::time::sleep(TIMING.ttl / 3).await;

        let mut cuts = Cuts::install().expect("tc cuts on the namespace's loopback");
        cuts.partition(&[consul.ip(cut_off)], &[consul.ip(leader), consul.ip(majority)]).expect("the cut");
        let cut_at = Instant::now();
        // The send time of the earliest attempt since the last one answered "held by another":
        // an attempt that failed may have taken the lock all the same.
        let mut first_try: Option<Instant> = None;
        let (acquire_sent, second_epoch) = loop {
            assert!(
                cut_at.elapsed() < TIMING.expires_within * 2,
                "the rival never got the lock of a session cut off from Consul's majority"
            );
            // The rival's own session must live meanwhile.
            match rival.renew_session(&contender).await {
                Ok(alive) => assert!(alive, "the rival's session expired"),
                Err(CoordinationError::Unavailable(_)) => {}
                Err(e) => panic!("the rival's renewal: {e}"),
            }
            let sent = *first_try.get_or_insert_with(Instant::now);
            match rival.acquire("anthill/leaders/0", b"node-2", &contender).await {
                Ok(Some(epoch)) => break (sent, epoch),
                Ok(None) => first_try = None,
                Err(CoordinationError::Unavailable(_)) => {}
                Err(e) => panic!("the rival's acquire: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        stop.notify_one();
        let renewals = renewing.await.expect("the renewals ran");
        let last_renewed = renewals.iter().filter(|(_, r)| *r == Ok(true)).map(|(sent, _)| *sent).max().expect("renewals before the cut");
        let unrenewed = acquire_sent.duration_since(last_renewed);
        // A renewal in flight when the cut came may have reached Consul though it failed here:
        // Consul's clock may start from the last one sent before the cut.
        let last_sent_before_cut =
            renewals.iter().map(|(sent, _)| *sent).filter(|sent| *sent < cut_at).max().expect("renewals before the cut");
        eprintln!(
            "the rival's acquire was sent {unrenewed:?} after the holder's last renewal that went through ({} renewals, {} after the cut)",
            renewals.len(),
            renewals.iter().filter(|(sent, _)| *sent > cut_at).count()
        );
        assert!(
            unrenewed >= TIMING.expires_after,
            "the rival got the lock {unrenewed:?} after the holder's last renewal, less than a TTL: two holders at once"
        );
        // Consul frees it at twice the TTL (measured: 20.2 s); the slack is for a loaded machine.
        let freed_after = acquire_sent.duration_since(last_sent_before_cut);
        assert!(freed_after <= TIMING.expires_within + Duration::from_secs(5), "the lock stayed with a dead session for {freed_after:?}");
        assert!(second_epoch > first_epoch, "the new holder's epoch {second_epoch} does not exceed {first_epoch}");
        assert!(
            renewals.iter().all(|(sent, r)| *sent < cut_at || *r != Ok(true)),
            "a renewal through the cut-off server was answered as done: {renewals:?}"
        );

        cuts.heal().expect("the heal");
        tokio::task::block_in_place(|| consul.wait_for_leader(Duration::from_secs(60)).unwrap());
        assert!(!patiently("renew after the heal", || holder.renew_session(&held)).await, "the cut-off session is alive again");
        let seen = patiently("get through the healed server", || holder.get("anthill/leaders/0")).await.expect("the lock's key");
        assert_eq!((seen.session, seen.lock_index), (Some(contender), second_epoch), "the healed server serves another holder");
    });
}

/// The Consul leader is cut off from the two others: they elect a leader among themselves, a
/// lock holder that talks to one of them keeps its session and its lock in the same epoch
/// through the election, and after the heal the old leader serves that same lock.
#[test]
fn when_the_consul_leader_is_cut_off_then_a_holder_on_the_majority_side_keeps_its_lock_in_the_same_epoch() {
    if !anthill_e2e::alone_in_own_network_namespace(
        "when_the_consul_leader_is_cut_off_then_a_holder_on_the_majority_side_keeps_its_lock_in_the_same_epoch",
        &["consul"],
    ) {
        return;
    }
    runtime().block_on(async {
        let (consul, token, leader) = cluster_with_token().await;
        let through = (leader + 1) % 3;
        let holder = store(&consul, through, &token);
        let held = patiently("create session", || holder.create_session("node-1", TIMING.ttl)).await;
        let epoch = patiently("acquire", || holder.acquire("anthill/leaders/0", b"node-1", &held)).await.expect("a free lock");

        let mut cuts = Cuts::install().expect("tc cuts on the namespace's loopback");
        let majority: Vec<_> = (0..3).filter(|i| *i != leader).map(|i| consul.ip(i)).collect();
        cuts.partition(&[consul.ip(leader)], &majority).expect("the cut");
        let stop = Arc::new(tokio::sync::Notify::new());
        let renewing = tokio::spawn(keep_renewing(store(&consul, through, &token), held.clone(), TIMING.ttl / 3, stop.clone()));
        tokio::time::sleep(TIMING.ttl * 3).await;
        stop.notify_one();
        let renewals = renewing.await.expect("the renewals ran");
        assert!(renewals.iter().all(|(_, r)| *r != Ok(false)), "the session was lost with the cut-off leader: {renewals:?}");
        let new_leader = (0..3).filter(|i| *i != leader).find_map(|i| consul.leader_seen_by(i));
        assert!(new_leader.is_some_and(|l| l != leader), "the majority side has no leader of its own: {new_leader:?}");
        assert_eq!(consul.leader_seen_by(leader), None, "the cut-off leader still calls itself or another the leader");
        let seen = patiently("get", || holder.get("anthill/leaders/0")).await.expect("the lock's key");
        assert_eq!((seen.session, seen.lock_index), (Some(held.clone()), epoch), "the lock changed hands or epochs");

        cuts.heal().expect("the heal");
        tokio::task::block_in_place(|| consul.wait_for_leader(Duration::from_secs(60)).unwrap());
        let old_leader = store(&consul, leader, &token);
        let seen = patiently("get through the old leader", || old_leader.get("anthill/leaders/0")).await.expect("the lock's key");
        assert_eq!(seen.session, Some(held.clone()), "the old leader serves another holder");
        patiently("destroy", || holder.destroy_session(&held)).await;
    });
}
