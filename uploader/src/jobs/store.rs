//! The job store: jobs and their history in SQLite (WAL, `synchronous=FULL`,
//! so a committed transition survives power loss). Every state change runs
//! [`check_transition`] inside the transaction that makes it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use recvault_proto::uploader::v1 as pb;
use rusqlite::types::ToSql;
use rusqlite::{Connection, Row, Transaction, TransactionBehavior, named_params};
use time::OffsetDateTime;
use tokio::sync::broadcast;

use super::ids::{
    ContentType, DestinationId, FileName, InvalidValue, JobId, RecordingId, TenantId,
};
use super::state::{IllegalTransition, JobState, VerifiedBy, check_transition};
use crate::digest::Sha256Digest;

/// Bump when the schema changes; [`JobStore::open`] refuses a newer database
/// and migrates an older one (see [`migrate`]).
///
/// 1. The first schema.
/// 2. `jobs.object_key` (the recording's key at its destination) and the
///    unique index `jobs_by_object_key`: two recordings never get the same
///    key at one destination.
/// 3. `jobs.stored_sha256`: the SHA-256 of the backup file as stored
///    (encrypted), which the scrub checks without a key; NULL for a backup
///    written in clear by an older uploader.
const SCHEMA_VERSION: i64 = 4;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS jobs (
    job_id              TEXT PRIMARY KEY,
    tenant_id           TEXT NOT NULL,
    recording_id        TEXT NOT NULL,
    destination_id      TEXT NOT NULL,
    file_name           TEXT NOT NULL,
    content_type        TEXT NOT NULL,
    backup_path         TEXT NOT NULL,
    sha256              BLOB NOT NULL CHECK (length(sha256) = 32),
    size                INTEGER NOT NULL CHECK (size >= 0),
    state               TEXT NOT NULL CHECK (state IN
                          ('STORED','UPLOADING','VERIFYING','DELIVERED','RETRYING','RETAINED')),
    attempts            INTEGER NOT NULL DEFAULT 0,
    last_error          TEXT,
    location            TEXT,
    verified_by         TEXT,
    next_attempt_at     INTEGER,            -- Unix milliseconds; NULL = not scheduled
    created_at          INTEGER NOT NULL,
    updated_at          INTEGER NOT NULL,
    backup_corrupt      INTEGER NOT NULL DEFAULT 0,
    backup_deleted      INTEGER NOT NULL DEFAULT 0,
    multipart_upload_id TEXT,               -- kept across a crash so it is resumed or aborted
    request_id          TEXT,
    object_key          TEXT,               -- key at destination_id; NULL = registered at the next attempt
    stored_sha256       BLOB CHECK (stored_sha256 IS NULL OR length(stored_sha256) = 32),
                                            -- of the encrypted backup file; NULL = written in clear
    retrying_since      INTEGER,            -- Unix ms of the first failed attempt since creation
                                            -- or the last resend; NULL = none failed
    doubtful_failures   INTEGER NOT NULL DEFAULT 0,
                                            -- failed attempts whose error may be permanent
    UNIQUE (tenant_id, recording_id)
) STRICT;
CREATE INDEX IF NOT EXISTS jobs_due ON jobs (state, next_attempt_at);
CREATE INDEX IF NOT EXISTS jobs_by_tenant ON jobs (tenant_id, created_at);
-- One recording per key and destination (NULLs do not collide), and the
-- index the name check at ingest, resend and each attempt looks up.
CREATE UNIQUE INDEX IF NOT EXISTS jobs_by_object_key ON jobs (destination_id, object_key);
CREATE TABLE IF NOT EXISTS job_events (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id  TEXT NOT NULL REFERENCES jobs (job_id),
    time    INTEGER NOT NULL,
    state   TEXT NOT NULL,
    message TEXT NOT NULL
) STRICT;
CREATE INDEX IF NOT EXISTS job_events_by_job ON job_events (job_id, id);
";

/// Most jobs one `list` call returns, whatever the caller asks for.
const MAX_LIST: u32 = 1000;
/// What `list` returns when the caller asks for 0.
const DEFAULT_LIST: u32 = 100;
/// Job changes buffered per subscriber before it sees `Lagged`.
const CHANGES_CAPACITY: usize = 1024;

/// Errors from the job store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JobStoreError {
    /// No job has this id.
    #[error("job {0} does not exist")]
    NotFound(JobId),
    /// The job is not in a state that allows this change (e.g. it is already DELIVERED).
    #[error("job {job_id}: {source}")]
    IllegalTransition {
        /// The job.
        job_id: JobId,
        /// Its state and the refused target.
        #[source]
        source: IllegalTransition,
    },
    /// The recording id was ingested before with different content.
    #[error(
        "recording id {recording_id} of tenant {tenant_id} was already ingested with a different \
         SHA-256 ({existing}, now {sent}); send it under a new recording id"
    )]
    RecordingConflict {
        /// The tenant.
        tenant_id: TenantId,
        /// The recording id sent twice.
        recording_id: RecordingId,
        /// SHA-256 of the first ingest (the stored job).
        existing: Sha256Digest,
        /// SHA-256 of the new one.
        sent: Sha256Digest,
    },
    /// Another recording already uses the file name at the destination: the
    /// new one would overwrite it there (or be overwritten). Nothing is stored.
    #[error(
        "file_name {:?} of recording {recording_id} cannot be used: {conflict}; delivering both \
         would overwrite one with the other at the destination. Nothing was stored: send the \
         recording again with a unique file_name (one no other recording uses at that \
         destination), e.g. one that includes the recording id (\"{recording_id}-{file_name}\")",
        .file_name.as_str()
    )]
    NameTaken {
        /// The recording being ingested.
        recording_id: RecordingId,
        /// Its file name.
        file_name: FileName,
        /// Who holds the key.
        conflict: Box<KeyConflict>,
    },
    /// The job cannot go to this destination (resend, or an attempt after the
    /// destination's prefix changed): another recording holds the key there.
    #[error(
        "job {job_id} cannot be delivered to destination {}: {conflict}; delivering it there \
         would overwrite that recording. Resend it to a destination where no other recording \
         uses its file_name (ResendJob with destination_id)",
        conflict.destination_id
    )]
    KeyTaken {
        /// The job.
        job_id: JobId,
        /// Who holds the key.
        conflict: Box<KeyConflict>,
    },
    /// The change is legal in general but not for this job now (no backup to
    /// resend, an unfinished multipart upload elsewhere).
    #[error("job {job_id}: {reason}")]
    FailedPrecondition {
        /// The job.
        job_id: JobId,
        /// What stands in the way and what to do.
        reason: String,
    },
    /// SQLite failed (disk full, I/O error, locked beyond the busy timeout).
    #[error("job database: {0}")]
    Database(#[from] rusqlite::Error),
    /// A stored row does not hold what this version writes (edited by hand, newer schema).
    #[error("job database holds an invalid value: {0}")]
    Corrupt(String),
    /// The blocking task that runs SQLite panicked or the connection lock was poisoned.
    #[error("job store is unavailable: {0}")]
    Unavailable(String),
}

impl From<JobStoreError> for tonic::Status {
    fn from(e: JobStoreError) -> Self {
        use tonic::Status;
        let msg = e.to_string();
        match e {
            JobStoreError::NotFound(_) => Status::not_found(msg),
            // A resend (or attempt) names no object: the job exists, its
            // target is the problem, and the fix is another destination.
            JobStoreError::IllegalTransition { .. }
            | JobStoreError::FailedPrecondition { .. }
            | JobStoreError::KeyTaken { .. } => Status::failed_precondition(msg),
            // An Upload asks to create an object under this name, and it exists.
            JobStoreError::RecordingConflict { .. } | JobStoreError::NameTaken { .. } => {
                Status::already_exists(msg)
            }
            JobStoreError::Database(_) | JobStoreError::Unavailable(_) => Status::unavailable(msg),
            JobStoreError::Corrupt(_) => Status::internal(msg),
        }
    }
}

