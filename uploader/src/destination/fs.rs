//! Local-directory destination (provider `fs`, bucket = the directory): the
//! embedded default. Copies from the recording's [`Source`] via a temporary
//! file, fsync, rename, directory fsync, then re-hashes what was written. It
//! never opens the backup itself, writes only inside the directory, and only
//! while that directory lies inside one of the operator's allowed roots
//! (`[destinations].fs_allowed_roots`), checked again before every write; it
//! never leaves a partial file under the final name and never follows a
//! symlink at a name it creates.

use std::ffi::OsStr;
use std::fmt;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::{
    Delivery, DeliveryError, DeliveryHooks, DestinationConfig, ObjectInfo, ProbeError, Source,
    VerifiedBy, check_source_size, sidecar_contents, sidecar_name,
};

/// Copy and hash buffer.
const BUFFER: usize = 1024 * 1024;

/// Longest file name a local directory takes (`NAME_MAX` on Linux file systems).
const NAME_MAX: usize = 255;

/// The config setting that allows directories, as errors name it.
const SETTING: &str = "[destinations].fs_allowed_roots in the uploader config";

/// The directories under which `fs` destinations may write: the uploader's
/// `[destinations].fs_allowed_roots`, as configured (absolute paths). Empty
/// (the default) refuses every `fs` destination.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct FsAllowedRoots(Arc<[PathBuf]>);

impl fmt::Debug for FsAllowedRoots {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.0.iter()).finish()
    }
}

impl fmt::Display for FsAllowedRoots {
    /// `["/srv/recordings", "/mnt/b"]`, as the setting is written.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|p| p.display().to_string()))
            .finish()
    }
}

/// A destination directory that lies inside an allowed root, both resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedDir {
    /// The destination directory, canonical (symlinks resolved).
    pub dir: PathBuf,
    /// The canonical allowed root it lies in (it may be `dir` itself).
    pub root: PathBuf,
}

/// Why a directory may not be an `fs` destination. Messages name the bucket
/// and the setting to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FsRootError {
    /// No root is configured: every `fs` destination is refused.
    #[error(
        "bucket {bucket:?}: local-directory (fs) destinations are not allowed on this uploader: \
         {SETTING} is empty; add this directory, or one above it, to it"
    )]
    NoRoots {
        /// The destination's directory, as given.
        bucket: String,
    },
    /// The directory is given as a relative path (it would depend on the
    /// uploader's working directory).
    #[error(
        "bucket {bucket:?}: must be an absolute path to a directory inside an allowed root \
         (allowed: {allowed})"
    )]
    Relative {
        /// The directory, as given.
        bucket: String,
        /// The configured roots.
        allowed: String,
    },
    /// The directory does not exist (or is not a directory).
    #[error(
        "bucket {bucket:?}: directory does not exist or is not a directory ({reason}); \
         create it inside an allowed root (allowed: {allowed})"
    )]
    Missing {
        /// The directory, as given.
        bucket: String,
        /// What the file system said.
        reason: String,
        /// The configured roots.
        allowed: String,
    },
    /// The directory (after symlinks) is not inside any root.
    #[error(
        "bucket {bucket:?}: directory is not inside an allowed root{resolved}; add a root to \
         {SETTING} (allowed: {allowed})"
    )]
    Outside {
        /// The directory, as given.
        bucket: String,
        /// ` (it resolves to "…")` when symlinks lead elsewhere, else empty.
        resolved: String,
        /// The configured roots.
        allowed: String,
    },
}

impl FsAllowedRoots {
    /// The roots as configured. Relative entries should already be resolved
    /// against the config file's directory.
    pub fn new(roots: impl IntoIterator<Item = PathBuf>) -> Self {
        Self(roots.into_iter().collect())
    }

    /// The configured roots.
    pub fn as_slice(&self) -> &[PathBuf] {
        &self.0
    }

