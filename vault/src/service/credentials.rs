//! `Credentials`: write-only for people. The manager role stores, lists,
//! inspects and deletes credentials, and never gets plaintext or ciphertext back.

use std::{collections::BTreeMap, sync::Arc};

use recvault_proto::vault::v1::{
    Credential, CredentialKind, DeleteCredentialRequest, DeleteCredentialResponse,
    GetCredentialRequest, GetSealingKeyRequest, GetSealingKeyResponse, ListCredentialsRequest,
    ListCredentialsResponse, PutCredentialRequest, PutCredentialResponse, credentials_server,
};
use recvault_runtime::secret::SecretBytes;
use tonic::{Request, Response, Status};

use crate::{
    core::{Subject, VaultCore, blocking},
    error::VaultError,
    ids::{CredentialId, TenantId},
    policy::Role,
    sealing::plaintext_refused,
    store::{CredentialRow, NewCredential},
};

/// Most labels per credential and their sizes: metadata, not a data store.
const MAX_LABELS: usize = 32;
const MAX_LABEL_BYTES: usize = 256;
const MAX_NAME_BYTES: usize = 256;

#[derive(Debug, Clone)]
pub struct CredentialsService {
    core: Arc<VaultCore>,
}

impl CredentialsService {
    pub fn new(core: Arc<VaultCore>) -> Self {
        Self { core }
    }
}

pub(crate) fn to_proto(row: CredentialRow) -> Credential {
    Credential {
        credential_id: row.credential_id.to_string(),
        tenant_id: row.tenant_id.to_string(),
        name: row.name,
        kind: row.kind,
        version: row.version,
        labels: row.labels.into_iter().collect(),
        created_at: Some(super::timestamp(row.created_at)),
        updated_at: Some(super::timestamp(row.updated_at)),
        deleted: row.deleted,
        key_version: row.key_version,
        secret_chars: row.secret_chars,
    }
}

fn invalid(message: String) -> VaultError {
    VaultError::InvalidArgument(message)
}

fn check_name(name: &str) -> Result<(), VaultError> {
    if name.trim().is_empty() {
        return Err(invalid(
            "name is required: a human-readable name for the credential, unique per tenant".into(),
        ));
    }
    if name.len() > MAX_NAME_BYTES || name.chars().any(char::is_control) {
        return Err(invalid(format!(
            "name must be at most {MAX_NAME_BYTES} bytes without control characters"
        )));
    }
    Ok(())
}

