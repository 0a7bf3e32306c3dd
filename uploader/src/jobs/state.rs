//! The uploader's job state machine (uploader/README.md) and the one function that
//! says which transitions are legal. It stores nothing; the job store calls
//! [`check_transition`] inside the transaction that changes the state.

use std::fmt;

use recvault_proto::uploader::v1 as pb;

/// Where a job is. The names and meanings are those of the proto `JobState`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobState {
    /// Durable in the backup store, waiting for its first attempt.
    Stored,
    /// An attempt is sending the recording to the destination.
    Uploading,
    /// The upload finished; the destination's copy is being checked.
    Verifying,
    /// Verified at the destination. Terminal; the backup is (being) deleted.
    Delivered,
    /// An attempt failed with a transient error; another is scheduled.
    Retrying,
    /// Permanent error, attempts exhausted or a corrupt backup. The backup is
    /// kept; only a resend moves the job on.
    Retained,
}

impl JobState {
    /// Every state, in proto order.
    pub const ALL: [Self; 6] = [
        Self::Stored,
        Self::Uploading,
        Self::Verifying,
        Self::Delivered,
        Self::Retrying,
        Self::Retained,
    ];

    /// The name stored in the database and printed in logs (`STORED`, ...).
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Stored => "STORED",
            Self::Uploading => "UPLOADING",
            Self::Verifying => "VERIFYING",
            Self::Delivered => "DELIVERED",
            Self::Retrying => "RETRYING",
            Self::Retained => "RETAINED",
        }
    }

    /// Parses [`JobState::as_str`] output.
    pub fn from_db(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// True for states no worker will move on by itself (WatchJob ends there).
    pub const fn is_settled(self) -> bool {
        matches!(self, Self::Delivered | Self::Retained)
    }

    /// The wire enum.
    pub const fn to_proto(self) -> pb::JobState {
        match self {
            Self::Stored => pb::JobState::Stored,
            Self::Uploading => pb::JobState::Uploading,
            Self::Verifying => pb::JobState::Verifying,
            Self::Delivered => pb::JobState::Delivered,
            Self::Retrying => pb::JobState::Retrying,
            Self::Retained => pb::JobState::Retained,
        }
    }

    /// From the wire enum; `None` for `JOB_STATE_UNSPECIFIED` (e.g. "any state" in ListJobs).
    pub const fn from_proto(state: pb::JobState) -> Option<Self> {
        match state {
            pb::JobState::Unspecified => None,
            pb::JobState::Stored => Some(Self::Stored),
            pb::JobState::Uploading => Some(Self::Uploading),
            pb::JobState::Verifying => Some(Self::Verifying),
            pb::JobState::Delivered => Some(Self::Delivered),
            pb::JobState::Retrying => Some(Self::Retrying),
            pb::JobState::Retained => Some(Self::Retained),
        }
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A state change the machine does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a job cannot go from {from} to {to}")]
pub struct IllegalTransition {
    /// The job's current state.
    pub from: JobState,
    /// The state that was asked for.
    pub to: JobState,
}

/// Allows exactly the edges of the job state machine:
///
/// - `STORED | RETRYING → UPLOADING` (an attempt claims the job),
/// - `UPLOADING → VERIFYING → DELIVERED` (never DELIVERED without verifying),
/// - `UPLOADING | VERIFYING → RETRYING | RETAINED` (an attempt failed; also crash recovery),
/// - `STORED | RETRYING → RETAINED` (corrupt backup, destination gone),
/// - `RETAINED | RETRYING → STORED` (resend).
///
/// DELIVERED is terminal and nothing stays in place (`X → X` is refused).
pub const fn check_transition(from: JobState, to: JobState) -> Result<(), IllegalTransition> {
    use JobState::{Delivered, Retained, Retrying, Stored, Uploading, Verifying};
    let ok = matches!(
        (from, to),
        (Stored | Retrying, Uploading)
            | (Uploading, Verifying)
            | (Verifying, Delivered)
            | (Uploading | Verifying, Retrying | Retained)
            | (Stored | Retrying, Retained)
            | (Retained | Retrying, Stored)
    );
    if ok {
        Ok(())
    } else {
        Err(IllegalTransition { from, to })
    }
}

/// How a delivered copy was checked (proto `Job.verified_by`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VerifiedBy {
    /// The destination returned a checksum (e.g. S3 HEAD with checksum mode) that matched.
    ProviderChecksum,
    /// The destination returned none, so the object was read back and hashed.
    ReadBack,
}

impl VerifiedBy {
    /// `provider-checksum` or `read-back`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::ProviderChecksum => "provider-checksum",
            Self::ReadBack => "read-back",
        }
    }

    /// Parses [`VerifiedBy::as_str`] output.
    pub fn from_db(s: &str) -> Option<Self> {
        [Self::ProviderChecksum, Self::ReadBack]
            .into_iter()
            .find(|v| v.as_str() == s)
    }
}

impl fmt::Display for VerifiedBy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use JobState::*;

    #[test]
    fn delivered_is_terminal_and_retained_only_leaves_by_resend() {
        for to in JobState::ALL {
            assert!(check_transition(Delivered, to).is_err(), "DELIVERED → {to}");
            assert_eq!(
                check_transition(Retained, to).is_ok(),
                to == Stored,
                "RETAINED → {to}"
            );
            assert!(check_transition(to, to).is_err(), "{to} → {to}");
        }
    }

    #[test]
    fn delivery_requires_verification() {
        assert!(check_transition(Stored, Delivered).is_err());
        assert!(check_transition(Uploading, Delivered).is_err());
        assert!(check_transition(Uploading, Verifying).is_ok());
        assert!(check_transition(Verifying, Delivered).is_ok());
    }

    #[test]
    fn names_round_trip() {
        for s in JobState::ALL {
            assert_eq!(JobState::from_db(s.as_str()), Some(s));
            assert_eq!(JobState::from_proto(s.to_proto()), Some(s));
        }
    }
}
