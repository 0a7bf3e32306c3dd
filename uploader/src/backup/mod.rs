//! Our own backup store (a recording is never lost): every recording is made durable
//! here, with its SHA-256, before anything else happens to it. It never
//! decides when a backup may go; the worker deletes one only after a verified delivery.
//!
//! Backups are encrypted at rest ([`format`]): each recording gets a fresh
//! data key, sealed to the vault's wrapping public key ([`wrapping`]) in the
//! backup's header, so no plaintext byte reaches the store (staging
//! included) and only the vault can give the key back ([`source`] reads a
//! backup with it). Deleting a backup also destroys its wrapped key.
//!
//! Two backends behind the one [`BackupStore`]:
//! - a local directory (`local`, the embedded default): `staging/<job_id>.part`
//!   while a recording is received, then `objects/<tenant_id>/<job_id>` after
//!   an atomic rename;
//! - our own S3-compatible bucket (`s3`): `<prefix>/objects/<tenant_id>/<job_id>`,
//!   written by one PutObject or a multipart upload and verified before it
//!   counts, so any replica can deliver, fetch or scrub any backup.
//!
//! The encryption is written once ([`BackupWriter`]); a backend only supplies
//! the sink of sealed bytes (`SealedSink`) and the reader of stored bytes
//! (`StoredObject`). Names come from validated ids only, never from the
//! client's file name.

pub mod format;
mod local;
mod s3;
pub mod source;
pub mod wrapping;

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, mpsc};
use std::thread;

use recvault_runtime::secret::SecretBytes;
use sha2::{Digest as _, Sha256};
use zeroize::Zeroize as _;

use self::format::{FormatError, Header, NONCE_PREFIX_LEN, SEGMENT_SIZE, SegmentKey, TAG_LEN};
use self::local::LocalStore;
use self::s3::S3Store;
use self::source::StoredObject;
use self::wrapping::{WrapError, WrappingKey};
use crate::config::BackupStoreSettings;
use crate::digest::Sha256Digest;
use crate::jobs::{JobId, RecordingId, TenantId};

pub use self::s3::{ObjectStoreError, S3Tuning};
pub use self::source::EncryptedSource;

/// Errors from the backup store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackupError {
    /// A file-system call (or a read of a stored object) failed.
    #[error("backup store: could not {action} {}: {source}", path.display())]
    Io {
        /// What was being done ("create", "write", "fsync", ...).
        action: &'static str,
        /// The file, directory or object location.
        path: PathBuf,
        /// The OS error (for an object, one wrapping [`ObjectStoreError`]).
        #[source]
        source: io::Error,
    },
    /// The object store failed or could not be reached.
    #[error("{0}")]
    ObjectStore(#[from] ObjectStoreError),
    /// The object just stored does not read back as what was sent; it was deleted.
    #[error(
        "backup store {store}: {location} did not verify after it was stored ({detail}); it was deleted"
    )]
    Verification {
        /// `s3://bucket (endpoint …)`.
        store: String,
        /// The object.
        location: String,
        /// What differed.
        detail: String,
    },
    /// `[backup_store]` cannot work (a field, the credentials file): the
    /// message names the field and what to do.
    #[error("{0}")]
    Config(String),
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
    /// An object-store backup without the RVBK header: the object store
    /// only ever held encrypted backups, so it was changed.
    #[error("backup {} has no RVBK header; backups in an object store are always encrypted, so it was changed", .0.display())]
    NotEncrypted(PathBuf),
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

    /// True when the error is a missing file or object (e.g. a backup already deleted).
    pub fn is_not_found(&self) -> bool {
        match self {
            Self::Io { source, .. } => source.kind() == io::ErrorKind::NotFound,
            Self::ObjectStore(e) => e.status == Some(404),
            _ => false,
        }
    }

    /// The OS error kind, if this is an I/O error (e.g. `StorageFull` → RESOURCE_EXHAUSTED).
    pub fn io_kind(&self) -> Option<io::ErrorKind> {
        match self {
            Self::Io { source, .. } => Some(source.kind()),
            _ => None,
        }
    }

    /// True when the object store could not be reached or answered 5xx/429
    /// (the same request may work later).
    pub fn is_store_unavailable(&self) -> bool {
        let object_store = match self {
            Self::ObjectStore(e) => Some(e),
            Self::Io { source, .. } => source
                .get_ref()
                .and_then(|e| e.downcast_ref::<ObjectStoreError>()),
            _ => None,
        };
        object_store.is_some_and(ObjectStoreError::is_unavailable)
    }
}

