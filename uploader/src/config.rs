//! uploaderd configuration: a TOML file (every field documented in
//! `deploy/config/uploader.example.toml`) plus environment overrides for ports
//! and paths. Names certificate and key *files*, never values.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use recvault_runtime::config::{env_addr, read_toml, resolve_relative};
use recvault_runtime::{logging::LogFormat, tls::TlsFiles};
use serde::Deserialize;

use crate::ingest::IngestLimits;
use crate::jobs::RetryPolicy;

/// The whole uploaderd configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UploaderConfig {
    /// gRPC API address (mTLS). Env: `RECVAULT_UPLOADER_LISTEN`.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Prometheus metrics over plain HTTP (`/metrics`); keep it on loopback or a
    /// scrape-only network. Env: `RECVAULT_UPLOADER_METRICS_LISTEN`.
    #[serde(default = "default_metrics_listen")]
    pub metrics_listen: SocketAddr,
    /// Optional plaintext port serving only `grpc.health.v1.Health`, for
    /// Kubernetes' native gRPC probes (which cannot present a client certificate).
    /// Env: `RECVAULT_UPLOADER_HEALTH_LISTEN`.
    #[serde(default)]
    pub health_listen: Option<SocketAddr>,
    /// Our server certificate/key and the CA that recorder and manager certificates chain to.
    pub tls: TlsFiles,
    /// Job and destination database (SQLite). Env: `RECVAULT_UPLOADER_DATABASE`.
    pub database: PathBuf,
    /// Backup store directory: recordings stay here until delivery is verified.
    /// Env: `RECVAULT_UPLOADER_BACKUP_DIR`.
    pub backup_dir: PathBuf,
    pub vault: VaultClientConfig,
    /// Which client identities hold which uploader role.
    pub access: Access,
    #[serde(default)]
    pub delivery: DeliverySettings,
    #[serde(default)]
    pub log_format: LogFormat,
    #[serde(default = "default_reload_secs")]
    pub reload_interval_secs: u64,
    /// Largest ingest chunk message, bytes.
    #[serde(default = "default_max_chunk")]
    pub max_chunk_bytes: usize,
    /// Largest recording accepted, bytes.
    #[serde(default = "default_max_recording")]
    pub max_recording_bytes: u64,
    /// An Upload stream that sends nothing for this long (no header, chunk,
    /// trailer or end of stream) fails with DEADLINE_EXCEEDED; its staging
    /// file is removed and no job is created. Seconds, at least 1.
    #[serde(default = "default_ingest_idle_timeout")]
    pub ingest_idle_timeout_secs: u64,
}

/// How the uploader reaches the vault (mTLS with the `uploader` identity).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaultClientConfig {
    /// `host:port` of the vault. Env: `RECVAULT_UPLOADER_VAULT_ENDPOINT`.
    pub endpoint: String,
    /// Name the vault's certificate must be valid for.
    #[serde(default = "default_server_name")]
    pub server_name: String,
    /// Our client certificate (URI SAN spiffe://…/uploader), key, and the vault's CA.
    pub tls: TlsFiles,
    /// Lease TTL asked for per delivery attempt.
    #[serde(default = "default_lease_ttl")]
    pub lease_ttl_secs: u32,
}

/// Identities per role. `recorder` may ingest; `manager` manages destinations and jobs.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Access {
    #[serde(default)]
    pub recorder: BTreeSet<String>,
    #[serde(default)]
    pub manager: BTreeSet<String>,
}

/// Delivery workers and retries.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliverySettings {
    /// Deliveries in flight at once.
    pub workers: usize,
    pub max_attempts: u32,
    pub retry_base_ms: u64,
    pub retry_max_secs: u64,
    /// Re-hash retained backups this often (0 disables the scrub).
    pub scrub_interval_secs: u64,
    /// S3: single PUT below this size, multipart above.
    pub multipart_threshold_bytes: u64,
    pub part_size_bytes: u64,
    pub part_concurrency: usize,
    /// S3 read-back verification: ranged GETs kept in flight.
    pub read_back_streams: usize,
}

