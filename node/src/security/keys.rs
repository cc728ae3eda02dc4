//! Encryption at rest per tenant, and forgetting a tenant for good (crypto-shredding).
//!
//! - Each tenant has a data key (DEK, 256 bits, made at its first write). Event payloads and
//!   metadata are sealed with it (AES-256-GCM, a random 96-bit nonce per value, the stream id and
//!   event type as associated data, so a sealed value cannot be moved to another stream) before
//!   the event is appended: the log, its replicas and every backup hold only ciphertext, and
//!   replication ships ciphertext. Stream ids, event types, positions and times stay in clear
//!   (they are index keys).
//! - DEKs are kept wrapped (sealed) by the key-encryption key (KEK) in a [`Replicated`] table
//!   (`{prefix}keys/table` in the coordination store, or `data_dir/keys.json`): every node can
//!   open every tenant's events where it needs the plaintext (answering a read) and nowhere else.
//!   The KEK comes from a key file (`encryption.key_file`, [`Kek`]); a KMS would be another
//!   [`KeyProvider`] (docs/security.md, "Key provider").
//! - Forgetting a tenant removes its wrapped DEK from the table and drops it from every node's
//!   memory as the table change reaches it; its events stay in the log (positions stay dense,
//!   replication is unaffected), and reading them answers "tenant forgotten".
//! - Rotating the KEK re-wraps the DEKs ([`Keys::rewrap`]); the log is not rewritten.
//! - The ledger's books are sealed by the log's writer thread with a [`DataKey`] (events as a
//!   client's, state values with [`DataKey::seal_value`]); followers open them to keep their read
//!   models (`app/follow.rs`).
//!
//! A sealed event carries the metadata entry `anthill-enc` = `1:<dek id>[:<sealed metadata,
//! hex>]`; its payload is nonce ‖ ciphertext ‖ tag.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tonic::Status;

use super::auth::tenant_of;
use super::table::Replicated;
use crate::coordination::member::Coordination;
use crate::log::NewEvent;
use crate::storage::EventRecord;

/// The metadata key that marks a sealed event.
pub const SEALED_KEY: &str = "anthill-enc";
/// The metadata key a forgotten tenant's events carry in partition reads and subscriptions.
pub const FORGOTTEN_KEY: &str = "anthill-forgotten";
const FORMAT: &str = "1";

/// A key-encryption key and its id (the first 8 bytes of its SHA-256, in hex).
pub struct Kek {
    pub id: String,
    key: LessSafeKey,
}

impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key itself.
        write!(f, "Kek({})", self.id)
    }
}

impl Kek {
    /// Reads a key file: 64 hex digits (32 bytes), whitespace around them ignored.
    pub fn from_file(path: &Path) -> Result<Kek, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Kek::from_hex(text.trim()).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn from_hex(text: &str) -> Result<Kek, String> {
        let bytes = from_hex(text)
            .filter(|b| b.len() == 32)
            .ok_or("a key file holds 64 hex digits (a 256-bit key), e.g. from `openssl rand -hex 32`")?;
        let digest = ring::digest::digest(&ring::digest::SHA256, &bytes);
        let id = to_hex(&digest.as_ref()[..8]);
        Ok(Kek { id, key: aes_key(&bytes) })
    }
}

/// Where a key-encryption key lives: what wraps and unwraps tenants' 32-byte data keys, and
/// the id stored beside each data key it wrapped (which picks the provider that unwraps it).
/// [`Kek`] is the key-file provider. A KMS provider (AWS KMS, Google Cloud KMS, Vault's transit
/// engine) makes the same two calls over the network with a key that never leaves the KMS; a
/// node unwraps a tenant's data key once and keeps it in memory, so the KMS is called at a
/// tenant's first write or read after a start, at a new tenant's first write, and by
/// `anthill tenant rewrap-keys` (docs/security.md, "Key provider"). Both calls block the
/// calling thread: a network provider must bound its time and answer with an error, never hang.
pub trait KeyProvider: Send + Sync + std::fmt::Debug {
    fn id(&self) -> &str;
    /// `dek` sealed under this key, `aad` bound to it.
    fn wrap(&self, aad: &[u8], dek: &[u8]) -> Result<Vec<u8>, ProviderError>;
    /// What [`KeyProvider::wrap`] sealed with the same `aad`.
    fn unwrap(&self, aad: &[u8], wrapped: &[u8]) -> Result<Vec<u8>, ProviderError>;
}

