//! The credential store on SQLite, the embedded default: metadata, sealed
//! secrets (never plaintext), wrapped master-key versions, settings and
//! per-tenant limits in one file. It stores what it is given; sealing and
//! authorization happen in the layers above.
//!
//! Deleting a credential removes its ciphertext (crypto-shred) and, with
//! `secure_delete`, SQLite overwrites the freed pages.
//!
//! Rows read by id are cached in memory (metadata and ciphertext only, never
//! plaintext), so the AcquireLease hot path needs neither the connection
//! mutex nor a blocking thread. Every write through this store evicts the
//! rows it touches; a SQLite file has one vault, so nothing else writes it
//! while it runs.

use std::{
    collections::{BTreeMap, HashMap},
    path::Path,
    sync::{Arc, Mutex, RwLock},
};

use rusqlite::{Connection, OptionalExtension, params};

use super::{
    CredentialRow, CredentialStore, Gate, Gate0, KeyVersionStore, KeyringState, NewCredential,
    PutGate, Seal, SettingsStore, StoreError, keyring_state, now,
};
use crate::ids::{CredentialId, TenantId};

/// The migrations, in order: (version, SQL). Each runs once, in its own
/// transaction, and is recorded in `schema_migrations`.
const MIGRATIONS: &[(i64, &str)] = &[(1, include_str!("../../migrations/sqlite/0001_initial.sql"))];

impl From<rusqlite::Error> for StoreError {
    fn from(error: rusqlite::Error) -> Self {
        use rusqlite::ErrorCode;
        match &error {
            rusqlite::Error::SqliteFailure(e, _) => match e.code {
                ErrorCode::ConstraintViolation => StoreError::Conflict(error.to_string()),
                ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase => {
                    StoreError::Corrupt(error.to_string())
                }
                _ => StoreError::Unavailable(format!("SQLite: {error}")),
            },
            rusqlite::Error::FromSqlConversionFailure(..)
            | rusqlite::Error::IntegralValueOutOfRange(..)
            | rusqlite::Error::InvalidColumnType(..) => StoreError::Corrupt(error.to_string()),
            _ => StoreError::Unavailable(format!("SQLite: {error}")),
        }
    }
}

/// The SQLite-backed store. One connection behind a mutex: writes are rare and
/// short; callers run it on blocking threads.
#[derive(Debug)]
pub struct SqliteStore {
    conn: Mutex<Connection>,
    /// Rows by id as last read from the database. Filled and evicted only
    /// while `conn` is held, so a read cannot put back a row that a write
    /// has just changed; read without `conn` by [`CredentialStore::cached`].
    cache: RwLock<HashMap<CredentialId, Arc<CredentialRow>>>,
}

/// Most rows kept in the cache; beyond it reads go to SQLite as before.
const CACHE_MAX_ROWS: usize = 100_000;

fn row_to_credential(row: &rusqlite::Row<'_>) -> rusqlite::Result<CredentialRow> {
    let labels: String = row.get("labels")?;
    Ok(CredentialRow {
        credential_id: CredentialId::from_trusted(row.get("credential_id")?),
        tenant_id: TenantId::from_trusted(row.get("tenant_id")?),
        name: row.get("name")?,
        kind: row.get("kind")?,
        version: row.get("version")?,
        labels: serde_json::from_str(&labels).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(6, rusqlite::types::Type::Text, Box::new(e))
        })?,
        created_at: row.get("created_at")?,
        updated_at: row.get("updated_at")?,
        deleted: row.get::<_, i64>("deleted")? != 0,
        key_version: row.get("key_version")?,
        secret_chars: row.get("secret_chars")?,
        sealed: row.get("sealed")?,
    })
}

