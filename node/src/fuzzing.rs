//! The entry points `cargo fuzz` drives (`fuzz/`, docs/security.md "Hostile input"): one per
//! decoder that reads bytes from the network or the disk. Each takes any bytes and must return
//! without panicking (an error is fine), and checks what must hold of what it accepts (a decoded
//! record encodes back to the same bytes). `node/tests/fuzz_regressions.rs` runs every input
//! under `fuzz/seeds/` and `fuzz/regressions/` through them on stable Rust, so an input that once
//! crashed a target stays a test.

use anthill_proto::v1 as pb;
use prost::Message as _;

use crate::storage::record::EventRecord;

/// One fuzz target: any bytes in, a panic only for a bug.
pub type Target = fn(&[u8]);

/// The targets by name (the fuzz crate's binaries and the regression test use these names).
pub const TARGETS: &[(&str, Target)] = &[
    ("record", record),
    ("replica_message", replica_message),
    ("append_request", append_request),
    ("config", config),
    ("spec_file", spec_file),
    ("sealed_event", sealed_event),
    ("partition_image", partition_image),
    ("undo_journal", undo_journal),
    ("raft_message", raft_message),
    ("coordination_entry", coordination_entry),
    ("coordination_snapshot", coordination_snapshot),
    ("tables", tables),
    ("audit_batch", audit_batch),
    ("requests", requests),
    ("ledger_event", ledger_event),
    ("consul_reply", consul_reply),
    ("storage_key", storage_key),
    ("key_material", key_material),
];

/// A stored event record, as read back from LMDB. The input's checksum is set right first
/// (else nearly every mutation stops at "checksum mismatch" and the fields are never parsed);
/// what decodes must decode again, equal, after encoding (a V2 record comes back as V3).
pub fn record(bytes: &[u8]) {
    let _ = EventRecord::decode(1, bytes);
    let mut bytes = bytes.to_vec();
    let header = crate::storage::record::HEADER_BYTES;
    if bytes.len() >= header {
        let crc = crc32fast::hash(&bytes[header..]);
        bytes[1..header].copy_from_slice(&crc.to_be_bytes());
    }
    if let Ok(decoded) = EventRecord::decode(1, &bytes) {
        let mut encoded = Vec::new();
        decoded.as_ref().encode_into(&mut encoded);
        let again = EventRecord::decode(1, &encoded).expect("a record that encodes decodes again");
        assert_eq!(again, decoded, "decode(encode(record)) is the record");
    }
}

/// A replication message from a peer (protobuf, then the protocol's own checks).
pub fn replica_message(bytes: &[u8]) {
    if let Ok(message) = pb::ReplicaEnvelope::decode(bytes)
        && let Some(message) = message.message
    {
        let _ = crate::replication::wire::from_wire(message);
    }
}

/// A client's Append: protobuf, the API's conversion (reserved metadata, expected version),
/// then the node's validation of it.
pub fn append_request(bytes: &[u8]) {
    let Ok(request) = pb::AppendRequest::decode(bytes) else { return };
    let Ok(append) = crate::api::append_request(request) else { return };
    let _ = crate::log::validate_append(&crate::config::LimitsConfig::default(), &append);
    let _ = crate::security::auth::tenant_of(&append.stream);
}

/// A node's YAML configuration, parsed and validated.
pub fn config(bytes: &[u8]) {
    let Ok(text) = std::str::from_utf8(bytes) else { return };
    if let Ok(config) = crate::config::NodeConfig::from_yaml(text) {
        let _ = config.validate();
    }
}

/// A given-when-then spec file.
pub fn spec_file(bytes: &[u8]) {
    let Ok(text) = std::str::from_utf8(bytes) else { return };
    let _ = crate::app::specs::format::parse_file("fuzz.yaml", text);
}

