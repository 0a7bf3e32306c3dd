//! The backup wrapping key pair and the HPKE (RFC 9180) steps of the
//! `DataKeys` service: open a data key the uploader wrapped to us, re-seal it
//! to the caller's ephemeral key. The private key is derived from the master
//! key, so a backup can be recovered with the master key alone.
//! Nothing here logs or returns a private key or a data key in clear.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use aws_lc_rs::agreement;
use base64::Engine;
use recvault_runtime::datakey::{KEY_LEN, RESEAL_INFO, WRAP_INFO, binding};
use recvault_runtime::secret::SecretBytes;
use rustls::crypto::hpke::{EncapsulatedSecret, HpkePrivateKey, HpkePublicKey};

use crate::keyring::MasterKey;

/// Generation of the wrapping key derivation below. Backups name it in their
/// header; other values are reserved for a future derivation.
pub const WRAPPING_KEY_VERSION: u32 = 1;

/// HKDF-SHA-256 `info` of the X25519 private key of generation 1 (the salt is
/// the master key's, see [`MasterKey::derive`]). Changing it orphans every backup.
pub const WRAPPING_KEY_INFO: &[u8] = b"recvault backup-wrap X25519 v1";

/// The HPKE suite, as `GetWrappingKey` names it (RFC 9180 §7: KEM 0x0020,
/// KDF 0x0001, AEAD 0x0002), used in base mode (§5.1.1).
pub const SUITE: &str = recvault_runtime::hpke::SUITE_NAME;

/// Length of an HPKE `enc` for DHKEM(X25519): Nenc = 32 (RFC 9180 §7.1).
pub const ENC_LEN: usize = 32;

/// Length of a wrapped data key: 32 bytes of key plus the 16-byte AES-GCM tag (Nt, RFC 9180 §7.3).
pub const WRAPPED_KEY_LEN: usize = KEY_LEN + 16;

use recvault_runtime::hpke::suite;

/// Why a data-key operation failed. Deliberately coarse: none says which
/// check inside HPKE failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DataKeyError {
    /// The wrapped key did not open: wrong tenant or recording, another
    /// vault's key, or altered bytes. One answer for all of them.
    #[error("the wrapped data key does not open for this tenant and recording")]
    DoesNotOpen,
    /// The recipient public key is not usable for X25519 (e.g. a low-order point).
    #[error(
        "recipient_public_key is not a usable X25519 public key; send the public half of a fresh X25519 key pair"
    )]
    BadRecipient,
    /// The key derivation or the crypto library failed.
    #[error("the backup wrapping key could not be derived")]
    Derive,
}

/// The vault's X25519 wrapping key pair of one generation. The private key
/// lives only in locked, zeroized memory; `Debug` shows the public half only.
pub struct WrappingKey {
    version: u32,
    private: SecretBytes,
    public: [u8; KEY_LEN],
}

impl WrappingKey {
    /// Derives generation [`WRAPPING_KEY_VERSION`]: the private key is
    /// HKDF-SHA-256 of the master key with [`WRAPPING_KEY_INFO`], 32 bytes,
    /// used as an X25519 scalar as RFC 7748 §5 decodes it; the public key is
    /// X25519(private, 9), computed by aws-lc-rs.
    pub fn derive(master: &MasterKey) -> Result<Self, DataKeyError> {
        let private = master.derive(WRAPPING_KEY_INFO, KEY_LEN);
        let public = public_key_of(&private)?;
        Ok(Self {
            version: WRAPPING_KEY_VERSION,
            private,
            public,
        })
    }

    /// The generation of this key pair.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The X25519 public key (RFC 7748 encoding).
    pub fn public_key(&self) -> &[u8; KEY_LEN] {
        &self.public
    }

    /// The public key file the uploader reads: TOML with `key_version` and the
    /// standard base64 of the public key.
    pub fn public_key_file(&self) -> String {
        format!(
            "# recvault backup wrapping public key (X25519, HPKE RFC 9180 {SUITE}): \
             uploaderd seals each recording's data key to it. Public, not a secret.\n\
             key_version = {}\n\
             public_key = \"{}\"\n",
            self.version,
            base64::engine::general_purpose::STANDARD.encode(self.public)
        )
    }

