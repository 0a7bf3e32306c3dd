//! The uploader's stores, one trait per concern, one module per backend:
//!
//! | trait | what it keeps |
//! |---|---|
//! | [`JobBackend`] | jobs, their history, object keys and claims |
//! | [`DestinationBackend`] | destinations (a credential *id*, never a credential) |
//!
//! [`sqlite`] is the embedded default (one file, one host, one uploader);
//! [`postgres`] is shared by several uploader replicas. Both pass the same
//! conformance suite (`tests/tests/uploader_store_conformance.rs` in the
//! workspace). The backends only move rows: every rule (legal transitions,
//! object-key clashes, claims) is written once, in [`crate::jobs`], over the
//! primitives of [`JobTx`], and runs inside the backend's transaction.
//!
//! Rows cross the trait as [`JobRow`] / [`EventRow`] (plain column values);
//! `crate::jobs` parses them into its types, so a corrupt row is reported the
//! same way whatever the backend. Schemas are migrations kept as files under
//! `uploader/migrations/<backend>/`, applied in order at open.

pub mod postgres;
pub mod sqlite;

use std::{fmt, path::PathBuf, sync::Arc};

use crate::destination::{DestinationConfig, Provider};
use crate::jobs::JobStoreError;

type Result<T, E = JobStoreError> = std::result::Result<T, E>;

/// Where the uploader keeps its jobs and destinations.
#[derive(Debug, Clone)]
pub enum Storage {
    /// One SQLite file (the embedded default; one uploader process).
    Sqlite(PathBuf),
    /// A PostgreSQL database shared by every replica, reached with the URL
    /// in this owner-only file (`database_url_file`).
    Postgres(PathBuf),
}

impl Storage {
    /// For messages: the file, or host, port and database (never a password).
    pub fn display(&self) -> String {
        match self {
            Storage::Sqlite(path) => path.display().to_string(),
            Storage::Postgres(url_file) => {
                format!("the PostgreSQL database of {}", url_file.display())
            }
        }
    }
}

/// The backends opened on one [`Storage`].
#[derive(Debug, Clone)]
pub struct Backends {
    /// Jobs and history.
    pub jobs: Arc<dyn JobBackend>,
    /// Destinations.
    pub destinations: Arc<dyn DestinationBackend>,
}

/// Opens (creating and migrating as needed) both stores on `storage`.
/// `instance` names this replica in change notifications. Blocking.
pub fn open(storage: &Storage, instance: &str) -> Result<Backends> {
    match storage {
        Storage::Sqlite(path) => {
            let jobs = Arc::new(sqlite::SqliteJobs::open(path)?);
            let destinations = Arc::new(sqlite::SqliteDestinations::open(path)?);
            Ok(Backends { jobs, destinations })
        }
        Storage::Postgres(url_file) => {
            let db = Arc::new(postgres::PgStore::open(url_file, instance)?);
            let destinations: Arc<dyn DestinationBackend> = db.clone();
            Ok(Backends {
                jobs: db,
                destinations,
            })
        }
    }
}

/// The columns of one job, as stored. Times are Unix milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct JobRow {
    pub job_id: String,
    pub tenant_id: String,
    pub recording_id: String,
    pub destination_id: String,
    pub file_name: String,
    pub content_type: String,
    pub backup_path: String,
    pub sha256: Vec<u8>,
    pub size: i64,
    pub state: String,
    pub attempts: i64,
    pub last_error: Option<String>,
    pub location: Option<String>,
    pub verified_by: Option<String>,
    pub next_attempt_at: Option<i64>,
    pub created_at: i64,
    pub updated_at: i64,
    pub backup_corrupt: bool,
    pub backup_deleted: bool,
    pub multipart_upload_id: Option<String>,
    /// The key (and its real location) the open multipart upload writes.
    pub multipart_upload_key: Option<String>,
    pub multipart_upload_location: Option<String>,
    pub request_id: Option<String>,
    pub object_key: Option<String>,
    /// The normalized real location (provider, endpoint, bucket) `object_key` is unique in.
    pub object_location: Option<String>,
    pub stored_sha256: Option<Vec<u8>>,
    pub retrying_since: Option<i64>,
    pub doubtful_failures: i64,
    /// The replica running the job's attempt, and until when its claim holds.
    pub claim_owner: Option<String>,
    pub claim_expires_at: Option<i64>,
}

/// The job columns every backend selects, in [`JobRow`] order.
pub const JOB_COLUMNS: &str = "job_id, tenant_id, recording_id, destination_id, file_name,
    content_type, backup_path, sha256, size, state, attempts, last_error, location, verified_by,
    next_attempt_at, created_at, updated_at, backup_corrupt, backup_deleted, multipart_upload_id,
    multipart_upload_key, multipart_upload_location, request_id, object_key, object_location,
    stored_sha256, retrying_since, doubtful_failures, claim_owner, claim_expires_at";

