//! The vault as operators run it: the real `vaultd` binary, set up by
//! `vaultd init`, driven by the real grpcurl over mTLS. Also checks that a
//! secret never reaches logs or database files in clear, and that the
//! offline `vaultd audit verify` finds an edited event.

#![allow(clippy::unwrap_used)]

use std::{process::Command, time::Duration};

use base64::Engine;
use recvault_tests::{Daemon, binary, grpcurl_call, served_addr};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

struct Running {
    _dir: tempfile::TempDir,
    root: std::path::PathBuf,
    config: std::path::PathBuf,
    daemon: Daemon,
    addr: String,
}

fn start_vault() -> Running {
    // Secrets in clear, as grpcurl sends them (the debug setting the dev
    // runner also turns on).
    start_vault_with(&["--allow-plaintext-secrets"])
}

fn start_vault_with(init_flags: &[&str]) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_owned();
    recvault_tests::vaultd_init(&root, init_flags);
    let config = root.join("vault/vault.toml");
    let mut cmd = Command::new(binary("vaultd"));
    cmd.args(["serve", "--config"])
        .arg(&config)
        .env("RUST_LOG", "debug");
    let mut daemon = Daemon::spawn(cmd);
    let line = daemon.wait_for("vault serving", Duration::from_secs(30));
    let addr = served_addr(&line);
    Running {
        _dir: dir,
        root,
        config,
        daemon,
        addr,
    }
}

