//! Runs specs in a sandbox LMDB environment, and measures how many run per second.
//!
//! Each spec runs in one write transaction of a [`Sandbox`] that is aborted at the end: the given
//! events are evolved into state, the given commands and the `when` command go through
//! [`execute`] (command ids included), the queries read the same transaction, and nothing is
//! ever committed. A sandbox belongs to one thread; the perf mode runs one per thread.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use heed::types::Bytes;
use heed::{Database, Env, EnvFlags, EnvOpenOptions, RwTxn, WithoutTls};
use serde::Serialize;
use serde_json::Value as Json;

use super::format::{Expect, Spec, SpecFile, parse_file};
use super::matching::{Bindings, compare};
use super::{SpecError, SpecResult};
use crate::app::commands::CommandRecord;
use crate::app::ledger::Ledger;
use crate::app::processor::{Executed, Failure, Rejected, execute};
use crate::app::{Context, Domain, Refusal, Rejection, State, StateView, state};

/// An LMDB environment specs run in, never committed to after its creation.
pub struct Sandbox {
    env: Env<WithoutTls>,
    db: Database<Bytes, Bytes>,
    _dir: tempfile::TempDir,
}

impl Sandbox {
    pub fn new() -> Result<Self, heed::Error> {
        let dir = tempfile::Builder::new().prefix("anthill-specs-").tempdir().map_err(heed::Error::Io)?;
        // SAFETY: a fresh private directory, opened once. Nothing is committed after the
        // database is created, so durability flags do not matter.
        let env = unsafe {
            let mut options = EnvOpenOptions::new().read_txn_without_tls();
            options.flags(EnvFlags::NO_SYNC | EnvFlags::NO_META_SYNC);
            options.map_size(256 << 20).max_dbs(1).open(dir.path())?
        };
        let mut txn = env.write_txn()?;
        let db = env.create_database(&mut txn, Some("state"))?;
        txn.commit()?;
        Ok(Sandbox { env, db, _dir: dir })
    }

    /// Runs `work` in a write transaction of the sandbox that is aborted afterwards.
    pub fn scratch<R>(&self, work: impl FnOnce(&mut RwTxn<'_>, Database<Bytes, Bytes>) -> R) -> Result<R, heed::Error> {
        let mut txn = self.env.write_txn()?;
        let out = work(&mut txn, self.db);
        txn.abort();
        Ok(out)
    }

    /// Evolves `events` into an empty state of `scope` and runs `read` on the result: what a
    /// follower, or a rebuild from the log, would hold.
    pub fn replay<D: Domain, R>(
        &self,
        scope: &str,
        events: &[D::Event],
        read: impl FnOnce(&StateView<'_>) -> R,
    ) -> Result<R, crate::app::StateError> {
        self.scratch(|txn, db| {
            let prefix = state::subspace(D::NAME, scope);
            let mut state = State::new(txn, db, &prefix);
            for event in events {
                D::evolve(&mut state, event)?;
            }
            Ok(read(&state.view()))
        })?
    }
}

/// A spec of some domain.
pub trait Runnable: Send + Sync {
    fn run(&self, sandbox: &Sandbox) -> SpecResult;
}

/// Typed specs of every file, in file order. A file of an unknown domain is an error.
pub fn load(files: &[(String, String)]) -> Result<Vec<Box<dyn Runnable>>, SpecError> {
    let mut specs: Vec<Box<dyn Runnable>> = Vec::new();
    for (file, text) in files {
        let parsed: SpecFile = parse_file(file, text)?;
        match parsed.domain.as_str() {
            Ledger::NAME => specs.extend(parsed.specs::<Ledger>()?.into_iter().map(|s| Box::new(s) as Box<dyn Runnable>)),
            other => {
                return Err(SpecError::Parse {
                    file: file.clone(),
                    message: format!("domain {other:?} is not one this node runs ({})", crate::app::DOMAINS.join(", ")),
                });
            }
        }
    }
    Ok(specs)
}

/// What a command did, as a spec sees it.
enum Outcome<D: Domain> {
    Accepted(Vec<D::Event>),
    Duplicate,
    Rejected(D::Error),
    /// Its id was used before for another command.
    IdReused(Rejected),
}

/// Runs commands of one spec, counting the stream's version as the log would.
struct Session<'s, D: Domain> {
    spec: &'s Spec<D>,
    db: Database<Bytes, Bytes>,
    stream: String,
    version: u64,
    commands: u64,
}

impl<D: Domain> Session<'_, D> {
    fn command(&mut self, txn: &mut RwTxn<'_>, command: &D::Command, command_id: Option<&str>) -> Result<Outcome<D>, String> {
        self.commands += 1;
        let generated = format!("spec-command-{}", self.commands);
        let ctx = Context {
            now_us: self.spec.now_us,
            command_id: command_id.unwrap_or(&generated),
            remember_id: command_id.is_some(),
            ids_since_us: 0,
        };
        let version = &mut self.version;
        let place = |_: &mut RwTxn<'_>, events: &[D::Event], _hash: u64| {
            let first = *version + 1;
            *version += events.len() as u64;
            Ok(CommandRecord {
                partition: 0,
                first_position: if events.is_empty() { 0 } else { first },
                last_position: *version,
                stream_version: *version,
                events: events.len() as u32,
                recorded_at_us: ctx.now_us,
                command_hash: 0,
            })
        };
        match execute::<D>(txn, self.db, &self.stream, &self.spec.scope, command, &ctx, None, None, place) {
            Ok(Ok(Executed::Accepted { events, .. })) => Ok(Outcome::Accepted(events)),
            Ok(Ok(Executed::Duplicate(_))) => Ok(Outcome::Duplicate),
            Ok(Err(Failure::Rejected(e))) => Ok(Outcome::Rejected(e)),
            Ok(Err(Failure::IdReused)) => Ok(Outcome::IdReused(Rejected::id_reused(ctx.command_id))),
            Ok(Err(Failure::Unreadable(e))) | Err(e) => Err(format!("state failed: {e}")),
        }
    }
}

