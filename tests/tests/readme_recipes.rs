//! Every grpcurl recipe in README.md ("grpcurl recipes"), run as written with
//! the real grpcurl against the running main job. Only the ports are swapped
//! for free ones, so the test can run beside a developer's own main job.

#![allow(clippy::unwrap_used)]

use std::{process::Command, time::Duration};

use recvault_tests::{Daemon, binary, grpcurl, http_get, workspace_root};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The ```sh blocks between the recipe markers.
fn recipes() -> Vec<String> {
    let readme = std::fs::read_to_string(workspace_root().join("README.md")).unwrap();
    let section = readme
        .split("<!-- recipes:begin -->")
        .nth(1)
        .and_then(|s| s.split("<!-- recipes:end -->").next())
        .expect("README has a recipes section");
    section
        .split("```sh\n")
        .skip(1)
        .map(|b| b.split("```").next().unwrap().to_owned())
        .collect()
}

#[test]
fn readme_grpcurl_recipes_work_against_the_running_main_job() {
    let blocks = recipes();
    assert!(
        blocks.len() >= 5,
        "expected the README's recipe blocks, found {}",
        blocks.len()
    );
    let tmp = tempfile::tempdir().unwrap();
    let vault = format!("127.0.0.1:{}", free_port());
    let uploader = format!("127.0.0.1:{}", free_port());
    let mut cmd = Command::new(binary("recvault"));
    cmd.args([
        "dev",
        "--vault-listen",
        &vault,
        "--uploader-listen",
        &uploader,
        "--dir",
    ])
    .arg(tmp.path().join(".dev"));
    let mut main_job = Daemon::spawn(cmd);
    main_job.wait_for("ready: vault", Duration::from_secs(120));

    let grpcurl_dir = grpcurl().parent().unwrap().to_owned();
    let path = format!(
        "{}:{}",
        grpcurl_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut outputs = Vec::new();
    for (i, block) in blocks.iter().enumerate() {
        let script = block
            .replace("127.0.0.1:7443", &vault)
            .replace("127.0.0.1:7444", &uploader);
        let out = Command::new("bash")
            .args(["-euo", "pipefail", "-c", &script])
            .current_dir(tmp.path())
            .env("PATH", &path)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "recipe block {} failed:\n{script}\n--- stdout\n{stdout}\n--- stderr\n{}",
            i + 1,
            String::from_utf8_lossy(&out.stderr)
        );
        outputs.push(stdout);
    }
    let all = outputs.join("\n");
    assert!(all.contains("recvault.vault.v1.Leases"), "{all}");
    assert!(all.contains("rpc AcquireLease"), "{all}");
    assert!(all.contains("SERVING"), "{all}");
    assert!(all.contains("credentialId"), "{all}");
    assert!(
        all.contains("\"requestId\": \"recipe-1\""),
        "the lease's audit event: {all}"
    );
    assert!(all.contains("\"ok\": true"), "{all}");
    assert!(all.contains("JOB_STATE_DELIVERED"), "{all}");
    assert!(
        all.contains("\"operation\": \"recvault.uploader.v1.Audit/QueryEvents\""),
        "the uploader's audit event of the query itself: {all}"
    );
    // The recipe's secret reached neither the services' logs nor the shell's files.
    for log in [".dev/logs/vault.log", ".dev/logs/uploader.log"] {
        let text = std::fs::read_to_string(tmp.path().join(log)).unwrap();
        assert!(!text.contains("example-secret"), "secret in {log}");
    }
    assert!(!tmp.path().join("secret.json").exists());

    // Prometheus metrics on each service's own plain-HTTP port.
    let metrics_of = |service: &str| {
        let log =
            std::fs::read_to_string(tmp.path().join(format!(".dev/logs/{service}.log"))).unwrap();
        let addr = log
            .split("metrics on http://")
            .nth(1)
            .and_then(|rest| rest.split("/metrics").next())
            .expect("the service logs its metrics address")
            .to_owned();
        http_get(&addr, "/metrics")
    };
    // Two leases: the main job's delivery through its S3 server, and the recipe's.
    let vault_metrics = metrics_of("vault");
    assert!(
        vault_metrics.contains("recvault_vault_leases_total{outcome=\"granted\"} 2"),
        "{vault_metrics}"
    );
    assert!(
        vault_metrics.contains(
            "recvault_vault_calls_total{operation=\"Leases/AcquireLease\",code=\"OK\"} 2"
        ),
        "{vault_metrics}"
    );
    assert!(
        vault_metrics.contains("# TYPE recvault_vault_audit_commit_seconds histogram"),
        "{vault_metrics}"
    );
    assert!(!vault_metrics.contains("example-secret"));
    let metrics = metrics_of("uploader");
    assert!(
        metrics.contains("recvault_uploader_deliveries_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("recvault_uploader_recordings_ingested_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("# TYPE recvault_uploader_jobs gauge"),
        "{metrics}"
    );
    main_job.stop();
}
