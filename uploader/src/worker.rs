//! Delivery: claims due jobs and runs one attempt each — unwrap the backup's
//! data key through the vault, re-check the SHA-256 of the decrypted backup,
//! lease the credential, upload from the decrypted backup with provider-checked checksums,
//! verify, release the lease, and only then delete the backup. Failures
//! retry with backoff or, when permanent, leave the job RETAINED with its
//! backup. Never uploads a backup whose hash changed.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use time::OffsetDateTime;
use tokio::sync::{Notify, Semaphore};

use crate::{
    backup::BackupStore,
    datakey::{OpenError, open_backup},
    destination::{
        self, DeliveryError, DeliveryHooks, Destination, FsAllowedRoots, HookFuture, ObjectInfo,
        S3Options, Source,
    },
    destination_store::DestinationStore,
    jobs::{
        FailureClass, GiveUp, Job, JobId, JobStore, JobStoreError, RetryPolicy, RetryState,
        VerifiedBy,
    },
    lease::VaultLeases,
};

/// Why one attempt failed, and how it is retried.
#[derive(Debug)]
struct Failure {
    class: FailureClass,
    message: String,
}

impl Failure {
    fn new(class: FailureClass, message: impl Into<String>) -> Self {
        Self {
            class,
            message: message.into(),
        }
    }
    fn permanent(message: impl Into<String>) -> Self {
        Self::new(FailureClass::Permanent, message)
    }
    fn transient(message: impl Into<String>) -> Self {
        Self::new(FailureClass::Transient, message)
    }
    fn doubtful(message: impl Into<String>) -> Self {
        Self::new(FailureClass::Doubtful, message)
    }
}

/// How a delivery error is retried. Permanent ones as the destination says;
/// of the rest, what passes with time (unreachable, 5xx, throttled, timed
/// out, a commit of our own job store) is transient, and what may not (bytes
/// corrupted in transit again, a copy that did not verify, an unexpected
/// answer, our own backup unreadable) is doubtful.
fn delivery_class(e: &DeliveryError) -> FailureClass {
    if e.is_permanent() {
        return FailureClass::Permanent;
    }
    match e {
        DeliveryError::Connection { .. }
        | DeliveryError::Hook { .. }
        | DeliveryError::Write { .. } => FailureClass::Transient,
        // The destination already told permanent from not; of the rest, bytes
        // corrupted in transit or an upload that vanished may recur, and
        // everything else it retries (busy, throttled, 5xx, no status) is an outage.
        DeliveryError::Provider { code, .. } => match code.as_deref() {
            Some(c) if c == "NoSuchUpload" || destination::CORRUPTED_IN_TRANSIT.contains(&c) => {
                FailureClass::Doubtful
            }
            _ => FailureClass::Transient,
        },
        _ => FailureClass::Doubtful,
    }
}

/// `6 h`, `90 min`, `45 s`: a window as people write it.
fn humantime_secs(d: std::time::Duration) -> String {
    let secs = d.as_secs();
    if secs >= 3600 && secs.is_multiple_of(3600) {
        format!("{} h", secs / 3600)
    } else if secs >= 60 && secs.is_multiple_of(60) {
        format!("{} min", secs / 60)
    } else {
        format!("{secs} s")
    }
}

/// How a refused lease is retried: the vault unreachable or overloaded
/// passes with time; an unknown credential or a missing grant does not.
fn lease_class(e: &crate::lease::LeaseError) -> FailureClass {
    use tonic::Code;
    if e.is_permanent() {
        FailureClass::Permanent
    } else if matches!(
        e.code,
        Code::Unavailable
            | Code::DeadlineExceeded
            | Code::ResourceExhausted
            | Code::Aborted
            | Code::Cancelled
    ) {
        FailureClass::Transient
    } else {
        FailureClass::Doubtful
    }
}

/// Everything an attempt needs.
#[derive(Debug)]
pub struct Worker {
    pub jobs: JobStore,
    pub backups: BackupStore,
    pub destinations: Arc<DestinationStore>,
    pub vault: VaultLeases,
    pub retry: RetryPolicy,
    pub s3: S3Options,
    /// `[destinations].fs_allowed_roots`, re-checked by every `fs` write.
    pub fs_roots: FsAllowedRoots,
    pub concurrency: usize,
    /// Poked by ingest and ResendJob so new work starts at once.
    pub wake: Arc<Notify>,
    pub metrics: Arc<crate::metrics::UploaderMetrics>,
}

