//! The spec file format and its parsing into typed specs of a domain.
//!
//! A file names its `domain`, optionally a `book` (the scope every spec of the file runs in;
//! `spec` when absent), and holds a list of `specs`, each with:
//! - `name`: what the spec shows, as a sentence;
//! - `given`: events already in the book's stream (applied with `evolve`);
//! - `given_commands`: commands run before `when` (each must be accepted), with an optional
//!   `command_id` — how a spec sets up a retry;
//! - `when`: the command, with optional `command_id` and `now_us` beside it;
//! - `then`: `events` (the events the command produced, in order) or `error` (a rejection: its
//!   code, e.g. `InsufficientFunds`, or the whole rejection `{InsufficientFunds: {...}}`),
//!   optionally `duplicate: true` (the command id was seen: first result, nothing written), and
//!   `queries`, each a `query` with the `result` or `error` it must give afterwards.
//!
//! Unknown fields are errors, so a typo cannot silently weaken a spec.

use serde::Deserialize;
use serde_json::Value as Json;

use super::SpecError;
use crate::app::Domain;

/// The clock of a spec unless it sets `now_us`: 2023-11-14T22:13:20Z.
pub const DEFAULT_NOW_US: u64 = 1_700_000_000_000_000;

/// The scope specs run in unless their file sets `book`.
pub const DEFAULT_SCOPE: &str = "spec";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    domain: String,
    #[serde(default)]
    book: Option<String>,
    specs: Vec<RawSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpec {
    name: String,
    #[serde(default)]
    given: Vec<Json>,
    #[serde(default)]
    given_commands: Vec<RawCommand>,
    when: Json,
    #[serde(default)]
    command_id: Option<String>,
    #[serde(default)]
    now_us: Option<u64>,
    then: RawThen,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCommand {
    command: Json,
    #[serde(default)]
    command_id: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawThen {
    #[serde(default)]
    events: Option<Vec<Json>>,
    #[serde(default)]
    error: Option<Json>,
    #[serde(default)]
    duplicate: bool,
    #[serde(default)]
    queries: Vec<RawQuery>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQuery {
    query: Json,
    #[serde(default)]
    result: Option<Json>,
    #[serde(default)]
    error: Option<Json>,
}

/// What a command or query must give.
#[derive(Debug, Clone)]
pub enum Expect {
    /// Events (for a command) or a result (for a query), compared with placeholders.
    Value(Json),
    /// A rejection: a code, or the whole rejection.
    Error(Json),
}

/// A spec file, parsed: its domain and its specs still as JSON (see [`Spec::parse`]).
pub struct SpecFile {
    pub file: String,
    pub domain: String,
    pub scope: String,
    specs: Vec<RawSpec>,
}

/// One spec, typed for domain `D`.
pub struct Spec<D: Domain> {
    pub file: String,
    pub name: String,
    pub scope: String,
    pub given: Vec<D::Event>,
    /// Commands run before `when`, each with its id.
    pub given_commands: Vec<(D::Command, Option<String>)>,
    pub when: D::Command,
    pub command_id: Option<String>,
    pub now_us: u64,
    pub then: Expect,
    pub duplicate: bool,
    pub queries: Vec<(D::Query, Expect)>,
    /// The spec's expectations as written, for reports.
    pub expected: Json,
}

/// Parses a file's text into its domain and specs.
pub fn parse_file(file: &str, text: &str) -> Result<SpecFile, SpecError> {
    let raw: RawFile = serde_yaml::from_str(text).map_err(|e| SpecError::Parse { file: file.into(), message: e.to_string() })?;
    let scope = raw.book.unwrap_or_else(|| DEFAULT_SCOPE.to_string());
    crate::app::validate_id("book", &scope, crate::app::MAX_SCOPE_BYTES)
        .map_err(|message| SpecError::Parse { file: file.into(), message })?;
    Ok(SpecFile { file: file.into(), domain: raw.domain, scope, specs: raw.specs })
}

impl SpecFile {
    /// The file's specs typed for domain `D`.
    pub fn specs<D: Domain>(&self) -> Result<Vec<Spec<D>>, SpecError> {
        let mut names = std::collections::HashSet::new();
        self.specs
            .iter()
            .enumerate()
            .map(|(i, raw)| {
                let error = |message: String| SpecError::Parse {
                    file: self.file.clone(),
                    message: format!("specs[{i}] {:?}: {message}", raw.name),
                };
                if !names.insert(raw.name.as_str()) {
                    return Err(error("another spec of this file has the same name".into()));
                }
                Spec::parse(&self.file, &self.scope, raw).map_err(error)
            })
            .collect()
    }
}

fn typed<T: serde::de::DeserializeOwned>(what: &str, value: &Json) -> Result<T, String> {
    serde_json::from_value(value.clone()).map_err(|e| format!("{what}: {e} (in {value})"))
}

impl<D: Domain> Spec<D> {
    fn parse(file: &str, scope: &str, raw: &RawSpec) -> Result<Self, String> {
        let given = raw.given.iter().enumerate().map(|(i, e)| typed(&format!("given[{i}]"), e)).collect::<Result<_, _>>()?;
        let given_commands = raw
            .given_commands
            .iter()
            .enumerate()
            .map(|(i, c)| Ok((typed(&format!("given_commands[{i}]"), &c.command)?, c.command_id.clone())))
            .collect::<Result<_, String>>()?;
        let then = match (&raw.then.events, &raw.then.error) {
            (Some(events), None) => Expect::Value(Json::Array(events.clone())),
            (None, Some(error)) => Expect::Error(error.clone()),
            (None, None) if raw.then.duplicate => Expect::Value(Json::Array(Vec::new())),
            _ => return Err("then: needs exactly one of `events` and `error`".into()),
        };
        let queries = raw
            .then
            .queries
            .iter()
            .enumerate()
            .map(|(i, q)| {
                let query = typed(&format!("then.queries[{i}].query"), &q.query)?;
                let expect = match (&q.result, &q.error) {
                    (Some(result), None) => Expect::Value(result.clone()),
                    (None, Some(error)) => Expect::Error(error.clone()),
                    _ => return Err(format!("then.queries[{i}]: needs exactly one of `result` and `error`")),
                };
                Ok((query, expect))
            })
            .collect::<Result<_, String>>()?;
        let mut expected = serde_json::Map::new();
        match &then {
            Expect::Value(events) => expected.insert("events".into(), events.clone()),
            Expect::Error(error) => expected.insert("error".into(), error.clone()),
        };
        if raw.then.duplicate {
            expected.insert("duplicate".into(), Json::Bool(true));
        }
        let queries_as_written: Vec<Json> = raw
            .then
            .queries
            .iter()
            .map(|q| match (&q.result, &q.error) {
                (Some(result), _) => serde_json::json!({"query": q.query, "result": result}),
                (_, error) => serde_json::json!({"query": q.query, "error": error}),
            })
            .collect();
        if !queries_as_written.is_empty() {
            expected.insert("queries".into(), Json::Array(queries_as_written));
        }
        Ok(Spec {
            file: file.into(),
            name: raw.name.clone(),
            scope: scope.into(),
            given,
            given_commands,
            when: typed("when", &raw.when)?,
            command_id: raw.command_id.clone(),
            now_us: raw.now_us.unwrap_or(DEFAULT_NOW_US),
            then,
            duplicate: raw.then.duplicate,
            queries,
            expected: Json::Object(expected),
        })
    }
}
