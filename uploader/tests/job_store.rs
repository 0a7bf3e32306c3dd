//! The SQLite job store's own concerns: a database written by an older
//! uploader is migrated, and the name check is an index probe. Everything
//! every backend must do is in the workspace's job store conformance suite
//! (`tests/tests/job_store_conformance.rs`).
#![allow(clippy::unwrap_used)]

#[path = "support/keys.rs"]
mod keys;

use recvault_uploader::backup::BackupStore;
use recvault_uploader::digest::Sha256Digest;
use recvault_uploader::jobs::{
    ContentType, DestinationId, FileName, JobState, JobStore, NewJob, ObjectKey, RecordingId,
    TenantId,
};

/// The name check is a probe of the unique index on (location, key), not a
/// scan of every job.
#[test]
fn key_lookup_uses_the_object_key_index() {
    let dir = tempfile::tempdir().unwrap();
    let jobs =
        recvault_uploader::store::sqlite::SqliteJobs::open(&dir.path().join("jobs.db")).unwrap();
    let plan = jobs.explain_key_probe().unwrap();
    assert!(
        plan.iter()
            .any(|p| p.contains("USING INDEX jobs_by_location_key")),
        "{plan:?}"
    );
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
/// name, one job's destination is gone) opens as the newest version: the older of the
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
    assert_eq!(version, 5);
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
            Some(ObjectKey {
                location: "fs:/tmp".into(),
                key: "rec/x.mp4".into(),
            }),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("recording old"), "{err}");
    assert_eq!(
        jobs.get(
            recvault_uploader::jobs::JobId::parse("11111111-1111-4111-8111-111111111111").unwrap()
        )
        .await
        .unwrap()
        .object_location
        .as_deref(),
        Some("fs:/tmp"),
        "the migration gives every key its destination's real location"
    );
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
