//! What the job store keeps and answers, whatever the backend: jobs, their
//! history, the object-key clashes it refuses, and its errors. Rows from a
//! backend ([`JobRow`], [`EventRow`]) are parsed here, so a corrupt row reads
//! the same from SQLite and PostgreSQL.

use std::path::PathBuf;

use recvault_proto::uploader::v1 as pb;
use time::OffsetDateTime;

use super::ids::{
    ContentType, DestinationId, FileName, InvalidValue, JobId, RecordingId, TenantId,
};
use super::state::{IllegalTransition, JobState, VerifiedBy};
use crate::digest::Sha256Digest;
use crate::store::{EventRow, JobRow};

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
    /// This replica no longer holds the job's claim: its claim expired and
    /// another replica took the job over (or it was never claimed here). The
    /// attempt must stop without changing anything.
    #[error(
        "job {job_id}: this replica ({replica}) no longer holds the job's claim ({holder}); the \
         attempt stops and leaves the job to the holder"
    )]
    ClaimLost {
        /// The job.
        job_id: JobId,
        /// This replica.
        replica: String,
        /// Who holds it now, for people.
        holder: String,
    },
    /// A concurrent writer won a race (unique key, deadlock); retried by
    /// the backend, and only returned when every try lost.
    #[error("job store conflict: {0}")]
    Conflict(String),
    /// A stored row does not hold what this version writes (edited by hand, newer schema).
    #[error("job database holds an invalid value: {0}")]
    Corrupt(String),
    /// The database cannot be reached or failed (down, disk full, I/O,
    /// locked beyond the timeout), or the blocking task running it failed.
    #[error("job store is unavailable: {0}")]
    Unavailable(String),
}

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
    /// Its destination: the same, or another one pointing at the same bucket.
    pub other_destination_id: DestinationId,
}

impl std::fmt::Display for KeyConflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let via = if self.other_destination_id == self.destination_id {
            String::new()
        } else {
            format!(
                ", delivered through destination {}, which points at the same bucket",
                self.other_destination_id
            )
        };
        let other = format!(
            "recording {} (job {}, file_name {:?}, {}{via})",
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

/// A recording's key and where it is unique (see [`Job::object_location`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectKey {
    /// The destination's real location ([`crate::destination::DestinationConfig::real_location`]).
    pub location: String,
    /// `prefix/file_name`.
    pub key: String,
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
    /// The durable backup: its location in the backup store.
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
    /// at its real location (`object_location`). `None` until registered (by
    /// ingest, a resend or the next attempt, each of which refuses a key
    /// another job holds there).
    pub object_key: Option<String>,
    /// Where `object_key` is unique: the destination's normalized provider
    /// endpoint and bucket ([`crate::destination::DestinationConfig::real_location`]),
    /// so two destinations at one bucket share one namespace.
    pub object_location: Option<String>,
    /// The key and location the open multipart upload writes (kept beside
    /// its id, so a changed prefix cannot orphan it).
    pub multipart_upload_key: Option<String>,
    /// See [`Job::multipart_upload_key`].
    pub multipart_upload_location: Option<String>,
    /// The replica running the job's attempt (UPLOADING, VERIFYING).
    pub claim_owner: Option<String>,
    /// Until when that claim holds unless renewed; after it another replica
    /// takes the job over.
    pub claim_expires_at: Option<OffsetDateTime>,
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
            claimed_by: self.claim_owner.clone().unwrap_or_default(),
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
    /// The replica that did it (its `instance_id`).
    pub replica: String,
}

