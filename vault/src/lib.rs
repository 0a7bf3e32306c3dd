//! recvault vault: the only process that holds the master key.
//!
//! It stores credentials sealed with A256CBC-HS512 (RFC 7518 §5.2), hands
//! plaintext only to the uploader identity as a short lease over mTLS (sealed
//! end to end to a key the uploader made for that one call), and writes every
//! access to a hash-chained, fail-closed audit log.

pub mod cli;
pub mod config;
pub mod core;
pub mod crypto;
pub mod datakeys;
pub mod error;
pub mod ids;
pub mod keyring;
pub mod leases;
pub mod metrics;
pub mod policy;
pub mod refusals;
pub mod sealing;
pub mod server;
pub mod service;
pub mod store;
pub mod testing;
