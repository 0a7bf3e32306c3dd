//! Shared helpers for the vault's gRPC integration tests: a real vault on
//! 127.0.0.1:0 over real mTLS (see `recvault_vault::testing`), typed clients
//! per identity, and the few calls most tests make.
#![allow(dead_code, clippy::unwrap_used)]

use std::{
    fmt::Debug,
    path::Path,
    sync::Arc,
    time::{Duration, SystemTime},
};

use recvault_proto::vault::v1::{
    AcquireLeaseRequest, AcquireLeaseResponse, AuditEvent, AuditFilter, CredentialKind,
    GetSealingKeyRequest, PutCredentialRequest, PutCredentialResponse, QueryEventsRequest,
    UnwrapDataKeyRequest, UnwrapDataKeyResponse, VerifyChainRequest, VerifyChainResponse,
    audit_client::AuditClient, credentials_client::CredentialsClient,
    data_keys_client::DataKeysClient, keys_client::KeysClient, leases_client::LeasesClient,
};
use recvault_runtime::datakey::{RESEAL_INFO, WRAP_INFO, binding};
use recvault_runtime::{devcerts, hpke};
use recvault_vault::{config::VaultConfig, testing::TestVault};
use rustls::crypto::hpke::{EncapsulatedSecret, Hpke, HpkePrivateKey};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};
use tempfile::TempDir;
use tokio::{io::AsyncReadExt, net::TcpStream};
use tokio_rustls::TlsConnector;
use tonic::{Code, Status, transport::Channel};

/// Operation names as written into audit events.
pub mod op {
    pub const PUT: &str = "recvault.vault.v1.Credentials/PutCredential";
    pub const GET: &str = "recvault.vault.v1.Credentials/GetCredential";
    pub const LIST: &str = "recvault.vault.v1.Credentials/ListCredentials";
    pub const DELETE: &str = "recvault.vault.v1.Credentials/DeleteCredential";
    pub const ACQUIRE: &str = "recvault.vault.v1.Leases/AcquireLease";
    pub const RELEASE: &str = "recvault.vault.v1.Leases/ReleaseLease";
    pub const ROTATE: &str = "recvault.vault.v1.Keys/RotateKey";
    pub const REWRAP: &str = "recvault.vault.v1.Keys/Rewrap";
    pub const KEY_STATUS: &str = "recvault.vault.v1.Keys/KeyStatus";
    pub const SET_LIMIT: &str = "recvault.vault.v1.Keys/SetTenantLimit";
    pub const RETIRE: &str = "recvault.vault.v1.Keys/RetireKeys";
    pub const QUERY: &str = "recvault.vault.v1.Audit/QueryEvents";
    pub const TAIL: &str = "recvault.vault.v1.Audit/TailEvents";
    pub const VERIFY: &str = "recvault.vault.v1.Audit/VerifyChain";
    pub const GET_WRAPPING_KEY: &str = "recvault.vault.v1.DataKeys/GetWrappingKey";
    pub const UNWRAP: &str = "recvault.vault.v1.DataKeys/UnwrapDataKey";
    pub const GET_SEALING_KEY: &str = "recvault.vault.v1.Credentials/GetSealingKey";
}

/// A fresh temporary directory and a vault serving from it.
///
/// Its config allows secrets in clear (`[secrets] allow_plaintext`), so the
/// raw [`put_request`] and [`acquire_request`] work as grpcurl's calls do;
/// [`put_s3`] and [`acquire`] seal as the CLI and the uploader do, and
/// `sealed_secrets.rs` runs with the production setting.
pub async fn start() -> (TempDir, TestVault) {
    start_with(|_| {}).await
}

/// Like [`start`], after `tweak` edits the config (TTLs, reload interval...).
pub async fn start_with(tweak: impl FnOnce(&mut VaultConfig)) -> (TempDir, TestVault) {
    let dir = TempDir::new().unwrap();
    let mut config = recvault_vault::testing::prepare(dir.path());
    config.secrets.allow_plaintext = true;
    tweak(&mut config);
    let vault = TestVault::start_with(config).await;
    (dir, vault)
}

/// `spiffe://recvault.local/<name>`.
pub fn spiffe(name: &str) -> String {
    devcerts::spiffe_id(name)
}

pub fn credentials(vault: &TestVault, identity: &str) -> CredentialsClient<Channel> {
    CredentialsClient::new(vault.channel(identity))
}

pub fn leases(vault: &TestVault, identity: &str) -> LeasesClient<Channel> {
    LeasesClient::new(vault.channel(identity))
}

pub fn keys(vault: &TestVault, identity: &str) -> KeysClient<Channel> {
    KeysClient::new(vault.channel(identity))
}

pub fn audit(vault: &TestVault, identity: &str) -> AuditClient<Channel> {
    AuditClient::new(vault.channel(identity))
}

