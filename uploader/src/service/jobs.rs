//! `Jobs`: see, follow and re-send deliveries, and fetch a retained
//! recording back with its SHA-256.

use std::{pin::Pin, sync::Arc};

use futures_util::Stream;
use recvault_proto::uploader::v1 as pb;
use tokio::{io::AsyncReadExt, sync::broadcast::error::RecvError};
use tonic::{Request, Response, Status};

use super::{Role, Shared};
use crate::destination::object_key;
use crate::jobs::{DestinationId, JobFilter, JobId, JobState, Resend, TenantId};

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
}

fn job_id(value: &str) -> Result<JobId, Status> {
    JobId::parse(value).map_err(|e| Status::invalid_argument(format!("job_id: {}", e.problem())))
}

type Stream_<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl pb::jobs_server::Jobs for JobsService {
    type WatchJobStream = Stream_<pb::Job>;
    type FetchBackupStream = Stream_<pb::FetchBackupResponse>;

    async fn get_job(
        &self,
        request: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        self.shared.authorize(&request, Role::Manager)?;
        let job = self
            .shared
            .jobs
            .get(job_id(&request.get_ref().job_id)?)
            .await?;
        Ok(Response::new(job.to_proto()))
    }

    async fn list_jobs(
        &self,
        request: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        self.shared.authorize(&request, Role::Manager)?;
        let r = request.into_inner();
        let tenant_id = match r.tenant_id.as_str() {
            "" => None,
            t => Some(
                TenantId::parse(t)
                    .map_err(|e| Status::invalid_argument(format!("tenant_id: {}", e.problem())))?,
            ),
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
        let jobs = self
            .shared
            .jobs
            .list(JobFilter {
                tenant_id,
                state,
                limit: if r.limit == 0 { 1000 } else { r.limit },
            })
            .await?;
        Ok(Response::new(pb::ListJobsResponse {
            jobs: jobs.iter().map(|j| j.to_proto()).collect(),
        }))
    }

    async fn watch_job(
        &self,
        request: Request<pb::WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        self.shared.authorize(&request, Role::Manager)?;
        let id = job_id(&request.get_ref().job_id)?;
        // Subscribe before reading the current state so no change is missed.
        let mut changes = self.shared.jobs.subscribe();
        let current = self.shared.jobs.get(id).await?;
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

    async fn resend_job(
        &self,
        request: Request<pb::ResendJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        self.shared.authorize(&request, Role::Manager)?;
        let r = request.into_inner();
        let id = job_id(&r.job_id)?;
        let resend = match r.destination_id.as_str() {
            "" => Resend::default(),
            d => {
                let job = self.shared.jobs.get(id).await?;
                let record = self
                    .shared
                    .destinations
                    .get(d)
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
                Resend {
                    destination: Some(destination),
                    object_key: object_key(&record.config.prefix, job.file_name.as_str()).ok(),
                }
            }
        };
        let job = self.shared.jobs.resend_to(id, resend).await?;
        self.shared.wake.notify_one();
        Ok(Response::new(job.to_proto()))
    }

    async fn get_job_history(
        &self,
        request: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::JobHistory>, Status> {
        self.shared.authorize(&request, Role::Manager)?;
        let id = job_id(&request.get_ref().job_id)?;
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
                })
                .collect(),
        }))
    }

    async fn fetch_backup(
        &self,
        request: Request<pb::FetchBackupRequest>,
    ) -> Result<Response<Self::FetchBackupStream>, Status> {
        self.shared.authorize(&request, Role::Manager)?;
        let job = self
            .shared
            .jobs
            .get(job_id(&request.get_ref().job_id)?)
            .await?;
        if job.backup_deleted {
            return Err(Status::failed_precondition(format!(
                "job {} was delivered and its backup deleted; fetch it from {}",
                job.job_id,
                job.location.as_deref().unwrap_or("the destination")
            )));
        }
        let mut file = self
            .shared
            .backups
            .open_read(&job.backup_path)
            .await
            .map_err(|e| {
                Status::data_loss(format!("backup of job {} cannot be read: {e}", job.job_id))
            })?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            use sha2::Digest;
            let mut sha = sha2::Sha256::new();
            let mut buf = vec![0u8; FETCH_CHUNK];
            loop {
                let n = match file.read(&mut buf).await {
                    Ok(n) => n,
                    Err(e) => {
                        let _ = tx
                            .send(Err(Status::data_loss(format!(
                                "reading the backup failed: {e}"
                            ))))
                            .await;
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
                let _ = tx
                    .send(Err(Status::data_loss(format!(
                        "backup of job {} no longer matches its SHA-256 {} (read {})",
                        job.job_id,
                        job.sha256,
                        hex::encode(digest)
                    ))))
                    .await;
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
