//! `Keys` (admin): master-key rotation, rewrap inside the vault, key status,
//! retiring old versions, and per-tenant secret limits. Plaintext never
//! leaves this process during a rewrap.

use std::sync::Arc;

use recvault_proto::vault::v1::{
    KeyStatusRequest, KeyStatusResponse, KeyVersionStatus, RetireKeysRequest, RewrapRequest,
    RewrapResponse, RotateKeyRequest, RotateKeyResponse, SetTenantLimitRequest,
    SetTenantLimitResponse, keys_server,
};
use tonic::{Request, Response, Status};

use crate::{
    core::{Call, MIN_DECRYPT_VERSION, Subject, VaultCore, blocking},
    error::VaultError,
    ids::TenantId,
    keyring,
    policy::Role,
};

#[derive(Debug, Clone)]
pub struct KeysService {
    core: Arc<VaultCore>,
}

impl KeysService {
    pub fn new(core: Arc<VaultCore>) -> Self {
        Self { core }
    }

    async fn rotate(
        &self,
        subject: &mut Subject,
        call: &Call,
    ) -> Result<RotateKeyResponse, VaultError> {
        self.core.authorize(call, Role::Admin, None)?;
        let core = self.core.clone();
        let (gate_call, gate_subject) = (call.clone(), subject.clone());
        let version = blocking(move || {
            core.sync_keyring()?;
            // Hold the write lock across the insert so two rotations cannot pick the same number.
            let mut ring = core.keyring_mut();
            let next = ring.current_version().unwrap_or(0) + 1;
            let (key, wrapped) =
                keyring::new_wrapped_version(&core.master, next).map_err(|_| {
                    VaultError::Unavailable("generating the new key version failed".into())
                })?;
            core.store.insert_key_version(next, &wrapped, &mut || {
                let subject = Subject {
                    detail: format!("key_version={next}"),
                    ..gate_subject.clone()
                };
                core.commit_gate(&gate_call, &subject)
            })?;
            ring.insert(next, key)
                .map_err(|e| VaultError::Unavailable(e.to_string()))?;
            Ok(next)
        })
        .await?;
        subject.detail = format!("key_version={version}");
        subject.audited = true;
        tracing::info!(key_version = version, "master key rotated");
        Ok(RotateKeyResponse {
            key_version: version,
        })
    }

    async fn rewrap(
        &self,
        subject: &mut Subject,
        call: &Call,
        req: RewrapRequest,
    ) -> Result<RewrapResponse, VaultError> {
        self.core.authorize_role_anywhere(call, Role::Admin)?;
        let tenant = match req.tenant_id.as_str() {
            "" => None,
            t => Some(TenantId::parse(t).map_err(VaultError::InvalidArgument)?),
        };
        subject.tenant_id = req.tenant_id.clone();
        self.core.authorize(call, Role::Admin, tenant.as_ref())?;
        let core = self.core.clone();
        let (gate_call, gate_subject) = (call.clone(), subject.clone());
        let (rewrapped, already_current, key_version) = blocking(move || {
            core.sync_keyring()?;
            let ring = core.keyring();
            let current = ring.current_version().unwrap_or(0);
            let mut fresh_rows = Vec::new();
            for row in core.store.stale_sealed(current, tenant.as_ref())? {
                let Some(sealed) = row.sealed.as_deref() else {
                    continue;
                };
                let fresh = ring
                    .rewrap(
                        row.tenant_id.as_str(),
                        row.credential_id.as_str(),
                        row.version,
                        sealed,
                    )
                    .map_err(|_| VaultError::Undecryptable(row.credential_id.to_string()))?;
                if let Some(fresh) = fresh {
                    fresh_rows.push((row.credential_id.clone(), row.version, fresh, current));
                }
            }
            // One transaction for the whole rewrap, committed only after its audit event.
            let rewrapped = core.store.replace_sealed(&fresh_rows, &mut |n| {
                let subject = Subject {
                    detail: format!("rewrapped={n} key_version={current}"),
                    ..gate_subject.clone()
                };
                core.commit_gate(&gate_call, &subject)
            })?;
            let at_current = core
                .store
                .count_by_key_version()?
                .get(&current)
                .copied()
                .unwrap_or(0);
            let already_current = u32::try_from(at_current)
                .unwrap_or(u32::MAX)
                .saturating_sub(rewrapped);
            Ok((rewrapped, already_current, current))
        })
        .await?;
        subject.detail = format!("rewrapped={rewrapped} key_version={key_version}");
        subject.audited = true;
        Ok(RewrapResponse {
            rewrapped,
            already_current,
            key_version,
        })
    }

    async fn status(&self) -> Result<KeyStatusResponse, VaultError> {
        let core = self.core.clone();
        blocking(move || {
            core.sync_keyring()?;
            let counts = core.store.count_by_key_version()?;
            let ring = core.keyring();
            let versions = core
                .store
                .key_versions()?
                .into_iter()
                .map(|(version, _, created)| KeyVersionStatus {
                    version,
                    created_at: Some(super::timestamp(created)),
                    credentials: counts.get(&version).copied().unwrap_or(0),
                })
                .collect();
            Ok(KeyStatusResponse {
                current_version: ring.current_version().unwrap_or(0),
                min_decrypt_version: ring.min_decrypt_version(),
                versions,
            })
        })
        .await
    }

