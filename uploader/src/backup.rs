//! Our own backup store (DESIGN.md promise 3): every recording is made durable
//! here, with its SHA-256, before anything else happens to it. It never
//! decides when a backup may go; the worker deletes one only after a verified delivery.
//!
//! Layout under the store's directory:
//! - `staging/<job_id>.part`: a recording being received (mode 0600); removed
//!   on any error, on drop, and at start-up.
//! - `objects/<tenant_id>/<job_id>`: durable backups, moved there by an atomic
//!   rename after the SHA-256 matched and the file was fsynced. Names come
//!   from validated ids only, never from the client's file name.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

use sha2::{Digest as _, Sha256};

use crate::digest::Sha256Digest;
use crate::jobs::{JobId, TenantId};

/// Write buffer in front of the staging file, so small chunks still become large writes.
const WRITE_BUFFER_BYTES: usize = 1 << 20;

const STAGING: &str = "staging";
const OBJECTS: &str = "objects";
const PART_SUFFIX: &str = ".part";

/// Errors from the backup store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackupError {
    /// A file-system call failed.
    #[error("backup store: could not {action} {}: {source}", path.display())]
    Io {
        /// What was being done ("create", "write", "fsync", ...).
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The received bytes do not hash to the SHA-256 the sender announced; nothing was kept.
    #[error("SHA-256 mismatch over {size} bytes: expected {expected}, computed {computed}")]
    DigestMismatch {
        /// What the sender said.
        expected: Sha256Digest,
        /// What the bytes hash to.
        computed: Sha256Digest,
        /// Bytes received.
        size: u64,
    },
    /// A path given to the store is not one of its backup objects.
    #[error("{} is not a backup object of this store", .0.display())]
    OutsideStore(PathBuf),
    /// The store's directory path is not UTF-8 (job rows store paths as text).
    #[error("backup directory {} is not valid UTF-8; choose another path", .0.display())]
    NotUtf8(PathBuf),
    /// The receiving side went away before `finish` (stream error, cancelled call).
    #[error("the backup was abandoned before it was finished")]
    Abandoned,
    /// A blocking task running file I/O panicked or was cancelled.
    #[error("backup store task failed: {0}")]
    Task(String),
}

impl BackupError {
    fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> Self + 'a {
        move |source| Self::Io {
            action,
            path: path.to_owned(),
            source,
        }
    }

    /// True when the error is a missing file (e.g. a backup already deleted).
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::Io { source, .. } if source.kind() == io::ErrorKind::NotFound)
    }

    /// The OS error kind, if this is an I/O error (e.g. `StorageFull` → RESOURCE_EXHAUSTED).
    pub fn io_kind(&self) -> Option<io::ErrorKind> {
        match self {
            Self::Io { source, .. } => Some(source.kind()),
            _ => None,
        }
    }
}

type Result<T, E = BackupError> = std::result::Result<T, E>;

/// A recording durable in the backup store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredBackup {
    /// The object's name; becomes the job id.
    pub id: JobId,
    /// Absolute path of the object.
    pub path: PathBuf,
    /// SHA-256 of the content, computed while it was written.
    pub sha256: Sha256Digest,
    /// Bytes.
    pub size: u64,
}

/// The backup directory. Cheap to clone.
#[derive(Debug, Clone)]
pub struct BackupStore {
    staging: PathBuf,
    objects: PathBuf,
}

