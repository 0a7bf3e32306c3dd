//! Versioned master keys: the root key file, wrapped per-version keys, and the
//! [`Keyring`] that seals and opens credential envelopes.
//! Key bytes and plaintext live only in `SecretBytes`; nothing here logs, prints or returns them otherwise.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use hkdf::Hkdf;
use recvault_runtime::secret::SecretBytes;
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::crypto::{self, A256CbcHs512Key, CryptoError, KEY_LEN, RecordAad};

/// Length of the root master key and of every per-version key: 256 bits.
pub const MASTER_KEY_LEN: usize = 32;
/// Length of a per-version key.
pub const VERSION_KEY_LEN: usize = 32;
/// HKDF info for the key-encryption key that wraps version keys.
pub const KEK_INFO: &[u8] = b"recvault keyring kek v1";

/// HKDF-SHA-256 salt for keys derived from the root key (RFC 5869 §3.1: a fixed,
/// non-secret salt is fine; it separates our derivations from any other use of the key).
const MASTER_KEY_SALT: &[u8] = b"recvault.master-key.hkdf-salt.v1";
/// HKDF-SHA-256 salt for credential keys derived from a version key.
const VERSION_KEY_SALT: &[u8] = b"recvault.version-key.hkdf-salt.v1";
/// Domain of the AAD that binds a wrapped version key to its version number.
const WRAP_AAD_DOMAIN: &[u8] = b"recvault.keyring.version.v1";
/// HKDF-SHA-256 can produce at most 255 hash lengths (RFC 5869 §2.3).
const HKDF_SHA256_MAX_LEN: usize = 255 * 32;
/// Key file: 64 lowercase hex characters and an optional "\n".
const KEY_FILE_HEX_LEN: usize = 2 * MASTER_KEY_LEN;

/// Why a master key file could not be loaded or created. Messages name the path
/// and say what to do; they never contain key material.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MasterKeyError {
    /// The key file could not be opened, read, written or synced.
    #[error("master key file {}: {source}", path.display())]
    Io {
        /// The key file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The key file is accessible to group or others.
    #[error(
        "master key file {} is readable or writable by group or others (mode {mode:04o}); run: chmod 600 {}",
        path.display(),
        path.display()
    )]
    Permissions {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The path is not a regular file.
    #[error("master key file {} is not a regular file", path.display())]
    NotAFile {
        /// The key file.
        path: PathBuf,
    },
    /// The content is not one line of 64 lowercase hex characters.
    #[error(
        "master key file {} is malformed: expected exactly 64 lowercase hex characters (32 bytes) on one line, with an optional trailing newline",
        path.display()
    )]
    Format {
        /// The key file.
        path: PathBuf,
    },
    /// `generate` found an existing file and refused to overwrite it.
    #[error(
        "master key file {} already exists; refusing to overwrite an existing master key",
        path.display()
    )]
    AlreadyExists {
        /// The key file.
        path: PathBuf,
    },
    /// The OS random number generator failed.
    #[error("the OS random number generator failed: {0}")]
    Random(getrandom::Error),
    /// A master key given in memory was not 32 bytes.
    #[error("a master key must be exactly 32 bytes")]
    InvalidLength,
}

/// The 32-byte root key. Only HKDF-derived keys ever leave it; `Debug` is redacted.
pub struct MasterKey(SecretBytes);

impl MasterKey {
    /// Wraps 32 bytes of key material already in locked memory.
    pub fn from_secret(key: SecretBytes) -> Result<Self, MasterKeyError> {
        if key.len() == MASTER_KEY_LEN {
            Ok(Self(key))
        } else {
            Err(MasterKeyError::InvalidLength)
        }
    }

