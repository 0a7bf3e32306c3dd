//! What both recvault services share and nothing else: mTLS configuration
//! (TLS 1.3 only, client certificates required, files reloaded on change),
//! peer identity from certificates, the policy format (identity → roles per
//! tenant), dev certificates, logging, process
//! hardening, CPU time from `/proc` for the benchmarks and locked, zeroizing memory for secrets. No key handling lives here.

pub mod alloc;
pub mod config;
pub mod cpu;
pub mod datakey;
pub mod devcerts;
pub mod hardening;
pub mod hpke;
pub mod identity;
pub mod logging;
pub mod metrics;
pub mod oversized;
pub mod policy;
pub mod probe;
pub mod secret;
pub mod shutdown;
pub mod tls;
