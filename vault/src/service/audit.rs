//! `Audit` (auditor): query, follow and verify the hash-chained audit log.
//! Reading the log is itself audited. The streaming and conversions are
//! shared with the uploader's `Audit` service (`recvault_audit::grpc`).

use std::sync::Arc;

use recvault_audit::grpc::{self, EventStream};
use recvault_proto::vault::v1 as pb;
use tonic::{Request, Response, Status};

use crate::{
    core::{Subject, VaultCore},
    error::VaultError,
    policy::Role,
};

#[derive(Debug, Clone)]
pub struct AuditService {
    core: Arc<VaultCore>,
}

impl AuditService {
    pub fn new(core: Arc<VaultCore>) -> Self {
        Self { core }
    }
}

/// Proto filter → store filter, refused as INVALID_ARGUMENT naming the field.
fn filter_of(f: Option<pb::AuditFilter>) -> Result<recvault_audit::AuditFilter, VaultError> {
    grpc::filter_of(f).map_err(|e| VaultError::InvalidArgument(e.to_string()))
}

#[tonic::async_trait]
impl pb::audit_server::Audit for AuditService {
    type QueryEventsStream = EventStream;
    type TailEventsStream = EventStream;

    async fn query_events(
        &self,
        request: Request<pb::QueryEventsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let call = self
            .core
            .call(&request, "recvault.vault.v1.Audit/QueryEvents");
        let req = request.into_inner();
        let prepared = self
            .core
            .authorize(&call, Role::Auditor, None)
            .and_then(|()| filter_of(req.filter));
        let filter = self
            .core
            .finish(&call, Subject::default(), prepared)
            .await?;
        Ok(Response::new(grpc::query_events(
            self.core.audit.clone(),
            filter,
            req.after_sequence,
            req.limit,
        )))
    }

    async fn tail_events(
        &self,
        request: Request<pb::TailEventsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let call = self
            .core
            .call(&request, "recvault.vault.v1.Audit/TailEvents");
        let req = request.into_inner();
        let prepared = self
            .core
            .authorize(&call, Role::Auditor, None)
            .and_then(|()| filter_of(req.filter));
        let filter = self
            .core
            .finish(&call, Subject::default(), prepared)
            .await?;
        Ok(Response::new(grpc::tail_events(
            self.core.audit.clone(),
            filter,
            req.after_sequence,
        )))
    }

    async fn verify_chain(
        &self,
        request: Request<pb::VerifyChainRequest>,
    ) -> Result<Response<pb::VerifyChainResponse>, Status> {
        let call = self
            .core
            .call(&request, "recvault.vault.v1.Audit/VerifyChain");
        let result = match self.core.authorize(&call, Role::Auditor, None) {
            Ok(()) => Ok(grpc::verify_chain(&self.core.audit).await),
            Err(e) => Err(e),
        };
        let subject = Subject {
            detail: result.as_ref().map(grpc::verify_detail).unwrap_or_default(),
            ..Subject::default()
        };
        self.core
            .finish(&call, subject, result)
            .await
            .map(Response::new)
    }
}
