//! The vault's shared state and the two things every RPC does: decide whether
//! the peer may call it, and write the audit event for it (fail closed).
//! Services in `service/` hold the per-RPC logic.

use std::sync::{Arc, RwLock};

use recvault_audit::{AuditLog, AuditRecord};
use tonic::{Request, Status};

use crate::{
    config::VaultConfig,
    datakeys::WrappingKey,
    error::{VaultError, code_name},
    ids::TenantId,
    keyring::{self, Keyring, MasterKey},
    policy::{Need, PolicyFile, Role},
    store::VaultStore,
};

/// Settings key of the minimum key version that may still decrypt.
pub const MIN_DECRYPT_VERSION: &str = "min_decrypt_version";

/// Everything the services share.
#[derive(Debug)]
pub struct VaultCore {
    pub config: VaultConfig,
    pub master: MasterKey,
    /// The backup wrapping key pair, derived from `master` at start-up.
    pub wrapping_key: WrappingKey,
    /// The key pair `PutCredential` secrets are sealed to, derived likewise.
    pub sealing_key: crate::sealing::SealingKey,
    pub keyring: RwLock<Keyring>,
    pub store: Arc<dyn VaultStore>,
    pub audit: Arc<AuditLog>,
    pub policy: Arc<PolicyFile>,
    pub leases: Arc<dyn crate::store::LeaseStore>,
    pub metrics: crate::metrics::VaultMetrics,
}

/// Who is calling and which RPC: taken once at the start of every handler
/// (the same type the uploader audits its calls with).
pub use recvault_audit::grpc::Call;

/// Audit fields a handler learns while it works (ids, lease purpose).
#[derive(Debug, Default, Clone)]
pub struct Subject {
    pub tenant_id: String,
    pub credential_id: String,
    pub lease_id: String,
    pub detail: String,
    /// The success event was already written by [`VaultCore::commit_gate`]
    /// before the change committed; `finish` must not write a second one.
    pub audited: bool,
}

impl VaultCore {
    /// Loads every wrapped key version (creating version 1 on first start).
    pub fn load_keyring(master: &MasterKey, store: &dyn VaultStore) -> Result<Keyring, String> {
        let mut versions = store.key_versions().map_err(|e| e.to_string())?;
        if versions.is_empty() {
            let (_, wrapped) = keyring::new_wrapped_version(master, 1)
                .map_err(|_| "cannot create key version 1".to_owned())?;
            store
                // Start-up, not an RPC: there is no caller to audit.
                .insert_key_version(1, &wrapped, &mut || Ok(()))
                .map_err(|e| e.to_string())?;
            versions = store.key_versions().map_err(|e| e.to_string())?;
        }
        let min = store
            .setting(MIN_DECRYPT_VERSION)
            .map_err(|e| e.to_string())?
            .and_then(|v| u32::try_from(v).ok())
            .unwrap_or(1);
        let mut ring = Keyring::new(min);
        for (version, wrapped, _) in versions {
            let key = keyring::unwrap_version(master, version, &wrapped).map_err(|_| {
                format!(
                    "key version {version} in the credential database does not unwrap with this master key; \
                     is master_key_file the key this database was created with?"
                )
            })?;
            ring.insert(version, key).map_err(|e| e.to_string())?;
        }
        Ok(ring)
    }

    /// Reads who is calling. Never fails: an anonymous peer is still audited.
    pub fn call<T>(&self, request: &Request<T>, operation: &'static str) -> Call {
        if let Some(reached) = request
            .extensions()
            .get::<crate::refusals::HandlerReached>()
        {
            // This call gets its audit event from the handler, not from the
            // refusals layer.
            reached.mark();
        }
        Call::of(request, operation)
    }

    /// Checks the policy. The denial itself is audited by [`VaultCore::finish`].
    pub fn authorize(
        &self,
        call: &Call,
        role: Role,
        tenant: Option<&TenantId>,
    ) -> Result<(), VaultError> {
        let identity = call
            .identity
            .as_deref()
            .ok_or(VaultError::Unauthenticated)?;
        let need = Need {
            role,
            tenant: tenant.map(TenantId::as_str),
        };
        if self.policy.current().allows(identity, need) {
            return Ok(());
        }
        Err(VaultError::PermissionDenied {
            identity: identity.to_owned(),
            operation: call.operation.to_owned(),
            role: role.to_string(),
            scope: tenant
                .map(|t| format!(" for tenant {t}"))
                .unwrap_or_default(),
        })
    }

    /// Checks that the peer holds `role` for at least one tenant. Used before a
    /// lookup by id, so that callers without the role cannot probe which ids
    /// exist; the tenant-scoped check follows once the record is loaded.
    pub fn authorize_role_anywhere(&self, call: &Call, role: Role) -> Result<(), VaultError> {
        let identity = call
            .identity
            .as_deref()
            .ok_or(VaultError::Unauthenticated)?;
        if self.policy.current().roles_of(identity).contains(&role) {
            return Ok(());
        }
        self.authorize(call, role, None)
    }

    /// Checks that the peer holds some role, any one, for at least one
    /// tenant: for calls that reveal nothing secret but are still not for
    /// strangers (`GetWrappingKey`).
    pub fn authorize_any_role(&self, call: &Call) -> Result<(), VaultError> {
        let identity = call
            .identity
            .as_deref()
            .ok_or(VaultError::Unauthenticated)?;
        if !self.policy.current().roles_of(identity).is_empty() {
            return Ok(());
        }
        Err(VaultError::PermissionDenied {
            identity: identity.to_owned(),
            operation: call.operation.to_owned(),
            role: "manager, uploader, auditor or admin".to_owned(),
            scope: String::new(),
        })
    }

