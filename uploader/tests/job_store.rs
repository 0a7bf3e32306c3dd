//! The job store on a real SQLite file, with real backups: idempotent
//! creation, the state machine, claiming, crash recovery, resend, backoff,
//! and the scrub finding a flipped byte.
#![allow(clippy::unwrap_used)]

#[path = "support/keys.rs"]
mod keys;

use std::path::PathBuf;
use std::time::Duration;

use recvault_uploader::backup::{BackupStore, StoredBackup};
use recvault_uploader::digest::Sha256Digest;
use recvault_uploader::jobs::{
    ContentType, DestinationId, FileName, JobFilter, JobState, JobStore, JobStoreError, NewJob,
    RecordingId, Resend, RetryPolicy, TenantId, VerifiedBy,
};
use recvault_uploader::scrub::scrub_once;
use time::OffsetDateTime;
use tonic::Code;

struct Fixture {
    dir: tempfile::TempDir,
    backups: BackupStore,
    jobs: JobStore,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let backups = BackupStore::open(
            dir.path().join("backups"),
            keys::TestWrapping::generate().key.clone(),
        )
        .unwrap();
        let jobs = JobStore::open(Self::db(&dir)).unwrap();
        Self { dir, backups, jobs }
    }

    fn db(dir: &tempfile::TempDir) -> PathBuf {
        dir.path().join("jobs.sqlite3")
    }

    fn backup(&self, tenant: &str, recording: &str, data: &[u8]) -> StoredBackup {
        let mut w = self
            .backups
            .begin(
                &TenantId::parse(tenant).unwrap(),
                &RecordingId::parse(recording).unwrap(),
            )
            .unwrap();
        w.write_chunk(data).unwrap();
        w.finish(Sha256Digest::of(data)).unwrap()
    }

    fn new_job(&self, tenant: &str, recording: &str, data: &[u8]) -> NewJob {
        let b = self.backup(tenant, recording, data);
        NewJob {
            job_id: b.id,
            tenant_id: TenantId::parse(tenant).unwrap(),
            recording_id: RecordingId::parse(recording).unwrap(),
            destination_id: DestinationId::parse("dest-1").unwrap(),
            file_name: FileName::parse("call.mp4").unwrap(),
            content_type: ContentType::parse("video/mp4").unwrap(),
            backup_path: b.path,
            sha256: b.sha256,
            size: b.size,
            stored_sha256: Some(b.stored_sha256),
            request_id: Some("req-1".into()),
        }
    }

    async fn create(
        &self,
        tenant: &str,
        recording: &str,
        data: &[u8],
    ) -> recvault_uploader::jobs::Job {
        let (job, created) = self
            .jobs
            .create_or_get(self.new_job(tenant, recording, data))
            .await
            .unwrap();
        assert!(created);
        job
    }
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

fn hours(n: i64) -> time::Duration {
    time::Duration::hours(n)
}

