//! vaultd configuration: a TOML file (every field documented in
//! `deploy/config/vault.example.toml`) plus environment overrides for ports
//! and paths. The config names key and certificate *files*, never values.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use recvault_runtime::config::{env_addr, read_toml, resolve_relative};
use recvault_runtime::{logging::LogFormat, tls::TlsFiles};
use serde::Deserialize;

/// The whole vaultd configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaultConfig {
    /// gRPC API address (mTLS). Env: `RECVAULT_VAULT_LISTEN`.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Prometheus metrics over plain HTTP (`/metrics`); keep it on loopback or
    /// a scrape-only network. Env: `RECVAULT_VAULT_METRICS_LISTEN`.
    #[serde(default = "default_metrics_listen")]
    pub metrics_listen: SocketAddr,
    /// Optional plaintext port serving only `grpc.health.v1.Health`, for
    /// Kubernetes' native gRPC probes. Env: `RECVAULT_VAULT_HEALTH_LISTEN`.
    #[serde(default)]
    pub health_listen: Option<SocketAddr>,
    /// Server certificate, key and the CA that client certificates must chain to.
    pub tls: TlsFiles,
    /// The root master key file (64 hex chars, mode 0600). Env: `RECVAULT_VAULT_MASTER_KEY_FILE`.
    pub master_key_file: PathBuf,
    /// Credential database (SQLite), the embedded default. Env:
    /// `RECVAULT_VAULT_DATABASE`. Exactly one of this and `database_url_file`.
    #[serde(default)]
    pub database: Option<PathBuf>,
    /// A file (owner-only) holding a `postgresql://` URL: the credential
    /// database shared by several vault replicas. The password is read from
    /// this file only. Env: `RECVAULT_VAULT_DATABASE_URL_FILE`.
    #[serde(default)]
    pub database_url_file: Option<PathBuf>,
    /// Tells replicas on one database apart (audit chains, leases). Default:
    /// the host name. Env: `RECVAULT_VAULT_INSTANCE_ID`.
    #[serde(default)]
    pub instance_id: Option<String>,
    /// Audit log database (SQLite, hash-chained), required with `database`.
    /// With `database_url_file` the audit log lives in that PostgreSQL
    /// database and this is not used. Env: `RECVAULT_VAULT_AUDIT_DATABASE`.
    #[serde(default)]
    pub audit_database: PathBuf,
    /// Identity → role grants. Env: `RECVAULT_VAULT_POLICY_FILE`.
    pub policy_file: PathBuf,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub leases: LeaseSettings,
    #[serde(default)]
    pub audit: AuditSettings,
    #[serde(default)]
    pub secrets: SecretsSettings,
    #[serde(default)]
    pub log_format: LogFormat,
    /// How often certificate, key, CA and policy files are checked for changes.
    #[serde(default = "default_reload_secs")]
    pub reload_interval_secs: u64,
}

/// The credential database a config names.
#[derive(Debug, Clone, Copy)]
pub enum StoreBackend<'a> {
    /// A SQLite file (one vault).
    Sqlite(&'a Path),
    /// A file holding a `postgresql://` URL (several replicas).
    Postgres(&'a Path),
}

/// Size limits on requests and secrets.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Default maximum characters per credential secret (per-tenant override: `SetTenantLimit`).
    pub max_secret_chars: u32,
    /// Largest tenant override `SetTenantLimit` accepts.
    pub max_tenant_secret_chars: u32,
    /// Largest gRPC request message, in bytes.
    pub max_request_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_secret_chars: 5000,
            max_tenant_secret_chars: 1_000_000,
            max_request_bytes: 64 * 1024,
        }
    }
}

/// Lease lifetimes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LeaseSettings {
    /// TTL used when a request asks for 0.
    pub default_ttl_secs: u32,
    /// Cap on any requested TTL.
    pub max_ttl_secs: u32,
    /// Most leases alive at once; beyond it AcquireLease answers RESOURCE_EXHAUSTED.
    pub max_active: usize,
}