impl Worker {
    /// Runs until `shutdown` resolves: resumes what a crash interrupted, then
    /// claims due jobs as slots free up.
    pub async fn run(self: Arc<Self>, shutdown: impl std::future::Future<Output = ()>) {
        match self.jobs.recover_after_crash().await {
            Ok(jobs) if !jobs.is_empty() => tracing::warn!(
                count = jobs.len(),
                "resuming deliveries interrupted by a restart"
            ),
            Ok(_) => {}
            Err(error) => tracing::error!(%error, "crash recovery failed"),
        }
        self.finish_pending_backup_deletes().await;
        let slots = Arc::new(Semaphore::new(self.concurrency.max(1)));
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            let free = u32::try_from(slots.available_permits()).unwrap_or(u32::MAX);
            if free > 0 {
                match self.jobs.claim_due(OffsetDateTime::now_utc(), free).await {
                    Ok(claimed) => {
                        for job in claimed {
                            let Ok(permit) = slots.clone().acquire_owned().await else {
                                return;
                            };
                            let this = self.clone();
                            tokio::spawn(async move {
                                this.attempt(job).await;
                                drop(permit);
                            });
                        }
                    }
                    Err(error) => tracing::error!(%error, "claiming due jobs failed"),
                }
            }
            tokio::select! {
                () = &mut shutdown => return,
                () = self.wake.notified() => {}
                () = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }

    /// A crash between "delivered" and "backup deleted" leaves the delete to redo.
    async fn finish_pending_backup_deletes(&self) {
        if let Ok(jobs) = self.jobs.pending_backup_deletes().await {
            for job in jobs {
                self.delete_backup(&job).await;
            }
        }
    }

    async fn delete_backup(&self, job: &Job) {
        match self.backups.delete(&job.backup_path).await {
            Ok(()) => {
                if let Err(error) = self.jobs.mark_backup_deleted(job.job_id).await {
                    tracing::error!(job_id = %job.job_id, %error, "recording the backup delete failed");
                }
            }
            Err(error) => {
                tracing::error!(job_id = %job.job_id, %error, "deleting the delivered backup failed; will retry at start-up")
            }
        }
    }

    /// One delivery attempt, with its outcome recorded in the job store.
    pub async fn attempt(&self, job: Job) {
        tracing::info!(job_id = %job.job_id, recording_id = %job.recording_id, attempt = job.attempts, "delivery attempt");
        let result = tokio::select! {
            result = self.deliver(&job) => result,
            lost = self.keep_claim(job.job_id) => {
                // Another replica runs the job now (this one stalled past the
                // claim's expiry); it resumes or aborts what was started here.
                tracing::warn!(job_id = %job.job_id, error = %lost, "stopping the attempt: its claim was lost");
                self.metrics.claims_lost.inc();
                return;
            }
        };
        let recorded = match result {
            Ok((location, verified_by)) => {
                let done = async {
                    self.jobs.mark_verifying(job.job_id).await?;
                    self.jobs
                        .mark_delivered(job.job_id, location.clone(), verified_by)
                        .await
                }
                .await;
                if done.is_ok() {
                    self.metrics.delivered.inc();
                    self.metrics.bytes_delivered.add(job.size);
                    tracing::info!(job_id = %job.job_id, %location, verified_by = verified_by.as_str(), "delivered and verified");
                    self.delete_backup(&job).await;
                }
                done.map(|_| ())
            }
            Err(failure) => {
                let state = RetryState {
                    attempts: job.attempts,
                    doubtful_failures: job.doubtful_failures,
                    retrying_since: job.retrying_since,
                };
                match self
                    .retry
                    .decide(failure.class, state, OffsetDateTime::now_utc())
                {
                    Ok(at) => {
                        let doubtful = failure.class == FailureClass::Doubtful;
                        self.metrics.retry(doubtful);
                        tracing::warn!(job_id = %job.job_id, error = %failure.message, next_attempt_at = %at, doubtful, "delivery failed; will retry");
                        self.jobs
                            .mark_retry(job.job_id, failure.message, at, doubtful)
                            .await
                            .map(|_| ())
                    }
                    Err(give_up) => {
                        let reason = match give_up {
                            GiveUp::Permanent => failure.message,
                            GiveUp::WindowOver { since, window } => format!(
                                "gave up after retrying for {} since {} ({} attempts): {}",
                                humantime_secs(window),
                                crate::jobs::rfc3339(since),
                                job.attempts,
                                failure.message
                            ),
                            GiveUp::DoubtfulBudget(n) => format!(
                                "gave up after {n} failures that may be permanent ({} attempts in all): {}",
                                job.attempts, failure.message
                            ),
                        };
                        self.metrics.retained.inc();
                        tracing::error!(job_id = %job.job_id, %reason, "delivery failed; recording retained");
                        self.jobs
                            .mark_retained(job.job_id, reason)
                            .await
                            .map(|_| ())
                    }
                }
            }
        };
        match recorded {
            Ok(()) => {}
            Err(error @ JobStoreError::ClaimLost { .. }) => {
                self.metrics.claims_lost.inc();
                tracing::warn!(job_id = %job.job_id, %error, "the attempt's outcome was not recorded: another replica took the job over");
            }
            Err(error) => {
                tracing::error!(job_id = %job.job_id, %error, "recording the attempt's outcome failed");
            }
        }
    }

    /// Marks the job's backup corrupt (it is never delivered, and kept) and
    /// returns the attempt's permanent failure.
    async fn corrupt(&self, job: &Job, detail: String) -> Failure {
        tracing::error!(job_id = %job.job_id, %detail, "BACKUP CORRUPT: not delivering it");
        let _ = self
            .jobs
            .mark_backup_corrupt(job.job_id, detail.clone())
            .await;
        Failure::permanent(format!("backup corrupt: {detail}"))
    }

    async fn deliver(&self, job: &Job) -> Result<(String, VerifiedBy), Failure> {
        let record = self
            .destinations
            .get_async(job.destination_id.as_str())
            .await
            .map_err(|e| Failure::transient(format!("reading destination: {e}")))?
            .ok_or_else(|| {
                Failure::permanent(format!(
                    "destination {} no longer exists; ResendJob with another destination_id",
                    job.destination_id
                ))
            })?;

        // Never overwrite another recording: the key this attempt writes must
        // be the job's registered key at the destination's real location. It
        // differs when the destination's prefix or bucket changed since
        // ingest or the job predates keys; registering it is refused while
        // another job holds it there.
        let mut job = job.clone();
        if let Some(key) = record.object_key(job.file_name.as_str())
            && (job.object_key.as_deref() != Some(key.key.as_str())
                || job.object_location.as_deref() != Some(key.location.as_str()))
        {
            job = self
                .jobs
                .register_object_key(job.job_id, key)
                .await
                .map_err(|e| match e {
                    JobStoreError::KeyTaken { .. } => {
                        Failure::permanent(format!("not delivered: {e}"))
                    }
                    e => Failure::transient(format!("registering the object key: {e}")),
                })?;
        }
        let job = &job;
        let request_id = job
            .request_id
            .clone()
            .unwrap_or_else(|| job.job_id.to_string());
        // The data key for this attempt only: it is dropped (wiped) with
        // `reader` when the attempt ends, on every path.
        let reader =
            match open_backup(&self.backups, &self.vault, job, "deliver", &request_id).await {
                Ok(reader) => reader,
                Err(OpenError::Corrupt(detail)) => return Err(self.corrupt(job, detail).await),
                Err(e @ OpenError::Refused(_)) => return Err(Failure::permanent(e.to_string())),
                Err(e @ OpenError::VaultUnavailable(_)) => {
                    return Err(Failure::transient(e.to_string()));
                }
                Err(e @ OpenError::Io(_)) => return Err(Failure::doubtful(e.to_string())),
            };

        // Integrity at rest: never upload bytes that are not what we took in.
        // Reading through the source decrypts and authenticates every segment.
        let crate::digest::FileDigest {
            sha256,
            crc32,
            size,
        } = match reader.digest().await {
            Ok(digest) => digest,
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                return Err(self.corrupt(job, e.to_string()).await);
            }
            Err(e) => {
                return Err(Failure::doubtful(format!(
                    "reading the backup {}: {e}",
                    job.backup_path.display()
                )));
            }
        };
        if sha256 != job.sha256 || size != job.size {
            let detail = format!(
                "backup SHA-256 is {sha256} ({size} bytes) but {} ({} bytes) was ingested; not uploading",
                job.sha256, job.size
            );
            return Err(self.corrupt(job, detail).await);
        }
        // Destinations read the recording only through its source, never
        // the backup file.
        let source: Arc<dyn Source> = reader.source();

        let lease = match record.config.provider {
            destination::Provider::Fs => None,
            _ => Some(
                self.vault
                    .acquire(
                        &record.credential_id,
                        job.recording_id.as_str(),
                        &request_id,
                    )
                    .await
                    .map_err(|e| Failure::new(lease_class(&e), e.to_string()))?,
            ),
        };
        // The client holds what it needs; the lease's plaintext is zeroized
        // and the lease released when `lease` drops, on every path.
        let built = Destination::with_options(
            &record.config,
            lease.as_ref().map(|l| l.secret()),
            self.s3.clone(),
            &self.fs_roots,
        );
        let destination = built.map_err(|e| Failure::new(delivery_class(&e), e.to_string()))?;
        let resume = self.stale_upload(job, &destination).await?;

        let progress_jobs = self.jobs.clone();
        let progress_job = job.clone();
        let progress = move |sent: u64| progress_jobs.publish_progress(&progress_job, sent);
        let recorded: RecordedUpload = Arc::new(Mutex::new(resume.clone()));
        let on_started = record_upload_id(self.jobs.clone(), job.job_id, recorded.clone());
        let on_closed = forget_upload_id(self.jobs.clone(), job.job_id, recorded.clone());
        let hooks = DeliveryHooks {
            progress: &progress,
            on_multipart_started: &on_started,
            on_multipart_closed: &on_closed,
            resume_upload_id: resume.as_deref(),
        };
        let object = ObjectInfo {
            name: job.file_name.as_str().to_owned(),
            size,
            sha256: *sha256.as_bytes(),
            crc32,
            content_type: job.content_type.as_str().to_owned(),
        };
        let delivered = destination.deliver(source, &object, &hooks).await;
        drop(destination);
        if let Some(lease) = lease {
            lease.release().await;
        }
        if let Err(destination::DeliveryError::Verification { .. }) = &delivered {
            self.metrics.verification_failures.inc();
        }
        let delivery = match delivered {
            Ok(delivery) => delivery,
            Err(e) => return Err(delivery_failure(&self.jobs, job, e).await),
        };
        // A completed multipart upload must not be "resumed" by a later
        // resend. The closed hook normally forgot it already; this covers a
        // hook whose commit failed.
        let still_recorded = recorded.lock().map_or(true, |r| r.is_some());
        if still_recorded {
            let _ = self.jobs.set_multipart_upload_id(job.job_id, None).await;
        }
        let verified_by = match delivery.verified_by {
            destination::VerifiedBy::ProviderChecksum => VerifiedBy::ProviderChecksum,
            _ => VerifiedBy::ReadBack,
        };
        Ok((delivery.location, verified_by))
    }
}