/// Why a [`KeyProvider`] call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProviderError {
    /// The provider could not be asked now (a KMS not reached in time): the caller may retry.
    #[error("{0}")]
    Unavailable(String),
    /// It answered no: the wrapped key does not open with this key (another key, changed bytes).
    #[error("{0}")]
    Refused(String),
}

impl KeyProvider for Kek {
    fn id(&self) -> &str {
        &self.id
    }

    fn wrap(&self, aad: &[u8], dek: &[u8]) -> Result<Vec<u8>, ProviderError> {
        Ok(seal(&self.key, aad, dek))
    }

    fn unwrap(&self, aad: &[u8], wrapped: &[u8]) -> Result<Vec<u8>, ProviderError> {
        open(&self.key, aad, wrapped).ok_or_else(|| ProviderError::Refused("it does not open (another key, or changed)".into()))
    }
}

impl From<Kek> for Arc<dyn KeyProvider> {
    fn from(kek: Kek) -> Self {
        Arc::new(kek)
    }
}

fn aes_key(bytes: &[u8]) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, bytes).expect("a 32-byte key"))
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn from_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok()).collect()
}

fn random<const N: usize>() -> [u8; N] {
    let mut buf = [0u8; N];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut buf).expect("the system's random source works");
    buf
}

/// Seals `plaintext`: nonce ‖ ciphertext ‖ tag.
fn seal(key: &LessSafeKey, aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
    let nonce = random::<NONCE_LEN>();
    let mut out = Vec::with_capacity(NONCE_LEN + plaintext.len() + AES_256_GCM.tag_len());
    out.extend_from_slice(&nonce);
    let mut body = plaintext.to_vec();
    key.seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), &mut body)
        .expect("sealing cannot fail for these sizes");
    out.extend_from_slice(&body);
    out
}

fn open(key: &LessSafeKey, aad: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
    if sealed.len() < NONCE_LEN {
        return None;
    }
    let (nonce, body) = sealed.split_at(NONCE_LEN);
    let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
    let mut body = body.to_vec();
    let plain = key.open_in_place(nonce, Aad::from(aad), &mut body).ok()?.len();
    body.truncate(plain);
    Some(body)
}

/// One tenant's entry of the table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantKey {
    /// Names the DEK in sealed events (random, not secret).
    pub dek_id: String,
    /// The KEK that wrapped it; empty once forgotten.
    pub kek_id: String,
    /// The DEK sealed by that KEK, in hex; empty once forgotten.
    pub wrapped: String,
    pub created_unix_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forgotten_unix_ms: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyTable {
    #[serde(default)]
    pub tenants: BTreeMap<String, TenantKey>,
}

/// Why an event cannot be opened.
#[derive(Debug, Clone, thiserror::Error)]
pub enum OpenError {
    #[error("tenant {0:?} was forgotten: its events can never be read again")]
    Forgotten(String),
    /// This node's copy of the key table does not hold the tenant's key yet (it was made on
    /// another node a moment ago): retry.
    #[error("tenant {0:?}'s data key has not reached this node yet; try again")]
    NotYet(String),
    /// The key provider could not be asked now (a KMS not reached): retry.
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Failed(String),
}

/// Most tenants the key table holds (it is one value in the store, read whole by every node).
pub const MAX_TENANTS: usize = 1_000;

