//! Assembles and runs the uploader: stores, its audit log, the vault lease
//! client, the delivery worker, the scrub loop, and the gRPC services over mTLS.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use recvault_audit::{AuditKey, AuditLog, AuditStorage, GroupCommitOptions};
use recvault_proto::uploader::v1::{
    audit_server::AuditServer, destinations_server::DestinationsServer, jobs_server::JobsServer,
    recordings_server::RecordingsServer,
};
use recvault_runtime::{
    policy::PolicyFile,
    tls::{self, ReloadingServerTls},
};
use tokio::{net::TcpListener, sync::Notify};

use crate::{
    backup::{BackupStore, wrapping::WrappingKey},
    config::UploaderConfig,
    destination::{FsAllowedRoots, S3Options},
    destination_store::DestinationStore,
    jobs::JobStore,
    lease::VaultLeases,
    metrics::UploaderMetrics,
    service::{
        Shared, audit::AuditService, destinations::DestinationsService, jobs::JobsService,
        recordings::RecordingsService,
    },
    worker::Worker,
};

/// Start-up failures, each naming what to fix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    #[error("{0}")]
    Tls(#[from] tls::TlsError),
    #[error("backup store: {0}")]
    Backup(#[from] crate::backup::BackupError),
    #[error("{0}")]
    WrappingKey(#[from] crate::backup::wrapping::WrappingKeyError),
    #[error("{}", crate::config::MISSING_WRAPPING_KEY)]
    NoWrappingKey,
    #[error("job store: {0}")]
    Jobs(#[from] crate::jobs::JobStoreError),
    #[error("audit_key_file: {0}")]
    AuditKey(#[from] recvault_audit::KeyFileError),
    #[error("audit log ({path}): {source}")]
    Audit {
        path: String,
        source: recvault_audit::AuditError,
    },
    #[error(
        "audit_database and database are both {0}; give the audit log a file of its own (or leave audit_database unset for audit.db beside database)"
    )]
    AuditDatabaseShared(String),
    #[error("{0}")]
    Config(String),
    #[error("cannot listen on {addr}: {source}; is another process using the port?")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// The policy file is missing or invalid (the message names the file and the problem).
    #[error("policy_file: {0}")]
    Policy(String),
    #[error("reflection: {0}")]
    Reflection(String),
    #[error("gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// A bound, not yet serving uploader.
#[derive(Debug)]
pub struct Bound {
    pub shared: Arc<Shared>,
    pub worker: Arc<Worker>,
    pub tls: Arc<ReloadingServerTls>,
    pub listener: TcpListener,
    pub local_addr: SocketAddr,
    pub config: UploaderConfig,
}

/// Where the audit log lives: in the shared PostgreSQL database with
/// `database_url_file` (one chain for every replica), else its own SQLite
/// file beside `database`.
pub fn audit_storage(config: &UploaderConfig) -> Result<AuditStorage, StartError> {
    match (config.audit_database(), &config.database_url_file) {
        (Some(file), _) => {
            if Some(&file) == config.database.as_ref() {
                return Err(StartError::AuditDatabaseShared(file.display().to_string()));
            }
            if let Some(dir) = file.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            Ok(AuditStorage::Sqlite(file))
        }
        (None, Some(url_file)) => Ok(AuditStorage::Postgres(Box::new(
            recvault_pg::PgTarget::from_url_file(url_file, "recvault-uploader")
                .map_err(|e| StartError::Config(e.to_string()))?,
        ))),
        (None, None) => Err(StartError::Config(
            "set database or database_url_file".to_owned(),
        )),
    }
}

/// Opens the stores and binds the port.
pub async fn bind(config: UploaderConfig) -> Result<Bound, StartError> {
    let tls = ReloadingServerTls::load(config.tls.clone())?;
    let storage = config.storage().map_err(StartError::Config)?;
    let instance = config.instance();
    if let Some(dir) = config.database.as_deref().and_then(std::path::Path::parent) {
        let _ = std::fs::create_dir_all(dir);
    }
    // The audit key first: without it nothing may be served (every call is
    // audited), so a missing or loose key file stops the start here.
    let audit_key = AuditKey::load_file(&config.audit_key_file)?;
    let audit_storage = audit_storage(&config)?;
    let audit_location = audit_storage.describe();
    // Blocking opens (a SQLite migration, PostgreSQL connections whose
    // client runs a runtime of its own) run off the async workers.
    let audit = {
        let instance = instance.clone();
        tokio::task::spawn_blocking(move || {
            AuditLog::open_in(
                audit_storage,
                &instance,
                audit_key,
                GroupCommitOptions::default(),
            )
        })
        .await
        .map_err(|e| StartError::Config(format!("opening the audit log failed: {e}")))?
        .map(Arc::new)
        .map_err(|source| StartError::Audit {
            path: audit_location,
            source,
        })?
    };
    let stores = {
        let (storage, instance) = (storage.clone(), instance.clone());
        tokio::task::spawn_blocking(move || crate::store::open(&storage, &instance))
            .await
            .map_err(|e| StartError::Config(format!("opening the job store failed: {e}")))??
    };
    let jobs = JobStore::new(stores.jobs, config.replica())?;
    let destinations = Arc::new(DestinationStore::new(stores.destinations));
    tracing::info!(store = %storage.display(), %instance, claim_ttl_secs = config.delivery.claim_ttl_secs, "job store open");
    let wrapping_key_file = config
        .backup
        .wrapping_key_file
        .as_deref()
        .ok_or(StartError::NoWrappingKey)?;
    let wrapping = WrappingKey::load(wrapping_key_file)?;
    tracing::info!(key_version = wrapping.version(), file = %wrapping_key_file.display(), "backups are encrypted to the vault's wrapping key");
    let backups = BackupStore::from_config(
        config.backup_dir.as_deref(),
        config.backup_store.as_ref(),
        wrapping,
    )
    .await?;
    tracing::info!(store = %backups.describe(), "backup store");
    let vault = VaultLeases::new(&config.vault)?;
    let policy = PolicyFile::load(&config.policy_file).map_err(StartError::Policy)?;
    let d = &config.delivery;
    let s3 = S3Options {
        multipart_threshold: d.multipart_threshold_bytes,
        part_size: d.part_size_bytes,
        concurrency: d.part_concurrency.max(1),
        read_back_streams: d.read_back_streams.max(1),
        ..S3Options::default()
    };
    let fs_roots = config.destinations.fs_roots();
    log_fs_roots(&fs_roots);
    let wake = Arc::new(Notify::new());
    let metrics = UploaderMetrics::new();
    let shared = Arc::new(Shared {
        jobs: jobs.clone(),
        backups: backups.clone(),
        destinations: destinations.clone(),
        vault: vault.clone(),
        policy: policy.clone(),
        ingest_limits: config.ingest_limits(),
        s3: s3.clone(),
        fs_roots: fs_roots.clone(),
        wake: wake.clone(),
        metrics: metrics.clone(),
        audit,
    });
    let worker = Arc::new(Worker {
        jobs,
        backups,
        destinations,
        vault,
        retry: d.retry_policy(),
        s3,
        fs_roots,
        concurrency: d.workers,
        wake,
        metrics,
    });
    let addr = config.listen;
    let (listener, local_addr) = tls::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })?;
    Ok(Bound {
        shared,
        worker,
        tls,
        listener,
        local_addr,
        config,
    })
}

impl Bound {
    /// Serves until `shutdown` completes; the worker and scrub stop with it.
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), StartError> {
        let Bound {
            shared,
            worker,
            tls,
            listener,
            local_addr,
            config,
        } = self;
        let _reloader = tls.spawn_reloader(config.reload_interval());
        let _policy_reloader = shared.policy.spawn_reloader(config.reload_interval());
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let stopped = move || {
            let mut rx = stop_rx.clone();
            async move {
                let _ = rx.wait_for(|s| *s).await;
            }
        };
        let worker_task = tokio::spawn(worker.clone().run(stopped()));
        if config.delivery.scrub_interval_secs > 0 {
            tokio::spawn(scrub_loop(
                shared.clone(),
                Duration::from_secs(config.delivery.scrub_interval_secs),
                stopped(),
            ));
        }
        let metrics_addr = recvault_runtime::metrics::serve(
            config.metrics_listen,
            shared.metrics.registry.clone(),
        )
        .await
        .map_err(|source| StartError::Bind {
            addr: config.metrics_listen,
            source,
        })?;
        let _gauges = shared
            .metrics
            .spawn_job_gauges(shared.jobs.clone(), Duration::from_secs(5));
        tracing::info!(%metrics_addr, "metrics on http://{metrics_addr}/metrics");
        let (health_reporter, health) = tonic_health::server::health_reporter();
        for name in [
            "recvault.uploader.v1.Recordings",
            "recvault.uploader.v1.Destinations",
            "recvault.uploader.v1.Jobs",
            "recvault.uploader.v1.Audit",
            "",
        ] {
            health_reporter
                .set_service_status(name, tonic_health::ServingStatus::Serving)
                .await;
        }
        if let Some(addr) = config.health_listen {
            let probe_addr = recvault_runtime::probe::serve(addr, health.clone(), stopped())
                .await
                .map_err(|source| StartError::Bind { addr, source })?;
            tracing::info!(%probe_addr, "plaintext health probe port (grpc.health.v1 only)");
        }
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(recvault_proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let reflection_v1 = reflection()
            .build_v1()
            .map_err(|e| StartError::Reflection(e.to_string()))?;
        let reflection_v1alpha = reflection()
            .build_v1alpha()
            .map_err(|e| StartError::Reflection(e.to_string()))?;
        let max_message = config.max_chunk_bytes + 64 * 1024;
        tracing::info!(%local_addr, "uploader serving (mTLS, TLS 1.3)");
        let served = tonic::transport::Server::builder()
            .layer(crate::activity::BodyActivityLayer)
            .layer(recvault_runtime::oversized::OversizedLayer)
            .add_service(health)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(
                RecordingsServer::new(RecordingsService::new(shared.clone()))
                    .max_decoding_message_size(max_message),
            )
            .add_service(DestinationsServer::new(DestinationsService::new(
                shared.clone(),
            )))
            .add_service(JobsServer::new(JobsService::new(shared.clone())))
            .add_service(AuditServer::new(AuditService::new(shared.clone())))
            .serve_with_incoming_shutdown(
                tls::incoming(
                    listener,
                    tls,
                    tls::HandshakeRefusals::new(
                        shared.metrics.registry.clone(),
                        "recvault_uploader_tls_handshakes_refused_total",
                    ),
                ),
                shutdown,
            )
            .await;
        let _ = stop_tx.send(true);
        let _ = worker_task.await;
        served?;
        tracing::info!("uploader stopped");
        Ok(())
    }
}

/// Says at start-up which directories `fs` destinations may use, and which
/// configured roots cannot work (they allow nothing until they exist).
fn log_fs_roots(roots: &FsAllowedRoots) {
    if roots.is_empty() {
        tracing::info!(
            "local-directory (fs) destinations are refused: [destinations].fs_allowed_roots is empty"
        );
        return;
    }
    tracing::info!(fs_allowed_roots = %roots, "local-directory (fs) destinations allowed under these roots");
    for root in roots.as_slice() {
        if !root.is_dir() {
            tracing::warn!(root = %root.display(), "[destinations].fs_allowed_roots entry is not an existing directory; it allows nothing until it is created");
        }
    }
}

/// Re-hashes retained backups every `interval` (first pass one interval after
/// start), counting what it finds.
async fn scrub_loop(shared: Arc<Shared>, interval: Duration, shutdown: impl Future<Output = ()>) {
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => return,
            () = tokio::time::sleep(interval) => {}
        }
        match crate::scrub::scrub_once(&shared.backups, &shared.jobs).await {
            Ok(report) => {
                shared.metrics.scrub_checked.add(report.checked);
                shared.metrics.scrub_corrupt.add(report.corrupt);
                tracing::info!(
                    checked = report.checked,
                    corrupt = report.corrupt,
                    missing = report.missing,
                    "scrub finished"
                );
            }
            Err(error) => tracing::error!(%error, "scrub failed"),
        }
    }
}

/// Binds and serves: what `uploaderd serve` runs.
pub async fn run(
    config: UploaderConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), StartError> {
    bind(config).await?.serve(shutdown).await
}
