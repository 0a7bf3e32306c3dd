//! The uploader's gRPC services. Every handler first checks the caller's
//! role (recorder ingests; manager manages destinations and jobs).

pub mod destinations;
pub mod jobs;
pub mod recordings;

use std::sync::Arc;

use recvault_runtime::identity;
use tonic::{Request, Status};

use crate::{
    backup::BackupStore, config::Access, destination::S3Options,
    destination_store::DestinationStore, jobs::JobStore, lease::VaultLeases,
};

/// What the services share.
#[derive(Debug)]
pub struct Shared {
    pub jobs: JobStore,
    pub backups: BackupStore,
    pub destinations: Arc<DestinationStore>,
    pub vault: VaultLeases,
    pub access: Access,
    pub ingest_limits: crate::ingest::IngestLimits,
    pub s3: S3Options,
    pub wake: Arc<tokio::sync::Notify>,
    pub metrics: Arc<crate::metrics::UploaderMetrics>,
}

/// The uploader's roles.
#[derive(Debug, Clone, Copy)]
pub enum Role {
    Recorder,
    Manager,
}

impl Shared {
    /// PERMISSION_DENIED unless the peer certificate's identity holds `role`.
    pub fn authorize<T>(&self, request: &Request<T>, role: Role) -> Result<String, Status> {
        let peer = identity::peer_identity(request).ok_or_else(|| {
            Status::unauthenticated("the client certificate names no identity (no URI or DNS SAN)")
        })?;
        let (allowed, name) = match role {
            Role::Recorder => (&self.access.recorder, "recorder"),
            Role::Manager => (&self.access.manager, "manager"),
        };
        if allowed.contains(&peer.id) {
            return Ok(peer.id);
        }
        tracing::info!(identity = %peer.id, role = name, "permission denied");
        Err(Status::permission_denied(format!(
            "identity {} does not hold the {name} role; add it to [access].{name} in the uploader config",
            peer.id
        )))
    }
}
