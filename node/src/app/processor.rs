//! Running one command: the one implementation shared by the node's processor (the log's writer
//! thread, `log/writer.rs`) and the spec runner ([`super::specs`]).
//!
//! [`execute`] looks the command id up, decides, evolves the events into state, lets the caller
//! place the events (the writer appends them to the log; specs count versions), and records the
//! command id — all inside the caller's LMDB write transaction. Its three ways out:
//! - `Ok(Ok(executed))`: accepted (or a duplicate, which wrote nothing);
//! - `Ok(Err(failure))`: rejected, or state unreadable while deciding; nothing was written, the
//!   transaction may go on with other commands;
//! - `Err(error)`: writing failed part way (evolve, placing, recording); the caller must abort the
//!   whole transaction.
//!
//! [`Routed`] erases the domain so the writer can hold commands of any domain in one queue.

use heed::RwTxn;
use heed::types::Bytes;
use serde_json::Value as Json;

use super::commands::{self, CommandRecord};
use super::{Context, Domain, Refusal, Rejection, RejectionKind, State, StateError, state};
use crate::log::NewEvent;
use crate::security::keys::DataKey;
use crate::storage::Journal;

/// What an accepted or repeated command did.
#[derive(Debug)]
pub enum Executed<E> {
    /// Decided and written now: its events and where they landed.
    Accepted { events: Vec<E>, record: CommandRecord },
    /// The id was seen before: the first result, nothing written.
    Duplicate(CommandRecord),
}

/// Why a command wrote nothing.
#[derive(Debug)]
pub enum Failure<E> {
    Rejected(E),
    /// The command id was accepted before for another command: refused, so a client bug that
    /// reuses an id is not mistaken for a retry (and silently dropped).
    IdReused,
    /// State could not be read while deciding.
    Unreadable(StateError),
}

/// A rejection with its domain erased: what the API reports.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejected {
    pub code: &'static str,
    pub kind: RejectionKind,
    pub message: String,
    /// The rejection's fields, e.g. `{"InsufficientFunds": {"available": 5, ...}}`.
    pub detail: Json,
}

impl Rejected {
    pub fn from_domain<E: Rejection>(error: &E) -> Self {
        Rejected {
            code: error.code(),
            kind: error.kind(),
            message: error.to_string(),
            detail: serde_json::to_value(error).unwrap_or(Json::Null),
        }
    }

    /// The rejection of a command id already used for another command.
    pub fn id_reused(command_id: &str) -> Self {
        Rejected {
            code: ID_REUSED,
            kind: RejectionKind::AlreadyExists,
            message: format!("command id {command_id} was already used on this book for another command; a new command needs a new id"),
            detail: serde_json::json!({ ID_REUSED: { "command_id": command_id } }),
        }
    }
}

/// Code of [`Rejected::id_reused`].
pub const ID_REUSED: &str = "CommandIdReused";

type Db = heed::Database<Bytes, Bytes>;

/// What [`execute`] returns: the outcome of the command, or (outer error) a failure that leaves
/// the transaction half-written.
pub type ExecuteResult<E, R> = Result<Result<Executed<E>, Failure<R>>, StateError>;

/// How the writer places a command's events (in their log form) and says where they landed.
pub type PlaceInLog<'p> = dyn FnMut(&mut RwTxn<'_>, Vec<NewEvent>) -> Result<CommandRecord, StateError> + 'p;

/// What a command comes to before anything is written: the first half of [`execute`].
#[derive(Debug)]
pub enum Decision<E, R> {
    /// Decided: its events, and the hash to record its id with (0: the id is not remembered).
    Decided { events: Vec<E>, command_hash: u64 },
    /// The id was seen before: the first result.
    Duplicate(CommandRecord),
    /// Rejected, the id reused for another command, or state unreadable.
    Failed(Failure<R>),
}

/// Looks the command id up and decides `command` on `scope` of domain `D`, in any state (`view`
/// over the whole state database, no subspace: LMDB in [`execute`], memory in the simulator).
/// Errs only when the command cannot be encoded to hash it.
pub fn decide<D: Domain>(
    view: &state::StateView<'_>,
    stream: &str,
    scope: &str,
    command: &D::Command,
    ctx: &Context<'_>,
) -> Result<Decision<D::Event, D::Error>, StateError> {
    let command_hash = if ctx.remember_id {
        let json = serde_json::to_vec(command).map_err(|e| StateError::Inconsistent(format!("cannot encode a command: {e}")))?;
        let hash = commands::command_hash(&json);
        match commands::lookup_in(view, stream, ctx.command_id, ctx.ids_since_us) {
            Ok(Some(record)) if record.command_hash == 0 || record.command_hash == hash => return Ok(Decision::Duplicate(record)),
            Ok(Some(_)) => return Ok(Decision::Failed(Failure::IdReused)),
            Ok(None) => {}
            Err(e) => return Ok(Decision::Failed(Failure::Unreadable(e))),
        }
        hash
    } else {
        0
    };
    let prefix = state::subspace(D::NAME, scope);
    Ok(match D::decide(&view.with_prefix(&prefix), command, ctx) {
        Ok(events) => Decision::Decided { events, command_hash },
        Err(Refusal::Rejected(e)) => Decision::Failed(Failure::Rejected(e)),
        Err(Refusal::State(e)) => Decision::Failed(Failure::Unreadable(e)),
    })
}