    /// Reads the key file: one line of 64 lowercase hex characters, optional
    /// trailing newline. Refuses a file that group or others may access.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, MasterKeyError> {
        use recvault_runtime::secret::{PrivateFileError, read_private_file};
        let path = path.as_ref();
        // One byte more than the longest valid file, to notice trailing content.
        let (buf, len) = read_private_file(path, KEY_FILE_HEX_LEN + 1).map_err(|e| match e {
            PrivateFileError::Io(source) => MasterKeyError::Io {
                path: path.to_owned(),
                source,
            },
            PrivateFileError::NotAFile => MasterKeyError::NotAFile {
                path: path.to_owned(),
            },
            PrivateFileError::Permissions(mode) => MasterKeyError::Permissions {
                path: path.to_owned(),
                mode,
            },
        })?;
        let buf = buf.expose_secret();
        let format_err = || MasterKeyError::Format {
            path: path.to_owned(),
        };
        let hex_digits = match &buf[..len] {
            [digits @ .., b'\n'] | digits => digits,
        };
        if hex_digits.len() != KEY_FILE_HEX_LEN
            || !hex_digits
                .iter()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
        {
            return Err(format_err());
        }
        let mut key = SecretBytes::zeroed(MASTER_KEY_LEN);
        hex::decode_to_slice(hex_digits, key.expose_secret_mut()).map_err(|_| format_err())?;
        Ok(Self(key))
    }

    /// Creates a new key file with a fresh random key: mode 0600, `O_CREAT|O_EXCL`
    /// (an existing file is never overwritten), then fsyncs the file and its directory.
    pub fn generate(path: impl AsRef<Path>) -> Result<Self, MasterKeyError> {
        let path = path.as_ref();
        let io_err = |source| MasterKeyError::Io {
            path: path.to_owned(),
            source,
        };
        let mut key = SecretBytes::zeroed(MASTER_KEY_LEN);
        getrandom::fill(key.expose_secret_mut()).map_err(MasterKeyError::Random)?;
        let mut line = Zeroizing::new([0u8; KEY_FILE_HEX_LEN + 1]);
        hex::encode_to_slice(key.expose_secret(), &mut line[..KEY_FILE_HEX_LEN])
            .expect("64 hex characters encode 32 bytes");
        line[KEY_FILE_HEX_LEN] = b'\n';

        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| match e.kind() {
                io::ErrorKind::AlreadyExists => MasterKeyError::AlreadyExists {
                    path: path.to_owned(),
                },
                _ => io_err(e),
            })?;
        if let Err(e) = file.write_all(&line[..]).and_then(|()| file.sync_all()) {
            // A half-written key file would block the next `generate` and fail `load`.
            drop(file);
            let _ = std::fs::remove_file(path);
            return Err(io_err(e));
        }
        drop(file);
        // fsync the directory too, so the new entry survives a crash (fsync(2)).
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        File::open(dir).and_then(|d| d.sync_all()).map_err(io_err)?;
        Ok(Self(key))
    }

    /// Derives `len` bytes with HKDF-SHA-256 (RFC 5869) from the root key, with a
    /// fixed domain salt and `info` naming the purpose.
    ///
    /// # Panics
    /// If `len` exceeds 8160 bytes, the HKDF-SHA-256 limit (RFC 5869 §2.3).
    pub fn derive(&self, info: &[u8], len: usize) -> SecretBytes {
        hkdf_sha256(MASTER_KEY_SALT, self.0.expose_secret(), info, len)
    }

    /// The key-encryption key that wraps version keys.
    fn kek(&self) -> Result<A256CbcHs512Key, CryptoError> {
        A256CbcHs512Key::new(self.derive(KEK_INFO, KEY_LEN))
    }
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MasterKey([REDACTED])")
    }
}

fn hkdf_sha256(salt: &[u8], ikm: &[u8], info: &[u8], len: usize) -> SecretBytes {
    assert!(
        len <= HKDF_SHA256_MAX_LEN,
        "HKDF-SHA-256 output is limited to 8160 bytes"
    );
    let mut out = SecretBytes::zeroed(len);
    Hkdf::<Sha256>::new(Some(salt), ikm)
        .expand(info, out.expose_secret_mut())
        .expect("length checked above");
    out
}

/// AAD for a wrapped version key: domain ‖ version (u32 BE).
fn wrap_aad(version: u32) -> Vec<u8> {
    let mut aad = WRAP_AAD_DOMAIN.to_vec();
    aad.extend_from_slice(&version.to_be_bytes());
    aad
}

