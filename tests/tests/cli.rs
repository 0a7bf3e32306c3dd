//! The `recvault` command line for people, against the running main job:
//! put a credential from stdin (never argv), send a file with progress and a
//! final verified line, verify the download, follow and verify the audit log.

#![allow(clippy::unwrap_used)]

use std::{
    io::Write,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use recvault_tests::{Daemon, binary};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn recvault(dir: &Path, vault: &str, uploader: &str) -> Command {
    let mut cmd = Command::new(binary("recvault"));
    cmd.arg("--certs")
        .arg(dir.join("certs"))
        .args(["--vault", vault, "--uploader", uploader]);
    cmd
}

#[test]
fn cli_puts_from_stdin_sends_with_progress_verifies_and_follows_the_audit_log() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join(".dev");
    let vault = format!("127.0.0.1:{}", free_port());
    let uploader = format!("127.0.0.1:{}", free_port());
    let mut main_job = Daemon::spawn({
        let mut cmd = Command::new(binary("recvault"));
        cmd.args([
            "dev",
            "--vault-listen",
            &vault,
            "--uploader-listen",
            &uploader,
            "--dir",
        ])
        .arg(&dir);
        cmd
    });
    let destination = main_job
        .wait_for("destination dst_", Duration::from_secs(120))
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_owned();
    main_job.wait_for("ready: vault", Duration::from_secs(120));

    // Follow the audit log while the other commands run.
    let mut tail = Daemon::spawn({
        let mut cmd = recvault(&dir, &vault, &uploader);
        cmd.args(["audit", "tail", "--tenant", "demo", "--after", "1"]);
        cmd
    });

    // A credential from stdin.
    let secret = r#"{"access_key_id":"AKIACLI","secret_access_key":"cli-secret-from-stdin"}"#;
    let mut put = recvault(&dir, &vault, &uploader)
        .args([
            "credential",
            "put",
            "--tenant",
            "demo",
            "--name",
            "cli",
            "--kind",
            "s3",
            "--secret-file",
            "-",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    put.stdin
        .take()
        .unwrap()
        .write_all(secret.as_bytes())
        .unwrap();
    let out = put.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.starts_with("credential_id cred_") && stdout.contains("version 1"),
        "{stdout}"
    );
    assert!(!stdout.contains("cli-secret-from-stdin"));

    // Send a recording: progress on stderr, a verified line on stdout.
    let file = tmp.path().join("meeting.bin");
    std::fs::write(
        &file,
        (0..3_000_000u32)
            .map(|i| (i * 7 + i / 13) as u8)
            .collect::<Vec<_>>(),
    )
    .unwrap();
    let out = recvault(&dir, &vault, &uploader)
        .arg("send")
        .arg(&file)
        .args([
            "--tenant",
            "demo",
            "--destination",
            &destination,
            "--recording-id",
            "cli-1",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("100%") && stderr.contains("DELIVERED"),
        "{stderr}"
    );
    assert!(stdout.contains("verified delivered to"), "{stdout}");

    // Verify the download against its sidecar; a changed byte fails.
    let delivered = dir.join("s3/demo-recordings/recordings/meeting.bin");
    let out = recvault(&dir, &vault, &uploader)
        .arg("verify")
        .arg(&delivered)
        .output()
        .unwrap();
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains(": OK"));
    let mut bytes = std::fs::read(&delivered).unwrap();
    bytes[1000] ^= 1;
    let tampered = tmp.path().join("tampered.bin");
    std::fs::write(&tampered, bytes).unwrap();
    std::fs::copy(
        dir.join("s3/demo-recordings/recordings/meeting.bin.sha256"),
        tmp.path().join("tampered.bin.sha256"),
    )
    .unwrap();
    let out = recvault(&dir, &vault, &uploader)
        .arg("verify")
        .arg(&tampered)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("FAILED"));

    // The audit tail saw the credential put; the chain verifies.
    let line = tail.wait_for("Credentials/PutCredential", Duration::from_secs(20));
    let event: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(event["identity"], "spiffe://recvault.local/manager");
    assert!(!tail.output().contains("cli-secret-from-stdin"));
    tail.kill();
    let out = recvault(&dir, &vault, &uploader)
        .args(["audit", "verify"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("audit chain intact"));
    main_job.stop();
}
