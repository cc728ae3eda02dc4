//! Domain state in LMDB: a domain's view of its subspace of the log environment's `state`
//! database.
//!
//! Every key a domain writes is the tuple `(domain, scope, ...)` packed with the order-preserving
//! encoding of [`crate::storage::keys`] (the FoundationDB "layers" approach): the domain names
//! only the elements after the scope, so two domains, or two scopes (ledger books) of one domain,
//! can never touch each other's keys, and a query over, say, every account of a book is one
//! key-range scan. Values are JSON (readable in a dump, and `serde(default)` lets a record gain
//! fields without a format change).
//!
//! [`StateView`] reads (decide and queries); [`State`] also writes (evolve). Both work on an
//! LMDB transaction the caller owns: the log's writer gives its group-commit transaction, so a
//! command's state changes commit in the same transaction as its events, or not at all.
//! Must not: keep a transaction, or write outside its subspace.

use heed::types::Bytes;
use heed::{Database, RoTxn, RwTxn, WithoutTls};
use serde::Serialize;
use serde::de::DeserializeOwned;
use thiserror::Error;

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

fn decode<T: DeserializeOwned>(key: &[u8], bytes: &[u8]) -> Result<T, StateError> {
    serde_json::from_slice(bytes).map_err(|e| StateError::Undecodable { key: format!("{key:02x?}"), reason: e.to_string() })
}

/// Read access to one `(domain, scope)` subspace.
pub struct StateView<'t> {
    txn: &'t RoTxn<'t, WithoutTls>,
    db: Database<Bytes, Bytes>,
    prefix: &'t [u8],
}

impl<'t> StateView<'t> {
    pub fn new(txn: &'t RoTxn<'t, WithoutTls>, db: Database<Bytes, Bytes>, prefix: &'t [u8]) -> Self {
        StateView { txn, db, prefix }
    }

    /// The value under `(domain, scope, elems...)`, if any.
    pub fn get<T: DeserializeOwned>(&self, elems: &[Elem<'_>]) -> Result<Option<T>, StateError> {
        let key = full_key(self.prefix, elems);
        match self.db.get(self.txn, &key)? {
            Some(bytes) => decode(&key, bytes).map(Some),
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
        let range = (std::ops::Bound::Included(start.as_slice()), std::ops::Bound::Unbounded);
        for entry in self.db.range(self.txn, &range)? {
            let (key, value) = entry?;
            if !key.starts_with(&prefix) || visited == limit {
                break;
            }
            let rest =
                unpack(&key[prefix.len()..]).map_err(|e| StateError::Undecodable { key: format!("{key:02x?}"), reason: e.to_string() })?;
            visit(rest, decode(key, value)?)?;
            visited += 1;
        }
        Ok(visited)
    }
}

/// Read and write access to one `(domain, scope)` subspace, inside the caller's transaction.
pub struct State<'t, 'e> {
    txn: &'t mut RwTxn<'e>,
    db: Database<Bytes, Bytes>,
    prefix: &'t [u8],
    buf: Vec<u8>,
    /// Notes each key's value before its first write, when the append may be undone
    /// (`storage/undo.rs`).
    journal: Option<&'t mut Journal>,
}

impl<'t, 'e> State<'t, 'e> {
    pub fn new(txn: &'t mut RwTxn<'e>, db: Database<Bytes, Bytes>, prefix: &'t [u8]) -> Self {
        State { txn, db, prefix, buf: Vec::new(), journal: None }
    }

    /// Like [`State::new`], noting in `journal` (when given) what each write replaces.
    pub fn journaled(txn: &'t mut RwTxn<'e>, db: Database<Bytes, Bytes>, prefix: &'t [u8], journal: Option<&'t mut Journal>) -> Self {
        State { txn, db, prefix, buf: Vec::new(), journal }
    }

    /// Reads through the same transaction, so they see this transaction's own writes.
    pub fn view(&self) -> StateView<'_> {
        StateView { txn: self.txn, db: self.db, prefix: self.prefix }
    }

    pub fn get<T: DeserializeOwned>(&self, elems: &[Elem<'_>]) -> Result<Option<T>, StateError> {
        self.view().get(elems)
    }

    pub fn put<T: Serialize>(&mut self, elems: &[Elem<'_>], value: &T) -> Result<(), StateError> {
        let key = full_key(self.prefix, elems);
        self.buf.clear();
        serde_json::to_writer(&mut self.buf, value)
            .map_err(|e| StateError::Undecodable { key: format!("{key:02x?}"), reason: e.to_string() })?;
        if let Some(journal) = self.journal.as_deref_mut() {
            journal.before_write(self.txn, self.db, &key)?;
        }
        self.db.put(self.txn, &key, &self.buf)?;
        Ok(())
    }

    pub fn delete(&mut self, elems: &[Elem<'_>]) -> Result<bool, StateError> {
        let key = full_key(self.prefix, elems);
        if let Some(journal) = self.journal.as_deref_mut() {
            journal.before_write(self.txn, self.db, &key)?;
        }
        Ok(self.db.delete(self.txn, &key)?)
    }
}
