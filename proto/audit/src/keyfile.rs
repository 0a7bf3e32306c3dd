//! An audit key kept in its own file, for a service that does not hold the
//! vault's master key (the uploader). The file is exactly 32 random bytes,
//! readable by its owner only; it is read into locked, zeroizing memory and
//! never copied anywhere else.

use std::{
    fs::{File, OpenOptions},
    io::{self, Write},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
};

use recvault_runtime::secret::SecretBytes;

use crate::AuditKey;

/// Why an audit key file could not be read or created. Messages name the
/// path and what to do; they never contain key material.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyFileError {
    /// The file could not be opened, read, written or synced.
    #[error(
        "audit key file {}: {source}; create one with `uploaderd init-audit-key --file {}`",
        path.display(),
        path.display()
    )]
    Io {
        /// The key file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// Group or others may access the file.
    #[error(
        "audit key file {} is readable or writable by group or others (mode {mode:04o}); run: chmod 600 {}",
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
    #[error("audit key file {} is not a regular file", path.display())]
    NotAFile {
        /// The key file.
        path: PathBuf,
    },
    /// The file does not hold exactly 32 bytes.
    #[error(
        "audit key file {} must hold exactly 32 random bytes, it holds {len}{more}; create a new one with `uploaderd init-audit-key --file PATH`",
        path.display(),
        more = if *len > AuditKey::LEN { " or more" } else { "" }
    )]
    Length {
        /// The key file.
        path: PathBuf,
        /// Bytes read (at most one more than the key length).
        len: usize,
    },
    /// `generate_file` found an existing file and refused to overwrite it.
    #[error(
        "audit key file {} already exists; refusing to overwrite it (a new key cannot verify the events chained under the old one)",
        path.display()
    )]
    AlreadyExists {
        /// The key file.
        path: PathBuf,
    },
    /// The OS random number generator failed.
    #[error("the OS random number generator failed: {0}")]
    Random(getrandom::Error),
}

impl AuditKey {
    /// Reads a key file: exactly [`Self::LEN`] bytes, owner-only permissions
    /// (checked on the opened file, so a swap cannot slip in between).
    pub fn load_file(path: &Path) -> Result<Self, KeyFileError> {
        use recvault_runtime::secret::{PrivateFileError, read_private_file};
        let path_buf = || path.to_owned();
        let (buf, len) = read_private_file(path, Self::LEN).map_err(|e| match e {
            PrivateFileError::Io(source) => KeyFileError::Io {
                path: path_buf(),
                source,
            },
            PrivateFileError::NotAFile => KeyFileError::NotAFile { path: path_buf() },
            PrivateFileError::Permissions(mode) => KeyFileError::Permissions {
                path: path_buf(),
                mode,
            },
        })?;
        if len != Self::LEN {
            return Err(KeyFileError::Length {
                path: path.to_owned(),
                len,
            });
        }
        let key = SecretBytes::from_slice(&buf.expose_secret()[..Self::LEN]);
        Self::new(key).map_err(|_| KeyFileError::Length {
            path: path.to_owned(),
            len,
        })
    }

    /// Creates a key file with 32 fresh random bytes: mode 0600, never over
    /// an existing file (`O_CREAT|O_EXCL`), then fsyncs the file and its
    /// directory so the key survives a crash. A half-written file is removed.
    pub fn generate_file(path: &Path) -> Result<(), KeyFileError> {
        let io_err = |source| KeyFileError::Io {
            path: path.to_owned(),
            source,
        };
        let mut key = SecretBytes::zeroed(Self::LEN);
        getrandom::fill(key.expose_secret_mut()).map_err(KeyFileError::Random)?;
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| match e.kind() {
                io::ErrorKind::AlreadyExists => KeyFileError::AlreadyExists {
                    path: path.to_owned(),
                },
                _ => io_err(e),
            })?;
        if let Err(e) = file
            .write_all(key.expose_secret())
            .and_then(|()| file.sync_all())
        {
            drop(file);
            let _ = std::fs::remove_file(path);
            return Err(io_err(e));
        }
        drop(file);
        // fsync(2): the new directory entry is durable only once the
        // directory itself is synced.
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        File::open(dir).and_then(|d| d.sync_all()).map_err(io_err)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::fs;
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    fn write(path: &Path, content: &[u8], mode: u32) {
        fs::write(path, content).unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn generated_file_is_0600_loads_and_is_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.key");
        AuditKey::generate_file(&path).unwrap();
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(meta.len(), 32);
        let before = fs::read(&path).unwrap();
        assert_ne!(before, vec![0; 32]);
        AuditKey::load_file(&path).unwrap();
        let err = AuditKey::generate_file(&path).unwrap_err();
        assert!(matches!(err, KeyFileError::AlreadyExists { .. }), "{err}");
        assert_eq!(fs::read(&path).unwrap(), before, "the key was kept");
    }

    #[test]
    fn refuses_group_or_world_access_naming_the_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.key");
        write(&path, &[7; 32], 0o600);
        AuditKey::load_file(&path).unwrap();
        for mode in [0o640, 0o604, 0o620, 0o644] {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            let err = AuditKey::load_file(&path).unwrap_err().to_string();
            assert!(
                err.contains(&format!("(mode 0{mode:o})")) && err.contains("chmod 600"),
                "{err}"
            );
        }
        fs::set_permissions(&path, fs::Permissions::from_mode(0o400)).unwrap();
        AuditKey::load_file(&path).unwrap();
    }

    #[test]
    fn refuses_a_missing_short_or_long_file_without_echoing_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.key");
        let err = AuditKey::load_file(&path).unwrap_err().to_string();
        assert!(
            err.contains("audit.key") && err.contains("init-audit-key"),
            "{err}"
        );
        for (content, says) in [
            (vec![0x41; 31], "it holds 31"),
            (vec![], "it holds 0"),
            (vec![0x41; 64], "it holds 33 or more"),
        ] {
            write(&path, &content, 0o600);
            let err = AuditKey::load_file(&path).unwrap_err().to_string();
            assert!(err.contains(says) && !err.contains("AAAA"), "{err}");
        }
        let err = AuditKey::load_file(dir.path()).unwrap_err();
        assert!(matches!(err, KeyFileError::NotAFile { .. }), "{err}");
    }
}
