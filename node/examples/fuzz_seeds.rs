//! Writes the seed inputs of the fuzz targets (`fuzz/seeds/<target>/`): one valid input of each
//! decoder, from the node's own encoders, so libFuzzer starts from the format rather than from
//! nothing; existing seed files are kept. `cargo run -p anthill-node --example fuzz_seeds -- fuzz/seeds`
//! (fuzz/run.sh does it).

use std::path::PathBuf;

use anthill_node::replication::message::Message;
use anthill_node::storage::record::EventRecord;
use anthill_proto::v1 as pb;
use prost::Message as _;

fn main() -> anyhow::Result<()> {
    let out = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "fuzz/seeds".into()));
    let write = |target: &str, name: &str, bytes: &[u8]| -> anyhow::Result<()> {
        let dir = out.join(target);
        std::fs::create_dir_all(&dir)?;
        // An existing seed is kept (delete it to make it again): some hold random parts, such
        // as the key table's data key, and would otherwise change at every fuzz run.
        let path = dir.join(name);
        if !path.exists() {
            std::fs::write(path, bytes)?;
        }
        Ok(())
    };
    let record = EventRecord {
        partition: 3,
        position: 42,
        stream: "acme/orders-17".into(),
        stream_version: 7,
        event_type: "OrderPlaced".into(),
        payload: br#"{"sku":"A-1","qty":2}"#.to_vec(),
        metadata: vec![("trace".into(), "t-1".into())],
        append_time_us: 1_700_000_000_000_000,
        epoch: 2,
        atomic_with_next: false,
    };
    let mut bytes = Vec::new();
    record.as_ref().encode_into(&mut bytes);
    write("record", "one-event", &bytes)?;

    let message = anthill_node::replication::wire::to_wire(Message::Recover { epoch: 5 });
    let envelope = pb::ReplicaEnvelope { partition: 1, from: 2, message: Some(message) };
    write("replica_message", "recover", &envelope.encode_to_vec())?;

    let append = pb::AppendRequest {
        stream: "acme/orders-17".into(),
        expected_version: None,
        durability: pb::Durability::Quorum as i32,
        events: vec![pb::EventData { r#type: "OrderPlaced".into(), payload: b"{}".to_vec(), metadata: Default::default() }],
    };
    write("append_request", "one-event", &append.encode_to_vec())?;

    write("config", "cluster", include_bytes!("../../fuzz/seed-config.yaml"))?;
    write("spec_file", "transfers", include_bytes!("../specs/ledger/transfers.yaml"))?;

    // A sealed event as `fuzzing::sealed_event` splits it: an even length byte (the target's
    // real marker), then a payload of nonce, ciphertext and tag (random: it does not open).
    let mut sealed = vec![0u8];
    sealed.extend_from_slice(&[7u8; 12 + 16 + 8]);
    write("sealed_event", "real-marker", &sealed)?;
    let mut own = vec![18u8];
    own.extend_from_slice(b"1:0123456789abcdef");
    own.extend_from_slice(&[0u8; 40]);
    write("sealed_event", "own-marker", &own)?;
    for (target, name, bytes) in anthill_node::fuzzing::internal_seeds() {
        write(target, name, &bytes)?;
    }
    eprintln!("seeds written under {}", out.display());
    Ok(())
}
