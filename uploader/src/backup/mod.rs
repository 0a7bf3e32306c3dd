//! Our own backup store (a recording is never lost): every recording is made durable
//! here, with its SHA-256, before anything else happens to it. It never
//! decides when a backup may go; the worker deletes one only after a verified delivery.
//!
//! Backups are encrypted at rest ([`format`]): each recording gets a fresh
//! data key, sealed to the vault's wrapping public key ([`wrapping`]) in the
//! file's header, so no plaintext byte reaches this directory (staging
//! included) and only the vault can give the key back ([`source`] reads a
//! backup with it). Deleting a backup file also destroys its wrapped key.
//!
//! Layout under the store's directory:
//! - `staging/<job_id>.part`: a recording being received (mode 0600); removed
//!   on any error, on drop, and at start-up.
//! - `objects/<tenant_id>/<job_id>`: durable backups, moved there by an atomic
//!   rename after the SHA-256 matched and the file was fsynced. Names come
//!   from validated ids only, never from the client's file name.

pub mod format;
pub mod source;
pub mod wrapping;

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read as _, Write as _};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::mpsc;
use std::thread;

use recvault_runtime::secret::SecretBytes;
use sha2::{Digest as _, Sha256};
use zeroize::Zeroize as _;

use self::format::{FormatError, Header, NONCE_PREFIX_LEN, SEGMENT_SIZE, SegmentKey, TAG_LEN};
use self::wrapping::{WrapError, WrappingKey};
use crate::digest::Sha256Digest;
use crate::jobs::{JobId, RecordingId, TenantId};

pub use self::source::EncryptedSource;

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
    /// The OS random number generator failed (no data key could be made).
    #[error("backup store: the OS random number generator failed: {0}")]
    Random(getrandom::Error),
    /// The data key could not be sealed to the wrapping key.
    #[error("backup store: {0}")]
    Wrap(#[from] WrapError),
    /// A backup starts with the RVBK magic but its header is not valid.
    #[error("backup {}: {source}", path.display())]
    Format {
        /// The backup.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: FormatError,
    },
    /// The recording has more segments than the format can number (far past
    /// any configured size limit).
    #[error("the recording is too large for one backup")]
    TooLarge,
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
    /// SHA-256 of the recording (plaintext), computed while it was written:
    /// the recording's identity.
    pub sha256: Sha256Digest,
    /// Plaintext bytes.
    pub size: u64,
    /// SHA-256 of the stored file (header and ciphertext), so the scrub can
    /// check the bytes at rest without any key.
    pub stored_sha256: Sha256Digest,
}

/// The backup directory. Cheap to clone.
#[derive(Debug, Clone)]
pub struct BackupStore {
    staging: PathBuf,
    objects: PathBuf,
    wrapping: WrappingKey,
}

impl BackupStore {
    /// Opens (creating, mode 0700) the store at `dir` and removes staging
    /// files a previous process left behind: they were never acknowledged.
    /// New backups get their data key wrapped to `wrapping`.
    ///
    /// Blocking; call it at start-up.
    pub fn open(dir: impl AsRef<Path>, wrapping: WrappingKey) -> Result<Self> {
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
        Ok(Self {
            staging,
            objects,
            wrapping,
        })
    }

    /// The wrapping key new backups are sealed to.
    pub fn wrapping_key(&self) -> &WrappingKey {
        &self.wrapping
    }

    /// Where recordings being received live (tests check it is empty after errors).
    pub fn staging_dir(&self) -> &Path {
        &self.staging
    }

    /// Where durable backups live.
    pub fn objects_dir(&self) -> &Path {
        &self.objects
    }

    /// Starts a new backup of `recording` for `tenant`: a fresh data key from
    /// the OS CSPRNG, wrapped to the vault's key and bound to both ids, and
    /// a fresh `staging/<id>.part` (0600) holding the header. The vault is
    /// not called.
    ///
    /// Blocking (one `open`); the writer's methods are blocking too, so drive
    /// it from a blocking thread (see `ingest`).
    pub fn begin(&self, tenant: &TenantId, recording: &RecordingId) -> Result<BackupWriter> {
        let mut data_key = SecretBytes::zeroed(recvault_runtime::datakey::KEY_LEN);
        getrandom::fill(data_key.expose_secret_mut()).map_err(BackupError::Random)?;
        let mut nonce_prefix = [0u8; NONCE_PREFIX_LEN];
        getrandom::fill(&mut nonce_prefix).map_err(BackupError::Random)?;
        let (enc, wrapped) = self
            .wrapping
            .wrap(&data_key, tenant.as_str(), recording.as_str())?;
        let header = Header::new(
            self.wrapping.version(),
            nonce_prefix,
            enc,
            wrapped,
            tenant.as_str(),
            recording.as_str(),
        );
        let key = SegmentKey::new(data_key)
            .unwrap_or_else(|_| unreachable!("the data key is made 32 bytes long above"));

        let id = JobId::new_random();
        let staging_path = self.staging.join(format!("{id}{PART_SUFFIX}"));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&staging_path)
            .map_err(BackupError::io("create", &staging_path))?;
        let sink = StoredSink::start(file)
            .map_err(BackupError::io("start a writer for", &staging_path))?;
        let mut batch = Vec::with_capacity(BATCH_BYTES + SEGMENT_SIZE as usize + TAG_LEN);
        batch.extend_from_slice(header.as_bytes());
        let writer = BackupWriter {
            id,
            staging_path,
            tenant_dir: self.objects.join(tenant.as_str()),
            objects_dir: self.objects.clone(),
            sink: Some(sink),
            hasher: Sha256::new(),
            size: 0,
            segment_start: batch.len(),
            batch,
            index: 0,
            key,
            header,
        };
        Ok(writer)
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

