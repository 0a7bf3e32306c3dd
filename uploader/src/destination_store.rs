//! Stored destinations (where a tenant's recordings go), in the uploader's
//! SQLite database. Holds a credential *id*, never a credential.

use std::{
    path::Path,
    sync::{Arc, Mutex},
};

use recvault_proto::uploader::v1 as pb;
use rusqlite::{Connection, OptionalExtension, params};

use crate::destination::{DestinationConfig, Provider};

/// A stored destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DestinationRecord {
    pub destination_id: String,
    pub tenant_id: String,
    pub name: String,
    pub config: DestinationConfig,
    pub credential_id: String,
}

impl DestinationRecord {
    pub fn to_proto(&self) -> pb::Destination {
        pb::Destination {
            destination_id: self.destination_id.clone(),
            tenant_id: self.tenant_id.clone(),
            name: self.name.clone(),
            provider: self.config.provider.as_str().to_owned(),
            endpoint: self.config.endpoint.clone(),
            region: self.config.region.clone(),
            bucket: self.config.bucket.clone(),
            prefix: self.config.prefix.clone(),
            path_style: self.config.path_style,
            credential_id: self.credential_id.clone(),
        }
    }
}

/// A destination-store call that failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DestinationStoreError {
    /// SQLite failed (disk full, I/O error, locked beyond the busy timeout).
    #[error("{0}")]
    Database(#[from] rusqlite::Error),
    /// The blocking task running the call panicked or was cancelled.
    #[error("destination store task failed: {0}")]
    Task(String),
}

/// The destinations table.
///
/// SQLite calls block (a write fsyncs): the plain methods are for start-up,
/// tests and blocking threads; async code (the gRPC handlers, the worker)
/// uses the `*_async` ones, which run on tokio's blocking pool.
#[derive(Debug)]
pub struct DestinationStore {
    conn: Mutex<Connection>,
}

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<DestinationRecord> {
    let provider: String = r.get("provider")?;
    Ok(DestinationRecord {
        destination_id: r.get("destination_id")?,
        tenant_id: r.get("tenant_id")?,
        name: r.get("name")?,
        config: DestinationConfig {
            provider: provider.parse().unwrap_or(Provider::Fs),
            endpoint: r.get("endpoint")?,
            region: r.get("region")?,
            bucket: r.get("bucket")?,
            prefix: r.get("prefix")?,
            path_style: r.get::<_, i64>("path_style")? != 0,
        },
        credential_id: r.get("credential_id")?,
    })
}

impl DestinationStore {
    pub fn open(path: &Path) -> rusqlite::Result<Self> {
        let conn = Connection::open(path)?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA busy_timeout = 5000;
             CREATE TABLE IF NOT EXISTS destinations (
                 destination_id TEXT PRIMARY KEY,
                 tenant_id      TEXT NOT NULL,
                 name           TEXT NOT NULL,
                 provider       TEXT NOT NULL,
                 endpoint       TEXT NOT NULL,
                 region         TEXT NOT NULL,
                 bucket         TEXT NOT NULL,
                 prefix         TEXT NOT NULL,
                 path_style     INTEGER NOT NULL,
                 credential_id  TEXT NOT NULL,
                 UNIQUE (tenant_id, name)
             );",
        )?;
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Creates or replaces (same tenant and name) a destination; returns its id.
    pub fn put(
        &self,
        tenant: &str,
        name: &str,
        config: &DestinationConfig,
        credential_id: &str,
    ) -> rusqlite::Result<String> {
        let conn = self.conn();
        let existing: Option<String> = conn
            .query_row(
                "SELECT destination_id FROM destinations WHERE tenant_id = ?1 AND name = ?2",
                params![tenant, name],
                |r| r.get(0),
            )
            .optional()?;
        let id = existing.unwrap_or_else(|| format!("dst_{}", uuid::Uuid::new_v4().simple()));
        conn.execute(
            "INSERT INTO destinations VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
             ON CONFLICT(destination_id) DO UPDATE SET provider = ?4, endpoint = ?5, region = ?6,
                 bucket = ?7, prefix = ?8, path_style = ?9, credential_id = ?10",
            params![
                id,
                tenant,
                name,
                config.provider.as_str(),
                config.endpoint,
                config.region,
                config.bucket,
                config.prefix,
                config.path_style,
                credential_id
            ],
        )?;
        Ok(id)
    }

    pub fn get(&self, id: &str) -> rusqlite::Result<Option<DestinationRecord>> {
        self.conn()
            .query_row(
                "SELECT * FROM destinations WHERE destination_id = ?1",
                params![id],
                row,
            )
            .optional()
    }

    pub fn list(&self, tenant: &str) -> rusqlite::Result<Vec<DestinationRecord>> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare("SELECT * FROM destinations WHERE tenant_id = ?1 ORDER BY name")?;
        let rows = stmt.query_map(params![tenant], row)?;
        rows.collect()
    }

    pub fn delete(&self, id: &str) -> rusqlite::Result<bool> {
        Ok(self.conn().execute(
            "DELETE FROM destinations WHERE destination_id = ?1",
            params![id],
        )? == 1)
    }

    /// Runs `f` with the store on tokio's blocking pool, off the runtime's
    /// worker threads.
    async fn off_runtime<T, F>(self: &Arc<Self>, f: F) -> Result<T, DestinationStoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Self) -> rusqlite::Result<T> + Send + 'static,
    {
        let store = Arc::clone(self);
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| DestinationStoreError::Task(e.to_string()))?
            .map_err(DestinationStoreError::from)
    }

    /// [`DestinationStore::put`] on the blocking pool.
    pub async fn put_async(
        self: &Arc<Self>,
        tenant: String,
        name: String,
        config: DestinationConfig,
        credential_id: String,
    ) -> Result<String, DestinationStoreError> {
        self.off_runtime(move |s| s.put(&tenant, &name, &config, &credential_id))
            .await
    }

    /// [`DestinationStore::get`] on the blocking pool.
    pub async fn get_async(
        self: &Arc<Self>,
        id: &str,
    ) -> Result<Option<DestinationRecord>, DestinationStoreError> {
        let id = id.to_owned();
        self.off_runtime(move |s| s.get(&id)).await
    }

    /// [`DestinationStore::list`] on the blocking pool.
    pub async fn list_async(
        self: &Arc<Self>,
        tenant: &str,
    ) -> Result<Vec<DestinationRecord>, DestinationStoreError> {
        let tenant = tenant.to_owned();
        self.off_runtime(move |s| s.list(&tenant)).await
    }

    /// [`DestinationStore::delete`] on the blocking pool.
    pub async fn delete_async(self: &Arc<Self>, id: &str) -> Result<bool, DestinationStoreError> {
        let id = id.to_owned();
        self.off_runtime(move |s| s.delete(&id)).await
    }
}