    /// Whether no root is configured (every `fs` destination is refused).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Resolves `bucket` (canonicalized, symlinks included) and checks that it
    /// is an existing directory inside one of the roots (also canonicalized;
    /// the root itself is allowed). A root that does not exist allows nothing.
    /// Blocking: it asks the file system.
    pub fn resolve(&self, bucket: &Path) -> Result<ResolvedDir, FsRootError> {
        let shown = || bucket.display().to_string();
        let allowed = || self.to_string();
        if self.is_empty() {
            return Err(FsRootError::NoRoots { bucket: shown() });
        }
        if !bucket.is_absolute() {
            return Err(FsRootError::Relative {
                bucket: shown(),
                allowed: allowed(),
            });
        }
        let missing = |reason: String| FsRootError::Missing {
            bucket: shown(),
            reason,
            allowed: allowed(),
        };
        let dir = std::fs::canonicalize(bucket).map_err(|e| missing(e.to_string()))?;
        if !dir.is_dir() {
            return Err(missing("it is not a directory".into()));
        }
        // `starts_with` compares whole components, so "/srv/rec" does not
        // contain "/srv/recordings-other".
        let root = self
            .0
            .iter()
            .filter_map(|root| std::fs::canonicalize(root).ok())
            .find(|root| dir.starts_with(root));
        match root {
            Some(root) => Ok(ResolvedDir { dir, root }),
            None => Err(FsRootError::Outside {
                bucket: shown(),
                resolved: if dir == bucket {
                    String::new()
                } else {
                    format!(" (it resolves to {:?})", dir.display().to_string())
                },
                allowed: allowed(),
            }),
        }
    }
}

/// A directory that receives recordings under `prefix/`.
#[derive(Debug, Clone)]
pub struct FsDestination {
    root: PathBuf,
    prefix: String,
    allowed: FsAllowedRoots,
}

impl FsDestination {
    /// `config.bucket` is the directory: an absolute path that must exist, inside
    /// one of `allowed`, whenever something is written (checked then, not here).
    pub fn new(
        config: &DestinationConfig,
        allowed: &FsAllowedRoots,
    ) -> Result<Self, DeliveryError> {
        let config_error = |message: String| DeliveryError::Config {
            destination: format!("fs:{}", config.bucket),
            message,
        };
        if config.bucket.is_empty() {
            return Err(config_error(
                "the directory (bucket) is empty; set it to an existing directory".into(),
            ));
        }
        super::object_key(&config.prefix, "x")
            .map_err(|e| config_error(format!("prefix {:?}: {e}", config.prefix)))?;
        let root = PathBuf::from(&config.bucket);
        if allowed.is_empty() {
            return Err(DeliveryError::FsRoot(FsRootError::NoRoots {
                bucket: config.bucket.clone(),
            }));
        }
        if !root.is_absolute() {
            return Err(DeliveryError::FsRoot(FsRootError::Relative {
                bucket: config.bucket.clone(),
                allowed: allowed.to_string(),
            }));
        }
        Ok(Self {
            root,
            prefix: config.prefix.clone(),
            allowed: allowed.clone(),
        })
    }

    /// The key (relative path) for a recording called `name`.
    pub fn object_key(&self, name: &str) -> Result<String, DeliveryError> {
        let refused = |message: String| DeliveryError::Config {
            destination: format!("fs:{}", self.root.display()),
            message: format!("cannot name a file {name:?}: {message}"),
        };
        if name.len() > NAME_MAX {
            return Err(refused(format!(
                "it is {} bytes long; a local directory takes names of at most {NAME_MAX} bytes \
                 (the sidecar adds 7: \".sha256\"); resend it under a shorter file_name",
                name.len()
            )));
        }
        super::object_key(&self.prefix, name).map_err(|e| refused(e.to_string()))
    }