/// A stored event whose payload and metadata claim to be sealed with tenant `acme`'s key (a
/// changed disk, a hostile backup): opening it must fail cleanly or give back what was sealed,
/// never panic. The first byte is the marker's length; the marker, then the payload follow.
pub fn sealed_event(bytes: &[u8]) {
    let (_, keys, sealed_marker) = acme_keys();
    let Some((&length, rest)) = bytes.split_first() else { return };
    let (marker, payload) = rest.split_at(usize::from(length).min(rest.len()));
    // Half the inputs keep the real marker (the key is found; the payload and metadata blob are
    // what gets fuzzed), half bring their own.
    let marker = if length % 2 == 0 { sealed_marker.clone() } else { String::from_utf8_lossy(marker).into_owned() };
    let event = EventRecord {
        partition: 0,
        position: 1,
        stream: "acme/orders".into(),
        stream_version: 1,
        event_type: "Placed".into(),
        payload: payload.to_vec(),
        metadata: vec![(crate::security::keys::SEALED_KEY.into(), marker)],
        append_time_us: 0,
        epoch: 1,
        atomic_with_next: false,
    };
    // Only a payload sealed with acme's key under this stream and type opens; libFuzzer cannot
    // forge one (that would be a forged AES-GCM tag).
    if let Ok(opened) = keys.open_event(event) {
        assert!(opened.metadata.iter().all(|(k, _)| k != crate::security::keys::SEALED_KEY), "opened but still marked sealed");
    }
}

/// A key table in a temporary file holding tenant `acme`'s data key, and the marker of an event
/// sealed with it (made once per fuzzing process).
fn acme_keys() -> &'static (tempfile::TempDir, crate::security::keys::Keys, String) {
    use std::sync::OnceLock;
    static KEYS: OnceLock<(tempfile::TempDir, crate::security::keys::Keys, String)> = OnceLock::new();
    KEYS.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let kek = crate::security::keys::Kek::from_hex(&"11".repeat(32)).expect("a key");
        let keys = crate::security::keys::Keys::in_file(dir.path().join("keys.json"), vec![kek]).expect("a key table");
        // acme gets its data key by sealing one event (the marker names it).
        let mut events = [crate::log::NewEvent { event_type: "Placed".into(), payload: b"x".to_vec(), metadata: Vec::new() }];
        let runtime = tokio::runtime::Builder::new_current_thread().build().expect("a runtime");
        runtime.block_on(keys.seal_events("acme/orders", &mut events)).expect("sealing works");
        let marker = events[0].metadata[0].1.clone();
        (dir, keys, marker)
    })
}

/// A partition image, as a follower receives it from its leader to install (or reads back
/// from disk): what decodes encodes back to an image that decodes equal.
pub fn partition_image(bytes: &[u8]) {
    let Ok(image) = crate::storage::PartitionImage::decode(bytes) else { return };
    let again = crate::storage::PartitionImage::decode(&image.encode()).expect("an image that encodes decodes again");
    assert_eq!(again, image, "decode(encode(image)) is the image");
}

/// A write's undo journal, as stored beside the partition (read back at a truncation).
pub fn undo_journal(bytes: &[u8]) {
    let Some(journal) = crate::storage::undo::Journal::decode(bytes) else { return };
    let again = crate::storage::undo::Journal::decode(&journal.encode()).expect("a journal that encodes decodes again");
    assert_eq!(again, journal, "decode(encode(journal)) is the journal");
}

/// A Raft message of the embedded coordination store, as a peer sends it: decoded, and what
/// decodes encodes back to a message that decodes equal.
pub fn raft_message(bytes: &[u8]) {
    use protobuf::Message as _;
    let Ok(message) = raft::eraftpb::Message::parse_from_bytes(bytes) else { return };
    let encoded = message.write_to_bytes().expect("a decoded message encodes");
    assert_eq!(raft::eraftpb::Message::parse_from_bytes(&encoded).expect("it decodes again"), message);
}

