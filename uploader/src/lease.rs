//! Credentials for one delivery attempt, leased from the vault over mTLS as
//! the `uploader` identity, sealed by the vault to a key pair made for that
//! one call (HPKE, see `recvault_runtime::hpke`) and opened straight into
//! locked, zeroizing memory. The secret lives only there and
//! the lease is released on every exit path (success, error, panic,
//! cancellation: the guard's `Drop`). Never cached across jobs.

use std::time::Duration;

use recvault_proto::vault::v1::{
    AcquireLeaseRequest, ReleaseLeaseRequest, data_keys_client::DataKeysClient,
    leases_client::LeasesClient,
};
use recvault_runtime::hpke::{self, OneCallKey};
use recvault_runtime::{logging::REQUEST_ID_HEADER, secret::SecretBytes, tls};
use tonic::{Code, transport::Channel};

use crate::config::VaultClientConfig;

/// Why a lease could not be had; `permanent` decides RETAINED vs RETRYING.
#[derive(Debug, thiserror::Error)]
#[error("vault refused the credential lease ({code:?}): {message}")]
pub struct LeaseError {
    pub code: Code,
    pub message: String,
}

impl LeaseError {
    /// A deleted/unknown credential or a missing grant will not fix itself by retrying.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self.code,
            Code::NotFound
                | Code::PermissionDenied
                | Code::InvalidArgument
                | Code::FailedPrecondition
                | Code::Unauthenticated
        )
    }
}

/// The vault's lease API, as the uploader uses it.
#[derive(Debug, Clone)]
pub struct VaultLeases {
    client: LeasesClient<Channel>,
    /// The vault's `DataKeys` service on the same channel (see `crate::datakey`).
    pub(crate) data_keys: DataKeysClient<Channel>,
    ttl_secs: u32,
}

impl VaultLeases {
    /// Prepares the mTLS channel (connects lazily, reconnects on failure).
    pub fn new(config: &VaultClientConfig) -> Result<Self, tls::TlsError> {
        let channel = tls::channel(&config.endpoint, &config.server_name, &config.tls)?;
        Ok(Self {
            client: LeasesClient::new(channel.clone()),
            data_keys: DataKeysClient::new(channel),
            ttl_secs: config.lease_ttl_secs,
        })
    }

    /// Leases `credential_id` for `purpose`, carrying `request_id` into the vault's audit event.
    pub async fn acquire(
        &self,
        credential_id: &str,
        purpose: &str,
        request_id: &str,
    ) -> Result<Lease, LeaseError> {
        let local = |code, message: &str| LeaseError {
            code,
            message: message.to_owned(),
        };
        // A key pair for this one attempt: the vault seals the secret to it,
        // so the gRPC, HTTP/2 and TLS buffers only ever hold ciphertext.
        let one_call = OneCallKey::generate()
            .map_err(|_| local(Code::Internal, "generating the one-call key pair failed"))?;
        let mut request = tonic::Request::new(AcquireLeaseRequest {
            credential_id: credential_id.to_owned(),
            purpose: purpose.to_owned(),
            ttl_seconds: self.ttl_secs,
            recipient_public_key: one_call.public_key().to_vec(),
        });
        request.set_timeout(Duration::from_secs(15));
        if let Ok(v) = request_id.parse() {
            request.metadata_mut().insert(REQUEST_ID_HEADER, v);
        }
        let mut reply = self
            .client
            .clone()
            .acquire_lease(request)
            .await
            .map_err(|s| LeaseError {
                code: s.code(),
                message: s.message().to_owned(),
            })?
            .into_inner();
        let mut lease = Lease {
            id: std::mem::take(&mut reply.lease_id),
            secret: SecretBytes::zeroed(0),
            request_id: request_id.to_owned(),
            leases: Some(self.clone()),
        };
        if reply.sealed_secret.is_empty() {
            // A vault that ignored the key (older than sealing) sent the
            // secret in clear: wipe it, release the lease (on drop) and retry
            // later, when the vault is upgraded.
            drop(SecretBytes::new(std::mem::take(&mut reply.secret)));
            return Err(local(
                Code::Unimplemented,
                "the vault answered without sealing the secret to this call's key (a vault older than sealed leases?); the secret was discarded",
            ));
        }
        lease.secret = one_call
            .open(
                hpke::LEASE_INFO,
                &hpke::aad(&[&lease.id, credential_id]),
                &reply.enc,
                &reply.sealed_secret,
            )
            .map_err(|_| {
                local(
                    Code::Internal,
                    "the vault's sealed secret does not open with this call's key, lease and credential",
                )
            })?;
        Ok(lease)
    }

    async fn release(&self, lease_id: String, request_id: String) {
        let mut request = tonic::Request::new(ReleaseLeaseRequest {
            lease_id: lease_id.clone(),
        });
        request.set_timeout(Duration::from_secs(10));
        if let Ok(v) = request_id.parse() {
            request.metadata_mut().insert(REQUEST_ID_HEADER, v);
        }
        if let Err(status) = self.client.clone().release_lease(request).await {
            // The lease still expires on its own; nothing secret is in this message.
            tracing::warn!(%lease_id, code = ?status.code(), message = status.message(), "releasing the lease failed");
        }
    }
}

/// A leased secret. Dropping it zeroizes the secret and releases the lease.
#[derive(Debug)]
pub struct Lease {
    pub id: String,
    secret: SecretBytes,
    request_id: String,
    leases: Option<VaultLeases>,
}

impl Lease {
    /// The plaintext credential (JSON per kind).
    pub fn secret(&self) -> &[u8] {
        self.secret.expose_secret()
    }

    /// Releases now and waits for the vault's answer (the normal path).
    pub async fn release(mut self) {
        if let Some(leases) = self.leases.take() {
            leases
                .release(std::mem::take(&mut self.id), self.request_id.clone())
                .await;
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        // Error, panic or cancellation: release in the background. The secret
        // itself is zeroized when `self.secret` drops right after this.
        if let Some(leases) = self.leases.take() {
            let id = std::mem::take(&mut self.id);
            let request_id = std::mem::take(&mut self.request_id);
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn(async move { leases.release(id, request_id).await });
            }
        }
    }
}