impl Worker {
    /// The multipart upload this attempt may resume: the one the job
    /// recorded, if it was started under the key and location the attempt
    /// writes now. One started under another key (the destination's prefix
    /// changed) cannot be resumed under this one, so it is aborted where it
    /// was started (its key is stored beside its id), never orphaned; one at
    /// another location (the destination now points at another bucket)
    /// cannot be reached with this attempt's client and is given up with a
    /// history line, for the bucket's AbortIncompleteMultipartUpload rule.
    async fn stale_upload(
        &self,
        job: &Job,
        destination: &Destination,
    ) -> Result<Option<String>, Failure> {
        let Some(upload_id) = job.multipart_upload_id.clone() else {
            return Ok(None);
        };
        let Some(old_key) = job.multipart_upload_key.clone() else {
            return Ok(Some(upload_id)); // recorded before keys were kept: resume as before
        };
        let same_location = job.multipart_upload_location == job.object_location;
        if same_location && job.object_key.as_deref() == Some(old_key.as_str()) {
            return Ok(Some(upload_id));
        }
        if same_location {
            destination
                .abort_multipart(&old_key, &upload_id)
                .await
                .map_err(|e| {
                    Failure::new(
                        delivery_class(&e),
                        format!(
                            "multipart upload {upload_id} was started under the earlier key \
                             {old_key:?} and could not be aborted there: {e}"
                        ),
                    )
                })?;
            tracing::info!(job_id = %job.job_id, %upload_id, key = %old_key, "aborted a multipart upload started under the destination's earlier prefix");
        } else {
            tracing::warn!(job_id = %job.job_id, %upload_id, key = %old_key, location = job.multipart_upload_location.as_deref().unwrap_or(""), "the job's open multipart upload is at a location the destination no longer points at; it is given up (abort it there, or let an AbortIncompleteMultipartUpload rule remove it)");
        }
        self.jobs
            .clear_multipart_upload_id(job.job_id, upload_id)
            .await
            .map_err(|e| Failure::transient(format!("forgetting the earlier upload: {e}")))?;
        Ok(None)
    }