impl OpenError {
    pub fn status(&self) -> Status {
        match self {
            OpenError::Forgotten(_) => Status::failed_precondition(self.to_string()),
            OpenError::NotYet(_) | OpenError::Unavailable(_) => Status::unavailable(self.to_string()),
            OpenError::Failed(_) => Status::internal(self.to_string()),
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// The first byte of a sealed state value (JSON, how values are kept in clear, never starts
/// with it).
pub const SEALED_VALUE: u8 = 1;

/// One tenant's data key, unwrapped: what seals and opens its values where nothing may wait
/// (the log's writer thread, which writes a ledger book's events and state).
#[derive(Clone)]
pub struct DataKey {
    dek_id: String,
    key: Arc<LessSafeKey>,
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key itself.
        write!(f, "DataKey({})", self.dek_id)
    }
}

impl DataKey {
    /// Seals the payload and metadata of `event`, appended to `stream` (the module doc's form).
    pub fn seal_event(&self, stream: &str, event: &mut NewEvent) {
        event.payload = seal(&self.key, &aad(stream, &event.event_type, "payload"), &event.payload);
        let mut marker = format!("{FORMAT}:{}", self.dek_id);
        if !event.metadata.is_empty() {
            let metadata = serde_json::to_vec(&event.metadata).expect("pairs of strings serialize");
            marker.push(':');
            marker.push_str(&to_hex(&seal(&self.key, &aad(stream, &event.event_type, "metadata"), &metadata)));
        }
        event.metadata = vec![(SEALED_KEY.to_string(), marker)];
    }

    /// Seals a state value kept under `key`: [`SEALED_VALUE`] ‖ nonce ‖ ciphertext ‖ tag, with
    /// the key as associated data (a value copied under another key does not open).
    pub fn seal_value(&self, key: &[u8], value: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 + NONCE_LEN + value.len() + AES_256_GCM.tag_len());
        out.push(SEALED_VALUE);
        out.extend_from_slice(&seal(&self.key, &value_aad(key), value));
        out
    }

    /// A value [`DataKey::seal_value`] sealed under `key`, opened; `None` when it does not open.
    pub fn open_value(&self, key: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
        let (&SEALED_VALUE, body) = sealed.split_first()? else { return None };
        open(&self.key, &value_aad(key), body)
    }
}

/// The associated data of a state value: the key it is kept under, marked as such.
fn value_aad(key: &[u8]) -> Vec<u8> {
    let mut out = b"anthill state value\0".to_vec();
    out.extend_from_slice(key);
    out
}

/// Unwrapped DEKs by (tenant, DEK id).
type DekCache = HashMap<(String, String), Arc<LessSafeKey>>;

/// The node's keys: its KEKs (current first) and the tenants' table.
#[derive(Clone)]
pub struct Keys {
    table: Replicated<KeyTable>,
    keks: Arc<Vec<Arc<dyn KeyProvider>>>,
    /// Unwrapped DEKs by (tenant, DEK id); an entry is used only while the table still holds
    /// that DEK for the tenant, so a forgotten tenant's key is gone from use at once.
    cache: Arc<Mutex<DekCache>>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys").field("keks", &self.keks).field("tenants", &self.table.get().tenants.len()).finish()
    }
}

impl Keys {
    /// `keks`: the current KEK, then previous ones (still able to unwrap during a rotation).
    pub fn in_file(path: PathBuf, keks: impl IntoIterator<Item = impl Into<Arc<dyn KeyProvider>>>) -> anyhow::Result<Keys> {
        Ok(Keys::new(Replicated::in_file(path, "key table")?, keks))
    }

    pub fn in_store(
        coordination: Coordination,
        key: String,
        keks: impl IntoIterator<Item = impl Into<Arc<dyn KeyProvider>>>,
        stopped: watch::Receiver<bool>,
    ) -> Keys {
        Keys::new(Replicated::in_store(coordination, key, "key table", stopped), keks)
    }

    fn new(table: Replicated<KeyTable>, keks: impl IntoIterator<Item = impl Into<Arc<dyn KeyProvider>>>) -> Keys {
        let keks: Vec<Arc<dyn KeyProvider>> = keks.into_iter().map(Into::into).collect();
        assert!(!keks.is_empty(), "at least the current KEK");
        Keys { table, keks: Arc::new(keks), cache: Arc::default() }
    }

