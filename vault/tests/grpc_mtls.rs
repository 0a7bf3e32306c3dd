//! The vault's four services over real mTLS, as the manager, uploader,
//! admin and auditor use them: credentials (metadata only), limits, leases,
//! fail-closed audit, key rotation, and what the audit log records.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use prost::Message;
use recvault_proto::vault::v1::{
    AcquireLeaseRequest, AuditFilter, CredentialKind, DeleteCredentialRequest,
    GetCredentialRequest, KeyStatusRequest, ListCredentialsRequest, ReleaseLeaseRequest,
    RetireKeysRequest, RewrapRequest, RotateKeyRequest, SetTenantLimitRequest, TailEventsRequest,
};
use recvault_vault::testing::TestVault;
use tonic::{Code, Request};

/// Asserts that neither the Debug form nor the wire encoding of `message`
/// holds `secret`.
#[track_caller]
fn assert_no_secret<M: Message + std::fmt::Debug>(message: &M, secret: &str) {
    let debug = format!("{message:?}");
    assert!(!debug.contains(secret), "secret in Debug: {debug}");
    let wire = message.encode_to_vec();
    assert!(
        !wire.windows(secret.len()).any(|w| w == secret.as_bytes()),
        "secret in the encoded message {debug}"
    );
}

/// Every event in the audit log, as the auditor sees it.
async fn all_events(vault: &TestVault) -> Vec<recvault_proto::vault::v1::AuditEvent> {
    query(vault, AuditFilter::default()).await
}

