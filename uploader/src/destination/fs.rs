//! Local-directory destination (provider `fs`, bucket = the directory): the
//! embedded default. Writes via a temporary file, fsync, rename, directory
//! fsync, then re-hashes what was written. It never writes outside the
//! directory and never leaves a partial file under the final name.

use std::path::{Component, Path, PathBuf};

use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::{
    Delivery, DeliveryError, DeliveryHooks, DestinationConfig, ObjectInfo, ProbeError, VerifiedBy,
    sidecar_contents, sidecar_name,
};

/// Copy and hash buffer.
const BUFFER: usize = 1024 * 1024;

/// A directory that receives recordings under `prefix/`.
#[derive(Debug, Clone)]
pub struct FsDestination {
    root: PathBuf,
    prefix: String,
}

impl FsDestination {
    /// `config.bucket` is the directory (it must exist when delivering).
    pub fn new(config: &DestinationConfig) -> Result<Self, DeliveryError> {
        let config_error = |message: String| DeliveryError::Config {
            destination: format!("fs:{}", config.bucket),
            message,
        };
        if config.bucket.is_empty() {
            return Err(config_error(
                "the directory (bucket) is empty; set it to an existing directory".into(),
            ));
        }
        super::object_key(&config.prefix, "x").map_err(|e| config_error(e.to_string()))?;
        Ok(Self {
            root: PathBuf::from(&config.bucket),
            prefix: config.prefix.clone(),
        })
    }

    /// The key (relative path) for a recording called `name`.
    pub fn object_key(&self, name: &str) -> Result<String, DeliveryError> {
        super::object_key(&self.prefix, name).map_err(|e| DeliveryError::Config {
            destination: format!("fs:{}", self.root.display()),
            message: format!("cannot name a file {name:?}: {e}"),
        })
    }

    /// Copies, writes the sidecar, re-hashes. See [`super::Destination::deliver`].
    pub async fn deliver(
        &self,
        source: &Path,
        object: &ObjectInfo,
        hooks: &DeliveryHooks<'_>,
    ) -> Result<Delivery, DeliveryError> {
        let key = self.object_key(&object.name)?;
        let sidecar_key = self.object_key(&sidecar_name(&object.name))?;
        let target = self.resolve(&key).await?;
        let sidecar_target = self.resolve(&sidecar_key).await?;

        self.copy_in(source, object, &target, hooks.progress)
            .await?;
        let sidecar = sidecar_contents(&object.sha256, &object.name);
        write_atomically(&sidecar_target, sidecar.as_bytes()).await?;

        // Verify what the file system now returns under the final names.
        let crate::digest::FileDigest {
            size: len, sha256, ..
        } = crate::digest::hash_file_async(&target)
            .await
            .map_err(|e| DeliveryError::Write {
                path: target.clone(),
                source: e,
            })?;
        let digest = *sha256.as_bytes();
        if len != object.size || digest != object.sha256 {
            return Err(DeliveryError::Verification {
                location: target.display().to_string(),
                detail: format!(
                    "read back {len} bytes with SHA-256 {}, expected {} bytes with SHA-256 {}",
                    hex::encode(digest),
                    object.size,
                    hex::encode(object.sha256)
                ),
            });
        }
        let written = tokio::fs::read(&sidecar_target)
            .await
            .map_err(|e| DeliveryError::Write {
                path: sidecar_target.clone(),
                source: e,
            })?;
        if written != sidecar.as_bytes() {
            return Err(DeliveryError::Verification {
                location: sidecar_target.display().to_string(),
                detail: "the sidecar's contents differ from what was written".into(),
            });
        }
        tracing::info!(location = %target.display(), size = object.size, "recording delivered");
        Ok(Delivery {
            location: target.display().to_string(),
            key,
            sidecar_location: sidecar_target.display().to_string(),
            verified_by: VerifiedBy::ReadBack,
        })
    }

    /// Creates, syncs and deletes a probe file under the prefix.
    pub async fn probe(&self) -> Result<(), ProbeError> {
        let key = self.object_key(&format!(".recvault-probe-{}", uuid::Uuid::new_v4()))?;
        let target = self.resolve(&key).await?;
        write_atomically(&target, b"recvault destination probe\n").await?;
        tokio::fs::remove_file(&target)
            .await
            .map_err(|e| DeliveryError::Write {
                path: target,
                source: e,
            })?;
        Ok(())
    }

