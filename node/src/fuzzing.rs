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
    use std::sync::OnceLock;
    static KEYS: OnceLock<(tempfile::TempDir, crate::security::keys::Keys, String)> = OnceLock::new();
    let (_, keys, sealed_marker) = KEYS.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let kek = crate::security::keys::Kek::from_hex(&"11".repeat(32)).expect("a key");
        let keys = crate::security::keys::Keys::in_file(dir.path().join("keys.json"), vec![kek]).expect("a key table");
        // acme gets its data key by sealing one event (the marker names it).
        let mut events = [crate::log::NewEvent { event_type: "Placed".into(), payload: b"x".to_vec(), metadata: Vec::new() }];
        let runtime = tokio::runtime::Builder::new_current_thread().build().expect("a runtime");
        runtime.block_on(keys.seal_events("acme/orders", &mut events)).expect("sealing works");
        let marker = events[0].metadata[0].1.clone();
        (dir, keys, marker)
    });
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
