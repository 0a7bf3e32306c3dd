//! The credential store on PostgreSQL, shared by several vault replicas:
//! the same tables as the SQLite backend, on the shared pool, TLS and
//! migrations of `recvault-pg`.
//!
//! There is no row cache here: another replica may change or delete a row
//! at any time, so every read goes to the database and a credential deleted
//! or re-put through one replica is never served stale by another.
//!
//! Two replicas putting the same (tenant, name) at once: the existing row is
//! locked (`FOR UPDATE`) for a new version; a first version races on the
//! unique index and the loser gets [`StoreError::Conflict`] (ABORTED).
//!
//! A database that is down answers UNAVAILABLE with the reason after at
//! most the connect timeout (5 s); the pool drops broken connections and
//! opens new ones, so the vault recovers by itself.

use std::{
    collections::BTreeMap,
    fmt,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

pub use recvault_pg::PgTarget;
use recvault_pg::{PgError, Pool, Row, Transaction};

use super::{
    CredentialRow, CredentialStore, Gate, Gate0, KeyVersionStore, KeyringState, LeaseProblem,
    LeaseStore, NewCredential, NewLease, PutGate, Seal, SettingsStore, StoreError, keyring_state,
    now,
};
use crate::ids::{CredentialId, LeaseId, TenantId};

/// The migrations, in order: (version, SQL), recorded in `schema_migrations`.
const MIGRATIONS: &[(i64, &str)] = &[
    (
        1,
        include_str!("../../migrations/postgres/0001_initial.sql"),
    ),
    (2, include_str!("../../migrations/postgres/0002_leases.sql")),
];

impl From<PgError> for StoreError {
    fn from(error: PgError) -> Self {
        match error {
            PgError::Unavailable(m) => StoreError::Unavailable(m),
            PgError::Conflict(m) => StoreError::Conflict(m),
            PgError::Corrupt(m) => StoreError::Corrupt(m),
        }
    }
}

impl From<recvault_pg::Error> for StoreError {
    fn from(error: recvault_pg::Error) -> Self {
        PgError::from(error).into()
    }
}

/// The PostgreSQL-backed store.
pub struct PostgresStore {
    pool: Pool,
    /// Live leases of every replica as last counted (at open and by each
    /// sweep), plus the grants made here since: while that estimate is
    /// below 90% of the cap, a grant skips the exact count.
    leases_counted: AtomicUsize,
    leases_granted_since: AtomicUsize,
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore")
            .field("target", self.pool.target())
            .finish_non_exhaustive()
    }
}

fn row_to_credential(row: &Row) -> Result<CredentialRow, StoreError> {
    let int = |name: &str| -> Result<u32, StoreError> {
        let v: i64 = row.try_get(name)?;
        u32::try_from(v).map_err(|_| StoreError::Corrupt(format!("{name} {v} is out of range")))
    };
    let labels: String = row.try_get("labels")?;
    Ok(CredentialRow {
        credential_id: CredentialId::from_trusted(row.try_get("credential_id")?),
        tenant_id: TenantId::from_trusted(row.try_get("tenant_id")?),
        name: row.try_get("name")?,
        kind: row.try_get("kind")?,
        version: int("version")?,
        labels: serde_json::from_str(&labels)
            .map_err(|e| StoreError::Corrupt(format!("labels: {e}")))?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        deleted: row.try_get("deleted")?,
        key_version: int("key_version")?,
        secret_chars: int("secret_chars")?,
        sealed: row.try_get("sealed")?,
    })
}

const COLUMNS: &str = "credential_id, tenant_id, name, kind, version, labels, created_at, \
                       updated_at, deleted, key_version, secret_chars, sealed";

impl PostgresStore {
    /// Connects and applies the migrations the database has not seen yet.
    pub fn open(target: PgTarget) -> Result<Self, StoreError> {
        let store = Self {
            pool: Pool::new(target),
            leases_counted: AtomicUsize::new(0),
            leases_granted_since: AtomicUsize::new(0),
        };
        store.migrate()?;
        LeaseStore::active(&store)?;
        Ok(store)
    }

    fn migrate(&self) -> Result<(), StoreError> {
        Ok(recvault_pg::migrate(
            &self.pool,
            "schema_migrations",
            MIGRATIONS,
        )?)
    }

