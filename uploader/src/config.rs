//! uploaderd configuration: a TOML file (every field documented in
//! `deploy/config/uploader.example.toml`) plus environment overrides for ports
//! and paths. Names certificate and key *files*, never values.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use recvault_runtime::config::{env_addr, read_toml, resolve_relative};
use recvault_runtime::{logging::LogFormat, tls::TlsFiles};
use serde::Deserialize;

use crate::credential::S3Credential;
use crate::destination::FsAllowedRoots;
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
    /// Job and destination database (SQLite), the embedded default: one
    /// uploader on one host. Env: `RECVAULT_UPLOADER_DATABASE`. Exactly one
    /// of this and `database_url_file`.
    #[serde(default)]
    pub database: Option<PathBuf>,
    /// A file (owner-only) holding a `postgresql://` URL: the job and
    /// destination database shared by several uploader replicas (the audit
    /// log lives there too). The password is read from this file only.
    /// Env: `RECVAULT_UPLOADER_DATABASE_URL_FILE`.
    #[serde(default)]
    pub database_url_file: Option<PathBuf>,
    /// This replica's name in job claims, job history and the audit log.
    /// Default: the host name. Env: `RECVAULT_UPLOADER_INSTANCE_ID`.
    #[serde(default)]
    pub instance_id: Option<String>,
    /// The uploader's audit log with `database` (SQLite, HMAC-chained, with
    /// `<file>.anchor` beside it); default `audit.db` beside `database`. Not
    /// used with `database_url_file`. Env: `RECVAULT_UPLOADER_AUDIT_DATABASE`.
    #[serde(default)]
    pub audit_database: Option<PathBuf>,
    /// The audit chain's key: a file of exactly 32 random bytes, mode 0600
    /// (create it with `uploaderd init-audit-key --file PATH`). Required; the
    /// uploader refuses to start without it. Env: `RECVAULT_UPLOADER_AUDIT_KEY_FILE`.
    pub audit_key_file: PathBuf,
    /// Backup store directory: recordings stay here until delivery is verified
    /// (the embedded default). Exactly one of `backup_dir` and
    /// `[backup_store]` is set. Env: `RECVAULT_UPLOADER_BACKUP_DIR`.
    #[serde(default)]
    pub backup_dir: Option<PathBuf>,
    /// The backup store in our own S3-compatible bucket instead of a local
    /// directory, so any replica can deliver, fetch and scrub any backup.
    #[serde(default)]
    pub backup_store: Option<BackupStoreSettings>,
    /// Encryption of the backup store (required).
    #[serde(default)]
    pub backup: BackupSettings,
    pub vault: VaultClientConfig,
    /// The policy file (same format as the vault's): which client identity
    /// holds which uploader role (`recorder`, `manager`, `auditor`), for which
    /// tenants. Re-read when it changes. Env: `RECVAULT_UPLOADER_POLICY_FILE`.
    pub policy_file: PathBuf,
    /// Replaced by `policy_file`; present only to name the replacement.
    #[serde(default)]
    access: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    pub delivery: DeliverySettings,
    /// Where destinations may point.
    #[serde(default)]
    pub destinations: DestinationSettings,
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

/// `[backup]`: how backups are encrypted at rest.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupSettings {
    /// The vault's wrapping public key file (`vaultd wrapping-key --config F
    /// --out P` writes it). Each backup's data key is sealed to it, so the
    /// uploader ingests while the vault is down. Required; a relative path is
    /// taken against the config file's directory.
    pub wrapping_key_file: Option<PathBuf>,
}