pub fn data_keys(vault: &TestVault, identity: &str) -> DataKeysClient<Channel> {
    DataKeysClient::new(vault.channel(identity))
}

/// The HPKE suite of backup data keys (RFC 9180: DHKEM(X25519, HKDF-SHA256),
/// HKDF-SHA256, AES-256-GCM), as the uploader uses it.
pub fn hpke() -> &'static dyn Hpke {
    rustls::crypto::aws_lc_rs::hpke::DH_KEM_X25519_HKDF_SHA256_AES_256
}

/// A recording's data key wrapped the way the uploader wraps it: a fresh
/// random key sealed to `public_key` with WRAP_INFO and the recording's
/// binding. Returns (data key, enc, wrapped key).
pub fn wrap_data_key(
    public_key: &[u8],
    tenant: &str,
    recording: &str,
) -> ([u8; 32], Vec<u8>, Vec<u8>) {
    let mut data_key = [0u8; 32];
    getrandom::fill(&mut data_key).unwrap();
    let (enc, wrapped) = hpke()
        .seal(
            WRAP_INFO,
            &binding(tenant, recording),
            &data_key,
            &rustls::crypto::hpke::HpkePublicKey(public_key.to_vec()),
        )
        .unwrap();
    (data_key, enc.0, wrapped)
}

/// An UnwrapDataKey request for a wrapped key, with a fresh ephemeral
/// recipient key pair; the private half comes back to open the answer.
pub fn unwrap_request(
    tenant: &str,
    recording: &str,
    enc: &[u8],
    wrapped: &[u8],
) -> (UnwrapDataKeyRequest, HpkePrivateKey) {
    let (public, private) = hpke().generate_key_pair().unwrap();
    let request = UnwrapDataKeyRequest {
        tenant_id: tenant.into(),
        recording_id: recording.into(),
        key_version: 1,
        enc: enc.to_vec(),
        wrapped_key: wrapped.to_vec(),
        recipient_public_key: public.0,
        purpose: "deliver".into(),
        job_id: "5f0c6f9e-1b2a-4c3d-8e9f-0a1b2c3d4e5f".into(),
    };
    (request, private)
}

/// Opens an UnwrapDataKey answer with the ephemeral private key: RESEAL_INFO
/// and the same binding as the wrap.
pub fn open_resealed(
    response: &UnwrapDataKeyResponse,
    private: &HpkePrivateKey,
    tenant: &str,
    recording: &str,
) -> Vec<u8> {
    hpke()
        .open(
            &EncapsulatedSecret(response.enc.clone()),
            RESEAL_INFO,
            &binding(tenant, recording),
            &response.sealed_key,
            private,
        )
        .unwrap()
}

/// An S3 credential's JSON secret.
pub fn s3_secret(access_key_id: &str, secret_access_key: &str) -> Vec<u8> {
    serde_json::json!({
        "access_key_id": access_key_id,
        "secret_access_key": secret_access_key,
    })
    .to_string()
    .into_bytes()
}

pub fn put_request(
    tenant: &str,
    name: &str,
    kind: CredentialKind,
    secret: &[u8],
) -> PutCredentialRequest {
    PutCredentialRequest {
        tenant_id: tenant.into(),
        name: name.into(),
        kind: kind.into(),
        secret: secret.to_vec(),
        labels: [("env".to_owned(), "test".to_owned())].into(),
        ..Default::default()
    }
}

/// A put request with the secret sealed to the vault's sealing key, as the
/// `recvault` CLI sends it.
pub async fn sealed_put_request(
    vault: &TestVault,
    tenant: &str,
    name: &str,
    kind: CredentialKind,
    secret: &[u8],
) -> PutCredentialRequest {
    let key = credentials(vault, "manager")
        .get_sealing_key(GetSealingKeyRequest {})
        .await
        .unwrap()
        .into_inner();
    let (enc, sealed_secret) = hpke::seal(
        &key.public_key,
        hpke::PUT_INFO,
        &hpke::aad(&[tenant, name]),
        secret,
    )
    .unwrap();
    PutCredentialRequest {
        enc,
        sealed_secret,
        sealing_key_version: key.key_version,
        ..put_request(tenant, name, kind, b"")
    }
}

/// Stores an S3 credential as the manager, sealed; panics on failure.
pub async fn put_s3(
    vault: &TestVault,
    tenant: &str,
    name: &str,
    secret_access_key: &str,
) -> PutCredentialResponse {
    let request = sealed_put_request(
        vault,
        tenant,
        name,
        CredentialKind::S3,
        &s3_secret("AKIDEXAMPLE", secret_access_key),
    )
    .await;
    credentials(vault, "manager")
        .put_credential(request)
        .await
        .unwrap_or_else(|s| panic!("PutCredential {tenant}/{name}: {s:?}"))
        .into_inner()
}

