//! Tamper evidence end to end: edit or delete rows of a stopped vault's
//! audit database, restart it on the same directory, and check that the
//! vault refuses to start or that VerifyChain (over mTLS, as the auditor)
//! and the offline verifier name the first broken event.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;

use common::*;
use recvault_audit::{AuditError, VerifyReport, verify_path};
use recvault_proto::vault::v1::{AuditFilter, GetCredentialRequest};
use recvault_vault::{
    keyring::MasterKey,
    server::{self, StartError},
    testing::{TestVault, prepare},
};
use tempfile::TempDir;
use tonic::Code;

/// Runs a few allowed and denied calls; returns the sequence of the first
/// denial (the event an intruder would most like to hide).
async fn some_traffic(vault: &TestVault) -> u64 {
    let id = put_s3(vault, "acme", "t", "tamper-secret")
        .await
        .credential_id;
    acquire(vault, &id).await;
    expect_code(
        credentials(vault, "stranger")
            .get_credential(GetCredentialRequest {
                credential_id: id.clone(),
            })
            .await,
        Code::PermissionDenied,
    );
    acquire(vault, &id).await;
    acquire(vault, &id).await;
    let denied = query(
        vault,
        AuditFilter {
            outcome: "denied".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(denied.len(), 1);
    denied[0].sequence
}

fn edit(db: &Path, sql: &str) {
    let conn = rusqlite::Connection::open(db).unwrap();
    let changed = conn.execute(sql, []).unwrap();
    assert_eq!(changed, 1, "{sql}");
}

fn last_sequence(db: &Path) -> u64 {
    let last: i64 = rusqlite::Connection::open(db)
        .unwrap()
        .query_row("SELECT MAX(sequence) FROM audit_events", [], |r| r.get(0))
        .unwrap();
    u64::try_from(last).unwrap()
}

fn offline_verify(dir: &TempDir) -> VerifyReport {
    let config = prepare(dir.path());
    let key = server::audit_key(&MasterKey::load(&config.master_key_file).unwrap()).unwrap();
    verify_path(&config.audit_database, &key).unwrap()
}

fn assert_broken_at(report: &VerifyReport, sequence: u64) {
    assert!(!report.ok, "{report:?}");
    assert_eq!(report.first_broken_sequence, sequence, "{report:?}");
    assert_eq!(report.events_checked, sequence - 1, "{report:?}");
    assert!(!report.reason.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edited_event_is_named_by_verify_chain_and_offline_verify() {
    let (dir, vault) = start().await;
    let hidden = some_traffic(&vault).await;
    assert!(verify_chain(&vault).await.ok);
    assert!(offline_verify(&dir).ok);
    let db = vault.config.audit_database.clone();
    vault.stop().await;

    // Turn the denial into an innocent-looking success.
    edit(
        &db,
        &format!(
            "UPDATE audit_events SET outcome = 'allowed', code = 'OK' WHERE sequence = {hidden}"
        ),
    );
    assert_broken_at(&offline_verify(&dir), hidden);

    // The last event is intact, so the vault starts; VerifyChain names the edit.
    let vault = TestVault::start(dir.path()).await;
    let report = verify_chain(&vault).await;
    assert!(!report.ok, "{report:?}");
    assert_eq!(report.first_broken_sequence, hidden, "{report:?}");
    assert_eq!(report.events_checked, hidden - 1, "{report:?}");
    assert!(!report.reason.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_event_is_detected() {
    let (dir, vault) = start().await;
    let hidden = some_traffic(&vault).await;
    let db = vault.config.audit_database.clone();
    vault.stop().await;

    edit(
        &db,
        &format!("DELETE FROM audit_events WHERE sequence = {hidden}"),
    );
    assert_broken_at(&offline_verify(&dir), hidden);
    let vault = TestVault::start(dir.path()).await;
    let report = verify_chain(&vault).await;
    assert!(!report.ok, "{report:?}");
    assert_eq!(report.first_broken_sequence, hidden, "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edited_last_event_stops_the_vault_from_starting() {
    let (dir, vault) = start().await;
    some_traffic(&vault).await;
    let db = vault.config.audit_database.clone();
    vault.stop().await;

    edit(
        &db,
        "UPDATE audit_events SET identity = 'spiffe://recvault.local/nobody' \
         WHERE sequence = (SELECT MAX(sequence) FROM audit_events)",
    );
    let last = last_sequence(&db);
    assert_broken_at(&offline_verify(&dir), last);
    match server::bind(prepare(dir.path())).await {
        Err(StartError::Audit(AuditError::Tampered { sequence, .. })) => {
            assert_eq!(sequence, last)
        }
        other => panic!("the vault must refuse to start on a tampered head: {other:?}"),
    }
}

/// A log cut short at the end is still a valid chain; the anchor file beside
/// it (the head the vault committed, MAC'd under the audit key) is what shows
/// the missing events, offline and at the next start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_tail_is_detected_offline_and_at_start() {
    let (dir, vault) = start().await;
    some_traffic(&vault).await;
    let db = vault.config.audit_database.clone();
    vault.stop().await;
    let last = last_sequence(&db);
    assert!(offline_verify(&dir).ok);

    // Drop the last two events: what remains verifies as a chain.
    let conn = rusqlite::Connection::open(&db).unwrap();
    let removed = conn
        .execute(
            &format!("DELETE FROM audit_events WHERE sequence > {}", last - 2),
            [],
        )
        .unwrap();
    assert_eq!(removed, 2);
    drop(conn);
    let report = offline_verify(&dir);
    assert_broken_at(&report, last - 1);
    assert!(report.reason.contains("missing"), "{report:?}");
    match server::bind(prepare(dir.path())).await {
        Err(StartError::Audit(AuditError::Tampered { sequence, reason })) => {
            assert_eq!(sequence, last - 1, "{reason}");
            assert!(reason.contains("missing"), "{reason}");
        }
        other => panic!("the vault must refuse to start on a truncated log: {other:?}"),
    }

    // A forged anchor (say, rewritten to name the shorter head) does not
    // authenticate without the audit key.
    let anchor = db.with_file_name(format!(
        "{}.anchor",
        db.file_name().unwrap().to_str().unwrap()
    ));
    let text = std::fs::read_to_string(&anchor).unwrap();
    std::fs::write(
        &anchor,
        text.replace(
            &format!("sequence={last}"),
            &format!("sequence={}", last - 2),
        ),
    )
    .unwrap();
    let report = offline_verify(&dir);
    assert!(!report.ok, "{report:?}");
    assert!(report.reason.contains("anchor"), "{report:?}");
    assert!(matches!(
        server::bind(prepare(dir.path())).await,
        Err(StartError::Audit(AuditError::Tampered { .. }))
    ));
}
