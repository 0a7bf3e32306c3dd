//! The job store conformance suite: every backend of
//! `recvault_uploader::store` (SQLite, PostgreSQL) passes the same tests,
//! instantiated per backend by `conformance_suite!`, with real backups:
//! idempotent creation, the state machine, claims (disjoint under
//! contention, renewed, fenced, taken over after expiry), crash recovery
//! of a replica's own claims only, resend, backoff, object keys unique per
//! real location, and the scrub finding a flipped byte.
#![allow(clippy::unwrap_used)]

#[path = "../../uploader/tests/support/keys.rs"]
mod keys;

use std::time::Duration;

use recvault_uploader::backup::{BackupStore, StoredBackup};
use recvault_uploader::digest::Sha256Digest;
use recvault_uploader::jobs::{
    ContentType, DestinationId, FileName, JobFilter, JobState, JobStore, JobStoreError, NewJob,
    ObjectKey, RecordingId, Replica, Resend, RetryPolicy, TenantId, VerifiedBy,
};
use recvault_uploader::scrub::scrub_once;
use recvault_uploader::store::Storage;
use time::OffsetDateTime;
use tonic::Code;

/// Which backend a suite function runs on.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Sqlite,
    Postgres,
}

struct Fixture {
    _dir: tempfile::TempDir,
    backups: BackupStore,
    jobs: JobStore,
    storage: Storage,
    /// Keeps the PostgreSQL database of this test.
    _db: Option<recvault_tests::postgres::Database>,
}

/// A claim lifetime short enough for the expiry tests.
const TTL: Duration = Duration::from_secs(3);