type Result<T, E = BackupError> = std::result::Result<T, E>;

/// A recording durable in the backup store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredBackup {
    /// The object's name; becomes the job id.
    pub id: JobId,
    /// The object's location: an absolute path (local directory) or
    /// `s3://<bucket>/<prefix>/objects/<tenant_id>/<job_id>` (object store).
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

/// The backup store: a local directory or our own bucket. Cheap to clone.
#[derive(Debug, Clone)]
pub struct BackupStore {
    backend: Backend,
    wrapping: WrappingKey,
}

#[derive(Debug, Clone)]
enum Backend {
    Local(Arc<LocalStore>),
    S3(Arc<S3Store>),
}

impl BackupStore {
    /// Opens (creating, mode 0700) the local-directory store at `dir` and
    /// removes staging files a previous process left behind: they were never
    /// acknowledged. New backups get their data key wrapped to `wrapping`.
    ///
    /// Blocking; call it at start-up.
    pub fn open(dir: impl AsRef<Path>, wrapping: WrappingKey) -> Result<Self> {
        Ok(Self {
            backend: Backend::Local(Arc::new(LocalStore::open(dir.as_ref())?)),
            wrapping,
        })
    }

    /// Opens the store in our own S3-compatible bucket (`[backup_store]`):
    /// reads the credentials file, builds the client, and aborts multipart
    /// uploads under `<prefix>/objects/` older than `stale_upload_secs`
    /// (ingests cut off by a crash; a store that cannot be reached now is
    /// logged, not fatal). Needs tokio's multi-thread runtime: the writer and
    /// readers drive requests from their own threads.
    pub async fn open_s3(settings: &BackupStoreSettings, wrapping: WrappingKey) -> Result<Self> {
        let credential = settings.read_credential()?;
        Self::open_s3_with(settings, &credential, wrapping, s3::S3Tuning::default()).await
    }

    /// [`BackupStore::open_s3`] with the credential given and transfer sizes
    /// chosen (tests and benchmarks).
    #[doc(hidden)]
    pub async fn open_s3_with(
        settings: &BackupStoreSettings,
        credential: &crate::credential::S3Credential,
        wrapping: WrappingKey,
        tuning: s3::S3Tuning,
    ) -> Result<Self> {
        let store = Arc::new(S3Store::new(settings, credential, tuning)?);
        match store.abort_stale_uploads().await {
            Ok(0) => {}
            Ok(aborted) => tracing::info!(
                aborted,
                store = %store.describe(),
                "aborted multipart uploads left by ingests that were cut off"
            ),
            Err(e) => {
                tracing::warn!(error = %e, "could not look for multipart uploads left by ingests that were cut off; the scrub tries again")
            }
        }
        Ok(Self {
            backend: Backend::S3(store),
            wrapping,
        })
    }

    /// The configured backend: `backup_dir` (blocking) or `[backup_store]`.
    pub async fn from_config(
        backup_dir: Option<&Path>,
        backup_store: Option<&BackupStoreSettings>,
        wrapping: WrappingKey,
    ) -> Result<Self> {
        match (backup_dir, backup_store) {
            (Some(dir), None) => Self::open(dir, wrapping),
            (None, Some(settings)) => Self::open_s3(settings, wrapping).await,
            _ => Err(BackupError::Config(
                "set exactly one of backup_dir and [backup_store]".into(),
            )),
        }
    }

    /// The wrapping key new backups are sealed to.
    pub fn wrapping_key(&self) -> &WrappingKey {
        &self.wrapping
    }

    /// The local store's staging directory (recordings being received;
    /// tests check it is empty after errors). `None` for the object store,
    /// which has multipart uploads instead.
    pub fn staging_dir(&self) -> Option<&Path> {
        match &self.backend {
            Backend::Local(l) => Some(l.staging_dir()),
            Backend::S3(_) => None,
        }
    }

    /// Where durable backups live: the `objects` directory, or
    /// `s3://<bucket>/<prefix>/objects`. Every backup's location is
    /// `<this>/<tenant_id>/<job_id>`.
    pub fn objects_dir(&self) -> &Path {
        match &self.backend {
            Backend::Local(l) => l.objects_dir(),
            Backend::S3(s) => s.objects_root(),
        }
    }

