//! The job store: every rule about jobs, written once over a backend's
//! transaction ([`crate::store::JobTx`]): which transitions are legal
//! ([`check_transition`], inside the transaction that changes the state),
//! which object keys clash, and who may run a job.
//!
//! **Work is claimed, not owned.** A replica claims a due job with an owner
//! (its `instance_id`) and an expiry, and renews the claim while the attempt
//! runs ([`JobStore::renew_claim`]). Every change an attempt makes checks that
//! this replica still holds the claim ([`JobStoreError::ClaimLost`]
//! otherwise), so two replicas never both finish one attempt. A replica that
//! dies stops renewing; once its claims expire, any replica's next
//! [`JobStore::claim_due`] takes those jobs over (RETRYING, due now, their
//! multipart upload id kept, so the next attempt resumes or aborts it). At
//! start-up a replica recovers only the claims it holds itself.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use time::OffsetDateTime;
use tokio::sync::broadcast;

use super::ids::{DestinationId, FileName, JobId, RecordingId, TenantId};
use super::model::{from_ms, parse_job_id, to_ms};
use super::state::{JobState, VerifiedBy, check_transition};
use super::{
    Clash, Job, JobEvent, JobFilter, JobStoreError, KeyConflict, NewJob, ObjectKey, Resend, rfc3339,
};
use crate::store::{EventRow, JobBackend, JobQuery, JobTx, RemoteChange};

type Result<T, E = JobStoreError> = std::result::Result<T, E>;

/// Most jobs one `list` call returns, whatever the caller asks for.
const MAX_LIST: u32 = 1000;
/// What `list` returns when the caller asks for 0.
const DEFAULT_LIST: u32 = 100;
/// Job changes buffered per subscriber before it sees `Lagged`.
const CHANGES_CAPACITY: usize = 1024;
/// Progress of one job is announced to other replicas at most this often.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);

/// Who this store acts as.
#[derive(Debug, Clone)]
pub struct Replica {
    /// This replica's name in claims and history (`instance_id`, by default the host name).
    pub instance: String,
    /// How long a claim holds unless renewed.
    pub claim_ttl: Duration,
}

impl Default for Replica {
    fn default() -> Self {
        Self {
            instance: "uploader".to_owned(),
            claim_ttl: Duration::from_secs(30),
        }
    }
}

/// Persisted jobs. Cheap to clone; all clones share one backend and one
/// change feed (which also carries what other replicas change, when the
/// backend is shared).
#[derive(Debug, Clone)]
pub struct JobStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    backend: Arc<dyn JobBackend>,
    replica: Replica,
    changes: broadcast::Sender<Job>,
    /// When each running job's progress was last announced to other replicas.
    progress_sent: Mutex<HashMap<JobId, Instant>>,
    stop: Arc<AtomicBool>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The rules' view of one transaction.
struct Rules<'a> {
    tx: &'a mut dyn JobTx,
    replica: &'a Replica,
    now: i64,
}

