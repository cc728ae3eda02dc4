//! Domain state from stored events: what a follower does with the events its leader's processor
//! wrote, and what any replica does again when it truncates some of them.
//!
//! Every replica keeps the invariant *state = the domain's `evolve` over every event in its own
//! log, plus the command ids of the commands that wrote them*, inside the transaction that changes
//! the log:
//! - the leader's processor decides a command, evolves its events and records its id in the group
//!   commit that appends the events (`processor.rs`);
//! - a follower stores a batch of its leader's events and, in the same transaction, evolves each
//!   event of a domain stream into its scope's state ([`apply`]) and, on the last event of a
//!   command whose client chose its id, records that id ([`super::commands`]) from the event's
//!   metadata: the id ([`super::COMMAND_ID_METADATA_KEY`]) and the command's hash
//!   ([`COMMAND_HASH_METADATA_KEY`]), at the time the leader recorded it (the event's append time);
//! - a replica that truncates events of a scope forgets the scope's state and its command records
//!   and applies the scope's kept events again ([`reset_stream`] then [`apply`] for each, in the
//!   truncation's transaction, `storage/truncate.rs`).
//!
//! So a follower that becomes leader decides its first command against the state its log holds:
//! every committed event (recovery made its log hold them all) and no truncated one, and a retry of
//! a command the old leader accepted is answered as a duplicate.
//!
//! Left out: an accepted command that produced no events leaves no trace in the log, so followers
//! cannot record its id; a retry of it on a new leader is decided again (it changes nothing either
//! way unless the state moved meanwhile).

use heed::RwTxn;
use heed::types::Bytes;

use super::commands::{self, CommandRecord};
use super::state::subspace;
use super::{COMMAND_ID_METADATA_KEY, Domain, State, StateError, from_log_event, ledger};
use crate::storage::keys::Value;
use crate::storage::{Derived, EventRecord, Journal, StorageError};

/// Metadata key carrying the hash of the command (see [`commands::command_hash`]) on the last
/// event of a command whose client chose its id: what followers record the id with.
pub const COMMAND_HASH_METADATA_KEY: &str = "anthill.command_hash";

type Db = heed::Database<Bytes, Bytes>;

/// The domain and scope a stream's events belong to, if it is a domain's stream.
pub fn domain_scope(stream: &str) -> Option<(&str, &str)> {
    let (domain, scope) = stream.split_once('/')?;
    super::DOMAINS.contains(&domain).then_some((domain, scope))
}

/// A stored event of a domain's stream, read as that domain's event.
pub enum DomainEvent {
    Ledger(<ledger::Ledger as Domain>::Event),
}

/// `record` read as its domain's event: `None` for a stream that is no domain's, an error when
/// it does not read as one (state could not follow the log).
pub fn decode(record: &EventRecord) -> Result<Option<DomainEvent>, String> {
    let Some((domain, _)) = domain_scope(&record.stream) else { return Ok(None) };
    let unreadable = |e: String| format!("event {}@{} cannot be read as a {domain} event: {e}", record.stream, record.stream_version);
    match domain {
        ledger::Ledger::NAME => {
            from_log_event(&record.event_type, &record.payload).map(|e| Some(DomainEvent::Ledger(e))).map_err(unreadable)
        }
        other => Err(format!("no evolve for domain {other}")),
    }
}

/// Applies one stored event to state, as its leader's processor did when it wrote it (module
/// doc). `group_first` is the position of the first event of the event's append (a command's
/// events are one append). Events of streams that are not a domain's change nothing. Ids recorded
/// before `ids_since_us` have expired and are not recorded again.
pub fn apply(txn: &mut RwTxn<'_>, db: Db, record: &EventRecord, group_first: u64, ids_since_us: u64) -> Result<(), StateError> {
    let event = decode(record).map_err(StateError::Inconsistent)?;
    apply_decoded(txn, db, record, event.as_ref(), group_first, ids_since_us, None)
}

