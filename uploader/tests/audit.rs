//! The uploader's own audit log over real mTLS: the auditor queries, follows
//! and verifies it; anyone else is refused and the refusal is itself in the
//! log; a write that cannot be made durable fails the call UNAVAILABLE; an
//! event edited in the SQLite file is found by VerifyChain (online) and by
//! the real `uploaderd audit verify` (offline, exit 1, naming the sequence);
//! `uploaderd audit export` writes the events as JSON lines.
#![allow(clippy::unwrap_used)]

#[path = "support/audit.rs"]
mod audit_support;
#[path = "support/keys.rs"]
mod keys;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use recvault_proto::uploader::v1::audit_client::AuditClient;
use recvault_proto::vault::v1 as pb;
use recvault_runtime::{devcerts, tls};
use recvault_uploader::config::UploaderConfig;
use recvault_uploader::service::Shared;
use tonic::transport::Channel;
use tonic::{Code, Request};

const QUERY: &str = "recvault.uploader.v1.Audit/QueryEvents";
const TAIL: &str = "recvault.uploader.v1.Audit/TailEvents";
const VERIFY: &str = "recvault.uploader.v1.Audit/VerifyChain";

/// uploaderd's gRPC server on a free port, its config file and the dev
/// certificates of an auditor and a manager (who holds no auditor role).
struct Uploader {
    dir: tempfile::TempDir,
    certs: PathBuf,
    config: PathBuf,
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
}

impl Uploader {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let certs = dir.path().join("certs");
        devcerts::generate(&certs, &["uploader", "auditor", "manager"]).unwrap();
        let cert = |n: &str| certs.join(n).display().to_string();
        let config = dir.path().join("uploader.toml");
        // The dev policy: manager and auditor of every tenant; the manager
        // holds no auditor role.
        let policy = dir.path().join("policy.toml");
        std::fs::write(&policy, recvault_runtime::policy::dev_uploader_toml()).unwrap();
        let wrap = dir.path().join("backup-wrap.pub");
        keys::TestWrapping::generate().write_file(&wrap);
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:0\"\n\
                 metrics_listen = \"127.0.0.1:0\"\n\
                 database = \"{db}\"\n\
                 backup_dir = \"{backups}\"\n\
                 policy_file = \"{policy}\"\n\
                 {audit}\n\
                 [tls]\ncert = \"{crt}\"\nkey = \"{key}\"\nca = \"{ca}\"\n\n\
                 [vault]\nendpoint = \"127.0.0.1:9\"\n\n\
                 [vault.tls]\ncert = \"{crt}\"\nkey = \"{key}\"\nca = \"{ca}\"\n\n\
                 [backup]\nwrapping_key_file = \"{wrap}\"\n\n\
                 [delivery]\nscrub_interval_secs = 0\n",
                db = dir.path().join("uploader.db").display(),
                backups = dir.path().join("backups").display(),
                audit = audit_support::audit_settings(dir.path()),
                crt = cert("uploader.crt"),
                key = cert("uploader.key"),
                ca = cert("ca.crt"),
                policy = policy.display(),
                wrap = wrap.display(),
            ),
        )
        .unwrap();
        let bound = recvault_uploader::server::bind(UploaderConfig::load(&config).unwrap())
            .await
            .unwrap();
        let addr = bound.local_addr;
        let shared = bound.shared.clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            bound
                .serve(async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        Self {
            dir,
            certs,
            config,
            addr,
            shared,
            stop: Some(stop),
            server: Some(server),
        }
    }

    fn client(&self, identity: &str) -> AuditClient<Channel> {
        AuditClient::new(
            tls::channel(
                &self.addr.to_string(),
                "localhost",
                &devcerts::files(&self.certs, identity),
            )
            .unwrap(),
        )
    }

    fn audit_db(&self) -> PathBuf {
        self.dir.path().join("audit.db")
    }

    async fn query(&self, filter: pb::AuditFilter) -> Vec<pb::AuditEvent> {
        let mut stream = self
            .client("auditor")
            .query_events(pb::QueryEventsRequest {
                filter: Some(filter),
                after_sequence: 0,
                limit: 0,
            })
            .await
            .unwrap()
            .into_inner();
        let mut events = Vec::new();
        while let Some(event) = stream.message().await.unwrap() {
            events.push(event);
        }
        events
    }

    async fn verify(&self) -> pb::VerifyChainResponse {
        self.client("auditor")
            .verify_chain(pb::VerifyChainRequest {})
            .await
            .unwrap()
            .into_inner()
    }

    /// The real `uploaderd audit …` on this uploader's config.
    fn uploaderd_audit(&self, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_uploaderd"))
            .arg("audit")
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .output()
            .unwrap()
    }
}