#[tokio::test]
async fn create_is_idempotent_per_tenant_and_recording() {
    let f = Fixture::new();
    let first = f.new_job("acme", "rec-1", b"hello");
    let (job, created) = f.jobs.create_or_get(first.clone()).await.unwrap();
    assert!(created);
    assert_eq!(job.state, JobState::Stored);
    assert_eq!(job.attempts, 0);
    assert_eq!(job.sha256, Sha256Digest::of(b"hello"));
    assert_eq!(job.request_id.as_deref(), Some("req-1"));

    // Same recording sent again (new backup, same bytes): the existing job.
    let again = f.new_job("acme", "rec-1", b"hello");
    let (same, created) = f.jobs.create_or_get(again).await.unwrap();
    assert!(!created);
    assert_eq!(same.job_id, job.job_id);

    // Same recording id, other bytes: refused as ALREADY_EXISTS.
    let err = f
        .jobs
        .create_or_get(f.new_job("acme", "rec-1", b"other"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, JobStoreError::RecordingConflict { .. }),
        "{err}"
    );
    let status = tonic::Status::from(err);
    assert_eq!(status.code(), Code::AlreadyExists);
    assert!(status.message().contains("recording id rec-1"));
    assert!(
        status
            .message()
            .contains("already ingested with a different SHA-256")
    );

    // The same recording id under another tenant is another job.
    let (other, created) = f
        .jobs
        .create_or_get(f.new_job("globex", "rec-1", b"x"))
        .await
        .unwrap();
    assert!(created);
    assert_ne!(other.job_id, job.job_id);

    let acme = f
        .jobs
        .list(JobFilter {
            tenant_id: Some(TenantId::parse("acme").unwrap()),
            ..JobFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(acme.len(), 1);
    assert_eq!(f.jobs.list(JobFilter::default()).await.unwrap().len(), 2);
    let found = f
        .jobs
        .find_by_recording(
            TenantId::parse("acme").unwrap(),
            RecordingId::parse("rec-1").unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(found.map(|j| j.job_id), Some(job.job_id));
}

#[tokio::test]
async fn full_delivery_and_illegal_transitions() {
    let f = Fixture::new();
    let job = f.create("acme", "rec-1", b"data").await;
    let id = job.job_id;

    // Not before an attempt claimed it, and never straight to DELIVERED.
    let err = f.jobs.mark_verifying(id).await.unwrap_err();
    assert!(
        matches!(err, JobStoreError::IllegalTransition { .. }),
        "{err}"
    );
    assert_eq!(tonic::Status::from(err).code(), Code::FailedPrecondition);
    let err = f
        .jobs
        .mark_delivered(id, "s3://b/call.mp4".into(), VerifiedBy::ProviderChecksum)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("from STORED to DELIVERED"),
        "{err}"
    );

    let claimed = f.jobs.claim_due(now(), 10).await.unwrap();
    assert_eq!(claimed.len(), 1);
    assert!(
        f.jobs
            .mark_delivered(id, "x".into(), VerifiedBy::ReadBack)
            .await
            .is_err()
    );
    f.jobs.mark_verifying(id).await.unwrap();
    let done = f
        .jobs
        .mark_delivered(id, "s3://b/call.mp4".into(), VerifiedBy::ProviderChecksum)
        .await
        .unwrap();
    assert_eq!(done.state, JobState::Delivered);
    assert_eq!(done.verified_by, Some(VerifiedBy::ProviderChecksum));
    assert_eq!(done.location.as_deref(), Some("s3://b/call.mp4"));

    // DELIVERED is terminal.
    assert!(
        f.jobs
            .mark_retry(id, "late".into(), now(), false)
            .await
            .is_err()
    );
    assert!(f.jobs.mark_retained(id, "late".into()).await.is_err());
    assert!(f.jobs.resend(id, None).await.is_err());
    assert!(
        f.jobs
            .claim_due(now() + hours(1), 10)
            .await
            .unwrap()
            .is_empty()
    );

    // The backup is deleted after delivery, recorded once.
    assert_eq!(f.jobs.pending_backup_deletes().await.unwrap().len(), 1);
    f.backups.delete(&done.backup_path).await.unwrap();
    f.jobs.mark_backup_deleted(id).await.unwrap();
    f.jobs.mark_backup_deleted(id).await.unwrap();
    assert!(f.jobs.pending_backup_deletes().await.unwrap().is_empty());

    let states: Vec<JobState> = f
        .jobs
        .history(id)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.state)
        .collect();
    assert_eq!(
        states,
        [
            JobState::Stored,
            JobState::Uploading,
            JobState::Verifying,
            JobState::Delivered,
            JobState::Delivered
        ]
    );
    let wire = done.to_proto();
    assert_eq!(
        wire.state,
        recvault_proto::uploader::v1::JobState::Delivered as i32
    );
    assert_eq!(wire.verified_by, "provider-checksum");
}

#[tokio::test]
async fn claim_due_takes_only_due_jobs_and_each_once() {
    let f = Fixture::new();
    let a = f.create("acme", "rec-a", b"a").await;
    let b = f.create("acme", "rec-b", b"b").await;
    let c = f.create("acme", "rec-c", b"c").await;

    let first = f.jobs.claim_due(now(), 2).await.unwrap();
    assert_eq!(first.len(), 2, "limit respected");
    assert!(
        first
            .iter()
            .all(|j| j.state == JobState::Uploading && j.attempts == 1)
    );
    let second = f.jobs.claim_due(now(), 10).await.unwrap();
    assert_eq!(second.len(), 1);
    let mut ids: Vec<_> = first.iter().chain(&second).map(|j| j.job_id).collect();
    ids.sort();
    let mut want = vec![a.job_id, b.job_id, c.job_id];
    want.sort();
    assert_eq!(ids, want, "every job claimed exactly once");
    assert!(f.jobs.claim_due(now(), 10).await.unwrap().is_empty());

    // A retry in an hour is not due now, and is due in two hours.
    let retry_at = now() + hours(1);
    let r = f
        .jobs
        .mark_retry(a.job_id, "503 Slow Down".into(), retry_at, false)
        .await
        .unwrap();
    assert_eq!(r.state, JobState::Retrying);
    assert_eq!(r.last_error.as_deref(), Some("503 Slow Down"));
    assert!(f.jobs.claim_due(now(), 10).await.unwrap().is_empty());
    let later = f.jobs.claim_due(now() + hours(2), 10).await.unwrap();
    assert_eq!(later.len(), 1);
    assert_eq!(later[0].job_id, a.job_id);
    assert_eq!(later[0].attempts, 2);

    // Concurrent claimers never share a job.
    for i in 0..20 {
        f.create("acme", &format!("many-{i}"), format!("{i}").as_bytes())
            .await;
    }
    let (x, y) = tokio::join!(f.jobs.claim_due(now(), 15), f.jobs.claim_due(now(), 15));
    let (x, y) = (x.unwrap(), y.unwrap());
    assert_eq!(x.len() + y.len(), 20);
    assert!(x.iter().all(|j| !y.iter().any(|k| k.job_id == j.job_id)));
}

#[tokio::test]
async fn crash_recovery_moves_unfinished_attempts_to_retrying() {
    let f = Fixture::new();
    let up = f.create("acme", "rec-up", b"1").await;
    let ver = f.create("acme", "rec-ver", b"2").await;
    let stored = f.create("acme", "rec-stored", b"3").await;
    // `stored` is created last, so it is claimed last and left out with limit 2.
    assert_eq!(f.jobs.claim_due(now(), 2).await.unwrap().len(), 2);
    f.jobs
        .set_multipart_upload_id(up.job_id, Some("mp-upload-1".into()))
        .await
        .unwrap();
    f.jobs.mark_verifying(ver.job_id).await.unwrap();

    // "Crash": drop the store without finishing, open the file again.
    let Fixture { dir, backups, jobs } = f;
    drop(jobs);
    let jobs = JobStore::open(Fixture::db(&dir)).unwrap();
    let mut recovered = jobs.recover_after_crash().await.unwrap();
    recovered.sort_by_key(|j| j.recording_id.clone());
    assert_eq!(recovered.len(), 2);
    assert!(recovered.iter().all(|j| j.state == JobState::Retrying));
    assert_eq!(recovered[0].job_id, up.job_id);
    assert_eq!(
        recovered[0].multipart_upload_id.as_deref(),
        Some("mp-upload-1")
    );
    assert!(
        recovered[0]
            .last_error
            .as_deref()
            .unwrap()
            .contains("UPLOADING")
    );
    assert!(
        recovered[1]
            .last_error
            .as_deref()
            .unwrap()
            .contains("VERIFYING")
    );
    assert_eq!(
        jobs.get(stored.job_id).await.unwrap().state,
        JobState::Stored
    );

    // All three are due now, and the attempt count carries on.
    let again = jobs.claim_due(now(), 10).await.unwrap();
    assert_eq!(again.len(), 3);
    let up_again = again.iter().find(|j| j.job_id == up.job_id).unwrap();
    assert_eq!(up_again.attempts, 2);
    assert_eq!(up_again.multipart_upload_id.as_deref(), Some("mp-upload-1"));
    assert!(jobs.recover_after_crash().await.unwrap().len() == 3);
    drop(backups);
}

#[tokio::test]
async fn resend_only_from_retained_or_retrying_with_a_backup() {
    let f = Fixture::new();
    let job = f.create("acme", "rec-1", b"payload").await;
    let id = job.job_id;

    let err = f.jobs.resend(id, None).await.unwrap_err();
    assert!(
        matches!(err, JobStoreError::IllegalTransition { .. }),
        "STORED: {err}"
    );
    f.jobs.claim_due(now(), 1).await.unwrap();
    assert!(f.jobs.resend(id, None).await.is_err(), "UPLOADING");

    let retained = f
        .jobs
        .mark_retained(id, "AccessDenied: check the credential".into())
        .await
        .unwrap();
    assert_eq!(retained.state, JobState::Retained);
    assert!(
        f.jobs
            .claim_due(now() + hours(24), 10)
            .await
            .unwrap()
            .is_empty()
    );

    let other = DestinationId::parse("dest-2").unwrap();
    let resent = f.jobs.resend(id, Some(other.clone())).await.unwrap();
    assert_eq!(resent.state, JobState::Stored);
    assert_eq!(resent.attempts, 0);
    assert_eq!(resent.destination_id, other);
    assert_eq!(resent.last_error, None);

    // From RETRYING too.
    f.jobs.claim_due(now(), 1).await.unwrap();
    f.jobs
        .mark_retry(id, "timeout".into(), now() + hours(1), false)
        .await
        .unwrap();
    assert_eq!(
        f.jobs.resend(id, None).await.unwrap().state,
        JobState::Stored
    );

    // An open multipart upload pins the destination.
    f.jobs.claim_due(now(), 1).await.unwrap();
    f.jobs
        .set_multipart_upload_id(id, Some("mp-9".into()))
        .await
        .unwrap();
    f.jobs
        .mark_retained(id, "NoSuchBucket".into())
        .await
        .unwrap();
    let err = f
        .jobs
        .resend(id, Some(DestinationId::parse("dest-3").unwrap()))
        .await
        .unwrap_err();
    assert!(
        matches!(err, JobStoreError::FailedPrecondition { .. }),
        "{err}"
    );
    f.jobs.resend(id, None).await.unwrap();

    // Without a backup there is nothing to resend.
    f.jobs.claim_due(now(), 1).await.unwrap();
    f.jobs
        .mark_retained(id, "NoSuchBucket".into())
        .await
        .unwrap();
    std::fs::remove_file(&job.backup_path).unwrap();
    let err = f.jobs.resend(id, None).await.unwrap_err();
    assert!(err.to_string().contains("missing"), "{err}");
    assert_eq!(tonic::Status::from(err).code(), Code::FailedPrecondition);

    let history = f.jobs.history(id).await.unwrap();
    assert!(history.iter().any(|e| e.message.contains("dest-2")));
    assert!(history.iter().any(|e| e.message.contains("mp-9")));
}

#[tokio::test]
async fn subscribers_see_committed_changes() {
    let f = Fixture::new();
    let mut rx = f.jobs.subscribe();
    let job = f.create("acme", "rec-1", b"x").await;
    assert_eq!(rx.recv().await.unwrap().state, JobState::Stored);
    f.jobs.claim_due(now(), 1).await.unwrap();
    assert_eq!(rx.recv().await.unwrap().state, JobState::Uploading);
    f.jobs.publish_progress(&job, 42);
    assert_eq!(rx.recv().await.unwrap().bytes_sent, 42);
    // A refused transition publishes nothing.
    assert!(f.jobs.resend(job.job_id, None).await.is_err());
    assert!(rx.try_recv().is_err());
}

#[tokio::test]
async fn retry_policy_backoff_bounds() {
    let p = RetryPolicy::default();
    assert_eq!(
        (p.max_doubtful, p.window),
        (5, Duration::from_secs(6 * 3600))
    );
    for attempts in 1..8 {
        let ceiling = Duration::from_secs(1 << (attempts - 1)).min(Duration::from_secs(300));
        for _ in 0..100 {
            let d = p.next_delay(attempts);
            assert!(d <= ceiling, "attempt {attempts}: {d:?}");
        }
    }
    for _ in 0..100 {
        assert!(p.next_delay(60) <= Duration::from_secs(300));
    }
}

/// The store keeps what the retry policy decides on: the first failure
/// starts the window and stays, doubtful failures are counted, and a resend
/// starts both afresh.
#[tokio::test]
async fn retry_window_start_and_doubtful_count_are_kept_and_reset_by_resend() {
    let f = Fixture::new();
    let job = f.create("acme", "rec-retry", b"abc").await;
    let id = job.job_id;
    assert_eq!((job.retrying_since, job.doubtful_failures), (None, 0));
    f.jobs.claim_due(now(), 10).await.unwrap();
    let first = f
        .jobs
        .mark_retry(id, "vault unavailable".into(), now(), false)
        .await
        .unwrap();
    let since = first
        .retrying_since
        .expect("the first failure starts the window");
    assert_eq!(first.doubtful_failures, 0);
    tokio::time::sleep(Duration::from_millis(5)).await;
    f.jobs.claim_due(now(), 10).await.unwrap();
    let second = f
        .jobs
        .mark_retry(id, "BadDigest".into(), now(), true)
        .await
        .unwrap();
    assert_eq!(
        second.retrying_since,
        Some(since),
        "the window does not restart"
    );
    assert_eq!(second.doubtful_failures, 1);
    let history = f.jobs.history(id).await.unwrap();
    assert!(
        history
            .iter()
            .any(|e| e.message.contains("(may be permanent), retrying at")),
        "{history:?}"
    );
    let resent = f.jobs.resend(id, None).await.unwrap();
    assert_eq!((resent.retrying_since, resent.doubtful_failures), (None, 0));
}

#[tokio::test]
async fn scrub_marks_a_flipped_byte_and_deletes_nothing() {
    let f = Fixture::new();
    let good = f.create("acme", "rec-good", &vec![1u8; 100_000]).await;
    let bad = f.create("acme", "rec-bad", &vec![2u8; 100_000]).await;

    let clean = scrub_once(&f.backups, &f.jobs).await.unwrap();
    assert_eq!((clean.checked, clean.corrupt, clean.orphans), (2, 0, 0));

    let mut bytes = std::fs::read(&bad.backup_path).unwrap();
    bytes[50_000] ^= 0x01;
    std::fs::write(&bad.backup_path, &bytes).unwrap();

    let report = scrub_once(&f.backups, &f.jobs).await.unwrap();
    assert_eq!((report.checked, report.corrupt, report.missing), (2, 1, 0));
    let bad_now = f.jobs.get(bad.job_id).await.unwrap();
    assert!(bad_now.backup_corrupt);
    assert_eq!(
        bad_now.state,
        JobState::Retained,
        "never claimed for upload"
    );
    let stored = bad.stored_sha256.unwrap();
    assert!(
        bad_now.last_error.unwrap().contains(&stored.to_hex()),
        "names the stored-file SHA-256 it expected"
    );
    assert!(!f.jobs.get(good.job_id).await.unwrap().backup_corrupt);
    assert!(bad.backup_path.exists(), "the scrub deletes nothing");
    assert!(
        f.jobs.resend(bad.job_id, None).await.is_err(),
        "corruption is never resent"
    );

    // A corrupt backup is reported once, then left alone; an orphan is reported.
    let orphan = f.backup("acme", "no-job", b"no job");
    let report = scrub_once(&f.backups, &f.jobs).await.unwrap();
    assert_eq!((report.checked, report.corrupt, report.orphans), (1, 0, 1));
    assert!(orphan.path.exists());

    let (sha, _) = f.backups.rehash(&bad.backup_path).await.unwrap();
    assert_ne!(sha, stored);
}

/// A backup written in clear by an older uploader (no stored-file SHA-256
/// on its job) is still scrubbed against its content SHA-256 and size.
#[tokio::test]
async fn scrub_checks_a_backup_in_clear_against_its_content() {
    let f = Fixture::new();
    let data = vec![7u8; 10_000];
    let tenant_dir = f.backups.objects_dir().join("acme");
    std::fs::create_dir_all(&tenant_dir).unwrap();
    let id = recvault_uploader::jobs::JobId::new_random();
    let path = tenant_dir.join(id.to_string());
    std::fs::write(&path, &data).unwrap();
    let (job, _) = f
        .jobs
        .create_or_get(NewJob {
            job_id: id,
            backup_path: path.clone(),
            sha256: Sha256Digest::of(&data),
            size: data.len() as u64,
            stored_sha256: None,
            ..f.new_job("acme", "legacy", b"")
        })
        .await
        .unwrap();
    let report = scrub_once(&f.backups, &f.jobs).await.unwrap();
    assert_eq!((report.checked, report.corrupt), (1, 0), "{report:?}");
    std::fs::write(&path, &data[..9_999]).unwrap();
    let report = scrub_once(&f.backups, &f.jobs).await.unwrap();
    assert_eq!(report.corrupt, 1, "{report:?}");
    assert!(f.jobs.get(job.job_id).await.unwrap().backup_corrupt);
}

/// A job for `recording` named `name` at `destination`.
fn named_job(f: &Fixture, recording: &str, destination: &str, name: &str) -> NewJob {
    NewJob {
        destination_id: DestinationId::parse(destination).unwrap(),
        file_name: FileName::parse(name).unwrap(),
        ..f.new_job("acme", recording, recording.as_bytes())
    }
}

/// One recording per object key and destination: another recording with the
/// key is NameTaken (ALREADY_EXISTS) and gets no job, the same key at
/// another destination is fine, the same recording id is still a replay;
/// twenty concurrent creations of one key yield one job. An attempt
/// (`register_object_key`) and a resend (`resend_to`) onto a taken key are
/// KeyTaken (FAILED_PRECONDITION) and change nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn object_keys_are_unique_per_destination() {
    let f = Fixture::new();
    let key = || Some("rec/call.mp4".to_owned());
    let (first, created) = f
        .jobs
        .create_or_get_with_key(named_job(&f, "rec-1", "dest-1", "call.mp4"), key())
        .await
        .unwrap();
    assert!(created);
    assert_eq!(first.object_key, key());

    let err = f
        .jobs
        .create_or_get_with_key(named_job(&f, "rec-2", "dest-1", "call.mp4"), key())
        .await
        .unwrap_err();
    let JobStoreError::NameTaken { conflict, .. } = &err else {
        panic!("{err}");
    };
    assert_eq!(conflict.other_job_id, first.job_id);
    let status = tonic::Status::from(err);
    assert_eq!(status.code(), Code::AlreadyExists);
    assert!(
        f.jobs
            .find_by_recording(
                TenantId::parse("acme").unwrap(),
                RecordingId::parse("rec-2").unwrap()
            )
            .await
            .unwrap()
            .is_none()
    );
    let check = f
        .jobs
        .check_object_key(
            TenantId::parse("acme").unwrap(),
            RecordingId::parse("rec-2").unwrap(),
            FileName::parse("call.mp4").unwrap(),
            DestinationId::parse("dest-1").unwrap(),
            "rec/call.mp4".into(),
        )
        .await;
    assert!(matches!(check, Err(JobStoreError::NameTaken { .. })));

    let (replay, created) = f
        .jobs
        .create_or_get_with_key(named_job(&f, "rec-1", "dest-1", "call.mp4"), key())
        .await
        .unwrap();
    assert!(!created);
    assert_eq!(replay.job_id, first.job_id);
    let (elsewhere, created) = f
        .jobs
        .create_or_get_with_key(named_job(&f, "rec-3", "dest-2", "call.mp4"), key())
        .await
        .unwrap();
    assert!(created);

    let racers = (0..20).map(|i| {
        let jobs = f.jobs.clone();
        let new = named_job(&f, &format!("race-{i}"), "dest-3", "call.mp4");
        tokio::spawn(async move { jobs.create_or_get_with_key(new, key()).await })
    });
    let mut created = 0;
    for racer in racers.collect::<Vec<_>>() {
        match racer.await.unwrap() {
            Ok((_, true)) => created += 1,
            Ok((job, false)) => panic!("no replay here: {job:?}"),
            Err(JobStoreError::NameTaken { .. }) => {}
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(created, 1);

    // An attempt whose key (after a prefix change) is taken.
    let (unkeyed, _) = f
        .jobs
        .create_or_get(named_job(&f, "rec-4", "dest-1", "call.mp4"))
        .await
        .unwrap();
    assert_eq!(unkeyed.object_key, None);
    let err = f
        .jobs
        .register_object_key(unkeyed.job_id, "rec/call.mp4".into())
        .await
        .unwrap_err();
    assert!(matches!(err, JobStoreError::KeyTaken { .. }), "{err}");
    assert_eq!(tonic::Status::from(err).code(), Code::FailedPrecondition);
    assert_eq!(f.jobs.get(unkeyed.job_id).await.unwrap().object_key, None);
    let registered = f
        .jobs
        .register_object_key(unkeyed.job_id, "new/call.mp4".into())
        .await
        .unwrap();
    assert_eq!(registered.object_key.as_deref(), Some("new/call.mp4"));

    // A resend onto the taken key.
    f.jobs.claim_due(now(), 100).await.unwrap();
    f.jobs
        .mark_retained(elsewhere.job_id, "NoSuchBucket".into())
        .await
        .unwrap();
    let err = f
        .jobs
        .resend_to(
            elsewhere.job_id,
            Resend {
                destination: Some(DestinationId::parse("dest-1").unwrap()),
                object_key: key(),
                ..Resend::default()
            },
        )
        .await
        .unwrap_err();
    assert!(matches!(err, JobStoreError::KeyTaken { .. }), "{err}");
    let unchanged = f.jobs.get(elsewhere.job_id).await.unwrap();
    assert_eq!(unchanged.state, JobState::Retained);
    assert_eq!(unchanged.destination_id.as_str(), "dest-2");
    assert_eq!(unchanged.object_key, key());
}

/// The first job schema, as version 1 wrote it.
const SCHEMA_V1: &str = "
CREATE TABLE jobs (
    job_id TEXT PRIMARY KEY, tenant_id TEXT NOT NULL, recording_id TEXT NOT NULL,
    destination_id TEXT NOT NULL, file_name TEXT NOT NULL, content_type TEXT NOT NULL,
    backup_path TEXT NOT NULL, sha256 BLOB NOT NULL CHECK (length(sha256) = 32),
    size INTEGER NOT NULL CHECK (size >= 0),
    state TEXT NOT NULL CHECK (state IN
        ('STORED','UPLOADING','VERIFYING','DELIVERED','RETRYING','RETAINED')),
    attempts INTEGER NOT NULL DEFAULT 0, last_error TEXT, location TEXT, verified_by TEXT,
    next_attempt_at INTEGER, created_at INTEGER NOT NULL, updated_at INTEGER NOT NULL,
    backup_corrupt INTEGER NOT NULL DEFAULT 0, backup_deleted INTEGER NOT NULL DEFAULT 0,
    multipart_upload_id TEXT, request_id TEXT,
    UNIQUE (tenant_id, recording_id)
) STRICT;
CREATE INDEX jobs_due ON jobs (state, next_attempt_at);
CREATE INDEX jobs_by_tenant ON jobs (tenant_id, created_at);
CREATE TABLE job_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL REFERENCES jobs (job_id),
    time INTEGER NOT NULL, state TEXT NOT NULL, message TEXT NOT NULL
) STRICT;
CREATE INDEX job_events_by_job ON job_events (job_id, id);
PRAGMA user_version = 1;
";

/// A version 1 database (no object keys; two recordings already share a
/// name, one job's destination is gone) opens as version 3: the older of the
/// two keeps the key computed from its destination's prefix, the newer and
/// the orphan have none, and a new recording with that key is refused.
#[tokio::test]
async fn version_1_database_is_migrated_with_object_keys() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("uploader.db");
    {
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.execute_batch(SCHEMA_V1).unwrap();
        conn.execute_batch(
            "CREATE TABLE destinations (destination_id TEXT PRIMARY KEY, tenant_id TEXT NOT NULL,
                 name TEXT NOT NULL, provider TEXT NOT NULL, endpoint TEXT NOT NULL,
                 region TEXT NOT NULL, bucket TEXT NOT NULL, prefix TEXT NOT NULL,
                 path_style INTEGER NOT NULL, credential_id TEXT NOT NULL);
             INSERT INTO destinations VALUES ('dst-1', 'acme', 'd', 'fs', '', '', '/tmp', '/rec//', 0, '');",
        )
        .unwrap();
        for (i, (job_id, recording, destination, name)) in [
            (
                "11111111-1111-4111-8111-111111111111",
                "old",
                "dst-1",
                "x.mp4",
            ),
            (
                "22222222-2222-4222-8222-222222222222",
                "new",
                "dst-1",
                "x.mp4",
            ),
            (
                "33333333-3333-4333-8333-333333333333",
                "orphan",
                "dst-gone",
                "y.mp4",
            ),
        ]
        .into_iter()
        .enumerate()
        {
            conn.execute(
                "INSERT INTO jobs (job_id, tenant_id, recording_id, destination_id, file_name,
                     content_type, backup_path, sha256, size, state, created_at, updated_at)
                 VALUES (?1, 'acme', ?2, ?3, ?4, 'video/mp4', '/nowhere', zeroblob(32), 0,
                     'DELIVERED', ?5, ?5)",
                rusqlite::params![job_id, recording, destination, name, i as i64],
            )
            .unwrap();
        }
    }
    let jobs = JobStore::open(&db).unwrap();
    let key_of = |id: &str| {
        let jobs = jobs.clone();
        let id = recvault_uploader::jobs::JobId::parse(id).unwrap();
        async move { jobs.get(id).await.unwrap().object_key }
    };
    assert_eq!(
        key_of("11111111-1111-4111-8111-111111111111")
            .await
            .as_deref(),
        Some("rec/x.mp4")
    );
    assert_eq!(key_of("22222222-2222-4222-8222-222222222222").await, None);
    assert_eq!(key_of("33333333-3333-4333-8333-333333333333").await, None);
    let version: i64 = rusqlite::Connection::open(&db)
        .unwrap()
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(version, 4);
    let migrated = jobs
        .get(recvault_uploader::jobs::JobId::parse("11111111-1111-4111-8111-111111111111").unwrap())
        .await
        .unwrap();
    assert_eq!(migrated.doubtful_failures, 0);
    assert_eq!(
        migrated.retrying_since.is_some(),
        migrated.state == JobState::Retrying
    );
    let stored = migrated.stored_sha256;
    assert_eq!(
        stored, None,
        "backups from before encryption were written in clear"
    );

    let backups = BackupStore::open(
        dir.path().join("backups"),
        keys::TestWrapping::generate().key.clone(),
    )
    .unwrap();
    let mut w = backups
        .begin(
            &TenantId::parse("acme").unwrap(),
            &RecordingId::parse("newest").unwrap(),
        )
        .unwrap();
    w.write_chunk(b"z").unwrap();
    let b = w.finish(Sha256Digest::of(b"z")).unwrap();
    let err = jobs
        .create_or_get_with_key(
            NewJob {
                job_id: b.id,
                tenant_id: TenantId::parse("acme").unwrap(),
                recording_id: RecordingId::parse("newest").unwrap(),
                destination_id: DestinationId::parse("dst-1").unwrap(),
                file_name: FileName::parse("x.mp4").unwrap(),
                content_type: ContentType::parse("video/mp4").unwrap(),
                backup_path: b.path,
                sha256: b.sha256,
                size: b.size,
                stored_sha256: Some(b.stored_sha256),
                request_id: None,
            },
            Some("rec/x.mp4".into()),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("recording old"), "{err}");
    drop(jobs);
    // Opening again is a no-op.
    let again = JobStore::open(&db).unwrap();
    assert_eq!(
        again
            .get(
                recvault_uploader::jobs::JobId::parse("11111111-1111-4111-8111-111111111111")
                    .unwrap()
            )
            .await
            .unwrap()
            .object_key
            .as_deref(),
        Some("rec/x.mp4")
    );
}