/// `[backup_store]`: backups in our own S3-compatible bucket (objects
/// `<prefix>/objects/<tenant_id>/<job_id>`, in the same encrypted format as
/// the directory store). Our infrastructure, not a customer's destination:
/// the credential comes from a file, never from the vault.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupStoreSettings {
    /// `http://host:port` or `https://host`, e.g. `https://s3.eu-west-1.amazonaws.com`.
    pub endpoint: String,
    /// SigV4 signing region; empty means `us-east-1`.
    #[serde(default)]
    pub region: String,
    /// The bucket (it must exist).
    pub bucket: String,
    /// Key prefix under which `objects/` lives; may be empty.
    #[serde(default)]
    pub prefix: String,
    /// Path-style requests (`endpoint/bucket/key`), as most S3-compatible
    /// servers want; false for virtual-hosted style (AWS).
    #[serde(default)]
    pub path_style: bool,
    /// JSON `{"access_key_id": "…", "secret_access_key": "…",
    /// "session_token": "…"}` (`session_token` optional), mode 0600. A
    /// relative path is taken against the config file's directory.
    pub credentials_file: PathBuf,
    /// Multipart uploads under `<prefix>/objects/` initiated longer ago than
    /// this are aborted at start-up and by the scrub (an ingest cut off by a
    /// crash). Other replicas' live ingests are younger, so keep it well above
    /// the longest ingest. Seconds, at least 3600; default 86400 (24 h).
    #[serde(default = "default_stale_upload_secs")]
    pub stale_upload_secs: u64,
}

/// What [`BackupStoreSettings::read_credential`] reads at most.
const CREDENTIALS_FILE_MAX: usize = 16 * 1024;

impl BackupStoreSettings {
    /// Checks the fields; the message names the first wrong one and what to set.
    pub fn validate(&self) -> Result<(), String> {
        let field = |name: &str, problem: &str| format!("[backup_store].{name} {problem}");
        if !(self.endpoint.starts_with("http://") || self.endpoint.starts_with("https://")) {
            return Err(field(
                "endpoint",
                "must be a URL starting with http:// or https://, e.g. \"https://s3.eu-west-1.amazonaws.com\"",
            ));
        }
        if self.bucket.is_empty()
            || self.bucket.contains('/')
            || self.bucket.contains(char::is_control)
        {
            return Err(field(
                "bucket",
                "must name an existing bucket (not empty, no '/'), e.g. \"recvault-backups\"",
            ));
        }
        crate::destination::check_prefix(self.prefix.trim_end_matches('/'))
            .map_err(|e| field("prefix", &format!("is not usable: {e}")))?;
        Ok(())
    }

    /// Reads `credentials_file`: owner-only (mode 0600 or stricter), one JSON
    /// credential. Errors name the file and what to do, never a value.
    pub fn read_credential(&self) -> Result<S3Credential, crate::backup::BackupError> {
        use recvault_runtime::secret::{PrivateFileError, read_private_file};
        let file = &self.credentials_file;
        let refuse = |message: String| {
            crate::backup::BackupError::Config(format!(
                "[backup_store].credentials_file {}: {message}",
                file.display()
            ))
        };
        let (secret, len) = read_private_file(file, CREDENTIALS_FILE_MAX).map_err(|e| match e {
            PrivateFileError::Io(e) => refuse(format!("cannot be read ({e})")),
            PrivateFileError::NotAFile => refuse("is not a regular file".into()),
            PrivateFileError::Permissions(mode) => refuse(format!(
                "has mode {mode:o}: it holds the backup store's secret access key, so only its \
                 owner may read it (chmod 600)"
            )),
        })?;
        if len > CREDENTIALS_FILE_MAX {
            return Err(refuse(format!(
                "is longer than {CREDENTIALS_FILE_MAX} bytes"
            )));
        }
        S3Credential::from_json(&secret.expose_secret()[..len]).map_err(|e| refuse(e.to_string()))
    }
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

/// Limits on the destinations managers may create.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DestinationSettings {
    /// Directories under which local-directory (`fs`) destinations may be
    /// created and written (the directory itself or anything below it, after
    /// symlinks). Empty (the default): every `fs` destination is refused.
    /// Relative entries are taken against the config file's directory.
    #[serde(default)]
    pub fs_allowed_roots: Vec<PathBuf>,
}

impl DestinationSettings {
    /// The allowed roots, as the destinations take them.
    pub fn fs_roots(&self) -> FsAllowedRoots {
        FsAllowedRoots::new(self.fs_allowed_roots.iter().cloned())
    }
}