type Result<T, E = JobStoreError> = std::result::Result<T, E>;

/// How a delivery under one key would collide with another job's at the same
/// destination. Every delivery writes two objects: the recording under its
/// key and its checksum sidecar under `<key>.sha256`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Clash {
    /// Both recordings have the same key.
    SameKey,
    /// This recording's sidecar key is the other recording's key.
    SidecarOverwritesRecording,
    /// This recording's key is the other recording's sidecar key.
    RecordingOverwritesSidecar,
}

/// Another job whose objects a delivery under `key` would overwrite.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyConflict {
    /// The destination.
    pub destination_id: DestinationId,
    /// The key the refused delivery would write its recording under.
    pub key: String,
    /// How they collide.
    pub clash: Clash,
    /// The job that holds the key.
    pub other_job_id: JobId,
    /// Its recording.
    pub other_recording_id: RecordingId,
    /// Its file name.
    pub other_file_name: FileName,
    /// Its state (DELIVERED: the object is at the customer's and its backup is gone).
    pub other_state: JobState,
}

impl std::fmt::Display for KeyConflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let other = format!(
            "recording {} (job {}, file_name {:?}, {})",
            self.other_recording_id,
            self.other_job_id,
            self.other_file_name.as_str(),
            self.other_state
        );
        let (key, destination) = (&self.key, &self.destination_id);
        match self.clash {
            Clash::SameKey => write!(
                f,
                "{other} already uses object key {key:?} at destination {destination}"
            ),
            Clash::SidecarOverwritesRecording => write!(
                f,
                "its checksum sidecar {:?} would overwrite {other}, stored under that key at destination {destination}",
                crate::destination::sidecar_name(key)
            ),
            Clash::RecordingOverwritesSidecar => write!(
                f,
                "object key {key:?} at destination {destination} is the checksum sidecar of {other}"
            ),
        }
    }
}

/// What ingest hands over to create a job.
#[derive(Debug, Clone)]
pub struct NewJob {
    /// The job's id; by convention the id of its backup object.
    pub job_id: JobId,
    /// Owner.
    pub tenant_id: TenantId,
    /// The recorder's id; `(tenant_id, recording_id)` is unique.
    pub recording_id: RecordingId,
    /// Where to deliver.
    pub destination_id: DestinationId,
    /// Name at the destination.
    pub file_name: FileName,
    /// Content type at the destination.
    pub content_type: ContentType,
    /// The durable backup (absolute path inside the backup store).
    pub backup_path: PathBuf,
    /// Whole-file SHA-256 computed at intake.
    pub sha256: Sha256Digest,
    /// Bytes.
    pub size: u64,
    /// SHA-256 of the backup file as stored (encrypted); `None` for a backup in clear.
    pub stored_sha256: Option<Sha256Digest>,
    /// `x-request-id` of the Upload call, for tracing one recording through logs.
    pub request_id: Option<String>,
}

/// A job as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    /// Id (also the backup object's name).
    pub job_id: JobId,
    /// Owner.
    pub tenant_id: TenantId,
    /// The recorder's id.
    pub recording_id: RecordingId,
    /// Current destination (a resend may change it).
    pub destination_id: DestinationId,
    /// Name at the destination.
    pub file_name: FileName,
    /// Content type at the destination.
    pub content_type: ContentType,
    /// The backup file.
    pub backup_path: PathBuf,
    /// Whole-file SHA-256 computed at intake.
    pub sha256: Sha256Digest,
    /// Bytes.
    pub size: u64,
    /// SHA-256 of the backup file as stored (encrypted): what the scrub
    /// checks. `None` for a backup written in clear by an older uploader.
    pub stored_sha256: Option<Sha256Digest>,
    /// Where the job is.
    pub state: JobState,
    /// Attempts started since creation or the last resend.
    pub attempts: u32,
    /// Why the last attempt failed, or why the job is RETAINED.
    pub last_error: Option<String>,
    /// Where the verified copy is (once DELIVERED).
    pub location: Option<String>,
    /// How the copy was verified (once DELIVERED).
    pub verified_by: Option<VerifiedBy>,
    /// The first failed attempt since creation or the last resend: where the
    /// retry window for transient failures starts. `None` while none failed.
    pub retrying_since: Option<OffsetDateTime>,
    /// Failed attempts since creation or the last resend whose error may be
    /// permanent (they have their own, small budget).
    pub doubtful_failures: u32,
    /// When the next attempt is due (STORED, RETRYING).
    pub next_attempt_at: Option<OffsetDateTime>,
    /// When the job was created.
    pub created_at: OffsetDateTime,
    /// When anything last changed.
    pub updated_at: OffsetDateTime,
    /// The periodic scrub or a pre-attempt check found the backup's SHA-256 changed.
    pub backup_corrupt: bool,
    /// The backup was deleted after delivery.
    pub backup_deleted: bool,
    /// An S3 multipart upload started by an attempt and not yet completed or aborted.
    pub multipart_upload_id: Option<String>,
    /// `x-request-id` of the Upload call.
    pub request_id: Option<String>,
    /// The recording's key at `destination_id` (`prefix/file_name`), unique
    /// per destination. `None` until registered (by ingest, a resend or the
    /// next attempt, each of which refuses a key another job holds).
    pub object_key: Option<String>,
    /// Progress of the running attempt. Not persisted: only set on updates
    /// published with [`JobStore::publish_progress`]; 0 when read from the store.
    pub bytes_sent: u64,
}

impl Job {
    /// The wire form for GetJob, ListJobs and WatchJob.
    pub fn to_proto(&self) -> pb::Job {
        pb::Job {
            job_id: self.job_id.to_string(),
            tenant_id: self.tenant_id.to_string(),
            recording_id: self.recording_id.to_string(),
            state: self.state.to_proto().into(),
            attempts: self.attempts,
            last_error: self.last_error.clone().unwrap_or_default(),
            location: self.location.clone().unwrap_or_default(),
            sha256: self.sha256.as_bytes().to_vec(),
            size: self.size,
            destination_id: self.destination_id.to_string(),
            file_name: self.file_name.to_string(),
            verified_by: self
                .verified_by
                .map(|v| v.as_str().to_owned())
                .unwrap_or_default(),
            created_at: Some(timestamp(self.created_at)),
            updated_at: Some(timestamp(self.updated_at)),
            next_attempt_at: self.next_attempt_at.map(timestamp),
            backup_corrupt: self.backup_corrupt,
            bytes_sent: self.bytes_sent,
        }
    }
}

fn timestamp(t: OffsetDateTime) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.unix_timestamp(),
        nanos: i32::try_from(t.nanosecond()).unwrap_or(0),
    }
}

/// One line of a job's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobEvent {
    /// When.
    pub time: OffsetDateTime,
    /// The state after the event.
    pub state: JobState,
    /// What happened, for people.
    pub message: String,
}

/// What [`JobStore::resend_to`] does besides moving the job back to STORED.
#[derive(Debug, Clone, Default)]
pub struct Resend {
    /// Another destination; `None` keeps the current one.
    pub destination: Option<DestinationId>,
    /// The recording's key at the destination it is resent to, checked
    /// against every other job there. `None`: kept when the destination
    /// stays, otherwise registered at the next attempt.
    pub object_key: Option<String>,
    /// The multipart upload the job records at its current destination,
    /// which the caller has dealt with before moving the job elsewhere
    /// (aborted it there). Cleared only if the job still records this id.
    pub released_upload: Option<ReleasedUpload>,
}