/// Creates key version `version`: a random 256-bit key, and that key sealed under
/// the root key's KEK with AAD binding `version` (to store in the database).
pub fn new_wrapped_version(
    master: &MasterKey,
    version: u32,
) -> Result<(SecretBytes, Vec<u8>), CryptoError> {
    let mut version_key = SecretBytes::zeroed(VERSION_KEY_LEN);
    getrandom::fill(version_key.expose_secret_mut()).map_err(|_| CryptoError)?;
    let wrapped = crypto::seal_envelope(
        &master.kek()?,
        version,
        &wrap_aad(version),
        version_key.expose_secret(),
    )?;
    Ok((version_key, wrapped))
}

/// Unwraps the stored key of version `version`. Fails if `wrapped` belongs to
/// another version, was made under another root key, or was altered.
pub fn unwrap_version(
    master: &MasterKey,
    version: u32,
    wrapped: &[u8],
) -> Result<SecretBytes, CryptoError> {
    if crypto::parse_header(wrapped)?.key_version != version {
        return Err(CryptoError);
    }
    let key = crypto::open_envelope(&master.kek()?, &wrap_aad(version), wrapped)?;
    if key.len() != VERSION_KEY_LEN {
        return Err(CryptoError);
    }
    Ok(key)
}

/// The 64-byte A256CBC-HS512 key of one version, derived with HKDF-SHA-256.
fn credential_key(version_key: &SecretBytes, version: u32) -> Result<A256CbcHs512Key, CryptoError> {
    let info = format!("recvault credential A256CBC-HS512 v{version}");
    A256CbcHs512Key::new(hkdf_sha256(
        VERSION_KEY_SALT,
        version_key.expose_secret(),
        info.as_bytes(),
        KEY_LEN,
    ))
}

/// Why a version key could not be added to the [`Keyring`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyringError {
    /// A version key must be exactly 32 bytes.
    #[error("version key {version} must be 32 bytes, got {len}")]
    InvalidVersionKeyLength {
        /// The version being inserted.
        version: u32,
        /// The length that was given.
        len: usize,
    },
    /// The version is already in the keyring.
    #[error("key version {version} is already in the keyring")]
    DuplicateVersion {
        /// The version being inserted.
        version: u32,
    },
}

/// Per-version credential keys. New envelopes use the newest version; versions
/// below `min_decrypt_version` are retired and no longer open. `Debug` shows versions only.
pub struct Keyring {
    keys: BTreeMap<u32, A256CbcHs512Key>,
    min_decrypt_version: u32,
}

impl Keyring {
    /// An empty keyring that refuses to open envelopes older than `min_decrypt_version`.
    pub fn new(min_decrypt_version: u32) -> Self {
        Self {
            keys: BTreeMap::new(),
            min_decrypt_version,
        }
    }

    /// Adds the 32-byte key of `version` (as returned by [`unwrap_version`]); the
    /// credential key is derived from it and the version key itself is dropped.
    pub fn insert(&mut self, version: u32, version_key: SecretBytes) -> Result<(), KeyringError> {
        if version_key.len() != VERSION_KEY_LEN {
            return Err(KeyringError::InvalidVersionKeyLength {
                version,
                len: version_key.len(),
            });
        }
        if self.keys.contains_key(&version) {
            return Err(KeyringError::DuplicateVersion { version });
        }
        let key = credential_key(&version_key, version)
            .expect("HKDF output of KEY_LEN bytes is a valid key");
        self.keys.insert(version, key);
        Ok(())
    }

    /// The newest version, used for every new envelope; `None` when empty.
    pub fn current_version(&self) -> Option<u32> {
        self.keys.last_key_value().map(|(v, _)| *v)
    }

    /// All versions held, ascending.
    pub fn versions(&self) -> Vec<u32> {
        self.keys.keys().copied().collect()
    }

    /// Envelopes sealed with a lower version are refused.
    pub fn min_decrypt_version(&self) -> u32 {
        self.min_decrypt_version
    }

    /// Retires every version below `version`. Rewrap stored credentials first:
    /// an envelope under a retired version no longer opens, not even for [`Keyring::rewrap`].
    pub fn set_min_decrypt_version(&mut self, version: u32) {
        self.min_decrypt_version = version;
    }