/// A lease request asking for the secret in clear (grpcurl's way).
pub fn acquire_request(credential_id: &str, ttl_seconds: u32) -> AcquireLeaseRequest {
    AcquireLeaseRequest {
        credential_id: credential_id.into(),
        purpose: "recording rec-1".into(),
        ttl_seconds,
        recipient_public_key: Vec::new(),
    }
}

/// Leases a credential as the uploader does: sealed to a one-call key, which
/// opens it. The opened secret is put into the answer's `secret` for the
/// test to read; panics on failure.
pub async fn acquire(vault: &TestVault, credential_id: &str) -> AcquireLeaseResponse {
    let one_call = hpke::OneCallKey::generate().unwrap();
    let mut reply = leases(vault, "uploader")
        .acquire_lease(AcquireLeaseRequest {
            recipient_public_key: one_call.public_key().to_vec(),
            ..acquire_request(credential_id, 60)
        })
        .await
        .unwrap_or_else(|s| panic!("AcquireLease {credential_id}: {s:?}"))
        .into_inner();
    assert!(
        reply.secret.is_empty(),
        "a sealed lease carries no clear secret"
    );
    let opened = one_call
        .open(
            hpke::LEASE_INFO,
            &hpke::aad(&[&reply.lease_id, credential_id]),
            &reply.enc,
            &reply.sealed_secret,
        )
        .expect("the sealed secret opens with the one-call key, lease and credential");
    reply.secret = opened.expose_secret().to_vec();
    reply
}

/// Asserts that `result` failed with `code` and returns the status.
#[track_caller]
pub fn expect_code<T: Debug>(result: Result<T, Status>, code: Code) -> Status {
    match result {
        Ok(v) => panic!("expected {code:?}, got Ok({v:?})"),
        Err(s) => {
            assert_eq!(s.code(), code, "unexpected status: {s:?}");
            s
        }
    }
}

/// Every audit event matching `filter`, read as the auditor.
pub async fn query(vault: &TestVault, filter: AuditFilter) -> Vec<AuditEvent> {
    let mut stream = audit(vault, "auditor")
        .query_events(QueryEventsRequest {
            filter: Some(filter),
            after_sequence: 0,
            limit: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut events = Vec::new();
    while let Some(event) = stream.message().await.unwrap() {
        events.push(event);
    }
    events
}

pub async fn verify_chain(vault: &TestVault) -> VerifyChainResponse {
    audit(vault, "auditor")
        .verify_chain(VerifyChainRequest {})
        .await
        .unwrap()
        .into_inner()
}

/// Seconds from now until a protobuf timestamp.
pub fn seconds_from_now(t: &prost_types::Timestamp) -> f64 {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    t.seconds as f64 + f64::from(t.nanos) / 1e9 - now
}

// ---- raw TLS, for handshake tests ----------------------------------------

pub fn load_certs(path: &Path) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_file_iter(path)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

pub fn load_key(path: &Path) -> PrivateKeyDer<'static> {
    PrivateKeyDer::from_pem_file(path).unwrap()
}

pub fn roots(ca: &Path) -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    for cert in load_certs(ca) {
        roots.add(cert).unwrap();
    }
    roots
}

/// Hex SHA-256 of the first certificate in a PEM file.
pub fn file_fingerprint(cert: &Path) -> String {
    recvault_runtime::identity::fingerprint(&load_certs(cert)[0])
}

/// A client config trusting `ca` and presenting `identity`'s certificate from `certs_dir`.
pub fn client_config(ca: &Path, certs_dir: &Path, identity: &str) -> rustls::ClientConfig {
    let files = devcerts::files(certs_dir, identity);
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots(ca))
        .with_client_auth_cert(load_certs(&files.cert), load_key(&files.key))
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    config
}

/// Connects to the vault with `config` and reads the first bytes the server
/// sends (its HTTP/2 SETTINGS). In TLS 1.3 the server judges the client
/// certificate after the client has finished its side of the handshake, so a
/// refusal may only show on that first read. Returns the fingerprint of the
/// server's leaf certificate.
pub async fn handshake(vault: &TestVault, config: rustls::ClientConfig) -> std::io::Result<String> {
    let connector = TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(vault.addr).await?;
    let name = ServerName::try_from("localhost").unwrap();
    let attempt = async {
        let mut tls = connector.connect(name, tcp).await?;
        let leaf = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| recvault_runtime::identity::fingerprint(c))
            .unwrap_or_default();
        let mut buf = [0u8; 64];
        match tls.read(&mut buf).await? {
            0 => Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "server closed the connection after the handshake",
            )),
            _ => Ok(leaf),
        }
    };
    tokio::time::timeout(Duration::from_secs(5), attempt)
        .await
        .unwrap_or_else(|_| Err(std::io::Error::other("handshake timed out")))
}
