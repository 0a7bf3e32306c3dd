//! The public half of the backup data-key contract that both services must
//! agree on byte for byte: the HPKE (RFC 9180) `info` strings and the
//! associated data that binds a wrapped data key to its recording. No key
//! material lives here; the vault derives the private key, the uploader only
//! ever holds the public key.

/// HPKE `info` when the uploader wraps a recording's data key to the vault's
/// wrapping public key.
pub const WRAP_INFO: &[u8] = b"recvault backup data key v1";

/// HPKE `info` when the vault re-seals an unwrapped data key to the caller's
/// ephemeral public key.
pub const RESEAL_INFO: &[u8] = b"recvault backup data key to uploader v1";

/// Length of a data key (AES-256-GCM) and of an X25519 key, in bytes.
pub const KEY_LEN: usize = 32;

/// HPKE associated data: `u32be(len(tenant)) ‖ tenant ‖ u32be(len(recording)) ‖
/// recording`. A wrapped key moved to another tenant or recording does not open.
pub fn binding(tenant_id: &str, recording_id: &str) -> Vec<u8> {
    crate::hpke::aad(&[tenant_id, recording_id])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binding_is_length_prefixed() {
        assert_eq!(
            binding("ab", "c"),
            [0, 0, 0, 2, b'a', b'b', 0, 0, 0, 1, b'c']
        );
        // No two (tenant, recording) pairs share an encoding.
        assert_ne!(binding("a", "bc"), binding("ab", "c"));
    }
}
