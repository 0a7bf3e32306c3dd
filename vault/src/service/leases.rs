//! `Leases`: the only way plaintext leaves the vault — to the uploader role,
//! over mTLS, for a capped TTL, and only after the lease's audit event is durable.

use std::{
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use recvault_proto::vault::v1::{
    AcquireLeaseRequest, AcquireLeaseResponse, ReleaseLeaseRequest, ReleaseLeaseResponse,
    leases_server,
};
use tonic::{Request, Response, Status};

use crate::{
    core::{Call, Subject, VaultCore, blocking},
    error::VaultError,
    ids::{CredentialId, LeaseId},
    leases::{Lease, LeaseProblem},
    policy::Role,
};

/// Longest purpose string recorded in the audit log.
const MAX_PURPOSE_BYTES: usize = 256;

#[derive(Debug, Clone)]
pub struct LeasesService {
    core: Arc<VaultCore>,
}

impl LeasesService {
    pub fn new(core: Arc<VaultCore>) -> Self {
        Self { core }
    }

    async fn acquire(
        &self,
        subject: &mut Subject,
        call: &Call,
        req: AcquireLeaseRequest,
    ) -> Result<AcquireLeaseResponse, VaultError> {
        let id = CredentialId::parse(&req.credential_id).map_err(VaultError::InvalidArgument)?;
        subject.credential_id = id.to_string();
        if req.purpose.len() > MAX_PURPOSE_BYTES || req.purpose.chars().any(char::is_control) {
            return Err(VaultError::InvalidArgument(format!(
                "purpose must be at most {MAX_PURPOSE_BYTES} bytes without control characters"
            )));
        }
        subject.detail = format!("purpose={}", req.purpose);
        self.core.authorize_role_anywhere(call, Role::Uploader)?;
        let settings = &self.core.config.leases;
        let ttl = match req.ttl_seconds {
            0 => settings.default_ttl_secs,
            t => t.min(settings.max_ttl_secs),
        };
        let core = self.core.clone();
        let lookup = id.clone();
        let (row, secret) = blocking(move || {
            let row = core
                .store
                .get(&lookup)?
                .ok_or_else(|| VaultError::NotFound(format!("credential {lookup} does not exist")))?;
            let Some(sealed) = row.sealed.as_deref().filter(|_| !row.deleted) else {
                return Err(VaultError::NotFound(format!("credential {lookup} was deleted")));
            };
            let secret = core
                .keyring()
                .open(row.tenant_id.as_str(), row.credential_id.as_str(), row.version, sealed)
                .map_err(|_| {
                    tracing::error!(credential_id = %lookup, "stored ciphertext failed authentication");
                    VaultError::Undecryptable(lookup.to_string())
                })?;
            Ok((row, secret))
        })
        .await?;
        subject.tenant_id = row.tenant_id.to_string();
        self.core
            .authorize(call, Role::Uploader, Some(&row.tenant_id))?;
        let lease_id = LeaseId::generate();
        let lease = Lease {
            credential_id: row.credential_id.clone(),
            tenant_id: row.tenant_id.clone(),
            holder: call.identity.clone().unwrap_or_default(),
            expires: Instant::now() + Duration::from_secs(u64::from(ttl)),
        };
        if !self
            .core
            .leases
            .grant(lease_id.clone(), lease, settings.max_active)
        {
            return Err(VaultError::ResourceExhausted(format!(
                "{} leases are active (leases.max_active); release leases or raise the limit",
                settings.max_active
            )));
        }
        subject.lease_id = lease_id.to_string();
        subject.detail = format!("purpose={} ttl={ttl}s version={}", req.purpose, row.version);
        let expires_at = SystemTime::now() + Duration::from_secs(u64::from(ttl));
        Ok(AcquireLeaseResponse {
            lease_id: lease_id.to_string(),
            // The reply is the one copy of the plaintext that leaves the vault;
            // the locked copy is zeroized when `secret` drops here.
            secret: secret.expose_secret().to_vec(),
            expires_at: Some(prost_types::Timestamp::from(expires_at)),
            kind: row.kind,
            credential_version: row.version,
        })
    }

    fn release(
        &self,
        subject: &mut Subject,
        call: &Call,
        req: &ReleaseLeaseRequest,
    ) -> Result<ReleaseLeaseResponse, VaultError> {
        let id = LeaseId::parse(&req.lease_id).map_err(VaultError::InvalidArgument)?;
        subject.lease_id = id.to_string();
        self.core.authorize_role_anywhere(call, Role::Uploader)?;
        let holder = call.identity.as_deref().unwrap_or_default();
        match self.core.leases.release(&id, holder) {
            Ok(lease) => {
                subject.tenant_id = lease.tenant_id.to_string();
                subject.credential_id = lease.credential_id.to_string();
                Ok(ReleaseLeaseResponse {
                    lease_id: id.to_string(),
                })
            }
            Err(LeaseProblem::Unknown) => Err(VaultError::NotFound(format!(
                "lease {id} is not active: it was released, expired, or never existed"
            ))),
            Err(LeaseProblem::Expired) => Err(VaultError::FailedPrecondition(format!(
                "lease {id} has expired"
            ))),
            Err(LeaseProblem::NotHolder) => Err(VaultError::NotFound(format!(
                "lease {id} is not active for this identity"
            ))),
        }
    }
}

#[tonic::async_trait]
impl leases_server::Leases for LeasesService {
    async fn acquire_lease(
        &self,
        request: Request<AcquireLeaseRequest>,
    ) -> Result<Response<AcquireLeaseResponse>, Status> {
        let call = self
            .core
            .call(&request, "recvault.vault.v1.Leases/AcquireLease");
        let mut subject = Subject::default();
        let result = self
            .acquire(&mut subject, &call, request.into_inner())
            .await;
        let lease_id = subject.lease_id.clone();
        // Fail closed: if the lease event is not durable, the plaintext is dropped
        // (never sent) and the lease is revoked.
        let finished = self.core.finish(&call, subject, result).await;
        if finished.is_err()
            && !lease_id.is_empty()
            && let Ok(id) = LeaseId::parse(&lease_id)
        {
            self.core.leases.revoke(&id);
        }
        finished.map(Response::new)
    }

    async fn release_lease(
        &self,
        request: Request<ReleaseLeaseRequest>,
    ) -> Result<Response<ReleaseLeaseResponse>, Status> {
        let call = self
            .core
            .call(&request, "recvault.vault.v1.Leases/ReleaseLease");
        let mut subject = Subject::default();
        let result = self.release(&mut subject, &call, request.get_ref());
        self.core
            .finish(&call, subject, result)
            .await
            .map(Response::new)
    }
}