    /// Runs `f` (which calls its gate last) in a transaction, then COMMIT.
    fn in_tx<T>(
        &self,
        f: impl FnOnce(&mut Transaction<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut conn = self.pool.get()?;
        let mut tx = conn.transaction()?;
        let value = f(&mut tx)?;
        tx.commit()?;
        Ok(value)
    }
}

fn gated(gate: &mut Gate0<'_>) -> Result<(), StoreError> {
    gate().map_err(StoreError::Gate)
}

impl CredentialStore for PostgresStore {
    fn cached(&self, _id: &CredentialId) -> Option<Arc<CredentialRow>> {
        // Shared by replicas: no cache (see the module doc).
        None
    }

    fn put(
        &self,
        new: &NewCredential<'_>,
        seal: &mut Seal<'_>,
        gate: &mut PutGate<'_>,
    ) -> Result<(CredentialId, u32), StoreError> {
        let labels =
            serde_json::to_string(new.labels).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.in_tx(|tx| {
            let existing = tx.query_opt(
                "SELECT credential_id, version FROM credentials
                 WHERE tenant_id = $1 AND name = $2 AND NOT deleted FOR UPDATE",
                &[&new.tenant_id.as_str(), &new.name],
            )?;
            let (id, version) = match existing {
                Some(row) => {
                    let v: i64 = row.try_get(1)?;
                    let v = u32::try_from(v)
                        .map_err(|_| StoreError::Corrupt(format!("version {v} is out of range")))?;
                    (CredentialId::from_trusted(row.try_get(0)?), v + 1)
                }
                None => (CredentialId::generate(), 1),
            };
            let (sealed, key_version) = seal(&id, version).map_err(StoreError::Seal)?;
            let t = now();
            tx.execute(
                "INSERT INTO credentials (credential_id, tenant_id, name, kind, version, labels,
                     created_at, updated_at, deleted, key_version, secret_chars, sealed)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $7, FALSE, $8, $9, $10)
                 ON CONFLICT (credential_id) DO UPDATE SET kind = $4, version = $5, labels = $6,
                     updated_at = $7, key_version = $8, secret_chars = $9, sealed = $10",
                &[
                    &id.as_str(),
                    &new.tenant_id.as_str(),
                    &new.name,
                    &new.kind,
                    &i64::from(version),
                    &labels,
                    &t,
                    &i64::from(key_version),
                    &i64::from(new.secret_chars),
                    &sealed,
                ],
            )?;
            gate(&id, version).map_err(StoreError::Gate)?;
            Ok((id, version))
        })
    }

    fn get(&self, id: &CredentialId) -> Result<Option<CredentialRow>, StoreError> {
        let mut conn = self.pool.get()?;
        let sql = format!("SELECT {COLUMNS} FROM credentials WHERE credential_id = $1");
        conn.query_opt(&sql, &[&id.as_str()])?
            .as_ref()
            .map(row_to_credential)
            .transpose()
    }

    fn list(
        &self,
        tenant: &TenantId,
        include_deleted: bool,
    ) -> Result<Vec<CredentialRow>, StoreError> {
        let mut conn = self.pool.get()?;
        let sql = format!(
            "SELECT {COLUMNS} FROM credentials WHERE tenant_id = $1 AND ($2 OR NOT deleted)
             ORDER BY name, created_at"
        );
        conn.query(&sql, &[&tenant.as_str(), &include_deleted])?
            .iter()
            .map(row_to_credential)
            .collect()
    }

    fn delete(&self, id: &CredentialId, gate: &mut Gate0<'_>) -> Result<bool, StoreError> {
        self.in_tx(|tx| {
            let n = tx.execute(
                "UPDATE credentials SET deleted = TRUE, sealed = NULL, key_version = 0,
                     updated_at = $2
                 WHERE credential_id = $1 AND NOT deleted",
                &[&id.as_str(), &now()],
            )?;
            if n != 1 {
                return Ok(false);
            }
            gated(gate)?;
            Ok(true)
        })
    }

    fn stale_sealed(
        &self,
        current: u32,
        tenant: Option<&TenantId>,
    ) -> Result<Vec<CredentialRow>, StoreError> {
        let mut conn = self.pool.get()?;
        let sql = format!(
            "SELECT {COLUMNS} FROM credentials WHERE NOT deleted AND key_version < $1
             AND ($2::TEXT IS NULL OR tenant_id = $2)"
        );
        conn.query(&sql, &[&i64::from(current), &tenant.map(|t| t.as_str())])?
            .iter()
            .map(row_to_credential)
            .collect()
    }

    fn replace_sealed(
        &self,
        rows: &[(CredentialId, u32, Vec<u8>, u32)],
        gate: &mut Gate<'_, u32>,
    ) -> Result<u32, StoreError> {
        self.in_tx(|tx| {
            let mut replaced = 0u32;
            for (id, version, sealed, key_version) in rows {
                let n = tx.execute(
                    "UPDATE credentials SET sealed = $3, key_version = $4
                     WHERE credential_id = $1 AND version = $2 AND NOT deleted",
                    &[
                        &id.as_str(),
                        &i64::from(*version),
                        sealed,
                        &i64::from(*key_version),
                    ],
                )?;
                replaced += u32::try_from(n).unwrap_or(0);
            }
            gate(replaced).map_err(StoreError::Gate)?;
            Ok(replaced)
        })
    }

    fn count_by_key_version(&self) -> Result<BTreeMap<u32, u64>, StoreError> {
        let mut conn = self.pool.get()?;
        conn.query(
            "SELECT key_version, COUNT(*) FROM credentials WHERE NOT deleted GROUP BY key_version",
            &[],
        )?
        .iter()
        .map(|r| {
            let v: i64 = r.try_get(0)?;
            let n: i64 = r.try_get(1)?;
            let v = u32::try_from(v)
                .map_err(|_| StoreError::Corrupt(format!("key_version {v} is out of range")))?;
            Ok((v, n.unsigned_abs()))
        })
        .collect()
    }
}