    /// Reads a backup's header: `None` when the file does not start with the
    /// RVBK magic (a backup written in clear by an older uploader).
    pub async fn read_header(&self, path: &Path) -> Result<Option<Header>> {
        self.check(path)?;
        let path = path.to_owned();
        tokio::task::spawn_blocking(move || {
            let mut buf = Vec::with_capacity(format::MAX_HEADER_LEN);
            File::open(&path)
                .and_then(|f| f.take(format::MAX_HEADER_LEN as u64).read_to_end(&mut buf))
                .map_err(BackupError::io("read", &path))?;
            match Header::parse(&buf) {
                Ok(header) => Ok(Some(header)),
                Err(FormatError::NoMagic) => Ok(None),
                Err(source) => Err(BackupError::Format { path, source }),
            }
        })
        .await
        .map_err(|e| BackupError::Task(e.to_string()))?
    }

    /// Opens a backup written in clear by an older uploader, for reading.
    pub async fn open_legacy(&self, path: &Path) -> Result<crate::destination::FileSource> {
        self.check(path)?;
        crate::destination::FileSource::open(path)
            .await
            .map_err(BackupError::io("open", path))
    }

    /// Opens an encrypted backup for reading with its data key (see
    /// [`EncryptedSource::open`]: the last segment is authenticated here).
    pub async fn open_encrypted(
        &self,
        path: &Path,
        header: Header,
        data_key: SecretBytes,
    ) -> Result<EncryptedSource, io::Error> {
        self.check(path)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        EncryptedSource::open(path, header, data_key).await
    }

    /// Re-reads a backup file and returns the SHA-256 and length of its
    /// stored bytes, on a blocking thread with a bounded buffer (the scrub;
    /// for a backup in clear these are the recording's).
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

/// Sealed bytes are handed to the writer thread in batches of about this
/// many bytes (whole segments), so it makes large writes without a copy.
const BATCH_BYTES: usize = 8 * (SEGMENT_SIZE as usize + TAG_LEN);

/// Batches queued for the writer thread at most: bounds the memory of one
/// intake (about `(2 + depth)` batches) and lets the caller's thread run ahead
/// of the disk by that much.
const WRITER_QUEUE_DEPTH: usize = 2;

/// A backup being written: hashes the plaintext and encrypts it segment by
/// segment on the caller's thread, while a writer thread of its own writes
/// the sealed bytes to the staging file and hashes what it wrote (so one
/// recording's intake uses two cores). Nothing is held whole in memory and no
/// plaintext is written.
///
/// Dropping it before [`BackupWriter::finish`] succeeded removes the staging file.
pub struct BackupWriter {
    id: JobId,
    staging_path: PathBuf,
    tenant_dir: PathBuf,
    objects_dir: PathBuf,
    /// `None` once finished or failed.
    sink: Option<StoredSink>,
    /// Of the plaintext: the recording's identity.
    hasher: Sha256,
    size: u64,
    /// Bytes not yet handed to the writer: sealed segments (the header first),
    /// then from `segment_start` the plaintext of the segment being filled. A
    /// full segment stays unsealed until more bytes arrive, since only
    /// `finish` knows which segment is the last.
    batch: Vec<u8>,
    segment_start: usize,
    /// Index of the segment being filled.
    index: u32,
    key: SegmentKey,
    header: Header,
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

    /// The backup's header (what the vault needs to unwrap its data key).
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Appends `data`: feeds it to the running SHA-256 and encrypts every
    /// segment it completes. Blocking (when the writer thread is behind).
    pub fn write_chunk(&mut self, data: &[u8]) -> Result<()> {
        if self.sink.is_none() {
            return Err(BackupError::Abandoned);
        }
        self.hasher.update(data);
        self.size += data.len() as u64;
        let full = SEGMENT_SIZE as usize;
        let mut rest = data;
        while !rest.is_empty() {
            let filled = self.batch.len() - self.segment_start;
            if filled == full {
                self.seal_segment(false)?;
                continue;
            }
            let take = (full - filled).min(rest.len());
            self.batch.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
        }
        Ok(())
    }

