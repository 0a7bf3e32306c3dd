//! Secrets cross gRPC sealed end to end, with the production setting
//! (`[secrets] allow_plaintext = false`): PutCredential opens a secret sealed
//! to the vault's sealing key for one tenant and name only, AcquireLease
//! seals to the caller's one-call key, and a secret in clear is refused with
//! a message naming the setting, with nothing stored or leased.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use recvault_proto::vault::v1::{
    AcquireLeaseRequest, AuditFilter, CredentialKind, GetSealingKeyRequest, ListCredentialsRequest,
};
use recvault_runtime::hpke;
use recvault_vault::testing::TestVault;
use tonic::Code;

/// A vault with the shipped default: no secrets in clear.
async fn production() -> (tempfile::TempDir, TestVault) {
    let (dir, vault) = start_with(|c| c.secrets.allow_plaintext = false).await;
    assert!(!vault.config.secrets.allow_plaintext);
    (dir, vault)
}

async fn names(vault: &TestVault) -> Vec<String> {
    credentials(vault, "manager")
        .list_credentials(ListCredentialsRequest {
            tenant_id: "acme".into(),
            include_deleted: true,
        })
        .await
        .unwrap()
        .into_inner()
        .credentials
        .into_iter()
        .map(|c| c.name)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sealed_put_and_a_sealed_lease_round_trip_and_are_audited_as_sealed() {
    let (_dir, vault) = production().await;
    let key = credentials(&vault, "uploader")
        .get_sealing_key(GetSealingKeyRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!((key.key_version, key.public_key.len()), (1, 32));
    assert_eq!(key.public_key, vault.core.sealing_key.public_key());
    assert_eq!(
        key.suite,
        "DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-256-GCM"
    );
    // Not the backup wrapping key: one key, one purpose.
    assert_ne!(key.public_key, vault.core.wrapping_key.public_key());

    let id = put_s3(&vault, "acme", "media", "sealed-end-to-end")
        .await
        .credential_id;
    let lease = acquire(&vault, &id).await;
    assert_eq!(lease.secret, s3_secret("AKIDEXAMPLE", "sealed-end-to-end"));
    for operation in [op::PUT, op::ACQUIRE] {
        let events = query(
            &vault,
            AuditFilter {
                operation: operation.into(),
                ..Default::default()
            },
        )
        .await;
        assert_eq!(events.len(), 1, "{operation}");
        assert!(
            events[0].detail.contains("secret=sealed"),
            "{:?}",
            events[0]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_in_clear_are_refused_naming_the_setting_and_nothing_is_stored_or_leased() {
    let (_dir, vault) = production().await;
    let status = expect_code(
        credentials(&vault, "manager")
            .put_credential(put_request(
                "acme",
                "clear",
                CredentialKind::S3,
                &s3_secret("AKIDEXAMPLE", "sent-in-clear"),
            ))
            .await,
        Code::FailedPrecondition,
    );
    assert!(
        status.message().contains("[secrets] allow_plaintext")
            && status.message().contains("GetSealingKey"),
        "{status:?}"
    );
    assert!(!status.message().contains("sent-in-clear"));
    assert!(names(&vault).await.is_empty());

    let id = put_s3(&vault, "acme", "media", "kept-sealed")
        .await
        .credential_id;
    let status = expect_code(
        leases(&vault, "uploader")
            .acquire_lease(acquire_request(&id, 30))
            .await,
        Code::FailedPrecondition,
    );
    assert!(
        status.message().contains("[secrets] allow_plaintext")
            && status.message().contains("recipient_public_key"),
        "{status:?}"
    );
    assert_eq!(vault.core.leases.active().unwrap(), 0);
    // Both refusals are on the record.
    let refused = query(
        &vault,
        AuditFilter {
            outcome: "error".into(),
            ..Default::default()
        },
    )
    .await;
    let ops: Vec<_> = refused
        .iter()
        .filter(|e| e.code == "FAILED_PRECONDITION")
        .map(|e| e.operation.as_str())
        .collect();
    assert_eq!(ops, [op::PUT, op::ACQUIRE]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sealed_secret_opens_only_for_its_tenant_name_and_key_version() {
    let (_dir, vault) = production().await;
    let secret = s3_secret("AKIDEXAMPLE", "bound-to-acme-media");
    let sealed = sealed_put_request(&vault, "acme", "media", CredentialKind::S3, &secret).await;
    let mut manager = credentials(&vault, "manager");

    // Replayed under another name (or tenant): does not open.
    let renamed = recvault_proto::vault::v1::PutCredentialRequest {
        name: "other".into(),
        ..sealed.clone()
    };
    let status = expect_code(manager.put_credential(renamed).await, Code::InvalidArgument);
    assert!(
        status.message().contains("sealed_secret does not open"),
        "{status:?}"
    );
    let moved = recvault_proto::vault::v1::PutCredentialRequest {
        tenant_id: "globex".into(),
        ..sealed.clone()
    };
    expect_code(manager.put_credential(moved).await, Code::InvalidArgument);

    // Another key generation, a flipped byte, both fields at once.
    let stale = recvault_proto::vault::v1::PutCredentialRequest {
        sealing_key_version: 2,
        ..sealed.clone()
    };
    let status = expect_code(
        manager.put_credential(stale).await,
        Code::FailedPrecondition,
    );
    assert!(
        status.message().contains("sealing_key_version 2"),
        "{status:?}"
    );
    let mut flipped = sealed.clone();
    flipped.sealed_secret[3] ^= 1;
    expect_code(manager.put_credential(flipped).await, Code::InvalidArgument);
    let both = recvault_proto::vault::v1::PutCredentialRequest {
        secret: secret.clone(),
        ..sealed.clone()
    };
    let status = expect_code(manager.put_credential(both).await, Code::InvalidArgument);
    assert!(status.message().contains("not both"), "{status:?}");
    assert!(names(&vault).await.is_empty(), "nothing half-written");

    // The secret's shape is still checked after opening.
    let not_json = sealed_put_request(&vault, "acme", "media", CredentialKind::S3, b"nope").await;
    let status = expect_code(
        manager.put_credential(not_json).await,
        Code::InvalidArgument,
    );
    assert!(status.message().contains("JSON"), "{status:?}");

    manager.put_credential(sealed).await.unwrap();
    assert_eq!(names(&vault).await, ["media"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_is_sealed_to_the_callers_key_bound_to_lease_and_credential() {
    let (_dir, vault) = production().await;
    let id = put_s3(&vault, "acme", "media", "for-one-caller")
        .await
        .credential_id;
    let one_call = hpke::OneCallKey::generate().unwrap();
    let reply = leases(&vault, "uploader")
        .acquire_lease(AcquireLeaseRequest {
            recipient_public_key: one_call.public_key().to_vec(),
            ..acquire_request(&id, 30)
        })
        .await
        .unwrap()
        .into_inner();
    assert!(reply.secret.is_empty());
    assert_eq!(reply.enc.len(), 32);
    let open = |lease: &str, credential: &str| {
        one_call.open(
            hpke::LEASE_INFO,
            &hpke::aad(&[lease, credential]),
            &reply.enc,
            &reply.sealed_secret,
        )
    };
    assert_eq!(
        open(&reply.lease_id, &id).unwrap().expose_secret(),
        s3_secret("AKIDEXAMPLE", "for-one-caller")
    );
    assert!(open("lease_other", &id).is_err());
    assert!(open(&reply.lease_id, "cred_other").is_err());
    assert!(
        hpke::OneCallKey::generate()
            .unwrap()
            .open(
                hpke::LEASE_INFO,
                &hpke::aad(&[&reply.lease_id, &id]),
                &reply.enc,
                &reply.sealed_secret
            )
            .is_err()
    );
    assert_eq!(vault.core.leases.active().unwrap(), 1);

    // A key that is not a usable X25519 public key: refused, no lease granted.
    for bad in [vec![7u8; 31], vec![0u8; 32]] {
        let status = expect_code(
            leases(&vault, "uploader")
                .acquire_lease(AcquireLeaseRequest {
                    recipient_public_key: bad,
                    ..acquire_request(&id, 30)
                })
                .await,
            Code::InvalidArgument,
        );
        assert!(
            status.message().contains("recipient_public_key"),
            "{status:?}"
        );
    }
    assert_eq!(vault.core.leases.active().unwrap(), 1);
}
