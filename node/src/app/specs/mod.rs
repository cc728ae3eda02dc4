//! Event-driven specifications: given events, when a command, then events or a rejection, and
//! what queries answer afterwards. Specs are data (YAML files, see `docs/application.md`), run by
//! `anthill specs` and by the test suite.
//!
//! ```yaml
//! domain: ledger
//! specs:
//!   - name: a withdrawal takes money out
//!     given:
//!       - AccountOpened: {account: alice, currency: EUR, credit_limit: 0, opened_at_us: 1}
//!       - Deposited: {account: alice, amount: 100}
//!     when:
//!       Withdraw: {account: alice, amount: 30}
//!     then:
//!       events:
//!         - Withdrawn: {account: alice, amount: 30}
//!       queries:
//!         - query: {Balance: {account: alice}}
//!           result: {account: alice, currency: EUR, balance: 70, held: 0, available: 70, ...}
//! ```
//!
//! A spec runs in a real LMDB write transaction through [`crate::app::processor::execute`], the
//! function the node's processor runs, and the transaction is aborted at the end, so specs never
//! see each other and nothing is written to disk. [`format`] parses files, [`matching`] compares
//! values, [`runner`] runs specs and measures their speed.

pub mod command;
pub mod format;
pub mod matching;
pub mod runner;

use std::path::{Path, PathBuf};

use serde::Serialize;
use thiserror::Error;

/// The specs built into the binary: `node/specs/`, as `(path, text)`.
pub const BUILTIN: &[(&str, &str)] = &[
    ("ledger/accounts.yaml", include_str!("../../../specs/ledger/accounts.yaml")),
    ("ledger/deposits_withdrawals.yaml", include_str!("../../../specs/ledger/deposits_withdrawals.yaml")),
    ("ledger/transfers.yaml", include_str!("../../../specs/ledger/transfers.yaml")),
    ("ledger/holds.yaml", include_str!("../../../specs/ledger/holds.yaml")),
    ("ledger/queries.yaml", include_str!("../../../specs/ledger/queries.yaml")),
    ("ledger/command_ids.yaml", include_str!("../../../specs/ledger/command_ids.yaml")),
];

#[derive(Debug, Error)]
pub enum SpecError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{file}: {message}")]
    Parse { file: String, message: String },
    #[error("{0}: no spec files (*.yaml) found")]
    Empty(PathBuf),
}

/// One spec's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct SpecResult {
    pub file: String,
    pub name: String,
    pub passed: bool,
    /// One line per difference between expected and actual.
    pub differences: Vec<String>,
    /// What the spec expected and what happened, for a failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expected: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actual: Option<serde_json::Value>,
}

/// Reads every `*.yaml` under `path` (a file or a directory, recursively), sorted by path.
pub fn read_files(path: &Path) -> Result<Vec<(String, String)>, SpecError> {
    let mut files = Vec::new();
    collect(path, &mut files)?;
    if files.is_empty() {
        return Err(SpecError::Empty(path.to_path_buf()));
    }
    files.sort();
    files
        .into_iter()
        .map(|file| {
            let text = std::fs::read_to_string(&file).map_err(|source| SpecError::Read { path: file.clone(), source })?;
            Ok((file.display().to_string(), text))
        })
        .collect()
}

fn collect(path: &Path, out: &mut Vec<PathBuf>) -> Result<(), SpecError> {
    let meta = std::fs::metadata(path).map_err(|source| SpecError::Read { path: path.to_path_buf(), source })?;
    if meta.is_file() {
        out.push(path.to_path_buf());
        return Ok(());
    }
    let entries = std::fs::read_dir(path).map_err(|source| SpecError::Read { path: path.to_path_buf(), source })?;
    for entry in entries {
        let entry = entry.map_err(|source| SpecError::Read { path: path.to_path_buf(), source })?;
        let child = entry.path();
        if child.is_dir() {
            collect(&child, out)?;
        } else if child.extension().is_some_and(|ext| ext == "yaml" || ext == "yml") {
            out.push(child);
        }
    }
    Ok(())
}