impl KeyVersionStore for PostgresStore {
    fn shared(&self) -> bool {
        true
    }

    fn keyring_state(&self, setting: &str) -> Result<KeyringState, StoreError> {
        let mut conn = self.pool.get()?;
        let row = conn.query_one(
            "SELECT (SELECT count(*) FROM key_versions), \
                    (SELECT coalesce(max(version), 0) FROM key_versions), \
                    (SELECT value FROM settings WHERE name = $1)",
            &[&setting],
        )?;
        keyring_state(row.try_get(0)?, row.try_get(1)?, row.try_get(2)?)
    }

    fn key_versions(&self) -> Result<Vec<(u32, Vec<u8>, i64)>, StoreError> {
        let mut conn = self.pool.get()?;
        conn.query(
            "SELECT version, wrapped, created_at FROM key_versions ORDER BY version",
            &[],
        )?
        .iter()
        .map(|r| {
            let v: i64 = r.try_get(0)?;
            let v = u32::try_from(v)
                .map_err(|_| StoreError::Corrupt(format!("key version {v} is out of range")))?;
            Ok((v, r.try_get(1)?, r.try_get(2)?))
        })
        .collect()
    }

    fn insert_key_version(
        &self,
        version: u32,
        wrapped: &[u8],
        gate: &mut Gate0<'_>,
    ) -> Result<(), StoreError> {
        self.in_tx(|tx| {
            tx.execute(
                "INSERT INTO key_versions (version, wrapped, created_at) VALUES ($1, $2, $3)",
                &[&i64::from(version), &wrapped, &now()],
            )?;
            gated(gate)
        })
    }
}

impl SettingsStore for PostgresStore {
    fn setting(&self, name: &str) -> Result<Option<i64>, StoreError> {
        let mut conn = self.pool.get()?;
        Ok(conn
            .query_opt("SELECT value FROM settings WHERE name = $1", &[&name])?
            .map(|r| r.try_get(0))
            .transpose()?)
    }

    fn set_setting(&self, name: &str, value: i64, gate: &mut Gate0<'_>) -> Result<(), StoreError> {
        self.in_tx(|tx| {
            tx.execute(
                "INSERT INTO settings (name, value) VALUES ($1, $2)
                 ON CONFLICT (name) DO UPDATE SET value = $2",
                &[&name, &value],
            )?;
            gated(gate)
        })
    }

    fn tenant_limit(&self, tenant: &TenantId) -> Result<Option<u32>, StoreError> {
        let mut conn = self.pool.get()?;
        conn.query_opt(
            "SELECT max_secret_chars FROM tenant_limits WHERE tenant_id = $1",
            &[&tenant.as_str()],
        )?
        .map(|r| {
            let v: i64 = r.try_get(0)?;
            u32::try_from(v)
                .map_err(|_| StoreError::Corrupt(format!("max_secret_chars {v} is out of range")))
        })
        .transpose()
    }

