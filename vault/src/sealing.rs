//! Secrets sealed end to end at the application layer, so gRPC, HTTP/2 and
//! TLS only ever carry ciphertext (HPKE, see `recvault_runtime::hpke`):
//!
//! - `PutCredential`: the client seals the secret to the vault's sealing key
//!   (an X25519 key pair derived from the master key, published by
//!   `Credentials/GetSealingKey`), bound to the tenant and name; the vault
//!   opens it straight into locked memory.
//! - `AcquireLease`: the vault seals the secret to the caller's one-call
//!   public key, bound to the lease id and credential id.
//!
//! The clear fields stay for grpcurl debugging behind `[secrets]
//! allow_plaintext` (off unless the config turns it on); [`plaintext_refused`]
//! is the one refusal message.

use std::fmt;

use recvault_runtime::hpke::{self, KEY_LEN, LEASE_INFO, PUT_INFO};
use recvault_runtime::secret::SecretBytes;

use crate::datakeys::{DataKeyError, public_key_of};
use crate::error::VaultError;
use crate::keyring::MasterKey;

/// Generation of the sealing key derivation; clients send it back in
/// `sealing_key_version`.
pub const SEALING_KEY_VERSION: u32 = 1;

/// HKDF-SHA-256 `info` of the sealing key's X25519 private key (the salt is
/// the master key's, see [`MasterKey::derive`]).
pub const SEALING_KEY_INFO: &[u8] = b"recvault credential-sealing X25519 v1";

/// The refusal of a secret sent in clear while `allow_plaintext` is off.
pub fn plaintext_refused(what: &str, instead: &str) -> VaultError {
    VaultError::FailedPrecondition(format!(
        "{what} in clear is refused: this vault's config has [secrets] allow_plaintext = false \
         (the production setting); {instead}, as the recvault CLI and uploaderd do, \
         or set allow_plaintext = true on a development vault"
    ))
}

/// The vault's credential sealing key pair. The private key lives only in
/// locked, zeroized memory; `Debug` shows the public half only.
pub struct SealingKey {
    private: SecretBytes,
    public: [u8; KEY_LEN],
}

impl SealingKey {
    /// Derives generation [`SEALING_KEY_VERSION`] from the master key, as
    /// the backup wrapping key is derived, with [`SEALING_KEY_INFO`].
    pub fn derive(master: &MasterKey) -> Result<Self, DataKeyError> {
        let private = master.derive(SEALING_KEY_INFO, KEY_LEN);
        let public = public_key_of(&private)?;
        Ok(Self { private, public })
    }

    /// The generation of this key pair.
    pub fn version(&self) -> u32 {
        SEALING_KEY_VERSION
    }

    /// The X25519 public key.
    pub fn public_key(&self) -> &[u8; KEY_LEN] {
        &self.public
    }

    /// Opens a `PutCredential` secret sealed for `tenant_id` and `name`.
    pub fn open_put(
        &self,
        tenant_id: &str,
        name: &str,
        key_version: u32,
        enc: &[u8],
        sealed: &[u8],
    ) -> Result<SecretBytes, VaultError> {
        if key_version != SEALING_KEY_VERSION {
            return Err(VaultError::FailedPrecondition(format!(
                "sealing_key_version {key_version} is not this vault's ({SEALING_KEY_VERSION}); \
                 seal to the key Credentials/GetSealingKey returns"
            )));
        }
        hpke::open(
            &self.private,
            PUT_INFO,
            &hpke::aad(&[tenant_id, name]),
            enc,
            sealed,
        )
        .map_err(|_| {
            VaultError::InvalidArgument(format!(
                "sealed_secret does not open with this vault's sealing key for tenant {tenant_id:?} \
                 and name {name:?}: seal it to the key Credentials/GetSealingKey returns, with \
                 info \"recvault credential put v1\" and the tenant and name as associated data"
            ))
        })
    }
}

