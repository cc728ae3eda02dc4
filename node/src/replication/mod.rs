//! Replication of a partition's log across its replica set: the protocol core.
//!
//! This module is sans-IO: [`replica::Replica`] is a state machine fed with leadership grants,
//! messages, proposals, ticks and durability reports, and it answers with effects (persist,
//! truncate, append, send, committed). The node's shell and the deterministic simulator drive
//! the very same code. `docs/replication.md` states the protocol and why no committed entry is
//! ever lost.
//!
//! Where the parts are: the core (`replica.rs`, its simulation `sim/replication.rs`), the node's shell
//! (`manager.rs` over the log, `shell.rs`), the wire form (`wire.rs`, sent by
//! `coordination/transport.rs`); leadership comes from `coordination/member.rs`.

pub mod epochs;
pub mod manager;
pub mod message;
pub mod replica;
pub mod shell;
pub mod wire;

pub use epochs::EpochHistory;

/// Names a node of the cluster.
pub type NodeId = u32;
/// A leader's term for one partition; granted by the coordination store, only ever grows.
pub type Epoch = u64;
/// A position in a partition's log, dense from 1.
pub type Position = u64;

/// One entry of a partition's replicated log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub position: Position,
    /// The epoch of the leader that wrote it.
    pub epoch: Epoch,
    pub kind: EntryKind,
    /// The entry's append goes on at the next position: the entries of one append (or one
    /// command) are written, sent and stored together or not at all (docs/replication.md,
    /// "Atomic appends").
    pub atomic_with_next: bool,
}

/// A replica's state through a position, standing for its log up to there: what a leader sends a
/// replica that needs entries its log no longer holds (docs/replication.md, "State transfer").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The last position the state covers (the end of an append).
    pub position: Position,
    /// The epochs of the log up to `position`.
    pub history: EpochHistory,
    /// The state itself, opaque to the protocol (the shell's encoding).
    pub data: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    /// What the leader's processor wrote (an event record, opaque here).
    Data(Vec<u8>),
    /// Written by a new leader at the start of its epoch: committing it commits every entry
    /// before it.
    Marker,
}
