//! The uploader's one mapping from its errors to gRPC status codes. Handlers
//! return these errors with `?`; nothing else picks a code for them.
//!
//! A taken name is `FAILED_PRECONDITION`, never `ALREADY_EXISTS`: many
//! clients read ALREADY_EXISTS on a create as "it is already stored", and
//! here nothing was stored: the recording must be sent again under another
//! file name (or recording id). A replay of a stored recording (same id,
//! same SHA-256) is not an error at all: Upload answers with the job.

use tonic::Status;

use crate::destination_store::DestinationStoreError;
use crate::jobs::JobStoreError;

impl From<JobStoreError> for Status {
    fn from(e: JobStoreError) -> Self {
        let msg = e.to_string();
        match e {
            JobStoreError::NotFound(_) => Status::not_found(msg),
            // The job exists; its state, its target or a name another
            // recording holds is the problem, and the message says the fix.
            JobStoreError::IllegalTransition { .. }
            | JobStoreError::FailedPrecondition { .. }
            | JobStoreError::KeyTaken { .. }
            | JobStoreError::NameTaken { .. }
            | JobStoreError::RecordingConflict { .. } => Status::failed_precondition(msg),
            // Another replica runs the job now: try again later.
            JobStoreError::ClaimLost { .. } => Status::aborted(msg),
            JobStoreError::Conflict(_) | JobStoreError::Unavailable(_) => Status::unavailable(msg),
            JobStoreError::Corrupt(_) => Status::internal(msg),
        }
    }
}

impl From<DestinationStoreError> for Status {
    fn from(e: DestinationStoreError) -> Self {
        match e {
            DestinationStoreError::Store(e) => e.into(),
            e @ DestinationStoreError::Task(_) => Status::unavailable(e.to_string()),
        }
    }
}
