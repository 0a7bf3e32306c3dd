//! `DataKeys` and the backup wrapping key: the derivation against known
//! answers computed by an independent implementation (Python `cryptography`
//! and `pyhpke`, `tests/data/backup_wrap_kat.json`), and over real mTLS the
//! round trip the uploader makes (seal to the wrapping key, unwrap with an
//! ephemeral key pair, open the re-sealed key), every refusal audited, every
//! field checked by name, and fail-closed audit.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use recvault_proto::vault::v1::{AuditFilter, GetWrappingKeyRequest, UnwrapDataKeyRequest};
use recvault_runtime::{
    datakey::{WRAP_INFO, binding},
    secret::SecretBytes,
};
use recvault_vault::{
    datakeys::{DataKeyError, SUITE, WRAPPING_KEY_INFO, WrappingKey},
    keyring::MasterKey,
};
use tonic::Code;

/// The one answer for a wrapped key that does not open, whatever the reason.
const DOES_NOT_OPEN: &str = "the wrapped data key does not open for this tenant and recording";

fn kat() -> serde_json::Value {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/backup_wrap_kat.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn hex_field(v: &serde_json::Value, name: &str) -> Vec<u8> {
    hex::decode(v[name].as_str().unwrap()).unwrap()
}

fn master_of(v: &serde_json::Value) -> MasterKey {
    MasterKey::from_secret(SecretBytes::new(hex_field(v, "master_key"))).unwrap()
}

#[test]
fn wrapping_key_derivation_matches_the_known_answers() {
    let kat = kat();
    let derivations = kat["derivation"].as_array().unwrap();
    assert_eq!(derivations.len(), 3);
    for v in derivations {
        let master = master_of(v);
        assert_eq!(
            master.derive(WRAPPING_KEY_INFO, 32).expose_secret(),
            hex_field(v, "private_key").as_slice(),
            "HKDF step for master key {}",
            v["master_key"]
        );
        let key = WrappingKey::derive(&master).unwrap();
        assert_eq!(key.version(), 1);
        assert_eq!(
            hex::encode(key.public_key()),
            v["public_key"].as_str().unwrap(),
            "X25519 public key for master key {}",
            v["master_key"]
        );
    }
    // Data keys sealed by pyhpke open here, and only for their own recording.
    let unwraps = kat["unwrap"].as_array().unwrap();
    assert_eq!(unwraps.len(), 2);
    for v in unwraps {
        let key = WrappingKey::derive(&master_of(v)).unwrap();
        let (tenant, recording) = (
            v["tenant_id"].as_str().unwrap(),
            v["recording_id"].as_str().unwrap(),
        );
        let (enc, wrapped) = (hex_field(v, "enc"), hex_field(v, "wrapped_key"));
        let opened = key.unwrap(tenant, recording, &enc, &wrapped).unwrap();
        assert_eq!(opened.expose_secret(), hex_field(v, "data_key").as_slice());
        assert_eq!(
            key.unwrap(tenant, &format!("{recording}x"), &enc, &wrapped)
                .err(),
            Some(DataKeyError::DoesNotOpen)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_wrapping_key_serves_the_key_derived_from_the_master_key() {
    let (_dir, vault) = start().await;
    let master = MasterKey::load(&vault.config.master_key_file).unwrap();
    let derived = WrappingKey::derive(&master).unwrap();
    for identity in ["uploader", "manager", "auditor", "admin"] {
        let got = data_keys(&vault, identity)
            .get_wrapping_key(GetWrappingKeyRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(got.key_version, 1, "{identity}");
        assert_eq!(got.public_key, derived.public_key(), "{identity}");
        assert_eq!(got.suite, SUITE);
    }
    let events = query(
        &vault,
        AuditFilter {
            operation: op::GET_WRAPPING_KEY.into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(events.len(), 4);
    assert!(
        events
            .iter()
            .all(|e| e.outcome == "allowed" && e.detail == "key_version=1")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unwrap_round_trip_over_mtls_and_every_refusal_is_opaque_and_audited() {
    let (_dir, vault) = start().await;
    let mut client = data_keys(&vault, "uploader");
    // The uploader learns the public key once, then wraps on its own.
    let public = client
        .get_wrapping_key(GetWrappingKeyRequest {})
        .await
        .unwrap()
        .into_inner()
        .public_key;
    let (data_key, enc, wrapped) = wrap_data_key(&public, "acme", "rec-1");

    let (request, private) = unwrap_request("acme", "rec-1", &enc, &wrapped);
    let answer = client.unwrap_data_key(request).await.unwrap().into_inner();
    assert_eq!(answer.enc.len(), 32);
    assert_eq!(answer.sealed_key.len(), 48);
    assert!(
        !answer
            .sealed_key
            .windows(8)
            .any(|w| data_key.windows(8).any(|d| d == w)),
        "the data key must never travel in clear"
    );
    assert_eq!(open_resealed(&answer, &private, "acme", "rec-1"), data_key);
    // The answer is bound to the recording too.
    assert!(
        hpke()
            .open(
                &rustls::crypto::hpke::EncapsulatedSecret(answer.enc.clone()),
                recvault_runtime::datakey::RESEAL_INFO,
                &binding("acme", "rec-2"),
                &answer.sealed_key,
                &private,
            )
            .is_err()
    );

    // Wrong tenant, wrong recording, a flipped byte in either field, another
    // vault's key: one opaque answer for all.
    let mut flipped_key = wrapped.clone();
    flipped_key[47] ^= 0x01;
    let mut flipped_enc = enc.clone();
    flipped_enc[0] ^= 0x80;
    let other_vault =
        WrappingKey::derive(&MasterKey::from_secret(SecretBytes::from_slice(&[7u8; 32])).unwrap())
            .unwrap();
    let (_, foreign_enc, foreign_wrapped) =
        wrap_data_key(other_vault.public_key(), "acme", "rec-1");
    let bad: [(&str, &str, &[u8], &[u8]); 5] = [
        ("globex", "rec-1", &enc, &wrapped),
        ("acme", "rec-2", &enc, &wrapped),
        ("acme", "rec-1", &enc, &flipped_key),
        ("acme", "rec-1", &flipped_enc, &wrapped),
        ("acme", "rec-1", &foreign_enc, &foreign_wrapped),
    ];
    for (tenant, recording, enc, wrapped) in bad {
        let (request, _) = unwrap_request(tenant, recording, enc, wrapped);
        let status = expect_code(
            client.unwrap_data_key(request).await,
            Code::FailedPrecondition,
        );
        assert_eq!(status.message(), DOES_NOT_OPEN, "{tenant}/{recording}");
    }

    let events = query(
        &vault,
        AuditFilter {
            operation: op::UNWRAP.into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(events.len(), 6, "{events:#?}");
    let granted = &events[0];
    assert_eq!(
        (
            granted.outcome.as_str(),
            granted.code.as_str(),
            granted.tenant_id.as_str()
        ),
        ("allowed", "OK", "acme")
    );
    assert_eq!(
        granted.detail,
        "recording_id=rec-1 job_id=5f0c6f9e-1b2a-4c3d-8e9f-0a1b2c3d4e5f purpose=deliver key_version=1"
    );
    assert_eq!(granted.identity, spiffe("uploader"));
    for (event, (tenant, recording, ..)) in events[1..].iter().zip(bad) {
        assert_eq!(event.outcome, "error", "{event:?}");
        assert_eq!(event.code, "FAILED_PRECONDITION");
        assert_eq!(event.tenant_id, tenant);
        assert!(
            event
                .detail
                .starts_with(&format!("recording_id={recording} job_id=")),
            "{event:?}"
        );
    }
    let metrics = &vault.core.metrics;
    assert_eq!(
        (
            metrics.unwraps_granted.get(),
            metrics.unwraps_denied.get(),
            metrics.unwraps_refused.get()
        ),
        (1, 0, 5)
    );
    assert!(verify_chain(&vault).await.ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unwrap_names_every_bad_field() {
    let (_dir, vault) = start().await;
    let (_, enc, wrapped) = wrap_data_key(vault.core.wrapping_key.public_key(), "acme", "rec-1");
    let good = || unwrap_request("acme", "rec-1", &enc, &wrapped).0;
    type Edit = fn(&mut UnwrapDataKeyRequest);
    let cases: [(Edit, Code, &str); 14] = [
        (
            |r| r.tenant_id.clear(),
            Code::InvalidArgument,
            "tenant_id is required",
        ),
        (
            |r| r.tenant_id = "a/b".into(),
            Code::InvalidArgument,
            "tenant_id contains '/'",
        ),
        (
            |r| r.recording_id.clear(),
            Code::InvalidArgument,
            "recording_id is required",
        ),
        (
            |r| r.recording_id = "x".repeat(129),
            Code::InvalidArgument,
            "recording_id is 129 bytes",
        ),
        (
            |r| r.job_id.clear(),
            Code::InvalidArgument,
            "job_id is required",
        ),
        (
            |r| r.job_id = "j b".into(),
            Code::InvalidArgument,
            "job_id contains ' '",
        ),
        (
            |r| r.purpose.clear(),
            Code::InvalidArgument,
            "purpose is required",
        ),
        (
            |r| r.purpose = "a\nb".into(),
            Code::InvalidArgument,
            "purpose must be",
        ),
        (
            |r| r.key_version = 0,
            Code::FailedPrecondition,
            "key_version 0 is not",
        ),
        (
            |r| r.key_version = 2,
            Code::FailedPrecondition,
            "key_version 2 is not",
        ),
        (
            |r| {
                r.enc.pop();
            },
            Code::InvalidArgument,
            "enc is 31 bytes; it must be exactly 32",
        ),
        (
            |r| r.wrapped_key.push(0),
            Code::InvalidArgument,
            "wrapped_key is 49 bytes; it must be exactly 48",
        ),
        (
            |r| r.recipient_public_key.clear(),
            Code::InvalidArgument,
            "recipient_public_key is 0 bytes",
        ),
        // The all-zero point has low order: no shared secret, RFC 7748 §6.1.
        (
            |r| r.recipient_public_key = vec![0; 32],
            Code::InvalidArgument,
            "recipient_public_key is not a usable X25519 public key",
        ),
    ];
    let mut client = data_keys(&vault, "uploader");
    for (edit, code, message) in cases {
        let mut request = good();
        edit(&mut request);
        let status = expect_code(client.unwrap_data_key(request).await, code);
        assert!(
            status.message().contains(message),
            "want {message:?}: {status:?}"
        );
    }
    // An identity without the role learns nothing from its input: denied, not validated.
    let mut request = good();
    request.tenant_id.clear();
    expect_code(
        data_keys(&vault, "manager").unwrap_data_key(request).await,
        Code::PermissionDenied,
    );
    // The good request still works, after all of that.
    client.unwrap_data_key(good()).await.unwrap();

    let events = query(
        &vault,
        AuditFilter {
            operation: op::UNWRAP.into(),
            ..Default::default()
        },
    )
    .await;
    let outcomes: Vec<_> = events.iter().map(|e| e.outcome.as_str()).collect();
    let mut want = vec!["error"; 14];
    want.extend(["denied", "allowed"]);
    assert_eq!(outcomes, want);
    let metrics = &vault.core.metrics;
    assert_eq!(
        (
            metrics.unwraps_granted.get(),
            metrics.unwraps_denied.get(),
            metrics.unwraps_refused.get()
        ),
        (1, 1, 0),
        "field errors are not counted as keys that did not open"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unwrap_fails_closed_when_the_audit_log_cannot_write() {
    let (_dir, vault) = start().await;
    let (data_key, enc, wrapped) =
        wrap_data_key(vault.core.wrapping_key.public_key(), "acme", "rec-1");
    let mut client = data_keys(&vault, "uploader");
    let before = vault.core.audit.head().0;

    vault.core.audit.fail_writes(true);
    let (request, _) = unwrap_request("acme", "rec-1", &enc, &wrapped);
    let status = expect_code(client.unwrap_data_key(request).await, Code::Unavailable);
    assert!(
        status.message().contains("audit log is unavailable"),
        "{status:?}"
    );
    assert_eq!(vault.core.audit.head().0, before, "nothing was recorded");
    assert_eq!(vault.core.metrics.unwraps_granted.get(), 0);
    vault.core.audit.fail_writes(false);

    let (request, private) = unwrap_request("acme", "rec-1", &enc, &wrapped);
    let answer = client.unwrap_data_key(request).await.unwrap().into_inner();
    assert_eq!(open_resealed(&answer, &private, "acme", "rec-1"), data_key);
    let granted = query(
        &vault,
        AuditFilter {
            operation: op::UNWRAP.into(),
            outcome: "allowed".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(granted.len(), 1, "exactly the one unwrap that was answered");
    assert!(verify_chain(&vault).await.ok);
}

/// The wrap the uploader makes and the one the vault opens agree byte for
/// byte on `info` and `aad` (recvault_runtime::datakey): a key sealed with
/// another info string does not open.
#[test]
fn a_key_sealed_with_another_info_does_not_open() {
    let key =
        WrappingKey::derive(&MasterKey::from_secret(SecretBytes::from_slice(&[3u8; 32])).unwrap())
            .unwrap();
    let data_key = SecretBytes::from_slice(&[9u8; 32]);
    let aad = binding("acme", "rec-1");
    let (enc, wrapped) =
        recvault_vault::datakeys::seal(key.public_key(), WRAP_INFO, &aad, &data_key).unwrap();
    assert_eq!(
        key.unwrap("acme", "rec-1", &enc, &wrapped).unwrap(),
        data_key
    );
    let (enc, wrapped) = recvault_vault::datakeys::seal(
        key.public_key(),
        b"recvault backup data key v2",
        &aad,
        &data_key,
    )
    .unwrap();
    assert_eq!(
        key.unwrap("acme", "rec-1", &enc, &wrapped).err(),
        Some(DataKeyError::DoesNotOpen)
    );
}
