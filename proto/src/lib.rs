//! Generated code for the recvault wire contract (`proto/recvault/**`).
//! Nothing here is written by hand except the module tree and the redacted
//! `Debug` of the messages that carry a secret (`redacted.rs`).

#![allow(clippy::all, missing_debug_implementations, unreachable_pub)]

/// Encoded `FileDescriptorSet` of every recvault .proto file, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/recvault_descriptor.bin"));

pub mod vault {
    pub mod v1 {
        tonic::include_proto!("recvault.vault.v1");
    }
}

pub mod uploader {
    pub mod v1 {
        tonic::include_proto!("recvault.uploader.v1");
    }
}

mod redacted;
