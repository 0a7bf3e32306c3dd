//! Two real `vaultd` replicas on one real PostgreSQL database behave as one
//! vault: a lease from A is released on B, a credential re-put or deleted
//! through A is leased (or refused) by B from then on, a key rotated or
//! retired and a tenant limit set on A apply on B, and both append to one
//! audit chain that `VerifyChain` checks whole on either.

#![allow(clippy::unwrap_used)]

use std::{path::Path, process::Command, time::Duration};

use recvault_proto::vault::v1::{
    self as va, audit_client::AuditClient, credentials_client::CredentialsClient,
    keys_client::KeysClient, leases_client::LeasesClient,
};
use recvault_runtime::{
    hpke::{self, OneCallKey},
    secret::SecretBytes,
};
use recvault_tests::{
    Daemon, binary,
    client::{self, Endpoints},
    postgres::Postgres,
    served_addr,
};
use tonic::Code;

/// `vaultd init` into `root/vault`, then two configs on the database whose
/// URL is in `root/database.url`: `a.toml` and `b.toml` (instances
/// `vault-a` and `vault-b`; the audit log lives in the same database).
fn init(root: &Path, url: &str) {
    use std::os::unix::fs::PermissionsExt as _;
    recvault_tests::vaultd_init(root, &[]);
    let url_file = root.join("database.url");
    std::fs::write(&url_file, url).unwrap();
    std::fs::set_permissions(&url_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let generated = std::fs::read_to_string(root.join("vault/vault.toml")).unwrap();
    for replica in ["a", "b"] {
        let config: String = generated
            .lines()
            .map(|line| {
                if line.starts_with("database = ") {
                    format!(
                        "database_url_file = \"{}\"\ninstance_id = \"vault-{replica}\"",
                        url_file.display()
                    )
                } else {
                    line.to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        std::fs::write(root.join(format!("vault/{replica}.toml")), config).unwrap();
    }
}

fn serve(root: &Path, replica: &str) -> (Daemon, String) {
    let mut cmd = Command::new(binary("vaultd"));
    cmd.args(["serve", "--config"])
        .arg(root.join(format!("vault/{replica}.toml")));
    let mut daemon = Daemon::spawn(cmd);
    let line = daemon.wait_for("vault serving", Duration::from_secs(30));
    assert!(line.contains(&format!("vault-{replica}")), "{line}");
    assert!(line.contains("postgresql"), "{line}");
    (daemon, served_addr(&line))
}

struct Replica {
    ep: Endpoints,
}

impl Replica {
    fn channel(&self, identity: &str) -> tonic::transport::Channel {
        self.ep.channel(&self.ep.vault, identity).unwrap()
    }

    async fn put(&self, name: &str, secret: &str) -> Result<String, String> {
        client::put_credential(
            self.channel("manager"),
            "acme",
            name,
            va::CredentialKind::S3,
            SecretBytes::from_slice(secret.as_bytes()),
            None,
        )
        .await
        .map(|r| r.credential_id)
    }

    /// Acquires a lease as the uploader: (lease id, the secret opened).
    async fn lease(&self, credential_id: &str) -> Result<(String, Vec<u8>), tonic::Status> {
        let key = OneCallKey::generate().unwrap();
        let reply = LeasesClient::new(self.channel("uploader"))
            .acquire_lease(va::AcquireLeaseRequest {
                credential_id: credential_id.to_owned(),
                purpose: "replica test".into(),
                ttl_seconds: 60,
                recipient_public_key: key.public_key().to_vec(),
            })
            .await?
            .into_inner();
        let secret = key
            .open(
                hpke::LEASE_INFO,
                &hpke::aad(&[&reply.lease_id, credential_id]),
                &reply.enc,
                &reply.sealed_secret,
            )
            .unwrap();
        Ok((reply.lease_id, secret.expose_secret().to_vec()))
    }

    async fn release(&self, lease_id: &str) -> Result<(), tonic::Status> {
        LeasesClient::new(self.channel("uploader"))
            .release_lease(va::ReleaseLeaseRequest {
                lease_id: lease_id.to_owned(),
            })
            .await
            .map(|_| ())
    }

    fn keys(&self) -> KeysClient<tonic::transport::Channel> {
        KeysClient::new(self.channel("admin"))
    }

    fn audit(&self) -> AuditClient<tonic::transport::Channel> {
        AuditClient::new(self.channel("auditor"))
    }

    async fn verify_chain(&self) -> va::VerifyChainResponse {
        self.audit()
            .verify_chain(va::VerifyChainRequest {})
            .await
            .unwrap()
            .into_inner()
    }

    /// Every stored event, through QueryEvents.
    async fn events(&self) -> Vec<va::AuditEvent> {
        let mut stream = self
            .audit()
            .query_events(va::QueryEventsRequest::default())
            .await
            .unwrap()
            .into_inner();
        let mut events = Vec::new();
        while let Some(event) = stream.message().await.unwrap() {
            events.push(event);
        }
        events
    }
}

/// Both replicas on `root`'s database, serving.
fn two_replicas(root: &Path) -> ((Daemon, Daemon), Replica, Replica) {
    let (a_daemon, a_addr) = serve(root, "a");
    let (b_daemon, b_addr) = serve(root, "b");
    let replica = |addr: String| Replica {
        ep: Endpoints {
            vault: addr,
            uploader: String::new(),
            certs: root.join("certs"),
        },
    };
    ((a_daemon, b_daemon), replica(a_addr), replica(b_addr))
}

fn secret(n: u32) -> String {
    format!(r#"{{"access_key_id":"AKIA{n:04}","secret_access_key":"replica-secret-{n:020}"}}"#)
}

#[test]
fn two_vaults_on_one_database_behave_as_one() {
    let Some(pg) = Postgres::shared() else { return };
    let db = pg.database();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    init(root, &db.url());
    let (_daemons, a, b) = two_replicas(root);

    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        // Put on A, lease on B, release on A; released is released on both.
        let id = a.put("archive", &secret(1)).await.unwrap();
        let (lease, got) = b.lease(&id).await.unwrap();
        assert_eq!(got, secret(1).as_bytes());
        a.release(&lease).await.unwrap();
        for r in [&a, &b] {
            assert_eq!(r.release(&lease).await.unwrap_err().code(), Code::NotFound);
        }

        // Re-put through A: B leases the new version at once.
        assert_eq!(a.put("archive", &secret(2)).await.unwrap(), id);
        let (lease, got) = b.lease(&id).await.unwrap();
        assert_eq!(got, secret(2).as_bytes(), "B served a stale secret");
        b.release(&lease).await.unwrap();

        // A key rotated on A seals B's next put; B reports it.
        let rotated = a
            .keys()
            .rotate_key(va::RotateKeyRequest {})
            .await
            .unwrap()
            .into_inner()
            .key_version;
        assert_eq!(rotated, 2);
        let on_b = b.put("backup", &secret(3)).await.unwrap();
        let status = a
            .keys()
            .key_status(va::KeyStatusRequest {})
            .await
            .unwrap()
            .into_inner();
        let under = |v: u32| {
            status
                .versions
                .iter()
                .find(|s| s.version == v)
                .map_or(0, |s| s.credentials)
        };
        assert_eq!((under(1), under(2)), (1, 1), "{status:?}");
        assert_eq!(a.lease(&on_b).await.unwrap().1, secret(3).as_bytes());

        // Rewrap and retire on A: B refuses nothing it should serve and
        // reports the new floor.
        a.keys().rewrap(va::RewrapRequest::default()).await.unwrap();
        a.keys()
            .retire_keys(va::RetireKeysRequest {
                min_decrypt_version: 2,
            })
            .await
            .unwrap();
        let b_status = b
            .keys()
            .key_status(va::KeyStatusRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (b_status.current_version, b_status.min_decrypt_version),
            (2, 2),
            "{b_status:?}"
        );
        assert_eq!(b.lease(&id).await.unwrap().1, secret(2).as_bytes());

        // A tenant limit set on A holds on B.
        a.keys()
            .set_tenant_limit(va::SetTenantLimitRequest {
                tenant_id: "acme".into(),
                max_secret_chars: 20,
            })
            .await
            .unwrap();
        let refused = b.put("too-long", &secret(4)).await.unwrap_err();
        assert!(refused.contains("20"), "{refused}");

        // Deleted through A: B refuses it from then on.
        CredentialsClient::new(a.channel("manager"))
            .delete_credential(va::DeleteCredentialRequest {
                credential_id: id.clone(),
            })
            .await
            .unwrap();
        assert_eq!(b.lease(&id).await.unwrap_err().code(), Code::NotFound);
    });
}

/// 1,000 audited calls spread over both replicas, many at once: one chain
/// that VerifyChain checks whole on either replica, every call's event there
/// exactly once, named by the replica that served it, in time order; an
/// event edited in the database is named by VerifyChain on both.
#[test]
fn a_thousand_calls_over_two_replicas_form_one_verified_audit_chain() {
    let Some(pg) = Postgres::shared() else { return };
    let db = pg.database();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    init(root, &db.url());
    let (_daemons, a, b) = two_replicas(root);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let id = a.put("archive", &secret(1)).await.unwrap();
        let before = a.events().await.len();
        let replicas = std::sync::Arc::new([a, b]);
        // 500 leases, each acquired on one replica and released on the
        // other: 1,000 audited calls, 32 in flight.
        let mut calls = tokio::task::JoinSet::new();
        let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(32));
        for i in 0..500usize {
            let (replicas, gate, id) = (replicas.clone(), gate.clone(), id.clone());
            calls.spawn(async move {
                let _permit = gate.acquire().await.unwrap();
                let (lease, _) = replicas[i % 2].lease(&id).await.unwrap();
                replicas[(i + 1) % 2].release(&lease).await.unwrap();
                lease
            });
        }
        let mut leases = Vec::new();
        while let Some(done) = calls.join_next().await {
            leases.push(done.unwrap());
        }
        let [a, b] = &*replicas;

        let events = b.events().await;
        let total = events.len() as u64;
        // The 1,000 calls, and this QueryEvents (audited before it answers).
        assert_eq!(total as usize, before + 1000 + 1, "every call audited once");
        for (i, event) in events.iter().enumerate() {
            assert_eq!(event.sequence, i as u64 + 1, "gapless, in order");
        }
        let time = |e: &va::AuditEvent| {
            let t = e.time.unwrap();
            (t.seconds, t.nanos)
        };
        assert!(
            events.windows(2).all(|w| time(&w[0]) <= time(&w[1])),
            "time order"
        );
        for lease in &leases {
            let about: Vec<_> = events.iter().filter(|e| &e.lease_id == lease).collect();
            let ops: Vec<_> = about.iter().map(|e| e.operation.as_str()).collect();
            assert_eq!(
                ops,
                [
                    "recvault.vault.v1.Leases/AcquireLease",
                    "recvault.vault.v1.Leases/ReleaseLease"
                ],
                "lease {lease}"
            );
            assert_ne!(about[0].instance_id, about[1].instance_id, "served by both");
        }
        for instance in ["vault-a", "vault-b"] {
            let n = events.iter().filter(|e| e.instance_id == instance).count();
            assert!(n >= 500, "{instance} wrote {n}");
        }
        for replica in [a, b] {
            let report = replica.verify_chain().await;
            assert!(report.ok, "{report:?}");
            assert!(report.events_checked >= total, "{report:?}");
        }

        // Edit one event of the middle in the database: both name it.
        let victim = events[events.len() / 2].sequence;
        pg.psql(
            &db,
            &format!("UPDATE audit_events SET outcome = 'denied' WHERE sequence = {victim}"),
        );
        for replica in [a, b] {
            let report = replica.verify_chain().await;
            assert!(!report.ok, "{report:?}");
            assert_eq!(report.first_broken_sequence, victim, "{report:?}");
        }
        println!("{total} events on one chain from two replicas; edited event {victim} named");
    });
}

