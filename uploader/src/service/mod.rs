//! The uploader's gRPC services. Every handler takes its [`Call`] first
//! (who, which RPC, request id), checks the caller's role for the tenant the
//! call concerns with the tenant-scoped policy shared with the vault
//! (`recvault_runtime::policy`), does the work, and writes the call's one
//! audit event with [`Shared::audit`] before it answers (fail closed).
//! A recorder ingests for its tenants; a manager sees and changes its
//! tenants' destinations, jobs and backups; an auditor of every tenant reads
//! the audit log.
//!
//! Refusals, documented in the README and the proto:
//! - no identity in the certificate: UNAUTHENTICATED;
//! - the role for no tenant at all, or a call naming a tenant the caller does
//!   not hold: PERMISSION_DENIED (the tenant is the caller's own input, so the
//!   answer reveals nothing);
//! - a call naming a job or destination id of another tenant: NOT_FOUND with
//!   exactly the message an id that does not exist gets, so ids of other
//!   tenants cannot be probed (the audit event records the real tenant).

pub mod audit;
pub mod destinations;
pub mod jobs;
pub mod recordings;

use std::sync::Arc;

use recvault_audit::{AuditLog, AuditRecord};
use recvault_runtime::policy::{Need, PolicyFile, Role, TenantScope};
use tonic::{Request, Status};

use crate::{
    backup::BackupStore,
    destination::{FsAllowedRoots, S3Options},
    destination_store::{DestinationRecord, DestinationStore},
    jobs::{Job, JobId, JobStore, JobStoreError},
};

/// Who is calling and which RPC (the same type the vault audits with).
pub use recvault_audit::grpc::Call;

/// What the services share.
#[derive(Debug)]
pub struct Shared {
    pub jobs: JobStore,
    pub backups: BackupStore,
    pub destinations: Arc<DestinationStore>,
    pub vault: crate::lease::VaultLeases,
    /// Who may call what, per tenant; re-read when the file changes.
    pub policy: Arc<PolicyFile>,
    pub ingest_limits: crate::ingest::IngestLimits,
    pub s3: S3Options,
    pub fs_roots: FsAllowedRoots,
    pub wake: Arc<tokio::sync::Notify>,
    pub metrics: Arc<crate::metrics::UploaderMetrics>,
    /// The uploader's own audit log: one event per call, durable before the
    /// call answers (fail closed, see [`Shared::audit`]).
    pub audit: Arc<AuditLog>,
}

/// What a call concerned, as far as the handler learned it; empty fields
/// stay empty in the event.
#[derive(Debug, Default, Clone)]
pub struct Subject {
    pub tenant_id: String,
    pub job_id: String,
    pub recording_id: String,
    pub destination_id: String,
    /// Free text for the auditor (never a secret, never recording bytes).
    pub detail: String,
    /// The caller was refused a job or destination of another tenant (it was
    /// told NOT_FOUND): recorded as denied, not as an error.
    pub hidden: bool,
}

impl Subject {
    /// The subject of a call about `job`.
    pub fn of_job(job: &Job) -> Self {
        Self {
            tenant_id: job.tenant_id.to_string(),
            job_id: job.job_id.to_string(),
            recording_id: job.recording_id.to_string(),
            destination_id: job.destination_id.to_string(),
            ..Self::default()
        }
    }
}

impl Shared {
    /// Takes the caller of `request` for its audit event. Call it first in
    /// every handler, before anything can fail. `method` is the full gRPC
    /// method, e.g. `recvault.uploader.v1.Jobs/GetJob`.
    pub fn call<T>(&self, request: &Request<T>, method: &'static str) -> Call {
        Call::of(request, method)
    }

