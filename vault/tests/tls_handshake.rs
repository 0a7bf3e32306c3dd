//! The vault's TLS front door, driven with tokio-rustls directly: TLS 1.3
//! only, a client certificate from the configured CA required, and
//! certificate/CA reload without a restart or a dropped connection.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use recvault_proto::vault::v1::ListCredentialsRequest;
use recvault_runtime::devcerts;
use recvault_vault::testing::{TEST_IDENTITIES, TestVault};

/// Asserts the handshake failed with a fatal alert from the server, one of `alerts`.
fn assert_refused(result: std::io::Result<String>, alerts: &[&str]) {
    let error = result.expect_err("the vault must refuse this client");
    let message = error.to_string();
    assert!(
        message.contains("received fatal alert") && alerts.iter().any(|a| message.contains(a)),
        "expected a TLS alert from {alerts:?}, got {error:?}"
    );
}

/// Waits until the vault counted one refused handshake for `reason` (the
/// server side finishes after the client saw the alert).
async fn assert_counted(vault: &TestVault, reason: &str) {
    let line = format!("recvault_vault_tls_handshakes_refused_total{{reason=\"{reason}\"}} 1");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let metrics = vault.core.metrics.registry.render();
        if metrics.contains(&line) {
            return;
        }
        assert!(Instant::now() < deadline, "no {line:?} in:\n{metrics}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Starts a vault that audits refused handshakes every second.
async fn start_audited() -> (tempfile::TempDir, TestVault) {
    start_with(|c| c.audit.handshake_window_secs = 1).await
}

/// Waits for the `tls/Handshake` audit events and returns their details.
async fn handshake_events(vault: &TestVault, want: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(6);
    loop {
        let events = vault
            .core
            .audit
            .query(&Default::default(), 0, 1000)
            .await
            .unwrap();
        let details: Vec<String> = events
            .iter()
            .filter(|e| e.record.operation == "tls/Handshake")
            .map(|e| {
                assert_eq!(
                    (e.record.outcome.as_str(), e.record.code.as_str()),
                    ("denied", "UNAUTHENTICATED")
                );
                assert_eq!(e.record.identity, "unauthenticated");
                e.record.detail.clone()
            })
            .collect();
        if details.len() >= want || Instant::now() > deadline {
            return details;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Asserts one audit event for `reason` from 127.0.0.1 with `count` refusals.
async fn assert_audited(vault: &TestVault, reason: &str, count: u32) {
    let details = handshake_events(vault, 1).await;
    assert_eq!(
        details,
        [format!(
            "peer=127.0.0.1 reason={reason} refused={count} window=1s"
        )]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn correct_client_certificate_completes_the_handshake() {
    let (_dir, vault) = start().await;
    let ca = vault.certs.join("ca.crt");
    let leaf = handshake(&vault, client_config(&ca, &vault.certs, "uploader"))
        .await
        .unwrap();
    assert_eq!(leaf, file_fingerprint(&vault.certs.join("vault.crt")));
    // And gRPC over the same kind of connection works.
    credentials(&vault, "manager")
        .list_credentials(ListCredentialsRequest {
            tenant_id: "acme".into(),
            include_deleted: false,
        })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_without_certificate_is_refused_at_the_handshake() {
    let (_dir, vault) = start_audited().await;
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots(&vault.certs.join("ca.crt")))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    assert_refused(handshake(&vault, config).await, &["CertificateRequired"]);
    assert_counted(&vault, "no_certificate").await;
    assert_audited(&vault, "no_certificate", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_from_another_ca_is_refused_at_the_handshake() {
    let (dir, vault) = start_audited().await;
    let other = dir.path().join("other-ca");
    devcerts::generate(&other, &["uploader"]).unwrap();
    // Trusts the vault's CA (so the client side is happy) but presents a
    // certificate for the same identity signed by a CA the vault does not know.
    let config = client_config(&vault.certs.join("ca.crt"), &other, "uploader");
    // Both dev CAs have the same name, so rustls finds the issuer by name and
    // then rejects the signature (DecryptError); a differently named CA gives UnknownCA.
    assert_refused(
        handshake(&vault, config).await,
        &["UnknownCA", "DecryptError", "BadCertificate"],
    );
    assert_counted(&vault, "unknown_ca").await;
    assert_audited(&vault, "unknown_ca", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_client_certificate_is_refused_counted_and_audited() {
    let (_dir, vault) = start_audited().await;
    devcerts::issue_expired(&vault.certs, "uploader").unwrap();
    let config = client_config(
        &vault.certs.join("ca.crt"),
        &vault.certs,
        "uploader-expired",
    );
    assert_refused(
        handshake(&vault, config).await,
        &["CertificateExpired", "BadCertificate"],
    );
    assert_counted(&vault, "expired").await;
    assert_audited(&vault, "expired", 1).await;
}

/// A flood of bad handshakes from one peer is one audit event per window,
/// with the count, not one event per handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_refused_handshakes_is_audited_in_aggregate() {
    let (_dir, vault) = start_with(|c| c.audit.handshake_window_secs = 3).await;
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots(&vault.certs.join("ca.crt")))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    for _ in 0..40 {
        assert_refused(
            handshake(&vault, config.clone()).await,
            &["CertificateRequired"],
        );
    }
    let line = "recvault_vault_tls_handshakes_refused_total{reason=\"no_certificate\"} 40";
    let deadline = Instant::now() + Duration::from_secs(5);
    while !vault.core.metrics.registry.render().contains(line) {
        assert!(Instant::now() < deadline, "not counted: {line}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let details = handshake_events(&vault, 2).await;
    let total: u32 = details
        .iter()
        .map(|d| {
            assert!(
                d.starts_with("peer=127.0.0.1 reason=no_certificate refused="),
                "{d}"
            );
            d.split("refused=")
                .nth(1)
                .unwrap()
                .split(' ')
                .next()
                .unwrap()
                .parse::<u32>()
                .unwrap()
        })
        .sum();
    assert_eq!(total, 40, "{details:?}");
    assert!(details.len() <= 2, "one event per window, got {details:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls12_only_client_is_refused() {
    let (_dir, vault) = start_audited().await;
    let files = devcerts::files(&vault.certs, "uploader");
    let mut config =
        rustls::ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS12])
            .with_root_certificates(roots(&files.ca))
            .with_client_auth_cert(load_certs(&files.cert), load_key(&files.key))
            .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    assert_refused(handshake(&vault, config).await, &["ProtocolVersion"]);
    assert_counted(&vault, "protocol_version").await;
    assert_audited(&vault, "protocol_version", 1).await;
}

/// Rotates every certificate and the CA under a running vault: new
/// connections see the new server certificate and need the new CA, while a
/// connection opened before the rotation keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_and_ca_reload_without_dropping_connections() {
    let (_dir, vault) = start_with(|c| c.reload_interval_secs = 1).await;
    let certs = vault.certs.clone();
    let old_ca = certs.join("ca.crt");
    let old_leaf = file_fingerprint(&certs.join("vault.crt"));
    // Client material from before the rotation, held in memory.
    let old_config = client_config(&old_ca, &certs, "manager");
    let old_files = devcerts::files(&certs, "manager");
    let (old_cert, old_key) = (load_certs(&old_files.cert), load_key(&old_files.key));
    let mut old_channel = credentials(&vault, "manager");
    let list = ListCredentialsRequest {
        tenant_id: "acme".into(),
        include_deleted: false,
    };
    old_channel.list_credentials(list.clone()).await.unwrap();
    assert_eq!(
        handshake(&vault, old_config.clone()).await.unwrap(),
        old_leaf
    );

    // New CA, new server certificate and key, new client certificates.
    devcerts::generate(&certs, &TEST_IDENTITIES).unwrap();
    let new_leaf = file_fingerprint(&certs.join("vault.crt"));
    assert_ne!(new_leaf, old_leaf);
    let new_config = client_config(&certs.join("ca.crt"), &certs, "manager");

    // Within a few reload intervals a new handshake presents the new certificate.
    let deadline = Instant::now() + Duration::from_secs(8);
    let seen = loop {
        match handshake(&vault, new_config.clone()).await {
            Ok(leaf) if leaf == new_leaf => break leaf,
            other => {
                assert!(
                    Instant::now() < deadline,
                    "the vault did not reload its certificate: {other:?}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    assert_eq!(seen, new_leaf);

    // The client CA was reloaded too: a client that trusts the new server
    // certificate but presents its certificate from the old CA is refused by the server.
    let mut stale_client = rustls::ClientConfig::builder()
        .with_root_certificates(roots(&certs.join("ca.crt")))
        .with_client_auth_cert(old_cert, old_key)
        .unwrap();
    stale_client.alpn_protocols = vec![b"h2".to_vec()];
    assert_refused(
        handshake(&vault, stale_client).await,
        &["UnknownCA", "DecryptError", "BadCertificate"],
    );
    // And a client that still trusts only the old CA no longer accepts the server.
    let old_trust = handshake(&vault, old_config).await;
    assert!(
        old_trust.is_err(),
        "old CA still verifies the server: {old_trust:?}"
    );

    // The connection opened before the rotation was not dropped: it still
    // answers (a reconnect with the old material would now fail).
    for _ in 0..3 {
        old_channel.list_credentials(list.clone()).await.unwrap();
    }
    // New channels with the new files work.
    credentials(&vault, "manager")
        .list_credentials(list)
        .await
        .unwrap();
}