/// A multipart upload a resend may forget: the id, and the history line that
/// says what became of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleasedUpload {
    /// The upload id.
    pub upload_id: String,
    /// For the job's history, e.g. "multipart upload … aborted at destination …".
    pub message: String,
}

/// Which jobs `list` returns.
#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    /// Only this tenant's jobs.
    pub tenant_id: Option<TenantId>,
    /// Only jobs in this state.
    pub state: Option<JobState>,
    /// At most this many (0 = 100; capped at 1000). Newest first.
    pub limit: u32,
}

/// Persisted jobs. Cheap to clone; all clones share one connection and one
/// change feed.
///
/// SQLite is synchronous, so every call runs on tokio's blocking pool behind
/// one mutex: transitions are serialized, which is what a single uploader
/// process needs.
#[derive(Debug, Clone)]
pub struct JobStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    conn: Mutex<Connection>,
    changes: broadcast::Sender<Job>,
}

impl JobStore {
    /// Opens (creating if needed) the job database at `path`.
    ///
    /// Blocking (a few milliseconds); call it at start-up, before serving.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let mut conn = Connection::open(path.as_ref())?;
        // WAL lets readers (ListJobs) run beside the writer; FULL fsyncs the
        // WAL on every commit, so a transition the caller saw committed
        // survives a crash or power loss (https://sqlite.org/pragma.html#pragma_synchronous).
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", true)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version > SCHEMA_VERSION {
            return Err(JobStoreError::Corrupt(format!(
                "schema version {version} is newer than this uploader's {SCHEMA_VERSION}; run a newer uploader"
            )));
        }
        // IMMEDIATE: a second process opening the same file waits instead of
        // migrating beside us.
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        migrate(&tx)?;
        tx.execute_batch(SCHEMA)?;
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        tx.commit()?;
        let (changes, _) = broadcast::channel(CHANGES_CAPACITY);
        Ok(Self {
            inner: Arc::new(Inner {
                conn: Mutex::new(conn),
                changes,
            }),
        })
    }

    /// Every job change after this call (creation, each transition, progress).
    ///
    /// Subscribe *before* reading the job's current state so no change falls
    /// in between. A slow receiver gets `Lagged` and should re-read with [`JobStore::get`].
    pub fn subscribe(&self) -> broadcast::Receiver<Job> {
        self.inner.changes.subscribe()
    }

    /// Tells subscribers how far the running attempt got, without touching
    /// the database (progress is too frequent to fsync).
    pub fn publish_progress(&self, job: &Job, bytes_sent: u64) {
        let mut job = job.clone();
        job.bytes_sent = bytes_sent;
        let _ = self.inner.changes.send(job);
    }

    /// Runs `f` on the blocking pool with the connection.
    async fn run<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || {
            let mut conn = inner.conn.lock().map_err(|_| {
                JobStoreError::Unavailable("a previous job store call panicked".to_owned())
            })?;
            f(&mut conn)
        })
        .await
        .map_err(|e| JobStoreError::Unavailable(format!("job store task failed: {e}")))?
    }

    /// Like [`JobStore::run`], then publishes the returned jobs to subscribers
    /// (only after the commit, so nobody sees a change that was rolled back).
    async fn run_publish<F>(&self, f: F) -> Result<Vec<Job>>
    where
        F: FnOnce(&mut Connection) -> Result<Vec<Job>> + Send + 'static,
    {
        let jobs = self.run(f).await?;
        for job in &jobs {
            let _ = self.inner.changes.send(job.clone());
        }
        Ok(jobs)
    }

    /// Creates the job for an ingested recording, or returns the existing job
    /// when `(tenant_id, recording_id)` was ingested before with the same
    /// SHA-256 (`created == false`; the caller then deletes its new backup).
    /// A different SHA-256 is [`JobStoreError::RecordingConflict`].
    ///
    /// The job's object key is left unregistered: its first attempt registers
    /// it (refusing a key another job holds). Ingest uses
    /// [`JobStore::create_or_get_with_key`].
    pub async fn create_or_get(&self, new: NewJob) -> Result<(Job, bool)> {
        self.create_or_get_with_key(new, None).await
    }

    /// As [`JobStore::create_or_get`], registering `object_key` (the key the
    /// destination will write the recording under) in the same transaction
    /// as the insert: if another recording's delivery at that destination
    /// would overwrite this one's or be overwritten by it (see
    /// [`KeyConflict`]), nothing is inserted and the error is
    /// [`JobStoreError::NameTaken`]. Two concurrent calls with the same key
    /// cannot both pass: the check and the insert run in one IMMEDIATE
    /// transaction, and `jobs_by_object_key` is a unique index besides.
    /// A replay of the same recording id is answered as before, without a check.
    pub async fn create_or_get_with_key(
        &self,
        new: NewJob,
        object_key: Option<String>,
    ) -> Result<(Job, bool)> {
        let (job, created) = self
            .run(move |conn| {
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                if let Some(existing) = select_one(
                    &tx,
                    "tenant_id = :t AND recording_id = :r",
                    named_params! { ":t": new.tenant_id.as_str(), ":r": new.recording_id.as_str() },
                )? {
                    if existing.sha256 != new.sha256 {
                        return Err(JobStoreError::RecordingConflict {
                            tenant_id: new.tenant_id,
                            recording_id: new.recording_id,
                            existing: existing.sha256,
                            sent: new.sha256,
                        });
                    }
                    return Ok((existing, false));
                }
                if let Some(key) = &object_key
                    && let Some(conflict) = key_conflict(&tx, &new.destination_id, key, None)?
                {
                    return Err(JobStoreError::NameTaken {
                        recording_id: new.recording_id,
                        file_name: new.file_name,
                        conflict,
                    });
                }
                let now = now_ms();
                tx.execute(
                    "INSERT INTO jobs (job_id, tenant_id, recording_id, destination_id, file_name,
                        content_type, backup_path, sha256, size, state, attempts, next_attempt_at,
                        created_at, updated_at, request_id, object_key, stored_sha256)
                     VALUES (:id, :t, :r, :d, :f, :ct, :p, :sha, :size, 'STORED', 0, :now, :now, :now, :req, :key, :stored)",
                    named_params! {
                        ":id": new.job_id.to_string(),
                        ":t": new.tenant_id.as_str(),
                        ":r": new.recording_id.as_str(),
                        ":d": new.destination_id.as_str(),
                        ":f": new.file_name.as_str(),
                        ":ct": new.content_type.as_str(),
                        ":p": path_text(&new.backup_path)?,
                        ":sha": new.sha256.as_bytes().as_slice(),
                        ":size": i64::try_from(new.size)
                            .map_err(|_| JobStoreError::Corrupt(format!("size {} too large", new.size)))?,
                        ":now": now,
                        ":req": new.request_id,
                        ":key": object_key,
                        ":stored": new.stored_sha256.as_ref().map(|d| d.as_bytes().as_slice()),
                    },
                )?;
                add_event(
                    &tx,
                    new.job_id,
                    now,
                    JobState::Stored,
                    &format!("stored in the backup store: {} bytes, SHA-256 {}", new.size, new.sha256),
                )?;
                let job = get_tx(&tx, new.job_id)?;
                tx.commit()?;
                Ok((job, true))
            })
            .await?;
        if created {
            let _ = self.inner.changes.send(job.clone());
        }
        Ok((job, created))
    }

    /// Ingest's check before it takes any byte: `Err(NameTaken)` when a job
    /// of another recording holds `object_key` at `destination_id` (or its
    /// sidecar would collide; see [`KeyConflict`]). `Ok` when the key is free,
    /// and when `(tenant_id, recording_id)` was ingested before: a replay is
    /// answered by [`JobStore::create_or_get_with_key`], idempotently.
    ///
    /// Advisory: [`JobStore::create_or_get_with_key`] checks again in the
    /// transaction that inserts, so a concurrent upload cannot slip through.
    pub async fn check_object_key(
        &self,
        tenant_id: TenantId,
        recording_id: RecordingId,
        file_name: FileName,
        destination_id: DestinationId,
        object_key: String,
    ) -> Result<()> {
        self.run(move |conn| {
            let replay = select_one(
                conn,
                "tenant_id = :t AND recording_id = :r",
                named_params! { ":t": tenant_id.as_str(), ":r": recording_id.as_str() },
            )?;
            if replay.is_some() {
                return Ok(());
            }
            match key_conflict(conn, &destination_id, &object_key, None)? {
                Some(conflict) => Err(JobStoreError::NameTaken {
                    recording_id,
                    file_name,
                    conflict,
                }),
                None => Ok(()),
            }
        })
        .await
    }

    /// `Err(KeyTaken)` when a job other than `job_id` holds `object_key` at
    /// `destination_id` (or their sidecars would collide). Advisory, for a
    /// caller that wants to refuse before doing other work: the change
    /// itself ([`JobStore::resend_to`]) checks again in its transaction.
    pub async fn check_key_free(
        &self,
        job_id: JobId,
        destination_id: DestinationId,
        object_key: String,
    ) -> Result<()> {
        self.run(move |conn| {
            match key_conflict(conn, &destination_id, &object_key, Some(job_id))? {
                Some(conflict) => Err(JobStoreError::KeyTaken { job_id, conflict }),
                None => Ok(()),
            }
        })
        .await
    }

    /// Registers `object_key` as the job's key at its current destination,
    /// before an attempt writes there (the destination's prefix may have
    /// changed since ingest, or the job may predate keys). A no-op when it
    /// already holds that key; [`JobStoreError::KeyTaken`] when another job's
    /// objects would be overwritten, and then nothing changes.
    pub async fn register_object_key(&self, job_id: JobId, object_key: String) -> Result<Job> {
        let mut jobs = self
            .run_publish(move |conn| {
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                let job = get_tx(&tx, job_id)?;
                if job.object_key.as_deref() == Some(object_key.as_str()) {
                    return Ok(Vec::new());
                }
                if let Some(conflict) =
                    key_conflict(&tx, &job.destination_id, &object_key, Some(job_id))?
                {
                    return Err(JobStoreError::KeyTaken { job_id, conflict });
                }
                let now = now_ms();
                tx.execute(
                    "UPDATE jobs SET object_key = :k, updated_at = :now WHERE job_id = :id",
                    named_params! { ":k": object_key, ":now": now, ":id": job_id.to_string() },
                )?;
                let message = match &job.object_key {
                    Some(old) => format!(
                        "object key at destination {} is now {object_key:?} (was {old:?}: the destination changed)",
                        job.destination_id
                    ),
                    None => format!(
                        "object key {object_key:?} registered at destination {}",
                        job.destination_id
                    ),
                };
                add_event(&tx, job_id, now, job.state, &message)?;
                let job = get_tx(&tx, job_id)?;
                tx.commit()?;
                Ok(vec![job])
            })
            .await?;
        match jobs.pop() {
            Some(job) => Ok(job),
            None => self.get(job_id).await,
        }
    }

    /// One job.
    pub async fn get(&self, job_id: JobId) -> Result<Job> {
        self.run(move |conn| get_tx(conn, job_id)).await
    }

    /// The job for a recording id, if it was ingested (lets ingest answer a
    /// replay without storing the bytes again).
    pub async fn find_by_recording(
        &self,
        tenant_id: TenantId,
        recording_id: RecordingId,
    ) -> Result<Option<Job>> {
        self.run(move |conn| {
            select_one(
                conn,
                "tenant_id = :t AND recording_id = :r",
                named_params! { ":t": tenant_id.as_str(), ":r": recording_id.as_str() },
            )
        })
        .await
    }

    /// Jobs matching `filter`, newest first.
    pub async fn list(&self, filter: JobFilter) -> Result<Vec<Job>> {
        self.run(move |conn| {
            let limit = match filter.limit {
                0 => DEFAULT_LIST,
                n => n.min(MAX_LIST),
            };
            select_many(
                conn,
                "(:t IS NULL OR tenant_id = :t) AND (:s IS NULL OR state = :s)
                 ORDER BY created_at DESC, rowid DESC LIMIT :limit",
                named_params! {
                    ":t": filter.tenant_id.as_ref().map(TenantId::as_str),
                    ":s": filter.state.map(JobState::as_str),
                    ":limit": limit,
                },
            )
        })
        .await
    }

    /// How many jobs are in each state (for the jobs-by-state metric).
    pub async fn count_by_state(&self) -> Result<Vec<(JobState, u64)>> {
        self.run(move |conn| {
            let mut stmt =
                conn.prepare_cached("SELECT state, COUNT(*) FROM jobs GROUP BY state")?;
            let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
            let mut out = Vec::new();
            for row in rows {
                let (state, n) = row?;
                if let Some(state) = JobState::from_db(&state) {
                    out.push((state, n.unsigned_abs()));
                }
            }
            Ok(out)
        })
        .await
    }

    /// Atomically takes up to `limit` jobs that are due at `now` (STORED, or
    /// RETRYING with `next_attempt_at <= now`, backup not corrupt), moves them
    /// to UPLOADING and counts the attempt. A job is returned by one call only.
    ///
    /// This is the seam for several uploader replicas on PostgreSQL: there the
    /// SELECT becomes `... FOR UPDATE SKIP LOCKED` inside the same transaction,
    /// so replicas claim disjoint jobs without waiting on each other. Here one
    /// `BEGIN IMMEDIATE` transaction behind the process mutex does the same.
    pub async fn claim_due(&self, now: OffsetDateTime, limit: u32) -> Result<Vec<Job>> {
        self.run_publish(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let now_ms = to_ms(now);
            let ids: Vec<String> = {
                let mut stmt = tx.prepare(
                    "SELECT job_id FROM jobs
                     WHERE state IN ('STORED', 'RETRYING') AND backup_corrupt = 0
                       AND next_attempt_at IS NOT NULL AND next_attempt_at <= :now
                     ORDER BY next_attempt_at, created_at, rowid LIMIT :limit",
                )?;
                stmt.query_map(named_params! { ":now": now_ms, ":limit": limit }, |r| {
                    r.get(0)
                })?
                .collect::<rusqlite::Result<_>>()?
            };
            let mut claimed = Vec::with_capacity(ids.len());
            for id in ids {
                let job_id = parse_job_id(&id)?;
                let job = transition(
                    &tx,
                    job_id,
                    JobState::Uploading,
                    now_ms,
                    "attempt started",
                    "attempts = attempts + 1, next_attempt_at = NULL",
                    &[],
                )?;
                claimed.push(job);
            }
            tx.commit()?;
            Ok(claimed)
        })
        .await
    }

    /// UPLOADING → VERIFYING: the upload finished; the destination's copy is being checked.
    pub async fn mark_verifying(&self, job_id: JobId) -> Result<Job> {
        self.single(move |tx, now| {
            transition(
                tx,
                job_id,
                JobState::Verifying,
                now,
                "upload finished; verifying",
                "",
                &[],
            )
        })
        .await
    }

    /// VERIFYING → DELIVERED. The caller deletes the backup only after this
    /// returns, then calls [`JobStore::mark_backup_deleted`].
    pub async fn mark_delivered(
        &self,
        job_id: JobId,
        location: String,
        verified_by: VerifiedBy,
    ) -> Result<Job> {
        self.single(move |tx, now| {
            let message = format!("delivered to {location}, verified by {verified_by}");
            transition(
                tx,
                job_id,
                JobState::Delivered,
                now,
                &message,
                "location = :location, verified_by = :verified_by, last_error = NULL,
                 next_attempt_at = NULL, multipart_upload_id = NULL",
                named_params! { ":location": location, ":verified_by": verified_by.as_str() },
            )
        })
        .await
    }

    /// UPLOADING | VERIFYING → RETRYING after a failure that may pass, due
    /// again at `next_attempt_at`. The first such failure since creation or
    /// the last resend starts the retry window (`retrying_since`); a failure
    /// that may be permanent (`doubtful`) also counts against its own budget.
    pub async fn mark_retry(
        &self,
        job_id: JobId,
        error: String,
        next_attempt_at: OffsetDateTime,
        doubtful: bool,
    ) -> Result<Job> {
        self.single(move |tx, now| {
            let message = format!(
                "attempt failed ({}), retrying at {}: {error}",
                if doubtful {
                    "may be permanent"
                } else {
                    "transient"
                },
                rfc3339(next_attempt_at)
            );
            transition(
                tx,
                job_id,
                JobState::Retrying,
                now,
                &message,
                "last_error = :error, next_attempt_at = :next,
                 retrying_since = COALESCE(retrying_since, :now),
                 doubtful_failures = doubtful_failures + :doubtful",
                named_params! {
                    ":error": error,
                    ":next": to_ms(next_attempt_at),
                    ":doubtful": i64::from(doubtful),
                },
            )
        })
        .await
    }

    /// → RETAINED with `reason` (permanent error, attempts exhausted). The
    /// backup stays; only [`JobStore::resend`] moves the job on.
    pub async fn mark_retained(&self, job_id: JobId, reason: String) -> Result<Job> {
        self.single(move |tx, now| {
            let message = format!("retained: {reason}");
            transition(
                tx,
                job_id,
                JobState::Retained,
                now,
                &message,
                "last_error = :reason, next_attempt_at = NULL",
                named_params! { ":reason": reason },
            )
        })
        .await
    }

    /// Records (or, with `None`, clears) the S3 multipart upload the running
    /// attempt started, before any part is sent, so that after a crash it is
    /// resumed or aborted instead of orphaned.
    pub async fn set_multipart_upload_id(
        &self,
        job_id: JobId,
        upload_id: Option<String>,
    ) -> Result<Job> {
        self.single(move |tx, now| {
            let job = get_tx(tx, job_id)?;
            if job.state == JobState::Delivered && upload_id.is_some() {
                return Err(JobStoreError::IllegalTransition {
                    job_id,
                    source: IllegalTransition {
                        from: job.state,
                        to: JobState::Uploading,
                    },
                });
            }
            tx.execute(
                "UPDATE jobs SET multipart_upload_id = :u, updated_at = :now WHERE job_id = :id",
                named_params! { ":u": upload_id, ":now": now, ":id": job_id.to_string() },
            )?;
            let message = match &upload_id {
                Some(u) => format!("multipart upload {u} started"),
                None => "multipart upload finished or aborted".to_owned(),
            };
            add_event(tx, job_id, now, job.state, &message)?;
            get_tx(tx, job_id)
        })
        .await
    }

    /// Forgets `upload_id` once the provider no longer holds that upload
    /// (completed, or aborted). Only that id: if the job meanwhile records
    /// another (or none), nothing changes.
    pub async fn clear_multipart_upload_id(&self, job_id: JobId, upload_id: String) -> Result<Job> {
        let mut jobs = self
            .run_publish(move |conn| {
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                let job = get_tx(&tx, job_id)?;
                if job.multipart_upload_id.as_deref() != Some(upload_id.as_str()) {
                    return Ok(Vec::new());
                }
                let now = now_ms();
                tx.execute(
                    "UPDATE jobs SET multipart_upload_id = NULL, updated_at = :now WHERE job_id = :id",
                    named_params! { ":now": now, ":id": job_id.to_string() },
                )?;
                let message = format!("multipart upload {upload_id} completed or aborted");
                add_event(&tx, job_id, now, job.state, &message)?;
                let job = get_tx(&tx, job_id)?;
                tx.commit()?;
                Ok(vec![job])
            })
            .await?;
        match jobs.pop() {
            Some(job) => Ok(job),
            None => self.get(job_id).await,
        }
    }

    /// RETAINED | RETRYING → STORED, due now, attempts reset, optionally to
    /// another destination (the caller checks it belongs to the tenant).
    /// Shorthand for [`JobStore::resend_to`] without an object key.
    pub async fn resend(&self, job_id: JobId, destination: Option<DestinationId>) -> Result<Job> {
        self.resend_to(
            job_id,
            Resend {
                destination,
                ..Resend::default()
            },
        )
        .await
    }

    /// RETAINED | RETRYING → STORED, due now, attempts reset, optionally to
    /// another destination (the caller checks it belongs to the tenant).
    ///
    /// Refused when the backup is gone or corrupt (nothing to send), when a
    /// multipart upload at the old destination is still open (it would be
    /// orphaned), and, with [`JobStoreError::KeyTaken`], when another job
    /// holds the object key at the destination (its recording would be
    /// overwritten there). Nothing changes when refused.
    pub async fn resend_to(&self, job_id: JobId, resend: Resend) -> Result<Job> {
        self.single(move |tx, now| {
            let Resend {
                destination,
                object_key,
                released_upload,
            } = resend;
            let job = get_tx(tx, job_id)?;
            check_transition(job.state, JobState::Stored)
                .map_err(|source| JobStoreError::IllegalTransition { job_id, source })?;
            let refuse = |reason: String| Err(JobStoreError::FailedPrecondition { job_id, reason });
            if job.backup_deleted {
                return refuse("its backup was deleted, so there is nothing to resend".to_owned());
            }
            if job.backup_corrupt {
                return refuse(
                    "its backup failed the SHA-256 check and will not be sent; have the recorder send the recording again under a new recording id"
                        .to_owned(),
                );
            }
            match std::fs::metadata(&job.backup_path) {
                Ok(m) if m.is_file() => {}
                Ok(_) | Err(_) => {
                    return refuse(format!(
                        "its backup {} is missing from the backup store; nothing can be resent",
                        job.backup_path.display()
                    ));
                }
            }
            let changes_destination = destination
                .as_ref()
                .is_some_and(|d| *d != job.destination_id);
            let released = released_upload
                .filter(|r| job.multipart_upload_id.as_deref() == Some(r.upload_id.as_str()));
            if changes_destination
                && let Some(open) = &job.multipart_upload_id
                && released.is_none()
            {
                return refuse(format!(
                    "multipart upload {open} at its current destination {} is still open and \
                     would be orphaned; resend again (ResendJob aborts it first), or resend to \
                     the same destination, which resumes it",
                    job.destination_id
                ));
            }
            if let Some(released) = &released {
                tx.execute(
                    "UPDATE jobs SET multipart_upload_id = NULL WHERE job_id = :id",
                    named_params! { ":id": job_id.to_string() },
                )?;
                add_event(tx, job_id, now, job.state, &released.message)?;
            }
            let destination = destination.unwrap_or(job.destination_id);
            // A key at the old destination means nothing at the new one.
            let object_key = match object_key {
                Some(key) => Some(key),
                None if changes_destination => None,
                None => job.object_key,
            };
            if let Some(key) = &object_key
                && let Some(conflict) = key_conflict(tx, &destination, key, Some(job_id))?
            {
                return Err(JobStoreError::KeyTaken { job_id, conflict });
            }
            let message = if changes_destination {
                format!("resend requested to destination {destination}")
            } else {
                "resend requested".to_owned()
            };
            transition(
                tx,
                job_id,
                JobState::Stored,
                now,
                &message,
                "attempts = 0, last_error = NULL, next_attempt_at = :now, destination_id = :d,
                 object_key = :k, retrying_since = NULL, doubtful_failures = 0",
                named_params! { ":d": destination.as_str(), ":k": object_key },
            )
        })
        .await
    }

    /// At start-up, before any worker runs: every job a previous process left
    /// UPLOADING or VERIFYING becomes RETRYING, due now. `multipart_upload_id`
    /// is kept so the next attempt resumes or aborts that upload. Returns them.
    pub async fn recover_after_crash(&self) -> Result<Vec<Job>> {
        self.run_publish(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let now = now_ms();
            let stuck = select_many(
                &tx,
                "state IN ('UPLOADING', 'VERIFYING') ORDER BY created_at",
                named_params! {},
            )?;
            let mut recovered = Vec::with_capacity(stuck.len());
            for job in stuck {
                let message = format!(
                    "the uploader stopped while the job was {}; retrying",
                    job.state
                );
                recovered.push(transition(
                    &tx,
                    job.job_id,
                    JobState::Retrying,
                    now,
                    &message,
                    "last_error = :msg, next_attempt_at = :now",
                    named_params! { ":msg": message },
                )?);
            }
            tx.commit()?;
            Ok(recovered)
        })
        .await
    }

    /// The backup no longer matches its SHA-256 (scrub or pre-attempt check).
    /// Marks it; a STORED or RETRYING job also becomes RETAINED so it is never
    /// claimed. Nothing is deleted. The job gives up its object key (see
    /// [`release_key_of_corrupt`]): at once, or when a running attempt ends
    /// without delivering.
    pub async fn mark_backup_corrupt(&self, job_id: JobId, detail: String) -> Result<Job> {
        self.single(move |tx, now| {
            let job = get_tx(tx, job_id)?;
            if job.state == JobState::Delivered {
                // The delivered copy was verified against the intake digest; a
                // later change to a leftover backup does not concern the job.
                return Ok(job);
            }
            let message = format!("backup corrupt: {detail}");
            tx.execute(
                "UPDATE jobs SET backup_corrupt = 1, last_error = :m, updated_at = :now WHERE job_id = :id",
                named_params! { ":m": message, ":now": now, ":id": job_id.to_string() },
            )?;
            if matches!(job.state, JobState::Stored | JobState::Retrying) {
                transition(tx, job_id, JobState::Retained, now, &message, "next_attempt_at = NULL", &[])
            } else {
                add_event(tx, job_id, now, job.state, &message)?;
                release_key_of_corrupt(tx, job_id, now)?;
                get_tx(tx, job_id)
            }
        })
        .await
    }

    /// Records that a DELIVERED job's backup was deleted. Idempotent.
    pub async fn mark_backup_deleted(&self, job_id: JobId) -> Result<Job> {
        self.single(move |tx, now| {
            let job = get_tx(tx, job_id)?;
            if job.state != JobState::Delivered {
                return Err(JobStoreError::FailedPrecondition {
                    job_id,
                    reason: format!(
                        "its backup may only be deleted once DELIVERED, and it is {}",
                        job.state
                    ),
                });
            }
            if job.backup_deleted {
                return Ok(job);
            }
            tx.execute(
                "UPDATE jobs SET backup_deleted = 1, updated_at = :now WHERE job_id = :id",
                named_params! { ":now": now, ":id": job_id.to_string() },
            )?;
            add_event(tx, job_id, now, JobState::Delivered, "backup deleted")?;
            get_tx(tx, job_id)
        })
        .await
    }

    /// DELIVERED jobs whose backup is not yet recorded as deleted: a crash
    /// between verification and deletion leaves these; delete them at start-up.
    pub async fn pending_backup_deletes(&self) -> Result<Vec<Job>> {
        self.run(|conn| {
            select_many(
                conn,
                "state = 'DELIVERED' AND backup_deleted = 0 ORDER BY updated_at",
                named_params! {},
            )
        })
        .await
    }

    /// Jobs whose backup the scrub should re-hash: not delivered, backup
    /// present and not already known corrupt.
    pub async fn scrub_candidates(&self) -> Result<Vec<Job>> {
        self.run(|conn| {
            select_many(
                conn,
                "state <> 'DELIVERED' AND backup_deleted = 0 AND backup_corrupt = 0 ORDER BY created_at",
                named_params! {},
            )
        })
        .await
    }

    /// The job's history, oldest first.
    pub async fn history(&self, job_id: JobId) -> Result<Vec<JobEvent>> {
        self.run(move |conn| {
            get_tx(conn, job_id)?;
            let mut stmt = conn.prepare(
                "SELECT time, state, message FROM job_events WHERE job_id = :id ORDER BY id",
            )?;
            let mut rows = stmt.query(named_params! { ":id": job_id.to_string() })?;
            let mut events = Vec::new();
            while let Some(row) = rows.next()? {
                let state: String = row.get("state")?;
                events.push(JobEvent {
                    time: from_ms(row.get("time")?)?,
                    state: JobState::from_db(&state)
                        .ok_or_else(|| JobStoreError::Corrupt(format!("event state {state:?}")))?,
                    message: row.get("message")?,
                });
            }
            Ok(events)
        })
        .await
    }

    /// One committed change to one job, published to subscribers.
    async fn single<F>(&self, f: F) -> Result<Job>
    where
        F: FnOnce(&Transaction<'_>, i64) -> Result<Job> + Send + 'static,
    {
        let mut jobs = self
            .run_publish(move |conn| {
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                let job = f(&tx, now_ms())?;
                tx.commit()?;
                Ok(vec![job])
            })
            .await?;
        jobs.pop()
            .ok_or_else(|| JobStoreError::Unavailable("no job returned".to_owned()))
    }
}