/// Delivery workers and retries.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliverySettings {
    /// Deliveries in flight at once.
    pub workers: usize,
    /// Replaced by `retry_window_secs` and `max_doubtful_failures`; only
    /// read to refuse it with a message.
    #[serde(rename = "max_attempts")]
    pub replaced_max_attempts: Option<u32>,
    /// How long transient failures (the vault or the provider unreachable,
    /// 5xx, throttling, timeouts) are retried, from the job's first failed
    /// attempt. Then RETAINED.
    pub retry_window_secs: u64,
    /// Failed attempts whose error may be permanent (an unexpected 4xx, a
    /// copy that did not verify) before the job is RETAINED.
    pub max_doubtful_failures: u32,
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
    /// How long a replica's claim on a running job holds unless renewed
    /// (renewed every third of it while the attempt runs). After a replica
    /// dies, another takes its jobs over once this passed.
    pub claim_ttl_secs: u64,
}

impl Default for DeliverySettings {
    fn default() -> Self {
        Self {
            workers: 4,
            replaced_max_attempts: None,
            retry_window_secs: 6 * 3600,
            max_doubtful_failures: 5,
            retry_base_ms: 1000,
            retry_max_secs: 300,
            scrub_interval_secs: 3600,
            multipart_threshold_bytes: 16 * 1024 * 1024,
            part_size_bytes: 8 * 1024 * 1024,
            part_concurrency: 4,
            read_back_streams: 16,
            claim_ttl_secs: 30,
        }
    }
}

impl DeliverySettings {
    pub fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy {
            max_doubtful: self.max_doubtful_failures.max(1),
            window: Duration::from_secs(self.retry_window_secs),
            base: Duration::from_millis(self.retry_base_ms.max(1)),
            max: Duration::from_secs(self.retry_max_secs.max(1)),
        }
    }
}

