//! The coordination store in one process: [`KvState`] behind a lock, with blocking lists and
//! session expiry on the process's clock (tokio's, so tests can pause and advance it). For tests
//! and single-node use; it shares nothing between processes.

use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::watch;
use tokio::time::Instant;

use super::state::{KvState, Op, Outcome};
use super::{Cas, CoordinationStore, KvEntry, Listing, Result, SessionId};

pub struct MemoryStore {
    state: Mutex<KvState>,
    /// The store's index after every change, for blocking lists.
    index: watch::Sender<u64>,
    started: Instant,
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore { state: Mutex::new(KvState::default()), index: watch::Sender::new(0), started: Instant::now() }
    }
}

impl MemoryStore {
    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn apply(&self, op: Op) -> Outcome {
        let mut state = self.state.lock();
        let outcome = state.apply(&op, self.now_ms());
        self.index.send_if_modified(|index| std::mem::replace(index, state.index()) != state.index());
        outcome
    }

    fn done(outcome: Outcome) -> bool {
        match outcome {
            Outcome::Done(done) => done,
            other => unreachable!("expected a yes or no, got {other:?}"),
        }
    }
}

impl CoordinationStore for MemoryStore {
    async fn create_session(&self, node: &str, ttl: Duration) -> Result<SessionId> {
        match self.apply(Op::CreateSession { node: node.into(), ttl_ms: ttl.as_millis() as u64 }) {
            Outcome::Session(id) => Ok(id),
            other => unreachable!("expected a session, got {other:?}"),
        }
    }

    async fn renew_session(&self, session: &SessionId) -> Result<bool> {
        Ok(Self::done(self.apply(Op::RenewSession { session: session.clone() })))
    }

    async fn destroy_session(&self, session: &SessionId) -> Result<()> {
        self.apply(Op::DestroySession { session: session.clone() });
        Ok(())
    }

    async fn get(&self, key: &str) -> Result<Option<KvEntry>> {
        self.apply(Op::Tick);
        Ok(self.state.lock().get(key).cloned())
    }

    async fn list(&self, prefix: &str, min_index: u64, wait: Duration) -> Result<Listing> {
        let deadline = Instant::now() + wait;
        let mut changes = self.index.subscribe();
        loop {
            self.apply(Op::Tick);
            let (index, next_expiry_ms) = {
                let state = self.state.lock();
                if min_index == 0 || state.index() > min_index || Instant::now() >= deadline {
                    return Ok(Listing { entries: state.list(prefix), index: state.index() });
                }
                (state.index(), state.next_expiry_ms())
            };
            changes.mark_unchanged();
            if *changes.borrow() != index {
                continue;
            }
            // Wake for a change, for the next session to expire, or at the deadline.
            let expiry = next_expiry_ms.map(|ms| self.started + Duration::from_millis(ms));
            let until = expiry.map_or(deadline, |e| e.min(deadline));
            tokio::select! {
                _ = changes.changed() => {}
                _ = tokio::time::sleep_until(until) => {}
            }
        }
    }

    async fn put(&self, key: &str, value: &[u8], cas: Cas) -> Result<bool> {
        Ok(Self::done(self.apply(Op::Put { key: key.into(), value: value.to_vec(), cas })))
    }

    async fn delete(&self, key: &str, cas: Cas) -> Result<bool> {
        Ok(Self::done(self.apply(Op::Delete { key: key.into(), cas })))
    }

    async fn acquire(&self, key: &str, value: &[u8], session: &SessionId) -> Result<Option<u64>> {
        match self.apply(Op::Acquire { key: key.into(), value: value.to_vec(), session: session.clone() }) {
            Outcome::Acquired(index) => Ok(index),
            other => unreachable!("expected an acquisition, got {other:?}"),
        }
    }

    async fn release(&self, key: &str, session: &SessionId) -> Result<bool> {
        Ok(Self::done(self.apply(Op::Release { key: key.into(), session: session.clone() })))
    }
}
