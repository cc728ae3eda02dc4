//! A node's hold on its leaderships, as far as it can tell: when its session with the
//! coordination store was last renewed. A leader cut off from the store (and so, with the
//! embedded store, from a majority of its peers) stops renewing; once a TTL has passed since its
//! last renewal, the store may have expired its session and another replica may lead its
//! partitions. From then on it takes no new writes: the writer refuses them as `not leader`
//! (`log::Roles::set_lease_lapsed`), so the routing client asks the cluster again and finds the
//! partition's new leader, instead of waiting on a leader that can no longer commit anything.
//! It takes writes again as soon as a round of the ownership algorithm succeeds.
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
use tokio::time::Instant;

use super::transport::until_stopped;
use crate::log::Log;

/// Whether a session last renewed by a round that began at `renewed` may have expired at `now`.
pub fn lapsed(renewed: Instant, now: Instant, ttl: Duration) -> bool {
    now.saturating_duration_since(renewed) >= ttl
}

/// The node's lease (module doc): shared by the elector's loop, which reports each round that
/// succeeded, and the watchdog, which notices when none did for a TTL.
pub struct Lease {
    renewed: Mutex<Instant>,
    ttl: Duration,
    log: Arc<Log>,
}

impl Lease {
    pub fn new(log: Arc<Log>, ttl: Duration) -> Arc<Lease> {
        Arc::new(Lease { renewed: Mutex::new(Instant::now()), ttl, log })
    }

    /// A round of the ownership algorithm that began at `began` succeeded (it renewed or made
    /// the session first): writes are taken again if they were refused.
    pub fn renewed(&self, began: Instant) {
        let mut renewed = self.renewed.lock();
        *renewed = (*renewed).max(began);
        if self.log.roles().lease_lapsed() {
            self.log.roles().set_lease_lapsed(false);
            tracing::info!("the session with the coordination store is renewed; taking writes again");
        }
    }

    /// Checks the lease ten times per TTL until `stopped`, and refuses writes while it lapsed.
    pub async fn watch(self: Arc<Self>, mut stopped: watch::Receiver<bool>) {
        let mut ticks = tokio::time::interval(self.ttl / 10);
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = until_stopped(&mut stopped) => return,
            }
            let renewed = *self.renewed.lock();
            if lapsed(renewed, Instant::now(), self.ttl) && !self.log.roles().lease_lapsed() {
                self.log.roles().set_lease_lapsed(true);
                let since_ms = renewed.elapsed().as_millis() as u64;
                if self.log.roles().leads_any() {
                    tracing::warn!(
                        since_ms,
                        "the session with the coordination store has not been renewed for a TTL; refusing writes until it is"
                    );
                } else {
                    // A node starting, or following only: nothing to refuse yet.
                    tracing::debug!(since_ms, "the session with the coordination store has not been renewed for a TTL");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_lapses_a_ttl_after_the_round_that_last_renewed_it_began() {
        let began = Instant::now();
        let ttl = Duration::from_secs(1);
        assert!(!lapsed(began, began + Duration::from_millis(999), ttl));
        assert!(lapsed(began, began + ttl, ttl));
        // A clock that went back (or a round that began after `now`) is no lapse.
        assert!(!lapsed(began + ttl, began, ttl));
    }
}
