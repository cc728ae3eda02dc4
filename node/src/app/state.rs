//! Domain state in LMDB: a domain's view of its subspace of the log environment's `state`
//! database.
//!
//! Every key a domain writes is the tuple `(domain, scope, ...)` packed with the order-preserving
//! encoding of [`crate::storage::keys`] (the FoundationDB "layers" approach): the domain names
//! only the elements after the scope, so two domains, or two scopes (ledger books) of one domain,
//! can never touch each other's keys, and a query over, say, every account of a book is one
//! key-range scan. Values are JSON (readable in a dump, and `serde(default)` lets a record gain
//! fields without a format change), sealed with the book's tenant's data key when encryption at
//! rest is on ([`State::sealed`], [`StateView::sealed`]; keys stay in clear).
//!
//! [`StateView`] reads (decide and queries); [`State`] also writes (evolve). Both work on an
//! LMDB transaction the caller owns: the log's writer gives its group-commit transaction, so a
//! command's state changes commit in the same transaction as its events, or not at all. Or on an
//! ordered map in memory ([`MemoryState`]): the deterministic simulation runs the domains' own
//! code that way (docs/simulation.md), with the same keys and values.
//! Must not: keep a transaction, or write outside its subspace.

use heed::types::Bytes;
use heed::{Database, RoTxn, RwTxn, WithoutTls};
use serde::Serialize;
use serde::de::DeserializeOwned;
use thiserror::Error;

use crate::security::keys::{DataKey, SEALED_VALUE};
use crate::storage::Journal;
use crate::storage::keys::{Elem, Value, pack, pack_into, unpack};

