//! The undo journal: what a replica needs to take an uncommitted append's state changes back.
//!
//! A replicated node's appends of domain streams change state (`app/follow.rs`) in the
//! transaction that stores their events. While an append is not known committed, a new leader
//! may make this replica truncate it (docs/replication.md), and the state must then be what the
//! kept events made it. Instead of forgetting a scope and applying its whole stream again (which
//! reads every event the scope ever had, and is impossible once a log's prefix is gone), each
//! such append stores, under `(partition, last position)` in the log's `undo` database and in the
//! same transaction, the value every state key it wrote had before its first write (or that the
//! key was absent). A truncation restores the values of the appends it removes, newest first, so
//! each key ends at its value before the oldest of them.
//!
//! Records of committed appends are never needed (a committed append is never truncated) and are
//! deleted once this replica knows the commit ([`prune`]). A single node never truncates and
//! writes none.
//!
//! Value format: a sequence of `(key length u32, key, flag u8, [value length u32, value])`,
//! big-endian, flag 1 when the key had a value.

use std::ops::Bound;

use heed::types::Bytes;
use heed::{Database, RoTxn, RwTxn, WithoutTls};

use super::StorageError;

type Db = Database<Bytes, Bytes>;

/// The state keys one append writes, each with its value before the append's first write.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Journal {
    before: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

impl Journal {
    /// Notes `key`'s value in `db` unless this append already wrote it: call before each write.
    pub fn before_write(&mut self, txn: &RoTxn<'_, WithoutTls>, db: Db, key: &[u8]) -> heed::Result<()> {
        if self.before.iter().any(|(k, _)| k == key) {
            return Ok(());
        }
        let old = db.get(txn, key)?.map(<[u8]>::to_vec);
        self.before.push((key.to_vec(), old));
        Ok(())
    }

    /// [`Journal::before_write`] for state kept in memory.
    pub fn before_write_in(&mut self, state: &std::collections::BTreeMap<Vec<u8>, Vec<u8>>, key: &[u8]) {
        if self.before.iter().any(|(k, _)| k == key) {
            return;
        }
        self.before.push((key.to_vec(), state.get(key).cloned()));
    }

    /// Takes back, in memory, what the journaled writes changed.
    pub fn undo_in(&self, state: &mut std::collections::BTreeMap<Vec<u8>, Vec<u8>>) {
        for (key, value) in &self.before {
            match value {
                Some(value) => {
                    state.insert(key.clone(), value.clone());
                }
                None => {
                    state.remove(key);
                }
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.before.is_empty()
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.before.iter().map(|(k, v)| 9 + k.len() + v.as_ref().map_or(0, Vec::len)).sum());
        for (key, value) in &self.before {
            out.extend_from_slice(&(key.len() as u32).to_be_bytes());
            out.extend_from_slice(key);
            match value {
                Some(value) => {
                    out.push(1);
                    out.extend_from_slice(&(value.len() as u32).to_be_bytes());
                    out.extend_from_slice(value);
                }
                None => out.push(0),
            }
        }
        out
    }

    pub(crate) fn decode(mut bytes: &[u8]) -> Option<Journal> {
        fn take<'a>(bytes: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
            let (head, rest) = (bytes.get(..n)?, bytes.get(n..)?);
            *bytes = rest;
            Some(head)
        }
        fn len(bytes: &mut &[u8]) -> Option<usize> {
            Some(u32::from_be_bytes(take(bytes, 4)?.try_into().ok()?) as usize)
        }
        let mut before = Vec::new();
        while !bytes.is_empty() {
            let n = len(&mut bytes)?;
            let key = take(&mut bytes, n)?.to_vec();
            let value = match take(&mut bytes, 1)? {
                [0] => None,
                [1] => {
                    let n = len(&mut bytes)?;
                    Some(take(&mut bytes, n)?.to_vec())
                }
                _ => return None,
            };
            before.push((key, value));
        }
        Some(Journal { before })
    }
}

pub(super) fn key(partition: u32, position: u64) -> [u8; 12] {
    let mut key = [0; 12];
    key[..4].copy_from_slice(&partition.to_be_bytes());
    key[4..].copy_from_slice(&position.to_be_bytes());
    key
}

fn position_of(key: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(key.get(4..12)?.try_into().ok()?))
}

/// Stores the journal of the append of `partition` ending at `last_position` (also an empty one:
/// its presence says the append's changes can be undone).
pub fn record(txn: &mut RwTxn<'_>, undo: Db, partition: u32, last_position: u64, journal: &Journal) -> Result<(), StorageError> {
    undo.put(txn, &key(partition, last_position), &journal.encode())?;
    Ok(())
}

/// Deletes the records of `partition`'s appends ending at or before `through` (committed).
pub fn prune(txn: &mut RwTxn<'_>, undo: Db, partition: u32, through: u64) -> Result<usize, StorageError> {
    let (start, end) = (key(partition, 0), key(partition, through));
    Ok(undo.delete_range(txn, &(Bound::Included(start.as_slice()), Bound::Included(end.as_slice())))?)
}