fn to_json<T: Serialize>(value: &T) -> Json {
    serde_json::to_value(value).unwrap_or_else(|e| Json::String(format!("<cannot encode: {e}>")))
}

/// Compares a rejection with an expected code (a string) or a whole expected rejection.
fn compare_error<E: Rejection>(expected: &Json, error: &E, path: &str, bindings: &mut Bindings, diffs: &mut Vec<String>) {
    match expected {
        Json::String(code) => {
            if code != error.code() {
                diffs.push(format!("{path}: expected {code}, got {} ({error})", error.code()));
            }
        }
        whole => compare(whole, &to_json(error), path, bindings, diffs),
    }
}

impl<D: Domain> Spec<D> {
    /// Runs the spec in `txn`; returns the actual outcome and the differences.
    fn run_in(&self, txn: &mut RwTxn<'_>, db: Database<Bytes, Bytes>) -> (Json, Vec<String>) {
        let mut diffs = Vec::new();
        let mut actual = serde_json::Map::new();
        let prefix = state::subspace(D::NAME, &self.scope);
        {
            let mut state = State::new(txn, db, &prefix);
            for (i, event) in self.given.iter().enumerate() {
                if let Err(e) = D::evolve(&mut state, event) {
                    diffs.push(format!("given[{i}]: does not apply to the state of the events before it: {e}"));
                    return (Json::Object(actual), diffs);
                }
            }
        }
        let mut session =
            Session { spec: self, db, stream: crate::app::stream_of(D::NAME, &self.scope), version: self.given.len() as u64, commands: 0 };
        for (i, (command, id)) in self.given_commands.iter().enumerate() {
            match session.command(txn, command, id.as_deref()) {
                Ok(Outcome::Rejected(e)) => diffs.push(format!("given_commands[{i}]: must be accepted, was rejected: {} ({e})", e.code())),
                Ok(Outcome::IdReused(r)) => diffs.push(format!("given_commands[{i}]: must be accepted, was rejected: {}", r.message)),
                Err(e) => diffs.push(format!("given_commands[{i}]: {e}")),
                Ok(_) => {}
            }
        }
        if !diffs.is_empty() {
            return (Json::Object(actual), diffs);
        }
        let mut bindings = Bindings::new();
        match (session.command(txn, &self.when, self.command_id.as_deref()), &self.then) {
            (Err(e), _) => diffs.push(format!("when: {e}")),
            (Ok(Outcome::Accepted(events)), expect) => {
                let events = Json::Array(events.iter().map(to_json).collect());
                match expect {
                    Expect::Value(expected) => compare(expected, &events, "then.events", &mut bindings, &mut diffs),
                    Expect::Error(expected) => diffs.push(format!("then.error: expected {expected}, but the command was accepted")),
                }
                actual.insert("events".into(), events);
            }
            (Ok(Outcome::Duplicate), expect) => {
                actual.insert("events".into(), Json::Array(Vec::new()));
                actual.insert("duplicate".into(), Json::Bool(true));
                match expect {
                    Expect::Value(expected) => compare(expected, &Json::Array(Vec::new()), "then.events", &mut bindings, &mut diffs),
                    Expect::Error(expected) => diffs.push(format!("then.error: expected {expected}, but the command was a duplicate")),
                }
            }
            (Ok(Outcome::IdReused(rejected)), expect) => {
                match expect {
                    Expect::Error(Json::String(code)) if code == rejected.code => {}
                    Expect::Error(Json::String(code)) => {
                        diffs.push(format!("then.error: expected {code}, got {} ({})", rejected.code, rejected.message))
                    }
                    Expect::Error(whole) => compare(whole, &rejected.detail, "then.error", &mut bindings, &mut diffs),
                    Expect::Value(_) => {
                        diffs.push(format!("then.events: expected events, but the command was rejected: {}", rejected.message))
                    }
                }
                actual.insert("error".into(), rejected.detail);
            }
            (Ok(Outcome::Rejected(error)), expect) => {
                match expect {
                    Expect::Error(expected) => compare_error(expected, &error, "then.error", &mut bindings, &mut diffs),
                    Expect::Value(_) => {
                        diffs.push(format!("then.events: expected events, but the command was rejected: {} ({error})", error.code()))
                    }
                }
                actual.insert("error".into(), to_json(&error));
            }
        }
        let duplicate = actual.contains_key("duplicate");
        if self.duplicate != duplicate {
            diffs.push(format!("then.duplicate: expected {}, got {duplicate}", self.duplicate));
        }
        let view = StateView::new(txn, db, &prefix);
        let mut answers = Vec::new();
        for (i, (query, expect)) in self.queries.iter().enumerate() {
            let path = format!("then.queries[{i}]");
            let answer = match D::query(&view, query) {
                Ok(result) => {
                    match expect {
                        Expect::Value(expected) => compare(expected, &result, &format!("{path}.result"), &mut bindings, &mut diffs),
                        Expect::Error(expected) => {
                            diffs.push(format!("{path}.error: expected {expected}, but the query answered {result}"))
                        }
                    }
                    serde_json::json!({"result": result})
                }
                Err(Refusal::Rejected(error)) => {
                    match expect {
                        Expect::Error(expected) => compare_error(expected, &error, &format!("{path}.error"), &mut bindings, &mut diffs),
                        Expect::Value(_) => diffs.push(format!("{path}.result: expected a result, but the query was rejected: {error}")),
                    }
                    serde_json::json!({"error": to_json(&error)})
                }
                Err(Refusal::State(e)) => {
                    diffs.push(format!("{path}: state failed: {e}"));
                    Json::Null
                }
            };
            answers.push(answer);
        }
        if !answers.is_empty() {
            actual.insert("queries".into(), Json::Array(answers));
        }
        (Json::Object(actual), diffs)
    }
}