impl Rules<'_> {
    fn get(&mut self, job_id: JobId) -> Result<Job> {
        match self.tx.job(&job_id.to_string())? {
            Some(row) => Job::from_row(row),
            None => Err(JobStoreError::NotFound(job_id)),
        }
    }

    fn by_recording(&mut self, tenant: &TenantId, recording: &RecordingId) -> Result<Option<Job>> {
        self.tx
            .job_by_recording(tenant.as_str(), recording.as_str())?
            .map(Job::from_row)
            .transpose()
    }

    fn now(&self) -> OffsetDateTime {
        from_ms(self.now).unwrap_or_else(|_| OffsetDateTime::now_utc())
    }

    fn event(&mut self, job: &Job, message: &str) -> Result<()> {
        self.tx.add_event(&EventRow {
            job_id: job.job_id.to_string(),
            time: self.now,
            state: job.state.as_str().to_owned(),
            message: message.to_owned(),
            replica: self.replica.instance.clone(),
        })
    }

    /// Writes `job` (stamped now) with a history line.
    fn save(&mut self, job: &mut Job, message: &str) -> Result<()> {
        job.updated_at = self.now();
        self.tx.update(&job.to_row()?)?;
        self.event(job, message)
    }

    /// `Err(ClaimLost)` unless this replica holds the job's claim.
    fn check_claim(&self, job: &Job) -> Result<()> {
        let holds = matches!(job.state, JobState::Uploading | JobState::Verifying)
            && job.claim_owner.as_deref() == Some(self.replica.instance.as_str());
        if holds {
            return Ok(());
        }
        let holder = match (&job.claim_owner, job.state) {
            (Some(owner), JobState::Uploading | JobState::Verifying) => {
                format!("replica {owner} runs it now")
            }
            _ => format!("it is {} and claimed by nobody", job.state),
        };
        Err(JobStoreError::ClaimLost {
            job_id: job.job_id,
            replica: self.replica.instance.clone(),
            holder,
        })
    }

    /// Checks and applies `→ to` after `change` set the other fields, and
    /// writes the history line. Leaving an attempt (UPLOADING, VERIFYING)
    /// needs this replica's claim and drops it.
    fn transition(
        &mut self,
        job_id: JobId,
        to: JobState,
        message: &str,
        change: impl FnOnce(&mut Job),
    ) -> Result<Job> {
        let mut job = self.get(job_id)?;
        check_transition(job.state, to)
            .map_err(|source| JobStoreError::IllegalTransition { job_id, source })?;
        if matches!(job.state, JobState::Uploading | JobState::Verifying) {
            self.check_claim(&job)?;
        }
        self.apply(&mut job, to, message, change)?;
        Ok(job)
    }

    /// The transition itself, claim already checked (or, for a takeover,
    /// deliberately not).
    fn apply(
        &mut self,
        job: &mut Job,
        to: JobState,
        message: &str,
        change: impl FnOnce(&mut Job),
    ) -> Result<()> {
        job.state = to;
        if !matches!(to, JobState::Uploading | JobState::Verifying) {
            job.claim_owner = None;
            job.claim_expires_at = None;
        }
        change(job);
        self.save(job, message)?;
        self.release_key_of_corrupt(job)
    }

    /// A job whose backup is corrupt and that was never DELIVERED will not be
    /// sent again, so it gives up its object key: the recording sent again
    /// under the same file name would otherwise be refused forever. Not while
    /// an attempt runs (it may still write under the key): the transition
    /// that ends the attempt releases it.
    fn release_key_of_corrupt(&mut self, job: &mut Job) -> Result<()> {
        if !job.backup_corrupt
            || matches!(
                job.state,
                JobState::Uploading | JobState::Verifying | JobState::Delivered
            )
        {
            return Ok(());
        }
        let Some(key) = job.object_key.take() else {
            return Ok(());
        };
        job.object_location = None;
        let message = format!(
            "object key {key:?} at destination {} released: the backup is corrupt and will not be \
             delivered, so a recording sent again under that file name may take the key",
            job.destination_id
        );
        self.save(job, &message)
    }

    /// The first job other than `except` whose objects a delivery under
    /// `key` at its location would overwrite, or that would overwrite its
    /// objects: the same key, or one's key being the other's `<key>.sha256`
    /// sidecar. Each probe is one lookup of the unique index on
    /// (object_location, object_key).
    fn key_conflict(
        &mut self,
        destination: &DestinationId,
        key: &ObjectKey,
        except: Option<JobId>,
    ) -> Result<Option<Box<KeyConflict>>> {
        let mut probes = vec![(key.key.clone(), Clash::SameKey)];
        probes.push((
            crate::destination::sidecar_name(&key.key),
            Clash::SidecarOverwritesRecording,
        ));
        if let Some(recording) = key.key.strip_suffix(".sha256") {
            probes.push((recording.to_owned(), Clash::RecordingOverwritesSidecar));
        }
        let except = except.map(|id| id.to_string());
        for (probe, clash) in probes {
            if let Some(other) = self
                .tx
                .key_holder(&key.location, &probe, except.as_deref())?
            {
                let other = Job::from_row(other)?;
                return Ok(Some(Box::new(KeyConflict {
                    destination_id: destination.clone(),
                    key: key.key.clone(),
                    clash,
                    other_job_id: other.job_id,
                    other_recording_id: other.recording_id,
                    other_file_name: other.file_name,
                    other_state: other.state,
                    other_destination_id: other.destination_id,
                })));
            }
        }
        Ok(None)
    }
}