    /// Opens a data key wrapped to this key pair with `info` = [`WRAP_INFO`]
    /// and `aad` = [`binding`]`(tenant_id, recording_id)` (RFC 9180 §6.1
    /// single-shot open). The key goes straight into locked memory.
    pub fn unwrap(
        &self,
        tenant_id: &str,
        recording_id: &str,
        enc: &[u8],
        wrapped_key: &[u8],
    ) -> Result<SecretBytes, DataKeyError> {
        if enc.len() != ENC_LEN || wrapped_key.len() != WRAPPED_KEY_LEN {
            return Err(DataKeyError::DoesNotOpen);
        }
        // HpkePrivateKey zeroizes its copy of the scalar when it drops.
        let private = HpkePrivateKey::from(self.private.expose_secret().to_vec());
        let opened = suite()
            .open(
                &EncapsulatedSecret(enc.to_vec()),
                WRAP_INFO,
                &binding(tenant_id, recording_id),
                wrapped_key,
                &private,
            )
            .map_err(|_| DataKeyError::DoesNotOpen)?;
        // Moved, not copied, into locked memory (zeroized on drop).
        let key = SecretBytes::new(opened);
        if key.len() != KEY_LEN {
            return Err(DataKeyError::DoesNotOpen);
        }
        Ok(key)
    }
}

impl fmt::Debug for WrappingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WrappingKey")
            .field("version", &self.version)
            .field("public", &hex::encode(self.public))
            .field("private", &"[REDACTED]")
            .finish()
    }
}

/// X25519 public key of a 32-byte private key, by aws-lc-rs (RFC 7748 §6.1).
pub(crate) fn public_key_of(private: &SecretBytes) -> Result<[u8; KEY_LEN], DataKeyError> {
    let key = agreement::PrivateKey::from_private_key(&agreement::X25519, private.expose_secret())
        .map_err(|_| DataKeyError::Derive)?;
    let public = key.compute_public_key().map_err(|_| DataKeyError::Derive)?;
    public.as_ref().try_into().map_err(|_| DataKeyError::Derive)
}

/// Seals `data_key` to `recipient_public_key` with `info` and `aad` (RFC 9180
/// §6.1 single-shot seal, base mode). Returns (`enc`, ciphertext).
pub fn seal(
    recipient_public_key: &[u8],
    info: &[u8],
    aad: &[u8],
    data_key: &SecretBytes,
) -> Result<(Vec<u8>, Vec<u8>), DataKeyError> {
    if recipient_public_key.len() != KEY_LEN {
        return Err(DataKeyError::BadRecipient);
    }
    let (enc, sealed) = suite()
        .seal(
            info,
            aad,
            data_key.expose_secret(),
            &HpkePublicKey(recipient_public_key.to_vec()),
        )
        .map_err(|_| DataKeyError::BadRecipient)?;
    Ok((enc.0, sealed))
}

/// Seals an unwrapped data key to the caller's ephemeral key for
/// `UnwrapDataKey`: `info` = [`RESEAL_INFO`], the same binding as the wrap.
pub fn reseal(
    recipient_public_key: &[u8],
    tenant_id: &str,
    recording_id: &str,
    data_key: &SecretBytes,
) -> Result<(Vec<u8>, Vec<u8>), DataKeyError> {
    seal(
        recipient_public_key,
        RESEAL_INFO,
        &binding(tenant_id, recording_id),
        data_key,
    )
}