    /// Writes the audit event for a finished RPC and returns its result. If the
    /// event cannot be made durable, the RPC fails UNAVAILABLE instead: nothing
    /// is returned that is not on the record.
    pub async fn finish<T>(
        &self,
        call: &Call,
        subject: Subject,
        result: Result<T, VaultError>,
    ) -> Result<T, Status> {
        let result = result.map_err(Status::from);
        if subject.audited && result.is_ok() {
            self.metrics.call(call.operation, "OK");
            return result;
        }
        let code = result.as_ref().err().map_or(tonic::Code::Ok, Status::code);
        self.metrics.call(call.operation, code_name(code));
        let record = Self::record(call, subject, code);
        let started = std::time::Instant::now();
        let appended = self.audit.append(record).await;
        self.metrics.audit_committed(started.elapsed());
        if let Err(error) = appended {
            self.metrics.audit_failures.inc();
            tracing::error!(%error, operation = call.operation, request_id = %call.request_id,
                "audit write failed; failing the call closed");
            return Err(VaultError::AuditUnavailable(error.to_string()).into());
        }
        if let Err(status) = &result {
            tracing::info!(operation = call.operation, request_id = %call.request_id,
                identity = call.identity.as_deref().unwrap_or("unauthenticated"),
                code = code_name(code), message = status.message(), "call refused");
        }
        result
    }

    /// The event of an access refused before any handler ran: a call (see
    /// [`crate::refusals`]) or TLS handshakes (in aggregate). Nothing was
    /// served, so a failed write is logged and counted, and nothing waits on it.
    pub async fn audit_refusal(&self, record: AuditRecord) {
        tracing::info!(operation = %record.operation, request_id = %record.request_id,
            identity = %record.identity, code = %record.code, detail = %record.detail,
            "access refused before any handler");
        let started = std::time::Instant::now();
        let appended = self.audit.append(record).await;
        self.metrics.audit_committed(started.elapsed());
        if let Err(error) = appended {
            self.metrics.audit_failures.inc();
            tracing::error!(%error, "audit write for a refused call failed");
        }
    }

    /// The success event of a state change, written durably from inside the
    /// store transaction just before it commits (call from a blocking thread).
    /// If it cannot be written, the transaction rolls back: no change is ever
    /// applied without its audit event. A failure of the COMMIT itself after
    /// this (rare: disk full) is followed by an "error" event for the same call.
    pub fn commit_gate(&self, call: &Call, subject: &Subject) -> Result<(), String> {
        let record = Self::record(call, subject.clone(), tonic::Code::Ok);
        let started = std::time::Instant::now();
        let appended = tokio::runtime::Handle::current().block_on(self.audit.append(record));
        self.metrics.audit_committed(started.elapsed());
        appended.map(|_| ()).map_err(|error| {
            self.metrics.audit_failures.inc();
            tracing::error!(%error, operation = call.operation, request_id = %call.request_id,
                    "audit write failed; change rolled back");
            error.to_string()
        })
    }

    fn record(call: &Call, subject: Subject, code: tonic::Code) -> AuditRecord {
        AuditRecord {
            tenant_id: subject.tenant_id,
            credential_id: subject.credential_id,
            lease_id: subject.lease_id,
            detail: subject.detail,
            ..call.record(code)
        }
    }

    /// Brings the keyring up to date with a database other vaults share: key
    /// versions another replica added are unwrapped and added, and its
    /// `min_decrypt_version` applies here from this call on. Nothing to do
    /// (and no query) on a database only this vault uses. Blocks.
    pub fn sync_keyring(&self) -> Result<(), VaultError> {
        if !self.store.shared() {
            return Ok(());
        }
        // One read in the common case (nothing changed): the count and newest
        // version of the keys, and min_decrypt_version.
        let state = self.store.keyring_state(MIN_DECRYPT_VERSION)?;
        let min = state
            .setting
            .and_then(|v| u32::try_from(v).ok())
            .unwrap_or(1);
        {
            let ring = self.keyring();
            let known = ring.versions();
            if known.len() == state.versions
                && (state.newest == 0 || known.contains(&state.newest))
                && ring.min_decrypt_version() == min
            {
                return Ok(());
            }
        }
        let known = self.keyring().versions();
        let missing: Vec<_> = self
            .store
            .key_versions()?
            .into_iter()
            .filter(|(v, _, _)| !known.contains(v))
            .collect();
        let mut ring = self.keyring_mut();
        for (version, wrapped, _) in missing {
            let key = keyring::unwrap_version(&self.master, version, &wrapped).map_err(|_| {
                VaultError::Unavailable(format!(
                    "key version {version} in the shared database does not unwrap with this \
                     vault's master key; every replica must use the same master_key_file"
                ))
            })?;
            if let Err(error) = ring.insert(version, key) {
                // Another call added it meanwhile.
                tracing::debug!(%error, "key version already loaded");
            }
        }
        ring.set_min_decrypt_version(min);
        Ok(())
    }

    /// The secret size limit in force for `tenant`.
    pub fn secret_limit(&self, tenant: &TenantId) -> Result<u32, VaultError> {
        Ok(self
            .store
            .tenant_limit(tenant)?
            .unwrap_or(self.config.limits.max_secret_chars))
    }

    pub fn keyring(&self) -> std::sync::RwLockReadGuard<'_, Keyring> {
        self.keyring.read().unwrap_or_else(|p| p.into_inner())
    }

    pub fn keyring_mut(&self) -> std::sync::RwLockWriteGuard<'_, Keyring> {
        self.keyring.write().unwrap_or_else(|p| p.into_inner())
    }
}

/// Runs blocking store/crypto work off the async runtime.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, VaultError> + Send + 'static,
) -> Result<T, VaultError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| VaultError::Unavailable(format!("worker task failed: {e}")))?
}
