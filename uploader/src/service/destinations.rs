//! `Destinations`: where a tenant's recordings go, and a "Test" button
//! (`VerifyDestination`) that writes and deletes a probe object with the real credential.

use std::sync::Arc;

use recvault_proto::uploader::v1 as pb;
use tonic::{Request, Response, Status};

use recvault_runtime::policy::Role;

use super::{Call, Shared, Subject, destination_not_found};
use crate::destination::{Destination, DestinationConfig, Provider, S3Options, check_prefix};

#[derive(Debug, Clone)]
pub struct DestinationsService {
    shared: Arc<Shared>,
}

impl DestinationsService {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

fn unavailable(e: impl std::fmt::Display) -> Status {
    Status::unavailable(format!("destination store: {e}"))
}

fn required(field: &str, value: &str) -> Result<(), Status> {
    if value.trim().is_empty() {
        return Err(Status::invalid_argument(format!("{field} is required")));
    }
    Ok(())
}

/// The handlers; the trait methods below take the call, run these and audit the result.
impl DestinationsService {
    async fn put_destination_inner(
        &self,
        call: &Call,
        subject: &mut Subject,
        request: Request<pb::PutDestinationRequest>,
    ) -> Result<Response<pb::PutDestinationResponse>, Status> {
        self.shared.require_role(call, Role::Manager)?;
        let r = request.into_inner();
        subject.tenant_id = r.tenant_id.clone();
        subject.detail = format!(
            "name {:?}, provider {:?}, bucket {:?}, prefix {:?}",
            r.name, r.provider, r.bucket, r.prefix
        );
        crate::jobs::TenantId::parse(r.tenant_id.clone())
            .map_err(|e| Status::invalid_argument(format!("tenant_id: {}", e.problem())))?;
        self.shared
            .require_tenant(call, Role::Manager, &r.tenant_id)?;
        required("name", &r.name)?;
        let provider: Provider = r.provider.parse().map_err(|_| {
            Status::invalid_argument(format!(
                "provider {:?} is not supported; use \"s3\" or \"fs\"",
                r.provider
            ))
        })?;
        required("bucket", &r.bucket)?;
        if provider == Provider::S3 {
            required(
                "credential_id (a vault credential of kind S3)",
                &r.credential_id,
            )?;
        }
        // For every provider: a prefix that could climb out of its place is refused now.
        check_prefix(&r.prefix)
            .map_err(|e| Status::invalid_argument(format!("prefix {:?}: {e}", r.prefix)))?;
        let config = DestinationConfig {
            provider,
            endpoint: r.endpoint,
            region: r.region,
            bucket: r.bucket,
            prefix: r.prefix,
            path_style: r.path_style,
        };
        // Build it once without a secret where possible, to refuse bad settings now.
        if provider == Provider::Fs {
            Destination::with_options(&config, None, S3Options::default(), &self.shared.fs_roots)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            // The directory must exist and lie inside an allowed root, after
            // symlinks. Every write checks this again.
            let roots = self.shared.fs_roots.clone();
            let bucket = std::path::PathBuf::from(&config.bucket);
            tokio::task::spawn_blocking(move || roots.resolve(&bucket))
                .await
                .map_err(|e| Status::unavailable(format!("checking the bucket directory: {e}")))?
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
        }
        let id = self
            .shared
            .destinations
            .put_async(r.tenant_id, r.name, config, r.credential_id)
            .await
            .map_err(unavailable)?;
        subject.destination_id = id.clone();
        Ok(Response::new(pb::PutDestinationResponse {
            destination_id: id,
        }))
    }

    async fn list_destinations_inner(
        &self,
        call: &Call,
        subject: &mut Subject,
        request: Request<pb::ListDestinationsRequest>,
    ) -> Result<Response<pb::ListDestinationsResponse>, Status> {
        subject.tenant_id = request.get_ref().tenant_id.clone();
        self.shared.require_role(call, Role::Manager)?;
        required("tenant_id", &request.get_ref().tenant_id)?;
        self.shared
            .require_tenant(call, Role::Manager, &request.get_ref().tenant_id)?;
        let list = self
            .shared
            .destinations
            .list_async(&request.get_ref().tenant_id)
            .await
            .map_err(unavailable)?;
        Ok(Response::new(pb::ListDestinationsResponse {
            destinations: list.iter().map(|d| d.to_proto()).collect(),
        }))
    }