    /// Renews this replica's claim on the job every third of the claim's
    /// lifetime while the attempt runs; returns only once the claim is lost
    /// (another replica took the job over), so the attempt can be stopped.
    /// A renewal that fails because the database is unreachable is retried:
    /// the claim may still hold, and the next renewal tells.
    async fn keep_claim(&self, job_id: JobId) -> JobStoreError {
        let every = self.jobs.claim_ttl() / 3;
        loop {
            tokio::time::sleep(every).await;
            match self.jobs.renew_claim(job_id).await {
                Ok(()) => {}
                Err(e @ (JobStoreError::ClaimLost { .. } | JobStoreError::NotFound(_))) => {
                    return e;
                }
                Err(error) => {
                    tracing::warn!(%job_id, %error, "renewing the claim failed; retrying");
                }
            }
        }
    }
}

/// What a failed delivery means for the job. Errors about reading the
/// recording name its backup. A backup that failed authentication is marked
/// corrupt, as when its SHA-256 changed: the job is never claimed or resent
/// with it, and the backup is kept for inspection.
async fn delivery_failure(jobs: &JobStore, job: &Job, e: DeliveryError) -> Failure {
    let message = match &e {
        DeliveryError::Source { .. }
        | DeliveryError::SourceMismatch { .. }
        | DeliveryError::BackupCorrupt { .. } => {
            format!("backup {}: {e}", job.backup_path.display())
        }
        _ => e.to_string(),
    };
    if let DeliveryError::BackupCorrupt { detail } = &e
        && let Err(error) = jobs.mark_backup_corrupt(job.job_id, detail.clone()).await
    {
        tracing::error!(job_id = %job.job_id, %error, "marking the backup corrupt failed");
    }
    Failure::new(delivery_class(&e), message)
}