/// [`apply`] with the event already read by [`decode`] (`None`: of no domain's stream).
/// `journal`, when given, notes what each state write replaces (`storage/undo.rs`).
pub fn apply_decoded(
    txn: &mut RwTxn<'_>,
    db: Db,
    record: &EventRecord,
    event: Option<&DomainEvent>,
    group_first: u64,
    ids_since_us: u64,
    mut journal: Option<&mut Journal>,
) -> Result<(), StateError> {
    let Some(event) = event else { return Ok(()) };
    let Some((_, scope)) = domain_scope(&record.stream) else { return Ok(()) };
    match event {
        DomainEvent::Ledger(event) => evolve::<ledger::Ledger>(txn, db, scope, event, journal.as_deref_mut())?,
    }
    if record.atomic_with_next || record.append_time_us < ids_since_us {
        return Ok(());
    }
    let metadata = |key: &str| record.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str());
    let (Some(command_id), Some(hash)) = (metadata(COMMAND_ID_METADATA_KEY), metadata(COMMAND_HASH_METADATA_KEY)) else {
        return Ok(());
    };
    let command_hash = hash.parse::<u64>().map_err(|_| {
        StateError::Inconsistent(format!("event at position {} has a command hash that is not a number: {hash:?}", record.position))
    })?;
    let recorded = CommandRecord {
        partition: record.partition,
        first_position: group_first,
        last_position: record.position,
        stream_version: record.stream_version,
        events: (record.position + 1 - group_first) as u32,
        recorded_at_us: record.append_time_us,
        command_hash,
    };
    commands::record(txn, db, &record.stream, command_id, &recorded, journal)
}

fn evolve<D: Domain>(txn: &mut RwTxn<'_>, db: Db, scope: &str, event: &D::Event, journal: Option<&mut Journal>) -> Result<(), StateError> {
    let prefix = subspace(D::NAME, scope);
    D::evolve(&mut State::journaled(txn, db, &prefix, journal), event)
}

/// Forgets everything `stream`'s events put into state: its scope's subspace and its command
/// records. The caller then applies the events it keeps again.
pub fn reset_stream(txn: &mut RwTxn<'_>, db: Db, stream: &str) -> Result<(), StateError> {
    let Some((domain, scope)) = domain_scope(stream) else { return Ok(()) };
    let prefix = subspace(domain, scope);
    let mut keys = Vec::new();
    for entry in db.prefix_iter(txn, &prefix)? {
        keys.push(entry?.0.to_vec());
    }
    for key in keys {
        db.delete(txn, &key)?;
    }
    commands::forget_stream(txn, db, stream)
}

/// The domains' state as [`Derived`] from the log, for truncations. Ids recorded before
/// `ids_since_us` have expired and are not recorded again.
pub struct DomainState {
    pub ids_since_us: u64,
}

impl Derived for DomainState {
    fn derives(&self, stream: &str) -> bool {
        domain_scope(stream).is_some()
    }
    fn reset(&self, txn: &mut RwTxn<'_>, state: Db, stream: &str) -> Result<(), StorageError> {
        Ok(reset_stream(txn, state, stream)?)
    }
    fn apply(&self, txn: &mut RwTxn<'_>, state: Db, record: &EventRecord, group_first: u64) -> Result<(), StorageError> {
        Ok(apply(txn, state, record, group_first, self.ids_since_us)?)
    }
    fn stream_of_key(&self, key: &[u8]) -> Option<String> {
        let elems = crate::storage::keys::unpack(key).ok()?;
        match elems.as_slice() {
            [Value::Str(kind), Value::Str(stream), ..] if commands::is_record_key(kind) => Some(stream.clone()),
            [Value::Str(kind), Value::U64(_), Value::Str(stream), ..] if commands::is_expiry_key(kind) => Some(stream.clone()),
            [Value::Str(domain), Value::Str(scope), ..] if super::DOMAINS.contains(&domain.as_str()) => {
                Some(super::stream_of(domain, scope))
            }
            _ => None,
        }
    }
}
