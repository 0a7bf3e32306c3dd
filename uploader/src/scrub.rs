//! Periodic scrub (the README's promise that a damaged backup is found): re-hashes every backup still held for
//! an undelivered job and marks the ones whose SHA-256 changed, loudly. An
//! encrypted backup is checked against the SHA-256 of its stored bytes, taken
//! when it was written, so the scrub needs no key and never sees plaintext; a
//! backup in clear (older uploader) against its content SHA-256 and size. It
//! never deletes or repairs a backup; a corrupt backup is kept for inspection.
//! With the object store it also aborts multipart uploads that ingests cut
//! off by a crash left behind (older than `[backup_store].stale_upload_secs`).

use std::future::Future;
use std::time::Duration;

use tokio::time::{Instant, MissedTickBehavior};

use crate::backup::BackupStore;
use crate::jobs::{JobId, JobState, JobStore, JobStoreError};

/// What one pass found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ScrubReport {
    /// Backups re-hashed.
    pub checked: u64,
    /// Backups whose SHA-256 or size changed; their jobs are now marked `backup_corrupt`.
    pub corrupt: u64,
    /// Backups missing from disk although their job still needs them (also marked).
    pub missing: u64,
    /// Backups that could not be read this time (I/O error); tried again next pass.
    pub unreadable: u64,
    /// Objects in the backup store that belong to no job (a crash between the
    /// backup and the job commit, or an ingest finishing right now). Reported, kept.
    pub orphans: u64,
    /// Object store only: multipart uploads of ingests cut off by a crash,
    /// older than `[backup_store].stale_upload_secs`, aborted by this pass.
    pub stale_uploads_aborted: u64,
}

/// Re-hashes the backup of every job that is not delivered and not already
/// known corrupt, one file at a time, and marks mismatches.
pub async fn scrub_once(
    store: &BackupStore,
    jobs: &JobStore,
) -> Result<ScrubReport, JobStoreError> {
    let mut report = ScrubReport::default();
    for job in jobs.scrub_candidates().await? {
        let result = store.rehash(&job.backup_path).await;
        let detail = match result {
            Ok((sha256, size)) => {
                report.checked += 1;
                let intact = match job.stored_sha256 {
                    Some(stored) => sha256 == stored,
                    None => sha256 == job.sha256 && size == job.size,
                };
                if intact {
                    continue;
                }
                let expected = job.stored_sha256.unwrap_or(job.sha256);
                tracing::error!(
                    job_id = %job.job_id,
                    tenant_id = %job.tenant_id,
                    path = %job.backup_path.display(),
                    expected_sha256 = %expected,
                    computed_sha256 = %sha256,
                    stored_bytes = size,
                    "BACKUP CORRUPT: the backup no longer matches the SHA-256 taken when it was stored; it will not be uploaded"
                );
                report.corrupt += 1;
                match job.stored_sha256 {
                    Some(stored) => format!(
                        "the stored file's SHA-256 is now {sha256} over {size} bytes, expected {stored} (taken when it was written)"
                    ),
                    None => format!(
                        "SHA-256 is now {sha256} over {size} bytes, expected {} over {} bytes",
                        job.sha256, job.size
                    ),
                }
            }
            Err(e) if e.is_not_found() => {
                // The worker may have delivered and deleted it since the listing.
                let now = jobs.get(job.job_id).await?;
                if now.state == JobState::Delivered || now.backup_deleted {
                    continue;
                }
                tracing::error!(
                    job_id = %job.job_id,
                    tenant_id = %job.tenant_id,
                    path = %job.backup_path.display(),
                    expected_sha256 = %job.sha256,
                    "BACKUP MISSING: the backup of an undelivered job is gone from the backup store"
                );
                report.missing += 1;
                "the backup file is missing from the backup store".to_owned()
            }
            Err(e) => {
                tracing::warn!(job_id = %job.job_id, error = %e, "scrub could not read a backup; trying again next pass");
                report.unreadable += 1;
                continue;
            }
        };
        jobs.mark_backup_corrupt(job.job_id, detail).await?;
    }
    report.orphans = count_orphans(store, jobs).await?;
    report.stale_uploads_aborted = match store.abort_stale_uploads().await {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(error = %e, "scrub could not look for multipart uploads left by ingests that were cut off");
            0
        }
    };
    Ok(report)
}

async fn count_orphans(store: &BackupStore, jobs: &JobStore) -> Result<u64, JobStoreError> {
    let objects = match store.list_objects().await {
        Ok(objects) => objects,
        Err(e) => {
            tracing::warn!(error = %e, "scrub could not list the backup store");
            return Ok(0);
        }
    };
    let mut orphans = 0;
    for path in objects {
        let job_id = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| JobId::parse(n).ok());
        let known = match job_id {
            Some(id) => match jobs.get(id).await {
                Ok(job) => job.backup_path == path,
                Err(JobStoreError::NotFound(_)) => false,
                Err(e) => return Err(e),
            },
            None => false,
        };
        if !known {
            tracing::warn!(path = %path.display(), "backup object belongs to no job (kept)");
            orphans += 1;
        }
    }
    Ok(orphans)
}

/// Runs [`scrub_once`] every `interval` (first pass one interval after start,
/// so a restart does not re-read every backup at once) until `shutdown` completes.
pub async fn run_scrub_loop(
    store: BackupStore,
    jobs: JobStore,
    interval: Duration,
    shutdown: impl Future<Output = ()>,
) {
    let mut shutdown = std::pin::pin!(shutdown);
    let mut ticker = tokio::time::interval_at(Instant::now() + interval, interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = &mut shutdown => return,
            _ = ticker.tick() => {}
        }
        tokio::select! {
            () = &mut shutdown => return,
            result = scrub_once(&store, &jobs) => match result {
                Ok(r) if r.corrupt > 0 || r.missing > 0 => tracing::error!(
                    checked = r.checked, corrupt = r.corrupt, missing = r.missing,
                    unreadable = r.unreadable, orphans = r.orphans,
                    "scrub found corrupt or missing backups"
                ),
                Ok(r) => tracing::info!(
                    checked = r.checked, unreadable = r.unreadable, orphans = r.orphans,
                    "scrub finished"
                ),
                Err(e) => tracing::error!(error = %e, "scrub failed; trying again next interval"),
            },
        }
    }
}