    /// The DEK `entry` holds, unwrapped with whichever KEK wrapped it.
    fn unwrap_dek(&self, tenant: &str, entry: &TenantKey) -> Result<Arc<LessSafeKey>, OpenError> {
        if entry.forgotten_unix_ms.is_some() {
            // Gone from this node's memory too, not only from use.
            self.cache.lock().retain(|(t, _), _| t != tenant);
            return Err(OpenError::Forgotten(tenant.to_string()));
        }
        let cache_key = (tenant.to_string(), entry.dek_id.clone());
        if let Some(key) = self.cache.lock().get(&cache_key) {
            return Ok(key.clone());
        }
        let kek = self.keks.iter().find(|k| k.id() == entry.kek_id).ok_or_else(|| {
            OpenError::Failed(format!(
                "tenant {tenant:?}'s data key is wrapped by key {}, which is not among this node's keys (encryption.key_file, previous_key_files)",
                entry.kek_id
            ))
        })?;
        let wrapped = from_hex(&entry.wrapped).unwrap_or_default();
        let dek = kek.unwrap(&wrap_aad(tenant, &entry.dek_id), &wrapped).map_err(|e| match e {
            ProviderError::Unavailable(why) => OpenError::Unavailable(format!(
                "tenant {tenant:?}'s data key cannot be unwrapped now: key {} is not reachable: {why}",
                kek.id()
            )),
            ProviderError::Refused(why) => {
                OpenError::Failed(format!("tenant {tenant:?}'s wrapped data key does not open with key {}: {why}", kek.id()))
            }
        })?;
        if dek.len() != 32 {
            return Err(OpenError::Failed(format!(
                "tenant {tenant:?}'s data key unwrapped by key {} holds {} bytes, not 32",
                kek.id(),
                dek.len()
            )));
        }
        let key = Arc::new(aes_key(&dek));
        self.cache.lock().insert(cache_key, key.clone());
        Ok(key)
    }

    /// The tenant's DEK for a write, made (and stored wrapped) at its first write.
    pub async fn data_key_for_write(&self, tenant: &str) -> Result<DataKey, Status> {
        // Only a tenant that can be named can be forgotten.
        super::auth::check_tenant(tenant).map_err(|e| Status::invalid_argument(format!("stream: with encryption on, {e}")))?;
        if let Some(entry) = self.table.get().tenants.get(tenant) {
            return self.unwrap_dek(tenant, entry).map(|key| DataKey { dek_id: entry.dek_id.clone(), key }).map_err(|e| e.status());
        }
        let dek = random::<32>();
        let dek_id = to_hex(&random::<8>());
        let kek = &self.keks[0];
        let wrapped = kek
            .wrap(&wrap_aad(tenant, &dek_id), &dek)
            .map_err(|e| provider_status(&e, format!("cannot wrap tenant {tenant:?}'s new data key with key {}", kek.id())))?;
        let made = TenantKey {
            dek_id: dek_id.clone(),
            kek_id: kek.id().to_string(),
            wrapped: to_hex(&wrapped),
            created_unix_ms: now_ms(),
            forgotten_unix_ms: None,
        };
        // Whoever stores a key first wins; the others use that one.
        let stored = self
            .table
            .update(|table| {
                if !table.tenants.contains_key(tenant) && table.tenants.len() >= MAX_TENANTS {
                    return Err(Status::resource_exhausted(format!("the key table holds {MAX_TENANTS} tenants, its limit")));
                }
                let entry = table.tenants.entry(tenant.to_string()).or_insert_with(|| made.clone());
                Ok(entry.clone())
            })
            .await?;
        self.unwrap_dek(tenant, &stored).map(|key| DataKey { dek_id: stored.dek_id.clone(), key }).map_err(|e| e.status())
    }

    /// The tenant's DEK as this node's table holds it now, without waiting (the log's writer
    /// thread): `NotYet` when the table holds none for it.
    pub fn data_key(&self, tenant: &str) -> Result<DataKey, OpenError> {
        let table = self.table.get();
        let entry = table.tenants.get(tenant).ok_or_else(|| OpenError::NotYet(tenant.to_string()))?;
        self.unwrap_dek(tenant, entry).map(|key| DataKey { dek_id: entry.dek_id.clone(), key })
    }