    fn set_tenant_limit(
        &self,
        tenant: &TenantId,
        limit: Option<u32>,
        gate: &mut Gate0<'_>,
    ) -> Result<(), StoreError> {
        self.in_tx(|tx| {
            match limit {
                Some(l) => tx.execute(
                    "INSERT INTO tenant_limits (tenant_id, max_secret_chars) VALUES ($1, $2)
                     ON CONFLICT (tenant_id) DO UPDATE SET max_secret_chars = $2",
                    &[&tenant.as_str(), &i64::from(l)],
                )?,
                None => tx.execute(
                    "DELETE FROM tenant_limits WHERE tenant_id = $1",
                    &[&tenant.as_str()],
                )?,
            };
            gated(gate)
        })
    }
}

impl LeaseStore for PostgresStore {
    fn blocks(&self) -> bool {
        true
    }

    fn grant(
        &self,
        id: &LeaseId,
        lease: &NewLease,
        ttl: Duration,
        max_active: usize,
    ) -> Result<bool, StoreError> {
        let mut conn = self.pool.get()?;
        let estimate = self.leases_counted.load(Ordering::Relaxed)
            + self.leases_granted_since.load(Ordering::Relaxed);
        if estimate.saturating_mul(10) < max_active.saturating_mul(9) {
            // Far from the cap: no need to count.
            conn.execute(
                "INSERT INTO leases (lease_id, credential_id, tenant_id, holder, expires_at)
                 VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5))",
                &[
                    &id.as_str(),
                    &lease.credential_id.as_str(),
                    &lease.tenant_id.as_str(),
                    &lease.holder,
                    &ttl.as_secs_f64(),
                ],
            )?;
            self.leases_granted_since.fetch_add(1, Ordering::Relaxed);
            return Ok(true);
        }
        // Near the cap: count the live leases of every replica. Two grants
        // racing at the cap may both pass (it is a guard against runaway
        // callers, not an exact quota).
        let n = conn.execute(
            "INSERT INTO leases (lease_id, credential_id, tenant_id, holder, expires_at)
             SELECT $1, $2, $3, $4, now() + make_interval(secs => $5)
             WHERE (SELECT count(*) FROM leases WHERE expires_at > now()) < $6",
            &[
                &id.as_str(),
                &lease.credential_id.as_str(),
                &lease.tenant_id.as_str(),
                &lease.holder,
                &ttl.as_secs_f64(),
                &i64::try_from(max_active).unwrap_or(i64::MAX),
            ],
        )?;
        Ok(n == 1)
    }

    fn release(
        &self,
        id: &LeaseId,
        holder: &str,
    ) -> Result<Result<NewLease, LeaseProblem>, StoreError> {
        let mut conn = self.pool.get()?;
        let row = conn.query_opt(
            "DELETE FROM leases WHERE lease_id = $1 AND holder = $2
             RETURNING credential_id, tenant_id, holder, expires_at <= now() AS expired",
            &[&id.as_str(), &holder],
        )?;
        let Some(row) = row else {
            let held_by_another = conn
                .query_opt("SELECT 1 FROM leases WHERE lease_id = $1", &[&id.as_str()])?
                .is_some();
            return Ok(Err(if held_by_another {
                LeaseProblem::NotHolder
            } else {
                LeaseProblem::Unknown
            }));
        };
        if row.try_get::<_, bool>("expired")? {
            return Ok(Err(LeaseProblem::Expired));
        }
        Ok(Ok(NewLease {
            credential_id: CredentialId::from_trusted(row.try_get("credential_id")?),
            tenant_id: TenantId::from_trusted(row.try_get("tenant_id")?),
            holder: row.try_get("holder")?,
        }))
    }

    fn revoke(&self, id: &LeaseId) -> Result<(), StoreError> {
        let mut conn = self.pool.get()?;
        conn.execute("DELETE FROM leases WHERE lease_id = $1", &[&id.as_str()])?;
        Ok(())
    }

    fn sweep(&self) -> Result<usize, StoreError> {
        let mut conn = self.pool.get()?;
        let n = conn.execute("DELETE FROM leases WHERE expires_at <= now()", &[])?;
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }

    fn active(&self) -> Result<usize, StoreError> {
        let mut conn = self.pool.get()?;
        let n: i64 = conn
            .query_one("SELECT count(*) FROM leases WHERE expires_at > now()", &[])?
            .try_get(0)?;
        let n = usize::try_from(n).unwrap_or(0);
        self.leases_counted.store(n, Ordering::Relaxed);
        self.leases_granted_since.store(0, Ordering::Relaxed);
        Ok(n)
    }
}
