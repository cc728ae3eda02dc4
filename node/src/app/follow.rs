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
//! With encryption at rest a book's events and state are sealed with its tenant's data key: a
//! follower opens each event to read it ([`decode`]) and seals the state it writes; an event of
//! a forgotten tenant is skipped, one it cannot open yet is refused (its batch comes again).
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
use crate::security::keys::{DataKey, Keys, OpenError, SEALED_KEY};
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

/// A domain's stored event, opened and read: what [`apply_decoded`] evolves into state.
pub struct Decoded {
    pub event: DomainEvent,
    /// The event's metadata, opened when it was sealed.
    pub metadata: Vec<(String, String)>,
    /// The tenant's data key, which seals the state the event changes: `None` without
    /// encryption, or while this node's key table holds no key for the tenant (its events so
    /// far were written in clear).
    pub data_key: Option<DataKey>,
}

/// `record` read as its domain's event, opened with its tenant's key when it was sealed
/// (`keys`: the node's, with encryption on). `None` for a stream that is no domain's, and for a
/// forgotten tenant's event (its books take nothing more, so their state need not follow);
/// an error when it does not read as one, or cannot be opened now (state could not follow
/// the log: the caller refuses the event and tries again later).
pub fn decode(record: &EventRecord, keys: Option<&Keys>) -> Result<Option<Decoded>, String> {
    let Some((domain, _)) = domain_scope(&record.stream) else { return Ok(None) };
    let unreadable = |e: String| format!("event {}@{} cannot be read as a {domain} event: {e}", record.stream, record.stream_version);
    let (opened, data_key);
    let record = match keys {
        None if record.metadata.iter().any(|(k, _)| k == SEALED_KEY) => {
            return Err(unreadable(
                "it is sealed with its tenant's data key, and encryption is off on this node (every member needs the same encryption settings)".into(),
            ));
        }
        None => {
            data_key = None;
            record
        }
        Some(keys) => {
            opened = match keys.open_event(record.clone()) {
                Ok(opened) => opened,
                Err(OpenError::Forgotten(_)) => return Ok(None),
                Err(e) => return Err(unreadable(e.to_string())),
            };
            data_key = match keys.data_key(crate::security::auth::tenant_of(&record.stream)) {
                Ok(key) => Some(key),
                Err(OpenError::NotYet(_)) => None,
                Err(OpenError::Forgotten(_)) => return Ok(None),
                Err(e) => return Err(unreadable(e.to_string())),
            };
            &opened
        }
    };
    let event = match domain {
        ledger::Ledger::NAME => from_log_event(&record.event_type, &record.payload).map(DomainEvent::Ledger).map_err(unreadable)?,
        other => return Err(format!("no evolve for domain {other}")),
    };
    Ok(Some(Decoded { event, metadata: record.metadata.clone(), data_key }))
}

/// Applies one stored event to state, as its leader's processor did when it wrote it (module
/// doc). `group_first` is the position of the first event of the event's append (a command's
/// events are one append). Events of streams that are not a domain's change nothing. Ids recorded
/// before `ids_since_us` have expired and are not recorded again.
pub fn apply(
    txn: &mut RwTxn<'_>,
    db: Db,
    record: &EventRecord,
    group_first: u64,
    ids_since_us: u64,
    keys: Option<&Keys>,
) -> Result<(), StateError> {
    let decoded = decode(record, keys).map_err(StateError::Inconsistent)?;
    apply_decoded(txn, db, record, decoded.as_ref(), group_first, ids_since_us, None)
}