    /// Seals the payload and metadata of `events`, appended to `stream`.
    pub async fn seal_events(&self, stream: &str, events: &mut [NewEvent]) -> Result<(), Status> {
        let key = self.data_key_for_write(tenant_of(stream)).await?;
        for event in events {
            key.seal_event(stream, event);
        }
        Ok(())
    }

    /// The event with its payload and metadata opened (an event that was not sealed is
    /// returned as it is).
    pub fn open_event(&self, mut event: EventRecord) -> Result<EventRecord, OpenError> {
        let tenant = tenant_of(&event.stream).to_string();
        let table = self.table.get();
        let entry = table.tenants.get(&tenant);
        // A forgotten tenant's events are refused sealed or not (the ledger's, ones written
        // before encryption was on).
        if entry.is_some_and(|e| e.forgotten_unix_ms.is_some()) {
            return Err(OpenError::Forgotten(tenant));
        }
        let Some(marker) = event.metadata.iter().find(|(k, _)| k == SEALED_KEY).map(|(_, v)| v.clone()) else { return Ok(event) };
        let mut parts = marker.splitn(3, ':');
        let (Some(FORMAT), Some(dek_id)) = (parts.next(), parts.next()) else {
            return Err(OpenError::Failed(format!("event {} of {}: unknown sealing {marker:?}", event.position, event.stream)));
        };
        let entry = entry.ok_or_else(|| OpenError::NotYet(tenant.clone()))?;
        let key = self.unwrap_dek(&tenant, entry)?;
        if entry.dek_id != dek_id {
            return Err(OpenError::Failed(format!(
                "event {} of {}: sealed with data key {dek_id}, the tenant's is {}",
                event.position, event.stream, entry.dek_id
            )));
        }
        let broken = || {
            OpenError::Failed(format!(
                "event {} of {} does not open: changed on disk, or sealed for another stream",
                event.position, event.stream
            ))
        };
        event.payload = open(&key, &aad(&event.stream, &event.event_type, "payload"), &event.payload).ok_or_else(broken)?;
        event.metadata = match parts.next() {
            None => Vec::new(),
            Some(sealed) => {
                let sealed = from_hex(sealed).ok_or_else(broken)?;
                let plain = open(&key, &aad(&event.stream, &event.event_type, "metadata"), &sealed).ok_or_else(broken)?;
                serde_json::from_slice(&plain).map_err(|_| broken())?
            }
        };
        Ok(event)
    }

    /// Like [`Keys::open_event`], but a forgotten tenant's event comes back without its payload
    /// and metadata, marked `anthill-forgotten` (partition reads and subscriptions, which hold
    /// every tenant's events and must keep their positions).
    pub fn open_or_redact(&self, event: EventRecord) -> Result<EventRecord, OpenError> {
        match self.open_event(event.clone()) {
            Err(OpenError::Forgotten(tenant)) => {
                Ok(EventRecord { payload: Vec::new(), metadata: vec![(FORGOTTEN_KEY.to_string(), tenant)], ..event })
            }
            other => other,
        }
    }

    /// Forgets `tenant`: its wrapped DEK leaves the table, on every node as the change reaches
    /// it. Whether it had a key.
    pub async fn forget(&self, tenant: &str) -> Result<bool, Status> {
        let forgotten = self
            .table
            .update(|table| {
                let entry = table.tenants.entry(tenant.to_string()).or_insert_with(|| TenantKey {
                    dek_id: String::new(),
                    kek_id: String::new(),
                    wrapped: String::new(),
                    created_unix_ms: now_ms(),
                    forgotten_unix_ms: None,
                });
                let had = !entry.wrapped.is_empty();
                entry.kek_id.clear();
                entry.wrapped.clear();
                entry.forgotten_unix_ms.get_or_insert_with(now_ms);
                Ok(had)
            })
            .await?;
        self.cache.lock().retain(|(t, _), _| t != tenant);
        Ok(forgotten)
    }

