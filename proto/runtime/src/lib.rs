//! What both recvault services share and nothing else: mTLS configuration
//! (TLS 1.3 only, client certificates required, files reloaded on change),
//! peer identity from certificates, dev certificates, process hardening and
//! locked, zeroizing memory for secrets. No key handling lives here.

pub mod hardening;
pub mod secret;