impl BackupStore {
    /// Opens (creating, mode 0700) the store at `dir` and removes staging
    /// files a previous process left behind: they were never acknowledged.
    ///
    /// Blocking; call it at start-up.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        ensure_private_dir_all(dir)?;
        let root = dir
            .canonicalize()
            .map_err(BackupError::io("resolve", dir))?;
        if root.to_str().is_none() {
            return Err(BackupError::NotUtf8(root));
        }
        let staging = root.join(STAGING);
        let objects = root.join(OBJECTS);
        create_private_dir(&staging)?;
        create_private_dir(&objects)?;
        let mut stale = 0usize;
        for entry in fs::read_dir(&staging).map_err(BackupError::io("list", &staging))? {
            let path = entry.map_err(BackupError::io("list", &staging))?.path();
            match fs::remove_file(&path) {
                Ok(()) => stale += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(BackupError::io("remove stale", &path)(e)),
            }
        }
        if stale > 0 {
            tracing::info!(stale, dir = %staging.display(), "removed unfinished uploads left by a previous run");
        }
        Ok(Self { staging, objects })
    }

    /// Where recordings being received live (tests check it is empty after errors).
    pub fn staging_dir(&self) -> &Path {
        &self.staging
    }

    /// Where durable backups live.
    pub fn objects_dir(&self) -> &Path {
        &self.objects
    }

    /// Starts a new backup for `tenant`: a fresh `staging/<id>.part` (0600).
    ///
    /// Blocking (one `open`); the writer's methods are blocking too, so drive
    /// it from a blocking thread (see `ingest`).
    pub fn begin(&self, tenant: &TenantId) -> Result<BackupWriter> {
        let id = JobId::new_random();
        let staging_path = self.staging.join(format!("{id}{PART_SUFFIX}"));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&staging_path)
            .map_err(BackupError::io("create", &staging_path))?;
        Ok(BackupWriter {
            id,
            staging_path,
            tenant_dir: self.objects.join(tenant.as_str()),
            objects_dir: self.objects.clone(),
            file: Some(BufWriter::with_capacity(WRITE_BUFFER_BYTES, file)),
            hasher: Sha256::new(),
            size: 0,
        })
    }

    /// Refuses paths that are not `objects/<tenant>/<id>` of this store, so a
    /// tampered job row cannot make the store read or delete other files.
    fn check(&self, path: &Path) -> Result<()> {
        let inside = path.strip_prefix(&self.objects).is_ok_and(|rel| {
            rel.components().count() == 2
                && rel.components().all(|c| matches!(c, Component::Normal(_)))
        });
        if inside {
            Ok(())
        } else {
            Err(BackupError::OutsideStore(path.to_owned()))
        }
    }

    /// Opens a backup for streaming it out (upload, FetchBackup).
    pub async fn open_read(&self, path: &Path) -> Result<tokio::fs::File> {
        self.check(path)?;
        tokio::fs::File::open(path)
            .await
            .map_err(BackupError::io("open", path))
    }

    /// Re-reads a backup and returns its SHA-256 and size, on a blocking
    /// thread with a bounded buffer (before each attempt, and by the scrub).
    pub async fn rehash(&self, path: &Path) -> Result<(Sha256Digest, u64)> {
        self.check(path)?;
        let path = path.to_owned();
        tokio::task::spawn_blocking(move || hash_file(&path))
            .await
            .map_err(|e| BackupError::Task(e.to_string()))?
    }

    /// Deletes a backup and makes the deletion durable. Deleting one that is
    /// already gone succeeds (a crash may have come between delete and the job update).
    pub async fn delete(&self, path: &Path) -> Result<()> {
        self.check(path)?;
        let path = path.to_owned();
        tokio::task::spawn_blocking(move || {
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(BackupError::io("delete", &path)(e)),
            }
            match path.parent() {
                Some(dir) => fsync_dir(dir),
                None => Ok(()),
            }
        })
        .await
        .map_err(|e| BackupError::Task(e.to_string()))?
    }

    /// Every backup object on disk (the scrub compares them with the jobs to
    /// report orphans). Blocking.
    pub fn list_objects(&self) -> Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        for tenant in fs::read_dir(&self.objects).map_err(BackupError::io("list", &self.objects))? {
            let tenant = tenant
                .map_err(BackupError::io("list", &self.objects))?
                .path();
            if !tenant.is_dir() {
                continue;
            }
            for obj in fs::read_dir(&tenant).map_err(BackupError::io("list", &tenant))? {
                out.push(obj.map_err(BackupError::io("list", &tenant))?.path());
            }
        }
        Ok(out)
    }
}

/// SHA-256 and size of a backup file (blocking; see [`crate::digest::hash_file`]).
pub fn hash_file(path: &Path) -> Result<(Sha256Digest, u64)> {
    let d = crate::digest::hash_file(path).map_err(BackupError::io("read", path))?;
    Ok((d.sha256, d.size))
}

/// A backup being written. Hashes as it writes; nothing is held whole in memory.
///
/// Dropping it before [`BackupWriter::finish`] succeeded removes the staging file.
pub struct BackupWriter {
    id: JobId,
    staging_path: PathBuf,
    tenant_dir: PathBuf,
    objects_dir: PathBuf,
    /// `None` once finished (the file then belongs to the object directory).
    file: Option<BufWriter<File>>,
    hasher: Sha256,
    size: u64,
}