    /// Seals `plaintext` for the record (tenant, credential id, credential version)
    /// under the current version. Fails if the keyring is empty, the current version
    /// is retired, or the OS random number generator fails.
    pub fn seal(
        &self,
        tenant_id: &str,
        credential_id: &str,
        credential_version: u32,
        plaintext: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        let (&key_version, key) = self.keys.last_key_value().ok_or(CryptoError)?;
        if key_version < self.min_decrypt_version {
            return Err(CryptoError);
        }
        let aad = RecordAad {
            tenant_id,
            credential_id,
            credential_version,
            key_version,
        };
        crypto::seal_envelope(key, key_version, &aad.encode(), plaintext)
    }

    /// Opens an envelope of the given record. Refuses unknown or retired key
    /// versions and anything that does not authenticate for exactly this record.
    pub fn open(
        &self,
        tenant_id: &str,
        credential_id: &str,
        credential_version: u32,
        sealed: &[u8],
    ) -> Result<SecretBytes, CryptoError> {
        let key_version = crypto::parse_header(sealed)?.key_version;
        if key_version < self.min_decrypt_version {
            return Err(CryptoError);
        }
        let key = self.keys.get(&key_version).ok_or(CryptoError)?;
        let aad = RecordAad {
            tenant_id,
            credential_id,
            credential_version,
            key_version,
        };
        crypto::open_envelope(key, &aad.encode(), sealed)
    }

    /// [`Keyring::open`] that lends the plaintext to `f` from locked memory
    /// zeroized when `f` returns, without locking a new buffer per call
    /// ([`crypto::open_envelope_with`]). Same checks, same single error.
    pub fn open_with<R>(
        &self,
        tenant_id: &str,
        credential_id: &str,
        credential_version: u32,
        sealed: &[u8],
        f: impl FnOnce(&[u8]) -> R,
    ) -> Result<R, CryptoError> {
        let key_version = crypto::parse_header(sealed)?.key_version;
        if key_version < self.min_decrypt_version {
            return Err(CryptoError);
        }
        let key = self.keys.get(&key_version).ok_or(CryptoError)?;
        let aad = RecordAad {
            tenant_id,
            credential_id,
            credential_version,
            key_version,
        };
        crypto::open_envelope_with(key, &aad.encode(), sealed, f)
    }

    /// The key version named in an envelope's header (not authenticated by itself).
    pub fn sealed_key_version(&self, sealed: &[u8]) -> Result<u32, CryptoError> {
        Ok(crypto::parse_header(sealed)?.key_version)
    }

    /// Re-seals an envelope under the current version; `None` if it already uses it
    /// (returned without opening it). The plaintext stays inside this call.
    pub fn rewrap(
        &self,
        tenant_id: &str,
        credential_id: &str,
        credential_version: u32,
        sealed: &[u8],
    ) -> Result<Option<Vec<u8>>, CryptoError> {
        let current = self.current_version().ok_or(CryptoError)?;
        if self.sealed_key_version(sealed)? == current {
            return Ok(None);
        }
        let plaintext = self.open(tenant_id, credential_id, credential_version, sealed)?;
        self.seal(
            tenant_id,
            credential_id,
            credential_version,
            plaintext.expose_secret(),
        )
        .map(Some)
    }
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("versions", &self.versions())
            .field("current_version", &self.current_version())
            .field("min_decrypt_version", &self.min_decrypt_version)
            .finish()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt as _;

    const KEY_HEX: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

