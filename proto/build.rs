//! Compiles `proto/` with protox (pure Rust), so a fresh machine needs no `protoc`.
//! The descriptor set is kept for server reflection.

use std::{env, path::PathBuf};

/// Messages with a `secret` field.
const SECRET_BEARING: [&str; 2] = [
    ".recvault.vault.v1.PutCredentialRequest",
    ".recvault.vault.v1.AcquireLeaseResponse",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/recvault/vault/v1/vault.proto",
        "proto/recvault/uploader/v1/uploader.proto",
    ];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("recvault_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    tonic_prost_build::configure()
        // Messages that carry a plaintext secret get a hand-written, redacted
        // Debug (src/redacted.rs) instead of the derived one.
        .skip_debug(SECRET_BEARING)
        .build_server(true)
        .build_client(true)
        .compile_fds(descriptors)?;
    Ok(())
}