/// Brings a database written by an older uploader up to [`SCHEMA`] (which
/// then only adds what is missing). Runs inside `open`'s transaction, so a
/// failed migration changes nothing.
fn migrate(tx: &Transaction<'_>) -> Result<()> {
    if !table_exists(tx, "jobs")? {
        return Ok(()); // a new database: SCHEMA creates everything
    }
    let has_object_key = tx
        .prepare("SELECT 1 FROM pragma_table_info('jobs') WHERE name = 'object_key'")?
        .exists([])?;
    if !has_object_key {
        migrate_object_keys(tx)?;
    }
    let has_stored_sha256 = tx
        .prepare("SELECT 1 FROM pragma_table_info('jobs') WHERE name = 'stored_sha256'")?
        .exists([])?;
    if !has_stored_sha256 {
        // Version 2 → 3. Every existing backup was written in clear, so NULL
        // is right for all of them: they are read as plaintext, and the scrub
        // keeps checking their content SHA-256.
        tx.execute_batch(
            "ALTER TABLE jobs ADD COLUMN stored_sha256 BLOB
                CHECK (stored_sha256 IS NULL OR length(stored_sha256) = 32)",
        )?;
    }
    let has_retrying_since = tx
        .prepare("SELECT 1 FROM pragma_table_info('jobs') WHERE name = 'retrying_since'")?
        .exists([])?;
    if !has_retrying_since {
        // Version 3 → 4. A job already RETRYING starts its retry window now
        // (its first failure's time was not kept) and counts no doubtful
        // failure yet.
        tx.execute_batch(
            "ALTER TABLE jobs ADD COLUMN retrying_since INTEGER;
             ALTER TABLE jobs ADD COLUMN doubtful_failures INTEGER NOT NULL DEFAULT 0;",
        )?;
        tx.execute(
            "UPDATE jobs SET retrying_since = :now WHERE state = 'RETRYING'",
            named_params! { ":now": to_ms(OffsetDateTime::now_utc()) },
        )?;
    }
    Ok(())
}

