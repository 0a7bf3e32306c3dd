//! The backup store in a local directory (the embedded default):
//! - `staging/<job_id>.part`: a recording being received (mode 0600); removed
//!   on any error, on drop, and at start-up.
//! - `objects/<tenant_id>/<job_id>`: durable backups, moved there by an atomic
//!   rename after the SHA-256 matched and the file was fsynced.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read as _, Write as _};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

use super::source::{StoredObject, StoredRead};
use super::{BackupError, Result, SealedSink, StoredDigest};
use crate::jobs::{JobId, TenantId};

const STAGING: &str = "staging";
const OBJECTS: &str = "objects";
const PART_SUFFIX: &str = ".part";

/// The directory store's two directories.
#[derive(Debug)]
pub(super) struct LocalStore {
    staging: PathBuf,
    objects: PathBuf,
}

impl LocalStore {
    /// Opens (creating, mode 0700) the store at `dir` and removes staging
    /// files a previous process left behind: they were never acknowledged.
    pub(super) fn open(dir: &Path) -> Result<Self> {
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

    pub(super) fn staging_dir(&self) -> &Path {
        &self.staging
    }

    pub(super) fn objects_dir(&self) -> &Path {
        &self.objects
    }

    /// A fresh `staging/<id>.part` (0600) for a backup of `tenant`.
    pub(super) fn sink(&self, id: JobId, tenant: &TenantId) -> Result<FileSink> {
        let staging_path = self.staging.join(format!("{id}{PART_SUFFIX}"));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&staging_path)
            .map_err(BackupError::io("create", &staging_path))?;
        Ok(FileSink {
            file: Some(file),
            staging_path,
            tenant_dir: self.objects.join(tenant.as_str()),
            objects_dir: self.objects.clone(),
            id,
        })
    }

    /// The backup at `path`, which must be `objects/<tenant>/<id>` of this
    /// store, so a tampered job row cannot make the store read or delete other files.
    pub(super) fn object(&self, path: &Path) -> Result<FileObject> {
        let inside = path.strip_prefix(&self.objects).is_ok_and(|rel| {
            rel.components().count() == 2
                && rel.components().all(|c| matches!(c, Component::Normal(_)))
        });
        if inside {
            Ok(FileObject::at(path))
        } else {
            Err(BackupError::OutsideStore(path.to_owned()))
        }
    }

    /// Every backup object on disk. Blocking.
    pub(super) fn list_objects(&self) -> Result<Vec<PathBuf>> {
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

/// A staging file receiving a backup; renamed into `objects/` on commit,
/// removed when dropped uncommitted.
pub(super) struct FileSink {
    /// `None` once committed.
    file: Option<File>,
    staging_path: PathBuf,
    tenant_dir: PathBuf,
    objects_dir: PathBuf,
    id: JobId,
}

impl SealedSink for FileSink {
    fn write(&mut self, sealed: &[u8]) -> Result<()> {
        match &mut self.file {
            Some(file) => file
                .write_all(sealed)
                .map_err(BackupError::io("write", &self.staging_path)),
            None => Err(BackupError::Abandoned),
        }
    }

    /// fsync the file, rename it into `objects/<tenant>/<id>`, fsync the
    /// directory. The file is exactly what was written, so `stored` needs no check.
    fn commit(mut self: Box<Self>, _stored: &StoredDigest) -> Result<PathBuf> {
        let file = self.file.take().ok_or(BackupError::Abandoned)?;
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
        Ok(target)
    }
}

impl Drop for FileSink {
    fn drop(&mut self) {
        drop(self.file.take());
        // Empty after a successful commit: the file has become an object.
        if self.staging_path.as_os_str().is_empty() {
            return;
        }
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

/// A backup file in `objects/`.
#[derive(Debug)]
pub(super) struct FileObject {
    path: PathBuf,
}

impl FileObject {
    /// The file at `path` (unchecked: for a path the caller vouches for).
    pub(super) fn at(path: &Path) -> Self {
        Self {
            path: path.to_owned(),
        }
    }
}

impl StoredObject for FileObject {
    fn location(&self) -> &Path {
        &self.path
    }

    fn len(&self) -> io::Result<u64> {
        Ok(fs::metadata(&self.path)?.len())
    }

    fn reader(&self, _start: u64, _end: u64) -> io::Result<Box<dyn StoredRead>> {
        Ok(Box::new(File::open(&self.path)?))
    }

    fn read_head(&self, max: usize) -> io::Result<Vec<u8>> {
        let mut buf = Vec::with_capacity(max);
        File::open(&self.path)?
            .take(max as u64)
            .read_to_end(&mut buf)?;
        Ok(buf)
    }

    fn delete(&self) -> io::Result<()> {
        match fs::remove_file(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        }
        match self.path.parent() {
            Some(dir) => File::open(dir).and_then(|d| d.sync_all()),
            None => Ok(()),
        }
    }

    fn exists(&self) -> io::Result<bool> {
        match fs::metadata(&self.path) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }
}

impl StoredRead for File {
    fn read_exact_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
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
