//! The audit log against real SQLite files: chain, group commit, fail-closed
//! writes, tamper detection (live and offline), queries, tailing, export.
#![allow(clippy::unwrap_used)]

use std::{path::Path, sync::Arc};

use recvault_audit::{
    AuditEvent, AuditFilter, AuditKey, AuditLog, AuditRecord, AuditStorage, GENESIS_HASH,
    GroupCommitOptions, Outcome, VerifyReport, chain_hash, export_jsonl, verify_path,
};
use recvault_runtime::secret::SecretBytes;
use rusqlite::Connection;
use tempfile::TempDir;
use time::OffsetDateTime;

const T0: i64 = 1_700_000_000;

fn key(byte: u8) -> AuditKey {
    AuditKey::new(SecretBytes::from_slice(&[byte; 32])).unwrap()
}

fn open(dir: &TempDir) -> AuditLog {
    AuditLog::open(&db(dir), key(7), GroupCommitOptions::default()).unwrap()
}

fn db(dir: &TempDir) -> std::path::PathBuf {
    dir.path().join("audit.db")
}

/// Event `i`: second T0+i, tenants t0..t2, credentials c0..c4, every 4th denied.
fn record(i: u64) -> AuditRecord {
    let (outcome, code) = if i.is_multiple_of(4) {
        (Outcome::Denied, "PERMISSION_DENIED")
    } else {
        (Outcome::Allowed, "OK")
    };
    AuditRecord {
        time: OffsetDateTime::from_unix_timestamp(T0 + i as i64).unwrap(),
        identity: format!("spiffe://recvault.local/id{}", i % 2),
        cert_fingerprint: "ab".repeat(32),
        tenant_id: format!("t{}", i % 3),
        credential_id: format!("c{}", i % 5),
        lease_id: format!("lease-{i}"),
        request_id: format!("req-{i}"),
        detail: format!("recording rec-{i}"),
        ..AuditRecord::now("recvault.vault.v1.Leases/AcquireLease", outcome, code)
    }
}

async fn append_n(log: &AuditLog, range: std::ops::RangeInclusive<u64>) -> Vec<AuditEvent> {
    let mut events = Vec::new();
    for i in range {
        events.push(log.append(record(i)).await.unwrap());
    }
    events
}

fn broken_at(report: &VerifyReport, sequence: u64) {
    assert!(!report.ok, "{report:?}");
    assert_eq!(report.first_broken_sequence, sequence, "{report:?}");
    assert_eq!(report.events_checked, sequence - 1, "{report:?}");
    assert!(!report.reason.is_empty());
}

/// Both the running log and the offline check must name `sequence`.
async fn assert_broken_at(log: &AuditLog, path: &Path, sequence: u64) {
    broken_at(&log.verify().await, sequence);
    broken_at(&verify_path(path, &key(7)).unwrap(), sequence);
}

fn tamper(path: &Path, sql: &str) {
    let conn = Connection::open(path).unwrap();
    conn.execute_batch(sql).unwrap();
}

