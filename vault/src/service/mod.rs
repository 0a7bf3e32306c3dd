//! The four vault gRPC services. Each handler: take the call, authorize, do
//! the work, and let `VaultCore::finish` audit it before anything is returned.

pub mod audit;
pub mod credentials;
pub mod keys;
pub mod leases;

use prost_types::Timestamp;

/// Unix seconds → protobuf timestamp.
pub(crate) fn timestamp(unix_seconds: i64) -> Timestamp {
    Timestamp {
        seconds: unix_seconds,
        nanos: 0,
    }
}

pub(crate) fn timestamp_of(t: time::OffsetDateTime) -> Timestamp {
    Timestamp {
        seconds: t.unix_timestamp(),
        nanos: i32::try_from(t.nanosecond()).unwrap_or(0),
    }
}