    /// Copies, writes the sidecar, re-hashes. See [`super::Destination::deliver`].
    pub async fn deliver(
        &self,
        source: Arc<dyn Source>,
        object: &ObjectInfo,
        hooks: &DeliveryHooks<'_>,
    ) -> Result<Delivery, DeliveryError> {
        let key = self.object_key(&object.name)?;
        check_source_size(source.as_ref(), object)?;
        let sidecar_key = self.object_key(&sidecar_name(&object.name))?;
        let target = self.resolve(&key).await?;
        let sidecar_target = self.resolve(&sidecar_key).await?;

        self.copy_in(source.as_ref(), object, &target, hooks.progress)
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

    /// The absolute path for `key`: the destination directory is checked
    /// against the allowed roots again (the config may have changed since
    /// PutDestination, or the directory may have been swapped for a symlink),
    /// the prefix directories are created, and the final parent is checked to
    /// be inside the destination directory and the root, after symlinks.
    async fn resolve(&self, key: &str) -> Result<PathBuf, DeliveryError> {
        let (root, key_owned, allowed) = (self.root.clone(), key.to_owned(), self.allowed.clone());
        tokio::task::spawn_blocking(move || resolve_blocking(&root, &key_owned, &allowed))
            .await
            .map_err(|e| DeliveryError::Write {
                path: self.root.clone(),
                source: io::Error::other(format!("the resolving task failed: {e}")),
            })?
    }

    /// Streams `source` into a temporary file beside `target`, hashing what is
    /// read; only a copy that matches the recorded size, SHA-256 and CRC-32 is
    /// synced and renamed into place. A failed read (a backup that does not
    /// authenticate, among others) leaves only the temporary file, removed.
    async fn copy_in(
        &self,
        source: &dyn Source,
        object: &ObjectInfo,
        target: &Path,
        progress: &(dyn Fn(u64) + Send + Sync),
    ) -> Result<(), DeliveryError> {
        let source_error = DeliveryError::from_source_read;
        let mut input = source
            .open_range(0, object.size)
            .await
            .map_err(source_error)?;
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
            return Err(DeliveryError::SourceMismatch { what });
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
        // A fixed-length name: one derived from the target's could pass NAME_MAX.
        let path = dir.join(format!(".recvault-{}.tmp", uuid::Uuid::new_v4().simple()));
        // O_CREAT|O_EXCL (create_new) never opens an existing file or follows
        // a symlink planted at this name; O_NOFOLLOW says so explicitly
        // (POSIX open(2): O_EXCL with O_CREAT fails on a symbolic link).
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
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
    /// rename(2) replaces whatever is at `target`, a symlink included, and
    /// never follows it.
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

/// [`FsDestination::resolve`]'s work, on a blocking thread.
///
/// Residual race, stated honestly: every check here is path-based. Between
/// the last check and the creation of the temporary file (and its rename),
/// someone who can write inside the destination directory on this host could
/// swap a prefix directory for a symlink, and the file would land where it
/// points. Names that come through the API cannot do that (they have no `/`,
/// `..` or control characters, and the API creates no symlinks); closing it
/// against local users too would need descriptor-relative opens
/// (`openat2` with `RESOLVE_BENEATH`). The final name itself is never
/// followed (see [`TempFile`]).
fn resolve_blocking(
    bucket: &Path,
    key: &str,
    allowed: &FsAllowedRoots,
) -> Result<PathBuf, DeliveryError> {
    let escape = || DeliveryError::Config {
        destination: format!("fs:{}", bucket.display()),
        message: format!("{key:?} would be written outside the destination directory; refusing"),
    };
    let resolved = allowed.resolve(bucket).map_err(|e| match e {
        FsRootError::Missing { .. } => DeliveryError::BucketMissing {
            path: bucket.to_owned(),
        },
        other => DeliveryError::FsRoot(other),
    })?;
    let ResolvedDir { dir, root } = resolved;
    // `object_key` already refuses `..` and absolute names; this is the second line of defence.
    // Split on '/' ourselves: `Path::components` would quietly drop `.` and
    // doubled slashes, and each piece must be one plain name.
    let mut parts: Vec<&OsStr> = Vec::new();
    for segment in key.split('/') {
        let mut components = Path::new(segment).components();
        match (components.next(), components.next()) {
            (Some(Component::Normal(part)), None) if part == OsStr::new(segment) => {
                parts.push(part);
            }
            _ => return Err(escape()),
        }
    }
    let file_name = parts.pop().ok_or_else(escape)?;

    // One directory at a time: mkdir(2) does not follow a symlink at the
    // name it creates (it fails with EEXIST), so nothing is ever created
    // outside; an existing entry is resolved and must stay inside.
    let mut parent = dir.clone();
    for part in parts {
        let next = parent.join(part);
        match std::fs::create_dir(&next) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(source) => return Err(DeliveryError::Write { path: next, source }),
        }
        let real = std::fs::canonicalize(&next).map_err(|source| DeliveryError::Write {
            path: next.clone(),
            source,
        })?;
        if !real.starts_with(&dir) {
            return Err(escape());
        }
        parent = real;
    }
    // The final parent, resolved once more right before the file is created.
    let real_parent = std::fs::canonicalize(&parent).map_err(|source| DeliveryError::Write {
        path: parent.clone(),
        source,
    })?;
    if !real_parent.starts_with(&root) || !real_parent.starts_with(&dir) {
        return Err(escape());
    }
    if !real_parent.is_dir() {
        return Err(DeliveryError::Write {
            path: real_parent,
            source: io::Error::new(
                io::ErrorKind::NotADirectory,
                "a file is in the way of the prefix directory",
            ),
        });
    }
    Ok(real_parent.join(file_name))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::destination::Provider;

    fn roots(paths: &[&Path]) -> FsAllowedRoots {
        FsAllowedRoots::new(paths.iter().map(|p| p.to_path_buf()))
    }

    fn config(bucket: &Path, prefix: &str) -> DestinationConfig {
        DestinationConfig {
            provider: Provider::Fs,
            endpoint: String::new(),
            region: String::new(),
            bucket: bucket.display().to_string(),
            prefix: prefix.into(),
            path_style: false,
        }
    }

    #[test]
    fn directories_inside_a_root_and_the_root_itself_are_allowed() {
        let top = tempfile::tempdir().unwrap();
        let root = top.path().join("root");
        std::fs::create_dir_all(root.join("acme/2024")).unwrap();
        let allowed = roots(&[Path::new("/nonexistent-root"), &root]);
        let real_root = std::fs::canonicalize(&root).unwrap();

        let itself = allowed.resolve(&root).unwrap();
        assert_eq!(itself.dir, real_root);
        assert_eq!(itself.root, real_root);
        let inside = allowed.resolve(&root.join("acme/2024")).unwrap();
        assert_eq!(inside.dir, real_root.join("acme/2024"));
        // A trailing slash and a `..` that stays inside resolve the same.
        assert!(allowed.resolve(&root.join("acme/")).is_ok());
        assert!(allowed.resolve(&root.join("acme/2024/..")).is_ok());
        // A symlink inside the root to another directory inside it is fine.
        std::os::unix::fs::symlink(root.join("acme"), root.join("alias")).unwrap();
        assert_eq!(
            allowed.resolve(&root.join("alias")).unwrap().dir,
            real_root.join("acme")
        );
    }

    #[test]
    fn directories_outside_every_root_are_refused_naming_the_setting() {
        let top = tempfile::tempdir().unwrap();
        let root = top.path().join("rec");
        let sibling = top.path().join("rec-other");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&sibling).unwrap();
        let allowed = roots(&[&root]);

        for outside in [
            Path::new("/etc").to_owned(),
            top.path().to_owned(),
            sibling.clone(), // a shared name prefix is not containment
            root.join(".."), // climbs out
            root.join("../rec-other"),
        ] {
            let err = allowed.resolve(&outside).unwrap_err();
            assert!(
                matches!(err, FsRootError::Outside { .. }),
                "{outside:?}: {err:?}"
            );
            let text = err.to_string();
            assert!(
                text.starts_with(&format!(
                    "bucket {:?}: directory is not inside an allowed root",
                    outside.display().to_string()
                )),
                "{text}"
            );
            assert!(
                text.contains(
                    "add a root to [destinations].fs_allowed_roots in the uploader config"
                ),
                "{text}"
            );
            assert!(
                text.contains(&format!("(allowed: [{:?}])", root.display().to_string())),
                "{text}"
            );
        }

        // A symlink inside the root that points out of it.
        std::os::unix::fs::symlink(&sibling, root.join("escape")).unwrap();
        let err = allowed.resolve(&root.join("escape")).unwrap_err();
        assert!(matches!(err, FsRootError::Outside { .. }), "{err:?}");
        assert!(err.to_string().contains("it resolves to"), "{err}");

        // Missing, a file, relative, no roots at all.
        let err = allowed.resolve(&root.join("missing")).unwrap_err();
        assert!(matches!(err, FsRootError::Missing { .. }), "{err:?}");
        assert!(err.to_string().contains("does not exist"), "{err}");
        std::fs::write(root.join("file"), b"x").unwrap();
        let err = allowed.resolve(&root.join("file")).unwrap_err();
        assert!(matches!(err, FsRootError::Missing { .. }), "{err:?}");
        let err = allowed.resolve(Path::new("rec")).unwrap_err();
        assert!(matches!(err, FsRootError::Relative { .. }), "{err:?}");
        let err = FsAllowedRoots::default().resolve(&root).unwrap_err();
        assert!(matches!(err, FsRootError::NoRoots { .. }), "{err:?}");
        assert!(
            err.to_string().contains("[destinations].fs_allowed_roots"),
            "{err}"
        );
        // A root that does not exist allows nothing, not even itself.
        let err = roots(&[&top.path().join("later")])
            .resolve(&root)
            .unwrap_err();
        assert!(matches!(err, FsRootError::Outside { .. }), "{err:?}");
    }

    #[test]
    fn the_constructor_refuses_what_can_never_work() {
        let top = tempfile::tempdir().unwrap();
        let allowed = roots(&[top.path()]);
        let err =
            FsDestination::new(&config(top.path(), ""), &FsAllowedRoots::default()).unwrap_err();
        assert!(
            matches!(err, DeliveryError::FsRoot(FsRootError::NoRoots { .. })),
            "{err:?}"
        );
        assert!(err.is_permanent());
        let err = FsDestination::new(&config(Path::new("relative/dir"), ""), &allowed).unwrap_err();
        assert!(
            matches!(err, DeliveryError::FsRoot(FsRootError::Relative { .. })),
            "{err:?}"
        );
        for prefix in ["../up", "a/../../b", "/../b", "a/./b", "a\u{7}b", "a\0b"] {
            let err = FsDestination::new(&config(top.path(), prefix), &allowed).unwrap_err();
            assert!(
                matches!(err, DeliveryError::Config { .. }),
                "{prefix:?}: {err:?}"
            );
            assert!(err.to_string().contains("prefix"), "{err}");
        }
        let ok = FsDestination::new(&config(top.path(), "a//b/"), &allowed).unwrap();
        for name in [
            "../x",
            "..",
            ".",
            "/etc/passwd",
            "a/b",
            "a\\b",
            "a\nb",
            "a\u{7f}",
            "nul\0",
        ] {
            assert!(ok.object_key(name).is_err(), "{name:?}");
        }
        assert_eq!(ok.object_key("call.mp4").unwrap(), "a/b/call.mp4");
        let stored = FsDestination::new(&config(top.path(), "/old//p"), &allowed).unwrap();
        assert_eq!(stored.object_key("call.mp4").unwrap(), "old/p/call.mp4");
        // The sidecar ("<name>.sha256") must fit NAME_MAX too.
        assert!(ok.object_key(&"n".repeat(NAME_MAX)).is_ok());
        let err = ok.object_key(&"n".repeat(NAME_MAX + 1)).unwrap_err();
        assert!(
            err.is_permanent() && err.to_string().contains("at most 255 bytes"),
            "{err}"
        );
    }

    #[test]
    fn resolving_a_key_creates_prefix_directories_only_inside() {
        let top = tempfile::tempdir().unwrap();
        let root = top.path().join("root");
        let outside = top.path().join("outside");
        std::fs::create_dir_all(root.join("dest")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        let allowed = roots(&[&root]);
        let dest = root.join("dest");
        let real_dest = std::fs::canonicalize(&dest).unwrap();

        let target = resolve_blocking(&dest, "a/b/call.mp4", &allowed).unwrap();
        assert_eq!(target, real_dest.join("a/b/call.mp4"));
        assert!(real_dest.join("a/b").is_dir());
        assert_eq!(
            resolve_blocking(&dest, "call.mp4", &allowed).unwrap(),
            real_dest.join("call.mp4")
        );

        // A prefix directory that is a symlink out of the destination: nothing
        // is created through it, not even the next directory.
        std::os::unix::fs::symlink(&outside, dest.join("link")).unwrap();
        let err = resolve_blocking(&dest, "link/deeper/call.mp4", &allowed).unwrap_err();
        assert!(
            err.is_permanent() && err.to_string().contains("outside"),
            "{err}"
        );
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
        // Keys that climb, are absolute or empty never resolve.
        for key in ["../x", "a/../../x", "/etc/x", "", "a/./b"] {
            assert!(resolve_blocking(&dest, key, &allowed).is_err(), "{key:?}");
        }

        // The destination directory swapped for a symlink out of the root.
        std::fs::remove_dir_all(&dest).unwrap();
        std::os::unix::fs::symlink(&outside, &dest).unwrap();
        let err = resolve_blocking(&dest, "a/call.mp4", &allowed).unwrap_err();
        assert!(
            matches!(err, DeliveryError::FsRoot(FsRootError::Outside { .. })),
            "{err:?}"
        );
        assert!(err.is_permanent());
        assert_eq!(err.probe_step(), crate::destination::ProbeStep::Bucket);
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);

        // Gone altogether: the bucket is missing (permanent, step "bucket").
        std::fs::remove_file(&dest).unwrap();
        let err = resolve_blocking(&dest, "call.mp4", &allowed).unwrap_err();
        assert!(
            matches!(err, DeliveryError::BucketMissing { .. }),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn temporary_files_never_follow_a_symlink() {
        let top = tempfile::tempdir().unwrap();
        let victim = top.path().join("victim");
        std::fs::write(&victim, b"keep").unwrap();
        // The final name is a symlink: the rename replaces the link itself.
        let target = top.path().join("call.mp4");
        std::os::unix::fs::symlink(&victim, &target).unwrap();
        write_atomically(&target, b"new").await.unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
        assert!(!std::fs::symlink_metadata(&target).unwrap().is_symlink());
        assert_eq!(std::fs::read(&target).unwrap(), b"new");
        // Temporary names have a fixed length, whatever the target's.
        let long = top.path().join("n".repeat(NAME_MAX));
        write_atomically(&long, b"x").await.unwrap();
        let mut names: Vec<_> = std::fs::read_dir(top.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        assert_eq!(names.len(), 3, "{names:?}");
    }
}