/// Whether the append of `partition` ending at `last_position` has its record.
pub fn has(txn: &RoTxn<'_, WithoutTls>, undo: Db, partition: u32, last_position: u64) -> Result<bool, StorageError> {
    Ok(undo.get(txn, &key(partition, last_position))?.is_some())
}

/// Takes back, in `state`, the changes of every journaled append of `partition` ending after
/// `after` (newest first), and deletes their records; returns how many appends it undid.
pub fn undo_after(txn: &mut RwTxn<'_>, undo: Db, state: Db, partition: u32, after: u64) -> Result<usize, StorageError> {
    let (start, end) = (key(partition, after.saturating_add(1)), key(partition, u64::MAX));
    let range = (Bound::Included(start.as_slice()), Bound::Included(end.as_slice()));
    let mut journals = Vec::new();
    for entry in undo.range(txn, &range)? {
        let (k, v) = entry?;
        let position = position_of(k).unwrap_or(0);
        let journal = Journal::decode(v)
            .ok_or_else(|| StorageError::State(format!("undecodable undo record of partition {partition} position {position}")))?;
        journals.push(journal);
    }
    for journal in journals.iter().rev() {
        for (key, value) in &journal.before {
            match value {
                Some(value) => state.put(txn, key, value)?,
                None => {
                    state.delete(txn, key)?;
                }
            }
        }
    }
    undo.delete_range(txn, &range)?;
    Ok(journals.len())
}

/// Deletes the records of `partition`'s appends ending after `after`, undoing nothing.
pub fn forget_after(txn: &mut RwTxn<'_>, undo: Db, partition: u32, after: u64) -> Result<usize, StorageError> {
    let (start, end) = (key(partition, after.saturating_add(1)), key(partition, u64::MAX));
    Ok(undo.delete_range(txn, &(Bound::Included(start.as_slice()), Bound::Included(end.as_slice())))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_journal_encodes_and_decodes_values_and_absences_and_a_cut_one_is_refused() {
        let journal = Journal { before: vec![(b"a".to_vec(), Some(b"1".to_vec())), (b"bb".to_vec(), None), (vec![], Some(vec![]))] };
        let bytes = journal.encode();
        assert_eq!(Journal::decode(&bytes), Some(journal));
        for cut in 1..bytes.len() {
            if let Some(j) = Journal::decode(&bytes[..cut]) {
                // A cut that ends exactly between two keys decodes to fewer keys, never garbage.
                assert!(j.before.len() < 3, "cut at {cut}");
            }
        }
        assert_eq!(Journal::decode(&[0, 0, 0, 1, b'k', 7]), None, "unknown flag");
    }

    #[test]
    fn given_appends_that_write_a_key_several_times_when_undone_then_each_key_has_its_value_before_the_first_undone_append() {
        let dir = tempfile::tempdir().unwrap();
        // SAFETY: a fresh directory, opened once.
        let env = unsafe { heed::EnvOpenOptions::new().read_txn_without_tls().max_dbs(2).open(dir.path()).unwrap() };
        let mut txn = env.write_txn().unwrap();
        let state: Db = env.create_database(&mut txn, Some("state")).unwrap();
        let undo: Db = env.create_database(&mut txn, Some("undo")).unwrap();
        state.put(&mut txn, b"k", b"0").unwrap();
        state.put(&mut txn, b"gone", b"x").unwrap();
        // Append at 1: k 0 -> 1 -> 2, `new` created. Append at 2: k 2 -> 3, `gone` deleted.
        type Write<'a> = (&'a [u8], Option<&'a [u8]>);
        let writes: [(u64, &[Write<'_>]); 2] =
            [(1, &[(b"k", Some(b"1")), (b"new", Some(b"n")), (b"k", Some(b"2"))]), (2, &[(b"k", Some(b"3")), (b"gone", None)])];
        for (position, changes) in writes {
            let mut journal = Journal::default();
            for (key, value) in changes {
                journal.before_write(&txn, state, key).unwrap();
                match value {
                    Some(value) => state.put(&mut txn, key, value).unwrap(),
                    None => assert!(state.delete(&mut txn, key).unwrap()),
                }
            }
            record(&mut txn, undo, 0, position, &journal).unwrap();
        }
        let value = |txn: &RwTxn<'_>, key: &[u8]| state.get(txn, key).unwrap().map(<[u8]>::to_vec);
        assert_eq!(undo_after(&mut txn, undo, state, 0, 1).unwrap(), 1);
        assert_eq!((value(&txn, b"k"), value(&txn, b"gone")), (Some(b"2".to_vec()), Some(b"x".to_vec())));
        assert_eq!(undo_after(&mut txn, undo, state, 0, 0).unwrap(), 1);
        assert_eq!((value(&txn, b"k"), value(&txn, b"new")), (Some(b"0".to_vec()), None));
        assert!(!has(&txn, undo, 0, 1).unwrap() && !has(&txn, undo, 0, 2).unwrap());
    }
}
