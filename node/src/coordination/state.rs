//! The coordination store's data and rules as a deterministic state machine: operations in,
//! results out, time given by the caller. [`super::memory::MemoryStore`] runs it in one process;
//! the embedded store will run it on every node as the state machine of a Raft log, so the same
//! operations give the same results everywhere.
//!
//! Rules (Consul's):
//! - every change bumps the store's index; a key remembers the index that created it and the
//!   one that last changed it;
//! - a session expires once `now` passes its last renewal plus its TTL; expiring (or destroying)
//!   it releases every lock it holds — the keys stay, with no session;
//! - acquiring a free lock (or one the session already holds) sets the value; a lock taken by a
//!   *new* holder bumps the key's lock index, the epoch of whatever the lock guards;
//! - an operation on an expired session fails as if the session never existed.
//!
//! Unlike Consul, there is no lock delay after a session expires: the epochs fence a former
//! holder (docs/replication.md), so a new holder may take over at once.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{Cas, KvEntry, SessionId};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    CreateSession {
        node: String,
        ttl_ms: u64,
    },
    RenewSession {
        session: SessionId,
    },
    DestroySession {
        session: SessionId,
    },
    Put {
        key: String,
        value: Vec<u8>,
        cas: Cas,
    },
    Delete {
        key: String,
        cas: Cas,
    },
    Acquire {
        key: String,
        value: Vec<u8>,
        session: SessionId,
    },
    Release {
        key: String,
        session: SessionId,
    },
    /// Only expires sessions whose time is up.
    Tick,
    /// A new leader of the store's Raft group took over: every session gets a full TTL from now,
    /// since nobody could renew while the group had no leader (Consul does the same).
    RenewAll,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Session(SessionId),
    Done(bool),
    /// The lock index when the lock was taken.
    Acquired(Option<u64>),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Session {
    node: String,
    ttl_ms: u64,
    expires_at_ms: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvState {
    index: u64,
    /// The latest time any operation was applied at: time never runs backwards here, even when
    /// operations stamped by different nodes' clocks arrive out of order.
    clock_ms: u64,
    sessions_created: u64,
    sessions: BTreeMap<SessionId, Session>,
    kv: BTreeMap<String, KvEntry>,
}

impl KvState {
    /// The store's index: bumped by every change.
    pub fn index(&self) -> u64 {
        self.index
    }

    pub fn get(&self, key: &str) -> Option<&KvEntry> {
        self.kv.get(key)
    }

    pub fn list(&self, prefix: &str) -> Vec<KvEntry> {
        self.kv.range(prefix.to_string()..).take_while(|(k, _)| k.starts_with(prefix)).map(|(_, e)| e.clone()).collect()
    }

    /// When the next session expires, if any.
    pub fn next_expiry_ms(&self) -> Option<u64> {
        self.sessions.values().map(|s| s.expires_at_ms).min()
    }

    pub fn session_node(&self, session: &SessionId) -> Option<&str> {
        self.sessions.get(session).map(|s| s.node.as_str())
    }

    /// Expires what is due at `now_ms` (or the latest time seen, if later), then applies `op`.
    pub fn apply(&mut self, op: &Op, now_ms: u64) -> Outcome {
        self.clock_ms = self.clock_ms.max(now_ms);
        let now_ms = self.clock_ms;
        // `RenewAll` saves what the leaderless time would have expired, so it expires nothing.
        if *op != Op::RenewAll {
            self.expire(now_ms);
        }
        match op {
            Op::CreateSession { node, ttl_ms } => {
                self.sessions_created += 1;
                self.index += 1;
                let id = SessionId(format!("{node}-{}-{}", self.sessions_created, self.index));
                self.sessions
                    .insert(id.clone(), Session { node: node.clone(), ttl_ms: *ttl_ms, expires_at_ms: now_ms.saturating_add(*ttl_ms) });
                Outcome::Session(id)
            }
            Op::RenewSession { session } => match self.sessions.get_mut(session) {
                Some(s) => {
                    s.expires_at_ms = now_ms.saturating_add(s.ttl_ms);
                    Outcome::Done(true)
                }
                None => Outcome::Done(false),
            },
            Op::DestroySession { session } => Outcome::Done(self.end_session(session)),
            Op::Put { key, value, cas } => {
                if !self.cas_holds(key, *cas) {
                    return Outcome::Done(false);
                }
                self.index += 1;
                let index = self.index;
                let entry = self.kv.entry(key.clone()).or_insert_with(|| KvEntry {
                    key: key.clone(),
                    value: Vec::new(),
                    create_index: index,
                    modify_index: index,
                    lock_index: 0,
                    session: None,
                });
                entry.value = value.clone();
                entry.modify_index = index;
                Outcome::Done(true)
            }
            Op::Delete { key, cas } => {
                if !self.kv.contains_key(key) || !self.cas_holds(key, *cas) {
                    return Outcome::Done(false);
                }
                self.index += 1;
                self.kv.remove(key);
                Outcome::Done(true)
            }
            Op::Acquire { key, value, session } => {
                if !self.sessions.contains_key(session) {
                    return Outcome::Acquired(None);
                }
                let held_by_other = self.kv.get(key).and_then(|e| e.session.as_ref()).is_some_and(|holder| holder != session);
                if held_by_other {
                    return Outcome::Acquired(None);
                }
                self.index += 1;
                let index = self.index;
                let entry = self.kv.entry(key.clone()).or_insert_with(|| KvEntry {
                    key: key.clone(),
                    value: Vec::new(),
                    create_index: index,
                    modify_index: index,
                    lock_index: 0,
                    session: None,
                });
                if entry.session.as_ref() != Some(session) {
                    entry.lock_index += 1;
                    entry.session = Some(session.clone());
                }
                entry.value = value.clone();
                entry.modify_index = index;
                Outcome::Acquired(Some(entry.lock_index))
            }
            Op::Release { key, session } => {
                let holds = self.kv.get(key).is_some_and(|e| e.session.as_ref() == Some(session));
                if holds {
                    self.index += 1;
                    let entry = self.kv.get_mut(key).expect("checked above");
                    entry.session = None;
                    entry.modify_index = self.index;
                }
                Outcome::Done(holds)
            }
            Op::Tick => Outcome::Done(true),
            Op::RenewAll => {
                // Half a TTL from the new leader's time: enough for a live owner (it renews every
                // third of a TTL) to get a renewal through, while a session whose owner died with
                // the old leader still ends near its own TTL instead of a whole TTL after the
                // election (the slow failovers in docs/benchmarks.md, 2026-12-01).
                for s in self.sessions.values_mut() {
                    s.expires_at_ms = s.expires_at_ms.max(now_ms.saturating_add(s.ttl_ms / 2));
                }
                Outcome::Done(true)
            }
        }
    }

    fn cas_holds(&self, key: &str, cas: Cas) -> bool {
        match cas {
            Cas::Any => true,
            Cas::Absent => !self.kv.contains_key(key),
            Cas::ModifyIndex(index) => self.kv.get(key).is_some_and(|e| e.modify_index == index),
        }
    }

    fn expire(&mut self, now_ms: u64) {
        let due: Vec<SessionId> = self.sessions.iter().filter(|(_, s)| s.expires_at_ms <= now_ms).map(|(id, _)| id.clone()).collect();
        for session in due {
            self.end_session(&session);
        }
    }

    /// Removes a session and releases its locks; false if it did not exist.
    fn end_session(&mut self, session: &SessionId) -> bool {
        if self.sessions.remove(session).is_none() {
            return false;
        }
        self.index += 1;
        let index = self.index;
        for entry in self.kv.values_mut().filter(|e| e.session.as_ref() == Some(session)) {
            entry.session = None;
            entry.modify_index = index;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(state: &mut KvState, node: &str, ttl_ms: u64, now: u64) -> SessionId {
        match state.apply(&Op::CreateSession { node: node.into(), ttl_ms }, now) {
            Outcome::Session(id) => id,
            other => panic!("{other:?}"),
        }
    }

    fn acquire(state: &mut KvState, key: &str, s: &SessionId, now: u64) -> Option<u64> {
        match state.apply(&Op::Acquire { key: key.into(), value: b"v".to_vec(), session: s.clone() }, now) {
            Outcome::Acquired(index) => index,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn given_a_held_lock_then_another_session_cannot_take_it_and_a_new_holder_bumps_the_lock_index() {
        let mut st = KvState::default();
        let (a, b) = (session(&mut st, "a", 1_000, 0), session(&mut st, "b", 1_000, 0));
        assert_eq!(acquire(&mut st, "p/1", &a, 1), Some(1));
        assert_eq!(acquire(&mut st, "p/1", &a, 2), Some(1), "re-acquiring by the holder keeps the index");
        assert_eq!(acquire(&mut st, "p/1", &b, 3), None);
        assert_eq!(st.apply(&Op::Release { key: "p/1".into(), session: a.clone() }, 4), Outcome::Done(true));
        assert_eq!(acquire(&mut st, "p/1", &b, 5), Some(2));
    }

    #[test]
    fn given_a_session_not_renewed_when_its_ttl_passes_then_its_locks_are_released_and_it_is_gone() {
        let mut st = KvState::default();
        let (a, b) = (session(&mut st, "a", 100, 0), session(&mut st, "b", 1_000, 0));
        assert_eq!(acquire(&mut st, "p/1", &a, 10), Some(1));
        assert_eq!(st.apply(&Op::RenewSession { session: a.clone() }, 90), Outcome::Done(true));
        assert_eq!(acquire(&mut st, "p/1", &b, 150), None, "renewed at 90, so held until 190");
        assert_eq!(acquire(&mut st, "p/1", &b, 190), Some(2));
        assert_eq!(st.get("p/1").unwrap().session, Some(b));
        assert_eq!(st.apply(&Op::RenewSession { session: a.clone() }, 191), Outcome::Done(false));
        assert_eq!(acquire(&mut st, "p/2", &a, 192), None, "an expired session acquires nothing");
    }

    #[test]
    fn given_a_leader_change_then_every_session_lives_at_least_half_a_ttl_from_then() {
        let mut st = KvState::default();
        let a = session(&mut st, "a", 100, 0);
        let b = session(&mut st, "b", 100, 0);
        assert_eq!(st.apply(&Op::RenewSession { session: b.clone() }, 45), Outcome::Done(true), "b: until 145");
        // The group had no leader from 50 to 90: nobody could renew. a, due at 100, gets until 140.
        assert_eq!(st.apply(&Op::RenewAll, 90), Outcome::Done(true));
        assert_eq!(st.apply(&Op::RenewSession { session: a.clone() }, 139), Outcome::Done(true), "a: until 239");
        // b keeps its own later expiry rather than a full TTL from the election (that would be 190).
        assert_eq!(st.apply(&Op::Tick, 146), Outcome::Done(true));
        assert_eq!(st.apply(&Op::RenewSession { session: b }, 146), Outcome::Done(false), "b ended at 145");
        assert_eq!(st.apply(&Op::Tick, 240), Outcome::Done(true));
        assert_eq!(st.apply(&Op::RenewSession { session: a }, 240), Outcome::Done(false), "renewed at 139, gone at 239");
    }

    #[test]
    fn given_cas_conditions_then_puts_and_deletes_happen_only_when_they_hold() {
        let mut st = KvState::default();
        assert_eq!(st.apply(&Op::Put { key: "k".into(), value: b"1".to_vec(), cas: Cas::Absent }, 0), Outcome::Done(true));
        assert_eq!(st.apply(&Op::Put { key: "k".into(), value: b"2".to_vec(), cas: Cas::Absent }, 0), Outcome::Done(false));
        let index = st.get("k").unwrap().modify_index;
        assert_eq!(st.apply(&Op::Put { key: "k".into(), value: b"2".to_vec(), cas: Cas::ModifyIndex(index + 1) }, 0), Outcome::Done(false));
        assert_eq!(st.apply(&Op::Put { key: "k".into(), value: b"2".to_vec(), cas: Cas::ModifyIndex(index) }, 0), Outcome::Done(true));
        assert_eq!(st.get("k").unwrap().value, b"2");
        assert_eq!(st.apply(&Op::Delete { key: "k".into(), cas: Cas::ModifyIndex(index) }, 0), Outcome::Done(false));
        assert_eq!(st.apply(&Op::Delete { key: "k".into(), cas: Cas::Any }, 0), Outcome::Done(true));
        assert!(st.get("k").is_none());
    }

    #[test]
    fn every_change_bumps_the_index_and_lists_see_a_prefix_only() {
        let mut st = KvState::default();
        let before = st.index();
        st.apply(&Op::Put { key: "a/1".into(), value: vec![], cas: Cas::Any }, 0);
        st.apply(&Op::Put { key: "a/2".into(), value: vec![], cas: Cas::Any }, 0);
        st.apply(&Op::Put { key: "b/1".into(), value: vec![], cas: Cas::Any }, 0);
        assert_eq!(st.index(), before + 3);
        let keys: Vec<String> = st.list("a/").into_iter().map(|e| e.key).collect();
        assert_eq!(keys, ["a/1", "a/2"]);
    }
}