/// Version 1 → 2: adds `jobs.object_key` and fills it for existing jobs from
/// their destination's current prefix. The destinations table lives in the
/// same database file (`server::bind` opens both on `database`); a job whose
/// destination is gone keeps NULL (nothing can be sent there any more), as
/// does a job whose key an older job already holds (ingested before names
/// were checked): the older one keeps the key, and the newer one's next
/// attempt or resend registers a key again, which is refused while it is
/// taken.
fn migrate_object_keys(tx: &Transaction<'_>) -> Result<()> {
    tx.execute_batch("ALTER TABLE jobs ADD COLUMN object_key TEXT")?;
    if !table_exists(tx, "destinations")? {
        return Ok(());
    }
    let rows: Vec<(String, String, String, String)> = {
        let mut stmt = tx.prepare(
            "SELECT j.job_id, j.destination_id, j.file_name, d.prefix
             FROM jobs j JOIN destinations d ON d.destination_id = j.destination_id
             ORDER BY j.created_at, j.rowid",
        )?;
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
            .collect::<rusqlite::Result<_>>()?
    };
    let mut holders = std::collections::HashMap::new();
    for (job_id, destination_id, file_name, prefix) in rows {
        let Ok(key) = crate::destination::object_key(&prefix, &file_name) else {
            continue; // a name or prefix no delivery can use; it never reaches the destination
        };
        match holders.entry((destination_id, key)) {
            std::collections::hash_map::Entry::Occupied(held) => {
                let (destination_id, key) = held.key();
                tracing::warn!(
                    %job_id,
                    holder = %held.get(),
                    %destination_id,
                    %key,
                    "two jobs were ingested with the same object key; the older keeps it, and this job cannot be delivered there (it would overwrite the other) until it is resent elsewhere"
                );
            }
            std::collections::hash_map::Entry::Vacant(free) => {
                tx.execute(
                    "UPDATE jobs SET object_key = :k WHERE job_id = :id",
                    named_params! { ":k": free.key().1, ":id": job_id },
                )?;
                free.insert(job_id);
            }
        }
    }
    Ok(())
}