/// `INSERT INTO jobs` of every column of [`JOB_COLUMNS`], bound by position
/// with `sigil` placeholders (`?N` for SQLite, `$N` for PostgreSQL). Each
/// backend builds it once.
pub(crate) fn insert_job_sql(sigil: char) -> String {
    let n = JOB_COLUMNS.split(',').count();
    let placeholders: Vec<String> = (1..=n).map(|i| format!("{sigil}{i}")).collect();
    format!(
        "INSERT INTO jobs ({JOB_COLUMNS}) VALUES ({})",
        placeholders.join(", ")
    )
}

/// `UPDATE jobs SET` every column but the id (the first, `{sigil}1` in the
/// WHERE clause), bound as [`insert_job_sql`] binds them.
pub(crate) fn update_job_sql(sigil: char) -> String {
    let sets: Vec<String> = JOB_COLUMNS
        .split(',')
        .map(str::trim)
        .enumerate()
        .skip(1)
        .map(|(i, c)| format!("{c} = {sigil}{}", i + 1))
        .collect();
    format!(
        "UPDATE jobs SET {} WHERE job_id = {sigil}1",
        sets.join(", ")
    )
}

/// One history line, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRow {
    /// The job.
    pub job_id: String,
    /// Unix milliseconds.
    pub time: i64,
    /// The state after the event.
    pub state: String,
    /// What happened.
    pub message: String,
    /// The replica that did it.
    pub replica: String,
}

/// Which jobs a read returns (the rules pick; the backend runs the query).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobQuery {
    /// A tenant's (or everyone's) jobs, optionally in one state, newest first.
    List {
        /// Only this tenant's.
        tenant_id: Option<String>,
        /// Only in this state.
        state: Option<String>,
        /// At most this many.
        limit: u32,
    },
    /// DELIVERED jobs whose backup is not yet recorded as deleted.
    PendingBackupDeletes,
    /// Jobs whose backup the scrub re-hashes: not delivered, present, not corrupt.
    ScrubCandidates,
}

/// The primitives the job rules run on, inside one transaction of the
/// backend. A row read with [`JobTx::job`] is locked against other writers
/// until the transaction ends (PostgreSQL: `FOR UPDATE`; SQLite: the whole
/// database, `BEGIN IMMEDIATE`).
pub trait JobTx {
    /// One job, locked.
    fn job(&mut self, job_id: &str) -> Result<Option<JobRow>>;
    /// The job of `(tenant, recording)`, locked.
    fn job_by_recording(&mut self, tenant_id: &str, recording_id: &str) -> Result<Option<JobRow>>;
    /// A job other than `except` whose `object_key` at `object_location` is `key`.
    fn key_holder(
        &mut self,
        object_location: &str,
        key: &str,
        except: Option<&str>,
    ) -> Result<Option<JobRow>>;
    /// Inserts a new job.
    fn insert(&mut self, row: &JobRow) -> Result<()>;
    /// Writes every column of `row` to the job with its id.
    fn update(&mut self, row: &JobRow) -> Result<()>;
    /// Appends a history line.
    fn add_event(&mut self, event: &EventRow) -> Result<()>;
    /// Up to `limit` ids of jobs due at `now` (STORED, or RETRYING with
    /// `next_attempt_at <= now`, backup not corrupt), oldest due first,
    /// locked; rows another transaction holds are skipped, not waited for.
    fn due(&mut self, now: i64, limit: u32) -> Result<Vec<String>>;
    /// Up to `limit` ids of UPLOADING or VERIFYING jobs whose claim expired
    /// before `now`, locked, skipping rows another transaction holds.
    fn expired_claims(&mut self, now: i64, limit: u32) -> Result<Vec<String>>;
    /// Ids of UPLOADING or VERIFYING jobs claimed by `owner` (or by nobody:
    /// rows written before claims existed).
    fn claimed_by(&mut self, owner: &str) -> Result<Vec<String>>;
}

/// A closure run inside one transaction; it may run again if the backend
/// retries the transaction after a conflict, so it must not keep effects
/// outside the transaction except its result.
pub type TxFn<'a> = dyn FnMut(&mut dyn JobTx) -> Result<()> + 'a;

/// A job change another replica made: its id and, for progress
/// notifications, the bytes sent so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteChange {
    /// The job.
    pub job_id: String,
    /// `Some` for a progress update (not persisted).
    pub bytes_sent: Option<u64>,
}

