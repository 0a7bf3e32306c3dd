//! `Jobs`: see, follow and re-send deliveries, and fetch a retained
//! recording back with its SHA-256.

use std::{pin::Pin, sync::Arc};

use futures_util::Stream;
use recvault_proto::uploader::v1 as pb;
use tokio::{
    io::{AsyncRead, AsyncReadExt},
    sync::broadcast::error::RecvError,
};
use tonic::{Request, Response, Status};

use recvault_runtime::policy::{Role, TenantScope};

use super::{Call, Shared, Subject};
use crate::datakey::OpenError;
use crate::destination::{Destination, Provider, object_key};
use crate::jobs::{
    DestinationId, Job, JobFilter, JobId, JobState, ReleasedUpload, Resend, TenantId,
    check_transition,
};

/// FetchBackup chunk size (well under the 4 MiB gRPC message default).
const FETCH_CHUNK: usize = 1024 * 1024;

#[derive(Debug, Clone)]
pub struct JobsService {
    shared: Arc<Shared>,
}

impl JobsService {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    /// Before a job moves to another destination: the multipart upload it
    /// still records at its current one (an attempt failed permanently and
    /// could not abort it, or the uploader stopped) is aborted there now,
    /// with that destination's own credential, so it is neither orphaned
    /// (its parts are billed) nor blocking the resend. `None` when there is
    /// none, or when the job may not be resent now (the store refuses that
    /// with the reason; a running attempt's upload is never touched).
    ///
    /// An abort that failed for a transient reason (the provider busy or
    /// unreachable) refuses the resend with UNAVAILABLE and keeps the id, as
    /// does a vault that refused (FAILED_PRECONDITION) or could not be reached
    /// (UNAVAILABLE) to lease the credential. When the provider refused the
    /// abort permanently (access denied, e.g. the customer revoked the
    /// credential's access, or no such bucket), or the destination was
    /// deleted, retrying cannot help and refusing would leave the job stuck:
    /// the id is given up, and the job's history and the log say where the
    /// upload is (the bucket's AbortIncompleteMultipartUpload lifecycle rule
    /// is the safety net).
    async fn release_open_upload(&self, job: &Job) -> Result<Option<ReleasedUpload>, Status> {
        let Some(upload_id) = job.multipart_upload_id.clone() else {
            return Ok(None);
        };
        if check_transition(job.state, JobState::Stored).is_err()
            || job.backup_deleted
            || job.backup_corrupt
        {
            return Ok(None);
        }
        let old = job.destination_id.as_str();
        // Parked first, in its own transaction: a RETRYING job is no longer
        // due, so no replica's retry claims it and resumes the upload while
        // it is aborted here. It stays RETAINED if the abort fails.
        let job = &self
            .shared
            .jobs
            .park_for_resend(
                job.job_id,
                format!(
                    "its multipart upload {upload_id} at destination {old} is aborted before it \
                     is resent elsewhere"
                ),
            )
            .await?;
        if job.multipart_upload_id.as_deref() != Some(upload_id.as_str()) {
            return Ok(None);
        }
        let record = self
            .shared
            .destinations
            .get_async(old)
            .await
            .map_err(|e| Status::unavailable(format!("destination store: {e}")))?;
        // The key the upload was started under is stored beside its id: a
        // prefix changed since then does not change where the upload is.
        let key = |prefix: &str| {
            job.multipart_upload_key
                .clone()
                .or_else(|| job.object_key.clone())
                .or_else(|| object_key(prefix, job.file_name.as_str()).ok())
                .unwrap_or_else(|| job.file_name.to_string())
        };
        let Some(record) = record else {
            let key = key("");
            tracing::warn!(job_id = %job.job_id, destination_id = old, %upload_id, %key, "the job's destination was deleted, so its open multipart upload cannot be aborted by the uploader; abort it in the bucket or rely on an AbortIncompleteMultipartUpload lifecycle rule");
            return Ok(Some(ReleasedUpload {
                message: format!(
                    "multipart upload {upload_id} (key {key:?}) at destination {old} given up: that \
                     destination was deleted, so the uploader cannot abort it; abort it in its \
                     bucket, or let an AbortIncompleteMultipartUpload lifecycle rule remove it"
                ),
                upload_id,
            }));
        };
        let key = key(&record.config.prefix);
        let still_open = |detail: String, permanent: bool| {
            let message = format!(
                "job {}: multipart upload {upload_id} at its current destination {old} (key \
                 {key:?}) is still open and could not be aborted: {detail}. Its id is kept so the \
                 upload is not orphaned; fix that and resend again, or resend it to its current \
                 destination (empty destination_id), which resumes the upload",
                job.job_id
            );
            if permanent {
                Status::failed_precondition(message)
            } else {
                Status::unavailable(message)
            }
        };
        let request_id = job
            .request_id
            .clone()
            .unwrap_or_else(|| job.job_id.to_string());
        let lease = match record.config.provider {
            Provider::Fs => None,
            _ => Some(
                self.shared
                    .vault
                    .acquire(
                        &record.credential_id,
                        &format!("abort the multipart upload of job {}", job.job_id),
                        &request_id,
                    )
                    .await
                    .map_err(|e| still_open(e.to_string(), e.is_permanent()))?,
            ),
        };
        let aborted = match Destination::with_options(
            &record.config,
            lease.as_ref().map(|l| l.secret()),
            self.shared.s3.clone(),
            &self.shared.fs_roots,
        ) {
            Ok(destination) => destination.abort_multipart(&key, &upload_id).await,
            Err(e) => Err(e),
        };
        if let Some(lease) = lease {
            lease.release().await;
        }
        match aborted {
            Ok(()) => {}
            Err(e) if e.is_permanent() => {
                let bucket = &record.config.bucket;
                tracing::warn!(job_id = %job.job_id, destination_id = old, %upload_id, %key, %bucket, error = %e, "the job's open multipart upload could not be aborted and retrying cannot help; its id is given up so the job can be resent; abort it in the bucket or rely on an AbortIncompleteMultipartUpload lifecycle rule");
                return Ok(Some(ReleasedUpload {
                    message: format!(
                        "multipart upload {upload_id} (key {key:?}) in bucket {bucket:?} at \
                         destination {old} given up: the abort was refused ({e}), so the \
                         uploader cannot abort it; abort it in that bucket, or let an \
                         AbortIncompleteMultipartUpload lifecycle rule remove it"
                    ),
                    upload_id,
                }));
            }
            Err(e) => return Err(still_open(e.to_string(), false)),
        }
        tracing::info!(job_id = %job.job_id, destination_id = old, %upload_id, "aborted the job's open multipart upload before resending it elsewhere");
        Ok(Some(ReleasedUpload {
            message: format!(
                "multipart upload {upload_id} at destination {old} aborted before the resend"
            ),
            upload_id,
        }))
    }
}

