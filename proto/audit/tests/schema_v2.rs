//! Schema version 2 (job, recording and destination ids): a log written by
//! the version-1 code path migrates in place and still verifies, offline
//! tools read an unmigrated file without changing it, and the new fields
//! are stored, hashed, filtered, exported and matched live.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use recvault_audit::{
    AuditFilter, AuditKey, AuditLog, AuditRecord, AuditStorage, GENESIS_HASH, GroupCommitOptions,
    Outcome, chain_hash, export_jsonl, verify_path,
};
use recvault_runtime::secret::SecretBytes;
use rusqlite::Connection;
use tempfile::TempDir;
use time::OffsetDateTime;

fn key() -> AuditKey {
    AuditKey::new(SecretBytes::from_slice(&[9; 32])).unwrap()
}

/// The version-1 schema exactly as the first releases created it (copied
/// here, not shared with the crate, so that a later edit cannot change it).
const V1_DDL: &str = "
CREATE TABLE IF NOT EXISTS audit_events (
    sequence         INTEGER PRIMARY KEY,
    time_unix_nanos  INTEGER NOT NULL,
    identity         TEXT NOT NULL,
    cert_fingerprint TEXT NOT NULL,
    operation        TEXT NOT NULL,
    tenant_id        TEXT NOT NULL,
    credential_id    TEXT NOT NULL,
    lease_id         TEXT NOT NULL,
    outcome          TEXT NOT NULL,
    code             TEXT NOT NULL,
    request_id       TEXT NOT NULL,
    detail           TEXT NOT NULL,
    prev_hash        BLOB NOT NULL,
    hash             BLOB NOT NULL
) STRICT;
CREATE INDEX IF NOT EXISTS audit_events_tenant ON audit_events (tenant_id, sequence);
CREATE INDEX IF NOT EXISTS audit_events_credential ON audit_events (credential_id, sequence);
CREATE INDEX IF NOT EXISTS audit_events_request ON audit_events (request_id, sequence);
CREATE INDEX IF NOT EXISTS audit_events_time ON audit_events (time_unix_nanos);
PRAGMA user_version = 1;
";

fn vault_record(i: u64) -> AuditRecord {
    AuditRecord {
        time: OffsetDateTime::from_unix_timestamp(1_700_000_000 + i as i64).unwrap(),
        identity: "spiffe://recvault.local/uploader".into(),
        cert_fingerprint: "cd".repeat(32),
        tenant_id: format!("t{}", i % 2),
        credential_id: format!("c{i}"),
        lease_id: format!("lease-{i}"),
        request_id: format!("req-{i}"),
        detail: format!("recording rec-{i}"),
        ..AuditRecord::now(
            "recvault.vault.v1.Leases/AcquireLease",
            Outcome::Allowed,
            "OK",
        )
    }
}

/// A version-1 log of `n` vault events, written row by row with the v1
/// INSERT, as a log of the first releases looks on disk. The chain is
/// computed with the v1 layout: `chain_hash` of a record without job,
/// recording or destination adds no extension block (pinned by
/// `chain_vectors.rs`, whose vault vectors come from the v1 code).
fn write_v1_log(path: &Path, n: u64) -> [u8; 32] {
    let conn = Connection::open(path).unwrap();
    let _: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .unwrap();
    conn.execute_batch(V1_DDL).unwrap();
    let mut prev = GENESIS_HASH;
    for i in 1..=n {
        let r = vault_record(i);
        let hash = chain_hash(&key(), &prev, i, &r).unwrap();
        conn.execute(
            "INSERT INTO audit_events (sequence, time_unix_nanos, identity, cert_fingerprint, \
             operation, tenant_id, credential_id, lease_id, outcome, code, request_id, detail, \
             prev_hash, hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
            rusqlite::params![
                i as i64,
                i64::try_from(r.time.unix_timestamp_nanos()).unwrap(),
                r.identity,
                r.cert_fingerprint,
                r.operation,
                r.tenant_id,
                r.credential_id,
                r.lease_id,
                r.outcome.as_str(),
                r.code,
                r.request_id,
                r.detail,
                &prev[..],
                &hash[..],
            ],
        )
        .unwrap();
        prev = hash;
    }
    prev
}

fn user_version(path: &Path) -> i64 {
    Connection::open(path)
        .unwrap()
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap()
}

fn db(dir: &TempDir) -> PathBuf {
    dir.path().join("audit.db")
}