    /// For messages: the directory, or `s3://bucket (endpoint …)`. Never a credential.
    pub fn describe(&self) -> String {
        match &self.backend {
            Backend::Local(l) => l.objects_dir().display().to_string(),
            Backend::S3(s) => s.describe(),
        }
    }

    /// Starts a new backup of `recording` for `tenant`: a fresh data key from
    /// the OS CSPRNG, wrapped to the vault's key and bound to both ids, and
    /// a fresh sink (a `staging/<id>.part` file, mode 0600, or a pending
    /// upload) that receives the header first. The vault is not called.
    ///
    /// Blocking; the writer's methods are blocking too, so drive it from a
    /// blocking thread (see `ingest`).
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
        let sink: Box<dyn SealedSink> = match &self.backend {
            Backend::Local(l) => Box::new(l.sink(id, tenant)?),
            Backend::S3(s) => Box::new(s.sink(id, tenant)),
        };
        let sink = StoredSink::start(sink)
            .map_err(|e| BackupError::Task(format!("could not start a backup writer: {e}")))?;
        let mut batch = Vec::with_capacity(BATCH_BYTES + SEGMENT_SIZE as usize + TAG_LEN);
        batch.extend_from_slice(header.as_bytes());
        Ok(BackupWriter {
            id,
            sink: Some(sink),
            hasher: Sha256::new(),
            size: 0,
            segment_start: batch.len(),
            batch,
            index: 0,
            key,
            header,
        })
    }

    /// The stored object at `path`, once `path` proved to be
    /// `objects/<tenant>/<id>` of this store, so a tampered job row cannot
    /// make the store read or delete anything else.
    fn object(&self, path: &Path) -> Result<Arc<dyn StoredObject>> {
        match &self.backend {
            Backend::Local(l) => Ok(Arc::new(l.object(path)?)),
            Backend::S3(s) => Ok(Arc::new(s.object(path)?)),
        }
    }

    /// Runs `op` on the stored object at `path` on the blocking pool.
    async fn blocking<T: Send + 'static>(
        &self,
        path: &Path,
        op: impl FnOnce(&dyn StoredObject) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let object = self.object(path)?;
        tokio::task::spawn_blocking(move || op(object.as_ref()))
            .await
            .map_err(|e| BackupError::Task(e.to_string()))?
    }

    /// Reads a backup's header: `None` when it does not start with the
    /// RVBK magic (a backup written in clear by an older uploader).
    pub async fn read_header(&self, path: &Path) -> Result<Option<Header>> {
        self.blocking(path, |object| {
            let path = object.location();
            let buf = object
                .read_head(format::MAX_HEADER_LEN)
                .map_err(BackupError::io("read", path))?;
            match Header::parse(&buf) {
                Ok(header) => Ok(Some(header)),
                Err(FormatError::NoMagic) => Ok(None),
                Err(source) => Err(BackupError::Format {
                    path: path.to_owned(),
                    source,
                }),
            }
        })
        .await
    }

    /// Opens a backup written in clear by an older uploader, for reading
    /// (only a local directory can hold one).
    pub async fn open_legacy(&self, path: &Path) -> Result<crate::destination::FileSource> {
        self.object(path)?;
        match &self.backend {
            Backend::Local(_) => crate::destination::FileSource::open(path)
                .await
                .map_err(BackupError::io("open", path)),
            Backend::S3(_) => Err(BackupError::NotEncrypted(path.to_owned())),
        }
    }

    /// Opens an encrypted backup for reading with its data key (see
    /// [`EncryptedSource::open`]: the last segment is authenticated here).
    pub async fn open_encrypted(
        &self,
        path: &Path,
        header: Header,
        data_key: SecretBytes,
    ) -> Result<EncryptedSource, io::Error> {
        let object = self
            .object(path)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        EncryptedSource::open_stored(object, header, data_key).await
    }

    /// Re-reads a backup and returns the SHA-256 and length of its stored
    /// bytes, on a blocking thread with bounded memory (the scrub; for a
    /// backup in clear these are the recording's).
    pub async fn rehash(&self, path: &Path) -> Result<(Sha256Digest, u64)> {
        self.blocking(path, |object| {
            source::hash_stored(object).map_err(BackupError::io("read", object.location()))
        })
        .await
    }

    /// Deletes a backup and makes the deletion durable. Deleting one that is
    /// already gone succeeds (a crash may have come between delete and the job update).
    pub async fn delete(&self, path: &Path) -> Result<()> {
        self.blocking(path, |object| {
            object
                .delete()
                .map_err(BackupError::io("delete", object.location()))
        })
        .await
    }

    /// Whether the backup at `path` is still stored (ResendJob checks it).
    pub async fn exists(&self, path: &Path) -> Result<bool> {
        self.blocking(path, |object| {
            object
                .exists()
                .map_err(BackupError::io("look up", object.location()))
        })
        .await
    }

    /// Every backup object in the store (the scrub compares them with the
    /// jobs to report orphans).
    pub async fn list_objects(&self) -> Result<Vec<PathBuf>> {
        match &self.backend {
            Backend::Local(l) => {
                let l = Arc::clone(l);
                tokio::task::spawn_blocking(move || l.list_objects())
                    .await
                    .map_err(|e| BackupError::Task(e.to_string()))?
            }
            Backend::S3(s) => s.list_objects().await,
        }
    }

    /// Aborts the object store's multipart uploads under `objects/` that were
    /// initiated longer ago than `[backup_store].stale_upload_secs` (ingests
    /// cut off by a crash); returns how many. Live ingests of other replicas
    /// are younger and left alone. Nothing to do for a local directory,
    /// whose staging files are removed at start-up.
    pub async fn abort_stale_uploads(&self) -> Result<u64> {
        match &self.backend {
            Backend::Local(_) => Ok(0),
            Backend::S3(s) => s.abort_stale_uploads().await,
        }
    }
}