/// Reads until `buf` is full or the reader ends; returns the bytes read.
async fn fill(reader: &mut (impl AsyncRead + Unpin), buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match reader.read(&mut buf[n..]).await? {
            0 => break,
            m => n += m,
        }
    }
    Ok(n)
}

fn job_id(value: &str) -> Result<JobId, Status> {
    JobId::parse(value).map_err(|e| Status::invalid_argument(format!("job_id: {}", e.problem())))
}

type Stream_<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The handlers; the trait methods below take the call, run these and audit the result.
impl JobsService {
    async fn get_job_inner(
        &self,
        call: &Call,
        subject: &mut Subject,
        request: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let job = self
            .shared
            .visible_job(call, job_id(&request.get_ref().job_id)?, subject)
            .await?;
        Ok(Response::new(job.to_proto()))
    }

    async fn list_jobs_inner(
        &self,
        call: &Call,
        subject: &mut Subject,
        request: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        subject.tenant_id = request.get_ref().tenant_id.clone();
        let scope = self.shared.require_role(call, Role::Manager)?;
        let r = request.into_inner();
        let tenant_id = match r.tenant_id.as_str() {
            "" => None,
            t => {
                let tenant = TenantId::parse(t)
                    .map_err(|e| Status::invalid_argument(format!("tenant_id: {}", e.problem())))?;
                self.shared
                    .require_tenant(call, Role::Manager, tenant.as_str())?;
                Some(tenant)
            }
        };
        let state = match pb::JobState::try_from(r.state) {
            Ok(pb::JobState::Unspecified) => None,
            Ok(s) => JobState::from_proto(s),
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "state {} is not a JobState",
                    r.state
                )));
            }
        };
        let limit = if r.limit == 0 { 1000 } else { r.limit };
        // No tenant named: every tenant the caller may see (all, or each of
        // its tenants, newest first across them).
        let tenants = match (tenant_id, scope) {
            (Some(t), _) => vec![Some(t)],
            (None, TenantScope::All) => vec![None],
            (None, TenantScope::Only(set)) => set
                .into_iter()
                .filter_map(|t| TenantId::parse(t).ok())
                .map(Some)
                .collect(),
        };
        let mut jobs = Vec::new();
        for tenant_id in tenants {
            jobs.extend(
                self.shared
                    .jobs
                    .list(JobFilter {
                        tenant_id,
                        state,
                        limit,
                    })
                    .await?,
            );
        }
        jobs.sort_by_key(|j| std::cmp::Reverse(j.created_at));
        jobs.truncate(usize::try_from(limit.min(1000)).unwrap_or(1000));
        Ok(Response::new(pb::ListJobsResponse {
            jobs: jobs.iter().map(|j| j.to_proto()).collect(),
        }))
    }

    async fn watch_job_inner(
        &self,
        call: &Call,
        subject: &mut Subject,
        request: Request<pb::WatchJobRequest>,
    ) -> Result<Response<<Self as pb::jobs_server::Jobs>::WatchJobStream>, Status> {
        let id = job_id(&request.get_ref().job_id)?;
        // Subscribe before reading the current state so no change is missed.
        let mut changes = self.shared.jobs.subscribe();
        let current = self.shared.visible_job(call, id, subject).await?;
        let jobs = self.shared.jobs.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            let settled = current.state.is_settled();
            if tx.send(Ok(current.to_proto())).await.is_err() || settled {
                return;
            }
            loop {
                let job = match changes.recv().await {
                    Ok(job) if job.job_id == id => job,
                    Ok(_) => continue,
                    // Fell behind: re-read the job itself.
                    Err(RecvError::Lagged(_)) => match jobs.get(id).await {
                        Ok(job) => job,
                        Err(e) => {
                            let _ = tx.send(Err(e.into())).await;
                            return;
                        }
                    },
                    Err(RecvError::Closed) => return,
                };
                let settled = job.state.is_settled();
                if tx.send(Ok(job.to_proto())).await.is_err() || settled {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn resend_job_inner(
        &self,
        call: &Call,
        subject: &mut Subject,
        request: Request<pb::ResendJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let r = request.into_inner();
        let id = job_id(&r.job_id)?;
        let job = self.shared.visible_job(call, id, subject).await?;
        let resend = match r.destination_id.as_str() {
            "" => Resend::default(),
            d => {
                let record = self
                    .shared
                    .destinations
                    .get_async(d)
                    .await
                    .map_err(|e| Status::unavailable(format!("destination store: {e}")))?;
                let Some(record) = record.filter(|rec| rec.tenant_id == job.tenant_id.as_str())
                else {
                    return Err(Status::failed_precondition(format!(
                        "destination_id {d:?} is not a destination of tenant {}",
                        job.tenant_id
                    )));
                };
                let destination = DestinationId::parse(d).map_err(|e| {
                    Status::invalid_argument(format!("destination_id: {}", e.problem()))
                })?;
                // The key there, checked against the other recordings there in
                // the transaction that moves the job (FAILED_PRECONDITION if
                // taken). An unusable prefix is left to the attempt to report.
                let key = record.object_key(job.file_name.as_str());
                let released_upload = if destination == job.destination_id {
                    None
                } else {
                    // Refuse a taken key before touching the old upload.
                    if let Some(key) = &key {
                        self.shared
                            .jobs
                            .check_key_free(id, destination.clone(), key.clone())
                            .await?;
                    }
                    self.release_open_upload(&job).await?
                };
                Resend {
                    destination: Some(destination),
                    object_key: key,
                    released_upload,
                }
            }
        };
        if !job.backup_deleted && !job.backup_corrupt {
            let present = self
                .shared
                .backups
                .exists(&job.backup_path)
                .await
                .map_err(|e| Status::unavailable(format!("job {id}: backup store: {e}")))?;
            if !present {
                return Err(Status::failed_precondition(format!(
                    "job {id}: its backup {} is missing from the backup store; nothing can be \
                     resent",
                    job.backup_path.display()
                )));
            }
        }
        let job = self.shared.jobs.resend_to(id, resend).await?;
        self.shared.wake.notify_one();
        Ok(Response::new(job.to_proto()))
    }

    async fn get_job_history_inner(
        &self,
        call: &Call,
        subject: &mut Subject,
        request: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::JobHistory>, Status> {
        let id = job_id(&request.get_ref().job_id)?;
        self.shared.visible_job(call, id, subject).await?;
        let events = self.shared.jobs.history(id).await?;
        Ok(Response::new(pb::JobHistory {
            job_id: id.to_string(),
            events: events
                .into_iter()
                .map(|e| pb::JobEvent {
                    time: Some(prost_types::Timestamp {
                        seconds: e.time.unix_timestamp(),
                        nanos: i32::try_from(e.time.nanosecond()).unwrap_or(0),
                    }),
                    state: e.state.to_proto().into(),
                    message: e.message,
                    replica: e.replica,
                })
                .collect(),
        }))
    }

    async fn fetch_backup_inner(
        &self,
        call: &Call,
        subject: &mut Subject,
        request: Request<pb::FetchBackupRequest>,
    ) -> Result<Response<<Self as pb::jobs_server::Jobs>::FetchBackupStream>, Status> {
        let request_id = call.request_id.clone();
        let job = self
            .shared
            .visible_job(call, job_id(&request.get_ref().job_id)?, subject)
            .await?;
        if job.backup_deleted {
            return Err(Status::failed_precondition(format!(
                "job {} was delivered and its backup deleted; fetch it from {}",
                job.job_id,
                job.location.as_deref().unwrap_or("the destination")
            )));
        }
        // Decrypts while streaming: the data key is unwrapped first (a vault
        // that is down refuses the call at once); a segment that does not
        // authenticate ends the stream with DATA_LOSS and marks the backup.
        let reader = match crate::datakey::open_backup(
            &self.shared.backups,
            &self.shared.vault,
            &job,
            "fetch-backup",
            &request_id,
        )
        .await
        {
            Ok(reader) => reader,
            Err(e) => {
                if let OpenError::Corrupt(detail) = &e {
                    let _ = self
                        .shared
                        .jobs
                        .mark_backup_corrupt(job.job_id, detail.clone())
                        .await;
                }
                return Err(e.into_status(job.job_id));
            }
        };
        let source = reader.source();
        let mut plaintext = source.open_range(0, source.size()).await.map_err(|e| {
            Status::data_loss(format!("backup of job {} cannot be read: {e}", job.job_id))
        })?;
        let jobs = self.shared.jobs.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            use sha2::Digest;
            let mut sha = sha2::Sha256::new();
            let mut buf = vec![0u8; FETCH_CHUNK];
            loop {
                let n = match fill(&mut plaintext, &mut buf).await {
                    Ok(n) => n,
                    Err(e) => {
                        let detail = format!("reading the backup failed: {e}");
                        if e.kind() == std::io::ErrorKind::InvalidData {
                            let _ = jobs.mark_backup_corrupt(job.job_id, detail.clone()).await;
                        }
                        let _ = tx.send(Err(Status::data_loss(detail))).await;
                        return;
                    }
                };
                if n == 0 {
                    break;
                }
                sha.update(&buf[..n]);
                let chunk = pb::FetchBackupResponse {
                    data: buf[..n].to_vec(),
                    crc32: crc32fast::hash(&buf[..n]),
                    sha256: Vec::new(),
                };
                if tx.send(Ok(chunk)).await.is_err() {
                    return;
                }
            }
            let digest: [u8; 32] = sha.finalize().into();
            if digest != *job.sha256.as_bytes() {
                let detail = format!(
                    "backup of job {} no longer matches its SHA-256 {} (read {})",
                    job.job_id,
                    job.sha256,
                    hex::encode(digest)
                );
                let _ = jobs.mark_backup_corrupt(job.job_id, detail.clone()).await;
                let _ = tx.send(Err(Status::data_loss(detail))).await;
                return;
            }
            let _ = tx
                .send(Ok(pb::FetchBackupResponse {
                    data: Vec::new(),
                    crc32: 0,
                    sha256: digest.to_vec(),
                }))
                .await;
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

#[tonic::async_trait]
impl pb::jobs_server::Jobs for JobsService {
    type WatchJobStream = Stream_<pb::Job>;
    type FetchBackupStream = Stream_<pb::FetchBackupResponse>;

    async fn get_job(
        &self,
        request: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let call = self
            .shared
            .call(&request, "recvault.uploader.v1.Jobs/GetJob");
        let mut subject = Subject::default();
        let result = self.get_job_inner(&call, &mut subject, request).await;
        self.shared.finish(&call, subject, result).await
    }

    async fn list_jobs(
        &self,
        request: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let call = self
            .shared
            .call(&request, "recvault.uploader.v1.Jobs/ListJobs");
        let mut subject = Subject::default();
        let result = self.list_jobs_inner(&call, &mut subject, request).await;
        self.shared.finish(&call, subject, result).await
    }

    async fn watch_job(
        &self,
        request: Request<pb::WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let call = self
            .shared
            .call(&request, "recvault.uploader.v1.Jobs/WatchJob");
        let mut subject = Subject::default();
        let result = self.watch_job_inner(&call, &mut subject, request).await;
        self.shared.finish(&call, subject, result).await
    }

    async fn resend_job(
        &self,
        request: Request<pb::ResendJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let call = self
            .shared
            .call(&request, "recvault.uploader.v1.Jobs/ResendJob");
        let mut subject = Subject::default();
        let result = self.resend_job_inner(&call, &mut subject, request).await;
        self.shared.finish(&call, subject, result).await
    }

    async fn get_job_history(
        &self,
        request: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::JobHistory>, Status> {
        let call = self
            .shared
            .call(&request, "recvault.uploader.v1.Jobs/GetJobHistory");
        let mut subject = Subject::default();
        let result = self
            .get_job_history_inner(&call, &mut subject, request)
            .await;
        self.shared.finish(&call, subject, result).await
    }

    async fn fetch_backup(
        &self,
        request: Request<pb::FetchBackupRequest>,
    ) -> Result<Response<Self::FetchBackupStream>, Status> {
        let call = self
            .shared
            .call(&request, "recvault.uploader.v1.Jobs/FetchBackup");
        let mut subject = Subject::default();
        let result = self.fetch_backup_inner(&call, &mut subject, request).await;
        self.shared.finish(&call, subject, result).await
    }
}