    /// The absolute path for `key`, after creating the prefix directories and
    /// checking (after symlinks) that it is still inside the root.
    async fn resolve(&self, key: &str) -> Result<PathBuf, DeliveryError> {
        let root = match tokio::fs::canonicalize(&self.root).await {
            Ok(root) if root.is_dir() => root,
            _ => {
                return Err(DeliveryError::BucketMissing {
                    path: self.root.clone(),
                });
            }
        };
        let relative = Path::new(key);
        // `object_key` already refuses `..`; this is the second line of defence.
        if !relative
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
        {
            return Err(self.escape_error(key));
        }
        let target = root.join(relative);
        let parent = target.parent().unwrap_or(&root).to_owned();
        tokio::fs::create_dir_all(&parent)
            .await
            .map_err(|e| DeliveryError::Write {
                path: parent.clone(),
                source: e,
            })?;
        let real_parent =
            tokio::fs::canonicalize(&parent)
                .await
                .map_err(|e| DeliveryError::Write {
                    path: parent.clone(),
                    source: e,
                })?;
        if !real_parent.starts_with(&root) {
            return Err(self.escape_error(key));
        }
        let file_name = target
            .file_name()
            .map(ToOwned::to_owned)
            .unwrap_or_default();
        Ok(real_parent.join(file_name))
    }

    fn escape_error(&self, key: &str) -> DeliveryError {
        DeliveryError::Config {
            destination: format!("fs:{}", self.root.display()),
            message: format!(
                "{key:?} would be written outside the destination directory; refusing"
            ),
        }
    }

    /// Streams `source` into a temporary file beside `target`, hashing what is
    /// read; only a copy that matches the recorded size, SHA-256 and CRC-32 is
    /// synced and renamed into place.
    async fn copy_in(
        &self,
        source: &Path,
        object: &ObjectInfo,
        target: &Path,
        progress: &(dyn Fn(u64) + Send + Sync),
    ) -> Result<(), DeliveryError> {
        let source_error = |e| DeliveryError::Source {
            path: source.to_owned(),
            source: e,
        };
        let mut input = tokio::fs::File::open(source).await.map_err(source_error)?;
        let (tmp, mut output) = TempFile::create(target).await?;
        let write_error = |e| DeliveryError::Write {
            path: tmp.path.clone(),
            source: e,
        };

        let mut sha = Sha256::new();
        let mut crc = crc32fast::Hasher::new();
        let mut copied: u64 = 0;
        let mut buf = vec![0u8; BUFFER];
        loop {
            let n = input.read(&mut buf).await.map_err(source_error)?;
            if n == 0 {
                break;
            }
            let chunk = &buf[..n];
            sha.update(chunk);
            crc.update(chunk);
            output.write_all(chunk).await.map_err(write_error)?;
            copied += n as u64;
            progress(copied);
        }
        let digest: [u8; 32] = sha.finalize().into();
        let what = if copied != object.size {
            Some("size")
        } else if digest != object.sha256 {
            Some("SHA-256")
        } else if crc.finalize() != object.crc32 {
            Some("CRC-32")
        } else {
            None
        };
        if let Some(what) = what {
            return Err(DeliveryError::SourceMismatch {
                path: source.to_owned(),
                what,
            });
        }
        output.flush().await.map_err(write_error)?;
        output.sync_all().await.map_err(write_error)?;
        drop(output);
        tmp.persist(target).await
    }
}

/// Writes small `bytes` to `target` atomically (temp file, fsync, rename, dir fsync).
async fn write_atomically(target: &Path, bytes: &[u8]) -> Result<(), DeliveryError> {
    let (tmp, mut file) = TempFile::create(target).await?;
    let write_error = |e| DeliveryError::Write {
        path: tmp.path.clone(),
        source: e,
    };
    file.write_all(bytes).await.map_err(write_error)?;
    file.flush().await.map_err(write_error)?;
    file.sync_all().await.map_err(write_error)?;
    drop(file);
    tmp.persist(target).await
}

/// A temporary file beside its target, removed on drop unless persisted.
struct TempFile {
    path: PathBuf,
    persisted: bool,
}

impl TempFile {
    async fn create(target: &Path) -> Result<(Self, tokio::fs::File), DeliveryError> {
        let dir = target.parent().unwrap_or(Path::new("."));
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default();
        let path = dir.join(format!(".{name}.{}.tmp", uuid::Uuid::new_v4().simple()));
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .await
            .map_err(|e| DeliveryError::Write {
                path: path.clone(),
                source: e,
            })?;
        Ok((
            Self {
                path,
                persisted: false,
            },
            file,
        ))
    }

    /// Renames into place and syncs the directory so the rename is durable.
    async fn persist(mut self, target: &Path) -> Result<(), DeliveryError> {
        tokio::fs::rename(&self.path, target)
            .await
            .map_err(|e| DeliveryError::Write {
                path: target.to_owned(),
                source: e,
            })?;
        self.persisted = true;
        let dir = target.parent().unwrap_or(Path::new("."));
        let sync = async { tokio::fs::File::open(dir).await?.sync_all().await };
        sync.await.map_err(|e| DeliveryError::Write {
            path: dir.to_owned(),
            source: e,
        })
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.persisted {
            // Best effort: a leftover ".…tmp" is harmless and never under the final name.
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