/// A multipart upload id is forgotten only by its own id: closing another
/// id changes nothing, closing it clears it. A resend elsewhere is refused
/// while an id is recorded, unless the caller released exactly that id
/// (aborted it), which clears it with the caller's history line.
#[tokio::test]
async fn multipart_upload_ids_are_forgotten_only_by_their_id() {
    let f = Fixture::new();
    let id = f.create("acme", "rec-1", b"payload").await.job_id;
    f.jobs.claim_due(now(), 1).await.unwrap();
    f.jobs
        .set_multipart_upload_id(id, Some("mp-1".into()))
        .await
        .unwrap();
    let job = f
        .jobs
        .clear_multipart_upload_id(id, "mp-other".into())
        .await
        .unwrap();
    assert_eq!(job.multipart_upload_id.as_deref(), Some("mp-1"));
    let job = f
        .jobs
        .clear_multipart_upload_id(id, "mp-1".into())
        .await
        .unwrap();
    assert_eq!(job.multipart_upload_id, None);

    f.jobs
        .set_multipart_upload_id(id, Some("mp-2".into()))
        .await
        .unwrap();
    f.jobs
        .mark_retained(id, "AccessDenied".into())
        .await
        .unwrap();
    let elsewhere = || Some(DestinationId::parse("dest-2").unwrap());
    let released = |upload_id: &str| recvault_uploader::jobs::ReleasedUpload {
        upload_id: upload_id.into(),
        message: format!("multipart upload {upload_id} aborted before the resend"),
    };
    for refused in [None, Some(released("mp-other"))] {
        let err = f
            .jobs
            .resend_to(
                id,
                Resend {
                    destination: elsewhere(),
                    released_upload: refused,
                    ..Resend::default()
                },
            )
            .await
            .unwrap_err();
        assert!(err.to_string().contains("mp-2"), "{err}");
        assert_eq!(tonic::Status::from(err).code(), Code::FailedPrecondition);
    }
    let resent = f
        .jobs
        .resend_to(
            id,
            Resend {
                destination: elsewhere(),
                released_upload: Some(released("mp-2")),
                ..Resend::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(resent.state, JobState::Stored);
    assert_eq!(resent.multipart_upload_id, None);
    assert_eq!(resent.destination_id.as_str(), "dest-2");
    let history = f.jobs.history(id).await.unwrap();
    assert!(
        history
            .iter()
            .any(|e| e.message == "multipart upload mp-2 aborted before the resend"),
        "{history:?}"
    );
}

/// A recording whose backup failed its hash check is never delivered, and the
/// recorder is told to send it again under a new recording id: the corrupt
/// job gives up its object key (with a history line), so the re-sent
/// recording with the same file name is accepted at that destination, and
/// the corrupt job still cannot be resent. Found by the scrub (STORED): at
/// once. Found by an attempt's pre-upload check (UPLOADING): the key stays
/// while the attempt runs and is released when it ends RETAINED. A DELIVERED
/// job keeps its key.
#[tokio::test]
async fn a_corrupt_backup_releases_its_object_key_for_the_resent_recording() {
    let f = Fixture::new();
    let key = || Some("x.mp4".to_owned());
    let check = |recording: &str, destination: &str| {
        f.jobs.check_object_key(
            TenantId::parse("acme").unwrap(),
            RecordingId::parse(recording).unwrap(),
            FileName::parse("x.mp4").unwrap(),
            DestinationId::parse(destination).unwrap(),
            "x.mp4".into(),
        )
    };

    // Corrupt while STORED (the scrub).
    let (a, _) = f
        .jobs
        .create_or_get_with_key(named_job(&f, "rec-a", "dest-1", "x.mp4"), key())
        .await
        .unwrap();
    assert!(matches!(
        check("rec-b", "dest-1").await,
        Err(JobStoreError::NameTaken { .. })
    ));
    let marked = f
        .jobs
        .mark_backup_corrupt(a.job_id, "flipped byte".into())
        .await
        .unwrap();
    assert!(marked.backup_corrupt);
    assert_eq!(marked.state, JobState::Retained);
    assert_eq!(marked.object_key, None);
    let history = f.jobs.history(a.job_id).await.unwrap();
    assert!(
        history
            .iter()
            .any(|e| e.message.contains("\"x.mp4\"") && e.message.contains("released")),
        "{history:?}"
    );
    check("rec-b", "dest-1").await.unwrap();
    let (b, created) = f
        .jobs
        .create_or_get_with_key(named_job(&f, "rec-b", "dest-1", "x.mp4"), key())
        .await
        .unwrap();
    assert!(created);
    assert_eq!(b.object_key, key());
    let err = f.jobs.resend(a.job_id, None).await.unwrap_err();
    assert!(
        matches!(err, JobStoreError::FailedPrecondition { .. }),
        "{err}"
    );
    let err = f
        .jobs
        .resend(a.job_id, Some(DestinationId::parse("dest-9").unwrap()))
        .await
        .unwrap_err();
    assert!(
        matches!(err, JobStoreError::FailedPrecondition { .. }),
        "{err}"
    );
    assert_eq!(
        f.jobs.get(a.job_id).await.unwrap().state,
        JobState::Retained
    );

    // Corrupt during an attempt (the worker's check before uploading).
    let (c, _) = f
        .jobs
        .create_or_get_with_key(named_job(&f, "rec-c", "dest-2", "x.mp4"), key())
        .await
        .unwrap();
    let claimed = f.jobs.claim_due(now(), 10).await.unwrap();
    assert!(claimed.iter().any(|j| j.job_id == c.job_id));
    let marked = f
        .jobs
        .mark_backup_corrupt(c.job_id, "hash mismatch".into())
        .await
        .unwrap();
    assert_eq!(marked.state, JobState::Uploading);
    assert_eq!(
        marked.object_key,
        key(),
        "the running attempt may write there"
    );
    assert!(check("rec-d", "dest-2").await.is_err());
    let retained = f
        .jobs
        .mark_retained(c.job_id, "backup corrupt".into())
        .await
        .unwrap();
    assert_eq!(retained.object_key, None);
    check("rec-d", "dest-2").await.unwrap();

    // A DELIVERED job keeps its key.
    let (e, _) = f
        .jobs
        .create_or_get_with_key(named_job(&f, "rec-e", "dest-3", "x.mp4"), key())
        .await
        .unwrap();
    f.jobs.claim_due(now(), 10).await.unwrap();
    f.jobs.mark_verifying(e.job_id).await.unwrap();
    f.jobs
        .mark_delivered(e.job_id, "fs:///x.mp4".into(), VerifiedBy::ReadBack)
        .await
        .unwrap();
    let after = f
        .jobs
        .mark_backup_corrupt(e.job_id, "flipped later".into())
        .await
        .unwrap();
    assert_eq!(after.object_key, key());
    assert!(check("rec-f", "dest-3").await.is_err());
}
