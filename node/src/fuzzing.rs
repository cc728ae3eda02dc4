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
];

/// A stored event record, as read back from LMDB.
pub fn record(bytes: &[u8]) {
    if let Ok(decoded) = EventRecord::decode(1, bytes) {
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

/// A client's Append: protobuf, then the node's validation of it.
pub fn append_request(bytes: &[u8]) {
    let Ok(request) = pb::AppendRequest::decode(bytes) else { return };
    let limits = crate::config::LimitsConfig::default();
    let events = request
        .events
        .into_iter()
        .map(|e| {
            let mut metadata: Vec<(String, String)> = e.metadata.into_iter().collect();
            metadata.sort_unstable();
            crate::log::NewEvent { event_type: e.r#type, payload: e.payload, metadata }
        })
        .collect();
    let append = crate::log::AppendRequest { stream: request.stream, expected: crate::log::ExpectedVersion::Any, events };
    let _ = crate::log::validate_append(&limits, &append);
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

/// A stored event whose payload and metadata claim to be sealed (a changed disk, a hostile
/// backup): opening it must fail cleanly, never panic or return something unsealed.
pub fn sealed_event(bytes: &[u8]) {
    use std::sync::OnceLock;
    static KEYS: OnceLock<(tempfile::TempDir, crate::security::keys::Keys)> = OnceLock::new();
    let (_, keys) = KEYS.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let kek = crate::security::keys::Kek::from_hex(&"11".repeat(32)).expect("a key");
        let keys = crate::security::keys::Keys::in_file(dir.path().join("keys.json"), vec![kek]).expect("a key table");
        (dir, keys)
    });
    let split = bytes.first().map_or(0, |b| usize::from(*b)).min(bytes.len());
    let (marker, payload) = bytes.split_at(split);
    let event = EventRecord {
        partition: 0,
        position: 1,
        stream: "acme/orders".into(),
        stream_version: 1,
        event_type: "Placed".into(),
        payload: payload.to_vec(),
        metadata: vec![(crate::security::keys::SEALED_KEY.into(), String::from_utf8_lossy(marker).into_owned())],
        append_time_us: 0,
        epoch: 1,
        atomic_with_next: false,
    };
    // No tenant has a key in this table: nothing may open.
    assert!(keys.open_event(event).is_err(), "an event opened without its tenant's key");
}
