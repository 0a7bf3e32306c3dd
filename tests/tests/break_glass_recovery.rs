//! The security team's break-glass path, run as they would run it: the real
//! `vaultd` stores credentials (across a key rotation), is stopped, and
//! `deploy/recovery/recover_credential.py` (Python `cryptography`, installed
//! from PyPI into target/tools, an implementation independent of ours) prints
//! each secret from the master key file and the database alone. Also: the
//! wrapping public key file that `vaultd init`, `vaultd wrapping-key` and the
//! dev runner write is the key the vault serves, and `recvault_keys.py`
//! derives it and opens a data key that Rust wrapped.

#![allow(clippy::unwrap_used)]

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use base64::Engine;
use recvault_proto::vault::v1::{
    self as va, GetWrappingKeyRequest, credentials_client::CredentialsClient,
    data_keys_client::DataKeysClient, keys_client::KeysClient,
};
use recvault_runtime::{
    datakey::{WRAP_INFO, binding},
    secret::SecretBytes,
};
use recvault_tests::{
    Daemon, binary,
    client::{self, Endpoints},
    python_recovery_tools, served_addr, workspace_root,
};

/// `vaultd init` into `root/vault`, certificates in `root/certs`.
fn init(root: &Path) {
    recvault_tests::vaultd_init(root, &[]);
}

/// `vaultd serve` on a free port; returns the daemon and its address.
fn serve(root: &Path) -> (Daemon, String) {
    let mut cmd = Command::new(binary("vaultd"));
    cmd.args(["serve", "--config"])
        .arg(root.join("vault/vault.toml"));
    let mut daemon = Daemon::spawn(cmd);
    let line = daemon.wait_for("vault serving", Duration::from_secs(30));
    let addr = served_addr(&line);
    (daemon, addr)
}

fn endpoints(root: &Path, addr: &str) -> Endpoints {
    Endpoints {
        vault: addr.to_owned(),
        uploader: String::new(),
        certs: root.join("certs"),
    }
}

/// `python3 recover_credential.py ARGS` with the recovery packages on PYTHONPATH.
fn recover(args: &[&std::ffi::OsStr]) -> Output {
    Command::new("python3")
        .arg(workspace_root().join("deploy/recovery/recover_credential.py"))
        .args(args)
        .env("PYTHONPATH", python_recovery_tools())
        .output()
        .expect("run python3")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn recover_credential_prints_what_was_put_through_the_real_vault() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    init(root);
    let (mut daemon, addr) = serve(root);
    let ep = endpoints(root, &addr);
    let secret = |n: u32| {
        format!(
            r#"{{"access_key_id":"AKIA{n}","secret_access_key":"recover-{}"}}"#,
            uuid::Uuid::new_v4().simple()
        )
        .into_bytes()
    };
    let (a_old, a_new, b, c) = (secret(1), secret(2), secret(3), secret(4));

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (a_id, b_id, c_id) = runtime.block_on(async {
        let put = |name: &'static str, secret: &[u8]| {
            let channel = ep.channel(&ep.vault, "manager").unwrap();
            let secret = SecretBytes::from_slice(secret);
            async move {
                client::put_credential(channel, "acme", name, va::CredentialKind::S3, secret, None)
                    .await
                    .unwrap()
            }
        };
        // Version 1 of "a" under key version 1; then a rotation, so that
        // version 2 of "a" and "b" are sealed under key version 2.
        let a1 = put("a", &a_old).await;
        KeysClient::new(ep.channel(&ep.vault, "admin").unwrap())
            .rotate_key(va::RotateKeyRequest {})
            .await
            .unwrap();
        let a2 = put("a", &a_new).await;
        assert_eq!(
            (a2.credential_id.as_str(), a2.version),
            (a1.credential_id.as_str(), 2)
        );
        let b = put("b", &b).await;
        let c = put("c", &c).await;
        CredentialsClient::new(ep.channel(&ep.vault, "manager").unwrap())
            .delete_credential(va::DeleteCredentialRequest {
                credential_id: c.credential_id.clone(),
            })
            .await
            .unwrap();
        (a2.credential_id, b.credential_id, c.credential_id)
    });
    // Break glass: the vault is down.
    daemon.stop();

    let master = root.join("vault/master.key");
    let database = root.join("vault/vault.db");
    let args = |master: &Path, id: &str| -> Vec<std::ffi::OsString> {
        vec![
            "--master-key".into(),
            master.into(),
            "--database".into(),
            database.clone().into(),
            id.into(),
        ]
    };
    let run_script = |master: &Path, id: &str| {
        let a = args(master, id);
        recover(&a.iter().map(|s| s.as_os_str()).collect::<Vec<_>>())
    };
    for (id, secret) in [(&a_id, &a_new), (&b_id, &b)] {
        let out = run_script(&master, id);
        assert!(out.status.success(), "{id}: {}", text(&out.stderr));
        assert_eq!(out.stdout, *secret, "{id}: the current version's secret");
        let stderr = text(&out.stderr);
        assert!(stderr.contains("BREAK-GLASS"), "{stderr}");
        assert!(
            !stderr.contains(&text(secret)),
            "secret on stderr: {stderr}"
        );
    }

    // Refusals: exit 1, a reason on stderr, nothing on stdout.
    let mut other_key = PathBuf::from(root);
    other_key.push("other.key");
    std::fs::write(&other_key, format!("{}\n", "ab".repeat(32))).unwrap();
    std::fs::set_permissions(&other_key, std::fs::Permissions::from_mode(0o600)).unwrap();
    for (master, id, reason) in [
        (&master, c_id.as_str(), "was deleted (crypto-shredded)"),
        (
            &master,
            "cred_00000000000000000000000000000000",
            "is not in this database",
        ),
        (
            &other_key,
            a_id.as_str(),
            "does not authenticate: wrong master key",
        ),
    ] {
        let out = run_script(master, id);
        assert_eq!(out.status.code(), Some(1), "{id}: {}", text(&out.stderr));
        assert!(
            out.stdout.is_empty(),
            "{id}: stdout {:?}",
            text(&out.stdout)
        );
        assert!(
            text(&out.stderr).contains(reason),
            "{id}: {}",
            text(&out.stderr)
        );
    }
    // No file was written beside the database.
    let mut names: Vec<_> = std::fs::read_dir(root.join("vault"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| !n.starts_with("audit.db") && !n.starts_with("vault.db"))
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "master.key",
            "policy.toml",
            "vault.toml",
            "wrapping-key.pub"
        ]
    );
}

