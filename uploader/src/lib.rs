//! recvault uploader: takes recordings over a gRPC stream, keeps them durable
//! in our backup store, delivers them to the customer's storage with
//! provider-checked checksums, verifies, and only then deletes the backup.

pub mod activity;
pub mod credential;
pub mod destination;

pub mod backup;
pub mod digest;
pub mod ingest;
pub mod jobs;
pub mod scrub;

pub mod cli;
pub mod config;
pub mod datakey;
pub mod destination_store;
pub mod error;
pub mod lease;
pub mod metrics;
pub mod server;
pub mod service;
pub mod store;
pub mod worker;
