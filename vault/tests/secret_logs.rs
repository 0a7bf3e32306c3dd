//! No log line holds a secret: capture everything the vault logs (its own
//! crates at TRACE, dependencies at DEBUG) while secrets travel through every
//! path — stored, refused, leased, failed closed, rotated — and search it.
//! Its own test binary, because the tracing subscriber is process-global.
#![allow(clippy::unwrap_used)]

mod common;

use std::{
    io::Write,
    sync::{Arc, Mutex},
};

use common::*;
use recvault_proto::vault::v1::{
    CredentialKind, DeleteCredentialRequest, ReleaseLeaseRequest, RewrapRequest, RotateKeyRequest,
};
use tonic::Code;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_reach_the_logs() {
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            "debug,recvault_vault=trace,recvault_runtime=trace",
        ))
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .init();

    let access = "AKIDLOGCHECK00000001";
    let secret = "LogCheckSecretAccessKey-0123456789";
    let (_dir, vault) = start().await;
    let mut manager = credentials(&vault, "manager");
    let mut uploader = leases(&vault, "uploader");

    let id = put_s3(&vault, "acme", "logged", secret).await.credential_id;
    // Refused inputs that carry the secret.
    for body in [
        serde_json::json!({ "access_key_id": access, "secret_acess_key": secret }).to_string(),
        format!("{access}:{secret}"),
        format!("{secret}{}", "x".repeat(6000)),
    ] {
        manager
            .put_credential(put_request(
                "acme",
                "bad",
                CredentialKind::S3,
                body.as_bytes(),
            ))
            .await
            .unwrap_err();
    }
    // Leased, denied, failed closed, released, rotated, rewrapped, deleted.
    let lease = uploader
        .acquire_lease(acquire_request(&id, 30))
        .await
        .unwrap()
        .into_inner();
    expect_code(
        leases(&vault, "stranger")
            .acquire_lease(acquire_request(&id, 30))
            .await,
        Code::PermissionDenied,
    );
    vault.core.audit.fail_writes(true);
    expect_code(
        uploader.acquire_lease(acquire_request(&id, 30)).await,
        Code::Unavailable,
    );
    vault.core.audit.fail_writes(false);
    uploader
        .release_lease(ReleaseLeaseRequest {
            lease_id: lease.lease_id,
        })
        .await
        .unwrap();
    let mut admin = keys(&vault, "admin");
    admin.rotate_key(RotateKeyRequest {}).await.unwrap();
    admin
        .rewrap(RewrapRequest {
            tenant_id: String::new(),
        })
        .await
        .unwrap();
    acquire(&vault, &id).await;
    manager
        .delete_credential(DeleteCredentialRequest {
            credential_id: id.clone(),
        })
        .await
        .unwrap();
    vault.stop().await;

    let logs = String::from_utf8_lossy(&captured.0.lock().unwrap()).into_owned();
    // The capture works: refusals and the fail-closed path are logged.
    assert!(logs.contains("call refused"), "{logs}");
    assert!(logs.contains("audit write failed"), "{logs}");
    for needle in [secret, access] {
        assert!(
            !logs.contains(needle),
            "{needle} appears in the logs:\n{}",
            logs.lines()
                .filter(|l| l.contains(needle))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}