/// Applies the migrations the database has not seen yet.
fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
             version    INTEGER PRIMARY KEY,
             applied_at INTEGER NOT NULL
         )",
    )?;
    for (version, sql) in MIGRATIONS {
        let tx = conn.transaction()?;
        let seen: Option<i64> = tx
            .query_row(
                "SELECT version FROM schema_migrations WHERE version = ?1",
                params![version],
                |r| r.get(0),
            )
            .optional()?;
        if seen.is_none() {
            tx.execute_batch(sql)?;
            tx.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES (?1, ?2)",
                params![version, now()],
            )?;
        }
        tx.commit()?;
    }
    Ok(())
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| {
                StoreError::Corrupt(format!("cannot create directory {}: {e}", dir.display()))
            })?;
        }
        let mut conn = Connection::open(path)?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA secure_delete = ON;
             PRAGMA busy_timeout = 5000;",
        )?;
        migrate(&mut conn)?;
        Ok(Self {
            conn: Mutex::new(conn),
            cache: RwLock::default(),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Drops `id`'s cached row. Call with the connection held, after writing.
    fn evict(&self, _conn: &Connection, id: &CredentialId) {
        self.cache
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }
}

impl CredentialStore for SqliteStore {
    /// One credential by id from memory, if it was read since it last changed.
    /// Never blocks on SQLite: the async hot path tries this before [`CredentialStore::get`].
    fn cached(&self, id: &CredentialId) -> Option<Arc<CredentialRow>> {
        self.cache
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    /// Stores a new credential, or a new version of the live one with the same
    /// (tenant, name). Returns (id, version). `gate` runs inside the
    /// transaction, just before COMMIT: if it fails, nothing is stored.
    fn put(
        &self,
        new: &NewCredential<'_>,
        seal: &mut Seal<'_>,
        gate: &mut PutGate<'_>,
    ) -> Result<(CredentialId, u32), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let existing: Option<(String, u32)> = tx
            .query_row(
                "SELECT credential_id, version FROM credentials WHERE tenant_id = ?1 AND name = ?2 AND deleted = 0",
                params![new.tenant_id.as_str(), new.name],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let (id, version) = match existing {
            Some((id, v)) => (CredentialId::from_trusted(id), v + 1),
            None => (CredentialId::generate(), 1),
        };
        let (sealed, key_version) = seal(&id, version).map_err(StoreError::Seal)?;
        let labels =
            serde_json::to_string(new.labels).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let t = now();
        tx.execute(
            "INSERT INTO credentials (credential_id, tenant_id, name, kind, version, labels, created_at,
                 updated_at, deleted, key_version, secret_chars, sealed)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7, 0, ?8, ?9, ?10)
             ON CONFLICT(credential_id) DO UPDATE SET kind = ?4, version = ?5, labels = ?6,
                 updated_at = ?7, key_version = ?8, secret_chars = ?9, sealed = ?10",
            params![
                id.as_str(),
                new.tenant_id.as_str(),
                new.name,
                new.kind,
                version,
                labels,
                t,
                key_version,
                new.secret_chars,
                sealed
            ],
        )?;
        gate(&id, version).map_err(StoreError::Gate)?;
        let committed = tx.commit();
        self.evict(&conn, &id);
        committed?;
        Ok((id, version))
    }

    /// One credential by id (deleted ones too, as tombstones), from SQLite;
    /// remembers it for [`CredentialStore::cached`].
    fn get(&self, id: &CredentialId) -> Result<Option<CredentialRow>, StoreError> {
        let conn = self.conn();
        let row = conn
            .prepare_cached("SELECT * FROM credentials WHERE credential_id = ?1")?
            .query_row(params![id.as_str()], row_to_credential)
            .optional()?;
        if let Some(row) = &row {
            let mut cache = self.cache.write().unwrap_or_else(|p| p.into_inner());
            if cache.len() < CACHE_MAX_ROWS {
                cache.insert(id.clone(), Arc::new(row.clone()));
            }
        }
        Ok(row)
    }

    /// A tenant's credentials, by name.
    fn list(
        &self,
        tenant: &TenantId,
        include_deleted: bool,
    ) -> Result<Vec<CredentialRow>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT * FROM credentials WHERE tenant_id = ?1 AND (?2 OR deleted = 0) ORDER BY name, created_at",
        )?;
        let rows = stmt.query_map(params![tenant.as_str(), include_deleted], row_to_credential)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Crypto-shred: drops the ciphertext, keeps a tombstone. Returns false
    /// (and does not call `gate`) if the credential is unknown or already
    /// deleted. `gate` runs just before COMMIT; if it fails, nothing changes.
    fn delete(&self, id: &CredentialId, gate: &mut Gate0<'_>) -> Result<bool, StoreError> {
        let mut conn = self.conn();
        let result = (|| {
            let tx = conn.transaction()?;
            let n = tx.execute(
                "UPDATE credentials SET deleted = 1, sealed = NULL, key_version = 0, updated_at = ?2
                 WHERE credential_id = ?1 AND deleted = 0",
                params![id.as_str(), now()],
            )?;
            if n != 1 {
                return Ok(false);
            }
            gate().map_err(StoreError::Gate)?;
            tx.commit()?;
            Ok(true)
        })();
        // Evict even on error: the cached ciphertext must not outlive a shred.
        self.evict(&conn, id);
        result
    }

    /// Live credentials sealed under a key version older than `current`
    /// (optionally of one tenant): (id, tenant, version, sealed).
    fn stale_sealed(
        &self,
        current: u32,
        tenant: Option<&TenantId>,
    ) -> Result<Vec<CredentialRow>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT * FROM credentials WHERE deleted = 0 AND key_version < ?1 AND (?2 IS NULL OR tenant_id = ?2)",
        )?;
        let rows = stmt.query_map(
            params![current, tenant.map(|t| t.as_str())],
            row_to_credential,
        )?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Replaces sealed secrets in one transaction, each only if its row is
    /// still at the given version (a concurrent PutCredential wins). `gate`
    /// gets the number replaced and runs just before COMMIT. Returns that number.
    fn replace_sealed(
        &self,
        rows: &[(CredentialId, u32, Vec<u8>, u32)],
        gate: &mut Gate<'_, u32>,
    ) -> Result<u32, StoreError> {
        let mut conn = self.conn();
        let result = (|| {
            let tx = conn.transaction()?;
            let mut replaced = 0u32;
            for (id, version, sealed, key_version) in rows {
                replaced += u32::try_from(tx.execute(
                    "UPDATE credentials SET sealed = ?3, key_version = ?4
                     WHERE credential_id = ?1 AND version = ?2 AND deleted = 0",
                    params![id.as_str(), version, sealed, key_version],
                )?)
                .unwrap_or(0);
            }
            gate(replaced).map_err(StoreError::Gate)?;
            tx.commit()?;
            Ok(replaced)
        })();
        for (id, ..) in rows {
            self.evict(&conn, id);
        }
        result
    }

    /// Live credentials per key version.
    fn count_by_key_version(&self) -> Result<BTreeMap<u32, u64>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT key_version, COUNT(*) FROM credentials WHERE deleted = 0 GROUP BY key_version",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((r.get::<_, u32>(0)?, r.get::<_, i64>(1)?.unsigned_abs()))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

