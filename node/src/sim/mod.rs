//! Deterministic simulation (docs/simulation.md): the production protocol code run on one
//! thread with a seeded random source, a simulated clock and network, crashes and faults, every
//! run replayable from its seed and summed up by a trace hash.
//!
//! Today it runs the replication protocol of one partition's replica set
//! ([`replication`]); `anthill sim` runs one seed or hunts for failing ones.

mod model;
pub mod replication;