impl fmt::Debug for SealingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SealingKey")
            .field("version", &SEALING_KEY_VERSION)
            .field("public", &hex::encode(self.public))
            .field("private", &"[REDACTED]")
            .finish()
    }
}

/// Seals a leased secret to the caller's one-call key, bound to the lease
/// and the credential. Returns (`enc`, ciphertext).
pub fn seal_lease(
    recipient_public_key: &[u8],
    lease_id: &str,
    credential_id: &str,
    secret: &[u8],
) -> Result<(Vec<u8>, Vec<u8>), VaultError> {
    hpke::seal(
        recipient_public_key,
        LEASE_INFO,
        &hpke::aad(&[lease_id, credential_id]),
        secret,
    )
    .map_err(|_| {
        VaultError::InvalidArgument(
            "recipient_public_key is not a usable X25519 public key; send the public half of a \
             fresh X25519 key pair (32 bytes)"
                .into(),
        )
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use recvault_runtime::hpke::OneCallKey;

    fn master(byte: u8) -> MasterKey {
        MasterKey::from_secret(SecretBytes::from_slice(&[byte; 32])).unwrap()
    }

    #[test]
    fn a_put_sealed_for_one_tenant_and_name_opens_for_them_only() {
        let key = SealingKey::derive(&master(1)).unwrap();
        assert_eq!(
            key.public_key(),
            SealingKey::derive(&master(1)).unwrap().public_key()
        );
        // Not the backup wrapping key.
        let wrapping = crate::datakeys::WrappingKey::derive(&master(1)).unwrap();
        assert_ne!(key.public_key(), wrapping.public_key());
        let (enc, sealed) = hpke::seal(
            key.public_key(),
            PUT_INFO,
            &hpke::aad(&["acme", "s3"]),
            b"{\"k\":1}",
        )
        .unwrap();
        let opened = key.open_put("acme", "s3", 1, &enc, &sealed).unwrap();
        assert_eq!(opened.expose_secret(), b"{\"k\":1}");
        for (tenant, name) in [("globex", "s3"), ("acme", "s3-other")] {
            let err = key.open_put(tenant, name, 1, &enc, &sealed).unwrap_err();
            assert!(err.to_string().contains("GetSealingKey"), "{err}");
        }
        let err = key.open_put("acme", "s3", 2, &enc, &sealed).unwrap_err();
        assert!(err.to_string().contains("sealing_key_version 2"), "{err}");
        let other = SealingKey::derive(&master(2)).unwrap();
        assert!(other.open_put("acme", "s3", 1, &enc, &sealed).is_err());
    }

    #[test]
    fn a_lease_opens_with_the_one_call_key_lease_and_credential_only() {
        let one = OneCallKey::generate().unwrap();
        let (enc, sealed) = seal_lease(one.public_key(), "lease_1", "cred_1", b"s").unwrap();
        let aad = |l: &str, c: &str| hpke::aad(&[l, c]);
        assert!(
            one.open(LEASE_INFO, &aad("lease_1", "cred_1"), &enc, &sealed)
                .is_ok()
        );
        assert!(
            one.open(LEASE_INFO, &aad("lease_2", "cred_1"), &enc, &sealed)
                .is_err()
        );
        assert!(
            one.open(LEASE_INFO, &aad("lease_1", "cred_2"), &enc, &sealed)
                .is_err()
        );
        let err = seal_lease(&[1; 5], "l", "c", b"s").unwrap_err();
        assert!(err.to_string().contains("recipient_public_key"), "{err}");
    }

    #[test]
    fn debug_shows_no_private_key() {
        let m = master(3);
        let shown = format!("{:?}", SealingKey::derive(&m).unwrap());
        let private = m.derive(SEALING_KEY_INFO, 32);
        assert!(
            !shown.contains(&hex::encode(private.expose_secret())),
            "{shown}"
        );
        assert!(shown.contains("REDACTED"));
    }
}