    /// Re-wraps every DEK not wrapped by the current KEK (after a KEK rotation), working on the
    /// store's table as it is (not this node's copy); how many. Fails, changing nothing, when a
    /// key is wrapped by a KEK this node does not have.
    pub async fn rewrap(&self) -> Result<usize, Status> {
        let current = &self.keks[0];
        self.table
            .update(|table| {
                let mut count = 0;
                for (tenant, entry) in table.tenants.iter_mut() {
                    if entry.forgotten_unix_ms.is_some() || entry.kek_id == current.id() {
                        continue;
                    }
                    let kek = self.keks.iter().find(|k| k.id() == entry.kek_id).ok_or_else(|| {
                        Status::failed_precondition(format!(
                            "tenant {tenant:?}'s data key is wrapped by key {}, which this node does not have (previous_key_files)",
                            entry.kek_id
                        ))
                    })?;
                    let aad = wrap_aad(tenant, &entry.dek_id);
                    let dek = kek
                        .unwrap(&aad, &from_hex(&entry.wrapped).unwrap_or_default())
                        .map_err(|e| provider_status(&e, format!("tenant {tenant:?}'s data key does not open with key {}", kek.id())))?;
                    let wrapped = current
                        .wrap(&aad, &dek)
                        .map_err(|e| provider_status(&e, format!("cannot wrap tenant {tenant:?}'s data key with key {}", current.id())))?;
                    entry.wrapped = to_hex(&wrapped);
                    entry.kek_id = current.id().to_string();
                    count += 1;
                }
                Ok(count)
            })
            .await
    }

    /// Whether `tenant` was forgotten (its commands are refused too).
    pub fn is_forgotten(&self, tenant: &str) -> bool {
        self.table.get().tenants.get(tenant).is_some_and(|e| e.forgotten_unix_ms.is_some())
    }

    pub fn table(&self) -> Arc<KeyTable> {
        self.table.get()
    }
}

/// The status of a key provider's failure to do `what`: UNAVAILABLE when it may work later.
fn provider_status(error: &ProviderError, what: String) -> Status {
    match error {
        ProviderError::Unavailable(why) => Status::unavailable(format!("{what}: the key provider is not reachable: {why}")),
        ProviderError::Refused(why) => Status::internal(format!("{what}: {why}")),
    }
}

/// The associated data of an event's sealed `part` (`payload` or `metadata`): each field
/// length-prefixed, so no two (stream, type, part) triples give the same bytes.
fn aad(stream: &str, event_type: &str, part: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(stream.len() + event_type.len() + part.len() + 12);
    for field in [stream, event_type, part] {
        out.extend_from_slice(&(field.len() as u32).to_be_bytes());
        out.extend_from_slice(field.as_bytes());
    }
    out
}

/// The associated data of a wrapped data key: its tenant and id (a wrapped key copied into
/// another tenant's entry does not open).
fn wrap_aad(tenant: &str, dek_id: &str) -> Vec<u8> {
    aad(tenant, dek_id, "data key")
}