/// A committed coordination entry (from the log on disk, or a peer): its proposal applied to a
/// store holding a session, a lock and a key. Every node applies it alike (two copies end
/// equal), and a snapshot of the result restores the same state.
pub fn coordination_entry(bytes: &[u8]) {
    use crate::coordination::state::{KvState, Op};
    let Ok(proposal) = serde_json::from_slice::<crate::coordination::embedded::Proposal>(bytes) else { return };
    let mut state = KvState::default();
    let crate::coordination::state::Outcome::Session(session) =
        state.apply(&Op::CreateSession { node: "node-1".into(), ttl_ms: 1_000 }, 1_000)
    else {
        unreachable!("a new store makes a session")
    };
    state.apply(&Op::Acquire { key: "leaders/0".into(), value: b"node-1".to_vec(), session }, 1_000);
    state.apply(&Op::Put { key: "members/node-1".into(), value: b"10.0.0.1:7400".to_vec(), cas: crate::coordination::Cas::Any }, 1_000);
    let mut other = state.clone();
    let outcome = state.apply(&proposal.op, proposal.now_ms);
    assert_eq!(other.apply(&proposal.op, proposal.now_ms), outcome, "two nodes applied one entry differently");
    assert_eq!(other, state, "two nodes applied one entry differently");
    restores(&state);
}

/// A coordination snapshot (from disk, or a leader catching a member up): what decodes takes
/// the store's operations, and snapshots again to the same state.
pub fn coordination_snapshot(bytes: &[u8]) {
    use crate::coordination::state::Op;
    let snapshot = raft::eraftpb::Snapshot { data: bytes.to_vec().into(), ..Default::default() };
    let Ok(mut state) = crate::coordination::embedded::decode_snapshot(&snapshot) else { return };
    restores(&state);
    for (key, entry) in state.list("").into_iter().map(|e| (e.key.clone(), e)) {
        let _ = crate::coordination::election::Placement::decode(&String::from_utf8_lossy(&entry.value));
        state.apply(&Op::Delete { key, cas: crate::coordination::Cas::Any }, 0);
    }
    state.apply(&Op::RenewAll, u64::MAX);
    state.apply(&Op::Tick, u64::MAX);
    assert_eq!(state.next_expiry_ms(), None, "a session outlived the end of time");
}

/// The snapshot of `state` restores it.
fn restores(state: &crate::coordination::state::KvState) {
    let data = serde_json::to_vec(state).expect("a state serializes");
    let snapshot = raft::eraftpb::Snapshot { data: data.into(), ..Default::default() };
    let restored = crate::coordination::embedded::decode_snapshot(&snapshot).expect("a snapshot decodes");
    assert_eq!(&restored, state, "a snapshot restores the state it was taken of");
}

/// A member's audit records (`Cluster.Audit`): protobuf, then the leader's checks, as the
/// member the batch names and as another one. What passes is whole: each event is a record of
/// that member's.
pub fn audit_batch(bytes: &[u8]) {
    use crate::security::audit::{BATCH, EVENT_TYPE, Record, check_batch};
    use crate::security::identity::Peer;
    let Ok(batch) = pb::AuditBatch::decode(bytes) else { return };
    let members = std::collections::BTreeMap::from([(1, "node-1".to_string()), (2, "node-2".to_string())]);
    for peer in [None, Some(Peer { id: 1 }), Some(Peer { id: 2 })] {
        let Ok(events) = check_batch(&members, peer, &batch) else { continue };
        assert!(peer.is_none_or(|p| members[&p.id] == batch.member), "a member appended to another's stream");
        assert!(!events.is_empty() && events.len() <= BATCH && events.len() == batch.records.len());
        for event in events {
            assert_eq!(event.event_type, EVENT_TYPE);
            let record: Record = serde_json::from_slice(&event.payload).expect("a stored record parses");
            assert!(record.id.starts_with(&format!("{}:", batch.member)), "{} stored under {}", record.id, batch.member);
        }
    }
}