/// Sealed bytes are handed to the writer thread in batches of about this
/// many bytes (whole segments), so it makes large writes without a copy.
const BATCH_BYTES: usize = 8 * (SEGMENT_SIZE as usize + TAG_LEN);

/// Batches queued for the writer thread at most: bounds the memory of one
/// intake (about `(2 + depth)` batches) and lets the caller's thread run ahead
/// of the sink by that much.
const WRITER_QUEUE_DEPTH: usize = 2;

/// What a backend stores sealed bytes into: a staging file, or an upload to
/// the object store. Runs on the writer thread, in order. Dropping one that
/// was not committed discards what it received (removes the staging file,
/// aborts the multipart upload).
trait SealedSink: Send {
    /// Appends sealed bytes (the header first, then whole segments).
    fn write(&mut self, sealed: &[u8]) -> Result<()>;

    /// Makes what was written the durable backup, after checking that the
    /// store holds exactly `stored`; returns its location. On error nothing
    /// stays stored.
    fn commit(self: Box<Self>, stored: &StoredDigest) -> Result<PathBuf>;
}

/// The SHA-256 and length of all the bytes a sink received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct StoredDigest {
    sha256: Sha256Digest,
    len: u64,
}

/// A backup being written: hashes the plaintext and encrypts it segment by
/// segment on the caller's thread, while a writer thread of its own hands
/// the sealed bytes to the backend's sink and hashes them (so one
/// recording's intake uses two cores). Nothing is held whole in memory and no
/// plaintext is written.
///
/// Dropping it before [`BackupWriter::finish`] succeeded discards what was
/// written (the staging file, the multipart upload).
pub struct BackupWriter {
    id: JobId,
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

impl fmt::Debug for BackupWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackupWriter")
            .field("id", &self.id)
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
            if sink.send(Message::Batch(sealed)).is_err() {
                return Err(self.failed());
            }
        }
        self.segment_start = self.batch.len();
        Ok(())
    }

    /// The writer thread stopped: takes its error and drops the sink.
    fn failed(&mut self) -> BackupError {
        match self.sink.take().map(StoredSink::join) {
            Some(Err(e)) => e,
            // It stopped without an error only if it was told to.
            _ => BackupError::Abandoned,
        }
    }

    /// Makes the backup durable if its SHA-256 is `expected`: seal the last
    /// segment, let the writer hand everything to the sink, and commit it
    /// (local: fsync, rename into `objects/<tenant>/<id>`, fsync the
    /// directory; object store: complete the upload and verify the stored
    /// object). On any error nothing stays stored. Blocking.
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
        if sink.send(Message::Commit).is_err() {
            return Err(sink.join().err().unwrap_or(BackupError::Abandoned));
        }
        let (path, stored_sha256) = sink.join()?.ok_or(BackupError::Abandoned)?;
        Ok(StoredBackup {
            id: self.id,
            path,
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
        // Stops and joins the writer thread, which drops (discards) an
        // uncommitted sink.
        drop(self.sink.take());
    }
}