    async fn delete_destination_inner(
        &self,
        call: &Call,
        subject: &mut Subject,
        request: Request<pb::DeleteDestinationRequest>,
    ) -> Result<Response<pb::DeleteDestinationResponse>, Status> {
        let id = request.into_inner().destination_id;
        self.shared.visible_destination(call, &id, subject).await?;
        if !self
            .shared
            .destinations
            .delete_async(&id)
            .await
            .map_err(unavailable)?
        {
            return Err(destination_not_found(&id));
        }
        Ok(Response::new(pb::DeleteDestinationResponse {
            destination_id: id,
        }))
    }

    async fn verify_destination_inner(
        &self,
        call: &Call,
        subject: &mut Subject,
        request: Request<pb::VerifyDestinationRequest>,
    ) -> Result<Response<pb::VerifyDestinationResponse>, Status> {
        let request_id = call.request_id.clone();
        let id = request.into_inner().destination_id;
        let record = self.shared.visible_destination(call, &id, subject).await?;
        let failed = |step: &str, message: String| pb::VerifyDestinationResponse {
            ok: false,
            failed_step: step.to_owned(),
            message,
        };
        let lease = if record.config.provider == Provider::Fs {
            None
        } else {
            match self
                .shared
                .vault
                .acquire(
                    &record.credential_id,
                    &format!("verify-destination {id}"),
                    &request_id,
                )
                .await
            {
                Ok(lease) => Some(lease),
                Err(e) => return Ok(Response::new(failed("credential", e.to_string()))),
            }
        };
        let built = Destination::with_options(
            &record.config,
            lease.as_ref().map(|l| l.secret()),
            self.shared.s3.clone(),
            &self.shared.fs_roots,
        );
        let reply = match built {
            Err(e) => failed(e.probe_step().as_str(), e.to_string()),
            Ok(destination) => match destination.probe().await {
                Ok(()) => pb::VerifyDestinationResponse {
                    ok: true,
                    failed_step: String::new(),
                    message: format!(
                        "wrote and deleted a probe object in {}",
                        record.config.bucket
                    ),
                },
                Err(e) => failed(e.step.as_str(), e.message),
            },
        };
        if let Some(lease) = lease {
            lease.release().await;
        }
        Ok(Response::new(reply))
    }
}

#[tonic::async_trait]
impl pb::destinations_server::Destinations for DestinationsService {
    async fn put_destination(
        &self,
        request: Request<pb::PutDestinationRequest>,
    ) -> Result<Response<pb::PutDestinationResponse>, Status> {
        let call = self
            .shared
            .call(&request, "recvault.uploader.v1.Destinations/PutDestination");
        let mut subject = Subject::default();
        let result = self
            .put_destination_inner(&call, &mut subject, request)
            .await;
        self.shared.finish(&call, subject, result).await
    }

    async fn list_destinations(
        &self,
        request: Request<pb::ListDestinationsRequest>,
    ) -> Result<Response<pb::ListDestinationsResponse>, Status> {
        let call = self.shared.call(
            &request,
            "recvault.uploader.v1.Destinations/ListDestinations",
        );
        let mut subject = Subject::default();
        let result = self
            .list_destinations_inner(&call, &mut subject, request)
            .await;
        self.shared.finish(&call, subject, result).await
    }

    async fn delete_destination(
        &self,
        request: Request<pb::DeleteDestinationRequest>,
    ) -> Result<Response<pb::DeleteDestinationResponse>, Status> {
        let call = self.shared.call(
            &request,
            "recvault.uploader.v1.Destinations/DeleteDestination",
        );
        let mut subject = Subject::default();
        let result = self
            .delete_destination_inner(&call, &mut subject, request)
            .await;
        self.shared.finish(&call, subject, result).await
    }

    async fn verify_destination(
        &self,
        request: Request<pb::VerifyDestinationRequest>,
    ) -> Result<Response<pb::VerifyDestinationResponse>, Status> {
        let call = self.shared.call(
            &request,
            "recvault.uploader.v1.Destinations/VerifyDestination",
        );
        let mut subject = Subject::default();
        let result = self
            .verify_destination_inner(&call, &mut subject, request)
            .await;
        self.shared.finish(&call, subject, result).await
    }
}
