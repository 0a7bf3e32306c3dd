//! The vault gRPC services. Each handler: take the call, authorize, do
//! the work, and let `VaultCore::finish` audit it before anything is returned.

pub mod audit;
pub mod credentials;
pub mod datakeys;
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
