//! What can go wrong in the audit log, and what the operator should do about it.

/// An audit log failure.
///
/// Messages name files or databases (never a password), sequence numbers
/// and the database's own error text, never record contents or key
/// material. No backend type appears in it. A service maps *any* error from
/// [`AuditLog::append`](super::AuditLog::append) to gRPC `UNAVAILABLE` and
/// withholds the response: a service fails closed when it cannot audit.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuditError {
    /// The audit key does not have the required length.
    #[error(
        "audit key must be 32 bytes, got {len}; derive it from the master key (vault) or read it from audit_key_file (uploader)"
    )]
    InvalidKey {
        /// Length of the rejected key.
        len: usize,
    },

    /// The database cannot be opened, created or initialised.
    #[error(
        "audit database {location} cannot be opened: {reason}; check the path (or URL) and permissions"
    )]
    Open {
        /// The database file, or the PostgreSQL host and database.
        location: String,
        /// The database's error.
        reason: String,
    },

    /// The database was written by a newer schema than this build understands.
    #[error(
        "audit database {location} has schema version {found}, this build knows {supported}; run a newer release of the service"
    )]
    Schema {
        /// The database file.
        location: String,
        /// `PRAGMA user_version` found in the file.
        found: i64,
        /// The newest version this build supports.
        supported: i64,
    },

    /// The stored chain is broken; the log refuses to extend it.
    #[error(
        "audit log is broken at sequence {sequence}: {reason}; run `verify` on the database and restore it from a backup"
    )]
    Tampered {
        /// The first sequence number that fails verification.
        sequence: u64,
        /// Why it fails.
        reason: String,
    },

    /// The event could not be made durable; the caller must fail its RPC with
    /// `UNAVAILABLE`. Nothing of the failed batch was stored.
    #[error("audit log unavailable: {reason}; the request was not performed, retry later")]
    Unavailable {
        /// What failed (SQLite's error text or the fault injected by a test).
        reason: String,
    },

    /// The writer thread has stopped (the log is shutting down, or it crashed).
    #[error("audit log is closed; the request was not performed, restart the service")]
    Closed,

    /// A record cannot be stored as given.
    #[error("audit record rejected: {reason}")]
    InvalidRecord {
        /// Which constraint the record breaks (never its contents).
        reason: &'static str,
    },

    /// Reading the database failed.
    #[error("audit database cannot be read: {reason}; check the database and retry")]
    Read {
        /// The database's error.
        reason: String,
    },

    /// A stored row cannot be decoded into an event (edited outside the service).
    #[error("audit event {sequence} cannot be decoded: {reason}; run `verify` on the database")]
    Corrupt {
        /// The row's sequence number.
        sequence: u64,
        /// What is wrong with it.
        reason: String,
    },

    /// Writing an export failed.
    #[error("audit export cannot be written: {source}; check the destination")]
    Export {
        /// The I/O error of the destination.
        #[source]
        source: std::io::Error,
    },
}
