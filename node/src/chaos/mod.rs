//! The chaos suite (issue 6, docs/chaos.md): real `anthill node` processes under load while a
//! nemesis kills, pauses, partitions and restarts them, then a Jepsen-style check that nothing
//! acknowledged was lost and a report of how long each fault hurt.
//!
//! - [`run`]: one run, start to verdict;
//! - [`workload`]: the clients (raw appends and ledger transfers) and the history they record;
//! - [`nemesis`]: the faults and their schedule;
//! - [`net`]: the run's own network namespace and the cuts that make partitions;
//! - [`history`]: the checker, pure logic;
//! - [`timeline`]: throughput and latency per second, and the picture.

pub mod history;
pub mod nemesis;
pub mod net;
pub mod run;
pub mod timeline;
pub mod workload;