    async fn retire(
        &self,
        subject: &mut Subject,
        call: &Call,
        req: RetireKeysRequest,
    ) -> Result<KeyStatusResponse, VaultError> {
        self.core.authorize(call, Role::Admin, None)?;
        let min = req.min_decrypt_version;
        subject.detail = format!("min_decrypt_version={min}");
        let core = self.core.clone();
        let (gate_call, gate_subject) = (call.clone(), subject.clone());
        blocking(move || {
            core.sync_keyring()?;
            let mut ring = core.keyring_mut();
            let current = ring.current_version().unwrap_or(0);
            if min == 0 || min > current {
                return Err(VaultError::InvalidArgument(format!(
                    "min_decrypt_version must be between 1 and the current key version {current}"
                )));
            }
            let stale: u64 = core.store.count_by_key_version()?.range(..min).map(|(_, n)| n).sum();
            if stale > 0 {
                return Err(VaultError::FailedPrecondition(format!(
                    "{stale} credentials are still sealed under key versions below {min}; run Keys/Rewrap first"
                )));
            }
            core.store.set_setting(MIN_DECRYPT_VERSION, i64::from(min), &mut || {
                core.commit_gate(&gate_call, &gate_subject)
            })?;
            ring.set_min_decrypt_version(min);
            Ok(())
        })
        .await?;
        subject.audited = true;
        self.status().await
    }

    async fn set_limit(
        &self,
        subject: &mut Subject,
        call: &Call,
        req: SetTenantLimitRequest,
    ) -> Result<SetTenantLimitResponse, VaultError> {
        self.core.authorize_role_anywhere(call, Role::Admin)?;
        let tenant = TenantId::parse(&req.tenant_id).map_err(VaultError::InvalidArgument)?;
        subject.tenant_id = tenant.to_string();
        self.core.authorize(call, Role::Admin, Some(&tenant))?;
        let cap = self.core.config.limits.max_tenant_secret_chars;
        if req.max_secret_chars > cap {
            return Err(VaultError::InvalidArgument(format!(
                "max_secret_chars {} is above the vault's cap of {cap} (limits.max_tenant_secret_chars)",
                req.max_secret_chars
            )));
        }
        let limit = (req.max_secret_chars != 0).then_some(req.max_secret_chars);
        subject.detail = format!("max_secret_chars={}", req.max_secret_chars);
        let core = self.core.clone();
        let t = tenant.clone();
        let (gate_call, gate_subject) = (call.clone(), subject.clone());
        let effective = blocking(move || {
            core.store.set_tenant_limit(&t, limit, &mut || {
                core.commit_gate(&gate_call, &gate_subject)
            })?;
            core.secret_limit(&t)
        })
        .await?;
        subject.audited = true;
        Ok(SetTenantLimitResponse {
            tenant_id: tenant.to_string(),
            max_secret_chars: effective,
        })
    }
}

#[tonic::async_trait]
impl keys_server::Keys for KeysService {
    async fn rotate_key(
        &self,
        request: Request<RotateKeyRequest>,
    ) -> Result<Response<RotateKeyResponse>, Status> {
        let call = self.core.call(&request, "recvault.vault.v1.Keys/RotateKey");
        let mut subject = Subject::default();
        let result = self.rotate(&mut subject, &call).await;
        self.core
            .finish(&call, subject, result)
            .await
            .map(Response::new)
    }

    async fn rewrap(
        &self,
        request: Request<RewrapRequest>,
    ) -> Result<Response<RewrapResponse>, Status> {
        let call = self.core.call(&request, "recvault.vault.v1.Keys/Rewrap");
        let mut subject = Subject::default();
        let result = KeysService::rewrap(self, &mut subject, &call, request.into_inner()).await;
        self.core
            .finish(&call, subject, result)
            .await
            .map(Response::new)
    }

    async fn key_status(
        &self,
        request: Request<KeyStatusRequest>,
    ) -> Result<Response<KeyStatusResponse>, Status> {
        let call = self.core.call(&request, "recvault.vault.v1.Keys/KeyStatus");
        let result = match self.core.authorize(&call, Role::Admin, None) {
            Ok(()) => self.status().await,
            Err(e) => Err(e),
        };
        self.core
            .finish(&call, Subject::default(), result)
            .await
            .map(Response::new)
    }

    async fn retire_keys(
        &self,
        request: Request<RetireKeysRequest>,
    ) -> Result<Response<KeyStatusResponse>, Status> {
        let call = self
            .core
            .call(&request, "recvault.vault.v1.Keys/RetireKeys");
        let mut subject = Subject::default();
        let result = self.retire(&mut subject, &call, request.into_inner()).await;
        self.core
            .finish(&call, subject, result)
            .await
            .map(Response::new)
    }

    async fn set_tenant_limit(
        &self,
        request: Request<SetTenantLimitRequest>,
    ) -> Result<Response<SetTenantLimitResponse>, Status> {
        let call = self
            .core
            .call(&request, "recvault.vault.v1.Keys/SetTenantLimit");
        let mut subject = Subject::default();
        let result = self
            .set_limit(&mut subject, &call, request.into_inner())
            .await;
        self.core
            .finish(&call, subject, result)
            .await
            .map(Response::new)
    }
}
