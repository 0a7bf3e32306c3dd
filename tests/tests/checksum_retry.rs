//! A destination that refuses an upload's checksum is detected and retried:
//! the delivery worker sends a deliberately wrong CRC-32 (the test-only
//! `corrupt_checksum_for_test` knob), the real S3 server (s3s-fs) answers
//! 400 BadDigest, the job goes RETRYING with that reason and its backup kept;
//! the next attempt with the right checksum delivers. The vault is real too,
//! in process, over mTLS: it provides the wrapping key the backup is
//! encrypted to, and unwraps its data key for each attempt.

#![allow(clippy::unwrap_used)]

#[path = "../../uploader/tests/support/s3.rs"]
mod s3_server;

use std::{sync::Arc, time::Duration};

use recvault_proto::vault::v1::{
    CredentialKind, GetWrappingKeyRequest, data_keys_client::DataKeysClient,
};
use recvault_runtime::devcerts;
use recvault_uploader::{
    backup::{BackupStore, wrapping::WrappingKey},
    config::VaultClientConfig,
    destination::{DestinationConfig, Provider, S3Options},
    destination_store::DestinationStore,
    digest::Sha256Digest,
    jobs::{
        ContentType, DestinationId, FileName, JobState, JobStore, NewJob, RecordingId, RetryPolicy,
        TenantId,
    },
    lease::VaultLeases,
    metrics::UploaderMetrics,
    worker::Worker,
};
use recvault_vault::testing::TestVault;
use sha2::Digest;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_checksum_is_retried_and_then_delivered() {
    let tmp = tempfile::tempdir().unwrap();
    let vault = TestVault::start(&tmp.path().join("vault-root")).await;
    let s3 = s3_server::S3Server::start().await;
    s3.create_bucket("media");

    // Sealed to the vault's sealing key, as the recvault CLI sends it.
    let credential = recvault_tests::client::put_credential(
        vault.channel("manager"),
        "acme",
        "s3",
        CredentialKind::S3,
        recvault_runtime::secret::SecretBytes::new(s3.credential_json().into_bytes()),
        None,
    )
    .await
    .unwrap();

    let db = tmp.path().join("uploader.db");
    let jobs = JobStore::open(&db).unwrap();
    let destinations = Arc::new(DestinationStore::open(&db).unwrap());
    let wrapping = DataKeysClient::new(vault.channel("uploader"))
        .get_wrapping_key(GetWrappingKeyRequest {})
        .await
        .unwrap()
        .into_inner();
    let wrapping = WrappingKey::new(
        wrapping.key_version,
        wrapping.public_key.as_slice().try_into().unwrap(),
    );
    let backups = BackupStore::open(tmp.path().join("backups"), wrapping).unwrap();
    let destination_id = destinations
        .put(
            "acme",
            "s3",
            &DestinationConfig {
                provider: Provider::S3,
                endpoint: s3.endpoint.clone(),
                region: "us-east-1".into(),
                bucket: "media".into(),
                prefix: "calls".into(),
                path_style: true,
            },
            &credential.credential_id,
        )
        .unwrap();

    // A recording in the backup store, and its job.
    let data: Vec<u8> = (0..300_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let sha = Sha256Digest::new(sha2::Sha256::digest(&data).into());
    let tenant = TenantId::parse("acme").unwrap();
    let recording = RecordingId::parse("rec-1").unwrap();
    let mut writer = backups.begin(&tenant, &recording).unwrap();
    writer.write_chunk(&data).unwrap();
    let stored = writer.finish(sha).unwrap();
    let (job, _) = jobs
        .create_or_get(NewJob {
            job_id: stored.id,
            tenant_id: tenant,
            recording_id: recording,
            destination_id: DestinationId::parse(destination_id.as_str()).unwrap(),
            file_name: FileName::parse("call.bin").unwrap(),
            content_type: ContentType::parse("application/octet-stream").unwrap(),
            backup_path: stored.path.clone(),
            sha256: sha,
            size: stored.size,
            stored_sha256: Some(stored.stored_sha256),
            request_id: Some("checksum-retry".into()),
        })
        .await
        .unwrap();

    let worker = |corrupt: bool| Worker {
        jobs: jobs.clone(),
        backups: backups.clone(),
        destinations: destinations.clone(),
        vault: VaultLeases::new(&VaultClientConfig {
            endpoint: vault.addr.to_string(),
            server_name: "localhost".into(),
            tls: devcerts::files(&vault.certs, "uploader"),
            lease_ttl_secs: 30,
        })
        .unwrap(),
        retry: RetryPolicy {
            max_doubtful: 5,
            window: Duration::from_secs(60),
            base: Duration::from_millis(10),
            max: Duration::from_millis(50),
        },
        s3: S3Options {
            corrupt_checksum_for_test: corrupt,
            max_attempts: 1,
            ..S3Options::default()
        },
        // An S3 destination: no local directory is allowed.
        fs_roots: Default::default(),
        concurrency: 1,
        wake: Arc::default(),
        metrics: UploaderMetrics::new(),
    };

    // Attempt 1: wrong CRC-32 on the wire → the server refuses → RETRYING.
    let claimed = jobs
        .claim_due(time::OffsetDateTime::now_utc(), 1)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    worker(true)
        .attempt(claimed.into_iter().next().unwrap())
        .await;
    let after = jobs.get(job.job_id).await.unwrap();
    assert_eq!(after.state, JobState::Retrying, "{after:?}");
    let reason = after.last_error.clone().unwrap_or_default();
    assert!(
        reason.contains("BadDigest") || reason.to_lowercase().contains("checksum"),
        "{reason}"
    );
    assert!(
        stored.path.exists(),
        "the backup must be kept while the job retries"
    );
    assert!(!s3.requests_of("PutObject").is_empty());

    // Attempt 2, due after the backoff: the right checksum → DELIVERED, backup gone.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let claimed = jobs
        .claim_due(time::OffsetDateTime::now_utc(), 1)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1, "the retry is due");
    worker(false)
        .attempt(claimed.into_iter().next().unwrap())
        .await;
    let done = jobs.get(job.job_id).await.unwrap();
    assert_eq!(done.state, JobState::Delivered, "{done:?}");
    assert_eq!(
        std::fs::read(s3.object_path("media", "calls/call.bin")).unwrap(),
        data
    );
    assert!(
        !stored.path.exists(),
        "the backup is deleted only after verified delivery"
    );

    // The recording's request id reached the vault's audit log: one lease and
    // its release per attempt, all under the id the recorder's upload carried.
    let filter = recvault_audit::AuditFilter {
        request_id: Some("checksum-retry".into()),
        ..Default::default()
    };
    let events = vault.core.audit.query(&filter, 0, 100).await.unwrap();
    let count = |suffix: &str| {
        events
            .iter()
            .filter(|e| e.record.operation.ends_with(suffix))
            .count()
    };
    assert_eq!(count("Leases/AcquireLease"), 2, "{events:?}");
    assert_eq!(count("Leases/ReleaseLease"), 2, "{events:?}");
    assert_eq!(
        count("UnwrapDataKey"),
        2,
        "one unwrap per attempt: {events:?}"
    );
    assert!(
        events
            .iter()
            .all(|e| e.record.identity == "spiffe://recvault.local/uploader")
    );
    vault.stop().await;
}
