//! Stored destinations (where a tenant's recordings go), over a
//! [`DestinationBackend`] (SQLite or PostgreSQL). Holds a credential *id*,
//! never a credential.

use std::{path::Path, sync::Arc};

use crate::destination::DestinationConfig;
use crate::jobs::JobStoreError;
use crate::store::DestinationBackend;
pub use crate::store::DestinationRecord;

/// A destination-store call that failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DestinationStoreError {
    /// The backend failed (down, I/O, a corrupt row).
    #[error("destination store: {0}")]
    Store(#[from] JobStoreError),
    /// The blocking task running the call panicked or was cancelled.
    #[error("destination store task failed: {0}")]
    Task(String),
}

/// The destinations. The plain methods block (start-up, tests, blocking
/// threads); async code uses the `*_async` ones, which run on tokio's
/// blocking pool.
#[derive(Debug, Clone)]
pub struct DestinationStore {
    backend: Arc<dyn DestinationBackend>,
}

impl DestinationStore {
    /// Destinations in the SQLite file at `path` (the embedded default).
    pub fn open(path: &Path) -> Result<Self, JobStoreError> {
        Ok(Self::new(Arc::new(
            crate::store::sqlite::SqliteDestinations::open(path)?,
        )))
    }

    /// Destinations in `backend`.
    pub fn new(backend: Arc<dyn DestinationBackend>) -> Self {
        Self { backend }
    }

    /// Creates or replaces (same tenant and name) a destination; returns its id.
    pub fn put(
        &self,
        tenant: &str,
        name: &str,
        config: &DestinationConfig,
        credential_id: &str,
    ) -> Result<String, JobStoreError> {
        self.backend.put(tenant, name, config, credential_id)
    }

    /// One destination.
    pub fn get(&self, id: &str) -> Result<Option<DestinationRecord>, JobStoreError> {
        self.backend.get(id)
    }

    /// A tenant's destinations, by name.
    pub fn list(&self, tenant: &str) -> Result<Vec<DestinationRecord>, JobStoreError> {
        self.backend.list(tenant)
    }

    /// Deletes one; false if it did not exist.
    pub fn delete(&self, id: &str) -> Result<bool, JobStoreError> {
        self.backend.delete(id)
    }

    /// Runs `f` with the backend on tokio's blocking pool.
    async fn off_runtime<T, F>(&self, f: F) -> Result<T, DestinationStoreError>
    where
        T: Send + 'static,
        F: FnOnce(&dyn DestinationBackend) -> Result<T, JobStoreError> + Send + 'static,
    {
        let backend = Arc::clone(&self.backend);
        tokio::task::spawn_blocking(move || f(&*backend))
            .await
            .map_err(|e| DestinationStoreError::Task(e.to_string()))?
            .map_err(DestinationStoreError::from)
    }

    /// [`DestinationStore::put`] on the blocking pool.
    pub async fn put_async(
        &self,
        tenant: String,
        name: String,
        config: DestinationConfig,
        credential_id: String,
    ) -> Result<String, DestinationStoreError> {
        self.off_runtime(move |b| b.put(&tenant, &name, &config, &credential_id))
            .await
    }

    /// [`DestinationStore::get`] on the blocking pool.
    pub async fn get_async(
        &self,
        id: &str,
    ) -> Result<Option<DestinationRecord>, DestinationStoreError> {
        let id = id.to_owned();
        self.off_runtime(move |b| b.get(&id)).await
    }

    /// [`DestinationStore::list`] on the blocking pool.
    pub async fn list_async(
        &self,
        tenant: &str,
    ) -> Result<Vec<DestinationRecord>, DestinationStoreError> {
        let tenant = tenant.to_owned();
        self.off_runtime(move |b| b.list(&tenant)).await
    }

    /// [`DestinationStore::delete`] on the blocking pool.
    pub async fn delete_async(&self, id: &str) -> Result<bool, DestinationStoreError> {
        let id = id.to_owned();
        self.off_runtime(move |b| b.delete(&id)).await
    }
}