fn table_exists(conn: &Connection, name: &str) -> Result<bool> {
    Ok(conn
        .prepare("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1")?
        .exists([name])?)
}

/// Jobs other than `:except` holding key `:k` at destination `:d`: a probe
/// of the unique index `jobs_by_object_key`.
const KEY_CONDITION: &str =
    "destination_id = :d AND object_key = :k AND (:except IS NULL OR job_id <> :except)";

/// The first job other than `except` whose objects a delivery under `key`
/// to `destination` would overwrite, or that would overwrite its objects:
/// the same key, or one's key being the other's `<key>.sha256` sidecar.
/// Each lookup is one probe of `jobs_by_object_key`. Call it inside the
/// IMMEDIATE transaction that then writes the key, so no other writer can
/// take the key in between.
fn key_conflict(
    conn: &Connection,
    destination: &DestinationId,
    key: &str,
    except: Option<JobId>,
) -> Result<Option<Box<KeyConflict>>> {
    let sidecar = crate::destination::sidecar_name(key);
    let mut probes = vec![(key.to_owned(), Clash::SameKey)];
    probes.push((sidecar, Clash::SidecarOverwritesRecording));
    if let Some(recording) = key.strip_suffix(".sha256") {
        probes.push((recording.to_owned(), Clash::RecordingOverwritesSidecar));
    }
    let except = except.map(|id| id.to_string());
    for (probe, clash) in probes {
        let other = select_one(
            conn,
            KEY_CONDITION,
            named_params! { ":d": destination.as_str(), ":k": probe, ":except": except },
        )?;
        if let Some(other) = other {
            return Ok(Some(Box::new(KeyConflict {
                destination_id: destination.clone(),
                key: key.to_owned(),
                clash,
                other_job_id: other.job_id,
                other_recording_id: other.recording_id,
                other_file_name: other.file_name,
                other_state: other.state,
            })));
        }
    }
    Ok(None)
}