#[test]
fn grpcurl_lists_describes_and_leases_over_mtls_and_secrets_stay_out_of_logs() {
    let mut vault = start_vault();
    let certs = vault.root.join("certs");
    let call = |identity: &str, args: &[&str], data: Option<&str>| {
        grpcurl_call(&certs, identity, &vault.addr, args, data)
    };

    // Reflection (grpcurl 1.8 asks v1alpha).
    let (ok, listed, err) = call("auditor", &["list"], None);
    assert!(ok, "grpcurl list failed: {err}");
    for service in [
        "recvault.vault.v1.Credentials",
        "recvault.vault.v1.Leases",
        "recvault.vault.v1.Keys",
        "recvault.vault.v1.Audit",
        "grpc.health.v1.Health",
    ] {
        assert!(
            listed.contains(service),
            "{service} missing from:\n{listed}"
        );
    }
    let (ok, described, err) = call("uploader", &["describe", "recvault.vault.v1.Leases"], None);
    assert!(ok, "describe failed: {err}");
    assert!(described.contains("rpc AcquireLease"), "{described}");
    let (ok, health, err) = call("uploader", &["grpc.health.v1.Health/Check"], None);
    assert!(ok && health.contains("SERVING"), "health: {health} {err}");

    // Put a credential as the manager; the secret comes from stdin, never argv.
    let marker = "s3cr3t-Marker-7f3a9c";
    let secret = format!(r#"{{"access_key_id":"AKIATESTKEY","secret_access_key":"{marker}"}}"#);
    let put = format!(
        r#"{{"tenant_id":"acme","name":"prod-s3","kind":"CREDENTIAL_KIND_S3","secret":"{}"}}"#,
        B64.encode(&secret)
    );
    let (ok, put_out, err) = call(
        "manager",
        &["recvault.vault.v1.Credentials/PutCredential"],
        Some(&put),
    );
    assert!(ok, "PutCredential failed: {err}");
    let put_out: serde_json::Value = serde_json::from_str(&put_out).unwrap();
    let id = put_out["credentialId"].as_str().unwrap().to_owned();
    assert_eq!(put_out["version"], 1);

    // The manager never gets plaintext.
    let (ok, _, err) = call(
        "manager",
        &["recvault.vault.v1.Leases/AcquireLease"],
        Some(&format!(r#"{{"credential_id":"{id}","purpose":"rec-1"}}"#)),
    );
    assert!(
        !ok && err.contains("PermissionDenied"),
        "manager must be denied: {err}"
    );

    // The uploader does, as a lease.
    let (ok, lease, err) = call(
        "uploader",
        &[
            "-H",
            "x-request-id: grpcurl-req-1",
            "recvault.vault.v1.Leases/AcquireLease",
        ],
        Some(&format!(
            r#"{{"credential_id":"{id}","purpose":"rec-1","ttl_seconds":30}}"#
        )),
    );
    assert!(ok, "AcquireLease failed: {err}");
    let lease: serde_json::Value = serde_json::from_str(&lease).unwrap();
    let got = B64.decode(lease["secret"].as_str().unwrap()).unwrap();
    assert_eq!(got, secret.as_bytes());
    let lease_id = lease["leaseId"].as_str().unwrap();
    let (ok, _, err) = call(
        "uploader",
        &["recvault.vault.v1.Leases/ReleaseLease"],
        Some(&format!(r#"{{"lease_id":"{lease_id}"}}"#)),
    );
    assert!(ok, "ReleaseLease failed: {err}");

    // The auditor sees the lease event with the request id, and the chain verifies.
    let (ok, events, err) = call(
        "auditor",
        &["recvault.vault.v1.Audit/QueryEvents"],
        Some(r#"{"filter":{"request_id":"grpcurl-req-1"}}"#),
    );
    assert!(ok, "QueryEvents failed: {err}");
    assert!(
        events.contains(lease_id) && events.contains("spiffe://recvault.local/uploader"),
        "{events}"
    );
    let (ok, verify, err) = call("auditor", &["recvault.vault.v1.Audit/VerifyChain"], None);
    assert!(
        ok && verify.contains("\"ok\": true"),
        "VerifyChain: {verify} {err}"
    );

    vault.daemon.stop();
    let logs = vault.daemon.output();
    assert!(
        logs.contains("AcquireLease") || logs.contains("vault serving"),
        "expected logs:\n{logs}"
    );
    // Neither the secret nor its base64 form is in the logs or in any file the vault wrote.
    let needles = [marker.to_owned(), B64.encode(&secret), B64.encode(marker)];
    for needle in &needles {
        assert!(!logs.contains(needle.as_str()), "secret leaked into logs");
    }
    for entry in std::fs::read_dir(vault.root.join("vault")).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        for needle in &needles {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle.as_bytes()),
                "secret found in clear in {}",
                path.display()
            );
        }
    }
}

/// `vaultd init` without the debug flag writes the production setting: a
/// secret sent in clear by grpcurl is refused with a message naming the
/// setting, while the sealing key is public to every role.
#[test]
fn a_production_vault_refuses_clear_secrets_from_grpcurl_and_publishes_its_sealing_key() {
    let mut vault = start_vault_with(&[]);
    let text = std::fs::read_to_string(&vault.config).unwrap();
    assert!(text.contains("allow_plaintext = false"), "{text}");
    let certs = vault.root.join("certs");
    let call = |identity: &str, args: &[&str], data: Option<&str>| {
        grpcurl_call(&certs, identity, &vault.addr, args, data)
    };
    let secret = r#"{"access_key_id":"AKIDCLEAR","secret_access_key":"clear-grpcurl-Marker-77"}"#;
    let put = format!(
        r#"{{"tenant_id":"acme","name":"clear","kind":"CREDENTIAL_KIND_S3","secret":"{}"}}"#,
        B64.encode(secret)
    );
    let (ok, out, err) = call(
        "manager",
        &["recvault.vault.v1.Credentials/PutCredential"],
        Some(&put),
    );
    assert!(!ok, "a clear secret was accepted: {out}");
    assert!(
        err.contains("FailedPrecondition") && err.contains("[secrets] allow_plaintext"),
        "{err}"
    );
    let (ok, key, err) = call(
        "auditor",
        &["recvault.vault.v1.Credentials/GetSealingKey"],
        Some("{}"),
    );
    assert!(ok, "GetSealingKey: {err}");
    let key: serde_json::Value = serde_json::from_str(&key).unwrap();
    assert_eq!(key["keyVersion"], 1, "{key}");
    let public = B64.decode(key["publicKey"].as_str().unwrap()).unwrap();
    assert_eq!(public.len(), 32);
    vault.daemon.stop();
    assert!(!vault.daemon.output().contains("clear-grpcurl-Marker-77"));
}

#[test]
fn offline_audit_verify_names_the_first_edited_event() {
    let mut vault = start_vault();
    let certs = vault.root.join("certs");
    for _ in 0..3 {
        let (ok, _, err) = grpcurl_call(
            &certs,
            "auditor",
            &vault.addr,
            &["recvault.vault.v1.Audit/VerifyChain"],
            None,
        );
        assert!(ok, "{err}");
    }
    vault.daemon.stop();
    let verify = || {
        Command::new(binary("vaultd"))
            .args(["audit", "verify", "--config"])
            .arg(&vault.config)
            .output()
            .unwrap()
    };
    let out = verify();
    assert!(
        out.status.success(),
        "intact chain must verify: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("3 events checked"));

    let db = rusqlite::Connection::open(vault.root.join("vault/audit.db")).unwrap();
    db.execute(
        "UPDATE audit_events SET outcome = 'denied' WHERE sequence = 2",
        [],
    )
    .unwrap();
    drop(db);
    let out = verify();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("BROKEN at sequence 2"), "{stdout}");
}
