//! The HPKE (RFC 9180) contract both services seal with: one suite, the
//! `info` strings and associated data of every sealed message, and a
//! one-request key pair whose private half lives in locked, zeroizing memory.
//!
//! Suite: base mode, DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-256-GCM,
//! single-shot (RFC 9180 §6.1), on aws-lc-rs through rustls. Associated data
//! is a list of fields, each `u32be(len) ‖ bytes`, so no two lists share an
//! encoding. What is sealed where:
//!
//! | message                      | to                         | info              | aad                         |
//! |------------------------------|----------------------------|-------------------|-----------------------------|
//! | `AcquireLeaseResponse`       | the caller's one-call key  | [`LEASE_INFO`]    | (lease id, credential id)   |
//! | `PutCredentialRequest`       | the vault's sealing key    | [`PUT_INFO`]      | (tenant id, name)           |
//! | backup data keys             | see [`crate::datakey`]     |                   | (tenant id, recording id)   |

use std::fmt;

use rustls::crypto::hpke::{EncapsulatedSecret, Hpke, HpkePrivateKey, HpkePublicKey};

use crate::secret::SecretBytes;

/// `info` of a leased secret sealed to the uploader's one-call key.
pub const LEASE_INFO: &[u8] = b"recvault credential lease v1";

/// `info` of a secret sealed to the vault's sealing key for `PutCredential`.
pub const PUT_INFO: &[u8] = b"recvault credential put v1";

/// The suite's name, as the vault's key RPCs report it.
pub const SUITE_NAME: &str = "DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-256-GCM";

/// Length of an X25519 key and of HPKE's `enc` for it (Nenc = Npk = 32).
pub const KEY_LEN: usize = 32;

/// The one HPKE suite (RFC 9180 §7: KEM 0x0020, KDF 0x0001, AEAD 0x0002).
pub fn suite() -> &'static dyn Hpke {
    rustls::crypto::aws_lc_rs::hpke::DH_KEM_X25519_HKDF_SHA256_AES_256
}

/// Associated data: each field as `u32be(len) ‖ bytes`.
pub fn aad(fields: &[&str]) -> Vec<u8> {
    let mut out = Vec::with_capacity(fields.iter().map(|f| 4 + f.len()).sum());
    for field in fields {
        // Fields are ids and names validated far below 4 GiB.
        let len = u32::try_from(field.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(field.as_bytes());
    }
    out
}

/// HPKE refused: a key that is not a usable X25519 key, or a ciphertext that
/// does not open (wrong key, info, associated data, or altered bytes). One
/// answer for all of them, on purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("HPKE sealing or opening failed")]
pub struct HpkeError;

/// Seals `plaintext` to `public_key`. Returns (`enc`, ciphertext).
pub fn seal(
    public_key: &[u8],
    info: &[u8],
    aad: &[u8],
    plaintext: &[u8],
) -> Result<(Vec<u8>, Vec<u8>), HpkeError> {
    if public_key.len() != KEY_LEN {
        return Err(HpkeError);
    }
    let (enc, sealed) = suite()
        .seal(info, aad, plaintext, &HpkePublicKey(public_key.to_vec()))
        .map_err(|_| HpkeError)?;
    Ok((enc.0, sealed))
}

/// Opens a ciphertext with the X25519 private key `private` (32 bytes), the
/// plaintext moved into locked, zeroizing memory.
pub fn open(
    private: &SecretBytes,
    info: &[u8],
    aad: &[u8],
    enc: &[u8],
    ciphertext: &[u8],
) -> Result<SecretBytes, HpkeError> {
    if enc.len() != KEY_LEN {
        return Err(HpkeError);
    }
    // HpkePrivateKey zeroizes its copy of the scalar when it drops.
    let private = HpkePrivateKey::from(private.expose_secret().to_vec());
    let opened = suite()
        .open(
            &EncapsulatedSecret(enc.to_vec()),
            info,
            aad,
            ciphertext,
            &private,
        )
        .map_err(|_| HpkeError)?;
    Ok(SecretBytes::new(opened))
}

/// An X25519 key pair made for one request: the public half goes out, the
/// private half stays in locked memory and is wiped when this drops.
pub struct OneCallKey {
    public: Vec<u8>,
    private: SecretBytes,
}

impl OneCallKey {
    /// A fresh key pair from the system's randomness (aws-lc-rs).
    pub fn generate() -> Result<Self, HpkeError> {
        let (public, private) = suite().generate_key_pair().map_err(|_| HpkeError)?;
        // `private` zeroizes itself when it drops at the end of this call.
        Ok(Self {
            public: public.0,
            private: SecretBytes::from_slice(private.secret_bytes()),
        })
    }

    /// The public half (32 bytes), for the request.
    pub fn public_key(&self) -> &[u8] {
        &self.public
    }

    /// Opens what the peer sealed to this key.
    pub fn open(
        &self,
        info: &[u8],
        aad: &[u8],
        enc: &[u8],
        ciphertext: &[u8],
    ) -> Result<SecretBytes, HpkeError> {
        open(&self.private, info, aad, enc, ciphertext)
    }
}

impl fmt::Debug for OneCallKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OneCallKey")
            .field("public", &hex::encode(&self.public))
            .field("private", &"[REDACTED]")
            .finish()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn aad_is_length_prefixed() {
        assert_eq!(
            aad(&["ab", "c"]),
            [0, 0, 0, 2, b'a', b'b', 0, 0, 0, 1, b'c']
        );
        assert_ne!(aad(&["a", "bc"]), aad(&["ab", "c"]));
        assert_ne!(aad(&["ab"]), aad(&["ab", ""]));
    }

    #[test]
    fn sealed_to_a_one_call_key_opens_with_its_info_and_aad_only() {
        let key = OneCallKey::generate().unwrap();
        let binding = aad(&["lease_1", "cred_1"]);
        let (enc, sealed) = seal(key.public_key(), LEASE_INFO, &binding, b"top secret").unwrap();
        assert_eq!(
            key.open(LEASE_INFO, &binding, &enc, &sealed)
                .unwrap()
                .expose_secret(),
            b"top secret"
        );
        assert!(
            key.open(LEASE_INFO, &aad(&["lease_2", "cred_1"]), &enc, &sealed)
                .is_err()
        );
        assert!(key.open(PUT_INFO, &binding, &enc, &sealed).is_err());
        let other = OneCallKey::generate().unwrap();
        assert!(other.open(LEASE_INFO, &binding, &enc, &sealed).is_err());
        let mut flipped = sealed.clone();
        flipped[0] ^= 1;
        assert!(key.open(LEASE_INFO, &binding, &enc, &flipped).is_err());
        // A key that is not 32 bytes, or a low-order point, is refused.
        assert!(seal(&[9; 31], LEASE_INFO, &binding, b"x").is_err());
        assert!(seal(&[0; 32], LEASE_INFO, &binding, b"x").is_err());
    }

    #[test]
    fn debug_shows_the_public_half_only() {
        let key = OneCallKey::generate().unwrap();
        let shown = format!("{key:?}");
        assert!(shown.contains(&hex::encode(key.public_key())));
        assert!(!shown.contains(&hex::encode(key.private.expose_secret())));
    }
}