impl Fixture {
    /// `None` when the backend cannot run here (PostgreSQL not installed
    /// outside CI; the harness says why).
    fn new(kind: Kind) -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let backups = BackupStore::open(
            dir.path().join("backups"),
            keys::TestWrapping::generate().key.clone(),
        )
        .unwrap();
        let (storage, db) = match kind {
            Kind::Sqlite => (Storage::Sqlite(dir.path().join("jobs.sqlite3")), None),
            Kind::Postgres => {
                let db = recvault_tests::postgres::Postgres::shared()?.database();
                (Storage::Postgres(db.url_file(dir.path())), Some(db))
            }
        };
        let mut f = Self {
            _dir: dir,
            backups,
            jobs: JobStore::open(tempfile::tempdir().unwrap().path().join("x")).unwrap(),
            storage,
            _db: db,
        };
        f.jobs = f.replica("replica-a");
        Some(f)
    }

    /// Another store on the same database, acting as replica `name` (a
    /// restart of a replica opens it again under the same name).
    fn replica(&self, name: &str) -> JobStore {
        // Blocking (the PostgreSQL client runs its own runtime).
        let backends =
            tokio::task::block_in_place(|| recvault_uploader::store::open(&self.storage, name))
                .unwrap();
        JobStore::new(
            backends.jobs,
            Replica {
                instance: name.to_owned(),
                claim_ttl: TTL,
            },
        )
        .unwrap()
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

async fn create_is_idempotent_per_tenant_and_recording(kind: Kind) {
    let Some(f) = Fixture::new(kind) else { return };
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

    // Same recording id, other bytes: refused as FAILED_PRECONDITION.
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
    assert_eq!(status.code(), Code::FailedPrecondition);
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

async fn full_delivery_and_illegal_transitions(kind: Kind) {
    let Some(f) = Fixture::new(kind) else { return };
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

async fn claim_due_takes_only_due_jobs_and_each_once(kind: Kind) {
    let Some(f) = Fixture::new(kind) else { return };
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
    // (b and c end their attempts: in two hours their claims would have
    // expired, and they would be taken over.)
    for id in [b.job_id, c.job_id] {
        f.jobs.mark_retained(id, "done".into()).await.unwrap();
    }
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

async fn crash_recovery_moves_unfinished_attempts_to_retrying(kind: Kind) {
    let Some(f) = Fixture::new(kind) else { return };
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

    // "Crash": drop the store without finishing, open the database again
    // as the same replica.
    let jobs = f.replica("replica-a");
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
}

async fn resend_only_from_retained_or_retrying_with_a_backup(kind: Kind) {
    let Some(f) = Fixture::new(kind) else { return };
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

    // A backup missing from the backup store is the service's check
    // (uploader/tests/service.rs): the store cannot see the backup store.

    let history = f.jobs.history(id).await.unwrap();
    assert!(history.iter().any(|e| e.message.contains("dest-2")));
    assert!(history.iter().any(|e| e.message.contains("mp-9")));
}

async fn subscribers_see_committed_changes(kind: Kind) {
    let Some(f) = Fixture::new(kind) else { return };
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
async fn retry_window_start_and_doubtful_count_are_kept_and_reset_by_resend(kind: Kind) {
    let Some(f) = Fixture::new(kind) else { return };
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

async fn scrub_marks_a_flipped_byte_and_deletes_nothing(kind: Kind) {
    let Some(f) = Fixture::new(kind) else { return };
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
async fn scrub_checks_a_backup_in_clear_against_its_content(kind: Kind) {
    let Some(f) = Fixture::new(kind) else { return };
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
/// `key` at the bucket destination `dest` points at: each `dest-N` its own
/// bucket, so ids that share a bucket are spelled out where a test needs it.
fn at(dest: &str, key: &str) -> ObjectKey {
    ObjectKey {
        location: format!("s3:http://s3.test/{dest}"),
        key: key.to_owned(),
    }
}

fn named_job(f: &Fixture, recording: &str, destination: &str, name: &str) -> NewJob {
    NewJob {
        destination_id: DestinationId::parse(destination).unwrap(),
        file_name: FileName::parse(name).unwrap(),
        ..f.new_job("acme", recording, recording.as_bytes())
    }
}

/// One recording per object key and real location: another recording with
/// the key is NameTaken (FAILED_PRECONDITION, never ALREADY_EXISTS, which
/// reads as "stored") and gets no job, also through another destination id
/// at the same bucket; the same key at another bucket is fine, the same
/// recording id is still a replay;
/// twenty concurrent creations of one key yield one job. An attempt
/// (`register_object_key`) and a resend (`resend_to`) onto a taken key are
/// KeyTaken (FAILED_PRECONDITION) and change nothing.
async fn object_keys_are_unique_per_real_location(kind: Kind) {
    let Some(f) = Fixture::new(kind) else { return };
    let key = |dest: &str| Some(at(dest, "rec/call.mp4"));
    let (first, created) = f
        .jobs
        .create_or_get_with_key(named_job(&f, "rec-1", "dest-1", "call.mp4"), key("dest-1"))
        .await
        .unwrap();
    assert!(created);
    assert_eq!(first.object_key.as_deref(), Some("rec/call.mp4"));

    let err = f
        .jobs
        .create_or_get_with_key(named_job(&f, "rec-2", "dest-1", "call.mp4"), key("dest-1"))
        .await
        .unwrap_err();
    let JobStoreError::NameTaken { conflict, .. } = &err else {
        panic!("{err}");
    };
    assert_eq!(conflict.other_job_id, first.job_id);
    let status = tonic::Status::from(err);
    assert_eq!(status.code(), Code::FailedPrecondition);
    // Another destination id at the same bucket is the same namespace.
    let same_bucket = NewJob {
        destination_id: DestinationId::parse("dest-1-again").unwrap(),
        ..named_job(&f, "rec-2b", "dest-1", "call.mp4")
    };
    let err = f
        .jobs
        .create_or_get_with_key(same_bucket, key("dest-1"))
        .await
        .unwrap_err();
    let JobStoreError::NameTaken { conflict, .. } = &err else {
        panic!("{err}");
    };
    assert_eq!(conflict.other_destination_id.as_str(), "dest-1");
    assert!(
        err.to_string().contains("points at the same bucket"),
        "{err}"
    );
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
            at("dest-1", "rec/call.mp4"),
        )
        .await;
    assert!(matches!(check, Err(JobStoreError::NameTaken { .. })));

    let (replay, created) = f
        .jobs
        .create_or_get_with_key(named_job(&f, "rec-1", "dest-1", "call.mp4"), key("dest-1"))
        .await
        .unwrap();
    assert!(!created);
    assert_eq!(replay.job_id, first.job_id);
    let (elsewhere, created) = f
        .jobs
        .create_or_get_with_key(named_job(&f, "rec-3", "dest-2", "call.mp4"), key("dest-2"))
        .await
        .unwrap();
    assert!(created);

    let racers = (0..20).map(|i| {
        let jobs = f.jobs.clone();
        let new = named_job(&f, &format!("race-{i}"), "dest-3", "call.mp4");
        tokio::spawn(async move { jobs.create_or_get_with_key(new, key("dest-3")).await })
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
        .register_object_key(unkeyed.job_id, at("dest-1", "rec/call.mp4"))
        .await
        .unwrap_err();
    assert!(matches!(err, JobStoreError::KeyTaken { .. }), "{err}");
    assert_eq!(tonic::Status::from(err).code(), Code::FailedPrecondition);
    assert_eq!(f.jobs.get(unkeyed.job_id).await.unwrap().object_key, None);
    let registered = f
        .jobs
        .register_object_key(unkeyed.job_id, at("dest-1", "new/call.mp4"))
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
                object_key: key("dest-1"),
                ..Resend::default()
            },
        )
        .await
        .unwrap_err();
    assert!(matches!(err, JobStoreError::KeyTaken { .. }), "{err}");
    let unchanged = f.jobs.get(elsewhere.job_id).await.unwrap();
    assert_eq!(unchanged.state, JobState::Retained);
    assert_eq!(unchanged.destination_id.as_str(), "dest-2");
    assert_eq!(unchanged.object_key.as_deref(), Some("rec/call.mp4"));
}

/// A multipart upload id is forgotten only by its own id: closing another
/// id changes nothing, closing it clears it. A resend elsewhere is refused
/// while an id is recorded, unless the caller released exactly that id
/// (aborted it), which clears it with the caller's history line.
async fn multipart_upload_ids_are_forgotten_only_by_their_id(kind: Kind) {
    let Some(f) = Fixture::new(kind) else { return };
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
async fn a_corrupt_backup_releases_its_object_key_for_the_resent_recording(kind: Kind) {
    let Some(f) = Fixture::new(kind) else { return };
    let key = |dest: &str| Some(at(dest, "x.mp4"));
    let check = |recording: &str, destination: &str| {
        f.jobs.check_object_key(
            TenantId::parse("acme").unwrap(),
            RecordingId::parse(recording).unwrap(),
            FileName::parse("x.mp4").unwrap(),
            DestinationId::parse(destination).unwrap(),
            at(destination, "x.mp4"),
        )
    };

    // Corrupt while STORED (the scrub).
    let (a, _) = f
        .jobs
        .create_or_get_with_key(named_job(&f, "rec-a", "dest-1", "x.mp4"), key("dest-1"))
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
        .create_or_get_with_key(named_job(&f, "rec-b", "dest-1", "x.mp4"), key("dest-1"))
        .await
        .unwrap();
    assert!(created);
    assert_eq!(b.object_key.as_deref(), Some("x.mp4"));
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
        .create_or_get_with_key(named_job(&f, "rec-c", "dest-2", "x.mp4"), key("dest-2"))
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
        marked.object_key.as_deref(),
        Some("x.mp4"),
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
        .create_or_get_with_key(named_job(&f, "rec-e", "dest-3", "x.mp4"), key("dest-3"))
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
    assert_eq!(after.object_key.as_deref(), Some("x.mp4"));
    assert!(check("rec-f", "dest-3").await.is_err());
}

/// Two replicas, eight claimers each, 200 due jobs: every job is claimed
/// exactly once, by a claimer whose replica is its claim's owner.
async fn claims_are_disjoint_under_contention(kind: Kind) {
    let Some(f) = Fixture::new(kind) else { return };
    for i in 0..200 {
        f.create("acme", &format!("rec-{i}"), format!("{i}").as_bytes())
            .await;
    }
    let replicas = [f.jobs.clone(), f.replica("replica-b")];
    let mut tasks = Vec::new();
    for t in 0..16 {
        let jobs = replicas[t % 2].clone();
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let claimed = jobs.claim_due(now(), 3).await.unwrap();
                if claimed.is_empty() {
                    return mine;
                }
                for job in claimed {
                    assert_eq!(job.claim_owner.as_deref(), Some(jobs.replica()));
                    assert_eq!(job.state, JobState::Uploading);
                    mine.push(job.job_id);
                }
            }
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    let claimed = all.len();
    all.sort();
    all.dedup();
    assert_eq!(claimed, 200, "every job claimed");
    assert_eq!(all.len(), 200, "no job claimed twice");
}

/// A claim fences the attempt: another replica can neither claim the job
/// nor change it while the claim holds; renewing keeps it; once it expires
/// unrenewed, the other replica's next claim takes the job over (its
/// multipart upload kept for resume), names who held it in the history,
/// and the first replica's late changes are refused as ClaimLost.
async fn a_claim_is_fenced_renewed_and_taken_over_after_expiry(kind: Kind) {
    let Some(f) = Fixture::new(kind) else { return };
    let b = f.replica("replica-b");
    let job = f.create("acme", "rec-1", b"payload").await;
    let claimed = f.jobs.claim_due(now(), 10).await.unwrap();
    assert_eq!(claimed.len(), 1);
    assert!(b.claim_due(now(), 10).await.unwrap().is_empty());
    let err = b.mark_verifying(job.job_id).await.unwrap_err();
    assert!(matches!(err, JobStoreError::ClaimLost { .. }), "{err}");
    assert_eq!(tonic::Status::from(err).code(), Code::Aborted);
    f.jobs
        .set_multipart_upload_id(job.job_id, Some("mp-1".into()))
        .await
        .unwrap();
    // Renewed for longer than the TTL: still ours.
    for _ in 0..3 {
        tokio::time::sleep(TTL / 2).await;
        f.jobs.renew_claim(job.job_id).await.unwrap();
        assert!(b.claim_due(now(), 10).await.unwrap().is_empty());
    }
    // Not renewed: it expires and replica-b takes it over.
    tokio::time::sleep(TTL + Duration::from_millis(300)).await;
    let taken = b.claim_due(now(), 10).await.unwrap();
    assert_eq!(taken.len(), 1);
    assert_eq!(taken[0].job_id, job.job_id);
    assert_eq!(taken[0].claim_owner.as_deref(), Some("replica-b"));
    assert_eq!(taken[0].attempts, 2);
    assert_eq!(taken[0].multipart_upload_id.as_deref(), Some("mp-1"));
    let late = f.jobs.renew_claim(job.job_id).await.unwrap_err();
    assert!(matches!(late, JobStoreError::ClaimLost { .. }), "{late}");
    let late = f.jobs.mark_verifying(job.job_id).await.unwrap_err();
    assert!(
        late.to_string().contains("replica replica-b runs it now"),
        "{late}"
    );
    assert!(f.jobs.recover_after_crash().await.unwrap().is_empty());
    let history = b.history(job.job_id).await.unwrap();
    let takeover = history
        .iter()
        .find(|e| e.message.contains("claim of replica replica-a expired"))
        .unwrap();
    assert_eq!(takeover.replica, "replica-b");
    assert_eq!(takeover.state, JobState::Retrying);
    let started: Vec<&str> = history
        .iter()
        .filter(|e| e.message.starts_with("attempt"))
        .map(|e| e.replica.as_str())
        .collect();
    assert_eq!(started, ["replica-a", "replica-b"]);
    b.mark_verifying(job.job_id).await.unwrap();
    let done = b
        .mark_delivered(job.job_id, "s3://b/call.mp4".into(), VerifiedBy::ReadBack)
        .await
        .unwrap();
    assert_eq!(done.claim_owner, None);
}

/// At start-up a replica recovers only the attempts it held itself.
async fn crash_recovery_takes_only_this_replicas_claims(kind: Kind) {
    let Some(f) = Fixture::new(kind) else { return };
    let b = f.replica("replica-b");
    let one = f.create("acme", "rec-1", b"1").await;
    assert_eq!(f.jobs.claim_due(now(), 1).await.unwrap().len(), 1);
    let two = f.create("acme", "rec-2", b"2").await;
    assert_eq!(b.claim_due(now(), 1).await.unwrap()[0].job_id, two.job_id);
    let restarted = f.replica("replica-a");
    let recovered = restarted.recover_after_crash().await.unwrap();
    assert_eq!(recovered.len(), 1);
    assert_eq!(recovered[0].job_id, one.job_id);
    assert_eq!(
        b.get(two.job_id).await.unwrap().state,
        JobState::Uploading,
        "replica-b still runs its attempt"
    );
}

/// A resend that must abort an upload first parks the job: a RETRYING job
/// becomes RETAINED in its own transaction and is not due any more.
async fn a_resend_parks_the_job_before_the_abort(kind: Kind) {
    let Some(f) = Fixture::new(kind) else { return };
    let job = f.create("acme", "rec-1", b"1").await;
    f.jobs.claim_due(now(), 1).await.unwrap();
    f.jobs
        .mark_retry(job.job_id, "503".into(), now(), false)
        .await
        .unwrap();
    let parked = f
        .jobs
        .park_for_resend(job.job_id, "aborting".into())
        .await
        .unwrap();
    assert_eq!(parked.state, JobState::Retained);
    assert!(f.jobs.claim_due(now(), 10).await.unwrap().is_empty());
    let again = f.jobs.resend(job.job_id, None).await.unwrap();
    assert_eq!(again.state, JobState::Stored);
}

/// What one replica commits (and the progress it announces) reaches a
/// subscriber on another replica: on PostgreSQL through LISTEN/NOTIFY. The
/// SQLite backend has one process and nothing to follow.
async fn changes_on_one_replica_reach_watchers_on_another(kind: Kind) {
    if matches!(kind, Kind::Sqlite) {
        return;
    }
    let Some(f) = Fixture::new(kind) else { return };
    let b = f.replica("replica-b");
    let job = f.create("acme", "rec-1", b"1").await;
    let mut seen = b.subscribe();
    let started = std::time::Instant::now();
    f.jobs.claim_due(now(), 1).await.unwrap();
    let update = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let j = seen.recv().await.unwrap();
            if j.job_id == job.job_id && j.state == JobState::Uploading {
                return j;
            }
        }
    })
    .await
    .expect("replica-b saw replica-a's claim");
    eprintln!("cross-replica change latency: {:?}", started.elapsed());
    assert_eq!(update.claim_owner.as_deref(), Some("replica-a"));
    f.jobs.publish_progress(&update, 4096);
    let progress = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let j = seen.recv().await.unwrap();
            if j.bytes_sent == 4096 {
                return j;
            }
        }
    })
    .await
    .expect("replica-b saw replica-a's progress");
    assert_eq!(progress.job_id, job.job_id);
}

/// One `#[tokio::test]` per suite function for each backend.
macro_rules! conformance_suite {
    ($backend:ident, $kind:expr) => {
        mod $backend {
            use super::*;
            conformance_suite!(@tests $kind;
                create_is_idempotent_per_tenant_and_recording,
                full_delivery_and_illegal_transitions,
                claim_due_takes_only_due_jobs_and_each_once,
                crash_recovery_moves_unfinished_attempts_to_retrying,
                resend_only_from_retained_or_retrying_with_a_backup,
                subscribers_see_committed_changes,
                retry_window_start_and_doubtful_count_are_kept_and_reset_by_resend,
                scrub_marks_a_flipped_byte_and_deletes_nothing,
                scrub_checks_a_backup_in_clear_against_its_content,
                object_keys_are_unique_per_real_location,
                multipart_upload_ids_are_forgotten_only_by_their_id,
                a_corrupt_backup_releases_its_object_key_for_the_resent_recording,
                claims_are_disjoint_under_contention,
                a_claim_is_fenced_renewed_and_taken_over_after_expiry,
                crash_recovery_takes_only_this_replicas_claims,
                a_resend_parks_the_job_before_the_abort,
                changes_on_one_replica_reach_watchers_on_another,
            );
        }
    };
    (@tests $kind:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() {
                super::$name($kind).await;
            }
        )*
    };
}

conformance_suite!(sqlite, Kind::Sqlite);
conformance_suite!(postgres, Kind::Postgres);