/// A database that goes away answers UNAVAILABLE with the reason, promptly
/// (never a hang), and the vault recovers by itself when it returns.
#[test]
fn a_database_outage_is_unavailable_then_heals_by_itself() {
    let Some(pg) = Postgres::dedicated() else {
        return;
    };
    let db = pg.database();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    init(root, &db.url());
    let (mut daemon, addr) = serve(root, "a");
    let a = Replica {
        ep: Endpoints {
            vault: addr,
            uploader: String::new(),
            certs: root.join("certs"),
        },
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let id = a.put("archive", &secret(1)).await.unwrap();
        let (lease, _) = a.lease(&id).await.unwrap();
        a.release(&lease).await.unwrap();
        let before = a.events().await;
        pg.stop();

        let started = std::time::Instant::now();
        let refused = a.put("archive", &secret(2)).await.unwrap_err();
        // The first audited step refuses (the audit log lives in the same
        // database): UNAVAILABLE, naming PostgreSQL, nothing done.
        assert!(refused.contains("Unavailable:"), "{refused}");
        assert!(refused.contains("PostgreSQL"), "{refused}");
        assert!(refused.contains("retry later"), "{refused}");
        let status = a.lease(&id).await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        // Bounded by the connect timeout (5 s), not by a hang: generous
        // slack for a loaded machine.
        let waited = started.elapsed();
        assert!(waited < Duration::from_secs(40), "took {waited:?}");
        println!("two calls refused in {waited:?} with the database down");
        // Down for 10 s: every lease refused, no plaintext served.
        let mut refused_leases = 0;
        while started.elapsed() < Duration::from_secs(10) {
            let status = a.lease(&id).await.unwrap_err();
            assert_eq!(status.code(), Code::Unavailable, "{status:?}");
            refused_leases += 1;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        println!("{refused_leases} more leases refused over 10 s");

        pg.start_again();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let healed = loop {
            match a.put("archive", &secret(3)).await {
                Ok(again) => break again,
                Err(e) if std::time::Instant::now() < deadline => {
                    println!("not yet: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("the vault did not recover: {e}"),
            }
        };
        assert_eq!(healed, id);
        assert_eq!(a.lease(&id).await.unwrap().1, secret(3).as_bytes());

        // Nothing audited before the outage was lost, and the chain that
        // went on after it verifies whole.
        let after = a.events().await;
        assert!(after.len() > before.len());
        for (old, new) in before.iter().zip(&after) {
            assert_eq!((old.sequence, &old.hash), (new.sequence, &new.hash));
        }
        let report = a.verify_chain().await;
        assert!(report.ok, "{report:?}");
    });
    let output = daemon.output();
    assert!(!output.contains("replica-secret"), "a secret in the log");
    daemon.stop();
}