/// The replicated tables as a node loads them (a single node's file; a cluster's come the same
/// way from the coordination store): the first byte picks the auth table or the key table.
/// What loads is used: every principal's and token's caller and grants; every tenant's data key
/// unwrapped with the node's key-encryption key to open an event of that tenant.
pub fn tables(bytes: &[u8]) {
    use std::sync::OnceLock;
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    let dir = DIR.get_or_init(|| tempfile::tempdir().expect("a temporary directory"));
    let Some((&which, json)) = bytes.split_first() else { return };
    let path = dir.path().join(format!("table-{}.json", std::process::id()));
    std::fs::write(&path, json).expect("the table file is written");
    if which % 2 == 0 {
        use crate::security::auth::{Auth, Role};
        let Ok(auth) = Auth::in_file(path, vec!["admin".into()]) else { return };
        let table = auth.table();
        // A grant lets its holder do what it names, on the tenant it names.
        for (name, grants) in &table.principals {
            let caller = auth.certificate_caller(name);
            for grant in grants.iter().filter(|g| g.role != Role::ClusterAdmin) {
                assert!(caller.may(&grant.tenant, grant.role), "{name}'s grant {grant} does not let it");
            }
        }
        for id in table.tokens.keys() {
            // The token format (`ah_<id>_<secret>`), a secret that does not match.
            assert!(auth.token_caller(&format!("ah_{id}_{}", "0".repeat(64))).is_none() || table.tokens[id].sha256 == sha256_of_zeros());
        }
    } else {
        use crate::security::keys::{Kek, Keys};
        let kek = Kek::from_hex(&"11".repeat(32)).expect("a key");
        let Ok(keys) = Keys::in_file(path, vec![kek]) else { return };
        let table = keys.table();
        for (tenant, key) in &table.tenants {
            let _ = keys.is_forgotten(tenant);
            let event = EventRecord {
                partition: 0,
                position: 1,
                stream: format!("{tenant}/orders"),
                stream_version: 1,
                event_type: "Placed".into(),
                payload: vec![0; 32],
                metadata: vec![(crate::security::keys::SEALED_KEY.into(), format!("1:{}", key.dek_id))],
                append_time_us: 0,
                epoch: 1,
                atomic_with_next: false,
            };
            let _ = keys.open_or_redact(event);
        }
    }
}

