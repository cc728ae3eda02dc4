//! The conformance suite of [`CoordinationStore`]: what the ownership algorithm relies on
//! (docs/replication.md, "Ownership"), checked the same way against every store. The embedded
//! store runs it in `driver.rs`'s tests; a real three-server Consul with ACLs in
//! `tests/e2e/tests/consul.rs`. Each check panics with what it saw when the store breaks it.
//!
//! - compare-and-set: "absent" and "modify index" conditions hold, a stale index is refused,
//!   for writes and deletes alike;
//! - a lock has at most one holder; a holder acquiring again keeps it; only the holder
//!   releases it; destroying a session releases its locks;
//! - lock indexes (the epochs) only grow, across holders and sessions;
//! - a blocking list wakes on every change after its index, and its index grows;
//! - a renewed session outlives its TTL; one left alone expires within the store's bounds (for
//!   Consul no sooner than its TTL and no later than two; for the embedded store within a clock
//!   tick of one TTL, see `Timing::expires_after`), its locks are
//!   then free at once for another session (no lock delay), and it cannot be renewed again.

use std::time::Duration;

use tokio::time::Instant;

use super::{Cas, CoordinationError, CoordinationStore, KvEntry, SessionId};

/// The store's timing, as the suite expects it.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// The TTL the suite's sessions ask for.
    pub ttl: Duration,
    /// The soonest a session left alone may lose its locks, after its last renewal was sent:
    /// the TTL for Consul; for the embedded store, the TTL less how far its clock (moved by
    /// the leader's ticks) may lag the moment the renewal is applied.
    pub expires_after: Duration,
    /// The latest a session left alone may still hold its locks, after its last renewal.
    pub expires_within: Duration,
}

/// Runs every check under `prefix` (a key prefix nothing else uses, ending in `/`).
pub async fn run<S: CoordinationStore>(store: &S, prefix: &str, timing: Timing) {
    compare_and_set(store, &format!("{prefix}cas/")).await;
    one_holder_at_a_time_and_lock_indexes_grow(store, &format!("{prefix}lock/"), timing).await;
    blocking_lists_wake_on_every_change(store, &format!("{prefix}watch/")).await;
    sessions_expire_after_their_ttl_and_free_their_locks_at_once(store, &format!("{prefix}expiry/"), timing).await;
}

/// Retries `op` while the store is unavailable (a leader election), for at most 30 s.
pub async fn patiently<T, F, Fut>(what: &str, mut op: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = super::Result<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match op().await {
            Ok(value) => return value,
            Err(CoordinationError::Unavailable(e)) if Instant::now() < deadline => {
                tracing::debug!(what, error = %e, "store unavailable; trying again");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{what}: {e}"),
        }
    }
}

async fn get<S: CoordinationStore>(store: &S, key: &str) -> Option<KvEntry> {
    patiently(&format!("get {key}"), || store.get(key)).await
}

pub async fn compare_and_set<S: CoordinationStore>(store: &S, prefix: &str) {
    let key = format!("{prefix}k");
    assert!(patiently("put absent", || store.put(&key, b"a", Cas::Absent)).await, "a put on an absent key is refused");
    assert!(!patiently("put absent again", || store.put(&key, b"b", Cas::Absent)).await, "a put 'if absent' overwrote a key");
    let first = get(store, &key).await.expect("the key was written");
    assert_eq!(first.value, b"a");
    assert!(
        patiently("put at index", || store.put(&key, b"c", Cas::ModifyIndex(first.modify_index))).await,
        "the current index was refused"
    );
    assert!(
        !patiently("put at stale index", || store.put(&key, b"d", Cas::ModifyIndex(first.modify_index))).await,
        "a stale modify index was taken"
    );
    let second = get(store, &key).await.expect("the key is there");
    assert_eq!(second.value, b"c", "the refused put changed the value");
    assert!(second.modify_index > first.modify_index, "the modify index did not grow: {first:?} then {second:?}");
    assert!(
        !patiently("delete at stale index", || store.delete(&key, Cas::ModifyIndex(first.modify_index))).await,
        "a delete at a stale index went through"
    );
    assert!(get(store, &key).await.is_some(), "a refused delete removed the key");
    assert!(patiently("delete at index", || store.delete(&key, Cas::ModifyIndex(second.modify_index))).await);
    assert!(get(store, &key).await.is_none(), "a delete left the key");
    assert!(patiently("put any", || store.put(&key, b"e", Cas::Any)).await);
    assert!(patiently("delete any", || store.delete(&key, Cas::Any)).await);
}

