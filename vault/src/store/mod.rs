//! The vault's stores, one trait per concern, one module per backend:
//!
//! | trait | what it keeps |
//! |---|---|
//! | [`CredentialStore`] | credential metadata and sealed secrets (never plaintext) |
//! | [`KeyVersionStore`] | wrapped master-key versions |
//! | [`SettingsStore`] | integer settings (`min_decrypt_version`) and per-tenant limits |
//! | [`LeaseStore`] | live leases: which credential, for whom, until when |
//!
//! [`sqlite`] is the embedded default (one file, one host; its leases live
//! in this process's memory, [`crate::leases`]); [`postgres`] is shared by
//! several vault replicas, leases included. Every backend
//! passes the same conformance suite (`tests/tests/vault_store_conformance.rs`
//! in the workspace), which checks the commit gate: a change commits only
//! after its gate (the audit event for it) succeeded, inside the transaction.
//!
//! Backend errors are turned into the backend-neutral [`StoreError`] here,
//! before they reach a handler; `crate::error` maps those to gRPC codes.
//! Schemas are migrations kept as files under `vault/migrations/<backend>/`,
//! applied in order and recorded in a `schema_migrations` table.

pub mod postgres;
pub mod sqlite;

use std::{collections::BTreeMap, fmt, sync::Arc};

use crate::ids::{CredentialId, LeaseId, TenantId};
pub use crate::leases::LeaseProblem;

/// Errors of every store, whatever the backend. Messages never hold secrets
/// (the stores have none in clear) nor database passwords.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database cannot be reached or failed (down, disk full, I/O,
    /// timeout): retry later.
    #[error("credential database unavailable: {0}")]
    Unavailable(String),
    /// A uniqueness rule refused the change (a concurrent writer won).
    #[error("credential database refused a conflicting change: {0}")]
    Conflict(String),
    /// A stored row does not parse (manual edits, corruption).
    #[error("credential database row is corrupt: {0}")]
    Corrupt(String),
    /// Sealing the secret failed, so nothing was stored.
    #[error("the secret could not be sealed: {0}")]
    Seal(String),
    /// The commit gate (the audit event for this change) failed, so the
    /// change was rolled back.
    #[error("the change was not committed: {0}")]
    Gate(String),
}

/// One credential's metadata, plus its sealed secret when not deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialRow {
    pub credential_id: CredentialId,
    pub tenant_id: TenantId,
    pub name: String,
    pub kind: i32,
    pub version: u32,
    pub labels: BTreeMap<String, String>,
    pub created_at: i64,
    pub updated_at: i64,
    pub deleted: bool,
    pub key_version: u32,
    pub secret_chars: u32,
    /// The A256CBC-HS512 envelope; `None` once deleted.
    pub sealed: Option<Vec<u8>>,
}

/// What `put` is asked to store.
#[derive(Debug)]
pub struct NewCredential<'a> {
    pub tenant_id: &'a TenantId,
    pub name: &'a str,
    pub kind: i32,
    pub labels: &'a BTreeMap<String, String>,
    pub secret_chars: u32,
}

/// Seals the secret for the id and version the new row gets (they are bound
/// into the AAD): returns (envelope, key version) or why it could not.
pub type Seal<'a> = dyn FnMut(&CredentialId, u32) -> Result<(Vec<u8>, u32), String> + 'a;

/// A commit gate: runs inside the transaction just before COMMIT; if it
/// fails, nothing is committed and the store returns [`StoreError::Gate`].
pub type Gate<'a, A> = dyn FnMut(A) -> Result<(), String> + 'a;

/// The gate of `put`: gets the id and version the row gets.
pub type PutGate<'a> = dyn FnMut(&CredentialId, u32) -> Result<(), String> + 'a;

/// A gate with no argument.
pub type Gate0<'a> = dyn FnMut() -> Result<(), String> + 'a;

/// Credentials: metadata and sealed secrets. Calls block (run them on a
/// blocking thread) except [`CredentialStore::cached`].
pub trait CredentialStore: Send + Sync + fmt::Debug {
    /// One credential by id from memory, if it was read since it last
    /// changed. Never blocks: the AcquireLease hot path tries this first.
    /// A backend shared by several vaults answers `None` unless it can tell
    /// the row is still current.
    fn cached(&self, id: &CredentialId) -> Option<Arc<CredentialRow>>;

    /// Stores a new credential, or a new version of the live one with the
    /// same (tenant, name). Returns (id, version).
    fn put(
        &self,
        new: &NewCredential<'_>,
        seal: &mut Seal<'_>,
        gate: &mut PutGate<'_>,
    ) -> Result<(CredentialId, u32), StoreError>;

    /// One credential by id (deleted ones too, as tombstones).
    fn get(&self, id: &CredentialId) -> Result<Option<CredentialRow>, StoreError>;

    /// A tenant's credentials, by name then creation time.
    fn list(
        &self,
        tenant: &TenantId,
        include_deleted: bool,
    ) -> Result<Vec<CredentialRow>, StoreError>;

    /// Crypto-shred: drops the ciphertext, keeps a tombstone. Returns false
    /// (and does not call `gate`) if the credential is unknown or already
    /// deleted.
    fn delete(&self, id: &CredentialId, gate: &mut Gate0<'_>) -> Result<bool, StoreError>;

    /// Live credentials sealed under a key version older than `current`
    /// (optionally of one tenant).
    fn stale_sealed(
        &self,
        current: u32,
        tenant: Option<&TenantId>,
    ) -> Result<Vec<CredentialRow>, StoreError>;

    /// Replaces sealed secrets (id, version, envelope, key version) in one
    /// transaction, each only if its row is still at that version (a
    /// concurrent PutCredential wins). `gate` gets the number replaced.
    fn replace_sealed(
        &self,
        rows: &[(CredentialId, u32, Vec<u8>, u32)],
        gate: &mut Gate<'_, u32>,
    ) -> Result<u32, StoreError>;

    /// Live credentials per key version.
    fn count_by_key_version(&self) -> Result<BTreeMap<u32, u64>, StoreError>;
}

/// Wrapped master-key versions.
pub trait KeyVersionStore: Send + Sync + fmt::Debug {
    /// True when other vaults share this database, so key versions and
    /// settings may change under this one (it re-reads them before use).
    fn shared(&self) -> bool {
        false
    }

