//! The Anthill node: a partitioned, durable event log in LMDB, served over gRPC.
//!
//! Data flows top to bottom through these modules:
//! request → [`api`] (gRPC, validation, error mapping) → [`log`] (partitioning, expected-version
//! rules, group commit) → [`storage`] (LMDB environment, key layout, record format).
//! Around them: [`server`] wires a node together and shuts it down cleanly, [`config`] is its
//! typed configuration, [`telemetry`] and [`metrics`] make it observable, [`client`], [`bench`]
//! and [`cli`] are the `anthill` command's client side.

pub mod config;
pub mod log;
pub mod metrics;
pub mod storage;
