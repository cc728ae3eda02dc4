//! Partition ownership: who is in each partition's replica set and who leads it, decided through
//! a coordination store.
//!
//! One algorithm ([`election`]) runs against a small [`CoordinationStore`] interface shaped like
//! Consul's primitives:
//! - **sessions** with a TTL that expire when their owner stops renewing them;
//! - a **key/value space** with compare-and-set on a key's modify index;
//! - **locks** acquired by a session; each new holder bumps the key's lock index, which is the
//!   partition's **epoch** (the fencing token of docs/replication.md);
//! - **blocking lists** of a prefix that return once the store's index passes a given one.
//!
//! Implementations: [`memory::MemoryStore`] (one process: tests and single-node use; it runs
//! [`state::KvState`], the state machine the embedded store replicates), the embedded Raft store
//! ([`driver::EmbeddedStore`], the default of a cluster) and Consul ([`consul::ConsulStore`]);
//! `cluster.coordination` chooses ([`member`]). [`placement`] derives replica sets from the live
//! members.

pub mod conformance;
pub mod consul;
pub mod driver;
pub mod election;
pub mod embedded;
pub mod lease;
pub mod member;
pub mod memory;
pub mod placement;
pub mod raft_log;
pub mod state;
pub mod transport;

use std::future::Future;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// A session's id, as the store made it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SessionId(pub String);

impl std::fmt::Display for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// One key of the store, with Consul's indexes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvEntry {
    pub key: String,
    pub value: Vec<u8>,
    pub create_index: u64,
    pub modify_index: u64,
    /// How many times a session acquired this key.
    pub lock_index: u64,
    /// The session holding the key's lock, if any.
    pub session: Option<SessionId>,
}

/// The condition of a compare-and-set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Cas {
    /// No condition.
    Any,
    /// The key must not exist.
    Absent,
    /// The key's modify index must be exactly this.
    ModifyIndex(u64),
}

/// A prefix's keys and the store's index they are as of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    pub entries: Vec<KvEntry>,
    pub index: u64,
}

#[derive(Debug, Error)]
pub enum CoordinationError {
    #[error("coordination store unavailable: {0}")]
    Unavailable(String),
    #[error("session {0} does not exist (it expired or was destroyed)")]
    NoSession(SessionId),
    #[error("coordination store: {0}")]
    Other(String),
}

pub type Result<T> = std::result::Result<T, CoordinationError>;

/// What ownership needs from a coordination store. Every call may fail with `Unavailable`; the
/// caller retries with backoff.
pub trait CoordinationStore: Send + Sync + 'static {
    /// A session of `node` that expires `ttl` after its last renewal; its locks are then released.
    fn create_session(&self, node: &str, ttl: Duration) -> impl Future<Output = Result<SessionId>> + Send;
    /// Renews the session; `false` when it no longer exists.
    fn renew_session(&self, session: &SessionId) -> impl Future<Output = Result<bool>> + Send;
    /// Destroys the session, releasing its locks.
    fn destroy_session(&self, session: &SessionId) -> impl Future<Output = Result<()>> + Send;
    fn get(&self, key: &str) -> impl Future<Output = Result<Option<KvEntry>>> + Send;
    /// The keys under `prefix`. With `min_index > 0`, waits (at most `wait`) until the store's
    /// index passes `min_index`; it may also return earlier with nothing changed.
    fn list(&self, prefix: &str, min_index: u64, wait: Duration) -> impl Future<Output = Result<Listing>> + Send;
    /// Writes `value` under `key` if `cas` holds; `false` when it does not.
    fn put(&self, key: &str, value: &[u8], cas: Cas) -> impl Future<Output = Result<bool>> + Send;
    /// Deletes `key` if `cas` holds; `false` when it does not.
    fn delete(&self, key: &str, cas: Cas) -> impl Future<Output = Result<bool>> + Send;
    /// Takes the lock of `key` for `session` and writes `value`: the key's new lock index when
    /// taken (or already held by `session`), `None` when another session holds it.
    fn acquire(&self, key: &str, value: &[u8], session: &SessionId) -> impl Future<Output = Result<Option<u64>>> + Send;
    /// Releases the lock of `key` if `session` holds it.
    fn release(&self, key: &str, session: &SessionId) -> impl Future<Output = Result<bool>> + Send;
}