    /// (version, wrapped, created_at), ascending.
    fn key_versions(&self) -> Result<Vec<(u32, Vec<u8>, i64)>, StoreError>;

    /// What a keyring depends on, in one read: how many key versions there
    /// are, the newest, and the integer setting `setting` (the vault's
    /// `min_decrypt_version`). A replica compares it with what it holds and
    /// reads the wrapped keys only when it changed.
    fn keyring_state(&self, setting: &str) -> Result<KeyringState, StoreError>;

    /// Adds a wrapped key version; [`StoreError::Conflict`] if it exists.
    fn insert_key_version(
        &self,
        version: u32,
        wrapped: &[u8],
        gate: &mut Gate0<'_>,
    ) -> Result<(), StoreError>;
}

/// See [`KeyVersionStore::keyring_state`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KeyringState {
    /// Number of key versions stored.
    pub versions: usize,
    /// The newest version (0 when there is none).
    pub newest: u32,
    /// The setting's value, if set.
    pub setting: Option<i64>,
}

/// A [`KeyringState`] from the counts a backend read, checked.
pub(crate) fn keyring_state(
    versions: i64,
    newest: i64,
    setting: Option<i64>,
) -> Result<KeyringState, StoreError> {
    Ok(KeyringState {
        versions: usize::try_from(versions)
            .map_err(|_| StoreError::Corrupt(format!("{versions} key versions")))?,
        newest: u32::try_from(newest)
            .map_err(|_| StoreError::Corrupt(format!("key version {newest} is out of range")))?,
        setting,
    })
}

/// Integer settings and per-tenant limits.
pub trait SettingsStore: Send + Sync + fmt::Debug {
    /// An integer setting (e.g. `min_decrypt_version`).
    fn setting(&self, name: &str) -> Result<Option<i64>, StoreError>;

    /// Sets an integer setting.
    fn set_setting(&self, name: &str, value: i64, gate: &mut Gate0<'_>) -> Result<(), StoreError>;

    /// A tenant's secret size override, if any.
    fn tenant_limit(&self, tenant: &TenantId) -> Result<Option<u32>, StoreError>;

    /// Sets (Some) or clears (None) a tenant's override.
    fn set_tenant_limit(
        &self,
        tenant: &TenantId,
        limit: Option<u32>,
        gate: &mut Gate0<'_>,
    ) -> Result<(), StoreError>;
}

/// What a lease is granted for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewLease {
    pub credential_id: CredentialId,
    pub tenant_id: TenantId,
    /// The identity that acquires it; only it may release it.
    pub holder: String,
}

/// Live leases. A lease is usable until it expires or is released, never
/// after; released and expired ones are forgotten, so an id cannot be used
/// twice. Holds no secret.
pub trait LeaseStore: Send + Sync + fmt::Debug {
    /// True when calls wait on a database: run them on a blocking thread.
    fn blocks(&self) -> bool;

    /// Records a lease for `ttl` unless `max_active` are already live.
    fn grant(
        &self,
        id: &LeaseId,
        lease: &NewLease,
        ttl: std::time::Duration,
        max_active: usize,
    ) -> Result<bool, StoreError>;

    /// Ends a lease held by `holder`: what it was for, or why not.
    fn release(
        &self,
        id: &LeaseId,
        holder: &str,
    ) -> Result<Result<NewLease, LeaseProblem>, StoreError>;

    /// Drops a lease without checks (the audit write for it failed).
    fn revoke(&self, id: &LeaseId) -> Result<(), StoreError>;

    /// Forgets expired leases; returns how many.
    fn sweep(&self) -> Result<usize, StoreError>;

    /// Leases granted and neither released, revoked nor expired.
    fn active(&self) -> Result<usize, StoreError>;
}

/// The stores a vault opens: its database, and where its leases live.
#[derive(Debug, Clone)]
pub struct Stores {
    pub store: Arc<dyn VaultStore>,
    pub leases: Arc<dyn LeaseStore>,
}

/// Everything the vault keeps in its database, as one handle.
pub trait VaultStore: CredentialStore + KeyVersionStore + SettingsStore {}

impl<T: CredentialStore + KeyVersionStore + SettingsStore> VaultStore for T {}

/// Opens the store the config names: the SQLite file `database`, or the
/// PostgreSQL database whose URL `database_url_file` holds.
pub fn open(config: &crate::config::VaultConfig) -> Result<Stores, StoreError> {
    let backend = config.store_backend().map_err(StoreError::Unavailable)?;
    Ok(match backend {
        crate::config::StoreBackend::Sqlite(path) => Stores {
            store: Arc::new(sqlite::SqliteStore::open(path)?),
            leases: Arc::new(crate::leases::Leases::default()),
        },
        crate::config::StoreBackend::Postgres(url_file) => {
            let pg = Arc::new(postgres::PostgresStore::open(
                postgres::PgTarget::from_url_file(url_file, "vaultd")?,
            )?);
            Stores {
                store: pg.clone(),
                leases: pg,
            }
        }
    })
}

/// Unix seconds now, as every backend stamps rows.
pub(crate) fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}
