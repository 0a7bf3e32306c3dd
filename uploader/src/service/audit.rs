//! `Audit` (auditor): query, follow and verify the uploader's own
//! hash-chained audit log, with the same messages and the same shared code
//! (`recvault_audit::grpc`) as the vault's. Every call, allowed or denied,
//! writes its own event first, and fails UNAVAILABLE if it cannot.

use std::sync::Arc;

use recvault_audit::grpc::{self, EventStream};
use recvault_proto::{uploader::v1::audit_server, vault::v1 as pb};
use tonic::{Request, Response, Status};

use recvault_runtime::policy::Role;

use super::{Shared, Subject};

#[derive(Debug, Clone)]
pub struct AuditService {
    shared: Arc<Shared>,
}

impl AuditService {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    /// Authorizes the auditor and parses the filter; the outcome is what the
    /// call's own audit event records.
    fn prepare(
        &self,
        authorized: Result<(), Status>,
        filter: Option<pb::AuditFilter>,
    ) -> Result<recvault_audit::AuditFilter, Status> {
        authorized.and_then(|_| {
            grpc::filter_of(filter).map_err(|e| Status::invalid_argument(e.to_string()))
        })
    }
}

#[tonic::async_trait]
impl audit_server::Audit for AuditService {
    type QueryEventsStream = EventStream;
    type TailEventsStream = EventStream;

    async fn query_events(
        &self,
        request: Request<pb::QueryEventsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let call = self
            .shared
            .call(&request, "recvault.uploader.v1.Audit/QueryEvents");
        let authorized = self.shared.require_all_tenants(&call, Role::Auditor);
        let req = request.into_inner();
        let prepared = self.prepare(authorized, req.filter);
        self.shared
            .audit(&call, Subject::default(), &prepared)
            .await?;
        Ok(Response::new(grpc::query_events(
            self.shared.audit.clone(),
            prepared?,
            req.after_sequence,
            req.limit,
        )))
    }

    async fn tail_events(
        &self,
        request: Request<pb::TailEventsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let call = self
            .shared
            .call(&request, "recvault.uploader.v1.Audit/TailEvents");
        let authorized = self.shared.require_all_tenants(&call, Role::Auditor);
        let req = request.into_inner();
        let prepared = self.prepare(authorized, req.filter);
        self.shared
            .audit(&call, Subject::default(), &prepared)
            .await?;
        Ok(Response::new(grpc::tail_events(
            self.shared.audit.clone(),
            prepared?,
            req.after_sequence,
        )))
    }

    async fn verify_chain(
        &self,
        request: Request<pb::VerifyChainRequest>,
    ) -> Result<Response<pb::VerifyChainResponse>, Status> {
        let call = self
            .shared
            .call(&request, "recvault.uploader.v1.Audit/VerifyChain");
        let result = match self.shared.require_all_tenants(&call, Role::Auditor) {
            Ok(_) => Ok(grpc::verify_chain(&self.shared.audit).await),
            Err(status) => Err(status),
        };
        let subject = Subject {
            detail: result.as_ref().map(grpc::verify_detail).unwrap_or_default(),
            ..Subject::default()
        };
        self.shared.audit(&call, subject, &result).await?;
        result.map(Response::new)
    }
}
