//! `Recordings/Upload`: the ingest stream. Answers only once the recording is
//! durable in the backup store and its job is committed.

use std::sync::Arc;

use futures_util::StreamExt;
use recvault_proto::uploader::v1::{
    UploadHeader, UploadRequest, UploadResponse, recordings_server, upload_request::Part,
};
use tonic::{Request, Response, Status, Streaming};

use recvault_runtime::policy::Role;

use super::{Call, Shared, Subject};
use crate::destination_store::DestinationRecord;
use crate::ingest;
use crate::jobs::ObjectKey;
use crate::jobs::{DestinationId, FileName, RecordingId, TenantId};

#[derive(Debug, Clone)]
pub struct RecordingsService {
    shared: Arc<Shared>,
}

impl RecordingsService {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    /// The key `destination` would write this recording under, once checked
    /// that no other recording holds it there (FAILED_PRECONDITION otherwise).
    /// `None` when a header field is invalid or the key cannot be formed:
    /// `ingest::receive` refuses the former, the first attempt the latter.
    async fn check_name(
        &self,
        header: &UploadHeader,
        destination: &DestinationRecord,
    ) -> Result<Option<ObjectKey>, Status> {
        let parsed = (
            TenantId::parse(header.tenant_id.clone()),
            RecordingId::parse(header.recording_id.clone()),
            FileName::parse(header.file_name.clone()),
            DestinationId::parse(header.destination_id.clone()),
        );
        let (Ok(tenant_id), Ok(recording_id), Ok(file_name), Ok(destination_id)) = parsed else {
            return Ok(None);
        };
        let Some(key) = destination.object_key(file_name.as_str()) else {
            return Ok(None);
        };
        self.shared
            .jobs
            .check_object_key(
                tenant_id,
                recording_id,
                file_name,
                destination_id,
                key.clone(),
            )
            .await?;
        Ok(Some(key))
    }

    /// The Upload call once the caller holds the recorder role.
    async fn ingest(
        &self,
        call: &Call,
        subject: &mut Subject,
        request: Request<Streaming<UploadRequest>>,
    ) -> Result<Response<UploadResponse>, Status> {
        let request_id = call.request_id.clone();
        let mut stream = request.into_inner();
        // Check the destination, and that no other recording uses the file
        // name there, before taking any bytes, so a refusal comes at once
        // and nothing is stored.
        let limits = &self.shared.ingest_limits;
        let first = ingest::next_message(&mut stream, limits, 0)
            .await?
            .ok_or_else(|| {
                Status::invalid_argument("empty stream: send an UploadHeader first")
            })??;
        let mut object_key = None;
        if let Some(Part::Header(header)) = &first.part {
            subject.tenant_id = header.tenant_id.clone();
            subject.recording_id = header.recording_id.clone();
            subject.destination_id = header.destination_id.clone();
            // The tenant the recorder names must be one of its own.
            self.shared
                .require_tenant(call, Role::Recorder, &header.tenant_id)?;
            let destination = self
                .shared
                .destinations
                .get_async(&header.destination_id)
                .await
                .map_err(|e| Status::unavailable(format!("reading destinations: {e}")))?;
            if destination
                .as_ref()
                .is_none_or(|d| d.tenant_id != header.tenant_id)
                && !header.destination_id.is_empty()
            {
                return Err(Status::failed_precondition(format!(
                    "destination_id {:?} is not a destination of tenant {:?}; create it with Destinations/PutDestination",
                    header.destination_id, header.tenant_id
                )));
            }
            if let Some(destination) = destination {
                object_key = self.check_name(header, &destination).await?;
            }
        }
        let rest = futures_util::stream::iter([Ok(first)]).chain(stream);
        let received = ingest::receive(Box::pin(rest), &self.shared.backups, limits).await?;
        let new_job = received.new_job(Some(request_id.clone()));
        let (job, created) = match self
            .shared
            .jobs
            .create_or_get_with_key(new_job, object_key)
            .await
        {
            Ok(r) => r,
            Err(e) => {
                let _ = self.shared.backups.delete(&received.backup.path).await;
                return Err(e.into());
            }
        };
        subject.job_id = job.job_id.to_string();
        subject.detail = format!(
            "{} bytes, sha256 {}{}",
            job.size,
            job.sha256,
            if created {
                ""
            } else {
                ", duplicate of a stored recording"
            }
        );
        if created {
            self.shared.metrics.ingested.inc();
            self.shared.wake.notify_one();
            tracing::info!(job_id = %job.job_id, recording_id = %job.recording_id, size = job.size, %request_id, "recording stored");
        } else {
            // Same recording, same bytes: keep the first copy, drop this one.
            let _ = self.shared.backups.delete(&received.backup.path).await;
        }
        Ok(Response::new(UploadResponse {
            job_id: job.job_id.to_string(),
            sha256: job.sha256.as_bytes().to_vec(),
            size: job.size,
            duplicate: !created,
        }))
    }
}

#[tonic::async_trait]
impl recordings_server::Recordings for RecordingsService {
    async fn upload(
        &self,
        request: Request<Streaming<UploadRequest>>,
    ) -> Result<Response<UploadResponse>, Status> {
        let call = self
            .shared
            .call(&request, "recvault.uploader.v1.Recordings/Upload");
        let mut subject = Subject::default();
        if let Err(denied) = self.shared.require_role(&call, Role::Recorder) {
            return self.shared.finish(&call, subject, Err(denied)).await;
        }
        let result = match request
            .extensions()
            .get::<crate::activity::BodyActivity>()
            .cloned()
        {
            Some(activity) => {
                crate::activity::BODY_ACTIVITY
                    .scope(activity, self.ingest(&call, &mut subject, request))
                    .await
            }
            None => self.ingest(&call, &mut subject, request).await,
        };
        if result.is_err() {
            // Refused after authorization, whatever the reason (destination,
            // name taken, header, CRC-32, SHA-256, cut or idle stream,
            // storage): nothing was stored.
            self.shared.metrics.ingest_rejected.inc();
        }
        self.shared.finish(&call, subject, result).await
    }
}
