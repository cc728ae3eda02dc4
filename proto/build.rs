//! Generates the tonic client and server code from `anthill/v1/*.proto` with a vendored `protoc`,
//! so a fresh machine needs no system protobuf compiler.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["anthill/v1/eventlog.proto", "anthill/v1/ledger.proto", "anthill/v1/cluster.proto", "anthill/v1/auth.proto"];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure().file_descriptor_set_path(out_dir.join("anthill_v1_descriptor.bin")).compile_with_config(
        config,
        &protos,
        &["."],
    )?;
    Ok(())
}
