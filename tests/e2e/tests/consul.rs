//! The Consul coordination store (`coordination/consul.rs`) against a real Consul: three
//! servers on loopback with data directories, Raft and ACLs (default deny), built by
//! `tools/install.sh consul`. Anthill's calls carry a token of the least-privilege policy
//! that docs/replication.md documents.

use std::time::Duration;

use anthill_e2e::consul::{Consul, anthill_policy};
use anthill_node::coordination::conformance::{self, Timing, patiently};
use anthill_node::coordination::consul::{AclToken, ConsulStore};
use anthill_node::coordination::{Cas, CoordinationError, CoordinationStore};

/// Consul's smallest session TTL; Consul invalidates a session up to twice its TTL after the
/// last renewal.
const TIMING: Timing =
    Timing { ttl: Duration::from_secs(10), expires_after: Duration::from_secs(10), expires_within: Duration::from_secs(20) };

async fn cluster() -> Consul {
    let binary = tokio::task::spawn_blocking(|| anthill_e2e::tool("consul")).await.unwrap();
    tokio::task::spawn_blocking(move || Consul::start(&binary, 3)).await.unwrap()
}

fn store(consul: &Consul, server: usize, token: &str) -> ConsulStore {
    ConsulStore::new(consul.http_address(server), Some(AclToken::new(token).expect("a token is a header value")), None)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consul_store_passes_the_conformance_suite_on_a_real_three_server_consul_with_acls() {
    let consul = cluster().await;
    let token = consul.token_with("anthill", &anthill_policy("anthill/"));
    // Through a follower: every call must reach the leader's state (consistent reads).
    let leader = consul.wait_for_leader(Duration::from_secs(30));
    let follower = (leader + 1) % consul.len();
    conformance::run(&store(&consul, follower, &token), "anthill/conformance/", TIMING).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_without_the_policy_is_refused_by_name_and_the_policy_stops_at_its_prefix() {
    let consul = cluster().await;
    let token = consul.token_with("anthill", &anthill_policy("anthill/"));
    let allowed = store(&consul, 0, &token);
    assert!(patiently("put in the prefix", || allowed.put("anthill/x", b"v", Cas::Any)).await);
    match allowed.put("elsewhere/x", b"v", Cas::Any).await {
        Err(CoordinationError::Other(e)) if e.contains("403") => {}
        other => panic!("a write outside the policy's prefix: {other:?}"),
    }
    let nobody = consul.token_with("nothing", "key_prefix \"unrelated/\" { policy = \"read\" }\n");
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
    let token = consul.token_with("anthill", &anthill_policy("anthill/"));
    let leader = consul.wait_for_leader(Duration::from_secs(30));
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
    let new_leader = tokio::task::block_in_place(|| consul.wait_for_leader(Duration::from_secs(30)));
    assert_ne!(new_leader, leader, "the killed server still leads");
    let held = patiently("get", || client.get("anthill/leaders/0")).await.expect("the lock's key");
    assert_eq!((held.session, held.lock_index), (Some(session.clone()), epoch), "the lock changed hands or epochs");
    eprintln!("renewals refused as unavailable during the election: {unavailable}");

    consul.start_server(leader);
    tokio::task::block_in_place(|| consul.wait_for_leader(Duration::from_secs(60)));
    let again = store(&consul, leader, &token);
    let seen = patiently("get on the restarted server", || again.get("anthill/leaders/0")).await.expect("the lock's key");
    assert_eq!(seen.session, Some(session.clone()), "the restarted server sees another holder");
    patiently("destroy", || client.destroy_session(&session)).await;
}
