//! Who is calling: the identity of a verified peer certificate.
//!
//! Identity = the leaf certificate's URI SAN (SPIFFE style,
//! `spiffe://recvault.local/uploader`), else its first DNS SAN. The
//! certificate's SHA-256 fingerprint goes into audit events. This module only
//! reads certificates the TLS layer already verified; it grants nothing.

use std::fmt;

use rustls::pki_types::CertificateDer;
use sha2::{Digest, Sha256};
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use x509_parser::{extensions::GeneralName, prelude::FromDer};

/// The verified identity of the peer of one request.
#[derive(Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// URI SAN, else DNS SAN, of the leaf certificate.
    pub id: String,
    /// Lowercase hex SHA-256 of the leaf certificate (DER).
    pub cert_sha256: String,
}

impl fmt::Debug for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PeerIdentity({} sha256:{})", self.id, self.cert_sha256)
    }
}

/// Reads the identity from a leaf certificate. `None` when it has neither a
/// URI nor a DNS SAN (such a peer is treated as having no grant).
pub fn identity_of_certificate(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    let names = &san.value.general_names;
    names
        .iter()
        .find_map(|n| match n {
            GeneralName::URI(uri) => Some((*uri).to_owned()),
            _ => None,
        })
        .or_else(|| {
            names.iter().find_map(|n| match n {
                GeneralName::DNSName(dns) => Some((*dns).to_owned()),
                _ => None,
            })
        })
}

/// Lowercase hex SHA-256 of a certificate.
pub fn fingerprint(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// The peer's identity for a request served over [`crate::tls::incoming`].
/// `None` when the connection is not TLS or the certificate names no identity.
pub fn peer_identity<T>(request: &tonic::Request<T>) -> Option<PeerIdentity> {
    connection_identity(
        request
            .extensions()
            .get::<TlsConnectInfo<TcpConnectInfo>>()?,
    )
}

/// The identity of the peer of one TLS connection (the connect info tonic
/// puts into every request's extensions, also visible to tower layers).
pub fn connection_identity(info: &TlsConnectInfo<TcpConnectInfo>) -> Option<PeerIdentity> {
    let certs = info.peer_certs()?;
    let leaf: &CertificateDer<'_> = certs.first()?;
    let digest: [u8; 32] = Sha256::digest(leaf.as_ref()).into();
    // Parsing X.509 on every call costs more than the rest of a cheap RPC; the
    // same few certificates call again and again, so remember what they name.
    // Keyed by the certificate's SHA-256, so a different certificate never hits.
    if let Some(id) = identity_cache()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&digest)
    {
        return id.clone().map(|id| PeerIdentity {
            id,
            cert_sha256: hex::encode(digest),
        });
    }
    let id = identity_of_certificate(leaf);
    let mut cache = identity_cache().lock().unwrap_or_else(|p| p.into_inner());
    if cache.len() >= IDENTITY_CACHE_MAX {
        cache.clear();
    }
    cache.insert(digest, id.clone());
    Some(PeerIdentity {
        id: id?,
        cert_sha256: hex::encode(digest),
    })
}

/// Most certificates remembered by [`peer_identity`] (cleared when full).
const IDENTITY_CACHE_MAX: usize = 4096;

fn identity_cache() -> &'static std::sync::Mutex<std::collections::HashMap<[u8; 32], Option<String>>>
{
    static CACHE: std::sync::OnceLock<
        std::sync::Mutex<std::collections::HashMap<[u8; 32], Option<String>>>,
    > = std::sync::OnceLock::new();
    CACHE.get_or_init(Default::default)
}

/// The peer's fingerprint even when no identity could be read (for audit of denials).
pub fn peer_fingerprint<T>(request: &tonic::Request<T>) -> Option<String> {
    connection_fingerprint(
        request
            .extensions()
            .get::<TlsConnectInfo<TcpConnectInfo>>()?,
    )
}

/// The fingerprint of a TLS connection's peer certificate, identity or not.
pub fn connection_fingerprint(info: &TlsConnectInfo<TcpConnectInfo>) -> Option<String> {
    info.peer_certs()?.first().map(|c| fingerprint(c))
}