impl std::fmt::Debug for BackupWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackupWriter")
            .field("id", &self.id)
            .field("staging_path", &self.staging_path)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl BackupWriter {
    /// The id the finished object (and its job) will have.
    pub fn id(&self) -> JobId {
        self.id
    }

    /// Bytes written so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Appends `data` and feeds it to the running SHA-256. Blocking.
    pub fn write_chunk(&mut self, data: &[u8]) -> Result<()> {
        let Some(file) = self.file.as_mut() else {
            return Err(BackupError::Abandoned);
        };
        file.write_all(data)
            .map_err(BackupError::io("write", &self.staging_path))?;
        self.hasher.update(data);
        self.size += data.len() as u64;
        Ok(())
    }

    /// Makes the backup durable if its SHA-256 is `expected`: flush, fsync
    /// the file, rename into `objects/<tenant>/<id>`, fsync the directory.
    /// On any error the staging file is removed. Blocking.
    pub fn finish(mut self, expected: Sha256Digest) -> Result<StoredBackup> {
        let computed = Sha256Digest::from_hasher(std::mem::take(&mut self.hasher));
        if computed != expected {
            return Err(BackupError::DigestMismatch {
                expected,
                computed,
                size: self.size,
            });
        }
        let Some(buffered) = self.file.take() else {
            return Err(BackupError::Abandoned);
        };
        let file = buffered
            .into_inner()
            .map_err(|e| BackupError::io("write", &self.staging_path)(e.into_error()))?;
        // The data must be on disk before the rename makes it visible as a
        // backup, or a power loss could leave a complete name over empty blocks.
        file.sync_all()
            .map_err(BackupError::io("fsync", &self.staging_path))?;
        drop(file);
        if create_private_dir(&self.tenant_dir)? {
            fsync_dir(&self.objects_dir)?;
        }
        let target = self.tenant_dir.join(self.id.to_string());
        fs::rename(&self.staging_path, &target).map_err(BackupError::io("rename", &target))?;
        // The rename is durable only once the directory entry is.
        if let Err(e) = fsync_dir(&self.tenant_dir) {
            let _ = fs::remove_file(&target);
            return Err(e);
        }
        self.staging_path = PathBuf::new();
        Ok(StoredBackup {
            id: self.id,
            path: target,
            sha256: computed,
            size: self.size,
        })
    }
}

impl Drop for BackupWriter {
    fn drop(&mut self) {
        // Empty after a successful finish: the file has become an object.
        if self.staging_path.as_os_str().is_empty() {
            return;
        }
        drop(self.file.take());
        match fs::remove_file(&self.staging_path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(
                path = %self.staging_path.display(),
                error = %e,
                "could not remove an unfinished upload; it is removed at the next start"
            ),
        }
    }
}

/// Creates `dir` and missing parents with mode 0700; an existing directory is fine.
fn ensure_private_dir_all(dir: &Path) -> Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(BackupError::io("create directory", dir))
}

/// Creates `dir` with mode 0700. Returns whether it was created (false if it existed).
fn create_private_dir(dir: &Path) -> Result<bool> {
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(false),
        Err(e) => Err(BackupError::io("create directory", dir)(e)),
    }
}

fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(BackupError::io("fsync directory", dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant() -> TenantId {
        TenantId::parse("t1").expect("valid")
    }

    #[test]
    fn finish_renames_into_objects_and_drop_cleans_staging() -> Result<()> {
        let dir = tempfile::tempdir().map_err(BackupError::io("tempdir", Path::new("/tmp")))?;
        let store = BackupStore::open(dir.path())?;
        let mut w = store.begin(&tenant())?;
        w.write_chunk(b"hello ")?;
        w.write_chunk(b"world")?;
        let stored = w.finish(Sha256Digest::of(b"hello world"))?;
        assert_eq!(fs::read(&stored.path).ok(), Some(b"hello world".to_vec()));
        assert_eq!(stored.size, 11);
        assert!(stored.path.starts_with(store.objects_dir().join("t1")));

        let mut w = store.begin(&tenant())?;
        w.write_chunk(b"partial")?;
        drop(w);
        assert_eq!(
            fs::read_dir(store.staging_dir()).map(Iterator::count).ok(),
            Some(0)
        );

        let mut w = store.begin(&tenant())?;
        w.write_chunk(b"abc")?;
        assert!(matches!(
            w.finish(Sha256Digest::of(b"abd")),
            Err(BackupError::DigestMismatch { size: 3, .. })
        ));
        assert_eq!(
            fs::read_dir(store.staging_dir()).map(Iterator::count).ok(),
            Some(0)
        );
        assert_eq!(store.list_objects()?.len(), 1);
        Ok(())
    }

    #[test]
    fn open_removes_stale_staging_and_check_refuses_outside_paths() -> Result<()> {
        let dir = tempfile::tempdir().map_err(BackupError::io("tempdir", Path::new("/tmp")))?;
        let store = BackupStore::open(dir.path())?;
        let w = store.begin(&tenant())?;
        std::mem::forget(w); // simulates a crash: the staging file stays
        assert_eq!(
            fs::read_dir(store.staging_dir()).map(Iterator::count).ok(),
            Some(1)
        );
        let store = BackupStore::open(dir.path())?;
        assert_eq!(
            fs::read_dir(store.staging_dir()).map(Iterator::count).ok(),
            Some(0)
        );

        let objects = store.objects_dir().to_owned();
        for bad in [
            PathBuf::from("/etc/passwd"),
            objects.join("t1/../../x"),
            objects.join("t1"),
            objects.join("t1/a/b"),
        ] {
            assert!(
                matches!(store.check(&bad), Err(BackupError::OutsideStore(_))),
                "{bad:?}"
            );
        }
        assert!(store.check(&objects.join("t1/abc")).is_ok());
        Ok(())
    }
}
