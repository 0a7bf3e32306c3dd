//! Test support: a real vault on 127.0.0.1:0 over real mTLS, with dev
//! certificates for every identity in a temporary directory. Used by this
//! crate's integration tests, the end-to-end crate and the benchmark.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use recvault_runtime::{devcerts, tls};
use tokio::sync::oneshot;

use crate::{config::VaultConfig, core::VaultCore, keyring::MasterKey, server};

/// Identities the test certificates are made for: every role, plus some
/// with no grant at all.
pub const TEST_IDENTITIES: [&str; 8] = [
    "vault", "uploader", "manager", "auditor", "admin", "recorder", "stranger", "other",
];

/// A running vault. Dropping it stops the server.
#[derive(Debug)]
pub struct TestVault {
    pub addr: SocketAddr,
    pub certs: PathBuf,
    pub data: PathBuf,
    pub config: VaultConfig,
    pub core: Arc<VaultCore>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

/// Makes certificates, a master key, a dev policy and a config under `root`.
pub fn prepare(root: &Path) -> VaultConfig {
    tls::install_crypto_provider();
    let certs = root.join("certs");
    let data = root.join("vault");
    std::fs::create_dir_all(&data).expect("create data dir");
    if !certs.join("ca.crt").exists() {
        devcerts::generate(&certs, &TEST_IDENTITIES).expect("dev certs");
    }
    let config = VaultConfig::for_data_dir(&data, &certs, SocketAddr::from(([127, 0, 0, 1], 0)));
    if !config.master_key_file.exists() {
        MasterKey::generate(&config.master_key_file).expect("master key");
        std::fs::write(&config.policy_file, crate::policy::dev_default_toml()).expect("policy");
    }
    config
}

impl TestVault {
    /// Starts a vault with the files under `root` (created if absent).
    pub async fn start(root: &Path) -> Self {
        Self::start_with(prepare(root)).await
    }

    /// Starts a vault with an explicit config (tweak limits or TTLs first).
    pub async fn start_with(config: VaultConfig) -> Self {
        let bound = server::bind(config.clone()).await.expect("vault starts");
        let addr = bound.local_addr;
        let core = bound.core.clone();
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(async move {
            bound
                .serve(async {
                    let _ = rx.await;
                })
                .await
                .expect("vault serves");
        });
        Self {
            addr,
            certs: config
                .tls
                .cert
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_default(),
            data: config
                .audit_database
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_default(),
            config,
            core,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    /// A channel to the vault as `identity` (one of [`TEST_IDENTITIES`]).
    pub fn channel(&self, identity: &str) -> tonic::transport::Channel {
        tls::channel(
            &self.addr.to_string(),
            "localhost",
            &devcerts::files(&self.certs, identity),
        )
        .expect("client TLS config")
    }

    /// Stops the server and waits for it.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        // Returns once the vault has closed its files: background tasks that
        // still hold the core (a draining connection, a sweeper tick) finish
        // first, so the audit writer's last anchor cannot land after a test
        // edits the log.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while Arc::strong_count(&self.core) > 1 && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
}

impl Drop for TestVault {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}