/// Runs `command` on `scope` of domain `D` inside `txn` (see the module doc for the outcomes).
/// `place` gets the transaction, the events once they are in state, and the command's hash when
/// its id is remembered (else 0), and says where the events landed; it is not called for a
/// rejection or a duplicate. `journal`, when given, notes what the command's state writes replace
/// (a replicated node, `storage/undo.rs`). `data_key`, when given, seals the state values written
/// and opens those read (encryption at rest).
#[allow(clippy::too_many_arguments)]
pub fn execute<D: Domain>(
    txn: &mut RwTxn<'_>,
    db: Db,
    stream: &str,
    scope: &str,
    command: &D::Command,
    ctx: &Context<'_>,
    mut journal: Option<&mut Journal>,
    data_key: Option<&DataKey>,
    place: impl FnOnce(&mut RwTxn<'_>, &[D::Event], u64) -> Result<CommandRecord, StateError>,
) -> ExecuteResult<D::Event, D::Error> {
    let decision = {
        let view_txn: &RwTxn<'_> = txn;
        decide::<D>(&state::StateView::new(view_txn, db, &[]).sealed(data_key), stream, scope, command, ctx)?
    };
    let (events, command_hash) = match decision {
        Decision::Decided { events, command_hash } => (events, command_hash),
        Decision::Duplicate(record) => return Ok(Ok(Executed::Duplicate(record))),
        Decision::Failed(failure) => return Ok(Err(failure)),
    };
    let prefix = state::subspace(D::NAME, scope);
    {
        let mut state = State::journaled(txn, db, &prefix, journal.as_deref_mut()).sealed(data_key);
        for event in &events {
            D::evolve(&mut state, event)?;
        }
    }
    let record = CommandRecord { command_hash, ..place(txn, &events, command_hash)? };
    if ctx.remember_id {
        commands::record(txn, db, stream, ctx.command_id, &record, journal)?;
    }
    Ok(Ok(Executed::Accepted { events, record }))
}

/// A command of some domain, routed to its scope and stream: what the writer queues.
pub trait Routed: Send + Sync {
    fn stream(&self) -> &str;
    fn command_id(&self) -> &str;
    /// A rough size for group-commit batching.
    fn size_bytes(&self) -> usize;
    /// [`execute`] with the events handed to `place` in their log form.
    /// Ids recorded before `ids_since_us` have expired. With `data_key` (the tenant's, encryption
    /// at rest) the events' payloads and metadata and the state values are sealed.
    #[allow(clippy::too_many_arguments)]
    fn execute(
        &self,
        txn: &mut RwTxn<'_>,
        db: Db,
        now_us: u64,
        ids_since_us: u64,
        journal: Option<&mut Journal>,
        data_key: Option<&DataKey>,
        place: &mut PlaceInLog<'_>,
    ) -> ExecuteResult<(), Rejected>;
}

/// A command of domain `D` for one scope.
pub struct Command<D: Domain> {
    pub scope: String,
    pub stream: String,
    pub command_id: String,
    /// The client chose `command_id` (see [`Context::remember_id`]).
    pub client_chose_id: bool,
    pub command: D::Command,
    size_bytes: usize,
}

impl<D: Domain> Command<D> {
    /// A command for `scope`; without a client-chosen id, the node makes one up (random, 128 bits).
    pub fn new(scope: String, command_id: Option<String>, command: D::Command) -> Self {
        let client_chose_id = command_id.is_some();
        let command_id = command_id.unwrap_or_else(|| format!("anthill-{:032x}", rand::random::<u128>()));
        let size_bytes = serde_json::to_vec(&command).map_or(256, |v| v.len()) + scope.len() + command_id.len();
        Command { stream: super::stream_of(D::NAME, &scope), scope, command_id, client_chose_id, command, size_bytes }
    }
}

impl<D: Domain> Routed for Command<D> {
    fn stream(&self) -> &str {
        &self.stream
    }

    fn command_id(&self) -> &str {
        &self.command_id
    }

    fn size_bytes(&self) -> usize {
        self.size_bytes
    }

    fn execute(
        &self,
        txn: &mut RwTxn<'_>,
        db: Db,
        now_us: u64,
        ids_since_us: u64,
        journal: Option<&mut Journal>,
        data_key: Option<&DataKey>,
        place: &mut PlaceInLog<'_>,
    ) -> ExecuteResult<(), Rejected> {
        let ctx = Context { now_us, command_id: &self.command_id, remember_id: self.client_chose_id, ids_since_us };
        let executed =
            execute::<D>(txn, db, &self.stream, &self.scope, &self.command, &ctx, journal, data_key, |txn, events, command_hash| {
                let mut events = events.iter().map(|e| super::to_new_event(e, &self.command_id)).collect::<Result<Vec<_>, _>>()?;
                // Followers record the id from the last event (app/follow.rs); metadata stays sorted.
                if let Some(last) = events.last_mut().filter(|_| command_hash != 0) {
                    last.metadata.insert(0, (super::COMMAND_HASH_METADATA_KEY.to_string(), command_hash.to_string()));
                }
                if let Some(data_key) = data_key {
                    events.iter_mut().for_each(|event| data_key.seal_event(&self.stream, event));
                }
                place(txn, events)
            })?;
        Ok(match executed {
            Ok(Executed::Accepted { record, .. }) => Ok(Executed::Accepted { events: Vec::new(), record }),
            Ok(Executed::Duplicate(record)) => Ok(Executed::Duplicate(record)),
            Err(Failure::Rejected(e)) => Err(Failure::Rejected(Rejected::from_domain(&e))),
            Err(Failure::IdReused) => Err(Failure::Rejected(Rejected::id_reused(&self.command_id))),
            Err(Failure::Unreadable(e)) => Err(Failure::Unreadable(e)),
        })
    }
}