/// What the writer thread is sent.
enum Message {
    /// Sealed bytes, to write and give back through `spare`.
    Batch(Vec<u8>),
    /// Everything is sent: commit the sink.
    Commit,
}

/// What the writer thread ends with: the location and stored SHA-256 once
/// committed, `None` when it was stopped without a commit.
type Committed = Option<(PathBuf, Sha256Digest)>;

/// A sink's writer thread: writes the sealed batches it is sent, in order,
/// hashes what it wrote, and commits on [`Message::Commit`]. Batches come back
/// through `spare` to be filled again.
struct StoredSink {
    batches: Option<mpsc::SyncSender<Message>>,
    spare: mpsc::Receiver<Vec<u8>>,
    thread: Option<thread::JoinHandle<Result<Committed>>>,
}

impl StoredSink {
    fn start(mut sink: Box<dyn SealedSink>) -> io::Result<Self> {
        let (batches, queue) = mpsc::sync_channel::<Message>(WRITER_QUEUE_DEPTH);
        let (give_back, spare) = mpsc::sync_channel::<Vec<u8>>(WRITER_QUEUE_DEPTH + 2);
        let thread = thread::Builder::new()
            .name("backup-writer".into())
            .spawn(move || {
                let mut stored = Sha256::new();
                let mut len = 0u64;
                for message in queue {
                    match message {
                        Message::Batch(mut batch) => {
                            sink.write(&batch)?;
                            stored.update(&batch);
                            len += batch.len() as u64;
                            batch.clear();
                            // Full only if the caller stopped taking spares; then drop it.
                            let _ = give_back.try_send(batch);
                        }
                        Message::Commit => {
                            let digest = StoredDigest {
                                sha256: Sha256Digest::from_hasher(stored),
                                len,
                            };
                            let path = sink.commit(&digest)?;
                            return Ok(Some((path, digest.sha256)));
                        }
                    }
                }
                // Dropping the sink discards what it received.
                Ok(None)
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

    /// Queues `message`, waiting while the queue is full; `Err` when the
    /// thread stopped.
    fn send(&self, message: Message) -> Result<(), ()> {
        match &self.batches {
            Some(tx) => tx.send(message).map_err(|_| ()),
            None => Err(()),
        }
    }

    /// Closes the queue and waits for the thread's result.
    fn join(mut self) -> Result<Committed> {
        self.batches = None;
        match self.thread.take().map(thread::JoinHandle::join) {
            Some(Ok(result)) => result,
            Some(Err(_)) | None => Err(BackupError::Task(
                "the backup writer thread panicked".into(),
            )),
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::destination::Source as _;
    use rustls::crypto::hpke::{EncapsulatedSecret, HpkePrivateKey};
    use std::fs;
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
            fs::read_dir(store.staging_dir().unwrap())
                .map(Iterator::count)
                .ok(),
            Some(0)
        );

        let mut w = store.begin(&tenant(), &recording()).unwrap();
        w.write_chunk(b"abc").unwrap();
        assert!(matches!(
            w.finish(Sha256Digest::of(b"abd")),
            Err(BackupError::DigestMismatch { size: 3, .. })
        ));
        assert_eq!(
            fs::read_dir(store.staging_dir().unwrap())
                .map(Iterator::count)
                .ok(),
            Some(0)
        );
        assert_eq!(store.list_objects().await.unwrap().len(), 1);
    }

    #[test]
    fn open_removes_stale_staging_and_check_refuses_outside_paths() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = store(dir.path());
        let w = store.begin(&tenant(), &recording()).unwrap();
        std::mem::forget(w); // simulates a crash: the staging file stays
        assert_eq!(
            fs::read_dir(store.staging_dir().unwrap())
                .map(Iterator::count)
                .ok(),
            Some(1)
        );
        let store = BackupStore::open(dir.path(), store.wrapping_key().clone()).unwrap();
        assert_eq!(
            fs::read_dir(store.staging_dir().unwrap())
                .map(Iterator::count)
                .ok(),
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
                matches!(store.object(&bad), Err(BackupError::OutsideStore(_))),
                "{bad:?}"
            );
        }
        assert!(store.object(&objects.join("t1/abc")).is_ok());
    }
}