    fn write_key(dir: &Path, content: &[u8], mode: u32) -> PathBuf {
        let path = dir.join("master.key");
        fs::write(&path, content).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    fn master(byte: u8) -> MasterKey {
        MasterKey::from_secret(SecretBytes::from_slice(&[byte; 32])).unwrap()
    }

    #[test]
    fn load_accepts_0600_and_refuses_group_or_world_access() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_key(dir.path(), format!("{KEY_HEX}\n").as_bytes(), 0o600);
        let key = MasterKey::load(&path).unwrap();
        assert_eq!(
            key.0.expose_secret(),
            (0u8..32).collect::<Vec<_>>().as_slice()
        );

        for mode in [0o644, 0o640, 0o604, 0o620, 0o660] {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            let err = MasterKey::load(&path).unwrap_err();
            assert!(matches!(err, MasterKeyError::Permissions { .. }), "{err:?}");
            let msg = err.to_string();
            let shown = path.display().to_string();
            assert!(msg.contains(&format!("(mode 0{mode:o})")), "{msg}");
            assert!(msg.contains(&format!("run: chmod 600 {shown}")), "{msg}");
            assert!(!msg.contains(KEY_HEX));
        }
        fs::set_permissions(&path, fs::Permissions::from_mode(0o400)).unwrap();
        assert!(MasterKey::load(&path).is_ok());
    }

