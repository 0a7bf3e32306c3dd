//! The audit log conformance suite: both backends of `recvault_audit`
//! (the embedded SQLite file and the PostgreSQL log several replicas
//! share) pass the same tests, instantiated per backend by
//! `audit_conformance_suite!`. Durability before the answer, gapless
//! chaining, a named edited event, a detected cut tail, failing closed, the
//! live tail, and (where a backend has several writers) two replicas
//! appending to one chain.

#![allow(clippy::unwrap_used)]

use std::{path::PathBuf, sync::Arc};

use recvault_audit::{
    AuditError, AuditFilter, AuditKey, AuditLog, AuditRecord, AuditStorage, GroupCommitOptions,
    Outcome, PgTarget, export_jsonl, verify_storage,
};
use recvault_runtime::secret::SecretBytes;

/// A log location a test can open again (as a restart, or another replica,
/// does) and damage with SQL.
trait Backend {
    fn storage(&self) -> AuditStorage;
    /// Runs SQL against the log's tables, as an attacker with database
    /// access would.
    fn execute(&self, sql: &str);
    /// Whether several processes append to one log.
    fn multi_writer(&self) -> bool;
}

struct Sqlite(tempfile::TempDir);

impl Sqlite {
    fn path(&self) -> PathBuf {
        self.0.path().join("audit.db")
    }
}

impl Backend for Sqlite {
    fn storage(&self) -> AuditStorage {
        AuditStorage::Sqlite(self.path())
    }

    fn execute(&self, sql: &str) {
        rusqlite::Connection::open(self.path())
            .unwrap()
            .execute_batch(sql)
            .unwrap();
    }

    fn multi_writer(&self) -> bool {
        false
    }
}

fn sqlite() -> Option<Sqlite> {
    Some(Sqlite(tempfile::tempdir().unwrap()))
}

/// A fresh database on the test process's PostgreSQL server, reached
/// through a `database_url_file` as vaultd reaches it.
struct Postgres {
    db: recvault_tests::postgres::Database,
    url_file: PathBuf,
    _dir: tempfile::TempDir,
}

impl Backend for Postgres {
    fn storage(&self) -> AuditStorage {
        AuditStorage::Postgres(Box::new(
            PgTarget::from_url_file(&self.url_file, "audit-conformance").unwrap(),
        ))
    }

    fn execute(&self, sql: &str) {
        recvault_tests::postgres::Postgres::shared()
            .unwrap()
            .psql(&self.db, sql);
    }

    fn multi_writer(&self) -> bool {
        true
    }
}

fn postgres() -> Option<Postgres> {
    let db = recvault_tests::postgres::Postgres::shared()?.database();
    let dir = tempfile::tempdir().unwrap();
    let url_file = db.url_file(dir.path());
    Some(Postgres {
        db,
        url_file,
        _dir: dir,
    })
}

fn key() -> AuditKey {
    AuditKey::new(SecretBytes::from_slice(&[0x5a; 32])).unwrap()
}

/// Opening, offline verification and export block (as in a service, which
/// opens before serving): off the async workers.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

fn open(backend: &dyn Backend, instance: &str) -> AuditLog {
    blocking(|| {
        AuditLog::open_in(
            backend.storage(),
            instance,
            key(),
            GroupCommitOptions::default(),
        )
        .unwrap()
    })
}

fn record(i: u32) -> AuditRecord {
    AuditRecord {
        tenant_id: format!("tenant-{}", i % 3),
        credential_id: format!("cred-{i}"),
        request_id: format!("req-{i}"),
        detail: format!("call {i}"),
        ..AuditRecord::now(
            "recvault.vault.v1.Leases/AcquireLease",
            Outcome::Allowed,
            "OK",
        )
    }
}

async fn append(log: &AuditLog, range: std::ops::Range<u32>) {
    for i in range {
        log.append(record(i)).await.unwrap();
    }
}

