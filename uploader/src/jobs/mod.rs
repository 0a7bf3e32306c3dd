//! Delivery jobs: one per ingested recording, persisted so that a crash at
//! any point resumes the job instead of losing it. This module records and
//! guards state; it never touches backups or destinations itself.

mod ids;
mod model;
mod retry;
mod state;
mod store;

pub use ids::{
    ContentType, DEFAULT_CONTENT_TYPE, DestinationId, FileName, InvalidValue, JobId,
    MAX_CONTENT_TYPE_LEN, MAX_FILE_NAME_LEN, MAX_ID_LEN, RecordingId, TenantId,
};
pub use model::{
    Clash, Job, JobEvent, JobFilter, JobStoreError, KeyConflict, NewJob, ObjectKey, ReleasedUpload,
    Resend, rfc3339,
};
pub use retry::{FailureClass, GiveUp, RetryPolicy, RetryState};
pub use state::{IllegalTransition, JobState, VerifiedBy, check_transition};
pub use store::{JobStore, Replica};