impl JobStore {
    /// Opens (creating if needed) a SQLite job database at `path`, acting as
    /// the default single replica. Blocking; call it at start-up.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let backend = Arc::new(crate::store::sqlite::SqliteJobs::open(path.as_ref())?);
        Self::new(backend, Replica::default())
    }

    /// The store over `backend`, acting as `replica`. On a shared backend it
    /// starts following what other replicas change (their changes and
    /// progress reach [`JobStore::subscribe`] too). Blocking only for that
    /// thread's start.
    pub fn new(backend: Arc<dyn JobBackend>, replica: Replica) -> Result<Self> {
        let (changes, _) = broadcast::channel(CHANGES_CAPACITY);
        let stop = Arc::new(AtomicBool::new(false));
        let store = Self {
            inner: Arc::new(Inner {
                backend,
                replica,
                changes,
                progress_sent: Mutex::new(HashMap::new()),
                stop: Arc::clone(&stop),
            }),
        };
        if store.inner.backend.shared() {
            let backend = Arc::clone(&store.inner.backend);
            let changes = store.inner.changes.clone();
            store
                .inner
                .backend
                .follow(
                    Box::new(move |remote| forward_remote(&*backend, &changes, remote)),
                    stop,
                )
                .map_err(|e| {
                    JobStoreError::Unavailable(format!("cannot follow other replicas: {e}"))
                })?;
        }
        Ok(store)
    }

    /// This replica's name in claims and history.
    pub fn replica(&self) -> &str {
        &self.inner.replica.instance
    }

    /// How long a claim holds unless renewed.
    pub fn claim_ttl(&self) -> Duration {
        self.inner.replica.claim_ttl
    }

    /// Every job change after this call (creation, each transition,
    /// progress), this replica's and, on a shared store, the others'.
    ///
    /// Subscribe *before* reading the job's current state so no change falls
    /// in between. A slow receiver gets `Lagged` and should re-read with [`JobStore::get`].
    pub fn subscribe(&self) -> broadcast::Receiver<Job> {
        self.inner.changes.subscribe()
    }

    /// Tells subscribers (and, at most twice a second per job, the other
    /// replicas) how far the running attempt got, without writing the job:
    /// progress is too frequent to commit.
    pub fn publish_progress(&self, job: &Job, bytes_sent: u64) {
        let mut job = job.clone();
        job.bytes_sent = bytes_sent;
        let _ = self.inner.changes.send(job.clone());
        if !self.inner.backend.shared() {
            return;
        }
        let due = self.inner.progress_sent.lock().is_ok_and(|mut sent| {
            let now = Instant::now();
            sent.retain(|_, at| now.duration_since(*at) < Duration::from_secs(60));
            match sent.get(&job.job_id) {
                Some(at) if now.duration_since(*at) < PROGRESS_EVERY => false,
                _ => {
                    sent.insert(job.job_id, now);
                    true
                }
            }
        });
        if due {
            let backend = Arc::clone(&self.inner.backend);
            tokio::task::spawn_blocking(move || {
                let _ = backend.publish_progress(&job.job_id.to_string(), bytes_sent);
            });
        }
    }

    /// Runs `f` over the rules in one transaction of the backend (a write
    /// transaction, or with `write == false` a read-only one) on the
    /// blocking pool.
    async fn run_rules<T, F>(&self, write: bool, mut f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnMut(&mut Rules<'_>) -> Result<T> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || {
            let mut out = None;
            let mut body = |tx: &mut dyn JobTx| {
                let mut rules = Rules {
                    tx,
                    replica: &inner.replica,
                    now: to_ms(OffsetDateTime::now_utc()),
                };
                out = Some(f(&mut rules)?);
                Ok(())
            };
            if write {
                inner.backend.write(&mut body)?;
            } else {
                inner.backend.read(&mut body)?;
            }
            out.ok_or_else(|| JobStoreError::Unavailable("the transaction did not run".to_owned()))
        })
        .await
        .map_err(|e| JobStoreError::Unavailable(format!("job store task failed: {e}")))?
    }

    /// Runs `f` in one write transaction; publishes the jobs it returns
    /// first (only after the commit, so nobody sees a change that was rolled
    /// back) and returns the second.
    async fn write<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnMut(&mut Rules<'_>) -> Result<(Vec<Job>, T)> + Send + 'static,
    {
        let (published, out) = self.run_rules(true, f).await?;
        for job in published {
            let _ = self.inner.changes.send(job);
        }
        Ok(out)
    }

    /// One committed change to one job, published.
    async fn single<F>(&self, mut f: F) -> Result<Job>
    where
        F: FnMut(&mut Rules<'_>) -> Result<Job> + Send + 'static,
    {
        self.write(move |r| {
            let job = f(r)?;
            Ok((vec![job.clone()], job))
        })
        .await
    }

    /// Runs a blocking read of the backend on the blocking pool.
    async fn read<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&dyn JobBackend) -> Result<T> + Send + 'static,
    {
        let backend = Arc::clone(&self.inner.backend);
        tokio::task::spawn_blocking(move || f(&*backend))
            .await
            .map_err(|e| JobStoreError::Unavailable(format!("job store task failed: {e}")))?
    }

    /// Creates the job for an ingested recording, or returns the existing job
    /// when `(tenant_id, recording_id)` was ingested before with the same
    /// SHA-256 (`created == false`; the caller then deletes its new backup).
    /// A different SHA-256 is [`JobStoreError::RecordingConflict`]. The
    /// object key is left for the first attempt to register.
    pub async fn create_or_get(&self, new: NewJob) -> Result<(Job, bool)> {
        self.create_or_get_with_key(new, None).await
    }

    /// As [`JobStore::create_or_get`], registering `object_key` in the same
    /// transaction as the insert: if another recording's delivery at that
    /// location would overwrite this one's or be overwritten by it (see
    /// [`KeyConflict`]), nothing is inserted and the error is
    /// [`JobStoreError::NameTaken`]. Two concurrent calls with the same key
    /// cannot both pass: the unique index on (object_location, object_key)
    /// fails the second, whose retry then sees the first. A replay of the
    /// same recording id is answered as before, without a check.
    pub async fn create_or_get_with_key(
        &self,
        new: NewJob,
        object_key: Option<ObjectKey>,
    ) -> Result<(Job, bool)> {
        self.write(move |r| {
            if let Some(existing) = r.by_recording(&new.tenant_id, &new.recording_id)? {
                if existing.sha256 != new.sha256 {
                    return Err(JobStoreError::RecordingConflict {
                        tenant_id: new.tenant_id.clone(),
                        recording_id: new.recording_id.clone(),
                        existing: existing.sha256,
                        sent: new.sha256,
                    });
                }
                return Ok((Vec::new(), (existing, false)));
            }
            if let Some(key) = &object_key
                && let Some(conflict) = r.key_conflict(&new.destination_id, key, None)?
            {
                return Err(JobStoreError::NameTaken {
                    recording_id: new.recording_id.clone(),
                    file_name: new.file_name.clone(),
                    conflict,
                });
            }
            let now = r.now();
            let job = Job {
                job_id: new.job_id,
                tenant_id: new.tenant_id.clone(),
                recording_id: new.recording_id.clone(),
                destination_id: new.destination_id.clone(),
                file_name: new.file_name.clone(),
                content_type: new.content_type.clone(),
                backup_path: new.backup_path.clone(),
                sha256: new.sha256,
                size: new.size,
                stored_sha256: new.stored_sha256,
                state: JobState::Stored,
                attempts: 0,
                last_error: None,
                location: None,
                verified_by: None,
                retrying_since: None,
                doubtful_failures: 0,
                next_attempt_at: Some(now),
                created_at: now,
                updated_at: now,
                backup_corrupt: false,
                backup_deleted: false,
                multipart_upload_id: None,
                multipart_upload_key: None,
                multipart_upload_location: None,
                request_id: new.request_id.clone(),
                object_key: object_key.as_ref().map(|k| k.key.clone()),
                object_location: object_key.as_ref().map(|k| k.location.clone()),
                claim_owner: None,
                claim_expires_at: None,
                bytes_sent: 0,
            };
            r.tx.insert(&job.to_row()?)?;
            r.event(
                &job,
                &format!(
                    "stored in the backup store: {} bytes, SHA-256 {}",
                    job.size, job.sha256
                ),
            )?;
            Ok((vec![job.clone()], (job, true)))
        })
        .await
    }

    /// Ingest's check before it takes any byte: `Err(NameTaken)` when a job
    /// of another recording holds the key at its location (or its sidecar
    /// would collide; see [`KeyConflict`]). `Ok` when the key is free, and
    /// when `(tenant_id, recording_id)` was ingested before (a replay is
    /// answered by [`JobStore::create_or_get_with_key`], idempotently).
    ///
    /// Advisory: [`JobStore::create_or_get_with_key`] checks again in the
    /// transaction that inserts, so a concurrent upload cannot slip through.
    pub async fn check_object_key(
        &self,
        tenant_id: TenantId,
        recording_id: RecordingId,
        file_name: FileName,
        destination_id: DestinationId,
        object_key: ObjectKey,
    ) -> Result<()> {
        self.read_rules(move |r| {
            if r.by_recording(&tenant_id, &recording_id)?.is_some() {
                return Ok(());
            }
            match r.key_conflict(&destination_id, &object_key, None)? {
                Some(conflict) => Err(JobStoreError::NameTaken {
                    recording_id: recording_id.clone(),
                    file_name: file_name.clone(),
                    conflict,
                }),
                None => Ok(()),
            }
        })
        .await
    }

    /// `Err(KeyTaken)` when a job other than `job_id` holds the key at its
    /// location (or their sidecars would collide). Advisory, for a caller
    /// that wants to refuse before doing other work: the change itself
    /// ([`JobStore::resend_to`]) checks again in its transaction.
    pub async fn check_key_free(
        &self,
        job_id: JobId,
        destination_id: DestinationId,
        object_key: ObjectKey,
    ) -> Result<()> {
        self.read_rules(move |r| {
            match r.key_conflict(&destination_id, &object_key, Some(job_id))? {
                Some(conflict) => Err(JobStoreError::KeyTaken { job_id, conflict }),
                None => Ok(()),
            }
        })
        .await
    }

    /// The rules in a read-only transaction.
    async fn read_rules<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnMut(&mut Rules<'_>) -> Result<T> + Send + 'static,
    {
        self.run_rules(false, f).await
    }

    /// Registers `object_key` as the job's key at its current destination,
    /// before an attempt writes there (the destination's prefix or bucket may
    /// have changed since ingest, or the job may predate keys). A no-op when
    /// it already holds that key there; [`JobStoreError::KeyTaken`] when
    /// another job's objects would be overwritten, and then nothing changes.
    pub async fn register_object_key(&self, job_id: JobId, object_key: ObjectKey) -> Result<Job> {
        self.write(move |r| {
            let mut job = r.get(job_id)?;
            if job.object_key.as_deref() == Some(object_key.key.as_str())
                && job.object_location.as_deref() == Some(object_key.location.as_str())
            {
                return Ok((Vec::new(), job));
            }
            if let Some(conflict) = r.key_conflict(&job.destination_id, &object_key, Some(job_id))? {
                return Err(JobStoreError::KeyTaken { job_id, conflict });
            }
            let message = match &job.object_key {
                Some(old) => format!(
                    "object key at destination {} is now {:?} at {} (was {old:?}: the destination changed)",
                    job.destination_id, object_key.key, object_key.location
                ),
                None => format!(
                    "object key {:?} registered at destination {} ({})",
                    object_key.key, job.destination_id, object_key.location
                ),
            };
            job.object_key = Some(object_key.key.clone());
            job.object_location = Some(object_key.location.clone());
            r.save(&mut job, &message)?;
            Ok((vec![job.clone()], job))
        })
        .await
    }

    /// One job.
    pub async fn get(&self, job_id: JobId) -> Result<Job> {
        self.read_rules(move |r| r.get(job_id)).await
    }

    /// The job for a recording id, if it was ingested (lets ingest answer a
    /// replay without storing the bytes again).
    pub async fn find_by_recording(
        &self,
        tenant_id: TenantId,
        recording_id: RecordingId,
    ) -> Result<Option<Job>> {
        self.read_rules(move |r| r.by_recording(&tenant_id, &recording_id))
            .await
    }

    /// Jobs matching `filter`, newest first.
    pub async fn list(&self, filter: JobFilter) -> Result<Vec<Job>> {
        let query = JobQuery::List {
            tenant_id: filter.tenant_id.as_ref().map(ToString::to_string),
            state: filter.state.map(|s| s.as_str().to_owned()),
            limit: match filter.limit {
                0 => DEFAULT_LIST,
                n => n.min(MAX_LIST),
            },
        };
        self.select(query).await
    }

    async fn select(&self, query: JobQuery) -> Result<Vec<Job>> {
        self.read(move |b| b.select(&query)?.into_iter().map(Job::from_row).collect())
            .await
    }

    /// How many jobs are in each state (for the jobs-by-state metric).
    pub async fn count_by_state(&self) -> Result<Vec<(JobState, u64)>> {
        self.read(|b| {
            Ok(b.count_by_state()?
                .into_iter()
                .filter_map(|(state, n)| Some((JobState::from_db(&state)?, n.unsigned_abs())))
                .collect())
        })
        .await
    }

    /// Claims up to `limit` jobs due at `now` for this replica: each moves
    /// to UPLOADING with this replica as its claim's owner until
    /// `now + claim_ttl`, and counts the attempt. First, jobs whose claim
    /// expired (their replica died or lost the database) are taken over:
    /// RETRYING, due now, with a history line naming the replica that held
    /// them; they are then claimed like any due job.
    ///
    /// On PostgreSQL the due rows are read `FOR UPDATE SKIP LOCKED`, so
    /// replicas claiming at once take disjoint jobs without waiting; on
    /// SQLite one `BEGIN IMMEDIATE` transaction does the same.
    pub async fn claim_due(&self, now: OffsetDateTime, limit: u32) -> Result<Vec<Job>> {
        let now_ms = to_ms(now);
        self.write(move |r| {
            let mut published = Vec::new();
            for id in r.tx.expired_claims(now_ms, limit)? {
                let mut job = r.get(parse_job_id(&id)?)?;
                let (from, owner) = (job.state, job.claim_owner.clone().unwrap_or_default());
                let expired = job.claim_expires_at.map(rfc3339).unwrap_or_default();
                let message = format!(
                    "the claim of replica {owner} expired at {expired} while the job was {from} \
                     (that replica stopped or lost the database); replica {} takes it over",
                    r.replica.instance
                );
                // Due at the caller's `now`, so the claim below takes it.
                let next = from_ms(now_ms)?;
                r.apply(&mut job, JobState::Retrying, &message, |j| {
                    j.last_error = Some(message.clone());
                    j.next_attempt_at = Some(next);
                })?;
                published.push(job);
            }
            let mut claimed = Vec::new();
            let expires = r.now() + r.replica.claim_ttl;
            for id in r.tx.due(now_ms, limit)? {
                let job_id = parse_job_id(&id)?;
                let replica = r.replica.instance.clone();
                let job = r.transition(job_id, JobState::Uploading, "attempt started", |j| {
                    j.attempts += 1;
                    j.next_attempt_at = None;
                    j.claim_owner = Some(replica.clone());
                    j.claim_expires_at = Some(expires);
                })?;
                claimed.push(job);
            }
            published.extend(claimed.iter().cloned());
            Ok((published, claimed))
        })
        .await
    }

    /// Extends this replica's claim on a running job to `now + claim_ttl`.
    /// [`JobStoreError::ClaimLost`] when it no longer holds it: the attempt
    /// must stop. Writes no history line.
    pub async fn renew_claim(&self, job_id: JobId) -> Result<()> {
        self.write(move |r| {
            let mut job = r.get(job_id)?;
            r.check_claim(&job)?;
            job.claim_expires_at = Some(r.now() + r.replica.claim_ttl);
            r.tx.update(&job.to_row()?)?;
            Ok((Vec::new(), ()))
        })
        .await
    }

    /// UPLOADING → VERIFYING: the upload finished; the destination's copy is being checked.
    pub async fn mark_verifying(&self, job_id: JobId) -> Result<Job> {
        self.single(move |r| {
            r.transition(
                job_id,
                JobState::Verifying,
                "upload finished; verifying",
                |_| {},
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
        self.single(move |r| {
            let message = format!("delivered to {location}, verified by {verified_by}");
            r.transition(job_id, JobState::Delivered, &message, |j| {
                j.location = Some(location.clone());
                j.verified_by = Some(verified_by);
                j.last_error = None;
                j.next_attempt_at = None;
                j.multipart_upload_id = None;
                j.multipart_upload_key = None;
                j.multipart_upload_location = None;
            })
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
        self.single(move |r| {
            let message = format!(
                "attempt failed ({}), retrying at {}: {error}",
                if doubtful {
                    "may be permanent"
                } else {
                    "transient"
                },
                rfc3339(next_attempt_at)
            );
            let now = r.now();
            r.transition(job_id, JobState::Retrying, &message, |j| {
                j.last_error = Some(error.clone());
                j.next_attempt_at = Some(next_attempt_at);
                j.retrying_since = Some(j.retrying_since.unwrap_or(now));
                j.doubtful_failures += u32::from(doubtful);
            })
        })
        .await
    }

    /// → RETAINED with `reason` (permanent error, attempts exhausted). The
    /// backup stays; only [`JobStore::resend`] moves the job on.
    pub async fn mark_retained(&self, job_id: JobId, reason: String) -> Result<Job> {
        self.single(move |r| {
            let message = format!("retained: {reason}");
            r.transition(job_id, JobState::Retained, &message, |j| {
                j.last_error = Some(reason.clone());
                j.next_attempt_at = None;
            })
        })
        .await
    }

    /// Records (or, with `None`, clears) the multipart upload the running
    /// attempt started, with the key and location it writes, before any
    /// part is sent, so that after a crash it is resumed or aborted instead
    /// of orphaned. Needs this replica's claim while an attempt runs.
    pub async fn set_multipart_upload_id(
        &self,
        job_id: JobId,
        upload_id: Option<String>,
    ) -> Result<Job> {
        self.single(move |r| {
            let mut job = r.get(job_id)?;
            if job.state == JobState::Delivered && upload_id.is_some() {
                return Err(JobStoreError::IllegalTransition {
                    job_id,
                    source: super::IllegalTransition {
                        from: job.state,
                        to: JobState::Uploading,
                    },
                });
            }
            if matches!(job.state, JobState::Uploading | JobState::Verifying) {
                r.check_claim(&job)?;
            }
            let message = match &upload_id {
                Some(u) => format!(
                    "multipart upload {u} started (key {:?})",
                    job.object_key.as_deref().unwrap_or(job.file_name.as_str())
                ),
                None => "multipart upload finished or aborted".to_owned(),
            };
            job.multipart_upload_key = upload_id.as_ref().and(job.object_key.clone());
            job.multipart_upload_location = upload_id.as_ref().and(job.object_location.clone());
            job.multipart_upload_id = upload_id.clone();
            r.save(&mut job, &message)?;
            Ok(job)
        })
        .await
    }

    /// Forgets `upload_id` once the provider no longer holds that upload
    /// (completed, or aborted). Only that id: if the job meanwhile records
    /// another (or none), nothing changes.
    pub async fn clear_multipart_upload_id(&self, job_id: JobId, upload_id: String) -> Result<Job> {
        self.write(move |r| {
            let mut job = r.get(job_id)?;
            if job.multipart_upload_id.as_deref() != Some(upload_id.as_str()) {
                return Ok((Vec::new(), job));
            }
            job.multipart_upload_id = None;
            job.multipart_upload_key = None;
            job.multipart_upload_location = None;
            r.save(
                &mut job,
                &format!("multipart upload {upload_id} completed or aborted"),
            )?;
            Ok((vec![job.clone()], job))
        })
        .await
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

    /// Before a resend aborts the job's open multipart upload: a RETRYING
    /// job becomes RETAINED (no longer due), in one transaction, so no
    /// replica's retry can claim it and resume the upload while it is being
    /// aborted. A RETAINED job stays as it is. Anything else is refused as
    /// [`JobStoreError::IllegalTransition`] (a running attempt, DELIVERED).
    pub async fn park_for_resend(&self, job_id: JobId, reason: String) -> Result<Job> {
        self.single(move |r| {
            let job = r.get(job_id)?;
            match job.state {
                JobState::Retained => Ok(job),
                JobState::Retrying => {
                    let message = format!("parked for a resend: {reason}");
                    r.transition(job_id, JobState::Retained, &message, |j| {
                        j.next_attempt_at = None;
                    })
                }
                from => Err(JobStoreError::IllegalTransition {
                    job_id,
                    source: super::IllegalTransition {
                        from,
                        to: JobState::Stored,
                    },
                }),
            }
        })
        .await
    }

    /// RETAINED | RETRYING → STORED, due now, attempts reset, optionally to
    /// another destination (the caller checks it belongs to the tenant and
    /// that the backup is still in the backup store).
    ///
    /// Refused when the backup is gone or corrupt (nothing to send), when a
    /// multipart upload at the old destination is still open (it would be
    /// orphaned), and, with [`JobStoreError::KeyTaken`], when another job
    /// holds the object key at the destination's location. Nothing changes
    /// when refused.
    pub async fn resend_to(&self, job_id: JobId, resend: Resend) -> Result<Job> {
        self.single(move |r| {
            let Resend {
                destination,
                object_key,
                released_upload,
            } = resend.clone();
            let mut job = r.get(job_id)?;
            check_transition(job.state, JobState::Stored)
                .map_err(|source| JobStoreError::IllegalTransition { job_id, source })?;
            let refuse = |reason: &str| {
                Err(JobStoreError::FailedPrecondition {
                    job_id,
                    reason: reason.to_owned(),
                })
            };
            if job.backup_deleted {
                return refuse("its backup was deleted, so there is nothing to resend");
            }
            if job.backup_corrupt {
                return refuse(
                    "its backup failed the SHA-256 check and will not be sent; have the recorder \
                     send the recording again under a new recording id",
                );
            }
            let changes_destination = destination
                .as_ref()
                .is_some_and(|d| *d != job.destination_id);
            let released = released_upload
                .filter(|rel| job.multipart_upload_id.as_deref() == Some(rel.upload_id.as_str()));
            if changes_destination
                && let Some(open) = &job.multipart_upload_id
                && released.is_none()
            {
                return Err(JobStoreError::FailedPrecondition {
                    job_id,
                    reason: format!(
                        "multipart upload {open} at its current destination {} is still open and \
                         would be orphaned; resend again (ResendJob aborts it first), or resend to \
                         the same destination, which resumes it",
                        job.destination_id
                    ),
                });
            }
            if let Some(released) = &released {
                job.multipart_upload_id = None;
                job.multipart_upload_key = None;
                job.multipart_upload_location = None;
                r.save(&mut job, &released.message)?;
            }
            let destination = destination.unwrap_or_else(|| job.destination_id.clone());
            // A key at the old destination means nothing at the new one.
            let object_key = match object_key {
                Some(key) => Some(key),
                None if changes_destination => None,
                None => job
                    .object_key
                    .clone()
                    .zip(job.object_location.clone())
                    .map(|(key, location)| ObjectKey { location, key }),
            };
            if let Some(key) = &object_key
                && let Some(conflict) = r.key_conflict(&destination, key, Some(job_id))?
            {
                return Err(JobStoreError::KeyTaken { job_id, conflict });
            }
            let message = if changes_destination {
                format!("resend requested to destination {destination}")
            } else {
                "resend requested".to_owned()
            };
            let now = r.now();
            r.transition(job_id, JobState::Stored, &message, |j| {
                j.attempts = 0;
                j.last_error = None;
                j.next_attempt_at = Some(now);
                j.destination_id = destination.clone();
                j.object_key = object_key.as_ref().map(|k| k.key.clone());
                j.object_location = object_key.as_ref().map(|k| k.location.clone());
                j.retrying_since = None;
                j.doubtful_failures = 0;
                if released.is_some() {
                    j.multipart_upload_id = None;
                    j.multipart_upload_key = None;
                    j.multipart_upload_location = None;
                }
            })
        })
        .await
    }

    /// At start-up, before any worker runs: every job this replica's
    /// previous process left UPLOADING or VERIFYING (its own claims, and
    /// unclaimed rows written before claims existed) becomes RETRYING, due
    /// now, `multipart_upload_id` kept so the next attempt resumes or aborts
    /// that upload. Never a job another replica holds: those are taken over
    /// only once their claim expires ([`JobStore::claim_due`]). Returns them.
    pub async fn recover_after_crash(&self) -> Result<Vec<Job>> {
        self.write(move |r| {
            let me = r.replica.instance.clone();
            let mut recovered = Vec::new();
            for id in r.tx.claimed_by(&me)? {
                let mut job = r.get(parse_job_id(&id)?)?;
                let message = format!(
                    "the uploader (replica {me}) stopped while the job was {}; retrying",
                    job.state
                );
                let now = r.now();
                r.apply(&mut job, JobState::Retrying, &message, |j| {
                    j.last_error = Some(message.clone());
                    j.next_attempt_at = Some(now);
                })?;
                recovered.push(job);
            }
            Ok((recovered.clone(), recovered))
        })
        .await
    }

    /// The backup no longer matches its SHA-256 (scrub or pre-attempt check).
    /// Marks it; a STORED or RETRYING job also becomes RETAINED so it is never
    /// claimed. Nothing is deleted. The job gives up its object key: at
    /// once, or when a running attempt ends without delivering.
    pub async fn mark_backup_corrupt(&self, job_id: JobId, detail: String) -> Result<Job> {
        self.single(move |r| {
            let mut job = r.get(job_id)?;
            if job.state == JobState::Delivered {
                // The delivered copy was verified against the intake digest; a
                // later change to a leftover backup does not concern the job.
                return Ok(job);
            }
            let message = format!("backup corrupt: {detail}");
            job.backup_corrupt = true;
            job.last_error = Some(message.clone());
            if matches!(job.state, JobState::Stored | JobState::Retrying) {
                r.apply(&mut job, JobState::Retained, &message, |j| {
                    j.next_attempt_at = None;
                })?;
            } else {
                r.save(&mut job, &message)?;
                r.release_key_of_corrupt(&mut job)?;
            }
            Ok(job)
        })
        .await
    }

    /// Records that a DELIVERED job's backup was deleted. Idempotent.
    pub async fn mark_backup_deleted(&self, job_id: JobId) -> Result<Job> {
        self.single(move |r| {
            let mut job = r.get(job_id)?;
            if job.state != JobState::Delivered {
                return Err(JobStoreError::FailedPrecondition {
                    job_id,
                    reason: format!(
                        "its backup may only be deleted once DELIVERED, and it is {}",
                        job.state
                    ),
                });
            }
            if !job.backup_deleted {
                job.backup_deleted = true;
                r.save(&mut job, "backup deleted")?;
            }
            Ok(job)
        })
        .await
    }

    /// DELIVERED jobs whose backup is not yet recorded as deleted: a crash
    /// between verification and deletion leaves these; delete them at start-up.
    pub async fn pending_backup_deletes(&self) -> Result<Vec<Job>> {
        self.select(JobQuery::PendingBackupDeletes).await
    }

    /// Jobs whose backup the scrub should re-hash: not delivered, backup
    /// present and not already known corrupt.
    pub async fn scrub_candidates(&self) -> Result<Vec<Job>> {
        self.select(JobQuery::ScrubCandidates).await
    }

    /// The job's history, oldest first.
    pub async fn history(&self, job_id: JobId) -> Result<Vec<JobEvent>> {
        self.get(job_id).await?;
        self.read(move |b| {
            b.history(&job_id.to_string())?
                .into_iter()
                .map(JobEvent::from_row)
                .collect()
        })
        .await
    }
}

/// Publishes what other replicas changed: each job re-read (with the bytes
/// sent, for progress). Runs on the backend's follower thread.
fn forward_remote(
    backend: &dyn JobBackend,
    changes: &broadcast::Sender<Job>,
    remote: Vec<RemoteChange>,
) {
    if changes.receiver_count() == 0 {
        return;
    }
    for change in remote {
        let mut found = None;
        let read = backend.read(&mut |tx| {
            found = tx.job(&change.job_id)?.map(Job::from_row).transpose()?;
            Ok(())
        });
        if let (Ok(()), Some(mut job)) = (read, found) {
            job.bytes_sent = change.bytes_sent.unwrap_or(0);
            let _ = changes.send(job);
        }
    }
}