/// A failure to read or write state. Not a domain rejection: the command (or the whole group
/// commit) fails and nothing of it is stored.
#[derive(Debug, Error)]
pub enum StateError {
    #[error("LMDB: {0}")]
    Lmdb(#[from] heed::Error),
    #[error("state key {key}: undecodable value: {reason}")]
    Undecodable { key: String, reason: String },
    #[error("state does not match the events: {0}")]
    Inconsistent(String),
    /// Appending a command's events to the log failed.
    #[error(transparent)]
    Log(Box<crate::storage::StorageError>),
}

impl From<StateError> for crate::storage::StorageError {
    /// Keeps LMDB errors as they are (a full map is grown, an I/O failure stops writing).
    fn from(e: StateError) -> Self {
        match e {
            StateError::Lmdb(e) => crate::storage::StorageError::Lmdb(e),
            StateError::Log(e) => *e,
            other => crate::storage::StorageError::State(other.to_string()),
        }
    }
}

impl StateError {
    pub fn is_map_full(&self) -> bool {
        match self {
            StateError::Lmdb(heed::Error::Mdb(heed::MdbError::MapFull)) => true,
            StateError::Log(e) => e.is_map_full(),
            _ => false,
        }
    }
}

/// The subspace prefix of `(domain, scope)`.
pub fn subspace(domain: &str, scope: &str) -> Vec<u8> {
    pack(&[Elem::Str(domain), Elem::Str(scope)])
}

fn full_key(prefix: &[u8], elems: &[Elem<'_>]) -> Vec<u8> {
    let mut key = Vec::with_capacity(prefix.len() + 24);
    key.extend_from_slice(prefix);
    pack_into(&mut key, elems);
    key
}

/// A value as stored: JSON, or sealed with its tenant's data key ([`DataKey::seal_value`]).
fn decode<T: DeserializeOwned>(key: &[u8], bytes: &[u8], data_key: Option<&DataKey>) -> Result<T, StateError> {
    let undecodable = |reason: String| StateError::Undecodable { key: format!("{key:02x?}"), reason };
    if bytes.first() == Some(&SEALED_VALUE) {
        let data_key = data_key.ok_or_else(|| {
            undecodable(
                "sealed with its tenant's data key, which this node does not have (encryption is off here, or the key has not reached it)"
                    .into(),
            )
        })?;
        let plain = data_key
            .open_value(key, bytes)
            .ok_or_else(|| undecodable("a sealed value that does not open: changed on disk, or moved from another key".into()))?;
        return serde_json::from_slice(&plain).map_err(|e| undecodable(e.to_string()));
    }
    serde_json::from_slice(bytes).map_err(|e| undecodable(e.to_string()))
}

/// State kept in memory: every key and value, in key order (as LMDB keeps them).
pub type MemoryState = std::collections::BTreeMap<Vec<u8>, Vec<u8>>;

/// Where a view reads.
#[derive(Clone, Copy)]
enum Source<'t> {
    Lmdb(&'t RoTxn<'t, WithoutTls>, Database<Bytes, Bytes>),
    Memory(&'t MemoryState),
}

impl Source<'_> {
    fn get(&self, key: &[u8]) -> Result<Option<&[u8]>, StateError> {
        Ok(match self {
            Source::Lmdb(txn, db) => db.get(txn, key)?,
            Source::Memory(map) => map.get(key).map(Vec::as_slice),
        })
    }

    /// Hands `visit` each entry from `start` on, in key order, until it returns false.
    fn each_from(&self, start: &[u8], mut visit: impl FnMut(&[u8], &[u8]) -> Result<bool, StateError>) -> Result<(), StateError> {
        match self {
            Source::Lmdb(txn, db) => {
                let range = (std::ops::Bound::Included(start), std::ops::Bound::Unbounded);
                for entry in db.range(txn, &range)? {
                    let (key, value) = entry?;
                    if !visit(key, value)? {
                        break;
                    }
                }
            }
            Source::Memory(map) => {
                for (key, value) in map.range::<[u8], _>((std::ops::Bound::Included(start), std::ops::Bound::Unbounded)) {
                    if !visit(key, value)? {
                        break;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Read access to one `(domain, scope)` subspace.
pub struct StateView<'t> {
    source: Source<'t>,
    prefix: &'t [u8],
    /// Opens values sealed with the scope's tenant's data key (encryption at rest).
    data_key: Option<&'t DataKey>,
}

impl<'t> StateView<'t> {
    pub fn new(txn: &'t RoTxn<'t, WithoutTls>, db: Database<Bytes, Bytes>, prefix: &'t [u8]) -> Self {
        StateView { source: Source::Lmdb(txn, db), prefix, data_key: None }
    }

    /// A view of state kept in memory.
    pub fn memory(state: &'t MemoryState, prefix: &'t [u8]) -> Self {
        StateView { source: Source::Memory(state), prefix, data_key: None }
    }

    /// The same view, opening values sealed with `data_key` (values kept in clear read as before).
    pub fn sealed(self, data_key: Option<&'t DataKey>) -> Self {
        StateView { data_key, ..self }
    }

    /// The same state seen through another subspace.
    pub fn with_prefix<'a>(&'a self, prefix: &'a [u8]) -> StateView<'a> {
        StateView { source: self.source, prefix, data_key: self.data_key }
    }

    /// The bytes under a whole key, outside any subspace (the command records, `commands.rs`).
    pub fn raw(&self, key: &[u8]) -> Result<Option<&[u8]>, StateError> {
        self.source.get(key)
    }

    /// The value under `(domain, scope, elems...)`, if any.
    pub fn get<T: DeserializeOwned>(&self, elems: &[Elem<'_>]) -> Result<Option<T>, StateError> {
        let key = full_key(self.prefix, elems);
        match self.source.get(&key)? {
            Some(bytes) => decode(&key, bytes, self.data_key).map(Some),
            None => Ok(None),
        }
    }

    /// Up to `limit` entries whose keys extend `(domain, scope, elems...)`, in key order, starting
    /// at the key that extends it by `from` (or at the first one). Each comes with the elements
    /// of its key after `elems`.
    pub fn scan<T: DeserializeOwned>(
        &self,
        elems: &[Elem<'_>],
        from: Option<Elem<'_>>,
        limit: usize,
    ) -> Result<Vec<(Vec<Value>, T)>, StateError> {
        let mut out = Vec::new();
        self.for_each(elems, from, limit, |key, value| {
            out.push((key, value));
            Ok(())
        })?;
        Ok(out)
    }

    /// Like [`StateView::scan`], but hands each entry to `visit` instead of collecting them;
    /// returns how many it visited (at most `limit`).
    pub fn for_each<T: DeserializeOwned>(
        &self,
        elems: &[Elem<'_>],
        from: Option<Elem<'_>>,
        limit: usize,
        mut visit: impl FnMut(Vec<Value>, T) -> Result<(), StateError>,
    ) -> Result<usize, StateError> {
        let prefix = full_key(self.prefix, elems);
        let start = match from {
            Some(from) => full_key(&prefix, &[from]),
            None => prefix.clone(),
        };
        let mut visited = 0;
        self.source.each_from(&start, |key, value| {
            if !key.starts_with(&prefix) || visited == limit {
                return Ok(false);
            }
            let rest =
                unpack(&key[prefix.len()..]).map_err(|e| StateError::Undecodable { key: format!("{key:02x?}"), reason: e.to_string() })?;
            visit(rest, decode(key, value, self.data_key)?)?;
            visited += 1;
            Ok(true)
        })?;
        Ok(visited)
    }
}

/// Where state is written.
enum Sink<'t, 'e> {
    Lmdb(&'t mut RwTxn<'e>, Database<Bytes, Bytes>),
    Memory(&'t mut MemoryState),
}

/// Read and write access to one `(domain, scope)` subspace, inside the caller's transaction.
pub struct State<'t, 'e> {
    sink: Sink<'t, 'e>,
    prefix: &'t [u8],
    /// Seals the values written, and opens those read, with the scope's tenant's data key.
    data_key: Option<&'t DataKey>,
    buf: Vec<u8>,
    /// Notes each key's value before its first write, when the append may be undone
    /// (`storage/undo.rs`).
    journal: Option<&'t mut Journal>,
}

impl<'t, 'e> State<'t, 'e> {
    pub fn new(txn: &'t mut RwTxn<'e>, db: Database<Bytes, Bytes>, prefix: &'t [u8]) -> Self {
        State { sink: Sink::Lmdb(txn, db), prefix, data_key: None, buf: Vec::new(), journal: None }
    }

    /// Like [`State::new`], noting in `journal` (when given) what each write replaces.
    pub fn journaled(txn: &'t mut RwTxn<'e>, db: Database<Bytes, Bytes>, prefix: &'t [u8], journal: Option<&'t mut Journal>) -> Self {
        State { sink: Sink::Lmdb(txn, db), prefix, data_key: None, buf: Vec::new(), journal }
    }

    /// State kept in memory, noting in `journal` (when given) what each write replaces.
    pub fn memory(state: &'t mut MemoryState, prefix: &'t [u8], journal: Option<&'t mut Journal>) -> Self {
        State { sink: Sink::Memory(state), prefix, data_key: None, buf: Vec::new(), journal }
    }

    /// The same state, its values sealed with `data_key` when written and opened when read
    /// (encryption at rest: `security/keys.rs`); values kept in clear read as before.
    pub fn sealed(self, data_key: Option<&'t DataKey>) -> Self {
        State { data_key, ..self }
    }

    /// Reads through the same transaction, so they see this transaction's own writes.
    pub fn view(&self) -> StateView<'_> {
        let source = match &self.sink {
            Sink::Lmdb(txn, db) => Source::Lmdb(txn, *db),
            Sink::Memory(map) => Source::Memory(map),
        };
        StateView { source, prefix: self.prefix, data_key: self.data_key }
    }

    pub fn get<T: DeserializeOwned>(&self, elems: &[Elem<'_>]) -> Result<Option<T>, StateError> {
        self.view().get(elems)
    }

    pub fn put<T: Serialize>(&mut self, elems: &[Elem<'_>], value: &T) -> Result<(), StateError> {
        let key = full_key(self.prefix, elems);
        self.buf.clear();
        serde_json::to_writer(&mut self.buf, value)
            .map_err(|e| StateError::Undecodable { key: format!("{key:02x?}"), reason: e.to_string() })?;
        if let Some(data_key) = self.data_key {
            self.buf = data_key.seal_value(&key, &self.buf);
        }
        self.note(&key)?;
        match &mut self.sink {
            Sink::Lmdb(txn, db) => db.put(txn, &key, &self.buf)?,
            Sink::Memory(map) => {
                map.insert(key, self.buf.clone());
            }
        }
        Ok(())
    }

    pub fn delete(&mut self, elems: &[Elem<'_>]) -> Result<bool, StateError> {
        let key = full_key(self.prefix, elems);
        self.note(&key)?;
        Ok(match &mut self.sink {
            Sink::Lmdb(txn, db) => db.delete(txn, &key)?,
            Sink::Memory(map) => map.remove(&key).is_some(),
        })
    }

    /// Whether writes are journaled (the append may be undone).
    pub fn journaling(&self) -> bool {
        self.journal.is_some()
    }

    /// Writes `value` under a whole key, outside any subspace (the command records).
    pub fn put_raw(&mut self, key: &[u8], value: &[u8]) -> Result<(), StateError> {
        self.note(key)?;
        match &mut self.sink {
            Sink::Lmdb(txn, db) => db.put(txn, key, value)?,
            Sink::Memory(map) => {
                map.insert(key.to_vec(), value.to_vec());
            }
        }
        Ok(())
    }

    /// Notes `key`'s value in the journal (if any) before a write.
    pub fn note(&mut self, key: &[u8]) -> Result<(), StateError> {
        let Some(journal) = self.journal.as_deref_mut() else { return Ok(()) };
        match &self.sink {
            Sink::Lmdb(txn, db) => journal.before_write(txn, *db, key)?,
            Sink::Memory(map) => journal.before_write_in(map, key),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::ledger::{Ledger, LedgerCommand};
    use crate::app::{Context, Domain};

    #[tokio::test]
    async fn given_a_data_key_then_values_are_stored_sealed_open_with_it_only_and_clear_ones_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let keks = vec![crate::security::keys::Kek::from_hex(&"07".repeat(32)).unwrap()];
        let keys = crate::security::keys::Keys::in_file(dir.path().join("keys.json"), keks).unwrap();
        let data_key = keys.data_key_for_write("acme").await.unwrap();
        // SAFETY: a fresh directory, opened once.
        let env = unsafe { heed::EnvOpenOptions::new().read_txn_without_tls().max_dbs(1).open(dir.path()).unwrap() };
        let mut txn = env.write_txn().unwrap();
        let db: Database<Bytes, Bytes> = env.create_database(&mut txn, Some("state")).unwrap();
        let prefix = subspace("ledger", "acme:shop");
        let mut state = State::new(&mut txn, db, &prefix);
        state.put(&[Elem::Str("old")], &"IN-CLEAR").unwrap();
        let mut state = state.sealed(Some(&data_key));
        state.put(&[Elem::Str("a"), Elem::Str("till")], &"SEALED-MARKER").unwrap();
        assert_eq!(state.get::<String>(&[Elem::Str("a"), Elem::Str("till")]).unwrap().unwrap(), "SEALED-MARKER");
        assert_eq!(state.get::<String>(&[Elem::Str("old")]).unwrap().unwrap(), "IN-CLEAR", "written before encryption was on");
        let raw: Vec<Vec<u8>> = db.iter(&txn).unwrap().map(|e| e.unwrap().1.to_vec()).collect();
        assert!(raw.iter().all(|v| !v.windows(6).any(|w| w == b"SEALED")), "no plaintext stored");
        assert!(raw.iter().any(|v| v.first() == Some(&SEALED_VALUE)));
        let scanned = StateView::new(&txn, db, &prefix).sealed(Some(&data_key)).scan::<String>(&[Elem::Str("a")], None, 10).unwrap();
        assert_eq!(scanned, vec![(vec![Value::Str("till".into())], "SEALED-MARKER".to_string())]);
        // Without the key, or moved under another key, it does not read.
        let Err(StateError::Undecodable { reason, .. }) =
            StateView::new(&txn, db, &prefix).get::<String>(&[Elem::Str("a"), Elem::Str("till")])
        else {
            panic!("a sealed value read without its key")
        };
        assert!(reason.contains("does not have"), "{reason}");
        let sealed = db.get(&txn, &full_key(&prefix, &[Elem::Str("a"), Elem::Str("till")])).unwrap().unwrap().to_vec();
        db.put(&mut txn, &full_key(&prefix, &[Elem::Str("a"), Elem::Str("moved")]), &sealed).unwrap();
        let moved = StateView::new(&txn, db, &prefix).sealed(Some(&data_key)).get::<String>(&[Elem::Str("a"), Elem::Str("moved")]);
        assert!(matches!(moved, Err(StateError::Undecodable { .. })), "{moved:?}");
    }

    /// A fixed walk of ledger commands over three accounts and two holds: money in and out,
    /// transfers, holds placed, captured and released, many refused.
    fn commands() -> Vec<LedgerCommand> {
        let mut out: Vec<LedgerCommand> = ["a", "b", "c"]
            .iter()
            .map(|a| LedgerCommand::OpenAccount { account: (*a).into(), currency: "EUR".into(), credit_limit: 30 })
            .collect();
        let accounts = ["a", "b", "c"];
        for i in 0..120usize {
            let (x, y, amount) = (accounts[i % 3].to_string(), accounts[(i * 7 + 1) % 3].to_string(), (i * 37 % 90 + 1) as u64);
            let hold = format!("h{}", i % 2);
            out.push(match i % 7 {
                0 | 1 => LedgerCommand::Deposit { account: x, amount },
                2 => LedgerCommand::Withdraw { account: x, amount },
                3 => LedgerCommand::Transfer { from: x, to: y, amount, transfer: None },
                4 => LedgerCommand::PlaceHold { hold, account: x, amount },
                5 => LedgerCommand::CaptureHold { hold, amount: None, to: Some(y) },
                _ => LedgerCommand::ReleaseHold { hold },
            });
        }
        out
    }

    #[test]
    fn given_the_same_commands_then_the_ledger_decides_evolves_and_journals_the_same_in_memory_as_in_lmdb() {
        let dir = tempfile::tempdir().unwrap();
        // SAFETY: a fresh directory, opened once.
        let env = unsafe { heed::EnvOpenOptions::new().read_txn_without_tls().max_dbs(1).open(dir.path()).unwrap() };
        let mut txn = env.write_txn().unwrap();
        let db: Database<Bytes, Bytes> = env.create_database(&mut txn, Some("state")).unwrap();
        let mut memory = MemoryState::new();
        let prefix = subspace(Ledger::NAME, "book");
        let (mut accepted, mut refused) = (0, 0);
        for (i, command) in commands().iter().enumerate() {
            let id = format!("c{i}");
            let ctx = Context { now_us: 1_000 + i as u64, command_id: &id, remember_id: false, ids_since_us: 0 };
            let in_lmdb = Ledger::decide(&StateView::new(&txn, db, &prefix), command, &ctx);
            let in_memory = Ledger::decide(&StateView::memory(&memory, &prefix), command, &ctx);
            assert_eq!(format!("{in_lmdb:?}"), format!("{in_memory:?}"), "command {i}: {command:?}");
            let Ok(events) = in_memory else {
                refused += 1;
                continue;
            };
            accepted += 1;
            let (mut lmdb_journal, mut memory_journal) = (Journal::default(), Journal::default());
            for event in &events {
                Ledger::evolve(&mut State::journaled(&mut txn, db, &prefix, Some(&mut lmdb_journal)), event).unwrap();
                Ledger::evolve(&mut State::memory(&mut memory, &prefix, Some(&mut memory_journal)), event).unwrap();
            }
            assert_eq!(lmdb_journal, memory_journal, "command {i}: the same keys, with the same values before");
            if i % 10 == 9 {
                // Taken back in memory, then written again: the journal restores exactly.
                let before = memory.clone();
                memory_journal.undo_in(&mut memory);
                for event in &events {
                    Ledger::evolve(&mut State::memory(&mut memory, &prefix, None), event).unwrap();
                }
                assert_eq!(memory, before);
            }
        }
        let in_lmdb: MemoryState = db.iter(&txn).unwrap().map(|e| e.unwrap()).map(|(k, v)| (k.to_vec(), v.to_vec())).collect();
        assert_eq!(in_lmdb, memory);
        assert!(accepted > 50 && refused > 10, "{accepted} accepted, {refused} refused");
        let query = crate::app::ledger::query::LedgerQuery::Balance { account: "a".into() };
        let (a, b) =
            (Ledger::query(&StateView::new(&txn, db, &prefix), &query), Ledger::query(&StateView::memory(&memory, &prefix), &query));
        assert_eq!(format!("{a:?}"), format!("{b:?}"));
    }
}