/// Refuses client metadata under the `anthill-` prefix, which marks sealed and redacted
/// events.
pub fn check_metadata_keys(metadata: &[(String, String)]) -> Result<(), String> {
    match metadata.iter().find(|(k, _)| k.starts_with("anthill-")) {
        Some((k, _)) => Err(format!("metadata: key {k:?}: keys starting with \"anthill-\" are reserved")),
        None => Ok(()),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn kek(byte: u8) -> Kek {
        Kek::from_hex(&format!("{byte:02x}").repeat(32)).unwrap()
    }

    /// `event` as stored at position 1 of `stream`.
    pub(crate) fn record(stream: &str, event: NewEvent) -> EventRecord {
        EventRecord {
            partition: 0,
            position: 1,
            stream: stream.into(),
            stream_version: 1,
            event_type: event.event_type,
            payload: event.payload,
            metadata: event.metadata,
            append_time_us: 0,
            epoch: 1,
            atomic_with_next: false,
        }
    }

    fn event(payload: &str) -> NewEvent {
        NewEvent { event_type: "Placed".into(), payload: payload.as_bytes().to_vec(), metadata: vec![("trace".into(), "t-1".into())] }
    }

    #[tokio::test]
    async fn given_a_sealed_event_then_it_holds_no_plaintext_opens_back_and_not_under_another_stream() {
        let dir = tempfile::tempdir().unwrap();
        let keys = Keys::in_file(dir.path().join("keys.json"), vec![kek(1)]).unwrap();
        let mut events = vec![event("SECRET-MARKER")];
        keys.seal_events("acme/orders-1", &mut events).await.unwrap();
        let sealed = &events[0];
        assert!(!sealed.payload.windows(13).any(|w| w == b"SECRET-MARKER"));
        assert_eq!(sealed.metadata.len(), 1);
        assert!(!sealed.metadata[0].1.contains("t-1"));
        let opened = keys.open_event(record("acme/orders-1", sealed.clone())).unwrap();
        assert_eq!(
            (opened.payload.as_slice(), opened.metadata),
            (b"SECRET-MARKER".as_slice(), vec![("trace".to_string(), "t-1".to_string())])
        );
        // The same bytes under another stream of the tenant do not open.
        assert!(matches!(keys.open_event(record("acme/orders-2", sealed.clone())), Err(OpenError::Failed(_))));
        // Only the wrapped key is stored.
        let stored = std::fs::read_to_string(dir.path().join("keys.json")).unwrap();
        assert!(stored.contains("acme") && stored.contains("wrapped"));
    }

    #[tokio::test]
    async fn given_a_forgotten_tenant_then_its_events_never_open_and_others_still_do() {
        let dir = tempfile::tempdir().unwrap();
        let keys = Keys::in_file(dir.path().join("keys.json"), vec![kek(1)]).unwrap();
        let (mut acme, mut globex) = (vec![event("a")], vec![event("g")]);
        keys.seal_events("acme/x", &mut acme).await.unwrap();
        keys.seal_events("globex/x", &mut globex).await.unwrap();
        assert!(keys.forget("acme").await.unwrap());
        assert!(matches!(keys.open_event(record("acme/x", acme[0].clone())), Err(OpenError::Forgotten(t)) if t == "acme"));
        let redacted = keys.open_or_redact(record("acme/x", acme[0].clone())).unwrap();
        assert_eq!((redacted.payload.len(), redacted.metadata), (0, vec![(FORGOTTEN_KEY.to_string(), "acme".to_string())]));
        assert_eq!(keys.open_event(record("globex/x", globex[0].clone())).unwrap().payload, b"g");
        // A node restarted on the same table, and new writes, are refused too.
        let reopened = Keys::in_file(dir.path().join("keys.json"), vec![kek(1)]).unwrap();
        assert!(matches!(reopened.open_event(record("acme/x", acme[0].clone())), Err(OpenError::Forgotten(_))));
        assert_eq!(reopened.seal_events("acme/y", &mut [event("b")]).await.unwrap_err().code(), tonic::Code::FailedPrecondition);
    }

    #[tokio::test]
    async fn given_a_new_kek_when_keys_are_rewrapped_then_old_events_open_without_the_old_kek() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.json");
        let mut events = vec![event("before rotation")];
        Keys::in_file(path.clone(), vec![kek(1)]).unwrap().seal_events("acme/x", &mut events).await.unwrap();
        let rotating = Keys::in_file(path.clone(), vec![kek(2), kek(1)]).unwrap();
        assert_eq!(rotating.rewrap().await.unwrap(), 1);
        assert_eq!(rotating.rewrap().await.unwrap(), 0, "a second pass has nothing to do");
        let rotated = Keys::in_file(path.clone(), vec![kek(2)]).unwrap();
        assert_eq!(rotated.open_event(record("acme/x", events[0].clone())).unwrap().payload, b"before rotation");
        let Err(OpenError::Failed(why)) = Keys::in_file(path, vec![kek(3)]).unwrap().open_event(record("acme/x", events[0].clone())) else {
            panic!("opened with a key that never wrapped it")
        };
        assert!(why.contains("not among this node's keys"), "{why}");
    }

    /// A provider standing in for a KMS: wraps with a key it keeps, counts its calls, and can
    /// be made unreachable.
    #[derive(Debug)]
    struct Remote {
        key: Kek,
        calls: std::sync::atomic::AtomicUsize,
        down: std::sync::atomic::AtomicBool,
    }

    impl KeyProvider for Remote {
        fn id(&self) -> &str {
            "kms:orders-key"
        }

        fn wrap(&self, aad: &[u8], dek: &[u8]) -> Result<Vec<u8>, ProviderError> {
            self.calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if self.down.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(ProviderError::Unavailable("the KMS did not answer within 2 s".into()));
            }
            self.key.wrap(aad, dek)
        }

        fn unwrap(&self, aad: &[u8], wrapped: &[u8]) -> Result<Vec<u8>, ProviderError> {
            self.calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if self.down.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(ProviderError::Unavailable("the KMS did not answer within 2 s".into()));
            }
            self.key.unwrap(aad, wrapped)
        }
    }

    #[tokio::test]
    async fn given_another_key_provider_then_it_wraps_by_its_id_is_called_once_per_key_and_its_failures_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.json");
        let remote = Arc::new(Remote { key: kek(9), calls: Default::default(), down: Default::default() });
        let provider: Arc<dyn KeyProvider> = remote.clone();
        // A file key moved to the KMS: the KMS is current, the file key still unwraps.
        let mut old = vec![event("under the file key")];
        Keys::in_file(path.clone(), vec![kek(1)]).unwrap().seal_events("acme/x", &mut old).await.unwrap();
        let keys = Keys::in_file(path.clone(), [provider.clone(), kek(1).into()]).unwrap();
        let mut new = vec![event("under the KMS")];
        keys.seal_events("globex/x", &mut new).await.unwrap();
        assert_eq!(keys.table().tenants["globex"].kek_id, "kms:orders-key");
        assert_eq!(keys.rewrap().await.unwrap(), 1, "acme's key moves to the KMS");
        let calls = remote.calls.load(std::sync::atomic::Ordering::Relaxed);
        // A node with the KMS alone opens both; each data key is unwrapped once, then kept.
        let moved = Keys::in_file(path.clone(), [provider.clone()]).unwrap();
        for _ in 0..3 {
            assert_eq!(moved.open_event(record("acme/x", old[0].clone())).unwrap().payload, b"under the file key");
            assert_eq!(moved.open_event(record("globex/x", new[0].clone())).unwrap().payload, b"under the KMS");
        }
        assert_eq!(remote.calls.load(std::sync::atomic::Ordering::Relaxed), calls + 2);
        // Unreachable: a new tenant's first write is refused as retryable, nothing is stored;
        // a key not in memory yet cannot be opened, and the error says why.
        remote.down.store(true, std::sync::atomic::Ordering::Relaxed);
        let refused = moved.seal_events("initech/x", &mut [event("not now")]).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
        assert!(refused.message().contains("the KMS did not answer"), "{refused:?}");
        assert!(!moved.table().tenants.contains_key("initech"));
        let fresh = Keys::in_file(path.clone(), [provider.clone()]).unwrap();
        let unreachable = fresh.open_event(record("acme/x", old[0].clone())).unwrap_err();
        assert_eq!(unreachable.status().code(), tonic::Code::Unavailable, "{unreachable:?}");
        assert!(unreachable.to_string().contains("kms:orders-key") && unreachable.to_string().contains("did not answer"), "{unreachable}");
        // Reachable again, it opens; a key that does not open is a failure, not a retry.
        remote.down.store(false, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(fresh.open_event(record("acme/x", old[0].clone())).unwrap().payload, b"under the file key");
        let other: Arc<dyn KeyProvider> = Arc::new(Remote { key: kek(8), calls: Default::default(), down: Default::default() });
        let stranger = Keys::in_file(path, [other]).unwrap();
        let Err(OpenError::Failed(why)) = stranger.open_event(record("acme/x", old[0].clone())) else { panic!("opened with another key") };
        assert!(why.contains("does not open"), "{why}");
    }

    #[test]
    fn bad_key_files_are_refused_with_the_reason() {
        assert!(Kek::from_hex("abc").unwrap_err().contains("64 hex digits"));
        assert!(Kek::from_hex(&"zz".repeat(32)).is_err());
        assert_eq!(kek(1).id.len(), 16);
    }
}