/// Parses the wrapping key file: exactly a comment line, `key_version = 1`
/// and `public_key = "<base64>"`.
fn parse_key_file(text: &str) -> Vec<u8> {
    let lines: Vec<_> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(
        lines[0].starts_with("# recvault backup wrapping public key"),
        "{text}"
    );
    assert_eq!(lines[1], "key_version = 1");
    let b64 = lines[2]
        .strip_prefix("public_key = \"")
        .and_then(|l| l.strip_suffix('"'))
        .unwrap_or_else(|| panic!("{text}"));
    let key = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    assert_eq!(key.len(), 32);
    key
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn wrapping_key_file_is_the_served_key_and_python_opens_what_rust_wrapped() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    init(root);
    let file = root.join("vault/wrapping-key.pub");
    let written = std::fs::read_to_string(&file).unwrap();
    assert_eq!(mode(&file), 0o644);
    let public = parse_key_file(&written);

    let config = root.join("vault/vault.toml");
    let printed = Command::new(binary("vaultd"))
        .args(["wrapping-key", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(printed.status.success(), "{}", text(&printed.stderr));
    assert_eq!(text(&printed.stdout), written);
    let out = root.join("elsewhere.pub");
    let status = Command::new(binary("vaultd"))
        .args(["wrapping-key", "--config"])
        .arg(&config)
        .arg("--out")
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(std::fs::read_to_string(&out).unwrap(), written);
    assert_eq!(mode(&out), 0o644);

    // The key the running vault serves is the one in the file.
    let (mut daemon, addr) = serve(root);
    let ep = endpoints(root, &addr);
    let served = tokio::runtime::Runtime::new().unwrap().block_on(async {
        DataKeysClient::new(ep.channel(&ep.vault, "uploader").unwrap())
            .get_wrapping_key(GetWrappingKeyRequest {})
            .await
            .unwrap()
            .into_inner()
    });
    daemon.stop();
    assert_eq!((served.key_version, &served.public_key), (1, &public));

    // recvault_keys.py derives the same public key from the master key file,
    // and opens a data key that Rust wrapped to it (and only for its recording).
    let mut data_key = [0u8; 32];
    data_key[..16].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
    data_key[16..].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
    let (enc, wrapped) = recvault_vault::datakeys::seal(
        &public,
        WRAP_INFO,
        &binding("acme", "rec-1"),
        &SecretBytes::from_slice(&data_key),
    )
    .unwrap();
    let python = |recording: &str| {
        Command::new("python3")
            .args([
                "-c",
                "import sys, recvault_keys as k\n\
                 m = k.read_master_key(sys.argv[1])\n\
                 print(k.wrapping_public_key(m).hex())\n\
                 print(k.open_wrapped_data_key(m, 'acme', sys.argv[2], bytes.fromhex(sys.argv[3]), bytes.fromhex(sys.argv[4])).hex())",
            ])
            .arg(root.join("vault/master.key"))
            .args([recording, &hex::encode(&enc), &hex::encode(&wrapped)])
            .env(
                "PYTHONPATH",
                std::env::join_paths([
                    workspace_root().join("deploy/recovery"),
                    python_recovery_tools(),
                ])
                .unwrap(),
            )
            .output()
            .unwrap()
    };
    let out = python("rec-1");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let lines: Vec<_> = stdout.lines().collect();
    assert_eq!(lines, [hex::encode(&public), hex::encode(data_key)]);
    let out = python("rec-2");
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("does not open for this tenant and recording"),
        "{}",
        text(&out.stderr)
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The dev runner leaves the uploader its copy of the wrapping key.
#[test]
fn dev_runner_writes_the_uploader_wrapping_key_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join(".dev");
    let mut cmd = Command::new(binary("recvault"));
    cmd.args(["dev", "--vault-listen"])
        .arg(format!("127.0.0.1:{}", free_port()))
        .arg("--uploader-listen")
        .arg(format!("127.0.0.1:{}", free_port()))
        .arg("--dir")
        .arg(&dir);
    let mut daemon = Daemon::spawn(cmd);
    daemon.wait_for("ready: vault", Duration::from_secs(120));
    daemon.stop();
    let file = dir.join("uploader/backup-wrap.pub");
    let text_in_file = std::fs::read_to_string(&file)
        .unwrap_or_else(|e| panic!("{}: {e}\n{}", file.display(), daemon.output()));
    assert_eq!(mode(&file), 0o644);
    assert_eq!(
        text_in_file,
        std::fs::read_to_string(dir.join("vault/wrapping-key.pub")).unwrap()
    );
    parse_key_file(&text_in_file);
}
