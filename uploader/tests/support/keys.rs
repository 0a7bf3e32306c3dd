//! A wrapping key pair made in the test, standing in for the vault's (the
//! real one is derived from the master key in another crate): the public
//! half as the file `vaultd wrapping-key` writes, and the private half to
//! read backups back and to answer `DataKeys/UnwrapDataKey` the way the vault
//! does (HPKE open with `WRAP_INFO`, re-seal to the caller with `RESEAL_INFO`,
//! the same associated data). Real HPKE, real AES-GCM; nothing is faked but
//! where the private key lives.
#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use base64::Engine as _;
use recvault_proto::vault::v1 as vault;
use recvault_runtime::{datakey, secret::SecretBytes};
use recvault_uploader::backup::format::Header;
use recvault_uploader::backup::wrapping::{WrappingKey, suite};
use recvault_uploader::backup::{BackupStore, EncryptedSource};
use recvault_uploader::destination::Source as _;
use rustls::crypto::hpke::{EncapsulatedSecret, HpkePrivateKey, HpkePublicKey};
use tokio::io::AsyncReadExt as _;
use tonic::{Request, Response, Status};

/// The key pair.
pub struct TestWrapping {
    pub key: WrappingKey,
    private: HpkePrivateKey,
}

impl TestWrapping {
    pub fn generate() -> Arc<Self> {
        let (public, private) = suite().generate_key_pair().expect("X25519 key pair");
        let public: [u8; 32] = public.0.as_slice().try_into().expect("32 bytes");
        Arc::new(Self {
            key: WrappingKey::new(1, public),
            private,
        })
    }

    /// Writes the public key file in the format `vaultd wrapping-key` writes.
    pub fn write_file(&self, path: &Path) {
        let b64 = base64::engine::general_purpose::STANDARD.encode(self.key.public_key());
        std::fs::write(
            path,
            format!(
                "# recvault backup wrapping public key (test)\nkey_version = {}\npublic_key = \"{b64}\"\n",
                self.key.version()
            ),
        )
        .expect("write the wrapping key file");
    }

    /// Opens a header's wrapped data key, as the vault does.
    pub fn unwrap(&self, header: &Header) -> Result<SecretBytes, Status> {
        self.open(
            &header.enc,
            &header.tenant_id,
            &header.recording_id,
            &header.wrapped_key,
        )
    }

    fn open(
        &self,
        enc: &[u8],
        tenant: &str,
        recording: &str,
        wrapped: &[u8],
    ) -> Result<SecretBytes, Status> {
        suite()
            .open(
                &EncapsulatedSecret(enc.to_vec()),
                datakey::WRAP_INFO,
                &datakey::binding(tenant, recording),
                wrapped,
                &self.private,
            )
            .map(SecretBytes::new)
            .map_err(|_| {
                Status::invalid_argument(
                    "the wrapped data key does not open for this tenant and recording",
                )
            })
    }

    /// Opens a backup of `store` with the private key.
    pub async fn source(
        &self,
        store: &BackupStore,
        path: &Path,
    ) -> std::io::Result<EncryptedSource> {
        let header = store
            .read_header(path)
            .await
            .map_err(std::io::Error::other)?
            .ok_or_else(|| std::io::Error::other("no RVBK header"))?;
        let key = self.unwrap(&header).map_err(std::io::Error::other)?;
        store.open_encrypted(path, header, key).await
    }

    /// The whole plaintext of a backup.
    pub async fn read_plain(&self, store: &BackupStore, path: &Path) -> std::io::Result<Vec<u8>> {
        let source = self.source(store, path).await?;
        let mut out = Vec::new();
        source
            .open_range(0, source.size())
            .await?
            .read_to_end(&mut out)
            .await?;
        Ok(out)
    }
}

/// The vault's `DataKeys` service, answering with the test key pair.
#[derive(Clone)]
pub struct StandInDataKeys {
    pub wrapping: Arc<TestWrapping>,
    /// UnwrapDataKey calls answered (granted or not).
    pub unwraps: Arc<AtomicUsize>,
    /// While set, every call fails UNAVAILABLE (a vault that is down).
    pub down: Arc<AtomicBool>,
}

impl StandInDataKeys {
    pub fn new(wrapping: Arc<TestWrapping>) -> Self {
        Self {
            wrapping,
            unwraps: Arc::default(),
            down: Arc::default(),
        }
    }

    pub fn server(&self) -> vault::data_keys_server::DataKeysServer<Self> {
        vault::data_keys_server::DataKeysServer::new(self.clone())
    }
}

#[tonic::async_trait]
impl vault::data_keys_server::DataKeys for StandInDataKeys {
    async fn get_wrapping_key(
        &self,
        _request: Request<vault::GetWrappingKeyRequest>,
    ) -> Result<Response<vault::GetWrappingKeyResponse>, Status> {
        Ok(Response::new(vault::GetWrappingKeyResponse {
            key_version: self.wrapping.key.version(),
            public_key: self.wrapping.key.public_key().to_vec(),
            suite: "DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-256-GCM".into(),
        }))
    }

    async fn unwrap_data_key(
        &self,
        request: Request<vault::UnwrapDataKeyRequest>,
    ) -> Result<Response<vault::UnwrapDataKeyResponse>, Status> {
        self.unwraps.fetch_add(1, Ordering::SeqCst);
        if self.down.load(Ordering::SeqCst) {
            return Err(Status::unavailable("the vault is down (test)"));
        }
        let r = request.into_inner();
        if r.key_version != self.wrapping.key.version() {
            return Err(Status::failed_precondition("key_version is unknown"));
        }
        let key = self
            .wrapping
            .open(&r.enc, &r.tenant_id, &r.recording_id, &r.wrapped_key)?;
        let (enc, sealed) = suite()
            .seal(
                datakey::RESEAL_INFO,
                &datakey::binding(&r.tenant_id, &r.recording_id),
                key.expose_secret(),
                &HpkePublicKey(r.recipient_public_key),
            )
            .map_err(|_| Status::invalid_argument("recipient_public_key is not an X25519 key"))?;
        Ok(Response::new(vault::UnwrapDataKeyResponse {
            enc: enc.0,
            sealed_key: sealed,
        }))
    }
}
