//! Known-answer hashes of whole records (`tests/data/chain_vectors.json`,
//! computed with Python's `hmac` over the documented layout). The vault
//! vectors were also produced by the code from before the job, recording and
//! destination extension: they pin that every existing vault log still
//! verifies.
#![allow(clippy::unwrap_used)]

use recvault_audit::{AuditKey, AuditRecord, Outcome, chain_hash};
use recvault_runtime::secret::SecretBytes;
use serde_json::Value;
use time::OffsetDateTime;

const VECTORS: &str = include_str!("data/chain_vectors.json");

fn text(v: &Value, name: &str) -> String {
    v[name]
        .as_str()
        .unwrap_or_else(|| panic!("{name} missing"))
        .to_owned()
}

fn hash32(v: &Value, name: &str) -> [u8; 32] {
    hex::decode(text(v, name)).unwrap().try_into().unwrap()
}

#[test]
fn every_vector_hashes_as_pinned() {
    let file: Value = serde_json::from_str(VECTORS).unwrap();
    let vectors = file["vectors"].as_array().unwrap();
    assert!(vectors.len() >= 5);
    let mut with_extension = 0;
    for v in vectors {
        let name = text(v, "name");
        let key = AuditKey::new(SecretBytes::new(hex::decode(text(v, "key")).unwrap())).unwrap();
        let record = AuditRecord {
            time: OffsetDateTime::from_unix_timestamp_nanos(i128::from(
                v["time_unix_nanos"].as_i64().unwrap(),
            ))
            .unwrap(),
            identity: text(v, "identity"),
            cert_fingerprint: text(v, "cert_fingerprint"),
            tenant_id: text(v, "tenant_id"),
            credential_id: text(v, "credential_id"),
            lease_id: text(v, "lease_id"),
            request_id: text(v, "request_id"),
            detail: text(v, "detail"),
            job_id: text(v, "job_id"),
            recording_id: text(v, "recording_id"),
            destination_id: text(v, "destination_id"),
            ..AuditRecord::now(
                text(v, "operation"),
                text(v, "outcome").parse::<Outcome>().unwrap(),
                text(v, "code"),
            )
        };
        if !(record.job_id.is_empty()
            && record.recording_id.is_empty()
            && record.destination_id.is_empty())
        {
            with_extension += 1;
        }
        let hash = chain_hash(
            &key,
            &hash32(v, "prev_hash"),
            v["sequence"].as_u64().unwrap(),
            &record,
        )
        .unwrap();
        assert_eq!(hex::encode(hash), text(v, "hash"), "{name}");
    }
    assert!(with_extension >= 3, "the extension block is covered");
}

/// The hash of a vault event from before the extension, kept here as well
/// as in the data file so that nobody regenerates both by accident.
#[test]
fn vault_event_hash_is_unchanged() {
    let file: Value = serde_json::from_str(VECTORS).unwrap();
    assert_eq!(
        text(&file["vectors"][0], "hash"),
        "5c862147c456e1eb70d7e170e439320a7718ab45517f79ad0cef962480711f86"
    );
    assert_eq!(text(&file["vectors"][0], "job_id"), "");
}
