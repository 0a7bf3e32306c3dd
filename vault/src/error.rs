//! The vault's errors and their one mapping to gRPC status codes. Messages
//! say what went wrong and what to do; none ever contains a secret.

use tonic::{Code, Status};

/// Every way a vault RPC can fail.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VaultError {
    /// A request field is missing or malformed; the message names the field.
    #[error("{0}")]
    InvalidArgument(String),
    /// The named thing does not exist (or was deleted).
    #[error("{0}")]
    NotFound(String),
    /// The peer has no grant for this RPC (or tenant).
    #[error(
        "identity {identity} may not call {operation}: it needs the {role} role{scope}; ask an admin to add a grant to the vault policy"
    )]
    PermissionDenied {
        identity: String,
        operation: String,
        role: String,
        scope: String,
    },
    /// The client certificate carries no identity (no URI or DNS SAN).
    #[error(
        "the client certificate has no URI or DNS subject alternative name, so it names no identity"
    )]
    Unauthenticated,
    /// The request is valid but the state does not allow it (released lease, retired key...).
    #[error("{0}")]
    FailedPrecondition(String),
    /// A limit was hit (too many leases).
    #[error("{0}")]
    ResourceExhausted(String),
    /// The audit log could not record the access: fail closed.
    #[error("the audit log is unavailable ({0}); nothing was done or returned; retry later")]
    AuditUnavailable(String),
    /// A concurrent change won (a uniqueness rule refused this one): retry.
    #[error("{0}; another change to the same thing won; read it again and retry")]
    Conflict(String),
    /// Storage failed.
    #[error("storage error: {0}; retry later")]
    Unavailable(String),
    /// A stored secret failed authentication: tampering, a moved row or a retired key.
    #[error(
        "credential {0} cannot be decrypted: its ciphertext failed authentication or its key version is retired; store it again"
    )]
    Undecryptable(String),
}

impl From<VaultError> for Status {
    fn from(error: VaultError) -> Self {
        let code = match &error {
            VaultError::InvalidArgument(_) => Code::InvalidArgument,
            VaultError::NotFound(_) => Code::NotFound,
            VaultError::PermissionDenied { .. } => Code::PermissionDenied,
            VaultError::Unauthenticated => Code::Unauthenticated,
            VaultError::FailedPrecondition(_) | VaultError::Undecryptable(_) => {
                Code::FailedPrecondition
            }
            VaultError::ResourceExhausted(_) => Code::ResourceExhausted,
            VaultError::Conflict(_) => Code::Aborted,
            VaultError::AuditUnavailable(_) | VaultError::Unavailable(_) => Code::Unavailable,
        };
        Status::new(code, error.to_string())
    }
}

impl From<crate::store::StoreError> for VaultError {
    fn from(error: crate::store::StoreError) -> Self {
        use crate::store::StoreError;
        match error {
            StoreError::Gate(reason) => VaultError::AuditUnavailable(reason),
            StoreError::Conflict(_) => VaultError::Conflict(error.to_string()),
            error => {
                tracing::error!(%error, "credential store failed");
                VaultError::Unavailable(error.to_string())
            }
        }
    }
}

/// The canonical upper-case name of a code, as written into audit events
/// (shared with the uploader, so both logs spell codes alike).
pub use recvault_audit::grpc::code_name;