/// Every gRPC request other than an Append (which has a target of its own) and the peers'
/// messages (`replica_message`, `raft_message`, `audit_batch`): the first byte picks the
/// message, the rest is its protobuf; what decodes goes through the checks the node makes
/// before any state is touched (ids, grants, an AppendSession's appends).
pub fn requests(bytes: &[u8]) {
    use crate::app::{MAX_SCOPE_BYTES, validate_id};
    let Some((&which, body)) = bytes.split_first() else { return };
    let ids = |pairs: &[(&str, &str)]| {
        for (what, id) in pairs {
            let _ = validate_id(what, id, MAX_SCOPE_BYTES);
        }
    };
    macro_rules! decode {
        ($message:ty) => {
            match <$message>::decode(body) {
                Ok(message) => message,
                Err(_) => return,
            }
        };
    }
    match which % 24 {
        0 => {
            let r = decode!(pb::ReadRequest);
            ids(&[("stream", &r.stream)]);
        }
        1 => {
            decode!(pb::ReadPartitionRequest);
        }
        2 => {
            let r = decode!(pb::SubscribeRequest);
            for stream in &r.streams {
                ids(&[("stream", stream)]);
            }
        }
        3 => {
            let r = decode!(pb::AppendSessionRequest);
            if let Some(append) = r.append
                && let Ok(append) = crate::api::append_request(append)
            {
                let _ = crate::log::validate_append(&crate::config::LimitsConfig::default(), &append);
            }
        }
        4 => {
            let r = decode!(pb::OpenAccountRequest);
            ids(&[("book", &r.book), ("command_id", &r.command_id), ("account", &r.account), ("currency", &r.currency)]);
        }
        5 => {
            let r = decode!(pb::DepositRequest);
            ids(&[("book", &r.book), ("command_id", &r.command_id), ("account", &r.account)]);
        }
        6 => {
            let r = decode!(pb::WithdrawRequest);
            ids(&[("book", &r.book), ("command_id", &r.command_id), ("account", &r.account)]);
        }
        7 => {
            let r = decode!(pb::TransferRequest);
            ids(&[("book", &r.book), ("from", &r.from), ("to", &r.to), ("transfer", &r.transfer)]);
        }
        8 => {
            let r = decode!(pb::PlaceHoldRequest);
            ids(&[("book", &r.book), ("hold", &r.hold), ("account", &r.account)]);
        }
        9 => {
            let r = decode!(pb::CaptureHoldRequest);
            ids(&[("book", &r.book), ("hold", &r.hold), ("to", &r.to)]);
        }
        10 => {
            let r = decode!(pb::ReleaseHoldRequest);
            ids(&[("book", &r.book), ("hold", &r.hold)]);
        }
        11 => {
            let r = decode!(pb::CloseAccountRequest);
            ids(&[("book", &r.book), ("account", &r.account)]);
        }
        12 => {
            let r = decode!(pb::GetBalanceRequest);
            ids(&[("book", &r.book), ("account", &r.account)]);
        }
        13 => {
            let r = decode!(pb::GetHoldRequest);
            ids(&[("book", &r.book), ("hold", &r.hold)]);
        }
        14 => {
            let r = decode!(pb::GetHistoryRequest);
            ids(&[("book", &r.book), ("account", &r.account)]);
        }
        15 => {
            let r = decode!(pb::GetTotalsRequest);
            ids(&[("book", &r.book)]);
        }
        16 => {
            let r = decode!(pb::AuditRequest);
            ids(&[("book", &r.book)]);
        }
        17 => {
            let r = decode!(pb::CreateTokenRequest);
            if let Ok(grants) = crate::api::auth::grants_from_wire(r.grants) {
                // A grant that parses prints as what parses to it again.
                for grant in grants {
                    assert_eq!(crate::security::auth::Grant::parse(&grant.to_string()).as_ref(), Ok(&grant));
                }
            }
        }
        18 => {
            let r = decode!(pb::SetGrantsRequest);
            let _ = crate::api::auth::grants_from_wire(r.grants);
        }
        19 => {
            decode!(pb::RevokeTokenRequest);
        }
        20 => {
            let r = decode!(pb::ForgetTenantRequest);
            let _ = crate::security::auth::check_tenant(&r.tenant);
        }
        21 => {
            decode!(pb::DrainRequest);
        }
        22 => {
            decode!(pb::DecommissionRequest);
        }
        _ => {
            decode!(pb::ListGrantsRequest);
        }
    }
}

/// A ledger book's stored event as a follower reads it to keep its read model
/// (`app/follow.rs`): the first byte picks the event type, the rest is its payload. What
/// decodes encodes back to the same event. The same bytes as one of acme's sealed state values
/// do not open (that would be a forged AES-GCM tag).
pub fn ledger_event(bytes: &[u8]) {
    use crate::app::follow::{DomainEvent, decode};
    const TYPES: [&str; 10] = [
        "AccountOpened",
        "Deposited",
        "Withdrawn",
        "Transferred",
        "HoldPlaced",
        "HoldCaptured",
        "HoldReleased",
        "AccountClosed",
        "Unknown",
        "",
    ];
    let Some((&which, payload)) = bytes.split_first() else { return };
    let record = EventRecord {
        partition: 0,
        position: 1,
        stream: "ledger/acme:shop".into(),
        stream_version: 1,
        event_type: TYPES[usize::from(which) % TYPES.len()].into(),
        payload: payload.to_vec(),
        metadata: Vec::new(),
        append_time_us: 0,
        epoch: 1,
        atomic_with_next: false,
    };
    if let Ok(Some(decoded)) = decode(&record, None) {
        let DomainEvent::Ledger(event) = decoded.event;
        let stored = crate::app::to_new_event(&event, "c-1").expect("a decoded event encodes");
        let again: crate::app::ledger::LedgerEvent =
            crate::app::from_log_event(&stored.event_type, &stored.payload).expect("an encoded event decodes");
        assert_eq!(again, event, "decode(encode(event)) is the event");
    }
    let (_, keys, _) = acme_keys();
    let key = keys.data_key("acme").expect("acme has a data key");
    assert!(key.open_value(b"acme-state", bytes).is_none(), "a made-up sealed value opened");
}