/// The multipart upload id the job's row may hold, as one attempt last
/// wrote it (or `None` once it was forgotten).
type RecordedUpload = Arc<Mutex<Option<String>>>;

/// The `on_multipart_started` hook of one attempt: commits the new upload id
/// to the job row (a SQLite transaction with a full fsync, run on the blocking
/// pool by [`JobStore`]) and resolves only once it is durable, so the
/// destination sends no part of an upload a restart would not know about.
/// A failed commit fails the hook: the destination aborts the new upload and
/// the attempt fails as transient. `recorded` holds the id from then on.
fn record_upload_id(
    jobs: JobStore,
    job_id: JobId,
    recorded: RecordedUpload,
) -> impl Fn(String) -> HookFuture + Send + Sync {
    move |upload_id: String| -> HookFuture {
        let jobs = jobs.clone();
        let recorded = recorded.clone();
        Box::pin(async move {
            // Set before the write: if the commit's outcome is unknown, the
            // row is cleared after a successful delivery all the same.
            if let Ok(mut r) = recorded.lock() {
                *r = Some(upload_id.clone());
            }
            match jobs.set_multipart_upload_id(job_id, Some(upload_id)).await {
                Ok(_) => Ok(()),
                Err(error) => {
                    tracing::error!(%job_id, %error, "saving the multipart upload id failed; aborting the upload");
                    Err(error.into())
                }
            }
        })
    }
}

