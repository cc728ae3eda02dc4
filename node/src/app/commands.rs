//! Command ids: a retried command returns its first result and writes nothing new.
//!
//! Every accepted command leaves a record under `("$commands", stream, command_id)` in the
//! `state` database, written in the transaction that appends its events, plus an expiry entry
//! under `("$command_expiry", recorded_at_us, stream, command_id)`. Before deciding a command the
//! processor looks its id up; a hit is answered with the recorded result (`duplicate = true`) and
//! nothing is decided or written.
//!
//! Decisions a later engineer must know:
//! - ids are per stream (per ledger book): two books may use the same id;
//! - an id the node generated (the client gave none) is neither looked up nor recorded: no
//!   retry can carry it, and recording it would cost two writes per command for nothing;
//! - a record keeps a hash of the command (FNV-1a over its JSON): the same id with another command
//!   is refused (`CommandIdReused`, as Stripe does with idempotency keys) instead of answering the
//!   first result for a command that was never run;
//! - only accepted commands are recorded: a rejected command wrote nothing, so its retry is
//!   decided again (and may succeed if the state changed meanwhile) — the danger retries guard
//!   against, doing a thing twice, cannot arise from a rejection;
//! - records expire `app.command_id_retention_s` after they were written (the duplicate window of
//!   NATS JetStream, default 10 minutes): a lookup ignores an expired record at once, and every
//!   group commit deletes expired ones, oldest first, at most [`EXPIRE_PER_COMMIT`] plus twice
//!   the batch's commands — more than the batch can add, so the backlog cannot grow under load
//!   (an idle node deletes nothing until its next commit);
//! - every event also carries its command id in its metadata ([`super::COMMAND_ID_METADATA_KEY`]),
//!   so a follower (or a rebuild) can derive the same records from the log.

use heed::types::Bytes;
use heed::{Database, RoTxn, RwTxn, WithoutTls};

use super::{State, StateError, StateView};
use crate::storage::Journal;
use crate::storage::keys::{Elem, Value, pack, unpack};

/// Most expired records one group commit deletes.
pub const EXPIRE_PER_COMMIT: usize = 256;

const RECORDS: &str = "$commands";
const EXPIRY: &str = "$command_expiry";

/// Where an accepted command's events landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommandRecord {
    pub partition: u32,
    /// Positions of its first and last event (both 0 when it produced none).
    pub first_position: u64,
    pub last_position: u64,
    /// The stream's version after its events.
    pub stream_version: u64,
    pub events: u32,
    pub recorded_at_us: u64,
    /// [`command_hash`] of the command (0: not known).
    pub command_hash: u64,
}

const RECORD_BYTES: usize = 48;
/// Records written before the hash was kept.
const RECORD_BYTES_WITHOUT_HASH: usize = 40;

/// FNV-1a (64 bits) of the command's JSON: tells a retry from another command under the same id.
pub fn command_hash(command_json: &[u8]) -> u64 {
    let hash = command_json.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3));
    // 0 means "unknown"; a command never hashes to it.
    hash.max(1)
}

