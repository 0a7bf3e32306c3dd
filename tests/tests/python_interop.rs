//! The .proto files are the contract: a client written with another gRPC
//! implementation (Python grpcio, code generated from `proto/` at test time
//! with grpcio-tools' protoc) puts a credential, leases and releases it
//! against the real `vaultd` over mTLS, and gets the refusals it must.
//!
//! grpcio and grpcio-tools come from PyPI into `target/tools/python` on first
//! use. When python3 or pip is missing this test fails (it never skips).

#![allow(clippy::unwrap_used)]

use std::{
    path::Path,
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use base64::Engine;
use recvault_tests::{Daemon, binary, python_grpc_tools, served_addr, workspace_root};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// Runs `cmd` to completion, killing it after `limit`.
fn run_with_timeout(mut cmd: Command, limit: Duration, what: &str) -> Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {what}: {e} (is python3 installed?)"));
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out.unwrap_or_else(|e| panic!("wait for {what}: {e}")),
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            panic!("{what} did not finish within {limit:?}");
        }
    }
}

fn python(pythonpath: &Path) -> Command {
    let mut cmd = Command::new("python3");
    cmd.env("PYTHONPATH", pythonpath)
        .env("PYTHONNOUSERSITE", "1")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PYTHONUNBUFFERED", "1");
    cmd
}

#[test]
fn python_grpcio_client_puts_leases_and_releases_over_mtls() {
    let started = Instant::now();
    let tools = python_grpc_tools();
    let installed = started.elapsed();
    let root = workspace_root();
    let dir = tempfile::tempdir().unwrap();
    let gen_dir = dir.path().join("gen");
    std::fs::create_dir(&gen_dir).unwrap();

    // Generate the Python stubs from proto/ now, so they can never drift from it.
    let mut protoc = python(&tools);
    protoc
        .args(["-m", "grpc_tools.protoc", "-I"])
        .arg(root.join("proto/proto"))
        .arg(format!("--python_out={}", gen_dir.display()))
        .arg(format!("--grpc_python_out={}", gen_dir.display()))
        .arg("recvault/vault/v1/vault.proto")
        .current_dir(&root);
    let out = run_with_timeout(
        protoc,
        Duration::from_secs(30),
        "python3 -m grpc_tools.protoc",
    );
    assert!(
        out.status.success(),
        "grpc_tools.protoc failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let generated = gen_dir.join("recvault/vault/v1");
    for file in ["vault_pb2.py", "vault_pb2_grpc.py"] {
        assert!(
            generated.join(file).exists(),
            "{file} not generated in {}",
            generated.display()
        );
    }

    // The real vault, set up as operators do.
    let init = Command::new(binary("vaultd"))
        // Secrets in clear, as grpcurl and this generated client send them
        // (the debug setting the dev runner also turns on).
        .args([
            "init",
            "--allow-plaintext-secrets",
            "--listen",
            "127.0.0.1:0",
            "--dir",
        ])
        .arg(dir.path().join("vault"))
        .arg("--certs")
        .arg(dir.path().join("certs"))
        .output()
        .unwrap();
    assert!(
        init.status.success(),
        "vaultd init: {}",
        String::from_utf8_lossy(&init.stderr)
    );
    let mut serve = Command::new(binary("vaultd"));
    serve
        .args(["serve", "--config"])
        .arg(dir.path().join("vault/vault.toml"))
        .env("RUST_LOG", "debug");
    let mut vault = Daemon::spawn(serve);
    let addr = served_addr(&vault.wait_for("vault serving", Duration::from_secs(30)));

    // The secret goes to the client in a file, never on its command line.
    let marker = "py-s3cr3t-Marker-4b1d";
    let secret = format!(r#"{{"access_key_id":"AKIAPYINTEROP","secret_access_key":"{marker}"}}"#);
    let secret_file = dir.path().join("secret.json");
    std::fs::write(&secret_file, &secret).unwrap();

    let client_started = Instant::now();
    let mut client = python(&tools);
    client
        .arg(root.join("tests/interop/python/vault_client.py"))
        .arg("--addr")
        .arg(&addr)
        .arg("--certs")
        .arg(dir.path().join("certs"))
        .arg("--secret-file")
        .arg(&secret_file)
        .arg("--gen")
        .arg(&gen_dir);
    let out = run_with_timeout(client, Duration::from_secs(45), "python3 vault_client.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "Python client failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}\nvault logs:\n{}",
        out.status,
        vault.output()
    );
    assert_eq!(
        stdout.lines().last().map(str::trim),
        Some("interop ok"),
        "last line of the Python client:\n{stdout}\n{stderr}"
    );
    eprintln!(
        "python tools ready in {installed:?}; client ran in {:?}",
        client_started.elapsed()
    );

    vault.stop();
    let logs = vault.output();
    assert!(logs.contains("vault serving"), "expected logs:\n{logs}");
    // The secret is in no log line, in no form, and the client never printed it.
    let needles = [marker.to_owned(), B64.encode(&secret), B64.encode(marker)];
    for needle in &needles {
        assert!(
            !logs.contains(needle.as_str()),
            "secret leaked into vaultd logs"
        );
        assert!(
            !stdout.contains(needle.as_str()) && !stderr.contains(needle.as_str()),
            "the Python client printed the secret"
        );
    }
}
