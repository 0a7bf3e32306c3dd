//! Assembles and runs the uploader: stores, the vault lease client, the
//! delivery worker, the scrub loop, and the gRPC services over mTLS.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use recvault_proto::uploader::v1::{
    destinations_server::DestinationsServer, jobs_server::JobsServer,
    recordings_server::RecordingsServer,
};
use recvault_runtime::tls::{self, ReloadingServerTls};
use tokio::{net::TcpListener, sync::Notify};

use crate::{
    backup::BackupStore,
    config::UploaderConfig,
    destination::S3Options,
    destination_store::DestinationStore,
    jobs::JobStore,
    lease::VaultLeases,
    metrics::UploaderMetrics,
    service::{
        Shared, destinations::DestinationsService, jobs::JobsService, recordings::RecordingsService,
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
    #[error("job store: {0}")]
    Jobs(#[from] crate::jobs::JobStoreError),
    #[error("destination store {path}: {source}")]
    Destinations {
        path: String,
        source: rusqlite::Error,
    },
    #[error("cannot listen on {addr}: {source}; is another process using the port?")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
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

/// Opens the stores and binds the port.
pub async fn bind(config: UploaderConfig) -> Result<Bound, StartError> {
    let tls = ReloadingServerTls::load(config.tls.clone())?;
    if let Some(dir) = config.database.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let jobs = JobStore::open(&config.database)?;
    let destinations = Arc::new(DestinationStore::open(&config.database).map_err(|source| {
        StartError::Destinations {
            path: config.database.display().to_string(),
            source,
        }
    })?);
    let backups = BackupStore::open(&config.backup_dir)?;
    let vault = VaultLeases::new(&config.vault)?;
    let d = &config.delivery;
    let s3 = S3Options {
        multipart_threshold: d.multipart_threshold_bytes,
        part_size: d.part_size_bytes,
        concurrency: d.part_concurrency.max(1),
        read_back_streams: d.read_back_streams.max(1),
        ..S3Options::default()
    };
    let wake = Arc::new(Notify::new());
    let metrics = UploaderMetrics::new();
    let shared = Arc::new(Shared {
        jobs: jobs.clone(),
        backups: backups.clone(),
        destinations: destinations.clone(),
        vault: vault.clone(),
        access: config.access.clone(),
        ingest_limits: config.ingest_limits(),
        s3: s3.clone(),
        wake: wake.clone(),
        metrics: metrics.clone(),
    });
    let worker = Arc::new(Worker {
        jobs,
        backups,
        destinations,
        vault,
        retry: d.retry_policy(),
        s3,
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
            .serve_with_incoming_shutdown(tls::incoming(listener, tls), shutdown)
            .await;
        let _ = stop_tx.send(true);
        let _ = worker_task.await;
        served?;
        tracing::info!("uploader stopped");
        Ok(())
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