/// Jobs and history. Calls block: run them on a blocking thread.
pub trait JobBackend: Send + Sync + fmt::Debug {
    /// True when other replicas share this store (changes they make arrive
    /// through [`JobBackend::follow`]).
    fn shared(&self) -> bool {
        false
    }
    /// Runs `f` in one write transaction and commits it if `f` succeeds.
    /// Retried (at most a few times) when the database reports a conflict
    /// with a concurrent writer; the error of the last try is returned.
    fn write(&self, f: &mut TxFn<'_>) -> Result<()>;
    /// Runs `f` in a read-only transaction (nothing is locked for long).
    fn read(&self, f: &mut TxFn<'_>) -> Result<()>;
    /// Jobs matching `query`.
    fn select(&self, query: &JobQuery) -> Result<Vec<JobRow>>;
    /// (state, count) for every state that has jobs.
    fn count_by_state(&self) -> Result<Vec<(String, i64)>>;
    /// The job's history, oldest first.
    fn history(&self, job_id: &str) -> Result<Vec<EventRow>>;
    /// Tells the other replicas how far a running attempt got (not stored).
    fn publish_progress(&self, _job_id: &str, _bytes_sent: u64) -> Result<()> {
        Ok(())
    }
    /// Calls `on_change` with every change other replicas commit (and their
    /// progress), from a thread of the backend's, until `stop` is set.
    /// A backend nobody shares has nothing to follow.
    fn follow(
        &self,
        _on_change: Box<dyn Fn(Vec<RemoteChange>) + Send>,
        _stop: Arc<std::sync::atomic::AtomicBool>,
    ) -> std::io::Result<()> {
        Ok(())
    }
}

/// One destination, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DestinationRecord {
    /// `dst_…`.
    pub destination_id: String,
    /// Owner.
    pub tenant_id: String,
    /// Unique per tenant.
    pub name: String,
    /// Where it points.
    pub config: DestinationConfig,
    /// The vault credential id used to write there.
    pub credential_id: String,
}

impl DestinationRecord {
    /// The key `file_name` gets here (`prefix/file_name`) and where it is
    /// unique; `None` when the name or prefix cannot be used as a key.
    pub fn object_key(&self, file_name: &str) -> Option<crate::jobs::ObjectKey> {
        let key = crate::destination::object_key(&self.config.prefix, file_name).ok()?;
        Some(crate::jobs::ObjectKey {
            location: self.config.real_location(),
            key,
        })
    }

    /// The wire form.
    pub fn to_proto(&self) -> recvault_proto::uploader::v1::Destination {
        recvault_proto::uploader::v1::Destination {
            destination_id: self.destination_id.clone(),
            tenant_id: self.tenant_id.clone(),
            name: self.name.clone(),
            provider: self.config.provider.as_str().to_owned(),
            endpoint: self.config.endpoint.clone(),
            region: self.config.region.clone(),
            bucket: self.config.bucket.clone(),
            prefix: self.config.prefix.clone(),
            path_style: self.config.path_style,
            credential_id: self.credential_id.clone(),
        }
    }
}

/// The destination columns, as stored (provider as text).
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct DestinationRow {
    pub destination_id: String,
    pub tenant_id: String,
    pub name: String,
    pub provider: String,
    pub endpoint: String,
    pub region: String,
    pub bucket: String,
    pub prefix: String,
    pub path_style: bool,
    pub credential_id: String,
}

impl DestinationRow {
    /// Parses the row; an unknown provider is corruption, never a default.
    pub fn into_record(self) -> Result<DestinationRecord> {
        let provider: Provider = self.provider.parse().map_err(|e| {
            JobStoreError::Corrupt(format!("destination {}: {e}", self.destination_id))
        })?;
        Ok(DestinationRecord {
            destination_id: self.destination_id,
            tenant_id: self.tenant_id,
            name: self.name,
            config: DestinationConfig {
                provider,
                endpoint: self.endpoint,
                region: self.region,
                bucket: self.bucket,
                prefix: self.prefix,
                path_style: self.path_style,
            },
            credential_id: self.credential_id,
        })
    }

    fn new(
        id: String,
        tenant: &str,
        name: &str,
        config: &DestinationConfig,
        credential: &str,
    ) -> Self {
        Self {
            destination_id: id,
            tenant_id: tenant.to_owned(),
            name: name.to_owned(),
            provider: config.provider.as_str().to_owned(),
            endpoint: config.endpoint.clone(),
            region: config.region.clone(),
            bucket: config.bucket.clone(),
            prefix: config.prefix.clone(),
            path_style: config.path_style,
            credential_id: credential.to_owned(),
        }
    }
}

/// A fresh destination id.
fn new_destination_id() -> String {
    format!("dst_{}", uuid::Uuid::new_v4().simple())
}

/// Destinations. Calls block: run them on a blocking thread.
pub trait DestinationBackend: Send + Sync + fmt::Debug {
    /// Creates, or replaces (same tenant and name), a destination; returns its id.
    fn put(
        &self,
        tenant: &str,
        name: &str,
        config: &DestinationConfig,
        credential_id: &str,
    ) -> Result<String>;
    /// One destination.
    fn get(&self, id: &str) -> Result<Option<DestinationRecord>>;
    /// A tenant's destinations, by name.
    fn list(&self, tenant: &str) -> Result<Vec<DestinationRecord>>;
    /// Deletes one; false if it did not exist.
    fn delete(&self, id: &str) -> Result<bool>;
}