    /// Encrypts the segment being filled in place, hands the batch to the
    /// writer once it is large enough (or this was the last segment), and
    /// starts the next segment.
    fn seal_segment(&mut self, last: bool) -> Result<()> {
        self.key.seal_tail(
            &self.header,
            self.index,
            last,
            &mut self.batch,
            self.segment_start,
        );
        self.index = self.index.checked_add(1).ok_or(BackupError::TooLarge)?;
        if last || self.batch.len() >= BATCH_BYTES {
            let sink = self.sink.as_mut().ok_or(BackupError::Abandoned)?;
            let next = sink.spare();
            // Only sealed bytes leave: the batch ends with a sealed segment.
            let sealed = std::mem::replace(&mut self.batch, next);
            if let Err(e) = sink.send(sealed) {
                return Err(self.failed(e));
            }
        }
        self.segment_start = self.batch.len();
        Ok(())
    }

    /// The writer thread stopped: takes its error and drops the sink.
    fn failed(&mut self, _: Stopped) -> BackupError {
        match self.sink.take().map(StoredSink::finish) {
            Some(Err(e)) => self.thread_error(e),
            // It stopped without an error only if it was told to.
            _ => BackupError::Abandoned,
        }
    }

    fn thread_error(&self, e: SinkError) -> BackupError {
        match e {
            SinkError::Io(e) => BackupError::io("write", &self.staging_path)(e),
            SinkError::Panicked => BackupError::Task("the backup writer thread panicked".into()),
        }
    }

    /// Makes the backup durable if its SHA-256 is `expected`: seal the last
    /// segment, let the writer finish, fsync the file, rename into
    /// `objects/<tenant>/<id>`, fsync the directory. On any error the staging
    /// file is removed. Blocking.
    pub fn finish(mut self, expected: Sha256Digest) -> Result<StoredBackup> {
        let computed = Sha256Digest::from_hasher(std::mem::take(&mut self.hasher));
        if computed != expected {
            return Err(BackupError::DigestMismatch {
                expected,
                computed,
                size: self.size,
            });
        }
        // An empty recording still gets one (empty) last segment, so a file
        // cut back to its header does not read as an empty recording.
        self.seal_segment(true)?;
        let Some(sink) = self.sink.take() else {
            return Err(BackupError::Abandoned);
        };
        let (file, stored) = sink.finish().map_err(|e| self.thread_error(e))?;
        let stored_sha256 = Sha256Digest::from_hasher(stored);
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
            stored_sha256,
        })
    }
}

