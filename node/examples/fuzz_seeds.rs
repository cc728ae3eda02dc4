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
    // `fuzzing::requests`: the first byte picks the message.
    let transfer = pb::TransferRequest {
        book: "acme:shop".into(),
        command_id: "c-1".into(),
        from: "till".into(),
        to: "safe".into(),
        amount: 120,
        transfer: "t-1".into(),
    };
    write("requests", "transfer", &[&[7u8][..], &transfer.encode_to_vec()].concat())?;
    let token = pb::CreateTokenRequest { name: "ci".into(), grants: vec![pb::Grant { role: "write".into(), tenant: "acme".into() }] };
    write("requests", "create-token", &[&[17u8][..], &token.encode_to_vec()].concat())?;
    let session = pb::AppendSessionRequest { id: 1, append: Some(append.clone()) };
    write("requests", "append-session", &[&[3u8][..], &session.encode_to_vec()].concat())?;
    let subscribe = pb::SubscribeRequest { streams: vec!["acme/orders-17".into()], from_position: 1, ..Default::default() };
    write("requests", "subscribe", &[&[2u8][..], &subscribe.encode_to_vec()].concat())?;
    // `fuzzing::ledger_event`: the first byte picks the event type.
    write("ledger_event", "transferred", &[&[3u8][..], br#"{"transfer":"t-1","from":"till","to":"safe","amount":120}"#].concat())?;
    write("ledger_event", "opened", &[&[0u8][..], br#"{"account":"till","currency":"EUR","credit_limit":0,"opened_at_us":1}"#].concat())?;
    // `fuzzing::consul_reply`: the first byte picks the parser (and, over 8, the status).
    let listing = br#"[{"Key":"anthill/leaders/0","CreateIndex":1,"ModifyIndex":2,"LockIndex":1,"Value":"bm9kZS0x","Session":"5c1f"}]"#;
    write("consul_reply", "listing", &[&[4u8][..], listing].concat())?;
    write("consul_reply", "session", &[&[0u8][..], br#"{"ID":"5c1f"}"#].concat())?;
    use anthill_node::storage::keys::{Elem, pack};
    write("storage_key", "stream", &pack(&[Elem::Str("acme/orders-17"), Elem::U64(7)]))?;
    write("storage_key", "event", &anthill_node::storage::keys::event_key(3, 42))?;
    let ca = anthill_node::security::certs::issue(&anthill_node::security::certs::Kind::Ca, "ca", 30, None)?;
    write("key_material", "ca.crt", ca.cert_pem.as_bytes())?;
    write("key_material", "ca.der", &anthill_node::security::certs::first_certificate_der(ca.cert_pem.as_bytes()))?;
    write("key_material", "ca.key", ca.key_pem.as_bytes())?;
    write("key_material", "kek", "11".repeat(32).as_bytes())?;
    for (target, name, bytes) in anthill_node::fuzzing::internal_seeds() {
        write(target, name, &bytes)?;
    }
    eprintln!("seeds written under {}", out.display());
    Ok(())
}