/// The `on_multipart_closed` hook of one attempt: the provider no longer
/// holds the upload (completed, or aborted after a permanent error), so its id
/// is cleared from the job row, if the row still holds that id. Without it a
/// RETAINED job would keep an id whose upload is gone, and a resend to
/// another destination would be refused as if it were open.
fn forget_upload_id(
    jobs: JobStore,
    job_id: JobId,
    recorded: RecordedUpload,
) -> impl Fn(String) -> HookFuture + Send + Sync {
    move |upload_id: String| -> HookFuture {
        let jobs = jobs.clone();
        let recorded = recorded.clone();
        Box::pin(async move {
            jobs.clear_multipart_upload_id(job_id, upload_id.clone())
                .await?;
            if let Ok(mut r) = recorded.lock()
                && r.as_deref() == Some(upload_id.as_str())
            {
                *r = None;
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::Instant;

    use super::*;
    use crate::destination::s3::s3_server::{
        RecordedRequest, RequestHook, S3Server, S3ServerOptions,
    };
    use crate::destination::{DeliveryError, DestinationConfig, Provider};
    use crate::digest::Sha256Digest;
    use crate::jobs::{ContentType, DestinationId, FileName, NewJob, RecordingId, TenantId};

    const MIB: u64 = 1024 * 1024;

    /// What the server saw of each UploadPart: when it arrived, its upload
    /// id, and the id the job row held at that moment.
    type PartsSeen = Vec<(Instant, String, Option<String>)>;

    fn s3_destination(server: &S3Server) -> Destination {
        let config = DestinationConfig {
            provider: Provider::S3,
            endpoint: server.endpoint.clone(),
            region: String::new(),
            bucket: "media".into(),
            prefix: String::new(),
            path_style: true,
        };
        Destination::new(&config, Some(server.credential_json().as_bytes())).unwrap()
    }

    /// A 17 MiB recording (three parts at the default 8 MiB) and its job.
    async fn job_with_recording(dir: &std::path::Path, jobs: &JobStore) -> (Job, ObjectInfo) {
        let data: Vec<u8> = (0..17 * MIB).map(|i| (i * 13 % 251) as u8).collect();
        let path = dir.join("backup.bin");
        std::fs::write(&path, &data).unwrap();
        let sha256 = Sha256Digest::of(&data);
        let (job, _) = jobs
            .create_or_get(NewJob {
                job_id: JobId::new_random(),
                tenant_id: TenantId::parse("t1").unwrap(),
                recording_id: RecordingId::parse("rec-1").unwrap(),
                destination_id: DestinationId::parse("dest-1").unwrap(),
                file_name: FileName::parse("call.mp4").unwrap(),
                content_type: ContentType::parse("video/mp4").unwrap(),
                backup_path: path,
                sha256,
                size: data.len() as u64,
                stored_sha256: None,
                request_id: None,
            })
            .await
            .unwrap();
        let object = ObjectInfo {
            name: "call.mp4".into(),
            size: data.len() as u64,
            sha256: *sha256.as_bytes(),
            crc32: crc32fast::hash(&data),
            content_type: "video/mp4".into(),
        };
        (job, object)
    }

    async fn file_source(job: &Job) -> Arc<dyn Source> {
        use crate::destination::FileSource;
        Arc::new(FileSource::open(&job.backup_path).await.unwrap())
    }

    fn stored_upload_id(db: &std::path::Path, job_id: JobId) -> Option<String> {
        let conn =
            rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
                .unwrap();
        conn.query_row(
            "SELECT multipart_upload_id FROM jobs WHERE job_id = ?1",
            [job_id.to_string()],
            |r| r.get(0),
        )
        .unwrap()
    }

    /// The worker's hook commits the upload id before any part is sent. The
    /// job store is made slow on purpose: when CreateMultipartUpload arrives,
    /// another connection takes SQLite's write lock for 400 ms, so the
    /// commit cannot happen before then. Each UploadPart, as the server sees
    /// it arrive, is checked against the database read through a separate
    /// connection (what a restarted process would read): the id must already
    /// be committed. A hook that is not awaited (the id persisted in the
    /// background, as before) would let the parts through during those 400 ms.
    /// Which failures are waited out, which have the small budget, and
    /// which retain at once: what an operator's outage costs depends on it.
    #[test]
    fn delivery_errors_are_classed_for_the_retry_policy() {
        use crate::destination::ProbeStep;
        let provider = |status: Option<u16>, code: &str| {
            let (permanent, step, hint) = crate::destination::classify_provider(status, Some(code));
            DeliveryError::Provider {
                location: "s3://b/k".into(),
                operation: "PutObject",
                status,
                code: Some(code.into()),
                message: None,
                permanent,
                step,
                hint,
            }
        };
        let connection = DeliveryError::Connection {
            location: "s3://b/k".into(),
            operation: "PutObject",
            step: ProbeStep::Connect,
            message: "connection refused".into(),
            hint: "",
        };
        let verification = DeliveryError::Verification {
            location: "s3://b/k".into(),
            detail: "size differs".into(),
        };
        for (error, class) in [
            (connection, FailureClass::Transient),
            (
                provider(Some(503), "ServiceUnavailable"),
                FailureClass::Transient,
            ),
            (provider(Some(503), "SlowDown"), FailureClass::Transient),
            (provider(Some(500), "WeirdNewCode"), FailureClass::Transient),
            (provider(Some(400), "BadDigest"), FailureClass::Doubtful),
            (provider(Some(404), "NoSuchUpload"), FailureClass::Doubtful),
            (verification, FailureClass::Doubtful),
            (
                provider(Some(403), "SignatureDoesNotMatch"),
                FailureClass::Permanent,
            ),
            (provider(Some(404), "NoSuchBucket"), FailureClass::Permanent),
        ] {
            assert_eq!(delivery_class(&error), class, "{error}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn upload_id_is_committed_before_the_first_part() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("jobs.db");
        let jobs = JobStore::open(&db).unwrap();
        let (job, object) = job_with_recording(dir.path(), &jobs).await;
        let job_id = job.job_id;

        let released: Arc<Mutex<Option<Instant>>> = Arc::default();
        let seen: Arc<Mutex<PartsSeen>> = Arc::default();
        let hook = {
            let (db, released, seen) = (db.clone(), released.clone(), seen.clone());
            move |request: &RecordedRequest| match request.operation.as_str() {
                "CreateMultipartUpload" => {
                    let (locked_tx, locked_rx) = std::sync::mpsc::channel();
                    let (db, released) = (db.clone(), released.clone());
                    std::thread::spawn(move || {
                        let conn = rusqlite::Connection::open(&db).unwrap();
                        conn.execute_batch("BEGIN IMMEDIATE").unwrap();
                        locked_tx.send(()).unwrap();
                        std::thread::sleep(Duration::from_millis(400));
                        *released.lock().unwrap() = Some(Instant::now());
                        conn.execute_batch("COMMIT").unwrap();
                    });
                    locked_rx.recv().unwrap();
                }
                "UploadPart" => {
                    let id = request.query_param("uploadId").unwrap().to_owned();
                    let stored = stored_upload_id(&db, job_id);
                    seen.lock().unwrap().push((Instant::now(), id, stored));
                }
                _ => {}
            }
        };
        let server = S3Server::start_with(S3ServerOptions {
            on_request: Some(RequestHook(Arc::new(hook))),
            ..S3ServerOptions::default()
        })
        .await;
        server.create_bucket("media");

        let recorded: RecordedUpload = Arc::default();
        let on_started = record_upload_id(jobs.clone(), job_id, recorded.clone());
        let hooks = DeliveryHooks {
            on_multipart_started: &on_started,
            ..DeliveryHooks::default()
        };
        let destination = s3_destination(&server);
        destination
            .deliver(file_source(&job).await, &object, &hooks)
            .await
            .unwrap();

        let upload_id = server.requests_of("UploadPart")[0]
            .query_param("uploadId")
            .unwrap()
            .to_owned();
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 3, "{seen:?}");
        let released = released.lock().unwrap().unwrap();
        for (arrived, id, stored) in &seen {
            assert_eq!(id, &upload_id);
            assert_eq!(stored.as_deref(), Some(upload_id.as_str()));
            assert!(
                *arrived > released,
                "a part arrived while the store was locked"
            );
        }
        assert_eq!(
            recorded.lock().unwrap().as_deref(),
            Some(upload_id.as_str())
        );
        let history = jobs.history(job_id).await.unwrap();
        assert!(
            history.iter().any(|e| e
                .message
                .starts_with(&format!("multipart upload {upload_id} started"))),
            "{history:?}"
        );
    }

    /// A delivery whose source read failed authentication (InvalidData, the
    /// backup was modified) marks the backup corrupt: the failure is
    /// permanent, names the backup, and the job is never claimed again, not
    /// even if it were set to retry.
    #[tokio::test]
    async fn backup_that_fails_authentication_is_marked_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let jobs = JobStore::open(dir.path().join("jobs.db")).unwrap();
        let (job, _) = job_with_recording(dir.path(), &jobs).await;
        let claimed = jobs.claim_due(OffsetDateTime::now_utc(), 1).await.unwrap();
        assert_eq!(claimed.len(), 1);

        let read = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "segment 3 does not authenticate",
        );
        let failure =
            delivery_failure(&jobs, &claimed[0], DeliveryError::from_source_read(read)).await;
        assert_eq!(failure.class, FailureClass::Permanent, "{failure:?}");
        assert!(
            failure
                .message
                .contains(&job.backup_path.display().to_string())
                && failure.message.contains("segment 3 does not authenticate"),
            "{failure:?}"
        );
        let marked = jobs.get(job.job_id).await.unwrap();
        assert!(marked.backup_corrupt, "{marked:?}");

        jobs.mark_retry(
            job.job_id,
            failure.message,
            OffsetDateTime::now_utc(),
            false,
        )
        .await
        .unwrap();
        let again = jobs
            .claim_due(OffsetDateTime::now_utc() + Duration::from_secs(60), 1)
            .await
            .unwrap();
        assert!(again.is_empty(), "{again:?}");
    }

    /// Any other read error of our own backup may be permanent (a failing
    /// volume): retried on the small budget, and the backup is left alone.
    #[tokio::test]
    async fn other_source_read_errors_are_doubtful() {
        let dir = tempfile::tempdir().unwrap();
        let jobs = JobStore::open(dir.path().join("jobs.db")).unwrap();
        let (job, _) = job_with_recording(dir.path(), &jobs).await;
        let read = std::io::Error::other("I/O error on the backup volume");
        let failure = delivery_failure(&jobs, &job, DeliveryError::from_source_read(read)).await;
        assert_eq!(failure.class, FailureClass::Doubtful, "{failure:?}");
        assert!(!jobs.get(job.job_id).await.unwrap().backup_corrupt);
    }

    /// An id that cannot be committed (here: the job row is gone) fails the
    /// hook: the new upload is aborted, no part is sent, and the attempt's
    /// error is transient.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn upload_id_that_cannot_be_committed_aborts_the_upload() {
        let dir = tempfile::tempdir().unwrap();
        let jobs = JobStore::open(dir.path().join("jobs.db")).unwrap();
        let (job, object) = job_with_recording(dir.path(), &jobs).await;
        let server = S3Server::start().await;
        server.create_bucket("media");

        let on_started = record_upload_id(jobs.clone(), JobId::new_random(), Arc::default());
        let hooks = DeliveryHooks {
            on_multipart_started: &on_started,
            ..DeliveryHooks::default()
        };
        let err = s3_destination(&server)
            .deliver(file_source(&job).await, &object, &hooks)
            .await
            .unwrap_err();
        assert!(matches!(err, DeliveryError::Hook { .. }), "{err:?}");
        assert!(!err.is_permanent());
        let created = server.requests_of("CreateMultipartUpload");
        assert_eq!(created.len(), 1);
        let aborted = server.requests_of("AbortMultipartUpload");
        assert_eq!(aborted.len(), 1);
        assert!(server.requests_of("UploadPart").is_empty());
        let id = aborted[0].query_param("uploadId").unwrap();
        assert!(!server.root().join(format!(".upload-{id}.json")).exists());
    }
}
