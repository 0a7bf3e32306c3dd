//! `Leases`: the only way plaintext leaves the vault — to the uploader role,
//! over mTLS, for a capped TTL, and only after the lease's audit event is durable.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use recvault_proto::vault::v1::{
    AcquireLeaseRequest, AcquireLeaseResponse, ReleaseLeaseRequest, ReleaseLeaseResponse,
    leases_server,
};
use tonic::{Request, Response, Status};
use zeroize::Zeroizing;

use crate::{
    core::{Call, Subject, VaultCore, blocking},
    error::VaultError,
    ids::{CredentialId, LeaseId},
    policy::Role,
    sealing::{plaintext_refused, seal_lease},
    store::CredentialRow,
    store::{LeaseProblem, NewLease},
};
use recvault_runtime::hpke::KEY_LEN;

/// Longest purpose string recorded in the audit log.
const MAX_PURPOSE_BYTES: usize = 256;

/// Envelopes up to this size are opened on the async worker (a few
/// microseconds); bigger ones (tenant limits go up to 1M characters) on a
/// blocking thread, so that one large secret cannot stall other calls.
const INLINE_OPEN_MAX_BYTES: usize = 16 * 1024;

/// Opens a live row's envelope with the keyring, straight into the buffer that
/// becomes the reply's `secret` (zeroized if the call fails before the reply).
fn open_sealed(core: &VaultCore, row: &CredentialRow) -> Result<Zeroizing<Vec<u8>>, VaultError> {
    let sealed = row.sealed.as_deref().ok_or_else(|| {
        VaultError::NotFound(format!("credential {} was deleted", row.credential_id))
    })?;
    core.keyring()
        .open_with(
            row.tenant_id.as_str(),
            row.credential_id.as_str(),
            row.version,
            sealed,
            |plaintext| Zeroizing::new(plaintext.to_vec()),
        )
        .map_err(|_| {
            tracing::error!(credential_id = %row.credential_id, "stored ciphertext failed authentication");
            VaultError::Undecryptable(row.credential_id.to_string())
        })
}

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
        // A peer without the role gets PERMISSION_DENIED before any input check.
        self.core.authorize_role_anywhere(call, Role::Uploader)?;
        let id = CredentialId::parse(&req.credential_id).map_err(VaultError::InvalidArgument)?;
        subject.credential_id = id.to_string();
        if req.purpose.len() > MAX_PURPOSE_BYTES || req.purpose.chars().any(char::is_control) {
            return Err(VaultError::InvalidArgument(format!(
                "purpose must be at most {MAX_PURPOSE_BYTES} bytes without control characters"
            )));
        }
        subject.detail = format!("purpose={}", req.purpose);
        let sealed_to = match req.recipient_public_key.len() {
            0 if self.core.config.secrets.allow_plaintext => None,
            0 => {
                return Err(plaintext_refused(
                    "AcquireLease's secret",
                    "send recipient_public_key (the public half of an X25519 key pair made for this call) and open sealed_secret",
                ));
            }
            KEY_LEN => Some(req.recipient_public_key),
            n => {
                return Err(VaultError::InvalidArgument(format!(
                    "recipient_public_key is {n} bytes; it must be a 32-byte X25519 public key"
                )));
            }
        };
        let settings = &self.core.config.leases;
        let ttl = match req.ttl_seconds {
            0 => settings.default_ttl_secs,
            t => t.min(settings.max_ttl_secs),
        };
        // Hot path: the sealed row from the store's memory cache, opened right
        // here. SQLite (on a miss) and big envelopes go to a blocking thread.
        let row = match self.core.store.cached(&id) {
            Some(row) => Some(row),
            None => {
                let core = self.core.clone();
                let lookup = id.clone();
                blocking(move || {
                    // A shared database: another vault may have rotated or
                    // retired keys since this one last looked.
                    core.sync_keyring()?;
                    Ok(core.store.get(&lookup)?.map(Arc::new))
                })
                .await?
            }
        }
        .ok_or_else(|| VaultError::NotFound(format!("credential {id} does not exist")))?;
        let sealed_len = match row.sealed.as_deref() {
            Some(sealed) if !row.deleted => sealed.len(),
            _ => return Err(VaultError::NotFound(format!("credential {id} was deleted"))),
        };
        let mut secret = if sealed_len <= INLINE_OPEN_MAX_BYTES {
            open_sealed(&self.core, &row)?
        } else {
            let core = self.core.clone();
            let row = row.clone();
            blocking(move || open_sealed(&core, &row)).await?
        };
        subject.tenant_id = row.tenant_id.to_string();
        self.core
            .authorize(call, Role::Uploader, Some(&row.tenant_id))?;
        let lease_id = LeaseId::generate();
        // Sealed before the lease exists, so a refused key leaves no lease behind.
        let sealed = sealed_to
            .map(|public| {
                seal_lease(
                    &public,
                    lease_id.as_str(),
                    row.credential_id.as_str(),
                    &secret,
                )
            })
            .transpose()?;
        let lease = NewLease {
            credential_id: row.credential_id.clone(),
            tenant_id: row.tenant_id.clone(),
            holder: call.identity.clone().unwrap_or_default(),
        };
        let ttl_d = Duration::from_secs(u64::from(ttl));
        let max_active = settings.max_active;
        let granted = if self.core.leases.blocks() {
            let (leases, id) = (self.core.leases.clone(), lease_id.clone());
            blocking(move || Ok(leases.grant(&id, &lease, ttl_d, max_active)?)).await?
        } else {
            self.core
                .leases
                .grant(&lease_id, &lease, ttl_d, max_active)?
        };
        if !granted {
            return Err(VaultError::ResourceExhausted(format!(
                "{} leases are active (leases.max_active); release leases or raise the limit",
                settings.max_active
            )));
        }
        subject.lease_id = lease_id.to_string();
        subject.detail = format!(
            "purpose={} ttl={ttl}s version={} secret={}",
            req.purpose,
            row.version,
            if sealed.is_some() { "sealed" } else { "clear" }
        );
        let expires_at = SystemTime::now() + Duration::from_secs(u64::from(ttl));
        let (enc, sealed_secret, secret) = match sealed {
            Some((enc, sealed_secret)) => (enc, sealed_secret, Vec::new()),
            // Debug vaults only: the reply is the one copy of the plaintext
            // that leaves the vault; the buffer it was decrypted into moves
            // into it.
            None => (Vec::new(), Vec::new(), std::mem::take(&mut *secret)),
        };
        Ok(AcquireLeaseResponse {
            lease_id: lease_id.to_string(),
            secret,
            expires_at: Some(prost_types::Timestamp::from(expires_at)),
            kind: row.kind,
            credential_version: row.version,
            enc,
            sealed_secret,
        })
    }

    async fn release(
        &self,
        subject: &mut Subject,
        call: &Call,
        req: &ReleaseLeaseRequest,
    ) -> Result<ReleaseLeaseResponse, VaultError> {
        self.core.authorize_role_anywhere(call, Role::Uploader)?;
        let id = LeaseId::parse(&req.lease_id).map_err(VaultError::InvalidArgument)?;
        subject.lease_id = id.to_string();
        self.core.authorize_role_anywhere(call, Role::Uploader)?;
        let holder = call.identity.as_deref().unwrap_or_default();
        let released = if self.core.leases.blocks() {
            let (leases, lease, holder) = (self.core.leases.clone(), id.clone(), holder.to_owned());
            blocking(move || Ok(leases.release(&lease, &holder)?)).await?
        } else {
            self.core.leases.release(&id, holder)?
        };
        match released {
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

impl LeasesService {
    /// Sets the active-leases gauge now when that is cheap (in memory); a
    /// shared lease table is counted by the sweeper every few seconds.
    fn report_active(&self) {
        if !self.core.leases.blocks()
            && let Ok(n) = self.core.leases.active()
        {
            self.core
                .metrics
                .leases_active
                .set(i64::try_from(n).unwrap_or(i64::MAX));
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
            let leases = self.core.leases.clone();
            // Best effort: a revoke that fails leaves a lease that expires.
            let revoked = blocking(move || Ok(leases.revoke(&id)?)).await;
            if let Err(error) = revoked {
                tracing::warn!(%error, "revoking a lease whose audit event failed");
            }
        }
        let metrics = &self.core.metrics;
        match &finished {
            Ok(_) => metrics.leases_granted.inc(),
            Err(s) if s.code() == tonic::Code::PermissionDenied => metrics.leases_denied.inc(),
            Err(_) => {}
        }
        self.report_active();
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
        let result = self.release(&mut subject, &call, request.get_ref()).await;
        let finished = self.core.finish(&call, subject, result).await;
        self.report_active();
        finished.map(Response::new)
    }
}