/// Writes the public key file atomically: a temporary file in the same
/// directory, mode 0644, fsynced, renamed over `path`, then the directory
/// fsynced, so a reader sees the old file or the new one, never half of one.
pub fn write_public_key_file(path: &Path, key: &WrappingKey) -> Result<(), String> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| format!("--out {} names no file", path.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let io_err = |what: &str, p: &Path, e: io::Error| format!("cannot {what} {}: {e}", p.display());
    let written = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&tmp)?;
        // The mode given to open(2) is reduced by the umask; the file is public by design.
        file.set_permissions(std::fs::Permissions::from_mode(0o644))?;
        file.write_all(key.public_key_file().as_bytes())?;
        file.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(io_err("write", &tmp, e));
    }
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(io_err("replace", path, e));
    }
    File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err("sync directory", &dir, e))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn master(byte: u8) -> MasterKey {
        MasterKey::from_secret(SecretBytes::from_slice(&[byte; 32])).unwrap()
    }

    fn random_key() -> SecretBytes {
        let mut key = SecretBytes::zeroed(KEY_LEN);
        getrandom::fill(key.expose_secret_mut()).unwrap();
        key
    }

    #[test]
    fn derivation_is_deterministic_and_separated_by_master_key() {
        let a = WrappingKey::derive(&master(1)).unwrap();
        assert_eq!(a.version(), WRAPPING_KEY_VERSION);
        assert_eq!(
            a.public_key(),
            WrappingKey::derive(&master(1)).unwrap().public_key()
        );
        assert_ne!(
            a.public_key(),
            WrappingKey::derive(&master(2)).unwrap().public_key()
        );
        // Another HKDF info than any other key derived from the master key.
        assert_ne!(
            master(1).derive(WRAPPING_KEY_INFO, 32),
            master(1).derive(crate::keyring::KEK_INFO, 32)
        );
    }

    #[test]
    fn wrap_unwrap_reseal_round_trip_and_binding() {
        let key = WrappingKey::derive(&master(3)).unwrap();
        let data_key = random_key();
        let (enc, wrapped) = seal(
            key.public_key(),
            WRAP_INFO,
            &binding("acme", "rec-1"),
            &data_key,
        )
        .unwrap();
        assert_eq!((enc.len(), wrapped.len()), (ENC_LEN, WRAPPED_KEY_LEN));
        let opened = key.unwrap("acme", "rec-1", &enc, &wrapped).unwrap();
        assert_eq!(opened, data_key);

        for (tenant, recording) in [("acme", "rec-2"), ("globex", "rec-1"), ("acmerec-1", "")] {
            assert_eq!(
                key.unwrap(tenant, recording, &enc, &wrapped),
                Err(DataKeyError::DoesNotOpen)
            );
        }
        let mut flipped = wrapped.clone();
        flipped[0] ^= 1;
        assert!(key.unwrap("acme", "rec-1", &enc, &flipped).is_err());
        let other = WrappingKey::derive(&master(4)).unwrap();
        assert!(other.unwrap("acme", "rec-1", &enc, &wrapped).is_err());
        // Sealed with the re-seal info, it does not open as a wrap.
        let (enc2, resealed) = reseal(key.public_key(), "acme", "rec-1", &data_key).unwrap();
        assert!(key.unwrap("acme", "rec-1", &enc2, &resealed).is_err());
    }

    #[test]
    fn a_low_order_recipient_key_is_refused() {
        let data_key = random_key();
        assert_eq!(
            reseal(&[0u8; 32], "t", "r", &data_key).err(),
            Some(DataKeyError::BadRecipient)
        );
        assert_eq!(
            reseal(&[9u8; 31], "t", "r", &data_key).err(),
            Some(DataKeyError::BadRecipient)
        );
    }

    #[test]
    fn debug_and_file_show_the_public_key_only() {
        let m = master(5);
        let key = WrappingKey::derive(&m).unwrap();
        let private = m.derive(WRAPPING_KEY_INFO, 32);
        let private_hex = hex::encode(private.expose_secret());
        let private_b64 = base64::engine::general_purpose::STANDARD.encode(private.expose_secret());
        let shown = format!("{key:?} {key:#?} {}", key.public_key_file());
        assert!(shown.contains(&hex::encode(key.public_key())), "{shown}");
        assert!(shown.contains("REDACTED"), "{shown}");
        for secret in [&private_hex[..16], &private_b64[..16]] {
            assert!(!shown.contains(secret), "{shown}");
        }
        assert!(!shown.contains(&format!("{:?}", &private.expose_secret()[..4])));
    }

    #[test]
    fn public_key_file_is_written_atomically_with_mode_0644() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wrapping-key.pub");
        std::fs::write(&path, "old").unwrap();
        let key = WrappingKey::derive(&master(6)).unwrap();
        write_public_key_file(&path, &key).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, key.public_key_file());
        let parsed: toml::Table = toml::from_str(&text).unwrap();
        assert_eq!(parsed["key_version"].as_integer(), Some(1));
        let b64 = parsed["public_key"].as_str().unwrap();
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap();
        assert_eq!(decoded, key.public_key());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
        // Nothing left beside it.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [std::ffi::OsString::from("wrapping-key.pub")]);
        // A directory that does not exist: a clear error naming it.
        let err = write_public_key_file(&dir.path().join("no/such/dir/k.pub"), &key).unwrap_err();
        assert!(err.contains("no/such/dir"), "{err}");
    }
}