#[tokio::test]
async fn append_returns_gapless_sequences_and_valid_chain() {
    let dir = TempDir::new().unwrap();
    let log = open(&dir);
    assert_eq!(log.head(), (0, GENESIS_HASH));
    assert!(log.verify().await.ok);

    let events = append_n(&log, 1..=10).await;
    let mut prev = GENESIS_HASH;
    for (i, event) in events.iter().enumerate() {
        assert_eq!(event.sequence, i as u64 + 1);
        assert_eq!(event.prev_hash, prev);
        assert_eq!(
            event.hash,
            chain_hash(&key(7), &prev, event.sequence, &event.record).unwrap()
        );
        prev = event.hash;
    }
    assert_eq!(log.head(), (10, prev));
    let report = log.verify().await;
    assert_eq!(
        report,
        VerifyReport {
            ok: true,
            events_checked: 10,
            first_broken_sequence: 0,
            reason: String::new()
        }
    );
    // What append returned is exactly what is stored.
    let stored = log.query(&AuditFilter::default(), 0, 100).await.unwrap();
    assert_eq!(stored, events);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appends_are_group_committed() {
    const TASKS: u64 = 64;
    const PER_TASK: u64 = 16;
    let dir = TempDir::new().unwrap();
    let log = Arc::new(open(&dir));
    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            let log = Arc::clone(&log);
            tokio::spawn(async move {
                let mut seqs = Vec::new();
                for i in 0..PER_TASK {
                    seqs.push(log.append(record(t * PER_TASK + i)).await.unwrap().sequence);
                }
                seqs
            })
        })
        .collect();
    let mut seqs = Vec::new();
    for task in tasks {
        seqs.extend(task.await.unwrap());
    }
    seqs.sort_unstable();
    let total = TASKS * PER_TASK;
    assert_eq!(seqs, (1..=total).collect::<Vec<_>>());

    let stats = log.stats();
    assert_eq!(stats.events, total);
    assert!(
        stats.commits < total / 2,
        "group commit should batch: {stats:?}"
    );
    let report = log.verify().await;
    assert!(report.ok && report.events_checked == total, "{report:?}");
    let stored = log.query(&AuditFilter::default(), 0, 10_000).await.unwrap();
    assert_eq!(stored.len() as u64, total);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_log_lingers_to_gather_the_next_batch() {
    let dir = TempDir::new().unwrap();
    let options = GroupCommitOptions {
        max_batch: 512,
        linger: std::time::Duration::from_millis(200),
        busy_batch: 1,
    };
    let log = Arc::new(AuditLog::open(&db(&dir), key(7), options).unwrap());
    // One commit of one event: with busy_batch = 1 the log is now busy, so
    // the writer sleeps before the next batch and all 8 appends meet there.
    log.append(record(0)).await.unwrap();
    let tasks: Vec<_> = (1..=8)
        .map(|i| {
            let log = Arc::clone(&log);
            tokio::spawn(async move { log.append(record(i)).await.unwrap() })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let stats = log.stats();
    assert_eq!(stats.events, 9);
    assert!(stats.commits <= 3, "{stats:?}");
    assert!(log.verify().await.ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_log_commits_at_once() {
    let dir = TempDir::new().unwrap();
    let options = GroupCommitOptions {
        max_batch: 512,
        linger: std::time::Duration::from_secs(30),
        busy_batch: 2,
    };
    let log = AuditLog::open(&db(&dir), key(7), options).unwrap();
    // One event per commit never makes the log busy: 30 s of linger would
    // show up as a timeout here.
    for i in 0..5 {
        tokio::time::timeout(std::time::Duration::from_secs(10), log.append(record(i)))
            .await
            .expect("an idle log must not linger")
            .unwrap();
    }
    assert_eq!(log.stats().commits, 5);
}

#[tokio::test]
async fn failed_writes_fail_closed_and_store_nothing() {
    let dir = TempDir::new().unwrap();
    let log = open(&dir);
    append_n(&log, 1..=3).await;
    let head = log.head();
    let stats = log.stats();

    log.fail_writes(true);
    let mut secretish = record(4);
    secretish.detail = "do-not-echo-this-detail".into();
    let err = log.append(secretish).await.unwrap_err();
    let message = err.to_string();
    assert!(message.contains("unavailable"), "{message}");
    assert!(!message.contains("do-not-echo"), "{message}");
    assert!(log.append(record(5)).await.is_err());
    assert_eq!(log.head(), head);
    assert_eq!(log.stats(), stats);
    let stored = log.query(&AuditFilter::default(), 0, 100).await.unwrap();
    assert_eq!(stored.len(), 3);

    log.fail_writes(false);
    let event = log.append(record(6)).await.unwrap();
    assert_eq!(event.sequence, 4);
    assert_eq!(event.prev_hash, head.1);
    let report = log.verify().await;
    assert!(report.ok && report.events_checked == 4, "{report:?}");
}

#[tokio::test]
async fn edited_field_is_reported_at_its_sequence() {
    let dir = TempDir::new().unwrap();
    let log = open(&dir);
    append_n(&log, 1..=10).await;
    tamper(
        &db(&dir),
        "UPDATE audit_events SET tenant_id = 'evil' WHERE sequence = 5",
    );
    assert_broken_at(&log, &db(&dir), 5).await;
}

#[tokio::test]
async fn edited_outcome_is_reported_at_its_sequence() {
    let dir = TempDir::new().unwrap();
    let log = open(&dir);
    append_n(&log, 1..=10).await;
    // Sequence 4 is record(4): denied. Turning it into "allowed" must show.
    tamper(
        &db(&dir),
        "UPDATE audit_events SET outcome = 'allowed' WHERE sequence = 4",
    );
    assert_broken_at(&log, &db(&dir), 4).await;
}

/// Rule: a deleted event N is reported as N (the first expected sequence that
/// is missing), not as N+1 whose prev_hash no longer links.
#[tokio::test]
async fn deleted_event_is_reported_at_its_sequence() {
    let dir = TempDir::new().unwrap();
    let log = open(&dir);
    append_n(&log, 1..=10).await;
    tamper(&db(&dir), "DELETE FROM audit_events WHERE sequence = 7");
    assert_broken_at(&log, &db(&dir), 7).await;
}

#[tokio::test]
async fn swapped_events_are_reported_at_the_lower_sequence() {
    let dir = TempDir::new().unwrap();
    let log = open(&dir);
    append_n(&log, 1..=10).await;
    // Swap every column but the sequence number between events 3 and 8.
    tamper(
        &db(&dir),
        "UPDATE audit_events SET sequence = -3 WHERE sequence = 3;
         UPDATE audit_events SET sequence = 3 WHERE sequence = 8;
         UPDATE audit_events SET sequence = 8 WHERE sequence = -3;",
    );
    assert_broken_at(&log, &db(&dir), 3).await;
}

#[tokio::test]
async fn swapped_contents_with_hashes_kept_are_reported_at_the_lower_sequence() {
    let dir = TempDir::new().unwrap();
    let log = open(&dir);
    append_n(&log, 1..=10).await;
    tamper(
        &db(&dir),
        "UPDATE audit_events SET
             tenant_id = (SELECT tenant_id FROM audit_events WHERE sequence = 9),
             lease_id = (SELECT lease_id FROM audit_events WHERE sequence = 9)
         WHERE sequence = 6;",
    );
    assert_broken_at(&log, &db(&dir), 6).await;
}

#[tokio::test]
async fn edited_hash_is_reported_at_its_sequence() {
    let dir = TempDir::new().unwrap();
    let log = open(&dir);
    append_n(&log, 1..=10).await;
    tamper(
        &db(&dir),
        "UPDATE audit_events SET hash = zeroblob(32) WHERE sequence = 4",
    );
    assert_broken_at(&log, &db(&dir), 4).await;
}

#[tokio::test]
async fn truncation_is_caught_by_the_running_log() {
    let dir = TempDir::new().unwrap();
    let log = open(&dir);
    append_n(&log, 1..=10).await;
    tamper(&db(&dir), "DELETE FROM audit_events WHERE sequence > 8");
    // The running vault knows it committed 10 events.
    broken_at(&log.verify().await, 9);
    // Offline there is no anchor: a shorter valid chain verifies (documented).
    assert!(verify_path(&db(&dir), &key(7)).unwrap().ok);
}

#[tokio::test]
async fn reopen_continues_the_chain() {
    let dir = TempDir::new().unwrap();
    let head = {
        let log = open(&dir);
        append_n(&log, 1..=5).await;
        log.head()
    };
    let log = open(&dir);
    assert_eq!(log.head(), head);
    let event = log.append(record(6)).await.unwrap();
    assert_eq!((event.sequence, event.prev_hash), (6, head.1));
    append_n(&log, 7..=9).await;
    let report = log.verify().await;
    assert!(report.ok && report.events_checked == 9, "{report:?}");
    drop(log);
    let report = verify_path(&db(&dir), &key(7)).unwrap();
    assert!(report.ok && report.events_checked == 9, "{report:?}");
}

#[tokio::test]
async fn forged_event_is_detected_and_blocks_startup() {
    let dir = TempDir::new().unwrap();
    let head = {
        let log = open(&dir);
        append_n(&log, 1..=5).await;
        log.head()
    };
    // Well linked, but hashed with a key the attacker made up.
    let forged = record(6);
    let hash = chain_hash(&key(99), &head.1, 6, &forged).unwrap();
    let conn = Connection::open(db(&dir)).unwrap();
    conn.execute(
        "INSERT INTO audit_events (sequence, time_unix_nanos, identity, cert_fingerprint, \
         operation, tenant_id, credential_id, lease_id, outcome, code, request_id, detail, \
         prev_hash, hash) VALUES (6, ?1, ?2, '', ?3, ?4, '', '', 'allowed', 'OK', '', '', ?5, ?6)",
        rusqlite::params![
            i64::try_from(forged.time.unix_timestamp_nanos()).unwrap(),
            forged.identity,
            forged.operation,
            forged.tenant_id,
            &head.1[..],
            &hash[..],
        ],
    )
    .unwrap();
    drop(conn);

    broken_at(&verify_path(&db(&dir), &key(7)).unwrap(), 6);
    let err = AuditLog::open(&db(&dir), key(7), GroupCommitOptions::default()).unwrap_err();
    let message = err.to_string();
    assert!(message.contains("sequence 6"), "{message}");
}

#[tokio::test]
async fn wrong_key_fails_at_sequence_1() {
    let dir = TempDir::new().unwrap();
    drop({
        let log = open(&dir);
        append_n(&log, 1..=3).await;
        log
    });
    broken_at(&verify_path(&db(&dir), &key(8)).unwrap(), 1);
    // Startup checks the last event under the given key.
    let err = AuditLog::open(&db(&dir), key(8), GroupCommitOptions::default()).unwrap_err();
    assert!(err.to_string().contains("sequence 3"), "{err}");
}

#[tokio::test]
async fn query_filters_each_work() {
    let dir = TempDir::new().unwrap();
    let log = open(&dir);
    append_n(&log, 1..=30).await;
    let seqs = |events: Vec<AuditEvent>| events.iter().map(|e| e.sequence).collect::<Vec<_>>();
    // Sequence i holds record(i).
    let expect = |keep: &dyn Fn(u64) -> bool| (1..=30).filter(|&i| keep(i)).collect::<Vec<u64>>();
    let cases: Vec<(AuditFilter, Vec<u64>)> = vec![
        (AuditFilter::default(), expect(&|_| true)),
        (
            AuditFilter {
                tenant_id: Some("t1".into()),
                ..AuditFilter::default()
            },
            expect(&|i| i % 3 == 1),
        ),
        (
            AuditFilter {
                credential_id: Some("c2".into()),
                ..AuditFilter::default()
            },
            expect(&|i| i % 5 == 2),
        ),
        (
            AuditFilter {
                identity: Some("spiffe://recvault.local/id0".into()),
                ..AuditFilter::default()
            },
            expect(&|i| i.is_multiple_of(2)),
        ),
        (
            AuditFilter {
                outcome: Some(Outcome::Denied),
                ..AuditFilter::default()
            },
            expect(&|i| i.is_multiple_of(4)),
        ),
        (
            AuditFilter {
                request_id: Some("req-17".into()),
                ..AuditFilter::default()
            },
            vec![17],
        ),
        (
            AuditFilter {
                lease_id: Some("lease-23".into()),
                ..AuditFilter::default()
            },
            vec![23],
        ),
        (
            AuditFilter {
                operation: Some("recvault.vault.v1.Leases/ReleaseLease".into()),
                ..AuditFilter::default()
            },
            vec![],
        ),
        (
            AuditFilter {
                since: Some(OffsetDateTime::from_unix_timestamp(T0 + 10).unwrap()),
                until: Some(OffsetDateTime::from_unix_timestamp(T0 + 15).unwrap()),
                ..AuditFilter::default()
            },
            (10..15).collect(),
        ),
        (
            AuditFilter {
                tenant_id: Some("t0".into()),
                outcome: Some(Outcome::Denied),
                ..AuditFilter::default()
            },
            expect(&|i| i.is_multiple_of(3) && i.is_multiple_of(4)),
        ),
    ];
    for (filter, want) in cases {
        let got = seqs(log.query(&filter, 0, 1000).await.unwrap());
        assert_eq!(got, want, "{filter:?}");
    }
}

#[tokio::test]
async fn query_pages_by_sequence_and_caps_limit() {
    let dir = TempDir::new().unwrap();
    let log = open(&dir);
    append_n(&log, 1..=25).await;
    let all = AuditFilter::default();
    let mut after = 0;
    let mut seen = Vec::new();
    loop {
        let page = log.query(&all, after, 10).await.unwrap();
        let Some(last) = page.last() else { break };
        after = last.sequence;
        seen.extend(page.iter().map(|e| e.sequence));
    }
    assert_eq!(seen, (1..=25).collect::<Vec<_>>());
    assert!(log.query(&all, 0, 0).await.unwrap().is_empty());
    assert!(log.query(&all, u64::MAX, 10).await.unwrap().is_empty());
}

#[tokio::test]
async fn subscribers_receive_committed_events() {
    let dir = TempDir::new().unwrap();
    let log = open(&dir);
    let mut tail = log.subscribe();
    let appended = append_n(&log, 1..=3).await;
    for event in appended {
        assert_eq!(tail.recv().await.unwrap(), event);
    }
    // A failed batch is never broadcast.
    log.fail_writes(true);
    assert!(log.append(record(4)).await.is_err());
    assert!(matches!(
        tail.try_recv(),
        Err(tokio::sync::broadcast::error::TryRecvError::Empty)
    ));
}

#[tokio::test]
async fn export_jsonl_writes_proto_shaped_lines() {
    let dir = TempDir::new().unwrap();
    let log = open(&dir);
    let events = append_n(&log, 1..=6).await;
    let mut out = Vec::new();
    let filter = AuditFilter {
        tenant_id: Some("t1".into()),
        ..AuditFilter::default()
    };
    assert_eq!(
        export_jsonl(AuditStorage::Sqlite(db(&dir)), &filter, &mut out).unwrap(),
        2
    );
    let lines: Vec<serde_json::Value> = String::from_utf8(out)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    let first = &lines[0];
    let event = &events[0];
    let fields: Vec<&str> = first
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let mut want = vec![
        "sequence",
        "time",
        "identity",
        "operation",
        "tenant_id",
        "credential_id",
        "lease_id",
        "outcome",
        "code",
        "request_id",
        "prev_hash",
        "hash",
        "cert_fingerprint",
        "detail",
        "job_id",
        "recording_id",
        "destination_id",
    ];
    let mut got = fields.clone();
    got.sort_unstable();
    want.sort_unstable();
    assert_eq!(got, want);
    assert_eq!(first["sequence"], 1);
    assert_eq!(first["time"], "2023-11-14T22:13:21Z");
    assert_eq!(first["tenant_id"], "t1");
    assert_eq!(first["outcome"], "allowed");
    assert_eq!(first["code"], "OK");
    assert_eq!(first["prev_hash"], "0".repeat(64));
    assert_eq!(first["hash"], hex::encode(event.hash));
    assert_eq!(lines[1]["sequence"], 4);
    assert_eq!(lines[1]["outcome"], "denied");
    // The Serialize impl and the export agree.
    assert_eq!(serde_json::to_value(event).unwrap(), *first);
}

#[test]
fn audit_key_checks_length_and_redacts() {
    let err = AuditKey::new(SecretBytes::from_slice(&[1; 16])).unwrap_err();
    assert!(err.to_string().contains("32 bytes"), "{err}");
    let shown = format!("{:?}", key(0x41));
    assert!(
        shown.contains("REDACTED") && !shown.contains("65"),
        "{shown}"
    );
}

#[test]
fn open_names_the_path_when_it_fails() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("missing-dir").join("audit.db");
    let err = AuditLog::open(&path, key(7), GroupCommitOptions::default()).unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains("missing-dir") && message.contains("permissions"),
        "{message}"
    );
}
