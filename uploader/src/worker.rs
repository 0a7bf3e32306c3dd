//! Delivery: claims due jobs and runs one attempt each — re-check the backup's
//! SHA-256, lease the credential, upload with provider-checked checksums,
//! verify, release the lease, and only then delete the backup. Failures
//! retry with backoff or, when permanent, leave the job RETAINED with its
//! backup. Never uploads a backup whose hash changed.

use std::{sync::Arc, time::Duration};

use time::OffsetDateTime;
use tokio::sync::{Notify, Semaphore};

use crate::{
    backup::BackupStore,
    destination::{self, DeliveryHooks, Destination, ObjectInfo, S3Options},
    destination_store::DestinationStore,
    jobs::{Job, JobStore, RetryPolicy, VerifiedBy},
    lease::VaultLeases,
};

/// Why one attempt failed, and whether retrying can help.
#[derive(Debug)]
struct Failure {
    permanent: bool,
    message: String,
}

impl Failure {
    fn permanent(message: impl Into<String>) -> Self {
        Self {
            permanent: true,
            message: message.into(),
        }
    }
    fn transient(message: impl Into<String>) -> Self {
        Self {
            permanent: false,
            message: message.into(),
        }
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
        let result = self.deliver(&job).await;
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
                let next = (!failure.permanent)
                    .then(|| {
                        self.retry
                            .next_attempt_at(job.attempts, OffsetDateTime::now_utc())
                    })
                    .flatten();
                match next {
                    Some(at) => {
                        self.metrics.retries.inc();
                        tracing::warn!(job_id = %job.job_id, error = %failure.message, next_attempt_at = %at, "delivery failed; will retry");
                        self.jobs
                            .mark_retry(job.job_id, failure.message, at)
                            .await
                            .map(|_| ())
                    }
                    None => {
                        let reason = if failure.permanent {
                            failure.message
                        } else {
                            format!(
                                "gave up after {} attempts: {}",
                                job.attempts, failure.message
                            )
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
        if let Err(error) = recorded {
            tracing::error!(job_id = %job.job_id, %error, "recording the attempt's outcome failed");
        }
    }

    async fn deliver(&self, job: &Job) -> Result<(String, VerifiedBy), Failure> {
        let record = self
            .destinations
            .get(job.destination_id.as_str())
            .map_err(|e| Failure::transient(format!("reading destination: {e}")))?
            .ok_or_else(|| {
                Failure::permanent(format!(
                    "destination {} no longer exists; ResendJob with another destination_id",
                    job.destination_id
                ))
            })?;

        // Integrity at rest: never upload bytes that are not what we took in.
        let crate::digest::FileDigest {
            sha256,
            crc32,
            size,
        } = crate::digest::hash_file_async(&job.backup_path)
            .await
            .map_err(|e| {
                Failure::transient(format!(
                    "reading the backup {}: {e}",
                    job.backup_path.display()
                ))
            })?;
        if sha256 != job.sha256 || size != job.size {
            let detail = format!(
                "backup SHA-256 is {sha256} ({size} bytes) but {} ({} bytes) was ingested; not uploading",
                job.sha256, job.size
            );
            let _ = self
                .jobs
                .mark_backup_corrupt(job.job_id, detail.clone())
                .await;
            return Err(Failure::permanent(detail));
        }

        let request_id = job
            .request_id
            .clone()
            .unwrap_or_else(|| job.job_id.to_string());
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
                    .map_err(|e| Failure {
                        permanent: e.is_permanent(),
                        message: e.to_string(),
                    })?,
            ),
        };
        // The client holds what it needs; the lease's plaintext is zeroized
        // and the lease released when `lease` drops, on every path.
        let built = Destination::with_options(
            &record.config,
            lease.as_ref().map(|l| l.secret()),
            self.s3.clone(),
        );
        let destination = built.map_err(|e| Failure {
            permanent: e.is_permanent(),
            message: e.to_string(),
        })?;

        let (upload_ids, mut upload_id_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        let jobs = self.jobs.clone();
        let job_id = job.job_id;
        let persist = tokio::spawn(async move {
            while let Some(id) = upload_id_rx.recv().await {
                if let Err(error) = jobs.set_multipart_upload_id(job_id, Some(id)).await {
                    tracing::error!(%job_id, %error, "saving the multipart upload id failed");
                }
            }
        });
        let progress_jobs = self.jobs.clone();
        let progress_job = job.clone();
        let progress = move |sent: u64| progress_jobs.publish_progress(&progress_job, sent);
        let started_multipart = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let started_flag = started_multipart.clone();
        let on_started = move |id: &str| -> Result<(), destination::HookError> {
            started_flag.store(true, std::sync::atomic::Ordering::Relaxed);
            upload_ids
                .send(id.to_owned())
                .map_err(|e| e.to_string().into())
        };
        let hooks = DeliveryHooks {
            progress: &progress,
            on_multipart_started: &on_started,
            resume_upload_id: job.multipart_upload_id.as_deref(),
        };
        let object = ObjectInfo {
            name: job.file_name.as_str().to_owned(),
            size,
            sha256: *sha256.as_bytes(),
            crc32,
            content_type: job.content_type.as_str().to_owned(),
        };
        let delivered = destination.deliver(&job.backup_path, &object, &hooks).await;
        // Dropping the hook closes the channel, which ends the persisting task.
        drop(on_started);
        let _ = persist.await;
        drop(destination);
        if let Some(lease) = lease {
            lease.release().await;
        }
        if let Err(destination::DeliveryError::Verification { .. }) = &delivered {
            self.metrics.verification_failures.inc();
        }
        let delivery = delivered.map_err(|e| Failure {
            permanent: e.is_permanent(),
            message: e.to_string(),
        })?;
        // A completed multipart upload must not be "resumed" by a later resend.
        if job.multipart_upload_id.is_some()
            || started_multipart.load(std::sync::atomic::Ordering::Relaxed)
        {
            let _ = self.jobs.set_multipart_upload_id(job.job_id, None).await;
        }
        let verified_by = match delivery.verified_by {
            destination::VerifiedBy::ProviderChecksum => VerifiedBy::ProviderChecksum,
            _ => VerifiedBy::ReadBack,
        };
        Ok((delivery.location, verified_by))
    }
}
