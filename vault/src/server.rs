//! Assembles and runs the vault: loads the key, keyring, stores, policy and
//! TLS, then serves the five APIs plus health and reflection over mTLS until
//! shutdown. Nothing here decides policy or touches plaintext.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use recvault_proto::vault::v1::{
    audit_server::AuditServer, credentials_server::CredentialsServer,
    data_keys_server::DataKeysServer, keys_server::KeysServer, leases_server::LeasesServer,
};
use recvault_runtime::tls::{self, ReloadingServerTls};
use tokio::net::TcpListener;

use recvault_audit::{AuditKey, AuditLog, AuditStorage, GroupCommitOptions};

use crate::{
    config::VaultConfig,
    core::VaultCore,
    datakeys::WrappingKey,
    keyring::MasterKey,
    policy::PolicyFile,
    service::{
        audit::AuditService, credentials::CredentialsService, datakeys::DataKeysService,
        keys::KeysService, leases::LeasesService,
    },
};

/// HKDF info for the audit chain key; changing it breaks every existing chain.
pub const AUDIT_KEY_INFO: &[u8] = b"recvault audit chain hmac-sha256 v1";

/// Start-up failures, each naming what to fix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    #[error("{0}")]
    MasterKey(#[from] crate::keyring::MasterKeyError),
    #[error("{0}")]
    Store(#[from] crate::store::StoreError),
    #[error("keyring: {0}")]
    Keyring(String),
    #[error("{0}")]
    WrappingKey(#[from] crate::datakeys::DataKeyError),
    #[error("audit log: {0}")]
    Audit(#[from] recvault_audit::AuditError),
    #[error("{0}")]
    Policy(String),
    #[error("{0}")]
    Tls(#[from] tls::TlsError),
    #[error("cannot listen on {addr}: {source}; is another process using the port?")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// The audit key for a master key (also used by the offline `audit verify`).
pub fn audit_key(master: &MasterKey) -> Result<AuditKey, recvault_audit::AuditError> {
    AuditKey::new(master.derive(AUDIT_KEY_INFO, 32))
}

/// Where the audit log lives: in the PostgreSQL database of the stores when
/// there is one (one chain every replica appends to), else the SQLite file
/// `audit_database`.
pub fn audit_storage(config: &VaultConfig) -> Result<AuditStorage, StartError> {
    Ok(match config.store_backend() {
        Ok(crate::config::StoreBackend::Postgres(url_file)) => AuditStorage::Postgres(Box::new(
            recvault_pg::PgTarget::from_url_file(url_file, "vaultd")
                .map_err(crate::store::StoreError::from)?,
        )),
        _ => AuditStorage::Sqlite(config.audit_database.clone()),
    })
}

/// Opens everything the vault needs. Separate from serving so tests and the
/// benchmark can reach the core.
pub fn open(config: VaultConfig) -> Result<Arc<VaultCore>, StartError> {
    let master = MasterKey::load(&config.master_key_file)?;
    let crate::store::Stores { store, leases } = crate::store::open(&config)?;
    let keyring = VaultCore::load_keyring(&master, store.as_ref()).map_err(StartError::Keyring)?;
    let wrapping_key = WrappingKey::derive(&master)?;
    let sealing_key = crate::sealing::SealingKey::derive(&master)?;
    let audit = Arc::new(AuditLog::open_in(
        audit_storage(&config)?,
        &config.instance(),
        audit_key(&master)?,
        GroupCommitOptions::default(),
    )?);
    let policy = PolicyFile::load(&config.policy_file).map_err(StartError::Policy)?;
    Ok(Arc::new(VaultCore {
        config,
        master,
        wrapping_key,
        sealing_key,
        keyring: std::sync::RwLock::new(keyring),
        store,
        audit,
        policy,
        leases,
        metrics: crate::metrics::VaultMetrics::new(),
    }))
}

/// A bound, not yet serving vault: tests read `local_addr` before serving.
#[derive(Debug)]
pub struct Bound {
    pub core: Arc<VaultCore>,
    pub tls: Arc<ReloadingServerTls>,
    pub listener: TcpListener,
    pub local_addr: SocketAddr,
}

/// Opens the vault and binds its port.
pub async fn bind(config: VaultConfig) -> Result<Bound, StartError> {
    let tls = ReloadingServerTls::load(config.tls.clone())?;
    let addr = config.listen;
    // Opening may block on a database (PostgreSQL): off the async threads.
    let core = tokio::task::spawn_blocking(move || open(config))
        .await
        .map_err(|e| StartError::Keyring(format!("start-up task failed: {e}")))??;
    let (listener, local_addr) = tls::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })?;
    Ok(Bound {
        core,
        tls,
        listener,
        local_addr,
    })
}

impl Bound {
    /// Serves until `shutdown` completes, then drains in-flight calls.
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), StartError> {
        let Bound {
            core,
            tls,
            listener,
            local_addr,
        } = self;
        let interval = core.config.reload_interval();
        let _tls_reloader = tls.spawn_reloader(interval);
        let _policy_reloader = core.policy.spawn_reloader(interval);
        let active = core.metrics.leases_active.clone();
        let _lease_sweeper =
            crate::leases::spawn_sweeper(&core.leases, Duration::from_secs(5), move |n| {
                active.set(i64::try_from(n).unwrap_or(i64::MAX));
            });
        let max = core.config.limits.max_request_bytes;

        let (health_reporter, health) = tonic_health::server::health_reporter();
        for name in [
            "recvault.vault.v1.Credentials",
            "recvault.vault.v1.Leases",
            "recvault.vault.v1.Keys",
            "recvault.vault.v1.Audit",
            "recvault.vault.v1.DataKeys",
            "",
        ] {
            health_reporter
                .set_service_status(name, tonic_health::ServingStatus::Serving)
                .await;
        }
        let metrics_addr = recvault_runtime::metrics::serve(
            core.config.metrics_listen,
            core.metrics.registry.clone(),
        )
        .await
        .map_err(|source| StartError::Bind {
            addr: core.config.metrics_listen,
            source,
        })?;
        tracing::info!(%metrics_addr, "metrics on http://{metrics_addr}/metrics");
        let (probe_stop, probe_stopped) = tokio::sync::oneshot::channel::<()>();
        if let Some(addr) = core.config.health_listen {
            let probe_addr = recvault_runtime::probe::serve(addr, health.clone(), async {
                let _ = probe_stopped.await;
            })
            .await
            .map_err(|source| StartError::Bind { addr, source })?;
            tracing::info!(%probe_addr, "plaintext health probe port (grpc.health.v1 only)");
        }
        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(recvault_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|e| StartError::Policy(format!("reflection: {e}")))?;
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(recvault_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()
            .map_err(|e| StartError::Policy(format!("reflection: {e}")))?;

        let handshakes = Arc::new(crate::refusals::HandshakeAudit::default());
        let window = core.config.audit.handshake_window();
        let handshake_flusher = handshakes.spawn_flusher(core.clone(), window);
        let sink = {
            let handshakes = handshakes.clone();
            Arc::new(move |peer, reason| handshakes.record(peer, reason))
        };
        let instance_id = core.config.instance();
        let database = match core.config.store_backend() {
            Ok(crate::config::StoreBackend::Sqlite(_)) => "sqlite",
            Ok(crate::config::StoreBackend::Postgres(_)) => "postgresql",
            Err(_) => "none",
        };
        tracing::info!(%local_addr, %instance_id, database, "vault serving (mTLS, TLS 1.3)");
        let served = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .layer(crate::refusals::AuditRefusalsLayer::new(core.clone()))
            .layer(recvault_runtime::oversized::OversizedLayer)
            .add_service(health)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(
                CredentialsServer::new(CredentialsService::new(core.clone()))
                    .max_decoding_message_size(max),
            )
            .add_service(
                LeasesServer::new(LeasesService::new(core.clone())).max_decoding_message_size(max),
            )
            .add_service(
                KeysServer::new(KeysService::new(core.clone())).max_decoding_message_size(max),
            )
            .add_service(
                AuditServer::new(AuditService::new(core.clone())).max_decoding_message_size(max),
            )
            .add_service(
                DataKeysServer::new(DataKeysService::new(core.clone()))
                    .max_decoding_message_size(max),
            )
            .serve_with_incoming_shutdown(
                tls::incoming(
                    listener,
                    tls,
                    tls::HandshakeRefusals::new(
                        core.metrics.registry.clone(),
                        "recvault_vault_tls_handshakes_refused_total",
                    )
                    .with_sink(sink),
                ),
                shutdown,
            )
            .await;
        handshake_flusher.abort();
        handshakes.flush(&core, window).await;
        served?;
        let _ = probe_stop.send(());
        tracing::info!("vault stopped");
        Ok(())
    }
}

/// Binds and serves: what `vaultd serve` runs.
pub async fn run(
    config: VaultConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), StartError> {
    bind(config).await?.serve(shutdown).await
}
