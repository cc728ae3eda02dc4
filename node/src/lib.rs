//! The Anthill node: a partitioned, durable event log in LMDB, served over gRPC.
//!
//! Data flows top to bottom through these modules:
//! request → [`api`] (gRPC, validation, error mapping) → [`log`] (partitioning, expected-version
//! rules, group commit; the writer is also the processor of commands) → [`storage`] (LMDB
//! environments, key layout, record format). [`app`] holds the domains the processor runs
//! (decide/evolve over LMDB state, command ids, the ledger) and their given-when-then specs.
//! Around them: [`server`] wires a node together and shuts it down cleanly, [`config`] is its
//! typed configuration, [`telemetry`] and [`metrics`] make it observable. The `anthill` command's
//! side: [`cli`] parses it, [`client`] talks to nodes, [`router`] routes requests to partition leaders, [`local`] runs nodes as child processes,
//! [`bench`] loads them and [`demo`] shows one working.

pub mod api;
pub mod app;
pub mod bench;
pub mod chaos;
pub mod cli;
pub mod client;
pub mod config;
pub mod coordination;
pub mod cpu_quota;
pub mod demo;
pub mod fuzzing;
pub mod local;
pub mod log;
pub mod metrics;
pub mod replication;
pub mod router;
pub mod security;
pub mod server;
pub mod sim;
pub mod storage;
pub mod telemetry;