    #[test]
    fn load_accepts_missing_trailing_newline() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_key(dir.path(), KEY_HEX.as_bytes(), 0o600);
        assert!(MasterKey::load(&path).is_ok());
    }

    #[test]
    fn load_rejects_malformed_content_without_echoing_it() {
        let dir = tempfile::tempdir().unwrap();
        let upper = KEY_HEX.to_uppercase();
        let cases: Vec<Vec<u8>> = vec![
            Vec::new(),
            b"\n".to_vec(),
            KEY_HEX.as_bytes()[..62].to_vec(),
            format!("{KEY_HEX}00").into_bytes(),
            format!("{KEY_HEX}\n\n").into_bytes(),
            format!("{KEY_HEX}\r\n").into_bytes(),
            format!(" {KEY_HEX}").into_bytes(),
            format!("{KEY_HEX} ").into_bytes(),
            upper.clone().into_bytes(),
            format!("{}zz\n", &KEY_HEX[..62]).into_bytes(),
            format!("{KEY_HEX}\n{KEY_HEX}\n").into_bytes(),
        ];
        for content in cases {
            let path = write_key(dir.path(), &content, 0o600);
            let err = MasterKey::load(&path).unwrap_err();
            assert!(matches!(err, MasterKeyError::Format { .. }), "{err:?}");
            let msg = err.to_string();
            assert!(msg.contains(&path.display().to_string()), "{msg}");
            assert!(msg.contains("64 lowercase hex"), "{msg}");
            assert!(
                !msg.contains(&KEY_HEX[..16]) && !msg.contains(&upper[..16]),
                "{msg}"
            );
        }
    }

    #[test]
    fn load_reports_missing_file_and_directories() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.key");
        let err = MasterKey::load(&missing).unwrap_err();
        assert!(matches!(err, MasterKeyError::Io { .. }));
        assert!(err.to_string().contains("nope.key"));
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).unwrap();
        let err = MasterKey::load(dir.path()).unwrap_err();
        assert!(matches!(err, MasterKeyError::NotAFile { .. }), "{err:?}");
    }

    #[test]
    fn generate_creates_0600_file_that_loads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.key");
        let generated = MasterKey::generate(&path).unwrap();
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(meta.len(), 65);
        let loaded = MasterKey::load(&path).unwrap();
        assert_eq!(generated.0, loaded.0);
        assert_ne!(generated.0.expose_secret(), &[0u8; 32]);
    }

    #[test]
    fn generate_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_key(dir.path(), format!("{KEY_HEX}\n").as_bytes(), 0o600);
        let err = MasterKey::generate(&path).unwrap_err();
        assert!(
            matches!(err, MasterKeyError::AlreadyExists { .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("refusing to overwrite"));
        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            format!("{KEY_HEX}\n"),
            "existing key must be untouched"
        );
    }

    #[test]
    fn derive_is_deterministic_and_separated_by_info() {
        let m = master(1);
        let a = m.derive(b"a", 64);
        assert_eq!(a.len(), 64);
        assert_eq!(a, m.derive(b"a", 64));
        assert_ne!(a, m.derive(b"b", 64));
        assert_ne!(a, master(2).derive(b"a", 64));
        assert_eq!(&a.expose_secret()[..32], m.derive(b"a", 32).expose_secret());
    }

    #[test]
    fn debug_shows_no_key_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.key");
        let m = MasterKey::generate(&path).unwrap();
        let key_bytes = m.0.expose_secret().to_vec();
        let shown = format!("{m:?} {m:#?}");
        assert!(!shown.contains(&hex::encode(&key_bytes)[..8]), "{shown}");
        assert!(
            !shown.contains(&format!("{:?}", &key_bytes[..4])),
            "{shown}"
        );
        assert!(shown.contains("REDACTED"));

        let (vk, _) = new_wrapped_version(&m, 3).unwrap();
        let vk_bytes = vk.expose_secret().to_vec();
        let mut ring = Keyring::new(1);
        ring.insert(3, vk).unwrap();
        let shown = format!("{ring:?} {ring:#?}");
        assert!(shown.contains("versions: [3]"), "{shown}");
        assert!(shown.contains("current_version: Some(3)"), "{shown}");
        for secret in [&key_bytes, &vk_bytes] {
            assert!(!shown.contains(&hex::encode(secret)[..8]), "{shown}");
            assert!(!shown.contains(&format!("{:?}", &secret[..4])), "{shown}");
        }
    }

    #[test]
    fn wrapped_version_round_trip_and_binding() {
        let m = master(7);
        let (vk, wrapped) = new_wrapped_version(&m, 5).unwrap();
        assert_eq!(vk.len(), VERSION_KEY_LEN);
        assert_eq!(crypto::parse_header(&wrapped).unwrap().key_version, 5);
        assert_eq!(unwrap_version(&m, 5, &wrapped).unwrap(), vk);
        // Another version number, another root key, or a flipped bit: refused.
        assert!(unwrap_version(&m, 6, &wrapped).is_err());
        assert!(unwrap_version(&master(8), 5, &wrapped).is_err());
        let mut bad = wrapped.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(unwrap_version(&m, 5, &bad).is_err());
        // Header rewritten to claim version 6: AAD and header authentication both fail.
        let mut relabelled = wrapped.clone();
        relabelled[4..8].copy_from_slice(&6u32.to_be_bytes());
        assert!(unwrap_version(&m, 6, &relabelled).is_err());
    }

    #[test]
    fn keyring_insert_rules_and_versions() {
        let mut ring = Keyring::new(1);
        assert_eq!(ring.current_version(), None);
        assert!(ring.seal("t", "c", 1, b"x").is_err());
        assert_eq!(
            ring.insert(1, SecretBytes::zeroed(31)),
            Err(KeyringError::InvalidVersionKeyLength {
                version: 1,
                len: 31
            })
        );
        ring.insert(2, SecretBytes::from_slice(&[2; 32])).unwrap();
        ring.insert(1, SecretBytes::from_slice(&[1; 32])).unwrap();
        assert_eq!(
            ring.insert(2, SecretBytes::from_slice(&[9; 32])),
            Err(KeyringError::DuplicateVersion { version: 2 })
        );
        assert_eq!(ring.versions(), vec![1, 2]);
        assert_eq!(ring.current_version(), Some(2));
        let sealed = ring.seal("t", "c", 1, b"pw").unwrap();
        assert_eq!(ring.sealed_key_version(&sealed).unwrap(), 2);
        assert_eq!(
            ring.open("t", "c", 1, &sealed).unwrap().expose_secret(),
            b"pw"
        );
        // Same version key, different version number: different credential key.
        let mut other = Keyring::new(1);
        other.insert(3, SecretBytes::from_slice(&[2; 32])).unwrap();
        let relabelled = {
            let mut s = sealed.clone();
            s[4..8].copy_from_slice(&3u32.to_be_bytes());
            s
        };
        assert!(other.open("t", "c", 1, &relabelled).is_err());
    }

    #[test]
    fn seal_refuses_when_current_version_is_retired() {
        let mut ring = Keyring::new(1);
        ring.insert(1, SecretBytes::from_slice(&[1; 32])).unwrap();
        ring.set_min_decrypt_version(2);
        assert!(ring.seal("t", "c", 1, b"x").is_err());
    }

    #[test]
    fn keyring_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Keyring>();
        assert_send_sync::<MasterKey>();
    }
}
