//! A node's hold on its leaderships, as far as it can tell: when its session with the
//! coordination store was last renewed. A leader cut off from the store (and so, with the
//! embedded store, from a majority of its peers) stops renewing. A TTL after it last sent a
//! renewal that succeeded, the store may have expired its session and another replica may lead
//! its partitions; from then on it takes no new writes: the writer refuses them as `not leader`
//! (`log::Roles::set_lease_until`, checked against the clock by the writer itself), so the
//! routing client asks the cluster again and finds the partition's new leader, instead of
//! waiting on a leader that can no longer commit anything. Its `quorum` appends still waiting
//! for a majority end as unknown. It takes writes again once a renewal succeeds.
//!
//! Beside the lease, each round's view says which epoch the store grants the node for each
//! partition (`Roles::set_granted`, from `member.rs`): a node whose session expired and was made
//! anew renews fine, but its replicas may still lead their old epochs, which the store no longer
//! grants it; the writer refuses those.
//!
//! This is only about availability, never safety: refusing writes is always safe, and a deposed
//! leader's writes are fenced by epochs whatever this does (docs/replication.md). It is the
//! counterpart of Raft's check-quorum, found by the chaos suite's `isolate` fault
//! (docs/chaos.md): without it, a leader cut off from its peers but not from its clients kept
//! their writes waiting for as long as the cut lasted.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::watch;

use super::election::Clock;
use super::transport::until_stopped;
use crate::log::Log;

/// How long a lease renewed when `renewed` (by the elector's clock: when the renewal was sent)
/// still holds at `now`; zero once it lapsed.
pub fn remaining(renewed: Duration, now: Duration, ttl: Duration) -> Duration {
    (renewed + ttl).saturating_sub(now)
}

/// The node's lease (module doc): extended after each round of the ownership algorithm by the
/// time the elector last sent a renewal that succeeded; a watchdog logs when it lapses.
pub struct Lease {
    /// The elector's clock, which the renewal times are on.
    clock: Clock,
    ttl: Duration,
    log: Arc<Log>,
    /// The latest renewal, by `clock`.
    renewed: Mutex<Option<Duration>>,
}

impl Lease {
    pub fn new(log: Arc<Log>, ttl: Duration, clock: Clock) -> Arc<Lease> {
        Arc::new(Lease { clock, ttl, log, renewed: Mutex::new(None) })
    }

    /// The elector's session was last renewed (or made) by a request sent at `renewed`, by the
    /// elector's clock: the lease holds until a TTL after that. A renewal older than the one
    /// seen before changes nothing.
    pub fn renewed(&self, renewed: Duration) {
        let mut latest = self.renewed.lock();
        if latest.is_some_and(|latest| latest >= renewed) {
            return;
        }
        *latest = Some(renewed);
        let left = remaining(renewed, (self.clock)(), self.ttl);
        self.log.roles().set_lease_until(std::time::Instant::now() + left);
    }

    /// Logs, ten times per TTL until `stopped`, when the lease lapses and when it holds again
    /// (the writer checks the lease itself; this only tells).
    pub async fn watch(self: Arc<Self>, mut stopped: watch::Receiver<bool>) {
        let mut ticks = tokio::time::interval(self.ttl / 10);
        let mut was_lapsed = false;
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = until_stopped(&mut stopped) => return,
            }
            let lapsed = self.log.roles().lease_lapsed();
            if lapsed && !was_lapsed && self.log.roles().leads_any() {
                tracing::warn!("the session with the coordination store has not been renewed for a TTL; refusing writes until it is");
            } else if !lapsed && was_lapsed {
                tracing::info!("the session with the coordination store is renewed");
            }
            was_lapsed = lapsed;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_holds_for_a_ttl_after_the_renewal_was_sent() {
        let ttl = Duration::from_secs(1);
        let sent = Duration::from_secs(10);
        assert_eq!(remaining(sent, sent + Duration::from_millis(400), ttl), Duration::from_millis(600));
        assert_eq!(remaining(sent, sent + ttl, ttl), Duration::ZERO);
        assert_eq!(remaining(sent, sent + 3 * ttl, ttl), Duration::ZERO, "a renewal seen late extends nothing");
    }
}