impl Default for LeaseSettings {
    fn default() -> Self {
        Self {
            default_ttl_secs: 60,
            max_ttl_secs: 300,
            max_active: 100_000,
        }
    }
}

/// How secrets may travel.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecretsSettings {
    /// Accept `PutCredential.secret` and answer `AcquireLease` without a
    /// `recipient_public_key` in clear, for grpcurl debugging. Off by default
    /// and in production: then only sealed secrets cross gRPC, HTTP/2 and TLS.
    pub allow_plaintext: bool,
}

/// Audit log settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditSettings {
    /// Refused TLS handshakes are audited as one event per peer address and
    /// reason per window of this many seconds (see `tls/Handshake` events).
    pub handshake_window_secs: u64,
}

impl Default for AuditSettings {
    fn default() -> Self {
        Self {
            handshake_window_secs: 10,
        }
    }
}

impl AuditSettings {
    /// The aggregation window of refused handshakes (at least 1 s).
    pub fn handshake_window(&self) -> Duration {
        Duration::from_secs(self.handshake_window_secs.max(1))
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7443))
}

fn default_metrics_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9443))
}

/// The metrics port that goes with an API address in generated configs: the
/// default 9443 beside the default API port 7443; otherwise (tests, a second
/// instance on one host) a port picked by the OS, which vaultd logs at start-up.
pub fn metrics_listen_for(listen: SocketAddr) -> SocketAddr {
    if listen.port() == default_listen().port() {
        default_metrics_listen()
    } else {
        SocketAddr::from(([127, 0, 0, 1], 0))
    }
}

fn default_reload_secs() -> u64 {
    2
}

pub use recvault_runtime::config::ConfigError;