fn check_labels(
    labels: &std::collections::HashMap<String, String>,
) -> Result<BTreeMap<String, String>, VaultError> {
    if labels.len() > MAX_LABELS {
        return Err(invalid(format!(
            "labels has {} entries; the limit is {MAX_LABELS}",
            labels.len()
        )));
    }
    for (k, v) in labels {
        if k.is_empty() || k.len() > MAX_LABEL_BYTES || v.len() > MAX_LABEL_BYTES {
            return Err(invalid(format!(
                "labels: keys must be 1..={MAX_LABEL_BYTES} bytes and values at most {MAX_LABEL_BYTES} bytes (key {k:?})"
            )));
        }
    }
    Ok(labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
}

/// Counts characters (UTF-8 scalar values; bytes for non-UTF-8 secrets) and
/// checks the kind's JSON shape. Errors never quote the secret.
fn check_secret(kind: CredentialKind, secret: &SecretBytes, limit: u32) -> Result<u32, VaultError> {
    let bytes = secret.expose_secret();
    if bytes.is_empty() {
        return Err(invalid("secret is required and must not be empty".into()));
    }
    let chars = std::str::from_utf8(bytes).map_or(bytes.len(), |s| s.chars().count());
    let chars = u32::try_from(chars).unwrap_or(u32::MAX);
    if chars > limit {
        return Err(invalid(format!(
            "secret is {chars} characters; this tenant's limit is {limit} (admins can raise it with Keys/SetTenantLimit)"
        )));
    }
    let required: &[&str] = match kind {
        CredentialKind::S3 => &["access_key_id", "secret_access_key"],
        CredentialKind::Gcs => &["private_key", "client_email"],
        CredentialKind::Azure => &["account_name"],
        CredentialKind::Generic => &[],
        CredentialKind::Unspecified => {
            return Err(invalid(
                "kind is required: one of CREDENTIAL_KIND_S3, CREDENTIAL_KIND_GCS, CREDENTIAL_KIND_AZURE, CREDENTIAL_KIND_GENERIC".into(),
            ));
        }
    };
    if !required.is_empty() {
        let kind_name = kind.as_str_name();
        let parsed: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(bytes)
            .map_err(|_| {
                invalid(format!(
                    "secret for {kind_name} must be a JSON object (its content is not shown)"
                ))
            })?;
        for field in required {
            let present = parsed
                .get(*field)
                .and_then(serde_json::Value::as_str)
                .is_some_and(|s| !s.is_empty());
            if !present {
                return Err(invalid(format!(
                    "secret for {kind_name} must be JSON with a non-empty string field {field:?}"
                )));
            }
        }
        // `parsed` holds copies of secret strings: wipe them before dropping.
        for (_, mut value) in parsed {
            if let serde_json::Value::String(s) = &mut value {
                zeroize::Zeroize::zeroize(s);
            }
        }
    }
    Ok(chars)
}

/// The audit detail of a stored version: which one, and how it arrived.
fn detail(version: u32, sealed: bool) -> String {
    let how = if sealed { "sealed" } else { "clear" };
    format!("version {version} secret={how}")
}

impl CredentialsService {
    fn sealing_key(
        &self,
        subject: &mut Subject,
        call: &crate::core::Call,
    ) -> Result<GetSealingKeyResponse, VaultError> {
        self.core.authorize_any_role(call)?;
        let key = &self.core.sealing_key;
        subject.detail = format!("key_version={}", key.version());
        Ok(GetSealingKeyResponse {
            key_version: key.version(),
            public_key: key.public_key().to_vec(),
            suite: recvault_runtime::hpke::SUITE_NAME.to_owned(),
        })
    }

    async fn put(
        &self,
        subject: &mut Subject,
        call: &crate::core::Call,
        mut req: PutCredentialRequest,
    ) -> Result<PutCredentialResponse, VaultError> {
        // Move the secret out of the request into locked memory first, so every
        // exit path below zeroizes it.
        let clear = SecretBytes::new(std::mem::take(&mut req.secret));
        // A peer without the role gets PERMISSION_DENIED before any input check.
        self.core.authorize_role_anywhere(call, Role::Manager)?;
        let tenant = TenantId::parse(&req.tenant_id).map_err(invalid)?;
        subject.tenant_id = tenant.to_string();
        self.core.authorize(call, Role::Manager, Some(&tenant))?;
        check_name(&req.name)?;
        let sealed = !req.sealed_secret.is_empty();
        let secret = match (clear.is_empty(), sealed) {
            (false, true) => {
                return Err(invalid(
                    "set either sealed_secret (with enc and sealing_key_version) or secret, not both"
                        .into(),
                ));
            }
            (true, true) => self.core.sealing_key.open_put(
                tenant.as_str(),
                &req.name,
                req.sealing_key_version,
                &req.enc,
                &req.sealed_secret,
            )?,
            (false, false) if !self.core.config.secrets.allow_plaintext => {
                return Err(plaintext_refused(
                    "PutCredential's secret",
                    "seal it to the key Credentials/GetSealingKey returns and send sealed_secret",
                ));
            }
            // In clear on a debug vault, or missing (check_secret names it).
            _ => clear,
        };
        let kind = CredentialKind::try_from(req.kind)
            .map_err(|_| invalid(format!("kind {} is not a known CredentialKind", req.kind)))?;
        let labels = check_labels(&req.labels)?;
        let core = self.core.clone();
        let name = req.name;
        let gate_call = call.clone();
        let gate_subject = subject.clone();
        let (id, version) = blocking(move || {
            core.sync_keyring()?;
            let limit = core.secret_limit(&tenant)?;
            let secret_chars = check_secret(kind, &secret, limit)?;
            let new = NewCredential {
                tenant_id: &tenant,
                name: &name,
                kind: kind as i32,
                labels: &labels,
                secret_chars,
            };
            let keyring = core.keyring();
            Ok(core.store.put(
                &new,
                &mut |id, version| {
                    let key_version = keyring
                        .current_version()
                        .ok_or_else(|| "the keyring has no key version".to_owned())?;
                    let sealed = keyring
                        .seal(
                            tenant.as_str(),
                            id.as_str(),
                            version,
                            secret.expose_secret(),
                        )
                        .map_err(|_| "sealing the secret failed".to_owned())?;
                    Ok((sealed, key_version))
                },
                &mut |id, version| {
                    let subject = Subject {
                        credential_id: id.to_string(),
                        detail: detail(version, sealed),
                        ..gate_subject.clone()
                    };
                    core.commit_gate(&gate_call, &subject)
                },
            )?)
        })
        .await?;
        subject.credential_id = id.to_string();
        subject.detail = detail(version, sealed);
        subject.audited = true;
        Ok(PutCredentialResponse {
            credential_id: id.to_string(),
            version,
        })
    }

    /// Loads a credential for a manager call: checks the id, the grant for its
    /// tenant, and that it exists.
    async fn load(
        &self,
        subject: &mut Subject,
        call: &crate::core::Call,
        id: &str,
    ) -> Result<CredentialRow, VaultError> {
        self.core.authorize_role_anywhere(call, Role::Manager)?;
        let id = CredentialId::parse(id).map_err(invalid)?;
        subject.credential_id = id.to_string();
        // Authorize the role before revealing whether the id exists.
        self.core.authorize_role_anywhere(call, Role::Manager)?;
        let store = self.core.store.clone();
        let lookup = id.clone();
        let row = blocking(move || Ok(store.get(&lookup)?)).await?;
        let row =
            row.ok_or_else(|| VaultError::NotFound(format!("credential {id} does not exist")))?;
        subject.tenant_id = row.tenant_id.to_string();
        self.core
            .authorize(call, Role::Manager, Some(&row.tenant_id))?;
        Ok(row)
    }
}

#[tonic::async_trait]
impl credentials_server::Credentials for CredentialsService {
    async fn put_credential(
        &self,
        request: Request<PutCredentialRequest>,
    ) -> Result<Response<PutCredentialResponse>, Status> {
        let call = self.core.call(
            &request,
            concat!("recvault.vault.v1.Credentials/", "PutCredential"),
        );
        let mut subject = Subject::default();
        let result = self.put(&mut subject, &call, request.into_inner()).await;
        self.core
            .finish(&call, subject, result)
            .await
            .map(Response::new)
    }

    async fn get_sealing_key(
        &self,
        request: Request<GetSealingKeyRequest>,
    ) -> Result<Response<GetSealingKeyResponse>, Status> {
        let call = self.core.call(
            &request,
            concat!("recvault.vault.v1.Credentials/", "GetSealingKey"),
        );
        let mut subject = Subject::default();
        let result = self.sealing_key(&mut subject, &call);
        self.core
            .finish(&call, subject, result)
            .await
            .map(Response::new)
    }

    async fn get_credential(
        &self,
        request: Request<GetCredentialRequest>,
    ) -> Result<Response<Credential>, Status> {
        let call = self.core.call(
            &request,
            concat!("recvault.vault.v1.Credentials/", "GetCredential"),
        );
        let mut subject = Subject::default();
        let result = self
            .load(&mut subject, &call, &request.get_ref().credential_id)
            .await
            .map(to_proto);
        self.core
            .finish(&call, subject, result)
            .await
            .map(Response::new)
    }

    async fn list_credentials(
        &self,
        request: Request<ListCredentialsRequest>,
    ) -> Result<Response<ListCredentialsResponse>, Status> {
        let call = self.core.call(
            &request,
            concat!("recvault.vault.v1.Credentials/", "ListCredentials"),
        );
        let mut subject = Subject::default();
        let req = request.into_inner();
        let result = async {
            self.core.authorize_role_anywhere(&call, Role::Manager)?;
            let tenant = TenantId::parse(&req.tenant_id).map_err(invalid)?;
            subject.tenant_id = tenant.to_string();
            self.core.authorize(&call, Role::Manager, Some(&tenant))?;
            let store = self.core.store.clone();
            let rows = blocking(move || Ok(store.list(&tenant, req.include_deleted)?)).await?;
            Ok(ListCredentialsResponse {
                credentials: rows.into_iter().map(to_proto).collect(),
            })
        }
        .await;
        self.core
            .finish(&call, subject, result)
            .await
            .map(Response::new)
    }

    async fn delete_credential(
        &self,
        request: Request<DeleteCredentialRequest>,
    ) -> Result<Response<DeleteCredentialResponse>, Status> {
        let call = self.core.call(
            &request,
            concat!("recvault.vault.v1.Credentials/", "DeleteCredential"),
        );
        let mut subject = Subject::default();
        let result = async {
            let row = self
                .load(&mut subject, &call, &request.get_ref().credential_id)
                .await?;
            if row.deleted {
                return Err(VaultError::NotFound(format!(
                    "credential {} is already deleted",
                    row.credential_id
                )));
            }
            let core = self.core.clone();
            let id = row.credential_id.clone();
            let (gate_call, gate_subject) = (call.clone(), subject.clone());
            let deleted = blocking(move || {
                Ok(core
                    .store
                    .delete(&id, &mut || core.commit_gate(&gate_call, &gate_subject))?)
            })
            .await?;
            if !deleted {
                return Err(VaultError::NotFound(format!(
                    "credential {} is already deleted",
                    row.credential_id
                )));
            }
            subject.audited = true;
            Ok(DeleteCredentialResponse {
                credential_id: row.credential_id.to_string(),
            })
        }
        .await;
        self.core
            .finish(&call, subject, result)
            .await
            .map(Response::new)
    }
}