    fn identity<'c>(&self, call: &'c Call) -> Result<&'c str, Status> {
        call.identity.as_deref().ok_or_else(|| {
            Status::unauthenticated("the client certificate names no identity (no URI or DNS SAN)")
        })
    }

    /// The tenants for which the caller holds `role`; PERMISSION_DENIED when
    /// it holds the role for none.
    pub fn require_role(&self, call: &Call, role: Role) -> Result<TenantScope, Status> {
        let identity = self.identity(call)?;
        let scope = self.policy.current().scope(identity, role);
        if scope.is_empty() {
            tracing::info!(identity, %role, operation = call.operation, request_id = %call.request_id, "permission denied");
            return Err(Status::permission_denied(format!(
                "identity {identity} does not hold the {role} role; grant it in the uploader's \
                 policy_file"
            )));
        }
        Ok(scope)
    }

    /// PERMISSION_DENIED unless the caller holds `role` for every tenant
    /// (calls that span tenants, such as reading the audit log).
    pub fn require_all_tenants(&self, call: &Call, role: Role) -> Result<(), Status> {
        if self.require_role(call, role)? == TenantScope::All {
            return Ok(());
        }
        Err(Status::permission_denied(format!(
            "identity {} holds the {role} role only for some tenants; this call spans tenants, \
             so its grant in the uploader's policy_file must cover all (no tenants, or [\"*\"])",
            call.identity.as_deref().unwrap_or_default()
        )))
    }

    /// PERMISSION_DENIED unless the caller holds `role` for `tenant`, a
    /// tenant the caller named itself.
    pub fn require_tenant(&self, call: &Call, role: Role, tenant: &str) -> Result<(), Status> {
        let identity = self.identity(call)?;
        let need = Need {
            role,
            tenant: Some(tenant),
        };
        if self.policy.current().allows(identity, need) {
            return Ok(());
        }
        tracing::info!(identity, %role, tenant, operation = call.operation, request_id = %call.request_id, "permission denied for tenant");
        Err(Status::permission_denied(format!(
            "identity {identity} does not hold the {role} role for tenant {tenant:?}; grant it in \
             the uploader's policy_file"
        )))
    }

    /// The job `id` if the caller, a manager, may see it; another tenant's
    /// job answers exactly as a job that does not exist. `subject` learns the
    /// job either way, for the audit event.
    pub async fn visible_job(
        &self,
        call: &Call,
        id: JobId,
        subject: &mut Subject,
    ) -> Result<Job, Status> {
        subject.job_id = id.to_string();
        self.require_role(call, Role::Manager)?;
        let job = self.jobs.get(id).await?;
        *subject = Subject {
            detail: std::mem::take(&mut subject.detail),
            ..Subject::of_job(&job)
        };
        if self.sees(call, job.tenant_id.as_str()) {
            Ok(job)
        } else {
            subject.hidden = true;
            Err(JobStoreError::NotFound(id).into())
        }
    }

    /// The destination `id` if the caller, a manager, may see it; another
    /// tenant's destination answers exactly as one that does not exist.
    pub async fn visible_destination(
        &self,
        call: &Call,
        id: &str,
        subject: &mut Subject,
    ) -> Result<DestinationRecord, Status> {
        subject.destination_id = id.to_owned();
        self.require_role(call, Role::Manager)?;
        let record = self
            .destinations
            .get_async(id)
            .await
            .map_err(|e| Status::unavailable(format!("destination store: {e}")))?
            .ok_or_else(|| destination_not_found(id))?;
        subject.tenant_id = record.tenant_id.clone();
        if self.sees(call, &record.tenant_id) {
            Ok(record)
        } else {
            subject.hidden = true;
            Err(destination_not_found(id))
        }
    }

    fn sees(&self, call: &Call, tenant: &str) -> bool {
        call.identity.as_deref().is_some_and(|identity| {
            self.policy.current().allows(
                identity,
                Need {
                    role: Role::Manager,
                    tenant: Some(tenant),
                },
            )
        })
    }

    /// Writes the one audit event of a finished call (allowed, denied or
    /// failed, by `result`'s code) and returns once it is durable. If it
    /// cannot be made durable the call must fail with the UNAVAILABLE this
    /// returns and release nothing (no event, no answer: fail closed).
    pub fn audit<'a, T>(
        &'a self,
        call: &'a Call,
        subject: Subject,
        result: &Result<T, Status>,
    ) -> impl Future<Output = Result<(), Status>> + Send + 'a {
        // Only the code is kept, so the answer itself need not be `Sync`.
        let code = result.as_ref().err().map_or(tonic::Code::Ok, Status::code);
        self.audit_code(call, subject, code)
    }

    async fn audit_code(
        &self,
        call: &Call,
        mut subject: Subject,
        code: tonic::Code,
    ) -> Result<(), Status> {
        let mut base = call.record(code);
        if subject.hidden {
            base.outcome = recvault_audit::Outcome::Denied;
            if subject.detail.is_empty() {
                subject.detail =
                    "refused: it belongs to a tenant the caller does not hold (answered NOT_FOUND)"
                        .into();
            }
        }
        let record = AuditRecord {
            tenant_id: subject.tenant_id,
            job_id: subject.job_id,
            recording_id: subject.recording_id,
            destination_id: subject.destination_id,
            detail: subject.detail,
            ..base
        };
        if let Err(error) = self.audit.append(record).await {
            self.metrics.audit_failures.inc();
            tracing::error!(%error, operation = call.operation, request_id = %call.request_id,
                "audit write failed; failing the call closed");
            return Err(Status::unavailable(format!(
                "the uploader's audit log is unavailable ({error}); nothing was done or returned; retry later"
            )));
        }
        Ok(())
    }

    /// Audits `result` and returns it (or UNAVAILABLE if the event could not
    /// be made durable): the last line of every handler.
    pub async fn finish<T>(
        &self,
        call: &Call,
        subject: Subject,
        result: Result<T, Status>,
    ) -> Result<T, Status> {
        let code = result.as_ref().err().map_or(tonic::Code::Ok, Status::code);
        self.audit_code(call, subject, code).await?;
        result
    }
}

/// The one answer for a destination id that does not exist or is not the caller's.
pub fn destination_not_found(id: &str) -> Status {
    Status::not_found(format!("destination {id:?} does not exist"))
}