/// Consul's answers to the node's calls (a Consul agent is trusted to exist, not to be sane):
/// the first byte picks the parser and the HTTP status, the rest is the body.
pub fn consul_reply(bytes: &[u8]) {
    use crate::coordination::consul::{self, Reply};
    let Some((&which, body)) = bytes.split_first() else { return };
    let status = [200, 404, 500][usize::from(which / 8) % 3];
    let status = http::StatusCode::from_u16(status).expect("a status");
    let reply = Reply::new(status, &http::HeaderMap::new(), bytes::Bytes::copy_from_slice(body));
    match which % 6 {
        0 => drop(consul::parse_session_created(&reply)),
        1 => drop(consul::parse_session_renewed(&reply)),
        2 => drop(consul::parse_session_destroyed(&reply)),
        3 => drop(consul::parse_entry("anthill/leaders/0", &reply)),
        4 => drop(consul::parse_listing(&reply)),
        _ => drop(consul::parse_written(&reply)),
    }
}

/// A key of the node's LMDB databases, as read back from the disk: what unpacks packs back to
/// a key that unpacks equal.
pub fn storage_key(bytes: &[u8]) {
    use crate::storage::keys::{Elem, Value, decode_event_key, decode_log_key, pack, unpack};
    let _ = decode_log_key(bytes);
    let _ = decode_event_key(bytes);
    let Ok(values) = unpack(bytes) else { return };
    let elems: Vec<Elem<'_>> = values
        .iter()
        .map(|v| match v {
            Value::Bytes(b) => Elem::Bytes(b),
            Value::Str(s) => Elem::Str(s),
            Value::U64(n) => Elem::U64(*n),
        })
        .collect();
    assert_eq!(unpack(&pack(&elems)).as_ref(), Ok(&values), "unpack(pack(key)) is the key");
}

/// What a node reads as keys and certificates: a key-encryption key file, PEM certificate
/// chains, CA bundles and private keys (its own files), and a peer's or client's certificate
/// (DER, from the TLS handshake) for the names it carries.
pub fn key_material(bytes: &[u8]) {
    use rustls_pki_types::pem::PemObject as _;
    if let Ok(text) = std::str::from_utf8(bytes) {
        let _ = crate::security::keys::Kek::from_hex(text);
        let _ = crate::security::certs::not_after_unix(text);
    }
    let _ = crate::security::tls::certificates(bytes);
    let _ = crate::security::tls::root_store(bytes);
    let _ = rustls_pki_types::PrivateKeyDer::from_pem_slice(bytes);
    if let Some(names) = crate::security::identity::CertNames::of(bytes) {
        let _ = names.principal();
    }
}