impl<D: Domain> Runnable for Spec<D> {
    fn run(&self, sandbox: &Sandbox) -> SpecResult {
        let outcome = sandbox.env.write_txn().map(|mut txn| {
            let outcome = self.run_in(&mut txn, sandbox.db);
            txn.abort();
            outcome
        });
        let (actual, differences) = outcome.unwrap_or_else(|e| (Json::Null, vec![format!("cannot start a transaction: {e}")]));
        let passed = differences.is_empty();
        SpecResult {
            file: self.file.clone(),
            name: self.name.clone(),
            passed,
            differences,
            expected: (!passed).then(|| self.expected.clone()),
            actual: (!passed).then_some(actual),
        }
    }
}

/// Runs every spec once, in order.
pub fn run_all(specs: &[Box<dyn Runnable>]) -> Result<Vec<SpecResult>, heed::Error> {
    let sandbox = Sandbox::new()?;
    Ok(specs.iter().map(|spec| spec.run(&sandbox)).collect())
}

/// What `anthill specs --perf` measured.
#[derive(Debug, Clone, Serialize)]
pub struct PerfReport {
    pub specs_in_suite: usize,
    pub threads: usize,
    pub seconds: f64,
    pub specs_run: u64,
    pub specs_per_second: f64,
    /// Runs that failed (any failure makes the measurement suspect).
    pub failures: u64,
}

/// Runs the whole suite over and over on `threads` threads (a sandbox each) for `duration`;
/// `progress` is called about once a second with the runs so far.
pub fn measure(
    specs: &[Box<dyn Runnable>],
    threads: usize,
    duration: Duration,
    progress: &(dyn Fn(u64, Duration) + Sync),
) -> Result<PerfReport, heed::Error> {
    assert!(threads > 0 && !specs.is_empty());
    let (runs, failures, stop) = (AtomicU64::new(0), AtomicU64::new(0), AtomicBool::new(false));
    let started = Instant::now();
    let sandboxes = (0..threads).map(|_| Sandbox::new()).collect::<Result<Vec<_>, _>>()?;
    std::thread::scope(|scope| {
        for sandbox in &sandboxes {
            let (runs, failures, stop) = (&runs, &failures, &stop);
            scope.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    for spec in specs {
                        if !spec.run(sandbox).passed {
                            failures.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    runs.fetch_add(specs.len() as u64, Ordering::Relaxed);
                }
            });
        }
        while started.elapsed() < duration {
            std::thread::sleep((duration - started.elapsed()).min(Duration::from_secs(1)));
            progress(runs.load(Ordering::Relaxed), started.elapsed());
        }
        stop.store(true, Ordering::Relaxed);
    });
    let seconds = started.elapsed().as_secs_f64();
    let specs_run = runs.load(Ordering::Relaxed);
    Ok(PerfReport {
        specs_in_suite: specs.len(),
        threads,
        seconds,
        specs_run,
        specs_per_second: specs_run as f64 / seconds,
        failures: failures.load(Ordering::Relaxed),
    })
}