impl Drop for BackupWriter {
    fn drop(&mut self) {
        // The recording's plaintext of the unfinished segment.
        self.batch.zeroize();
        // Stops and joins the writer thread, which closes the file.
        drop(self.sink.take());
        // Empty after a successful finish: the file has become an object.
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

/// The writer thread stopped taking batches (an error, or a panic).
struct Stopped;

enum SinkError {
    Io(io::Error),
    Panicked,
}

/// A staging file's writer thread: writes the sealed batches it is sent, in
/// order, and hashes what it wrote; gives the file and the hash back at the
/// end. Batches come back through `spare` to be filled again.
struct StoredSink {
    batches: Option<mpsc::SyncSender<Vec<u8>>>,
    spare: mpsc::Receiver<Vec<u8>>,
    thread: Option<thread::JoinHandle<io::Result<(File, Sha256)>>>,
}

impl StoredSink {
    fn start(file: File) -> io::Result<Self> {
        let (batches, queue) = mpsc::sync_channel::<Vec<u8>>(WRITER_QUEUE_DEPTH);
        let (give_back, spare) = mpsc::sync_channel::<Vec<u8>>(WRITER_QUEUE_DEPTH + 2);
        let thread = thread::Builder::new()
            .name("backup-writer".into())
            .spawn(move || {
                let mut file = file;
                let mut stored = Sha256::new();
                for mut batch in queue {
                    file.write_all(&batch)?;
                    stored.update(&batch);
                    batch.clear();
                    // Full only if the caller stopped taking spares; then drop it.
                    let _ = give_back.try_send(batch);
                }
                Ok((file, stored))
            })?;
        Ok(Self {
            batches: Some(batches),
            spare,
            thread: Some(thread),
        })
    }

    /// An empty batch buffer: one the writer gave back, or a new one.
    fn spare(&self) -> Vec<u8> {
        self.spare
            .try_recv()
            .unwrap_or_else(|_| Vec::with_capacity(BATCH_BYTES + SEGMENT_SIZE as usize + TAG_LEN))
    }

    /// Queues `batch`, waiting while the queue is full.
    fn send(&self, batch: Vec<u8>) -> Result<(), Stopped> {
        match &self.batches {
            Some(tx) => tx.send(batch).map_err(|_| Stopped),
            None => Err(Stopped),
        }
    }

    /// Lets the thread write what is queued and returns the file and the
    /// SHA-256 of everything it wrote.
    fn finish(mut self) -> Result<(File, Sha256), SinkError> {
        self.batches = None;
        match self.thread.take().map(thread::JoinHandle::join) {
            Some(Ok(Ok(done))) => Ok(done),
            Some(Ok(Err(e))) => Err(SinkError::Io(e)),
            Some(Err(_)) | None => Err(SinkError::Panicked),
        }
    }
}

impl Drop for StoredSink {
    fn drop(&mut self) {
        self.batches = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
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
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::destination::Source as _;
    use rustls::crypto::hpke::{EncapsulatedSecret, HpkePrivateKey};
    use tokio::io::AsyncReadExt as _;

    fn tenant() -> TenantId {
        TenantId::parse("t1").expect("valid")
    }

    fn recording() -> RecordingId {
        RecordingId::parse("rec-1").expect("valid")
    }

    fn store(dir: &Path) -> (BackupStore, HpkePrivateKey) {
        let (public, private) = wrapping::suite().generate_key_pair().unwrap();
        let key = WrappingKey::new(1, public.0.as_slice().try_into().unwrap());
        (BackupStore::open(dir, key).unwrap(), private)
    }

    /// What the vault does: open the header's wrapped key with the private key.
    fn unwrap(header: &Header, private: &HpkePrivateKey) -> SecretBytes {
        let key = wrapping::suite()
            .open(
                &EncapsulatedSecret(header.enc.to_vec()),
                recvault_runtime::datakey::WRAP_INFO,
                &header.binding(),
                &header.wrapped_key,
                private,
            )
            .unwrap();
        SecretBytes::new(key)
    }

    async fn read_back(store: &BackupStore, path: &Path, private: &HpkePrivateKey) -> Vec<u8> {
        let header = store.read_header(path).await.unwrap().unwrap();
        let key = unwrap(&header, private);
        let source = store.open_encrypted(path, header, key).await.unwrap();
        let mut out = Vec::new();
        source
            .open_range(0, source.size())
            .await
            .unwrap()
            .read_to_end(&mut out)
            .await
            .unwrap();
        out
    }

    #[tokio::test]
    async fn finish_encrypts_renames_into_objects_and_drop_cleans_staging() {
        let dir = tempfile::tempdir().unwrap();
        let (store, private) = store(dir.path());
        let mut w = store.begin(&tenant(), &recording()).unwrap();
        w.write_chunk(b"hello ").unwrap();
        w.write_chunk(b"world").unwrap();
        let stored = w.finish(Sha256Digest::of(b"hello world")).unwrap();
        let on_disk = fs::read(&stored.path).unwrap();
        assert!(on_disk.starts_with(b"RVBK"));
        assert!(!on_disk.windows(5).any(|w| w == b"hello" || w == b"world"));
        assert_eq!(stored.stored_sha256, Sha256Digest::of(&on_disk));
        assert_eq!(
            store.rehash(&stored.path).await.unwrap().0,
            stored.stored_sha256
        );
        assert_eq!(
            read_back(&store, &stored.path, &private).await,
            b"hello world"
        );
        assert_eq!(stored.size, 11);
        assert_eq!(stored.sha256, Sha256Digest::of(b"hello world"));
        assert!(stored.path.starts_with(store.objects_dir().join("t1")));

        let mut w = store.begin(&tenant(), &recording()).unwrap();
        w.write_chunk(b"partial").unwrap();
        drop(w);
        assert_eq!(
            fs::read_dir(store.staging_dir()).map(Iterator::count).ok(),
            Some(0)
        );

        let mut w = store.begin(&tenant(), &recording()).unwrap();
        w.write_chunk(b"abc").unwrap();
        assert!(matches!(
            w.finish(Sha256Digest::of(b"abd")),
            Err(BackupError::DigestMismatch { size: 3, .. })
        ));
        assert_eq!(
            fs::read_dir(store.staging_dir()).map(Iterator::count).ok(),
            Some(0)
        );
        assert_eq!(store.list_objects().unwrap().len(), 1);
    }

    #[test]
    fn open_removes_stale_staging_and_check_refuses_outside_paths() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = store(dir.path());
        let w = store.begin(&tenant(), &recording()).unwrap();
        std::mem::forget(w); // simulates a crash: the staging file stays
        assert_eq!(
            fs::read_dir(store.staging_dir()).map(Iterator::count).ok(),
            Some(1)
        );
        let store = BackupStore::open(dir.path(), store.wrapping_key().clone()).unwrap();
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
    }
}
