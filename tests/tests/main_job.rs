//! The README's main job, as a newcomer runs it: `recvault dev` starts the
//! real vaultd and uploaderd on embedded defaults, delivers a sample
//! recording, prints the audit trail and a `ready` line; a second run reuses
//! the same directory and works the same.

#![allow(clippy::unwrap_used)]

use std::{path::Path, process::Command, time::Duration};

use recvault_tests::{Daemon, binary};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn run_main_job(dir: &Path, vault: &str, uploader: &str) -> String {
    let mut cmd = Command::new(binary("recvault"));
    cmd.args([
        "dev",
        "--vault-listen",
        vault,
        "--uploader-listen",
        uploader,
        "--dir",
    ])
    .arg(dir);
    let mut daemon = Daemon::spawn(cmd);
    daemon.wait_for("ready: vault", Duration::from_secs(120));
    daemon.stop();
    daemon.output()
}

fn delivered_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir.join("s3/demo-recordings/recordings"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "bin"))
        .collect();
    files.sort();
    files
}

#[test]
fn main_job_delivers_a_verified_recording_and_runs_again_on_the_same_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join(".dev");
    let vault = format!("127.0.0.1:{}", free_port());
    let uploader = format!("127.0.0.1:{}", free_port());

    let first = run_main_job(&dir, &vault, &uploader);
    assert!(first.contains("created .dev"), "{first}");
    assert!(first.contains("job state DELIVERED"), "{first}");
    assert!(first.contains("verified"), "{first}");
    assert!(
        first.contains("credential  cred_"),
        "the demo credential is missing:\n{first}"
    );
    assert!(
        first.contains("Jobs/ListJobs"),
        "grpcurl recipes missing:\n{first}"
    );
    // The whole path is shown: the encrypted backup's header, the vault's
    // data-key, lease and release events for this recording, the uploader's
    // own events for the job, times as RFC 3339.
    assert!(
        first.contains("backup ")
            && (first.contains(": RVBK v1") || first.contains("already delivered")),
        "backup header missing:\n{first}"
    );
    for operation in [
        "DataKeys/UnwrapDataKey",
        "Leases/AcquireLease",
        "Leases/ReleaseLease",
        "Recordings/Upload",
    ] {
        assert!(first.contains(operation), "{operation} missing:\n{first}");
    }
    let rfc3339 = first.lines().any(|l| {
        l.split_whitespace().any(|w| {
            w.len() >= 20 && w.as_bytes()[4] == b'-' && w.as_bytes()[10] == b'T' && w.ends_with('Z')
        })
    });
    assert!(rfc3339, "no RFC 3339 time in the output:\n{first}");
    for f in [
        "ca.crt",
        "vault.crt",
        "uploader.key",
        "manager.crt",
        "auditor.key",
        "admin.crt",
        "recorder.crt",
    ] {
        assert!(dir.join("certs").join(f).exists(), "{f} missing");
    }
    let delivered = delivered_files(&dir);
    assert_eq!(delivered.len(), 1, "{delivered:?}");

    // The customer's check: the sidecar verifies with the real sha256sum.
    let name = delivered[0]
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    let check = Command::new("sha256sum")
        .args(["-c", &format!("{name}.sha256")])
        .current_dir(dir.join("s3/demo-recordings/recordings"))
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );

    // The demo secret (random each run) never appears in the services' logs,
    // not even its JSON field.
    for log in ["logs/vault.log", "logs/uploader.log"] {
        let text = std::fs::read_to_string(dir.join(log)).unwrap();
        assert!(!text.contains("secret_access_key"), "secret in {log}");
    }

    let second = run_main_job(&dir, &vault, &uploader);
    assert!(second.contains("reusing .dev"), "{second}");
    assert!(second.contains("job state DELIVERED"), "{second}");
    assert_eq!(delivered_files(&dir).len(), 2);
}
