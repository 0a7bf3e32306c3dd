//! The vault's wrapping public key, read from the file `vaultd wrapping-key`
//! writes, and the one thing the uploader does with it: seal a recording's
//! data key to it with HPKE (RFC 9180 base mode), so backups are written while
//! the vault is down and only the vault can open them again. Public material
//! only; the private key never leaves the vault.

use std::fmt;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use recvault_runtime::{datakey, secret::SecretBytes};
use rustls::crypto::hpke::HpkePublicKey;
use serde::Deserialize;

use super::format::{ENC_LEN, WRAPPED_KEY_LEN};

/// The HPKE suite of every wrap and re-seal (RFC 9180 §7).
pub use recvault_runtime::hpke::suite;

/// Why the wrapping key file cannot be used. Each message names the file and
/// the config field, and says how to make a good one.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WrappingKeyError {
    /// The file is missing, unreadable or not TOML.
    #[error(
        "[backup] wrapping_key_file: {0}; write it with `vaultd wrapping-key --config <vault config> --out <file>`"
    )]
    File(#[from] recvault_runtime::config::ConfigError),
    /// A field is wrong.
    #[error(
        "[backup] wrapping_key_file {}: {problem}; write it again with `vaultd wrapping-key --config <vault config> --out {}`",
        path.display(),
        path.display()
    )]
    Field {
        /// The file.
        path: PathBuf,
        /// Which field and what is wrong.
        problem: String,
    },
}

/// The file's fields: `key_version = 1` and `public_key = "<base64>"`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    key_version: u32,
    public_key: String,
}

/// The vault's wrapping public key and its generation.
#[derive(Clone, PartialEq, Eq)]
pub struct WrappingKey {
    version: u32,
    public_key: [u8; datakey::KEY_LEN],
}

impl fmt::Debug for WrappingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WrappingKey")
            .field("version", &self.version)
            .field(
                "public_key",
                &base64::engine::general_purpose::STANDARD.encode(self.public_key),
            )
            .finish()
    }
}

impl WrappingKey {
    /// A key from its parts (tests, and callers that got it from `GetWrappingKey`).
    pub fn new(version: u32, public_key: [u8; datakey::KEY_LEN]) -> Self {
        Self {
            version,
            public_key,
        }
    }

    /// Reads the TOML file `vaultd wrapping-key` writes.
    pub fn load(path: &Path) -> Result<Self, WrappingKeyError> {
        let file: KeyFile = recvault_runtime::config::read_toml(path)?;
        let field = |problem: String| WrappingKeyError::Field {
            path: path.to_owned(),
            problem,
        };
        if file.key_version == 0 {
            return Err(field("key_version must be 1 or more".into()));
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(file.public_key.trim())
            .map_err(|e| field(format!("public_key is not standard base64 ({e})")))?;
        let public_key = <[u8; datakey::KEY_LEN]>::try_from(bytes.as_slice()).map_err(|_| {
            field(format!(
                "public_key must be 32 bytes (an X25519 public key), not {}",
                bytes.len()
            ))
        })?;
        Ok(Self::new(file.key_version, public_key))
    }

    /// Generation of the key pair, stored in each backup header.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The X25519 public key.
    pub fn public_key(&self) -> &[u8; datakey::KEY_LEN] {
        &self.public_key
    }

    /// Seals `data_key` to this key with `info = WRAP_INFO` and `aad =
    /// binding(tenant, recording)`: returns HPKE's `enc` and ciphertext.
    pub fn wrap(
        &self,
        data_key: &SecretBytes,
        tenant_id: &str,
        recording_id: &str,
    ) -> Result<([u8; ENC_LEN], [u8; WRAPPED_KEY_LEN]), WrapError> {
        let (enc, wrapped) = suite()
            .seal(
                datakey::WRAP_INFO,
                &datakey::binding(tenant_id, recording_id),
                data_key.expose_secret(),
                &HpkePublicKey(self.public_key.to_vec()),
            )
            .map_err(|e| WrapError(e.to_string()))?;
        let enc = <[u8; ENC_LEN]>::try_from(enc.0.as_slice())
            .map_err(|_| WrapError(format!("HPKE enc is {} bytes, not 32", enc.0.len())))?;
        let wrapped = <[u8; WRAPPED_KEY_LEN]>::try_from(wrapped.as_slice()).map_err(|_| {
            WrapError(format!(
                "HPKE ciphertext is {} bytes, not 48",
                wrapped.len()
            ))
        })?;
        Ok((enc, wrapped))
    }
}

/// HPKE refused to seal (an invalid public key, e.g. all zeros).
#[derive(Debug, thiserror::Error)]
#[error(
    "wrapping the data key to the vault's public key failed: {0}; check [backup] wrapping_key_file"
)]
pub struct WrapError(String);

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn write(dir: &Path, text: &str) -> PathBuf {
        let path = dir.join("wrap.pub");
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn loads_the_file_vaultd_writes_and_names_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let b64 = base64::engine::general_purpose::STANDARD.encode([5u8; 32]);
        let ok = write(
            dir.path(),
            &format!(
                "# recvault backup wrapping public key\nkey_version = 1\npublic_key = \"{b64}\"\n"
            ),
        );
        let key = WrappingKey::load(&ok).unwrap();
        assert_eq!((key.version(), key.public_key()), (1, &[5u8; 32]));

        let short = base64::engine::general_purpose::STANDARD.encode([5u8; 31]);
        for (text, needle) in [
            (
                format!("key_version = 1\npublic_key = \"{short}\"\n"),
                "32 bytes",
            ),
            (
                "key_version = 1\npublic_key = \"%%%\"\n".to_owned(),
                "base64",
            ),
            (
                format!("key_version = 0\npublic_key = \"{b64}\"\n"),
                "key_version",
            ),
            (format!("public_key = \"{b64}\"\n"), "key_version"),
            ("key_version = 1\n".to_owned(), "public_key"),
        ] {
            let err = WrappingKey::load(&write(dir.path(), &text))
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
            assert!(err.contains("wrapping_key_file"), "{err}");
        }
        let missing = WrappingKey::load(&dir.path().join("nope"))
            .unwrap_err()
            .to_string();
        assert!(
            missing.contains("wrapping_key_file") && missing.contains("vaultd wrapping-key"),
            "{missing}"
        );
    }

    #[test]
    fn wrap_opens_with_the_private_key_and_the_binding_only() {
        let (public, private) = suite().generate_key_pair().unwrap();
        let key = WrappingKey::new(1, public.0.as_slice().try_into().unwrap());
        let data_key = SecretBytes::from_slice(&[3; 32]);
        let (enc, wrapped) = key.wrap(&data_key, "acme", "rec-1").unwrap();
        let enc = rustls::crypto::hpke::EncapsulatedSecret(enc.to_vec());
        let open = |aad: &[u8]| suite().open(&enc, datakey::WRAP_INFO, aad, &wrapped, &private);
        assert_eq!(open(&datakey::binding("acme", "rec-1")).unwrap(), [3; 32]);
        assert!(open(&datakey::binding("acme", "rec-2")).is_err());
        assert!(open(&datakey::binding("other", "rec-1")).is_err());
    }
}