fn recording_record(job: &str, recording: &str, destination: &str) -> AuditRecord {
    AuditRecord {
        identity: "spiffe://recvault.local/manager".into(),
        tenant_id: "acme".into(),
        job_id: job.into(),
        recording_id: recording.into(),
        destination_id: destination.into(),
        ..AuditRecord::now("recvault.uploader.v1.Jobs/GetJob", Outcome::Allowed, "OK")
    }
}

#[tokio::test]
async fn a_v1_log_migrates_in_place_and_its_chain_still_verifies() {
    let dir = TempDir::new().unwrap();
    let path = db(&dir);
    let head = write_v1_log(&path, 12);
    assert_eq!(user_version(&path), 1);

    let log = AuditLog::open(&path, key(), GroupCommitOptions::default()).unwrap();
    assert_eq!(log.head(), (12, head), "the v1 head verified at start");
    assert_eq!(user_version(&path), 3);
    let report = log.verify().await;
    assert!(report.ok, "{report:?}");
    assert_eq!(report.events_checked, 12);

    // The old rows read back with empty ids, everything else as written.
    let old = log.query(&AuditFilter::default(), 0, 100).await.unwrap();
    assert_eq!(old.len(), 12);
    assert_eq!(old[4].record, {
        let mut r = vault_record(5);
        r.time = r.time.to_offset(time::UtcOffset::UTC);
        r
    });
    assert!(old.iter().all(|e| e.record.job_id.is_empty()));

    // The chain continues with an uploader event carrying all three ids.
    let event = log
        .append(recording_record("job-1", "rec-1", "dst-1"))
        .await
        .unwrap();
    assert_eq!(event.sequence, 13);
    assert_eq!(event.prev_hash, head);
    let report = log.verify().await;
    assert!(report.ok && report.events_checked == 13, "{report:?}");
    drop(log);
    let report = verify_path(&path, &key()).unwrap();
    assert!(report.ok && report.events_checked == 13, "{report:?}");

    // The index on job_id exists and the query plan uses it.
    let conn = Connection::open(&path).unwrap();
    let plan: String = conn
        .query_row(
            "EXPLAIN QUERY PLAN SELECT sequence FROM audit_events WHERE job_id = 'job-1' AND sequence > 0",
            [],
            |r| r.get(3),
        )
        .unwrap();
    assert!(plan.contains("audit_events_job"), "{plan}");

    // A second start finds version 2 and changes nothing.
    let log = AuditLog::open(&path, key(), GroupCommitOptions::default()).unwrap();
    assert_eq!(log.head(), (13, event.hash));
}

#[test]
fn offline_tools_read_an_unmigrated_v1_log_without_changing_it() {
    let dir = TempDir::new().unwrap();
    let path = db(&dir);
    write_v1_log(&path, 5);
    let before = std::fs::read(&path).unwrap();

    let report = verify_path(&path, &key()).unwrap();
    assert!(report.ok && report.events_checked == 5, "{report:?}");
    let mut out = Vec::new();
    let filter = AuditFilter {
        tenant_id: Some("t1".into()),
        ..AuditFilter::default()
    };
    assert_eq!(
        export_jsonl(AuditStorage::Sqlite(path.clone()), &filter, &mut out).unwrap(),
        3
    );
    let first: serde_json::Value =
        serde_json::from_str(String::from_utf8(out).unwrap().lines().next().unwrap()).unwrap();
    assert_eq!(first["sequence"], 1);
    assert_eq!(first["job_id"], "");
    // A job filter on a v1 log matches nothing rather than failing.
    let by_job = AuditFilter {
        job_id: Some("job-1".into()),
        ..AuditFilter::default()
    };
    assert_eq!(
        export_jsonl(AuditStorage::Sqlite(path.clone()), &by_job, &mut Vec::new()).unwrap(),
        0
    );

    assert_eq!(user_version(&path), 1);
    assert_eq!(
        std::fs::read(&path).unwrap(),
        before,
        "read-only tools wrote"
    );
}

#[tokio::test]
async fn a_newer_schema_is_refused_by_name() {
    let dir = TempDir::new().unwrap();
    let path = db(&dir);
    drop(AuditLog::open(&path, key(), GroupCommitOptions::default()).unwrap());
    Connection::open(&path)
        .unwrap()
        .execute_batch("PRAGMA user_version = 4")
        .unwrap();
    let err = AuditLog::open(&path, key(), GroupCommitOptions::default()).unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains("schema version 4") && message.contains("knows 3"),
        "{message}"
    );
    let err = verify_path(&path, &key()).unwrap_err();
    assert!(err.to_string().contains("schema version 4"), "{err}");
}

