//! Anthill's API contract: the types and tonic services generated at build time from
//! `proto/anthill/v1/*.proto`, plus the encoded file descriptor set for gRPC reflection.
//!
//! Nothing here is hand-written protocol logic; change the `.proto` files, not this crate.

pub mod v1 {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("anthill.v1");

    /// Encoded `FileDescriptorSet` of the v1 API, served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("anthill_v1_descriptor");
}