async fn durable_gapless_and_queryable(backend: &dyn Backend) {
    let log = open(backend, "vault-a");
    append(&log, 0..30).await;
    let all = log.query(&AuditFilter::default(), 0, 1000).await.unwrap();
    let sequences: Vec<u64> = all.iter().map(|e| e.sequence).collect();
    assert_eq!(sequences, (1..=30).collect::<Vec<_>>());
    for pair in all.windows(2) {
        assert_eq!(pair[1].prev_hash, pair[0].hash, "linked");
        assert!(pair[0].record.time <= pair[1].record.time, "in time order");
    }
    // Filter and page as QueryEvents does.
    let tenant = AuditFilter {
        tenant_id: Some("tenant-1".into()),
        ..AuditFilter::default()
    };
    let page = log.query(&tenant, 0, 4).await.unwrap();
    assert_eq!(page.len(), 4);
    assert!(page.iter().all(|e| e.record.tenant_id == "tenant-1"));
    let rest = log.query(&tenant, page[3].sequence, 100).await.unwrap();
    assert_eq!(page.len() + rest.len(), 10);
    let head = log.head();
    assert_eq!(head.0, 30);
    drop(log);

    // A restart chains on where it stopped, and export sees everything.
    let log = open(backend, "vault-a");
    assert_eq!(log.head(), head);
    append(&log, 30..31).await;
    assert_eq!(log.head().0, 31);
    let mut out = Vec::new();
    assert_eq!(
        blocking(|| export_jsonl(backend.storage(), &AuditFilter::default(), &mut out)).unwrap(),
        31
    );
    assert!(
        String::from_utf8(out)
            .unwrap()
            .contains("\"detail\":\"call 30\"")
    );
    assert!(log.verify().await.ok);
}

async fn an_edited_event_is_named(backend: &dyn Backend) {
    let log = open(backend, "vault-a");
    append(&log, 0..12).await;
    assert!(log.verify().await.ok);
    backend.execute("UPDATE audit_events SET outcome = 'denied' WHERE sequence = 5");
    let online = log.verify().await;
    assert!(!online.ok);
    assert_eq!(online.first_broken_sequence, 5, "{online:?}");
    drop(log);
    let offline = blocking(|| verify_storage(backend.storage(), &key())).unwrap();
    assert_eq!(offline.first_broken_sequence, 5, "{offline:?}");
    assert_eq!(offline.events_checked, 4);
}

async fn a_cut_tail_is_detected(backend: &dyn Backend) {
    let log = open(backend, "vault-a");
    append(&log, 0..12).await;
    drop(log);
    backend.execute("DELETE FROM audit_events WHERE sequence > 9");
    // The remaining prefix is a valid chain; the anchor still names 12.
    let offline = blocking(|| verify_storage(backend.storage(), &key())).unwrap();
    assert!(!offline.ok, "{offline:?}");
    assert_eq!(offline.first_broken_sequence, 10, "{offline:?}");
    assert!(offline.reason.contains("missing"), "{offline:?}");
    // And no writer extends it.
    let refused = blocking(|| {
        AuditLog::open_in(
            backend.storage(),
            "vault-a",
            key(),
            GroupCommitOptions::default(),
        )
    })
    .unwrap_err();
    assert!(
        matches!(refused, AuditError::Tampered { sequence: 10, .. }),
        "{refused}"
    );
}

async fn a_failed_commit_stores_nothing(backend: &dyn Backend) {
    let log = open(backend, "vault-a");
    append(&log, 0..3).await;
    log.fail_writes(true);
    let err = log.append(record(99)).await.unwrap_err();
    assert!(matches!(err, AuditError::Unavailable { .. }), "{err}");
    log.fail_writes(false);
    append(&log, 3..4).await;
    let all = log.query(&AuditFilter::default(), 0, 100).await.unwrap();
    assert_eq!(all.len(), 4, "the failed event was not stored");
    assert!(all.iter().all(|e| e.record.detail != "call 99"));
    assert!(log.verify().await.ok);
}