/// What [`JobStore::resend_to`] does besides moving the job back to STORED.
#[derive(Debug, Clone, Default)]
pub struct Resend {
    /// Another destination; `None` keeps the current one.
    pub destination: Option<DestinationId>,
    /// The recording's key at the destination it is resent to, checked
    /// against every other job at that location. `None`: kept when the
    /// destination stays, otherwise registered at the next attempt.
    pub object_key: Option<ObjectKey>,
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

type Result<T, E = JobStoreError> = std::result::Result<T, E>;

fn corrupt(job_id: &str, what: impl std::fmt::Display) -> JobStoreError {
    JobStoreError::Corrupt(format!("job {job_id}: {what}"))
}

fn id_field<T>(job_id: &str, name: &str, r: Result<T, InvalidValue>) -> Result<T> {
    r.map_err(|e| corrupt(job_id, format_args!("{name} {e}")))
}

fn digest(job_id: &str, name: &str, bytes: &[u8]) -> Result<Sha256Digest> {
    Sha256Digest::from_slice(bytes)
        .ok_or_else(|| corrupt(job_id, format_args!("{name} is not 32 bytes")))
}

fn count<T: TryFrom<i64>>(job_id: &str, name: &str, n: i64) -> Result<T> {
    T::try_from(n).map_err(|_| corrupt(job_id, format_args!("{name} {n}")))
}

/// Timestamps are stored as Unix milliseconds: sortable, compact, and enough
/// resolution for scheduling.
pub(crate) fn to_ms(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

pub(crate) fn from_ms(ms: i64) -> Result<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .map_err(|e| JobStoreError::Corrupt(format!("timestamp {ms}: {e}")))
}

pub(crate) fn parse_job_id(s: &str) -> Result<JobId> {
    JobId::parse(s).map_err(|e| JobStoreError::Corrupt(format!("job_id {e}")))
}

impl Job {
    /// Parses a stored row.
    pub(crate) fn from_row(r: JobRow) -> Result<Self> {
        let id = r.job_id.as_str();
        Ok(Job {
            job_id: parse_job_id(id)?,
            tenant_id: id_field(id, "tenant_id", TenantId::parse(r.tenant_id))?,
            recording_id: id_field(id, "recording_id", RecordingId::parse(r.recording_id))?,
            destination_id: id_field(id, "destination_id", DestinationId::parse(r.destination_id))?,
            file_name: id_field(id, "file_name", FileName::parse(r.file_name))?,
            content_type: id_field(id, "content_type", ContentType::parse(r.content_type))?,
            backup_path: PathBuf::from(r.backup_path),
            sha256: digest(id, "sha256", &r.sha256)?,
            size: count(id, "size", r.size)?,
            stored_sha256: r
                .stored_sha256
                .map(|b| digest(id, "stored_sha256", &b))
                .transpose()?,
            state: JobState::from_db(&r.state)
                .ok_or_else(|| corrupt(id, format_args!("state {:?}", r.state)))?,
            attempts: count(id, "attempts", r.attempts)?,
            last_error: r.last_error,
            location: r.location,
            verified_by: r
                .verified_by
                .map(|v| {
                    VerifiedBy::from_db(&v)
                        .ok_or_else(|| corrupt(id, format_args!("verified_by {v:?}")))
                })
                .transpose()?,
            retrying_since: r.retrying_since.map(from_ms).transpose()?,
            doubtful_failures: count(id, "doubtful_failures", r.doubtful_failures)?,
            next_attempt_at: r.next_attempt_at.map(from_ms).transpose()?,
            created_at: from_ms(r.created_at)?,
            updated_at: from_ms(r.updated_at)?,
            backup_corrupt: r.backup_corrupt,
            backup_deleted: r.backup_deleted,
            multipart_upload_id: r.multipart_upload_id,
            request_id: r.request_id,
            object_key: r.object_key,
            object_location: r.object_location,
            multipart_upload_key: r.multipart_upload_key,
            multipart_upload_location: r.multipart_upload_location,
            claim_owner: r.claim_owner,
            claim_expires_at: r.claim_expires_at.map(from_ms).transpose()?,
            bytes_sent: 0,
        })
    }

    /// The row that stores this job.
    pub(crate) fn to_row(&self) -> Result<JobRow> {
        Ok(JobRow {
            job_id: self.job_id.to_string(),
            tenant_id: self.tenant_id.to_string(),
            recording_id: self.recording_id.to_string(),
            destination_id: self.destination_id.to_string(),
            file_name: self.file_name.to_string(),
            content_type: self.content_type.as_str().to_owned(),
            backup_path: self
                .backup_path
                .to_str()
                .ok_or_else(|| corrupt(&self.job_id.to_string(), "backup path is not UTF-8"))?
                .to_owned(),
            sha256: self.sha256.as_bytes().to_vec(),
            size: i64::try_from(self.size).map_err(|_| {
                corrupt(&self.job_id.to_string(), format_args!("size {}", self.size))
            })?,
            state: self.state.as_str().to_owned(),
            attempts: i64::from(self.attempts),
            last_error: self.last_error.clone(),
            location: self.location.clone(),
            verified_by: self.verified_by.map(|v| v.as_str().to_owned()),
            next_attempt_at: self.next_attempt_at.map(to_ms),
            created_at: to_ms(self.created_at),
            updated_at: to_ms(self.updated_at),
            backup_corrupt: self.backup_corrupt,
            backup_deleted: self.backup_deleted,
            multipart_upload_id: self.multipart_upload_id.clone(),
            multipart_upload_key: self.multipart_upload_key.clone(),
            multipart_upload_location: self.multipart_upload_location.clone(),
            request_id: self.request_id.clone(),
            object_key: self.object_key.clone(),
            object_location: self.object_location.clone(),
            stored_sha256: self.stored_sha256.map(|d| d.as_bytes().to_vec()),
            retrying_since: self.retrying_since.map(to_ms),
            doubtful_failures: i64::from(self.doubtful_failures),
            claim_owner: self.claim_owner.clone(),
            claim_expires_at: self.claim_expires_at.map(to_ms),
        })
    }
}

impl JobEvent {
    /// Parses a stored history line.
    pub(crate) fn from_row(e: EventRow) -> Result<Self> {
        Ok(JobEvent {
            time: from_ms(e.time)?,
            state: JobState::from_db(&e.state)
                .ok_or_else(|| corrupt(&e.job_id, format_args!("event state {:?}", e.state)))?,
            message: e.message,
            replica: e.replica,
        })
    }
}

/// `t` as RFC 3339 (history lines, give-up reasons).
pub fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}