impl KeyVersionStore for SqliteStore {
    /// Wrapped master-key versions: (version, wrapped, created_at), ascending.
    fn key_versions(&self) -> Result<Vec<(u32, Vec<u8>, i64)>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT version, wrapped, created_at FROM key_versions ORDER BY version",
        )?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn keyring_state(&self, setting: &str) -> Result<KeyringState, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT (SELECT count(*) FROM key_versions), \
                    (SELECT coalesce(max(version), 0) FROM key_versions), \
                    (SELECT value FROM settings WHERE name = ?1)",
        )?;
        let (versions, newest, setting): (i64, i64, Option<i64>) =
            stmt.query_row([setting], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        keyring_state(versions, newest, setting)
    }

    /// Adds a wrapped key version; fails if the version exists. `gate` runs
    /// just before COMMIT.
    fn insert_key_version(
        &self,
        version: u32,
        wrapped: &[u8],
        gate: &mut Gate0<'_>,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute(
            "INSERT INTO key_versions (version, wrapped, created_at) VALUES (?1, ?2, ?3)",
            params![version, wrapped, now()],
        )?;
        gate().map_err(StoreError::Gate)?;
        tx.commit()?;
        Ok(())
    }
}

impl SettingsStore for SqliteStore {
    /// An integer setting (e.g. `min_decrypt_version`).
    fn setting(&self, name: &str) -> Result<Option<i64>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT value FROM settings WHERE name = ?1",
                params![name],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// Sets an integer setting; `gate` runs just before COMMIT.
    fn set_setting(&self, name: &str, value: i64, gate: &mut Gate0<'_>) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute(
            "INSERT INTO settings (name, value) VALUES (?1, ?2) ON CONFLICT(name) DO UPDATE SET value = ?2",
            params![name, value],
        )?;
        gate().map_err(StoreError::Gate)?;
        tx.commit()?;
        Ok(())
    }

    /// A tenant's secret size override, if any.
    fn tenant_limit(&self, tenant: &TenantId) -> Result<Option<u32>, StoreError> {
        Ok(self
            .conn()
            .prepare_cached("SELECT max_secret_chars FROM tenant_limits WHERE tenant_id = ?1")?
            .query_row(params![tenant.as_str()], |r| r.get(0))
            .optional()?)
    }

    /// Sets (Some) or clears (None) a tenant's override; `gate` runs just before COMMIT.
    fn set_tenant_limit(
        &self,
        tenant: &TenantId,
        limit: Option<u32>,
        gate: &mut Gate0<'_>,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        match limit {
            Some(l) => tx.execute(
                "INSERT INTO tenant_limits (tenant_id, max_secret_chars) VALUES (?1, ?2)
                 ON CONFLICT(tenant_id) DO UPDATE SET max_secret_chars = ?2",
                params![tenant.as_str(), l],
            )?,
            None => tx.execute(
                "DELETE FROM tenant_limits WHERE tenant_id = ?1",
                params![tenant.as_str()],
            )?,
        };
        gate().map_err(StoreError::Gate)?;
        tx.commit()?;
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn put(store: &SqliteStore, tenant: &TenantId, sealed: &[u8]) -> (CredentialId, u32) {
        let labels = BTreeMap::new();
        let new = NewCredential {
            tenant_id: tenant,
            name: "archive",
            kind: 1,
            labels: &labels,
            secret_chars: 3,
        };
        store
            .put(&new, &mut |_, _| Ok((sealed.to_vec(), 1)), &mut |_, _| {
                Ok(())
            })
            .unwrap()
    }

    fn cached_sealed(store: &SqliteStore, id: &CredentialId) -> Option<Option<Vec<u8>>> {
        store.cached(id).map(|row| row.sealed.clone())
    }

    #[test]
    fn the_cache_never_serves_a_row_a_write_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("vault.db")).unwrap();
        let tenant = TenantId::parse("acme").unwrap();
        let (id, v1) = put(&store, &tenant, b"one");
        assert_eq!(
            cached_sealed(&store, &id),
            None,
            "nothing cached before a read"
        );
        assert_eq!(store.get(&id).unwrap().unwrap().version, v1);
        assert_eq!(cached_sealed(&store, &id), Some(Some(b"one".to_vec())));

        // A new version evicts; the next read caches it.
        let (same, v2) = put(&store, &tenant, b"two");
        assert_eq!((&same, v2), (&id, v1 + 1));
        assert_eq!(cached_sealed(&store, &id), None);
        store.get(&id).unwrap();
        assert_eq!(store.cached(&id).unwrap().version, v2);

        // Rewrap evicts.
        let rows = [(id.clone(), v2, b"rewrapped".to_vec(), 2)];
        assert_eq!(store.replace_sealed(&rows, &mut |_| Ok(())).unwrap(), 1);
        assert_eq!(cached_sealed(&store, &id), None);
        store.get(&id).unwrap();
        assert_eq!(
            cached_sealed(&store, &id),
            Some(Some(b"rewrapped".to_vec()))
        );

        // Delete evicts the ciphertext; a later read caches the tombstone.
        assert!(store.delete(&id, &mut || Ok(())).unwrap());
        assert_eq!(cached_sealed(&store, &id), None);
        store.get(&id).unwrap();
        let tombstone = store.cached(&id).unwrap();
        assert!(tombstone.deleted && tombstone.sealed.is_none());

        // Unknown ids are not cached.
        let unknown = CredentialId::parse("cred_unknown").unwrap();
        assert!(store.get(&unknown).unwrap().is_none());
        assert!(store.cached(&unknown).is_none());
    }
}
