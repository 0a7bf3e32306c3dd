//! `DataKeys`: the wrapping public key for anyone the policy knows, and the
//! unwrap of a recording's data key for the uploader role of that tenant. A
//! data key leaves only sealed to the caller's ephemeral key, and only after
//! the call's audit event is durable; in clear it exists only in locked memory.

use std::sync::Arc;

use recvault_proto::vault::v1::{
    GetWrappingKeyRequest, GetWrappingKeyResponse, UnwrapDataKeyRequest, UnwrapDataKeyResponse,
    data_keys_server,
};
use recvault_runtime::datakey::KEY_LEN;
use tonic::{Request, Response, Status};

use crate::{
    core::{Call, Subject, VaultCore},
    datakeys::{self, DataKeyError, ENC_LEN, SUITE, WRAPPED_KEY_LEN},
    error::VaultError,
    ids::{TenantId, check_token},
    policy::Role,
};

/// Longest recording or job id, as the uploader allows them.
const MAX_ID_BYTES: usize = 128;
/// Longest purpose string recorded in the audit log (as for leases).
const MAX_PURPOSE_BYTES: usize = 256;

#[derive(Debug, Clone)]
pub struct DataKeysService {
    core: Arc<VaultCore>,
}

/// Refuses a bytes field of the wrong length, naming it.
fn check_len(field: &str, value: &[u8], want: usize) -> Result<(), VaultError> {
    if value.len() == want {
        return Ok(());
    }
    Err(VaultError::InvalidArgument(format!(
        "{field} is {} bytes; it must be exactly {want}",
        value.len()
    )))
}

impl DataKeysService {
    pub fn new(core: Arc<VaultCore>) -> Self {
        Self { core }
    }

    fn wrapping_key(
        &self,
        subject: &mut Subject,
        call: &Call,
    ) -> Result<GetWrappingKeyResponse, VaultError> {
        self.core.authorize_any_role(call)?;
        let key = &self.core.wrapping_key;
        subject.detail = format!("key_version={}", key.version());
        Ok(GetWrappingKeyResponse {
            key_version: key.version(),
            public_key: key.public_key().to_vec(),
            suite: SUITE.to_owned(),
        })
    }

    /// `refused` is set when the wrapped key did not open (for the metric).
    fn unwrap(
        &self,
        subject: &mut Subject,
        call: &Call,
        req: &UnwrapDataKeyRequest,
        refused: &mut bool,
    ) -> Result<UnwrapDataKeyResponse, VaultError> {
        // A peer without the role gets PERMISSION_DENIED before any input check.
        self.core.authorize_role_anywhere(call, Role::Uploader)?;
        let tenant = TenantId::parse(&req.tenant_id).map_err(VaultError::InvalidArgument)?;
        subject.tenant_id = tenant.to_string();
        self.core.authorize(call, Role::Uploader, Some(&tenant))?;
        check_token("recording_id", &req.recording_id, MAX_ID_BYTES)
            .map_err(VaultError::InvalidArgument)?;
        check_token("job_id", &req.job_id, MAX_ID_BYTES).map_err(VaultError::InvalidArgument)?;
        if req.purpose.is_empty() {
            return Err(VaultError::InvalidArgument(
                "purpose is required: say why the data key is needed, e.g. \"deliver\" or \"fetch-backup\"".into(),
            ));
        }
        if req.purpose.len() > MAX_PURPOSE_BYTES || req.purpose.chars().any(char::is_control) {
            return Err(VaultError::InvalidArgument(format!(
                "purpose must be at most {MAX_PURPOSE_BYTES} bytes without control characters"
            )));
        }
        subject.detail = format!(
            "recording_id={} job_id={} purpose={} key_version={}",
            req.recording_id, req.job_id, req.purpose, req.key_version
        );
        let key = &self.core.wrapping_key;
        if req.key_version != key.version() {
            return Err(VaultError::FailedPrecondition(format!(
                "key_version {} is not a wrapping key generation this vault holds (it holds {}); \
                 the backup header names a generation from another vault version",
                req.key_version,
                key.version()
            )));
        }
        check_len("enc", &req.enc, ENC_LEN)?;
        check_len("wrapped_key", &req.wrapped_key, WRAPPED_KEY_LEN)?;
        check_len("recipient_public_key", &req.recipient_public_key, KEY_LEN)?;
        let data_key = key
            .unwrap(
                tenant.as_str(),
                &req.recording_id,
                &req.enc,
                &req.wrapped_key,
            )
            .map_err(|e| {
                *refused = true;
                // One answer for every way it can fail: no oracle on the bytes.
                tracing::warn!(tenant_id = %tenant, recording_id = %req.recording_id,
                    "a wrapped data key did not open");
                VaultError::FailedPrecondition(e.to_string())
            })?;
        let (enc, sealed_key) = datakeys::reseal(
            &req.recipient_public_key,
            tenant.as_str(),
            &req.recording_id,
            &data_key,
        )
        .map_err(|e| match e {
            DataKeyError::BadRecipient => VaultError::InvalidArgument(e.to_string()),
            _ => VaultError::Unavailable(e.to_string()),
        })?;
        // `data_key` (locked memory) is zeroized here; only the sealed copy goes out.
        drop(data_key);
        Ok(UnwrapDataKeyResponse { enc, sealed_key })
    }
}

#[tonic::async_trait]
impl data_keys_server::DataKeys for DataKeysService {
    async fn get_wrapping_key(
        &self,
        request: Request<GetWrappingKeyRequest>,
    ) -> Result<Response<GetWrappingKeyResponse>, Status> {
        let call = self
            .core
            .call(&request, "recvault.vault.v1.DataKeys/GetWrappingKey");
        let mut subject = Subject::default();
        let result = self.wrapping_key(&mut subject, &call);
        self.core
            .finish(&call, subject, result)
            .await
            .map(Response::new)
    }

    async fn unwrap_data_key(
        &self,
        request: Request<UnwrapDataKeyRequest>,
    ) -> Result<Response<UnwrapDataKeyResponse>, Status> {
        let call = self
            .core
            .call(&request, "recvault.vault.v1.DataKeys/UnwrapDataKey");
        let mut subject = Subject::default();
        let mut refused = false;
        let result = self.unwrap(&mut subject, &call, request.get_ref(), &mut refused);
        // Fail closed: if the event is not durable, the sealed key is dropped, never sent.
        let finished = self.core.finish(&call, subject, result).await;
        let metrics = &self.core.metrics;
        match &finished {
            Ok(_) => metrics.unwraps_granted.inc(),
            Err(s) if s.code() == tonic::Code::PermissionDenied => metrics.unwraps_denied.inc(),
            Err(_) if refused => metrics.unwraps_refused.inc(),
            Err(_) => {}
        }
        finished.map(Response::new)
    }
}