/// Checks and applies `→ to`, sets `set` (extra `col = :param` assignments
/// using `params`), and writes the history line. Returns the updated job.
fn transition(
    tx: &Transaction<'_>,
    job_id: JobId,
    to: JobState,
    now: i64,
    message: &str,
    set: &str,
    params: &[(&str, &dyn ToSql)],
) -> Result<Job> {
    let job = get_tx(tx, job_id)?;
    check_transition(job.state, to)
        .map_err(|source| JobStoreError::IllegalTransition { job_id, source })?;
    let sep = if set.is_empty() { "" } else { ", " };
    let sql = format!(
        "UPDATE jobs SET state = :state, updated_at = :now{sep}{set} WHERE job_id = :id AND state = :from"
    );
    let id = job_id.to_string();
    let (to_name, from_name) = (to.as_str(), job.state.as_str());
    let mut all: Vec<(&str, &dyn ToSql)> = vec![
        (":state", &to_name),
        (":now", &now),
        (":id", &id),
        (":from", &from_name),
    ];
    all.extend_from_slice(params);
    // Only bind what the statement names; rusqlite refuses unknown parameters.
    let mut stmt = tx.prepare(&sql)?;
    let bound: Vec<(&str, &dyn ToSql)> = all
        .into_iter()
        .filter(|(name, _)| stmt.parameter_index(name).ok().flatten().is_some())
        .collect();
    let changed = stmt.execute(bound.as_slice())?;
    if changed != 1 {
        return Err(JobStoreError::Unavailable(format!(
            "job {job_id} changed state during the transition to {to}"
        )));
    }
    add_event(tx, job_id, now, to, message)?;
    release_key_of_corrupt(tx, job_id, now)?;
    get_tx(tx, job_id)
}

/// A job whose backup is corrupt and that was never DELIVERED will not be
/// sent again (claim and resend refuse it; the recorder is told to send the
/// recording again under a new recording id), so it must not keep its object
/// key: the re-sent recording has the same file name and would be refused
/// with ALREADY_EXISTS forever. Clears the key with a history line, in the
/// caller's transaction. Not while an attempt runs (UPLOADING, VERIFYING):
/// that attempt may still write under the key, so the key is released by
/// the transition that ends it (RETRYING, RETAINED), or kept if it DELIVERED.
fn release_key_of_corrupt(tx: &Transaction<'_>, job_id: JobId, now: i64) -> Result<()> {
    let job = get_tx(tx, job_id)?;
    if !job.backup_corrupt
        || matches!(
            job.state,
            JobState::Uploading | JobState::Verifying | JobState::Delivered
        )
    {
        return Ok(());
    }
    let Some(key) = job.object_key else {
        return Ok(());
    };
    tx.execute(
        "UPDATE jobs SET object_key = NULL, updated_at = :now WHERE job_id = :id",
        named_params! { ":now": now, ":id": job_id.to_string() },
    )?;
    let message = format!(
        "object key {key:?} at destination {} released: the backup is corrupt and will not be \
         delivered, so a recording sent again under that file name may take the key",
        job.destination_id
    );
    add_event(tx, job_id, now, job.state, &message)
}