/// `path` with symlinks resolved: the whole path if it exists, else its
/// nearest existing ancestor resolved and the rest appended.
fn resolved(path: &Path) -> PathBuf {
    let mut missing = Vec::new();
    let mut at = path;
    loop {
        if let Ok(real) = at.canonicalize() {
            return missing.iter().rev().fold(real, |p, part| p.join(part));
        }
        match (at.parent(), at.file_name()) {
            (Some(parent), Some(name)) => {
                missing.push(name.to_owned());
                at = parent;
            }
            _ => return path.to_owned(),
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
fn default_stale_upload_secs() -> u64 {
    24 * 3600
}

pub use recvault_runtime::config::ConfigError;

/// What to say when `[backup] wrapping_key_file` is not set.
pub const MISSING_WRAPPING_KEY: &str = "[backup] wrapping_key_file is required: the vault's \
    wrapping public key file, which `vaultd wrapping-key --config <vault config> --out <file>` \
    writes (backups are encrypted to it)";

impl UploaderConfig {
    /// Reads `path`, resolves relative paths against its directory, applies env overrides.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let mut config: Self = read_toml(path)?;
        if config.access.is_some() {
            return Err(ConfigError::Parse {
                path: path.to_owned(),
                message: "the [access] table was replaced by policy_file: move its identities \
                          into a policy file ([[grant]] identity, roles, tenants; see \
                          deploy/config/uploader-policy.example.toml) and set policy_file"
                    .into(),
            });
        }
        // An empty entry would silently become the config file's directory.
        if config
            .destinations
            .fs_allowed_roots
            .iter()
            .any(|r| r.as_os_str().is_empty())
        {
            return Err(ConfigError::Parse {
                path: path.to_owned(),
                message: "[destinations].fs_allowed_roots has an empty entry; list directories \
                          such as \"/srv/recordings\", or leave the list empty to refuse fs \
                          destinations"
                    .into(),
            });
        }
        resolve_relative(
            path,
            [
                &mut config.tls.cert,
                &mut config.tls.key,
                &mut config.tls.ca,
                &mut config.vault.tls.cert,
                &mut config.vault.tls.key,
                &mut config.vault.tls.ca,
                &mut config.policy_file,
                &mut config.audit_key_file,
            ]
            .into_iter()
            .chain(config.destinations.fs_allowed_roots.iter_mut())
            .chain(config.backup.wrapping_key_file.as_mut())
            .chain(config.database.as_mut())
            .chain(config.database_url_file.as_mut())
            .chain(config.backup_dir.as_mut())
            .chain(
                config
                    .backup_store
                    .as_mut()
                    .map(|s| &mut s.credentials_file),
            ),
        );
        if let Some(audit) = config.audit_database.as_mut() {
            resolve_relative(path, [audit]);
        }
        config.apply_env(|n| std::env::var(n).ok())?;
        let invalid = |message: String| ConfigError::Parse {
            path: path.to_owned(),
            message,
        };
        config.storage().map_err(invalid)?;
        if let Some(id) = &config.instance_id {
            recvault_runtime::config::check_instance_id(id).map_err(invalid)?;
        }
        if config.delivery.claim_ttl_secs < 3 {
            return Err(invalid(format!(
                "[delivery].claim_ttl_secs is {}: it must be at least 3 (a claim is renewed every \
                 third of it); 30 suits most deployments",
                config.delivery.claim_ttl_secs
            )));
        }
        if let Some(message) = config.backup_store_choice() {
            return Err(invalid(message));
        }
        if config.backup.wrapping_key_file.is_none() {
            return Err(ConfigError::Parse {
                path: path.to_owned(),
                message: MISSING_WRAPPING_KEY.to_owned(),
            });
        }
        if config.delivery.replaced_max_attempts.is_some() {
            return Err(ConfigError::Parse {
                path: path.to_owned(),
                message: "[delivery].max_attempts was replaced: transient failures (vault or \
                          provider unreachable, 5xx, timeouts) are now retried for \
                          retry_window_secs (default 21600, 6 h), and failures that may be \
                          permanent up to max_doubtful_failures times (default 5); remove \
                          max_attempts and set those instead"
                    .into(),
            });
        }
        if let Some(message) = config.fs_root_over_own_files() {
            return Err(ConfigError::Parse {
                path: path.to_owned(),
                message,
            });
        }
        Ok(config)
    }

    /// Exactly one backup store: `backup_dir` or `[backup_store]`, whose
    /// fields must be usable. The problem, if any.
    fn backup_store_choice(&self) -> Option<String> {
        match (&self.backup_dir, &self.backup_store) {
            (Some(_), Some(_)) => Some(
                "backup_dir and [backup_store] are both set; keep backups either in a local \
                 directory (backup_dir) or in an S3-compatible bucket ([backup_store]): remove one"
                    .into(),
            ),
            (None, None) => Some(
                "neither backup_dir nor [backup_store] is set; set backup_dir (a local \
                 directory, e.g. \"/var/lib/recvault/backups\") or a [backup_store] table (an \
                 S3-compatible bucket: endpoint, region, bucket, prefix, path_style, \
                 credentials_file)"
                    .into(),
            ),
            (None, Some(store)) => store.validate().err().or_else(|| {
                (store.stale_upload_secs < 3600).then(|| {
                    format!(
                        "[backup_store].stale_upload_secs is {}; it must be at least 3600 (1 h), \
                         or the multipart upload of another replica's ingest in progress could be \
                         aborted",
                        store.stale_upload_secs
                    )
                })
            }),
            (Some(_), None) => None,
        }
    }

    /// An `fs` destination writes files named by recorders. So no allowed
    /// root may hold a file of the uploader's own (its job store, audit log,
    /// policy, keys, certificates: a recording named `uploader-policy.toml`
    /// would replace the policy) or overlap the backup directory. Paths are
    /// compared resolved (symlinks followed where they exist).
    fn fs_root_over_own_files(&self) -> Option<String> {
        let audit = self.audit_database().unwrap_or_default();
        let database = self.database.clone().unwrap_or_default();
        let url_file = self.database_url_file.clone().unwrap_or_default();
        let files: [(&str, &Path); 11] = [
            ("database", &database),
            ("database_url_file", &url_file),
            ("audit_database", &audit),
            ("policy_file", &self.policy_file),
            ("audit_key_file", &self.audit_key_file),
            ("tls.cert", &self.tls.cert),
            ("tls.key", &self.tls.key),
            ("tls.ca", &self.tls.ca),
            ("vault.tls.cert", &self.vault.tls.cert),
            ("vault.tls.key", &self.vault.tls.key),
            ("vault.tls.ca", &self.vault.tls.ca),
        ];
        let wrapping = self.backup.wrapping_key_file.as_deref();
        let backups = self.backup_dir.as_deref().map(|dir| (dir, resolved(dir)));
        for root in &self.destinations.fs_allowed_roots {
            let root_resolved = resolved(root);
            let named = files
                .iter()
                .copied()
                .chain(wrapping.map(|w| ("backup.wrapping_key_file", w)))
                .filter(|(_, file)| !file.as_os_str().is_empty())
                .find(|(_, file)| resolved(file).starts_with(&root_resolved))
                .map(|(name, file)| format!("{name} ({})", file.display()));
            let named = named.or_else(|| {
                let (dir, backups) = backups.as_ref()?;
                (backups.starts_with(&root_resolved) || root_resolved.starts_with(backups))
                    .then(|| format!("backup_dir ({})", dir.display()))
            });
            if let Some(what) = named {
                return Some(format!(
                    "[destinations].fs_allowed_roots entry {} overlaps the uploader's own {what}: \
                     recordings delivered there could replace it. Choose a root that holds none \
                     of the uploader's files",
                    root.display()
                ));
            }
        }
        None
    }

    /// The audit log's SQLite file with `database`: `audit_database`, or
    /// `audit.db` beside `database`. `None` on PostgreSQL.
    pub fn audit_database(&self) -> Option<PathBuf> {
        let database = self.database.as_ref()?;
        Some(
            self.audit_database
                .clone()
                .unwrap_or_else(|| database.with_file_name("audit.db")),
        )
    }

    /// Where jobs and destinations are kept: exactly one of `database` and
    /// `database_url_file`, else why not.
    pub fn storage(&self) -> Result<crate::store::Storage, String> {
        use crate::store::Storage;
        match (&self.database, &self.database_url_file) {
            (Some(path), None) => Ok(Storage::Sqlite(path.clone())),
            (None, Some(url_file)) => Ok(Storage::Postgres(url_file.clone())),
            (Some(_), Some(_)) => Err("set one of database (SQLite file) and database_url_file \
                                       (PostgreSQL URL file), not both"
                .into()),
            (None, None) => Err("set database (a SQLite file, for one uploader) or \
                                 database_url_file (a file holding a postgresql:// URL, for \
                                 several replicas)"
                .into()),
        }
    }

    /// This replica's name: `instance_id`, else the host name, else `uploader`.
    pub fn instance(&self) -> String {
        recvault_runtime::config::instance_name(self.instance_id.as_deref(), "uploader")
    }

    /// Who the job store acts as.
    pub fn replica(&self) -> crate::jobs::Replica {
        crate::jobs::Replica {
            instance: self.instance(),
            claim_ttl: Duration::from_secs(self.delivery.claim_ttl_secs.max(3)),
        }
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
            (self.database, self.database_url_file) = (Some(PathBuf::from(v)), None);
        }
        if let Some(v) = get("RECVAULT_UPLOADER_DATABASE_URL_FILE") {
            (self.database, self.database_url_file) = (None, Some(PathBuf::from(v)));
        }
        if let Some(v) = get("RECVAULT_UPLOADER_INSTANCE_ID") {
            self.instance_id = Some(v);
        }
        if let Some(v) = get("RECVAULT_UPLOADER_BACKUP_DIR") {
            self.backup_dir = Some(v.into());
        }
        if let Some(v) = get("RECVAULT_UPLOADER_POLICY_FILE") {
            self.policy_file = v.into();
        }
        if let Some(v) = get("RECVAULT_UPLOADER_AUDIT_DATABASE") {
            self.audit_database = Some(v.into());
        }
        if let Some(v) = get("RECVAULT_UPLOADER_AUDIT_KEY_FILE") {
            self.audit_key_file = v.into();
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
    #![allow(clippy::unwrap_used)]
    use super::*;
    use recvault_runtime::policy::{Role, TenantScope};

    #[test]
    fn documented_example_config_parses() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/config/uploader.example.toml");
        let config = UploaderConfig::load(&path).expect("example parses");
        assert_eq!(
            config.delivery.retry_policy(),
            DeliverySettings::default().retry_policy()
        );
        assert_eq!(config.ingest_limits(), IngestLimits::default());
        let policy_path = path.with_file_name("uploader-policy.example.toml");
        let text = std::fs::read_to_string(&policy_path).expect("example policy");
        let policy = recvault_runtime::policy::Policy::parse(&text).expect("policy parses");
        let demo = "spiffe://recvault.local/manager-demo";
        assert!(policy.scope(demo, Role::Manager).covers("demo"));
        assert!(!policy.scope(demo, Role::Manager).covers("acme"));
        assert!(
            policy.scope("spiffe://recvault.local/recorder", Role::Recorder) == TenantScope::All
        );
        assert_eq!(
            config.destinations.fs_allowed_roots,
            [PathBuf::from("/srv/recordings")]
        );
        assert_eq!(
            config.backup.wrapping_key_file.as_deref(),
            Some(Path::new("/etc/recvault/uploader/backup-wrap.pub"))
        );
    }

    #[test]
    fn missing_wrapping_key_file_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let example =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/config/uploader.example.toml");
        let text = std::fs::read_to_string(example).expect("example");
        let path = dir.path().join("uploader.toml");
        let without: String = text
            .lines()
            .filter(|l| !l.starts_with("wrapping_key_file"))
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(&path, without).expect("write");
        let err = UploaderConfig::load(&path)
            .expect_err("refused")
            .to_string();
        assert!(
            err.contains("[backup] wrapping_key_file is required")
                && err.contains("vaultd wrapping-key"),
            "{err}"
        );
        std::fs::write(&path, text.replace("wrapping_key_file", "wrapping_key_fil"))
            .expect("write");
        let err = UploaderConfig::load(&path)
            .expect_err("refused")
            .to_string();
        assert!(err.contains("wrapping_key_fil"), "{err}");
    }

    fn load(text: &str) -> Result<UploaderConfig, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("uploader.toml");
        let minimal = "database = \"u.db\"\nbackup_dir = \"b\"\npolicy_file = \"p.toml\"\n\
                       audit_key_file = \"k\"\n\
                       [tls]\ncert = \"c\"\nkey = \"k\"\nca = \"a\"\n\
                       [vault]\nendpoint = \"127.0.0.1:1\"\n\
                       [vault.tls]\ncert = \"c\"\nkey = \"k\"\nca = \"a\"\n\
                       [backup]\nwrapping_key_file = \"w.pub\"\n";
        std::fs::write(&path, format!("{minimal}{text}")).unwrap();
        UploaderConfig::load(&path).map(|mut c| {
            // Relative to the config file's directory: make it comparable.
            for root in &mut c.destinations.fs_allowed_roots {
                if let Ok(rest) = root.strip_prefix(dir.path()) {
                    *root = Path::new("<config dir>").join(rest);
                }
            }
            c
        })
    }

    #[test]
    fn the_replaced_max_attempts_names_its_successors() {
        let err = load("[delivery]\nmax_attempts = 8\n")
            .unwrap_err()
            .to_string();
        for part in ["max_attempts", "retry_window_secs", "max_doubtful_failures"] {
            assert!(err.contains(part), "{err}");
        }
        let config =
            load("[delivery]\nretry_window_secs = 60\nmax_doubtful_failures = 2\n").unwrap();
        let policy = config.delivery.retry_policy();
        assert_eq!(
            (policy.window, policy.max_doubtful),
            (Duration::from_secs(60), 2)
        );
    }

    #[test]
    fn an_fs_root_over_the_uploaders_own_files_is_refused() {
        for (root, names) in [
            (".", "database"),
            ("b", "backup_dir"),
            ("b/inner", "backup_dir"),
            ("/", "database"),
        ] {
            let err = load(&format!(
                "[destinations]\nfs_allowed_roots = [\"{root}\"]\n"
            ))
            .unwrap_err()
            .to_string();
            assert!(
                err.contains("[destinations].fs_allowed_roots") && err.contains(names),
                "{root}: {err}"
            );
        }
        // A sibling directory of the uploader's files is fine.
        load("[destinations]\nfs_allowed_roots = [\"delivered\"]\n").unwrap();
    }

    #[test]
    fn fs_allowed_roots_default_to_none_and_resolve_like_other_paths() {
        let config = load("").unwrap();
        assert!(config.destinations.fs_allowed_roots.is_empty());
        assert!(config.destinations.fs_roots().is_empty());
        let config = load("[destinations]\nfs_allowed_roots = [\"/srv/a\", \"rel/b\"]\n").unwrap();
        assert_eq!(
            config.destinations.fs_allowed_roots,
            [PathBuf::from("/srv/a"), PathBuf::from("<config dir>/rel/b")]
        );
        let err = load("[destinations]\nfs_allowed_roots = [\"\"]\n").unwrap_err();
        assert!(
            err.to_string().contains("[destinations].fs_allowed_roots"),
            "{err}"
        );
        let err = load("[destinations]\nfs_allowed_root = [\"/srv\"]\n").unwrap_err();
        assert!(err.to_string().contains("fs_allowed_root"), "{err}");
    }

    #[test]
    fn the_replaced_access_table_names_policy_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let example =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/config/uploader.example.toml");
        let text = std::fs::read_to_string(example).expect("example");
        let path = dir.path().join("old.toml");
        std::fs::write(&path, format!("{text}\n[access]\nrecorder = [\"x\"]\n")).expect("write");
        let err = UploaderConfig::load(&path)
            .expect_err("refused")
            .to_string();
        assert!(err.contains("policy_file"), "{err}");
    }

    fn minimal(extra: &str) -> String {
        format!(
            "database = \"data/uploader.db\"\nbackup_dir = \"data/backups\"\npolicy_file = \"p.toml\"\n{extra}\
             [tls]\ncert = \"c\"\nkey = \"k\"\nca = \"a\"\n\
             [vault]\nendpoint = \"127.0.0.1:1\"\n[vault.tls]\ncert = \"c\"\nkey = \"k\"\nca = \"a\"\n\
             [backup]\nwrapping_key_file = \"w.pub\"\n"
        )
    }

    #[test]
    fn audit_settings_resolve_and_default_beside_the_database() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("uploader.toml");
        std::fs::write(&path, minimal("audit_key_file = \"keys/audit.key\"\n")).expect("write");
        let config = UploaderConfig::load(&path).expect("parses");
        assert_eq!(config.audit_key_file, dir.path().join("keys/audit.key"));
        assert_eq!(
            config.audit_database(),
            Some(dir.path().join("data/audit.db"))
        );

        std::fs::write(
            &path,
            minimal("audit_key_file = \"/k\"\naudit_database = \"logs/a.db\"\n"),
        )
        .expect("write");
        let mut config = UploaderConfig::load(&path).expect("parses");
        assert_eq!(config.audit_database(), Some(dir.path().join("logs/a.db")));
        config
            .apply_env(|n| match n {
                "RECVAULT_UPLOADER_AUDIT_KEY_FILE" => Some("/run/credentials/audit.key".into()),
                "RECVAULT_UPLOADER_AUDIT_DATABASE" => Some("/var/audit.db".into()),
                _ => None,
            })
            .expect("env");
        assert_eq!(
            config.audit_key_file,
            Path::new("/run/credentials/audit.key")
        );
        assert_eq!(
            config.audit_database().as_deref(),
            Some(Path::new("/var/audit.db"))
        );
    }

    fn store_table(credentials: &str) -> String {
        format!(
            "[backup_store]\nendpoint = \"http://127.0.0.1:9000\"\nbucket = \"b\"\n\
             prefix = \"team/\"\npath_style = true\ncredentials_file = \"{credentials}\"\n"
        )
    }

    #[test]
    fn exactly_one_of_backup_dir_and_backup_store() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("uploader.toml");
        let both = minimal("audit_key_file = \"k\"\n") + &store_table("creds.json");
        std::fs::write(&path, both).unwrap();
        let err = UploaderConfig::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("backup_dir and [backup_store] are both set")
                && err.contains("remove one"),
            "{err}"
        );
        let neither =
            minimal("audit_key_file = \"k\"\n").replace("backup_dir = \"data/backups\"\n", "");
        std::fs::write(&path, &neither).unwrap();
        let err = UploaderConfig::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("neither backup_dir nor [backup_store] is set"),
            "{err}"
        );
        // The store alone: relative credentials_file resolved, defaults kept.
        std::fs::write(&path, neither.clone() + &store_table("creds.json")).unwrap();
        let config = UploaderConfig::load(&path).unwrap();
        let store = config.backup_store.as_ref().unwrap();
        assert_eq!(store.credentials_file, dir.path().join("creds.json"));
        assert_eq!(store.stale_upload_secs, 86400);
        assert!(config.backup_dir.is_none());
        // Fields are checked by name.
        for (bad, field) in [
            (
                "endpoint = \"http://127.0.0.1:9000\"",
                "endpoint = \"127.0.0.1:9000\"",
            ),
            ("bucket = \"b\"", "bucket = \"\""),
            ("prefix = \"team/\"", "prefix = \"../x\""),
            (
                "path_style = true",
                "path_style = true\nstale_upload_secs = 60",
            ),
            ("path_style = true", "path_style = true\nbuckett = \"x\""),
        ] {
            let text = neither.clone() + &store_table("creds.json").replace(bad, field);
            std::fs::write(&path, text).unwrap();
            let err = UploaderConfig::load(&path).unwrap_err().to_string();
            let name = field.lines().last().unwrap().split(' ').next().unwrap();
            assert!(err.contains(name), "{field}: {err}");
        }
    }

    #[test]
    fn the_backup_store_credentials_file_must_be_owner_only() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("creds.json");
        let secret = "very-secret-backup-store-key";
        std::fs::write(
            &file,
            format!("{{\"access_key_id\": \"AKIAOURS\", \"secret_access_key\": \"{secret}\"}}"),
        )
        .unwrap();
        let settings = BackupStoreSettings {
            endpoint: "http://127.0.0.1:9000".into(),
            region: String::new(),
            bucket: "b".into(),
            prefix: String::new(),
            path_style: true,
            credentials_file: file.clone(),
            stale_upload_secs: 86400,
        };
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = settings.read_credential().unwrap_err().to_string();
        assert!(
            err.contains("[backup_store].credentials_file")
                && err.contains("mode 644")
                && err.contains("chmod 600"),
            "{err}"
        );
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let credential = settings.read_credential().unwrap();
        assert_eq!(credential.expose_secret_access_key(), secret);
        assert!(!format!("{credential:?} {settings:?}").contains(secret));
        std::fs::write(&file, format!("{{\"secret_access_key\": \"{secret}\"}}")).unwrap();
        let err = settings.read_credential().unwrap_err().to_string();
        assert!(
            err.contains("access_key_id") && !err.contains(secret),
            "{err}"
        );
    }

    #[test]
    fn audit_key_file_is_required_by_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("uploader.toml");
        std::fs::write(&path, minimal("")).expect("write");
        let err = UploaderConfig::load(&path)
            .expect_err("refused")
            .to_string();
        assert!(err.contains("audit_key_file"), "{err}");
    }
}