async fn the_tail_sees_committed_events_in_order(backend: &dyn Backend) {
    let log = Arc::new(open(backend, "vault-a"));
    let mut live = log.subscribe();
    append(&log, 0..5).await;
    for expected in 1..=5 {
        let event = tokio::time::timeout(std::time::Duration::from_secs(10), live.recv())
            .await
            .expect("a committed event reaches the tail")
            .unwrap();
        assert_eq!(event.sequence, expected);
    }
}

/// Two replicas on one log: one gapless chain, every event once, each named
/// by the replica that wrote it, and each replica's tail sees the other's.
async fn two_writers_share_one_chain(backend: &dyn Backend) {
    if !backend.multi_writer() {
        return;
    }
    let a = Arc::new(open(backend, "vault-a"));
    let b = Arc::new(open(backend, "vault-b"));
    let mut a_live = a.subscribe();
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..400u32 {
        let log = if i.is_multiple_of(2) {
            a.clone()
        } else {
            b.clone()
        };
        calls.spawn(async move { log.append(record(i)).await.unwrap() });
    }
    while let Some(done) = calls.join_next().await {
        done.unwrap();
    }
    let all = a.query(&AuditFilter::default(), 0, 10_000).await.unwrap();
    assert_eq!(
        all.iter().map(|e| e.sequence).collect::<Vec<_>>(),
        (1..=400).collect::<Vec<_>>()
    );
    for pair in all.windows(2) {
        assert!(
            pair[0].record.time <= pair[1].record.time,
            "events {} and {} are out of time order",
            pair[0].sequence,
            pair[1].sequence
        );
    }
    let mut details: Vec<_> = all.iter().map(|e| e.record.detail.clone()).collect();
    details.sort();
    details.dedup();
    assert_eq!(details.len(), 400, "every event exactly once");
    for e in &all {
        let i: u32 = e.record.detail["call ".len()..].parse().unwrap();
        let want = if i.is_multiple_of(2) {
            "vault-a"
        } else {
            "vault-b"
        };
        assert_eq!(e.instance_id, want, "event {}", e.sequence);
    }
    for log in [&a, &b] {
        let report = log.verify().await;
        assert!(report.ok && report.events_checked == 400, "{report:?}");
    }
    // A's tail carries B's events too, in sequence order.
    let mut next = 1;
    while next <= 400 {
        let event = tokio::time::timeout(std::time::Duration::from_secs(10), a_live.recv())
            .await
            .expect("every replica's events reach the tail")
            .unwrap();
        assert_eq!(event.sequence, next);
        next += 1;
    }
    // The replica name is hashed: rewriting it breaks the chain there.
    let by_b = all
        .iter()
        .find(|e| e.instance_id == "vault-b")
        .unwrap()
        .sequence;
    backend.execute(&format!(
        "UPDATE audit_events SET instance_id = 'vault-a' WHERE sequence = {by_b}"
    ));
    let report = a.verify().await;
    assert_eq!(report.first_broken_sequence, by_b, "{report:?}");
}

macro_rules! audit_conformance_suite {
    ($backend:ident: $($test:ident),* $(,)?) => {
        mod $backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    let Some(backend) = super::$backend() else {
                        return;
                    };
                    super::$test(&backend).await;
                }
            )*
        }
    };
}

macro_rules! for_each_backend {
    ($($test:ident),* $(,)?) => {
        audit_conformance_suite!(sqlite: $($test),*);
        audit_conformance_suite!(postgres: $($test),*);
    };
}

for_each_backend!(
    durable_gapless_and_queryable,
    an_edited_event_is_named,
    a_cut_tail_is_detected,
    a_failed_commit_stores_nothing,
    the_tail_sees_committed_events_in_order,
    two_writers_share_one_chain,
);