/// The SHA-256 (hex) of a secret of 64 zeros: the one stored hash that secret matches.
fn sha256_of_zeros() -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, "0".repeat(64).as_bytes());
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Seeds of the targets over the node's internal formats (target, file name, bytes), from the
/// node's own encoders: `examples/fuzz_seeds.rs` writes them with the others.
pub fn internal_seeds() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    use crate::coordination::state::{KvState, Op};
    use protobuf::Message as _;
    let mut seeds = Vec::new();
    let record = EventRecord {
        partition: 1,
        position: 8,
        stream: "acme/orders-1".into(),
        stream_version: 2,
        event_type: "OrderPlaced".into(),
        payload: b"{}".to_vec(),
        metadata: Vec::new(),
        append_time_us: 1,
        epoch: 2,
        atomic_with_next: false,
    };
    let image = crate::storage::PartitionImage {
        partition: 1,
        position: 8,
        floor: 7,
        history: vec![(1, 0), (2, 5)],
        records: vec![record],
        stream_floors: vec![("acme/orders-1".into(), 1)],
        state: vec![(b"acme/orders-1/total".to_vec(), b"12".to_vec())],
        undo: vec![(8, vec![0, 0, 0, 1, b'k', 0])],
    };
    seeds.push(("partition_image", "one-event", image.encode()));
    // A journal: key `k` had `v`, key `n` had nothing.
    seeds.push(("undo_journal", "two-keys", vec![0, 0, 0, 1, b'k', 1, 0, 0, 0, 1, b'v', 0, 0, 0, 1, b'n', 0]));
    let mut message = raft::eraftpb::Message::default();
    message.set_msg_type(raft::eraftpb::MessageType::MsgAppend);
    (message.to, message.from, message.term, message.index, message.commit) = (2, 1, 3, 10, 9);
    message.entries.push(raft::eraftpb::Entry { term: 3, index: 11, data: b"{}".to_vec().into(), ..Default::default() });
    seeds.push(("raft_message", "append", message.write_to_bytes().expect("a message encodes")));
    let proposal = |op| crate::coordination::embedded::Proposal { origin: 1, incarnation: 1, id: 1, now_ms: 2_000, op };
    let put = proposal(Op::Put { key: "members/node-2".into(), value: b"10.0.0.2:7400".to_vec(), cas: crate::coordination::Cas::Absent });
    seeds.push(("coordination_entry", "put", serde_json::to_vec(&put).expect("a proposal serializes")));
    let session = proposal(Op::CreateSession { node: "node-2".into(), ttl_ms: 1_000 });
    seeds.push(("coordination_entry", "session", serde_json::to_vec(&session).expect("a proposal serializes")));
    let mut state = KvState::default();
    let crate::coordination::state::Outcome::Session(id) = state.apply(&Op::CreateSession { node: "node-1".into(), ttl_ms: 1_000 }, 5)
    else {
        unreachable!("a new store makes a session")
    };
    state.apply(&Op::Acquire { key: "leaders/0".into(), value: b"node-1".to_vec(), session: id }, 5);
    state.apply(&Op::Put { key: "placement/0".into(), value: b"node-1,node-2,node-3".to_vec(), cas: crate::coordination::Cas::Any }, 5);
    seeds.push(("coordination_snapshot", "a-lock-and-a-placement", serde_json::to_vec(&state).expect("a state serializes")));
    let auth = crate::security::auth::AuthTable {
        tokens: [(
            "0123456789abcdef".to_string(),
            crate::security::auth::TokenRecord {
                name: "ci".into(),
                sha256: "ab".repeat(32),
                grants: vec![crate::security::auth::Grant::parse("write:acme").expect("a grant")],
                created_unix_ms: 1,
            },
        )]
        .into(),
        principals: [("ops".to_string(), vec![crate::security::auth::Grant::parse("read:*").expect("a grant")])].into(),
    };
    let mut bytes = vec![0u8];
    bytes.extend(serde_json::to_vec(&auth).expect("a table serializes"));
    seeds.push(("tables", "auth", bytes));
    // A key table with one tenant's data key, wrapped by the target's key-encryption key.
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("keys.json");
    let kek = crate::security::keys::Kek::from_hex(&"11".repeat(32)).expect("a key");
    let keys = crate::security::keys::Keys::in_file(path.clone(), vec![kek]).expect("a key table");
    let mut events = [crate::log::NewEvent { event_type: "Placed".into(), payload: b"x".to_vec(), metadata: Vec::new() }];
    let runtime = tokio::runtime::Builder::new_current_thread().build().expect("a runtime");
    runtime.block_on(keys.seal_events("acme/orders", &mut events)).expect("sealing works");
    let mut bytes = vec![1u8];
    bytes.extend(std::fs::read(&path).expect("the key table was written"));
    seeds.push(("tables", "keys", bytes));
    let record = crate::security::audit::Record {
        id: "node-2:0a1b2c3d:7".into(),
        at_unix_ms: 1,
        by: "token 0123456789abcdef (\"ci\")".into(),
        action: "refused: missing grant".into(),
        outcome: "refused".into(),
        detail: "needs write:globex".into(),
    };
    let batch = pb::AuditBatch { member: "node-2".into(), records: vec![serde_json::to_vec(&record).expect("a record serializes")] };
    seeds.push(("audit_batch", "one-refusal", batch.encode_to_vec()));
    seeds
}
