//! Deterministic simulation (docs/simulation.md): the production protocol code run on one
//! thread with a seeded random source, a simulated clock and network, crashes and faults, every
//! run replayable from its seed and summed up by a trace hash.
//!
//! [`cluster`] runs a whole cluster (the coordination store's Raft group, the ownership
//! algorithm, every partition's replicas, clients); [`replication`] runs one partition's replica
//! set under harsher replication storms, with the store's grants drawn at random. `anthill sim`
//! runs one seed of either, or hunts for failing ones.

pub mod cluster;
mod model;
pub mod replication;

/// How a run went.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Outcome {
    pub seed: u64,
    /// Nodes of the cluster, or replicas of the replica set.
    pub nodes: u64,
    pub partitions: u32,
    /// A hash of every event of the run: the same seed and binary give the same hash.
    pub trace_hash: String,
    /// Simulated milliseconds.
    pub steps: u64,
    /// Writes whose leader saw them committed (each checked to be in the final logs).
    pub acknowledged: usize,
    /// The whole cluster's: the longest a partition took, once every fault healed, to
    /// acknowledge a write again (none when one never did).
    pub recovery_ms: Option<u64>,
    pub stats: Stats,
    pub failure: Option<Failure>,
}

pub use model::Stats;

/// A check that failed, and the last events before it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Failure {
    pub check: String,
    pub recent: Vec<String>,
}

/// The failure of a run that ended with `result` (a failed check panics), with the trace's last
/// events.
fn failure_of(result: std::thread::Result<()>, trace: &model::Trace) -> Option<Failure> {
    let panic = result.err()?;
    let check = panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "a check failed".into());
    Some(Failure { check, recent: trace.recent() })
}

/// A number from the environment (a test's seed count), or `default`.
#[cfg(test)]
pub(crate) fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

/// With each safety rule of the replica switched off in turn (`replica::rules`), the first of
/// `seeds` seeds whose run `fails`: panics naming a rule no seed caught.
#[cfg(test)]
pub(crate) fn find_each_broken_rule(seeds: u64, fails: impl Fn(u64) -> bool) {
    use crate::replication::replica::rules;
    let switches = [
        (rules::FENCING, "fencing"),
        (rules::TRUNCATION, "truncating a divergent suffix"),
        (rules::RECOVERY_MAJORITY, "the majority of recovery"),
        (rules::ADOPT_MOST_ADVANCED, "adopting the most advanced log"),
    ];
    for (rule, name) in switches {
        rules::switch_off(rule);
        let found = (0..seeds).find(|seed| fails(*seed));
        rules::switch_off(0);
        let seed = found.unwrap_or_else(|| panic!("with {name} off, {seeds} seeds found no violation"));
        eprintln!("{name} off: seed {seed} fails");
    }
    assert!(!fails(0), "every rule back on");
}
