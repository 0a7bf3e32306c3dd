//! `Destinations`: where a tenant's recordings go, and a "Test" button
//! (`VerifyDestination`) that writes and deletes a probe object with the real credential.

use std::sync::Arc;

use recvault_proto::uploader::v1 as pb;
use tonic::{Request, Response, Status};

use super::{Role, Shared};
use crate::destination::{Destination, DestinationConfig, Provider};

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

#[tonic::async_trait]
impl pb::destinations_server::Destinations for DestinationsService {
    async fn put_destination(
        &self,
        request: Request<pb::PutDestinationRequest>,
    ) -> Result<Response<pb::PutDestinationResponse>, Status> {
        self.shared.authorize(&request, Role::Manager)?;
        let r = request.into_inner();
        crate::jobs::TenantId::parse(r.tenant_id.clone())
            .map_err(|e| Status::invalid_argument(format!("tenant_id: {}", e.problem())))?;
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
            Destination::new(&config, None).map_err(|e| Status::invalid_argument(e.to_string()))?;
        }
        let id = self
            .shared
            .destinations
            .put_async(r.tenant_id, r.name, config, r.credential_id)
            .await
            .map_err(unavailable)?;
        Ok(Response::new(pb::PutDestinationResponse {
            destination_id: id,
        }))
    }

    async fn list_destinations(
        &self,
        request: Request<pb::ListDestinationsRequest>,
    ) -> Result<Response<pb::ListDestinationsResponse>, Status> {
        self.shared.authorize(&request, Role::Manager)?;
        required("tenant_id", &request.get_ref().tenant_id)?;
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

    async fn delete_destination(
        &self,
        request: Request<pb::DeleteDestinationRequest>,
    ) -> Result<Response<pb::DeleteDestinationResponse>, Status> {
        self.shared.authorize(&request, Role::Manager)?;
        let id = request.into_inner().destination_id;
        if !self
            .shared
            .destinations
            .delete_async(&id)
            .await
            .map_err(unavailable)?
        {
            return Err(Status::not_found(format!(
                "destination {id:?} does not exist"
            )));
        }
        Ok(Response::new(pb::DeleteDestinationResponse {
            destination_id: id,
        }))
    }

    async fn verify_destination(
        &self,
        request: Request<pb::VerifyDestinationRequest>,
    ) -> Result<Response<pb::VerifyDestinationResponse>, Status> {
        self.shared.authorize(&request, Role::Manager)?;
        let request_id = recvault_runtime::logging::request_id(&request);
        let id = request.into_inner().destination_id;
        let record = self
            .shared
            .destinations
            .get_async(&id)
            .await
            .map_err(unavailable)?
            .ok_or_else(|| Status::not_found(format!("destination {id:?} does not exist")))?;
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