fn credential_db(vault: &TestVault) -> rusqlite::Connection {
    rusqlite::Connection::open_with_flags(
        vault.config.database.as_deref().expect("a SQLite vault"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap()
}

// ---- credentials ----------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_are_versioned_metadata_only_and_crypto_shredded() {
    let (_dir, vault) = start().await;
    let mut manager = credentials(&vault, "manager");
    let secret_v1 = "wJalrXUtnFEMI-first-version-SECRET";
    let secret_v2 = "wJalrXUtnFEMI-second-version-SECRET";

    let first = put_s3(&vault, "acme", "archive", secret_v1).await;
    assert!(first.credential_id.starts_with("cred_"), "{first:?}");
    assert_eq!(first.version, 1);
    let second = put_s3(&vault, "acme", "archive", secret_v2).await;
    assert_eq!(
        second.credential_id, first.credential_id,
        "same name, same id"
    );
    assert_eq!(second.version, 2);
    let id = first.credential_id;

    let got = manager
        .get_credential(GetCredentialRequest {
            credential_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.credential_id, id);
    assert_eq!(got.tenant_id, "acme");
    assert_eq!(got.name, "archive");
    assert_eq!(got.kind, i32::from(CredentialKind::S3));
    assert_eq!(got.version, 2);
    assert!(!got.deleted);
    assert_eq!(got.key_version, 1);
    assert_eq!(got.labels.get("env").map(String::as_str), Some("test"));
    let json_len = s3_secret("AKIDEXAMPLE", secret_v2).len();
    assert_eq!(got.secret_chars as usize, json_len);
    let listed = manager
        .list_credentials(ListCredentialsRequest {
            tenant_id: "acme".into(),
            include_deleted: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.credentials.len(), 1);
    for secret in [secret_v1, secret_v2, "AKIDEXAMPLE"] {
        assert_no_secret(&got, secret);
        assert_no_secret(&listed, secret);
    }

    // The uploader gets the newest version's plaintext.
    let lease = acquire(&vault, &id).await;
    assert_eq!(lease.credential_version, 2);
    assert_eq!(lease.secret, s3_secret("AKIDEXAMPLE", secret_v2));

    // Delete: the record becomes a tombstone and its ciphertext is gone.
    let deleted = manager
        .delete_credential(DeleteCredentialRequest {
            credential_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(deleted.credential_id, id);
    let tombstone = manager
        .get_credential(GetCredentialRequest {
            credential_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(tombstone.deleted, "{tombstone:?}");
    let status = expect_code(
        leases(&vault, "uploader")
            .acquire_lease(acquire_request(&id, 30))
            .await,
        Code::NotFound,
    );
    assert!(status.message().contains(&id), "{status:?}");
    expect_code(
        manager
            .delete_credential(DeleteCredentialRequest {
                credential_id: id.clone(),
            })
            .await,
        Code::NotFound,
    );
    let live = manager
        .list_credentials(ListCredentialsRequest {
            tenant_id: "acme".into(),
            include_deleted: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(live.credentials.is_empty(), "{live:?}");
    let sealed: Option<Vec<u8>> = credential_db(&vault)
        .query_row(
            "SELECT sealed FROM credentials WHERE credential_id = ?1",
            [&id],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(sealed, None, "ciphertext must be removed on delete");

    // A new credential under the same name starts again at version 1.
    let again = put_s3(&vault, "acme", "archive", "third").await;
    assert_ne!(again.credential_id, id);
    assert_eq!(again.version, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_credential_input_gets_clear_errors_without_echoing_secrets() {
    let (_dir, vault) = start().await;
    let mut manager = credentials(&vault, "manager");
    let leaked_key = "AKIDSHOULDNOTAPPEAR1";
    let leaked_secret = "TopSecretValueNeverEchoed";

    // Empty tenant.
    let status = expect_code(
        manager
            .put_credential(put_request(
                "",
                "n",
                CredentialKind::S3,
                &s3_secret(leaked_key, leaked_secret),
            ))
            .await,
        Code::InvalidArgument,
    );
    assert!(status.message().contains("tenant_id"), "{status:?}");
    let status = expect_code(
        manager
            .list_credentials(ListCredentialsRequest {
                tenant_id: String::new(),
                include_deleted: false,
            })
            .await,
        Code::InvalidArgument,
    );
    assert!(status.message().contains("tenant_id"), "{status:?}");

    // Unknown but well-formed id, malformed id, empty id.
    let unknown = "cred_0123456789abcdef0123456789abcdef";
    expect_code(
        manager
            .get_credential(GetCredentialRequest {
                credential_id: unknown.into(),
            })
            .await,
        Code::NotFound,
    );
    expect_code(
        leases(&vault, "uploader")
            .acquire_lease(acquire_request(unknown, 10))
            .await,
        Code::NotFound,
    );
    for bad in ["../../etc/passwd", "cred 1", ""] {
        let status = expect_code(
            manager
                .get_credential(GetCredentialRequest {
                    credential_id: bad.into(),
                })
                .await,
            Code::InvalidArgument,
        );
        assert!(status.message().contains("credential_id"), "{status:?}");
        expect_code(
            leases(&vault, "uploader")
                .acquire_lease(acquire_request(bad, 10))
                .await,
            Code::InvalidArgument,
        );
    }
    let status = expect_code(
        leases(&vault, "uploader")
            .release_lease(ReleaseLeaseRequest {
                lease_id: "lease/../x".into(),
            })
            .await,
        Code::InvalidArgument,
    );
    assert!(status.message().contains("lease_id"), "{status:?}");

    // S3 JSON without secret_access_key (a misspelt field carries the secret).
    let missing = serde_json::json!({
        "access_key_id": leaked_key,
        "secret_acess_key": leaked_secret,
    })
    .to_string();
    let status = expect_code(
        manager
            .put_credential(put_request(
                "acme",
                "s3",
                CredentialKind::S3,
                missing.as_bytes(),
            ))
            .await,
        Code::InvalidArgument,
    );
    assert!(status.message().contains("secret_access_key"), "{status:?}");
    assert!(!status.message().contains(leaked_secret), "{status:?}");
    assert!(!status.message().contains(leaked_key), "{status:?}");
    // Not JSON at all.
    let status = expect_code(
        manager
            .put_credential(put_request(
                "acme",
                "s3",
                CredentialKind::S3,
                format!("{leaked_key}:{leaked_secret}").as_bytes(),
            ))
            .await,
        Code::InvalidArgument,
    );
    assert!(status.message().contains("JSON"), "{status:?}");
    // No kind.
    let status = expect_code(
        manager
            .put_credential(put_request(
                "acme",
                "nokind",
                CredentialKind::Unspecified,
                &s3_secret(leaked_key, leaked_secret),
            ))
            .await,
        Code::InvalidArgument,
    );
    assert!(status.message().contains("kind"), "{status:?}");
    // Empty secret.
    expect_code(
        manager
            .put_credential(put_request("acme", "empty", CredentialKind::Generic, b""))
            .await,
        Code::InvalidArgument,
    );

    // Nothing was stored, and the audit log recorded the refusals without the secret.
    let listed = manager
        .list_credentials(ListCredentialsRequest {
            tenant_id: "acme".into(),
            include_deleted: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(listed.credentials.is_empty(), "{listed:?}");
    let events = all_events(&vault).await;
    let refused_puts = events
        .iter()
        .filter(|e| e.operation == op::PUT && e.code == "INVALID_ARGUMENT")
        .count();
    assert_eq!(refused_puts, 5);
    for event in &events {
        assert_no_secret(event, leaked_key);
        assert_no_secret(event, leaked_secret);
    }
}

/// No shape error for an S3 secret quotes any part of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shape_errors_never_quote_the_secret() {
    let (_dir, vault) = start().await;
    let mut manager = credentials(&vault, "manager");
    let needle = "SuperSecretNeedle42";
    let bodies = [
        serde_json::json!({"access_key_id": needle}).to_string(),
        serde_json::json!({"secret_access_key": needle}).to_string(),
        serde_json::json!({"access_key_id": "", "secret_access_key": needle}).to_string(),
        format!("{{\"access_key_id\": \"{needle}\""),
        needle.to_owned(),
    ];
    for body in bodies {
        let status = expect_code(
            manager
                .put_credential(put_request(
                    "acme",
                    "s3",
                    CredentialKind::S3,
                    body.as_bytes(),
                ))
                .await,
            Code::InvalidArgument,
        );
        assert!(!status.message().contains(needle), "{status:?}");
    }
}

// ---- limits -----------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_size_limit_defaults_to_5000_and_tenants_can_be_raised() {
    let (_dir, vault) = start().await;
    let mut manager = credentials(&vault, "manager");
    let put = |tenant: &str, name: &str, len: usize| {
        put_request(
            tenant,
            name,
            CredentialKind::Generic,
            "x".repeat(len).as_bytes(),
        )
    };

    manager
        .put_credential(put("small", "at-limit", 5000))
        .await
        .unwrap();
    let status = expect_code(
        manager.put_credential(put("small", "over", 5001)).await,
        Code::InvalidArgument,
    );
    assert!(status.message().contains("5000"), "{status:?}");
    // Characters, not bytes: 5000 two-byte characters fit.
    manager
        .put_credential(put_request(
            "small",
            "utf8",
            CredentialKind::Generic,
            "é".repeat(5000).as_bytes(),
        ))
        .await
        .unwrap();

    // Only an admin may raise a tenant's limit.
    let raise = SetTenantLimitRequest {
        tenant_id: "big".into(),
        max_secret_chars: 20_000,
    };
    expect_code(
        keys(&vault, "manager")
            .set_tenant_limit(raise.clone())
            .await,
        Code::PermissionDenied,
    );
    let raised = keys(&vault, "admin")
        .set_tenant_limit(raise)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(raised.tenant_id, "big");
    assert_eq!(raised.max_secret_chars, 20_000);

    let big = manager
        .put_credential(put("big", "cert", 10_000))
        .await
        .unwrap()
        .into_inner();
    let status = expect_code(
        manager.put_credential(put("small", "cert", 10_000)).await,
        Code::InvalidArgument,
    );
    assert!(status.message().contains("5000"), "{status:?}");
    let status = expect_code(
        manager.put_credential(put("big", "huge", 20_001)).await,
        Code::InvalidArgument,
    );
    assert!(status.message().contains("20000"), "{status:?}");
    // The long secret leases back intact.
    let lease = acquire(&vault, &big.credential_id).await;
    assert_eq!(lease.secret.len(), 10_000);

    // The override is capped by the vault's configuration.
    let status = expect_code(
        keys(&vault, "admin")
            .set_tenant_limit(SetTenantLimitRequest {
                tenant_id: "big".into(),
                max_secret_chars: vault.config.limits.max_tenant_secret_chars + 1,
            })
            .await,
        Code::InvalidArgument,
    );
    assert!(
        status.message().contains("max_tenant_secret_chars"),
        "{status:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_over_64_kib_are_refused() {
    let (_dir, vault) = start().await;
    assert_eq!(vault.config.limits.max_request_bytes, 64 * 1024);
    keys(&vault, "admin")
        .set_tenant_limit(SetTenantLimitRequest {
            tenant_id: "big".into(),
            max_secret_chars: 200_000,
        })
        .await
        .unwrap();
    let mut manager = credentials(&vault, "manager");
    // tonic refuses the message before any handler runs: RESOURCE_EXHAUSTED,
    // as gRPC's status table says (the decoder's OUT_OF_RANGE, rewritten).
    let status = expect_code(
        manager
            .put_credential(put_request(
                "big",
                "huge",
                CredentialKind::Generic,
                &vec![b'x'; 70 * 1024],
            ))
            .await,
        Code::ResourceExhausted,
    );
    assert!(status.message().contains("65536"), "{status:?}");
    // Just under the cap still works, and the connection is still usable.
    manager
        .put_credential(put_request(
            "big",
            "large",
            CredentialKind::Generic,
            &vec![b'x'; 60 * 1024],
        ))
        .await
        .unwrap();
    // The same cap applies to the other services.
    expect_code(
        leases(&vault, "uploader")
            .acquire_lease(AcquireLeaseRequest {
                credential_id: "cred_x".into(),
                purpose: "p".repeat(70 * 1024),
                ttl_seconds: 1,
                recipient_public_key: Vec::new(),
            })
            .await,
        Code::ResourceExhausted,
    );
}

// ---- leases -------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_ttl_is_capped_and_a_lease_releases_once() {
    let (_dir, vault) = start().await;
    let id = put_s3(&vault, "acme", "bucket", "lease-secret")
        .await
        .credential_id;
    let mut uploader = leases(&vault, "uploader");

    let capped = uploader
        .acquire_lease(acquire_request(&id, 100_000))
        .await
        .unwrap()
        .into_inner();
    let ttl = seconds_from_now(capped.expires_at.as_ref().unwrap());
    assert!((295.0..=302.0).contains(&ttl), "ttl {ttl}");
    assert_eq!(capped.secret, s3_secret("AKIDEXAMPLE", "lease-secret"));
    assert!(capped.lease_id.starts_with("lease_"));

    let default = uploader
        .acquire_lease(acquire_request(&id, 0))
        .await
        .unwrap()
        .into_inner();
    let ttl = seconds_from_now(default.expires_at.as_ref().unwrap());
    assert!((55.0..=62.0).contains(&ttl), "default ttl {ttl}");
    assert_ne!(default.lease_id, capped.lease_id);

    let release = ReleaseLeaseRequest {
        lease_id: capped.lease_id.clone(),
    };
    let released = uploader
        .release_lease(release.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(released.lease_id, capped.lease_id);
    let status = expect_code(uploader.release_lease(release).await, Code::NotFound);
    assert!(status.message().contains(&capped.lease_id), "{status:?}");
    expect_code(
        uploader
            .release_lease(ReleaseLeaseRequest {
                lease_id: "lease_00000000000000000000000000000000".into(),
            })
            .await,
        Code::NotFound,
    );

    // Both releases are audited with the lease, credential and tenant.
    let events = query(
        &vault,
        AuditFilter {
            lease_id: capped.lease_id.clone(),
            ..Default::default()
        },
    )
    .await;
    let ops: Vec<_> = events
        .iter()
        .map(|e| (e.operation.as_str(), e.code.as_str()))
        .collect();
    assert_eq!(
        ops,
        [
            (op::ACQUIRE, "OK"),
            (op::RELEASE, "OK"),
            (op::RELEASE, "NOT_FOUND")
        ]
    );
    assert_eq!(events[1].credential_id, id);
    assert_eq!(events[1].tenant_id, "acme");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_lease_cannot_be_released() {
    let (_dir, vault) = start_with(|c| {
        c.leases.default_ttl_secs = 1;
        c.leases.max_ttl_secs = 1;
    })
    .await;
    let id = put_s3(&vault, "acme", "short", "short-lived")
        .await
        .credential_id;
    let mut uploader = leases(&vault, "uploader");
    let lease = uploader
        .acquire_lease(acquire_request(&id, 3600))
        .await
        .unwrap()
        .into_inner();
    let ttl = seconds_from_now(lease.expires_at.as_ref().unwrap());
    assert!(ttl <= 1.5, "ttl {ttl}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let status = uploader
        .release_lease(ReleaseLeaseRequest {
            lease_id: lease.lease_id.clone(),
        })
        .await
        .expect_err("an expired lease must not be released");
    assert!(
        matches!(status.code(), Code::NotFound | Code::FailedPrecondition),
        "{status:?}"
    );
    // Nor twice.
    expect_code(
        uploader
            .release_lease(ReleaseLeaseRequest {
                lease_id: lease.lease_id,
            })
            .await,
        Code::NotFound,
    );
}

// ---- fail closed --------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_fails_closed_when_the_audit_log_cannot_write() {
    let (_dir, vault) = start().await;
    let secret = "fail-closed-secret";
    let id = put_s3(&vault, "acme", "fc", secret).await.credential_id;
    let mut uploader = leases(&vault, "uploader");
    let before = vault.core.audit.head().0;

    vault.core.audit.fail_writes(true);
    let status = expect_code(
        uploader.acquire_lease(acquire_request(&id, 60)).await,
        Code::Unavailable,
    );
    assert!(!status.message().contains(secret), "{status:?}");
    assert_eq!(
        vault.core.leases.active().unwrap(),
        0,
        "the lease must be revoked"
    );
    assert_eq!(vault.core.audit.head().0, before, "nothing was recorded");
    vault.core.audit.fail_writes(false);

    let lease = uploader
        .acquire_lease(acquire_request(&id, 60))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(lease.secret, s3_secret("AKIDEXAMPLE", secret));
    assert_eq!(vault.core.leases.active().unwrap(), 1);
    let verified = verify_chain(&vault).await;
    assert!(verified.ok, "{verified:?}");
    // Exactly one lease was handed out, and it is on the record.
    let granted = query(
        &vault,
        AuditFilter {
            operation: op::ACQUIRE.into(),
            outcome: "allowed".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(granted.len(), 1);
    assert_eq!(granted[0].lease_id, lease.lease_id);
}

/// Fail closed for changes too: PutCredential, DeleteCredential, RotateKey,
/// Rewrap, SetTenantLimit and RetireKeys commit only after their audit event
/// is durable, so when the audit write fails the RPC answers UNAVAILABLE and
/// nothing changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutations_are_not_applied_when_the_audit_log_cannot_write() {
    let (_dir, vault) = start().await;
    vault.core.audit.fail_writes(true);
    expect_code(
        credentials(&vault, "manager")
            .put_credential(put_request(
                "acme",
                "unaudited",
                CredentialKind::Generic,
                b"s",
            ))
            .await,
        Code::Unavailable,
    );
    expect_code(
        keys(&vault, "admin").rotate_key(RotateKeyRequest {}).await,
        Code::Unavailable,
    );
    vault.core.audit.fail_writes(false);
    let listed = credentials(&vault, "manager")
        .list_credentials(ListCredentialsRequest {
            tenant_id: "acme".into(),
            include_deleted: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(listed.credentials.is_empty(), "unaudited put: {listed:?}");
    let status = keys(&vault, "admin")
        .key_status(KeyStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.current_version, 1, "unaudited rotation");
}

// ---- keys ---------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_rotation_rewrap_and_retirement() {
    let (_dir, vault) = start().await;
    let mut admin = keys(&vault, "admin");
    let a = put_s3(&vault, "acme", "a", "secret-a").await.credential_id;
    let b = put_s3(&vault, "globex", "b", "secret-b")
        .await
        .credential_id;

    let rotated = admin
        .rotate_key(RotateKeyRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rotated.key_version, 2);
    // Old credentials still lease; new ones are sealed under version 2.
    assert_eq!(
        acquire(&vault, &a).await.secret,
        s3_secret("AKIDEXAMPLE", "secret-a")
    );
    let c = put_s3(&vault, "acme", "c", "secret-c").await.credential_id;
    let status = admin
        .key_status(KeyStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.current_version, 2);
    assert_eq!(status.min_decrypt_version, 1);
    let counts: Vec<_> = status
        .versions
        .iter()
        .map(|v| (v.version, v.credentials))
        .collect();
    assert_eq!(counts, [(1, 2), (2, 1)]);

    // Retiring version 1 is refused while credentials still use it.
    let refused = expect_code(
        admin
            .retire_keys(RetireKeysRequest {
                min_decrypt_version: 2,
            })
            .await,
        Code::FailedPrecondition,
    );
    assert!(refused.message().contains("Rewrap"), "{refused:?}");
    expect_code(
        admin
            .retire_keys(RetireKeysRequest {
                min_decrypt_version: 3,
            })
            .await,
        Code::InvalidArgument,
    );

    let rewrapped = admin
        .rewrap(RewrapRequest {
            tenant_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rewrapped.rewrapped, 2);
    assert_eq!(rewrapped.key_version, 2);
    let again = admin
        .rewrap(RewrapRequest {
            tenant_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.rewrapped, 0);

    let retired = admin
        .retire_keys(RetireKeysRequest {
            min_decrypt_version: 2,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(retired.min_decrypt_version, 2);
    let counts: Vec<_> = retired
        .versions
        .iter()
        .map(|v| (v.version, v.credentials))
        .collect();
    assert_eq!(counts, [(1, 0), (2, 3)]);

    // Every credential still leases, with its own plaintext.
    for (id, secret) in [(&a, "secret-a"), (&b, "secret-b"), (&c, "secret-c")] {
        assert_eq!(
            acquire(&vault, id).await.secret,
            s3_secret("AKIDEXAMPLE", secret)
        );
        let meta = credentials(&vault, "manager")
            .get_credential(GetCredentialRequest {
                credential_id: id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(meta.key_version, 2);
    }
    // The stored rows and their envelope headers carry key version 2.
    let db = credential_db(&vault);
    let mut stmt = db
        .prepare("SELECT key_version, sealed FROM credentials WHERE deleted = 0")
        .unwrap();
    let rows: Vec<(u32, Vec<u8>)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(rows.len(), 3);
    for (key_version, sealed) in rows {
        assert_eq!(key_version, 2);
        let header = recvault_vault::crypto::parse_header(&sealed).unwrap();
        assert_eq!(header.key_version, 2);
    }
}

// ---- audit content --------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_event_carries_request_id_ids_identity_and_fingerprint() {
    let (_dir, vault) = start().await;
    let secret = "audited-secret-value";
    let id = put_s3(&vault, "acme", "audited", secret)
        .await
        .credential_id;

    let mut request = Request::new(acquire_request(&id, 30));
    request
        .metadata_mut()
        .insert("x-request-id", "test-req-1".parse().unwrap());
    let lease = leases(&vault, "uploader")
        .acquire_lease(request)
        .await
        .unwrap()
        .into_inner();

    let events = query(
        &vault,
        AuditFilter {
            request_id: "test-req-1".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(events.len(), 1, "{events:#?}");
    let e = &events[0];
    assert_eq!(e.operation, op::ACQUIRE);
    assert_eq!(e.request_id, "test-req-1");
    assert_eq!(e.lease_id, lease.lease_id);
    assert_eq!(e.credential_id, id);
    assert_eq!(e.tenant_id, "acme");
    assert_eq!(e.identity, "spiffe://recvault.local/uploader");
    assert_eq!(e.outcome, "allowed");
    assert_eq!(e.code, "OK");
    assert_eq!(e.cert_fingerprint.len(), 64);
    assert!(e.cert_fingerprint.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(
        e.cert_fingerprint,
        file_fingerprint(&vault.certs.join("uploader.crt"))
    );
    assert_eq!(e.hash.len(), 32);
    assert_eq!(e.prev_hash.len(), 32);
    assert!(e.detail.contains("recording rec-1"), "{e:?}");
    assert_no_secret(e, secret);

    // Without the header, the vault makes a request id up.
    acquire(&vault, &id).await;
    let generated = query(
        &vault,
        AuditFilter {
            operation: op::ACQUIRE.into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(generated.len(), 2);
    assert!(!generated[1].request_id.is_empty());
    assert_ne!(generated[1].request_id, "test-req-1");

    // Nothing in the whole log holds the secret.
    for event in all_events(&vault).await {
        assert_no_secret(&event, secret);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_events_follows_calls_made_after_subscribing() {
    let (_dir, vault) = start().await;
    let id = put_s3(&vault, "acme", "tailed", "tail-secret")
        .await
        .credential_id;
    let head = vault.core.audit.head().0;
    assert!(head >= 1);

    let mut tail = audit(&vault, "auditor")
        .tail_events(TailEventsRequest {
            filter: Some(AuditFilter {
                operation: op::ACQUIRE.into(),
                ..Default::default()
            }),
            after_sequence: head,
        })
        .await
        .unwrap()
        .into_inner();

    let mut request = Request::new(acquire_request(&id, 30));
    request
        .metadata_mut()
        .insert("x-request-id", "tail-req-1".parse().unwrap());
    let lease = leases(&vault, "uploader")
        .acquire_lease(request)
        .await
        .unwrap()
        .into_inner();

    let event = tokio::time::timeout(Duration::from_secs(5), tail.message())
        .await
        .expect("TailEvents delivered nothing within 5 s")
        .unwrap()
        .expect("stream ended");
    assert!(event.sequence > head, "{event:?}");
    assert_eq!(event.operation, op::ACQUIRE);
    assert_eq!(event.request_id, "tail-req-1");
    assert_eq!(event.lease_id, lease.lease_id);

    // A denied call is followed too (a filter on outcome, from the current head).
    let mut denied_tail = audit(&vault, "auditor")
        .tail_events(TailEventsRequest {
            filter: Some(AuditFilter {
                outcome: "denied".into(),
                ..Default::default()
            }),
            after_sequence: 0,
        })
        .await
        .unwrap()
        .into_inner();
    expect_code(
        leases(&vault, "stranger")
            .acquire_lease(acquire_request(&id, 30))
            .await,
        Code::PermissionDenied,
    );
    let denied = tokio::time::timeout(Duration::from_secs(5), denied_tail.message())
        .await
        .expect("no denial tailed within 5 s")
        .unwrap()
        .unwrap();
    assert_eq!(denied.identity, spiffe("stranger"));
    assert_eq!(denied.code, "PERMISSION_DENIED");
}

/// Calls that never reach a handler are still vault accesses: an oversized
/// message (refused by tonic's decoder) and a method that does not exist
/// (refused by the router) each get exactly one audit event, with the peer's
/// identity, the request id and the code. Calls that do reach a handler,
/// allowed or denied, keep exactly their one event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_refused_before_a_handler_are_audited_once() {
    let (_dir, vault) = start().await;
    let by_request = |id: &str| {
        let vault = &vault;
        let id = id.to_owned();
        async move {
            query(
                vault,
                AuditFilter {
                    request_id: id,
                    ..Default::default()
                },
            )
            .await
        }
    };
    fn with_id<T>(id: &str, message: T) -> Request<T> {
        let mut request = Request::new(message);
        request
            .metadata_mut()
            .insert("x-request-id", id.parse().unwrap());
        request
    }

    // Over the 64 KiB cap: RESOURCE_EXHAUSTED (the decoder's OUT_OF_RANGE, rewritten).
    expect_code(
        credentials(&vault, "manager")
            .put_credential(with_id(
                "refused-oversized",
                put_request(
                    "acme",
                    "huge",
                    CredentialKind::Generic,
                    &vec![b'x'; 70 * 1024],
                ),
            ))
            .await,
        Code::ResourceExhausted,
    );
    let events = by_request("refused-oversized").await;
    assert_eq!(events.len(), 1, "{events:#?}");
    assert_eq!(
        events[0].operation,
        "recvault.vault.v1.Credentials/PutCredential"
    );
    assert_eq!(events[0].identity, "spiffe://recvault.local/manager");
    assert_eq!(events[0].outcome, "error");
    assert_eq!(events[0].code, "RESOURCE_EXHAUSTED");

    // A method the vault does not have, from an identity with no grant.
    let mut grpc = tonic::client::Grpc::new(vault.channel("stranger"));
    grpc.ready().await.unwrap();
    let status = grpc
        .unary::<_, GetCredentialRequest, _>(
            with_id("refused-unknown", GetCredentialRequest::default()),
            "/recvault.vault.v1.Credentials/ExportEverything"
                .parse()
                .unwrap(),
            tonic_prost::ProstCodec::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
    let events = by_request("refused-unknown").await;
    assert_eq!(events.len(), 1, "{events:#?}");
    assert_eq!(
        events[0].operation,
        "recvault.vault.v1.Credentials/ExportEverything"
    );
    assert_eq!(events[0].identity, "spiffe://recvault.local/stranger");
    assert_eq!(events[0].code, "UNIMPLEMENTED");
    assert!(!events[0].cert_fingerprint.is_empty());

    // Handled calls, allowed and denied, are not audited a second time.
    credentials(&vault, "manager")
        .put_credential(with_id(
            "handled-allowed",
            put_request("acme", "small", CredentialKind::Generic, b"s3cr3t"),
        ))
        .await
        .unwrap();
    expect_code(
        credentials(&vault, "stranger")
            .put_credential(with_id(
                "handled-denied",
                put_request("acme", "nope", CredentialKind::Generic, b"s3cr3t"),
            ))
            .await,
        Code::PermissionDenied,
    );
    assert_eq!(by_request("handled-allowed").await.len(), 1);
    let denied = by_request("handled-denied").await;
    assert_eq!(denied.len(), 1, "{denied:#?}");
    assert_eq!(denied[0].outcome, "denied");
    assert!(verify_chain(&vault).await.ok);
}