impl Default for DeliverySettings {
    fn default() -> Self {
        Self {
            workers: 4,
            max_attempts: 8,
            retry_base_ms: 1000,
            retry_max_secs: 300,
            scrub_interval_secs: 3600,
            multipart_threshold_bytes: 16 * 1024 * 1024,
            part_size_bytes: 8 * 1024 * 1024,
            part_concurrency: 4,
            read_back_streams: 16,
        }
    }
}

impl DeliverySettings {
    pub fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy {
            max_attempts: self.max_attempts.max(1),
            base: Duration::from_millis(self.retry_base_ms.max(1)),
            max: Duration::from_secs(self.retry_max_secs.max(1)),
        }
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7444))
}
fn default_metrics_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9444))
}
fn default_server_name() -> String {
    "localhost".into()
}
fn default_lease_ttl() -> u32 {
    120
}
fn default_reload_secs() -> u64 {
    2
}
fn default_max_chunk() -> usize {
    4 * 1024 * 1024
}
fn default_max_recording() -> u64 {
    64 * 1024 * 1024 * 1024
}
fn default_ingest_idle_timeout() -> u64 {
    60
}

pub use recvault_runtime::config::ConfigError;

impl UploaderConfig {
    /// Reads `path`, resolves relative paths against its directory, applies env overrides.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let mut config: Self = read_toml(path)?;
        resolve_relative(
            path,
            [
                &mut config.tls.cert,
                &mut config.tls.key,
                &mut config.tls.ca,
                &mut config.vault.tls.cert,
                &mut config.vault.tls.key,
                &mut config.vault.tls.ca,
                &mut config.database,
                &mut config.backup_dir,
            ],
        );
        config.apply_env(|n| std::env::var(n).ok())?;
        Ok(config)
    }

    /// Applies `RECVAULT_UPLOADER_*` overrides.
    pub fn apply_env(
        &mut self,
        get: impl Fn(&'static str) -> Option<String>,
    ) -> Result<(), ConfigError> {
        if let Some(a) = env_addr(&get, "RECVAULT_UPLOADER_LISTEN", "127.0.0.1:7444")? {
            self.listen = a;
        }
        if let Some(a) = env_addr(&get, "RECVAULT_UPLOADER_METRICS_LISTEN", "127.0.0.1:9444")? {
            self.metrics_listen = a;
        }
        if let Some(a) = env_addr(&get, "RECVAULT_UPLOADER_HEALTH_LISTEN", "0.0.0.0:7454")? {
            self.health_listen = Some(a);
        }
        if let Some(v) = get("RECVAULT_UPLOADER_VAULT_ENDPOINT") {
            self.vault.endpoint = v;
        }
        if let Some(v) = get("RECVAULT_UPLOADER_DATABASE") {
            self.database = v.into();
        }
        if let Some(v) = get("RECVAULT_UPLOADER_BACKUP_DIR") {
            self.backup_dir = v.into();
        }
        Ok(())
    }

    pub fn reload_interval(&self) -> Duration {
        Duration::from_secs(self.reload_interval_secs.max(1))
    }

    /// The ingest limits: chunk and recording sizes, and the idle timeout.
    pub fn ingest_limits(&self) -> IngestLimits {
        IngestLimits {
            max_chunk_bytes: self.max_chunk_bytes,
            max_total_bytes: self.max_recording_bytes,
            idle_timeout: Duration::from_secs(self.ingest_idle_timeout_secs.max(1)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documented_example_config_parses() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/config/uploader.example.toml");
        let config = UploaderConfig::load(&path).expect("example parses");
        assert_eq!(
            config.delivery.max_attempts,
            DeliverySettings::default().max_attempts
        );
        assert_eq!(config.ingest_limits(), IngestLimits::default());
        assert!(
            config
                .access
                .recorder
                .contains("spiffe://recvault.local/recorder")
        );
    }
}