#[tokio::test]
async fn new_fields_are_filtered_in_queries_exports_and_live() {
    let dir = TempDir::new().unwrap();
    let path = db(&dir);
    let log = AuditLog::open(&path, key(), GroupCommitOptions::default()).unwrap();
    let rows = [
        ("job-1", "rec-1", "dst-a"),
        ("job-2", "rec-2", "dst-a"),
        ("job-1", "rec-1", "dst-b"),
        ("", "rec-3", ""),
        ("", "", ""),
    ];
    let mut events = Vec::new();
    for (job, recording, destination) in rows {
        events.push(
            log.append(recording_record(job, recording, destination))
                .await
                .unwrap(),
        );
    }
    let cases: Vec<(AuditFilter, Vec<u64>)> = vec![
        (
            AuditFilter {
                job_id: Some("job-1".into()),
                ..AuditFilter::default()
            },
            vec![1, 3],
        ),
        (
            AuditFilter {
                recording_id: Some("rec-3".into()),
                ..AuditFilter::default()
            },
            vec![4],
        ),
        (
            AuditFilter {
                destination_id: Some("dst-a".into()),
                ..AuditFilter::default()
            },
            vec![1, 2],
        ),
        (
            AuditFilter {
                job_id: Some("job-1".into()),
                destination_id: Some("dst-b".into()),
                ..AuditFilter::default()
            },
            vec![3],
        ),
        (
            AuditFilter {
                recording_id: Some("rec-9".into()),
                ..AuditFilter::default()
            },
            vec![],
        ),
    ];
    for (filter, want) in &cases {
        let got: Vec<u64> = log
            .query(filter, 0, 100)
            .await
            .unwrap()
            .iter()
            .map(|e| e.sequence)
            .collect();
        assert_eq!(&got, want, "query {filter:?}");
        // The live test TailEvents applies agrees with the SELECT.
        let live: Vec<u64> = events
            .iter()
            .filter(|e| filter.matches(e))
            .map(|e| e.sequence)
            .collect();
        assert_eq!(&live, want, "matches {filter:?}");
        let mut out = Vec::new();
        assert_eq!(
            export_jsonl(AuditStorage::Sqlite(path.clone()), filter, &mut out).unwrap(),
            want.len() as u64,
            "export {filter:?}"
        );
    }
    // Stored, read back and exported as given.
    let back = log.query(&AuditFilter::default(), 2, 1).await.unwrap();
    assert_eq!(back[0], events[2]);
    let mut out = Vec::new();
    export_jsonl(AuditStorage::Sqlite(path.clone()), &cases[0].0, &mut out).unwrap();
    let line: serde_json::Value =
        serde_json::from_str(String::from_utf8(out).unwrap().lines().next().unwrap()).unwrap();
    assert_eq!(line["job_id"], "job-1");
    assert_eq!(line["recording_id"], "rec-1");
    assert_eq!(line["destination_id"], "dst-a");
    assert!(log.verify().await.ok);
}

#[tokio::test]
async fn edited_recording_ids_break_the_chain() {
    let dir = TempDir::new().unwrap();
    let path = db(&dir);
    let log = AuditLog::open(&path, key(), GroupCommitOptions::default()).unwrap();
    for i in 1..=4 {
        log.append(recording_record(&format!("job-{i}"), "rec", "dst"))
            .await
            .unwrap();
    }
    for (sequence, sql) in [
        (
            2,
            "UPDATE audit_events SET job_id = 'job-9' WHERE sequence = 2",
        ),
        // Blanking all three drops the extension block: still an edit.
        (
            3,
            "UPDATE audit_events SET job_id = '', recording_id = '', destination_id = '' WHERE sequence = 3",
        ),
    ] {
        let dir2 = TempDir::new().unwrap();
        let copy = dir2.path().join("audit.db");
        Connection::open(&path)
            .unwrap()
            .execute_batch(&format!("VACUUM INTO '{}'", copy.display()))
            .unwrap();
        Connection::open(&copy).unwrap().execute_batch(sql).unwrap();
        let report = verify_path(&copy, &key()).unwrap();
        assert!(!report.ok, "{sql}: {report:?}");
        assert_eq!(report.first_broken_sequence, sequence, "{sql}: {report:?}");
    }
    assert!(log.verify().await.ok);
}