impl VaultConfig {
    /// Reads `path`, resolves relative paths against the file's directory, then
    /// applies environment overrides.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let mut config: Self = read_toml(path)?;
        resolve_relative(
            path,
            [
                &mut config.tls.cert,
                &mut config.tls.key,
                &mut config.tls.ca,
                &mut config.master_key_file,
                &mut config.audit_database,
                &mut config.policy_file,
            ]
            .into_iter()
            .chain(config.database.as_mut())
            .chain(config.database_url_file.as_mut()),
        );
        config.apply_env(|name| std::env::var(name).ok())?;
        config.validate().map_err(|message| ConfigError::Parse {
            path: path.to_owned(),
            message,
        })?;
        Ok(config)
    }

    /// Applies `RECVAULT_VAULT_*` overrides (ports and paths).
    pub fn apply_env(
        &mut self,
        get: impl Fn(&'static str) -> Option<String>,
    ) -> Result<(), ConfigError> {
        if let Some(a) = env_addr(&get, "RECVAULT_VAULT_LISTEN", "127.0.0.1:7443")? {
            self.listen = a;
        }
        if let Some(a) = env_addr(&get, "RECVAULT_VAULT_METRICS_LISTEN", "127.0.0.1:9443")? {
            self.metrics_listen = a;
        }
        if let Some(a) = env_addr(&get, "RECVAULT_VAULT_HEALTH_LISTEN", "0.0.0.0:7453")? {
            self.health_listen = Some(a);
        }
        if let Some(v) = get("RECVAULT_VAULT_DATABASE") {
            (self.database, self.database_url_file) = (Some(PathBuf::from(v)), None);
        }
        if let Some(v) = get("RECVAULT_VAULT_DATABASE_URL_FILE") {
            (self.database, self.database_url_file) = (None, Some(PathBuf::from(v)));
        }
        if let Some(v) = get("RECVAULT_VAULT_INSTANCE_ID") {
            self.instance_id = Some(v);
        }
        let paths: [(&'static str, &mut PathBuf); 4] = [
            ("RECVAULT_VAULT_MASTER_KEY_FILE", &mut self.master_key_file),
            ("RECVAULT_VAULT_AUDIT_DATABASE", &mut self.audit_database),
            ("RECVAULT_VAULT_POLICY_FILE", &mut self.policy_file),
            ("RECVAULT_VAULT_TLS_CERT", &mut self.tls.cert),
        ];
        for (name, slot) in paths {
            if let Some(v) = get(name) {
                *slot = PathBuf::from(v);
            }
        }
        if let Some(v) = get("RECVAULT_VAULT_TLS_KEY") {
            self.tls.key = PathBuf::from(v);
        }
        if let Some(v) = get("RECVAULT_VAULT_TLS_CA") {
            self.tls.ca = PathBuf::from(v);
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), String> {
        if matches!(self.store_backend()?, StoreBackend::Sqlite(_))
            && self.audit_database.as_os_str().is_empty()
        {
            return Err(
                "set audit_database (the SQLite audit log) beside database; \
                        with database_url_file the audit log lives in PostgreSQL"
                    .into(),
            );
        }
        if let Some(id) = &self.instance_id {
            recvault_runtime::config::check_instance_id(id)?;
        }
        let l = &self.leases;
        if l.max_ttl_secs == 0 || l.default_ttl_secs == 0 || l.default_ttl_secs > l.max_ttl_secs {
            return Err(format!(
                "leases.default_ttl_secs ({}) must be between 1 and leases.max_ttl_secs ({})",
                l.default_ttl_secs, l.max_ttl_secs
            ));
        }
        if self.limits.max_secret_chars == 0 {
            return Err("limits.max_secret_chars must be at least 1".into());
        }
        if self.limits.max_request_bytes < 1024 {
            return Err("limits.max_request_bytes must be at least 1024".into());
        }
        Ok(())
    }

    /// Which credential database the config names: exactly one of
    /// `database` and `database_url_file`, else why not.
    pub fn store_backend(&self) -> Result<StoreBackend<'_>, String> {
        match (&self.database, &self.database_url_file) {
            (Some(path), None) => Ok(StoreBackend::Sqlite(path)),
            (None, Some(url_file)) => Ok(StoreBackend::Postgres(url_file)),
            (Some(_), Some(_)) => Err("set one of database (SQLite file) and \
                                       database_url_file (PostgreSQL URL file), not both"
                .into()),
            (None, None) => Err("set database (a SQLite file) or database_url_file (a \
                                 file holding a postgresql:// URL)"
                .into()),
        }
    }

    /// This replica's name: `instance_id` when set, else the host name (a
    /// pod's name on Kubernetes), cut to the `instance_id` rules, else
    /// `vault`. The audit log records it with every event on PostgreSQL.
    pub fn instance(&self) -> String {
        recvault_runtime::config::instance_name(self.instance_id.as_deref(), "vault")
    }

    /// How often watched files are checked.
    pub fn reload_interval(&self) -> Duration {
        Duration::from_secs(self.reload_interval_secs.max(1))
    }

    /// A config for a data directory laid out by `vaultd init` (used by `init`,
    /// the dev runner and tests).
    pub fn for_data_dir(data_dir: &Path, certs_dir: &Path, listen: SocketAddr) -> Self {
        Self {
            listen,
            metrics_listen: metrics_listen_for(listen),
            health_listen: None,
            tls: recvault_runtime::devcerts::files(certs_dir, "vault"),
            master_key_file: data_dir.join("master.key"),
            database: Some(data_dir.join("vault.db")),
            database_url_file: None,
            instance_id: None,
            audit_database: data_dir.join("audit.db"),
            policy_file: data_dir.join("policy.toml"),
            limits: Limits::default(),
            leases: LeaseSettings::default(),
            audit: AuditSettings::default(),
            secrets: SecretsSettings::default(),
            log_format: LogFormat::Text,
            reload_interval_secs: default_reload_secs(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy/config")
            .join(name)
    }

    #[test]
    fn documented_example_config_parses_with_defaults_spelled_out() {
        let config = VaultConfig::load(&example("vault.example.toml")).expect("example parses");
        assert_eq!(
            config.limits.max_secret_chars,
            Limits::default().max_secret_chars
        );
        assert_eq!(config.leases.max_ttl_secs, 300);
        assert_eq!(config.limits.max_request_bytes, 64 * 1024);
    }

    #[test]
    fn example_policy_parses() {
        let text = std::fs::read_to_string(example("vault-policy.example.toml")).expect("read");
        let policy = crate::policy::Policy::parse(&text).expect("policy parses");
        assert_eq!(policy.grants.len(), 4);
    }

    #[test]
    fn env_overrides_ports_and_paths_and_names_bad_values() {
        let mut config =
            VaultConfig::for_data_dir(Path::new("/d"), Path::new("/c"), default_listen());
        config
            .apply_env(|n| match n {
                "RECVAULT_VAULT_LISTEN" => Some("127.0.0.1:9999".into()),
                "RECVAULT_VAULT_DATABASE" => Some("/x/vault.db".into()),
                _ => None,
            })
            .expect("valid overrides");
        assert_eq!(config.listen.port(), 9999);
        assert_eq!(config.database, Some(PathBuf::from("/x/vault.db")));
        let err = config
            .apply_env(|n| (n == "RECVAULT_VAULT_LISTEN").then(|| "nope".into()))
            .expect_err("invalid listen");
        assert!(err.to_string().contains("RECVAULT_VAULT_LISTEN"));
    }

    #[test]
    fn exactly_one_credential_database_and_a_sane_instance_id() {
        let mut config =
            VaultConfig::for_data_dir(Path::new("/d"), Path::new("/c"), default_listen());
        assert!(matches!(
            config.store_backend(),
            Ok(StoreBackend::Sqlite(_))
        ));
        config.database_url_file = Some("/etc/recvault/db.url".into());
        let both = config.validate().expect_err("both set");
        assert!(
            both.contains("database (SQLite file) and database_url_file"),
            "{both}"
        );
        config.database = None;
        assert!(matches!(
            config.store_backend(),
            Ok(StoreBackend::Postgres(_))
        ));
        config.validate().expect("the URL file alone");
        // The audit log then lives in PostgreSQL: no audit_database needed,
        // but SQLite needs one.
        config.audit_database = PathBuf::new();
        config
            .validate()
            .expect("PostgreSQL without audit_database");
        config.database = Some("/d/vault.db".into());
        config.database_url_file = None;
        let no_audit = config
            .validate()
            .expect_err("SQLite without audit_database");
        assert!(no_audit.contains("set audit_database"), "{no_audit}");
        config.audit_database = "/d/audit.db".into();
        config.database = None;
        let neither = config.validate().expect_err("neither set");
        assert!(
            neither.contains("database") && neither.contains("database_url_file"),
            "{neither}"
        );

        // The environment picks one and drops the other.
        config
            .apply_env(|n| (n == "RECVAULT_VAULT_DATABASE_URL_FILE").then(|| "/run/db.url".into()))
            .expect("valid override");
        assert_eq!(config.database, None);
        config.validate().expect("one database after the override");

        for bad in ["", "vault 0", "vault/0", &"x".repeat(65)] {
            config.instance_id = Some(bad.to_owned());
            let err = config.validate().expect_err(bad);
            assert!(err.contains("instance_id"), "{err}");
        }
        config.instance_id = Some("vault-0.eu_1".into());
        config.validate().expect("a sane instance_id");
    }

    #[test]
    fn unknown_fields_are_refused_by_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("v.toml");
        std::fs::write(&path, "master_key_fil = \"x\"\n").expect("write");
        let err = VaultConfig::load(&path)
            .expect_err("typo refused")
            .to_string();
        assert!(err.contains("master_key_fil"), "{err}");
    }
}