impl CommandRecord {
    fn encode(&self) -> [u8; RECORD_BYTES] {
        let mut out = [0u8; RECORD_BYTES];
        out[0..4].copy_from_slice(&self.partition.to_be_bytes());
        out[4..8].copy_from_slice(&self.events.to_be_bytes());
        out[8..16].copy_from_slice(&self.first_position.to_be_bytes());
        out[16..24].copy_from_slice(&self.last_position.to_be_bytes());
        out[24..32].copy_from_slice(&self.stream_version.to_be_bytes());
        out[32..40].copy_from_slice(&self.recorded_at_us.to_be_bytes());
        out[40..48].copy_from_slice(&self.command_hash.to_be_bytes());
        out
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != RECORD_BYTES && bytes.len() != RECORD_BYTES_WITHOUT_HASH {
            return None;
        }
        let u32_at = |i: usize| u32::from_be_bytes(bytes[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_be_bytes(bytes[i..i + 8].try_into().expect("8 bytes"));
        Some(CommandRecord {
            partition: u32_at(0),
            events: u32_at(4),
            first_position: u64_at(8),
            last_position: u64_at(16),
            stream_version: u64_at(24),
            recorded_at_us: u64_at(32),
            command_hash: if bytes.len() == RECORD_BYTES { u64_at(40) } else { 0 },
        })
    }
}

/// Whether a state key's first element names a command record (`(kind, stream, id)`).
pub fn is_record_key(kind: &str) -> bool {
    kind == RECORDS
}

/// Whether a state key's first element names a command expiry entry (`(kind, at, stream, id)`).
pub fn is_expiry_key(kind: &str) -> bool {
    kind == EXPIRY
}

fn record_key(stream: &str, command_id: &str) -> Vec<u8> {
    pack(&[Elem::Str(RECORDS), Elem::Str(stream), Elem::Str(command_id)])
}

/// The record of `command_id` on `stream`, if that command was accepted at or after `since_us`
/// (an older record has expired, whether or not it was deleted yet).
pub fn lookup(
    txn: &RoTxn<'_, WithoutTls>,
    db: Database<Bytes, Bytes>,
    stream: &str,
    command_id: &str,
    since_us: u64,
) -> Result<Option<CommandRecord>, StateError> {
    lookup_in(&StateView::new(txn, db, &[]), stream, command_id, since_us)
}

/// [`lookup`] in any state (`view` over the whole state, no subspace): LMDB or memory.
pub fn lookup_in(view: &StateView<'_>, stream: &str, command_id: &str, since_us: u64) -> Result<Option<CommandRecord>, StateError> {
    let key = record_key(stream, command_id);
    match view.raw(&key)? {
        None => Ok(None),
        Some(bytes) => match CommandRecord::decode(bytes) {
            Some(record) => Ok((record.recorded_at_us >= since_us).then_some(record)),
            None => Err(StateError::Undecodable {
                key: format!("command {command_id} of {stream}"),
                reason: format!("{} bytes, expected {RECORD_BYTES}", bytes.len()),
            }),
        },
    }
}

/// Records an accepted command, noting in `journal` (when given) what it replaces
/// (`storage/undo.rs`).
pub fn record(
    txn: &mut RwTxn<'_>,
    db: Database<Bytes, Bytes>,
    stream: &str,
    command_id: &str,
    record: &CommandRecord,
    journal: Option<&mut Journal>,
) -> Result<(), StateError> {
    record_in(&mut State::journaled(txn, db, &[], journal), stream, command_id, record)
}

/// [`record`] in any state (`state` over the whole state, no subspace), noting what it replaces
/// in the state's journal.
pub fn record_in(state: &mut State<'_, '_>, stream: &str, command_id: &str, record: &CommandRecord) -> Result<(), StateError> {
    let key = record_key(stream, command_id);
    let expiry = pack(&[Elem::Str(EXPIRY), Elem::U64(record.recorded_at_us), Elem::Str(stream), Elem::Str(command_id)]);
    // (Each write below notes what it replaces.)
    if state.journaling() {
        // An expired record this one replaces keeps its expiry entry if undone: the sweep
        // (`expire`) may delete that entry meanwhile, and a record without one is never deleted.
        let old = state.view().raw(&key)?.and_then(CommandRecord::decode);
        if let Some(old) = old {
            state.note(&pack(&[Elem::Str(EXPIRY), Elem::U64(old.recorded_at_us), Elem::Str(stream), Elem::Str(command_id)]))?;
        }
    }
    state.put_raw(&key, &record.encode())?;
    state.put_raw(&expiry, &[])
}

/// Deletes every record of `stream`, with its expiry entry (a replica truncating the stream's
/// events rebuilds them, `app/follow.rs`).
pub fn forget_stream(txn: &mut RwTxn<'_>, db: Database<Bytes, Bytes>, stream: &str) -> Result<(), StateError> {
    let prefix = pack(&[Elem::Str(RECORDS), Elem::Str(stream)]);
    let mut doomed = Vec::new();
    for entry in db.prefix_iter(txn, &prefix)? {
        let (key, value) = entry?;
        let id = match unpack(key).as_deref() {
            Ok([_, _, Value::Str(id)]) => id.clone(),
            _ => return Err(StateError::Undecodable { key: format!("{key:02x?}"), reason: "not a command record key".into() }),
        };
        let at_us = CommandRecord::decode(value).map(|r| r.recorded_at_us);
        doomed.push((key.to_vec(), at_us.map(|at| pack(&[Elem::Str(EXPIRY), Elem::U64(at), Elem::Str(stream), Elem::Str(&id)]))));
    }
    for (key, expiry) in doomed {
        db.delete(txn, &key)?;
        if let Some(expiry) = expiry {
            db.delete(txn, &expiry)?;
        }
    }
    Ok(())
}

/// Deletes up to `max` records written before `before_us`, oldest first; returns how many.
pub fn expire(txn: &mut RwTxn<'_>, db: Database<Bytes, Bytes>, before_us: u64, max: usize) -> Result<usize, StateError> {
    let start = pack(&[Elem::Str(EXPIRY)]);
    let end = pack(&[Elem::Str(EXPIRY), Elem::U64(before_us)]);
    let mut doomed = Vec::new();
    for entry in db.range(txn, &(std::ops::Bound::Included(start.as_slice()), std::ops::Bound::Excluded(end.as_slice())))?.take(max) {
        let (key, _) = entry?;
        doomed.push(key.to_vec());
    }
    for key in &doomed {
        match unpack(key).as_deref() {
            Ok([_, Value::U64(at_us), Value::Str(stream), Value::Str(id)]) => {
                // The id may have been accepted again after it expired: that newer record has
                // an expiry entry of its own and stays.
                let record_key = record_key(stream, id);
                let current = db.get(txn, &record_key)?.and_then(CommandRecord::decode);
                if current.is_some_and(|r| r.recorded_at_us == *at_us) {
                    db.delete(txn, &record_key)?;
                }
            }
            _ => return Err(StateError::Undecodable { key: format!("{key:02x?}"), reason: "not a command expiry key".into() }),
        }
        db.delete(txn, key)?;
    }
    Ok(doomed.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> (tempfile::TempDir, heed::Env<WithoutTls>, Database<Bytes, Bytes>) {
        let dir = tempfile::tempdir().unwrap();
        // SAFETY: a fresh directory opened once by this test.
        let env = unsafe { heed::EnvOpenOptions::new().read_txn_without_tls().map_size(16 << 20).max_dbs(1).open(dir.path()).unwrap() };
        let mut txn = env.write_txn().unwrap();
        let db = env.create_database(&mut txn, Some("state")).unwrap();
        txn.commit().unwrap();
        (dir, env, db)
    }

    fn rec(at_us: u64) -> CommandRecord {
        CommandRecord {
            partition: 3,
            first_position: 10,
            last_position: 11,
            stream_version: 7,
            events: 2,
            recorded_at_us: at_us,
            command_hash: 9,
        }
    }

    #[test]
    fn given_a_recorded_command_then_lookup_returns_it_for_its_stream_only() {
        let (_dir, env, db) = env();
        let mut txn = env.write_txn().unwrap();
        record(&mut txn, db, "ledger/a", "c-1", &rec(100), None).unwrap();
        assert_eq!(lookup(&txn, db, "ledger/a", "c-1", 0).unwrap(), Some(rec(100)));
        assert_eq!(lookup(&txn, db, "ledger/b", "c-1", 0).unwrap(), None);
        assert_eq!(lookup(&txn, db, "ledger/a", "c-2", 0).unwrap(), None);
    }

    #[test]
    fn given_records_of_several_ages_when_expired_then_only_older_ones_go_and_at_most_max() {
        let (_dir, env, db) = env();
        let mut txn = env.write_txn().unwrap();
        for (i, at) in [50u64, 10, 300, 20, 200].into_iter().enumerate() {
            record(&mut txn, db, "ledger/a", &format!("c-{i}"), &rec(at), None).unwrap();
        }
        assert_eq!(expire(&mut txn, db, 100, 2).unwrap(), 2, "bounded by max");
        // The two oldest (10 and 20) went first.
        assert!(lookup(&txn, db, "ledger/a", "c-1", 0).unwrap().is_none());
        assert!(lookup(&txn, db, "ledger/a", "c-3", 0).unwrap().is_none());
        assert!(lookup(&txn, db, "ledger/a", "c-0", 0).unwrap().is_some());
        assert_eq!(expire(&mut txn, db, 100, 10).unwrap(), 1);
        assert!(lookup(&txn, db, "ledger/a", "c-0", 0).unwrap().is_none());
        assert!(lookup(&txn, db, "ledger/a", "c-2", 0).unwrap().is_some());
        assert!(lookup(&txn, db, "ledger/a", "c-4", 0).unwrap().is_some());
        assert_eq!(expire(&mut txn, db, 100, 10).unwrap(), 0);
    }

    #[test]
    fn given_an_expired_record_then_lookup_ignores_it_before_it_is_deleted() {
        let (_dir, env, db) = env();
        let mut txn = env.write_txn().unwrap();
        record(&mut txn, db, "ledger/a", "c-1", &rec(100), None).unwrap();
        assert!(lookup(&txn, db, "ledger/a", "c-1", 100).unwrap().is_some());
        assert!(lookup(&txn, db, "ledger/a", "c-1", 101).unwrap().is_none());
    }

    #[test]
    fn given_an_id_accepted_again_after_it_expired_when_the_old_entry_expires_then_the_new_record_stays() {
        let (_dir, env, db) = env();
        let mut txn = env.write_txn().unwrap();
        record(&mut txn, db, "ledger/a", "c-1", &rec(100), None).unwrap();
        record(&mut txn, db, "ledger/a", "c-1", &rec(500), None).unwrap();
        assert_eq!(expire(&mut txn, db, 200, 10).unwrap(), 1);
        assert_eq!(lookup(&txn, db, "ledger/a", "c-1", 0).unwrap(), Some(rec(500)));
    }

    #[test]
    fn a_command_never_hashes_to_the_unknown_value_and_different_commands_differ() {
        assert_ne!(command_hash(b""), 0);
        assert_ne!(command_hash(br#"{"Deposit":{"amount":5}}"#), command_hash(br#"{"Deposit":{"amount":6}}"#));
    }

    #[test]
    fn given_an_expired_id_accepted_again_when_that_append_is_undone_then_the_old_record_keeps_its_expiry_and_the_next_sweep_deletes_it() {
        use crate::storage::undo;
        let dir = tempfile::tempdir().unwrap();
        // SAFETY: a fresh directory, opened once.
        let env = unsafe { heed::EnvOpenOptions::new().read_txn_without_tls().max_dbs(3).open(dir.path()).unwrap() };
        let mut txn = env.write_txn().unwrap();
        let with: Database<Bytes, Bytes> = env.create_database(&mut txn, Some("with")).unwrap();
        let without: Database<Bytes, Bytes> = env.create_database(&mut txn, Some("without")).unwrap();
        let undo_db: Database<Bytes, Bytes> = env.create_database(&mut txn, Some("undo")).unwrap();
        // Both replicas accepted c1 at t=100. `with` stores an uncommitted append (position 5)
        // accepting c1 again at t=500, after it expired by time but before the sweep deleted it.
        record(&mut txn, with, "ledger/a", "c1", &rec(100), None).unwrap();
        record(&mut txn, without, "ledger/a", "c1", &rec(100), None).unwrap();
        let mut journal = Journal::default();
        record(&mut txn, with, "ledger/a", "c1", &rec(500), Some(&mut journal)).unwrap();
        undo::record(&mut txn, undo_db, 0, 5, &journal).unwrap();
        // Both sweep what is older than 200; then a new leader makes `with` undo the append.
        expire(&mut txn, with, 200, 100).unwrap();
        expire(&mut txn, without, 200, 100).unwrap();
        undo::undo_after(&mut txn, undo_db, with, 0, 4).unwrap();
        // The old record is back with its expiry entry, so the next sweep deletes both.
        assert_eq!(expire(&mut txn, with, 200, 100).unwrap(), 1);
        let dump = |db: Database<Bytes, Bytes>| db.iter(&txn).unwrap().map(|e| e.unwrap().0.to_vec()).collect::<Vec<_>>();
        assert_eq!(dump(with), dump(without), "the undone replica holds what one that never had the append holds");
    }
}