/// [`apply`] with the event already read by [`decode`] (`None`: of no domain's stream, or of a
/// forgotten tenant). `journal`, when given, notes what each state write replaces
/// (`storage/undo.rs`).
pub fn apply_decoded(
    txn: &mut RwTxn<'_>,
    db: Db,
    record: &EventRecord,
    decoded: Option<&Decoded>,
    group_first: u64,
    ids_since_us: u64,
    mut journal: Option<&mut Journal>,
) -> Result<(), StateError> {
    let Some(decoded) = decoded else { return Ok(()) };
    let Some((_, scope)) = domain_scope(&record.stream) else { return Ok(()) };
    match &decoded.event {
        DomainEvent::Ledger(event) => evolve::<ledger::Ledger>(txn, db, scope, event, journal.as_deref_mut(), decoded.data_key.as_ref())?,
    }
    if record.atomic_with_next || record.append_time_us < ids_since_us {
        return Ok(());
    }
    let metadata = |key: &str| decoded.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str());
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

fn evolve<D: Domain>(
    txn: &mut RwTxn<'_>,
    db: Db,
    scope: &str,
    event: &D::Event,
    journal: Option<&mut Journal>,
    data_key: Option<&DataKey>,
) -> Result<(), StateError> {
    let prefix = subspace(D::NAME, scope);
    D::evolve(&mut State::journaled(txn, db, &prefix, journal).sealed(data_key), event)
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
/// `ids_since_us` have expired and are not recorded again. `keys`: the node's, with encryption on.
pub struct DomainState<'k> {
    pub ids_since_us: u64,
    pub keys: Option<&'k Keys>,
}

impl Derived for DomainState<'_> {
    fn derives(&self, stream: &str) -> bool {
        domain_scope(stream).is_some()
    }
    fn reset(&self, txn: &mut RwTxn<'_>, state: Db, stream: &str) -> Result<(), StorageError> {
        Ok(reset_stream(txn, state, stream)?)
    }
    fn apply(&self, txn: &mut RwTxn<'_>, state: Db, record: &EventRecord, group_first: u64) -> Result<(), StorageError> {
        Ok(apply(txn, state, record, group_first, self.ids_since_us, self.keys)?)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::security::keys::Kek;
    use crate::security::keys::tests::record;

    #[tokio::test]
    async fn given_a_sealed_book_event_then_a_follower_opens_it_with_the_key_refuses_it_without_and_skips_it_once_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let keys = Keys::in_file(dir.path().join("keys.json"), vec![Kek::from_hex(&"05".repeat(32)).unwrap()]).unwrap();
        let deposited = ledger::LedgerEvent::Deposited { account: "till".into(), amount: 7 };
        let mut event = super::super::to_new_event(&deposited, "in-1").unwrap();
        keys.data_key_for_write("acme").await.unwrap().seal_event("ledger/acme:shop", &mut event);
        let sealed = record("ledger/acme:shop", event);

        let Some(Decoded { event: DomainEvent::Ledger(read), metadata, data_key }) = decode(&sealed, Some(&keys)).unwrap() else {
            panic!("not read as a ledger event")
        };
        assert_eq!(read, deposited);
        assert_eq!(metadata, vec![(COMMAND_ID_METADATA_KEY.to_string(), "in-1".to_string())], "the metadata, opened");
        assert!(data_key.is_some(), "the state it changes is sealed too");
        let without = decode(&sealed, None).err().unwrap();
        assert!(without.contains("encryption is off on this node"), "{without}");
        // Another tenant's key table (a node that has not heard of acme's key yet): retried later.
        let elsewhere = Keys::in_file(dir.path().join("other.json"), vec![Kek::from_hex(&"05".repeat(32)).unwrap()]).unwrap();
        assert!(decode(&sealed, Some(&elsewhere)).err().unwrap().contains("not reached this node"));
        // A stream that is no domain's is not read at all.
        assert!(
            decode(&record("acme/orders", crate::log::NewEvent { event_type: "x".into(), payload: vec![], metadata: vec![] }), Some(&keys))
                .unwrap()
                .is_none()
        );

        keys.forget("acme").await.unwrap();
        assert!(decode(&sealed, Some(&keys)).unwrap().is_none(), "a forgotten tenant's book follows no more");
    }
}