pub async fn one_holder_at_a_time_and_lock_indexes_grow<S: CoordinationStore>(store: &S, prefix: &str, timing: Timing) {
    let key = format!("{prefix}k");
    let a = patiently("create session a", || store.create_session("conformance-a", timing.ttl)).await;
    let b = patiently("create session b", || store.create_session("conformance-b", timing.ttl)).await;
    assert_ne!(a, b, "two sessions got one id");
    let acquire = |session: &SessionId, value: &'static [u8]| {
        let (key, session) = (key.clone(), session.clone());
        async move { patiently("acquire", || store.acquire(&key, value, &session)).await }
    };
    let mut epochs = Vec::new();
    let first = acquire(&a, b"a").await.expect("a free lock was refused");
    epochs.push(first);
    assert_eq!(acquire(&b, b"b").await, None, "a second session took a held lock");
    assert_eq!(acquire(&a, b"a").await, Some(first), "the holder acquiring again lost the lock or moved its index");
    let held = get(store, &key).await.expect("a held key exists");
    assert_eq!((held.session.as_ref(), held.value.as_slice()), (Some(&a), &b"a"[..]), "the holder or the value is wrong: {held:?}");
    assert!(!patiently("release by another", || store.release(&key, &b)).await, "a session released a lock it does not hold");
    assert_eq!(get(store, &key).await.and_then(|e| e.session), Some(a.clone()), "another session's release freed the lock");
    assert!(patiently("release", || store.release(&key, &a)).await, "the holder could not release");
    assert_eq!(get(store, &key).await.and_then(|e| e.session), None, "a released lock still has a holder");
    // Held in turn, then freed by destroying the holder's session: each new holding has a
    // higher lock index.
    for round in 0..3 {
        let (holder, other) = if round % 2 == 0 { (&b, &a) } else { (&a, &b) };
        let epoch = acquire(holder, b"x").await.expect("a free lock was refused");
        assert_eq!(acquire(other, b"y").await, None, "two holders at once");
        epochs.push(epoch);
        assert!(patiently("release", || store.release(&key, holder)).await);
    }
    let c = patiently("create session c", || store.create_session("conformance-c", timing.ttl)).await;
    epochs.push(acquire(&c, b"c").await.expect("a free lock was refused"));
    patiently("destroy session c", || store.destroy_session(&c)).await;
    assert_eq!(get(store, &key).await.and_then(|e| e.session), None, "a destroyed session still holds its lock");
    epochs.push(acquire(&a, b"a").await.expect("the lock of a destroyed session was not free"));
    assert!(epochs.windows(2).all(|w| w[0] < w[1]), "lock indexes did not grow with every holding: {epochs:?}");
    patiently("release", || store.release(&key, &a)).await;
    for s in [a, b] {
        patiently("destroy session", || store.destroy_session(&s)).await;
    }
}

pub async fn blocking_lists_wake_on_every_change<S: CoordinationStore>(store: &S, prefix: &str) {
    let mut index = patiently("list", || store.list(prefix, 0, Duration::ZERO)).await.index;
    for n in 0..5 {
        let key = format!("{prefix}k{n}");
        let began = Instant::now();
        let wait = Duration::from_secs(20);
        let (listing, ()) = tokio::join!(async { patiently("blocking list", || store.list(prefix, index, wait)).await }, async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert!(patiently("put", || store.put(&key, b"v", Cas::Any)).await);
        });
        // A list may return early with nothing new; it must then be asked again.
        let mut listing = listing;
        while !listing.entries.iter().any(|e| e.key == key) {
            assert!(began.elapsed() < wait, "no blocking list saw {key} within {wait:?}");
            listing = patiently("blocking list", || store.list(prefix, listing.index, wait)).await;
        }
        assert!(began.elapsed() < Duration::from_secs(5), "the list woke {:?} after a change", began.elapsed());
        assert!(listing.index > index, "the listing's index did not grow past {index}: {}", listing.index);
        assert_eq!(listing.entries.len(), n + 1, "the listing lost a key: {:?}", listing.entries);
        index = listing.index;
    }
    for n in 0..5 {
        let key = format!("{prefix}k{n}");
        patiently("delete", || store.delete(&key, Cas::Any)).await;
    }
}

pub async fn sessions_expire_after_their_ttl_and_free_their_locks_at_once<S: CoordinationStore>(store: &S, prefix: &str, timing: Timing) {
    let key = format!("{prefix}k");
    let session = patiently("create session", || store.create_session("conformance-expiry", timing.ttl)).await;
    let first = patiently("acquire", || store.acquire(&key, b"v", &session)).await.expect("a free lock was refused");
    // Renewed every third of a TTL for two TTLs: it lives on.
    let renewed_until = Instant::now() + timing.ttl * 2;
    let mut last_renewal = Instant::now();
    while Instant::now() < renewed_until {
        tokio::time::sleep(timing.ttl / 3).await;
        last_renewal = Instant::now();
        assert!(patiently("renew", || store.renew_session(&session)).await, "a renewed session expired");
    }
    assert_eq!(get(store, &key).await.and_then(|e| e.session), Some(session.clone()), "a renewed session lost its lock");
    // Left alone: gone no sooner than a TTL after the last renewal, and no later than the bound.
    let freed = loop {
        let holder = get(store, &key).await.and_then(|e| e.session);
        let now = Instant::now();
        if holder.is_none() {
            break now;
        }
        assert!(
            now.duration_since(last_renewal) <= timing.expires_within + Duration::from_secs(1),
            "the session still held its lock {:?} after its last renewal (bound {:?})",
            now.duration_since(last_renewal),
            timing.expires_within
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let lived = freed.duration_since(last_renewal);
    assert!(
        lived >= timing.expires_after,
        "the session expired {lived:?} after its last renewal, sooner than {:?} (TTL {:?})",
        timing.expires_after,
        timing.ttl
    );
    assert!(!patiently("renew an expired session", || store.renew_session(&session)).await, "an expired session was renewed");
    // No lock delay: another session takes the lock at once, in a higher epoch.
    let other = patiently("create session", || store.create_session("conformance-next", timing.ttl)).await;
    let next = patiently("acquire after expiry", || store.acquire(&key, b"w", &other)).await;
    assert!(next.is_some_and(|epoch| epoch > first), "the lock of an expired session was not free at once ({next:?} after {first})");
    patiently("release", || store.release(&key, &other)).await;
    patiently("destroy", || store.destroy_session(&other)).await;
}
