//! recvault uploader: takes recordings over a gRPC stream, keeps them durable
//! in our backup store, delivers them to the customer's storage with
//! provider-checked checksums, verifies, and only then deletes the backup.

pub mod credential;
pub mod destination;