fn add_event(
    conn: &Connection,
    job_id: JobId,
    now: i64,
    state: JobState,
    message: &str,
) -> Result<()> {
    conn.execute(
        "INSERT INTO job_events (job_id, time, state, message) VALUES (:id, :t, :s, :m)",
        named_params! { ":id": job_id.to_string(), ":t": now, ":s": state.as_str(), ":m": message },
    )?;
    Ok(())
}

const COLUMNS: &str = "job_id, tenant_id, recording_id, destination_id, file_name, content_type,
    backup_path, sha256, size, state, attempts, last_error, location, verified_by,
    next_attempt_at, created_at, updated_at, backup_corrupt, backup_deleted,
    multipart_upload_id, request_id, object_key, stored_sha256, retrying_since, doubtful_failures";

fn get_tx(conn: &Connection, job_id: JobId) -> Result<Job> {
    select_one(
        conn,
        "job_id = :id",
        named_params! { ":id": job_id.to_string() },
    )?
    .ok_or(JobStoreError::NotFound(job_id))
}

fn select_one(
    conn: &Connection,
    condition: &str,
    params: &[(&str, &dyn ToSql)],
) -> Result<Option<Job>> {
    let sql = format!("SELECT {COLUMNS} FROM jobs WHERE {condition}");
    let mut stmt = conn.prepare_cached(&sql)?;
    let mut rows = stmt.query(params)?;
    rows.next()?.map(job_from_row).transpose()
}

fn select_many(
    conn: &Connection,
    condition: &str,
    params: &[(&str, &dyn ToSql)],
) -> Result<Vec<Job>> {
    let sql = format!("SELECT {COLUMNS} FROM jobs WHERE {condition}");
    let mut stmt = conn.prepare_cached(&sql)?;
    let mut rows = stmt.query(params)?;
    let mut jobs = Vec::new();
    while let Some(row) = rows.next()? {
        jobs.push(job_from_row(row)?);
    }
    Ok(jobs)
}

fn job_from_row(row: &Row<'_>) -> Result<Job> {
    fn field<T>(name: &str, r: Result<T, InvalidValue>) -> Result<T> {
        r.map_err(|e| JobStoreError::Corrupt(format!("{name} {e}")))
    }
    let job_id: String = row.get("job_id")?;
    let sha: Vec<u8> = row.get("sha256")?;
    let state: String = row.get("state")?;
    let verified_by: Option<String> = row.get("verified_by")?;
    let size: i64 = row.get("size")?;
    let attempts: i64 = row.get("attempts")?;
    let backup_path: String = row.get("backup_path")?;
    Ok(Job {
        job_id: parse_job_id(&job_id)?,
        tenant_id: field(
            "tenant_id",
            TenantId::parse(row.get::<_, String>("tenant_id")?),
        )?,
        recording_id: field(
            "recording_id",
            RecordingId::parse(row.get::<_, String>("recording_id")?),
        )?,
        destination_id: field(
            "destination_id",
            DestinationId::parse(row.get::<_, String>("destination_id")?),
        )?,
        file_name: field(
            "file_name",
            FileName::parse(row.get::<_, String>("file_name")?),
        )?,
        content_type: field(
            "content_type",
            ContentType::parse(row.get::<_, String>("content_type")?),
        )?,
        backup_path: PathBuf::from(backup_path),
        sha256: Sha256Digest::from_slice(&sha).ok_or_else(|| {
            JobStoreError::Corrupt(format!("job {job_id}: sha256 is not 32 bytes"))
        })?,
        size: u64::try_from(size)
            .map_err(|_| JobStoreError::Corrupt(format!("job {job_id}: size {size}")))?,
        stored_sha256: row
            .get::<_, Option<Vec<u8>>>("stored_sha256")?
            .map(|b| {
                Sha256Digest::from_slice(&b).ok_or_else(|| {
                    JobStoreError::Corrupt(format!("job {job_id}: stored_sha256 is not 32 bytes"))
                })
            })
            .transpose()?,
        state: JobState::from_db(&state)
            .ok_or_else(|| JobStoreError::Corrupt(format!("job {job_id}: state {state:?}")))?,
        attempts: u32::try_from(attempts)
            .map_err(|_| JobStoreError::Corrupt(format!("job {job_id}: attempts {attempts}")))?,
        last_error: row.get("last_error")?,
        location: row.get("location")?,
        verified_by: verified_by
            .map(|v| {
                VerifiedBy::from_db(&v).ok_or_else(|| {
                    JobStoreError::Corrupt(format!("job {job_id}: verified_by {v:?}"))
                })
            })
            .transpose()?,
        next_attempt_at: row
            .get::<_, Option<i64>>("next_attempt_at")?
            .map(from_ms)
            .transpose()?,
        retrying_since: row
            .get::<_, Option<i64>>("retrying_since")?
            .map(from_ms)
            .transpose()?,
        doubtful_failures: {
            let n: i64 = row.get("doubtful_failures")?;
            u32::try_from(n).map_err(|_| {
                JobStoreError::Corrupt(format!("job {job_id}: doubtful_failures {n}"))
            })?
        },
        created_at: from_ms(row.get("created_at")?)?,
        updated_at: from_ms(row.get("updated_at")?)?,
        backup_corrupt: row.get("backup_corrupt")?,
        backup_deleted: row.get("backup_deleted")?,
        multipart_upload_id: row.get("multipart_upload_id")?,
        request_id: row.get("request_id")?,
        object_key: row.get("object_key")?,
        bytes_sent: 0,
    })
}

fn parse_job_id(s: &str) -> Result<JobId> {
    JobId::parse(s).map_err(|e| JobStoreError::Corrupt(format!("job_id {e}")))
}

fn path_text(path: &Path) -> Result<&str> {
    path.to_str().ok_or_else(|| {
        JobStoreError::Corrupt(format!("backup path {} is not UTF-8", path.display()))
    })
}

/// Timestamps are stored as Unix milliseconds: sortable, compact, and enough
/// resolution for scheduling.
fn to_ms(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

fn from_ms(ms: i64) -> Result<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .map_err(|e| JobStoreError::Corrupt(format!("timestamp {ms}: {e}")))
}

fn now_ms() -> i64 {
    to_ms(OffsetDateTime::now_utc())
}

/// `t` as RFC 3339 (history lines, give-up reasons).
pub fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The name check is an index probe, not a scan of every job.
    #[test]
    fn key_lookup_uses_the_object_key_index() {
        let dir = tempfile::tempdir().unwrap();
        let store = JobStore::open(dir.path().join("jobs.db")).unwrap();
        let conn = store.inner.conn.lock().unwrap();
        let sql = format!("EXPLAIN QUERY PLAN SELECT {COLUMNS} FROM jobs WHERE {KEY_CONDITION}");
        let mut stmt = conn.prepare(&sql).unwrap();
        let plan: Vec<String> = stmt
            .query_map(
                named_params! { ":d": "d", ":k": "k", ":except": None::<String> },
                |r| r.get(3),
            )
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert!(
            plan.iter()
                .any(|p| p.contains("USING INDEX jobs_by_object_key")),
            "{plan:?}"
        );
    }
}