impl Drop for Uploader {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }
}

fn with_request_id<T>(message: T, id: &str) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("x-request-id", id.parse().unwrap());
    request
}

fn by_operation(operation: &str) -> pb::AuditFilter {
    pb::AuditFilter {
        operation: operation.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn the_auditor_queries_follows_and_verifies_the_uploaders_log() {
    let up = Uploader::start().await;

    // A fresh log: the check itself is the first event, written before the answer.
    let first = up.verify().await;
    assert!(first.ok, "{first:?}");
    assert_eq!(
        first.events_checked, 0,
        "the check ran before its own event"
    );
    let second = up.verify().await;
    assert!(second.ok && second.events_checked == 1, "{second:?}");

    // Follow from the newest on, then make calls: each arrives as it becomes durable.
    let mut tail = up
        .client("auditor")
        .tail_events(pb::TailEventsRequest {
            filter: Some(by_operation(VERIFY)),
            after_sequence: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut client = up.client("auditor");
    for i in 0..3 {
        client
            .verify_chain(with_request_id(
                pb::VerifyChainRequest {},
                &format!("tail-{i}"),
            ))
            .await
            .unwrap();
        let event = tokio::time::timeout(Duration::from_secs(10), tail.message())
            .await
            .expect("the tail delivers within 10 s")
            .unwrap()
            .expect("an event");
        assert_eq!(event.operation, VERIFY);
        assert_eq!(event.request_id, format!("tail-{i}"));
        assert_eq!(event.identity, devcerts::spiffe_id("auditor"));
        assert_eq!(event.outcome, "allowed");
        assert_eq!(event.code, "OK");
        assert_eq!(event.cert_fingerprint.len(), 64, "{event:?}");
        assert!(event.detail.starts_with("ok=true"), "{event:?}");
    }
    drop(tail);

    // Everything is queryable, in order, with a linked chain.
    let all = up.query(pb::AuditFilter::default()).await;
    assert!(all.len() >= 6, "{all:?}");
    for (i, pair) in all.windows(2).enumerate() {
        assert_eq!(pair[1].sequence, pair[0].sequence + 1, "at {i}");
        assert_eq!(pair[1].prev_hash, pair[0].hash, "at {i}");
    }
    let tails = up.query(by_operation(TAIL)).await;
    assert_eq!(tails.len(), 1, "{tails:?}");
    assert_eq!(tails[0].outcome, "allowed");
    // The query just made is in the log too (its event precedes its stream).
    let queries = up.query(by_operation(QUERY)).await;
    assert_eq!(queries.len(), 3, "{queries:?}");

    // Paging and limits work as on the vault.
    let page = up
        .client("auditor")
        .query_events(pb::QueryEventsRequest {
            filter: None,
            after_sequence: 2,
            limit: 2,
        })
        .await
        .unwrap()
        .into_inner();
    let mut page = page;
    let mut got = Vec::new();
    while let Some(e) = page.message().await.unwrap() {
        got.push(e.sequence);
    }
    assert_eq!(got, vec![3, 4]);
    assert!(up.verify().await.ok);
}

#[tokio::test]
async fn a_non_auditor_is_denied_and_the_denial_is_in_the_log() {
    let up = Uploader::start().await;
    let mut manager = up.client("manager");
    let status = manager
        .query_events(with_request_id(
            pb::QueryEventsRequest::default(),
            "denied-query",
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("policy_file"), "{status:?}");
    let status = manager
        .verify_chain(with_request_id(pb::VerifyChainRequest {}, "denied-verify"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let status = manager
        .tail_events(pb::TailEventsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);

    // A bad filter from the auditor is refused by name and recorded as an error.
    let status = up
        .client("auditor")
        .query_events(pb::QueryEventsRequest {
            filter: Some(pb::AuditFilter {
                outcome: "maybe".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("filter.outcome"), "{status:?}");

    let denied = up
        .query(pb::AuditFilter {
            outcome: "denied".into(),
            ..Default::default()
        })
        .await;
    let ops: Vec<(&str, &str)> = denied
        .iter()
        .map(|e| (e.operation.as_str(), e.request_id.as_str()))
        .collect();
    assert_eq!(ops.len(), 3, "{denied:?}");
    assert_eq!(ops[0], (QUERY, "denied-query"));
    assert_eq!(ops[1], (VERIFY, "denied-verify"));
    assert_eq!(ops[2].0, TAIL);
    for e in &denied {
        assert_eq!(e.identity, devcerts::spiffe_id("manager"));
        assert_eq!(e.code, "PERMISSION_DENIED");
        assert_eq!(e.cert_fingerprint.len(), 64);
    }
    let errors = up
        .query(pb::AuditFilter {
            outcome: "error".into(),
            ..Default::default()
        })
        .await;
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].code, "INVALID_ARGUMENT");
    assert_eq!(errors[0].identity, devcerts::spiffe_id("auditor"));
}

#[tokio::test]
async fn a_call_whose_event_cannot_be_stored_fails_unavailable() {
    let up = Uploader::start().await;
    assert!(up.verify().await.ok);
    let head = up.shared.audit.head().0;
    up.shared.audit.fail_writes(true);
    let mut auditor = up.client("auditor");
    let status = auditor
        .verify_chain(pb::VerifyChainRequest {})
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let status = auditor
        .query_events(pb::QueryEventsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        Code::Unavailable,
        "no events stream out unaudited"
    );
    // A denial that cannot be recorded is not answered as a denial either.
    let status = up
        .client("manager")
        .verify_chain(pb::VerifyChainRequest {})
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(up.shared.audit.head().0, head, "nothing was recorded");
    assert_eq!(up.shared.metrics.audit_failures.get(), 3);
    up.shared.audit.fail_writes(false);
    assert!(up.verify().await.ok);
}

fn edit(db: &Path, sql: &str) {
    let changed = rusqlite::Connection::open(db)
        .unwrap()
        .execute(sql, [])
        .unwrap();
    assert_eq!(changed, 1, "{sql}");
}

#[tokio::test]
async fn an_edited_event_is_found_online_and_by_uploaderd_audit_verify() {
    let up = Uploader::start().await;
    for _ in 0..3 {
        assert!(up.verify().await.ok);
    }
    let _ = up
        .client("manager")
        .verify_chain(pb::VerifyChainRequest {})
        .await
        .unwrap_err();
    assert!(up.verify().await.ok);

    let out = up.uploaderd_audit(&["verify"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        stdout.contains("audit chain intact: 5 events checked"),
        "{stdout}"
    );

    // An intruder turns the manager's denial (event 4) into an allowed call.
    let denied: i64 = rusqlite::Connection::open(up.audit_db())
        .unwrap()
        .query_row(
            "SELECT sequence FROM audit_events WHERE outcome = 'denied'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(denied, 4);
    edit(
        &up.audit_db(),
        "UPDATE audit_events SET outcome = 'allowed', code = 'OK' WHERE sequence = 4",
    );

    let online = up.verify().await;
    assert!(!online.ok, "{online:?}");
    assert_eq!(online.first_broken_sequence, 4, "{online:?}");
    assert_eq!(online.events_checked, 3);
    assert!(online.reason.contains("hash does not match"), "{online:?}");

    let out = up.uploaderd_audit(&["verify"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        stdout.contains("audit chain BROKEN at sequence 4 (3 events checked)"),
        "{stdout}"
    );
}

#[tokio::test]
async fn uploaderd_audit_export_writes_json_lines_with_the_recording_fields() {
    let up = Uploader::start().await;
    assert!(up.verify().await.ok);
    // What the Jobs handlers will record once they are wired to the log.
    up.shared
        .audit
        .append(recvault_audit::AuditRecord {
            identity: devcerts::spiffe_id("manager"),
            tenant_id: "acme".into(),
            job_id: "job-1".into(),
            recording_id: "rec-1".into(),
            destination_id: "dst-1".into(),
            ..recvault_audit::AuditRecord::now(
                "recvault.uploader.v1.Jobs/FetchBackup",
                recvault_audit::Outcome::Allowed,
                "OK",
            )
        })
        .await
        .unwrap();

    let out = up.uploaderd_audit(&["export", "--tenant", "acme"]);
    assert!(out.status.success(), "{out:?}");
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["sequence"], 2);
    assert_eq!(lines[0]["job_id"], "job-1");
    assert_eq!(lines[0]["recording_id"], "rec-1");
    assert_eq!(lines[0]["destination_id"], "dst-1");

    let out = up.uploaderd_audit(&["export"]);
    assert_eq!(String::from_utf8(out.stdout).unwrap().lines().count(), 2);
    let out = up.uploaderd_audit(&["export", "--job", "job-2"]);
    assert!(out.status.success() && out.stdout.is_empty(), "{out:?}");
    let out = up.uploaderd_audit(&["verify"]);
    assert!(out.status.success(), "{out:?}");
}
